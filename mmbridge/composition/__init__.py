"""Composition: :func:`compose` builds a :class:`HybridModel` from branches and registered heads.

* :mod:`.model` -- :class:`Branch`, :class:`HybridModel`, :func:`compose`;
* :mod:`.heads` -- the fusion-head and task-head registries and their entries.
"""

from mmbridge.composition.heads import fusion_heads, task_heads
from mmbridge.composition.model import Branch, HybridModel, compose, masked_mean

__all__ = ["Branch", "HybridModel", "compose", "fusion_heads", "task_heads", "masked_mean"]
