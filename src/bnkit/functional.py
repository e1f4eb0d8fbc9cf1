"""Stateless batch-norm math: moments, normalize, and the training/eval step.

Numerics decisions made here (each one on purpose):

* Statistics accumulate in float32 for float16/bfloat16 input and in the input's dtype
  otherwise (float64 stays float64). Outputs come back in the input's dtype.
* Variances are computed two-pass or with Welford's update (PyTorch's kernels), never as an
  unguarded ``E[x^2] - E[x]^2``. ``moments`` and the reference path use the *corrected*
  two-pass algorithm (Chan, Golub and LeVeque), which also absorbs the rounding error of the
  first-pass mean, so data with mean 1e4 and standard deviation 1e-2 keeps its variance in
  float32; the kernel path switches to it when its rounded-mean centring would not.
* Training always normalizes with the *biased* batch variance. The Bessel-corrected one is
  returned alongside it for the moving average (``bnkit.running`` picks which one feeds it).
* The reference path normalizes as ``(x - mean) * rsqrt(var + eps)``: the subtraction comes
  first so a large mean does not cancel. PyTorch's kernels compute ``x * a + b``.

Dispatch in training (details in ``docs/architecture.md``):

1. nothing of bnkit's applies: PyTorch's own call, ``torch.nn.functional.batch_norm``;
2. per-channel statistics plus a per-channel affine (renorm, adjustment, ghost batches, sample
   weights): ``bnkit.kernels`` -- statistics first, then one pass of PyTorch's inference kernel
   with everything folded into the affine, and a backward through the statistics;
3. anything else, or ``impl="reference"``: the composite of PyTorch ops, the oracle that every
   fast path is tested against.

With ``impl="cpp"`` (or the policy ``kernels="cpp"``, which turns ``"auto"`` into ``"cpp"``),
CPU inputs go to bnkit's C++ kernels (``bnkit.kernels.cpp``) wherever they serve the call:
training without synchronization (plain, renorm, ghost batches, sample weights that are the
same for every channel and need no gradient, a per-channel adjustment folded into γ and β, ReLU
fused), and inference. Everything else takes the paths above.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, overload

import torch
import torch.nn.functional as F
from torch import Tensor

from bnkit import distributed, running
from bnkit.kernels import cpp, native, weighted
from bnkit.policies import get_policy
from bnkit.running import BatchStats

__all__ = [
    "ACTIVATIONS",
    "BatchStats",
    "align_weights",
    "batch_norm",
    "moments",
    "normalize",
    "resolve_activation",
]

Activation = str | Callable[[Tensor], Tensor] | None
Adjustment = Callable[[torch.Size], tuple[Tensor | float, Tensor | float]]
GhostLayout = Literal["contiguous", "strided"]
Impl = Literal["auto", "reference", "cpp", "torch"]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
    "silu": F.silu,
    "gelu": F.gelu,
}

_RENORM_KEYS = ("rmax", "rmin", "dmax")
_FULL_PRECISION = (torch.float32, torch.float64)


def resolve_activation(activation: Activation) -> Callable[[Tensor], Tensor] | None:
    """Return the activation callable for a name, a callable, or None.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
    """
    if activation is None or callable(activation):
        return activation
    if isinstance(activation, str) and activation in ACTIVATIONS:
        return ACTIVATIONS[activation]
    raise ValueError(
        f"unknown activation {activation!r}; use one of {sorted(ACTIVATIONS)}, a callable "
        "(e.g. functools.partial(torch.nn.functional.leaky_relu, negative_slope=0.2)), or None"
    )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics accumulate in: float32 for half types, else the dtype itself."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    if not dtype.is_floating_point:
        raise TypeError(f"batch norm needs floating-point input, got {dtype}")
    return dtype


def canonical_axis(axis: int, ndim: int) -> int:
    """Map a possibly negative channel axis to ``0 <= axis < ndim``, excluding the batch axis."""
    if ndim < 2:
        raise ValueError(
            f"batch norm needs input of rank >= 2 (batch, channels, ...), got rank {ndim}"
        )
    a = axis + ndim if axis < 0 else axis
    if not 0 < a < ndim:
        raise ValueError(
            f"channel axis {axis} is out of range for rank-{ndim} input (axis 0 is the batch "
            f"axis); use 1 for channels-first data or -1 for channels-last data"
        )
    return a


def _as_dims(dims: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    seq = (dims,) if isinstance(dims, int) else tuple(dims)
    return tuple(sorted({d + ndim if d < 0 else d for d in seq}))


def _channel_view(v: Tensor, ndim: int, axis: int) -> Tensor:
    """Reshape a per-channel vector (C,) to broadcast along ``axis`` of a rank-``ndim`` input."""
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _weight_total(w: Tensor, shape: Sequence[int], dims: tuple[int, ...]) -> Tensor:
    """Sum of ``w`` broadcast to ``shape`` over ``dims`` (keepdim), without materializing it."""
    total = w.sum(dim=[d for d in dims if w.shape[d] != 1], keepdim=True) if dims else w
    repeat = math.prod([shape[d] for d in dims if w.shape[d] == 1])
    return total * repeat if repeat != 1 else total


def _check_positive_total(total: Tensor) -> None:
    # A data-dependent check needs a host read; skipped while torch.compile traces.
    if torch.compiler.is_compiling():
        return
    if bool((total <= 0).any()):
        raise ValueError(
            "the sample weights sum to zero (or less) over the reduced dimensions, so the "
            "weighted mean is undefined. Fix: 1) check the mask is not all zeros for this "
            "batch, 2) skip the batch, or 3) use weights > 0."
        )


def _check_enough_weight(total: Tensor, correction: float) -> None:
    if torch.compiler.is_compiling():
        return
    if bool((total <= correction).any()):
        raise ValueError(
            f"the sample weights sum to {float(total.min()):g} over the reduced dimensions, "
            f"not more than correction={correction:g}, so the corrected variance is undefined "
            "(frequency weights: the total weight counts observations). Fix: use "
            "correction=0, or weights that count observations."
        )


def moments(
    x: Tensor,
    dims: int | Sequence[int],
    *,
    weights: Tensor | None = None,
    correction: float = 0,
    keepdim: bool = False,
) -> tuple[Tensor, Tensor]:
    """Mean and variance of ``x`` over ``dims``, optionally weighted.

    Without weights: ``mean = sum(x)/n`` and ``var = sum((x - mean)^2)/(n - correction)``.
    With weights (as ``tf.nn.weighted_moments``, frequency
    weights): ``mean = sum(w x)/W`` and ``var = sum(w (x - mean)^2)/(W - correction)`` with
    ``W = sum(w)`` over the reduced elements. Both use the corrected two-pass algorithm (shift
    by a first mean, fold the residual back in), stable for data with a large mean.

    Args:
        x: input of any floating dtype.
        dims: the dimensions to reduce.
        weights: non-negative weights broadcastable to ``x`` (standard broadcasting).
        correction: subtracted from the count (or total weight): 0 biased, 1 Bessel.
        keepdim: keep the reduced dimensions with size 1.

    Returns:
        ``(mean, var)`` in float32 for half input, else in ``x``'s dtype.

    Raises:
        ValueError: when the weights sum to zero over the reduced dimensions.

    Shape:
        ``x``: any; outputs: ``x``'s shape without ``dims`` (or with size 1 if keepdim).

    >>> x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    >>> moments(x, 0)
    (tensor([2., 4.]), tensor([1., 4.]))
    >>> moments(x, 0, weights=torch.tensor([[3.0], [1.0]]))[0]
    tensor([1.5000, 3.0000])
    """
    dims_t = _as_dims(dims, x.ndim)
    xf = x.to(compute_dtype(x.dtype))
    if weights is None:
        count = float(math.prod([xf.shape[d] for d in dims_t]))
        total = torch.full((), count, dtype=xf.dtype, device=xf.device)
        shift = xf.mean(dim=dims_t, keepdim=True).detach()
        centered = xf - shift
        s1 = centered.sum(dim=dims_t, keepdim=True)
        s2 = (centered * centered).sum(dim=dims_t, keepdim=True)
    else:
        w = weights.to(xf.dtype)
        if w.ndim > xf.ndim:
            raise ValueError(
                f"weights of shape {tuple(w.shape)} have more dims than x {tuple(x.shape)}"
            )
        w = w.reshape((1,) * (xf.ndim - w.ndim) + tuple(w.shape))
        total = _weight_total(w, xf.shape, dims_t)
        _check_positive_total(total)
        # Corrected two-pass: shift by a first estimate of the mean, then fold the residual
        # mean of the shifted data back in; the residual also corrects the sum of squares.
        shift = ((w * xf).sum(dim=dims_t, keepdim=True) / total).detach()
        centered = xf - shift
        s1 = (w * centered).sum(dim=dims_t, keepdim=True)
        s2 = (w * centered * centered).sum(dim=dims_t, keepdim=True)
    mean = shift + s1 / total
    if correction:
        _check_enough_weight(total, correction)
    var = (s2 - s1 * s1 / total) / (total - correction)
    if not keepdim:
        mean, var = mean.squeeze(dims_t), var.squeeze(dims_t)
    return mean, var


def normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    axis: int = 1,
) -> Tensor:
    """``y = (x - mean) / sqrt(var + eps) * weight + bias`` with per-channel statistics.

    Args:
        x: input with channels on ``axis``.
        mean, var: per-channel statistics, shape (C,).
        weight, bias: per-channel affine parameters (C,), or None for 1 and 0.
        eps: added to the variance.
        axis: the channel axis (negative counts from the end).

    Returns:
        Tensor of ``x``'s shape and dtype (computed in float32 for half input).

    >>> normalize(torch.tensor([[1.0], [3.0]]), torch.tensor([2.0]), torch.tensor([1.0]), eps=0.0)
    tensor([[-1.],
            [ 1.]])
    """
    a = canonical_axis(axis, x.ndim)
    cdt = compute_dtype(x.dtype)
    xf = x.to(cdt)
    scale = torch.rsqrt(var.to(cdt) + eps)
    if weight is not None:
        scale = scale * weight.to(cdt)
    y = (xf - _channel_view(mean.to(cdt), x.ndim, a)) * _channel_view(scale, x.ndim, a)
    if bias is not None:
        y = y + _channel_view(bias.to(cdt), x.ndim, a)
    return y.to(x.dtype)


def align_weights(weights: Tensor, x: Tensor, axis: int) -> Tensor:
    """Shape per-sample weights or a mask so they broadcast against ``x``.

    A weight tensor of rank ``k < x.ndim`` covers the first ``k`` non-channel dimensions of
    ``x``, starting at the batch dimension: ``(N,)`` for per-sample weights, ``(N, L)`` for a
    padding mask over ``(N, L, C)`` (axis=-1) or ``(N, C, L)`` (axis=1) input. A tensor of
    ``x``'s rank is used as it is (standard broadcasting).

    Raises:
        ValueError: when the shapes do not line up (the message shows both).

    >>> align_weights(torch.ones(8), torch.zeros(8, 3, 4, 4), 1).shape
    torch.Size([8, 1, 1, 1])
    >>> align_weights(torch.ones(8, 5), torch.zeros(8, 5, 3), 2).shape
    torch.Size([8, 5, 1])
    """
    if weights.ndim == x.ndim:
        w = weights
    else:
        non_channel = [d for d in range(x.ndim) if d != axis]
        if weights.ndim == 0 or weights.ndim > len(non_channel):
            raise ValueError(
                f"weights of shape {tuple(weights.shape)} do not fit input of shape "
                f"{tuple(x.shape)}: pass per-sample weights of shape ({x.shape[0]},), a mask "
                f"over the leading non-channel dims, or weights of the input's full rank"
            )
        shape = [1] * x.ndim
        for size, d in zip(weights.shape, non_channel, strict=False):
            shape[d] = size
        w = weights.reshape(shape)
    for d in range(x.ndim):
        # Two comparisons, not `in (1, x.shape[d])`: after an automatic-dynamic recompile of
        # the layer, Dynamo raised here for a mask that fits (sizes symbolic); the explicit
        # comparisons trace as guards (test_compiled_layer_with_sample_weights_and_warmup).
        if w.shape[d] != 1 and w.shape[d] != x.shape[d]:
            raise ValueError(
                f"weights of shape {tuple(weights.shape)} do not broadcast against input of "
                f"shape {tuple(x.shape)} (channel axis {axis}); weights are aligned from the "
                f"batch dimension over the non-channel dims"
            )
    return w


def _one_value_per_channel(x: Tensor, axis: int, virtual_batch_size: int | None) -> bool:
    """True when each channel (of each ghost batch) has a single value to take statistics of."""
    group = virtual_batch_size if virtual_batch_size is not None else x.shape[0]
    # math.prod of a list, not of a generator: torch.compile cannot trace the generator form.
    return group * math.prod([s for d, s in enumerate(x.shape) if d not in (0, axis)]) == 1


def _check_values_per_channel(x: Tensor, axis: int, virtual_batch_size: int | None) -> None:
    if _one_value_per_channel(x, axis, virtual_batch_size):
        where = (
            f"a ghost batch of {virtual_batch_size} sample(s)"
            if virtual_batch_size is not None
            else f"input of shape {tuple(x.shape)}"
        )
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {where}. A variance "
            "needs at least two values. Fix: 1) use batches of 2 or more (drop_last=True in "
            "the DataLoader removes a final batch of one), 2) call model.eval() (or pass "
            "training=False) to normalize with the running statistics, 3) use a larger "
            "virtual_batch_size, or 4) set the layer's policy single_value='running' "
            "(running statistics for such batches) or 'skip-update' (see bnkit.policies)."
        )


def _check_ghosts(n: int, virtual_batch_size: int, layout: str) -> int:
    if virtual_batch_size < 1:
        raise ValueError(f"virtual_batch_size must be a positive integer, got {virtual_batch_size}")
    if n % virtual_batch_size != 0:
        raise ValueError(
            f"the batch size {n} is not divisible by virtual_batch_size={virtual_batch_size}: "
            f"ghost batches must split the batch evenly. Fix: use a batch size that is a "
            f"multiple of {virtual_batch_size} (drop_last=True in the DataLoader), or a "
            f"virtual_batch_size that divides {n}."
        )
    if layout not in ("contiguous", "strided"):
        raise ValueError(f"ghost_layout must be 'contiguous' or 'strided', got {layout!r}")
    return n // virtual_batch_size


def _to_ghosts(t: Tensor, ghosts: int, layout: str) -> Tensor:
    """(N, ...) -> (ghosts, N/ghosts, ...): ghost j is samples [j*v, (j+1)*v) (contiguous) or
    {j, j+G, j+2G, ...} (strided, Keras)."""
    if layout == "contiguous":
        return t.reshape(ghosts, -1, *t.shape[1:])
    return t.reshape(-1, ghosts, *t.shape[1:]).transpose(0, 1)


def _from_ghosts(t: Tensor, layout: str) -> Tensor:
    if layout == "contiguous":
        return t.reshape(-1, *t.shape[2:])
    return t.transpose(0, 1).reshape(-1, *t.shape[2:])


def _unbiased(var: Tensor, count: Tensor) -> Tensor:
    # Bessel's correction n/(n-1), with n-1 clamped at 1 as TensorFlow's kernel does.
    return var * (count / torch.clamp(count - 1.0, min=1.0))


def _renorm_terms(
    mean: Tensor,
    var: Tensor,
    renorm_mean: Tensor,
    renorm_stddev: Tensor,
    eps: float,
    rmin: float | None,
    rmax: float | None,
    dmax: float | None,
) -> tuple[Tensor, Tensor]:
    stddev = torch.sqrt(var + eps)
    denom = torch.clamp(renorm_stddev.to(var.dtype), min=math.sqrt(eps))
    r = stddev / denom
    d = (mean - renorm_mean.to(mean.dtype)) / denom
    if rmin is not None:
        r = torch.clamp(r, min=rmin)
    if rmax is not None:
        r = torch.clamp(r, max=rmax)
    if dmax is not None:
        d = torch.clamp(d, min=-dmax, max=dmax)
    return r.detach(), d.detach()


# Under torch.compile, r and d come from an opaque custom op: AOTAutograd's min-cut
# partitioner never recomputes one in the backward, and recomputing r and d there would read
# the renorm buffers after the forward has updated them in place (wrong γ gradients with
# inductor; pytorch/pytorch#197039). Its result is saved instead.
@torch.library.custom_op("bnkit::renorm_correction", mutates_args=())
def _renorm_terms_op(
    mean: Tensor,
    var: Tensor,
    renorm_mean: Tensor,
    renorm_stddev: Tensor,
    eps: float,
    rmin: float | None,
    rmax: float | None,
    dmax: float | None,
) -> tuple[Tensor, Tensor]:
    return _renorm_terms(mean, var, renorm_mean, renorm_stddev, eps, rmin, rmax, dmax)


@_renorm_terms_op.register_fake
def _renorm_terms_fake(
    mean: Tensor,
    var: Tensor,
    renorm_mean: Tensor,
    renorm_stddev: Tensor,
    eps: float,
    rmin: float | None,
    rmax: float | None,
    dmax: float | None,
) -> tuple[Tensor, Tensor]:
    return torch.empty_like(var), torch.empty_like(mean)


def _renorm_correction(
    mean: Tensor,
    var: Tensor,
    renorm_mean: Tensor,
    renorm_stddev: Tensor,
    eps: float,
    clipping: dict[str, float] | None,
) -> tuple[Tensor, Tensor]:
    """Batch renormalization's r and d (Ioffe 2017, Keras' formulas), without gradient.

    ``r = sqrt(var + eps) / max(renorm_stddev, sqrt(eps))``, ``d = (mean - renorm_mean) /
    max(renorm_stddev, sqrt(eps))``, then r clipped to [rmin, rmax] and d to [-dmax, dmax].
    """
    rmin, rmax, dmax = _renorm_bounds(clipping)
    terms = _renorm_terms_op if torch.compiler.is_compiling() else _renorm_terms
    # All inputs detached: r and d carry no gradient, and the custom op has no autograd formula
    # (renorm statistics that require grad, e.g. passed by a user, would fail in its backward).
    r, d = terms(
        mean.detach(),
        var.detach(),
        renorm_mean.detach(),
        renorm_stddev.detach(),
        eps,
        rmin,
        rmax,
        dmax,
    )
    return r, d


def _affine_terms(
    ndim: int,
    axis: int,
    channels: int,
    cdt: torch.dtype,
    device: torch.device,
    weight: Tensor | None,
    bias: Tensor | None,
    r: Tensor | None,
    d: Tensor | None,
    adjusted: tuple[Tensor | float, Tensor | float] | None,
) -> tuple[Tensor | None, Tensor | None]:
    """Compose ``y = ((x̂ r + d) a + b) γ + β`` into ``y = x̂ S + B``.

    The order is Keras': renorm innermost, then the adjustment ``(a, b)``, then the learned
    affine. Per-channel terms (1-D of length C) become channel views; adjustment values of
    another shape broadcast against the input as they are.
    """

    def view(v: Tensor | float | None) -> Tensor | None:
        if v is None:
            return None
        # A Python number straight to the compute dtype (through float32 it would lose
        # digits on float64 input: 0.1 → 0.10000000149).
        t = torch.as_tensor(v, dtype=None if isinstance(v, Tensor) else cdt, device=device)
        t = t.to(cdt)
        if t.ndim == 1 and t.numel() == channels and ndim > 1:
            return _channel_view(t, ndim, axis)
        return t

    scale, shift = view(r), view(d)
    terms = [] if adjusted is None else [(view(adjusted[0]), view(adjusted[1]))]
    terms.append((view(weight), view(bias)))
    for mul, add in terms:
        if mul is not None:
            scale = mul if scale is None else scale * mul
            shift = None if shift is None else shift * mul
        if add is not None:
            shift = add if shift is None else shift + add
    return scale, shift


def _is_per_channel(v: Tensor | float, channels: int) -> bool:
    return not isinstance(v, Tensor) or v.numel() == 1 or (v.ndim == 1 and v.numel() == channels)


class _KernelGroups(NamedTuple):
    """How a channel-first input is split into calls of PyTorch's kernel."""

    parts: list[Tensor]
    ghosts: int
    merged: bool  # ghost batches became channels of one (v, G·C, ...) tensor


