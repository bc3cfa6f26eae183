"""The model card (reports/model_card.md), written from the files the pipeline already produced.

Sections follow Mitchell et al. 2019, "Model Cards for Model Reporting": model details,
intended and unsuitable uses, data and splits, training configuration, metrics with intervals,
per-class results, the ablation, known limitations, and how to reproduce. Every figure is read
from a stage's output and never recomputed; a missing file or key is printed as "n/a" with the
stage that writes it, so the card can be written from a partial run and says what is missing.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import yaml

from dlfer.fer2013 import EMOTIONS, OFFICIAL_COUNTS
from dlfer.params import VARIANTS

VARIANT_LABELS = {"with_ef_fer1": "EF-FER2 initialised from EF-FER1 (DLFER)",
                  "without_ef_fer1": "EF-FER2 from random initialisation"}
MISSING = "n/a"


def _read_mapping(path: Path, parse=json.loads) -> dict:
    """The JSON (or, with parse=yaml.safe_load, YAML) mapping in path; {} when it is absent or not a mapping."""
    try:
        value = parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):  # json.JSONDecodeError is a ValueError
        return {}
    return value if isinstance(value, dict) else {}


def _read_per_class(path: Path) -> list[dict]:
    try:
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))
    except OSError:
        return []


def _number(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def percent(value) -> str:
    """A fraction in [0, 1] as a percentage with two decimals, or n/a."""
    number = _number(value)
    return MISSING if number is None else f"{100 * number:.2f}%"


def with_interval(metrics: dict, key: str, low_key: str, high_key: str) -> str:
    """'66.21% (95% CI 64.70-67.80%)', or without the interval when its bounds are absent."""
    text = percent(metrics.get(key))
    low, high = _number(metrics.get(low_key)), _number(metrics.get(high_key))
    if text != MISSING and low is not None and high is not None:
        text += f" (95% CI {100 * low:.2f}-{100 * high:.2f}%)"
    return text


def plain(value) -> str:
    if value is None or value == "":
        return MISSING
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(plain(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def collect(params_path: Path, metrics_dir: Path, models_dir: Path, reports_dir: Path,
            references_path: Path = Path("references/paper.yaml")) -> dict:
    """Everything the card reads, as plain dicts ({} or [] where a file is missing)."""
    return {
        "params": _read_mapping(params_path, yaml.safe_load),
        "references": _read_mapping(references_path, yaml.safe_load),
        "fetch": _read_mapping(metrics_dir / "fetch.json"),
        "validate": _read_mapping(metrics_dir / "validate.json"),
        "preprocess": _read_mapping(metrics_dir / "preprocess.json"),
        "augment_balance": _read_mapping(metrics_dir / "augment_balance.json"),
        "pretrain": _read_mapping(metrics_dir / "pretrain.json"),
        "finetune": {variant: _read_mapping(metrics_dir / f"finetune_{variant}.json") for variant in VARIANTS},
        "evaluate": {variant: _read_mapping(metrics_dir / f"evaluate_{variant}.json") for variant in VARIANTS},
        "provenance": {variant: _read_mapping(models_dir / "finetune" / variant / "provenance.json")
                       for variant in VARIANTS},
        "mlflow_run": _read_mapping(models_dir / "finetune" / VARIANTS[0] / "mlflow_run.json"),
        "per_class": _read_per_class(reports_dir / "evaluate" / VARIANTS[0] / "per_class.csv"),
        "paths": {"params": params_path, "metrics": metrics_dir, "models": models_dir, "reports": reports_dir},
    }


def render(facts: dict) -> str:
    """The model card as Markdown."""
    protocol = _section(facts, "preprocess").get("protocol") or facts["preprocess"].get("protocol") or MISSING
    parts = [
        f"# Model card: dlfer EF-FER2 ({VARIANTS[0]})",
        "",
        "Written by the `model_card` stage from the pipeline's own outputs; every figure below is read from "
        f"`{facts['paths']['metrics']}/`, `{facts['paths']['models']}/` and `{facts['paths']['reports']}/`. "
        f"\"{MISSING}\" marks a figure whose file is missing (run `dvc repro`).",
        "",
        _details(facts, protocol),
        _uses(),
        _data(facts, protocol),
        _training(facts),
        _metrics(facts, protocol),
        _per_class(facts),
        _ablation(facts),
        _limitations(facts),
        _reproduce(facts),
    ]
    return "\n".join(parts).rstrip() + "\n"


def _section(facts: dict, name: str) -> dict:
    """One params section as the model was trained with it: from its provenance.json (the params the
    finetune run logged), else from params.yaml; {} if neither has it."""
    trained = facts["provenance"][VARIANTS[0]].get("params")
    if isinstance(trained, dict) and isinstance(trained.get(name), dict):
        return trained[name]
    value = facts["params"].get(name)
    return value if isinstance(value, dict) else {}


def _details(facts: dict, protocol: str) -> str:
    provenance = facts["provenance"][VARIANTS[0]]
    finetune = _section(facts, "finetune")
    rows = [
        ["task", "facial expression recognition: one of 7 emotions (Kaggle FER2013 order: "
                 + ", ".join(EMOTIONS) + ") for one face crop"],
        ["architecture", f"EfficientNet backbone `{plain(finetune.get('backbone'))}`, global average pooling, "
                         f"dropout {plain(finetune.get('dropout'))}, dense softmax head"],
        ["input", "(N, 48, 48, 1) greyscale pixels 0-255; inside the model: resize to "
                  f"{plain(finetune.get('image_size'))}, grey repeated to {plain(finetune.get('channels'))} "
                  "channel(s), the backbone's own input scaling"],
        ["output", "(N, 7) probabilities summing to 1"],
        ["initialisation", plain(provenance.get("initialisation"))],
        ["evaluation protocol", protocol],
        ["file", f"`{facts['paths']['models']}/finetune/{VARIANTS[0]}/model.keras`"],
        ["git commit", plain(provenance.get("git_commit"))],
        ["MLflow run (finetune)", plain(facts["mlflow_run"].get("run_id"))],
    ]
    return "## Model details\n\n" + table(["field", "value"], rows) + "\n"


def _uses() -> str:
    return """## Intended use

