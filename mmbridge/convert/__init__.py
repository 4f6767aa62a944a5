"""The torch stage: ONNX -> a trainable ``torch.nn.Module`` (onnx2torch + mmbridge's converters).

* :mod:`.core` -- :func:`to_torch`: conversion, weights as ``nn.Parameter``, fusions, audit;
* :mod:`.registry` -- :data:`mmbridge.op_converters` and the hook that makes onnx2torch consult it;
* :mod:`.ops` -- mmbridge's converters, one file per op family.

The package is callable: ``mmbridge.convert(artifact)`` is :func:`mmbridge.convert.core.to_torch`.
"""

from mmbridge._callable import make_callable
from mmbridge.convert.core import check_supported, frozen_parameters, parameter_count, to_torch

__all__ = ["to_torch", "check_supported", "parameter_count", "frozen_parameters"]

make_callable(__name__, to_torch)
