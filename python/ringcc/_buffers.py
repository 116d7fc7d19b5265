"""Turning user arrays (NumPy, CPU torch tensors, DLPack / buffer-protocol objects)
into what the native core takes: a data pointer, a byte count and a dtype code.

No data is copied here; outputs must be the caller's memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._native import _C

DT = _C.DataType

_NUMPY_DTYPES = {
    "float16": DT.float16,
    "bfloat16": DT.bfloat16,  # ml_dtypes.bfloat16 arrays
    "float32": DT.float32,
    "float64": DT.float64,
    "int8": DT.int8,
    "uint8": DT.uint8,
    "int32": DT.int32,
    "int64": DT.int64,
    "bool": DT.bool,
}
# Complex numbers travel as pairs of reals: sum and avg act on each part independently.
_COMPLEX_AS = {"complex64": DT.float32, "complex128": DT.float64}

SUPPORTED = ", ".join(list(_NUMPY_DTYPES) + list(_COMPLEX_AS))


@dataclass
class Buffer:
    obj: Any  # the user's object, kept alive while the native side uses it
    ptr: int
    nbytes: int
    dtype: Any  # _C.DataType
    count: int  # elements of `dtype` (complex counts twice)
    is_complex: bool
    dtype_name: str
    library: str  # "torch" | "numpy"


def _torch():
    import sys

    return sys.modules.get("torch")


def as_buffer(obj: Any, what: str, *, writable: bool = False) -> Buffer:
    """Describe `obj` for the native core; `what` names it in errors."""
    torch = _torch()
    if torch is not None and isinstance(obj, torch.Tensor):
        return _from_torch(obj, what, torch)
    if isinstance(obj, np.ndarray):
        arr = obj
    elif hasattr(obj, "__dlpack__"):
        arr = np.from_dlpack(obj)
    else:
        try:
            arr = np.asarray(memoryview(obj))
        except TypeError:
            raise TypeError(
                f"{what}: expected a NumPy array, a CPU torch.Tensor or an object with the "
                f"buffer protocol or __dlpack__, got {type(obj).__name__}"
            ) from None
    return _from_numpy(arr, obj, what, writable)


def _dtype_code(name: str, what: str):
    if name in _NUMPY_DTYPES:
        return _NUMPY_DTYPES[name], False
    if name in _COMPLEX_AS:
        return _COMPLEX_AS[name], True
    raise TypeError(f"{what}: dtype {name} is not supported (supported: {SUPPORTED})")


_NUMPY_CACHE: dict = {}  # np.dtype -> (code, is_complex, name); dtype.name alone costs microseconds


def _from_numpy(arr: np.ndarray, obj: Any, what: str, writable: bool) -> Buffer:
    hit = _NUMPY_CACHE.get(arr.dtype)
    if hit is None:
        name = arr.dtype.name
        code, is_complex = _dtype_code(name, what)
        hit = _NUMPY_CACHE[arr.dtype] = (code, is_complex, name)
    code, is_complex, name = hit
    if not arr.flags.c_contiguous:
        raise ValueError(
            f"{what}: array is not C-contiguous (shape {arr.shape}, strides {arr.strides}); "
            "pass np.ascontiguousarray(x) or a contiguous output"
        )
    if writable and not arr.flags.writeable:
        raise ValueError(f"{what}: array is read-only but ringcc must write into it")
    ptr, nbytes, _ = _C.buffer_info(arr) if arr.nbytes else (0, 0, True)
    count = arr.size * (2 if is_complex else 1)
    return Buffer(obj, ptr, nbytes, code, count, is_complex, name, "numpy")


def _from_torch(t, what: str, torch) -> Buffer:
    if t.device.type != "cpu":
        raise TypeError(
            f"{what}: tensor is on {t.device}, but this ringcc build handles CPU tensors only "
            "(the CUDA data path is not built)"
        )
    name = str(t.dtype).replace("torch.", "")
    code, is_complex = _dtype_code(name, what)
    if not t.is_contiguous():
        raise ValueError(
            f"{what}: tensor is not contiguous (shape {tuple(t.shape)}, stride {t.stride()}); "
            "pass x.contiguous()"
        )
    count = t.numel() * (2 if is_complex else 1)
    return Buffer(t, t.data_ptr(), t.numel() * t.element_size(), code, count, is_complex, name, "torch")


def new_output(ref: Buffer, shape):
    """A new array of the same library and dtype as `ref`."""
    if ref.library == "torch":
        return _torch().empty(shape, dtype=ref.obj.dtype)
    return np.empty(shape, dtype=np.dtype(ref.dtype_name) if ref.dtype_name != "bfloat16" else ref.obj.dtype)


def same_dtype(a: Buffer, b: Buffer, op_name: str) -> None:
    if a.dtype_name != b.dtype_name:
        raise TypeError(f"{op_name}: input has dtype {a.dtype_name} but output has dtype {b.dtype_name}")
