"""MLflow tracking for the pipeline stages.

Every stage opens one MLflow run named after itself and logs its params, metrics and
artifacts. Runs of one pipeline execution are findable together through their tags:
`git_commit`, `dvc_exp_name` (set by `dvc exp run`), `stage` and `data_hash`.

Default store: `sqlite:///<repo>/mlflow.db` with artifacts under `<repo>/mlruns/`. The repo
is the user's checkout even when DVC runs a queued experiment in a temporary copy under
`.dvc/tmp/exps/`, so queued runs land in the same store. `MLFLOW_TRACKING_URI` overrides it.

Every stage calls `configure()` first, right after reading params.yaml: an unreachable server
or unusable store stops it within seconds with one line, before any work and before DVC's
outputs are rewritten, rather than after minutes of work whose results could not be logged.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from pathlib import Path

import yaml

EXPERIMENT_NAME = "dlfer"
EXPERIMENT_DESCRIPTION = (
    "dlfer: the DLFER cascade (EF-FER1 -> EF-FER2) on FER2013, reproduced and audited. One run per DVC stage; "
    "runs of one pipeline execution share the tags git_commit, dvc_exp_name and data_hash. evaluate runs hold "
    "the test figures, tagged by variant (with / without EF-FER1) and protocol (official / paper).")
# When this stage's process began its work (stages import this module first): a stage's run starts here,
# not when it opens the run after the work, so its duration in the MLflow UI is the stage's.
PROCESS_STARTED = time.time()
_DVC_TEMP_MARKER = os.path.join(".dvc", "tmp", "exps")
_CONFIGURED: set[str] = set()
HEALTH_TIMEOUT_SECONDS = 5


class TrackingUnavailable(SystemExit):
    """The MLflow store cannot be used; uncaught, it ends the stage with its one-line message and exit code 1."""


def repository_root(start: str | Path | None = None) -> Path:
    """The user's checkout: the nearest parent with dvc.yaml, stepping out of DVC's temporary exp copies."""
    start = Path(start or os.environ.get("DVC_ROOT") or os.getcwd()).resolve()
    text = str(start)
    if _DVC_TEMP_MARKER in text:
        # A queued `dvc exp run` executes in <repo>/.dvc/tmp/exps/<tmpdir>/; the store belongs to <repo>.
        return Path(text.split(os.sep + _DVC_TEMP_MARKER)[0])
    for candidate in (start, *start.parents):
        if (candidate / "dvc.yaml").exists():
            return candidate
    return start


def tracking_uri(root: Path | None = None) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = root or repository_root()
    return f"sqlite:///{root / 'mlflow.db'}"


def git_commit(root: Path | None = None) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root or os.getcwd(), capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def data_hash(root: Path | None = None) -> str:
    """The md5 DVC pins for the raw input in data.dvc, or 'unpinned'."""
    path = (root or Path.cwd()) / "data.dvc"
    try:
        outs = yaml.safe_load(path.read_text())["outs"]
        return str(outs[0]["md5"])
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return "unpinned"


def run_tags(stage: str) -> dict[str, str]:
    workdir = Path.cwd()
    return {
        "stage": stage,
        "git_commit": git_commit(workdir),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
        "data_hash": data_hash(workdir),
    }


def configure() -> str:
    """Point MLflow at the project's store and fail fast when a remote tracking server is unreachable."""
    import mlflow

    uri = tracking_uri()
    if uri in _CONFIGURED:
        return uri
    mlflow.set_tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    try:
        client = mlflow.MlflowClient()
        if client.get_experiment_by_name(EXPERIMENT_NAME) is None:
            artifact_location = None
            if uri.startswith("sqlite:///"):
                artifact_location = (repository_root() / "mlruns").as_uri()
            try:
                client.create_experiment(EXPERIMENT_NAME, artifact_location=artifact_location)
            except Exception:  # another stage created it first (parallel queued experiments)
                if client.get_experiment_by_name(EXPERIMENT_NAME) is None:
                    raise
        experiment = mlflow.set_experiment(EXPERIMENT_NAME)
        if experiment.tags.get("mlflow.note.content") != EXPERIMENT_DESCRIPTION:
            try:
                client.set_experiment_tag(experiment.experiment_id, "mlflow.note.content", EXPERIMENT_DESCRIPTION)
            except Exception:  # another stage set it at the same moment (sqlite: a UNIQUE constraint fails)
                tags = client.get_experiment(experiment.experiment_id).tags
                if tags.get("mlflow.note.content") != EXPERIMENT_DESCRIPTION:
                    raise
    except Exception as error:  # MLflow and SQLAlchemy raise many kinds for a store that cannot be opened
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise TrackingUnavailable(f"MLflow tracking store {uri} cannot be used ({reason}); fix or unset "
                                  "MLFLOW_TRACKING_URI (unset: the local sqlite store mlflow.db)") from None
    _CONFIGURED.add(uri)
    return uri


