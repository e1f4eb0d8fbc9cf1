"""Training-mode batch norm on PyTorch's kernels, once the batch statistics are known.

Every configuration that reduces to per-channel statistics plus a per-channel affine (plain,
renorm, per-channel adjustment, ghost batches, sample weights) runs as:

1. the batch statistics (``statistics`` below, or ``weighted.weighted_moments``), no gradient;
2. one pass of PyTorch's inference kernel, ``y = (x - μ_B) / sqrt(σ²_B + eps) · S + B``, where
   the per-channel S and B fold renorm's r and d, the adjustment and γ, β;
3. a backward that differentiates through the batch statistics: PyTorch's training-mode
   backward, or, with sample weights w (total W per channel), its inference-mode backward plus
   the closed-form correction::

       dL/dx_i = S/s · (g_i - w_i/W · (Σ_j g_j + x̂_i Σ_j g_j x̂_j)),   s = sqrt(σ² + eps)

   (sums over every element of the channel). Gradients reach γ and β through S and B.

Double backward (``create_graph=True``) recomputes the step as differentiable PyTorch ops.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["normalize_with_stats", "statistics"]

_HALF = (torch.float16, torch.bfloat16)


@torch.no_grad()
def statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` (channels on dim 1), PyTorch's kernel.

    Half-precision input is reduced in float32 (the kernel would return half statistics).
    """
    xs = x.float() if x.dtype in _HALF else x
    if torch.compiler.is_compiling():
        # batch_norm_update_stats has no meta kernel: torch.compile cannot trace it with
        # dynamic shapes (e.g. after a smaller last batch). var_mean traces.
        var, mean = torch.var_mean(xs, dim=[d for d in range(xs.ndim) if d != 1], correction=0)
        return mean, var
    mean, var = torch.batch_norm_update_stats(xs, None, None, 1.0)
    return mean, var


def _composite(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    sample_weights: Tensor | None,
) -> Tensor:
    """The same step as differentiable PyTorch ops (double backward only)."""
    dims = [d for d in range(x.ndim) if d != 1]
    xf = x.float() if x.dtype in _HALF else x
    if sample_weights is None:
        mean = xf.mean(dim=dims, keepdim=True)
        centered = xf - mean
        var = (centered * centered).mean(dim=dims, keepdim=True)
    else:
        w = sample_weights.to(xf.dtype)
        total = torch.broadcast_to(w, xf.shape).sum(dim=dims, keepdim=True)
        mean = (w * xf).sum(dim=dims, keepdim=True) / total
        centered = xf - mean
        var = (w * centered * centered).sum(dim=dims, keepdim=True) / total
    y = centered * torch.rsqrt(var + eps)
    shape = [1, -1] + [1] * (x.ndim - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y.to(x.dtype)


class _NormalizeWithStats(torch.autograd.Function):
    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        var: Tensor,
        eps: float,
        sample_weights: Tensor | None,
        total: Tensor | None,
    ) -> Tensor:
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, weight, bias, mean, var, eps, sample_weights, total = inputs
        ctx.eps = eps
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, bias, mean, var, sample_weights, total)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, mean, var, sample_weights, total = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the composite so second derivatives see the
            # statistics' dependence on x.
            return _double_backward(ctx, g, x, weight, bias, sample_weights)
        mask = [needs[0], weight is not None and needs[1], ctx.has_bias and needs[2]]
        invstd = torch.rsqrt(var + ctx.eps)
        if sample_weights is None:
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
                g, x, weight, None, None, mean, invstd, True, ctx.eps, mask
            )
            return gx, gw, gb, None, None, None, None, None
        # Inference-mode backward gives gx = g·S/s, Σ g x̂ and Σ g; the weighted statistics'
        # dependence on x adds -S/s · w_i/W · (Σg + x̂_i Σ g x̂) = -w_i (a + b (x_i - μ)).
        full = [needs[0], True, True]
        gx, sum_gxhat, sum_g = torch.ops.aten.native_batch_norm_backward(
            g, x, weight, mean, var, None, None, False, ctx.eps, full
        )
        if needs[0]:
            gx = _weighted_correction_(
                gx, x, weight, mean, var, invstd, sum_g, sum_gxhat, total, sample_weights
            )
        gw = sum_gxhat if weight is not None and needs[1] else None
        gb = sum_g if ctx.has_bias and needs[2] else None
        return (gx if needs[0] else None), gw, gb, None, None, None, None, None


