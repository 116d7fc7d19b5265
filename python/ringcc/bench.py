"""`ringcc bench`: nccl-tests-style collective benchmark of torch.distributed backends.

Every backend named in ``--backends`` is measured in the same run, on the same ranks and
buffers, through ``torch.distributed`` (the way users call it), interleaved in A-B-B-A
rounds so that machine drift hits all alike.

    ringcc bench                                    # 2 local ranks, allreduce 4K..64M, ringcc vs gloo
    ringcc bench --nproc 4 --collectives all --sizes 4K:256M --json out.json --plot out.png
    torchrun --nproc-per-node 2 -m ringcc bench    # ranks started by torchrun (also multi-node)

Columns follow nccl-tests: ``size`` is the bytes of the largest buffer of the call (the
gathered output of allgather, the input of reduce_scatter), ``count`` its elements;
``time`` is the mean time per call, the maximum over ranks; ``algbw = size / time``;
``busbw = algbw * factor`` with factor 2(n-1)/n for allreduce, (n-1)/n for allgather,
reduce_scatter and alltoall, 1 for broadcast; ``#wrong`` counts the result elements that
differ from the exact answer, summed over ranks, from a separate verified call after the
timed ones. ``ratio`` is the baseline backend's time divided by this backend's.

Placements: *in-place* aliases input and output as torch allows (all_reduce and broadcast
are always in place; the input of all_gather_into_tensor is this rank's slice of the
output, the output of reduce_scatter_tensor this rank's slice of the input).
*Out-of-place* uses separate buffers. torch has no out-of-place all_reduce or broadcast, so
there it is ``out.copy_(inp)`` followed by the in-place call, except for all_reduce on a
ringcc group (compressed or not), which has its own out-of-place call
(``allreduce_into(out, inp)``: the input is read where it is and never copied) and uses it.
torch defines no in-place all_to_all_single, so that cell is left empty.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from . import _launch
from ._progress import TextProgress

CHILD_ENV = "RINGCC_BENCH_CHILD"
ROUNDS = 4  # timed blocks per backend, cell and size: A B B A A B B A ...
VERIFY_CHUNK = 1 << 20  # elements compared at a time (bounds the memory of the check)


# ------------------------------------------------------------------------------ arguments
def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        value = int(float(t[:-1]) * scale[t[-1]]) if t and t[-1] in scale else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (examples: 4096, 4K, 64M, 1G)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return value


def parse_sizes(text: str) -> List[int]:
    """``4K:256M`` (doubling, both ends included) or ``4K,1M,64M``."""
    if ":" in text:
        lo, hi = (parse_size(x) for x in text.split(":", 1))
        if lo > hi:
            raise argparse.ArgumentTypeError(f"size range {text!r} runs backwards")
        out = [lo]
        while out[-1] * 2 <= hi:
            out.append(out[-1] * 2)
        return out
    return [parse_size(x) for x in text.split(",") if x.strip()]


def fmt_size(nbytes: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return str(nbytes)


@dataclass(frozen=True)
class Collective:
    name: str
    busbw_factor: Callable[[int], float]
    reduces: bool
    in_place: bool = True  # torch defines an in-place form


COLLECTIVES: Dict[str, Collective] = {c.name: c for c in (
    Collective("allreduce", lambda n: 2 * (n - 1) / n, True),
    Collective("allgather", lambda n: (n - 1) / n, False),
    Collective("reduce_scatter", lambda n: (n - 1) / n, True),
    Collective("broadcast", lambda n: 1.0, False),
    Collective("alltoall", lambda n: (n - 1) / n, False, in_place=False),
)}
OPS = ("sum", "prod", "min", "max", "avg", "band", "bor", "bxor")
COMPRESSIONS = ("none", "fp16", "bf16")


@dataclass(frozen=True)
class Variant:
    """One column of results: a backend, and for ringcc's allreduce a wire format."""

    backend: str
    compression: str = "none"

    @property
    def label(self) -> str:
        return self.backend if self.compression == "none" else f"{self.backend}+{self.compression}"

    def runs(self, coll: str) -> bool:
        return self.compression == "none" or coll == "allreduce"
