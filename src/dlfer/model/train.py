"""Training shared by pretrain (EF-FER1) and finetune (EF-FER2): one Keras fit with everything around it.

fit_classifier builds the model inside the right distribution strategy and precision policy,
feeds it numpy arrays through tf.data, and adds what a pipeline stage needs: best-epoch
selection on the validation split, early stopping, a wall-clock budget, resumption after a
crash that ends where an uninterrupted run ends, per-epoch records for MLflow and DVC plots,
and determinism on CPU. On a Ray cluster (distribution: ray) dlfer.model.distributed trains with a custom
loop under MultiWorkerMirroredStrategy, where model.fit fails; dlfer.model.distributed.fit picks the one the
params ask for (this module never imports that one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from dlfer import machine
from dlfer.files import write_json
from dlfer.model import cpu_kernels

# What the start line adds where cpu_math asks for bf16 on a CPU without AMX (see configure_runtime).
NO_AMX_NOTE = " (cpu_math bf16 acts only on CPUs with AMX: float32 here)"

# ReduceLROnPlateau for lr_schedule=plateau: halve the rate after 2 epochs without improvement.
PLATEAU_FACTOR = 0.5
PLATEAU_PATIENCE = 2
# The columns of the plots CSV. History rows also hold each epoch's seconds, which go to MLflow
# only: a file DVC tracks should come out the same on every run, killed and resumed or not.
HISTORY_COLUMNS = ("epoch", "accuracy", "val_accuracy", "loss", "val_loss", "learning_rate", "images")
# The checkpoint folder: the state of the last finished epoch, and the MLflow run a killed stage leaves.
PROGRESS_FILE = "progress.json"
# Variable names weight decay leaves alone: dense and convolution biases, batch norm's gamma and beta.
NOT_DECAYED = ("bias", "gamma", "beta")
RUN_RECORD = "mlflow_run.json"


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
    weight_decay: float = 0.0           # decoupled (AdamW's); never on biases or batch-norm scales and shifts
    lr_schedule: str = "constant"       # constant | cosine | plateau
    class_weights: str = "none"         # none | balanced
    early_stopping_patience: int = 0    # 0 = never stop early
    monitor: str = "val_accuracy"       # val_accuracy | val_loss
    max_seconds: float = 0.0            # 0 = no budget
    mixed_precision: str = "auto"       # auto | on | off
    jit_compile: str = "auto"           # auto | on | off
    cpu_kernels: str = "auto"           # auto | on | off (dlfer.model.cpu_kernels)
    cpu_math: str = "fp32"              # fp32 | bf16: oneDNN's products in bfloat16 with the CPU kernels
    distribution: str = "auto"          # auto | none | mirrored | ray (multi_worker: inside a Ray worker)
    online_flip: float = 0.0            # the fresh random transform of each image at each step (OnlineAugmentation)
    online_shift: float = 0.0
    online_rotation: float = 0.0
    online_zoom: float = 0.0

    @property
    def online_augmentation(self) -> "OnlineAugmentation | None":
        augmentation = OnlineAugmentation(self.online_flip, self.online_shift, self.online_rotation, self.online_zoom)
        return augmentation if augmentation.active else None

    @classmethod
    def from_params(cls, section, seed: int, **fixed) -> "TrainingSettings":
        """Settings from a params dataclass (finetune or pretrain) and the caller's fixed choices.

        Every setting comes from one of the two, never from a default here: a params key that is
        renamed or missing stops the stage instead of training with a value nobody chose.
        """
        names = {field.name for field in dataclasses.fields(cls)} - {"seed"}
        values = {name: getattr(section, name) for name in names if hasattr(section, name)}
        missing = sorted(names - set(values) - set(fixed))
        if missing:
            raise ValueError(f"{type(section).__name__} has no {', '.join(missing)}: add them to params.yaml "
                             "(and its dataclass in dlfer/params.py) or fix them in the stage that trains")
        return cls(seed=seed, **{**values, **fixed})


@dataclasses.dataclass
class FitResult:
    model: keras.Model              # with the best epoch's weights
    history: list[dict]             # one row per epoch, HISTORY_COLUMNS and seconds
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


@dataclasses.dataclass(frozen=True)
class OnlineAugmentation:
    """A new random affine transform of every training image each time an epoch shows it.

    The augment_balance stage draws the paper's copies once, so a second epoch shows the same
    pixels again; this draws a fresh transform per image and step, in the model's 48x48 input
    before it resizes. Same semantics as dlfer.data.augment (rotation and zoom about the centre, shift
    as a fraction of the side, mirror with probability flip, nearest fill, bilinear sampling). The
    random numbers are a function of (seed, epoch, batch) alone, so a resumed or reloaded run
    sees the same transforms.
    """

    flip: float          # probability of a horizontal mirror
    shift: float         # largest shift, fraction of the side, drawn per axis
    rotation: float      # largest rotation, degrees
    zoom: float          # zoom factors per axis drawn from [1 - zoom, 1 + zoom]

    @property
    def active(self) -> bool:
        return any(value > 0 for value in (self.flip, self.shift, self.rotation, self.zoom))

    def transforms(self, count, height: int, width: int, seed) -> tf.Tensor:
        """(count, 8) ImageProjectiveTransformV3 rows mapping output pixels to input pixels."""
        uniform = tf.random.stateless_uniform((count, 6), seed=seed, minval=-1.0, maxval=1.0)
        angle = uniform[:, 0] * np.deg2rad(self.rotation)
        zoom_x, zoom_y = 1 + uniform[:, 1] * self.zoom, 1 + uniform[:, 2] * self.zoom
        shift_x, shift_y = uniform[:, 3] * self.shift * width, uniform[:, 4] * self.shift * height
        mirror = tf.where(uniform[:, 5] * 0.5 + 0.5 < self.flip, -1.0, 1.0)
        cos, sin = tf.cos(angle), tf.sin(angle)
        # input = R(angle) @ diag(zoom_x * mirror, zoom_y) @ (output - centre) + centre + shift, in (x, y)
        a0, a1 = cos * zoom_x * mirror, -sin * zoom_y
        b0, b1 = sin * zoom_x * mirror, cos * zoom_y
        centre_x, centre_y = (width - 1) / 2, (height - 1) / 2
        a2 = centre_x - a0 * centre_x - a1 * centre_y + shift_x
        b2 = centre_y - b0 * centre_x - b1 * centre_y + shift_y
        zeros = tf.zeros_like(a0)
        return tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)

    def apply(self, images: tf.Tensor, seed) -> tf.Tensor:
        """images (N, H, W, C) float32, one transform per image drawn from seed (shape (2,) int)."""
        height, width = images.shape[1], images.shape[2]
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=images, transforms=self.transforms(tf.shape(images)[0], height, width, seed),
            output_shape=tf.constant([height, width], tf.int32), fill_value=0.0,
            interpolation="BILINEAR", fill_mode="NEAREST")


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


def recorded_run_id(checkpoint_dir: str | Path, tracking_uri: str) -> str | None:
    """The MLflow run a killed attempt at this experiment left in checkpoint_dir, to continue it; else None."""
    try:
        record = json.loads((Path(checkpoint_dir) / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record.get("run_id") if record.get("tracking_uri") == tracking_uri else None


def record_run(checkpoint_dir: str | Path, run_id: str, tracking_uri: str) -> None:
    """Remember the stage's MLflow run until training completes, so that a killed stage's rerun continues it."""
    write_json(Path(checkpoint_dir) / RUN_RECORD, {"run_id": run_id, "tracking_uri": tracking_uri})


def epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
    """The order of the training images in epoch `epoch` (0-based): a function of (seed, epoch) alone.

    tf.data's reshuffle_each_iteration orders an epoch by how many epochs its iterator has run in
    this process, so a run resumed at epoch 2 replayed epoch 1's order and ended elsewhere than a
    run never stopped (issue 12). Keyed by the epoch, a resumed run sees the batches the other saw.
    """
    return np.random.default_rng([seed, epoch]).permutation(size)


def make_dataset(images: np.ndarray, labels: np.ndarray, batch_size: int, num_classes: int,
                 shuffle_seed: int | None = None, drop_remainder: bool = False,
                 epochs: range = range(1), augmentation: OnlineAugmentation | None = None) -> tf.data.Dataset:
    """Batches of (float32 pixels 0-255 with a channel axis, one-hot float32 labels) from uint8 arrays.

    The arrays stay uint8 in memory; conversion happens per batch in parallel. shuffle_seed None
    gives one pass in order (validation). With a seed, the dataset holds the batches of each epoch
    in `epochs` (0-based) one after the other, epoch e in epoch_order(seed, e): a fit resumed at
    epoch e starts its dataset there and takes steps_per_epoch batches per epoch. Each epoch has its
    own batches; drop_remainder leaves out its last partial one (multi-worker training needs full batches).
    augmentation (training only, needs a seed) transforms each batch with random numbers keyed by
    (seed, epoch, batch).
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if images.ndim == 3:
        images = images[..., np.newaxis]
    if augmentation is not None and shuffle_seed is None:
        raise ValueError("online augmentation is for shuffled training batches: pass shuffle_seed")
    if shuffle_seed is None:
        orders = np.arange(len(images))[np.newaxis]
        epochs = range(1)
    else:
        orders = np.array([epoch_order(shuffle_seed, epoch, len(images)) for epoch in epochs],
                          dtype=np.int64).reshape(len(epochs), len(images))
    batches_per_epoch = len(images) // batch_size if drop_remainder else -(-len(images) // batch_size)
    pixels, targets = tf.constant(images), tf.constant(labels)

    def epoch_batches(epoch, order):
        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size, drop_remainder=drop_remainder)
        return batches.enumerate().map(lambda batch, indices: (epoch, batch, indices))

    def to_model_inputs(epoch, batch, indices):
        inputs = tf.cast(tf.gather(pixels, indices), tf.float32)
        if augmentation is not None:
            inputs = augmentation.apply(inputs, tf.stack([tf.constant(shuffle_seed, tf.int64),
                                                          epoch * 1_000_003 + batch]))
        return inputs, tf.one_hot(tf.gather(targets, indices), num_classes, dtype=tf.float32)

    epoch_numbers = np.array(list(epochs), dtype=np.int64)
    return (tf.data.Dataset.from_tensor_slices((epoch_numbers, orders)).flat_map(epoch_batches)
            .apply(tf.data.experimental.assert_cardinality(len(orders) * batches_per_epoch))
            .map(to_model_inputs, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE))


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """n / (k * count) per class, as sklearn's "balanced"; absent classes get 0."""
    counts = np.bincount(labels, minlength=num_classes)
    return {label: (len(labels) / (num_classes * count) if count else 0.0) for label, count in enumerate(counts)}


