"""Eval mode with gradients: bnkit's C++ inference pass against PyTorch's eval kernel.

``python benchmarks/eval_grad.py [--shapes 64x64x56x56,...] [--repeats N] [--markdown]``

A model in eval mode that needs gradients (input gradients for saliency maps or adversarial
examples, fine-tuning with frozen batch norm) runs the inference formula forward and its
gradient back. Each row times one autograd step, forward and ``torch.autograd.grad``, in
three contenders on the same tensors, interleaved (``bnkit.bench.time_interleaved``):

- ``kernel``: ``bnkit.kernels.cpp.bn_eval`` (``bnkit::bn_eval`` and ``bn_eval_backward``);
- ``torch``: ``torch.nn.functional.batch_norm(training=False)``;
- ``copy``: one copy of x, the memory floor's unit.

``x,γ,β`` asks for the gradients of x, γ and β; ``x`` only for x (frozen parameters).
No timing is asserted anywhere; see ``docs/benchmarks.md`` for a recorded run.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bnkit import bench
from bnkit.kernels import cpp

DEFAULT_SHAPES = "64x64x56x56,32x256x14x14,128x512x7x7,256x1024"
_EPS = 1e-5


def _steps(shape: tuple[int, ...], layout: str, params: bool) -> list[Callable[[], None]]:
    gen = torch.Generator().manual_seed(0)
    c = shape[1]
    x = torch.randn(shape, generator=gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    mean, var = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5
    weight = (torch.rand(c, generator=gen) + 0.5).requires_grad_(params)
    bias = torch.randn(c, generator=gen).requires_grad_(params)
    xg = x.clone().requires_grad_()
    dy = torch.randn(x.shape, generator=gen).contiguous(memory_format=_format(x))
    wanted = (xg, weight, bias) if params else (xg,)
    dst = torch.empty_like(x)

    def kernel() -> None:
        torch.autograd.grad(cpp.bn_eval(xg, mean, var, weight, bias, _EPS), wanted, dy)

    def reference() -> None:
        y = F.batch_norm(xg, mean, var, weight, bias, False, 0.1, _EPS)
        torch.autograd.grad(y, wanted, dy)

    def copy() -> None:
        dst.copy_(x)

    return [kernel, reference, copy]


def _format(x: torch.Tensor) -> torch.memory_format:
    if x.ndim == 4 and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def run(shapes: list[tuple[int, ...]], repeats: int | None) -> list[dict[str, object]]:
    """One row per shape, layout and gradient set: milliseconds and ratios."""
    rows: list[dict[str, object]] = []
    for shape in shapes:
        for layout in ("contiguous", "channels_last") if len(shape) == 4 else ("contiguous",):
            for params in (True, False):
                with torch.enable_grad():
                    (k, t, c), _, _ = bench.time_interleaved(
                        _steps(shape, layout, params), repeats=repeats, warmup=2
                    )
                label = (
                    "NHWC" if layout == "channels_last" else ("NC" if len(shape) == 2 else "NCHW")
                )
                rows.append(
                    {
                        "shape": "x".join(map(str, shape)),
                        "layout": label,
                        "grads": "x,γ,β" if params else "x",
                        "kernel_ms": 1e3 * k,
                        "torch_ms": 1e3 * t,
                        "copy_ms": 1e3 * c,
                    }
                )
    return rows


def format_table(rows: list[dict[str, object]]) -> str:
    """The rows as a Markdown table with kernel/torch and kernel/copy columns."""
    lines = [
        "| shape | layout | grads | kernel ms | torch ms | copy ms | kernel/torch | kernel/copy |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        k, t, c = (float(str(r[key])) for key in ("kernel_ms", "torch_ms", "copy_ms"))
        lines.append(
            f"| {r['shape']} | {r['layout']} | {r['grads']} | {k:.3f} | {t:.3f} | {c:.3f} "
            f"| {k / t:.2f} | {k / c:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return bench.kernel_script_main(
        argv,
        prog="eval_grad.py",
        doc=__doc__,
        title="eval forward+backward",
        default_shapes=DEFAULT_SHAPES,
        table=lambda shapes, repeats: format_table(run(shapes, repeats)),
    )


if __name__ == "__main__":
    sys.exit(main())
