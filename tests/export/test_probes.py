"""Probe inputs at export (mmbridge.export.probes): edge values per op, TF vs every backend.

The handler tests disable one of mmbridge's tf2onnx handlers (tf2onnx's own form is then the
silent bug of issue 18) and show that the sample inputs pass, the probes refuse the export naming
the op and the input, and the export passes with the handler."""

from __future__ import annotations

import numpy as np
import pytest

import mmbridge
from mmbridge.errors import ParityError, ProbeError
from mmbridge.export import probes as P
from mmbridge.specs import TensorSpec, Tolerance


def _without_handler(monkeypatch, *ops):
    import mmbridge.export.handlers as handlers

    orig = handlers.tf2onnx_handlers

    def patched(tables=None):
        h, extra = orig(tables)
        return {k: v for k, v in h.items() if k not in ops}, extra

    monkeypatch.setattr(handlers, "tf2onnx_handlers", patched)


def _cases(tf):
    """(TF op, function, sample inputs that pass without the handler, input the probes must name)."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32, name="a"), tf.TensorSpec([None], tf.int32, name="b")])
    def floordiv(a, b):
        return a // b

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="ids")])
    def one_hot(ids):
        return tf.one_hot(ids, 4, on_value=2.0, off_value=-1.0)

    @tf.function(input_signature=[tf.TensorSpec([None, 1], tf.int32, name="idx"), tf.TensorSpec([None], tf.float32, name="upd")])
    def scatter(idx, upd):
        return tf.scatter_nd(idx, upd, [4])

    @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32, name="x"), tf.TensorSpec([2], tf.int32, name="begin"),
                                  tf.TensorSpec([2], tf.int32, name="size")])
    def runtime_slice(x, begin, size):
        return tf.slice(x, begin, size)

    @tf.function(input_signature=[tf.TensorSpec([None, 5, 5], tf.float32, name="x"), tf.TensorSpec([], tf.int64, name="lo"),
                                  tf.TensorSpec([], tf.int64, name="hi")])
    def band(x, lo, hi):
        return tf.linalg.band_part(x, lo, hi)

    return {
        "FloorDiv": (floordiv, {"a": np.array([7, 9], "int32"), "b": np.array([2, 4], "int32")}, "a"),
        "OneHot": (one_hot, {"ids": np.array([0, 3], "int64")}, "ids"),
        "ScatterNd": (scatter, {"idx": np.array([[0], [2]], "int32"), "upd": np.array([1.0, 2.0], "float32")}, "idx"),
        "Slice": (runtime_slice, {"x": np.arange(24, dtype="float32").reshape(4, 6), "begin": np.array([0, 1], "int32"),
                                  "size": np.array([2, 3], "int32")}, "size"),
        "MatrixBandPart": (band, {"x": np.ones((2, 5, 5), "float32"), "lo": np.array(1, "int64"),
                                  "hi": np.array(2, "int64")}, "lo"),
    }


@pytest.mark.tf
@pytest.mark.parametrize("op", ["FloorDiv", "OneHot", "ScatterNd", "Slice", "MatrixBandPart"])
def test_probes_refuse_what_the_samples_miss_and_pass_with_the_handler(tf, tmp_path, monkeypatch, op):
    fn, samples, input_name = _cases(tf)[op]
    art = mmbridge.export(fn, sample_inputs=samples, cache_dir=tmp_path / "fixed")
    rec = art.meta["probes"]
    assert rec["passed"] is True and rec["failed"] == 0 and 2 <= rec["runs"] <= P.MAX_PROBES
    assert any(t.startswith(f"{op} (input {input_name!r})") for t in rec["targets"]), rec["targets"]
    assert rec["skipped"] < rec["runs"]  # something was actually compared

    _without_handler(monkeypatch, op)
    # the samples alone miss the bug: with probes off the broken graph exports (and says so in meta)
    broken = mmbridge.export(fn, sample_inputs=samples, cache_dir=tmp_path / "broken", probes=False)
    assert broken.meta["parity"]["passed"] is True
    assert broken.meta["probes"] == {"passed": None, "skipped": "probes=False"}
    with pytest.raises(ProbeError) as info:
        mmbridge.export(fn, sample_inputs=samples, cache_dir=tmp_path / "probed")
    msg = str(info.value)
    assert f"{op} " in msg and f"via input {input_name!r}" in msg, msg
    assert "TF gives" in msg and "the backend" in msg and "probes=False" in msg
    assert isinstance(info.value, ParityError) and info.value.probes["failed"] >= 1
    assert not list((tmp_path / "probed").glob("*/*/model.onnx"))  # nothing cached


@pytest.mark.tf
def test_floordiv_refusal_shows_the_values(tf, tmp_path, monkeypatch):
    fn, samples, _ = _cases(tf)["FloorDiv"]
    _without_handler(monkeypatch, "FloorDiv")
    with pytest.raises(ProbeError) as info:
        mmbridge.export(fn, sample_inputs=samples, cache_dir=tmp_path)
    msg = str(info.value)
    # -7 // 2: TF -4, tf2onnx's truncating Div -3 (the first probe values of the FloorDiv row)
    assert "a = [-7, 7, -1, 5" in msg and "b = [2, -2, 3, -3" in msg
    assert "TF gives [-4, -4, -1, -2" in msg and "the backend [-3, -3, 0, -1" in msg


@pytest.mark.tf
def test_bfloat16_cast_exported_as_float16_is_refused(tf, tmp_path, monkeypatch):
    """tf2onnx maps TF bfloat16 to float16; the exporter's dtype patch fixes it. Without the patch
    the samples (exact in both formats) pass and the bf16 Cast probe values refuse it."""
    import contextlib

    import mmbridge.export.exporter as exporter

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
    def bf16_round_trip(x):
        return tf.cast(tf.cast(x, tf.bfloat16), tf.float32) * 2.0

    samples = {"x": np.array([[0.5, 1.0, 2.0], [0.25, -1.0, 4.0]], np.float32)}
    art = mmbridge.export(bf16_round_trip, sample_inputs=samples, cache_dir=tmp_path / "fixed")
    assert art.meta["probes"]["passed"] is True and "Cast (input 'x')" in art.meta["probes"]["targets"]
    monkeypatch.setattr(exporter, "_bfloat16_is_bfloat16", contextlib.nullcontext)
    # the multi-shape check (random samples at other sizes, mmbridge.export.backends) refuses this graph
    # too, and runs first; without its extra shapes, the probes alone must refuse it
    import mmbridge.export.backends as backends

    monkeypatch.setattr(backends, "plan_shapes", lambda *a, **k: [])
    with pytest.raises(ProbeError) as info:
        mmbridge.export(bf16_round_trip, sample_inputs=samples, cache_dir=tmp_path / "broken")
    msg = str(info.value)
    # 1 + 2^-8 is a bfloat16 tie (-> 1.0, times 2: 2.0); float16 keeps it (2.0078125)
    assert "Cast 'Cast' via input 'x'" in msg and "x = [1.003906, 1.000977, 70000.0" in msg
    assert "TF gives [2.0, 2.0, 140288.0" in msg, msg


@pytest.mark.tf
def test_probe_is_skipped_and_recorded_where_tensorflow_raises(tf, tmp_path):
    table = tf.constant(np.arange(10, dtype=np.float32).reshape(5, 2))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32, name="ids")])
    def lookup(ids):
        return tf.gather(table, ids)

    art = mmbridge.export(lookup, sample_inputs={"ids": np.array([0, 4], "int32")}, cache_dir=tmp_path)
    rec = art.meta["probes"]
    assert rec["passed"] is True and rec["skipped"] >= 1
    skipped = [p for p in rec["probes"] if p["status"] == "skipped"]
    assert any("gather indices negative / out of range" == p["cases"]["ids"] for p in skipped), skipped
    assert all(p["reason"].startswith("TensorFlow raised InvalidArgumentError") for p in skipped)
    assert any("not in [0, 5)" in p["reason"] for p in skipped), skipped
    passed = [p for p in rec["probes"] if p["status"] == "passed"]
    assert any(p["cases"]["ids"] == "gather indices at the ends" for p in passed)


@pytest.mark.tf
def test_nan_and_inf_positions_count_as_equal(tf, tmp_path):
    """log of the generic probes (-0.5, 0, -0.0) gives NaN and -inf on both sides: no refusal."""

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
    def logs(x):
        return tf.math.log(x) * 2.0

    art = mmbridge.export(logs, sample_inputs={"x": np.full((2, 3), 0.5, np.float32)}, cache_dir=tmp_path)
    rec = art.meta["probes"]
    assert rec["passed"] is True and rec["skipped"] == 0 and rec["runs"] >= 3


# ---- no false refusals on ordinary models -----------------------------------------------------
@pytest.mark.tf
def test_no_false_refusal_on_a_small_cnn(keras, tmp_path):
    keras.utils.set_random_seed(0)
    inp = keras.Input((None, None, 3), name="image")
    x = keras.layers.Rescaling(1 / 255)(inp)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="gelu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3, activation="softmax")(x)
    model = keras.Model(inp, out)
    spec = [TensorSpec("image", ("batch", "h", "w", 3), "float32", "NHWC", value_range=(0, 255))]
    sample = {"image": np.random.default_rng(0).uniform(0, 255, (2, 12, 10, 3)).astype(np.float32)}
    art = mmbridge.export(model, input_specs=spec, sample_inputs=sample, cache_dir=tmp_path)
    rec = art.meta["probes"]
    assert rec["passed"] is True and rec["skipped"] == 0
    assert {tuple(p["shape"]["image"]) for p in rec["probes"]} == {(2, 12, 10, 3), (1, 7, 6, 3)}


@pytest.mark.tf
def test_no_false_refusal_on_a_transformer_block(keras, tmp_path):
    keras.utils.set_random_seed(0)
    ids = keras.Input((None,), dtype="int32", name="token_ids")
    x = keras.layers.Embedding(20, 8)(ids)
    att = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(x, x)
    x = keras.layers.LayerNormalization()(x + att)
    ff = keras.layers.Dense(8)(keras.layers.Dense(16, activation="gelu")(x))
    x = keras.layers.LayerNormalization()(x + ff)
    out = keras.layers.GlobalAveragePooling1D()(x)
    model = keras.Model(ids, out)
    spec = [TensorSpec("token_ids", ("batch", "seq"), "int32", "NT", value_range=(0, 19))]
    art = mmbridge.export(model, input_specs=spec, cache_dir=tmp_path)
    rec = art.meta["probes"]
    assert rec["passed"] is True
    assert rec["runs"] - rec["skipped"] >= 2  # in-range ids (value_range ends, zeros) ran at both shapes
    assert any(t.startswith("GatherV2 (input 'token_ids')") or t.startswith("ResourceGather") for t in rec["targets"])


@pytest.mark.tf
@pytest.mark.parametrize("which", ["rescaling_normalization", "resizing_centercrop", "text_vectorization",
                                   "string_lookup", "integer_lookup_hashing", "category_discretization"])
def test_no_false_refusal_on_preprocessing_layers(keras, tf, tmp_path, which):
    L = keras.layers
    if which == "rescaling_normalization":
        norm = L.Normalization(mean=[1.0, 2.0, 3.0], variance=[1.0, 4.0, 9.0])
        layer = keras.Sequential([L.Rescaling(1 / 127.5, offset=-1), norm])
        spec = [TensorSpec("x", ("batch", "h", "w", 3), "float32", "NHWC", value_range=(0, 255))]
    elif which == "resizing_centercrop":
        layer = keras.Sequential([L.Resizing(9, 11), L.CenterCrop(6, 7)])
        spec = [TensorSpec("x", ("batch", "h", "w", 3), "float32", "NHWC", value_range=(0, 255))]
    elif which == "text_vectorization":
        layer = L.TextVectorization(max_tokens=12, output_sequence_length=5)
        layer.adapt(["the quick brown fox", "jumps over the lazy dog", "Hello, World!"])
        spec = [TensorSpec("x", ("batch",), "string")]
    elif which == "string_lookup":
        layer = L.StringLookup(vocabulary=["a", "b", "hello", "é"])
        spec = [TensorSpec("x", ("batch", 2), "string")]
    elif which == "integer_lookup_hashing":
        inp = keras.Input((3,), dtype="int64", name="x")
        looked = L.IntegerLookup(vocabulary=[3, 7, -1, 100])(inp)
        hashed = L.Hashing(num_bins=5)(inp)
        layer = keras.Model(inp, [looked, hashed])
        spec = [TensorSpec("x", ("batch", 3), "int64")]
    else:
        inp = keras.Input((2,), dtype="float32", name="x")
        buckets = L.Discretization(bin_boundaries=[-1.0, 0.0, 0.5, 2.0])(inp)
        encoded = L.CategoryEncoding(num_tokens=5, output_mode="multi_hot")(buckets)
        layer = keras.Model(inp, encoded)
        spec = [TensorSpec("x", ("batch", 2), "float32")]
    art = mmbridge.export(layer, input_specs=spec, cache_dir=tmp_path, role="preprocess")
    rec = art.meta["probes"]
    assert rec["passed"] is True and rec["runs"] >= 2
    assert rec["runs"] - rec["skipped"] >= 2, rec["probes"]


# ---- the plan and the check without TensorFlow: an ONNX graph, numpy reference, fake runners --------
def _onnx_floordiv_as_div():
    """An ONNX graph ``Div(a, b)`` on int32 (what tf2onnx wrote for integer FloorDiv)."""
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Div", ["a", "b"], ["out"], name="div")], "g",
                          [helper.make_tensor_value_info("a", TensorProto.INT32, ["n"]),
                           helper.make_tensor_value_info("b", TensorProto.INT32, ["n"])],
                          [helper.make_tensor_value_info("out", TensorProto.INT32, ["n"])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _specs():
    return [TensorSpec("a", ("batch",), "int32"), TensorSpec("b", ("batch",), "int32")]


def _samples():
    return {"a": np.array([7, 9], np.int32), "b": np.array([2, 4], np.int32)}


def _floor(feeds):
    return {"out": np.floor_divide(feeds["a"], feeds["b"])}


def _trunc(feeds):
    return {"out": (np.trunc(feeds["a"] / feeds["b"])).astype(np.int32)}


def test_plan_targets_the_onnx_op_when_no_graph_def_is_given():
    plan = P.plan_probes(_specs(), _samples(), model=_onnx_floordiv_as_div())
    assert {(t["op"], t["slot"], t["input"]) for t in plan.targets} == {("Div", 0, "a"), ("Div", 1, "b")}
    first = plan.probes[0]
    np.testing.assert_array_equal(first["feeds"]["a"], np.array(P._DIVIDENDS, np.int32))
    np.testing.assert_array_equal(first["feeds"]["b"], np.array(P._DIVISORS, np.int32))
    assert len(plan.probes) <= P.MAX_PROBES
    assert {tuple(p["shape"]["a"]) for p in plan.probes} == {(12,), (1,)}  # grown to hold the row, and size 1
    for p in plan.probes:  # the divisor never gets a 0 (an integer division by 0 may kill the process)
        assert p["feeds"]["b"].shape == p["feeds"]["a"].shape and (p["feeds"]["b"] != 0).all()


def test_run_probes_accepts_any_backend_mapping_and_names_the_failing_one():
    model = _onnx_floordiv_as_div()
    rec = P.run_probes(model, _specs(), _floor, runners={"ort": _floor, "torch": _floor}, samples=_samples())
    assert rec["passed"] is True and rec["failed"] == 0 and rec["runs"] >= 2
    with pytest.raises(ProbeError) as info:
        P.run_probes(model, _specs(), _floor, runners={"ort": _floor, "torch": _trunc}, samples=_samples(), name="fd")
    msg = str(info.value)
    assert "'fd'" in msg and "Div 'div' via input 'a'" in msg and "torch output 'out'" in msg and "ort output" not in msg
    assert info.value.report is not None and {r.backend for r in info.value.report.rows} == {"torch"}


def test_a_backend_that_raises_where_tf_gives_a_value_is_recorded_or_refused(caplog):
    def broken(feeds):
        if (feeds["a"] < 0).any():
            raise RuntimeError("kernel not implemented")
        return _floor(feeds)

    with caplog.at_level("WARNING", logger="mmbridge.export"):
        rec = P.run_probes(_onnx_floordiv_as_div(), _specs(), _floor, runners={"torch": broken}, samples=_samples())
    raised = [p for p in rec["probes"] if p["status"] == "backend_raised"]
    assert rec["passed"] is True and rec["backend_raised"] == len(raised) >= 1
    assert raised[0]["reason"].startswith("torch raised RuntimeError: kernel not implemented where TensorFlow gives")
    assert "a backend raises on an input TensorFlow accepts" in caplog.text
    with pytest.raises(ProbeError, match="torch raised RuntimeError: kernel not implemented where TensorFlow gives"):
        P.run_probes(_onnx_floordiv_as_div(), _specs(), _floor, runners={"torch": broken}, samples=_samples(),
                     refuse_backend_errors=True)


def test_probes_where_the_reference_raises_are_skipped_not_failed():
    def picky(feeds):
        if (feeds["a"] < 0).any():
            raise ValueError("negative")
        return _floor(feeds)

    rec = P.run_probes(_onnx_floordiv_as_div(), _specs(), picky, runners={"ort": _trunc}, samples=_samples(),
                       raise_on_failure=False)
    skipped = [p for p in rec["probes"] if p["status"] == "skipped"]
    assert skipped and all(p["reason"] == "TensorFlow raised ValueError: negative" for p in skipped)
    # truncation equals floor on the non-negative probes: those pass; none failed for lack of a reference
    assert rec["skipped"] == len(skipped) and all(p["status"] in ("passed", "skipped") for p in rec["probes"])


def test_probe_tolerance_keeps_a_relative_term_for_large_values():
    tol = Tolerance(1e-3, 0.0, "bilinear weights")
    assert P._probe_tolerance(tol, "ort").rtol == mmbridge.parity.tolerance_for("onnx", "float32").rtol
    assert P._probe_tolerance(tol, "ort").atol == 1e-3
    assert P._probe_tolerance(None, "torch") is None


def test_shape_of_an_input_cuts_the_value_walk():
    """``Shape(x) // 2`` depends on x's shape, not its values: x gets no FloorDiv values (only the
    second shape probes it), while an input whose values reach FloorDiv does."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Div", ["s", "two"], ["h"], name="half"),
             helper.make_node("Div", ["k", "two"], ["q"], name="kq")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"]),
                                       helper.make_tensor_value_info("k", TensorProto.INT64, ["n"])],
                          [helper.make_tensor_value_info("h", TensorProto.INT64, [1]),
                           helper.make_tensor_value_info("q", TensorProto.INT64, ["n"])],
                          [helper.make_tensor("two", TensorProto.INT64, [], [2])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    specs = [TensorSpec("x", ("n",), "float32"), TensorSpec("k", ("n",), "int64")]
    plan = P.plan_probes(specs, {"x": np.zeros(3, np.float32), "k": np.zeros(3, np.int64)}, model=model)
    assert {(t["node"], t["input"]) for t in plan.targets} == {("kq", "k")}


def test_register_probe_rule_adds_a_row(monkeypatch):
    monkeypatch.setattr(P, "PROBE_RULES", list(P.PROBE_RULES))
    rule = P.register_probe_rule(P.ProbeRule(("Div",), 0, lambda ctx: [("my values", [41, -41])], "mine"))
    assert P.PROBE_RULES[-1] is rule
    plan = P.plan_probes(_specs(), _samples(), model=_onnx_floordiv_as_div())
    assert any(p["cases"]["a"] == "my values" for p in plan.probes)
    with pytest.raises(TypeError, match="expected a ProbeRule"):
        P.register_probe_rule(("Div", 0))


def test_probes_option_is_part_of_the_fingerprint():
    from mmbridge.export.options import ExportOptions

    on, off = ExportOptions(), ExportOptions(probes=False)
    assert on.probes is True and on.stable_hash() != off.stable_hash()
    assert ExportOptions.from_dict(off.to_dict()) == off
    with pytest.raises(mmbridge.SpecError, match="probes='no': must be True or False"):
        ExportOptions(probes="no")


@pytest.mark.tf
def test_a_torch_runner_plugs_in_beside_ort(tf, tmp_path):
    """run_probes takes any backend mapping: the converted torch module of a FloorDiv artifact
    passes the probes of its ONNX graph (Mod / Sub / Div: the Div row targets it), TF as reference."""
    import onnx
    import torch

    fn, samples, _ = _cases(tf)["FloorDiv"]
    art = mmbridge.export(fn, sample_inputs=samples, cache_dir=tmp_path)
    module = mmbridge.to_torch(art, trainable=False)

    def run_torch(feeds):
        with torch.no_grad():
            out = module(*[torch.from_numpy(np.ascontiguousarray(feeds[s.name])) for s in art.input_specs])
        return {art.output_names[0]: out.numpy()}

    from mmbridge.export.exporter import ort_runner

    model = onnx.load(art.onnx_path)
    specs = [TensorSpec.from_dict(d) for d in art.meta["tf_inputs"]]
    rec = P.run_probes(model, specs, fn, runners={"ort": ort_runner(model), "torch": run_torch},
                       out_keys=art.output_names, samples=samples)
    assert rec["passed"] is True and rec["failed"] == 0 and rec["runs"] - rec["skipped"] >= 2
    assert any(t.startswith("Div (input 'b')") for t in rec["targets"]), rec["targets"]


@pytest.mark.tf
def test_a_torch_converter_wrong_on_probe_values_is_recorded_and_to_torch_refuses(tf, tmp_path):
    """The probes also run on the ``to_torch`` module when export verified it on the samples and
    shapes: a ``Mod`` converter that truncates (``torch.fmod``) is right on the positive samples and
    wrong on the probes' negatives. onnxruntime is right, so the export succeeds; the torch record
    says why, and ``to_torch`` refuses the artifact."""
    import torch

    from mmbridge.convert.ops import op_converters
    from mmbridge.errors import ConversionError

    class FMod(torch.nn.Module):
        def forward(self, a, b):
            return torch.fmod(a, b)

    fn, samples, _ = _cases(tf)["FloorDiv"]  # the handler writes Div(a - Mod(a, b), b)
    old = op_converters.find("Mod", 13)
    op_converters.register("Mod", lambda node, graph: FMod(), since_version=13, override=True)
    try:
        art = mmbridge.export(fn, sample_inputs=samples, cache_dir=tmp_path)
    finally:
        op_converters.unregister("Mod", 13)
        if old is not None:
            op_converters.register("Mod", old, since_version=13)
    rec = art.meta["backends"]["torch"]
    assert art.meta["probes"]["passed"] is True  # onnxruntime: exact on every probe
    assert rec["converts"] is True and rec["matches"] is False and "probe input differs" in rec["reason"], rec
    assert art.meta["probes"]["torch"]["passed"] is False and art.meta["backend"]["torch_backend"] is False
    with pytest.raises(ConversionError, match="probe input differs"):
        art.to_torch()


def test_a_probe_refusal_crosses_the_child_process_with_its_record():
    """A path or reference export runs in a child; its ``ProbeError`` comes back as a ``ProbeError``
    with the report and the probe record (it used to come back as a bare message)."""
    import json

    from mmbridge.export._child import main as child_main  # noqa: F401  (the writer side of the format)
    from mmbridge.export.exporter import child_error
    from mmbridge.parity import ParityReport, compare

    rows = compare({"y": np.array([-3, -3])}, {"y": np.array([-4, -4])}, backend="ort", stage="onnx")
    exc = ProbeError("probe failed: FloorDiv via input 'a'", ParityReport(rows), {"passed": False, "failed": 1})
    err = {"type": type(exc).__name__, "message": str(exc), "report": exc.report.to_dict(), "probes": exc.probes}
    back = child_error(json.loads(json.dumps(err)), "pkg.mod:fn")  # through JSON, as the child writes it
    assert type(back) is ProbeError and str(back) == str(exc)
    assert back.probes == {"passed": False, "failed": 1} and not back.report.passed
    assert [r.output for r in back.report.rows] == ["y"]
    parity = child_error({"type": "ParityError", "message": "m", "report": exc.report.to_dict()}, "r")
    assert type(parity) is ParityError and parity.report is not None
    other = child_error({"type": "KeyError", "message": "x"}, "pkg.mod:fn")
    assert type(other).__name__ == "ExportError" and "pkg.mod:fn" in str(other) and "KeyError" in str(other)
