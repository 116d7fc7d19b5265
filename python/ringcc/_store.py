"""Rendezvous through a key-value store: torch.distributed's Store (TCPStore, FileStore,
HashStore, PrefixStore) or any object with set(key, value) and get(key)."""

from __future__ import annotations

import time
from typing import Any


class StoreClient:
    def __init__(self, store: Any, prefix: str, timeout: float):
        if not (hasattr(store, "set") and hasattr(store, "get")):
            raise TypeError(f"store must have set(key, value) and get(key); got {type(store).__name__}")
        self._store = store
        self._prefix = prefix
        self._timeout = timeout
        # torch Stores block in get() until the key exists (up to the store's timeout).
        self._blocking = hasattr(store, "wait") and hasattr(store, "add")

    def set(self, key: str, value: str) -> None:
        self._store.set(self._prefix + key, value.encode())

    def get(self, key: str) -> str:
        full = self._prefix + key
        if self._blocking:
            return _text(self._store.get(full))
        deadline = time.monotonic() + self._timeout
        delay = 0.001
        while True:
            try:
                value = self._store.get(full)
            except KeyError:
                value = None
            if value is not None:
                return _text(value)
            if time.monotonic() > deadline:
                raise TimeoutError(f"rendezvous: key {full!r} did not appear in the store within {self._timeout} s")
            time.sleep(delay)  # polling back-off for stores that cannot block
            delay = min(delay * 2, 0.05)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)
