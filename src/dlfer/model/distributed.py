"""Multi-worker training (distribution: multi_worker) with a custom loop, because model.fit cannot do it.

Keras 3's model.fit fails under MultiWorkerMirroredStrategy ("Attempt to convert a value
(PerReplica...)": keras-team/keras#20585). This module trains the same model the same way without
it: the optimizer and loss of train.compile_model, train.Progress for per-epoch records, best
weights, early stopping, the time budget, MLflow and ReduceLROnPlateau for lr_schedule=plateau,
all driven by hand around a tf.function train step run with strategy.run.

Every worker runs this loop on the same arrays. Collective operations block until all workers
join them, so each worker must run the same number of steps: the batches are full (the last partial
batch of an epoch is dropped), each worker keeps its share of every global batch, and any decision
to stop is agreed by all workers before it takes effect.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from dlfer.model import train


def fit(build_model: Callable[[], keras.Model], train_split: tuple[np.ndarray, np.ndarray],
        val_split: tuple[np.ndarray, np.ndarray], settings: train.TrainingSettings, checkpoint_dir: str | Path,
        num_classes: int, *, runtime: tuple[tf.distribute.Strategy, dict] | None = None,
        log_to_mlflow: bool = False, callbacks: tuple = (), verbose: int | None = None) -> train.FitResult:
    """Train with what the strategy needs: this module's loop under MultiWorkerMirroredStrategy, else
    train.fit_classifier (model.fit, one device or MirroredStrategy). The stages call this."""
    strategy, runtime_facts = runtime or train.configure_runtime(settings)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return train.fit_classifier(build_model, train_split, val_split, settings, checkpoint_dir, num_classes,
                                    runtime=(strategy, runtime_facts), log_to_mlflow=log_to_mlflow,
                                    callbacks=callbacks, verbose=verbose)
    if callbacks:
        raise ValueError("Keras callbacks are not supported with distribution: multi_worker")
    return fit_multi_worker(build_model, train_split, val_split, settings, checkpoint_dir, num_classes,
                            strategy=strategy, runtime=runtime_facts, log_to_mlflow=log_to_mlflow,
                            verbose=2 if verbose is None else verbose)


def fit_multi_worker(build_model: Callable[[], keras.Model], train_split: tuple[np.ndarray, np.ndarray],
                     val_split: tuple[np.ndarray, np.ndarray], settings: train.TrainingSettings,
                     checkpoint_dir: str | Path, num_classes: int, *, strategy: tf.distribute.Strategy,
                     runtime: dict, log_to_mlflow: bool = False, verbose: int = 2) -> train.FitResult:
    """train.fit_classifier for MultiWorkerMirroredStrategy: the same settings and the same result.

    settings.batch_size is the global batch, split between the workers, so the learning rate means
    what it means on one machine. Only the chief writes checkpoint_dir and logs to MLflow; the
    others keep their best weights in a temporary folder. A killed run starts again from epoch 1:
    this loop keeps no resumable backup.
    """
    images, labels = train_split
    steps_per_epoch = len(images) // settings.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"multi_worker training needs at least batch_size={settings.batch_size} training "
                         f"images, got {len(images)}")
    checkpoint_dir = Path(checkpoint_dir) if train.is_chief() else Path(tempfile.mkdtemp(prefix="dlfer-worker-"))
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    train.empty_directory(checkpoint_dir)  # no backup to resume from, so older records would only mislead
    with strategy.scope():
        model = build_model()
        train.compile_model(model, settings, steps_per_epoch)
        model.optimizer.build(model.trainable_variables)  # its variables too must be made under the scope
    class_weights = (train.balanced_class_weights(labels, num_classes) if settings.class_weights == "balanced"
                     else None)
    step = _StepFunctions(model, settings, strategy, class_weights)
    # All epochs in one dataset, each in its own order (train.epoch_order), read through one iterator.
    train_batches = iter(_distribute(strategy, train.make_dataset(
        images, labels, settings.batch_size, num_classes, shuffle_seed=settings.seed, drop_remainder=True,
        epochs=range(settings.epochs), augmentation=settings.online_augmentation)))
    val_batches = _distribute(strategy, train.make_dataset(*val_split, settings.batch_size, num_classes))

    progress = train.Progress(checkpoint_dir, settings, len(images), log_to_mlflow and train.is_chief(), {},
                               plateau=train.plateau_callback(settings))
    callbacks = keras.callbacks.CallbackList([progress], model=model)
    model.stop_training = False
    callbacks.on_train_begin()
    for epoch in range(settings.epochs):
        callbacks.on_epoch_begin(epoch)
        loss_sum = correct = seen = 0.0
        for batch_index in range(steps_per_epoch):
            batch_loss, batch_correct = step.train_batch(next(train_batches))
            loss_sum += float(batch_loss)
            correct += float(batch_correct)
            seen += 1
            callbacks.on_train_batch_end(batch_index)  # may stop on this worker's clock ...
            if _agree_to_stop(step, progress, model):  # ... which only counts once every worker knows
                break
        callbacks.on_test_begin()
        step.average_moving_statistics()
        val_loss, val_accuracy = step.evaluate(val_batches)
        logs = {"accuracy": correct / (seen * settings.batch_size), "loss": loss_sum / seen,
                "val_accuracy": val_accuracy, "val_loss": val_loss}
        callbacks.on_epoch_end(epoch, logs)
        if verbose and train.is_chief():
            print(f"Epoch {epoch + 1}/{settings.epochs} - " + " - ".join(f"{k}: {v:.4f}" for k, v in logs.items()),
                  flush=True)
        if _agree_to_stop(step, progress, model):
            break
    callbacks.on_train_end()
    if progress.best_epoch is None:
        raise RuntimeError(f"training ran no epoch (epochs={settings.epochs}); set epochs >= 1")

    # The trained model keeps the strategy it was built under (Keras records it), so the chief's
    # predict would run through the strategy alone: the path that fails in fit, with collectives
    # no other worker joins. The caller gets the same network, best weights, outside the strategy.
    best = build_model()
    train.compile_model(best, settings, steps_per_epoch)
    best.optimizer.build(best.trainable_variables)
    best.load_weights(progress.best_path)
    result = train.FitResult(model=best, history=progress.history, best_epoch=progress.best_epoch,
                             stopped_by=progress.stopped_by, resumed_at_epoch=0, seconds=progress.seconds,
                             train_images_per_second=progress.images_per_second(), runtime=runtime)
    train.empty_directory(checkpoint_dir)
    return result


def _distribute(strategy: tf.distribute.Strategy, dataset: tf.data.Dataset) -> tf.distribute.DistributedDataset:
    """The dataset split between workers: each reads every global batch and keeps its own part.

    The arrays are in memory, so there are no files to share out (the default policy's first
    try); DATA sharding gives each worker its slice of each batch. Every worker shuffles with the
    same seed, so together they see every image once per epoch.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(dataset.with_options(options))


