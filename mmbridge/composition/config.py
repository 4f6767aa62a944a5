"""The ``model`` section as frozen dataclasses, and the registry of branch component types.

These dataclasses are the one source of the model's defaults: the YAML schema
(:mod:`mmbridge.train.config`), CLI ``model.*=value`` overrides, :func:`mmbridge.compose` and
:class:`~mmbridge.composition.Branch` all read them from here, so they cannot disagree.

* :class:`ModelConfig`: branches, fusion head (``fusion``, ``fusion_dim``, ``fusion_kwargs``),
  task head (``task``, ``task_kwargs``) and ``modality_dropout``;
* :class:`BranchConfig`: one branch (``encoder`` and optional ``preprocess`` components,
  ``input_keys``, ``mask_key``, ``out_dim``, ``trainable``, ``projection``);
* :class:`ComponentConfig`: the base of an encoder / preprocess component's config; each
  component ``type`` is one entry of :data:`components` (its config dataclass and its builder),
  registered with :func:`register_component`. The built-in types are registered by
  :mod:`mmbridge.train.components` (their builders need the data, artifact and export layers).

Every ``from_dict`` appends its problems to a list (``"<where>: <what is wrong>; <what to do>"``)
instead of raising, so that a config reports every problem at once; the caller raises one
:class:`~mmbridge.errors.ConfigError` (see :func:`mmbridge.train.config.load_config`).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mmbridge._registry import Registry, close_matches

__all__ = ["BranchConfig", "BuildContext", "ComponentConfig", "ComponentType", "ModelConfig", "components",
           "component_from_dict", "register_component"]


# -- small validation helpers (shared with mmbridge.train.config) ---------------------------------
def is_int(v: Any, lo: int | None = None) -> bool:
    """An int (not a bool), ``>= lo`` when given."""
    return isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)


def is_num(v: Any) -> bool:
    """An int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check(cond: bool, problems: list[str], msg: str) -> None:
    """Append ``msg`` to ``problems`` unless ``cond``."""
    if not cond:
        problems.append(msg)


def unknown_keys(where: str, given: Mapping[str, Any], known: Sequence[str], problems: list[str]) -> None:
    """One problem per key of ``given`` not in ``known``, with the closest known key."""
    for k in given:
        if k not in known:
            close = close_matches(k, known)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {sorted(known)}"
            problems.append(f"{where + '.' if where else ''}{k}: unknown key; {hint}")


def known_fields(cls: type, raw: Mapping[str, Any], where: str, problems: list[str], *,
                 skip: Collection[str] = ()) -> dict[str, Any]:
    """The items of ``raw`` that are fields of the dataclass ``cls``; the others are reported."""
    names = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in skip]
    unknown_keys(where, {k: v for k, v in raw.items() if k not in skip}, names, problems)
    return {k: v for k, v in raw.items() if k in names}