def configure_runtime(settings: TrainingSettings) -> tuple[tf.distribute.Strategy, dict]:
    """Seeds, determinism, precision and distribution for one fit; the strategy and a description.

    Call it before any other TensorFlow work when distribution is multi_worker (TensorFlow's rule),
    and pass the result to fit_classifier.
    """
    gpus = tf.config.list_physical_devices("GPU")
    if settings.distribution in ("ray", "multi_worker"):
        # dlfer.model.distributed's custom loop runs in float32 without XLA: loss scaling and
        # XLA-compiled collectives are untested there, so "on" is refused.
        for name in ("mixed_precision", "jit_compile"):
            if getattr(settings, name) == "on":
                raise ValueError(f"finetune.{name}: on is not supported with distribution: ray; use auto or off")
    if settings.distribution == "multi_worker":
        # Only inside a Ray Train worker, which sets TF_CONFIG for this strategy.
        if not os.environ.get("TF_CONFIG"):
            raise ValueError("multi_worker training needs TF_CONFIG, which Ray Train sets in its workers; "
                             "use finetune.distribution: ray")
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
    custom_loop = settings.distribution in ("ray", "multi_worker")
    mixed_precision = settings.mixed_precision == "on" or (settings.mixed_precision == "auto" and bool(gpus)
                                                           and not custom_loop)
    # XLA is a large win on GPUs and stays off on CPUs: XLA:CPU compiles a depthwise convolution (a convolution
    # with one group per channel) to generic loops, tens of times slower than TensorFlow's kernels, and other
    # convolutions to Eigen's instead of oneDNN's (`python bench/train_throughput.py --xla-ops` measures both).
    jit_compile = settings.jit_compile == "on" or (settings.jit_compile == "auto" and bool(gpus)
                                                   and not custom_loop)
    # The same function, faster on CPUs; a GPU keeps Keras' kernels (cuDNN's are fast there).
    use_cpu_kernels = settings.cpu_kernels == "on" or (settings.cpu_kernels == "auto" and not gpus)
    # bfloat16 products (float32 sums) where oneDNN computes them, on CPUs with AMX: faster there
    # (bench/train_throughput.py). Elsewhere, AVX512-BF16 without AMX (AMD Zen 4) included, oneDNN keeps its
    # float32 kernels under the bf16 mode, so the run computes float32, through the two-matrix product (no slower,
    # and the runtime then says fp32, what was computed). Set here, before oneDNN's first primitive.
    bf16_requested = use_cpu_kernels and settings.cpu_math == "bf16"
    bf16_products = bf16_requested and machine.has_amx()
    if bf16_products:
        cpu_kernels.allow_bf16_products()
    runtime = {"mixed_precision": mixed_precision, "jit_compile": jit_compile, "cpu_kernels": use_cpu_kernels,
               "cpu_math": "bf16" if bf16_products else "fp32",
               "gpus": len(gpus), "strategy": type(strategy).__name__, "replicas": strategy.num_replicas_in_sync,
               "deterministic": deterministic}
    # The one device line a user sees: TensorFlow's own device logs are silenced (dlfer/__init__.py).
    if gpus:
        names = sorted({tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name) for gpu in gpus})
        device = f"{len(gpus)} GPU(s) ({', '.join(names)})"
    else:
        device = "the CPU (no GPU found)"
    if settings.distribution == "ray":
        return strategy, runtime  # this process only starts the Ray workers; each says where it trains
    print(f"training on {device}: {runtime['strategy']}, {runtime['replicas']} replica(s), mixed precision "
          f"{'on' if mixed_precision else 'off'}, XLA {'on' if jit_compile else 'off'}, dlfer's CPU kernels "
          f"{'on' if use_cpu_kernels else 'off'}{' with bfloat16 products' if bf16_products else ''}"
          f"{NO_AMX_NOTE if bf16_requested and not bf16_products else ''}", flush=True)
    return strategy, runtime


