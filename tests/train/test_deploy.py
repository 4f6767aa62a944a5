"""mmbridge export-model / Run.export_onnx: one ONNX graph, raw inputs -> logits, plain onnxruntime.

Fast tests use a native run and small hand-built ORT branches; the demo test (ORT preprocessing +
converted Keras encoder + native text/numeric + attention fusion) is ``slow``/``tf``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mmbridge.errors import ConfigError
from tests.train.test_predict import _native_config, _train

REPO = Path(__file__).resolve().parents[2]
SERVE = REPO / "examples" / "serve_onnx.py"


@pytest.fixture(scope="module")
def native_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("native") / "run"
    _train(_native_config(out))
    return out


def _serve_without_mmbridge(folder: Path, *extra: str) -> subprocess.CompletedProcess:
    """examples/serve_onnx.py in a fresh interpreter that proves it never imported mmbridge or torch."""
    code = textwrap.dedent(f"""
        import runpy, sys
        sys.argv = ["serve_onnx.py", {str(folder)!r}, *{list(extra)!r}]
        try:
            runpy.run_path({str(SERVE)!r}, run_name="__main__")
        except SystemExit as e:
            rc = e.code
        print("LEAKED", sorted(m for m in sys.modules if m.split(".")[0] in ("mmbridge", "torch")))
        raise SystemExit(rc)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")


def test_native_run_exports_one_graph_with_parity_and_a_dynamic_batch(native_run, tmp_path):
    import onnx

    import mmbridge

    run = mmbridge.load_run(native_run)
    info = run.export_onnx(tmp_path / "dep" / "model.onnx", repeats=3)
    assert info["parity"]["max_abs_diff"] < 1e-4 and info["parity"]["rows"] == 20
    assert info["top1_agreement"] == 1.0 and info["size_mib"] > 0 and info["latency_ms_per_batch"] > 0
    assert info["inputs"]["image"] == {"dtype": "uint8", "shape": ["batch", 32, 32, 3]}
    assert info["inputs"]["text"]["dtype"] == "int64" and info["inputs"]["numeric"]["dtype"] == "float32"
    saved = json.loads((tmp_path / "dep" / "deploy.json").read_text())
    assert saved["label_names"] == run.label_names and saved["tokenizer"]["kind"] == "word"
    g = onnx.load(str(tmp_path / "dep" / "model.onnx"))
    assert [i.name for i in g.graph.input] == ["image", "text", "text_mask", "numeric"]
    # any batch size: 3 rows through onnxruntime (via mmbridge.runtime, the one place it is imported)
    from mmbridge.runtime.session import make_session

    sample = np.load(tmp_path / "dep" / "sample_inputs.npz")
    feeds = {k: sample[k][:3] for k in ("image", "text", "text_mask", "numeric")}
    got = make_session(str(tmp_path / "dep" / "model.onnx")).run(["logits"], feeds)[0]
    assert got.shape == (3, 4) and np.abs(got - sample["expected_logits"][:3]).max() < 1e-4
    proc = _serve_without_mmbridge(tmp_path / "dep", "--bench", "8")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "LEAKED []" in proc.stdout and "ok, atol" in proc.stdout and "ms per batch of 8" in proc.stdout


