"""Authentication of every connection (issue 8): the HMAC primitives against hashlib,
forged, replayed and stray connections to the collectives' mesh and to a parameter
server, the listen address, and the absence of unpickling on socket paths.

Ranks run as threads over real TCP sockets. Attackers are raw Python sockets that speak
the documented handshake (docs/architecture.md, "Authentication") with Python's own
hmac, so the proofs are computed independently of the native code; a positive control
(checking the acceptor's proof with the right secret) shows the transcript is right, so
a rejection of the forged proof is due to the secret alone."""

from __future__ import annotations

import ast
import hmac
import os
import pickle
import re
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import pytest
import torch.distributed as dist
from hypothesis import given, settings, strategies as st

import ringcc
from ringcc import _store, ps
from ringcc._native import _C
from conftest import MemoryStore, SharedStore
from ps_helpers import (AUTH, CHALLENGE, ERROR, HELLO, OK, close_all, make_clients, raw_authenticate, raw_header,
                        raw_reply, recv_exact, start_servers)

F32 = np.float32
WAIT = 60.0  # generous bound on any single wait in these tests; none should come near it

# --------------------------------------------------------------------------- primitives


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=700), key=st.binary(max_size=200))
def test_sha256_and_hmac_match_hashlib(data, key):
    import hashlib

    assert _C._auth_sha256(data) == hashlib.sha256(data).digest()
    assert _C._auth_hmac_sha256(key, data) == hmac.new(key, data, "sha256").digest()


@settings(max_examples=100, deadline=None)
@given(chunks=st.lists(st.binary(max_size=150), max_size=12))
def test_sha256_fed_in_pieces_equals_one_shot(chunks):
    import hashlib

    assert _C._auth_sha256_chunks(chunks) == hashlib.sha256(b"".join(chunks)).digest()


def test_sha256_known_answers_and_block_boundaries():
    # FIPS 180-4 examples, and every length around the 55/56/64-byte padding edges.
    assert _C._auth_sha256(b"abc").hex() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert _C._auth_sha256(b"").hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    import hashlib

    for n in range(0, 200):
        data = bytes(range(n))
        assert _C._auth_sha256(data) == hashlib.sha256(data).digest(), n
    big = os.urandom(1 << 20)
    assert _C._auth_sha256(big) == hashlib.sha256(big).digest()
    long_key = os.urandom(300)  # longer than a block: hashed first (RFC 2104)
    assert _C._auth_hmac_sha256(long_key, b"m") == hmac.new(long_key, b"m", "sha256").digest()


def test_constant_time_equal_and_random_source():
    a = os.urandom(32)
    assert _C._auth_constant_time_equal(a, bytes(a))
    for i in (0, 17, 31):
        b = bytearray(a)
        b[i] ^= 1
        assert not _C._auth_constant_time_equal(a, bytes(b))
    assert not _C._auth_constant_time_equal(a, a[:31])
    draws = {_C._auth_random(32) for _ in range(64)}
    assert len(draws) == 64 and all(len(d) == 32 for d in draws)
    assert _C._auth_random(0) == b""


# --------------------------------------------------------------------------- the job secret


def test_job_secret_is_created_once_on_every_kind_of_store():
    hs = dist.HashStore()  # compare_set
    values = {_store.job_secret(hs, "k", 10) for _ in range(3)}
    assert len(values) == 1 and re.fullmatch(r"[0-9a-f]{64}", values.pop())

    class AddOnly(MemoryStore):
        def __init__(self):
            super().__init__()
            self._n = {}

        def add(self, key, n):
            self._n[key] = self._n.get(key, 0) + n
            return self._n[key]

    s = AddOnly()
    assert _store.job_secret(s, "k", 10) == _store.job_secret(s, "k", 10)

    mem = MemoryStore()  # set/get: the designated creator makes it, the others wait for it
    got = []
    waiter = threading.Thread(target=lambda: got.append(_store.job_secret(mem, "k", 30, creator=False)))
    waiter.start()
    made = _store.job_secret(mem, "k", 30, creator=True)
    waiter.join(WAIT)
    assert got == [made]


