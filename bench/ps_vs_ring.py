"""Parameter server (sync push_pull, 1 and 2 servers) against ring allreduce avg.

W worker processes on this host average the same float32 gradient three ways, in
interleaved rounds of one run (so drift on a shared machine hits all three alike):

  ring  ringcc Communicator allreduce(op="avg"), ring algorithm, over --transport
  ps1   ringcc.ps Client.push_pull against 1 server process (sync mode)
  ps2   the same against 2 server processes (shards placed by key id)

The bound, for S bytes of gradient, W workers and s servers:
  ring: each rank sends and receives 2(W-1)/W * S (reduce-scatter + allgather), in
        2(W-1) steps; W·2(W-1)/W·S = 2(W-1)·S bytes cross links in total.
  PS:   each worker sends S and receives S; server j's link carries W·S/s in each
        direction (if the shards split evenly), so the servers' links move W·S up and
        W·S down in total: 2W·S bytes, and with s < W the server links are the narrow
        point (W/s · S per direction per server link versus ~S per worker link).
For W=2 the ring moves 2S in total and the PS 4S; on one host every byte is a copy
through the loopback stack, so the expected ratio is about 2 before the server's
summation work. Times are the slowest worker's per step (max over ranks).

    python bench/ps_vs_ring.py [--workers 2] [--sizes-mib 1,16,64] [--reps 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import time

import numpy as np

METHODS = ("ring", "ps1", "ps2")


def _store(port: int):
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=120))


def _server(port: int, prefix: str, index: int, num_servers: int, workers: int) -> None:
    from ringcc import ps

    server = ps.Server(_store(port), index, num_servers, workers, "sync", listen_host="127.0.0.1",
                       timeout=120.0, prefix=prefix).start()
    server.wait()  # until every worker sent SHUTDOWN
    server.stop()


def _worker(port: int, rank: int, workers: int, sizes_mib: list, reps: int, results, transport: str) -> None:
    import ringcc
    from ringcc import ps

    store = _store(port)
    comm = ringcc.Communicator(store, rank, workers, transport=transport, allreduce_algorithm="ring",
                               listen_address="127.0.0.1")
    clients = {"ps1": ps.Client(store, rank, workers, 1, prefix="ps1/", timeout=120.0),
               "ps2": ps.Client(store, rank, workers, 2, prefix="ps2/", timeout=120.0)}
    rng = np.random.default_rng(rank)
    times = {}  # (mib, method) -> [seconds]
    for mib in sizes_mib:
        numel = (mib << 20) // 4
        grad = rng.standard_normal(numel).astype(np.float32)
        buf = np.empty_like(grad)
        for c in clients.values():
            c.register(f"g{mib}", numel)
        results_of = {}
        for rep in range(reps + 1):  # rep 0 warms up connections, pages and server buffers
            for method in METHODS:
                np.copyto(buf, grad)
                comm.barrier()  # every worker starts the step together
                t0 = time.perf_counter()
                if method == "ring":
                    comm.allreduce(buf, op="avg")
                else:
                    clients[method].push_pull(f"g{mib}", buf)
                dt = time.perf_counter() - t0
                if rep:
                    times.setdefault(f"{mib}:{method}", []).append(dt)
                results_of[method] = buf.copy() if rep == 0 else results_of[method]
        # The three answers must agree (fp32 averages of the same inputs, summed in
        # different orders: within a few ulps).
        for method in ("ps1", "ps2"):
            np.testing.assert_allclose(results_of[method], results_of["ring"], rtol=1e-6, atol=1e-6)
    # Slowest worker per step: the step is done when the last worker has its answer.
    keys = sorted(times)
    local = np.array([times[k] for k in keys], np.float64)
    slowest = comm.allreduce(local.copy(), op="max")
    for c in clients.values():
        c.shutdown()
        c.close()
    if rank == 0:
        results.put({k: slowest[i].tolist() for i, k in enumerate(keys)})
    comm.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(workers: int, sizes_mib: list, reps: int, transport: str = "tcp") -> dict:
    import torch.distributed as dist

    # The servers and clients read it in the spawned processes: the same transport for
    # the parameter server as for the ring.
    os.environ["RINGCC_PS_TRANSPORT"] = "tcp" if transport == "tcp" else "auto"
    port = _free_port()
    master = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_server, args=(port, "ps1/", 0, 1, workers))]
    procs += [ctx.Process(target=_server, args=(port, "ps2/", i, 2, workers)) for i in range(2)]
    procs += [ctx.Process(target=_worker, args=(port, r, workers, sizes_mib, reps, results, transport)) for r in range(workers)]
    for p in procs:
        p.start()
    raw = results.get(timeout=600)
    for p in procs:
        p.join(120)
        if p.exitcode != 0:
            raise RuntimeError(f"{p.name} exited with {p.exitcode}")
    del master
    rows = []
    for mib in sizes_mib:
        ring = statistics.median(raw[f"{mib}:ring"])
        for method in METHODS:
            t = statistics.median(raw[f"{mib}:{method}"])
            rows.append(dict(size_mib=mib, method=method, median_s=t, min_s=min(raw[f"{mib}:{method}"]),
                             algbw_gbs=(mib << 20) / t / 1e9, ratio_vs_ring=t / ring,
                             samples_s=raw[f"{mib}:{method}"]))
    return dict(workers=workers, sizes_mib=sizes_mib, reps=reps, transport=transport, host=platform.node(), cpus=os.cpu_count(),
                python=platform.python_version(), rows=rows)


def table(res: dict) -> str:
    lines = ["| size | method | time/step (median) | min | algbw | time vs ring |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in res["rows"]:
        lines.append(f"| {r['size_mib']} MiB | {r['method']} | {r['median_s'] * 1e3:.1f} ms | "
                     f"{r['min_s'] * 1e3:.1f} ms | {r['algbw_gbs']:.2f} GB/s | {r['ratio_vs_ring']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--sizes-mib", default="1,16,64")
    p.add_argument("--reps", type=int, default=5, help="timed steps per size and method (after one warm-up)")
    p.add_argument("--transport", choices=("tcp", "shm"), default="tcp",
                   help="both the ring and the parameter server over TCP loopback, or shared memory")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    t0 = time.perf_counter()
    res = run(args.workers, [int(s) for s in args.sizes_mib.split(",")], args.reps, args.transport)
    res["wall_s"] = time.perf_counter() - t0
    print(table(res))
    print(f"({args.workers} workers, {args.transport}, {args.reps} steps each, wall {res['wall_s']:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
