"""Opt-in (``pytest -m slow``): the multi-host emulation harness, bench/emulate_hosts.py,
runs a 3-host job under torchrun in network namespaces and removes them afterwards.
Skips with the harness's reason where it cannot run (not root, no iproute2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

HARNESS = Path(__file__).resolve().parents[1] / "bench" / "emulate_hosts.py"
SKIP = 77


def _namespaces() -> set:
    try:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        return set()
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.mark.slow
def test_emulated_hosts_run_and_clean_up(tmp_path):
    before = _namespaces()
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(HARNESS), "--hosts", "3", "--rate-gbit", "1", "--sizes", "256K,1M",
                           "--iters", "2", "--out-json", str(out)],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode == SKIP:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert _namespaces() == before, "the harness left network namespaces behind"
    rows = json.loads(out.read_text())
    assert {r["backend"] for r in rows} == {"ringcc", "gloo"}
    for r in rows:
        assert r["nranks"] == 3 and r["wrong"] == 0, r
        # Shaped links: nothing can beat the link bound by much (the token bucket's
        # burst lets the first bytes through at full speed).
        assert 0 < r["fraction_of_link_bound"] < 1.5, r
    assert "of bound" in proc.stdout


@pytest.mark.slow
def test_emulated_hosts_clean_up_after_a_failed_job():
    before = _namespaces()
    proc = subprocess.run([sys.executable, str(HARNESS), "--hosts", "2", "--sizes", "4K", "--iters", "1",
                           "--timeout", "300", "--", "--backends", "ringcc,nosuchbackend"],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == SKIP:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "failed" in proc.stderr
    assert _namespaces() == before, "the harness left network namespaces behind"
