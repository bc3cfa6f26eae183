"""The MLflow pyfunc: photo bytes and face arrays in Python, then `mlflow models serve` answering HTTP."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile

import numpy as np
import pandas as pd
import pytest

from conftest import FER2013_ZIP, require
from dlfer import predict, serving
from dlfer.fer2013 import EMOTIONS


def toy_model():
    import keras

    keras.utils.set_random_seed(2)
    inputs = keras.Input((48, 48, 1))
    features = keras.layers.Rescaling(1 / 255)(inputs)
    features = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(features)
    features = keras.layers.Flatten()(features)
    return keras.Model(inputs, keras.layers.Dense(7, activation="softmax")(features))


def encoded(image: np.ndarray, image_format: str = "JPEG") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=image_format)
    return buffer.getvalue()


def fer2013_crops(count: int) -> np.ndarray:
    from PIL import Image

    with zipfile.ZipFile(require(FER2013_ZIP)) as archive:
        names = sorted(name for name in archive.namelist() if "/PrivateTest_" in name)[:count]
        return np.stack([np.asarray(Image.open(io.BytesIO(archive.read(name))).convert("L")) for name in names])


@pytest.fixture(scope="module")
def served_model(tmp_path_factory):
    """The pyfunc folder of a toy model, and the model.keras it was made from."""
    root = tmp_path_factory.mktemp("serving")
    toy_model().save(root / "model.keras")
    serving.save_pyfunc(root / "model.keras", root / "mlflow_model")
    return root / "mlflow_model", root / "model.keras"


@pytest.fixture(scope="module")
def astronaut_jpeg():
    return encoded(pytest.importorskip("skimage.data").astronaut())


def test_pyfunc_takes_photo_bytes_base64_and_face_crops(served_model, astronaut_jpeg):
    import mlflow

    folder, keras_file = served_model
    model = mlflow.pyfunc.load_model(str(folder))
    crops = fer2013_crops(3)
    request = pd.DataFrame({
        "image": [astronaut_jpeg, b"definitely not an image", base64.b64encode(encoded(crops[0], "PNG")).decode(),
                  encoded(crops[1], "PNG")],
        "detect": [True, True, False, False]})
    answer = model.predict(request)
    assert list(answer.columns) == serving.OUTPUT_COLUMNS
    assert answer["input"].tolist() == [0, 1, 2, 3]
    astronaut, junk, first = (answer.iloc[index] for index in range(3))
    assert astronaut["error"] == "" and 190 <= astronaut["x"] + astronaut["width"] / 2 <= 260
    assert junk["error"].startswith("not an image") and np.isnan(junk["probability_happy"])
    assert (first["x"], first["width"]) == (0, 48)

    # Crops sent as bytes (PNG, lossless) and as arrays get exactly the Keras model's probabilities.
    expected = predict.load_classifier(keras_file)[0](crops[..., None].astype(np.float32))
    from_bytes = answer.iloc[2:4][serving.PROBABILITY_COLUMNS].to_numpy()
    np.testing.assert_allclose(from_bytes, expected[:2], atol=1e-6)
    from_arrays = model.predict(crops)
    np.testing.assert_allclose(from_arrays[serving.PROBABILITY_COLUMNS].to_numpy(), expected, atol=1e-6)
    assert from_arrays["emotion"].tolist() == [EMOTIONS[index] for index in expected.argmax(axis=1)]
    flat = model.predict(crops.reshape(3, -1))
    np.testing.assert_allclose(flat[serving.PROBABILITY_COLUMNS].to_numpy(), expected, atol=1e-6)


def test_pyfunc_refuses_arrays_of_the_wrong_shape(served_model):
    import mlflow

    model = mlflow.pyfunc.load_model(str(served_model[0]))
    with pytest.raises(ValueError, match=r"face arrays must be \(N,48,48\)"):
        model.predict(np.zeros((2, 64, 64), dtype=np.float32))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_mlflow_models_serve_answers_a_real_photo_over_http(served_model, astronaut_jpeg, tmp_path):
    folder, _ = served_model
    port = free_port()
    # mlflow starts `uvicorn` by name: this environment's bin folder must be on PATH, as in an activated venv.
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db",
                   "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = (tmp_path / "server.log").open("w")
    # Its own session, so stopping it stops the server's worker processes with it.
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", str(folder),
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {server.returncode}: "
                            f"{(tmp_path / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail("mlflow models serve did not answer /ping within 120 s")
            time.sleep(1)

        photo = base64.b64encode(astronaut_jpeg).decode()
        answer = post(f"{base}/invocations", {"dataframe_split": {"columns": ["image"], "data": [[photo]]}})
        rows = answer["predictions"]
        assert len(rows) == 1 and rows[0]["error"] == "" and rows[0]["emotion"] in EMOTIONS
        assert 190 <= rows[0]["x"] + rows[0]["width"] / 2 <= 260
        assert abs(sum(rows[0][f"probability_{emotion}"] for emotion in EMOTIONS) - 1) < 1e-4

        crops = fer2013_crops(2)
        answer = post(f"{base}/invocations", {"instances": crops.tolist()})
        assert [row["input"] for row in answer["predictions"]] == [0, 1]
    finally:
        stop(server)
        log.close()


def stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group, SIGKILL if it lingers."""
    for sent in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sent)
        except ProcessLookupError:  # already gone
            return
        try:
            server.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue
