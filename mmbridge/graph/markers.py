"""Initializer and name-scope markers that a trainable export writes and the converter reads.

:mod:`mmbridge.export.trainable` names every Keras variable's placeholder ``mmb_var__<path>``
(trainable) or ``mmb_state__<path>`` (non-trainable state such as BatchNorm moving statistics),
and puts BatchNorm / Dropout / LayerNorm under name scopes that carry their hyper-parameters
(``mmb_bn__m0p99`` = momentum 0.99). :mod:`mmbridge.convert` reads the same names to decide which
initializer becomes an ``nn.Parameter`` and which a buffer. Both sides import them from here.
"""

from __future__ import annotations

#: Name prefixes of the marker placeholders / initializers / name scopes.
VAR_MARK = "mmb_var__"
STATE_MARK = "mmb_state__"
DROPOUT_MARK = "mmb_dropout__r"
BN_MARK = "mmb_bn__m"
LN_MARK = "mmb_ln__e"
#: Suffix of a BatchNorm scope (after ``mmb_bn__m<momentum>``) whose Keras layer moves its moving
#: variance towards the *unbiased* (Bessel-corrected, ``n / (n - 1)``) batch variance: tf-keras'
#: fused BatchNormalization. Without it, the population variance (Keras 3, ONNX's spec).
BN_BESSEL = "__mmb_bessel"
#: Suffix of a Dropout marker whose Keras layer is a ``SpatialDropout1D/2D/3D`` (one mask value per
#: (sample, channel)); its ONNX Dropout node's name ends with ``<CHANNEL_MARK>_a<axis>``, the
#: channel axis in the graph's layout at that node (``mmbridge.convert.ops.dropout`` reads it).
CHANNEL_MARK = "__mmb_noise_per_channel"


def encode_float(x: float) -> str:
    """A float as a name-safe token: ``0.99 -> "0p99"``, ``1e-05 -> "1e-05"`` (exact round trip)."""
    return repr(float(x)).replace(".", "p")


def decode_float(token: str) -> float:
    """Inverse of :func:`encode_float`."""
    return float(token.replace("p", "."))


def marker_of(name: str) -> str | None:
    """The variable / state / dropout marker a value name carries, or None."""
    for mark in (VAR_MARK, STATE_MARK, DROPOUT_MARK):
        if mark in name:
            return mark
    return None
