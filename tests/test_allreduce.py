"""Property tests of allreduce: every dtype x op, world sizes 1..8, both transports,
both algorithms, counts from 0 to multi-MB, small segments to reach the pipelining."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_ranks
from guarded import Guarded
from reference import ALL_DTYPES, check_reduction, make_input, ops_for

# 0, 1, primes, counts not divisible by typical world sizes, powers of two.
SMALL_COUNTS = [0, 1, 2, 3, 5, 7, 13, 31, 64, 97, 257, 1000, 4099]
SEGMENTS = [8, 24, 1000, 4096, 256 << 10]
ALGORITHMS = ["auto", "ring", "recursive_doubling"]


@st.composite
def allreduce_cases(draw):
    dtype = draw(st.sampled_from(ALL_DTYPES))
    op = draw(st.sampled_from(ops_for(dtype)))
    world = draw(st.integers(1, 8))
    big = draw(st.integers(0, 9)) == 0  # one case in ten is multi-MB
    count = draw(st.integers(500_000, 1_100_000)) if big else draw(st.sampled_from(SMALL_COUNTS))
    # Tiny segments only for small buffers, or the case takes minutes.
    segment = draw(st.sampled_from(SEGMENTS if count * 8 <= 64 << 10 else SEGMENTS[-2:]))
    return dict(
        dtype=dtype,
        op=op,
        world=world,
        count=count,
        segment=segment,
        transport=draw(st.sampled_from(["shm", "tcp"])),
        algorithm=draw(st.sampled_from(ALGORITHMS)),
        in_place=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def _run_allreduce(case):
    dtype, count = case["dtype"], case["count"]
    inputs = [make_input(dtype, count, r, case["seed"], case["op"]) for r in range(case["world"])]

    def body(comm):
        x = inputs[comm.rank]
        if case["in_place"]:
            buf = Guarded(dtype, count).fill_from(x)
            comm.allreduce(buf.array, case["op"], algorithm=case["algorithm"], segment_bytes=case["segment"])
            out = buf
        else:
            src = Guarded(dtype, count).fill_from(x)
            before = src.bytes()
            out = Guarded(dtype, count)
            comm.allreduce(src.array, case["op"], out=out.array, algorithm=case["algorithm"],
                           segment_bytes=case["segment"])
            assert src.bytes() == before, "out-of-place allreduce modified its input"
            src.assert_guards_intact()
        out.assert_guards_intact()
        return out

    outs = run_ranks(case["world"], body, transport=case["transport"])
    check_reduction(outs[0].array, inputs, case["op"], dtype)
    first = outs[0].bytes()
    for r, o in enumerate(outs):
        assert o.bytes() == first, f"rank {r} result differs bitwise from rank 0"


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(allreduce_cases())
def test_allreduce_property(case):
    _run_allreduce(case)


@pytest.mark.parametrize("world", [2, 3, 8])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_allreduce_every_dtype_and_op(transport, world, dtype):
    """Every (dtype, op) pair at least once, on both transports, deterministically."""
    for op in ops_for(dtype):
        _run_allreduce(dict(dtype=dtype, op=op, world=world, count=1001, segment=256, transport=transport,
                            algorithm="auto" if op != "prod" else "ring", in_place=False, seed=7))


def test_allreduce_large_ring_pipelined(transport):
    """Several MB through the ring with many segments per chunk and ragged chunks."""
    _run_allreduce(dict(dtype="float32", op="sum", world=4, count=3_000_017, segment=64 << 10,
                        transport=transport, algorithm="ring", in_place=True, seed=1))


@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize("count", [1, 4, 1001, 70_001])
@pytest.mark.parametrize("op", ["sum", "avg", "max"])
def test_out_of_place_ring_reads_the_input_where_it_is(transport, world, count, op):
    """Out of place, the ring's reduce-scatter takes each rank's contribution from the
    input instead of a copy in the output: every chunk of the poisoned output must still
    be written (the first chunk a rank sends is filled only by the allgather), chunks
    may be empty (count < world), and the input must stay untouched. avg runs the two
    phases separately, sum and max as one exchange."""
    _run_allreduce(dict(dtype="float32" if op == "avg" else "int32", op=op, world=world, count=count,
                        segment=4096, transport=transport, algorithm="ring", in_place=False, seed=count))


def test_complex_allreduce_sum_and_avg(transport):
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal(301) + 1j * rng.standard_normal(301) for _ in range(3)]

    def body(comm):
        s = inputs[comm.rank].astype(np.complex64)
        a = s.copy()
        comm.allreduce(s, "sum")
        comm.allreduce(a, "avg")
        return s, a

    outs = run_ranks(3, body, transport=transport)
    want = sum(x.astype(np.complex64).astype(np.complex128) for x in inputs)
    np.testing.assert_allclose(outs[0][0], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outs[0][1], want / 3, rtol=1e-5, atol=1e-5)
    for s, a in outs:
        assert s.tobytes() == outs[0][0].tobytes() and a.tobytes() == outs[0][1].tobytes()


def test_half_sum_accumulates_in_fp32():
    """1 + 8 * 2^-11 in float16: per-step fp16 rounding would lose every 2^-11 (ties to
    even), fp32 accumulation keeps them and rounds once to 1 + 2^-8."""
    world = 8

    def body(comm):
        x = np.array([1.0 if comm.rank == 0 else 2.0**-11] * 5, dtype=np.float16)
        comm.allreduce(x, algorithm="ring")
        y = np.array([1.0 if comm.rank == 0 else 2.0**-11] * 5, dtype=np.float16)
        comm.allreduce(y, algorithm="recursive_doubling")
        return x, y

    for x, y in run_ranks(world, body):
        want = np.float16(1.0 + 7 * 2.0**-11)
        np.testing.assert_array_equal(x, want)
        np.testing.assert_array_equal(y, want)


def test_nan_results_are_bitwise_identical_on_all_ranks(transport):
    """Different NaN payloads on different ranks: all ranks still end with the same bits."""
    def body(comm):
        x = np.full(9, np.float32(1.0))
        x.view(np.uint32)[:] = 0x7FC00000 | (comm.rank + 1)  # quiet NaN, rank-specific payload
        comm.allreduce(x, "sum", algorithm="recursive_doubling")
        return x.tobytes()

    outs = run_ranks(5, body, transport=transport)
    assert all(o == outs[0] for o in outs)
