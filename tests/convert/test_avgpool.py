"""``AveragePool`` with asymmetric or ``SAME_*`` padding on torch (``mmbridge.convert.ops.pooling``).

onnx2torch refused both ("SAME_UPPER auto_pad is not implemented", "non symmetrical padding"):
TF's ``padding="SAME"`` average pooling with dynamic H / W (tf2onnx writes ``auto_pad``), and at
static shapes whenever the pad total is odd (``pool_size=2, strides=1``; ``3`` / ``2`` on an even
size). Reference: TF itself, which divides each window's sum by its count of real elements.
Tolerance: 1e-6 absolute on values in [-3, 3] (float32 sums of at most 27 terms).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmbridge

pytestmark = pytest.mark.tf

CASES = [  # (name, rank, pool, strides, input shape NHWC-style, dynamic spatial dims)
    ("2d_k3s2_even_dynamic", 2, 3, 2, (2, 8, 10, 3), True),
    ("2d_k3s2_odd_dynamic", 2, 3, 2, (1, 7, 9, 2), True),
    ("2d_k2s1_static", 2, 2, 1, (2, 6, 5, 3), False),
    ("2d_k3s2_even_static", 2, 3, 2, (1, 8, 8, 2), False),
    ("1d_k2s1_dynamic", 1, 2, 1, (2, 9, 4), True),
    ("3d_k2s2_static", 3, 2, 2, (1, 5, 4, 3, 2), False),
]


@pytest.mark.parametrize("name,rank,k,s,shape,dynamic", CASES, ids=[c[0] for c in CASES])
def test_same_average_pool_matches_tf_on_torch(tf, tmp_path, name, rank, k, s, shape, dynamic):
    from mmbridge.convert.ops.pooling import PaddedAveragePool

    pool = {1: tf.nn.avg_pool1d, 2: tf.nn.avg_pool2d, 3: tf.nn.avg_pool3d}[rank]
    sig_shape = (None, *([None] * rank if dynamic else shape[1:-1]), shape[-1])
    fn = tf.function(lambda x: pool(x, k, s, "SAME"), input_signature=[tf.TensorSpec(sig_shape, tf.float32, name="x")])
    x = np.random.default_rng(0).uniform(-3, 3, shape).astype(np.float32)
    art = mmbridge.export(fn, sample_inputs={"x": x}, name=f"avgpool_{name}", cache_dir=tmp_path)
    module = mmbridge.to_torch(art, trainable=False)
    assert any(isinstance(m, PaddedAveragePool) for m in module.modules()), "the converter did not apply"
    sizes = [shape] + ([(3, *[d + 1 for d in shape[1:-1]], shape[-1])] if dynamic else [])
    for size in sizes:  # dynamic: also a size of the other parity
        xi = np.random.default_rng(1).uniform(-3, 3, size).astype(np.float32)
        want = pool(tf.constant(xi), k, s, "SAME").numpy()
        with torch.no_grad():
            got = module(torch.from_numpy(xi)).numpy()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_count_include_pad_and_refusals():
    """``count_include_pad=1`` divides by the kernel area (zeros counted); dilation is refused."""
    import onnx
    from onnx import TensorProto, helper

    from mmbridge.convert.ops.pooling import PaddedAveragePool

    m = PaddedAveragePool([2, 2], [1, 1], [0, 0, 1, 1], None, count_include_pad=True)
    x = torch.arange(1.0, 5.0).reshape(1, 1, 2, 2)
    # padded [[1,2,0],[3,4,0],[0,0,0]]: windows (1+2+3+4)/4, (2+0+4+0)/4, (3+4+0+0)/4, 4/4
    assert torch.equal(m(x), torch.tensor([[[[2.5, 1.5], [1.75, 1.0]]]]))
    m0 = PaddedAveragePool([2, 2], [1, 1], [0, 0, 1, 1], None, count_include_pad=False)
    assert torch.equal(m0(x), torch.tensor([[[[2.5, 3.0], [3.5, 4.0]]]]))

    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], pads=[0, 0, 1, 1], dilations=[2, 2])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    with pytest.raises(mmbridge.MMBridgeError, match="dilations"):
        mmbridge.to_torch(onnx.ModelProto.FromString(model.SerializeToString()), trainable=False)
