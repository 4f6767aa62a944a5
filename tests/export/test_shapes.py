"""Export checks both backends at several shapes of every symbolic dim (issues 12 item 3, 18 item 1).

* ``CenterCrop(10, 12)`` with dynamic H/W: the multi-shape check catches tf2onnx's truncating
  integer ``FloorDiv`` (disabled here) at 6x7, refuses the export and caches nothing;
* a deliberately wrong torch converter (registered with the registry, restored after): the export
  succeeds on ORT, records ``torch_backend`` false with the reason, and ``to_torch`` refuses;
* ``verify`` truncates no output (extra / missing / tuple-for-a-tensor outputs fail);
* artifacts without the record (written before it) and ``verify=False`` exports keep converting;
* sizes TF refuses are skipped and recorded; "no second size ran" is said in meta.
Every comparison is exact or at the (stage, dtype) table of mmbridge.parity.
"""

from __future__ import annotations

import numpy as np
import pytest

import mmbridge
from mmbridge import BridgeArtifact, ConversionError, ParityError, TensorSpec
from mmbridge.export.shapes import ShapeCase, dynamic_groups, plan_shapes, samples_at, size_targets
from mmbridge.parity import OutputStructureError, compare, module_outputs

IMAGE = [TensorSpec("image", (None, None, None, 3), "float32", "NHWC", (0, 255))]


def _cached_entries(root) -> list:
    return [p for p in root.rglob("meta.json")]


# -- planning (no TF) -------------------------------------------------------------------------
def test_plan_small_is_below_the_targets_and_dims_differ():
    specs = [TensorSpec("image", (None, None, None, 3), "float32"), TensorSpec("ids", ("batch", "seq"), "int32")]
    samples = {"image": np.zeros((2, 8, 8, 3), np.float32), "ids": np.zeros((2, 5), np.int32)}
    groups = dynamic_groups(specs, samples)
    assert [(g.key, g.members, g.base) for g in groups] == [
        ("batch", (("image", 0), ("ids", 0)), 2), ("image[1]", (("image", 1),), 8), ("image[2]", (("image", 2),), 8),
        ("seq", (("ids", 1),), 5)]
    small, odd = plan_shapes(groups, [10, 12])
    assert dict(small.sizes) == {"batch": 1, "image[1]": 6, "image[2]": 7, "seq": 8}
    assert dict(odd.sizes) == {"batch": 3, "image[1]": 9, "image[2]": 11, "seq": 10}
    # without targets: half the base, still distinct per dim and != base
    small, _ = plan_shapes(groups, [])
    assert dict(small.sizes) == {"batch": 1, "image[1]": 4, "image[2]": 5, "seq": 4}
    assert plan_shapes([], [10]) == []


def test_samples_at_keep_dtypes_ranges_and_user_values():
    specs = [TensorSpec("x", (None, None), "float32", value_range=(-3, -2)), TensorSpec("ids", (None, None), "int64"),
             TensorSpec("padding_mask", (None, None), "int32")]
    base = {"x": np.full((2, 4), -2.5, np.float32), "ids": np.array([[3, 7, 7, 3], [7, 3, 3, 7]]),
            "padding_mask": np.ones((2, 4), np.int32)}
    groups = dynamic_groups(specs, base)
    case = ShapeCase("small", {g.key: 1 if g.is_batch else 3 for g in groups})
    shapes = case.shapes(groups, base)
    drawn = samples_at(specs, base, shapes, seed=0, given=False)
    assert drawn["x"].shape == (1, 3) and drawn["x"].dtype == np.float32 and drawn["x"].min() >= -3 and drawn["x"].max() <= -2
    assert drawn["padding_mask"][0, 0] == 1  # a mask row is never all zeros
    user = samples_at(specs, base, shapes, seed=0, given=True)
    assert set(np.unique(user["ids"])) <= {3, 7} and user["ids"].dtype == np.int64  # only ids the user gave
    assert np.all(user["x"] == -2.5)


