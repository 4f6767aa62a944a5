"""Packages that can be called like the function they are named after.

``mmbridge.export`` is both the export stage's package (``mmbridge.export.exporter``,
``mmbridge.export.handlers``...) and the call ``mmbridge.export(model)``; ``mmbridge.convert``
likewise is the ONNX -> torch package and the call ``mmbridge.convert(artifact)``. Python sets a
package attribute to the subpackage on import, so a function of the same name beside it would be
replaced; making the package itself callable keeps both meanings.
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Callable
from typing import Any


class _CallableModule(types.ModuleType):
    """A module whose call is its ``__call_target__`` function."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__call_target__(*args, **kwargs)


def make_callable(module_name: str, target: Callable[..., Any]) -> None:
    """Make the imported module ``module_name`` callable as ``target`` (same signature)."""
    module = sys.modules[module_name]
    module.__class__ = _CallableModule
    module.__call_target__ = target
    module.__signature__ = inspect.signature(target)
