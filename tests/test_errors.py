"""Failure behaviour with ranks as threads: mismatches, timeouts, invalid arguments,
abort() and the asynchronous Work API, over both real transports."""

from __future__ import annotations

import gc
import itertools
import re
import threading

import numpy as np
import pytest
import torch

import ringcc
from conftest import MemoryStore, run_ranks

F32 = np.float32


# --------------------------------------------------------------------------- helpers
def _start(hold: threading.Barrier) -> None:
    """Wait until every rank's Communicator() has returned. Without this, an early failure
    on a fast rank can reach a slow rank while it is still inside its connect barrier, and
    then its constructor raises the remote error instead of the operation under test."""
    hold.wait(30)


def _linger(hold: threading.Barrier) -> None:
    """Keep this rank's communicator alive until every rank has made its checks, so each
    test observes the failure it is about and not a peer's later teardown."""
    hold.wait(30)


def _ranks_named(msg: str) -> set:
    return {int(r) for r in re.findall(r"\brank (\d+)\b", msg)}


def _differing(msg: str) -> str:
    assert "they differ in:" in msg, msg
    return msg.split("they differ in:", 1)[1]


def _run_mismatch(world, transport, body, field, *, odd_rank=1, rooted=False):
    """Run `body(comm)` on every rank (rank `odd_rank` calls something different) and
    check that every rank ends up with a MismatchError naming both ranks of the detected
    pair and the differing `field`, and that the communicator stays broken afterwards."""
    hold = threading.Barrier(world)

    def fn(comm):
        _start(hold)
        first, late = None, False
        try:
            body(comm)
        except ringcc.MismatchError as exc:
            first = exc
        if first is None:
            # Only a rooted op may complete on a rank before anybody noticed: then the
            # very next operation must report the mismatch.
            late = True
            try:
                comm.allreduce(np.ones(4, F32))
            except ringcc.MismatchError as exc:
                first = exc
        try:
            comm.allreduce(np.ones(4, F32))
        except ringcc.Error as exc:
            after = exc
        else:
            after = None
        _linger(hold)
        return first, late, after

    results = run_ranks(world, fn, transport=transport, timeout=30, join_timeout=60)
    for rank, (first, late, after) in enumerate(results):
        assert first is not None, f"rank {rank} never raised MismatchError"
        assert rooted or not late, f"rank {rank}: the mismatched op itself did not raise"
        msg = str(first)
        assert "mismatch" in msg, msg
        named = _ranks_named(msg)
        # The detected pair always includes the odd rank and one rank that disagrees with it.
        assert odd_rank in named, msg
        assert named - {odd_rank}, msg
        if world == 2:
            assert named == {0, 1}, msg
        assert field in _differing(msg), msg
        # Unusable afterwards, failing with the original reason.
        assert after is not None, f"rank {rank}: an operation after the mismatch succeeded"
        assert isinstance(after, ringcc.MismatchError), repr(after)
        assert msg in str(after), (msg, str(after))
    return results


WORLDS = pytest.mark.parametrize("world", [2, 3])


# --------------------------------------------------------------------- 1. mismatches
@WORLDS
def test_mismatch_collective(world, transport):
    def body(comm):
        x = np.ones(4, F32)
        if comm.rank == 1:
            comm.broadcast(x, root=0)
        else:
            comm.allreduce(x)

    results = _run_mismatch(world, transport, body, "collective")
    for first, _, _ in results:
        assert "allreduce(" in str(first) and "broadcast(" in str(first)


@WORLDS
def test_mismatch_count(world, transport):
    def body(comm):
        comm.allreduce(np.ones(5 if comm.rank == 1 else 4, F32))

    results = _run_mismatch(world, transport, body, "count")
    for first, _, _ in results:
        assert "count=4" in str(first) and "count=5" in str(first)


@WORLDS
def test_mismatch_dtype(world, transport):
    def body(comm):
        comm.allreduce(np.ones(4, np.float64 if comm.rank == 1 else F32))

    results = _run_mismatch(world, transport, body, "dtype")
    for first, _, _ in results:
        assert "float32" in str(first) and "float64" in str(first)
        assert "count" not in _differing(str(first))


@WORLDS
def test_mismatch_op(world, transport):
    def body(comm):
        comm.allreduce(np.ones(4, F32), op="max" if comm.rank == 1 else "sum")

    results = _run_mismatch(world, transport, body, "op")
    for first, _, _ in results:
        assert "op=max" in str(first) and "op=sum" in str(first)


