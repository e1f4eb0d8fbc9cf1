"""What the demo scenarios share: embedded data, shadow statistics, evaluation, the doctor.

Everything here is deterministic for a given seed and downloads nothing: the regression data
are drawn from a seeded generator and the digits come with scikit-learn.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import bnkit
from bnkit.checkpoint import Finding
from bnkit.policies import calibrating

__all__ = [
    "BrokenCase",
    "Curve",
    "Diagnosis",
    "DigitsData",
    "ShadowStatistics",
    "batch_statistics_forward",
    "diagnose_checkpoint",
    "diagnose_model",
    "first_line",
    "load_digits_data",
    "minibatches",
    "never_updated_copy",
    "population_statistics",
    "progress_range",
    "quiet_load",
    "regression_data",
    "running_statistics",
    "same_statistics",
    "with_statistics",
]


# ----------------------------------------------------------------------------- data


def regression_data(samples: int = 1000, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The data of seed 002: ``a, b ~ U(0, 1)`` and ``y = 2a + 3b + 3``.

    Args:
        samples: number of rows.
        seed: seeds the generator.

    Returns:
        ``(x, y)`` of shapes ``(samples, 2)`` and ``(samples, 1)``, float32.

    Example:
        >>> x, y = regression_data(4)
        >>> x.shape, y.shape
        (torch.Size([4, 2]), torch.Size([4, 1]))
        >>> bool(torch.allclose(y[:, 0], 2 * x[:, 0] + 3 * x[:, 1] + 3))
        True
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(samples, 2, generator=generator)
    y = (2 * x[:, 0] + 3 * x[:, 1] + 3).unsqueeze(1)
    return x, y


@dataclass(frozen=True)
class DigitsData:
    """scikit-learn's 8x8 digits (pixels scaled to [0, 1]), split 70/30 into train/test."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits_data(*, seed: int = 0, layout: str = "flat") -> DigitsData:
    """scikit-learn's embedded digits (1797 images, no download), split 70/30 at random.

    Args:
        seed: seeds the split.
        layout: ``"flat"`` gives ``(N, 64)`` rows; ``"NHWC"`` gives channels-last images
            ``(N, 8, 8, 1)``, TensorFlow's default layout.

    Returns:
        The split as float32 images and int64 labels.

    Raises:
        RuntimeError: scikit-learn is not installed (``pip install 'bnkit[demo]'``).
        ValueError: an unknown layout.
    """
    if layout not in ("flat", "NHWC"):
        raise ValueError(f"layout must be 'flat' or 'NHWC', got {layout!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise RuntimeError("the demo needs scikit-learn: pip install 'bnkit[demo]'") from err
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    x = images.reshape(len(images), 64) if layout == "flat" else images.unsqueeze(-1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    split = int(0.7 * len(labels))
    train, test = order[:split], order[split:]
    return DigitsData(x[train], labels[train], x[test], labels[test])


def minibatches(samples: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Index tensors of one shuffled pass; the last partial batch is dropped.

    A training batch of one sample has one value per channel, which batch norm cannot
    normalize, so a ragged tail is never produced.
    """
    order = torch.randperm(samples, generator=generator)
    for start in range(0, samples - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


def progress_range(steps: int, description: str, enabled: bool) -> Iterable[int]:
    """``range(steps)``, with a tqdm progress bar on stderr when enabled and installed."""
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency
            return range(steps)
        bar: Iterable[int] = tqdm(
            range(steps), desc=description, unit="step", file=sys.stderr, leave=False
        )
        return bar
    return range(steps)


# ------------------------------------------------------------------ statistics helpers


def _batch_norm_layers(model: nn.Module) -> dict[str, bnkit.BatchNorm]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, bnkit.BatchNorm)
    }


def _buffers(layer: bnkit.BatchNorm) -> tuple[Tensor, Tensor]:
    mean, var = layer.running_mean, layer.running_var
    if mean is None or var is None:
        raise ValueError(f"{layer!r} keeps no running statistics (track_running_stats=False)")
    return mean, var


def running_statistics(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """``{layer name: (running_mean, running_var)}`` of every bnkit layer (copies)."""
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for name, layer in _batch_norm_layers(model).items():
        if layer.track_running_stats:
            mean, var = _buffers(layer)
            out[name] = (mean.clone(), var.clone())
    return out


def same_statistics(
    a: Mapping[str, tuple[Tensor, Tensor]], b: Mapping[str, tuple[Tensor, Tensor]]
) -> bool:
    """Whether two sets of statistics are exactly equal, layer by layer."""
    return a.keys() == b.keys() and all(
        torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1]) for name in a
    )


def population_statistics(
    model: nn.Module, data: Sequence[Tensor]
) -> dict[str, tuple[Tensor, Tensor]]:
    """The exact statistics each layer sees over ``data`` for the current weights.

    ``bnkit.recalibrate`` on a copy of the model; the model itself is not touched.
    """
    clone = copy.deepcopy(model)
    bnkit.recalibrate(clone, list(data), progress=False)
    return running_statistics(clone)


class ShadowStatistics:
    """Moving averages under other rules, fed exactly what the model's layers see in training.

    In training mode a batch-norm layer normalizes with the batch's statistics, so the
    weights a run learns do not depend on how the moving statistics are averaged. One
    training run can therefore carry several averaging rules at once: for every bnkit layer
    and every rule, a parameter-free ``bnkit.BatchNorm`` with that rule receives the layer's
    training input through a forward pre-hook (inside :func:`bnkit.policies.calibrating`, so
    no gradient and no warning) and updates its own statistics with bnkit's update rule.
    Evaluating "the same run with decay 0.9" is then :func:`with_statistics` with that
    rule's statistics.

    Only the model's own layer objects feed the shadows: copies of the model (``deepcopy``)
    carry the hook but it does nothing for them.

    Args:
        model: a model with ``bnkit.BatchNorm`` layers.
        rules: ``{name: BatchNorm keyword arguments}``, e.g.
            ``{"decay 0.9": {"decay": 0.9}}``; ``axis`` and ``eps`` default to the layer's.

    Example:
        >>> import torch, bnkit
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), bnkit.BatchNorm1d(2))
        >>> shadows = ShadowStatistics(model, {"same": {"momentum": 0.1}})
        >>> _ = model(torch.randn(8, 3))
        >>> shadows.statistics("same")["1"][0].equal(model[1].running_mean)
        True
        >>> shadows.close()
    """

    def __init__(self, model: nn.Module, rules: Mapping[str, Mapping[str, Any]]) -> None:
        self.layers = _batch_norm_layers(model)
        self.rules = {name: dict(options) for name, options in rules.items()}
        self.shadows: dict[str, dict[str, bnkit.BatchNorm]] = {}
        for rule, options in self.rules.items():
            per_layer: dict[str, bnkit.BatchNorm] = {}
            for name, layer in self.layers.items():
                kwargs: dict[str, Any] = {"axis": layer.axis, "eps": layer.eps}
                kwargs.update(options)
                per_layer[name] = bnkit.BatchNorm(
                    layer.num_features, center=False, scale=False, **kwargs
                )
            self.shadows[rule] = per_layer
        self._handles = [
            layer.register_forward_pre_hook(self._hook_for(name, layer))
            for name, layer in self.layers.items()
        ]

    def _hook_for(self, name: str, layer: nn.Module) -> Callable[[nn.Module, Any], None]:
        shadows = [per_layer[name] for per_layer in self.shadows.values()]

        def feed(module: nn.Module, args: Any) -> None:
            if module is not layer or not module.training or not args:
                return
            if isinstance(module, bnkit.BatchNorm) and module.frozen:
                return
            x = args[0].detach()
            with torch.no_grad(), calibrating():
                for shadow in shadows:
                    shadow(x, training=True)

        return feed

    def statistics(self, rule: str) -> dict[str, tuple[Tensor, Tensor]]:
        """``{layer name: (running_mean, running_var)}`` under ``rule`` (copies)."""
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for name, shadow in self.shadows[rule].items():
            mean, var = _buffers(shadow)
            out[name] = (mean.clone(), var.clone())
        return out

    def close(self) -> None:
        """Remove the hooks; the shadows keep their statistics."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


@contextlib.contextmanager
def with_statistics(
    model: nn.Module, statistics: Mapping[str, tuple[Tensor, Tensor]]
) -> Iterator[nn.Module]:
    """Use other running statistics in ``model`` for a ``with`` block, then put back its own.

    Args:
        model: the model whose bnkit layers get the statistics.
        statistics: ``{layer name: (running_mean, running_var)}``.

    Yields:
        ``model`` itself.
    """
    layers = _batch_norm_layers(model)
    saved: dict[str, tuple[Tensor, Tensor]] = {}
    try:
        with torch.no_grad():
            for name, (mean, var) in statistics.items():
                own_mean, own_var = _buffers(layers[name])
                saved[name] = (own_mean.clone(), own_var.clone())
                own_mean.copy_(mean)
                own_var.copy_(var)
        yield model
    finally:
        with torch.no_grad():
            for name, (mean, var) in saved.items():
                own_mean, own_var = _buffers(layers[name])
                own_mean.copy_(mean)
                own_var.copy_(var)


def batch_statistics_forward(model: nn.Module, x: Tensor) -> Tensor:
    """The model's training-mode output on ``x`` (batch statistics), changing nothing.

    A copy of the model runs in training mode inside :func:`bnkit.policies.calibrating`, so
    the model's running statistics stay as they are: this is TF's ``is_training=True`` at
    test time, measured without its side effect.
    """
    clone = copy.deepcopy(model).train()
    with torch.no_grad(), calibrating():
        out: Tensor = clone(x)
    return out


def never_updated_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose running statistics never moved during training.

    This is TF 1.x's classic bug (the ops in ``tf.GraphKeys.UPDATE_OPS`` never ran): the
    training forward normalizes with batch statistics, so the weights are exactly those of
    the trained model, while ``moving_mean``/``moving_variance`` keep their initial values.
    The step counter still says how many training batches the layer saw.
    """
    broken = copy.deepcopy(model)
    for layer in _batch_norm_layers(broken).values():
        counter = layer.num_batches_tracked
        steps = counter.clone() if counter is not None else None
        layer.reset_running_stats()
        if counter is not None and steps is not None:
            counter.copy_(steps)
    return broken


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Curve:
    """One quantity over training steps (a line in a plot).

    Attributes:
        label: what the line is (``"decay 0.9"``, ``"training mode"``).
        steps: the training steps at which it was measured (1-based: after that many steps).
        values: the measurements.
    """

    label: str
    steps: tuple[int, ...]
    values: tuple[float, ...]

    def at(self, step: int) -> float:
        """The value measured at ``step``, or at the last measured step before it."""
        best = self.values[0]
        for s, v in zip(self.steps, self.values, strict=True):
            if s > step:
                break
            best = v
        return best

    @property
    def last(self) -> float:
        """The last measurement."""
        return self.values[-1]


@dataclass(frozen=True)
class BrokenCase:
    """A broken setup from the seed documents, what it costs, and bnkit's answer.

    Attributes:
        name: short name (``"statistics never updated"``).
        setup: how the broken model came about, in words.
        value: the broken model's evaluation-mode metric.
        answer: what repairs the broken model (``"load(strict=False) + recalibrate"``).
        fixed_value: the metric after the answer.
        prevented_by: how bnkit keeps the failure from happening in the first place.
        diagnosis: what ``bnkit doctor`` says about the broken model or checkpoint.
        notes: what bnkit said along the way (a refused load, a warning), first lines only.
    """

    name: str
    setup: str
    value: float
    answer: str
    fixed_value: float
    prevented_by: str
    diagnosis: Diagnosis
    notes: tuple[str, ...] = ()


def first_line(text: str) -> str:
    """The first line of a message (bnkit's errors continue with the fixes)."""
    return text.strip().splitlines()[0] if text.strip() else ""


# ------------------------------------------------------------------------------ doctor


@dataclass(frozen=True)
class Diagnosis:
    """What ``bnkit doctor`` (:func:`bnkit.doctor.diagnose`) said about a model or checkpoint.

    Attributes:
        target: what was examined, in words (``"checkpoint never-updated.safetensors"``).
        codes: the finding codes of severity error or warning, in order, without repeats.
        healthy: no finding of severity error or warning.
        findings: every finding, notes included.
        text: the doctor's report as ``bnkit doctor`` prints it.
    """

    target: str
    codes: tuple[str, ...]
    healthy: bool
    findings: tuple[Finding, ...]
    text: str


def _diagnosis(target: str, report: Any) -> Diagnosis:
    return Diagnosis(
        target=target,
        codes=tuple(report.codes("error", "warning")),
        healthy=bool(report.healthy),
        findings=tuple(report.findings),
        text=str(report),
    )


def diagnose_checkpoint(model: nn.Module, path: Path) -> Diagnosis:
    """Run the doctor on a checkpoint file for the model architecture it belongs to.

    Args:
        model: a model of the checkpoint's architecture (the doctor restores it afterwards).
        path: the checkpoint (``bnkit.save`` output or any file ``bnkit.load`` reads).

    Returns:
        The :class:`Diagnosis`.
    """
    from bnkit.doctor import diagnose

    return _diagnosis(f"checkpoint {path.name}", diagnose(model, state=str(path)))


def diagnose_model(model: nn.Module, data: Sequence[Tensor], *, target: str) -> Diagnosis:
    """Run the doctor on a live model with data (static and data checks).

    Args:
        model: the model (its modes and statistics are left as they were).
        data: batches of input, for the checks that compare the running statistics with the
            data's and evaluation-mode outputs with training-mode ones.
        target: what the model is, in words.

    Returns:
        The :class:`Diagnosis`.
    """
    from bnkit.doctor import diagnose

    return _diagnosis(target, diagnose(model, data=list(data)))


def quiet_load(model: nn.Module, path: Path) -> tuple[bnkit.LoadReport, list[str]]:
    """``bnkit.load(model, path, strict=False)``, returning its warnings instead of showing them.

    Returns:
        The load report and the messages of the warnings it raised.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = bnkit.load(model, path, strict=False)
    return report, [str(w.message) for w in caught]
