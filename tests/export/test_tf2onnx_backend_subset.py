"""A fast representative subset of tf2onnx's own backend tests, run through mmbridge on both backends.

``tools/run_tf2onnx_backend_tests.py`` runs tf2onnx's ``tests/test_backend.py`` (v1.17.0) through
``mmbridge.export`` -> ``to_ort()`` / ``to_torch(trainable=False)`` and records every case in
``docs/tf2onnx_backend.json``. That needs a tf2onnx checkout and ~40 min on 2 cores, so CI runs
this subset: minimal re-statements (our own code, not tf2onnx's file) of cases of that run
covering the op families preprocessing and encoders use, plus every kind of silently-wrong
result the run found (each fixed here, with the case that would fail without the fix).

Every case asserts, on ORT and on torch, TF's shape and dtype and TF's values (bit-equal, or
within the stated atol for float kernels that sum in another order), or a refusal (an
``MMBridgeError``) - and that ``docs/tf2onnx_backend.json`` recorded the same status for the
tf2onnx case it re-states, so the table in docs/ops.md stays backed by what CI measures.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import mmbridge
from mmbridge.errors import MMBridgeError

pytestmark = pytest.mark.tf

RUN_JSON = Path(__file__).resolve().parents[2] / "docs" / "tf2onnx_backend.json"
_rng = np.random.default_rng(0)


def _f(*shape, lo=-3.0, hi=3.0):
    return _rng.uniform(lo, hi, shape).astype(np.float32)


def _i(*shape, lo=-9, hi=9, dtype=np.int32):
    return _rng.integers(lo, hi, shape).astype(dtype)


# (tf2onnx case id in docs/tf2onnx_backend.json, function of tf, inputs, ORT status, torch status, atol)
# status: "exact" | "tolerance" | "refused"
CASES = [
    # silently wrong before this branch: a Loop (tf2onnx's Cumprod) returned its 3 carried values
    ("test_cumprod", lambda tf: lambda x: tf.math.cumprod(x, axis=0), [_f(3, 4, lo=0.5, hi=2.0)],
     "tolerance", "tolerance", 1e-5),
    ("test_cumprod_axis1_reverse", lambda tf: lambda x: tf.math.cumprod(x, axis=1, reverse=True),
     [_f(2, 5, lo=0.5, hi=2.0)], "tolerance", "tolerance", 1e-5),
    # refused with a raw KeyError before: Conv with a weight computed at run time (EyeLike kernel)
    ("test_extract_image_patches#0",
     lambda tf: lambda x: tf.image.extract_patches(x, [1, 3, 3, 1], [1, 2, 2, 1], [1, 1, 1, 1], "VALID"),
     [_f(2, 7, 9, 2)], "exact", "exact", 0),
    ("test_extract_image_patches#1",
     lambda tf: lambda x: tf.image.extract_patches(x, [1, 2, 3, 1], [1, 3, 1, 1], [1, 1, 1, 1], "SAME"),
     [_f(1, 8, 5, 3)], "exact", "exact", 0),
    ("test_conv2d_1_kernel_as_input",
     lambda tf: lambda x, k: tf.nn.conv2d(x, k, strides=[1, 1, 1, 1], padding="VALID"),
     [_f(1, 6, 6, 2), _f(3, 3, 2, 4)], "tolerance", "tolerance", 1e-5),
    # integer and index semantics (fixed on main: floordiv, one_hot, slice -1, NonZero, TopK)
    ("test_floordiv#0", lambda tf: lambda a, b: tf.math.floordiv(a, b),
     [np.array([-7, 7, -1, 5, 0, 9], np.int32), np.array([2, -2, 3, -3, 4, -4], np.int32)], "exact", "exact", 0),
    ("test_floormod", lambda tf: lambda a, b: tf.math.floormod(a, b),
     [np.array([-7, 7, -1, 5, 0, 9], np.int32), np.array([2, -2, 3, -3, 4, -4], np.int32)], "exact", "exact", 0),
    ("test_onehot0#0", lambda tf: lambda i: tf.one_hot(i, 5, on_value=1.0, off_value=0.0),
     [np.array([0, 2, 4, 1], np.int32)], "exact", "exact", 0),
    ("test_topk1", lambda tf: lambda x: tf.math.top_k(x, 3, sorted=True).values, [_f(3, 6)], "exact", "exact", 0),
    ("test_where_with_cond_only#0", lambda tf: lambda x: tf.where(x > 0.0), [_f(3, 4)], "exact", "exact", 0),
    ("test_slice_with_size_is_negative_one", lambda tf: lambda x: tf.slice(x, [0, 2], [-1, -1]), [_f(3, 6)],
     "exact", "exact", 0),
    ("test_strided_slice1", lambda tf: lambda x: x[1:3, ::2, tf.newaxis, -1], [_f(4, 5, 3)], "exact", "exact", 0),
    ("test_gather", lambda tf: lambda x: tf.gather(x, [2, 0, 1, 2], axis=1), [_f(3, 4)], "exact", "exact", 0),
    ("test_gathernd", lambda tf: lambda x: tf.gather_nd(x, [[0, 1], [2, 3]]), [_f(3, 4, 2)], "exact", "exact", 0),
    ("test_scatternd_1d", lambda tf: lambda u: tf.scatter_nd([[1], [3], [0]], u, [6]), [_f(3)], "exact", "exact", 0),
    ("test_tile", lambda tf: lambda x: tf.tile(x, [2, 3]), [_f(2, 3)], "exact", "exact", 0),
    ("test_reshape_dynamic", lambda tf: lambda x: tf.reshape(x, [-1, 6]), [_f(4, 3)], "exact", "exact", 0),
    ("test_concat", lambda tf: lambda a, b: tf.concat([a, b], axis=1), [_f(2, 3), _f(2, 4)], "exact", "exact", 0),
    ("test_split", lambda tf: lambda x: tf.split(x, [1, 2, 2], axis=1)[1], [_f(2, 5)], "exact", "exact", 0),
    ("test_transpose", lambda tf: lambda x: tf.transpose(x, [2, 0, 1]), [_f(2, 3, 4)], "exact", "exact", 0),
    # torch refused these before mmbridge.convert.ops.space_depth: onnx2torch has no SpaceToDepth and only
    # the CRD DepthToSpace (TF's is DCR: a CRD reading would silently permute the channels)
    ("test_space_to_depth", lambda tf: lambda x: tf.nn.space_to_depth(x, 2), [_f(1, 4, 6, 3)], "exact", "exact", 0),
    ("test_depth_to_space", lambda tf: lambda x: tf.nn.depth_to_space(x, 2), [_f(1, 2, 3, 8)], "exact", "exact", 0),
    ("test_space_to_batchnd", lambda tf: lambda x: tf.space_to_batch_nd(x, [2, 2], [[0, 0], [0, 0]]),
     [_f(2, 4, 6, 3)], "exact", "exact", 0),
    # reductions, scans, elementwise
    ("test_reducesum", lambda tf: lambda x: tf.reduce_sum(x, axis=[1], keepdims=True), [_f(3, 5)],
     "tolerance", "tolerance", 1e-5),
    ("test_reducemax", lambda tf: lambda x: tf.reduce_max(x, axis=[0, 1]), [_f(3, 4, 2)], "exact", "exact", 0),
    ("test_argminmax", lambda tf: lambda x: tf.argmax(x, axis=1), [_f(4, 6)], "exact", "exact", 0),
    ("test_cumsum_axis1_reverse_exclusive", lambda tf: lambda x: tf.math.cumsum(x, axis=1, exclusive=True, reverse=True),
     [_f(2, 5)], "tolerance", "tolerance", 1e-5),
    ("test_matrix_band_part", lambda tf: lambda x: tf.linalg.band_part(x, 1, 0), [_f(4, 4)], "exact", "exact", 0),
    # crashed on torch before (torch's reflect pad needs a batch dim): a 2-D reflect / symmetric pad
    ("test_pad_reflect", lambda tf: lambda x: tf.pad(x, [[1, 2], [2, 1]], mode="REFLECT"), [_f(4, 5)],
     "exact", "exact", 0),
    ("test_clip_by_value", lambda tf: lambda x: tf.clip_by_value(x, -1.0, 2.0), [_f(3, 4)], "exact", "exact", 0),
    ("test_round", lambda tf: lambda x: tf.round(x),
     [np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.4, -0.6], np.float32)], "exact", "exact", 0),
    ("test_cast", lambda tf: lambda x: tf.cast(x, tf.int32), [_f(3, 4)], "exact", "exact", 0),
    ("test_softmax", lambda tf: lambda x: tf.nn.softmax(x), [_f(3, 5)], "tolerance", "tolerance", 1e-6),
    ("test_erf", lambda tf: lambda x: tf.math.erf(x), [_f(3, 5)], "tolerance", "tolerance", 1e-6),
    ("test_leaky_relu_float", lambda tf: lambda x: tf.nn.leaky_relu(x, 0.1), [_f(3, 5)], "exact", "exact", 0),
    # conv / pool / matmul / resize (encoders and tf.image)
    ("test_maxpool", lambda tf: lambda x: tf.nn.max_pool2d(x, 3, 2, "SAME"), [_f(1, 7, 7, 2)], "exact", "exact", 0),
    ("test_avgpool", lambda tf: lambda x: tf.nn.avg_pool2d(x, 2, 2, "VALID"), [_f(1, 6, 6, 2)],
     "tolerance", "tolerance", 1e-6),
    ("test_matmul0", lambda tf: lambda a, b: tf.matmul(a, b), [_f(3, 4), _f(4, 5)], "tolerance", "tolerance", 1e-5),
    ("test_einsum", lambda tf: lambda a, b: tf.einsum("bij,bjk->bik", a, b), [_f(2, 3, 4), _f(2, 4, 5)],
     "tolerance", "tolerance", 1e-5),
    ("test_resize_bilinear_half_pixel_centers",
     lambda tf: lambda x: tf.image.resize(x, [7, 5], method="bilinear"), [_f(1, 4, 3, 2)],
     "tolerance", "tolerance", 1e-5),
    ("test_resize_nearest_neighbor", lambda tf: lambda x: tf.image.resize(x, [8, 6], method="nearest"),
     [_f(1, 4, 3, 2)], "exact", "exact", 0),
    ("test_crop_and_resize",
     lambda tf: lambda x: tf.image.crop_and_resize(x, [[0.1, 0.2, 0.8, 0.9]], [0], [3, 4]), [_f(1, 6, 6, 2)],
     "tolerance", "tolerance", 1e-5),
    # refusals the run records (clear mmbridge errors, never a wrong value)
    ("test_where_bool", lambda tf: lambda x: tf.where(x > 0.0, x > 1.0, x < -1.0), [_f(5)],
     "refused", "refused", 0),
    ("test_atrig_ops#0", lambda tf: lambda x: tf.math.sinh(x), [_f(3, 4)], "tolerance", "tolerance", 1e-5),
    ("test_thresholded_relu", lambda tf: lambda x: tf.keras.activations.relu(x, threshold=0.5), [_f(3, 4)],
     "exact", "exact", 0),
]


def _run() -> dict | None:
    return json.loads(RUN_JSON.read_text(encoding="utf-8")) if RUN_JSON.exists() else None


def _recorded(case_id: str) -> dict[str, str] | None:
    """The run's status of exactly this case (static variant), or None."""
    doc = _run()
    for c in doc["cases"] if doc else ():
        if c["id"] == case_id and c["variant"] == "static":
            return c["status"]
    return None


