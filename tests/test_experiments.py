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


def test_exps_command_lists_dvc_experiments_with_short_headline_columns(tmp_path):
    """A real git + DVC repository whose one stage writes dlfer's metrics files; two `dvc exp run`s."""
    environment = stage_environment(tmp_path)

    def run(*command):
        result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout

    (tmp_path / "params.yaml").write_text("preprocess:\n  protocol: official\nfinetune:\n  image_size: 64\n"
                                          "  epochs: 2\n")
    (tmp_path / "write_metrics.py").write_text(
        "import json, os, yaml\n"
        "epochs = yaml.safe_load(open('params.yaml'))['finetune']['epochs']\n"
        "os.makedirs('metrics', exist_ok=True)\n"
        "accuracy = 0.5 + epochs / 100\n"
        "json.dump({'test_accuracy': accuracy, 'test_accuracy_ci95_low': accuracy - 0.01,\n"
        "           'test_accuracy_ci95_high': accuracy + 0.01, 'f1_macro': accuracy - 0.05},\n"
        "          open('metrics/evaluate_with_ef_fer1.json', 'w'))\n"
        "json.dump({'test_accuracy': 0.3}, open('metrics/evaluate_without_ef_fer1.json', 'w'))\n"
        "json.dump({'val_accuracy': accuracy - 0.02}, open('metrics/finetune_with_ef_fer1.json', 'w'))\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  train:\n    cmd: python write_metrics.py\n    deps: [write_metrics.py]\n    params: [finetune]\n"
        "    metrics:\n      - metrics/evaluate_with_ef_fer1.json: {cache: false}\n"
        "      - metrics/evaluate_without_ef_fer1.json: {cache: false}\n"
        "      - metrics/finetune_with_ef_fer1.json: {cache: false}\n")
    run("git", "init", "-q", "-b", "main")
    run(sys.executable, "-m", "dvc", "init", "-q")
    run("git", "add", "-A")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "start")
    for name, epochs in (("short", 3), ("long", 10)):
        run(sys.executable, "-m", "dvc", "exp", "run", "-q", "-n", name, "-S", f"finetune.epochs={epochs}")

    lines = run(sys.executable, "-m", "dlfer.cli", "exps").splitlines()
    assert lines[0].split()[:5] == ["experiment", "protocol", "px", "epochs", "val"]
    assert max(len(line) for line in lines) <= 120
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["long"][1:4] == ["official", "64", "10"]
    assert rows["long"][4:7] == ["58.00", "60.00", "(59.0-61.0)"] and rows["long"][-1] == "+30.00"
    assert rows["short"][3] == "3" and rows["short"][5] == "53.00"
