"""Parameter-server strategies of ringcc.DistributedDataParallel: strategy="ps" and
strategy="auto" (the ring, or the parameter server when the ring cannot be formed).

    ddp = ringcc.DistributedDataParallel(model, strategy="ps")                   # sync
    ddp = ringcc.DistributedDataParallel(model, strategy="ps",
                                         ps_options=dict(mode="async", lr=0.05, momentum=0.9))
    ddp = ringcc.DistributedDataParallel(model, strategy="auto", ring_timeout=30)

Each bucket is one parameter-server tensor, named after the wrapper, the bucket index
and its size (the buckets change once, at the rebuild; a new layout gets new names,
registered on first use). Sync mode: a push returns the average over the workers, like
allreduce avg. Async mode: the servers hold the parameters and the optimizer; a push
applies SGD there and returns the fresh parameters, which the wrapper copies into the
module (see DistributedDataParallel's docstring).

Servers are co-located (ranks 0..num_servers-1 each run one in a background thread)
unless ``dedicated_servers`` says how many ``ringcc ps-server`` processes serve the job;
either way clients find them through the job's store, so start order does not matter.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import logging
import queue
import threading
import weakref
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from . import ps as _ps
from ._store import StoreClient

log = logging.getLogger("ringcc")

# Wrappers built in the same order on every rank get the same number: it keeps the store
# keys and tensor names of two wrappers apart without any communication.
_instances = itertools.count()


@dataclasses.dataclass
class PsOptions:
    """``ps_options`` of DistributedDataParallel (a dict with these keys)."""

    mode: str = "sync"  # "sync" (average, like allreduce) or "async" (server-side SGD)
    num_servers: int = 1  # co-located servers, on ranks 0..num_servers-1
    dedicated_servers: int = 0  # > 0: that many `ringcc ps-server` processes; none started here
    lr: float = 0.01  # async, co-located: SGD on the server (dedicated: the server's own flags)
    momentum: float = 0.0
    weight_decay: float = 0.0
    staleness: int = 0  # async: how many updates a push may lag before it is refused
    timeout: float = 300.0  # a sync round / a request waits this long for the others
    shutdown_timeout: float = 60.0  # close(): a co-located server waits this long for every worker's goodbye
    store: Any = None  # default: the default group's store (dedicated servers: its root TCPStore)

    @classmethod
    def from_user(cls, options: Optional[Dict[str, Any]]) -> "PsOptions":
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"ringcc.DistributedDataParallel: unknown ps_options {unknown} "
                            f"(known: {', '.join(sorted(known))})")
        opts = cls(**options)
        if opts.mode not in ("sync", "async"):
            raise ValueError(f"ringcc.DistributedDataParallel: ps_options mode must be 'sync' or 'async', "
                             f"got {opts.mode!r}")
        if opts.dedicated_servers < 0 or opts.num_servers < 1:
            raise ValueError("ringcc.DistributedDataParallel: ps_options num_servers must be >= 1 and "
                             "dedicated_servers >= 0")
        return opts


def _root_store(store: Any) -> Any:
    """The store under torch's PrefixStores: where `ringcc ps-server` (which joins the
    TCPStore at MASTER_ADDR:MASTER_PORT) publishes its address."""
    for _ in range(64):
        inner = getattr(store, "underlying_store", None)
        if inner is None:
            break
        store = inner
    return store


class _BucketWork:
    """What allreduce_bucket returns: wait() and get_future() (value [flat]), completed
    by the strategy's settler thread so the caller never blocks."""

    def __init__(self, flat: torch.Tensor):
        self.future: torch.futures.Future = torch.futures.Future()
        self.flat = flat

    def wait(self, timeout: Any = None) -> bool:
        self.future.wait()  # raises the push's error
        return True

    def get_future(self) -> torch.futures.Future:
        return self.future


