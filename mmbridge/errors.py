"""Exception types raised by mmbridge.

Every error names the input that was wrong, what was wrong with it, and what to do. They all
derive from :class:`MMBridgeError` so that callers can catch mmbridge's failures as one family.
"""

from __future__ import annotations


class MMBridgeError(Exception):
    """Base class of every error mmbridge raises on purpose."""


class RegistryError(MMBridgeError, KeyError):
    """A registry lookup or registration failed (unknown or duplicate name).

    Subclasses :class:`KeyError` so ``except KeyError`` keeps working, but formats its message
    as plain text (``KeyError`` would wrap it in quotes).
    """

    def __str__(self) -> str:  # KeyError.__str__ repr()s its argument
        return str(self.args[0]) if self.args else ""


class SpecError(MMBridgeError, ValueError):
    """A :class:`~mmbridge.TensorSpec` / :class:`~mmbridge.BridgeSpec` or an input does not match its spec."""


class ImportOrderError(MMBridgeError, RuntimeError):
    """TensorFlow was imported before torch's compiler stack; continuing would segfault."""


class ExportError(MMBridgeError, RuntimeError):
    """TF -> ONNX export failed, or produced a graph that is not valid ONNX."""


class UnsupportedOpsError(ExportError):
    """The exported graph holds operators that neither ONNX nor onnxruntime can run.

    Attributes:
        ops: one ``dict(op_type=..., domain=..., node=..., origin=...)`` per offending node;
            ``origin`` is the TF op / Keras layer path the node came from.
    """

    def __init__(self, message: str, ops: list[dict[str, str]]):
        super().__init__(message)
        self.ops = ops


class ParityError(MMBridgeError, AssertionError):
    """A bridged graph does not compute what TensorFlow computes within tolerance.

    Attributes:
        report: the :class:`~mmbridge.parity.ParityReport` that failed.
    """

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class ProbeError(ParityError):
    """A backend computes something else than TensorFlow on a probe input: an edge value for an op
    in the graph (:mod:`mmbridge.export.probes`), while the sample inputs passed.

    A :class:`ParityError`, so everything that catches a parity failure catches this one.

    Attributes:
        report: the :class:`~mmbridge.parity.ParityReport` of the failing rows (or ``None``).
        probes: the probe record (what :func:`mmbridge.export.probes.run_probes` returns), or ``None``.
    """

    def __init__(self, message: str, report=None, probes=None):
        super().__init__(message, report)
        self.probes = probes


class CacheError(MMBridgeError, OSError):
    """An artifact in the cache is missing, partial or corrupt and could not be rebuilt."""


class ConversionError(MMBridgeError, NotImplementedError):
    """ONNX -> torch conversion failed (for example unsupported operators)."""


class RuntimeBackendError(MMBridgeError, RuntimeError):
    """The onnxruntime backend cannot run as asked (provider missing, bad binding, training request)."""


class DataError(MMBridgeError, ValueError):
    """The dataset is inconsistent (missing / duplicate ids, conflicting labels, unreadable files)."""


class ConfigError(MMBridgeError, ValueError):
    """A YAML config or CLI override is invalid; the message lists every problem at once."""


class WeightMappingError(MMBridgeError, ValueError):
    """A pretrained state dict does not line up with the model it is loaded into (count, shape or kind)."""
