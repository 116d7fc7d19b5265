"""Gradient compression and bucketing kernels on CPU torch tensors.

Compression turns float32 values into the "block-scaled half" wire format of the native
core: per block of 256 values one float32 power-of-two inverse scale, then one 16-bit
value (float16 or bfloat16) per element. The scale puts each block's largest magnitude
in [2^14, 2^15) before rounding, so the error is at most 2^-11 (fp16) or 2^-8 (bf16) of
that block's largest magnitude, and no value overflows or flushes to zero for being far
outside float16's range. Blocks holding inf or NaN are carried unscaled.

Every function validates its arguments (torch tensors, on the CPU, contiguous, of the
right dtype and size, not overlapping where that matters) and raises TypeError or
ValueError naming what is wrong. The work itself runs in one native call without the
GIL. Functions documented as in place write into the given tensors' memory directly:
autograd does not see these writes.

Bit-for-bit, the wire bytes do not depend on the CPU's instruction set (ranks of one
job may run on different machines).
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


# Checks are ordered and written for speed (is_cpu, not device.type): pack() runs them
# for every tensor of a bucket, and they cost more than copying a small tensor.
def _tensor(t, what: str, dtype=None) -> "torch.Tensor":
    if not isinstance(t, _torch().Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{what} must have dtype {dtype}, got {t.dtype}")
    if not t.is_cpu:
        raise ValueError(f"{what} must be on the CPU, got device {t.device}")
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
    if type(prescale) is not float and (isinstance(prescale, bool) or not isinstance(prescale, numbers.Real)):
        raise TypeError(f"prescale must be a real number, got {type(prescale).__name__}")
    if not math.isfinite(prescale):
        raise ValueError(f"prescale must be finite, got {prescale}")
    nbytes = compressed_nbytes(x.numel())
    if out is None:
        out = torch.empty(nbytes, dtype=torch.uint8)
    else:
        out = _tensor(out, "out", torch.uint8)
        if out.numel() != nbytes:
            raise ValueError(f"out has {out.numel()} bytes; {x.numel()} values compress to {nbytes}")
        _check_disjoint(x, "x", out, "out")
    _C._compress(out.data_ptr(), x.data_ptr(), x.numel(), wire_type, float(prescale))
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
    nbytes = compressed_nbytes(numel)
    if wire.numel() != nbytes:
        raise ValueError(f"wire has {wire.numel()} bytes; {numel} compressed values take {nbytes}")
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs `out` (the tensor to add into)")
        out = torch.empty(numel, dtype=torch.float32)
    else:
        out = _tensor(out, "out", torch.float32)
        if out.numel() != numel:
            raise ValueError(f"out has {out.numel()} elements, expected numel={numel}")
        _check_disjoint(wire, "wire", out, "out")
    _C._decompress(out.data_ptr(), wire.data_ptr(), numel, wire_type, bool(accumulate))
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
    residual = _tensor(residual, "residual", torch.float32)
    if x.shape != residual.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but residual has shape {tuple(residual.shape)}")
    _check_disjoint(x, "x", residual, "residual")
    _C._error_feedback(x.data_ptr(), residual.data_ptr(), x.numel(), wire_type)
    return x


def round_trip(x: "torch.Tensor", compression: str) -> "torch.Tensor":
    """In place: x <- decode(encode(x)), the values a receiver of x would hold. Returns x."""
    torch = _torch()
    wire_type = _wire_type(compression)
    x = _tensor(x, "x", torch.float32)
    _C._round_trip(x.data_ptr(), x.numel(), wire_type)
    return x


# ---- bucketing ----------------------------------------------------------------------


def _pieces(tensors, what: str) -> tuple:
    """Validate `tensors` (one dtype, CPU, contiguous). Returns (dtype, data pointers,
    byte offsets in the flat buffer, byte sizes, total numel)."""
    torch = _torch()
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{what} must be a list or tuple of tensors, got {type(tensors).__name__}")
    if len(tensors) == 0:
        raise ValueError(f"{what} is empty")
    Tensor = torch.Tensor
    dtype = getattr(tensors[0], "dtype", None)
    # A bucket may hold thousands of small tensors: one pass of cheap checks, and only
    # when it fails the slow loop that finds and names the culprit.
    if not all(isinstance(t, Tensor) and t.dtype == dtype and t.is_cpu and t.is_contiguous()
               and not (t.is_complex() and t.is_conj()) for t in tensors):
        for i, t in enumerate(tensors):
            _tensor(t, f"{what}[{i}]")
            if t.dtype != dtype:
                raise TypeError(f"{what}[{i}] has dtype {t.dtype}, but {what}[0] has {dtype} (all must match)")
    ptrs = [t.data_ptr() for t in tensors]
    nbytes = [t.nbytes for t in tensors]
    offsets = list(itertools.accumulate(nbytes, initial=0))
    total = offsets.pop()
    return dtype, ptrs, offsets, nbytes, total // tensors[0].element_size()


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


def _check_flat(flat, what: str, dtype, numel: int) -> "torch.Tensor":
    flat = _tensor(flat, what)
    if flat.dtype != dtype:
        raise TypeError(f"{what} has dtype {flat.dtype}, but the tensors have {dtype}")
    if flat.numel() != numel:
        raise ValueError(f"{what} has {flat.numel()} elements, but the tensors hold {numel} in all")
    return flat


def pack(tensors: Sequence["torch.Tensor"], out: Optional["torch.Tensor"] = None) -> "torch.Tensor":
    """Copy `tensors` (one dtype, CPU, contiguous) back to back into one flat tensor.

    Returns a new 1-D tensor of their total numel, or fills and returns `out` (same dtype
    and total numel, not overlapping any of them).
    """
    torch = _torch()
    dtype, ptrs, offsets, nbytes, numel = _pieces(tensors, "tensors")
    if out is None:
        out = torch.empty(numel, dtype=dtype)
    else:
        out = _check_flat(out, "out", dtype, numel)
        _check_pieces_disjoint(ptrs, nbytes, out, "out", "tensors", each_other=False)
    _C._pack(out.data_ptr(), ptrs, offsets, nbytes)
    return out


def unpack(flat: "torch.Tensor", tensors: Sequence["torch.Tensor"]) -> Sequence["torch.Tensor"]:
    """The inverse of pack(), in place: copy consecutive pieces of `flat` into each of
    `tensors` (shapes kept). The tensors must not overlap `flat` or each other. Returns
    `tensors`.
    """
    dtype, ptrs, offsets, nbytes, numel = _pieces(tensors, "tensors")
    flat = _check_flat(flat, "flat", dtype, numel)
    _check_pieces_disjoint(ptrs, nbytes, flat, "flat", "tensors", each_other=True)
    _C._unpack(flat.data_ptr(), ptrs, offsets, nbytes)
    return tensors
