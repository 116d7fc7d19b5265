"""One rank of tests/test_trainer.py: ringcc.Trainer on the "ringcc" backend. Prints one
line ``RESULTS <json>`` mapping check names to "ok" or the failure text.

    python tests/_trainer_worker.py --rank R --world N --init-method URL

Checkpoints go under the working directory, which the launcher makes private to one
launch. Interruptions are simulated two ways, both at the same point on every rank (so
no rank waits for a peer that left): ``max_steps`` (the run stops and checkpoints), and
a loss function that raises in the middle of a step (a crash: the run resumes from the
last periodic checkpoint and redoes the steps after it).
"""

from __future__ import annotations

import datetime
import math
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

import _torch_backend_worker as base  # tests/ is this script's directory
from _torch_backend_worker import Checks

import ringcc
from ringcc import trainer as tr

# 2 ranks x 36 samples, batch 4: 9 micro-batches per rank and epoch; with 2 accumulated
# micro-batches a step, 5 steps per epoch (the last one a single micro-batch).
SAMPLES, BATCH, ACCUM, EPOCHS = 72, 4, 2, 2


class Crash(RuntimeError):
    pass


class Net(nn.Module):
    """A small MLP with dropout, so each rank's RNG shapes the gradients."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 32), nn.ReLU(),
                                  nn.Dropout(0.2), nn.Linear(32, 2))

    def forward(self, x):
        return self.body(x)


def dataset(n: int = SAMPLES) -> TensorDataset:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, 6, generator=g)
    w = torch.randn(6, 2, generator=g)
    return TensorDataset(x, torch.tanh(x @ w) + 0.05 * torch.randn(n, 2, generator=g))


class Loss:
    """MSE that raises :class:`Crash` at the second micro-batch of step ``crash_step``
    (1-based), i.e. after a no_sync micro-batch has already accumulated gradients."""

    def __init__(self, crash_step=None):
        self.crash_step, self.trainer, self.calls_in_step = crash_step, None, 0
        self._step = -1

    def __call__(self, out, target):
        if self.crash_step is not None and self.trainer is not None:
            if self.trainer.global_step != self._step:
                self._step, self.calls_in_step = self.trainer.global_step, 0
            self.calls_in_step += 1
            if self.trainer.global_step + 1 == self.crash_step and self.calls_in_step == 2:
                raise Crash(f"simulated crash in step {self.crash_step}")
        return nn.functional.mse_loss(out, target)


def build(kind: str, init_seed: int = 0, **kw):
    """A fresh model, optimizer, scheduler and Trainer for scenario `kind`."""
    torch.manual_seed(init_seed)
    model = Net()
    if kind.startswith("adam"):
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    loss = Loss(kw.pop("crash_step", None))
    options = dict(loss_fn=loss, batch_size=BATCH, epochs=EPOCHS, scheduler=sched, grad_accum_steps=ACCUM,
                   progress=False, seed=3, log=lambda line: None)
    if kind in ("adam", "adam_ringcc_wrapper"):
        options.update(mixed_precision="bf16", compression="fp16")
    if kind == "adam":  # the wrapper whose buckets are planned once (ringcc.trainer.torch_ddp)
        options.update(wrapper=tr.torch_ddp)
    if kind.startswith("error_feedback"):
        options.update(compression="fp16", error_feedback=True)
    if kind == "error_feedback":
        options.update(wrapper=tr.torch_ddp)
    options.update(kw)
    t = ringcc.Trainer(model, opt, dataset(), **options)
    loss.trainer = t
    return t


def state_of(t: tr.Trainer) -> dict:
    return {"params": [p.detach().clone() for p in t.module.parameters()],
            "optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict(), "step": t.global_step}


def tensors_equal(a, b, where: str) -> None:
    """torch.equal on every tensor of two nested structures (and == on the rest)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), \
            f"{where}: {a.flatten()[:4]} != {b.flatten()[:4] if isinstance(b, torch.Tensor) else b}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            tensors_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            tensors_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def same_on_every_rank(params) -> None:
    flat = torch.cat([p.flatten() for p in params])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    assert torch.equal(flat, ref), "parameters differ between ranks"


