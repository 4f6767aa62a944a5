"""Fault injection (issue 15, hardening): bad data and damaged artifacts must give a clear
:class:`~mmbridge.errors.DataError` / :class:`~mmbridge.errors.CacheError` naming the file and
the fix (or be skipped and counted when the user asked), never a silent wrong value or a bare
traceback. Everything is made in ``tmp_path`` with PIL and ``onnx.helper``: no TensorFlow.

The zoo: a 16-bit PNG (grey, grey with a transparent value, RGB), 32-bit and float pixels,
alpha / palette transparency / CMYK, a truncated JPEG, a PNG header claiming 400 Mpx, all-empty
texts; a cached ``model.onnx`` altered without changing its size, a ``meta.json`` without
required keys, a ``meta.json`` whose tolerance was loosened to hide wrong weights, an artifact
without (or with an altered) ``golden.npz``.
"""

from __future__ import annotations

import csv
import json
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

import mmbridge
from mmbridge import BridgeArtifact, CacheError, Tolerance
from mmbridge.artifact import cached_or_build
from mmbridge.cli import build_parser, main
from mmbridge.data import MultimodalDataset, load_image
from mmbridge.errors import DataError, ParityError
from mmbridge.parity import MissingGoldenError, verify
from mmbridge.store import GOLDEN_FILE, META_FILE, MODEL_FILE

LABELS = ("a", "b")