def _kernel_groups(xt: Tensor, virtual_batch_size: int | None, layout: str) -> _KernelGroups:
    """Ghost batches for the kernel: contiguous ghosts of 3-D or larger input are slices (views,
    one kernel call each); strided ghosts, and those of 2-D input, become channels of a
    (v, G·C, ...) tensor (a view for strided, contiguous input; otherwise one copy)."""
    if virtual_batch_size is None:
        return _KernelGroups([xt], 1, False)
    ghosts = xt.shape[0] // virtual_batch_size
    if layout == "contiguous" and xt.ndim > 2:
        return _KernelGroups(list(torch.split(xt, virtual_batch_size)), ghosts, False)
    grouped = _to_ghosts(xt, ghosts, layout).transpose(0, 1)  # (v, G, C, ...)
    merged = grouped.reshape(virtual_batch_size, ghosts * xt.shape[1], *xt.shape[2:])
    return _KernelGroups([merged], ghosts, True)


def _ungroup(ys: list[Tensor], groups: _KernelGroups, xt: Tensor, layout: str) -> Tensor:
    if groups.ghosts == 1:
        return ys[0]
    if not groups.merged:
        return torch.cat(ys)
    y = ys[0].reshape(-1, groups.ghosts, xt.shape[1], *xt.shape[2:]).transpose(0, 1)
    return _from_ghosts(y, layout)


