"""Gradient compression and bucketing kernels on CPU torch tensors.

Compression turns float32 values into the "block-scaled half" wire format of the native
core: per block of 256 values one float32 power-of-two inverse scale, then one 16-bit
value (float16 or bfloat16) per element. The scale puts each block's largest magnitude
in [2^14, 2^15) before rounding, so the error is at most 2^-11 (fp16) or 2^-8 (bf16) of
that block's largest magnitude, and no value overflows or flushes to zero for being far
outside float16's range. Blocks holding inf or NaN are carried unscaled.

Every function validates its arguments (torch tensors, all on the CPU or all on one CUDA
device, contiguous, of the right dtype and size, not overlapping where that matters) and
raises TypeError or ValueError naming what is wrong. On the CPU the work runs in one
native call without the GIL. On a GPU it is enqueued on the device's current CUDA stream
(one launch; pack/unpack one per 1024 tensors) and the call returns at once, so it is
ordered with the caller's other work on that stream like any torch operation; a build
without CUDA kernels raises RuntimeError for CUDA tensors. Functions documented as in
place write into the given tensors' memory directly: autograd does not see these writes.

Bit-for-bit, the wire bytes do not depend on the CPU's instruction set or on whether a
GPU made them (ranks of one job may run on different machines).
"""

from __future__ import annotations

import itertools
import math
import numbers
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from ._native import _C

if TYPE_CHECKING:  # torch is imported on first use: ringcc itself does not need it
    import torch

__all__ = [
    "BLOCK",
    "COMPRESSIONS",
    "compressed_nbytes",
    "compress",
    "decompress",
    "error_feedback",
    "round_trip",
    "decompress_add_compress",
    "pack",
    "unpack",
]

BLOCK = 256  # elements per block, one scale each
_WIRE = {"fp16": _C.DataType.float16, "bf16": _C.DataType.bfloat16}
COMPRESSIONS = tuple(_WIRE)


_torch_module = None


def _torch():
    global _torch_module
    if _torch_module is None:
        import torch

        _torch_module = torch
    return _torch_module


# ---- validation ---------------------------------------------------------------------


def _wire_type(compression) -> "_C.DataType":
    if not isinstance(compression, str) or compression not in _WIRE:
        raise ValueError(f"compression must be one of {', '.join(map(repr, COMPRESSIONS))}, "
                         f"got {compression!r}")
    return _WIRE[compression]


