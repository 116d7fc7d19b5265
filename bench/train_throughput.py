"""Training throughput (samples/s) of a model with tens of millions of parameters on
local ranks: ringcc against torch's DDP over gloo, in one run.

    PYTHONPATH=python python3 bench/train_throughput.py                 # 2 ranks, ~22M-parameter MLP
    python3 bench/train_throughput.py --model transformer --rounds 4 --json out.json

Variants (each its own copy of the same initial model and its own AdamW):
  ringcc DDP, none / fp16        ringcc.DistributedDataParallel on a ringcc group (fp16:
                                 its block-scaled compressed allreduce);
  torch DDP on ringcc, none      torch's DDP over the "ringcc" backend;
        (without ringcc's wrapper: torch DDP on ringcc, none / fp16, the fp16 one with
        ringcc's compressed allreduce as a comm hook, ringcc.trainer.torch_ddp)
  torch DDP on gloo (baseline)   torch's DDP with its defaults over gloo.
Every variant trains on the same batches in the same order. Rounds are interleaved
(A B C, then C B A, ...) so that drift on a shared machine hits all variants alike;
each timed block starts after a barrier. A step is forward, backward (gradient
exchange included) and the optimizer step; samples/s counts the samples of all ranks
over the slowest rank's time. The first steps of each variant (``--warmup``) are not
timed: they include torch's bucket re-planning after the first iteration.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from ringcc import _launch  # the installed package (pip install .), with its native module

CHILD_ENV = "RINGCC_TRAIN_BENCH_CHILD"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="local ranks (default 2; ignored under torchrun)")
    p.add_argument("--model", default="mlp", choices=("mlp", "transformer"))
    p.add_argument("--size", default="large", choices=("small", "large"))
    p.add_argument("--batch-size", type=int, default=32, help="samples per rank and step (default 32)")
    p.add_argument("--rounds", type=int, default=6, help="timed blocks per variant (default 6)")
    p.add_argument("--steps", type=int, default=5, help="steps per timed block (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json", metavar="PATH", help="write the results here")
    return p


def run_rank(a: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    import ringcc  # noqa: F401 - registers the "ringcc" backend
    from ringcc._train_demo import make_task
    from ringcc.trainer import ringcc_wrapper_available, torch_ddp

    timeout = datetime.timedelta(seconds=a.timeout)
    dist.init_process_group("gloo", timeout=timeout)  # coordination only: barriers, results
    rank, world = dist.get_rank(), dist.get_world_size()
    ringcc_pg = dist.new_group(backend="ringcc", timeout=timeout)
    gloo_pg = dist.new_group(backend="gloo", timeout=timeout)

    def plain_torch(module, **kw):  # torch's defaults: the buckets re-planned after step 1
        return torch_ddp(module, fixed_buckets=False, **kw)

    if ringcc_wrapper_available():
        from ringcc.ddp import DistributedDataParallel as RingccDDP

        mine = [("ringcc DDP, none", RingccDDP, ringcc_pg, None), ("ringcc DDP, fp16", RingccDDP, ringcc_pg, "fp16"),
                ("torch DDP on ringcc, none", plain_torch, ringcc_pg, None)]
    else:
        mine = [("torch DDP on ringcc, none", plain_torch, ringcc_pg, None),
                ("torch DDP on ringcc, fp16", plain_torch, ringcc_pg, "fp16")]
    variants = mine + [("torch DDP on gloo (baseline)", plain_torch, gloo_pg, None)]

    dataset, _, loss_fn = make_task(a.model, a.size)
    total_steps = a.warmup + a.rounds * a.steps
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(dataset), generator=g)
    per_step = a.batch_size * world
    batches = []  # this rank's share of each global batch; the same for every variant
    for s in range(total_steps):
        start = (s * per_step) % (len(dataset) - per_step + 1)
        idx = order[start + rank * a.batch_size:start + (rank + 1) * a.batch_size]
        batches.append(tuple(t[idx] for t in dataset.tensors))

    runs = []
    for name, factory, pg, compression in variants:
        _, model, _ = make_task(a.model, a.size)  # same seed: the same initial model
        kw = {"process_group": pg}
        if compression:
            kw["compression"] = compression
        ddp = factory(model, **kw)
        runs.append({"name": name, "ddp": ddp, "opt": torch.optim.AdamW(model.parameters(), lr=3e-4),
                     "next": 0, "times": [], "losses": []})
    params = sum(p.numel() for p in runs[0]["ddp"].module.parameters())

    def steps(run, n):
        loss = None
        for _ in range(n):
            x, y = batches[run["next"]]
            run["next"] += 1
            loss = loss_fn(run["ddp"](x), y)
            loss.backward()
            run["opt"].step()
            run["opt"].zero_grad(set_to_none=True)
        return float(loss.detach())

    for run in runs:
        steps(run, a.warmup)
    for r in range(a.rounds):
        for run in (runs if r % 2 == 0 else runs[::-1]):
            dist.barrier()
            t0 = time.perf_counter()
            run["losses"].append(steps(run, a.steps))
            run["times"].append(time.perf_counter() - t0)

    # The slowest rank's time per block decides; samples of all ranks count.
    t = torch.tensor([run["times"] for run in runs], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    rows = []
    for run, times in zip(runs, t.tolist()):
        samples = a.rounds * a.steps * per_step
        rows.append({"variant": run["name"], "samples_per_sec": samples / sum(times),
                     "round_samples_per_sec": [a.steps * per_step / x for x in times],
                     "step_ms": 1e3 * sum(times) / (a.rounds * a.steps), "last_loss": run["losses"][-1]})
    base = rows[-1]["samples_per_sec"]
    for row in rows:
        row["ratio_vs_gloo"] = row["samples_per_sec"] / base
    if rank == 0:
        import torch as _t

        header = (f"# train_throughput: {a.model} {a.size} ({params / 1e6:.1f}M parameters), {world} ranks x "
                  f"batch {a.batch_size}, {a.rounds} rounds x {a.steps} steps (+{a.warmup} warm-up) per variant\n"
                  f"# ringcc {ringcc.__version__}, torch {_t.__version__}, {platform.node()}, {os.cpu_count()} CPUs, "
                  f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
                  f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
        print(header)
        print(f"{'variant':<32} {'samples/s':>10} {'step ms':>9} {'vs gloo':>8} {'rounds min..max':>17} "
              f"{'last loss':>10}")
        for row in rows:
            rs = row["round_samples_per_sec"]
            print(f"{row['variant']:<32} {row['samples_per_sec']:>10.1f} {row['step_ms']:>9.1f} "
                  f"{row['ratio_vs_gloo']:>7.2f}x {min(rs):>8.1f}..{max(rs):<8.1f} {row['last_loss']:>10.4f}")
        print("# median per-round ratio vs gloo: " + ", ".join(
            f"{row['variant']}: {statistics.median(x / y for x, y in zip(row['round_samples_per_sec'], rows[-1]['round_samples_per_sec'])):.2f}x"
            for row in rows[:-1]))
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"settings": vars(a), "parameters": params, "world_size": world, "rows": rows}, f, indent=1)
                f.write("\n")
    dist.destroy_process_group()
    return 0


def main() -> int:
    a = build_parser().parse_args()
    if _launch.is_rank(CHILD_ENV):
        return run_rank(a)
    return _launch.spawn_argv([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]], a.nproc, CHILD_ENV)


if __name__ == "__main__":
    sys.exit(main())
