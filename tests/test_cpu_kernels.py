"""Tests for dlfer.model.cpu_kernels: the faster CPU kernels compute what Keras' layers compute.

Each kernel is held against the Keras layer it replaces (outputs, input and weight gradients, moving
statistics); a whole Lite0 network's gradients are held against a float64 reference, where float32 Keras
itself is off by its rounding; and a model trained with them saves as plain Keras.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from dlfer import machine
from dlfer.model import backbones, cpu_kernels, train


def _two_copies(make_layer, input_shape, bf16_products=False):
    """The same one-layer model twice, with equal weights; the second one with dlfer's kernels."""
    models = []
    for _ in range(2):
        inputs = keras.Input(shape=input_shape)
        models.append(keras.Model(inputs, make_layer()(inputs)))
    models[1].set_weights(models[0].get_weights())
    counts = cpu_kernels.install(models[1], bf16_products=bf16_products)
    assert sum(counts.values()) == 1, counts
    return models


def _outputs_and_gradients(model, inputs, weights_of_outputs):
    inputs = tf.constant(inputs)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        outputs = model(inputs, training=True)
        loss = tf.reduce_sum(outputs * weights_of_outputs)
    gradients = tape.gradient(loss, [inputs, *model.trainable_variables])
    return [outputs.numpy(), *(gradient.numpy() for gradient in gradients)]


@pytest.mark.parametrize("make_layer, spatial, bf16_products", [
    (lambda: layers.DepthwiseConv2D(3, padding="same", use_bias=False), 9, False),
    (lambda: layers.DepthwiseConv2D(5, padding="same", use_bias=False), 6, False),
    (lambda: layers.DepthwiseConv2D(3, strides=2, padding="valid", use_bias=False), 9, False),
    (lambda: layers.DepthwiseConv2D(5, strides=2, padding="valid", use_bias=False), 10, False),
    (lambda: layers.Conv2D(12, 1, padding="same", use_bias=False), 5, False),
    (lambda: layers.Conv2D(12, 1, padding="same", use_bias=True), 5, False),
    # The form bf16 products take (oneDNN's matmul primitive), here in float32: this process never allows bf16.
    (lambda: layers.Conv2D(12, 1, padding="same", use_bias=True), 5, True),
    (lambda: layers.BatchNormalization(momentum=0.9, epsilon=1e-3), 5, False),
], ids=["depthwise3-same", "depthwise5-same", "depthwise3-stride2", "depthwise5-stride2", "pointwise",
        "pointwise-bias", "pointwise-matmul-primitive", "batch-norm"])
def test_each_kernel_gives_the_keras_layers_outputs_and_gradients(make_layer, spatial, bf16_products):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    keras_model, fast_model = _two_copies(make_layer, (spatial, spatial, 8), bf16_products)
    weights = [np.abs(rng.normal(1.0, 0.3, weight.shape)).astype("float32") for weight in keras_model.get_weights()]
    for model in (keras_model, fast_model):  # non-trivial batch-norm weights and statistics
        model.set_weights(weights)
    inputs = rng.normal(0.5, 2.0, (4, spatial, spatial, 8)).astype("float32")
    weights_of_outputs = rng.normal(size=keras_model.output.shape[1:]).astype("float32")
    expected = _outputs_and_gradients(keras_model, inputs, weights_of_outputs)
    got = _outputs_and_gradients(fast_model, inputs, weights_of_outputs)
    for name, want, have in zip(["outputs", "input gradient", "weight gradients"], expected, got):
        np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=name)
    # The moving statistics move as Keras moves them (biased batch variance), and inference is Keras'.
    for want, have in zip(keras_model.non_trainable_variables, fast_model.non_trainable_variables):
        np.testing.assert_allclose(have.numpy(), want.numpy(), rtol=1e-5, err_msg=want.path)
    np.testing.assert_allclose(fast_model(inputs, training=False), keras_model(inputs, training=False), rtol=1e-5,
                               atol=1e-5)


