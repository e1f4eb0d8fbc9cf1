r"""Recalibrate batch-norm statistics: exact population statistics over data (precise BN).

A moving average is a noisy, lagging estimate of the statistics a layer sees: it remembers
old weights (after SWA/EMA weight averaging, pruning or fine-tuning it is simply stale), and a
decay that is too high for the number of steps leaves it near its initial value.
:func:`recalibrate` replaces ``running_mean``/``running_var`` of every batch-norm layer with the
statistics of the layer's input over a set of batches, pooled exactly, and touches nothing else.

Numerics (each decision is the one a test checks):

* Per call, the moments of the layer's input over every dimension but the channel axis come
  from :func:`bnkit.functional.moments` (float32 for float32/half input, float64 for float64;
  weighted, frequency-weight semantics, when the call has ``weights=``/``mask=``). They are
  pooled in float64 with Chan's parallel formula on ``(n, mean, M2)`` per channel, so any
  split of the same data into batches gives the same statistics (to ~1e-6 relative in
  float32); the order of the batches does not matter either.
* Across processes (``torch.distributed`` with more than one rank) every rank's
  ``(n, mean, M2)`` is gathered (one ``all_gather`` of a float64 vector for all layers) and
  merged with the same formula in rank order, identically on every rank. Gathering costs
  ``world × 4C`` numbers per layer, nothing next to a forward pass, and avoids the
  cancellation of the all-reduced form ``Σ(M2 + n·mean²) − N·mean²`` (which loses
  ``log10(mean²/var)`` digits); the result equals one process on all the data up to
  float64 rounding.
"""

from __future__ import annotations

import itertools
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from bnkit import functional as bnf
from bnkit.modules import BatchNorm
from bnkit.policies import BatchNormWarning, calibrating, get_policy
from bnkit.presets import KerasBatchNorm
from bnkit.running import RunningVar

__all__ = ["CalibrationReport", "LayerCalibration", "recalibrate"]

Status = Literal["calibrated", "skipped", "not reached"]

# Statistics that steer training only (renorm's r and d): a separate, short-memory estimator
# that recalibration leaves alone, like optimizer state.
_TRAINING_ONLY = frozenset({"renorm_mean", "renorm_stddev"})
_MODE_CODES: dict[RunningVar | None, float] = {None: 0.0, "unbiased": 1.0, "biased": 2.0}


# ------------------------------------------------------------------------------ report


@dataclass(frozen=True)
class LayerCalibration:
    """What :func:`recalibrate` did to one layer.

    Attributes:
        name: the layer's name in ``model.named_modules()`` (``""`` for the model itself).
        kind: the layer's class name.
        status: ``"calibrated"``, ``"skipped"`` (see ``reason``) or ``"not reached"`` (the
            forward never called it with data; its statistics were left unchanged).
        reason: why a layer was skipped or not reached; empty when calibrated.
        batches: batches of ``data`` in which the layer was called (over all processes;
            non-finite ones left out included).
        samples: values per channel pooled (the total weight with sample weights; the
            smallest over channels if weights differ between channels).
        running_var: the variance convention written, ``"unbiased"`` or ``"biased"``.
        ghost_factor: for ghost-batch layers with ``"biased"`` variance, the factor
            ``mean((n_g - 1) / n_g)`` applied to the variance (see :func:`recalibrate`).
        mean_shift: ``max_c |μ_new - μ_old| / sqrt(σ²_old + eps)``: how far the mean moved,
            in old standard deviations.
        var_ratio_min, var_ratio_max: the smallest and largest ``σ²_new / σ²_old``.
        nonfinite_batches: batches whose statistics were not finite and were left out
            (policy ``nonfinite="skip"``).
    """

    name: str
    kind: str
    status: Status
    reason: str = ""
    batches: int = 0
    samples: float = 0.0
    running_var: RunningVar | None = None
    ghost_factor: float | None = None
    mean_shift: float = math.nan
    var_ratio_min: float = math.nan
    var_ratio_max: float = math.nan
    nonfinite_batches: int = 0


