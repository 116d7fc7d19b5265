"""PyTorch's own distributed tools on the "ringcc" backend, against gloo.

Ranks are processes (tests/_torch_tools_worker.py), launched like
tests/test_torch_backend.py does: one launch per world size runs every check with a
ringcc default group and a gloo group side by side and reports each check's outcome;
the tests below assert on those reports, by topic. The last test runs
examples/ddp_torchrun.py under torchrun (env:// rendezvous).

Not covered: SyncBatchNorm (torch raises for CPU tensors), monitored_barrier (gloo-only
in torch). Point-to-point operations are tested in tests/test_torch_backend.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

from test_torch_backend import _assert_checks, _free_port, _launch  # noqa: E402 - after the skips

WORKER = Path(__file__).with_name("_torch_tools_worker.py")
REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "ddp_torchrun.py"
TORCHRUN_TIMEOUT = 240  # seconds; a hang fails instead of blocking the suite


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ringcc_tools_w2")
    return _launch(2, f"file://{tmp / 'store'}", tmp, worker=WORKER)


@pytest.fixture(scope="module")
def world3(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ringcc_tools_w3")
    return _launch(3, f"tcp://127.0.0.1:{_free_port()}", tmp, worker=WORKER)


@pytest.fixture(params=[2, 3], ids=["world2", "world3"])
def results(request):
    return request.getfixturevalue(f"world{request.param}")


def test_setup(results):
    _assert_checks(results, "setup")


# 1. DDP options ------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["no_sync", "find_unused_parameters", "static_graph",
                                     "gradient_as_bucket_view", "join_uneven_inputs"])
def test_ddp_variant_trains_like_gloo(results, variant):
    _assert_checks(results, f"ddp/{variant}")


# 2. comm hooks -------------------------------------------------------------------
@pytest.mark.parametrize("hook", ["allreduce_hook", "fp16_compress_hook", "bf16_compress_hook", "powerSGD_hook"])
def test_comm_hook_trains_like_gloo(results, hook):
    _assert_checks(results, f"hooks/{hook}")


def test_settler_runs_an_item_while_an_earlier_one_waits_for_it():
    """The threads that settle futures: an item queued by a callback that then blocks
    until that item has run (what PowerSGD's hook does through a collective) must run."""
    from ringcc.torch_backend import _Settler

    settler = _Settler()
    for _ in range(3):  # later rounds reuse the idle threads
        inner_ran, outer_done = threading.Event(), threading.Event()

        def outer(inner_ran=inner_ran, outer_done=outer_done):
            settler.submit(inner_ran.set)
            if inner_ran.wait(60):  # a guard against hanging the suite, not a timing check
                outer_done.set()

        settler.submit(outer)
        assert outer_done.wait(120), "the inner item never ran while the outer one waited for it"


def test_future_callback_may_wait_for_a_later_collective(results):
    """Callbacks chained on a Work's future run off the engine thread, so they may wait
    for further collectives of the same group (PowerSGD does; this used to deadlock)."""
    _assert_checks(results, "hooks/future_callback_waits_for_collective")


# 3. ZeroRedundancyOptimizer ------------------------------------------------------
@pytest.mark.parametrize("variant", ["bucket_view_False", "bucket_view_True"])
def test_zero_redundancy_optimizer_and_consolidate(results, variant):
    _assert_checks(results, f"zero/{variant}")


def test_zero_overlap_with_ddp(results):
    _assert_checks(results, "zero/overlap_with_ddp")


# 4. DistributedSampler -----------------------------------------------------------
def test_distributed_sampler_partitions_the_dataset(results):
    _assert_checks(results, "sampler/disjoint_cover")


def test_distributed_sampler_ddp_training(results):
    _assert_checks(results, "sampler/ddp_training")


# 5. object collectives -----------------------------------------------------------
@pytest.mark.parametrize("fn", ["all_gather_object", "broadcast_object_list", "gather_object",
                                "scatter_object_list"])
def test_object_collective_matches_gloo(results, fn):
    _assert_checks(results, f"objects/{fn}")


# 6. overlap ----------------------------------------------------------------------
def test_ddp_issues_bucket_allreduce_asynchronously_during_backward(results):
    _assert_checks(results, "overlap")


# 7. mismatches -------------------------------------------------------------------
@pytest.mark.parametrize("case", ["allreduce_vs_allgather", "allreduce_sizes", "allreduce_vs_broadcast",
                                  "reinit_after_abort"])
def test_mismatch_raises_readable_error_on_every_rank(results, case):
    _assert_checks(results, f"mismatch/{case}")


# 8. subgroups --------------------------------------------------------------------
@pytest.mark.parametrize("how", ["new_subgroups", "new_subgroups_by_enumeration", "new_group_interleaved"])
def test_subgroups(results, how):
    _assert_checks(results, f"subgroups/{how}")


# 9. torchrun example -------------------------------------------------------------
def test_ddp_torchrun_example(tmp_path):
    """examples/ddp_torchrun.py under torchrun --standalone: env:// rendezvous, DDP,
    DistributedSampler; it must exit 0 and report that the parameters agree."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EXAMPLE)]
    try:
        proc = subprocess.run(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=TORCHRUN_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun did not finish in {TORCHRUN_TIMEOUT} s; output:\n"
                    f"{(exc.stdout or b'').decode(errors='replace')[-6000:]}")
    output = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, output[-6000:]
    assert "parameters agree across all 2 ranks" in output, output[-6000:]
    assert "epoch 0" in output and "loss" in output, output[-6000:]
