"""ringcc.Trainer and `ringcc train`.

Two ranks run tests/_trainer_worker.py once (launched like tests/test_torch_tools.py);
the tests below assert on its per-check reports: loss goes down and the metrics are
sane; a run interrupted (a crash mid-step, or max_steps) and resumed ends bit-identical
to an uninterrupted one, with gradient accumulation, a scheduler, dropout, bf16 autocast
and fp16 compression; checkpoint files are complete and pruned. The atomic write is
tested in this process by watching the rename happen. The last tests run the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

from test_torch_backend import _assert_checks, _launch  # noqa: E402 - after the skips

from ringcc import train_cli  # noqa: E402
from ringcc import trainer as tr  # noqa: E402

WORKER = Path(__file__).with_name("_trainer_worker.py")
CLI_TIMEOUT = 240  # seconds; a hang fails instead of blocking the suite


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ringcc_trainer_w2")
    return _launch(2, f"file://{tmp / 'store'}", tmp, worker=WORKER)


def test_setup(world2):
    _assert_checks(world2, "setup")


def test_loss_decreases_and_metrics_are_sane(world2):
    _assert_checks(world2, "loss_and_metrics")


@pytest.mark.parametrize("variant", ["sgd_accum_steplr_dropout", "adam_bf16_autocast_fp16_compression",
                                     "fp16_error_feedback"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(world2, variant):
    _assert_checks(world2, f"resume/{variant}")


def test_default_wrapper_is_ringccs(world2):
    assert world2[0]["wrapper"] == "DistributedDataParallel"


def test_resume_with_ringcc_wrapper_and_compression(world2):
    _assert_checks(world2, "resume/ringcc_wrapper_fp16_compression")


def test_resume_with_ringcc_wrapper_error_feedback_residuals(world2):
    _assert_checks(world2, "resume/ringcc_wrapper_error_feedback")


def test_checkpoint_files_are_complete_and_pruned(world2):
    _assert_checks(world2, "checkpoint/files")


# --------------------------------------------------------------- atomic checkpoint
def test_atomic_save_replaces_a_complete_synced_file_in_one_rename(tmp_path, monkeypatch):
    """At the moment of the rename the target still holds the old checkpoint and the
    temporary file — in the same directory — already holds the whole new one, fsynced."""
    path = tmp_path / "step-00000002.pt"
    tr.atomic_save({"step": 1, "w": torch.zeros(3)}, str(path))
    new = {"step": 2, "w": torch.arange(100_000, dtype=torch.float32)}
    synced, seen = set(), []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.add(os.fstat(fd).st_ino)
        real_fsync(fd)

    def replace(src, dst):
        assert Path(src).parent == Path(dst).parent == tmp_path
        assert os.stat(src).st_ino in synced, "renamed before fsync"
        assert torch.load(dst, weights_only=True)["step"] == 1, "the target changed before the rename"
        got = torch.load(src, weights_only=True)
        assert got["step"] == 2 and torch.equal(got["w"], new["w"]), "the temporary file is incomplete"
        seen.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    tr.atomic_save(new, str(path))
    assert len(seen) == 1 and seen[0].startswith(".step-00000002.pt.") and seen[0].endswith(".tmp")
    assert torch.load(path, weights_only=True)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_atomic_save_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "step-00000001.pt"
    tr.atomic_save({"step": 1}, str(path))
    with pytest.raises(Exception):
        tr.atomic_save({"step": 2, "unpicklable": lambda: None}, str(path))
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_list_checkpoints_orders_by_step_and_skips_temporary_files(tmp_path):
    for name in ("step-00000010.pt", "step-00000003.pt", ".step-00000011.pt.x1.tmp", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [Path(p).name for p in tr.list_checkpoints(str(tmp_path))] == ["step-00000003.pt", "step-00000010.pt"]
    assert tr.list_checkpoints(str(tmp_path / "missing")) == []


# ---------------------------------------------------------------------------- CLI
def _cli(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "ringcc", "train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=CLI_TIMEOUT)


def test_cli_trains_checkpoints_refuses_a_used_directory_and_resumes(tmp_path):
    small = ["--samples", "512", "--batch-size", "32", "--no-progress", "--checkpoint-dir", "ckpt"]
    res = _cli(["--nproc", "2", *small, "--epochs", "1", "--json", "one.json"], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ringcc train: mlp (small" in res.stdout and "epoch 0: loss" in res.stdout
    out = json.loads((tmp_path / "one.json").read_text())
    (epoch,) = out["epochs"]
    assert out["world_size"] == 2 and epoch["samples"] == 512 and epoch["samples_per_sec"] > 0
    assert epoch["loss"] > 0 and epoch["comm_compute_ratio"] >= 0
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step-00000008.pt"]

    # A rank that fails (here: the directory is in use and --resume not given) makes the
    # command fail with the reason. One rank is enough to see it, and starts faster.
    res = _cli(["--nproc", "1", *small, "--epochs", "2"], tmp_path)
    assert res.returncode != 0
    assert "already holds checkpoints" in res.stderr and "ringcc train: failed" in res.stderr

    res = _cli(["--nproc", "2", *small, "--epochs", "2", "--resume", "--json", "two.json"], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads((tmp_path / "two.json").read_text())
    assert out["resumed_from"].endswith("step-00000008.pt")
    assert [e["epoch"] for e in out["epochs"]] == [1] and out["epochs"][0]["global_step"] == 16


@pytest.mark.parametrize("argv, needle", [
    (["--resume"], "--resume needs --checkpoint-dir"),
    (["--error-feedback"], "--error-feedback needs --compression"),
    (["--nproc", "0"], "--nproc must be >= 1"),
    (["--checkpoint-every", "5"], "--checkpoint-every needs --checkpoint-dir"),
    (["--backend", "gloo", "--compression", "fp16", "--wrapper", "ringcc"], "ringcc groups only"),
])
def test_cli_refuses_bad_arguments_with_a_reason(argv, needle, capsys):
    p = train_cli.build_parser()
    with pytest.raises(SystemExit) as exc:
        train_cli.check_args(p, p.parse_args(argv))
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err
