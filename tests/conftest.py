"""Shared test helpers: where the real datasets are, and a project copy to run stages in."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dlfer.fer2013 import EMOTIONS, USAGES

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
    for name in ("dvc.yaml", "params.yaml", "data.dvc", "pyproject.toml", "README.md", ".dvcignore"):
        shutil.copy2(PROJECT / name, destination / name)
    for folder in ("stages", "src", "references", "profiles", ".dvc", "docs/results"):
        shutil.copytree(PROJECT / folder, destination / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "tmp", "cache", "config.local"))
    shutil.copy2(PROJECT / ".gitignore", destination / ".gitignore")
    return destination


def tiny_raw_table(per_class_usage: dict[str, int], seed: int = 0) -> pd.DataFrame:
    """A canonical table of random 48x48 faces: per_class_usage maps usage -> images per class."""
    rng = np.random.default_rng(seed)
    rows = []
    for usage in USAGES:
        for label, emotion in enumerate(EMOTIONS):
            for _ in range(per_class_usage[usage] if emotion != "disgust" else max(per_class_usage[usage] // 3, 1)):
                pixels = rng.integers(0, 256, 48 * 48, dtype=np.uint8).tobytes()
                rows.append({"usage": usage, "label": label, "emotion": emotion, "height": 48, "width": 48,
                             "channels": 1, "pixels": pixels, "sha256": hashlib.sha256(pixels).hexdigest(),
                             "source": f"row {len(rows)}"})
    table = pd.DataFrame(rows)
    table["image_id"] = [f"{usage}_{index:05d}" for index, usage in enumerate(table["usage"])]
    return table


def tiny_audit(table: pd.DataFrame) -> pd.DataFrame:
    audit = pd.DataFrame({"image_id": table["image_id"], "blank": False, "exact_group": -1, "near_group": -1,
                          "cross_usage_duplicate": False, "label_conflict": False})
    train = np.flatnonzero(table["usage"] == "Training")
    test = np.flatnonzero(table["usage"] == "PrivateTest")
    audit.loc[train[0], "blank"] = True
    audit.loc[[train[1], test[0]], "exact_group"] = 0  # a Training image duplicated in the test usage
    audit.loc[[train[1], test[0]], "cross_usage_duplicate"] = True
    return audit


def data_stage_project(directory: Path, per_class_usage: dict[str, int]) -> Path:
    """A scratch project holding fetch's and validate's outputs for a tiny table, ready for preprocess."""
    table = tiny_raw_table(per_class_usage)
    (directory / "data" / "raw").mkdir(parents=True)
    (directory / "data" / "validated").mkdir(parents=True)
    table.to_parquet(directory / "data" / "raw" / "fer2013.parquet")
    tiny_audit(table).to_parquet(directory / "data" / "validated" / "audit.parquet")
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["augment_balance"]["target_per_class"] = 0  # balance the tiny table fully, whatever the CPU profile does
    (directory / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(PROJECT / "stages", directory / "stages")
    return directory
