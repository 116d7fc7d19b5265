"""One rank of the soak test (tests/test_soak.py runs --world of these as processes).

Every rank holds three communicators over the same ranks: one on shared memory, one on
TCP and one mixed (ranks 0,1 and 2,3 emulate two hosts: shm inside a pair, TCP across).
A random generator seeded identically on every rank picks, per iteration, the
communicator, the operation and its parameters (dtype, size, root, reduce op, counts,
async or not), so all ranks issue the same sequence. Each rank's input is a function of
(rank, iteration), so every rank computes the exact expected result of every operation
and checks it. Float inputs are small integers (and +-1, +-2 for products), so sums,
averages over 4 ranks and products are exact in every float type: float results are
compared exactly, except the fp16/bf16-compressed allreduce, which is lossy by design.

Resource use is sampled after a warm-up and then regularly: open fds, threads, RssAnon,
/dev/shm entries of this process and mapped ringcc segments. The process prints one line
"STATS <json>" at the end (the parent asserts on it) and exits 0. Any wrong result or
error prints "FAIL <iteration, operation, dtype, size...>: <what>", aborts the
communicators (so peers fail at once rather than at their timeout) and exits 1.
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
import torch

import ringcc
from _proc_worker import DirStore
from reference import exact_reduce

FLOATS = ["float16", "bfloat16", "float32", "float64"]
INTS = ["int8", "uint8", "int32", "int64"]
COMPLEX = ["complex64", "complex128"]
DTYPES = FLOATS + INTS + ["bool"] + COMPLEX
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int8": 1, "uint8": 1, "int32": 4,
            "int64": 8, "bool": 1, "complex64": 8, "complex128": 16}
FLOAT_OPS = ["sum", "avg", "prod", "min", "max"]
INT_OPS = ["sum", "prod", "min", "max", "band", "bor", "bxor"]

# Operation kinds and how often each is drawn (allreduce, the workhorse, most often).
KINDS = {
    "allreduce": 4, "allreduce_compressed": 1, "reduce": 1, "broadcast": 1, "allgather": 1, "allgather_v": 1,
    "reduce_scatter": 1, "gather": 1, "scatter": 1, "alltoall": 1, "barrier": 0.5, "sendrecv": 1,
    "async_batch": 1,
}
KIND_NAMES = list(KINDS)
KIND_P = np.array(list(KINDS.values())) / sum(KINDS.values())
COMMS = ["shm", "tcp", "mixed"]


def ops_for(dtype: str) -> List[str]:
    if dtype in COMPLEX:
        return ["sum", "avg"]
    return FLOAT_OPS if dtype in FLOATS else INT_OPS


# --------------------------------------------------------------------------- inputs
class Tables:
    """Random tables that inputs are slices of: the input of (rank, iteration, salt) starts
    at an offset derived from them, so inputs differ between ranks and iterations (and
    neighbouring elements differ, so a shifted or misplaced block shows) while making
    one costs a single copy, not a hash per element."""

    SPAN = 1 << 16  # offsets are in [0, SPAN)

    def __init__(self, max_elems: int, world: int):
        rng = np.random.default_rng(12345)  # the same on every rank
        length = max_elems + self.SPAN + 1
        self.world = world
        self.small = rng.integers(-30, 31, length).astype(np.int8)  # floats: sums of 4 stay exact
        self.pm12 = rng.choice(np.array([-2, -1, 1, 2], np.int8), length)  # float products stay exact
        self.prod_int = rng.integers(-3, 4, length).astype(np.int8)  # integer products: no signed overflow
        self.bits = np.frombuffer(rng.bytes(8 * length), np.uint64).copy()  # every bit random

    def offset(self, rank: int, it: int, salt: int) -> int:
        base = (it * 7919 + salt * 104729) % (self.SPAN // self.world)
        return base * self.world + rank

    def values(self, dtype: str, n: int, rank: int, it: int, salt: int, op: str = "sum") -> np.ndarray:
        """Rank `rank`'s input as NumPy values: float64 for floats (bfloat16 included),
        complex128 for complex, the dtype itself for integers and bool."""
        o = self.offset(rank, it, salt)
        if dtype in FLOATS:
            table = self.pm12 if op == "prod" else self.small
            return table[o:o + n].astype(np.float64)
        if dtype in COMPLEX:
            return self.small[o:o + n] + 1j * self.small[o + 1:o + 1 + n].astype(np.float64)
        if dtype == "bool":
            return (self.bits[o:o + n] & np.uint64(1)).astype(bool)
        if op == "prod":
            return self.prod_int[o:o + n].astype(dtype)
        return self.bits[o:o + n].astype(dtype)  # wraps: every bit pattern occurs


def native(vals: np.ndarray, dtype: str, lib: str):
    """What the collective is called on: a NumPy array, or a torch tensor (bfloat16 always)."""
    if dtype == "bfloat16":
        return torch.from_numpy(vals.astype(np.float32)).to(torch.bfloat16)
    arr = np.ascontiguousarray(vals.astype(dtype))
    return torch.from_numpy(arr) if lib == "torch" else arr


def empty_like(x):
    return torch.empty_like(x) if isinstance(x, torch.Tensor) else np.empty_like(x)


def as_values(x) -> np.ndarray:
    """A result back as NumPy values comparable with Tables.values()."""
    if isinstance(x, torch.Tensor):
        return x.float().numpy() if x.dtype == torch.bfloat16 else x.numpy()
    return np.asarray(x)


def expected_reduction(inputs: List[np.ndarray], op: str, dtype: str) -> np.ndarray:
    if dtype in FLOATS or dtype in COMPLEX:
        acc = inputs[0].copy()
        for v in inputs[1:]:
            if op in ("sum", "avg"):
                acc += v
            elif op == "prod":
                acc *= v
            elif op == "min":
                np.minimum(acc, v, out=acc)
            else:
                np.maximum(acc, v, out=acc)
        if op == "avg":
            acc /= len(inputs)  # a power of two ranks: exact
        return acc
    return exact_reduce(inputs, op, dtype)


class Wrong(AssertionError):
    pass


def check_equal(got, want: np.ndarray, what: str) -> None:
    got = as_values(got)
    if got.shape != want.shape:
        raise Wrong(f"{what}: shape {got.shape}, expected {want.shape}")
    if got.dtype == np.float16 or got.dtype == np.float32 or got.dtype == np.complex64:
        got = got.astype(want.dtype)  # exact: every expected value is representable
    bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
    if bad.size:
        i = bad[0]
        raise Wrong(f"{what}: {bad.size} of {want.size} elements wrong, first at flat index {i}: "
                    f"got {got.reshape(-1)[i]!r}, expected {want.reshape(-1)[i]!r}")


def check_close(got, want: np.ndarray, rel: float, what: str) -> None:
    got = as_values(got).astype(np.float64)
    if got.shape != want.shape:
        raise Wrong(f"{what}: shape {got.shape}, expected {want.shape}")
    if want.size == 0:
        return
    bound = rel * max(float(np.abs(want).max()), 1.0)
    err = np.abs(got - want)
    bad = np.flatnonzero(err > bound)
    if bad.size:
        i = bad[0]
        raise Wrong(f"{what}: {bad.size} elements off by more than {bound}, first at {i}: "
                    f"got {got[i]!r}, expected {want[i]!r}")


# ---------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One operation, identical on every rank (everything random is drawn into it)."""

    it: int
    kind: str
    comm: str
    dtype: str = "float32"
    n: int = 0  # elements of each rank's input (before any split into blocks)
    op: str = "sum"
    root: int = 0
    lib: str = "numpy"
    out: bool = False  # out-of-place (allreduce, reduce) / in place (alltoall)
    algorithm: Optional[str] = None
    compression: Optional[str] = None
    segment_bytes: Optional[int] = None  # allreduce, broadcast, reduce_scatter: pipelining frame size
    counts: Optional[List[int]] = None  # allgather_v / reduce_scatter per-rank counts
    split: Optional[List[List[int]]] = None  # alltoall_v: split[i][j] elements from i to j
    shift: int = 1  # sendrecv: send to rank + shift
    tag: int = 0
    recv_async: bool = False
    salt: int = 0
    async_op: bool = False
    subcases: List["Case"] = field(default_factory=list)
    order: List[int] = field(default_factory=list)  # async_batch: order of the waits

    def describe(self) -> str:
        if self.kind == "async_batch":
            return (f"iteration {self.it}: async_batch of {len(self.subcases)} waited in order {self.order}: ["
                    + "; ".join(c.describe() for c in self.subcases) + "]")
        extras = {k: getattr(self, k) for k in _SHOWN[self.kind] + ("lib", "async_op")
                  if getattr(self, k) not in (None, False)}
        return (f"iteration {self.it}: {self.kind} on the {self.comm} communicator, dtype {self.dtype}, "
                f"{self.n} elements ({self.n * ITEMSIZE[self.dtype]} bytes) per rank, {extras}")


