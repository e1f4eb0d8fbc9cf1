r"""Find, explain and repair broken batch-norm statistics: :func:`diagnose` and ``bnkit doctor``.

``diagnose`` reads a checkpoint (PyTorch ``.pt``/``.pth`` with ``weights_only``, safetensors,
TensorFlow checkpoints, Keras ``.h5``/``.keras`` files), a state dict or a live model, and
reports every batch-norm layer whose statistics are broken, with the layer's name as the
file names it, the numbers behind the finding and the fix. With a model and data it also
runs the model: the running statistics against the data's population statistics, and the
same batches in training and in evaluation mode. ``bnkit doctor`` is the command line for
it; ``--fix`` recalibrates the statistics and writes a repaired checkpoint.

Checks and thresholds (the module constants below; docs/doctor.md explains each):

* ``missing-statistics`` (error): a batch-norm layer has parameters but no moving mean or
  variance (``Saver(var_list=tf.trainable_variables())``, ``dict(model.named_parameters())``).
* ``never-updated`` (error): mean and variance are exactly their initial values (0 and 1)
  while a step counter says the layer trained, or its γ/β were trained.
* ``non-finite`` (error), ``negative-variance`` (error), ``shape-mismatch`` (error).
* ``degenerate-variance`` (warning): every channel's variance ≤ ``TINY_VARIANCE``, or the
  largest over the smallest channel variance > ``CHANNEL_RATIO_LIMIT``.
* ``zero-debias-mismatch`` (warning): the zero-debiased statistic is not
  ``biased / (1 - decay^local_step)``.
* ``initial-dominated`` (warning; info when the decay is a framework default): after ``t``
  updates with decay ``d`` the initial value still weighs ``d^t > INITIAL_WEIGHT_LIMIT``.
* ``rank-disagreement`` / ``rank-parameters-differ`` (warning): rank checkpoints disagree.
* With data: ``stale-statistics`` (warning): ``|μ_run − μ_pop| / σ_pop > MEAN_SHIFT_LIMIT``
  or ``σ²_run / σ²_pop`` outside ``VAR_RATIO_LIMITS``; ``train-eval-gap`` (warning): the
  relative output gap between training and evaluation mode exceeds ``GAP_LIMIT`` and
  ``GAP_FLOOR_FACTOR`` times the gap that exact population statistics leave;
  ``no-grad-training`` (warning): a layer ran in training mode under ``torch.no_grad()``.

Example:
    >>> import torch, bnkit
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), bnkit.BatchNorm1d(3))
    >>> state = model.state_dict()
    >>> _ = state["1.num_batches_tracked"].fill_(100)   # "trained", statistics untouched
    >>> report = diagnose(state=state)
    >>> [(f.severity, f.layer, f.code) for f in report.findings]
    [('error', '1', 'never-updated')]
    >>> report.findings[0].evidence["steps"], report.exit_code
    (100, 1)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import itertools
import json
import math
import os
import re
import sys
import textwrap
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnkit import checkpoint as ckpt
from bnkit import running, tf_import
from bnkit.calibrate import CalibrationReport, recalibrate
from bnkit.checkpoint import CheckpointError, Finding, FindingsSummary
from bnkit.modules import BatchNorm
from bnkit.policies import BatchNormWarning, calibrating

__all__ = [
    "CHANNEL_RATIO_LIMIT",
    "GAP_FLOOR_FACTOR",
    "GAP_LIMIT",
    "INITIAL_WEIGHT_LIMIT",
    "MEAN_SHIFT_LIMIT",
    "RANK_MEAN_LIMIT",
    "RANK_VAR_RATIO_LIMIT",
    "TINY_VARIANCE",
    "VAR_RATIO_LIMITS",
    "ZERO_DEBIAS_RTOL",
    "LayerSummary",
    "Report",
    "diagnose",
    "repair",
]

PathLike = str | os.PathLike[str]
StateLike = Mapping[str, Any] | PathLike
Forward = Callable[[nn.Module, Any], Any]

# ------------------------------------------------------------------------ thresholds

#: ``initial-dominated``: the initial value's weight ``d^t`` above which a moving average
#: still "remembers where it started".
INITIAL_WEIGHT_LIMIT = 0.05
#: ``degenerate-variance``: every channel's variance at or below this is "all ~0".
TINY_VARIANCE = 1e-8
#: ``degenerate-variance``: largest / smallest channel variance above this.
CHANNEL_RATIO_LIMIT = 1e6
#: ``zero-debias-mismatch``: relative tolerance on the debias factor ``1 - d^k``.
ZERO_DEBIAS_RTOL = 1e-3
#: ``stale-statistics``: largest standardized mean shift ``|μ_run − μ_pop| / σ_pop``.
MEAN_SHIFT_LIMIT = 0.5
#: ``stale-statistics``: allowed range of ``(σ²_run + eps) / (σ²_pop + eps)``.
VAR_RATIO_LIMITS = (0.5, 2.0)
#: ``train-eval-gap``: relative L2 gap between training- and evaluation-mode outputs.
GAP_LIMIT = 0.2
#: ``train-eval-gap``: ... and more than this many times the gap with population statistics.
GAP_FLOOR_FACTOR = 2.0
#: ``rank-disagreement``: spread of the ranks' means in pooled standard deviations.
RANK_MEAN_LIMIT = 0.1
#: ``rank-disagreement``: largest / smallest variance across ranks.
RANK_VAR_RATIO_LIMIT = 1.25
#: ``rank-parameters-differ``: relative difference of γ/β across ranks.
RANK_PARAM_RTOL = 1e-4
#: ``few-samples`` (info): values per channel below which the data checks are noisy.
FEW_SAMPLES = 100

_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}
_VECTOR_ROLES = ("weight", "bias", *running.FLOAT_STAT_BUFFERS)
_NONNEGATIVE = running.NONNEGATIVE_STAT_BUFFERS
# TF/Keras variable roles -> bnkit/torch names.
_TF_ROLES = {
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
    "moving_stddev": "running_stddev",
    "renorm_mean": "renorm_mean",
    "renorm_stddev": "renorm_stddev",
    "moving_mean/biased": "running_mean_biased",
    "moving_mean/local_step": "running_mean_local_step",
    "moving_variance/biased": "running_var_biased",
    "moving_variance/local_step": "running_var_local_step",
}
_TF_NAMES = {torch_name: tf_name for tf_name, torch_name in _TF_ROLES.items()}
# A name that says "batch norm" (used where nothing else tells a BN from a LayerNorm).
_BN_NAME = re.compile(r"(?i)batch_?norm|(^|[_\-])bn\d*($|[_\-])")
_KERAS_LEAF = re.compile(r"^(sync_)?batch_normalization(_\d+)?$")
_SLIM_LEAF = re.compile(r"^BatchNorm(_\d+)?$")
_TENSOR_KEYS = ("x", "inputs", "input", "data", "images", "features")

_FIX_RECALIBRATE = (
    "recompute the statistics from training data: bnkit doctor PATH --model MODULE:FACTORY "
    "--data DATA --fix OUT, or bnkit.recalibrate(model, data) in Python"
)


# ---------------------------------------------------------------------------- report


@dataclass
class LayerSummary:
    """The numbers ``diagnose`` found for one batch-norm layer (a row of the report's table).

    Attributes:
        name: the layer as the file names it (torch module path, TF scope, Keras layer).
        source: the checkpoint (or ``"model"``/``"state"``) it comes from.
        channels: number of channels.
        steps: updates the statistics went through (``t``), if the file says.
        steps_from: where ``steps`` comes from (``num_batches_tracked``, ``local_step``,
            ``global_step``, ``optimizer iterations``).
        decay: the decay of the moving averages (``1 - momentum``), if known or assumed.
        decay_from: where ``decay`` comes from.
        cumulative: the layer keeps a cumulative average (PyTorch ``momentum=None``).
        initial_weight: the weight the initial value still has in the averages (``d^t``).
        mean_shift: largest ``|μ_run − μ_pop| / σ_pop`` over channels (data checks).
        var_ratio_min, var_ratio_max: range of ``(σ²_run + eps) / (σ²_pop + eps)``.
        samples: values per channel the population statistics were computed from.
    """

    name: str
    source: str
    channels: int | None = None
    steps: int | None = None
    steps_from: str | None = None
    decay: float | None = None
    decay_from: str | None = None
    cumulative: bool = False
    initial_weight: float | None = None
    mean_shift: float | None = None
    var_ratio_min: float | None = None
    var_ratio_max: float | None = None
    samples: float | None = None


@dataclass
class Report(FindingsSummary):
    """What :func:`diagnose` found.

    Attributes:
        findings: every :class:`bnkit.checkpoint.Finding`, errors first, then warnings, then
            informational notes; each with ``evidence`` (the numbers).
        sources: what was examined (file paths, ``"model"``, ``"state"``).
        layers: one :class:`LayerSummary` per batch-norm layer.
        batches: batches of data the dynamic checks ran on (None without data).
        train_eval_gap: ``‖y_train − y_eval‖ / ‖y_train‖`` over those batches (relative L2).
        gap_floor: the same gap with exact population statistics in evaluation mode (what
            batch statistics alone cause).

    ``healthy`` is True when there is no error or warning (notes do not count);
    ``exit_code`` is 0 when healthy, else 1. ``str(report)`` is a readable table,
    ``report.to_dict()`` a JSON-safe dict.

    Example:
        >>> report = Report(sources=["model"])
        >>> report.healthy, report.exit_code
        (True, 0)
        >>> print(report)  # doctest: +NORMALIZE_WHITESPACE
        bnkit doctor: model
        no batch-norm layers found
        healthy: no problems found (exit code 0)
    """

    findings: list[Finding] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    layers: list[LayerSummary] = field(default_factory=list)
    batches: int | None = None
    train_eval_gap: float | None = None
    gap_floor: float | None = None

    @property
    def healthy(self) -> bool:
        """No finding of severity error or warning (``ok``)."""
        return self.ok

    @property
    def exit_code(self) -> int:
        """``bnkit doctor``'s exit status: 0 healthy, 1 problems found."""
        return 0 if self.healthy else 1

    def codes(self, *severities: str) -> list[str]:
        """The finding codes (of the given severities; all without), in order, no repeats."""
        out: list[str] = []
        for f in self.findings:
            if (not severities or f.severity in severities) and f.code not in out:
                out.append(f.code)
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the ``--json`` output); see docs/doctor.md for the schema."""
        dynamic = None
        if self.batches is not None:
            dynamic = {
                "batches": self.batches,
                "train_eval_gap": self.train_eval_gap,
                "gap_floor": self.gap_floor,
            }
        out = {
            "schema": "bnkit.doctor/1",
            "healthy": self.healthy,
            "exit_code": self.exit_code,
            "sources": list(self.sources),
            "counts": {
                "error": len(self.errors),
                "warning": len(self.warnings),
                "info": len(self.notes),
            },
            "findings": [
                {
                    "severity": f.severity,
                    "layer": f.layer,
                    "code": f.code,
                    "message": f.message,
                    "fix": f.fix,
                    "evidence": dict(f.evidence),
                }
                for f in self.findings
            ],
            "layers": [vars(layer).copy() for layer in self.layers],
            "dynamic": dynamic,
        }
        result: dict[str, Any] = ckpt._jsonable(out)
        return result

    def render(self, *, color: bool = False, width: int = 100) -> str:
        """The report as text: a table of layers, the findings with their fixes, a verdict.

        Args:
            color: use ANSI colours for severities (the CLI does when stdout is a terminal
                and ``NO_COLOR`` is unset).
            width: the line width messages are wrapped to.
        """
        paint = _painter(color)
        lines = [f"bnkit doctor: {', '.join(self.sources) or '(nothing)'}"]
        if self.layers:
            lines.append("")
            lines.extend(self._table())
        else:
            lines.append("no batch-norm layers found")
        if self.batches is not None:
            gap = _pct(self.train_eval_gap)
            floor = _pct(self.gap_floor)
            lines.append("")
            lines.append(
                f"data: {self.batches} batch(es); train-vs-eval output gap {gap} "
                f"(with population statistics {floor})"
            )
        if self.findings:
            lines.append("")
            indent = " " * 10
            for f in self.findings:
                head = f"{paint(f.severity, f.severity.upper().ljust(8))}  {_display(f.layer)}"
                lines.append(f"{head}  [{f.code}]")
                wrap = textwrap.TextWrapper(width, break_long_words=False, break_on_hyphens=False)
                wrap.initial_indent = wrap.subsequent_indent = indent
                lines.extend(wrap.wrap(f.message))
                wrap.subsequent_indent = indent + "     "
                lines.extend(wrap.wrap(f"fix: {f.fix}"))
        lines.append("")
        counts = [
            f"{n} {word}{'' if n == 1 else 's'}"
            for n, word in (
                (len(self.errors), "error"),
                (len(self.warnings), "warning"),
                (len(self.notes), "note"),
            )
            if n
        ]
        if self.healthy:
            detail = f" ({', '.join(counts)})" if counts else ""
            lines.append(paint("ok", f"healthy: no problems found{detail} (exit code 0)"))
        else:
            lines.append(paint("error", f"problems found: {', '.join(counts)} (exit code 1)"))
        return "\n".join(lines)

    def _table(self) -> list[str]:
        several = len({layer.source for layer in self.layers}) > 1
        header = ["layer", "ch", "steps", "decay", "init weight", "mean shift", "var ratio"]
        if several:
            header.insert(0, "source")
        header.append("status")
        worst: dict[str, str] = {}
        for f in self.findings:
            if f.severity == "info":
                continue
            worst.setdefault(f.layer, f"{f.severity}: {f.code}")
        rows = [header]
        for layer in self.layers:
            if layer.steps is None:
                steps = "-"
            else:
                steps = f"{layer.steps} ({_SHORT_STEPS.get(layer.steps_from or '', '?')})"
            if layer.cumulative:
                decay = "cumulative"
            elif layer.decay is None:
                decay = "?"
            else:
                assumed = layer.decay_from is not None and layer.decay_from.startswith("assumed")
                decay = f"{layer.decay:g}{'*' if assumed else ''}"
            if layer.var_ratio_min is None or layer.var_ratio_max is None:
                ratio = "-"
            else:
                ratio = f"{layer.var_ratio_min:.3g}..{layer.var_ratio_max:.3g}"
            row = [
                _display(layer.name),
                "-" if layer.channels is None else str(layer.channels),
                steps,
                decay,
                _pct(layer.initial_weight),
                "-" if layer.mean_shift is None else f"{layer.mean_shift:.3g}",
                ratio,
            ]
            if several:
                row.insert(0, layer.source)
            row.append(worst.get(layer.name, "ok"))
            rows.append(row)
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        out = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
        ]
        if any(
            layer.decay_from and layer.decay_from.startswith("assumed") for layer in self.layers
        ):
            out.append("* assumed: the framework's default decay (the file does not record it)")
        return out

    def __str__(self) -> str:
        return self.render(color=False)


_SHORT_STEPS = {
    "num_batches_tracked": "nbt",
    "local_step": "local_step",
    "global_step": "global_step",
    "optimizer iterations": "iterations",
}
_COLORS = {"error": "31;1", "warning": "33;1", "info": "36", "ok": "32;1"}


def _painter(color: bool) -> Callable[[str, str], str]:
    def paint(kind: str, text: str) -> str:
        return f"\x1b[{_COLORS[kind]}m{text}\x1b[0m" if color else text

    return paint


def _pct(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{100 * value:.3g}%"


def _display(layer: str) -> str:
    return layer if layer else "<model>"


# --------------------------------------------------------------------- layer views


@dataclass
class _Config:
    """What is known about how one layer's statistics were maintained."""

    decay: float | None = None
    decay_from: str | None = None
    cumulative: bool = False
    warmup: bool = False
    zero_debias: str = ""
    eps: float = 1e-5
    init: dict[str, Tensor | float] = field(default_factory=dict)
    tracks: bool = True
    known: bool = True  # a batch norm for sure (not guessed from its name)

    @property
    def assumed(self) -> bool:
        return self.decay_from is not None and self.decay_from.startswith("assumed")


