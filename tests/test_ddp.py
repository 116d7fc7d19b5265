"""ringcc.DistributedDataParallel, ringcc.hooks and the DDP timeline.

Ranks are processes (tests/_ddp_worker.py) launched like tests/test_torch_backend.py
does: one launch per world size (2 and 3) runs every check on a "ringcc" default group
(gloo group alongside for the fallbacks) and reports each check's outcome; the tests
below assert on those reports, by topic. Training results are compared with a plain
single-process model trained on the concatenated batch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

from test_torch_backend import _assert_checks as _check, _free_port, _launch  # noqa: E402 - after the skips

WORKER = Path(__file__).with_name("_ddp_worker.py")


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ringcc_ddp_w2")
    return _launch(2, f"file://{tmp / 'store'}", tmp, worker=WORKER)


@pytest.fixture(scope="module")
def world3(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ringcc_ddp_w3")
    return _launch(3, f"tcp://127.0.0.1:{_free_port()}", tmp, worker=WORKER)


@pytest.fixture(scope="module")
def world4_training(tmp_path_factory):
    """4 ranks, only the training checks (the others gain nothing from a fourth rank)."""
    tmp = tmp_path_factory.mktemp("ringcc_ddp_w4")
    return _launch(4, f"tcp://127.0.0.1:{_free_port()}", tmp, worker=WORKER, extra=["--only", "train/"])


@pytest.fixture(params=[2, 3], ids=["world2", "world3"])
def results(request):
    return request.getfixturevalue(f"world{request.param}")


# -------------------------------------------------------------------- training
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_equals_single_process_on_the_concatenated_batch(results, optimizer):
    _check(results, f"train/{optimizer}")


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_on_4_ranks_equals_single_process(world4_training, optimizer):
    _check(world4_training, f"train/{optimizer}")


def test_plain_strategy_works_on_a_gloo_group(results):
    _check(results, "train/gloo_group")


def test_buckets_reverse_order_first_bucket_small_dtypes_apart(results):
    _check(results, "buckets/layout")


def test_buckets_rebuilt_once_in_rank0_arrival_order(results):
    _check(results, "buckets/rebuild_once_in_arrival_order")


def test_no_sync_accumulates_without_communication(results):
    _check(results, "no_sync/accumulates_like_large_batch")


def test_find_unused_parameters(results):
    _check(results, "unused/find_unused_parameters")


def test_unused_parameters_without_the_flag_raise_a_clear_error(results):
    _check(results, "unused/error_names_parameters")


def test_a_backward_that_raised_does_not_break_the_next_steps(results):
    _check(results, "unused/failed_backward_recovers")


def test_autocast_bf16(results):
    _check(results, "autocast/bf16")


# ------------------------------------------------------------------------ wrap
def test_wrap_broadcasts_parameters_and_buffers_from_rank0(results):
    _check(results, "wrap/broadcasts_parameters_and_buffers")


def test_wrap_shape_mismatch_names_rank_and_parameter(results):
    _check(results, "wrap/shape_mismatch_error")


def test_option_errors_and_state_dict_prefix(results):
    _check(results, "wrap/option_errors_and_state_dict")


def test_own_comm_hook_api(results):
    _check(results, "comm_hook/own_hook")


def test_timeline_shows_overlap_and_is_valid_chrome_trace(results):
    _check(results, "timeline/overlap_and_format")


# ----------------------------------------------------------------- compression
@pytest.mark.parametrize("compression", ["fp16", "bf16"])
def test_compressed_training_close_to_fp32(results, compression):
    _check(results, f"compress/{compression}")


def test_error_feedback_changes_results(results):
    _check(results, "compress/error_feedback")


def test_resume_from_comm_state_is_bit_identical(results):
    _check(results, "compress/resume_from_comm_state")


@pytest.mark.parametrize("compression", ["fp16", "bf16"])
def test_hooks_on_torch_ddp_over_ringcc_use_the_native_path(results, compression):
    _check(results, f"hooks/ringcc_native_{compression}")


@pytest.mark.parametrize("compression", ["fp16", "bf16"])
def test_hooks_on_torch_ddp_over_gloo_fall_back(results, compression):
    _check(results, f"hooks/gloo_fallback_{compression}")


# -------------------------------------------------------------- single process
def test_import_ringcc_without_torch_leaves_the_wrapper_lazy():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import ringcc\n"
            "assert 'ringcc.ddp' not in sys.modules\n"
            "try:\n    ringcc.DistributedDataParallel\nexcept ImportError:\n    print('lazy')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "lazy", out.stdout + out.stderr


def test_timeline_file_is_valid_json_after_every_flush(tmp_path):
    from ringcc.timeline import TIDS, Timeline

    tl = Timeline(str(tmp_path / "t"), rank=3)
    path = tmp_path / "t.rank3.json"
    assert json.loads(path.read_text())["traceEvents"]  # metadata only
    tl.complete("pack", 1.0, 2.5, bucket=0)
    tl.flush()
    tl.flush()  # nothing new: unchanged
    tl.complete("allreduce", 2.5, 9.0, bucket=0)
    tl.complete("unpack", 9.0, 9.5, bucket=0)
    tl.flush()
    events = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]
    assert [(e["name"], e["ts"], e["dur"], e["tid"], e["pid"]) for e in events] == [
        ("pack", 1.0, 1.5, TIDS["pack"], 3), ("allreduce", 2.5, 6.5, TIDS["allreduce"], 3),
        ("unpack", 9.0, 0.5, TIDS["unpack"], 3)]
