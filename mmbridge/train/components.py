"""The built-in YAML component types (``encoder`` / ``preprocess`` ``type``) and tokenizers.

Each component type is one entry of :data:`mmbridge.composition.config.components`: a frozen
config dataclass (its keys and defaults) and its builder, registered together with
:func:`~mmbridge.composition.config.register_component`. Adding a type is adding one such pair
(here, or in a plugin module); validation, defaults, ``key=value`` overrides and the "did you
mean" error for a misspelt ``type`` all follow from the entry.

=============  ================================================  =====================  =========
type           keys (defaults)                                   roles                  Keras
=============  ================================================  =====================  =========
``conv``       ``width`` 32, ``depth`` 3                         encoder                yes
``text``       ``dim`` 64, ``kind`` bag|gru                      encoder                yes
``mlp``        ``hidden`` 64, ``standardize`` true               encoder                yes
``hf``         ``path`` (a model directory or ``minilm``)        encoder                no
``artifact``   ``path``, ``backend`` torch|ort                   encoder, preprocess    no
``export``     ``ref``, ``backend``, ``trainable_export``,       encoder, preprocess    no
               ``name``
``import``     ``target`` "module:attr", ``kwargs``              encoder, preprocess    no
=============  ================================================  =====================  =========

Importing this module is light: the builders import onnxruntime, transformers, the exporter or
the data layer only when they run.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from mmbridge._registry import Registry
from mmbridge.composition.config import BuildContext, ComponentConfig, check, is_int, register_component
from mmbridge.errors import ConfigError
from mmbridge.train import distributed

#: File endings accepted as a Keras model file by an ``export`` component's ``ref``.
KERAS_FILE_SUFFIXES = (".keras", ".h5", ".hdf5")
BACKENDS = ("torch", "ort")


@dataclass(frozen=True)
class TokenizerType:
    """A ``data.tokenizer`` name and what it is (:func:`mmbridge.data.get_tokenizer` builds it)."""

    name: str
    description: str


#: ``data.tokenizer`` names (the names :func:`mmbridge.data.get_tokenizer` accepts).
tokenizers: Registry[TokenizerType] = Registry("tokenizer", "mmbridge.train.components.tokenizers.names()")
tokenizers.register("word", TokenizerType("word", "a word vocabulary fit on the train split's texts"))
tokenizers.register("minilm", TokenizerType("minilm", "all-MiniLM-L6-v2's WordPiece tokenizer (offline)"))


# -- native torch encoders ----------------------------------------------------------------------
@dataclass(frozen=True)
class ConvConfig(ComponentConfig):
    """A small CNN on images (:class:`~mmbridge.train.encoders.ConvEncoder`)."""

    type: ClassVar[str] = "conv"
    width: int = 32
    depth: int = 3

    def validate(self, where: str, problems: list[str]) -> None:
        check(is_int(self.width, 1) and is_int(self.depth, 1), problems,
              f"{where}: width and depth must be positive ints, got {self.width!r}, {self.depth!r}")


@register_component(ConvConfig, keras="Conv2D + BatchNormalization CNN")
def build_conv(cfg: ConvConfig, ctx: BuildContext) -> nn.Module:
    from mmbridge.train.encoders import ConvEncoder

    return ConvEncoder(cfg.width, cfg.depth)


@dataclass(frozen=True)
class TextConfig(ComponentConfig):
    """Token ids (+ mask) -> embedding bag or bidirectional GRU (:class:`~mmbridge.train.encoders.TextEncoder`)."""

    type: ClassVar[str] = "text"
    dim: int = 64
    kind: str = "bag"

    def validate(self, where: str, problems: list[str]) -> None:
        check(is_int(self.dim, 2), problems, f"{where}.dim: must be an int >= 2, got {self.dim!r}")
        check(self.kind in ("bag", "gru"), problems, f"{where}.kind: must be 'bag' or 'gru', got {self.kind!r}")


@register_component(TextConfig, keras="Embedding + bidirectional GRU / masked mean")
def build_text(cfg: TextConfig, ctx: BuildContext) -> nn.Module:
    from mmbridge.train.encoders import TextEncoder

    vocab = getattr(ctx.train_ds, "vocab_size", None)
    if vocab is None:
        raise ConfigError(f"{ctx.where}: a 'text' encoder needs the text modality in data.modalities")
    return TextEncoder(vocab, cfg.dim, cfg.kind)


@dataclass(frozen=True)
class MLPConfig(ComponentConfig):
    """Numeric features -> MLP (:class:`~mmbridge.train.encoders.MLPEncoder`); ``standardize`` uses the train split's statistics."""

    type: ClassVar[str] = "mlp"
    hidden: int = 64
    standardize: bool = True

    def validate(self, where: str, problems: list[str]) -> None:
        check(is_int(self.hidden, 1), problems, f"{where}.hidden: must be a positive int, got {self.hidden!r}")