def _network_gradients(model, images, labels):
    with tf.GradientTape() as tape:
        loss = keras.losses.categorical_crossentropy(labels, model(images, training=True))
    return [gradient.numpy().astype("float64") for gradient in tape.gradient(loss, model.trainable_variables)]


def _smooth_lite0_without_dropout(size: int) -> keras.Model:
    """Lite0 whose ReLU6 layers compute swish, without stochastic depth.

    ReLU6's gradient jumps at 0 and 6: a pre-activation within float32 rounding of a kink (3e-6 away, measured
    on an AMD EPYC) switches one gradient on or off, an error a thousand times rounding's that says nothing
    about the kernels under test, and whether it happens depends on the CPU's summation order. Swish has no
    kink, so the network's gradient error is rounding alone.
    """
    keras.utils.set_random_seed(1)
    model = backbones.build_classifier("efficientnet_lite0", size, 1, 0.0)
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, layers.Dropout):
            layer.rate = 0.0  # stochastic depth draws differ between float32 and float64
        elif isinstance(layer, layers.ReLU):
            object.__setattr__(layer, "call", keras.activations.silu)
    return model


def test_a_whole_network_gets_gradients_as_exact_as_keras_float32():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 48, 48, 1)).astype("float32")
    labels = keras.utils.to_categorical(rng.integers(0, 7, 8), 7)
    keras_model = _smooth_lite0_without_dropout(40)
    fast_model = _smooth_lite0_without_dropout(40)
    fast_model.set_weights(keras_model.get_weights())
    counts = cpu_kernels.install(fast_model)
    # Lite0: 16 depthwise layers; a batch norm after the stem, each convolution and the head; 1x1 convolutions.
    assert counts == {"batch_norm": 49, "depthwise": 16, "pointwise": 32}, counts
    weights = keras_model.get_weights()
    previous_policy = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("float64")
    try:
        reference_model = _smooth_lite0_without_dropout(40)
        reference_model.set_weights([weight.astype("float64") for weight in weights])
        reference = _network_gradients(reference_model, images.astype("float64"), labels.astype("float64"))
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    def error(gradients):
        return np.sqrt(sum(((gradient - exact) ** 2).sum() for gradient, exact in zip(gradients, reference)))

    scale = np.sqrt(sum((exact ** 2).sum() for exact in reference))
    keras_error = error(_network_gradients(keras_model, images, labels)) / scale
    fast_error = error(_network_gradients(fast_model, images, labels)) / scale
    # Both are float32 rounding amplified through the network; neither is meaningfully closer to exact.
    assert fast_error < 3 * keras_error + 1e-6, (fast_error, keras_error)
    assert keras_error < 0.05


def test_layers_that_are_not_plain_keep_keras_code():
    inputs = keras.Input(shape=(8, 8, 4))
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=True)(inputs)       # a bias
    x = layers.DepthwiseConv2D(3, padding="same", dilation_rate=2, use_bias=False)(x)
    x = layers.DepthwiseConv2D(4, padding="same", use_bias=False)(x)           # an even kernel
    x = layers.DepthwiseConv2D(3, strides=2, padding="same", use_bias=False)(x)  # TF's asymmetric padding
    x = layers.Conv2D(4, 3, padding="same")(x)                                  # not 1x1
    x = layers.Conv2D(4, 1, strides=2)(x)                                       # strided
    x = layers.BatchNormalization(renorm=True)(x)
    x = layers.BatchNormalization(center=False)(x)
    assert cpu_kernels.install(keras.Model(inputs, x)) == {"batch_norm": 0, "depthwise": 0, "pointwise": 0}


