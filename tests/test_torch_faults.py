"""Failures under the "ringcc" torch.distributed backend, with ranks as processes
(tests/_torch_faults_worker.py): a rank killed in a stream of dist.all_reduce, a rank
that aborts the group while the others are blocked, and destroy_process_group() with
work in flight. In every case each surviving rank raises (naming the rank at fault),
destroy_process_group() returns and the process exits 0 on its own."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
from proc_helpers import Child, children, shm_leftovers  # noqa: F401,F811 - children is the fixture

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

WORKER = str(Path(__file__).with_name("_torch_faults_worker.py"))
WORLD = 3
# Hang detectors, not speed targets (the group's timeout is 60 s): a killed peer is seen
# by its socket or pid within milliseconds, and destroying a failed group or exiting has
# nothing to wait for.
DETECTION_BOUND_S = 15.0
DESTROY_BOUND_S = 15.0
START_S = 120  # importing torch in 3 processes on a loaded 2-core machine


def _start(children, tmp_path, scenario, *, transport="auto", per_rank=None, stdin_ranks=(), timeout=60):
    env = dict(os.environ, OMP_NUM_THREADS="1", RINGCC_TRANSPORT=transport)
    init = f"file://{tmp_path / 'store'}"
    for rank in range(WORLD):
        cmd = [sys.executable, WORKER, "--rank", str(rank), "--world", str(WORLD), "--init-method", init,
               "--scenario", scenario, "--timeout", str(timeout), *(per_rank(rank) if per_rank else ())]
        children.append(Child(rank, cmd, cwd=tmp_path, env=env, stdin=rank in stdin_ranks))


def _fields(child, word: str, timeout: float = START_S) -> dict:
    return json.loads(child.read_line_starting(word + " ", timeout=timeout)[len(word) + 1:])


def _destroyed_and_exited(child, bound: float = DESTROY_BOUND_S) -> dict:
    """destroy_process_group() returned within `bound` seconds, the process has no thread
    it did not have before init_process_group() (but the backend's idle settler threads,
    which end on their own), and it exits 0 by itself."""
    done = _fields(child, "DESTROYED", timeout=bound + 30)
    assert done["seconds"] < bound, done
    assert set(done["settlers"]) <= {"ringcc-settle"}, done
    before, after = done["threads"]
    assert after - len(done["settlers"]) == before, f"rank {child.rank}: threads before init, after destroy: {done}"
    child.read_line_starting("EXIT", timeout=30)
    out = child.finish(timeout=30)  # interpreter exit: nothing may keep it alive
    assert child.proc.returncode == 0, f"rank {child.rank} exited with {child.proc.returncode}:\n{out}"
    return done


def _no_shm(children) -> None:
    assert shm_leftovers(c.pid for c in children) == []


@pytest.mark.parametrize("mode", ["blocking", "async"])
def test_killed_rank_in_all_reduce_stream(transport, mode, tmp_path, children):
    # Rank 1 leaves without destroy_process_group(): the interpreter's exit must not
    # hang on the failed group (ringcc closes it at exit) any more than destroy does.
    _start(children, tmp_path, "stream", transport=transport,
           per_rank=lambda r: (["--async"] if mode == "async" else []) + (["--no-destroy"] if r == 1 else []))
    for child in children:
        child.read_line_starting("READY", timeout=START_S)
    t_kill = children[2].kill_now()
    for child in children[:2]:
        err = _fields(child, "ERROR", timeout=DETECTION_BOUND_S + 30)
        assert err["type"] == "PeerError" and err["is_ringcc"], err
        assert re.search(r"\brank 2\b", err["message"]), err
        delay = err["t_error"] - t_kill
        assert 0 <= delay < DETECTION_BOUND_S, (delay, err)
        print(f"\n[measured] torch {transport} {mode} rank {child.rank}: kill -9 -> {err['type']} after "
              f"{delay:.3f} s")
    _destroyed_and_exited(children[0])
    children[1].read_line_starting("EXIT", timeout=30)
    out = children[1].finish(timeout=30)  # a hang detector for the interpreter's exit
    assert children[1].proc.returncode == 0, out
    _no_shm(children)


def test_abort_while_others_are_blocked(transport, tmp_path, children):
    # Rank 2 aborts the group (torch's _abort_process_group calls the group's abort());
    # rank 0 waits on an async all_reduce and rank 1 sits in a blocking one, both of
    # which need rank 2.
    _start(children, tmp_path, "abort", transport=transport, stdin_ranks=(2,),
           per_rank=lambda r: ["--blocked", "0,1"] + (["--async"] if r == 0 else []))
    for child in children[:2]:
        child.read_line_starting("BLOCKED", timeout=START_S)
    aborter = children[2]
    aborter.send_line("go")
    assert _fields(aborter, "ABORTED", timeout=DESTROY_BOUND_S + 30)["seconds"] < DESTROY_BOUND_S
    aborter.read_line_starting("EXIT", timeout=30)
    for child in children[:2]:
        err = _fields(child, "ERROR", timeout=DETECTION_BOUND_S + 30)
        assert err["is_ringcc"], err
        assert "rank 2 aborted the communicator: abort() called on the torch process group" in err["message"], err
    for child in children[:2]:
        _destroyed_and_exited(child)
    out = aborter.finish(timeout=30)
    assert aborter.proc.returncode == 0, out
    _no_shm(children)


def test_destroy_with_async_work_in_flight(tmp_path, children):
    _start(children, tmp_path, "inflight")
    for child in children:
        _destroyed_and_exited(child)
        results = [line for line in child.lines if line.startswith("RESULTS ")]
        assert results and json.loads(results[0][len("RESULTS "):]) == {"allreduce_ok": True,
                                                                         "allgather_ok": True}, child.output()
    _no_shm(children)


def test_destroy_with_unmatched_async_work(transport, tmp_path, children):
    # Rank 0's all_reduce can never complete: the others leave the group instead. Its
    # destroy_process_group() must not wait for the timeout, and its work fails naming
    # a rank that left.
    _start(children, tmp_path, "unmatched", transport=transport)
    for child in children:
        _destroyed_and_exited(child)
    errors = [line for line in children[0].lines if line.startswith("ERROR ")]
    assert errors, children[0].output()
    err = json.loads(errors[0][len("ERROR "):])
    assert err["type"] == "PeerError", err
    assert re.search(r"\brank [12]\b", err["message"]), err
    _no_shm(children)


def test_destroy_with_work_waiting_on_a_stuck_rank(tmp_path, children):
    # Rank 2 is alive but never joins the all_reduce (its sockets stay open, its pid
    # exists): destroy_process_group() on the others finishes what is queued, which here
    # ends at the group's timeout with a TimeoutError naming rank 2, never later.
    timeout = 5.0
    _start(children, tmp_path, "absent", timeout=timeout, stdin_ranks=(2,))
    children[2].read_line_starting("PARKED", timeout=START_S)
    messages = []
    for child in children[:2]:
        done = _destroyed_and_exited(child, bound=timeout + DESTROY_BOUND_S)
        errors = [line for line in child.lines if line.startswith("ERROR ")]
        assert errors, child.output()
        err = json.loads(errors[0][len("ERROR "):])
        assert err["type"] == "TimeoutError", err
        assert "timed out after 5 s" in err["message"], err
        assert re.search(r"still waiting to (receive|send) \d+ bytes (from|to) rank [12]\b", err["message"]), err
        messages.append(err["message"])
        print(f"\n[measured] torch: destroy_process_group() with an all_reduce waiting on a stuck rank, rank "
              f"{child.rank}: returned after {done['seconds']:.3f} s (timeout {timeout} s)")
    # The first to give up may name only the survivor it waited for; rank 2 is named by
    # the one that waited for it.
    assert any(re.search(r"bytes (from|to) rank 2\b", m) for m in messages), messages
    children[2].send_line("go")
    _destroyed_and_exited(children[2])
    _no_shm(children)
