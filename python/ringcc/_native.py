"""Import of the private native module, with an error that says what to do."""

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "ringcc's native module (ringcc._C) could not be loaded: "
        f"{exc}. Reinstall with `pip install .` from the source tree (needs a C++17 "
        "compiler and CMake), and make sure you are not importing ringcc from the source "
        "directory, whose python/ringcc has no compiled module."
    ) from exc

__all__ = ["_C"]
