"""TF builders that ship with mmbridge: the demo's preprocessing graph and Keras encoder.

Each is a zero-argument builder that imports TensorFlow in its body, so that
``mmbridge.export("mmbridge.baselines.tf_models:image_preprocess")`` runs it in the export child
process and the caller never loads TensorFlow.
"""

from __future__ import annotations

from typing import Any

DEFAULT_IMAGE_SIZE = 32


def image_preprocess() -> Any:
    """TF preprocessing: uint8 ``[N, H, W, 3]`` NHWC in [0, 255] -> float32 ``[N, H, W, 3]`` in [-1, 1].

    ``x / 127.5 - 1`` (the MobileNet / EfficientNet-Lite convention), as a ``tf.function`` with
    an input signature whose N, H and W are dynamic. Imports TensorFlow.
    """
    from mmbridge.export._tf import import_tensorflow

    tf = import_tensorflow()

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="image")])
    def preprocess(image):
        return tf.cast(image, tf.float32) / 127.5 - 1.0

    return preprocess


def _image_encoder(size: int) -> Any:
    """A small Keras CNN: float32 ``[N, size, size, 3]`` NHWC -> float32 ``[N, 64]`` (seeded, untrained).

    Conv(16, 3x3, stride 2, same) -> Conv(32, stride 2) -> Conv(64, stride 2) -> global average
    pool -> Dense(64, relu). The spatial size is fixed so that tf2onnx writes explicit pads
    (with dynamic H, W "same" becomes ``auto_pad=SAME_UPPER``, which onnx2torch cannot convert).
    Imports TensorFlow / Keras.
    """
    from mmbridge.export._tf import import_tensorflow

    import_tensorflow()
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((size, size, 3), name="image")
    x = inp
    for width in (16, 32, 64):
        x = keras.layers.Conv2D(width, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(64, activation="relu")(x)
    return keras.Model(inp, out, name=f"demo_image_encoder_{size}")


def image_encoder_32() -> Any:
    """:func:`_image_encoder` for 32x32 images (the built-in sample); export ref ``mmbridge.baselines.tf_models:image_encoder_32``."""
    return _image_encoder(32)


def image_encoder_64() -> Any:
    """:func:`_image_encoder` for 64x64 images (``--data``); export ref ``mmbridge.baselines.tf_models:image_encoder_64``."""
    return _image_encoder(64)
