"""fit_classifier on a toy Keras model: determinism, resumption, best epoch, stopping rules, losses."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from dlfer.model import train

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
    x = keras.layers.Dropout(0.2)(x)  # random state that a resumed fit must restore
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


def test_each_epoch_has_its_own_order_whatever_epoch_the_dataset_starts_at():
    images, labels = np.arange(10, dtype=np.uint8).reshape(10, 1, 1).repeat(48, 1).repeat(48, 2), np.arange(10)

    def epochs_seen(epochs):
        batches = [batch_labels.numpy().argmax(axis=1)
                   for _, batch_labels in train.make_dataset(images, labels, 4, 10, shuffle_seed=3, epochs=epochs)]
        assert [len(batch) for batch in batches] == [4, 4, 2] * len(epochs)  # each epoch has its own last batch
        return np.concatenate(batches).reshape(len(epochs), 10)

    three = epochs_seen(range(3))
    assert all(sorted(epoch) == list(range(10)) for epoch in three)
    assert len({tuple(epoch) for epoch in three}) == 3
    # A fit resumed at epoch 2 sees epoch 2 as a run that never stopped sees it.
    np.testing.assert_array_equal(epochs_seen(range(2, 3))[0], three[2])
    np.testing.assert_array_equal(three[1], train.epoch_order(3, 1, 10))


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


class _CrashAfterEpoch(keras.callbacks.Callback):
    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            raise RuntimeError(f"killed after epoch {self.epoch}")


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


@pytest.mark.parametrize("schedule", ["cosine", "plateau"])
def test_a_resumed_fit_ends_exactly_where_an_uninterrupted_one_ends(tmp_path, schedule):
    """Data order, dropout's random state, the optimizer, the schedule: all continue as if never stopped (issue 12)."""
    run = settings(epochs=4, lr_schedule=schedule, learning_rate=0.05)
    uninterrupted = train.fit_classifier(toy_classifier, TRAIN, VAL, run, tmp_path / "a", CLASSES, verbose=0)
    if schedule == "plateau":
        # The plateau's counters must survive the restart for this rate to fall where it does.
        rates = [row["learning_rate"] for row in uninterrupted.history]
        assert rates == pytest.approx([0.05, 0.05, 0.05, 0.025])
    checkpoint = tmp_path / "b"
    with pytest.raises(RuntimeError, match="killed"):
        train.fit_classifier(toy_classifier, TRAIN, VAL, run, checkpoint, CLASSES, verbose=0,
                             callbacks=(_CrashAfterEpoch(2),))
    # What a kill during epoch 3, after its weights were saved and before its commit, would leave.
    (checkpoint / "epoch3.weights.h5").write_bytes(b"half-written")
    (checkpoint / ".progress.json.x.partial").write_text("{")
    resumed = train.fit_classifier(toy_classifier, TRAIN, VAL, run, checkpoint, CLASSES, verbose=0)
    assert resumed.resumed_at_epoch == 2
    assert scores(resumed.history) == scores(uninterrupted.history)
    assert resumed.best_epoch == uninterrupted.best_epoch
    for got, want in zip(resumed.model.get_weights(), uninterrupted.model.get_weights()):
        np.testing.assert_array_equal(got, want)


def test_a_run_that_had_stopped_early_is_not_trained_further(tmp_path):
    run = settings(epochs=5, learning_rate=0.0, early_stopping_patience=1)
    checkpoint = tmp_path / "checkpoint"
    with pytest.raises(RuntimeError, match="killed"):
        train.fit_classifier(toy_classifier, TRAIN, VAL, run, checkpoint, CLASSES, verbose=0,
                             callbacks=(_CrashAfterEpoch(2),))
    seen = _EpochsSeen()
    resumed = train.fit_classifier(toy_classifier, TRAIN, VAL, run, checkpoint, CLASSES, verbose=0, callbacks=(seen,))
    assert seen.epochs == [] and resumed.epochs_run == 2 and resumed.stopped_by == "early_stopping"
    assert resumed.best_epoch == 1 and list(checkpoint.iterdir()) == []