def _repeat(v: Tensor | None, times: int) -> Tensor | None:
    if v is None or times == 1:
        return v
    return v.reshape(-1).repeat(times)


@torch.no_grad()
def _exact_statistics(x: Tensor, sample_weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """Corrected two-pass statistics of channel-first ``x`` (see :func:`moments`)."""
    dims = [d for d in range(x.ndim) if d != 1]
    mean, var = moments(x, dims, weights=sample_weights)
    return mean, var


def _kernel_step(
    x: Tensor,
    axis: int,
    eps: float,
    weight: Tensor | None,
    bias: Tensor | None,
    weights: Tensor | None,
    virtual_batch_size: int | None,
    layout: str,
    renorm: tuple[Tensor, Tensor, dict[str, float] | None] | None,
    adjusted: tuple[Tensor | float, Tensor | float] | None,
    on_stats: Callable[[BatchStats], None],
) -> tuple[Tensor, BatchStats]:
    """Training step on PyTorch's kernels: statistics, then one normalizing pass per group.

    ``weights`` are already aligned to ``x`` with the channel axis moved to dim 1.
    """
    channels = x.shape[axis]
    xt = x.movedim(axis, 1) if axis != 1 else x
    param_dtype = compute_dtype(x.dtype)
    groups = _kernel_groups(xt, virtual_batch_size, layout)
    sample_w: Tensor | None = None
    if weights is None:
        pairs = [native.statistics(part) for part in groups.parts]
        mean = torch.cat([m for m, _ in pairs])
        var = torch.cat([v for _, v in pairs])
        if native.ill_conditioned(mean, var, x.dtype):
            pairs = [_exact_statistics(part, None) for part in groups.parts]
            mean, var = torch.cat([m for m, _ in pairs]), torch.cat([v for _, v in pairs])
        mean, var = mean.view(groups.ghosts, channels), var.view(groups.ghosts, channels)
        group = virtual_batch_size if virtual_batch_size is not None else x.shape[0]
        count = torch.full_like(var, float(group * (xt[0].numel() // channels)))
        total = None
    else:
        sample_w = weights.to(param_dtype)
        mean, var, total = weighted.weighted_moments(xt, sample_w)
        _check_positive_total(total)
        if native.ill_conditioned(mean, var, x.dtype):
            mean, var = _exact_statistics(xt, sample_w)
        mean, var, count = mean.view(1, -1), var.view(1, -1), total.view(1, -1)
    stats = _summarize(mean, var, count)
    on_stats(stats)
    r = d = None
    if renorm is not None:
        r, d = _renorm_correction(stats.mean, stats.var, renorm[0], renorm[1], eps, renorm[2])
    scale, shift = _affine_terms(
        1, 0, channels, param_dtype, x.device, weight, bias, r, d, adjusted
    )
    # The kernel takes one value per channel; scalar adjustments broadcast to all of them.
    # contiguous(): PyTorch's CPU backward kernel reads a stride-0 (broadcast) weight as if it
    # were dense, i.e. out of bounds (torch 2.13).
    scale = None if scale is None else torch.broadcast_to(scale, (channels,)).contiguous()
    shift = None if shift is None else torch.broadcast_to(shift, (channels,)).contiguous()
    ys = []
    for index, part in enumerate(groups.parts):
        rows = slice(None) if groups.merged else slice(index, index + 1)
        times = groups.ghosts if groups.merged else 1
        ys.append(
            native.normalize_with_stats(
                part,
                _repeat(scale, times),
                _repeat(shift, times),
                mean[rows].reshape(-1),
                var[rows].reshape(-1),
                eps,
                sample_weights=sample_w,
                total=total,
            )
        )
    y = _ungroup(ys, groups, xt, layout)
    return (y.movedim(1, axis) if axis != 1 else y), stats


def _reference_normalize(
    x: Tensor,
    axis: int,
    eps: float,
    weights: Tensor | None,
    virtual_batch_size: int | None,
    layout: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training-mode normalization as a composite of PyTorch ops (the reference path).

    Returns:
        ``(x̂, mean, var, count)`` in the compute dtype; statistics shaped (G, C) with ghost
        batches, else (C,); ``count`` is elements (or total weight) per channel per ghost.
    """
    xf = x.to(compute_dtype(x.dtype))
    w = None if weights is None else align_weights(weights, x, axis).to(xf.dtype)
    ghost_dim: int | None = None
    if virtual_batch_size is not None:
        ghosts = x.shape[0] // virtual_batch_size
        xf = _to_ghosts(xf, ghosts, layout)
        if w is not None:
            w = _to_ghosts(w.expand(x.shape[0], *w.shape[1:]), ghosts, layout)
        ghost_dim, axis = 0, axis + 1
    dims = tuple(d for d in range(xf.ndim) if d not in (axis, ghost_dim))
    mean, var = moments(xf, dims, weights=w, keepdim=True)
    xhat = (xf - mean) * torch.rsqrt(var + eps)
    if w is None:
        count = torch.full_like(mean, float(math.prod([xf.shape[d] for d in dims])))
    else:
        count = _weight_total(w, xf.shape, dims).expand_as(mean)
    if ghost_dim is not None:
        xhat = _from_ghosts(xhat, layout)
    keep = [d for d in range(xf.ndim) if d in (axis, ghost_dim)]
    flat = [
        t.detach().squeeze([d for d in range(xf.ndim) if d not in keep]) for t in (mean, var, count)
    ]
    return xhat, flat[0], flat[1], flat[2]


def _summarize(mean: Tensor, var: Tensor, count: Tensor) -> BatchStats:
    """Average ghost-batch statistics (shape (G, C)) into per-channel BatchStats."""
    var_unbiased = _unbiased(var, count)
    if mean.ndim == 2 and mean.shape[0] == 1:
        return BatchStats(mean[0], var[0], var_unbiased[0], count[0])
    if mean.ndim == 2:
        return BatchStats(mean.mean(0), var.mean(0), var_unbiased.mean(0), count.mean(0))
    return BatchStats(mean, var, var_unbiased, count)


def _training_step(
    x: Tensor,
    axis: int,
    *,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float | None,
    eps: float,
    weights: Tensor | None,
    virtual_batch_size: int | None,
    ghost_layout: str,
    renorm_mean: Tensor | None,
    renorm_stddev: Tensor | None,
    renorm_clipping: dict[str, float] | None,
    adjustment: Adjustment | None,
    want_stats: bool,
    impl: Impl,
) -> tuple[Tensor, BatchStats | None]:
    """Dispatch one training step; see the module docstring for the paths."""
    cdt = compute_dtype(x.dtype)
    renorm = None
    if renorm_mean is not None and renorm_stddev is not None:
        renorm = (renorm_mean, renorm_stddev, renorm_clipping)
    adjusted = None if adjustment is None else adjustment(x.shape)
    updates = momentum is not None and running_mean is not None and running_var is not None

    def update_running(stats: BatchStats) -> None:
        if updates and momentum is not None and running_mean is not None:
            running.assign_moving_average_(running_mean, stats.mean, momentum)
            running.assign_moving_average_(running_var, stats.var_unbiased, momentum)  # type: ignore[arg-type]

    plain = renorm is None and adjusted is None and weights is None and virtual_batch_size is None
    if impl == "auto" and eps > 0 and plain and not want_stats:
        # PyTorch's own training call. With running buffers the kernel applies PyTorch's rule
        # inside its statistics pass, from the unrounded variance: bit-identical to
        # torch.nn.BatchNorm*d, with no extra pass.
        xt = x.movedim(axis, 1) if axis != 1 else x
        dt = compute_dtype(x.dtype)
        w = None if weight is None else weight.to(dt)
        b = None if bias is None else bias.to(dt)
        buffers = (running_mean, running_var) if updates else (None, None)
        # PyTorch's CPU training kernel rounds the batch mean to float16/bfloat16 for half
        # input (normalizing [-100.5, -100] in bfloat16 gives [-1.41, 0]); run it in float32.
        y = F.batch_norm(xt.to(dt), *buffers, w, b, True, momentum or 0.0, eps).to(x.dtype)
        return (y.movedim(1, axis) if axis != 1 else y), None
    # Sample weights, aligned once, channel axis first as the kernels take them.
    kernel_weights = None
    if weights is not None and virtual_batch_size is None:
        kernel_weights = align_weights(weights, x, axis).movedim(axis, 1)
    kernel_ok = (
        impl == "auto"
        and eps > 0  # PyTorch's training kernels reject eps <= 0
        and (adjusted is None or all(_is_per_channel(v, x.shape[axis]) for v in adjusted))
        and (
            weights is None
            or (
                kernel_weights is not None and weighted.supports(x.movedim(axis, 1), kernel_weights)
            )
        )
    )
    if kernel_ok:
        return _kernel_step(
            x,
            axis,
            eps,
            weight,
            bias,
            kernel_weights,
            virtual_batch_size,
            ghost_layout,
            renorm,
            adjusted,
            update_running,
        )
    y, mean, var, count = _reference_normalize(
        x, axis, eps, weights, virtual_batch_size, ghost_layout
    )
    stats = _summarize(mean, var, count)
    update_running(stats)
    r = d = None
    if renorm is not None:
        r, d = _renorm_correction(
            stats.mean.to(cdt), stats.var.to(cdt), renorm[0], renorm[1], eps, renorm[2]
        )
    scale, shift = _affine_terms(
        x.ndim, axis, x.shape[axis], cdt, x.device, weight, bias, r, d, adjusted
    )
    y = y.to(cdt)
    if scale is not None:
        y = y * scale
    if shift is not None:
        y = y + shift
    return y.to(x.dtype), stats


def _check_global_counts(
    moments: distributed.SyncedMoments, weighted: bool, allow_single_value: bool
) -> bool:
    """Checks on the statistics of all ranks; True when the global batch has values.

    Every rank sees the same merged counts, so every rank decides the same way.
    """
    if bool((moments.elements == 0).all()):
        return False
    if weighted and bool((moments.n <= 0).any()):
        raise ValueError(
            "the sample weights sum to zero (or less) over the batches of all processes, so "
            "the weighted mean is undefined. Fix: 1) check the masks are not all zeros for "
            "this step, 2) skip the step on every process, or 3) use weights > 0."
        )
    if not allow_single_value and bool((moments.elements <= 1).any()):
        raise ValueError(
            "Expected more than 1 value per channel when training, got 1 value per channel "
            "over the batches of all processes (sync=True). A variance needs at least two "
            "values. Fix: use larger batches, or call model.eval() to normalize with the "
            "running statistics."
        )
    return True


def _absorb_synced_stats(
    stats: BatchStats | None,
    cdt: torch.dtype,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float | None,
    renorm_mean: Tensor | None,
    renorm_stddev: Tensor | None,
    eps: float,
    renorm_clipping: dict[str, float] | None,
) -> tuple[Tensor | None, Tensor | None]:
    """What a synchronized step does with its global statistics before normalizing: PyTorch's
    rule on the running buffers (when the caller passed a momentum), then renorm's r and d
    (None without renorm or statistics)."""
    if stats is not None and momentum is not None and running_mean is not None:
        assert running_var is not None
        running.assign_moving_average_(running_mean, stats.mean, momentum)
        running.assign_moving_average_(running_var, stats.var_unbiased, momentum)
    if stats is None or renorm_mean is None or renorm_stddev is None:
        return None, None
    return _renorm_correction(
        stats.mean.to(cdt), stats.var.to(cdt), renorm_mean, renorm_stddev, eps, renorm_clipping
    )


def _sync_training_step(
    x: Tensor,
    axis: int,
    *,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float | None,
    eps: float,
    weights: Tensor | None,
    virtual_batch_size: int | None,
    ghost_layout: str,
    renorm_mean: Tensor | None,
    renorm_stddev: Tensor | None,
    renorm_clipping: dict[str, float] | None,
    adjustment: Adjustment | None,
    allow_single_value: bool,
    group: Any,
) -> tuple[Tensor, BatchStats | None]:
    """One training step with statistics over every rank's batch (the reference composite).

    Without ghost batches the moments come from ``distributed.sync_moments`` (one all_gather
    forward, one all_reduce backward) and the rest is local autograd. With ghost batches each
    rank normalizes its own ghosts; ``distributed.sync_ghost_statistics`` averages the
    statistics that feed the moving averages and renorm over all ghosts of all ranks.
    """
    cdt = compute_dtype(x.dtype)
    channels = x.shape[axis]
    stats: BatchStats | None = None
    if virtual_batch_size is None:
        xf = x.to(cdt)
        w = None if weights is None else align_weights(weights, x, axis).to(cdt)
        dims = tuple(d for d in range(x.ndim) if d != axis)
        synced = distributed.sync_moments(xf, dims, weights=w, group=group)
        has_values = True
        local = math.prod([x.shape[d] for d in dims])
        if not torch.compiler.is_compiling() and (local <= 1 or w is not None):
            # A host read, only where this rank alone cannot tell (its own batch has at
            # most one value per channel, or the weights may sum to zero everywhere).
            has_values = _check_global_counts(synced, w is not None, allow_single_value)
        xhat = (xf - synced.mean) * torch.rsqrt(synced.var + eps)
        if has_values:
            mean, var = synced.mean.detach().reshape(-1), synced.var.detach().reshape(-1)
            count = synced.n.reshape(-1)
            stats = BatchStats(mean, var, _unbiased(var, count), count)
    else:
        if x.shape[0] > 0:
            _check_ghosts(x.shape[0], virtual_batch_size, ghost_layout)
            if not allow_single_value:
                _check_values_per_channel(x, axis, virtual_batch_size)
            xhat, g_mean, g_var, g_count = _reference_normalize(
                x, axis, eps, weights, virtual_batch_size, ghost_layout
            )
        else:
            xhat = x.to(cdt)
            g_mean = g_var = g_count = torch.zeros(0, channels, dtype=cdt, device=x.device)
        averaged = distributed.sync_ghost_statistics(
            g_mean, g_var, _unbiased(g_var, g_count), g_count, group
        )
        if averaged is not None:
            stats = BatchStats(*averaged)
    r, d = _absorb_synced_stats(
        stats,
        cdt,
        running_mean,
        running_var,
        momentum,
        renorm_mean,
        renorm_stddev,
        eps,
        renorm_clipping,
    )
    adjusted = None if adjustment is None else adjustment(x.shape)
    scale, shift = _affine_terms(
        x.ndim, axis, channels, cdt, x.device, weight, bias, r, d, adjusted
    )
    y = xhat.to(cdt)
    if scale is not None:
        y = y * scale
    if shift is not None:
        y = y + shift
    return y.to(x.dtype), stats


@overload
def batch_norm(
    x: Tensor,
    running_mean: Tensor | None = ...,
    running_var: Tensor | None = ...,
    weight: Tensor | None = ...,
    bias: Tensor | None = ...,
    *,
    training: bool = ...,
    momentum: float | None = ...,
    eps: float = ...,
    axis: int = ...,
    weights: Tensor | None = ...,
    virtual_batch_size: int | None = ...,
    ghost_layout: GhostLayout = ...,
    renorm_mean: Tensor | None = ...,
    renorm_stddev: Tensor | None = ...,
    renorm_clipping: dict[str, float] | None = ...,
    adjustment: Adjustment | None = ...,
    activation: Activation = ...,
    return_stats: Literal[False] = ...,
    impl: Impl = ...,
    allow_single_value: bool = ...,
    sync: bool = ...,
    process_group: Any = ...,
) -> Tensor: ...


@overload
def batch_norm(
    x: Tensor,
    running_mean: Tensor | None = ...,
    running_var: Tensor | None = ...,
    weight: Tensor | None = ...,
    bias: Tensor | None = ...,
    *,
    training: bool = ...,
    momentum: float | None = ...,
    eps: float = ...,
    axis: int = ...,
    weights: Tensor | None = ...,
    virtual_batch_size: int | None = ...,
    ghost_layout: GhostLayout = ...,
    renorm_mean: Tensor | None = ...,
    renorm_stddev: Tensor | None = ...,
    renorm_clipping: dict[str, float] | None = ...,
    adjustment: Adjustment | None = ...,
    activation: Activation = ...,
    return_stats: Literal[True],
    impl: Impl = ...,
    allow_single_value: bool = ...,
    sync: bool = ...,
    process_group: Any = ...,
) -> tuple[Tensor, BatchStats | None]: ...


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    training: bool = False,
    momentum: float | None = None,
    eps: float = 1e-5,
    axis: int = 1,
    weights: Tensor | None = None,
    virtual_batch_size: int | None = None,
    ghost_layout: GhostLayout = "contiguous",
    renorm_mean: Tensor | None = None,
    renorm_stddev: Tensor | None = None,
    renorm_clipping: dict[str, float] | None = None,
    adjustment: Adjustment | None = None,
    activation: Activation = None,
    return_stats: bool = False,
    impl: Impl = "auto",
    allow_single_value: bool = False,
    sync: bool = False,
    process_group: Any = None,
) -> Tensor | tuple[Tensor, BatchStats | None]:
    """One batch-norm step, training or inference, with every bnkit option.

    Training (``training=True``), with batch statistics μ_B and biased σ²_B over every axis
    but the channel axis (per ghost batch, optionally weighted)::

        x̂ = (x - μ_B) / sqrt(σ²_B + eps)
        y = act(((x̂ · r + d) · a + b) · weight + bias)

    where r, d are batch renormalization's corrections (1 and 0 without renorm) and (a, b)
    come from ``adjustment`` (1 and 0 without). Inference uses the running statistics::

        y = act((x - running_mean) / sqrt(running_var + eps) · weight + bias)

    Args:
        x: input, rank >= 2, batch on axis 0, channels on ``axis``.
        running_mean, running_var: running statistics (C,). Required for inference. In
            training, when given together with ``momentum``, they are updated in place with
            PyTorch's rule ``new = (1 - momentum) old + momentum batch`` from the unbiased
            variance, as ``torch.nn.functional.batch_norm`` does; other rules are applied by
            ``bnkit.running.update_running_stats_`` on the returned statistics.
        weight, bias: per-channel scale γ and offset β, or None.
        training: use batch statistics (True) or running statistics (False).
        momentum: PyTorch-convention momentum for the in-place update (training only).
        eps: added to the variance.
        axis: the channel axis: 1 for (N, C, ...) data, -1 for channels-last (N, ..., C).
        weights: per-sample weights (N,) or a mask over the leading non-channel dims
            (see :func:`align_weights`); statistics become ``tf.nn.weighted_moments``.
        virtual_batch_size: samples per ghost batch (training only); must divide N.
        ghost_layout: "contiguous" (ghost j = samples j*v .. j*v+v-1) or "strided"
            (Keras: ghost j = samples j, j+G, j+2G, ...).
        renorm_mean, renorm_stddev: batch renormalization state (enables renorm).
        renorm_clipping: optional ``{"rmin", "rmax", "dmax"}`` bounds.
        adjustment: ``callable(shape) -> (scale, bias)`` applied to x̂ in training only;
            1-D tensors of length C are per channel, others broadcast against ``x``.
        activation: None, "relu", "leaky_relu", "elu", "silu", "gelu" or a callable.
        return_stats: also return the batch statistics (None in inference).
        impl: "auto" (fast paths where exact; the C++ kernels under the policy
            ``kernels="cpp"``), "cpp" (bnkit's C++ kernels where they serve the call, see
            ``bnkit.kernels.cpp``), "torch" ("auto" whatever the policy says) or "reference"
            (composite oracle).
        allow_single_value: accept one value per channel in training instead of raising;
            its variance is 0, so ``x̂`` is 0 (the layer policy ``single_value="skip-update"``).
        sync: in training, with an initialized process group of more than one rank,
            normalize with the statistics of the union of every rank's batch (count-weighted;
            see ``bnkit.distributed`` and ``docs/distributed.md``). Every rank must make the
            call, also with an empty batch. Ghost batches stay per rank; their averaged
            statistics (running update, renorm) are global. Runs the reference composite, or
            with ``impl="cpp"`` the C++ kernels where they serve it (not: renorm or sample
            weights with ghost batches, weights that differ between channels or need a
            gradient, an adjustment that is not per channel).
        process_group: the group to synchronize over (None: the default group).

    Returns:
        ``y`` of ``x``'s shape and dtype, or ``(y, stats)`` with ``return_stats=True``.

    Raises:
        ValueError: bad axis or rank, one value per channel in training, ghost batches
            that do not divide the batch, weights that do not fit, inference without
            running statistics.

    Shape:
        ``x``: (N, C, *) with ``axis=1`` or (N, *, C) with ``axis=-1``; output: same.

    >>> x = torch.tensor([[0.0, 10.0], [2.0, 30.0]])
    >>> batch_norm(x, training=True, eps=0.0)
    tensor([[-1., -1.],
            [ 1.,  1.]])
    """
    if impl == "auto" and get_policy("kernels") == "cpp":
        impl = "cpp"
    elif impl == "torch":
        impl = "auto"
    if impl == "cpp" and not _cpp_ready(x):
        impl = "auto"
    if (
        axis == 1
        and impl == "auto"
        and weights is None
        and virtual_batch_size is None
        and renorm_mean is None
        and adjustment is None
        and activation is None
        and not return_stats
        and eps > 0
        and x.ndim >= 2
        and x.numel() > 0
        and x.dtype in _FULL_PRECISION
        and (weight is None or weight.dtype == x.dtype)
        and (running_mean is None or running_mean.dtype == x.dtype)
        and (training or (running_mean is not None and running_var is not None))
        and not allow_single_value
        and not sync
    ):
        # Nothing of bnkit's applies: PyTorch's own call is the whole step (bit-identical to
        # torch.nn.BatchNorm*d), so skip the dispatch below; it costs microseconds per call.
        if training:
            _check_values_per_channel(x, 1, None)
            if momentum is None:
                running_mean = running_var = None
        out: Tensor = F.batch_norm(
            x, running_mean, running_var, weight, bias, training, momentum or 0.0, eps
        )
        return out
    a = canonical_axis(axis, x.ndim)
    act = resolve_activation(activation)
    if renorm_clipping is not None:
        unknown = set(renorm_clipping) - set(_RENORM_KEYS)
        if unknown:
            raise ValueError(
                f"renorm_clipping has unknown keys {sorted(unknown)}; allowed: {list(_RENORM_KEYS)}"
            )
    stats: BatchStats | None = None
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError(
                "inference (training=False) normalizes with running statistics, but "
                "running_mean/running_var were not given. Fix: pass them, or pass "
                "training=True to normalize with the batch's own statistics."
            )
        if impl == "cpp" and not _needs_grad(running_mean, running_var):
            y = _cpp_inference_step(x, a, running_mean, running_var, weight, bias, eps, activation)
            y = _kernel_layout(y, x, a)
            return (y, stats) if return_stats else y
        y = _inference_step(x, a, running_mean, running_var, weight, bias, eps)
    elif sync and distributed.is_active(process_group):
        # Before the empty-batch shortcut: an empty rank still takes part in the collectives.
        served = impl == "cpp" and _cpp_sync_serves(
            x, a, virtual_batch_size, ghost_layout, renorm_mean
        )
        sync_samples = None  # sample weights as the kernels take them
        if served and weights is not None:
            sync_samples = _cpp_sample_weights(weights, x, a)
            served = sync_samples is not None
        adjusted = None
        if adjustment is not None:
            # Drawn once per step, before the collectives, on every rank and either path: the
            # operations of a learnable adjustment then take the same place in every rank's
            # backward (after the statistics' all-reduce). Per channel, the kernel step folds
            # the values into γ and β after its statistics node, as the reference path orders
            # its affine terms; otherwise the reference path runs with these values.
            adjusted = adjustment(x.shape)
            adjustment = _constant_adjustment(adjusted)
            if served and not all(_is_per_channel(v, x.shape[a]) for v in adjusted):
                served = False
        if served and virtual_batch_size is None:
            y, stats = _cpp_sync_training_step(
                x,
                a,
                weight=weight,
                bias=bias,
                running_mean=running_mean,
                running_var=running_var,
                momentum=momentum,
                eps=eps,
                renorm_mean=renorm_mean,
                renorm_stddev=renorm_stddev,
                renorm_clipping=renorm_clipping,
                relu=activation == "relu",
                group=process_group,
                sample_weights=sync_samples,
                adjusted=adjusted,
            )
        elif served:
            assert virtual_batch_size is not None
            y, stats = _cpp_sync_ghost_step(
                x,
                a,
                weight=weight,
                bias=bias,
                running_mean=running_mean,
                running_var=running_var,
                momentum=momentum,
                eps=eps,
                ghosts=x.shape[0] // virtual_batch_size,
                strided=ghost_layout == "strided",
                relu=activation == "relu",
                group=process_group,
                sample_weights=sync_samples,
                adjusted=adjusted,
            )
        if served:
            y = _kernel_layout(y, x, a)
            if activation != "relu" and act is not None:
                y = act(y)
            return (y, stats) if return_stats else y
        y, stats = _sync_training_step(
            x,
            a,
            weight=weight,
            bias=bias,
            running_mean=running_mean,
            running_var=running_var,
            momentum=momentum,
            eps=eps,
            weights=weights,
            virtual_batch_size=virtual_batch_size,
            ghost_layout=ghost_layout,
            renorm_mean=renorm_mean,
            renorm_stddev=renorm_stddev,
            renorm_clipping=renorm_clipping,
            adjustment=adjustment,
            allow_single_value=allow_single_value,
            group=process_group,
        )
    elif x.numel() == 0:
        # An empty batch has no statistics: return an empty output and report no statistics,
        # so no moving average moves. Keep γ and β in the graph so their gradients are zeros,
        # as PyTorch gives (DDP expects every parameter to receive one), not None.
        y = x * 0.0
        for param in (weight, bias):
            if param is not None:
                y = y + 0.0 * param.sum()
    else:
        if virtual_batch_size is not None:
            _check_ghosts(x.shape[0], virtual_batch_size, ghost_layout)
        kernels_ok = not (allow_single_value and _one_value_per_channel(x, a, virtual_batch_size))
        if not allow_single_value:
            _check_values_per_channel(x, a, virtual_batch_size)
        cpp_weights = None
        if impl == "cpp" and weights is not None:
            cpp_weights = _cpp_sample_weights(weights, x, a)
        cpp_ok = weights is None or cpp_weights is not None
        cpp_weight, cpp_bias = weight, bias
        if impl == "cpp" and kernels_ok and cpp_ok and adjustment is not None:
            # Drawn once per step, whichever path runs (adjustments are often random).
            adjusted = adjustment(x.shape)
            folded = _fold_adjustment(adjusted, weight, bias, x.shape[a], compute_dtype(x.dtype))
            if folded is None:  # not per channel: the general path, with these values
                cpp_ok = False
                adjustment = _constant_adjustment(adjusted)
            else:
                cpp_weight, cpp_bias = folded
                adjustment = None
        if impl == "cpp" and kernels_ok and cpp_ok and adjustment is None:
            y, stats = _cpp_training_step(
                x,
                a,
                weight=cpp_weight,
                bias=cpp_bias,
                running_mean=running_mean,
                running_var=running_var,
                momentum=momentum,
                eps=eps,
                virtual_batch_size=virtual_batch_size,
                ghost_layout=ghost_layout,
                renorm_mean=renorm_mean,
                renorm_stddev=renorm_stddev,
                renorm_clipping=renorm_clipping,
                relu=activation == "relu",
                want_stats=return_stats,
                sample_weights=cpp_weights,
            )
            y = _kernel_layout(y, x, a)
            if activation != "relu" and act is not None:
                y = act(y)
            return (y, stats) if return_stats else y
        if impl == "cpp":
            impl = "auto"
        y, stats = _training_step(
            x,
            a,
            weight=weight,
            bias=bias,
            running_mean=running_mean,
            running_var=running_var,
            momentum=momentum,
            eps=eps,
            weights=weights,
            virtual_batch_size=virtual_batch_size,
            ghost_layout=ghost_layout,
            renorm_mean=renorm_mean,
            renorm_stddev=renorm_stddev,
            renorm_clipping=renorm_clipping,
            adjustment=adjustment,
            want_stats=return_stats,
            # PyTorch's kernels refuse one value per channel; the composite gives x̂ = 0.
            impl=impl if kernels_ok else "reference",
        )
    y = _match_layout(y, x)
    if act is not None:
        y = act(y)
    return (y, stats) if return_stats else y


def _cpp_ready(x: Tensor) -> bool:
    """Whether the C++ kernels can take ``x`` (building them on the first eager call)."""
    if x.device.type != "cpu" or x.dtype not in _CPP_DTYPES:
        return False
    if torch.compiler.is_compiling():
        return cpp.ready()  # built by an eager call or cpp.load() before compiling
    return cpp.available()


_CPP_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _cpp_training_step(
    x: Tensor,
    axis: int,
    *,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float | None,
    eps: float,
    virtual_batch_size: int | None,
    ghost_layout: str,
    renorm_mean: Tensor | None,
    renorm_stddev: Tensor | None,
    renorm_clipping: dict[str, float] | None,
    relu: bool,
    want_stats: bool,
    sample_weights: Tensor | None = None,
) -> tuple[Tensor, BatchStats | None]:
    """One training step on the C++ kernels: statistics, renorm and affine in one operator.

    The kernel reads ``x`` with the channel axis moved to dim 1 (a view: channels-last memory
    is read as rows of channels, without a copy) and writes ``y`` in the same layout.
    """
    xt = x.movedim(axis, 1) if axis != 1 else x
    cdt = compute_dtype(x.dtype)
    ghosts = 1 if virtual_batch_size is None else x.shape[0] // virtual_batch_size
    renorm = renorm_mean is not None and renorm_stddev is not None
    bounds = _renorm_bounds(renorm_clipping)
    # PyTorch's rule on the running buffers: inside the kernel in eager mode (as PyTorch's own
    # kernel does it; no small ops after a large kernel), by running.py under torch.compile
    # (the in-place mutation of an operator argument is kept out of traced graphs).
    updates = momentum is not None and running_mean is not None and running_var is not None
    in_kernel = (
        updates
        and not torch.compiler.is_compiling()
        and all(
            t is not None and t.dtype in _FULL_PRECISION and t.is_contiguous()
            for t in (running_mean, running_var)
        )
    )
    out = cpp.train(
        xt,
        weight if weight is None or weight.dtype == cdt else weight.to(cdt),
        bias if bias is None or bias.dtype == cdt else bias.to(cdt),
        eps,
        ghosts=ghosts,
        strided=ghost_layout == "strided",
        renorm_mean=renorm_mean if renorm else None,
        renorm_std=renorm_stddev if renorm else None,
        rmin=bounds[0],
        rmax=bounds[1],
        dmax=bounds[2],
        relu=relu,
        running_mean=running_mean if in_kernel else None,
        running_var=running_var if in_kernel else None,
        momentum=float(momentum) if in_kernel and momentum is not None else 0.0,
        sample_weight=sample_weights,
    )
    y = out.y
    y = y.movedim(1, axis) if axis != 1 else y
    if in_kernel and not want_stats:
        return y, None
    mean, var = out.mean.detach(), out.var.detach()
    if sample_weights is not None and ghosts > 1:
        # W per ghost batch: each ghost's own Bessel factor, as the reference computes it.
        total = _ghost_totals(sample_weights, xt, ghosts, ghost_layout == "strided").to(var.dtype)
        count = total.unsqueeze(1).expand_as(var)
        var_unbiased = _unbiased(var, count)
        stats = BatchStats(mean.mean(0), var.mean(0), var_unbiased.mean(0), count.mean(0))
    else:
        # n values per channel per ghost; Bessel's n/(n-1) is a Python number (n is the same
        # for every ghost and channel), which keeps the per-call work on small inputs down.
        n = float((xt.shape[0] // ghosts) * math.prod(xt.shape[2:]))
        if sample_weights is not None:  # W, the total weight per channel
            per_sample = sample_weights.numel() == xt.shape[0]
            scale = n / xt.shape[0] if per_sample else 1
            n = float(sample_weights.sum(dtype=torch.float64)) * scale
        var_unbiased = var * (n / max(n - 1.0, 1.0))
        if ghosts > 1:
            mean, var, var_unbiased = mean.mean(0), var.mean(0), var_unbiased.mean(0)
        stats = BatchStats(mean, var, var_unbiased, torch.full_like(var, n))
    if updates and not in_kernel and momentum is not None:
        assert running_mean is not None
        assert running_var is not None
        running.assign_moving_average_(running_mean, stats.mean, momentum)
        running.assign_moving_average_(running_var, stats.var_unbiased, momentum)
    return y, stats


def _ghost_totals(sample_weights: Tensor, xt: Tensor, ghosts: int, strided: bool) -> Tensor:
    """Each ghost batch's total weight per channel, (ghosts,) in float64, for the kernels'
    sample weights (per sample or per position) on ``xt`` (channels on dim 1)."""
    n = xt.shape[0]
    per_sample = sample_weights.reshape(n, -1).sum(1, dtype=torch.float64)
    if sample_weights.numel() == n:
        per_sample = per_sample * math.prod(xt.shape[2:])
    if strided:  # ghost g holds samples g, g + G, ...
        return per_sample.reshape(n // ghosts, ghosts).sum(0)
    return per_sample.reshape(ghosts, n // ghosts).sum(1)


def _fold_adjustment(
    adjusted: tuple[Tensor | float, Tensor | float],
    weight: Tensor | None,
    bias: Tensor | None,
    channels: int,
    number_dtype: torch.dtype,
) -> tuple[Tensor, Tensor] | None:
    """A per-channel adjustment folded into the affine the kernels apply, or None.

    ``((x̂·r + d)·a + b)·γ + β = (x̂·r + d)·(a·γ) + (b·γ + β)``: the kernels' γ' = a·γ and
    β' = b·γ + β, as tensor operations, so gradients still reach γ, β, a and b. None when a
    or b is not one value per channel (or one value for all). Python numbers become tensors
    of γ's (or β's) dtype, or of ``number_dtype`` (the compute dtype) without either.
    """
    scale, shift = adjusted
    if not (_is_per_channel(scale, channels) and _is_per_channel(shift, channels)):
        return None
    like = weight if weight is not None else bias
    device = like.device if like is not None else None

    def per_channel(v: Tensor | float) -> Tensor:
        # A Python number straight to the parameters' dtype, or the compute dtype without
        # parameters (through float32 it would lose digits on float64 input).
        dtype = (
            None if isinstance(v, Tensor) else (like.dtype if like is not None else number_dtype)
        )
        t = torch.as_tensor(v, dtype=dtype, device=device)
        if like is not None and t.dtype != like.dtype:
            t = t.to(like.dtype)
        return torch.broadcast_to(t.reshape(-1) if t.ndim else t, (channels,))

    new_weight, new_bias = per_channel(scale), per_channel(shift)
    if weight is not None:
        new_weight, new_bias = new_weight * weight, new_bias * weight
    if bias is not None:
        new_bias = new_bias + bias
    return new_weight.contiguous(), new_bias.contiguous()


def _constant_adjustment(adjusted: tuple[Tensor | float, Tensor | float]) -> Adjustment:
    """An adjustment that returns values already drawn for this step."""

    def adjustment(shape: torch.Size) -> tuple[Tensor | float, Tensor | float]:
        return adjusted

    return adjustment


def _renorm_bounds(clipping: dict[str, float] | None) -> list[float | None]:
    """``renorm_clipping`` as the kernels take it: ``[rmin, rmax, dmax]``, None = no bound."""
    if not clipping:  # the common case, on every renorm step of the layers' one-call path
        return [None, None, None]
    return [
        None if clipping.get(k) is None else float(clipping[k]) for k in ("rmin", "rmax", "dmax")
    ]


def _cpp_sample_weights(weights: Tensor, x: Tensor, axis: int) -> Tensor | None:
    """Sample weights as the C++ kernels take them, or None where they cannot.

    The kernels take weights that are the same for every channel and need no gradient: per
    sample (N values) or per position (N·spatial values, samples then positions in the order
    of ``x.movedim(axis, 1)``'s non-channel dims).
    """
    # Cheapest tests first: this runs on every weighted step of the layers' one-call path.
    if weights.requires_grad and torch.is_grad_enabled():
        return None
    cdt = x.dtype if x.dtype in _FULL_PRECISION else compute_dtype(x.dtype)
    if weights.dim() == 1 and weights.dtype is cdt and weights.shape[0] == x.shape[0]:
        return weights  # per sample, as the kernels take them: skip the small operations below
    aligned = align_weights(weights, x, axis).movedim(axis, 1)
    if aligned.shape[1] != 1:
        return None  # weights that differ between channels
    n = x.shape[0]
    if all(size == 1 for size in aligned.shape[1:]):
        return aligned.reshape(n).to(cdt)
    spatial = [x.shape[d] for d in range(x.ndim) if d not in (0, axis)]
    return aligned.expand(n, 1, *spatial).reshape(-1).to(cdt)


def _cpp_sync_serves(
    x: Tensor,
    axis: int,
    virtual_batch_size: int | None,
    ghost_layout: str,
    renorm_mean: Tensor | None,
) -> bool:
    """Whether a synchronized training step may run on the C++ kernels: in eager mode, with
    at least two values per channel (per ghost batch) on this rank; global statistics over
    the whole batch, or ghost batches without renorm (whose r and d would need every rank's
    ghosts before the normalizing pass). The caller has checked that the kernels take ``x``,
    then also needs sample weights in the kernels' form and an adjustment per channel (the
    steps fold it into γ and β).

    Every rank of a step decides the same way except on the batch size: a rank with an empty
    batch (or one value per channel) takes the reference path, whose collectives are the same
    (``distributed.merge_moments`` and ``distributed.all_reduce_moment_grads``; with ghost
    batches ``distributed.sync_ghost_statistics``).
    """
    if torch.compiler.is_compiling():
        return False
    if x.shape[axis] == 0:
        return False  # no channels: the reference path's empty output
    if virtual_batch_size is None:
        return x.numel() >= 2 * x.shape[axis]
    if renorm_mean is not None or x.shape[0] == 0:
        return False
    _check_ghosts(x.shape[0], virtual_batch_size, ghost_layout)  # its messages, as the reference
    per_ghost = x.numel() // x.shape[axis] // (x.shape[0] // virtual_batch_size)
    return per_ghost >= 2


def _cpp_sync_ghost_step(
    x: Tensor,
    axis: int,
    *,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float | None,
    eps: float,
    ghosts: int,
    strided: bool,
    relu: bool,
    group: Any,
    sample_weights: Tensor | None = None,
    adjusted: tuple[Tensor | float, Tensor | float] | None = None,
) -> tuple[Tensor, BatchStats | None]:
    """A synchronized training step with ghost batches on the C++ kernels, as
    :func:`_sync_training_step` computes it: each rank normalizes its own ghosts
    (``bnkit::bn_train``, forward and backward local; weighted with ``sample_weights``, the
    kernels' form), and only the statistics that feed the running averages are averaged over
    every ghost of every rank (``distributed.sync_ghost_statistics``, one gather; no backward
    collective), with each ghost's count, or total weight, as on the reference path. A
    per-channel adjustment's values ``adjusted`` are folded into γ and β (no backward
    collective here, so where the fold's nodes stand does not matter)."""
    xt = x.movedim(axis, 1) if axis != 1 else x
    cdt = compute_dtype(x.dtype)
    if adjusted is not None:
        folded = _fold_adjustment(adjusted, weight, bias, xt.shape[1], cdt)
        assert folded is not None
        weight, bias = folded
    out = cpp.train(
        xt, weight, bias, eps, ghosts=ghosts, strided=strided, relu=relu,
        sample_weight=sample_weights,
    )  # fmt: skip
    shape = (ghosts, xt.shape[1])
    g_mean, g_var = (
        out.mean.detach().to(cdt).reshape(shape),
        out.var.detach().to(cdt).reshape(shape),
    )
    values = xt.numel() // xt.shape[1] // ghosts  # per channel per ghost
    if sample_weights is None:
        g_count = torch.full_like(g_mean, float(values))
    else:
        # The samples' total weights summed per ghost (samples g, g+G, ... when strided).
        per_sample = _sample_totals(sample_weights, xt, cdt)
        by_ghost = (
            per_sample.reshape(-1, ghosts).sum(0)
            if strided
            else per_sample.reshape(ghosts, -1).sum(1)
        )
        g_count = by_ghost.reshape(ghosts, 1).expand(shape)
    averaged = distributed.sync_ghost_statistics(
        g_mean, g_var, _unbiased(g_var, g_count), g_count, group
    )
    stats = None if averaged is None else BatchStats(*averaged)
    _absorb_synced_stats(stats, cdt, running_mean, running_var, momentum, None, None, eps, None)
    y = out.y.movedim(1, axis) if axis != 1 else out.y
    return y, stats


def _cpp_sync_training_step(
    x: Tensor,
    axis: int,
    *,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float | None,
    eps: float,
    renorm_mean: Tensor | None,
    renorm_stddev: Tensor | None,
    renorm_clipping: dict[str, float] | None,
    relu: bool,
    group: Any,
    sample_weights: Tensor | None = None,
    adjusted: tuple[Tensor | float, Tensor | float] | None = None,
) -> tuple[Tensor, BatchStats]:
    """A synchronized training step on the C++ kernels, as :func:`_sync_training_step`
    computes it without ghost batches: local moments in one pass (float64; weighted with
    ``sample_weights``, in the kernels' form), one all_gather that merges them, the running
    update and renorm's r and d from the global statistics, then one normalizing pass (a
    per-channel adjustment's values ``adjusted`` folded into γ and β).

    The autograd graph has the reference path's shape: a statistics node
    (:class:`_CppSyncMoments`, the role of ``distributed.sync_moments``) whose backward
    all-reduces the statistics' gradients, and after it the normalizing node
    (:class:`_CppSyncNormalize`), whose backward gives γ's and β's gradients and this rank's
    statistics' gradients. So the backward's collective runs when, and in the order, the
    reference path's would (after γ's and β's gradients are accumulated, where DDP may start
    a bucket's all-reduce; not at all when x's gradient is not asked for).
    """
    xt = x.movedim(axis, 1) if axis != 1 else x
    cdt = compute_dtype(x.dtype)
    total, g_mean, g_var = _cpp_synced_moments(xt, sample_weights, group)
    # As the reference path rounds them (the same operations on the same merged values), so
    # that the running statistics stay bit-identical on every rank, whichever path it took.
    mean_c, var_c, count_c = g_mean.to(cdt), g_var.to(cdt), total.to(cdt)
    stats = BatchStats(mean_c, var_c, _unbiased(var_c, count_c), count_c)
    r, d = _absorb_synced_stats(
        stats,
        cdt,
        running_mean,
        running_var,
        momentum,
        renorm_mean,
        renorm_stddev,
        eps,
        renorm_clipping,
    )
    terms = _SyncTerms(g_mean, torch.rsqrt(g_var + eps), float(total[0]), eps, group)
    terms.samples = sample_weights
    handles = _CppSyncMoments.apply(xt, mean_c, var_c, terms)  # type: ignore[no-untyped-call]
    if adjusted is not None:
        # After the statistics node: the fold's nodes then run before it in the backward, so
        # γ's and β's gradients are accumulated before its all-reduce, as on the reference path.
        folded = _fold_adjustment(adjusted, weight, bias, xt.shape[1], cdt)
        assert folded is not None
        weight, bias = folded
    y: Tensor = _CppSyncNormalize.apply(  # type: ignore[no-untyped-call]
        xt, weight, bias, handles[0], handles[1], r, d, relu, terms
    )
    y = y.movedim(1, axis) if axis != 1 else y
    return y, stats


def _sample_totals(samples: Tensor, xt: Tensor, dtype: torch.dtype) -> Tensor:
    """Each sample's total weight per channel, (N,) in ``dtype``, from sample weights in the
    kernels' form (its positions' weights summed, or its one weight times its positions)."""
    positions_per_weight = xt.numel() // xt.shape[1] // samples.numel()
    return samples.detach().to(dtype).reshape(xt.shape[0], -1).sum(1) * positions_per_weight


def _cpp_synced_moments(
    xt: Tensor, samples: Tensor | None, group: Any
) -> tuple[Tensor, Tensor, Tensor]:
    """The global ``(W, μ, σ²)`` (float64, (C,)) of ``xt`` (channels on dim 1): this rank's
    moments from one kernel pass, merged over the ranks with the reference path's gather.

    Weighted (``samples``, the kernels' form), the gather carries the element count too and
    the global total weight is checked as on the reference path (every rank raises the same
    ``ValueError`` when it is not positive). A rank whose weights sum to zero contributes
    ``(0, 0, 0)``, as the reference path's does.
    """
    c = xt.shape[1]
    values = float(xt.numel() // c)  # per channel on this rank
    if samples is None:
        mean, var = cpp.bn_stats(xt.detach(), float64=True)
        count = torch.full_like(mean, values)
        total, g_mean, g_var, _ = distributed.merge_moments(count, mean, var * values, group)
        return total, g_mean, g_var
    weight_total = float(_sample_totals(samples, xt, torch.float64).sum())
    if weight_total > 0:
        mean, var = cpp.bn_stats(xt.detach(), float64=True, sample_weight=samples)
    else:
        mean = var = xt.new_zeros(c, dtype=torch.float64)
    count = xt.new_full((c,), weight_total, dtype=torch.float64)
    total, g_mean, g_var, elements = distributed.merge_moments(
        count, mean, var * weight_total, group, elements=torch.full_like(count, values)
    )
    moments = distributed.SyncedMoments(g_mean, g_var, total, elements)
    # Only the zero-weight check can fire: _cpp_sync_serves saw two values per channel here.
    _check_global_counts(moments, weighted=True, allow_single_value=True)
    return total, g_mean, g_var


_Upstream = tuple[Tensor | None, Tensor | None, Tensor | None]


class _SyncTerms:
    """What the two nodes of a synchronized kernel step share.

    The global statistics in float64 (the kernels' operands: mean, 1/sqrt(var + eps), the
    count W), γ·r in float64 (``gain``, set by the forward), and what the normalizing node's
    backward leaves for the statistics node's in the same backward pass: ``dy``, the fused
    ReLU's output and, under ``create_graph``, γ·r as a differentiable tensor. The statistics
    node takes them once (``take_upstream``), so that a second backward through its saved
    outputs (double backward) gets only the statistics' own gradient. A stack, not one slot:
    a hook that runs a backward through the same layer inside a pass arms and takes its own
    entry on top of the outer pass's.
    """

    def __init__(self, mean: Tensor, invstd: Tensor, count: float, eps: float, group: Any) -> None:
        self.mean, self.invstd, self.count, self.eps, self.group = mean, invstd, count, eps, group
        self.samples: Tensor | None = None  # sample weights, the kernels' form
        self.gain = torch.ones_like(invstd)  # γ·r
        self._upstream: list[_Upstream] = []

    def arm(self, dy: Tensor, output: Tensor | None, gain_graph: Tensor | None = None) -> None:
        """Leave this backward pass's upstream for the statistics node, until the pass ends.

        The statistics node runs later in the same pass when x's gradient is wanted; when it
        is not (``autograd.grad(loss, [weight])``), nothing may be left for a later pass (a
        stale ``dy``), nor kept alive (``dy`` and the ReLU's output reach back into the graph
        that holds these terms: a reference cycle the garbage collector cannot see through).
        So the entry is dropped by a callback when the pass (its graph task) ends.
        """
        entry: _Upstream = (dy, None if output is None else output.detach(), gain_graph)
        self._upstream.append(entry)

        def drop() -> None:
            for i, held in enumerate(self._upstream):
                if held is entry:
                    del self._upstream[i]
                    return

        torch.autograd.Variable._execution_engine.queue_callback(drop)

    def take_upstream(self) -> _Upstream:
        """The latest entry, removed; all None when there is none (a second backward through
        the statistics node's saved outputs)."""
        if not self._upstream:
            return None, None, None
        return self._upstream.pop()


class _CppSyncMoments(torch.autograd.Function):
    """The global (μ, σ²) of a synchronized kernel step as graph nodes: the reference's
    ``_SyncMoments`` with the moments already gathered and merged.

    Forward: returns them (the compute dtype, (C,)); no collective. Backward: sums this
    rank's ``(∂L/∂μ, ∂L/∂σ²)`` over the ranks with the reference's all-reduce, then gives x
    its whole gradient in one ``bnkit::bn_grad_apply`` pass,
    ``dx = γ·r·invstd·dy' + (∂L/∂μ + 2·∂L/∂σ²·(x − μ))/W``, with the ``dy`` that the
    normalizing node's backward has just left in the shared terms (that node returns no
    gradient for x). Under ``create_graph`` the same formula in differentiable operations.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, mean: Tensor, var: Tensor, terms: _SyncTerms
    ) -> tuple[Tensor, Tensor]:
        # New tensors, and the ones saved: saved outputs take part in double backward.
        out_mean, out_var = mean.detach().clone(), var.detach().clone()
        ctx.save_for_backward(x, out_mean, out_var)
        ctx.terms = terms
        return out_mean, out_var

    @staticmethod
    def backward(ctx: Any, grad_mean: Tensor, grad_var: Tensor) -> tuple[Tensor | None, ...]:
        x, mean, var = ctx.saved_tensors
        t: _SyncTerms = ctx.terms
        summed_mean, summed_var = distributed.all_reduce_moment_grads(grad_mean, grad_var, t.group)
        dy, output, gain_graph = t.take_upstream()
        if not torch.is_grad_enabled() and dy is not None:
            dx = cpp.bn_grad_apply(
                dy,
                x,
                t.mean,
                t.invstd,
                t.gain,
                summed_mean.double(),
                summed_var.double(),
                t.count,
                output=output,
                sample_weight=t.samples,
            )
            return dx, None, None, None
        # Under create_graph, or the statistics' own gradient in a second backward through
        # the saved outputs (no dy then): differentiable operations.
        xf = x.to(mean.dtype)
        centered = xf - _channel_view(mean, x.ndim, 1)
        dx = (
            _channel_view(summed_mean, x.ndim, 1)
            + 2.0 * _channel_view(summed_var, x.ndim, 1) * centered
        )
        dx = dx / t.count
        if t.samples is not None:  # each value moves the statistics by its weight
            per_position = t.samples.numel() != x.shape[0]
            shape = [x.shape[0], 1, *(x.shape[2:] if per_position else [1] * (x.ndim - 2))]
            dx = dx * t.samples.to(dx.dtype).reshape(shape)
        if dy is not None:
            k = torch.rsqrt(var + t.eps)
            if gain_graph is not None:
                k = k * gain_graph
            direct = dy.to(mean.dtype) * _channel_view(k, x.ndim, 1)
            if output is not None:
                direct = direct * (output > 0)
            dx = dx + direct
        return dx.to(x.dtype), None, None, None


class _CppSyncNormalize(torch.autograd.Function):
    """``y = act(γ·(x̂·r + d) + β)`` with global statistics, x̂ = (x − μ)·invstd, on the kernels.

    Forward: one ``bnkit::bn_normalize`` pass with the float64 statistics of the shared terms
    (μ and σ² come in as the :class:`_CppSyncMoments` outputs, graph handles; r and d are
    constants). Backward: this rank's ``Σdy'`` and ``Σdy'·(x − μ)`` (``bnkit::bn_grad_sums``,
    one pass) give γ's and β's gradients (this rank's own; DDP sums them over the ranks) and
    this rank's ``∂L/∂μ = −γ·r·invstd·Σdy'``, ``∂L/∂σ² = −½·γ·r·invstd³·Σdy'·(x − μ)``; x gets
    its gradient from the statistics node, which this backward arms with ``dy``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        var: Tensor,
        r: Tensor | None,
        d: Tensor | None,
        relu: bool,
        terms: _SyncTerms,
    ) -> Tensor:
        terms.gain = _sync_gain(weight, r, terms.invstd)
        shift = torch.zeros_like(terms.invstd) if bias is None else bias.double()
        if d is not None:
            shift = shift + (1.0 if weight is None else weight.double()) * d.double()
        y = cpp.bn_normalize(x, terms.mean, terms.gain * terms.invstd, shift, relu=relu)
        ctx.save_for_backward(x, weight, bias, mean, var, r, d, y if relu else None)
        ctx.terms = terms
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, mean, var, r, d, output = ctx.saved_tensors
        t: _SyncTerms = ctx.terms
        want_stats = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        if torch.is_grad_enabled():
            grads = _sync_normalize_grads_graph(ctx, dy, x, weight, mean, var, r, d, output)
            return grads + (None,) * 4
        sums = cpp.bn_grad_sums(dy, x, t.mean, output=output)
        grad_weight = grad_bias = grad_mean = grad_var = None
        if weight is not None and ctx.needs_input_grad[1]:
            # ∂y/∂γ = x̂·r + d
            term = sums[1] * t.invstd * (1.0 if r is None else r.double())
            if d is not None:
                term = term + sums[0] * d.double()
            grad_weight = term.to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = sums[0].to(bias.dtype)
        if want_stats:
            k = t.gain * t.invstd
            grad_mean = (-k * sums[0]).to(mean.dtype)
            grad_var = (-0.5 * k * t.invstd * t.invstd * sums[1]).to(var.dtype)
            t.arm(dy, output)
        return None, grad_weight, grad_bias, grad_mean, grad_var, None, None, None, None


def _sync_normalize_grads_graph(
    ctx: Any,
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    var: Tensor,
    r: Tensor | None,
    d: Tensor | None,
    output: Tensor | None,
) -> tuple[Tensor | None, ...]:
    """:class:`_CppSyncNormalize`'s backward under ``create_graph``, in differentiable
    operations: ``(None, dγ, dβ, ∂L/∂μ, ∂L/∂σ²)``, and the statistics node armed."""
    t: _SyncTerms = ctx.terms
    cdt = mean.dtype
    dims = [i for i in range(x.ndim) if i != 1]
    invstd = torch.rsqrt(var + t.eps)
    g = dy.to(cdt)
    if output is not None:
        g = g * (output > 0)
    s1 = g.sum(dims)
    s2 = (g * (x.to(cdt) - _channel_view(mean, x.ndim, 1))).sum(dims)
    r_c = None if r is None else r.to(cdt)
    gain = torch.ones_like(invstd) if weight is None else weight.to(cdt)
    if r_c is not None:
        gain = gain * r_c
    grad_weight = grad_bias = None
    if weight is not None and ctx.needs_input_grad[1]:
        term = s2 * invstd * (1.0 if r_c is None else r_c)
        if d is not None:
            term = term + s1 * d.to(cdt)
        grad_weight = term.to(weight.dtype)
    if ctx.needs_input_grad[2]:
        grad_bias = s1
    grad_mean = -gain * invstd * s1
    grad_var = -0.5 * gain * invstd**3 * s2
    t.arm(dy, output, gain)
    return None, grad_weight, grad_bias, grad_mean, grad_var


def _sync_gain(weight: Tensor | None, r: Tensor | None, invstd: Tensor) -> Tensor:
    """γ·r per channel in float64 (1 for an absent γ or r)."""
    gain = torch.ones_like(invstd) if weight is None else weight.detach().double()
    return gain if r is None else gain * r.double()


def _cpp_inference_step(
    x: Tensor,
    axis: int,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: Activation,
) -> Tensor:
    """Inference on the C++ kernel: one scale-and-shift pass (ReLU fused), differentiable in
    x, γ and β (the running statistics are constants)."""
    xt = x.movedim(axis, 1) if axis != 1 else x
    relu = activation == "relu"
    y = cpp.bn_eval(xt, running_mean, running_var, weight, bias, eps, relu=relu)
    y = y.movedim(1, axis) if axis != 1 else y
    act = None if relu else resolve_activation(activation)
    return y if act is None else act(y)


def _kernel_layout(y: Tensor, x: Tensor, axis: int) -> Tensor:
    """The kernels' output in ``x``'s layout. They write it in the layout of ``x`` with the
    channel axis moved to dim 1, which moved back is ``x``'s own when the channels are on dim
    1 or last; only another axis needs :func:`_match_layout` (a copy)."""
    return y if axis in (1, x.ndim - 1) else _match_layout(y, x)


def _match_layout(y: Tensor, x: Tensor) -> Tensor:
    """Give ``y`` the memory layout of ``x``: contiguous, or channels-last where torch has one.

    Moving the channel axis (``axis=-1``) or regrouping ghost batches for PyTorch's kernel can
    leave a strided result; callers get back the layout they passed in. No copy when the
    layout already matches.
    """
    if x.is_contiguous():
        return y.contiguous()
    for rank, fmt in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if x.ndim == rank and x.is_contiguous(memory_format=fmt):
            return y.contiguous(memory_format=fmt)
    return y


def _inference_step(
    x: Tensor,
    axis: int,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """One fused scale-and-shift pass with the running statistics (PyTorch's kernel)."""
    param_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xt = x.movedim(axis, 1) if axis != 1 else x
    y = F.batch_norm(
        xt,
        running_mean.to(param_dtype),
        running_var.to(param_dtype),
        None if weight is None else weight.to(param_dtype),
        None if bias is None else bias.to(param_dtype),
        False,
        0.0,
        eps,
    )
    return y.movedim(1, axis) if axis != 1 else y
