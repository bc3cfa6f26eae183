"""The dlfer model as an MLflow pyfunc, served over HTTP with emotions.

`dlfer serve -m <model>` loads a finetune model (a path or models:/<name>@<alias>) as this pyfunc,
warms it up and serves MLflow's own scoring app (create_app) with a web page at / added. The
same folder also serves with MLflow alone: `dlfer export --formats mlflow` (or save_pyfunc)
writes it, then

    mlflow models serve -m exports/with_ef_fer1/mlflow_model --env-manager local -h 127.0.0.1 -p 5001

Requests (POST /invocations, JSON):
  photos     {"dataframe_split": {"columns": ["image"], "data": [["<base64 of a JPEG/PNG file>"], ...]}}
             every face found in each photo is classified; add a boolean column "detect" set to
             false for photos that are already face crops (like FER2013's 48x48 images).
  face crops {"instances": [<48x48 nested list of pixels 0-255>, ...]}  (also (N,48,48,1) or (N,2304))
From Python, mlflow.pyfunc.load_model(folder).predict takes the same DataFrame with raw bytes
(or base64 text) in "image", or a numpy array of crops.

The answer has one row per face: input (row number of the request), face (numbered from 1 in
reading order: left to right, top to bottom, as dlfer.deploy.faces.reading_order), x, y, width, height,
emotion, probability_<emotion> for the 7 emotions (Kaggle order), and error, which is empty
unless the input was unusable ("no face found", "not an image ...") -- then the row's emotion
is empty, its face -1 and its probabilities NaN. A request of the wrong shape (face arrays that
are not 48x48) is refused whole with HTTP 400, whose message says what was expected.
"""

from __future__ import annotations

import base64
import binascii
import io
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from dlfer.deploy import faces
from dlfer.fer2013 import EMOTIONS, IMAGE_SIDE

PROBABILITY_COLUMNS = [f"probability_{emotion}" for emotion in EMOTIONS]
OUTPUT_COLUMNS = ["input", "face", "x", "y", "width", "height", "emotion", *PROBABILITY_COLUMNS, "error"]
KERAS_ARTIFACT = "keras_model"