@dataclass
class _Layer:
    """One batch-norm layer of one source, in torch names whatever the file's format."""

    name: str
    values: dict[str, Tensor]
    labels: dict[str, str]  # torch name -> the name the file uses (messages)
    flavor: str  # "torch" | "tf" | "keras"
    config: _Config
    steps: int | None = None
    steps_from: str | None = None

    def label(self, role: str) -> str:
        """The name the file uses (or would use) for a torch-named statistic."""
        if role in self.labels:
            return self.labels[role]
        return _TF_NAMES.get(role, role) if self.flavor in ("tf", "keras") else role


@dataclass
class _Source:
    label: str
    format: str
    layers: list[_Layer]
    findings: list[Finding] = field(default_factory=list)
    state: Mapping[str, Any] | None = None
    parsed: Any = None  # tf_import._Parsed


def _detect(path: Path) -> str:
    """``"tf"``, ``"keras"`` or ``"torch"`` (safetensors or torch.save), or raise."""
    text = str(path)
    if path.is_dir():
        if (path / "checkpoint").is_file() or (
            (path / "saved_model.pb").is_file() and (path / "variables").is_dir()
        ):
            return "tf"
        raise CheckpointError(
            f"{text!r} is a directory without a TensorFlow 'checkpoint' file; pass a checkpoint "
            "file, the prefix that Saver.save returned, or a directory holding a 'checkpoint' file"
        )
    prefix = re.sub(r"\.(index|data-\d+-of-\d+)$", "", text)
    if Path(prefix + ".index").is_file():
        return "tf"
    if not path.exists():
        raise CheckpointError(f"no such file: {text!r}")
    if not path.is_file():
        raise CheckpointError(f"{text!r} is not a regular file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{text!r} is empty (an interrupted write?)")
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic.startswith(b"\x89HDF\r\n\x1a\n"):
        return "keras"
    if magic.startswith(b"PK\x03\x04"):
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if "model.weights.h5" in archive.namelist():
                    return "keras"
        return "torch"
    if magic[:1] == b"\x80" or ckpt._safetensors_header(path) is not None:
        return "torch"
    raise CheckpointError(
        f"{text!r} has an unknown format: not safetensors, not a torch.save file, not a Keras "
        ".h5/.keras file, not a TensorFlow checkpoint (pass the prefix Saver.save returned)"
    )


def _read_source(target: StateLike, label: str | None = None) -> _Source:
    if isinstance(target, (str, os.PathLike)):
        path = Path(os.fspath(target))
        kind = _detect(path)
        if kind == "tf":
            where, variables = tf_import._read_tf_checkpoint(path)
            parsed = tf_import._parse_tf_variables(variables, where)
            return _from_parsed(parsed, "tf", label or str(path), {})
        if kind == "keras":
            parsed = tf_import._read_keras_file(path)
            return _from_parsed(parsed, "keras", label or str(path), _keras_configs(path))
        raw = ckpt._read(path)
        state, _, _ = ckpt._state_of(raw, None)
        return _from_torch_state(state, label or str(path), raw.format, raw.metadata)
    if isinstance(target, Mapping):
        name = label or "state"
        if target and all(
            isinstance(k, str) and not isinstance(v, Tensor) for k, v in target.items()
        ):
            arrays = {k: np.asarray(v) for k, v in target.items()}
            parsed = tf_import._parse_tf_variables(arrays, name)
            return _from_parsed(parsed, "tf", name, {})
        return _from_torch_state(target, name, "state", {})
    raise TypeError(
        "state must be a state dict, a {TF variable name: array} dict or a checkpoint path, "
        f"got {type(target).__name__}"
    )


def _saved_config(saved: Mapping[str, Any]) -> _Config:
    """A layer's configuration from bnkit.save's metadata (``layer_config``)."""
    momentum = saved.get("momentum")
    zero_debias = saved.get("zero_debias") or ""
    config = _Config(
        eps=float(saved.get("eps") or 1e-5),
        warmup=bool(saved.get("warmup", False)),
        zero_debias=str(zero_debias) if zero_debias in ("mean", "both") else "",
        tracks=bool(saved.get("track_running_stats", True)),
    )
    if momentum is None:
        config.cumulative = True
        config.decay_from = "the file's metadata, momentum=None"
    elif isinstance(momentum, (int, float)):
        config.decay = 1.0 - float(momentum)
        config.decay_from = f"the file's metadata, momentum {float(momentum):g}"
    return config


def _from_torch_state(
    state: Mapping[str, Any], label: str, fmt: str, metadata: Mapping[str, str]
) -> _Source:
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, Tensor)}
    saved = ckpt._saved_layers(metadata)
    by_module = ckpt._by_module(tensors)
    names = [prefix[:-1] for prefix in by_module]
    names += [name for name in saved if name not in names]
    layers: list[_Layer] = []
    affine_only: list[str] = []
    for name in names:
        entries = by_module.get(f"{name}." if name else "", {})
        has_stats = any(n in ckpt._STAT_NAMES for n in entries)
        meta = saved.get(name)
        if isinstance(meta, Mapping):
            config = _saved_config(meta)
        else:
            config = _Config(decay=0.9, decay_from="assumed: PyTorch's default momentum 0.1")
            one_d = [entries.get(n) for n in ("weight", "bias")]
            is_affine = (
                not has_stats
                and all(isinstance(t, Tensor) and t.dim() == 1 for t in one_d)
                and set(entries) <= {"weight", "bias"}
            )
            if is_affine:
                if not _BN_NAME.search(name.rsplit(".", 1)[-1]):
                    affine_only.append(name)
                    continue
                config.known = False
            elif not has_stats:
                continue
        if not config.tracks and not has_stats:
            continue
        nbt = entries.get("num_batches_tracked")
        steps = int(nbt.reshape(-1)[0]) if isinstance(nbt, Tensor) and nbt.numel() == 1 else None
        layers.append(
            _Layer(
                name,
                dict(entries),
                {},
                "torch",
                config,
                steps,
                "num_batches_tracked" if steps is not None else None,
            )
        )
    source = _Source(label, fmt, layers, state=state)
    source.findings.extend(
        f for f in ckpt._verify({}, None, None, metadata) if f.code == "newer-format"
    )
    if not layers and affine_only:
        source.findings.append(
            Finding(
                "info",
                "",
                "no-batch-norm",
                f"{label}: no batch-norm statistics found; {len(affine_only)} layer(s) have a 1-D "
                f"weight and bias only ({_few(affine_only)}): LayerNorm/GroupNorm, or batch "
                "norms saved without their buffers.",
                "pass the model (--model MODULE:FACTORY, or diagnose(model, state=...)) to tell",
                {"layers": affine_only},
            )
        )
    return source


