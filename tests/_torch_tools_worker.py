"""One rank of tests/test_torch_tools.py: PyTorch's own distributed tools (DDP options,
comm hooks, ZeroRedundancyOptimizer, DistributedSampler, object collectives, subgroups)
on the "ringcc" backend, each compared with the same run on a gloo group in this
process; DDP's communication/computation overlap; mismatch errors. Prints one line
``RESULTS <json>`` mapping check names to "ok" or the failure text.

    python tests/_torch_tools_worker.py --rank R --world N --init-method URL

Re-initialisations (the mismatch scenario) rendezvous through FileStores created in the
working directory, which the launcher makes private to one launch.

Not covered here: SyncBatchNorm (torch raises on CPU tensors), monitored_barrier (gloo
only in torch) and point-to-point operations (being reworked in the engine).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powerSGD
from torch.distributed.algorithms.join import Join
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import _torch_backend_worker as base  # tests/ is this script's directory
from _torch_backend_worker import Checks, Net, assert_same, load_backend, params_of, same_on_every_rank

GLOO = None  # a gloo group over all ranks, set in main()
RTOL, ATOL = 1e-6, 1e-7  # ringcc vs gloo parameters (sums over 3 ranks may round differently)


# -------------------------------------------------------------------------- helpers
def make_model(**kw) -> Net:
    torch.manual_seed(0)  # the same initial model on every rank and for both backends
    return Net(**kw)


def batches(n: int, seed: int, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 8, generator=g), torch.randn(size, 4, generator=g)) for _ in range(n)]


def loss_of(out, target):
    return nn.functional.mse_loss(out, target)


def compare_training(train, what: str, initial=None, rtol: float = RTOL, atol: float = ATOL, reference=None):
    """``train(group)`` -> parameter list, once on ringcc (group None: the default group)
    and once on gloo (or ``reference()``); the results must match each other, differ
    from the initial model and be identical on every rank. Returns both results."""
    mine = train(None)
    ref = train(GLOO) if reference is None else reference()
    if initial is not None:
        assert any(not torch.equal(a, s) for a, s in zip(mine, initial)), f"{what}: training did not change the model"
    assert len(mine) == len(ref), f"{what}: {len(mine)} vs {len(ref)} parameters"
    for i, (a, b) in enumerate(zip(mine, ref)):
        assert_same(a, b, f"{what}: parameter {i} ringcc vs gloo", rtol=rtol, atol=atol)
    same_on_every_rank(mine, f"{what} (ringcc)")
    return mine, ref


def pg_of(group):
    return group if group is not None else dist.group.WORLD


# ------------------------------------------------------------------------ 1. DDP
def check_ddp_variants(c: Checks) -> None:
    rank = c.rank
    initial = params_of(make_model())
    initial_branch = params_of(make_model(branch=True))

    def no_sync():
        # Gradient accumulation: 3 micro-batches per step, only the last one syncs.
        def train(group):
            model = make_model()
            ddp = DDP(model, process_group=group, bucket_cap_mb=0.0005)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
            data = batches(9, 100 + rank)
            for step in range(3):
                opt.zero_grad()
                for micro in range(3):
                    x, y = data[3 * step + micro]
                    ctx = ddp.no_sync() if micro < 2 else contextlib.nullcontext()
                    with ctx:
                        loss_of(ddp(x), y).backward()
                opt.step()
            return params_of(model)
        compare_training(train, "DDP no_sync", initial)
    c.run("ddp/no_sync", no_sync)

    def find_unused():
        # The branch is used on alternate steps, on different steps per rank; `never` is
        # never used: DDP must allreduce its used-parameter map every step.
        def train(group):
            model = make_model(branch=True)
            ddp = DDP(model, process_group=group, find_unused_parameters=True, bucket_cap_mb=0.0005)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
            for step, (x, y) in enumerate(batches(4, 200 + rank)):
                opt.zero_grad()
                loss_of(ddp(x, use_branch=(step + rank) % 2 == 0), y).backward()
                opt.step()
            assert model.never.weight.grad is None, "a never-used parameter got a gradient"
            return params_of(model)
        mine, _ = compare_training(train, "DDP find_unused_parameters", initial_branch)
        # The branch is trained (by some rank on every step); `never` is not.
        names = [n for n, _ in make_model(branch=True).named_parameters()]
        for n, a, s in zip(names, mine, initial_branch):
            if n.startswith("branch."):
                assert not torch.equal(a, s), f"{n} was not trained"
            if n.startswith("never."):
                assert torch.equal(a, s), f"{n} changed although never used"
    c.run("ddp/find_unused_parameters", find_unused)

    def static_graph():
        def train(group):
            model = make_model(branch=True)  # branch and `never` unused on every step
            ddp = DDP(model, process_group=group, static_graph=True, bucket_cap_mb=0.0005)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
            for x, y in batches(5, 300 + rank):
                opt.zero_grad()
                loss_of(ddp(x), y).backward()
                opt.step()
            return params_of(model)
        compare_training(train, "DDP static_graph", initial_branch)
    c.run("ddp/static_graph", static_graph)

    def bucket_view():
        def train(group):
            model = make_model()
            ddp = DDP(model, process_group=group, gradient_as_bucket_view=True, bucket_cap_mb=0.0005)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
            for x, y in batches(4, 400 + rank):
                opt.zero_grad(set_to_none=False)
                loss_of(ddp(x), y).backward()
                opt.step()
            return params_of(model)
        compare_training(train, "DDP gradient_as_bucket_view", initial)
    c.run("ddp/gradient_as_bucket_view", bucket_view)

    def join():
        # Rank r has 2 + 2 r batches: ranks that run out shadow the others' allreduces.
        def train(group, use_join_class):
            model = make_model()
            ddp = DDP(model, process_group=group, bucket_cap_mb=0.0005)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
            ctx = Join([ddp]) if use_join_class else ddp.join()
            with ctx:
                for x, y in batches(2 + 2 * rank, 500 + rank):
                    opt.zero_grad()
                    loss_of(ddp(x), y).backward()
                    opt.step()
            return params_of(model)
        compare_training(lambda g: train(g, False), "DDP join()", initial)
        compare_training(lambda g: train(g, True), "DDP Join([ddp])", initial)
    c.run("ddp/join_uneven_inputs", join)


# ------------------------------------------------------------------- 2. comm hooks
def check_comm_hooks(c: Checks) -> None:
    rank = c.rank
    initial = params_of(make_model(width=32))

    def train_with(group, register, steps: int = 5, bucket_cap_mb: float = 0.002):
        model = make_model(width=32)
        ddp = DDP(model, process_group=group, bucket_cap_mb=bucket_cap_mb)
        state = register(ddp, group)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        for x, y in batches(steps, 600 + rank):
            opt.zero_grad()
            loss_of(ddp(x), y).backward()
            opt.step()
        return params_of(model), state

    def bf16_hook(state, bucket):
        # DDP.register_comm_hook refuses a hook *named* bf16_compress_hook unless torch
        # has CUDA and NCCL >= 2.10 (a name check, not a capability check); registered
        # under another name the hook is the same computation and runs on CPU.
        return default_hooks.bf16_compress_hook(state, bucket)

    def rounded_once(dtype):
        """gloo reference for the compress hooks as ringcc computes them: the same
        compressed values summed exactly (float64) and rounded to ``dtype`` once."""
        def hook(group, bucket):
            buffer = bucket.buffer()
            wide = buffer.to(dtype).div_(group.size()).double()
            fut = dist.all_reduce(wide, group=group, async_op=True).get_future()

            def decompress(fut):
                buffer.copy_(fut.value()[0].to(dtype))
                return buffer
            return fut.then(decompress)
        return hook

    for name, hook, dtype in [("allreduce_hook", default_hooks.allreduce_hook, None),
                              ("fp16_compress_hook", default_hooks.fp16_compress_hook, torch.float16),
                              ("bf16_compress_hook", bf16_hook, torch.bfloat16)]:
        def simple(hook=hook, name=name, dtype=dtype):
            def train(group, hook=hook):
                return train_with(group, lambda ddp, g: ddp.register_comm_hook(pg_of(g), hook))[0]
            if dtype is None or c.world == 2:
                compare_training(train, f"DDP {name}", initial)
            if dtype is not None:
                # ringcc reduces 16-bit values in float32 and rounds once; gloo rounds after
                # every addition. Over 2 ranks that is the same; over 3 the sums differ in
                # the last 16-bit place, so compare with a gloo hook that rounds once.
                compare_training(train, f"DDP {name} (vs gloo rounding once)", initial,
                                 reference=lambda: train(GLOO, rounded_once(dtype)))
        c.run(f"hooks/{name}", simple)

    def callback_waits_for_collective():
        # What PowerSGD's hook does, reduced: a future callback issues another
        # collective and waits for it. Rank 0 attaches the callback before any peer has
        # issued the first all_reduce (they wait in a gloo barrier), so the callback runs
        # when the engine completes that operation, not inline here.
        world = c.world
        x = torch.full((1000,), float(rank + 1))
        y = torch.full((10,), float(rank + 1))

        def then(fut):
            inner = dist.all_reduce(y, async_op=True).get_future().wait()[0]
            return fut.value()[0] + inner.sum()
        if rank == 0:
            work = dist.all_reduce(x, async_op=True)
            chained = work.get_future().then(then)
            assert not work.is_completed(), "the first all_reduce completed before the peers joined"
            dist.barrier(group=GLOO)
        else:
            dist.barrier(group=GLOO)
            work = dist.all_reduce(x, async_op=True)
            chained = work.get_future().then(then)
        total = world * (world + 1) / 2
        assert_same(chained.wait(), torch.full((1000,), total + 10 * total), "chained result")
        assert_same(y, torch.full((10,), total), "all_reduce issued in the callback")
    c.run("hooks/future_callback_waits_for_collective", callback_waits_for_collective)

    # (batched_powerSGD_hook is not tried: in torch 2.13 it fails on every backend, as it
    # passes a 2-D matrix to _orthogonalize, which asserts a batch of 3-D ones.)
    for name, hook in [("powerSGD_hook", powerSGD.powerSGD_hook)]:
        def power(hook=hook, name=name):
            states = []

            def register(ddp, group):
                state = powerSGD.PowerSGDState(process_group=pg_of(group), matrix_approximation_rank=1,
                                               start_powerSGD_iter=2, random_seed=1234)
                ddp.register_comm_hook(state, hook)
                return state

            def train(group):
                # One bucket (DDP's default cap): PowerSGD's hook issues its allreduces of
                # P and Q from future callbacks, so with several buckets in flight the
                # order of collectives differs between ranks on any CPU backend (gloo
                # aborts with "Received data size doesn't match", ringcc raises
                # MismatchError). With one bucket the chain is sequential.
                params, state = train_with(group, register, steps=6, bucket_cap_mb=25)
                states.append(state)
                return params
            compare_training(train, f"DDP {name}", initial)
            for state in states:  # PowerSGD really ran after its 2 vanilla iterations
                assert state.iter >= 4, f"PowerSGD state at iteration {state.iter}"
                assert state.error_dict, "PowerSGD kept no error feedback: it never compressed"
        c.run(f"hooks/{name}", power)


# ----------------------------------------------------------------------- 3. ZeRO
def check_zero(c: Checks) -> None:
    rank, world = c.rank, c.world
    initial = params_of(make_model())

    for as_view in (False, True):
        def zero(as_view=as_view):
            consolidated = {}

            def train(group):
                model = make_model()
                ddp = DDP(model, process_group=group)
                opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=torch.optim.Adam,
                                              process_group=group, parameters_as_bucket_view=as_view, lr=0.01)
                assert not opt._overlap_with_ddp
                for x, y in batches(4, 700 + rank):
                    opt.zero_grad()
                    loss_of(ddp(x), y).backward()
                    opt.step()
                # Every rank owns a shard of the optimizer state; rank 0 collects all.
                assert len(opt.optim.state) < len(initial) or world == 1
                opt.consolidate_state_dict(to=0)
                if rank == 0:
                    consolidated[group] = opt.state_dict()
                else:
                    try:
                        opt.state_dict()
                    except RuntimeError:
                        pass
                    else:
                        raise AssertionError("state_dict() on a rank that did not consolidate did not raise")
                return params_of(model)

            compare_training(train, f"ZeRO Adam (parameters_as_bucket_view={as_view})", initial)
            if rank == 0:
                mine, ref = consolidated[None], consolidated[GLOO]
                assert sorted(mine["state"]) == list(range(len(initial))), \
                    f"consolidated state covers parameters {sorted(mine['state'])}"
                assert mine["param_groups"] == ref["param_groups"]
                for i in mine["state"]:
                    for key in ("exp_avg", "exp_avg_sq", "step"):
                        assert_same(mine["state"][i][key], ref["state"][i][key],
                                    f"consolidated state {i} {key}", rtol=RTOL, atol=1e-9)
        c.run(f"zero/bucket_view_{as_view}", zero)

    def overlap():
        # overlap_with_ddp=True: ZeRO's step runs inside DDP's comm hook. torch refuses
        # this on gloo, so the reference is gloo DDP + plain ZeRO without steps on the
        # first two iterations (where the overlapping version only learns the buckets).
        from torch.distributed.algorithms.ddp_comm_hooks.ddp_zero_hook import hook_with_zero_step

        data = batches(6, 800 + rank)

        def overlapped():
            model = make_model()
            ddp = DDP(model)
            opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=torch.optim.SGD,
                                          overlap_with_ddp=True, lr=0.05, momentum=0.9)
            ddp.register_comm_hook(None, hook_with_zero_step(default_hooks.allreduce_hook, ddp, opt))
            for x, y in data:
                ddp.zero_grad()
                loss_of(ddp(x), y).backward()
            return params_of(model)

        def reference():
            model = make_model()
            ddp = DDP(model, process_group=GLOO)
            opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=torch.optim.SGD,
                                          process_group=GLOO, lr=0.05, momentum=0.9)
            for i, (x, y) in enumerate(data):
                opt.zero_grad()
                loss_of(ddp(x), y).backward()
                if i >= 2:
                    opt.step()
            return params_of(model)

        mine, ref = overlapped(), reference()
        assert any(not torch.equal(a, s) for a, s in zip(mine, initial)), "overlapped ZeRO did not train"
        for i, (a, b) in enumerate(zip(mine, ref)):
            assert_same(a, b, f"ZeRO overlap_with_ddp parameter {i}", rtol=RTOL, atol=ATOL)
        same_on_every_rank(mine, "ZeRO overlap_with_ddp")
    c.run("zero/overlap_with_ddp", overlap)


# ------------------------------------------------------------ 4. DistributedSampler
def check_sampler(c: Checks) -> None:
    rank, world = c.rank, c.world
    n = 30  # divisible by 2 and 3: the shards are disjoint and cover the dataset
    g = torch.Generator().manual_seed(5)
    dataset = TensorDataset(torch.randn(n, 8, generator=g), torch.randn(n, 4, generator=g))

    def shards():
        sampler = DistributedSampler(dataset, shuffle=True, seed=7)
        orders = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            mine = list(sampler)
            got = [None] * world
            dist.all_gather_object(got, mine)
            ref = [None] * world
            dist.all_gather_object(ref, mine, group=GLOO)
            assert got == ref, f"all_gather_object: ringcc {got} vs gloo {ref}"
            assert got[rank] == mine
            flat = [i for part in got for i in part]
            assert all(len(part) == n // world for part in got), [len(p) for p in got]
            assert sorted(flat) == list(range(n)), f"epoch {epoch}: shards {got} are not a partition of 0..{n - 1}"
            orders.append(flat)
        assert orders[0] != orders[1], "set_epoch did not reshuffle"
    c.run("sampler/disjoint_cover", shards)

    def training():
        def train(group):
            sampler = DistributedSampler(dataset, shuffle=True, seed=7)
            loader = DataLoader(dataset, batch_size=5, sampler=sampler)
            model = make_model()
            ddp = DDP(model, process_group=group, bucket_cap_mb=0.0005)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
            steps = 0
            for epoch in range(2):
                sampler.set_epoch(epoch)
                for x, y in loader:
                    opt.zero_grad()
                    loss_of(ddp(x), y).backward()
                    opt.step()
                    steps += 1
            assert steps == 2 * -(-(n // world) // 5), steps
            return params_of(model)
        compare_training(train, "DDP with DistributedSampler", params_of(make_model()))
    c.run("sampler/ddp_training", training)


# ---------------------------------------------------------- 5. object collectives
class Payload:
    """A user class with a tensor inside, so pickling is not trivial."""

    def __init__(self, rank: int):
        self.rank = rank
        self.name = "r" * (17 * rank + 1)
        self.tensor = torch.arange(rank * 50 + 3, dtype=torch.float64) * (rank + 0.5)
        self.nested = {"list": list(range(rank * 100)), "tuple": (rank, None, "x"), "set": {rank, -rank}}

    def __eq__(self, other):
        return (isinstance(other, Payload) and self.rank == other.rank and self.name == other.name
                and torch.equal(self.tensor, other.tensor) and self.nested == other.nested)

    def __repr__(self):
        return f"Payload(rank={self.rank}, {len(self.name)} chars, {self.tensor.numel()} values)"


def check_objects(c: Checks) -> None:
    rank, world = c.rank, c.world

    def on_both(fn):
        mine, ref = fn(None), fn(GLOO)
        assert mine == ref, f"ringcc {mine!r} != gloo {ref!r}"
        return mine

    def all_gather_object():
        got = on_both(lambda g: _all_gather(Payload(rank), g))
        assert got == [Payload(r) for r in range(world)], got
    c.run("objects/all_gather_object", all_gather_object)

    def broadcast_object_list():
        src = world - 1

        def run(group):
            objs = [Payload(rank), {"big": "y" * 5000} if rank == src else None, rank * 1.5]
            dist.broadcast_object_list(objs, src=src, group=group)
            return objs
        got = on_both(run)
        assert got == [Payload(src), {"big": "y" * 5000}, src * 1.5], got
    c.run("objects/broadcast_object_list", broadcast_object_list)

    def gather_object():
        dst = world - 1

        def run(group):
            out = [None] * world if rank == dst else None
            dist.gather_object(Payload(rank), out, dst=dst, group=group)
            return out
        got = on_both(run)
        assert got == ([Payload(r) for r in range(world)] if rank == dst else None), got
    c.run("objects/gather_object", gather_object)

    def scatter_object_list():
        src = 1

        def run(group):
            inputs = [Payload(10 + r) for r in range(world)] if rank == src else None
            out = [None]
            dist.scatter_object_list(out, inputs, src=src, group=group)
            return out[0]
        got = on_both(run)
        assert got == Payload(10 + rank), got
    c.run("objects/scatter_object_list", scatter_object_list)


def _all_gather(obj, group):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


# ---------------------------------------------------------------------- 6. overlap
def check_overlap(c: Checks) -> None:
    """DDP issues a bucket's allreduce during backward, asynchronously.

    The ringcc group's ``allreduce`` is wrapped on the instance (torch's trampoline looks
    the method up on the object, so DDP's C++ Reducer goes through the wrapper). Rank 0
    runs backward while every other rank waits in a gloo barrier that rank 0 enters
    only from a hook on the input's gradient, i.e. at the end of its backward. So when
    that hook runs, no peer has issued an allreduce yet: an allreduce issued earlier
    cannot have completed, and one run to completion inline would never return (the
    check would fail on the timeout). Event order is asserted, never timings."""
    rank = c.rank
    tb = load_backend()

    def overlap():
        pg = dist.group.WORLD
        assert isinstance(pg, tb.RingccProcessGroup), type(pg)
        events = []
        original = pg.allreduce

        def recording(tensors, opts=None):
            work = original(tensors, opts)
            events.append({"what": "allreduce", "numel": sum(t.numel() for t in tensors), "work": work,
                           "async": getattr(work, "_native", None) is not None})
            return work

        pg.allreduce = recording
        try:
            model = make_model(width=32)
            ddp = DDP(model, bucket_cap_mb=0.002)  # 2 KB: fc3 (132 values) gets a bucket of its own
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
            data = batches(2, 900 + rank)
            x, y = data[0]  # warm-up step: DDP rebuilds its buckets in gradient-ready order
            loss_of(ddp(x), y).backward()
            opt.step()
            opt.zero_grad()
            del events[:]

            x, y = data[1]
            x = x.clone().requires_grad_(True)
            seen = {}

            def at_input_grad(grad):
                # The last gradient autograd computes: only the AccumulateGrad nodes
                # of fc1 remain after it.
                issued = [e for e in events if e["what"] == "allreduce"]
                seen["issued"] = len(issued)
                seen["completed"] = [e["work"].is_completed() for e in issued]
                events.append({"what": "input_grad"})
                if rank == 0:
                    dist.barrier(group=GLOO)  # now let the peers start their backward
                return grad

            x.register_hook(at_input_grad)
            loss = loss_of(ddp(x), y)
            if rank != 0:
                dist.barrier(group=GLOO)  # wait until rank 0's backward has reached its input
            loss.backward()
            events.append({"what": "backward_returned"})
            order = [e["what"] for e in events]
            allreduces = [e for e in events if e["what"] == "allreduce"]
            # Here: [allreduce (fc3 + fc2), input_grad, allreduce (fc1), backward_returned].
            assert len(allreduces) >= 2, f"expected several buckets, saw {order}"
            assert order[-1] == "backward_returned" and order.count("input_grad") == 1, order
            assert seen["issued"] >= 1, f"no allreduce was issued before backward reached the input: {order}"
            assert all(e["async"] for e in allreduces), "DDP's allreduce ran as a blocking call"
            if rank == 0:
                assert not any(seen["completed"]), \
                    f"an allreduce completed before any peer issued its own: {seen}"
            assert all(e["work"].is_completed() for e in allreduces)
            opt.step()
            same_on_every_rank(params_of(model), "overlap")
        finally:
            del pg.allreduce  # back to the class's method
    c.run("overlap/bucket_allreduce_before_backward_ends", overlap)


# ---------------------------------------------------------------- 8. subgroups
def check_subgroups(c: Checks) -> None:
    rank, world = c.rank, c.world
    seed = 1000 * rank

    def compare_in(sub, sub_gloo, ranks, what):
        assert dist.get_backend(sub) == "ringcc", dist.get_backend(sub)
        assert dist.get_world_size(sub) == len(ranks)
        assert dist.get_rank(sub) == ranks.index(rank)
        x = base.values((23,), torch.float32, seed + len(ranks))
        a, b = x.clone(), x.clone()
        dist.all_reduce(a, group=sub)
        dist.all_reduce(b, group=sub_gloo)
        assert_same(a, b, f"{what} all_reduce")
        outs = [torch.zeros(23) for _ in ranks]
        want = [torch.zeros(23) for _ in ranks]
        dist.all_gather(outs, x, group=sub)
        dist.all_gather(want, x, group=sub_gloo)
        for o, w in zip(outs, want):
            assert_same(o, w, f"{what} all_gather")

    def new_subgroups():
        for size in [s for s in range(1, world + 1) if world % s == 0]:
            sub, subs = dist.new_subgroups(group_size=size)  # the default backend: ringcc
            sub_gloo, _ = dist.new_subgroups(group_size=size, backend="gloo")
            assert len(subs) == world // size
            ranks = list(range(rank // size * size, rank // size * size + size))
            compare_in(sub, sub_gloo, ranks, f"new_subgroups(group_size={size})")
        dist.barrier()
    c.run("subgroups/new_subgroups", new_subgroups)

    def by_enumeration():
        groups = [[0, world - 1]] + ([[r] for r in range(1, world - 1)])
        sub, _ = dist.new_subgroups_by_enumeration(groups)
        sub_gloo, _ = dist.new_subgroups_by_enumeration(groups, backend="gloo")
        mine = next(g for g in groups if rank in g)
        compare_in(sub, sub_gloo, mine, f"new_subgroups_by_enumeration({groups})")
        dist.barrier()
    c.run("subgroups/new_subgroups_by_enumeration", by_enumeration)

    def new_group_interleaved():
        # A ringcc group of the last two ranks in reverse order, used with async
        # operations in flight on the world group at the same time.
        ranks = [world - 1, world - 2]
        sub = dist.new_group(ranks, backend="ringcc")
        sub_gloo = dist.new_group(ranks, backend="gloo")
        x = base.values((5000,), torch.float32, seed + 7)
        w1 = dist.all_reduce(x.clone(), async_op=True)
        if rank in ranks:
            compare_in(sub, sub_gloo, sorted(ranks), "new_group")
        w2 = dist.all_reduce(y := x.clone(), async_op=True)
        w1.wait()
        w2.wait()
        ref = x.clone()
        dist.all_reduce(ref, group=GLOO)
        assert_same(y, ref, "world all_reduce interleaved with a subgroup")
        # A ringcc group has a name, and destroying it alone leaves the others working.
        if rank in ranks:
            assert sub.group_name, "the ringcc subgroup has no name"
            dist.destroy_process_group(sub)
        z = x.clone()
        dist.all_reduce(z)
        assert_same(z, ref, "world all_reduce after destroying a subgroup")
    c.run("subgroups/new_group_interleaved", new_group_interleaved)


# ---------------------------------------------------------------- 7. mismatches
def check_mismatch(c: Checks) -> None:
    """Ranks calling different collectives get ringcc.MismatchError, never a hang."""
    import ringcc

    rank, world = c.rank, c.world
    cwd = os.getcwd()

    def init(tag: str, seconds: float):
        dist.init_process_group("ringcc", init_method=f"file://{cwd}/store_{tag}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=seconds))
        return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=60))

    @contextlib.contextmanager
    def mismatch_scenario(tag: str, what: str):
        """A fresh ringcc group with a 10 s timeout; after the body the group must be
        aborted, and the ranks leave together."""
        gloo = init(tag, 10)
        try:
            yield
            assert_aborted(what)
            dist.barrier(group=gloo)
        finally:
            dist.destroy_process_group()

    def expect_mismatch(call, what):
        try:
            call()
        except ringcc.TimeoutError as exc:
            raise AssertionError(f"{what}: timed out instead of reporting a mismatch: {exc}") from None
        except ringcc.MismatchError as exc:
            return str(exc)
        raise AssertionError(f"{what}: no error")

    def assert_aborted(what):
        try:
            dist.all_reduce(torch.ones(2))
        except ringcc.Error as exc:
            assert "aborted" in str(exc) or "mismatch" in str(exc), f"{what}: later call raised {exc!r}"
        else:
            raise AssertionError(f"{what}: the group still works after the error")

    def different_collectives():
        with mismatch_scenario("mismatch_op", "all_reduce vs all_gather"):
            if rank == 0:
                text = expect_mismatch(lambda: dist.all_reduce(torch.ones(10)), "all_reduce vs all_gather")
                peers = range(1, world)
            else:
                text = expect_mismatch(lambda: dist.all_gather([torch.zeros(10) for _ in range(world)],
                                                               torch.ones(10)), "all_gather vs all_reduce")
                peers = [0]
            for word in ("mismatch", "allreduce(seq=1", "allgather(seq=1", "count=10", "collective"):
                assert word in text, f"{word!r} missing from: {text}"
            assert any(f"rank {p} " in text for p in peers), f"no peer rank named in: {text}"
    c.run("mismatch/allreduce_vs_allgather", different_collectives)

    def different_sizes():
        with mismatch_scenario("mismatch_size", "all_reduce sizes"):
            text = expect_mismatch(lambda: dist.all_reduce(torch.ones(10 + rank)), "all_reduce sizes")
            for word in ("mismatch", "allreduce(seq=1", "count", "differ in: count"):
                assert word in text, f"{word!r} missing from: {text}"
            # Two different sizes and two different ranks are named.
            sizes = [f"count={10 + r}," for r in range(world) if f"count={10 + r}," in text]
            ranks = [r for r in range(world) if f"rank {r} " in text]
            assert len(sizes) == 2 and len(ranks) >= 2, f"sizes {sizes}, ranks {ranks} in: {text}"
    c.run("mismatch/allreduce_sizes", different_sizes)

    def broadcast_vs_allreduce():
        # A rank whose part of the broadcast was only sending (the root), or that only
        # exchanged with ranks calling the same broadcast, may complete it and raise on
        # its next call instead: every rank raises by its next collective.
        with mismatch_scenario("mismatch_bcast", "all_reduce vs broadcast"):
            raised = {}
            for i, call in enumerate((lambda: dist.all_reduce(torch.ones(10)) if rank == 0 else
                                      dist.broadcast(torch.ones(10), src=1),
                                      lambda: dist.all_reduce(torch.ones(3)))):
                try:
                    call()
                except ringcc.MismatchError as exc:
                    raised[i] = str(exc)
                    break
            assert raised, "neither the mismatched call nor the next one raised"
            text = next(iter(raised.values()))
            assert "mismatch" in text and "seq=" in text, text
            if 0 in raised:  # raised in the mismatched call itself: names both operations
                for word in ("allreduce(seq=1", "broadcast(seq=1", "root=1"):
                    assert word in text, f"{word!r} missing from: {text}"
            if rank == 0:
                assert 0 in raised, "the all_reduce rank completed its mismatched call"
    c.run("mismatch/allreduce_vs_broadcast", broadcast_vs_allreduce)

    def reinit_works():
        gloo = init("after_mismatch", 60)
        try:
            x = base.values((100,), torch.float32, rank)
            a, b = x.clone(), x.clone()
            dist.all_reduce(a)
            dist.all_reduce(b, group=gloo)
            assert_same(a, b, "all_reduce after re-init")
        finally:
            dist.destroy_process_group()
    c.run("mismatch/reinit_after_abort", reinit_works)


# --------------------------------------------------------------------------- main
def main() -> int:
    global GLOO
    tb, c = base.start_tool_worker()
    GLOO = base.GLOO
    c.results["setup"] = "ok" if isinstance(dist.group.WORLD, tb.RingccProcessGroup) else \
        f"default group is {dist.get_backend()} / {type(dist.group.WORLD).__name__}"
    for check in (check_ddp_variants, check_comm_hooks, check_zero, check_sampler, check_objects, check_overlap,
                  check_subgroups):
        check(c)
    base.destroy_groups(sys.modules[__name__])
    check_mismatch(c)
    print("RESULTS " + json.dumps(c.results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
