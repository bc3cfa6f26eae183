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


def stage_environment(tmp_path: Path) -> dict[str, str]:
    """Environment for running stages as subprocesses: this venv first on PATH, MLflow in tmp_path."""
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
