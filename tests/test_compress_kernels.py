"""Block-scaled half compression and pack/unpack (ringcc.kernels), at every SIMD level.

The wire bytes are checked against an independent reference built from NumPy's float16
and torch's bfloat16 conversions (both round to nearest even), the decoded values
against fp64, and the SIMD levels against each other bit for bit.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import ringcc
from ringcc import kernels as K
from ringcc._native import _C

LEVELS = [lvl for lvl in ringcc.info()["simd_compiled"]
          if lvl == "generic" or ringcc.info()["simd_best"] == lvl]
COMPRESSIONS = ["fp16", "bf16"]
COUNTS = [0, 1, 255, 256, 257, 511, 1000]
B = 256
# Decoding error bound, as a fraction of the block's largest magnitude.
BOUND = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8}
SETTINGS = settings(max_examples=40, deadline=None, database=None)


@contextlib.contextmanager
def simd(level):
    previous = _C._simd_level()
    _C._set_simd_level(level)
    try:
        yield
    finally:
        _C._set_simd_level(previous)


def nblocks(n):
    return (n + B - 1) // B


def log_uniform(rng, n, lo=-8.0, hi=30.0):
    """Signed values whose magnitudes span 10^lo .. 10^hi, as float32."""
    mag = 10.0 ** rng.uniform(lo, hi, n)
    return torch.from_numpy((rng.choice([-1.0, 1.0], n) * mag).astype(np.float32))


def mixed_blocks(rng, n):
    """Each block with its own magnitude (1e-8 .. 1e30) and spread within the block."""
    x = rng.standard_normal(n) * 10.0 ** rng.uniform(0, 4, n)
    x *= np.repeat(10.0 ** rng.uniform(-8, 26, nblocks(n)), B)[:n]
    return torch.from_numpy(x.astype(np.float32))


def split_wire(wire, n):
    """(inverse scales as float32, 16-bit values as uint16) of a wire tensor."""
    raw = wire.numpy()
    scales = raw[: 4 * nblocks(n)].view(np.float32)
    values = raw[4 * nblocks(n):].view(np.uint16)
    return scales, values


def to_half_bits(a32, compression):
    """Round float32 values to the wire type (round to nearest even), as uint16 bits."""
    if compression == "fp16":
        with np.errstate(over="ignore"):
            return a32.astype(np.float16).view(np.uint16)
    return torch.from_numpy(a32).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def from_half_bits(h, compression):
    if compression == "fp16":
        return h.view(np.float16).astype(np.float32)
    return (h.astype(np.uint32) << 16).view(np.float32)


def reference_wire(x, compression, prescale=1.0):
    """The format spelled out with NumPy/torch: (inverse scales, values) per block."""
    y = x.numpy().astype(np.float32) * np.float32(prescale)
    scales, values = [], []
    for b in range(nblocks(y.size)):
        blk = y[b * B:(b + 1) * B]
        m = float(np.abs(blk).max())
        k = 0
        if np.isfinite(blk).all() and m > 0:
            _, e = np.frexp(m)  # m = f * 2^e, f in [0.5, 1): floor(log2 m) = e - 1
            k = min(15 - int(e), 126)
        with np.errstate(over="ignore"):
            scaled = (blk * np.float32(2.0 ** k)).astype(np.float32)
        values.append(to_half_bits(scaled, compression))
        scales.append(np.float32(2.0 ** -k))
    if not scales:
        return np.zeros(0, np.float32), np.zeros(0, np.uint16)
    return np.array(scales, np.float32), np.concatenate(values)


def block_max(a64, n):
    """Largest finite |value| of each block, repeated per element (fp64)."""
    pad = np.zeros(nblocks(n) * B)
    pad[:n] = np.where(np.isfinite(a64), np.abs(a64), 0.0)
    return np.repeat(pad.reshape(-1, B).max(axis=1), B)[:n]


def bits(t):
    return t.contiguous().view(torch.int32).numpy().copy()


# ---- the format itself --------------------------------------------------------------


@pytest.mark.parametrize("n", COUNTS)
def test_compressed_nbytes(n):
    assert K.compressed_nbytes(n) == 4 * nblocks(n) + 2 * n
    assert K.compress(torch.zeros(n), "fp16").numel() == K.compressed_nbytes(n)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("n", COUNTS)
def test_wire_matches_reference(level, compression, n):
    rng = np.random.default_rng(n)
    x = mixed_blocks(rng, n)
    with simd(level):
        wire = K.compress(x, compression)
    scales, values = split_wire(wire, n)
    ref_scales, ref_values = reference_wire(x, compression)
    np.testing.assert_array_equal(scales, ref_scales)
    np.testing.assert_array_equal(values, ref_values)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("compression", COMPRESSIONS)
@SETTINGS
@given(n=st.integers(1, 3 * B + 7), seed=st.integers(0, 2 ** 32 - 1),
       prescale=st.sampled_from([1.0, 0.5, 0.125, 1.0 / 3.0, 3.0, 1e-20, 1e10]))
def test_scales_are_powers_of_two_putting_block_max_in_range(level, compression, n, seed, prescale):
    rng = np.random.default_rng(seed)
    x = log_uniform(rng, n)
    with simd(level):
        wire = K.compress(x, compression, prescale)
    scales, _ = split_wire(wire, n)
    mantissa = scales.view(np.uint32) & 0x807FFFFF  # sign and mantissa bits
    assert (mantissa == 0).all(), "inverse scales must be positive powers of two"
    with np.errstate(over="ignore"):
        y = (x.numpy() * np.float32(prescale)).astype(np.float64)
    bm = block_max(y, n)[::B]
    pad = np.zeros(nblocks(n) * B)
    pad[:n] = ~np.isfinite(y)
    special = pad.reshape(-1, B).any(axis=1) | (bm == 0)  # inf/NaN (overflow) or all-zero
    assert (scales[special] == 1.0).all()
    scaled = bm / scales.astype(np.float64)
    clamped = scales == np.float32(2.0 ** -126)
    assert ((scaled >= 2 ** 14) & (scaled < 2 ** 15) | clamped | special).all()
    assert (scaled[clamped] < 2 ** 15).all()


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("compression", COMPRESSIONS)
@SETTINGS
@given(n=st.integers(1, 4 * B), seed=st.integers(0, 2 ** 32 - 1),
       per_block=st.booleans(), prescale=st.sampled_from([1.0, 0.25, 1.0 / 7.0]))
def test_decoding_error_bounded_per_block(level, compression, n, seed, per_block, prescale):
    rng = np.random.default_rng(seed)
    x = mixed_blocks(rng, n) if per_block else log_uniform(rng, n)
    with simd(level):
        wire = K.compress(x, compression, prescale)
        out = K.decompress(wire, n, compression)
    y = (x.numpy() * np.float32(prescale)).astype(np.float64)
    err = np.abs(out.numpy().astype(np.float64) - y)
    limit = BOUND[compression] * block_max(y, n)
    assert (err <= limit).all(), f"worst excess {np.max(err / np.maximum(limit, 1e-300)):.3g}"
    # The scaling must not throw away more than plain rounding: the bound is tight-ish.
    assert np.isfinite(out.numpy()).all()


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_tiny_and_huge_values_keep_relative_precision(level, compression):
    # Blocks far below float16's smallest subnormal and above its largest finite value;
    # within a block the magnitudes stay within a factor 2, so the per-block bound is
    # also a relative one.
    rng = np.random.default_rng(3)
    mags = np.repeat([1e-12, 3e-9, 5e-30, 2e20, 7e35], B)
    signs = rng.choice([-1.0, 1.0], mags.size)
    x = torch.from_numpy((signs * mags * rng.uniform(1.0, 2.0, mags.size)).astype(np.float32))
    with simd(level):
        out = K.decompress(K.compress(x, compression), x.numel(), compression)
    rel = (out.double() - x.double()).abs() / x.double().abs()
    assert (rel <= 2 * BOUND[compression]).all()


# ---- special values -----------------------------------------------------------------


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_values_near_float_max(level, compression):
    fmax = float(np.finfo(np.float32).max)
    x = torch.tensor([fmax, -fmax, 2.0 ** 127, 2.0 ** 100] + [0.0] * 5, dtype=torch.float32)
    with simd(level):
        out = K.decompress(K.compress(x, compression), x.numel(), compression)
    # Documented: within half a 16-bit ulp of FLT_MAX rounds up to 2^128, as in bfloat16.
    assert out[0] == float("inf") and out[1] == -float("inf")
    assert out[0] == torch.tensor(fmax).to(torch.bfloat16).float()
    assert out[2] == 2.0 ** 127 and out[3] == 2.0 ** 100


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_inf_nan_blocks_are_unscaled_and_pass_through(level, compression):
    n = 3 * B + 10
    x = torch.randn(n) * 100
    x[5] = float("nan")
    x[B + 7] = float("inf")
    x[B + 8] = -float("inf")
    x[3 * B + 2] = float("nan")
    x[B + 9] = 1e6  # finite, but above float16's range in an unscaled block
    with simd(level):
        wire = K.compress(x, compression)
        out = K.decompress(wire, n, compression)
    scales, _ = split_wire(wire, n)
    assert scales[0] == 1.0 and scales[1] == 1.0 and scales[3] == 1.0
    assert scales[2] != 1.0
    assert torch.isnan(out[5]) and torch.isnan(out[3 * B + 2])
    assert out[B + 7] == float("inf") and out[B + 8] == -float("inf")
    assert torch.isnan(out).sum() == 2
    # Finite values of those blocks are plain conversions to the wire type.
    finite = torch.isfinite(x)
    want = torch.from_numpy(from_half_bits(to_half_bits(x.numpy(), compression), compression))
    unscaled = torch.zeros(n, dtype=torch.bool)
    for b in (0, 1, 3):
        unscaled[b * B:(b + 1) * B] = True
    sel = unscaled & finite
    assert torch.equal(out[sel], want[sel])
    if compression == "fp16":
        assert out[B + 9] == float("inf")


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_zero_blocks_keep_signed_zeros(level, compression):
    x = torch.zeros(B + 3)
    x[1::2] = -0.0
    with simd(level):
        wire = K.compress(x, compression)
        out = K.decompress(wire, x.numel(), compression)
    scales, values = split_wire(wire, x.numel())
    assert (scales == 1.0).all()
    assert (values[1::2] == 0x8000).all() and (values[0::2] == 0).all()
    assert np.array_equal(bits(out), bits(x))


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_denormal_blocks(level, compression):
    rng = np.random.default_rng(7)
    # fp32 subnormals (below 2^-126) and a block just above them.
    sub = (rng.integers(1, 2 ** 23, 2 * B).astype(np.float64) * 2.0 ** -149).astype(np.float32)
    tiny = (rng.standard_normal(B) * 1e-37).astype(np.float32)
    x = torch.from_numpy(np.concatenate([sub, tiny, sub[:5]]))
    n = x.numel()
    with simd(level):
        wire = K.compress(x, compression)
        out = K.decompress(wire, n, compression)
    scales, values = split_wire(wire, n)
    ref_scales, ref_values = reference_wire(x, compression)
    np.testing.assert_array_equal(scales, ref_scales)
    np.testing.assert_array_equal(values, ref_values)
    assert scales[0] == np.float32(2.0 ** -126)  # the clamp
    err = np.abs(out.numpy().astype(np.float64) - x.numpy().astype(np.float64))
    assert (err <= BOUND[compression] * block_max(x.numpy().astype(np.float64), n)).all()


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_levels_bit_identical_on_arbitrary_bits(compression):
    """Random 32-bit patterns: NaNs with payloads, signalling NaNs, infinities, denormals."""
    if len(LEVELS) < 2:
        pytest.skip("only the generic level runs on this CPU")
    rng = np.random.default_rng(11)
    n = 64 * B + 77
    raw = rng.integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32)
    # Narrow the exponent in some blocks so they are finite, denormal or near the top.
    raw[: 20 * B] = (raw[: 20 * B] & 0x80FFFFFF) | (rng.integers(0, 4, 20 * B, dtype=np.uint32) << 29)
    raw[20 * B: 24 * B] &= 0x807FFFFF  # denormals
    raw[24 * B: 26 * B] |= 0x7F000000  # huge, some inf/NaN
    x = torch.from_numpy(raw.view(np.float32).copy())
    residual = torch.from_numpy((rng.standard_normal(n) * 1e-3).astype(np.float32))
    acc = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    results = {}
    for level in LEVELS:
        with simd(level):
            wire = K.compress(x, compression, 0.75)
            dec = K.decompress(wire, n, compression)
            accumulated = K.decompress(wire, n, compression, out=acc.clone(), accumulate=True)
            xe, re = x.clone(), residual.clone()
            K.error_feedback(xe, re, compression)
            rt = K.round_trip(x.clone(), compression)
        results[level] = [wire.numpy().copy(), bits(dec), bits(accumulated), bits(xe), bits(re), bits(rt)]
    first, *others = results.values()
    for other in others:
        for name, a, b in zip(["wire", "decoded", "accumulated", "ef x", "ef residual", "round trip"],
                              first, other):
            assert np.array_equal(a, b), f"{name} differs between levels"


@pytest.mark.parametrize("compression", COMPRESSIONS)
@SETTINGS
@given(n=st.integers(0, 2 * B + 9), seed=st.integers(0, 2 ** 32 - 1))
def test_levels_bit_identical_property(compression, n, seed):
    if len(LEVELS) < 2:
        pytest.skip("only the generic level runs on this CPU")
    rng = np.random.default_rng(seed)
    x = mixed_blocks(rng, n)
    wires = []
    for level in LEVELS:
        with simd(level):
            wires.append(K.compress(x, compression, 1.0 / 3.0).numpy().copy())
    assert all(np.array_equal(wires[0], w) for w in wires[1:])


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("n", COUNTS)
def test_short_last_block_and_counts(level, compression, n):
    rng = np.random.default_rng(100 + n)
    x = log_uniform(rng, n, -3, 3)
    with simd(level):
        wire = K.compress(x, compression)
        out = K.decompress(wire, n, compression)
    assert out.shape == (n,)
    if n:
        err = np.abs(out.numpy().astype(np.float64) - x.numpy().astype(np.float64))
        assert (err <= BOUND[compression] * block_max(x.numpy().astype(np.float64), n)).all()
        # The last block's scale depends only on its own elements.
        last = x[(nblocks(n) - 1) * B:]
        ref_scales, _ = reference_wire(last, compression)
        assert split_wire(wire, n)[0][-1] == ref_scales[0]


# ---- decompress modes ---------------------------------------------------------------


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("n", COUNTS)
def test_accumulate_adds_in_fp32(level, compression, n):
    rng = np.random.default_rng(n + 1)
    x = log_uniform(rng, n, -4, 4)
    base = log_uniform(rng, n, -4, 4)
    with simd(level):
        wire = K.compress(x, compression)
        decoded = K.decompress(wire, n, compression)
        out = base.clone().reshape(-1, 1) if n else base.clone()
        ret = K.decompress(wire, n, compression, out=out, accumulate=True)
    assert ret is out
    assert np.array_equal(bits(out.reshape(-1)), bits(base + decoded))
    # assign mode into a given tensor overwrites it
    with simd(level):
        target = torch.full((n,), 123.0)
        K.decompress(wire, n, compression, out=target)
    assert np.array_equal(bits(target), bits(decoded))


# ---- error feedback and round trip --------------------------------------------------


def check_fixed_point(x_new, compression, level):
    """round_trip(x_new) == x_new, except where a block's maximum rounded up to the next
    power of two (its scale halves): values below 2^-29 of the block max may then round
    once more, by at most 2^-39 of it (documented in compress.h)."""
    with simd(level):
        again = K.round_trip(x_new.clone(), compression)
    changed = bits(again) != bits(x_new)
    if changed.any():
        x64 = x_new.numpy().astype(np.float64)
        bm = block_max(x64, x64.size)
        assert (np.abs(x64[changed]) < 2.0 ** -29 * bm[changed]).all()
        diff = np.abs(again.numpy().astype(np.float64) - x64)
        assert (diff[changed] <= 2.0 ** -39 * bm[changed]).all()


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("compression", COMPRESSIONS)
@SETTINGS
@given(n=st.integers(0, 3 * B + 5), seed=st.integers(0, 2 ** 32 - 1), per_block=st.booleans())
def test_error_feedback_identity_and_fixed_point(level, compression, n, seed, per_block):
    rng = np.random.default_rng(seed)
    x = mixed_blocks(rng, n) if per_block else log_uniform(rng, n)
    residual = x * torch.from_numpy(rng.uniform(-1e-2, 1e-2, n).astype(np.float32))
    y = x + residual  # fp32, what the kernel computes first
    x_new, r_new = x.clone(), residual.clone()
    with simd(level):
        ret = K.error_feedback(x_new, r_new, compression)
    assert ret is x_new
    # No value is lost: x_new + r_new is exactly the fp32 sum of the inputs.
    assert np.array_equal(x_new.double() + r_new.double(), y.double())
    # x_new is what the wire carries of y.
    with simd(level):
        assert np.array_equal(bits(x_new), bits(K.decompress(K.compress(y, compression), n, compression)))
    check_fixed_point(x_new, compression, level)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_fixed_point_exception_is_as_documented(level, compression):
    # Block max just below 2^15 rounds up to 2^15 (the scale then halves), and a value
    # that is an odd multiple of the smallest float16 subnormal in the scaled units.
    x = torch.zeros(B)
    x[0] = 32767.0
    x[1] = 2.0 ** -24 * 3
    x[2] = 1000.0
    with simd(level):
        once = K.round_trip(x.clone(), compression)
    assert once[0] == 32768.0
    check_fixed_point(once, compression, level)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("n", COUNTS)
def test_round_trip_equals_compress_then_decompress(level, compression, n):
    rng = np.random.default_rng(n + 2)
    x = mixed_blocks(rng, n)
    with simd(level):
        want = K.decompress(K.compress(x, compression), n, compression)
        got = K.round_trip(x.clone(), compression)
    assert np.array_equal(bits(got), bits(want))
    check_fixed_point(got, compression, level)


# ---- pack / unpack ------------------------------------------------------------------


@SETTINGS
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=60),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.uint8, torch.int64, torch.bool]))
def test_pack_unpack_round_trip(sizes, dtype):
    g = torch.Generator().manual_seed(sum(sizes))
    tensors = []
    for i, s in enumerate(sizes):
        t = torch.randint(0, 100, (s,), generator=g).to(dtype)
        tensors.append(t.reshape(s, 1) if i % 3 == 1 else t)
    flat = K.pack(tensors)
    assert flat.dtype == dtype and flat.shape == (sum(sizes),)
    assert torch.equal(flat, torch.cat([t.reshape(-1) for t in tensors]))
    outs = [torch.empty_like(t) for t in tensors]
    assert K.unpack(flat, outs) is outs
    for t, o in zip(tensors, outs):
        assert o.shape == t.shape and torch.equal(o, t)


def test_pack_into_out_and_many_tensors():
    tensors = [torch.randn(i % 17 + (i % 5) * 31) for i in range(1000)]
    total = sum(t.numel() for t in tensors)
    out = torch.full((total,), float("nan"))
    assert K.pack(tensors, out=out) is out
    assert torch.equal(out, torch.cat(tensors))
    # any shape of flat with the right numel
    outs = [torch.zeros_like(t) for t in tensors]
    K.unpack(out.reshape(1, total), outs)
    assert all(torch.equal(a, b) for a, b in zip(tensors, outs))


def test_pack_odd_byte_sizes_and_views():
    base = torch.arange(1000, dtype=torch.uint8)
    tensors = [base[3:10], base[501:502], base[11:11], base[100:999]]  # odd addresses and sizes
    flat = K.pack(tensors)
    assert torch.equal(flat, torch.cat(tensors))
    dst_base = torch.zeros(2000, dtype=torch.uint8)
    dsts = [dst_base[1:8], dst_base[9:10], dst_base[10:10], dst_base[1001:1900]]
    K.unpack(flat, dsts)
    assert all(torch.equal(a, b) for a, b in zip(tensors, dsts))
    assert dst_base[0] == 0 and dst_base[8] == 0 and dst_base[1900] == 0  # nothing else written


# ---- bad input ----------------------------------------------------------------------


def test_bad_compression_name():
    for bad in ["fp32", "FP16", None, 16]:
        with pytest.raises(ValueError, match="compression must be one of"):
            K.compress(torch.zeros(4), bad)
        with pytest.raises(ValueError, match="compression"):
            K.decompress(torch.zeros(K.compressed_nbytes(4), dtype=torch.uint8), 4, bad)
        with pytest.raises(ValueError, match="compression"):
            K.round_trip(torch.zeros(4), bad)
        with pytest.raises(ValueError, match="compression"):
            K.error_feedback(torch.zeros(4), torch.zeros(4), bad)


def test_bad_tensor_arguments():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        K.compress(np.zeros(4, np.float32), "fp16")
    with pytest.raises(TypeError, match="x must have dtype torch.float32, got torch.float64"):
        K.compress(torch.zeros(4, dtype=torch.float64), "fp16")
    with pytest.raises(ValueError, match="x must be on the CPU or a CUDA device, got device meta"):
        K.compress(torch.zeros(4, device="meta"), "fp16")
    with pytest.raises(ValueError, match="x must be contiguous"):
        K.compress(torch.zeros(4, 4).t(), "fp16")
    with pytest.raises(TypeError, match="x must have dtype"):
        K.round_trip(torch.zeros(4, dtype=torch.float16), "fp16")
    with pytest.raises(ValueError, match="contiguous"):
        K.round_trip(torch.zeros(8)[::2], "bf16")


def test_bad_prescale():
    for bad in [float("nan"), float("inf"), -float("inf")]:
        with pytest.raises(ValueError, match="prescale must be finite"):
            K.compress(torch.zeros(4), "fp16", bad)
    with pytest.raises(TypeError, match="prescale must be a real number"):
        K.compress(torch.zeros(4), "fp16", "1")
    # finite in Python, infinite in fp32: the native check names it
    with pytest.raises(ValueError, match="prescale"):
        K.compress(torch.zeros(4), "fp16", 1e300)


def test_bad_sizes():
    wire = K.compress(torch.zeros(300), "fp16")
    with pytest.raises(ValueError, match=r"wire has 608 bytes; 299 compressed values take 606"):
        K.decompress(wire, 299, "fp16")
    with pytest.raises(TypeError, match="wire must have dtype torch.uint8"):
        K.decompress(wire.view(torch.int8), 300, "fp16")
    with pytest.raises(ValueError, match="out has 299 elements, expected numel=300"):
        K.decompress(wire, 300, "fp16", out=torch.zeros(299))
    with pytest.raises(TypeError, match="out must have dtype torch.float32"):
        K.decompress(wire, 300, "fp16", out=torch.zeros(300, dtype=torch.float64))
    with pytest.raises(ValueError, match="accumulate=True needs `out`"):
        K.decompress(wire, 300, "fp16", accumulate=True)
    with pytest.raises(ValueError, match="numel must be >= 0"):
        K.decompress(wire, -1, "fp16")
    with pytest.raises(TypeError, match="numel must be an int"):
        K.compressed_nbytes(3.0)
    with pytest.raises(ValueError, match="out has 10 bytes; 300 values compress to 608"):
        K.compress(torch.zeros(300), "fp16", out=torch.zeros(10, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"x has shape \(4,\) but residual has shape \(2, 2\)"):
        K.error_feedback(torch.zeros(4), torch.zeros(2, 2), "fp16")


def test_overlap_is_rejected():
    buf = torch.zeros(4096, dtype=torch.uint8)
    x = buf[:1024].view(torch.float32)  # 256 floats
    with pytest.raises(ValueError, match="x and out overlap"):
        K.compress(x, "fp16", out=buf[512:512 + K.compressed_nbytes(256)])
    wire = buf[2048:2048 + K.compressed_nbytes(256)]
    with pytest.raises(ValueError, match="wire and out overlap"):
        K.decompress(wire, 256, "fp16", out=buf[2048 + 4:2048 + 4 + 1024].view(torch.float32))
    f = torch.zeros(300)
    with pytest.raises(ValueError, match="x and residual overlap"):
        K.error_feedback(f[:200], f[100:], "bf16")
    a, b = torch.zeros(10), torch.zeros(10)
    with pytest.raises(ValueError, match=r"tensors\[1\] and out overlap"):
        K.pack([a, f[:10]], out=f[5:25])
    with pytest.raises(ValueError, match=r"tensors\[0\] and flat overlap"):
        K.unpack(f[:20], [f[10:20], b])
    with pytest.raises(ValueError, match=r"tensors\[0\] and tensors\[2\] overlap"):
        K.unpack(torch.zeros(30), [f[0:10], b, f[9:19]])


def test_bad_pack_arguments():
    with pytest.raises(ValueError, match="tensors is empty"):
        K.pack([])
    with pytest.raises(TypeError, match="tensors must be a list or tuple"):
        K.pack(torch.zeros(3))
    with pytest.raises(TypeError, match=r"tensors\[1\] has dtype torch.float64, but tensors\[0\] has torch.float32"):
        K.pack([torch.zeros(2), torch.zeros(2, dtype=torch.float64)])
    with pytest.raises(TypeError, match=r"tensors\[1\] must be a torch.Tensor"):
        K.pack([torch.zeros(2), [1.0]])
    with pytest.raises(ValueError, match=r"tensors\[0\] must be contiguous"):
        K.pack([torch.zeros(3, 3).t()])
    with pytest.raises(ValueError, match="out has 5 elements, but the tensors hold 4 in all"):
        K.pack([torch.zeros(2), torch.zeros(2)], out=torch.zeros(5))
    with pytest.raises(TypeError, match="out has dtype torch.float64, but the tensors have torch.float32"):
        K.pack([torch.zeros(2)], out=torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="flat has 3 elements, but the tensors hold 4 in all"):
        K.unpack(torch.zeros(3), [torch.zeros(4)])
    with pytest.raises(TypeError, match="flat has dtype torch.int32"):
        K.unpack(torch.zeros(4, dtype=torch.int32), [torch.zeros(4)])


def test_native_entry_points_validate_too():
    DT = _C.DataType
    x = torch.zeros(300)
    wire = torch.zeros(K.compressed_nbytes(300), dtype=torch.uint8)
    with pytest.raises(ValueError, match="wire type 'float32' is not float16 or bfloat16"):
        _C._compress(wire.data_ptr(), x.data_ptr(), 300, DT.float32, 1.0)
    with pytest.raises(ValueError, match="decompress: wire type 'int8'"):
        _C._decompress(x.data_ptr(), wire.data_ptr(), 300, DT.int8, False)
    with pytest.raises(ValueError, match="compress: wire is null"):
        _C._compress(0, x.data_ptr(), 300, DT.float16, 1.0)
    with pytest.raises(ValueError, match="round_trip: x is null"):
        _C._round_trip(0, 1, DT.bfloat16)
    with pytest.raises(ValueError, match="error_feedback: x and residual overlap"):
        _C._error_feedback(x.data_ptr(), x.data_ptr() + 4, 10, DT.float16)
    with pytest.raises(ValueError, match="compress: input and wire overlap"):
        _C._compress(x.data_ptr(), x.data_ptr(), 100, DT.float16, 1.0)
    with pytest.raises(ValueError, match="compress: prescale nan is not finite"):
        _C._compress(wire.data_ptr(), x.data_ptr(), 300, DT.float16, float("nan"))
    with pytest.raises(ValueError, match="pack: 2 pointers, 1 offsets and 2 byte counts"):
        _C._pack(wire.data_ptr(), [x.data_ptr(), x.data_ptr()], [0], [4, 4])
    with pytest.raises(ValueError, match="unpack: piece 1 is null"):
        _C._unpack(x.data_ptr(), [wire.data_ptr(), 0], [0, 4], [4, 4])
    # count 0 touches nothing, even with null pointers
    _C._compress(0, 0, 0, DT.float16, 1.0)
    _C._decompress(0, 0, 0, DT.bfloat16, True)
    _C._pack(0, [], [], [])


# ------------------------------------------------- decompress_add_compress (CPU path)
@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("in_place", [False, True])
@SETTINGS
@given(n=st.integers(1, 3 * B + 5), seed=st.integers(0, 2 ** 32 - 1))
def test_decompress_add_compress_is_one_ring_step(compression, in_place, n, seed):
    g = torch.Generator().manual_seed(seed)
    incoming = torch.randn(n, generator=g) * 10.0 ** torch.randint(-6, 7, (n,), generator=g)
    local = torch.randn(n, generator=g)
    wire_in = K.compress(incoming, compression)
    expected_wire = K.compress(local + K.decompress(wire_in, n, compression), compression)
    sum_out = torch.full((n,), float("nan"))
    out = wire_in.clone() if in_place else None
    got = K.decompress_add_compress(out if in_place else wire_in, local, compression, out=out, sum_out=sum_out)
    assert torch.equal(got, expected_wire)
    assert torch.equal(sum_out, K.decompress(expected_wire, n, compression))


def test_decompress_add_compress_rejects_bad_arguments():
    local = torch.ones(10)
    wire = K.compress(local, "fp16")
    with pytest.raises(ValueError, match="wire_in has 2 bytes; 10 compressed values take"):
        K.decompress_add_compress(wire[:2], local, "fp16")
    with pytest.raises(ValueError, match="sum_out has 3 elements, expected 10"):
        K.decompress_add_compress(wire, local, "fp16", sum_out=torch.zeros(3))
    with pytest.raises(ValueError, match="sum_out and local overlap"):
        K.decompress_add_compress(wire, local, "fp16", sum_out=local)
