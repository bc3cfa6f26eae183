import subprocess
import sys

import mlflow

from conftest import stage_environment


def test_runs_command_prints_recent_experiments_with_their_metrics(tmp_path):
    environment = stage_environment(tmp_path)
    client = mlflow.MlflowClient(tracking_uri=environment["MLFLOW_TRACKING_URI"])
    experiment_id = client.create_experiment("dlfer", artifact_location=(tmp_path / "mlruns").as_uri())
    finetune = client.create_run(experiment_id, tags={"stage": "finetune"})
    client.log_metric(finetune.info.run_id, "val_accuracy", 0.4321)
    for name, protocol, accuracy in (("brisk-lark", "official", 0.5123), ("paper-protocol", "paper", 0.7345)):
        run = client.create_run(experiment_id, tags={
            "stage": "evaluate", "dvc_exp_name": name, "git_commit": "0123456789abcdef", "protocol": protocol,
            "variant": "with_ef_fer1", "finetune_run_id": finetune.info.run_id})
        client.log_metric(run.info.run_id, "test_accuracy", accuracy)
        client.log_metric(run.info.run_id, "f1_macro", accuracy - 0.1)

    result = subprocess.run([sys.executable, "-m", "dlfer.cli", "runs"], cwd=tmp_path, env=environment,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "experiment" in lines[0] and "test_accuracy" in lines[0]
    assert "paper-protocol" in lines[1] and "0.7345" in lines[1]  # newest first
    assert "brisk-lark" in lines[2] and "0.5123" in lines[2] and "0.4321" in lines[2] and "0123456" in lines[2]
