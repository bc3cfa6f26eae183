"""Setting this run's measured figures beside the paper's claims, its literature table and honest anchors.

Everything here reads files DVC tracks, numbers other stages wrote (metrics/*.json) and the
runs saved in docs/results (`dlfer results save`), and never recomputes a metric. Stored scores are fractions in [0, 1]; the paper prints percentages, so
its figures are divided by 100 before any difference is taken, and the report prints both
as percentages.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import yaml

from dlfer.evaluation import results
from dlfer.params import VARIANTS

# with_ef_fer1: EF-FER2 initialised from EF-FER1 (the paper's DLFER); without: random initialisation.
VARIANT_LABELS = {"with_ef_fer1": "DLFER with EF-FER1", "without_ef_fer1": "DLFER without EF-FER1"}
FINETUNE_KEYS = ("train_accuracy", "val_accuracy", "val_macro_f1")
EVALUATE_KEYS = ("test_accuracy", "f1_macro", "precision_macro", "recall_macro", "paper_eq1_accuracy",
                 "test_accuracy_ci95_low", "test_accuracy_ci95_high", "f1_macro_ci95_low", "f1_macro_ci95_high")
# Metrics of saved runs set side by side across protocols.
PROTOCOL_METRICS = ("test_accuracy", "f1_macro", "precision_macro", "recall_macro")
CONTEXT_FILES = ("validate", "preprocess", "augment_balance", "pretrain")


class CompareInputError(ValueError):
    """An input of the compare stage is missing or malformed; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class References:
    paper: dict
    claims: dict
    protocol: dict
    anchors: list
    literature: pd.DataFrame
    literature_note: str


def load_references(directory: str | Path) -> References:
    """references/paper.yaml and the literature table it names, checked for every key compare reads."""
    directory = Path(directory)
    path = directory / "paper.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
        claims = raw["claims"]
        numbers = [claims[key] for key in ("test_accuracy", "precision", "recall", "f1")]
        numbers += [claims["ablation"][variant][key] for variant in VARIANTS
                    for key in ("train_accuracy", "val_accuracy", "test_accuracy")]
        numbers += [anchor["accuracy"] for anchor in raw["anchors"]]
        texts = [raw["paper"][key] for key in ("title", "author", "venue", "doi")]
        texts += [raw["protocol"][key] for key in ("summary", "leak")]
        texts += [anchor[key] for anchor in raw["anchors"] for key in ("name", "split", "citation")]
        texts += [raw["literature"]["file"], raw["literature"]["note"]]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as error:
        raise CompareInputError(f"{path}: unreadable or missing key {error}; restore it from git") from None
    if not all(isinstance(number, (int, float)) for number in numbers) or not all(isinstance(text, str) for text in texts):
        raise CompareInputError(f"{path}: figures must be numbers and descriptions strings; restore it from git")

    literature_file = directory / raw["literature"]["file"]
    if not literature_file.is_file():
        raise CompareInputError(f"{literature_file}: not found; restore it from git")
    # Strings as printed ("79", not 79.0); blanks stay blank.
    literature = pd.read_csv(literature_file, dtype=str, keep_default_na=False)
    if list(literature.columns) != ["reference", "year", "architecture", "accuracy"]:
        raise CompareInputError(f"{literature_file}: columns must be reference,year,architecture,accuracy; "
                                f"got {','.join(literature.columns)}")
    return References(paper=raw["paper"], claims=claims, protocol=raw["protocol"], anchors=raw["anchors"],
                      literature=literature, literature_note=raw["literature"]["note"])


def _read_metrics_file(path: Path, required: tuple[str, ...], producer: str) -> dict:
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CompareInputError(f"{path}: unreadable ({error}); run `dvc repro {producer}`") from None
    missing = [key for key in required if key not in values]
    if missing:
        raise CompareInputError(f"{path}: missing key(s) {', '.join(missing)}; rerun `dvc repro {producer}`")
    return values


