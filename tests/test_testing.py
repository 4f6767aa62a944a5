"""mmbridge.testing: the shared one-graph helpers, and that assert_matches_ort can fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import mmbridge
from mmbridge.testing import assert_matches_ort, onnx_model, run_ort


def _add_model(opset=17):
    return onnx_model([helper.make_node("Add", ["x", "b"], ["y"])],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                      [numpy_helper.from_array(np.array([1, 2, 3], np.float32), "b")], opset=opset, check=True)


@pytest.mark.parametrize("opset", [13, 17, 21])
def test_onnx_model_runs_and_converts_at_each_opset(opset):
    m = _add_model(opset)
    assert m.opset_import[0].version == opset and m.ir_version >= 8
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(run_ort(m, {"x": x})[0], x + [1, 2, 3])
    assert_matches_ort(mmbridge.to_torch(m), m, {"x": x})


def test_assert_matches_ort_names_the_output_that_differs():
    m = _add_model()

    class Wrong(torch.nn.Module):
        def forward(self, x):
            return x + 1.5

    with pytest.raises(AssertionError, match="output 'y'"):
        assert_matches_ort(Wrong(), m, {"x": np.zeros((2, 3), np.float32)})
