"""``DepthToSpace`` (DCR and CRD) and ``SpaceToDepth`` on torch, against TF and the spec.

DCR is TF's order: reading a DCR node as CRD (torch's ``pixel_shuffle``) permutes the channels
silently, so both modes are checked against an independent definition, and the TF ops end to end.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmbridge
from mmbridge.convert.ops.space_depth import DepthToSpace, SpaceToDepth


def test_modes_against_the_spec_and_pixel_shuffle():
    x = torch.arange(2 * 8 * 3 * 2, dtype=torch.float32).reshape(2, 8, 3, 2)
    assert torch.equal(DepthToSpace(2, "CRD")(x), torch.nn.functional.pixel_shuffle(x, 2))
    # DCR, element by element from the spec: out[n, c, h*b + i, w*b + j] = x[n, (i*b + j)*C' + c, h, w]
    want = torch.empty(2, 2, 6, 4)
    for c in range(2):
        for i in range(2):
            for j in range(2):
                want[:, c, i::2, j::2] = x[:, (i * 2 + j) * 2 + c]
    got = DepthToSpace(2, "DCR")(x)
    assert torch.equal(got, want) and not torch.equal(got, DepthToSpace(2, "CRD")(x))
    assert torch.equal(SpaceToDepth(2)(got), x)  # SpaceToDepth inverts DCR


@pytest.mark.tf
@pytest.mark.parametrize("op", ["depth_to_space", "space_to_depth"])
def test_tf_ops_convert_and_match(tf, tmp_path, op):
    shape = (2, 3, 4, 8) if op == "depth_to_space" else (2, 4, 6, 3)
    fn = tf.function(lambda x: getattr(tf.nn, op)(x, 2),
                     input_signature=[tf.TensorSpec((None, None, None, shape[-1]), tf.float32, name="x")])
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    art = mmbridge.export(fn, sample_inputs={"x": x}, name=f"tf_{op}", cache_dir=tmp_path)
    module = mmbridge.to_torch(art, trainable=False)
    assert any(isinstance(m, (DepthToSpace, SpaceToDepth)) for m in module.modules())
    x2 = np.random.default_rng(1).standard_normal((1, 6, 2, shape[-1]) if op == "depth_to_space" else (1, 8, 2, 3))
    x2 = x2.astype(np.float32)
    with torch.no_grad():
        got = module(torch.from_numpy(x2)).numpy()
    np.testing.assert_array_equal(got, getattr(tf.nn, op)(x2, 2).numpy())