def read_stage_metrics(metrics_dir: str | Path) -> dict:
    """finetune and evaluate metrics per variant (required), plus validate/augment_balance/pretrain (optional)."""
    metrics_dir = Path(metrics_dir)
    stage_metrics = {"finetune": {}, "evaluate": {}, "context": {}}
    for variant in VARIANTS:
        stage_metrics["finetune"][variant] = _read_metrics_file(
            metrics_dir / f"finetune_{variant}.json", FINETUNE_KEYS, "finetune")
        stage_metrics["evaluate"][variant] = _read_metrics_file(
            metrics_dir / f"evaluate_{variant}.json", EVALUATE_KEYS, "evaluate")
    for name in CONTEXT_FILES:
        path = metrics_dir / f"{name}.json"
        # Context only: the report says plainly when one is absent instead of failing the comparison.
        stage_metrics["context"][name] = _read_metrics_file(path, (), name) if path.is_file() else None
    return stage_metrics


def summarise(stage_metrics: dict, references: References) -> dict:
    """The compare metrics (metrics/compare.json): this run's figures and their differences from the paper's."""
    summary = {}
    for variant in VARIANTS:
        evaluated = stage_metrics["evaluate"][variant]
        for key in ("test_accuracy", "f1_macro", "test_accuracy_ci95_low", "test_accuracy_ci95_high",
                    "f1_macro_ci95_low", "f1_macro_ci95_high"):
            summary[f"{key}_{variant}"] = float(evaluated[key])
        for key in FINETUNE_KEYS:
            summary[f"{key}_{variant}"] = float(stage_metrics["finetune"][variant][key])

    with_metrics = stage_metrics["evaluate"]["with_ef_fer1"]
    without_metrics = stage_metrics["evaluate"]["without_ef_fer1"]
    summary["ablation_delta_accuracy"] = with_metrics["test_accuracy"] - without_metrics["test_accuracy"]
    summary["ablation_delta_f1_macro"] = with_metrics["f1_macro"] - without_metrics["f1_macro"]
    claims = references.claims
    summary["paper_ablation_delta_accuracy"] = (claims["ablation"]["with_ef_fer1"]["test_accuracy"]
                                                - claims["ablation"]["without_ef_fer1"]["test_accuracy"]) / 100
    # Positive: the paper claims more than this run measured.
    summary["paper_claim_gap"] = claims["test_accuracy"] / 100 - with_metrics["test_accuracy"]
    summary["paper_claim_gap_f1"] = claims["f1"] / 100 - with_metrics["f1_macro"]
    summary["paper_claim_inside_ci95"] = bool(
        with_metrics["test_accuracy_ci95_low"] <= claims["test_accuracy"] / 100 <= with_metrics["test_accuracy_ci95_high"])
    return summary


def _percent(fraction) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.2f}"


def _points(fraction) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:+.2f}"


