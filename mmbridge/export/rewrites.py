"""Exact ONNX rewrites of TF ops that tf2onnx leaves in the graph, and the refusal of the rest.

:func:`repair_and_check_ops` runs after tf2onnx: every node whose op type has an entry in
:data:`ONNX_REWRITES` is replaced by its exact ONNX form; every other node that is not an ONNX
(or onnxruntime contrib / extensions) op is refused, all at once, with
:class:`~mmbridge.errors.UnsupportedOpsError`. :mod:`mmbridge.export.handlers` registers a
refusal rewrite for the TF ops its handlers refuse, so those carry their reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mmbridge.errors import UnsupportedOpsError
from mmbridge.graph import iter_graphs


def _rewrite_erfc(graph: Any, node: Any, new_name: Callable[[str], str]) -> list[Any]:
    """``Erfc(x) -> Sub(1, Erf(x))``: exact GELU in Keras/TF is ``0.5 x erfc(-x/sqrt 2)``.

    Absolute error vs TF's erfc is at most 1 ulp of 1.0 (6e-8 fp32) where erfc is near 0,
    which GELU multiplies by x/2; measured max |diff| on a Keras Transformer is ~1e-7.
    """
    from onnx import TensorProto, helper

    erf_out = new_name(node.output[0] + "_erf")
    one = new_name(node.name + "_one")
    return [
        helper.make_node("Constant", [], [one], name=one, value=helper.make_tensor(one, TensorProto.FLOAT, [], [1.0])),
        helper.make_node("Erf", [node.input[0]], [erf_out], name=new_name(node.name + "_erf")),
        helper.make_node("Sub", [one, erf_out], [node.output[0]], name=node.name),
    ]


# TF op type left in the graph -> rewrite into exact ONNX. Extend with register_onnx_rewrite.
ONNX_REWRITES: dict[str, Callable[[Any, Any, Callable[[str], str]], list[Any]]] = {"Erfc": _rewrite_erfc}

# What to do about an op with no ONNX form, by TF op type (used in UnsupportedOpsError).
_ADVICE = {
    "StaticRegexReplace": "string ops: keep tokenisation outside the graph (feed token ids), or use the ORT backend with onnxruntime-extensions",
    "RegexReplace": "string ops: keep tokenisation outside the graph (feed token ids)",
    "StringSplitV2": "string ops: keep tokenisation outside the graph (feed token ids)",
    "StringToHashBucketFast": "Hashing on strings: hash outside the graph, or pass integer ids (integer Hashing is exact)",
    "HashTableV2": "lookup tables (StringLookup / IntegerLookup / TextVectorization vocabularies): map ids outside the graph",
    "LookupTableFindV2": "lookup tables (StringLookup / IntegerLookup / TextVectorization vocabularies): map ids outside the graph",
    "Bucketize": "Discretization: bucketise outside the graph, or express the boundaries with Less/Sum",
    "StatefulPartitionedCall": "a nested (XLA-compiled) function call: make the layer traceable without jit_compile",
    "PartitionedCall": "a nested function call that was not inlined",
}


def register_onnx_rewrite(op_type: str, rewrite: Callable[[Any, Any, Callable[[str], str]], list[Any]],
                          *, override: bool = False) -> None:
    """Register an exact ONNX rewrite for a TF op that tf2onnx leaves unconverted.

    Args:
        op_type: the TF op type as it appears in the ONNX graph (default domain).
        rewrite: ``(graph, node, new_name) -> [NodeProto]`` replacing ``node``; must keep
            ``node.output`` names; ``new_name(hint)`` returns a fresh unique name.
        override: replace an existing rewrite.

    Raises:
        ValueError: ``op_type`` already has a rewrite and ``override`` is False.
    """
    if op_type in ONNX_REWRITES and not override:
        raise ValueError(f"an ONNX rewrite for {op_type!r} is already registered; pass override=True")
    ONNX_REWRITES[op_type] = rewrite


def _is_known_op(op_type: str, domain: str) -> bool:
    from onnx import defs

    if domain in ("", "ai.onnx", "ai.onnx.ml"):
        return defs.has(op_type, domain)
    return domain in ("ai.onnx.contrib", "com.microsoft")


def repair_and_check_ops(model: Any, name: str) -> list[str]:
    """Apply :data:`ONNX_REWRITES` and raise on any node that is still not an ONNX op.

    Returns:
        One note per rewrite applied (``"Erfc -> 1 - Erf: 2 nodes"``).

    Raises:
        UnsupportedOpsError: every remaining unknown node, with op type, domain, node name and
            origin (the TF node / Keras layer path), and what to do.
    """
    counter = [0]
    existing = {n.name for g in iter_graphs(model.graph) for n in g.node}

    def new_name(hint: str) -> str:
        while True:
            counter[0] += 1
            cand = f"{hint}__mmb{counter[0]}"
            if cand not in existing:
                existing.add(cand)
                return cand

    notes: dict[str, int] = {}
    bad: list[dict[str, str]] = []
    for graph in iter_graphs(model.graph):
        new_nodes = []
        for node in graph.node:
            if node.domain in ("", "ai.onnx") and node.op_type in ONNX_REWRITES and not _is_known_op(node.op_type, ""):
                new_nodes.extend(ONNX_REWRITES[node.op_type](graph, node, new_name))
                notes[node.op_type] = notes.get(node.op_type, 0) + 1
                continue
            if not _is_known_op(node.op_type, node.domain):
                origin = node.name.rsplit("/", 1)[0] if "/" in node.name else node.name
                bad.append({"op_type": node.op_type, "domain": node.domain or "ai.onnx", "node": node.name,
                            "origin": origin, "advice": _ADVICE.get(node.op_type, "")})
            new_nodes.append(node)
        del graph.node[:]
        graph.node.extend(new_nodes)
    if bad:
        by_op: dict[str, list[dict[str, str]]] = {}
        for b in bad:
            by_op.setdefault(b["op_type"], []).append(b)
        lines = []
        for op, items in sorted(by_op.items()):
            nodes = ", ".join(repr(i["node"]) for i in items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
            advice = items[0]["advice"] or f"register an exact rewrite with mmbridge.export.register_onnx_rewrite({op!r}, fn)"
            lines.append(f"  - {op} (domain {items[0]['domain']}), {len(items)} node(s): {nodes}. What to do: {advice}")
        raise UnsupportedOpsError(
            f"cannot export {name!r}: tf2onnx left {len(bad)} node(s) that ONNX and onnxruntime cannot run "
            f"(nothing was written):\n" + "\n".join(lines),
            bad,
        )
    return [f"{op} rewritten to exact ONNX: {n} node(s)" for op, n in sorted(notes.items())]


_INTEGER_TYPES = (2, 3, 4, 5, 6, 7, 12, 13)  # TensorProto UINT8, INT8, UINT16, INT16, INT32, INT64, UINT32, UINT64


def float_resize_of_integer_images(model: Any) -> int:
    """Interpolating ``Resize`` of an integer image: cast the image to float32 first, as TF does.

    ``tf.image.resize(uint8_image, size)`` (bilinear, bicubic...) computes in float32 and returns
    float32; tf2onnx writes the ONNX ``Resize`` on the uint8 tensor, whose output is then uint8
    (onnxruntime would round the interpolated values) while the TF graph's next op expects
    float32, so ``onnx.checker`` refused the graph (the seed pipeline ``resize -> cast -> / 255``).
    A ``Cast(to=FLOAT)`` in front of each such ``Resize`` (mode ``linear`` / ``cubic``; ``nearest``
    picks pixels and keeps the dtype in TF too) gives TF's values exactly. Types come from ONNX
    shape inference; a Resize whose input type is unknown is left alone.

    Returns:
        The number of Resize nodes rewritten (0 leaves ``model`` unchanged).
    """
    from onnx import TensorProto, helper, shape_inference

    resizes = [n for n in model.graph.node if n.op_type == "Resize"
               and next((a.s.decode() for a in n.attribute if a.name == "mode"), "nearest") != "nearest"]
    if not resizes:
        return 0
    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is a hint here; without it nothing is changed
        return 0
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    existing = {n.name for n in model.graph.node} | {t for n in model.graph.node for t in n.output}
    changed = 0
    nodes = []
    for node in model.graph.node:
        if node in resizes and types.get(node.input[0]) in _INTEGER_TYPES:
            cast_out = f"{node.input[0]}__mmb_float"
            while cast_out in existing:
                cast_out += "_"
            existing.add(cast_out)
            nodes.append(helper.make_node("Cast", [node.input[0]], [cast_out], name=cast_out, to=TensorProto.FLOAT))
            node.input[0] = cast_out
            changed += 1
        nodes.append(node)
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        for v in list(model.graph.value_info):  # stale integer types of the resized outputs
            if any(v.name == n.output[0] for n in resizes):
                model.graph.value_info.remove(v)
    return changed
