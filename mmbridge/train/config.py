"""The YAML config of ``mmbridge train`` / ``evaluate``: schema, defaults, overrides, validation.

Validation runs before anything heavy is imported (no TensorFlow, no onnxruntime, no data
read) and reports **every** problem in one :class:`~mmbridge.errors.ConfigError`.

Schema (defaults in :data:`DEFAULTS` and :data:`TOP_LEVEL`)::

    framework: torch           # torch | keras (mmbridge.baselines.keras_run: the model built and trained in Keras)
    data:                      # mmbridge.data.load_splits(...)
      root: ../shared/data/pokedex   # null -> the built-in sample (mmbridge.data.sample_dir())
      modalities: [image, text, numeric]
      image_size: 64           # pixels (square)
      tokenizer: word          # word | minilm
      max_length: 64           # tokens
      on_error: raise          # raise | skip
    model:
      branches:                # name -> branch; order = token order in fusion
        image:
          input_keys: [image]          # default: the branch name (+ "<name>_mask" for hf / text)
          preprocess: {type: artifact, path: DIR, backend: ort}    # optional, always frozen
          encoder: {type: conv, width: 32, depth: 3}
          out_dim: null                # inferred when null
          trainable: true
          projection: true
      fusion: concat           # concat | gated | attention (mmbridge.fusion_heads.names())
      fusion_dim: 128
      fusion_kwargs: {}        # e.g. {num_layers: 1, num_heads: 4} for attention
      task: classification     # classification | regression
      task_kwargs: {}
      modality_dropout: 0.0    # [0, 1)
    training: {epochs, batch_size, lr, weight_decay, precision (fp32|bf16|fp16), grad_accum,
               grad_clip, scheduler (cosine|none), seed, num_workers, monitor, mode, patience,
               checkpoint_every_steps, keep_checkpoints, deterministic, max_steps_per_epoch, stop_after_epochs,
               device, resume, restore_best, log_every, progress}
    output: {dir: runs/NAME, tensorboard: true, name: null}   # name: row name in reports (default: dir name)

Encoder / preprocess ``type``\\ s and their keys (:data:`COMPONENT_KEYS`):

* ``conv`` (``width``, ``depth``): :class:`~mmbridge.train.encoders.ConvEncoder` (image);
* ``text`` (``dim``, ``kind`` bag|gru): :class:`~mmbridge.train.encoders.TextEncoder`;
* ``mlp`` (``hidden``, ``standardize``): :class:`~mmbridge.train.encoders.MLPEncoder` (numeric;
  ``standardize`` uses the train split's mean / std);
* ``hf`` (``path``: a local model directory or ``minilm``): ``transformers.AutoModel``, offline;
* ``artifact`` (``path``, ``backend`` torch|ort): an exported :class:`~mmbridge.BridgeArtifact`;
* ``export`` (``ref``, ``backend``, ``trainable_export``, ``name``): exported in a child process
  (TensorFlow never enters the training process), then bridged. ``ref`` is an importable
  ``"module:attr"`` reference or the path of an existing Keras file (``.keras``, ``.h5``) or
  SavedModel directory, e.g. the ``image_encoder.keras`` a ``framework: keras`` run writes;
* ``import`` (``target`` "module:attr", ``kwargs``): any callable returning an ``nn.Module``.

``framework: keras`` accepts only the branch types that have a Keras counterpart (``conv``,
``text``, ``mlp``; see :mod:`mmbridge.baselines.keras_run`), no ``preprocess``, ``fusion: concat``,
``task: classification``, ``precision: fp32`` and ``grad_accum: 1``; anything else is reported
with the branch or key it concerns.

Relative paths are relative to the current directory. Overrides are ``dotted.key=value`` with
the value parsed as YAML (``training.epochs=3``, ``model.fusion=gated``,
``data.root=null``).
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mmbridge.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` / ``3E+4`` as floats (YAML 1.2; PyYAML's 1.1
    rules would leave ``lr: 1e-3`` a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


MODALITY_KEYS = {"image": ("image",), "text": ("text", "text_mask"), "numeric": ("numeric",)}

DEFAULTS: dict[str, Any] = {
    "data": {"root": None, "modalities": ["image", "text", "numeric"], "image_size": 64, "tokenizer": "word",
             "max_length": 64, "on_error": "raise"},
    "model": {"branches": {}, "fusion": "concat", "fusion_dim": 128, "fusion_kwargs": {},
              "task": "classification", "task_kwargs": {}, "modality_dropout": 0.0},
    "training": {"epochs": 10, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.01, "precision": "bf16",
                 "grad_accum": 1, "grad_clip": None, "scheduler": "cosine", "seed": 0, "num_workers": 0,
                 "monitor": None, "mode": None, "patience": None, "checkpoint_every_steps": None, "keep_checkpoints": False,
                 "deterministic": False,
                 "max_steps_per_epoch": None, "stop_after_epochs": None, "device": None, "resume": "auto",
                 "restore_best": True, "log_every": 10, "progress": True},
    "output": {"dir": "runs/mmbridge", "tensorboard": True, "name": None},
}

#: Top-level keys that are plain values, not sections: name -> default.
TOP_LEVEL: dict[str, Any] = {"framework": "torch"}
FRAMEWORKS = ("torch", "keras")
#: Encoder types that ``framework: keras`` builds as Keras layers (see :mod:`mmbridge.baselines.keras_run`).
KERAS_ENCODERS = {"conv": "Conv2D + BatchNormalization CNN", "text": "Embedding + bidirectional GRU / masked mean",
                  "mlp": "adapted Normalization + Dense"}
#: File endings accepted as a Keras model file by an ``export`` component's ``ref``.
KERAS_FILE_SUFFIXES = (".keras", ".h5", ".hdf5")

BRANCH_DEFAULTS: dict[str, Any] = {"input_keys": None, "preprocess": None, "encoder": None, "out_dim": None,
                                   "trainable": True, "projection": True}

COMPONENT_KEYS: dict[str, dict[str, Any]] = {
    "conv": {"width": 32, "depth": 3},
    "text": {"dim": 64, "kind": "bag"},
    "mlp": {"hidden": 64, "standardize": True},
    "hf": {"path": None},
    "artifact": {"path": None, "backend": "torch"},
    "export": {"ref": None, "backend": "torch", "trainable_export": False, "name": None},
    "import": {"target": None, "kwargs": {}},
}
PREPROCESS_TYPES = ("artifact", "export", "import")


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = (), *,
                data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read, override, fill defaults and validate a config.

    Args:
        path: YAML file, or None to start from :data:`DEFAULTS` only.
        overrides: ``"dotted.key=value"`` strings (value parsed as YAML), applied in order.
        data: a config as a dict instead of ``path`` (merged on top of the file if both).

    Returns:
        The validated config: a plain dict with every section and key filled in.

    Raises:
        ConfigError: unreadable YAML, or any problem in the config; the message lists all of
            them (``<where>: <what is wrong>; <what to do>``).
    """
    problems: list[str] = []
    raw: dict[str, Any] = {}
    where = str(path) if path is not None else "<config>"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass the path of a YAML file "
                              f"(examples: examples/pokedex/*.yaml)")
        try:
            loaded = _load_yaml(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping with sections {sorted(DEFAULTS)}, "
                              f"got a {type(loaded).__name__}")
        raw = loaded
    if data:
        raw = _merge(raw, copy.deepcopy(dict(data)))
    for ov in overrides:
        _apply_override(raw, ov, problems)
    cfg = validate(raw, problems=problems, where=where)
    return cfg


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _apply_override(raw: dict[str, Any], override: str, problems: list[str]) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        problems.append(f"override {override!r}: expected dotted.key=value (e.g. training.epochs=3)")
        return
    try:
        parsed = _load_yaml(value) if value != "" else None
    except yaml.YAMLError as exc:
        problems.append(f"override {override!r}: the value is not valid YAML ({exc.__class__.__name__})")
        return
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = parsed


