"""Nodes with several outputs of which only one is used: ``TopK`` and ``Split`` (2 / 11 / 13).

onnx2torch makes a graph output of the whole module call of the node that produces it, so a
``TopK`` whose values are a graph output (and whose indices nobody reads) returned the
``(values, indices)`` tuple, one output too many; a 3-way ``Split`` of which the graph returns
``a`` returned all three. Here, when exactly one output of the node is read (by a node, a
subgraph, or as a graph output), the module returns only that output and the node is given
that one output (:func:`keep_only_used_output`), so the graph's outputs are exactly its own.
When an output is a graph output and another output is read too, onnx2torch cannot return it
alone: the converter refuses, naming the node, rather than return the tuple.

``TopK`` itself: a constant ``k`` becomes a Python int; values and indices come from a stable
sort (ties keep the lower index first, as onnxruntime), ``[..., k]`` along ``axis``.
"""

from __future__ import annotations

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OnnxToTorchModule, OperationConverterResult
from torch import nn

from mmbridge.convert.ops._common import TO_ORT, const_ints, delegate, input_at, register


def _read_names(graph_proto) -> set[str]:
    """Every value name a node of ``graph_proto`` or of its subgraphs (any depth) reads."""
    names: set[str] = set()
    for n in graph_proto.node:
        names.update(n.input)
        for a in n.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                names |= _read_names(g)
    return names


class PickOutput(nn.Module, OnnxToTorchModule):
    """Output ``index`` of ``module``'s tuple."""

    def __init__(self, module: nn.Module, index: int):
        super().__init__()
        self.module, self.index = module, int(index)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)[self.index]

    def extra_repr(self) -> str:
        return f"index={self.index}"


def keep_only_used_output(node: OnnxNode, graph: OnnxGraph, converted: OperationConverterResult) -> OperationConverterResult:
    """``converted`` for a multi-output ``node``, reduced to its one used output when only one is used.

    Raises:
        NotImplementedError: an output of the node is a graph output while another is used too
            (and the graph's outputs are not exactly the node's), which onnx2torch cannot return.
    """
    outs = node.output_values
    if len(outs) < 2:
        return converted
    graph_outs = set(graph.output_values)
    read = getattr(graph, "_mmbridge_read_names", None)
    if read is None:  # once per graph: a model with many Splits stays linear
        read = _read_names(graph.proto) | graph_outs
        graph._mmbridge_read_names = read
    used = [i for i, name in enumerate(outs) if name and name in read]
    if len(used) == 1:
        keep = outs[used[0]]
        node._output_values = (keep,)  # onnx2torch reads a node's outputs from this tuple (getitem, graph outputs)
        return OperationConverterResult(torch_module=PickOutput(converted.torch_module, used[0]),
                                        onnx_mapping=OnnxMapping(inputs=converted.onnx_mapping.inputs, outputs=(keep,)))
    if graph_outs & set(outs) and tuple(graph.output_values) != tuple(outs):
        raise NotImplementedError(f"{node.operation_type} node {node.name!r}: output(s) "
                                  f"{sorted(graph_outs & set(outs))} are graph outputs while other outputs of the node "
                                  f"are used too; onnx2torch would return the node's whole tuple; {TO_ORT}")
    return converted


class TopK(nn.Module, OnnxToTorchModule):
    """ONNX ``TopK``: the ``k`` largest (or smallest) along ``axis``, sorted, ties by lower index; ``(values, indices)``."""

    def __init__(self, axis: int, largest: bool, k: int | None):
        super().__init__()
        self.axis, self.largest, self.k = int(axis), bool(largest), k

    def forward(self, x: torch.Tensor, k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        kk = self.k if self.k is not None else int(k.reshape(-1)[0])
        values, indices = torch.sort(x, dim=self.axis, descending=self.largest, stable=True)
        return values.narrow(self.axis, 0, kk), indices.narrow(self.axis, 0, kk)

    def extra_repr(self) -> str:
        return f"axis={self.axis}, largest={self.largest}, k={'<runtime>' if self.k is None else self.k}"


@register("TopK", 1, 10, 11, 24)
def top_k(node: OnnxNode, graph: OnnxGraph):
    a = node.attributes
    if "k" in a:  # TopK-1: k is an attribute
        module, inputs = TopK(a.get("axis", -1), True, int(a["k"])), (node.input_values[0],)
    else:
        k = const_ints(graph, input_at(node, 1))
        largest = bool(a.get("largest", 1))
        if k is not None:
            module, inputs = TopK(a.get("axis", -1), largest, k[0]), (node.input_values[0],)
        else:
            module, inputs = TopK(a.get("axis", -1), largest, None), node.input_values[:2]
    converted = OperationConverterResult(torch_module=module,
                                         onnx_mapping=OnnxMapping(inputs=tuple(inputs), outputs=node.output_values))
    return keep_only_used_output(node, graph, converted)


@register("Split", 2, 11, 13)
def split(node: OnnxNode, graph: OnnxGraph):
    return keep_only_used_output(node, graph, delegate(node, graph))
