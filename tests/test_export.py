"""`dlfer export` on a small CNN trained briefly on real FER2013 images: every format against the Keras model
on validation (PublicTest) faces, the parity threshold from params, and the int8 conversion's parts."""

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import typer
import yaml
from typer.testing import CliRunner

from conftest import FER2013_ZIP, require
from dlfer.cli.model import register
from dlfer.deploy import export, predict
from dlfer.fer2013 import LABEL_OF_EMOTION

REPOSITORY = Path(__file__).resolve().parents[1]

TRAIN_IMAGES = 4000  # about 29% PublicTest accuracy after 6 epochs (~20 s): happy, the largest class, is 25%
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
    """The finetune models' interface ((N,48,48,1) raw pixels in, softmax out) and shape at toy size: an
    in-model resize and scaling, convolutions each followed by BatchNorm (named x_conv, x_bn as in
    EfficientNet), ReLU6, dropout."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((48, 48, 1))
    features = keras.layers.Resizing(56, 56, name="resize")(inputs)
    features = keras.layers.Rescaling(1 / 128, offset=-127 / 128, name="input_scaling")(features)
    for index, filters in enumerate((16, 32, 64)):
        features = keras.layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False,
                                       name=f"block{index}_conv")(features)
        features = keras.layers.BatchNormalization(momentum=0.9, name=f"block{index}_bn")(features)
        features = keras.layers.ReLU(6.0)(features)
    features = keras.layers.Dropout(0.3)(keras.layers.GlobalAveragePooling2D()(features))
    return keras.Model(inputs, keras.layers.Dense(7, activation="softmax")(features))


def params_with(folder: Path, min_top1_agreement: float) -> Path:
    """The repository's params.yaml with export.min_top1_agreement changed."""
    params = yaml.safe_load((REPOSITORY / "params.yaml").read_text())
    params["export"]["min_top1_agreement"] = min_top1_agreement
    path = folder / f"params_{min_top1_agreement}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A trained small CNN, FER2013 training images for calibration and PublicTest (validation) images to check on."""
    root = tmp_path_factory.mktemp("export")
    train_images, train_labels = fer2013_split("Training", TRAIN_IMAGES)
    model = small_cnn()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(train_images[..., None].astype(np.float32), train_labels, epochs=6, batch_size=64, verbose=0)
    model.save(root / "model.keras")
    np.savez(root / "train.npz", images=train_images, labels=train_labels)
    check_images, check_labels = fer2013_split("PublicTest", CHECK_IMAGES)
    np.savez(root / "val.npz", images=check_images, labels=check_labels)
    return root


def run_cli(arguments):
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    return CliRunner().invoke(app, [str(argument) for argument in arguments])


def test_every_export_agrees_with_keras_on_real_validation_images(workspace):
    out = workspace / "exports"
    result = run_cli(["export", "--model", workspace / "model.keras", "--out", out,
                      "--calibration", workspace / "train.npz", "--calibration-images", 200,
                      "--check", workspace / "val.npz", "--params", params_with(workspace, 0.9)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "parity.json").read_text())
    formats = report["formats"]
    print(json.dumps(report, indent=1))  # the parity figures, shown with pytest -s
    assert set(formats) == set(export.FORMATS)
    # Not a constant model (at most 25% on PublicTest): the parity figures below mean something.
    assert report["keras_accuracy"] > 0.27

    assert formats["saved_model"]["top1_agreement"] == 1.0 and formats["saved_model"]["max_abs_difference"] < 1e-5
    assert formats["onnx"]["top1_agreement"] >= 0.995 and formats["onnx"]["max_abs_difference"] < 1e-4
    assert formats["tflite_float16"]["top1_agreement"] >= 0.995
    # A broken calibration would fall to chance (~0.2); this toy model has no EfficientNet's margin.
    assert formats["tflite_int8"]["top1_agreement"] >= 0.95
    assert abs(formats["tflite_int8"]["accuracy"] - report["keras_accuracy"]) < 0.05
    assert formats["tflite_int8"]["bytes"] < formats["tflite_float16"]["bytes"]
    for kind in ("saved_model", "tflite_float16", "tflite_int8", "onnx"):
        assert formats[kind]["n_images"] == CHECK_IMAGES

    # Each file is a usable `dlfer predict --model`, answering (params.yaml's export.mirror_average) the mean of
    # the Keras model's answers on each face and on its mirror, and so the same for a face and its mirror.
    assert report["mirror_average"] is True
    images = np.load(workspace / "val.npz")["images"][:16, :, :, None].astype(np.float32)
    mirrored = np.ascontiguousarray(images[:, :, ::-1])
    keras_model = predict.load_classifier(workspace / "model.keras", mirror=False)[0]
    reference = (keras_model(images) + keras_model(mirrored)) / 2
    assert np.abs(keras_model(images) - keras_model(mirrored)).max() > 0.05  # the mirror is another view
    for kind in ("saved_model", "tflite_float16", "tflite_int8", "onnx"):
        classifier, _ = predict.load_classifier(out / export.FILE_NAMES[kind])
        assert classifier(images).shape == (16, 7)
        assert np.abs(classifier(images) - reference).max() < (0.1 if kind == "tflite_int8" else 1e-2)
        # int8: each view's activations are calibrated on their own, so the two differ by a little rounding.
        assert np.abs(classifier(images) - classifier(mirrored)).max() < (1e-2 if kind == "tflite_int8" else 1e-5)
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


