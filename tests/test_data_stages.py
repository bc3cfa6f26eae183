"""preprocess and augment_balance run as DVC runs them, on a tiny canonical table in tmp_path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import data_stage_project, stage_environment


@pytest.fixture
def project(tmp_path):
    return data_stage_project(tmp_path, {"Training": 12, "PublicTest": 3, "PrivateTest": 3})


def set_params(project: Path, **sections) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params))


def run_stage(project: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"stages/{name}.py"], cwd=project, env=stage_environment(project),
                          capture_output=True, text=True, timeout=300)


def load(path: Path) -> dict:
    with np.load(path) as stored:
        return {key: stored[key] for key in stored.files}


def test_official_protocol_drops_flagged_train_images_and_balances_train_only(project):
    for stage in ("preprocess", "augment_balance"):
        result = run_stage(project, stage)
        assert result.returncode == 0, result.stderr
    dataset = load(project / "data" / "prepared" / "dataset.npz")
    assert dataset["images"].shape[1:] == (48, 48) and dataset["images"].dtype == np.uint8
    train, val, test = (load(project / "data" / "balanced" / f"{name}.npz") for name in ("train", "val", "test"))
    assert len(test["labels"]) == 7 * 3 - 2  # disgust has 1 per eval usage; test keeps its duplicate
    assert len(val["labels"]) == 7 * 3 - 2
    assert not any("~aug" in image_id for image_id in np.concatenate([val["ids"], test["ids"]]))
    counts = np.bincount(train["labels"], minlength=7)
    assert (counts == counts.max()).all()  # balanced
    metrics = yaml.safe_load((project / "metrics" / "augment_balance.json").read_text())
    assert metrics["before"]["disgust"] == 4 and metrics["after"]["disgust"] == counts.max()
    prepared = yaml.safe_load((project / "metrics" / "preprocess.json").read_text())
    assert prepared["dropped_blank"] == 1 and prepared["dropped_duplicate_of_eval"] == 1
    assert (project / "reports" / "augment_balance" / "samples.png").stat().st_size > 1000


def test_paper_protocol_augments_the_pool_before_splitting(project):
    set_params(project, preprocess={"protocol": "paper"})
    for stage in ("preprocess", "augment_balance"):
        result = run_stage(project, stage)
        assert result.returncode == 0, result.stderr
    parts = {name: load(project / "data" / "balanced" / f"{name}.npz") for name in ("train", "val", "test")}
    sizes = {name: len(part["labels"]) for name, part in parts.items()}
    total = sum(sizes.values())
    assert abs(sizes["test"] - 0.2 * total) <= 7 and abs(sizes["val"] - 0.16 * total) <= 7
    # The leak the paper's order causes: augmented copies of one face on both sides of the split.
    origin = {name: {image_id.split("~")[0] for image_id in part["ids"]} for name, part in parts.items()}
    assert origin["train"] & origin["test"]
    assert any("~aug" in image_id for image_id in parts["test"]["ids"])


def test_augment_balance_is_repeatable(project):
    assert run_stage(project, "preprocess").returncode == 0
    assert run_stage(project, "augment_balance").returncode == 0
    first = load(project / "data" / "balanced" / "train.npz")
    assert run_stage(project, "augment_balance").returncode == 0
    second = load(project / "data" / "balanced" / "train.npz")
    assert np.array_equal(first["images"], second["images"]) and np.array_equal(first["ids"], second["ids"])


def test_missing_input_is_one_clear_line_and_writes_nothing(project):
    (project / "data" / "validated" / "audit.parquet").unlink()
    result = run_stage(project, "preprocess")
    assert result.returncode != 0
    assert "audit.parquet: not found; run `dvc repro validate` first" in result.stderr
    assert not (project / "data" / "prepared").exists()