def _few(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f", ... (+{len(items) - limit})" if len(items) > limit else "")


def _keras_configs(path: Path) -> dict[str, dict[str, Any]]:
    """``{Keras layer name: config}`` of the batch-norm layers a Keras file describes."""
    text: Any = None
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if "config.json" in archive.namelist():
                    text = archive.read("config.json").decode("utf-8")
        else:
            import h5py

            with h5py.File(str(path), "r") as handle:
                text = handle.attrs.get("model_config")
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        config = json.loads(text) if isinstance(text, str) else None
    except (OSError, ValueError, KeyError, ImportError):
        return {}
    found: dict[str, dict[str, Any]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            inner = node.get("config")
            if node.get("class_name") in tf_import._BN_CLASSES and isinstance(inner, dict):
                name = inner.get("name")
                if isinstance(name, str):
                    found[name] = inner
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return found


def _keras_init(value: Any) -> float | None:
    """A Keras initializer's constant (``"zeros"``, ``"ones"``, ``Constant(v)``), else None."""
    if value in ("zeros", "Zeros"):
        return 0.0
    if value in ("ones", "Ones"):
        return 1.0
    if isinstance(value, Mapping):
        name = value.get("class_name")
        if name in ("Zeros", "zeros"):
            return 0.0
        if name in ("Ones", "ones"):
            return 1.0
        inner = value.get("config")
        if name == "Constant" and isinstance(inner, Mapping):
            constant = inner.get("value")
            if isinstance(constant, (int, float)):
                return float(constant)
    return None


def _tf_config(name: str, flavor: str, keras: Mapping[str, Any] | None) -> _Config:
    leaf = name.rsplit("/", 1)[-1]
    config = _Config(eps=1e-3)
    if keras is not None:
        momentum = keras.get("momentum")
        if isinstance(momentum, (int, float)):
            config.decay = float(momentum)
            config.decay_from = f"the file's layer config, momentum {float(momentum):g}"
        epsilon = keras.get("epsilon")
        if isinstance(epsilon, (int, float)):
            config.eps = float(epsilon)
        for role, key, default in (
            ("running_mean", "moving_mean_initializer", 0.0),
            ("running_var", "moving_variance_initializer", 1.0),
            ("weight", "gamma_initializer", 1.0),
            ("bias", "beta_initializer", 0.0),
        ):
            if key in keras:
                init = _keras_init(keras[key])
                config.init[role] = math.nan if init is None else init
            else:
                config.init[role] = default
    if config.decay is None:
        if flavor == "keras" or _KERAS_LEAF.match(leaf):
            config.decay = 0.99
            config.decay_from = "assumed: the Keras/tf.layers default momentum 0.99"
        elif _SLIM_LEAF.match(leaf):
            config.decay = 0.999
            config.decay_from = "assumed: tf-slim's default decay 0.999"
    return config


def _raw_roles(count: int) -> list[str]:
    """Roles of a ``.weights.h5`` batch norm's unnamed variables, by their number."""
    tail = ["moving_mean", "moving_variance"]
    return {
        2: tail,
        3: ["?", *tail],
        4: ["gamma", "beta", *tail],
        7: ["gamma", "beta", *tail, "moving_stddev", "renorm_mean", "renorm_stddev"],
    }.get(count, [])


def _from_parsed(
    parsed: Any, flavor: str, label: str, keras_configs: Mapping[str, dict[str, Any]]
) -> _Source:
    layers: list[_Layer] = []
    maybe: list[str] = []
    for layer in parsed.layers:
        if layer.kind not in (tf_import._BN, tf_import._BN_MAYBE):
            continue
        arrays: dict[str, Any] = dict(layer.arrays)
        names: dict[str, str] = dict(layer.names)
        if layer.raw is not None:
            for role, (var_name, value) in zip(_raw_roles(len(layer.raw)), layer.raw, strict=False):
                if role != "?":
                    arrays[role] = value
                    names[role] = var_name
        leaf = layer.key.rsplit("/", 1)[-1]
        if layer.kind == tf_import._BN_MAYBE and not _BN_NAME.search(leaf):
            maybe.append(layer.key)
            continue
        values: dict[str, Tensor] = {}
        labels: dict[str, str] = {}
        for role, value in arrays.items():
            torch_role = _TF_ROLES.get(role)
            if torch_role is None:
                continue
            t = torch.from_numpy(np.array(value, dtype=np.float64))
            values[torch_role] = t.reshape(()) if role.endswith("local_step") else t.reshape(-1)
            labels[torch_role] = role
        keras = keras_configs.get(layer.label or "") or keras_configs.get(leaf)
        config = _tf_config(layer.key, flavor, keras)
        if "running_mean_biased" in values:
            config.zero_debias = "both" if "running_var_biased" in values else "mean"
        steps: int | None = None
        steps_from: str | None = None
        local = values.get("running_mean_local_step")
        if local is not None:
            steps, steps_from = round(float(local)), "local_step"
        elif parsed.step is not None:
            steps = int(parsed.step)
            steps_from = "optimizer iterations" if flavor == "keras" else "global_step"
        layers.append(_Layer(layer.key, values, labels, flavor, config, steps, steps_from))
    source = _Source(label, flavor, layers, parsed=parsed)
    if maybe:
        source.findings.append(
            Finding(
                "info",
                "",
                "possible-batch-norm",
                f"{label}: {len(maybe)} scope(s) have gamma/beta but no moving statistics and no "
                f"batch-norm name ({_few(maybe)}): LayerNorm-like layers, or batch norms saved "
                "without their statistics.",
                "if they are batch norms, save all global variables (tf.compat.v1.train.Saver() "
                "without var_list), or recalibrate after loading",
                {"scopes": maybe},
            )
        )
    return source


# -------------------------------------------------------------------- static checks


def _vector(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float64).reshape(-1)


def _channel_list(mask: Tensor, limit: int = 8) -> str:
    idx = mask.reshape(-1).nonzero().reshape(-1).tolist()
    shown = ", ".join(map(str, idx[:limit]))
    return f"channel{'s' if len(idx) > 1 else ''} {shown}{', ...' if len(idx) > limit else ''}"


def _equals(t: Tensor, init: Tensor | float) -> bool:
    if isinstance(init, Tensor):
        return t.shape == init.shape and bool(torch.equal(t, init.to(t)))
    return bool((t == init).all())


def _moved(t: Tensor | None, init: Tensor | float) -> float | None:
    """How far a parameter moved from its initial value, or None when it looks untrained.

    A constant vector counts as untrained whatever its value (``zeros_(bn.weight)``-style
    initializations are constants; training makes channels differ).
    """
    if t is None or t.numel() == 0 or not bool(torch.isfinite(t).all()):
        return None
    if isinstance(init, Tensor):
        distance = float((t - init.to(t)).abs().max())
        return distance if distance > 0 else None
    if t.numel() > 1 and bool((t == t[0]).all()):
        return None
    distance = float((t - init).abs().max())
    return distance if distance > 0 else None


def _init_text(value: Tensor | float) -> str:
    return "the layer's initial values" if isinstance(value, Tensor) else f"{value:g}"


def _initial_weight(decay: float, steps: int, warmup: bool) -> float:
    """The weight of the initial value after ``steps`` updates: ``decay**steps``, or with
    TF's ``num_updates`` warm-up ``Π_i min(decay, (1 + i) / (10 + i))``."""
    if not warmup:
        return float(decay**steps)
    weight = 1.0
    for i in range(steps):
        factor = min(decay, (1.0 + i) / (10.0 + i))
        if factor >= decay:
            return weight * decay ** (steps - i)
        weight *= factor
        if weight < 1e-300:
            return 0.0
    return weight


def _never_updated_fix(flavor: str) -> str:
    if flavor == "tf":
        cause = (
            "the batch-norm update ops never ran: build the train op under "
            "tf.control_dependencies(tf.compat.v1.get_collection(tf.compat.v1.GraphKeys."
            "UPDATE_OPS)) (slim.learning.create_train_op does) and feed is_training=True in "
            "training"
        )
    elif flavor == "keras":
        cause = (
            "the layer never ran in training mode (trainable=False, or called with "
            "training=False while the model trained)"
        )
    else:
        cause = (
            "the layer never ran in training mode while the model trained (model.eval() during "
            "training, momentum=0), or its statistics were reset or overwritten afterwards"
        )
    return f"{cause}; to repair this checkpoint, {_FIX_RECALIBRATE}"


def _check_layer(layer: _Layer, where: str, summary: LayerSummary) -> list[Finding]:
    """Every static check of one layer; fills ``summary``."""
    config = layer.config
    out: list[Finding] = []

    def add(severity: ckpt.Severity, code: str, message: str, fix: str, **evidence: Any) -> None:
        out.append(Finding(severity, layer.name, code, where + message, fix, evidence))

    vec = {
        role: _vector(t)
        for role, t in layer.values.items()
        if role in _VECTOR_ROLES and isinstance(t, Tensor) and t.is_floating_point()
    }
    lengths = {role: t.numel() for role, t in vec.items()}
    summary.channels = next(iter(lengths.values()), None)
    if len(set(lengths.values())) > 1:
        parts = ", ".join(f"{layer.label(r)} {n}" for r, n in lengths.items())
        add(
            "error",
            "shape-mismatch",
            f"the layer's per-channel tensors disagree on the number of channels: {parts}.",
            "the file is corrupt or mixes two layers; re-export it",
            lengths={layer.label(r): n for r, n in lengths.items()},
        )
        return out
    mean, var = vec.get("running_mean"), vec.get("running_var")
    weight, bias = vec.get("weight"), vec.get("bias")
    if mean is None or var is None:
        if config.tracks and (weight is not None or bias is not None or config.known):
            missing = [
                layer.label(s)
                for s, t in (("running_mean", mean), ("running_var", var))
                if t is None
            ]
            present = [layer.label(p) for p in ("weight", "bias") if p in vec]
            have = f" (its {' and '.join(present)} {'is' if len(present) == 1 else 'are'} there)"
            how = {
                "tf": "tf.compat.v1.train.Saver() saves every global variable; "
                "Saver(var_list=tf.trainable_variables()) leaves the moving statistics out",
                "keras": "save the whole model (model.save / save_weights), not only the "
                "trainable weights",
                "torch": "save model.state_dict() (bnkit.save does), not "
                "dict(model.named_parameters())",
            }[layer.flavor]
            fix = (
                f"the checkpoint was saved without the moving statistics: {how}; to repair "
                f"this checkpoint, {_FIX_RECALIBRATE}"
            )
            if not config.known:
                fix += (
                    ". If this is not a batch norm (or one with track_running_stats=False), "
                    "pass the model to tell"
                )
            add(
                "error" if config.known else "warning",
                "missing-statistics",
                f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
                f"{have if present else ''}: in eval mode the layer has nothing to normalize "
                "with.",
                fix,
                missing=missing,
                present=present,
            )
        return out

    bad: list[str] = []
    evidence: dict[str, Any] = {}
    for role, t in vec.items():
        nan, inf = torch.isnan(t), torch.isinf(t)
        if bool(nan.any() or inf.any()):
            counts = [
                f"{int(nan.sum())} NaN" if nan.any() else "",
                f"{int(inf.sum())} inf" if inf.any() else "",
            ]
            bad.append(
                f"{layer.label(role)} has {' and '.join(c for c in counts if c)} of {t.numel()} "
                f"values ({_channel_list(nan | inf)})"
            )
            evidence[layer.label(role)] = {"nan": int(nan.sum()), "inf": int(inf.sum())}
    if bad:
        add(
            "error",
            "non-finite",
            "; ".join(bad) + ": every output of those channels is NaN in eval mode.",
            "one non-finite batch poisoned the moving averages; "
            f"{_FIX_RECALIBRATE}; train with bnkit's default nonfinite='skip' policy so one bad "
            "batch cannot do it again",
            **evidence,
        )
    finite = bool(torch.isfinite(mean).all()) and bool(torch.isfinite(var).all())

    negative: list[str] = []
    neg_evidence: dict[str, Any] = {}
    for role in _NONNEGATIVE:
        stat = vec.get(role)
        if stat is not None and bool((stat < 0).any()):
            below = stat < 0
            lowest = float(stat[torch.isfinite(stat)].min())
            negative.append(
                f"{layer.label(role)} has {int(below.sum())} negative value(s) of "
                f"{stat.numel()} (min {lowest:.6g}; {_channel_list(below)})"
            )
            neg_evidence[layer.label(role)] = {"negative": int(below.sum()), "min": lowest}
    if negative:
        add(
            "error",
            "negative-variance",
            "; ".join(negative) + ": a variance is never negative (sqrt of it is NaN).",
            f"the checkpoint is corrupt or was edited; {_FIX_RECALIBRATE}",
            **neg_evidence,
        )
    if not finite:
        return out

    init_mean = config.init.get("running_mean", 0.0)
    init_var = config.init.get("running_var", 1.0)
    initial = _equals(mean, init_mean) and _equals(var, init_var)
    never = False
    if initial and config.decay != 1.0:
        reasons: list[str] = []
        ev: dict[str, Any] = {}
        if layer.steps is not None and layer.steps > 0:
            reasons.append(f"{layer.steps_from} is {layer.steps}")
            ev["steps"] = layer.steps
            ev["steps_from"] = layer.steps_from
        for role, default in (("weight", 1.0), ("bias", 0.0)):
            distance = _moved(vec.get(role), config.init.get(role, default))
            if distance is not None:
                reasons.append(f"{layer.label(role)} was trained (moved up to {distance:.3g})")
                ev[f"{layer.label(role)}_moved"] = distance
        if reasons:
            never = True
            add(
                "error",
                "never-updated",
                f"{layer.label('running_mean')} is exactly {_init_text(init_mean)} and "
                f"{layer.label('running_var')} exactly {_init_text(init_var)} in all "
                f"{mean.numel()} channels, their initial values, although "
                f"{' and '.join(reasons)}: the statistics never moved, and eval mode "
                "normalizes with the initial values instead of the data's statistics.",
                _never_updated_fix(layer.flavor),
                channels=mean.numel(),
                **ev,
            )

    if not initial and bool((var >= 0).all()):
        low, high = float(var.min()), float(var.max())
        if high <= TINY_VARIANCE:
            add(
                "warning",
                "degenerate-variance",
                f"{layer.label('running_var')} is at most {high:.3g} in all {var.numel()} "
                f"channels (threshold {TINY_VARIANCE:g}): the layer's input is constant, so it "
                f"divides by sqrt(eps) = {math.sqrt(config.eps):.3g} and amplifies noise.",
                "check what feeds the layer (dead ReLUs, a constant or zeroed input); if the "
                f"statistics are wrong, {_FIX_RECALIBRATE}",
                var_max=high,
                threshold=TINY_VARIANCE,
            )
        else:
            ratio = high / low if low > 0 else math.inf
            if ratio > CHANNEL_RATIO_LIMIT:
                small = var * CHANNEL_RATIO_LIMIT < high
                add(
                    "warning",
                    "degenerate-variance",
                    f"{layer.label('running_var')} ranges from {low:.3g} (channel "
                    f"{int(var.argmin())}) to {high:.3g} (channel {int(var.argmax())}), a ratio "
                    f"of {ratio:.3g} across channels (limit {CHANNEL_RATIO_LIMIT:g}); "
                    f"{int(small.sum())} channel(s) are (nearly) constant: {_channel_list(small)}.",
                    "channels with near-zero variance are dead or pruned, or their statistics are "
                    f"corrupt; if they should carry signal, {_FIX_RECALIBRATE}",
                    var_min=low,
                    var_max=high,
                    ratio=ratio,
                    channels=small.nonzero().reshape(-1).tolist(),
                )

    out.extend(_zero_debias_findings(layer, vec, where))

    debiased = {"mean": ("running_mean",), "both": ("running_mean", "running_var")}
    stats = [
        s for s in ("running_mean", "running_var") if s not in debiased.get(config.zero_debias, ())
    ]
    summary.cumulative = config.cumulative
    if layer.steps is not None and layer.steps > 0 and not never:
        weight_init: float | None = None
        if config.cumulative or not stats:
            weight_init = 0.0
        elif config.decay is not None:
            weight_init = _initial_weight(config.decay, layer.steps, config.warmup)
        summary.initial_weight = weight_init
        if (
            weight_init is not None
            and weight_init > INITIAL_WEIGHT_LIMIT
            and config.decay is not None
            and 0.0 < config.decay < 1.0
        ):
            d, steps = config.decay, layer.steps
            needed = math.ceil(math.log(INITIAL_WEIGHT_LIMIT) / math.log(d))
            suggested = INITIAL_WEIGHT_LIMIT ** (1.0 / steps)
            labels = " and ".join(layer.label(s) for s in stats)
            warm = " with warm-up" if config.warmup else ""
            message = (
                f"with decay {d:g}{warm} ({config.decay_from}) after {steps} updates "
                f"({layer.steps_from}), the initial value still weighs {weight_init:.1%} in "
                f"{labels} (decay^t; limit {INITIAL_WEIGHT_LIMIT:.0%}): the moving averages "
                "have not forgotten their start (mean 0, variance 1), so eval normalizes with "
                f"statistics pulled toward it. At this decay it takes {needed} updates to get "
                f"below {INITIAL_WEIGHT_LIMIT:.0%}."
            )
            if config.assumed:
                message = (
                    "the file does not record the decay; "
                    + message
                    + " Pass the real decay (--decay, diagnose(decay=...)) or the model to check."
                )
            add(
                "info" if config.assumed else "warning",
                "initial-dominated",
                message,
                f"{_FIX_RECALIBRATE}; for future runs of {steps} steps use decay <= "
                f"{math.floor(suggested * 1e4) / 1e4:g} (PyTorch momentum >= "
                f"{math.ceil((1 - suggested) * 1e4) / 1e4:g}), bnkit's warmup=True (TF's "
                "num_updates rule) or zero_debias (TF zero_debias_moving_mean=True)",
                decay=d,
                decay_from=config.decay_from,
                steps=steps,
                steps_from=layer.steps_from,
                initial_weight=weight_init,
                suggested_decay=suggested,
                updates_needed=needed,
            )

    skipped = layer.values.get("num_skipped_updates")
    if isinstance(skipped, Tensor) and skipped.numel() == 1 and int(skipped.reshape(-1)[0]) > 0:
        n = int(skipped.reshape(-1)[0])
        add(
            "info",
            "skipped-updates",
            f"the layer skipped {n} update(s) of its statistics because a batch had non-finite "
            "statistics (policy nonfinite='skip'); the statistics themselves were protected.",
            "look for NaN/inf in the inputs or activations of those training steps",
            skipped=n,
        )
    return out


def _zero_debias_findings(layer: _Layer, vec: Mapping[str, Tensor], where: str) -> list[Finding]:
    """``stat == biased / (1 - d^k)`` for the zero-debiased statistics of one layer."""
    config = layer.config
    out: list[Finding] = []
    for stat in ("running_mean", "running_var"):
        value, biased = vec.get(stat), vec.get(f"{stat}_biased")
        step_t = layer.values.get(f"{stat}_local_step")
        if value is None or biased is None or not isinstance(step_t, Tensor):
            continue
        if not (bool(torch.isfinite(value).all()) and bool(torch.isfinite(biased).all())):
            continue
        k = round(float(step_t.reshape(-1)[0]))
        names = (
            layer.label(stat),
            layer.label(f"{stat}_biased"),
            layer.label(f"{stat}_local_step"),
        )
        if k <= 0:
            if bool((biased != 0).any()):
                out.append(
                    Finding(
                        "warning",
                        layer.name,
                        "zero-debias-mismatch",
                        f"{where}{names[2]} is 0 but {names[1]} is not (max |{names[1]}| = "
                        f"{float(biased.abs().max()):.3g}): a shadow that never updated must be 0.",
                        "the shadow and its counter were saved or edited separately; recalibrate "
                        "(bnkit.recalibrate rewrites both consistently)",
                        {"local_step": k, "biased_max": float(biased.abs().max())},
                    )
                )
            continue
        scale = float(value.abs().max())
        usable = value.abs() > max(1e-6 * scale, 1e-30)
        if not bool(usable.any()):
            continue
        factors = biased[usable] / value[usable]
        candidates: list[float] = []
        if config.decay is not None and 0 < config.decay < 1 and not config.assumed:
            d = config.decay
            if config.warmup:
                n = (
                    layer.steps
                    if layer.steps is not None and layer.steps_from != "local_step"
                    else k
                )
                candidates = [min(d, n / (9.0 + n)), min(d, (1.0 + n) / (10.0 + n))]
            else:
                candidates = [d]
        lo, hi = float(factors.min()), float(factors.max())
        ev: dict[str, Any] = {"local_step": k, "factor_min": lo, "factor_max": hi}
        if candidates:
            expected = [1.0 - c**k for c in candidates]
            ok = any(
                float((factors - e).abs().max()) <= ZERO_DEBIAS_RTOL * max(abs(e), 1e-12)
                for e in expected
            )
            if ok:
                continue
            ev.update(decay=config.decay, expected_factor=expected[0])
            message = (
                f"{names[0]} should equal {names[1]} / (1 - decay^{names[2]}) with decay "
                f"{config.decay:g} ({config.decay_from}) and {names[2]} {k}, i.e. {names[1]} / "
                f"{names[0]} = {expected[0]:.6g}, but that ratio is {lo:.6g}..{hi:.6g} across "
                "channels."
            )
        else:
            spread = hi - lo
            if lo > 0 and hi <= 1 + 1e-6 and spread <= ZERO_DEBIAS_RTOL * max(abs(hi), 1e-12):
                continue
            ev["implied_decay"] = (1 - min(max(hi, 0.0), 1.0)) ** (1 / k) if hi < 1 else None
            message = (
                f"{names[1]} / {names[0]} must be the same number 1 - decay^{k} (between 0 and 1) "
                f"in every channel, but it is {lo:.6g}..{hi:.6g} (the decay is unknown; only "
                "this consistency can be checked)."
            )
        out.append(
            Finding(
                "warning",
                layer.name,
                "zero-debias-mismatch",
                where
                + message
                + " The next training step would jump: the shadow and the statistic disagree.",
                "the statistic and its zero-debias shadow were changed separately (edited, or "
                "recalibrated by a tool that ignores the shadow); recalibrate with "
                "bnkit.recalibrate (it rewrites both), or keep training so the shadow takes over",
                ev,
            )
        )
    return out


def _compare_ranks(sources: Sequence[_Source]) -> list[Finding]:
    """Layers, statistics and parameters across rank checkpoints."""
    out: list[Finding] = []
    by_rank = [{layer.name: layer for layer in s.layers} for s in sources]
    order = [layer.name for layer in sources[0].layers]
    union = list(dict.fromkeys(name for ranks in by_rank for name in ranks))
    partial = [name for name in union if not all(name in ranks for ranks in by_rank)]
    for name in partial:
        have = [i for i, ranks in enumerate(by_rank) if name in ranks]
        out.append(
            Finding(
                "warning",
                name,
                "rank-layers-differ",
                f"the layer is in rank checkpoint(s) {have} only, of {len(sources)}.",
                "the checkpoints come from different models or versions; compare like with like",
                {"ranks": have},
            )
        )
    for name in order:
        if name in partial:
            continue
        layers = [ranks[name] for ranks in by_rank]
        means, variances = [], []
        for layer in layers:
            m, v = layer.values.get("running_mean"), layer.values.get("running_var")
            if isinstance(m, Tensor) and isinstance(v, Tensor):
                means.append(_vector(m))
                variances.append(_vector(v))
        same_shape = len({t.shape for t in means + variances}) == 1
        if len(means) == len(layers) and same_shape:
            mean = torch.stack(means)
            var = torch.stack(variances)
            if bool(torch.isfinite(mean).all() and torch.isfinite(var).all() and (var >= 0).all()):
                eps = layers[0].config.eps
                scale = torch.sqrt(var.mean(0) + eps)
                spread = (mean.max(0).values - mean.min(0).values) / scale
                ratio = (var.max(0).values + eps) / (var.min(0).values + eps)
                worst_mean, worst_ratio = float(spread.max()), float(ratio.max())
                if worst_mean > RANK_MEAN_LIMIT or worst_ratio > RANK_VAR_RATIO_LIMIT:
                    c_mean, c_ratio = int(spread.argmax()), int(ratio.argmax())
                    out.append(
                        Finding(
                            "warning",
                            name,
                            "rank-disagreement",
                            f"the {len(layers)} ranks' statistics differ: the means spread by "
                            f"{worst_mean:.3g} pooled standard deviations (channel {c_mean}; "
                            f"limit {RANK_MEAN_LIMIT:g}) and the variances by a factor "
                            f"{worst_ratio:.3g} (channel {c_ratio}; limit "
                            f"{RANK_VAR_RATIO_LIMIT:g}): each process kept statistics of its "
                            "own shard, so the saved model depends on which rank saved it.",
                            "synchronize batch norm across processes (bnkit sync=True or "
                            "torch.nn.SyncBatchNorm), or keep DistributedDataParallel's "
                            "broadcast_buffers=True; to repair, recalibrate on the whole data "
                            "(bnkit.recalibrate pools every rank under torch.distributed)",
                            {
                                "mean_spread": worst_mean,
                                "mean_channel": c_mean,
                                "var_ratio": worst_ratio,
                                "var_channel": c_ratio,
                                "ranks": len(layers),
                            },
                        )
                    )
        for role in ("weight", "bias"):
            params = [layer.values.get(role) for layer in layers]
            if not all(isinstance(p, Tensor) for p in params):
                continue
            vectors = [_vector(p) for p in params if isinstance(p, Tensor)]
            if len({v.shape for v in vectors}) != 1:
                continue
            ref = vectors[0]
            size = max(float(ref.abs().max()) if ref.numel() else 0.0, 1e-12)
            diff = max(float((v - ref).abs().max()) for v in vectors[1:]) / size
            if diff > RANK_PARAM_RTOL:
                out.append(
                    Finding(
                        "warning",
                        name,
                        "rank-parameters-differ",
                        f"{layers[0].label(role)} differs across ranks by up to {diff:.3g} "
                        f"(relative; limit {RANK_PARAM_RTOL:g}): the replicas' parameters "
                        "diverged, which DistributedDataParallel never lets happen.",
                        "check that every rank runs the same optimizer steps on all-reduced "
                        "gradients (no rank-local parameter updates)",
                        {"relative_difference": diff, "parameter": layers[0].label(role)},
                    )
                )
    return out


# -------------------------------------------------------------------- model plumbing


class _ModelState:
    """Everything ``diagnose`` may change in a model, to put back in ``finally``."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = list(model.modules())
        self.modes = [m.training for m in self.modules]
        self.params = [(p, p.detach().clone()) for p in model.parameters()]
        self.buffers = [
            {
                name: (buf, None if buf is None or _is_lazy(buf) else buf.detach().clone())
                for name, buf in m._buffers.items()
            }
            for m in self.modules
        ]
        self.warned = [
            set(w) if isinstance(w := getattr(m, "_warned", None), set) else None
            for m in self.modules
        ]

    def restore(self) -> None:
        with torch.no_grad():
            for p, value in self.params:
                p.copy_(value)
            for module, saved in zip(self.modules, self.buffers, strict=True):
                for name in [n for n in module._buffers if n not in saved]:
                    del module._buffers[name]
                for name, (buf, copy) in saved.items():
                    if buf is not None and copy is not None:
                        buf.copy_(copy)
                    module._buffers[name] = buf
        for module, mode, warned in zip(self.modules, self.modes, self.warned, strict=True):
            module.training = mode
            current = getattr(module, "_warned", None)
            if warned is not None and isinstance(current, set):
                current.clear()
                current.update(warned)


def _is_lazy(t: Tensor) -> bool:
    return isinstance(t, (nn.parameter.UninitializedBuffer, nn.parameter.UninitializedParameter))


def _bn_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (BatchNorm, _BatchNorm))
        and isinstance(m._buffers.get("running_mean"), Tensor)
        and isinstance(m._buffers.get("running_var"), Tensor)
    ]


def _module_config(module: nn.Module) -> _Config:
    eps = float(getattr(module, "eps", 1e-5))
    config = _Config(eps=eps, tracks=bool(getattr(module, "track_running_stats", True)))
    momentum = getattr(module, "momentum", None)
    if momentum is None:
        config.cumulative = True
        config.decay_from = "the model, momentum=None: a cumulative average"
    else:
        config.decay = 1.0 - float(momentum)
        config.decay_from = f"the model, momentum {float(momentum):g}"
    if isinstance(module, BatchNorm):
        config.warmup = bool(module.warmup)
        config.zero_debias = str(module.zero_debias or "")
        inits = getattr(module, "_inits", {})
        for role in ("running_mean", "running_var", "weight", "bias"):
            value = ckpt._numeric_init(inits.get(role), module.num_features)
            if value is not None:
                config.init[role] = value
    return config


def _merge(layer: _Layer, module: nn.Module | None, decay: float | None) -> None:
    """Fill a layer's configuration: explicit decay > the file > the model > defaults."""
    config = layer.config
    if module is not None:
        from_model = _module_config(module)
        file_knows = config.decay_from is not None and not config.assumed
        if not file_knows:
            config.decay, config.decay_from = from_model.decay, from_model.decay_from
            config.cumulative = from_model.cumulative
            config.warmup = from_model.warmup
        if not config.zero_debias:
            config.zero_debias = from_model.zero_debias
        if layer.flavor == "torch":
            config.eps = from_model.eps
        for role, value in from_model.init.items():
            config.init.setdefault(role, value)
        config.tracks = from_model.tracks
        config.known = True
    if decay is not None:
        config.decay, config.decay_from = decay, "given (decay=)"
        config.cumulative = False


@dataclass
class _Link:
    """How a source was loaded into the model."""

    findings: list[Finding]
    modules: dict[str, nn.Module]  # layer name in the file -> module
    names: dict[str, str]  # layer name in the file -> module path


def _load_into(model: nn.Module, source: _Source) -> _Link:
    """Load a source into ``model`` as well as it fits (strict=False); say what did not."""
    named = dict(model.named_modules())
    if source.parsed is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = tf_import._load(model, source.parsed, None, False, "bnkit doctor")
        findings = [
            Finding(
                "warning",
                name if name != "<model>" else "",
                "not-loaded",
                f"no layer of {source.label} fits this module, so the data checks see the "
                "module's own values.",
                "name the scope with the module's tf_scope (bnkit.from_slim(scope=...)) or "
                "load it yourself with bnkit.load_tf_checkpoint(model, path, mapping=...)",
            )
            for name in report.unmatched_modules
        ]
        findings.extend(
            Finding(
                "warning",
                "",
                "import-problem",
                problem,
                "see bnkit.load_tf_checkpoint / bnkit.load_keras_weights",
            )
            for problem in report.problems
            if "no layer found" not in problem
            and not ("<- " in problem and ("missing" in problem or "initial values" in problem))
        )
        modules: dict[str, nn.Module] = {}
        names: dict[str, str] = {}
        for label, loaded in report.loaded.items():
            path = "" if label == "<model>" else label
            if path in named:
                modules[loaded.scope] = named[path]
                names[loaded.scope] = path
        return _Link(findings, modules, names)
    assert source.state is not None
    raw = {k: v for k, v in source.state.items() if isinstance(v, Tensor)}
    state, stripped = ckpt._strip_prefixes(
        ckpt._with_versions(raw.items(), ckpt._versions(source.state)), model
    )
    own = model.state_dict()
    skipped = {
        k
        for k, v in state.items()
        if isinstance(own.get(k), Tensor) and not _is_lazy(own[k]) and v.shape != own[k].shape
    }
    to_load = ckpt._with_versions(
        ((k, v) for k, v in state.items() if k not in skipped), ckpt._versions(state)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_state_dict(to_load, strict=False)
    bn_prefixes = [f"{n}." if n else "" for n, _ in _bn_modules(model)]
    owned = {k for k in state for p in bn_prefixes if k.startswith(p) and "." not in k[len(p) :]}
    findings = ckpt._key_findings(state, model, own, owned)
    mismatched: dict[str, list[str]] = {}
    for key in sorted(skipped & owned):
        module_name, _, local = key.rpartition(".")
        mismatched.setdefault(module_name, []).append(
            f"{local} has shape {tuple(state[key].shape)}, the model's has {tuple(own[key].shape)}"
        )
    findings.extend(
        Finding(
            "error",
            module_name,
            "shape-mismatch",
            "; ".join(parts) + " (not loaded).",
            ckpt._FIX_SHAPE,
        )
        for module_name, parts in mismatched.items()
    )
    prefix = stripped or ""
    modules = {}
    names = {}
    for name, module in model.named_modules():
        if isinstance(module, (BatchNorm, _BatchNorm)):
            file_name = prefix + name if name else prefix[:-1]
            modules[file_name] = module
            names[file_name] = name
    return _Link(findings, modules, names)


# ---------------------------------------------------------------------- data checks


def _replayable(data: Iterable[Any], num_batches: int | None) -> Iterable[Any]:
    """Data that can be iterated several times (an iterator is drawn into a list once)."""
    if iter(data) is data:
        return list(data if num_batches is None else itertools.islice(data, num_batches))
    if num_batches is None:
        return data
    return _Limited(data, num_batches)


class _Limited:
    def __init__(self, data: Iterable[Any], n: int) -> None:
        self.data, self.n = data, n

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.data), self.n)


