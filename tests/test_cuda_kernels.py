"""The CUDA kernels (csrc/ringcc/kernels/cuda) against the CPU kernels and fp64 / torch
references. Every GPU test is marked `gpu` and skips without a GPU; the build check
runs everywhere.

Inputs are fresh random values (never zeros), outputs are poisoned before each run, and
sizes cover tails, single blocks and unaligned starts (the kernels take 16-byte vector
paths only where every pointer allows)."""

from __future__ import annotations

import shutil

import pytest
import torch

import ringcc
from ringcc import kernels as K
from ringcc._native import _C

HAVE_GPU = bool(ringcc.info()["cuda"]) and torch.cuda.is_available() and _C._cuda_device_count() > 0


def gpu(test):
    """Marks `test` as a GPU test, skipped without a GPU and CUDA kernels."""
    skip = pytest.mark.skipif(not HAVE_GPU, reason="needs a CUDA GPU and a ringcc build with CUDA kernels")
    return pytest.mark.gpu(skip(test))


DT, OP = _C.DataType, _C.ReduceOp
SIZES = [1, 7, 255, 256, 257, 4099, 1 << 20]
OFFSETS = [0, 1]  # element offset of every buffer: 1 makes the 16-byte paths step aside
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "float64": torch.float64, "int8": torch.int8, "uint8": torch.uint8, "int32": torch.int32,
                "int64": torch.int64, "bool": torch.bool}


def test_build_has_cuda_kernels_where_nvcc_exists():
    # CI builds with nvcc on the PATH: this is what keeps the CUDA sources compiling.
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on this machine")
    info = ringcc.info()
    assert info["cuda"], "nvcc is installed but the build has no CUDA kernels"
    assert info["cuda_architectures"], info


def _random(n, dtype, g, device="cuda", offset=0):
    """n fresh nonzero values of `dtype` starting `offset` elements into a buffer."""
    if dtype.is_floating_point:
        x = torch.randn(n + offset, generator=g, dtype=torch.float64)
        x = torch.where(x.abs() < 1e-3, x.sign() + 0.5, x).to(dtype)
    elif dtype == torch.bool:
        x = torch.randint(0, 2, (n + offset,), generator=g).bool()
    else:
        info = torch.iinfo(dtype)
        x = torch.randint(max(info.min, -1000), min(info.max, 1000), (n + offset,), generator=g, dtype=torch.int64)
        x = torch.where(x == 0, torch.ones_like(x), x).to(dtype)
    return x.to(device)[offset:]


def _poisoned(like, offset=0):
    buf = torch.empty(like.numel() + offset, dtype=like.dtype, device=like.device)
    buf.view(torch.uint8).fill_(0xA7)
    return buf[offset:]


def _ops_for(dtype):
    return [op for op in ["sum", "prod", "min", "max", "band", "bor", "bxor"]
            if _C.op_supported(getattr(DT, dtype), getattr(OP, op))]


@gpu
@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("offset", OFFSETS)
def test_reduce_equals_cpu_kernel(dtype, n, offset):
    g = torch.Generator().manual_seed(n * 31 + offset)
    td = TORCH_DTYPES[dtype]
    a, b = _random(n, td, g, offset=offset), _random(n, td, g, offset=offset)
    for op in _ops_for(dtype):
        out = _poisoned(a, offset)
        stream = torch.cuda.current_stream().cuda_stream
        _C._cuda_reduce(out.data_ptr(), a.data_ptr(), b.data_ptr(), n, getattr(DT, dtype), getattr(OP, op), stream)
        ca, cb = a.cpu(), b.cpu()
        expected = torch.empty_like(ca)
        _C._reduce(expected.data_ptr(), ca.data_ptr(), cb.data_ptr(), n, getattr(DT, dtype), getattr(OP, op))
        torch.cuda.synchronize()
        got = out.cpu()
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), (dtype, op, n, offset)
        if dtype in ("float32", "float64") and op == "sum":
            ref = (ca.double() + cb.double()).to(td)
            assert torch.equal(got, ref)


@gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("n", SIZES)
def test_divide_equals_cpu_kernel(dtype, n):
    g = torch.Generator().manual_seed(n)
    x = _random(n, TORCH_DTYPES[dtype], g)
    expected = x.cpu().clone()
    _C._divide(expected.data_ptr(), n, getattr(DT, dtype), 3.0)
    _C._cuda_divide(x.data_ptr(), n, getattr(DT, dtype), 3.0, torch.cuda.current_stream().cuda_stream)
    assert torch.equal(x.cpu().view(torch.uint8), expected.view(torch.uint8))


