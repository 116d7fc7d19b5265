"""Train a small model with DistributedDataParallel over the "ringcc" backend.

Run it on one machine with two (or more) processes:

    torchrun --nproc-per-node 2 examples/ddp_torchrun.py

torchrun starts one process per rank and sets RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT in each one's environment; ``init_process_group`` reads them (its default
init_method is "env://"). ringcc handles CPU tensors, so no GPU is needed.

What each rank does:
  1. joins the process group (every rank blocks here until all have joined);
  2. builds the same model and wraps it in DDP, which averages gradients over the ranks
     during backward, so every rank applies the same update;
  3. reads its own share of the dataset through a DistributedSampler;
  4. at the end checks that every rank holds exactly the same parameters.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import ringcc  # noqa: F401 - importing ringcc registers the "ringcc" backend with torch

EPOCHS = 5
BATCH_SIZE = 16  # per rank: the effective batch is BATCH_SIZE x world size


def make_dataset() -> TensorDataset:
    """A noisy linear regression problem. Every rank builds the same data (fixed seed);
    the sampler decides which rank reads which samples."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 10, generator=g)
    true_w = torch.randn(10, 1, generator=g)
    y = x @ true_w + 0.1 * torch.randn(1024, 1, generator=g)
    return TensorDataset(x, y)


def main() -> None:
    # 1. Rendezvous through the environment torchrun prepared.
    dist.init_process_group("ringcc")
    rank, world = dist.get_rank(), dist.get_world_size()

    # 2. The model. DDP broadcasts rank 0's initial parameters to the other ranks when it
    #    is constructed, so starting from the same seed is not even required.
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)

    # 3. Each rank iterates over a disjoint 1/world of the dataset per epoch.
    dataset = make_dataset()
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, sampler=sampler)

    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)  # a different shuffle every epoch, the same on all ranks
        total, batches = torch.zeros(1), 0
        for x, y in loader:
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()  # DDP allreduces gradient buckets while backward runs
            optimizer.step()
            total += loss.detach()
            batches += 1
        # The mean loss over all ranks: a plain collective on the same process group.
        total /= batches
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
        if rank == 0:
            print(f"epoch {epoch}: loss {total.item():.4f}", flush=True)

    # 4. Every rank must hold identical parameters: compare with rank 0's copy.
    params = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    reference = params.clone()
    dist.broadcast(reference, src=0)
    differ = torch.tensor([0 if torch.equal(params, reference) else 1])
    dist.all_reduce(differ, op=dist.ReduceOp.SUM)  # how many ranks differ from rank 0
    if rank == 0:
        if differ.item() == 0:
            print(f"parameters agree across all {world} ranks", flush=True)
        else:
            print(f"parameters differ on {differ.item()} of {world} ranks", flush=True)

    dist.destroy_process_group()
    if differ.item() != 0:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
