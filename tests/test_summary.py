"""`dlfer summary`: the headline a person reads when scripts/run.sh ends, from the metrics files alone."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import PROJECT


def write_run(directory, truncated: bool = False) -> None:
    metrics = directory / "metrics"
    metrics.mkdir()
    for variant, accuracy, f1 in (("with_ef_fer1", 0.6123, 0.5871), ("without_ef_fer1", 0.4402, 0.3954)):
        (metrics / f"evaluate_{variant}.json").write_text(json.dumps({
            "test_accuracy": accuracy, "test_accuracy_ci95_low": accuracy - 0.016,
            "test_accuracy_ci95_high": accuracy + 0.015, "f1_macro": f1, "f1_macro_ci95_low": f1 - 0.02,
            "f1_macro_ci95_high": f1 + 0.018}))
        (metrics / f"finetune_{variant}.json").write_text(json.dumps({
            "val_accuracy": accuracy - 0.01, "epochs_run": 1, "epochs_planned": 2,
            "truncated": truncated and variant == "without_ef_fer1"}))


def summary(directory) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlfer.cli", "summary", "--metrics-dir", str(directory / "metrics"),
                           "--params", str(PROJECT / "params.yaml"),
                           "--references", str(PROJECT / "references" / "paper.yaml")],
                          capture_output=True, text=True, timeout=120)


def test_summary_gives_both_variants_with_intervals_the_ablation_and_the_paper(tmp_path):
    write_run(tmp_path)
    result = summary(tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    with_row = next(line for line in lines if line.startswith("EF-FER2 from EF-FER1"))
    assert "61.23 (59.6-62.7)" in with_row and "58.71 (56.7-60.5)" in with_row and "1 of 2" in with_row
    without_row = next(line for line in lines if line.startswith("EF-FER2 from random init"))
    assert "44.02 (42.4-45.5)" in without_row and "TRUNCATED" not in result.stdout
    assert "EF-FER1 adds +17.21 points of test accuracy and +19.17 of macro-F1" in result.stdout
    assert "82.09 with, 66.21 without, +15.88" in result.stdout
    assert "reports/compare.md" in result.stdout and "reports/model_card.md" in result.stdout
    assert "mlflow ui" in result.stdout and len(max(lines, key=len)) <= 180


def test_summary_flags_a_truncated_run_and_names_a_missing_file(tmp_path):
    write_run(tmp_path, truncated=True)
    assert "TRUNCATED" in summary(tmp_path).stdout
    (tmp_path / "metrics" / "evaluate_with_ef_fer1.json").unlink()
    result = summary(tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"summary: {tmp_path / 'metrics' / 'evaluate_with_ef_fer1.json'}: missing or "
                                     "unreadable; run `dvc repro` first")
