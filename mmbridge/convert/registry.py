"""``mmbridge.op_converters``: ONNX op -> torch converters, and the one hook that hands them to onnx2torch.

A converter is a function ``(node, graph) -> nn.Module | OperationConverterResult`` (onnx2torch's
converter signature: ``node`` an ``onnx2torch.onnx_node.OnnxNode``, ``graph`` an
``onnx2torch.onnx_graph.OnnxGraph``), registered under ``(domain, op_type, since_version)``::

    @mmbridge.op_converters.register("Shrink", since_version=9)
    def shrink(node, graph):
        return OnnxShrink(node.attributes.get("bias", 0.0), node.attributes.get("lambd", 0.5))

A bare module means "the node's inputs and outputs, in order" (``onnx_mapping_from_node``);
return an ``OperationConverterResult`` to map fewer inputs (a constant folded into the module).
One registration covers every opset from ``since_version`` until the op's next schema change:
a model's opset is resolved to the op's ``since_version`` with ``onnx.defs.get_schema(op,
max_inclusive_version=opset, domain=domain).since_version``, as onnx2torch does.

**The hook.** :func:`consult_op_converters` is a context manager that :func:`~mmbridge.convert.core.to_torch`
holds while onnx2torch runs. Inside it, the ``get_converter`` name that ``onnx2torch.converter``
calls for every node looks in :data:`op_converters` first and falls back to onnx2torch's own
table; nothing is written into onnx2torch's registry. The model's ``opset_import`` is held in a
context variable for the duration (:func:`current_opsets`), so converters that convert a
subgraph (``Loop``) use the outer model's opsets. Outside the context, in another thread or
context, onnx2torch behaves as shipped.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from mmbridge._registry import Registry, _describe, load_plugins
from mmbridge.errors import RegistryError

Converter = Callable[[Any, Any], Any]

_OP_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DEFAULT_DOMAINS = ("", "ai.onnx")


class ConverterKey(NamedTuple):
    """The key of one converter: ONNX domain (``""`` = ai.onnx), op type, the op's ``since_version``."""

    domain: str
    op_type: str
    since_version: int


def _norm_domain(domain: str) -> str:
    return "" if domain in _DEFAULT_DOMAINS else domain


def schema_versions(op_type: str, domain: str = "") -> list[int]:
    """Every ``since_version`` ONNX (the installed ``onnx``) defines for ``op_type`` in ``domain``."""
    from onnx import defs

    domain = _norm_domain(domain)
    return sorted({s.since_version for s in defs.get_all_schemas_with_history()
                   if s.name == op_type and s.domain == domain})


def resolve_since_version(op_type: str, opset: int, domain: str = "") -> int | None:
    """The ``since_version`` of ``op_type`` that a model of ``opset`` uses (None: ONNX has no such schema).

    ``onnx.defs.get_schema(op_type, max_inclusive_version=opset, domain=domain).since_version``,
    the lookup onnx2torch's ``get_converter`` does.
    """
    from onnx import defs

    try:
        return int(defs.get_schema(op_type, max_inclusive_version=int(opset), domain=_norm_domain(domain)).since_version)
    except (RuntimeError, defs.SchemaError):
        return None


