"""Buffers with guard bytes on both sides, to catch writes outside an output."""

from __future__ import annotations

import numpy as np
import torch

GUARD = 64
PATTERN = 0xA5


class Guarded:
    def __init__(self, dtype: str, count: int):
        self.dtype = dtype
        if dtype == "bfloat16":
            nbytes = count * 2
            self.raw = torch.full((nbytes + 2 * GUARD,), PATTERN, dtype=torch.uint8)
            self.array = self.raw[GUARD:GUARD + nbytes].view(torch.bfloat16)
        else:
            nbytes = count * np.dtype(dtype).itemsize
            self.raw = np.full(nbytes + 2 * GUARD, PATTERN, dtype=np.uint8)
            self.array = self.raw[GUARD:GUARD + nbytes].view(dtype)
        self.nbytes = nbytes

    def fill_from(self, values) -> "Guarded":
        self.array[...] = values
        return self

    def assert_guards_intact(self) -> None:
        raw = self.raw.numpy() if isinstance(self.raw, torch.Tensor) else self.raw
        head, tail = raw[:GUARD], raw[GUARD + self.nbytes:]
        assert (head == PATTERN).all() and (tail == PATTERN).all(), "bytes outside the output were overwritten"

    def bytes(self) -> bytes:
        raw = self.raw.numpy() if isinstance(self.raw, torch.Tensor) else self.raw
        return raw[GUARD:GUARD + self.nbytes].tobytes()