@dataclass(frozen=True)
class CalibrationReport:
    """The result of :func:`recalibrate`: one :class:`LayerCalibration` per batch-norm layer.

    Attributes:
        layers: ``{name: LayerCalibration}`` in model order.
        num_batches: batches drawn from ``data`` (summed over processes).
        world_size: processes that pooled their statistics (1 without torch.distributed).

    ``str(report)`` is a table; ``report.calibrated`` / ``skipped`` / ``not_reached`` list names.
    """

    layers: dict[str, LayerCalibration]
    num_batches: int
    world_size: int = 1

    def _names(self, status: Status) -> list[str]:
        return [name for name, layer in self.layers.items() if layer.status == status]

    @property
    def calibrated(self) -> list[str]:
        """Names of the layers whose statistics were replaced."""
        return self._names("calibrated")

    @property
    def skipped(self) -> list[str]:
        """Names of the layers with nothing to calibrate (see each one's ``reason``)."""
        return self._names("skipped")

    @property
    def not_reached(self) -> list[str]:
        """Names of the layers the forward never reached (statistics left unchanged)."""
        return self._names("not reached")

    def __str__(self) -> str:
        header = ("layer", "type", "batches", "samples", "var", "mean shift", "var ratio", "note")
        rows = [header]
        for name, layer in self.layers.items():
            if layer.status == "calibrated":
                ratio = f"{layer.var_ratio_min:.4g} .. {layer.var_ratio_max:.4g}"
                note = "" if layer.ghost_factor is None else f"ghost x{layer.ghost_factor:.4g}"
                if layer.nonfinite_batches:
                    note = f"{note} {layer.nonfinite_batches} non-finite batch(es) left out"
                cells = (
                    str(layer.batches),
                    f"{layer.samples:g}",
                    str(layer.running_var),
                    f"{layer.mean_shift:.4g}",
                    ratio,
                    note.strip(),
                )
            else:
                cells = ("-", "-", "-", "-", "-", f"{layer.status}: {layer.reason}")
            rows.append((name or "(model)", layer.kind, *cells))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
            + "  "
            + row[-1]
            for row in rows
        ]
        where = f" on {self.world_size} processes" if self.world_size > 1 else ""
        title = (
            f"recalibrated {len(self.calibrated)} of {len(self.layers)} batch-norm layer(s) "
            f"from {self.num_batches} batch(es){where}"
        )
        return "\n".join([title, *(line.rstrip() for line in lines)])


# ------------------------------------------------------------------------ estimator


class _PooledMoments:
    """Per-channel ``(n, mean, M2)`` of everything a layer saw, pooled in float64 (Chan)."""

    def __init__(self, channels: int, device: torch.device) -> None:
        f64: dict[str, Any] = {"dtype": torch.float64, "device": device}
        self.count = torch.zeros(channels, **f64)
        self.mean = torch.zeros(channels, **f64)
        self.m2 = torch.zeros(channels, **f64)
        self.ghost_sum = torch.zeros(channels, **f64)  # Σ over ghosts of (n_g - 1)/n_g
        self.ghosts = torch.zeros((), **f64)
        self.nonfinite = torch.zeros((), **f64)
        self.batches = 0
        self.refused = 0  # calls on which training would not move the statistics
        self.last_batch = -1
        self.mode: RunningVar | None = None

    def update(self, count: Tensor, mean: Tensor, m2: Tensor) -> None:
        """Merge another set's statistics: Chan et al.'s parallel formula.

        ``n = n_a + n_b``, ``δ = μ_b − μ_a``, ``μ = μ_a + δ·n_b/n``,
        ``M2 = M2_a + M2_b + δ²·n_a·n_b/n``. An empty set (``n_b = 0``) changes nothing.
        """
        total = self.count + count
        safe = torch.where(total > 0, total, torch.ones_like(total))
        delta = mean - self.mean
        self.mean = self.mean + torch.where(total > 0, delta * count / safe, 0.0)
        self.m2 = (
            self.m2 + m2 + torch.where(total > 0, delta * delta * self.count * count / safe, 0.0)
        )
        self.count = total

    def pack(self) -> Tensor:
        """Everything needed to merge ranks, as one float64 vector of length 4C + 5."""
        scalars = torch.tensor(
            [float(self.batches), float(self.refused), _MODE_CODES[self.mode]],
            dtype=torch.float64,
        ).to(self.count.device)
        parts = [self.count, self.mean, self.m2, self.ghost_sum]
        return torch.cat([*parts, self.ghosts[None], self.nonfinite[None], scalars])

    def merge_packed(self, packed: Tensor) -> None:
        c = self.count.numel()
        parts = packed[: 4 * c].to(self.count.device).reshape(4, c)
        count, mean, m2, ghost_sum = parts[0], parts[1], parts[2], parts[3]
        ghosts, nonfinite, batches, refused, mode = packed[4 * c :].tolist()
        self.update(count, mean, m2)
        self.ghost_sum = self.ghost_sum + ghost_sum
        self.ghosts = self.ghosts + ghosts
        self.nonfinite = self.nonfinite + nonfinite
        self.batches += int(batches)
        self.refused += int(refused)
        if self.mode is None and mode:
            self.mode = "unbiased" if mode == 1.0 else "biased"


