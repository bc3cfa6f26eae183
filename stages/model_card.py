"""model_card: the model card of the pipeline's model, from the files the other stages wrote.

Reads   <params>                        params.yaml (training configuration, protocol)
        <metrics-dir>/*.json            fetch, validate, preprocess, augment_balance, pretrain,
                                        finetune_<variant>, evaluate_<variant> (each optional)
        <models>/finetune/<variant>/    provenance.json (both variants), mlflow_run.json (with_ef_fer1)
        <reports>/evaluate/with_ef_fer1/per_class.csv
        <references>                    references/paper.yaml (the paper's claims, the human-accuracy anchor)
Writes  <out>                           reports/model_card.md
Params  none of its own; it describes the params the model was trained with.
MLflow  run model_card, with the card as an artifact.
Never recomputes a metric; a missing input is printed as n/a in the card, never guessed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dlfer.evaluation.model_card import write_model_card
from dlfer.tracking import configure, stage_run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--metrics-dir", type=Path, default=Path("metrics"))
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--reports", type=Path, default=Path("reports"))
    parser.add_argument("--references", type=Path, default=Path("references/paper.yaml"))
    parser.add_argument("--out", type=Path, default=Path("reports/model_card.md"))
    arguments = parser.parse_args(argv)
    if not arguments.params.is_file():
        raise SystemExit(f"model_card: {arguments.params}: not found; run from the repository root or pass --params")
    configure()  # fail fast on an unreachable tracking store, before any work
    text = write_model_card(arguments.params, arguments.metrics_dir, arguments.models, arguments.reports,
                            arguments.out, arguments.references)
    with stage_run("model_card"):
        import mlflow

        mlflow.log_artifact(str(arguments.out))
    missing = text.count("n/a")
    print(f"model_card: wrote {arguments.out}" + (f" ({missing} figures n/a: inputs missing)" if missing else ""))


if __name__ == "__main__":
    main()
