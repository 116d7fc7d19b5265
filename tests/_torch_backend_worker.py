"""One rank of tests/test_torch_backend.py: runs every check of a scenario on the "ringcc"
torch.distributed backend and on a gloo group in the same process, and prints one line
``RESULTS <json>`` mapping check names to "ok" or the failure text.

    python tests/_torch_backend_worker.py --rank R --world N --init-method URL --scenario main
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import gc
import importlib
import json
import sys
import time
import traceback
import warnings

import torch
import torch.distributed as dist

def load_backend():
    """``ringcc.torch_backend`` (importing ringcc registers it when torch is present)."""
    return importlib.import_module("ringcc.torch_backend")


R = dist.ReduceOp
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INTS = [torch.int32, torch.int64]
FLOAT_OPS = [R.SUM, R.PRODUCT, R.MIN, R.MAX, R.AVG]
INT_OPS = [R.SUM, R.PRODUCT, R.MIN, R.MAX, R.BAND, R.BOR, R.BXOR]


class Checks:
    def __init__(self, rank: int, world: int):
        self.rank = rank
        self.world = world
        self.results: dict = {}

    def run(self, name: str, fn) -> None:
        del MISMATCHES[:]
        try:
            fn()
            self.results[name] = "ok" if not MISMATCHES else "\n".join(MISMATCHES)
        except Exception:  # noqa: BLE001 - reported to the parent test
            self.results[name] = "\n".join(MISMATCHES + [traceback.format_exc(limit=6)])


class AnnouncedChecks(Checks):
    """Checks that announce each check first, so a hang's output says where it hung;
    ``only`` (--only PREFIX) runs just the checks whose name starts with it."""

    def __init__(self, rank: int, world: int, only: str = ""):
        super().__init__(rank, world)
        self.only = only

    def run(self, name: str, fn) -> None:
        if self.only and not name.startswith(self.only):
            return
        print(f"check {name}", flush=True)
        super().run(name, fn)


# Result mismatches are collected rather than raised, so that a rank whose check fails
# still issues the same collectives as its peers and later checks stay meaningful.
MISMATCHES: list = []


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = 0.0, atol: float = 0.0) -> None:
    if got.dtype != want.dtype or got.shape != want.shape:
        MISMATCHES.append(f"{what}: got {got.dtype}{tuple(got.shape)}, want {want.dtype}{tuple(want.shape)}")
    elif rtol == 0 and atol == 0:
        if not torch.equal(got, want):
            MISMATCHES.append(f"{what}: ringcc {got.flatten()[:8]} != reference {want.flatten()[:8]}")
    elif not torch.allclose(got.double(), want.double(), rtol=rtol, atol=atol):
        err = (got.double() - want.double()).abs().max().item()
        MISMATCHES.append(f"{what}: max abs difference {err} (rtol {rtol}, atol {atol})")


class Net(torch.nn.Module):
    """Three linear layers; with ``branch`` also a head used only when asked and a layer
    that is never used (for find_unused_parameters / static_graph)."""

    def __init__(self, width: int = 16, branch: bool = False):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, width)
        self.fc2 = torch.nn.Linear(width, width)
        self.fc3 = torch.nn.Linear(width, 4)
        self.branch = torch.nn.Linear(width, 4) if branch else None
        self.never = torch.nn.Linear(4, 4) if branch else None

    def forward(self, x, use_branch: bool = False):
        h = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        out = self.fc3(h)
        if use_branch:
            out = out + self.branch(h)
        return out


def params_of(model: "torch.nn.Module"):
    return [p.detach().clone() for p in model.parameters()]


def same_on_every_rank(tensors, what: str) -> None:
    """Bitwise equality of ``tensors`` across ranks (gathered over the GLOO group)."""
    world = dist.get_world_size()
    for i, t in enumerate(tensors):
        outs = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(outs, t.contiguous(), group=GLOO)
        for r, o in enumerate(outs):
            assert_same(o, t, f"{what}: tensor {i} on rank {r} vs this rank")


def values(shape, dtype, seed: int, lo: int = -4, hi: int = 5) -> torch.Tensor:
    """Small integers (exact under sum/prod/min/max in every dtype) for this rank."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, shape, generator=g).to(dtype)


