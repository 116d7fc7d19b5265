"""Rendezvous across attempts: a communicator created again on the same store and name
after a creation that only some ranks joined (what a torchrun restart finds in the store
it keeps for every attempt) must form its group from fresh records only.
"""

from __future__ import annotations

import datetime
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is needed", allow_module_level=True)

import ringcc  # noqa: E402 - after the skips


# ------------------------------------------------------------------ in-process rendezvous
def _create(store_for, rank: int, results: dict, timeout: float) -> None:
    try:
        comm = ringcc.Communicator(store_for(rank), rank, 2, name="pg", timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - inspected by the test
        results[rank] = exc
        return
    try:
        results[rank] = comm.allreduce(np.full(4, rank + 1.0)).tolist()
    except Exception as exc:  # noqa: BLE001
        results[rank] = exc
    finally:
        comm.close()


def _create_all(store_for, ranks, timeout: float = 30.0) -> dict:
    results: dict = {}
    threads = [threading.Thread(target=_create, args=(store_for, r, results, timeout), daemon=True) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)  # hang detector
    assert not any(t.is_alive() for t in threads), f"communicator creation hung: {results}"
    return results


@pytest.mark.parametrize("store_kind", ["hash", "tcp"])
def test_a_creation_only_some_ranks_joined_leaves_nothing_the_next_one_reads(store_kind):
    """Like a torchrun attempt that lost a rank while forming its group: rank 0 joins
    alone and gives up; then both ranks create the communicator on the same store and
    name, twice (as after an abort), and each time get a working group."""
    timeout = datetime.timedelta(seconds=30)
    if store_kind == "hash":
        shared = dist.HashStore()
        shared.set_timeout(timeout)

        def store_for(rank):
            return shared
    else:
        server = dist.TCPStore("127.0.0.1", 0, 1, True, timeout)

        def store_for(rank):  # one client per rank, as in separate processes
            return dist.TCPStore("127.0.0.1", server.port, 1, False, timeout)

    alone = _create_all(store_for, [0], timeout=1.0)
    assert isinstance(alone[0], Exception), alone
    for _ in range(2):
        results = _create_all(store_for, [0, 1])
        assert results == {0: [3.0] * 4, 1: [3.0] * 4}, results
    # The lone rank gave up after the communicator's timeout, naming who never came.
    assert isinstance(alone[0], TimeoutError) and "rank(s) [1] did not join" in str(alone[0]), alone