def test_export_model_cli(native_run, tmp_path, capsys):
    from mmbridge.cli import main

    assert main(["export-model", str(native_run), "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert '"max_abs_diff"' in out and (tmp_path / "d" / "model.onnx").is_file()


def _ort_linear(in_dim: int, out_dim: int, name: str, seed: int = 0):
    """A small ONNX graph x [B, in] float -> relu(x @ W) [B, out], as an onnxruntime module."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import mmbridge

    w = np.random.default_rng(seed).standard_normal((in_dim, out_dim)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", out_dim])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return mmbridge.to_ort(model)


def test_ort_encoder_and_ort_preprocess_branches_are_merged_as_onnx():
    import mmbridge
    from mmbridge import Branch
    from mmbridge.runtime.session import make_session
    from mmbridge.train.deploy import build_graph

    torch.manual_seed(0)
    model = mmbridge.compose({
        "a": Branch(_ort_linear(5, 7, "enc_a"), trainable=False, out_dim=7),                 # ORT encoder
        "b": Branch(nn.Linear(6, 8), preprocess=_ort_linear(4, 6, "pre_b", 1), out_dim=8),  # ORT preprocess
        "c": Branch(_ort_linear(3, 4, "enc_c", 2), preprocess=_ort_linear(3, 3, "pre_c", 3),
                    trainable=False, out_dim=4),                                           # both on ORT
    }, fusion="gated", num_classes=3, fusion_dim=16).eval()
    batch = {"a": torch.randn(4, 5), "b": torch.randn(4, 4), "c": torch.randn(4, 3)}
    graph = build_graph(model, batch)
    assert sorted(i.name for i in graph.graph.input) == ["a", "b", "c"]
    x = {k: torch.randn(9, v.shape[1]) for k, v in batch.items()}
    got = make_session(graph).run(["logits"], {k: v.numpy() for k, v in x.items()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(got - ref).max() < 1e-5


def test_a_torch_preprocess_in_front_of_an_ort_encoder_is_refused_by_name():
    import mmbridge
    from mmbridge import Branch
    from mmbridge.train.deploy import build_graph

    model = mmbridge.compose({"img": Branch(_ort_linear(5, 7, "enc"), preprocess=nn.Identity(), trainable=False,
                                            out_dim=7)}, num_classes=2, fusion_dim=8)
    with pytest.raises(ConfigError, match=r"branch 'img' runs a torch preprocessing module .* onnxruntime encoder"):
        build_graph(model, {"img": torch.randn(2, 5)})


def test_a_part_torch_onnx_export_cannot_trace_is_refused_with_the_exporters_words():
    import mmbridge
    from mmbridge import Branch
    from mmbridge.train.deploy import build_graph

    class Untraceable(nn.Module):
        out_dim = 4

        def forward(self, x):
            return torch.fft.fft(x).real[:, :4]  # no ONNX export for aten::fft_fft in the TorchScript exporter

    model = mmbridge.compose({"s": Branch(Untraceable(), out_dim=4)}, num_classes=2, fusion_dim=8)
    with pytest.raises(ConfigError, match=r"torch.onnx.export could not trace the torch part .*\['s'\]"):
        build_graph(model, {"s": torch.randn(2, 6)})


@pytest.mark.tf
@pytest.mark.slow
def test_the_demo_model_deploys_as_one_graph(tmp_path):
    if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("tf2onnx") is None:
        pytest.skip("TensorFlow / tf2onnx are not installed (install mmbridge[tf])")
    out = tmp_path / "demo"
    code = textwrap.dedent(f"""
        from mmbridge.cli import main
        rc = main(["demo", "--epochs", "2", "--out", {str(out)!r}])
        rc = rc or main(["export-model", {str(out)!r}, "--out", {str(tmp_path / "deploy")!r}])
        raise SystemExit(rc)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    info = json.loads((tmp_path / "deploy" / "deploy.json").read_text())
    assert info["parity"]["max_abs_diff"] < 1e-4 and info["top1_agreement"] == 1.0
    assert info["inputs"]["image"]["dtype"] == "uint8"  # the ORT preprocessing is inside the graph
    proc = _serve_without_mmbridge(tmp_path / "deploy")
    assert proc.returncode == 0 and "LEAKED []" in proc.stdout, proc.stdout + proc.stderr


def test_an_ort_encoder_reading_the_mask_the_pooling_uses_gets_it_once():
    import onnx
    from onnx import TensorProto, helper

    import mmbridge
    from mmbridge import Branch
    from mmbridge.runtime.session import make_session
    from mmbridge.train.deploy import build_graph

    nodes = [helper.make_node("Cast", ["m"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Constant", [], ["ax"], value=helper.make_tensor("ax", TensorProto.INT64, [1], [2])),
             helper.make_node("Unsqueeze", ["mf", "ax"], ["mu"]),
             helper.make_node("Mul", ["x", "mu"], ["xm"]), helper.make_node("Relu", ["xm"], ["y"])]
    graph = helper.make_graph(nodes, "masked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 5, 3]),
                                                helper.make_tensor_value_info("m", TensorProto.INT64, ["b", 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 5, 3])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    model = mmbridge.compose({"t": Branch(mmbridge.to_ort(proto), input_keys=("t", "t_mask"), mask_key="t_mask",
                                          trainable=False, out_dim=3)}, num_classes=2, fusion_dim=4).eval()
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    x = {"t": torch.randn(3, 5, 3), "t_mask": mask}
    g = build_graph(model, x)
    assert sorted(i.name for i in g.graph.input) == ["t", "t_mask"]
    got = make_session(g).run(["logits"], {k: v.numpy() for k, v in x.items()})[0]
    with torch.no_grad():
        assert np.abs(got - model(x).numpy()).max() < 1e-5