# --------------------------------------------------------------------------------------- helpers
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(path: Path, width: int, height: int, bit_depth: int, colour_type: int, rows: bytes,
         extra: bytes = b"") -> Path:
    """A PNG written byte by byte (Pillow cannot write 16-bit RGB, nor lie about the size)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", zlib.compress(rows))
                     + _chunk(b"IEND", b""))
    return path


def _png16(path: Path, values: np.ndarray, *, rgb: bool = False, transparent: int | None = None) -> Path:
    """16-bit grey (or RGB with three equal channels) PNG of ``values`` [H, W] (uint16)."""
    a = np.asarray(values, dtype=">u2")
    if rgb:
        a = np.repeat(a[..., None], 3, axis=2)
    rows = b"".join(b"\x00" + row.tobytes() for row in a)  # filter 0 per row
    extra = _chunk(b"tRNS", struct.pack(">H", transparent)) if transparent is not None else b""
    return _png(path, values.shape[1], values.shape[0], 16, 2 if rgb else 0, rows, extra)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _folder(root: Path, n: int = 6, texts: dict[int, str] | None = None) -> Path:
    """ids 1..n, each an 8x8 RGB PNG, a text and a numeric column; replace files to inject faults."""
    (root / "images").mkdir(parents=True)
    for i in range(1, n + 1):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / "images" / f"{i}.png")
    texts = texts if texts is not None else {i: f"word{i} thing" for i in range(1, n + 1)}
    _write_csv(root / "text.csv", ["id", "text", "label"], [[i, texts[i], LABELS[i % 2]] for i in range(1, n + 1)])
    _write_csv(root / "numeric.csv", ["id", "x", "label"], [[i, float(i), LABELS[i % 2]] for i in range(1, n + 1)])
    return root


def _replace_image(root: Path, i: int, make) -> Path:
    (root / "images" / f"{i}.png").unlink()
    return make(root / "images")


def _truncated_jpeg(folder: Path, i: int) -> Path:
    rng = np.random.default_rng(0)
    path = folder / f"{i}.jpg"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as im:  # the old up-front check: header + verify() pass
        im.verify()
    return path


def _bomb_png(folder: Path, i: int) -> Path:
    """A valid PNG header claiming 20000 x 20000 = 400 Mpx (over Pillow's 2 x 89.5 Mpx limit)."""
    return _png(folder / f"{i}.png", 20000, 20000, 8, 0, b"\x00" * 16)


# ------------------------------------------------------------------------------- images: depth
RAMP16 = np.array([0, 255, 256, 0x12FF, 0x8000, 0xFF00, 0xFFFF], dtype=np.uint16)
RAMP8 = np.array([0, 0, 1, 18, 128, 255, 255], dtype=np.uint8)  # v >> 8 (round(v / 257) would give 19 for 0x12FF)


def test_16bit_grey_png_is_scaled_by_its_high_byte_exactly(tmp_path):
    img = np.tile(RAMP16, (7, 1))  # 7 x 7: no resize at image_size=7
    out = load_image(_png16(tmp_path / "g16.png", img), 7)
    assert out.dtype == np.uint8 and out.shape == (7, 7, 3)
    assert np.array_equal(out[0, :, 0], RAMP8) and np.array_equal(out[..., 0], out[..., 2])
    # no saturation: a full 16-bit ramp maps onto every 8-bit level once (was: 26 % and more at 255)
    ramp = (np.arange(256 * 256, dtype=np.uint32)).reshape(256, 256).astype(np.uint16)
    grey = load_image(_png16(tmp_path / "ramp.png", ramp), 256)[..., 0]
    assert np.array_equal(grey, (ramp >> 8).astype(np.uint8))
    assert (grey == 255).mean() == pytest.approx(1 / 256)


def test_16bit_grey_and_16bit_rgb_decode_alike(tmp_path):
    """Pillow reads 16-bit RGB PNGs by their high byte; 16-bit grey now does the same."""
    img = np.tile(RAMP16, (7, 1))
    grey = load_image(_png16(tmp_path / "g.png", img), 7)
    rgb = load_image(_png16(tmp_path / "c.png", img, rgb=True), 7)
    assert np.array_equal(grey, rgb)


def test_16bit_grey_transparent_value_is_white(tmp_path):
    img = np.tile(RAMP16, (7, 1))
    out = load_image(_png16(tmp_path / "t.png", img, transparent=0x12FF), 7)[0, :, 0]
    want = RAMP8.copy()
    want[3] = 255
    assert np.array_equal(out, want)


def test_32bit_int_pixels_in_16bit_range_are_scaled_others_refused(tmp_path):
    ok = tmp_path / "i32.png"  # TIFF bytes under a .png name: Pillow goes by the content
    Image.fromarray(np.array([[0, 0x12FF, 65535]], dtype=np.int32), "I").save(ok, format="TIFF")
    assert Image.open(ok).mode == "I"
    assert load_image(ok, 3)[0, :, 0].tolist() == [0, 18, 255]
    bad = tmp_path / "big.png"
    Image.fromarray(np.array([[0, 70000, 5]], dtype=np.int32), "I").save(bad, format="TIFF")
    with pytest.raises(DataError, match=r"big\.png has 32-bit integer pixels.*0\.\.70000"):
        load_image(bad, 3)


def test_float_pixels_refused_naming_file_and_mode(tmp_path):
    path = tmp_path / "f.png"
    Image.fromarray(np.full((4, 4), 0.5, np.float32), "F").save(path, format="TIFF")
    with pytest.raises(DataError, match=r"f\.png has Pillow mode 'F'.*refused rather than clipped"):
        load_image(path, 4)


def test_alpha_palette_transparency_and_cmyk(tmp_path):
    la = tmp_path / "la.png"
    Image.fromarray(np.array([[[0, 0], [0, 255], [100, 128]]], np.uint8), "LA").save(la)
    assert load_image(la, 3)[0, :, 0].tolist() == [255, 0, 177]  # on white: 100*128/255 + 255*127/255
    pal = tmp_path / "p.png"
    p = Image.new("P", (2, 2))  # index 0 (red) transparent, index 1 blue
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.save(pal, transparency=0)
    img = Image.open(pal)
    assert img.mode == "P" and img.info["transparency"] == 0
    assert load_image(pal, 2)[0].tolist() == [[255, 255, 255], [0, 0, 255]]
    cmyk = tmp_path / "c.jpg"
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(cmyk, quality=100)
    assert Image.open(cmyk).mode == "CMYK"
    assert np.abs(load_image(cmyk, 8)[0, 0].astype(int) - [0, 255, 255]).max() <= 2  # cyan


def test_16bit_png_in_a_dataset_item(tmp_path):
    root = _folder(tmp_path / "d")
    _replace_image(root, 2, lambda d: _png16(d / "2.png", np.tile(RAMP16, (7, 1))))
    ds = MultimodalDataset.from_folder(root, modalities=("image", "numeric"), image_size=7)
    assert np.array_equal(ds[ds.ids.index(2)]["image"].numpy()[0, :, 1], RAMP8)


# ------------------------------------------------------------------------ images: up front check
def test_truncated_jpeg_is_refused_up_front_or_skipped(tmp_path):
    root = _folder(tmp_path / "d")
    _replace_image(root, 3, lambda d: _truncated_jpeg(d, 3))
    with pytest.raises(DataError, match=r"(?s)images/ has unreadable image files for: 1 id \[3\].*"
                                        r"id 3: image .*3\.jpg cannot be decoded .*truncated"):
        MultimodalDataset.from_folder(root, modalities=("image", "numeric"))
    ds = MultimodalDataset.from_folder(root, modalities=("image", "numeric"), on_error="skip")
    assert ds.skipped == {"unreadable_image": 1} and 3 not in ds.ids
    assert [int(ds[k]["id"]) for k in range(len(ds))] == [1, 2, 4, 5, 6]  # a full pass, no mid-run failure


def test_decompression_bomb_header_is_a_data_error(tmp_path):
    root = _folder(tmp_path / "d")
    bomb = _replace_image(root, 4, lambda d: _bomb_png(d, 4))
    with pytest.raises(DataError, match=r"image .*4\.png is too large to decode safely .*400000000 pixels"):
        load_image(bomb, 8)
    with pytest.raises(DataError, match=r"(?s)unreadable image files for: 1 id \[4\].*id 4: .*MAX_IMAGE_PIXELS"):
        MultimodalDataset.from_folder(root, modalities=("image", "text"))
    ds = MultimodalDataset.from_folder(root, modalities=("image", "text"), on_error="skip")
    assert ds.skipped == {"unreadable_image": 1} and 4 not in ds.ids


def test_several_bad_images_listed_together(tmp_path):
    root = _folder(tmp_path / "d")
    _replace_image(root, 1, lambda d: _truncated_jpeg(d, 1))
    _replace_image(root, 5, lambda d: _bomb_png(d, 5))
    (root / "images" / "6.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"unreadable image files for: 3 ids \[1, 5, 6\]") as info:
        MultimodalDataset.from_folder(root, modalities=("image",))
    assert info.value.problems == {"unreadable_image": [1, 5, 6]}
    assert all(f"{i}." in str(info.value) for i in (1, 5, 6))


# ------------------------------------------------------------------------------------- texts
def test_all_empty_texts_name_text_csv_and_the_ids(tmp_path):
    root = _folder(tmp_path / "d", texts={i: ("" if i % 2 else "  ") for i in range(1, 7)})
    with pytest.raises(DataError, match=r"text\.csv: the texts of every train id are empty .*6 ids \[1, 2, 3, 4, 5, 6\]"):
        MultimodalDataset.from_folder(root, modalities=("text",))
    # some empty texts are fine (they encode to padding)
    root2 = _folder(tmp_path / "e", texts={i: ("" if i % 2 else "hello") for i in range(1, 7)})
    ds = MultimodalDataset.from_folder(root2, modalities=("text",))
    assert len(ds) == 6 and int(ds[0]["text_mask"].sum()) == 0


# ------------------------------------------------------------------------------------- cache
def _double_model(k: float = 2.0) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [k])
    g = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "double", [x], [y], [two])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _meta(**extra):
    return {"role": "preprocess", "opset": 17,
            "inputs": [{"name": "x", "shape": ["batch", 3], "dtype": "float32", "layout": "NC", "value_range": None}],
            "outputs": [{"name": "y", "shape": ["batch", 3], "dtype": "float32"}], **extra}


