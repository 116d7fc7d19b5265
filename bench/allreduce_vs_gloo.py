#!/usr/bin/env python
"""ringcc vs torch.distributed gloo: in-place float32 sum allreduce on local CPU processes.

For each world size, the parent spawns that many processes once. Every rank joins a gloo
process group and a ringcc Communicator that share one TCPStore, then for each message
size measures both backends in the same run, interleaved in A-B-B-A rounds so that
machine drift hits both alike. Each timed block starts after dist.barrier(); a rank's time
per iteration is (t_end - t_start) / iters and the reported time is the maximum over ranks.

Correctness: after the timed iterations, every buffer is filled with (rank + 1) and reduced
once more, untimed; every element must then equal n(n+1)/2 exactly. The final contents of
each timed block are also checked: every element on every rank must equal rank 0's first
element. #wrong counts the elements that fail either check, summed over ranks.

    python bench/allreduce_vs_gloo.py --nproc 2,4 --sizes 4K,1M,64M \
        --out-md bench/results/allreduce_vs_gloo_cpu.md --out-json bench/results/allreduce_vs_gloo_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import queue
import shlex
import socket
import sys
import time

BACKENDS = ("ringcc", "gloo")
ROUNDS = 4  # timed blocks per backend and size, ordered A B B A A B B A ...; iterations split among them


# ----------------------------------------------------------------------------- helpers
def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1] in scale:
        value = int(float(text[:-1]) * scale[text[-1]])
    else:
        value = int(text)
    if value <= 0 or value % 4:
        raise argparse.ArgumentTypeError(f"size {text!r} must be a positive multiple of 4 bytes (float32)")
    return value


def fmt_size(nbytes: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return str(nbytes)


def default_iters(nbytes: int) -> int:
    """About 2e8 bytes per backend and size, clamped to [10, 2000] (4K: 2000, 1M: 200, 64M: 10)."""
    return max(10, min(2000, round(2.1e8 / nbytes)))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memcpy_bandwidth(nbytes: int = 64 << 20, repeats: int = 7) -> float:
    """Best-of-`repeats` numpy copy of a float32 array, in GB/s (bytes copied / time)."""
    import numpy as np

    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault in the pages
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ----------------------------------------------------------------------------- worker
def worker(rank: int, world_size: int, port: int, args: dict, results) -> None:
    import torch
    import torch.distributed as dist

    import ringcc

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=(rank == 0),
                          timeout=datetime.timedelta(seconds=args["timeout"]))
    dist.init_process_group("gloo", store=dist.PrefixStore("gloo", store), rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=args["timeout"]))
    comm = ringcc.Communicator(dist.PrefixStore("ringcc", store), rank, world_size, name="bench",
                               transport=args["transport"], listen_address="127.0.0.1",
                               timeout=args["timeout"])
    links = sorted({comm.transport_to(p) for p in range(world_size) if p != rank})

    def run_ringcc(t):
        comm.allreduce(t)

    def run_gloo(t):
        dist.all_reduce(t, op=dist.ReduceOp.SUM)

    run = {"ringcc": run_ringcc, "gloo": run_gloo}
    expected_once = world_size * (world_size + 1) / 2
    rows = []
    for nbytes in args["sizes"]:
        count = nbytes // 4
        iters = args["iters"] or default_iters(nbytes)
        warmup = args["warmup"] if args["warmup"] is not None else max(2, iters // 10)
        rounds = min(ROUNDS, iters)
        split = [iters // rounds + (1 if r < iters % rounds else 0) for r in range(rounds)]
        bufs = {b: torch.empty(count, dtype=torch.float32) for b in BACKENDS}
        elapsed = {b: [] for b in BACKENDS}
        wrong = {b: 0 for b in BACKENDS}

        for b in BACKENDS:
            bufs[b].fill_(rank + 1)
            for _ in range(warmup):
                run[b](bufs[b])

        for r, n_it in enumerate(split):
            order = BACKENDS if r % 2 == 0 else BACKENDS[::-1]
            for b in order:
                t = bufs[b]
                t.fill_(rank + 1)
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(n_it):
                    run[b](t)
                elapsed[b].append(time.perf_counter() - t0)
                # Consistency of the timed block's result: all elements on all ranks agree.
                ref = torch.tensor([t[0].item()], dtype=torch.float32)
                dist.broadcast(ref, src=0)
                wrong[b] += int((t != ref[0]).sum().item())

        # Exact check of one (untimed) reduction of freshly filled buffers.
        for b in BACKENDS:
            t = bufs[b]
            t.fill_(rank + 1)
            run[b](t)
            wrong[b] += int((t != expected_once).sum().item())

        local = {b: (elapsed[b], wrong[b]) for b in BACKENDS}
        gathered = [None] * world_size
        dist.all_gather_object(gathered, local)
        if rank == 0:
            for b in BACKENDS:
                # Per-round time per iteration: the max over ranks of that round.
                per_round = [max(g[b][0][i] for g in gathered) / split[i] * 1e6 for i in range(rounds)]
                total = max(sum(g[b][0]) for g in gathered) / iters
                algbw = nbytes / total / 1e9
                rows.append({
                    "backend": b,
                    "collective": "allreduce",
                    "dtype": "float32",
                    "world_size": world_size,
                    "size_bytes": nbytes,
                    "count": count,
                    "time_us": total * 1e6,
                    "algbw_GBps": algbw,
                    "busbw_GBps": algbw * 2 * (world_size - 1) / world_size,
                    "wrong": sum(g[b][1] for g in gathered),
                    "iters": iters,
                    "warmup": warmup,
                    "round_time_us": per_round,
                    "ringcc_links": links if b == "ringcc" else None,
                })
            print(f"[nproc={world_size}] {fmt_size(nbytes):>5}: "
                  + ", ".join(f"{r['backend']} {r['time_us']:.1f} us" for r in rows[-2:]), flush=True)
        del bufs

    dist.barrier()
    comm.close()
    dist.destroy_process_group()
    if rank == 0:
        results.put(rows)


def _child(rank, world_size, port, args, results):
    try:
        worker(rank, world_size, port, args, results)
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def run_world(world_size: int, args: dict) -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world_size, port, args, results), name=f"bench-rank{r}")
             for r in range(world_size)]
    for p in procs:
        p.start()
    rows = None
    deadline = time.monotonic() + args["timeout"] * 4
    try:
        while True:
            try:
                rows = results.get(timeout=0.5)
            except queue.Empty:
                pass
            failed = [p for p in procs if p.exitcode not in (None, 0)]
            if failed:
                raise RuntimeError(", ".join(f"{p.name} exited with code {p.exitcode}" for p in failed))
            if rows is not None and all(p.exitcode is not None for p in procs):
                break
            if rows is None and all(p.exitcode == 0 for p in procs):
                raise RuntimeError(f"nproc={world_size}: all ranks exited but rank 0 sent no results")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nproc={world_size}: timed out waiting for the ranks")
    except BaseException:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(10)
        raise
    for p in procs:
        p.join()
    bad = [p for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(", ".join(f"{p.name} exited with code {p.exitcode}" for p in bad))
    return rows


# ----------------------------------------------------------------------------- report
HEADER = (f"{'size':>10} {'count':>11} {'type':>7} {'redop':>5} {'backend':>7} {'time(us)':>11} "
          f"{'algbw(GB/s)':>11} {'busbw(GB/s)':>11} {'#wrong':>6} {'ringcc/gloo':>11}")


def table(rows: list, world_size: int) -> str:
    lines = [f"# allreduce, float32, sum, nproc={world_size}; last column: ringcc busbw / gloo busbw "
             f"(= gloo time / ringcc time)", HEADER]
    mine = [r for r in rows if r["world_size"] == world_size]
    for nbytes in sorted({r["size_bytes"] for r in mine}):
        by = {r["backend"]: r for r in mine if r["size_bytes"] == nbytes}
        for b in BACKENDS:
            r = by[b]
            ratio = f"{by['gloo']['time_us'] / by['ringcc']['time_us']:.2f}" if b == "ringcc" else "-"
            lines.append(f"{nbytes:>10} {r['count']:>11} {'float':>7} {'sum':>5} {b:>7} {r['time_us']:>11.1f} "
                         f"{r['algbw_GBps']:>11.3f} {r['busbw_GBps']:>11.3f} {r['wrong']:>6} {ratio:>11}")
    return "\n".join(lines)


def spread_lines(rows: list) -> str:
    out = []
    for r in rows:
        t = r["round_time_us"]
        out.append(f"nproc={r['world_size']} {fmt_size(r['size_bytes']):>4} {r['backend']:>6}: "
                   f"iters={r['iters']} warmup={r['warmup']}, per-round us/iter "
                   + " ".join(f"{x:.1f}" for x in t) + f"  (max/min {max(t) / min(t):.2f})")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", default="2,4", help="comma-separated world sizes (default 2,4)")
    ap.add_argument("--sizes", default="4K,1M,64M", help="comma-separated message sizes in bytes, K/M/G suffixes")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per backend and size "
                    "(default: scaled by size, 4K: 2000, 1M: 200, 64M: 10)")
    ap.add_argument("--warmup", type=int, default=None, help="warmup iterations (default: 10%% of iters, >= 2)")
    ap.add_argument("--transport", default="auto", choices=("auto", "shm", "tcp"), help="ringcc transport")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds for rendezvous and each collective")
    ap.add_argument("--out-md", default=None, help="write a markdown report here")
    ap.add_argument("--out-json", default=None, help="write the rows as JSON here")
    ns = ap.parse_args()

    nprocs = [int(x) for x in ns.nproc.split(",") if x.strip()]
    if any(n < 1 for n in nprocs):
        ap.error("--nproc values must be >= 1")
    sizes = [parse_size(x) for x in ns.sizes.split(",") if x.strip()]
    if ns.iters is not None and ns.iters < 1:
        ap.error("--iters must be >= 1")
    args = {"sizes": sizes, "iters": ns.iters, "warmup": ns.warmup, "transport": ns.transport,
            "timeout": ns.timeout}

    import numpy
    import torch

    import ringcc

    started = datetime.datetime.now(datetime.timezone.utc)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    mem_bw = memcpy_bandwidth()
    print(f"memcpy (numpy copy, 64 MiB float32, best of 7): {mem_bw:.2f} GB/s", flush=True)

    rows = []
    t0 = time.perf_counter()
    for n in nprocs:
        rows += run_world(n, args)
    wall = time.perf_counter() - t0

    tables = "\n\n".join(table(rows, n) for n in nprocs)
    print()
    print(tables)
    print()
    print(spread_lines(rows))
    total_wrong = sum(r["wrong"] for r in rows)
    print(f"\n# total #wrong: {total_wrong}; benchmark wall time {wall:.1f} s")

    if ns.out_json:
        os.makedirs(os.path.dirname(os.path.abspath(ns.out_json)), exist_ok=True)
        with open(ns.out_json, "w") as f:
            json.dump(rows, f, indent=1)
            f.write("\n")
    if ns.out_md:
        links = sorted({k for r in rows if r["ringcc_links"] for k in r["ringcc_links"]})
        md = [
            "# ringcc vs gloo: CPU allreduce",
            "",
            f"- date (UTC): {started.strftime('%Y-%m-%d %H:%M:%S')}",
            f"- machine: {os.cpu_count()} cores, {cpu_model()}, Linux {platform.release()}",
            f"- torch {torch.__version__}, ringcc {ringcc.__version__} "
            f"(simd {ringcc.info().get('simd_active')}, {ringcc.info().get('build_type')}), "
            f"numpy {numpy.__version__}, Python {platform.python_version()}",
            f"- ringcc transport: {ns.transport} (links used: {', '.join(links) or 'none'}); gloo: default options",
            f"- memory bound: numpy copy of a 64 MiB float32 array, best of 7: {mem_bw:.2f} GB/s "
            "(bytes copied / time)",
            f"- command: `{command}`",
            f"- wall time of the benchmark: {wall:.1f} s; total #wrong: {total_wrong}",
            "",
            "Local processes on one host, float32 in-place sum on CPU torch tensors. Both backends are measured "
            f"in the same processes, interleaved in {ROUNDS} A-B-B-A rounds per size; each round starts after "
            "dist.barrier(). time = max over ranks of (t_end - t_start) / iters; algbw = bytes / time; "
            "busbw = algbw * 2(n-1)/n. #wrong: elements that differ from n(n+1)/2 after one untimed call on "
            "buffers filled with rank+1, plus elements of each timed block's final contents that differ from "
            "rank 0's first element, summed over ranks. ringcc/gloo = ringcc busbw / gloo busbw "
            "(= gloo time / ringcc time; > 1 means ringcc is faster).",
            "",
            "```",
            tables,
            "```",
            "",
            "Per-round time per iteration (max over ranks), to show run-to-run variance:",
            "",
            "```",
            spread_lines(rows),
            "```",
            "",
        ]
        os.makedirs(os.path.dirname(os.path.abspath(ns.out_md)), exist_ok=True)
        with open(ns.out_md, "w") as f:
            f.write("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