@dataclass
class _Cursor:
    batch: int = 0


class _Recorder:
    """The forward pre-hook of one layer: pools the moments of each input the layer gets."""

    def __init__(self, layer: nn.Module, axis: int, stats: _PooledMoments, cursor: _Cursor) -> None:
        self.layer = layer
        self.axis = axis
        self.stats = stats
        self.cursor = cursor

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if kwargs.get("training") is False:
            return  # an explicit inference call: training would not absorb it either
        x = args[0] if args else kwargs.get("input", kwargs.get("x"))
        if not isinstance(x, Tensor) or x.numel() == 0:
            return
        w = kwargs.get("weights")
        if w is None:
            w = kwargs.get("mask")
        if isinstance(w, Tensor) and not w.is_floating_point():
            w = w.to(bnf.compute_dtype(x.dtype))
        weights = w if isinstance(w, Tensor) else None
        if isinstance(self.layer, BatchNorm) and not self.layer._updates_running_stats(x, weights):
            self.stats.refused += 1  # e.g. slim's core-layer path with trainable=False
            return
        self.absorb(x, weights)

    def absorb(self, x: Tensor, weights: Tensor | None) -> None:
        stats = self.stats
        axis = bnf.canonical_axis(self.axis, x.ndim)
        dims = [d for d in range(x.ndim) if d != axis]
        channels = x.shape[axis]
        device = stats.count.device
        aligned = None if weights is None else bnf.align_weights(weights, x, axis)
        mean, var = bnf.moments(x, dims, weights=aligned)
        if aligned is None:
            count = torch.full(
                (channels,), x.numel() / channels, dtype=torch.float64, device=device
            )
        else:
            count = _weight_total(aligned, x, dims).to(device)
        mean = mean.to(device=device, dtype=torch.float64)
        m2 = var.to(device=device, dtype=torch.float64) * count
        finite = torch.isfinite(mean).all() & torch.isfinite(m2).all()
        policy = get_policy("nonfinite", getattr(self.layer, "policy", None))
        if policy == "raise" and not bool(finite):
            raise ValueError(
                f"the input of {type(self.layer).__name__} has non-finite statistics in batch "
                f"{self.cursor.batch} of the calibration data (policy nonfinite='raise'). Fix: "
                "1) clean the data, 2) use nonfinite='skip' to leave such batches out"
            )
        if policy == "skip":
            count = torch.where(finite, count, 0.0)
            mean = torch.where(finite, mean, 0.0)
            m2 = torch.where(finite, m2, 0.0)
            stats.nonfinite = stats.nonfinite + (~finite).to(torch.float64)
        if stats.mode is None:
            stats.mode = (
                self.layer._running_var_for(x, weights)
                if isinstance(self.layer, BatchNorm)
                else "unbiased"
            )
        virtual = getattr(self.layer, "virtual_batch_size", None)
        if isinstance(self.layer, BatchNorm) and virtual is not None:
            self._absorb_ghosts(x, aligned, axis, virtual, finite if policy == "skip" else None)
        stats.update(count, mean, m2)
        if stats.last_batch != self.cursor.batch:
            stats.last_batch = self.cursor.batch
            stats.batches += 1

    def _absorb_ghosts(
        self, x: Tensor, aligned: Tensor | None, axis: int, virtual: int, finite: Tensor | None
    ) -> None:
        """Accumulate ``Σ (n_g − 1)/n_g`` over the ghost batches of this call, per channel."""
        n = x.shape[0]
        if n % virtual != 0:
            return  # the layer's forward raises with the fix
        ghosts = n // virtual
        device = self.stats.count.device
        if aligned is None:
            per_ghost = torch.full(
                (ghosts, x.shape[axis]),
                x.numel() / (ghosts * x.shape[axis]),
                dtype=torch.float64,
                device=device,
            )
        else:
            w = aligned.to(torch.float64).expand(x.shape).movedim(axis, -1)
            per_sample = w.reshape(n, -1, x.shape[axis]).sum(1)  # (N, C)
            if self.layer.ghost_layout == "contiguous":
                per_ghost = per_sample.reshape(ghosts, virtual, -1).sum(1)
            else:  # strided (Keras): ghost j = samples j, j + G, j + 2G, ...
                per_ghost = per_sample.reshape(virtual, ghosts, -1).sum(0)
            per_ghost = per_ghost.to(device)
        factor = torch.clamp(per_ghost - 1.0, min=0.0) / torch.clamp(per_ghost, min=1e-300)
        ghost_sum = factor.sum(0)
        count = torch.full((), float(ghosts), dtype=torch.float64, device=device)
        if finite is not None:
            ghost_sum = torch.where(finite, ghost_sum, 0.0)
            count = torch.where(finite, count, 0.0)
        self.stats.ghost_sum = self.stats.ghost_sum + ghost_sum
        self.stats.ghosts = self.stats.ghosts + count