def _golden():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    return {"inputs": {"x": x}, "outputs": {"y": 2 * x}}


def _artifact(dest: Path, *, k: float = 2.0, golden: bool = True, name: str = "double", **extra) -> BridgeArtifact:
    meta = dict(_meta(**extra), name=name, fingerprint="d" * 64)
    return BridgeArtifact.write(dest, _double_model(k), meta, _golden() if golden else None)


def _alter_weight_in_place(path: Path) -> None:
    """2.0 -> 2.95 inside model.onnx: same size, different bytes (a bit flip on disk, a bad copy)."""
    data = path.read_bytes()
    two = struct.pack("<f", 2.0)
    assert data.count(two) == 1
    path.write_bytes(data.replace(two, struct.pack("<f", 2.95)))


def _rebuild_hint(text: str) -> bool:
    return "force=True" in text and "--force" in text


def test_same_size_corruption_is_caught_on_a_cache_hit_and_rebuilt(tmp_path, caplog):
    build = lambda: (_double_model(), _meta(), _golden())  # noqa: E731
    art, hit = cached_or_build("double", "c" * 64, build, root=tmp_path)
    size = art.onnx_path.stat().st_size
    _alter_weight_in_place(art.onnx_path)
    assert art.onnx_path.stat().st_size == size
    for check in (True, "size"):  # "size" was the hit check: it now checks the content too
        with pytest.raises(CacheError, match=r"model\.onnx does not match the sha256") as info:
            BridgeArtifact.load(art.path, check=check)
        assert _rebuild_hint(str(info.value))
    with caplog.at_level(logging.WARNING, logger="mmbridge.artifact"):
        art2, hit2 = cached_or_build("double", "c" * 64, build, root=tmp_path)
    assert not hit2 and "unusable and will be rebuilt" in caplog.text
    x = np.ones((1, 3), np.float32)
    assert verify(art2).passed and verify(art2, {"x": x}, reference={"y": 2 * x}).rows[0].max_abs == 0.0
    assert cached_or_build("double", "c" * 64, build, root=tmp_path)[1]  # and then a hit again


