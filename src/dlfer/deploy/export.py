"""Writing a trained model in deployment formats, and checking each against the Keras model.

Formats (file names inside the output folder):
  saved_model/            TensorFlow SavedModel, endpoint `serve` (TF Serving, TF.js, TFLite input)
  model_float16.tflite    TFLite with float16 weights, float32 input and output
  model_int8.tflite       TFLite with int8 weights and activations, calibrated on real FER2013
                          images; float32 input and output, so callers feed raw pixels as for the others
  model.onnx              ONNX (opset 17) through tf2onnx, for ONNX Runtime
  mlflow_model/           MLflow pyfunc taking image bytes or face arrays (dlfer.deploy.serving),
                          for `mlflow models serve -m <out>/mlflow_model --env-manager local`
Every format takes (N, 48, 48, 1) float32 raw pixels 0-255 and returns (N, 7) probabilities in
Kaggle label order: the preprocessing inside the Keras model travels with it.

The SavedModel is traced with training=False explicitly. Keras 3.15's own model.export traces
`model(x)` without it, and when a Resizing layer precedes a keras.applications EfficientNet (as
in dlfer.model.backbones.build_classifier at any image_size other than 48, e.g. the paper's 224) that call
runs the backbone's stochastic-depth dropout: the exported model answers the same image
differently each time. Every other format is converted from this SavedModel.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from dlfer.fer2013 import IMAGE_SIDE

FORMATS = ("saved_model", "tflite_float16", "tflite_int8", "onnx", "mlflow")
FILE_NAMES = {"saved_model": "saved_model", "tflite_float16": "model_float16.tflite",
              "tflite_int8": "model_int8.tflite", "onnx": "model.onnx", "mlflow": "mlflow_model"}
ONNX_OPSET = 17  # supported by tf2onnx 1.17 and every ONNX Runtime since 1.12
# A few hundred images cover the activation ranges; more only slows calibration.
DEFAULT_CALIBRATION_IMAGES = 300
ENDPOINT = "serve"


class ExportError(ValueError):
    """An export cannot be written; the message names the format, the cause and the fix."""


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


def tflite_model(saved_model: Path, kind: str, calibration: np.ndarray | None = None) -> bytes:
    """A TFLite flatbuffer: kind 'float16' (weights in float16) or 'int8' (full integer, float I/O)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if kind == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif kind == "int8":
        if calibration is None or len(calibration) == 0:
            raise ExportError("tflite_int8 needs calibration images: pass --calibration data/balanced/train.npz")

        def batches():
            for image in calibration:
                yield [image[np.newaxis]]
        converter.representative_dataset = batches
        # Integer kernels only, so the model runs on int8-only accelerators (Edge TPU, NPUs);
        # the input and output stay float32 through quantize/dequantize ops at the ends.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    else:
        raise ValueError(f"unknown TFLite kind {kind!r}; choose float16 or int8")
    return converter.convert()


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
                 check_labels: np.ndarray | None = None) -> dict:
    """Write the chosen formats of a model (path or MLflow URI, as for `dlfer predict --model`) into
    `folder`, complete or not at all, and return the parity report.

    check_images (N, 48, 48) uint8 run through the Keras model and every export; the report holds
    each format's top-1 agreement with Keras, largest probability difference, and accuracy when
    check_labels are given.
    """
    from dlfer.deploy import predict
    from dlfer.files import atomic_directory, write_json

    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ExportError(f"unknown or no format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    model = predict.keras_model_from(model_source)
    predict.keras_classifier(model)  # checks the (None, 48, 48, 1) interface before any conversion
    report: dict = {"model": str(model_source or predict.DEFAULT_MODEL), "formats": {}}
    reference = None
    if check_images is not None:
        reference = predict_in_batches(predict.keras_classifier(model), check_images)
        if check_labels is not None:
            report["keras_accuracy"] = float(np.mean(reference.argmax(axis=1) == check_labels))
    with atomic_directory(folder) as temporary:
        saved_model = temporary / FILE_NAMES["saved_model"]
        write_saved_model(model, saved_model)
        for kind in formats:
            target = temporary / FILE_NAMES[kind]
            if kind in ("tflite_float16", "tflite_int8"):
                target.write_bytes(tflite_model(saved_model, kind.split("_")[1], calibration))
            elif kind == "onnx":
                write_onnx(saved_model, target)
            elif kind == "mlflow":
                from dlfer.deploy import serving

                serving.save_pyfunc(model, target)
            entry = {"path": str(folder / FILE_NAMES[kind]), "bytes": _size(target)}
            if reference is not None and kind != "mlflow":
                probabilities = predict_in_batches(classifier_for(kind, target), check_images)
                entry.update(agreement_report(reference, probabilities, check_labels))
            report["formats"][kind] = entry
        if "saved_model" not in formats:
            import shutil

            shutil.rmtree(saved_model)
        write_json(temporary / "parity.json", report)
    return report


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
