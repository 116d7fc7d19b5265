"""Elastic restarts under torchrun.

A ringcc.Trainer job runs under ``torchrun --max-restarts 1`` (tests/_elastic_worker.py).
In its first attempt one rank SIGKILLs itself some steps after a checkpoint; torchrun
stops the other rank (which may be blocked in a ringcc collective at that moment, and
has a SIGTERM handler, as jobs that want to leave cleanly do) and starts the group
again on the same rendezvous store; the second attempt resumes from the newest
checkpoint and must end with exactly the parameters of a job that was never
interrupted. A second job loses a rank while the group is still forming, which leaves
the store with records of only some ranks: the restart must not read them.

The rendezvous itself is also tested in-process: a communicator created after a failed
creation that only some ranks joined.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is needed", allow_module_level=True)

import ringcc  # noqa: E402 - after the skips
from proc_helpers import shm_leftovers  # noqa: E402

WORKER = Path(__file__).with_name("_elastic_worker.py")
JOB_TIMEOUT = 300  # seconds; a hang detector for one torchrun job, far above its run time
# The worker's schedule: 18 steps, a checkpoint every 4; rank 1 dies after step 11, so
# the newest checkpoint is step 8 and steps 9-11 are lost.
STEPS, KILLED_AFTER, RESUMED_AT = 18, 11, 8


class Job:
    """One finished torchrun job: its exit code, output and the workers' event logs."""

    def __init__(self, proc: subprocess.CompletedProcess, events_dir: Path):
        self.returncode = proc.returncode
        self.output = proc.stdout
        self.dir = events_dir
        self.events = {}  # (attempt, rank) -> [event dicts]
        for path in sorted(events_dir.glob("attempt*.rank*.jsonl")):
            attempt, rank = path.stem.replace("attempt", "").split(".rank")
            self.events[int(attempt), int(rank)] = [json.loads(line) for line in path.read_text().splitlines()]

    def of(self, attempt: int, rank: int, kind: str) -> list:
        return [e for e in self.events.get((attempt, rank), []) if e["event"] == kind]

    def steps(self, attempt: int, rank: int) -> list:
        return [e["step"] for e in self.of(attempt, rank, "step")]

    def pids(self) -> list:
        return [e["pid"] for evs in self.events.values() for e in evs if e["event"] == "start"]

    def final_params(self) -> dict:
        return torch.load(self.dir / "final.pt", weights_only=True)

    def describe(self) -> str:
        logs = "\n".join(f"--- attempt {a} rank {r}: {[e['event'] for e in evs]}"
                         for (a, r), evs in sorted(self.events.items()))
        return f"torchrun exited with {self.returncode}; output (tail):\n{self.output[-6000:]}\n{logs}"


def _torchrun(tmp_path: Path, name: str, *worker_args: str) -> Job:
    events = tmp_path / name
    events.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # torchrun's default: the agent keeps one store for every attempt of the job, so a
    # restarted attempt finds the failed attempt's keys (the case under test).
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc-per-node", "2", "--max-restarts", "1", str(WORKER),
           "--checkpoint-dir", str(tmp_path / f"{name}-ckpt"), "--events", str(events), *worker_args]
    try:
        proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun did not finish within {JOB_TIMEOUT} s (hang); output:\n{exc.stdout}")
    return Job(proc, events)


def _assert_clean_teardown(job: Job) -> None:
    # torchrun stops the survivors with SIGTERM and escalates to SIGKILL only when one is
    # still alive 30 s later: that line means a worker hung on its way out.
    assert "forcefully exiting via" not in job.output, job.describe()
    left = shm_leftovers(job.pids())
    assert left == [], left


def _assert_uninterrupted(job: Job) -> None:
    assert job.returncode == 0, job.describe()
    assert sorted(job.events) == [(0, 0), (0, 1)], job.describe()
    for rank in (0, 1):
        assert job.of(0, rank, "resume") == [{"event": "resume", "resumed_from": None, "step": 0}]
        assert job.steps(0, rank) == list(range(1, STEPS + 1)), job.describe()
        assert [e["step"] for e in job.of(0, rank, "done")] == [STEPS], job.describe()
    _assert_clean_teardown(job)


