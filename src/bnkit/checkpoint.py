"""Save and load models with their batch-norm statistics, safely, and check the statistics.

``save(model, path)`` writes a `safetensors <https://huggingface.co/docs/safetensors>`_ file
(tensors only, no code) atomically, with each batch-norm layer's configuration in the file's
metadata. ``load(model, path)`` reads safetensors files, and PyTorch ``.pt``/``.pth`` files
through ``torch.load(..., weights_only=True)`` only, so a checkpoint can never run code; it
checks every batch-norm layer's statistics *before* touching the model and refuses, naming
each broken layer and the fix, when they are missing, non-finite, negative, of the wrong
shape, or were never updated by training. ``verify(model_or_state)`` returns the same
findings without loading or raising.

Two classic batch-norm failures end here: statistics that were never saved
(``Saver(var_list=tf.trainable_variables())``, ``dict(model.named_parameters())``) and
statistics poisoned by one non-finite batch.

Example:
    >>> import os, tempfile, torch, bnkit
    >>> from bnkit.checkpoint import load, save, verify
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), bnkit.BatchNorm1d(3))
    >>> _ = model(torch.randn(8, 4))                      # one training step
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = os.path.join(tmp, "model.safetensors")
    ...     save(model, path)
    ...     report = load(model, path)
    >>> report.ok, report.format
    (True, 'safetensors')
    >>> verify(model)
    []
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import os
import pickle
import re
import secrets
import struct
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parameter import is_lazy

from bnkit import running
from bnkit.modules import LAZY_BUFFERS, BatchNorm
from bnkit.presets import KerasBatchNorm, SlimBatchNorm

__all__ = [
    "CheckpointError",
    "CheckpointWarning",
    "Finding",
    "LoadReport",
    "layer_config",
    "load",
    "read_metadata",
    "save",
    "verify",
]

Severity = Literal["error", "warning", "info"]
PathLike = str | os.PathLike[str]

#: Marker and version of bnkit's checkpoint metadata (``bnkit.format``/``bnkit.format_version``).
FORMAT = "bnkit.checkpoint"
FORMAT_VERSION = 1

# Buffers a bnkit layer creates only when needed (``frozen`` exists while the layer is
# frozen, ``num_skipped_updates`` after the first skipped non-finite update). A checkpoint
# may or may not hold them; neither is a missing or an unexpected key.
_OPTIONAL_BUFFERS = LAZY_BUFFERS
# bnkit statistics that the layer derives from running_mean/running_var when a checkpoint
# lacks them (a torch.nn checkpoint loaded into a bnkit layer with options).
_DERIVED_STATS = (
    "running_stddev",
    "renorm_mean",
    "renorm_stddev",
    "running_mean_biased",
    "running_mean_local_step",
    "running_var_biased",
    "running_var_local_step",
)
# Local names that mark a batch-norm layer in a bare state dict.
_STAT_NAMES = ("running_mean", "running_var", "num_batches_tracked", *_DERIVED_STATS)
_PER_CHANNEL = ("weight", "bias", *running.FLOAT_STAT_BUFFERS)
_COUNTERS = (*running.COUNTER_BUFFERS, *_OPTIONAL_BUFFERS)
_NONNEGATIVE = running.NONNEGATIVE_STAT_BUFFERS
# Wrappers that training scripts put around a state dict, in order of preference.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")
# Prefixes that DataParallel/DistributedDataParallel and torch.compile add to every key.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Configuration differences that change inference numerics are warnings; the rest only
# change training and are information.
_CONFIG_WARNINGS = ("eps", "axis")
_CONFIG_INFO = (
    "momentum",
    "running_var",
    "warmup",
    "zero_debias",
    "renorm",
    "virtual_batch_size",
    "ghost_layout",
)

_FIX_MISSING = (
    "the checkpoint was saved without buffers (model.parameters() only? TF "
    "Saver(var_list=trainable_variables())?): save model.state_dict() (bnkit.save does), or "
    "load with strict=False and recalibrate with bnkit.recalibrate(model, data)"
)
_FIX_RECALIBRATE = (
    "load with strict=False, then recompute the statistics with bnkit.recalibrate(model, data)"
)
_FIX_NONFINITE = (
    f"{_FIX_RECALIBRATE}; train with bnkit's default nonfinite='skip' policy so that one "
    "non-finite batch cannot poison the statistics again"
)
_FIX_NEVER_UPDATED = (
    "the layer counted training steps but its statistics never moved (updates not run, "
    "statistics overwritten, or not saved); " + _FIX_RECALIBRATE
)
_FIX_SHAPE = (
    "the checkpoint belongs to a different architecture (another num_features?): build the "
    "model with the checkpoint's sizes, or load with strict=False to skip these tensors"
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot or must not be loaded; the model was not changed.

    ``findings`` holds the problems that caused the refusal (empty when the file itself
    could not be read or is unsafe).
    """

    def __init__(self, message: str, findings: Iterable[Finding] = ()) -> None:
        super().__init__(message)
        self.findings: list[Finding] = list(findings)


class CheckpointWarning(UserWarning):
    """:func:`load` loaded a checkpoint with problems: errors (``strict=False``) or warnings."""


