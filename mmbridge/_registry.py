"""A small, strict name -> object registry (the pattern of timm's ``register_model``).

Differences from timm, on purpose: a duplicate name raises unless ``override=True``; an unknown
name raises :class:`~mmbridge.errors.RegistryError` with close matches and the listing call;
plugins may register from a Python entry point group (``mmbridge.plugins``).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from mmbridge.errors import RegistryError

T = TypeVar("T")

ENTRY_POINT_GROUP = "mmbridge.plugins"
_plugins_loaded = False


def close_matches(name: object, candidates: Iterable[str], *, n: int = 1, cutoff: float = 0.6) -> list[str]:
    """Up to ``n`` of ``candidates`` that look like ``name`` (``difflib.get_close_matches``).

    The one "did you mean" lookup of mmbridge: :meth:`Registry.get`, :meth:`Registry.suggest`
    and the config validation (unknown keys) all use it.
    """
    return difflib.get_close_matches(str(name), list(candidates), n=n, cutoff=cutoff)


def load_plugins() -> list[str]:
    """Import every module declared under the ``mmbridge.plugins`` entry point group.

    A plugin registers its bridges, heads or converters as an import side effect. Called once,
    lazily, the first time a registry lookup misses.

    Returns:
        The names of the entry points that were loaded.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return []
    _plugins_loaded = True
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()
        loaded.append(ep.name)
    return loaded


class Registry(Generic[T]):
    """Named objects of one kind (bridges, fusion heads, task heads, op converters).

    Args:
        kind: what is registered, used in messages (``"bridge"``, ``"fusion head"``).
        list_call: the public call that lists the names, quoted in lookup errors.

    Example:
        >>> heads = Registry("fusion head", "mmbridge.fusion_heads.names()")
        >>> @heads.register("concat")
        ... class ConcatFusion: ...
        >>> heads.get("concat") is ConcatFusion
        True
    """

    def __init__(self, kind: str, list_call: str):
        self.kind = kind
        self.list_call = list_call
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None, *, override: bool = False) -> Any:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator that does.

        The decorator returns what it wraps, unchanged.

        Raises:
            RegistryError: ``name`` is taken and ``override`` is False, or ``name`` is empty.
        """
        if not isinstance(name, str) or not name:
            raise RegistryError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def _add(item: T) -> T:
            if name in self._entries and not override and self._entries[name] is not item:
                raise RegistryError(
                    f"{self.kind} {name!r} is already registered (by {_describe(self._entries[name])}). "
                    f"Pick another name, or pass override=True to replace it."
                )
            self._entries[name] = item
            return item

        if obj is None:
            return _add
        return _add(obj)

    def unregister(self, name: str) -> T:
        """Remove and return the entry ``name``.

        Raises:
            RegistryError: ``name`` is not registered.
        """
        self.get(name)
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        """Return the object registered as ``name``.

        Raises:
            RegistryError: unknown name; the message lists close matches and the listing call.
        """
        if name not in self._entries:
            load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            close = close_matches(name, self._entries, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise RegistryError(
                f"unknown {self.kind} {name!r}.{hint} "
                f"{len(self._entries)} are registered; list them with {self.list_call}."
            ) from None

    def suggest(self, name: object, *, among: Iterable[str] | None = None, n: int = 1) -> list[str]:
        """Registered names (or the subset ``among``) close to ``name``, best first; [] if none.

        For messages that report a bad name without raising (config validation lists every
        problem at once); :meth:`get` raises with the same suggestions.
        """
        load_plugins()
        return close_matches(name, self._entries if among is None else among, n=n)

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching the shell-style ``pattern``."""
        load_plugins()
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"


def _describe(obj: Any) -> str:
    mod = getattr(obj, "__module__", None)
    qual = getattr(obj, "__qualname__", None)
    return f"{mod}.{qual}" if mod and qual else repr(obj)


Factory = Callable[..., Any]
