"""The MLflow pyfunc: photo bytes and face arrays in Python, `mlflow models serve` answering HTTP, and
`dlfer serve` with its web page driven in headless Chromium."""

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile

import browser
import numpy as np
import pandas as pd
import pytest

from conftest import FER2013_ZIP, require
from dlfer.deploy import faces, predict, serving
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
    assert (first["x"], first["width"], first["face"]) == (0, 48, 1) and astronaut["face"] == 1

    # Crops sent as bytes (PNG, lossless) and as arrays get exactly the Keras model's probabilities.
    expected = predict.load_classifier(keras_file, mirror=False)[0](crops[..., None].astype(np.float32))
    from_bytes = answer.iloc[2:4][serving.PROBABILITY_COLUMNS].to_numpy()
    np.testing.assert_allclose(from_bytes, expected[:2], atol=1e-6)
    from_arrays = model.predict(crops)
    np.testing.assert_allclose(from_arrays[serving.PROBABILITY_COLUMNS].to_numpy(), expected, atol=1e-6)
    assert from_arrays["emotion"].tolist() == [EMOTIONS[index] for index in expected.argmax(axis=1)]
    flat = model.predict(crops.reshape(3, -1))
    np.testing.assert_allclose(flat[serving.PROBABILITY_COLUMNS].to_numpy(), expected, atol=1e-6)


def test_pyfunc_refuses_arrays_of_the_wrong_shape(served_model):
    import mlflow
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(str(served_model[0]))
    # An MlflowException with a 400 status: the scoring server passes its message on (see below).
    with pytest.raises(MlflowException, match=r"face arrays must be \(N,48,48\)") as raised:
        model.predict(np.zeros((2, 64, 64), dtype=np.float32))
    assert raised.value.get_http_status_code() == 400


def test_served_model_answers_the_mean_with_the_mirror_unless_told_the_face_alone(served_model):
    folder, keras_file = served_model
    crops = fer2013_crops(4)
    batch = crops[..., None].astype(np.float32)
    face = predict.load_classifier(keras_file, mirror=False)[0](batch)
    reflected = predict.load_classifier(keras_file, mirror=False)[0](batch[:, :, ::-1])
    assert np.abs(face - reflected).max() > 1e-3  # the toy model is not symmetric
    for source, mirror_average, expected in ((keras_file, True, (face + reflected) / 2), (keras_file, False, face),
                                             (folder, True, (face + reflected) / 2)):
        answer = serving.load_served_model(source, mirror_average).predict(crops)
        np.testing.assert_allclose(answer[serving.PROBABILITY_COLUMNS].to_numpy(), expected, atol=1e-6)


def post(url: str, payload: dict) -> tuple[int, dict]:
    """The status and JSON answer of a POST, error statuses included."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def photo_request(*photos: bytes) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(photo).decode()] for photo in photos]}}


def start(command: list[str], log_path) -> subprocess.Popen:
    """A server process in its own session (stopping it stops its workers), stdout and stderr in log_path."""
    # mlflow starts `uvicorn` by name: this environment's bin folder must be on PATH, as in an activated venv.
    # A user's shell sets no TensorFlow log level: dlfer's own default must keep the CPU start-up quiet.
    environment = {**{key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"},
                   "MLFLOW_TRACKING_URI": f"sqlite:///{log_path.parent}/m.db",
                   "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
    with log_path.open("w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment,
                                start_new_session=True)


def wait_for(server: subprocess.Popen, log_path, ready, what: str, timeout: float = 180):
    """Poll ready() until it returns something; fail with the server's log if it exits or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"{what} exited with {server.returncode}: {log_path.read_text()[-3000:]}")
        found = ready()
        if found:
            return found
        time.sleep(0.5)
    pytest.fail(f"{what} was not ready within {timeout} s: {log_path.read_text()[-3000:]}")


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