@dataclass(frozen=True)
class Finding:
    """One problem (or remark) about one layer's state.

    Attributes:
        severity: ``"error"`` (``load(strict=True)`` refuses), ``"warning"`` (loads, warns) or
            ``"info"``.
        layer: the module's path in the model (``"features.1"``; ``""`` for the root).
        code: a short stable id: ``"missing-statistics"``, ``"non-finite"``,
            ``"negative-variance"``, ``"never-updated"``, ``"shape-mismatch"``,
            ``"initial-statistics"``, ``"skipped-updates"``, ``"config-mismatch"``,
            ``"missing-keys"``, ``"unexpected-keys"``, ``"newer-format"``.
        message: what is wrong, with the numbers.
        fix: what to do about it.
        evidence: the numbers behind the finding, by name (JSON-safe values; ``bnkit
            doctor`` fills it, ``verify`` leaves it empty). Not part of equality.

    Example:
        >>> f = Finding("error", "bn1", "non-finite", "running_var has 1 NaN of 4 values", "...")
        >>> str(f)
        'bn1 [non-finite] error: running_var has 1 NaN of 4 values Fix: ...'
    """

    severity: Severity
    layer: str
    code: str
    message: str
    fix: str
    evidence: dict[str, Any] = field(default_factory=dict, compare=False)

    def __str__(self) -> str:
        return (
            f"{_display(self.layer)} [{self.code}] {self.severity}: {self.message} Fix: {self.fix}"
        )


class FindingsSummary:
    """``errors``, ``warnings``, ``notes`` and ``ok`` over a report's ``findings`` list."""

    findings: list[Finding]

    @property
    def errors(self) -> list[Finding]:
        """The findings of severity ``"error"``."""
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        """The findings of severity ``"warning"``."""
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def notes(self) -> list[Finding]:
        """The findings of severity ``"info"`` (they do not make a report unhealthy)."""
        return [f for f in self.findings if f.severity == "info"]

    @property
    def ok(self) -> bool:
        """True when nothing of severity error or warning was found."""
        return not any(f.severity in ("error", "warning") for f in self.findings)


@dataclass
class LoadReport(FindingsSummary):
    """What :func:`load` read and found.

    Attributes:
        path: the file that was read.
        format: ``"safetensors"`` or ``"torch"`` (``torch.load`` with ``weights_only=True``).
        wrapper_key: the key of the wrapper the state dict was found under (``"state_dict"``,
            ``"model"``, nested as ``"model.state_dict"``); None for a bare state dict.
        stripped_prefix: a prefix removed from every key (``"module."`` from
            DataParallel/DistributedDataParallel, ``"_orig_mod."`` from torch.compile).
        findings: problems and remarks (errors only with ``strict=False``).
        missing_keys, unexpected_keys: as ``torch.nn.Module.load_state_dict`` reports them.
        skipped_keys: tensors not loaded because their shape differs from the model's.
        metadata: the safetensors file's string metadata (empty for ``.pt`` files).
        layers: the batch-norm configurations that ``save`` recorded, by layer path.
        bnkit_version: the bnkit version that wrote the file, if it was bnkit.
    """

    path: str
    format: Literal["safetensors", "torch"]
    wrapper_key: str | None = None
    stripped_prefix: str | None = None
    findings: list[Finding] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    skipped_keys: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    bnkit_version: str | None = None

    def __str__(self) -> str:
        lines = [f"loaded {self.path} ({self.format})"]
        if self.wrapper_key:
            lines.append(f"  state dict taken from the {self.wrapper_key!r} entry")
        if self.stripped_prefix:
            lines.append(f"  removed the key prefix {self.stripped_prefix!r}")
        for name, keys in (
            ("missing keys", self.missing_keys),
            ("unexpected keys", self.unexpected_keys),
            ("skipped (shape mismatch)", self.skipped_keys),
        ):
            if keys:
                lines.append(f"  {name}: {', '.join(keys)}")
        lines.extend(f"  {finding}" for finding in self.findings)
        return "\n".join(lines)


# --------------------------------------------------------------------------- helpers


def _display(layer: str) -> str:
    return layer if layer else "<root>"


def _is_bn(module: nn.Module) -> bool:
    """bnkit layers and torch's batch/instance norms (``_NormBase``)."""
    return isinstance(module, (BatchNorm, _NormBase))


def _attr(module: nn.Module, name: str, default: Any = None) -> Any:
    try:
        return getattr(module, name)
    except Exception:  # properties of half-built or foreign layers may raise anything
        return default


def _jsonable(value: Any) -> Any:
    """A JSON-safe rendering: callables by name, non-finite floats and others as strings."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value)
    if callable(value) and not isinstance(value, nn.Module):
        name = getattr(value, "__qualname__", None) or getattr(value, "__name__", None)
        module = getattr(value, "__module__", None)
        if name:
            return f"{module}.{name}" if module else str(name)
    return repr(value)


def layer_config(module: nn.Module) -> dict[str, Any]:
    """A batch-norm layer's configuration as JSON-safe values (what ``save`` records).

    Attributes are read defensively, so bnkit layers, their subclasses (the presets) and
    ``torch.nn`` batch norms all work; options a layer does not have get bnkit's defaults.

    Example:
        >>> cfg = layer_config(torch.nn.BatchNorm2d(4, eps=1e-3))
        >>> cfg["class"], cfg["num_features"], cfg["eps"], cfg["running_var"]
        ('torch.nn.modules.batchnorm.BatchNorm2d', 4, 0.001, 'unbiased')
    """
    cls = type(module)
    weight = _attr(module, "weight")
    bias = _attr(module, "bias")
    stats = _attr(module, "running_mean")
    reference = weight if isinstance(weight, Tensor) else stats
    preset = None
    if isinstance(module, SlimBatchNorm):
        preset = "tf_slim"
    elif isinstance(module, KerasBatchNorm):
        preset = "tf_keras"
    config: dict[str, Any] = {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "num_features": _attr(module, "num_features"),
        "axis": _attr(module, "axis", 1),
        "eps": _attr(module, "eps"),
        "momentum": _attr(module, "momentum"),
        "center": _attr(module, "center", isinstance(bias, Tensor)),
        "scale": _attr(module, "scale", isinstance(weight, Tensor)),
        "track_running_stats": _attr(module, "track_running_stats", True),
        "running_var": _attr(module, "running_var_mode", "unbiased"),
        "warmup": _attr(module, "warmup", False),
        "zero_debias": _attr(module, "zero_debias", False),
        "renorm": _attr(module, "renorm", False),
        "renorm_momentum": _attr(module, "renorm_momentum"),
        "renorm_clipping": _attr(module, "renorm_clipping"),
        "virtual_batch_size": _attr(module, "virtual_batch_size"),
        "ghost_layout": _attr(module, "ghost_layout", "contiguous"),
        "activation": _attr(module, "activation"),
        "adjustment": _attr(module, "adjustment"),
        "preset": preset,
        "frozen": bool(_attr(module, "frozen", False)),
        "dtype": reference.dtype if isinstance(reference, Tensor) else None,
    }
    for name in ("tf_scope", "fused", "trainable", "policy"):
        value = _attr(module, name)
        if value is not None:
            config[name] = value
    return {k: _jsonable(v) for k, v in config.items()}


def _model_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{key prefix: layer}`` for every batch-norm layer, under every name it has."""
    return {
        (f"{name}." if name else ""): module
        for name, module in model.named_modules(remove_duplicate=False)
        if _is_bn(module)
    }


