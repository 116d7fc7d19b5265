"""`ringcc info` as a console script and as `python -m ringcc info`."""

import shutil
import subprocess
import sys

import pytest

import ringcc


@pytest.mark.parametrize("command", [["ringcc", "info"], [sys.executable, "-m", "ringcc", "info"]])
def test_info_reports_build(command):
    if command[0] == "ringcc" and shutil.which("ringcc") is None:
        pytest.skip("console script not on PATH")
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    assert ringcc.__version__ in out
    assert "simd" in out and ringcc.info()["simd_active"] in out
    assert "cuda" in out and "tcp, shm" in out


def test_info_dict():
    d = ringcc.info()
    assert d["version"] == ringcc.__version__
    assert d["cuda"] in (True, False)
    assert {"tcp", "shm"} <= set(d["transports"])