DTYPES = ("float32", "float64", "float16", "bfloat16", "int8", "uint8", "int32", "int64")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ringcc bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure collectives of torch.distributed backends side by side (nccl-tests columns).",
        epilog=__doc__.split("\n\n", 1)[1].split("Placements:")[0])
    p.add_argument("--nproc", type=int, default=None,
                   help="local ranks to spawn (default 2; ignored under torchrun, which starts the ranks)")
    p.add_argument("--backends", default=None,
                   help="comma-separated torch.distributed backends; the last one is the baseline of the ratio "
                        "column (default ringcc,gloo on cpu, ringcc,nccl on cuda)")
    p.add_argument("--collectives", "-c", default="allreduce",
                   help=f"comma-separated from {', '.join(COLLECTIVES)}, or 'all' (default allreduce)")
    p.add_argument("--sizes", "-s", type=parse_sizes, default=parse_sizes("4K:64M"),
                   help="bytes per call: a doubling range LO:HI or a list (default 4K:64M; K/M/G suffixes)")
    p.add_argument("--dtype", "-d", default="float32", choices=DTYPES)
    p.add_argument("--op", "-o", default="sum", choices=OPS, help="reduction of allreduce / reduce_scatter")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--compression", default="none",
                   help="comma-separated from none, fp16, bf16: ringcc's allreduce with each wire format, one "
                        "row each (ringcc+fp16 ...; float32 with op sum or avg; default none)")
    p.add_argument("--iters", "-n", type=int, default=None,
                   help="timed calls per backend, size and placement (default: enough for about --target-seconds "
                        "on the slowest backend, 5..1000)")
    p.add_argument("--warmup", "-w", type=int, default=3, help="untimed calls first (default 3)")
    p.add_argument("--target-seconds", type=float, default=0.3,
                   help="timed seconds per backend, size and placement when --iters is not given (default 0.3)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a collective fails (default 300)")
    p.add_argument("--json", metavar="PATH", help="write one JSON object per result row here")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of busbw against size per backend (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    names = list(COLLECTIVES) if a.collectives.strip() == "all" else \
        [c.strip() for c in a.collectives.split(",") if c.strip()]
    bad = [c for c in names if c not in COLLECTIVES]
    if bad or not names:
        p.error(f"unknown collective(s) {', '.join(bad) or '(none)'}; choose from {', '.join(COLLECTIVES)} or all")
    a.collectives = names
    if a.backends is None:
        a.backends = "ringcc,gloo" if a.device == "cpu" else "ringcc,nccl"
    a.backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    if not a.backends or len(set(a.backends)) != len(a.backends):
        p.error(f"--backends must name distinct backends, got {a.backends}")
    if a.nproc is not None and a.nproc < 1:
        p.error("--nproc must be >= 1")
    if a.iters is not None and a.iters < 1:
        p.error("--iters must be >= 1")
    if a.warmup < 0:
        p.error("--warmup must be >= 0")
    a.compression = [c.strip() for c in a.compression.split(",") if c.strip()] or ["none"]
    bad = [c for c in a.compression if c not in COMPRESSIONS]
    if bad or len(set(a.compression)) != len(a.compression):
        p.error(f"--compression takes distinct values from {', '.join(COMPRESSIONS)}, got {a.compression}")
    if a.compression != ["none"]:
        if "ringcc" not in a.backends:
            p.error("--compression applies to the ringcc backend: add ringcc to --backends")
        if a.dtype != "float32" or a.op not in ("sum", "avg"):
            p.error("--compression needs --dtype float32 and --op sum or avg")
    # What the table shows: each backend, ringcc once per wire format.
    a.variants = [Variant(b, c) for b in a.backends for c in (a.compression if b == "ringcc" else ["none"])]
    integer = a.dtype.startswith(("int", "uint"))
    if any(COLLECTIVES[c].reduces for c in names):
        if a.op == "avg" and integer:
            p.error("--op avg needs a floating --dtype")
        if a.op in ("band", "bor", "bxor") and not integer:
            p.error(f"--op {a.op} needs an integer --dtype")


# ---------------------------------------------------------------------- data and checks
def _pattern(rank: int, start: int, stop: int, op: str, unsigned: bool):
    """float64 values of rank `rank`'s input at global element indices [start, stop):
    small integers, so every reduction is exact in every dtype (avg up to rounding)."""
    import torch

    i = torch.arange(start, stop, dtype=torch.int64)
    if op == "prod":  # -1, 1, 2: products are exact powers of two
        return torch.tensor([-1.0, 1.0, 2.0], dtype=torch.float64)[(i + rank) % 3]
    if op in ("band", "bor", "bxor"):
        return ((i * 37 + rank * 11) % 128).to(torch.float64)
    base = (i * 13 + rank * 7) % 9
    return base.to(torch.float64) if unsigned else (base - 4).to(torch.float64)


def _reduce(op: str, parts: Sequence):
    import torch

    out = parts[0].clone()
    for p in parts[1:]:
        if op in ("sum", "avg"):
            out += p
        elif op == "prod":
            out *= p
        elif op == "min":
            out = torch.minimum(out, p)
        elif op == "max":
            out = torch.maximum(out, p)
        else:
            a, b = out.to(torch.int64), p.to(torch.int64)
            out = {"band": a & b, "bor": a | b, "bxor": a ^ b}[op].to(torch.float64)
    if op == "avg":
        out /= len(parts)
    return out


class Data:
    """Inputs and exact expected outputs of one collective on one rank."""

    def __init__(self, coll: str, count: int, world: int, rank: int, dtype, op: str, device):
        self.coll, self.count, self.world, self.rank = coll, count, world, rank
        self.wire_dtype = dtype  # the precision results are checked at
        self.dtype, self.op, self.device = dtype, op, device
        self.unsigned = dtype.is_signed is False and not dtype.is_floating_point
        self.op_for_pattern = op if COLLECTIVES[coll].reduces else "sum"
        self.block = count // world  # elements per rank for allgather / reduce_scatter / alltoall

    def v(self, rank: int, start: int, stop: int):
        return _pattern(rank, start, stop, self.op_for_pattern, self.unsigned)

    @property
    def in_count(self) -> int:
        return self.block if self.coll == "allgather" else self.count

    @property
    def out_count(self) -> int:
        return self.block if self.coll == "reduce_scatter" else self.count

    def fill_input(self, t) -> None:
        """This rank's input into `t` (``in_count`` elements), chunk by chunk."""
        flat = t.view(-1)
        for s in range(0, flat.numel(), VERIFY_CHUNK):
            e = min(flat.numel(), s + VERIFY_CHUNK)
            flat[s:e].copy_(self.v(self.rank, s, e).to(self.dtype))

    def expected(self, start: int, stop: int):
        """float64 expected output elements [start, stop) on this rank."""
        import torch

        n, r, c = self.world, self.rank, self.block
        if self.coll == "allreduce":
            return _reduce(self.op, [self.v(q, start, stop) for q in range(n)])
        if self.coll == "broadcast":
            return self.v(0, start, stop)
        if self.coll == "reduce_scatter":
            return _reduce(self.op, [self.v(q, r * c + start, r * c + stop) for q in range(n)])
        # allgather / alltoall: output block b comes from rank b.
        pieces = []
        i = start
        while i < stop:
            b, j = divmod(i, c)
            e = min(stop, (b + 1) * c)
            off = j if self.coll == "allgather" else r * c + j
            pieces.append(self.v(b, off, off + (e - i)))
            i = e
        return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.float64)

    def count_wrong(self, out, wire_dtype=None) -> int:
        """Elements of `out` that differ from the exact answer. Sums of the small-integer
        pattern are exact in every dtype (and through 16-bit compression); averages are
        allowed the rounding of `wire_dtype` (default: the data's dtype)."""
        import torch

        wire_dtype = wire_dtype or self.dtype
        flat = out.view(-1).to("cpu")
        wrong = 0
        for s in range(0, flat.numel(), VERIFY_CHUNK):
            e = min(flat.numel(), s + VERIFY_CHUNK)
            want = self.expected(s, e).to(self.dtype).to(torch.float64)
            got = flat[s:e].to(torch.float64)
            if self.op == "avg" and COLLECTIVES[self.coll].reduces:
                tol = torch.finfo(wire_dtype).eps * (want.abs() + 1)
                wrong += int(((got - want).abs() > tol).sum())
            else:
                wrong += int((got != want).sum())
        return wrong