- Research on facial expression recognition: reproducing and auditing the DLFER paper on FER2013,
  comparing training protocols, and studying what such models learn.
- Aggregate, consented analyses where a person's displayed expression (not their feelings) is the
  object of study, with a human checking the results.

## Unsuitable uses

- **Surveillance** or monitoring of people who have not consented (public spaces, workplaces, classrooms).
- **Decisions about people**: hiring, promotion, admission, grading, credit, insurance, policing, border
  control, or any assessment of honesty, personality or fitness.
- **Emotion as ground truth of inner state**: the model labels a *facial configuration* as it appears in
  a photo. Facial movements are not a reliable readout of felt emotion: they vary with person, culture
  and context (Barrett et al. 2019, *Psychological Science in the Public Interest* 20(1)).
- Clinical or mental-health diagnosis, and uses on children.
- Any input unlike FER2013: non-frontal faces, very small or blurred faces, drawings, masks.
"""


def _data(facts: dict, protocol: str) -> str:
    fetch, validate, preprocess, augment = (facts["fetch"], facts["validate"], facts["preprocess"],
                                            facts["augment_balance"])
    usage = fetch.get("usage") if isinstance(fetch.get("usage"), dict) else {}
    official = {name: sum(counts.values()) for name, counts in OFFICIAL_COUNTS.items()}
    lines = ["## Data and splits", "",
             "FER2013 (Goodfellow et al. 2013): 35,887 greyscale 48x48 face crops found by Google image search, "
             "cropped with OpenCV face detection, labelled by one annotator each into 7 classes.", "",
             table(["usage", "images read", "official count"],
                   [[name, usage.get(name), official[name]] for name in official]), "",
             "Data quality (validate stage):", "",
             table(["finding", "images"], [
                 ["blank or near-constant", validate.get("blank_images")],
                 ["in exact duplicate groups", validate.get("exact_duplicate_images")],
                 ["in near-duplicate groups (perceptual hash)", validate.get("near_duplicate_images")],
                 ["duplicated across usages (train/val/test)", validate.get("cross_usage_duplicate_images")],
                 ["exact duplicates carrying different labels", validate.get("label_conflict_images")],
             ]), "",
             _splits(preprocess, protocol)]
    if protocol == "official":
        lines += ["", "Under the official protocol the validation split is PublicTest and the test split is "
                      "PrivateTest; the test split is read once, by the evaluate stage."]
    elif protocol == "paper":
        lines += ["", "**Paper protocol**: images are augmented before a random split, so augmented copies of one "
                      "face sit in train and test. Its test scores are inflated and not comparable with the "
                      "official PrivateTest."]
    before, after = augment.get("before"), augment.get("after")
    if isinstance(before, dict) and isinstance(after, dict):
        lines += ["", "Class balance of the training split before and after augmentation (augment_balance):", "",
                  table(["emotion", "before", "after"], [[emotion, before.get(emotion), after.get(emotion)]
                                                         for emotion in EMOTIONS]),
                  "", f"{plain(augment.get('augmented_images'))} augmented copies were added; test and validation "
                      "images are never augmented."]
    return "\n".join(lines) + "\n"


def _splits(preprocess: dict, protocol: str) -> str:
    if not preprocess:
        return f"Splits (preprocess, protocol `{protocol}`): {MISSING} (run `dvc repro preprocess`)."
    dropped = ", ".join(f"{key.removeprefix('dropped_').replace('_', ' ')} {value}"
                        for key, value in sorted(preprocess.items()) if key.startswith("dropped_"))
    return (f"Splits (preprocess, protocol `{protocol}`): train {plain(preprocess.get('n_train'))}, "
            f"validation {plain(preprocess.get('n_val'))}, test {plain(preprocess.get('n_test'))} images. "
            f"Dropped from train: {dropped or MISSING}.")


def _training(facts: dict) -> str:
    finetune, pretrain = _section(facts, "finetune"), _section(facts, "pretrain")
    metrics = facts["finetune"][VARIANTS[0]]
    provenance = facts["provenance"][VARIANTS[0]]
    rows = [[key, value] for key, value in finetune.items()]
    lines = ["## Training configuration", "",
             "The finetune params the model was trained with (its provenance.json; params.yaml where absent):", "",
             table(["finetune", "value"], rows) if rows else MISSING, "",
             f"EF-FER1 (pretrain): source `{plain(pretrain.get('source'))}`, backbone "
             f"`{plain(pretrain.get('backbone'))}`, {plain(pretrain.get('epochs'))} epochs at "
             f"{plain(pretrain.get('image_size'))} px; source-domain validation accuracy "
             f"{percent(facts['pretrain'].get('source_val_accuracy'))}.", "",
             f"Run: best epoch {plain(metrics.get('best_epoch'))} of {plain(metrics.get('epochs_run'))} "
             f"(stopped by {plain(provenance.get('stopped_by'))}), "
             f"{plain((provenance.get('training') or {}).get('seconds'))} s of training on "
             f"{plain(metrics.get('train_images'))} images; "
             f"runtime {plain(json.dumps(provenance['runtime']) if provenance.get('runtime') else None)}.",
             f"Training data sha256 {plain(provenance.get('train_sha256'))}, validation data sha256 "
             f"{plain(provenance.get('val_sha256'))}."]
    truncated = [variant for variant in VARIANTS if facts["finetune"][variant].get("truncated")]
    if truncated:
        lines += ["", f"**Truncated by the time budget** (`finetune.max_seconds`): {', '.join(truncated)} stopped "
                      "before its planned epochs, so these figures depend on the speed of the machine that trained "
                      "it; raise or clear the budget to reproduce them."]
    return "\n".join(lines) + "\n"


def _metrics(facts: dict, protocol: str) -> str:
    evaluate = facts["evaluate"][VARIANTS[0]]
    finetune = facts["finetune"][VARIANTS[0]]
    rows = [
        ["test accuracy", with_interval(evaluate, "test_accuracy", "test_accuracy_ci95_low", "test_accuracy_ci95_high")],
        ["test macro-F1", with_interval(evaluate, "f1_macro", "f1_macro_ci95_low", "f1_macro_ci95_high")],
        *([["test accuracy / macro-F1, one view (the face alone, without its mirror: what predict, serve and "
            "exports answer with --no-mirror)", f"{percent(evaluate['test_accuracy_one_view'])} / "
                              f"{percent(evaluate.get('f1_macro_one_view'))}"]]
          if "test_accuracy_one_view" in evaluate else []),
        ["test macro precision / recall", f"{percent(evaluate.get('precision_macro'))} / "
                                          f"{percent(evaluate.get('recall_macro'))}"],
        ["test weighted F1", percent(evaluate.get("f1_weighted"))],
        ["validation accuracy / macro-F1", f"{percent(finetune.get('val_accuracy'))} / "
                                           f"{percent(finetune.get('val_macro_f1'))}"],
        ["train accuracy (best epoch)", percent(finetune.get("train_accuracy"))],
        ["test images", plain(evaluate.get("n_test"))],
    ]
    lines = ["## Metrics", "", f"On the test split of the `{protocol}` protocol; intervals are 95% percentile "
             "bootstrap intervals over test images (evaluate.bootstrap_samples resamples).", "",
             table(["metric", "value"], rows)]
    if _number(evaluate.get("paper_eq1_accuracy")) is not None:
        lines += ["", f"The paper's equation 1 evaluates to {percent(evaluate['paper_eq1_accuracy'])} here: it is "
                      "the mean one-vs-rest accuracy, not the accuracy, and is shown only to compare with the paper."]
    return "\n".join(lines) + "\n"


def _per_class(facts: dict) -> str:
    rows = facts["per_class"]
    if not rows:
        body = f"{MISSING}: `reports/evaluate/{VARIANTS[0]}/per_class.csv` is missing (run `dvc repro evaluate`)."
    else:
        body = table(["emotion", "precision", "recall", "F1", "test images"],
                     [[row.get("emotion"), percent(row.get("precision")), percent(row.get("recall")),
                       percent(row.get("f1")), row.get("support")] for row in rows])
    return "## Per-class results\n\n" + body + "\n"


def _ablation(facts: dict) -> str:
    rows = []
    for variant in VARIANTS:
        finetune, evaluate = facts["finetune"][variant], facts["evaluate"][variant]
        rows.append([VARIANT_LABELS[variant], percent(finetune.get("train_accuracy")),
                     percent(finetune.get("val_accuracy")),
                     with_interval(evaluate, "test_accuracy", "test_accuracy_ci95_low", "test_accuracy_ci95_high"),
                     percent(evaluate.get("f1_macro"))])
    lines = ["## Ablation: what EF-FER1 contributes", "",
             table(["model", "train accuracy", "val accuracy", "test accuracy", "test macro-F1"], rows)]
    first, second = (_number(facts["evaluate"][variant].get("test_accuracy")) for variant in VARIANTS)
    if first is not None and second is not None:
        claimed = _number((facts["references"].get("claims") or {}).get("ablation_delta_test_accuracy"))
        claim = MISSING if claimed is None else f"{claimed:+.2f}"
        lines += ["", f"Difference in test accuracy: {100 * (first - second):+.2f} percentage points. Where the two "
                      f"intervals overlap, this run does not separate the variants. The paper claims {claim} points "
                      "(references/paper.yaml); `reports/compare.md` sets this run beside the paper's figures."]
    return "\n".join(lines) + "\n"


def _human_accuracy(facts: dict) -> str:
    """The human-accuracy anchor of references/paper.yaml, as a phrase with its source."""
    for anchor in facts["references"].get("anchors") or []:
        if "human" in str(anchor.get("kind", "")).lower():
            return (f"human accuracy on it is about {plain(anchor.get('accuracy'))} +/- "
                    f"{plain(anchor.get('uncertainty'))}% ({anchor.get('name')}, references/paper.yaml)")
    return "human accuracy on it is well below 100% (references/paper.yaml has no human anchor)"


def _limitations(facts: dict) -> str:
    validate = facts["validate"]
    worst = [row for row in facts["per_class"] if _number(row.get("f1")) is not None]
    worst.sort(key=lambda row: float(row["f1"]))
    weakest = (f" The weakest class here is {worst[0]['emotion']} (F1 {percent(worst[0]['f1'])}, "
               f"{worst[0].get('support')} test images).") if worst else ""
    return f"""## Known limitations

