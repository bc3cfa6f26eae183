"""Classification metrics for the evaluate stage: pure functions on label arrays.

Labels are integer class indices 0..n_classes-1 (Kaggle order, dlfer.fer2013.EMOTIONS).
Averaged precision, recall and F1 come from scikit-learn so they mean what readers expect;
the paper's equations 1-4 (section 3.2) are implemented literally beside them, because what
they evaluate to for a single-label multiclass problem is part of the audit. Every score is
a fraction in [0, 1]; reports turn them into percentages.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix
from sklearn.metrics import precision_recall_fscore_support

AVERAGES = ("macro", "weighted", "micro")


def check_labels(y_true, y_pred, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Both label arrays as 1-D int64 arrays of one length with values in 0..n_classes-1."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.ndim != 1 or y_pred.ndim != 1:
        raise ValueError(f"labels must be 1-D arrays, got shapes {y_true.shape} and {y_pred.shape}")
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels but y_pred has {len(y_pred)}")
    if len(y_true) == 0:
        raise ValueError("no labels to score: the arrays are empty")
    for name, labels in (("y_true", y_true), ("y_pred", y_pred)):
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{name} must hold integer class indices, got dtype {labels.dtype}")
        if labels.min() < 0 or labels.max() >= n_classes:
            raise ValueError(f"{name} holds values outside 0..{n_classes - 1}: min {labels.min()}, max {labels.max()}")
    return y_true.astype(np.int64), y_pred.astype(np.int64)


def confusion_matrix(y_true, y_pred, n_classes: int) -> np.ndarray:
    """Counts with actual classes as rows and predicted classes as columns, all n_classes of each."""
    y_true, y_pred = check_labels(y_true, y_pred, n_classes)
    return sklearn_confusion_matrix(y_true, y_pred, labels=np.arange(n_classes))


def accuracy(y_true, y_pred) -> float:
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"accuracy needs two non-empty label arrays of one shape, got {y_true.shape} and {y_pred.shape}")
    return float(np.mean(y_true == y_pred))


def averaged_scores(y_true, y_pred, n_classes: int) -> dict[str, float]:
    """precision/recall/f1 under macro, weighted and micro averaging, keyed like `f1_macro`.

    scikit-learn's default label set is used: the classes present in y_true or y_pred, so a
    class absent from both does not drag the macro average down. A class that is never
    predicted scores precision 0 (zero_division=0) rather than a warning.
    """
    y_true, y_pred = check_labels(y_true, y_pred, n_classes)
    scores = {}
    for average in AVERAGES:
        precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
        scores[f"precision_{average}"] = float(precision)
        scores[f"recall_{average}"] = float(recall)
        scores[f"f1_{average}"] = float(f1)
    return scores


def paper_equations(confusion: np.ndarray) -> dict[str, float]:
    """The paper's equations 1-4 (section 3.2), implemented literally from one-vs-rest counts.

    For each class i, one-vs-rest counting gives TP_i, FP_i, FN_i and TN_i, and
    TP_i + FP_i + FN_i + TN_i = N for every class.

    Eq. 1, sum_i(TP_i + TN_i) / (TP + TN + FP + FN), read with the denominator summed over
    the same classes as the numerator, is the mean one-vs-rest accuracy. Because every
    misclassified image is one FP (for the predicted class) and one FN (for the actual class),
    it equals 1 - 2 * (1 - accuracy) / n_classes: with 7 classes a true accuracy of 66% reads
    as 90%. (Read with a single class's N as the denominator it exceeds 1, so that reading
    cannot be meant.) It is reported as `paper_eq1_accuracy`, never as the accuracy.

    Eqs. 2 and 3, sum_i TP_i / sum_i(TP_i + FP_i) and sum_i TP_i / sum_i(TP_i + FN_i), are
    micro-averaged precision and recall. In single-label classification sum_i FP_i and
    sum_i FN_i both count the misclassified images, so both equal the plain accuracy, and so
    does eq. 4, their harmonic mean. Precision and recall that differ from each other (as the
    paper's 80.42 and 83.99 do) cannot have come from eqs. 2-3.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1] or confusion.sum() <= 0:
        raise ValueError(f"paper_equations needs a square, non-empty confusion matrix, got shape {confusion.shape}")
    total = confusion.sum()
    true_positive = np.diag(confusion)
    false_positive = confusion.sum(axis=0) - true_positive
    false_negative = confusion.sum(axis=1) - true_positive
    true_negative = total - true_positive - false_positive - false_negative

    eq1 = (true_positive + true_negative).sum() / (true_positive + true_negative + false_positive + false_negative).sum()
    eq2 = _ratio(true_positive.sum(), (true_positive + false_positive).sum())
    eq3 = _ratio(true_positive.sum(), (true_positive + false_negative).sum())
    eq4 = _ratio(2 * eq2 * eq3, eq2 + eq3)
    return {
        "paper_eq1_accuracy": float(eq1),
        "paper_eq2_precision": float(eq2),
        "paper_eq3_recall": float(eq3),
        "paper_eq4_f1": float(eq4),
    }


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator > 0 else 0.0


def per_class_table(y_true, y_pred, class_names) -> pd.DataFrame:
    """One row per class, in label order: emotion, precision, recall, f1, support."""
    class_names = list(class_names)
    y_true, y_pred = check_labels(y_true, y_pred, len(class_names))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=np.arange(len(class_names)), average=None, zero_division=0)
    return pd.DataFrame({
        "emotion": class_names,
        "precision": precision.astype(float),
        "recall": recall.astype(float),
        "f1": f1.astype(float),
        "support": support.astype(np.int64),
    })


