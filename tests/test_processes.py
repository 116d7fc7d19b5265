"""Ranks as real processes: rendezvous through torch.distributed stores; a peer killed
with SIGKILL in the middle of a stream of collectives or during setup, or frozen with
SIGSTOP; what the survivors raise, how soon, and what they leave behind (threads, fds,
shared memory)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from proc_helpers import Child as _Child
from proc_helpers import shm_leftovers
from proc_helpers import children  # noqa: F401 - the fixture

WORKER = str(Path(__file__).with_name("_proc_worker.py"))
WORLD = 3


def Child(rank: int, *args: str, cwd: Path, stdin: bool = False) -> _Child:  # noqa: N802 - makes one
    return _Child(rank, [sys.executable, WORKER, "--rank", str(rank), "--world", str(WORLD), *args], cwd=cwd,
                  stdin=stdin)


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
    assert shm_leftovers(c.pid for c in children) == []


# Bounds below are hang detectors, not speed targets. A killed peer's death must be
# noticed by the survivors themselves (socket EOF, or its pid gone on shared memory),
# which takes milliseconds; the bound only has to be clearly below the communicator's
# timeout so that an error caused by that timeout cannot pass for detection.
KILL_TIMEOUT_S = 60.0
KILL_DETECTION_BOUND_S = 15.0
# A frozen peer (SIGSTOP) keeps its sockets and pid: only the timeout can catch it.
FREEZE_TIMEOUT_S = 5.0
# Margin past the timeout for an error caused by it to reach every survivor and be printed.
TIMEOUT_MARGIN_S = 15.0


def _start_ranks(children, transport, tmp_path, *extra, timeout=KILL_TIMEOUT_S, ready=True, victim_extra=(),
                 rank0_extra=()):
    """Starts WORLD ranks of the loop worker on a directory store; rank 2 also gets
    `victim_extra`, rank 0 `rank0_extra` (and a stdin pipe). With `ready`, waits until
    every rank has run its first iterations."""
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    for rank in range(WORLD):
        own = {0: rank0_extra, 2: victim_extra}.get(rank, ())
        children.append(Child(rank, "--mode", "loop", "--store", "dir", "--addr", str(store_dir),
                              "--transport", transport, "--timeout", str(timeout), "--ready-after", "20", *extra,
                              *own, cwd=tmp_path, stdin=rank == 0))
    if ready:
        for child in children:
            child.read_line_starting("READY", timeout=60)
    return children[2]


def _report(child, timeout: float) -> dict:
    return json.loads(child.read_line_starting("{", timeout=timeout))


def _check_peer_error(report, t_event, *, phase="loop", bound=KILL_DETECTION_BOUND_S, what=""):
    """The error names the dead rank 2 and arrived within `bound` seconds of its death
    (by default well before the communicator's timeout could have caused it). Returns
    the seconds from the kill to the error."""
    assert report["is_peer_error"], report
    assert report["type"] == "PeerError", report
    assert re.search(r"\brank 2\b", report["message"]), report
    assert report["phase"] == phase, report
    if phase == "loop":
        assert report["iterations"] >= 20, report
    delay = report["t_error"] - t_event
    assert 0 <= delay < bound, (delay, report)
    if what:
        print(f"\n[measured] {what}: kill -9 -> {report['type']} after {delay:.3f} s")
    return delay


def _check_closed(child):
    """After the error and close(): the rank exits 0 with its thread count back to what it
    was before the communicator, no socket left open, and every fd back once freed."""
    out = child.finish(timeout=10)  # a hang detector: close() has nothing left to wait for
    assert child.proc.returncode == 0, f"rank {child.rank} exited with {child.proc.returncode}:\n{out}"
    closed = [line for line in out.splitlines() if line.startswith("CLOSED ")]
    assert len(closed) == 1, out
    res = json.loads(closed[0][len("CLOSED "):])
    before, after = res["threads"]
    assert after == before, f"rank {child.rank}: {after} threads after close(), {before} before the communicator"
    assert res["sockets_after_close"] == 0, res
    fds_before, fds_after = res["fds"]
    assert fds_after == fds_before, f"rank {child.rank}: fds {fds_before} before, {fds_after} after: {res}"


def _check_no_shm(children):
    assert shm_leftovers(c.pid for c in children) == []


@pytest.mark.parametrize("ops", ["allreduce", "mixed"])
def test_killed_peer_fails_survivors(transport, ops, tmp_path, children):
    # Survivors leave with os._exit right after reporting: this test is about the error
    # itself (see the next test for what happens when they close).
    victim = _start_ranks(children, transport, tmp_path, "--ops", ops, "--after-error", "exit")
    t_kill = victim.kill_now()
    for child in children[:2]:
        _check_peer_error(_report(child, timeout=30), t_kill, what=f"{transport} {ops} rank {child.rank}")
        child.finish(timeout=30)
        assert child.proc.returncode == 0, f"rank {child.rank} failed:\n{child.output()}"
    _check_no_shm(children)


@pytest.mark.parametrize("mode", ["blocking", "async", "mixed"])
def test_survivors_close_cleanly_after_peer_death(transport, mode, tmp_path, children):
    extra = {"blocking": [], "async": ["--async"], "mixed": ["--ops", "mixed"]}[mode]
    victim = _start_ranks(children, transport, tmp_path, "--after-error", "close", *extra)
    t_kill = victim.kill_now()
    for child in children[:2]:
        _check_peer_error(_report(child, timeout=30), t_kill, what=f"{transport} {mode} rank {child.rank}")
    for child in children[:2]:
        _check_closed(child)
    _check_no_shm(children)


def test_frozen_peer_times_out(transport, tmp_path, children):
    # SIGSTOP leaves rank 2's sockets open and its pid alive: nothing but the timeout can
    # tell the survivors, who must then name what they waited for and from whom.
    victim = _start_ranks(children, transport, tmp_path, "--ops", "mixed", "--after-error", "close",
                          timeout=FREEZE_TIMEOUT_S)
    t_stop = time.monotonic()
    victim.proc.send_signal(signal.SIGSTOP)
    try:
        messages = []
        for child in children[:2]:
            report = _report(child, timeout=FREEZE_TIMEOUT_S + TIMEOUT_MARGIN_S + 15)
            assert report["type"] == "TimeoutError" and report["is_timeout"], report
            msg = report["message"]
            assert "timed out after 5 s" in msg, msg
            # What it waited for and from whom: rank 2, or a survivor that waited for it.
            assert re.search(r"still waiting to (receive \d+ bytes from|send \d+ bytes to) rank [0-2]\b", msg), msg
            messages.append(msg)
            delay = report["t_error"] - t_stop
            # The operation that was running when rank 2 stopped had started a little
            # earlier, so its deadline can come slightly before t_stop + timeout.
            assert delay < FREEZE_TIMEOUT_S + TIMEOUT_MARGIN_S, (delay, report)
            print(f"\n[measured] {transport} frozen rank 2, rank {child.rank}: SIGSTOP -> TimeoutError after "
                  f"{delay:.3f} s (timeout {FREEZE_TIMEOUT_S} s)")
        # The first to give up may only name a survivor it waited for (the frozen rank
        # held that one up); a survivor that waited for rank 2 itself names it, in its
        # own report or in the view it adds to the other's.
        assert any(re.search(r"\bto (receive \d+ bytes from|send \d+ bytes to) rank 2\b", m) for m in messages), \
            messages
        for child in children[:2]:
            _check_closed(child)
    finally:
        victim.kill_now()  # SIGKILL ends a stopped process too
    _check_no_shm(children)


def test_abort_with_operations_running_tells_peers_why(transport, tmp_path, children):
    # Regression: abort(reason) on a rank whose operation was running sent the peers
    # only "the communicator was aborted during allreduce(...)": the interrupted
    # operation told them first, without the reason; and over TCP a peer still sending
    # got a reset instead of the abort frame. Rank 2 is frozen so that ranks 0 and 1 are
    # stuck inside an operation when rank 0 aborts from another thread.
    victim = _start_ranks(children, transport, tmp_path, "--ops", "mixed", "--after-error", "close",
                          rank0_extra=["--abort-on-stdin"])
    victim.proc.send_signal(signal.SIGSTOP)
    try:
        children[0].send_line("the operator pulled the plug")
        for child in children[:2]:
            report = _report(child, timeout=30)  # far below the 60 s timeout: only abort() ends it
            assert report["type"] == "AbortedError", report
            assert "rank 0 aborted the communicator: the operator pulled the plug" in report["message"], report
        for child in children[:2]:
            _check_closed(child)
    finally:
        victim.kill_now()
    _check_no_shm(children)


def test_rank_killed_during_setup(transport, tmp_path, children):
    # Rank 2 stops right after publishing its rendezvous record: its shared-memory
    # segment exists and the others are connecting to it. Killed there it can never
    # remove the segment's name itself; the survivors must fail with a PeerError naming
    # it and remove the orphaned name. On shared memory its pid is watched, so they fail
    # at once; over TCP it never dialled, so they notice only at the timeout, and then
    # find its process gone.
    timeout = 8.0
    victim = _start_ranks(children, transport, tmp_path, "--after-error", "close", timeout=timeout, ready=False,
                          victim_extra=["--pause-in-setup"])
    victim.read_line_starting("SETUP-PAUSED", timeout=60)
    segments = shm_leftovers([victim.pid])
    assert len(segments) == (1 if transport == "shm" else 0), segments
    t_kill = victim.kill_now()
    for child in children[:2]:
        report = _report(child, timeout=timeout + TIMEOUT_MARGIN_S + 30)
        bound = KILL_DETECTION_BOUND_S if transport == "shm" else timeout + TIMEOUT_MARGIN_S
        _check_peer_error(report, t_kill, phase="setup", bound=bound, what=f"{transport} setup rank {child.rank}")
        if transport == "tcp":
            assert re.search(r"timed out after 8 s setting up TCP connections; still waiting for connections from "
                             r"rank/stream 2/0\b", report["message"]), report
            assert re.search(r"\brank 2 \(pid \d+\) died during setup", report["message"]), report
    for child in children[:2]:
        _check_closed(child)
    _check_no_shm(children)


def test_survivor_that_comes_late_to_a_failed_setup_names_the_dead_rank(tmp_path, children):
    # Regression: rank 1 fails at once (rank 2 was killed in setup) and frees its
    # communicator, removing its segment's name; rank 0, still on its way, then cannot
    # open that segment. It used to blame rank 1 ("cannot open the shared-memory segment
    # ... of rank 1"); it must name rank 2, whose process is gone.
    victim = _start_ranks(children, "shm", tmp_path, "--after-error", "close", ready=False,
                          victim_extra=["--pause-in-setup"], rank0_extra=["--hold-in-setup"])
    late, first = children[0], children[1]
    victim.read_line_starting("SETUP-PAUSED", timeout=60)
    late.read_line_starting("SETUP-PAUSED", timeout=60)
    t_kill = victim.kill_now()
    _check_peer_error(_report(first, timeout=30), t_kill, phase="setup", what="shm setup, first survivor")
    _check_closed(first)  # its communicator is freed: its segment's name is gone
    late.send_line("go")
    report = _report(late, timeout=30)
    assert "of rank 1" in report["message"], report  # what failed here...
    _check_peer_error(report, t_kill, phase="setup", bound=60)  # ...and why
    assert re.search(r"\brank 2 \(pid \d+\) died during setup", report["message"]), report
    _check_closed(late)
    _check_no_shm(children)


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