def test_no_mirror_exports_answer_the_face_alone_and_a_mirror_averaged_model_exports_either_way(workspace, tmp_path):
    from dlfer.deploy import serving
    from dlfer.model import mirror

    images = np.load(workspace / "val.npz")["images"][:16, :, :, None].astype(np.float32)
    keras_model = predict.load_classifier(workspace / "model.keras", mirror=False)[0]
    result = run_cli(["export", "--model", workspace / "model.keras", "--out", tmp_path / "alone", "--no-mirror",
                      "--formats", "tflite_float16,mlflow", "--check", ""])
    assert result.exit_code == 0, result.output
    assert "every format answers the face alone" in result.stderr
    assert json.loads((tmp_path / "alone" / "parity.json").read_text())["mirror_average"] is False
    alone = predict.load_classifier(tmp_path / "alone" / export.FILE_NAMES["tflite_float16"])[0]
    assert np.abs(alone(images) - keras_model(images)).max() < 1e-2

    # The mlflow_model of a mirror-averaged export holds a mirror-averaged .keras: exported again with
    # --no-mirror it gives the face alone, not the mirror twice.
    averaged = tmp_path / "averaged"
    assert run_cli(["export", "--model", workspace / "model.keras", "--out", averaged, "--mirror",
                    "--formats", "mlflow", "--check", ""]).exit_code == 0
    inner = predict.keras_model_from(averaged / "mlflow_model")
    assert mirror.unwrapped(inner) is not inner
    assert serving.load_served_model(averaged / "mlflow_model") is not None
    again = run_cli(["export", "--model", averaged / "mlflow_model", "--out", tmp_path / "again", "--no-mirror",
                     "--formats", "tflite_float16", "--check", ""])
    assert again.exit_code == 0, again.output
    alone_again = predict.load_classifier(tmp_path / "again" / export.FILE_NAMES["tflite_float16"])[0]
    assert np.abs(alone_again(images) - alone(images)).max() < 1e-3


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


def test_an_export_below_the_agreement_in_params_fails_with_one_line_and_writes_nothing(workspace, tmp_path):
    out = tmp_path / "exports"
    result = run_cli(["export", "--model", workspace / "model.keras", "--out", out, "--formats", "tflite_int8",
                      "--calibration", workspace / "train.npz", "--calibration-images", 200,
                      "--check", workspace / "val.npz", "--params", params_with(tmp_path, 1.0)])
    assert result.exit_code == 1, result.output
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert message.startswith("export: tflite_int8: top-1 agreement with Keras 0.9")
    assert f"on {CHECK_IMAGES} check faces is below export.min_top1_agreement 1.0" in message
    assert not out.exists()


def test_the_check_defaults_to_validation_faces_never_the_test_split():
    import inspect

    from dlfer.cli.model import export as export_command

    default = inspect.signature(export_command).parameters["check"].default.default
    assert default == "data/balanced/val.npz"
    assert "test" not in default
    readme = (REPOSITORY / "README.md").read_text()
    assert "--check data/balanced/test.npz" not in readme


