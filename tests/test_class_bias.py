"""The per-class logit bias fitted on validation macro-F1 (finetune.class_bias)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from sklearn.metrics import f1_score

from dlfer.model import class_bias
from dlfer.model.backbones import HEAD_LAYER


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def test_macro_f1_is_scikit_learns_including_a_class_never_seen():
    rng = np.random.default_rng(0)
    labels, predicted = rng.integers(0, 6, 500), rng.integers(0, 6, 500)  # class 6 absent from both
    assert class_bias.macro_f1(labels, predicted, 7) == pytest.approx(
        f1_score(labels, predicted, average="macro", labels=range(7), zero_division=0))


def test_fit_raises_the_class_a_model_under_predicts_and_gains_macro_f1():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 900)
    logits = rng.normal(0, 1, (900, 3)) + 2.0 * np.eye(3)[labels]
    logits[:, 2] -= 1.5  # class 2 is answered far less often than it occurs
    views = np.stack([softmax(logits), softmax(logits + rng.normal(0, 0.3, logits.shape))])
    bias, before, after = class_bias.fit_class_bias(views, labels)
    assert bias[2] - bias[:2].max() > 0.5
    assert after > before + 0.05
    assert after == pytest.approx(class_bias.macro_f1(labels, class_bias.mean_probabilities(views, bias).argmax(1), 3))
    np.testing.assert_array_equal(bias, class_bias.fit_class_bias(views, labels)[0])  # deterministic


def test_fit_leaves_a_perfect_model_alone():
    labels = np.arange(300) % 3
    views = softmax(4.0 * np.eye(3)[labels])[np.newaxis]
    bias, before, after = class_bias.fit_class_bias(views, labels)
    np.testing.assert_array_equal(bias, np.zeros(3))
    assert before == after == 1.0


def test_bias_folded_into_the_head_is_the_bias_applied_to_the_probabilities():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.Dense(7, activation="softmax", name=HEAD_LAYER)(inputs))
    features = np.random.default_rng(2).normal(size=(40, 5)).astype(np.float32)
    before = model.predict(features, verbose=0).astype(np.float64)[np.newaxis]
    bias = np.linspace(-1, 1, 7)
    class_bias.add_to_head(model, bias)
    np.testing.assert_allclose(model.predict(features, verbose=0), class_bias.mean_probabilities(before, bias),
                               atol=1e-6)
    with pytest.raises(ValueError, match="class bias has 3 values"):
        class_bias.add_to_head(model, np.zeros(3))


def test_the_accuracy_fit_follows_the_skewed_prior_further_than_the_macro_f1_fit():
    """A model trained on balanced classes, scored on a split of 60/30/10% (FER2013's happy is a quarter of it,
    disgust 1.5%): accuracy gains from answering the common class more and the rare class far less; macro-F1,
    where the rare class weighs as much as the others, does not give it up."""
    rng = np.random.default_rng(4)
    labels = rng.choice(3, 1200, p=[0.6, 0.3, 0.1])
    logits = rng.normal(0, 1, (1200, 3)) + 1.2 * np.eye(3)[labels]  # no preference between the classes
    views = softmax(logits)[np.newaxis]
    bias, before, after = class_bias.fit_class_bias(views, labels, "val_accuracy")
    assert bias[0] - bias[1:].max() > 0.3
    assert after > before + 0.02
    assert after == pytest.approx(np.mean(class_bias.mean_probabilities(views, bias).argmax(1) == labels))
    f1_bias = class_bias.fit_class_bias(views, labels, "val_macro_f1")[0]
    assert (f1_bias[2] - f1_bias[0]) - (bias[2] - bias[0]) > 0.5