@WORLDS
def test_mismatch_root(world, transport):
    # Every rank but 1 broadcasts from root 0; rank 1 thinks it is the root. Senders in a
    # rooted op can finish before anyone reads their frame, so detection may be late.
    def body(comm):
        comm.broadcast(np.full(4, comm.rank, F32), root=1 if comm.rank == 1 else 0)

    results = _run_mismatch(world, transport, body, "root", rooted=True)
    for first, _, _ in results:
        # Whenever it is noticed, the report compares the two broadcasts, not the
        # broadcast with whatever the noticing rank ran next.
        msg = str(first)
        assert "root=1" in msg and "root=0" in msg, msg
        assert msg.count("broadcast(seq=1,") == 2, msg
        assert _differing(msg).split(" (noticed during")[0].strip() == "root", msg


@WORLDS
def test_mismatch_allgather_v_counts(world, transport):
    def body(comm):
        counts = [1, 2, 3][:world]
        if comm.rank == 1:  # same total, different split
            counts = [2, 1, 3][:world]
        comm.allgather_v(np.ones(counts[comm.rank], F32), counts)

    _run_mismatch(world, transport, body, "per-rank counts")


@WORLDS
def test_mismatch_missing_operation(world, transport):
    def body(comm):
        if comm.rank == 1:
            comm.barrier()
        else:
            comm.allreduce(np.ones(4, F32))

    results = _run_mismatch(world, transport, body, "collective")
    for first, _, _ in results:
        assert "barrier(" in str(first) and "allreduce(" in str(first)


# ------------------------------------------------------------------------ 2. timeouts
def _timeout_case(transport, *, comm_timeout, op_timeout):
    released = threading.Event()
    hold = threading.Barrier(2)

    def fn(comm):
        _start(hold)
        if comm.rank == 1:
            # Never enters the collective; waits until rank 0 has given up.
            assert released.wait(30), "rank 0 never gave up"
            # Rank 0 may already have delivered its part of the allreduce before giving
            # up, so this first call may still complete; the next one must not.
            try:
                comm.allreduce(np.ones(4, F32))
                comm.barrier()
            except ringcc.Error as exc:
                return exc
            finally:
                _linger(hold)
            return None
        try:
            comm.allreduce(np.ones(4, F32), timeout=op_timeout)
        except ringcc.TimeoutError as exc:
            return exc
        finally:
            released.set()
            _linger(hold)
        return None

    return run_ranks(2, fn, transport=transport, timeout=comm_timeout, join_timeout=25)


def _check_timeout(err, seconds):
    assert isinstance(err, ringcc.TimeoutError), repr(err)
    assert isinstance(err, TimeoutError)  # the builtin
    assert isinstance(err, ringcc.Error)
    msg = str(err)
    assert "timed out" in msg, msg
    assert f"after {seconds:g} s" in msg, msg
    assert "allreduce" in msg, msg
    assert re.search(r"\bfrom rank 1\b", msg), msg  # the peer it waited for


def test_timeout_names_operation_and_peer(transport):
    err0, err1 = _timeout_case(transport, comm_timeout=1.0, op_timeout=None)
    _check_timeout(err0, 1.0)
    # Rank 0's failure reached rank 1: its operations fail with the same reason.
    assert isinstance(err1, ringcc.Error), repr(err1)
    assert str(err0) in str(err1)


def test_timeout_per_op_override(transport):
    err0, err1 = _timeout_case(transport, comm_timeout=60.0, op_timeout=0.5)
    _check_timeout(err0, 0.5)
    assert isinstance(err1, ringcc.Error), repr(err1)


def test_remote_timeout_carries_each_ranks_own_view(transport):
    """Rank 2 never joins a ring allreduce. Rank 0 gives up first (short per-call
    timeout); its text names what rank 0 waited for. Rank 1 receives that abort and must
    add its own view, which names rank 2, the rank it waited on. A ring send that waits
    for data still to come is described as such, not as the next rank's fault."""
    released = threading.Event()
    hold = threading.Barrier(3)
    n = 1 << 20  # 4 MiB: the ring algorithm, not recursive doubling

    def fn(comm):
        _start(hold)
        try:
            if comm.rank == 2:
                assert released.wait(30), "rank 1 never gave up"
                return None
            try:
                comm.allreduce(np.ones(n, F32), timeout=1.0 if comm.rank == 0 else 30.0)
            except ringcc.TimeoutError as exc:
                return exc
            finally:
                if comm.rank == 1:
                    released.set()
            return None
        finally:
            _linger(hold)

    err0, err1, _ = run_ranks(3, fn, transport=transport, timeout=60, join_timeout=60)
    assert isinstance(err0, ringcc.TimeoutError) and isinstance(err1, ringcc.TimeoutError), (err0, err1)
    own = re.search(r"\[when it reached rank 1, rank 1 was still waiting(.*)\]", str(err1))
    assert own, str(err1)
    assert str(err0) in str(err1)
    assert re.search(r"\brank 2\b", own.group(1)), own.group(1)
    # Rank 0's next send to rank 1 forwards what rank 2 never sent: not rank 1's fault.
    assert "to send 262144 bytes to rank 1 (once the data from rank 2 has arrived)" in str(err0), str(err0)


