"""Trainable export: keep weights, BatchNormalization and Dropout as real, trainable layers.

tf2onnx exports inference graphs. Measured on Keras 3.15 / TF 2.21 / tf2onnx 1.17:

* grappler's constant folding (run by tf2onnx's freezing step) deletes every all-zero bias
  (``x + 0 -> x``) and every all-one scale, so a freshly initialised Dense layer loses its bias;
* BatchNormalization becomes ``x * a + b`` with the moving statistics folded in, or is fused into
  the preceding Conv; Dropout (an identity at inference) disappears.

For a bridge that will be fine-tuned in torch that is wrong (DESIGN.md, "Trainable export"). This
module fixes it in two steps, both called by :func:`mmbridge.export` when ``trainable=True``:

1. :func:`trainable_patches` is active while the ``tf.function`` is traced:

   * every Keras variable read inside the traced function goes through a
     ``PlaceholderWithDefault`` named ``mmb_var__<variable path>`` (trainable) or
     ``mmb_state__<variable path>`` (non-trainable, e.g. BatchNorm moving mean / variance).
     Constant folding cannot look through a placeholder, so zero biases and unit scales survive
     and no weight is merged into another; tf2onnx turns each such placeholder into a graph
     input with an initializer of the same name;
   * ``keras.layers.BatchNormalization`` (``axis=-1``, no renorm) emits one
     ``FusedBatchNormV3(is_training=False)`` under the name scope ``mmb_bn__m<momentum>`` (``0.99`` is written
     ``0p99``), which tf2onnx maps to one ONNX ``BatchNormalization`` (not fused into Conv, since its inputs are
     not constants while tf2onnx optimises);
   * ``keras.layers.Dropout`` (no ``noise_shape``, or a per-sample ``(None, 1, ..., 1)`` one:
     stochastic depth) emits ``x * 1`` where the ``1`` is a placeholder named
     ``mmb_dropout__r<rate>`` (+ :data:`NOISE_MARK` for a per-sample mask);
     ``SpatialDropout1D/2D/3D`` emits ``x * ones([1, .., C, .., 1])`` (C at its channel axis) named
     ``mmb_dropout__r<rate>`` + :data:`~mmbridge.graph.markers.CHANNEL_MARK`: one mask value per
     (sample, channel);
   * ``keras.layers.PReLU`` computes ``relu(x) - alpha * relu(-x)`` (bit-identical to Keras'
     ``relu(x) + (-alpha) * relu(-x)``), so tf2onnx cannot fold ``Neg(alpha)`` into an unnamed constant.

   It yields a :class:`VariableReads` that records which variables the trace read; the exporter
   lists the model's trainable variables the forward never reads (an untied ``ReversibleEmbedding``'s
   ``reverse_embeddings``) as ``meta["keras_inventory"]["unread_variables"]``, which the training
   contract exempts (:mod:`mmbridge.convert.contract`).

   TF's outputs are unchanged (the parity check against TF still runs on this graph).

2. :func:`postprocess` rewrites the ONNX model right after tf2onnx:

   * the marker initializers stay graph inputs with defaults (so that onnxoptimizer's
     ``eliminate_duplicate_initializer`` cannot merge a zero bias with a zero moving mean);
     onnxruntime lists them as overridable initializers, not as inputs, and ``to_torch`` strips
     them;
   * ``Transpose`` / ``Reshape`` / ``Squeeze`` / ``Unsqueeze`` / ``Cast`` / ``Identity`` nodes
     applied to a single-use marker initializer (the HWIO -> OIHW transpose of a conv kernel,
     the reshape of a bias) are folded into a new initializer that keeps the marker, so the
     Conv sees its weight as a constant and onnx2torch makes it an ``nn.Conv2d`` parameter;
   * every ``BatchNormalization`` under ``mmb_bn__m<momentum>`` gets ``momentum=<momentum>``
     (ONNX and Keras share the convention ``running = running * momentum + batch * (1 - momentum)``;
     torch's ``momentum`` is ``1 - keras_momentum``);
   * every ``Mul(x, mmb_dropout__r<rate>)`` becomes ``Dropout(x, ratio=<rate>)``; for a
     SpatialDropout marker the node name gets ``<CHANNEL_MARK>_a<axis>``, the axis of size C of the
     marker as it sits in the ONNX graph (the channel axis in the layout there).

The initializer names then tell :func:`mmbridge.convert.core.to_torch` exactly which
tensors are Keras trainable weights (``nn.Parameter``) and which are Keras state (buffers), so the
converted module's parameter count equals ``sum(w.size for w in keras_model.trainable_weights)``.

LayerNormalization (``axis=-1``, ``center`` and ``scale``, no ``rms_scaling``) is traced under the
name scope ``mmb_ln__e<epsilon>`` and, at opset >= 17, :func:`postprocess` replaces the decomposed
ops of each such scope by one ONNX ``LayerNormalization`` (``nn.LayerNorm`` in torch).

Not kept (listed in the notes :func:`postprocess` returns): BatchNorm with ``axis`` other than the
last or with ``renorm``; Dropout with another ``noise_shape`` (not per sample, not a
``SpatialDropout*``'s); the
exporter's training contract (weight audit, :mod:`mmbridge.convert.contract`) then refuses the
export. :func:`check_trainable_source` refuses mixed-precision policies before tracing. Other
LayerNormalizations stay decomposed, their ``gamma`` / ``beta`` still trainable initializers.

tf-keras (Keras 2) models get the same patches for tf-keras' classes (:func:`_tf_keras_patches`;
their ``tf.Variable`` s are named by :func:`variable_paths`). Only Keras objects traced in this
process are patched: a SavedModel written by tf-keras is reloaded as a tf-keras model first
(:class:`mmbridge.export.sources.SavedModelSource`); a ``tf.Module`` SavedModel export has no
markers, and ``to_torch`` then falls back to recognising weights by the ops that consume them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any

from mmbridge.graph.markers import (  # noqa: F401  (re-exported: the names this module writes)
    BN_BESSEL,
    BN_MARK,
    CHANNEL_MARK,
    DROPOUT_MARK,
    LN_MARK,
    STATE_MARK,
    VAR_MARK,
    decode_float,
    encode_float,
    marker_of,
)

#: Version of what :func:`trainable_patches` / :func:`postprocess` produce; part of what determines
#: a trainable export's graph (the exporter should hash it into the fingerprint).
FORMAT_VERSION = 4


_SAFE = re.compile(r"[^A-Za-z0-9_]")
_FOLDABLE = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Cast", "Identity", "Flatten")

# BatchNorm / Dropout layers that the active patches could not keep (read by postprocess).
_SKIPPED: list[str] = []


def _safe_path(path: str) -> str:
    return _SAFE.sub("_", path.replace("/", "__"))


def is_tf_keras(obj: Any) -> bool:
    """True for a tf-keras (Keras 2, ``import tf_keras``) layer or model, subclassed ones included
    (their class lives in the user's module: the test is ``isinstance``, not the class's module)."""
    import sys

    tfk = sys.modules.get("tf_keras")
    try:
        return tfk is not None and isinstance(obj, tfk.layers.Layer)
    except AttributeError:  # a partly imported tf_keras
        return False


def variable_paths(model: Any) -> list[tuple[Any, str]]:
    """``(variable, path)`` for every variable of ``model.weights``, in order: the path the markers
    (``mmb_var__<path>``) and the training-contract inventory name a variable by.

    Keras 3: ``variable.path`` (``"dense/kernel"``). tf-keras: the ``tf.Variable``'s name without
    ``":0"`` (``"dense/kernel"``; tf-keras variables have no ``path``), made unique within the model by
    a ``_<k>`` suffix where two variables share a name.
    """
    out: list[tuple[Any, str]] = []
    seen: dict[str, int] = {}
    for v in model.weights:
        path = getattr(v, "path", None) or v.name.split(":")[0]
        if path in seen:
            seen[path] += 1
            path = f"{path}_{seen[path]}"
        else:
            seen[path] = 0
        out.append((v, path))
    return out


def _marked_batch_norm(tf: Any, layer: Any, inputs: Any, rank: int, scope: str) -> Any:
    """Inference BatchNorm of a Keras 3 or tf-keras ``layer`` as one ``FusedBatchNormV3`` under the
    marker name scope ``scope`` (:data:`BN_MARK` + momentum [+ :data:`BN_BESSEL`]), which
    :func:`postprocess` turns back into a trainable BatchNormalization. ``scale=False`` /
    ``center=False`` give constant ones / zeros (no trainable gamma / beta). 2-D and 3-D inputs
    ``[N, C]`` / ``[N, L, C]`` are reshaped to NHWC around the op; channels last."""
    c = int(inputs.shape[-1])
    gamma = tf.convert_to_tensor(layer.gamma) if layer.scale else tf.ones([c], tf.float32)
    beta = tf.convert_to_tensor(layer.beta) if layer.center else tf.zeros([c], tf.float32)
    mean = tf.convert_to_tensor(layer.moving_mean)
    var = tf.convert_to_tensor(layer.moving_variance)
    with tf.name_scope(scope):
        x = inputs
        if rank != 4:
            shape = tf.shape(inputs)
            x = tf.reshape(inputs, [-1, 1, 1, c]) if rank == 2 else tf.expand_dims(inputs, 2)
        y = tf.raw_ops.FusedBatchNormV3(x=x, scale=gamma, offset=beta, mean=mean, variance=var,
                                        epsilon=float(layer.epsilon), data_format="NHWC", is_training=False)[0]
        if rank != 4:
            y = tf.reshape(y, shape)
    return y


class VariableReads:
    """Which Keras variables the traced function read: what :func:`trainable_patches` yields.

    The patched reads (Keras 3 ``Variable.__tf_tensor__``; tf-keras' ``_read_variable_op`` /
    ``sparse_read`` / ``gather_nd``) record every floating variable they mark while a
    ``tf.function`` is traced (``read``: ids of the Keras 3 ``Variable`` / tf-keras ``tf.Variable``
    objects). :meth:`unread` then lists the model's trainable variables that were read neither
    through a patched read nor in any other way TensorFlow saw (``ConcreteFunction.graph.variables``,
    the ``tf.Variable`` s the traced graph accessed, reads in nested ``tf.while_loop`` / ``tf.cond``
    bodies included). Such a variable is not in the traced forward at all (LlamaBackbone's untied
    ``token_embedding/reverse_embeddings``, which only a CausalLM's ``reverse=True`` call reads), so
    Keras gives it no gradient either. A variable read in any way is never listed, so a read whose
    marker was lost (folded by tf2onnx) is still refused by the audit.
    """

    def __init__(self) -> None:
        self.read: set[int] = set()

    def unread(self, model: Any, concrete_fn: Any) -> list[dict[str, Any]]:
        """The trainable floating variables of ``model`` that the trace of ``concrete_fn`` never read.

        Args:
            model: the Keras 3 or tf-keras model or layer traced under :func:`trainable_patches`.
            concrete_fn: the ``tf.function``'s ``ConcreteFunction`` traced under the patches.

        Returns:
            ``[{"path", "shape", "values"}]`` in ``model.weights`` order: the path of
            :func:`variable_paths`, the Keras shape (list of ints) and its number of scalar values.
        """
        from mmbridge.export._tf import import_tensorflow

        tf = import_tensorflow()
        accessed = {id(v) for v in getattr(concrete_fn.graph, "variables", ())}
        out = []
        for v, path in variable_paths(model):
            if not v.trainable or not tf.as_dtype(v.dtype).is_floating:
                continue
            inner = getattr(v, "_value", None)  # a Keras 3 Variable's tf.Variable (tf-keras: the variable itself)
            ids = {id(v)} | ({id(inner)} if inner is not None else set())
            if ids & (self.read | accessed):
                continue
            shape = [int(d) for d in v.shape]
            values = 1
            for d in shape:
                values *= d
            out.append({"path": path, "shape": shape, "values": values})
        return out


@contextlib.contextmanager
def trainable_patches(model: Any = None) -> Iterator[VariableReads]:
    """Patches active while tracing a ``trainable=True`` export; undone on exit.

    Patched (Keras 3, TensorFlow backend): the variable read of ``keras.Variable``,
    ``keras.layers.BatchNormalization.call``, ``keras.layers.Dropout.call``,
    ``keras.layers.LayerNormalization.call`` and ``keras.layers.PReLU.call``. When ``model`` is a
    tf-keras (Keras 2) model, the same for its classes (:func:`_tf_keras_patches`): the reads of its
    ``tf.Variable`` s and tf-keras' ``BatchNormalization`` / ``Dropout`` / ``LayerNormalization`` /
    ``PReLU``. See the module doc for what each emits. Outside a ``tf.function`` trace the patched
    code behaves exactly like Keras (eager calls are not touched).

    Args:
        model: the Keras model or layer being exported (its variables' paths name the markers of a
            tf-keras model; a Keras 3 variable knows its own path).

    Yields:
        A :class:`VariableReads`: the variables the patched reads saw while tracing (its
        :meth:`~VariableReads.unread` lists the trainable ones the forward never reads).
        :func:`postprocess` must run on the tf2onnx output of the graph traced here.
    """
    from mmbridge.export._tf import import_tensorflow

    tf = import_tensorflow()
    patched: list[tuple[Any, str, Any]] = []
    _SKIPPED.clear()
    reads = VariableReads()
    if model is not None and is_tf_keras(model):
        with _tf_keras_patches(model, tf, reads):
            yield reads
        return
    try:
        from keras.src.backend.tensorflow import core as kcore
        from keras.src.layers.normalization.batch_normalization import BatchNormalization
        from keras.src.layers.regularization.dropout import Dropout
    except ImportError:  # another Keras layout: only the ONNX-side rewrites apply
        yield reads  # nothing recorded: unread() then relies on the graph's accessed variables alone
        return

    orig_read = kcore.Variable.__tf_tensor__

    def read(self: Any, dtype: Any = None, name: Any = None) -> Any:
        if tf.inside_function():
            reads.read.add(id(self))
        if not tf.inside_function() or not tf.as_dtype(self.dtype).is_floating:
            # integer / bool variables (counters, seed state) are read where they are used: a read
            # hoisted out of a loop body would see a stale value
            return orig_read(self, dtype=dtype, name=name)
        # Inside a tf.while_loop / tf.cond body (a Keras RNN step) the read would become a loop
        # input that is not a constant after freezing, and tf2onnx refuses a PlaceholderWithDefault
        # with a non-constant default. Read the variable and place the marker in the enclosing
        # function graph instead; the body captures it (tf2onnx: a loop-carried Loop input).
        graph = outer = tf.compat.v1.get_default_graph()
        while any(c.__name__ == "ControlFlowFuncGraph" for c in type(outer).__mro__):
            outer = outer.outer_graph
        with (outer.as_default() if outer is not graph else contextlib.nullcontext()):
            t = orig_read(self, dtype=dtype, name=name)
            mark = (VAR_MARK if self.trainable else STATE_MARK) + _safe_path(self.path)
            return tf.raw_ops.PlaceholderWithDefault(input=t, shape=t.shape, name=mark)

    orig_bn = BatchNormalization.call

    def bn_call(self: Any, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        rank = len(inputs.shape)
        axis = self.axis if isinstance(self.axis, int) else -1
        keepable = (
            tf.inside_function() and not training and mask is None and not self.renorm
            and axis in (-1, rank - 1) and 2 <= rank <= 4 and inputs.dtype == tf.float32
            and self.compute_dtype == "float32" and getattr(self, "synchronized", False) is False
        )
        if not keepable:
            if tf.inside_function():
                _SKIPPED.append(f"BatchNormalization {self.name!r} folded (axis={self.axis}, renorm={self.renorm}, "
                                f"dtype={inputs.dtype.name}): only axis=-1, float32, no renorm is kept")
            return orig_bn(self, inputs, training=training, mask=mask)
        return _marked_batch_norm(tf, self, inputs, rank, f"{BN_MARK}{encode_float(self.momentum)}")

    orig_do = Dropout.call

    def do_call(self: Any, inputs: Any, training: Any = False) -> Any:
        if not tf.inside_function() or training:
            return orig_do(self, inputs, training=training)
        noise = _per_sample_noise(self.noise_shape, len(inputs.shape))
        if (self.noise_shape is not None and noise is None) or not inputs.dtype.is_floating:
            _SKIPPED.append(f"{type(self).__name__} {self.name!r} removed (noise_shape={self.noise_shape}): "
                            f"only plain Dropout and a per-sample noise_shape (None, 1, ..., 1) are kept")
            return orig_do(self, inputs, training=training)
        # a per-sample mask (stochastic depth): the marker name says so (NOISE_MARK), the ONNX
        # Dropout node carries it in its name and the converter draws the mask at [N, 1, ..., 1]
        mark = f"{DROPOUT_MARK}{encode_float(self.rate)}" + (NOISE_MARK if noise else "")
        one = tf.raw_ops.PlaceholderWithDefault(input=tf.ones([], inputs.dtype), shape=[], name=mark)
        return inputs * one

    from keras.src.layers.regularization.spatial_dropout import BaseSpatialDropout

    orig_sdo = BaseSpatialDropout.call

    def sdo_call(self: Any, inputs: Any, training: Any = False) -> Any:
        # SpatialDropout1D/2D/3D (its own call): one mask value per (sample, channel)
        if not tf.inside_function() or training or not self.rate:
            return orig_sdo(self, inputs, training=training)
        channels = _spatial_channels(self, inputs)
        if channels is None or not inputs.dtype.is_floating:
            _SKIPPED.append(f"{type(self).__name__} {self.name!r} removed (input shape {inputs.shape}, dtype "
                            f"{inputs.dtype.name}): a SpatialDropout is kept for a floating input whose channel "
                            f"dimension is static")
            return orig_sdo(self, inputs, training=training)
        return _marked_channel_dropout(tf, inputs, float(self.rate), channels)

    from keras.src.layers.normalization.layer_normalization import LayerNormalization

    orig_ln = LayerNormalization.call

    def ln_call(self: Any, inputs: Any) -> Any:
        axis = self.axis if isinstance(self.axis, int) else (self.axis[0] if len(self.axis) == 1 else None)
        rank = len(inputs.shape)
        if (not tf.inside_function() or axis not in (-1, rank - 1) or self.rms_scaling or not (self.center and self.scale)
                or inputs.dtype != tf.float32):
            return orig_ln(self, inputs)
        with tf.name_scope(f"{LN_MARK}{encode_float(self.epsilon)}"):
            return orig_ln(self, inputs)

    from keras.src.layers.activations.prelu import PReLU

    def prelu_call(self: Any, inputs: Any) -> Any:
        # Keras writes ``relu(x) + (-alpha) * relu(-x)``; tf2onnx folds ``Neg(alpha)`` into an unnamed
        # constant, so the slope would lose its marker and freeze. ``relu(x) - alpha * relu(-x)`` is the
        # same value bit for bit (negation is exact) and keeps ``alpha`` a marked weight.
        if not tf.inside_function():
            return orig_prelu(self, inputs)
        return tf.nn.relu(inputs) - tf.convert_to_tensor(self.alpha) * tf.nn.relu(-inputs)

    orig_prelu = PReLU.call
    for obj, attr, new in ((kcore.Variable, "__tf_tensor__", read), (BatchNormalization, "call", bn_call),
                           (Dropout, "call", do_call), (BaseSpatialDropout, "call", sdo_call),
                           (LayerNormalization, "call", ln_call), (PReLU, "call", prelu_call)):
        patched.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, new)
    try:
        yield reads
    finally:
        for obj, attr, orig in reversed(patched):
            setattr(obj, attr, orig)


def _marked_read(tf: Any, read: Callable[[], Any], mark: str, cache: dict[tuple[int, str], Any]) -> Any:
    """``read()`` through a ``PlaceholderWithDefault`` named ``mark``, placed in the enclosing function
    graph when called inside a ``tf.while_loop`` / ``tf.cond`` body (see the Keras 3 read in
    :func:`trainable_patches`); one placeholder per variable and graph (``cache``), so a variable read
    twice (a shared layer) stays one marked initializer, not ``<mark>_1``."""
    graph = outer = tf.compat.v1.get_default_graph()
    while any(c.__name__ == "ControlFlowFuncGraph" for c in type(outer).__mro__):
        outer = outer.outer_graph
    key = (id(outer), mark)
    hit = cache.get(key)
    if hit is not None and hit.graph is outer:
        return hit
    with (outer.as_default() if outer is not graph else contextlib.nullcontext()):
        t = read()
        p = tf.raw_ops.PlaceholderWithDefault(input=t, shape=t.shape, name=mark)
    cache[key] = p
    return p


@contextlib.contextmanager
def _tf_keras_patches(model: Any, tf: Any, reads: VariableReads | None = None) -> Iterator[None]:
    """The tf-keras (Keras 2) counterparts of :func:`trainable_patches`' Keras 3 patches.

    ``reads`` (:class:`VariableReads`) records each of ``model``'s variables read while tracing.

    * the read of each of ``model``'s floating ``tf.Variable`` s (``BaseResourceVariable._read_variable_op``,
      and ``sparse_read`` / ``gather_nd``, which tf-keras' ``Embedding`` uses) goes through a
      ``PlaceholderWithDefault`` named ``mmb_var__<path>`` / ``mmb_state__<path>``
      (:func:`variable_paths`); other variables (none in the model) are read as before;
    * ``BatchNormalizationBase.call`` (``axis=-1``, rank 2-4, float32, no renorm / virtual batch /
      adjustment / synchronized) emits one ``FusedBatchNormV3(is_training=False)`` under
      ``mmb_bn__m<momentum>``, plus :data:`~mmbridge.graph.markers.BN_BESSEL` when the layer is
      ``fused``: tf-keras' fused kernel moves the moving variance towards the *unbiased* batch variance
      (``_bessels_correction_test_only`` is True in tf-keras 2.21, so the correction is not removed),
      its non-fused path (2-D inputs) towards the population variance, as Keras 3 does;
    * ``Dropout.call`` (plain, or a per-sample ``noise_shape``) emits the Dropout marker, and a
      ``SpatialDropout1D/2D/3D`` (its own ``_get_noise_shape``) the per-channel one, as for Keras 3;
      another ``noise_shape`` is left to tf-keras and listed (the audit then refuses the export,
      naming the layer);
    * ``LayerNormalization.call`` (last axis, ``center`` and ``scale``, float32) runs its non-fused
      formula (``tf.nn.moments`` + ``tf.nn.batch_normalization``, same value up to float32 rounding)
      under ``mmb_ln__e<epsilon>``, so :func:`postprocess` makes it one ONNX ``LayerNormalization``;
    * ``PReLU.call`` computes ``relu(x) - alpha * relu(-x)`` (bit-identical to tf-keras'
      ``relu(x) + (-alpha) * relu(-x)``; keeps ``alpha`` marked, as for Keras 3).
    """
    from tensorflow.python.ops import resource_variable_ops as rvo

    try:
        from tf_keras.src.layers.activation.prelu import PReLU
        from tf_keras.src.layers.normalization.batch_normalization import BatchNormalizationBase
        from tf_keras.src.layers.normalization.layer_normalization import LayerNormalization
        from tf_keras.src.layers.regularization.dropout import Dropout
    except ImportError as exc:  # another tf-keras layout: refuse rather than fold silently
        from mmbridge.errors import ExportError

        raise ExportError(f"trainable export of the tf-keras model {getattr(model, 'name', '?')!r}: this tf-keras "
                          f"version has another module layout ({exc}); mmbridge knows tf-keras 2.21's. What to do: "
                          f"export with trainable=False (frozen), or install tf-keras 2.21") from exc

    marks = {id(v): (VAR_MARK if v.trainable else STATE_MARK) + _safe_path(path)
             for v, path in variable_paths(model) if tf.as_dtype(v.dtype).is_floating}
    cache: dict[tuple[int, str], Any] = {}
    base = rvo.BaseResourceVariable
    orig_read, orig_sparse, orig_gnd = base._read_variable_op, base.sparse_read, base.gather_nd

    def read(self: Any, no_copy: bool = False) -> Any:
        mark = marks.get(id(self))
        if mark is None or not tf.inside_function():
            return orig_read(self, no_copy=no_copy)
        if reads is not None:
            reads.read.add(id(self))
        return _marked_read(tf, lambda: orig_read(self, no_copy=no_copy), mark, cache)

    def sparse_read(self: Any, indices: Any, name: Any = None) -> Any:
        if id(self) not in marks or not tf.inside_function():
            return orig_sparse(self, indices, name=name)
        return tf.gather(read(self), indices, name=name)

    def gather_nd(self: Any, indices: Any, name: Any = None) -> Any:
        if id(self) not in marks or not tf.inside_function():
            return orig_gnd(self, indices, name=name)
        return tf.gather_nd(read(self), indices, name=name)

    def _static_training(layer: Any, training: Any) -> Any:
        if training is None and hasattr(layer, "_get_training_value"):
            training = layer._get_training_value(training)
        return tf.get_static_value(training) if tf.is_tensor(training) else training

    orig_bn = BatchNormalizationBase.call

    def bn_call(self: Any, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        if not tf.inside_function():
            return orig_bn(self, inputs, training=training, mask=mask)
        rank = len(inputs.shape)
        axis = list(self.axis) if isinstance(self.axis, (list, tuple)) else [self.axis]
        keepable = (
            not _static_training(self, training) and mask is None and not self.renorm
            and axis in ([-1], [rank - 1]) and 2 <= rank <= 4 and inputs.dtype == tf.float32
            and self.compute_dtype == "float32" and not getattr(self, "synchronized", False)
            and self.virtual_batch_size is None and self.adjustment is None
            and isinstance(self.momentum, (int, float))
        )
        if not keepable:
            _SKIPPED.append(f"BatchNormalization {self.name!r} folded (axis={self.axis}, renorm={self.renorm}, "
                            f"virtual_batch_size={self.virtual_batch_size}, dtype={inputs.dtype.name}): only axis=-1, "
                            f"float32, no renorm / virtual batch / adjustment is kept")
            return orig_bn(self, inputs, training=training, mask=mask)
        scope = f"{BN_MARK}{encode_float(float(self.momentum))}" + (BN_BESSEL if self.fused else "")
        return _marked_batch_norm(tf, self, inputs, rank, scope)

    orig_do = Dropout.call

    def do_call(self: Any, inputs: Any, training: Any = None) -> Any:
        if not tf.inside_function() or _static_training(self, training) or not isinstance(self.rate, (int, float)) \
                or self.rate == 0:
            return orig_do(self, inputs, training=training)
        spatial = type(self)._get_noise_shape is not Dropout._get_noise_shape
        channels = _spatial_channels(self, inputs) if spatial else None
        if channels is not None and inputs.dtype.is_floating:  # SpatialDropout1D/2D/3D: per (sample, channel)
            return _marked_channel_dropout(tf, inputs, float(self.rate), channels)
        noise = None if spatial else _per_sample_noise(self.noise_shape, len(inputs.shape))
        if noise is None or not inputs.dtype.is_floating:
            _SKIPPED.append(f"{type(self).__name__} {self.name!r} removed (noise_shape={self.noise_shape}"
                            f"{', one mask value per channel' if spatial else ''}): only plain Dropout, a "
                            f"per-sample noise_shape (None, 1, ..., 1) and SpatialDropout1D/2D/3D on a static "
                            f"channel dimension are kept")
            return orig_do(self, inputs, training=training)
        mark = f"{DROPOUT_MARK}{encode_float(self.rate)}" + (NOISE_MARK if noise else "")
        one = tf.raw_ops.PlaceholderWithDefault(input=tf.ones([], inputs.dtype), shape=[], name=mark)
        return inputs * one

    orig_ln = LayerNormalization.call

    def ln_call(self: Any, inputs: Any) -> Any:
        rank = len(inputs.shape)
        if (not tf.inside_function() or list(self.axis) not in ([-1], [rank - 1]) or not (self.center and self.scale)
                or inputs.dtype != tf.float32):
            return orig_ln(self, inputs)
        fused = self._fused
        self._fused = False  # the formula _keep_layer_norms recognises (the fused one reshapes to NCHW)
        try:
            with tf.name_scope(f"{LN_MARK}{encode_float(self.epsilon)}"):
                return orig_ln(self, inputs)
        finally:
            self._fused = fused

    orig_prelu = PReLU.call

    def prelu_call(self: Any, inputs: Any) -> Any:
        if not tf.inside_function():
            return orig_prelu(self, inputs)
        return tf.nn.relu(inputs) - tf.convert_to_tensor(self.alpha) * tf.nn.relu(-inputs)

    patched = []
    for obj, attr, new in ((base, "_read_variable_op", read), (base, "sparse_read", sparse_read),
                           (base, "gather_nd", gather_nd), (BatchNormalizationBase, "call", bn_call),
                           (Dropout, "call", do_call), (LayerNormalization, "call", ln_call),
                           (PReLU, "call", prelu_call)):
        patched.append((obj, attr, obj.__dict__[attr]))
        setattr(obj, attr, new)
    try:
        yield
    finally:
        for obj, attr, orig in reversed(patched):
            setattr(obj, attr, orig)


#: Suffix of a Dropout marker (and of its ONNX Dropout node's name) whose Keras layer has a per-sample
#: ``noise_shape`` ``(None, 1, ..., 1)``: :mod:`mmbridge.convert.ops.dropout` reads the same string.
NOISE_MARK = "__mmb_noise_per_sample"


# CHANNEL_MARK (mmbridge.graph.markers): the Dropout marker suffix of a SpatialDropout1D/2D/3D, one
# mask value per (sample, channel). That marker is not a scalar but ones shaped like the mask without
# its batch axis ([1, 1, 1, C] for an NHWC SpatialDropout2D): the Mul's broadcasting ties it to the
# layout of the tensor it multiplies in the ONNX graph, so the channel axis at the node is the marker's
# axis of size C, wherever tf2onnx moved transposes; postprocess writes it into the node name.


def _spatial_channels(layer: Any, inputs: Any) -> tuple[int, int] | None:
    """``(channel axis, channels)`` of a Keras ``SpatialDropout*`` call on ``inputs`` (its
    ``data_format``; SpatialDropout1D is channels-last), or None when the rank does not match the
    layer's or the channel dimension is not static."""
    rank = len(inputs.shape)
    want = {"SpatialDropout1D": 3, "SpatialDropout2D": 4, "SpatialDropout3D": 5}
    expected = next((r for cls in type(layer).__mro__ for n, r in want.items() if cls.__name__ == n), None)
    if expected is None or rank != expected:
        return None
    axis = 1 if getattr(layer, "data_format", "channels_last") == "channels_first" else rank - 1
    c = inputs.shape[axis]
    return None if c is None else (axis, int(c))


def _marked_channel_dropout(tf: Any, inputs: Any, rate: float, channels: tuple[int, int]) -> Any:
    """``inputs * ones`` where ``ones`` is a :data:`CHANNEL_MARK` Dropout marker of shape ``[1, .., C, .., 1]``
    (rank of ``inputs``, ``C`` at the channel axis): the identity at inference, which :func:`postprocess`
    turns into a per-(sample, channel) Dropout."""
    axis, c = channels
    shape = [1] * len(inputs.shape)
    shape[axis] = c
    mark = f"{DROPOUT_MARK}{encode_float(rate)}{CHANNEL_MARK}"
    one = tf.raw_ops.PlaceholderWithDefault(input=tf.ones(shape, inputs.dtype), shape=shape, name=mark)
    return inputs * one


def _per_sample_noise(noise_shape: Any, rank: int) -> bool | None:
    """False: no noise_shape; True: ``(None, 1, ..., 1)`` of the input's rank (one mask value per
    sample, layout-free, so NHWC / NCHW do not matter); None: any other noise_shape (not kept)."""
    if noise_shape is None:
        return False
    dims = list(noise_shape)
    if len(dims) == rank and rank >= 2 and all(d == 1 for d in dims[1:]):
        return True
    return None


def check_trainable_source(obj: Any) -> None:
    """Refuse a Keras object that a ``trainable=True`` export cannot keep trainable, before tracing.

    A mixed-precision policy (``mixed_float16`` / ``mixed_bfloat16``, Keras 3 or tf-keras): the graph
    would compute in float16 with the BatchNorms folded; AMP in torch comes from ``torch.autocast``
    instead. (tf-keras models are patched like Keras 3 ones: :func:`_tf_keras_patches`.)

    Raises:
        ExportError: naming the layer and the fix.
    """
    from mmbridge.errors import ExportError

    layers = [obj] + list(getattr(obj, "_flatten_layers", lambda **k: [])(include_self=False, recursive=True))
    for ly in layers:
        policy = getattr(ly, "dtype_policy", None)
        pname = getattr(policy, "name", str(policy) if policy is not None else "")
        if isinstance(pname, str) and pname.startswith("mixed_"):
            raise ExportError(
                f"trainable export of {obj.name!r}: layer {ly.name!r} ({type(ly).__name__}) uses the mixed-precision "
                f"policy {pname!r}; the graph would compute in {pname.split('_', 1)[1]} with its BatchNorms folded, "
                f"so the torch module would not train like the Keras model. What to do: build the model under "
                f"keras.mixed_precision.set_dtype_policy('float32') (or dtype='float32' per layer), load the "
                f"weights (set_weights / load_weights) and export that float32 model; for mixed precision in "
                f"torch use torch.autocast around the converted module (the Trainer's amp option)")


def postprocess(model: Any) -> list[str]:
    """Rewrite the tf2onnx output of a ``trainable=True`` export in place (see the module doc).

    Args:
        model: the ``onnx.ModelProto`` straight from tf2onnx (before checks and optimisation).

    Returns:
        Notes for the artifact metadata: counts of kept weights / BatchNorms / Dropouts, and
        every layer that could not be kept and why.

    Raises:
        ValueError: a marker initializer that a Dropout rewrite needs is missing (a tf2onnx
            change); the message names the node.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}

    # fold single-use shape/layout ops on marker initializers into new marker initializers
    def consumers() -> dict[str, int]:
        count: dict[str, int] = {}
        for n in g.node:
            for x in n.input:
                count[x] = count.get(x, 0) + 1
        for o in g.output:
            count[o.name] = count.get(o.name, 0) + 1
        return count

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    folded = 0
    changed = True
    while changed:
        changed = False
        uses = consumers()
        for node in list(g.node):
            if node.op_type not in _FOLDABLE or not node.input or node.input[0] not in inits:
                continue
            src = node.input[0]
            mark = marker_of(src)
            if mark not in (VAR_MARK, STATE_MARK) or uses.get(src, 0) != 1:
                continue
            if any(x and x not in inits for x in node.input[1:]):
                continue
            value = _eval_node(node, {x: numpy_helper.to_array(inits[x]) for x in node.input if x}, opset)
            out = node.output[0]
            if out in {o.name for o in g.output}:
                continue
            new = numpy_helper.from_array(np.ascontiguousarray(value), out)
            g.initializer.remove(inits.pop(src))
            for x in node.input[1:]:
                if x in inits and uses.get(x, 0) == 1:
                    g.initializer.remove(inits.pop(x))
            # keep the marker in the name: the folded tensor *is* the Keras variable, relaid out
            new_name = src.rsplit(":", 1)[0] + f"__{node.op_type.lower()}"
            new.name = new_name
            g.initializer.append(new)
            inits[new_name] = new
            _rename_value(g, out, new_name)
            g.node.remove(node)
            folded += 1
            changed = True
            break

    # BatchNormalization: Keras momentum
    n_bn = 0
    for node in g.node:
        if node.op_type == "BatchNormalization" and BN_MARK in node.name:
            m = re.search(re.escape(BN_MARK) + r"([0-9pe+-]+)", node.name)
            if m:
                momentum = decode_float(m.group(1))
                for a in list(node.attribute):
                    if a.name == "momentum":
                        node.attribute.remove(a)
                node.attribute.append(helper.make_attribute("momentum", momentum))
                n_bn += 1

    n_ln = _keep_layer_norms(model, inits, opset) if opset >= 17 else 0

    # Dropout markers: Mul(x, 1) -> Dropout(x, ratio)
    n_do = 0
    for node in list(g.node):
        if node.op_type != "Mul":
            continue
        marks = [x for x in node.input if x in inits and marker_of(x) == DROPOUT_MARK]
        if not marks:
            continue
        mark = marks[0]
        m = re.search(re.escape(DROPOUT_MARK) + r"([0-9pe+-]+)", mark)
        if m is None:
            raise ValueError(f"trainable export: Dropout marker {mark!r} on node {node.name!r} carries no rate")
        rate = decode_float(m.group(1))
        data = [x for x in node.input if x != mark][0]
        pos = list(g.node).index(node)
        node_name = node.name + "__dropout" + (NOISE_MARK if NOISE_MARK in mark else "")
        if CHANNEL_MARK in mark:  # SpatialDropout: the marker's axis of size C is the channel axis here
            dims = list(inits[mark].dims)
            axes = [i for i, d in enumerate(dims) if d != 1]
            if len(axes) > 1 or 0 in axes:  # not a [1, .., C, .., 1] mask: leave the Mul, the audit refuses it
                _SKIPPED.append(f"SpatialDropout marker {mark!r} of shape {dims} is not [1, .., C, .., 1] at node "
                                f"{node.name!r}: not kept")
                continue
            # C == 1: one value per (sample, channel) is one per sample
            node_name = node.name + "__dropout" + (f"{CHANNEL_MARK}_a{axes[0]}" if axes else NOISE_MARK)
        if opset >= 12:
            ratio_name = mark.rsplit(":", 1)[0] + "__ratio"
            if ratio_name not in inits:
                t = numpy_helper.from_array(np.array(rate, dtype=np.float32), ratio_name)
                g.initializer.append(t)
                inits[ratio_name] = t
            new = helper.make_node("Dropout", [data, ratio_name], [node.output[0]], name=node_name)
        else:
            new = helper.make_node("Dropout", [data], [node.output[0]], name=node_name, ratio=rate)
        g.node.remove(node)
        g.node.insert(pos, new)
        n_do += 1
    uses = consumers()
    for name in [n for n in inits if marker_of(n) == DROPOUT_MARK and not uses.get(n)]:
        g.initializer.remove(inits.pop(name))

    _sync_marker_inputs(g, inits)
    n_var = sum(1 for n in inits if marker_of(n) == VAR_MARK)
    n_state = sum(1 for n in inits if marker_of(n) == STATE_MARK)
    notes = [f"trainable export: {n_var} trainable weight tensors and {n_state} state tensors kept as named "
             f"initializers ({folded} layout ops folded into them); {n_bn} BatchNormalization, {n_ln} LayerNormalization "
             f"and {n_do} Dropout nodes kept"]
    notes += [f"trainable export: {s}" for s in _SKIPPED]
    _SKIPPED.clear()
    return notes


def _keep_layer_norms(model: Any, inits: dict[str, Any], opset: int) -> int:
    """Replace each decomposed Keras LayerNormalization (scope ``mmb_ln__e<eps>``) by one ONNX
    ``LayerNormalization(x, gamma, beta, axis=-1, epsilon=eps)`` (opset >= 17).

    A scope is replaced only when it has exactly one external input, one external output and
    the two marker weights ``.../gamma`` and ``.../beta``; otherwise it stays decomposed (with
    gamma / beta still trainable initializers). Returns the number of replaced scopes.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    scopes: dict[str, list[Any]] = {}
    for node in g.node:
        m = re.search(r"^(.*?" + re.escape(LN_MARK) + r"[0-9pe+-]+)", node.name)
        if m:
            scopes.setdefault(m.group(1), []).append(node)
    graph_outputs = {o.name for o in g.output}
    replaced = 0
    for scope, members in scopes.items():
        produced = {o for n in members for o in n.output}
        member_ids = {id(n) for n in members}
        ext_in = {x for n in members for x in n.input if x and x not in produced and x not in inits}
        ext_out = {o for o in produced if o in graph_outputs
                   or any(o in n.input for n in g.node if id(n) not in member_ids)}
        weights = {x for n in members for x in n.input if x in inits and marker_of(x) == VAR_MARK}
        gamma = [w for w in weights if re.search(r"gamma(?:__|:|$)", w)]
        beta = [w for w in weights if re.search(r"beta(?:__|:|$)", w)]
        if len(ext_in) != 1 or len(ext_out) != 1 or len(gamma) != 1 or len(beta) != 1:
            continue
        eps = decode_float(scope.rsplit(LN_MARK, 1)[1])
        for w in (gamma[0], beta[0]):  # [1, C] (Keras reshapes for broadcasting) -> [C]
            arr = numpy_helper.to_array(inits[w])
            if arr.ndim != 1:
                t = numpy_helper.from_array(np.ascontiguousarray(arr.reshape(-1)), w)
                g.initializer.remove(inits[w])
                g.initializer.append(t)
                inits[w] = t
        pos = min(i for i, n in enumerate(g.node) if id(n) in member_ids)
        for n in members:
            g.node.remove(n)
        ln = helper.make_node("LayerNormalization", [ext_in.pop(), gamma[0], beta[0]], [ext_out.pop()],
                              name=f"{scope}/LayerNormalization", axis=-1, epsilon=eps)
        g.node.insert(pos, ln)
        replaced += 1
    used = {x for n in g.node for x in n.input}
    for name in [n for n in inits if n not in used and not marker_of(n)]:
        g.initializer.remove(inits.pop(name))
    return replaced


def _sync_marker_inputs(graph: Any, inits: dict[str, Any]) -> None:
    """Make the graph inputs with initializers exactly the VAR/STATE marker initializers.

    They stay graph inputs (with their initializer as default, ONNX IR >= 4) until
    :func:`mmbridge.convert.core.to_torch` strips them: onnxoptimizer's
    ``eliminate_duplicate_initializer`` would otherwise merge equal-valued weights (a zero conv
    bias with a zero moving mean, a unit gamma with a unit variance). onnxruntime lists such
    inputs under ``get_overridable_initializers()``, not ``get_inputs()``, so feeding only the
    spec inputs keeps working.
    """
    from onnx import helper

    for i in [i for i in graph.input if i.name in inits or marker_of(i.name)]:
        graph.input.remove(i)
    for name, t in inits.items():
        if marker_of(name) in (VAR_MARK, STATE_MARK):
            graph.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))


def _rename_value(graph: Any, old: str, new: str) -> None:
    for n in graph.node:
        for i, x in enumerate(n.input):
            if x == old:
                n.input[i] = new
    for vi in graph.value_info:
        if vi.name == old:
            graph.value_info.remove(vi)
            break


def _eval_node(node: Any, values: dict[str, Any], opset: int) -> Any:
    """Evaluate one ONNX node on numpy inputs with ``onnx.reference`` (exact, CPU)."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    ins = [x for x in node.input]
    inputs = [onnx.helper.make_tensor_value_info(x, onnx.helper.np_dtype_to_tensor_dtype(values[x].dtype), values[x].shape)
              for x in ins if x]
    out = onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.UNDEFINED, None)
    g = onnx.helper.make_graph([node], "fold", inputs, [out])
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", opset)])
    return ReferenceEvaluator(m).run(None, {x: values[x] for x in ins if x})[0]
