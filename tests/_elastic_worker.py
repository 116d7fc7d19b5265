"""One rank of tests/test_elastic.py, started by torchrun (which sets RANK, WORLD_SIZE,
MASTER_ADDR/PORT and TORCHELASTIC_RESTART_COUNT):

    torchrun --standalone --nproc-per-node 2 --max-restarts 1 tests/_elastic_worker.py \
        --checkpoint-dir CKPT --events DIR [--kill-rank 1 --kill-after-step 11] [--variant ...]
        [--die-at-startup-rank 1]

Trains a small MLP with ringcc.Trainer on the "ringcc" backend, checkpointing every
CHECKPOINT_EVERY steps into CKPT and resuming from the newest checkpoint there. In the
first attempt (restart count 0) rank ``--kill-rank`` SIGKILLs itself as it starts the
step after ``--kill-after-step`` (that step's update is applied, the next one not); the
steps since the last checkpoint are lost and the next attempt must redo them.

With ``--die-at-startup-rank R`` rank R of the first attempt instead SIGKILLs itself
while the group forms, once rank 0 has joined the rendezvous.

What happened is written, one JSON object per line, to DIR/attempt{A}.rank{R}.jsonl
(opened in append mode and written with one os.write per line, so a line is either
complete or absent when the process is killed): "start" (pid, restart count), "resume"
(the checkpoint and step the Trainer started from), "step" (each optimizer step as it
starts computing), "sigterm" (the handler below ran), "kill", and "done" (final step).
Rank 0 saves the final parameters to DIR/final.pt.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

import ringcc

# 2 ranks x 48 samples, batch 4, 2 micro-batches a step: 6 steps per epoch, 18 in all.
SAMPLES, BATCH, ACCUM, EPOCHS, CHECKPOINT_EVERY = 96, 4, 2, 3, 4


class Events:
    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, event: str, **fields) -> None:
        os.write(self.fd, (json.dumps({"event": event, **fields}) + "\n").encode())


class Net(nn.Module):
    """Dropout makes every rank's RNG state part of what a resume must restore."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.25), nn.Linear(32, 3))

    def forward(self, x):
        return self.body(x)


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(SAMPLES, 8, generator=g)
    w = torch.randn(8, 3, generator=g)
    return TensorDataset(x, torch.sin(x @ w) + 0.05 * torch.randn(SAMPLES, 3, generator=g))


class Loss:
    """MSE that reports each step as its first micro-batch is computed, and kills this
    process when asked to at the start of step ``kill_after + 1``."""

    def __init__(self, events: Events, kill_after: int):
        self.events, self.kill_after = events, kill_after
        self.trainer = None
        self.seen = None

    def __call__(self, out, target):
        t = self.trainer
        if self.seen is None:  # the first micro-batch of this attempt: fit() has loaded any checkpoint
            self.events.write("resume", resumed_from=t.resumed_from and os.path.basename(t.resumed_from),
                              step=t.global_step)
        if t.global_step != self.seen:
            self.seen = t.global_step
            if t.global_step == self.kill_after:
                self.events.write("kill", after_step=t.global_step)
                os.kill(os.getpid(), signal.SIGKILL)
            self.events.write("step", step=t.global_step + 1)
        return nn.functional.mse_loss(out, target)


def die_once_rank0_joined(events: Events) -> None:
    """SIGKILL this process as soon as rank 0 has joined the rendezvous of the default
    group's ringcc communicator (rank 0 is then waiting for this rank): the store, which
    torchrun keeps for the next attempt, holds what rank 0 wrote."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=60))
    # torch keeps the default group's keys under default_pg/<group name>/<device>/; the
    # first thing rank 0 writes there is the generation it draws (ringcc._store).
    store.wait(["default_pg/0//cpu//ringcc/pg/generations"])
    events.write("kill", after_step=None)
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint-dir", required=True)
    p.add_argument("--events", required=True)
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--kill-after-step", type=int, default=-1)
    p.add_argument("--die-at-startup-rank", type=int, default=-1)
    p.add_argument("--variant", choices=["ringcc_ddp", "fp16_error_feedback"], default="ringcc_ddp")
    args = p.parse_args()

    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    rank = int(os.environ["RANK"])
    events = Events(os.path.join(args.events, f"attempt{attempt}.rank{rank}.jsonl"))
    events.write("start", pid=os.getpid(), restart_count=attempt, world_size=int(os.environ["WORLD_SIZE"]))

    def on_sigterm(signum, frame):
        # Like a job that wants to leave cleanly when torchrun stops it: unwind with
        # SystemExit (atexit handlers and ringcc's goodbye run), from wherever it was.
        events.write("sigterm")
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    if attempt == 0 and rank == args.die_at_startup_rank:
        die_once_rank0_joined(events)
    # Hang detector: a collective that loses its peer fails long before this.
    dist.init_process_group("ringcc", timeout=datetime.timedelta(seconds=120))

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)
    kill_after = args.kill_after_step if attempt == 0 and rank == args.kill_rank else -1
    loss = Loss(events, kill_after)
    options = {}
    if args.variant == "fp16_error_feedback":
        options = dict(compression="fp16", error_feedback=True)
    trainer = ringcc.Trainer(model, opt, dataset(), loss_fn=loss, batch_size=BATCH, epochs=EPOCHS,
                             grad_accum_steps=ACCUM, scheduler=sched, checkpoint_dir=args.checkpoint_dir,
                             checkpoint_every=CHECKPOINT_EVERY, progress=False, seed=11,
                             log=lambda line: events.write("log", line=line), **options)
    loss.trainer = trainer
    trainer.fit()

    flat = torch.cat([q.detach().flatten() for q in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    if not torch.equal(flat, ref):
        raise SystemExit(f"rank {rank}: the parameters differ from rank 0's")
    if rank == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(args.events, "final.pt"))
    events.write("done", step=trainer.global_step, wrapper=type(trainer.model).__name__)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