def _check_server(uri: str) -> None:
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_SECONDS).raise_for_status()
    except requests.RequestException as error:
        raise TrackingUnavailable(f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is unreachable "
                                  f"({_short_reason(error)}); start it (mlflow server), or unset "
                                  "MLFLOW_TRACKING_URI to use the local sqlite store") from None


def _short_reason(error) -> str:
    """The cause of a failed request in a few words: requests wraps it in three layers of connection-pool text."""
    import requests

    if isinstance(error, requests.Timeout):
        return f"no answer within {HEALTH_TIMEOUT_SECONDS} s"
    if isinstance(error, requests.HTTPError) and error.response is not None:
        return f"/health answered HTTP {error.response.status_code}"
    found = re.search(r"\[Errno -?\d+\] [^'\")]+", str(error))
    return found.group(0) if found else type(error).__name__


@contextlib.contextmanager
def stage_run(stage: str, params: dict | None = None, run_name: str | None = None, tags: dict | None = None,
              resume_run_id: str | None = None):
    """Open the MLflow run of one stage, tagged so a whole pipeline execution can be found together.

    resume_run_id: the run a killed attempt of this stage left RUNNING; it is continued (and ends
    FINISHED) when this store still holds it in the experiment, else a new run starts.
    """
    import mlflow

    configure()
    run_id = resume_run_id if resume_run_id and _continuable(resume_run_id) else None
    all_tags = {**run_tags(stage), **(tags or {})}
    if run_id is None:
        # Created with the process's start time, so the run's duration covers the stage's work.
        experiment = mlflow.get_experiment_by_name(EXPERIMENT_NAME)
        run_id = mlflow.MlflowClient().create_run(experiment.experiment_id, start_time=int(PROCESS_STARTED * 1000),
                                                  tags=all_tags, run_name=run_name or stage).info.run_id
    with mlflow.start_run(run_id=run_id, tags=all_tags) as run:
        if params:
            mlflow.log_params(flatten(params))  # a continued run gets the same values again, which MLflow allows
        yield run


def _continuable(run_id: str) -> bool:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        return False
    experiment = mlflow.get_experiment_by_name(EXPERIMENT_NAME)
    return (experiment is not None and run.info.experiment_id == experiment.experiment_id
            and run.info.lifecycle_stage == "active")


def log_numeric_metrics(metrics: dict, step: int | None = None) -> None:
    """Log the numeric entries of a (possibly nested) metrics dict; text entries belong in tags or artifacts."""
    import mlflow

    numeric = {key: float(value) for key, value in flatten(metrics).items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    mlflow.log_metrics(numeric, step=step)


def flatten(params: dict, prefix: str = "") -> dict:
    """A nested dict as {dotted key: value}: MLflow params, metrics and params diffs."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def log_keras_model(model, name: str, example, pip_requirements: list[str]):
    """mlflow.keras.log_model with a signature and an input example; returns MLflow's ModelInfo.

    MLflow 3.17's keras flavour writes input_example.json before it creates the model folder, so
    log_model(..., input_example=...) fails with FileNotFoundError. Model.log with a flavour whose
    save_model creates the folder first is the same call otherwise (checked: the example lands in
    the logged model and mlflow.keras.load_model reads it back).
    """
    import types

    import mlflow
    from mlflow.models import Model, infer_signature

    def save_model(path, **arguments):
        os.makedirs(path, exist_ok=True)
        return mlflow.keras.save_model(path=path, **arguments)

    flavour = types.SimpleNamespace(save_model=save_model, __name__=mlflow.keras.__name__)
    signature = infer_signature(example, model.predict(example, verbose=0))
    return Model.log(None, name=name, flavor=flavour, model=model, signature=signature, input_example=example,
                     pip_requirements=pip_requirements)


def log_dataset(images, labels, name: str, source: str | Path, context: str) -> None:
    """The run's input in MLflow's Dataset column: name, digest of the arrays, where they came from."""
    import mlflow

    dataset = mlflow.data.from_numpy(images, targets=labels, name=name, source=str(source))
    mlflow.log_input(dataset, context=context)


def log_training_curves(history: list[dict], title: str) -> None:
    """Accuracy and loss per epoch, training and validation, as training_curves.png in the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in zip(axes, ("accuracy", "loss")):
        axis.plot(epochs, [row[metric] for row in history], marker="o", label=f"train {metric}")
        axis.plot(epochs, [row[f"val_{metric}"] for row in history], marker="o", label=f"val {metric}")
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    mlflow.log_figure(figure, "training_curves.png")
    plt.close(figure)
