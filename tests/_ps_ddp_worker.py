"""One rank of tests/test_ps_ddp.py: ringcc.DistributedDataParallel with strategy="ps"
and strategy="auto". Prints one line ``RESULTS <json>`` mapping check names to "ok" or
the failure.

    python tests/_ps_ddp_worker.py --rank R --world N --init-method URL --scenario NAME

Scenarios: sync (ring vs parameter server, 1 and 2 co-located servers, fp16), async
(server-side SGD; with --die-rank that rank SIGKILLs itself part-way), auto (the ring
forms; then a pair is made unreachable and the wrapper falls back), dedicated (servers
are `ringcc ps-server` processes the test starts after the workers).
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import logging
import os
import signal
import sys

import torch
import torch.distributed as dist
from torch import nn

import _ddp_worker as ddpw  # tests/ is this script's directory
import _torch_backend_worker as base
from _ddp_worker import SMALL_CAP_MB, all_data, compare, max_diff, train_ddp, train_single
from _torch_backend_worker import Checks, load_backend, same_on_every_rank

CAPS = dict(bucket_cap_mb=SMALL_CAP_MB, first_bucket_mb=SMALL_CAP_MB)  # several buckets

import ringcc
from ringcc.ps_strategy import PsStrategy

# fp16 wire both ways (push and reply) rounds each value to 2^-11 of its block's scale;
# over 5 SGD steps of this model the parameters moved by at most ~1e-4 (measured), so
# 3e-4 is the bound, the same as the ring's compressed allreduce in test_ddp.
BOUND_FP16 = 3e-4


def check_sync(c: Checks) -> None:
    rank, world = c.rank, c.world
    data = all_data(5, 23, world)

    for servers in (1, 2):
        def ps_equals_ring(servers=servers):
            _, ring = train_ddp(rank, world, data, **CAPS)
            ddp, ps = train_ddp(rank, world, data, **CAPS, strategy="ps",
                                ps_options=dict(num_servers=servers))
            assert isinstance(ddp._strategy, PsStrategy) and ddp._strategy.num_servers == min(servers, world)
            assert ddp.buckets_rebuilt and len(ddp._buckets) > 1, "want several buckets and a rebuilt layout"
            ddp.close()
            compare(ps, ring, f"ps ({servers} servers) vs ring", rtol=1e-5, atol=1e-6)
            compare(ps, train_single(data), f"ps ({servers} servers) vs single process")
            same_on_every_rank(ps, f"ps ({servers} servers)")
        c.run(f"sync/equals_ring/{servers}_servers", ps_equals_ring)

    def fp16():
        ddp, mine = train_ddp(rank, world, data, **CAPS, strategy="ps", compression="fp16")
        ddp.close()
        ddp, ref = train_ddp(rank, world, data, **CAPS, strategy="ps")
        ddp.close()
        print(f"ps fp16: max |diff| vs fp32 = {max_diff(mine, ref):.3g}", flush=True)
        compare(mine, ref, "ps fp16 vs ps fp32", rtol=0, atol=BOUND_FP16)
        assert any(not torch.equal(a, b) for a, b in zip(mine, ref)), "fp16 changed nothing"
        same_on_every_rank(mine, "ps fp16")
    c.run("sync/fp16", fp16)


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 1)

    def forward(self, x):
        return self.fc(x)


ASYNC_STEPS, ASYNC_TARGET = 60, 1e-3


def check_async(c: Checks, die_rank: int) -> None:
    """Toy regression y = x.w + b; the servers run SGD. With die_rank >= 0 that rank
    kills itself after 3 steps; the others must still finish and reach the target."""
    rank, world = c.rank, c.world

    def train():
        torch.manual_seed(0)
        w_true, b_true = torch.randn(8, 1), torch.randn(1)
        model = Regression()
        ddp = ringcc.DistributedDataParallel(model, strategy="ps", ps_options=dict(
            mode="async", lr=0.05, momentum=0.5, staleness=world, shutdown_timeout=1.0))
        start = [p.detach().clone() for p in model.parameters()]
        g = torch.Generator().manual_seed(100 + rank)  # each worker its own data
        for step in range(ASYNC_STEPS):
            if rank == die_rank and step == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            x = torch.randn(16, 8, generator=g)
            ddp.zero_grad()
            nn.functional.mse_loss(ddp(x), x @ w_true + b_true).backward()
        assert any(not torch.equal(a, p) for a, p in zip(start, model.parameters())), "parameters never changed"
        x = torch.randn(256, 8, generator=g)
        with torch.no_grad():
            loss = nn.functional.mse_loss(model(x), x @ w_true + b_true).item()
        print(f"async: final loss {loss:.3g}, stale pushes {ddp._strategy.stale_pushes}", flush=True)
        # Survivors leave in turn, highest rank first (through the store, not the dead
        # rank's gloo group), so that rank 0's co-located server has every live worker's
        # goodbye before it waits for the dead one's.
        store = dist.distributed_c10d._get_default_store()
        live = [r for r in range(world) if r != die_rank]
        for r in reversed(live):
            if r == rank:
                ddp.close()
                store.set(f"test/left/{r}", b"1")
            else:
                store.get(f"test/left/{r}")
        assert loss < ASYNC_TARGET, f"async training reached loss {loss} (target {ASYNC_TARGET})"
    c.run("async/reaches_target" + ("_despite_a_dead_worker" if die_rank >= 0 else ""), train)


def check_auto(c: Checks) -> None:
    rank, world = c.rank, c.world
    data = all_data(4, 29, world)
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logging.getLogger("ringcc").addHandler(Keep())

    def ring_forms():
        ddp, got = train_ddp(rank, world, data, **CAPS, strategy="auto", ring_timeout=30)
        assert type(ddp._strategy).__name__ == "RingStrategy", type(ddp._strategy)
        assert ringcc.hooks.is_ringcc_group(ddp._strategy.group)
        compare(got, train_single(data), "auto (ring) vs single process")
        ddp.close()
    c.run("auto/ring_forms", ring_forms)

    def falls_back():
        os.environ["RINGCC_TEST_UNREACHABLE"] = "0-1"
        try:
            ddp, got = train_ddp(rank, world, data, **CAPS, strategy="auto", ring_timeout=3)
        finally:
            del os.environ["RINGCC_TEST_UNREACHABLE"]
        assert isinstance(ddp._strategy, PsStrategy), type(ddp._strategy)
        ddp.close()
        compare(got, train_single(data), "auto (parameter-server fallback) vs single process")
        same_on_every_rank(got, "auto fallback")
        logged = [m for m in records if "could not be formed" in m]
        assert logged, f"no fallback log record; got {records}"
        assert "ranks [0, 1" in logged[0] and "rank 1: " in logged[0], logged[0]
        print(f"auto fallback logged: {logged[0]}", flush=True)
    c.run("auto/falls_back_when_a_pair_is_unreachable", falls_back)


def check_dedicated(c: Checks) -> None:
    rank, world = c.rank, c.world
    data = all_data(4, 31, world)

    def train():
        print("WRAPPING", flush=True)  # the test starts the server after every rank says this
        ddp, got = train_ddp(rank, world, data, **CAPS, strategy="ps",
                             ps_options=dict(dedicated_servers=1))
        assert not ddp._strategy._servers, "the wrapper started a server although one is dedicated"
        ddp.close()
        compare(got, train_single(data), "dedicated server vs single process")
        same_on_every_rank(got, "dedicated server")
    c.run("dedicated/trains_with_server_started_last", train)


def main() -> int:
    args = base.worker_args(**{"--scenario": dict(required=True), "--die-rank": dict(type=int, default=-1)})
    load_backend().register()
    faulthandler.dump_traceback_later(150, exit=True)  # diagnostics only
    c = Checks(args.rank, args.world)
    # "sync" compares with the ring, so its default group is ringcc; the others run on
    # gloo ("auto" must form its ring itself; "async" must survive a dead rank).
    backend = "ringcc" if args.scenario == "sync" else "gloo"
    dist.init_process_group(backend, init_method=args.init_method, rank=args.rank, world_size=args.world,
                            timeout=datetime.timedelta(seconds=60))
    base.GLOO = ddpw.GLOO = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    if args.scenario == "sync":
        check_sync(c)
    elif args.scenario == "async":
        check_async(c, args.die_rank)
    elif args.scenario == "auto":
        check_auto(c)
    elif args.scenario == "dedicated":
        check_dedicated(c)
    else:
        raise SystemExit(f"unknown scenario {args.scenario}")
    print("RESULTS " + json.dumps(c.results), flush=True)
    base.destroy_groups(ddpw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