@pytest.mark.parametrize("variant", [
    "ringcc_ddp",  # the Trainer's default wrapper, ringcc.DistributedDataParallel
    # Compressed gradients with error feedback: the residuals travel in the checkpoint.
    pytest.param("fp16_error_feedback", marks=pytest.mark.slow),
])
def test_killed_worker_restarts_from_its_checkpoint_and_matches_an_uninterrupted_run(tmp_path, variant):
    killed = _torchrun(tmp_path, "killed", "--variant", variant, "--kill-rank", "1",
                       "--kill-after-step", str(KILLED_AFTER))
    assert killed.returncode == 0, killed.describe()
    # Exactly one restart, and the workers were told so.
    assert sorted(killed.events) == [(0, 0), (0, 1), (1, 0), (1, 1)], killed.describe()
    for (attempt, rank), _ in killed.events.items():
        (start,) = killed.of(attempt, rank, "start")
        assert start["restart_count"] == attempt and start["world_size"] == 2, start
    # Attempt 0: rank 1 ran steps 1-11 and killed itself as step 12 began; the
    # checkpoints of steps 4 and 8 were written, so steps 9-11 were lost.
    assert killed.steps(0, 1) == list(range(1, KILLED_AFTER + 1)), killed.describe()
    assert killed.of(0, 1, "kill") == [{"event": "kill", "after_step": KILLED_AFTER}]
    assert killed.steps(0, 0)[:KILLED_AFTER] == list(range(1, KILLED_AFTER + 1)), killed.describe()
    assert not killed.of(0, 0, "done") and not killed.of(0, 1, "done"), killed.describe()
    # Attempt 1 resumed from the step-8 checkpoint, recomputed 9-11 and finished.
    for rank in (0, 1):
        assert killed.of(1, rank, "resume") == [{"event": "resume", "resumed_from": f"step-{RESUMED_AT:08d}.pt",
                                                 "step": RESUMED_AT}], killed.describe()
        assert killed.steps(1, rank) == list(range(RESUMED_AT + 1, STEPS + 1)), killed.describe()
        (done,) = killed.of(1, rank, "done")
        assert done == {"event": "done", "step": STEPS, "wrapper": "DistributedDataParallel"}, done
    assert any("resumed from" in e["line"] and f"step-{RESUMED_AT:08d}.pt" in e["line"]
               for e in killed.of(1, 0, "log")), killed.describe()
    _assert_clean_teardown(killed)

    reference = _torchrun(tmp_path, "uninterrupted", "--variant", variant)
    _assert_uninterrupted(reference)
    got, want = killed.final_params(), reference.final_params()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), f"{key} differs after the restart: {got[key]} != {want[key]}"


def test_rank_lost_while_the_group_forms_does_not_poison_the_restart(tmp_path):
    """Rank 1 dies once rank 0 has joined the rendezvous, before it joins itself: the
    shared store keeps rank 0's records of that attempt. The second attempt must form
    its group from fresh records only, and rank 0, waiting for rank 1 when torchrun
    stopped it, must leave through its SIGTERM handler at once."""
    job = _torchrun(tmp_path, "lost_at_start", "--die-at-startup-rank", "1")
    assert job.returncode == 0, job.describe()
    assert sorted(job.events) == [(0, 0), (0, 1), (1, 0), (1, 1)], job.describe()
    assert job.of(0, 1, "kill") and not job.steps(0, 0) and not job.steps(0, 1), job.describe()
    assert job.of(0, 0, "sigterm"), job.describe()  # it was not stuck in the rendezvous
    for rank in (0, 1):
        assert job.steps(1, rank) == list(range(1, STEPS + 1)), job.describe()
        assert [e["step"] for e in job.of(1, rank, "done")] == [STEPS], job.describe()
    _assert_clean_teardown(job)


# ------------------------------------------------------------------ in-process rendezvous
def _create(store_for, rank: int, results: dict, timeout: float) -> None:
    try:
        comm = ringcc.Communicator(store_for(rank), rank, 2, name="pg", timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - inspected by the test
        results[rank] = exc
        return
    try:
        results[rank] = comm.allreduce(np.full(4, rank + 1.0)).tolist()
    except Exception as exc:  # noqa: BLE001
        results[rank] = exc
    finally:
        comm.close()


def _create_all(store_for, ranks, timeout: float = 30.0) -> dict:
    results: dict = {}
    threads = [threading.Thread(target=_create, args=(store_for, r, results, timeout), daemon=True) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)  # hang detector
    assert not any(t.is_alive() for t in threads), f"communicator creation hung: {results}"
    return results


@pytest.mark.parametrize("store_kind", ["hash", "tcp"])
def test_a_creation_only_some_ranks_joined_leaves_nothing_the_next_one_reads(store_kind):
    """Like a torchrun attempt that lost a rank while forming its group: rank 0 joins
    alone and gives up; then both ranks create the communicator on the same store and
    name, twice (as after an abort), and each time get a working group."""
    timeout = datetime.timedelta(seconds=30)
    if store_kind == "hash":
        shared = dist.HashStore()
        shared.set_timeout(timeout)

        def store_for(rank):
            return shared
    else:
        server = dist.TCPStore("127.0.0.1", 0, 1, True, timeout)

        def store_for(rank):  # one client per rank, as in separate processes
            return dist.TCPStore("127.0.0.1", server.port, 1, False, timeout)

    alone = _create_all(store_for, [0], timeout=1.0)
    assert isinstance(alone[0], Exception), alone
    for _ in range(2):
        results = _create_all(store_for, [0, 1])
        assert results == {0: [3.0] * 4, 1: [3.0] * 4}, results
    # The lone rank gave up after the communicator's timeout, naming who never came.
    assert isinstance(alone[0], TimeoutError) and "rank(s) [1] did not join" in str(alone[0]), alone