def _family(case_id: str) -> list[dict[str, str]]:
    """Statuses of every case of the same tf2onnx test method (``test_x`` -> ``test_x``, ``test_x#0``, ...)."""
    doc = _run()
    method = case_id.split("#")[0]
    return [c["status"] for c in (doc["cases"] if doc else ()) if c["id"].split("#")[0] == method]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tf2onnx-subset")


@pytest.mark.parametrize("case_id,make,inputs,ort_status,torch_status,atol", CASES, ids=[c[0] for c in CASES])
def test_tf2onnx_case_on_both_backends(tf, cache, case_id, make, inputs, ort_status, torch_status, atol):
    fn = make(tf)
    names = [f"input{i}" for i in range(len(inputs))]
    sig = [tf.TensorSpec(x.shape, tf.as_dtype(x.dtype), name=n) for n, x in zip(names, inputs)]
    want = np.asarray(fn(*[tf.constant(x) for x in inputs]))
    feed = dict(zip(names, inputs))
    export = lambda: mmbridge.export(tf.function(fn, input_signature=sig), sample_inputs=feed, cache_dir=cache,  # noqa: E731
                                     name=case_id.replace("#", "_"))
    if ort_status == "refused":
        with pytest.raises(MMBridgeError):
            export()
        got_status = {"ort": "refused", "torch": "refused"}
    else:
        art = export()
        ins = [torch.from_numpy(x.copy()) for x in inputs]
        got_status = {}
        for backend, expect in (("ort", ort_status), ("torch", torch_status)):
            if expect == "refused":
                with pytest.raises(MMBridgeError):
                    mmbridge.to_torch(art, trainable=False)(*ins) if backend == "torch" else mmbridge.to_ort(art)(*ins)
                got_status[backend] = "refused"
                continue
            mod = mmbridge.to_ort(art) if backend == "ort" else mmbridge.to_torch(art, trainable=False)
            with torch.no_grad():
                out = mod(*ins)
            assert isinstance(out, torch.Tensor), f"{backend}: one output expected, got {type(out).__name__}"
            got = out.numpy()
            assert got.shape == want.shape and got.dtype == want.dtype, (backend, got.shape, got.dtype)
            if expect == "exact":
                np.testing.assert_array_equal(got, want, err_msg=backend)
            else:
                np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=backend)
            got_status[backend] = expect
    recorded = _recorded(case_id)
    if recorded is not None:  # the full run measured the same thing (refusals at any stage count as refused)
        norm = {b: ("refused" if s.startswith("refused") else ("exact" if s == "exact" else s)) for b, s in recorded.items()}
        for b in ("ort", "torch"):
            assert norm[b] != "wrong", f"docs/tf2onnx_backend.json records {case_id} as silently wrong on {b}"
            if got_status[b] == "refused" or norm[b] == "refused":
                assert norm[b] == got_status[b], (b, recorded, got_status)
    for status in _family(case_id):  # a re-statement of one parametrisation: no case of its method is wrong
        assert "wrong" not in status.values(), f"docs/tf2onnx_backend.json records a case of {case_id} as silently wrong"