def _weight_total(aligned: Tensor, x: Tensor, dims: list[int]) -> Tensor:
    """Total weight per channel of ``aligned`` broadcast against ``x`` (float64, shape (C,))."""
    w = aligned.to(torch.float64)
    summed = [d for d in dims if w.shape[d] != 1]
    repeat = math.prod(x.shape[d] for d in dims if w.shape[d] == 1)
    total = (w.sum(dim=summed, keepdim=True) if summed else w) * repeat
    channels = x.shape[next(d for d in range(x.ndim) if d not in dims)]
    return total.reshape(-1).expand(channels).clone()


# ----------------------------------------------------------------- model plumbing


def _skip_reason(layer: nn.Module) -> str:
    if (
        not getattr(layer, "track_running_stats", False)
        or layer._buffers.get("running_mean") is None
    ):
        return "track_running_stats=False: no running statistics (batch statistics always)"
    if getattr(layer, "frozen", False) is True:
        return "frozen: its statistics are fixed (unfreeze it to recalibrate)"
    if isinstance(layer, KerasBatchNorm) and not layer.trainable:
        return "trainable=False: Keras runs it in inference mode, it never absorbs statistics"
    return ""


def _snapshot(layer: nn.Module) -> dict[str, tuple[Tensor | None, Tensor | None]]:
    """``{name: (the buffer object, a copy of its value)}`` for every buffer of ``layer``."""
    saved: dict[str, tuple[Tensor | None, Tensor | None]] = {}
    for name, buf in layer._buffers.items():
        if isinstance(buf, nn.parameter.UninitializedBuffer):
            raise ValueError(
                f"{type(layer).__name__} is a lazy module that has not been initialized yet, so "
                "it has no statistics to recalibrate. Fix: run one forward pass first (or "
                "train the model), then recalibrate"
            )
        saved[name] = (buf, None if buf is None else buf.detach().clone())
    return saved


