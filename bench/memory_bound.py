"""Memory-bandwidth bound for shared-memory collectives on this machine.

A shared-memory allreduce of S bytes on n ranks must at least read every input once
and write every output once: 2·n·S bytes of DRAM traffic in total. With k processes
copying at once the machine sustains B_k bytes copied per second (2·B_k of traffic),
so t >= n·S / B_n. This script measures B_1 .. B_k with k concurrent np.copyto loops.

    python bench/memory_bound.py [--procs 1,2] [--mib 64]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import numpy as np


def _copy_loop(nbytes: int, iters: int, barrier, results) -> None:
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in before timing
    barrier.wait()
    start = time.perf_counter()
    for _ in range(iters):
        np.copyto(dst, src)
    results.put(iters * nbytes / (time.perf_counter() - start))


def concurrent_copy_bandwidth(procs: int, nbytes: int, iters: int = 20) -> float:
    """Total bytes copied per second by `procs` processes copying at the same time."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_copy_loop, args=(nbytes, iters, barrier, results)) for _ in range(procs)]
    for w in workers:
        w.start()
    total = sum(results.get() for _ in workers)
    for w in workers:
        w.join()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", default="1,2", help="comma-separated process counts")
    parser.add_argument("--mib", type=int, default=64, help="buffer size S in MiB")
    args = parser.parse_args()
    nbytes = args.mib << 20
    print(f"buffer S = {args.mib} MiB")
    for procs in (int(p) for p in args.procs.split(",")):
        bw = concurrent_copy_bandwidth(procs, nbytes)
        line = f"{procs} concurrent copies: {bw / 1e9:6.2f} GB/s copied in total"
        if procs > 1:
            bound_s = procs * nbytes / bw
            busbw = nbytes / bound_s * 2 * (procs - 1) / procs
            line += (f"; allreduce of S on {procs} ranks: t >= {procs}*S/B = {bound_s * 1e3:6.2f} ms,"
                     f" busbw <= {busbw / 1e9:5.2f} GB/s")
        print(line)


if __name__ == "__main__":
    main()