def op_values(shape, dtype, seed: int, op) -> torch.Tensor:
    """values() in a range where `op` stays exact: small for PRODUCT, wide bit patterns
    for the bitwise ops (from seed + 1)."""
    if op in (R.BAND, R.BOR, R.BXOR):
        return values(shape, dtype, seed + 1, 0, 1 << 20)
    return values(shape, dtype, seed, *((-2, 3) if op == R.PRODUCT else (-4, 5)))


def both(fn, *tensors):
    """Run fn(group, *copies) on ringcc (the default group) and gloo; return both copies."""
    mine = [t.clone() for t in tensors]
    ref = [t.clone() for t in tensors]
    fn(None, *mine)
    fn(GLOO, *ref)
    return mine, ref


GLOO = None


# ----------------------------------------------------------------------- scenarios
def check_collectives(c: Checks) -> None:
    rank, world = c.rank, c.world
    seed = 1000 * rank

    # all_reduce: every dtype x op gloo supports, small integer values (exact).
    for dtype in FLOATS + INTS:
        for op in FLOAT_OPS if dtype.is_floating_point else INT_OPS:
            def allreduce(dtype=dtype, op=op):
                x = op_values((37,), dtype, seed + 1, op)
                (a,), (b,) = both(lambda g, t: dist.all_reduce(t, op=op, group=g), x)
                tol = torch.finfo(dtype).eps if op == R.AVG else 0.0
                assert_same(a, b, f"all_reduce {dtype} {op}", rtol=tol, atol=tol)
            c.run(f"allreduce/{str(dtype)[6:]}/{op}", allreduce)

    def allreduce_random():
        for dtype, n, tol in [(torch.float32, 100_003, 1e-5), (torch.float64, 5_000, 1e-12)]:
            g = torch.Generator().manual_seed(seed + 3)
            x = torch.randn(n, generator=g, dtype=dtype)
            (a,), (b,) = both(lambda grp, t: dist.all_reduce(t, group=grp), x)
            assert_same(a, b, f"all_reduce randn {dtype}", rtol=tol, atol=tol)
    c.run("allreduce/random_large", allreduce_random)

    def allreduce_noncontiguous():
        base = values((6, 10), torch.float32, seed + 4)
        a, b = base.clone().t(), base.clone().t()  # non-contiguous views
        assert not a.is_contiguous()
        dist.all_reduce(a)
        dist.all_reduce(b, group=GLOO)
        assert_same(a, b, "all_reduce non-contiguous")
    c.run("allreduce/noncontiguous", allreduce_noncontiguous)

    def allreduce_complex():
        x = torch.complex(values((9,), torch.float32, seed + 5), values((9,), torch.float32, seed + 6))
        (a,), (b,) = both(lambda g, t: dist.all_reduce(t, group=g), x)
        assert_same(a, b, "all_reduce complex64")
    c.run("allreduce/complex64", allreduce_complex)

    # ringcc's own out-of-place all_reduce: output gets the reduction, input is left as it
    # was; every dtype and op against gloo's in-place result on a copy.
    for dtype in FLOATS + INTS:
        def allreduce_into(dtype=dtype):
            pg = dist.group.WORLD
            for op in FLOAT_OPS if dtype.is_floating_point else INT_OPS:
                x = op_values((1003,), dtype, seed + 30, op)
                kept = x.clone()
                want = x.clone()
                dist.all_reduce(want, op=op, group=GLOO)
                out = torch.full_like(x, 7)
                work = pg.allreduce_into(out, x, op)
                assert work.wait() is True and work.get_future().wait()[0] is out
                tol = torch.finfo(dtype).eps if op == R.AVG else 0.0
                assert_same(out, want, f"allreduce_into {dtype} {op}", rtol=tol, atol=tol)
                assert torch.equal(x, kept), f"allreduce_into {dtype} {op} wrote its input"
        c.run(f"allreduce_into/{str(dtype)[6:]}", allreduce_into)

    def allreduce_into_layouts():
        pg = dist.group.WORLD
        x = values((6, 10), torch.float32, seed + 31)
        want = x.clone()
        dist.all_reduce(want, group=GLOO)
        # blocking, op by name, into a non-contiguous output
        out = torch.zeros(10, 6).t()
        assert not out.is_contiguous()
        pg.allreduce_into(out, x.clone(), "sum", async_op=False)
        assert_same(out, want, "allreduce_into non-contiguous output")
        # output is input: in place, also for a non-contiguous tensor
        y = x.clone()
        pg.allreduce_into(y, y).wait()
        assert_same(y, want, "allreduce_into in place")
        yt = x.clone().t()
        pg.allreduce_into(yt, yt).wait()
        assert_same(yt, want.t(), "allreduce_into in place, non-contiguous")
        # compressed: the same bits as the in-place compressed call, input left alone
        for wire in ("fp16", "bf16"):
            g = torch.Generator().manual_seed(seed + 32)
            z = torch.randn(5000, generator=g) * 1e3
            kept, same = z.clone(), z.clone()
            pg.allreduce_compressed(same, wire, op="avg").wait()
            out = torch.full_like(z, float("nan"))
            pg.allreduce_into(out, z, "avg", compression=wire).wait()
            assert torch.equal(out, same), f"allreduce_into {wire} differs from allreduce_compressed"
            assert torch.equal(z, kept), f"allreduce_into {wire} wrote its input"
        # bad arguments raise at the call, name what is wrong, and queue nothing
        for bad_out, inp, needle in [(torch.zeros(59), x, "(59,)"), (torch.zeros(6, 10, dtype=torch.float64), x, "float64"),
                                     (y.view(-1)[1:], y.view(-1)[:-1], "overlaps")]:
            try:
                pg.allreduce_into(bad_out, inp)
            except ValueError as exc:
                assert needle in str(exc) and f"rank {rank}" in str(exc), exc
            else:
                raise AssertionError(f"allreduce_into accepted {needle}")
        dist.barrier()
    c.run("allreduce_into/layouts", allreduce_into_layouts)

    def allreduce_coalesced():
        xs = [values((5,), torch.float32, seed + 7), values((3, 2), torch.float32, seed + 8)]
        want = [x.clone() for x in xs]
        for t in want:
            dist.all_reduce(t, group=GLOO)
        dist.all_reduce_coalesced(xs)
        for a, b in zip(xs, want):
            assert_same(a, b, "all_reduce_coalesced")
    c.run("allreduce/coalesced", allreduce_coalesced)

    def tensor_collectives_coalesced():
        # Inside _coalescing_manager torch batches these into the process group's
        # allgather_into_tensor_coalesced / reduce_scatter_tensor_coalesced.
        n = dist.get_world_size()
        ins = [values((4,), torch.float32, seed + 30), values((2, 3), torch.float32, seed + 31)]
        outs = [torch.empty((n * t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype) for t in ins]
        with dist._coalescing_manager():
            for o, i in zip(outs, ins):
                dist.all_gather_into_tensor(o, i)
        for o, i in zip(outs, ins):
            want = torch.empty_like(o)
            dist.all_gather_into_tensor(want, i, group=GLOO)
            assert_same(o, want, "allgather_into_tensor_coalesced")
        bigs = [values((n * 3,), torch.float32, seed + 32), values((n * 5,), torch.float32, seed + 33)]
        small = [torch.empty(b.numel() // n, dtype=b.dtype) for b in bigs]
        with dist._coalescing_manager():
            for o, i in zip(small, bigs):
                dist.reduce_scatter_tensor(o, i)
        for o, i in zip(small, bigs):
            want = torch.empty_like(o)
            dist.reduce_scatter_tensor(want, i.clone(), group=GLOO)
            assert_same(o, want, "reduce_scatter_tensor_coalesced", rtol=1e-6, atol=1e-6)
    c.run("coalesced/allgather_reduce_scatter_tensor", tensor_collectives_coalesced)

    def all_gather_coalesced():
        ins = [values((4,), torch.float32, seed + 34), values((2, 3), torch.float32, seed + 35)]
        got = [[torch.zeros_like(i) for i in ins] for _ in range(world)]  # [rank][input]
        want = [[torch.zeros_like(i) for i in ins] for _ in range(world)]
        with warnings.catch_warnings():  # deprecated in torch, still called by users
            warnings.simplefilter("ignore")
            dist.all_gather_coalesced(got, ins)
            dist.all_gather_coalesced(want, ins, group=GLOO)
        for g_list, w_list in zip(got, want):
            for a, b in zip(g_list, w_list):
                assert_same(a, b, "all_gather_coalesced")
    c.run("coalesced/all_gather_coalesced", all_gather_coalesced)

    # broadcast from every root, several dtypes.
    for dtype in [torch.float32, torch.int64, torch.bfloat16]:
        def broadcast(dtype=dtype):
            for root in range(world):
                x = values((11, 3), dtype, seed + 10 + root)
                (a,), (b,) = both(lambda g, t: dist.broadcast(t, src=root, group=g), x)
                assert_same(a, b, f"broadcast root {root}")
        c.run(f"broadcast/{str(dtype)[6:]}", broadcast)

    # all_gather (list), all_gather_into_tensor.
    for dtype in [torch.float32, torch.float64, torch.int32, torch.float16]:
        def all_gather(dtype=dtype):
            x = values((4, 3), dtype, seed + 20)
            outs_a = [torch.zeros(4, 3, dtype=dtype) for _ in range(world)]
            outs_b = [torch.zeros(4, 3, dtype=dtype) for _ in range(world)]
            dist.all_gather(outs_a, x)
            dist.all_gather(outs_b, x, group=GLOO)
            for a, b in zip(outs_a, outs_b):
                assert_same(a, b, "all_gather")
            out_a = torch.zeros(world * 4, 3, dtype=dtype)
            out_b = torch.zeros(world * 4, 3, dtype=dtype)
            dist.all_gather_into_tensor(out_a, x)
            dist.all_gather_into_tensor(out_b, x, group=GLOO)
            assert_same(out_a, out_b, "all_gather_into_tensor")
        c.run(f"allgather/{str(dtype)[6:]}", all_gather)

    def all_gather_uneven():  # gloo rejects uneven sizes: compare with the known answer
        x = torch.full((rank + 1,), float(rank))
        outs = [torch.empty(r + 1) for r in range(world)]
        dist.all_gather(outs, x)
        for r, o in enumerate(outs):
            assert_same(o, torch.full((r + 1,), float(r)), f"uneven all_gather block {r}")
    c.run("allgather/uneven", all_gather_uneven)

    # reduce_scatter (list) and reduce_scatter_tensor.
    for dtype, op in [(torch.float32, R.SUM), (torch.float64, R.MAX), (torch.int64, R.SUM), (torch.int32, R.MIN),
                      (torch.bfloat16, R.SUM), (torch.float32, R.AVG)]:
        def reduce_scatter(dtype=dtype, op=op):
            ins = [values((5,), dtype, seed + 30 + i) for i in range(world)]
            out_a, out_b = torch.zeros(5, dtype=dtype), torch.zeros(5, dtype=dtype)
            dist.reduce_scatter(out_a, [t.clone() for t in ins], op=op)
            dist.reduce_scatter(out_b, [t.clone() for t in ins], op=op, group=GLOO)
            tol = torch.finfo(dtype).eps if op == R.AVG else 0.0
            assert_same(out_a, out_b, f"reduce_scatter {dtype} {op}", rtol=tol, atol=tol)
            flat = values((world * 6, 2), dtype, seed + 40)
            out_a, out_b = torch.zeros(6, 2, dtype=dtype), torch.zeros(6, 2, dtype=dtype)
            dist.reduce_scatter_tensor(out_a, flat.clone(), op=op)
            dist.reduce_scatter_tensor(out_b, flat.clone(), op=op, group=GLOO)
            assert_same(out_a, out_b, f"reduce_scatter_tensor {dtype} {op}", rtol=tol, atol=tol)
        c.run(f"reduce_scatter/{str(dtype)[6:]}/{op}", reduce_scatter)

    # reduce to every root (only the root's result is defined).
    for dtype, op in [(torch.float32, R.SUM), (torch.int64, R.MAX), (torch.float16, R.SUM)]:
        def reduce(dtype=dtype, op=op):
            for root in range(world):
                x = values((13,), dtype, seed + 50 + root)
                (a,), (b,) = both(lambda g, t: dist.reduce(t, dst=root, op=op, group=g), x)
                if rank == root:
                    assert_same(a, b, f"reduce root {root}")
                else:
                    assert_same(a, x, "reduce leaves non-root input alone")
        c.run(f"reduce/{str(dtype)[6:]}/{op}", reduce)

    # gather and scatter.
    for dtype in [torch.float32, torch.int32]:
        def gather(dtype=dtype):
            root = world - 1
            x = values((2, 3), dtype, seed + 60)
            la = [torch.zeros(2, 3, dtype=dtype) for _ in range(world)] if rank == root else None
            lb = [torch.zeros(2, 3, dtype=dtype) for _ in range(world)] if rank == root else None
            dist.gather(x, la, dst=root)
            dist.gather(x, lb, dst=root, group=GLOO)
            if rank == root:
                for a, b in zip(la, lb):
                    assert_same(a, b, "gather")
        c.run(f"gather/{str(dtype)[6:]}", gather)

        def scatter(dtype=dtype):
            root = 1
            ins = [values((3, 2), dtype, 77 + i) for i in range(world)] if rank == root else None
            a, b = torch.zeros(3, 2, dtype=dtype), torch.zeros(3, 2, dtype=dtype)
            dist.scatter(a, ins, src=root)
            dist.scatter(b, ins, src=root, group=GLOO)
            assert_same(a, b, "scatter")
        c.run(f"scatter/{str(dtype)[6:]}", scatter)

    # all_to_all_single (equal and unequal splits) and all_to_all (lists).
    for dtype in [torch.float32, torch.int64]:
        def all_to_all_single(dtype=dtype):
            x = values((world * 2, 3), dtype, seed + 70)
            a, b = torch.zeros_like(x), torch.zeros_like(x)
            dist.all_to_all_single(a, x)
            dist.all_to_all_single(b, x, group=GLOO)
            assert_same(a, b, "all_to_all_single equal")
            # rank r sends (r + j + 1) rows to rank j.
            in_splits = [rank + j + 1 for j in range(world)]
            out_splits = [j + rank + 1 for j in range(world)]
            x = values((sum(in_splits), 2), dtype, seed + 71)
            a = torch.zeros(sum(out_splits), 2, dtype=dtype)
            b = torch.zeros_like(a)
            dist.all_to_all_single(a, x, out_splits, in_splits)
            dist.all_to_all_single(b, x, out_splits, in_splits, group=GLOO)
            assert_same(a, b, "all_to_all_single unequal")
        c.run(f"alltoall_single/{str(dtype)[6:]}", all_to_all_single)

    def all_to_all_lists():
        ins = [values((3, 2), torch.float32, seed + 80 + j) for j in range(world)]
        outs_a = [torch.zeros(3, 2) for _ in range(world)]
        outs_b = [torch.zeros(3, 2) for _ in range(world)]
        dist.all_to_all(outs_a, ins)
        dist.all_to_all(outs_b, ins, group=GLOO)
        for a, b in zip(outs_a, outs_b):
            assert_same(a, b, "all_to_all")
        # Unequal sizes (gloo rejects them): rank r sends j + r + 1 copies of 100 r + j to rank j.
        ins = [torch.full((rank + j + 1,), 100.0 * rank + j) for j in range(world)]
        outs = [torch.zeros(j + rank + 1) for j in range(world)]
        dist.all_to_all(outs, ins)
        for j, o in enumerate(outs):
            assert_same(o, torch.full((j + rank + 1,), 100.0 * j + rank), f"uneven all_to_all from {j}")
    c.run("alltoall/lists", all_to_all_lists)

    def barrier():
        dist.barrier()
        work = dist.barrier(async_op=True)
        work.wait()
        assert work.is_completed()
    c.run("barrier", barrier)

    def send_recv():
        # A ring of isend/irecv with a tag, then blocking send/recv between 0 and 1.
        nxt, prv = (rank + 1) % world, (rank - 1) % world
        x = torch.arange(6, dtype=torch.float32) + 10 * rank
        got = torch.zeros(6)
        works = [dist.isend(x, nxt, tag=7), dist.irecv(got, prv, tag=7)]
        for w in works:
            w.wait()
        assert_same(got, torch.arange(6, dtype=torch.float32) + 10 * prv, "isend/irecv ring")
        if rank == 0:
            dist.send(torch.tensor([5, 6, 7]), 1, tag=3)
            back = torch.zeros(3, dtype=torch.int64)
            dist.recv(back, 1, tag=4)
            assert_same(back, torch.tensor([6, 7, 8]), "send/recv reply")
        elif rank == 1:
            t = torch.zeros(3, dtype=torch.int64)
            dist.recv(t, 0, tag=3)
            dist.send(t + 1, 0, tag=4)
    c.run("send_recv", send_recv)

    def send_recv_large_crossing():
        # Every rank sends 16 MiB to both neighbours and receives from both, posting the
        # sends first: they can only finish together with the peers' receives. Then the
        # same through batch_isend_irecv.
        nxt, prv = (rank + 1) % world, (rank - 1) % world
        n = 4 << 20
        mine = torch.full((n,), float(rank))
        from_prv, from_nxt = torch.empty(n), torch.empty(n)
        works = [dist.isend(mine, nxt, tag=1), dist.isend(mine, prv, tag=2),
                 dist.irecv(from_prv, prv, tag=1), dist.irecv(from_nxt, nxt, tag=2)]
        for w in works:
            w.wait()
        assert_same(from_prv, torch.full((n,), float(prv)), "large isend/irecv from the left")
        assert_same(from_nxt, torch.full((n,), float(nxt)), "large isend/irecv from the right")
        got = torch.empty(n)
        ops = [dist.P2POp(dist.isend, mine + 1, nxt), dist.P2POp(dist.irecv, got, prv)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        assert_same(got, torch.full((n,), float(prv + 1)), "batch_isend_irecv")
    c.run("send_recv/large_crossing", send_recv_large_crossing)

    def async_future():
        # Rank 0 issues an async all_reduce that cannot finish before the other ranks
        # pass a gloo barrier that rank 0 enters only after the call returned: a call
        # that blocked until completion would deadlock here (and fail on the timeout).
        x = torch.full((1000,), float(rank + 1))
        if rank == 0:
            work = dist.all_reduce(x, async_op=True)
            assert not work.is_completed(), "async all_reduce completed before the peers joined"
            dist.barrier(group=GLOO)
        else:
            dist.barrier(group=GLOO)
            work = dist.all_reduce(x, async_op=True)
        doubled = work.get_future().then(lambda fut: fut.value()[0] * 2)
        value = work.get_future().wait()
        want = torch.full((1000,), float(world * (world + 1) // 2))
        assert isinstance(value, list) and len(value) == 1 and value[0] is x
        assert_same(x, want, "async all_reduce")
        assert_same(doubled.wait(), want * 2, "future.then")
        assert work.wait() is True and work.is_completed() and work.exception() is None
        # Several in flight at once, then the futures of all of them.
        xs = [torch.full((50_000,), float(rank + i)) for i in range(4)]
        works = [dist.all_reduce(t, op=R.MAX, async_op=True) for t in xs]
        torch.futures.wait_all([w.get_future() for w in works])
        for i, t in enumerate(xs):
            assert_same(t, torch.full((50_000,), float(world - 1 + i)), "overlapping async all_reduce")
    c.run("async/future", async_future)

    def subgroup():
        ranks = [0, world - 1]
        sub = dist.new_group(ranks, backend="ringcc")
        sub_gloo = dist.new_group(ranks, backend="gloo")
        if rank in ranks:
            assert dist.get_backend(sub) == "ringcc"
            x = values((8,), torch.float32, seed + 90)
            a, b = x.clone(), x.clone()
            dist.all_reduce(a, group=sub)
            dist.all_reduce(b, group=sub_gloo)
            assert_same(a, b, "subgroup all_reduce")
            outs = [torch.zeros(8) for _ in ranks]
            dist.all_gather(outs, x, group=sub)
            want = [torch.zeros(8) for _ in ranks]
            dist.all_gather(want, x, group=sub_gloo)
            for o, w in zip(outs, want):
                assert_same(o, w, "subgroup all_gather")
            y = x.clone()
            dist.broadcast(y, src=world - 1, group=sub)  # global rank of the group's rank 1
            z = x.clone()
            dist.broadcast(z, src=world - 1, group=sub_gloo)
            assert_same(y, z, "subgroup broadcast")
        dist.barrier(group=GLOO)
    c.run("subgroup", subgroup)

    def ddp():
        # The same tiny model trained 5 steps with DDP over ringcc and over gloo.
        def build():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))

        def train(group):
            model = build()
            ddp_model = torch.nn.parallel.DistributedDataParallel(model, process_group=group,
                                                                  bucket_cap_mb=0.0005)  # several buckets
            opt = torch.optim.SGD(ddp_model.parameters(), lr=0.1, momentum=0.9)
            g = torch.Generator().manual_seed(100 + rank)
            for _ in range(5):
                inp, target = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
                opt.zero_grad()
                torch.nn.functional.mse_loss(ddp_model(inp), target).backward()
                opt.step()
            return [p.detach().clone() for p in model.parameters()]

        mine = train(None)
        ref = train(GLOO)
        start = [p.detach() for p in build().parameters()]
        assert any(not torch.equal(a, s) for a, s in zip(mine, start)), "DDP training did not change the model"
        for a, b in zip(mine, ref):
            assert_same(a, b, "DDP ringcc vs gloo parameters", rtol=1e-6, atol=1e-7)
        # Every rank holds the same parameters.
        for p in mine:
            outs = [torch.zeros_like(p) for _ in range(world)]
            dist.all_gather(outs, p, group=GLOO)
            for o in outs:
                assert_same(o, p, "DDP parameters across ranks")
    c.run("ddp", ddp)

    def errors():
        try:
            dist.all_reduce(torch.zeros(3, dtype=torch.int16))
        except (TypeError, ValueError) as exc:
            assert "int16" in str(exc), exc
        else:
            raise AssertionError("int16 all_reduce did not raise")
        dist.barrier()  # nothing was queued: the group still works
    c.run("errors/bad_dtype", errors)


def check_timeout(c: Checks, init_method: str) -> None:
    """Re-initialise with timeout=2 s; rank 0 runs all_reduce alone."""
    rank = c.rank
    dist.init_process_group("ringcc", init_method=init_method, rank=rank, world_size=c.world,
                            timeout=datetime.timedelta(seconds=2))
    gloo = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=60))

    def timeout():
        if rank != 0:
            dist.barrier(group=gloo)  # leaves rank 0 alone in its all_reduce
            return
        start = time.monotonic()
        try:
            dist.all_reduce(torch.ones(4))
        except Exception as exc:  # noqa: BLE001
            elapsed = time.monotonic() - start
            assert isinstance(exc, TimeoutError), f"{type(exc).__name__}: {exc}"
            assert 1.5 <= elapsed < 30, f"timed out after {elapsed:.2f} s, configured 2 s"
        else:
            raise AssertionError("all_reduce without peers did not time out")
        # The group is now aborted: a later async op fails through Work and future.
        work = dist.all_reduce(torch.ones(4), async_op=True)
        try:
            work.wait()
        except Exception:  # noqa: BLE001
            pass
        else:
            raise AssertionError("Work.wait() after the timeout did not raise")
        assert work.is_completed() and work.exception() is not None
        try:
            work.get_future().wait()
        except Exception:  # noqa: BLE001
            pass
        else:
            raise AssertionError("future of a failed op did not raise")
        dist.barrier(group=gloo)
    c.run("timeout", timeout)


def worker_args(**extra: dict) -> argparse.Namespace:
    """The command line every worker of the shared launcher (test_torch_backend._launch)
    takes; `extra` adds options: name -> add_argument keywords."""
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--init-method", required=True)
    p.add_argument("--timeout-init-method", default="")
    for name, kwargs in extra.items():
        p.add_argument(name, **kwargs)
    args = p.parse_args()
    torch.set_num_threads(1)
    return args


def start_tool_worker(hang_report_s: float = 200) -> tuple:
    """The start shared by the DDP and torch-tools workers: arguments (with --only), the
    ringcc backend registered, every thread's stack dumped if the worker still runs after
    `hang_report_s` (the launcher kills at 240 s), a ringcc default group and a gloo group
    over all ranks (GLOO). Returns (the backend module, AnnouncedChecks)."""
    global GLOO
    args = worker_args(**{"--only": dict(default="", help="run only the checks whose name starts with this")})
    tb = load_backend()
    tb.register()
    faulthandler.dump_traceback_later(hang_report_s, exit=True)  # diagnostics only
    checks = AnnouncedChecks(args.rank, args.world, args.only)
    dist.init_process_group("ringcc", init_method=args.init_method, rank=args.rank, world_size=args.world,
                            timeout=datetime.timedelta(seconds=60))
    GLOO = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=60))
    return tb, checks


