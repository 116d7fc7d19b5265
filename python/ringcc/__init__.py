"""ringcc: collective communication over shared memory and TCP, with a native core.

    import ringcc
    comm = ringcc.Communicator(store, rank, world_size)
    comm.allreduce(array)            # in place, sum over all ranks
"""

from ._native import _C
from .comm import Communicator, Work

__version__ = _C.build_info()["version"]

Error = _C.Error
TimeoutError = _C.TimeoutError  # noqa: A001 - subclass of the builtin TimeoutError
PeerError = _C.PeerError
MismatchError = _C.MismatchError
AbortedError = _C.AbortedError


def _register_torch_backend() -> bool:
    """Make "ringcc" a torch.distributed backend when torch is installed (idempotent)."""
    try:
        import torch.distributed  # noqa: F401
    except ImportError:
        return False
    from . import torch_backend

    torch_backend.register()
    return True


_register_torch_backend()


def __getattr__(name: str):
    # The torch-based tools load on first use, so `import ringcc` works without torch.
    if name == "DistributedDataParallel":
        from .ddp import DistributedDataParallel

        return DistributedDataParallel
    if name == "Trainer":
        from .trainer import Trainer

        return Trainer
    if name in ("ddp", "hooks", "timeline", "kernels", "trainer", "ps"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ringcc' has no attribute {name!r}")


def info() -> dict:
    """Version and build options of the installed native core."""
    return dict(_C.build_info())


__all__ = [
    "Communicator",
    "Work",
    "Error",
    "TimeoutError",
    "PeerError",
    "MismatchError",
    "AbortedError",
    "info",
    "DistributedDataParallel",
    "Trainer",
    "__version__",
]