def test_timeout_in_point_to_point_batch_names_the_waiting_operation(transport):
    """Rank 0 posts an isend (which completes) and two irecvs rank 1 never matches; the
    first to expire names itself and the peer, and the other irecv fails with it."""
    released = threading.Event()
    hold = threading.Barrier(2)

    def fn(comm):
        _start(hold)
        if comm.rank == 1:
            comm.recv(np.empty(3, F32), 0, tag=7)
            assert released.wait(30), "rank 0 never gave up"
            _linger(hold)
            return None
        sent = comm.send(np.ones(3, F32), 1, tag=7, async_op=True)
        slow = comm.recv(np.empty(5, F32), 1, tag=8, async_op=True, timeout=60)
        fast = comm.recv(np.empty(2, F32), 1, tag=9, async_op=True, timeout=0.5)
        errors = []
        for w in (fast, slow):
            try:
                w.wait()
            except ringcc.Error as exc:
                errors.append(exc)
        sent.wait()  # done before anything failed: no error
        released.set()
        _linger(hold)
        return errors

    errors = run_ranks(2, fn, transport=transport, timeout=60, join_timeout=25)[0]
    assert len(errors) == 2, errors
    fast_err, slow_err = errors
    assert isinstance(fast_err, ringcc.TimeoutError), repr(fast_err)
    msg = str(fast_err)
    assert re.search(r"send/recv\(seq=\d+, dtype=float32, count=2, tag=9\) timed out after 0.5 s", msg), msg
    # Receives from one peer share a stream: the tag=8 one, in front, is what it waits for.
    assert re.search(r"to receive 20 bytes from rank 1 for send/recv\(seq=\d+, dtype=float32, count=5, tag=8\)",
                     msg), msg
    assert str(fast_err) in str(slow_err)


def test_point_to_point_tag_mismatch_raises_on_both_ranks(transport):
    hold = threading.Barrier(2)

    def fn(comm):
        _start(hold)
        try:
            if comm.rank == 0:
                comm.send(np.ones(3, F32), 1, tag=1)
                comm.barrier()  # the send may complete before rank 1 looks at it
            else:
                comm.recv(np.empty(3, F32), 0, tag=2)
        except ringcc.MismatchError as exc:
            return exc
        finally:
            _linger(hold)
        return None

    for err in run_ranks(2, fn, transport=transport, timeout=30, join_timeout=25):
        assert isinstance(err, ringcc.MismatchError), repr(err)
        assert "tag" in _differing(str(err)), str(err)
        assert "tag=1" in str(err) and "tag=2" in str(err), str(err)


def test_timeout_class_hierarchy():
    assert issubclass(ringcc.TimeoutError, TimeoutError)
    assert issubclass(ringcc.TimeoutError, ringcc.Error)
    for cls in (ringcc.PeerError, ringcc.MismatchError, ringcc.AbortedError):
        assert issubclass(cls, ringcc.Error)
        assert not issubclass(cls, TimeoutError)


# --------------------------------------------------------------- 3. invalid arguments
def _readonly(a):
    a.setflags(write=False)
    return a


def _overlap(comm, **kw):
    a = np.arange(8, dtype=F32)
    return comm.allreduce(a[0:4], out=a[2:6], **kw)


