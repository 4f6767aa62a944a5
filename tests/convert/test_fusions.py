"""Post-conversion fusions (mmbridge/convert/fusions.py): each fused module computes the values of
the unfused one (equal, or a few ulp for GELU) and the fusion happened (module types)."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from mmbridge.convert import core as tb
from mmbridge.convert import fusions

F = 6


def _model(nodes, inputs, outputs, inits, opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _vi(name, shape, t=TP.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def _c(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _same(a, b):
    """Bit-equal values (NaN where the other has NaN)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    return True


def _pair(model, trainable=False, monkeypatch=None):
    """(unfused, fused) conversions of one graph."""
    fused = tb.to_torch(model, trainable=trainable)
    monkeypatch.setattr(fusions, "run_all", lambda gm: {})
    unfused = tb.to_torch(model, trainable=trainable)
    monkeypatch.undo()
    return unfused, fused


def numeric_model():
    """What tf2onnx writes for tf.clip_by_value((x - mu) / sd, -5, 5): Sub, Mul(1/sd), Min, Max."""
    rng = np.random.default_rng(0)
    mu, sd = rng.normal(3, 0.1, F), rng.uniform(1.5, 2.5, F)
    nodes = [helper.make_node("Sub", ["x", "mu"], ["a"]), helper.make_node("Mul", ["a", "rsd"], ["b"]),
             helper.make_node("Min", ["b", "hi"], ["c"]), helper.make_node("Max", ["c", "lo"], ["y"])]
    return _model(nodes, [_vi("x", ["B", F])], [_vi("y", ["B", F])],
                  [_c("mu", mu), _c("rsd", 1 / sd), _c("hi", 5.0), _c("lo", -5.0)])


def _x(batch=64, seed=0):
    x = torch.from_numpy(np.random.default_rng(seed).normal(3, 8, (batch, F)).astype(np.float32))
    x[0, 0], x[1, 1] = float("nan"), float("inf")
    return x


