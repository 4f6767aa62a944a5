"""ONNX -> torch converters that onnx2torch 1.5.15 lacks, added through its own registry.

Every converter here is registered with ``onnx2torch.node_converters.registry.add_converter``
(keyed by ``(domain, op_type, since_version)``), so ``onnx2torch.convert`` picks them up like its
own. Importing this module registers them once; :func:`register_all` is idempotent. Each one
is tested against onnxruntime in ``tests/test_cases_torch.py``.

Registered (op-since_version):

* ``Gelu-20`` -> ``nn.GELU(approximate="none" | "tanh")`` (ENOT-AutoDL/onnx2torch#251; case 11);
* ``Split-18`` with ``num_outputs`` or a ``split`` input -> ``torch.split`` (case 11);
* ``OneHot-9`` / ``OneHot-11`` -> ``F.one_hot`` with ONNX's ``values`` / ``axis`` / negative-index
  rules (Keras ``CategoryEncoding(one_hot)``; ENOT-AutoDL/onnx2torch#233; case 12);
* ``GlobalMaxPool-1`` -> ``amax`` over the spatial axes;
* ``ReduceMean/Max/Min/Prod/L1/L2/LogSumExp/SumSquare-18`` (axes moved from attribute to input);
* ``Resize-18/19``, ``Pad-18``, ``ScatterND-18``: delegated to onnx2torch's converter of the
  previous version when the new attributes / inputs keep their defaults; otherwise the
  converter raises ``NotImplementedError`` naming the attribute (reported by
  :func:`mmbridge.convert.core.to_torch` with the node name);
* ``Loop`` (all versions) and ``LSTM`` / ``GRU`` / ``RNN`` (7, 14, 22): in :mod:`.loop`, which this
  module imports (Keras 3 ``GRU`` / ``LSTM`` / ``SimpleRNN``; issue 3, case 12).

Shape notation: ``N`` batch, ``C`` channels, ``*`` any further axes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from onnx2torch.node_converters.registry import (
    _CONVERTER_REGISTRY,
    OperationDescription,
    add_converter,
    get_converter,
)
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import (
    OnnxMapping,
    OnnxToTorchModule,
    OperationConverterResult,
    onnx_mapping_from_node,
)
from torch import nn

from mmbridge.convert import loop

_REGISTERED = False


def _const(graph: OnnxGraph, name: str) -> torch.Tensor | None:
    """The value of ``name`` if it is an initializer (or ``None``)."""
    if name and name in graph.initializers:
        return graph.initializers[name].to_torch()
    return None


# ---------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------
class OnnxSplit18(nn.Module, OnnxToTorchModule):
    """ONNX ``Split-18``: ``x`` split along ``axis`` into fixed ``sizes`` or ``num_outputs`` chunks.

    With ``num_outputs = k`` every chunk has ``ceil(dim / k)`` elements except the last (ONNX rule,
    which is also ``torch.split``'s with that chunk size). Input any dtype, any shape; returns a
    tuple of tensors.
    """

    def __init__(self, axis: int, sizes: list[int] | None, num_outputs: int | None):
        super().__init__()
        self.axis = axis
        self.sizes = sizes
        self.num_outputs = num_outputs

    def forward(self, x: torch.Tensor, split: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        if self.sizes is not None:
            return tuple(torch.split(x, self.sizes, dim=self.axis))
        if split is not None:
            return tuple(torch.split(x, [int(s) for s in split.tolist()], dim=self.axis))
        dim = x.shape[self.axis]
        return tuple(torch.split(x, math.ceil(dim / self.num_outputs), dim=self.axis))


class OnnxOneHot(nn.Module, OnnxToTorchModule):
    """ONNX ``OneHot``: ``indices`` (any int/float dtype, any shape) -> one-hot along ``axis``.

    ``values = [off, on]`` gives the output dtype and the two values; negative indices count from
    ``depth`` (opset 11); indices outside ``[-depth, depth)`` give an all-``off`` row (ONNX rule).
    Output shape: ``indices.shape`` with ``depth`` inserted at ``axis``.
    """

    def __init__(self, axis: int, depth: int | None):
        super().__init__()
        self.axis = axis
        self.depth = depth

    def forward(self, indices: torch.Tensor, depth: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        d = self.depth if self.depth is not None else int(depth.reshape(-1)[0].item())
        idx = indices.to(torch.int64)
        idx = torch.where(idx < 0, idx + d, idx)
        valid = (idx >= 0) & (idx < d)
        hot = F.one_hot(torch.where(valid, idx, torch.zeros_like(idx)), d) * valid.unsqueeze(-1).to(torch.int64)
        out = torch.where(hot.bool(), values[1], values[0])
        axis = self.axis if self.axis >= 0 else out.dim() + self.axis
        if axis != out.dim() - 1:
            out = out.movedim(-1, axis)
        return out


class OnnxGlobalMaxPool(nn.Module, OnnxToTorchModule):
    """ONNX ``GlobalMaxPool``: ``[N, C, *spatial]`` -> ``[N, C, 1, ...]`` (max over spatial axes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.amax(x, dim=tuple(range(2, x.dim())), keepdim=True)


_REDUCE = {
    "ReduceMean": lambda x, d, k: torch.mean(x, dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: torch.amax(x, dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
    "ReduceProd": None,  # product over several axes is done one axis at a time below
    "ReduceL1": lambda x, d, k: torch.sum(torch.abs(x), dim=d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k)),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
    "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k),
    "ReduceLogSum": lambda x, d, k: torch.log(torch.sum(x, dim=d, keepdim=k)),
}


class OnnxReduce18(nn.Module, OnnxToTorchModule):
    """ONNX ``Reduce*-18`` (axes given as a constant input, or absent = all axes).

    ``x`` any float dtype, any shape; ``keepdims`` as in ONNX; with no axes and
    ``noop_with_empty_axes=1`` the input is returned unchanged.
    """

    def __init__(self, op_type: str, axes: list[int] | None, keepdims: bool, noop: bool):
        super().__init__()
        self.op_type = op_type
        self.axes = axes
        self.keepdims = keepdims
        self.noop = noop

    def forward(self, x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
        dims = self.axes
        if dims is None and axes is not None and axes.numel():
            dims = [int(a) for a in axes.tolist()]
        if not dims:
            if self.noop:
                return x
            dims = list(range(x.dim()))
        dims = sorted(d % x.dim() for d in dims)
        if self.op_type == "ReduceProd":
            out = x
            for d in reversed(dims):
                out = torch.prod(out, dim=d, keepdim=self.keepdims)
            return out
        return _REDUCE[self.op_type](x, tuple(dims), self.keepdims)


# ---------------------------------------------------------------------------------------------
# converters
# ---------------------------------------------------------------------------------------------
def _gelu20(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    approximate = node.attributes.get("approximate", "none")
    if isinstance(approximate, bytes):
        approximate = approximate.decode()
    return OperationConverterResult(torch_module=nn.GELU(approximate=approximate), onnx_mapping=onnx_mapping_from_node(node))


def _split18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    axis = int(node.attributes.get("axis", 0))
    num_outputs = node.attributes.get("num_outputs")
    split_name = node.input_values[1] if len(node.input_values) > 1 else ""
    sizes = _const(graph, split_name)
    if sizes is None and not split_name and num_outputs is None:
        num_outputs = len(node.output_values)
    module = OnnxSplit18(axis, [int(s) for s in sizes.tolist()] if sizes is not None else None,
                         int(num_outputs) if num_outputs is not None else None)
    inputs = (node.input_values[0],) if sizes is not None or not split_name else node.input_values[:2]
    return OperationConverterResult(torch_module=module, onnx_mapping=OnnxMapping(inputs=inputs, outputs=node.output_values))


def _onehot(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    depth = _const(graph, node.input_values[1])
    module = OnnxOneHot(int(node.attributes.get("axis", -1)), int(depth.reshape(-1)[0]) if depth is not None else None)
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


def _global_max_pool(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    return OperationConverterResult(torch_module=OnnxGlobalMaxPool(), onnx_mapping=onnx_mapping_from_node(node))


def _reduce18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    axes_name = node.input_values[1] if len(node.input_values) > 1 else ""
    axes = _const(graph, axes_name)
    module = OnnxReduce18(node.operation_type, [int(a) for a in axes.tolist()] if axes is not None else None,
                          bool(node.attributes.get("keepdims", 1)), bool(node.attributes.get("noop_with_empty_axes", 0)))
    inputs = (node.input_values[0],) if axes is not None or not axes_name else node.input_values[:2]
    return OperationConverterResult(torch_module=module, onnx_mapping=OnnxMapping(inputs=inputs, outputs=node.output_values))


def _delegate(op_type: str, old_version: int, defaults: dict[str, Any], max_inputs: int | None = None):
    """A converter for a newer version that reuses onnx2torch's ``old_version`` one.

    Valid only while every attribute that the newer version added keeps its default and no
    newer input is given; otherwise raises ``NotImplementedError`` naming the attribute.
    """

    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        for attr, default in defaults.items():
            value = node.attributes.get(attr, default)
            if isinstance(value, bytes):
                value = value.decode()
            if value != default:
                raise NotImplementedError(
                    f"{op_type} node {node.name!r}: attribute {attr}={value!r} is not supported "
                    f"(only {default!r})")
        if max_inputs is not None and len([v for v in node.input_values[max_inputs:] if v]):
            raise NotImplementedError(f"{op_type} node {node.name!r}: inputs beyond the first {max_inputs} "
                                      f"(e.g. 'axes') are not supported")
        return get_converter(op_type, old_version)(node, graph)

    return convert


def _add(op_type: str, version: int, fn: Any) -> None:
    if OperationDescription("", op_type, version) not in _CONVERTER_REGISTRY:
        add_converter(operation_type=op_type, version=version)(fn)


def register_all() -> list[str]:
    """Register every converter of this module with onnx2torch (idempotent).

    Returns:
        ``"Op-version"`` strings of what this module provides.
    """
    global _REGISTERED
    provided = [("Gelu", 20, _gelu20), ("Split", 18, _split18), ("OneHot", 9, _onehot), ("OneHot", 11, _onehot),
                ("GlobalMaxPool", 1, _global_max_pool)]
    provided += [(op, 18, _reduce18) for op in _REDUCE]
    provided += [
        ("Resize", 18, _delegate("Resize", 13, {"antialias": 0, "keep_aspect_ratio_policy": "stretch"})),
        ("Resize", 19, _delegate("Resize", 13, {"antialias": 0, "keep_aspect_ratio_policy": "stretch"})),
        ("Pad", 18, _delegate("Pad", 13, {}, max_inputs=3)),
        ("ScatterND", 18, _delegate("ScatterND", 16, {"reduction": "none"})),
    ]
    if not _REGISTERED:
        for op, version, fn in provided:
            _add(op, version, fn)
        _REGISTERED = True
    return [f"{op}-{v}" for op, v, _ in provided] + loop.register_all()


register_all()
