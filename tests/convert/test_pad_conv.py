"""Zero Pad + Conv with less memory (mmbridge/convert/ops/conv.py::pad_conv, fusions.fuse_pad_conv).

The fused op must compute what ``F.pad`` + ``F.convNd`` computes (bit-equal forward, gradients
equal), keep only the unpadded input for backward, and leave other pads alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from mmbridge.bench.harness import tensor_memory
from mmbridge.convert import core as tb
from mmbridge.convert import fusions
from mmbridge.convert.ops.conv import NO_GRAD_CHUNKS, PadConv, pad_conv

_MIB = 1024 * 1024
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

# (rank, N, C, M, size, kernel, stride, dilation, groups, F.pad pads, bias, channels_last)
CASES = [
    (2, 4, 3, 8, 16, 3, 2, 1, 1, [0, 1, 0, 1], False, False),   # TF "same", stride 2, even size
    (2, 5, 6, 6, 15, 3, 2, 1, 6, [1, 1, 1, 1], True, False),    # depthwise, odd size, symmetric
    (2, 3, 4, 8, 9, 4, 1, 1, 1, [1, 2, 1, 2], True, False),     # even kernel, stride 1
    (2, 4, 4, 8, 12, 3, 1, 2, 2, [2, 2, 0, 3], True, True),     # dilation, groups, channels_last
    (2, 1, 3, 4, 7, 3, 2, 1, 1, [0, 1, 0, 1], False, False),    # batch 1 (not chunked)
    (1, 6, 4, 5, 11, 5, 2, 1, 1, [1, 2], True, False),
    (3, 2, 2, 3, 6, 3, 2, 1, 1, [0, 1, 0, 1, 1, 1], False, False),
]


def _operands(case, seed=0):
    rank, n, c, m, size, k, stride, dil, groups, pads, bias, cl = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, *([size] * rank), generator=g)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(m, c // groups, *([k] * rank), generator=g)
    b = torch.randn(m, generator=g) if bias else None
    return x, w, b, pads, [stride] * rank, [dil] * rank, groups


def _reference(x, w, b, pads, stride, dil, groups):
    return _CONV[w.dim() - 2](F.pad(x, pads), w, b, stride, 0, dil, groups)


def _grads(fn, x, w, b, *rest):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    y = fn(*leaves, *rest)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(g)
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def _equal(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.fixture
def always_chunk(monkeypatch):
    """Split every no-grad batch (the cases here are under the 256 KiB threshold)."""
    from mmbridge.convert.ops import conv

    monkeypatch.setattr(conv, "NO_GRAD_CHUNK_MIN_BYTES", 0)


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_values_and_gradients_equal_pad_then_conv(case, always_chunk):
    ops = _operands(case)
    with torch.no_grad():
        _equal(pad_conv(*ops), _reference(*ops))  # the chunked no-grad path (N > 1, CPU)
    y, grads = _grads(pad_conv, *ops)
    y_ref, grads_ref = _grads(_reference, *ops)
    _equal(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        if g_ref is None:
            assert g is None
        else:
            _equal(g, g_ref)  # the same aten kernels on the same operands: bit-equal


def test_only_input_needs_grad_and_only_weight_needs_grad():
    x, w, b, *rest = _operands(CASES[0])
    xg = x.clone().requires_grad_(True)
    pad_conv(xg, w, b, *rest).sum().backward()
    xr = x.clone().requires_grad_(True)
    _reference(xr, w, b, *rest).sum().backward()
    _equal(xg.grad, xr.grad)
    wg, wr = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    pad_conv(x, wg, b, *rest).sum().backward()
    _reference(x, wr, b, *rest).sum().backward()
    _equal(wg.grad, wr.grad)


def test_double_backward_matches():
    x, w, b, *rest = _operands(CASES[1])

    def penalty(fn):
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(fn(xs, ws, b, *rest).pow(2).sum(), xs, create_graph=True)
        gx.pow(2).sum().backward()
        return ws.grad

    torch.testing.assert_close(penalty(pad_conv), penalty(_reference), rtol=1e-5, atol=1e-4)


def test_autocast_bf16_same_as_pad_then_conv(always_chunk):
    ops = _operands(CASES[3])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _equal(pad_conv(*ops), _reference(*ops))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, grads = _grads(pad_conv, *ops)
        y_ref, grads_ref = _grads(_reference, *ops)
    assert y.dtype == torch.bfloat16
    _equal(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == torch.float32  # leaves stay float32; autocast's cast backward
        _equal(g, g_ref)


def test_saved_for_backward_is_the_unpadded_input():
    x, w, b, *rest = _operands(CASES[0])
    w = w.requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    got = tensor_memory(lambda: pad_conv(xg, w, b, *rest).sum().backward(), params=[w])
    ref = tensor_memory(lambda: _reference(xg, w, b, *rest).sum().backward(), params=[w])
    padded = F.pad(x, rest[0])
    assert got["saved_for_backward_mib"] == round(x.untyped_storage().nbytes() / _MIB, 3)
    assert ref["saved_for_backward_mib"] == round(padded.untyped_storage().nbytes() / _MIB, 3)


def test_small_no_grad_batch_is_one_call(monkeypatch):
    """Under NO_GRAD_CHUNK_MIN_BYTES the batch is not split (one convolution call)."""
    from mmbridge.convert.ops import conv

    calls = []
    real = conv._padded_conv
    monkeypatch.setattr(conv, "_padded_conv", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    x, w, b, *rest = _operands(CASES[0])
    with torch.no_grad():
        conv.pad_conv(x, w, b, *rest)
        assert calls == [4]
        monkeypatch.setattr(conv, "NO_GRAD_CHUNK_MIN_BYTES", 0)
        conv.pad_conv(x, w, b, *rest)
    assert calls == [4, 2, 2]


def test_no_grad_holds_one_chunk_of_the_padded_copy():
    """Default settings: a 1.06 MiB padded copy (over NO_GRAD_CHUNK_MIN_BYTES) is split."""
    x = torch.randn(16, 16, 32, 32)
    w = torch.randn(32, 16, 3, 3)
    pads, stride = [0, 1, 0, 1], [2, 2]
    with torch.no_grad():
        got = tensor_memory(lambda: pad_conv(x, w, None, pads, stride, [1, 1], 1))
        ref = tensor_memory(lambda: _reference(x, w, None, pads, stride, [1, 1], 1))
    chunk = 16 // min(NO_GRAD_CHUNKS, 8)
    out = 16 * 32 * 16 * 16 * 4
    padded = 16 * 16 * 33 * 33 * 4
    # the output, one padded chunk and that chunk's result, at once
    assert got["peak_live_mib"] == round((out + padded * chunk // 16 + out * chunk // 16) / _MIB, 3)
    assert ref["peak_live_mib"] == round((out + padded) / _MIB, 3)


def test_compiles_without_graph_breaks():
    x, w, b, *rest = _operands(CASES[0])
    mod = PadConv(__import__("mmbridge.convert.ops.pad", fromlist=["Pad"]).Pad(rest[0]),
                  torch.nn.Conv2d(3, 8, 3, stride=2, bias=False))
    torch._dynamo.reset()
    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)  # fullgraph: a break raises
    xg = x.clone().requires_grad_(True)
    compiled(xg).sum().backward()
    xr = x.clone().requires_grad_(True)
    _reference(xr, mod[1].weight, None, *rest).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=0, atol=0)
    with torch.no_grad():
        _equal(compiled(x), _reference(x, mod[1].weight, None, *rest))
        # a hook added after compiling is honoured (dynamo guards on the hook dicts and recompiles)
        handle = mod[1].register_forward_hook(lambda m, args, out: out * 2)
        _equal(compiled(x), 2 * _reference(x, mod[1].weight, None, *rest))
        handle.remove()


# ------------------------------------------------------------------------------------------
# the fx pass on converted ONNX graphs
# ------------------------------------------------------------------------------------------
def _model(nodes, inits, out_shape, in_shape=("B", 4, 9, 9), opset=17):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TP.FLOAT, list(in_shape))],
                          [helper.make_tensor_value_info("y", TP.FLOAT, list(out_shape))], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _weights(bias=True):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(6, 4, 3, 3)).astype(np.float32), "w")]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(size=(6,)).astype(np.float32), "b"))
    return inits


def _pair(model, monkeypatch):
    fused = tb.to_torch(model, trainable=True)
    monkeypatch.setattr(fusions, "run_all", lambda gm: {})
    unfused = tb.to_torch(model, trainable=True)
    monkeypatch.undo()
    return unfused, fused


def _check_same(unfused, fused, x):
    assert list(fused.state_dict()) == list(unfused.state_dict())
    assert fused.mmbridge_sources == unfused.mmbridge_sources
    for m in (unfused, fused):
        m.zero_grad(set_to_none=True)
    ys = []
    for m in (unfused, fused):
        y = m(x)
        y.pow(2).sum().backward()
        ys.append(y.detach())
    _equal(ys[1], ys[0])
    pu, pf = dict(unfused.named_parameters()), dict(fused.named_parameters())
    for name in pu:
        _equal(pf[name].grad, pu[name].grad)
    with torch.no_grad():
        _equal(fused(x), unfused(x))


def test_conv_with_asymmetric_pads_becomes_padconv(monkeypatch, always_chunk):
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1])
    unfused, fused = _pair(_model([node], _weights(), ("B", 6, 5, 5)), monkeypatch)
    assert fused.mmbridge_fusions["pad_conv"] == 1
    assert [type(m).__name__ for m in fused.modules()].count("PadConv") == 1
    _check_same(unfused, fused, torch.randn(4, 4, 9, 9))


def test_same_upper_conv_becomes_padconv_at_any_size(monkeypatch, always_chunk):
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")
    model = _model([node], _weights(bias=False), ("B", 6, "H2", "W2"), in_shape=("B", 4, "H", "W"))
    unfused, fused = _pair(model, monkeypatch)
    assert fused.mmbridge_fusions["pad_conv"] == 1
    for side in (8, 9):
        _check_same(unfused, fused, torch.randn(3, 4, side, side))


def test_zero_pad_node_then_conv_is_not_fused(monkeypatch):
    """A separate Pad node (Keras ZeroPadding2D) stays: fusing it into a call on the conv's weight
    bypassed the conv module (its hooks, a replacement of it)."""
    pads = numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads")
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], mode="constant"),
             helper.make_node("Conv", ["p", "w", "b"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])]
    unfused, fused = _pair(_model(nodes, _weights() + [pads], ("B", 6, 6, 6)), monkeypatch)
    assert fused.mmbridge_fusions["pad_conv"] == 0
    assert pad_conv not in [n.target for n in fused.graph.nodes if n.op == "call_function"]
    assert [(n, type(m)) for n, m in fused.named_modules()][1:] == [(n, type(m)) for n, m in unfused.named_modules()][1:]
    _check_same(unfused, fused, torch.randn(4, 4, 9, 9))


@pytest.mark.parametrize("mode,value,pads", [("reflect", None, [0, 0, 1, 1, 0, 0, 1, 1]),
                                             ("constant", 1.5, [0, 0, 1, 1, 0, 0, 1, 1]),
                                             ("constant", None, [0, 1, 0, 0, 0, 1, 0, 0])])
def test_other_pads_stay_as_they_are(mode, value, pads, monkeypatch):
    """Reflect pads, non-zero pad values and channel pads are not fused (values unchanged)."""
    inits = _weights() + [numpy_helper.from_array(np.array(pads, np.int64), "pads")]
    ins = ["x", "pads"]
    if value is not None:
        inits.append(numpy_helper.from_array(np.array(value, np.float32), "v"))
        ins.append("v")
    c = 4 + pads[1] + pads[5]
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(6, c, 3, 3)).astype(np.float32), "w")
    inits[0] = w
    nodes = [helper.make_node("Pad", ins, ["p"], mode=mode),
             helper.make_node("Conv", ["p", "w", "b"], ["y"], kernel_shape=[3, 3], strides=[2, 2])]
    unfused, fused = _pair(_model(nodes, inits, ("B", 6, 5, 5)), monkeypatch)
    assert fused.mmbridge_fusions["pad_conv"] == 0
    _check_same(unfused, fused, torch.randn(2, 4, 9, 9))


def test_tensor_memory_does_not_count_a_slice_of_an_input_under_no_grad():
    """harness.tensor_memory counted ``x[:4]`` (no_grad: not flagged a view at its dispatch level)
    as a new storage of x's whole size (1.125 MiB here instead of the conv output's 0.125)."""
    x, w = torch.randn(16, 16, 32, 32), torch.randn(32, 16, 3, 3)
    with torch.no_grad():
        got = tensor_memory(lambda: F.conv2d(x[:4], w, None, 2, 1))
    assert got["peak_live_mib"] == 4 * 32 * 16 * 16 * 4 / _MIB


def test_converted_graph_with_pad_conv_compiles_without_graph_breaks():
    pads = numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads")
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], mode="constant"),
             helper.make_node("Conv", ["p", "w", "b"], ["q"], kernel_shape=[3, 3], strides=[2, 2]),
             helper.make_node("Conv", ["q", "w2"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1])]
    w2 = numpy_helper.from_array(np.random.default_rng(1).normal(size=(6, 6, 3, 3)).astype(np.float32), "w2")
    fused = tb.to_torch(_model(nodes, _weights() + [pads, w2], ("B", 6, 3, 3)), trainable=True)
    assert fused.mmbridge_fusions["pad_conv"] == 1  # the Conv with pads=[0, 0, 1, 1]; the Pad node stays
    x = torch.randn(4, 4, 9, 9)
    fused(x).pow(2).sum().backward()
    eager = {n: p.grad.clone() for n, p in fused.named_parameters()}
    fused.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    compiled(x).pow(2).sum().backward()
    for n, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, eager[n], rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), fused(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# PadConv calls its children whenever they are hooked or replaced (checked at call time)
# ------------------------------------------------------------------------------------------
def _asym_pair(monkeypatch):
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1])
    unfused, fused = _pair(_model([node], _weights(), ("B", 6, 5, 5)), monkeypatch)
    (path,) = [n for n, m in fused.named_modules() if isinstance(m, PadConv)]
    return unfused, fused, path


@pytest.fixture
def count_fused():
    """How many times PadConv took the fused path (conv.pad_conv called). Its own MonkeyPatch:
    _pair undoes the test's ``monkeypatch``."""
    from mmbridge.convert.ops import conv

    calls = []
    real = conv.pad_conv
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(conv, "pad_conv", lambda *a: calls.append(1) or real(*a))
        yield calls


