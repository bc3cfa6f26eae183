"""fit_classifier on a toy Keras model: determinism, resumption, best epoch, stopping rules, losses."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from dlfer import train

CLASSES = 7


def separable_faces(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise images whose brightness tells the class: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % CLASSES
    images = rng.integers(0, 60, (count, 48, 48)) + 30 * labels[:, None, None]
    return images.astype(np.uint8), labels.astype(np.int64)


def toy_classifier() -> keras.Model:
    pixels = keras.Input((48, 48, 1))
    x = keras.layers.Rescaling(1 / 255)(pixels)
    x = keras.layers.Conv2D(8, 3, strides=3, activation="relu")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(pixels, keras.layers.Dense(CLASSES, activation="softmax")(x))


def settings(**overrides) -> train.TrainingSettings:
    return train.TrainingSettings(**{"epochs": 3, "batch_size": 16, "learning_rate": 0.01, "seed": 7, **overrides})


TRAIN = separable_faces(96, seed=0)
VAL = separable_faces(35, seed=1)


def fit(tmp_path, **overrides) -> train.FitResult:
    return train.fit_classifier(toy_classifier, TRAIN, VAL, settings(**overrides), tmp_path / "checkpoint",
                                CLASSES, verbose=0)


def scores(history: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "seconds"} for row in history]


def test_dataset_casts_batches_one_hot_and_shuffles_by_seed():
    images, labels = TRAIN
    batches = list(train.make_dataset(images, labels, 32, CLASSES, shuffle_seed=3))
    first_images, first_labels = batches[0]
    assert first_images.shape == (32, 48, 48, 1) and first_images.dtype.name == "float32"
    assert first_labels.shape == (32, CLASSES) and float(first_labels.numpy().sum()) == 32
    again = next(iter(train.make_dataset(images, labels, 32, CLASSES, shuffle_seed=3)))[1]
    np.testing.assert_array_equal(first_labels, again)
    ordered = next(iter(train.make_dataset(images, labels, 32, CLASSES)))[1]
    np.testing.assert_array_equal(ordered.numpy().argmax(axis=1), labels[:32])
    assert not np.array_equal(first_labels.numpy().argmax(axis=1), labels[:32])


def test_balanced_class_weights_equalise_the_classes():
    weights = train.balanced_class_weights(np.array([0, 0, 0, 1]), 3)
    assert weights == {0: 4 / 9, 1: 4 / 3, 2: 0.0}


def test_two_cpu_runs_with_one_seed_give_identical_metrics(tmp_path):
    first = train.fit_classifier(toy_classifier, TRAIN, VAL, settings(), tmp_path / "a", CLASSES, verbose=0)
    second = train.fit_classifier(toy_classifier, TRAIN, VAL, settings(), tmp_path / "b", CLASSES, verbose=0)
    assert first.runtime["deterministic"]
    assert scores(first.history) == scores(second.history)
    assert first.history[-1]["accuracy"] > 0.3  # it learned something, so equality is not trivial
    for a, b in zip(first.model.get_weights(), second.model.get_weights()):
        np.testing.assert_array_equal(a, b)


class _Crash(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise RuntimeError("killed after the first epoch")


class _EpochsSeen(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []
        self.optimizer_steps = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch + 1)
        self.optimizer_steps.append(int(self.model.optimizer.iterations))


def test_an_interrupted_fit_resumes_at_its_next_epoch(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    with pytest.raises(RuntimeError, match="killed"):
        train.fit_classifier(toy_classifier, TRAIN, VAL, settings(), checkpoint, CLASSES, verbose=0,
                             callbacks=(_Crash(),))
    first_epoch = json.loads((checkpoint / "progress.json").read_text())["history"][0]
    seen = _EpochsSeen()
    resumed = train.fit_classifier(toy_classifier, TRAIN, VAL, settings(), checkpoint, CLASSES, verbose=0,
                                   callbacks=(seen,))
    assert seen.epochs == [2, 3]
    assert resumed.resumed_at_epoch == 1 and resumed.epochs_run == 3
    assert resumed.history[0] == first_epoch
    assert seen.optimizer_steps[0] == -(-len(TRAIN[0]) // 16)  # Adam's state came back with the weights
    assert list(checkpoint.iterdir()) == []  # a finished run leaves nothing to resume


class _ZeroWeightsAtEpoch3(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            self.model.set_weights([np.zeros_like(w) for w in self.model.get_weights()])


def test_the_best_epochs_weights_come_back_not_the_last(tmp_path):
    result = train.fit_classifier(toy_classifier, TRAIN, VAL, settings(monitor="val_loss"), tmp_path / "c",
                                  CLASSES, verbose=0, callbacks=(_ZeroWeightsAtEpoch3(),))
    assert result.best_epoch in (1, 2)
    assert result.history[2]["val_loss"] > result.best["val_loss"]
    val_loss, _ = result.model.evaluate(train.make_dataset(*VAL, 16, CLASSES), verbose=0)
    assert val_loss == pytest.approx(result.best["val_loss"], rel=1e-5)


def test_patience_stops_when_validation_stops_improving(tmp_path):
    result = fit(tmp_path, epochs=6, learning_rate=0.0, early_stopping_patience=2)
    assert result.stopped_by == "early_stopping" and result.epochs_run == 3 and result.best_epoch == 1


def test_time_budget_stops_even_inside_an_epoch(tmp_path):
    result = fit(tmp_path, epochs=5, max_seconds=1e-6)
    assert result.stopped_by == "max_seconds" and result.epochs_run == 1
    assert result.history[0]["images"] == 16 and "val_accuracy" in result.history[0]


def test_binary_crossentropy_still_reports_categorical_accuracy(tmp_path):
    result = fit(tmp_path, epochs=1, loss="binary_crossentropy", label_smoothing=0.1)
    predicted = result.model.predict(VAL[0][..., None].astype("float32"), verbose=0).argmax(axis=1)
    # Keras' plain "accuracy" would turn binary here and score about 6/7 for any model.
    assert result.history[0]["val_accuracy"] == pytest.approx(float((predicted == VAL[1]).mean()))


@pytest.mark.parametrize("schedule", ["cosine", "plateau"])
def test_learning_rate_schedules_and_sgd(tmp_path, schedule):
    result = fit(tmp_path, epochs=2, lr_schedule=schedule, optimizer="sgd", beta_1=0.9)
    rates = [row["learning_rate"] for row in result.history]
    assert rates[0] <= 0.01 and (rates[1] < rates[0] if schedule == "cosine" else rates[1] <= rates[0])


def test_checkpoints_are_keyed_so_a_params_change_starts_fresh(tmp_path):
    first = train.keyed_checkpoint_dir(tmp_path, {"finetune": {"learning_rate": 0.001}})
    first.mkdir()
    assert train.keyed_checkpoint_dir(tmp_path, {"finetune": {"learning_rate": 0.001}}) == first
    second = train.keyed_checkpoint_dir(tmp_path, {"finetune": {"learning_rate": 0.01}})
    assert second != first and not first.exists()


def test_mirrored_distribution_trains_through_model_fit_under_the_strategy(tmp_path):
    """distribution: mirrored (several GPUs on one machine) on this CPU-only machine: one replica, same path."""
    result = fit(tmp_path, epochs=2, distribution="mirrored")
    assert result.runtime["strategy"] == "MirroredStrategy" and result.runtime["replicas"] >= 1
    assert result.epochs_run == 2 and result.history[-1]["val_accuracy"] > 1 / CLASSES
    predicted = result.model.predict(VAL[0][..., None].astype("float32"), verbose=0).argmax(axis=1)
    assert float((predicted == VAL[1]).mean()) == pytest.approx(result.best["val_accuracy"])