def _count(numel, what: str = "numel") -> int:
    if type(numel) is int and numel >= 0:  # the common case, without the ABC checks
        return numel
    if isinstance(numel, bool) or not isinstance(numel, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {type(numel).__name__}")
    if numel < 0:
        raise ValueError(f"{what} must be >= 0, got {numel}")
    return int(numel)


_ANY = object()  # _tensor(device=_ANY): the CPU or any CUDA device


def _where(t) -> Optional[int]:
    """None for a CPU tensor, else the index of its CUDA device (already checked)."""
    return None if t.is_cpu else t.device.index


def _describe(device: Optional[int]) -> str:
    return "cpu" if device is None else f"cuda:{device}"


# Checks are ordered and written for speed (is_cpu, not device.type): pack() runs them
# for every tensor of a bucket, and they cost more than copying a small tensor.
def _tensor(t, what: str, dtype=None, device=_ANY) -> "torch.Tensor":
    """Checks `t`; `device` is _ANY (CPU or CUDA), None (CPU) or a CUDA device index."""
    if not isinstance(t, _torch().Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{what} must have dtype {dtype}, got {t.dtype}")
    if not t.is_cpu:
        if not t.is_cuda:
            raise ValueError(f"{what} must be on the CPU or a CUDA device, got device {t.device}")
        if not _C.build_info()["cuda"]:
            raise RuntimeError(f"{what} is on {t.device}, but this ringcc build has no CUDA kernels (no CUDA "
                               f"compiler was found when it was built); rebuild with nvcc on the PATH, or "
                               f"move the tensor to the CPU")
    if device is not _ANY and _where(t) != device:
        raise ValueError(f"{what} is on {t.device}, but the other tensors are on {_describe(device)}")
    if not t.is_contiguous():
        raise ValueError(f"{what} must be contiguous (call .contiguous() first)")
    if t.is_complex() and t.is_conj():
        raise ValueError(f"{what} is a lazy conjugate view; call .resolve_conj() first")
    return t


def _span(t) -> tuple:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _overlap(a, b) -> bool:
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < a1 and b0 < b1 and a0 < b1 and b0 < a1


def _check_disjoint(a, a_what: str, b, b_what: str) -> None:
    if _overlap(a, b):
        raise ValueError(f"{a_what} and {b_what} overlap in memory")


def _run(device: Optional[int], cpu_fn, cuda_fn, *args) -> None:
    """Runs the CPU kernel, or enqueues the CUDA one on `device`'s current stream (with
    `device` current while it is launched; the caller's current device is restored)."""
    if device is None:
        cpu_fn(*args)
        return
    torch = _torch()
    with torch.cuda.device(device):
        cuda_fn(*args, torch.cuda.current_stream(device).cuda_stream)


# ---- compression --------------------------------------------------------------------


def compressed_nbytes(numel: int) -> int:
    """Size in bytes of the wire format for `numel` values."""
    return _C._compressed_bytes(_count(numel))


def compress(x: "torch.Tensor", compression: str, prescale: float = 1.0, *,
             out: Optional["torch.Tensor"] = None) -> "torch.Tensor":
    """Encode the float32 tensor `x` (multiplied by `prescale` in fp32 first).

    Returns a uint8 tensor of compressed_nbytes(x.numel()) bytes; `out`, if given, must be
    such a tensor (not overlapping `x`) and is filled and returned.
    """
    torch = _torch()
    wire_type = _wire_type(compression)
    x = _tensor(x, "x", torch.float32)
    device = _where(x)
    if type(prescale) is not float and (isinstance(prescale, bool) or not isinstance(prescale, numbers.Real)):
        raise TypeError(f"prescale must be a real number, got {type(prescale).__name__}")
    if not math.isfinite(prescale):
        raise ValueError(f"prescale must be finite, got {prescale}")
    nbytes = compressed_nbytes(x.numel())
    if out is None:
        out = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    else:
        out = _tensor(out, "out", torch.uint8, device)
        if out.numel() != nbytes:
            raise ValueError(f"out has {out.numel()} bytes; {x.numel()} values compress to {nbytes}")
        _check_disjoint(x, "x", out, "out")
    _run(device, _C._compress, getattr(_C, "_cuda_compress", None), out.data_ptr(), x.data_ptr(), x.numel(),
         wire_type, float(prescale))
    return out


def decompress(wire: "torch.Tensor", numel: int, compression: str,
               out: Optional["torch.Tensor"] = None, accumulate: bool = False) -> "torch.Tensor":
    """Decode `numel` float32 values from the uint8 tensor `wire`.

    Without `out`, returns a new 1-D tensor. With `out` (float32, `numel` elements, any
    shape), writes into it in place and returns it: out = decoded, or with
    accumulate=True out += decoded (the add in fp32).
    """
    torch = _torch()
    wire_type = _wire_type(compression)
    numel = _count(numel)
    wire = _tensor(wire, "wire", torch.uint8)
    device = _where(wire)
    nbytes = compressed_nbytes(numel)
    if wire.numel() != nbytes:
        raise ValueError(f"wire has {wire.numel()} bytes; {numel} compressed values take {nbytes}")
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs `out` (the tensor to add into)")
        out = torch.empty(numel, dtype=torch.float32, device=wire.device)
    else:
        out = _tensor(out, "out", torch.float32, device)
        if out.numel() != numel:
            raise ValueError(f"out has {out.numel()} elements, expected numel={numel}")
        _check_disjoint(wire, "wire", out, "out")
    _run(device, _C._decompress, getattr(_C, "_cuda_decompress", None), out.data_ptr(), wire.data_ptr(), numel,
         wire_type, bool(accumulate))
    return out


def error_feedback(x: "torch.Tensor", residual: "torch.Tensor", compression: str) -> "torch.Tensor":
    """Error feedback in place, one pass: y = x + residual; x <- what the wire carries of
    y (decode(encode(y))); residual <- y - x. Both float32, same shape, disjoint.

    Compressing the new x loses nothing more; the rounding error waits in `residual` for
    the next step. Returns x.
    """
    torch = _torch()
    wire_type = _wire_type(compression)
    x = _tensor(x, "x", torch.float32)
    device = _where(x)
    residual = _tensor(residual, "residual", torch.float32, device)
    if x.shape != residual.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but residual has shape {tuple(residual.shape)}")
    _check_disjoint(x, "x", residual, "residual")
    _run(device, _C._error_feedback, getattr(_C, "_cuda_error_feedback", None), x.data_ptr(), residual.data_ptr(),
         x.numel(), wire_type)
    return x


def round_trip(x: "torch.Tensor", compression: str) -> "torch.Tensor":
    """In place: x <- decode(encode(x)), the values a receiver of x would hold. Returns x."""
    torch = _torch()
    wire_type = _wire_type(compression)
    x = _tensor(x, "x", torch.float32)
    _run(_where(x), _C._round_trip, getattr(_C, "_cuda_round_trip", None), x.data_ptr(), x.numel(), wire_type)
    return x


def decompress_add_compress(wire_in: "torch.Tensor", local: "torch.Tensor", compression: str, *,
                            out: Optional["torch.Tensor"] = None,
                            sum_out: Optional["torch.Tensor"] = None) -> "torch.Tensor":
    """One step of the compressed ring: y = local + decode(wire_in) in fp32, returns
    encode(y) (into `out` if given, which may be `wire_in` itself). With `sum_out`
    (float32, like `local`), also writes decode(encode(y)) there: the values every rank
    ends up holding. On a GPU this is one fused kernel; on the CPU, three passes.
    """
    torch = _torch()
    wire_type = _wire_type(compression)
    local = _tensor(local, "local", torch.float32)
    device = _where(local)
    numel = local.numel()
    nbytes = compressed_nbytes(numel)
    wire_in = _tensor(wire_in, "wire_in", torch.uint8, device)
    if wire_in.numel() != nbytes:
        raise ValueError(f"wire_in has {wire_in.numel()} bytes; {numel} compressed values take {nbytes}")
    _check_disjoint(wire_in, "wire_in", local, "local")
    if out is None:
        out = torch.empty(nbytes, dtype=torch.uint8, device=local.device)
    else:
        out = _tensor(out, "out", torch.uint8, device)
        if out.numel() != nbytes:
            raise ValueError(f"out has {out.numel()} bytes; {numel} values compress to {nbytes}")
        _check_disjoint(out, "out", local, "local")
        if out.data_ptr() != wire_in.data_ptr():
            _check_disjoint(out, "out", wire_in, "wire_in")
    if sum_out is not None:
        sum_out = _tensor(sum_out, "sum_out", torch.float32, device)
        if sum_out.numel() != numel:
            raise ValueError(f"sum_out has {sum_out.numel()} elements, expected {numel} (like local)")
        for other, name in ((local, "local"), (wire_in, "wire_in"), (out, "out")):
            _check_disjoint(sum_out, "sum_out", other, name)
    if device is not None:
        _run(device, None, _C._cuda_decompress_add_compress, out.data_ptr(), wire_in.data_ptr(), local.data_ptr(),
             0 if sum_out is None else sum_out.data_ptr(), numel, wire_type)
        return out
    y = local.clone()
    _C._decompress(y.data_ptr(), wire_in.data_ptr(), numel, wire_type, True)
    _C._compress(out.data_ptr(), y.data_ptr(), numel, wire_type, 1.0)
    if sum_out is not None:
        _C._decompress(sum_out.data_ptr(), out.data_ptr(), numel, wire_type, False)
    return out


# ---- bucketing ----------------------------------------------------------------------


def _pieces(tensors, what: str) -> tuple:
    """Validate `tensors` (one dtype, one device, contiguous). Returns (dtype, device,
    data pointers, byte offsets in the flat buffer, byte sizes, total numel)."""
    torch = _torch()
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{what} must be a list or tuple of tensors, got {type(tensors).__name__}")
    if len(tensors) == 0:
        raise ValueError(f"{what} is empty")
    Tensor = torch.Tensor
    first = _tensor(tensors[0], f"{what}[0]")
    dtype, device = first.dtype, _where(first)
    # A bucket may hold thousands of small tensors: one pass of cheap checks, and only
    # when it fails the slow loop that finds and names the culprit.
    if device is None:
        fine = all(isinstance(t, Tensor) and t.dtype == dtype and t.is_cpu and t.is_contiguous()
                   and not (t.is_complex() and t.is_conj()) for t in tensors)
    else:
        fine = all(isinstance(t, Tensor) and t.dtype == dtype and t.is_cuda and t.get_device() == device
                   and t.is_contiguous() and not (t.is_complex() and t.is_conj()) for t in tensors)
    if not fine:
        for i, t in enumerate(tensors):
            _tensor(t, f"{what}[{i}]", None, device)
            if t.dtype != dtype:
                raise TypeError(f"{what}[{i}] has dtype {t.dtype}, but {what}[0] has {dtype} (all must match)")
    ptrs = [t.data_ptr() for t in tensors]
    nbytes = [t.nbytes for t in tensors]
    offsets = list(itertools.accumulate(nbytes, initial=0))
    total = offsets.pop()
    return dtype, device, ptrs, offsets, nbytes, total // tensors[0].element_size()


def _check_pieces_disjoint(ptrs, nbytes, flat, flat_what: str, what: str, each_other: bool) -> None:
    """No piece overlaps `flat`; with each_other, no two pieces overlap (unpack writes them)."""
    p = np.asarray(ptrs, dtype=np.uint64)
    end = p + np.asarray(nbytes, dtype=np.uint64)
    live = end > p  # empty pieces touch nothing
    f0, f1 = _span(flat)
    hit = np.flatnonzero(live & (p < f1) & (f0 < end))
    if f0 < f1 and hit.size:
        raise ValueError(f"{what}[{hit[0]}] and {flat_what} overlap in memory")
    if each_other:
        idx = np.flatnonzero(live)
        idx = idx[np.argsort(p[idx], kind="stable")]
        # Sorted by start, any overlap shows up between neighbours.
        bad = np.flatnonzero(p[idx[1:]] < end[idx[:-1]])
        if bad.size:
            i, j = sorted((int(idx[bad[0]]), int(idx[bad[0] + 1])))
            raise ValueError(f"{what}[{i}] and {what}[{j}] overlap in memory")


def _check_flat(flat, what: str, dtype, device, numel: int) -> "torch.Tensor":
    flat = _tensor(flat, what, None, device)
    if flat.dtype != dtype:
        raise TypeError(f"{what} has dtype {flat.dtype}, but the tensors have {dtype}")
    if flat.numel() != numel:
        raise ValueError(f"{what} has {flat.numel()} elements, but the tensors hold {numel} in all")
    return flat


def pack(tensors: Sequence["torch.Tensor"], out: Optional["torch.Tensor"] = None) -> "torch.Tensor":
    """Copy `tensors` (one dtype, one device, contiguous) back to back into one flat tensor.

    Returns a new 1-D tensor of their total numel, or fills and returns `out` (same dtype
    and total numel, not overlapping any of them).
    """
    torch = _torch()
    dtype, device, ptrs, offsets, nbytes, numel = _pieces(tensors, "tensors")
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=tensors[0].device)
    else:
        out = _check_flat(out, "out", dtype, device, numel)
        _check_pieces_disjoint(ptrs, nbytes, out, "out", "tensors", each_other=False)
    _run(device, _C._pack, getattr(_C, "_cuda_pack", None), out.data_ptr(), ptrs, offsets, nbytes)
    return out


def unpack(flat: "torch.Tensor", tensors: Sequence["torch.Tensor"]) -> Sequence["torch.Tensor"]:
    """The inverse of pack(), in place: copy consecutive pieces of `flat` into each of
    `tensors` (shapes kept). The tensors must not overlap `flat` or each other. Returns
    `tensors`.
    """
    dtype, device, ptrs, offsets, nbytes, numel = _pieces(tensors, "tensors")
    flat = _check_flat(flat, "flat", dtype, device, numel)
    _check_pieces_disjoint(ptrs, nbytes, flat, "flat", "tensors", each_other=True)
    _run(device, _C._unpack, getattr(_C, "_cuda_unpack", None), flat.data_ptr(), ptrs, offsets, nbytes)
    return tensors
