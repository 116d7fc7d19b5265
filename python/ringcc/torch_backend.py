"""torch.distributed backend "ringcc": ``dist.init_process_group("ringcc", ...)`` on CPU.

    import ringcc.torch_backend
    ringcc.torch_backend.register()          # idempotent
    dist.init_process_group("ringcc", init_method=..., rank=r, world_size=n)

How torch (2.13) plugs in a backend written in Python:

- ``dist.Backend.register_backend(name, creator, devices=["cpu"])`` stores ``creator``;
  ``init_process_group`` / ``new_group`` call ``creator(store, group_rank, group_size,
  timeout)`` with a ``PrefixStore`` already private to the group.
- ``torch._C._distributed_c10d.Backend`` has no Python constructor, so a Python backend
  subclasses ``dist.ProcessGroup`` instead (its pybind trampoline forwards C++ virtual
  calls, e.g. DDP's Reducer, to the Python methods); torch then uses the object as the
  group itself.
- ``dist.*`` functions call: allreduce, allreduce_coalesced, broadcast, allgather,
  allgather_coalesced, all_gather_single, all_gather_single_coalesced, reduce_scatter,
  reduce_scatter_single, reduce_scatter_single_coalesced, reduce, gather, scatter,
  all_to_all_single, alltoall, barrier(opts=...), send, recv, recv_anysource. C++ callers
  (DDP, FSDP) reach the coalesced ones and all_to_all_single through the trampoline,
  which in 2.13 falls back to the older names allgather_into_tensor_coalesced,
  reduce_scatter_tensor_coalesced and alltoall_base; both spellings are defined here.
  The group's name and description (getGroupName/setGroupName, ...) live in the object,
  since a Python group has no C++ backend to keep them.
- Each returns a ``dist.Work`` subclass; torch calls ``wait(timeout)`` (``timedelta(0)``
  from C++ means "no limit"), ``is_completed()``, ``exception()`` and ``get_future()``
  (DDP chains its bucket handling on that future, whose value is the output tensors).

Every operation is submitted to the ringcc Communicator of the group and returns at
once when torch asks for an asynchronous op; the Work completes when ringcc's done
callback (on the engine thread) hands it to a settler thread, which copies results out
of any staging buffers and settles the torch future. Future callbacks never run on the
engine thread: torch's own callbacks may wait there for later collectives of the same
group (PowerSGD's hook does), which only the engine thread can run.
"""

from __future__ import annotations

import datetime
import os
import queue
import threading
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch._C import _distributed_c10d as _c10d

from .comm import Communicator

BACKEND_NAME = "ringcc"

_RED = dist.ReduceOp.RedOpType
_OPS = {
    _RED.SUM: "sum",
    _RED.AVG: "avg",
    _RED.PRODUCT: "prod",
    _RED.MIN: "min",
    _RED.MAX: "max",
    _RED.BAND: "band",
    _RED.BOR: "bor",
    _RED.BXOR: "bxor",
}

Finish = Optional[Callable[[], None]]


# --------------------------------------------------------------------------- helpers
def _reduce_op(op: Any) -> str:
    code = getattr(op, "op", op)  # dist.ReduceOp wraps a RedOpType
    try:
        return _OPS[code]
    except (KeyError, TypeError):
        raise ValueError(f"ringcc: reduce op {code} is not supported "
                         f"(supported: {', '.join(o.name for o in _OPS)})") from None


def _op_timeout(opts: Any) -> Optional[float]:
    """The per-call timeout in seconds, or None for the group's default (torch leaves
    ``opts.timeout`` at -1 ms when unset)."""
    timeout = getattr(opts, "timeout", None)
    if isinstance(timeout, datetime.timedelta) and timeout.total_seconds() > 0:
        return timeout.total_seconds()
    return None


def _wait_seconds(timeout: Any) -> Optional[float]:
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        timeout = timeout.total_seconds()
    timeout = float(timeout)
    return timeout if timeout > 0 else None  # torch's kNoTimeout is timedelta(0)