def fresh_dir(name: str) -> str:
    path = os.path.abspath(name)  # the launch's private directory; every scenario its own name
    os.makedirs(path, exist_ok=True)  # (both ranks make it)
    assert not os.listdir(path), f"{path} is not empty"
    return path


# ------------------------------------------------------------------------- checks
def check_loss_and_metrics(rank: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    t = ringcc.Trainer(model, opt, dataset(256), loss_fn=nn.functional.mse_loss, batch_size=16, epochs=4,
                       progress=True, baseline_samples_per_sec=1000.0, log=lambda line: None)
    history = t.fit()
    assert len(history) == 4, history
    assert history[-1]["loss"] < 0.7 * history[0]["loss"], [h["loss"] for h in history]
    keys = {"epoch", "samples_per_sec", "time_s", "comm_s", "comm_overlapped_s", "compute_s", "data_s",
            "comm_compute_ratio", "scaling_efficiency", "loss", "samples", "steps", "global_step", "partial"}
    for h in history:
        assert keys <= set(h), sorted(keys - set(h))
        assert h["samples"] == 256 and h["steps"] == 8 and not h["partial"], h
        assert h["samples_per_sec"] > 0 and h["time_s"] > 0 and h["compute_s"] > 0, h
        assert h["comm_s"] >= 0 and h["data_s"] >= 0, h
        # Both wrappers report their exchanges (torch's through a timing hook, ringcc's
        # through comm_stats()), so the overlapped part is known.
        assert h["comm_overlapped_s"] is not None and h["comm_overlapped_s"] >= 0, h
        assert math.isfinite(h["comm_compute_ratio"]) and h["comm_compute_ratio"] >= 0, h
        assert h["comm_s"] + h["data_s"] <= h["time_s"] + 1e-9, h
        assert h["scaling_efficiency"] == h["samples_per_sec"] / (2 * 1000.0), h
    assert [h["global_step"] for h in history] == [8, 16, 24, 32]
    same_on_every_rank(list(model.parameters()))


def check_resume(kind: str) -> None:
    """Uninterrupted run vs (a) crash in step 8 + resume from the step-6 checkpoint
    (mid-epoch: epoch 1, 2 batches consumed), (b) stop at max_steps=4 + resume."""
    ref_trainer = build(kind)
    history = ref_trainer.fit()
    assert [h["global_step"] for h in history] == [5, 10], history
    ref = state_of(ref_trainer)

    ckpt = fresh_dir(f"ckpt_{kind}_crash")
    crashed = build(kind, crash_step=8, checkpoint_dir=ckpt, checkpoint_every=3)
    try:
        crashed.fit()
        raise AssertionError("the simulated crash did not happen")
    except Crash:
        pass
    dist.barrier()  # rank 0 may still be writing the step-6 file the other rank inspects
    assert crashed.global_step == 7
    assert [os.path.basename(p) for p in tr.list_checkpoints(ckpt)] == ["step-00000003.pt", "step-00000006.pt"]
    state = torch.load(tr.list_checkpoints(ckpt)[-1], weights_only=True)
    assert (state["global_step"], state["epoch"], state["batch_in_epoch"]) == (6, 1, 2), \
        (state["global_step"], state["epoch"], state["batch_in_epoch"])
    resumed = build(kind, init_seed=123, checkpoint_dir=ckpt, checkpoint_every=3)
    rest = resumed.fit()
    assert resumed.resumed_from.endswith("step-00000006.pt"), resumed.resumed_from
    assert [(h["epoch"], h["steps"], h["partial"]) for h in rest] == [(1, 4, True)], rest
    tensors_equal(state_of(resumed), ref, f"{kind} crash+resume")
    same_on_every_rank(state_of(resumed)["params"])
    if kind != "sgd":
        return

    ckpt = fresh_dir(f"ckpt_{kind}_max_steps")
    first = build(kind, checkpoint_dir=ckpt, max_steps=4)
    part = first.fit()
    dist.barrier()
    assert [(h["epoch"], h["steps"], h["partial"]) for h in part] == [(0, 4, True)], part
    assert [os.path.basename(p) for p in tr.list_checkpoints(ckpt)] == ["step-00000004.pt"]
    second = build(kind, init_seed=5, checkpoint_dir=ckpt)
    rest = second.fit()
    assert [(h["epoch"], h["steps"]) for h in rest] == [(0, 1), (1, 5)], rest
    tensors_equal(state_of(second), ref, f"{kind} max_steps+resume")
    again = build(kind, checkpoint_dir=ckpt).fit()  # a finished run resumes to nothing
    assert again == [], again
    try:  # a fresh run must not write its checkpoints among another run's
        build(kind, checkpoint_dir=ckpt, resume=False).fit()
        raise AssertionError("resume=False trained into a directory that holds checkpoints")
    except RuntimeError as exc:
        assert "already holds checkpoints" in str(exc), exc

    # The test can see per-rank RNG: resuming with the ranks' RNG states swapped must
    # change the result (dropout masks move to the other rank).
    swapped_dir = fresh_dir(f"ckpt_{kind}_swapped")
    dist.barrier()  # both ranks saw it empty
    if dist.get_rank() == 0:
        state["ranks"] = state["ranks"][::-1]  # the step-6 checkpoint of the crashed run
        tr.atomic_save(state, os.path.join(swapped_dir, "step-00000006.pt"))
    dist.barrier()
    swapped = build(kind, checkpoint_dir=swapped_dir, checkpoint_every=3)
    swapped.fit()
    assert not all(torch.equal(a, b) for a, b in zip(state_of(swapped)["params"], ref["params"])), \
        "swapping the ranks' RNG states changed nothing: the resume test would not see RNG bugs"


def check_checkpoint_files() -> None:
    ckpt = fresh_dir("ckpt_files")
    t = build("sgd", checkpoint_dir=ckpt, checkpoint_every=2, keep_checkpoints=2)
    t.fit()
    dist.barrier()
    names = sorted(os.listdir(ckpt))
    # Pruned to the newest two; no temporary file left behind.
    assert names == ["step-00000008.pt", "step-00000010.pt"], names
    s = torch.load(os.path.join(ckpt, names[-1]), weights_only=True)
    assert (s["global_step"], s["epoch"], s["batch_in_epoch"], s["world_size"]) == (10, 2, 0, 2)
    assert len(s["ranks"]) == 2 and all(set(r) == {"rng", "comm"} for r in s["ranks"])
    assert not torch.equal(s["ranks"][0]["rng"]["torch"], s["ranks"][1]["rng"]["torch"])
    tensors_equal(s["model"], t.module.state_dict(), "saved model")


def main() -> int:
    args = base.worker_args()
    base.load_backend().register()
    c = Checks(args.rank, args.world)
    dist.init_process_group("ringcc", init_method=args.init_method, rank=args.rank, world_size=args.world,
                            timeout=datetime.timedelta(seconds=60))
    c.results["setup"] = "ok" if dist.get_backend() == "ringcc" else f"backend {dist.get_backend()}"
    c.results["wrapper"] = tr.default_wrapper().__name__
    c.run("loss_and_metrics", lambda: check_loss_and_metrics(args.rank))
    c.run("resume/sgd_accum_steplr_dropout", lambda: check_resume("sgd"))
    c.run("resume/adam_bf16_autocast_fp16_compression", lambda: check_resume("adam"))
    c.run("resume/fp16_error_feedback", lambda: check_resume("error_feedback"))
    c.run("resume/ringcc_wrapper_fp16_compression", lambda: check_resume("adam_ringcc_wrapper"))
    c.run("resume/ringcc_wrapper_error_feedback", lambda: check_resume("error_feedback_ringcc_wrapper"))
    c.run("checkpoint/files", check_checkpoint_files)
    dist.destroy_process_group()
    import json

    print("RESULTS " + json.dumps(c.results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