class OpConverterRegistry(Registry):
    """ONNX -> torch op converters keyed by :class:`ConverterKey` ``(domain, op_type, since_version)``.

    Iterating yields the keys, sorted; ``key in registry`` tests a key (or an ``(op_type,
    since_version)`` pair in the default domain). Lookups by a model's opset go through
    :meth:`find` / :meth:`get`, which resolve the opset to the op's ``since_version``.

    Example:
        >>> reg = OpConverterRegistry("op converter", "reg.names()")
        >>> @reg.register("Relu", since_version=14)
        ... def relu(node, graph): ...
        >>> reg.find("Relu", 17) is relu
        True
    """

    def __init__(self, kind: str = "op converter", list_call: str = "mmbridge.op_converters.names()"):
        super().__init__(kind, list_call)
        self._entries: dict[ConverterKey, Converter] = {}  # type: ignore[assignment]

    def register(self, op_type: str, obj: Converter | None = None, *, since_version: int, domain: str = "",  # type: ignore[override]
                 override: bool = False) -> Any:
        """Register ``obj`` for ``(domain, op_type, since_version)``; without ``obj``, return a decorator that does.

        The decorator returns the function it wraps, unchanged, so decorators stack (one per
        version the converter supports).

        Args:
            op_type: ONNX op type (``"Gelu"``).
            obj: the converter (optional; decorator form without it).
            since_version: the op's ``since_version`` this converter is for (a version in which
                the op's schema changed, e.g. 20 for ``Gelu``); it then serves every opset up to
                the op's next schema change.
            domain: ONNX domain; ``""`` (or ``"ai.onnx"``) for standard ops.
            override: replace an existing converter for the same key.

        Raises:
            RegistryError: the key is taken and ``override`` is False; ``op_type`` is not an
                identifier; a standard-domain ``op_type`` that ONNX does not define, or a
                ``since_version`` that is not one of its schema versions (the message lists them).
        """
        key = self._key(op_type, since_version, domain)

        def _add(item: Converter) -> Converter:
            if not callable(item):
                raise RegistryError(f"{self.kind} for {_label(key)} must be callable (node, graph) -> module, "
                                    f"got {type(item).__name__}")
            old = self._entries.get(key)
            if old is not None and old is not item and not override:
                raise RegistryError(
                    f"{self.kind} for {_label(key)} is already registered (by {_describe(old)}). "
                    f"Pass override=True to replace it, or register another since_version.")
            self._entries[key] = item
            return item

        return _add if obj is None else _add(obj)

    def _key(self, op_type: str, since_version: int, domain: str) -> ConverterKey:
        if not isinstance(op_type, str) or not _OP_NAME.match(op_type):
            raise RegistryError(f"{self.kind}: op_type must be an ONNX op name such as 'Gelu', got {op_type!r}")
        if isinstance(since_version, bool) or not isinstance(since_version, int) or since_version < 1:
            raise RegistryError(f"{self.kind} for {op_type!r}: since_version must be a positive int, got {since_version!r}")
        if not isinstance(domain, str):
            raise RegistryError(f"{self.kind} for {op_type!r}: domain must be a string, got {domain!r}")
        domain = _norm_domain(domain)
        versions = schema_versions(op_type, domain)
        if domain == "" and not versions:
            from onnx import defs

            known = sorted({s.name for s in defs.get_all_schemas() if s.domain == ""})
            close = difflib.get_close_matches(op_type, known, n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise RegistryError(f"{self.kind}: ONNX has no op {op_type!r} in the default domain.{hint} "
                                f"A custom op needs its domain: register({op_type!r}, since_version=1, domain='com.example').")
        if versions and since_version not in versions:
            raise RegistryError(f"{self.kind} for {op_type!r}: {since_version} is not one of its ONNX schema versions "
                                f"{versions}. Register the since_version the converter is written for.")
        return ConverterKey(domain, op_type, since_version)

    def unregister(self, op_type: str, since_version: int, domain: str = "") -> Converter:  # type: ignore[override]
        """Remove and return the converter for ``(domain, op_type, since_version)``.

        Raises:
            RegistryError: nothing is registered under that key.
        """
        key = ConverterKey(_norm_domain(domain), op_type, since_version)
        if key not in self._entries:
            raise RegistryError(f"no {self.kind} is registered for {_label(key)}; list them with {self.list_call}.")
        return self._entries.pop(key)

    def find(self, op_type: str, opset: int, domain: str = "") -> Converter | None:
        """The converter a model of ``opset`` uses for ``op_type``, or None.

        ONNX-defined ops: the entry for the ``since_version`` that ``opset`` resolves to (an
        entry for an older version is not used: the op changed since). Ops ONNX does not know
        (custom domains): the entry with the largest ``since_version <= opset``.
        """
        domain = _norm_domain(domain)
        since = resolve_since_version(op_type, opset, domain)
        if since is not None:
            found = self._entries.get(ConverterKey(domain, op_type, since))
        else:
            versions = [k.since_version for k in self._entries
                        if k.domain == domain and k.op_type == op_type and k.since_version <= opset]
            found = self._entries.get(ConverterKey(domain, op_type, max(versions))) if versions else None
        if found is None and load_plugins():  # a plugin may have just registered it
            return self.find(op_type, opset, domain)
        return found

    def get(self, op_type: str, opset: int, domain: str = "") -> Converter:  # type: ignore[override]
        """Like :meth:`find`, but raise when nothing is registered.

        Raises:
            RegistryError: no converter for ``op_type`` at ``opset``; the message lists the
                registered versions of that op, or close op names, and the listing call.
        """
        found = self.find(op_type, opset, domain)
        if found is not None:
            return found
        domain = _norm_domain(domain)
        same = sorted(k.since_version for k in self._entries if k.domain == domain and k.op_type == op_type)
        if same:
            hint = f" Registered since_versions of {op_type!r}: {same}."
        else:
            close = difflib.get_close_matches(op_type, sorted({k.op_type for k in self._entries}), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise RegistryError(
            f"no {self.kind} for {op_type!r} (domain {domain or 'ai.onnx'}) at opset {opset}.{hint} "
            f"{len(self._entries)} are registered; list them with {self.list_call}. Add one with "
            f"@mmbridge.op_converters.register({op_type!r}, since_version=N).")

    def keys(self) -> list[ConverterKey]:
        """Every registered key, sorted."""
        load_plugins()
        return sorted(self._entries)

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted ``"Op-since_version"`` labels (``"domain:Op-N"`` outside ai.onnx) matching ``pattern``."""
        import fnmatch

        return [_label(k) for k in self.keys() if fnmatch.fnmatch(_label(k), pattern)]

    def __contains__(self, key: object) -> bool:
        if isinstance(key, tuple) and len(key) == 2:
            key = ConverterKey("", *key)
        if isinstance(key, tuple) and len(key) == 3:
            key = ConverterKey(_norm_domain(key[0]), key[1], key[2])
        return key in self._entries

    def __iter__(self) -> Iterator[ConverterKey]:  # type: ignore[override]
        return iter(self.keys())

    def __getitem__(self, key: tuple) -> Converter:
        """The converter registered under exactly ``key`` (``(domain, op_type, since_version)``)."""
        k = ConverterKey(_norm_domain(key[0]), key[1], key[2])
        if k not in self._entries:
            raise RegistryError(f"no {self.kind} is registered for {_label(k)}; list them with {self.list_call}.")
        return self._entries[k]


def _label(key: ConverterKey) -> str:
    return f"{key.domain + ':' if key.domain else ''}{key.op_type}-{key.since_version}"


op_converters = OpConverterRegistry()
"""mmbridge's ONNX op -> torch converters (the built-ins live in :mod:`mmbridge.convert.ops`)."""


# ---------------------------------------------------------------------------------------------
# the hook into onnx2torch
# ---------------------------------------------------------------------------------------------
_OPSETS: contextvars.ContextVar[dict[str, int] | None] = contextvars.ContextVar("mmbridge_convert_opsets", default=None)
_ALIASES: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("mmbridge_convert_domain_aliases",
                                                                                default=None)
_LOCK = threading.Lock()
_DEPTH = 0
_SHIPPED: Any = None  # onnx2torch.converter.get_converter as it was before the hook


def current_opsets() -> dict[str, int]:
    """The ``opset_import`` (``{domain: version}``, ``""`` = ai.onnx) of the model being converted.

    Set by :func:`consult_op_converters`; converters that convert a subgraph (``Loop``) pass
    it on, so the body is converted at the outer model's opsets.

    Raises:
        RuntimeError: called outside a conversion.
    """
    opsets = _OPSETS.get()
    if opsets is None:
        raise RuntimeError("current_opsets() is only defined while mmbridge converts a model "
                           "(inside mmbridge.to_torch / consult_op_converters)")
    return dict(opsets)


def onnx2torch_converter(op_type: str, since_version: int, domain: str = "") -> Converter:
    """onnx2torch's own converter for ``op_type`` at ``since_version`` (for converters that delegate).

    Raises:
        NotImplementedError: onnx2torch has none.
    """
    from onnx2torch.node_converters import get_converter

    return get_converter(operation_type=op_type, version=since_version, domain=_norm_domain(domain))


def find_converter(op_type: str, opset: int, domain: str = "") -> Converter:
    """The converter :func:`mmbridge.to_torch` uses: :data:`op_converters` first, then onnx2torch's table.

    The result takes ``(node, graph)`` and returns onnx2torch's ``OperationConverterResult``.

    Raises:
        NotImplementedError: neither has a converter (onnx2torch's message).
    """
    ours = op_converters.find(op_type, opset, domain)
    if ours is not None:
        return _as_onnx2torch(ours)
    return onnx2torch_converter(op_type, opset, domain)


def _as_onnx2torch(fn: Converter) -> Converter:
    def convert(node: Any, graph: Any) -> Any:
        from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node
        from torch import nn

        result = fn(node, graph)
        if isinstance(result, nn.Module):
            return OperationConverterResult(torch_module=result, onnx_mapping=onnx_mapping_from_node(node))
        if not isinstance(result, OperationConverterResult):
            raise TypeError(f"Converter author: {_describe(fn)} returned {type(result).__name__} for node {node.name!r}; "
                            "return an nn.Module or an onnx2torch OperationConverterResult")
        return result

    convert.__wrapped__ = fn  # type: ignore[attr-defined]
    return convert


def _naming_the_node(fn: Converter) -> Converter:
    """``fn``, with the node's op and name put in front of a ``NotImplementedError`` that lacks them."""

    def convert(node: Any, graph: Any) -> Any:
        try:
            return fn(node, graph)
        except NotImplementedError as exc:
            if node.name and repr(node.name) in str(exc):
                raise
            raise NotImplementedError(f"{node.operation_type} node {node.name!r}: {exc}") from exc

    return convert


def _hooked_get_converter(operation_type: str, version: int, domain: str = "") -> Converter:
    if _OPSETS.get() is None:  # a conversion that is not mmbridge's: onnx2torch as shipped
        return _SHIPPED(operation_type=operation_type, version=version, domain=domain)
    ours = op_converters.find(operation_type, version, (_ALIASES.get() or {}).get(domain, domain))
    if ours is not None:
        return _naming_the_node(_as_onnx2torch(ours))
    return _naming_the_node(_SHIPPED(operation_type=operation_type, version=version, domain=domain))


@contextlib.contextmanager
def consult_op_converters(opsets: dict[str, int], domain_aliases: dict[str, str] | None = None) -> Iterator[None]:
    """While active, ``onnx2torch.convert`` takes converters from :data:`op_converters` first.

    This is mmbridge's one hook into onnx2torch: the module-level name ``get_converter`` that
    ``onnx2torch.converter.convert`` calls for each node is replaced, for the duration, by a
    function that consults :data:`op_converters` (resolving the opset to ``since_version``)
    and falls back to the ``get_converter`` it replaced. Re-entrant (a ``Loop`` body is converted
    inside the outer conversion) and thread-safe (the name is restored when the last user
    leaves; conversions in other contexts see onnx2torch unchanged).

    Args:
        opsets: the model's ``opset_import`` as ``{domain: version}``; readable by converters
            through :func:`current_opsets`.
        domain_aliases: ``{domain in the model: domain to look up}``; :func:`mmbridge.to_torch`
            renames dotted custom domains (``com.example`` -> ``com_example``) because onnx2torch
            puts the domain into the torch module name, where dots are not allowed.
    """
    global _DEPTH, _SHIPPED
    import onnx2torch.converter as o2t

    token = _OPSETS.set({_norm_domain(d): int(v) for d, v in opsets.items()})
    alias_token = _ALIASES.set(dict(domain_aliases or {}))
    with _LOCK:
        if _DEPTH == 0:
            _SHIPPED = o2t.get_converter
            o2t.get_converter = _hooked_get_converter
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                o2t.get_converter = _SHIPPED
        _ALIASES.reset(alias_token)
        _OPSETS.reset(token)


__all__ = ["op_converters", "OpConverterRegistry", "ConverterKey", "consult_op_converters", "current_opsets",
           "find_converter", "onnx2torch_converter", "resolve_since_version", "schema_versions"]
