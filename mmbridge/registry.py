"""The bridge registry: named TF builders that :func:`mmbridge.export` turns into artifacts.

Example::

    @mmbridge.register_bridge(
        "imagenet_preprocess", role="preprocess",
        input_specs=[mmbridge.TensorSpec("image", ("batch", 224, 224, 3), "uint8", "NHWC", (0, 255))],
    )
    def imagenet_preprocess():
        from mmbridge.export._tf import import_tensorflow
        tf = import_tensorflow()  # in the export process only (after torch's stack)
        @tf.function
        def f(image): ...
        return f

    art = mmbridge.export("imagenet_preprocess")   # runs in a child process; no TF here
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from mmbridge._registry import Registry
from mmbridge.specs import BridgeSpec, Role, SampleFn, TensorSpec, Tolerance

bridges: Registry[BridgeSpec] = Registry("bridge", "mmbridge.bridges.names()")

# mmbridge.export() options a registration may fix (the call's own non-default values win)
BRIDGE_EXPORT_KEYS = ("inputs_as_nchw", "trainable", "optimize", "verify", "probes", "training")


def register_bridge(
    name: str,
    *,
    role: Role = "encoder",
    input_specs: Sequence[TensorSpec],
    opset: int = 17,
    tolerance: Tolerance | None = None,
    sample_inputs: SampleFn | None = None,
    description: str = "",
    override: bool = False,
    **export_kwargs: Any,
) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Decorator: register a zero-argument builder that returns a TF object as bridge ``name``.

    The builder returns a ``tf.function``, a Keras model or layer, a SavedModel directory, or a
    ``"module:attribute"`` string; it is called only by the export (in a child process when the
    builder is importable by module path). The decorator returns the builder unchanged.

    Args:
        name: registry name (``mmbridge bridges`` lists them).
        role: ``"preprocess"`` or ``"encoder"``.
        input_specs: graph inputs in call order (see :class:`~mmbridge.TensorSpec`).
        opset: ONNX opset (default 17).
        tolerance: parity tolerance; default from :data:`mmbridge.parity.TOLERANCES`.
        sample_inputs: ``(batch, seed) -> {name: array}`` for parity checks.
        description: one line for listings.
        override: replace an existing bridge of the same name instead of raising.
        **export_kwargs: :func:`mmbridge.export` options for this bridge, one of
            :data:`BRIDGE_EXPORT_KEYS` (``inputs_as_nchw=["image"]``, ``trainable=True``...).

    Raises:
        TypeError: an export option that is not in :data:`BRIDGE_EXPORT_KEYS`.
        RegistryError: ``name`` is already registered and ``override`` is False.
        SpecError: invalid role or duplicate input names.
    """

    unknown = sorted(set(export_kwargs) - set(BRIDGE_EXPORT_KEYS))
    if unknown:
        raise TypeError(f"register_bridge({name!r}): unknown export options {unknown}; "
                        f"allowed: {list(BRIDGE_EXPORT_KEYS)}")

    def deco(builder: Callable[[], Any]) -> Callable[[], Any]:
        spec = BridgeSpec(
            name=name, role=role, builder=builder, input_specs=tuple(input_specs), opset=opset,
            tolerance=tolerance, sample_inputs=sample_inputs,
            description=description or (builder.__doc__ or "").strip().split("\n")[0],
            export_kwargs=dict(export_kwargs),
        )
        bridges.register(name, spec, override=override)
        return builder

    return deco


def get_bridge(name: str) -> BridgeSpec:
    """The :class:`BridgeSpec` registered as ``name``.

    Raises:
        RegistryError: unknown name (with close matches).
    """
    return bridges.get(name)