def ill_conditioned(mean: Tensor, var: Tensor, dtype: torch.dtype) -> bool:
    """True when rounding the mean to ``dtype`` distorts the variance by more than 1e-4.

    PyTorch's kernels centre on a rounded mean, and ``x·a + b`` forms cancel the same way: a
    channel whose mean is about 1e4 times its standard deviation or more (float32) needs
    the exact, centred computations instead.
    """
    if dtype == torch.float64 or torch.compiler.is_compiling():
        return False  # float64 would need a mean 1e10 times the standard deviation
    threshold = torch.finfo(dtype).eps ** 2 / 1e-4
    return bool((mean.square() * threshold > var).any())


def _weighted_correction_(
    gx: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    var: Tensor,
    invstd: Tensor,
    sum_g: Tensor,
    sum_gxhat: Tensor,
    total: Tensor,
    sample_weights: Tensor,
) -> Tensor:
    """``gx -= w (a + b (x - μ))`` with ``a = S/s · Σg/W`` and ``b = S/s² · Σgx̂/W``."""
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    a = scale * sum_g / total
    b = scale * invstd * sum_gxhat / total
    shape = [1, -1] + [1] * (x.ndim - 2)
    per_sample = all(s == 1 for s in sample_weights.shape[1:])
    exact = ill_conditioned(mean, var, x.dtype)
    if per_sample and not exact:
        # Weights only vary per sample: w_n b_c and w_n (a_c - b_c μ_c) are (N, C) tables, and
        # the correction is two in-place passes over gx.
        wn = sample_weights.reshape(-1, 1).to(a.dtype)
        nc = [x.shape[0], x.shape[1]] + [1] * (x.ndim - 2)
        gx.addcmul_(x, (wn * b).reshape(nc).to(gx.dtype), value=-1)
        return gx.sub_((wn * (a - b * mean)).reshape(nc).to(gx.dtype))
    correction = torch.addcmul(a.reshape(shape), x - mean.reshape(shape), b.reshape(shape))
    correction.mul_(sample_weights)
    return gx.sub_(correction.to(gx.dtype))


def _double_backward(
    ctx: Any,
    g: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    sample_weights: Tensor | None,
) -> tuple[Tensor | None, ...]:
    needs = ctx.needs_input_grad
    inputs = [
        t for t, need in zip((x, weight, bias), needs[:3], strict=True) if need and t is not None
    ]
    with torch.enable_grad():
        y = _composite(x, weight, bias, ctx.eps, sample_weights)
    grads = iter(torch.autograd.grad(y, inputs, g, create_graph=True))
    out = [next(grads) if need else None for need in needs[:3]]
    return (*out, None, None, None, None, None)


def normalize_with_stats(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    *,
    sample_weights: Tensor | None = None,
    total: Tensor | None = None,
) -> Tensor:
    """``(x - mean) / sqrt(var + eps) · weight + bias`` with training-mode gradients.

    Args:
        x: input with channels on dim 1 (any memory format PyTorch's kernel accepts).
        weight, bias: per-channel scale S and shift B (differentiable), or None.
        mean, var: the batch's per-channel mean and biased variance (no gradient).
        eps: added to the variance.
        sample_weights: weights broadcastable to ``x`` (size 1 on dim 1) when the statistics
            are weighted; ``total`` is then the weight per channel.

    Returns:
        The normalized tensor, in ``x``'s dtype and memory format.

    >>> x = torch.tensor([[1.0], [3.0]], requires_grad=True)
    >>> mean, var = statistics(x.detach())
    >>> normalize_with_stats(x, None, None, mean, var, 0.0)
    tensor([[-1.],
            [ 1.]], grad_fn=<_NormalizeWithStatsBackward>)
    """
    differentiable = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    )
    if not differentiable:
        # No graph to record: skip autograd.Function's bookkeeping (tens of microseconds).
        plain: Tensor = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        return plain
    y: Tensor = _NormalizeWithStats.apply(  # type: ignore[no-untyped-call]
        x, weight, bias, mean, var, eps, sample_weights, total
    )
    return y
