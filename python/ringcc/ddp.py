"""ringcc.DistributedDataParallel: data-parallel training with bucketed, overlapped,
optionally compressed gradient averaging.

    import ringcc, torch.distributed as dist
    dist.init_process_group("ringcc")
    model = ringcc.DistributedDataParallel(model, bucket_cap_mb=25, compression="bf16")
    loss_fn(model(x), y).backward()     # gradients arrive averaged over the ranks
    optimizer.step()

Written from scratch (not a subclass of torch's DDP); see docs/architecture.md for the
design: buckets in reverse registration order, rebuilt once from the order gradients
arrived in; a post-accumulate-grad hook per parameter packs a bucket when its last
gradient is in and starts its allreduce while backward goes on; a callback at the end
of backward waits for the buckets in order and writes the averages into ``p.grad``.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import time
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from . import hooks as _hooks
from . import kernels as _kernels
from .timeline import Timeline

_MB = 1024 * 1024


def _pack(tensors: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy ``tensors`` end to end into 1-D ``flat``: one native call."""
    _kernels.pack(tensors, out=flat)


# --------------------------------------------------------------------------- strategy
class RingStrategy:
    """Average a bucket over all ranks of the group with one allreduce (ringcc's ring on
    a ringcc group, the group's own allreduce otherwise), or with ringcc's native
    compressed allreduce when ``compression`` is "fp16"/"bf16".

    The seam for other strategies: ``allreduce_bucket(flat, bucket_index)`` starts the
    averaging of ``flat`` in place and returns an object with ``wait()`` and
    ``get_future()`` (a torch Work); it is called in the same bucket order on every rank.
    Optionally ``state_dict()`` / ``load_state_dict(state, bucket_sizes)`` carry state
    that checkpoints must keep (here: error-feedback residuals).
    """

    name = "ring"

    def __init__(self, group: Any, compression: Optional[str] = None, error_feedback: bool = False):
        self.group = group
        self.compression = compression
        self.error_feedback = error_feedback
        self._residuals: Dict[int, torch.Tensor] = {}

    def allreduce_bucket(self, flat: torch.Tensor, bucket_index: int) -> Any:
        if self.compression is None:
            return dist.all_reduce(flat, op=dist.ReduceOp.AVG, group=self.group, async_op=True)
        if self.error_feedback:
            r = self._residuals.get(bucket_index)
            if r is None or r.numel() != flat.numel():  # new bucket layout after the rebuild
                r = self._residuals[bucket_index] = torch.zeros_like(flat)
            _hooks.error_feedback_(flat, r, self.compression)
        return self.group.allreduce_compressed(flat, self.compression, op="avg", async_op=True)

    def state_dict(self) -> Dict[str, Any]:
        """This rank's error-feedback residuals, by bucket index."""
        return {"residuals": {k: r.detach().clone() for k, r in self._residuals.items()}}

    def load_state_dict(self, state: Dict[str, Any], bucket_sizes: Sequence[int]) -> None:
        for k, r in state.get("residuals", {}).items():
            k = int(k)
            if k >= len(bucket_sizes) or r.numel() != bucket_sizes[k]:
                raise ValueError(f"ringcc.DistributedDataParallel: the saved residual of bucket {k} has {r.numel()} "
                                 f"elements, which does not fit the bucket plan (same bucket_cap_mb and "
                                 f"first_bucket_mb as when it was saved?)")
            self._residuals[k] = r.detach().clone().to(torch.float32)


