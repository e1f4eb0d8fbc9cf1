"""Weighted per-channel moments for the sample-weights fast path (no gradient).

With frequency weights w, constant along the channel axis, and per channel
``W = Σ w``, ``μ = Σ w x / W``, ``σ² = Σ w (x - μ)² / W`` (``tf.nn.weighted_moments``).
Two strategies, both exact up to rounding and stable for large-mean data:

* per-sample weights on contiguous (N, C, *) input: PyTorch's Welford kernel gives each
  (sample, channel) pair's mean and variance in one pass over a (1, N·C, *) view; the pairs are
  merged with the weights by Chan's parallel formula, in float64 (the merge touches N·C values);
* any other weights: weighted sums as BLAS products over a (rows, C, inner) view, with the
  corrected two-pass algorithm (shift by a first mean, fold the residual back in).

The gradient through these statistics is the closed form in ``bnkit.kernels.native``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["supports", "weighted_moments"]

_HALF = (torch.float16, torch.bfloat16)


def supports(x: Tensor, weights: Tensor) -> bool:
    """True when ``weights`` (aligned to ``x``, channels on dim 1) suit the fast path: constant
    along the channel axis and not requiring gradient."""
    return weights.ndim == x.ndim and weights.shape[1] == 1 and not weights.requires_grad


def _per_sample(weights: Tensor) -> bool:
    return all(s == 1 for s in weights.shape[1:])


def _pooled_per_sample(x: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n, c = x.shape[:2]
    inner = x[0, 0].numel()
    xs = x.float() if x.dtype in _HALF else x
    mean_nc, var_nc = torch.batch_norm_update_stats(xs.reshape(1, n * c, inner), None, None, 1.0)
    mean_nc, var_nc = mean_nc.double().view(n, c), var_nc.double().view(n, c)
    w = weights.reshape(n, 1).to(torch.float64).expand(n, c)
    total = w.sum(0)
    mean = (w * mean_nc).sum(0) / total
    var = (w * (var_nc + (mean_nc - mean) ** 2)).sum(0) / total
    dtype = xs.dtype
    return mean.to(dtype), var.to(dtype), (total * inner).to(dtype)


def _rows_channels_inner(x: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Views of x and the weights without copying x where its memory allows: (rows, C) and
    (rows, 1) when channels are innermost (channels-last memory, 2-D input), else
    (rows, C, inner) and (rows, 1, inner)."""
    channels = x.shape[1]
    w = weights.expand(*x.shape[:1], 1, *x.shape[2:])
    last = x.movedim(1, -1)
    if last.is_contiguous():
        return last.reshape(-1, channels), w.movedim(1, -1).reshape(-1, 1)
    inner = math.prod(x.shape[2:])
    return x.contiguous().reshape(x.shape[0], channels, inner), w.reshape(-1, 1, inner)


def _weighted_sum(v: Tensor, w: Tensor) -> Tensor:
    """Σ over every axis but the channel axis of ``w * v``, as BLAS products."""
    if v.ndim == 2:  # (rows, C) with (rows, 1): one matrix-vector product
        return w.reshape(1, -1).mm(v).reshape(-1)
    return torch.bmm(v, w.transpose(1, 2)).sum(dim=(0, 2))


def _blas(x: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    xs = x.float() if x.dtype in _HALF else x
    x2, w2 = _rows_channels_inner(xs, weights.to(xs.dtype))
    total = w2.sum()
    shift = _weighted_sum(x2, w2) / total
    centered = x2 - (shift if x2.ndim == 2 else shift.view(1, -1, 1))
    s1 = _weighted_sum(centered, w2)
    s2 = _weighted_sum(centered.square_(), w2)
    delta = s1 / total
    var = torch.clamp((s2 - s1 * delta) / total, min=0.0)
    return shift + delta, var, total.expand_as(var)


@torch.no_grad()
def weighted_moments(x: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel weighted mean, biased variance and total weight of ``x`` (channels on dim 1).

    Args:
        x: input, channels on dim 1, any memory format.
        weights: non-negative weights broadcastable to ``x`` with size 1 on dim 1.

    Returns:
        ``(mean, var, total)``, each of shape (C,), float32 for half input.

    >>> x = torch.tensor([[1.0], [3.0], [100.0]])
    >>> weighted_moments(x, torch.tensor([[1.0], [1.0], [0.0]]))
    (tensor([2.]), tensor([1.]), tensor([2.]))
    """
    if (
        weights.ndim == x.ndim
        and _per_sample(weights)
        and x.ndim > 2
        and x.is_contiguous()
        # batch_norm_update_stats has no meta kernel for torch.compile's dynamic shapes
        and not torch.compiler.is_compiling()
    ):
        return _pooled_per_sample(x, weights)
    return _blas(x, weights)
