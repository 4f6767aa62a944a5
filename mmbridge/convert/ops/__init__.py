"""mmbridge's ONNX -> torch op converters, one file per op family, registered in :data:`op_converters`.

Importing this package registers them (``mmbridge.op_converters`` and ``mmbridge.to_torch`` do).
Each is consulted before onnx2torch's own converter for the same op and version (see
:func:`mmbridge.convert.registry.consult_op_converters`) and tested against onnxruntime at two
opsets per registered version (``tests/convert/test_ops.py``, parametrised from the registry).

* :mod:`.normalization` -- ``BatchNormalization`` -> population-variance BatchNorm (Keras' running variance);
* :mod:`.dropout` -- ``Dropout`` -> ``nn.Dropout(p)``;
* :mod:`.shape` -- ``Reshape``, ``Squeeze``, ``Unsqueeze``, ``Expand``, ``Tile``, ``ConstantOfShape``, ``Range``, ``Shape``, ``Size`` with constant arguments as Python ints, and shape arguments computed from ``Shape`` as expressions over the input dims (:mod:`._symbolic`: symbolic ints under ``torch.compile``);
* :mod:`.pad` -- ``Pad`` with constant pads; ``SamePad`` for ``auto_pad=SAME_*``;
* :mod:`.conv`, :mod:`.pooling` -- ``Conv`` / ``MaxPool`` with ``auto_pad=SAME_*``, ``GlobalMaxPool``, ``Conv`` with a weight computed at run time (``F.convNd``);
* :mod:`.resize` -- ``Resize`` 10-19: torch kernels where they compute what ORT does, per-axis gathers for every other nearest / linear coordinate and rounding mode;
* :mod:`.gelu`, :mod:`.split`, :mod:`.onehot`, :mod:`.reduce`, :mod:`.scatter` -- ops or versions onnx2torch lacks (``ScatterND`` with every reduction, ``ScatterElements``);
* :mod:`.cast` -- ``Cast`` to every torch dtype, ``bfloat16`` included (onnx2torch has no bfloat16);
* :mod:`.cumsum` -- ``CumSum`` with ONNX's defaults (onnx2torch reverses by default);
* :mod:`.logic` -- ``GreaterOrEqual`` / ``LessOrEqual`` 16, ``BitShift``, ``Trilu``;
* :mod:`.indexing` -- ``NonZero`` ([rank, n]), ``GatherND`` with ``batch_dims``, ``ReverseSequence``, ``Compress``;
* :mod:`.multi_output` -- ``TopK``, ``Split`` 2-13: a node of which one output is used returns only that one;
* :mod:`.elementwise` -- ``Sinh`` / ``Cosh`` / ``Asinh`` / ``Acosh`` / ``Atanh``, ``ThresholdedRelu``, ``Mish``, ``Bitwise*`` 18, ``Hardmax``;
* :mod:`.space_depth` -- ``SpaceToDepth``, ``DepthToSpace`` DCR and CRD;
* :mod:`.slice` -- ``Slice`` with constant arguments as Python ints, 0-d starts / ends accepted;
* :mod:`.random_ops` -- ``RandomUniform(Like)`` / ``RandomNormal(Like)`` from torch's generator (``training=True`` augmentation exports);
* :mod:`.loop`, :mod:`.recurrent` -- ``Loop`` (Keras 3 GRU / SimpleRNN / trainable LSTM) and ``LSTM`` / ``GRU`` / ``RNN``.
"""

from mmbridge._torch_stack import guard_torch_stack

guard_torch_stack("mmbridge.op_converters")  # onnx2torch imports torchvision: segfault after TF

from mmbridge.convert.ops import (  # noqa: E402, F401  (registration happens on import)
    cast,
    conv,
    cumsum,
    dropout,
    elementwise,
    gelu,
    indexing,
    logic,
    loop,
    multi_output,
    normalization,
    onehot,
    pad,
    pooling,
    random_ops,
    recurrent,
    reduce,
    resize,
    scatter,
    shape,
    slice,
    space_depth,
    split,
)
from mmbridge.convert.registry import op_converters  # noqa: E402

__all__ = ["op_converters"]
