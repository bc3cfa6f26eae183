"""Strict loading of params.yaml into frozen dataclasses.

params.yaml is the only source of hyperparameters. It is read once per stage; unknown keys,
missing keys and values of the wrong type stop the stage with a message naming the key,
so a typo in an experiment (`dvc exp run -S finetune.learnig_rate=...`) cannot silently
fall back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from pathlib import Path

import yaml

# keras.applications' EfficientNets refuse inputs smaller than 32x32 (dlfer.model.backbones checks it again).
# The pipeline's two EF-FER2 variants, as dvc.yaml's vars.variants (tests/test_structure.py checks they agree):
# from EF-FER1, the model dlfer ships, and from random init, the paper's ablation.
VARIANTS = ("with_ef_fer1", "without_ef_fer1")
MIN_IMAGE_SIZE = 32


@dataclasses.dataclass(frozen=True)
class FetchParams:
    source: str
    sha256: str
    source_domain: str
    source_domain_size: int
    source_domain_per_class: int

    def __post_init__(self):
        if self.sha256.strip() and not re.fullmatch(r"[0-9a-fA-F]{64}", self.sha256.strip()):
            raise ParamsError(f"params.yaml: fetch.sha256 is {self.sha256!r}; give the 64 hex digits of the "
                              "file's sha256 (sha256sum prints them), or \"\" to skip the check")
        _require_range("fetch.source_domain_size", self.source_domain_size, minimum=1)
        _require_range("fetch.source_domain_per_class", self.source_domain_per_class, minimum=0)


@dataclasses.dataclass(frozen=True)
class ValidateParams:
    blank_max_std: float
    near_duplicate_max_distance: int
    require_official_counts: bool
    max_sharpness_ratio: float

    def __post_init__(self):
        _require_range("validate.blank_max_std", self.blank_max_std, minimum=0)
        # A 64-bit perceptual hash: 64 differing bits is the largest distance there is.
        _require_range("validate.near_duplicate_max_distance", self.near_duplicate_max_distance, minimum=0, maximum=64)
        # A ratio of 1 or less would call every copy shifted: no two usages have exactly the same median.
        _require_range("validate.max_sharpness_ratio", self.max_sharpness_ratio, minimum=1, above=True)


@dataclasses.dataclass(frozen=True)
class PreprocessParams:
    protocol: str
    drop_blank: bool
    drop_train_duplicates_of_eval: bool
    drop_conflicting_labels: bool
    subset_per_class: int

    def __post_init__(self):
        _require_choice("preprocess.protocol", self.protocol, ("official", "paper"))
        _require_range("preprocess.subset_per_class", self.subset_per_class, minimum=0)


@dataclasses.dataclass(frozen=True)
class AugmentBalanceParams:
    target_per_class: int
    max_copies_per_image: int
    rotation_degrees: float
    zoom: float
    shift: float
    horizontal_flip: float
    fill_mode: str

    def __post_init__(self):
        _require_choice("augment_balance.fill_mode", self.fill_mode, ("nearest", "reflect", "wrap", "constant"))
        _require_range("augment_balance.target_per_class", self.target_per_class, minimum=0)
        _require_range("augment_balance.max_copies_per_image", self.max_copies_per_image, minimum=0)
        _require_range("augment_balance.rotation_degrees", self.rotation_degrees, minimum=0, maximum=180)
        # Zoom draws scales from 1 - zoom to 1 + zoom, and a scale must stay positive.
        _require_range("augment_balance.zoom", self.zoom, minimum=0, maximum=1, below=True)
        _require_range("augment_balance.shift", self.shift, minimum=0, maximum=1, below=True)
        _require_range("augment_balance.horizontal_flip", self.horizontal_flip, minimum=0, maximum=1)


@dataclasses.dataclass(frozen=True)
class PretrainParams:
    source: str
    weights_file: str
    backbone: str
    image_size: int
    epochs: int
    batch_size: int
    optimizer: str
    learning_rate: float
    beta_1: float
    loss: str
    label_smoothing: float
    lr_schedule: str
    monitor: str
    batch_norm_momentum: float
    max_seconds: float

    def __post_init__(self):
        _require_choice("pretrain.source", self.source, ("scratch", "imagenet", "none"))
        _require_range("pretrain.image_size", self.image_size, minimum=MIN_IMAGE_SIZE)
        _require_training_settings("pretrain", self)


@dataclasses.dataclass(frozen=True)
class FinetuneParams:
    backbone: str
    image_size: int
    channels: int
    epochs: int
    batch_size: int
    optimizer: str
    learning_rate: float
    beta_1: float
    loss: str
    label_smoothing: float
    weight_decay: float
    lr_schedule: str
    class_weights: str
    early_stopping_patience: int
    monitor: str
    dropout: float
    batch_norm_momentum: float
    max_seconds: float
    mixed_precision: str
    jit_compile: str
    cpu_kernels: str
    cpu_math: str
    distribution: str
    online_flip: float
    online_shift: float
    online_rotation: float
    online_zoom: float
    class_bias: str
    ray_workers: int
    ray_cpus_per_worker: float
    ray_gpus_per_worker: float
    ray_address: str
    ray_storage: str
    ray_max_failures: int

    def __post_init__(self):
        _require_range("finetune.image_size", self.image_size, minimum=MIN_IMAGE_SIZE)
        _require_choice("finetune.channels", self.channels, (1, 3))
        _require_choice("finetune.class_weights", self.class_weights, ("none", "balanced"))
        _require_choice("finetune.class_bias", self.class_bias, ("none", "val_macro_f1", "val_accuracy"))
        for key in ("mixed_precision", "jit_compile", "cpu_kernels"):
            _require_choice(f"finetune.{key}", getattr(self, key), ("auto", "on", "off"))
        _require_choice("finetune.cpu_math", self.cpu_math, ("fp32", "bf16"))
        _require_range("finetune.weight_decay", self.weight_decay, minimum=0, maximum=1, below=True)
        _require_choice("finetune.distribution", self.distribution, ("auto", "none", "mirrored", "ray"))
        _require_range("finetune.ray_workers", self.ray_workers, minimum=1)
        _require_range("finetune.ray_cpus_per_worker", self.ray_cpus_per_worker, minimum=0, above=True)
        _require_range("finetune.ray_gpus_per_worker", self.ray_gpus_per_worker, minimum=0)
        _require_range("finetune.ray_max_failures", self.ray_max_failures, minimum=-1)
        _require_training_settings("finetune", self)
        _require_range("finetune.early_stopping_patience", self.early_stopping_patience, minimum=0)
        _require_range("finetune.dropout", self.dropout, minimum=0, maximum=1, below=True)
        _require_range("finetune.online_flip", self.online_flip, minimum=0, maximum=1)
        for key in ("online_shift", "online_zoom"):
            _require_range(f"finetune.{key}", getattr(self, key), minimum=0, maximum=1, below=True)
        _require_range("finetune.online_rotation", self.online_rotation, minimum=0, maximum=180)


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    flip_tta: bool
    bootstrap_samples: int

    def __post_init__(self):
        _require_range("evaluate.bootstrap_samples", self.bootstrap_samples, minimum=1)


@dataclasses.dataclass(frozen=True)
class RegisterParams:
    registered_model: str
    alias: str


@dataclasses.dataclass(frozen=True)
class ExportParams:
    min_top1_agreement: float
    mirror_average: bool

    def __post_init__(self):
        _require_range("export.min_top1_agreement", self.min_top1_agreement, minimum=0, maximum=1)


@dataclasses.dataclass(frozen=True)
class Params:
    seed: int
    fetch: FetchParams
    validate: ValidateParams
    preprocess: PreprocessParams
    augment_balance: AugmentBalanceParams
    pretrain: PretrainParams
    finetune: FinetuneParams
    evaluate: EvaluateParams
    register: RegisterParams
    export: ExportParams

    def __post_init__(self):
        # NumPy's legacy seeding (inside keras.utils.set_random_seed) takes 0 <= seed < 2**32.
        _require_range("seed", self.seed, minimum=0, maximum=2**32 - 1)

    def section(self, name: str) -> dict:
        """One section as a flat dict, ready for MLflow's log_params."""
        return dataclasses.asdict(getattr(self, name))