# The parameters each kind uses, named in its description.
_SHOWN = {
    "allreduce": ("op", "out", "algorithm", "segment_bytes"),
    "allreduce_compressed": ("op", "out", "compression", "segment_bytes"),
    "reduce": ("op", "root", "out"), "broadcast": ("root", "segment_bytes"), "allgather": (),
    "allgather_v": ("counts",), "reduce_scatter": ("op", "counts", "segment_bytes"), "gather": ("root",),
    "scatter": ("root",), "alltoall": ("out", "split"),
    "barrier": (), "sendrecv": ("shift", "tag", "recv_async"),
}


def draw_bytes(rng: np.random.Generator, max_bytes: int) -> int:
    """0 .. max_bytes, skewed to small: 5% empty, 65% up to 4 KiB, 25% up to 256 KiB,
    5% up to max_bytes (log-uniform inside each band)."""
    u = rng.random()
    if u < 0.05:
        return 0
    if u < 0.70:
        return int(2 ** rng.uniform(0, 12))
    if u < 0.95:
        return int(2 ** rng.uniform(12, 18))
    return int(2 ** rng.uniform(18, np.log2(max_bytes)))


def draw_case(rng: np.random.Generator, it: int, world: int, max_bytes: int, *, salt: int = 0,
              nested: bool = False) -> Case:
    kinds = KIND_NAMES if not nested else [k for k in KIND_NAMES if k != "async_batch"]
    p = KIND_P if not nested else KIND_P[:-1] / KIND_P[:-1].sum()
    kind = kinds[rng.choice(len(kinds), p=p)]
    c = Case(it=it, kind=kind, comm=COMMS[rng.integers(len(COMMS))], salt=salt)
    if kind == "async_batch":
        k = int(rng.integers(2, 7))
        c.subcases = [draw_case(rng, it, world, max_bytes, salt=s + 1, nested=True) for s in range(k)]
        for sub in c.subcases:
            sub.async_op = True
        c.order = [int(i) for i in rng.permutation(k)]
        return c
    c.dtype = "float32" if kind == "allreduce_compressed" else DTYPES[rng.integers(len(DTYPES))]
    c.n = draw_bytes(rng, max_bytes) // ITEMSIZE[c.dtype]
    ops = ["sum", "avg"] if kind == "allreduce_compressed" else ops_for(c.dtype)
    c.op = ops[rng.integers(len(ops))]
    c.root = int(rng.integers(world))
    c.lib = "torch" if rng.random() < 0.25 else "numpy"
    c.out = bool(rng.random() < 0.5)
    c.async_op = bool(nested or rng.random() < 0.2)
    c.algorithm = [None, "ring", "recursive_doubling"][rng.integers(3)] if kind == "allreduce" else None
    c.compression = ["fp16", "bf16"][rng.integers(2)] if kind == "allreduce_compressed" else None
    c.segment_bytes = [None, None, 4096, 32768][rng.integers(4)]
    block = c.n // world
    if kind == "allgather_v" or (kind == "reduce_scatter" and rng.random() < 0.5):
        c.counts = [int(x) for x in rng.integers(0, block + 1, world)]
    if kind == "alltoall" and rng.random() < 0.5:
        c.split = [[int(x) for x in rng.integers(0, block + 1, world)] for _ in range(world)]
    c.shift = int(rng.integers(1, world)) if world > 1 else 0
    c.tag = int(rng.integers(0, 1 << 20))
    c.recv_async = bool(rng.random() < 0.5)
    return c


