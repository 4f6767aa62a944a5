"""The YAML config of ``mmbridge train`` / ``evaluate``: schema, defaults, overrides, validation.

Validation runs before anything heavy is imported (no TensorFlow, no onnxruntime, no data
read) and reports **every** problem in one :class:`~mmbridge.errors.ConfigError`.

Frozen dataclasses are the one source of truth: :class:`RunConfig` (``framework`` and the
sections) holds :class:`DataConfig`, :class:`~mmbridge.composition.config.ModelConfig` (with
:class:`~mmbridge.composition.config.BranchConfig` and one
:class:`~mmbridge.composition.config.ComponentConfig` per encoder / preprocess), :class:`TrainConfig`
and :class:`OutputConfig`, each with ``to_dict()`` / ``from_dict()``. The YAML defaults, CLI
``key=value`` overrides, :class:`~mmbridge.Trainer`'s keyword arguments and
:func:`mmbridge.compose`'s all read their defaults from these classes. Where they used to
disagree, the values are: ``training.precision`` **fp32** (was bf16 in the YAML, fp32 in the
Trainer: no autocast unless asked for, works on every device and under ``framework: keras``;
every example config says ``precision:`` explicitly) and ``model.fusion_dim`` **128** (was 256 in
``compose``; every example config uses 128).

Schema (defaults: the dataclasses; in YAML form in :data:`DEFAULTS` and :data:`TOP_LEVEL`)::

    framework: torch           # torch | keras (mmbridge.baselines.keras_run: the model built and trained in Keras)
    imports: []                # modules imported before validation: their bridges / heads / component types apply
    data:                      # mmbridge.data.load_splits(...)
      root: ../shared/data/pokedex   # null -> the built-in sample (mmbridge.data.sample_dir())
      modalities: [image, text, numeric]
      image_size: 64           # pixels (square)
      tokenizer: word          # word | minilm (mmbridge.train.components.tokenizers)
      max_length: 64           # tokens
      on_error: raise          # raise | skip
    model:
      branches:                # name -> branch; order = token order in fusion
        image:
          input_keys: [image]          # default: the keys of the data modality of that name, else [name]
          mask_key: null               # the token-mask key among input_keys; default: the data's (text_mask)
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
    training: {epochs, batch_size, lr, weight_decay, precision (fp32 default|bf16|fp16), grad_accum,
               grad_clip, scheduler (cosine|none), seed, num_workers, monitor, mode, patience,
               checkpoint_every_steps, keep_checkpoints, deterministic, max_steps_per_epoch, stop_after_epochs,
               device, resume, restore_best, log_every, progress}
    output: {dir: runs/NAME, tensorboard: true, name: null,   # name: row name in reports (default: dir name)
             loggers: [tensorboard], logger_options: {}}    # + wandb, mlflow (mmbridge.train.loggers)

Encoder / preprocess ``type``\\ s and their keys: the entries of the registry
:data:`mmbridge.composition.config.components` (built-in ones in :mod:`mmbridge.train.components`;
a new type is one registered config dataclass + builder; an unknown ``type`` is reported with
the registry's closest name):

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

YAML is read strictly: a key given twice in one mapping is an error naming the key and its lines,
and numbers must be finite and in range (``lr: .inf``, ``batch_size: -1`` are refused).

Relative paths are relative to the current directory. Overrides are ``dotted.key=value`` with
the value parsed as YAML (``training.epochs=3``, ``model.fusion=gated``,
``data.root=null``).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from mmbridge.composition.config import (
    BranchConfig,
    ComponentConfig,
    ModelConfig,
    check,
    components,
    is_int,
    is_num,
    known_fields,
    plain,
    unknown_keys,
)
from mmbridge.errors import ConfigError
from mmbridge.train.components import KERAS_FILE_SUFFIXES, tokenizers

__all__ = ["BranchConfig", "ComponentConfig", "DataConfig", "ModelConfig", "OutputConfig", "RunConfig", "TrainConfig",
           "KERAS_FILE_SUFFIXES", "load_config", "dump"]


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` / ``3E+4`` as floats (YAML 1.2; PyYAML's 1.1
    rules would leave ``lr: 1e-3`` a string) and refuses a key repeated in one mapping (PyYAML
    would silently keep the last one): the error names the key and both lines."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable key: SafeLoader reports it below
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"duplicate key {key!r} on line {line} (first given on line {first}); each key may "
                        f"appear once in a mapping", key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _finite(v: Any) -> bool:
    """An int or float (not a bool) that is finite (not ``.inf`` / ``.nan``)."""
    return is_num(v) and math.isfinite(v)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


#: Data modality -> the batch keys it provides (a branch named like a modality reads these by default).
MODALITY_KEYS: dict[str, tuple[str, ...]] = {"image": ("image",), "text": ("text", "text_mask"), "numeric": ("numeric",)}
#: Batch keys the data layer hands out as token masks (``[N, T]``, 1 = token): a branch reading
#: one gets it as its ``mask_key`` unless the config says otherwise.
MASK_KEYS: tuple[str, ...] = ("text_mask",)
FRAMEWORKS = ("torch", "keras")
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULERS = ("cosine", "none")
DEVICES = (None, "cpu", "cuda")
ON_ERROR = ("raise", "skip")


class _Section:
    """``to_dict`` / ``from_dict`` of a flat config section (a frozen dataclass of plain values)."""

    def to_dict(self) -> dict[str, Any]:
        """The section as in the YAML (plain lists, dicts and scalars)."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, problems: list[str], where: str):
        """The section of ``raw``, defaults filled; every problem appended to ``problems``."""
        obj = cls(**known_fields(cls, raw, where, problems))
        obj._validate(where, problems)
        return obj

    def _validate(self, where: str, problems: list[str]) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class DataConfig(_Section):
    """The ``data`` section: :func:`mmbridge.data.load_splits` arguments.

    Attributes:
        root: the dataset folder; None: the built-in sample (:func:`mmbridge.data.sample_dir`).
        modalities: any of ``image``, ``text``, ``numeric``.
        image_size: square image side in pixels.
        tokenizer: a :data:`~mmbridge.train.components.tokenizers` name (``word``, ``minilm``).
        max_length: tokens per text.
        on_error: ``raise`` or ``skip`` rows that fail the data checks.
    """

    root: str | None = None
    modalities: tuple[str, ...] = ("image", "text", "numeric")
    image_size: int = 64
    tokenizer: str = "word"
    max_length: int = 64
    on_error: str = "raise"

    def __post_init__(self) -> None:
        if isinstance(self.modalities, list):
            object.__setattr__(self, "modalities", tuple(self.modalities))

    def _validate(self, where: str, problems: list[str]) -> None:
        if self.root is not None:
            if not isinstance(self.root, str):
                problems.append(f"{where}.root: must be a directory path or null (built-in sample), got {self.root!r}")
            elif not Path(self.root).is_dir():
                problems.append(f"{where}.root: {self.root!r} is not a directory (relative paths are relative to "
                                f"{os.getcwd()}); pass data.root=DIR or data.root=null for the built-in sample")
        mods = self.modalities
        if not isinstance(mods, (list, tuple)) or not mods or any(m not in MODALITY_KEYS for m in mods):
            problems.append(f"{where}.modalities: must be a non-empty list of {list(MODALITY_KEYS)}, got {plain(mods)!r}")
        check(is_int(self.image_size, 8), problems,
              f"{where}.image_size: must be an int >= 8 (pixels), got {self.image_size!r}")
        check(is_int(self.max_length, 2), problems,
              f"{where}.max_length: must be an int >= 2 (tokens), got {self.max_length!r}")
        if not isinstance(self.tokenizer, str) or self.tokenizer not in tokenizers:
            close = tokenizers.suggest(self.tokenizer)
            if isinstance(self.tokenizer, str) and self.tokenizer.strip() and (not close or Path(self.tokenizer).is_dir()):
                try:  # a Hugging Face model's tokenizer, offline (imports transformers, only for such a name)
                    from mmbridge.data.tokenizers import hf_tokenizer

                    hf_tokenizer(self.tokenizer)
                except (ValueError, ImportError) as exc:
                    problems.append(f"{where}.tokenizer: {exc}")
            else:
                problems.append(f"{where}.tokenizer: must be one of {tokenizers.names()}, a local transformers model "
                                f"directory or a cached Hugging Face model name, got {self.tokenizer!r}"
                                + (f"; did you mean {close[0]!r}?" if close else ""))
        check(self.on_error in ON_ERROR, problems,
              f"{where}.on_error: must be 'raise' or 'skip', got {self.on_error!r}")

    @property
    def valid_modalities(self) -> tuple[str, ...]:
        """The known modalities among :attr:`modalities` (all of them in a valid config)."""
        mods = self.modalities if isinstance(self.modalities, (list, tuple)) else ()
        return tuple(m for m in mods if m in MODALITY_KEYS)

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """Every batch key the modalities provide."""
        return tuple(k for mod in self.valid_modalities for k in MODALITY_KEYS[mod])