def _unknown(section: str, given: Mapping[str, Any], known: Sequence[str], problems: list[str]) -> None:
    for k in given:
        if k not in known:
            close = difflib.get_close_matches(str(k), list(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {sorted(known)}"
            problems.append(f"{section + '.' if section else ''}{k}: unknown key; {hint}")


def _check(cond: bool, problems: list[str], msg: str) -> None:
    if not cond:
        problems.append(msg)


def _is_int(v: Any, lo: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate(raw: Mapping[str, Any], *, problems: list[str] | None = None, where: str = "<config>") -> dict[str, Any]:
    """Fill defaults into ``raw`` and check it; raise once with every problem found.

    Returns:
        The filled-in config (a new dict).

    Raises:
        ConfigError: one or more problems (all listed, one per line).
    """
    problems = problems if problems is not None else []
    cfg: dict[str, Any] = {}
    _unknown("", raw, list(TOP_LEVEL) + list(DEFAULTS), problems)
    for key, default in TOP_LEVEL.items():
        cfg[key] = raw.get(key, default)
    _check(cfg["framework"] in FRAMEWORKS, problems,
           f"framework: must be one of {list(FRAMEWORKS)}, got {cfg['framework']!r}")
    for section, defaults in DEFAULTS.items():
        given = raw.get(section) or {}
        if not isinstance(given, Mapping):
            problems.append(f"{section}: must be a mapping, got {type(given).__name__}")
            given = {}
        _unknown(section, given, list(defaults), problems)
        cfg[section] = {**copy.deepcopy(defaults), **{k: v for k, v in given.items() if k in defaults}}

    _validate_data(cfg["data"], problems)
    _validate_model(cfg["model"], cfg["data"], problems)
    _validate_training(cfg["training"], cfg["model"], problems)
    if cfg["framework"] == "keras":
        _validate_keras(cfg, problems)
    o = cfg["output"]
    _check(isinstance(o["dir"], str) and o["dir"] != "", problems, f"output.dir: must be a non-empty path, got {o['dir']!r}")
    _check(o["name"] is None or isinstance(o["name"], str), problems, f"output.name: must be a string or null, got {o['name']!r}")
    _check(isinstance(o["tensorboard"], bool), problems, f"output.tensorboard: must be true or false, got {o['tensorboard']!r}")
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"{where}: {len(problems)} problem{'s' if len(problems) > 1 else ''}:\n{lines}")
    return cfg


def _validate_data(d: dict[str, Any], problems: list[str]) -> None:
    if d["root"] is not None:
        if not isinstance(d["root"], str):
            problems.append(f"data.root: must be a directory path or null (built-in sample), got {d['root']!r}")
        elif not Path(d["root"]).is_dir():
            problems.append(f"data.root: {d['root']!r} is not a directory (relative paths are relative to "
                            f"{os.getcwd()}); pass data.root=DIR or data.root=null for the built-in sample")
    mods = d["modalities"]
    if not isinstance(mods, list) or not mods or any(m not in MODALITY_KEYS for m in mods):
        problems.append(f"data.modalities: must be a non-empty list of {list(MODALITY_KEYS)}, got {mods!r}")
        d["modalities"] = [m for m in (mods if isinstance(mods, list) else []) if m in MODALITY_KEYS]
    _check(_is_int(d["image_size"], 8), problems, f"data.image_size: must be an int >= 8 (pixels), got {d['image_size']!r}")
    _check(_is_int(d["max_length"], 2), problems, f"data.max_length: must be an int >= 2 (tokens), got {d['max_length']!r}")
    _check(d["tokenizer"] in ("word", "minilm"), problems,
           f"data.tokenizer: must be 'word' or 'minilm', got {d['tokenizer']!r}")
    _check(d["on_error"] in ("raise", "skip"), problems, f"data.on_error: must be 'raise' or 'skip', got {d['on_error']!r}")


def _validate_model(m: dict[str, Any], data: dict[str, Any], problems: list[str]) -> None:
    from mmbridge.composition.heads import fusion_heads, task_heads  # torch only; no TF / ORT

    if m["fusion"] not in fusion_heads:
        close = difflib.get_close_matches(str(m["fusion"]), fusion_heads.names(), n=1)
        problems.append(f"model.fusion: unknown fusion head {m['fusion']!r}"
                        + (f"; did you mean {close[0]!r}?" if close else f"; known: {fusion_heads.names()}"))
    if m["task"] not in task_heads:
        problems.append(f"model.task: unknown task head {m['task']!r}; known: {task_heads.names()}")
    _check(_is_int(m["fusion_dim"], 1), problems, f"model.fusion_dim: must be a positive int, got {m['fusion_dim']!r}")
    _check(_is_num(m["modality_dropout"]) and 0 <= m["modality_dropout"] < 1, problems,
           f"model.modality_dropout: must be a number in [0, 1), got {m['modality_dropout']!r}")
    for key in ("fusion_kwargs", "task_kwargs"):
        _check(isinstance(m[key], dict), problems, f"model.{key}: must be a mapping, got {m[key]!r}")
    for key, registry, name in (("fusion_kwargs", fusion_heads, m["fusion"]), ("task_kwargs", task_heads, m["task"])):
        if name in registry and isinstance(m[key], dict):
            accepted = _keyword_args(registry.get(name))
            for k in m[key]:
                if accepted is not None and k not in accepted:
                    problems.append(f"model.{key}.{k}: not an argument of the {name!r} head; it takes {sorted(accepted)}")
    if m["fusion"] == "attention" and _is_int(m["fusion_dim"], 1) and isinstance(m["fusion_kwargs"], dict):
        heads = m["fusion_kwargs"].get("num_heads", 4)
        if _is_int(heads, 1) and m["fusion_dim"] % heads:
            problems.append(f"model.fusion_dim: {m['fusion_dim']} is not divisible by fusion_kwargs.num_heads={heads} "
                            f"(attention fusion); use a multiple of {heads}")
    branches = m["branches"]
    if not isinstance(branches, dict) or not branches:
        problems.append("model.branches: needs at least one branch, e.g. {image: {encoder: {type: conv}}}")
        m["branches"] = {}
        return
    available = {k for mod in data["modalities"] for k in MODALITY_KEYS[mod]}
    for name, b in list(branches.items()):
        where = f"model.branches.{name}"
        if not isinstance(b, dict):
            problems.append(f"{where}: must be a mapping with an 'encoder', got {b!r}")
            continue
        _unknown(where, b, list(BRANCH_DEFAULTS), problems)
        b = {**BRANCH_DEFAULTS, **{k: v for k, v in b.items() if k in BRANCH_DEFAULTS}}
        branches[name] = b
        enc = _validate_component(f"{where}.encoder", b["encoder"], tuple(COMPONENT_KEYS), problems, required=True)
        _validate_component(f"{where}.preprocess", b["preprocess"], PREPROCESS_TYPES, problems, required=False)
        keys = b["input_keys"]
        if keys is None:
            keys = list(MODALITY_KEYS.get(name, (name,)))
            b["input_keys"] = keys
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
            problems.append(f"{where}.input_keys: must be a non-empty list of batch keys, got {keys!r}")
        else:
            missing = [k for k in keys if k not in available]
            if missing:
                problems.append(f"{where}.input_keys: {missing} not provided by data.modalities {data['modalities']} "
                                f"(they provide {sorted(available)}); add the modality or change input_keys")
        for key in ("trainable", "projection"):
            _check(isinstance(b[key], bool), problems, f"{where}.{key}: must be true or false, got {b[key]!r}")
        _check(b["out_dim"] is None or _is_int(b["out_dim"], 1), problems,
               f"{where}.out_dim: must be a positive int or null (inferred), got {b['out_dim']!r}")
        if enc and enc.get("backend") == "ort" and b["trainable"] is True:
            problems.append(f"{where}: an onnxruntime (backend: ort) encoder cannot train; set trainable: false "
                            f"or backend: torch")


def _keyword_args(cls: Any) -> set[str] | None:
    """Keyword-only / defaulted argument names of ``cls.__init__`` (None if it takes ``**kwargs``)."""
    import inspect

    params = inspect.signature(cls).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.name not in ("num_modalities", "dim", "in_dim", "num_classes")}


def _validate_component(where: str, comp: Any, types: Sequence[str], problems: list[str], *,
                        required: bool) -> dict[str, Any] | None:
    if comp is None:
        if required:
            problems.append(f"{where}: missing; give {{type: ...}} with type one of {list(types)}")
        return None
    if not isinstance(comp, dict) or "type" not in comp:
        problems.append(f"{where}: must be a mapping with a 'type' (one of {list(types)}), got {comp!r}")
        return None
    kind = comp["type"]
    if kind not in types:
        close = difflib.get_close_matches(str(kind), list(types), n=1)
        problems.append(f"{where}.type: unknown {kind!r}" + (f"; did you mean {close[0]!r}?" if close else f"; known: {list(types)}"))
        return None
    known = COMPONENT_KEYS[kind]
    _unknown(where, {k: v for k, v in comp.items() if k != "type"}, list(known), problems)
    filled = {**known, **comp}
    comp.update(filled)
    if kind in ("artifact", "export") and filled["backend"] not in ("torch", "ort"):
        problems.append(f"{where}.backend: must be 'torch' or 'ort', got {filled['backend']!r}")
    if kind == "artifact":
        path = filled["path"]
        if not isinstance(path, str) or not (Path(path) / "model.onnx").is_file():
            problems.append(f"{where}.path: {path!r} is not an artifact directory (no model.onnx); export one with "
                            f"`mmbridge export ... --out DIR`")
    if kind == "export":
        _validate_export_ref(where, filled["ref"], problems)
    if kind == "import":
        if not (isinstance(filled["target"], str) and ":" in filled["target"]):
            problems.append(f"{where}.target: must be a 'module:attribute' reference, got {filled['target']!r}")
        if not isinstance(filled["kwargs"], dict):
            problems.append(f"{where}.kwargs: must be a mapping, got {filled['kwargs']!r}")
    if kind == "hf" and not isinstance(filled["path"], str):
        problems.append(f"{where}.path: a local transformers model directory or 'minilm', got {filled['path']!r}")
    if kind == "conv":
        _check(_is_int(filled["width"], 1) and _is_int(filled["depth"], 1), problems,
               f"{where}: width and depth must be positive ints, got {filled['width']!r}, {filled['depth']!r}")
    if kind == "text":
        _check(_is_int(filled["dim"], 2), problems, f"{where}.dim: must be an int >= 2, got {filled['dim']!r}")
        _check(filled["kind"] in ("bag", "gru"), problems, f"{where}.kind: must be 'bag' or 'gru', got {filled['kind']!r}")
    if kind == "mlp":
        _check(_is_int(filled["hidden"], 1), problems, f"{where}.hidden: must be a positive int, got {filled['hidden']!r}")
    return filled


def _is_module_ref(ref: str) -> bool:
    """``"package.module:attr"``: a colon, no path separator, no Keras file ending."""
    return ":" in ref and "/" not in ref and "\\" not in ref and not ref.endswith(KERAS_FILE_SUFFIXES)


def _validate_export_ref(where: str, ref: Any, problems: list[str]) -> None:
    """An ``export`` ``ref``: a ``"module:attr"`` reference, or an existing Keras file / SavedModel dir."""
    accepted = ("an importable 'module:attribute' reference, or the path of an existing Keras model file "
                f"({', '.join(KERAS_FILE_SUFFIXES)}) or SavedModel directory")
    if not isinstance(ref, str) or not ref:
        problems.append(f"{where}.ref: must be {accepted}, got {ref!r}")
        return
    if _is_module_ref(ref):
        return
    p = Path(ref)
    if p.is_dir():
        if not (p / "saved_model.pb").is_file():
            problems.append(f"{where}.ref: {ref!r} is a directory without saved_model.pb; it must be {accepted}")
        return
    if p.is_file():
        if not ref.endswith(KERAS_FILE_SUFFIXES):
            problems.append(f"{where}.ref: {ref!r} is a file but not a Keras model ({', '.join(KERAS_FILE_SUFFIXES)}); "
                            f"it must be {accepted}")
        return
    if ref.endswith(KERAS_FILE_SUFFIXES):
        problems.append(
            f"{where}.ref: {ref!r} does not exist (relative paths are relative to {os.getcwd()}); run the "
            f"`framework: keras` config that writes it first (for the pokedex hybrid: run "
            f"examples/pokedex/tf-only.yaml first, `mmbridge train examples/pokedex/tf-only.yaml "
            f"output.dir={p.parent.as_posix()}`), or point ref at an existing Keras file or SavedModel directory")
        return
    problems.append(f"{where}.ref: {ref!r} is neither a 'module:attribute' reference nor an existing path; "
                    f"it must be {accepted}")


def _validate_keras(cfg: dict[str, Any], problems: list[str]) -> None:
    """What ``framework: keras`` (:mod:`mmbridge.baselines.keras_run`) can build and train."""
    m, t = cfg["model"], cfg["training"]
    known = ", ".join(f"{k} ({v})" for k, v in KERAS_ENCODERS.items())
    for name, b in m["branches"].items():
        if not isinstance(b, dict):
            continue
        enc = b.get("encoder")
        kind = enc.get("type") if isinstance(enc, dict) else None
        if kind is not None and kind not in KERAS_ENCODERS:
            problems.append(f"model.branches.{name}.encoder.type: {kind!r} has no Keras equivalent under "
                            f"framework: keras (branch {name!r}); use one of {known}, or framework: torch")
        if b.get("preprocess") is not None:
            problems.append(f"model.branches.{name}.preprocess: not supported under framework: keras (branch "
                            f"{name!r}); the Keras model does its own preprocessing (Rescaling for images, an "
                            f"adapted Normalization for numeric features); remove it")
        if kind == "conv" and isinstance(b.get("input_keys"), list) and b["input_keys"] != ["image"]:
            problems.append(f"model.branches.{name}.input_keys: a Keras conv branch reads exactly [image], "
                            f"got {b['input_keys']!r}")
    if m["fusion"] != "concat":
        problems.append(f"model.fusion: framework: keras supports only 'concat', got {m['fusion']!r}; "
                        f"use framework: torch for {m['fusion']!r}")
    if m["task"] != "classification":
        problems.append(f"model.task: framework: keras supports only 'classification', got {m['task']!r}")
    if t["precision"] != "fp32":
        problems.append(f"training.precision: framework: keras trains in fp32 only, got {t['precision']!r}; "
                        f"pass training.precision=fp32")
    if t["grad_accum"] != 1:
        problems.append(f"training.grad_accum: framework: keras has no gradient accumulation, got {t['grad_accum']!r}; "
                        f"use 1")
    if t["device"] == "cuda":
        problems.append("training.device: framework: keras runs on the CPU (mmbridge hides GPUs from TensorFlow); "
                        "use cpu or null")


def _validate_training(t: dict[str, Any], m: dict[str, Any], problems: list[str]) -> None:
    for key in ("epochs", "batch_size", "grad_accum", "log_every"):
        _check(_is_int(t[key], 1), problems, f"training.{key}: must be an int >= 1, got {t[key]!r}")
    for key in ("patience", "checkpoint_every_steps", "max_steps_per_epoch", "stop_after_epochs"):
        _check(t[key] is None or _is_int(t[key], 1), problems, f"training.{key}: must be an int >= 1 or null, got {t[key]!r}")
    _check(_is_num(t["lr"]) and t["lr"] > 0, problems, f"training.lr: must be a positive number, got {t['lr']!r}")
    _check(_is_num(t["weight_decay"]) and t["weight_decay"] >= 0, problems,
           f"training.weight_decay: must be a number >= 0, got {t['weight_decay']!r}")
    _check(t["grad_clip"] is None or (_is_num(t["grad_clip"]) and t["grad_clip"] > 0), problems,
           f"training.grad_clip: must be a positive number or null, got {t['grad_clip']!r}")
    _check(t["precision"] in ("fp32", "bf16", "fp16"), problems,
           f"training.precision: must be fp32, bf16 or fp16, got {t['precision']!r}")
    _check(t["scheduler"] in ("cosine", "none"), problems, f"training.scheduler: must be cosine or none, got {t['scheduler']!r}")
    _check(_is_int(t["seed"], 0), problems, f"training.seed: must be an int >= 0, got {t['seed']!r}")
    _check(_is_int(t["num_workers"], 0), problems, f"training.num_workers: must be an int >= 0, got {t['num_workers']!r}")
    _check(t["device"] in (None, "cpu", "cuda"), problems, f"training.device: must be cpu, cuda or null (auto), got {t['device']!r}")
    _check(t["mode"] in (None, "min", "max"), problems, f"training.mode: must be min, max or null, got {t['mode']!r}")
    _check(t["monitor"] is None or (isinstance(t["monitor"], str) and t["monitor"].startswith("val/")), problems,
           f"training.monitor: must name a validation metric such as val/top1, val/macro_f1 or val/loss, got {t['monitor']!r}")
    _check(t["resume"] is None or isinstance(t["resume"], str), problems,
           f"training.resume: must be 'auto', a checkpoint path or null, got {t['resume']!r}")
    for key in ("restore_best", "progress", "keep_checkpoints", "deterministic"):
        _check(isinstance(t[key], bool), problems, f"training.{key}: must be true or false, got {t[key]!r}")


def dump(cfg: Mapping[str, Any]) -> str:
    """The config as YAML text (to save next to checkpoints); ``framework`` first, then the sections."""
    return yaml.safe_dump(dict(cfg), sort_keys=False)