# ------------------------------------------------------------------------------- runner
def _reduce_op(op: str):
    """torch's ReduceOp for one of OPS (the backend's own table, read backwards)."""
    from .torch_backend import _OPS

    return next(code for code, name in _OPS.items() if name == op)


class Cell:
    """Buffers and the call of one (collective, backend, placement) at one size."""

    def __init__(self, data: Data, group, in_place: bool, compression: str = "none"):
        import torch
        import torch.distributed as dist

        d, n, r = data, data.world, data.rank
        self.data = d
        self.in_place = in_place
        self.wire_dtype = None if compression == "none" else {"fp16": torch.float16, "bf16": torch.bfloat16}[compression]
        kw = dict(dtype=d.dtype, device=d.device)
        op = _reduce_op(d.op)
        coll = d.coll
        if coll == "allgather":
            self.out = torch.empty(d.count, **kw)
            self.inp = self.out.view(n, -1)[r] if in_place else torch.empty(d.block, **kw)
            self.call = lambda: dist.all_gather_into_tensor(self.out, self.inp, group=group)
        elif coll == "reduce_scatter":
            self.inp = torch.empty(d.count, **kw)
            self.out = self.inp.view(n, -1)[r] if in_place else torch.empty(d.block, **kw)
            self.call = lambda: dist.reduce_scatter_tensor(self.out, self.inp, op=op, group=group)
        elif coll == "alltoall":
            self.inp, self.out = torch.empty(d.count, **kw), torch.empty(d.count, **kw)
            self.call = lambda: dist.all_to_all_single(self.out, self.inp, group=group)
        else:
            # all_reduce / broadcast exist in place only in torch; out-of-place copies first,
            # except on a ringcc group, whose allreduce_into reads the input where it is.
            self.out = torch.empty(d.count, **kw)
            self.inp = self.out if in_place else torch.empty(d.count, **kw)
            if coll == "allreduce" and compression != "none":
                run = lambda: group.allreduce_compressed(self.out, compression, d.op, async_op=False)  # noqa: E731
            elif coll == "allreduce":
                run = lambda: dist.all_reduce(self.out, op=op, group=group)  # noqa: E731
            else:
                root = dist.get_global_rank(group, 0) if group is not None else 0
                run = lambda: dist.broadcast(self.out, src=root, group=group)  # noqa: E731
            if in_place:
                self.call = run
            elif coll == "allreduce" and hasattr(group, "allreduce_into"):
                wire = None if compression == "none" else compression
                self.call = lambda: group.allreduce_into(self.out, self.inp, op, async_op=False, compression=wire)
            else:
                def call():
                    self.out.copy_(self.inp)
                    run()
                self.call = call
        self.refill()

    def refill(self) -> None:
        self.data.fill_input(self.inp)

    def verify(self) -> int:
        self.refill()
        if not self.in_place:
            # The timed calls left the right answer in a separate output: a call that
            # does not write it must not pass.
            self.out.fill_(-7)
        self.call()
        return self.data.count_wrong(self.out, self.wire_dtype)


