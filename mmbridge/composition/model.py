"""``mmbridge.compose``: a multimodal :class:`HybridModel` from named branches.

A **branch** is an optional preprocessing module (typically a frozen onnxruntime bridge from
``artifact.to_ort()``), an encoder (a bridged ``artifact.to_torch()`` module, a native torch
module, or a Hugging Face ``transformers`` model) and a linear projection to the fusion width.
A **fusion head** (:data:`mmbridge.composition.heads.fusion_heads`) mixes the projected per-branch tokens and a
**task head** (:data:`mmbridge.composition.heads.task_heads`) maps the result to logits.

Notation used for tensor shapes:
    - N: batch size
    - M: number of branches
    - D: fusion width (``fusion_dim``)
    - C: number of classes
    - T: token sequence length

The forward pass has two stages so that DDP only wraps what trains (DESIGN.md part 9):

1. :meth:`HybridModel.frozen_stage` runs preprocessing and frozen encoders under ``no_grad``;
2. :meth:`HybridModel.trainable_stage` runs trainable encoders, projections, modality dropout,
   fusion and the task head. :meth:`HybridModel.trainable_module` returns an ``nn.Module``
   holding only that stage's modules, for ``DistributedDataParallel``.

``model(batch)`` runs both.

**Feature cache** (:mod:`mmbridge.composition.feature_cache`): off by default for a model built
with :func:`compose`; :meth:`HybridModel.enable_feature_cache` turns it on (the ``mmbridge train``
recipe and the :class:`~mmbridge.Trainer` do so unless ``training.feature_cache: false``). It then
serves the pooled features of deterministic frozen branches by the batch's ``"id"``; trainable
branches, branches with a module in train mode (e.g. active Dropout) and batches without ids are
always computed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mmbridge.composition.config import BranchConfig, ModelConfig
from mmbridge.composition.feature_cache import FeatureCache
from mmbridge.composition.heads import fusion_heads, task_heads
from mmbridge.errors import ConfigError, MMBridgeError

__all__ = ["Branch", "HybridModel", "compose"]


def is_hf_model(module: nn.Module) -> bool:
    """True when ``module`` is a Hugging Face ``transformers`` model (checked without importing it)."""
    return type(module).__module__.startswith("transformers.") and hasattr(module, "config")


def is_frozen_module(module: nn.Module) -> bool:
    """True when ``module`` declares itself inference-only (class attribute ``mmbridge_frozen = True``).

    :class:`mmbridge.runtime.module.ORTModule` declares it; so may any module of yours that has
    no gradients (a :class:`Branch` then refuses ``trainable=True`` for it).
    """
    return getattr(module, "mmbridge_frozen", False) is True


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the T axis of ``hidden [N, T, H]`` where ``mask [N, T]`` (1 = token) is set.

    Rows whose mask is all zero give zeros. Without a mask, the plain mean. Returns ``[N, H]``.
    """
    if mask is None:
        return hidden.mean(1)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def _pool(out: Any, mask: torch.Tensor | None) -> torch.Tensor:
    """Reduce an encoder output to ``[N, F]`` (see :class:`Branch`)."""
    if hasattr(out, "last_hidden_state"):
        return masked_mean(out.last_hidden_state, mask)
    if isinstance(out, Mapping):
        out = out["last_hidden_state"] if "last_hidden_state" in out else next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise MMBridgeError(
            f"branch encoder returned {type(out).__name__}; it must return a tensor [N, F] (or [N, T, F], "
            f"a tuple whose first item is one, or an object with .last_hidden_state)"
        )
    if out.dim() == 3 and mask is not None and mask.shape == out.shape[:2]:
        return masked_mean(out, mask)
    if out.dim() == 1:
        return out.unsqueeze(1)
    return out.flatten(1) if out.dim() > 2 else out


