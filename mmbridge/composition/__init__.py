"""Composition: :func:`compose` builds a :class:`HybridModel` from branches and registered heads.

* :mod:`.model` -- :class:`Branch`, :class:`HybridModel`, :func:`compose`;
* :mod:`.heads` -- the fusion-head and task-head registries and their entries (:class:`TaskHead`);
* :mod:`.config` -- :class:`ModelConfig` / :class:`BranchConfig` (the ``model`` section and the
  defaults of :func:`compose` / :class:`Branch`) and the :data:`components` registry of branch
  component types.
"""

from mmbridge.composition.config import (
           BranchConfig,
           ComponentConfig,
           ModelConfig,
           components,
           register_component,
)
from mmbridge.composition.heads import TaskHead, fusion_heads, task_heads
from mmbridge.composition.model import Branch, HybridModel, compose, masked_mean

__all__ = ["Branch", "BranchConfig", "ComponentConfig", "HybridModel", "ModelConfig", "TaskHead", "compose",
           "components", "fusion_heads", "masked_mean", "register_component", "task_heads"]