def _call(model: nn.Module, batch: Any, forward: Forward | None) -> Any:
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    if isinstance(batch, Mapping):
        return model(**batch)
    raise TypeError(
        f"diagnose does not know how to feed a batch of type {type(batch).__name__} to the "
        "model (model(batch) for a tensor, model(batch[0]) for a tuple or list, model(**batch) "
        "for a dict). Fix: pass forward=lambda model, batch: ..."
    )


def _outputs(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value.detach().to(torch.float64)] if value.is_floating_point() else []
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _outputs(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _outputs(v)]
    return []


def _gap_terms(train: list[Tensor], other: list[Tensor]) -> tuple[float, float] | None:
    if not train or len(train) != len(other):
        return None
    if any(a.shape != b.shape for a, b in zip(train, other, strict=True)):
        return None
    num = sum(float(((a - b) ** 2).sum()) for a, b in zip(train, other, strict=True))
    den = sum(float((a**2).sum()) for a in train)
    return num, den


@dataclass
class _Dynamic:
    findings: list[Finding] = field(default_factory=list)
    stats: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)
    passed: set[str] = field(default_factory=set)
    batches: int = 0
    gap: float | None = None
    floor: float | None = None


def _run_dynamic(
    model: nn.Module, data: Iterable[Any], forward: Forward | None, num_batches: int | None
) -> _Dynamic:
    """The data checks; the caller restores the model afterwards."""
    result = _Dynamic()
    batches = _replayable(data, num_batches)
    layers = _bn_modules(model)
    trained_in_eval: dict[str, int] = {}
    armed = [False]

    def watcher(name: str, module: nn.Module) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not armed[0]:
                return
            training = kwargs.get("training")
            effective = mod.training if training is None else bool(training)
            if isinstance(mod, BatchNorm) and mod.frozen:
                effective = False
            if effective and not torch.is_grad_enabled():
                trained_in_eval[name] = trained_in_eval.get(name, 0) + 1

        return hook

    def train_mode_output(batch: Any) -> list[Tensor]:
        snapshot = [
            (m, dict(m._buffers), {k: v.clone() for k, v in m._buffers.items() if v is not None})
            for _, m in layers
        ]
        modes = [m.training for _, m in layers]
        try:
            for _, m in layers:
                m.training = True
            with torch.no_grad(), calibrating():
                return _outputs(_call(model, batch, forward))
        finally:
            with torch.no_grad():
                for (m, buffers, values), mode in zip(snapshot, modes, strict=True):
                    for name in [n for n in m._buffers if n not in buffers]:
                        del m._buffers[name]
                    for name, buf in buffers.items():
                        if buf is not None:
                            buf.copy_(values[name])
                        m._buffers[name] = buf
                    m.training = mode

    def eval_pass(watch: bool) -> tuple[int, float | None]:
        """Evaluation- and training-mode outputs of every batch: (batches, relative gap)."""
        num = den = 0.0
        count = 0
        comparable = True
        for batch in batches:
            count += 1
            model.eval()
            armed[0] = watch
            try:
                with torch.no_grad():
                    evaluated = _outputs(_call(model, batch, forward))
            finally:
                armed[0] = False
            terms = _gap_terms(train_mode_output(batch), evaluated)
            if terms is None:
                comparable = False
            else:
                num, den = num + terms[0], den + terms[1]
        if not comparable or den <= 0:
            return count, None
        return count, math.sqrt(num / den)

    handles = [m.register_forward_pre_hook(watcher(n, m), with_kwargs=True) for n, m in layers]
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result.batches, result.gap = eval_pass(watch=True)
            if result.batches == 0:
                raise ValueError(
                    "data yielded no batches. Fix: pass a non-empty iterable of batches (a "
                    "generator can be consumed only once)"
                )
            if layers:
                before = {
                    name: (_vector(_buffer(m, "running_mean")), _vector(_buffer(m, "running_var")))
                    for name, m in layers
                }
                model.eval()
                try:
                    calibration: CalibrationReport | None = recalibrate(
                        model, batches, forward=forward, progress=False
                    )
                except ValueError as e:
                    if "never called any" not in str(e):
                        raise
                    calibration = None
                if calibration is None:
                    result.findings.extend(_not_reached(name) for name, _ in layers)
                else:
                    _, result.floor = eval_pass(watch=False)
                    _stale(result, layers, before, calibration)
    finally:
        for handle in handles:
            handle.remove()
    for w in caught:
        if issubclass(w.category, BatchNormWarning) or str(w.message).startswith("recalibrate:"):
            continue
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    for name, count in trained_in_eval.items():
        result.findings.append(
            Finding(
                "warning",
                name,
                "no-grad-training",
                f"the layer ran in training mode under torch.no_grad() during an evaluation "
                f"forward ({count} call(s)): the model's or the forward function's code forces "
                "training mode (training=True, model.train()), so evaluation uses batch "
                "statistics and moves the running statistics.",
                "find the call that sets training mode inside evaluation (a layer called with "
                "training=True, model.train() in the forward); evaluate after model.eval()",
                {"calls": count, "seen": "during diagnose"},
            )
        )
    _gap_finding(result)
    return result


