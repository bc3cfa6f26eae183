"""The few lines a person reads when the pipeline ends: `dlfer summary`, the last step of scripts/run.sh.

Everything comes from the metrics files the stages wrote and from references/paper.yaml; nothing
is recomputed, so the summary cannot drift from the run it describes.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from dlfer.params import VARIANTS

LABELS = {"with_ef_fer1": "EF-FER2 from EF-FER1", "without_ef_fer1": "EF-FER2 from random init"}


class SummaryError(ValueError):
    """A metrics file the summary needs is missing; the message names it and the fix."""


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise SummaryError(f"{path}: missing or unreadable; run `dvc repro` first") from None


def _percent_with_interval(metrics: dict, key: str) -> str:
    low, high = metrics.get(f"{key}_ci95_low"), metrics.get(f"{key}_ci95_high")
    interval = f" ({100 * low:.1f}-{100 * high:.1f})" if low is not None and high is not None else ""
    return f"{100 * metrics[key]:.2f}{interval}"


def _epochs(finetune: dict) -> str:
    planned = finetune.get("epochs_planned")
    cell = f"{finetune.get('epochs_run')}" + (f" of {planned}" if planned is not None else "")
    return cell + (" TRUNCATED" if finetune.get("truncated") else "")


def render_summary(metrics_dir: Path, references: Path, params: Path, reports_dir: Path = Path("reports")) -> str:
    evaluate = {variant: _read(metrics_dir / f"evaluate_{variant}.json") for variant in VARIANTS}
    finetune = {variant: _read(metrics_dir / f"finetune_{variant}.json") for variant in VARIANTS}
    claims = yaml.safe_load(references.read_text())["claims"]
    settings = yaml.safe_load(params.read_text()) if params.is_file() else {}
    protocol = settings.get("preprocess", {}).get("protocol", "?")
    pretrain, tuned = settings.get("pretrain", {}), settings.get("finetune", {})
    test_split = "official PrivateTest" if protocol == "official" else "the paper's random 20% (leaks, see the report)"
    lines = [f"dlfer: DLFER on FER2013, protocol {protocol}: EF-FER1 = {pretrain.get('backbone')} "
             f"({pretrain.get('source')}), EF-FER2 fine-tuned at {tuned.get('image_size')} px, "
             f"{tuned.get('epochs')} epoch(s); test split: {test_split}", "",
             f"{'':26}{'test accuracy % (95% CI)':>26}{'macro-F1 % (95% CI)':>24}{'val acc %':>11}  epochs"]
    for variant in VARIANTS:
        lines.append(f"{LABELS[variant]:26}{_percent_with_interval(evaluate[variant], 'test_accuracy'):>26}"
                     f"{_percent_with_interval(evaluate[variant], 'f1_macro'):>24}"
                     f"{100 * finetune[variant]['val_accuracy']:>11.2f}  {_epochs(finetune[variant])}")
    accuracy_delta = 100 * (evaluate["with_ef_fer1"]["test_accuracy"] - evaluate["without_ef_fer1"]["test_accuracy"])
    f1_delta = 100 * (evaluate["with_ef_fer1"]["f1_macro"] - evaluate["without_ef_fer1"]["f1_macro"])
    ablation = claims["ablation"]
    lines += ["", f"EF-FER1 adds {accuracy_delta:+.2f} points of test accuracy and {f1_delta:+.2f} of macro-F1 "
                  f"(paper: {ablation['with_ef_fer1']['test_accuracy']:.2f} with, "
                  f"{ablation['without_ef_fer1']['test_accuracy']:.2f} without, "
                  f"{claims['ablation_delta_test_accuracy']:+.2f}; B3 at 224 px, its own leaky split)."]
    if any(finetune[variant].get("truncated") for variant in VARIANTS):
        lines.append("TRUNCATED: the time budget (finetune.max_seconds) stopped training early; these figures "
                     "depend on this machine's speed.")
    lines += ["", f"Report: {reports_dir / 'compare.md'}   Model card: {reports_dir / 'model_card.md'}",
              "MLflow UI: .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000, "
              "then open http://127.0.0.1:5000"]
    return "\n".join(lines)
