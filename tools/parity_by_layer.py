"""Localise an ORT-vs-TF parity failure of a keras.applications model layer by layer, against float64.

A diagnostic, not an export path. It builds ``keras.applications.ARCH(weights=None, include_top=False,
pooling="avg", input_shape=(SIZE, SIZE, 3))`` with ``keras.utils.set_random_seed(0)`` (the zoo row's
model, ``tests/export/test_families.py::_app``), exports it with ``mmbridge.export(m, trainable=True,
verify=False, probes=False)`` into a scratch cache (or reads ``--onnx``, an export of that same model
made in a fresh process, so Keras' automatic layer names match), and then, on the zoo row's parity input
(``TensorSpec.sample``: uniform [0, 1), batch 2, seed 0, NHWC float32):

* runs the ONNX graph on onnxruntime (CPU, graph optimisations off) with every node output exposed;
* runs the Keras model in float32, and a float64 copy of it (``keras.config.set_dtype_policy("float64")``,
  the same weights cast up) as the reference for both;
* matches each Keras layer to the last ONNX tensor in its name scope (``.../<layer>_1/...``) of the
  layer's shape (NHWC, or NCHW transposed back), and prints per layer ``max |x - x64| / max |x64|`` for
  TF float32 and for onnxruntime (``-`` where no ONNX tensor matched: a layer fused into another op).

A single op where onnxruntime jumps while TF float32 does not is a conversion edge; both growing
together with depth is float32 rounding accumulating (docs/known-limits.md, "Deep random nets: float32
rounding above the default atol"). The last lines give the model output's scale and the atol each pair needs at rtol 1e-4
(the ``("onnx", "float32")`` row of ``mmbridge.parity.TOLERANCES``).

Usage (repository root)::

    PYTHONPATH=. python tools/parity_by_layer.py NASNetLarge 32 [--onnx model.onnx] [--all]
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import numpy as np

import mmbridge
from mmbridge.specs import TensorSpec

RTOL = 1e-4


def _need_atol(got: np.ndarray, ref: np.ndarray) -> float:
    """The smallest atol with ``|got - ref| <= atol + RTOL * |ref|`` everywhere (mmbridge's parity form)."""
    return max(0.0, float(np.max(np.abs(got.astype(np.float64) - ref) - RTOL * np.abs(ref))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("arch", help="a keras.applications constructor, e.g. NASNetLarge")
    ap.add_argument("size", type=int, help="square input size in px")
    ap.add_argument("--onnx", default=None, help="an ONNX export of the same model (skips the export)")
    ap.add_argument("--all", action="store_true", help="print every layer (default: cell outputs and pools)")
    args = ap.parse_args(argv)

    from mmbridge.export._tf import import_tensorflow

    import_tensorflow()
    import keras
    import onnx
    import onnxruntime as ort

    def build(dtype: str):
        keras.config.set_floatx(dtype)
        keras.config.set_dtype_policy(dtype)
        keras.utils.set_random_seed(0)
        return getattr(keras.applications, args.arch)(weights=None, include_top=False, pooling="avg",
                                                      input_shape=(args.size, args.size, 3))

    m32 = build("float32")
    onnx_path = args.onnx
    if onnx_path is None:
        art = mmbridge.export(m32, trainable=True, verify=False, probes=False, cache_dir=tempfile.mkdtemp())
        onnx_path = str(art.onnx_path)
    m64 = build("float64")
    m64.set_weights([w.astype(np.float64) for w in m32.get_weights()])
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")
    if m64.layers[1].compute_dtype != "float64":
        raise RuntimeError(f"the float64 copy computes in {m64.layers[1].compute_dtype}")

    x = TensorSpec("input", (None, args.size, args.size, 3), "float32").sample(2, 0)
    layers32, layers64 = m32.layers[1:], m64.layers[1:]
    t32 = keras.Model(m32.input, [la.output for la in layers32]).predict(x, verbose=0)
    t64 = keras.Model(m64.input, [la.output for la in layers64]).predict(x.astype(np.float64), verbose=0)
    y32, y64 = np.asarray(t32[-1]), np.asarray(t64[-1])

    model = onnx.load(onnx_path)
    graph = model.graph
    seen = {o.name for o in graph.output}
    for node in graph.node:
        for o in node.output:
            if o and o not in seen:
                graph.output.append(onnx.helper.make_empty_tensor_value_info(o))
                seen.add(o)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    res = dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x})))
    order = {o: i for i, n in enumerate(graph.node) for o in n.output}
    op_of = {o: n.op_type for n in graph.node for o in n.output}
    y_ort = res[graph.output[0].name]

    shown = ("Concatenate", "AveragePooling2D", "MaxPooling2D", "ZeroPadding2D", "Cropping2D")
    print(f"{'layer':48} {'type':22} {'shape':20} {'tf32':>9} {'ort':>9}  onnx op")
    for la, a32, a64 in zip(layers32, t32, t64):
        a32, a64 = np.asarray(a32), np.asarray(a64)
        hit = None
        for o in sorted((o for o in names if la.name + "_1" in o.split("/")), key=lambda o: -order.get(o, -1)):
            v = res[o]
            if not isinstance(v, np.ndarray) or v.dtype != np.float32:
                continue
            if v.shape == a64.shape:
                hit = (o, v)
                break
            if v.ndim == 4 and v.transpose(0, 2, 3, 1).shape == a64.shape and a64.shape[1:3] != a64.shape[2:4]:
                hit = (o, v.transpose(0, 2, 3, 1))
                break
        scale = float(np.abs(a64).max()) or 1.0
        e_tf = float(np.abs(a32 - a64).max()) / scale
        e_ort = "-" if hit is None else f"{float(np.abs(hit[1] - a64).max()) / scale:9.2e}"
        if args.all or type(la).__name__ in shown or la is layers32[0]:
            print(f"{la.name[:48]:48} {type(la).__name__[:22]:22} {str(list(a64.shape))[:20]:20} {e_tf:9.2e} "
                  f"{e_ort:>9}  {op_of[hit[0]] if hit else ''}")
    scale = float(np.abs(y64).max())
    print(f"\noutput {list(y64.shape)}: max |y64| = {scale:.4g}")
    for what, got, ref in (("ort vs tf32", y_ort, y32.astype(np.float64)), ("tf32 vs tf64", y32, y64),
                           ("ort vs tf64", y_ort, y64)):
        d = float(np.abs(got.astype(np.float64) - ref).max())
        print(f"  {what:13} max_abs {d:.3g} ({d / scale:.2e} of max |y|), needs atol {_need_atol(got, ref):.3g} "
              f"at rtol {RTOL:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
