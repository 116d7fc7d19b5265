"""Processes for tests/test_ps_faults.py: a parameter-server worker or a server that the
test can SIGKILL. Progress goes to stdout one line at a time, so the test synchronises
on what a process has done (readline) rather than on sleeps.

    async ADDR TOKEN RANK NUM_WORKERS STEPS    push ones STEPS times (-1: until killed)
    sync ADDR TOKEN RANK NUM_WORKERS ROUNDS    ROUNDS rounds of keys a, b; then a; "mid"
    server                                     serve 1 sync worker; print "ADDR TOKEN"
"""

import sys

import numpy as np

from ringcc import ps


class _Addresses:
    """The smallest store a Client needs: the published server address, nothing else."""

    def __init__(self, addr):
        self._values = {"ps/server/0": addr.encode()}

    def set(self, key, value):
        self._values[key] = value

    def get(self, key):
        return self._values[key]


def _client(addr, token, rank, num_workers):
    return ps.Client(_Addresses(addr), rank, num_workers, 1, token=token, timeout=60.0)


def main(argv):
    role = argv[0]
    if role == "server":
        server = ps.Server(_Addresses(""), 0, 1, 1, listen_host="127.0.0.1").start()
        print(server.address, ps._job_token(server.store, "ps/", 10), flush=True)
        sys.stdin.read()  # until the test kills us
        return 0
    addr, token, rank, num_workers, count = argv[1], argv[2], int(argv[3]), int(argv[4]), int(argv[5])
    client = _client(addr, token, rank, num_workers)
    if role == "async":
        client.register("p", 1000)
        step = 0
        while count < 0 or step < count:
            client.push_pull("p", np.ones(1000, np.float32))
            step += 1
            print(f"step {step}", flush=True)
        print("done", flush=True)
    elif role == "sync":
        for name in ("a", "b"):
            client.register(name, 100)
        print("ready", flush=True)  # connected: the test's round timeout may start now
        for _ in range(count):
            client.push_pull("a", np.full(100, rank, np.float32))
            client.push_pull("b", np.full(100, rank, np.float32))
        client.push_pull("a", np.full(100, rank, np.float32))
        print("mid", flush=True)  # half-way through the round: a pushed, b not
        sys.stdin.read()
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