def test_a_bad_secret_in_the_store_is_refused_by_name():
    mem = MemoryStore()
    mem.set("k", b"short")
    with pytest.raises(ValueError, match=r"under 'k' is 5 characters; expected at least 32"):
        _store.job_secret(mem, "k", 10, creator=False)


def test_native_sides_refuse_a_missing_or_short_secret():
    with pytest.raises(ValueError, match="the job secret must be 16..1024 bytes"):
        _C.PsServer("127.0.0.1", 1, _C.PsMode.sync, "short", 10.0, 0.1, 0.0, 0.0, 0)
    with pytest.raises(ValueError, match="the job secret must be 16..1024 bytes"):
        _C.PsClient(0, 1, "", ["127.0.0.1:1"], 10.0)
    c = _C.Communicator(rank=0, size=2, transport="tcp", listen_host="127.0.0.1", shm_ring_bytes=1 << 20,
                        tcp_streams=1, tcp_stripe_bytes=1 << 18, timeout=5.0, spin_seconds=0.0,
                        segment_bytes=1 << 18, small_message_bytes=1 << 16, algorithm=_C.Algorithm.auto)
    with pytest.raises(ValueError, match="the job secret must be 16..1024 bytes, got 0"):
        c.connect([c.local_info(), c.local_info()], "")


# --------------------------------------------------------------------------- mesh helpers


class View:
    """One rank's view of the shared store: reading rank 0's record may wait for `gate`,
    and `rewrite(value)` may change that record (e.g. to point at a proxy)."""

    def __init__(self, store: SharedStore, gate: Optional[threading.Event] = None,
                 rewrite: Optional[Callable[[bytes], bytes]] = None) -> None:
        self._store, self._gate, self._rewrite = store, gate, rewrite

    def set(self, key, value) -> None:
        self._store.set(key, value)

    def get(self, key):
        rank0 = key.endswith("/info/0")
        if rank0 and self._gate is not None:
            assert self._gate.wait(WAIT), "the test never opened the gate"
        value = self._store.get(key)
        if rank0 and value is not None and self._rewrite is not None:
            value = self._rewrite(value)
        return value


class Job:
    """`world` ranks as threads, each creating a TCP Communicator from its own store view
    and running `fn(comm)`; join() returns the results or raises the first error."""

    _names = iter(range(1 << 30))

    def __init__(self, world: int, views: list, fn: Callable, **kw) -> None:
        self.name = f"auth{next(self._names)}"
        self.results: list = [None] * world
        self.errors: List[Optional[BaseException]] = [None] * world
        self.created: List[Optional[float]] = [None] * world  # monotonic time each constructor returned
        kw.setdefault("timeout", WAIT)
        kw.setdefault("listen_address", "127.0.0.1")

        def worker(r: int) -> None:
            comm = None
            try:
                comm = ringcc.Communicator(views[r], r, world, name=self.name, transport="tcp", **kw)
                self.created[r] = time.monotonic()
                self.results[r] = fn(comm)
            except BaseException as exc:  # noqa: BLE001 - reported by join()
                self.errors[r] = exc
            finally:
                if comm is not None:
                    comm.close() if self.errors[r] is None else comm.abort("test rank failed")

        self.threads = [threading.Thread(target=worker, args=(r,), daemon=True) for r in range(world)]
        for t in self.threads:
            t.start()

    def join(self) -> list:
        for t in self.threads:
            t.join(2 * WAIT)
        assert not any(t.is_alive() for t in self.threads), "a rank hung"
        for r, e in enumerate(self.errors):
            if e is not None:
                raise AssertionError(f"rank {r} failed: {type(e).__name__}: {e}") from e
        return self.results


def _record(store: SharedStore, job: Job, rank: int) -> dict:
    line = store.wait_for(f"ringcc/{job.name}/1/info/{rank}").decode()
    return dict(item.split("=", 1) for item in line.split(";") if "=" in item)


def _address(record: dict):
    host, port = record["tcp"].rsplit(":", 1)
    return host, int(port)