def _versions(state: Mapping[str, Any]) -> dict[str, Any]:
    metadata = getattr(state, "_metadata", None)
    return dict(metadata) if isinstance(metadata, Mapping) else {}


def _with_versions(
    items: Iterable[tuple[str, Any]], versions: Mapping[str, Any]
) -> OrderedDict[str, Any]:
    out: OrderedDict[str, Any] = OrderedDict(items)
    if versions:
        out._metadata = OrderedDict(versions)  # type: ignore[attr-defined]
    return out


# ------------------------------------------------------------------------------ save


def _prepare_tensors(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """Detached CPU tensors that safetensors accepts: dense, contiguous, no shared memory.

    safetensors refuses tensors whose memory overlaps (tied weights, a module registered
    under two names) and non-contiguous ones; such tensors are copied, so each key is
    stored on its own. Ties are a property of the model, not of the file: loading copies
    the same values into the shared tensor under each of its names.
    """
    out: dict[str, Tensor] = {}
    kept: dict[tuple[str, int], list[tuple[int, int]]] = {}  # storage -> sorted byte ranges
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(
                f"state entry {key!r} is a {type(value).__name__}, not a tensor; safetensors "
                "stores tensors only (a module's get_extra_state?). Fix: save the extra state "
                "separately, or drop the entry from the state dict before bnkit.save"
            )
        if is_lazy(value):
            raise CheckpointError(
                f"{key!r} belongs to a lazy module that has not been initialized; run one "
                "forward pass before saving"
            )
        if value.device.type == "meta":
            raise CheckpointError(f"{key!r} is on the meta device and has no data to save")
        t = value.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.to("cpu").contiguous()
        if t.numel() > 0:
            storage = (str(t.device), t.untyped_storage().data_ptr())
            start = t.data_ptr()
            end = start + t.numel() * t.element_size()
            ranges = kept.setdefault(storage, [])
            i = bisect.bisect_left(ranges, (start, end))
            overlaps = (i > 0 and ranges[i - 1][1] > start) or (
                i < len(ranges) and ranges[i][0] < end
            )
            if overlaps:
                t = t.clone()
            else:
                ranges.insert(i, (start, end))
        out[key] = t
    return out


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    """Persist a rename; POSIX only (Windows cannot open a directory, and needs no fsync)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not support fsync on directories
        pass
    finally:
        os.close(fd)


def _atomic_write(target: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same directory, then rename over ``target``.

    The temporary file is flushed to disk (fsync) before ``os.replace``, which is atomic on
    POSIX and Windows; the directory is synced after the rename where the platform allows.
    If anything fails (or is interrupted), the temporary file is removed and ``target`` is
    left as it was.
    """
    directory = target.parent
    tmp = directory / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # O_EXCL: never clobber anything; mode 0o666 minus the umask, like an ordinary file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    os.close(fd)
    try:
        write(tmp)
        _fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def save(model: nn.Module | Mapping[str, Tensor], path: PathLike) -> None:
    """Save a model's state (parameters and buffers) as a safetensors file, atomically.

    The file holds ``model.state_dict()`` (every batch-norm statistic included) and string
    metadata: ``format="pt"``, ``bnkit.format``, ``bnkit.format_version``, ``bnkit.version``,
    ``torch.version``, ``bnkit.layers`` (JSON: each batch-norm layer's configuration by path,
    see :func:`layer_config`) and ``torch.module_versions`` (JSON: the state dict's module
    versions, restored on load).

    The write is atomic: the data goes to a temporary file in the same directory, is
    flushed to disk, and replaces ``path`` in one rename; a crash or an error mid-way leaves
    the previous file intact and no temporary file behind.

    Tensors that share memory (tied weights, a module registered under two names) are
    stored once per key, and non-contiguous tensors contiguously: safetensors refuses
    both, and loading puts the same values back into the shared tensor.

    Args:
        model: a module, or a state dict of tensors (then no layer configuration is recorded).
        path: where to write, conventionally ``*.safetensors``.

    Raises:
        ValueError: ``path`` ends in ``.pt``/``.pth`` (``torch.load`` cannot read the file).
        CheckpointError: the state holds something other than dense tensors, or an
            uninitialized lazy module.

    Example:
        >>> import os, tempfile, torch, bnkit
        >>> bn = bnkit.BatchNorm2d(3)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = os.path.join(tmp, "bn.safetensors")
        ...     save(bn, path)
        ...     json.loads(read_metadata(path)["bnkit.layers"])[""]["num_features"]
        3
    """
    target = Path(os.fspath(path))
    if target.suffix.lower() in (".pt", ".pth"):
        raise ValueError(
            f"bnkit.save writes safetensors, but {str(target)!r} ends in {target.suffix}, the "
            "suffix of torch.save files (torch.load cannot read safetensors). Fix: name the "
            "file *.safetensors"
        )
    import bnkit  # the package's __version__; imported here to avoid an import cycle

    if isinstance(model, nn.Module):
        state: Mapping[str, Any] = model.state_dict()
        layers = {prefix[:-1]: layer_config(m) for prefix, m in _model_layers(model).items()}
    else:
        state, layers = model, {}
    tensors = _prepare_tensors(state)
    metadata = {
        "format": "pt",
        "bnkit.format": FORMAT,
        "bnkit.format_version": str(FORMAT_VERSION),
        "bnkit.version": bnkit.__version__,
        "torch.version": str(torch.__version__),
        "bnkit.layers": json.dumps(layers, sort_keys=True),
        "torch.module_versions": json.dumps(_jsonable(_versions(state)), sort_keys=True),
    }
    _atomic_write(target, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata))


