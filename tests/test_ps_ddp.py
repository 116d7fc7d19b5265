"""ringcc.DistributedDataParallel with strategy="ps" and strategy="auto".

Ranks are processes (tests/_ps_ddp_worker.py), one launch per scenario; each rank
reports its checks by name and the tests assert on those reports. A dedicated server is
a `ringcc ps-server` process started after every worker has reached the wrap.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

from test_torch_backend import _assert_checks as _check, _free_port  # noqa: E402 - after the skips

WORKER = Path(__file__).with_name("_ps_ddp_worker.py")
LAUNCH_TIMEOUT = 180  # a hang fails the test instead of blocking the suite


def _start(world: int, scenario: str, tmp: Path, extra=()) -> tuple:
    init = f"tcp://127.0.0.1:{_free_port()}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = []
    for rank in range(world):
        cmd = [sys.executable, str(WORKER), "--rank", str(rank), "--world", str(world), "--init-method", init,
               "--scenario", scenario, *extra]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=str(tmp)))
    return init, procs


def _finish(procs, dead=()) -> dict:
    """{rank: {check: outcome}} of the ranks not in ``dead`` (which must have been killed)."""
    results, failures = {}, []
    for rank, proc in enumerate(procs):
        try:
            out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            out, _ = proc.communicate()
        text = out.decode(errors="replace")
        if rank in dead:
            if proc.returncode != -signal.SIGKILL:
                failures.append(f"rank {rank} should have killed itself; exited {proc.returncode}:\n{text[-3000:]}")
            continue
        lines = [line for line in text.splitlines() if line.startswith("RESULTS ")]
        if proc.returncode != 0 or not lines:
            failures.append(f"rank {rank} exited with {proc.returncode}; output:\n{text[-6000:]}")
        else:
            results[rank] = json.loads(lines[-1][len("RESULTS "):])
    if failures:
        pytest.fail("\n".join(failures))
    return results


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def sync_results(request, tmp_path_factory):
    return _finish(_start(request.param, "sync", tmp_path_factory.mktemp("ps_sync"))[1])


@pytest.mark.parametrize("servers", [1, 2])
def test_sync_ps_training_equals_ring_training(sync_results, servers):
    _check(sync_results, f"sync/equals_ring/{servers}_servers")


def test_sync_ps_fp16_within_bound(sync_results):
    _check(sync_results, "sync/fp16")


def test_async_ps_reaches_target_loss_and_survives_a_killed_worker(tmp_path):
    _, procs = _start(3, "async", tmp_path, ["--die-rank", "2"])
    results = _finish(procs, dead={2})
    assert sorted(results) == [0, 1]
    _check(results, "async/reaches_target_despite_a_dead_worker")


def test_auto_uses_the_ring_and_falls_back_when_a_pair_is_unreachable(tmp_path):
    results = _finish(_start(3, "auto", tmp_path)[1])
    _check(results, "auto/ring_forms")
    _check(results, "auto/falls_back_when_a_pair_is_unreachable")


def test_dedicated_ps_server_started_after_the_workers(tmp_path):
    init, procs = _start(2, "dedicated", tmp_path)
    # Start the server only once every worker has reached the wrap (it reads their
    # output, no sleeping): the workers wait for its address in the store.
    early = []
    for proc in procs:
        seen = []
        for raw in proc.stdout:
            seen.append(raw)
            if raw.startswith(b"WRAPPING"):
                break
        early.append(b"".join(seen))
    host, port = init[len("tcp://"):].rsplit(":", 1)
    server = subprocess.run([sys.executable, "-m", "ringcc", "ps-server", "--store", f"{host}:{port}",
                             "--num-workers", "2", "--timeout", "60"],
                            capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    results = _finish(procs)
    assert server.returncode == 0, server.stdout + server.stderr
    assert "every worker sent SHUTDOWN" in server.stdout, server.stdout
    _check(results, "dedicated/trains_with_server_started_last")
