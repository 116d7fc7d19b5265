"""One rank of tests/test_torch_faults.py: the "ringcc" torch.distributed backend when a
peer dies, aborts, or when the group is destroyed with work in flight.

    python tests/_torch_faults_worker.py --rank R --world N --init-method URL --scenario S

Scenarios (every rank prints what happened as ``<WORD> <json>`` lines):
  stream        dist.all_reduce forever (--async: two async_op=True works in flight per
                step), results checked; "READY" after 20 steps. On an error: "ERROR" (type,
                message, time.monotonic() of the catch), then destroy_process_group()
                (unless --no-destroy: then the interpreter exits with the group alive).
  abort         the ranks in --blocked enter a collective that cannot finish without
                the others (--async: an async one, waited on) and print "BLOCKED"; the
                others wait for a line on stdin, then call torch's
                _abort_process_group() and print "ABORTED". Blocked ranks print
                "ERROR" for what they raise, then destroy_process_group().
  inflight      every rank issues several async collectives and destroys the group
                without waiting for them; then checks what each work returns.
  unmatched     rank 0 issues an async all_reduce nobody else issues; every rank then
                destroys the group.
  absent        ranks 0 and 1 issue an async all_reduce and destroy the group while
                rank 2, alive, does nothing until a line arrives on stdin (a stuck
                rank: its sockets stay open); then rank 2 destroys it too.
After destroy_process_group() each rank prints "DESTROYED" (seconds it took) and, last,
"EXIT"; the process must then exit 0 on its own.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import threading
import time

import torch
import torch.distributed as dist

import ringcc  # noqa: F401 - registers the "ringcc" backend


def say(word: str, **fields) -> None:
    print(f"{word} {json.dumps(fields)}", flush=True)


def report_error(exc: BaseException) -> None:
    say("ERROR", type=type(exc).__name__, message=str(exc), t_error=time.monotonic(),
        is_ringcc=isinstance(exc, ringcc.Error))


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


THREADS_BEFORE_INIT = 0


def destroy() -> None:
    t0 = time.monotonic()
    dist.destroy_process_group()
    seconds = time.monotonic() - t0
    gc.collect()
    # Settler threads of the torch backend are shared by all groups and end after a
    # few idle seconds; they are counted apart. (main() keeps them from ending during a
    # run: one leaving between the two counts below would be listed by neither or by
    # /proc alone.)
    settlers = [t.name for t in threading.enumerate() if t.name.startswith("ringcc")]
    say("DESTROYED", seconds=seconds, settlers=settlers, threads=[THREADS_BEFORE_INIT, thread_count()])


def stream(args) -> None:
    world = args.world
    a, b = torch.empty(4096), torch.empty(70_000)
    i = 0
    try:
        while True:
            a.fill_(1.0)
            b.fill_(2.0)
            if args.use_async:
                works = [dist.all_reduce(a, async_op=True), dist.all_reduce(b, async_op=True)]
                for w in works:
                    w.wait()
            else:
                dist.all_reduce(a)
                dist.all_reduce(b)
            assert a[0] == world and b[-1] == 2 * world, (a[0], b[-1])
            i += 1
            if i == 20:
                print("READY", flush=True)
    except Exception as exc:  # noqa: BLE001 - reported to the parent test
        report_error(exc)
    if not args.no_destroy:
        destroy()


def abort(args) -> None:
    blocked = [int(r) for r in args.blocked.split(",")]
    if args.rank in blocked:
        t = torch.ones(100_000)
        try:
            if args.use_async:
                work = dist.all_reduce(t, async_op=True)
                print("BLOCKED", flush=True)
                work.wait()
            else:
                print("BLOCKED", flush=True)
                dist.all_reduce(t)
            say("NO-ERROR")
        except Exception as exc:  # noqa: BLE001
            report_error(exc)
        destroy()
    else:
        sys.stdin.readline()  # the parent's go-ahead, once the others are blocked
        t0 = time.monotonic()
        dist.distributed_c10d._abort_process_group()
        say("ABORTED", seconds=time.monotonic() - t0)


def inflight(args) -> None:
    rank, world = args.rank, args.world
    xs = [torch.full((n,), float(rank + 1)) for n in (10, 5000, 70_000, 300_000)]
    works = [dist.all_reduce(x, async_op=True) for x in xs]
    g_out = [torch.empty(3, dtype=torch.int64) for _ in range(world)]
    works.append(dist.all_gather(g_out, torch.full((3,), rank, dtype=torch.int64), async_op=True))
    destroy()
    # The group finished what was queued before it closed: every result is there.
    for w in works:
        w.wait()
    total = world * (world + 1) / 2
    say("RESULTS", allreduce_ok=all(bool((x == total).all()) for x in xs),
        allgather_ok=all(bool((o == r).all()) for r, o in enumerate(g_out)))


def unmatched(args) -> None:
    work = None
    if args.rank == 0:
        work = dist.all_reduce(torch.ones(1000), async_op=True)
    destroy()
    if work is not None:
        try:
            work.wait()
            say("NO-ERROR")
        except Exception as exc:  # noqa: BLE001
            report_error(exc)


def absent(args) -> None:
    if args.rank == 2:
        print("PARKED", flush=True)
        sys.stdin.readline()
        destroy()
        return
    work = dist.all_reduce(torch.ones(1000), async_op=True)
    destroy()  # finishes what is queued: here, until the all_reduce's timeout
    try:
        work.wait()
        say("NO-ERROR")
    except Exception as exc:  # noqa: BLE001
        report_error(exc)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--init-method", required=True)
    p.add_argument("--scenario", choices=["stream", "abort", "inflight", "unmatched", "absent"], required=True)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--async", dest="use_async", action="store_true")
    p.add_argument("--blocked", default="")
    p.add_argument("--no-destroy", action="store_true", help="stream: exit without destroy_process_group()")
    args = p.parse_args()
    global THREADS_BEFORE_INIT
    THREADS_BEFORE_INIT = thread_count()
    ringcc.torch_backend._SETTLER.IDLE_EXIT_S = 3600.0  # see destroy()
    dist.init_process_group("ringcc", init_method=args.init_method, rank=args.rank, world_size=args.world,
                            timeout=datetime.timedelta(seconds=args.timeout))
    {"stream": stream, "abort": abort, "inflight": inflight, "unmatched": unmatched,
     "absent": absent}[args.scenario](args)
    print("EXIT", flush=True)


if __name__ == "__main__":
    main()