- **Label noise.** Each FER2013 image was labelled once; {_human_accuracy(facts)}, so the test labels
  themselves are wrong for a sizeable share of images. The
  validate stage found {plain(validate.get('label_conflict_images'))} images in exact-duplicate groups with
  conflicting labels and {plain(validate.get('label_conflict_near_images'))} near duplicates with conflicting labels.
- **Class imbalance.** Disgust is about 1.5% of FER2013 (547 of 35,887 images) and happy about 25%.
  Augmentation balances the training split, but the test split keeps the natural imbalance, so accuracy is
  dominated by the frequent classes; read macro-F1 and the per-class table.{weakest}
- **Dataset demographics.** FER2013 carries no age, gender or skin-tone labels, so performance for
  demographic groups cannot be measured with it. Web-search images over-represent adults, lighter
  skin tones and posed, exaggerated expressions; expect lower accuracy on under-represented groups and
  on spontaneous expressions.
- **Duplicates across splits.** {plain(validate.get('cross_usage_duplicate_images'))} images have an exact or
  near copy in another official usage; the official protocol drops training copies of test images, the
  paper protocol does not, which inflates its test score.
- **Input conditions.** 48x48 greyscale, roughly frontal, centred faces. `dlfer predict` finds faces with
  OpenCV's frontal Haar cascade (the detector FER2013 itself was cropped with); profile, tilted, occluded
  or tiny faces are missed rather than misclassified.
