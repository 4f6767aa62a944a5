"""Transformer fusions (issue 16, item 5; mmbridge/convert/fusions.py, "embedding lookups"): the
fused module computes the values and gradients of the unfused one, bit for bit, and the fusion
happened (module types), on a tiny ONNX graph and on a real Keras graph."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from mmbridge.convert import core as tb
from mmbridge.convert import fusions

N, D = 11, 5  # table rows, width


def _model(nodes, inputs, outputs, inits, opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def keras_take_model(n_add=N, ids_type=TP.INT32):
    """What tf2onnx writes for a Keras 3 ``Embedding`` (``ops.take``): Cast(ids -> float), Less(., 0),
    Add(ids, N), Where, Gather(table, ., axis 0); then a Mul so the table's gradient is not all ones."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Cast", ["ids"], ["idf"], to=TP.FLOAT),
             helper.make_node("Less", ["idf", "zero"], ["neg"]),
             helper.make_node("Add", ["ids", "n"], ["wrapped"]),
             helper.make_node("Where", ["neg", "wrapped", "ids"], ["sel"]),
             helper.make_node("Gather", ["mmb_var__embedding__embeddings", "sel"], ["e"], axis=0),
             helper.make_node("Mul", ["e", "w"], ["y"])]
    np_int = np.int32 if ids_type == TP.INT32 else np.int64
    inits = [numpy_helper.from_array(rng.normal(size=(N, D)).astype(np.float32), "mmb_var__embedding__embeddings"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(n_add, np_int), "n"),
             numpy_helper.from_array(rng.normal(size=(D,)).astype(np.float32), "w")]
    return _model(nodes, [helper.make_tensor_value_info("ids", ids_type, ["B", 7])],
                  [helper.make_tensor_value_info("y", TP.FLOAT, ["B", 7, D])], inits)


def _pair(model, monkeypatch, trainable=True):
    fused = tb.to_torch(model, trainable=trainable)
    monkeypatch.setattr(fusions, "_run_xformer", lambda gm: {})
    unfused = tb.to_torch(model, trainable=trainable)
    monkeypatch.undo()
    return unfused, fused


def _ids(dtype=torch.int32, batch=6):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(-N, N, (batch, 7), generator=g).to(dtype)
    ids[0, :4] = torch.tensor([0, N - 1, -1, -N])  # both ends of both ranges
    ids[1] = 3  # a repeated id: its gradient row sums 7 rows
    return ids


def _kinds(gm):
    return [type(m).__name__ for m in gm.modules()]


@pytest.mark.parametrize("ids_type", [TP.INT32, TP.INT64])
def test_keras_take_becomes_one_embedding_lookup_with_equal_values_and_grads(ids_type, monkeypatch):
    un, fu = _pair(keras_take_model(ids_type=ids_type), monkeypatch)
    assert fu.mmbridge_fusions["embedding"] == 1
    kinds = _kinds(fu)
    assert kinds.count("EmbeddingLookup") == 1
    assert not {"OnnxGather", "OnnxWhere", "OnnxCompare", "Cast"} & set(kinds)  # the wrap nodes are gone
    ids = _ids(torch.int32 if ids_type == TP.INT32 else torch.int64)
    with torch.no_grad():
        torch.testing.assert_close(fu(ids), un(ids), rtol=0, atol=0)
        torch.testing.assert_close(fu(ids[:1]), un(ids[:1]), rtol=0, atol=0)  # another batch size
    # training: same loss, same table gradient (the repeated id's row is a sum of 7 rows; measured equal)
    for m in (un, fu):
        m.zero_grad(set_to_none=True)
        m.train()
        m(ids).pow(2).sum().backward()
    (pu,), (pf,) = list(un.parameters())[:1], list(fu.parameters())[:1]
    assert pu.shape == pf.shape == (N, D)
    torch.testing.assert_close(pf.grad, pu.grad, rtol=0, atol=0)
    assert pf.grad[3].abs().sum() > 0
    # the fused module keeps the weights where they were (only the wrap's two constants go) and survives copies
    assert [k for k, _ in fu.named_parameters()] == [k for k, _ in un.named_parameters()]
    assert set(un.state_dict()) - set(fu.state_dict()) == {"weights.zero", "weights.n"}
    # a state_dict of the unfused module (what an older mmbridge converted) still loads strictly;
    # the dropped constants must hold the graph's values
    fu.load_state_dict(un.state_dict(), strict=True)
    bad = {**un.state_dict(), "weights.n": un.state_dict()["weights.n"] + 1}
    with pytest.raises(RuntimeError, match="'weights.n' is a constant of the ONNX graph that a fusion folded away"):
        fu.load_state_dict(bad, strict=True)
    assert fu.mmbridge_sources.items() <= un.mmbridge_sources.items()
    fu.eval()
    for clone in (copy.deepcopy(fu), pickle.loads(pickle.dumps(fu))):
        with torch.no_grad():
            torch.testing.assert_close(clone(ids), fu(ids), rtol=0, atol=0)


