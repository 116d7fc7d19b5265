"""Servers and clients of the parameter-server tests, all on 127.0.0.1."""

from __future__ import annotations

import hmac
import os
import struct

from ringcc import ps


def start_servers(store, n, num_workers, **kw):
    return [ps.Server(store, i, n, num_workers, listen_host="127.0.0.1", **kw).start() for i in range(n)]


def make_clients(store, num_workers, num_servers, **kw):
    kw.setdefault("timeout", 30.0)
    return [ps.Client(store, r, num_workers, num_servers, **kw) for r in range(num_workers)]


def close_all(servers, clients):
    for c in clients:
        c.close()
    for s in servers:
        s.stop()


# ---------------------------------------------------------------- raw protocol peers
PS_MAGIC, PS_VERSION = 0x53504352, 3
HDR = "<IHBBIBBHQQQQQQ"  # the 64-byte header of csrc/ringcc/ps/ps_protocol.h
HELLO, AUTH, OK, ERROR, CHALLENGE = 1, 9, 16, 18, 19


def raw_header(mtype, *, sender=0, numel=0, payload=0, version=PS_VERSION):
    return struct.pack(HDR, PS_MAGIC, version, mtype, 0, sender, 2, 0, 0, 0, numel, payload, 0, 0, 0)


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def raw_reply(sock):
    """(type, code, body) of one reply on a raw socket."""
    f = struct.unpack(HDR, recv_exact(sock, 64))
    return f[2], f[3], recv_exact(sock, f[10]) if f[10] else b""


def proof(secret, role, rank, num_workers, client_challenge, server_challenge):
    """The handshake proof, computed independently of the native code with Python's hmac."""
    msg = b"ringcc-ps-auth-v1" + role + struct.pack("<IQ", rank, num_workers) + client_challenge + server_challenge
    return hmac.new(secret.encode(), msg, "sha256").digest()


def raw_authenticate(sock, secret, rank, num_workers, *, transcript=None):
    """A worker's side of the handshake on a raw socket, with `secret` (right or wrong).
    Returns (final reply (type, code, body), whether the server's proof checked out with
    `secret`); every message sent is appended to `transcript`."""
    mine = os.urandom(32)
    hello = raw_header(HELLO, sender=rank, numel=num_workers, payload=32) + mine
    sock.sendall(hello)
    mtype, code, body = raw_reply(sock)
    assert mtype == CHALLENGE and len(body) == 64, (mtype, code, body)
    theirs = body[:32]
    server_ok = body[32:] == proof(secret, b"S", rank, num_workers, mine, theirs)
    auth = raw_header(AUTH, sender=rank, payload=32) + proof(secret, b"C", rank, num_workers, mine, theirs)
    sock.sendall(auth)
    if transcript is not None:
        transcript += [hello, auth]
    return raw_reply(sock), server_ok
