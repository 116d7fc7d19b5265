#!/usr/bin/env python3
"""One rank of an emulated-hosts fault run (bench/emulate_hosts.py --scenario ...).

Every rank runs in its own host namespace and reports what it does as one line per
event on stdout, ``@rcc {json}``, with the time of the event on CLOCK_MONOTONIC (the
same clock in every network namespace of the machine, and in the harness), so the
harness can trigger a fault when a rank reaches a step and measure how long the others
took to notice. Events: ready, step, error, done, exit (main returns).

    allreduce   ringcc.Communicator over a TCPStore on rank 0: --steps allreduces (sum)
                of --elements float32 values, each result checked exactly. The rank
                --sleep-rank sleeps --sleep-s seconds before every --sleep-every'th
                allreduce: that sleep is the workload under test (a slow rank's
                compute), not synchronisation.
    ps-async    ringcc.DistributedDataParallel(strategy="ps", mode "async") on a toy
                regression; the server lives in rank 0 with the store. Survivors leave
                through the store, highest rank first, so rank 0 (the server) goes last;
                the ranks in --lost-ranks (the harness's fault plan) are not waited for.
                --sleep-rank/--sleep-s/--sleep-every slow a worker down as above.

Exit status: 0 done, 3 a ringcc error (reported in the "error" event), 1 anything else
(also reported, e.g. a wrong allreduce result).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import traceback

import numpy as np

import ringcc


def emit(ev: str, **fields) -> None:
    print("@rcc " + json.dumps(dict(ev=ev, t=time.monotonic(), **fields)), flush=True)


def run_allreduce(a: argparse.Namespace, state: dict) -> None:
    import torch.distributed as dist

    store = dist.TCPStore(a.master, a.port, a.world, is_master=a.rank == 0,
                          timeout=datetime.timedelta(seconds=a.setup_timeout))
    comm = ringcc.Communicator(store, a.rank, a.world, timeout=a.timeout)
    emit("ready", ringcc=ringcc.__file__, transport=[comm.transport_to(p) for p in range(a.world)])
    n = a.world
    base = (np.arange(a.elements) % 4096).astype(np.float32)
    x = np.empty(a.elements, np.float32)
    for step in range(a.steps):
        state["step"] = step
        if a.rank == a.sleep_rank and step % a.sleep_every == 0:
            time.sleep(a.sleep_s)  # the slow rank's compute: the behaviour under test
        np.add(base, a.rank + step % 1000, out=x)
        t0 = time.monotonic()
        comm.allreduce(x)
        dt = time.monotonic() - t0
        # Every value is a small integer: the float32 sum is exact in any order.
        expect = n * base + (n * (n - 1) // 2 + n * (step % 1000))
        if not np.array_equal(x, expect):
            bad = int(np.count_nonzero(x != expect))
            raise AssertionError(f"allreduce step {step}: {bad} of {a.elements} values wrong")
        emit("step", step=step + 1, dt=dt)
    comm.close()
    emit("done", steps=a.steps)


def run_ps_async(a: argparse.Namespace, state: dict) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    dist.init_process_group("gloo", init_method=f"tcp://{a.master}:{a.port}", rank=a.rank, world_size=a.world,
                            timeout=datetime.timedelta(seconds=a.setup_timeout))
    torch.manual_seed(0)
    w_true, b_true = torch.randn(8, 1), torch.randn(1)
    model = nn.Linear(8, 1)
    ddp = ringcc.DistributedDataParallel(model, strategy="ps", ps_options=dict(
        mode="async", lr=0.05, momentum=0.5, staleness=a.world, timeout=a.timeout,
        shutdown_timeout=a.shutdown_timeout))
    emit("ready", ringcc=ringcc.__file__)
    g = torch.Generator().manual_seed(100 + a.rank)  # each worker its own data
    for step in range(a.steps):
        state["step"] = step
        if a.rank == a.sleep_rank and step % a.sleep_every == 0:
            time.sleep(a.sleep_s)  # the slow worker's compute: the behaviour under test
        x = torch.randn(16, 8, generator=g)
        ddp.zero_grad()
        loss = nn.functional.mse_loss(ddp(x), x @ w_true + b_true)
        loss.backward()  # pushes the gradient; the fresh parameters come back
        emit("step", step=step + 1, loss=loss.item())
    x = torch.randn(256, 8, generator=g)
    with torch.no_grad():
        final = nn.functional.mse_loss(model(x), x @ w_true + b_true).item()
    store = dist.distributed_c10d._get_default_store()
    live = [r for r in range(a.world) if r not in a.lost_ranks]
    for r in reversed(live):  # highest first: rank 0's server has every live goodbye before it stops
        if r == a.rank:
            ddp.close()
            store.set(f"fault/left/{r}", b"1")
        else:
            store.get(f"fault/left/{r}")
    emit("done", steps=a.steps, final_loss=final, stale_pushes=ddp._strategy.stale_pushes)
    dist.destroy_process_group()  # no gloo group may outlive the interpreter


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("scenario", choices=["allreduce", "ps-async"])
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--master", required=True, help="address of rank 0 (store, parameter server)")
    ap.add_argument("--port", type=int, default=29500)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--elements", type=int, default=1 << 18)
    ap.add_argument("--timeout", type=float, default=10.0, help="ringcc timeout (communicator / parameter server)")
    ap.add_argument("--setup-timeout", type=float, default=120.0, help="store and process-group rendezvous")
    ap.add_argument("--sleep-rank", type=int, default=-1)
    ap.add_argument("--sleep-s", type=float, default=0.0)
    ap.add_argument("--sleep-every", type=int, default=1, help="sleep before steps 0, K, 2K, ...")
    ap.add_argument("--shutdown-timeout", type=float, default=3.0)
    ap.add_argument("--lost-ranks", type=lambda s: [int(x) for x in s.split(",") if x], default=[])
    a = ap.parse_args(argv)
    state = {"step": None}
    status = 0
    try:
        (run_allreduce if a.scenario == "allreduce" else run_ps_async)(a, state)
    except Exception as exc:  # noqa: BLE001 - reported, then the exit status says what kind
        emit("error", type=type(exc).__name__, ringcc=isinstance(exc, ringcc.Error), message=str(exc),
             step=state["step"], trace=traceback.format_exc(limit=8))
        status = 3 if isinstance(exc, ringcc.Error) else 1
    # allreduce: the communicator is gone here (with the traceback that held it), so
    # what remains until the process ends is the interpreter's teardown. ps-async: the
    # wrapper's goodbye to the servers runs at exit.
    emit("exit", status=status)
    return status


if __name__ == "__main__":
    sys.exit(main())
