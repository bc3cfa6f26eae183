"""register: the fine-tuned EF-FER2 (from EF-FER1) as a new version in the MLflow Model Registry.

Reads   <model>/mlflow_run.json     the finetune run that logged the model
        <model>/model.keras         registered as a file when that run logged no MLflow model
        <model>/provenance.json     protocol and the sha256 of the validation images
        <finetune-metrics>          val_macro_f1, the score the champion rule compares
Writes  <out>                       metrics/register.json: version, its score, whether champion moved and why
        MLflow registry: a new version of register.registered_model with alias register.alias; alias champion
                         moves only on a better validation macro-F1 on the same validation images
Params  register.registered_model, register.alias

Its own stage, so a rerun of compare's report never adds a registry version: DVC reruns this one
only when the model or its validation score changed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dlfer import registry
from dlfer.files import read_json, write_json
from dlfer.params import load_params
from dlfer.tracking import configure, stage_run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--model", type=Path, default=Path("models/finetune/with_ef_fer1"))
    parser.add_argument("--finetune-metrics", type=Path, default=Path("metrics/finetune_with_ef_fer1.json"))
    parser.add_argument("--out", type=Path, default=Path("metrics/register.json"))
    arguments = parser.parse_args(argv)
    try:
        params = load_params(arguments.params)
        configure()  # fail fast on an unreachable tracking store, before any work
        finetune_run_id = registry.finetune_run_id(arguments.model)
        provenance = read_json(arguments.model / "provenance.json")
        try:
            protocol, val_data = provenance["params"]["preprocess"]["protocol"], provenance["val_sha256"]
            val_macro_f1 = float(read_json(arguments.finetune_metrics)["val_macro_f1"])
        except KeyError as missing:
            raise ValueError(f"{arguments.model / 'provenance.json'} or {arguments.finetune_metrics} lacks {missing}; "
                             "rerun `dvc repro finetune@with_ef_fer1`") from None
        with stage_run("register", {"register": params.section("register")},
                       tags={"protocol": protocol, "finetune_run_id": finetune_run_id}) as run:
            registration = registry.register_candidate(
                model_name=params.register.registered_model, alias=params.register.alias,
                finetune_run_id=finetune_run_id, model_file=arguments.model / "model.keras",
                val_macro_f1=val_macro_f1, val_data_sha256=val_data, protocol=protocol,
                artifact_run_id=run.info.run_id)
            import mlflow

            mlflow.log_metrics({key: float(value) for key, value in registration.as_metrics().items()})
            write_json(arguments.out, {**registration.as_metrics(), "reason": registration.reason})
    except (OSError, ValueError) as error:  # bad inputs and params: one line naming the file and the fix
        sys.exit(f"register: {error}")
    print(registration.describe())


if __name__ == "__main__":
    main()
