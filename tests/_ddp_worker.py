"""One rank of tests/test_ddp.py: ringcc.DistributedDataParallel, ringcc.hooks and the
timeline, on a "ringcc" default group (and a gloo group for the fallbacks). Prints one
line ``RESULTS <json>`` mapping check names to "ok", "skip: <reason>" or the failure.

    python tests/_ddp_worker.py --rank R --world N --init-method URL [--only PREFIX]

Every rank generates the data of all ranks from one seed, so each can also train a
plain single-process model on the concatenated batch: that is the reference the
distributed result must equal (fp32; mean losses, equal per-rank batch sizes).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as TorchDDP

import _torch_backend_worker as base  # tests/ is this script's directory
from _torch_backend_worker import Checks, Net, assert_same, params_of, same_on_every_rank

import ringcc
import ringcc.hooks

GLOO = None  # a gloo group over all ranks, set in main()
RTOL, ATOL = 1e-5, 1e-6  # distributed vs single-process fp32 (sums in another order)
SMALL_CAP_MB = 0.0015  # 1.5 KiB buckets: the models below get several buckets


# -------------------------------------------------------------------------- models
class Reordered(nn.Module):
    """Registered output layer first: gradients arrive in registration order, the
    opposite of what the initial (reverse registration order) buckets expect."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 4)
        self.body = nn.Linear(8, 16)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def make(cls=Net, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return cls(**kw)


def all_data(steps: int, seed: int, world: int, size: int = 4):
    """data[step][rank] = (x, y), the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(size, 8, generator=g), torch.randn(size, 4, generator=g)) for _ in range(world)]
            for _ in range(steps)]


def cat(pairs):
    return torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])


def mse(out, y):
    return nn.functional.mse_loss(out, y)


def compare(got, want, what: str, rtol: float = RTOL, atol: float = ATOL) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} vs {len(want)} tensors"
    for i, (a, b) in enumerate(zip(got, want)):
        assert_same(a, b, f"{what}: tensor {i}", rtol=rtol, atol=atol)


def max_diff(a, b) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


def make_opt(kind: str, params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9) if kind == "sgd" else torch.optim.Adam(params, lr=0.01)


def train_ddp(rank, world, data, opt_kind="sgd", model=None, autocast=False, **ddp_kw):
    model = model if model is not None else make()
    ddp = ringcc.DistributedDataParallel(model, **ddp_kw)
    opt = make_opt(opt_kind, ddp.parameters())
    for step in data:
        x, y = step[rank]
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = mse(ddp(x).float(), y)
        loss.backward()
        opt.step()
    return ddp, params_of(model)


def train_single(data, opt_kind="sgd", model=None, autocast=False):
    model = model if model is not None else make()
    opt = make_opt(opt_kind, model.parameters())
    for step in data:
        x, y = cat(step)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = mse(model(x).float(), y)
        loss.backward()
        opt.step()
    return params_of(model)


def expect_error(fn, exc_type, *needles):
    try:
        fn()
    except exc_type as exc:
        text = str(exc)
        missing = [n for n in needles if n not in text]
        assert not missing, f"error lacks {missing}: {text}"
        return text
    raise AssertionError(f"no {exc_type.__name__} raised")


# ------------------------------------------------------------------ 1. training
def check_training(c: Checks) -> None:
    rank, world = c.rank, c.world
    initial = params_of(make())

    for opt_kind in ("sgd", "adam"):
        def train(opt_kind=opt_kind):
            data = all_data(4, 10, world)
            ddp, mine = train_ddp(rank, world, data, opt_kind, bucket_cap_mb=SMALL_CAP_MB,
                                  first_bucket_mb=SMALL_CAP_MB / 4)
            assert len(ddp.bucket_parameter_names()) >= 3, ddp.bucket_parameter_names()
            assert any(not torch.equal(a, b) for a, b in zip(mine, initial)), "training changed nothing"
            compare(mine, train_single(data, opt_kind), f"{opt_kind}: ringcc DDP vs single process")
            same_on_every_rank(mine, opt_kind)
        c.run(f"train/{opt_kind}", train)

    def gloo_group():
        data = all_data(3, 11, world)
        _, mine = train_ddp(rank, world, data, process_group=GLOO, bucket_cap_mb=SMALL_CAP_MB)
        compare(mine, train_single(data), "DDP on a gloo group vs single process")
        same_on_every_rank(mine, "gloo group")
    c.run("train/gloo_group", gloo_group)


def check_buckets(c: Checks) -> None:
    rank, world = c.rank, c.world

    def first_bucket_smaller_and_dtypes_apart():
        model = make(width=32)
        model.fc2.double()  # a float64 layer in the middle: its own buckets
        ddp = ringcc.DistributedDataParallel(model, bucket_cap_mb=0.01, first_bucket_mb=0.0002)
        names = ddp.bucket_parameter_names()
        # Reverse registration order; first bucket under 0.0002 MB (209 bytes): fc3.bias only.
        assert names[0] == ["fc3.bias"], names
        flat = [n for b in names for n in b]
        assert flat == [n for n, _ in model.named_parameters()][::-1], flat
        params = dict(model.named_parameters())
        for b in names:
            assert len({params[n].dtype for n in b}) == 1, f"bucket mixes dtypes: {b}"
        ddp.close()
    c.run("buckets/layout", first_bucket_smaller_and_dtypes_apart)

    def rebuild():
        model = make(Reordered)
        arrival = []
        for name, p in model.named_parameters():  # registered before the wrapper's: see the order
            p.register_post_accumulate_grad_hook(lambda _p, name=name: arrival.append(name))
        ddp = ringcc.DistributedDataParallel(model, bucket_cap_mb=0.0001, first_bucket_mb=0.0001)
        before = ddp.bucket_parameter_names()
        assert [n for b in before for n in b] == ["body.bias", "body.weight", "head.bias", "head.weight"], before
        assert not ddp.buckets_rebuilt
        opt = make_opt("sgd", ddp.parameters())
        data = all_data(3, 12, world)
        for i, step in enumerate(data):
            x, y = step[rank]
            opt.zero_grad()
            mse(ddp(x), y).backward()
            opt.step()
            if i == 0:
                first_arrival = list(arrival)
        after = [n for b in ddp.bucket_parameter_names() for n in b]
        assert ddp.buckets_rebuilt
        assert after == ddp.rebuilt_order, (after, ddp.rebuilt_order)
        assert set(after[:2]) == {"head.weight", "head.bias"}, f"head's gradients arrive first: {after}"
        orders = [None] * world
        dist.all_gather_object(orders, (after, first_arrival), group=GLOO)
        assert all(o[0] == after for o in orders), f"ranks built different buckets: {orders}"
        assert after == orders[0][1], f"buckets {after} are not rank 0's arrival order {orders[0][1]}"
        compare(params_of(model), train_single(data, model=make(Reordered)), "after the rebuild")
    c.run("buckets/rebuild_once_in_arrival_order", rebuild)


def check_no_sync(c: Checks) -> None:
    rank, world = c.rank, c.world

    def no_sync():
        model = make()
        ddp = ringcc.DistributedDataParallel(model, bucket_cap_mb=SMALL_CAP_MB)
        launches = []
        original = ddp._strategy.allreduce_bucket
        ddp._strategy.allreduce_bucket = lambda flat, i: (launches.append(i), original(flat, i))[1]
        micro = all_data(3, 13, world)
        for m, step in enumerate(micro):
            x, y = step[rank]
            if m < 2:
                with ddp.no_sync():
                    (mse(ddp(x), y) / 3).backward()
                assert not launches, f"communication inside no_sync: buckets {launches}"
            else:
                (mse(ddp(x), y) / 3).backward()
        assert launches == list(range(len(ddp.bucket_parameter_names()))), launches
        ref = make()
        x, y = cat([p for step in micro for p in step])
        mse(ref(x), y).backward()
        compare([p.grad for p in model.parameters()], [p.grad for p in ref.parameters()],
                "accumulated gradient vs large-batch gradient")
        same_on_every_rank([p.grad for p in model.parameters()], "no_sync gradients")
    c.run("no_sync/accumulates_like_large_batch", no_sync)


def check_unused(c: Checks) -> None:
    rank, world = c.rank, c.world

    def find_unused():
        data = all_data(4, 14, world)
        use = lambda step, r: (step + r) % 2 == 0  # noqa: E731 - some rank uses the branch each step
        model = make(branch=True)
        initial = params_of(model)
        ddp = ringcc.DistributedDataParallel(model, find_unused_parameters=True, bucket_cap_mb=SMALL_CAP_MB)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        for s, step in enumerate(data):
            x, y = step[rank]
            opt.zero_grad()
            mse(ddp(x, use_branch=use(s, rank)), y).backward()
            assert model.branch.weight.grad is not None, "branch used by some rank but got no gradient"
            assert model.never.weight.grad is None, "never-used parameter got a gradient"
            opt.step()
        ref = make(branch=True)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
        for s, step in enumerate(data):
            ref_opt.zero_grad()
            (sum(mse(ref(x, use_branch=use(s, r)), y) for r, (x, y) in enumerate(step)) / world).backward()
            ref_opt.step()
        mine = params_of(model)
        compare(mine, params_of(ref), "find_unused_parameters vs single process")
        names = [n for n, _ in model.named_parameters()]
        for n, a, b in zip(names, mine, initial):
            assert n.startswith("never.") == torch.equal(a, b), f"{n}: trained={not torch.equal(a, b)}"
        same_on_every_rank(mine, "find_unused_parameters")
    c.run("unused/find_unused_parameters", find_unused)

    def error_without():
        ddp = ringcc.DistributedDataParallel(make(branch=True), bucket_cap_mb=SMALL_CAP_MB)
        x, y = all_data(1, 15, world)[0][rank]
        expect_error(lambda: mse(ddp(x), y).backward(), RuntimeError, "find_unused_parameters=True",
                     "branch.weight", "never.bias")
        ddp.close()
        t = torch.ones(3)  # the group is still in step afterwards
        dist.all_reduce(t)
        assert torch.equal(t, torch.full((3,), float(world))), t
    c.run("unused/error_names_parameters", error_without)

    def failed_backward():
        # A backward that raises after the first bucket was launched (an activation
        # hook between fc3 and fc2): the next forward finishes that allreduce and the
        # following steps train as if the failed one never happened.
        data = all_data(4, 21, world)
        model = make()
        # First bucket 0.0003 MB (314 bytes): fc3's weight and bias (272 bytes) alone.
        ddp = ringcc.DistributedDataParallel(model, bucket_cap_mb=SMALL_CAP_MB, first_bucket_mb=0.0003)
        assert ddp.bucket_parameter_names()[0] == ["fc3.bias", "fc3.weight"], ddp.bucket_parameter_names()
        opt = make_opt("sgd", ddp.parameters())
        launched = []
        original = ddp._strategy.allreduce_bucket
        ddp._strategy.allreduce_bucket = lambda flat, i: (launched.append(i), original(flat, i))[1]
        x, y = data[0][rank]
        h = {}

        def boom(_grad):
            raise ValueError("boom")

        def capture(_module, _inp, out):
            if not h:
                h["hook"] = out.register_hook(boom)

        handle = model.fc2.register_forward_hook(capture)
        expect_error(lambda: mse(ddp(x), y).backward(), ValueError, "boom")
        handle.remove()
        assert launched == [0], f"expected only bucket 0 launched before the failure: {launched}"
        for step in data[1:]:
            x, y = step[rank]
            opt.zero_grad()
            mse(ddp(x), y).backward()
            opt.step()
        compare(params_of(model), train_single(data[1:]), "after a failed backward")
        same_on_every_rank(params_of(model), "after a failed backward")
    c.run("unused/failed_backward_recovers", failed_backward)


def check_autocast(c: Checks) -> None:
    rank, world = c.rank, c.world

    def autocast():
        data = all_data(4, 16, world)
        ddp, mine = train_ddp(rank, world, data, autocast=True, bucket_cap_mb=SMALL_CAP_MB)
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in ddp.parameters())
        same_on_every_rank(mine, "autocast bf16")
        ref = train_single(data, autocast=True)
        # Both runs compute in bf16 (8 significant bits, relative rounding 2^-9), but on
        # differently split batches, so their roundings differ; after 4 SGD steps
        # (lr 0.05, momentum 0.9) the parameters differ by ~2e-4 (measured): bound 1e-3.
        compare(mine, ref, "autocast bf16 vs single process autocast", rtol=0, atol=1e-3)
        print(f"autocast max |ddp - single| = {max_diff(mine, ref):.3g}", flush=True)
    c.run("autocast/bf16", autocast)


def check_wrap(c: Checks) -> None:
    rank, world = c.rank, c.world

    def buffers():
        def bn_model(seed):
            torch.manual_seed(seed)
            m = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Linear(6, 4))
            with torch.no_grad():
                m[1].running_mean.fill_(seed + 1.0)
                m[1].running_var.fill_(seed + 2.0)
                m[1].num_batches_tracked.fill_(seed + 3)
            return m
        model = bn_model(rank + 100)
        ddp = ringcc.DistributedDataParallel(model)
        want = bn_model(100)
        compare(params_of(model), params_of(want), "parameters after wrap vs rank 0's", rtol=0, atol=0)
        compare(list(model.buffers()), list(want.buffers()), "buffers after wrap vs rank 0's", rtol=0, atol=0)
        ddp.close()
    c.run("wrap/broadcasts_parameters_and_buffers", buffers)

    def mismatch():
        model = make(width=32 if rank == 1 else 16)
        expect_error(lambda: ringcc.DistributedDataParallel(model), ValueError, "rank 1", "fc1.weight",
                     "(32, 8)", "(16, 8)")
    c.run("wrap/shape_mismatch_error", mismatch)

    def bad_options():
        # strategy "ps"/"auto" are tested in test_ps_ddp.py; their option errors here.
        expect_error(lambda: ringcc.DistributedDataParallel(make(), strategy="ps", ps_options=dict(servers=2)),
                     TypeError, "unknown ps_options", "servers")
        expect_error(lambda: ringcc.DistributedDataParallel(make(), strategy="ps", ps_options=dict(mode="lazy")),
                     ValueError, "'sync' or 'async'")
        expect_error(lambda: ringcc.DistributedDataParallel(make(), strategy="ps", compression="fp16",
                                                            error_feedback=True), ValueError, "error_feedback")
        expect_error(lambda: ringcc.DistributedDataParallel(make(), strategy="bogus"), ValueError, "'ps' or 'auto'")
        expect_error(lambda: ringcc.DistributedDataParallel(make(), compression="fp16", process_group=GLOO),
                     ValueError, "needs a ringcc process group")
        expect_error(lambda: ringcc.DistributedDataParallel(make(), compression="int8"), ValueError, "int8")
        expect_error(lambda: ringcc.DistributedDataParallel(make(), error_feedback=True), ValueError,
                     "error_feedback")
        sd = ringcc.DistributedDataParallel(make()).state_dict()
        assert list(sd) == ["module." + k for k in make().state_dict()], list(sd)
    c.run("wrap/option_errors_and_state_dict", bad_options)


def check_comm_hook(c: Checks) -> None:
    rank, world = c.rank, c.world

    def own_hook():
        calls = []

        def hook(state, bucket):
            buf = bucket.buffer()
            grads = bucket.gradients()
            params = bucket.parameters()
            assert [g.shape for g in grads] == [p.shape for p in params]
            assert sum(g.numel() for g in grads) == buf.numel()
            assert all(torch.equal(g, p.grad) for g, p in zip(grads, params)), "gradients() != p.grad"
            calls.append((bucket.index(), bucket.is_last()))
            state["n"] += 1
            fut = dist.all_reduce(buf, group=state["group"], async_op=True).get_future()
            return fut.then(lambda f: f.value()[0].div_(world))

        data = all_data(3, 17, world)
        state = {"group": None, "n": 0}
        ddp, mine = train_ddp(rank, world, data, bucket_cap_mb=SMALL_CAP_MB, comm_hook=(state, hook))
        nb = len(ddp.bucket_parameter_names())
        assert calls == [(i, i == nb - 1) for i in range(nb)] * 3, calls
        compare(mine, train_single(data), "comm hook (sum, then divide) vs single process")
        same_on_every_rank(mine, "comm hook")
        expect_error(lambda: ddp.register_comm_hook(None, hook), RuntimeError, "already registered")
    c.run("comm_hook/own_hook", own_hook)


def check_timeline(c: Checks) -> None:
    rank, world = c.rank, c.world

    def timeline():
        prefix = os.path.abspath("trace")
        os.environ["RINGCC_TIMELINE"] = prefix
        try:
            ddp = ringcc.DistributedDataParallel(make(width=32), bucket_cap_mb=0.003, first_bucket_mb=0.0005)
        finally:
            del os.environ["RINGCC_TIMELINE"]
        nb = len(ddp.bucket_parameter_names())
        assert nb >= 3, ddp.bucket_parameter_names()
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        path = f"{prefix}.rank{rank}.json"
        for s, step in enumerate(all_data(2, 18, world)):
            x, y = step[rank]
            opt.zero_grad()
            mse(ddp(x), y).backward()
            opt.step()
            with open(path) as f:
                trace = json.load(f)  # valid JSON after every step
            events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
            assert {e["args"]["step"] for e in events} == set(range(s + 1)), events
        ddp.close()
        names = {e["name"] for e in events}
        assert names == {"backward", "pack", "allreduce", "unpack"}, names
        assert all(e["pid"] == rank for e in trace["traceEvents"])
        tids = {e["name"]: e["tid"] for e in events}
        assert len(set(tids.values())) == 4, tids
        thread_names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
        assert all(thread_names[t] == n for n, t in tids.items()), thread_names
        for s in range(2):
            ev = [e for e in events if e["args"]["step"] == s]
            (bw,) = [e for e in ev if e["name"] == "backward"]
            bw_end = bw["ts"] + bw["dur"]
            by = {k: sorted((e for e in ev if e["name"] == k), key=lambda e: e["args"]["bucket"])
                  for k in ("pack", "allreduce", "unpack")}
            assert all(len(v) == nb for v in by.values()), {k: len(v) for k, v in by.items()}
            for p, a, u in zip(by["pack"], by["allreduce"], by["unpack"]):
                assert p["ts"] <= a["ts"] <= u["ts"], (p, a, u)
                assert u["ts"] >= bw_end, "unpack before backward ended"
            # Overlap: the first bucket's allreduce is launched while backward still runs.
            assert by["allreduce"][0]["ts"] < bw_end, (by["allreduce"][0], bw)
            launches = [a["ts"] for a in by["allreduce"]]
            assert launches == sorted(launches), "buckets launched out of order"
    c.run("timeline/overlap_and_format", timeline)


# ------------------------------------------------------------------ 2. compression
# max |param - fp32 param| after 5 SGD steps (lr 0.05, momentum 0.9): a 16-bit wire
# rounds each gradient to 2^-11 (fp16) / 2^-8 (bf16) relative; measured on the gloo
# fallback (which also rounds partial sums): ~3e-5 (fp16), ~4e-4 (bf16); on the native
# block-scaled path ~5e-5 (fp16), ~1.2e-4 (bf16).
BOUND_FP16, BOUND_BF16 = 3e-4, 3e-3


def check_compression(c: Checks) -> None:
    rank, world = c.rank, c.world
    data = all_data(5, 19, world)

    def fp32():
        return train_ddp(rank, world, data, bucket_cap_mb=SMALL_CAP_MB)[1]

    for comp, bound in (("fp16", BOUND_FP16), ("bf16", BOUND_BF16)):
        def compressed(comp=comp, bound=bound):
            _, mine = train_ddp(rank, world, data, bucket_cap_mb=SMALL_CAP_MB, compression=comp)
            ref = fp32()
            print(f"{comp} compression: max |diff| vs fp32 = {max_diff(mine, ref):.3g}", flush=True)
            compare(mine, ref, f"{comp} compression vs fp32", rtol=0, atol=bound)
            assert any(not torch.equal(a, b) for a, b in zip(mine, ref)), "compression changed nothing"
            same_on_every_rank(mine, f"{comp} compression")
        c.run(f"compress/{comp}", compressed)

    def error_feedback():
        _, plain = train_ddp(rank, world, data, bucket_cap_mb=SMALL_CAP_MB, compression="bf16")
        _, ef = train_ddp(rank, world, data, bucket_cap_mb=SMALL_CAP_MB, compression="bf16", error_feedback=True)
        assert any(not torch.equal(a, b) for a, b in zip(plain, ef)), "error feedback changed nothing"
        compare(ef, fp32(), "bf16 + error feedback vs fp32", rtol=0, atol=BOUND_BF16)
        same_on_every_rank(ef, "error feedback")
    c.run("compress/error_feedback", error_feedback)

    def resume_from_comm_state():
        """Stop after 2 of 5 steps, carry model, optimizer and comm_state_dict() into a new
        wrapper on a new model: the end result equals an uninterrupted run bit for bit
        (the bucket plan and the error-feedback residuals are what make that possible)."""
        kw = dict(bucket_cap_mb=SMALL_CAP_MB, compression="fp16", error_feedback=True)

        def run(ddp, opt, steps):
            for step in steps:
                x, y = step[rank]
                opt.zero_grad()
                mse(ddp(x), y).backward()
                opt.step()

        whole = ringcc.DistributedDataParallel(make(), **kw)
        run(whole, make_opt("adam", whole.parameters()), data)
        first = ringcc.DistributedDataParallel(make(), **kw)
        first_opt = make_opt("adam", first.parameters())
        run(first, first_opt, data[:2])
        state = first.comm_state_dict()
        assert state["buckets_rebuilt"] and state["strategy"]["residuals"], state
        model = make(seed=99)  # other initial values: everything must come from the checkpoint
        model.load_state_dict(first.module.state_dict())
        resumed = ringcc.DistributedDataParallel(model, **kw)
        resumed.load_comm_state_dict(state)
        opt = make_opt("adam", resumed.parameters())
        opt.load_state_dict(first_opt.state_dict())
        run(resumed, opt, data[2:])
        got, want = params_of(model), params_of(whole.module)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), \
            f"resumed run differs from the uninterrupted one by {max_diff(got, want):.3g}"
    c.run("compress/resume_from_comm_state", resume_from_comm_state)


def check_torch_hooks(c: Checks) -> None:
    rank, world = c.rank, c.world
    data = all_data(5, 20, world)

    def train_torch(group, hook=None, state=None):
        model = make()
        ddp = TorchDDP(model, process_group=group, bucket_cap_mb=SMALL_CAP_MB)
        if hook is not None:
            ddp.register_comm_hook(state, hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        for step in data:
            x, y = step[rank]
            opt.zero_grad()
            mse(ddp(x), y).backward()
            opt.step()
        return params_of(model)

    hooks = {"fp16": (ringcc.hooks.fp16_compress_hook, BOUND_FP16),
             "bf16": (ringcc.hooks.bf16_compress_hook, BOUND_BF16)}
    for comp, (hook, bound) in hooks.items():
        def on_ringcc(comp=comp, hook=hook, bound=bound):
            pg = dist.group.WORLD
            calls = []
            original = pg.allreduce_compressed
            pg.allreduce_compressed = lambda t, comp_, **kw: (calls.append(comp_), original(t, comp_, **kw))[1]
            try:
                mine = train_torch(None, hook)
            finally:
                del pg.allreduce_compressed
            assert calls and set(calls) == {comp}, f"native path not used: {calls}"
            compare(mine, train_torch(None), f"torch DDP + ringcc {comp} hook vs fp32", rtol=0, atol=bound)
            same_on_every_rank(mine, f"{comp} hook")
        c.run(f"hooks/ringcc_native_{comp}", on_ringcc)

        def on_gloo(comp=comp, hook=hook, bound=bound):
            mine = train_torch(GLOO, hook, GLOO)
            ref = train_torch(GLOO)
            print(f"{comp} gloo fallback: max |diff| vs fp32 = {max_diff(mine, ref):.3g}", flush=True)
            compare(mine, ref, f"torch DDP + {comp} hook fallback on gloo vs fp32", rtol=0, atol=bound)
            assert any(not torch.equal(a, b) for a, b in zip(mine, ref)), "the 16-bit wire changed nothing"
            same_on_every_rank(mine, f"{comp} fallback")
            state = ringcc.hooks.ErrorFeedbackState(GLOO)
            ef = train_torch(GLOO, hook, state)
            assert state.residuals and any(r.abs().sum() > 0 for r in state.residuals.values()), "no residual kept"
            assert any(not torch.equal(a, b) for a, b in zip(mine, ef)), "error feedback changed nothing"
            compare(ef, ref, f"{comp} fallback + error feedback vs fp32", rtol=0, atol=bound)
            same_on_every_rank(ef, f"{comp} fallback + error feedback")
        c.run(f"hooks/gloo_fallback_{comp}", on_gloo)


def main() -> int:
    global GLOO
    _, c = base.start_tool_worker()
    GLOO = base.GLOO
    for check in (check_training, check_buckets, check_no_sync, check_unused, check_autocast, check_wrap,
                  check_comm_hook, check_timeline, check_compression, check_torch_hooks):
        check(c)
    base.destroy_groups(sys.modules[__name__])
    print("RESULTS " + json.dumps(c.results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