def _allreduce(comm):
    x = np.arange(1000, dtype=F32) * (comm.rank + 1)
    y = comm.allreduce(x.copy())
    g = comm.allgather(np.full(3, comm.rank, np.int64))
    comm.barrier()
    return y, g


def _check_allreduce(results, world):
    want = np.arange(1000, dtype=F32) * sum(range(1, world + 1))
    for y, g in results:
        np.testing.assert_array_equal(y, want)
        np.testing.assert_array_equal(g, np.repeat(np.arange(world), 3).reshape(world, 3))


MESH_HELLO = "<IHHIIII32s"          # magic, version, stream, from, to, world, streams, challenge
MESH_CHALLENGE = "<II32s32s"        # magic, acceptor rank, challenge, proof
MESH_PROOF = "<I32s"                # magic, proof
HELLO_MAGIC, CHALLENGE_MAGIC, PROOF_MAGIC = 0x52434348, 0x52434343, 0x52434350


def _mesh_proof(secret: bytes, role: bytes, world, streams, dialler, acceptor, stream, nonce_d, nonce_a,
                challenge_d, challenge_a) -> bytes:
    msg = (b"ringcc-mesh-auth-v1" + role + struct.pack("<IIIIIQQ", world, streams, dialler, acceptor, stream,
                                                      nonce_d, nonce_a) + challenge_d + challenge_a)
    return hmac.new(secret, msg, "sha256").digest()


def _closed_by_peer(sock: socket.socket) -> bool:
    """Blocks until the peer closes (True) or sends something (False)."""
    sock.settimeout(WAIT)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# --------------------------------------------------------------------------- mesh: forged


def test_forged_collectives_connection_is_rejected_and_logged(capfd):
    """A connection with the right magic and a well-formed handshake, but proofs made
    with the wrong secret, is refused by rank 0 and logged with its address; the 3-rank
    job then completes its collectives with correct results."""
    store = SharedStore()
    gate = threading.Event()  # ranks 1 and 2 wait for it before dialling rank 0
    job = Job(3, [store, View(store, gate), View(store, gate)], _allreduce)
    try:
        r0, r2 = _record(store, job, 0), _record(store, job, 2)
        secret = store.wait_for(f"ringcc/{job.name}/1/secret")
        with socket.create_connection(_address(r0), timeout=WAIT) as forger:
            mine = os.urandom(32)
            forger.sendall(struct.pack(MESH_HELLO, HELLO_MAGIC, 3, 0, 2, 0, 3, 1, mine))
            # Rank 0 is accepting (ranks 1 and 2 published their records, then stopped at the gate).
            magic, acceptor, theirs, their_proof = struct.unpack(MESH_CHALLENGE,
                                                                 recv_exact(forger, struct.calcsize(MESH_CHALLENGE)))
            assert (magic, acceptor) == (CHALLENGE_MAGIC, 0)
            args = (3, 1, 2, 0, 0, int(r2["nonce"], 16), int(r0["nonce"], 16), mine, theirs)
            # Positive control: this transcript is the acceptor's, with the real secret.
            assert their_proof == _mesh_proof(secret, b"A", *args)
            assert their_proof != _mesh_proof(b"f" * 64, b"A", *args)
            forged = _mesh_proof(b"f" * 64, b"D", *args)  # right format, wrong secret
            forger.sendall(struct.pack(MESH_PROOF, PROOF_MAGIC, forged))
            assert _closed_by_peer(forger), "rank 0 answered a forged proof"
            forger_port = forger.getsockname()[1]
    finally:
        gate.set()
    _check_allreduce(job.join(), 3)
    err = capfd.readouterr().err
    assert (f"ringcc: rank 0 rejected a connection from 127.0.0.1:{forger_port}: wrong proof of the job secret "
            "for rank 2 stream 0") in err, err
    assert secret.decode() not in err


# --------------------------------------------------------------------------- mesh: replay