# ------------------------------------------------------------------------ execution
class Both:
    """A send's Work and a receive's result as one waitable (sendrecv with async_op)."""

    def __init__(self, send_work, recv, recv_is_work: bool):
        self.send_work, self.recv, self.recv_is_work = send_work, recv, recv_is_work

    def wait(self):
        self.send_work.wait()
        return self.recv.wait() if self.recv_is_work else self.recv


def start(case: Case, comm, tables: Tables) -> Tuple[Any, Callable[[Any], None]]:
    """Issue `case` on `comm`; return (its result, or a waitable when async, and a checker)."""
    r, world, it = comm.rank, comm.world_size, case.it
    dt, n, a = case.dtype, case.n, case.async_op

    def vals(rank: int, count: int = n, op: str = case.op) -> np.ndarray:
        return tables.values(dt, count, rank, it, case.salt, op)

    def make(rank: int, count: int = n, op: str = case.op):
        return native(vals(rank, count, op), dt, case.lib)

    if case.kind in ("allreduce", "allreduce_compressed"):
        x = make(r)
        y = empty_like(x) if case.out else None
        kw = dict(algorithm=case.algorithm, segment_bytes=case.segment_bytes)
        if case.compression:
            kw["compression"] = case.compression
        ret = comm.allreduce(x, case.op, out=y, async_op=a, **kw)
        want = expected_reduction([vals(q) for q in range(world)], case.op, dt)

        def check(res):
            if res is not (y if case.out else x):
                raise Wrong("allreduce returned another object than its output")
            if case.compression:
                # A 16-bit value per element with a power-of-two scale per 256-element block,
                # rounded at each of the world-1 hops: fp16 keeps 11 bits, bf16 8.
                rel = (2.0 ** -10 if case.compression == "fp16" else 2.0 ** -7) * world
                check_close(res, want, rel, "compressed allreduce result")
            else:
                check_equal(res, want, "allreduce result")
            if case.out:
                check_equal(x, vals(r), "allreduce input (out of place: must be untouched)")
        return ret, check

    if case.kind == "reduce":
        x = make(r)
        y = empty_like(x) if case.out and r == case.root else None
        ret = comm.reduce(x, case.root, case.op, out=y, async_op=a)
        want = expected_reduction([vals(q) for q in range(world)], case.op, dt) if r == case.root else None

        def check(res):
            if r == case.root:
                if res is not (x if y is None else y):
                    raise Wrong("reduce returned another object than its output on the root")
                check_equal(res, want, "reduce result on the root")
                if y is not None:
                    check_equal(x, vals(r), "reduce input on the root (out of place)")
            else:
                if res is not None:
                    raise Wrong(f"reduce returned {type(res).__name__} off the root")
                check_equal(x, vals(r), "reduce input off the root (must be untouched)")
        return ret, check

    if case.kind == "broadcast":
        x = make(r)
        ret = comm.broadcast(x, case.root, async_op=a, segment_bytes=case.segment_bytes)
        return ret, lambda res: check_equal(res, vals(case.root), f"broadcast from {case.root}")

    if case.kind == "allgather_v":
        cnt = case.counts
        ret = comm.allgather_v(make(r, cnt[r]), cnt, async_op=a)
        want = np.concatenate([vals(q, cnt[q]) for q in range(world)])
        return ret, lambda res: check_equal(res, want, "allgather_v result")

    if case.kind == "allgather":
        ret = comm.allgather(make(r), async_op=a)
        return ret, lambda res: check_equal(res, np.stack([vals(q) for q in range(world)]), "allgather result")

    if case.kind == "reduce_scatter":
        cnt = case.counts if case.counts is not None else [n // world] * world
        total = sum(cnt)
        x = make(r, total)
        ret = comm.reduce_scatter(x, case.op, counts=case.counts, async_op=a, segment_bytes=case.segment_bytes)
        off = sum(cnt[:r])
        want = expected_reduction([vals(q, total) for q in range(world)], case.op, dt)[off:off + cnt[r]]

        def check(res):
            check_equal(res, want, "reduce_scatter block of this rank")
            check_equal(x, vals(r, total), "reduce_scatter input (must be untouched)")
        return ret, check

    if case.kind == "gather":
        ret = comm.gather(make(r), case.root, async_op=a)

        def check(res):
            if r == case.root:
                check_equal(res, np.stack([vals(q) for q in range(world)]), f"gather on root {case.root}")
            elif res is not None:
                raise Wrong(f"gather returned {type(res).__name__} off the root")
        return ret, check

    if case.kind == "scatter":
        b = n // world
        src = make(case.root, b * world) if r == case.root else None
        out = native(np.zeros(b, np.float64 if dt in FLOATS else dt), dt, case.lib)
        ret = comm.scatter(src, out, case.root, async_op=a)
        return ret, lambda res: check_equal(res, vals(case.root, b * world)[r * b:(r + 1) * b],
                                            f"scatter block {r} from root {case.root}")

    if case.kind == "alltoall" and case.split is not None:
        split = case.split
        send = make(r, sum(split[r]))
        ret = comm.alltoall(send, send_counts=split[r], recv_counts=[split[i][r] for i in range(world)],
                            async_op=a)
        want = np.concatenate([vals(i, sum(split[i]))[sum(split[i][:r]):sum(split[i][:r]) + split[i][r]]
                               for i in range(world)])
        return ret, lambda res: check_equal(res, want, "alltoall_v result")

    if case.kind == "alltoall":
        b = n // world
        x = make(r, b * world).reshape(world, b)
        ret = comm.alltoall(x, out=x if case.out else None, async_op=a)
        want = np.stack([vals(i, b * world)[r * b:(r + 1) * b] for i in range(world)])

        def check(res):
            if case.out and res is not x:
                raise Wrong("in-place alltoall returned another object than its input")
            check_equal(res, want, "alltoall result" + (" (in place)" if case.out else ""))
        return ret, check

    if case.kind == "barrier":
        return comm.barrier(async_op=a), lambda res: None

    if case.kind == "sendrecv":
        to, frm = (r + case.shift) % world, (r - case.shift) % world
        x = make(r)
        y = empty_like(x)
        sw = comm.send(x, to, case.tag, async_op=True)
        recv_async = a or case.recv_async
        rv = comm.recv(y, frm, case.tag, async_op=recv_async)
        if a:
            ret = Both(sw, rv, recv_async)
        else:
            sw.wait()
            ret = rv.wait() if recv_async else rv

        def check(res):
            if res is not y:
                raise Wrong("recv returned another object than its buffer")
            check_equal(res, vals(frm), f"message from rank {frm} (tag {case.tag})")
            check_equal(x, vals(r), "sent buffer (must be untouched)")
        return ret, check

    raise AssertionError(f"unknown kind {case.kind}")


def ops_in(case: Case) -> int:
    """Library calls a case makes (a send/recv pair counts two)."""
    if case.kind == "async_batch":
        return sum(ops_in(c) for c in case.subcases)
    return 2 if case.kind == "sendrecv" else 1


def run_case(case: Case, comms: dict, tables: Tables, tamper: Callable[[Any], None] = lambda res: None) -> None:
    """Run `case` and check its results; `tamper(result)` runs just before each check (the
    test of the soak itself corrupts a result there to see that it is caught)."""
    if case.kind == "async_batch":
        started = [start(c, comms[c.comm], tables) for c in case.subcases]
        results = [None] * len(started)
        for i in case.order:
            try:
                results[i] = started[i][0].wait()
            except BaseException as exc:
                raise Wrong(f"subcase {i} ({case.subcases[i].describe()}): {type(exc).__name__}: {exc}") from exc
        for i, (_, check) in enumerate(started):
            try:
                tamper(results[i])
                check(results[i])
            except Wrong as exc:
                raise Wrong(f"subcase {i} ({case.subcases[i].describe()}): {exc}") from None
        return
    ret, check = start(case, comms[case.comm], tables)
    res = ret.wait() if case.async_op else ret
    tamper(res)
    check(res)


class Corrupter:
    """Changes one element of the first non-empty result it is given, once armed."""

    def __init__(self) -> None:
        self.armed = False
        self.done = False

    def __call__(self, res) -> None:
        if not self.armed or self.done or res is None:
            return
        flat = res.reshape(-1)
        if flat.numel() if isinstance(flat, torch.Tensor) else flat.size:
            flat[0] = ~flat[0] if str(flat.dtype) in ("bool", "torch.bool") else flat[0] + 1
            self.done = True


# ------------------------------------------------------------------------- sampling
def sample() -> dict:
    gc.collect()
    pid = os.getpid()
    rss_kib = None
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                rss_kib = int(line.split()[1])
    with open("/proc/self/maps") as f:
        mapped = sum(1 for line in f if "/ringcc-" in line)
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": len(os.listdir("/proc/self/task")),
        "rss_anon_kib": rss_kib,
        "shm_entries": len(glob.glob(f"/dev/shm/ringcc-{pid}-*")),
        "shm_mappings": mapped,
    }


