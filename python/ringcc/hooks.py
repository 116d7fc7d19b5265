"""Gradient-compression communication hooks for torch's DistributedDataParallel.

    import ringcc.hooks
    ddp = torch.nn.parallel.DistributedDataParallel(model)          # on a "ringcc" group
    ddp.register_comm_hook(None, ringcc.hooks.fp16_compress_hook)   # or bf16_compress_hook
    # with error feedback (a residual per bucket carries each step's rounding error over):
    ddp.register_comm_hook(ringcc.hooks.ErrorFeedbackState(), ringcc.hooks.fp16_compress_hook)

``state`` is None (the default group), a process group, or an ErrorFeedbackState.

On a ringcc group the bucket goes through the native compressed allreduce,
``RingccProcessGroup.allreduce_compressed(buffer, "fp16"|"bf16", op="avg")``: block-
scaled 16-bit values on the wire, fp32 accumulation, so only the wire rounding is lost.

On any other group (gloo, ...) the hooks fall back to what torch's own compress hooks
do: scale the fp32 bucket by 1/world first, cast it to fp16/bf16, allreduce (sum) the
16-bit tensor, cast back. That path also rounds every partial sum to 16 bits and fp16
can overflow/underflow for gradients outside its range, so expect larger errors there.

The same hooks also work with ``ringcc.DistributedDataParallel.register_comm_hook``.
"""

# No ``from __future__ import annotations``: torch's register_comm_hook compares the
# hook's annotations with the real dist.GradBucket / Future[Tensor] objects.

from typing import Any, Dict

import torch
import torch.distributed as dist

from . import kernels as _kernels

_WIRE = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _default_group() -> Any:
    return dist.distributed_c10d._get_default_group()


def is_ringcc_group(group: Any) -> bool:
    """Whether ``group`` is a ringcc process group (the torch backend's own class)."""
    from .torch_backend import RingccProcessGroup

    return isinstance(group, RingccProcessGroup)


def wire_dtype(compression: str) -> torch.dtype:
    try:
        return _WIRE[compression]
    except KeyError:
        raise ValueError(f"ringcc: compression must be one of {sorted(_WIRE)}, got {compression!r}") from None


def error_feedback_(x: torch.Tensor, residual: torch.Tensor, compression: str, native: bool = True) -> None:
    """In place: y = x + residual; x <- what the wire carries of y; residual <- y - x.

    ``native``: the wire is ringcc's block-scaled format (``ringcc.kernels.error_feedback``,
    one pass); otherwise a plain cast to fp16/bf16, what the fallback allreduce sends."""
    if native:
        _kernels.error_feedback(x, residual, compression)
        return
    with torch.no_grad():
        y = x.add_(residual)  # x now holds y
        rounded = y.to(wire_dtype(compression)).to(x.dtype)
        residual.copy_(y).sub_(rounded)
        x.copy_(rounded)


def _value_into(buffer: torch.Tensor, value: Any) -> torch.Tensor:
    """The result of a Work's future (a tensor or list of them) as ``buffer``."""
    result = value[0] if isinstance(value, (list, tuple)) else value
    if result is not buffer:
        buffer.copy_(result)
    return buffer


def compressed_allreduce(buffer: torch.Tensor, compression: str, group: Any = None) -> torch.futures.Future:
    """Average ``buffer`` (fp32) over ``group`` with a 16-bit wire; returns a Future
    whose value is ``buffer`` holding the average. Native on a ringcc group, else the
    cast fallback described in the module docstring."""
    group = _default_group() if group is None else group
    dtype = wire_dtype(compression)
    if buffer.dtype == torch.float32 and is_ringcc_group(group):
        work = group.allreduce_compressed(buffer, compression, op="avg", async_op=True)
        return work.get_future().then(lambda fut: _value_into(buffer, fut.value()))
    # Fallback: divide in full precision first, so the 16-bit sum cannot overflow from
    # the world size alone.
    with torch.no_grad():
        half = buffer.div(group.size()).to(dtype)
    fut = dist.all_reduce(half, group=group, async_op=True).get_future()

    def decompress(fut: torch.futures.Future) -> torch.Tensor:
        return _value_into(buffer, fut.value()[0].to(buffer.dtype))

    return fut.then(decompress)


class ErrorFeedbackState:
    """Hook state for error feedback: the group and one fp32 residual per bucket index.

    Before each compressed allreduce the bucket's residual is added to its gradients and
    the new rounding error is stored (``error_feedback_``), so nothing is lost for good,
    only delayed by a step. A residual is reset to zeros when its bucket's size changes
    (torch DDP rebuilds its buckets after the first iteration)."""

    def __init__(self, process_group: Any = None):
        self.process_group = process_group
        self.residuals: Dict[int, torch.Tensor] = {}

    def group(self) -> Any:
        return _default_group() if self.process_group is None else self.process_group

    def residual(self, index: int, like: torch.Tensor) -> torch.Tensor:
        r = self.residuals.get(index)
        if r is None or r.numel() != like.numel() or r.dtype != like.dtype:
            r = self.residuals[index] = torch.zeros_like(like)
        return r


def _hook(state: Any, bucket: Any, compression: str) -> torch.futures.Future:
    buffer = bucket.buffer()
    group = state.group() if isinstance(state, ErrorFeedbackState) else state
    group = _default_group() if group is None else group
    if isinstance(state, ErrorFeedbackState):
        native = buffer.dtype == torch.float32 and is_ringcc_group(group)
        error_feedback_(buffer, state.residual(bucket.index(), buffer), compression, native)
    return compressed_allreduce(buffer, compression, group)


def fp16_compress_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket over the group with an fp16 wire (see the module docstring).
    ``state``: None (default group), a process group, or an ErrorFeedbackState."""
    return _hook(state, bucket, "fp16")


def bf16_compress_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket over the group with a bf16 wire (see the module docstring).
    ``state``: None (default group), a process group, or an ErrorFeedbackState."""
    return _hook(state, bucket, "bf16")


# torch's DDP.register_comm_hook refuses any hook whose __name__ is "bf16_compress_hook"
# unless CUDA with NCCL >= 2.10 is present (a guard for its own NCCL hook); this one runs
# on CPU groups, so it carries a name of its own.
bf16_compress_hook.__name__ = bf16_compress_hook.__qualname__ = "ringcc_bf16_compress_hook"

__all__ = ["fp16_compress_hook", "bf16_compress_hook", "ErrorFeedbackState", "compressed_allreduce",
           "error_feedback_"]