class Proxy:
    """Between ranks 1, 2 and rank 0: relays rank 2's connection while recording what it
    sent in the handshake, then replays those bytes on a new connection to rank 0 and
    waits for rank 0 to hang up, and only then relays rank 1's connection (so rank 0 is
    still accepting when the replay arrives)."""

    def __init__(self, upstream) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self.listener.getsockname()[1]
        self.captured: List[bytes] = []   # rank 2's hello and proof
        self.handshake: List[bytes] = []  # every handshake byte of rank 2's connection, both ways
        self.replay_challenge = b""
        self.replay_closed: Optional[bool] = None
        self.replay_port = 0
        self.replayed = threading.Event()
        self.failures: list = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        for _ in range(2):  # ranks 1 and 2, one stream each
            conn, _ = self.listener.accept()
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _pump(self, src, dst) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _serve(self, client) -> None:
        try:
            hello = recv_exact(client, struct.calcsize(MESH_HELLO))
            from_rank = struct.unpack(MESH_HELLO, hello)[3]
            if from_rank != 2:
                assert self.replayed.wait(WAIT)
            up = socket.create_connection(self.upstream, timeout=WAIT)
            if from_rank == 2:
                up.sendall(hello)
                challenge = recv_exact(up, struct.calcsize(MESH_CHALLENGE))
                client.sendall(challenge)
                proof = recv_exact(client, struct.calcsize(MESH_PROOF))
                up.sendall(proof)
                ack = recv_exact(up, 4)
                client.sendall(ack)
                self.captured = [hello, proof]
                self.handshake = [hello, challenge, proof, ack]
                self._replay()
            else:
                up.sendall(hello)
            up.settimeout(None)
            client.settimeout(None)
            t = threading.Thread(target=self._pump, args=(up, client), daemon=True)
            t.start()
            self._pump(client, up)
            t.join(WAIT)
        except BaseException as exc:  # noqa: BLE001 - checked by the test
            self.failures.append(exc)
            self.replayed.set()

    def _replay(self) -> None:
        with socket.create_connection(self.upstream, timeout=WAIT) as s:
            self.replay_port = s.getsockname()[1]
            s.sendall(self.captured[0])
            self.replay_challenge = recv_exact(s, struct.calcsize(MESH_CHALLENGE))
            s.sendall(self.captured[1])
            self.replay_closed = _closed_by_peer(s)
        self.replayed.set()

    def close(self) -> None:
        self.listener.close()
        for t in self.threads:
            t.join(WAIT)


def test_replayed_collectives_hello_is_rejected_and_logged(capfd):
    """Rank 2's genuine hello and proof, captured on the wire and replayed to rank 0 on a
    new connection during setup, meet a fresh challenge: the proof no longer matches and
    rank 0 rejects and logs it. The job completes with correct results, and the secret
    never appeared on the wire."""
    store = SharedStore()
    proxies: list = []
    ready = threading.Event()

    def via_proxy(value: bytes) -> bytes:
        assert ready.wait(WAIT)
        return re.sub(rb"tcp=[^;]*", b"tcp=" + proxies[0].address.encode(), value)

    job = Job(3, [store, View(store, rewrite=via_proxy), View(store, rewrite=via_proxy)], _allreduce)
    try:
        proxies.append(Proxy(_address(_record(store, job, 0))))
        ready.set()
        results = job.join()
    finally:
        ready.set()
        if proxies:
            proxies[0].close()
    proxy = proxies[0]
    assert not proxy.failures, proxy.failures
    _check_allreduce(results, 3)
    assert proxy.replay_closed is True, "rank 0 did not hang up on the replay"
    # The replay got a fresh challenge, not the one the captured proof answered.
    assert proxy.replay_challenge[8:40] != proxy.handshake[1][8:40]
    secret = store.get(f"ringcc/{job.name}/1/secret")
    wire = b"".join(proxy.handshake) + proxy.replay_challenge
    assert secret not in wire and bytes.fromhex(secret.decode()) not in wire
    err = capfd.readouterr().err
    assert (f"ringcc: rank 0 rejected a connection from 127.0.0.1:{proxy.replay_port}: wrong proof of the job "
            "secret for rank 2 stream 0 (forged, replayed, or from another job)") in err, err


# --------------------------------------------------------------------------- mesh: strays