def _agree_to_stop(step: "_StepFunctions", progress: train.Progress, model: keras.Model) -> bool:
    """Whether any worker wants to stop; then all do, at the same step.

    Early stopping depends on validation metrics, which are identical on every worker; the time
    budget depends on each worker's clock, so a worker may learn of it from another.
    """
    model.stop_training = step.any_worker(model.stop_training)
    if model.stop_training and progress.stopped_by == "epochs":
        progress.stopped_by = "max_seconds"
    return model.stop_training


class _StepFunctions:
    """The strategy's compiled functions for one model: a train step, validation and agreement."""

    def __init__(self, model: keras.Model, settings: train.TrainingSettings, strategy: tf.distribute.Strategy,
                 class_weights: dict[int, float] | None):
        self.model = model
        self.strategy = strategy
        self.global_batch_size = settings.batch_size
        # The compiled loss, unreduced: the loop divides by the global batch itself.
        self.per_example_loss = type(model.loss).from_config({**model.loss.get_config(), "reduction": None})
        self.class_weights = (None if class_weights is None else
                              tf.constant([class_weights[label] for label in sorted(class_weights)], tf.float32))
        # Batch statistics are each worker's own: moving means and variances drift apart unless averaged.
        self.moving_statistics = [variable for variable in model.non_trainable_variables
                                  if keras.backend.is_float_dtype(variable.dtype)]

    @tf.function
    def train_batch(self, batch):
        """One optimizer step on a global batch: (its mean loss, how many it classified right)."""
        loss, correct = self.strategy.run(self._replica_train, args=batch)
        return (self.strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
                self.strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None))

    def _replica_train(self, images, labels):
        with tf.GradientTape() as tape:
            probabilities = self.model(images, training=True)
            per_example = self.per_example_loss(labels, probabilities)
            if self.class_weights is not None:
                # What fit's class_weight does: weight each image's loss, still divide by the batch size.
                per_example *= tf.gather(self.class_weights, tf.argmax(labels, axis=1))
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=self.global_batch_size)
            if self.model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(self.model.losses))
        gradients = tape.gradient(loss, self.model.trainable_variables)
        # Keras sums the gradients of all replicas before applying them; each replica's loss is
        # already divided by the global batch, so the sum is the global mean's gradient.
        self.model.optimizer.apply_gradients(zip(gradients, self.model.trainable_variables))
        return loss, _count_correct(labels, probabilities)

    def evaluate(self, batches) -> tuple[float, float]:
        """(Mean loss, accuracy) on the whole validation split, all workers' shares together."""
        loss_sum = correct = count = 0.0
        for batch in batches:
            batch_loss, batch_correct, batch_count = self._evaluate_batch(batch)
            loss_sum += float(batch_loss)
            correct += float(batch_correct)
            count += float(batch_count)
        return loss_sum / count, correct / count

    @tf.function
    def _evaluate_batch(self, batch):
        def replica_evaluate(images, labels):
            probabilities = self.model(images, training=False)
            return (tf.reduce_sum(self.per_example_loss(labels, probabilities)), _count_correct(labels, probabilities),
                    tf.cast(tf.shape(images)[0], tf.float32))

        per_replica = self.strategy.run(replica_evaluate, args=batch)
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    @tf.function
    def average_moving_statistics(self):
        """Give every worker the mean of all workers' moving statistics, so all validate and save one model."""
        if not self.moving_statistics:
            return
        local = self.strategy.run(lambda: [tf.identity(variable.value) for variable in self.moving_statistics])
        for variable, values in zip(self.moving_statistics, local):
            variable.assign(self.strategy.reduce(tf.distribute.ReduceOp.MEAN, values, axis=None))

    def any_worker(self, flag: bool) -> bool:
        return bool(self._count_votes(tf.constant(int(flag))) > 0)

    @tf.function
    def _count_votes(self, vote):
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, self.strategy.run(tf.identity, args=(vote,)),
                                    axis=None)


def _count_correct(labels, probabilities):
    return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(labels, axis=1), tf.argmax(probabilities, axis=1)), tf.float32))