@register_component(MLPConfig, keras="adapted Normalization + Dense")
def build_mlp(cfg: MLPConfig, ctx: BuildContext) -> nn.Module:
    from mmbridge.train.encoders import MLPEncoder

    nf = getattr(ctx.train_ds, "num_features", None)
    if not nf:
        raise ConfigError(f"{ctx.where}: an 'mlp' encoder needs the numeric modality in data.modalities")
    stats = getattr(ctx.train_ds, "stats", None) if cfg.standardize else None
    return MLPEncoder(nf, cfg.hidden, mean=stats["mean"] if stats else None, std=stats["std"] if stats else None)


@dataclass(frozen=True)
class HFConfig(ComponentConfig):
    """A ``transformers.AutoModel``, offline: a local model directory, a model name already in the
    local Hugging Face cache, or ``minilm`` (all-MiniLM-L6-v2). Pair it with ``data.tokenizer``
    naming the same model (checked: :func:`hf_pairing_problems`)."""

    type: ClassVar[str] = "hf"
    path: str | None = None

    def validate(self, where: str, problems: list[str]) -> None:
        if not (isinstance(self.path, str) and self.path.strip()):
            problems.append(f"{where}.path: a local transformers model directory, a cached Hugging Face model name "
                            f"or 'minilm', got {self.path!r}")


def resolve_hf(ref: str) -> str:
    """A Hugging Face model reference in a comparable form: ``minilm`` -> its directory, a local
    directory -> its real path, a cached model name -> itself."""
    if ref == "minilm":
        from mmbridge.data import minilm_path

        try:
            return os.path.realpath(minilm_path())
        except ImportError:
            return ref
    return os.path.realpath(ref) if Path(ref).is_dir() else ref


def _hf_config(ref: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_hf(ref), local_files_only=True)


def hf_embedding_rows(ref: str) -> int | None:
    """The number of rows of a model's token embedding (``config.vocab_size``), from its config only."""
    cfg = _hf_config(ref)
    n = getattr(cfg, "vocab_size", None)
    if n is None and hasattr(cfg, "get_text_config"):
        n = getattr(cfg.get_text_config(), "vocab_size", None)
    return int(n) if n is not None else None


def hf_pairing_problems(tokenizer: str, encoder: str, where: str) -> list[str]:
    """Why ``data.tokenizer`` does not fit an ``hf`` encoder (before any training).

    * ``word`` (a vocabulary fit on the train texts) with a pretrained encoder: ids mean nothing to it;
    * two different models named (a tokenizer of one, the encoder of another);
    * a tokenizer with more ids (``len(tokenizer)``, added tokens included) than the encoder's
      embedding has rows (an index error, or a device-side assert on CUDA, mid-training).
    """
    if tokenizer == "word":
        return [f"{where}: an hf encoder ({encoder!r}) reads its own model's token ids, but data.tokenizer is "
                f"'word' (a vocabulary fit on the train texts); set data.tokenizer: {encoder}"]
    if not isinstance(tokenizer, str) or tokenizer in tokenizers and tokenizer != "minilm":
        return []
    if resolve_hf(tokenizer) != resolve_hf(encoder):
        return [f"{where}: data.tokenizer {tokenizer!r} and the hf encoder {encoder!r} name two different models; a "
                f"tokenizer's ids index its own model's embedding: use the same model for both"]
    try:
        from mmbridge.data.tokenizers import hf_tokenizer

        n_tok = hf_tokenizer(tokenizer).vocab_size
        rows = hf_embedding_rows(encoder)
    except ImportError:  # transformers or the minilm package missing: the build step says what to install
        return []
    except Exception as exc:  # noqa: BLE001 - not loadable offline: reported, not raised
        return [f"{where}: cannot read the hf model {encoder!r} offline ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); give a local model directory or a cached model name"]
    if rows is not None and n_tok > rows:
        return [f"{where}: the tokenizer of {tokenizer!r} has {n_tok} ids but the encoder's embedding has {rows} rows "
                f"(config.vocab_size); ids >= {rows} would index past it. Use the tokenizer the model was trained "
                f"with, or resize the model's embeddings (model.resize_token_embeddings) and save it"]
    return []


