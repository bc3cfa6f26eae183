"""dlfer.evaluation.metrics against scikit-learn on fixed arrays and against cases worked by hand."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from dlfer.evaluation import metrics
from dlfer.fer2013 import EMOTIONS

# Worked by hand below: 3 classes, 5 images, 3 correct.
HAND_TRUE = np.array([0, 0, 1, 1, 2])
HAND_PRED = np.array([0, 1, 1, 1, 0])


@pytest.fixture
def noisy_labels():
    """A fixed, imbalanced 7-class problem with about 60% accuracy."""
    rng = np.random.default_rng(7)
    y_true = rng.choice(7, size=400, p=[0.14, 0.02, 0.14, 0.25, 0.17, 0.11, 0.17])
    wrong = rng.random(400) < 0.4
    y_pred = np.where(wrong, rng.integers(0, 7, size=400), y_true)
    return y_true, y_pred


def test_confusion_matrix_by_hand():
    expected = np.array([[1, 1, 0],
                         [0, 2, 0],
                         [1, 0, 0]])
    np.testing.assert_array_equal(metrics.confusion_matrix(HAND_TRUE, HAND_PRED, 3), expected)


def test_confusion_matrix_keeps_absent_classes():
    confusion = metrics.confusion_matrix([0, 0], [0, 1], 4)
    assert confusion.shape == (4, 4)
    assert confusion.sum() == 2


def test_accuracy_by_hand_and_against_sklearn(noisy_labels):
    assert metrics.accuracy(HAND_TRUE, HAND_PRED) == pytest.approx(3 / 5)
    assert metrics.accuracy(*noisy_labels) == pytest.approx(accuracy_score(*noisy_labels))


def test_averaged_scores_by_hand():
    scores = metrics.averaged_scores(HAND_TRUE, HAND_PRED, 3)
    # Class 0: P 1/2, R 1/2, F1 1/2. Class 1: P 2/3, R 1, F1 4/5. Class 2: never predicted -> P 0, R 0, F1 0.
    assert scores["precision_macro"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert scores["recall_macro"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert scores["f1_macro"] == pytest.approx((1 / 2 + 4 / 5 + 0) / 3)
    assert scores["f1_weighted"] == pytest.approx((2 * 1 / 2 + 2 * 4 / 5 + 1 * 0) / 5)
    assert scores["precision_micro"] == scores["recall_micro"] == scores["f1_micro"] == pytest.approx(3 / 5)


@pytest.mark.parametrize("average", metrics.AVERAGES)
def test_averaged_scores_match_sklearn(noisy_labels, average):
    scores = metrics.averaged_scores(*noisy_labels, 7)
    precision, recall, f1, _ = precision_recall_fscore_support(*noisy_labels, average=average, zero_division=0)
    assert scores[f"precision_{average}"] == pytest.approx(precision)
    assert scores[f"recall_{average}"] == pytest.approx(recall)
    assert scores[f"f1_{average}"] == pytest.approx(f1)


def test_paper_eq1_by_hand():
    # One-vs-rest TP+TN per class: class 0: 1+2, class 1: 2+2, class 2: 0+4 -> 11 of 3 * 5 = 15 counts.
    equations = metrics.paper_equations(metrics.confusion_matrix(HAND_TRUE, HAND_PRED, 3))
    assert equations["paper_eq1_accuracy"] == pytest.approx(11 / 15)
    # ... which is 1 - 2 * (1 - accuracy) / n_classes, not the accuracy of 3/5.
    assert equations["paper_eq1_accuracy"] == pytest.approx(1 - 2 * (1 - 3 / 5) / 3)


def test_paper_eq2_to_eq4_are_micro_averages_equal_to_accuracy(noisy_labels):
    y_true, y_pred = noisy_labels
    equations = metrics.paper_equations(metrics.confusion_matrix(y_true, y_pred, 7))
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, average="micro")
    assert equations["paper_eq2_precision"] == pytest.approx(precision)
    assert equations["paper_eq3_recall"] == pytest.approx(recall)
    assert equations["paper_eq4_f1"] == pytest.approx(f1)
    assert equations["paper_eq4_f1"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert equations["paper_eq1_accuracy"] == pytest.approx(1 - 2 * (1 - accuracy_score(y_true, y_pred)) / 7)


def test_paper_equations_reject_a_bad_matrix():
    with pytest.raises(ValueError, match="square"):
        metrics.paper_equations(np.ones((2, 3)))


def test_per_class_table_matches_sklearn(noisy_labels):
    table = metrics.per_class_table(*noisy_labels, EMOTIONS)
    precision, recall, f1, support = precision_recall_fscore_support(*noisy_labels, labels=range(7), zero_division=0)
    assert list(table["emotion"]) == list(EMOTIONS)
    np.testing.assert_allclose(table["precision"], precision)
    np.testing.assert_allclose(table["recall"], recall)
    np.testing.assert_allclose(table["f1"], f1)
    np.testing.assert_array_equal(table["support"], support)


def test_per_class_table_lists_a_class_absent_from_the_data():
    table = metrics.per_class_table(HAND_TRUE, HAND_PRED, ["a", "b", "c", "d"])
    assert list(table["support"]) == [2, 2, 1, 0]
    assert table.loc[3, "f1"] == 0.0


def test_resampled_scores_match_sklearn_per_resample(noisy_labels):
    y_true, y_pred = noisy_labels
    rng = np.random.default_rng(3)
    # Small resamples, so some leave classes out and the "present classes" rule is exercised.
    indices = rng.integers(0, len(y_true), size=(25, 12))
    accuracies, macro_f1s = metrics.resampled_scores(y_true, y_pred, indices, 7)
    for row, resample in enumerate(indices):
        assert accuracies[row] == pytest.approx(accuracy_score(y_true[resample], y_pred[resample]))
        assert macro_f1s[row] == pytest.approx(f1_score(y_true[resample], y_pred[resample], average="macro",
                                                        zero_division=0))


def test_bootstrap_intervals_match_a_plain_sklearn_loop(noisy_labels):
    y_true, y_pred = noisy_labels
    intervals = metrics.bootstrap_intervals(y_true, y_pred, 7, samples=150, rng=np.random.default_rng(11), chunk=150)
    indices = np.random.default_rng(11).integers(0, len(y_true), size=(150, len(y_true)))
    accuracies = [accuracy_score(y_true[i], y_pred[i]) for i in indices]
    macro_f1s = [f1_score(y_true[i], y_pred[i], average="macro", zero_division=0) for i in indices]
    assert intervals["test_accuracy_ci95_low"] == pytest.approx(np.percentile(accuracies, 2.5))
    assert intervals["test_accuracy_ci95_high"] == pytest.approx(np.percentile(accuracies, 97.5))
    assert intervals["f1_macro_ci95_low"] == pytest.approx(np.percentile(macro_f1s, 2.5))
    assert intervals["f1_macro_ci95_high"] == pytest.approx(np.percentile(macro_f1s, 97.5))


def test_bootstrap_intervals_bracket_the_estimate_and_narrow_with_more_data(noisy_labels):
    y_true, y_pred = noisy_labels
    small = metrics.bootstrap_intervals(y_true[:100], y_pred[:100], 7, 300, np.random.default_rng(0))
    large = metrics.bootstrap_intervals(np.tile(y_true, 8), np.tile(y_pred, 8), 7, 300, np.random.default_rng(0))
    point = metrics.accuracy(y_true[:100], y_pred[:100])
    assert small["test_accuracy_ci95_low"] < point < small["test_accuracy_ci95_high"]
    small_width = small["test_accuracy_ci95_high"] - small["test_accuracy_ci95_low"]
    large_width = large["test_accuracy_ci95_high"] - large["test_accuracy_ci95_low"]
    assert large_width < small_width / 2


def test_bootstrap_of_a_perfect_classifier_is_a_point():
    labels = np.arange(7).repeat(5)
    intervals = metrics.bootstrap_intervals(labels, labels, 7, 50, np.random.default_rng(0))
    assert intervals["test_accuracy_ci95_low"] == intervals["test_accuracy_ci95_high"] == 1.0
    assert intervals["f1_macro_ci95_low"] == 1.0


def test_bootstrap_rejects_zero_samples():
    with pytest.raises(ValueError, match="bootstrap_samples"):
        metrics.bootstrap_intervals(HAND_TRUE, HAND_PRED, 3, 0, np.random.default_rng(0))


@pytest.mark.parametrize("y_true, y_pred, message", [
    ([0, 1], [0], "2 labels"),
    ([0, 9], [0, 1], "outside"),
    ([0.0, 1.0], [0, 1], "integer"),
    ([], [], "empty"),
])
def test_bad_labels_are_rejected(y_true, y_pred, message):
    with pytest.raises(ValueError, match=message):
        metrics.averaged_scores(np.array(y_true), np.array(y_pred), 7)


def test_evaluation_metrics_is_flat_numbers_with_per_class_f1(noisy_labels):
    y_true, y_pred = noisy_labels
    result = metrics.evaluation_metrics(y_true, y_pred, EMOTIONS, 50, np.random.default_rng(0))
    assert all(isinstance(value, (int, float)) for value in result.values())
    assert result["n_test"] == len(y_true)
    assert result["test_accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert result["f1_disgust"] == pytest.approx(f1_score(y_true, y_pred, labels=[1], average=None)[0])
    for key in ("f1_macro_ci95_low", "paper_eq1_accuracy", "precision_weighted", "recall_micro"):
        assert key in result
