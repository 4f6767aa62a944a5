"""The training contract: the weight audit (mmbridge.convert.contract) and train parity
(mmbridge.export.contract) on tiny Keras models, and that each check can fail."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mmbridge
from mmbridge.convert.contract import audit

sys.path.insert(0, str(Path(__file__).parent))
from test_trainable import _cnn, _mlp, _transformer  # noqa: E402

pytestmark = pytest.mark.tf


def _batches(model, name, steps=3, batch=8, seed=0, ints=None):
    rng = np.random.default_rng(seed)
    shape = (batch,) + tuple(model.inputs[0].shape[1:])
    if ints:
        return [{name: rng.integers(0, ints, size=shape).astype(np.int32)} for _ in range(steps)]
    return [{name: rng.normal(size=shape).astype(np.float32)} for _ in range(steps)]


@pytest.fixture(scope="module")
def exported(keras, tmp_path_factory):
    from mmbridge.export.contract import keras_inventory

    cache = tmp_path_factory.mktemp("contract")
    out = {}
    for build, kw in ((_cnn, {}), (_mlp, {"dropout": 0.3}), (_transformer, {})):
        model = build(keras, **kw)
        specs = [mmbridge.TensorSpec("tokens", ("batch", 12), "int32", value_range=(0, 49))] \
            if build is _transformer else None
        art = mmbridge.export(model, trainable=True, cache_dir=cache, input_specs=specs)
        out[build.__name__] = (model, art, keras_inventory(model))
    return out


@pytest.mark.parametrize("name", ["_cnn", "_mlp", "_transformer"])
def test_audit_passes_and_counts_match_keras(exported, name):
    model, art, inv = exported[name]
    report = audit(art.to_torch(), inv)
    assert report.passed, report.problems
    n_keras = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert report.keras_trainable_values == report.torch_trainable_values == n_keras
    assert len(report.matched) == len(model.weights)


def test_audit_names_a_frozen_weight_an_extra_parameter_and_a_lost_dropout(exported):
    _, art, inv = exported["_cnn"]
    tm = art.to_torch()
    key = next(k for k, src in tm.mmbridge_sources.items() if "dense" in src and "kernel" in src)
    dict(tm.named_parameters())[key].requires_grad_(False)
    tm.register_parameter("stray", torch.nn.Parameter(torch.ones(3)))
    for parent in tm.modules():
        for child_name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Dropout):
                setattr(parent, child_name, torch.nn.Identity())
    report = audit(tm, inv)
    assert not report.passed
    text = "\n".join(report.problems)
    assert "dense" in text and "requires_grad=False" in text
    assert "'stray'" in text and "has no Keras variable" in text
    assert "Dropout layer(s)" in text and "rate 0.5" in text
    with pytest.raises(mmbridge.ConversionError, match="training contract"):
        report.raise_if_failed("bridge 'cnn'")


def test_audit_of_an_inference_export_finds_the_folded_batchnorm(keras, tmp_path):
    from mmbridge.export.contract import keras_inventory

    model = _cnn(keras)
    art = mmbridge.export(model, cache_dir=tmp_path)  # inference: BatchNorm folded, Dropout dropped
    report = audit(art.to_torch(), keras_inventory(model))
    assert not report.passed
    assert any("moving_mean" in p and "no torch tensor" in p for p in report.problems)


@pytest.mark.parametrize("name", ["_cnn", "_mlp", "_transformer"])
def test_train_parity_three_sgd_steps_within_the_float32_floor(exported, name):
    from mmbridge.export.contract import train_parity

    model, art, inv = exported[name]
    before = [np.array(w.numpy()) for w in model.weights]
    inp = art.input_specs[0].name
    report = train_parity(model, art.to_torch(), _batches(model, inp, ints=50 if name == "_transformer" else None),
                          input_names=[inp], inventory=inv)
    assert report.passed, report.first_failure()
    assert len(report.rows) == len(model.weights)
    assert max(r.moved for r in report.rows) > 1e-3  # the steps really moved the weights
    assert all(r.max_abs <= r.tolerance for r in report.rows)
    for w, b in zip(model.weights, before):  # the Keras model is left as it was
        np.testing.assert_array_equal(w.numpy(), b)


def test_train_parity_fails_on_a_wrong_batchnorm_momentum(exported):
    """The comparison can fail: a torch BatchNorm with another momentum diverges in its moving mean."""
    from mmbridge.export.contract import train_parity

    model, art, inv = exported["_cnn"]
    tm = art.to_torch()
    bn = next(m for m in tm.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    bn.momentum = 0.5
    inp = art.input_specs[0].name
    report = train_parity(model, tm, _batches(model, inp), input_names=[inp], inventory=inv)
    assert not report.passed
    assert "moving_mean" in report.first_failure() or "moving_variance" in report.first_failure()
    with pytest.raises(mmbridge.ParityError, match="training parity failed"):
        report.raise_if_failed("bridge 'cnn'")
