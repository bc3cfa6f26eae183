"""Training on several machines through Ray Train (finetune.distribution: ray), and the loop it runs.

Ray Train's TensorflowTrainer places the workers (a local Ray instance, or a cluster at ray_address),
sets TF_CONFIG in each for MultiWorkerMirroredStrategy, restarts them from the last reported
checkpoint when one fails (FailureConfig) and keeps the checkpoints (storage_path). Each worker runs
fit_multi_worker, a custom loop: Keras 3's model.fit fails under MultiWorkerMirroredStrategy
("Attempt to convert a value (PerReplica...)": keras-team/keras#20585), and so does Ray's own Keras
example (ray-project/ray#47464). The loop trains the model the way train.fit_classifier does: its
optimizer and loss (train.compile_model), train.Progress for per-epoch records, best weights, early
stopping, the time budget, the resumable state of the last finished epoch and ReduceLROnPlateau for
lr_schedule=plateau, all driven by hand around a tf.function train step run with strategy.run. One
worker and N workers take the same path.

Every worker runs the loop on the same arrays. Collective operations block until all workers join
them, so each worker must run the same number of steps: the batches are full (the last partial batch
of an epoch is dropped), each worker keeps its share of every global batch (finetune.batch_size is
the global batch: each of N workers computes batch_size / N images per step), and any decision to
stop is agreed by all workers before it takes effect.

Everything else (mixed precision aside) stays as on one machine: a single process trains through
model.fit (train.fit_classifier), and several GPUs of one machine through MirroredStrategy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from dlfer.files import read_json
from dlfer.model import cpu_kernels, train


@dataclasses.dataclass(frozen=True)
class RaySettings:
    """Where and how wide a Ray run trains (the finetune.ray_* params)."""

    workers: int             # training processes; finetune.batch_size is split between them
    cpus_per_worker: float
    gpus_per_worker: float
    address: str             # "": a local Ray instance started here; else a cluster (ray://host:10001, auto)
    storage: str             # "": the stage's checkpoint folder; on a cluster a path every node sees (NFS, s3://)
    max_failures: int        # worker-group restarts from the last checkpoint before the run fails

    @classmethod
    def from_params(cls, section) -> "RaySettings":
        return cls(workers=section.ray_workers, cpus_per_worker=section.ray_cpus_per_worker,
                   gpus_per_worker=section.ray_gpus_per_worker, address=section.ray_address,
                   storage=section.ray_storage, max_failures=section.ray_max_failures)


def fit(build_model: Callable[[], keras.Model], train_split: tuple[np.ndarray, np.ndarray],
        val_split: tuple[np.ndarray, np.ndarray], settings: train.TrainingSettings, checkpoint_dir: str | Path,
        num_classes: int, *, runtime: tuple[tf.distribute.Strategy, dict] | None = None,
        ray: RaySettings | None = None, log_to_mlflow: bool = False, callbacks: tuple = (),
        verbose: int | None = None) -> train.FitResult:
    """Train where the params say: on Ray (distribution: ray), else train.fit_classifier (model.fit, one
    device or MirroredStrategy). The stages call this."""
    if settings.distribution != "ray":
        return train.fit_classifier(build_model, train_split, val_split, settings, checkpoint_dir, num_classes,
                                    runtime=runtime, log_to_mlflow=log_to_mlflow, callbacks=callbacks,
                                    verbose=verbose)
    if callbacks:
        raise ValueError("Keras callbacks are not supported with distribution: ray")
    if ray is None:
        raise ValueError("distribution: ray needs the finetune.ray_* params (RaySettings)")
    runtime = runtime or train.configure_runtime(settings)  # seeds the initial model built below
    return fit_on_ray(build_model, train_split, val_split, settings, checkpoint_dir, num_classes, ray,
                      runtime=runtime[1], log_to_mlflow=log_to_mlflow)


def fit_on_ray(build_model: Callable[[], keras.Model], train_split: tuple[np.ndarray, np.ndarray],
               val_split: tuple[np.ndarray, np.ndarray], settings: train.TrainingSettings,
               checkpoint_dir: str | Path, num_classes: int, ray_settings: RaySettings, *, runtime: dict,
               log_to_mlflow: bool = False) -> train.FitResult:
    """Train on Ray Train's workers and return the best epoch's model, as train.fit_classifier does.

    The initial network (EF-FER1's weights or random ones, from the seed) is built here once and
    shipped to the workers as a .keras file's bytes, with the arrays, through Ray's object store:
    nothing needs to be on a worker's disk but dlfer itself. Per-epoch metrics reach MLflow from here
    (one run: the stage's), read from the last checkpoint, which holds every epoch's record.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    model = build_model()
    initial = Path(tempfile.mkdtemp(prefix="dlfer-ray-")) / "initial.keras"
    model.save(initial)
    storage = ray_settings.storage or str(Path(checkpoint_dir, "ray").resolve())
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=ray_settings.address or None, log_to_driver=True, configure_logging=False)
    print(f"training on Ray ({ray_settings.address or 'local instance'}): {ray_settings.workers} worker(s) x "
          f"{ray_settings.cpus_per_worker:g} CPU, {ray_settings.gpus_per_worker:g} GPU; global batch "
          f"{settings.batch_size}; checkpoints in {storage}", flush=True)
    try:
        trainer = TensorflowTrainer(
            _ray_worker,
            train_loop_config={"initial": initial.read_bytes(), "train": ray.put(train_split),
                               "val": ray.put(val_split), "settings": settings, "num_classes": num_classes,
                               "cpus_per_worker": ray_settings.cpus_per_worker},
            scaling_config=ScalingConfig(num_workers=ray_settings.workers, use_gpu=ray_settings.gpus_per_worker > 0,
                                         resources_per_worker={"CPU": ray_settings.cpus_per_worker,
                                                               **({"GPU": ray_settings.gpus_per_worker}
                                                                  if ray_settings.gpus_per_worker else {})}),
            run_config=RunConfig(name=_run_name(settings, train_split), storage_path=storage,
                                 failure_config=FailureConfig(max_failures=ray_settings.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)))
        result = trainer.fit()
    finally:
        shutil.rmtree(initial.parent, ignore_errors=True)
        if started_here:
            ray.shutdown()
    if result.checkpoint is None:
        raise RuntimeError(f"the Ray run in {storage} ended without a checkpoint: no epoch finished")
    steps_per_epoch = len(train_split[0]) // settings.batch_size
    train.compile_model(model, settings, steps_per_epoch)
    model.optimizer.build(model.trainable_variables)  # the weights files hold the optimizer's state too
    with result.checkpoint.as_directory() as directory:
        state = read_json(Path(directory) / train.PROGRESS_FILE)
        progress = train.Progress(Path(directory), settings, len(train_split[0]), log_to_mlflow, state)
        model.load_weights(Path(directory) / state["best_weights"])
        progress.log_missing_epochs()  # every epoch, into the stage's MLflow run
    final = result.metrics
    if not ray_settings.storage:
        # As train.fit_classifier empties its state when done: a forced rerun trains again.
        shutil.rmtree(storage, ignore_errors=True)
    return train.FitResult(
        model=model, history=progress.history, best_epoch=progress.best_epoch, stopped_by=progress.stopped_by,
        resumed_at_epoch=int(final["resumed_at_epoch"]), seconds=progress.earlier_seconds,
        train_images_per_second=progress.images_per_second(),
        runtime={**runtime, "strategy": "MultiWorkerMirroredStrategy (Ray Train)", "replicas": ray_settings.workers,
                 "ray_workers": ray_settings.workers, "replicas_identical": bool(final["replicas_identical"])})


def _run_name(settings: train.TrainingSettings, train_split: tuple[np.ndarray, np.ndarray]) -> str:
    """One Ray run name per experiment, so a rerun of the same one finds its own checkpoints."""
    key = json.dumps(dataclasses.asdict(settings), sort_keys=True).encode() + train_split[0][:64].tobytes()
    return f"finetune-{hashlib.sha256(key).hexdigest()[:12]}"


def _ray_worker(config: dict) -> None:
    """One Ray Train worker: the loop under MultiWorkerMirroredStrategy, resumed from Ray's last
    checkpoint after a restart, reporting each finished epoch (rank 0 with its state as the checkpoint)."""
    import ray
    import ray.train

    context = ray.train.get_context()
    tf.get_logger().setLevel("WARNING")  # not every collective's INFO line, twice per worker
    # Ray sets OMP_NUM_THREADS only; TensorFlow would start a thread per core of the machine in every worker.
    tf.config.threading.set_intra_op_parallelism_threads(max(1, round(config["cpus_per_worker"])))
    settings = dataclasses.replace(config["settings"], distribution="multi_worker")
    strategy, runtime = train.configure_runtime(settings)  # TensorFlow's rule: before any other TF work
    local = Path(tempfile.mkdtemp(prefix="dlfer-ray-worker-"))
    (local / "initial.keras").write_bytes(config["initial"])
    state_dir = local / "state"
    state_dir.mkdir()
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            shutil.copytree(directory, state_dir, dirs_exist_ok=True)
    rank = context.get_world_rank()

    def report(progress: train.Progress, replicas_identical: bool) -> None:
        # A barrier on all workers; rank 0's metrics and checkpoint are the ones Ray keeps.
        metrics = {**progress.history[-1], "resumed_at_epoch": progress.resumed_at_epoch,
                   "replicas_identical": replicas_identical}
        checkpoint = ray.train.Checkpoint.from_directory(str(progress.directory)) if rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint)

    try:
        fit_multi_worker(lambda: keras.models.load_model(local / "initial.keras", compile=False),
                         ray.get(config["train"]), ray.get(config["val"]), settings, state_dir,
                         config["num_classes"], strategy=strategy, runtime=runtime, on_epoch_end=report,
                         verbose=2 if rank == 0 else 0)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def fit_multi_worker(build_model: Callable[[], keras.Model], train_split: tuple[np.ndarray, np.ndarray],
                     val_split: tuple[np.ndarray, np.ndarray], settings: train.TrainingSettings,
                     checkpoint_dir: str | Path, num_classes: int, *, strategy: tf.distribute.Strategy,
                     runtime: dict, on_epoch_end: Callable[[train.Progress, bool], None] | None = None,
                     verbose: int = 2) -> train.FitResult:
    """train.fit_classifier for MultiWorkerMirroredStrategy: the same settings and the same result.

    settings.batch_size is the global batch, split between the workers, so the learning rate means
    what it means on one machine. checkpoint_dir is this worker's own: the state of the last finished
    epoch, restored from it when it holds one (a restarted worker), rewritten at each epoch's end,
    then on_epoch_end(progress, replicas_identical) runs on every worker.
    """
    images, labels = train_split
    steps_per_epoch = len(images) // settings.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"multi-worker training needs at least batch_size={settings.batch_size} training "
                         f"images, got {len(images)}")
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    with strategy.scope():
        model = build_model()
        if runtime["cpu_kernels"]:
            cpu_kernels.install(model, bf16_products=runtime.get("cpu_math") == "bf16")
        train.compile_model(model, settings, steps_per_epoch)
        model.optimizer.build(model.trainable_variables)  # its variables too must be made under the scope
        state = train.restore_state(model, checkpoint_dir)
    class_weights = (train.balanced_class_weights(labels, num_classes) if settings.class_weights == "balanced"
                     else None)
    step = _StepFunctions(model, settings, strategy, class_weights)
    progress = train.Progress(checkpoint_dir, settings, len(images), False, state,
                              plateau=train.plateau_callback(settings), backup=True)
    first_epoch = progress.resumed_at_epoch
    # The epochs still to run in one dataset, each in its own order (train.epoch_order), read through one iterator.
    train_batches = iter(_distribute(strategy, train.make_dataset(
        images, labels, settings.batch_size, num_classes, shuffle_seed=settings.seed, drop_remainder=True,
        epochs=range(first_epoch, settings.epochs), augmentation=settings.online_augmentation)))
    val_batches = _distribute(strategy, train.make_dataset(*val_split, settings.batch_size, num_classes))

    callbacks = keras.callbacks.CallbackList([progress], model=model)
    model.stop_training = progress.finished
    callbacks.on_train_begin()
    for epoch in range(first_epoch, settings.epochs):
        if model.stop_training:
            break
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
        identical = step.replicas_identical()
        if verbose:
            print(f"Epoch {epoch + 1}/{settings.epochs} - " + " - ".join(f"{k}: {v:.4f}" for k, v in logs.items()),
                  flush=True)
        if on_epoch_end is not None:
            on_epoch_end(progress, identical)
        _agree_to_stop(step, progress, model)
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
    return train.FitResult(model=best, history=progress.history, best_epoch=progress.best_epoch,
                           stopped_by=progress.stopped_by, resumed_at_epoch=progress.resumed_at_epoch,
                           seconds=progress.seconds, train_images_per_second=progress.images_per_second(),
                           runtime=runtime)


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

    def replicas_identical(self) -> bool:
        """Whether every worker holds the same weights (bit for bit): each hashes its own, all compare."""
        digest = hashlib.sha256(b"".join(np.ascontiguousarray(keras.ops.convert_to_numpy(variable.value)).tobytes()
                                         for variable in self.model.weights)).digest()
        mine = tf.constant(int.from_bytes(digest[:7], "big"), tf.int64)  # 56 bits: an exact int64 sum
        count = self.strategy.num_replicas_in_sync
        total = self._sum_over_workers(mine)
        # Equal digests sum to count x mine; different ones could only match that by a 2^-56 chance.
        return int(total) == count * int(mine)

    @tf.function
    def _sum_over_workers(self, value):
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, self.strategy.run(tf.identity, args=(value,)),
                                    axis=None)

    def any_worker(self, flag: bool) -> bool:
        return bool(self._sum_over_workers(tf.constant(int(flag), tf.int64)) > 0)


def _count_correct(labels, probabilities):
    return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(labels, axis=1), tf.argmax(probabilities, axis=1)), tf.float32))