def _strays(address):
    """A silent connection, garbage, half a hello, and a hello of another version."""
    socks = [socket.create_connection(address, timeout=WAIT) for _ in range(4)]
    socks[1].sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * 40)
    half = struct.pack(MESH_HELLO, HELLO_MAGIC, 3, 0, 2, 0, 3, 1, b"\0" * 32)[:20]
    socks[2].sendall(half)
    socks[3].sendall(struct.pack(MESH_HELLO, HELLO_MAGIC, 2, 0, 2, 0, 3, 1, b"\0" * 32))
    return socks


def test_strays_are_dropped_within_the_handshake_bound(capfd):
    """Strays that send nothing, garbage, half a hello or another version are dropped by
    rank 0 while it is still waiting for its real peers: garbage at once, silent ones
    when the per-connection bound (handshake_timeout) runs out, long before the setup
    timeout. Then the real peers connect and the job completes."""
    store = SharedStore()
    gate = threading.Event()
    job = Job(3, [store, View(store, gate), View(store, gate)], _allreduce, handshake_timeout=2.0)
    socks = []
    try:
        socks = _strays(_address(_record(store, job, 0)))
        ports = [s.getsockname()[1] for s in socks]
        start = time.monotonic()
        # Setup cannot finish (ranks 1 and 2 wait at the gate), so only the handshake
        # bound can make rank 0 hang up on the silent and the half-finished ones.
        assert all(_closed_by_peer(s) for s in socks)
        assert time.monotonic() - start < WAIT / 2  # the bound (2 s), not the setup timeout (60 s)
        assert job.created[0] is None
    finally:
        gate.set()
        for s in socks:
            s.close()
    _check_allreduce(job.join(), 3)
    err = capfd.readouterr().err
    reasons = {ports[0]: "no complete handshake within 2 s", ports[1]: "not a ringcc connection",
               ports[2]: "no complete handshake within 2 s",
               ports[3]: "handshake version 2, expected 3 (another ringcc version?)"}
    for port, why in reasons.items():
        assert f"rank 0 rejected a connection from 127.0.0.1:{port}: {why}" in err, err


def test_silent_stray_does_not_delay_setup(capfd):
    """A stray that connects first and then says nothing does not hold up the real peers
    behind it: with the default 10 s bound, setup completes well within it (a rank that
    read hellos one at a time would wait the bound out), and the stray is dropped when
    setup ends."""
    store = SharedStore()
    gate = threading.Event()
    job = Job(3, [store, View(store, gate), View(store, gate)], _allreduce, handshake_timeout=10.0)
    try:
        silent = socket.create_connection(_address(_record(store, job, 0)), timeout=WAIT)
        port = silent.getsockname()[1]
    finally:
        released = time.monotonic()
        gate.set()
    with silent:
        _check_allreduce(job.join(), 3)
        assert max(job.created) - released < 8.0, "setup waited for the silent stray"
        assert _closed_by_peer(silent)
    err = capfd.readouterr().err
    assert f"rank 0 rejected a connection from 127.0.0.1:{port}: setup finished before its handshake did" in err


def test_dialler_refuses_an_endpoint_that_cannot_prove_the_secret():
    """Rank 1's record of rank 0 points at an impostor that answers with a challenge and
    a made-up proof: rank 1 refuses it by name instead of sending data there."""
    store = SharedStore()
    impostor = socket.create_server(("127.0.0.1", 0))
    addr = "127.0.0.1:%d" % impostor.getsockname()[1]

    def answer():
        conn, _ = impostor.accept()
        with conn:
            hello = recv_exact(conn, struct.calcsize(MESH_HELLO))
            assert struct.unpack(MESH_HELLO, hello)[3] == 1
            conn.sendall(struct.pack(MESH_CHALLENGE, CHALLENGE_MAGIC, 0, os.urandom(32), os.urandom(32)))
            _closed_by_peer(conn)

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    job = Job(2, [store, View(store, rewrite=lambda v: re.sub(rb"tcp=[^;]*", b"tcp=" + addr.encode(), v))],
              _allreduce, timeout=5.0)
    with pytest.raises(AssertionError) as info:
        job.join()
    t.join(WAIT)
    impostor.close()
    assert isinstance(job.errors[1], ringcc.PeerError)
    assert f"the endpoint published for rank 0 at {addr} could not prove it knows this job's secret" in str(
        job.errors[1])
    assert isinstance(job.errors[0], ringcc.TimeoutError), info.value  # rank 0 never got rank 1's connection
    assert "still waiting for connections from rank/stream 1/0" in str(job.errors[0])