def test_numeric_chain_is_one_module_with_equal_values(monkeypatch):
    un, fu = _pair(numeric_model(), monkeypatch=monkeypatch)
    kinds = [type(m).__name__ for m in fu.modules()]
    assert kinds.count("ConstantElementwise") == 1
    assert not {"OnnxBinaryMathOperation", "OnnxMinMax"} & set(kinds)
    assert fu.mmbridge_fusions["constant_elementwise"] == 4
    x = _x()
    with torch.no_grad():
        assert _same(fu(x), un(x)) and torch.isnan(fu(x)[0, 0])
        assert _same(fu(x[:1]), un(x[:1]))  # other batch sizes
    # grad mode with an input that requires grad: out of place, same values and gradients (finite
    # inputs: at a NaN, onnx2torch's stack + amin and torch.minimum route the gradient differently)
    xf = x.nan_to_num(posinf=50.0)
    xa, xb = xf.clone().requires_grad_(), xf.clone().requires_grad_()
    ya, yb = fu(xa), un(xb)
    assert _same(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    assert _same(xa.grad, xb.grad)
    # the input is never written
    x0 = x.clone()
    fu(x)
    assert _same(x, x0)


def test_numeric_chain_state_dict_copy_pickle_and_buffer_changes(monkeypatch):
    un, fu = _pair(numeric_model(), monkeypatch=monkeypatch)
    x = _x()
    sd = fu.state_dict()
    assert len(sd) == 4 and all(k in fu.mmbridge_sources for k in sd)  # moved buffers keep their ONNX source
    for clone in (copy.deepcopy(fu), pickle.loads(pickle.dumps(fu))):
        assert _same(clone(x), fu(x))
    # bounds changed to lo > hi (load_state_dict): the merged clamp must not be used any more
    name_lo = next(k for k, v in fu.mmbridge_sources.items() if v == "lo")
    name_hi = next(k for k, v in fu.mmbridge_sources.items() if v == "hi")
    un_lo = next(k for k, v in un.mmbridge_sources.items() if v == "lo")
    un_hi = next(k for k, v in un.mmbridge_sources.items() if v == "hi")
    fu.load_state_dict({**fu.state_dict(), name_lo: torch.tensor(1.0), name_hi: torch.tensor(-1.0)})
    un.load_state_dict({**un.state_dict(), un_lo: torch.tensor(1.0), un_hi: torch.tensor(-1.0)})
    with torch.no_grad():
        assert _same(fu(x), un(x))
    # ... and through `buf.data = t`, which bumps neither the object nor its version counter
    un2, fu2 = _pair(numeric_model(), monkeypatch=monkeypatch)
    with torch.no_grad():
        fu2(x)  # caches "ordered"
        for m, lo, hi in ((fu2, name_lo, name_hi), (un2, un_lo, un_hi)):
            m.get_buffer(lo).data = torch.tensor(1.0)
            m.get_buffer(hi).data = torch.tensor(-1.0)
        assert _same(fu2(x), un2(x))


def test_sub_div_clip_and_reversed_operands(monkeypatch):
    """Sub(c, x) (constant first), Div by a vector, Clip with constant bounds."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Sub", ["mu", "x"], ["a"]), helper.make_node("Div", ["a", "sd"], ["b"]),
             helper.make_node("Add", ["b", "one"], ["c"]), helper.make_node("Clip", ["c", "lo", "hi"], ["y"])]
    m = _model(nodes, [_vi("x", ["B", F])], [_vi("y", ["B", F])],
               [_c("mu", rng.normal(size=F)), _c("sd", rng.uniform(1, 2, F)), _c("one", 1.0), _c("lo", -3.0), _c("hi", 3.0)])
    un, fu = _pair(m, monkeypatch=monkeypatch)
    assert [type(mod).__name__ for mod in fu.modules()].count("ConstantElementwise") == 1
    x = _x()
    with torch.no_grad():
        assert _same(fu(x), un(x))


def test_constant_that_broadcasts_up_stays_out_of_place(monkeypatch):
    """x [F] with a [2, F] constant: the result is [2, F]; the in-place path must not be taken."""
    nodes = [helper.make_node("Sub", ["x", "m"], ["a"]), helper.make_node("Mul", ["a", "k"], ["y"])]
    m = _model(nodes, [_vi("x", [F])], [_vi("y", [2, F])],
               [_c("m", np.ones((1, F))), _c("k", np.arange(2 * F).reshape(2, F))])
    un, fu = _pair(m, monkeypatch=monkeypatch)
    x = torch.arange(F, dtype=torch.float32)
    with torch.no_grad():
        assert fu(x).shape == (2, F) and torch.equal(fu(x), un(x))


def gelu_model(form="erfc"):
    """Keras exact GELU as tf2onnx writes it: 0.5 * x * erfc(-x / sqrt 2), Erfc rewritten to 1 - Erf."""
    if form == "erfc":
        nodes = [helper.make_node("Mul", ["k_half", "x"], ["hx"]), helper.make_node("Neg", ["x"], ["nx"]),
                 helper.make_node("Mul", ["nx", "c"], ["z"]), helper.make_node("Erf", ["z"], ["e"]),
                 helper.make_node("Sub", ["one", "e"], ["ec"]), helper.make_node("Mul", ["hx", "ec"], ["y"])]
    else:  # x * 0.5 * (1 + erf(x / sqrt 2))
        nodes = [helper.make_node("Div", ["x", "s2"], ["z"]), helper.make_node("Erf", ["z"], ["e"]),
                 helper.make_node("Add", ["e", "one"], ["ep"]), helper.make_node("Mul", ["x", "k_half"], ["hx"]),
                 helper.make_node("Mul", ["ep", "hx"], ["y"])]
    return _model(nodes, [_vi("x", ["B", 16])], [_vi("y", ["B", 16])],
                  [_c("k_half", 0.5), _c("c", 1 / math.sqrt(2)), _c("one", 1.0), _c("s2", math.sqrt(2))])


@pytest.mark.parametrize("form", ["erfc", "erf"])
def test_gelu_chain_becomes_nn_gelu(form, monkeypatch):
    un, fu = _pair(gelu_model(form), monkeypatch=monkeypatch)
    gelus = [m for m in fu.modules() if isinstance(m, torch.nn.GELU)]
    assert len(gelus) == 1 and gelus[0].approximate == "none"
    assert not any(type(m).__name__ in ("OnnxErf", "OnnxNeg") for m in fu.modules())
    x = torch.linspace(-8, 8, 4096).reshape(-1, 16)
    with torch.no_grad():
        a, b = fu(x), un(x)
    # gelu(x) = x * Phi(x): both forms round Phi(x) = (1 +- erf) / 2 to float32 (an absolute error
    # of about eps), then multiply by x; so they agree to within a few eps * |x| (measured: 2.3) (a few ulp of the result where
    # gelu(x) is near x; in the tail x << 0 both are rounding noise of the same size)
    eps = torch.finfo(torch.float32).eps
    assert ((a - b).abs() <= 4 * eps * x.abs()).all(), ((a - b).abs() / x.abs()).max()


def test_gelu_with_wrong_constant_is_not_fused(monkeypatch):
    m = gelu_model("erfc")
    for init in m.graph.initializer:
        if init.name == "c":
            init.CopyFrom(_c("c", 0.8))
    fu = tb.to_torch(m)
    assert not any(isinstance(mod, torch.nn.GELU) for mod in fu.modules())


def test_views_lowered_to_tensor_methods(monkeypatch):
    """Unsqueeze -> Transpose -> Reshape -> Squeeze (an einsum's plumbing) run as tensor methods."""
    nodes = [helper.make_node("Unsqueeze", ["x", "ax"], ["u"]),
             helper.make_node("Transpose", ["u"], ["t"], perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["t", "shape"], ["r"]), helper.make_node("Squeeze", ["r", "ax0"], ["y"])]
    m = _model(nodes, [_vi("x", [2, 3, 4, 5])], [_vi("y", [8, 3, 5])],
               [numpy_helper.from_array(np.array([3], np.int64), "ax"),
                numpy_helper.from_array(np.array([1, 8, 3, 5], np.int64), "shape"),
                numpy_helper.from_array(np.array([0], np.int64), "ax0")])
    un, fu = _pair(m, monkeypatch=monkeypatch)
    assert fu.mmbridge_fusions["views"] == 4
    assert not [n for n in fu.graph.nodes if n.op == "call_module"]
    x = torch.randn(2, 3, 4, 5)
    assert torch.equal(fu(x), un(x))


def test_einsum_dense_bias_after_reshape_folds_into_linear():
    """MatMul -> Reshape(split the last dim) -> Add(b[4, 16]) (Keras EinsumDense): b is the Linear's bias."""
    rng = np.random.default_rng(2)
    w, b = rng.normal(size=(64, 64)), rng.normal(size=(4, 16))
    nodes = [helper.make_node("MatMul", ["x", "mmb_var__q__kernel"], ["m"]),
             helper.make_node("Reshape", ["m", "shape"], ["r"]), helper.make_node("Add", ["r", "mmb_var__q__bias"], ["y"])]
    m = _model(nodes, [_vi("x", ["B", 32, 64])], [_vi("y", ["B", 32, 4, 16])],
               [_c("mmb_var__q__kernel", w), _c("mmb_var__q__bias", b),
                numpy_helper.from_array(np.array([-1, 32, 4, 16], np.int64), "shape")])
    fu = tb.to_torch(m)
    lins = [mod for mod in fu.modules() if isinstance(mod, torch.nn.Linear)]
    assert len(lins) == 1 and lins[0].bias is not None and lins[0].bias.shape == (64,)
    assert not any(type(mod).__name__ == "OnnxBinaryMathOperation" for mod in fu.modules())
    assert "mmb_var__q__bias" in fu.mmbridge_sources.values()
    x = torch.from_numpy(rng.normal(size=(3, 32, 64)).astype(np.float32))
    ref = (x @ torch.from_numpy(w.astype(np.float32))).reshape(-1, 32, 4, 16) + torch.from_numpy(b.astype(np.float32))
    torch.testing.assert_close(fu(x), ref, rtol=1e-6, atol=1e-5)
    y = fu(x).sum()
    y.backward()
    assert lins[0].bias.grad is not None


def test_fast_calls_keep_hooks_fx_tracing_and_compile(monkeypatch):
    """The converted module's and ConstantElementwise's ``__call__`` (no fx / nn.Module call
    wrappers when nothing needs them) still run hooks, let fx trace the module as a leaf and
    keep torch.compile at 0 graph breaks, with values bit-equal to the unfused module."""
    un, fu = _pair(numeric_model(), monkeypatch=monkeypatch)
    x = _x()
    assert type(fu).__call__ is not torch.fx.GraphModule.__call__  # the fast call is installed
    seen = []
    h1 = fu.register_forward_hook(lambda m, a, out: seen.append("gm"))
    h2 = fu.Max_3.register_forward_hook(lambda m, a, out: seen.append("fused"))
    with torch.no_grad():
        assert _same(fu(x), un(x))
    assert seen == ["fused", "gm"]
    h1.remove()
    h2.remove()
    with torch.no_grad():
        assert _same(fu(x), un(x)) and seen == ["fused", "gm"]
    # fx sees the fused module as a call_module leaf (its tracer patches nn.Module.__call__)
    fx_tracer = torch.fx.Tracer()
    fx_tracer.is_leaf_module = lambda m, qn: isinstance(m, fusions.ConstantElementwise)
    graph = fx_tracer.trace(fu)
    assert [n.op for n in graph.nodes].count("call_module") == 1
    # a bad input fails the same way with and without the fast call
    stock = copy.deepcopy(fu)  # deepcopy rebuilds the GraphModule class: fx's stock __call__
    assert type(stock).__call__ is not type(fu).__call__
    errors = []
    for m in (fu, stock):
        with pytest.raises(RuntimeError) as info:
            m(torch.ones(2, F + 1))
        errors.append(str(info.value))
    assert errors[0] == errors[1]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fu)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    with torch.no_grad():
        assert _same(torch.compile(fu, backend="eager")(x), un(x))


def test_constant_elementwise_with_own_buffers_compiles_after_an_eager_call():
    """A fused chain whose constants are its own buffers caches an ``operator.itemgetter`` on its first
    eager call; dynamo cannot call one, so a module run eagerly and then compiled broke the graph at
    its first node (EfficientNetB0, ConvNeXtTiny and tf-keras RegNetX002 gained 1 break each)."""
    mod = fusions.ConstantElementwise((("mul", 0, False, None, None), ("add", 1, False, None, None)),
                                      slots=(("own", "c0"), ("own", "c1")))
    mod.register_buffer("c0", torch.full((3,), 1 / 255.0))
    mod.register_buffer("c1", torch.tensor([-0.5, 0.0, 0.5]))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = mod
            self.fc = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.pre(x))

    net, x = Net().eval(), torch.rand(4, 3) * 255
    with torch.no_grad():
        want = net(x)  # the eager call that caches the getter
    assert "_getter" in mod.__dict__
    torch._dynamo.reset()
    explained = torch._dynamo.explain(net)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    with torch.no_grad():
        assert torch.equal(torch.compile(net, backend="eager")(x), want)
        assert torch.equal(mod(x), x * mod.c0 + mod.c1)  # the chain itself, as the unfused ops compute it
