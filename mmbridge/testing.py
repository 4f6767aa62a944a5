"""Test helpers shared by mmbridge's own tests and by bridge and converter authors' tests.

* :func:`onnx_model` -- a one-graph ``onnx.ModelProto`` from nodes, value infos and initializers,
  at an opset, with the lowest IR version that opset needs;
* :func:`run_ort` -- the graph's outputs from a plain onnxruntime CPU session (the reference);
* :func:`assert_matches_ort` -- a torch module (``mmbridge.to_torch(model)``) against those outputs,
  every output compared, shapes and dtypes included, within the parity table's tolerance.

No TensorFlow here; onnxruntime comes through :mod:`mmbridge.runtime`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmbridge.parity import tolerance_for


def onnx_model(nodes: Sequence[Any], inputs: Sequence[Any], outputs: Sequence[Any], inits: Sequence[Any] = (), *,
               opset: int = 17, name: str = "g", check: bool = False) -> Any:
    """``onnx.ModelProto`` of one graph (default domain at ``opset``; IR version the opset's minimum, >= 8).

    Args:
        nodes / inputs / outputs / inits: ``NodeProto`` s, input and output ``ValueInfoProto`` s,
            initializer ``TensorProto`` s (``onnx.helper`` / ``numpy_helper`` make them).
        opset: default-domain opset version.
        name: the graph's name.
        check: run ``onnx.checker.check_model`` (raises ``onnx.checker.ValidationError``).
    """
    from onnx import checker, helper

    imports = [helper.make_opsetid("", opset)]
    model = helper.make_model(helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(inits)),
                              opset_imports=imports)
    model.ir_version = max(helper.find_min_ir_version_for(imports), 8)
    if check:
        checker.check_model(model)
    return model


def run_ort(model: Any, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The outputs of ``model`` (ModelProto or path) on ``feed`` in a CPU onnxruntime session, in graph order."""
    from mmbridge.runtime.session import make_session

    return make_session(model).run(None, dict(feed))


def assert_matches_ort(module: Any, model: Any, feed: Mapping[str, np.ndarray], *,
                       rtol: float | None = None, atol: float | None = None) -> None:
    """Assert a torch module computes what onnxruntime computes on ``model``, output by output.

    The module is called with the feed's arrays as tensors in the graph's input order. Integer and
    bool outputs must be equal; float outputs within ``rtol`` / ``atol`` (default: the parity
    table's ``("torch", dtype)`` entry, :data:`mmbridge.parity.TOLERANCES`).

    Raises:
        AssertionError: output count, shape, dtype or values differ (names the output).
    """
    import torch

    ref = run_ort(model, feed)
    names = [i.name for i in model.graph.input]
    with torch.no_grad():
        got = module(*[torch.from_numpy(np.asarray(feed[n])) for n in names if n in feed])
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    assert len(got) == len(ref), f"{len(got)} outputs from torch, {len(ref)} from onnxruntime"
    for out, g, r in zip(model.graph.output, got, ref):
        g = g.detach().cpu().numpy()
        assert g.shape == r.shape, f"output {out.name!r}: shape {g.shape} vs onnxruntime {r.shape}"
        assert g.dtype == r.dtype, f"output {out.name!r}: dtype {g.dtype} vs onnxruntime {r.dtype}"
        if np.issubdtype(r.dtype, np.floating):
            tol = tolerance_for("torch", str(r.dtype)) if r.dtype.name in ("float32", "float16") else None
            np.testing.assert_allclose(g, r, rtol=rtol if rtol is not None else (tol.rtol if tol else 1e-7),
                                       atol=atol if atol is not None else (tol.atol if tol else 1e-9),
                                       err_msg=f"output {out.name!r}")
        else:
            np.testing.assert_array_equal(g, r, err_msg=f"output {out.name!r}")


__all__ = ["onnx_model", "run_ort", "assert_matches_ort"]