class Branch(nn.Module):
    """One modality: optional frozen preprocessing -> encoder -> projection to the fusion width.

    Args:
        encoder: any ``nn.Module``: a bridged module (``artifact.to_torch()``), a native torch
            module, or a ``transformers`` model. Called as ``encoder(*inputs)`` where ``inputs``
            are the batch tensors named by ``input_keys`` (after ``preprocess``, if any). A
            ``transformers`` model is called as ``encoder(input_ids=..., attention_mask=...)``
            and its ``last_hidden_state`` is mean-pooled over the tokens where the mask is 1.
            Other outputs are reduced to ``[N, F]``: a tuple/list -> its first item; ``[N, T, F]``
            with a ``[N, T]`` mask input -> masked mean; any other rank > 2 -> flattened.
        preprocess: optional module applied to the inputs first (e.g. an ORT bridge taking uint8
            NHWC images and returning float NCHW). Always frozen: it gets no gradients
            (``requires_grad`` False), runs under ``torch.no_grad()`` and stays in eval mode.
            A tuple output is splatted into the encoder.
        input_keys: the batch keys this branch reads, in call order. Default ``None``: the
            branch name, plus ``"<name>_mask"`` for ``transformers`` models (``"text"`` ->
            ``("text", "text_mask")``).
        mask_key: the one of ``input_keys`` that holds a token mask ``[N, T]`` (1 = token); an
            encoder output ``[N, T, F]`` is then mean-pooled over the tokens where it is 1.
            Declared, never guessed from the key's name. Default ``None``: no mask (for a
            ``transformers`` model with default ``input_keys``, ``"<name>_mask"``). The YAML
            config fills it in from the data modality (``text_mask`` for ``text``).
        out_dim: width F of the pooled encoder output; ``None`` infers it (see :func:`compose`).
        trainable: False freezes the encoder: ``requires_grad`` False, run under
            ``no_grad``, eval mode kept even after ``model.train()``. The projection always trains.
            Declared, never implied: an inference-only encoder (one whose class sets
            ``mmbridge_frozen = True``, as an onnxruntime ``to_ort()`` module does) with
            ``trainable=True`` raises :class:`~mmbridge.errors.ConfigError`.
        projection: add ``Linear(F, fusion_dim)``; False requires ``F == fusion_dim``.

    Attributes set by :func:`compose`: ``name``, ``proj`` (the projection or ``nn.Identity``).

    Raises:
        TypeError: ``encoder`` / ``preprocess`` is not an ``nn.Module``.
        ConfigError: an onnxruntime encoder with ``trainable=True``; a ``mask_key`` that is not
            one of ``input_keys``.

    Defaults come from :class:`~mmbridge.composition.config.BranchConfig`.
    """

    def __init__(self, encoder: nn.Module, *, preprocess: nn.Module | None = None,
                 input_keys: Sequence[str] | None = BranchConfig.input_keys,
                 mask_key: str | None = BranchConfig.mask_key, out_dim: int | None = BranchConfig.out_dim,
                 trainable: bool = BranchConfig.trainable, projection: bool = BranchConfig.projection):
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"Branch(encoder=...) must be a torch.nn.Module, got {type(encoder).__name__}")
        if preprocess is not None and not isinstance(preprocess, nn.Module):
            raise TypeError(f"Branch(preprocess=...) must be a torch.nn.Module or None, got {type(preprocess).__name__}")
        if trainable and is_frozen_module(encoder):
            raise ConfigError(
                f"Branch(encoder=<{type(encoder).__name__}>, trainable=True): an onnxruntime branch has no gradients "
                "and cannot train; pass trainable=False, or use artifact.to_torch() for a trainable encoder"
            )
        if mask_key is not None and input_keys is not None and mask_key not in tuple(input_keys):
            raise ConfigError(f"Branch(mask_key={mask_key!r}): not one of input_keys {list(input_keys)}; pass "
                              f"the batch key of the token mask, or mask_key=None")
        self.encoder = encoder
        self.preprocess = preprocess
        self.input_keys: tuple[str, ...] | None = tuple(input_keys) if input_keys is not None else None
        self.mask_key = mask_key
        self.out_dim = out_dim
        self.trainable = bool(trainable)
        self.use_projection = bool(projection)
        self.is_hf = is_hf_model(encoder)
        self.name = ""
        self.proj: nn.Module = nn.Identity()
        if preprocess is not None:
            preprocess.requires_grad_(False)
            preprocess.eval()
        if not self.trainable:
            encoder.requires_grad_(False)
            encoder.eval()

    def train(self, mode: bool = True) -> Branch:
        """Set train/eval mode; frozen parts (preprocess, frozen encoder) stay in eval mode."""
        super().train(mode)
        if self.preprocess is not None:
            self.preprocess.eval()
        if not self.trainable:
            self.encoder.eval()
        return self

    # -- stages --------------------------------------------------------------------------------
    def available(self, batch: Mapping[str, Any]) -> bool:
        """True when every key of ``input_keys`` is in ``batch`` and not None."""
        return all(batch.get(k) is not None for k in self.input_keys or ())

    def frozen_forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Run the frozen part (no gradients). Returns a dict for :meth:`trainable_forward`."""
        args = [batch[k] for k in self.input_keys]
        mask = batch[self.mask_key] if self.mask_key is not None else None
        if self.preprocess is not None:
            with torch.no_grad():
                out = self.preprocess(*args)
            args = list(out) if isinstance(out, (tuple, list)) else [out]
        if not self.trainable:
            with torch.no_grad():
                return {"feat": self.encode(args, mask)}
        return {"args": args, "mask": mask}

    def trainable_forward(self, state: Mapping[str, Any]) -> torch.Tensor:
        """Run the trainable part on :meth:`frozen_forward`'s output; returns ``[N, D]``."""
        feat = state["feat"] if "feat" in state else self.encode(state["args"], state["mask"])
        return self.proj(feat)

    def encode(self, args: Sequence[Any], mask: torch.Tensor | None) -> torch.Tensor:
        """Encoder + pooling: returns the pooled features ``[N, F]``."""
        if self.is_hf:
            out = self.encoder(input_ids=args[0], attention_mask=args[1] if len(args) > 1 else None)
            return masked_mean(out.last_hidden_state, args[1] if len(args) > 1 else None)
        return _pool(self.encoder(*args), mask)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, input_keys={self.input_keys}, mask_key={self.mask_key!r}, out_dim={self.out_dim}, "
                f"trainable={self.trainable}")


