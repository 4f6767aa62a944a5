"""Failure cases 18, 19, 20, 22, 23 from ../shared/cases (onnxruntime IO binding, environment,
fp16 on CPU), run through ``mmbridge.to_ort``: each asserts the right value or the named error.
"""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import mmbridge
from mmbridge import info
from mmbridge.errors import RuntimeBackendError, SpecError
from mmbridge.parity import tolerance_for


def mul2(dims=("N", "C")):
    g = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "mul2",
                          [helper.make_tensor_value_info("x", TP.FLOAT, list(dims))],
                          [helper.make_tensor_value_info("y", TP.FLOAT, list(dims))],
                          [numpy_helper.from_array(np.array(2, np.float32), "two")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


# -- case 18: non-contiguous input (onnxruntime PR #10315; torch2trt#190) ----------------------
@pytest.mark.case("18")
def test_noncontiguous_input_gives_right_values():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()  # (3, 2) view, not contiguous
    assert not t.is_contiguous()
    y = mmbridge.to_ort(mul2())(t)
    assert y.tolist() == [[0.0, 6.0], [2.0, 8.0], [4.0, 10.0]]  # raw binding gives [[0,2],[4,6],[8,10]]
    assert t.tolist() == [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]  # the caller's tensor is untouched
    # NHWC -> NCHW permute of an image batch, the common way to get here
    img = torch.randn(2, 5, 4, 3).permute(0, 3, 1, 2)
    m4 = mmbridge.to_ort(mul2(("B", 3, 5, 4)))
    torch.testing.assert_close(m4(img), 2 * img, rtol=0, atol=0)


@pytest.mark.case("18")
def test_noncontiguous_strict_raises_naming_input():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()
    with pytest.raises(SpecError, match=r"input 'x' \(shape \(3, 2\), strides \(1, 3\)\) is not contiguous and strict=True"):
        mmbridge.to_ort(mul2(), strict=True)(t)
    y = mmbridge.to_ort(mul2(), strict=True)(t.contiguous())
    assert y.tolist() == [[0.0, 6.0], [2.0, 8.0], [4.0, 10.0]]


# -- case 19: dtype mismatch (microsoft/onnxruntime#10299) --------------------------------------
@pytest.mark.case("19")
def test_float64_into_float32_graph_names_input_and_both_dtypes():
    t = torch.from_numpy(np.arange(4, dtype=np.float64).reshape(2, 2))
    m = mmbridge.to_ort(mul2())
    with pytest.raises(SpecError, match=r"input 'x' has dtype float64 but the graph expects float32"):
        m(t)
    assert m(t.float()).tolist() == [[0.0, 2.0], [4.0, 6.0]]  # after the explicit conversion


# -- case 20: output shape changes with the batch (microsoft/onnxruntime#10992, #13463) --------
@pytest.mark.case("20")
def test_batch_2_then_4_outputs_sized_per_call():
    m = mmbridge.to_ort(mul2())
    y2 = m(torch.ones(2, 3))
    y4 = m(torch.ones(4, 3))
    assert y2.shape == (2, 3) and y4.shape == (4, 3)
    assert torch.equal(y4, torch.full((4, 3), 2.0)) and torch.equal(y2, torch.full((2, 3), 2.0))


@pytest.mark.case("20")
def test_stale_preallocated_shape_is_caught_not_silent(caplog):
    """The case's own failure: an output buffer sized for the last batch (2) while this batch is 4.
    ORT's shape check refuses it; mmbridge re-runs with an ORT-allocated output (DLPack), returns
    the right values, logs the output name and both shapes once, and stops pre-allocating it."""
    mod = mmbridge.to_ort(mul2())
    x = torch.ones(4, 3)
    mod._shape_cache[(x.shape,)] = [(2, 3)]  # what a stale "last batch" buffer amounts to
    with caplog.at_level(logging.WARNING, logger="mmbridge.runtime.module"):
        out = mod(x)
    assert out.shape == (4, 3) and torch.equal(out, torch.full((4, 3), 2.0))
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "output 'y' has shape [4, 3], not the [2, 3]" in msgs[0]
    assert mod._data_dependent == {0}
    assert torch.equal(mod(torch.ones(2, 3)), torch.full((2, 3), 2.0))


@pytest.mark.case("20")
def test_declared_output_dims_are_not_trusted():
    """A graph whose output declares a fixed [2, 3] but computes [N, 3]: ONNX inference recomputes
    the output dims from the inputs, so the pre-allocated buffer has the right shape."""
    m = mul2()
    y = m.graph.output[0].type.tensor_type.shape
    y.dim[0].Clear()
    y.dim[0].dim_value = 2
    mod = mmbridge.to_ort(m)
    assert mod._out_plan == [[(0, 0), (0, 1)]]
    out = mod(torch.ones(4, 3))
    assert out.shape == (4, 3) and torch.equal(out, torch.full((4, 3), 2.0))
    assert mod._data_dependent == set()


# -- case 22: onnxruntime + onnxruntime-gpu both installed (microsoft/onnxruntime#26996) --------
@pytest.mark.case("22")
def test_conflict_detected_by_info(monkeypatch):
    fake = {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.32.0"}
    monkeypatch.setattr(info, "dist_version", lambda name: fake.get(name))
    found = info.conflicts()
    assert len(found) == 1 and "both onnxruntime and onnxruntime-gpu are installed" in found[0]
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in found[0]
    fake.pop("onnxruntime-gpu")
    assert info.conflicts() == []


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA EP present here")
@pytest.mark.case("22")
def test_cuda_requested_without_cuda_ep_raises_with_cause_and_fix(monkeypatch):
    fake = {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.32.0"}
    monkeypatch.setattr(info, "dist_version", lambda name: fake.get(name))
    with pytest.raises(RuntimeBackendError) as e:
        mmbridge.to_ort(mul2(), device="cuda:0")
    msg = str(e.value)
    assert "CUDA was requested (ORTModule 'mul2' moved to cuda:0)" in msg
    assert "onnxruntime==1.32.0, onnxruntime-gpu==1.32.0" in msg
    assert "both onnxruntime and onnxruntime-gpu are installed" in msg and "pip install onnxruntime-gpu" in msg
    assert "never falls back to CPU silently" in msg
    # the CPU-only wheel alone: a different cause, still an error
    fake.pop("onnxruntime-gpu")
    with pytest.raises(RuntimeBackendError, match=r"CPU-only onnxruntime wheel is installed.*pip install onnxruntime-gpu"):
        mmbridge.to_ort(mul2(), device="cuda")
    # moving an existing module (as a parent's .to('cuda') would) raises too, instead of running on CPU
    m = mmbridge.to_ort(mul2())
    if torch.cuda.is_available():
        with pytest.raises(RuntimeBackendError, match="CUDA was requested"):
            m.to("cuda")
    else:
        with pytest.raises(RuntimeBackendError, match="CUDA was requested"):
            m._set_device(torch.device("cuda", 0))
    assert m.device is None  # unchanged


# -- case 23: fp16 graphs on the CPU EP (microsoft/onnxruntime#3735, #11831) --------------------
def _fp16_one_op(op, opset):
    inits, ins, attrs = [], ["x"], {}
    if op == "Conv":
        inits, ins = [numpy_helper.from_array(np.full((2, 2, 1, 1), 0.5, np.float16), "w")], ["x", "w"]
    if op == "Sub":
        inits, ins = [numpy_helper.from_array(np.array(0.25, np.float16), "c")], ["x", "c"]
    if op == "LayerNormalization":
        inits, ins = [numpy_helper.from_array(np.ones(4, np.float16), "s")], ["x", "s"]
    if op == "Resize":
        inits = [numpy_helper.from_array(np.array([], np.float32), "roi"),
                 numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc")]
        ins, attrs = ["x", "roi", "sc"], {"mode": "linear"}
    g = helper.make_graph([helper.make_node(op, ins, ["y"], **attrs)], f"fp16_{op}",
                          [helper.make_tensor_value_info("x", TP.FLOAT16, [1, 2, 4, 4])],
                          [helper.make_tensor_value_info("y", TP.FLOAT16, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    return m


def _fp32_reference(op, x):
    x = x.astype(np.float32)
    if op == "Conv":
        return np.repeat(x.sum(axis=1, keepdims=True) * 0.5, 2, axis=1)
    if op == "Sub":
        return x - 0.25
    if op == "LayerNormalization":
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5)
    if op == "Resize":  # 2x bilinear, half_pixel: torch's align_corners=False is the same rule
        return torch.nn.functional.interpolate(torch.from_numpy(x), scale_factor=2, mode="bilinear",
                                               align_corners=False).numpy()
    if op == "Gelu":
        return torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    raise AssertionError(op)


@pytest.mark.parametrize("op,opset", [("Conv", 17), ("Sub", 17), ("LayerNormalization", 17), ("Resize", 17), ("Gelu", 20)])
@pytest.mark.case("23")
def test_fp16_graph_on_cpu_within_fp16_tolerance(op, opset):
    x = np.random.RandomState(0).rand(1, 2, 4, 4).astype(np.float16)
    m = mmbridge.to_ort(_fp16_one_op(op, opset), device="cpu")
    y = m(torch.from_numpy(x))
    assert y.dtype == torch.float16
    ref = _fp32_reference(op, x)
    assert tuple(y.shape) == ref.shape
    tol = tolerance_for("onnx", "float16")
    np.testing.assert_allclose(y.float().numpy(), ref, rtol=tol.rtol, atol=tol.atol)
    with pytest.raises(SpecError, match="input 'x' has dtype float32 but the graph expects float16"):
        m(torch.from_numpy(x.astype(np.float32)))  # outside autocast: no silent cast
