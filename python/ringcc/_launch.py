"""Starting the ranks of a ``ringcc`` command (``ringcc bench``, ``ringcc train``).

A command either runs as one rank that a launcher started (torchrun, or this module's
:func:`spawn`), reading ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT``
from the environment like ``init_process_group``'s default ``env://`` does, or it spawns
``--nproc`` copies of itself on this host and waits for them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from typing import Callable, Collection, Optional, Sequence


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_rank(child_env: str) -> bool:
    """True in a process that is one rank: spawned by :func:`spawn` (``child_env`` is
    set) or started by a launcher such as torchrun (``RANK`` and ``WORLD_SIZE`` set)."""
    return bool(os.environ.get(child_env)) or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def run_or_spawn(prog: str, nproc: Optional[int], child_env: str, run_rank: Callable[[], int],
                 spawn_ranks: Callable[[int], int]) -> int:
    """The entry point shared by the CLIs: be one rank when a launcher (or our own spawn)
    started this process, else start ``nproc`` (default 2) local ranks."""
    if is_rank(child_env):
        if nproc is not None and not os.environ.get(child_env):
            print(f"{prog}: --nproc is ignored under torchrun (it started the ranks)", file=sys.stderr)
        return run_rank()
    return spawn_ranks(nproc or 2)


def spawn(command: str, argv: Sequence[str], nproc: int, child_env: str, *,
          benign_exit_codes: Collection[int] = ()) -> int:
    """Run ``python -m ringcc <command> <argv>`` as `nproc` ranks on this host and wait
    (see :func:`spawn_argv`)."""
    return spawn_argv([sys.executable, "-m", "ringcc", command, *argv], nproc, child_env,
                      benign_exit_codes=benign_exit_codes)


def spawn_argv(cmd: Sequence[str], nproc: int, child_env: str, *, benign_exit_codes: Collection[int] = ()) -> int:
    """Run the command line `cmd` as `nproc` ranks on this host and wait.

    Rank 0 keeps this process's stdout; the others' stdout is discarded (stderr is kept
    for every rank, so errors are seen). When a rank exits non-zero, the others are
    stopped (SIGTERM) unless its exit code is in `benign_exit_codes` — codes a rank
    returns after finishing its collectives normally, so its peers are not stuck.
    Returns 0, or the first non-zero exit code (130 after Ctrl-C)."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nproc),
               LOCAL_WORLD_SIZE=str(nproc), **{child_env: "1"})
    # Each rank would otherwise start one OpenMP thread per core: n ranks x n cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    procs = []
    for r in range(nproc):
        env_r = dict(env, RANK=str(r), LOCAL_RANK=str(r))
        procs.append(subprocess.Popen(list(cmd), env=env_r,
                                      stdout=None if r == 0 else subprocess.DEVNULL))
    status = 0
    try:
        pending = list(procs)
        while pending:
            for p in list(pending):
                try:
                    rc = p.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    continue
                pending.remove(p)
                if rc != 0 and status == 0:
                    status = rc if rc > 0 else 1
                    if rc not in benign_exit_codes:  # a crash: its peers would wait for it forever
                        for q in pending:
                            q.send_signal(signal.SIGTERM)
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        status = 130
    for p in procs:
        p.wait()
    return status
