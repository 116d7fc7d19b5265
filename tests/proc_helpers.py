"""Rank processes for multi-process tests: start one, read its output line by line with
a bound, talk to it on stdin, and never leave one behind (the `children` fixture)."""

from __future__ import annotations

import glob
import os
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest


def shm_leftovers(pids) -> list:
    """Names under /dev/shm that ringcc processes with these pids left behind."""
    return [p for pid in pids for p in glob.glob(f"/dev/shm/ringcc-{pid}-*")]


class Child:
    """A rank process whose merged stdout/stderr the parent can read line by line."""

    def __init__(self, rank: int, cmd: Sequence[str], *, cwd: Path, env: Optional[Dict[str, str]] = None,
                 stdin: bool = False):
        self.rank = rank
        self.proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0,
                                     stdin=subprocess.PIPE if stdin else None, cwd=str(cwd), env=env)
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

    def send_line(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

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

    def kill_now(self) -> float:
        """SIGKILL and reap it (a zombie still "exists" for kill(pid, 0)); returns the
        time.monotonic() of the kill."""
        t_kill = time.monotonic()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        assert self.proc.returncode == -signal.SIGKILL, self.proc.returncode
        return t_kill

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
        for pipe in (c.proc.stdout, c.proc.stdin):
            if pipe:
                pipe.close()