# --------------------------------------------------------------------------- parameter server


def _ps_round(clients, value_of=lambda r: float(r)):
    works = [c.push_pull("w", np.full(16, value_of(r), F32), async_op=True) for r, c in enumerate(clients)]
    return [w.wait() for w in works]


def test_ps_forged_and_replayed_clients_are_rejected_and_logged(capfd):
    store = dist.HashStore()
    # Async (SGD with lr 1): workers 0 and 1 are served whatever worker 2 does; worker 2
    # is the raw socket below.
    servers = start_servers(store, 1, 3, mode="async", lr=1.0, staleness=100)
    clients = [ps.Client(store, r, 3, 1, timeout=WAIT) for r in range(2)]
    try:
        for c in clients:
            c.register("w", 16)
        secret = ps._job_token(store, "ps/", 10)
        host, port = servers[0].address.rsplit(":", 1)
        # Forged: a well-formed handshake with proofs made from the wrong secret.
        with socket.create_connection((host, int(port)), timeout=WAIT) as raw:
            (mtype, code, text), server_proved = raw_authenticate(raw, "e" * 64, 2, 3)
            assert (mtype, code) == (ERROR, 4) and not server_proved
            assert b"AUTH: authentication failed: wrong proof of the job secret" in text, text
            assert _closed_by_peer(raw)
            forged_port = raw.getsockname()[1]
        # Captured: a genuine handshake (the secret is right), recorded on the wire ...
        sent: list = []
        with socket.create_connection((host, int(port)), timeout=WAIT) as raw:
            (mtype, code, _), server_proved = raw_authenticate(raw, secret, 2, 3, transcript=sent)
            assert (mtype, server_proved) == (OK, True)  # positive control for the proof format
        # ... and replayed on a new connection: the server's fresh challenge defeats it.
        with socket.create_connection((host, int(port)), timeout=WAIT) as raw:
            raw.sendall(sent[0])
            mtype, _, body = raw_reply(raw)
            assert mtype == CHALLENGE and len(body) == 64
            raw.sendall(sent[1])
            mtype, code, text = raw_reply(raw)
            assert (mtype, code) == (ERROR, 4) and b"wrong proof of the job secret" in text, text
            assert _closed_by_peer(raw)
            replay_port = raw.getsockname()[1]
        assert secret.encode() not in b"".join(sent) and bytes.fromhex(secret) not in b"".join(sent)
        # A worker of another job (its own secret) refuses this server by name.
        with pytest.raises(ringcc.PeerError, match="could not prove it knows the job secret"):
            ps.Client(store, 2, 3, 1, token="0" * 64, timeout=10.0)
        # The server kept serving the real workers.
        np.testing.assert_array_equal(clients[0].push_pull("w", np.ones(16, F32)), np.full(16, -1.0, F32))
        np.testing.assert_array_equal(clients[1].push_pull("w", np.ones(16, F32)), np.full(16, -2.0, F32))
    finally:
        close_all(servers, clients)
    err = capfd.readouterr().err
    for p in (forged_port, replay_port):
        assert (f"rejected a connection from 127.0.0.1:{p}: authentication failed: wrong proof of the job "
                "secret") in err, err
    assert secret not in err


