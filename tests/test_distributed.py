"""Multi-worker training: two CPU workers of the real finetune stage on 127.0.0.1 (TF_CONFIG).

Keras 3's model.fit cannot train under MultiWorkerMirroredStrategy (keras-team/keras#20585;
reproduced with TF 2.20 / Keras 3.15: "Attempt to convert a value (PerReplica...)"). Until it
can, both workers must stop at once with a one-line reason, before reading data or logging.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import yaml

from conftest import PROJECT, stage_environment


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for probe in sockets:
        probe.bind(("127.0.0.1", 0))
    ports = [probe.getsockname()[1] for probe in sockets]
    for probe in sockets:
        probe.close()
    return ports


def test_two_cpu_workers_stop_at_once_with_the_reason(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "data").mkdir()
    for split, count in (("train", 28), ("val", 14)):
        np.savez(tmp_path / "data" / f"{split}.npz", images=rng.integers(0, 256, (count, 48, 48), dtype=np.uint8),
                 labels=np.arange(count) % 7, ids=np.array([f"{split}_{i}" for i in range(count)]))
    pd.DataFrame({"image_id": ["x"], "blank": [False]}).to_parquet(tmp_path / "data" / "audit.parquet")
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["preprocess"].update(image_size=32, channels=3)
    params["finetune"].update(backbone="efficientnet_b0", epochs=1, batch_size=14, max_seconds=0,
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
        assert worker.returncode != 0
        assert "multi_worker is not supported by Keras 3's model.fit (keras-team/keras#20585)" in output
    assert not (tmp_path / "worker0" / "model").exists() and not (tmp_path / "worker1" / "model").exists()
    client = mlflow.MlflowClient(tracking_uri=environment["MLFLOW_TRACKING_URI"])
    assert client.get_experiment_by_name("dlfer") is None  # nothing logged