def test_gather_without_the_wrap_keeps_numpy_take_semantics(monkeypatch):
    """A plain Gather(table, ids): negative ids still count from the end, as onnx2torch's indexing."""
    m = keras_take_model()
    nodes = [n for n in m.graph.node if n.op_type in ("Gather", "Mul")]
    nodes[0].input[1] = "ids"
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    un, fu = _pair(m, monkeypatch)
    assert _kinds(fu).count("EmbeddingLookup") == 1
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(fu(ids), un(ids), rtol=0, atol=0)


def test_wrap_with_another_row_count_is_kept(monkeypatch):
    """Where(ids < 0, ids + 10, ids) on an 11-row table is not the table's own wrap: kept, same values."""
    un, fu = _pair(keras_take_model(n_add=N - 1), monkeypatch)
    kinds = _kinds(fu)
    assert kinds.count("EmbeddingLookup") == 1 and "OnnxWhere" in kinds
    ids = _ids()
    ids[ids < -(N - 1)] = 0  # ids + 10 must stay a valid index for the unfused graph
    with torch.no_grad():
        torch.testing.assert_close(fu(ids), un(ids), rtol=0, atol=0)


def test_out_of_range_id_raises(monkeypatch):
    fu = tb.to_torch(keras_take_model(), trainable=True)
    for bad in (N, -N - 1):
        ids = torch.zeros(1, 7, dtype=torch.int32)
        ids[0, 3] = bad
        with pytest.raises(IndexError):
            fu(ids)


def test_embedding_lookup_compiles_without_graph_breaks(monkeypatch):
    fu = tb.to_torch(keras_take_model(), trainable=True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fu)(_ids())
    assert explained.graph_break_count == 0, explained.break_reasons


def test_keras_embedding_export_is_fused_with_equal_values_and_grads(keras, tmp_path, monkeypatch):
    """A real Keras 3 graph (Embedding -> Dense, trainable export): the Cast / Less / Add / Where of
    ``ops.take`` go, and the fused module matches the unfused one bit for bit, forward and backward
    (the export itself checked both against TensorFlow)."""
    import mmbridge

    keras.utils.set_random_seed(0)
    inp = keras.Input((9,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(37, 8)(inp)
    model = keras.Model(inp, keras.layers.Dense(3)(x), name="emb_dense")
    art = mmbridge.export(model, trainable=True, cache_dir=tmp_path)
    assert [n.op_type for n in art.model.graph.node].count("Where") == 1  # the pattern this fusion targets
    un, fu = _pair(art, monkeypatch)
    assert fu.mmbridge_fusions["embedding"] == 1
    assert not {"OnnxGather", "OnnxWhere", "OnnxCompare"} & set(_kinds(fu))
    ids = torch.randint(-37, 37, (4, 9), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    ids[0, :3] = torch.tensor([36, -37, 5])
    ids[1] = 5
    with torch.no_grad():
        torch.testing.assert_close(fu(ids), un(ids), rtol=0, atol=0)
    grads = []
    for m in (un, fu):
        m.train()
        m(ids).pow(2).sum().backward()
        grads.append({k: p.grad for k, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 3
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=0, atol=0)