def pings(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def test_mlflow_models_serve_answers_a_real_photo_and_says_what_a_wrong_shape_should_be(
        served_model, astronaut_jpeg, tmp_path):
    import socket

    folder, _ = served_model
    with socket.socket() as probe:  # mlflow models serve takes no port 0: ask the OS for a free one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "server.log"
    server = start([sys.executable, "-m", "mlflow", "models", "serve", "-m", str(folder),
                    "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(server, log, lambda: pings(base), "mlflow models serve")
        status, answer = post(f"{base}/invocations", photo_request(astronaut_jpeg))
        rows = answer["predictions"]
        assert status == 200 and len(rows) == 1 and rows[0]["error"] == "" and rows[0]["emotion"] in EMOTIONS
        assert 190 <= rows[0]["x"] + rows[0]["width"] / 2 <= 260
        assert abs(sum(rows[0][f"probability_{emotion}"] for emotion in EMOTIONS) - 1) < 1e-4

        status, answer = post(f"{base}/invocations", {"instances": fer2013_crops(2).tolist()})
        assert status == 200 and [row["input"] for row in answer["predictions"]] == [0, 1]
        status, answer = post(f"{base}/invocations", {"instances": np.zeros((2, 64, 64)).tolist()})
        assert status == 400 and "face arrays must be (N,48,48)" in answer["message"], answer
        assert "got (2, 64, 64)" in answer["message"] and '"dataframe_split"' in answer["message"]
    finally:
        stop(server)


def group_photo() -> tuple[np.ndarray, list[faces.Box]]:
    """Six FER2013 faces enlarged to 144 pixels in a 2x3 grid on an RGB 600x900 noisy gradient."""
    import cv2

    rows, columns = np.mgrid[0:600, 0:900]
    noise = np.random.default_rng(0).normal(0, 6, rows.shape)
    grey = np.clip(90 + 60 * columns / 900 + 30 * rows / 600 + noise, 0, 255).astype(np.uint8)
    boxes = []
    for index, crop in enumerate(fer2013_crops(60)[::10]):
        x, y = 40 + (index % 3) * 290, 60 + (index // 3) * 290
        grey[y:y + 144, x:x + 144] = cv2.resize(crop, (144, 144), interpolation=cv2.INTER_CUBIC)
        boxes.append(faces.Box(x, y, 144, 144))
    return np.repeat(grey[..., None], 3, axis=2), boxes


@pytest.fixture(scope="module")
def dlfer_server(served_model, tmp_path_factory):
    """`dlfer serve` on a free port of the OS, for the toy model; its base URL and its log."""
    root = tmp_path_factory.mktemp("dlfer_serve")
    log = root / "server.log"
    server = start([sys.executable, "-m", "dlfer.cli", "serve", "-m", str(served_model[1]), "--port", "0"], log)

    def announced():
        found = re.search(r"ready at (http://127\.0\.0\.1:\d+)", log.read_text())
        return found and found.group(1)
    try:
        base = wait_for(server, log, announced, "dlfer serve")
        yield base, log
    finally:
        stop(server)


def test_dlfer_serve_is_ready_when_it_says_so_and_prints_the_request_format(dlfer_server, astronaut_jpeg):
    base, log = dlfer_server
    # No wait and no retry: the model was loaded and warmed up before the ready line was printed.
    status, answer = post(f"{base}/invocations", photo_request(astronaut_jpeg))
    assert status == 200 and answer["predictions"][0]["face"] == 1
    text = log.read_text()
    assert f"web page   {base}/" in text and '"dataframe_split"' in text and "base64 -w0 photo.jpg" in text
    assert "(the mean of each face and its mirror) loaded and warmed up" in text
    # Nothing alarming on a CPU machine: no TensorFlow log lines, no MLflow warnings.
    assert "cuInit" not in text and "WARNING" not in text and "Warning" not in text, text


def test_dlfer_serve_numbers_faces_in_reading_order_the_same_every_time(dlfer_server):
    base, _ = dlfer_server
    photo, pasted = group_photo()
    answers = [post(f"{base}/invocations", photo_request(encoded(photo, "PNG")))[1]["predictions"] for _ in range(2)]
    assert answers[0] == answers[1]
    rows = answers[0]
    assert len(rows) >= 3 and [row["face"] for row in rows] == list(range(1, len(rows) + 1))
    places = [max(range(6), key=lambda k: overlap(row, pasted[k])) for row in rows]
    assert places == sorted(places), places  # the grid's reading order: top row left to right, then the next


def overlap(row: dict, box: faces.Box) -> float:
    width = max(0, min(row["x"] + row["width"], box.x + box.width) - max(row["x"], box.x))
    height = max(0, min(row["y"] + row["height"], box.y + box.height) - max(row["y"], box.y))
    return width * height / (row["width"] * row["height"] + box.width * box.height - width * height)


def test_dlfer_serve_refuses_a_wrong_shape_with_400_saying_what_was_expected(dlfer_server):
    base, _ = dlfer_server
    for payload, shown in (({"instances": [[[1, 2, 3]]]}, "got (1, 1, 3)"),
                           ({"inputs": {"a": [1], "b": [2]}}, "not one array of numbers")):
        status, answer = post(f"{base}/invocations", payload)
        assert status == 400 and "face arrays must be (N,48,48)" in answer["message"] and shown in answer["message"]
    status, answer = post(f"{base}/annotate", {"image": base64.b64encode(b"not a photo").decode()})
    assert status == 400 and answer["message"].startswith("not an image")


def test_web_page_shows_the_uploaded_photo_with_numbered_faces_and_their_probabilities(
        dlfer_server, astronaut_jpeg, tmp_path):
    from PIL import Image

    base, _ = dlfer_server
    photo = tmp_path / "astronaut.jpg"
    photo.write_bytes(astronaut_jpeg)
    expected = post(f"{base}/invocations", photo_request(astronaut_jpeg))[1]["predictions"][0]
    page = browser.Page(f"{base}/")
    try:
        page.set_file("#photo", photo)
        page.wait_for("document.body.dataset.state === 'done'")
        assert page.evaluate("document.getElementById('status').textContent") == "1 face"
        cells = page.evaluate("[...document.querySelectorAll('#faces tbody tr')].map("
                              "row => [...row.cells].map(cell => cell.textContent))")
        assert len(cells) == 1 and cells[0][:2] == ["1", expected["emotion"]]
        shown = [float(text.rstrip("%")) / 100 for text in cells[0][2:]]
        np.testing.assert_allclose(shown, [expected[f"probability_{emotion}"] for emotion in EMOTIONS], atol=6e-4)

        source = page.wait_for("document.getElementById('annotated').complete && "
                               "document.getElementById('annotated').naturalWidth > 0 && "
                               "document.getElementById('annotated').src")
        drawn = np.asarray(Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).convert("RGB"))
        assert drawn.shape == (512, 512, 3)
        # The face's green box and label band, where /invocations put the face.
        green = (drawn[:, :, 1] > 200) & (drawn[:, :, 0] < 80) & (drawn[:, :, 2] < 80)
        x, y, width = expected["x"], expected["y"], expected["width"]
        assert green[y:y + width, x].mean() > 0.9 and green[max(y - 20, 0):y, x:x + width].mean() > 0.3
        pixels = page.screenshot(tmp_path / "page.png")
        assert browser.non_background_share(pixels) > 0.1  # the photo is on screen, not only text
    finally:
        page.close()

    # A 48x48 crop, as a face crop without detection: one row for the whole image.
    crop = tmp_path / "crop.png"
    crop.write_bytes(encoded(fer2013_crops(1)[0], "PNG"))
    page = browser.Page(f"{base}/")
    try:
        page.evaluate("document.getElementById('crop').click()")
        page.set_file("#photo", crop)
        page.wait_for("document.body.dataset.state === 'done'")
        assert page.evaluate("document.querySelectorAll('#faces tbody tr').length") == 1
    finally:
        page.close()


def test_web_page_classifies_a_webcam_picture(dlfer_server, astronaut_jpeg, tmp_path):
    """The webcam films the astronaut photo (Chromium's file-backed fake camera): "Take a picture" finds her face."""
    base, _ = dlfer_server
    photo = tmp_path / "astronaut.jpg"
    photo.write_bytes(astronaut_jpeg)
    page = browser.Page(f"{base}/", flags=browser.fake_webcam_flags(photo, tmp_path / "camera.y4m"))
    try:
        assert page.evaluate("document.getElementById('webcam').hidden") is False
        page.evaluate("document.getElementById('camera').click()")
        page.wait_for("document.getElementById('video').readyState >= 2 && "
                      "document.getElementById('video').videoWidth > 0")
        page.evaluate("document.getElementById('capture').click()")
        page.wait_for("document.body.dataset.state === 'done'")
        assert page.evaluate("document.getElementById('status').textContent") == "1 face"
        cells = page.evaluate("[...document.querySelectorAll('#faces tbody tr')].map("
                              "row => [...row.cells].map(cell => cell.textContent))")
        assert len(cells) == 1 and cells[0][0] == "1" and cells[0][1] in EMOTIONS
        assert sum(float(text.rstrip("%")) for text in cells[0][2:]) == pytest.approx(100, abs=0.5)
    finally:
        page.close()
