"""ONNX -> ONNX passes shared by the export side and the backends, and graph analysis.

No TensorFlow, no torch, no onnxruntime here (see :mod:`mmbridge.graph`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmbridge.graph.walk import const_value, iter_graphs, value_shape


def resize_scales_to_sizes(model: Any) -> int:
    """Make ``Resize`` nodes with constant ``scales`` use exact ``sizes`` (onnx/onnx#4919).

    tf2onnx encodes a static resize (7x9 -> 5x13) as float scales (13/9 = 1.4444444). ONNX
    defines the output size as ``floor(in * scale)``, which in float32 can land one short (12
    instead of 13; 24 -> 39 instead of 40 for Keras ``Resizing``), so
    onnx.checker rejects the graph and onnx2torch/ORT disagree with TF. TF's target size is the
    integer ``round(in * scale)``; this pass feeds it as ``sizes`` (batch and channel dims taken
    from the input's runtime shape), which also fixes the coordinate transform to TF's
    ``in / out`` ratio.

    Returns:
        The number of Resize nodes rewritten.
    """
    import onnx
    from onnx import helper, numpy_helper

    if not any(n.op_type == "Resize" for g in iter_graphs(model.graph) for n in g.node):
        return 0
    try:  # shapes for the lookups below (tf2onnx writes no value_info)
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        known = {vi.name: vi for vi in inferred.graph.value_info}
    except Exception:  # noqa: BLE001 - without shapes nothing is rewritten
        known = {}
    count = 0
    for graph in iter_graphs(model.graph):
        new_nodes = []
        for node in graph.node:
            if node.op_type != "Resize" or len(node.input) < 3 or not node.input[2] or (len(node.input) > 3 and node.input[3]):
                new_nodes.append(node)
                continue
            scales = const_value(graph, node.input[2])
            in_shape = value_shape(graph, node.input[0], known)
            if scales is None or in_shape is None or len(in_shape) != scales.size:
                new_nodes.append(node)
                continue
            scales = scales.astype(np.float64)
            resized = [i for i, sc in enumerate(scales) if sc != 1.0]
            if any(in_shape[i] is None for i in resized):
                new_nodes.append(node)
                continue
            target = np.array([int(round(in_shape[i] * scales[i])) if i in resized else 0 for i in range(scales.size)], np.int64)
            mask = np.array([i in resized for i in range(scales.size)])
            base = node.name or node.output[0]
            shape_out, sizes = f"{base}__mmb_shape", f"{base}__mmb_sizes"
            mask_name, target_name = f"{base}__mmb_mask", f"{base}__mmb_target"
            graph.initializer.extend([numpy_helper.from_array(mask, mask_name), numpy_helper.from_array(target, target_name)])
            new_nodes.append(helper.make_node("Shape", [node.input[0]], [shape_out], name=shape_out))
            new_nodes.append(helper.make_node("Where", [mask_name, target_name, shape_out], [sizes], name=sizes))
            del node.input[2:]
            node.input.extend(["", sizes])
            new_nodes.append(node)
            count += 1
        if count:
            del graph.node[:]
            graph.node.extend(new_nodes)
    return count


def backend_requirements(model: Any) -> dict[str, Any]:
    """What a bridged graph needs to run, for metadata and docs.

    Args:
        model: the exported ``onnx.ModelProto``.

    Returns:
        ``{"string_inputs": [...], "string_outputs": [...], "onnxruntime_extensions": bool,
        "torch_backend": bool, "note": str}``: string graphs (string inputs, or ops of the
        ``ai.onnx.contrib`` domain) run only on the onnxruntime backend and must end in numbers at
        the torch boundary (torch has no string tensors).
    """
    from onnx import TensorProto

    str_in = [i.name for i in model.graph.input if i.type.tensor_type.elem_type == TensorProto.STRING]
    str_out = [o.name for o in model.graph.output if o.type.tensor_type.elem_type == TensorProto.STRING]
    ext = any(op.domain == "ai.onnx.contrib" for op in model.opset_import) or any(
        n.domain == "ai.onnx.contrib" for n in model.graph.node)
    ml = any(n.domain == "ai.onnx.ml" for n in model.graph.node)
    torch_ok = not (str_in or str_out or ext or ml)
    note = "" if torch_ok else (
        "runs on the onnxruntime backend only (to_ort)"
        + (" with onnxruntime-extensions (ai.onnx.contrib string ops)" if ext else "")
        + "; torch has no string tensors, so the bridge must end in integer ids or floats at the torch boundary"
        + (f" (string outputs {str_out} cannot cross it)" if str_out else ""))
    return {"string_inputs": str_in, "string_outputs": str_out, "onnxruntime_extensions": ext,
            "torch_backend": torch_ok, "note": note}
