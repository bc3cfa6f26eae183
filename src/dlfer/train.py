"""Training shared by pretrain (EF-FER1) and finetune (EF-FER2): one Keras fit with everything around it.

fit_classifier builds the model inside the right distribution strategy and precision policy,
feeds it numpy arrays through tf.data, and adds what a pipeline stage needs: best-epoch
selection on the validation split, early stopping, a wall-clock budget, resumption after a
crash, per-epoch records for MLflow and DVC plots, and determinism on CPU. Under
MultiWorkerMirroredStrategy, where model.fit fails, dlfer.distributed trains with a custom loop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from dlfer.files import write_json

# ReduceLROnPlateau for lr_schedule=plateau: halve the rate after 2 epochs without improvement.
PLATEAU_FACTOR = 0.5
PLATEAU_PATIENCE = 2
HISTORY_COLUMNS = ("epoch", "accuracy", "val_accuracy", "loss", "val_loss", "learning_rate", "images", "seconds")


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
    """How to train; the finetune section of params.yaml has every field, pretrain the first four."""

    epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    optimizer: str = "adam"             # adam | sgd (beta_1 is then SGD's momentum)
    beta_1: float = 0.9
    loss: str = "categorical_crossentropy"
    label_smoothing: float = 0.0
    lr_schedule: str = "constant"       # constant | cosine | plateau
    class_weights: str = "none"         # none | balanced
    early_stopping_patience: int = 0    # 0 = never stop early
    monitor: str = "val_accuracy"       # val_accuracy | val_loss
    max_seconds: float = 0.0            # 0 = no budget
    mixed_precision: str = "auto"       # auto | on | off
    jit_compile: str = "auto"           # auto | on | off
    distribution: str = "auto"          # auto | none | mirrored | multi_worker

    @classmethod
    def from_params(cls, section, seed: int, **overrides) -> "TrainingSettings":
        """Settings from a params dataclass (finetune or pretrain); fields it lacks keep their defaults."""
        names = {field.name for field in dataclasses.fields(cls)} - {"seed"}
        values = {name: getattr(section, name) for name in names if hasattr(section, name)}
        return cls(seed=seed, **{**values, **overrides})


@dataclasses.dataclass
class FitResult:
    model: keras.Model              # with the best epoch's weights
    history: list[dict]             # one row per epoch, HISTORY_COLUMNS
    best_epoch: int                 # 1-based
    stopped_by: str                 # epochs | early_stopping | max_seconds
    resumed_at_epoch: int           # 0 for a fresh run, else the number of epochs restored from a backup
    seconds: float                  # training time of all sessions, restored ones included
    train_images_per_second: float  # training steps only, tracing and validation excluded
    runtime: dict                   # mixed_precision, jit_compile, strategy, replicas, gpus, deterministic

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    @property
    def best(self) -> dict:
        return self.history[self.best_epoch - 1]


def keyed_checkpoint_dir(root: str | Path, key: dict) -> Path:
    """root/<hash of key>, where one experiment keeps its resumable state; other experiments' state goes.

    key holds everything that makes a run different (params, input hashes): a changed param or
    input starts fresh instead of resuming a run it has nothing to do with.
    """
    root = Path(root)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    if root.is_dir():
        for child in root.iterdir():
            if child.name != digest:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    return root / digest


def make_dataset(images: np.ndarray, labels: np.ndarray, batch_size: int, num_classes: int,
                 shuffle_seed: int | None = None, drop_remainder: bool = False) -> tf.data.Dataset:
    """Batches of (float32 pixels 0-255 with a channel axis, one-hot float32 labels) from uint8 arrays.

    The arrays stay uint8 in memory; conversion happens per batch in parallel. shuffle_seed None
    keeps the order (validation); a seed reshuffles every epoch, in the same order on every run.
    drop_remainder leaves out the last partial batch (multi-worker training needs full batches).
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if images.ndim == 3:
        images = images[..., np.newaxis]
    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(images), seed=shuffle_seed, reshuffle_each_iteration=True)

    def to_model_inputs(batch_images, batch_labels):
        return tf.cast(batch_images, tf.float32), tf.one_hot(batch_labels, num_classes, dtype=tf.float32)

    return (dataset.batch(batch_size, drop_remainder=drop_remainder)
            .map(to_model_inputs, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE))


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """n / (k * count) per class, as sklearn's "balanced"; absent classes get 0."""
    counts = np.bincount(labels, minlength=num_classes)
    return {label: (len(labels) / (num_classes * count) if count else 0.0) for label, count in enumerate(counts)}


