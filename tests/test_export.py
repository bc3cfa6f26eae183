"""`dlfer export` on a small CNN trained briefly on real FER2013 images: every format against the Keras model."""

import io
import json
import zipfile

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from conftest import FER2013_ZIP, require
from dlfer.cli.model import register
from dlfer.deploy import export, predict
from dlfer.fer2013 import LABEL_OF_EMOTION

TRAIN_IMAGES = 4000  # about 30% PrivateTest accuracy after 6 epochs (10 s): far from constant
CHECK_IMAGES = 1000


def fer2013_split(prefix: str, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`count` random images of one usage from the zip (classes as frequent as in FER2013), with labels."""
    from PIL import Image

    with zipfile.ZipFile(require(FER2013_ZIP)) as archive:
        names = sorted(name for name in archive.namelist() if f"/{prefix}_" in name)
        chosen = [names[index] for index in np.random.default_rng(seed).permutation(len(names))[:count]]
        images = [np.asarray(Image.open(io.BytesIO(archive.read(name))).convert("L")) for name in chosen]
    return np.stack(images), np.array([LABEL_OF_EMOTION[name.split("/")[1]] for name in chosen], dtype=np.int64)


def small_cnn():
    """The finetune models' interface ((N,48,48,1) raw pixels in, softmax out) at toy size, with dropout."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((48, 48, 1))
    features = keras.layers.Rescaling(1 / 255)(inputs)
    for filters in (16, 32, 64):
        features = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu")(features)
    features = keras.layers.Dropout(0.3)(keras.layers.Flatten()(features))
    return keras.Model(inputs, keras.layers.Dense(7, activation="softmax")(features))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A trained small CNN, FER2013 training images for calibration and PrivateTest images to check on."""
    root = tmp_path_factory.mktemp("export")
    train_images, train_labels = fer2013_split("Training", TRAIN_IMAGES)
    model = small_cnn()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(train_images[..., None].astype(np.float32), train_labels, epochs=6, batch_size=64, verbose=0)
    model.save(root / "model.keras")
    np.savez(root / "train.npz", images=train_images, labels=train_labels)
    check_images, check_labels = fer2013_split("PrivateTest", CHECK_IMAGES)
    np.savez(root / "test.npz", images=check_images, labels=check_labels)
    return root


def run_cli(arguments):
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    return CliRunner().invoke(app, [str(argument) for argument in arguments])


def test_every_export_agrees_with_keras_on_real_test_images(workspace):
    out = workspace / "exports"
    result = run_cli(["export", "--model", workspace / "model.keras", "--out", out,
                      "--calibration", workspace / "train.npz", "--calibration-images", 200,
                      "--check", workspace / "test.npz"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "parity.json").read_text())
    formats = report["formats"]
    print(json.dumps(report, indent=1))  # the parity figures, shown with pytest -s
    assert set(formats) == set(export.FORMATS)
    # Not a constant model: the parity figures below mean something.
    assert report["keras_accuracy"] > 0.3

    assert formats["saved_model"]["top1_agreement"] == 1.0 and formats["saved_model"]["max_abs_difference"] < 1e-5
    assert formats["onnx"]["top1_agreement"] >= 0.995 and formats["onnx"]["max_abs_difference"] < 1e-4
    assert formats["tflite_float16"]["top1_agreement"] >= 0.995
    # int8 is reported, not held to the float bar; a broken calibration would fall to chance (~0.2).
    assert formats["tflite_int8"]["top1_agreement"] >= 0.9
    assert abs(formats["tflite_int8"]["accuracy"] - report["keras_accuracy"]) < 0.05
    assert formats["tflite_int8"]["bytes"] < formats["tflite_float16"]["bytes"]
    for kind in ("saved_model", "tflite_float16", "tflite_int8", "onnx"):
        assert formats[kind]["n_images"] == CHECK_IMAGES

    # Each file is a usable `dlfer predict --model`.
    images = np.load(workspace / "test.npz")["images"][:16, :, :, None].astype(np.float32)
    reference = predict.load_classifier(workspace / "model.keras")[0](images)
    for kind in ("saved_model", "tflite_float16", "tflite_int8", "onnx"):
        classifier, _ = predict.load_classifier(out / export.FILE_NAMES[kind])
        assert classifier(images).shape == (16, 7)
        assert np.abs(classifier(images) - reference).max() < (0.1 if kind == "tflite_int8" else 1e-2)
    assert (out / "mlflow_model" / "MLmodel").is_file()
    assert "agreement" in result.stdout and "tflite_int8" in result.stdout


def test_saved_model_of_an_efficientnet_is_deterministic(tmp_path):
    """Resizing before a keras.applications EfficientNet (the finetune model at image_size != 48) makes
    `model(x)` run the backbone's dropout; Keras' own model.export then serves random answers."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    inputs = keras.Input((48, 48, 1))
    resized = keras.layers.Resizing(64, 64)(inputs)
    colour = keras.layers.Concatenate()([resized, resized, resized])
    backbone = keras.applications.EfficientNetB0(weights=None, include_top=False, input_shape=(64, 64, 3))
    features = keras.layers.GlobalAveragePooling2D()(backbone(colour))
    model = keras.Model(inputs, keras.layers.Dense(7, activation="softmax")(keras.layers.Dropout(0.2)(features)))
    export.write_saved_model(model, tmp_path / "saved_model")
    served = tf.saved_model.load(str(tmp_path / "saved_model"))
    batch = np.random.default_rng(0).integers(0, 256, (8, 48, 48, 1)).astype(np.float32)
    first, second = served.serve(batch).numpy(), served.serve(batch).numpy()
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, model.predict(batch, verbose=0), atol=1e-5)


def test_bad_requests_fail_with_one_clear_line(workspace, tmp_path):
    result = run_cli(["export", "--model", workspace / "model.keras", "--out", tmp_path / "out",
                      "--formats", "onnx,coreml", "--check", ""])
    assert result.exit_code == 2 and "coreml" in result.stderr
    result = run_cli(["export", "--model", workspace / "model.keras", "--out", tmp_path / "out",
                      "--calibration", tmp_path / "absent.npz", "--check", ""])
    assert result.exit_code == 2 and "absent.npz: not found" in result.stderr
    assert not (tmp_path / "out").exists()
    wrong = tmp_path / "wrong.keras"
    import keras

    keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(7)]).save(wrong)
    result = run_cli(["export", "--model", wrong, "--out", tmp_path / "out", "--formats", "onnx", "--check", ""])
    assert result.exit_code == 2 and "input shape" in result.stderr


def test_representative_images_are_drawn_without_replacement():
    images = np.arange(10, dtype=np.uint8)[:, None, None] * np.ones((1, 48, 48), dtype=np.uint8)
    drawn = export.representative_images(images, 4, np.random.default_rng(0))
    assert drawn.shape == (4, 48, 48, 1) and drawn.dtype == np.float32
    assert len(set(drawn[:, 0, 0, 0].tolist())) == 4
    assert export.representative_images(images, 50, np.random.default_rng(0)).shape[0] == 10
