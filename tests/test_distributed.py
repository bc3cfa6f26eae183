"""Multi-worker training: two CPU workers of the real finetune stage on 127.0.0.1 (TF_CONFIG).

Keras 3's model.fit cannot train under MultiWorkerMirroredStrategy (keras-team/keras#20585), so
finetune trains with dlfer.model.distributed's custom loop there. Both workers must finish, and only the
chief (worker 0) may write the stage's outputs and log to MLflow.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import PROJECT, stage_environment
from dlfer.model import train


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for probe in sockets:
        probe.bind(("127.0.0.1", 0))
    ports = [probe.getsockname()[1] for probe in sockets]
    for probe in sockets:
        probe.close()
    return ports


def test_two_cpu_workers_train_and_only_the_chief_writes_and_logs(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "data").mkdir()
    for split, count in (("train", 28), ("val", 14)):
        np.savez(tmp_path / "data" / f"{split}.npz", images=rng.integers(0, 256, (count, 48, 48), dtype=np.uint8),
                 labels=np.arange(count) % 7, ids=np.array([f"{split}_{i}" for i in range(count)]))
    pd.DataFrame({"image_id": ["x"], "blank": [False]}).to_parquet(tmp_path / "data" / "audit.parquet")
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["finetune"].update(image_size=32, channels=3)
    params["finetune"].update(backbone="efficientnet_lite0", epochs=1, batch_size=14, max_seconds=0,
                              distribution="multi_worker")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    environment = stage_environment(tmp_path)
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    workers = []
    for index in range(2):
        worker_environment = dict(environment, TF_CONFIG=json.dumps({"cluster": cluster,
                                                                    "task": {"type": "worker", "index": index}}))
        output = tmp_path / f"worker{index}"
        workers.append(subprocess.Popen(
            [sys.executable, str(PROJECT / "stages" / "finetune.py"), "--variant", "without_ef_fer1",
             "--params", "params.yaml", "--train", "data/train.npz", "--val", "data/val.npz",
             "--audit", "data/audit.parquet", "--pretrained", "models/pretrain", "--out", f"{output}/model",
             "--checkpoints", f"{output}/checkpoints", "--metrics", f"{output}/metrics.json",
             "--plots", f"{output}/plots.csv"],
            cwd=tmp_path, env=worker_environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]

    chief = tmp_path / "worker0"
    assert (chief / "model" / "model.keras").is_file() and (chief / "plots.csv").is_file()
    metrics = json.loads((chief / "metrics.json").read_text())
    assert metrics["epochs_run"] == 1 and metrics["train_images"] == 28
    provenance = json.loads((chief / "model" / "provenance.json").read_text())
    assert provenance["runtime"]["replicas"] == 2 and provenance["stopped_by"] == "epochs"
    assert not (tmp_path / "worker1").exists()  # the other worker trained but wrote nothing

    client = mlflow.MlflowClient(tracking_uri=environment["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("dlfer").experiment_id])
    assert len(runs) == 1
    assert runs[0].info.status == "FINISHED" and runs[0].info.run_name == "finetune_without_ef_fer1"
    assert runs[0].data.metrics["epochs_run"] == 1


@pytest.mark.parametrize("setting", ["mixed_precision", "jit_compile"])
def test_multi_worker_refuses_what_its_loop_does_not_do(monkeypatch, setting):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1"]},
                                                "task": {"type": "worker", "index": 0}}))
    settings = train.TrainingSettings(epochs=1, batch_size=8, learning_rate=0.01, seed=0,
                                      distribution="multi_worker", **{setting: "on"})
    with pytest.raises(ValueError, match=f"finetune.{setting}: on is not supported with distribution: multi_worker"):
        train.configure_runtime(settings)


def test_multi_worker_needs_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    settings = train.TrainingSettings(epochs=1, batch_size=8, learning_rate=0.01, seed=0, distribution="multi_worker")
    with pytest.raises(ValueError, match="TF_CONFIG is not set"):
        train.configure_runtime(settings)
