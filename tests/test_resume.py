"""A finetune killed with SIGKILL and rerun ends with the files of a run never killed (issue 12).

The real stage runs as DVC runs it, on real FER2013 faces, fine-tuning a small EfficientNet-Lite0
from its ImageNet weights (dropout and stochastic depth, so random state matters) with a cosine
schedule (so the optimizer's step matters). One copy trains straight through; another is killed
in the middle of an epoch, rerun, killed again the moment an epoch is committed, and rerun to the end.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_pretrain_finetune_stages import finetune_command, real_faces, start, write_params

from dlfer.files import read_json, write_json
from dlfer.model import backbones

EPOCHS = 4
VARIANT = "with_ef_fer1"
POLL_SECONDS = 0.02


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """The finetune stage's inputs: 6 real training faces per class (6 steps of 8), 2 validation faces per
    class, and what pretrain writes for Lite0's ImageNet weights (which install offline)."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "data" / "balanced").mkdir(parents=True)
    for split, (per_class, prefix) in {"train": (6, "Training"), "val": (2, "PublicTest")}.items():
        images, labels, ids = real_faces(per_class, prefix)
        np.savez(root / "data" / "balanced" / f"{split}.npz", images=images, labels=labels, ids=ids)
    (root / "data" / "validated").mkdir(parents=True)
    pd.DataFrame({"image_id": ["Training_00000"], "blank": [False]}).to_parquet(root / "data/validated/audit.parquet")
    backbone = backbones.build_backbone("efficientnet_lite0", 32)
    backbones.load_backbone_weights(backbone, "efficientnet_lite0", "imagenet")
    (root / "models" / "pretrain").mkdir(parents=True)
    backbone.save_weights(root / "models" / "pretrain" / "backbone.weights.h5")
    write_json(root / "models" / "pretrain" / "provenance.json",
               {"source": "imagenet", "backbone": "efficientnet_lite0", "channels": 3})
    write_params(root, pretrain={"source": "imagenet", "backbone": "efficientnet_lite0", "image_size": 32},
                 finetune={"backbone": "efficientnet_lite0", "image_size": 32, "channels": 3, "epochs": EPOCHS, "batch_size": 8, "max_seconds": 0,
                           "lr_schedule": "cosine", "learning_rate": 0.001, "dropout": 0.3})
    return root


def committed(workdir: Path) -> dict:
    """The training state of the last epoch the stage committed ({} if none)."""
    found = sorted((workdir / "checkpoints" / "finetune" / VARIANT).glob("*/progress.json"))
    return read_json(found[0]) if found else {}


def wait_for_commit(workdir: Path, epoch: int, process: subprocess.Popen, log: Path) -> dict:
    """Poll the checkpoint folder until the stage has committed `epoch`; the state it holds then."""
    while committed(workdir).get("epoch", 0) < epoch:
        assert process.poll() is None, f"the stage ended before committing epoch {epoch}:\n{log.read_text()[-3000:]}"
        time.sleep(POLL_SECONDS)
    return committed(workdir)


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL


def run_to_end(process: subprocess.Popen, log: Path) -> None:
    assert process.wait(timeout=600) == 0, log.read_text()[-3000:]


def finetune_runs(workdir: Path) -> tuple:
    """(A client of the workdir's MLflow store, the finetune runs it holds)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    return client, client.search_runs(experiments, "tags.stage = 'finetune'")


def test_a_finetune_killed_mid_epoch_and_between_epochs_ends_as_one_never_killed(inputs, tmp_path):
    straight, killed = (shutil.copytree(inputs, tmp_path / name) for name in ("straight", "killed"))
    command = {VARIANT: finetune_command(VARIANT)}
    uninterrupted, uninterrupted_log = start(straight, command)[VARIANT]

    # Killed in the middle of epoch 3: half of epoch 2's length after epoch 2 was committed.
    first, log = start(killed, command)[VARIANT]
    state = wait_for_commit(killed, 2, first, log)
    time.sleep(state["history"][-1]["seconds"] / 2)
    kill(first)
    # Killed between epochs: as soon as epoch 3 is committed, often before it reaches MLflow.
    second, log = start(killed, command)[VARIANT]
    wait_for_commit(killed, 3, second, log)
    kill(second)
    resumed_at = committed(killed)["epoch"]
    assert not (killed / "metrics").exists()
    third, log = start(killed, command)[VARIANT]
    run_to_end(third, log)
    run_to_end(uninterrupted, uninterrupted_log)

    # Byte for byte: the metrics DVC tracks and the per-epoch curves.
    for path in (f"metrics/finetune_{VARIANT}.json", f"plots/finetune_{VARIANT}.csv"):
        assert (killed / path).read_bytes() == (straight / path).read_bytes(), path
    assert read_json(killed / f"metrics/finetune_{VARIANT}.json")["epochs_run"] == EPOCHS
    provenance = read_json(killed / "models" / "finetune" / VARIANT / "provenance.json")
    assert provenance["training"]["resumed_at_epoch"] == resumed_at >= 3
    assert read_json(straight / "models" / "finetune" / VARIANT / "provenance.json")["training"]["resumed_at_epoch"] == 0

    # One MLflow run, continued by each rerun and finished by the last, each epoch logged once.
    client, runs = finetune_runs(killed)
    assert [(run.info.status, run.data.tags["resumed_at_epoch"]) for run in runs] == [("FINISHED", str(resumed_at))]
    run_id = runs[0].info.run_id
    assert read_json(killed / "models" / "finetune" / VARIANT / "mlflow_run.json")["run_id"] == run_id
    curve = sorted(client.get_metric_history(run_id, "epoch/val_accuracy"), key=lambda metric: metric.step)
    assert [metric.step for metric in curve] == list(range(1, EPOCHS + 1))
    straight_client, (straight_run,) = finetune_runs(straight)
    straight_curve = sorted(straight_client.get_metric_history(straight_run.info.run_id, "epoch/val_accuracy"),
                            key=lambda metric: metric.step)
    assert [metric.value for metric in curve] == [metric.value for metric in straight_curve]
    assert runs[0].data.metrics["training_seconds"] == provenance["training"]["seconds"]
    assert not any((killed / "checkpoints" / "finetune" / VARIANT).glob("*/*"))  # nothing left to resume
