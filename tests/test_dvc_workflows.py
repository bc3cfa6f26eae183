"""The team workflows with the real tools: queued `dvc exp run` sweeps that log into the main
repository's MLflow store, and sharing outputs through a (local-directory) DVC remote.

Both run dlfer's own preprocess and augment_balance stages, as its dvc.yaml defines them, on a
tiny table, so they exercise DVC and MLflow, not training.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import PROJECT, stage_environment, tiny_audit, tiny_raw_table

# dlfer's own stage definitions, taken from its dvc.yaml: the two cheap data stages.
DATA_STAGES = ("preprocess", "augment_balance")


def data_pipeline() -> str:
    pipeline = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
    return yaml.safe_dump({"stages": {name: pipeline["stages"][name] for name in DATA_STAGES}}, sort_keys=False)


def git(project: Path, *arguments: str, environment: dict) -> None:
    subprocess.run(["git", *arguments], cwd=project, env=environment, check=True, capture_output=True)


def command(project: Path, environment: dict, *arguments: str, timeout: int = 600) -> str:
    """stdout of a command that must succeed. Its output goes through files, not pipes: `dvc exp run --run-all`
    spawns its queue workers from a process that keeps our stdout and stderr open as long as a worker lives,
    and a celery worker sometimes hangs in its own shutdown after the queue is done (treeverse/dvc#10398), so a
    pipe would wait for that rather than for the command."""
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        finished = subprocess.run(list(arguments), cwd=project, env=environment, stdout=stdout, stderr=stderr,
                                  text=True, timeout=timeout)
        stdout.seek(0), stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    assert finished.returncode == 0, f"{' '.join(arguments)}:\n{out[-3000:]}\n{err[-3000:]}"
    return out


def stop_queue_workers(project: Path) -> None:
    """Kill the DVC queue workers still alive after a test (see command): their status files under
    .dvc/tmp/exps/celery have no return code yet. A hung celery worker ignores SIGTERM."""
    for status in (project / ".dvc" / "tmp" / "exps" / "celery").glob("dvc-exp-worker-*.json"):
        worker = json.loads(status.read_text())
        if worker.get("returncode") is None and worker.get("pid"):
            try:
                os.kill(worker["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def repository(tmp_path):
    """A git + DVC repository holding the data stages and a tiny canonical table."""
    project = tmp_path / "repo"
    project.mkdir()
    environment = stage_environment(project)
    environment.pop("MLFLOW_TRACKING_URI")  # the stages must find <repo>/mlflow.db themselves
    environment.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    table = tiny_raw_table({"Training": 6, "PublicTest": 2, "PrivateTest": 2})
    for path in ("data/raw", "data/validated"):
        (project / path).mkdir(parents=True)
    # Where fetch and validate would write them; committed to git here, as those stages do not run.
    table.to_parquet(project / "data" / "raw" / "fer2013.parquet")
    tiny_audit(table).to_parquet(project / "data" / "validated" / "audit.parquet")
    for folder in ("stages", "src"):
        shutil.copytree(PROJECT / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy2(PROJECT / "params.yaml", project / "params.yaml")
    (project / "dvc.yaml").write_text(data_pipeline())
    (project / ".gitignore").write_text("mlflow.db\nmlruns/\n")
    git(project, "init", "-q", "-b", "main", environment=environment)
    command(project, environment, "dvc", "init", "-q")
    shutil.copy2(PROJECT / ".dvcignore", project / ".dvcignore")
    git(project, "add", "-A", environment=environment)
    git(project, "commit", "-qm", "pipeline", environment=environment)
    yield project, environment
    stop_queue_workers(project)


def test_queued_experiments_run_two_at_once_and_log_to_the_main_store(repository):
    project, environment = repository
    for seed in (1, 2):
        command(project, environment, "dvc", "exp", "run", "--queue", "-n", f"seed-{seed}", "-S", f"seed={seed}")
    command(project, environment, "dvc", "exp", "run", "--run-all", "-j", "2", timeout=900)

    shown = json.loads(command(project, environment, "dvc", "exp", "show", "--json"))
    names = {experiment.get("name") for commit in shown for experiment in (commit.get("experiments") or [])}
    assert {"seed-1", "seed-2"} <= names

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dlfer")
    runs = client.search_runs([experiment.experiment_id], max_results=50)
    logged = {(run.data.tags.get("dvc_exp_name"), run.data.tags.get("stage")) for run in runs}
    for name in ("seed-1", "seed-2"):
        assert (name, "preprocess") in logged and (name, "augment_balance") in logged
    assert not list((project / ".dvc" / "tmp").rglob("mlflow.db"))  # nothing stranded in DVC's temp copies


def test_outputs_round_trip_through_a_local_dvc_remote(repository, tmp_path):
    project, environment = repository
    command(project, environment, "dvc", "remote", "add", "-d", "team", str(tmp_path / "remote"))
    command(project, environment, "dvc", "repro")
    train = project / "data" / "balanced" / "train.npz"
    original = train.read_bytes()
    command(project, environment, "dvc", "push")

    for output in ("prepared", "balanced"):  # the stages' outputs; data/raw and data/validated are git's here
        shutil.rmtree(project / "data" / output)
    shutil.rmtree(project / ".dvc" / "cache")
    command(project, environment, "dvc", "pull")
    assert train.read_bytes() == original
    assert "up to date" in command(project, environment, "dvc", "status")