def fit_classifier(build_model: Callable[[], keras.Model], train: tuple[np.ndarray, np.ndarray],
                   val: tuple[np.ndarray, np.ndarray], settings: TrainingSettings, checkpoint_dir: str | Path,
                   num_classes: int, *, runtime: tuple[tf.distribute.Strategy, dict] | None = None,
                   log_to_mlflow: bool = False, callbacks: tuple = (), verbose: int | None = None) -> FitResult:
    """Train the model from build_model() on (images, labels) and return it with its best epoch's weights.

    checkpoint_dir keeps the state of the last finished epoch (weights, optimizer, random-seed
    states, learning-rate plateau, epoch records, best weights), from which a killed run resumes
    and ends as if never stopped; the caller keys it by params and data, so a changed experiment
    never resumes another one's state. It is emptied when training completes.
    """
    strategy, runtime = runtime or configure_runtime(settings)
    if verbose is None:
        # A terminal gets Keras' progress bar within the epoch (steps, ETA); logs and CI one line per epoch.
        verbose = 1 if sys.stdout.isatty() else 2
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        # Keras 3's model.fit fails under this strategy (keras-team/keras#20585).
        raise ValueError("fit_classifier cannot train under MultiWorkerMirroredStrategy; "
                         "dlfer.model.distributed.fit trains it with a custom loop")
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = train
    steps_per_epoch = -(-len(train_images) // settings.batch_size)
    previous_policy = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("mixed_float16" if runtime["mixed_precision"] else "float32")
    try:
        with strategy.scope():
            model = build_model()
            if runtime["cpu_kernels"]:
                cpu_kernels.install(model, bf16_products=runtime.get("cpu_math") == "bf16")
            compile_model(model, settings, steps_per_epoch, jit_compile=runtime["jit_compile"])
            state = restore_state(model, checkpoint_dir)
        progress = Progress(checkpoint_dir, settings, len(train_images), log_to_mlflow, state,
                             plateau=plateau_callback(settings), backup=True)
        progress.log_missing_epochs()
        class_weight = None
        if settings.class_weights == "balanced":
            class_weight = balanced_class_weights(train_labels, num_classes)
        first_epoch = progress.resumed_at_epoch
        if not progress.finished:
            # The dataset starts at the epoch this run resumes at: each epoch's order is its own (epoch_order).
            model.fit(make_dataset(train_images, train_labels, settings.batch_size, num_classes,
                                   shuffle_seed=settings.seed, epochs=range(first_epoch, settings.epochs),
                                   augmentation=settings.online_augmentation),
                      validation_data=make_dataset(*val, settings.batch_size, num_classes),
                      initial_epoch=first_epoch, epochs=settings.epochs, steps_per_epoch=steps_per_epoch,
                      class_weight=class_weight, shuffle=False,  # make_dataset shuffles
                      callbacks=[progress, *callbacks], verbose=verbose)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    if progress.best_epoch is None:
        raise RuntimeError(f"training ran no epoch (epochs={settings.epochs}); set epochs >= 1")
    model.load_weights(progress.best_path)
    result = FitResult(model=model, history=progress.history, best_epoch=progress.best_epoch,
                       stopped_by=progress.stopped_by, resumed_at_epoch=progress.resumed_at_epoch,
                       seconds=progress.seconds, train_images_per_second=progress.images_per_second(),
                       runtime=runtime)
    empty_directory(checkpoint_dir)
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
    # Keras decouples weight decay from the gradient (AdamW): w -= learning_rate * weight_decay * w each step.
    weight_decay = settings.weight_decay or None
    if settings.optimizer == "adam":
        # The paper's "momentum coefficient of 0.99" with Adam can only mean beta_1.
        optimizer = keras.optimizers.Adam(learning_rate=learning_rate, beta_1=settings.beta_1, weight_decay=weight_decay)
    elif settings.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(learning_rate=learning_rate, momentum=settings.beta_1, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer {settings.optimizer!r}: choose adam or sgd")
    # Shrinking a bias or a batch norm's scale and shift regularises nothing (the usual exclusions).
    optimizer.exclude_from_weight_decay(var_names=NOT_DECAYED)
    return optimizer


def _loss(settings: TrainingSettings) -> keras.losses.Loss:
    if settings.loss == "categorical_crossentropy":
        return keras.losses.CategoricalCrossentropy(label_smoothing=settings.label_smoothing)
    if settings.loss == "binary_crossentropy":
        # The paper's loss: seven independent yes/no outputs on one-hot labels. Accuracy stays the
        # categorical kind: Keras' "accuracy" would turn binary here and score 6/7 for predicting nothing.
        return keras.losses.BinaryCrossentropy(label_smoothing=settings.label_smoothing)
    raise ValueError(f"loss {settings.loss!r}: choose categorical_crossentropy or binary_crossentropy")


def plateau_callback(settings: TrainingSettings) -> keras.callbacks.ReduceLROnPlateau | None:
    """ReduceLROnPlateau for lr_schedule=plateau, else None; Progress drives it and keeps its state."""
    if settings.lr_schedule != "plateau":
        return None
    # mode spelled out: "auto" looks for the metric among those fit would have built (the custom loop builds none).
    return keras.callbacks.ReduceLROnPlateau(monitor=settings.monitor,
                                             mode="min" if settings.monitor == "val_loss" else "max",
                                             factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE, verbose=0)


def empty_directory(directory: Path) -> None:
    for path in sorted(directory.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()


def _seed_states(model: keras.Model) -> list:
    """The states of the model's random-seed generators (dropout, stochastic depth), in build order.

    model.variables holds them and model.weights does not, nor does save_weights: restored weights
    alone would replay epoch 1's dropout masks after a resume.
    """
    weights = {id(variable) for variable in model.weights}
    return [variable for variable in model.variables if id(variable) not in weights]


def restore_state(model: keras.Model, directory: Path) -> dict:
    """Load the last finished epoch's state that a killed run left in directory; that state, or {} to start fresh.

    Everything else there goes: files of an epoch that did not finish, or an older layout of the folder.
    """
    path = directory / PROGRESS_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        state = {}
    files = {state.get("weights"), state.get("best_weights")}
    if (state and (None in files or not all((directory / name).is_file() for name in files)
                   or len(state.get("seed_states", ())) != len(_seed_states(model)))):
        print(f"{directory}: not a state this version can resume from; training starts afresh", flush=True)
        state = {}
    keep = {PROGRESS_FILE, *files} if state else set()
    for child in directory.iterdir():
        if child.name not in keep | {RUN_RECORD}:
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    if state:
        model.optimizer.build(model.trainable_variables)  # its variables must exist to be loaded
        model.load_weights(directory / state["weights"])  # the model's and the optimizer's, its step among them
        for variable, value in zip(_seed_states(model), state["seed_states"]):
            variable.assign(np.asarray(value, dtype=variable.dtype))
    return state


def _weights_name(epoch: int) -> str:
    return f"epoch{epoch}.weights.h5"


class Progress(keras.callbacks.Callback):
    """Per-epoch records, best weights, early stopping, the time budget and the plateau schedule, all
    surviving a restart.

    At each epoch's end it records the epoch, saves the weights (with the optimizer's state) of a
    best epoch and, with backup, of every epoch, steps ReduceLROnPlateau, and then writes
    progress.json: the commit point. A run killed before it resumes from the epoch before, whose
    files stay until the next commit. Only then is the epoch logged to MLflow, so that a resumed
    run, which continues the killed one's MLflow run, logs each epoch once.
    """

    def __init__(self, directory: Path, settings: TrainingSettings, train_size: int, log_to_mlflow: bool,
                 state: dict, plateau: keras.callbacks.ReduceLROnPlateau | None = None, backup: bool = False):
        super().__init__()
        self.directory = directory
        self.settings = settings
        self.train_size = train_size
        self.log_to_mlflow = log_to_mlflow
        self.plateau = plateau
        self.backup = backup
        self.history: list[dict] = state.get("history", [])
        self.best_epoch: int | None = state.get("best_epoch")
        self.stopped_by: str = state.get("stopped_by", "epochs")
        self.resumed_at_epoch: int = state.get("epoch", 0)
        self.earlier_seconds: float = state.get("seconds", 0.0)
        self.timed_images = state.get("timed_images", 0)
        self.timed_seconds = state.get("timed_seconds", 0.0)
        self._plateau_state: dict = state.get("plateau", {})
        self._started = None

    @property
    def finished(self) -> bool:
        """Whether the restored run had already stopped: after all its epochs, early, or by the time budget."""
        return self.stopped_by != "epochs" or self.resumed_at_epoch >= self.settings.epochs

    @property
    def best_path(self) -> Path:
        return self.directory / _weights_name(self.best_epoch)

    @property
    def seconds(self) -> float:
        return self.earlier_seconds + (time.perf_counter() - self._started if self._started else 0.0)

    def images_per_second(self) -> float:
        return self.timed_images / self.timed_seconds if self.timed_seconds else 0.0

    def set_model(self, model):
        super().set_model(model)
        if self.plateau is not None:
            self.plateau.set_model(model)

    def log_missing_epochs(self) -> None:
        """Log the restored epochs that the active MLflow run lacks (all of them in a new run, else those
        the killed run committed but had not logged yet)."""
        if not (self.log_to_mlflow and self.history):
            return
        import mlflow

        run_id = mlflow.active_run().info.run_id
        logged = {metric.step for metric in mlflow.MlflowClient().get_metric_history(run_id, "epoch/learning_rate")}
        for row in self.history:
            if row["epoch"] not in logged:
                self._log(row)

    def on_train_begin(self, logs=None):
        self._started = time.perf_counter()
        if self.plateau is not None:
            self.plateau.on_train_begin()  # resets its counters; a resumed run then takes back its own
            for name, value in self._plateau_state.items():
                setattr(self.plateau, name, value)

    def on_epoch_begin(self, epoch, logs=None):
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
        improved = self.best_epoch is None or self._improves(row, self.history[self.best_epoch - 1])
        if improved:
            self.best_epoch = row["epoch"]
        reason = self._stop_reason(row)
        if reason:
            self.model.stop_training = True
            self.stopped_by = reason
        if self.plateau is not None:
            self.plateau.on_epoch_end(epoch, dict(logs))
        # After the plateau step, so that a resumed run's optimizer has the next epoch's learning rate.
        self._commit(row["epoch"], improved)
        if self.log_to_mlflow:
            self._log(row)

    def _stop_reason(self, row: dict) -> str | None:
        """Why training stops after this epoch: early_stopping, max_seconds, or None to go on."""
        patience = self.settings.early_stopping_patience
        if patience and row["epoch"] - self.best_epoch >= patience:
            return "early_stopping"
        budget = self.settings.max_seconds
        # Another epoch would end past the budget: stop now rather than overrun it. (A step past the budget
        # has already stopped this epoch and said so in on_train_batch_end.)
        if budget and not self.model.stop_training and self.seconds + row["seconds"] > budget:
            return "max_seconds"
        return None

    def _commit(self, epoch: int, improved: bool) -> None:
        """Save a best epoch's weights (every epoch's with backup), write progress.json, delete older weights."""
        if self.backup or improved:
            self.model.save_weights(self.directory / _weights_name(epoch))
        if self.backup:
            write_json(self.directory / PROGRESS_FILE, self._state(epoch))
        keep = {_weights_name(self.best_epoch), _weights_name(epoch) if self.backup else None}
        for path in self.directory.glob(_weights_name("*")):
            if path.name not in keep:
                path.unlink()

    def _state(self, epoch: int) -> dict:
        plateau = {}
        if self.plateau is not None:
            plateau = {name: getattr(self.plateau, name) for name in ("best", "wait", "cooldown_counter")}
        return {"epoch": epoch, "weights": _weights_name(epoch), "best_weights": _weights_name(self.best_epoch),
                "history": self.history, "best_epoch": self.best_epoch, "stopped_by": self.stopped_by,
                "seconds": self.seconds, "timed_images": self.timed_images, "timed_seconds": self.timed_seconds,
                "seed_states": [keras.ops.convert_to_numpy(variable.value).tolist()
                                for variable in _seed_states(self.model)],
                "plateau": plateau}

    def _improves(self, row: dict, best: dict) -> bool:
        # Strictly: of equal scores the earlier epoch stays best.
        key = self.settings.monitor
        return row[key] < best[key] if key == "val_loss" else row[key] > best[key]

    def _log(self, row: dict) -> None:
        import mlflow

        # Prefixed, so the stage's final metrics (val_accuracy of the best epoch, ...) keep their plain names.
        mlflow.log_metrics({f"epoch/{key}": value for key, value in row.items() if key != "epoch"}, step=row["epoch"])
