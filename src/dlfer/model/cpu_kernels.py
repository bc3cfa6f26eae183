"""Faster TensorFlow kernels for three Keras layers while a model trains on a CPU: the same function.

Where a CPU training step of EfficientNet (Lite0 or B0-B3) goes, measured by `python bench/train_throughput.py
--profile` (TensorFlow's profiler, op self time): Keras 3 computes BatchNormalization in training from
separate elementwise ops (moments, then normalise: Mul, Sum, Mean, SquaredDifference, Tile, Sub and their
gradients), where TensorFlow has one fused kernel for it; oneDNN's gradient of a 5x5 depthwise kernel is several
times slower than TensorFlow's own (Eigen) one, which oneDNN's graph rewrite replaces except for explicit padding;
and oneDNN's 1x1 convolution is slower than the matrix product it is. `install` gives a built model's layers
these kernels:

- BatchNormalization in training: tf.raw_ops.FusedBatchNormV3 normalises with the batch statistics and
  returns them; the moving averages are updated as Keras updates them, with the biased batch variance
  (the fused op returns the unbiased one, n/(n-1) larger, which is undone). Inference is Keras' own code.
- DepthwiseConv2D: the forward op and the input gradient are TensorFlow's (oneDNN's), the kernel gradient of
  kernels larger than 3x3 uses padding="EXPLICIT", which keeps TensorFlow's own kernel.
- Conv2D with a 1x1 kernel and stride 1: a matrix product of the (pixels, channels) matrix with the kernel.

With bf16_products (finetune.cpu_math: bf16) oneDNN may round the float32 inputs of its matrix products and
convolutions to bfloat16 and accumulate in float32 (its "fpmath mode"), which CPUs with AMX run faster (oneDNN's
verbose log: brg_matmul:avx10_1_512_amx on a Sapphire Rapids Xeon); the 1x1 products then go through oneDNN's
matmul primitive, the one that honours the mode (tf.matmul of two matrices calls oneDNN's sgemm, which does
not). Storage, batch norm, activations and the optimizer stay float32. It changes rounding, not the function.
On CPUs without AMX oneDNN keeps its float32 kernels under the mode, AVX512-BF16 ones included: on an AMD EPYC
(Zen 4) every matmul, convolution and batch-norm primitive of a training step ran an avx512_core
implementation, and the batch-of-one product form cost the same as the two-matrix one or a little more, so
train.configure_runtime asks for bf16 products only where the CPU has AMX (dlfer.machine.has_amx).
`python bench/train_throughput.py` measures both forms on any CPU.

Each computes what the Keras layer computes, up to float32 rounding (tests/test_cpu_kernels.py holds the
gradients of a whole network against a float64 reference). The layers stay the Keras classes with their own
variables: only the instance's `call` (or `convolution_op`) is replaced, so a saved .keras file, a checkpoint
or an exported model holds plain Keras layers that load without dlfer. Determinism is unchanged: every kernel
here is deterministic on a CPU. Layers of other configurations (bias, dilation, groups, channels_first,
renorm, synchronized or masked batch norm, mixed precision) keep Keras' code.
"""

from __future__ import annotations

import functools
import os
import types

import keras
import tensorflow as tf
from keras import layers


def allow_bf16_products() -> None:
    """Let oneDNN compute this process's float32 products in bfloat16 (float32 sums), where the CPU can.

    oneDNN reads the mode once, when it creates its first primitive: call this before any TensorFlow op
    runs (train.configure_runtime does). Other processes (evaluate, predict, export) keep float32.
    """
    os.environ["ONEDNN_DEFAULT_FPMATH_MODE"] = "BF16"


def install(model: keras.Model, bf16_products: bool = False) -> dict[str, int]:
    """Give every eligible layer of `model` (nested models included) its faster kernel; how many of each.

    bf16_products: 1x1 convolutions through oneDNN's matmul primitive (see allow_bf16_products).
    """
    counts = {"batch_norm": 0, "depthwise": 0, "pointwise": 0}
    product = functools.partial(_pointwise_convolution, batch_of_one=bf16_products)
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, layers.BatchNormalization) and _fusable(layer):
            _replace(layer, "call", _fused_batch_norm_call)
            counts["batch_norm"] += 1
        elif isinstance(layer, layers.DepthwiseConv2D) and _plain_depthwise(layer):
            _replace(layer, "call", _depthwise_call)
            counts["depthwise"] += 1
        elif pointwise(layer):
            _replace(layer, "convolution_op", product)
            counts["pointwise"] += 1
    return counts


