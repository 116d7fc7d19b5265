"""`ringcc bench`: argument parsing, the exact-answer checker, and real runs (spawned ranks
and torchrun) whose JSON rows must be complete and correct."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

from ringcc import bench  # noqa: E402

RUN_TIMEOUT = 240


def _run(args, cwd, **env):
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)


# --------------------------------------------------------------------------- arguments
def test_sizes_range_doubles_and_lists_parse():
    assert bench.parse_sizes("4K:64K") == [4096, 8192, 16384, 32768, 65536]
    assert bench.parse_sizes("1M") == [1 << 20]
    assert bench.parse_sizes("4096,1M,2G") == [4096, 1 << 20, 2 << 30]
    assert bench.parse_sizes("3K:10K") == [3072, 6144]  # doubling stops at the upper end
    for bad in ("0", "4Q", "64M:4K", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_sizes(bad)


@pytest.mark.parametrize("argv, needle", [
    (["-c", "allreduce,nosuch"], "unknown collective"),
    (["--op", "avg", "--dtype", "int32"], "floating"),
    (["--op", "bxor"], "integer"),
    (["--backends", "gloo,gloo"], "distinct"),
    (["--iters", "0"], "--iters"),
    (["--compression", "fp8"], "--compression"),
    (["--compression", "fp16", "--backends", "gloo"], "add ringcc"),
    (["--compression", "fp16", "--dtype", "float64"], "float32"),
    (["--compression", "bf16", "--op", "max"], "sum or avg"),
])
def test_bad_arguments_are_refused_with_a_reason(argv, needle, capsys):
    p = bench.build_parser()
    with pytest.raises(SystemExit) as exc:
        bench.check_args(p, p.parse_args(argv))
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


# ------------------------------------------------------------------------ the checker
def _reference(coll, op, world, count, dtype):
    """Every rank's expected output, computed with NumPy from every rank's input as
    bench fills it (independent of Data.expected)."""
    inputs = []
    for r in range(world):
        d = bench.Data(coll, count, world, r, dtype, op, "cpu")
        t = torch.empty(d.in_count, dtype=dtype)
        d.fill_input(t)
        inputs.append(t.to(torch.float64).numpy())
    red = {"sum": np.sum, "prod": np.prod, "min": np.min, "max": np.max, "avg": np.mean}
    c = count // world
    outs = []
    for r in range(world):
        if coll == "allreduce":
            out = red[op](np.stack(inputs), axis=0)
        elif coll == "broadcast":
            out = inputs[0]
        elif coll == "allgather":
            out = np.concatenate(inputs)
        elif coll == "reduce_scatter":
            out = red[op](np.stack([x[r * c:(r + 1) * c] for x in inputs]), axis=0)
        else:  # alltoall
            out = np.concatenate([inputs[b][r * c:(r + 1) * c] for b in range(world)])
        outs.append(torch.from_numpy(np.ascontiguousarray(out)).to(dtype))
    return outs


@pytest.mark.parametrize("coll", list(bench.COLLECTIVES))
@pytest.mark.parametrize("op, dtype", [("sum", torch.float32), ("prod", torch.float16), ("max", torch.int32),
                                       ("avg", torch.bfloat16), ("min", torch.int8)])
@pytest.mark.parametrize("world", [1, 3])
def test_checker_accepts_the_right_answer_and_counts_each_wrong_element(coll, op, dtype, world):
    count = world * 2053  # several checker chunks would be too slow here; ragged is what matters
    outs = _reference(coll, op, world, count, dtype)
    for r, out in enumerate(outs):
        d = bench.Data(coll, count, world, r, dtype, op, "cpu")
        assert out.numel() == d.out_count
        assert d.count_wrong(out) == 0
        bad = out.clone()
        bad[0] += 1
        bad[-1] = bad[-1] * 2 + 7
        assert d.count_wrong(bad) == 2


def test_checker_works_across_chunks(monkeypatch):
    monkeypatch.setattr(bench, "VERIFY_CHUNK", 1000)
    outs = _reference("alltoall", "sum", 3, 3 * 2500, torch.float32)
    d = bench.Data("alltoall", 3 * 2500, 3, 1, torch.float32, "sum", "cpu")
    assert d.count_wrong(outs[1]) == 0
    outs[1][4999] = 1e9
    assert d.count_wrong(outs[1]) == 1


# --------------------------------------------------------------------------- real runs
KEYS = {"backend", "collective", "dtype", "size_bytes", "time_us", "algbw_GBps", "busbw_GBps", "wrong"}


def test_spawned_run_measures_every_collective_both_backends(tmp_path):
    out = tmp_path / "rows.json"
    res = _run(["-m", "ringcc", "bench", "--nproc", "2", "-c", "all", "--sizes", "4K,64K", "--iters", "3",
                "--warmup", "1", "--json", str(out), "--no-progress"], cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = json.loads(out.read_text())
    cells = {(r["collective"], r["placement"], r["size_bytes"], r["backend"]) for r in rows}
    for coll, c in bench.COLLECTIVES.items():
        for placement in ("out-of-place", "in-place") if c.in_place else ("out-of-place",):
            for size in (4096, 65536):
                for backend in ("ringcc", "gloo"):
                    nbytes = size - size % (4 * (2 if coll in ("allgather", "reduce_scatter", "alltoall") else 1))
                    assert (coll, placement, nbytes, backend) in cells
    for r in rows:
        assert KEYS <= set(r), r
        assert r["wrong"] == 0 and r["time_us"] > 0, r
        factor = bench.COLLECTIVES[r["collective"]].busbw_factor(2)
        assert r["algbw_GBps"] == pytest.approx(r["size_bytes"] / r["time_us"] / 1e3)
        assert r["busbw_GBps"] == pytest.approx(r["algbw_GBps"] * factor)
        if r["backend"] == "gloo":
            assert r["ratio"] == pytest.approx(1.0)
    # The table: one per collective, nccl-tests columns, rank 0 only.
    for coll in bench.COLLECTIVES:
        assert res.stdout.count(f"# {coll}: 2 ranks") == 1
    assert "algbw" in res.stdout and "busbw" in res.stdout and "#wrong" in res.stdout


def test_compression_adds_a_ringcc_row_per_wire_format(tmp_path):
    out = tmp_path / "rows.json"
    res = _run(["-m", "ringcc", "bench", "--nproc", "2", "-c", "allreduce,allgather", "--sizes", "4K,1M",
                "--iters", "2", "--warmup", "1", "--op", "avg", "--compression", "none,fp16,bf16",
                "--json", str(out), "--no-progress"], cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = json.loads(out.read_text())
    labels = {(r["collective"], r["backend"], r["compression"]) for r in rows}
    assert labels == {("allreduce", "ringcc", "none"), ("allreduce", "ringcc+fp16", "fp16"),
                      ("allreduce", "ringcc+bf16", "bf16"), ("allreduce", "gloo", "none"),
                      ("allgather", "ringcc", "none"), ("allgather", "gloo", "none")}
    assert all(r["wrong"] == 0 for r in rows), rows
    assert "ringcc+fp16" in res.stdout


def test_torchrun_starts_the_ranks(tmp_path):
    res = _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ringcc", "bench",
                "--sizes", "4K", "--iters", "2", "--warmup", "1", "--dtype", "float64", "--op", "prod",
                "--no-progress"], cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("# allreduce: 2 ranks, cpu, float64, op prod") == 1
    assert "started by a launcher" in res.stdout


def test_a_failing_rank_ends_the_run_with_an_error(tmp_path):
    # Every rank fails to create a group of an unknown backend: no hang, non-zero exit.
    res = _run(["-m", "ringcc", "bench", "--backends", "ringcc,nosuchbackend", "--sizes", "4K", "--iters", "1",
                "--no-progress"], cwd=tmp_path)
    assert res.returncode != 0
    assert "nosuchbackend" in res.stderr.lower()


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    rows = []
    for b, t in (("ringcc", 10.0), ("gloo", 40.0)):
        for size in (4096, 8192):
            rows.append({"backend": b, "collective": "allreduce", "placement": "in-place", "dtype": "float32",
                         "size_bytes": size, "time_us": t, "algbw_GBps": size / t / 1e3,
                         "busbw_GBps": size / t / 1e3, "nranks": 2, "device": "cpu"})
    path = tmp_path / "plot.png"
    bench.plot(str(path), rows)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