def make_strategy(strategy: Any, group: Any, compression: Optional[str], error_feedback: bool,
                  ps_options: Optional[Dict[str, Any]] = None, ring_timeout: float = 60.0) -> Any:
    """The strategy object for ``strategy`` ("ring", "ps", "auto", or an object with
    allreduce_bucket)."""
    if not isinstance(strategy, str):
        if not callable(getattr(strategy, "allreduce_bucket", None)):
            raise TypeError("ringcc.DistributedDataParallel: strategy must be 'ring', 'ps', 'auto' or an object "
                            "with allreduce_bucket(flat, bucket_index)")
        return strategy
    if strategy == "ring":
        return RingStrategy(group, compression, error_feedback)
    if strategy in ("ps", "auto"):
        from . import ps_strategy  # the parameter-server pieces load only when asked for

        options = ps_strategy.PsOptions.from_user(ps_options)
        if strategy == "auto":
            return ps_strategy.auto_strategy(group, compression, error_feedback, options, ring_timeout)
        if error_feedback:
            raise ValueError("ringcc.DistributedDataParallel: error_feedback is not supported with strategy='ps'")
        return ps_strategy.PsStrategy(group, compression, options)
    raise ValueError(f"ringcc.DistributedDataParallel: unknown strategy {strategy!r} (expected 'ring', 'ps' or "
                     f"'auto')")


class _BusyClock:
    """Seconds during which at least one bucket exchange was in flight: the union of
    their lifetimes, launch to completion (completions arrive on settler threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0
        self._since = 0.0
        self.total = 0.0

    def start(self) -> None:
        with self._lock:
            if self._in_flight == 0:
                self._since = time.perf_counter()
            self._in_flight += 1

    def stop(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if self._in_flight == 0:
                self.total += time.perf_counter() - self._since

    def seconds(self) -> float:
        with self._lock:
            return self.total


# ---------------------------------------------------------------------------- buckets
class _Bucket:
    """Parameters reduced together, with their flat fusion buffer."""

    def __init__(self, index: int, params: List[int], tensors: Sequence[torch.Tensor]):
        self.index = index
        self.params = params  # indices into DistributedDataParallel._params
        self.shapes = [tensors[i].shape for i in params]
        self.numels = [tensors[i].numel() for i in params]
        self.offsets = [0]
        for n in self.numels[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        first = tensors[params[0]]
        self.flat = torch.empty(sum(self.numels), dtype=first.dtype, device=first.device)
        self.pending = len(params)  # gradients still to arrive this step
        self.work: Any = None  # strategy Work, or
        self.future: Optional[torch.futures.Future] = None  # a comm hook's future
        self.timed: Optional[torch.futures.Future] = None  # completion recorded (busy clock, timeline)

    def views(self) -> List[torch.Tensor]:
        return [self.flat[o:o + n].view(s) for o, n, s in zip(self.offsets, self.numels, self.shapes)]


class GradBucket:
    """What a ringcc comm hook gets: one bucket (method names as torch's dist.GradBucket).

    ``buffer()`` is the flat fusion buffer holding the bucket's packed gradients; the
    hook returns a Future whose value is the averaged buffer (or a tensor/list of one
    tensor of the same size, which is copied into it)."""

    def __init__(self, ddp: "DistributedDataParallel", bucket: _Bucket):
        self._ddp = ddp
        self._bucket = bucket

    def buffer(self) -> torch.Tensor:
        return self._bucket.flat

    def index(self) -> int:
        return self._bucket.index

    def parameters(self) -> List[torch.Tensor]:
        return [self._ddp._params[i] for i in self._bucket.params]

    def gradients(self) -> List[torch.Tensor]:
        """The bucket's gradients as views of ``buffer()`` shaped like the parameters."""
        return self._bucket.views()

    def is_last(self) -> bool:
        return self._bucket.index == len(self._ddp._buckets) - 1


def _assign_buckets(order: Sequence[int], tensors: Sequence[torch.Tensor], first_cap: int, cap: int) -> List[List[int]]:
    """Split ``order`` into consecutive groups under the byte caps (the first group under
    ``first_cap``), never mixing dtype or device; a parameter larger than the cap gets a
    bucket of its own."""
    buckets: List[List[int]] = []
    current: List[int] = []
    size = 0
    limit = first_cap
    for i in order:
        t = tensors[i]
        nbytes = t.numel() * t.element_size()
        if current:
            head = tensors[current[0]]
            if head.dtype != t.dtype or head.device != t.device or size + nbytes > limit:
                buckets.append(current)
                current, size, limit = [], 0, cap
        current.append(i)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


def _params_reached(outputs: Any) -> set:
    """ids of the leaf tensors whose AccumulateGrad nodes autograd reaches from the
    tensors in ``outputs`` (nested lists/tuples/dicts)."""
    roots, stack = [], [outputs]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            if obj.grad_fn is not None:
                roots.append(obj.grad_fn)
            elif obj.requires_grad:  # the output is itself a parameter
                roots.append(obj)
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
    reached, seen, nodes = set(), set(), []
    for r in roots:
        if isinstance(r, torch.Tensor):
            reached.add(id(r))
        else:
            nodes.append(r)
    while nodes:
        node = nodes.pop()
        if node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)  # AccumulateGrad
        if var is not None:
            reached.add(id(var))
        for nxt, _ in node.next_functions:
            if nxt is not None:
                nodes.append(nxt)
    return reached


