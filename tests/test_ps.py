"""Parameter server: sync averaging, sharding, compressed pushes, async SGD, staleness,
bad input, start order and the `ringcc ps-server` command. Workers are Clients in this
process (each with its own connection threads); concurrent pushes use async_op."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import hashlib

import numpy as np
import pytest
import torch.distributed as dist

import ringcc
from ringcc import ps
from ps_helpers import close_all as _close, make_clients as _clients, raw_authenticate, start_servers as _servers
from conftest import MemoryStore, run_ranks

F32 = np.float32


def _store():
    return dist.HashStore()  # blocking get(): clients wait for server addresses


def _sync_round(clients, name, arrays, compression=None):
    works = [c.push_pull(name, a, compression=compression, async_op=True) for c, a in zip(clients, arrays)]
    return [w.wait() for w in works]


# --------------------------------------------------------------------------- sync
@pytest.mark.parametrize("num_workers,num_servers", [(2, 1), (3, 2)])
def test_sync_average_equals_numpy_and_allreduce(num_workers, num_servers):
    store = _store()
    servers = _servers(store, num_servers, num_workers)
    clients = _clients(store, num_workers, num_servers, shard_elements=1000)
    try:
        rng = np.random.default_rng(0)
        numel = 2500  # three shards
        for c in clients:
            c.register("w", numel)
        for _ in range(2):  # two rounds: round numbers advance in step
            grads = [rng.standard_normal(numel).astype(F32) for _ in range(num_workers)]
            arrays = [g.copy() for g in grads]
            _sync_round(clients, "w", arrays)
            expect = np.mean(np.stack(grads), axis=0, dtype=F32)
            for a in arrays:
                np.testing.assert_allclose(a, expect, rtol=2e-7, atol=1e-7)
                assert np.array_equal(a, arrays[0])  # every worker gets the same bits
            ring = run_ranks(num_workers, lambda comm: comm.allreduce(grads[comm.rank].copy(), op="avg"),
                             transport="tcp")
            np.testing.assert_allclose(arrays[0], ring[0], rtol=2e-7, atol=1e-7)
        out = np.zeros(numel, F32)
        clients[0].pull("w", out)  # pull: the last round's average
        assert np.array_equal(out, arrays[0])
    finally:
        _close(servers, clients)


def test_sharding_spreads_over_servers_and_is_stable():
    # blake2b (8 bytes, little endian) of "name#i" mod servers, computed here independently.
    expect = [int.from_bytes(hashlib.blake2b(f"emb#{i}".encode(), digest_size=8).digest(), "little") % 2
              for i in range(6)]
    assert [ps.server_of("emb", i, 2) for i in range(6)] == expect
    assert set(expect) == {0, 1}, "test name must land on both servers"
    store = _store()
    servers = _servers(store, 2, 2)
    clients = _clients(store, 2, 2, shard_elements=100)
    try:
        layout = clients[0].shards("emb", 550)
        assert [s for s, _, _, _ in layout] == expect
        assert [(off, n) for _, _, off, n in layout] == [(0, 100), (100, 100), (200, 100), (300, 100),
                                                          (400, 100), (500, 50)]
        assert layout == clients[1].shards("emb", 550)
        for c in clients:
            c.register("emb", 550)
        arrays = [np.full(550, 1.0, F32), np.arange(550, dtype=F32)]
        expect_avg = (arrays[0] + arrays[1]) / 2
        _sync_round(clients, "emb", arrays)
        assert np.array_equal(arrays[0], expect_avg) and np.array_equal(arrays[1], expect_avg)
        # A shard on the wrong server is unknown there: placement is really per server.
        server, key, _, n = layout[0]
        with pytest.raises(ValueError, match="unknown key"):
            clients[0]._native.pull(1 - server, key, np.zeros(n, F32).ctypes.data, n).wait()
    finally:
        _close(servers, clients)


@pytest.mark.parametrize("compression,eps", [("fp16", 2.0 ** -11), ("bf16", 2.0 ** -8)])
def test_compressed_push_within_format_bound(compression, eps):
    store = _store()
    servers = _servers(store, 1, 2)
    clients = _clients(store, 2, 1)
    try:
        rng = np.random.default_rng(1)
        grads = [(rng.standard_normal(4096) * 10.0 ** rng.integers(-4, 4, 4096)).astype(F32) for _ in range(2)]
        for c in clients:
            c.register("g", 4096)
        arrays = [g.copy() for g in grads]
        _sync_round(clients, "g", arrays, compression=compression)
        expect = (grads[0] + grads[1]) / 2
        assert np.array_equal(arrays[0], arrays[1])
        # Each encode (the two pushes, then the reply) errs by at most eps * block max.
        block = 256
        for b in range(0, 4096, block):
            sl = slice(b, b + block)
            bound = eps * (np.abs(grads[0][sl]).max() / 2 + np.abs(grads[1][sl]).max() / 2
                           + np.abs(expect[sl]).max() * 1.01)
            assert np.abs(arrays[0][sl] - expect[sl]).max() <= bound
    finally:
        _close(servers, clients)


def test_sync_round_times_out_naming_the_missing_worker():
    store = _store()
    servers = _servers(store, 1, 2, timeout=1.0)
    clients = _clients(store, 2, 1)
    try:
        for c in clients:
            c.register("w", 10)
        with pytest.raises(ringcc.TimeoutError, match=r"no push from worker\(s\) \[1\] \(pushed: \[0\]\)"):
            clients[0].push_pull("w", np.ones(10, F32))
        arrays = [np.ones(10, F32), np.full(10, 3.0, F32)]  # the round can be retried
        _sync_round(clients, "w", arrays)
        assert np.array_equal(arrays[0], np.full(10, 2.0, F32))
    finally:
        _close(servers, clients)


# --------------------------------------------------------------------------- async
def test_async_sgd_momentum_matches_numpy():
    lr, mom, wd = 0.1, 0.9, 0.01
    store = _store()
    servers = _servers(store, 2, 2, mode="async", lr=lr, momentum=mom, weight_decay=wd, staleness=100)
    clients = _clients(store, 2, 2, shard_elements=300)
    try:
        rng = np.random.default_rng(2)
        p = rng.standard_normal(1000).astype(F32)
        for c in clients:
            c.register("p", 1000)
        clients[0].init("p", p)
        buf = np.zeros_like(p)
        for step in range(6):  # the workers take turns; the server applies each on arrival
            g = rng.standard_normal(1000).astype(F32)
            got = g.copy()
            clients[step % 2].push_pull("p", got)
            d = g + F32(wd) * p
            buf = F32(mom) * buf + d
            p = p - F32(lr) * buf
            np.testing.assert_allclose(got, p, rtol=1e-6, atol=1e-7)
        out = np.zeros_like(p)
        clients[1].pull("p", out)
        np.testing.assert_allclose(out, p, rtol=1e-6, atol=1e-7)
    finally:
        _close(servers, clients)


def test_async_staleness_bound_refuses_old_pushes():
    store = _store()
    servers = _servers(store, 1, 2, mode="async", lr=1.0, staleness=1)
    clients = _clients(store, 2, 1)
    try:
        for c in clients:
            c.register("p", 8)
        clients[0].init("p", np.zeros(8, F32))
        clients[1].push_pull("p", np.ones(8, F32))      # version 1; worker 0 saw 0 (lag 1: allowed)
        clients[1].push_pull("p", np.ones(8, F32))      # version 2; worker 0 lags by 2 > 1
        g = np.ones(8, F32)
        with pytest.raises(ps.StaleError, match=r"computed from version 0, the key is at version 2, "
                                                r"staleness bound 1"):
            clients[0].push_pull("p", g)
        assert isinstance(ps.StaleError("x"), ringcc.Error)
        fresh = clients[0].pull("p", np.zeros(8, F32))   # catch up, then the push is taken
        assert np.array_equal(fresh, np.full(8, -2.0, F32))
        clients[0].push_pull("p", g)
        assert np.array_equal(g, np.full(8, -3.0, F32))
    finally:
        _close(servers, clients)


# --------------------------------------------------------------------------- bad input
def _hdr(mtype, *, sender=0, dtype=2, wire=0, key=0, numel=0, payload=0, rnd=0, magic=0x53504352, version=3):
    return struct.pack("<IHBBIBBHQQQQQQ", magic, version, mtype, 0, sender, dtype, wire, 0, key, numel, payload,
                       rnd, 0, 0)


def _recv_reply(sock):
    data = b""
    while len(data) < 64:
        chunk = sock.recv(64 - len(data))
        assert chunk, "server closed the connection"
        data += chunk
    fields = struct.unpack("<IHBBIBBHQQQQQQ", data)
    mtype, code, nbytes = fields[2], fields[3], fields[10]
    body = b""
    while len(body) < nbytes:
        body += sock.recv(nbytes - len(body))
    return mtype, code, body


def test_bad_input_gets_clear_errors_and_the_server_keeps_serving():
    store = _store()
    servers = _servers(store, 1, 3)
    clients = [ps.Client(store, r, 3, 1, timeout=30.0) for r in range(2)]
    try:
        for c in clients:
            c.register("w", 100)
        # Wrong size, both at registration and on a push.
        with pytest.raises(ValueError, match=r"registered with numel 100 dtype float32; this REGISTER says numel 99"):
            clients[0]._native.register_key(0, ps.key_id("w", 0), "w#0", 99).wait()
        server, key, _, _ = clients[0].shards("w", 100)[0]
        x = np.ones(99, F32)
        with pytest.raises(ValueError, match=r"key 'w#0' \(id \d+\): numel 99, expected 100"):
            clients[0]._native.push_pull(server, key, x.ctypes.data, x.ctypes.data, 99, ringcc._C.Compression.none).wait()
        # Unknown key.
        with pytest.raises(ValueError, match=r"unknown key id 12345 \(not registered on this server\)"):
            clients[1]._native.pull(0, 12345, x.ctypes.data, 99).wait()
        # Wrong dtype: refused in Python for tensors, by the server for raw requests.
        with pytest.raises(TypeError, match="holds float32 values; got a float64 tensor"):
            clients[0].push_pull("w", np.ones(100))
        with pytest.raises(TypeError, match="dtype float16 not supported"):
            clients[0]._native.register_key(0, 99, "h", 10, ringcc._C.DataType.float16).wait()
        host, port = servers[0].address.rsplit(":", 1)
        secret = ringcc.ps._job_token(store, "ps/", 10)
        with socket.create_connection((host, int(port))) as raw:
            assert raw_authenticate(raw, secret, 2, 3) == ((16, 0, b""), True)  # OK (sync), server proved itself
            raw.sendall(_hdr(4, sender=2, dtype=0, key=key, numel=100, payload=400) + b"\0" * 400)
            mtype, code, text = _recv_reply(raw)
            assert (mtype, code) == (18, 2) and b"dtype float16, expected float32" in text, text
            raw.sendall(_hdr(4, sender=2, key=key, numel=100, payload=1 << 40))  # over every bound
            mtype, code, text = _recv_reply(raw)
            assert mtype == 18 and b"payload of 1099511627776 bytes, expected 400" in text, text
        # Wrong job secret; a message before HELLO; garbage.
        with pytest.raises(ringcc.PeerError, match="could not prove it knows the job secret"):
            ps.Client(store, 2, 3, 1, token="0" * 64, timeout=10.0)
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(_hdr(5, key=key, numel=100))
            mtype, code, text = _recv_reply(raw)
            assert (mtype, code) == (18, 4) and b"not authenticated" in text
            assert raw.recv(1) == b""  # and hung up
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\n" + b"x" * 48)
            mtype, code, text = _recv_reply(raw)
            assert mtype == 18 and b"bad magic" in text
        # The server still serves the good workers (and a third that joins now).
        third = ps.Client(store, 2, 3, 1, timeout=30.0)
        clients.append(third)
        third.register("w", 100)
        arrays = [np.full(100, float(r), F32) for r in range(3)]
        _sync_round(clients, "w", arrays)
        for a in arrays:
            assert np.array_equal(a, np.full(100, 1.0, F32))
    finally:
        _close(servers, clients)


# --------------------------------------------------------------------------- rendezvous
def test_start_order_does_not_matter():
    store = _store()
    made = [None, None]
    errors = []

    def worker(r):
        try:
            made[r] = ps.Client(store, r, 2, 2, timeout=30.0)  # blocks until both servers published
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    servers = _servers(store, 2, 2)  # started after the clients began waiting
    for t in threads:
        t.join(60)
    assert not errors, errors
    try:
        for c in made:
            c.register("w", 10)
        arrays = [np.zeros(10, F32), np.full(10, 4.0, F32)]
        _sync_round(made, "w", arrays)
        assert np.array_equal(arrays[0], np.full(10, 2.0, F32))
    finally:
        _close(servers, made)


def test_job_token_is_created_once():
    store = _store()
    tokens = {ps._job_token(store, "ps/", 10) for _ in range(3)}
    assert len(tokens) == 1 and len(tokens.pop()) == 64  # 32 random bytes as hex
    mem = MemoryStore()  # set/get only
    assert ps._job_token(mem, "ps/", 10) == ps._job_token(mem, "ps/", 10)


def test_ps_server_cli_serves_and_exits_on_shutdown():
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = dict(os.environ, RINGCC_SOCKET_IFNAME="")
    env.pop("RINGCC_SOCKET_IFNAME")
    proc = subprocess.Popen([sys.executable, "-m", "ringcc", "ps-server", "--store", f"127.0.0.1:{master.port}",
                             "--num-workers", "1", "--listen-host", "127.0.0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        client = ps.Client(master, 0, 1, 1, timeout=60.0)
        client.register("w", 5)
        x = np.arange(5, dtype=F32)
        client.push_pull("w", x)
        assert np.array_equal(x, np.arange(5, dtype=F32))  # the average of one worker
        client.shutdown()
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "listening on 127.0.0.1:" in out and "every worker sent SHUTDOWN" in out, out
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