def test_meta_json_without_required_keys(tmp_path):
    art = _artifact(tmp_path / "a")
    meta = json.loads((art.path / META_FILE).read_text())
    for key in ("inputs", "name"):
        meta.pop(key)
    (art.path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CacheError, match=r"meta\.json lacks the required key\(s\) \['name', 'inputs'\]") as info:
        BridgeArtifact.load(art.path)
    assert _rebuild_hint(str(info.value))
    with pytest.raises(CacheError, match="lacks the required key"):  # the ORT backend's own loader too
        __import__("mmbridge").to_ort(str(art.path))
    assert main(["verify", str(art.path)]) == 2


def test_cache_entry_without_meta_json_is_rebuilt_and_bad_meta_never_written(tmp_path):
    build = lambda: (_double_model(), _meta(), _golden())  # noqa: E731
    art, _ = cached_or_build("double", "a" * 64, build, root=tmp_path)
    (art.path / META_FILE).unlink()
    art2, hit = cached_or_build("double", "a" * 64, build, root=tmp_path)
    assert not hit and art2.path == art.path and BridgeArtifact.load(art2.path).name == "double"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".trash", ".tmp"))]
    with pytest.raises(CacheError, match=r"lacks the required key\(s\) \['role'\].*fix the code that writes the artifact"):
        BridgeArtifact.write(tmp_path / "bad", _double_model(), {k: v for k, v in _meta(name="n", fingerprint="f").items()
                                                                 if k != "role"})
    assert not (tmp_path / "bad").exists()


def test_meta_json_malformed_specs_and_json(tmp_path):
    art = _artifact(tmp_path / "a")
    meta = json.loads((art.path / META_FILE).read_text())
    meta["inputs"] = [{"name": "x"}]  # no shape
    (art.path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CacheError, match=r"meta\.json is malformed: input spec 'x' is malformed \(KeyError"):
        BridgeArtifact.load(art.path, check=False)
    (art.path / META_FILE).write_text("[1, 2]")
    with pytest.raises(CacheError, match="holds a JSON list, not an object"):
        BridgeArtifact.load(art.path)