# -- the crop case -----------------------------------------------------------------------------
def test_center_crop_dynamic_checked_at_several_shapes(keras, tmp_path):
    art = mmbridge.export(keras.layers.CenterCrop(10, 12), input_specs=IMAGE, name="crop", cache_dir=tmp_path)
    ps = art.meta["parity_shapes"]
    assert ps["targets"] == [10, 12]
    assert [c["shapes"]["image"] for c in ps["checked"]] == [[2, 8, 8, 3], [1, 6, 7, 3], [3, 9, 11, 3]]
    assert {g["dim"]: g["sizes"] for g in ps["groups"]} == {"batch": [1, 2, 3], "image[1]": [6, 8, 9],
                                                           "image[2]": [7, 8, 11]}
    assert ps["skipped"] == [] and ps["note"] == ""
    for b in ("ort", "torch"):
        assert art.meta["backends"][b] == {"converts": True, "matches": True, "reason": "", "max_abs": 0.0, "shapes": 3}
    assert art.meta["backend"]["torch_backend"] is True


def test_center_crop_truncating_floordiv_is_caught_and_nothing_cached(keras, tmp_path, monkeypatch):
    """Without mmbridge's FloorDiv handler, tf2onnx's Div truncates: equal to TF at the 8x8 sample
    ((8 - 10) // 2 == -1 either way), wrong at 6x7; the multi-shape check must refuse."""
    from mmbridge.export import handlers

    real = handlers.tf2onnx_handlers

    def without_floordiv(tables=None):
        h, extra = real(tables)
        h.pop("FloorDiv")
        return h, extra

    monkeypatch.setattr(handlers, "tf2onnx_handlers", without_floordiv)
    with pytest.raises(ParityError) as ei:
        mmbridge.export(keras.layers.CenterCrop(10, 12), input_specs=IMAGE, name="crop_trunc", cache_dir=tmp_path)
    msg = str(ei.value)
    assert "onnxruntime at shape 'small'" in msg and "input 'image' axis 1" in msg and "= 6" in msg and "= 7" in msg
    assert "output 'output': shape [1, 2, 2, 3] != reference [1, 2, 3, 3]" in msg
    assert not [r for r in ei.value.report.rows if r.passed and r.output == "output" and r.shape == (1, 2, 3, 3)]
    assert _cached_entries(tmp_path) == []


# -- a wrong torch converter -------------------------------------------------------------------
@pytest.fixture
def wrong_neg():
    """``Neg`` converted to identity: a torch conversion that is silently wrong."""
    import torch

    from mmbridge.convert.ops import op_converters

    old = op_converters.find("Neg", 17)
    op_converters.register("Neg", lambda node, graph: torch.nn.Identity(), since_version=13, override=True)
    try:
        yield
    finally:
        op_converters.unregister("Neg", 13)
        if old is not None:
            op_converters.register("Neg", old, since_version=13)


def _neg_fn(tf):
    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def neg(x):
        return -x * 2.0

    return neg


def test_wrong_torch_conversion_is_recorded_and_to_torch_refuses(tf, tmp_path, wrong_neg):
    art = mmbridge.export(_neg_fn(tf), name="neg", cache_dir=tmp_path)  # ORT is right: the export succeeds
    rec = art.meta["backends"]["torch"]
    assert rec["converts"] is True and rec["matches"] is False and rec["max_abs"] > 1.0
    assert "at the sample shape x [2, 4]: output 'output'" in rec["reason"]
    assert art.meta["backend"]["torch_backend"] is False and art.meta["backends"]["ort"]["matches"] is True
    loaded = BridgeArtifact.load(art.path)
    with pytest.raises(ConversionError) as ei:
        loaded.to_torch()
    assert rec["reason"] in str(ei.value) and "to_ort()" in str(ei.value) and "allow_unverified=True" in str(ei.value)
    with pytest.raises(ConversionError):
        mmbridge.to_torch(str(art.path))  # the directory form reads the same record
    module = loaded.to_torch(allow_unverified=True)  # the documented override
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(module(__import__("torch").from_numpy(x)).numpy(), x * 2.0)  # the wrong Neg, as recorded
    report = mmbridge.verify(loaded, backends=("ort", "torch"), raise_on_failure=False)
    assert [(r.backend, r.passed) for r in report.rows] == [("ort", True), ("torch", False)]
    np.testing.assert_array_equal(loaded.to_ort()(__import__("torch").from_numpy(x)).numpy(), -x * 2.0)


