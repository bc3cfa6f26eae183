"""The model card from a pipeline's files: figures with intervals, per-class results, ablation, gaps as n/a."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import PROJECT, stage_environment
from dlfer.evaluation import metrics, model_card
from dlfer.fer2013 import EMOTIONS


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture
def pipeline(tmp_path):
    """A finished run's files: evaluate metrics and per-class table from dlfer.evaluation.metrics on toy predictions."""
    shutil.copy(PROJECT / "params.yaml", tmp_path / "params.yaml")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 700)
    evaluated = {}
    for variant, accuracy in (("with_ef_fer1", 0.64), ("without_ef_fer1", 0.55)):
        predicted = np.where(rng.random(700) < accuracy, labels, rng.integers(0, 7, 700))
        evaluated[variant] = metrics.evaluation_metrics(labels, predicted, EMOTIONS, 200, rng)
        evaluated[variant].update(test_accuracy_one_view=accuracy - 0.0123, f1_macro_one_view=accuracy - 0.0456)
        write_json(tmp_path / "metrics" / f"evaluate_{variant}.json", evaluated[variant])
        write_json(tmp_path / "metrics" / f"finetune_{variant}.json",
                   {"train_accuracy": accuracy + 0.2, "val_accuracy": accuracy - 0.01, "val_macro_f1": accuracy - 0.05,
                    "best_epoch": 3, "epochs_run": 3, "train_images": 46554})
        write_json(tmp_path / "models" / "finetune" / variant / "provenance.json",
                   {"variant": variant, "initialisation": "EF-FER1 (scratch)", "git_commit": "abc1234",
                    "stopped_by": "epochs", "runtime": {"gpus": 0}, "train_sha256": "f" * 64,
                    "training": {"seconds": 120.5, "images_per_second": 386.3, "resumed_at_epoch": 0},
                    "params": {"finetune": {"backbone": "efficientnet_b3", "learning_rate": 0.0003}}})
        if variant == "with_ef_fer1":
            table = metrics.per_class_table(labels, predicted, EMOTIONS)
            (tmp_path / "reports" / "evaluate" / variant).mkdir(parents=True)
            table.to_csv(tmp_path / "reports" / "evaluate" / variant / "per_class.csv", index=False)
    write_json(tmp_path / "models" / "finetune" / "with_ef_fer1" / "mlflow_run.json", {"run_id": "run123"})
    write_json(tmp_path / "metrics" / "validate.json", {"blank_images": 13, "label_conflict_images": 117,
                                                        "cross_usage_duplicate_images": 1194})
    write_json(tmp_path / "metrics" / "preprocess.json", {"protocol": "official", "n_train": 27961, "n_val": 3589,
                                                          "n_test": 3589, "dropped_blank": 12})
    write_json(tmp_path / "metrics" / "augment_balance.json",
               {"before": {"disgust": 394, "happy": 7168}, "after": {"disgust": 3546, "happy": 7168},
                "augmented_images": 18593})
    return tmp_path, evaluated


def render(root):
    return model_card.render(model_card.collect(root / "params.yaml", root / "metrics", root / "models",
                                                root / "reports", PROJECT / "references" / "paper.yaml"))


def test_card_reports_each_figure_from_the_files(pipeline):
    root, evaluated = pipeline
    card = render(root)
    best = evaluated["with_ef_fer1"]
    accuracy = (f"{100 * best['test_accuracy']:.2f}% (95% CI {100 * best['test_accuracy_ci95_low']:.2f}-"
                f"{100 * best['test_accuracy_ci95_high']:.2f}%)")
    assert f"| test accuracy | {accuracy} |" in card
    assert f"{100 * best['f1_macro_ci95_low']:.2f}-{100 * best['f1_macro_ci95_high']:.2f}%" in card
    assert f"{100 * best['paper_eq1_accuracy']:.2f}%" in card  # shown, and explained as not the accuracy
    assert "what predict, serve and exports answer with --no-mirror) | 62.77% / 59.44% |" in card

    per_class = card.split("## Per-class results")[1].split("##")[0]
    assert all(f"| {emotion} |" in per_class for emotion in EMOTIONS)
    assert f"{100 * best['f1_disgust']:.2f}%" in per_class

    ablation = card.split("## Ablation")[1].split("##")[0]
    difference = 100 * (best["test_accuracy"] - evaluated["without_ef_fer1"]["test_accuracy"])
    assert f"{difference:+.2f} percentage points" in ablation
    assert "EF-FER2 from random initialisation" in ablation

    for required in ("## Intended use", "## Unsuitable uses", "Surveillance", "hiring", "inner state",
                     "Label noise", "Class imbalance", "demographic", "## How to reproduce", "git checkout abc1234",
                     "run123", "| 3546 |", "train 27961, validation 3589, test 3589",
                     # the params the model was trained with (provenance), not today's params.yaml
                     "| learning_rate | 0.0003 |", "backbone `efficientnet_b3`",
                     # how long training took: provenance, since metrics files hold only reproducible figures
                     "120.5 s of training on 46554 images"):
        assert required in card, required
    assert "n/a" not in card.split("## Metrics")[1].split("## Ablation")[0]


def test_card_from_an_empty_run_marks_every_gap_and_never_fails(tmp_path):
    card = render(tmp_path)  # no params, no metrics, no models
    assert card.startswith("# Model card")
    assert "| test accuracy | n/a |" in card
    assert "per_class.csv` is missing" in card
    assert "## Known limitations" in card and "## How to reproduce" in card


def test_card_tolerates_missing_keys_and_odd_values(pipeline):
    root, _ = pipeline
    write_json(root / "metrics" / "evaluate_with_ef_fer1.json", {"test_accuracy": 0.5, "f1_macro": "broken"})
    (root / "metrics" / "finetune_without_ef_fer1.json").write_text("{ not json")
    card = render(root)
    assert "| test accuracy | 50.00% |" in card  # no interval printed without its bounds
    assert "| test macro-F1 | n/a |" in card


def test_stage_writes_the_card_and_logs_it(pipeline):
    root, _ = pipeline
    finished = subprocess.run(
        [sys.executable, str(PROJECT / "stages" / "model_card.py"), "--params", "params.yaml", "--metrics-dir",
         "metrics", "--models", "models", "--reports", "reports", "--references",
         str(PROJECT / "references" / "paper.yaml"), "--out", "reports/model_card.md"],
        cwd=root, env=stage_environment(root), capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    card = (root / "reports" / "model_card.md").read_text()
    assert card == render(root).replace(str(root) + "/", "")
    assert "The paper claims +15.88 points" in card  # references/paper.yaml's figure, not a typed one
    assert "model_card: wrote reports/model_card.md" in finished.stdout
    assert not list((root / "reports").glob("*.partial"))


def test_card_quotes_the_papers_claim_and_the_human_anchor_from_references(pipeline, tmp_path):
    root, _ = pipeline
    references = yaml.safe_load((Path(__file__).resolve().parents[1] / "references" / "paper.yaml").read_text())
    references["claims"]["ablation_delta_test_accuracy"] = 12.34
    human = next(anchor for anchor in references["anchors"] if "human" in anchor["kind"])
    human.update(accuracy=61.0, uncertainty=7.0)
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump(references))
    card = model_card.render(model_card.collect(root / "params.yaml", root / "metrics", root / "models",
                                                root / "reports", tmp_path / "paper.yaml"))
    assert "The paper claims +12.34 points" in card
    assert "about 61 +/- 7%" in card
