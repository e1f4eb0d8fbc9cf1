r"""Batch statistics across processes on ``torch.distributed``.

``bnkit.BatchNorm(..., sync=True, process_group=None)`` normalizes each training batch with
the statistics of the union of every rank's batch. This module holds the pieces:

* :func:`sync_moments`: the differentiable global moments. Each rank computes its local
  per-channel ``(W_r, μ_r, M2_r)`` (count or total weight, mean, centred sum of squares) with
  the corrected two-pass algorithm in the compute dtype (float32 for float32 and half input),
  the mean assembled in float64; one ``all_gather`` moves the ``(3, C)`` stacks in float64
  (float32 on MPS, which has no float64); every rank merges them in rank order with Chan's
  parallel formula in its k-way form. Why float64: a rank mean rounded to float32 is off by
  up to half an ulp (4.9e-4 near 1e4), and ``W_r (μ_r − μ)²`` carries that into the
  variance; the price is 3·C·8 bytes per rank, nothing next to the activations::

      W  = Σ_r W_r
      μ  = Σ_r W_r μ_r / W
      M2 = Σ_r M2_r + Σ_r W_r (μ_r − μ)²        var = M2 / W   (biased)

  The deviations ``μ_r − μ`` are formed directly, so data with mean 1e4 and standard
  deviation 1 keeps its variance (the all-reduced form ``Σ(M2_r + W_r μ_r²) − W μ²`` would
  lose ``log10(μ²/σ²)`` digits). Every rank merges the same gathered bytes with the same ops,
  so every rank gets the same bits, and the running statistics stay identical everywhere.
  The backward all-reduces (SUM) the upstream ``(∂L/∂μ, ∂L/∂σ²)`` stacked as ``(2, C)`` and
  returns ``∂L/∂x_i = (g_μ w_i + g_σ² · 2 w_i (x_i − μ)) / W``.
* :func:`sync_ghost_statistics`: with ghost batches each rank normalizes its own ghosts;
  only the statistics that feed the moving averages (and renorm's r and d) are averaged over
  every ghost of every rank, with one ``all_gather`` and no backward collective.
* :func:`sync_running_stats`: for layers that were *not* synchronized (plain DDP), average
  the running statistics over the ranks before evaluating or saving.

Collectives run only in training, with an initialized process group of more than one rank
(:func:`is_active`); anything else is local and runs no collective. See
``docs/distributed.md`` for the collective contract (what every rank must call).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnkit import running

__all__ = [
    "GroupHandle",
    "SyncedMoments",
    "all_reduce_moment_grads",
    "is_active",
    "merge_moments",
    "sync_ghost_statistics",
    "sync_moments",
    "sync_running_stats",
    "world_size",
]

ProcessGroup = Any  # torch.distributed.ProcessGroup; Any keeps torch builds without it typed


# ------------------------------------------------------------------------- groups


def world_size(group: ProcessGroup | None = None) -> int:
    """Processes in ``group`` (the default group for None); 1 without ``torch.distributed``.

    >>> world_size()  # no process group initialized here
    1
    """
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return max(int(dist.get_world_size(group)), 1)


def is_active(group: ProcessGroup | None = None) -> bool:
    """True when statistics must be synchronized: an initialized group of more than one rank.

    A rank that is not a member of ``group`` (``dist.get_world_size`` gives -1) counts as
    a group of one: it computes locally and runs no collective.

    >>> is_active()
    False
    """
    return world_size(group) > 1


class GroupHandle:
    """Holds a layer's process group.

    A process group is a communicator of this process, not data: copying a model
    (``copy.deepcopy``, ``bnkit.fold``) shares it, and pickling a model that names one
    explicitly is refused with the fix (save the ``state_dict``; pass the group again when
    building the model in the new process). ``None`` (the default group) pickles fine.
    """

    __slots__ = ("group",)

    def __init__(self, group: ProcessGroup | None) -> None:
        self.group = group

    def __deepcopy__(self, memo: dict[int, Any]) -> GroupHandle:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        if self.group is not None:
            raise TypeError(
                "a batch-norm layer with an explicit process_group cannot be pickled: a "
                "process group belongs to the process that created it. Fix: save "
                "model.state_dict() (or use bnkit.save), and pass the group again when "
                "building the model in the new process"
            )
        return (GroupHandle, (None,))


def _merge_dtype(device: torch.device) -> torch.dtype:
    # float64 wherever it exists (MPS has none): the merge must not lose what the local
    # corrected two-pass statistics kept.
    return torch.float32 if device.type == "mps" else torch.float64


def _gather(t: Tensor, group: ProcessGroup | None) -> Tensor:
    """``all_gather`` of ``t`` over ``group``: a tensor of shape ``(world, *t.shape)``."""
    world = world_size(group)
    t = t.contiguous()
    if torch.compiler.is_compiling():
        # Functional collectives trace into the graph; the in-place c10d calls would not.
        from torch.distributed import _functional_collectives as fc

        gathered: Tensor = fc.wait_tensor(  # type: ignore[no-untyped-call]
            fc.all_gather_single(t, 0, cast(Any, group or dist.group.WORLD))
        )
        return gathered.view(world, *t.shape)
    back = t.device
    if t.device.type != "cpu" and dist.get_backend(group) == "gloo":
        t = t.cpu()  # gloo gathers host tensors
    out = t.new_empty((world * t.shape[0], *t.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t, group=group)
    return out.view(world, *t.shape).to(back)


def _all_reduce_sum(t: Tensor, group: ProcessGroup | None) -> Tensor:
    """Sum of ``t`` over ``group`` (a new tensor; ``t`` is left alone)."""
    if torch.compiler.is_compiling():
        from torch.distributed import _functional_collectives as fc

        out: Tensor = fc.wait_tensor(  # type: ignore[no-untyped-call]
            fc.all_reduce(t.contiguous(), "sum", cast(Any, group or dist.group.WORLD))
        )
        return out
    back = t.device
    buf = t.detach().clone(memory_format=torch.contiguous_format)
    if buf.device.type != "cpu" and dist.get_backend(group) == "gloo":
        buf = buf.cpu()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf.to(back)


# ---------------------------------------------------------------- local moments


def _local_moments(
    x: Tensor, dims: tuple[int, ...], w: Tensor | None, out: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel ``(W, μ, M2)`` of ``x`` over ``dims`` (keepdim), returned in ``out``.

    The corrected two-pass algorithm of :func:`bnkit.functional.moments` in ``x``'s dtype,
    with the mean assembled in ``out`` as ``shift + s1/W``: rounded to float32, a mean near
    1e4 would be off by up to 4.9e-4, and the merge's ``W_r (μ_r − μ)²`` would carry that
    error into the variance. An empty batch, or weights that sum to zero on this rank, give
    ``(0, 0, 0)``: the rank contributes nothing but still takes part in the collective.
    """
    shape = [1 if d in dims else s for d, s in enumerate(x.shape)]
    if w is None:
        n = math.prod([x.shape[d] for d in dims])
        if n == 0:
            zero = x.new_zeros(shape, dtype=out)
            return zero, zero, zero
        total = x.new_full(shape, float(n))
        safe = total
        shift = x.mean(dim=dims, keepdim=True)
        centered = x - shift
        s1 = centered.sum(dim=dims, keepdim=True)
        s2 = (centered * centered).sum(dim=dims, keepdim=True)
    else:
        summed = [d for d in dims if w.shape[d] != 1]
        repeat = math.prod([x.shape[d] for d in dims if w.shape[d] == 1])
        total = ((w.sum(dim=summed, keepdim=True) if summed else w) * repeat).expand(shape)
        positive = total > 0
        total = torch.where(positive, total, torch.zeros_like(total))
        safe = torch.where(positive, total, torch.ones_like(total))
        shift = torch.where(positive, (w * x).sum(dim=dims, keepdim=True) / safe, 0.0)
        centered = x - shift
        s1 = torch.where(positive, (w * centered).sum(dim=dims, keepdim=True), 0.0)
        s2 = torch.where(positive, (w * centered * centered).sum(dim=dims, keepdim=True), 0.0)
    mean = shift.to(out) + (s1 / safe).to(out)
    m2 = torch.clamp(s2 - s1 * s1 / safe, min=0.0)
    return total.to(out), mean, m2.to(out)