def decode_image_bytes(data) -> np.ndarray:
    """(H, W) uint8 greyscale from an encoded image file's bytes, or from base64 text of them."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(data, str):
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not base64 text of an image file") from None
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"expected image file bytes or base64 text, got {type(data).__name__}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("L"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise ValueError(f"not an image ({error.__class__.__name__})") from None


CROP_SHAPES = (f"(N,{IMAGE_SIDE},{IMAGE_SIDE}), (N,{IMAGE_SIDE},{IMAGE_SIDE},1) or (N,{IMAGE_SIDE * IMAGE_SIDE}) "
               "pixels 0-255")
REQUEST_FORMATS = ('photos as {"dataframe_split": {"columns": ["image"], "data": [["<base64 of a JPEG or PNG '
                   'file>"]]}}, face crops as {"instances": [<48x48 nested list of pixels 0-255>, ...]}')


def crops_from_array(array: np.ndarray) -> np.ndarray:
    """(N, 48, 48) float32 crops from (N,48,48), (N,48,48,1) or (N,2304) pixel arrays."""
    try:
        array = np.asarray(array, dtype=np.float32)
    except (ValueError, TypeError):
        raise ValueError(f"face arrays must be {CROP_SHAPES}, got something that is not one array of numbers; "
                         f"send {REQUEST_FORMATS}") from None
    if array.ndim == 2 and array.shape[1] == IMAGE_SIDE * IMAGE_SIDE:
        array = array.reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3 or array.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise ValueError(f"face arrays must be {CROP_SHAPES}, got {array.shape}; send {REQUEST_FORMATS}")
    return array


class EmotionModel(mlflow.pyfunc.PythonModel):
    """Face detection plus the Keras classifier; see the module docstring for inputs and outputs."""

    def load_context(self, context):
        from dlfer.deploy.predict import keras_classifier, load_keras_model

        self.classify = keras_classifier(load_keras_model(context.artifacts[KERAS_ARTIFACT]))
        self.detector = faces.load_detector()

    def _classify(self, crops: np.ndarray) -> np.ndarray:
        if len(crops) == 0:
            return np.zeros((0, len(EMOTIONS)), dtype=np.float32)
        return self.classify(crops.astype(np.float32)[..., np.newaxis])

    def predict(self, context, model_input, params=None):
        from mlflow.exceptions import MlflowException

        try:
            return self._predict(model_input)
        except (ValueError, TypeError) as error:
            # MLflow's scoring server answers an MlflowException with its own status (400 here) and
            # message; any other exception becomes a generic error with ours hidden in a stack trace.
            raise MlflowException.invalid_parameter_value(str(error)) from None

    def _predict(self, model_input):
        if isinstance(model_input, pd.DataFrame) and "image" in model_input.columns:
            return self._predict_photos(model_input)
        if isinstance(model_input, pd.DataFrame):
            model_input = model_input.to_numpy()
        if isinstance(model_input, dict) and len(model_input) == 1:  # {"inputs": ...} arrives as a dict
            model_input = next(iter(model_input.values()))
        crops = crops_from_array(model_input)
        rows = [_row(index, 1, faces.Box(0, 0, IMAGE_SIDE, IMAGE_SIDE), probabilities)
                for index, probabilities in enumerate(self._classify(crops))]
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)

    def _predict_photos(self, frame: pd.DataFrame) -> pd.DataFrame:
        detect = frame["detect"].tolist() if "detect" in frame.columns else [True] * len(frame)
        found, failed = [], []  # (input, face index, Face) and (input, reason)
        for index, (data, use_detector) in enumerate(zip(frame["image"].tolist(), detect)):
            try:
                grey = decode_image_bytes(data)
            except ValueError as error:
                failed.append((index, str(error)))
                continue
            if _truthy(use_detector):
                image_faces = faces.find_faces(grey, self.detector)
            else:
                image_faces = [faces.whole_image_face(grey)]
            if not image_faces:
                failed.append((index, "no face found"))
            found.extend((index, number, face) for number, face in enumerate(image_faces, start=1))
        probabilities = self._classify(np.stack([face.crop for _, _, face in found]) if found else np.zeros((0,)))
        rows = [_row(index, number, face.box, row) for (index, number, face), row in zip(found, probabilities)]
        rows += [{"input": index, "face": -1, "x": -1, "y": -1, "width": -1, "height": -1, "emotion": "",
                  **{column: np.nan for column in PROBABILITY_COLUMNS}, "error": reason} for index, reason in failed]
        rows.sort(key=lambda row: (row["input"], row["face"]))
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)


def _truthy(value) -> bool:
    # JSON requests bring booleans; CSV requests bring the strings "true"/"false".
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "")
    return bool(value)


def _row(index: int, number: int, box: faces.Box, probabilities: np.ndarray) -> dict:
    return {"input": index, "face": number, "x": box.x, "y": box.y, "width": box.width, "height": box.height,
            "emotion": EMOTIONS[int(np.argmax(probabilities))],
            **{column: float(value) for column, value in zip(PROBABILITY_COLUMNS, probabilities)}, "error": ""}


def pip_requirements() -> list[str]:
    """The exact versions of what the pyfunc imports, pinned from this environment."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in
            ("mlflow", "tensorflow", "keras", "opencv-python-headless", "pillow", "pandas", "numpy")]


def save_pyfunc(model, folder: Path) -> None:
    """Write the pyfunc model folder for a Keras model (object or .keras path); `folder` must not exist.

    The dlfer package goes inside as code, so the folder is served without dlfer installed.
    """
    import dlfer

    with tempfile.TemporaryDirectory() as scratch:
        keras_file = Path(scratch) / "model.keras"
        if isinstance(model, (str, Path)):
            shutil.copyfile(model, keras_file)
        else:
            model.save(keras_file)
        mlflow.pyfunc.save_model(
            path=str(folder), python_model=EmotionModel(), artifacts={KERAS_ARTIFACT: str(keras_file)},
            code_paths=[str(Path(dlfer.__file__).parent)], pip_requirements=pip_requirements())


# ---------------------------------------------------------------- dlfer serve