def _grads(n, g, offset=0):
    """Gradient-like float32 values: a different magnitude per 256-value block."""
    x = torch.randn(n + offset, generator=g)
    scale = 10.0 ** torch.randint(-6, 7, ((n + offset + 255) // 256,), generator=g).repeat_interleave(256)
    return (x * scale[: n + offset]).cuda()[offset:]


@gpu
@pytest.mark.parametrize("compression", ["fp16", "bf16"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("offset", OFFSETS)
def test_compression_kernels_equal_cpu_bytes(compression, n, offset):
    g = torch.Generator().manual_seed(n + 7 * offset)
    x = _grads(n, g, offset)
    nbytes = K.compressed_nbytes(n)
    wire = _poisoned(torch.empty(nbytes, dtype=torch.uint8, device="cuda"), offset)
    K.compress(x, compression, 0.25, out=wire)
    cpu_wire = K.compress(x.cpu(), compression, 0.25)
    assert torch.equal(wire.cpu(), cpu_wire)

    out = _poisoned(x, offset)
    K.decompress(wire, n, compression, out=out)
    assert torch.equal(out.cpu(), K.decompress(cpu_wire, n, compression))
    # fp64 reference: the error per block is bounded by the format (compress.h).
    bound = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8}[compression]
    ref = x.cpu().double() * 0.25
    err = (out.cpu().double() - ref).abs()
    pad = (-n) % 256
    block_max = torch.nn.functional.pad(ref.abs(), (0, pad)).view(-1, 256).max(1).values.repeat_interleave(256)[:n]
    assert bool((err <= bound * block_max + 1e-45).all())

    acc = _random(n, torch.float32, g, offset=offset)
    cpu_acc = acc.cpu()
    K.decompress(wire, n, compression, out=acc, accumulate=True)
    K.decompress(cpu_wire, n, compression, out=cpu_acc, accumulate=True)
    assert torch.equal(acc.cpu(), cpu_acc)


@gpu
@pytest.mark.parametrize("compression", ["fp16", "bf16"])
@pytest.mark.parametrize("n", SIZES)
def test_error_feedback_round_trip_and_fused_step_equal_cpu(compression, n):
    g = torch.Generator().manual_seed(n + 1)
    x, r = _grads(n, g), _grads(n, g) * 1e-3
    cx, cr = x.cpu(), r.cpu()
    K.error_feedback(x, r, compression)
    K.error_feedback(cx, cr, compression)
    assert torch.equal(x.cpu(), cx) and torch.equal(r.cpu(), cr)

    y = _grads(n, g)
    cy = y.cpu()
    K.round_trip(y, compression)
    K.round_trip(cy, compression)
    assert torch.equal(y.cpu(), cy)

    incoming, local = _grads(n, g), _grads(n, g)
    wire_in = K.compress(incoming, compression)
    for in_place in (False, True):
        sum_out = _poisoned(local)
        out = wire_in.clone() if in_place else None
        got = K.decompress_add_compress(out if in_place else wire_in, local, compression, out=out, sum_out=sum_out)
        cpu_sum = torch.empty(n)
        expected = K.decompress_add_compress(wire_in.cpu(), local.cpu(), compression, sum_out=cpu_sum)
        assert torch.equal(got.cpu(), expected)
        assert torch.equal(sum_out.cpu(), cpu_sum)


@gpu
@pytest.mark.parametrize("count", [1, 3, 1500])  # 1500 pieces: two launches
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8])
def test_pack_unpack_round_trip(count, dtype):
    g = torch.Generator().manual_seed(count)
    sizes = torch.randint(1, 5000, (count,), generator=g).tolist()
    tensors = [_random(s, dtype, g) for s in sizes]
    flat = _poisoned(torch.empty(sum(sizes), dtype=dtype, device="cuda"))
    K.pack(tensors, out=flat)
    assert torch.equal(flat.cpu(), torch.cat([t.cpu() for t in tensors]))
    back = [_poisoned(t) for t in tensors]
    K.unpack(flat, back)
    for t, b in zip(tensors, back):
        assert torch.equal(t.cpu(), b.cpu())


@gpu
def test_kernels_follow_the_current_stream():
    # Work queued on a side stream before compress must be visible to it, without a
    # host synchronisation in between.
    side = torch.cuda.Stream()
    x = torch.empty(1 << 22, device="cuda")
    with torch.cuda.stream(side):
        torch.cuda._sleep(20_000_000)  # keeps the stream busy: the fill must wait for it
        x.fill_(3.0)
        wire = K.compress(x, "fp16")
        out = K.decompress(wire, x.numel(), "fp16")
    side.synchronize()
    assert bool((out == 3.0).all())


@gpu
def test_mixed_devices_and_builds_without_cuda_are_named(monkeypatch):
    with pytest.raises(ValueError, match="out is on cpu, but the other tensors are on cuda:0"):
        K.compress(torch.ones(4, device="cuda"), "fp16", out=torch.empty(K.compressed_nbytes(4), dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"tensors\[1\] is on cpu, but the other tensors are on cuda:0"):
        K.pack([torch.ones(2, device="cuda"), torch.ones(2)])
    real = _C.build_info

    def no_cuda():
        info = real()
        info["cuda"] = False
        return info

    monkeypatch.setattr(_C, "build_info", no_cuda)
    with pytest.raises(RuntimeError, match="this ringcc build has no CUDA kernels"):
        K.compress(torch.ones(4, device="cuda"), "fp16")