def test_named_modules_and_state_dict_keys_unchanged(monkeypatch):
    unfused, fused, path = _asym_pair(monkeypatch)
    assert [n for n, _ in fused.named_modules()] == [n for n, _ in unfused.named_modules()]
    assert list(fused.state_dict()) == list(unfused.state_dict())
    assert type(fused.get_submodule(f"{path}.1")) is torch.nn.Conv2d


def test_forward_hook_on_conv_fires_and_changes_output(monkeypatch, count_fused):
    unfused, fused, path = _asym_pair(monkeypatch)
    x = torch.randn(4, 4, 9, 9)
    with torch.no_grad():
        ref = unfused(x)
        _equal(fused(x), ref)
        assert len(count_fused) == 1  # plain children: the fused path
        seen = []
        handle = fused.get_submodule(f"{path}.1").register_forward_hook(
            lambda m, args, out: seen.append(args[0].shape) or out * 2)
        _equal(fused(x), ref * 2)
        assert seen == [torch.Size([4, 4, 10, 10])]  # the hook saw the padded input
        assert len(count_fused) == 1
        handle.remove()
        _equal(fused(x), ref)
        assert len(count_fused) == 2  # back to the fused path once the hook is gone


def test_pre_hook_and_backward_hook_on_children_fire(monkeypatch, count_fused):
    unfused, fused, path = _asym_pair(monkeypatch)
    x = torch.randn(4, 4, 9, 9)
    pad = fused.get_submodule(f"{path}.0")
    handle = pad.register_forward_pre_hook(lambda m, args: (args[0] + 1,))
    with torch.no_grad():
        _equal(fused(x), unfused(x + 1))
    handle.remove()
    grads = []
    conv = fused.get_submodule(f"{path}.1")
    handle = conv.register_full_backward_hook(lambda m, gin, gout: grads.append(gout[0].shape))
    fused(x.requires_grad_(True)).sum().backward()
    handle.remove()
    assert grads == [torch.Size([4, 6, 4, 4])]  # dL/d(conv output)
    assert count_fused == []