def load_served_model(source: str | Path | None, mirror_average: bool = True):
    """The pyfunc (a PyFuncModel) of a finetune model: a .keras file, a folder holding one, an MLflow
    model folder, or models:/<name>@<alias> / runs:/<id>/<path> from the MLflow store. It answers the
    mean of each face and its mirror (what evaluate's headline measures), or with mirror_average=False
    the face alone, whichever the source model does."""
    import logging
    import os
    import warnings

    from dlfer.deploy.predict import keras_model_from
    from dlfer.model.mirror import answering

    # Nothing alarming for the user to read: MLflow's progress bar, its warning about pickling the
    # PythonModel (ours, written just now) and its advice to add type hints.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    model = answering(keras_model_from(source), mirror_average)
    mlflow_logger = logging.getLogger("mlflow")
    level = mlflow_logger.level
    mlflow_logger.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            save_pyfunc(model, Path(scratch) / "mlflow_model")
            return mlflow.pyfunc.load_model(str(Path(scratch) / "mlflow_model"))
    finally:
        mlflow_logger.setLevel(level)


def warm_up(model) -> None:
    """One request through the whole path (decode, crop, classify), so the first user waits no longer
    than the next: TensorFlow traces the classifier on its first call."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((IMAGE_SIDE, IMAGE_SIDE), 128, dtype=np.uint8)).save(buffer, format="PNG")
    model.predict(pd.DataFrame({"image": [buffer.getvalue()], "detect": [False]}))


def annotate(model, image_base64: str, detect: bool = True) -> dict:
    """What the web page shows for one photo: each face's row and the photo with the faces drawn.

    Returns {"faces": rows as /invocations gives them, "problem": why no face came back or "",
    "annotated": base64 PNG}; raises ValueError for data that is not an image.
    """
    from PIL import Image, ImageOps

    from dlfer.deploy.predict import draw_faces

    data = base64.b64decode(image_base64, validate=True) if isinstance(image_base64, str) else b""
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except (OSError, ValueError, SyntaxError) as error:
        raise ValueError(f"not an image ({error.__class__.__name__})") from None
    rows = model.predict(pd.DataFrame({"image": [data], "detect": [detect]}))
    found = rows[rows["error"] == ""]
    boxes = [faces.Box(int(row.x), int(row.y), int(row.width), int(row.height)) for row in found.itertuples()]
    drawn = draw_faces(rgb, boxes, found[PROBABILITY_COLUMNS].to_numpy())
    buffer = io.BytesIO()
    Image.fromarray(drawn).save(buffer, format="PNG")
    return {"faces": found.to_dict("records"), "problem": "; ".join(rows.loc[rows["error"] != "", "error"]),
            "annotated": base64.b64encode(buffer.getvalue()).decode()}


def create_app(model):
    """MLflow's scoring app for the pyfunc (/invocations, /ping, /health, /version, exactly as
    `mlflow models serve`), plus the web page at / and the /annotate call it makes."""
    import asyncio

    from mlflow.pyfunc import scoring_server
    from starlette.responses import HTMLResponse, JSONResponse

    from dlfer.deploy.serving_page import PAGE

    async def page(request):
        return HTMLResponse(PAGE)

    async def annotated(request):
        try:
            body = await request.json()
            if not isinstance(body, dict) or not isinstance(body.get("image"), str):
                raise ValueError('send JSON {"image": "<base64 of a JPEG or PNG file>", "detect": true}')
            answer = await asyncio.to_thread(annotate, model, body["image"], _truthy(body.get("detect", True)))
        except ValueError as error:  # bad JSON and bad base64 are ValueErrors too
            return JSONResponse({"message": str(error)}, status_code=400)
        return JSONResponse(answer)

    app = scoring_server.init(model)
    # Starlette routes: the handlers take the request itself, with no FastAPI parameter parsing.
    app.add_route("/", page, methods=["GET"])
    app.add_route("/annotate", annotated, methods=["POST"])
    return app


def run(model, host: str, port: int, announce) -> None:
    """Serve create_app(model) until interrupted; announce(url) once the port is bound (port 0: any free one)."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(model), host=host, port=port, log_level="warning"))

    def announce_when_listening():
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            bound_port = server.servers[0].sockets[0].getsockname()[1]
            announce(f"http://{host}:{bound_port}")

    threading.Thread(target=announce_when_listening, daemon=True).start()
    server.run()
