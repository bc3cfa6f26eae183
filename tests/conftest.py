"""Shared test helpers: where the real datasets are, and a project copy to run stages in."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
SHARED = PROJECT.parent / "shared"
FER2013_ZIP = SHARED / "datasets" / "fer2013" / "fer2013.zip"
IMAGENETTE_ZIP = SHARED / "datasets" / "imagenette" / "imagenette-128.zip"


def require(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"{path} is absent: the real-data tests need the shared datasets beside the checkout")
    return path


_MIGRATED_STORE: list[Path] = []


def migrated_mlflow_store(destination: Path) -> Path:
    """A ready MLflow sqlite store at `destination`, copied from one migrated once per session.

    Creating a store runs MLflow's schema migrations (10-20 s on these machines); a copy of an
    empty migrated database is the same store, made in milliseconds.
    """
    if not _MIGRATED_STORE:
        import tempfile

        import mlflow

        template = Path(tempfile.mkdtemp(prefix="dlfer-mlflow-")) / "mlflow.db"
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
        _MIGRATED_STORE.append(template)
    if not destination.exists():
        shutil.copyfile(_MIGRATED_STORE[0], destination)
    return destination


def stage_environment(tmp_path: Path) -> dict[str, str]:
    """Environment for running stages as subprocesses: this venv first on PATH, MLflow in tmp_path."""
    migrated_mlflow_store(tmp_path / "mlflow.db")
    environment = dict(os.environ)
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"
    environment["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    environment["TF_CPP_MIN_LOG_LEVEL"] = "2"
    environment["MPLBACKEND"] = "Agg"
    return environment


def copy_project(destination: Path) -> Path:
    """The pipeline's definition (not its outputs) copied into a fresh git + DVC repository."""
    for name in ("dvc.yaml", "params.yaml", "data.dvc", "pyproject.toml", "README.md"):
        shutil.copy2(PROJECT / name, destination / name)
    for folder in ("stages", "src", "references", "profiles", ".dvc"):
        shutil.copytree(PROJECT / folder, destination / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache", "config.local"))
    shutil.copy2(PROJECT / ".gitignore", destination / ".gitignore")
    return destination
