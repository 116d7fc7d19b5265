"""Rendezvous through a key-value store: torch.distributed's Store (TCPStore, FileStore,
HashStore, PrefixStore) or any object with set(key, value) and get(key)."""

from __future__ import annotations

import secrets
import time
from typing import Any, Optional

# Bytes of randomness in a job secret (it is stored and used as their hex text).
SECRET_BYTES = 32


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
    # Store values are written by ringcc as ASCII; anything else is some other program's
    # bytes, which the native parsers then refuse by name (replacement characters keep
    # a UnicodeDecodeError from hiding which record was bad).
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def job_secret(store: Any, key: str, timeout: float, *, creator: Optional[bool] = None) -> str:
    """The job's shared secret under `key`: SECRET_BYTES random bytes as hex, created
    once by whichever party needs it first and read by all the others.

    Connections prove they know it (HMAC challenge-response); it never crosses a socket,
    so anyone who can read the store is, by design, inside the job.

    torch Stores have compare_set: setting the key only where it is missing is atomic and
    every caller gets back the one value that won. Stores with add() but no compare_set
    elect a creator with a counter. A plain set/get store has neither: `creator` says
    whether this caller makes the secret (True) or waits for it (False); when nobody is
    designated (None) the check-then-set can race, acceptable only for in-process use."""
    fresh = secrets.token_hex(SECRET_BYTES)
    if hasattr(store, "compare_set"):
        value = _text(store.compare_set(key, "", fresh))
    elif hasattr(store, "add"):
        if store.add(key + "/claim", 1) == 1:
            store.set(key, fresh.encode())
            return fresh
        value = StoreClient(store, "", timeout).get(key)
    elif creator:
        store.set(key, fresh.encode())
        return fresh
    elif creator is False:
        value = StoreClient(store, "", timeout).get(key)
    else:
        try:
            value = store.get(key)
        except KeyError:
            value = None
        if not value:
            store.set(key, fresh.encode())
            return fresh
        value = _text(value)
    if len(value) < 32:
        raise ValueError(f"the job secret in the store under {key!r} is {len(value)} characters; expected at least "
                         "32 (another program wrote that key?)")
    return value