# ------------------------------------------------------------------------------ read


@dataclass
class _Source:
    path: str
    format: Literal["safetensors", "torch"]
    obj: Any
    metadata: dict[str, str]


def _safetensors_header(path: Path) -> dict[str, Any] | None:
    """The JSON header of a safetensors file, or None when the file is not one."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return None
        (length,) = struct.unpack("<Q", prefix)
        if length < 2 or length > 100_000_000:
            return None
        raw = f.read(length)
    if len(raw) < length or raw[:1] != b"{":
        return None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return header if isinstance(header, dict) else None


def read_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (``{}`` when it has none).

    Raises:
        CheckpointError: the file is not a safetensors file.
    """
    header = _safetensors_header(Path(os.fspath(path)))
    if header is None:
        raise CheckpointError(f"{os.fspath(path)!r} is not a safetensors file")
    metadata = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()}


def _refusal_detail(error: BaseException) -> str:
    """The part of torch's weights_only error that says what was refused, on one line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    found = re.search(r"[^\n]*unsupported[^\n]*", text, re.IGNORECASE)
    detail = found.group(0) if found else text
    return " ".join(detail.split())


def _read(path: PathLike) -> _Source:
    """Read a checkpoint without ever running code from it."""
    p = Path(os.fspath(path))
    with open(p, "rb") as f:
        magic = f.read(8)
    if not magic:
        raise CheckpointError(f"{str(p)!r} is empty (an interrupted write?)")
    is_torch = magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"
    header = None if is_torch else _safetensors_header(p)
    if header is not None:
        try:
            tensors = safetensors.torch.load_file(p, device="cpu")
        except Exception as e:
            raise CheckpointError(
                f"{str(p)!r} has a safetensors header but its data cannot be read ({e}); the "
                "file is probably truncated or corrupt"
            ) from e
        metadata = {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}
        return _Source(str(p), "safetensors", tensors, metadata)
    if not is_torch:
        raise CheckpointError(
            f"{str(p)!r} is neither a safetensors file nor a torch.save file (zip or pickle); "
            "bnkit.load reads those two formats"
        )
    try:
        with warnings.catch_warnings():
            # Plain pickles of newer protocols trigger a harmless note from torch.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(f"{str(p)!r} is a corrupt pickle: {e}") from e
        raise CheckpointError(
            f"refused to load {str(p)!r}: it holds objects other than tensors and plain "
            f"containers, and unpickling them could run arbitrary code ({_refusal_detail(e)}). "
            "bnkit.load only uses torch.load(..., weights_only=True). Fix: if, and only if, you "
            "trust the file's origin, read it yourself with torch.load(path, weights_only=False) "
            "and re-save the state dict with bnkit.save(model, 'model.safetensors')"
        ) from e
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(
            f"{str(p)!r} cannot be read by torch.load ({e}); it is probably truncated or corrupt"
        ) from e
    return _Source(str(p), "torch", obj, {})


def _has_tensors(value: Any) -> bool:
    return isinstance(value, Mapping) and any(isinstance(v, Tensor) for v in value.values())


def _unwrap(obj: Any, path: str) -> tuple[Mapping[str, Any], str | None]:
    """The state dict inside a checkpoint and the wrapper key it was found under."""
    found: list[str] = []
    current = obj
    for _ in range(3):
        if not isinstance(current, Mapping):
            break
        key = next((k for k in _WRAPPER_KEYS if _has_tensors(current.get(k))), None)
        if key is None:
            key = next((k for k in _WRAPPER_KEYS if isinstance(current.get(k), Mapping)), None)
            if key is None or _has_tensors(current):
                break
        found.append(key)
        current = current[key]
    if _has_tensors(current):
        return current, ".".join(found) or None
    top = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(
        f"found no state dict in {path!r} (top level: {top}). bnkit.load expects a mapping "
        f"of tensors, or one under a wrapper key ({', '.join(_WRAPPER_KEYS)})"
    )


def _state_of(
    source: _Source, model: nn.Module | None
) -> tuple[OrderedDict[str, Any], str | None, str | None]:
    """A checkpoint's state dict (module versions restored), wrapper key and stripped prefix."""
    raw, wrapper = _unwrap(source.obj, source.path)
    versions = _versions(raw) or _restored_versions(source.metadata)
    state = _with_versions(raw.items(), versions)
    if model is None:
        return state, wrapper, None
    state, stripped = _strip_prefixes(state, model)
    return state, wrapper, stripped


