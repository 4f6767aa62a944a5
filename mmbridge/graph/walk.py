"""Reading ONNX graphs: subgraphs, constants, shapes.

Shape notation: a dim is an ``int`` (static), a ``str`` (a symbolic ``dim_param`` such as
``"batch"``) or ``None`` (unknown).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np


def subgraphs(node: Any) -> list[Any]:
    """The ``GraphProto`` attributes of one node (a ``Loop`` body, both branches of an ``If``...)."""
    out = []
    for a in node.attribute:
        if a.HasField("g"):
            out.append(a.g)
        out.extend(a.graphs)
    return out


def iter_graphs(graph: Any) -> Iterator[Any]:
    """``graph`` and every subgraph nested in it, depth first."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from iter_graphs(sub)


def all_nodes(graph: Any) -> list[Any]:
    """The nodes of ``graph`` and of every subgraph nested in it."""
    return [n for g in iter_graphs(graph) for n in g.node]


def nodes_with_subgraphs(graph: Any, prefix: str = "") -> list[tuple[Any, str]]:
    """Every node of ``graph`` and of its subgraphs, with a label for messages:
    ``'name'`` or ``'name' (in the body of Loop 'loop')``."""
    out: list[tuple[Any, str]] = []
    for node in graph.node:
        name = node.name or "<unnamed>"
        out.append((node, f"{name!r}{prefix}"))
        for a in node.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                out += nodes_with_subgraphs(sub, f" (in the {a.name} of {node.op_type} {name!r})")
    return out


def free_values(graph: Any) -> list[str]:
    """Names ``graph`` (a ``GraphProto``, nested subgraphs included) reads but does not define.

    These are the outer-scope values of an ONNX subgraph, in order of first use.
    """
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    defined |= {o for n in graph.node for o in n.output if o}
    seen: dict[str, None] = {}
    for n in graph.node:
        for x in list(n.input) + [y for g in subgraphs(n) for y in free_values(g)]:
            if x and x not in defined:
                seen.setdefault(x, None)
    for o in graph.output:
        if o.name and o.name not in defined:
            seen.setdefault(o.name, None)
    return list(seen)


def const_value(graph: Any, name: str) -> np.ndarray | None:
    """The value of ``name`` if it is an initializer or the output of a ``Constant`` node, else None."""
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
    return None


def dims(value_info: Any) -> list[int | str | None]:
    """The dims of a ``ValueInfoProto``: int, symbolic name or None each (``[]`` if it has no shape)."""
    tt = value_info.type.tensor_type
    if not tt.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]


def static_dims(value_info: Any) -> tuple[int, ...] | None:
    """The shape of a ``ValueInfoProto`` if every dim is static, else None."""
    tt = value_info.type.tensor_type
    if not tt.HasField("shape") or any(not d.HasField("dim_value") for d in tt.shape.dim):
        return None
    return tuple(int(d.dim_value) for d in tt.shape.dim)


def value_shape(graph: Any, name: str, known: Mapping[str, Any] | None = None) -> list[int | None] | None:
    """The dims of value ``name`` (static ints, None where not static), looked up in the graph's
    ``value_info`` / inputs / outputs and ``known`` (``{name: ValueInfoProto}``), or None."""
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output) + list((known or {}).values()):
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return [d if isinstance(d, int) else None for d in dims(vi)]
    return None
