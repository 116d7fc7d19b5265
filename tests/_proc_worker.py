"""One rank of a multi-process test (tests/test_processes.py runs it as a script).

Modes:
  collectives  allreduce + allgather + broadcast with a torch.distributed store, once per
               transport in --transport (comma-separated), results checked here; prints
               "OK <rank>" and exits 0 on success.
  loop         collectives forever, results checked: allreduce (blocking, or
               async_op=True + wait() with --async), or with --ops mixed a stream of
               allreduce, allgather and broadcast (rotating root) with two asynchronous
               operations in flight behind each blocking one. Prints "READY" after
               --ready-after iterations. On an error (in the loop, or while creating the
               communicator) prints one JSON line describing it, with the
               time.monotonic() at which it was caught (CLOCK_MONOTONIC: the parent can
               compare it with its own clock); then either leaves at once with
               os._exit(0) (--after-error exit) or closes the communicator and prints
               "CLOSED <json>": thread count before the communicator was created and
               after close(), open sockets after close(), and fd count before and after
               the communicator was freed.
               --pause-in-setup: after publishing its rendezvous record (its
               shared-memory segment and listener exist) this rank prints
               "SETUP-PAUSED" and blocks forever, for the parent to kill it there.
               --hold-in-setup: the same, but it goes on when a line arrives on stdin.
               --abort-on-stdin: a thread calls comm.abort(<the line>) when a line
               arrives on stdin, while the loop goes on in the main thread.
  peer-gone    two ranks as threads over TCP in this one process: rank 1 aborts and its
               communicator is destroyed, then rank 0 runs a barrier (--async: async_op),
               prints one JSON line about its error, closes and prints "CLOSED".

With --store tcp, rank 0 hosts the TCPStore on a free port and prints "PORT <n>" first;
the other ranks get that port as --addr.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time

import numpy as np


class DirStore:
    """A set/get store on a directory (one file per key), without torch."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _file(self, key: str) -> str:
        return os.path.join(self.path, key.replace("/", "%"))

    def set(self, key: str, value: bytes) -> None:
        tmp = self._file(key) + f".tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(value)
        os.rename(tmp, self._file(key))  # atomic: readers see all of it or nothing

    def get(self, key: str):
        try:
            with open(self._file(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None


def make_store(kind: str, addr: str, rank: int, world: int):
    if kind == "dir":
        return DirStore(addr)
    import datetime

    import torch.distributed as dist

    if kind == "file":
        return dist.FileStore(addr, world)
    if kind == "tcp":
        timeout = datetime.timedelta(seconds=60)
        if rank == 0:
            store = dist.TCPStore("127.0.0.1", 0, world, True, timeout, wait_for_workers=False)
            print(f"PORT {store.port}", flush=True)
            return store
        return dist.TCPStore("127.0.0.1", int(addr), world, False, timeout)
    raise SystemExit(f"unknown store kind {kind!r}")


def collectives(comm, transport: str) -> None:
    import torch

    rank, world = comm.rank, comm.world_size
    for peer in range(world):
        if peer != rank:
            assert comm.transport_to(peer) == transport, (peer, comm.transport_to(peer))

    x = np.arange(1000, dtype=np.float32) + rank
    assert comm.allreduce(x) is x
    expected = world * np.arange(1000, dtype=np.float32) + sum(range(world))
    np.testing.assert_array_equal(x, expected)

    t = torch.full((300,), float(rank + 1), dtype=torch.float64)
    comm.allreduce(t, op="max")
    assert torch.equal(t, torch.full((300,), float(world), dtype=torch.float64)), t

    g = comm.allgather(np.array([rank, 10 * rank, -rank], dtype=np.int64))
    assert g.shape == (world, 3), g.shape
    assert g.tolist() == [[r, 10 * r, -r] for r in range(world)], g.tolist()

    root = world - 1
    b = np.full(50_000, rank, dtype=np.int32)  # past the small-message path
    comm.broadcast(b, root=root)
    assert (b == root).all(), np.unique(b)

    comm.barrier()


class PauseInSetup:
    """Wraps a store: the first get() of a peer's rendezvous record (this rank's own is
    published by then) prints "SETUP-PAUSED" and calls `resume` (which may never
    return) before going on."""

    def __init__(self, store, resume) -> None:
        self._store = store
        self._resume = resume

    def set(self, key: str, value: bytes) -> None:
        self._store.set(key, value)

    def get(self, key: str):
        if "/info/" in key and self._resume is not None:
            print("SETUP-PAUSED", flush=True)
            resume, self._resume = self._resume, None
            resume()
        return self._store.get(key)


def allreduce_step(comm, i: int, use_async: bool, bufs: dict) -> None:
    x = bufs.setdefault("x", np.empty(4096, dtype=np.float32))
    x.fill(1.0)
    if use_async:
        comm.allreduce(x, async_op=True).wait()
    else:
        comm.allreduce(x)
    world = comm.world_size
    assert x[0] == world and x[-1] == world, (x[0], x[-1])


def mixed_step(comm, i: int, use_async: bool, bufs: dict) -> None:
    """Two asynchronous operations in flight while a blocking broadcast queues behind
    them; sizes on both sides of the small-message path."""
    rank, world = comm.rank, comm.world_size
    if not bufs:
        bufs["a"] = np.empty(70_000, dtype=np.float32)
        bufs["g_in"] = np.empty(1000, dtype=np.int64)
        bufs["g_out"] = np.empty((world, 1000), dtype=np.int64)
        bufs["b"] = np.empty(50_000, dtype=np.int32)
    a, g_in, g_out, b = bufs["a"], bufs["g_in"], bufs["g_out"], bufs["b"]
    a.fill(rank + 1)
    g_in.fill(rank * 1000 + i)
    b.fill(rank)
    root = i % world
    w_reduce = comm.allreduce(a, async_op=True)
    w_gather = comm.allgather(g_in, out=g_out, async_op=True)
    comm.broadcast(b, root=root)
    w_reduce.wait()
    w_gather.wait()
    assert a[0] == a[-1] == world * (world + 1) // 2, (a[0], a[-1])
    assert (g_out[:, 0] == np.arange(world) * 1000 + i).all(), g_out[:, 0]
    assert b[0] == b[-1] == root, (b[0], b[-1])


STEPS = {"allreduce": allreduce_step, "mixed": mixed_step}


def report_error(exc: BaseException, phase: str, iterations: int) -> None:
    import ringcc

    print(json.dumps({"type": type(exc).__name__, "is_peer_error": isinstance(exc, ringcc.PeerError),
                      "is_timeout": isinstance(exc, ringcc.TimeoutError), "message": str(exc),
                      "phase": phase, "iterations": iterations, "t_error": time.monotonic()}), flush=True)


def loop(comm, ops: str, ready_after: int, use_async: bool) -> None:
    """Runs steps until one raises a ringcc error, and reports it."""
    import ringcc

    step, bufs = STEPS[ops], {}
    i = 0
    try:
        while True:
            step(comm, i, use_async, bufs)
            i += 1
            if i == ready_after:
                print("READY", flush=True)
    except ringcc.Error as exc:
        report_error(exc, "loop", i)


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def fd_targets() -> list:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # the fd listdir itself used, closed by now
    return out


def run_loop(args, store) -> None:
    import ringcc

    threads_before, fds_before = thread_count(), len(fd_targets())
    comm = setup_error = None
    try:
        comm = ringcc.Communicator(store, args.rank, args.world, name="loop", transport=args.transport,
                                   timeout=args.timeout)
    except ringcc.Error as exc:
        report_error(exc, "setup", 0)
        # Kept, traceback and all, until the counts below: the failed communicator's
        # sockets and fds must be gone even while its error is still referenced.
        setup_error = exc
    aborter = None
    if comm is not None:
        if args.abort_on_stdin:
            aborter = threading.Thread(target=lambda: comm.abort(sys.stdin.readline().strip()), daemon=True)
            aborter.start()
        loop(comm, args.ops, args.ready_after, args.use_async)
    if args.after_error == "exit":
        os._exit(0)
    if comm is not None:
        comm.close()
    if aborter is not None:
        aborter.join(30)  # this test's own thread, not the communicator's
        # join() returns just before the OS thread is gone: wait (bounded) until /proc,
        # which thread_count() reads, no longer lists it.
        until = time.monotonic() + 10
        while os.path.exists(f"/proc/self/task/{aborter.native_id}") and time.monotonic() < until:
            time.sleep(0.001)
    threads_after = thread_count()
    sockets_after = sum(t.startswith("socket:") for t in fd_targets())
    del comm
    gc.collect()
    print("CLOSED " + json.dumps({"threads": [threads_before, threads_after], "sockets_after_close": sockets_after,
                                  "fds": [fds_before, len(fd_targets())]}), flush=True)
    del setup_error


class LocalStore:
    """set/get on a dict: enough for ranks that are threads of one process."""

    def __init__(self) -> None:
        self.data: dict = {}

    def set(self, key: str, value: bytes) -> None:
        self.data[key] = value

    def get(self, key: str):
        return self.data.get(key)


def peer_gone(use_async: bool) -> None:
    import ringcc

    store, comms = LocalStore(), [None, None]

    def make(rank: int) -> None:
        comms[rank] = ringcc.Communicator(store, rank, 2, name="peer-gone", transport="tcp", timeout=20)

    threads = [threading.Thread(target=make, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    comms[1].abort("bye")
    comms[1] = None  # destroyed: its sockets are closed, as if its process had exited
    gc.collect()
    comm = comms[0]
    try:
        work = comm.barrier(async_op=use_async)
        if use_async:
            work.wait()
        print(json.dumps({"type": None}), flush=True)
    except ringcc.Error as exc:
        print(json.dumps({"type": type(exc).__name__, "message": str(exc)}), flush=True)
    comm.close()
    print("CLOSED", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["collectives", "loop", "peer-gone"], required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--store", choices=["tcp", "file", "dir"], default="dir")
    p.add_argument("--addr", default="")
    p.add_argument("--transport", default="tcp", help="shm, tcp, or a comma-separated list (collectives)")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--ready-after", type=int, default=20)
    p.add_argument("--async", dest="use_async", action="store_true")
    p.add_argument("--after-error", choices=["close", "exit"], default="close")
    p.add_argument("--ops", choices=sorted(STEPS), default="allreduce")
    p.add_argument("--pause-in-setup", action="store_true")
    p.add_argument("--hold-in-setup", action="store_true")
    p.add_argument("--abort-on-stdin", action="store_true")
    args = p.parse_args()
    if args.mode == "peer-gone":
        peer_gone(args.use_async)
        return

    store = make_store(args.store, args.addr, args.rank, args.world)
    if args.pause_in_setup:  # until the parent kills this process
        store = PauseInSetup(store, threading.Event().wait)
    elif args.hold_in_setup:  # until the parent writes a line
        store = PauseInSetup(store, sys.stdin.readline)
    import ringcc

    if args.mode == "collectives":
        for transport in args.transport.split(","):
            comm = ringcc.Communicator(store, args.rank, args.world, name=f"collectives-{transport}",
                                       transport=transport, timeout=args.timeout)
            collectives(comm, transport)
            comm.close()
        print(f"OK {args.rank}", flush=True)
    else:
        run_loop(args, store)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