def test_old_artifacts_and_unverified_records_keep_converting(tf, tmp_path):
    art = mmbridge.export(_neg_fn(tf), name="neg_ok", cache_dir=tmp_path)
    assert art.meta["backends"]["torch"]["matches"] is True and art.meta["backend"]["torch_backend"] is True
    old_meta = {k: v for k, v in art.meta.items() if k not in ("backends", "parity_shapes")}  # written before the record
    x = np.ones((3, 4), np.float32)
    import torch

    for meta in (old_meta, dict(art.meta, backends={"torch": {"converts": None, "matches": None,
                                                               "reason": "not checked: exported with verify=False"}})):
        out = BridgeArtifact(art.path, meta).to_torch()(torch.from_numpy(x))
        np.testing.assert_array_equal(out.numpy(), -x * 2.0)
    bad = dict(art.meta, backends={"torch": {"converts": False, "matches": None, "reason": "to_torch fails: X"}})
    with pytest.raises(ConversionError, match="does not convert to torch .*to_torch fails: X"):
        BridgeArtifact(art.path, bad).to_torch()


def test_verify_false_records_the_torch_backend_as_unchecked(tf, tmp_path):
    art = mmbridge.export(_neg_fn(tf), name="neg_nv", cache_dir=tmp_path, verify=False)
    assert art.meta["backends"]["torch"]["matches"] is None and "verify=False" in art.meta["backends"]["torch"]["reason"]
    assert art.meta["backend"]["torch_backend"] is False  # "verified": it was not
    assert art.meta["parity_shapes"]["note"] == "not checked: exported with verify=False"
    art.to_torch()  # not checked is not refused


# -- verify truncates nothing --------------------------------------------------------------------
def test_module_outputs_is_strict():
    import torch

    t = torch.zeros(2)
    assert list(module_outputs(t, ["a"])) == ["a"]
    with pytest.raises(OutputStructureError, match="one tensor expected"):
        module_outputs((t, torch.zeros(2, dtype=torch.int64)), ["values"])  # TopK's (values, indices)
    with pytest.raises(OutputStructureError, match="3 outputs"):
        module_outputs((t, t), ["a", "b", "c"])
    with pytest.raises(OutputStructureError, match="2 outputs"):
        module_outputs((t, t, t), ["a", "b"])
    with pytest.raises(OutputStructureError, match="where a tensor is expected"):
        module_outputs((t, (t, t)), ["a", "b"])
    rows = compare({"a": np.zeros(2), "extra": np.zeros(1)}, {"a": np.zeros(2)}, backend="ort", stage="onnx")
    assert [(r.output, r.passed) for r in rows] == [("extra", False), ("a", True)]


def test_verify_fails_a_module_returning_more_outputs_than_the_graph(tf, tmp_path, monkeypatch):
    import torch

    art = mmbridge.export(_neg_fn(tf), name="neg_tuple", cache_dir=tmp_path)
    real = BridgeArtifact.to_torch

    class ExtraOutput(torch.nn.Module):  # what onnx2torch did for TopK / Split: every output of the node
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *a):
            return self.inner(*a), torch.zeros(1)

    def with_extra_output(self, **kw):
        return ExtraOutput(real(self, **kw))

    monkeypatch.setattr(BridgeArtifact, "to_torch", with_extra_output)
    report = mmbridge.verify(art, backends=("torch",), raise_on_failure=False)
    assert not report.passed and "one tensor expected" in report.rows[0].problem  # was: truncated to the first, passed
    with pytest.raises(ParityError, match="one tensor expected"):
        mmbridge.verify(art, backends=("torch",))


