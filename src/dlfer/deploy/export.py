"""Writing a trained model in deployment formats, and checking each against the Keras model.

Formats (file names inside the output folder):
  saved_model/            TensorFlow SavedModel, endpoint `serve` (TF Serving, TF.js, TFLite input)
  model_float16.tflite    TFLite with float16 weights, float32 input and output
  model_int8.tflite       TFLite with int8 weights and activations, calibrated on real FER2013
                          training images; float32 input and output, so callers feed raw pixels as
                          for the others (see "int8" below for what stays float and why)
  model.onnx              ONNX (opset 17) through tf2onnx, for ONNX Runtime
  mlflow_model/           MLflow pyfunc taking image bytes or face arrays (dlfer.deploy.serving),
                          for `mlflow models serve -m <out>/mlflow_model --env-manager local`
Every format takes (N, 48, 48, 1) float32 raw pixels 0-255 and returns (N, 7) probabilities in
Kaggle label order: the preprocessing inside the Keras model travels with it. With mirror_average
(export.mirror_average, the default) each format answers the mean of each face and its mirror
(dlfer.model.mirror), as evaluate's headline figures do, at twice the work per face.

The SavedModel is traced with training=False explicitly. Keras 3.15's own model.export traces
`model(x)` without it, and when a Resizing layer precedes a keras.applications EfficientNet (as
in dlfer.model.backbones.build_classifier at any image_size other than 48, e.g. the paper's 224) that call
runs the backbone's stochastic-depth dropout: the exported model answers the same image
differently each time. Every other format is converted from this SavedModel.

int8: plain full-integer conversion of the EfficientNet-Lite0 model (finetune lite0_cpu, 64 px)
agreed with Keras on 95.9% of the PublicTest faces. Measured causes, largest first:
- weight rounding: Keras with only its folded conv weights rounded to int8 per channel, as the
  converter does, already agrees on only 97.0% (depthwise kernels cost most). Rounding shifts each
  output channel's mean; bias correction (Nagel et al. 2019, "Data-Free Quantization", section 4.2)
  measures that shift on the calibration images and moves the BatchNorm mean to cancel it, in a
  copy of the model that only the int8 conversion sees: 98.8% with rounded weights in Keras.
- the in-model preprocessing: the resize to 64 px and the (x - 127) / 128 scaling each round to
  256 levels in int8, three roundings of the input before the first convolution. These ops (and
  the 7-way head: the dense layer and the softmax, whose int8 output ties near-equal classes at
  1/256 steps) stay float32 through the converter's selective quantisation
  (tf.lite.experimental.QuantizationDebugOptions denylists).
- the stem: the converter's per-layer statistics (QuantizationDebugger.layer_statistics_dump) put
  the RMS error of the stem convolution's output, and of the depthwise layer after it, near 2.5
  quantisation steps, against about 0.3 for every other layer (0.29 is plain rounding). The stem
  (first convolution, its batch norm and activation) stays float32 too; it is a small share of the
  work. Keeping the depthwise layer after it float as well lowered the agreement.
Every other convolution stays int8. Together: 98.0% on the same faces, at the same speed (before
the stem was kept float; `parity.json` holds each export's own figure). int16 activations (the converter's 16x8
mode) gave 96.9%, as the error is in the weights, and ran 30 times slower on CPU. Calibrating on
1,000 images instead of 300 did not help. The export fails below export.min_top1_agreement.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from dlfer.fer2013 import IMAGE_SIDE

FORMATS = ("saved_model", "tflite_float16", "tflite_int8", "onnx", "mlflow")
FILE_NAMES = {"saved_model": "saved_model", "tflite_float16": "model_float16.tflite",
              "tflite_int8": "model_int8.tflite", "onnx": "model.onnx", "mlflow": "mlflow_model"}
ONNX_OPSET = 17  # supported by tf2onnx 1.17 and every ONNX Runtime since 1.12
# A few hundred images cover the activation ranges; 1,000 gave no better agreement on the real model.
DEFAULT_CALIBRATION_IMAGES = 300
# Ops kept float32 in the int8 model besides the preprocessing: the head (see the module docstring).
FLOAT_OPS_IN_INT8 = ("FULLY_CONNECTED", "SOFTMAX")
ENDPOINT = "serve"


class ExportError(ValueError):
    """An export cannot be written; the message names the format, the cause and the fix."""


class ParityError(ExportError):
    """An export was converted but disagrees with the Keras model more than params allow."""


def input_signature():
    import tensorflow as tf

    return [tf.TensorSpec((None, IMAGE_SIDE, IMAGE_SIDE, 1), tf.float32, name="pixels")]


def write_saved_model(model, folder: Path) -> None:
    """A SavedModel whose `serve` endpoint is the model in inference mode."""
    import keras

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(ENDPOINT, lambda pixels: model(pixels, training=False), input_signature=input_signature())
    archive.write_out(str(folder), verbose=False)


def representative_images(images: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` images drawn without replacement, as (count, 48, 48, 1) float32, for int8 calibration."""
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE) or len(images) == 0:
        raise ExportError(f"calibration images must be (N,{IMAGE_SIDE},{IMAGE_SIDE}) with N>0, got {images.shape}")
    chosen = rng.choice(len(images), size=min(count, len(images)), replace=False)
    return images[np.sort(chosen)].astype(np.float32)[..., np.newaxis]


