"""The "ringcc" torch.distributed backend, against gloo on the same inputs.

Ranks are processes (tests/_torch_backend_worker.py). One launch per world size runs
every check with a ringcc default group and a gloo group side by side and reports each
check's outcome; the tests below assert on those reports, by topic."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

WORKER = Path(__file__).with_name("_torch_backend_worker.py")
LAUNCH_TIMEOUT = 240  # seconds for a whole launch; a hang fails instead of blocking the suite


def _worker_module():
    spec = importlib.util.spec_from_file_location("_torch_backend_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, init_method: str, tmp: Path, timeout_init_method: str = "", worker: Path = WORKER,
            extra: Sequence[str] = ()) -> dict:
    """Run `world` ranks of `worker`; return {rank: {check: "ok" | failure text}}."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = []
    for rank in range(world):
        cmd = [sys.executable, str(worker), "--rank", str(rank), "--world", str(world),
               "--init-method", init_method]
        if timeout_init_method:
            cmd += ["--timeout-init-method", timeout_init_method]
        cmd += list(extra)
        log = open(tmp / f"rank{rank}.log", "w+b")
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(tmp)), log))
    results, failures = {}, []
    for rank, (proc, log) in enumerate(procs):
        try:
            proc.wait(timeout=LAUNCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            for p, _ in procs:
                p.kill()
            proc.wait()
        log.seek(0)
        output = log.read().decode(errors="replace")
        log.close()
        lines = [line for line in output.splitlines() if line.startswith("RESULTS ")]
        if proc.returncode != 0 or not lines:
            failures.append(f"rank {rank} exited with {proc.returncode}; output:\n{output[-6000:]}")
        else:
            results[rank] = json.loads(lines[-1][len("RESULTS "):])
    if failures:
        pytest.fail("\n".join(failures))
    return results


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ringcc_torch_w2")
    # FileStore rendezvous, and a second initialisation with timeout=2 s at the end.
    return _launch(2, f"file://{tmp / 'store'}", tmp, timeout_init_method=f"file://{tmp / 'store_timeout'}")


@pytest.fixture(scope="module")
def world3(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ringcc_torch_w3")
    return _launch(3, f"tcp://127.0.0.1:{_free_port()}", tmp)


@pytest.fixture(params=[2, 3], ids=["world2", "world3"])
def results(request):
    return request.getfixturevalue(f"world{request.param}")


def _assert_checks(results: dict, prefix: str) -> None:
    ran = 0
    bad = []
    for rank, checks in sorted(results.items()):
        for name, outcome in checks.items():
            if name == prefix or name.startswith(prefix + "/"):
                ran += 1
                if outcome != "ok":
                    bad.append(f"--- rank {rank} {name}:\n{outcome}")
    assert ran, f"no check named {prefix!r} ran"
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------- single process
def test_register_is_idempotent_and_names_the_backend():
    tb = _worker_module().load_backend()
    tb.register()
    tb.register()
    assert dist.Backend.backend_list.count("ringcc") == 1
    assert dist.Backend("ringcc") == "ringcc"
    assert dist.Backend.backend_capability["ringcc"] == ["cpu"]
    # CPU tensors of groups that name no backend still go to gloo.
    assert dist.Backend.default_device_backend_map["cpu"] == "gloo"


def test_single_rank_group_in_process(tmp_path):
    tb = _worker_module().load_backend()
    tb.register()
    store = dist.FileStore(str(tmp_path / "store"), 1)
    pg = tb.RingccProcessGroup(store, 0, 1, datetime.timedelta(seconds=30))
    try:
        x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
        work = pg.allreduce([x])
        assert isinstance(work, dist.Work)
        assert work.wait() is True
        assert work.get_future().wait()[0] is x
        assert torch.equal(x, torch.arange(6, dtype=torch.float32).reshape(2, 3))
        assert pg.name() == "ringcc" and pg.size() == 1 and pg.rank() == 0
        with pytest.raises(RuntimeError, match="any source"):
            pg.recv_anysource([x], 0)
    finally:
        pg.shutdown()


# ------------------------------------------------------------------ multi-process
def test_setup(results):
    _assert_checks(results, "setup")


@pytest.mark.parametrize("topic", ["allreduce", "broadcast", "allgather", "reduce_scatter", "reduce", "gather",
                                   "scatter", "alltoall_single", "alltoall", "barrier", "send_recv", "coalesced"])
def test_collective_matches_gloo(results, topic):
    _assert_checks(results, topic)


def test_allreduce_into_is_out_of_place_and_matches_gloo(results):
    _assert_checks(results, "allreduce_into")


def test_every_dtype_and_op_gloo_supports_was_compared(results):
    names = set(results[0])
    for dtype in ["float32", "float64", "float16", "bfloat16"]:
        for op in ["SUM", "PRODUCT", "MIN", "MAX", "AVG"]:
            assert f"allreduce/{dtype}/RedOpType.{op}" in names
    for dtype in ["int32", "int64"]:
        for op in ["SUM", "PRODUCT", "MIN", "MAX", "BAND", "BOR", "BXOR"]:
            assert f"allreduce/{dtype}/RedOpType.{op}" in names


def test_async_op_returns_at_once_and_completes_the_future(results):
    _assert_checks(results, "async")


def test_new_group_subgroup(results):
    _assert_checks(results, "subgroup")


def test_ddp_trains_like_gloo(results):
    _assert_checks(results, "ddp")


def test_bad_arguments_raise_at_the_call(results):
    _assert_checks(results, "errors")


def test_init_process_group_timeout_surfaces_as_error(world2):
    _assert_checks(world2, "timeout")
