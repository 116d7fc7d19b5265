"""Ranks as real processes: rendezvous through torch.distributed stores, and a peer
killed with SIGKILL in the middle of a loop of allreduces."""

from __future__ import annotations

import glob
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

WORKER = str(Path(__file__).with_name("_proc_worker.py"))
WORLD = 3


class Child:
    """A rank process whose merged stdout/stderr the parent can read line by line."""

    def __init__(self, rank: int, *args: str, cwd: Path):
        self.rank = rank
        cmd = [sys.executable, WORKER, "--rank", str(rank), "--world", str(WORLD), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0,
                                     cwd=str(cwd))
        self.pid = self.proc.pid
        self._buf = b""
        self.lines: List[str] = []  # every complete line read so far

    def read_line_starting(self, prefix: str, timeout: float) -> str:
        """Block until a line starting with `prefix` arrives (or EOF / timeout: fail)."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                raw, self._buf = self._buf.split(b"\n", 1)
                line = raw.decode(errors="replace")
                self.lines.append(line)
                if line.startswith(prefix):
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"rank {self.rank}: no {prefix!r} line within {timeout} s; output so far:\n"
                            + self.output())
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    self.proc.wait()
                    pytest.fail(f"rank {self.rank} exited (rc={self.proc.returncode}) before printing "
                                f"{prefix!r}; output:\n" + self.output())
                self._buf += chunk

    def finish(self, timeout: float) -> str:
        """Wait for exit (fail on a hang) and return everything it printed."""
        try:
            rest, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rest, _ = self.proc.communicate()
            self._buf += rest or b""
            pytest.fail(f"rank {self.rank} did not finish within {timeout} s (hang); output:\n" + self.output())
        self._buf += rest or b""
        return self.output()

    def output(self) -> str:
        return "\n".join(self.lines + [self._buf.decode(errors="replace")])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def children():
    spawned: List[Child] = []
    yield spawned
    for c in spawned:  # whatever happened, leave no process behind
        c.kill()
        if c.proc.stdout:
            c.proc.stdout.close()


def _shm_leftovers(pids) -> list:
    return [p for pid in pids for p in glob.glob(f"/dev/shm/ringcc-{pid}-*")]


@pytest.mark.parametrize("store", ["tcp", "file"])
def test_collectives_across_processes(store, tmp_path, children):
    # Each child runs the collectives over shm and then over tcp (one store, two
    # communicators), so the torch import is paid once per process.
    common = ["--mode", "collectives", "--store", store, "--transport", "shm,tcp"]
    if store == "tcp":
        # Rank 0 hosts the TCPStore on a port the OS picks and tells us which.
        children.append(Child(0, *common, cwd=tmp_path))
        addr = children[0].read_line_starting("PORT ", timeout=60).split()[1]
        first = 1
    else:
        addr = str(tmp_path / "filestore")
        first = 0
    for rank in range(first, WORLD):
        children.append(Child(rank, *common, "--addr", addr, cwd=tmp_path))
    for child in children:
        out = child.finish(timeout=90)
        assert child.proc.returncode == 0, f"rank {child.rank} failed:\n{out}"
        assert f"OK {child.rank}" in out, out
    assert _shm_leftovers(c.pid for c in children) == []


def _start_loop_and_kill_rank2(children, transport, tmp_path, *extra):
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    for rank in range(WORLD):
        children.append(Child(rank, "--mode", "loop", "--store", "dir", "--addr", str(store_dir),
                              "--transport", transport, "--timeout", "60", "--ready-after", "20", *extra,
                              cwd=tmp_path))
    for child in children:
        child.read_line_starting("READY", timeout=60)
    victim = children[2]
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()  # reap it: a zombie still "exists" for kill(pid, 0)
    assert victim.proc.returncode == -signal.SIGKILL


def _check_report(child, line):
    report = json.loads(line)
    assert report["is_peer_error"], report
    assert report["type"] == "PeerError", report
    assert re.search(r"\brank 2\b", report["message"]), report
    assert report["iterations"] >= 20, report


def test_killed_peer_fails_survivors(transport, tmp_path, children):
    # Survivors leave with os._exit right after reporting: this test is about the error
    # itself (see the next test for what happens when they close).
    _start_loop_and_kill_rank2(children, transport, tmp_path, "--after-error", "exit")
    for child in children[:2]:
        # 30 s is far below the 60 s communicator timeout: only a hang misses it.
        _check_report(child, child.read_line_starting("{", timeout=30))
        child.finish(timeout=30)
        assert child.proc.returncode == 0, f"rank {child.rank} failed:\n{child.output()}"
    assert _shm_leftovers(c.pid for c in children) == []


@pytest.mark.parametrize("mode", ["blocking", "async"])
def test_survivors_close_cleanly_after_peer_death(transport, mode, tmp_path, children):
    extra = ["--after-error", "close"] + (["--async"] if mode == "async" else [])
    _start_loop_and_kill_rank2(children, transport, tmp_path, *extra)
    for child in children[:2]:
        _check_report(child, child.read_line_starting("{", timeout=30))
    for child in children[:2]:
        # Closing an already failed communicator has nothing to wait for: 10 s is a
        # hang detector, not a speed requirement.
        out = child.finish(timeout=10)
        assert child.proc.returncode == 0, f"rank {child.rank} exited with {child.proc.returncode}:\n{out}"
        assert "CLOSED" in out.splitlines(), out
    assert _shm_leftovers(c.pid for c in children) == []


@pytest.mark.parametrize("mode", ["blocking", "async"])
def test_tcp_op_after_peer_teardown_then_close(mode, tmp_path, children):
    # Regression: Mesh::abort() used to throw PeerError (EPIPE) out of fail() when the
    # peer's socket was gone; inline that left the communicator busy, so close() hung,
    # and on the progress thread (async_op=True) it ended in std::terminate.
    child = Child(0, "--mode", "peer-gone", *(["--async"] if mode == "async" else []), cwd=tmp_path)
    children.append(child)
    report = json.loads(child.read_line_starting("{", timeout=60))
    # The barrier cannot succeed: rank 1 is gone.
    assert report["type"] in ("AbortedError", "PeerError"), (report, child.output())
    assert re.search(r"\brank 1\b", report["message"]), report
    out = child.finish(timeout=10)  # a hang detector: close() has nothing left to wait for
    assert child.proc.returncode == 0, f"exited with {child.proc.returncode}:\n{out}"
    assert "CLOSED" in out.splitlines(), out


# A done-callback that holds the last reference to its communicator: when the engine
# thread finished with the callback, dropping it used to destroy the communicator on its
# own progress thread, which cannot join itself (std::terminate, exit 134).
_LAST_REFERENCE_IN_CALLBACK = """
import gc, numpy as np, ringcc
from conftest import MemoryStore
for i in range(20):
    comm = ringcc.Communicator(MemoryStore(), 0, 1, name=f"last{i}")
    w = comm.allreduce(np.ones(1 << 16, np.float32), async_op=True)
    w.add_done_callback(lambda _w, c=comm: None)
    del comm, w
    gc.collect()
print("survived")
"""


def test_callback_holding_the_last_reference_to_its_communicator():
    res = subprocess.run([sys.executable, "-c", _LAST_REFERENCE_IN_CALLBACK], cwd=Path(__file__).parent,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "survived" in res.stdout, res.stdout + res.stderr
