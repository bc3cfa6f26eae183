"""The dlfer model as an MLflow pyfunc, so `mlflow models serve` answers HTTP with emotions.

`dlfer export --formats mlflow` (or save_pyfunc) writes the model folder; then

    mlflow models serve -m exports/with_ef_fer1/mlflow_model --env-manager local -h 127.0.0.1 -p 5001

Requests (POST /invocations, JSON):
  photos     {"dataframe_split": {"columns": ["image"], "data": [["<base64 of a JPEG/PNG file>"], ...]}}
             every face found in each photo is classified; add a boolean column "detect" set to
             false for photos that are already face crops (like FER2013's 48x48 images).
  face crops {"instances": [<48x48 nested list of pixels 0-255>, ...]}  (also (N,48,48,1) or (N,2304))
From Python, mlflow.pyfunc.load_model(folder).predict takes the same DataFrame with raw bytes
(or base64 text) in "image", or a numpy array of crops.

The answer has one row per face: input (row number of the request), face, x, y, width, height,
emotion, probability_<emotion> for the 7 emotions (Kaggle order), and error, which is empty
unless the input was unusable ("no face found", "not an image ...") -- then the row's emotion
is empty and its probabilities are NaN.
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

from dlfer import faces
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


def crops_from_array(array: np.ndarray) -> np.ndarray:
    """(N, 48, 48) float32 crops from (N,48,48), (N,48,48,1) or (N,2304) pixel arrays."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 2 and array.shape[1] == IMAGE_SIDE * IMAGE_SIDE:
        array = array.reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3 or array.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise ValueError(f"face arrays must be (N,{IMAGE_SIDE},{IMAGE_SIDE}), (N,{IMAGE_SIDE},{IMAGE_SIDE},1) or "
                         f"(N,{IMAGE_SIDE * IMAGE_SIDE}) pixels 0-255, got {array.shape}; send photos as bytes in "
                         "an 'image' column instead")
    return array


class EmotionModel(mlflow.pyfunc.PythonModel):
    """Face detection plus the Keras classifier; see the module docstring for inputs and outputs."""

    def load_context(self, context):
        import keras

        from dlfer.predict import keras_classifier

        self.classify = keras_classifier(keras.models.load_model(context.artifacts[KERAS_ARTIFACT], compile=False))
        self.detector = faces.load_detector()

    def _classify(self, crops: np.ndarray) -> np.ndarray:
        if len(crops) == 0:
            return np.zeros((0, len(EMOTIONS)), dtype=np.float32)
        return self.classify(crops.astype(np.float32)[..., np.newaxis])

    def predict(self, context, model_input, params=None):
        if isinstance(model_input, pd.DataFrame) and "image" in model_input.columns:
            return self._predict_photos(model_input)
        if isinstance(model_input, pd.DataFrame):
            model_input = model_input.to_numpy()
        if isinstance(model_input, dict) and len(model_input) == 1:  # {"inputs": ...} arrives as a dict
            model_input = next(iter(model_input.values()))
        crops = crops_from_array(model_input)
        rows = [_row(index, 0, faces.Box(0, 0, IMAGE_SIDE, IMAGE_SIDE), probabilities)
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
            found.extend((index, number, face) for number, face in enumerate(image_faces))
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
