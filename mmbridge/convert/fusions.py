"""Post-conversion fusions of the fx graph ``to_torch`` builds (issue 16, items 4 and 5).

onnx2torch turns every ONNX node into one ``call_module``; on small tensors the Python call of
each module costs more than its kernel, and chains of element-wise ops write one tensor each.
These passes rewrite patterns that tf2onnx emits for common Keras / TF code into fewer, cheaper
calls **computing the same values** (the same torch kernels on the same operands in the same
order; the one exception, GELU, is documented there and tested to a few ulp):

* :func:`fuse_gelu`: Keras / TF exact GELU, ``0.5 * x * erfc(-x / sqrt 2)`` as tf2onnx writes it
  after mmbridge's ``Erfc`` rewrite (``Mul``, ``Neg``, ``Mul``, ``Erf``, ``Sub``, ``Mul``; also the
  ``1 + erf(x / sqrt 2)`` form) -> one ``nn.GELU()``.
* :func:`fuse_constant_elementwise`: a chain of ``Add`` / ``Sub`` / ``Mul`` / ``Div`` / ``Min`` /
  ``Max`` / ``Clip`` whose other operand is a constant (a buffer, never a trainable parameter),
  as a Keras ``Normalization`` + clip exports -> one :class:`ConstantElementwise` that applies the
  same ops with plain torch functions, in place on its own first result when no gradient is
  recorded (onnx2torch's ``Min`` / ``Max`` stack and reduce their broadcast operands).
* :func:`fast_call` (run by ``to_torch`` after ``recompile()``): the converted module's
  ``__call__`` (and ``ConstantElementwise``'s) call ``forward`` directly when
  ``nn.Module._call_impl`` would (no hooks, not ``compile()``d, no jit trace, fx's tracer not
  patching ``nn.Module.__call__``), without fx's and ``nn.Module``'s call wrappers (four Python
  frames); the same values and errors.
* :func:`lower_views`: ``Reshape`` (constant target), ``Transpose``, ``Squeeze`` and ``Unsqueeze``
  modules (the ones tf2onnx puts around each einsum of Keras ``MultiHeadAttention``) -> direct
  ``Tensor.reshape`` / ``permute`` / ``squeeze`` / ``unsqueeze`` calls in the graph, without a
  module call each.
* :func:`fuse_embedding_lookup`: ``Gather(table, ids, axis=0)`` of a 2-D weight (and the
  ``Cast`` / ``Less`` / ``Add`` / ``Where`` wrap of negative ids that Keras 3's ``Embedding``
  puts before it) -> one :class:`EmbeddingLookup` (``F.embedding``: the same rows, bit for bit).
* :func:`fuse_pad_conv`: onnx2torch's ``Sequential(zero pad, ConvNd)`` (TF's asymmetric "same"
  padding) -> :class:`mmbridge.convert.ops.conv.PadConv`: the same kernels, without keeping the
  padded copy for backward (memory, not speed).
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.modules.module as _nn_module
from torch import fx, nn

_SQRT1_2 = 1.0 / math.sqrt(2.0)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _module(gm: fx.GraphModule, node: Any) -> nn.Module | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        return gm.get_submodule(node.target)
    return None


def _binop(gm: fx.GraphModule, node: Any) -> str | None:
    """``"add" | "sub" | "mul" | "div"`` for an onnx2torch binary math module without old-style broadcast."""
    from onnx2torch.node_converters.binary_math_operations import OnnxBinaryMathOperation

    mod = _module(gm, node)
    if not isinstance(mod, OnnxBinaryMathOperation) or mod.broadcast == 1 or node.kwargs or len(node.args) != 2:
        return None
    fn = mod.math_op_function
    return {torch.add: "add", torch.sub: "sub", torch.mul: "mul"}.get(fn) or (
        "div" if getattr(fn, "__name__", "") == "_onnx_div" else None)


def _replace_module(gm: fx.GraphModule, target: str, new: nn.Module) -> None:
    parent, _, leaf = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, new)


def _const_tensor(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The value of a ``get_attr`` buffer (never a parameter) or an ``OnnxConstant`` node."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        try:
            value = operator.attrgetter(node.target)(gm)
        except AttributeError:
            return None
        return value if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) else None
    mod = _module(gm, node)
    if type(mod).__name__ == "OnnxConstant" and not node.args and isinstance(getattr(mod, "value", None), torch.Tensor):
        return mod.value
    return None


def _scalar(gm: fx.GraphModule, node: Any) -> float | None:
    t = _const_tensor(gm, node)
    if t is None or t.numel() != 1 or not t.is_floating_point():
        return None
    return float(t.reshape(()).item())


# ---------------------------------------------------------------------------------------------
# GELU
# ---------------------------------------------------------------------------------------------
def _erf_argument_sign(gm: fx.GraphModule, z: Any, x: Any) -> int | None:
    """+1 if ``z`` is ``x / sqrt 2``, -1 if it is ``-x / sqrt 2`` (as Mul by +-1/sqrt 2 or Div by +-sqrt 2,
    optionally of ``Neg(x)``), else None."""
    op = _binop(gm, z)
    if op not in ("mul", "div"):
        return None
    a, b = z.args
    if op == "mul":
        c, y = (_scalar(gm, a), b) if _scalar(gm, a) is not None else (_scalar(gm, b), a)
        if c is None or abs(abs(c) - _SQRT1_2) > 1e-6:
            return None
    else:
        c, y = _scalar(gm, b), a
        if c is None or abs(abs(c) - math.sqrt(2.0)) > 1e-6:
            return None
    sign = 1 if c > 0 else -1
    if y is x:
        return sign
    if type(_module(gm, y)).__name__ == "OnnxNeg" and y.args and y.args[0] is x:
        return -sign
    return None


def _gelu_input(gm: fx.GraphModule, top: fx.Node) -> Any:
    """``x`` when ``top`` computes ``0.5 * x * (1 +- erf(+-x / sqrt 2))`` (the exact GELU), else None."""
    from onnx2torch.node_converters.activations import OnnxErf

    leaves: list[Any] = []
    stack = [top]
    while stack:  # the factors of a product of Mul nodes (inner ones used only by the product)
        n = stack.pop()
        if _binop(gm, n) == "mul" and (n is top or len(n.users) == 1):
            stack.extend(n.args)
        else:
            leaves.append(n)
    if len(leaves) != 3:
        return None
    halves = [n for n in leaves if _scalar(gm, n) == 0.5]
    if len(halves) != 1:
        return None
    rest = [n for n in leaves if n is not halves[0]]
    for e, x in (rest, rest[::-1]):
        op = _binop(gm, e)
        if op not in ("add", "sub") or not isinstance(x, fx.Node):
            continue
        a, b = e.args
        if op == "sub":
            one, erf, want = a, b, -1  # 1 - erf(z) = erfc(z): z must be -x / sqrt 2
        else:
            one, erf = (a, b) if _scalar(gm, a) == 1.0 else (b, a)
            want = 1
        if _scalar(gm, one) != 1.0 or not isinstance(_module(gm, erf), OnnxErf) or len(erf.args) != 1:
            continue
        if _erf_argument_sign(gm, erf.args[0], x) == want:
            return x
    return None


def fuse_gelu(gm: fx.GraphModule) -> int:
    """Exact GELU as tf2onnx writes Keras ``gelu`` / ``tf.nn.gelu(approximate=False)`` -> ``nn.GELU()``.

    Matches a product of Mul nodes with the factors ``0.5``, ``x`` and ``1 - erf(-x / sqrt 2)``
    (``erfc`` after mmbridge's rewrite) or ``1 + erf(x / sqrt 2)``, in any order. torch's GELU
    kernel computes ``x * 0.5 * (1 + erf(x * M_SQRT1_2))`` in one pass (one kernel forward and
    backward, only ``x`` saved) instead of six ops that each write a tensor; values agree to a
    few ulp (the association of the products differs; ``tests/convert/test_fusions.py`` bounds it).
    The nodes left without users are removed by the caller's dead-code elimination. Returns the
    number of GELUs fused.
    """
    fused = 0
    for top in list(gm.graph.nodes):
        if _binop(gm, top) != "mul":
            continue
        x = _gelu_input(gm, top)
        if x is None:
            continue
        _replace_module(gm, top.target, nn.GELU())
        top.args = (x,)
        fused += 1
    if fused:
        gm.graph.eliminate_dead_code()
    return fused


# ---------------------------------------------------------------------------------------------
# chains of element-wise ops with constant operands
# ---------------------------------------------------------------------------------------------
_OUT_OF_PLACE = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
                 "min": torch.minimum, "max": torch.maximum}


def _minimum_(t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.minimum(t, c, out=t)


def _maximum_(t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.maximum(t, c, out=t)


# what nn.Module._call_impl checks before calling forward directly (torch.nn.modules.module)
_G_FWD, _G_FWD_PRE = _nn_module._global_forward_hooks, _nn_module._global_forward_pre_hooks
_G_BWD, _G_BWD_PRE = _nn_module._global_backward_hooks, _nn_module._global_backward_pre_hooks
_MODULE_CALL = nn.Module.__call__
_tracing_state = torch._C._get_tracing_state


def _no_call_hooks(d: dict[str, Any]) -> bool:
    """True when ``nn.Module._call_impl`` would call ``forward`` directly for the module whose
    ``__dict__`` is ``d``: no hooks of its own or global ones, not ``module.compile()``d, no
    ``torch.jit`` trace running, and ``nn.Module.__call__`` not patched (fx's tracer does)."""
    try:
        return (d.get("_compiled_call_impl") is None and not (  # a class attribute until compile()
            d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"] or d["_backward_pre_hooks"]
            or _G_FWD or _G_FWD_PRE or _G_BWD or _G_BWD_PRE)
            and nn.Module.__call__ is _MODULE_CALL and not _tracing_state())
    except KeyError:  # a module not set up by nn.Module.__init__ / __setstate__: the stock call
        return False
_is_compiling = torch.compiler.is_compiling  # under torch.compile: Min + Max as two ops, no data-dependent check

_IN_PLACE = {"add": torch.Tensor.add_, "sub": torch.Tensor.sub_, "mul": torch.Tensor.mul_, "div": torch.Tensor.div_,
             "min": _minimum_, "max": _maximum_}


class ConstantElementwise(nn.Module):
    """A chain of element-wise ops, each with one constant operand, as one module.

    Called as ``module(x, *constants)`` (the constants stay the graph's ``get_attr`` buffers, so
    ``state_dict`` keys and ``mmbridge_sources`` do not change). ``steps`` is a tuple of
    ``(op, constant index, reversed, lo, hi)``: ``op`` is ``add`` / ``sub`` / ``mul`` / ``div`` /
    ``min`` / ``max`` (``reversed``: the constant is the first operand, ``c - t``) or ``clip``
    (``torch.clamp(t, lo, hi)``, the bounds as Python floats, as onnx2torch's ``OnnxClip`` has).

    The first op writes a new tensor; when no gradient is recorded, the constants have its dtype
    and do not broadcast it to a larger shape, the later ops run in place on that tensor (same
    kernels, same values, no intermediate tensors). Otherwise every op is out of place, exactly
    as the unfused graph. ``Min`` + ``Max`` become one ``clamp_`` only when the bounds are
    ordered (checked, cached per bound tensor and version) and not under ``torch.compile``
    (there: the two ops, no data-dependent check, no graph break).
    """

    def __init__(self, steps: tuple[tuple[str, int | None, bool, float | None, float | None], ...],
                 slots: tuple[tuple[str, Any], ...] = ()):
        """``slots``: where constant ``k`` comes from: ``("arg", i)`` (the ``i``-th extra call
        argument, a ``get_attr`` the graph shares with other nodes) or ``("own", name)`` (a buffer
        of this module, moved here from ``gm.weights`` when nothing else used it)."""
        super().__init__()
        self.steps = tuple(steps)
        self.slots = tuple(slots)
        self._inplace_cache: dict[Any, bool] = {}
        self._ordered_key: Any = None
        own_only = bool(self.slots) and all(kind == "own" for kind, _ in self.slots)
        self._own_names = tuple(v for _, v in self.slots) if own_only else None
        self._ordered_val = False

    @staticmethod
    def _step(t: torch.Tensor, step: tuple, consts: tuple) -> torch.Tensor:
        op, k, rev, lo, hi = step
        if op == "clip":
            return torch.clamp(t, lo, hi)
        c = consts[k]
        return _OUT_OF_PLACE[op](c, t) if rev else _OUT_OF_PLACE[op](t, c)

    def _inplace_ok(self, t: torch.Tensor, consts: tuple) -> bool:
        key = (t.shape, t.dtype)
        ok = self._inplace_cache.get(key)
        if ok is None:
            ok = all(c.dtype == t.dtype and c.device == t.device and torch.broadcast_shapes(t.shape, c.shape) == t.shape
                     for c in consts)
            if len(self._inplace_cache) < 16:
                self._inplace_cache[key] = ok
        return ok

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``nn.Module.__call__`` without its two Python frames when no hook, ``compile()`` or
        ``torch.jit`` trace applies (exactly when ``nn.Module._call_impl`` calls ``forward``
        directly, :func:`_no_call_hooks`); otherwise ``nn.Module.__call__`` itself."""
        d = self.__dict__
        if _no_call_hooks(d):
            fwd = d.get("forward")  # an instance-level forward wins, as in nn.Module._call_impl
            return fwd(*args, **kwargs) if fwd is not None else type(self).forward(self, *args, **kwargs)
        return nn.Module.__call__(self, *args, **kwargs)  # looked up now: fx's tracer patches it

    def forward(self, x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        # nn.Module defines __getattr__, which puts every self.<attr> on CPython's slow path: the
        # attributes are read from __dict__ (they are plain attributes; the buffers are in _buffers)
        d = self.__dict__
        names = d["_own_names"]
        if names is not None:
            if _is_compiling():
                # dynamo cannot call an operator.itemgetter: a module called eagerly once (which
                # caches the getter) and then compiled broke the graph here
                buffers = d["_buffers"]
                consts = tuple(buffers[n] for n in names)
            else:
                # read each call: .to() / load_state_dict replace these entries; one C call
                getter = d.get("_getter")
                if getter is None:
                    getter = self._getter = operator.itemgetter(*names)
                consts = getter(d["_buffers"])
                if len(names) == 1:
                    consts = (consts,)
        elif d["slots"]:
            own = d["_buffers"]
            consts = [own[v] if kind == "own" else args[v] for kind, v in d["slots"]]
        else:
            consts = args
        steps = d["steps"]
        op, k, rev, lo, hi = steps[0]
        if op == "clip":
            t = torch.clamp(x, lo, hi)
        else:
            t = _OUT_OF_PLACE[op](consts[k], x) if rev else _OUT_OF_PLACE[op](x, consts[k])
        if len(steps) == 1:
            return t
        ok = d["_inplace_cache"].get((t.shape, t.dtype))
        if ok is None:
            ok = self._inplace_ok(t, consts)
        if (t.requires_grad and torch.is_grad_enabled()) or not ok:
            for step in steps[1:]:
                t = self._step(t, step, consts)
            return t
        i, n = 1, len(steps)
        while i < n:
            op, k, rev, lo, hi = steps[i]
            if rev:
                t = _OUT_OF_PLACE[op](consts[k], t)
            elif op == "clip":
                t.clamp_(lo, hi)
            elif op in ("min", "max") and i + 1 < n and steps[i + 1][0] == ("max" if op == "min" else "min") \
                    and not steps[i + 1][2]:
                # Min(hi) then Max(lo) (a TF clip_by_value) as one clamp_(lo, hi): the same values
                # when lo <= hi everywhere (checked, cached per buffer version); Max then Min always
                c_lo, c_hi = (consts[steps[i + 1][1]], consts[k]) if op == "min" else (consts[k], consts[steps[i + 1][1]])
                if op == "max" or (not _is_compiling() and self._ordered(c_lo, c_hi)):
                    t.clamp_(c_lo, c_hi)
                else:
                    _IN_PLACE[op](t, consts[k])
                    _IN_PLACE[steps[i + 1][0]](t, consts[steps[i + 1][1]])
                i += 1
            else:
                _IN_PLACE[op](t, consts[k])
            i += 1
        return t

    def _ordered(self, lo: torch.Tensor, hi: torch.Tensor) -> bool:
        """``(lo <= hi).all()``, cached per (tensor object, version counter, data pointer) of both
        bounds: a buffer replaced (``.to()``, assignment) is another object, one changed in place
        (``load_state_dict``, ``copy_``, ``set_``) has a new version, and one given new data with
        ``buf.data = t`` (which bumps neither) has another data pointer."""
        key = self._ordered_key
        if (key is not None and key[0] is lo and key[1] is hi and key[2] == lo._version and key[3] == hi._version
                and key[4] == lo.data_ptr() and key[5] == hi.data_ptr()):
            return self._ordered_val
        self._ordered_val = bool((lo <= hi).all())
        self._ordered_key = (lo, hi, lo._version, hi._version, lo.data_ptr(), hi.data_ptr())
        return self._ordered_val

    def extra_repr(self) -> str:
        return " -> ".join(s[0] if s[0] != "clip" else f"clip({s[3]}, {s[4]})" for s in self.steps)


def _elementwise_step(gm: fx.GraphModule, node: fx.Node) -> tuple[Any, str, Any, bool, float | None, float | None] | None:
    """``(data input, op, constant node or None, reversed, lo, hi)`` for one fusable node, else None."""
    mod = _module(gm, node)
    if mod is None or node.kwargs:
        return None
    name = type(mod).__name__
    if name == "OnnxClip" and len(node.args) == 1:
        lo, hi = mod.min_val, mod.max_val
        if not all(v is None or isinstance(v, (int, float)) for v in (lo, hi)):
            return None
        return node.args[0], "clip", None, False, lo, hi
    if name == "OnnxMinMax" and len(node.args) == 2:
        op = "min" if mod._operator is torch.amin else "max" if mod._operator is torch.amax else None
    else:
        op = _binop(gm, node)
    if op is None:
        return None
    a, b = node.args
    ca, cb = _const_tensor(gm, a), _const_tensor(gm, b)
    if (ca is None) == (cb is None):
        return None  # both constant (folded elsewhere) or neither
    const, data, rev = (b, a, False) if cb is not None else (a, b, True)
    value = cb if cb is not None else ca
    if const.op != "get_attr" or not value.is_floating_point() or not isinstance(data, fx.Node):
        return None
    if op in ("add", "mul", "min", "max"):
        rev = False  # commutative, bit for bit
    return data, op, const, rev, None, None


def fuse_constant_elementwise(gm: fx.GraphModule) -> int:
    """Chains of element-wise ops with constant (buffer) operands -> one :class:`ConstantElementwise`.

    A chain continues through a node whose only user is the next step. Single ``Add`` / ``Sub`` /
    ``Mul`` / ``Div`` nodes are left alone (nothing to gain); a single ``Min`` / ``Max`` / ``Clip``
    is replaced (onnx2torch's ``Min`` / ``Max`` stack their operands). Returns the number of
    nodes folded into fused modules.
    """
    chains: dict[fx.Node, list[tuple[fx.Node, tuple]]] = {}
    head_of: dict[fx.Node, fx.Node] = {}
    for node in list(gm.graph.nodes):
        step = _elementwise_step(gm, node)
        if step is None:
            continue
        data = step[0]
        if data in head_of and len(data.users) == 1 and chains[head_of[data]][-1][0] is data:
            head = head_of[data]
            chains[head].append((node, step))
        else:
            head = node
            chains[head] = [(node, step)]
        head_of[node] = head
    folded = 0
    for chain in chains.values():
        if len(chain) == 1 and chain[0][1][1] in ("add", "sub", "mul", "div"):
            continue
        x = chain[0][1][0]
        consts: list[fx.Node] = []
        steps = []
        for _, (_, op, const, rev, lo, hi) in chain:
            k = None
            if const is not None:
                if const not in consts:
                    consts.append(const)
                k = consts.index(const)
            steps.append((op, k, rev, lo, hi))
        last = chain[-1][0]
        members = {n for n, _ in chain}
        targets = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
        slots: list[tuple[str, Any]] = []
        args: list[fx.Node] = []
        owned: dict[str, torch.Tensor] = {}
        for k, const in enumerate(consts):
            holder_name, _, leaf = const.target.rpartition(".")
            holder = gm.get_submodule(holder_name) if holder_name else gm
            exclusive = set(const.users) <= members and targets.count(const.target) == 1 and leaf in holder._buffers
            if exclusive:  # move the buffer into the fused module: no get_attr per call
                owned[f"c{k}"] = holder._buffers.pop(leaf)
                slots.append(("own", f"c{k}"))
                sources = getattr(gm, "mmbridge_sources", None)
                if sources is not None and const.target in sources:
                    sources[f"{last.target}.c{k}"] = sources.pop(const.target)
            else:
                slots.append(("arg", len(args)))
                args.append(const)
        fused = ConstantElementwise(tuple(steps), tuple(slots))
        for name, value in owned.items():
            fused.register_buffer(name, value)
        _replace_module(gm, last.target, fused)
        last.args = (x, *args)
        for node, _ in reversed(chain[:-1]):
            gm.graph.erase_node(node)
        for const in consts:
            if not const.users:
                gm.graph.erase_node(const)
        folded += len(chain)
    return folded


def fast_call(gm: fx.GraphModule) -> fx.GraphModule:
    """Give ``gm`` (one ``to_torch`` result) a ``__call__`` without ``fx``'s call wrappers.

    ``fx.GraphModule.__call__`` is ``call_wrapped`` -> ``_WrappedCall.__call__`` ->
    ``nn.Module.__call__`` -> ``_call_impl`` -> ``forward``: four Python frames, ~1 us per call on
    a small CPU graph. Every GraphModule has its own class (``GraphModule.__new__``), so this sets
    that class's ``__call__`` to one that calls ``forward`` directly when ``nn.Module._call_impl``
    would (no hooks, not ``compile()``d, no ``torch.jit`` trace), and otherwise the original
    ``__call__``. An exception from the generated code prints the same "generated forward
    function" context as ``_WrappedCall``. ``recompile()``, pickling and ``deepcopy`` give back
    the stock ``__call__`` (slower, same values); ``torch.compile`` traces ``forward`` as before.
    Returns ``gm``.
    """
    cls = type(gm)
    if cls is fx.GraphModule or not issubclass(cls, fx.GraphModule) or "forward" not in vars(cls):
        return gm  # not a per-instance GraphModuleImpl class: leave it alone
    original = cls.__call__

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        d = self.__dict__
        if _no_call_hooks(d):
            fwd = d.get("forward")  # an instance-level forward wins, as in nn.Module._call_impl
            try:
                return fwd(*args, **kwargs) if fwd is not None else cls.forward(self, *args, **kwargs)
            except Exception as e:
                _fx_error_context(e)
                raise
        return original(self, *args, **kwargs)

    cls.__call__ = __call__
    return gm


def _fx_error_context(e: Exception) -> None:
    """What ``torch.fx.graph_module._WrappedCall`` does with an exception raised in generated code:
    print the failing line of the generated forward with context, and drop the traceback."""
    import sys
    import traceback

    wrapped = getattr(fx.graph_module, "_WrappedCall", None)
    if e.__traceback__ is None or wrapped is None:
        return
    top = traceback.StackSummary.extract(traceback.walk_tb(e.__traceback__))[-1]
    if "eval_with_key" in top.filename:
        print(wrapped._generate_error_message(top), file=sys.stderr)
        raise e.with_traceback(None)


# ---------------------------------------------------------------------------------------------
# view ops as direct tensor-method calls
# ---------------------------------------------------------------------------------------------
def lower_views(gm: fx.GraphModule) -> int:
    """``Reshape`` / ``Transpose`` / ``Squeeze`` / ``Unsqueeze`` modules -> ``call_method`` nodes.

    Only forms whose result does not depend on the input's rank are lowered: a constant
    ``Reshape`` target without ``0`` dims (or ``allowzero``), a ``Transpose`` with its ``perm``,
    ``Squeeze`` / ``Unsqueeze`` with non-negative ``axes``. The calls are the ones the modules
    make (``reshape``, ``permute``, ``squeeze`` one axis at a time from the highest, ``unsqueeze`` in ascending axis order).
    Returns the number of nodes lowered.
    """
    from mmbridge.convert.ops.shape import Reshape, Squeeze, Unsqueeze

    try:
        from onnx2torch.node_converters.transpose import OnnxTranspose
    except ImportError:  # pragma: no cover
        OnnxTranspose = ()  # type: ignore[assignment]  # noqa: N806
    lowered = 0
    graph = gm.graph
    for node in list(graph.nodes):
        mod = _module(gm, node)
        if mod is None or node.kwargs or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
            continue
        x = node.args[0]
        calls: list[tuple[str, tuple]] = []
        if isinstance(mod, Reshape) and mod.shape is not None and (mod.allowzero or 0 not in mod.shape):
            calls = [("reshape", (tuple(mod.shape),))]
        elif isinstance(mod, OnnxTranspose) and mod.perm is not None:
            calls = [("permute", (tuple(int(p) for p in mod.perm),))]
        elif isinstance(mod, Squeeze) and mod.axes and all(a >= 0 for a in mod.axes):
            # one axis per call, highest first: torch.onnx.export (TorchScript) squeezes one dim at a time
            calls = [("squeeze", (a,)) for a in sorted(set(mod.axes), reverse=True)]
        elif isinstance(mod, Unsqueeze) and all(a >= 0 for a in mod.axes):
            calls = [("unsqueeze", (a,)) for a in sorted(mod.axes)]
        if not calls:
            continue
        with graph.inserting_before(node):
            cur = x
            for method, args in calls:
                cur = graph.call_method(method, (cur, *args))
        node.replace_all_uses_with(cur)
        graph.erase_node(node)
        lowered += 1
    return lowered


def run_all(gm: fx.GraphModule) -> dict[str, int]:
    """The passes in order (GELU first: its pattern contains constant-operand Mul / Sub nodes)."""
    counts = {"gelu": fuse_gelu(gm), "constant_elementwise": fuse_constant_elementwise(gm), "views": lower_views(gm),
              "pad_conv": fuse_pad_conv(gm)}
    counts.update(_run_xformer(gm))
    gm.graph.lint()
    gm.recompile()
    return counts


# ---------------------------------------------------------------------------------------------
# embedding lookups (issue 16, item 5)
# ---------------------------------------------------------------------------------------------
class EmbeddingLookup(nn.Module):
    """ONNX ``Gather(table, ids, axis=0)`` on a 2-D table, as ``F.embedding`` (``index_select``).

    ``forward(table, ids)``: ``table`` float ``[N, D]`` (the graph's weight), ``ids`` int32 / int64
    of any shape ``S`` -> ``table[ids]``, ``[*S, D]``, the table's dtype. Negative ids count from
    the end (ONNX ``Gather`` / ``numpy.take``: ``id + N`` for ``-N <= id < 0``), as onnx2torch's
    ``OnnxGather`` (advanced indexing) does; the rows are copied, so the values are the same bits.
    An id outside ``[-N, N)`` raises ``IndexError`` from torch ("index out of range"), as ONNX
    Runtime refuses it (onnx2torch's indexing wrapped ids in ``[-2N, -N)`` a second time when the
    graph had already added ``N``). The gradient of ``table`` is ``embedding``'s dense backward
    (an ``index_add`` of the output gradient rows); ``OnnxGather``'s was ``index_put`` with
    accumulation: the same sums, possibly added in another order where an id repeats.
    """

    def forward(self, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        idx = ids if ids.dtype == torch.int64 else ids.long()
        idx = torch.where(idx < 0, idx + table.shape[0], idx)
        return nn.functional.embedding(idx, table)


def _int_scalar(gm: fx.GraphModule, node: Any) -> int | None:
    t = _const_tensor(gm, node)
    if t is None or t.numel() != 1 or t.is_floating_point() or t.dtype == torch.bool:
        return None
    return int(t.reshape(()).item())


def _wrapped_ids(gm: fx.GraphModule, idx: Any, n_rows: int) -> Any:
    """``ids`` when ``idx`` is ``Where(Less(ids, 0), ids + N, ids)`` with ``N = n_rows`` (Keras 3's
    ``ops.take`` on an ``Embedding``; ``Less`` may compare ``Cast(ids)`` to a float, which keeps the
    sign of every integer), else None."""
    from onnx2torch.node_converters.comparisons import OnnxCompare
    from onnx2torch.node_converters.where import OnnxWhere

    from mmbridge.convert.ops.cast import Cast

    if not isinstance(_module(gm, idx), OnnxWhere) or len(idx.args) != 3 or idx.kwargs:
        return None
    cond, added, ids = idx.args
    if _binop(gm, added) != "add" or not isinstance(ids, fx.Node):
        return None
    a, b = added.args
    other = b if a is ids else a if b is ids else None
    if other is None or _int_scalar(gm, other) != n_rows:
        return None
    less = _module(gm, cond)
    if not isinstance(less, OnnxCompare) or less.compare_function is not torch.less or len(cond.args) != 2:
        return None
    lhs, zero = cond.args
    if lhs is not ids:
        cast = _module(gm, lhs)
        if not (isinstance(cast, Cast) and cast.dtype.is_floating_point and lhs.args and lhs.args[0] is ids):
            return None
    z = _const_tensor(gm, zero)
    if z is None or z.numel() != 1 or float(z.reshape(()).item()) != 0.0:
        return None
    return ids


def fuse_embedding_lookup(gm: fx.GraphModule) -> int:
    """``Gather(table, ids, axis=0)`` of a 2-D weight -> :class:`EmbeddingLookup` (one ``index_select``).

    onnx2torch's ``OnnxGather`` indexes ``table[(ids.long(),)]`` (``aten::index``, a general
    advanced-indexing kernel, several times slower than ``index_select``'s row copies for a
    ``[16, 32]`` lookup into a ``[1000, 64]`` table on this CPU). When the
    ids are ``Where(Less(ids, 0), ids + N, ids)`` (what Keras 3's ``Embedding`` exports: ``Cast``,
    ``Less``, ``Add``, ``Where``) with ``N`` the table's row count, the lookup takes ``ids``
    itself: :class:`EmbeddingLookup` applies the same wrap (``Gather`` of the wrapped id is the
    ``Gather`` of the id for every id in ``[-N, N)``), and the four nodes go. Returns the number of
    lookups replaced.
    """
    from onnx2torch.node_converters.gather import OnnxGather

    done = 0
    for node in list(gm.graph.nodes):
        mod = _module(gm, node)
        if not isinstance(mod, OnnxGather) or mod._axis != 0 or len(node.args) != 2 or node.kwargs:
            continue
        table, idx = node.args
        if not isinstance(table, fx.Node) or table.op != "get_attr" or not isinstance(idx, fx.Node):
            continue
        try:
            value = operator.attrgetter(table.target)(gm)
        except AttributeError:
            continue
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or not value.is_floating_point():
            continue
        ids = _wrapped_ids(gm, idx, int(value.shape[0]))
        _replace_module(gm, node.target, EmbeddingLookup())
        node.args = (table, idx if ids is None else ids)
        done += 1
    if done:
        gm.graph.eliminate_dead_code()
    return done


def _run_xformer(gm: fx.GraphModule) -> dict[str, int]:
    """The Transformer passes (issue 16, item 5), run after the others by :func:`run_all`."""
    return {"embedding": fuse_embedding_lookup(gm)}


# ---------------------------------------------------------------------------------------------
# zero Pad + Conv (issue 16, item 5: memory)
# ---------------------------------------------------------------------------------------------
def _plain_conv(mod: Any) -> bool:
    return type(mod) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and mod.padding_mode == "zeros" \
        and not isinstance(mod.padding, str)


def _zero_spatial_pads(pad: Any, rank: int) -> list[int] | None:
    """``F.pad``-order pads (``2 * rank`` ints) of a constant-0 pad module of the ``rank`` spatial
    axes only, all >= 0; None for anything else (other modes and values, N / C pads, crops)."""
    from onnx2torch.node_converters.pad import OnnxPadStatic

    from mmbridge.convert.ops.pad import Pad

    if isinstance(pad, Pad) and pad.mode == "constant" and pad.value == 0.0:
        pads = list(pad.pads)
    elif isinstance(pad, OnnxPadStatic) and pad.mode == "constant" and float(pad.constant_value) == 0.0:
        pads = [int(p) for p in pad.pads]
    else:
        return None
    while len(pads) > 2 * rank and pads[-1] == 0 and pads[-2] == 0:
        pads = pads[:-2]
    if len(pads) > 2 * rank or len(pads) % 2 or min(pads, default=0) < 0:
        return None
    return pads + [0] * (2 * rank - len(pads))


def fuse_pad_conv(gm: fx.GraphModule) -> int:
    """A zero ``Pad`` before a ``Conv`` -> :func:`mmbridge.convert.ops.conv.pad_conv` (same values,
    the padded copy neither saved for backward nor held whole in a no-grad forward on CPU).

    * onnx2torch's ``Sequential(OnnxPadStatic, ConvNd)`` (a Conv with asymmetric ``pads``: TF's
      "same" padding of a stride-2 conv) and mmbridge's ``Sequential(SamePad, ConvNd)``
      (``auto_pad=SAME_*``) -> :class:`~mmbridge.convert.ops.conv.PadConv` with the same children
      (``state_dict`` keys and module paths unchanged; it calls its children, hooks included,
      whenever they are not the plain modules it fuses, see there).

    A separate ``Pad`` node before a Conv module (Keras ``ZeroPadding2D``) is not fused: a fused
    call would bypass the conv module (its hooks, a replacement of it). Pads of N / C, negative pads
    (crops), other pad values and modes (reflect, edge, wrap) stay as they are. Returns the number
    of convolutions rewritten.
    """
    from mmbridge.convert.ops.conv import PadConv
    from mmbridge.convert.ops.pad import Pad, SamePad

    done = 0
    for node in list(gm.graph.nodes):
        mod = _module(gm, node)
        if mod is None:
            continue
        if type(mod) is nn.Sequential and len(mod) == 2 and _plain_conv(mod[1]) and not any(mod[1].padding):
            rank = mod[1].weight.dim() - 2
            first = mod[0]
            if isinstance(first, SamePad):
                if first.value != 0.0 or len(first.kernel) != rank:
                    continue
                pad = first
            else:
                pads = _zero_spatial_pads(first, rank)
                if pads is None:
                    continue
                pad = Pad(pads)
            _replace_module(gm, node.target, PadConv(pad, mod[1]))
            done += 1
    return done
