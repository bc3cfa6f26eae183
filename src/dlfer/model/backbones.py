"""EF-FER1 and EF-FER2: an EfficientNet backbone, and the 7-way emotion classifier built around it.

EF-FER2 takes what the data stages store, (48, 48, 1) greyscale pixels as raw 0-255 floats, and
does all of its preprocessing itself: resize to finetune.image_size, repeat grey to
finetune.channels, then the backbone's own input scaling. A saved model.keras therefore needs
nothing but pixels, and inference cannot drift from training.

Input scaling differs from the paper's "divide by 255" (section 2.2): Keras' EfficientNet starts
with Rescaling(1/255) followed by a Normalization layer. With random weights that Normalization
is the identity (mean 0, variance 1), so the network sees exactly pixel/255, as in the paper;
with ImageNet weights it holds the ImageNet channel mean and standard deviation, so the network
sees (pixel/255 - mean) / std, the scaling those weights were trained with. EfficientNet-Lite0
(dlfer.model.lite0) scales as (pixel - 127) / 128, as its TF reference does.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import keras
import numpy as np
from keras import layers

from dlfer.fer2013 import EMOTIONS, IMAGE_SIDE
from dlfer.files import sha256_of_file

KERAS_BACKBONES = {
    "efficientnet_b0": "EfficientNetB0",
    "efficientnet_b1": "EfficientNetB1",
    "efficientnet_b2": "EfficientNetB2",
    "efficientnet_b3": "EfficientNetB3",
}
LITE0 = "efficientnet_lite0"
BACKBONES = (*KERAS_BACKBONES, LITE0)
BACKBONE_LAYER = "backbone"
HEAD_LAYER = "emotion"
NUM_CLASSES = len(EMOTIONS)

# keras.applications downloads its published weights from here (the same files it caches in
# ~/.keras/models); we fetch them by URL so that "imagenet" and a local weights_file take one path.
KERAS_WEIGHTS_URL = "https://storage.googleapis.com/keras-applications/"
# The published Keras EfficientNet weights store these ImageNet *standard deviations* in the
# Normalization layer's variance slot; keras.applications compensates with an extra Rescaling
# layer that only exists when weights="imagenet" (tensorflow/tensorflow#49930). We build one
# architecture for every weight source and store the true variance (std squared) instead.
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)
# BatchNorm moving-average momentum when a caller gives none (PyTorch's default; Keras uses 0.99). The
# stages pass pretrain.batch_norm_momentum / finetune.batch_norm_momentum; params.yaml says why 0.9.
BATCH_NORM_MOMENTUM = 0.9


class ModelError(ValueError):
    """A backbone or weights file cannot be used as asked; the message names the cause and the fix."""


def build_backbone(name: str, image_size: int, weights: str | Path | None = None, channels: int = 3,
                   batch_norm_momentum: float | None = None) -> keras.Model:
    """An EfficientNet feature extractor named "backbone": (S, S, channels) floats 0-255 -> feature map.

    weights: None (random), "imagenet" (published weights, downloaded where there is a network),
    or the path of a weights file (Keras .h5 / .weights.h5; for efficientnet_lite0 also its .pth).
    batch_norm_momentum replaces Keras' 0.99 in every BatchNormalization layer when given.
    """
    if name not in BACKBONES:
        raise ModelError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if channels not in (1, 3):
        raise ModelError(f"channels must be 1 or 3, got {channels}")
    if weights is not None and channels != 3:
        raise ModelError(f"pretrained {name} weights expect 3 input channels; set finetune.channels: 3 "
                         "or train from random weights")
    input_shape = (image_size, image_size, channels)
    if name == LITE0:
        from dlfer.model.lite0 import build_efficientnet_lite0  # another module; imported only when asked for

        backbone = build_efficientnet_lite0(input_shape=input_shape, include_top=False, name=BACKBONE_LAYER)
    else:
        if image_size < 32:
            raise ModelError(f"{name} needs image_size >= 32, got {image_size}")
        constructor = getattr(keras.applications, KERAS_BACKBONES[name])
        # weights=None keeps the input layers identical for every weight source (see IMAGENET_STDDEV_RGB).
        backbone = constructor(include_top=False, weights=None, input_shape=input_shape, pooling=None,
                               name=BACKBONE_LAYER)
    if weights is not None:
        load_backbone_weights(backbone, name, weights)
    if batch_norm_momentum is not None:
        set_batch_norm_momentum(backbone, batch_norm_momentum)
    return backbone


def load_backbone_weights(backbone: keras.Model, name: str, weights: str | Path) -> dict:
    """Load ImageNet or file weights into a backbone from build_backbone; return their provenance."""
    if name == LITE0:
        from dlfer.model import lite0

        if weights == "imagenet" or Path(weights).suffix == ".pth":
            return lite0.load_imagenet_weights(backbone, None if weights == "imagenet" else weights)
    path = imagenet_weights_path(name) if weights == "imagenet" else Path(weights)
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found; set pretrain.weights_file to an existing file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            backbone.load_weights(path)
        except (ValueError, OSError, KeyError) as error:
            # Keras also warns once per layer that failed; the error already says it all.
            raise ModelError(f"{path}: cannot load into {name} ({str(error)[:200]}); the file must hold {name} "
                             "weights without the top (e.g. Keras' efficientnetb0_notop.h5)") from None
    for warning in caught:
        warnings.warn(warning.message, warning.category, stacklevel=2)
    _store_true_imagenet_variance(backbone)
    return {"weights": str(weights), "file": str(path), "sha256": sha256_of_file(path)}


def imagenet_weights_path(name: str) -> Path:
    """The published Keras ImageNet weights of a backbone (no top), from the Keras cache or the network."""
    file_name = KERAS_BACKBONES[name].lower() + "_notop.h5"
    try:
        return Path(keras.utils.get_file(file_name, KERAS_WEIGHTS_URL + file_name, cache_subdir="models"))
    except Exception as error:  # get_file raises plain Exception subclasses for network failures
        raise ModelError(f"cannot download {KERAS_WEIGHTS_URL + file_name} ({error}); on an offline machine "
                         "copy that file onto it and set pretrain.weights_file to its path") from None


def _store_true_imagenet_variance(backbone: keras.Model) -> None:
    layer = _input_normalization(backbone)
    if layer is None:
        return
    mean, variance, count = layer.get_weights()
    if variance.shape == (3,) and np.allclose(variance, IMAGENET_STDDEV_RGB, atol=1e-4):
        layer.set_weights([mean, np.square(np.asarray(IMAGENET_STDDEV_RGB, variance.dtype)), count])
        layer.finalize_state()  # Normalization caches its statistics; set_weights alone would not reach them


def _input_normalization(backbone: keras.Model):
    found = [layer for layer in backbone.layers if isinstance(layer, layers.Normalization)]
    return found[0] if len(found) == 1 else None


def set_batch_norm_momentum(model: keras.Model, momentum: float) -> None:
    """Set the moving-average momentum of every BatchNormalization layer, nested models included."""
    if not 0.0 <= momentum < 1.0:
        raise ModelError(f"batch-norm momentum must be in [0, 1), got {momentum}")
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = float(momentum)


def build_classifier(backbone_name: str, image_size: int, channels: int, dropout: float,
                     backbone_weights: str | Path | None = None, pretrained_backbone: keras.Model | None = None,
                     batch_norm_momentum: float = BATCH_NORM_MOMENTUM) -> keras.Model:
    """EF-FER2: (N, 48, 48, 1) raw 0-255 pixels -> (N, 7) emotion probabilities in Kaggle label order.

    The backbone starts from random weights, from `backbone_weights` (None, "imagenet" or a weights
    file, as in build_backbone), or from `pretrained_backbone` (EF-FER1's backbone, copied layer by
    layer by name, see transfer_backbone_weights). Every layer is trainable: the paper fine-tunes
    all of them. The head is new: dropout, then a dense softmax layer, kept in float32 so that
    mixed precision never rounds the probabilities.
    """
    if backbone_weights is not None and pretrained_backbone is not None:
        raise ModelError("give backbone_weights or pretrained_backbone, not both")
    pixels = keras.Input(shape=(IMAGE_SIDE, IMAGE_SIDE, 1), name="pixels")
    x = pixels
    if image_size != IMAGE_SIDE:
        x = layers.Resizing(image_size, image_size, interpolation="bilinear", name="resize")(x)
    if channels == 3:
        x = layers.Concatenate(axis=-1, name="grey_to_rgb")([x, x, x])
    elif channels != 1:
        raise ModelError(f"channels must be 1 or 3, got {channels}")
    backbone = build_backbone(backbone_name, image_size, weights=backbone_weights, channels=channels)
    if pretrained_backbone is not None:
        transfer_backbone_weights(pretrained_backbone, backbone)
    x = backbone(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    probabilities = layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32", name=HEAD_LAYER)(x)
    model = keras.Model(pixels, probabilities, name="ef_fer2")
    set_batch_norm_momentum(model, batch_norm_momentum)
    return model


def build_pretrain_classifier(backbone_name: str, image_size: int, num_classes: int, dropout: float,
                              input_size: int | None = None,
                              batch_norm_momentum: float = BATCH_NORM_MOMENTUM) -> keras.Model:
    """EF-FER1 while it trains: (N, input_size, input_size, 3) RGB 0-255 -> softmax over the source classes.

    Images are resized to image_size inside the model when input_size differs. Only the backbone
    (model.get_layer("backbone")) is kept; the head is thrown away after pretraining.
    """
    input_size = input_size or image_size
    images = keras.Input(shape=(input_size, input_size, 3), name="images")
    x = images
    if input_size != image_size:
        x = layers.Resizing(image_size, image_size, interpolation="bilinear", name="resize")(x)
    backbone = build_backbone(backbone_name, image_size, batch_norm_momentum=batch_norm_momentum)
    x = backbone(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    probabilities = layers.Dense(num_classes, activation="softmax", dtype="float32", name="source_classes")(x)
    return keras.Model(images, probabilities, name="ef_fer1")


def transfer_backbone_weights(source: keras.Model, target: keras.Model) -> dict:
    """Copy every weighted layer of `source` into the layer of the same name in `target`.

    Both must be the same backbone architecture; image size may differ (no weight depends on it).
    A 3-channel source feeds a 1-channel target by summing the stem kernel over its input
    channels, which is exactly what the 3-channel network computes on a grey image repeated three
    times, and by averaging the input normalisation statistics (exact for random or from-scratch
    weights, whose normalisation is the identity). Returns counts for the provenance.
    """
    source_layers, target_layers = _weighted_layers(source), _weighted_layers(target)
    if set(source_layers) != set(target_layers):
        missing = sorted(set(target_layers) - set(source_layers))
        extra = sorted(set(source_layers) - set(target_layers))
        raise ModelError(f"pretrained backbone does not match: layers without weights {missing[:5]}, unused "
                         f"weights {extra[:5]}; pretrain.backbone must equal finetune.backbone")
    tensors = 0
    for key, target_layer in target_layers.items():
        arrays = source_layers[key].get_weights()
        expected = [tuple(weight.shape) for weight in target_layer.weights]
        if key == "stem_conv" and arrays[0].shape[2] == 3 and expected[0][2] == 1:
            arrays[0] = arrays[0].sum(axis=2, keepdims=True)
        if isinstance(target_layer, layers.Normalization) and arrays[0].shape == (3,) and expected[0] == (1,):
            arrays[0], arrays[1] = arrays[0].mean(keepdims=True), arrays[1].mean(keepdims=True)
        if [array.shape for array in arrays] != expected:
            raise ModelError(f"layer {key!r}: pretrained weights have shapes {[a.shape for a in arrays]}, "
                             f"the model expects {expected}")
        target_layer.set_weights(arrays)
        if isinstance(target_layer, layers.Normalization):
            target_layer.finalize_state()
        tensors += len(arrays)
    return {"layers_transferred": len(target_layers), "tensors_transferred": tensors}


def _weighted_layers(backbone: keras.Model) -> dict:
    # keras.applications names every weighted layer except the input Normalization, which gets an
    # automatic name (normalization, normalization_1, ...) depending on how many were built before.
    keyed = {}
    for layer in backbone.layers:
        if layer.weights:
            keyed["input_normalization" if isinstance(layer, layers.Normalization) else layer.name] = layer
    return keyed
