"""Servers and clients of the parameter-server tests, all on 127.0.0.1."""

from __future__ import annotations

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