def test_a_trained_model_saves_plain_keras_layers_that_load_without_dlfer(tmp_path):
    model = backbones.build_classifier("efficientnet_lite0", 32, 1, 0.2)
    cpu_kernels.install(model)
    settings = train.TrainingSettings(epochs=1, batch_size=4, learning_rate=1e-3, seed=0)
    train.compile_model(model, settings, steps_per_epoch=2)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 48, 48, 1)).astype("float32")
    model.fit(images, keras.utils.to_categorical(rng.integers(0, 7, 8), 7), batch_size=4, epochs=1, verbose=0)
    model.save(tmp_path / "model.keras")
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "expected.npy", model.predict(images, verbose=0))
    check = ("import sys, keras, numpy as np; d = sys.argv[1]; "
             "m = keras.models.load_model(d + '/model.keras', compile=False); "
             "assert not [n for n in sys.modules if n.startswith('dlfer')]; "
             "np.testing.assert_allclose(m.predict(np.load(d + '/images.npy'), verbose=0), "
             "np.load(d + '/expected.npy'), rtol=1e-5, atol=1e-6)")
    result = subprocess.run([sys.executable, "-c", check, str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("setting, expected", [("auto", True), ("on", True), ("off", False)])
def test_the_runtime_uses_them_on_a_cpu_unless_switched_off(setting, expected):
    settings = train.TrainingSettings(epochs=1, batch_size=4, learning_rate=1e-3, seed=0, cpu_kernels=setting,
                                      distribution="none")
    _, runtime = train.configure_runtime(settings)
    assert runtime["cpu_kernels"] is expected


@pytest.mark.parametrize("math, kernels, amx, expected", [
    ("bf16", "on", True, "bf16"), ("fp32", "on", True, "fp32"), ("bf16", "off", True, "fp32"),
    ("bf16", "on", False, "fp32"),  # without AMX oneDNN computes float32 anyway: the two-matrix product, said so
])
def test_bf16_math_is_allowed_only_with_the_cpu_kernels_on_amx(monkeypatch, math, kernels, amx, expected):
    monkeypatch.delenv("ONEDNN_DEFAULT_FPMATH_MODE", raising=False)  # restored after: later subprocesses keep theirs
    monkeypatch.setattr(machine, "has_amx", lambda: amx)  # the one probe of this machine's processor
    settings = train.TrainingSettings(epochs=1, batch_size=4, learning_rate=1e-3, seed=0, cpu_kernels=kernels,
                                      cpu_math=math, distribution="none")
    _, runtime = train.configure_runtime(settings)
    assert runtime["cpu_math"] == expected
    assert os.environ.get("ONEDNN_DEFAULT_FPMATH_MODE") == ("BF16" if expected == "bf16" else None)


# One training step of a small Lite0 in a fresh process, as the finetune stage trains it; oneDNN's verbose log
# names each primitive it runs, with the fpmath attribute it was created with.
_ONE_STEP = """
import sys, keras, numpy as np
from dlfer.model import backbones, train
settings = train.TrainingSettings(epochs=1, batch_size=8, learning_rate=1e-3, seed=0, cpu_math=sys.argv[1],
                                  distribution="none")
strategy, runtime = train.configure_runtime(settings)
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (8, 48, 48, 1)).astype("uint8")
labels = rng.integers(0, 7, 8)
train.fit_classifier(lambda: backbones.build_classifier("efficientnet_lite0", 32, 1, 0.2), (images, labels),
                     (images, labels), settings, sys.argv[2], 7, runtime=(strategy, runtime))
"""


@pytest.mark.parametrize("math", ["bf16", "fp32"])
def test_a_training_process_creates_its_onednn_products_with_the_chosen_math(tmp_path, math):
    environment = {**os.environ, "ONEDNN_VERBOSE": "1"}
    environment.pop("ONEDNN_DEFAULT_FPMATH_MODE", None)
    result = subprocess.run([sys.executable, "-c", _ONE_STEP, math, str(tmp_path / "checkpoints")],
                            capture_output=True, text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    products = [line for line in result.stdout.splitlines() if ",primitive,exec," in line and ",matmul," in line]
    if math == "bf16" and machine.has_amx():
        # The 1x1 convolutions run on oneDNN's matmul primitive, each created in bf16 mode.
        assert products and all("attr-fpmath:bf16" in line for line in products), products[:3]
    else:  # fp32, or bf16 on a CPU without AMX: float32 as before, and the process says so
        assert not [line for line in result.stdout.splitlines() if "attr-fpmath:bf16" in line]
        assert (math == "bf16") == ("acts only on CPUs with AMX" in result.stdout), result.stdout[-2000:]
