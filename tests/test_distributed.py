"""Training on several machines through Ray Train (finetune.distribution: ray), on one 2-core machine.

A local Ray instance runs two workers of the real finetune stage under `dvc repro`; one worker is
killed with SIGKILL in the middle of an epoch, Ray restarts the group from the last epoch's checkpoint
and the run finishes. The same stage then trains without Ray on the same global batch, and both must
write the same outputs and learn the same amount, to the tolerances stated below.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import copy_project, stage_environment
from dlfer.model import train

pytest.importorskip("ray", reason="the Ray tests need the ray extra: pip install -e '.[ray]'")

VARIANT = "without_ef_fer1"
EPOCHS = 3
GLOBAL_BATCH = 14
# Two workers see the same global batches and apply the same summed gradients, but each normalises
# its half batch (7 images) with its own BatchNorm statistics, where one process uses all 14: the runs
# drift apart, more at each step. Measured here (Intel Xeon, 3 epochs of 4 steps): mean training loss
# over the epochs 2.68 on Ray vs 2.44 in one process (10%); the bound is 25%.
RELATIVE_LOSS_TOLERANCE = 0.25


def faces(per_class: int, seed: int) -> dict[str, np.ndarray]:
    """Learnable toy faces: each class a fixed random pattern plus noise, 48x48 uint8."""
    rng = np.random.default_rng(seed)
    patterns = np.random.default_rng(0).integers(0, 256, (7, 48, 48))
    labels = np.repeat(np.arange(7), per_class)
    images = np.clip(patterns[labels] + rng.normal(0, 40, (len(labels), 48, 48)), 0, 255).astype(np.uint8)
    return {"images": images, "labels": labels, "ids": np.array([f"{seed}_{i}" for i in range(len(labels))])}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict]:
    project = copy_project(tmp_path_factory.mktemp("ray"))
    environment = stage_environment(project)
    environment.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    for path in ("data/balanced", "data/validated", "models/pretrain"):
        (project / path).mkdir(parents=True)
    np.savez(project / "data/balanced/train.npz", **faces(8, seed=1))  # 56 images: 4 global batches of 14
    np.savez(project / "data/balanced/val.npz", **faces(2, seed=2))
    pd.DataFrame({"image_id": ["x"], "blank": [False]}).to_parquet(project / "data/validated/audit.parquet")
    (project / "models/pretrain/provenance.json").write_text('{"source": "none"}')  # unread by this variant
    return project, environment


def set_params(project: Path, **finetune) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["finetune"].update(backbone="efficientnet_lite0", image_size=32, channels=1, epochs=EPOCHS,
                              batch_size=GLOBAL_BATCH, learning_rate=0.003, max_seconds=0, **finetune)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def repro(project: Path, environment: dict, log: Path) -> subprocess.Popen:
    # Into a file, not a pipe: a pipe nobody reads until the end fills up and blocks Ray's log thread.
    with log.open("w") as handle:
        return subprocess.Popen(["dvc", "repro", "--single-item", f"finetune@{VARIANT}"], cwd=project,
                                env=environment, stdout=handle, stderr=subprocess.STDOUT)


def ray_worker_pids() -> list[int]:
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in listing.splitlines() if "RayTrainWorker" in line]


def outputs(project: Path) -> dict:
    out = project / "models" / "finetune" / VARIANT
    return {"files": sorted(path.name for path in out.iterdir()),
            "metrics": json.loads((project / f"metrics/finetune_{VARIANT}.json").read_text()),
            "provenance": json.loads((out / "provenance.json").read_text()),
            "plots": pd.read_csv(project / f"plots/finetune_{VARIANT}.csv")}


@pytest.fixture(scope="module")
def ray_run(project) -> dict:
    """dvc repro of finetune on 2 Ray workers; one is killed (SIGKILL) once the first epoch is checkpointed."""
    project, environment = project
    set_params(project, distribution="ray", ray_workers=2, ray_cpus_per_worker=1, ray_max_failures=2)
    log = project / "ray_run.log"
    running = repro(project, environment, log)
    killed = None
    deadline = time.monotonic() + 900
    while running.poll() is None and time.monotonic() < deadline:
        # Ray writes its checkpoint manager's snapshot once it has registered a reported checkpoint.
        if killed is None and list((project / "checkpoints").glob("finetune/*/*/ray/*/checkpoint_manager_snapshot.json")):
            pids = ray_worker_pids()
            if pids:
                killed = pids[-1]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.5)
    running.wait(timeout=60)
    output = log.read_text()
    assert running.returncode == 0, output[-5000:]
    return {**outputs(project), "killed": killed, "log": output,
            "storage_left": list((project / "checkpoints").glob("finetune/*/*/ray"))}


@pytest.fixture(scope="module")
def local_run(project, ray_run) -> dict:
    """The same stage and global batch in one process (model.fit), after the Ray run."""
    project, environment = project
    set_params(project, distribution="none")
    log = project / "local_run.log"
    running = repro(project, environment, log)
    running.wait(timeout=900)
    assert running.returncode == 0, log.read_text()[-5000:]
    return outputs(project)


def test_a_killed_worker_is_restarted_and_the_run_resumes_from_its_last_checkpoint(ray_run):
    # A worker is killed only once Ray holds the first epoch's checkpoint.
    assert ray_run["killed"] is not None, "no Ray worker was found to kill"
    training = ray_run["provenance"]["training"]
    assert 1 <= training["resumed_at_epoch"] < EPOCHS, ray_run["log"][-3000:]
    assert ray_run["metrics"]["epochs_run"] == EPOCHS
    assert list(ray_run["plots"]["epoch"]) == list(range(1, EPOCHS + 1))
    assert ray_run["storage_left"] == []  # emptied when done, as one-process training does: a forced rerun trains


def test_both_replicas_hold_the_same_weights_and_the_loss_goes_down(ray_run):
    runtime = ray_run["provenance"]["runtime"]
    assert runtime["ray_workers"] == 2 and runtime["replicas"] == 2
    assert runtime["replicas_identical"] is True
    losses = list(ray_run["plots"]["loss"])
    assert losses[-1] < losses[0] - 0.1, losses


def test_ray_writes_what_one_process_writes_and_learns_the_same(ray_run, local_run, project):
    assert ray_run["files"] == local_run["files"]
    assert set(ray_run["metrics"]) == set(local_run["metrics"])
    assert set(ray_run["plots"].columns) == set(local_run["plots"].columns)
    assert local_run["provenance"]["runtime"]["replicas"] == 1
    ray_loss, local_loss = ray_run["plots"]["loss"].mean(), local_run["plots"]["loss"].mean()
    assert abs(ray_loss - local_loss) < RELATIVE_LOSS_TOLERANCE * local_loss, (ray_loss, local_loss)
    assert local_run["plots"]["loss"].iloc[-1] < local_run["plots"]["loss"].iloc[0]

    # One MLflow run per stage run, with the per-epoch metrics, for the Ray run as for the local one.
    project, environment = project
    client = mlflow.MlflowClient(tracking_uri=environment["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("dlfer").experiment_id],
                              order_by=["attributes.start_time ASC"])
    assert [run.info.run_name for run in runs] == [f"finetune_{VARIANT}"] * 2
    for run in runs:
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch/loss")] == list(range(1, EPOCHS + 1))


@pytest.mark.parametrize("setting", ["mixed_precision", "jit_compile"])
def test_ray_refuses_what_its_loop_does_not_do(setting):
    settings = train.TrainingSettings(epochs=1, batch_size=8, learning_rate=0.01, seed=0, distribution="ray",
                                      **{setting: "on"})
    with pytest.raises(ValueError, match=f"finetune.{setting}: on is not supported with distribution: ray"):
        train.configure_runtime(settings)


def test_the_multi_worker_loop_runs_only_where_ray_set_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    settings = train.TrainingSettings(epochs=1, batch_size=8, learning_rate=0.01, seed=0, distribution="multi_worker")
    with pytest.raises(ValueError, match="use finetune.distribution: ray"):
        train.configure_runtime(settings)