def plain(value: Any) -> Any:
    """``value`` with tuples as lists and mappings as dicts (for YAML), deep-copied."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return copy.deepcopy(value)


# -- components -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ComponentConfig:
    """Base of an encoder / preprocess component's config (``{type: NAME, key: value...}``).

    Subclasses are frozen dataclasses whose fields are the component's keys (with their
    defaults) and that set the class attribute ``type``; override :meth:`validate` for checks
    beyond the keys, and :attr:`inference_only` when the component cannot train.
    """

    type: ClassVar[str] = ""

    @property
    def inference_only(self) -> bool:
        """True when the built module has no gradients (an onnxruntime bridge)."""
        return False

    def validate(self, where: str, problems: list[str]) -> None:
        """Append this component's problems (values of its keys) to ``problems``."""

    def to_dict(self) -> dict[str, Any]:
        """``{"type": ..., **keys}`` as in the YAML."""
        return {"type": self.type, **{f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, where: str, problems: list[str]) -> ComponentConfig:
        """The config of ``raw`` (``type`` ignored), defaults filled; problems appended."""
        obj = cls(**known_fields(cls, raw, where, problems, skip=("type",)))
        obj.validate(where, problems)
        return obj


@dataclass(frozen=True)
class BuildContext:
    """What a component builder gets besides its config.

    Attributes:
        where: the config path of the component, for messages (``model.branches.text.encoder``).
        role: ``"encoder"`` or ``"preprocess"``.
        trainable: the branch's ``trainable`` (a preprocess is always built frozen).
        train_ds: the train split (``vocab_size``, ``num_features``, ``stats``), or None.
        ort_provider_options: onnxruntime CUDA execution-provider options for ORT bridges, chosen to
            agree with torch's numerics (:func:`mmbridge.train.distributed.numerics`: TF32, conv
            algorithm search under ``training.deterministic``); empty: onnxruntime's defaults.
    """

    where: str
    role: str = "encoder"
    trainable: bool = True
    train_ds: Any = None
    ort_provider_options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ComponentType:
    """One registered component type: its config dataclass and its builder.

    Attributes:
        name: the YAML ``type``.
        config: the :class:`ComponentConfig` subclass holding its keys and defaults.
        build: ``build(config, ctx: BuildContext) -> nn.Module``.
        roles: where it may appear: ``"encoder"`` and / or ``"preprocess"``.
        keras: the Keras layers ``framework: keras`` builds for it
            (:mod:`mmbridge.baselines.keras_run`), or None when it has no Keras counterpart.
        description: one line for listings.
    """

    name: str
    config: type[ComponentConfig]
    build: Callable[..., Any]
    roles: tuple[str, ...] = ("encoder",)
    keras: str | None = None
    description: str = ""


#: Encoder / preprocess component types (YAML ``type``): name -> :class:`ComponentType`.
components: Registry[ComponentType] = Registry("component type", "mmbridge.composition.components.names()")


def register_component(config: type[ComponentConfig], *, roles: Sequence[str] = ("encoder",),
                       keras: str | None = None, override: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: register ``build(config, ctx) -> nn.Module`` as component type ``config.type``.

    A new encoder type is this one entry: a frozen :class:`ComponentConfig` subclass (its YAML
    keys and defaults) and its builder. The decorator returns the builder unchanged.

    Example::

        @dataclass(frozen=True)
        class TinyConfig(ComponentConfig):
            type: ClassVar[str] = "tiny"
            width: int = 8

        @register_component(TinyConfig)
        def build_tiny(cfg: TinyConfig, ctx: BuildContext) -> nn.Module:
            return nn.LazyLinear(cfg.width)

    Raises:
        RegistryError: the type is already registered and ``override`` is False.
        ValueError: ``config`` is not a :class:`ComponentConfig` dataclass with a ``type``, or a
            role other than ``encoder`` / ``preprocess``.
    """
    if not (isinstance(config, type) and issubclass(config, ComponentConfig) and dataclasses.is_dataclass(config)
            and config.type):
        raise ValueError(f"register_component({config!r}): pass a frozen ComponentConfig dataclass that sets "
                         f"the class attribute type = 'name'")
    bad = [r for r in roles if r not in ("encoder", "preprocess")]
    if bad or not roles:
        raise ValueError(f"register_component({config.type!r}): roles must be 'encoder' and/or 'preprocess', "
                         f"got {list(roles)}")

    def deco(build: Callable) -> Callable:
        doc = (config.__doc__ or "").strip().split("\n")[0]
        components.register(config.type, ComponentType(config.type, config, build, tuple(roles), keras, doc),
                            override=override)
        return build

    return deco


def component_types(role: str) -> list[str]:
    """The registered type names that may appear as ``role`` (``"encoder"`` / ``"preprocess"``)."""
    return [n for n in components.names() if role in components.get(n).roles]


def component_from_dict(raw: Any, *, where: str, role: str, problems: list[str],
                        required: bool) -> ComponentConfig | None:
    """The component config of ``raw`` (``{type: ..., ...}``), or None when absent or unusable.

    Unknown types are reported with the registry's closest name; unknown keys with the closest key.
    """
    types = component_types(role)
    if raw is None:
        if required:
            problems.append(f"{where}: missing; give {{type: ...}} with type one of {types}")
        return None
    if isinstance(raw, ComponentConfig):
        return raw
    if not isinstance(raw, Mapping) or "type" not in raw:
        problems.append(f"{where}: must be a mapping with a 'type' (one of {types}), got {raw!r}")
        return None
    kind = raw["type"]
    if not isinstance(kind, str) or kind not in types:
        close = components.suggest(kind, among=types)
        problems.append(f"{where}.type: unknown {kind!r}" + (f"; did you mean {close[0]!r}?" if close else f"; known: {types}"))
        return None
    return components.get(kind).config.from_dict(raw, where=where, problems=problems)


# -- branches and the model -------------------------------------------------------------------
@dataclass(frozen=True)
class BranchConfig:
    """One branch of ``model.branches`` (and the defaults of :class:`~mmbridge.composition.Branch`).

    Attributes:
        input_keys: batch keys the branch reads, in call order; None: the YAML resolves them from
            the data modality of the branch's name (``text`` -> ``[text, text_mask]``), and
            :func:`~mmbridge.compose` uses the branch name (plus ``<name>_mask`` for a
            ``transformers`` model).
        mask_key: the one of ``input_keys`` that is a token mask ``[N, T]`` (1 = token), used to
            mean-pool ``[N, T, F]`` encoder outputs; None: no mask (the YAML fills in the mask key
            its data modality declares, e.g. ``text_mask``).
        preprocess: an optional, always frozen, component (types with the ``preprocess`` role).
        encoder: the encoder component.
        out_dim: the encoder's output width; None: inferred.
        trainable: train the encoder (an onnxruntime encoder must say false).
        projection: add ``Linear(out_dim, fusion_dim)``; false requires ``out_dim == fusion_dim``.
    """

    input_keys: tuple[str, ...] | None = None
    mask_key: str | None = None
    preprocess: ComponentConfig | None = None
    encoder: ComponentConfig | None = None
    out_dim: int | None = None
    trainable: bool = True
    projection: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The branch as in the YAML (components as ``{type: ...}`` mappings)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, ComponentConfig) else plain(v)
        return out

    @classmethod
    def from_dict(cls, raw: Any, *, where: str, problems: list[str], default_input_keys: Sequence[str] | None = None,
                  mask_keys: Collection[str] = ()) -> BranchConfig | None:
        """The branch of ``raw``; None when ``raw`` is not a mapping (reported).

        Args:
            raw: the YAML mapping of the branch.
            where: its config path (``model.branches.text``).
            problems: list to append to.
            default_input_keys: ``input_keys`` when ``raw`` has none.
            mask_keys: batch keys the data declares as token masks; ``mask_key`` defaults to the
                first of them among ``input_keys``.
        """
        if isinstance(raw, BranchConfig):
            return raw
        if not isinstance(raw, Mapping):
            problems.append(f"{where}: must be a mapping with an 'encoder', got {raw!r}")
            return None
        given = known_fields(cls, raw, where, problems)
        enc = component_from_dict(given.get("encoder"), where=f"{where}.encoder", role="encoder", problems=problems,
                                  required=True)
        pre = component_from_dict(given.get("preprocess"), where=f"{where}.preprocess", role="preprocess",
                                  problems=problems, required=False)
        keys = given.get("input_keys")
        if keys is None and default_input_keys is not None:
            keys = list(default_input_keys)
        if keys is not None:
            if not isinstance(keys, (list, tuple)) or not keys or not all(isinstance(k, str) for k in keys):
                problems.append(f"{where}.input_keys: must be a non-empty list of batch keys, got {keys!r}")
            else:
                keys = tuple(keys)
        mask = given.get("mask_key")
        if "mask_key" not in given and isinstance(keys, tuple):
            mask = next((k for k in keys if k in mask_keys), None)
        elif mask is not None and not (isinstance(mask, str) and isinstance(keys, tuple) and mask in keys):
            problems.append(f"{where}.mask_key: must be one of input_keys {list(keys) if keys else keys} or null, "
                            f"got {mask!r}")
        obj = cls(**{**given, "encoder": enc, "preprocess": pre, "input_keys": keys, "mask_key": mask})
        for key in ("trainable", "projection"):
            v = getattr(obj, key)
            check(isinstance(v, bool), problems, f"{where}.{key}: must be true or false, got {v!r}")
        check(obj.out_dim is None or is_int(obj.out_dim, 1), problems,
              f"{where}.out_dim: must be a positive int or null (inferred), got {obj.out_dim!r}")
        if enc is not None and enc.inference_only and obj.trainable is True:
            problems.append(f"{where}: an onnxruntime (backend: ort) encoder cannot train; set trainable: false "
                            f"or backend: torch")
        return obj


@dataclass(frozen=True)
class ModelConfig:
    """The ``model`` section (and the defaults of :func:`mmbridge.compose`).

    Attributes:
        branches: name -> :class:`BranchConfig`; order = token order in fusion.
        fusion: a :data:`mmbridge.fusion_heads` name (``concat``, ``gated``, ``attention``).
        fusion_dim: D, the projection width of every branch and the fusion width. Default 128
            (the width every example config uses; ``compose`` used to default to 256).
        fusion_kwargs: keyword arguments of the fusion head (``{num_layers: 1, num_heads: 4}``).
        task: a :data:`mmbridge.task_heads` name (``classification``, ``regression``).
        task_kwargs: keyword arguments of the task head (``{dropout: 0.1}``).
        modality_dropout: probability in ``[0, 1)`` of dropping each branch per training sample.
    """

    branches: Mapping[str, BranchConfig] = field(default_factory=dict)
    fusion: str = "concat"
    fusion_dim: int = 128
    fusion_kwargs: Mapping[str, Any] = field(default_factory=dict)
    task: str = "classification"
    task_kwargs: Mapping[str, Any] = field(default_factory=dict)
    modality_dropout: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The section as in the YAML."""
        out = {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "branches"}
        return {"branches": {k: b.to_dict() for k, b in self.branches.items()}, **out}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, problems: list[str], where: str = "model",
                  default_input_keys: Callable[[str], Sequence[str] | None] | None = None,
                  mask_keys: Collection[str] = ()) -> ModelConfig:
        """The section of ``raw``, defaults filled; every problem appended to ``problems``.

        Args:
            raw: the YAML mapping.
            problems: list to append to.
            where: the section's name in messages.
            default_input_keys: ``branch name -> input_keys`` for branches that give none.
            mask_keys: batch keys the data declares as token masks (see :class:`BranchConfig`).
        """
        from mmbridge.composition.heads import fusion_heads, task_heads  # torch only; no TF / ORT

        given = known_fields(cls, raw, where, problems)
        m = {**{f.name: getattr(cls, f.name) for f in dataclasses.fields(cls) if f.name not in
                ("branches", "fusion_kwargs", "task_kwargs")}, "fusion_kwargs": {}, "task_kwargs": {}, **given}
        for key, registry, what in (("fusion", fusion_heads, "fusion head"), ("task", task_heads, "task head")):
            if not isinstance(m[key], str) or m[key] not in registry:
                close = registry.suggest(m[key])
                problems.append(f"{where}.{key}: unknown {what} {m[key]!r}"
                                + (f"; did you mean {close[0]!r}?" if close else f"; known: {registry.names()}"))
        check(is_int(m["fusion_dim"], 1), problems, f"{where}.fusion_dim: must be a positive int, got {m['fusion_dim']!r}")
        check(is_num(m["modality_dropout"]) and 0 <= m["modality_dropout"] < 1, problems,
              f"{where}.modality_dropout: must be a number in [0, 1), got {m['modality_dropout']!r}")
        for key, head, registry in (("fusion_kwargs", "fusion", fusion_heads), ("task_kwargs", "task", task_heads)):
            if not isinstance(m[key], Mapping):
                problems.append(f"{where}.{key}: must be a mapping, got {m[key]!r}")
                continue
            name = m[head]
            if isinstance(name, str) and name in registry:
                accepted = _keyword_args(registry.get(name))
                for k in m[key]:
                    if accepted is not None and k not in accepted:
                        problems.append(f"{where}.{key}.{k}: not an argument of the {name!r} head; it takes "
                                        f"{sorted(accepted)}")
        fusion = m["fusion"]
        if isinstance(fusion, str) and fusion in fusion_heads and is_int(m["fusion_dim"], 1) \
                and isinstance(m["fusion_kwargs"], Mapping):
            own = getattr(fusion_heads.get(fusion), "config_problems", None)
            if own is not None:
                problems += [f"{where}.{p}" for p in own(m["fusion_dim"], dict(m["fusion_kwargs"]))]
        raw_branches = given.get("branches")
        branches: dict[str, BranchConfig] = {}
        if not isinstance(raw_branches, Mapping) or not raw_branches:
            problems.append(f"{where}.branches: needs at least one branch, e.g. {{image: {{encoder: {{type: conv}}}}}}")
        else:
            for name, b in raw_branches.items():
                keys = default_input_keys(name) if default_input_keys is not None else None
                bc = BranchConfig.from_dict(b, where=f"{where}.branches.{name}", problems=problems,
                                            default_input_keys=keys, mask_keys=mask_keys)
                if bc is not None:
                    branches[name] = bc
        m["branches"] = branches
        for key in ("fusion_kwargs", "task_kwargs"):
            if isinstance(m[key], Mapping):
                m[key] = copy.deepcopy(dict(m[key]))
        return cls(**m)


def _keyword_args(cls: Any) -> set[str] | None:
    """Keyword-only / defaulted argument names of ``cls.__init__`` (None if it takes ``**kwargs``)."""
    params = inspect.signature(cls).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.name not in ("num_modalities", "dim", "in_dim", "num_classes")}