# -- sizes TF or ORT refuse -----------------------------------------------------------------------
def test_a_size_tf_refuses_is_skipped_and_recorded(tf, tmp_path):
    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
    def needs_two_rows(x):
        tf.debugging.assert_greater_equal(tf.shape(x)[0], 2, message="needs >= 2 rows")
        return x + 1.0

    art = mmbridge.export(needs_two_rows, name="two_rows", cache_dir=tmp_path)
    ps = art.meta["parity_shapes"]
    assert [c["shapes"]["x"] for c in ps["checked"]] == [[2, 3], [3, 3]]  # batch 1 refused: batch 3 instead
    assert [s["label"] for s in ps["skipped"]] == ["small"] and ps["skipped"][0]["shapes"] == {"x": [1, 3]}
    assert ps["skipped"][0]["reason"].startswith("TensorFlow refuses this size: InvalidArgumentError")
    assert ps["note"] == "" and art.meta["backends"]["torch"]["shapes"] == 2


def test_no_second_size_is_said_in_meta(tf, tmp_path):
    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
    def batch_of_two(x):
        tf.debugging.assert_equal(tf.shape(x)[0], 2, message="batch 2 only")
        return x * 3.0

    art = mmbridge.export(batch_of_two, name="batch_two", cache_dir=tmp_path)
    ps = art.meta["parity_shapes"]
    assert [c["label"] for c in ps["checked"]] == ["sample"] and [s["label"] for s in ps["skipped"]] == ["small", "odd"]
    assert ps["note"].startswith("no second size ran")


def test_a_size_ort_refuses_is_skipped_not_refused(keras, tmp_path):
    """TF's CPU convolution returns a (1, 4, 5, 2) "valid" 5x5 convolution of a 4x5 image; ORT raises."""
    inp = keras.Input((None, None, 1), name="image")
    model = keras.Model(inp, keras.layers.Conv2D(2, 5, padding="valid")(inp))
    spec = [TensorSpec("image", (None, None, None, 1), "float32", "NHWC")]
    art = mmbridge.export(model, input_specs=spec, name="conv5", cache_dir=tmp_path)
    ps = art.meta["parity_shapes"]
    assert [c["shapes"]["image"] for c in ps["checked"]] == [[2, 8, 8, 1], [3, 9, 11, 1]]
    assert ps["skipped"][0]["shapes"] == {"image": [1, 4, 5, 1]}
    assert ps["skipped"][0]["reason"].startswith("onnxruntime cannot run this size (TensorFlow ran it)")
    assert art.meta["backends"]["torch"]["matches"] is True and art.meta["backends"]["torch"]["shapes"] == 2


def test_size_targets_of_a_resize(keras, tmp_path):
    art = mmbridge.export(keras.layers.Resizing(12, 10), input_specs=IMAGE, name="resize", cache_dir=tmp_path,
                          tolerance=mmbridge.Tolerance(1e-3, 1e-4, "bilinear weights, see test_exporter"))
    assert size_targets(art.model) == [10, 12]
    assert [c["shapes"]["image"] for c in art.meta["parity_shapes"]["checked"]][1] == [1, 6, 7, 3]
    assert art.meta["backends"]["ort"]["matches"] and art.meta["backends"]["ort"]["shapes"] == 3


def test_trainable_export_converts_once(keras, tmp_path, monkeypatch):
    """The backend check's trainable module is the one the training contract audits and trains."""
    from mmbridge.convert import core

    calls = []
    real = core.to_torch
    monkeypatch.setattr(core, "to_torch", lambda *a, **k: calls.append(k) or real(*a, **k))
    inp = keras.Input((4,), name="x")
    model = keras.Model(inp, keras.layers.Dense(3)(keras.layers.BatchNormalization()(inp)))
    art = mmbridge.export(model, name="dense_bn", cache_dir=tmp_path, trainable=True)
    assert calls == [{"trainable": True}]
    assert art.meta["backends"]["torch"]["matches"] is True and art.meta["train_parity"]["passed"] is True