- **Seven basic categories.** Blends, neutral-looking emotions and culture-specific displays have no label.
"""


def _reproduce(facts: dict) -> str:
    provenance = facts["provenance"][VARIANTS[0]]
    commit = plain(provenance.get("git_commit"))
    return f"""## How to reproduce

```bash
git checkout {commit if commit != MISSING else '<commit>'}
bash scripts/run.sh              # sets up .venv, puts the pinned data (data.dvc) in place, runs `dvc repro`
dvc metrics show                 # the figures above
```

The data are pinned by `data.dvc` (md5 of `data/external/`); every hyperparameter is in `params.yaml`
(a different profile: `dvc exp run $(dlfer profile paper_gpu)`). The finetune run's parameters,
metrics and model are in MLflow run {plain(facts['mlflow_run'].get('run_id'))}.

Using the model:

```bash
dlfer predict photos/ --format csv --out faces.csv --annotate annotated/
dlfer export --out exports/{VARIANTS[0]}
mlflow models serve -m exports/{VARIANTS[0]}/mlflow_model --env-manager local -p 5001
```
"""


def write_model_card(params_path: Path, metrics_dir: Path, models_dir: Path, reports_dir: Path, out: Path,
                     references_path: Path = Path("references/paper.yaml")) -> str:
    """Render the card from the pipeline's files and write it to `out` atomically; return its text."""
    from dlfer.files import atomic_path

    text = render(collect(Path(params_path), Path(metrics_dir), Path(models_dir), Path(reports_dir),
                          Path(references_path)))
    with atomic_path(out) as temporary:
        temporary.write_text(text)
    return text
