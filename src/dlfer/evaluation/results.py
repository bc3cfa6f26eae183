"""Committed results: `dlfer results save NAME` keeps a finished run, `dlfer results report` compares them.

A saved run is docs/results/<name>/ with
- metrics/*.json     the run's DVC metrics files, unchanged;
- params.diff.yaml   the dotted params that differ from the baseline params.yaml (git HEAD's);
- training.json      per variant: training seconds, images/s, epochs, resumed, and the processor;
                     volatile facts, kept out of the metrics;
- model_card.md      the run's model card, when it has one.
docs/results/README.md is written from those files alone, so no figure in it can drift from the
run that produced it: both variants with intervals, what EF-FER1 adds, the paper and official
protocols side by side with the leak measured on each, the paper's claims and the peers in
references/paper.yaml beside them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import yaml

from dlfer.files import atomic_directory, atomic_path, read_json, write_json
from dlfer.machine import processor_name
from dlfer.params import VARIANTS
from dlfer.tracking import flatten

LABELS = {"with_ef_fer1": "EF-FER2 from EF-FER1", "without_ef_fer1": "EF-FER2 from random init"}
MISSING = "n/a"


class ResultsError(ValueError):
    """A run to save or a saved run is incomplete; the message names the file and the fix."""


def params_diff(current: dict, baseline: dict) -> dict:
    """Dotted keys whose value in current differs from baseline (keys only in current included)."""
    now, before = flatten(current), flatten(baseline)
    return {key: value for key, value in sorted(now.items()) if before.get(key, object()) != value}


def _baseline_params(workspace: Path) -> dict:
    shown = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=workspace, capture_output=True, text=True)
    return yaml.safe_load(shown.stdout) or {} if shown.returncode == 0 else {}


def training_facts(workspace: Path, variants: tuple[str, ...] = VARIANTS) -> dict:
    facts = {"processor": processor_name(), "cpus": len(os.sched_getaffinity(0))}
    for variant in variants:
        provenance = workspace / "models" / "finetune" / variant / "provenance.json"
        if provenance.is_file():
            recorded = json.loads(provenance.read_text())
            facts[variant] = {**recorded.get("training", {}), "runtime": recorded.get("runtime", {})}
    return facts


def _belongs_to_run(path: Path, variants: tuple[str, ...]) -> bool:
    """Whether a metrics file comes from the run's stages: a variant left out (a run of one variant's
    stages) leaves its files, and compare's, from an earlier run in the workspace."""
    left_out = [variant for variant in VARIANTS if variant not in variants]
    if left_out and path.stem == "compare":
        return False
    return not any(path.stem.endswith(f"_{variant}") for variant in left_out)


def save(name: str, workspace: Path, out_root: Path, variants: tuple[str, ...] = VARIANTS) -> Path:
    """Copy a finished run's metrics, params diff and training facts into out_root/name (replacing it whole).

    variants: the ablation variants the run trained (a run of `evaluate@with_ef_fer1` alone trains one).
    """
    unknown = set(variants) - set(VARIANTS)
    if unknown or not variants:
        raise ResultsError(f"variants {sorted(unknown) or '(none)'}: choose from {', '.join(VARIANTS)}")
    metrics_dir = workspace / "metrics"
    evaluated = metrics_dir / "evaluate_with_ef_fer1.json"
    if not evaluated.is_file():
        raise ResultsError(f"{evaluated}: not found; finish the run (`dvc repro` or `dvc exp run`) before saving it")
    params = yaml.safe_load((workspace / "params.yaml").read_text()) or {}
    with atomic_directory(out_root / name) as temporary:
        (temporary / "metrics").mkdir()
        for path in sorted(metrics_dir.glob("*.json")):
            if _belongs_to_run(path, variants):
                shutil.copyfile(path, temporary / "metrics" / path.name)
        (temporary / "params.diff.yaml").write_text(
            "# params that differ from the baseline params.yaml (git HEAD) in this run\n"
            + yaml.safe_dump(params_diff(params, _baseline_params(workspace)), sort_keys=True))
        write_json(temporary / "training.json", training_facts(workspace, variants))
        card = workspace / "reports" / "model_card.md"
        if card.is_file() and variants == VARIANTS:  # the card describes both variants
            shutil.copyfile(card, temporary / "model_card.md")
    return out_root / name


def _read_json(path: Path) -> dict:
    """A saved run's JSON file; training.json may be absent, a broken file is an error naming it."""
    if not path.is_file():
        return {}
    try:
        return read_json(path)
    except ValueError as error:
        raise ResultsError(f"{path}: not valid JSON ({error}); save the run again with `dlfer results save`") from None


def has_runs(root: Path) -> bool:
    return Path(root).is_dir() and any((path / "metrics").is_dir() for path in Path(root).iterdir())