def tflite_model(saved_model: Path, kind: str, calibration: np.ndarray | None = None,
                 float_layers: tuple[str, ...] = ()) -> bytes:
    """A TFLite flatbuffer: kind 'float16' (weights in float16) or 'int8' (int8 convolutions, float I/O).

    For int8, the ops of the Keras layers named in float_layers (the preprocessing and the stem, see
    the function float_layers) and the head's FULLY_CONNECTED and SOFTMAX stay float32.
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if kind == "float16":
        converter.target_spec.supported_types = [tf.float16]
        return converter.convert()
    if kind != "int8":
        raise ValueError(f"unknown TFLite kind {kind!r}; choose float16 or int8")
    if calibration is None or len(calibration) == 0:
        raise ExportError("tflite_int8 needs calibration images: pass --calibration data/balanced/train.npz")
    converter.representative_dataset = lambda: ([image[np.newaxis]] for image in calibration)
    # Float kernels are allowed for the denylisted ops; every convolution is still int8, per channel.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    # The debugger is the converter's selective-quantisation interface: it calibrates once, then
    # quantises the calibrated model with the denylists. Its debug dataset is only read by run().
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(FLOAT_OPS_IN_INT8))
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=lambda: ([image[np.newaxis]] for image in calibration[:1]),
        debug_options=options)
    nodes = _tensor_names_of_layers(debugger.calibrated_model, float_layers)
    if nodes:
        debugger.options = tf.lite.experimental.QuantizationDebugOptions(
            denylisted_ops=list(FLOAT_OPS_IN_INT8), denylisted_nodes=nodes)
    return debugger.get_nondebug_quantized_model()


def _tensor_names_of_layers(flatbuffer: bytes, layer_names: tuple[str, ...]) -> list[str]:
    """The tensors a TFLite model computes inside the named Keras layers.

    The converter names each tensor by the layers' scopes, e.g. 'ef_fer2_1/resize_1/resize/ResizeBilinear'
    (Keras 3 adds '_1' to each scope); a fused op lists each op's scope after ';', and only its first
    (its output) counts: the stem convolution also names the padding before it. A name that matches
    nothing leaves that layer int8: less accurate, caught by the parity check. The output op is listed too.
    """
    import tensorflow as tf

    if not layer_names:
        return []
    scopes = re.compile(r"(^|/)(" + "|".join(map(re.escape, layer_names)) + r")(_\d+)?/")
    interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    # The op that writes the model's output is named after the output (e.g. 'StatefulPartitionedCall_1:0'),
    # not its layer: it stays float with the named layers (the output is float32 anyway).
    outputs = {detail["name"] for detail in interpreter.get_output_details()}
    return sorted({detail["name"] for detail in interpreter.get_tensor_details()
                   if scopes.search(detail["name"].split(";")[0])} | outputs)


def float_layers(model) -> tuple[str, ...]:
    """Names of the layers the int8 model keeps float32: the preprocessing before the first convolution
    (the resize, grey-to-RGB and the backbone's input scaling in dlfer.model.backbones.build_classifier's
    models), then the first convolution with the layers after it up to the next convolution (its batch
    norm and activation: the stem). Nested models are looked into."""
    import keras

    def flattened(outer):
        for layer in outer.layers:
            yield from flattened(layer) if isinstance(layer, keras.Model) else (layer,)

    names, convolutions = [], 0
    for layer in flattened(model):
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)):
            convolutions += 1
            if convolutions == 2 or isinstance(layer, keras.layers.Dense):
                break
        if not isinstance(layer, keras.layers.InputLayer):
            names.append(layer.name)
    return tuple(names)


def _batch_norm_pairs(model) -> list[tuple]:
    """(convolution, the BatchNormalization right after it) in every nested model, by the naming that
    keras.applications and dlfer.model.lite0 share: x_conv -> x_bn, x_dwconv -> x_bn."""
    import keras

    pairs = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            pairs += _batch_norm_pairs(layer)
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)) and not layer.use_bias:
            bn_name = re.sub(r"_(dw)?conv$", "_bn", layer.name)
            try:
                batch_norm = model.get_layer(bn_name)
            except ValueError:
                continue
            if bn_name != layer.name and isinstance(batch_norm, keras.layers.BatchNormalization):
                pairs.append((model, layer, batch_norm))
    return pairs


def int8_rounded_kernel(kernel: np.ndarray, fold: np.ndarray, depthwise: bool) -> np.ndarray:
    """The kernel as the converter stores it: BatchNorm folded in (kernel * fold per output channel),
    rounded to int8 symmetrically per output channel (scale max|w| / 127), unfolded again."""
    shape = (1, 1, -1, 1) if depthwise else (1, 1, 1, -1)
    folded = kernel * fold.reshape(shape)
    scale = np.abs(folded).max(axis=(0, 1, 3) if depthwise else (0, 1, 2), keepdims=True) / 127
    scale[scale == 0] = 1
    rounded = np.round(folded / scale) * scale
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(fold.reshape(shape) != 0, rounded / fold.reshape(shape), kernel).astype(kernel.dtype)


def bias_corrected_copy(model, calibration: np.ndarray):
    """A copy of `model` whose BatchNorm means cancel the mean shift that int8 weight rounding causes.

    For each convolution followed by BatchNormalization: its input on the calibration images (in the
    float model), the convolution of that input with (rounded kernel - kernel), averaged per output
    channel, added to the moving mean, which the BatchNorm subtracts. The kernels stay float; the
    converter rounds them as int8_rounded_kernel does. Only the int8 conversion sees the copy.
    """
    import keras
    import tensorflow as tf

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    pairs = _batch_norm_pairs(copy)
    if not pairs:
        return copy
    inputs = {}
    for owner in {id(owner): owner for owner, _, _ in pairs}.values():
        convolutions = [conv for model_of, conv, _ in pairs if model_of is owner]
        if owner is copy:
            owner_input = calibration
        else:
            # The nested backbone's input: the output of the layer before it in the outer model
            # (build_classifier's models are a chain: pixels, resize, grey_to_rgb, backbone, head).
            before = copy.layers[copy.layers.index(owner) - 1]
            owner_input = keras.Model(copy.inputs, before.output).predict(calibration, verbose=0, batch_size=100)
        probe = keras.Model(owner.inputs, [conv.input for conv in convolutions])
        outputs = probe.predict(owner_input, verbose=0, batch_size=100)
        inputs.update(zip((conv.name for conv in convolutions), outputs if len(convolutions) > 1 else [outputs]))
    for _, conv, batch_norm in pairs:
        gamma, beta, mean, variance = batch_norm.get_weights()
        kernel = conv.get_weights()[0]
        depthwise = isinstance(conv, keras.layers.DepthwiseConv2D)
        fold = gamma / np.sqrt(variance + batch_norm.epsilon)
        difference = int8_rounded_kernel(kernel, fold, depthwise) - kernel
        strides, padding = tuple(conv.strides), conv.padding.upper()
        if depthwise:
            shift = tf.nn.depthwise_conv2d(inputs[conv.name], difference, (1, *strides, 1), padding)
        else:
            shift = tf.nn.conv2d(inputs[conv.name], difference, strides, padding)
        batch_norm.set_weights([gamma, beta, mean + np.asarray(shift).mean(axis=(0, 1, 2)), variance])
    return copy


def write_onnx(saved_model: Path, path: Path, opset: int = ONNX_OPSET) -> None:
    """ONNX through tf2onnx's command-line converter, its supported interface for a SavedModel.

    Its Python `from_function` leaves constants captured by Keras layers (the backbone's
    Normalization mean and variance) as extra graph inputs; the SavedModel loader freezes them.
    """
    command = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved_model),
               "--signature_def", "serving_default", "--output", str(path), "--opset", str(opset)]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0 or not path.is_file():
        tail = " | ".join(finished.stderr.strip().splitlines()[-3:])
        raise ExportError(f"onnx: tf2onnx failed ({tail}); check that tf2onnx and onnx are installed")


def agreement_report(reference: np.ndarray, probabilities: np.ndarray, labels: np.ndarray | None) -> dict:
    """Top-1 agreement with the reference model, largest probability difference, and accuracy if labelled."""
    report = {"top1_agreement": float(np.mean(reference.argmax(axis=1) == probabilities.argmax(axis=1))),
              "max_abs_difference": float(np.max(np.abs(reference - probabilities))),
              "n_images": int(len(reference))}
    if labels is not None:
        report["accuracy"] = float(np.mean(probabilities.argmax(axis=1) == labels))
    return report


def classifier_for(kind: str, path: Path):
    from dlfer.deploy import predict

    if kind == "saved_model":
        return predict.saved_model_classifier(path)
    if kind in ("tflite_float16", "tflite_int8"):
        return predict.tflite_classifier(path)
    if kind == "onnx":
        return predict.onnx_classifier(path)
    raise ValueError(f"no classifier for format {kind!r}")


def predict_in_batches(classifier, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    batch = images.astype(np.float32)[..., np.newaxis]
    return np.concatenate([classifier(batch[start:start + batch_size]) for start in range(0, len(batch), batch_size)])


def export_model(model_source: str | Path | None, folder: Path, formats: tuple[str, ...] = FORMATS,
                 calibration: np.ndarray | None = None, check_images: np.ndarray | None = None,
                 check_labels: np.ndarray | None = None, min_top1_agreement: float = 0.0,
                 mirror_average: bool = False) -> dict:
    """Write the chosen formats of a model (path or MLflow URI, as for `dlfer predict --model`) into
    `folder`, complete or not at all, and return the parity report. With mirror_average every format
    is of mirror.mirror_averaged(model), and so is the Keras model it is checked against.

    check_images (N, 48, 48) uint8 (validation faces: the test split is evaluate's alone) run through
    the Keras model and every export; the report holds each format's top-1 agreement with Keras,
    largest probability difference, and accuracy when check_labels are given. A format that agrees
    on fewer than min_top1_agreement of them raises ParityError, and nothing is written.
    """
    from dlfer.deploy import predict
    from dlfer.files import atomic_directory, write_json
    from dlfer.model import mirror

    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ExportError(f"unknown or no format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    model = predict.keras_model_from(model_source)
    predict.keras_classifier(model)  # checks the (None, 48, 48, 1) interface before any conversion
    model = mirror.unwrapped(model)  # e.g. the mlflow_model of an earlier export: mirror_average decides
    shipped = mirror.answering(model, mirror_average)
    report: dict = {"model": str(model_source or predict.DEFAULT_MODEL), "formats": {},
                    "mirror_average": mirror_average}
    reference = None
    if check_images is not None:
        reference = predict_in_batches(predict.keras_classifier(shipped), check_images)
        if check_labels is not None:
            report["keras_accuracy"] = float(np.mean(reference.argmax(axis=1) == check_labels))
    with atomic_directory(folder) as temporary:
        saved_model = temporary / FILE_NAMES["saved_model"]
        write_saved_model(shipped, saved_model)
        for kind in formats:
            target = temporary / FILE_NAMES[kind]
            if kind == "tflite_float16":
                target.write_bytes(tflite_model(saved_model, "float16"))
            elif kind == "tflite_int8":
                target.write_bytes(_int8_model(model, calibration, temporary / "int8_source", mirror_average))
            elif kind == "onnx":
                write_onnx(saved_model, target)
            elif kind == "mlflow":
                from dlfer.deploy import serving

                serving.save_pyfunc(shipped, target)
            entry = {"path": str(folder / FILE_NAMES[kind]), "bytes": _size(target)}
            if reference is not None and kind != "mlflow":
                probabilities = predict_in_batches(classifier_for(kind, target), check_images)
                entry.update(agreement_report(reference, probabilities, check_labels))
                if entry["top1_agreement"] < min_top1_agreement:
                    raise ParityError(
                        f"{kind}: top-1 agreement with Keras {entry['top1_agreement']:.4f} on {len(check_images)} "
                        f"check faces is below export.min_top1_agreement {min_top1_agreement} (params.yaml); "
                        "nothing was written")
            report["formats"][kind] = entry
        if "saved_model" not in formats:
            import shutil

            shutil.rmtree(saved_model)
        write_json(temporary / "parity.json", report)
    return report


def _int8_model(model, calibration: np.ndarray | None, scratch: Path, mirror_average: bool = False) -> bytes:
    """The int8 flatbuffer, converted from a bias-corrected copy of the model (see the module docstring),
    mirror-averaged if asked: the mirror and the average stay float32 like the preprocessing."""
    import shutil

    from dlfer.model import mirror

    if calibration is None or len(calibration) == 0:
        raise ExportError("tflite_int8 needs calibration images: pass --calibration data/balanced/train.npz")
    corrected = bias_corrected_copy(model, calibration)
    kept_float = float_layers(model)
    if mirror_average:
        corrected = mirror.mirror_averaged(corrected)
        kept_float += (mirror.MIRROR_LAYER, mirror.AVERAGE_LAYER)
    write_saved_model(corrected, scratch)
    try:
        return tflite_model(scratch, "int8", calibration, float_layers=kept_float)
    finally:
        shutil.rmtree(scratch)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def load_split(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """images (N, 48, 48) uint8 and labels (or None) from a split file like data/balanced/test.npz."""
    if not Path(path).is_file():
        raise ExportError(f"{path}: not found; run the pipeline (dvc repro augment_balance) or pass another .npz")
    try:
        with np.load(path, allow_pickle=False) as archive:
            images = archive["images"]
            labels = archive["labels"].astype(np.int64) if "labels" in archive.files else None
    except (OSError, ValueError, KeyError) as error:
        raise ExportError(f"{path}: not a .npz with an 'images' array ({error})") from None
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE) or len(images) == 0:
        raise ExportError(f"{path}: images must be (N,{IMAGE_SIDE},{IMAGE_SIDE}) with N>0, got {images.shape}")
    return images, labels