def _replace(layer: layers.Layer, name: str, function) -> None:
    # object.__setattr__: Keras' attribute tracking has nothing to track in a bound method.
    object.__setattr__(layer, name, types.MethodType(function, layer))


def _fusable(layer: layers.BatchNormalization) -> bool:
    return (layer.axis in (-1, 3) and layer.center and layer.scale and not layer.renorm
            and not layer.synchronized and layer.compute_dtype == "float32")


def _plain_depthwise(layer: layers.DepthwiseConv2D) -> bool:
    size, stride = tuple(layer.kernel_size), tuple(layer.strides)
    return (layer.data_format == "channels_last" and layer.depth_multiplier == 1 and not layer.use_bias
            and layer.activation is keras.activations.linear and size[0] == size[1] and size[0] % 2 == 1
            and stride[0] == stride[1] and (layer.padding == "valid" or stride[0] == 1)
            and tuple(layer.dilation_rate) == (1, 1) and layer.compute_dtype == "float32")


def pointwise(layer: layers.Layer) -> bool:
    """A plain 1x1, stride-1 Conv2D: a layer whose convolution `install` makes a matrix product."""
    return (type(layer) is layers.Conv2D and layer.data_format == "channels_last" and tuple(layer.kernel_size) == (1, 1)
            and tuple(layer.strides) == (1, 1) and tuple(layer.dilation_rate) == (1, 1) and layer.groups == 1
            and layer.compute_dtype == "float32")


def _fused_batch_norm_call(self, inputs, training=None, mask=None):
    if not (training and self.trainable) or mask is not None or len(inputs.shape) != 4:
        return type(self).call(self, inputs, training=training, mask=mask)
    empty = tf.constant([], tf.float32)
    outputs, mean, unbiased_variance, *_ = tf.raw_ops.FusedBatchNormV3(
        x=inputs, scale=self.gamma, offset=self.beta, mean=empty, variance=empty, epsilon=self.epsilon,
        exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
    shape = tf.shape(inputs)
    count = tf.cast(shape[0] * shape[1] * shape[2], tf.float32)
    variance = unbiased_variance * (count - 1.0) / tf.maximum(count, 1.0)
    self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
    self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
    return outputs


def _depthwise_call(self, inputs):
    size, stride = self.kernel_size[0], self.strides[0]
    pad = (size - 1) // 2 if self.padding == "same" else 0
    return _depthwise_convolution(inputs, tf.convert_to_tensor(self.kernel), size, stride, pad)


def _depthwise_convolution(inputs, kernel, size: int, stride: int, pad: int):
    strides = [1, stride, stride, 1]
    padding = "SAME" if pad else "VALID"  # "same" layers only (odd kernel, stride 1): pad each side alike

    @tf.custom_gradient
    def convolve(inputs, kernel):
        outputs = tf.raw_ops.DepthwiseConv2dNative(input=inputs, filter=kernel, strides=strides, padding=padding)

        def gradients(output_gradient):
            input_gradient = tf.raw_ops.DepthwiseConv2dNativeBackpropInput(
                input_sizes=tf.shape(inputs), filter=kernel, out_backprop=output_gradient, strides=strides,
                padding=padding)
            if size > 3:
                # oneDNN's rewrite leaves padding="EXPLICIT" to TensorFlow's kernel, the fast one for 5x5.
                kernel_gradient = tf.raw_ops.DepthwiseConv2dNativeBackpropFilter(
                    input=inputs, filter_sizes=tf.shape(kernel), out_backprop=output_gradient, strides=strides,
                    padding="EXPLICIT", explicit_paddings=[0, 0, pad, pad, pad, pad, 0, 0])
            else:
                kernel_gradient = tf.raw_ops.DepthwiseConv2dNativeBackpropFilter(
                    input=inputs, filter_sizes=tf.shape(kernel), out_backprop=output_gradient, strides=strides,
                    padding=padding)
            return input_gradient, kernel_gradient

        return outputs, gradients

    return convolve(inputs, kernel)


def _pointwise_convolution(self, inputs, kernel, batch_of_one: bool = False):
    # batch_of_one: TensorFlow runs a batch of one matrix product on oneDNN's matmul primitive, not on sgemm.
    lead = (1,) if batch_of_one else ()
    shape = tf.shape(inputs)
    pixels = tf.reshape(inputs, (*lead, -1, inputs.shape[-1]))
    outputs = tf.matmul(pixels, tf.reshape(kernel, (*lead, *kernel.shape[-2:])))
    return tf.reshape(outputs, tf.concat([shape[:-1], [kernel.shape[-1]]], axis=0))
