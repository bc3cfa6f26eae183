"""A classifier that answers the mean of a face and its horizontal mirror, as one Keras model.

evaluate's headline figures average each test face with its mirror (evaluate.flip_tta), and finetune
fits the class bias on those averages. mirror_averaged(model) puts the same averaging inside a model,
so that an export answers what the headline measures, at twice the work per face. Faces are roughly
left-right symmetric and training mirrors with probability finetune.online_flip, so the mirror is a
second view of the same face.

The mirror is a layer of its own (HorizontalMirror, registered with Keras under "dlfer"), so a saved
mirror-averaged model loads wherever this module has been imported (dlfer.deploy.predict does).
"""

from __future__ import annotations

import keras

MIRROR_LAYER = "mirror"
AVERAGE_LAYER = "mirror_average"


@keras.saving.register_keras_serializable(package="dlfer")
class HorizontalMirror(keras.layers.Layer):
    """Images (N, height, width, channels) reversed along the width: the left-right mirror."""

    def call(self, images):
        return keras.ops.flip(images, axis=2)


def mirror_averaged(model: keras.Model) -> keras.Model:
    """A model with model's input and output whose answer is the mean of model's answers on each image
    and on its mirror. model's weights are shared, not copied."""
    pixels = keras.Input(shape=model.input_shape[1:], name="pixels")
    mirrored = HorizontalMirror(name=MIRROR_LAYER)(pixels)
    average = keras.layers.Average(name=AVERAGE_LAYER)([model(pixels), model(mirrored)])
    return keras.Model(pixels, average, name=f"{model.name}_mirror_averaged")


def answering(model: keras.Model, mirror_average: bool) -> keras.Model:
    """model answering the mean of each face and its mirror (mirror_average) or the face alone, whether
    model is mirror-averaged already (e.g. the .keras of an export's mlflow_model) or not: never twice."""
    inner = unwrapped(model)
    return mirror_averaged(inner) if mirror_average else inner


def unwrapped(model: keras.Model) -> keras.Model:
    """The model inside a mirror_averaged model; any other model as it is."""
    if any(isinstance(layer, HorizontalMirror) for layer in model.layers):
        return next(layer for layer in model.layers if isinstance(layer, keras.Model))
    return model