class _TrainableStage(nn.Module):
    """The modules of a :class:`HybridModel` that train, for DDP (parameters shared, not copied)."""

    def __init__(self, model: HybridModel):
        super().__init__()
        object.__setattr__(self, "_owner", model)  # not a submodule: DDP must not see frozen parts
        self.encoders = nn.ModuleList([b.encoder for b in model.branches.values() if b.trainable])
        self.projections = nn.ModuleList([b.proj for b in model.branches.values()])
        self.fusion = model.fusion
        self.head = model.head

    def forward(self, state: dict[str, Any], return_embeddings: bool = False) -> Any:
        return self._owner.trainable_stage(state, return_embeddings=return_embeddings)


class HybridModel(nn.Module):
    """Branches + fusion head + task head (build it with :func:`compose`).

    Args:
        branches: name -> :class:`Branch` (projections already built).
        fusion: the fusion head module (see :mod:`mmbridge.composition.heads`).
        head: the task head module.
        modality_dropout: probability of dropping each present branch per sample at train time.
        task: task head name (``"classification"`` or ``"regression"``), kept for the trainer.
    """

    def __init__(self, branches: Mapping[str, Branch], fusion: nn.Module, head: nn.Module, *,
                 modality_dropout: float = 0.0, task: str = "classification"):
        super().__init__()
        self.branches = nn.ModuleDict(dict(branches))
        self.fusion = fusion
        self.head = head
        self.modality_dropout = float(modality_dropout)
        self.task = task
        self.names = list(self.branches)
        self._trainable_stage: _TrainableStage | None = None
        self.feature_cache: FeatureCache | None = None

    def enable_feature_cache(self, *, device: str | torch.device | None = None,
                             max_bytes: int | None = None) -> FeatureCache:
        """Cache frozen branches' pooled features by row id (see :mod:`mmbridge.composition.feature_cache`).

        Off by default for :func:`compose` users; the training recipe turns it on
        (``training.feature_cache``). Only deterministic frozen branches are cached (no parameter
        requires grad, every submodule in eval mode); the key also holds the branch's parameter
        bytes and each row's input bytes, so changed weights or inputs are recomputed.

        Args:
            device: None (default): features stay on the model's device; ``"cpu"``: host memory.
            max_bytes: cap on stored feature bytes (default 2 GiB).

        Returns:
            The cache (also ``model.feature_cache``); calling again keeps an existing one.
        """
        if self.feature_cache is None:
            kw = {} if max_bytes is None else {"max_bytes": int(max_bytes)}
            self.feature_cache = FeatureCache(device=device, **kw)
        return self.feature_cache

    def disable_feature_cache(self) -> None:
        """Drop the feature cache (every frozen branch is computed each step again)."""
        self.feature_cache = None

    @property
    def input_keys(self) -> list[str]:
        """Every batch key some branch reads."""
        return sorted({k for b in self.branches.values() for k in b.input_keys})

    def frozen_stage(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Preprocessing and frozen encoders (no gradients); skips branches whose keys are missing.

        Args:
            batch: dict of tensors with a leading batch axis N, keyed as the branches'
                ``input_keys`` (e.g. ``"image"`` uint8 ``[N, H, W, 3]``, ``"text"`` int64
                ``[N, T]``, ``"text_mask"`` int64 ``[N, T]``, ``"numeric"`` float32 ``[N, F]``).
                Optional ``"<branch>_present"`` (bool or 0/1 ``[N]``) marks per sample whether
                that branch's input is real (rows with 0 are masked like a missing modality;
                their input values are still computed but ignored).

        Returns:
            ``{"n": N, "branches": {name: state or None}, "masks": {name: [N] presence}}``
            (None = modality missing from the batch).

        Raises:
            MMBridgeError: no branch has its inputs in ``batch``.
        """
        states: dict[str, Any] = {}
        n = None
        for name, branch in self.branches.items():
            if branch.available(batch):
                cache = self.feature_cache
                states[name] = (cache.frozen_forward(branch, batch) if cache is not None
                                else branch.frozen_forward(batch))
                if n is None:
                    n = int(batch[branch.input_keys[0]].shape[0])
            else:
                states[name] = None
        masks = {name: batch[f"{name}_present"] for name in self.branches
                 if states[name] is not None and batch.get(f"{name}_present") is not None}
        if n is None:
            raise MMBridgeError(
                f"none of the model's inputs is in the batch: the branches read {self.input_keys} but the "
                f"batch has keys {sorted(batch)}; pass at least one modality"
            )
        return {"n": n, "branches": states, "masks": masks}

    def trainable_stage(self, state: Mapping[str, Any], *, return_embeddings: bool = False) -> Any:
        """Trainable encoders, projections, modality dropout, fusion and task head.

        Args:
            state: the output of :meth:`frozen_stage`.
            return_embeddings: also return the per-branch embeddings.

        Returns:
            logits ``[N, C]`` (float; bf16/fp16 under autocast), or with ``return_embeddings`` a
            dict ``{"logits": [N, C], "embeddings": {name: [N, D]}, "present": bool [N, M]}``
            where embeddings of missing or dropped branches are zero.
        """
        n = state["n"]
        tokens: dict[str, torch.Tensor] = {}
        for name, s in state["branches"].items():
            if s is not None:
                tokens[name] = self.branches[name].trainable_forward(s)
        ref = next(iter(tokens.values()))
        # built on the device without a host round trip (no list -> tensor copy, no sync)
        # (new_ones / new_zeros rather than torch.full(bool): the TorchScript ONNX exporter has no bool full)
        present = torch.stack([(ref.new_ones if state["branches"][k] is not None else ref.new_zeros)((n,), dtype=torch.bool)
                               for k in self.names], dim=1)  # [N, M]
        masks = state.get("masks", {})
        for name, mask in masks.items():  # per-sample presence, e.g. rows without numeric data
            present[:, self.names.index(name)] &= mask.to(device=present.device, dtype=torch.bool)
        if masks:  # only per-sample masks can leave a row with no modality
            _check_rows_present(present)
        stacked = torch.stack(
            [tokens[k].to(ref.dtype) if k in tokens else ref.new_zeros(ref.shape) for k in self.names], dim=1
        )  # [N, M, D]
        if self.training and self.modality_dropout > 0:
            present = self._drop_modalities(present)
        stacked = stacked * present.unsqueeze(-1).to(stacked.dtype)
        logits = self.head(self.fusion(stacked, present))
        if not return_embeddings:
            return logits
        return {"logits": logits, "embeddings": {k: stacked[:, i] for i, k in enumerate(self.names)},
                "present": present}

    def _drop_modalities(self, present: torch.Tensor) -> torch.Tensor:
        """Drop each present branch with probability p per sample; keep >= 1 per sample."""
        drop = torch.rand(present.shape, device=present.device) < self.modality_dropout
        keep = present & ~drop
        empty = ~keep.any(1)
        # give back one random present modality to rows that lost all; computed for every row
        # (no `if empty.any()`: that would be a host sync per step)
        score = torch.rand(present.shape, device=present.device) * present
        pick = nn.functional.one_hot(score.argmax(1), present.shape[1]).bool()
        return torch.where(empty.unsqueeze(1), pick & present, keep)

    def forward(self, batch: Mapping[str, Any], return_embeddings: bool = False) -> Any:
        """``trainable_stage(frozen_stage(batch))``.

        Args:
            batch: dict of tensors (see :meth:`frozen_stage`); missing modalities are skipped
                (their token is zero and masked in fusion).
            return_embeddings: also return per-branch embeddings (see :meth:`trainable_stage`).

        Returns:
            logits ``[N, C]``, or a dict with ``"logits"``, ``"embeddings"``, ``"present"``.

        Raises:
            MMBridgeError: the batch holds none of the branches' inputs.
        """
        return self.trainable_stage(self.frozen_stage(batch), return_embeddings=return_embeddings)

    def trainable_module(self) -> nn.Module:
        """An ``nn.Module`` over the trainable stage only (what DDP should wrap).

        Its ``forward(state, return_embeddings=False)`` takes :meth:`frozen_stage`'s output. It
        shares parameters with this model; frozen branches and preprocessing are not in it.
        """
        if self._trainable_stage is None:
            object.__setattr__(self, "_trainable_stage", _TrainableStage(self))
        return self._trainable_stage

    def param_counts(self) -> dict[str, dict[str, int]]:
        """``{branch or "fusion"/"head": {"trainable": n, "frozen": n}}`` parameter counts."""
        out = {}
        parts = {**{k: v for k, v in self.branches.items()}, "fusion": self.fusion, "head": self.head}
        for k, m in parts.items():
            t = sum(p.numel() for p in m.parameters() if p.requires_grad)
            f = sum(p.numel() for p in m.parameters() if not p.requires_grad)
            out[k] = {"trainable": t, "frozen": f}
        return out

    def describe(self) -> str:
        """A short multi-line summary: each branch, its keys, kind and trainable/frozen params."""
        lines = []
        counts = self.param_counts()
        for k, b in self.branches.items():
            kind = "transformers" if b.is_hf else type(b.encoder).__name__
            pre = f" <- {type(b.preprocess).__name__}" if b.preprocess is not None else ""
            lines.append(f"  {k:10} {list(b.input_keys)}{pre} -> {kind} ({b.out_dim}) "
                         f"{'trainable' if b.trainable else 'frozen'}; params {counts[k]['trainable']:,} trainable, "
                         f"{counts[k]['frozen']:,} frozen")
        lines.append(f"  fusion     {type(self.fusion).__name__} -> {type(self.head).__name__}; modality "
                     f"dropout {self.modality_dropout}")
        return "\n".join(lines)


def _check_rows_present(present: torch.Tensor) -> None:
    """Raise :class:`MMBridgeError` naming the rows of ``present [N, M]`` with no modality.

    Asynchronous: ``torch._assert_async`` queues the check on the device (no host sync on
    CUDA, where a failure surfaces as a device-side assert at the next sync); the rows are
    listed only after it failed.
    """
    ok = present.any(1).all()
    try:
        torch._assert_async(ok, "a batch row has no modality present (every <name>_present is 0)")
    except RuntimeError as exc:
        rows = torch.nonzero(~present.any(1)).flatten().tolist()
        raise MMBridgeError(f"batch rows {rows[:10]} have no modality present (every <name>_present is 0); "
                            f"drop them or provide at least one modality") from exc


def _guess_out_dim(branch: Branch) -> int | None:
    enc = branch.encoder
    if branch.is_hf:
        return int(enc.config.hidden_size)
    for attr in ("out_dim", "output_dim", "embed_dim", "num_features", "hidden_size", "out_features"):
        v = getattr(enc, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _spec_batch(branch: Branch) -> dict[str, torch.Tensor] | None:
    """A 2-sample batch from the ``input_specs`` of the preprocess / encoder, if they have them."""
    first = branch.preprocess if branch.preprocess is not None else branch.encoder
    specs = getattr(first, "input_specs", None)
    if not specs or len(specs) != len(branch.input_keys):
        return None
    return {k: torch.from_numpy(s.sample(batch=2)) for k, s in zip(branch.input_keys, specs)}


def _dry_run_out_dim(branch: Branch, batch: Mapping[str, Any]) -> int:
    small = {k: v[:2] for k, v in batch.items() if isinstance(v, torch.Tensor)}
    modes = [m.training for m in branch.modules()]
    branch.eval()
    try:
        with torch.no_grad():
            state = branch.frozen_forward(small)
            feat = state["feat"] if "feat" in state else branch.encode(state["args"], state["mask"])
    finally:
        for m, mode in zip(branch.modules(), modes):
            m.training = mode
    return int(feat.shape[1])


def compose(
    branches: Mapping[str, Branch | nn.Module],
    *,
    fusion: str = ModelConfig.fusion,
    task: str = ModelConfig.task,
    num_classes: int | None = None,
    fusion_dim: int = ModelConfig.fusion_dim,
    modality_dropout: float = ModelConfig.modality_dropout,
    example_batch: Mapping[str, Any] | None = None,
    task_kwargs: Mapping[str, Any] | None = None,
    **head_kwargs: Any,
) -> HybridModel:
    """Build a :class:`HybridModel` from named branches.

    Defaults (``fusion``, ``task``, ``fusion_dim``, ``modality_dropout``) come from
    :class:`~mmbridge.composition.config.ModelConfig`, the same dataclass the YAML ``model``
    section is read into.

    Args:
        branches: name -> :class:`Branch`, or a bare ``nn.Module`` (becomes
            ``Branch(module)``, reading the batch key of the same name). Order = token order.
        fusion: a :data:`mmbridge.fusion_heads` name: ``"concat"``, ``"gated"``, ``"attention"``.
        task: a :data:`mmbridge.task_heads` name: ``"classification"`` or ``"regression"``.
        num_classes: C for classification (>= 2); number of outputs for regression (default 1).
        fusion_dim: D, the projection width of every branch and the fusion width (default 128).
        modality_dropout: probability in ``[0, 1)`` of dropping each branch per sample during
            training (its token is zeroed and masked); at least one branch is always kept.
        example_batch: a batch (dict of tensors, leading N) used to infer branches'
            ``out_dim`` by a dry run. Needed only when a branch has ``out_dim=None`` and its
            width cannot be read from the encoder (``config.hidden_size`` of a ``transformers``
            model; an ``out_dim`` / ``embed_dim`` / ``num_features`` / ``out_features`` int attribute) or from the
            ``input_specs`` of its preprocess / encoder (bridged modules).
        task_kwargs: extra keyword arguments of the task head (e.g. ``{"dropout": 0.1}``).
        **head_kwargs: extra keyword arguments of the fusion head (e.g. ``num_layers=1`` for
            ``"attention"``).

    Returns:
        The :class:`HybridModel` (in train mode; frozen parts in eval mode).

    Raises:
        ConfigError: no branches, a bad ``fusion_dim`` / ``modality_dropout``, an ``out_dim``
            that cannot be inferred, ``projection=False`` with ``out_dim != fusion_dim``.
        RegistryError: unknown fusion or task head name (with close matches).
    """
    if not branches:
        raise ConfigError("compose(): branches is empty; pass at least one {name: Branch(...)}")
    if not isinstance(fusion_dim, int) or fusion_dim < 1:
        raise ConfigError(f"compose(): fusion_dim must be a positive int, got {fusion_dim!r}")
    if not 0.0 <= float(modality_dropout) < 1.0:
        raise ConfigError(f"compose(): modality_dropout must be in [0, 1), got {modality_dropout!r}")
    fusion_cls = fusion_heads.get(fusion)
    task_cls = task_heads.get(task)
    built: dict[str, Branch] = {}
    for name, b in branches.items():
        if not isinstance(b, Branch):
            if not isinstance(b, nn.Module):
                raise ConfigError(f"compose(): branch {name!r} is a {type(b).__name__}; pass a Branch or an nn.Module")
            b = Branch(b)
        b.name = name
        if b.input_keys is None:
            b.input_keys = (name, f"{name}_mask") if b.is_hf else (name,)
            if b.is_hf and b.mask_key is None:
                b.mask_key = f"{name}_mask"
        if b.mask_key is not None and b.mask_key not in b.input_keys:
            raise ConfigError(f"compose(): branch {name!r} has mask_key={b.mask_key!r}, which is not one of its "
                              f"input_keys {list(b.input_keys)}")
        if b.out_dim is None:
            b.out_dim = _guess_out_dim(b)
        if b.out_dim is None:
            sample = example_batch if example_batch is not None and b.available(example_batch) else _spec_batch(b)
            if sample is None:
                raise ConfigError(
                    f"compose(): cannot infer out_dim of branch {name!r} ({type(b.encoder).__name__}): pass "
                    f"Branch(..., out_dim=F) or compose(..., example_batch=batch) holding keys {list(b.input_keys)}"
                )
            b.out_dim = _dry_run_out_dim(b, sample)
        if b.use_projection:
            b.proj = nn.Linear(b.out_dim, fusion_dim)
        elif b.out_dim != fusion_dim:
            raise ConfigError(
                f"compose(): branch {name!r} has projection=False but out_dim={b.out_dim} != fusion_dim={fusion_dim}; "
                f"set projection=True or fusion_dim={b.out_dim}"
            )
        built[name] = b
    fusion_mod = fusion_cls(num_modalities=len(built), dim=fusion_dim, **head_kwargs)
    head = task_cls(fusion_mod.out_dim, num_classes=num_classes, **dict(task_kwargs or {}))
    model = HybridModel(built, fusion_mod, head, modality_dropout=modality_dropout, task=task)
    return model.train()