def test_tampered_tolerance_in_meta_json_does_not_pass_wrong_weights(tmp_path, capsys):
    loose = Tolerance(100.0, 0.0, "tampered").to_dict()
    wrong = _artifact(tmp_path / "w", k=2.95, tolerance=loose)  # wrong weights, meta.json loosened to hide them
    with pytest.raises(ParityError, match=r"(?s)max_abs=4\.75.*records tolerance .*not trusted from the file"):
        verify(wrong)
    report = verify(wrong, raise_on_failure=False)
    assert not report.passed and report.rows[0].tolerance.atol == 1e-5  # the table's ("onnx", "float32")
    assert main(["verify", str(wrong.path)]) == 1
    assert "verify does not trust from the file" in capsys.readouterr().err
    # the caller may state a tolerance in code: a stricter one on a good artifact is used as given
    good = _artifact(tmp_path / "g", tolerance=loose)
    exact = Tolerance(0.0, 0.0, "exact")
    rows = verify(good, tolerance=exact).rows
    assert rows[0].passed and rows[0].tolerance == exact
    assert main(["verify", str(good.path), "--atol", "0", "--rtol", "0"]) == 0


def test_registered_bridge_states_its_tolerance_in_code(tmp_path):
    """A bridge with documented looser numerics keeps them: from its registration, not its meta.json."""
    import mmbridge
    from mmbridge.registry import bridges

    art = _artifact(tmp_path / "a", k=2.0005, name="faults_documented_loose")  # max_abs 2.5e-3 at x = 5
    assert not verify(art, raise_on_failure=False).passed  # the table (1e-5 + 1e-4 |ref|)
    mmbridge.register_bridge("faults_documented_loose", role="preprocess", input_specs=art.input_specs,
                             tolerance=Tolerance(1e-2, 0.0, "documented"))(lambda: None)
    try:
        report = verify(art)
        assert report.passed and report.rows[0].tolerance.reason == "documented"
    finally:
        bridges.unregister("faults_documented_loose")


def test_missing_golden_is_a_clear_error_with_exit_code(tmp_path, capsys):
    art = _artifact(tmp_path / "a", golden=False)
    assert not (art.path / GOLDEN_FILE).exists()
    with pytest.raises(MissingGoldenError, match=r"golden\.npz is missing") as info:
        verify(art)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, CacheError)
    assert _rebuild_hint(str(info.value)) and "re-export" in str(info.value)
    assert main(["verify", str(art.path)]) == 2
    err = capsys.readouterr().err
    assert "mmbridge verify: error:" in err and "golden.npz is missing" in err and "--force" in err
    assert "Traceback" not in err


def test_altered_or_broken_golden(tmp_path):
    art = _artifact(tmp_path / "a")
    g = art.path / GOLDEN_FILE
    g.write_bytes(g.read_bytes()[:-8] + b"\x00" * 8)
    with pytest.raises(MissingGoldenError, match=r"golden\.npz does not match the sha256"):
        verify(art)
    meta = json.loads((art.path / META_FILE).read_text())
    meta.pop("golden_sha256")  # an artifact written before the golden digest was recorded
    (art.path / META_FILE).write_text(json.dumps(meta))
    g.write_bytes(b"PK not a zip")
    with pytest.raises(MissingGoldenError, match=r"golden\.npz is unreadable"):
        verify(BridgeArtifact.load(art.path))


def test_corrupt_model_on_cli_verify_and_export_has_force(tmp_path, capsys):
    art = _artifact(tmp_path / "a")
    _alter_weight_in_place(art.path / MODEL_FILE)
    assert main(["verify", str(art.path)]) == 2
    err = capsys.readouterr().err
    assert "does not match the sha256" in err and "--force" in err
    args = build_parser().parse_args(["export", "pkg:fn", "--out", str(tmp_path / "o"), "--force"])
    assert args.force is True