INVALID = [
    # id, call(comm, **kw), exception, substrings the message must contain
    ("noncontig-numpy", lambda c, **kw: c.allreduce(np.ones((4, 4), F32)[:, ::2], **kw), ValueError,
     ["contiguous"]),
    ("noncontig-torch", lambda c, **kw: c.allreduce(torch.ones(4, 4).t(), **kw), ValueError, ["contiguous"]),
    ("noncontig-output", lambda c, **kw: c.allreduce(np.ones(4, F32), out=np.empty((4, 2), F32)[:, 0], **kw),
     ValueError, ["contiguous"]),
    ("dtype-np-int16", lambda c, **kw: c.allreduce(np.ones(4, np.int16), **kw), TypeError, ["int16"]),
    ("dtype-torch-int16", lambda c, **kw: c.allreduce(torch.ones(4, dtype=torch.int16), **kw), TypeError,
     ["int16"]),
    ("dtype-np-uint32", lambda c, **kw: c.allreduce(np.ones(4, np.uint32), **kw), TypeError, ["uint32"]),
    ("avg-int32", lambda c, **kw: c.allreduce(np.ones(4, np.int32), op="avg", **kw), TypeError,
     ["avg", "int32"]),
    ("band-float32", lambda c, **kw: c.allreduce(np.ones(4, F32), op="band", **kw), TypeError,
     ["band", "float32"]),
    ("complex-max", lambda c, **kw: c.allreduce(np.ones(4, np.complex64), op="max", **kw), TypeError,
     ["max", "complex"]),
    ("unknown-op", lambda c, **kw: c.allreduce(np.ones(4, F32), op="median", **kw), ValueError, ["median"]),
    ("allreduce-out-size", lambda c, **kw: c.allreduce(np.ones(4, F32), out=np.empty(5, F32), **kw),
     ValueError, ["20 bytes", "16"]),
    ("allgather-out-size", lambda c, **kw: c.allgather(np.ones(4, F32), out=np.empty((2, 3), F32), **kw),
     ValueError, ["24 bytes", "32"]),
    ("out-dtype", lambda c, **kw: c.allreduce(np.ones(4, F32), out=np.empty(4, np.float64), **kw), TypeError,
     ["float32", "float64"]),
    ("readonly-out", lambda c, **kw: c.allreduce(np.ones(4, F32), out=_readonly(np.empty(4, F32)), **kw),
     ValueError, ["read-only"]),
    ("readonly-inplace", lambda c, **kw: c.allreduce(_readonly(np.ones(4, F32)), **kw), ValueError,
     ["read-only"]),
    ("broadcast-root-2", lambda c, **kw: c.broadcast(np.ones(4, F32), root=2, **kw), ValueError, ["root", "2"]),
    ("broadcast-root-neg", lambda c, **kw: c.broadcast(np.ones(4, F32), root=-1, **kw), ValueError,
     ["root", "-1"]),
    ("reduce-root-2", lambda c, **kw: c.reduce(np.ones(4, F32), root=2, **kw), ValueError, ["root", "2"]),
    ("send-self", lambda c, **kw: c.send(np.ones(4, F32), peer=c.rank, **kw), ValueError, ["peer"]),
    ("send-peer-range", lambda c, **kw: c.send(np.ones(4, F32), peer=2, **kw), ValueError, ["peer", "2"]),
    ("recv-peer-neg", lambda c, **kw: c.recv(np.ones(4, F32), peer=-1, **kw), ValueError, ["peer", "-1"]),
    ("reduce-scatter-split", lambda c, **kw: c.reduce_scatter(np.ones(5, F32), **kw), ValueError, ["(5,)"]),
    ("overlap", _overlap, ValueError, ["overlap"]),
    ("timeout-zero", lambda c, **kw: c.allreduce(np.ones(4, F32), timeout=0, **kw), ValueError, ["timeout"]),
]
if hasattr(np, "float128"):
    INVALID.append(("dtype-np-float128", lambda c, **kw: c.allreduce(np.ones(4, np.float128), **kw), TypeError,
                    ["float128"]))