def _merge(gathered: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chan's parallel formula over the ranks of ``gathered`` (world, 3, C): ``(W, μ, M2)``."""
    counts, means, m2s = gathered[:, 0], gathered[:, 1], gathered[:, 2]
    total = counts.sum(0)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    mean = (counts * means).sum(0) / safe
    delta = means - mean
    m2 = m2s.sum(0) + (counts * delta * delta).sum(0)
    return total, mean, m2


def _gather_and_merge(
    rows: list[Tensor], group: ProcessGroup | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All-gather this rank's ``(W, μ, M2[, elements])`` rows (float64, C values each) and merge
    them: ``(gathered (world, rows, C), W, μ, biased σ²)``, each of the last three (C,)."""
    gathered = _gather(torch.stack([r.reshape(-1) for r in rows]), group)
    total, mean, m2 = _merge(gathered)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return gathered, total, mean, m2 / safe


def merge_moments(
    count: Tensor,
    mean: Tensor,
    m2: Tensor,
    group: ProcessGroup | None = None,
    *,
    elements: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The global count, mean and biased variance per channel from this rank's moments.

    For a caller that computed its local moments itself (the synchronized layers on bnkit's
    C++ kernels). The collective is :func:`sync_moments`' forward gather, byte for byte (a
    ``(3, C)`` stack in float64, ``(4, C)`` with sample weights, merged with Chan's formula in
    rank order on every rank), so a rank on one path and a rank on the other meet in it.
    Without an active group (see :func:`is_active`) no collective runs: the local moments
    come back.

    Args:
        count: ``W_r``, values per channel on this rank, or their total weight; (C,) float64.
        mean: ``μ_r``, (C,) float64.
        m2: ``M2_r``, the (weighted) centred sum of squares ``Σ w·(x − μ_r)²``, (C,) float64.
        group: the process group (None: the default group).
        elements: with sample weights, the values per channel on this rank (to tell an empty
            batch from weights that sum to zero), (C,) float64; None without.

    Returns:
        ``(W, μ, σ², elements)``, each (C,) float64, the same bits on every rank; σ² = M2 / W,
        0 where ``W`` is 0; ``elements`` summed over the ranks (``W`` without weights).

    Example:
        >>> count, mean, m2 = torch.tensor([4.0]), torch.tensor([2.0]), torch.tensor([8.0])
        >>> merge_moments(count, mean, m2)  # one process: its own moments
        (tensor([4.]), tensor([2.]), tensor([2.]), tensor([4.]))
    """
    if not is_active(group):
        safe = torch.where(count > 0, count, torch.ones_like(count))
        var = torch.where(count > 0, m2 / safe, torch.zeros_like(m2))
        return count, mean, var, count if elements is None else elements
    rows = [count, mean, m2] if elements is None else [count, mean, m2, elements]
    gathered, total, g_mean, g_var = _gather_and_merge(rows, group)
    return total, g_mean, g_var, total if elements is None else gathered[:, 3].sum(0)


def all_reduce_moment_grads(
    grad_mean: Tensor, grad_var: Tensor, group: ProcessGroup | None = None
) -> tuple[Tensor, Tensor]:
    """``(∂L/∂μ, ∂L/∂σ²)`` summed over the ranks: :func:`sync_moments`' backward all-reduce.

    Every path that synchronizes the moments' gradients goes through here, so the collective
    matches between them. Without an active group (see :func:`is_active`) no collective
    runs and the arguments come back.

    Args:
        grad_mean: this rank's ``∂L/∂μ`` through its own batch, in the dtype the statistics
            were normalized in (float32 for float32 and half input).
        grad_var: this rank's ``∂L/∂σ²``, same shape and dtype.
        group: the process group (None: the default group).

    Returns:
        The two sums over the ranks (new tensors; differentiable under ``create_graph``,
        where their backward all-reduces once more), stacked into one
        ``all_reduce`` on the way.

    Example:
        >>> all_reduce_moment_grads(torch.tensor([1.0]), torch.tensor([-2.0]))
        (tensor([1.]), tensor([-2.]))
    """
    if not is_active(group):
        return grad_mean.detach().clone(), grad_var.detach().clone()
    stacked = torch.stack([grad_mean, grad_var])
    if torch.is_grad_enabled() and stacked.requires_grad:
        # Under create_graph (a gradient penalty): the sum's own gradient is the sum of the
        # ranks' gradients, so a second backward through it all-reduces once more.
        summed = _AllReduceSum.apply(stacked, group)  # type: ignore[no-untyped-call]
    else:
        summed = _all_reduce_sum(stacked, group)
    return summed[0], summed[1]


class _AllReduceSum(torch.autograd.Function):
    """A differentiable all-reduce (sum): its backward all-reduces the incoming gradient."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, group: ProcessGroup | None) -> Tensor:
        ctx.group = group
        return _all_reduce_sum(t, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _all_reduce_sum(grad, ctx.group), None


# ------------------------------------------------------------------ sync_moments


class SyncedMoments(NamedTuple):
    """Per-channel moments of the union of every rank's batch.

    Attributes:
        mean: the global mean μ (differentiable).
        var: the global biased variance ``M2 / W`` (differentiable).
        n: W, values per channel over all ranks, or their total weight (no gradient).
        elements: values per channel over all ranks, whatever the weights (no gradient).
    """

    mean: Tensor
    var: Tensor
    n: Tensor
    elements: Tensor


class _SyncMoments(torch.autograd.Function):
    """Global moments; forward: one all_gather, backward: one all_reduce."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        w: Tensor | None,
        dims: tuple[int, ...],
        group: ProcessGroup | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        merge = _merge_dtype(x.device)
        count, mean, m2 = _local_moments(x, dims, w, merge)
        rows = [count, mean, m2]
        if w is not None:  # the element count, to tell an empty batch from zero weights
            elements = math.prod([x.shape[d] for d in dims])
            rows.append(torch.full_like(count, float(elements)))
        gathered, total, g_mean, var = _gather_and_merge(rows, group)
        elements_all = total if w is None else gathered[:, 3].sum(0)
        safe = torch.where(total > 0, total, torch.ones_like(total))
        shape = count.shape
        out_mean = g_mean.to(x.dtype).reshape(shape)
        out_var = var.to(x.dtype).reshape(shape)
        out_count = total.to(x.dtype).reshape(shape)
        out_elements = elements_all.to(x.dtype).reshape(shape)
        ctx.save_for_backward(x, w, out_mean, out_var, safe.to(x.dtype).reshape(shape))
        ctx.group = group
        ctx.mark_non_differentiable(out_count, out_elements)
        return out_mean, out_var, out_count, out_elements

    @staticmethod
    def backward(
        ctx: Any, g_mean: Tensor, g_var: Tensor, _g_count: Tensor, _g_elements: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, w, mean, var, total = ctx.saved_tensors
        gm, gv = all_reduce_moment_grads(g_mean, g_var, ctx.group)
        centered = x - mean
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            scaled = (gm + 2.0 * gv * centered) / total
            grad_x = scaled if w is None else scaled * w
        if w is not None and ctx.needs_input_grad[1]:
            full = (gm * centered + gv * (centered * centered - var)) / total
            grad_w = full.sum_to_size(w.shape)
        return grad_x, grad_w, None, None


def sync_moments(
    x: Tensor,
    dims: int | Sequence[int],
    *,
    weights: Tensor | None = None,
    group: ProcessGroup | None = None,
) -> SyncedMoments:
    r"""Mean and biased variance over ``dims`` of the union of every rank's ``x``.

    Count-weighted (uneven batch sizes are exact), optionally weighted by frequency weights
    (``tf.nn.weighted_moments`` semantics over all ranks), differentiable::

        W = Σ_r Σ_i w_i      μ = Σ_r Σ_i w_i x_i / W      σ² = Σ_r Σ_i w_i (x_i − μ)² / W

    A rank with an empty ``x`` (or weights that sum to zero there) contributes nothing but
    takes part in both collectives. Without an active process group (not initialized, or one
    process) these are the local moments and no collective runs.

    Numerics: local statistics in ``x``'s dtype (float32 for float32 and half input, since
    the caller passes the compute dtype) with the corrected two-pass algorithm; the gathered
    ``(3, C)`` stacks (4 rows with weights: the element count too) are float64 (float32 on
    MPS), merged with Chan's k-way formula in rank order, identically on every rank; results
    are cast back to ``x``'s dtype. Cost per call: ``3·C·world·8`` bytes gathered in the
    forward, ``2·C·itemsize`` bytes all-reduced in the backward.

    Args:
        x: the local batch, any floating dtype; the caller casts half input up first.
        dims: the dimensions to reduce (all but the channel axis).
        weights: non-negative weights broadcastable to ``x`` (standard broadcasting); they
            get gradients too when they require them.
        group: the process group (None: the default group).

    Returns:
        :class:`SyncedMoments` ``(mean, var, n, elements)``, each with ``x``'s shape
        reduced over ``dims`` (kept with size 1); zeros where ``n`` is 0.

    Shape:
        ``x``: any rank; every rank must pass the same shape except along ``dims``.

    Example:
        >>> x = torch.tensor([[1.0, 10.0], [3.0, 30.0]])
        >>> m = sync_moments(x, 0)  # one process: the local moments
        >>> m.mean, m.var, m.n
        (tensor([[ 2., 20.]]), tensor([[  1., 100.]]), tensor([[2., 2.]]))
    """
    nd = x.ndim
    dims_t = tuple(
        sorted({d + nd if d < 0 else d for d in ((dims,) if isinstance(dims, int) else dims)})
    )
    w = None
    if weights is not None:
        w = weights.to(x.dtype)
        w = w.reshape((1,) * (nd - w.ndim) + tuple(w.shape))
    if not is_active(group):
        count, mean, m2 = _local_moments(x, dims_t, w, x.dtype)
        safe = torch.where(count > 0, count, torch.ones_like(count))
        elements = float(math.prod([x.shape[d] for d in dims_t]))
        return SyncedMoments(mean, m2 / safe, count.detach(), torch.full_like(count, elements))
    mean, var, n, elements = _SyncMoments.apply(  # type: ignore[no-untyped-call]
        x, w, dims_t, group
    )
    return SyncedMoments(mean, var, n, elements)


# -------------------------------------------------------------------- ghost batches


def sync_ghost_statistics(
    mean: Tensor,
    var: Tensor,
    var_unbiased: Tensor,
    count: Tensor,
    group: ProcessGroup | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """Average per-ghost statistics over every ghost batch of every rank.

    Ghost batches stay per rank: each rank normalizes its own ghosts with their own
    statistics (no gradient crosses processes). What feeds the moving averages, and renorm's
    r and d, is the average over all ``G = Σ_r G_r`` ghosts, as one process running the
    concatenated batch with contiguous ghosts computes it. One ``all_gather`` of ``(5, C)``
    float64 numbers (the four sums and ``G_r``); detached.

    Args:
        mean, var, var_unbiased, count: this rank's per-ghost statistics, shape (G_r, C)
            (G_r may be 0).
        group: the process group.

    Returns:
        ``(mean, var, var_unbiased, count)`` averaged over all ghosts, shape (C,), in
        ``mean``'s dtype; None when no rank had a ghost batch.
    """
    merge = _merge_dtype(mean.device)
    channels = mean.shape[-1]
    ghosts = torch.full((channels,), float(mean.shape[0]), dtype=merge, device=mean.device)
    sums = [t.detach().to(merge).sum(0) for t in (mean, var, var_unbiased, count)]
    gathered = _gather(torch.stack([*sums, ghosts]), group).sum(0)
    total = gathered[4]
    # Only a rank without ghosts of its own can be in a step where no rank has any: read
    # the total on the host only then (a device sync on GPUs).
    if mean.shape[0] == 0 and not torch.compiler.is_compiling() and not bool((total > 0).all()):
        return None
    averaged = gathered[:4] / torch.clamp(total, min=1.0)
    out = averaged.to(mean.dtype)
    return out[0], out[1], out[2], out[3]


# --------------------------------------------------------------- running statistics

# Floating-point statistics averaged over ranks; running_var is recomputed for renorm.
_FLOAT_STATS = running.FLOAT_STAT_BUFFERS
_COUNTERS = running.COUNTER_BUFFERS


def _norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from torch.nn.modules.batchnorm import _BatchNorm

    from bnkit.modules import BatchNorm

    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not isinstance(module, (BatchNorm, _BatchNorm)):
            continue
        if module._buffers.get("running_mean") is None or getattr(module, "frozen", False):
            continue
        found.append((name, module))
    return found


def _collective_device(group: ProcessGroup | None, preferred: torch.device) -> torch.device:
    if dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    if preferred.type != "cpu":
        return preferred
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return preferred


def sync_running_stats(model: nn.Module, process_group: ProcessGroup | None = None) -> list[str]:
    r"""Make the running statistics of every batch-norm layer identical on all ranks.

    For layers that were not synchronized in training (plain ``DistributedDataParallel``):
    each rank's running statistics describe its own batches, so evaluating or saving on
    different ranks gives different models. Call this on every rank before evaluating or
    saving; afterwards every rank holds the average::

        s = Σ_r a_r s_r / Σ_r a_r        for each statistic s (running_mean, running_var, ...)

    with ``a_r = num_batches_tracked`` on rank r for cumulative-average layers
    (``momentum=None``: rank r's statistic is the mean of that many batch statistics, so this
    is the mean over all ranks' batches), and ``a_r = 1`` (equal weights) for moving averages,
    whose horizon is the same on every rank; timm's ``distribute_bn`` averages the same way.
    A rank whose weight is 0 does not count (if all are 0, equal weights).

    The statistics averaged are ``running_mean``, ``running_var`` and, where an option adds
    them, the zero-debias shadows, renorm's ``running_stddev``, ``renorm_mean`` and
    ``renorm_stddev``; renorm layers then set ``running_var = relu(running_stddev² − eps)``
    again. Integer counters (``num_batches_tracked``, zero-debias local steps) become their
    maximum over the ranks (equal in a normal DDP run). Frozen layers and layers without
    running statistics are left alone. Covers :class:`bnkit.BatchNorm` (and presets) and
    every ``torch.nn`` batch norm. One ``all_gather`` of float64 numbers for the whole model.

    Synchronized layers (``sync=True``) already end each step identical on every rank; this
    changes nothing for them (up to float64 rounding of identical values, which is exact).

    Args:
        model: any module; its batch-norm layers are found with ``named_modules()``.
        process_group: average over this group (None: the default group).

    Returns:
        The names of the layers whose statistics are now in sync. Without an active process
        group (not initialized, or one process) nothing is communicated or changed.

    Example:
        >>> import torch, bnkit
        >>> from bnkit.distributed import sync_running_stats
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), bnkit.BatchNorm1d(3))
        >>> sync_running_stats(model)  # one process: nothing to average
        ['1']
    """
    layers = _norm_layers(model)
    if not layers or not is_active(process_group):
        return [name for name, _ in layers]
    first = layers[0][1]._buffers["running_mean"]
    assert first is not None
    device = _collective_device(process_group, first.device)
    pieces = []
    for _, layer in layers:
        for name in (*_FLOAT_STATS, *_COUNTERS):
            buf = layer._buffers.get(name)
            if buf is not None:
                pieces.append(buf.detach().reshape(-1).to(device=device, dtype=torch.float64))
    local = torch.cat(pieces)
    gathered = _gather(local, process_group)  # (world, L)
    offset = 0
    with torch.no_grad():
        for _, layer in layers:
            cumulative = getattr(layer, "momentum", 0.1) is None
            tracked = layer._buffers.get("num_batches_tracked")
            weights = torch.ones(gathered.shape[0], dtype=torch.float64, device=device)
            if cumulative and tracked is not None:
                # num_batches_tracked follows this layer's floating-point statistics
                floats = [layer._buffers.get(n) for n in _FLOAT_STATS]
                position = offset + sum(b.numel() for b in floats if b is not None)
                counts = gathered[:, position]
                if bool((counts > 0).any()):
                    weights = counts
            for name in (*_FLOAT_STATS, *_COUNTERS):
                buf = layer._buffers.get(name)
                if buf is None:
                    continue
                values = gathered[:, offset : offset + buf.numel()]
                offset += buf.numel()
                if name in _COUNTERS:
                    merged = values.max(0).values
                else:
                    merged = (weights[:, None] * values).sum(0) / weights.sum()
                buf.copy_(merged.reshape(buf.shape).to(buf.dtype))
            stddev = layer._buffers.get("running_stddev")
            running_var = layer._buffers.get("running_var")
            if stddev is not None and running_var is not None:
                eps = float(getattr(layer, "eps", 0.0))
                torch.clamp(stddev * stddev - eps, min=0.0, out=running_var)
    return [name for name, _ in layers]
