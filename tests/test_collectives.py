"""Property tests of every collective other than allreduce, on both transports and
world sizes 1..8, against NumPy references; results are checked on every rank."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_ranks
from reference import check_reduction, make_input, ops_for

DATA_DTYPES = ["float16", "float32", "float64", "int8", "uint8", "int32", "int64", "bool"]
COUNTS = [0, 1, 2, 7, 13, 100, 1021, 70_001]
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

common = dict(
    world=st.integers(1, 8),
    count=st.sampled_from(COUNTS),
    dtype=st.sampled_from(DATA_DTYPES),
    transport=st.sampled_from(["shm", "tcp"]),
    seed=st.integers(0, 2**31),
    segment=st.sampled_from([16, 4096, 256 << 10]),
)


def inputs_for(world, dtype, count, seed, op="sum"):
    return [make_input(dtype, count, r, seed, op) for r in range(world)]


@SETTINGS
@given(root=st.integers(0, 7), **common)
def test_broadcast(world, count, dtype, transport, seed, segment, root):
    root %= world
    data = inputs_for(world, dtype, count, seed)

    def body(comm):
        x = data[comm.rank].copy()
        comm.broadcast(x, root, segment_bytes=segment)
        return x

    for out in run_ranks(world, body, transport=transport, small_message_bytes=512):
        np.testing.assert_array_equal(out, data[root])


@SETTINGS
@given(**common)
def test_allgather(world, count, dtype, transport, seed, segment):
    data = inputs_for(world, dtype, count, seed)

    def body(comm):
        return comm.allgather(data[comm.rank])

    want = np.stack(data)
    for out in run_ranks(world, body, transport=transport):
        assert out.shape == (world, count)
        np.testing.assert_array_equal(out, want)


@SETTINGS
@given(world=st.integers(1, 8), sizes=st.lists(st.sampled_from(COUNTS[:6]), min_size=8, max_size=8),
       transport=st.sampled_from(["shm", "tcp"]), in_place=st.booleans())
def test_allgather_v(world, sizes, transport, in_place):
    counts = sizes[:world]
    data = [np.arange(c, dtype=np.int64) + 1000 * r for r, c in enumerate(counts)]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)

    def body(comm):
        r = comm.rank
        if in_place:  # the input is this rank's block of the output
            out = np.zeros(sum(counts), np.int64)
            out[offsets[r]:offsets[r + 1]] = data[r]
            return comm.allgather_v(out[offsets[r]:offsets[r + 1]], counts, out=out)
        return comm.allgather_v(data[r], counts)

    for out in run_ranks(world, body, transport=transport):
        np.testing.assert_array_equal(out, np.concatenate(data))


@SETTINGS
@given(op_index=st.integers(0, 6), **common)
def test_reduce_scatter(world, count, dtype, transport, seed, segment, op_index):
    ops = ops_for(dtype)
    op = ops[op_index % len(ops)]
    data = inputs_for(world, dtype, count * world, seed, op)

    def body(comm):
        x = data[comm.rank]
        before = x.copy()
        out = comm.reduce_scatter(x, op, segment_bytes=segment)
        np.testing.assert_array_equal(x, before)  # input untouched
        return out

    outs = run_ranks(world, body, transport=transport)
    for r, out in enumerate(outs):
        check_reduction(out, [d[r * count:(r + 1) * count] for d in data], op, dtype)


@SETTINGS
@given(world=st.integers(1, 6), sizes=st.lists(st.integers(0, 300), min_size=6, max_size=6),
       transport=st.sampled_from(["shm", "tcp"]), seed=st.integers(0, 2**31))
def test_reduce_scatter_uneven_counts(world, sizes, transport, seed):
    counts = sizes[:world]
    data = inputs_for(world, "int32", sum(counts), seed)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)

    outs = run_ranks(world, lambda c: c.reduce_scatter(data[c.rank], "sum", counts=counts), transport=transport)
    for r, out in enumerate(outs):
        check_reduction(out, [d[offsets[r]:offsets[r + 1]] for d in data], "sum", "int32")


@SETTINGS
@given(root=st.integers(0, 7), op_index=st.integers(0, 6), **common)
def test_reduce(world, count, dtype, transport, seed, segment, root, op_index):
    root %= world
    ops = ops_for(dtype)
    op = ops[op_index % len(ops)]
    data = inputs_for(world, dtype, count, seed, op)

    def body(comm):
        x = data[comm.rank].copy()
        out = comm.reduce(x, root, op)
        if comm.rank != root:
            assert out is None
            np.testing.assert_array_equal(x, data[comm.rank])  # non-root input untouched
        return out

    outs = run_ranks(world, body, transport=transport, small_message_bytes=1024)
    check_reduction(outs[root], data, op, dtype)


@SETTINGS
@given(root=st.integers(0, 7), **common)
def test_gather_and_scatter(world, count, dtype, transport, seed, segment, root):
    root %= world
    data = inputs_for(world, dtype, count, seed)
    full = make_input(dtype, count * world, 99, seed, "sum")

    def body(comm):
        gathered = comm.gather(data[comm.rank], root)
        out = np.zeros(count, dtype=full.dtype)
        comm.scatter(full if comm.rank == root else None, out, root)
        return gathered, out

    outs = run_ranks(world, body, transport=transport)
    for r, (gathered, out) in enumerate(outs):
        if r == root:
            np.testing.assert_array_equal(gathered, np.stack(data))
        else:
            assert gathered is None
        np.testing.assert_array_equal(out, full[r * count:(r + 1) * count])


@SETTINGS
@given(**common)
def test_alltoall(world, count, dtype, transport, seed, segment):
    data = inputs_for(world, dtype, count * world, seed)

    outs = run_ranks(world, lambda c: c.alltoall(data[c.rank].reshape(world, count)), transport=transport)
    for r, out in enumerate(outs):
        want = np.stack([data[src][r * count:(r + 1) * count] for src in range(world)])
        np.testing.assert_array_equal(out, want)


@SETTINGS
@given(world=st.integers(1, 6), matrix=st.lists(st.integers(0, 50), min_size=36, max_size=36),
       transport=st.sampled_from(["shm", "tcp"]), in_place=st.booleans())
def test_alltoall_v(world, matrix, transport, in_place):
    # split[i][j]: elements rank i sends to rank j.
    split = [[matrix[i * 6 + j] for j in range(world)] for i in range(world)]

    def payload(i, j):
        return np.arange(split[i][j], dtype=np.float64) + 100 * i + 10000 * j

    def body(comm):
        r = comm.rank
        send = np.concatenate([payload(r, j) for j in range(world)])
        recv_counts = [split[i][r] for i in range(world)]
        if in_place and sum(split[r]) == sum(recv_counts):
            return comm.alltoall(send, out=send, send_counts=split[r], recv_counts=recv_counts)
        return comm.alltoall(send, send_counts=split[r], recv_counts=recv_counts)

    outs = run_ranks(world, body, transport=transport)
    for r, out in enumerate(outs):
        np.testing.assert_array_equal(out, np.concatenate([payload(i, r) for i in range(world)]))


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_barrier_orders_ranks(transport, world):
    """Every rank's pre-barrier write is visible to every rank after the barrier."""
    arrived = [False] * world

    def body(comm):
        arrived[comm.rank] = True
        comm.barrier()
        return all(arrived)

    assert all(run_ranks(world, body, transport=transport))