@dataclass(frozen=True)
class TrainConfig(_Section):
    """The ``training`` section; also the defaults of :class:`~mmbridge.Trainer`'s keyword arguments.

    Attributes (see :class:`~mmbridge.Trainer` for what each does):
        epochs, batch_size (per process), lr, weight_decay: AdamW training.
        precision: ``fp32`` (default: no autocast, runs on every device and under
            ``framework: keras``), ``bf16`` (autocast) or ``fp16`` (autocast + GradScaler).
        grad_accum, grad_clip, scheduler (``cosine`` | ``none``), seed, num_workers.
        monitor, mode: early-stopping / ``best.pt`` metric; None: the task head's
            (``val/top1`` max for classification, ``val/loss`` min for regression).
        patience, checkpoint_every_steps, keep_checkpoints, deterministic, max_steps_per_epoch,
        log_every, progress, device (``cpu`` | ``cuda`` | None: CUDA if available).
        ddp_timeout_min: minutes a collective waits for a rank that stopped before the others
            fail (default 30).
        feature_cache: cache the pooled features of deterministic frozen branches by row id
            (default True; see :meth:`~mmbridge.HybridModel.enable_feature_cache`).
        stop_after_epochs, resume (``auto`` | a checkpoint path | None), restore_best:
            arguments of :meth:`~mmbridge.Trainer.fit` in the ``mmbridge train`` recipe. (A direct
            ``Trainer.fit()`` call defaults to ``resume=None, restore_best=False``: a library
            call does not pick up a checkpoint it was not given.)
    """

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    precision: str = "fp32"
    grad_accum: int = 1
    grad_clip: float | None = None
    scheduler: str = "cosine"
    seed: int = 0
    num_workers: int = 0
    monitor: str | None = None
    mode: str | None = None
    patience: int | None = None
    checkpoint_every_steps: int | None = None
    keep_checkpoints: bool = False
    deterministic: bool = False
    max_steps_per_epoch: int | None = None
    stop_after_epochs: int | None = None
    device: str | None = None
    resume: str | None = "auto"
    restore_best: bool = True
    log_every: int = 10
    progress: bool = True
    ddp_timeout_min: float = 30.0
    feature_cache: bool = True

    #: The fields that are :class:`~mmbridge.Trainer` keyword arguments (the rest go to ``fit``).
    TRAINER_KEYS: ClassVar[tuple[str, ...]] = (
        "epochs", "batch_size", "lr", "weight_decay", "precision", "grad_accum", "grad_clip", "scheduler", "seed",
        "num_workers", "monitor", "mode", "patience", "checkpoint_every_steps", "keep_checkpoints", "deterministic",
        "max_steps_per_epoch", "log_every", "progress", "device", "ddp_timeout_min", "feature_cache")

    def trainer_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~mmbridge.Trainer` this section sets."""
        return {k: getattr(self, k) for k in self.TRAINER_KEYS}

    def _validate(self, where: str, problems: list[str]) -> None:
        for key in ("epochs", "batch_size", "grad_accum", "log_every"):
            v = getattr(self, key)
            check(is_int(v, 1), problems, f"{where}.{key}: must be an int >= 1, got {v!r}")
        for key in ("patience", "checkpoint_every_steps", "max_steps_per_epoch", "stop_after_epochs"):
            v = getattr(self, key)
            check(v is None or is_int(v, 1), problems, f"{where}.{key}: must be an int >= 1 or null, got {v!r}")
        check(is_num(self.ddp_timeout_min) and 0 < self.ddp_timeout_min < float("inf"), problems,
              f"{where}.ddp_timeout_min: must be a finite number of minutes > 0, got {self.ddp_timeout_min!r}")
        check(_finite(self.lr) and 0 < self.lr <= 10, problems,
              f"{where}.lr: must be a finite number in (0, 10], got {self.lr!r}")
        check(_finite(self.weight_decay) and 0 <= self.weight_decay <= 1, problems,
              f"{where}.weight_decay: must be a finite number in [0, 1], got {self.weight_decay!r}")
        check(self.grad_clip is None or (_finite(self.grad_clip) and self.grad_clip > 0), problems,
              f"{where}.grad_clip: must be a finite positive number or null, got {self.grad_clip!r}")
        check(self.precision in PRECISIONS, problems,
              f"{where}.precision: must be fp32, bf16 or fp16, got {self.precision!r}")
        check(self.scheduler in SCHEDULERS, problems,
              f"{where}.scheduler: must be cosine or none, got {self.scheduler!r}")
        check(is_int(self.seed, 0), problems, f"{where}.seed: must be an int >= 0, got {self.seed!r}")
        check(is_int(self.num_workers, 0), problems, f"{where}.num_workers: must be an int >= 0, got {self.num_workers!r}")
        check(self.device in DEVICES, problems, f"{where}.device: must be cpu, cuda or null (auto), got {self.device!r}")
        check(self.mode in (None, "min", "max"), problems, f"{where}.mode: must be min, max or null, got {self.mode!r}")
        check(self.monitor is None or (isinstance(self.monitor, str) and self.monitor.startswith("val/")), problems,
              f"{where}.monitor: must name a validation metric such as val/top1, val/macro_f1 or val/loss, "
              f"got {self.monitor!r}")
        check(self.resume is None or isinstance(self.resume, str), problems,
              f"{where}.resume: must be 'auto', a checkpoint path or null, got {self.resume!r}")
        for key in ("restore_best", "progress", "keep_checkpoints", "deterministic"):
            v = getattr(self, key)
            check(isinstance(v, bool), problems, f"{where}.{key}: must be true or false, got {v!r}")


@dataclass(frozen=True)
class OutputConfig(_Section):
    """The ``output`` section.

    Attributes:
        dir: run folder (checkpoints, ``config.yaml``, reports, ``tensorboard/``); also the
            default ``out_dir`` of :class:`~mmbridge.Trainer`.
        tensorboard: write TensorBoard logs (false drops ``tensorboard`` from ``loggers``).
        name: row name in reports; None: the folder name of ``dir``.
        loggers: experiment loggers, any of ``tensorboard``, ``wandb``, ``mlflow``
            (:mod:`mmbridge.train.loggers`; rank 0 only). An unknown name, or one whose package is
            not installed, is reported here with the choices / the ``pip install`` command.
        logger_options: ``{logger name: options}``, e.g. ``{wandb: {project: P, mode: offline},
            mlflow: {tracking_uri: "file:runs/mlruns", experiment: E}}``.
    """

    dir: str = "runs/mmbridge"
    tensorboard: bool = True
    name: str | None = None
    loggers: tuple[str, ...] = ("tensorboard",)
    logger_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.loggers, list):
            object.__setattr__(self, "loggers", tuple(self.loggers))

    @property
    def active_loggers(self) -> tuple[str, ...]:
        """:attr:`loggers`, without ``tensorboard`` when :attr:`tensorboard` is false."""
        return tuple(n for n in self.loggers if self.tensorboard or n != "tensorboard")

    def _validate(self, where: str, problems: list[str]) -> None:
        from mmbridge.train.loggers import check_loggers

        check_loggers(self.loggers, self.logger_options, where, problems)
        check(isinstance(self.dir, str) and self.dir != "", problems,
              f"{where}.dir: must be a non-empty path, got {self.dir!r}")
        check(self.name is None or isinstance(self.name, str), problems,
              f"{where}.name: must be a string or null, got {self.name!r}")
        check(isinstance(self.tensorboard, bool), problems,
              f"{where}.tensorboard: must be true or false, got {self.tensorboard!r}")


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "training": TrainConfig, "output": OutputConfig}


@dataclass(frozen=True)
class RunConfig(Mapping):
    """A whole ``mmbridge train`` config: ``framework`` and the four sections.

    Read it by attribute (``cfg.training.epochs``, ``cfg.model.branches["text"].encoder``). It
    is also a read-only mapping of the YAML form (``cfg["training"]["epochs"]``: plain dicts
    from :meth:`to_dict`), so older callers that index it keep working.

    Attributes:
        framework: ``torch`` (default) or ``keras`` (:mod:`mmbridge.baselines.keras_run`).
        imports: modules imported (in order) before the sections are validated, so that the
            bridges, fusion / task heads and component types they register can be named in the
            config (:func:`import_modules`).
        data, model, training, output: the sections.
    """

    framework: str = "torch"
    imports: tuple[str, ...] = ()
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain YAML data (``framework`` first), as saved in ``config.yaml``."""
        return {"framework": self.framework, "imports": list(self.imports),
                **{k: getattr(self, k).to_dict() for k in SECTIONS}}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, where: str = "<config>",
                  problems: list[str] | None = None) -> RunConfig:
        """Fill defaults into ``raw`` and check it; raise once with every problem found.

        Args:
            raw: the YAML data (a mapping of ``framework`` and sections; missing ones default).
            where: the file name, for the message.
            problems: problems found before (e.g. bad overrides), reported with the others.

        Raises:
            ConfigError: one or more problems (all listed, one per line).
        """
        problems = problems if problems is not None else []
        unknown_keys("", raw, ["framework", "imports", *SECTIONS], problems)
        imports = import_modules(raw.get("imports"), problems)
        framework = raw.get("framework", cls.framework)
        check(framework in FRAMEWORKS, problems, f"framework: must be one of {list(FRAMEWORKS)}, got {framework!r}")
        given: dict[str, Mapping[str, Any]] = {}
        for section in SECTIONS:
            sec = raw.get(section) or {}
            if not isinstance(sec, Mapping):
                problems.append(f"{section}: must be a mapping, got {type(sec).__name__}")
                sec = {}
            given[section] = sec
        data = DataConfig.from_dict(given["data"], problems=problems, where="data")
        model = ModelConfig.from_dict(given["model"], problems=problems, where="model",
                                      default_input_keys=lambda name: MODALITY_KEYS.get(name, (name,)),
                                      mask_keys=MASK_KEYS)
        training = TrainConfig.from_dict(given["training"], problems=problems, where="training")
        output = OutputConfig.from_dict(given["output"], problems=problems, where="output")
        cfg = cls(framework=framework, imports=imports, data=data, model=model, training=training, output=output)
        cfg._check_across_sections(problems)
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            raise ConfigError(f"{where}: {len(problems)} problem{'s' if len(problems) > 1 else ''}:\n{lines}")
        return cfg

    def _check_across_sections(self, problems: list[str]) -> None:
        available = set(self.data.batch_keys)
        for name, b in self.model.branches.items():
            if isinstance(b.input_keys, tuple):
                missing = [k for k in b.input_keys if k not in available]
                if missing:
                    problems.append(f"model.branches.{name}.input_keys: {missing} not provided by data.modalities "
                                    f"{list(self.data.valid_modalities)} (they provide {sorted(available)}); add the "
                                    f"modality or change input_keys")
        for name, b in self.model.branches.items():
            enc = b.encoder
            if enc is not None and enc.type == "hf" and isinstance(getattr(enc, "path", None), str) \
                    and "text" in self.data.valid_modalities and isinstance(self.data.tokenizer, str):
                from mmbridge.train.components import hf_pairing_problems

                problems.extend(hf_pairing_problems(self.data.tokenizer, enc.path, f"model.branches.{name}.encoder"))
        if self.framework == "keras":
            _check_keras(self, problems)

    # -- the read-only mapping view (YAML form) -------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        if key == "framework":
            return self.framework
        if key == "imports":
            return list(self.imports)
        if key in SECTIONS:
            return getattr(self, key).to_dict()
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(["framework", "imports", *SECTIONS])

    def __len__(self) -> int:
        return 2 + len(SECTIONS)

    def replace(self, **sections: Any) -> RunConfig:
        """A copy with some fields replaced (``cfg.replace(training=cfg.training.replace(...))``)."""
        return dataclasses.replace(self, **sections)


#: The defaults of every section, in the YAML form (read from the dataclasses; kept for callers).
DEFAULTS: dict[str, Any] = {k: v().to_dict() for k, v in SECTIONS.items()}
#: Top-level keys that are plain values, not sections: name -> default.
TOP_LEVEL: dict[str, Any] = {"framework": RunConfig.framework, "imports": []}


def import_modules(names: Any, problems: list[str]) -> tuple[str, ...]:
    """Import the modules of a config's ``imports:`` list, in order; each failure is a problem.

    A module's registrations (``@mmbridge.register_bridge``, ``@mmbridge.fusion_heads.register``,
    ``@mmbridge.task_heads.register``, ``@register_component``) then apply to the rest of the
    config, whichever entry point reads it (``mmbridge train``, ``evaluate``, :func:`load_config`).
    Modules are found on ``sys.path`` as usual (the current directory with ``python -m``; set
    ``PYTHONPATH`` for the ``mmbridge`` script). Importing a module twice is a no-op (Python's
    module cache), so a saved ``config.yaml`` that repeats the list loads again.

    Returns:
        the module names as a tuple (``()`` for null).
    """
    if names is None:
        return ()
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(
            isinstance(n, str) and n.strip() for n in names):
        problems.append(f"imports: must be a list of module names (e.g. [my_project.heads]), got {names!r}")
        return ()
    for name in names:
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure of user code is reported as a config problem
            problems.append(f"imports: cannot import {name!r} ({type(exc).__name__}: {exc}); it must be an "
                            f"importable module on sys.path (set PYTHONPATH, or run from its folder with python -m)")
    return tuple(names)


def as_run_config(cfg: RunConfig | Mapping[str, Any]) -> RunConfig:
    """``cfg`` itself, or a plain mapping (e.g. a loaded ``config.yaml``) validated into a :class:`RunConfig`."""
    return cfg if isinstance(cfg, RunConfig) else RunConfig.from_dict(cfg)


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = (), *,
                data: Mapping[str, Any] | None = None) -> RunConfig:
    """Read, override, fill defaults and validate a config.

    Args:
        path: YAML file, or None to start from the defaults only.
        overrides: ``"dotted.key=value"`` strings (value parsed as YAML), applied in order.
        data: a config as a dict instead of ``path`` (merged on top of the file if both).

    Returns:
        The validated :class:`RunConfig` (every section and key filled in; also readable as a
        mapping of the YAML form).

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
            raise ConfigError(f"config file {p} must hold a mapping with sections {sorted(SECTIONS)}, "
                              f"got a {type(loaded).__name__}")
        raw = loaded
    if data:
        raw = _merge(raw, copy.deepcopy(dict(data)))
    for ov in overrides:
        _apply_override(raw, ov, problems)
    return RunConfig.from_dict(raw, where=where, problems=problems)


def validate(raw: Mapping[str, Any], *, problems: list[str] | None = None, where: str = "<config>") -> RunConfig:
    """:meth:`RunConfig.from_dict` (kept for callers of the dict-based API)."""
    return RunConfig.from_dict(raw, where=where, problems=problems)


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


def keras_counterpart(kind: str | None) -> str | None:
    """The Keras layers ``framework: keras`` builds for encoder type ``kind``, or None (none)."""
    return components.get(kind).keras if isinstance(kind, str) and kind in components else None


def _check_keras(cfg: RunConfig, problems: list[str]) -> None:
    """What ``framework: keras`` (:mod:`mmbridge.baselines.keras_run`) can build and train."""
    m, t = cfg.model, cfg.training
    extra = [n for n in cfg.output.loggers if n != "tensorboard"]
    if extra:
        problems.append(f"output.loggers: {extra} not supported under framework: keras (its run logs to TensorBoard "
                        f"only); use [tensorboard], or framework: torch")
    keras_types = [n for n in components.names() if components.get(n).keras]
    known = ", ".join(f"{k} ({components.get(k).keras})" for k in keras_types)
    for name, b in m.branches.items():
        kind = b.encoder.type if b.encoder is not None else None
        if kind is not None and keras_counterpart(kind) is None:
            problems.append(f"model.branches.{name}.encoder.type: {kind!r} has no Keras equivalent under "
                            f"framework: keras (branch {name!r}); use one of {known}, or framework: torch")
        if b.preprocess is not None:
            problems.append(f"model.branches.{name}.preprocess: not supported under framework: keras (branch "
                            f"{name!r}); the Keras model does its own preprocessing (Rescaling for images, an "
                            f"adapted Normalization for numeric features); remove it")
        if kind == "conv" and isinstance(b.input_keys, tuple) and b.input_keys != ("image",):
            problems.append(f"model.branches.{name}.input_keys: a Keras conv branch reads exactly [image], "
                            f"got {list(b.input_keys)!r}")
    if m.fusion != "concat":
        problems.append(f"model.fusion: framework: keras supports only 'concat', got {m.fusion!r}; "
                        f"use framework: torch for {m.fusion!r}")
    if m.task != "classification":
        problems.append(f"model.task: framework: keras supports only 'classification', got {m.task!r}")
    if t.precision != "fp32":
        problems.append(f"training.precision: framework: keras trains in fp32 only, got {t.precision!r}; "
                        f"pass training.precision=fp32")
    if t.grad_accum != 1:
        problems.append(f"training.grad_accum: framework: keras has no gradient accumulation, got {t.grad_accum!r}; "
                        f"use 1")
    if t.device == "cuda":
        problems.append("training.device: framework: keras runs on the CPU (mmbridge hides GPUs from TensorFlow); "
                        "use cpu or null")


def dump(cfg: RunConfig | Mapping[str, Any]) -> str:
    """The config as YAML text (to save next to checkpoints); ``framework`` first, then the sections."""
    data = cfg.to_dict() if isinstance(cfg, RunConfig) else dict(cfg)
    return yaml.safe_dump(data, sort_keys=False)