@pytest.mark.parametrize("call,exc_type,needles", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_argument_is_synchronous_and_harmless(call, exc_type, needles, transport):
    def fn(comm):
        # Only rank 0 makes the bad calls: had any of them consumed a sequence number or
        # sent a frame, the allreduce below would mismatch or hang.
        if comm.rank == 0:
            for kw in ({}, {"async_op": True}):
                with pytest.raises(exc_type) as info:
                    call(comm, **kw)
                for needle in needles:
                    assert needle in str(info.value), (needle, str(info.value))
                assert not isinstance(info.value, ringcc.Error)
        x = np.full(4, comm.rank + 1, F32)
        assert comm.allreduce(x) is x
        t = torch.full((3,), float(comm.rank + 1), dtype=torch.float64)
        comm.allreduce(t, op="max")
        return x.tolist(), t.tolist()

    for xs, ts in run_ranks(2, fn, transport=transport, join_timeout=60):
        assert xs == [3.0] * 4
        assert ts == [2.0] * 3


# ---------------------------------------------------------------------------- 4. abort
def test_abort_fails_blocked_peer(transport):
    submitted = threading.Event()
    hold = threading.Barrier(2)

    def fn(comm):
        _start(hold)
        if comm.rank == 1:
            work = comm.allreduce(np.ones(4, F32), async_op=True)
            submitted.set()
            try:
                # Far below the communicator's 60 s timeout: only abort() can end this.
                work.wait(timeout=30)
            except ringcc.Error as exc:
                return exc, work.exception()
            finally:
                _linger(hold)
            return None, None
        assert submitted.wait(30)
        comm.abort("stop")  # must return
        assert comm.is_aborted
        try:
            comm.allreduce(np.ones(4, F32))
        except ringcc.Error as exc:
            return exc, None
        finally:
            _linger(hold)
        return None, None

    (own_err, _), (err, exc_again) = run_ranks(2, fn, transport=transport, timeout=60, join_timeout=45)
    assert isinstance(err, ringcc.AbortedError), repr(err)
    assert not isinstance(err, ringcc.TimeoutError)
    assert "stop" in str(err), str(err)
    assert re.search(r"\brank 0\b", str(err)), str(err)
    assert isinstance(exc_again, ringcc.AbortedError) and "stop" in str(exc_again)
    # The aborting rank cannot use its communicator any more either.
    assert isinstance(own_err, ringcc.AbortedError), repr(own_err)


def _pair(transport, timeout=20.0):
    """Two connected communicators (ranks 0 and 1) created concurrently in threads."""
    store, comms, errors = MemoryStore(), [None, None], []
    name = f"pair-{transport}-{next(_pair_names)}"

    def make(rank):
        try:
            comms[rank] = ringcc.Communicator(store, rank, 2, name=name, transport=transport, timeout=timeout)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=make, args=(r,), daemon=True) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and all(comms), errors
    return comms


_pair_names = itertools.count()


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_abort_reason_survives_teardown_of_aborting_rank(transport):
    comms = _pair(transport)
    comms[0].abort("stop")
    comms[0] = None  # the aborting rank goes away entirely (as a process exiting would)
    gc.collect()
    survivor = comms[1]
    try:
        with pytest.raises(ringcc.Error) as info:
            survivor.allreduce(np.ones(4, F32))
        assert isinstance(info.value, ringcc.AbortedError), repr(info.value)
        assert "stop" in str(info.value)
    finally:
        # Cleaned up on a daemon thread so that a regression of the bug covered by
        # test_processes.py::test_tcp_op_after_peer_teardown_then_close (abort() hanging
        # once a TCP peer is gone) fails this test instead of hanging the session.
        cleanup = threading.Thread(target=survivor.abort, args=("test done",), daemon=True)
        cleanup.start()
        cleanup.join(10)
        assert not cleanup.is_alive(), "abort() of the surviving rank hung"


# ------------------------------------------------------------------------ 5. Work API
def test_work_api_success(transport):
    def fn(comm):
        x = np.full(6, comm.rank + 1, F32)
        calls = []
        called = threading.Event()

        def cb(w):
            calls.append(w)
            called.set()

        work = comm.allreduce(x, async_op=True)
        assert isinstance(work, ringcc.Work)
        work.add_done_callback(cb)
        result = work.wait()
        assert result is x
        assert work.is_completed()
        assert work.exception() is None
        assert called.wait(10), "done callback never ran"
        # A second completed op must not re-trigger the first one's callback.
        comm.barrier()
        assert len(calls) == 1 and calls[0] is work

        # A callback added after completion runs right away, once.
        late = []
        work.add_done_callback(late.append)
        assert late == [work]

        out = np.empty((comm.world_size, 2), np.int64)
        w2 = comm.allgather(np.array([comm.rank, 10 * comm.rank], np.int64), out=out, async_op=True)
        assert w2.wait() is out
        assert "allgather" in repr(w2)
        return x.tolist(), out.tolist()

    for xs, gathered in run_ranks(2, fn, transport=transport, join_timeout=60):
        assert xs == [3.0] * 6
        assert gathered == [[0, 0], [1, 10]]


