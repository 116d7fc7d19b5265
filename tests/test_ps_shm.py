"""Parameter server over shared memory: same-host connections move payloads through a
per-connection shm object (headers stay on TCP). Results equal the TCP path's bit for
bit; transport="tcp", other host ids and oversized payloads use TCP; nothing is left in
/dev/shm, even after a worker is SIGKILLed; a header claiming more than the region is
refused while the server keeps serving."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import uuid
from multiprocessing import shared_memory

import numpy as np
import pytest
import torch.distributed as dist

from ringcc import ps
from ps_helpers import close_all as _close, make_clients as _clients, raw_authenticate, start_servers as _servers

F32 = np.float32
HDR = "<IHBBIBBHQQQQQQ"  # magic version type code sender dtype wire flags key numel payload round aux reserved


def _ps_names(pid=None):
    """Shared-memory names of parameter-server connections (of one creating pid)."""
    names = [n for n in os.listdir("/dev/shm") if n.startswith("ringcc-ps-")]
    return [n for n in names if pid is None or f"-{pid}-" in n]


def _sync_rounds(transport, num_workers, num_servers, compression, **kw):
    store = dist.HashStore()
    servers = _servers(store, num_servers, num_workers)
    clients = _clients(store, num_workers, num_servers, shard_elements=500, transport=transport, **kw)
    try:
        paths = {c.transport_to(s) for c in clients for s in range(num_servers)}
        rng = np.random.default_rng(7)
        name = "w"  # five shards, spread over both servers
        assert len({ps.server_of(name, j, num_servers) for j in range(5)}) == num_servers
        for c in clients:
            c.register(name, 2500)
        results = []
        for _ in range(2):
            grads = [rng.standard_normal(2500).astype(F32) for _ in range(num_workers)]
            works = [c.push_pull(name, g.copy(), compression=compression, async_op=True)
                     for c, g in zip(clients, grads)]
            results.append([w.wait() for w in works])
            if compression is None:
                np.testing.assert_allclose(results[-1][0], np.mean(grads, axis=0, dtype=F32), rtol=2e-7, atol=1e-7)
        stats = [c.transport_stats(s) for c in clients for s in range(num_servers)]
        return paths, results, stats
    finally:
        _close(servers, clients)


@pytest.mark.parametrize("num_workers,num_servers,compression", [(2, 1, None), (3, 2, None), (3, 2, "fp16")])
def test_shm_sync_equals_tcp(num_workers, num_servers, compression):
    paths, shm, stats = _sync_rounds("auto", num_workers, num_servers, compression)
    assert paths == {"shm"}
    assert all(s["tcp_payloads"] == 0 for s in stats) and all(s["shm_payloads"] > 0 for s in stats), stats
    tcp_paths, tcp, tcp_stats = _sync_rounds("tcp", num_workers, num_servers, compression)
    assert tcp_paths == {"tcp"} and all(s["shm_payloads"] == 0 for s in tcp_stats)
    for shm_round, tcp_round in zip(shm, tcp):
        assert all(np.array_equal(a, shm_round[0]) for a in shm_round)  # every worker, the same bits
        # The server sums in arrival order: with 3 workers the last bit may differ between runs.
        if num_workers == 2:
            assert np.array_equal(shm_round[0], tcp_round[0])
        tol = 1e-6 if compression is None else 4e-3  # fp16: one more rounding of the reply
        np.testing.assert_allclose(shm_round[0], tcp_round[0], rtol=tol, atol=tol)


def test_shm_async_sgd_matches_numpy():
    lr, mom, wd = 0.1, 0.9, 0.01
    store = dist.HashStore()
    servers = _servers(store, 2, 2, mode="async", lr=lr, momentum=mom, weight_decay=wd, staleness=100)
    clients = _clients(store, 2, 2, shard_elements=300)
    try:
        assert [c.transport_to(s) for c in clients for s in range(2)] == ["shm"] * 4
        rng = np.random.default_rng(3)
        p = rng.standard_normal(1000).astype(F32)
        for c in clients:
            c.register("p", 1000)
        clients[0].init("p", p)
        buf = np.zeros_like(p)
        for step in range(5):
            g = rng.standard_normal(1000).astype(F32)
            got = clients[step % 2].push_pull("p", g.copy())
            buf = F32(mom) * buf + (g + F32(wd) * p)
            p = p - F32(lr) * buf
            np.testing.assert_allclose(got, p, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(clients[1].pull("p", np.zeros_like(p)), p, rtol=1e-6, atol=1e-7)
        assert all(clients[0].transport_stats(s)["tcp_payloads"] == 0 for s in range(2))
    finally:
        _close(servers, clients)


@pytest.mark.parametrize("how", ["client", "server", "env", "host_id", "host_id_env"])
def test_tcp_is_used_when_asked_or_on_another_host(how, monkeypatch):
    server_kw, client_kw = {}, {}
    if how == "client":
        client_kw["transport"] = "tcp"
    elif how == "server":
        server_kw["transport"] = "tcp"
    elif how == "env":
        monkeypatch.setenv("RINGCC_PS_TRANSPORT", "tcp")
    elif how == "host_id":
        server_kw["host_id"], client_kw["host_id"] = "node-a", "node-b"
    else:
        monkeypatch.setenv("RINGCC_HOST_ID", "node-a")
        server_kw["host_id"] = "node-b"
    store = dist.HashStore()
    servers = _servers(store, 1, 1, **server_kw)
    (client,) = _clients(store, 1, 1, **client_kw)
    try:
        assert client.transport_to(0) == "tcp"
        client.register("w", 64)
        g = np.arange(64, dtype=F32)
        assert np.array_equal(client.push_pull("w", g.copy()), g)
        assert client.transport_stats(0) == {"transport": "tcp", "shm_payloads": 0, "tcp_payloads": 2}
    finally:
        _close(servers, [client])
    with pytest.raises(ValueError, match="transport must be 'auto' or 'tcp'"):
        ps.Client(store, 0, 1, 1, transport="shm")


def test_equal_host_ids_use_shm_and_oversized_payloads_fall_back_to_tcp():
    store = dist.HashStore()
    servers = _servers(store, 1, 1, host_id="node-a")
    (client,) = _clients(store, 1, 1, host_id="node-a", shm_bytes=4096)
    try:
        assert client.transport_to(0) == "shm"
        client.register("big", 2000)   # 8000 bytes of fp32: larger than the 4096-byte region
        client.register("small", 500)  # 2000 bytes
        g = np.linspace(-1, 1, 2000, dtype=F32)
        assert np.array_equal(client.push_pull("big", g.copy()), g)
        assert client.transport_stats(0) == {"transport": "shm", "shm_payloads": 0, "tcp_payloads": 2}
        assert np.array_equal(client.push_pull("small", g[:500].copy()), g[:500])
        assert client.transport_stats(0)["shm_payloads"] == 2
        # fp16 of the big key fits (2 bytes a value plus block scales): shm both ways.
        half = client.push_pull("big", g.copy(), compression="fp16")
        np.testing.assert_allclose(half, g, atol=2.0 ** -10)
        assert client.transport_stats(0) == {"transport": "shm", "shm_payloads": 4, "tcp_payloads": 2}
        assert np.array_equal(client.pull("big", np.zeros(2000, F32)), half)  # fp32 reply: TCP
        assert client.transport_stats(0)["tcp_payloads"] == 3
    finally:
        _close(servers, [client])


def test_no_names_left_in_dev_shm_while_running_and_after_close():
    store = dist.HashStore()
    servers = _servers(store, 2, 2)
    clients = _clients(store, 2, 2)
    try:
        assert {c.transport_to(s) for c in clients for s in range(2)} == {"shm"}
        assert _ps_names(os.getpid()) == []  # unlinked as soon as each server mapped it
        for c in clients:
            c.register("w", 10)
        works = [c.push_pull("w", np.ones(10, F32), async_op=True) for c in clients]
        assert all(np.array_equal(w.wait(), np.ones(10, F32)) for w in works)
    finally:
        _close(servers, clients)
    assert _ps_names(os.getpid()) == []


_CHILD = """
import sys
import numpy as np
from ringcc import _C
addr, token, key = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = _C.PsClient(0, 1, token, [addr], 30.0)
c.register_key(0, key, "w#0", 1000).wait()
a = np.ones(1000, np.float32)
c.push_pull(0, key, a.ctypes.data, a.ctypes.data, 1000, _C.Compression.none).wait()
print(c.stats(0)["transport"], flush=True)
while True:
    a[:] = 1.0
    c.push_pull(0, key, a.ctypes.data, a.ctypes.data, 1000, _C.Compression.none).wait()