def _restore(layer: nn.Module, saved: dict[str, tuple[Tensor | None, Tensor | None]]) -> None:
    """Put every buffer back, values and identity; drop buffers created meanwhile."""
    with torch.no_grad():
        for name in [n for n in layer._buffers if n not in saved]:
            del layer._buffers[name]
        for name, (buf, value) in saved.items():
            if buf is not None and value is not None:
                buf.copy_(value)
            layer._buffers[name] = buf


def _call(model: nn.Module, batch: Any, forward: Callable[[nn.Module, Any], Any] | None) -> None:
    if forward is not None:
        forward(model, batch)
    elif isinstance(batch, Tensor):
        model(batch)
    elif isinstance(batch, (tuple, list)) and batch:
        model(batch[0])
    elif isinstance(batch, Mapping):
        model(**batch)
    else:
        raise TypeError(
            f"recalibrate does not know how to feed a batch of type {type(batch).__name__} to "
            "the model (it calls model(batch) for a tensor, model(batch[0]) for a tuple or "
            "list, model(**batch) for a dict). Fix: pass forward=lambda model, batch: ..."
        )


def _length(data: Iterable[Any], num_batches: int | None) -> int | None:
    try:
        n: int | None = len(data)  # type: ignore[arg-type]
    except TypeError:
        n = None
    if num_batches is None:
        return n
    return num_batches if n is None else min(n, num_batches)


