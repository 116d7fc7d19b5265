"""all_reduce over the "ringcc" torch.distributed backend, checked against gloo.

    torchrun --nproc-per-node 2 examples/allreduce_torchrun.py

torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; init_process_group reads
them (init_method "env://"). ringcc handles CPU tensors.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

import ringcc  # noqa: F401 - registers the "ringcc" backend


def main() -> None:
    dist.init_process_group("ringcc")
    gloo = dist.new_group(backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    # Blocking all_reduce of 4 Mi floats: every rank contributes rank + 1.
    x = torch.full((1 << 22,), float(rank + 1))
    dist.all_reduce(x)
    expected = world * (world + 1) / 2
    assert torch.all(x == expected), f"rank {rank}: got {x[:4]}, expected {expected}"

    # The same on gloo gives the same answer.
    g = torch.full((1 << 22,), float(rank + 1))
    dist.all_reduce(g, group=gloo)
    assert torch.equal(x, g)

    # Asynchronous: several in flight, completed through their futures.
    chunks = [torch.randn(1 << 18, generator=torch.Generator().manual_seed(rank * 10 + i)) for i in range(4)]
    start = time.perf_counter()
    works = [dist.all_reduce(c, op=dist.ReduceOp.AVG, async_op=True) for c in chunks]
    torch.futures.wait_all([w.get_future() for w in works])
    elapsed = time.perf_counter() - start

    print(f"rank {rank}/{world}: all_reduce ok (value {x[0].item():g}); "
          f"4 async AVG all_reduces of 1 MiB in {elapsed * 1e3:.1f} ms", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