def test_a_checkpoint_folder_of_an_older_layout_starts_afresh(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    (checkpoint / "backup").mkdir(parents=True)
    (checkpoint / "backup" / "training_metadata.json").write_text('{"epoch": 1, "batch": 0}')
    (checkpoint / "progress.json").write_text(json.dumps({"history": [{"epoch": 1, "val_accuracy": 0.9}],
                                                         "best_epoch": 1, "seconds": 5.0}))
    seen = _EpochsSeen()
    result = train.fit_classifier(toy_classifier, TRAIN, VAL, settings(epochs=2), checkpoint, CLASSES, verbose=0,
                                  callbacks=(seen,))
    assert seen.epochs == [1, 2] and result.resumed_at_epoch == 0 and result.epochs_run == 2


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
    # A rate too small to move validation accuracy: the plateau is certain, and patience 2 halves
    # the rate after the third epoch; the cosine rate falls at every epoch whatever the model does.
    result = fit(tmp_path, epochs=4, lr_schedule=schedule, optimizer="sgd", beta_1=0.9, learning_rate=1e-6)
    rates = [row["learning_rate"] for row in result.history]
    if schedule == "plateau":
        assert train.PLATEAU_PATIENCE == 2 and rates == pytest.approx([1e-6, 1e-6, 1e-6, 1e-6 * train.PLATEAU_FACTOR])
    else:
        assert rates[0] <= 1e-6 and all(later < earlier for earlier, later in zip(rates, rates[1:]))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_weight_decay_shrinks_kernels_by_rate_times_decay_and_leaves_biases_and_batch_norm_alone(optimizer):
    # A zero gradient moves nothing in Adam or SGD, so whatever changes is the decay alone.
    model = toy_classifier()
    rng = np.random.default_rng(0)
    for variable in model.trainable_variables:  # no zero bias or unit scale that any factor would keep
        variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype("float32"))
    before = {variable.path: np.array(variable) for variable in model.trainable_variables}
    rate, decay = 0.01, 0.5
    step = train._optimizer(settings(optimizer=optimizer, learning_rate=rate, weight_decay=decay), steps_per_epoch=6)
    step.apply_gradients([(keras.ops.zeros_like(variable), variable) for variable in model.trainable_variables])
    for variable in model.trainable_variables:
        kept = variable.name in train.NOT_DECAYED
        expected = before[variable.path] * (1 if kept else 1 - rate * decay)
        np.testing.assert_allclose(np.array(variable), expected, rtol=1e-6, err_msg=variable.path)
    assert {variable.name for variable in model.trainable_variables} == {"kernel", "bias", "gamma", "beta"}


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


def test_online_augmentation_is_a_function_of_seed_epoch_and_batch():
    augmentation = train.OnlineAugmentation(flip=0.5, shift=0.1, rotation=10, zoom=0.1)
    images, labels = TRAIN

    def batches(epochs, **extra):
        dataset = train.make_dataset(images, labels, 16, CLASSES, shuffle_seed=3, epochs=epochs, **extra)
        return [inputs.numpy() for inputs, _ in dataset]

    both = batches(range(2), augmentation=augmentation)
    assert all(np.array_equal(a, b) for a, b in zip(both, batches(range(2), augmentation=augmentation)))
    # A run resumed at epoch 1 sees the transforms an uninterrupted one saw there.
    assert all(np.array_equal(a, b) for a, b in zip(both[6:], batches(range(1, 2), augmentation=augmentation)))
    plain = batches(range(2))
    assert not any(np.array_equal(a, b) for a, b in zip(both, plain))
    mirror_only = batches(range(1), augmentation=train.OnlineAugmentation(flip=1.0, shift=0, rotation=0, zoom=0))
    assert all(np.array_equal(a[:, :, ::-1], b) for a, b in zip(plain[:6], mirror_only))
    assert train.OnlineAugmentation(0, 0, 0, 0).active is False and settings().online_augmentation is None


def test_progress_within_the_epoch_in_a_terminal_and_one_line_per_epoch_in_a_log(tmp_path):
    import os
    import pty
    import subprocess
    import sys
    from pathlib import Path

    script = ("import sys; from test_train import *; "
              "train.fit_classifier(toy_classifier, TRAIN, VAL, settings(epochs=1), sys.argv[1], CLASSES)")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                                os.environ.get("PYTHONPATH", "")])}

    def output(terminal: bool, folder: str) -> str:
        command = [sys.executable, "-c", script, str(tmp_path / folder)]
        if not terminal:
            return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300).stdout
        leader, follower = pty.openpty()
        process = subprocess.Popen(command, stdout=follower, stderr=subprocess.DEVNULL, env=environment)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        process.wait(timeout=300)
        os.close(leader)
        return b"".join(chunks).decode(errors="replace")

    in_terminal, in_log = output(True, "tty"), output(False, "log")
    assert "━" in in_terminal and "6/6" in in_terminal  # Keras' bar: steps done of the epoch's 6
    assert "━" not in in_log and "6/6 - " in in_log     # one line per epoch