def _buffer(module: nn.Module, name: str) -> Tensor:
    buf = module._buffers[name]
    assert isinstance(buf, Tensor)
    return buf


def _not_reached(name: str) -> Finding:
    return Finding(
        "info",
        name,
        "not-reached",
        "the forward never called this layer with the data, so its statistics were not "
        "compared with the data's.",
        "pass forward= (a --data callable's batches the model takes) that runs the whole model, "
        "if it should",
    )


def _stale(
    result: _Dynamic,
    layers: list[tuple[str, nn.Module]],
    before: Mapping[str, tuple[Tensor, Tensor]],
    calibration: CalibrationReport,
) -> None:
    low_limit, high_limit = VAR_RATIO_LIMITS
    fewest: tuple[float, str] | None = None
    for name, module in layers:
        entry = calibration.layers.get(name)
        if entry is None or entry.status != "calibrated":
            if entry is not None and entry.status == "not reached":
                result.findings.append(_not_reached(name))
            continue
        mean_run, var_run = before[name]
        mean_pop = _vector(_buffer(module, "running_mean"))
        var_pop = _vector(_buffer(module, "running_var"))
        eps = float(getattr(module, "eps", 1e-5))
        shift = (mean_run - mean_pop).abs() / torch.sqrt(var_pop.clamp(min=0) + eps)
        ratio = (var_run + eps) / (var_pop.clamp(min=0) + eps)
        finite = bool(torch.isfinite(shift).all() and torch.isfinite(ratio).all())
        max_shift = float(shift.max()) if finite else math.inf
        rmin = float(ratio.min()) if finite else math.nan
        rmax = float(ratio.max()) if finite else math.nan
        result.stats[name] = (max_shift, rmin, rmax, entry.samples)
        if fewest is None or entry.samples < fewest[0]:
            fewest = (entry.samples, name)
        if not finite:
            continue  # the static checks report non-finite statistics
        if max_shift > MEAN_SHIFT_LIMIT or rmin < low_limit or rmax > high_limit:
            result.findings.append(
                Finding(
                    "warning",
                    name,
                    "stale-statistics",
                    f"the running statistics are far from the data's population statistics "
                    f"({entry.samples:g} values per channel, {entry.batches} batches): the mean "
                    f"is off by up to {max_shift:.3g} population standard deviations (channel "
                    f"{int(shift.argmax())}; limit {MEAN_SHIFT_LIMIT:g}) and running/population "
                    f"variance is {rmin:.3g}..{rmax:.3g} (channels {int(ratio.argmin())} and "
                    f"{int(ratio.argmax())}; limits {low_limit:g}..{high_limit:g}).",
                    f"{_FIX_RECALIBRATE}. If the data is not like the training data, this "
                    "measures a domain shift: recalibrate on data like what the model will see",
                    {
                        "mean_shift": max_shift,
                        "mean_channel": int(shift.argmax()),
                        "var_ratio_min": rmin,
                        "var_ratio_max": rmax,
                        "samples": entry.samples,
                        "batches": entry.batches,
                    },
                )
            )
        else:
            result.passed.add(name)
    if fewest is not None and fewest[0] < FEW_SAMPLES:
        result.findings.append(
            Finding(
                "info",
                fewest[1],
                "few-samples",
                f"the population statistics come from {fewest[0]:g} values per channel only "
                f"(fewer than {FEW_SAMPLES}): the data checks are noisy.",
                "pass more data (--num-batches, a larger --data)",
                {"samples": fewest[0]},
            )
        )


