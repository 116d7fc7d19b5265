"""ringcc.Communicator: collectives on NumPy arrays and CPU torch tensors."""

from __future__ import annotations

import atexit
import datetime
import ipaddress
import os
import socket
import weakref
from typing import Any, Optional, Sequence

from . import _buffers
from ._buffers import Buffer, as_buffer
from ._native import _C
from ._store import StoreClient, job_secret, join_generation

_C_OP = {
    "sum": _C.ReduceOp.sum,
    "avg": _C.ReduceOp.avg,
    "mean": _C.ReduceOp.avg,
    "prod": _C.ReduceOp.prod,
    "product": _C.ReduceOp.prod,
    "min": _C.ReduceOp.min,
    "max": _C.ReduceOp.max,
    "band": _C.ReduceOp.band,
    "bor": _C.ReduceOp.bor,
    "bxor": _C.ReduceOp.bxor,
}
_ALGORITHMS = {
    "auto": _C.Algorithm.auto,
    "ring": _C.Algorithm.ring,
    "recursive_doubling": _C.Algorithm.recursive_doubling,
}
_COMPRESSIONS = {None: _C.Compression.none, "none": _C.Compression.none, "fp16": _C.Compression.fp16,
                 "bf16": _C.Compression.bf16}
COLL = _C.Collective

_live: "weakref.WeakSet[Communicator]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # Say goodbye to peers before the interpreter goes away, so they do not mistake a
    # finished process for a dead one.
    for comm in list(_live):
        comm.close()


def _seconds(timeout: Any, what: str) -> float:
    if isinstance(timeout, datetime.timedelta):
        timeout = timeout.total_seconds()
    timeout = float(timeout)
    if not timeout > 0:
        raise ValueError(f"{what} must be positive, got {timeout}")
    return timeout


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number") from None


def _interface_address(ifname: str) -> str:
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", ifname.encode()[:15]))  # SIOCGIFADDR
        except OSError as exc:
            raise ValueError(f"RINGCC_SOCKET_IFNAME={ifname!r}: no IPv4 address on that interface ({exc})") from None
    return socket.inet_ntoa(packed[20:24])


def _numeric_host(value: str, what: str) -> str:
    """`value` if it is an IPv4/IPv6 address peers can dial, else a ValueError naming `what`."""
    try:
        addr = ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        raise ValueError(f"{what}={value!r} is not a numeric IPv4 or IPv6 address "
                         "(use RINGCC_SOCKET_IFNAME to pick an interface by name)") from None
    if addr.is_unspecified:
        raise ValueError(f"{what}={value!r} is the wildcard address, which peers cannot dial; "
                         "give the address of one interface")
    return str(addr)


def _listen_address(store: Any, explicit: Optional[str]) -> str:
    """The address to listen on, which peers on other hosts dial to reach this process:
    `explicit` (listen_address=), else RINGCC_LISTEN_HOST, else the address of the
    interface RINGCC_SOCKET_IFNAME, else the local address of the route to the store's
    host, else the host name's address."""
    if explicit:
        return _numeric_host(explicit, "listen_address")
    host = os.environ.get("RINGCC_LISTEN_HOST")
    if host:
        return _numeric_host(host, "RINGCC_LISTEN_HOST")
    ifname = os.environ.get("RINGCC_SOCKET_IFNAME")
    if ifname:
        return _interface_address(ifname)
    for _ in range(64):  # torch's PrefixStore hides the TCPStore (and its host) it wraps
        inner = getattr(store, "underlying_store", None)
        if inner is None:
            break
        store = inner
    host = getattr(store, "host", None)
    port = getattr(store, "port", None)
    if isinstance(host, str) and host:
        try:
            infos = socket.getaddrinfo(host, port or 1, type=socket.SOCK_STREAM)
            family, _, _, _, addr = infos[0]
            if addr[0].startswith("127.") or addr[0] == "::1":
                return addr[0]
            # The local address of the route to the store's host: the interface the
            # job's own rendezvous traffic uses. A UDP connect sends no packet.
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect(addr)
                return s.getsockname()[0]
        except OSError:
            pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _test_unreachable(infos: list, rank: int) -> list:
    """Test hook: RINGCC_TEST_UNREACHABLE="0-1,2-3" makes each listed pair of ranks
    unable to connect, as ranks behind a firewall would be. Each side of a pair treats
    the other as on another host (so TCP, not shared memory) at an address where nothing
    listens, so the dialling side's connect is refused and the accepting side waits for
    a connection that never comes; both fail at the Communicator's timeout."""
    spec = os.environ.get("RINGCC_TEST_UNREACHABLE", "")
    if not spec:
        return infos
    out = list(infos)
    for pair in spec.split(","):
        a, b = (int(x) for x in pair.split("-"))
        if rank in (a, b) and a != b and max(a, b) < len(out):
            peer = b if rank == a else a
            fields = [f for f in out[peer].split(";") if not f.startswith(("host=", "tcp="))]
            out[peer] = ";".join(fields + ["host=unreachable", "tcp=127.0.0.1:1"])
    return out


