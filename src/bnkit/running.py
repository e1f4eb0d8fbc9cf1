"""Rules for moving statistics: momentum and decay, warm-up, zero-debias, cumulative averages.

This module is the single owner of every rule about how a moving statistic changes. Modules,
the EMA class and the tools call these functions; nothing else writes running buffers.

Conventions (see ``docs/conventions.md``):

* ``momentum`` is the weight of the *new* value (PyTorch): ``new = (1 - momentum) * old +
  momentum * value``.
* ``decay`` is the weight of the *old* value (TensorFlow/Keras/Flax): ``new = decay * old +
  (1 - decay) * value``. So ``momentum = 1 - decay``; PyTorch's 0.1 is TensorFlow's 0.9.

Every update is one fused ``lerp_`` in the buffer's dtype, as PyTorch and TensorFlow compute
it; only zero-debias's ``1 - decay**t`` is computed in float64 (float32 on devices without
float64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "COUNTER_BUFFERS",
    "FLOAT_STAT_BUFFERS",
    "NONNEGATIVE_STAT_BUFFERS",
    "BatchStats",
    "MovingAverageRule",
    "RunningState",
    "RunningVar",
    "ZeroDebias",
    "all_finite",
    "assign_moving_average_",
    "count_update_",
    "decay_to_momentum",
    "eager_kernel_rule",
    "is_finite",
    "kernel_momentum",
    "momentum_to_decay",
    "resolve_momentum",
    "restore_",
    "snapshot",
    "update_running_stats_",
    "warmup_decay",
    "zero_debias_update_",
]

RunningVar = Literal["unbiased", "biased"]

#: The buffer names of the floating-point running statistics a layer may hold (one value per
#: channel each); the one list that the checkpoint checks, the doctor and the cross-rank
#: averaging read.
FLOAT_STAT_BUFFERS = (
    "running_mean",
    "running_var",
    "running_mean_biased",
    "running_var_biased",
    "running_stddev",
    "renorm_mean",
    "renorm_stddev",
)
#: The integer counters among the statistic buffers (scalars).
COUNTER_BUFFERS = ("num_batches_tracked", "running_mean_local_step", "running_var_local_step")
#: The statistics that can never be negative.
NONNEGATIVE_STAT_BUFFERS = ("running_var", "running_var_biased", "running_stddev", "renorm_stddev")
ZeroDebias = Literal[False, "mean", "both"]


def momentum_to_decay(momentum: float) -> float:
    """Convert a PyTorch momentum (weight of the new value) to a TF decay (weight of the old).

    >>> momentum_to_decay(0.1)
    0.9
    """
    return 1.0 - momentum


def decay_to_momentum(decay: float) -> float:
    """Convert a TF decay (weight of the old value) to a PyTorch momentum.

    >>> round(decay_to_momentum(0.999), 6)
    0.001
    """
    return 1.0 - decay


def _check_unit_interval(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
    if not (0.0 <= float(value) <= 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def resolve_momentum(
    momentum: float | None,
    decay: float | None,
    *,
    default_momentum: float | None,
    names: tuple[str, str] = ("momentum", "decay"),
) -> float | None:
    """Return the PyTorch-convention momentum from exactly one of ``momentum`` or ``decay``.

    Args:
        momentum: weight of the new value (PyTorch), or None.
        decay: weight of the old value (TensorFlow), or None.
        default_momentum: the momentum when neither is given. ``None`` there means a
            cumulative average.
        names: the argument names used in error messages.

    Raises:
        ValueError: when both are given or a value is outside [0, 1].

    >>> resolve_momentum(None, 0.99, default_momentum=0.1)
    0.010000000000000009
    """
    m_name, d_name = names
    if momentum is not None and decay is not None:
        raise ValueError(
            f"pass either {m_name} (PyTorch convention, weight of the new batch) or "
            f"{d_name} (TensorFlow convention, weight of the old value), not both: "
            f"{m_name}={momentum!r}, {d_name}={decay!r}. They are related by "
            f"{m_name} = 1 - {d_name}; PyTorch's {m_name}=0.1 is TensorFlow's {d_name}=0.9."
        )
    if decay is not None:
        _check_unit_interval(d_name, decay)
        return 1.0 - float(decay)
    if momentum is not None:
        _check_unit_interval(m_name, momentum)
        return float(momentum)
    return default_momentum


def warmup_decay(decay: float | Tensor, num_updates: Tensor) -> Tensor:
    """TensorFlow's ``num_updates`` rule: ``min(decay, (1 + t) / (10 + t))``.

    Args:
        decay: the configured decay (weight of the old value).
        num_updates: t, the number of updates done before this one (a tensor, so the rule
            runs on the buffer's device without a host synchronization).

    Returns:
        The effective decay as a 0-d float tensor.

    >>> float(warmup_decay(0.999, torch.tensor(0)))
    0.1
    """
    t = num_updates.to(_accumulate_dtype(num_updates.device))
    return torch.clamp((1.0 + t) / (10.0 + t), max=float(decay))


def _accumulate_dtype(device: torch.device) -> torch.dtype:
    # float64 everywhere it exists; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _weight(momentum: float | Tensor, like: Tensor) -> float | Tensor:
    return momentum.to(like.dtype) if isinstance(momentum, Tensor) else momentum


def assign_moving_average_(average: Tensor, value: Tensor, momentum: float | Tensor) -> Tensor:
    """In place: ``average = momentum * value + (1 - momentum) * average``.

    Computed as one fused ``average += momentum * (value - average)`` (``torch.lerp_``) in the
    buffer's dtype, which is also TensorFlow's form ``v -= (v - value) * (1 - decay)``.
    ``value`` is detached; moving averages never carry gradients.

    Args:
        average: the buffer to update (any floating dtype).
        value: the new observation, broadcastable to ``average``.
        momentum: weight of the new value (float or 0-d tensor).

    Returns:
        ``average`` (updated).

    >>> a = torch.zeros(2); _ = assign_moving_average_(a, torch.ones(2), 0.25); a.tolist()
    [0.25, 0.25]
    """
    # Buffers never require grad and the value is detached, so no graph is recorded and no
    # no_grad() block is needed (it would cost more than the update on small layers).
    average.lerp_(value.detach().to(average.dtype), _weight(momentum, average))
    return average


def zero_debias_update_(
    average: Tensor, biased: Tensor, local_step: Tensor, value: Tensor, decay: float | Tensor
) -> Tensor:
    """TF ``assign_moving_average(..., zero_debias=True)``, in place.

    ``biased -= (biased - value) * (1 - decay)``; ``local_step += 1``;
    ``average = biased / (1 - decay ** local_step)``. The initial value of ``average`` is
    ignored: after one update it equals ``value`` exactly. As in TensorFlow, the debias
    factor uses the decay of the current step.

    Args:
        average: the debiased statistic (written).
        biased: the shadow accumulator, starting at zero.
        local_step: the shadow step counter, starting at zero.
        value: the new observation.
        decay: weight of the old value for this update.

    Returns:
        ``average`` (updated).

    >>> avg, b, s = torch.zeros(1), torch.zeros(1), torch.zeros((), dtype=torch.long)
    >>> [round(float(zero_debias_update_(avg, b, s, torch.tensor([v]), 0.9)), 4) for v in (2, 4, 6)]
    [2.0, 3.0526, 4.1402]
    """
    acc = _accumulate_dtype(average.device)
    with torch.no_grad():
        assign_moving_average_(biased, value, 1.0 - decay)
        local_step.add_(1)
        # The debias factor is computed in float64: decay**t underflows gracefully there.
        factor = 1.0 - torch.pow(torch.as_tensor(decay, dtype=acc), local_step.to(acc))
        torch.div(biased, factor.to(average.dtype), out=average)
    return average


@dataclass(frozen=True)
class MovingAverageRule:
    """How one family of moving statistics absorbs a new value.

    Attributes:
        momentum: PyTorch-convention momentum (weight of the new value); ``None`` means a
            cumulative average (equal weight for every update, PyTorch's ``momentum=None``).
        warmup: apply TF's ``num_updates`` rule ``decay_t = min(decay, (1+t)/(10+t))``.
        zero_debias: which statistics use TF's zero-debiased moving average.

    >>> MovingAverageRule(0.1).momentum_at(torch.tensor(5))
    0.1
    """

    momentum: float | None
    warmup: bool = False
    zero_debias: ZeroDebias = False

    def __post_init__(self) -> None:
        if self.momentum is None and (self.warmup or self.zero_debias):
            raise ValueError(
                "momentum=None (cumulative average) already weighs every batch equally; it "
                "cannot be combined with warmup or zero_debias, which reshape an exponential "
                "decay. Fix: pass a momentum/decay, or drop warmup/zero_debias."
            )
        if self.zero_debias and self.momentum == 0.0:
            raise ValueError(
                "zero_debias divides by 1 - decay**t, which is 0 for decay=1 (momentum=0): "
                "the statistic would never move. Fix: use a decay below 1, or drop zero_debias."
            )
        if self.zero_debias not in (False, "mean", "both"):
            raise ValueError(
                f"zero_debias must be False, 'mean' or 'both', got {self.zero_debias!r}"
            )

    @property
    def decay(self) -> float | None:
        """The TF-convention decay, ``1 - momentum`` (None for a cumulative average)."""
        return None if self.momentum is None else 1.0 - self.momentum

    def momentum_at(self, updates_done: Tensor) -> float | Tensor:
        """The momentum of the next update, given the number of updates done before it."""
        if self.momentum is None:
            # Cumulative moving average: the (t+1)-th value gets weight 1/(t+1).
            t = updates_done.to(_accumulate_dtype(updates_done.device))
            return 1.0 / (t + 1.0)
        if self.warmup:
            return 1.0 - warmup_decay(1.0 - self.momentum, updates_done)
        return self.momentum


class BatchStats(NamedTuple):
    """Per-channel statistics of one training batch, as fed to the moving averages.

    Attributes:
        mean: batch mean (averaged over ghost batches when there are several).
        var: biased batch variance (the one that normalizes), averaged over ghost batches.
        var_unbiased: Bessel-corrected variance (per ghost batch, then averaged).
        n: elements (or total weight) per channel per ghost batch.
    """

    mean: Tensor
    var: Tensor
    var_unbiased: Tensor
    n: Tensor


@dataclass
class RunningState:
    """References to a layer's moving-statistic buffers (updated in place).

    Only the buffers that the layer's options need are set; the rest stay ``None``.
    """

    mean: Tensor
    var: Tensor
    num_batches_tracked: Tensor | None = None
    mean_biased: Tensor | None = None
    mean_local_step: Tensor | None = None
    var_biased: Tensor | None = None
    var_local_step: Tensor | None = None
    stddev: Tensor | None = None
    renorm_mean: Tensor | None = None
    renorm_stddev: Tensor | None = None


def _update_one_(
    average: Tensor,
    value: Tensor,
    momentum: float | Tensor,
    shadow: tuple[Tensor, Tensor] | None,
) -> None:
    if shadow is None:
        assign_moving_average_(average, value, momentum)
    else:
        biased, local_step = shadow
        zero_debias_update_(average, biased, local_step, value, 1.0 - momentum)


def _pair(a: Tensor | None, b: Tensor | None) -> tuple[Tensor, Tensor] | None:
    return None if a is None or b is None else (a, b)


def update_running_stats_(
    state: RunningState,
    batch: BatchStats,
    rule: MovingAverageRule,
    *,
    running_var: RunningVar = "unbiased",
    eps: float = 1e-5,
    renorm_momentum: float | None = None,
) -> None:
    """Apply one training step's batch statistics to a layer's moving statistics.

    * ``running_mean`` absorbs the batch mean; ``running_var`` absorbs the biased or the
      Bessel-corrected batch variance, as ``running_var`` says.
    * With renorm (``state.stddev`` set), ``running_stddev`` absorbs ``sqrt(var + eps)`` and
      ``running_var := relu(running_stddev**2 - eps)`` (Keras); ``renorm_mean`` and
      ``renorm_stddev`` absorb the batch mean and ``sqrt(biased_var + eps)`` with
      ``renorm_momentum`` (never warmed up: they steer training, not inference).
    * ``num_batches_tracked`` counts updates; warm-up and cumulative averages read it first.

    Args:
        state: the layer's buffers.
        batch: this step's statistics.
        rule: momentum, warm-up and zero-debias settings.
        running_var: which batch variance feeds the running estimate.
        eps: the layer's epsilon (renorm keeps it inside the moving stddev).
        renorm_momentum: momentum of the renorm statistics (required with renorm).
    """
    var_in = batch.var_unbiased if running_var == "unbiased" else batch.var
    updates_done = (
        state.num_batches_tracked
        if state.num_batches_tracked is not None
        else torch.zeros((), dtype=torch.long, device=state.mean.device)
    )
    momentum = rule.momentum_at(updates_done)

    debias_mean = _pair(state.mean_biased, state.mean_local_step)
    _update_one_(state.mean, batch.mean, momentum, debias_mean)
    debias_var = _pair(state.var_biased, state.var_local_step)
    if state.stddev is not None:
        _update_one_(state.stddev, torch.sqrt(var_in + eps), momentum, debias_var)
        with torch.no_grad():
            torch.clamp(state.stddev * state.stddev - eps, min=0.0, out=state.var)
    else:
        _update_one_(state.var, var_in, momentum, debias_var)

    if state.renorm_mean is not None and state.renorm_stddev is not None:
        if renorm_momentum is None:
            raise ValueError("renorm statistics need renorm_momentum")
        assign_moving_average_(state.renorm_mean, batch.mean, renorm_momentum)
        assign_moving_average_(state.renorm_stddev, torch.sqrt(batch.var + eps), renorm_momentum)

    count_update_(state)


def kernel_momentum(
    state: RunningState, rule: MovingAverageRule, running_var: RunningVar
) -> float | None:
    """The momentum to hand to PyTorch's native kernel, when this layer's rule is exactly PyTorch's.

    PyTorch's kernel updates ``running_mean``/``running_var`` inside its statistics pass, from the
    unrounded double-precision variance. Letting it do so for layers whose rule is PyTorch's
    (fixed momentum or cumulative average, unbiased variance, no warm-up, zero-debias or renorm)
    makes bnkit's defaults bit-identical to ``torch.nn.BatchNorm*d`` and saves a pass. The
    caller must then call :func:`count_update_` instead of :func:`update_running_stats_`.

    Returns:
        The momentum for this step, or None when the rule needs :func:`update_running_stats_`.
    """
    # PyTorch's kernel knows one of the rules the C++ kernel knows: the unbiased feed, no renorm.
    if running_var != "unbiased" or state.stddev is not None or state.renorm_mean is not None:
        return None
    kernel = kernel_rule(state, rule, running_var)
    return None if kernel is None else kernel.momentum


class KernelRule(NamedTuple):
    """A running-statistics rule that ``bnkit::bn_train`` applies inside the kernel.

    Attributes:
        momentum: weight of this batch in ``running_mean`` and ``running_var`` (or in
            ``running_stddev`` with renorm).
        biased: feed the biased batch variance (``running_var="biased"``) instead of Bessel's.
        renorm_momentum: with renorm, the weight of this batch in ``renorm_mean`` and
            ``renorm_stddev``: the kernel then applies Keras' rule of
            :func:`update_running_stats_`; None without renorm.
    """

    momentum: float
    biased: bool
    renorm_momentum: float | None


def kernel_rule(
    state: RunningState,
    rule: MovingAverageRule,
    running_var: RunningVar,
    renorm_momentum: float | None = None,
) -> KernelRule | None:
    """The rule for the C++ training kernel to apply in place, when it can apply this layer's.

    The kernel (``bnkit.kernels.cpp.train``) knows two of this module's rules: PyTorch's
    (``assign_moving_average_`` of the mean and of the biased or Bessel-corrected variance) and,
    with renorm, Keras' moving standard deviation with its renorm statistics -- exactly what
    :func:`update_running_stats_` does for a fixed momentum or a cumulative average without
    warm-up or zero-debias, in float64 rounded once into each buffer (this module's float32
    arithmetic can differ in the last bit). Anything else returns None and the caller runs
    :func:`update_running_stats_` itself. This function decides; :func:`update_running_stats_`
    is the reference the kernel is tested against.

    Returns:
        The kernel's rule for this step, or None.

    >>> state = RunningState(torch.zeros(2), torch.ones(2), torch.zeros((), dtype=torch.long))
    >>> kernel_rule(state, MovingAverageRule(0.1), "biased")
    KernelRule(momentum=0.1, biased=True, renorm_momentum=None)
    """
    if torch.compiler.is_compiling():
        # Not under torch.compile: a kernel saves the buffers it updates for its backward, and
        # the non-finite guard's tensor-only restore writes them again in the same graph
        # ("modified by an inplace operation" in backward); the cumulative average would also
        # read the counter on the host. update_running_stats_ does neither.
        return None
    return eager_kernel_rule(state, rule, running_var, renorm_momentum)


def eager_kernel_rule(
    state: RunningState,
    rule: MovingAverageRule,
    running_var: RunningVar,
    renorm_momentum: float | None = None,
) -> KernelRule | None:
    """:func:`kernel_rule` for a caller that has already checked it is not compiling (the
    module's one-call path, where each check costs time on every step).

    >>> state = RunningState(torch.zeros(2), torch.ones(2), torch.zeros((), dtype=torch.long))
    >>> eager_kernel_rule(state, MovingAverageRule(None), "unbiased")  # cumulative: 1/(t+1)
    KernelRule(momentum=1.0, biased=False, renorm_momentum=None)
    """
    if rule.warmup or rule.zero_debias:
        return None
    renorm = state.renorm_mean is not None or state.stddev is not None
    if renorm and (
        state.renorm_mean is None
        or state.renorm_stddev is None
        or state.stddev is None
        or renorm_momentum is None
    ):
        return None
    momentum = rule.momentum
    if momentum is None:  # cumulative average, as PyTorch computes it (a host read)
        if state.num_batches_tracked is None:
            return None
        momentum = 1.0 / float(state.num_batches_tracked + 1)
    return KernelRule(momentum, running_var == "biased", renorm_momentum if renorm else None)


def count_update_(state: RunningState) -> None:
    """Record one update of the running statistics (``num_batches_tracked += 1``)."""
    if state.num_batches_tracked is not None:
        # An integer buffer never requires grad, so no no_grad() block is needed (it costs
        # as much as the add on small layers).
        state.num_batches_tracked.add_(1)


# ------------------------------------------------------- non-finite protection

_STATE_FIELDS = (
    "mean",
    "var",
    "num_batches_tracked",
    "mean_biased",
    "mean_local_step",
    "var_biased",
    "var_local_step",
    "stddev",
    "renorm_mean",
    "renorm_stddev",
)


# The floating-point statistics that options add (beside mean and var).
_OPTIONAL_FLOAT_FIELDS = ("mean_biased", "var_biased", "stddev", "renorm_mean", "renorm_stddev")


def snapshot(state: RunningState) -> dict[str, Tensor]:
    """Copies of every buffer in ``state``, taken before an update (see :func:`restore_`)."""
    saved = {}
    for name in _STATE_FIELDS:
        value = getattr(state, name)
        if value is not None:
            saved[name] = value.clone()
    return saved


def all_finite(state: RunningState) -> Tensor:
    """A 0-d bool tensor: every floating-point statistic in ``state`` is finite.

    A batch with a NaN or an infinity turns the statistics it feeds non-finite, and with a
    moving average they stay so for good; checking after the update catches it on every path
    (also inside PyTorch's kernel, which updates the buffers itself).

    >>> s = RunningState(mean=torch.zeros(2), var=torch.tensor([1.0, float("nan")]))
    >>> bool(all_finite(s))
    False
    """
    ok = torch.isfinite(state.mean).all() & torch.isfinite(state.var).all()
    for name in _OPTIONAL_FLOAT_FIELDS:
        value = getattr(state, name)
        if value is not None:
            ok = ok & torch.isfinite(value).all()
    return ok


def is_finite(state: RunningState) -> bool:
    """:func:`all_finite` as a Python bool, at a third of its cost (it runs every training call).

    Each statistic is summed in float64 and the total tested: a NaN or an infinity anywhere
    makes it non-finite, and float32 statistics cannot overflow a float64 sum (only float64
    statistics near 1e308, already unusable, could).

    >>> s = RunningState(mean=torch.zeros(2), var=torch.tensor([1.0, float("inf")]))
    >>> is_finite(s)
    False
    """
    total = 0.0
    for name in ("mean", "var", *_OPTIONAL_FLOAT_FIELDS):
        value = getattr(state, name)
        if value is not None:
            total += value.sum(dtype=torch.float64).item()
    return math.isfinite(total)


def restore_(state: RunningState, saved: dict[str, Tensor], keep: Tensor | None = None) -> None:
    """Put back the buffers saved by :func:`snapshot`: the update did not happen.

    With ``keep`` (a 0-d bool tensor) each buffer keeps its new value where ``keep`` is True
    and gets the saved one otherwise, without reading ``keep`` in Python, so compiled graphs
    need no data-dependent branch.
    """
    with torch.no_grad():
        for name, old in saved.items():
            buf = getattr(state, name)
            buf.copy_(old if keep is None else torch.where(keep, buf, old))
