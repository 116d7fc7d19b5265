"""The native kernels at every SIMD level this CPU runs, bitwise against NumPy/torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ringcc
from ringcc._native import _C

LEVELS = [lvl for lvl in ringcc.info()["simd_compiled"]
          if lvl == "generic" or ringcc.info()["simd_best"] == lvl]
COUNTS = [0, 1, 7, 8, 9, 31, 1000, 4099]
DT = _C.DataType
OP = _C.ReduceOp


@pytest.fixture(params=LEVELS)
def simd(request):
    previous = _C._simd_level()
    _C._set_simd_level(request.param)
    yield request.param
    _C._set_simd_level(previous)


def ptr(a) -> int:
    return a.data_ptr() if isinstance(a, torch.Tensor) else a.__array_interface__["data"][0]


NUMPY_UFUNC = {"sum": np.add, "prod": np.multiply, "min": np.fmin, "max": np.fmax,
               "band": np.bitwise_and, "bor": np.bitwise_or, "bxor": np.bitwise_xor}


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int8", "uint8", "int32", "int64"])
@pytest.mark.parametrize("count", COUNTS)
def test_reduce_matches_numpy_bitwise(simd, dtype, count):
    rng = np.random.default_rng(count)
    if dtype.startswith("float"):
        a = (rng.standard_normal(count) * 100).astype(dtype)
        b = (rng.standard_normal(count) * 100).astype(dtype)
        ops = ["sum", "prod", "min", "max"]
    else:
        info = np.iinfo(dtype)
        a = rng.integers(info.min, info.max, count, dtype=dtype, endpoint=True)
        b = rng.integers(info.min, info.max, count, dtype=dtype, endpoint=True)
        ops = ["sum", "prod", "min", "max", "band", "bor", "bxor"]
    for op in ops:
        out = np.empty_like(a)
        _C._reduce(ptr(out), ptr(a), ptr(b), count, getattr(DT, dtype), getattr(OP, op))
        with np.errstate(over="ignore"):
            want = NUMPY_UFUNC[op](a, b)  # numpy float16 arithmetic rounds once from fp32, as ours
        assert out.tobytes() == want.tobytes(), f"{op} {dtype} at {simd}"
        # In place, both operand positions.
        x = a.copy()
        _C._reduce(ptr(x), ptr(x), ptr(b), count, getattr(DT, dtype), getattr(OP, op))
        assert x.tobytes() == want.tobytes()


def test_bfloat16_reduce_matches_torch(simd):
    a = torch.randn(1003).to(torch.bfloat16)
    b = torch.randn(1003).to(torch.bfloat16)
    for op, fn in [("sum", torch.add), ("prod", torch.mul), ("min", torch.minimum), ("max", torch.maximum)]:
        out = torch.empty_like(a)
        _C._reduce(ptr(out), ptr(a), ptr(b), 1003, DT.bfloat16, getattr(OP, op))
        assert torch.equal(out.view(torch.int16), fn(a, b).view(torch.int16)), op


def test_min_max_propagate_nan(simd):
    a = np.array([np.nan, 1.0, 2.0, np.nan] * 5, np.float32)
    b = np.array([1.0, np.nan, 0.5, np.nan] * 5, np.float32)
    for op in ("min", "max"):
        out = np.empty_like(a)
        _C._reduce(ptr(out), ptr(a), ptr(b), a.size, DT.float32, getattr(OP, op))
        want = np.minimum(a, b) if op == "min" else np.maximum(a, b)
        np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
        np.testing.assert_array_equal(out[~np.isnan(out)], want[~np.isnan(want)])


def test_bool_ops(simd):
    a = np.array([0, 0, 1, 1] * 9, bool)
    b = np.array([0, 1, 0, 1] * 9, bool)
    want = {"sum": a | b, "max": a | b, "bor": a | b, "prod": a & b, "min": a & b, "band": a & b, "bxor": a ^ b}
    for op, w in want.items():
        out = np.empty_like(a)
        _C._reduce(ptr(out), ptr(a), ptr(b), a.size, DT.bool, getattr(OP, op))
        np.testing.assert_array_equal(out, w)
        assert set(out.view(np.uint8).tolist()) <= {0, 1}


def test_float16_conversion_all_values_and_rounding(simd):
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    wide = np.empty(65536, np.float32)
    _C._convert(ptr(wide), DT.float32, ptr(halves), DT.float16, 65536)
    want = halves.astype(np.float32)
    nan = np.isnan(want)
    # NaNs stay NaN; signalling NaNs come back quiet, as the F16C instructions do.
    np.testing.assert_array_equal(np.isnan(wide), nan)
    assert wide[~nan].tobytes() == want[~nan].tobytes()
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 1_000_000, dtype=np.uint64).astype(np.uint32)
    f32 = bits.view(np.float32)
    f32 = f32[~np.isnan(f32)]  # NaN payload narrowing is implementation-defined
    narrow = np.empty(f32.size, np.float16)
    _C._convert(ptr(narrow), DT.float16, ptr(f32), DT.float32, f32.size)
    with np.errstate(over="ignore"):  # values beyond float16's range become inf, as intended
        want16 = f32.astype(np.float16)
    assert narrow.tobytes() == want16.tobytes()


def test_bfloat16_conversion_matches_torch(simd):
    rng = np.random.default_rng(1)
    f32 = rng.integers(0, 2**32, 1_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    f32 = f32[~np.isnan(f32)]
    out = np.empty(f32.size, np.uint16)
    _C._convert(ptr(out), DT.bfloat16, ptr(f32), DT.float32, f32.size)
    want = torch.from_numpy(f32.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(out, want)


def test_divide_matches_numpy(simd):
    x = np.random.default_rng(2).standard_normal(999).astype(np.float32)
    y = x.copy()
    _C._divide(ptr(y), y.size, DT.float32, 3.0)
    assert y.tobytes() == (x / np.float32(3)).tobytes()
    with pytest.raises(ValueError, match="int32"):
        _C._divide(ptr(np.zeros(3, np.int32)), 3, DT.int32, 3.0)


def test_unsupported_kernel_ops_raise():
    a = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="float32"):
        _C._reduce(ptr(a), ptr(a), ptr(a), 4, DT.float32, OP.band)