def resampled_scores(y_true, y_pred, indices: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and macro-F1 of each resample; row b of `indices` picks the images of resample b.

    Vectorised with one bincount over (resample, class) pairs instead of a Python loop over
    resamples. Macro-F1 follows averaged_scores: per-class F1 = 2TP / (2TP + FP + FN), which is
    2TP / (n_true + n_predicted), averaged over the classes present in that resample's
    y_true or y_pred.
    """
    y_true, y_pred = check_labels(y_true, y_pred, n_classes)
    indices = np.asarray(indices)
    if indices.ndim != 2:
        raise ValueError(f"indices must be a 2-D (resamples, size) array, got shape {indices.shape}")
    resamples = indices.shape[0]
    true_sampled = y_true[indices]
    pred_sampled = y_pred[indices]
    correct = true_sampled == pred_sampled

    # Offset each resample's labels by resample * n_classes so one bincount counts them all.
    offset = (np.arange(resamples) * n_classes)[:, None]
    size = resamples * n_classes
    true_count = np.bincount((true_sampled + offset).ravel(), minlength=size).reshape(resamples, n_classes)
    predicted_count = np.bincount((pred_sampled + offset).ravel(), minlength=size).reshape(resamples, n_classes)
    true_positive = np.bincount((true_sampled + offset)[correct], minlength=size).reshape(resamples, n_classes)

    denominator = true_count + predicted_count
    present = denominator > 0
    f1 = np.divide(2.0 * true_positive, denominator, out=np.zeros(denominator.shape), where=present)
    macro_f1 = f1.sum(axis=1) / present.sum(axis=1)
    return correct.mean(axis=1), macro_f1


def bootstrap_intervals(y_true, y_pred, n_classes: int, samples: int, rng: np.random.Generator,
                        chunk: int = 200) -> dict[str, float]:
    """95% percentile bootstrap intervals for test accuracy and macro-F1.

    Resamples the test images with replacement `samples` times. Work goes in chunks of
    resamples so memory stays at chunk * N labels whatever `samples` is.
    """
    if samples < 1:
        raise ValueError(f"bootstrap needs at least 1 resample, got {samples} (params.yaml evaluate.bootstrap_samples)")
    y_true, y_pred = check_labels(y_true, y_pred, n_classes)
    accuracies, macro_f1s = [], []
    for start in range(0, samples, chunk):
        indices = rng.integers(0, len(y_true), size=(min(chunk, samples - start), len(y_true)))
        chunk_accuracy, chunk_macro_f1 = resampled_scores(y_true, y_pred, indices, n_classes)
        accuracies.append(chunk_accuracy)
        macro_f1s.append(chunk_macro_f1)
    accuracy_low, accuracy_high = np.percentile(np.concatenate(accuracies), [2.5, 97.5])
    f1_low, f1_high = np.percentile(np.concatenate(macro_f1s), [2.5, 97.5])
    return {
        "test_accuracy_ci95_low": float(accuracy_low),
        "test_accuracy_ci95_high": float(accuracy_high),
        "f1_macro_ci95_low": float(f1_low),
        "f1_macro_ci95_high": float(f1_high),
    }


def evaluation_metrics(y_true, y_pred, class_names, bootstrap_samples: int, rng: np.random.Generator) -> dict:
    """The flat metrics dict the evaluate stage writes and logs: every value a number."""
    class_names = list(class_names)
    n_classes = len(class_names)
    y_true, y_pred = check_labels(y_true, y_pred, n_classes)
    metrics = {"test_accuracy": accuracy(y_true, y_pred), "n_test": int(len(y_true))}
    metrics.update(averaged_scores(y_true, y_pred, n_classes))
    metrics.update(paper_equations(confusion_matrix(y_true, y_pred, n_classes)))
    metrics.update(bootstrap_intervals(y_true, y_pred, n_classes, bootstrap_samples, rng))
    for row in per_class_table(y_true, y_pred, class_names).itertuples():
        metrics[f"f1_{row.emotion}"] = float(row.f1)
    return metrics