def test_send_recv_ordered_with_tags(transport):
    def body(comm):
        if comm.rank == 0:
            for i in range(5):
                comm.send(np.full(10 + i, i, np.int32), 1, tag=i)
            return None
        got = []
        for i in range(5):
            x = np.empty(10 + i, np.int32)
            comm.recv(x, 0, tag=i)
            got.append(x)
        return got

    got = run_ranks(2, body, transport=transport)[1]
    for i, x in enumerate(got):
        np.testing.assert_array_equal(x, np.full(10 + i, i, np.int32))


def test_send_recv_does_not_disturb_collectives(transport):
    """Ranks 0 and 1 exchange point-to-point messages between collectives that rank 2
    also joins; the collective sequence numbers stay in step."""
    def body(comm):
        x = np.ones(4, np.float32)
        if comm.rank == 0:
            comm.send(np.arange(3.0), 1)
        elif comm.rank == 1:
            y = np.empty(3)
            comm.recv(y, 0)
            assert y.tolist() == [0.0, 1.0, 2.0]
        comm.allreduce(x)
        return x

    for out in run_ranks(3, body, transport=transport):
        np.testing.assert_array_equal(out, np.full(4, 3, np.float32))


BIG = 3 << 20  # float32 elements: 12 MiB, far more than a shared-memory ring or socket buffer holds