class Work:
    """Handle of an asynchronous operation (returned when ``async_op=True``)."""

    def __init__(self, native: Any, result: Any, keepalive: tuple):
        self._native = native
        self._result = result
        self._keepalive = keepalive  # arrays the engine is reading or writing

    def wait(self, timeout: Optional[float] = None):
        """Block (without the GIL) until done; return the operation's result.

        Raises the operation's error, or ringcc.TimeoutError if `timeout` seconds pass
        first (the operation itself keeps running)."""
        done = self._native.wait(-1.0 if timeout is None else _seconds(timeout, "timeout"))
        if not done:
            raise _C.TimeoutError(f"wait() gave up after {timeout} s; {self._native.description} is still running")
        self._keepalive = ()
        return self._result

    def is_completed(self) -> bool:
        return self._native.is_completed()

    def exception(self) -> Optional[BaseException]:
        """The error of a completed operation, or None."""
        if not self._native.is_completed():
            return None
        try:
            self._native.raise_if_error()
        except Exception as exc:  # noqa: BLE001 - returned, not swallowed
            return exc
        return None

    def add_done_callback(self, fn) -> None:
        """Call ``fn(work)`` from the engine thread when the operation completes."""
        self._native.add_done_callback(lambda: fn(self))

    @property
    def seq(self) -> int:
        return self._native.seq

    def __repr__(self) -> str:
        state = "done" if self.is_completed() else "running"
        return f"<ringcc.Work {self._native.description} {state}>"


