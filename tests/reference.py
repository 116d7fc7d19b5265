"""NumPy references for reductions, with the error bounds the tests allow.

Integers and bool are exact (sum/prod wrap around like two's complement). Floats are
reduced in a different order than the ring uses, so they get a bound:
  |ringcc - exact| <= (n + 1) * eps_acc * sum(|x_i|)  (+ half an ulp of the output type
  for float16/bfloat16, which ringcc accumulates in fp32 and rounds once)
where eps_acc is the unit roundoff of the accumulation type (fp32 for 16-bit floats)."""

from __future__ import annotations

import numpy as np
import torch

FLOAT_DTYPES = ["float16", "bfloat16", "float32", "float64"]
INT_DTYPES = ["int8", "uint8", "int32", "int64"]
ALL_DTYPES = FLOAT_DTYPES + INT_DTYPES + ["bool"]
FLOAT_OPS = ["sum", "avg", "prod", "min", "max"]
INT_OPS = ["sum", "prod", "min", "max", "band", "bor", "bxor"]

# Unit roundoff of the type the reduction accumulates in, and of the stored result.
_ACC_EPS = {"float16": 2.0**-24, "bfloat16": 2.0**-24, "float32": 2.0**-24, "float64": 2.0**-53}
_OUT_EPS = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 0.0, "float64": 0.0}


def ops_for(dtype: str):
    return FLOAT_OPS if dtype in FLOAT_DTYPES else INT_OPS


def make_input(dtype: str, count: int, rank: int, seed: int, op: str):
    """Rank-specific input. bfloat16 is a torch tensor (NumPy has no bfloat16)."""
    rng = np.random.default_rng([seed, rank])
    if dtype in FLOAT_DTYPES:
        if op == "prod":  # magnitudes near 1 keep products of up to 8 ranks in range
            vals = rng.uniform(0.5, 2.0, count) * rng.choice([-1.0, 1.0], count)
        else:
            vals = rng.standard_normal(count) * 4
        if dtype == "bfloat16":
            return torch.tensor(vals, dtype=torch.float32).to(torch.bfloat16)
        return vals.astype(dtype)
    if dtype == "bool":
        return rng.integers(0, 2, count).astype(bool)
    info = np.iinfo(dtype)
    if op == "prod":
        return rng.integers(-3 if info.min < 0 else 0, 4, count).astype(dtype)
    return rng.integers(info.min, info.max, count, dtype=dtype, endpoint=True)


def as_f64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.view(torch.int16).numpy() if x.dtype == torch.bfloat16 else x.numpy()
    return np.asarray(x)


def exact_reduce(inputs, op: str, dtype: str) -> np.ndarray:
    """Reference for integer and bool dtypes, in the same dtype (wrapping)."""
    stack = np.stack([np.asarray(x) for x in inputs])
    if dtype == "bool":
        fn = {"sum": np.any, "max": np.any, "bor": np.any, "prod": np.all, "min": np.all, "band": np.all}
        if op == "bxor":
            return np.bitwise_xor.reduce(stack, axis=0)
        return fn[op](stack, axis=0)
    ufunc = {"sum": np.add, "prod": np.multiply, "min": np.minimum, "max": np.maximum,
             "band": np.bitwise_and, "bor": np.bitwise_or, "bxor": np.bitwise_xor}[op]
    with np.errstate(over="ignore"):
        return ufunc.reduce(stack, axis=0, dtype=np.dtype(dtype))


def check_float(result, inputs, op: str, dtype: str) -> None:
    n = len(inputs)
    stack = np.stack([as_f64(x) for x in inputs])
    got = as_f64(result)
    if op in ("min", "max"):  # exact: no rounding involved
        want = stack.min(axis=0) if op == "min" else stack.max(axis=0)
        np.testing.assert_array_equal(got, want)
        return
    if op == "prod":
        want = np.prod(stack, axis=0)
        scale = np.abs(want)
    else:
        want = stack.sum(axis=0)
        scale = np.abs(stack).sum(axis=0)
        if op == "avg":
            want, scale = want / n, scale / n
    bound = (n + 1) * _ACC_EPS[dtype] * scale + _OUT_EPS[dtype] * np.abs(want) + 1e-300
    err = np.abs(got - want)
    bad = np.flatnonzero(err > bound)
    assert bad.size == 0, (
        f"{op}/{dtype} over {n} ranks: {bad.size} elements out of bound, first at {bad[0]}: "
        f"got {got[bad[0]]!r}, want {want[bad[0]]!r}, bound {bound[bad[0]]!r}"
    )


def check_reduction(result, inputs, op: str, dtype: str) -> None:
    if dtype in FLOAT_DTYPES:
        check_float(result, inputs, op, dtype)
    else:
        np.testing.assert_array_equal(np.asarray(result), exact_reduce(inputs, op, dtype))
