"""Synchronized batch norm across processes: bnkit's C++ kernels against its reference path.

``python benchmarks/sync_bench.py [--world 2] [--shapes 32x256x14x14,...] [--repeats 21]
[--markdown]``

Spawns ``--world`` CPU processes (gloo, one torch thread each) and times one training step,
forward and ``torch.autograd.grad`` to x, γ and β, of a ``bnkit.BatchNorm(C, sync=True)``
layer on each rank's share of the batch (the shape is the global batch; N must divide
evenly). Contenders on the same tensors, interleaved with ``bnkit.bench.time_interleaved``
(every rank runs the same sequence, so their collectives pair up):

- ``kernels``: the layer under the policy ``kernels="cpp"`` (local moments, one all_gather,
  one normalizing pass; backward sums, one all_reduce, one gradient pass);
- ``reference``: the same layer under ``kernels="torch"`` (bnkit's reference composite,
  the only synchronized batch norm on CPU otherwise: ``torch.nn.SyncBatchNorm`` needs a GPU);
- ``local``: PyTorch's ``F.batch_norm`` on the rank's share without synchronization (what
  plain DDP computes), for scale;
- ``collectives``: the step's two collectives alone (``distributed.merge_moments`` and
  ``distributed.all_reduce_moment_grads`` on C channels), what synchronizing costs;
- ``copy``: one copy of the rank's share, the memory floor's unit.

Rank 0 prints the medians. No timing is asserted anywhere; see ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import bnkit
from bnkit import bench
from bnkit import distributed as bnd
from bnkit.kernels import cpp

DEFAULT_SHAPES = "64x64x56x56,32x256x14x14,128x512x7x7,256x1024"
LAYOUTS = ("contiguous", "channels_last")


def _steps(shape: tuple[int, ...], layout: str, rank: int) -> list[Callable[[], None]]:
    gen = torch.Generator().manual_seed(rank)
    c = shape[1]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).contiguous(memory_format=fmt)
    dy = torch.randn(shape, generator=gen).contiguous(memory_format=fmt)
    xg = x.clone().requires_grad_()
    layers = {
        kernels: bnkit.BatchNorm(c, axis=1, sync=True, policy={"kernels": kernels})
        for kernels in ("cpp", "torch")
    }
    weight = torch.ones(c, requires_grad=True)
    bias = torch.zeros(c, requires_grad=True)
    running_mean, running_var = torch.zeros(c), torch.ones(c)
    dst = torch.empty_like(x)

    def synced(kernels: str) -> Callable[[], None]:
        layer = layers[kernels]
        assert layer.weight is not None
        assert layer.bias is not None
        wanted = (xg, layer.weight, layer.bias)

        def step() -> None:
            torch.autograd.grad(layer(xg), wanted, dy)

        return step

    def local() -> None:
        y = F.batch_norm(xg, running_mean, running_var, weight, bias, True, 0.1, 1e-5)
        torch.autograd.grad(y, (xg, weight, bias), dy)

    def copy() -> None:
        dst.copy_(x)

    moments = torch.ones(c, dtype=torch.float64)
    grads = torch.ones(c)

    def collectives() -> None:
        # What synchronizing alone costs: the step's gather and all-reduce on C channels.
        bnd.merge_moments(moments, moments, moments)
        bnd.all_reduce_moment_grads(grads, grads)

    return [synced("cpp"), synced("torch"), local, collectives, copy]


def _parse(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.strip().lower().split("x"))


def _entry(rank: int, world: int, init: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    if not cpp.available():
        raise SystemExit(f"rank {rank}: the C++ kernels did not build: {cpp.build_error()}")
    rows = []
    for text in args.shapes.split(","):
        shape = _parse(text)
        local_shape = (shape[0] // world, *shape[1:])
        for layout in LAYOUTS if len(shape) == 4 else ("contiguous",):
            fns = _steps(local_shape, layout, rank)
            medians, _, _ = bench.time_interleaved(
                fns, repeats=args.repeats, warmup=2, batch_calls=False
            )
            rows.append((text, layout, *[m * 1e3 for m in medians]))
            if rank == 0:
                print(f"  {text} {layout}", file=sys.stderr, flush=True)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def _table(rows: list[list[object]], world: int, markdown: bool) -> str:
    head = (
        "shape (global)",
        "layout",
        "kernels ms",
        "reference ms",
        "local ms",
        "collectives ms",
        "copy ms",
        "kernels/reference",
        "kernels/local",
        "kernels/copy",
    )
    lines = []
    for shape, layout, *times in rows:
        kern, ref, local, coll, copy = (float(str(t)) for t in times)
        name = "NHWC" if layout == "channels_last" else "NCHW"
        lines.append(
            (
                str(shape),
                "NC" if str(shape).count("x") == 1 else name,
                f"{kern:.3f}",
                f"{ref:.3f}",
                f"{local:.3f}",
                f"{coll:.3f}",
                f"{copy:.3f}",
                f"{kern / ref:.2f}",
                f"{kern / local:.2f}",
                f"{kern / copy:.1f}",
            )
        )
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
    else:
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
        out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
        out += ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in lines]
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"bnkit {bnkit.__version__} sync bench, {when}: torch {torch.__version__}, "
        f"{world} gloo processes x 1 thread on {os.cpu_count()} CPUs, float32, "
        "one training step (forward + autograd.grad to x, weight, bias) per rank"
    )
    return header + "\n\n" + "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="global N x C x H x W shapes")
    parser.add_argument("--repeats", type=int, default=21, help="timed repeats per row")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    if args.world < 2:
        parser.error("--world must be at least 2 (one process runs no collective)")
    for text in args.shapes.split(","):
        try:
            shape = _parse(text)
        except ValueError:
            parser.error(f"bad shape {text!r}: write N x C x H x W or N x C, e.g. 32x256x14x14")
        if len(shape) not in (2, 4) or min(shape) < 1:
            parser.error(f"bad shape {text!r}: write N x C x H x W or N x C, e.g. 32x256x14x14")
        if shape[0] % args.world or shape[0] // args.world < 1:
            parser.error(f"batch {shape[0]} of {text} does not split over {args.world} ranks")
    if not cpp.available():  # build once here, not in every process at the same time
        print(f"the C++ kernels did not build: {cpp.build_error()}", file=sys.stderr)
        return 1
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        init, out = str(Path(tmp, "rendezvous")), str(Path(tmp, "rows"))
        procs = [
            ctx.Process(target=_entry, args=(rank, args.world, init, args, out))
            for rank in range(args.world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            print(f"a rank failed: exit codes {[p.exitcode for p in procs]}", file=sys.stderr)
            return 1
        rows = json.loads(Path(out).read_text())
    print(_table(rows, args.world, args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