class ParamsError(ValueError):
    """params.yaml does not match the schema; the message names the key and the fix."""


def _require_choice(key: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ParamsError(f"params.yaml: {key} is {value!r}; choose one of {', '.join(map(repr, choices))}")


def _require_range(key: str, value, minimum=None, maximum=None, above: bool = False, below: bool = False) -> None:
    """ParamsError naming key, value and range unless minimum <= value <= maximum (strict where above / below)."""
    fits_low = minimum is None or (value > minimum if above else value >= minimum)
    fits_high = maximum is None or (value < maximum if below else value <= maximum)
    # NaN fails every comparison, so it lands here too; .inf is no setting either (a time limit says 0 for none).
    finite = not isinstance(value, float) or math.isfinite(value)
    if fits_low and fits_high and finite:
        return
    bounds = [] if finite else ["a finite number"]
    if minimum is not None:
        bounds.append(f"{'>' if above else '>='} {minimum}")
    if maximum is not None:
        bounds.append(f"{'<' if below else '<='} {maximum}")
    raise ParamsError(f"params.yaml: {key} is {value!r}; it must be {' and '.join(bounds)}")


def _require_training_settings(section: str, params) -> None:
    """The choices and ranges pretrain and finetune share: epochs, batch, optimizer, loss, schedule, budget."""
    _require_range(f"{section}.epochs", params.epochs, minimum=1)
    _require_range(f"{section}.batch_size", params.batch_size, minimum=1)
    _require_choice(f"{section}.optimizer", params.optimizer, ("adam", "sgd"))
    _require_range(f"{section}.learning_rate", params.learning_rate, minimum=0, above=True)
    _require_range(f"{section}.beta_1", params.beta_1, minimum=0, maximum=1, below=True)
    _require_choice(f"{section}.loss", params.loss, ("categorical_crossentropy", "binary_crossentropy"))
    _require_range(f"{section}.label_smoothing", params.label_smoothing, minimum=0, maximum=1, below=True)
    _require_choice(f"{section}.lr_schedule", params.lr_schedule, ("constant", "cosine", "plateau"))
    _require_choice(f"{section}.monitor", params.monitor, ("val_accuracy", "val_loss"))
    _require_range(f"{section}.batch_norm_momentum", params.batch_norm_momentum, minimum=0, maximum=1, below=True)
    _require_range(f"{section}.max_seconds", params.max_seconds, minimum=0)  # 0 = no limit


_FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check_type(key: str, value, expected) -> object:
    # YAML 1.1 reads 1e-3 (no dot) as a string, and `dvc exp run -S finetune.learning_rate=0.00001` writes
    # exactly that (1e-05); it reads 3 as an int. Accept both for floats, nothing else loosely.
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
        return float(value)
    if expected is bool and not isinstance(value, bool):
        raise ParamsError(f"params.yaml: {key} must be true or false, got {value!r}")
    if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ParamsError(f"params.yaml: {key} must be an integer, got {value!r}")
    if not isinstance(value, expected):
        raise ParamsError(f"params.yaml: {key} must be {expected.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise ParamsError(f"params.yaml: {prefix or 'the file'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    missing = [name for name in names if name not in raw]
    if unknown:
        raise ParamsError(f"params.yaml: unknown key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"known keys are {', '.join(prefix + n for n in names)}")
    if missing:
        raise ParamsError(f"params.yaml: missing key(s) {', '.join(prefix + k for k in missing)}")
    values = {}
    for name in names:
        expected = hints[name]
        if dataclasses.is_dataclass(expected):
            values[name] = _build(expected, raw[name], f"{prefix}{name}.")
        else:
            values[name] = _check_type(prefix + name, raw[name], expected)
    return cls(**values)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read params.yaml strictly into a frozen Params tree."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found; run from the repository root or pass --params")
    with path.open() as handle:
        raw = yaml.safe_load(handle)
    return _build(Params, raw, "")
