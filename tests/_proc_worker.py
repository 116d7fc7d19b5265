"""One rank of a multi-process test (tests/test_processes.py runs it as a script).

Modes:
  collectives  allreduce + allgather + broadcast with a torch.distributed store, once per
               transport in --transport (comma-separated), results checked here; prints
               "OK <rank>" and exits 0 on success.
  loop         allreduce forever (blocking, or async_op=True + wait() with --async);
               prints "READY" after --ready-after iterations, and on a ringcc error prints
               one JSON line describing it, then either closes the communicator and prints
               "CLOSED" (--after-error close) or leaves at once with os._exit(0) (exit).
  peer-gone    two ranks as threads over TCP in this one process: rank 1 aborts and its
               communicator is destroyed, then rank 0 runs a barrier (--async: async_op),
               prints one JSON line about its error, closes and prints "CLOSED".

With --store tcp, rank 0 hosts the TCPStore on a free port and prints "PORT <n>" first;
the other ranks get that port as --addr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

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


def loop(comm, ready_after: int, use_async: bool, after_error: str) -> None:
    import ringcc

    world = comm.world_size
    x = np.empty(4096, dtype=np.float32)
    i = 0
    try:
        while True:
            x.fill(1.0)
            if use_async:
                comm.allreduce(x, async_op=True).wait()
            else:
                comm.allreduce(x)
            assert x[0] == world and x[-1] == world, (x[0], x[-1])
            i += 1
            if i == ready_after:
                print("READY", flush=True)
    except ringcc.Error as exc:
        print(json.dumps({"type": type(exc).__name__, "is_peer_error": isinstance(exc, ringcc.PeerError),
                          "message": str(exc), "iterations": i}), flush=True)
    if after_error == "exit":
        os._exit(0)
    comm.close()
    print("CLOSED", flush=True)


class LocalStore:
    """set/get on a dict: enough for ranks that are threads of one process."""

    def __init__(self) -> None:
        self.data: dict = {}

    def set(self, key: str, value: bytes) -> None:
        self.data[key] = value

    def get(self, key: str):
        return self.data.get(key)


def peer_gone(use_async: bool) -> None:
    import gc
    import threading

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
    args = p.parse_args()
    if args.mode == "peer-gone":
        peer_gone(args.use_async)
        return

    store = make_store(args.store, args.addr, args.rank, args.world)
    import ringcc

    if args.mode == "collectives":
        for transport in args.transport.split(","):
            comm = ringcc.Communicator(store, args.rank, args.world, name=f"collectives-{transport}",
                                       transport=transport, timeout=args.timeout)
            collectives(comm, transport)
            comm.close()
        print(f"OK {args.rank}", flush=True)
    else:
        comm = ringcc.Communicator(store, args.rank, args.world, name="loop", transport=args.transport,
                                   timeout=args.timeout)
        loop(comm, args.ready_after, args.use_async, args.after_error)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
