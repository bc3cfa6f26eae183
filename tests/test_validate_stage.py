"""The validate stage run as DVC runs it: a subprocess in a scratch directory, on tiny canonical tables."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from test_validation import blocky_face, canonical_table

from conftest import PROJECT, stage_environment

STAGE = PROJECT / "stages" / "validate.py"
ARGUMENTS = ["--params", "params.yaml", "--raw", "data/raw/fer2013.parquet", "--audit", "data/validated/audit.parquet",
             "--reports", "reports/validate", "--metrics", "metrics/validate.json"]
AUDIT_COLUMNS = {"image_id", "blank", "exact_group", "near_group", "cross_usage_duplicate", "label_conflict",
                 "duplicate_of_eval", "phash", "pixel_std"}


@pytest.fixture
def project(tmp_path):
    """A scratch directory with params.yaml (official counts not required: the tables are tiny)."""
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["validate"]["require_official_counts"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "data" / "raw").mkdir(parents=True)
    return tmp_path


def good_table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    faces = [blocky_face(rng) for _ in range(6)]
    blank = np.zeros((48, 48), np.uint8)
    # A test image copied into Training with another label, and a blank image.
    images = faces + [faces[4], blank]
    usages = ["Training", "Training", "Training", "Training", "PublicTest", "PrivateTest", "Training", "Training"]
    labels = [3, 0, 1, 2, 4, 5, 6, 6]
    return canonical_table(images, usages, labels)


def write_table(project, table: pd.DataFrame) -> None:
    table.to_parquet(project / "data" / "raw" / "fer2013.parquet", index=False)


def run_stage(project) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(STAGE), *ARGUMENTS], cwd=project, env=stage_environment(project),
                          capture_output=True, text=True, timeout=300)


def validate_runs(project) -> list:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dlfer")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'validate'",
                              order_by=["attributes.start_time ASC"])


def test_good_then_bad_table(project):
    table = good_table()
    write_table(project, table)
    good = run_stage(project)
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith("validate: passed, 8 images")

    audit = pd.read_parquet(project / "data" / "validated" / "audit.parquet")
    assert AUDIT_COLUMNS <= set(audit.columns)
    assert audit["image_id"].tolist() == table["image_id"].tolist()
    assert audit["blank"].sum() == 1
    assert audit["cross_usage_duplicate"].sum() == 2 and audit["label_conflict"].sum() == 2
    assert audit["duplicate_of_eval"].sum() == 1
    metrics = json.loads((project / "metrics" / "validate.json").read_text())
    assert metrics["passed"] is True and metrics["critical_failures"] == 0
    assert metrics["cross_usage_exact_images"] == 2 and metrics["publictest_with_training_exact_duplicate"] == 1
    reports = project / "reports" / "validate"
    assert {"report.md", "examples.png", "gx_validation_result.json", "gx_expectation_suite.json"} <= {
        path.name for path in reports.iterdir()}
    assert "# FER2013 validation: passed" in (reports / "report.md").read_text()

    (run,) = validate_runs(project)
    assert run.info.status == "FINISHED"
    assert run.data.params["blank_max_std"] == "2.0"
    assert run.data.metrics["passed"] == 1.0 and run.data.metrics["blank_images"] == 1.0
    artifacts = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}").list_artifacts(
        run.info.run_id, "reports")
    assert "reports/report.md" in {artifact.path for artifact in artifacts}

    good_audit = (project / "data" / "validated" / "audit.parquet").read_bytes()
    bad = table.copy()
    bad.loc[3, "label"] = 9
    image = np.zeros((47, 48), np.uint8)
    bad.loc[5, ["height", "pixels"]] = [47, image.tobytes()]
    write_table(project, bad)
    failed = run_stage(project)

    assert failed.returncode == 1, failed.stderr
    last_line = failed.stderr.strip().splitlines()[-1]
    assert last_line.startswith("validate: ") and " critical failure(s): " in last_line
    assert last_line.endswith("see reports/validate/report.md")
    report = (reports / "report.md").read_text()
    assert "# FER2013 validation: FAILED" in report
    assert "label is one of the 7 classes 0..6: 1 of 8 row(s) fail, e.g. 9" in report
    assert "height is 48: 1 of 8 row(s) fail, e.g. 47" in report
    assert "sha256 is the digest of the pixel bytes" in report  # the pixels changed, the digest did not
    assert '"success": false' in (reports / "gx_validation_result.json").read_text()
    # The audit of the good run stays whole; the metrics now describe the failed run, whole too.
    assert (project / "data" / "validated" / "audit.parquet").read_bytes() == good_audit
    metrics = json.loads((project / "metrics" / "validate.json").read_text())
    assert metrics["passed"] is False and metrics["audited"] is False
    assert metrics["critical_failures"] == int(last_line.split(": ")[1].split()[0]) >= 3
    leftovers = [path for path in project.rglob("*.partial")]
    assert leftovers == []

    runs = validate_runs(project)
    assert len(runs) == 2 and runs[1].data.metrics["passed"] == 0.0
    assert runs[1].data.metrics["critical_failures"] == metrics["critical_failures"]


@pytest.mark.parametrize("content", [None, b"this is not parquet"], ids=["missing", "garbage"])
def test_unreadable_input_exits_2_naming_the_file(project, content):
    if content is not None:
        (project / "data" / "raw" / "fer2013.parquet").write_bytes(content)
    result = run_stage(project)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("validate: data/raw/fer2013.parquet: ")
    assert not (project / "metrics").exists() and not (project / "reports").exists()
    assert validate_runs(project) == []