def test_ps_strays_are_dropped_and_do_not_stall_the_server(capfd):
    store = dist.HashStore()
    servers = start_servers(store, 1, 2, handshake_timeout=1.0)
    host, port = servers[0].address.rsplit(":", 1)
    silent = socket.create_connection((host, int(port)), timeout=WAIT)
    garbage = socket.create_connection((host, int(port)), timeout=WAIT)
    garbage.sendall(b"\x16\x03\x01" + os.urandom(61))  # a TLS-looking record: not ringcc
    half = socket.create_connection((host, int(port)), timeout=WAIT)
    half.sendall(raw_header(HELLO, sender=1, numel=2, payload=32) + b"\0" * 10)  # stops mid-challenge
    clients = []
    try:
        # With the strays connected (and before any of them timed out: the clients'
        # whole setup and round must not wait for them), the workers are served.
        start = time.monotonic()
        clients = make_clients(store, 2, 1)
        for c in clients:
            c.register("w", 16)
        outs = _ps_round(clients, lambda r: 2.0 * r)
        for o in outs:
            np.testing.assert_array_equal(o, np.full(16, 1.0, F32))
        mtype, code, text = raw_reply(garbage)
        assert mtype == ERROR and b"bad magic" in text
        for s in (silent, half):
            mtype, code, text = raw_reply(s)  # the bound runs out: a readable reason, then EOF
            assert (mtype, code) == (ERROR, 4) and b"no authentication within 1 s" in text, text
            assert _closed_by_peer(s)
        assert time.monotonic() - start < WAIT / 2
        ports = [s.getsockname()[1] for s in (silent, garbage, half)]
    finally:
        for s in (silent, garbage, half):
            s.close()
        close_all(servers, clients)
    err = capfd.readouterr().err
    assert f"127.0.0.1:{ports[0]}: no authentication within 1 s (RINGCC_HANDSHAKE_TIMEOUT)" in err, err
    assert f"127.0.0.1:{ports[1]}: protocol error: bad magic" in err, err
    assert f"127.0.0.1:{ports[2]}: no authentication within 1 s" in err, err


def test_ps_messages_before_authentication_are_refused():
    store = dist.HashStore()
    servers = start_servers(store, 1, 1)
    host, port = servers[0].address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=WAIT) as raw:  # AUTH with no HELLO
            raw.sendall(raw_header(AUTH, payload=32) + b"\0" * 32)
            assert raw_reply(raw)[:2] == (ERROR, 4) and _closed_by_peer(raw)
        with socket.create_connection((host, int(port)), timeout=WAIT) as raw:  # HELLO, then skip AUTH
            raw.sendall(raw_header(HELLO, numel=1, payload=32) + os.urandom(32))
            assert raw_reply(raw)[0] == CHALLENGE
            raw.sendall(raw_header(6))  # SHUTDOWN
            mtype, code, text = raw_reply(raw)
            assert (mtype, code) == (ERROR, 4) and b"not authenticated" in text and _closed_by_peer(raw)
        with socket.create_connection((host, int(port)), timeout=WAIT) as raw:  # the old token HELLO
            raw.sendall(raw_header(HELLO, numel=1, version=2))
            mtype, code, text = raw_reply(raw)
            assert mtype == ERROR and b"protocol version 2, expected 3" in text
        c = ps.Client(store, 0, 1, 1, timeout=10.0)  # still serving
        c.register("w", 4)
        np.testing.assert_array_equal(c.push_pull("w", np.ones(4, F32)), np.ones(4, F32))
        c.close()
    finally:
        close_all(servers, [])


# --------------------------------------------------------------------------- listen address


def test_listen_host_from_the_environment(monkeypatch):
    from ringcc.comm import _listen_address

    monkeypatch.setenv("RINGCC_SOCKET_IFNAME", "no-such-if0")  # RINGCC_LISTEN_HOST wins over it
    monkeypatch.setenv("RINGCC_LISTEN_HOST", "127.0.0.1")
    assert _listen_address(object(), None) == "127.0.0.1"
    assert _listen_address(object(), "10.1.2.3") == "10.1.2.3"  # an explicit argument wins over both
    for bad, why in [("localhost", "not a numeric IPv4 or IPv6 address"), ("0.0.0.0", "wildcard"),
                     ("::", "wildcard")]:
        monkeypatch.setenv("RINGCC_LISTEN_HOST", bad)
        with pytest.raises(ValueError, match=f"RINGCC_LISTEN_HOST={bad!r}.*{why}"):
            _listen_address(object(), None)
    with pytest.raises(ValueError, match="listen_address='host.example'"):
        _listen_address(object(), "host.example")