def _strip_prefixes(
    state: Mapping[str, Any], model: nn.Module
) -> tuple[OrderedDict[str, Any], str | None]:
    """Remove DataParallel's ``module.``/torch.compile's ``_orig_mod.`` that the model lacks."""
    versions = _versions(state)
    own = list(model.state_dict())
    stripped = ""
    keys = list(state)
    while True:
        prefix = next(
            (
                p
                for p in _WRAPPER_PREFIXES
                if keys
                and all(k.startswith(p) for k in keys)
                and not any(k.startswith(p) for k in own)
            ),
            None,
        )
        if prefix is None:
            break
        stripped += prefix
        keys = [k[len(prefix) :] for k in keys]
    if not stripped:
        return _with_versions(state.items(), versions), None
    n = len(stripped)
    renamed_versions = {
        (k[n:] if k.startswith(stripped) else k[n - 1 :] if k == stripped[:-1] else k): v
        for k, v in versions.items()
    }
    return _with_versions(((k[n:], v) for k, v in state.items()), renamed_versions), stripped


# ---------------------------------------------------------------------------- verify


@dataclass
class _LayerSpec:
    """What a batch-norm layer expects, from the model (or from the state alone)."""

    tracks: bool = True
    shapes: dict[str, torch.Size] | None = None
    init: dict[str, Tensor] = field(default_factory=dict)
    momentum_zero: bool = False
    optional: tuple[str, ...] = ()
    derivable: tuple[str, ...] = ()


def _numeric_init(value: Any, num_features: int) -> Tensor | None:
    """A layer's ``*_init`` as a tensor when it is a number or per-channel values."""
    if value is None or (callable(value) and not isinstance(value, Tensor)):
        return None
    try:
        t = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        return None
    if t.numel() not in (1, num_features):
        return None
    return t.expand(num_features)


def _spec_for(module: nn.Module, own: Mapping[str, Any]) -> _LayerSpec:
    num_features = _attr(module, "num_features")
    shapes = {
        name: value.shape
        for name, value in own.items()
        if isinstance(value, Tensor) and not is_lazy(value)
    }
    init: dict[str, Tensor] = {}
    inits = _attr(module, "_inits")
    if isinstance(num_features, int) and isinstance(inits, Mapping):
        for stat in ("running_mean", "running_var", "weight", "bias"):
            value = _numeric_init(inits.get(stat), num_features)
            if value is not None:
                init[stat] = value
    bnkit_layer = isinstance(module, BatchNorm)
    return _LayerSpec(
        tracks=bool(_attr(module, "track_running_stats", True)),
        shapes=shapes,
        init=init,
        momentum_zero=_attr(module, "momentum") == 0,
        optional=_OPTIONAL_BUFFERS if bnkit_layer else (),
        derivable=_DERIVED_STATS if bnkit_layer else (),
    )


def _channels(mask: Tensor) -> str:
    idx = mask.reshape(-1).nonzero().reshape(-1).tolist()
    shown = ", ".join(map(str, idx[:8]))
    return f"channel{'s' if len(idx) > 1 else ''} {shown}{', …' if len(idx) > 8 else ''}"


def _shape(shape: torch.Size) -> str:
    return str(tuple(shape))


def _all_equal(t: Tensor, value: Tensor | float) -> bool:
    if isinstance(value, Tensor):
        return bool(torch.equal(t.detach().to(torch.float64).reshape(-1), value))
    return bool((t == value).all())


