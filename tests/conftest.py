"""Shared helpers: run N ranks as threads over the real transports."""

from __future__ import annotations

import itertools
import threading
from typing import Any, Callable, List, Optional

import pytest

import ringcc

TRANSPORTS = ["shm", "tcp"]
_names = itertools.count()


class MemoryStore:
    """A minimal in-process store with only set/get: the 'any object with set/get' case."""

    def __init__(self) -> None:
        self._data: dict = {}
        self._lock = threading.Lock()

    def set(self, key: str, value: bytes) -> None:
        with self._lock:
            self._data[key] = value

    def get(self, key: str) -> Optional[bytes]:
        with self._lock:
            return self._data.get(key)


class SharedStore(MemoryStore):
    """A set/get store that tells waiting test code when a key is written."""

    def __init__(self, wait_seconds: float = 60.0) -> None:
        super().__init__()
        self._cv = threading.Condition()
        self._wait = wait_seconds  # a hang detector: no key should take near this long

    def set(self, key, value) -> None:
        super().set(key, value)
        with self._cv:
            self._cv.notify_all()

    def wait_for(self, key: str) -> bytes:
        with self._cv:
            assert self._cv.wait_for(lambda: self.get(key) is not None, self._wait), f"{key} never appeared"
        return self.get(key)


class RankFailures(Exception):
    """Raised by run_ranks when any rank raised; .errors[r] is rank r's exception or None."""

    def __init__(self, errors: List[Optional[BaseException]]):
        self.errors = errors
        lines = [f"rank {r}: {type(e).__name__}: {e}" for r, e in enumerate(errors) if e is not None]
        super().__init__("\n".join(lines))


def run_ranks(
    world_size: int,
    fn: Callable[[ringcc.Communicator], Any],
    *,
    transport: str = "shm",
    timeout: float = 60.0,
    join_timeout: float = 120.0,
    store: Any = None,
    name_override: Optional[str] = None,
    per_rank: Optional[Callable[[int], dict]] = None,
    **comm_kwargs: Any,
) -> List[Any]:
    """Create a communicator per rank (each in its own thread), call fn(comm) on each and
    return the per-rank results. Raises RankFailures if any rank raised.

    `per_rank(rank)` may add Communicator options for one rank (e.g. an emulated host_id).
    Each rank closes its communicator afterwards (abort if it failed), so tests leave no
    threads or shared memory behind."""
    store = store if store is not None else MemoryStore()
    name = name_override or f"test{next(_names)}"
    results: List[Any] = [None] * world_size
    errors: List[Optional[BaseException]] = [None] * world_size

    def worker(rank: int) -> None:
        comm = None
        try:
            extra = per_rank(rank) if per_rank else {}
            comm = ringcc.Communicator(store, rank, world_size, name=name, transport=transport,
                                       timeout=timeout, **comm_kwargs, **extra)
            results[rank] = fn(comm)
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            errors[rank] = exc
        finally:
            if comm is not None:
                if errors[rank] is None:
                    comm.close()
                else:
                    comm.abort("test rank failed")

    threads = [threading.Thread(target=worker, args=(r,), daemon=True) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(join_timeout)
    hung = [r for r, t in enumerate(threads) if t.is_alive()]
    if hung:
        raise AssertionError(f"ranks {hung} did not finish within {join_timeout} s (hang)")
    if any(e is not None for e in errors):
        raise RankFailures(errors)
    return results


def pytest_sessionfinish(session, exitstatus):
    """A run that selects no test is a failure (exit 1), never pytest's exit 5: CI must
    not pass on an empty selection."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(params=TRANSPORTS)
def transport(request) -> str:
    return request.param