@register_component(HFConfig)
def build_hf(cfg: HFConfig, ctx: BuildContext) -> nn.Module:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(resolve_hf(cfg.path), local_files_only=True)
    vocab = getattr(ctx.train_ds, "vocab_size", None)
    rows = model.get_input_embeddings().num_embeddings if model.get_input_embeddings() is not None else None
    if vocab is not None and rows is not None and vocab > rows:
        raise ConfigError(f"{ctx.where}: the data's tokenizer has {vocab} ids but {cfg.path!r}'s embedding has {rows} "
                          f"rows; use the model's own tokenizer (data.tokenizer: {cfg.path})")
    return model


# -- bridged TF parts ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _BridgedConfig(ComponentConfig):
    backend: str = "torch"

    @property
    def inference_only(self) -> bool:
        return self.backend == "ort"

    def validate(self, where: str, problems: list[str]) -> None:
        check(self.backend in BACKENDS, problems, f"{where}.backend: must be 'torch' or 'ort', got {self.backend!r}")


def _bridge(art: Any, backend: str, ctx: BuildContext) -> nn.Module:
    if backend == "ort":
        return art.to_ort(provider_options=dict(ctx.ort_provider_options)) if ctx.ort_provider_options else art.to_ort()
    return art.to_torch(trainable=ctx.trainable)


@dataclass(frozen=True)
class ArtifactConfig(_BridgedConfig):
    """An exported :class:`~mmbridge.BridgeArtifact` directory, run in torch or onnxruntime."""

    type: ClassVar[str] = "artifact"
    path: str | None = None
    backend: str = "torch"

    def validate(self, where: str, problems: list[str]) -> None:
        super().validate(where, problems)
        if not isinstance(self.path, str) or not (Path(self.path) / "model.onnx").is_file():
            problems.append(f"{where}.path: {self.path!r} is not an artifact directory (no model.onnx); export one "
                            f"with `mmbridge export ... --out DIR`")


@register_component(ArtifactConfig, roles=("encoder", "preprocess"))
def build_artifact(cfg: ArtifactConfig, ctx: BuildContext) -> nn.Module:
    from mmbridge.artifact import BridgeArtifact

    return _bridge(BridgeArtifact.load(cfg.path), cfg.backend, ctx)


@dataclass(frozen=True)
class ExportConfig(_BridgedConfig):
    """Exported in a child process (TensorFlow never enters the training process), then bridged.

    ``ref`` is an importable ``"module:attr"`` reference or the path of an existing Keras file
    (``.keras``, ``.h5``) or SavedModel directory. ``trainable_export`` null (the default) follows
    the branch: a trainable encoder on the torch backend gets a trainable export (BatchNorm and
    Dropout kept, the training contract checked), anything frozen an inference export; the
    artifact's ``to_torch`` default follows it (docs/user-guide.md, "the training contract").
    """

    type: ClassVar[str] = "export"
    ref: str | None = None
    backend: str = "torch"
    trainable_export: bool | None = None
    name: str | None = None
    probes: bool = True  # false: skip export's probe inputs, knowingly (mmbridge.export.probes)

    def validate(self, where: str, problems: list[str]) -> None:
        super().validate(where, problems)
        _validate_export_ref(where, self.ref, problems)
        check(isinstance(self.probes, bool), problems, f"{where}.probes: must be true or false, got {self.probes!r}")
        check(self.trainable_export is None or isinstance(self.trainable_export, bool), problems,
              f"{where}.trainable_export: must be true, false or null (follow the branch), got {self.trainable_export!r}")