def run_rank(a: argparse.Namespace) -> int:
    """One rank (spawned by `ringcc bench` or by torchrun)."""
    import torch
    import torch.distributed as dist

    import ringcc  # noqa: F401 - registers the "ringcc" backend

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    timeout = datetime.timedelta(seconds=a.timeout)
    if a.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        sync = torch.cuda.synchronize
    else:
        device = torch.device("cpu")
        sync = lambda: None  # noqa: E731
    # The default group (gloo, CPU) only coordinates: barriers and the result reduction.
    dist.init_process_group("gloo", timeout=timeout)
    groups = {b: dist.new_group(backend=b, timeout=timeout) for b in a.backends}
    dtype = getattr(torch, a.dtype)
    n = world

    def agree(values: List[float], op) -> List[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=op)
        return t.tolist()

    # Before the first cell: every backend's first calls pay one-off costs (lazy setup,
    # first-touch pages, thread start-up) that would otherwise land in the first row.
    for b in a.backends:
        try:
            t = torch.zeros(1024, dtype=torch.float32, device=device)
            for _ in range(20):
                dist.all_reduce(t, group=groups[b])
            sync()
        except Exception:  # noqa: BLE001 - the cells report what fails, row by row
            pass
    dist.barrier()

    cells = [(c, s, p) for c in a.collectives for s in a.sizes
             for p in ("out-of-place", "in-place") if p == "out-of-place" or COLLECTIVES[c].in_place]
    progress = TextProgress(len(cells), rank == 0 and not a.no_progress)
    rows = []
    for coll, size, placement in cells:
        el = torch.empty(0, dtype=dtype).element_size()
        unit = el * (n if coll in ("allgather", "reduce_scatter", "alltoall") else 1)
        nbytes = size - size % unit
        count = nbytes // el
        progress.step(f"{coll} {fmt_size(size)} {placement}")
        data = Data(coll, count, n, rank, dtype, a.op, device)
        variants = [v for v in a.variants if v.runs(coll)]
        labels = [v.label for v in variants]
        run = {v.label: Cell(data, groups[v.backend], placement == "in-place", v.compression) for v in variants}
        errors = {}
        # Warm up, and time the warm-up to size the timed blocks.
        warm = []
        for b in labels:
            try:
                for _ in range(max(1, a.warmup)):
                    run[b].call()
                sync()
                dist.barrier()
                t0 = time.perf_counter()
                run[b].call()
                sync()
                warm.append(time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001 - reported in the table
                errors[b] = f"{type(exc).__name__}: {exc}"
                warm.append(0.0)
        slowest = max(agree(warm, dist.ReduceOp.MAX))
        iters = a.iters or max(5, min(1000, math.ceil(a.target_seconds / max(slowest, 1e-6))))
        rounds = min(ROUNDS, iters)
        split = [iters // rounds + (1 if i < iters % rounds else 0) for i in range(rounds)]
        elapsed = {b: 0.0 for b in labels}
        for i, k in enumerate(split):
            for b in (labels if i % 2 == 0 else labels[::-1]):
                if b in errors:
                    continue
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(k):
                    run[b].call()
                sync()
                elapsed[b] += time.perf_counter() - t0
        wrong = {}
        for b in labels:
            if b not in errors:
                try:
                    wrong[b] = run[b].verify()
                except Exception as exc:  # noqa: BLE001
                    errors[b] = f"{type(exc).__name__}: {exc}"
        times = agree([elapsed[b] / iters for b in labels], dist.ReduceOp.MAX)
        wrongs = agree([wrong.get(b, 0) for b in labels], dist.ReduceOp.SUM)
        failed = agree([1.0 if b in errors else 0.0 for b in labels], dist.ReduceOp.MAX)
        factor = COLLECTIVES[coll].busbw_factor(n)
        for v, b, t, w, f in zip(variants, labels, times, wrongs, failed):
            row = {"backend": b, "compression": v.compression, "collective": coll, "placement": placement, "dtype": a.dtype,
                   "op": a.op if COLLECTIVES[coll].reduces else "none", "size_bytes": nbytes, "count": count,
                   "nranks": n, "device": a.device, "iters": iters}
            if f:
                row.update(time_us=None, algbw_GBps=None, busbw_GBps=None, wrong=None,
                           error=errors.get(b, "failed on another rank"))
            else:
                algbw = nbytes / t / 1e9 if t > 0 else float("inf")
                row.update(time_us=t * 1e6, algbw_GBps=algbw, busbw_GBps=algbw * factor, wrong=int(w))
            rows.append(row)
        del run
    progress.close()
    dist.barrier()
    dist.destroy_process_group()  # and every group made above
    if rank == 0:
        add_ratios(rows, a.backends[-1])
        print(preamble(n), flush=True)
        print(report(rows, a, n), flush=True)
        if a.json:
            write_json(a.json, rows)
        if a.plot:
            plot(a.plot, rows)
    bad = sum(1 for r in rows if r["wrong"] or r.get("error"))
    return 1 if bad else 0


# ------------------------------------------------------------------------------ output
def add_ratios(rows: List[dict], baseline: str) -> None:
    """``ratio`` = baseline time / this time, per (collective, placement, size)."""
    base = {(r["collective"], r["placement"], r["size_bytes"]): r["time_us"] for r in rows if r["backend"] == baseline}
    for r in rows:
        b = base.get((r["collective"], r["placement"], r["size_bytes"]))
        r["ratio"] = b / r["time_us"] if b and r["time_us"] else None


def preamble(n: int) -> str:
    import platform

    import torch

    import ringcc

    cpu = platform.processor() or "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    launcher = "spawned by ringcc bench" if os.environ.get(CHILD_ENV) else "started by a launcher"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"# ringcc bench: ringcc {ringcc.__version__}, torch {torch.__version__}, {when}\n"
            f"# {n} ranks ({launcher}) on {platform.node()}: {os.cpu_count()} CPUs, {cpu}")


def _cell(r: Optional[dict]) -> str:
    if r is None:
        return f"{'':>10} {'':>8} {'':>8} {'':>6} {'':>7}"
    if r["time_us"] is None:
        return f"{'failed':>10} {'-':>8} {'-':>8} {'-':>6} {'-':>7}"
    ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
    return f"{r['time_us']:>10.1f} {r['algbw_GBps']:>8.3f} {r['busbw_GBps']:>8.3f} {r['wrong']:>6} {ratio:>7}"


def report(rows: List[dict], a: argparse.Namespace, n: int) -> str:
    lines = []
    for coll in a.collectives:
        mine = [r for r in rows if r["collective"] == coll]
        c = COLLECTIVES[coll]
        op = a.op if c.reduces else "none"
        lines += [
            f"# {coll}: {n} ranks, {a.device}, {a.dtype}, op {op}; backends {', '.join(v.label for v in a.variants if v.runs(coll))} "
            f"(ratio = {a.backends[-1]} time / this time)",
            f"# {'':>52}{'out-of-place':^44}   {'in-place':^44}",
            f"# {'size':>10} {'count':>11} {'type':>8} {'redop':>5} {'backend':>10}"
            f" {'time':>10} {'algbw':>8} {'busbw':>8} {'#wrong':>6} {'ratio':>7}  "
            f" {'time':>10} {'algbw':>8} {'busbw':>8} {'#wrong':>6} {'ratio':>7}",
            f"# {'(B)':>10} {'(elements)':>11} {'':>8} {'':>5} {'':>10}"
            f" {'(us)':>10} {'(GB/s)':>8} {'(GB/s)':>8} {'':>6} {'':>7}  "
            f" {'(us)':>10} {'(GB/s)':>8} {'(GB/s)':>8} {'':>6} {'':>7}",
        ]
        for size in sorted({r["size_bytes"] for r in mine}):
            for b in [v.label for v in a.variants if v.runs(coll)]:
                cell = {r["placement"]: r for r in mine if r["size_bytes"] == size and r["backend"] == b}
                any_row = next(iter(cell.values()))
                lines.append(f"  {size:>10} {any_row['count']:>11} {a.dtype:>8} {op:>5} {b:>10} "
                             f"{_cell(cell.get('out-of-place'))}   {_cell(cell.get('in-place'))}")
        errors = sorted({f"{r['backend']}: {r['error']}" for r in mine if r.get("error")})
        lines += [f"# error {e}" for e in errors]
        total_wrong = sum(r["wrong"] or 0 for r in mine)
        lines.append(f"# {coll}: #wrong total {total_wrong}")
        lines.append("")
    return "\n".join(lines).rstrip()


def write_json(path: str, rows: List[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")


def plot(path: str, rows: List[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("ringcc bench: --plot needs matplotlib (pip install matplotlib); no plot written", file=sys.stderr)
        return
    colls = sorted({r["collective"] for r in rows}, key=list(COLLECTIVES).index)
    fig, axes = plt.subplots(1, len(colls), figsize=(6 * len(colls), 4.2), squeeze=False)
    for ax, coll in zip(axes[0], colls):
        for k, b in enumerate(dict.fromkeys(r["backend"] for r in rows)):
            color = f"C{k}"  # one colour per backend; the line style tells the placement
            for placement, style in (("out-of-place", "--"), ("in-place", "-")):
                pts = sorted((r["size_bytes"], r["busbw_GBps"]) for r in rows
                             if r["collective"] == coll and r["backend"] == b and r["placement"] == placement
                             and r["busbw_GBps"] is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, marker="o", markersize=3,
                            label=f"{b} {placement}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("size (bytes)")
        ax.set_ylabel("busbw (GB/s)")
        r0 = next(r for r in rows if r["collective"] == coll)
        ax.set_title(f"{coll}, {r0['nranks']} ranks, {r0['dtype']}, {r0['device']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------ launcher
def spawn(argv: Sequence[str], nproc: int) -> int:
    """Start `nproc` ranks of this command on this host and wait for them. Rank 0 prints
    the table; a rank that crashes stops the others (exit code 1 is a rank that ran to
    the end and found wrong results: its peers finish too)."""
    return _launch.spawn("bench", argv, nproc, CHILD_ENV, benign_exit_codes=(1,))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    a = parser.parse_args(argv)
    check_args(parser, a)
    return _launch.run_or_spawn("ringcc bench", a.nproc, CHILD_ENV, lambda: run_rank(a), lambda n: spawn(argv, n))


if __name__ == "__main__":
    sys.exit(main())