def _gap_finding(result: _Dynamic) -> None:
    gap, floor = result.gap, result.floor
    if gap is None:
        return
    if not math.isfinite(gap):
        result.findings.append(
            Finding(
                "warning",
                "",
                "train-eval-gap",
                "the evaluation-mode outputs are not finite while the training-mode outputs "
                "are: the running statistics hold NaN/inf or zero variances.",
                _FIX_RECALIBRATE,
                {"gap": str(gap)},
            )
        )
        return
    noise = 0.0 if floor is None else floor
    if gap > GAP_LIMIT and gap > GAP_FLOOR_FACTOR * noise:
        result.findings.append(
            Finding(
                "warning",
                "",
                "train-eval-gap",
                f"on the same {result.batches} batch(es), evaluation-mode outputs differ from "
                f"training-mode outputs by {gap:.1%} (relative L2; limit {GAP_LIMIT:.0%}); with "
                f"exact population statistics they differ by {_pct(floor)} (what batch "
                f"statistics alone cause; limit {GAP_FLOOR_FACTOR:g}x that): the running "
                "statistics make evaluation worse than it should be.",
                f"see the layers' stale-statistics findings; {_FIX_RECALIBRATE}",
                {"gap": gap, "floor": floor, "batches": result.batches},
            )
        )