@pytest.mark.parametrize("order", ["send_first", "recv_first", "mixed"])
def test_isend_irecv_pairs_progress_together(transport, order):
    """Both ranks post a large isend and an irecv to each other. Neither send can finish
    before the other rank receives, so the two must progress together, whichever order
    each rank posts them in."""
    def body(comm):
        peer = 1 - comm.rank
        x = np.full(BIG, comm.rank + 1, np.float32)
        y = np.zeros(BIG, np.float32)
        send_first = order == "send_first" or (order == "mixed" and comm.rank == 0)
        if send_first:
            works = [comm.send(x, peer, async_op=True), comm.recv(y, peer, async_op=True)]
        else:
            works = [comm.recv(y, peer, async_op=True), comm.send(x, peer, async_op=True)]
        for w in works:
            w.wait()
        return y

    for rank, y in enumerate(run_ranks(2, body, transport=transport, timeout=60)):
        np.testing.assert_array_equal(y, np.full(BIG, 2 - rank, np.float32))


def test_isend_irecv_ring_shift_then_collective(transport):
    """Every rank sends a large message to its right neighbour and receives from its left,
    several tagged messages per pair, then joins an allreduce queued behind them."""
    world = 3

    def body(comm):
        r = comm.rank
        right, left = (r + 1) % world, (r - 1) % world
        sizes = [BIG // 2, 7, 0, BIG // 3]
        outs = [np.empty(n, np.int32) for n in sizes]
        works = []
        for tag, n in enumerate(sizes):
            works.append(comm.send(np.full(n, 100 * r + tag, np.int32), right, tag=tag, async_op=True))
            works.append(comm.recv(outs[tag], left, tag=tag, async_op=True))
        total = np.full(5, r, np.float64)
        works.append(comm.allreduce(total, async_op=True))
        for w in works:
            w.wait()
        return left, outs, total

    for left, outs, total in run_ranks(world, body, transport=transport, timeout=60):
        for tag, out in enumerate(outs):
            np.testing.assert_array_equal(out, np.full(out.size, 100 * left + tag, np.int32))
        np.testing.assert_array_equal(total, np.full(5, 0 + 1 + 2, np.float64))


def test_p2p_batch_finishes_each_work_on_its_own():
    """A small receive completes while a large send posted before it still waits for a
    receiver, which only posts once rank 0 has seen the small message (ranks are threads
    here, so an Event carries that signal outside ringcc)."""
    checked = threading.Event()

    def body(comm):
        if comm.rank == 0:
            big = comm.send(np.ones(BIG, np.float32), 1, async_op=True)
            small = np.zeros(1, np.int64)
            comm.recv(small, 1, async_op=True).wait()
            done_before = big.is_completed()
            checked.set()
            big.wait()
            return int(small[0]), done_before
        comm.send(np.array([42], np.int64), 0)
        assert checked.wait(60), "rank 0 never received the small message"
        y = np.zeros(BIG, np.float32)
        comm.recv(y, 0)
        assert (y == 1).all()
        return None

    small, done_before = run_ranks(2, body, transport="shm", timeout=60)[0]
    assert small == 42
    assert not done_before  # rank 1 had not received it yet


def test_async_ops_complete_in_issue_order():
    def body(comm):
        xs = [np.full(1000, comm.rank + i, np.int64) for i in range(20)]
        works = [comm.allreduce(x, async_op=True) for x in xs]
        return [w.wait() for w in works]

    world = 3
    for outs in run_ranks(world, body):
        for i, x in enumerate(outs):
            np.testing.assert_array_equal(x, np.full(1000, sum(r + i for r in range(world))))


def test_torch_tensors_and_torch_stores():
    torch = pytest.importorskip("torch")
    import torch.distributed as dist

    store = dist.HashStore()

    def body(comm):
        t = torch.arange(10, dtype=torch.bfloat16) * (comm.rank + 1)
        comm.allreduce(t)
        g = comm.allgather(torch.tensor([comm.rank], dtype=torch.int64))
        return t, g

    outs = run_ranks(2, body, store=store)
    for t, g in outs:
        assert torch.equal(t, torch.arange(10, dtype=torch.bfloat16) * 3)
        assert g.tolist() == [[0], [1]]


def test_transport_selection():
    assert run_ranks(2, lambda c: c.transport_to(1 - c.rank), transport="auto") == ["shm", "shm"]
    assert run_ranks(2, lambda c: c.transport_to(1 - c.rank), transport="tcp") == ["tcp", "tcp"]
    assert run_ranks(2, lambda c: c.transport_to(1 - c.rank), transport="tcp", tcp_streams=3) == ["tcp", "tcp"]


def test_tcp_multi_stream_striping():
    """Several connections per peer: a payload crossing many 256 KiB stripes arrives intact."""
    data = [np.random.default_rng(r).standard_normal(700_001) for r in range(3)]

    def body(comm):
        x = data[comm.rank].copy()
        comm.allreduce(x)
        return x

    for out in run_ranks(3, body, transport="tcp", tcp_streams=3):
        np.testing.assert_allclose(out, sum(data), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("world", [1, 3, 4])
def test_outputs_stay_inside_their_buffers(transport, world):
    """Every collective writing into caller-provided outputs with guard bytes on both
    sides: no byte outside the output changes, and inputs are left untouched."""
    from guarded import Guarded

    count = 37  # ragged against every world size and segment size used here

    def body(comm):
        r, n = comm.rank, comm.world_size
        src = Guarded("int32", count).fill_from(np.arange(count) + 100 * r)
        src_before = src.bytes()
        outs = {}

        def out(name, elements):
            outs[name] = Guarded("int32", elements)
            return outs[name].array

        comm.allreduce(src.array, out=out("allreduce", count), segment_bytes=16)
        comm.allgather(src.array, out=out("allgather", n * count).reshape(n, count))
        comm.allgather_v(src.array[: r + 1], [i + 1 for i in range(n)], out=out("allgather_v", n * (n + 1) // 2))
        big = Guarded("int32", n * count).fill_from(np.arange(n * count) + r)
        comm.reduce_scatter(big.array, out=out("reduce_scatter", count), segment_bytes=16)
        comm.reduce(src.array, 0, out=out("reduce", count) if r == 0 else None)
        comm.gather(src.array, 0, out=out("gather", n * count).reshape(n, count) if r == 0 else None)
        comm.scatter(big.array if r == n - 1 else None, out("scatter", count), root=n - 1)
        comm.alltoall(big.array.reshape(n, count), out=out("alltoall", n * count).reshape(n, count))
        bcast = Guarded("int32", count).fill_from(np.full(count, r))
        comm.broadcast(bcast.array, root=n - 1, segment_bytes=16)
        outs["broadcast"] = bcast
        if n > 1:
            if r == 0:
                comm.send(src.array, 1, tag=3)
            elif r == 1:
                comm.recv(out("recv", count), 0, tag=3)
        for name, g in outs.items():
            g.assert_guards_intact()
        src.assert_guards_intact()
        big.assert_guards_intact()
        assert src.bytes() == src_before, "an input was modified"
        return {name: np.frombuffer(g.bytes(), np.int32).copy() for name, g in outs.items()}

    results = run_ranks(world, body, transport=transport, small_message_bytes=64)
    n = world
    base = [np.arange(count) + 100 * r for r in range(n)]
    bigs = [np.arange(n * count) + r for r in range(n)]
    for r, got in enumerate(results):
        np.testing.assert_array_equal(got["allreduce"], sum(base))
        np.testing.assert_array_equal(got["allgather"], np.concatenate(base))
        np.testing.assert_array_equal(got["allgather_v"], np.concatenate([base[i][: i + 1] for i in range(n)]))
        np.testing.assert_array_equal(got["reduce_scatter"], sum(bigs)[r * count:(r + 1) * count])
        np.testing.assert_array_equal(got["scatter"], bigs[n - 1][r * count:(r + 1) * count])
        np.testing.assert_array_equal(got["alltoall"], np.concatenate([b[r * count:(r + 1) * count] for b in bigs]))
        np.testing.assert_array_equal(got["broadcast"], np.full(count, n - 1))
        if r == 0:
            np.testing.assert_array_equal(got["reduce"], sum(base))
            np.testing.assert_array_equal(got["gather"], np.concatenate(base))
        if r == 1:
            np.testing.assert_array_equal(got["recv"], base[0])


def test_dlpack_and_buffer_protocol_objects():
    """Objects that are neither NumPy arrays nor tensors: __dlpack__ exporters are read
    through DLPack, bytearray/array.array through the buffer protocol (in place)."""
    import array

    class DLPackOnly:
        def __init__(self, arr):
            self._arr = arr

        def __dlpack__(self, **kwargs):
            return self._arr.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self._arr.__dlpack_device__()

    def body(comm):
        backing = np.full(6, comm.rank + 1, np.float64)
        comm.allreduce(DLPackOnly(backing))  # written through the DLPack view
        buf = array.array("i", [comm.rank] * 5)
        comm.allreduce(buf, "max")
        raw = bytearray([comm.rank + 1] * 4)
        comm.allreduce(raw, "bor")
        return backing, list(buf), bytes(raw)

    for backing, buf, raw in run_ranks(3, body):
        np.testing.assert_array_equal(backing, np.full(6, 6.0))
        assert buf == [2] * 5
        assert raw == bytes([1 | 2 | 3] * 4)


@pytest.mark.parametrize("world,hosts", [(4, [0, 0, 1, 1]), (5, [0, 1, 0, 1, 1]), (3, [0, 1, 2])])
def test_mixed_shm_and_tcp_mesh(world, hosts):
    """Emulated hosts: shared memory inside a host, TCP across, in one communicator. The
    ring crosses both kinds of link and the exchanger waits on both at once."""
    data = [np.random.default_rng(r).standard_normal(300_001) for r in range(world)]

    def body(comm):
        r = comm.rank
        kinds = [comm.transport_to(p) for p in range(world)]
        x = data[r].copy()
        comm.allreduce(x, segment_bytes=32 << 10)
        small = np.full(3, r, np.int64)
        comm.allreduce(small, "max")
        g = comm.allgather(np.array([r], np.int32))
        comm.barrier()
        return kinds, x, small, g

    results = run_ranks(world, body, transport="auto", per_rank=lambda r: {"host_id": f"host{hosts[r]}"})
    for r, (kinds, x, small, g) in enumerate(results):
        assert kinds == ["self" if p == r else ("shm" if hosts[p] == hosts[r] else "tcp") for p in range(world)]
        np.testing.assert_allclose(x, sum(data), rtol=1e-12, atol=1e-12)
        assert x.tobytes() == results[0][1].tobytes()
        np.testing.assert_array_equal(small, np.full(3, world - 1))
        np.testing.assert_array_equal(g.ravel(), np.arange(world))


def test_world_and_subgroup_communicators_interleaved(transport):
    """Each rank holds two communicators (the world and an odd/even subgroup) and uses
    them alternately; sequence numbers and links are per communicator."""
    import ringcc
    from conftest import MemoryStore

    world = 4
    store = MemoryStore()

    def body(w):
        r = w.rank
        with ringcc.Communicator(store, r // 2, 2, name=f"sub{r % 2}", transport=transport, timeout=60) as sub:
            got = []
            for i in range(3):
                a = np.full(5, r + i, np.int64)
                w.allreduce(a)
                b = np.full(5, r, np.int64)
                sub.allreduce(b, async_op=True).wait()
                got.append((a.tolist(), b.tolist()))
        return got

    for r, got in enumerate(run_ranks(world, body, transport=transport, store=store)):
        for i, (a, b) in enumerate(got):
            assert a == [sum(q + i for q in range(world))] * 5
            assert b == [sum(q for q in range(world) if q % 2 == r % 2)] * 5


def test_listen_address_from_interface_name(monkeypatch):
    from ringcc.comm import _listen_address

    monkeypatch.setenv("RINGCC_SOCKET_IFNAME", "lo")
    assert _listen_address(object(), None) == "127.0.0.1"
    monkeypatch.setenv("RINGCC_SOCKET_IFNAME", "no-such-if0")
    with pytest.raises(ValueError, match="no-such-if0"):
        _listen_address(object(), None)
    monkeypatch.delenv("RINGCC_SOCKET_IFNAME")
    assert _listen_address(object(), "10.1.2.3") == "10.1.2.3"  # explicit wins


def test_tcp_ranks_listen_where_told():
    """listen_address= is what peers dial: a TCP mesh over an explicit loopback address."""
    outs = run_ranks(3, lambda c: c.allreduce(np.ones(2)).tolist(), transport="tcp", listen_address="127.0.0.1")
    assert outs == [[3.0, 3.0]] * 3