class Communicator:
    """One rank of a group of ``world_size`` processes (or threads) that run collectives.

    All ranks create their Communicator with the same ``store`` contents and ``name``;
    creation blocks until every rank has joined. Operations run in the order each rank
    issues them, on a native progress thread, with the GIL released.

    Every TCP connection between ranks proves, both ways, that it knows a secret the
    communicator keeps in the store (an HMAC over fresh challenges); others are logged
    and dropped. ``handshake_timeout`` (default RINGCC_HANDSHAKE_TIMEOUT or 10 s) bounds
    how long an accepted connection may take to prove it. ``listen_address`` (default
    RINGCC_LISTEN_HOST, else RINGCC_SOCKET_IFNAME's address, else the route to the
    store's host) is the numeric IP this rank listens on and peers dial.
    """

    def __init__(
        self,
        store: Any,
        rank: int,
        world_size: int,
        *,
        name: str = "default",
        timeout: Any = datetime.timedelta(minutes=30),
        transport: Optional[str] = None,
        listen_address: Optional[str] = None,
        segment_bytes: Optional[int] = None,
        small_message_bytes: Optional[int] = None,
        allreduce_algorithm: Optional[str] = None,
        shm_ring_bytes: Optional[int] = None,
        tcp_streams: Optional[int] = None,
        spin_us: Optional[float] = None,
        host_id: Optional[str] = None,
        handshake_timeout: Optional[float] = None,
    ):
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        self.rank = rank
        self.world_size = world_size
        self.name = name
        self.timeout = _seconds(timeout, "timeout")
        transport = transport or os.environ.get("RINGCC_TRANSPORT", "auto")
        algorithm = allreduce_algorithm or os.environ.get("RINGCC_ALLREDUCE_ALGORITHM", "auto")
        if algorithm not in _ALGORITHMS:
            raise ValueError(f"allreduce_algorithm must be one of {sorted(_ALGORITHMS)}, got {algorithm!r}")
        if transport not in ("auto", "tcp", "shm"):
            raise ValueError(f"transport must be 'auto', 'tcp' or 'shm', got {transport!r}")
        self._native = _C.Communicator(
            rank=rank,
            size=world_size,
            transport=transport,
            listen_host="" if transport == "shm" else _listen_address(store, listen_address),
            shm_ring_bytes=shm_ring_bytes or _env_int("RINGCC_SHM_RING_BYTES", 1 << 20),
            tcp_streams=tcp_streams or _env_int("RINGCC_TCP_STREAMS", 1),
            tcp_stripe_bytes=256 << 10,
            timeout=self.timeout,
            spin_seconds=(spin_us if spin_us is not None else float(os.environ.get("RINGCC_SPIN_US", "100"))) * 1e-6,
            segment_bytes=segment_bytes or _env_int("RINGCC_SEGMENT_BYTES", 256 << 10),
            small_message_bytes=small_message_bytes
            if small_message_bytes is not None
            else _env_int("RINGCC_SMALL_MESSAGE_BYTES", 64 << 10),
            algorithm=_ALGORITHMS[algorithm],
            host_id=host_id or os.environ.get("RINGCC_HOST_ID", ""),
            handshake_timeout=_seconds(handshake_timeout if handshake_timeout is not None else
                                       _env_float("RINGCC_HANDSHAKE_TIMEOUT", 10.0), "handshake_timeout"),
        )
        try:
            self._rendezvous(store, name, rank, world_size)
        except BaseException as exc:
            # Free the native side now, not whenever the exception (whose traceback holds
            # this half-built object) is dropped: peers that mapped this rank's shared
            # memory learn why at once, and its name, sockets and fds go away.
            native, self._native = self._native, None
            native.abort(f"rank {rank} failed to set up: {type(exc).__name__}: {exc}")
            del native
            raise
        _live.add(self)

    def _rendezvous(self, store: Any, name: str, rank: int, world_size: int) -> None:
        # Records of earlier communicators of this name (re-created after an abort, or a
        # torchrun restart whose store still holds the failed attempt's keys, maybe of
        # only some ranks) must never be read: rank 0 hands out a fresh generation.
        generation = join_generation(store, f"ringcc/{name}/", rank, world_size, self.timeout)
        prefix = f"ringcc/{name}/{generation}/"
        client = StoreClient(store, prefix, self.timeout)
        # Every TCP connection proves it knows this secret; a fresh one per communicator.
        secret = job_secret(store, prefix + "secret", self.timeout, creator=rank == 0) if world_size > 1 else ""
        client.set(f"info/{rank}", self._native.local_info())
        infos = [client.get(f"info/{r}", what=f"the rendezvous record of rank {r}") for r in range(world_size)]
        self._native.connect(_test_unreachable(infos, rank), secret)

    # ------------------------------------------------------------------ helpers
    @property
    def size(self) -> int:
        return self.world_size

    def transport_to(self, peer: int) -> str:
        """'shm' or 'tcp': how this rank reaches `peer` ('self' for itself)."""
        return self._native.link_kind(peer)

    def _op(self, op: str, buf: Buffer, name: str):
        if isinstance(op, str) and op.lower() in _C_OP:
            code = _C_OP[op.lower()]
        elif isinstance(op, _C.ReduceOp):
            code = op
        else:
            raise ValueError(f"{name}: unknown reduce op {op!r} (expected one of {sorted(set(_C_OP))})")
        if buf.is_complex and code not in (_C.ReduceOp.sum, _C.ReduceOp.avg):
            raise TypeError(f"{name}: op {code.name} is not defined for complex dtype {buf.dtype_name} (use sum or avg)")
        return code

    def _submit(self, kind, *, src: Optional[Buffer], dst: Optional[Buffer], ref: Buffer, count: int, op=None,
                root: int = -1, peer: int = -1, is_send: bool = False, tag: int = 0,
                counts: Sequence[int] = (), recv_counts: Sequence[int] = (), timeout=None,
                algorithm: Optional[str] = None, segment_bytes: Optional[int] = None,
                compression: Any = _C.Compression.none, async_op: bool = False, result: Any = None):
        if algorithm is not None and algorithm not in _ALGORITHMS:
            raise ValueError(f"algorithm must be one of {sorted(_ALGORITHMS)}, got {algorithm!r}")
        call = self._native.submit if async_op else self._native.run
        # Positional: keyword parsing would double the cost of a small collective.
        work = call(
            kind,
            ref.dtype,
            op,
            root,
            peer,
            is_send,
            int(tag),
            src.ptr if src else 0,
            src.nbytes if src else 0,
            dst.ptr if dst else 0,
            dst.nbytes if dst else 0,
            int(count),
            [int(c) for c in counts],
            [int(c) for c in recv_counts],
            -1.0 if timeout is None else _seconds(timeout, "timeout"),
            _ALGORITHMS[algorithm or "auto"],
            int(segment_bytes or 0),
            compression,
        )
        if async_op:
            return Work(work, result, (src.obj if src else None, dst.obj if dst else None))
        # Blocking: the caller's references keep the buffers alive; no handle is needed.
        work.wait(-1.0)
        return result

    def _scale(self, buf: Buffer, counts: Optional[Sequence[int]], name: str) -> list:
        """Per-rank counts in user elements -> native elements (complex counts twice)."""
        if counts is None:
            return None
        counts = [int(c) for c in counts]
        if len(counts) != self.world_size or any(c < 0 for c in counts):
            raise ValueError(f"{name}: need {self.world_size} non-negative per-rank counts, got {counts}")
        return [c * (2 if buf.is_complex else 1) for c in counts]

    @staticmethod
    def _output(src: Buffer, out, shape, name: str) -> Buffer:
        """The caller's `out`, or a new array of `shape` like `src`; dtypes must match."""
        if out is None:
            out = _buffers.new_output(src, shape)
        dst = as_buffer(out, f"{name} output", writable=True)
        _buffers.same_dtype(src, dst, name)
        return dst

    def _check_root(self, root: int, name: str) -> None:
        if not isinstance(root, int) or not 0 <= root < self.world_size:
            raise ValueError(f"{name}: root {root!r} is out of range for {self.world_size} ranks")

    # -------------------------------------------------------------- collectives
    def allreduce(self, tensor, op: str = "sum", *, out=None, async_op: bool = False, timeout=None,
                  algorithm: Optional[str] = None, segment_bytes: Optional[int] = None,
                  compression: Optional[str] = None):
        """Reduce `tensor` across ranks; in place unless `out` is given. Returns the result.

        ``compression="fp16"`` or ``"bf16"`` (float32 data, op sum or avg) sends 16-bit
        values with a power-of-two scale per block of 256 elements and accumulates in
        float32 at every step: half the bytes of a float32 allreduce, no overflow for any
        finite float32 input, and every rank gets the same bits."""
        if compression not in _COMPRESSIONS:
            raise ValueError(f"allreduce: compression must be one of None, 'fp16', 'bf16', got {compression!r}")
        src = as_buffer(tensor, "allreduce input", writable=out is None)
        dst = src if out is None else as_buffer(out, "allreduce output", writable=True)
        _buffers.same_dtype(src, dst, "allreduce")
        code = self._op(op, src, "allreduce")
        return self._submit(COLL.allreduce, src=src, dst=dst, ref=src, count=src.count, op=code, timeout=timeout,
                            algorithm=algorithm, segment_bytes=segment_bytes,
                            compression=_COMPRESSIONS[compression], async_op=async_op, result=dst.obj)

    def broadcast(self, tensor, root: int = 0, *, async_op: bool = False, timeout=None,
                  segment_bytes: Optional[int] = None):
        """Copy root's `tensor` into `tensor` on every rank (in place)."""
        buf = as_buffer(tensor, "broadcast tensor", writable=True)
        return self._submit(COLL.broadcast, src=None, dst=buf, ref=buf, count=buf.count, root=root, timeout=timeout,
                            segment_bytes=segment_bytes, async_op=async_op, result=buf.obj)

    def allgather(self, tensor, *, out=None, async_op: bool = False, timeout=None):
        """Concatenate every rank's `tensor` (equal sizes); `out` has shape (world_size, *tensor.shape)."""
        src = as_buffer(tensor, "allgather input")
        dst = self._output(src, out, (self.world_size,) + tuple(src.obj.shape), "allgather")
        return self._submit(COLL.allgather, src=src, dst=dst, ref=src, count=src.count, timeout=timeout,
                            async_op=async_op, result=dst.obj)

    def allgather_v(self, tensor, counts: Sequence[int], *, out=None, async_op: bool = False, timeout=None):
        """Concatenate every rank's 1-D `tensor` where rank i contributes counts[i] elements."""
        src = as_buffer(tensor, "allgather_v input")
        scaled = self._scale(src, counts, "allgather_v")
        dst = self._output(src, out, (sum(int(c) for c in counts),), "allgather_v")
        return self._submit(COLL.allgather_v, src=src, dst=dst, ref=src, count=0, counts=scaled, timeout=timeout,
                            async_op=async_op, result=dst.obj)

    def reduce_scatter(self, tensor, op: str = "sum", *, out=None, counts: Optional[Sequence[int]] = None,
                       async_op: bool = False, timeout=None, segment_bytes: Optional[int] = None):
        """Reduce `tensor` across ranks and leave block `rank` of the result in `out`.

        Without `counts`, `tensor` is split into world_size equal blocks along its first
        dimension (so its first dimension must divide evenly); with `counts` it is flat and
        rank i receives counts[i] elements."""
        src = as_buffer(tensor, "reduce_scatter input")
        code = self._op(op, src, "reduce_scatter")
        n = self.world_size
        if counts is None:
            shape = tuple(src.obj.shape)
            if len(shape) == 0 or shape[0] % n:
                raise ValueError(f"reduce_scatter: input shape {shape} does not split into {n} equal blocks "
                                 "along dim 0; pass counts=")
            block_shape = (shape[0] // n,) + shape[1:]
            per = src.count // n
            scaled = [per] * n
        else:
            scaled = self._scale(src, counts, "reduce_scatter")
            block_shape = (int(counts[self.rank]),)
        dst = self._output(src, out, block_shape, "reduce_scatter")
        return self._submit(COLL.reduce_scatter, src=src, dst=dst, ref=src, count=0, counts=scaled, op=code,
                            timeout=timeout, segment_bytes=segment_bytes, async_op=async_op, result=dst.obj)

    def reduce(self, tensor, root: int = 0, op: str = "sum", *, out=None, async_op: bool = False, timeout=None):
        """Reduce `tensor` onto `root`; there the result goes to `out` (default: in place).
        Returns the result on root, None elsewhere."""
        self._check_root(root, "reduce")
        is_root = self.rank == root
        src = as_buffer(tensor, "reduce input", writable=is_root and out is None)
        dst = None
        if is_root:
            dst = src if out is None else as_buffer(out, "reduce output", writable=True)
            _buffers.same_dtype(src, dst, "reduce")
        code = self._op(op, src, "reduce")
        return self._submit(COLL.reduce, src=src, dst=dst, ref=src, count=src.count, op=code, root=root,
                            timeout=timeout, async_op=async_op, result=dst.obj if dst else None)

    def gather(self, tensor, root: int = 0, *, out=None, async_op: bool = False, timeout=None):
        """Collect every rank's `tensor` on root, shape (world_size, *tensor.shape). None off-root."""
        self._check_root(root, "gather")
        src = as_buffer(tensor, "gather input")
        dst = None
        if self.rank == root:
            dst = self._output(src, out, (self.world_size,) + tuple(src.obj.shape), "gather")
        return self._submit(COLL.gather, src=src, dst=dst, ref=src, count=src.count, root=root, timeout=timeout,
                            async_op=async_op, result=dst.obj if dst else None)

    def scatter(self, tensor, out, root: int = 0, *, async_op: bool = False, timeout=None):
        """Send block i of root's `tensor` (world_size equal blocks) to rank i's `out`.
        `tensor` is ignored (may be None) on other ranks."""
        self._check_root(root, "scatter")
        dst = as_buffer(out, "scatter output", writable=True)
        src = None
        if self.rank == root:
            src = as_buffer(tensor, "scatter input")
            _buffers.same_dtype(src, dst, "scatter")
        return self._submit(COLL.scatter, src=src, dst=dst, ref=dst, count=dst.count, root=root, timeout=timeout,
                            async_op=async_op, result=dst.obj)

    def alltoall(self, tensor, *, out=None, send_counts: Optional[Sequence[int]] = None,
                 recv_counts: Optional[Sequence[int]] = None, async_op: bool = False, timeout=None):
        """Block i of `tensor` goes to rank i; block j of `out` comes from rank j.

        Equal blocks split dim 0 into world_size parts; with send_counts/recv_counts the
        buffers are flat and the counts give each block's length."""
        src = as_buffer(tensor, "alltoall input")
        n = self.world_size
        if (send_counts is None) != (recv_counts is None):
            raise ValueError("alltoall: pass both send_counts and recv_counts, or neither")
        if send_counts is None:
            shape = tuple(src.obj.shape)
            if len(shape) == 0 or shape[0] % n:
                raise ValueError(f"alltoall: input shape {shape} does not split into {n} equal blocks along dim 0")
            dst = self._output(src, out, shape, "alltoall")
            return self._submit(COLL.alltoall, src=src, dst=dst, ref=src, count=src.count // n, timeout=timeout,
                                async_op=async_op, result=dst.obj)
        sc = self._scale(src, send_counts, "alltoall send_counts")
        rc = self._scale(src, recv_counts, "alltoall recv_counts")
        dst = self._output(src, out, (sum(int(c) for c in recv_counts),), "alltoall")
        return self._submit(COLL.alltoall_v, src=src, dst=dst, ref=src, count=0, counts=sc, recv_counts=rc,
                            timeout=timeout, async_op=async_op, result=dst.obj)

    def barrier(self, *, async_op: bool = False, timeout=None):
        """Return once every rank has entered the barrier."""
        import numpy as np

        ref = as_buffer(np.empty(0, np.uint8), "barrier")
        return self._submit(COLL.barrier, src=None, dst=None, ref=ref, count=0, timeout=timeout, async_op=async_op)

    def send(self, tensor, peer: int, tag: int = 0, *, async_op: bool = False, timeout=None):
        """Send `tensor` to `peer`, which must call recv() with the same size, dtype and tag.
        Messages between a pair arrive in the order they were issued."""
        src = as_buffer(tensor, "send tensor")
        return self._submit(COLL.send_recv, src=src, dst=None, ref=src, count=src.count, peer=peer, is_send=True,
                            tag=tag, timeout=timeout, async_op=async_op)

    def recv(self, tensor, peer: int, tag: int = 0, *, async_op: bool = False, timeout=None):
        """Receive into `tensor` from `peer` (see send())."""
        dst = as_buffer(tensor, "recv tensor", writable=True)
        return self._submit(COLL.send_recv, src=None, dst=dst, ref=dst, count=dst.count, peer=peer, tag=tag,
                            timeout=timeout, async_op=async_op, result=dst.obj)

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Finish queued operations and leave the group (peers see a clean goodbye)."""
        self._native.close()
        _live.discard(self)

    def abort(self, reason: str = "abort() called") -> None:
        """Fail running and queued operations here and on every peer; never blocks long."""
        self._native.abort(reason)
        _live.discard(self)

    @property
    def is_aborted(self) -> bool:
        return self._native.is_aborted

    def __enter__(self) -> "Communicator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        native = getattr(self, "_native", None)
        if native is not None:
            native.close()

    def __repr__(self) -> str:
        return f"<ringcc.Communicator name={self.name!r} rank={self.rank}/{self.world_size}>"