def _flatten_scalars(values: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key, value in values.items():
        if isinstance(value, dict):
            rows.extend(_flatten_scalars(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            rows.append((f"{prefix}{key}", value))
    return rows


def _scalar_table(values: dict) -> list[str]:
    lines = ["| key | value |", "| --- | --- |"]
    lines += [f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
              for key, value in _flatten_scalars(values)]
    return lines


def _epochs_cell(finetune_metrics: dict) -> str:
    """Epochs trained, of those planned, with "truncated" when the time budget stopped the run."""
    run, planned = finetune_metrics.get("epochs_run"), finetune_metrics.get("epochs_planned")
    cell = f"{run} of {planned}" if planned is not None else f"{run}"
    return cell + (" (truncated)" if finetune_metrics.get("truncated") else "")


def run_setup_lines(setup: dict) -> list[str]:
    """What EF-FER1 and EF-FER2 were in this run."""
    sources = {"imagenet": "ImageNet weights", "scratch": "trained here on the source-domain images (Imagenette)",
               "none": "nothing (random weights for both variants)"}
    return [f"EF-FER1: {setup['pretrain_backbone']}, {sources.get(setup['pretrain_source'], setup['pretrain_source'])}"
            f" (`pretrain.source: {setup['pretrain_source']}`). EF-FER2: {setup['finetune_backbone']} fine-tuned at "
            f"{setup['image_size']}x{setup['image_size']} px; \"without EF-FER1\" is the same network from random "
            "weights.", ""]


def render_report(*, protocol: str, stage_metrics: dict, references: References, saved_runs: dict,
                  saved_dir: str, summary: dict, chart_name: str, metrics_dir: str,
                  run_setup: dict | None = None) -> str:
    """reports/compare.md: headline, the paper's equations, the ablation, both protocols, the audit, the anchors."""
    lines = [
        "# DLFER reproduction: this run beside the paper",
        "",
        f"Paper: {references.paper['author']}, \"{references.paper['title']}\", {references.paper['venue']}, "
        f"doi:{references.paper['doi']}.",
        f"This run's protocol: **{protocol}** (`preprocess.protocol`). All figures are percentages; "
        "the paper's are as printed, this run's come from `metrics/*.json` and are never recomputed here.",
        "",
        *(["**This run used the paper protocol, whose test split holds augmented copies of training images: "
           "its test scores measure leakage as much as generalisation. Use it for the audit, not as a result.**",
           ""] if protocol == "paper" else []),
        *(run_setup_lines(run_setup) if run_setup else []),
        f"![paper claim vs this run vs anchors]({chart_name})",
        "",
        *_headline_section(stage_metrics, references, summary),
        *_ablation_section(stage_metrics, references, summary),
        *_protocol_section(saved_runs, saved_dir),
        "",
        *_audit_section(stage_metrics, references, metrics_dir),
        *_anchors_section(references),
    ]
    return "\n".join(lines)


def _headline_section(stage_metrics: dict, references: References, summary: dict) -> list[str]:
    """Test accuracy and F1 beside Table 4, and every averaging of precision / recall / F1 beside the paper's eqs."""
    claims = references.claims
    with_metrics = stage_metrics["evaluate"]["with_ef_fer1"]
    lines = [
        "## Headline: test accuracy and F1",
        "",
        "| | paper (Table 4) | this run, with EF-FER1 | 95% bootstrap CI | paper minus this run |",
        "| --- | --- | --- | --- | --- |",
        f"| test accuracy | {claims['test_accuracy']:.2f} | {_percent(with_metrics['test_accuracy'])} | "
        f"{_percent(with_metrics['test_accuracy_ci95_low'])} to {_percent(with_metrics['test_accuracy_ci95_high'])} | "
        f"{_points(summary['paper_claim_gap'])} |",
        f"| F1 (this run: macro) | {claims['f1']:.2f} | {_percent(with_metrics['f1_macro'])} | "
        f"{_percent(with_metrics['f1_macro_ci95_low'])} to {_percent(with_metrics['f1_macro_ci95_high'])} | "
        f"{_points(summary['paper_claim_gap_f1'])} |",
        "",
        f"The paper's test accuracy lies {'inside' if summary['paper_claim_inside_ci95'] else 'outside'} "
        "this run's 95% interval.",
        "",
        "### Precision, recall and F1 under each averaging, and the paper's equations",
        "",
        "| | precision | recall | F1 |",
        "| --- | --- | --- | --- |",
        f"| paper, Table 4 | {claims['precision']:.2f} | {claims['recall']:.2f} | {claims['f1']:.2f} |",
    ]
    for average in ("macro", "weighted", "micro"):
        lines.append(f"| this run, {average} | {_percent(with_metrics.get(f'precision_{average}'))} | "
                     f"{_percent(with_metrics.get(f'recall_{average}'))} | {_percent(with_metrics.get(f'f1_{average}'))} |")
    lines.append(f"| this run, paper eqs. 2-4 | {_percent(with_metrics.get('paper_eq2_precision'))} | "
                 f"{_percent(with_metrics.get('paper_eq3_recall'))} | {_percent(with_metrics.get('paper_eq4_f1'))} |")
    lines += [
        "",
        f"Eq. 1 of the paper, read literally (mean one-vs-rest accuracy), gives "
        f"{_percent(with_metrics['paper_eq1_accuracy'])} for this run against a plain accuracy of "
        f"{_percent(with_metrics['test_accuracy'])}: it equals 1 - 2(1 - accuracy)/7 and flatters any classifier. "
        "Eqs. 2-3 are micro averages, which equal the accuracy for single-label data, so the paper's "
        f"precision {claims['precision']:.2f} and recall {claims['recall']:.2f}, which differ from each other, "
        "cannot come from them as written. Its F1 does follow eq. 4 from its own precision and recall "
        f"({2 * claims['precision'] * claims['recall'] / (claims['precision'] + claims['recall']):.2f}).",
        "",
    ]
    return lines


def _ablation_section(stage_metrics: dict, references: References, summary: dict) -> list[str]:
    claims = references.claims
    evaluated, finetuned = stage_metrics["evaluate"], stage_metrics["finetune"]
    lines = [
        "## Ablation: with and without EF-FER1",
        "",
        "| model | paper train | paper val | paper test | this run train | this run val | this run test (95% CI) "
        "| epochs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for variant in VARIANTS:
        paper_row = claims["ablation"][variant]
        lines.append(
            f"| {VARIANT_LABELS[variant]} | {paper_row['train_accuracy']:.2f} | {paper_row['val_accuracy']:.2f} | "
            f"{paper_row['test_accuracy']:.2f} | {_percent(finetuned[variant]['train_accuracy'])} | "
            f"{_percent(finetuned[variant]['val_accuracy'])} | {_percent(evaluated[variant]['test_accuracy'])} "
            f"({_percent(evaluated[variant]['test_accuracy_ci95_low'])} to "
            f"{_percent(evaluated[variant]['test_accuracy_ci95_high'])}) | {_epochs_cell(finetuned[variant])} |")
    truncated = [VARIANT_LABELS[variant] for variant in VARIANTS if finetuned[variant].get("truncated")]
    if truncated:
        lines += ["", f"**Truncated by the time budget** (`finetune.max_seconds`): {', '.join(truncated)} stopped "
                      "before its planned epochs, so its figures depend on the machine's speed and the ablation may "
                      "compare unequal training. Raise or clear the budget to compare like with like."]
    lines += [
        "",
        f"Test-accuracy gain from EF-FER1: paper {_points(summary['paper_ablation_delta_accuracy'])} points, "
        f"this run {_points(summary['ablation_delta_accuracy'])} points "
        f"(macro-F1 {_points(summary['ablation_delta_f1_macro'])}). Train and validation accuracy come from "
        "`metrics/finetune_<variant>.json` (the checkpoint finetune kept).",
        "",
    ]
    return lines


def _audit_section(stage_metrics: dict, references: References, metrics_dir: str) -> list[str]:
    lines = [
        "## Why the paper protocol leaks: the validation audit",
        "",
        f"The paper's protocol: {references.protocol['summary']}",
        "",
        references.protocol["leak"],
        "",
    ]
    context = stage_metrics["context"]
    if context["validate"] is not None:
        lines += [_audit_headline(context["validate"]), ""]
    for name, title in (("validate", "Validation audit counts"), ("preprocess", "Splits and cleaning"),
                        ("augment_balance", "Augmentation and balancing"), ("pretrain", "EF-FER1 pretraining")):
        lines += [f"### {title} (`{metrics_dir}/{name}.json`)", ""]
        lines += _scalar_table(context[name]) if context[name] is not None else [
            f"Not found: `{metrics_dir}/{name}.json`; run `dvc repro {name}` to produce it."]
        lines.append("")
    return lines


def _anchors_section(references: References) -> list[str]:
    lines = [
        "## The paper's literature table and honest anchors",
        "",
        "Anchors measured on the official FER2013 test split (PrivateTest) or estimated by the dataset's curators:",
        "",
        "| anchor | accuracy | split | citation |",
        "| --- | --- | --- | --- |",
    ]
    for anchor in references.anchors:
        uncertainty = f" +- {anchor['uncertainty']:g}" if anchor.get("uncertainty") else ""
        lines.append(f"| {anchor['name']} | {anchor['accuracy']:.2f}{uncertainty} | {anchor['split']} | "
                     f"{' '.join(anchor['citation'].split())} {anchor.get('url', '')} |")
    lines += [
        "",
        "The paper's comparison table, as printed (accuracy %):",
        "",
        "| reference | year | architecture | accuracy |",
        "| --- | --- | --- | --- |",
    ]
    for row in references.literature.itertuples(index=False):
        lines.append(f"| {row.reference} | {row.year} | {row.architecture} | {row.accuracy} |")
    lines += ["", references.literature_note, ""]
    return lines


# The validate stage's counts that bear on leakage, in the order the headline states them.
AUDIT_HEADLINE = (
    ("cross_usage_duplicate_images", "images appear, exactly or nearly, in more than one official usage"),
    ("training_duplicates_of_eval", "Training images duplicate a PublicTest or PrivateTest image"),
    ("privatetest_with_training_duplicate", "PrivateTest images have a duplicate in Training"),
    ("exact_duplicate_images", "images sit in exact-duplicate groups"),
    ("label_conflict_images", "images have an exact duplicate carrying another label"),
    ("blank_images", "images are blank"),
)


def _audit_headline(validate_metrics: dict) -> str:
    """One sentence of the audit's counts; a count the validate stage did not write is left out."""
    clauses = [f"{validate_metrics[key]} {text}" for key, text in AUDIT_HEADLINE if key in validate_metrics]
    if not clauses:
        return "The validation audit wrote none of the duplicate counts this report looks for; see the table below."
    total = f" of {validate_metrics['rows']}" if "rows" in validate_metrics else ""
    return (f"Evidence from the validation audit{total} images: " + "; ".join(clauses) + ". Even the official "
            "split shares images across usages; pooling, augmenting and then splitting at random also puts "
            "augmented copies of one original on both sides of the split.")


def _protocol_section(saved_runs: dict, saved_dir: str) -> list[str]:
    """Official and paper protocol side by side, from saved runs whose params differ in the protocol alone."""
    lines = ["## Official vs paper protocol, as measured", ""]
    pairs = results.protocol_pairs(saved_runs)
    if not pairs:
        return lines + [
            f"No two runs saved in `{saved_dir}/` differ in `preprocess.protocol` alone, so the effect of augmenting "
            "before splitting has not been measured for any profile. Run a profile under both protocols and save each:",
            "",
            "    dvc exp run -n NAME $(dlfer profile PROFILE) && dlfer results save NAME",
            "    dvc exp run -n NAME-paper $(dlfer profile PROFILE) -S preprocess.protocol=paper "
            "&& dlfer results save NAME-paper",
            "",
            "and rerun compare; this section then shows both protocols side by side.", ""]
    lines += [f"Runs saved in `{saved_dir}/` (`dlfer results save`) whose params differ in the protocol alone: "
              "the same model trained for the same epochs, so the difference is what the protocol does.", "",
              "| paper run / official run | model | metric | official | paper | paper minus official |",
              "| --- | --- | --- | --- | --- | --- |"]
    for paper_name, official_name in pairs:
        for variant in VARIANTS:
            official = saved_runs[official_name]["metrics"].get(f"evaluate_{variant}")
            paper = saved_runs[paper_name]["metrics"].get(f"evaluate_{variant}")
            if not (official and paper):
                continue
            for metric in PROTOCOL_METRICS:
                official_value, paper_value = official.get(metric), paper.get(metric)
                difference = (paper_value - official_value
                              if official_value is not None and paper_value is not None else None)
                lines.append(f"| `{paper_name}` / `{official_name}` | {VARIANT_LABELS[variant]} | {metric} | "
                             f"{_percent(official_value)} | {_percent(paper_value)} | {_points(difference)} |")
        leaked = saved_runs[paper_name]["metrics"].get("evaluate_with_ef_fer1", {})
        if "leak_test_with_train_sibling" in leaked:
            lines += ["", f"In `{paper_name}`, {leaked['leak_test_with_train_sibling']} of {leaked['n_test']} test "
                          f"images have a sibling in train ({leaked['leak_test_with_augmented_sibling']} an augmented "
                          f"copy, {leaked['leak_test_with_duplicate_in_train']} a duplicate); accuracy on them "
                          f"{_percent(leaked.get('test_accuracy_with_train_sibling'))}, on the others "
                          f"{_percent(leaked.get('test_accuracy_without_train_sibling'))}.", ""]
    return lines
