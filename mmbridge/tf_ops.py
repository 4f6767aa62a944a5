"""Extensions of tf2onnx for TF ops that it leaves unconverted (preprocessing, strings, tables).

Two extension points, both used by :mod:`mmbridge.exporter`:

* :func:`tf2onnx_handlers` returns tf2onnx ``custom_op_handlers`` and ``extra_opset`` (tf2onnx's
  own extension point for TF ops it does not know);
* :func:`mmbridge.exporter.register_onnx_rewrite` rewrites nodes left in the ONNX graph.
"""

from __future__ import annotations

from typing import Any


def tf2onnx_handlers() -> tuple[dict[str, Any], list[Any]]:
    """``(custom_op_handlers, extra_opset)`` for ``tf2onnx.convert.from_graph_def``.

    ``custom_op_handlers`` maps a TF op type to ``(handler, args)`` where
    ``handler(ctx, node, name, args)`` rewrites the node in tf2onnx's graph.
    """
    return {}, []