def test_work_wait_timeout_leaves_op_running(transport):
    gave_up = threading.Event()

    def fn(comm):
        x = np.full(4, comm.rank + 1, F32)
        if comm.rank == 1:
            assert gave_up.wait(30)
            comm.allreduce(x)
            return x.tolist(), None
        work = comm.allreduce(x, async_op=True)
        try:
            work.wait(timeout=0.2)
        except ringcc.TimeoutError as exc:
            err = exc
        else:
            err = None
        finally:
            # Rank 1 has not called allreduce yet, so the op cannot have finished.
            done_at_timeout = work.is_completed()
            gave_up.set()
        result = work.wait(timeout=30)
        return result.tolist(), (err, done_at_timeout)

    (xs0, (err, done_at_timeout)), (xs1, _) = run_ranks(2, fn, transport=transport, timeout=60,
                                                         join_timeout=45)
    assert isinstance(err, ringcc.TimeoutError) and "still running" in str(err), repr(err)
    assert not done_at_timeout
    assert xs0 == xs1 == [3.0] * 4


def test_work_exception_for_failed_op(transport):
    hold = threading.Barrier(2)

    def fn(comm):
        _start(hold)
        calls = []
        called = threading.Event()
        work = comm.allreduce(np.ones(5 if comm.rank == 1 else 4, F32), async_op=True)
        work.add_done_callback(lambda w: (calls.append(w), called.set()))
        with pytest.raises(ringcc.MismatchError) as info:
            work.wait()
        assert work.is_completed()
        exc = work.exception()
        assert isinstance(exc, ringcc.MismatchError)
        assert str(exc) == str(info.value)
        assert called.wait(10)
        assert calls == [work]
        _linger(hold)
        return str(exc)

    msgs = run_ranks(2, fn, transport=transport, join_timeout=60)
    for msg in msgs:
        assert "count" in _differing(msg)


def test_abort_from_remote_host_reaches_rank_waiting_on_shared_memory():
    """Mixed mesh (emulated hosts [0, 0, 1, 1]): rank 1 waits on a shared-memory receive
    from rank 0 while rank 2, reachable only over TCP, aborts. Rank 1 must learn of it
    through the idle TCP link, long before its 60 s timeout."""
    hosts = [0, 0, 1, 1]
    store = MemoryStore()
    ready = threading.Barrier(4)
    aborted = threading.Event()
    outcome = {}

    def rank_main(r):
        comm = ringcc.Communicator(store, r, 4, name="mixed-abort", timeout=60, host_id=f"h{hosts[r]}")
        ready.wait(30)
        try:
            if r == 1:
                work = comm.recv(np.empty(4), 0, async_op=True)  # rank 0 never sends
                ready.wait(30)
                try:
                    work.wait(timeout=30)
                    outcome[r] = None
                except ringcc.Error as exc:
                    outcome[r] = exc
            elif r == 2:
                ready.wait(30)
                comm.abort("boom from rank 2")
                aborted.set()
            else:
                ready.wait(30)
                aborted.wait(30)
        finally:
            comm.abort("test over")

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert isinstance(outcome.get(1), ringcc.AbortedError), outcome
    assert "boom from rank 2" in str(outcome[1])


def test_close_and_abort_racing_on_one_communicator(transport):
    """close() (draining a stuck operation) and abort() from two threads at once: both
    return, the stuck operation fails, nothing hangs or crashes."""
    comms = _pair(transport)
    stuck = comms[0].allreduce(np.ones(8), async_op=True)  # rank 1 never joins
    closer = threading.Thread(target=comms[0].close)
    closer.start()
    comms[0].abort("racing abort")
    closer.join(30)
    assert not closer.is_alive(), "close() hung"
    with pytest.raises(ringcc.Error, match="racing abort|aborted"):
        stuck.wait(timeout=30)
    comms[1].abort("test over")


def test_close_from_done_callback_is_refused(transport):
    """A done-callback runs on the progress thread, which close() would have to join:
    it gets a clear ValueError instead of a self-join."""
    seen = []
    registered = threading.Event()

    def body(comm):
        if comm.rank == 0:
            def callback(work):
                try:
                    comm.close()
                except ValueError as exc:
                    seen.append(str(exc))

            work = comm.allreduce(np.ones(4), async_op=True)
            work.add_done_callback(callback)  # before rank 1 joins: the op cannot be done yet
            registered.set()
            work.wait()
        else:
            assert registered.wait(30)
            comm.allreduce(np.ones(4))
        comm.barrier()  # still usable
        return True

    assert run_ranks(2, body, transport=transport) == [True, True]
    assert len(seen) == 1 and "done-callback" in seen[0], seen
