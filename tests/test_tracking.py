"""MLflow tracking: store location, tags, a real `mlflow server`, and failing fast when it is down."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import data_stage_project, stage_environment
from dlfer import tracking


def test_repository_root_steps_out_of_dvc_temporary_experiment_copies(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    queued = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123" / "stages"
    queued.mkdir(parents=True)
    assert tracking.repository_root(queued) == tmp_path
    assert tracking.repository_root(tmp_path / "stages") == tmp_path


def test_default_store_is_sqlite_at_the_root_and_the_environment_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri(tmp_path) == "http://127.0.0.1:5999"


def test_run_tags_carry_stage_commit_experiment_and_data_hash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-lark")
    (tmp_path / "data.dvc").write_text("outs:\n- md5: abc123.dir\n  path: data/external\n")
    tags = tracking.run_tags("finetune")
    assert tags["stage"] == "finetune" and tags["dvc_exp_name"] == "brisk-lark" and tags["data_hash"] == "abc123.dir"
    assert tags["git_commit"] == "unknown"  # tmp_path is no git checkout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def small_project(tmp_path: Path) -> Path:
    return data_stage_project(tmp_path, {"Training": 4, "PublicTest": 2, "PrivateTest": 2})


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` with a database backend on 127.0.0.1, stopped after the test."""
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{store / 'server.db'}", "--artifacts-destination", str(store / "artifacts"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    import requests

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                break
        except requests.RequestException:
            time.sleep(1)
    else:
        server.kill()
        pytest.fail("mlflow server did not come up within 120 s")
    yield url
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()


def test_a_stage_logs_to_a_real_mlflow_server(tmp_path, mlflow_server):
    project = small_project(tmp_path)
    environment = stage_environment(project)
    environment["MLFLOW_TRACKING_URI"] = mlflow_server
    launched = time.time()
    result = subprocess.run([sys.executable, "stages/preprocess.py"], cwd=project, env=environment,
                            capture_output=True, text=True, timeout=300)
    ended = time.time()
    assert result.returncode == 0, result.stderr

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)  # MLflow's REST client
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT_NAME)
    [run] = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'preprocess'")
    assert run.data.params["protocol"] == "official"
    assert run.data.metrics["n_train"] > 0
    assert [artifact.path for artifact in client.list_artifacts(run.info.run_id)] == ["preprocess.json"]
    # The run spans the stage's process, from its imports to its end, not only the logging at the end.
    assert launched * 1000 <= run.info.start_time <= run.info.end_time <= ended * 1000
    assert (run.info.end_time - run.info.start_time) / 1000 >= run.data.metrics["seconds"] > 0
    assert "seconds" not in json.loads((project / "metrics" / "preprocess.json").read_text())  # varies: MLflow only
    assert experiment.tags["mlflow.note.content"] == tracking.EXPERIMENT_DESCRIPTION


def test_an_unreachable_server_stops_the_stage_before_any_work(tmp_path):
    project = small_project(tmp_path)
    environment = stage_environment(project)
    environment["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run([sys.executable, "stages/preprocess.py"], cwd=project, env=environment,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "is unreachable" in result.stderr and "MLFLOW_TRACKING_URI" in result.stderr
    assert not (project / "data" / "prepared").exists()


REPOSITORY = Path(__file__).resolve().parents[1]


def stage_commands() -> dict[str, list[str]]:
    """Each stage's command from dvc.yaml (first variant of a foreach), run from this checkout's stages/."""
    import shlex

    import yaml

    stages = yaml.safe_load((REPOSITORY / "dvc.yaml").read_text())["stages"]
    commands = {}
    for name, stage in stages.items():
        if "foreach" in stage:
            variant = yaml.safe_load((REPOSITORY / "dvc.yaml").read_text())["vars"][0]["variants"][0]
            stage = {key: yaml.safe_load(yaml.safe_dump(value).replace("${item}", variant))
                     for key, value in stage["do"].items()}
        command = shlex.split(stage["cmd"])
        assert command[0] == "python" and command[1].startswith("stages/"), command
        outs = [next(iter(out)) if isinstance(out, dict) else out for out in stage.get("outs", []) + stage.get("metrics", [])]
        commands[name] = ([sys.executable, str(REPOSITORY / command[1]), *command[2:]], outs)
    return commands


STAGE_COMMANDS = stage_commands()


def tree_state(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("stage", sorted(STAGE_COMMANDS))
def test_every_stage_checks_the_tracking_store_before_any_work(tmp_path, stage):
    """A dead server stops each stage in seconds, with one line, its inputs unread and its outputs untouched.

    The project holds a real raw table and audit (validate and preprocess could do all their work)
    and placeholder outputs from an earlier run; the later stages' inputs are absent, so a stage
    that read them before checking the store would fail on them, not on the server.
    """
    command, outs = STAGE_COMMANDS[stage]
    project = small_project(tmp_path)
    shutil.rmtree(project / "stages")  # the commands run this checkout's stages
    for out in outs:
        target = project / out
        if target.exists():
            continue
        if target.suffix:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"an earlier run's output")
        else:
            target.mkdir(parents=True)
            (target / "earlier.txt").write_bytes(b"an earlier run's output")
    before = tree_state(project)
    dead = f"http://127.0.0.1:{free_port()}"
    environment = {**os.environ, "MLFLOW_TRACKING_URI": dead, "TF_CPP_MIN_LOG_LEVEL": "2", "MPLBACKEND": "Agg"}
    result = subprocess.run(command, cwd=project, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0] == (f"MLflow tracking server {dead} (MLFLOW_TRACKING_URI) is unreachable ([Errno 111] Connection "
                        "refused); start it (mlflow server), or unset MLFLOW_TRACKING_URI to use the local sqlite store")
    assert tree_state(project) == before  # it stopped before any work: every earlier output is as it was


def test_an_unusable_store_stops_with_one_line_naming_it(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    uri = f"sqlite:///{blocker}/mlflow.db"  # under a file: no database can be created there
    environment = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    result = subprocess.run([sys.executable, "-c", "from dlfer import tracking; tracking.configure()"],
                            cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"MLflow tracking store {uri} cannot be used ("), result.stderr
    assert lines[0].endswith("fix or unset MLFLOW_TRACKING_URI (unset: the local sqlite store mlflow.db)")
