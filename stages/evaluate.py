"""evaluate: score one fine-tuned model on the held-out test split.

Reads   <model>/model.keras          Keras model: (N,48,48,1) raw pixels 0-255 -> (N,7) softmax, Kaggle order
        <model>/mlflow_run.json     {run_id, ...} of the finetune run, recorded as tag finetune_run_id
        <test>                      data/balanced/test.npz: images (N,48,48) uint8, labels (N,), ids (N,).
                                    This is the only stage that reads the test split, and it reads it once.
        <train>                     data/balanced/train.npz: only its ids, to find test faces seen in training
        <audit>                     data/validated/audit.parquet: validate's exact / perceptual duplicate groups
Writes  <metrics>                   metrics/evaluate_<variant>.json (flat numbers; the same dict goes to MLflow),
                                    with the leak (dlfer.evaluation.leak): test images with a sibling in train, and
                                    accuracy on those with one and on those without; with evaluate.flip_tta also
                                    test_accuracy_one_view and f1_macro_one_view (the image alone: what predict
                                    and serve answer; exports average the two, see export.mirror_average)
        <reports>/predictions.csv   id, actual, predicted (emotion names), probability_<emotion> x 7,
                                    train_sibling (none | augmented | duplicate | both)
        <reports>/per_class.csv     emotion, precision, recall, f1, support
        <reports>/confusion.png     counts and row-normalised confusion matrices
Params  seed (bootstrap RNG), preprocess.protocol (MLflow tag), evaluate.flip_tta, evaluate.bootstrap_samples
MLflow  run evaluate_<variant>, tags stage=evaluate, variant, protocol, finetune_run_id
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import typer

from dlfer.evaluation import leak, metrics
from dlfer.fer2013 import EMOTIONS, IMAGE_SIDE
from dlfer.files import atomic_directory, sha256_of_file, write_json
from dlfer.model import class_bias
from dlfer.params import load_params
from dlfer.registry import finetune_run_id
from dlfer.tracking import configure, log_numeric_metrics, stage_run

class EvaluateInputError(ValueError):
    """An input file of the evaluate stage is missing or malformed; the message names it and the fix."""


def load_test_split(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not path.is_file():
        raise EvaluateInputError(f"{path}: not found; run the augment_balance stage (dvc repro augment_balance)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = {"images", "labels", "ids"} - set(archive.files)
            if missing:
                raise EvaluateInputError(f"{path}: missing array(s) {', '.join(sorted(missing))}; "
                                         "rerun augment_balance to rewrite it")
            images, labels, ids = archive["images"], archive["labels"], archive["ids"]
    except (OSError, ValueError) as error:
        if isinstance(error, EvaluateInputError):
            raise
        # e.g. a truncated file, or ids stored as Python objects (needs pickle, which is refused).
        raise EvaluateInputError(f"{path}: not a readable .npz of plain arrays ({error}); rerun augment_balance") from None
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE) or images.dtype != np.uint8:
        raise EvaluateInputError(f"{path}: images must be (N,{IMAGE_SIDE},{IMAGE_SIDE}) uint8, "
                                 f"got {images.shape} {images.dtype}; rerun augment_balance")
    if len(images) == 0 or labels.shape != (len(images),) or ids.shape != (len(images),):
        raise EvaluateInputError(f"{path}: needs N>0 images with N labels and N ids, got {len(images)} images, "
                                 f"labels {labels.shape}, ids {ids.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= len(EMOTIONS):
        raise EvaluateInputError(f"{path}: labels must be integers 0..{len(EMOTIONS) - 1} (Kaggle order)")
    return images, labels.astype(np.int64), ids.astype(str)


def load_model(model_dir: Path):
    import keras

    model_file = model_dir / "model.keras"
    if not model_file.is_file():
        raise EvaluateInputError(f"{model_file}: not found; run the finetune stage for this variant")
    return keras.models.load_model(model_file, compile=False)


def predict_views(model, images: np.ndarray, flip_tta: bool) -> np.ndarray:
    """(views, N, classes) softmax: the image, and with flip_tta its horizontal mirror.

    Faces are roughly left-right symmetric and training already flips with p=0.5, so the mirror is an
    equally valid view of the same expression. finetune fits its class bias on these same views. The
    first view is what the saved model answers alone, as predict and serve give it; exports answer the
    mean of both by default (export.mirror_average, dlfer.model.mirror).
    """
    views = class_bias.predict_views(model, images, flip_tta)
    if views.shape[1:] != (len(images), len(EMOTIONS)):
        raise EvaluateInputError(f"model output has shape {views.shape[1:]}; expected ({len(images)}, "
                                 f"{len(EMOTIONS)}): one probability per emotion in Kaggle order")
    # The tolerance allows a float16 softmax under mixed precision; logits miss it by far.
    if not np.allclose(views.sum(axis=-1), 1.0, atol=1e-2):
        raise EvaluateInputError("model output rows do not sum to 1: the model must end in a softmax, not logits")
    return views


def one_view_metrics(labels: np.ndarray, views: np.ndarray) -> dict:
    """Accuracy and macro-F1 of the image alone (no mirror): the model as predict and serve run it."""
    if len(views) < 2:
        return {}
    predicted = views[0].argmax(axis=1)
    return {"test_accuracy_one_view": metrics.accuracy(labels, predicted),
            "f1_macro_one_view": metrics.averaged_scores(labels, predicted, len(EMOTIONS))["f1_macro"]}


def load_train_ids_and_audit(train_path: Path, audit_path: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """The train split's ids and validate's duplicate groups, to find test faces already seen in training."""
    if not train_path.is_file():
        raise EvaluateInputError(f"{train_path}: not found; run the augment_balance stage (dvc repro augment_balance)")
    if not audit_path.is_file():
        raise EvaluateInputError(f"{audit_path}: not found; run the validate stage (dvc repro validate)")
    try:
        with np.load(train_path, allow_pickle=False) as archive:
            train_ids = archive["ids"].astype(str)
        audit = pd.read_parquet(audit_path, columns=["image_id", *leak.DUPLICATE_GROUPS])
    except (OSError, ValueError, KeyError) as error:
        raise EvaluateInputError(f"{train_path} / {audit_path}: unreadable ({error}); rerun augment_balance "
                                 "and validate") from None
    return train_ids, audit


def predictions_table(ids: np.ndarray, labels: np.ndarray, probabilities: np.ndarray,
                      siblings: pd.DataFrame) -> pd.DataFrame:
    names = np.array(EMOTIONS)
    table = pd.DataFrame({"id": ids, "actual": names[labels], "predicted": names[probabilities.argmax(axis=1)]})
    for index, emotion in enumerate(EMOTIONS):
        table[f"probability_{emotion}"] = probabilities[:, index]
    augmented, duplicate = siblings["augmented_sibling"].to_numpy(), siblings["duplicate_in_train"].to_numpy()
    table["train_sibling"] = np.select([augmented & duplicate, augmented, duplicate], ["both", "augmented", "duplicate"],
                                       "none")
    return table


def draw_confusion(confusion: np.ndarray, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row_totals = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, row_totals, out=np.zeros(confusion.shape), where=row_totals > 0)
    figure, axes = plt.subplots(1, 2, figsize=(14, 6))
    for axis, values, label, text_format in ((axes[0], confusion, "counts", "{:.0f}"),
                                             (axes[1], normalised, "row-normalised (recall on the diagonal)", "{:.2f}")):
        image = axis.imshow(values, cmap="Blues")
        figure.colorbar(image, ax=axis, fraction=0.046)
        axis.set_xticks(range(len(EMOTIONS)), EMOTIONS, rotation=45, ha="right")
        axis.set_yticks(range(len(EMOTIONS)), EMOTIONS)
        axis.set_xlabel("predicted")
        axis.set_ylabel("actual")
        axis.set_title(label)
        threshold = values.max() / 2
        for row in range(len(EMOTIONS)):
            for column in range(len(EMOTIONS)):
                axis.text(column, row, text_format.format(values[row, column]), ha="center", va="center",
                          fontsize=8, color="white" if values[row, column] > threshold else "black")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(
    variant: str = typer.Option(..., help="with_ef_fer1 or without_ef_fer1; names the outputs and the MLflow run"),
    params_path: Path = typer.Option(Path("params.yaml"), "--params"),
    model_dir: Path = typer.Option(..., "--model", help="models/finetune/<variant>"),
    test_path: Path = typer.Option(..., "--test", help="data/balanced/test.npz"),
    train_path: Path = typer.Option(..., "--train", help="data/balanced/train.npz (its ids only)"),
    audit_path: Path = typer.Option(..., "--audit", help="data/validated/audit.parquet"),
    metrics_path: Path = typer.Option(..., "--metrics", help="metrics/evaluate_<variant>.json"),
    reports_dir: Path = typer.Option(..., "--reports", help="reports/evaluate/<variant>"),
) -> None:
    if not re.fullmatch(r"[a-z0-9_]+", variant):
        raise typer.BadParameter(f"--variant {variant!r}: use lower-case letters, digits and underscores")
    params = load_params(params_path)
    configure()  # fail fast on an unreachable tracking store, before any work
    run_id_of_finetune = finetune_run_id(model_dir)
    images, labels, ids = load_test_split(test_path)  # before the model: a bad file fails without loading Keras
    siblings = leak.train_siblings(ids, *load_train_ids_and_audit(train_path, audit_path))
    model = load_model(model_dir)

    views = predict_views(model, images, params.evaluate.flip_tta)
    probabilities = class_bias.mean_probabilities(views)
    predicted = probabilities.argmax(axis=1)
    rng = np.random.default_rng(params.seed)
    results = metrics.evaluation_metrics(labels, predicted, EMOTIONS, params.evaluate.bootstrap_samples, rng)
    results.update(one_view_metrics(labels, views))
    results.update(leak.leak_metrics(siblings, predicted == labels))

    logged_params = {"evaluate": params.section("evaluate"), "preprocess": {"protocol": params.preprocess.protocol},
                     "seed": params.seed, "variant": variant}
    # compare finds evaluate runs by these tags (stage, variant, protocol) to set the protocols side by side.
    tags = {"variant": variant, "protocol": params.preprocess.protocol, "finetune_run_id": run_id_of_finetune,
            "model_sha256": sha256_of_file(model_dir / "model.keras"), "test_sha256": sha256_of_file(test_path)}
    with stage_run("evaluate", logged_params, run_name=f"evaluate_{variant}", tags=tags) as run:
        import mlflow

        with atomic_directory(reports_dir) as temporary:
            predictions_table(ids, labels, probabilities, siblings).to_csv(temporary / "predictions.csv", index=False)
            metrics.per_class_table(labels, predicted, EMOTIONS).to_csv(temporary / "per_class.csv", index=False)
            confusion = metrics.confusion_matrix(labels, predicted, len(EMOTIONS))
            draw_confusion(confusion, f"evaluate {variant} ({params.preprocess.protocol} protocol): "
                                      f"test accuracy {results['test_accuracy']:.2%}, n={len(labels)}",
                           temporary / "confusion.png")
        write_json(metrics_path, results)
        log_numeric_metrics(results)
        mlflow.log_artifacts(str(reports_dir), artifact_path="evaluate")
        mlflow.log_artifact(str(metrics_path))
    typer.echo(f"evaluate {variant}: test accuracy {results['test_accuracy']:.4f} "
               f"[{results['test_accuracy_ci95_low']:.4f}, {results['test_accuracy_ci95_high']:.4f}], "
               f"macro-F1 {results['f1_macro']:.4f}, n={results['n_test']}, "
               f"{results['leak_test_with_train_sibling']} with a sibling in train (MLflow run {run.info.run_id})")


if __name__ == "__main__":
    try:
        typer.run(main)
    except ValueError as error:  # bad inputs and params: one line naming the file and the fix, no traceback
        raise SystemExit(f"evaluate: {error}") from None