def test_int8_keeps_the_preprocessing_stem_and_head_float_and_every_other_convolution_int8(workspace, tmp_path):
    import keras
    import tensorflow as tf

    model = predict.keras_model_from(workspace / "model.keras")
    relu = next(layer.name for layer in model.layers if isinstance(layer, keras.layers.ReLU))
    assert export.float_layers(model) == ("resize", "input_scaling", "block0_conv", "block0_bn", relu)
    train = np.load(workspace / "train.npz")["images"]
    calibration = export.representative_images(train, 100, np.random.default_rng(0))
    interpreter = tf.lite.Interpreter(model_content=export._int8_model(model, calibration, tmp_path / "source"))
    details = {detail["index"]: detail for detail in interpreter.get_tensor_details()}
    output_types = {}
    for op in interpreter._get_ops_details():
        output_types.setdefault(op["op_name"], set()).update(details[i]["dtype"] for i in op["outputs"])
    assert output_types["RESIZE_BILINEAR"] == {np.float32}
    assert output_types["SOFTMAX"] == {np.float32} and output_types["FULLY_CONNECTED"] == {np.float32}
    assert output_types["CONV_2D"] == {np.float32, np.int8}
    convolutions = [op for op in interpreter._get_ops_details() if op["op_name"] == "CONV_2D"]
    assert [details[op["outputs"][0]]["dtype"] for op in convolutions] == [np.float32, np.int8, np.int8]
    assert not (tmp_path / "source").exists()

    # Mirror-averaged: the mirror and the average float too, each view's stem float and the rest int8.
    averaged = tf.lite.Interpreter(model_content=export._int8_model(model, calibration, tmp_path / "source", True))
    details = {detail["index"]: detail for detail in averaged.get_tensor_details()}
    dtypes = {}
    for op in averaged._get_ops_details():
        dtypes.setdefault(op["op_name"], []).append(details[op["outputs"][0]]["dtype"])
    assert dtypes["REVERSE_V2"] == [np.float32]
    assert sorted(map(str, dtypes["CONV_2D"])) == sorted(map(str, [np.float32, np.int8, np.int8] * 2))
    assert dtypes["SOFTMAX"] == [np.float32] * 2
    # int8 from each view's stem to its head only: one QUANTIZE each, so the average of the views is float.
    assert len(dtypes["QUANTIZE"]) == 2 and all(kind == np.float32 for kind in dtypes["ADD"] + dtypes["MUL"])


def test_bias_correction_cancels_the_mean_shift_of_int8_weight_rounding(workspace):
    """Keras with the first convolution's kernel rounded as the converter rounds it: the per-channel mean
    shift of its BatchNorm output on the calibration images, without and with the correction."""
    import keras

    model = predict.keras_model_from(workspace / "model.keras")
    images = np.load(workspace / "train.npz")["images"][:300, :, :, None].astype(np.float32)
    corrected = export.bias_corrected_copy(model, images)
    # The copy is separate: the original is untouched.
    np.testing.assert_array_equal(model.get_layer("block0_bn").get_weights()[2],
                                  predict.keras_model_from(workspace / "model.keras").get_layer("block0_bn").get_weights()[2])
    assert not np.array_equal(model.get_layer("block0_bn").get_weights()[2],
                              corrected.get_layer("block0_bn").get_weights()[2])

    def rounded(source):
        copy = keras.models.clone_model(source)
        copy.set_weights(source.get_weights())
        conv, batch_norm = copy.get_layer("block0_conv"), copy.get_layer("block0_bn")
        gamma, _, _, variance = batch_norm.get_weights()
        fold = gamma / np.sqrt(variance + batch_norm.epsilon)
        conv.set_weights([export.int8_rounded_kernel(conv.get_weights()[0], fold, depthwise=False)])
        return keras.Model(copy.inputs, batch_norm.output)

    reference = keras.Model(model.inputs, model.get_layer("block0_bn").output).predict(images, verbose=0)
    shift_plain = np.abs((rounded(model).predict(images, verbose=0) - reference).mean(axis=(0, 1, 2)))
    shift_corrected = np.abs((rounded(corrected).predict(images, verbose=0) - reference).mean(axis=(0, 1, 2)))
    assert shift_plain.mean() > 2e-5  # rounding does shift the means
    assert shift_corrected.mean() < 0.05 * shift_plain.mean()


def test_int8_rounding_gives_at_most_255_levels_per_output_channel():
    kernel = np.random.default_rng(0).normal(size=(3, 3, 4, 5)).astype(np.float32)
    fold = np.array([1.0, 2.0, 0.5, 0.0, 10.0], dtype=np.float32)
    rounded = export.int8_rounded_kernel(kernel, fold, depthwise=False)
    for channel in (0, 1, 2, 4):
        folded = rounded[..., channel] * fold[channel]
        step = np.abs(kernel[..., channel] * fold[channel]).max() / 127
        np.testing.assert_allclose(folded / step, np.round(folded / step), atol=1e-3)
        assert np.abs(rounded[..., channel] - kernel[..., channel]).max() <= step / fold[channel] / 2 + 1e-6
    np.testing.assert_array_equal(rounded[..., 3], kernel[..., 3])  # a zero BatchNorm scale: nothing to round
