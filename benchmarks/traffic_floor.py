"""The memory-traffic floor of a batch-norm training step, measured on this machine.

``python benchmarks/traffic_floor.py [--shapes 32x256x14x14,...] [--repeats N]``

A training step must read x to get its statistics before it can write y, and read x and dy to
get the two gradient sums before it can write dx. When a tile of channels fits a core's cache
(NCHW planes) the second read comes from the cache; when every channel is spread over the
whole tensor (channels-last, 2-D) it comes from memory again, and the step's traffic is that
of four simple operations, each timed here on the same tensors:

- ``copy``: ``dst.copy_(x)``, one read and one write, the unit of every ratio below;
- ``read x``: ``x.sum()``, the statistics pass's read;
- ``read x, dy``: ``x.sum(); dy.sum()``, the gradient sums' read;
- ``x+dy``: ``torch.add(x, dy, out=o)``, two reads and one write, the input-gradient pass.

``floor`` is their sum in copies: the two-pass floor of forward + backward. Next to it, bnkit's
C++ operators alone (``fwd``: ``bnkit::bn_train``; ``bwd``: ``bnkit::bn_backward``) and the
layer's whole step (``step``: ``bnkit.BatchNorm`` under ``kernels="cpp"``, forward and
``torch.autograd.grad`` for x, γ and β, as ``bnkit bench`` times ``fwd+bwd``). All contenders
of a row are interleaved with the same number of calls per sample
(``bnkit.bench.time_interleaved``). No timing is asserted anywhere; see "C++ kernels" in
``docs/benchmarks.md`` for a recorded run.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

import bnkit
from bnkit import bench
from bnkit.kernels import cpp

DEFAULT_SHAPES = "64x64x56x56,32x256x14x14,128x512x7x7,256x1024"
COLUMNS = ("read x", "read x, dy", "x+dy", "fwd", "bwd", "step")
_EPS = 1e-5


def _contenders(shape: tuple[int, ...], layout: str) -> list[Callable[[], object]]:
    """copy first, then the contenders of COLUMNS, in that order, on one set of tensors."""
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape, generator=gen).contiguous(memory_format=fmt)
    dy = torch.randn(shape, generator=gen).contiguous(memory_format=fmt)
    dst, out = torch.empty_like(x), torch.empty_like(x)
    c = shape[1]
    weight, bias = torch.ones(c), torch.zeros(c)
    running_mean, running_var = torch.zeros(c), torch.ones(c)
    with torch.no_grad():
        stats = cpp.train(x, weight, bias, _EPS)
    invstd = (stats.var + _EPS).rsqrt()
    layer = bnkit.BatchNorm(c, policy={"kernels": "cpp"})
    xg = x.detach().clone().requires_grad_()
    wanted = (xg, layer.weight, layer.bias)

    def forward() -> None:
        with torch.no_grad():
            cpp.train(
                x,
                weight,
                bias,
                _EPS,
                running_mean=running_mean,
                running_var=running_var,
                momentum=0.1,
            )

    def step() -> None:
        torch.autograd.grad(layer(xg), wanted, dy)

    return [
        lambda: dst.copy_(x),
        lambda: x.sum(),
        lambda: (x.sum(), dy.sum()),
        lambda: torch.add(x, dy, out=out),
        forward,
        lambda: cpp.bn_backward(dy, x, stats.mean, invstd, weight),
        step,
    ]


def run(shapes: list[tuple[int, ...]], repeats: int | None) -> list[dict[str, object]]:
    """One row per shape and layout: the copy's milliseconds, every other contender in copies."""
    rows: list[dict[str, object]] = []
    for shape in shapes:
        for layout in ("contiguous", "channels_last") if len(shape) == 4 else ("contiguous",):
            with torch.enable_grad():
                times, _, _ = bench.time_interleaved(
                    _contenders(shape, layout), repeats=repeats, warmup=2
                )
            copy = times[0]
            row: dict[str, object] = {
                "shape": "x".join(map(str, shape)),
                "layout": "NHWC"
                if layout == "channels_last"
                else ("NC" if len(shape) == 2 else "NCHW"),
                "copy_ms": 1e3 * copy,
            }
            row.update({name: t / copy for name, t in zip(COLUMNS, times[1:], strict=True)})
            rows.append(row)
    return rows


def two_pass_floor(row: dict[str, object]) -> float:
    """Forward + backward in copies when every second read comes from memory: read x, then
    copy (normalize); read x and dy, then x + dy (the input gradient)."""
    return 1.0 + sum(float(str(row[k])) for k in ("read x", "read x, dy", "x+dy"))


def format_table(rows: list[dict[str, object]]) -> str:
    """The rows as a Markdown table; every column after ``copy ms`` is in copies."""
    head = ["shape", "layout", "copy ms", *COLUMNS[:3], "floor", *COLUMNS[3:], "fwd+bwd"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        ratios = [float(str(r[k])) for k in COLUMNS]
        cells = [
            str(r["shape"]),
            str(r["layout"]),
            f"{float(str(r['copy_ms'])):.3f}",
            *(f"{v:.2f}" for v in ratios[:3]),
            f"{two_pass_floor(r):.2f}",
            *(f"{v:.2f}" for v in ratios[3:]),
            f"{ratios[3] + ratios[4]:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return bench.kernel_script_main(
        argv,
        prog="traffic_floor.py",
        doc=__doc__,
        title="traffic floor",
        default_shapes=DEFAULT_SHAPES,
        table=lambda shapes, repeats: format_table(run(shapes, repeats)),
    )


if __name__ == "__main__":
    sys.exit(main())