def export_kwargs(cfg: ExportConfig, *, trainable: bool, role: str) -> dict[str, Any]:
    """The keyword arguments of :func:`mmbridge.export` for an ``export`` component (besides ``ref``).

    ``trainable`` is the branch's; ``trainable_export`` null follows it for a torch-backed encoder.
    The same arguments are the same cache entry: ``mmbridge prepare`` exports with them ahead of a
    job, so the job's own exports (if any) are cache hits.
    """
    flag = (cfg.trainable_export if cfg.trainable_export is not None
            else trainable and cfg.backend == "torch" and role == "encoder")
    return {"name": cfg.name, "role": role, "trainable": bool(flag), "probes": cfg.probes}


@register_component(ExportConfig, roles=("encoder", "preprocess"))
def build_export(cfg: ExportConfig, ctx: BuildContext) -> nn.Module:
    from mmbridge.artifact import BridgeArtifact
    from mmbridge.export.exporter import export

    # rank 0 exports (in a child process); it broadcasts the artifact path, or its error, and the
    # other ranks load that path: no rank but 0 starts TensorFlow, and none waits on a failed export
    path, error = None, None
    if distributed.read_env()["rank"] == 0:
        try:
            path = str(export(cfg.ref, **export_kwargs(cfg, trainable=ctx.trainable, role=ctx.role)).path)
        except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
            error = f"{type(exc).__name__}: {exc}"
    path, error = distributed.broadcast_object((path, error))
    if error is not None:
        raise ConfigError(f"{ctx.where}: exporting {cfg.ref!r} failed on rank 0: {error}")
    return _bridge(BridgeArtifact.load(path, check="size"), cfg.backend, ctx)


def is_module_ref(ref: str) -> bool:
    """``"package.module:attr"``: a colon, no path separator, no Keras file ending."""
    return ":" in ref and "/" not in ref and "\\" not in ref and not ref.endswith(KERAS_FILE_SUFFIXES)


def _validate_export_ref(where: str, ref: Any, problems: list[str]) -> None:
    """An ``export`` ``ref``: a ``"module:attr"`` reference, or an existing Keras file / SavedModel dir."""
    accepted = ("an importable 'module:attribute' reference, or the path of an existing Keras model file "
                f"({', '.join(KERAS_FILE_SUFFIXES)}) or SavedModel directory")
    if not isinstance(ref, str) or not ref:
        problems.append(f"{where}.ref: must be {accepted}, got {ref!r}")
        return
    if is_module_ref(ref):
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


# -- anything importable ------------------------------------------------------------------------
@dataclass(frozen=True)
class ImportConfig(ComponentConfig):
    """Any callable returning an ``nn.Module``: ``target(**kwargs)``."""

    type: ClassVar[str] = "import"
    target: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self, where: str, problems: list[str]) -> None:
        if not (isinstance(self.target, str) and ":" in self.target):
            problems.append(f"{where}.target: must be a 'module:attribute' reference, got {self.target!r}")
        if not isinstance(self.kwargs, dict):
            problems.append(f"{where}.kwargs: must be a mapping, got {self.kwargs!r}")


def import_ref(ref: str, where: str) -> Any:
    """The object ``"module:attr.sub"`` names.

    Raises:
        ConfigError: it does not import (names ``where``).
    """
    module, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{where}: cannot import {ref!r} ({exc}); give an importable 'module:attribute'") from exc
    return obj


@register_component(ImportConfig, roles=("encoder", "preprocess"))
def build_import(cfg: ImportConfig, ctx: BuildContext) -> nn.Module:
    return import_ref(cfg.target, ctx.where)(**cfg.kwargs)