def test_global_module_hook_sees_the_conv(monkeypatch, count_fused):
    _, fused, path = _asym_pair(monkeypatch)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.append(type(m).__name__))
    try:
        with torch.no_grad():
            fused(torch.randn(2, 4, 9, 9))
    finally:
        handle.remove()
    assert "Conv2d" in seen and "Pad" in seen
    assert count_fused == []


def test_replacing_or_parametrizing_the_conv_changes_the_output(monkeypatch, count_fused):
    unfused, fused, path = _asym_pair(monkeypatch)
    x = torch.randn(4, 4, 9, 9)
    with torch.no_grad():
        ref = unfused(x)
    block = fused.get_submodule(path)

    class Wrapper(torch.nn.Module):  # what PEFT LoRA / a QAT prepare puts at the conv's path
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, t):
            return self.inner(t) + 1.0

    conv = block[1]
    block[1] = Wrapper(conv)
    with torch.no_grad():
        _equal(fused(x), ref + 1.0)
    block[1] = conv

    class Double(torch.nn.Module):
        def forward(self, w):
            return w * 2

    torch.nn.utils.parametrize.register_parametrization(conv, "weight", Double())  # subclasses Conv2d
    with torch.no_grad():
        want = F.conv2d(F.pad(x, [0, 1, 0, 1]), conv.parametrizations.weight.original * 2, conv.bias, 2)
        _equal(fused(x), want)
    assert count_fused == []