def _check_tensor(t: Any, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"ringcc {what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"ringcc {what}: tensor is on {t.device}; the ringcc backend handles CPU tensors only")
    if t.is_sparse:
        raise ValueError(f"ringcc {what}: sparse tensors are not supported")
    return t


def _single(tensors: Any, what: str) -> torch.Tensor:
    if isinstance(tensors, torch.Tensor):
        return _check_tensor(tensors, what)
    tensors = list(tensors)
    if len(tensors) != 1:
        raise ValueError(f"ringcc {what}: expected exactly one tensor, got {len(tensors)}")
    return _check_tensor(tensors[0], what)


def _same_dtype(ref: torch.Tensor, others: Sequence[torch.Tensor], what: str) -> None:
    for t in others:
        if t.dtype != ref.dtype:
            raise TypeError(f"ringcc {what}: tensors must share one dtype, got {ref.dtype} and {t.dtype}")


def _staged(t: torch.Tensor):
    """``t`` itself when contiguous, else a contiguous copy (results are copied back)."""
    return (t, False) if t.is_contiguous() else (t.contiguous(), True)


def _chain(*steps: Finish) -> Finish:
    steps = [s for s in steps if s is not None]
    if not steps:
        return None
    if len(steps) == 1:
        return steps[0]

    def run() -> None:
        for s in steps:
            s()

    return run


def _copy_back(dst: torch.Tensor, src: torch.Tensor, needed: bool) -> Finish:
    if not needed:
        return None
    return lambda: dst.copy_(src)


def _split_into(flat: torch.Tensor, outs: Sequence[torch.Tensor]) -> Finish:
    """Copy consecutive pieces of 1-D ``flat`` into ``outs`` (each reshaped)."""

    def run() -> None:
        offset = 0
        with torch.no_grad():
            for o in outs:
                n = o.numel()
                o.copy_(flat[offset:offset + n].view(o.shape))
                offset += n

    return run


def _flat_cat(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    if not tensors:
        return torch.empty(0, dtype=dtype)
    with torch.no_grad():
        return torch.cat([t.detach().reshape(-1) for t in tensors])


# --------------------------------------------------------------------------- settler
class _Settler:
    """Threads that settle the torch futures of asynchronous operations.

    Settling a torch Future runs its ``then`` callbacks on the settling thread, and
    torch's callbacks may block there on a later collective of the same group: PowerSGD's
    hook issues an all_reduce inside a callback and waits for its future. On the engine
    thread that deadlocks (only it can run the awaited operation); with a single helper
    thread too (it would have to settle the future its own callback waits for). So each
    queued settlement gets a thread that is not busy: an idle one, else a new one.
    Threads idle for ``IDLE_EXIT_S`` end."""

    IDLE_EXIT_S = 10.0

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:  # also in a forked child, which has none of the threads
        self._lock = threading.Lock()
        self._queue: "queue.SimpleQueue[Callable[[], None]]" = queue.SimpleQueue()
        self._idle = 0  # threads waiting for work that no queued item is meant for

    def submit(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._queue.put(fn)
            if self._idle:
                self._idle -= 1  # that thread takes it
                return
        threading.Thread(target=self._run, name="ringcc-settle", daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                fn = self._queue.get(timeout=self.IDLE_EXIT_S)
            except queue.Empty:
                with self._lock:
                    if self._idle:  # no queued item counts on this thread
                        self._idle -= 1
                        return
                continue  # an item was queued for it just now
            try:
                fn()
            except BaseException:  # noqa: BLE001 - RingccWork._complete hands errors to waiters
                pass
            with self._lock:
                self._idle += 1


_SETTLER = _Settler()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_SETTLER._reset)


# ------------------------------------------------------------------------------ Work
class RingccWork(dist.Work):
    """torch Work over one asynchronous ringcc operation (blocking calls return a
    _CompletedWork).

    ``wait()`` blocks with the GIL released (in ringcc's Work.wait); the torch Future
    from ``get_future()`` is completed with the list of output tensors, or failed with
    the operation's exception, by the first of: ``wait()``/``is_completed()`` on a
    finished operation, or a settler thread that ringcc's done callback wakes."""

    def __init__(self, outputs: List[torch.Tensor], native: Any, finish: Finish = None, description: str = ""):
        super().__init__()
        self._outputs = outputs
        self._native = native  # the ringcc.Work
        self._finish_fn = finish
        self._description = description
        self._lock = threading.Lock()
        self._finished = False
        self._settled = False  # some thread has taken on settling the future
        self._error: Optional[BaseException] = None
        self._future: torch.futures.Future = torch.futures.Future()
        if native.is_completed():
            self._complete(native.exception())
        else:
            # Never settle on the engine thread (see _Settler).
            native.add_done_callback(lambda w: _SETTLER.submit(lambda: self._complete(w.exception())))

    def _complete(self, error: Optional[BaseException], wait_settled: bool = False) -> None:
        """Post-process (copy out of staging buffers) once; then settle the future once.
        Called by a settler thread and from wait()/is_completed(). With ``wait_settled``
        also returns only once the future is marked done when another thread settles it."""
        with self._lock:
            if not self._finished:
                if error is None and self._finish_fn is not None:
                    try:
                        self._finish_fn()
                    except BaseException as exc:  # noqa: BLE001 - handed to waiters
                        error = exc
                self._error = error
                self._finish_fn = None
                self._finished = True
            settle, self._settled = not self._settled, True
            error = self._error
        # Outside the lock: the future's callbacks may call back into this Work.
        if settle:
            if error is None:
                self._future.set_result(self._outputs)
            else:
                self._future.set_exception(error)
        elif wait_settled:
            # The other thread is about to set it; a Future is marked done before its
            # callbacks run, so this returns without waiting for them.
            try:
                self._future.wait()
            except BaseException:  # noqa: BLE001 - the error is self._error, raised by wait()
                pass

    def _poll_native(self) -> None:
        if not self._finished and self._native.is_completed():
            self._complete(self._native.exception())

    # torch.distributed.Work API ------------------------------------------------------
    def wait(self, timeout: Any = None) -> bool:
        native = self._native
        if not self._finished:
            try:
                native.wait(_wait_seconds(timeout))
            except BaseException:
                if not native.is_completed():
                    raise  # our wait timed out (or was interrupted); the op keeps running
        self._complete(native.exception(), wait_settled=True)
        if self._error is not None:
            raise self._error
        return True

    def is_completed(self) -> bool:
        self._poll_native()
        return self._finished

    def is_success(self) -> bool:
        self._poll_native()
        return self._finished and self._error is None

    def exception(self) -> Optional[BaseException]:
        self._poll_native()
        return self._error

    def result(self) -> List[torch.Tensor]:
        self.wait()
        return self._outputs

    def get_future(self) -> torch.futures.Future:
        return self._future

    def synchronize(self) -> None:  # CPU: nothing to order against a stream
        return None

    def __repr__(self) -> str:
        state = "done" if self._finished else "running"
        return f"<ringcc.torch_backend.RingccWork {self._description} {state}>"


class _CompletedWork(dist.Work):
    """The Work of a blocking call, returned after it succeeded (a failure raised).

    Deliberately small: a blocking collective is latency-bound, and every object made per
    call costs allocation and garbage-collector time; the future is made on request."""

    def __init__(self, outputs: List[torch.Tensor]):
        super().__init__()
        self._outputs = outputs
        self._future: Optional[torch.futures.Future] = None

    def wait(self, timeout: Any = None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True

    def is_success(self) -> bool:
        return True

    def exception(self) -> Optional[BaseException]:
        return None

    def result(self) -> List[torch.Tensor]:
        return self._outputs

    def get_future(self) -> torch.futures.Future:
        if self._future is None:
            self._future = torch.futures.Future()
            self._future.set_result(self._outputs)
        return self._future

    def synchronize(self) -> None:
        return None

    def __repr__(self) -> str:
        return "<ringcc.torch_backend completed work>"


# ---------------------------------------------------------------------- ProcessGroup
class RingccProcessGroup(dist.ProcessGroup):
    """A torch.distributed process group whose collectives run on a ringcc Communicator."""

    def __init__(self, store: Any, rank: int, world_size: int, timeout: Any = datetime.timedelta(minutes=30),
                 **communicator_options: Any):
        super().__init__(rank, world_size)  # the (store, rank, size) overload cannot build a Python subclass
        self._rank = rank
        self._world_size = world_size
        self._comm = Communicator(store, rank, world_size, name="pg", timeout=timeout, **communicator_options)
        # torch keeps a group's name and description in its C++ backend objects, which a
        # Python group has none of; it sets and reads them through these methods.
        self._group_name = ""
        self._group_desc = ""

    @property
    def communicator(self) -> Communicator:
        return self._comm

    def getBackendName(self) -> str:  # noqa: N802 - torch's name
        return BACKEND_NAME

    def getGroupName(self) -> str:  # noqa: N802
        return self._group_name

    def setGroupName(self, name: str) -> None:  # noqa: N802
        self._group_name = name

    def getGroupDesc(self) -> str:  # noqa: N802
        return self._group_desc

    def setGroupDesc(self, desc: str) -> None:  # noqa: N802
        self._group_desc = desc

    def __repr__(self) -> str:
        return f"<RingccProcessGroup rank={self._rank}/{self._world_size}>"

    # ------------------------------------------------------------------- plumbing
    def _launch(self, name: str, opts: Any, outputs: List[torch.Tensor], call: Callable[..., Any],
                finish: Finish = None, async_op: Optional[bool] = None) -> RingccWork:
        """Run ``call(async_op=..., timeout=...)`` on the communicator and wrap it.

        torch sets ``opts.asyncOp = False`` for blocking calls; those run inline (ringcc
        runs a blocking call on the caller's thread when nothing is queued)."""
        if async_op is None:
            async_op = bool(getattr(opts, "asyncOp", True))
        result = call(async_op=async_op, timeout=_op_timeout(opts))
        if async_op:
            return RingccWork(outputs, result, finish, name)
        if finish is not None:
            finish()
        return _CompletedWork(outputs)

    def _check_pairs(self, outputs, inputs, what: str, *, gathered: str):
        """Validated (outputs, inputs) of a coalesced call. In each pair the `gathered`
        side ("output" or "input") holds world_size times the elements of the other."""
        outs = [_check_tensor(t, f"{what} output") for t in outputs]
        ins = [_check_tensor(t, f"{what} input") for t in inputs]
        if len(outs) != len(ins):
            raise ValueError(f"ringcc {what}: need as many outputs as inputs")
        if ins:
            _same_dtype(ins[0], ins + outs, what)
        other = "input" if gathered == "output" else "output"
        for o, i in zip(outs, ins):
            big, small = (o, i) if gathered == "output" else (i, o)
            if big.numel() != self._world_size * small.numel():
                raise ValueError(f"ringcc {what}: an {gathered} is not world_size times its {other}")
        return outs, ins

    def _check_list(self, tensors: Sequence[torch.Tensor], what: str) -> List[torch.Tensor]:
        tensors = [_check_tensor(t, what) for t in tensors]
        if len(tensors) != self._world_size:
            raise ValueError(f"ringcc {what}: need {self._world_size} tensors (one per rank), got {len(tensors)}")
        return tensors

    # ---------------------------------------------------------------- collectives
    def allreduce(self, tensors, opts=None):
        opts = _options(_c10d.AllreduceOptions, opts)
        t = _single(tensors, "allreduce")
        op = _reduce_op(opts.reduceOp)
        buf, staged = _staged(t)
        return self._launch("allreduce", opts, [t], lambda **kw: self._comm.allreduce(buf, op, **kw),
                            _copy_back(t, buf, staged))

    def allreduce_into(self, output: torch.Tensor, input: torch.Tensor, op: Any = "sum",
                       async_op: bool = True, compression: Optional[str] = None):
        """ringcc's own out-of-place allreduce: ``output`` receives the reduction of every
        rank's ``input``, which is only read. torch's ``all_reduce`` works in place, so an
        out-of-place result otherwise costs a copy of the input first; here the ring
        folds the input in as it goes and never copies it. ``op``: a ``dist.ReduceOp`` or
        its name ("sum", "avg", "min", ...). ``compression="fp16"|"bf16"`` as in
        ``allreduce_compressed`` (float32, sum or avg). ``output`` may be ``input`` (in
        place), but may not overlap it otherwise. Returns a Work whose future holds
        ``[output]``."""
        out = _check_tensor(output, "allreduce_into output")
        inp = _check_tensor(input, "allreduce_into input")
        if out.dtype != inp.dtype or out.shape != inp.shape:
            raise ValueError(f"ringcc allreduce_into: rank {self._rank}: output and input must match, got output "
                             f"{tuple(out.shape)} {out.dtype} and input {tuple(inp.shape)} {inp.dtype}")
        code = op if isinstance(op, str) else _reduce_op(op)
        src, src_staged = _staged(inp)
        if out.data_ptr() == inp.data_ptr() and out.stride() == inp.stride():
            dst, staged = src, src_staged  # in place: a staged copy is copied back
        else:
            lo, hi = out.data_ptr(), out.data_ptr() + out.numel() * out.element_size()
            ilo, ihi = inp.data_ptr(), inp.data_ptr() + inp.numel() * inp.element_size()
            if out.numel() and inp.numel() and lo < ihi and ilo < hi:
                raise ValueError(f"ringcc allreduce_into: rank {self._rank}: output overlaps input without being "
                                 f"the same tensor")
            dst, staged = _staged(out)
        return self._launch("allreduce_into", None, [out],
                            lambda **kw: self._comm.allreduce(src, code, out=dst, compression=compression, **kw),
                            _copy_back(out, dst, staged), async_op=async_op)

    def allreduce_compressed(self, tensor: torch.Tensor, compression: str, op: str = "avg",
                             async_op: bool = True):
        """ringcc's own: allreduce a float32 tensor with fp16 or bf16 on the wire and float32
        accumulation at every step (see ``Communicator.allreduce``). ``op`` is "sum" or
        "avg". Returns a Work (``wait()``, ``get_future()`` -> ``[tensor]``); the result is
        written into ``tensor``.

        Unlike casting hooks (torch's ``fp16_compress_hook``), values anywhere in float32's
        range survive: each block of 256 elements carries its own power-of-two scale."""
        t = _check_tensor(tensor, "allreduce_compressed")
        if t.dtype != torch.float32:
            raise TypeError(f"ringcc allreduce_compressed: rank {self._rank}: needs a float32 tensor, got {t.dtype}")
        if op not in ("sum", "avg"):
            raise ValueError(f"ringcc allreduce_compressed: op must be 'sum' or 'avg', got {op!r}")
        buf, staged = _staged(t)
        return self._launch("allreduce_compressed", None, [t],
                            lambda **kw: self._comm.allreduce(buf, op, compression=compression, **kw),
                            _copy_back(t, buf, staged), async_op=async_op)

    def allreduce_coalesced(self, tensors, opts=None):
        opts = _options(_c10d.AllreduceOptions, opts)
        tensors = [_check_tensor(t, "allreduce_coalesced") for t in tensors]
        if not tensors:
            return _CompletedWork([])
        _same_dtype(tensors[0], tensors, "allreduce_coalesced")
        op = _reduce_op(opts.reduceOp)
        flat = _flat_cat(tensors, tensors[0].dtype)
        return self._launch("allreduce_coalesced", opts, tensors, lambda **kw: self._comm.allreduce(flat, op, **kw),
                            _split_into(flat, tensors))

    def broadcast(self, tensors, opts=None):
        opts = _options(_c10d.BroadcastOptions, opts)
        t = _single(tensors, "broadcast")
        root = opts.rootRank
        buf, staged = _staged(t)
        return self._launch("broadcast", opts, [t], lambda **kw: self._comm.broadcast(buf, root, **kw),
                            _copy_back(t, buf, staged and self._rank != root))

    def reduce(self, tensors, opts=None):
        opts = _options(_c10d.ReduceOptions, opts)
        t = _single(tensors, "reduce")
        root = opts.rootRank
        op = _reduce_op(opts.reduceOp)
        buf, staged = _staged(t)
        return self._launch("reduce", opts, [t], lambda **kw: self._comm.reduce(buf, root, op, **kw),
                            _copy_back(t, buf, staged and self._rank == root))

    def allgather(self, output_tensors, input_tensors, opts=None):
        opts = _options(_c10d.AllgatherOptions, opts)
        if len(output_tensors) != 1:
            raise ValueError(f"ringcc allgather: expected one output list, got {len(output_tensors)}")
        outs = self._check_list(output_tensors[0], "allgather output")
        inp = _single(input_tensors, "allgather input")
        _same_dtype(inp, outs, "allgather")
        counts = [o.numel() for o in outs]
        if counts[self._rank] != inp.numel():
            raise ValueError(f"ringcc allgather: this rank's output tensor has {counts[self._rank]} elements, "
                             f"its input {inp.numel()}")
        src, _ = _staged(inp)
        if len(set(counts)) == 1:
            tmp = torch.empty((self._world_size,) + tuple(src.shape), dtype=src.dtype)
            call = lambda **kw: self._comm.allgather(src, out=tmp, **kw)  # noqa: E731
        else:
            tmp = torch.empty(sum(counts), dtype=src.dtype)
            flat = src.view(-1)
            call = lambda **kw: self._comm.allgather_v(flat, counts, out=tmp, **kw)  # noqa: E731
        return self._launch("allgather", opts, outs, call, _split_into(tmp.view(-1), outs))

    def all_gather_single(self, output, input, opts=None):  # noqa: A002 - torch's name
        opts = _options(_c10d.AllgatherOptions, opts)
        out = _check_tensor(output, "all_gather_into_tensor output")
        inp = _check_tensor(input, "all_gather_into_tensor input")
        _same_dtype(inp, [out], "all_gather_into_tensor")
        if out.numel() != self._world_size * inp.numel():
            raise ValueError(f"ringcc all_gather_into_tensor: output has {out.numel()} elements, need "
                             f"{self._world_size} x {inp.numel()}")
        src, _ = _staged(inp)
        dst, staged = _staged(out)
        return self._launch("all_gather_into_tensor", opts, [out],
                            lambda **kw: self._comm.allgather(src, out=dst, **kw), _copy_back(out, dst, staged))

    _allgather_base = all_gather_single

    def allgather_into_tensor_coalesced(self, outputs, inputs, opts=None):
        """Several all_gather_into_tensor calls as one ringcc allgather."""
        opts = _options(_c10d.AllgatherOptions, opts)
        outs, ins = self._check_pairs(outputs, inputs, "allgather_into_tensor_coalesced", gathered="output")
        if not ins:
            return _CompletedWork([])
        n = self._world_size
        flat = _flat_cat(ins, ins[0].dtype)
        tmp = torch.empty((n, flat.numel()), dtype=flat.dtype)

        def finish() -> None:
            offset = 0
            for o, i in zip(outs, ins):
                k = i.numel()
                o.copy_(tmp[:, offset:offset + k].reshape(o.shape))
                offset += k

        return self._launch("allgather_into_tensor_coalesced", opts, outs,
                            lambda **kw: self._comm.allgather(flat, out=tmp, **kw), finish)

    all_gather_single_coalesced = allgather_into_tensor_coalesced  # the name torch 2.13 tries first

    def allgather_coalesced(self, output_lists, input_tensors, opts=None):
        """dist.all_gather_coalesced: ``output_lists[r][i]`` receives rank r's input i; one
        ringcc allgather of the inputs laid end to end."""
        opts = _options(_c10d.AllgatherOptions, opts)
        ins = [_check_tensor(t, "allgather_coalesced input") for t in input_tensors]
        if len(output_lists) != self._world_size:
            raise ValueError(f"ringcc allgather_coalesced: need {self._world_size} output lists (one per rank), "
                             f"got {len(output_lists)}")
        outs = [[_check_tensor(t, "allgather_coalesced output") for t in lst] for lst in output_lists]
        if any(len(lst) != len(ins) for lst in outs):
            raise ValueError(f"ringcc allgather_coalesced: every rank's output list needs {len(ins)} tensors "
                             "(one per input)")
        if not ins:
            return _CompletedWork([])
        flat_outs = [o for lst in outs for o in lst]
        _same_dtype(ins[0], ins + flat_outs, "allgather_coalesced")
        if any(o.numel() != i.numel() for lst in outs for o, i in zip(lst, ins)):
            raise ValueError("ringcc allgather_coalesced: every output tensor must have as many elements as "
                             "its input")
        flat = _flat_cat(ins, ins[0].dtype)
        tmp = torch.empty((self._world_size, flat.numel()), dtype=flat.dtype)

        def finish() -> None:
            for r, lst in enumerate(outs):
                _split_into(tmp[r], lst)()

        return self._launch("allgather_coalesced", opts, flat_outs,
                            lambda **kw: self._comm.allgather(flat, out=tmp, **kw), finish)

    def reduce_scatter(self, output_tensors, input_tensors, opts=None):
        opts = _options(_c10d.ReduceScatterOptions, opts)
        out = _single(output_tensors, "reduce_scatter output")
        if len(input_tensors) != 1:
            raise ValueError(f"ringcc reduce_scatter: expected one input list, got {len(input_tensors)}")
        ins = self._check_list(input_tensors[0], "reduce_scatter input")
        _same_dtype(out, ins, "reduce_scatter")
        counts = [t.numel() for t in ins]
        if counts[self._rank] != out.numel():
            raise ValueError(f"ringcc reduce_scatter: output has {out.numel()} elements but this rank's input "
                             f"block has {counts[self._rank]}")
        op = _reduce_op(opts.reduceOp)
        flat = _flat_cat(ins, out.dtype)
        dst, staged = _staged(out)
        return self._launch("reduce_scatter", opts, [out],
                            lambda **kw: self._comm.reduce_scatter(flat, op, out=dst, counts=counts, **kw),
                            _copy_back(out, dst, staged))

    def reduce_scatter_single(self, output, input, opts=None):  # noqa: A002
        opts = _options(_c10d.ReduceScatterOptions, opts)
        out = _check_tensor(output, "reduce_scatter_tensor output")
        inp = _check_tensor(input, "reduce_scatter_tensor input")
        _same_dtype(out, [inp], "reduce_scatter_tensor")
        if inp.numel() != self._world_size * out.numel():
            raise ValueError(f"ringcc reduce_scatter_tensor: input has {inp.numel()} elements, need "
                             f"{self._world_size} x {out.numel()}")
        op = _reduce_op(opts.reduceOp)
        src, _ = _staged(inp)
        dst, staged = _staged(out)
        counts = [out.numel()] * self._world_size
        return self._launch("reduce_scatter_tensor", opts, [out],
                            lambda **kw: self._comm.reduce_scatter(src, op, out=dst, counts=counts, **kw),
                            _copy_back(out, dst, staged))

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_tensor_coalesced(self, outputs, inputs, opts=None):
        """Several reduce_scatter_tensor calls as one ringcc reduce_scatter."""
        opts = _options(_c10d.ReduceScatterOptions, opts)
        outs, ins = self._check_pairs(outputs, inputs, "reduce_scatter_tensor_coalesced", gathered="input")
        if not ins:
            return _CompletedWork([])
        n = self._world_size
        op = _reduce_op(opts.reduceOp)
        total = sum(o.numel() for o in outs)
        with torch.no_grad():
            # Row r of `packed` holds block r of every input, so block r of the flat
            # buffer is exactly what rank r must receive.
            packed = torch.cat([i.detach().reshape(n, -1) for i in ins], dim=1) if total else \
                torch.empty((n, 0), dtype=ins[0].dtype)
        tmp = torch.empty(total, dtype=packed.dtype)
        counts = [total] * n
        return self._launch("reduce_scatter_tensor_coalesced", opts, outs,
                            lambda **kw: self._comm.reduce_scatter(packed, op, out=tmp, counts=counts, **kw),
                            _split_into(tmp, outs))

    reduce_scatter_single_coalesced = reduce_scatter_tensor_coalesced  # the name torch 2.13 tries first

    def gather(self, output_tensors, input_tensors, opts=None):
        opts = _options(_c10d.GatherOptions, opts)
        root = opts.rootRank
        inp = _single(input_tensors, "gather input")
        src, _ = _staged(inp)
        if self._rank == root:
            if len(output_tensors) != 1:
                raise ValueError(f"ringcc gather: expected one output list on the root, got {len(output_tensors)}")
            outs = self._check_list(output_tensors[0], "gather output")
            _same_dtype(inp, outs, "gather")
            if any(o.numel() != inp.numel() for o in outs):
                raise ValueError("ringcc gather: every output tensor must have as many elements as the input")
            tmp = torch.empty((self._world_size,) + tuple(src.shape), dtype=src.dtype)
            return self._launch("gather", opts, outs, lambda **kw: self._comm.gather(src, root, out=tmp, **kw),
                                _split_into(tmp.view(-1), outs))
        if output_tensors and any(len(lst) for lst in output_tensors):
            raise ValueError("ringcc gather: output tensors are only given on the root")
        return self._launch("gather", opts, [], lambda **kw: self._comm.gather(src, root, **kw))

    def scatter(self, output_tensors, input_tensors, opts=None):
        opts = _options(_c10d.ScatterOptions, opts)
        root = opts.rootRank
        out = _single(output_tensors, "scatter output")
        dst, staged = _staged(out)
        flat = None
        if self._rank == root:
            if len(input_tensors) != 1:
                raise ValueError(f"ringcc scatter: expected one input list on the root, got {len(input_tensors)}")
            ins = self._check_list(input_tensors[0], "scatter input")
            _same_dtype(out, ins, "scatter")
            if any(i.numel() != out.numel() for i in ins):
                raise ValueError("ringcc scatter: every input tensor must have as many elements as the output")
            flat = _flat_cat(ins, out.dtype)
        elif input_tensors and any(len(lst) for lst in input_tensors):
            raise ValueError("ringcc scatter: input tensors are only given on the root")
        return self._launch("scatter", opts, [out], lambda **kw: self._comm.scatter(flat, dst, root, **kw),
                            _copy_back(out, dst, staged))

    def all_to_all_single(self, output, input, output_split_sizes=None, input_split_sizes=None,  # noqa: A002
                          opts=None):
        opts = _options(_c10d.AllToAllOptions, opts)
        out = _check_tensor(output, "all_to_all_single output")
        inp = _check_tensor(input, "all_to_all_single input")
        _same_dtype(inp, [out], "all_to_all_single")
        n = self._world_size
        src, _ = _staged(inp)
        dst, staged = _staged(out)
        finish = _copy_back(out, dst, staged)
        in_splits = list(input_split_sizes or [])
        out_splits = list(output_split_sizes or [])
        if not in_splits and not out_splits and src.dim() > 0 and src.shape[0] % n == 0 \
                and dst.numel() == src.numel():
            return self._launch("all_to_all_single", opts, [out],
                                lambda **kw: self._comm.alltoall(src, out=dst, **kw), finish)
        send_counts = _split_counts(src, in_splits, n, "input")
        recv_counts = _split_counts(dst, out_splits, n, "output")
        return self._launch("all_to_all_single", opts, [out],
                            lambda **kw: self._comm.alltoall(src.view(-1), out=dst.view(-1), send_counts=send_counts,
                                                             recv_counts=recv_counts, **kw), finish)

    alltoall_base = all_to_all_single

    def alltoall(self, output_tensors, input_tensors, opts=None):
        opts = _options(_c10d.AllToAllOptions, opts)
        outs = self._check_list(output_tensors, "alltoall output")
        ins = self._check_list(input_tensors, "alltoall input")
        _same_dtype(ins[0], ins + outs, "alltoall")
        send_counts = [t.numel() for t in ins]
        recv_counts = [t.numel() for t in outs]
        flat = _flat_cat(ins, ins[0].dtype)
        tmp = torch.empty(sum(recv_counts), dtype=flat.dtype)
        return self._launch("alltoall", opts, outs,
                            lambda **kw: self._comm.alltoall(flat, out=tmp, send_counts=send_counts,
                                                             recv_counts=recv_counts, **kw),
                            _split_into(tmp, outs))

    def barrier(self, opts=None):
        opts = _options(_c10d.BarrierOptions, opts)
        return self._launch("barrier", opts, [], lambda **kw: self._comm.barrier(**kw))

    # ------------------------------------------------------------- point to point
    def send(self, tensors, dstRank, tag=0):  # noqa: N803 - torch's names
        t = _single(tensors, "send")
        buf, _ = _staged(t)
        # No options: isend and send look alike here, so always submit asynchronously.
        return self._launch("send", None, [t], lambda **kw: self._comm.send(buf, dstRank, tag, **kw),
                            async_op=True)

    def recv(self, tensors, srcRank, tag=0):  # noqa: N803
        t = _single(tensors, "recv")
        buf, staged = _staged(t)
        return self._launch("recv", None, [t], lambda **kw: self._comm.recv(buf, srcRank, tag, **kw),
                            _copy_back(t, buf, staged), async_op=True)

    def recv_anysource(self, tensors, tag=0):
        raise RuntimeError("ringcc: recv from any source is not supported; pass src=")

    # ------------------------------------------------------------------ lifetime
    def shutdown(self) -> None:
        self._comm.close()

    def abort(self) -> None:
        self._comm.abort("abort() called on the torch process group")


def _options(cls: Any, value: Any) -> Any:
    """Options object of ``cls`` from None, a ReduceOp or a timedelta (the convenience
    overloads of ProcessGroup's methods)."""
    if value is None:
        return cls()
    if hasattr(value, "asyncOp"):  # an options object (pybind hides e.g. AllreduceCoalescedOptions' base)
        return value
    opts = cls()
    if isinstance(value, datetime.timedelta):
        opts.timeout = value
        return opts
    if hasattr(opts, "reduceOp") and isinstance(value, (dist.ReduceOp, _RED)):
        opts.reduceOp = value if isinstance(value, dist.ReduceOp) else dist.ReduceOp(value)
        return opts
    raise TypeError(f"ringcc: expected {cls.__name__}, got {type(value).__name__}")


def _split_counts(t: torch.Tensor, splits: List[int], n: int, what: str) -> List[int]:
    """Per-rank element counts from torch's row splits (empty: equal rows)."""
    rows = t.shape[0] if t.dim() > 0 else t.numel()
    per_row = t.numel() // rows if rows else 0
    if not splits:
        if rows % n:
            raise ValueError(f"ringcc all_to_all_single: {what} has {rows} rows, not divisible by {n} ranks")
        splits = [rows // n] * n
    if len(splits) != n or any(int(s) < 0 for s in splits) or sum(int(s) for s in splits) != rows:
        raise ValueError(f"ringcc all_to_all_single: {what} split sizes {splits} do not cover {rows} rows "
                         f"in {n} parts")
    return [int(s) * per_row for s in splits]


# ---------------------------------------------------------------------- registration
def _create_process_group(store: Any, rank: int, world_size: int, timeout: Any) -> RingccProcessGroup:
    return RingccProcessGroup(store, rank, world_size, timeout)


_register_lock = threading.Lock()


def register() -> None:
    """Make ``"ringcc"`` a torch.distributed backend for CPU tensors. Idempotent; CPU
    tensors of groups created without naming a backend keep going to gloo."""
    with _register_lock:
        if BACKEND_NAME.upper() in getattr(dist.Backend, "_plugins", {}):
            return
        dist.Backend.register_backend(BACKEND_NAME, _create_process_group, extended_api=False, devices=["cpu"])


__all__ = ["register", "RingccProcessGroup", "RingccWork", "BACKEND_NAME"]