def _check_layer(layer: str, entries: Mapping[str, Any], spec: _LayerSpec) -> list[Finding]:
    """Every check of one batch-norm layer's entries (``{local name: value}``)."""
    findings: list[Finding] = []

    def add(severity: Severity, code: str, parts: list[str], fix: str) -> None:
        if parts:
            findings.append(Finding(severity, layer, code, "; ".join(parts) + ".", fix))

    # Shapes first: a tensor of the wrong shape is not checked further.
    bad_shape: list[str] = []
    valid: dict[str, Tensor] = {}
    channels: int | None = None
    if spec.shapes is None:
        for name in ("running_mean", "weight", "running_var", "bias"):
            value = entries.get(name)
            if isinstance(value, Tensor) and value.dim() == 1:
                channels = value.shape[0]
                break
    for name, value in entries.items():
        if not isinstance(value, Tensor):
            bad_shape.append(f"{name} is a {type(value).__name__}, not a tensor")
            continue
        expected: torch.Size | None = None
        if spec.shapes is not None:
            expected = spec.shapes.get(name)
            if expected is None and name in (*spec.optional, *spec.derivable):
                expected = torch.Size([]) if name in _COUNTERS else None
        elif name in _PER_CHANNEL and channels is not None:
            expected = torch.Size([channels])
        elif name in _COUNTERS:
            expected = torch.Size([])
        if expected is not None and value.shape != expected:
            bad_shape.append(f"{name} has shape {_shape(value.shape)}, expected {_shape(expected)}")
            continue
        valid[name] = value
    add("error", "shape-mismatch", bad_shape, _FIX_SHAPE)

    if spec.tracks:
        missing = [s for s in ("running_mean", "running_var") if s not in entries]
        if missing:
            others = [n for n in ("weight", "bias") if n in entries]
            where = (
                f" (its {' and '.join(others)} are there)"
                if others
                else " (nothing of this layer is in the state)"
            )
            add(
                "error",
                "missing-statistics",
                [f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing{where}"],
                _FIX_MISSING,
            )

    nonfinite: list[str] = []
    for name, t in valid.items():
        if t.is_floating_point() or t.is_complex():
            nan = torch.isnan(t)
            inf = torch.isinf(t)
            n_nan, n_inf = int(nan.sum()), int(inf.sum())
            if n_nan or n_inf:
                counts = " and ".join(
                    s
                    for s in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} inf" if n_inf else "")
                    if s
                )
                nonfinite.append(
                    f"{name} has {counts} of {t.numel()} values ({_channels(nan | inf)})"
                )
    add("error", "non-finite", nonfinite, _FIX_NONFINITE)

    negative: list[str] = []
    for name in _NONNEGATIVE:
        stat = valid.get(name)
        if stat is not None and stat.is_floating_point():
            below = stat < 0
            if bool(below.any()):
                negative.append(
                    f"{name} has {int(below.sum())} negative values of {stat.numel()} "
                    f"(min {float(stat.min()):.6g}; {_channels(below)})"
                )
    add(
        "error",
        "negative-variance",
        negative,
        "a variance is never negative: the checkpoint is corrupt or was edited; "
        + _FIX_RECALIBRATE,
    )

    mean, var = valid.get("running_mean"), valid.get("running_var")
    nbt = valid.get("num_batches_tracked")
    finite_stats = (
        mean is not None
        and var is not None
        and bool(torch.isfinite(mean).all())
        and bool(torch.isfinite(var).all())
    )
    if finite_stats and mean is not None and var is not None:
        init_mean: Tensor | float = spec.init.get("running_mean", 0.0)
        init_var: Tensor | float = spec.init.get("running_var", 1.0)
        initial = _all_equal(mean, init_mean) and _all_equal(var, init_var)
        steps = int(nbt.reshape(-1)[0]) if nbt is not None and nbt.numel() == 1 else None
        frozen = valid.get("frozen")
        if initial and steps is not None and steps > 0 and not spec.momentum_zero:
            add(
                "error",
                "never-updated",
                [
                    f"num_batches_tracked is {steps} but running_mean and running_var still "
                    "hold their initial values (mean 0 and variance 1 unless the layer was "
                    "built with other *_init values)"
                ],
                _FIX_NEVER_UPDATED,
            )
        elif initial and nbt is None and frozen is None:
            weight, bias = valid.get("weight"), valid.get("bias")
            trained = [
                name
                for name, t, default in (("weight", weight, 1.0), ("bias", bias, 0.0))
                if t is not None and not _all_equal(t, spec.init.get(name, default))
            ]
            if trained:
                add(
                    "warning",
                    "initial-statistics",
                    [
                        f"running_mean and running_var hold their initial values while "
                        f"{' and '.join(trained)} {'was' if len(trained) == 1 else 'were'} "
                        "trained, and there is no num_batches_tracked to say whether the "
                        "statistics ever moved (a TF checkpoint whose UPDATE_OPS never ran?)"
                    ],
                    "if the model was trained, its statistics were never updated: "
                    + _FIX_RECALIBRATE,
                )

    skipped = valid.get("num_skipped_updates")
    if skipped is not None and skipped.numel() == 1 and int(skipped.reshape(-1)[0]) > 0:
        add(
            "info",
            "skipped-updates",
            [
                f"the layer skipped {int(skipped.reshape(-1)[0])} update(s) of its statistics "
                "because a batch had non-finite statistics (policy nonfinite='skip')"
            ],
            "look for NaN/inf in the inputs or activations of those training steps; the "
            "running statistics themselves were protected",
        )
    return findings