def fill_numpy_cache() -> None:
    """NumPy keeps up to 7 freed data blocks of every size below 1 KiB for reuse (its
    small-allocation cache, about 3.6 MB when full). Random small sizes fill it slowly,
    which looks like a leak of a few hundred bytes per operation for thousands of
    operations; fill it once before the baseline so that it cannot."""
    held = [[np.empty(size, np.uint8) for _ in range(8)] for size in range(1, 1024)]
    del held


def prime_cases(world: int, max_bytes: int) -> List[Case]:
    """Operations that make each communicator reach its high-water marks before the
    warm-up sample: its scratch buffers grow to the largest size ever needed (a half-
    precision reduction widens to fp32 in two buffers of twice the bytes; reduce,
    reduce_scatter and in-place alltoall copy their input), its progress thread runs
    (async ops) and p2p batches run, each at the largest size the soak draws."""
    cases = []
    for comm in COMMS:
        def add(kind, dtype, **kw):
            cases.append(Case(it=-1, kind=kind, comm=comm, dtype=dtype, n=max_bytes // ITEMSIZE[dtype], **kw))
        add("allreduce", "float16", op="avg", algorithm="recursive_doubling")
        add("allreduce", "bfloat16", op="avg", algorithm="ring", async_op=True)
        add("allreduce_compressed", "float32", compression="fp16")
        add("reduce", "int8", root=1)
        add("reduce", "float16", root=2)
        add("reduce_scatter", "int8")
        add("reduce_scatter", "float16", async_op=True)
        add("alltoall", "int8", out=True)
        add("sendrecv", "float64", shift=1, recv_async=True)
        add("sendrecv", "float64", shift=2, async_op=True)
        for kind in ("broadcast", "allgather", "gather", "scatter", "barrier"):
            add(kind, "float32")
    return cases


# ----------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--store-dir", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--iterations", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True, help="random iterations before the baseline sample")
    p.add_argument("--samples", type=int, default=10, help="resource samples after the warm-up")
    p.add_argument("--max-bytes", type=int, default=4 << 20)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--corrupt-from", type=int, default=-1,
                   help="from this iteration on, change one element of the first non-empty result "
                        "before it is checked (tests that the soak catches a wrong result)")
    args = p.parse_args()
    rank, world = args.rank, args.world
    torch.set_num_threads(1)  # no intra-op pool appearing midway (and 2 cores are shared anyway)

    tables = Tables(args.max_bytes, world)
    store = DirStore(args.store_dir)
    before = sample()
    pair = "a" if rank < world // 2 else "b"
    comms = {
        "shm": ringcc.Communicator(store, rank, world, name="soak-shm", transport="shm", timeout=args.timeout),
        "tcp": ringcc.Communicator(store, rank, world, name="soak-tcp", transport="tcp", timeout=args.timeout,
                                   listen_address="127.0.0.1"),
        "mixed": ringcc.Communicator(store, rank, world, name="soak-mixed", transport="auto", timeout=args.timeout,
                                     listen_address="127.0.0.1", host_id=f"soak-host-{pair}"),
    }
    for peer in range(world):
        if peer != rank:
            want_mixed = "shm" if (peer < world // 2) == (rank < world // 2) else "tcp"
            got = {k: c.transport_to(peer) for k, c in comms.items()}
            assert got == {"shm": "shm", "tcp": "tcp", "mixed": want_mixed}, (peer, got)

    case: Optional[Case] = None
    ops = 0
    samples = []
    try:
        for case in prime_cases(world, args.max_bytes):
            run_case(case, comms, tables)
            ops += ops_in(case)
        fill_numpy_cache()
        rng = np.random.default_rng(args.seed)
        tamper = Corrupter()
        every = max(1, (args.iterations - args.warmup) // max(1, args.samples))
        t0 = time.monotonic()
        for it in range(args.iterations):
            if it >= args.warmup and (it - args.warmup) % every == 0:
                samples.append(dict(sample(), iteration=it, ops=ops))
            case = None  # a failing draw must not be blamed on the previous case
            case = draw_case(rng, it, world, args.max_bytes)
            tamper.armed = 0 <= args.corrupt_from <= it
            run_case(case, comms, tables, tamper)
            ops += ops_in(case)
        case = None
        elapsed = time.monotonic() - t0
        samples.append(dict(sample(), iteration=args.iterations, ops=ops))
    except BaseException as exc:  # noqa: BLE001 - reported, then the process fails
        where = case.describe() if case is not None else "setup"
        print(f"FAIL rank {rank}, {where}: {type(exc).__name__}: {exc}", flush=True)
        traceback.print_exc(file=sys.stdout)
        sys.stdout.flush()
        for c in comms.values():
            c.abort(f"rank {rank} failed the soak: {type(exc).__name__}")
        os._exit(1)

    while comms:  # leave no reference behind: a communicator's fds and mappings go with it
        comms.popitem()[1].close()
    after = sample()
    print("STATS " + json.dumps({"rank": rank, "iterations": args.iterations, "ops": ops, "seconds": elapsed,
                                 "before": before, "samples": samples, "after_close": after}), flush=True)


if __name__ == "__main__":
    main()
