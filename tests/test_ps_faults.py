"""Parameter server: checkpoint/restore and fault behaviour.

Checkpoints: a restored server serves the same values and versions, and the next push
gives the same bits as on the server that was never interrupted; a checkpoint for another
shard layout is refused; the file on disk is always the old one or the complete new one.
Faults (with processes where something must be killed): an async worker SIGKILLed
mid-run does not stop the others; a sync worker that dies mid-round makes the others'
round fail with an error naming it; a server killed under a client makes the client's
next call fail with an error naming that server. Processes report progress on stdout
and the test waits on those lines, never on sleeps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch.distributed as dist

import ringcc
from ringcc import ps
from ps_helpers import close_all as _close, make_clients as _clients, start_servers as _servers

F32 = np.float32
WORKER = os.path.join(os.path.dirname(__file__), "_ps_fault_worker.py")


def _versions(server):
    return {name.decode(): version for _, name, _, version, _, _ in server._native.snapshot()}


# --------------------------------------------------------------------------- checkpoints
ASYNC = dict(mode="async", lr=0.1, momentum=0.9, weight_decay=0.01, staleness=100)
TENSORS = {"p": 1000, "q": 50}


def _register(clients):
    for c in clients:
        for name, n in TENSORS.items():
            c.register(name, n)


def test_async_restore_serves_same_values_versions_and_next_push(tmp_path):
    rng = np.random.default_rng(0)
    store = dist.HashStore()
    servers = _servers(store, 2, 2, **ASYNC)
    clients = _clients(store, 2, 2, shard_elements=300)  # p: 4 shards over both servers
    _register(clients)
    for name, n in TENSORS.items():
        clients[0].init(name, rng.standard_normal(n).astype(F32))
    for step in range(5):
        for name, n in TENSORS.items():
            clients[step % 2].push_pull(name, rng.standard_normal(n).astype(F32))
    paths = [str(tmp_path / f"ps{i}.ckpt") for i in range(2)]
    for s, p in zip(servers, paths):
        s.save(p)
    saved = {name: clients[1].pull(name, np.zeros(n, F32)) for name, n in TENSORS.items()}
    saved_versions = [_versions(s) for s in servers]
    assert sum(len(v) for v in saved_versions) == 5 and all(saved_versions)  # 4 + 1 shards, both servers
    nxt = {name: rng.standard_normal(n).astype(F32) for name, n in TENSORS.items()}
    uninterrupted = {name: clients[0].push_pull(name, g.copy()) for name, g in nxt.items()}
    _close(servers, clients)

    store = dist.HashStore()
    servers = [ps.Server(store, i, 2, 2, listen_host="127.0.0.1", restore=paths[i], keys=TENSORS,
                         shard_elements=300, **ASYNC).start() for i in range(2)]
    clients = _clients(store, 2, 2, shard_elements=300)
    try:
        _register(clients)  # idempotent against the restored keys; no init
        assert [_versions(s) for s in servers] == saved_versions
        for name, n in TENSORS.items():
            assert np.array_equal(clients[0].pull(name, np.zeros(n, F32)), saved[name])
        for name, g in nxt.items():  # momentum buffers came back too: the same bits
            assert np.array_equal(clients[0].push_pull(name, g.copy()), uninterrupted[name])
    finally:
        _close(servers, clients)


def test_sync_restore_keeps_round_counters(tmp_path):
    store = dist.HashStore()
    servers = _servers(store, 1, 2, timeout=30.0)
    clients = _clients(store, 2, 1)
    for c in clients:
        c.register("w", 10)
    for r in range(3):
        works = [c.push_pull("w", np.full(10, float(r + i), F32), async_op=True) for i, c in enumerate(clients)]
        last = [w.wait() for w in works][0]
    path = str(tmp_path / "sync.ckpt")
    servers[0].save(path)
    _close(servers, clients)
    meta, entries = ps.read_checkpoint(path)
    assert meta["mode"] == "sync" and [e[3] for e in entries] == [3]

    store = dist.HashStore()
    servers = [ps.Server(store, 0, 1, 2, listen_host="127.0.0.1", restore=path).start()]
    clients = _clients(store, 2, 1)
    try:
        for c in clients:
            c.register("w", 10)  # the reply carries round 3: the next push is round 3
        assert np.array_equal(clients[0].pull("w", np.zeros(10, F32)), last)
        works = [c.push_pull("w", np.full(10, 2.0 * i, F32), async_op=True) for i, c in enumerate(clients)]
        assert np.array_equal(works[0].wait(), np.full(10, 1.0, F32)) and _versions(servers[0]) == {"w#0": 4}
        with pytest.raises(ValueError, match="not in the checkpoint"):  # the key set is fixed
            clients[0].register("new", 5)
    finally:
        _close(servers, clients)


def test_checkpoint_for_another_layout_or_mode_is_refused(tmp_path):
    store = dist.HashStore()
    servers = _servers(store, 2, 1, **ASYNC)
    clients = _clients(store, 1, 2, shard_elements=300)
    _register(clients)
    path = str(tmp_path / "ps1.ckpt")
    servers[1].save(path)  # server 1 holds p#0, p#3 (of four shards) and q#0
    _close(servers, clients)
    mk = lambda index, n, **kw: ps.Server(store, index, n, 1, listen_host="127.0.0.1", restore=path, **kw)
    with pytest.raises(ps.CheckpointError, match="written by server 1 of 2; this is server 0 of 2"):
        mk(0, 2, **ASYNC)
    with pytest.raises(ps.CheckpointError, match="written by server 1 of 2; this is server 1 of 3"):
        mk(1, 3, **ASYNC)
    with pytest.raises(ps.CheckpointError, match="holds async state; this server runs in sync mode"):
        mk(1, 2)
    with pytest.raises(ps.CheckpointError, match=r"unexpected \['p#3'\], different numel \['p#0'\]"):
        mk(1, 2, keys=TENSORS, shard_elements=400, **ASYNC)  # another shard size
    with pytest.raises(ps.CheckpointError, match=r"missing \['r#0'\]"):
        mk(1, 2, keys=dict(TENSORS, r=10, s=10, t=10), shard_elements=300, **ASYNC)
    mk(1, 2, keys=TENSORS, shard_elements=300, **ASYNC)  # the matching layout is accepted
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ps.CheckpointError, match="not readable"):
        ps.Server(store, 0, 1, 1, restore=str(tmp_path / "junk.ckpt"))


def test_checkpoint_file_is_old_or_complete(tmp_path, monkeypatch):
    store = dist.HashStore()
    servers = _servers(store, 1, 1, **ASYNC)
    clients = _clients(store, 1, 1)
    try:
        clients[0].register("p", 100)
        path = str(tmp_path / "ps.ckpt")
        servers[0].save(path)  # version 0
        clients[0].push_pull("p", np.ones(100, F32))
        real_replace = os.replace
        seen = {}

        def crash_before_rename(src, dst):
            # At the rename the new file is complete (and fsynced), the old one untouched.
            seen["tmp_version"] = ps.read_checkpoint(src)[1][0][3]
            seen["dst_version"] = ps.read_checkpoint(dst)[1][0][3]
            seen["same_dir"] = os.path.dirname(src) == os.path.dirname(dst)
            raise OSError("simulated crash before the rename")

        monkeypatch.setattr(ps.os, "replace", crash_before_rename)
        with pytest.raises(OSError, match="simulated crash"):
            servers[0].save(path)
        assert seen == {"tmp_version": 1, "dst_version": 0, "same_dir": True}
        assert ps.read_checkpoint(path)[1][0][3] == 0 and os.listdir(tmp_path) == ["ps.ckpt"]

        def torn_write(f, **arrays):
            f.write(b"PK\x03\x04 half a zip")
            raise OSError("simulated disk full")

        monkeypatch.setattr(ps.os, "replace", real_replace)
        monkeypatch.setattr(ps.np, "savez", torn_write)
        with pytest.raises(OSError, match="disk full"):
            servers[0].save(path)
        assert ps.read_checkpoint(path)[1][0][3] == 0 and os.listdir(tmp_path) == ["ps.ckpt"]
        monkeypatch.undo()
        servers[0].save(path)
        assert ps.read_checkpoint(path)[1][0][3] == 1 and os.listdir(tmp_path) == ["ps.ckpt"]
    finally:
        _close(servers, clients)


# --------------------------------------------------------------------------- faults
def _spawn(*args):
    return subprocess.Popen([sys.executable, WORKER, *map(str, args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _read_until(proc, want):
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(want):
            return lines
    raise AssertionError(f"process ended before printing {want!r}: {''.join(lines[-20:])}")


def _kill(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    proc.stdout.close()
    if proc.stdin:
        proc.stdin.close()


def test_async_worker_killed_mid_run_does_not_stop_the_others():
    store = dist.HashStore()
    # 4 worker slots: ranks 0..2 are processes, rank 3 is this test checking afterwards.
    server = ps.Server(store, 0, 1, 4, mode="async", lr=1.0, staleness=10 ** 9, listen_host="127.0.0.1").start()
    token = ps._job_token(store, "ps/", 10)
    steps = 40
    procs = [_spawn("async", server.address, token, r, 4, steps if r < 2 else -1) for r in range(3)]
    try:
        _read_until(procs[2], "step 3")  # the victim is pushing in a loop
        procs[2].send_signal(signal.SIGKILL)
        assert procs[2].wait() == -signal.SIGKILL
        for p in procs[:2]:
            out = "".join(_read_until(p, "done"))
            assert f"step {steps}\n" in out
            assert p.wait() == 0
        checker = ps.Client(store, 3, 4, 1, timeout=30.0)
        checker.register("p", 1000)
        before = checker.pull("p", np.zeros(1000, F32))
        # lr 1, gradients of ones: the parameters are minus the number of updates applied,
        # at least both survivors' steps plus the victim's three.
        assert np.all(before == before[0]) and before[0] <= -(2 * steps + 3)
        after = checker.push_pull("p", np.ones(1000, F32))
        assert np.array_equal(after, before - 1)  # still serving
        checker.close()
    finally:
        for p in procs:
            _kill(p)
        server.stop()  # returns: the loop thread is joined
    assert not server.running and server.wait()  # already ended: returns at once


def test_sync_worker_dying_mid_round_fails_the_round_naming_it():
    store = dist.HashStore()
    server = ps.Server(store, 0, 1, 3, timeout=1.0, listen_host="127.0.0.1").start()
    token = ps._job_token(store, "ps/", 10)
    victim = _spawn("sync", server.address, token, 2, 3, 2)
    clients = [ps.Client(store, r, 3, 1, timeout=60.0) for r in range(2)]
    try:
        for c in clients:
            for name in ("a", "b"):
                c.register(name, 100)
        _read_until(victim, "ready")  # started (a process takes seconds) before the 1 s rounds
        for _ in range(2):
            for name in ("a", "b"):
                works = [c.push_pull(name, np.full(100, r, F32), async_op=True) for r, c in enumerate(clients)]
                assert np.array_equal(works[0].wait(), np.full(100, 1.0, F32))  # (0 + 1 + 2) / 3
        works = [c.push_pull("a", np.full(100, r, F32), async_op=True) for r, c in enumerate(clients)]
        _read_until(victim, "mid")  # the victim pushed a of round 2, not b
        _kill(victim)
        assert np.array_equal(works[1].wait(), np.full(100, 1.0, F32))
        works = [c.push_pull("b", np.full(100, r, F32), async_op=True) for r, c in enumerate(clients)]
        for w in works:  # the server's 1 s round timeout, not the clients' 60 s
            with pytest.raises(ringcc.TimeoutError, match=r"round 2 of key 'b#0'.*no push from worker\(s\) \[2\] "
                                                          r"\(pushed: \[[01], [01]\]\)"):
                w.wait()
    finally:
        _kill(victim)
        _close([server], clients)


def test_server_killed_under_a_client_raises_naming_it():
    proc = _spawn("server")
    try:
        addr, token = proc.stdout.readline().split()
        store = dist.HashStore()
        store.set("ps/server/0", addr)
        client = ps.Client(store, 0, 1, 1, token=token, timeout=30.0)
        client.register("w", 10)
        assert np.array_equal(client.push_pull("w", np.full(10, 3.0, F32)), np.full(10, 3.0, F32))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        where = f"parameter server 0 at {addr}"
        with pytest.raises(ringcc.PeerError, match=where):
            client.push_pull("w", np.ones(10, F32))
        with pytest.raises(ringcc.PeerError, match=where + ": connection unusable"):
            client.pull("w", np.zeros(10, F32))
        client.close()
    finally:
        _kill(proc)
