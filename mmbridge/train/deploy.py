"""One ONNX graph from a trained run: raw inputs -> logits, runnable with plain onnxruntime.

    mmbridge export-model RUN_DIR --out DIR          # DIR/model.onnx + DIR/deploy.json
    mmbridge.load_run(RUN_DIR).export_onnx("model.onnx")

How the graph is made (:func:`export_onnx`):

* the torch part of the model (native branches, converted onnx2torch encoders, torch
  preprocessing, projections, fusion, task head) goes through ``torch.onnx.export`` (the
  TorchScript exporter; the dynamo one needs ``onnxscript``), with a dynamic batch axis;
* an onnxruntime-bridged part (``to_ort()`` preprocessing, and/or a frozen ``to_ort()`` encoder)
  already is ONNX: its graph is prefixed (``onnx.compose.add_prefix``) and merged in front of the
  torch part (``onnx.compose.merge_models``), its input renamed to the batch key it reads;
* the merged graph is checked (``onnx.checker``), run with onnxruntime on held-out rows and
  compared with the torch model in float32 (max abs difference of the logits, default limit
  1e-4; :class:`~mmbridge.errors.ParityError` above it), timed, and written with ``deploy.json``
  (inputs, outputs, label names, parity, size, latency).

Graph inputs are the batch keys with their dataset dtypes: ``image`` uint8 ``[B, H, W, 3]``,
``text`` / ``text_mask`` int64 ``[B, T]``, ``numeric`` float32 ``[B, F]``; output ``logits``
float32 ``[B, C]``. Tokenisation and numeric imputation stay outside the graph (they are the
data layer's; ``deploy.json`` records the tokenizer and the statistics).

Refused, with the branch and the reason (:class:`~mmbridge.errors.ConfigError`): a torch
preprocessing module in front of an onnxruntime encoder (the graph would go torch -> ONNX ->
torch), an onnxruntime module whose source graph is not available, and any branch whose torch
part ``torch.onnx.export`` cannot trace (the exporter's message is kept).
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmbridge.composition.model import HybridModel, is_frozen_module
from mmbridge.errors import ConfigError, ParityError

DEFAULT_ATOL = 1e-4


def _onnx_of(module: nn.Module, where: str) -> Any:
    """The ``onnx.ModelProto`` an onnxruntime module runs."""
    import onnx

    src = getattr(module, "_source", None)
    if isinstance(src, (bytes, bytearray)):
        return onnx.load_from_string(bytes(src))
    if isinstance(src, (str, os.PathLike)) and Path(src).is_file():
        return onnx.load(os.fspath(src))
    raise ConfigError(f"export-model: {where} is an onnxruntime module ({type(module).__name__}) whose ONNX graph is "
                      f"not available (no serialised source); rebuild it with to_ort(artifact) to deploy it")


class _Plan:
    """Per branch: which part is ONNX already (merged) and which torch traces."""

    def __init__(self, model: HybridModel):
        self.onnx_parts: dict[str, Any] = {}  # branch -> ModelProto feeding the torch graph
        self.cut: dict[str, str] = {}  # branch -> "pre" (ONNX = preprocess) | "enc" (ONNX = preprocess + encoder)
        self.in_names: dict[str, list[str]] = {}  # branch -> the ONNX part's inputs in call order (input_specs)
        for name, b in model.branches.items():
            pre, enc = b.preprocess, b.encoder
            pre_ort = pre is not None and is_frozen_module(pre)
            enc_ort = is_frozen_module(enc)
            if enc_ort and pre is not None and not pre_ort:
                raise ConfigError(
                    f"export-model: branch {name!r} runs a torch preprocessing module ({type(pre).__name__}) in front of "
                    f"an onnxruntime encoder; one graph would have to go torch -> ONNX -> torch, which this exporter "
                    f"does not build. Bridge the preprocessing with backend: ort too, or the encoder with backend: torch")
            first = pre if pre_ort else enc
            if pre_ort or enc_ort:
                self.in_names[name] = [s.name for s in first.input_specs]
            if pre_ort and enc_ort:
                self.onnx_parts[name] = _chain(_onnx_of(pre, f"branch {name!r} preprocess"),
                                               _onnx_of(enc, f"branch {name!r} encoder"), name,
                                               [s.name for s in enc.input_specs])
                self.in_names[name] = [f"{name}__p__{n}" for n in self.in_names[name]]
                self.cut[name] = "enc"
            elif enc_ort:
                self.onnx_parts[name] = _onnx_of(enc, f"branch {name!r} encoder")
                self.cut[name] = "enc"
            elif pre_ort:
                self.onnx_parts[name] = _onnx_of(pre, f"branch {name!r} preprocess")
                self.cut[name] = "pre"


def _chain(first: Any, second: Any, name: str, second_inputs: Sequence[str]) -> Any:
    """``second(*first(x))`` as one graph (the outputs of ``first`` in graph order feed
    ``second``'s inputs in call order, as :class:`~mmbridge.composition.Branch` splats them)."""
    import onnx.compose

    a = onnx.compose.add_prefix(first, f"{name}__p__")
    b = onnx.compose.add_prefix(second, f"{name}__e__")
    _align(a, b)
    outs = [o.name for o in a.graph.output]
    ins = [f"{name}__e__{n}" for n in second_inputs]
    if len(outs) != len(ins):
        raise ConfigError(f"export-model: branch {name!r}: the preprocessing graph has {len(outs)} outputs but the "
                          f"encoder graph takes {len(ins)} inputs")
    return onnx.compose.merge_models(a, b, io_map=list(zip(outs, ins)))


def _align(a: Any, b: Any) -> None:
    """Give two models one IR version and one opset per domain (``merge_models`` requires it)."""
    from onnx import helper

    ir = max(a.ir_version, b.ir_version)
    a.ir_version = b.ir_version = ir
    versions: dict[str, int] = {}
    for m in (a, b):
        for op in m.opset_import:
            versions[op.domain] = max(versions.get(op.domain, 0), op.version)
    for m in (a, b):
        del m.opset_import[:]
        m.opset_import.extend(helper.make_opsetid(d, v) for d, v in sorted(versions.items()))


class _TorchPart(nn.Module):
    """The torch side of the deployed graph: positional inputs (see ``names``) -> logits."""

    def __init__(self, model: HybridModel, plan: _Plan, names: Sequence[str]):
        super().__init__()
        self.model = model
        self.plan = plan
        self.names = list(names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        feeds = dict(zip(self.names, inputs))
        m = self.model
        states: dict[str, Any] = {}
        n = None
        for name, b in m.branches.items():
            cut = self.plan.cut.get(name)
            mask = feeds[b.mask_key] if b.mask_key is not None else None
            if cut is None:
                states[name] = b.frozen_forward(feeds)
                first = feeds[b.input_keys[0]]
            elif cut == "pre":
                k = len([x for x in self.names if x.startswith(f"{name}__pre")])
                args = [feeds[f"{name}__pre{i}"] for i in range(k)]
                first = args[0]
                states[name] = {"feat": b.encode(args, mask)} if not b.trainable else {"args": args, "mask": mask}
            else:  # the ONNX part ends after the encoder: pool + projection here
                from mmbridge.composition.model import _pool

                first = feeds[f"{name}__enc"]
                states[name] = {"feat": _pool(first, mask)}
            if n is None:
                n = first.shape[0]  # not int(): the batch axis stays dynamic in the trace
        return m.trainable_stage({"n": n, "branches": states, "masks": {}})


def _torch_inputs(model: HybridModel, plan: _Plan, batch: Mapping[str, torch.Tensor]
                  ) -> tuple[list[str], list[torch.Tensor], dict[str, list[tuple[str, str]]]]:
    """Names and example tensors of the torch graph's inputs, plus per branch the
    ``(ONNX part output, torch input)`` pairs that join them."""
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    links: dict[str, list[tuple[str, str]]] = {}
    seen: set[str] = set()
    for name, b in model.branches.items():
        cut = plan.cut.get(name)
        if cut is None:
            for k in b.input_keys:
                if k not in seen:
                    seen.add(k)
                    names.append(k)
                    tensors.append(batch[k])
            continue
        args = [batch[k] for k in b.input_keys]
        with torch.no_grad():
            out = b.preprocess(*args) if b.preprocess is not None else args
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            if cut == "enc":
                enc_out = b.encoder(*outs)
                outs = [enc_out[0] if isinstance(enc_out, (tuple, list)) else enc_out]
        part = plan.onnx_parts[name]
        part_outs = [o.name for o in part.graph.output]
        tags = [f"{name}__pre{i}" for i in range(len(outs))] if cut == "pre" else [f"{name}__enc"]
        for tag, t, o in zip(tags, outs, part_outs):
            names.append(tag)
            tensors.append(t.detach())
            links.setdefault(name, []).append((o, tag))
        if b.mask_key is not None and b.mask_key not in seen:
            seen.add(b.mask_key)
            names.append(b.mask_key)
            tensors.append(batch[b.mask_key])
    return names, tensors, links


def _rename_input(model: Any, old: str, new: str) -> None:
    for inp in model.graph.input:
        if inp.name == old:
            inp.name = new
    for node in model.graph.node:
        for i, x in enumerate(node.input):
            if x == old:
                node.input[i] = new


def build_graph(model: HybridModel, batch: Mapping[str, torch.Tensor], *, opset: int | None = None) -> Any:
    """The deployed ``onnx.ModelProto`` of ``model`` (eval mode), traced on ``batch``.

    Raises:
        ConfigError: a branch that cannot be put into one graph (see the module doc).
    """
    import onnx
    import onnx.compose

    model.eval()
    plan = _Plan(model)
    names, tensors, links = _torch_inputs(model, plan, batch)
    part_opsets = [op.version for p in plan.onnx_parts.values() for op in p.opset_import if op.domain in ("", "ai.onnx")]
    opset = opset or max([17, *part_opsets])
    wrapper = _TorchPart(model, plan, names).eval()
    buf = io.BytesIO()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # aten::_transformer_encoder_layer_fwd has no ONNX form
    try:
        with torch.no_grad():
            torch.onnx.export(wrapper, tuple(tensors), buf, input_names=names, output_names=["logits"],
                              dynamic_axes={**{k: {0: "batch"} for k in names}, "logits": {0: "batch"}},
                              opset_version=opset, dynamo=False, do_constant_folding=True)
    except Exception as exc:  # noqa: BLE001 - say which part failed, keep the exporter's words
        torch_branches = [n for n in model.branches if plan.cut.get(n) != "enc"]
        raise ConfigError(f"export-model: torch.onnx.export could not trace the torch part of the model (branches "
                          f"{torch_branches}, fusion {type(model.fusion).__name__}, head {type(model.head).__name__}): "
                          f"{type(exc).__name__}: {str(exc)[:800]}") from exc
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    main = onnx.load_from_string(buf.getvalue())
    for name, part in plan.onnx_parts.items():
        b = model.branches[name]
        part = onnx.compose.add_prefix(part, f"{name}__ort__")
        part_ins = [f"{name}__ort__{n}" for n in plan.in_names[name]]  # call order = the branch's input_keys
        if len(part_ins) != len(b.input_keys):
            raise ConfigError(f"export-model: branch {name!r}: its onnxruntime graph takes inputs {part_ins} but the "
                              f"branch reads {list(b.input_keys)}")
        for old, key in zip(part_ins, b.input_keys):
            _rename_input(part, old, key)
        part_links = [(f"{name}__ort__{o}", t) for o, t in links[name]]
        main_ins = {i.name for i in main.graph.input}
        for key in [k for k in b.input_keys if k in main_ins]:
            # a raw input both graphs read (e.g. a token mask the ORT encoder takes and the pooling
            # uses): the ONNX part passes it through, so that the merged graph has it once
            from onnx import helper

            passed = f"{name}__ort__{key}__pass"
            part.graph.node.append(helper.make_node("Identity", [key], [passed]))
            vi = next(i for i in part.graph.input if i.name == key)
            out = part.graph.output.add()
            out.CopyFrom(vi)
            out.name = passed
            part_links.append((passed, key))
        _align(part, main)
        main = onnx.compose.merge_models(part, main, io_map=part_links)
    main.graph.name = "mmbridge_deployed"
    onnx.checker.check_model(main)
    return main


def _numpy_feeds(batch: Mapping[str, torch.Tensor], names: Sequence[str]) -> dict[str, np.ndarray]:
    return {k: batch[k].cpu().numpy() for k in names}


def export_onnx(run: Any, path: str | os.PathLike, *, data: Any = None, atol: float = DEFAULT_ATOL,
                rows: int = 64, latency_batch: int = 32, repeats: int = 20, check: bool = True) -> dict[str, Any]:
    """Write the one-graph ONNX of a loaded run (:func:`mmbridge.train.predict.load_run`).

    Args:
        run: the :class:`~mmbridge.train.predict.Run`.
        path: ``.onnx`` file to write (``deploy.json`` beside it).
        data: held-out rows for the parity check (folder or dataset); default the run's test split.
        atol: the largest max abs difference of the logits accepted (ONNX on onnxruntime vs the
            torch model in float32).
        rows: how many rows the parity check runs; latency_batch / repeats: the timing.
        check: run the parity check and timing (False: only write the graph).

    Returns:
        ``{"path", "size_mib", "inputs", "outputs", "parity": {"max_abs_diff", "rows", "atol"},
        "latency_ms_per_batch", "latency_batch", "top1_agreement", "sample_inputs"}`` (also written
        as ``deploy.json``; ``sample_inputs.npz`` holds 16 held-out raw rows and the torch model's
        logits for them).

    Raises:
        ConfigError: a branch that cannot be put into one graph.
        ParityError: the graph's logits differ from the torch model's by more than ``atol``.
    """
    import onnx
    from torch.utils.data import DataLoader, Subset, default_collate

    model = run.model.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        from mmbridge.train.build import build_data

        try:
            ds = build_data(run.config.data)["test"]
        except Exception:  # noqa: BLE001 - the run's data may not be on this machine
            ds = None
    else:
        ds = run.dataset(data)
    if ds is not None and len(ds) >= 2:
        batch = default_collate([ds[i] for i in range(2)])
    else:
        batch = run.example_batch(2)
    batch = {k: v.to(run.device) for k, v in batch.items() if k != "label"}
    graph = build_graph(model, batch)
    onnx.save(graph, os.fspath(path))
    size_mib = path.stat().st_size / 2**20
    input_names = [i.name for i in graph.graph.input]
    info: dict[str, Any] = {
        "path": str(path), "size_mib": round(size_mib, 3), "inputs": {}, "outputs": ["logits"],
        "label_names": list(run.label_names), "task": run.task, "checkpoint": str(run.checkpoint),
        "tokenizer": run.metadata.get("tokenizer"), "numeric_stats": run.metadata.get("stats"),
        "image_size": run.metadata.get("image_size"), "max_length": run.metadata.get("max_length"),
    }
    for k in input_names:
        t = batch[k]
        info["inputs"][k] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": ["batch", *t.shape[1:]]}
    if check:
        from mmbridge.runtime.session import make_session

        sess = make_session(os.fspath(path))
        if ds is None:
            raise ConfigError("export-model: no held-out rows for the parity check (the run's data is not here); "
                              "pass data=FOLDER (--data) or check=False (--no-check)")
        sub = Subset(ds, range(min(rows, len(ds))))
        worst, agree, count = 0.0, 0, 0
        sample = None
        for b in DataLoader(sub, batch_size=16, shuffle=False):
            b = {k: v for k, v in b.items() if k != "label"}
            with torch.no_grad():
                ref = model({k: v.to(run.device) for k, v in b.items()}).float().cpu().numpy()
            got = sess.run(["logits"], _numpy_feeds(b, input_names))[0]
            if sample is None:  # a few raw rows + the torch model's logits, for examples/serve_onnx.py
                sample = {**_numpy_feeds(b, input_names), "id": b["id"].numpy(), "expected_logits": ref}
            worst = max(worst, float(np.abs(got - ref).max()))
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            count += len(ref)
        info["parity"] = {"max_abs_diff": worst, "rows": count, "atol": atol, "against": "torch model, float32, eval"}
        info["top1_agreement"] = agree / max(count, 1)
        lat = default_collate([ds[i % len(ds)] for i in range(latency_batch)])
        feeds = _numpy_feeds(lat, input_names)
        sess.run(["logits"], feeds)
        t0 = time.perf_counter()
        for _ in range(repeats):
            sess.run(["logits"], feeds)
        info["latency_ms_per_batch"] = round((time.perf_counter() - t0) / repeats * 1000, 3)
        info["latency_batch"] = latency_batch
        info["latency_threads"] = "onnxruntime default (all cores), CPUExecutionProvider"
        if sample is not None:
            np.savez(path.parent / "sample_inputs.npz", **sample)
            info["sample_inputs"] = str(path.parent / "sample_inputs.npz")
        if worst > atol:
            (path.parent / "deploy.json").write_text(json.dumps(info, indent=2))
            raise ParityError(f"export-model: the ONNX graph's logits differ from the torch model's by {worst:.3g} "
                              f"(max abs over {count} rows) > atol {atol}; the graph is in {path} for inspection")
    (path.parent / "deploy.json").write_text(json.dumps(info, indent=2))
    return info