# ---------------------------------------------------------------------------- wrapper
class DistributedDataParallel(nn.Module):
    """Data parallelism over a process group: every rank holds the whole ``module``,
    feeds it its own batch, and after ``backward()`` every ``p.grad`` holds the average
    of the ranks' gradients (op AVG), so any optimizer then takes identical steps.

    Args:
        module: the model; all parameters on one device type (CPU for now).
        bucket_cap_mb: size cap of a gradient bucket (one allreduce each).
        first_bucket_mb: cap of the first bucket, smaller so that communication starts
            early in backward.
        compression: None, "fp16" or "bf16": reduce float32 buckets with ringcc's
            native block-scaled compressed allreduce (needs a ringcc group).
        error_feedback: with compression, carry each bucket's rounding error into the
            next step (a residual per bucket).
        strategy: "ring" (an allreduce of each bucket); "ps" (each bucket goes through
            ringcc's parameter servers, see ``ps_options``); "auto" (the ring if every
            pair of ranks connects within ``ring_timeout`` seconds, else the parameter
            server, sync and co-located; the failed ranks and errors are logged on
            logger "ringcc"; on a non-ringcc default group such as gloo it forms a ringcc
            group of its own); or an object with ``allreduce_bucket(flat, bucket_index)``.
        ps_options: for "ps"/"auto", a dict of ringcc.ps_strategy.PsOptions: ``mode``
            "sync" (default: gradients averaged, results as with the ring) or "async";
            ``num_servers`` co-located servers on ranks 0.. (default 1), or
            ``dedicated_servers=N`` when N ``ringcc ps-server`` processes serve the job
            (found through the default group's TCPStore; start order does not matter);
            async: ``lr``, ``momentum``, ``weight_decay``, ``staleness``; ``timeout``,
            ``shutdown_timeout``, ``store``.
            Async mode: the servers hold the parameters and run SGD; each backward
            pushes the gradients and the wrapper copies the fresh parameters into the
            module. Do not call ``optimizer.step()`` (pass none or a no-op one); call
            ``zero_grad()`` each step as usual (``p.grad`` keeps this rank's local
            gradient). Buckets are not rebuilt, buffers are broadcast only at wrap, and
            find_unused_parameters is refused: nothing per step waits for other ranks,
            so a worker that dies does not stop the others. Close with ``close()``.
        ring_timeout: seconds "auto" gives the ring to connect.
        process_group: the group (default: the default group). Any backend works
            without compression.
        broadcast_buffers: broadcast the module's buffers from rank 0 before each
            synchronised forward (as torch DDP does); they are broadcast at wrap always.
        find_unused_parameters: after each forward, find the parameters the outputs do
            not depend on and treat them as ready (contributing zeros or their
            accumulated gradient). A parameter no rank used keeps ``p.grad`` as it was
            (None after ``zero_grad()``), like torch DDP; one used by some rank gets the
            average. An extra small allreduce per step tells which.
        gradient_as_bucket_view: only False (gradients are copied out of the buckets).
        comm_hook: a hook, or a (state, hook) pair, as for ``register_comm_hook``.

    ``state_dict()`` keys carry the ``module.`` prefix, like torch DDP's, so checkpoints
    load into either wrapper; ``self.module.state_dict()`` has the bare keys.

    Set ``RINGCC_TIMELINE=/path/prefix`` before wrapping to get a Chrome trace per rank
    (see ringcc.timeline).
    """

    def __init__(self, module: nn.Module, *, bucket_cap_mb: float = 25, first_bucket_mb: float = 1,
                 compression: Optional[str] = None, error_feedback: bool = False, strategy: Any = "ring",
                 process_group: Any = None, broadcast_buffers: bool = True, find_unused_parameters: bool = False,
                 gradient_as_bucket_view: bool = False, comm_hook: Any = None,
                 ps_options: Optional[Dict[str, Any]] = None, ring_timeout: float = 60.0):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("ringcc.DistributedDataParallel: call torch.distributed.init_process_group first")
        if gradient_as_bucket_view:
            raise NotImplementedError("ringcc.DistributedDataParallel: gradient_as_bucket_view=True is not supported")
        if compression is not None:
            _hooks.wire_dtype(compression)  # validates the name
        if error_feedback and compression is None:
            raise ValueError("ringcc.DistributedDataParallel: error_feedback=True needs compression='fp16' or 'bf16'")
        if bucket_cap_mb <= 0 or first_bucket_mb <= 0:
            raise ValueError("ringcc.DistributedDataParallel: bucket_cap_mb and first_bucket_mb must be positive")
        self.module = module
        group = process_group if process_group is not None else dist.distributed_c10d._get_default_group()
        self.process_group = group
        self.rank = group.rank()
        self.world_size = group.size()
        self.broadcast_buffers = broadcast_buffers
        self.find_unused_parameters = find_unused_parameters
        self.compression = compression

        named = list(module.named_parameters())
        self._check_devices(named, list(module.named_buffers()))
        if compression is not None:
            # "ps" sends 16-bit values itself; "auto" forms a ringcc group of its own.
            if strategy not in ("ps", "auto") and not _hooks.is_ringcc_group(group):
                raise ValueError(f"ringcc.DistributedDataParallel: compression={compression!r} needs a ringcc process "
                                 f"group (dist.init_process_group('ringcc') or dist.new_group(backend='ringcc')); "
                                 f"got {type(group).__name__}")
            bad = [n for n, p in named if p.requires_grad and p.dtype != torch.float32]
            if bad:
                raise ValueError(f"ringcc.DistributedDataParallel: compression handles float32 gradients only; "
                                 f"not float32: {', '.join(bad)}")
        if isinstance(strategy, str) and strategy in ("ps", "auto"):
            bad = [n for n, p in named if p.requires_grad and p.dtype != torch.float32]
            if bad:  # "auto" may fall back to the servers
                raise ValueError(f"ringcc.DistributedDataParallel: the parameter servers hold float32 tensors "
                                 f"only; not float32: {', '.join(bad)}")
            if find_unused_parameters and (ps_options or {}).get("mode") == "async":
                raise ValueError("ringcc.DistributedDataParallel: find_unused_parameters needs a collective per "
                                 "step, which async parameter-server mode does without")
        # Made first: a refused strategy must fail before any wrap-time collective.
        self._strategy = make_strategy(strategy, group, compression, error_feedback, ps_options, ring_timeout)
        # Async parameter server: what comes back is parameters, and nothing per step may
        # wait for the other ranks.
        self._holds_parameters = bool(getattr(self._strategy, "holds_parameters", False))
        self._verify_same_model()
        self._broadcast_state(include_params=True)

        self._names = [n for n, p in named if p.requires_grad]
        self._params = [p for _, p in named if p.requires_grad]
        self._bucket_cap = int(bucket_cap_mb * _MB)
        self._first_cap = int(first_bucket_mb * _MB)
        reverse = list(range(len(self._params)))[::-1]  # gradients tend to arrive in this order
        self._build_buckets(reverse)
        self.buckets_rebuilt = False
        if self._holds_parameters:
            self.buckets_rebuilt = True  # the servers keep state per bucket: keep this layout
            self._strategy.init_parameters([[self._params[i] for i in b.params] for b in self._buckets])

        self._hook: Optional[Tuple[Any, Callable[..., Any]]] = None
        if comm_hook is not None:
            state, fn = comm_hook if isinstance(comm_hook, tuple) else (None, comm_hook)
            self.register_comm_hook(state, fn)

        self._sync_enabled = True  # False inside no_sync()
        self._sync_this_step = True  # decided at forward, like torch DDP
        self._unused: List[int] = []  # find_unused_parameters: no gradient expected this step
        self._step = 0  # synchronised backward passes finished
        self._reset_iteration()

        self._busy = _BusyClock()
        self._timeline = Timeline.from_env(self.rank)
        if self._timeline is not None:
            atexit.register(self._timeline.flush)

        me = weakref.ref(self)  # the hooks must not keep a dropped wrapper alive

        def make_hook(i: int) -> Callable[[torch.Tensor], None]:
            def hook(_param: torch.Tensor) -> None:
                ddp = me()
                if ddp is not None:
                    ddp._on_grad(i)
            return hook

        self._handles = [p.register_post_accumulate_grad_hook(make_hook(i)) for i, p in enumerate(self._params)]

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _check_devices(named: List[Tuple[str, torch.Tensor]], buffers: List[Tuple[str, torch.Tensor]]) -> None:
        kinds = {t.device.type for _, t in named + buffers}
        if len(kinds) > 1:
            raise ValueError(f"ringcc.DistributedDataParallel: parameters and buffers must be on one device type, "
                             f"found {sorted(kinds)}")
        if kinds and kinds != {"cpu"}:
            raise NotImplementedError(f"ringcc.DistributedDataParallel: only CPU modules for now, got {kinds.pop()}")

    def _verify_same_model(self) -> None:
        """Every rank must hold the same parameter/buffer names, shapes and dtypes; the
        error (raised on every rank) names the first rank and tensor that differ."""
        mine = [("parameter", n, tuple(p.shape), str(p.dtype), p.requires_grad)
                for n, p in self.module.named_parameters()]
        mine += [("buffer", n, tuple(b.shape), str(b.dtype), False) for n, b in self.module.named_buffers()]
        everyone: List[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.process_group)
        ref = everyone[0]
        for r, theirs in enumerate(everyone[1:], start=1):
            for a, b in zip(ref, theirs):
                if a != b:
                    raise ValueError(
                        f"ringcc.DistributedDataParallel: rank {r}'s {b[0]} {b[1]!r} is {b[2]} {b[3]}"
                        f"{'' if b[4] or b[0] == 'buffer' else ' (no grad)'}, but rank 0 has {a[0]} {a[1]!r} "
                        f"{a[2]} {a[3]}{'' if a[4] or a[0] == 'buffer' else ' (no grad)'}; every rank must wrap "
                        f"the same model")
            if len(ref) != len(theirs):
                longer, rk = (ref, 0) if len(ref) > len(theirs) else (theirs, r)
                extra = longer[min(len(ref), len(theirs))]
                raise ValueError(f"ringcc.DistributedDataParallel: rank {r} has {len(theirs)} parameters and buffers, "
                                 f"rank 0 has {len(ref)}; first extra one on rank {rk}: {extra[0]} {extra[1]!r}")

    def _broadcast_state(self, include_params: bool) -> None:
        """Rank 0's parameters (if asked) and buffers on every rank: one broadcast per
        dtype of all of them flattened together."""
        tensors = [p.detach() for p in self.module.parameters()] if include_params else []
        tensors += [b for b in self.module.buffers()]
        by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
        for t in tensors:
            if t.numel():
                by_dtype.setdefault(t.dtype, []).append(t)
        with torch.no_grad():
            for group in by_dtype.values():
                flat = torch.cat([t.reshape(-1) for t in group])
                dist.broadcast(flat, group=self.process_group, group_src=0)
                if self.rank != 0:
                    offset = 0
                    for t in group:
                        t.copy_(flat[offset:offset + t.numel()].view_as(t))
                        offset += t.numel()

    def _build_buckets(self, order: Sequence[int]) -> None:
        groups = _assign_buckets(order, self._params, self._first_cap, self._bucket_cap)
        self._buckets = [_Bucket(k, g, self._params) for k, g in enumerate(groups)]
        self._where = {}  # parameter index -> bucket
        for b in self._buckets:
            for i in b.params:
                self._where[i] = b

    def comm_stats(self) -> Dict[str, float]:
        """Cumulative ``comm_s``: seconds during which some bucket exchange of this rank
        was in flight (overlapped with backward or not). ringcc.Trainer subtracts the
        exposed part to report the overlapped communication."""
        return {"comm_s": self._busy.seconds(), "steps": self._step}

    # ------------------------------------------------------------------ checkpoints
    def comm_state_dict(self) -> Dict[str, Any]:
        """What a checkpoint needs, besides the model and optimizer, for a resumed run to
        continue bit for bit: the bucket plan (it decides where compression blocks fall
        and the order of the reductions) and this rank's error-feedback residuals.
        Per rank: residuals differ between ranks."""
        strategy = getattr(self._strategy, "state_dict", None)
        return {
            "bucket_order": [self._names[i] for b in self._buckets for i in b.params],
            "buckets_rebuilt": self.buckets_rebuilt,
            "strategy": strategy() if strategy is not None else {},
        }

    def load_comm_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what ``comm_state_dict()`` saved (same model, same bucket caps)."""
        where = {n: i for i, n in enumerate(self._names)}
        names = list(state["bucket_order"])
        if sorted(names) != sorted(self._names):
            missing = sorted(set(self._names) - set(names))
            extra = sorted(set(names) - set(self._names))
            raise ValueError(f"ringcc.DistributedDataParallel.load_comm_state_dict: rank {self.rank}: the saved "
                             f"bucket plan is for other parameters (missing {missing}, unknown {extra})")
        self._build_buckets([where[n] for n in names])
        self.buckets_rebuilt = bool(state["buckets_rebuilt"])
        saved = state.get("strategy") or {}
        if saved:
            load = getattr(self._strategy, "load_state_dict", None)
            if load is None:
                raise ValueError("ringcc.DistributedDataParallel.load_comm_state_dict: the checkpoint holds strategy "
                                 "state but this wrapper's strategy keeps none")
            load(saved, [b.flat.numel() for b in self._buckets])

    # ------------------------------------------------------------------ public API
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._active:
            self._abandon_iteration()
        grad = torch.is_grad_enabled()
        self._sync_this_step = self._sync_enabled
        if grad and self._sync_enabled and self.broadcast_buffers and self.world_size > 1 \
                and not self._holds_parameters:
            self._broadcast_state(include_params=False)
        out = self.module(*args, **kwargs)
        if grad and self._sync_enabled and self.find_unused_parameters:
            reached = _params_reached(out)
            self._unused = [i for i, p in enumerate(self._params) if id(p) not in reached]
        return out

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Gradient accumulation: backward passes of forwards run inside this context
        do no communication; gradients add up in ``p.grad`` and the next synchronised
        backward averages the sums."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def register_comm_hook(self, state: Any, hook: Callable[[Any, GradBucket], torch.futures.Future]) -> None:
        """Replace the bucket allreduce by ``hook(state, bucket) -> Future[Tensor]``
        (``bucket`` is a GradBucket; the future's value is the averaged buffer). Once,
        before the first backward; not together with ``compression``."""
        if self._hook is not None:
            raise RuntimeError("ringcc.DistributedDataParallel: a comm hook is already registered")
        if self.compression is not None:
            raise RuntimeError("ringcc.DistributedDataParallel: compression and a comm hook both replace the bucket "
                               "allreduce; use one of them")
        if getattr(self, "_step", 0) or getattr(self, "_active", False):
            raise RuntimeError("ringcc.DistributedDataParallel: register the comm hook before the first backward")
        if not callable(hook):
            raise TypeError("ringcc.DistributedDataParallel: hook must be callable")
        if getattr(self, "_holds_parameters", False):
            raise RuntimeError("ringcc.DistributedDataParallel: async parameter-server mode takes no comm hook")
        self._hook = (state, hook)

    def bucket_parameter_names(self) -> List[List[str]]:
        """The parameter names of each bucket, in launch order."""
        return [[self._names[i] for i in b.params] for b in self._buckets]

    def close(self) -> None:
        """Remove the gradient hooks, flush the timeline and close the strategy (the
        parameter-server strategy says goodbye to the servers; a co-located server
        serves until every worker has). The wrapper stops syncing."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._timeline is not None:
            self._timeline.flush()
        close = getattr(self._strategy, "close", None)
        if close is not None:
            close()

    # ------------------------------------------------------------------ per step
    def _reset_iteration(self) -> None:
        self._active = False  # a synchronised backward is under way
        self._ready = [False] * len(self._params)
        self._arrived: List[int] = []
        self._next_launch = 0
        self._bw_start = 0.0
        self._unused = []  # set again by the next forward
        for b in self._buckets:
            b.pending = len(b.params)
            b.work = b.future = b.timed = None

    def _on_grad(self, i: int) -> None:
        """Post-accumulate-grad hook of parameter ``i``."""
        if not self._sync_this_step:
            return
        if not self._active:
            self._begin_backward()
        if self._ready[i]:
            raise RuntimeError(f"ringcc.DistributedDataParallel: parameter {self._names[i]!r} got a gradient twice in "
                               f"one backward (or after find_unused_parameters marked it unused: its gradient came "
                               f"from a path the forward outputs do not lead to)")
        self._arrived.append(i)
        self._mark_ready(i)

    def _begin_backward(self) -> None:
        self._active = True
        if self._timeline is not None:
            self._bw_start = self._timeline.now()
        torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
        for i in self._unused:  # they will get no gradient this step
            self._mark_ready(i)

    def _mark_ready(self, i: int) -> None:
        self._ready[i] = True
        bucket = self._where[i]
        bucket.pending -= 1
        if bucket.pending == 0:
            # Launch in bucket order on every rank: a later bucket that completes first
            # waits until the earlier ones are launched.
            while self._next_launch < len(self._buckets) and self._buckets[self._next_launch].pending == 0:
                self._launch(self._buckets[self._next_launch])
                self._next_launch += 1

    def _launch(self, b: _Bucket) -> None:
        tl = self._timeline
        t0 = tl.now() if tl is not None else 0.0
        t1 = t0
        grads = []
        for i in b.params:
            g = self._params[i].grad
            grads.append(g if g is not None else torch.zeros_like(self._params[i]))  # unused: zeros
        _pack(grads, b.flat)
        if tl is not None:
            t1 = tl.now()
            tl.complete("pack", t0, t1, bucket=b.index, step=self._step)
        busy = self._busy
        busy.start()
        if self._hook is not None:
            state, hook = self._hook
            b.future = hook(state, GradBucket(self, b))
            fut = b.future
        else:
            b.work = self._strategy.allreduce_bucket(b.flat, b.index)
            fut = b.work.get_future()
        step, index = self._step, b.index

        def done(_fut: torch.futures.Future) -> None:
            # Completion time from the future's callback, not from our later wait().
            busy.stop()
            if tl is not None:
                tl.complete("allreduce", t1, tl.now(), bucket=index, step=step)
        b.timed = fut.then(done)

    def _finish_backward(self) -> None:
        """End of backward (autograd engine callback): wait for the buckets in order,
        write the averages into p.grad, rebuild the buckets after the first step."""
        tl = self._timeline
        t_end = tl.now() if tl is not None else 0.0
        try:
            if self._next_launch < len(self._buckets):
                for b in self._buckets[:self._next_launch]:  # leave no collective in flight
                    self._wait(b)
                missing = [self._names[i] for i, ready in enumerate(self._ready) if not ready]
                raise RuntimeError(
                    f"ringcc.DistributedDataParallel: backward finished on rank {self.rank} but these parameters got "
                    f"no gradient: {', '.join(missing)}. Their buckets were not reduced. If some parameters are not "
                    f"used in every forward pass, wrap the model with find_unused_parameters=True; otherwise make "
                    f"sure every output of forward contributes to the loss.")
            used = None
            if self.find_unused_parameters:
                # Which parameters some rank has a gradient for; the others keep p.grad.
                local = torch.tensor([float(p.grad is not None) for p in self._params])
                dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self.process_group)
                used = local
            for b in self._buckets:
                self._wait(b)
                t0 = tl.now() if tl is not None else 0.0
                if self._holds_parameters:
                    self._unpack_parameters(b)
                else:
                    self._unpack(b, used)
                if tl is not None:
                    tl.complete("unpack", t0, tl.now(), bucket=b.index, step=self._step)
            if not self.buckets_rebuilt:
                self._rebuild()
            if tl is not None:
                tl.complete("backward", self._bw_start, t_end, step=self._step)
                tl.flush()
            self._step += 1
        finally:
            self._reset_iteration()

    def _abandon_iteration(self) -> None:
        """A backward that raised part-way never reaches the engine callback: finish
        the allreduces it launched (every rank launched the same ones if they all
        failed alike) and start the next step clean. Its gradients are left as they are."""
        try:
            for b in self._buckets[:self._next_launch]:
                self._wait(b)
        finally:
            self._reset_iteration()

    def _wait(self, b: _Bucket) -> None:
        if b.work is not None:
            b.work.wait()
        elif b.future is not None:
            _hooks._value_into(b.flat, b.future.wait())
        if b.timed is not None:
            b.timed.wait()

    def _unpack(self, b: _Bucket, used: Optional[torch.Tensor]) -> None:
        dsts, srcs = [], []
        with torch.no_grad():
            for i, view in zip(b.params, b.views()):
                if used is not None and not used[i]:
                    continue  # no rank had a gradient: leave p.grad as it is
                p = self._params[i]
                if p.grad is None:
                    p.grad = view.clone()
                else:
                    dsts.append(p.grad)
                    srcs.append(view)
            if dsts:
                torch._foreach_copy_(dsts, srcs)

    def _unpack_parameters(self, b: _Bucket) -> None:
        """Async parameter server: the bucket holds the servers' fresh parameters."""
        with torch.no_grad():
            torch._foreach_copy_([self._params[i] for i in b.params], b.views())

    def _rebuild(self) -> None:
        """Re-bucket once in the order rank 0's gradients arrived in (broadcast, so every
        rank builds the same buckets); parameters that got no gradient go last."""
        seen = set(self._arrived)
        order = self._arrived + [i for i in range(len(self._params) - 1, -1, -1) if i not in seen]
        t = torch.tensor(order, dtype=torch.int64)
        dist.broadcast(t, group=self.process_group, group_src=0)
        self.rebuilt_order = [self._names[i] for i in t.tolist()]
        self._build_buckets(t.tolist())
        self.buckets_rebuilt = True


__all__ = ["DistributedDataParallel", "GradBucket", "RingStrategy", "make_strategy"]
