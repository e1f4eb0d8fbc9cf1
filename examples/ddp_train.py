"""Data-parallel training with batch statistics synchronized across processes.

Each process trains on its own share of every batch (``DistributedDataParallel``); the
batch-norm layers, built with ``sync=True``, normalize with the statistics of the whole
batch, over all processes. The last process gets a smaller share, as the last shard of a
dataset often does: the statistics are count-weighted, so that is exact. At the end every
process prints its running statistics: they are identical.

Run on CPU (gloo), and unchanged on GPUs (NCCL, one GPU per process)::

    torchrun --nproc_per_node=2 examples/ddp_train.py
    torchrun --nproc_per_node=2 examples/ddp_train.py --steps 50 --batch-size 64
    torchrun --nproc_per_node=2 examples/ddp_train.py --kernels cpp   # bnkit's C++ kernels

With ``--kernels cpp`` (CPU) the synchronized layers run on bnkit's C++ kernels: the same
collectives, the same statistics, fewer passes over the activations.

Across machines, start the same command on each with torchrun's rendezvous::

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29500 --rdzv-id=job1 examples/ddp_train.py
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import bnkit


def say(line: str) -> None:
    """Print one line in a single write: the ranks share stdout, and print()'s separate writes
    of the text and the newline let another rank's line land in between."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


CLASSES = 4


def make_model(sync: bool) -> nn.Module:
    """A small conv net; ``sync=True`` synchronizes its batch norm across processes."""
    torch.manual_seed(0)  # the same initial weights on every process
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        bnkit.BatchNorm2d(8, sync=sync),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        bnkit.BatchNorm2d(16, sync=sync),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 2 * 2, CLASSES),
    )


def batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic batch of 8x8 images: each class is a bright quadrant plus noise."""
    g = torch.Generator().manual_seed(step)
    labels = torch.randint(0, CLASSES, (size,), generator=g)
    images = torch.randn(size, 1, 8, 8, generator=g) * 0.5 + 2.0
    for k in range(CLASSES):
        rows, cols = divmod(k, 2)
        quadrant = images[labels == k, :, rows * 4 : rows * 4 + 4, cols * 4 : cols * 4 + 4]
        images[labels == k, :, rows * 4 : rows * 4 + 4, cols * 4 : cols * 4 + 4] = quadrant + 2
    return images, labels


def shard(size: int, rank: int, world: int) -> slice:
    """This process's rows of a batch of ``size``: uneven on purpose (30 on 2 processes:
    17 and 13; the last processes may even get none)."""
    share = size // world + 2
    start = min(rank * share, size)
    stop = size if rank == world - 1 else min(start + share, size)
    return slice(start, stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=30, help="global batch size")
    parser.add_argument(
        "--kernels",
        choices=("torch", "cpp"),
        default="torch",
        help="the kernels policy: cpp runs the batch norm on bnkit's C++ kernels (CPU)",
    )
    args = parser.parse_args(argv)
    bnkit.set_policy(kernels=args.kernels)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")  # env:// settings from torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    model = make_model(sync=True).to(device)
    # With bnkit.convert(model, sync=True) an existing torch model gets the same.
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    for step in range(args.steps):
        images, labels = batch(step, args.batch_size)
        rows = shard(args.batch_size, rank, world)
        x, y = images[rows].to(device), labels[rows].to(device)
        optimizer.zero_grad()
        # Every process must run forward and backward, also one with an empty share. The
        # shares are uneven, so each process sums its losses over the global batch size;
        # DDP averages gradients over processes, hence the factor world.
        loss = nn.functional.cross_entropy(ddp(x), y, reduction="sum") / args.batch_size
        (loss * world).backward()
        optimizer.step()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            mean_loss = loss.item() * args.batch_size / len(y)
            say(f"step {step:3d}  loss on rank 0's share {mean_loss:.4f}")

    layer = model[1]
    assert layer.running_mean is not None
    assert layer.running_var is not None
    mean = layer.running_mean.cpu().tolist()
    var = layer.running_var.cpu().tolist()
    say(f"rank {rank}: {rows.stop - rows.start} samples per step, kernels={args.kernels}")
    say(f"rank {rank}: running_mean {mean} running_var {var}")
    # Identical bits everywhere: compare through a collective.
    stats = torch.cat([layer.running_mean, layer.running_var]).to(device)
    everywhere = [torch.empty_like(stats) for _ in range(world)]
    dist.all_gather(everywhere, stats)
    if rank == 0:
        same = all(torch.equal(s, everywhere[0]) for s in everywhere)
        say(f"running statistics identical on all {world} ranks: {same}")
        # Evaluate on one process with the module itself: the DDP wrapper's forward would
        # wait for the other processes (it broadcasts buffers); eval runs no collective.
        model.eval()
        with torch.no_grad():
            images, labels = batch(10_000, 200)
            accuracy = (model(images.to(device)).argmax(1).cpu() == labels).float().mean()
        say(f"accuracy on 200 new images: {accuracy:.2f}")
    # Free DDP (its reducer holds communication work) before tearing the group down, and
    # leave together: gloo can abort a process whose group is destroyed at interpreter exit.
    del ddp, optimizer
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