def _group(keys: Iterable[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for key in keys:
        module, _, name = key.rpartition(".")
        groups.setdefault(module, []).append(name)
    return groups


def _verify(
    state: Mapping[str, Any],
    model: nn.Module | None,
    saved_layers: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> list[Finding]:
    """Findings for ``state``; with ``model``, layers come from it and keys are matched."""
    findings: list[Finding] = []
    if metadata:
        version = metadata.get("bnkit.format_version")
        if version is not None and version.isdigit() and int(version) > FORMAT_VERSION:
            findings.append(
                Finding(
                    "warning",
                    "",
                    "newer-format",
                    f"the file was written by bnkit {metadata.get('bnkit.version', '?')} in "
                    f"checkpoint format {version}; this bnkit reads format {FORMAT_VERSION}.",
                    "upgrade bnkit",
                )
            )
    by_module = _by_module(state)
    own_state: Mapping[str, Any] = {}
    own_by_module: dict[str, dict[str, Any]] = {}
    if model is None:
        layers: Mapping[str, nn.Module | None] = {
            prefix: None
            for prefix, entries in by_module.items()
            if any(name in _STAT_NAMES for name in entries)
        }
    else:
        layers = _model_layers(model)
        own_state = model.state_dict()
        own_by_module = _by_module(own_state)
    owned: set[str] = set()
    for prefix, module in layers.items():
        entries = by_module.get(prefix, {})
        owned.update(prefix + name for name in entries)
        spec = _LayerSpec() if module is None else _spec_for(module, own_by_module.get(prefix, {}))
        layer = prefix[:-1]
        findings.extend(_check_layer(layer, entries, spec))
        if module is not None and saved_layers and layer in saved_layers:
            findings.extend(_config_findings(layer, saved_layers[layer], module))
    if model is not None:
        findings.extend(_key_findings(state, model, own_state, owned))
    return findings


def _by_module(state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{module prefix ("a.b." or ""): {local name: value}}``, in the state's order."""
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        path, _, name = key.rpartition(".")
        grouped.setdefault(f"{path}." if path else "", {})[name] = value
    return grouped


def _config_findings(layer: str, saved: Any, module: nn.Module) -> list[Finding]:
    if not isinstance(saved, Mapping):
        return []
    current = layer_config(module)
    out: list[Finding] = []
    for names, severity in ((_CONFIG_WARNINGS, "warning"), (_CONFIG_INFO, "info")):
        diffs = [
            f"{name}={saved[name]!r} in the checkpoint, {current[name]!r} in the model"
            for name in names
            if name in saved and name in current and saved[name] != current[name]
        ]
        if diffs:
            out.append(
                Finding(
                    "warning" if severity == "warning" else "info",
                    layer,
                    "config-mismatch",
                    "; ".join(diffs) + ".",
                    "build the layer with the checkpoint's configuration, unless the change is "
                    "intended"
                    + (" (eps and axis change the outputs)" if severity == "warning" else ""),
                )
            )
    return out


def _key_findings(
    state: Mapping[str, Any],
    model: nn.Module,
    own_state: Mapping[str, Any],
    owned: set[str],
) -> list[Finding]:
    """Missing, unexpected and mis-shaped keys outside the batch-norm layers' own checks."""
    versions = _versions(state)
    may_miss: set[str] = set()  # filled in by the layer, or reported as missing-statistics
    may_add: set[str] = set()  # buffers a bnkit layer creates when the state has them
    for prefix, module in _model_layers(model).items():
        if isinstance(module, BatchNorm):
            optional = {prefix + name for name in _OPTIONAL_BUFFERS}
            may_miss |= optional
            may_add |= optional
            if prefix + "running_mean" in state and prefix + "running_var" in state:
                may_miss.update(prefix + name for name in _DERIVED_STATS)
        if not _attr(module, "track_running_stats", True):
            continue
        may_miss.update(prefix + s for s in ("running_mean", "running_var"))
        entry = versions.get(prefix[:-1])
        version = entry.get("version") if isinstance(entry, Mapping) else None
        if version is None or version < 2:  # torch fills in the counter of old checkpoints
            may_miss.add(prefix + "num_batches_tracked")
    missing = [k for k in own_state if k not in state and k not in may_miss]
    unexpected = [k for k in state if k not in own_state and k not in may_add]
    findings = [
        Finding(
            "error",
            path,
            "missing-keys",
            f"the checkpoint has no {', '.join(names)} for this module.",
            "the checkpoint is for a different model or was saved partially; load with "
            "strict=False to keep this module's current values",
        )
        for path, names in _group(missing).items()
    ]
    findings.extend(
        Finding(
            "error",
            path,
            "unexpected-keys",
            f"the checkpoint has {', '.join(names)}, which this model does not have.",
            "the checkpoint is for a different model (or version of it); load with "
            "strict=False to ignore these entries",
        )
        for path, names in _group(unexpected).items()
    )
    bad: dict[str, list[str]] = {}
    for key, value in state.items():
        own = own_state.get(key)
        if key in owned or not isinstance(own, Tensor) or is_lazy(own):
            continue
        if not isinstance(value, Tensor) or value.shape != own.shape:
            path, _, name = key.rpartition(".")
            got = _shape(value.shape) if isinstance(value, Tensor) else type(value).__name__
            bad.setdefault(path, []).append(
                f"{name} has shape {got}, the model's has {_shape(own.shape)}"
            )
    findings.extend(
        Finding("error", path, "shape-mismatch", "; ".join(parts) + ".", _FIX_SHAPE)
        for path, parts in bad.items()
    )
    return findings


def verify(
    target: nn.Module | Mapping[str, Any] | PathLike, *, model: nn.Module | None = None
) -> list[Finding]:
    """Check batch-norm statistics; return the findings (empty when all is well).

    Checks, per batch-norm layer (``bnkit.BatchNorm`` and subclasses, ``torch.nn``
    batch/instance norms): the statistics are present (``missing-statistics``), finite
    (``non-finite``, parameters too), of the layer's shape (``shape-mismatch``), with no
    negative variance (``negative-variance``), and not still at their initial values
    (mean 0, variance 1, or the layer's numeric ``*_init``) when ``num_batches_tracked``
    says the layer trained (``never-updated``). A fresh, untrained layer
    (``num_batches_tracked == 0``) is fine. Remarks: ``initial-statistics`` (warning:
    trained γ/β next to initial statistics and no step counter, e.g. an imported TF
    checkpoint), ``skipped-updates`` (info: the layer skipped non-finite batches).

    Args:
        target: a model (its own buffers are checked), a state dict, or a checkpoint file
            (read as :func:`load` reads it: safetensors, or ``weights_only`` torch files).
        model: with a state dict or file, the model it is meant for: layers are then taken
            from the model's modules, and missing, unexpected and mis-shaped keys are
            reported too (``missing-keys``, ``unexpected-keys``, ``shape-mismatch``).
            Without it, a layer is any key prefix with ``running_mean``, ``running_var`` or
            ``num_batches_tracked``; layers whose buffers were not saved at all cannot be
            recognized that way (their ``weight``/``bias`` look like a LayerNorm's).

    Returns:
        The findings, in layer order.

    Example:
        >>> import torch, bnkit
        >>> bn = bnkit.BatchNorm1d(4)
        >>> verify(bn)                                   # fresh: nothing to report
        []
        >>> state = bn.state_dict()
        >>> state["running_var"][1] = float("nan")
        >>> state["num_batches_tracked"].fill_(100)
        tensor(100)
        >>> [f.code for f in verify(state)]
        ['non-finite']
        >>> print(verify(state)[0].message)
        running_var has 1 NaN of 4 values (channel 1).
    """
    if isinstance(target, nn.Module):
        if model is not None:
            raise TypeError("model= is for checking a state dict or a file against a model")
        return _verify(target.state_dict(), target)
    if isinstance(target, (str, os.PathLike)):
        source = _read(target)
        state, _, _ = _state_of(source, model)
        return _verify(state, model, _saved_layers(source.metadata), source.metadata)
    if isinstance(target, Mapping):
        return _verify(target, model)
    raise TypeError(f"verify expects a module, a state dict or a path, got {type(target).__name__}")


def _saved_layers(metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    try:
        layers = json.loads(metadata.get("bnkit.layers", "{}"))
    except json.JSONDecodeError:
        return {}
    return layers if isinstance(layers, dict) else {}


# ------------------------------------------------------------------------------ load


def _refusal(path: str, errors: list[Finding]) -> str:
    layers = sorted({_display(f.layer) for f in errors})
    lines = [
        f"refusing to load {path!r}: {len(errors)} problem(s) in {len(layers)} layer(s) "
        f"({', '.join(layers)}); the model was not changed."
    ]
    for f in errors:
        lines.append(f"  - {_display(f.layer)} [{f.code}]: {f.message}")
        lines.append(f"      Fix: {f.fix}")
    lines.append(
        "To load anyway: bnkit.load(model, path, strict=False) loads what is there and returns "
        "these findings; then repair the statistics, e.g. with bnkit.recalibrate(model, data)."
    )
    return "\n".join(lines)


def load(model: nn.Module, path: PathLike, *, strict: bool = True) -> LoadReport:
    """Load a checkpoint into ``model`` after checking its batch-norm statistics.

    Reads ``.safetensors`` files and ``torch.save`` files (``.pt``, ``.pth``, ...; the
    format is recognized from the content). Torch files are read with
    ``torch.load(path, map_location="cpu", weights_only=True)`` only, which never runs
    code from the file: a pickle that holds anything but tensors and plain containers is
    refused. The state dict may be wrapped under ``"state_dict"``, ``"model_state_dict"``,
    ``"model"``, ``"module"``, ``"net"``, ``"network"`` or ``"weights"`` (also nested, e.g.
    ``{"model": {"state_dict": ...}}``; other entries such as ``"optimizer"`` are ignored);
    a ``module.`` prefix (DataParallel) or ``_orig_mod.`` (torch.compile) on every key,
    which the model lacks, is removed.

    Then every batch-norm layer is checked as :func:`verify` does, and keys are matched
    against the model as ``load_state_dict`` does.

    Args:
        model: the module to load into (in place).
        path: the checkpoint file (``str`` or ``os.PathLike``).
        strict: True: any error (broken statistics, missing/unexpected keys, wrong shapes)
            raises before the model is touched. False: load what is there (tensors of a
            wrong shape are skipped), return every finding, and warn once.

    Returns:
        A :class:`LoadReport`.

    Raises:
        CheckpointError: the file is unreadable, unsafe, holds no state dict, or (strict)
            has errors; the message names each layer and its fix.

    Warns:
        CheckpointWarning: once, when findings of severity error (``strict=False``) or
            warning remain.

    Example:
        >>> import os, tempfile, torch, bnkit
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = os.path.join(tmp, "params-only.pt")
        ...     torch.save(dict(model.named_parameters()), path)    # the classic mistake
        ...     load(model, path)
        Traceback (most recent call last):
        ...
        bnkit.checkpoint.CheckpointError: refusing to load ...: 1 problem(s) in 1 layer(s) (1); ...
    """
    source = _read(path)
    state, wrapper, stripped = _state_of(source, model)
    saved = _saved_layers(source.metadata)
    findings = _verify(state, model, saved, source.metadata)
    errors = [f for f in findings if f.severity == "error"]
    if strict and errors:
        raise CheckpointError(_refusal(source.path, errors), errors)

    own_state = model.state_dict()
    skipped = {
        key
        for key, value in state.items()
        if isinstance(own_state.get(key), Tensor)
        and not is_lazy(own_state[key])
        and (not isinstance(value, Tensor) or value.shape != own_state[key].shape)
    }
    to_load = _with_versions(
        ((k, v) for k, v in state.items() if k not in skipped), _versions(state)
    )
    result = model.load_state_dict(to_load, strict=False)
    optional = {
        prefix + name
        for prefix, layer in _model_layers(model).items()
        if isinstance(layer, BatchNorm)
        for name in _OPTIONAL_BUFFERS
    }
    missing = [k for k in result.missing_keys if k not in optional]
    unexpected = [k for k in result.unexpected_keys if k not in optional]
    if strict and (missing or unexpected):
        # Only a module with its own loading logic can get here (the checks above agree
        # with torch for every other module).
        raise CheckpointError(
            f"load_state_dict reported missing keys {missing} and unexpected keys "
            f"{unexpected} for {source.path!r}; unlike other refusals, the state HAS been "
            "loaded into the model. Load with strict=False to accept such a checkpoint"
        )
    report = LoadReport(
        path=source.path,
        format=source.format,
        wrapper_key=wrapper,
        stripped_prefix=stripped,
        findings=findings,
        missing_keys=missing,
        unexpected_keys=unexpected,
        skipped_keys=[k for k in state if k in skipped],
        metadata=dict(source.metadata),
        layers=saved,
        bnkit_version=source.metadata.get("bnkit.version"),
    )
    if not report.ok:
        problems = [f for f in findings if f.severity in ("error", "warning")]
        warnings.warn(
            CheckpointWarning(
                f"loaded {source.path!r} with {len(problems)} problem(s):\n"
                + "\n".join(f"  - {f}" for f in problems)
            ),
            stacklevel=2,
        )
    return report


def _restored_versions(metadata: Mapping[str, str]) -> dict[str, Any]:
    try:
        versions = json.loads(metadata.get("torch.module_versions", "{}"))
    except json.JSONDecodeError:
        return {}
    return versions if isinstance(versions, dict) else {}