def load_runs(root: Path) -> dict[str, dict]:
    """Every saved run under root, by name: metrics per file stem, params diff, training facts."""
    root, runs = Path(root), {}
    for directory in sorted(path for path in root.iterdir() if (path / "metrics").is_dir()):
        metrics = {path.stem: _read_json(path) for path in sorted((directory / "metrics").glob("*.json"))}
        diff = yaml.safe_load((directory / "params.diff.yaml").read_text()) if (
            directory / "params.diff.yaml").is_file() else {}
        runs[directory.name] = {"metrics": metrics, "params": diff or {},
                                "training": _read_json(directory / "training.json")}
    if not runs:
        raise ResultsError(f"{root}: no saved runs; `dlfer results save NAME` after a run")
    return runs


def _pct(value) -> str:
    return MISSING if value is None else f"{100 * value:.2f}"


def _with_interval(metrics: dict, key: str) -> str:
    low, high = metrics.get(f"{key}_ci95_low"), metrics.get(f"{key}_ci95_high")
    text = _pct(metrics.get(key))
    return text + (f" ({100 * low:.1f}-{100 * high:.1f})" if low is not None and high is not None else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def protocol_of(run: dict) -> str:
    return run["metrics"].get("preprocess", {}).get("protocol") or run["metrics"].get(
        "augment_balance", {}).get("protocol") or MISSING


def _minutes(run: dict, variant: str) -> str:
    seconds = run["training"].get(variant, {}).get("seconds")
    return MISSING if seconds is None else f"{seconds / 60:.1f}"


def _rate(run: dict, variant: str) -> str:
    rate = run["training"].get(variant, {}).get("images_per_second")
    return MISSING if rate is None else f"{rate:.0f}"


def _kernels(run: dict, variant: str) -> str:
    runtime = run["training"].get(variant, {}).get("runtime")
    if runtime is None:
        return MISSING
    # Runs saved before finetune.cpu_kernels existed trained with Keras' own kernels, before cpu_math in float32.
    if not runtime.get("cpu_kernels"):
        return "Keras"
    return "dlfer, bf16 products" if runtime.get("cpu_math") == "bf16" else "dlfer"


def _epochs(finetune: dict) -> str:
    if not finetune:
        return MISSING
    cell = f"{finetune.get('epochs_run')} of {finetune.get('epochs_planned')}"
    return cell + (" (truncated)" if finetune.get("truncated") else "")


def runs_table(runs: dict) -> list[str]:
    rows = []
    for name, run in runs.items():
        for variant in VARIANTS:
            evaluate = run["metrics"].get(f"evaluate_{variant}")
            if not evaluate:
                continue
            finetune = run["metrics"].get(f"finetune_{variant}", {})
            rows.append([f"`{name}`", protocol_of(run), LABELS[variant], _epochs(finetune), _kernels(run, variant),
                         _minutes(run, variant), _rate(run, variant), _pct(finetune.get("val_accuracy")),
                         _with_interval(evaluate, "test_accuracy"), _with_interval(evaluate, "f1_macro"),
                         _pct(evaluate.get("test_accuracy_one_view")), str(evaluate.get("n_test", MISSING))])
    return _table(["run", "protocol", "model", "epochs", "kernels", "train min", "images/s", "val acc", "test acc (95% CI)",
                   "test macro-F1 (95% CI)", "test acc, one view", "test images"], rows)


def ablation_lines(runs: dict, claims: dict) -> list[str]:
    rows = []
    for name, run in runs.items():
        first, second = (run["metrics"].get(f"evaluate_{variant}") for variant in VARIANTS)
        if not first or not second:
            continue
        delta = 100 * (first["test_accuracy"] - second["test_accuracy"])
        overlap = (first["test_accuracy_ci95_low"] <= second["test_accuracy_ci95_high"]
                   and second["test_accuracy_ci95_low"] <= first["test_accuracy_ci95_high"])
        rows.append([f"`{name}`", _with_interval(first, "test_accuracy"), _with_interval(second, "test_accuracy"),
                     f"{delta:+.2f}", "overlap" if overlap else "separate"])
    if not rows:
        return []
    claimed = claims.get("ablation_delta_test_accuracy")
    return ["## What EF-FER1 adds (the paper's ablation)", "",
            *_table(["run", "from EF-FER1", "from random init", "difference (points)", "95% intervals"], rows), "",
            f"The paper claims {claimed:+.2f} points ({claims['ablation']['with_ef_fer1']['test_accuracy']:.2f} vs "
            f"{claims['ablation']['without_ef_fer1']['test_accuracy']:.2f}) on its own leaky split.", ""]


def protocol_pairs(runs: dict) -> list[tuple[str, str]]:
    """(paper run, official run): saved runs whose params differ in preprocess.protocol alone, so the
    difference of their scores is the protocol's effect (same model, epochs and budget)."""
    def settings(run: dict) -> dict:
        return {key: value for key, value in run["params"].items() if key != "preprocess.protocol"}

    return [(paper_name, official_name) for paper_name, paper in runs.items() if protocol_of(paper) == "paper"
            for official_name, official in runs.items()
            if protocol_of(official) == "official" and settings(official) == settings(paper)]


def leak_lines(runs: dict, claims: dict) -> list[str]:
    rows = []
    for name, run in runs.items():
        evaluate = run["metrics"].get("evaluate_with_ef_fer1", {})
        if "leak_test_with_train_sibling" not in evaluate:
            continue
        with_sibling, without = (evaluate.get("test_accuracy_with_train_sibling"),
                                 evaluate.get("test_accuracy_without_train_sibling"))
        gap = MISSING if with_sibling is None or without is None else f"{100 * (with_sibling - without):+.2f}"
        rows.append([f"`{name}`", protocol_of(run), _pct(evaluate["test_accuracy"]),
                     f"{evaluate['leak_test_with_train_sibling']} of {evaluate['n_test']} "
                     f"({100 * evaluate['leak_share_of_test']:.1f}%)",
                     str(evaluate["leak_test_with_augmented_sibling"]), str(evaluate["leak_test_with_duplicate_in_train"]),
                     _pct(with_sibling), _pct(without), gap])
    if not rows:
        return []
    lines = ["## The paper's protocol against the official one: the leak, measured", "",
             "A test image has a sibling in train when training holds an augmented copy of the same face (the paper "
             "augments before it splits) or an exact / perceptual duplicate of it (validate's audit). EF-FER2 from "
             "EF-FER1 in every row.", "",
             *_table(["run", "protocol", "test acc", "test images with a sibling in train", "augmented copy",
                      "duplicate", "acc with sibling", "acc without", "gap (points)"], rows), ""]
    for paper_name, official_name in protocol_pairs(runs):
        paper = runs[paper_name]["metrics"].get("evaluate_with_ef_fer1")
        official = runs[official_name]["metrics"].get("evaluate_with_ef_fer1")
        if not (paper and official):
            continue
        lines += [f"Same params but the protocol: `{paper_name}` scores "
                  f"{100 * (paper['test_accuracy'] - official['test_accuracy']):+.2f} points against `{official_name}` "
                  f"({_pct(paper['test_accuracy'])} vs {_pct(official['test_accuracy'])}). The paper reports "
                  f"{claims['test_accuracy']:.2f} with EF-FER1 and "
                  f"{claims['ablation']['without_ef_fer1']['test_accuracy']:.2f} without, on its own split of this kind.",
                  ""]
    return lines


def peers_lines(references: dict) -> list[str]:
    rows = [[anchor["name"], f"{anchor['accuracy']:.2f}",
             MISSING if anchor.get("macro_f1") is None else f"{100 * anchor['macro_f1']:.2f}", anchor.get("split", "")]
            for anchor in references.get("anchors", [])]
    return ["## Reference points (references/paper.yaml, with their sources)", "",
            *_table(["model", "test acc", "macro-F1", "split"], rows), ""]


def render_report(runs: dict, references: dict) -> str:
    claims = references["claims"]
    lines = ["# dlfer results", "",
             "Written by `dlfer results report` from `docs/results/*/metrics/*.json` and `training.json`; do not "
             "edit by hand. Each run's folder holds its `params.diff.yaml` (against the default params.yaml); "
             "`dvc exp run -n <name> $(dlfer profile <profile>)` reruns it. val: the model-selection split "
             "(official: PublicTest); test: read once, by evaluate (official: PrivateTest). Accuracies in percent; "
             "train minutes and images/s are this machine's (see each run's training.json for the processor). kernels: "
             "what trained on the CPU, Keras' layers or dlfer's faster kernels for them (finetune.cpu_kernels: the "
             "same function; floating-point rounding then takes two runs apart), with bfloat16 products where "
             "finetune.cpu_math was bf16. test acc and macro-F1 average each "
             "face with its mirror (evaluate.flip_tta); one view: the face alone, what predict, serve and "
             "export answer with --no-mirror (the mean by default: export.mirror_average) (n/a: a run from before evaluate recorded it).", "",
             "## Runs", "", *runs_table(runs), "",
             *ablation_lines(runs, claims), *leak_lines(runs, claims), *peers_lines(references)]
    processors = sorted({run["training"].get("processor", MISSING) for run in runs.values()})
    lines += [f"Processors: {', '.join(processors)}.", ""]
    return "\n".join(lines)


def write_report(root: Path, references_path: Path) -> Path:
    text = render_report(load_runs(root), yaml.safe_load(references_path.read_text()))
    path = root / "README.md"
    with atomic_path(path) as temporary:
        temporary.write_text(text)
    return path
