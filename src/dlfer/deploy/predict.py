"""Emotions of the faces in image files, folders of them and videos.

Each input frame goes through face detection (dlfer.deploy.faces), each face is cut to a 48x48
greyscale crop like FER2013's, and crops from many frames are classified together in batches.
The model does its own resizing, channel repetition and scaling (the finetune stage builds it
that way), so the crops are handed over as raw 0-255 pixels and inference cannot drift from
training.

A classifier here is any function from a (N, 48, 48, 1) float32 batch of raw pixels to (N, 7)
probabilities in Kaggle label order. load_classifier makes one from a Keras file, a folder
holding one, an MLflow model URI, or one of `dlfer export`'s files (SavedModel, .tflite, .onnx).

Bad inputs (missing, unreadable, not an image or video, a folder with none, no face found)
become Problem entries; the run goes on with the other inputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dlfer.deploy import faces
from dlfer.fer2013 import EMOTIONS, IMAGE_SIDE

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
DEFAULT_MODEL = Path("models/finetune/with_ef_fer1/model.keras")
# One row per face. frame and time (seconds from the video's start) are empty for photos; faces
# are numbered from 1 in reading order (dlfer.deploy.faces.reading_order), as the annotated copies show.
RECORD_FIELDS = ("file", "frame", "time", "face", "x", "y", "width", "height", "emotion",
                 *(f"probability_{emotion}" for emotion in EMOTIONS))

Classifier = Callable[[np.ndarray], np.ndarray]


class PredictInputError(ValueError):
    """An input or model cannot be used; the message names it and the fix."""


class InputFile(NamedTuple):
    path: Path
    relative: Path  # where annotated output goes under --annotate: the path below the argument given


class Problem(NamedTuple):
    path: str
    reason: str


@dataclasses.dataclass
class Outcome:
    records: list[dict]
    problems: list[Problem]
    frames: int = 0


# ---------------------------------------------------------------- inputs

def collect_inputs(arguments: list[str | Path]) -> tuple[list[InputFile], list[Problem]]:
    """Files named directly (whatever their suffix), and images and videos found below folders, sorted."""
    found, problems = [], []
    for argument in map(Path, arguments):
        if argument.is_file():
            found.append(InputFile(argument, Path(argument.name)))
        elif argument.is_dir():
            inside = sorted(path for path in argument.rglob("*")
                            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES)
            if not inside:
                problems.append(Problem(str(argument), "folder holds no images or videos "
                                        f"({', '.join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)})"))
            found.extend(InputFile(path, path.relative_to(argument)) for path in inside)
        else:
            problems.append(Problem(str(argument), "no such file or folder"))
    return found, problems


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB, turned upright as the camera's EXIF orientation says (phone photos)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            upright = ImageOps.exif_transpose(image)
            return np.asarray(upright.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise PredictInputError(f"not a readable image ({error.__class__.__name__}: {error})") from None


def _open_video(path: Path):
    import cv2

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        return None
    return capture


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def video_frame_count(path: Path) -> int:
    import cv2

    capture = _open_video(path)
    if capture is None:
        return 0
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    capture.release()
    return max(count, 0)


def read_video(path: Path, frame_step: int = 1) -> Iterator[tuple[int, np.ndarray]]:
    """(frame index, RGB frame) for every frame_step-th frame of a video."""
    import cv2

    capture = _open_video(path)
    if capture is None:
        raise PredictInputError("not a readable video (OpenCV could not open it)")
    try:
        index = 0
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            if index % frame_step == 0:
                yield index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            index += 1
        if index == 0:
            raise PredictInputError("not a readable video (no frame could be decoded)")
    finally:
        capture.release()


def video_fps(path: Path) -> float:
    import cv2

    capture = _open_video(path)
    fps = capture.get(cv2.CAP_PROP_FPS) if capture is not None else 0.0
    if capture is not None:
        capture.release()
    return fps if fps and fps > 0 else 25.0


# ---------------------------------------------------------------- classifiers

def keras_classifier(model) -> Classifier:
    expected = (None, IMAGE_SIDE, IMAGE_SIDE, 1)
    shape = tuple(model.inputs[0].shape)
    if shape != expected:
        raise PredictInputError(f"model input shape {shape}; dlfer models take {expected} raw pixels 0-255 "
                                "(preprocessing inside the model): use a model from the finetune stage")

    import tensorflow as tf

    # One trace for every batch size: predict_on_batch retraces for each new size, which for an
    # EfficientNet costs seconds per odd-sized last batch. training=False keeps dropout off.
    infer = tf.function(lambda pixels: model(pixels, training=False),
                        input_signature=[tf.TensorSpec((None, IMAGE_SIDE, IMAGE_SIDE, 1), tf.float32)])

    def classify(batch: np.ndarray) -> np.ndarray:
        return np.asarray(infer(tf.constant(batch, dtype=tf.float32)), dtype=np.float32)
    return classify


def saved_model_classifier(folder: Path) -> Classifier:
    """A SavedModel written by `dlfer export` (Keras' export: endpoint `serve`)."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(folder))
    if not hasattr(loaded, "serve"):
        raise PredictInputError(f"{folder}: SavedModel without a `serve` endpoint; write it with `dlfer export`")

    def classify(batch: np.ndarray) -> np.ndarray:
        return np.asarray(loaded.serve(tf.constant(batch, dtype=tf.float32)), dtype=np.float32)
    return classify


def tflite_classifier(path: Path, threads: int | None = None) -> Classifier:
    """A .tflite model with float32 input and output (the int8 export keeps float I/O too)."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(path), num_threads=threads or os.cpu_count())
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]
    allocated_for = [None]

    def classify(batch: np.ndarray) -> np.ndarray:
        # The interpreter has fixed shapes: resize it when the batch size changes.
        if allocated_for[0] != batch.shape:
            interpreter.resize_tensor_input(input_index, batch.shape)
            interpreter.allocate_tensors()
            allocated_for[0] = batch.shape
        interpreter.set_tensor(input_index, batch.astype(np.float32))
        interpreter.invoke()
        return np.array(interpreter.get_tensor(output_index), dtype=np.float32)
    return classify


def onnx_classifier(path: Path) -> Classifier:
    import onnxruntime

    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
    providers = [name for name in wanted if name in onnxruntime.get_available_providers()]
    session = onnxruntime.InferenceSession(str(path), providers=providers)
    input_name = session.get_inputs()[0].name

    def classify(batch: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {input_name: batch.astype(np.float32)})[0], dtype=np.float32)
    return classify


def load_keras_model(path: Path):
    import keras

    import dlfer.model.mirror  # noqa: F401  registers its layer, which a mirror-averaged export holds
    try:
        return keras.models.load_model(path, compile=False)
    except (OSError, ValueError, TypeError) as error:
        raise PredictInputError(f"{path}: not a loadable Keras model ({error}); pass a model.keras "
                                "written by the finetune stage") from None


def resolve_model_source(source: str | Path | None) -> Path:
    """A local model file or folder for a path, or for an MLflow URI (models:/<name>@<alias>, runs:/...)."""
    if source is None or str(source) == "":
        if not DEFAULT_MODEL.is_file():
            raise PredictInputError(f"{DEFAULT_MODEL}: not found; run the pipeline (dvc repro) or pass --model with "
                                    "a path, or models:/dlfer-ef-fer2@champion from the MLflow registry")
        return DEFAULT_MODEL
    text = str(source)
    if text.startswith(("models:/", "runs:/")):
        import mlflow
        from mlflow.exceptions import MlflowException

        from dlfer.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri())
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=text))
        except (MlflowException, OSError) as error:
            raise PredictInputError(f"{text}: not found in the MLflow store {mlflow.get_tracking_uri()} "
                                    f"({str(error).splitlines()[0]}); run the compare stage, which registers the "
                                    "model, or set MLFLOW_TRACKING_URI") from None
    path = Path(text)
    if not path.exists():
        raise PredictInputError(f"{path}: no such model file or folder; pass a model.keras, an export, "
                                "or models:/<name>@<alias>")
    return path


def keras_model_from(source: str | Path | None = None):
    """The Keras model behind a path or MLflow URI: a .keras file, a folder holding exactly one, or an
    MLflow model with the keras flavour."""
    path = resolve_model_source(source)
    if path.is_file():
        return load_keras_model(path)
    keras_files = sorted(path.rglob("*.keras"))
    if len(keras_files) == 1:
        return load_keras_model(keras_files[0])
    if (path / "MLmodel").is_file() and not keras_files:
        import mlflow

        try:
            return mlflow.keras.load_model(str(path))
        except Exception as error:  # MLflow raises assorted types for a flavour it cannot load
            raise PredictInputError(f"{path}: MLflow model without a loadable Keras flavour ({error})") from None
    what = f"{len(keras_files)} .keras files" if keras_files else "no .keras file or MLmodel"
    raise PredictInputError(f"{path}: folder holds {what}; pass the model file itself")


def load_classifier(source: str | Path | None = None, mirror: bool | None = None) -> tuple[Classifier, str]:
    """A classifier and a description of what was loaded: a Keras model (see keras_model_from), or an
    export of `dlfer export` (a .tflite or .onnx file, a SavedModel folder).

    A Keras model answers the mean of each face and its mirror (what evaluate's headline measures), or
    with mirror=False the face alone. An export answers as it was exported (its parity.json says how),
    so an explicit mirror is refused for one.
    """
    path = resolve_model_source(source)
    suffix = path.suffix.lower()
    export = ("TFLite" if path.is_file() and suffix == ".tflite" else "ONNX" if path.is_file() and suffix == ".onnx"
              else "SavedModel" if path.is_dir() and (path / "saved_model.pb").is_file() else None)
    if export is not None and mirror is not None:
        raise PredictInputError(f"{path}: an export answers as it was exported (mirror_average in its parity.json); "
                                f"drop --{'' if mirror else 'no-'}mirror, or export again with it")
    if export == "TFLite":
        return tflite_classifier(path), f"TFLite {path}"
    if export == "ONNX":
        return onnx_classifier(path), f"ONNX {path}"
    if export == "SavedModel":
        return saved_model_classifier(path), f"SavedModel {path}"
    from dlfer.model.mirror import answering

    mirror_average = mirror is not False
    views = "the mean of each face and its mirror" if mirror_average else "each face alone"
    return keras_classifier(answering(keras_model_from(path), mirror_average)), f"Keras model {path} ({views})"


def classify_crops(classifier: Classifier, crops: list[np.ndarray]) -> np.ndarray:
    batch = np.stack(crops).astype(np.float32)[..., np.newaxis]
    probabilities = classifier(batch)
    if probabilities.shape != (len(crops), len(EMOTIONS)):
        raise PredictInputError(f"model output shape {probabilities.shape}; expected ({len(crops)}, {len(EMOTIONS)}) "
                                "probabilities in Kaggle label order")
    return probabilities


# ---------------------------------------------------------------- the run

@dataclasses.dataclass
class _Frame:
    source: InputFile
    frame: int | None
    time: float | None  # seconds from the start of the video
    faces: list[faces.Face]
    image: np.ndarray | None  # RGB, kept only when annotating


def face_record(file: str, frame: int | None, time: float | None, number: int, box: faces.Box,
                probabilities: np.ndarray) -> dict:
    record = {"file": file, "frame": frame, "time": time, "face": number, "x": box.x, "y": box.y,
              "width": box.width, "height": box.height, "emotion": EMOTIONS[int(np.argmax(probabilities))]}
    record.update({f"probability_{emotion}": round(float(value), 6) for emotion, value in zip(EMOTIONS, probabilities)})
    return record


def draw_faces(image: np.ndarray, boxes: list[faces.Box], probabilities: np.ndarray) -> np.ndarray:
    """A copy of the RGB image with each box, its number (from 1, the tables' face column), emotion and
    probability drawn on it."""
    import cv2

    canvas = np.ascontiguousarray(image.copy())
    thickness = max(1, round(max(image.shape[:2]) / 400))
    for number, (box, row) in enumerate(zip(boxes, probabilities), start=1):
        label = f"{number} {EMOTIONS[int(np.argmax(row))]} {float(np.max(row)):.2f}"
        cv2.rectangle(canvas, (box.x, box.y), (box.x + box.width, box.y + box.height), (0, 255, 0), thickness)
        scale = max(0.4, box.width / 160)
        (text_width, text_height), baseline = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        top = max(box.y - text_height - baseline - 2, 0)
        cv2.rectangle(canvas, (box.x, top), (box.x + text_width + 2, top + text_height + baseline + 2), (0, 255, 0), -1)
        cv2.putText(canvas, label, (box.x + 1, top + text_height + 1), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (0, 0, 0), thickness, cv2.LINE_AA)
    return canvas


def _write_image(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    from dlfer.files import atomic_path

    with atomic_path(path) as temporary:
        # atomic_path's temporary name ends in .partial, so the format is given explicitly.
        Image.fromarray(rgb).save(temporary, format=_pillow_format(path.suffix))


def _pillow_format(suffix: str) -> str:
    known = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".gif": "GIF", ".webp": "WEBP",
             ".tif": "TIFF", ".tiff": "TIFF", ".pgm": "PPM", ".ppm": "PPM"}
    return known.get(suffix.lower(), "PNG")


class _VideoSink:
    """An annotated copy of one video (mp4v), written to a temporary file and moved into place on close."""

    def __init__(self, path: Path, fps: float):
        self.path, self.fps = path.with_suffix(".mp4"), fps
        self.temporary = self.path.with_name(f".{self.path.name}.partial.mp4")
        self.writer = None

    def write(self, rgb: np.ndarray) -> None:
        import cv2

        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            height, width = rgb.shape[:2]
            self.writer = cv2.VideoWriter(str(self.temporary), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (width, height))
        self.writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    def close(self, keep: bool) -> None:
        if self.writer is not None:
            self.writer.release()
        if keep and self.temporary.exists():
            os.replace(self.temporary, self.path)
        self.temporary.unlink(missing_ok=True)


class _Run:
    """One predict_inputs call: frames wait in `pending` until enough faces fill a batch.

    Frames are classified and written out in input order, and a video's frames are all flushed
    before its end, so annotated videos are written frame by frame, never held whole in memory.
    """

    def __init__(self, classifier: Classifier, detect: bool, margin: float, batch_size: int, frame_step: int,
                 annotate_dir: Path | None, bar):
        self.classifier, self.detect, self.margin = classifier, detect, margin
        self.batch_size, self.frame_step, self.annotate_dir, self.bar = batch_size, frame_step, annotate_dir, bar
        self.detector = faces.load_detector() if detect else None
        self.outcome = Outcome(records=[], problems=[])
        self.pending: list[_Frame] = []
        self.sink: _VideoSink | None = None

    def faces_of(self, rgb: np.ndarray) -> list[faces.Face]:
        grey = faces.to_grey(rgb)
        return faces.find_faces(grey, self.detector, self.margin) if self.detect else [faces.whole_image_face(grey)]

    def add(self, frame: _Frame) -> None:
        self.outcome.frames += 1
        self.bar.update(1)
        self.pending.append(frame)
        if len(self.pending) >= self.batch_size or sum(len(item.faces) for item in self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        crops = [face.crop for item in self.pending for face in item.faces]
        probabilities = classify_crops(self.classifier, crops) if crops else np.zeros((0, len(EMOTIONS)))
        start = 0
        for item in self.pending:
            rows = probabilities[start:start + len(item.faces)]
            start += len(item.faces)
            self.outcome.records.extend(face_record(str(item.source.path), item.frame, item.time, number, face.box, row)
                                        for number, (face, row) in enumerate(zip(item.faces, rows), start=1))
            if self.annotate_dir is not None:
                drawn = draw_faces(item.image, [face.box for face in item.faces], rows)
                if item.frame is None:
                    _write_image(self.annotate_dir / item.source.relative, drawn)
                else:
                    self.sink.write(drawn)
        self.pending.clear()

    def image(self, item: InputFile) -> None:
        image = read_image(item.path)
        found = self.faces_of(image)
        if not found:
            self.outcome.frames += 1
            self.bar.update(1)
            raise PredictInputError(f"no face found (the detector finds upright frontal faces of "
                                    f"{faces.MIN_FACE_SIDE}+ pixels); for ready-made face crops use --no-detect")
        self.add(_Frame(item, None, None, found, image if self.annotate_dir is not None else None))

    def video(self, item: InputFile) -> None:
        self.flush()  # earlier images first, and nothing pending that belongs to another file's sink
        fps = video_fps(item.path)
        if self.annotate_dir is not None:
            self.sink = _VideoSink(self.annotate_dir / item.relative, fps / self.frame_step)
        faces_found, completed = 0, False
        try:
            for frame_index, rgb in read_video(item.path, self.frame_step):
                found = self.faces_of(rgb)
                faces_found += len(found)
                self.add(_Frame(item, frame_index, round(frame_index / fps, 3), found,
                                rgb if self.sink is not None else None))
            self.flush()
            completed = True
        finally:
            if self.sink is not None:
                self.sink.close(keep=completed)
                self.sink = None
        if faces_found == 0:
            raise PredictInputError("no face found in any frame; for ready-made face crops use --no-detect")


def predict_inputs(inputs: list[InputFile], classifier: Classifier, *, detect: bool = True,
                   margin: float = faces.DEFAULT_MARGIN, batch_size: int = 64, frame_step: int = 1,
                   annotate_dir: Path | None = None, progress: bool | None = None) -> Outcome:
    """Detect, crop and classify every face of every input; input problems are collected, never raised.

    progress: True shows a bar, False hides it, None shows it on a terminal only.
    """
    from tqdm import tqdm

    if batch_size < 1 or frame_step < 1:
        raise ValueError(f"batch_size and frame_step must be >= 1, got {batch_size} and {frame_step}")
    total = sum(-(-video_frame_count(item.path) // frame_step) if is_video(item.path) else 1 for item in inputs)
    # tqdm's disable=None means: hide the bar when the output is not a terminal.
    with tqdm(total=total, unit="frame", desc="predict", disable=None if progress is None else not progress) as bar:
        run = _Run(classifier, detect, margin, batch_size, frame_step, annotate_dir, bar)
        for item in inputs:
            try:
                if is_video(item.path):
                    run.video(item)
                else:
                    run.image(item)
            except PredictInputError as error:
                run.outcome.problems.append(Problem(str(item.path), str(error)))
        run.flush()
    return run.outcome


# ---------------------------------------------------------------- output

def write_records(records: list[dict], output_format: str, handle) -> None:
    """Records as a terminal table, JSON lines or CSV, to an open text handle."""
    if output_format == "jsonl":
        for record in records:
            handle.write(json.dumps(record) + "\n")
    elif output_format == "csv":
        import csv

        writer = csv.DictWriter(handle, fieldnames=RECORD_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
    elif output_format == "table":
        handle.write(format_table(records))
    else:
        raise ValueError(f"unknown output format {output_format!r}; choose table, jsonl or csv")


def format_table(records: list[dict]) -> str:
    """A fixed-width table: file, frame, time, face, box, emotion and the 7 probabilities."""
    header = ["file", "frame", "time", "face", "box (x,y,w,h)", "emotion", *EMOTIONS]
    rows = [[record["file"], "" if record["frame"] is None else str(record["frame"]),
             "" if record["time"] is None else f"{record['time']:.2f}", str(record["face"]),
             f"{record['x']},{record['y']},{record['width']},{record['height']}", record["emotion"],
             *(f"{record[f'probability_{emotion}']:.3f}" for emotion in EMOTIONS)] for record in records]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- video summaries

def emotion_shares(records: list[dict]) -> dict[str, float]:
    """Each emotion's share of the faces in the records (by each face's most probable emotion)."""
    emotions = [record["emotion"] for record in records]
    return {emotion: emotions.count(emotion) / len(emotions) if emotions else 0.0 for emotion in EMOTIONS}


def video_timeline(records: list[dict], bin_seconds: float = 1.0) -> list[dict]:
    """One video's faces per time bin, from 0 s to its last face: start, end, faces, each emotion's share.

    A bin without a face has faces 0 and every share 0, so a plot shows the gap.
    """
    if bin_seconds <= 0:
        raise ValueError(f"bin_seconds must be > 0, got {bin_seconds}")
    if not records:
        return []
    bins: dict[int, list[dict]] = {}
    for record in records:
        bins.setdefault(int(record["time"] // bin_seconds), []).append(record)
    return [{"start": round(index * bin_seconds, 3), "end": round((index + 1) * bin_seconds, 3),
             "faces": len(bins.get(index, [])), **emotion_shares(bins.get(index, []))}
            for index in range(max(bins) + 1)]


def write_video_summary(records: list[dict], csv_path: Path, png_path: Path, title: str,
                        bin_seconds: float = 1.0) -> dict[str, float]:
    """The timeline as CSV and as a stacked-area plot of the emotions' shares over time; the overall shares."""
    import csv

    from matplotlib.figure import Figure  # no pyplot: no display backend, no global state

    from dlfer.files import atomic_path

    timeline = video_timeline(records, bin_seconds)
    shares = emotion_shares(records)
    with atomic_path(csv_path) as temporary, temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["start", "end", "faces", *EMOTIONS], lineterminator="\n")
        writer.writeheader()
        writer.writerows(timeline)
    figure = Figure(figsize=(10, 4))
    axis = figure.subplots()
    # step="post": each bin's shares hold from its start to its end.
    starts = [row["start"] for row in timeline] + [timeline[-1]["end"]]
    axis.stackplot(starts, [[row[emotion] for row in timeline] + [timeline[-1][emotion]] for emotion in EMOTIONS],
                   labels=[f"{emotion} {shares[emotion]:.0%}" for emotion in EMOTIONS], step="post")
    axis.set(xlabel="time (s)", ylabel="share of the faces", ylim=(0, 1), xlim=(0, starts[-1]), title=title)
    axis.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), title="whole video")
    figure.tight_layout()
    with atomic_path(png_path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    return shares
