"""Helpers shared by the converters in :mod:`mmbridge.convert.ops` (constants, results, delegation)."""

from __future__ import annotations

from typing import Any

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

from mmbridge.convert.registry import (
    current_opsets,
    onnx2torch_converter,
    op_converters,
    resolve_since_version,
    schema_versions,
)

TO_ORT = "keep this bridge in onnxruntime instead (artifact.to_ort())"


def const(graph: OnnxGraph, name: str) -> torch.Tensor | None:
    """The value of ``name`` when it is constant: an initializer or the output of a ``Constant`` node.

    None for an empty name (an omitted optional input) and for computed values.
    """
    if not name:
        return None
    if name in graph.initializers:
        return graph.initializers[name].to_torch()
    try:
        node, _ = graph.value_as_node_output(name)
    except KeyError:
        return None
    if node.operation_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].to_torch()
    return None


def const_ints(graph: OnnxGraph, name: str) -> list[int] | None:
    """``const`` as a list of Python ints (None when not constant)."""
    value = const(graph, name)
    return None if value is None else [int(v) for v in value.reshape(-1).tolist()]


def input_at(node: OnnxNode, k: int) -> str:
    """Name of the node's ``k``-th input, ``""`` when absent or omitted."""
    return node.input_values[k] if len(node.input_values) > k else ""


def rank_of(graph: OnnxGraph, name: str) -> int | None:
    """Rank of value ``name`` from the graph's (inferred) value info, None when unknown."""
    vi = graph.value_info.get(name)
    if vi is None or not vi.type.tensor_type.HasField("shape"):
        if name in graph.initializers:
            return len(graph.initializers[name].proto.dims)
        return None
    return len(vi.type.tensor_type.shape.dim)


def static_dims(graph: OnnxGraph, name: str) -> list[int | None] | None:
    """Dims of ``name`` (ints where known, None where symbolic); None when the shape is unknown."""
    vi = graph.value_info.get(name)
    if vi is None or not vi.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]


def result(module: torch.nn.Module, node: OnnxNode, inputs: tuple[str, ...] | list[str] | None = None) -> OperationConverterResult:
    """``OperationConverterResult`` mapping ``inputs`` (default: all of the node's) to the node's outputs."""
    return OperationConverterResult(torch_module=module, onnx_mapping=OnnxMapping(
        inputs=tuple(node.input_values if inputs is None else inputs), outputs=node.output_values))


def since_version_of(node: OnnxNode) -> int:
    """The ``since_version`` of the node's op at the opset of the model being converted."""
    opset = current_opsets().get(node.domain, 0)
    return resolve_since_version(node.operation_type, opset, node.domain) or opset


def delegate(node: OnnxNode, graph: OnnxGraph, since_version: int | None = None,
             **attribute_changes: Any) -> OperationConverterResult:
    """Convert ``node`` with onnx2torch's own converter (for ``since_version``, default the node's).

    ``attribute_changes`` (``auto_pad="VALID"``) are applied to a copy of the node first.

    Raises:
        NotImplementedError: onnx2torch has no converter for that version.
    """
    version = since_version_of(node) if since_version is None else since_version
    if attribute_changes:
        node = with_attributes(node, **attribute_changes)
    return onnx2torch_converter(node.operation_type, version, node.domain)(node, graph)


def with_attributes(node: OnnxNode, **changes: Any) -> OnnxNode:
    """A copy of ``node`` with attributes set (``onnx.helper.make_attribute`` values)."""
    import onnx

    proto = onnx.NodeProto()
    proto.CopyFrom(node.proto)
    keep = [a for a in proto.attribute if a.name not in changes]
    del proto.attribute[:]
    proto.attribute.extend(keep)
    proto.attribute.extend(onnx.helper.make_attribute(k, v) for k, v in changes.items())
    return OnnxNode(proto, unique_name=node.unique_name)


def check_defaults(node: OnnxNode, defaults: dict[str, Any]) -> None:
    """Raise ``NotImplementedError`` naming the first attribute of ``defaults`` that the node sets otherwise."""
    for attr, default in defaults.items():
        value = node.attributes.get(attr, default)
        if isinstance(value, bytes):
            value = value.decode()
        if value != default:
            raise NotImplementedError(f"{node.operation_type} node {node.name!r}: attribute {attr}={value!r} is not "
                                      f"supported (only {default!r}); {TO_ORT}")


def register(op_type: str, *since_versions: int, domain: str = ""):
    """Decorator: register one converter for several ``since_versions`` of ``op_type`` in :data:`op_converters`.

    Versions the installed ``onnx`` does not define are left out (no model it accepts can use
    them). Returns the function unchanged.
    """

    def deco(fn):
        known = set(schema_versions(op_type, domain))
        for v in since_versions:
            if v in known or domain not in ("", "ai.onnx"):
                op_converters.register(op_type, fn, since_version=v, domain=domain)
        return fn

    return deco
