"""Network faults on emulated hosts (bench/emulate_hosts.py --scenario ..., one rank per
network namespace, bench/fault_worker.py as the workload).

- A host's link cut in the middle of a stream of allreduces: every rank, the cut one
  included, raises a ringcc error naming the operation and the ranks that the first
  rank to time out was waiting for, within the configured timeout of the cut, and exits (the switch dropping the
  host's frames: default suite, ~30 s; the switch port going down: slow).
- Async parameter server, a worker's host cut: the other workers finish their training
  with a falling loss while the cut worker is still unresponsive, the server keeps
  serving them; the cut worker gets an error naming the server (slow).
- A slow host (its link at 1/50 of the others' rate, its rank computing 4 s before every
  other step, under a 10 s timeout): no error, every result exact (slow).

The harness synchronises on events the ranks print (a fault is applied when the victim
reports a step) and tears down its namespaces and processes whatever happens; each test
checks that. Without root, iproute2 or network namespaces the harness exits 77 and the
tests skip with its reason."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

HARNESS = Path(__file__).resolve().parents[1] / "bench" / "emulate_hosts.py"
SKIP = 77
OP_TIMEOUT = 10.0  # the ringcc timeout under test, seconds
# The machine this runs on may have 2 cores shared by every emulated host (and more):
# a rank may notice its timeout, or print, a few seconds late.
SLACK = 5.0


def _namespaces() -> set:
    try:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        return set()
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _is_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"fault_worker.py" in f.read()
    except OSError:
        return False


def _run(tmp_path: Path, *args: str, timeout: float = 180) -> dict:
    """Runs the harness; skips where it cannot run; asserts that it cleaned up (before
    anything else, so a failed run is also checked) and that the job ran to its end."""
    out = tmp_path / "report.json"
    proc = subprocess.Popen([sys.executable, str(HARNESS), *args, "--timeout", str(timeout), "--out-json", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        stdout, stderr = proc.communicate(timeout=timeout + 120)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the harness still kills its ranks and removes its namespaces
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"the harness overran its own --timeout {timeout}:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    if proc.returncode == SKIP:
        pytest.skip(stderr.strip())
    print(stdout)  # the harness's summary: one line per rank
    # The names the harness gives its namespaces (other jobs may own other ones).
    tag = f"rcc{proc.pid % 100000}"
    hosts = int(args[args.index("--hosts") + 1])
    ours = {f"{tag}sw", *(f"{tag}h{i}" for i in range(hosts))}
    assert not ours & _namespaces(), "the harness left network namespaces behind"
    assert out.exists(), f"no report (exit {proc.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}"
    report = json.loads(out.read_text())
    assert set(report["namespaces"]) == ours
    assert report["namespaces_left"] == [] and report["processes_left"] == [], report
    assert not [r["pid"] for r in report["ranks"] if _is_worker(r["pid"])], "worker processes left running"
    assert proc.returncode == 0 and report["all_exited"], \
        f"{stdout[-4000:]}\n{stderr[-2000:]}\n" + "\n".join(r["log_tail"][-1500:] for r in report["ranks"])
    assert not any(r["killed"] for r in report["ranks"]), "the harness had to kill a rank"
    return report


def _events(rank: dict, ev: str) -> list:
    return [e for e in rank["records"] if e["ev"] == ev]


def _over_tcp(rank: dict) -> None:
    """The ranks reach each other over the emulated links (TCP), not shared memory."""
    (ready,) = _events(rank, "ready")
    assert ready["transport"] == ["self" if p == rank["rank"] else "tcp" for p in range(len(ready["transport"]))]


def _error(rank: dict) -> dict:
    errors = _events(rank, "error")
    assert len(errors) == 1, f"rank {rank['rank']}: expected one error, got {errors}\n{rank['log_tail'][-2000:]}"
    return errors[0]


# "drop": the switch silently stops forwarding the host's frames (links stay up);
# "down": the switch port goes down, so the cut host also loses carrier.
@pytest.mark.parametrize("how", ["drop", pytest.param("down", marks=pytest.mark.slow)])
def test_cut_link_fails_every_rank_with_a_clear_error_within_the_timeout(tmp_path, how):
    cut_host, at_step = 2, 20
    report = _run(tmp_path, "--scenario", "allreduce", "--hosts", "4", "--rate-gbit", "1", "--cut", str(cut_host),
                  "--cut-how", how, "--cut-at-step", str(at_step), "--op-timeout", str(OP_TIMEOUT))
    cut = report["fault"]
    assert cut and cut["host"] == cut_host and cut["how"] == how
    assert len(report["ranks"]) == 4
    for rank in report["ranks"]:
        who = f"rank {rank['rank']}"
        _over_tcp(rank)
        steps = _events(rank, "step")
        assert len(steps) >= at_step - 1 and not _events(rank, "done"), f"{who}: the cut was not mid-run"
        err = _error(rank)
        assert rank["exit"] == 3 and err["ringcc"], f"{who}: {err['trace']}"
        # A cut connection sends no reset: the ranks learn of it from their timeout (one
        # of them times out and its abort reaches the ranks it can still talk to).
        assert err["type"] in ("TimeoutError", "PeerError"), err
        msg = err["message"]
        assert re.search(r"\ballreduce\(seq=\d+", msg), f"{who}: the error does not name the operation: {msg}"
        assert re.search(r"(from|to) rank \d", msg), f"{who}: the error does not name a rank: {msg}"
        took = err["t"] - cut["t_start"]
        assert took <= OP_TIMEOUT + SLACK, f"{who}: the error came {took:.1f} s after the cut"
        # The failing call returns and the communicator goes away at once; what follows is
        # the interpreter's (torch's) teardown, slow on a loaded machine but bounded.
        (ended,) = _events(rank, "exit")
        assert ended["t"] - err["t"] < 5.0, f"{who}: {ended['t'] - err['t']:.1f} s from the error to main's return"
        assert rank["t_exit"] - err["t"] < 30.0, f"{who}: exited {rank['t_exit'] - err['t']:.1f} s after its error"
    # The survivors carry the text of whichever rank timed out first, which names only
    # the ranks *it* waited for (often healthy neighbours: rank 0 "waiting to receive
    # from rank 3" while rank 3 waits for rank 2); each appends its own view, so the
    # cut host's neighbours name it. The cut rank reports its own timeout.
    survivors = [_error(r)["message"] for r in report["ranks"] if r["rank"] != cut_host]
    assert any(re.search(rf"(from|to) rank {cut_host}\b", m) for m in survivors), survivors
    victim = _error(report["ranks"][cut_host])
    assert victim["type"] == "TimeoutError" and victim["message"].startswith(f"rank {cut_host}: allreduce"), victim
    # The harness's link statistics are read from the hosts' own counters: every shaper
    # carried the run's traffic, and the cut left data unacknowledged, so some host's
    # TCP retransmitted it.
    stats = report["link_stats"]
    assert [h["host"] for h in stats] == [0, 1, 2, 3], stats
    for h in stats:
        assert h["egress"]["packets"] > at_step and h["ingress"]["packets"] > at_step, h
        assert h["tcp"]["TcpOutSegs"] >= h["egress"]["packets"] // 2, h
    assert sum(h["tcp"]["TcpRetransSegs"] for h in stats) > 0, stats


@pytest.mark.slow
def test_async_parameter_server_workers_carry_on_when_a_worker_host_is_cut(tmp_path):
    cut_host, at_step, steps = 3, 20, 300
    report = _run(tmp_path, "--scenario", "ps-async", "--hosts", "4", "--rate-gbit", "1", "--cut", str(cut_host),
                  "--cut-how", "down", "--cut-at-step", str(at_step), "--op-timeout", str(OP_TIMEOUT),
                  "--steps", str(steps))
    cut = report["fault"]
    assert cut and cut["host"] == cut_host and cut["how"] == "down"
    victim = report["ranks"][cut_host]
    for rank in report["ranks"]:
        if rank is victim:
            continue
        who = f"rank {rank['rank']}"
        assert rank["exit"] == 0 and not _events(rank, "error"), f"{who}:\n{rank['log_tail'][-3000:]}"
        (done,) = _events(rank, "done")
        losses = [e["loss"] for e in _events(rank, "step")]
        assert len(losses) == steps and done["steps"] == steps
        after = [e for e in _events(rank, "step") if e["t"] > cut["t_done"]]
        # Still training, through the server, after the cut: the server keeps serving.
        assert len(after) >= 50, f"{who}: only {len(after)} steps after the cut"
        assert done["final_loss"] < 1e-3 and done["final_loss"] < losses[0] / 100, (losses[0], done)
    # Rank 0 holds the server: it stops once the live workers said goodbye, without the cut one's.
    assert "not every worker said goodbye" in report["ranks"][0]["log_tail"]
    # The cut worker: its request to the server times out, with an error naming the server.
    err = _error(victim)
    assert victim["exit"] == 3 and err["type"] == "TimeoutError", err
    assert re.search(r"parameter server 0 at 10\.77\.0\.1:\d+: timed out after 10 s", err["message"]), err
    assert err["t"] - cut["t_start"] <= OP_TIMEOUT + SLACK
    assert len(_events(victim, "step")) >= at_step
    # The survivors did not wait for the cut worker to time out before they went on.
    first_after = min(e["t"] for r in report["ranks"] if r is not victim for e in _events(r, "step")
                      if e["t"] > cut["t_done"])
    assert first_after < err["t"], "no survivor stepped while the cut worker was still waiting"


@pytest.mark.slow
def test_slow_host_under_the_timeout_causes_no_false_failure(tmp_path):
    slow_host, sleep_s, steps, rate_mbit, elements = 2, 4.0, 4, 20, 1 << 18
    report = _run(tmp_path, "--scenario", "allreduce", "--hosts", "4", "--rate-gbit", "1", "--slow", str(slow_host),
                  "--slow-rate-mbit", str(rate_mbit), "--sleep-s", str(sleep_s), "--sleep-every", "2",
                  "--steps", str(steps), "--elements", str(elements), "--op-timeout", str(OP_TIMEOUT))
    # Ring allreduce: each link carries 2(n-1)/n * S per direction; at 20 Mbit/s, 1 MiB
    # takes ~0.63 s, against ~13 ms on the 1 Gbit/s links.
    link_s = 2 * 3 / 4 * elements * 4 * 8 / (rate_mbit * 1e6)
    for rank in report["ranks"]:
        who = f"rank {rank['rank']}"
        assert rank["exit"] == 0 and not _events(rank, "error"), f"{who}:\n{rank['log_tail'][-3000:]}"
        _over_tcp(rank)
        dts = [e["dt"] for e in _events(rank, "step")]  # each result was checked exactly by the worker
        assert len(dts) == steps and _events(rank, "done"), who
        for i, dt in enumerate(dts):
            assert dt < OP_TIMEOUT, f"{who}: step {i} took {dt:.1f} s"
            if i % 2 == 1:  # no sleep: only the slow link slows the step, for everyone
                assert dt > 0.3 * link_s, f"{who}: step {i} took {dt:.3f} s; was the link slowed?"
            elif rank["rank"] != slow_host:  # the others waited for the slow rank's compute
                assert dt >= sleep_s - 0.5, f"{who}: step {i} took {dt:.2f} s; was the slow rank slow?"