def is_chief() -> bool:
    """Whether this process writes outputs and logs: always, except the non-chief workers of TF_CONFIG."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = config.get("task") or {}
    if not task:
        return True
    if task.get("type") == "chief":
        return True
    return task.get("type") == "worker" and task.get("index", 0) == 0 and "chief" not in config.get("cluster", {})


def configure_runtime(settings: TrainingSettings) -> tuple[tf.distribute.Strategy, dict]:
    """Seeds, determinism, precision and distribution for one fit; the strategy and a description.

    Call it before any other TensorFlow work when distribution is multi_worker (TensorFlow's rule),
    and pass the result to fit_classifier.
    """
    gpus = tf.config.list_physical_devices("GPU")
    if settings.distribution == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise ValueError("finetune.distribution is multi_worker but TF_CONFIG is not set; set it on every "
                             "worker (see the TensorFlow multi-worker guide) or use distribution: auto")
        # fit_classifier trains it with dlfer.distributed's custom loop, which runs in float32 without
        # XLA: loss scaling and XLA-compiled collectives are untested there, so "on" is refused.
        for name in ("mixed_precision", "jit_compile"):
            if getattr(settings, name) == "on":
                raise ValueError(f"finetune.{name}: on is not supported with distribution: multi_worker; "
                                 "use auto or off")
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif settings.distribution == "mirrored" or (settings.distribution == "auto" and len(gpus) > 1):
        strategy = tf.distribute.MirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    keras.utils.set_random_seed(settings.seed)
    deterministic = not gpus
    if deterministic:
        # On CPU determinism costs little and makes two runs with one seed give identical metrics.
        # On a GPU some kernels have no deterministic version; there speed wins.
        tf.config.experimental.enable_op_determinism()
    custom_loop = settings.distribution == "multi_worker"
    mixed_precision = settings.mixed_precision == "on" or (settings.mixed_precision == "auto" and bool(gpus)
                                                           and not custom_loop)
    # XLA is a large win on GPUs; on these CPUs it made EfficientNet training ~8x slower (measured).
    jit_compile = settings.jit_compile == "on" or (settings.jit_compile == "auto" and bool(gpus)
                                                   and not custom_loop)
    runtime = {"mixed_precision": mixed_precision, "jit_compile": jit_compile, "gpus": len(gpus),
               "strategy": type(strategy).__name__, "replicas": strategy.num_replicas_in_sync,
               "deterministic": deterministic}
    # The one device line a user sees: TensorFlow's own device logs are silenced (dlfer/__init__.py).
    if gpus:
        names = sorted({tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name) for gpu in gpus})
        device = f"{len(gpus)} GPU(s) ({', '.join(names)})"
    else:
        device = "the CPU (no GPU found)"
    print(f"training on {device}: {runtime['strategy']}, {runtime['replicas']} replica(s), mixed precision "
          f"{'on' if mixed_precision else 'off'}, XLA {'on' if jit_compile else 'off'}", flush=True)
    return strategy, runtime


def fit_classifier(build_model: Callable[[], keras.Model], train: tuple[np.ndarray, np.ndarray],
                   val: tuple[np.ndarray, np.ndarray], settings: TrainingSettings, checkpoint_dir: str | Path,
                   num_classes: int, *, runtime: tuple[tf.distribute.Strategy, dict] | None = None,
                   log_to_mlflow: bool = False, callbacks: tuple = (), verbose: int = 2) -> FitResult:
    """Train the model from build_model() on (images, labels) and return it with its best epoch's weights.

    checkpoint_dir keeps the state a restarted run resumes from (Keras' BackupAndRestore plus our
    epoch records and best weights); the caller keys it by params and data, so a changed
    experiment never resumes another one's state. It is emptied when training completes.
    """
    strategy, runtime = runtime or configure_runtime(settings)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        # Keras 3's model.fit fails under this strategy (keras-team/keras#20585): a custom loop instead.
        # Imported here because dlfer.distributed builds on this module.
        from dlfer.distributed import fit_multi_worker

        if callbacks:
            raise ValueError("Keras callbacks are not supported with distribution: multi_worker")
        return fit_multi_worker(build_model, train, val, settings, checkpoint_dir, num_classes, strategy=strategy,
                                runtime=runtime, log_to_mlflow=log_to_mlflow, verbose=verbose)
    checkpoint_dir = Path(checkpoint_dir)
    if not is_chief():
        # Workers other than the chief train in lockstep but must not write the shared state.
        checkpoint_dir = Path(tempfile.mkdtemp(prefix="dlfer-worker-"))
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = train
    steps_per_epoch = -(-len(train_images) // settings.batch_size)
    previous_policy = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("mixed_float16" if runtime["mixed_precision"] else "float32")
    try:
        with strategy.scope():
            model = build_model()
            compile_model(model, settings, steps_per_epoch, jit_compile=runtime["jit_compile"])
        progress = _Progress(checkpoint_dir, settings, len(train_images), log_to_mlflow and is_chief())
        # Order matters: our records are written before Keras' backup, so they are never behind it.
        fit_callbacks = [progress, keras.callbacks.BackupAndRestore(str(checkpoint_dir / "backup"))]
        if settings.lr_schedule == "plateau":
            fit_callbacks.append(keras.callbacks.ReduceLROnPlateau(
                monitor=settings.monitor, factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE, verbose=0))
        class_weight = None
        if settings.class_weights == "balanced":
            class_weight = balanced_class_weights(train_labels, num_classes)
        model.fit(make_dataset(train_images, train_labels, settings.batch_size, num_classes,
                               shuffle_seed=settings.seed),
                  validation_data=make_dataset(*val, settings.batch_size, num_classes),
                  epochs=settings.epochs, class_weight=class_weight, shuffle=False,  # make_dataset shuffles
                  callbacks=[*fit_callbacks, *callbacks], verbose=verbose)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    if progress.best_epoch is None:
        raise RuntimeError(f"training ran no epoch (epochs={settings.epochs}); set epochs >= 1")
    model.load_weights(progress.best_path)
    result = FitResult(model=model, history=progress.history, best_epoch=progress.best_epoch,
                       stopped_by=progress.stopped_by, resumed_at_epoch=progress.resumed_at_epoch,
                       seconds=progress.seconds, train_images_per_second=progress.images_per_second(),
                       runtime=runtime)
    _empty_directory(checkpoint_dir)
    return result


def compile_model(model: keras.Model, settings: TrainingSettings, steps_per_epoch: int,
                  jit_compile: bool = False) -> None:
    """Optimizer, loss and metric from the settings; accuracy is always the categorical kind."""
    model.compile(optimizer=_optimizer(settings, steps_per_epoch), loss=_loss(settings),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")], jit_compile=jit_compile)


def _optimizer(settings: TrainingSettings, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    learning_rate = settings.learning_rate
    if settings.lr_schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(settings.learning_rate,
                                                               decay_steps=settings.epochs * steps_per_epoch)
    if settings.optimizer == "adam":
        # The paper's "momentum coefficient of 0.99" with Adam can only mean beta_1.
        return keras.optimizers.Adam(learning_rate=learning_rate, beta_1=settings.beta_1)
    if settings.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=settings.beta_1)
    raise ValueError(f"optimizer {settings.optimizer!r}: choose adam or sgd")


def _loss(settings: TrainingSettings) -> keras.losses.Loss:
    if settings.loss == "categorical_crossentropy":
        return keras.losses.CategoricalCrossentropy(label_smoothing=settings.label_smoothing)
    if settings.loss == "binary_crossentropy":
        # The paper's loss: seven independent yes/no outputs on one-hot labels. Accuracy stays the
        # categorical kind: Keras' "accuracy" would turn binary here and score 6/7 for predicting nothing.
        return keras.losses.BinaryCrossentropy(label_smoothing=settings.label_smoothing)
    raise ValueError(f"loss {settings.loss!r}: choose categorical_crossentropy or binary_crossentropy")


def _empty_directory(directory: Path) -> None:
    for path in sorted(directory.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()


class _Progress(keras.callbacks.Callback):
    """Per-epoch records, best weights, early stopping and the time budget, all surviving a restart.

    Runs before BackupAndRestore at each epoch end, so its records are never behind the backup
    and at most one epoch ahead of it; on restart, records of epochs the backup does not hold
    are dropped and those epochs run again.
    """

    def __init__(self, directory: Path, settings: TrainingSettings, train_size: int, log_to_mlflow: bool):
        super().__init__()
        self.settings = settings
        self.train_size = train_size
        self.log_to_mlflow = log_to_mlflow
        self.state_path = directory / "progress.json"
        self.best_path = directory / "best.weights.h5"
        state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        self.history: list[dict] = state.get("history", [])
        self.best_epoch: int | None = state.get("best_epoch")
        self.earlier_seconds: float = state.get("seconds", 0.0)
        self.timed_images = state.get("timed_images", 0)
        self.timed_seconds = state.get("timed_seconds", 0.0)
        self.stopped_by = "epochs"
        self.resumed_at_epoch = 0
        self._started = None

    @property
    def seconds(self) -> float:
        return self.earlier_seconds + (time.perf_counter() - self._started if self._started else 0.0)

    def images_per_second(self) -> float:
        return self.timed_images / self.timed_seconds if self.timed_seconds else 0.0

    def on_train_begin(self, logs=None):
        self._started = time.perf_counter()
        self._first_epoch_seen = False

    def on_epoch_begin(self, epoch, logs=None):
        if not self._first_epoch_seen:
            self._first_epoch_seen = True
            self.resumed_at_epoch = epoch
            self.history = [row for row in self.history if row["epoch"] <= epoch]
            if self.best_epoch is not None and self.best_epoch > epoch:
                # The best weights came from an epoch the backup does not hold; later epochs compete afresh.
                self.best_path.unlink(missing_ok=True)
                self.best_epoch = None
            if self.log_to_mlflow:
                for row in self.history:  # a resumed run's MLflow run shows the whole curve
                    self._log(row)
        self._epoch_started = time.perf_counter()
        self._steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        if self._steps == 1:
            # Timing starts after the first step, which includes tracing the training function.
            self._timing_from = time.perf_counter()
        budget = self.settings.max_seconds
        if budget and self.seconds >= budget:
            self.model.stop_training = True  # the partial epoch is still validated and recorded
            self.stopped_by = "max_seconds"

    def on_test_begin(self, logs=None):
        if self._steps > 1:
            self.timed_seconds += time.perf_counter() - self._timing_from
            self.timed_images += min((self._steps - 1) * self.settings.batch_size, self.train_size)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        row = {"epoch": epoch + 1,
               **{key: float(logs[key]) for key in ("accuracy", "val_accuracy", "loss", "val_loss") if key in logs},
               "learning_rate": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
               "images": min(self._steps * self.settings.batch_size, self.train_size),
               "seconds": round(time.perf_counter() - self._epoch_started, 3)}
        self.history.append(row)
        if self.best_epoch is None or self._improves(row, self.history[self.best_epoch - 1]):
            self.best_epoch = row["epoch"]
            self.model.save_weights(self.best_path)
        patience = self.settings.early_stopping_patience
        if patience and row["epoch"] - self.best_epoch >= patience:
            self.model.stop_training = True
            self.stopped_by = "early_stopping"
        budget = self.settings.max_seconds
        if budget and not self.model.stop_training and self.seconds + row["seconds"] > budget:
            # Another epoch would end past the budget: stop now rather than overrun it.
            self.model.stop_training = True
            self.stopped_by = "max_seconds"
        write_json(self.state_path, {"history": self.history, "best_epoch": self.best_epoch,
                                     "seconds": self.seconds, "timed_images": self.timed_images,
                                     "timed_seconds": self.timed_seconds})
        if self.log_to_mlflow:
            self._log(row)

    def _improves(self, row: dict, best: dict) -> bool:
        # Strictly: of equal scores the earlier epoch stays best.
        key = self.settings.monitor
        return row[key] < best[key] if key == "val_loss" else row[key] > best[key]

    def _log(self, row: dict) -> None:
        import mlflow

        # Prefixed, so the stage's final metrics (val_accuracy of the best epoch, ...) keep their plain names.
        mlflow.log_metrics({f"epoch/{key}": value for key, value in row.items() if key != "epoch"}, step=row["epoch"])