# ---------------------------------------------------------------------------- diagnose


def diagnose(
    model: nn.Module | None = None,
    *,
    state: StateLike | None = None,
    states: Sequence[StateLike] | None = None,
    data: Iterable[Any] | None = None,
    forward: Forward | None = None,
    num_batches: int | None = None,
    decay: float | None = None,
) -> Report:
    r"""Check batch-norm statistics in a checkpoint, a state dict or a model; return a Report.

    Static checks (the statistics alone) run on ``state`` / every entry of ``states`` / the
    model's own state; with ``data`` (and a model) the model also runs on the data. Layers
    are named as the file names them (torch module paths, TF scopes such as
    ``conv1/BatchNorm``, Keras layer names); data findings name the model's module paths.
    Every check, its rule and its threshold: see the module docs and docs/doctor.md.

    The decay of the moving averages (for ``initial-dominated``) comes from ``decay=``, else
    the file (``bnkit.save`` metadata, Keras layer configs), else the model, else the
    framework's default (then the finding is informational only). The number of updates
    ``t`` comes from ``num_batches_tracked``, a zero-debias ``local_step``, TF's
    ``global_step`` or Keras' optimizer iterations.

    The model is never changed: a ``state`` is loaded into it (``strict=False``, TF/Keras
    files through :mod:`bnkit.tf_import`'s matching) only for the data checks, and every
    parameter, buffer, mode and warn-once memory is restored in ``finally``.

    Data checks (``data`` given), with every batch-norm layer's input pooled exactly as
    :func:`bnkit.recalibrate` pools it (training mode for the batch norms, evaluation mode
    for the rest of the model, so dropout stays off):

    * ``stale-statistics``: ``max_c |μ_run − μ_pop| / sqrt(σ²_pop + eps) > 0.5`` or
      ``(σ²_run + eps) / (σ²_pop + eps)`` outside ``[0.5, 2]``.
    * ``train-eval-gap``: on the same batches, ``g = ‖y_train − y_eval‖ / ‖y_train‖`` over
      all floating outputs; a warning when ``g > 0.2`` and ``g > 2 g_pop``, where ``g_pop``
      is the gap with population statistics in evaluation mode (the part batch statistics
      cause, which no statistics can remove).
    * ``no-grad-training``: a layer ran in training mode under ``torch.no_grad()`` in an
      evaluation forward, or warned about it (``BatchNormWarning``) before ``diagnose``.

    Args:
        model: the model; its own state is checked when no ``state``/``states`` is given.
        state: a checkpoint path (``.pt``/``.pth``, ``.safetensors``, a TF checkpoint prefix
            or directory, a Keras ``.h5``/``.keras`` file), a state dict, or a
            ``{TF variable name: array}`` dict.
        states: several of those: rank checkpoints, compared with each other (data checks
            use the first).
        data: an iterable of batches (needs ``model``); iterated several times (an iterator
            is drawn into a list first).
        forward: ``forward(model, batch) -> output``; default ``model(batch)`` for a tensor,
            ``model(batch[0])`` for a tuple/list, ``model(**batch)`` for a dict.
        num_batches: use at most this many batches.
        decay: the TF-convention decay (``1 - momentum``) of every layer, overriding what the
            file and the model say.

    Returns:
        A :class:`Report`.

    Raises:
        ValueError: nothing to check, ``data`` without ``model``, both ``state`` and
            ``states``, a ``decay`` outside ``[0, 1)``, or data that yields no batches.
        CheckpointError: a file that cannot be read or has an unknown format.
        ImportError: a TensorFlow checkpoint without TensorFlow installed.

    Example:
        >>> import torch, bnkit
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), bnkit.BatchNorm1d(8))
        >>> data = [torch.randn(64, 4) * 3 + 2 for _ in range(4)]   # never trained on
        >>> report = diagnose(model, data=data)
        >>> report.codes("error", "warning")
        ['stale-statistics', 'train-eval-gap']
        >>> _ = bnkit.recalibrate(model, data, progress=False)
        >>> diagnose(model, data=data).healthy
        True
    """
    if state is not None and states is not None:
        raise ValueError("pass state= (one checkpoint) or states= (rank checkpoints), not both")
    if data is not None and model is None:
        raise ValueError("the data checks run the model: pass model= with data=")
    if decay is not None and not (0.0 <= float(decay) < 1.0):
        raise ValueError(f"decay must be in [0, 1) (TF convention: 1 - momentum), got {decay!r}")
    if num_batches is not None and (isinstance(num_batches, bool) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    targets: list[StateLike] = [state] if state is not None else list(states or [])
    if model is None and not targets:
        raise ValueError("nothing to check: pass a model, a state or states")
    several = len(targets) > 1
    sources = [
        _read_source(t, f"rank {i} ({_name_of(t)})" if several else None)
        for i, t in enumerate(targets)
    ]
    snapshot = _ModelState(model) if model is not None else None
    report = Report()
    findings: list[Finding] = []
    try:
        link: _Link | None = None
        if model is not None:
            findings.extend(_warned_before(model))
            if sources:
                link = _load_into(model, sources[0])
                findings.extend(link.findings)
                for source in sources:
                    _align_with_model(source, link)
            else:
                own = model.state_dict()
                sources = [_from_torch_state(own, "model", "model", {})]
                link = _Link([], {}, {})
                for name, module in model.named_modules():
                    if isinstance(module, (BatchNorm, _BatchNorm)):
                        link.modules[name] = module
                        link.names[name] = name
                _align_with_model(sources[0], link)
        report.sources = [s.label for s in sources]
        summaries: dict[tuple[int, str], LayerSummary] = {}
        for index, source in enumerate(sources):
            findings.extend(source.findings)
            where = f"{source.label}: " if several else ""
            for layer in source.layers:
                module = link.modules.get(layer.name) if link is not None else None
                _merge(layer, module, decay)
                summary = LayerSummary(
                    layer.name,
                    source.label,
                    steps=layer.steps,
                    steps_from=layer.steps_from,
                    decay=layer.config.decay,
                    decay_from=layer.config.decay_from,
                )
                findings.extend(_check_layer(layer, where, summary))
                summaries[(index, layer.name)] = summary
                report.layers.append(summary)
        if several:
            findings.extend(_compare_ranks(sources))
        if not any(s.layers for s in sources) and not any(
            f.code == "no-batch-norm" for f in findings
        ):
            findings.append(
                Finding(
                    "info",
                    "",
                    "no-batch-norm",
                    "no batch-norm layers found: nothing to check.",
                    "nothing to do",
                )
            )
        if model is not None and data is not None:
            dynamic = _run_dynamic(model, data, forward, num_batches)
            findings.extend(dynamic.findings)
            report.batches = dynamic.batches
            report.train_eval_gap, report.gap_floor = dynamic.gap, dynamic.floor
            module_to_file = {v: k for k, v in (link.names if link else {}).items()}
            for name, (shift, rmin, rmax, samples) in dynamic.stats.items():
                file_name = module_to_file.get(name, name)
                row = summaries.get((0, file_name))
                if row is None:
                    row = LayerSummary(name, "model")
                    report.layers.append(row)
                row.mean_shift, row.var_ratio_min, row.var_ratio_max = shift, rmin, rmax
                row.samples = samples
            passed_files = {module_to_file.get(n, n) for n in dynamic.passed}
            findings = [_downgrade(f, passed_files) for f in findings]
    finally:
        if snapshot is not None:
            snapshot.restore()
    report.findings = sorted(findings, key=lambda f: _SEVERITY_ORDER[f.severity])
    return report


def _align_with_model(source: _Source, link: _Link) -> None:
    """With a model, its batch norms are the layers: drop name guesses that are not, add the
    ones a PyTorch file holds only the parameters of (or nothing at all)."""
    source.layers = [
        layer for layer in source.layers if layer.config.known or layer.name in link.modules
    ]
    if source.state is None:
        return
    present = {layer.name for layer in source.layers}
    by_module = ckpt._by_module(
        {k: v for k, v in source.state.items() if isinstance(k, str) and isinstance(v, Tensor)}
    )
    for name, module in link.modules.items():
        if name in present or not getattr(module, "track_running_stats", True):
            continue
        entries = by_module.get(f"{name}." if name else "", {})
        source.layers.append(_Layer(name, dict(entries), {}, "torch", _Config(), None, None))


def _name_of(target: StateLike) -> str:
    if isinstance(target, (str, os.PathLike)):
        return Path(os.fspath(target)).name
    return "state"


def _warned_before(model: nn.Module) -> list[Finding]:
    return [
        Finding(
            "warning",
            name,
            "no-grad-training",
            "the layer warned earlier in this process that it ran in training mode under "
            "torch.no_grad() (a forgotten model.eval() before evaluation or prediction): its "
            "running statistics absorbed that data and the outputs used batch statistics.",
            "call model.eval() before evaluating (model.train() after); to estimate statistics "
            "on purpose use bnkit.recalibrate or bnkit.policies.calibrating()",
            {"seen": "before diagnose"},
        )
        for name, module in model.named_modules()
        if isinstance(module, BatchNorm) and "no_grad_training" in module._warned
    ]


def _downgrade(finding: Finding, passed: set[str]) -> Finding:
    """A static ``initial-dominated`` warning for a layer the data check found accurate."""
    if finding.code != "initial-dominated" or finding.severity != "warning":
        return finding
    if finding.layer not in passed:
        return finding
    return Finding(
        "info",
        finding.layer,
        finding.code,
        finding.message
        + " The data check found the statistics close to the data's population statistics, "
        "so the stored values are usable.",
        finding.fix,
        {**finding.evidence, "confirmed_by_data": True},
    )


# ------------------------------------------------------------------------------ repair


def repair(
    model: nn.Module,
    data: Iterable[Any],
    out: PathLike,
    *,
    state: StateLike | None = None,
    forward: Forward | None = None,
    num_batches: int | None = None,
    progress: bool = False,
) -> CalibrationReport:
    """Load ``state`` into ``model``, recalibrate its statistics on ``data``, write ``out``.

    The model keeps the repaired statistics. ``out`` is written atomically: ``.safetensors``
    with :func:`bnkit.save` (with the layers' configuration), ``.pt``/``.pth`` with
    ``torch.save(model.state_dict())`` through a temporary file and one rename.

    Args:
        model: the model (changed: loaded and recalibrated).
        data: an iterable of batches.
        out: where to write (``.safetensors``, ``.pt`` or ``.pth``).
        state: the checkpoint to repair (as in :func:`diagnose`; loaded with
            ``strict=False``); None repairs the model as it is.
        forward: as in :func:`bnkit.recalibrate`.
        num_batches: use at most this many batches.
        progress: show recalibrate's progress bar.

    Returns:
        The :class:`bnkit.CalibrationReport` of the recalibration.

    Raises:
        ValueError: ``out`` has another suffix.

    Example:
        >>> import os, tempfile, torch, bnkit
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), bnkit.BatchNorm1d(3))
        >>> data = [torch.randn(32, 4) + 1 for _ in range(3)]
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = os.path.join(tmp, "fixed.safetensors")
        ...     calibration = repair(model, data, path)
        ...     diagnose(model, state=path, data=data).healthy
        True
    """
    target = Path(os.fspath(out))
    suffix = target.suffix.lower()
    if suffix not in (".safetensors", ".pt", ".pth"):
        raise ValueError(
            f"the repaired checkpoint {str(target)!r} must end in .safetensors (bnkit.save) or "
            ".pt/.pth (torch.save)"
        )
    if state is not None:
        _load_into(model, _read_source(state))
    report = recalibrate(model, _replayable(data, num_batches), forward=forward, progress=progress)
    if suffix == ".safetensors":
        ckpt.save(model, target)
    else:
        tensors = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        ckpt._atomic_write(target, lambda tmp: torch.save(tensors, tmp))
    return report


# --------------------------------------------------------------------------------- CLI


class _UsageError(Exception):
    """A command-line problem: exit status 2 with a one-line message."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bnkit doctor`` arguments."""
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="checkpoint(s): .pt/.pth, .safetensors, a TF checkpoint prefix or directory, a "
        "Keras .h5/.keras file; several = rank checkpoints, compared with each other",
    )
    parser.add_argument(
        "--model",
        metavar="MODULE:FACTORY",
        help="a function returning the nn.Module (path/to/file.py:make or package.module:make); "
        "the checkpoint is loaded into it for the data checks and --fix",
    )
    parser.add_argument(
        "--data",
        metavar="DATA",
        help="MODULE:CALLABLE returning an iterable of batches, or a tensor file (.pt, "
        ".safetensors, .npy) split into batches of --batch-size",
    )
    parser.add_argument("--batch-size", type=_positive, default=64, help="default 64")
    parser.add_argument("--num-batches", type=_positive, default=None, help="default: all")
    parser.add_argument(
        "--decay",
        type=float,
        default=None,
        help="the moving averages' decay (TF convention, 1 - momentum) when the file and the "
        "model do not say",
    )
    parser.add_argument(
        "--fix",
        metavar="OUT",
        help="recalibrate on --data and write the repaired checkpoint to OUT (.safetensors, "
        ".pt or .pth), then check it again",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from e
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def run_cli(args: argparse.Namespace) -> int:
    """Run ``bnkit doctor``: 0 healthy, 1 problems found, 2 usage or input error."""
    try:
        return _run(args)
    except Exception as e:  # every failure becomes one line on stderr, never a traceback
        if os.environ.get("BNKIT_DEBUG"):
            raise
        text = " ".join(str(e).split()) or type(e).__name__
        known = (_UsageError, CheckpointError, FileNotFoundError, ImportError, ValueError)
        prefix = "" if isinstance(e, known) else f"{type(e).__name__}: "
        print(f"bnkit doctor: error: {prefix}{text}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    paths: list[str] = list(args.paths)
    if args.data and not args.model:
        raise _UsageError("--data needs --model MODULE:FACTORY (the data checks run the model)")
    if args.fix and not (args.model and args.data):
        raise _UsageError("--fix needs --model MODULE:FACTORY and --data DATA to recalibrate")
    if args.fix and len(paths) > 1:
        raise _UsageError("--fix repairs one checkpoint; pass a single PATH")
    if args.decay is not None and not (0.0 <= args.decay < 1.0):
        raise _UsageError(
            f"--decay must be in [0, 1) (TF convention: 1 - momentum), got {args.decay}"
        )
    if args.fix and Path(args.fix).suffix.lower() not in (".safetensors", ".pt", ".pth"):
        raise _UsageError(f"--fix OUT must end in .safetensors, .pt or .pth, got {args.fix!r}")
    for path in paths:
        _detect(Path(path))  # an unreadable or unknown file fails before any model is built
    model = _make_model(args.model) if args.model else None
    data = _load_data(args.data, args.batch_size, args.num_batches, model) if args.data else None
    state_args: dict[str, Any] = {"state": paths[0]} if len(paths) == 1 else {"states": paths}
    before = diagnose(model, data=data, decay=args.decay, **state_args)
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    if not args.fix:
        if args.json:
            print(json.dumps(before.to_dict(), indent=2))
        else:
            print(before.render(color=color))
        return before.exit_code
    assert model is not None
    assert data is not None
    calibration = repair(model, data, args.fix, state=paths[0])
    after = diagnose(model, state=args.fix, data=data, decay=args.decay)
    if args.json:
        payload = {
            "schema": "bnkit.doctor.fix/1",
            "before": before.to_dict(),
            "fix": {
                "path": args.fix,
                "calibrated": calibration.calibrated,
                "batches": calibration.num_batches,
            },
            "after": after.to_dict(),
            "exit_code": after.exit_code,
        }
        print(json.dumps(payload, indent=2))
    else:
        print(before.render(color=color))
        print()
        print(
            f"--fix: recalibrated {len(calibration.calibrated)} batch-norm layer(s) on "
            f"{calibration.num_batches} batch(es) and wrote {args.fix}"
        )
        print()
        print(after.render(color=color))
    return after.exit_code


_imported: dict[str, Any] = {}


def _import_object(spec: str, what: str) -> Any:
    """``path/to/file.py:name`` or ``package.module:name`` -> the object."""
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise _UsageError(
            f"{what} must look like MODULE:NAME (file.py:make or pkg.mod:make), got {spec!r}"
        )
    if module_part.endswith(".py") or os.sep in module_part or "/" in module_part:
        file = Path(module_part).resolve()
        if not file.is_file():
            raise _UsageError(f"{what}: no such file {module_part!r}")
        key = str(file)
        module = _imported.get(key)
        if module is None:
            name = f"_bnkit_doctor_{re.sub(r'[^0-9a-zA-Z_]', '_', file.stem)}_{len(_imported)}"
            loader_spec = importlib.util.spec_from_file_location(name, file)
            if loader_spec is None or loader_spec.loader is None:
                raise _UsageError(f"{what}: cannot import {module_part!r}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.path.insert(0, str(file.parent))
            try:
                sys.modules[name] = module
                loader_spec.loader.exec_module(module)
            except Exception as e:
                sys.modules.pop(name, None)
                raise _UsageError(
                    f"{what}: importing {module_part!r} failed: {type(e).__name__}: {e}"
                ) from e
            finally:
                with contextlib.suppress(ValueError):
                    sys.path.remove(str(file.parent))
            _imported[key] = module
    else:
        try:
            module = importlib.import_module(module_part)
        except Exception as e:
            raise _UsageError(
                f"{what}: cannot import module {module_part!r}: {type(e).__name__}: {e}"
            ) from e
    try:
        return getattr(module, attr)
    except AttributeError as e:
        raise _UsageError(f"{what}: {module_part!r} has no {attr!r}") from e


def _make_model(spec: str) -> nn.Module:
    factory = _import_object(spec, "--model")
    if not callable(factory):
        raise _UsageError(f"--model: {spec!r} is not callable")
    try:
        model = factory()
    except Exception as e:
        raise _UsageError(f"--model: {spec} raised {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise _UsageError(f"--model: {spec} returned a {type(model).__name__}, not an nn.Module")
    return model


def _load_data(
    spec: str, batch_size: int, num_batches: int | None, model: nn.Module | None
) -> list[Any]:
    path = Path(spec)
    suffix = path.suffix.lower()
    if path.is_file() and suffix in (".pt", ".pth", ".safetensors", ".npy"):
        tensor = _read_tensor(path, suffix)
        if tensor.dim() == 0 or tensor.shape[0] == 0:
            raise _UsageError(f"--data: {spec!r} holds no samples (shape {tuple(tensor.shape)})")
        reference = next(iter(model.parameters()), None) if model is not None else None
        if tensor.is_floating_point() and reference is not None and reference.is_floating_point():
            tensor = tensor.to(reference.dtype)
        batches = list(torch.split(tensor, batch_size))
        if len(batches) > 1 and batches[-1].shape[0] < batch_size:
            batches.pop()  # like drop_last: a short last batch has other batch statistics
        return batches[:num_batches]
    if path.exists() and ":" not in spec:
        raise _UsageError(f"--data: {spec!r} is not a .pt, .pth, .safetensors or .npy file")
    if ":" not in spec:
        raise _UsageError(f"--data: no such file {spec!r} (or pass MODULE:CALLABLE)")
    make = _import_object(spec, "--data")
    try:
        produced = make() if callable(make) else make
        if not isinstance(produced, Iterable):
            raise _UsageError(f"--data: {spec} gave a {type(produced).__name__}, not an iterable")
        return list(itertools.islice(produced, num_batches))
    except _UsageError:
        raise
    except Exception as e:
        raise _UsageError(f"--data: {spec} raised {type(e).__name__}: {e}") from e


def _read_tensor(path: Path, suffix: str) -> Tensor:
    try:
        if suffix == ".npy":
            return torch.from_numpy(np.array(np.load(path, allow_pickle=False)))
        if suffix == ".safetensors":
            import safetensors.torch

            obj: Any = safetensors.torch.load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _UsageError(f"--data: cannot read {str(path)!r}: {type(e).__name__}: {e}") from e
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], Tensor):
        return obj[0]
    if isinstance(obj, Mapping):
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        for key in _TENSOR_KEYS:
            if key in tensors:
                return tensors[key]
        raise _UsageError(
            f"--data: {str(path)!r} holds several tensors ({', '.join(sorted(tensors))}); name "
            f"the input one of {', '.join(_TENSOR_KEYS)}, or pass MODULE:CALLABLE"
        )
    raise _UsageError(f"--data: {str(path)!r} holds a {type(obj).__name__}, not a tensor")