def test_ranks_listen_on_the_configured_host(monkeypatch):
    monkeypatch.setenv("RINGCC_LISTEN_HOST", "127.0.0.1")
    store = SharedStore()
    job = Job(2, [store, store], _allreduce, listen_address=None)
    _check_allreduce(job.join(), 2)
    for r in range(2):
        assert _record(store, job, r)["tcp"].startswith("127.0.0.1:")


def test_ranks_listen_on_an_ipv6_address():
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    store = SharedStore()
    job = Job(2, [store, store], _allreduce, listen_address="::1")
    _check_allreduce(job.join(), 2)
    assert _record(store, job, 0)["tcp"].startswith("[::1]:")


# --------------------------------------------------------------------------- no unpickling

PKG = Path(ringcc.__file__).parent
PICKLERS = {"pickle", "_pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}
# torch's object collectives pickle by design (each rank unpickles what the others sent);
# ringcc calls them only here, and on a ringcc group they run over authenticated links.
TORCH_OBJECT_COLLECTIVES = {("ddp.py", "all_gather_object"), ("trainer.py", "gather_object"),
                            ("trainer.py", "broadcast_object_list")}


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute):  # x.name(...); bare names are covered by the imports
                base = f.value.id if isinstance(f.value, ast.Name) else ast.unparse(f.value)
                yield node, base, f.attr


def test_no_module_of_the_package_unpickles():
    """Structural check over every module of the installed package: no pickle-family
    import, no loads() other than json's, np.load only with allow_pickle=False,
    torch.load only with weights_only=True, and torch's pickling object collectives
    only at the known call sites."""
    modules = sorted(PKG.glob("*.py"))
    assert {"comm.py", "ps.py", "_store.py", "torch_backend.py"} <= {m.name for m in modules}
    found_object_calls = set()
    for path in modules:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & PICKLERS, (path.name, ast.dump(node))
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in PICKLERS, (path.name, node.module)
                assert not {a.name for a in node.names} & {"loads", "load", "Unpickler"}, (path.name, node.module)
        for node, base, name in _calls(tree):
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{path.name}:{node.lineno}"
            if name == "loads":
                assert base == "json", f"{where}: {base}.loads"
            if name == "load":
                assert base in ("np", "torch"), f"{where}: {base}.load"
                if base == "np":
                    assert isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False, where
                else:
                    assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, where
            if name.endswith("_object") or name == "broadcast_object_list":
                found_object_calls.add((path.name, name))
    assert found_object_calls == TORCH_OBJECT_COLLECTIVES, found_object_calls


def test_nothing_is_unpickled_on_the_socket_paths(monkeypatch):
    """At run time: collectives over TCP and a parameter-server round with every way
    into the unpickler replaced by one that records the call."""
    calls = []

    def trap(*a, **k):
        calls.append(a)
        raise AssertionError("unpickling on a ringcc socket path")

    class TrapUnpickler(pickle.Unpickler):
        def __init__(self, *a, **k):
            trap(*a)

    monkeypatch.setattr(pickle, "loads", trap)
    monkeypatch.setattr(pickle, "load", trap)
    monkeypatch.setattr(pickle, "Unpickler", TrapUnpickler)
    with pytest.raises(AssertionError):  # the trap is live
        pickle.loads(b"\x80\x04K\x01.")
    calls.clear()
    store = SharedStore()
    job = Job(3, [store] * 3, _allreduce)
    _check_allreduce(job.join(), 3)
    hs = dist.HashStore()
    servers = start_servers(hs, 1, 2)
    clients = make_clients(hs, 2, 1, transport="tcp")
    try:
        for c in clients:
            c.register("w", 16)
        for o in _ps_round(clients):
            np.testing.assert_array_equal(o, np.full(16, 0.5, F32))
    finally:
        close_all(servers, clients)
    assert calls == []