# ------------------------------------------------------------------------------------------
# torch.func and forward-mode AD (the fused Function has no vmap / jvp rule: unfused ops there)
# ------------------------------------------------------------------------------------------
def test_func_grad_and_per_sample_grads_equal_unfused(monkeypatch):
    unfused, fused, _ = _asym_pair(monkeypatch)
    x = torch.randn(3, 4, 9, 9, generator=torch.Generator().manual_seed(2))

    def loss(model):
        return lambda params, t: torch.func.functional_call(model, params, (t,)).pow(2).sum()

    params = {n: p.detach() for n, p in unfused.named_parameters()}
    got = torch.func.grad(loss(fused))(params, x)
    want = torch.func.grad(loss(unfused))(params, x)
    unfused.zero_grad(set_to_none=True)
    unfused(x).pow(2).sum().backward()
    for n, p in unfused.named_parameters():
        _equal(got[n], want[n])
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-5)

    def one(model):
        return lambda params, t: loss(model)(params, t.unsqueeze(0))

    got = torch.func.vmap(torch.func.grad(one(fused)), in_dims=(None, 0))(params, x)
    want = torch.func.vmap(torch.func.grad(one(unfused)), in_dims=(None, 0))(params, x)
    for n in params:
        assert got[n].shape == (3, *params[n].shape)
        _equal(got[n], want[n])


def test_forward_ad_jvp_equals_unfused(monkeypatch):
    unfused, fused, _ = _asym_pair(monkeypatch)
    g = torch.Generator().manual_seed(3)
    x, dx = torch.randn(4, 4, 9, 9, generator=g), torch.randn(4, 4, 9, 9, generator=g)
    from torch.autograd import forward_ad

    outs = []
    for m in (unfused, fused):
        with forward_ad.dual_level():
            y = m(forward_ad.make_dual(x, dx))
            outs.append([t.detach().clone() for t in forward_ad.unpack_dual(y)])
    _equal(outs[1][0], outs[0][0])
    _equal(outs[1][1], outs[0][1])
    _, t_fused = torch.func.jvp(fused, (x,), (dx,))
    torch.testing.assert_close(t_fused, outs[0][1], rtol=0, atol=0)
    # a dual weight (tangent on the parameters), grad mode on
    params = {n: p.detach() for n, p in unfused.named_parameters()}
    tangents = {n: torch.randn(p.shape, generator=g) for n, p in params.items()}
    res = [torch.func.jvp(lambda p, m=m: torch.func.functional_call(m, p, (x,)), (params,), (tangents,))[1]
           for m in (unfused, fused)]
    _equal(res[1], res[0])