def test_every_case_id_is_a_case_or_a_method_of_the_run():
    """Each re-stated case names a case of the run (exact id), a test method whose cases the run
    recorded (the run does not record the parameters, so ``test_maxpool`` re-states one of
    ``test_maxpool#0..16``), or a method the run lists as not called (tf2onnx skips it at opset 17):
    a typo in an id would otherwise silently skip the cross-check above."""
    doc = _run()
    if doc is None:
        pytest.skip("docs/tf2onnx_backend.json not generated")
    not_called = set(doc["no_calls"]) | set(doc["skipped_methods"])
    unknown = [cid for cid, *_ in CASES
               if _recorded(cid) is None and not _family(cid) and cid.split("#")[0] not in not_called]
    assert not unknown, f"case ids not in docs/tf2onnx_backend.json: {unknown}"


def test_run_json_records_no_silently_wrong_case_outside_known_owners():
    """The full run (docs/tf2onnx_backend.json) has no silently-wrong case this branch left unowned."""
    if not RUN_JSON.exists():
        pytest.skip("docs/tf2onnx_backend.json not generated")
    doc = json.loads(RUN_JSON.read_text(encoding="utf-8"))
    unowned = [f"{c['id']} [{c['variant']}]" for c in doc["cases"]
               if "wrong" in c["status"].values() and not c.get("owner")]
    assert not unowned, f"silently wrong with no owner: {unowned}"