def destroy_groups(*worker_modules) -> None:
    """Destroys every process group and drops the GLOO references that this module and
    `worker_modules` hold, so that no group outlives the interpreter. A gloo group still
    referenced at exit is torn down during finalisation, when its worker threads can no
    longer take the GIL to release the tensors of their last work: the thread is ended
    by force and the process aborts ("terminate called without an active exception")."""
    global GLOO
    for module in worker_modules:
        module.GLOO = None
    GLOO = None
    # A group can also be held by a reference cycle (a wrapper and its strategy), which
    # only the collector frees: free it now, while the threads can still take the GIL,
    # and again after the registry has let go of the groups.
    gc.collect()
    dist.destroy_process_group()
    gc.collect()


def main() -> int:
    global GLOO
    args = worker_args()
    tb = load_backend()
    tb.register()
    tb.register()  # idempotent
    c = Checks(args.rank, args.world)
    dist.init_process_group("ringcc", init_method=args.init_method, rank=args.rank, world_size=args.world,
                            timeout=datetime.timedelta(seconds=60))
    GLOO = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=60))
    c.results["setup"] = "ok" if (dist.get_backend() == "ringcc"
                                  and isinstance(dist.group.WORLD, tb.RingccProcessGroup)) else \
        f"default group is {dist.get_backend()} / {type(dist.group.WORLD).__name__}"
    check_collectives(c)
    destroy_groups()
    if args.timeout_init_method:
        check_timeout(c, args.timeout_init_method)
        dist.destroy_process_group()
    print("RESULTS " + json.dumps(c.results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