"""


def test_sigkilled_worker_leaves_nothing_and_the_server_serves_its_successor():
    store = dist.HashStore()
    (server,) = _servers(store, 1, 1, mode="async", lr=1.0, staleness=1 << 40)
    token = ps._job_token(store, "ps/", 10)
    key = ps.key_id("w", 0)
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, server.address, token, str(key)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "shm"  # attached and pushing
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
        assert _ps_names(proc.pid) == []
        (client,) = _clients(store, 1, 1)  # rank 0 again, now that the old connection is gone
        try:
            assert client.transport_to(0) == "shm"
            client.register("w", 1000)
            before = client.pull("w", np.zeros(1000, F32))
            assert before[0] < 0 and np.all(before == before[0])  # the child's updates are kept
            after = client.push_pull("w", np.ones(1000, F32))
            assert np.array_equal(after, before - 1.0)
        finally:
            client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        server.stop()
    assert _ps_names(proc.pid) == [] and _ps_names(os.getpid()) == []


# --------------------------------------------------------------------------- raw peer
def _hdr(mtype, *, sender=0, dtype=2, wire=0, flags=0, key=0, numel=0, payload=0, rnd=0, aux=0):
    return struct.pack(HDR, 0x53504352, 3, mtype, 0, sender, dtype, wire, flags, key, numel, payload, rnd, aux, 0)


def _reply(sock):
    data = b""
    while len(data) < 64:
        chunk = sock.recv(64 - len(data))
        assert chunk, "server closed the connection"
        data += chunk
    f = struct.unpack(HDR, data)
    mtype, code, flags, nbytes = f[2], f[3], f[7], f[10]
    body = b""
    while len(body) < nbytes and not flags & 1:
        body += sock.recv(nbytes - len(body))
    return mtype, code, flags, body


def test_shm_header_beyond_the_region_is_refused_and_the_server_keeps_serving():
    store = dist.HashStore()
    (server,) = _servers(store, 1, 2, mode="async", lr=1.0, staleness=1 << 40, host_id="raw-host")
    (good,) = [ps.Client(store, 0, 2, 1, timeout=30.0, host_id="raw-host")]
    secret = ps._job_token(store, "ps/", 10)
    host, port = server.address.rsplit(":", 1)
    region = 4096
    unlinked = False
    seg = shared_memory.SharedMemory(name=f"ringcc-ps-test-{uuid.uuid4().hex}", create=True, size=2 * region)
    try:
        good.register("big", 2000)
        good.register("small", 100)
        big, small = ps.key_id("big", 0), ps.key_id("small", 0)
        with socket.create_connection((host, int(port))) as raw:
            assert raw_authenticate(raw, secret, 1, 2)[0][0] == 16
            # Flagged before any region is attached.
            raw.sendall(_hdr(4, sender=1, flags=1, key=small, numel=100, payload=400))
            mtype, code, _, text = _reply(raw)
            assert (mtype, code) == (18, 1) and b"has none attached" in text, text
            # Attach: only after a matching probe, and only names of this library.
            raw.sendall(_hdr(7, payload=len(b"raw-host")) + b"raw-host")
            assert _reply(raw)[:2] == (16, 1)
            raw.sendall(_hdr(8, payload=11, aux=region) + b"/etc-passwd")
            mtype, _, _, text = _reply(raw)
            assert mtype == 18 and b"is not a ringcc parameter-server object name" in text, text
            raw.sendall(_hdr(7, payload=len(b"raw-host")) + b"raw-host")
            assert _reply(raw)[:2] == (16, 1)
            name = ("/" + seg.name.lstrip("/")).encode()
            raw.sendall(_hdr(8, payload=len(name), aux=region) + name)
            assert _reply(raw)[:2] == (16, 1)
            seg.unlink()  # as a client does once the server has it mapped
            unlinked = True
            # The key's size is right (8000 bytes) but more than the region holds.
            raw.sendall(_hdr(4, sender=1, flags=1, key=big, numel=2000, payload=8000))
            mtype, code, _, text = _reply(raw)
            assert (mtype, code) == (18, 1), text
            assert b"shared-memory payload of 8000 bytes exceeds this connection's region of 4096" in text, text
            # A size that does not match the key is refused as on TCP, before the region.
            raw.sendall(_hdr(4, sender=1, flags=1, key=small, numel=100, payload=4000))
            mtype, code, _, text = _reply(raw)
            assert (mtype, code) == (18, 1) and b"payload of 4000 bytes, expected 400" in text, text
            # The same connection still works: a correct flagged push, reply in the region.
            seg.buf[:400] = np.full(100, 2.0, F32).tobytes()
            raw.sendall(_hdr(4, sender=1, flags=1, key=small, numel=100, payload=400))
            mtype, _, flags, _ = _reply(raw)
            assert (mtype, flags) == (17, 1)
            assert np.array_equal(np.frombuffer(bytes(seg.buf[region:region + 400]), F32), np.full(100, -2.0, F32))
            # And so does the well-behaved worker.
            assert np.array_equal(good.push_pull("small", np.ones(100, F32)), np.full(100, -3.0, F32))
            assert np.array_equal(good.push_pull("big", np.ones(2000, F32)), np.full(2000, -1.0, F32))
            assert good.transport_to(0) == "shm"
    finally:
        good.close()
        server.stop()
        seg.close()
        if not unlinked:
            seg.unlink()
