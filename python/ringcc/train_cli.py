"""`ringcc train`: ringcc.Trainer on a synthetic task, no download.

    ringcc train                                   # 2 local ranks, small MLP, 3 epochs
    ringcc train --model transformer --size large --epochs 1 --compression fp16
    ringcc train --checkpoint-dir ckpt --epochs 4 --max-steps 20   # stop early ...
    ringcc train --checkpoint-dir ckpt --epochs 4 --resume         # ... and carry on
    torchrun --nproc-per-node 2 -m ringcc train    # ranks started by torchrun

Tasks (the data is generated from a fixed seed on every rank, so the loss can drop):
  mlp          regression onto a fixed random teacher network, y = teacher(x) + noise
  transformer  classification of token sequences: the label is the first token
Sizes: small (thousands of parameters: seconds) and large (about 20-25 million).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback
from typing import Optional, Sequence

from . import _launch

CHILD_ENV = "RINGCC_TRAIN_CHILD"
FAILED = 2  # a rank's exit code when training raised (its peers are stopped)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ringcc train", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Data-parallel training demo with ringcc.Trainer on synthetic data.",
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--nproc", type=int, default=None,
                   help="local ranks to spawn (default 2; ignored under torchrun, which starts the ranks)")
    p.add_argument("--backend", default="ringcc", choices=("ringcc", "gloo"),
                   help="torch.distributed backend of the process group (default ringcc)")
    p.add_argument("--wrapper", default="ringcc", choices=("ringcc", "torch"),
                   help="DDP wrapper: ringcc.DistributedDataParallel (default), or torch's with ringcc's hooks "
                        "(ringcc.trainer.torch_ddp)")
    p.add_argument("--model", default="mlp", choices=("mlp", "transformer"))
    p.add_argument("--size", default="small", choices=("small", "large"),
                   help="small: seconds per epoch; large: about 20-25M parameters")
    p.add_argument("--samples", type=int, default=None, help="dataset size (default depends on --model/--size)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64, help="samples per rank and micro-batch (default 64)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 3e-3 small, 3e-4 large)")
    p.add_argument("--compression", default="none", choices=("none", "fp16", "bf16"),
                   help="gradient compression on the wire (default none)")
    p.add_argument("--error-feedback", action="store_true",
                   help="carry each bucket's rounding error into the next step (with --compression)")
    p.add_argument("--mixed-precision", default=None, choices=("bf16",), help="torch.autocast bf16 on CPU")
    p.add_argument("--checkpoint-dir", default=None, help="write checkpoints here (atomic, rank 0)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints "
                   "(default: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint-dir")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in total")
    p.add_argument("--baseline", type=float, default=None, metavar="SAMPLES_PER_SEC",
                   help="1-rank samples/s, for the scaling efficiency column")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a collective fails (default 300)")
    p.add_argument("--json", metavar="PATH", help="write the per-epoch metrics (and the run's settings) here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "grad_accum", "nproc", "samples", "checkpoint_every"):
        value = getattr(a, name)
        if value is not None and value < (0 if name == "epochs" else 1):
            p.error(f"--{name.replace('_', '-')} must be >= {0 if name == 'epochs' else 1}")
    if a.resume and not a.checkpoint_dir:
        p.error("--resume needs --checkpoint-dir")
    if a.checkpoint_every and not a.checkpoint_dir:
        p.error("--checkpoint-every needs --checkpoint-dir")
    if a.error_feedback and a.compression == "none":
        p.error("--error-feedback needs --compression fp16 or bf16")
    if a.wrapper == "ringcc" and a.backend != "ringcc" and a.compression != "none":
        p.error(f"--compression with --backend {a.backend}: ringcc's wrapper compresses on ringcc groups only; "
                "use --backend ringcc, or --wrapper torch (a cast to 16 bits on other backends)")


# ---------------------------------------------------------------------- one rank
def run_rank(a: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    import ringcc  # noqa: F401 - registers the "ringcc" backend
    from ._train_demo import make_task
    from .trainer import Trainer, default_wrapper, torch_ddp

    rank = int(os.environ["RANK"])
    try:
        dist.init_process_group(a.backend, timeout=datetime.timedelta(seconds=a.timeout))
        world = dist.get_world_size()
        dataset, model, loss_fn = make_task(a.model, a.size, a.samples, a.seed)
        params = sum(p.numel() for p in model.parameters())
        lr = a.lr if a.lr is not None else (3e-3 if a.size == "small" else 3e-4)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        if rank == 0:
            print(f"ringcc train: {a.model} ({a.size}, {params / 1e6:.2f}M parameters), {len(dataset)} samples, "
                  f"{world} ranks, backend {a.backend}, wrapper {a.wrapper}, batch {a.batch_size} x "
                  f"{a.grad_accum} per rank, compression {a.compression}"
                  f"{' + error feedback' if a.error_feedback else ''}, "
                  f"mixed precision {a.mixed_precision or 'off'}", flush=True)
        trainer = Trainer(
            model, optimizer, dataset, loss_fn=loss_fn, batch_size=a.batch_size, epochs=a.epochs,
            grad_accum_steps=a.grad_accum, mixed_precision=a.mixed_precision,
            compression=None if a.compression == "none" else a.compression, error_feedback=a.error_feedback,
            checkpoint_dir=a.checkpoint_dir, checkpoint_every=a.checkpoint_every, resume=a.resume,
            progress=not a.no_progress, baseline_samples_per_sec=a.baseline, seed=a.seed, max_steps=a.max_steps,
            wrapper=default_wrapper() if a.wrapper == "ringcc" else torch_ddp)
        history = trainer.fit()
        if rank == 0 and a.json:
            out = {"settings": {k: v for k, v in vars(a).items() if k != "json"}, "parameters": params,
                   "world_size": world, "resumed_from": trainer.resumed_from, "epochs": history}
            os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)
                f.write("\n")
        dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear line and an exit code
        print(f"ringcc train: rank {rank} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        if os.environ.get("RINGCC_TRAIN_TRACEBACK"):
            traceback.print_exc()
        return FAILED
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    a = parser.parse_args(argv)
    check_args(parser, a)
    def spawn(nproc: int) -> int:
        rc = _launch.spawn("train", argv, nproc, CHILD_ENV)
        if rc != 0:
            print(f"ringcc train: failed (exit code {rc}); see the rank errors above", file=sys.stderr)
        return rc

    return _launch.run_or_spawn("ringcc train", a.nproc, CHILD_ENV, lambda: run_rank(a), spawn)


if __name__ == "__main__":
    sys.exit(main())
