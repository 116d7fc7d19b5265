"""Rendezvous through a key-value store: torch.distributed's Store (TCPStore, FileStore,
HashStore, PrefixStore) or any object with set(key, value) and get(key)."""

from __future__ import annotations

import secrets
import time
from typing import Any, Optional

from ._native import _C

# Bytes of randomness in a job secret (it is stored and used as their hex text).
SECRET_BYTES = 32
# Longest pause between two looks at the store while waiting for another rank to join.
POLL_MAX_S = 0.05


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

    def get(self, key: str, what: str = "") -> str:
        """The value under `key`; ringcc.TimeoutError naming `what` (default: the key)
        if it does not appear within the timeout."""
        full = self._prefix + key
        if self._blocking:
            return _text(self._store.get(full))
        found = []  # stores that cannot block are polled, with back-off

        def arrived() -> bool:
            try:
                value = self._store.get(full)
            except KeyError:
                value = None
            if value is not None:
                found.append(value)
            return bool(found)

        label = f"{what} (key {full!r})" if what else f"key {full!r}"
        _poll(arrived, time.monotonic() + self._timeout, lambda: _C.TimeoutError(
            f"rendezvous: {label} did not appear in the store within {self._timeout} s"))
        return _text(found[0])


def _text(value: Any) -> str:
    # Store values are written by ringcc as ASCII; anything else is some other program's
    # bytes, which the native parsers then refuse by name (replacement characters keep
    # a UnicodeDecodeError from hiding which record was bad).
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def _exists(store: Any, key: str) -> bool:
    if hasattr(store, "check"):  # torch Stores: get() would block
        return bool(store.check([key]))
    try:
        return store.get(key) is not None
    except KeyError:
        return False


def _poll(ready, deadline: float, timed_out) -> None:
    """Call ready() until it is true, with growing pauses; raise timed_out() at the
    deadline. Each pause returns to the interpreter, so a signal handler (torchrun's
    SIGTERM, Ctrl-C) runs while a rank waits for others to join."""
    delay = 0.001
    while not ready():
        left = deadline - time.monotonic()
        if left <= 0:
            raise timed_out()
        time.sleep(min(delay, left))
        delay = min(delay * 2, POLL_MAX_S)


def join_generation(store: Any, base: str, rank: int, world_size: int, timeout: float) -> int:
    """The generation under which every rank of one communicator creation keeps its
    records (``base + f"{generation}/"``); returns once every rank has joined it.

    The store may hold records of earlier creations under the same name: a communicator
    re-created after an abort, or a torchrun restart (torchrun keeps one store for all
    attempts of a job), and an earlier attempt may have ended after only some ranks
    joined, leaving the ranks' own join counts unequal. So rank 0 draws a new
    generation (``store.add``) and hands it to each other rank's current join: rank r
    numbers its joins with a counter of its own and waits for ``assign/r/<join>``; rank
    0 reads that counter until rank r confirms, answering the newest number it sees. A
    join number is new when rank r draws it, so the only answer under it comes from the
    rank 0 of the same creation (answers to earlier numbers nobody reads).

    Stores without ``add`` (plain set/get objects, for in-process use) get generation 1."""
    if not hasattr(store, "add"):
        return 1
    deadline = time.monotonic() + timeout
    if rank != 0:
        join = store.add(f"{base}joins/{rank}", 1)
        key = f"{base}assign/{rank}/{join}"
        _poll(lambda: _exists(store, key), deadline, lambda: _C.TimeoutError(
            f"rendezvous {base!r}: rank {rank} waited {timeout} s for rank 0 to join (is rank 0 running and "
            "using the same store?)"))
        generation = int(_text(store.get(key)))
        store.set(f"{base}{generation}/joined/{rank}", b"1")
        return generation
    generation = int(store.add(f"{base}generations", 1))
    answered = {r: 0 for r in range(1, world_size)}  # rank -> newest join number answered

    def everyone_joined() -> bool:
        for r in list(answered):
            if _exists(store, f"{base}{generation}/joined/{r}"):
                del answered[r]
                continue
            join = int(store.add(f"{base}joins/{r}", 0))
            if join > answered[r]:
                store.set(f"{base}assign/{r}/{join}", str(generation).encode())
                answered[r] = join
        return not answered

    _poll(everyone_joined, deadline, lambda: _C.TimeoutError(
        f"rendezvous {base!r}: rank(s) {sorted(answered)} did not join within {timeout} s"))
    return generation


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