@pytest.mark.tf
def test_export_child_does_not_run_modules_planted_in_the_working_directory(tmp_path, monkeypatch):
    """A stray ``filelock.py`` / ``numpy.py`` in the working directory ran inside the export child
    (``python -m`` put the directory first on its path); it now comes after the installed
    packages, and the user's own module there still resolves as a reference."""
    marker = tmp_path / "planted_ran"
    for name in ("filelock", "numpy"):
        (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write({name!r})\nraise ImportError('planted')\n")
    (tmp_path / "user_bridges.py").write_text(
        "def build():\n"
        "    from mmbridge.export._tf import import_tensorflow\n"
        "    tf = import_tensorflow()\n"
        "    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name='x')])\n"
        "    def f(x):\n"
        "        return x * 2.0\n"
        "    return f\n")
    monkeypatch.chdir(tmp_path)
    art = mmbridge.export("user_bridges:build", cache_dir=tmp_path / "cache")
    assert not marker.exists(), f"planted module ran: {marker.read_text()}"
    x = torch.ones(3, 2)
    torch.testing.assert_close(mmbridge.to_ort(art)(x), x * 2)


@pytest.mark.tf
def test_a_builder_returning_its_own_reference_is_refused_not_recursed(tmp_path, monkeypatch):
    (tmp_path / "loopy_bridges.py").write_text("def build():\n    return 'loopy_bridges:build'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(mmbridge.SpecError, match="lead in a circle"):
        mmbridge.export("loopy_bridges:build", cache_dir=tmp_path / "cache", isolate=False)


def test_ort_branches_of_a_config_get_the_provider_options_that_match_torch(tmp_path):
    """ORT bridges built from a config get the CUDA options of training.deterministic (conv algorithm
    search, TF32) so a rerun on a GPU picks the same kernels and rounds like torch (issue 17)."""
    from mmbridge.train.build import build_component
    from mmbridge.train.distributed import numerics

    art = _artifact(tmp_path / "double")
    for deterministic, search in ((True, "DEFAULT"), (False, "EXHAUSTIVE")):
        opts = numerics(deterministic).ort_cuda_provider_options
        module = build_component({"type": "artifact", "path": str(art.path), "backend": "ort"}, "model.branches.x",
                                 trainable=False, ort_provider_options=opts)
        assert module.session_options["provider_options"] == {"cudnn_conv_algo_search": search, "use_tf32": "0"}
        torch.testing.assert_close(module(torch.ones(2, 3)), torch.full((2, 3), 2.0))  # CPU ignores them


def test_concurrent_copies_into_one_out_dir_all_succeed_and_leave_nothing_behind(tmp_path, monkeypatch):
    """Concurrent `--out` copies raced (4 of 160 failed, a .trash-* folder was left): they are serialised."""
    import concurrent.futures as cf

    from mmbridge.export.exporter import _copy_out

    monkeypatch.setenv("MMBRIDGE_CACHE", str(tmp_path / "cache"))
    art = _artifact(tmp_path / "src")
    out = tmp_path / "out" / "bridge"
    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: _copy_out(art, out), range(32)))
    assert all(r.path == out for r in results)
    assert BridgeArtifact.load(out).meta["onnx_sha256"] == art.meta["onnx_sha256"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["bridge"]  # no .tmp-* / .trash-* left


def test_a_full_cache_disk_names_the_path_and_the_fix_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    import onnx as onnx_mod

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx_mod, "save_model", full)
    with pytest.raises(CacheError, match=r"disk is full.*MMBRIDGE_CACHE") as info:
        _artifact(tmp_path / "cache" / "bridge")
    assert str(tmp_path / "cache" / "bridge") in str(info.value) and info.value.errno == errno.ENOSPC
    assert list((tmp_path / "cache").iterdir()) == []  # no .tmp-* left


@pytest.mark.tf
def test_an_export_killed_with_sigkill_leaves_no_partial_entry_and_the_next_export_works(tmp_path):
    """kill -9 of a process in the middle of an export (TF tracing / writing): the cache holds no
    half-written artifact under a final name, and the same export then succeeds."""
    import signal
    import subprocess
    import sys
    import time

    cache = tmp_path / "cache"
    code = ("import mmbridge; mmbridge.export('mmbridge.baselines.tf_models:image_encoder_32', isolate=False, "
            f"cache_dir={str(cache)!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(8)  # torch + TF loaded, tracing or converting
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    for entry in cache.glob("*") if cache.exists() else []:
        if entry.is_dir() and not entry.name.startswith(".") and entry.name not in ("locks", "refs"):
            BridgeArtifact.load(entry)  # anything under a final name is complete (raises otherwise)
    art = mmbridge.export("mmbridge.baselines.tf_models:image_encoder_32", cache_dir=cache)
    assert BridgeArtifact.load(art.path).meta["onnx_sha256"]