def _progress(batches: Iterable[Any], total: int | None, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return batches
    try:
        from tqdm import tqdm
    except ImportError:  # a dependency, but an environment may lack it: no bar then
        return batches
    bar: Iterable[Any] = tqdm(
        batches, total=total, desc="recalibrate", unit="batch", file=sys.stderr
    )
    return bar


def _world_size() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


def _pool_across_processes(
    stats: dict[str, _PooledMoments], order: list[str], num_batches: int
) -> int:
    """Replace each rank's statistics by those of all ranks; return the total batch count."""
    dist = torch.distributed
    local = torch.cat(
        [
            torch.tensor([float(num_batches)], dtype=torch.float64),
            *(stats[name].pack().cpu() for name in order),
        ]
    )
    device = torch.device("cpu")
    if dist.get_backend() != "gloo":
        devices = (stats[name].count.device for name in order)
        ref = next((d for d in devices if d.type != "cpu"), None)
        if ref is None and torch.cuda.is_available():
            ref = torch.device("cuda", torch.cuda.current_device())
        device = ref or device
    local = local.to(device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    pooled = {
        name: _PooledMoments(stats[name].count.numel(), stats[name].count.device) for name in order
    }
    total = 0
    for packed in gathered:  # rank order: every rank merges identically
        packed = packed.cpu()
        total += int(packed[0])
        offset = 1
        for name in order:
            size = 4 * pooled[name].count.numel() + 5
            pooled[name].merge_packed(packed[offset : offset + size])
            offset += size
    stats.update(pooled)
    return total


def _zero_debias_shadow(layer: BatchNorm, value: Tensor, stat: str) -> Tensor:
    """The ``*_biased`` shadow that makes ``shadow / (1 - d^k) == value``.

    ``k`` is the layer's ``*_local_step`` (unchanged) and ``d`` the decay of its next update,
    so the next training step blends ``value`` and the new batch as a zero-debiased average
    in which ``value`` stands for all the history (weights ``d − d^{k+1}`` and ``1 − d``).
    A layer with ``k = 0`` (never updated) gets a zero shadow: as in TensorFlow, its first
    update then replaces the statistic with the batch's.
    """
    step = layer._buffers[f"{stat}_local_step"]
    tracked = layer._buffers["num_batches_tracked"]
    assert step is not None
    assert tracked is not None
    momentum = layer._rule.momentum_at(tracked)
    decay = 1.0 - torch.as_tensor(momentum, dtype=torch.float64)
    factor = 1.0 - torch.pow(decay, step.to(torch.float64).cpu())
    return value * factor.to(value.device)


def _write(layer: nn.Module, mean: Tensor, var: Tensor) -> None:
    """Write float64 statistics into the layer's buffers (and the ones tied to them)."""
    running_mean, running_var = layer._buffers["running_mean"], layer._buffers["running_var"]
    assert running_mean is not None
    assert running_var is not None
    with torch.no_grad():
        running_mean.copy_(mean)
        running_var.copy_(var)
        if not isinstance(layer, BatchNorm):
            return
        eps = layer.eps
        for name, value in layer._derived_statistics(mean, var).items():
            target = layer._buffers.get(name)
            if target is None or name in _TRAINING_ONLY or name.endswith("_local_step"):
                continue
            if name == "running_stddev":
                # Renorm keeps running_var = relu(running_stddev² − eps): keep that true.
                value = torch.sqrt(var + eps)
            elif name.endswith("_biased"):
                stat = name[: -len("_biased")]
                value = _zero_debias_shadow(layer, mean if stat == "running_mean" else var, stat)
            target.copy_(value)


def _finish(
    name: str, layer: nn.Module, stats: _PooledMoments, old_mean: Tensor, old_var: Tensor
) -> LayerCalibration:
    kind = type(layer).__name__
    common: dict[str, Any] = {
        "batches": stats.batches,
        "nonfinite_batches": int(stats.nonfinite),
    }
    if stats.batches == 0 and stats.refused > 0:
        reason = "its training calls never move its statistics (slim trainable=False)"
        return LayerCalibration(name, kind, "skipped", reason, **common)
    if stats.batches == 0 or not bool((stats.count > 0).all()):
        reason = (
            "the forward never called it with data"
            if stats.batches == 0
            else "every batch it saw had non-finite statistics"
        )
        return LayerCalibration(name, kind, "not reached", reason, **common)
    count, mode = stats.count, stats.mode or "unbiased"
    ghost_factor = None
    bessel = stats.m2 / torch.clamp(count - 1.0, min=1.0)
    if isinstance(layer, BatchNorm) and layer.virtual_batch_size is not None:
        if mode == "unbiased":
            var = bessel
        else:
            factor = stats.ghost_sum / torch.clamp(stats.ghosts, min=1.0)
            ghost_factor = float(factor.min())
            var = bessel * factor
    else:
        var = bessel if mode == "unbiased" else stats.m2 / count
    mean = stats.mean
    old_mean, old_var = old_mean.double(), old_var.double()
    eps = float(getattr(layer, "eps", 0.0))
    _write(layer, mean.to(old_mean.device), var.to(old_var.device))
    shift = (mean.to(old_mean.device) - old_mean).abs() / torch.sqrt(old_var + eps)
    ratio = var.to(old_var.device) / old_var
    return LayerCalibration(
        name,
        kind,
        "calibrated",
        samples=float(count.min()),
        running_var=mode,
        ghost_factor=ghost_factor,
        mean_shift=float(shift.max()),
        var_ratio_min=float(ratio.min()),
        var_ratio_max=float(ratio.max()),
        **common,
    )


# ------------------------------------------------------------------------ the API


def recalibrate(
    model: nn.Module,
    data: Iterable[Any],
    *,
    num_batches: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = True,
) -> CalibrationReport:
    r"""Replace the running statistics of every batch-norm layer by exact population statistics.

    Runs the model over ``data`` with every batch-norm layer in training mode (so each layer
    sees the inputs it sees in training: upstream layers normalize with batch statistics, as
    in fvcore's precise BN and ``torch.optim.swa_utils.update_bn``), records the moments of
    each layer's input with a forward pre-hook, pools them exactly, and writes::

        n_c = Σ_b n_b                        (values per channel; total weight if weighted)
        μ_c = Σ_b n_b μ_b / n_c
        M2_c = Σ_b [M2_b + n_b (μ_b − μ_c)²]   (Chan's merge, float64)
        running_mean = μ_c
        running_var  = M2_c / (n_c − 1)      running_var="unbiased" (torch layers, default)
                     = M2_c / n_c            running_var="biased"

    Ghost-batch layers (``virtual_batch_size``) get the expected value of what training
    feeds their moving variance: "unbiased" → ``M2_c / (n_c − 1)``; "biased" →
    ``M2_c / (n_c − 1) · mean_g((n_g − 1)/n_g)``, with ``n_g`` the values per channel in
    ghost ``g`` (its total weight when weighted; the mean runs over every ghost seen), since
    each ghost's biased variance has expected value ``σ²·(n_g − 1)/n_g``. The ghost size is
    part of the model, so this keeps the layer's train/inference behaviour; the batch size
    of ``data`` is not, so plain layers never depend on it.

    Layers covered: :class:`bnkit.BatchNorm` and its subclasses (presets pick their variance
    convention from the first input they get, as in training) and every
    ``torch.nn.modules.batchnorm._BatchNorm`` (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``).
    Skipped, and listed in the report with the reason: ``track_running_stats=False``,
    frozen layers, Keras presets with ``trainable=False``. Calls with ``training=False`` do
    not count; with ``weights=``/``mask=`` the moments are weighted (frequency weights).

    Only ``running_mean`` and ``running_var`` change, and the buffers tied to them:
    renorm's ``running_stddev = sqrt(running_var + eps)``; zero-debias shadows
    ``*_biased = value · (1 − d^k)`` (``k`` the unchanged local step, ``d`` the decay of the
    next update) so the debiased statistic equals the new value. Parameters, counters
    (``num_batches_tracked``, local steps), renorm's training-time ``renorm_mean`` /
    ``renorm_stddev``, modes, momenta and hooks are exactly as before, also when the forward
    raises (then nothing is written). Each batch starts from the layers' original buffers,
    so the order of the batches does not matter.

    Statistics of a layer whose input passes through another batch-norm layer depend on
    how ``data`` is batched, because that upstream layer normalizes with batch statistics
    (exactly as in training); use batches the size of training batches for those.

    Under ``torch.distributed`` (more than one process) each rank runs its own ``data`` and
    the statistics are pooled exactly over all ranks (see the module docs); ranks may have
    different numbers of batches unless the model synchronizes batch norm in its forward
    (``SyncBatchNorm``, bnkit layers with ``sync=True``), which needs the same number on
    every rank. Every rank must call
    ``recalibrate``; an error on one rank leaves the others waiting in the collective until
    the process group's timeout.

    Args:
        model: any module; its batch-norm layers are found with ``named_modules()``.
        data: an iterable of batches (a DataLoader, a list of tensors, a generator); batches
            are passed as they are, so move them to the model's device first (or in
            ``forward``).
        num_batches: use at most this many batches (default: all of ``data``).
        forward: ``forward(model, batch)``; default: ``model(batch)`` for a tensor,
            ``model(batch[0])`` for a tuple or list, ``model(**batch)`` for a dict.
        progress: show a tqdm progress bar on stderr (when tqdm is installed; on rank 0
            only under torch.distributed).

    Returns:
        A :class:`CalibrationReport`: per layer, batches and values seen and how much the
        statistics moved.

    Raises:
        ValueError: ``data`` yields no batches; the forward reaches none of the layers to
            calibrate; an uninitialized lazy layer; ``num_batches < 1``.
        TypeError: a batch that cannot be fed without ``forward``.

    Warns:
        UserWarning: some (not all) layers were never reached; they keep their statistics.

    Example:
        >>> import torch, bnkit
        >>> from bnkit.calibrate import recalibrate
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), bnkit.BatchNorm1d(3)).eval()
        >>> data = [torch.randn(16, 4) for _ in range(5)]
        >>> report = recalibrate(model, data, progress=False)
        >>> report.layers["1"].batches, report.layers["1"].samples
        (5, 80.0)
        >>> inputs = model[0](torch.cat(data)).detach()
        >>> torch.allclose(model[1].running_var, inputs.var(0), rtol=1e-5)
        True
        >>> int(model[1].num_batches_tracked), model.training  # counters and mode untouched
        (0, False)
    """
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    entries: dict[str, LayerCalibration] = {}
    targets: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not isinstance(module, (BatchNorm, _BatchNorm)):
            continue
        reason = _skip_reason(module)
        if reason:
            entries[name] = LayerCalibration(name, type(module).__name__, "skipped", reason)
        else:
            targets.append((name, module))
    world = _world_size()
    if not targets:
        return CalibrationReport(entries, 0, world)

    saved = {name: _snapshot(layer) for name, layer in targets}
    warned = {name: set(getattr(layer, "_warned", ())) for name, layer in targets}
    cursor = _Cursor()
    stats: dict[str, _PooledMoments] = {}
    modes = {name: layer.training for name, layer in targets}
    handles: list[RemovableHandle] = []
    drawn = 0
    try:
        for name, layer in targets:
            running_mean = layer._buffers["running_mean"]
            assert running_mean is not None
            stats[name] = _PooledMoments(running_mean.numel(), running_mean.device)
            axis = layer.axis if isinstance(layer, BatchNorm) else 1
            recorder = _Recorder(layer, axis, stats[name], cursor)
            handles.append(layer.register_forward_pre_hook(recorder, with_kwargs=True))
            layer.training = True
        batches = data if num_batches is None else itertools.islice(data, num_batches)
        shown = progress and (world == 1 or torch.distributed.get_rank() == 0)
        iterator = _progress(batches, _length(data, num_batches), shown)
        with torch.no_grad(), calibrating(), warnings.catch_warnings():
            # Non-finite batches are left out and counted in the report (policy nonfinite);
            # the layers' own "update skipped" warning would describe buffers that are
            # restored anyway.
            warnings.filterwarnings("ignore", ".*non-finite statistics", BatchNormWarning)
            try:
                for index, batch in enumerate(iterator):
                    cursor.batch = index
                    drawn += 1
                    _call(model, batch, forward)
                    for name, layer in targets:  # the next batch starts from the originals
                        _restore(layer, saved[name])
            finally:
                close = getattr(iterator, "close", None)
                if callable(close) and iterator is not batches:
                    close()
    finally:
        for handle in handles:
            handle.remove()
        for name, layer in targets:
            layer.training = modes[name]
            _restore(layer, saved[name])
            current = getattr(layer, "_warned", None)
            if isinstance(current, set):  # bnkit's warn-once memory: as it was
                current.clear()
                current.update(warned[name])

    order = [name for name, _ in targets]
    if world > 1:
        drawn = _pool_across_processes(stats, order, drawn)
    if drawn == 0:
        raise ValueError(
            "data yielded no batches, so there is nothing to compute statistics from. Fix: "
            "pass a non-empty iterable (a DataLoader that is not exhausted: a generator can "
            "be consumed only once)"
        )
    if all(stats[name].batches == 0 for name in order):
        listed = ", ".join(repr(name) for name in order[:5]) + (" ..." if len(order) > 5 else "")
        raise ValueError(
            f"the forward ran on {drawn} batch(es) but never called any of the "
            f"{len(order)} batch-norm layer(s) to calibrate ({listed}). Fix: 1) pass "
            "forward=lambda model, batch: ... if the batches need unpacking (default: "
            "model(batch), model(batch[0]) for tuples, model(**batch) for dicts), 2) make "
            "sure the model's forward uses its batch-norm layers"
        )
    for name, layer in targets:
        old_mean, old_var = saved[name]["running_mean"][1], saved[name]["running_var"][1]
        assert old_mean is not None
        assert old_var is not None
        entries[name] = _finish(name, layer, stats[name], old_mean, old_var)
    missing = [name for name, _ in targets if entries[name].status == "not reached"]
    if missing:
        warnings.warn(
            f"recalibrate: {len(missing)} batch-norm layer(s) got no usable data and keep "
            f"their statistics: {', '.join(repr(m) for m in missing)} (the forward never "
            "called them, or only with non-finite values). If they should be calibrated, "
            "make the calibration forward reach them (forward=...)",
            UserWarning,
            stacklevel=2,
        )
    ordered = {name: entries[name] for name, _ in model.named_modules() if name in entries}
    return CalibrationReport(ordered, drawn, world)
