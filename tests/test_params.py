"""params.yaml loads strictly: out-of-range values stop at load time naming key, value and range; every profile loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dlfer.cli.app import apply_overrides, load_profile
from dlfer.params import ParamsError, load_params

REPOSITORY = Path(__file__).resolve().parents[1]
PROFILES = sorted(path.stem for path in (REPOSITORY / "profiles").glob("*.yaml"))


def base_params() -> dict:
    return yaml.safe_load((REPOSITORY / "params.yaml").read_text())


def load_with(tmp_path: Path, dotted: str, value):
    params = apply_overrides(base_params(), {dotted: value})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return load_params(path)


# (dotted key, a bad value, the range the message must state)
OUT_OF_RANGE = [
    ("seed", -1, ">= 0 and <= 4294967295"),
    ("seed", 2**32, ">= 0 and <= 4294967295"),
    ("fetch.source_domain_size", 0, ">= 1"),
    ("fetch.source_domain_per_class", -1, ">= 0"),
    ("validate.blank_max_std", -0.5, ">= 0"),
    ("validate.near_duplicate_max_distance", -1, ">= 0 and <= 64"),
    ("validate.near_duplicate_max_distance", 65, ">= 0 and <= 64"),
    ("validate.max_sharpness_ratio", 1.0, "> 1"),
    ("validate.max_sharpness_ratio", 0.5, "> 1"),
    ("preprocess.subset_per_class", -5, ">= 0"),
    ("finetune.image_size", 16, ">= 32"),
    ("augment_balance.target_per_class", -1, ">= 0"),
    ("augment_balance.max_copies_per_image", -1, ">= 0"),
    ("augment_balance.rotation_degrees", -10.0, ">= 0 and <= 180"),
    ("augment_balance.rotation_degrees", 270.0, ">= 0 and <= 180"),
    ("augment_balance.zoom", 1.0, ">= 0 and < 1"),
    ("augment_balance.shift", -0.1, ">= 0 and < 1"),
    ("augment_balance.horizontal_flip", 1.5, ">= 0 and <= 1"),
    ("augment_balance.horizontal_flip", -0.5, ">= 0 and <= 1"),
    ("pretrain.image_size", 0, ">= 32"),
    ("pretrain.epochs", 0, ">= 1"),
    ("pretrain.batch_size", 0, ">= 1"),
    ("pretrain.learning_rate", 0.0, "> 0"),
    ("pretrain.max_seconds", -1.0, ">= 0"),
    ("finetune.epochs", -1, ">= 1"),
    ("finetune.batch_size", -32, ">= 1"),
    ("finetune.learning_rate", -0.001, "> 0"),
    ("finetune.learning_rate", float("nan"), "a finite number and > 0"),
    ("finetune.max_seconds", float("inf"), "a finite number and >= 0"),
    ("finetune.beta_1", 1.0, ">= 0 and < 1"),
    ("finetune.label_smoothing", -0.1, ">= 0 and < 1"),
    ("finetune.label_smoothing", 1.0, ">= 0 and < 1"),
    ("finetune.weight_decay", -0.01, ">= 0 and < 1"),
    ("finetune.early_stopping_patience", -1, ">= 0"),
    ("finetune.dropout", 1.0, ">= 0 and < 1"),
    ("evaluate.bootstrap_samples", 0, ">= 1"),
]


@pytest.mark.parametrize(("dotted", "value", "valid"), OUT_OF_RANGE,
                         ids=[f"{dotted}={value}" for dotted, value, _ in OUT_OF_RANGE])
def test_out_of_range_value_stops_at_load_naming_key_value_and_range(tmp_path, dotted, value, valid):
    with pytest.raises(ParamsError) as error:
        load_with(tmp_path, dotted, value)
    message = str(error.value)
    assert message == f"params.yaml: {dotted} is {value!r}; it must be {valid}"


@pytest.mark.parametrize(("dotted", "value"), [
    ("seed", 0), ("validate.near_duplicate_max_distance", 0), ("validate.near_duplicate_max_distance", 64),
    ("validate.blank_max_std", 0), ("validate.max_sharpness_ratio", 1.01), ("augment_balance.horizontal_flip", 1.0),
    ("augment_balance.horizontal_flip", 0), ("augment_balance.rotation_degrees", 180), ("augment_balance.zoom", 0),
    ("finetune.image_size", 32), ("finetune.max_seconds", 0), ("finetune.dropout", 0.0),
    ("finetune.beta_1", 0.99), ("evaluate.bootstrap_samples", 1),
])
def test_the_edges_of_each_range_load(tmp_path, dotted, value):
    section, _, key = dotted.rpartition(".")
    params = load_with(tmp_path, dotted, value)
    assert getattr(getattr(params, section) if section else params, key) == value


def test_sha256_must_be_empty_or_64_hex_digits(tmp_path):
    with pytest.raises(ParamsError, match=r"fetch.sha256 is 'abc123'; give the 64 hex digits"):
        load_with(tmp_path, "fetch.sha256", "abc123")
    assert load_with(tmp_path, "fetch.sha256", "AB" * 32).fetch.sha256 == "AB" * 32


def test_params_yaml_loads():
    assert load_params(REPOSITORY / "params.yaml").finetune.epochs >= 1


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_applied_onto_params_yaml_loads(tmp_path, profile):
    overrides = load_profile(str(REPOSITORY / "profiles" / f"{profile}.yaml"))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(apply_overrides(base_params(), overrides)))
    params = load_params(path)
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        assert getattr(getattr(params, section), key) == value


def test_a_float_written_in_exponent_form_loads_as_a_float(tmp_path):
    # `dvc exp run -S finetune.learning_rate=0.00001` writes 1e-05, which YAML 1.1 reads as a string.
    path = tmp_path / "params.yaml"
    path.write_text((REPOSITORY / "params.yaml").read_text().replace("learning_rate: 0.002 ", "learning_rate: 1e-05 "))
    assert load_params(path).finetune.learning_rate == 1e-05
    with pytest.raises(ParamsError, match=r"finetune.learning_rate must be float, got 'fast' \(str\)"):
        load_with(tmp_path, "finetune.learning_rate", "fast")


def test_an_unknown_key_a_missing_key_and_a_wrong_type_each_stop_at_load(tmp_path):
    path = tmp_path / "params.yaml"
    params = base_params()
    params["finetune"]["learning_rte"] = 0.001  # a typo: it must not be ignored
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match="learning_rte"):
        load_params(path)
    params = base_params()
    del params["pretrain"]["optimizer"]  # a renamed or forgotten key: never a silent default
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match="pretrain.*optimizer"):
        load_params(path)
    with pytest.raises(ParamsError, match="finetune.epochs"):
        load_with(tmp_path, "finetune.epochs", "ten")


def test_a_cpu_math_other_than_fp32_or_bf16_stops_at_load(tmp_path):
    with pytest.raises(ParamsError, match=r"finetune.cpu_math is 'fp16'; choose one of 'fp32', 'bf16'"):
        load_with(tmp_path, "finetune.cpu_math", "fp16")


def test_training_settings_take_every_value_from_params_or_the_stage():
    from dlfer.model.train import TrainingSettings

    params = load_params(REPOSITORY / "params.yaml")
    assert TrainingSettings.from_params(params.finetune, 0).optimizer == params.finetune.optimizer
    with pytest.raises(ValueError, match="class_weights"):
        TrainingSettings.from_params(params.pretrain, 0)  # pretrain has no class_weights: the stage must fix it
