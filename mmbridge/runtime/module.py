"""Frozen onnxruntime backend: an ONNX bridge as a ``torch.nn.Module`` with IO binding.

:func:`to_ort` wraps an ``onnxruntime.InferenceSession`` in :class:`ORTModule`, whose forward
takes and returns torch tensors without copying them through numpy:

* **Provider from the device.** CPU tensors run on the CPU execution provider; CUDA tensors on
  the CUDA execution provider with ``device_id = tensor.device.index`` (the local rank under
  torchrun). CUDA asked for but the CUDA EP missing (for example ``onnxruntime`` and
  ``onnxruntime-gpu`` both installed, microsoft/onnxruntime#26996) raises with the cause and the
  fix; there is no silent CPU fallback.
* **Inputs bound in place** (``IOBinding.bind_input`` with the tensor's ``data_ptr``). The
  element type is taken from ``tensor.dtype`` and checked against the graph: a mismatch raises
  and names the input and both dtypes, because ORT reinterprets the bytes without a word
  (microsoft/onnxruntime#10299). A non-contiguous tensor is copied once with
  ``.contiguous()`` (or refused with ``strict=True``), because ORT reads the storage row-major
  and returns wrong values without an error (onnxruntime PR #10315). Shapes are checked
  against the input specs (:meth:`mmbridge.TensorSpec.check`).
* **Outputs.** When an output's shape follows from the input shapes (ONNX shape inference with
  the inputs' symbolic dims; dims are matched by name, never evaluated as expressions), or was
  seen for the same input shapes before, the output is a torch tensor allocated up front and
  ORT writes into it. Otherwise ORT allocates it and it is handed to torch through DLPack,
  zero-copy. Either way the returned tensor *is* the memory ORT wrote (no host copy). A
  pre-allocated shape that turns out wrong (data-dependent shapes) is caught from ORT's own
  check (microsoft/onnxruntime#10992), the call is re-run with ORT-allocated outputs,
  that output is never pre-allocated again, and this is logged once.
* **Repeated calls (CPU).** After a validated call, a positional call with the same input
  types, dtypes, shapes, contiguity and device (CPU, no input requiring grad, every output shape
  known) takes a fast path: a closure built once for that signature (``_Runner.make_fast``),
  called from ``ORTModule.__call__`` without ``nn.Module.__call__``'s frames when no hook,
  ``module.compile()``, jit trace or patched ``nn.Module.__call__`` (fx's tracer) applies (any
  of those: ``nn.Module.__call__`` as usual). The closure owns two slots, each its own IO
  binding of the session with one pooled output tensor per graph output bound to it, taken in
  turn off a FIFO (no lock: a thread that finds no slot free takes the full path), so that a
  ``y = module(x)`` loop, which holds the previous result while the next call runs, binds
  nothing per call. Inputs are rebound only when their data pointer changed; a pooled output is
  written again only when nothing outside the pool can see it (no Python reference, no other
  holder of its TensorImpl (autograd, DLPack), no view or storage reference) and it is as fresh
  as ``torch.empty``'s (pointer, shape and contiguity unchanged; no ``requires_grad``,
  ``.grad``, hook or attribute the caller gave it): :func:`_pool_free`. A result the caller
  still holds is therefore never overwritten, nor a changed one handed out again; otherwise a
  fresh tensor is allocated and bound to that slot. Anything else goes through the full path
  above.
* **CUDA streams.** The session is created with ``user_compute_stream`` = torch's current
  stream on that device (or a dedicated stream when that is the legacy default stream). If a
  call comes from another current stream, the session stream first waits on it (a CUDA event,
  no host sync) and the caller's stream waits on the session stream afterwards. ORT synchronises
  its stream once at the end of each run. Producers on *side* streams must be ordered by the
  caller as torch requires (``torch.cuda.current_stream().wait_stream(side)``;
  microsoft/onnxruntime#26609).
* **Frozen.** No parameters, no buffers, empty ``state_dict()``. ``train()`` / ``eval()`` only
  flip the flag (so a composed model can call ``model.train()``); ``requires_grad_(True)`` and
  ``trainable = True`` raise :class:`~mmbridge.errors.RuntimeBackendError` pointing to
  ``to_torch``. Outputs do not require grad, except when grad mode is on and an input requires
  grad: then the outputs carry an autograd node whose backward raises ``RuntimeBackendError``
  ("bridge '<name>' runs in onnxruntime and is frozen; use artifact.to_torch() to train it"),
  so a gradient that was meant to flow through the bridge fails loudly, naming the bridge,
  instead of stopping silently or with torch's generic "does not require grad" error. The
  outputs are still the memory ORT wrote (the node adds no copy).
* **Threads.** ``intra_op_threads`` defaults to ``os.cpu_count() // LOCAL_WORLD_SIZE`` (at least
  1), so several DDP ranks on one host do not oversubscribe it.
* **Autocast.** Inside a ``torch.autocast`` region a floating input whose dtype differs from the
  graph's declared floating dtype (bf16 activations into an fp32 graph) is cast to the graph's
  dtype, logged once per input. That is the only cast; outside autocast a mismatch is an error.
* **Replication.** The module pickles and deep-copies without its session (it keeps the model
  path or bytes); a session is created lazily on the first forward on each device, so DDP /
  ``torch.multiprocessing`` replicas each build their own.

Shape notation: ``B`` batch; other axes as in each input's :class:`~mmbridge.TensorSpec`
(``NHWC`` for TF images unless exported with ``inputs_as_nchw``).

Sources: onnxruntime IOBinding API (``onnxruntime.IOBinding``); Optimum's ``ORTModel`` IO
binding (huggingface/optimum-onnx); users' reports of host round trips (optimum#869, #365).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.modules.module as _nn_module
from torch import nn

from mmbridge.errors import RuntimeBackendError, SpecError
from mmbridge.runtime.session import (
    cuda_pairing_problem,
    cuda_provider_error,
    default_intra_op_threads,
    make_session,
)
from mmbridge.specs import TensorSpec

logger = logging.getLogger(__name__)

# torch dtype <-> ONNX TensorProto element type (ints are accepted by IOBinding as element_type)
_TORCH_TO_ONNX: dict[torch.dtype, int] = {
    torch.float32: 1, torch.uint8: 2, torch.int8: 3, torch.int16: 5, torch.int32: 6, torch.int64: 7,
    torch.bool: 9, torch.float16: 10, torch.float64: 11, torch.bfloat16: 16,
}
for _name, _code in (("uint16", 4), ("uint32", 12), ("uint64", 13)):
    if hasattr(torch, _name):
        _TORCH_TO_ONNX[getattr(torch, _name)] = _code
_ONNX_TO_TORCH = {v: k for k, v in _TORCH_TO_ONNX.items()}
_FLOAT_CODES = (1, 10, 11, 16)
_SHAPE_CACHE_SIZE = 64  # distinct input-shape signatures remembered per module


def _onnx_type_name(code: int) -> str:
    import onnx

    try:
        return onnx.helper.tensor_dtype_to_np_dtype(code).name if code != 16 else "bfloat16"
    except (KeyError, TypeError, ValueError):
        return onnx.TensorProto.DataType.Name(code).lower()


def _torch_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _graph_io(model: Any) -> tuple[list[tuple[str, int, list[Any]]], list[tuple[str, int, list[Any]]]]:
    """``(inputs, outputs)`` as ``(name, elem_type, dims)``; dims are int, str (dim_param) or None.

    Graph inputs that are also initializers (IR < 4 style) are not inputs here.
    """
    inits = {i.name for i in model.graph.initializer}

    def info(vi: Any) -> tuple[str, int, list[Any]]:
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise RuntimeBackendError(
                f"graph value {vi.name!r} is not a tensor (sequence / map / optional); ORTModule binds "
                f"tensors only. Keep that part of the graph outside the bridge."
            )
        dims: list[Any] = []
        if tt.HasField("shape"):
            for d in tt.shape.dim:
                dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
        else:
            dims = None  # type: ignore[assignment]  # unknown rank
        return vi.name, tt.elem_type, dims

    ins = [info(v) for v in model.graph.input if v.name not in inits]
    outs = [info(v) for v in model.graph.output]
    return ins, outs


def _static_output_plan(model: Any, specs: Sequence[TensorSpec]) -> list[list[Any] | None]:
    """For each output: a list of dims, each an ``int`` or an ``(input index, axis)`` reference;
    ``None`` when some dim does not follow from the input shapes by name.

    Runs ONNX shape inference (``data_prop=True``) on a copy whose dynamic input dims carry the
    specs' symbolic names (or unique names) and whose output / value_info shapes are cleared, so
    that names tf2onnx invents independently for inputs and outputs (``unk__24`` vs ``unk__25``)
    do not hide that an output's batch dim *is* the input's batch dim. Symbolic dims are only
    ever compared as names, never evaluated.
    """
    import onnx
    from onnx import shape_inference

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name for i in m.graph.initializer}
    refs: dict[str, tuple[int, int]] = {}
    spec_by_name = {s.name: s for s in specs}
    idx = 0
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        spec = spec_by_name.get(vi.name)
        tt = vi.type.tensor_type
        for axis, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                continue
            want = spec.shape[axis] if spec is not None and axis < spec.rank else None
            name = want if isinstance(want, str) else f"__mmbridge_in{idx}_ax{axis}"
            d.dim_param = name
            refs.setdefault(name, (idx, axis))
        idx += 1
    for vi in m.graph.output:
        vi.type.tensor_type.ClearField("shape")
    del m.graph.value_info[:]
    try:
        inferred = shape_inference.infer_shapes(m, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - inference is an optimisation; ORT still checks shapes
        logger.debug("ONNX shape inference failed (%s); outputs will be allocated by onnxruntime", exc)
        return [None] * len(m.graph.output)
    plan: list[list[Any] | None] = []
    for vi in inferred.graph.output:
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            plan.append(None)
            continue
        dims: list[Any] | None = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.dim_param in refs:
                dims.append(refs[d.dim_param])
            else:
                dims = None
                break
        plan.append(dims)
    return plan


_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)
_getrefcount = sys.getrefcount
_getweakrefcount = weakref.getweakrefcount
_CPU = torch.device("cpu")
_FAST_SLOTS = 2  # IO bindings (each with its pooled outputs) per fast-path signature, taken in turn


def _pool_entry(o: torch.Tensor) -> tuple[torch.Tensor, Any, int, int]:
    """A pooled output: ``(tensor, its storage object, StorageImpl address, data pointer)``.

    The pool holds the storage object itself, so the StorageImpl stays alive and its use count
    can be read from the cached address without building a storage object per call. A tensor
    whose storage was swapped (``set_``) or reallocated (``resize_``) shows another data pointer
    (and its old storage one holder fewer), so it is never reused."""
    st = o.untyped_storage()
    return o, st, st._cdata, o.data_ptr()


def _pool_counts(entry: tuple[torch.Tensor, Any, int, int]) -> tuple[int, int, int, int]:
    """``(sys.getrefcount(tensor), TensorImpl use count, StorageImpl use count,
    sys.getrefcount(storage object))`` of a pooled output, read with exactly the statements of
    :func:`_pool_free` (the same locals hold the same objects), so that the counts of a tensor
    held only by its pool entry are calibrated once (:data:`_POOL_BASE`)."""
    c, st, cdata, _ptr = entry
    return _getrefcount(c), c._use_count(), _storage_use_count(cdata), _getrefcount(st)


def _pool_free(entry: tuple[torch.Tensor, Any, int, int], shape: tuple[int, ...]) -> bool:
    """Whether the pooled output ``entry`` (:func:`_pool_entry`) may be written by onnxruntime
    and handed out again: the one pool-reuse condition of the fast path.

    True only when nothing outside the pool can see it and it is as a fresh ``torch.empty`` of
    ``shape`` would be: no Python reference to the tensor (``sys.getrefcount``), no other holder
    of its TensorImpl (autograd, DLPack, C++: ``Tensor._use_count``), no view or other tensor on
    its storage and no Python reference to its storage object (torch hands back the pool's own
    ``untyped_storage()`` object, so a caller keeping only ``y.untyped_storage()`` adds a
    reference, not a use count); its data pointer, shape and contiguity unchanged (a caller's
    ``t_()`` / ``resize_`` / ``set_`` / ``.data =`` before dropping it retires it); none
    of the state a caller can give the tensor object: ``requires_grad``, a ``.grad``, a backward
    hook, an attribute (such a tensor was handed out again by the next call, requiring grad or
    with the old ``.grad``); and no weak reference (a ``weakref`` / ``WeakIdKeyDictionary`` key
    to a dropped result would come back to life holding the next call's values). The fast paths
    do not run under ``torch.inference_mode()``, so no pooled output is an inference tensor. The counts are compared with :data:`_POOL_BASE`
    (:func:`_pool_counts` on a fresh entry, at import).
    """
    c, st, cdata, ptr = entry
    return (_getrefcount(c) == _B_REF and c._use_count() == _B_USE and _storage_use_count(cdata) == _B_STORAGE
            and _getrefcount(st) == _B_STREF and c.data_ptr() == ptr and c.shape == shape and c.is_contiguous()
            and not c.requires_grad and c.grad is None and c._backward_hooks is None and not c.__dict__
            and not _getweakrefcount(c))


try:  # private torch APIs (Tensor._use_count, torch._C._storage_Use_Count): without them, no reuse
    _POOL_BASE: tuple[int, int, int, int] | None = _pool_counts(_pool_entry(torch.empty(1)))
except Exception:  # noqa: BLE001 - pragma: no cover - other torch builds
    _POOL_BASE = None
_B_REF, _B_USE, _B_STORAGE, _B_STREF = _POOL_BASE or (-1, -1, -1, -1)  # -1: never equal, never reused


# what nn.Module._call_impl checks before calling forward directly (torch.nn.modules.module)
_G_FWD, _G_FWD_PRE = _nn_module._global_forward_hooks, _nn_module._global_forward_pre_hooks
_G_BWD, _G_BWD_PRE = _nn_module._global_backward_hooks, _nn_module._global_backward_pre_hooks
_Module = nn.Module
_MODULE_CALL = nn.Module.__call__  # fx's tracer patches nn.Module.__call__ while it traces


class _Runner:
    """One session + IO binding on one device (not pickled; see ``ORTModule.__getstate__``)."""

    def __init__(self, owner: ORTModule, device: torch.device):
        import onnxruntime as ort

        self.device = device
        self.is_cuda = device.type == "cuda"
        self.device_id = (device.index or 0) if self.is_cuda else 0
        self.stream: Any = None
        threads = owner.intra_op_threads if owner.intra_op_threads is not None else default_intra_op_threads()
        if owner.intra_op_threads is None and not owner._logged_threads:
            owner._logged_threads = True
            logger.info(
                "ORTModule %r: intra_op_threads=%d (os.cpu_count()=%s // LOCAL_WORLD_SIZE=%s); pass "
                "intra_op_threads= to override", owner.name, threads, os.cpu_count(),
                os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.intra_op_threads = threads
        opts = dict(owner.session_options)
        provider_options = dict(opts.pop("provider_options", None) or {})
        if self.is_cuda:
            err = cuda_provider_error(f"input on {device}")
            if err:
                raise RuntimeBackendError(err)
            current = torch.cuda.current_stream(device)
            # the legacy default stream (handle 0) cannot be named to ORT; use a dedicated stream
            self.stream = current if current.cuda_stream != 0 else torch.cuda.Stream(device)
            cuda_opts = {"device_id": str(self.device_id), "has_user_compute_stream": "1",
                         "user_compute_stream": str(self.stream.cuda_stream),
                         **{k: str(v) for k, v in provider_options.items()}}
            providers: list[Any] = [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = make_session(owner._source, providers=providers, intra_op_threads=threads,
                                        extensions=owner._uses_extensions, **opts)
        except Exception as exc:  # noqa: BLE001 - re-raised with context
            raise RuntimeBackendError(
                f"onnxruntime could not create a session for bridge {owner.name!r} on {device}: {exc}"
            ) from exc
        if self.is_cuda and self.session.get_providers()[0] != "CUDAExecutionProvider":
            pairing = cuda_pairing_problem()
            cause = (f"Cause: {pairing}." if pairing else "Run `mmbridge info` and check the CUDA / cuDNN "
                     "libraries that onnxruntime-gpu needs.")
            raise RuntimeBackendError(
                f"onnxruntime created the session for bridge {owner.name!r} with providers "
                f"{self.session.get_providers()} instead of CUDAExecutionProvider (device {device}); the CUDA "
                f"provider failed to load. {cause} mmbridge never falls back to CPU silently."
            )
        self.binding = self.session.io_binding()
        self.lock = threading.Lock()
        self.in_spec = list(zip(owner._in_names, owner._in_codes))
        # per input, the (data_ptr, shape) bound last: an unchanged input is not bound again
        self.bound: list[Any] = [None] * len(self.in_spec)
        self.out_spec = list(zip(owner.output_names, owner._out_codes, owner._out_dtypes))
        # Fast path: the pybind objects behind the public wrappers (same calls, fewer Python frames).
        cb, cs = getattr(self.binding, "_iobinding", None), getattr(self.session, "_sess", None)
        if cb is not None and cs is not None and hasattr(cb, "bind_input"):
            self._bind_in = cb.bind_input
            self._bind_out = cb.bind_output
            self._cdev = ort.OrtDevice.make(device.type, self.device_id)._get_c_device()
            ro = ort.RunOptions()  # the pybind RunOptions itself
            self._run = lambda: cs.run_with_iobinding(cb, ro)
            self._c_run: Any = (cs.run_with_iobinding, cb, ro)  # the same call without the lambda frame
            self._get_outputs = cb.get_outputs
        else:  # pragma: no cover - other onnxruntime builds
            self._cdev = None
            self._c_run = None
            dt = device.type

            def bind_in(name, _dev, et, shape, ptr):
                self.binding.bind_input(name, dt, self.device_id, et, shape, ptr)

            def bind_out(name, _dev, *rest):
                self.binding.bind_output(name, dt, self.device_id, *rest)

            self._bind_in, self._bind_out = bind_in, bind_out
            self._run = lambda: self.session.run_with_iobinding(self.binding)
            self._get_outputs = lambda: [v._get_c_value() for v in self.binding.get_outputs()]

    def run(self, tensors: Sequence[torch.Tensor], out_shapes: Sequence[Any]) -> list[torch.Tensor]:
        """Bind ``tensors`` (contiguous, graph dtypes, on this device) and run.

        Args:
            tensors: one per input, in ``owner.input_specs`` order.
            out_shapes: per output, the shape to pre-allocate, or ``None`` to let ORT allocate.

        Returns:
            The outputs as torch tensors: the pre-allocated ones, or ORT's values via DLPack.
        """
        cdev, bind_in, bind_out = self._cdev, self._bind_in, self._bind_out
        dev = None if not self.is_cuda else self.device
        with self.lock:
            bound = self.bound
            for i, ((name, code), t) in enumerate(zip(self.in_spec, tensors)):
                now = (t.data_ptr(), t.shape)
                if bound[i] != now:  # the binding keeps the last (pointer, shape): rebind only a change
                    bind_in(name, cdev, code, now[1], now[0])
                    bound[i] = now
            outs: list[Any] = []
            dynamic = False
            for (name, code, dtype), shape in zip(self.out_spec, out_shapes):
                o = None if shape is None else torch.empty(shape, dtype=dtype, device=dev)
                if o is None or o.data_ptr() == 0:  # unknown shape, or empty (ORT refuses a null buffer)
                    bind_out(name, cdev)  # fresh ORT allocation every call (no aliasing of old results)
                    outs.append(None)
                    dynamic = True
                else:
                    bind_out(name, cdev, code, shape, o.data_ptr())
                    outs.append(o)
            if self.is_cuda:
                current = torch.cuda.current_stream(self.device)
                other = current.cuda_stream != self.stream.cuda_stream
                if other:
                    self.stream.wait_stream(current)
                self._run()
                if other:
                    current.wait_stream(self.stream)
            else:
                self._run()
            if dynamic:
                values = self._get_outputs()
                for j, o in enumerate(outs):
                    if o is None:
                        outs[j] = torch.from_dlpack(values[j].to_dlpack())
        return outs


    def make_fast(self, key: tuple, out_shapes: Sequence[tuple], in_dtypes: Sequence[torch.dtype]) -> Any:
        """A closure ``fast(args)`` for repeated CPU calls with input shapes ``key`` and known
        output shapes: the result of the call (a tensor, or a tuple), or ``None`` when ``args``
        do not qualify (the caller then takes the full path); ``None`` instead of a closure
        where this onnxruntime build has no pybind ``SessionIOBinding``.

        Everything that does not depend on the call is bound here, once. The closure owns
        :data:`_FAST_SLOTS` slots, each its own ``IOBinding`` of this session with one pooled
        tensor per output bound as its output, taken in turn (a FIFO): the caller's
        ``y = module(x)`` loop holds the previous result while the next call runs, and the
        other slot's binding already points at a free buffer, so no output is bound again
        (with one binding the two pooled buffers were bound in turn, one ``bind_output`` per
        call). Per call: one check per input (exact ``torch.Tensor`` type, the graph's dtype,
        CPU, no grad, the cached shape, contiguous: each of the full path's conditions),
        ``bind_input`` on the slot's binding only when the tensor's pointer changed, per output
        the slot's tensor when :func:`_pool_free` says nothing outside the pool can see it
        (otherwise a fresh ``torch.empty``, bound once, so a result the caller still holds is
        never overwritten), and the pybind ``run_with_iobinding`` call. A slot is taken off the
        FIFO for the call (``deque.popleft`` / ``append``, atomic under the GIL), so no lock is
        needed: a thread that finds no slot free takes the full path (under :attr:`lock`, on
        the runner's own binding), and onnxruntime runs one session's bindings concurrently.
        """
        if self._c_run is None:  # pragma: no cover - other onnxruntime builds: the full path only
            return None
        c_run, _c_binding, c_options = self._c_run
        shapes_in = tuple(tuple(k) for k in key)
        checks = tuple(zip(in_dtypes, key))
        ins = tuple((name, code, shape) for (name, code), shape in zip(self.in_spec, shapes_in))
        outs_spec = tuple((name, code, dtype, tuple(shape)) for (name, code, dtype), shape in zip(self.out_spec, out_shapes))
        n_in = len(ins)
        wrappers = [self.session.io_binding() for _ in range(_FAST_SLOTS)]  # kept alive by the closure
        # a slot: [pybind binding, input pointers bound last, pool entries bound as outputs]
        slots: deque[list[Any]] = deque([w._iobinding, [None] * n_in, [None] * len(outs_spec)] for w in wrappers)
        popleft, append = slots.popleft, slots.append
        cdev, free, empty, pool_entry, tensor_type = self._cdev, _pool_free, torch.empty, _pool_entry, torch.Tensor
        inference_mode = torch.is_inference_mode_enabled

        if n_in == 1 and len(outs_spec) == 1:  # the common case, without loops
            (dt0, shape0), = checks
            (in_name, in_code, in_shape), = ins
            (oname, ocode, odtype, oshape), = outs_spec

            def fast1(args: tuple) -> Any:
                if inference_mode():  # pooled outputs would be inference tensors, handed out again later
                    return None
                try:
                    (t,) = args
                except ValueError:
                    return None
                if (type(t) is not tensor_type or t.dtype is not dt0 or not t.is_cpu or t.requires_grad
                        or t.shape != shape0 or not t.is_contiguous()):
                    return None
                try:
                    slot = popleft()
                except IndexError:  # every slot is in a call on another thread
                    return None
                try:
                    cb, iptr, es = slot
                    ptr = t.data_ptr()
                    if iptr[0] != ptr:
                        cb.bind_input(in_name, cdev, in_code, in_shape, ptr)
                        iptr[0] = ptr
                    e = es[0]
                    if e is None or not free(e, oshape):
                        e = pool_entry(empty(oshape, dtype=odtype, device=_CPU))  # not torch's default device
                        cb.bind_output(oname, cdev, ocode, oshape, e[3])
                        es[0] = e  # only once bound: a failed bind leaves the slot's old, bound entry
                    c_run(cb, c_options)
                    # held before the slot goes back: once it is on the queue another thread may take
                    # it, and an output referenced only by the pool would look free to that call
                    out = e[0]
                finally:
                    append(slot)
                return out

            fast1.slots, fast1.bindings = slots, wrappers  # type: ignore[attr-defined]  # tests read slots
            return fast1

        single = len(outs_spec) == 1

        def fast(args: tuple) -> Any:
            if len(args) != n_in or inference_mode():
                return None
            for t, (dt, shape) in zip(args, checks):
                if (type(t) is not tensor_type or t.dtype is not dt or not t.is_cpu or t.requires_grad
                        or t.shape != shape or not t.is_contiguous()):
                    return None
            try:
                slot = popleft()
            except IndexError:  # every slot is in a call on another thread
                return None
            try:
                cb, iptrs, es = slot
                for i, t in enumerate(args):
                    ptr = t.data_ptr()
                    if iptrs[i] != ptr:  # the slot's binding keeps the last pointer: rebind a change only
                        name, code, shape = ins[i]
                        cb.bind_input(name, cdev, code, shape, ptr)
                        iptrs[i] = ptr
                outs = []
                for j, (name, code, dtype, shape) in enumerate(outs_spec):
                    e = es[j]
                    if e is None or not free(e, shape):
                        e = pool_entry(empty(shape, dtype=dtype, device=_CPU))
                        cb.bind_output(name, cdev, code, shape, e[3])
                        es[j] = e  # only once bound
                    outs.append(e[0])
                c_run(cb, c_options)
            finally:
                append(slot)
            return outs[0] if single else tuple(outs)

        fast.slots, fast.bindings = slots, wrappers  # type: ignore[attr-defined]  # tests read slots
        return fast


class ORTModule(nn.Module):
    """A frozen ONNX bridge running in onnxruntime, as a ``torch.nn.Module``.

    Build it with :func:`to_ort` (or ``artifact.to_ort()``); see :mod:`mmbridge.runtime.module`
    for the binding, stream and threading rules.

    Forward:
        ``module(*tensors)`` with one torch tensor per input, in the order of
        :attr:`input_specs`, or ``module(**{name: tensor})`` by input name (or a mix: positional
        first). Each tensor must have the graph's dtype (e.g. uint8 ``[B, H, W, 3]`` NHWC
        0-255 pixels for a TF preprocessing graph), the spec's shape, and all must be on one
        device (that of the module after ``.to(device)``; any device when it was built with
        ``device=None`` and never moved).

    Returns:
        One output: a ``torch.Tensor``. Several outputs: a ``tuple`` of tensors in the order of
        :attr:`output_names` (the ONNX graph's output order), like onnx2torch modules. Tensors
        are on the inputs' device, have the graph's output dtypes, and never require grad.

    Raises:
        SpecError: a missing / unexpected input, a non-tensor, a wrong dtype (names the input and
            both dtypes), a wrong shape (names the input and axis), or a non-contiguous input
            with ``strict=True``.
        RuntimeBackendError: inputs on different devices or not on the module's device, CUDA
            asked for without the CUDA EP, onnxruntime failing to run, or a request to train.

    Attributes:
        name: bridge name (for messages).
        input_specs: one :class:`~mmbridge.TensorSpec` per graph input, in call order.
        output_names: graph output names, in return order.
        strict: refuse non-contiguous inputs instead of copying them.
        intra_op_threads: the override, or ``None`` for the per-rank default.
        device: the device the module is bound to, or ``None`` (follow the inputs).
        trainable: always ``False``.

    Frozen by construction: no parameters, no buffers, empty ``state_dict()``. ``train()`` /
    ``eval()`` are allowed (a composed model calls ``model.train()``) and change nothing;
    ``requires_grad_(True)`` and ``module.trainable = True`` raise :class:`RuntimeBackendError`
    saying to use ``to_torch``. Inputs that require grad are accepted (logged once at WARNING);
    with grad mode on, ``backward()`` through the outputs then raises :class:`RuntimeBackendError`
    naming the bridge and ``to_torch`` (see :func:`frozen_message`).
    """

    mmbridge_frozen = True  # declared inference-only: mmbridge.compose refuses it as a trainable branch

    def __init__(self, model: Any, *, source: str | bytes, input_specs: Sequence[TensorSpec] | None = None,
                 name: str | None = None, device: torch.device | None = None, strict: bool = False,
                 intra_op_threads: int | None = None, session_options: Mapping[str, Any] | None = None):
        """Use :func:`to_ort`; this constructor takes an already loaded ``onnx.ModelProto``.

        Args:
            model: the ``onnx.ModelProto`` (read for input / output types and shapes only).
            source: what sessions are created from: a ``.onnx`` path or serialised model bytes.
            input_specs: the inputs (default: read from the graph).
            name, device, strict, intra_op_threads, session_options: see :func:`to_ort`.
        """
        super().__init__()
        from mmbridge.runtime.session import uses_extensions

        ins, outs = _graph_io(model)
        self.name = name or model.graph.name or "bridge"
        if input_specs is None:
            input_specs = [TensorSpec(n, tuple(dims) if dims is not None else (), _dtype_name(code, n, self.name))
                           for n, code, dims in ins]
        specs = tuple(input_specs)
        graph_names = [n for n, _, _ in ins]
        if sorted(s.name for s in specs) != sorted(graph_names):
            raise SpecError(
                f"bridge {self.name!r}: input specs {[s.name for s in specs]} do not match the ONNX graph "
                f"inputs {graph_names}; pass input_specs with exactly the graph's input names"
            )
        by_name = {n: (code, dims) for n, code, dims in ins}
        for n, code, _ in outs:
            _dtype_name(code, n, self.name, output=True)
        self.input_specs = specs
        self.output_names = [n for n, _, _ in outs]
        self._in_names = [s.name for s in specs]
        self._in_codes = [by_name[s.name][0] for s in specs]
        for s, code in zip(specs, self._in_codes):
            if code not in _ONNX_TO_TORCH:
                raise SpecError(
                    f"bridge {self.name!r}: input {s.name!r} has ONNX type {_onnx_type_name(code)}, which torch "
                    f"tensors cannot carry; keep that input (e.g. strings: tokenise outside the graph) out of "
                    f"the ORT branch"
                )
        self._in_dtypes = [_ONNX_TO_TORCH[c] for c in self._in_codes]
        # inputs whose rank the graph does not declare are not shape-checked here (ORT still is)
        self._in_ranked = [by_name[s.name][1] is not None for s in specs]
        self._out_codes = [code for _, code, _ in outs]
        self._out_dtypes = [_ONNX_TO_TORCH[c] for c in self._out_codes]
        self._out_plan = _static_output_plan(model, specs)
        self._source = source
        self._uses_extensions = uses_extensions(model)
        self.strict = bool(strict)
        self.intra_op_threads = None if intra_op_threads is None else max(1, int(intra_op_threads))
        self.session_options = dict(session_options or {})
        self._device = device
        self._init_runtime_state()

    # -- runtime state (not pickled) --------------------------------------------------------
    def _init_runtime_state(self) -> None:
        self._runners: dict[torch.device, _Runner] = {}
        self._fast: Any = None  # the forward fast path (_Runner.make_fast), or None
        self._fast_key: tuple | None = None  # (runner, input shapes, output shapes) it was made for
        self._runner_lock = threading.Lock()
        self._shape_cache: dict[tuple, list[Any]] = {}
        self._data_dependent: set[int] = set()
        self._logged: set[str] = set()
        self._logged_threads = False

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for key in ("_runners", "_fast", "_fast_key", "_runner_lock", "_shape_cache", "_logged", "_logged_threads"):
            state.pop(key, None)
        state["_data_dependent"] = set(self._data_dependent)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        dd = state.pop("_data_dependent", set())
        super().__setstate__(state)
        self._init_runtime_state()
        self._data_dependent = set(dd)

    # -- device -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device | None:
        """The device this module is bound to (``None``: follow the inputs' device)."""
        return self._device

    def _apply(self, fn: Any, recurse: bool = True) -> ORTModule:  # noqa: ARG002 - nn.Module signature
        """Follow ``.to(device)`` / ``.cuda()`` / ``.cpu()`` (also when called on a parent module).

        There are no tensors to move; a probe tensor tells where ``fn`` sends tensors. A new
        device drops the sessions on other devices; the new session is created on the next
        forward (with the CUDA EP and that ``device_id`` for a CUDA device). Dtype conversions
        (``.half()``, ``.to(torch.bfloat16)``) do not change the ONNX graph and are ignored.

        Raises:
            RuntimeBackendError: a CUDA device while onnxruntime has no CUDA EP.
        """
        origin = self._device or torch.device("cpu")
        probe = fn(torch.empty(0, device=origin))
        if isinstance(probe, torch.Tensor) and probe.device != origin:
            self._set_device(probe.device)
        return self

    def _set_device(self, device: torch.device) -> None:
        if device.type == "cuda":
            err = cuda_provider_error(f"ORTModule {self.name!r} moved to {device}")
            if err:
                raise RuntimeBackendError(err)
        elif device.type != "cpu":
            raise RuntimeBackendError(
                f"ORTModule {self.name!r}: device {device} is not supported; onnxruntime runs here on 'cpu' or "
                f"'cuda'. Use to_torch(...) for other devices."
            )
        self._device = device
        self._fast = self._fast_key = None
        self._runners = {d: r for d, r in self._runners.items() if _same_device(d, device)}

    def _runner_for(self, device: torch.device) -> _Runner:
        runner = self._runners.get(device)
        if runner is None:
            if device.type not in ("cpu", "cuda"):
                raise RuntimeBackendError(
                    f"ORTModule {self.name!r}: inputs on {device} are not supported; onnxruntime runs here on "
                    f"'cpu' or 'cuda'"
                )
            with self._runner_lock:
                runner = self._runners.get(device)
                if runner is None:
                    runner = _Runner(self, device)
                    self._runners[device] = runner
        return runner

    # -- frozen ----------------------------------------------------------------------------
    @property
    def trainable(self) -> bool:
        """Always ``False``: an onnxruntime branch has no gradients. Setting ``True`` raises."""
        return False

    @trainable.setter
    def trainable(self, value: bool) -> None:
        if value:
            raise RuntimeBackendError(self._train_msg("trainable=True"))

    def requires_grad_(self, requires_grad: bool = True) -> ORTModule:
        """No-op for ``False``; ``True`` raises :class:`RuntimeBackendError` (use ``to_torch``)."""
        if requires_grad:
            raise RuntimeBackendError(self._train_msg("requires_grad_(True)"))
        return self

    def _train_msg(self, what: str) -> str:
        return (
            f"ORTModule {self.name!r} cannot be trained ({what}): onnxruntime runs the graph without "
            f"gradients. To fine-tune this bridge use the torch backend: artifact.to_torch() / "
            f"mmbridge.to_torch(...) (export with trainable=True to keep BatchNorm / Dropout). "
            f"model.train() / .eval() are allowed and do not change what this module computes."
        )

    # -- forward ---------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``nn.Module.__call__``, without its two Python frames on the CPU fast path.

        When the module has no hooks (its own or torch's global ones), is not ``module.compile()``d,
        its ``forward`` is :meth:`ORTModule.forward` (not a subclass's, not one set on the instance)
        and ``nn.Module.__call__`` is not patched (fx's tracer does), the case in which
        ``nn.Module._call_impl`` calls ``forward`` directly, the fast path of :meth:`forward` runs
        here; any other call, and any call the fast path does not take, goes through
        ``nn.Module.__call__`` unchanged.
        """
        # nn.Module defines __getattr__, so every self.<attr> takes CPython's slow attribute path;
        # one read of __dict__ and dict subscripts are cheaper (the same attributes nn.Module reads)
        # (nn.Module._call_impl's conditions for calling forward directly; a jit trace is not
        # checked: under one, nn.Module.__call__ would run this same fast path inside forward and
        # add only a trace scope name, and an onnxruntime call cannot be traced either way)
        d = self.__dict__
        fast = d["_fast"]
        # only when forward is this class's own: a subclass's forward or one set on the instance
        # (accelerate's convert_outputs_to_fp32 wraps it so) must run; module.compile() sets
        # _compiled_call_impl on the instance (nn.Module's class attribute is None): any instance
        # value takes nn.Module.__call__
        if (fast is not None and not kwargs and "forward" not in d and "_compiled_call_impl" not in d
                and type(self).forward is _ORT_FORWARD and not (
                d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"] or d["_backward_pre_hooks"]
                or _G_FWD or _G_FWD_PRE or _G_BWD or _G_BWD_PRE)
                and _Module.__call__ is _MODULE_CALL):
            try:
                out = fast(args)
            except Exception:  # noqa: BLE001 - the full path retries / reports it
                self._fast = self._fast_key = None
            else:
                if out is not None:
                    return out
        return nn.Module.__call__(self, *args, **kwargs)  # looked up now: fx's tracer patches it

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Run the graph; see the class docstring for arguments, returns and errors."""
        fast = self._fast
        if fast is not None and not kwargs:
            # Fast path (CPU): the same positional signature as the last validated call. Every
            # check of the full path still holds: same dtypes and shapes (so the spec check and
            # the output shapes are the cached ones), contiguous, CPU, no input requiring grad.
            try:
                out = fast(args)
            except Exception:  # noqa: BLE001 - the full path retries / reports it
                self._fast = self._fast_key = None
            else:
                if out is not None:
                    return out
        tensors = list(args) if not kwargs and len(args) == len(self._in_names) else self._gather(args, kwargs)
        in_dtypes = self._in_dtypes
        device = None
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                self._not_a_tensor(i, t)
            if device is None:
                device = t.device
            elif t.device != device:
                self._mixed_devices(i, t, device)
            if t.dtype is not in_dtypes[i]:
                t = tensors[i] = self._dtype_mismatch(i, t)
            if not t.is_contiguous():
                t = tensors[i] = self._make_contiguous(i, t)
            if t.requires_grad and "grad" not in self._logged:
                self._logged.add("grad")
                logger.warning(
                    "ORTModule %r: input %r requires grad, but no gradient flows back through an onnxruntime "
                    "branch (backward() through it raises); use to_torch(...) if the layers before it must learn "
                    "through it, or pass the input detached", self.name, self._in_names[i])
        if device is None:
            device = self._device or torch.device("cpu")
        want = self._device
        if want is not None and not _same_device(device, want):
            raise RuntimeBackendError(
                f"ORTModule {self.name!r} is on {want} but its inputs are on {device}; move the inputs "
                f"(tensor.to({str(want)!r})) or the module (module.to({str(device)!r}))"
            )
        runner = self._runners.get(device) or self._runner_for(device)
        key = tuple(t.shape for t in tensors)
        out_shapes = self._shape_cache.get(key)
        if out_shapes is None:
            out_shapes = self._resolve_shapes(key, tensors)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            outs = _FrozenBridge.apply(self.name, lambda: self._run(runner, tensors, key, out_shapes), *tensors)
            return outs[0] if len(outs) == 1 else tuple(outs)
        outs = self._run(runner, tensors, key, out_shapes)
        if not runner.is_cuda and not kwargs and len(args) == len(tensors) and all(
                a is t for a, t in zip(args, tensors)):
            shapes = self._shape_cache.get(key)
            if shapes is not None and all(sh is not None and all(d > 0 for d in sh) for sh in shapes):
                fast_key = (runner, key, tuple(shapes))
                if self._fast_key != fast_key:
                    self._fast = runner.make_fast(key, shapes, self._in_dtypes)
                    self._fast_key = fast_key
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _run(self, runner: _Runner, tensors: list[torch.Tensor], key: tuple, out_shapes: list[Any]) -> list[torch.Tensor]:
        """One ORT call (with the ORT-allocated retry) on validated inputs; learns output shapes."""
        try:
            outs = runner.run(tensors, out_shapes)
        except Exception as exc:  # noqa: BLE001 - retried / re-raised below
            outs = self._retry_dynamic(runner, tensors, key, out_shapes, exc)
        else:
            if any(s is None for s in out_shapes) and len(self._shape_cache) < _SHAPE_CACHE_SIZE:
                # learn this signature's output shapes (data-dependent ones stay ORT-allocated)
                self._shape_cache[key] = [None if j in self._data_dependent else tuple(o.shape)
                                          for j, o in enumerate(outs)]
        return outs

    def _gather(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
        names = self._in_names
        if len(args) > len(names):
            raise SpecError(
                f"ORTModule {self.name!r} takes {len(names)} inputs {names} but got {len(args)} positional arguments"
            )
        got = dict(zip(names, args))
        for k, v in kwargs.items():
            if k not in names:
                raise SpecError(f"ORTModule {self.name!r}: unexpected input {k!r}; the inputs are {names}")
            if k in got:
                raise SpecError(f"ORTModule {self.name!r}: input {k!r} given both positionally and by name")
            got[k] = v
        missing = [n for n in names if n not in got]
        if missing:
            raise SpecError(f"ORTModule {self.name!r}: missing inputs {missing}; the inputs are {names} (in order)")
        return [got[n] for n in names]

    def _not_a_tensor(self, i: int, t: Any) -> None:
        raise SpecError(
            f"ORTModule {self.name!r}: input {self._in_names[i]!r} is a {type(t).__name__}, not a torch.Tensor; "
            f"convert it (torch.from_numpy(array)) first"
        )

    def _mixed_devices(self, i: int, t: torch.Tensor, device: torch.device) -> None:
        raise RuntimeBackendError(
            f"ORTModule {self.name!r}: input {self._in_names[i]!r} is on {t.device} but input "
            f"{self._in_names[0]!r} is on {device}; put all inputs on one device"
        )

    def _dtype_mismatch(self, i: int, t: torch.Tensor) -> torch.Tensor:
        name, want = self._in_names[i], self._in_dtypes[i]
        if (t.is_floating_point() and want.is_floating_point
                and torch.is_autocast_enabled(t.device.type)):
            key = f"autocast:{name}:{t.dtype}"
            if key not in self._logged:
                self._logged.add(key)
                logger.info(
                    "ORTModule %r: input %r is %s inside torch.autocast but the graph declares %s; casting it "
                    "to %s (the only cast ORTModule makes; logged once)", self.name, name,
                    _torch_name(t.dtype), _torch_name(want), _torch_name(want))
            return t.to(want)
        raise SpecError(
            f"ORTModule {self.name!r}: input {name!r} has dtype {_torch_name(t.dtype)} but the graph expects "
            f"{_torch_name(want)}; convert it explicitly (tensor.to(torch.{_torch_name(want)})). mmbridge never "
            f"casts silently (binding {_torch_name(t.dtype)} memory as {_torch_name(want)} would make onnxruntime "
            f"read garbage: microsoft/onnxruntime#10299)"
        )

    def _make_contiguous(self, i: int, t: torch.Tensor) -> torch.Tensor:
        name = self._in_names[i]
        if self.strict:
            raise SpecError(
                f"ORTModule {self.name!r}: input {name!r} (shape {tuple(t.shape)}, strides {t.stride()}) is not "
                f"contiguous and strict=True; pass tensor.contiguous() (onnxruntime reads the storage row-major, "
                f"so a strided view would give wrong values), or build the module with strict=False to copy it"
            )
        key = f"contig:{name}"
        if key not in self._logged:
            self._logged.add(key)
            logger.info("ORTModule %r: input %r is not contiguous (strides %s); copying it once per call "
                        "(logged once; strict=True makes this an error)", self.name, name, t.stride())
        return t.contiguous()

    def _resolve_shapes(self, key: tuple, tensors: Sequence[torch.Tensor]) -> list[Any]:
        bindings: dict[str, int] = {}
        for spec, ranked, t in zip(self.input_specs, self._in_ranked, tensors):
            if ranked:
                spec.check(_ShapeOnly(t.shape, getattr(torch, spec.dtype, t.dtype)), bindings)
        shapes: list[Any] = []
        for j, plan in enumerate(self._out_plan):
            if plan is None or j in self._data_dependent:
                shapes.append(None)
            else:
                shapes.append(tuple(d if isinstance(d, int) else int(key[d[0]][d[1]]) for d in plan))
        if len(self._shape_cache) < _SHAPE_CACHE_SIZE:
            self._shape_cache[key] = shapes
        return shapes

    def _retry_dynamic(self, runner: _Runner, tensors: list[torch.Tensor], key: tuple, out_shapes: list[Any],
                       exc: Exception) -> list[torch.Tensor]:
        """A run failed: if outputs were pre-allocated, re-run with ORT-allocated outputs once."""
        shapes_desc = {n: (tuple(t.shape), _torch_name(t.dtype)) for n, t in zip(self._in_names, tensors)}
        if all(s is None for s in out_shapes):
            raise RuntimeBackendError(
                f"onnxruntime failed running bridge {self.name!r} on {runner.device} with inputs {shapes_desc}: {exc}"
            ) from exc
        try:
            outs = runner.run(tensors, [None] * len(out_shapes))
        except Exception:  # noqa: BLE001 - the first error is the informative one
            raise RuntimeBackendError(
                f"onnxruntime failed running bridge {self.name!r} on {runner.device} with inputs {shapes_desc}: {exc}"
            ) from exc
        wrong = [j for j, (s, o) in enumerate(zip(out_shapes, outs)) if s is not None and tuple(o.shape) != s]
        for j in wrong:
            self._data_dependent.add(j)
            logger.warning(
                "ORTModule %r: output %r has shape %s, not the %s expected from the input shapes (a data-dependent "
                "shape); it is allocated by onnxruntime from now on (onnxruntime reported: %s)", self.name,
                self.output_names[j], list(outs[j].shape), list(out_shapes[j]), str(exc).splitlines()[0][:200])
        if not wrong and "retry" not in self._logged:
            self._logged.add("retry")
            logger.warning("ORTModule %r: a run with pre-allocated outputs failed (%s) and succeeded with "
                           "onnxruntime-allocated outputs", self.name, str(exc).splitlines()[0][:200])
        self._shape_cache.clear()
        self._fast = self._fast_key = None
        return outs

    def extra_repr(self) -> str:
        ins = ", ".join(f"{s.name}{list(s.shape)}:{s.dtype}" for s in self.input_specs)
        return f"name={self.name!r}, inputs=[{ins}], outputs={self.output_names}, device={self._device}, strict={self.strict}"


_ORT_FORWARD = ORTModule.forward  # ORTModule.__call__ takes its fast path only under this forward


def frozen_message(name: str) -> str:
    """What ``backward()`` through an ORT bridge raises (the same sentence wherever it is refused)."""
    return (f"bridge {name!r} runs in onnxruntime and is frozen; use artifact.to_torch() to train it "
            f"(mmbridge.to_torch(...); export with trainable=True to keep BatchNorm / Dropout). If no gradient "
            f"should flow through it, pass its inputs detached (tensor.detach()) or call it under torch.no_grad()")


class _FrozenBridge(torch.autograd.Function):
    """Runs the ORT call in ``forward`` and refuses ``backward`` with :func:`frozen_message`.

    Used only when grad mode is on and an input requires grad, so that a gradient meant to flow
    through the bridge fails naming it. The outputs are the tensors ORT wrote (no copy);
    integer / bool outputs are marked non-differentiable.
    """

    @staticmethod
    def forward(ctx: Any, name: str, run: Any, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: ARG004
        ctx.bridge = name
        outs = run()
        exact = [o for o in outs if not (o.is_floating_point() or o.is_complex())]
        if exact:
            ctx.mark_non_differentiable(*exact)
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:  # noqa: ARG004
        raise RuntimeBackendError(frozen_message(ctx.bridge))


class _ShapeOnly:
    """Adapter so :meth:`TensorSpec.check` checks a torch shape (dtype is checked separately)."""

    __slots__ = ("shape", "dtype")

    def __init__(self, shape: Any, dtype: Any):
        self.shape, self.dtype = shape, dtype


def _same_device(got: torch.device, want: torch.device) -> bool:
    """``want`` without an index (``"cuda"``) accepts any index of that type."""
    return got.type == want.type and (want.index is None or got.index == want.index or got.type == "cpu")


def _dtype_name(code: int, name: str, bridge: str, output: bool = False) -> str:
    if code not in _ONNX_TO_TORCH:
        raise SpecError(
            f"bridge {bridge!r}: {'output' if output else 'input'} {name!r} has ONNX type {_onnx_type_name(code)}, "
            f"which torch tensors cannot carry; keep it (e.g. strings) outside the ORT branch"
        )
    return _torch_name(_ONNX_TO_TORCH[code])


def _load(obj: Any) -> tuple[Any, str | bytes, tuple[TensorSpec, ...] | None, str | None]:
    """``(ModelProto, session source, specs or None, name or None)`` from what ``to_ort`` accepts."""
    import onnx

    from mmbridge.store import META_FILE, MODEL_FILE, read_meta

    if hasattr(obj, "onnx_path") and hasattr(obj, "meta"):  # a BridgeArtifact
        return obj.model, str(obj.onnx_path), obj.input_specs, obj.name
    if isinstance(obj, onnx.ModelProto):
        return obj, obj.SerializeToString(), None, obj.graph.name or None
    if isinstance(obj, (str, os.PathLike)):
        p = Path(obj)
        if p.is_dir() and (p / META_FILE).is_file():
            meta = read_meta(p)
            specs = tuple(TensorSpec.from_dict(d) for d in meta["inputs"])
            return onnx.load(str(p / MODEL_FILE)), str((p / MODEL_FILE).resolve()), specs, meta.get("name")
        if not p.is_file():
            raise FileNotFoundError(
                f"to_ort(): {str(p)!r} is neither an .onnx file nor an mmbridge artifact directory "
                f"(with {META_FILE}); export one with mmbridge.export(...)"
            )
        return onnx.load(str(p)), str(p.resolve()), None, p.stem
    raise TypeError(
        f"to_ort() takes a BridgeArtifact, an onnx.ModelProto, an .onnx path or an artifact directory, "
        f"not {type(obj).__name__}"
    )


def to_ort(model: Any, *, device: str | torch.device | None = None, strict: bool = False,
           intra_op_threads: int | None = None, **session_options: Any) -> ORTModule:
    """Wrap an ONNX bridge in a frozen onnxruntime :class:`ORTModule` (IO binding, zero-copy).

    Args:
        model: a :class:`~mmbridge.BridgeArtifact` (its ``input_specs`` are used), an artifact
            directory, an ``onnx.ModelProto`` or a ``.onnx`` path (specs read from the graph).
        device: ``None`` (default): run on whatever device the inputs are on; ``"cpu"``,
            ``"cuda"`` (the inputs' CUDA index) or ``"cuda:N"``: inputs must be there. CUDA uses
            the CUDA execution provider with ``device_id`` = the tensor's index.
        strict: refuse non-contiguous inputs (:class:`SpecError`) instead of copying them once.
        intra_op_threads: ORT intra-op threads per session; default ``os.cpu_count() //
            LOCAL_WORLD_SIZE`` (at least 1), logged once at INFO.
        **session_options: ``inter_op_threads``, ``graph_optimization_level`` (a
            ``onnxruntime.GraphOptimizationLevel`` name), ``options`` (``SessionOptions``
            attributes, e.g. ``{"enable_mem_pattern": False}``), ``config_entries`` (session
            config entries, e.g. ``{"session.intra_op.allow_spinning": "0"}`` when torch needs
            the cores between ORT calls) and ``provider_options`` (extra CUDA EP options), as in
            :func:`mmbridge.runtime.session.make_session`.

    Returns:
        An :class:`ORTModule` (``nn.Module``, no parameters, empty ``state_dict``).

    Raises:
        RuntimeBackendError: ``device`` is CUDA but onnxruntime has no CUDA execution provider
            (names the installed distributions and, if both ``onnxruntime`` and
            ``onnxruntime-gpu`` are installed, that conflict and the fix).
        SpecError: specs that do not match the graph's inputs, or graph inputs / outputs of a
            type torch cannot hold (strings, sequences).
        TypeError: an unknown ``session_options`` key or ``model`` type.
        FileNotFoundError: a path that is neither an ``.onnx`` file nor an artifact.
    """
    allowed = {"inter_op_threads", "graph_optimization_level", "options", "provider_options", "config_entries"}
    unknown = sorted(set(session_options) - allowed)
    if unknown:
        raise TypeError(f"to_ort(): unknown session options {unknown}; valid: {sorted(allowed)}")
    proto, source, specs, name = _load(model)
    dev = None if device is None else torch.device(device)
    module = ORTModule(proto, source=source, input_specs=specs, name=name, device=None, strict=strict,
                       intra_op_threads=intra_op_threads, session_options=session_options)
    if dev is not None:
        module._set_device(dev)
    return module