class PsStrategy:
    """Average (sync) or apply (async) each bucket through the parameter servers.

    In async mode ``holds_parameters`` is True: the value that comes back in a bucket is
    the fresh parameters, not an averaged gradient, and the layout must stay fixed (the
    servers keep momentum per bucket), so the wrapper copies it into the parameters and
    does not rebuild the buckets."""

    name = "ps"

    def __init__(self, group: Any, compression: Optional[str], options: PsOptions, instance: Optional[int] = None):
        self.options = options
        self.compression = compression
        self.mode = options.mode
        self.holds_parameters = options.mode == "async"
        self.rank = group.rank()
        self.world_size = group.size()
        self.instance = next(_instances) if instance is None else instance
        self.tag = f"ddp{self.instance}"
        self.stale_pushes = 0  # async: pushes refused as too stale (the bucket was pulled instead)
        self._servers: List[_ps.Server] = []
        self._names: Dict[tuple, str] = {}
        self._closed = False

        if options.dedicated_servers:
            # `ringcc ps-server` publishes under the default prefix of the job's root store.
            store = options.store
            if store is None:
                store = _root_store(dist.distributed_c10d._get_default_store())
            prefix = _ps.DEFAULT_PREFIX
            num_servers = options.dedicated_servers
        else:
            store = options.store if options.store is not None else dist.distributed_c10d._get_default_store()
            prefix = f"ringcc/{self.tag}/ps/"
            num_servers = min(options.num_servers, self.world_size)
            if self.rank < num_servers:
                self._servers.append(_ps.Server(
                    store, self.rank, num_servers, self.world_size, options.mode, lr=options.lr,
                    momentum=options.momentum, weight_decay=options.weight_decay, staleness=options.staleness,
                    timeout=options.timeout, prefix=prefix).start())
        self.num_servers = num_servers
        self._store, self._prefix = store, prefix
        self.client = _ps.Client(store, self.rank, self.world_size, num_servers, timeout=options.timeout,
                                 prefix=prefix)

        # Buckets complete in launch order, so one thread waiting on them in that order
        # settles every future without blocking the backward pass.
        self._queue: "queue.Queue[Any]" = queue.Queue()
        self._thread = threading.Thread(target=self._settle, name=f"ringcc-ps-{self.tag}", daemon=True)
        self._thread.start()
        me = weakref.ref(self)
        atexit.register(lambda: me() is not None and me().close())

    # ------------------------------------------------------------------ buckets
    def _name(self, bucket_index: int, numel: int) -> str:
        """The tensor name of a bucket layout, registered with the servers on first use."""
        key = (bucket_index, numel)
        name = self._names.get(key)
        if name is None:
            name = f"{self.tag}/bucket{bucket_index}/{numel}"
            self.client.register(name, numel)
            self._names[key] = name
        return name

    def init_parameters(self, buckets: Sequence[Sequence[torch.Tensor]]) -> None:
        """Async mode, at wrap: register every bucket; rank 0 sets the servers'
        parameters to its own (every rank holds them after the wrap's broadcast), and the
        others wait until it has, so that no push reaches a zero-initialised key."""
        for k, params in enumerate(buckets):
            flat = torch.cat([p.detach().reshape(-1).float() for p in params])
            name = self._name(k, flat.numel())
            if self.rank == 0:
                self.client.init(name, flat)
        ready = StoreClient(self._store, self._prefix, self.options.timeout)
        if self.rank == 0:
            ready.set(f"{self.tag}/initialised", "1")
        else:
            ready.get(f"{self.tag}/initialised")

    def allreduce_bucket(self, flat: torch.Tensor, bucket_index: int) -> _BucketWork:
        if self._closed:
            raise RuntimeError("ringcc.DistributedDataParallel: the parameter-server strategy is closed")
        name = self._name(bucket_index, flat.numel())
        work = _BucketWork(flat)
        pending = self.client.push_pull(name, flat, self.compression, async_op=True)
        self._queue.put((pending, work, name))
        return work

    def _settle(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            pending, work, name = item
            try:
                try:
                    pending.wait()
                except _ps.StaleError:
                    # Too far behind the others: the gradient is dropped and the bucket
                    # takes the servers' current parameters, so the next push is fresh.
                    self.stale_pushes += 1
                    self.client.pull(name, work.flat)
                work.future.set_result([work.flat])
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the bucket
                work.future.set_exception(exc)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Say goodbye to the servers; a co-located server then serves until every
        worker has said goodbye (at most shutdown_timeout seconds: a dead worker never
        will) and stops."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        try:
            self.client.shutdown()
        except Exception as exc:  # noqa: BLE001 - a server that is gone needs no goodbye
            log.warning("ringcc: rank %d: parameter-server goodbye failed: %s", self.rank, exc)
        self.client.close()
        for server in self._servers:
            try:
                if not server.wait(self.options.shutdown_timeout):
                    log.warning("ringcc: parameter server %d: not every worker said goodbye within %s s "
                                "(a worker died?); stopping it", server.index, self.options.shutdown_timeout)
            finally:
                server.stop()


# --------------------------------------------------------------------------- auto
def _ring_group(store: Any, rank: int, world: int, timeout: float) -> Any:
    from .torch_backend import RingccProcessGroup

    return RingccProcessGroup(store, rank, world, timeout=timeout)


def auto_strategy(group: Any, compression: Optional[str], error_feedback: bool, options: PsOptions,
                  ring_timeout: float) -> Any:
    """The ring if every pair of ranks can connect within ``ring_timeout`` seconds, else
    the parameter server (sync, co-located). Every rank publishes its attempt's outcome
    in the store and reads all of them, so all ranks take the same decision even though
    a failed pair shows up as different errors on different ranks."""
    from . import hooks as _hooks
    from .ddp import RingStrategy

    if _hooks.is_ringcc_group(group):  # the ring exists already
        return RingStrategy(group, compression, error_feedback)
    instance = next(_instances)
    rank, world = group.rank(), group.size()
    base = options.store if options.store is not None else dist.distributed_c10d._get_default_store()
    prefix = f"ringcc/ddp{instance}/auto/"
    ring, outcome = None, "ok"
    try:
        ring = _ring_group(dist.PrefixStore(prefix + "ring/", base), rank, world, ring_timeout)
    except Exception as exc:  # noqa: BLE001 - published, then decided on below
        outcome = f"{type(exc).__name__}: {exc}"
    outcomes = StoreClient(base, prefix, max(ring_timeout, options.timeout))
    outcomes.set(f"outcome/{rank}", outcome)
    everyone = [outcomes.get(f"outcome/{r}") for r in range(world)]
    failed = {r: text for r, text in enumerate(everyone) if text != "ok"}
    if not failed:
        return RingStrategy(ring, compression, error_feedback)
    if ring is not None:
        ring.abort()  # formed here, but not everywhere: leave it
    log.warning("ringcc: the ring could not be formed (the attempt failed on ranks %s); falling back to the parameter "
                "server (sync, co-located). %s", sorted(failed),
                "; ".join(f"rank {r}: {text}" for r, text in sorted(failed.items())))
    if error_feedback:
        raise ValueError("ringcc.DistributedDataParallel: the ring could not be formed and the parameter-server "
                         "fallback does not do error_feedback")
    return PsStrategy(group, compression, dataclasses.replace(options, mode="sync", dedicated_servers=0),
                      instance=instance)


__all__ = ["PsOptions", "PsStrategy", "auto_strategy"]
