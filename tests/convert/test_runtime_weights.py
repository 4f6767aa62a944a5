"""Conv / ConvTranspose whose weight is computed at run time (not an initializer), against onnxruntime.

tf2onnx writes ``tf.image.extract_patches`` as a ``Conv`` with an ``EyeLike`` kernel and keeps a
TF conv whose filter is a graph input as a Conv on that input; onnx2torch reads Conv weights from
the initializers only and failed with a raw ``KeyError``. ``mmbridge.convert.ops.conv.RuntimeConv``
computes it with ``F.convNd``; a runtime-weight ``ConvTranspose`` is refused naming the node.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper

from mmbridge.errors import ConversionError
from mmbridge.runtime.session import make_session

RNG = np.random.default_rng(0)


def _model(op, x_dims, w_dims, opset=17, bias=False, **attrs):
    ins = ["x", "w"] + (["b"] if bias else [])
    vis = [helper.make_tensor_value_info("x", TP.FLOAT, x_dims), helper.make_tensor_value_info("w", TP.FLOAT, w_dims)]
    if bias:
        vis.append(helper.make_tensor_value_info("b", TP.FLOAT, [w_dims[0]]))
    node = helper.make_node(op, ins, ["y"], name="node", **attrs)
    graph = helper.make_graph([node], "g", vis, [helper.make_tensor_value_info("y", TP.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _convert(model):
    from mmbridge.convert.core import to_torch

    return to_torch(model, trainable=False)


@pytest.mark.parametrize("x_shape,w_shape,attrs", [
    ((2, 3, 7, 9), (4, 3, 3, 3), {"strides": [2, 1], "pads": [1, 0, 2, 1]}),          # asymmetric pads
    ((1, 4, 8, 5), (6, 2, 2, 3), {"group": 2, "dilations": [2, 1]}),
    ((2, 2, 7, 6), (3, 2, 3, 2), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ((2, 2, 7, 6), (3, 2, 3, 2), {"auto_pad": "SAME_LOWER", "strides": [2, 3]}),
    ((2, 3, 10), (5, 3, 4), {"strides": [3], "auto_pad": "VALID"}),                      # 1-D
    ((1, 2, 5, 6, 4), (3, 2, 2, 3, 2), {"pads": [0, 1, 1, 1, 0, 0]}),                   # 3-D
])
def test_runtime_weight_conv_matches_onnxruntime(x_shape, w_shape, attrs):
    bias = "group" not in attrs
    model = _model("Conv", list(x_shape), list(w_shape), bias=bias, **attrs)
    feed = {"x": RNG.standard_normal(x_shape).astype(np.float32), "w": RNG.standard_normal(w_shape).astype(np.float32)}
    if bias:
        feed["b"] = RNG.standard_normal(w_shape[0]).astype(np.float32)
    want = make_session(model).run(None, feed)[0]
    module = _convert(model)
    assert any(type(m).__name__ == "RuntimeConv" for m in module.modules())
    got = module(*[torch.from_numpy(v) for v in feed.values()]).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_runtime_weight_conv_transpose_is_refused_naming_the_node():
    model = _model("ConvTranspose", [1, 2, 4, 4], [2, 3, 3, 3], strides=[2, 2])
    with pytest.raises(ConversionError, match=r"ConvTranspose node 'node'.*computed at run time"):
        _convert(model)

