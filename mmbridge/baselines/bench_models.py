"""The TF / Keras side of :mod:`mmbridge.bench.suites`: the Keras encoders and their training step.

Call after :func:`mmbridge.export._tf.import_tensorflow` (the suites do).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mmbridge.export._tf import import_tensorflow


def keras_model(kind: str, side: int, seed: int = 0) -> Any:
    """The Keras twin of a benchmark encoder: ``kind`` in ``small_cnn``, ``mobilenet_v2``, ``resnet50``,
    ``efficientnet_b0``; float32 ``[N, side, side, 3]`` NHWC -> pooled features ``[N, F]``.
    Seeded with ``keras.utils.set_random_seed(seed)``; ``weights=None``.

    Raises:
        ValueError: unknown ``kind``.
    """
    import keras

    keras.utils.set_random_seed(seed)
    if kind == "small_cnn":
        inp = keras.Input((side, side, 3), name="image")
        x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(inp)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        out = keras.layers.Dense(32)(x)
        return keras.Model(inp, out, name="small_cnn")
    if kind == "mobilenet_v2":
        return keras.applications.MobileNetV2(weights=None, include_top=False, pooling="avg", input_shape=(side, side, 3))
    if kind == "resnet50":
        return keras.applications.ResNet50(weights=None, include_top=False, pooling="avg", input_shape=(side, side, 3))
    if kind == "efficientnet_b0":
        return keras.applications.EfficientNetB0(weights=None, include_top=False, pooling="avg", input_shape=(side, side, 3))
    raise ValueError(f"unknown encoder {kind!r}; known: small_cnn, mobilenet_v2, resnet50, efficientnet_b0")


def keras_train_step(kind: str, side: int, features: int, *, classes: int, lr: float, seed: int) -> Callable[[Any, Any], Any]:
    """A compiled Keras training step of :func:`keras_model` + ``Dense(classes)``: SGD(``lr``) on
    sparse softmax cross-entropy. Call it as ``step(x, y)`` with float32 ``[N, side, side, 3]``
    NHWC images and int64 ``[N]`` labels (TF tensors); returns the loss (float32 scalar).
    """
    tf = import_tensorflow()
    import keras

    model = keras_model(kind, side, seed=seed)
    head = keras.layers.Dense(classes)
    head.build((None, features))
    opt = keras.optimizers.SGD(lr)
    tvars = model.trainable_variables + head.trainable_variables
    opt.build(tvars)

    @tf.function
    def tf_step(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            logits = head(model(x, training=True))
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        grads = tape.gradient(loss, tvars)
        opt.apply_gradients(zip(grads, tvars))
        return loss

    return tf_step
