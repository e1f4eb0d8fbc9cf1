"""Load TensorFlow-slim and Keras checkpoints into PyTorch models.

Two entry points read the two families of files TensorFlow users have:

* :func:`load_tf_checkpoint` reads checkpoints written by ``tf.compat.v1.train.Saver``
  (TF-slim, ``tf.layers``) and object-based ones (``tf.train.Checkpoint``, Keras
  ``model.save_weights(prefix)`` in TF format, the ``variables/`` folder of a SavedModel),
  through TensorFlow.
* :func:`load_keras_weights` reads Keras HDF5 files (``model.save("m.h5")``,
  ``model.save_weights("w.h5")``, ``model.save_weights("w.weights.h5")``) and ``.keras``
  archives with h5py alone: TensorFlow is not needed.

Both fill batch-norm layers (any :class:`bnkit.BatchNorm`, including the ``from_slim`` /
``from_keras`` presets, and ``torch.nn`` batch norms) and, as a convenience,
``torch.nn.Conv1d/2d/3d`` and ``torch.nn.Linear`` layers (TF stores kernels as
``[..., in, out]``; they are transposed to PyTorch's ``[out, in, ...]``). They refuse
checkpoints whose moving statistics are missing or were never updated (the two classic
TensorFlow batch-norm bugs), naming every affected layer, and return an
:class:`ImportReport` of what went where.

:func:`load_tf_variables` does the matching and loading on a plain ``{name: array}`` dict,
for variables read by other means.
"""

from __future__ import annotations

import difflib
import importlib
import io
import json
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from bnkit.modules import BatchNorm

__all__ = [
    "CheckpointImportError",
    "ImportReport",
    "LoadedLayer",
    "load_keras_weights",
    "load_tf_checkpoint",
    "load_tf_variables",
]

Array = npt.NDArray[Any]
ModuleMapping = Mapping[str, str | None] | Callable[[str], str | None] | None

_BN = "batch_norm"
_BN_MAYBE = "batch_norm?"  # gamma/beta without statistics: a batch norm saved without them
_KIND_LABEL = {
    _BN: "batch norm",
    "linear": "dense / fully connected",
    "conv1d": "conv1d",
    "conv2d": "conv2d",
    "conv3d": "conv3d",
}
_OBJECT_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_BN_ROLES = frozenset(
    {
        "gamma",
        "beta",
        "moving_mean",
        "moving_variance",
        "moving_stddev",
        "renorm_mean",
        "renorm_stddev",
        "renorm_mean_weight",
        "renorm_stddev_weight",
    }
)
_KERNEL_ROLES = {"weights": "kernel", "kernel": "kernel", "biases": "bias", "bias": "bias"}
# Zero-debias shadows of ``assign_moving_average``: ``<scope>/<name scope>/moving_mean/biased``.
_SHADOW = re.compile(
    r"^(?P<prefix>.*)/(?P<stat>moving_mean|moving_variance)/(?P<kind>biased|local_step)$"
)
_STEP_NAMES = frozenset({"global_step", "iter", "iterations", "_iterations", "iteration"})
# Optimizer state and bookkeeping at the top of a checkpoint (Adam's beta powers, Keras'
# optimizer/ and keras_api/ metric totals of object-based checkpoints and SavedModels).
_OPTIMIZER_TOP = re.compile(
    r"^(beta[12]_power(_\d+)?|optimizer|save_counter|training|keras_api)(/|$)"
)
# Names TensorFlow and Keras generate when the user gives none; only layers named like this
# are matched by their order in the file (a user's own names say nothing about order).
_AUTO_COMPONENT = re.compile(
    r"^(BatchNorm|batch_normalization|sync_batch_normalization|Conv|conv[123]d|"
    r"fully_connected|dense)(_\d+)?$|^layer(_with_weights)?-\d+$"
)
_BN_AUTO = re.compile(r"^(BatchNorm|batch_normalization|sync_batch_normalization)(_\d+)?$")
_BN_CLASSES = frozenset({"BatchNormalization", "SyncBatchNormalization"})
_CONV_CLASSES = {"Conv1D": "conv1d", "Conv2D": "conv2d", "Conv3D": "conv3d"}
_CONV_CLASSES.update({"Convolution1D": "conv1d", "Convolution2D": "conv2d"})
_CONV_CLASSES["Convolution3D"] = "conv3d"
# Group names of the .weights.h5 format (snake-cased class names) -> Keras class.
_SNAKE_CLASSES = {
    "batch_normalization": "BatchNormalization",
    "sync_batch_normalization": "SyncBatchNormalization",
    "conv1d": "Conv1D",
    "conv2d": "Conv2D",
    "conv3d": "Conv3D",
    "dense": "Dense",
}


class CheckpointImportError(ValueError):
    """A checkpoint could not be loaded as asked; the message says why and how to fix it.

    Attributes:
        report: the :class:`ImportReport` of the attempt (nothing was loaded into the model).
    """

    def __init__(self, message: str, report: ImportReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class LoadedLayer:
    """One module filled from one checkpoint layer.

    Attributes:
        scope: the TF variable scope or Keras layer the values came from.
        variables: module attribute (``weight``, ``running_mean``, ...) → the checkpoint
            variable it was loaded from.
    """

    scope: str
    variables: dict[str, str]


@dataclass
class ImportReport:
    """What :func:`load_tf_checkpoint` / :func:`load_keras_weights` did.

    Attributes:
        source: the file that was read.
        loaded: module name → :class:`LoadedLayer`, in model order.
        skipped_modules: modules that ``mapping`` mapped to None (left as they were).
        unmatched_modules: modules no checkpoint layer was found for (``strict=False``).
        unused_variables: model variables of the checkpoint that nothing was loaded from.
        ignored_variables: optimizer state and bookkeeping (slots such as ``.../Momentum``,
            ``global_step``), never loaded.
        notes: things worth knowing that are not problems (e.g. ``weight set to 1`` for a
            slim layer saved with ``scale=False``).
        problems: what could not be loaded or is wrong; empty after a strict load.
        step: the training step stored in the checkpoint, if any.
    """

    source: str
    loaded: dict[str, LoadedLayer] = field(default_factory=dict)
    skipped_modules: list[str] = field(default_factory=list)
    unmatched_modules: list[str] = field(default_factory=list)
    unused_variables: list[str] = field(default_factory=list)
    ignored_variables: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    step: int | None = None

    @property
    def ok(self) -> bool:
        """True when every module was matched and nothing went wrong."""
        return not self.problems and not self.unmatched_modules

    def __str__(self) -> str:
        lines = [f"Loaded {len(self.loaded)} module(s) from {self.source}:"]
        width = max((len(_label(n)) for n in self.loaded), default=0)
        for name, layer in self.loaded.items():
            attrs = ", ".join(layer.variables)
            lines.append(f"  {_label(name):<{width}}  <- {layer.scope}  ({attrs})")
        if self.step is not None:
            lines.append(f"Training step in the checkpoint: {self.step}")
        sections = (
            ("Left as they were (mapping -> None)", self.skipped_modules),
            ("Modules not found in the checkpoint", self.unmatched_modules),
            ("Checkpoint variables not loaded", self.unused_variables),
        )
        for title, items in sections:
            if items:
                lines.append(f"{title}: {', '.join(items)}")
        if self.ignored_variables:
            lines.append(
                f"Ignored {len(self.ignored_variables)} optimizer/bookkeeping variable(s): "
                + _shorten(self.ignored_variables)
            )
        lines.extend(f"Note: {note}" for note in self.notes)
        if self.problems:
            lines.append("Problems:")
            lines.extend(f"  - {p}" for p in self.problems)
        return "\n".join(lines)


# --------------------------------------------------------------------- public API


def load_tf_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    mapping: ModuleMapping = None,
    strict: bool = True,
) -> ImportReport:
    """Load a TensorFlow checkpoint (TF-slim, ``tf.layers``, object-based) into ``model``.

    Batch-norm modules get ``gamma → weight``, ``beta → bias``, ``moving_mean →
    running_mean``, ``moving_variance → running_var``, and where the module has them the
    zero-debias shadows (``.../moving_mean/biased`` and ``.../local_step``, found under the
    layer's scope: slim doubles it, ``bn/bn/moving_mean/biased``) and the renorm statistics
    (``renorm_mean``, ``renorm_stddev``, ``moving_stddev → running_stddev``). A layer saved
    without ``gamma`` (slim's default ``scale=False``) loads as weight 1, one without
    ``beta`` as bias 0. ``Conv1d/2d/3d`` and ``Linear`` modules get ``weights``/``kernel``
    (transposed from TF's ``[k..., in, out]``/``[in, out]``) and ``biases``/``bias``.
    Values are cast to each module's dtype and device. Optimizer slots (``.../Momentum``,
    ``.../Adam``), ``global_step`` and other bookkeeping are ignored.

    Which checkpoint scope fills which module, for each batch-norm/conv/linear module:

    1. ``mapping``: a dict ``{module name: scope}`` (modules it does not name use the
       rules below) or a callable ``module name -> scope``; ``None`` leaves a module as it
       is.
    2. The module's ``tf_scope`` attribute (set by ``bnkit.from_slim(scope=...)``).
    3. The module's path with ``.`` → ``/``, and slim's layout: for a batch norm at
       ``conv1.1`` the scopes ``conv1/1``, ``conv1/1/BatchNorm``, ``conv1/BatchNorm``; for a
       conv/linear at ``conv1.0`` the scopes ``conv1/0``, ``conv1``. A scope may also carry
       an outer prefix (``model/conv1/BatchNorm``).
    4. Layers with generated names (``BatchNorm_1``, ``conv2d_3``, Keras'
       ``layer_with_weights-N``) are matched to the remaining modules of the same kind in
       model order; a single remaining module of a kind takes the single remaining layer of
       that kind.

    Each scope fills one module; a module matched to nothing, or two modules wanting one
    scope, is an error naming the modules, the unclaimed scopes and close matches.

    Args:
        model: the PyTorch model (changed in place).
        path: the prefix ``Saver.save`` returned (``.../model.ckpt-1000``; a
            ``.index``/``.data-*`` file name works too), a directory with a ``checkpoint``
            file, or a SavedModel directory.
        mapping: module name → checkpoint scope, as a dict or a callable (see above).
        strict: refuse (raise) when a module finds no layer, a shape differs, or the
            batch-norm statistics are missing or were never updated. ``False`` loads what
            fits, warns once, and lists the rest in the report.

    Returns:
        An :class:`ImportReport`: what was loaded from where, what was skipped and why.

    Raises:
        ImportError: TensorFlow is not installed (``pip install "bnkit[tf]"``).
        FileNotFoundError: no checkpoint at ``path``.
        CheckpointImportError: (a ``ValueError``) with ``strict=True``: unmatched or
            ambiguous modules, shape mismatches, missing or never-updated moving
            statistics. Nothing is loaded in that case.
        ValueError: ``mapping`` names a module the model does not have.

    Example:
        >>> import torch, bnkit
        >>> model = torch.nn.Sequential()
        >>> model.add_module("conv1", torch.nn.Conv2d(3, 8, 3, bias=False))
        >>> model.add_module("bn1", bnkit.from_slim(8, data_format="NCHW", scope="conv1/BatchNorm"))
        >>> report = bnkit.tf_import.load_tf_checkpoint(model, "train_dir")  # doctest: +SKIP
        >>> print(report)  # doctest: +SKIP
        Loaded 2 module(s) from train_dir/model.ckpt-2000:
          conv1  <- conv1  (weight)
          bn1    <- conv1/BatchNorm  (weight, bias, running_mean, running_var, ...)
    """
    source, variables = _read_tf_checkpoint(path)
    parsed = _parse_tf_variables(variables, source)
    return _load(model, parsed, mapping, strict, "load_tf_checkpoint")


def load_tf_variables(
    model: nn.Module,
    variables: Mapping[str, Any],
    *,
    mapping: ModuleMapping = None,
    strict: bool = True,
    source: str = "the variables",
) -> ImportReport:
    """Load TF variables given as ``{name: array}`` into ``model``.

    The same matching and checks as :func:`load_tf_checkpoint`, on variables read by other
    means (e.g. ``{n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()}``).

    Args:
        model: the PyTorch model (changed in place).
        variables: TF variable name → value (a NumPy array or anything ``np.asarray``
            accepts).
        mapping: module name → TF scope (dict or callable; None leaves a module as it is).
        strict: refuse on problems instead of loading what fits.
        source: how messages name the variables' origin.

    Returns:
        An :class:`ImportReport`.

    Raises:
        CheckpointImportError: with ``strict=True``, see :func:`load_tf_checkpoint`.
        ValueError: ``mapping`` names a module the model does not have.

    Example:
        >>> import numpy as np, torch, bnkit
        >>> model = torch.nn.Sequential()
        >>> model.add_module("fc", torch.nn.Linear(3, 2, bias=False))
        >>> model.add_module("bn", bnkit.BatchNorm(2, eps=1e-3))
        >>> variables = {
        ...     "fc/weights": np.ones((3, 2), np.float32),
        ...     "fc/BatchNorm/beta": np.array([0.5, -0.5], np.float32),
        ...     "fc/BatchNorm/moving_mean": np.array([1.0, 2.0], np.float32),
        ...     "fc/BatchNorm/moving_variance": np.array([4.0, 9.0], np.float32),
        ...     "fc/BatchNorm/beta/Momentum": np.zeros(2, np.float32),
        ... }
        >>> report = bnkit.tf_import.load_tf_variables(model, variables,
        ...                                            mapping={"bn": "fc/BatchNorm"})
        >>> model.bn.running_var
        tensor([4., 9.])
        >>> report.loaded["fc"].variables
        {'weight': 'fc/weights'}
    """
    parsed = _parse_tf_variables(
        {name: np.asarray(value) for name, value in variables.items()}, source
    )
    return _load(model, parsed, mapping, strict, "load_tf_checkpoint")


def load_keras_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    mapping: ModuleMapping = None,
    strict: bool = True,
) -> ImportReport:
    """Load a Keras ``.h5``, ``.weights.h5`` or ``.keras`` file into ``model`` (h5py only).

    Reads what ``tf_keras`` writes: legacy HDF5 from ``model.save("m.h5")`` and
    ``model.save_weights("w.h5")`` (layer and weight names, in model order), the newer
    ``model.save_weights("w.weights.h5")`` (``layers/<class name>_<i>/vars/<j>``: positions
    only, no names) and ``.keras`` archives (the same weights plus ``config.json`` with
    every layer's name, class and options). Variables map to modules as in
    :func:`load_tf_checkpoint` (``gamma → weight``, ``moving_variance → running_var``,
    kernels transposed, ...).

    Which Keras layer fills which module, for each batch-norm/conv/linear module:

    1. ``mapping``: dict or callable module name → Keras layer name (or the layer's path
       in the file, e.g. ``sequential/batch_normalization``); ``None`` skips a module.
    2. The module's ``tf_scope`` (``bnkit.from_keras(name=...)``) as the Keras layer name
       (not available for ``.weights.h5``, which stores no names).
    3. A module whose path names a layer (``self.bn1`` ↔ a Keras layer ``bn1``).
    4. The remaining layers of each kind in the file's model order, paired with the
       remaining modules of that kind in the PyTorch model's order: their numbers and
       shapes must agree.

    A ``Flatten`` before a ``Dense`` layer flattens channels-last data in Keras; the
    PyTorch model must flatten the same (NHWC) order for the dense weights to fit.

    Args:
        model: the PyTorch model (changed in place).
        path: a ``.h5``/``.hdf5``/``.weights.h5`` file or a ``.keras`` archive.
        mapping: module name → Keras layer (dict or callable).
        strict: refuse (raise) on unmatched modules, shape mismatches, missing or
            never-updated statistics; ``False`` loads what fits, warns once and reports.

    Returns:
        An :class:`ImportReport`.

    Raises:
        ImportError: h5py is not installed (``pip install h5py``).
        FileNotFoundError: ``path`` does not exist.
        CheckpointImportError: (a ``ValueError``) with ``strict=True``: see above. Nothing
            is loaded in that case.
        ValueError: the file is not a Keras weights file, or ``mapping`` names a module the
            model does not have.

    Example:
        >>> import torch, bnkit
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Linear(16, 8), bnkit.from_keras(8), torch.nn.Linear(8, 1))
        >>> report = bnkit.tf_import.load_keras_weights(model, "model.h5")  # doctest: +SKIP
        >>> print(report)  # doctest: +SKIP
        Loaded 3 module(s) from model.h5:
          0  <- dense  (weight, bias)
          1  <- batch_normalization  (weight, bias, running_mean, running_var)
          2  <- dense_1  (weight, bias)
    """
    parsed = _read_keras_file(path)
    return _load(model, parsed, mapping, strict, "load_keras_weights")


# ------------------------------------------------------------------ reading files


@dataclass
class _Layer:
    """One layer of a checkpoint: its variables by role (gamma, kernel, ...)."""

    key: str
    kind: str | None
    arrays: dict[str, Array] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    label: str | None = None  # the Keras layer name, when the file stores it
    order: int = 0
    auto: bool = False  # generated name or Keras file: may be matched by position
    order_known: bool = True  # False: the file does not say where the layer sits
    raw: list[tuple[str, Array]] | None = None  # unnamed variables (.weights.h5 without config)
    extra: list[str] = field(default_factory=list)  # variables bnkit has no place for

    def var_names(self) -> list[str]:
        names = list(self.names.values()) + list(self.extra)
        if self.raw is not None:
            names += [n for n, _ in self.raw]
        return names


@dataclass
class _Parsed:
    source: str
    layers: list[_Layer]
    ignored: list[str]
    unused: list[str]
    step: int | None
    ordered: bool  # Keras files: every layer has a place in model order


def _import_optional(name: str, hint: str) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TensorFlow's import chatter is not the user's
            return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(hint) from exc


def _read_tf_checkpoint(path: str | os.PathLike[str]) -> tuple[str, dict[str, Array]]:
    tf = _import_optional(
        "tensorflow",
        "load_tf_checkpoint reads TensorFlow checkpoints with TensorFlow, which is not "
        'installed. Install it with: pip install "bnkit[tf]" (or pip install tensorflow-cpu). '
        "Keras .h5/.weights.h5/.keras files need only h5py: use bnkit.load_keras_weights.",
    )
    prefix = _checkpoint_prefix(Path(path), tf)
    try:
        reader = tf.train.load_checkpoint(prefix)
    except Exception as exc:  # TF raises NotFoundError, DataLossError, ValueError, ...
        raise FileNotFoundError(
            f"could not read a TensorFlow checkpoint at {prefix!s}: {exc}. Pass the prefix "
            "that Saver.save returned (e.g. train_dir/model.ckpt-1000, without .index or "
            ".data-*), or a directory with a 'checkpoint' file."
        ) from exc
    dtypes = reader.get_variable_to_dtype_map()
    values: dict[str, Array] = {}
    for name, dtype in dtypes.items():
        if dtype == tf.string or dtype == tf.variant or dtype == tf.resource:
            continue  # the object graph and other non-numeric bookkeeping
        value = np.asarray(reader.get_tensor(name))
        if value.dtype.kind not in "biuf":  # bfloat16 and friends
            value = value.astype(np.float32)
        values[name] = value
    return str(prefix), values


def _checkpoint_prefix(path: Path, tf: Any) -> str:
    """The checkpoint prefix for a prefix, a shard/index file, or a directory."""
    if path.is_dir():
        if (path / "saved_model.pb").exists() and (path / "variables").is_dir():
            return str(path / "variables" / "variables")
        latest = tf.train.latest_checkpoint(str(path))
        if latest is None:
            raise FileNotFoundError(
                f"{path} is a directory without a 'checkpoint' file naming its latest "
                "checkpoint; pass the checkpoint prefix instead (the path Saver.save "
                "returned, e.g. train_dir/model.ckpt-1000)"
            )
        return str(latest)
    text = str(path)
    text = re.sub(r"\.(index|meta|data-\d+-of-\d+)$", "", text)
    if not Path(text + ".index").exists() and not Path(text).exists():
        raise FileNotFoundError(
            f"no TensorFlow checkpoint at {path}: expected {text}.index next to its "
            ".data-* shards. Pass the prefix that Saver.save returned, or the directory "
            "that holds the 'checkpoint' file."
        )
    return text


def _natural_key(text: str) -> list[Any]:
    """Sort key that puts batch_normalization_2 before batch_normalization_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _kernel_kind(rank: int) -> str | None:
    return {2: "linear", 3: "conv1d", 4: "conv2d", 5: "conv3d"}.get(rank)


def _parse_tf_variables(variables: Mapping[str, Array], source: str) -> _Parsed:
    """Group TF variables into layers by scope; set optimizer state and bookkeeping aside."""
    ignored: list[str] = []
    unused: list[str] = []
    step: int | None = None
    names = {}
    for original in variables:
        name = original
        if name.endswith(_OBJECT_SUFFIX):
            name = name[: -len(_OBJECT_SUFFIX)]
        names[original] = name
    normalized = set(names.values())
    scopes: dict[str, _Layer] = {}
    shadows: list[tuple[str, str, str]] = []  # (original, prefix, role)
    for original, name in names.items():
        base = name.rsplit("/", 1)[-1]
        value = variables[original]
        is_step = base == "global_step" or (name.startswith("optimizer/") and base in _STEP_NAMES)
        if is_step and value.size == 1 and value.dtype.kind in "iu":
            step = int(value.reshape(()))
            ignored.append(original)
            continue
        if original == "_CHECKPOINTABLE_OBJECT_GRAPH" or "/.OPTIMIZER_SLOT/" in original:
            ignored.append(original)
            continue
        if _OPTIMIZER_TOP.match(name):
            ignored.append(original)
            continue
        match = _SHADOW.match(name)
        if match:
            shadows.append((original, match["prefix"], f"{match['stat']}/{match['kind']}"))
            continue
        if _is_slot(name, normalized):
            ignored.append(original)
            continue
        scope, _, base = name.rpartition("/")
        role = base if base in _BN_ROLES else _KERNEL_ROLES.get(base)
        if role is None:
            unused.append(original)
            continue
        layer = scopes.setdefault(scope, _Layer(key=scope, kind=None))
        if role in layer.arrays:  # e.g. both `weights` and `kernel` in one scope
            unused.append(original)
            continue
        layer.arrays[role] = value
        layer.names[role] = original

    layers: list[_Layer] = []
    for layer in scopes.values():
        roles = set(layer.arrays)
        has_kernel = "kernel" in roles or "bias" in roles
        has_bn = bool(roles & _BN_ROLES)
        if has_kernel and not has_bn and "kernel" in roles:
            layer.kind = _kernel_kind(layer.arrays["kernel"].ndim)
        elif has_bn and not has_kernel:
            layer.kind = _BN if roles & {"moving_mean", "moving_variance"} else _BN_MAYBE
        if layer.kind is None:
            unused.extend(layer.names.values())
            continue
        for role in ("renorm_mean_weight", "renorm_stddev_weight"):
            if role in layer.arrays:  # TF 1.x renorm debias counters: no bnkit equivalent
                del layer.arrays[role]
                layer.extra.append(layer.names.pop(role))
        layers.append(layer)

    bn_layers = {layer.key: layer for layer in layers if layer.kind in (_BN, _BN_MAYBE)}
    for original, prefix, role in shadows:
        owners = [k for k in bn_layers if prefix == k or prefix.startswith(k + "/")]
        if not owners:
            unused.append(original)
            continue
        owner = bn_layers[max(owners, key=len)]
        owner.arrays[role] = variables[original]
        owner.names[role] = original

    _mark_order(layers)
    return _Parsed(
        source=source,
        layers=layers,
        ignored=sorted(ignored),
        unused=sorted(unused),
        step=step,
        ordered=False,
    )


def _is_slot(name: str, names: set[str]) -> bool:
    """``conv1/weights/Momentum``: a variable named after another one is optimizer state."""
    parts = name.split("/")
    return any("/".join(parts[:i]) in names for i in range(1, len(parts)))


def _mark_order(layers: list[_Layer]) -> None:
    """Order layers by natural sort of their scope; flag generated names."""
    if not layers:
        return
    split = [layer.key.split("/") for layer in layers]
    common = 0
    if len(layers) > 1:
        while all(len(s) > common + 1 for s in split) and len({s[common] for s in split}) == 1:
            common += 1
    for layer, parts in zip(layers, split, strict=True):
        rest = parts[common:]
        auto = all(_AUTO_COMPONENT.match(p) for p in rest)
        if layer.kind == _BN_MAYBE:  # gamma/beta alone may be a LayerNorm: need a BN name
            auto = auto and bool(_BN_AUTO.match(rest[-1]))
        layer.auto = auto
    for rank, layer in enumerate(sorted(layers, key=lambda lay: _natural_key(lay.key))):
        layer.order = rank


# ---- Keras files


def _read_keras_file(path: str | os.PathLike[str]) -> _Parsed:
    h5py = _import_optional(
        "h5py",
        "load_keras_weights reads Keras .h5/.keras files with h5py, which is not installed: "
        'pip install h5py (or pip install "bnkit[tf]")',
    )
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"no such Keras file: {file}")
    if file.is_dir():
        raise ValueError(
            f"{file} is a directory: a TF SavedModel or checkpoint folder is read with "
            "bnkit.load_tf_checkpoint(model, path); load_keras_weights reads .h5, "
            ".weights.h5 and .keras files"
        )
    if zipfile.is_zipfile(file):
        with zipfile.ZipFile(file) as archive:
            members = set(archive.namelist())
            if "model.weights.h5" not in members:
                raise ValueError(
                    f"{file} is a zip archive without model.weights.h5; a .keras file "
                    "written with weights_format='npz' (or not by Keras) is not supported"
                )
            config = json.loads(archive.read("config.json")) if "config.json" in members else None
            data = archive.read("model.weights.h5")
        with h5py.File(io.BytesIO(data), "r") as handle:
            return _parse_keras_v3(handle, str(file), config, h5py.Group)
    if not h5py.is_hdf5(str(file)):
        raise ValueError(
            f"{file} is neither an HDF5 file nor a .keras archive. TensorFlow checkpoints "
            "(model.ckpt-N.index/.data-*, save_weights without .h5) are read with "
            "bnkit.load_tf_checkpoint"
        )
    with h5py.File(str(file), "r") as handle:
        if "layer_names" in handle.attrs or "layer_names0" in handle.attrs:
            return _parse_keras_legacy(handle, handle, str(file))
        if "model_weights" in handle:
            return _parse_keras_legacy(handle["model_weights"], handle, str(file))
        if "layers" in handle or "vars" in handle:
            return _parse_keras_v3(handle, str(file), None, h5py.Group)
    raise ValueError(
        f"{file} is an HDF5 file but not one Keras wrote: no 'layer_names' attribute "
        "(model.save / save_weights to .h5) and no 'layers' group (.weights.h5)"
    )


def _text(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _h5_names(group: Any, name: str) -> list[str]:
    """A list attribute as Keras writes it: whole, or chunked as name0, name1, ..."""
    if name in group.attrs:
        return [_text(v) for v in np.atleast_1d(group.attrs[name])]
    out: list[str] = []
    chunk = 0
    while f"{name}{chunk}" in group.attrs:
        out.extend(_text(v) for v in np.atleast_1d(group.attrs[f"{name}{chunk}"]))
        chunk += 1
    return out


def _keras_kind(class_name: str | None, roles: Iterable[str], kernel: Array | None) -> str | None:
    """The kind of a Keras layer from its class when known, else from its variables."""
    if class_name is not None:
        if class_name in _BN_CLASSES:
            return _BN
        if class_name == "Dense":
            return "linear"
        return _CONV_CLASSES.get(class_name)  # None: a class bnkit does not load
    found = set(roles)
    if kernel is not None and found <= {"kernel", "bias"}:
        return _kernel_kind(kernel.ndim)
    if found & {"moving_mean", "moving_variance"} and not found & {"kernel", "bias"}:
        return _BN
    return None


def _parse_keras_legacy(root: Any, handle: Any, source: str) -> _Parsed:
    """``model.save('m.h5')`` / ``save_weights('w.h5')``: named weights in model order."""
    layers: list[_Layer] = []
    unused: list[str] = []
    ignored: list[str] = []
    prefix = "model_weights/" if root is not handle else ""
    for layer_name in _h5_names(root, "layer_names"):
        group = root[layer_name]
        weight_names = _h5_names(group, "weight_names")
        by_owner: dict[str, list[str]] = {}
        for weight_name in weight_names:
            owner = weight_name.rpartition("/")[0]
            by_owner.setdefault(owner, []).append(weight_name)
        nested = len(by_owner) > 1
        for owner, owned in by_owner.items():
            leaf = owner.rsplit("/", 1)[-1] if owner else layer_name
            layer = _Layer(
                key=f"{layer_name}/{leaf}" if nested else layer_name,
                kind=None,
                label=leaf if nested else layer_name,
            )
            for weight_name in owned:
                base = weight_name.rpartition("/")[2].split(":")[0]
                full = f"{prefix}{layer_name}/{weight_name}"
                role = base if base in _BN_ROLES else _KERNEL_ROLES.get(base)
                if role is None or role in layer.arrays:
                    layer.extra.append(full)
                    continue
                layer.arrays[role] = np.asarray(group[weight_name])
                layer.names[role] = full
            layer.kind = _keras_kind(None, layer.arrays, layer.arrays.get("kernel"))
            for role in ("renorm_mean_weight", "renorm_stddev_weight"):
                if role in layer.arrays:
                    del layer.arrays[role]
                    layer.extra.append(layer.names.pop(role))
            if layer.kind is None:
                unused.extend(layer.var_names())
                continue
            layer.order = len(layers)
            layer.auto = True
            layers.append(layer)
    step = None
    if "optimizer_weights" in handle:
        opt = handle["optimizer_weights"]
        for weight_name in _h5_names(opt, "weight_names"):
            ignored.append(f"optimizer_weights/{weight_name}")
            base = weight_name.rpartition("/")[2].split(":")[0]
            value = np.asarray(opt[weight_name])
            if base in _STEP_NAMES and value.size == 1 and value.dtype.kind in "iu":
                step = int(value.reshape(()))
    return _Parsed(source, layers, sorted(ignored), unused, step, ordered=True)


@dataclass
class _ConfigLayer:
    class_name: str
    name: str | None
    config: dict[str, Any]
    order: int


def _snake_case(name: str) -> str:
    """tf_keras' ``to_snake_case``: how the .weights.h5 format names a layer's group."""
    intermediate = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    insecure = re.sub("([a-z])([A-Z])", r"\1_\2", intermediate).lower()
    return insecure if insecure[0] != "_" else "private" + insecure


def _config_layers(config: Any, prefix: str, out: dict[str, _ConfigLayer]) -> None:
    """Where each layer of a .keras config sits in model.weights.h5, in model order."""
    inner = config.get("config") if isinstance(config, dict) else None
    items = inner.get("layers") if isinstance(inner, dict) else None
    if not isinstance(items, list):
        return
    used: dict[str, int] = {}
    for item in items:
        if not isinstance(item, dict):
            continue
        class_name = str(item.get("class_name", ""))
        if not class_name:
            continue
        name = _snake_case(class_name)
        if name in used:
            used[name] += 1
            name = f"{name}_{used[name]}"
        else:
            used[name] = 0
        path = f"{prefix}layers/{name}"
        sub = item.get("config")
        sub = sub if isinstance(sub, dict) else {}
        if isinstance(sub.get("layers"), list):
            _config_layers(item, path + "/", out)
        else:
            label = sub.get("name")
            out[path] = _ConfigLayer(
                class_name, str(label) if label is not None else None, sub, len(out)
            )


def _bn_roles(count: int, config: Mapping[str, Any]) -> list[str]:
    roles = []
    if config.get("scale", True):
        roles.append("gamma")
    if config.get("center", True):
        roles.append("beta")
    roles += ["moving_mean", "moving_variance"]
    if config.get("renorm", False):
        roles += ["moving_stddev", "renorm_mean", "renorm_stddev"]
    return roles if len(roles) == count else []


def _parse_keras_v3(handle: Any, source: str, config: Any, group_type: Any) -> _Parsed:
    """``.weights.h5`` and the weights of a ``.keras`` archive: ``<path>/vars/<i>``."""
    placed: dict[str, _ConfigLayer] = {}
    if config is not None:
        _config_layers(config, "", placed)
    found: list[tuple[str, list[tuple[str, Array]]]] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, group_type) and name.rsplit("/", 1)[-1] == "vars":
            values = [(f"{name}/{k}", np.asarray(obj[k])) for k in obj]
            values.sort(key=lambda item: int(item[0].rsplit("/", 1)[-1]))
            if values:
                found.append((name.rpartition("/")[0], values))

    handle.visititems(visit)

    layers: list[_Layer] = []
    paths: list[str] = []
    unused: list[str] = []
    ignored: list[str] = []
    step = None
    for path, values in found:
        if path.split("/", 1)[0] in ("optimizer", "metrics"):
            ignored.extend(name for name, _ in values)
            if path == "optimizer" and values[0][1].ndim == 0 and values[0][1].dtype.kind in "iu":
                step = int(values[0][1])
            continue
        key = "/".join(p for p in path.split("/") if p != "layers") or "<model>"
        placed_layer = placed.get(path)
        container, _, leaf = path.rpartition("/")
        class_name = placed_layer.class_name if placed_layer is not None else None
        arrays = [value for _, value in values]
        kernel = arrays[0] if arrays and arrays[0].ndim >= 2 else None
        if class_name is None and (container == "layers" or container.endswith("/layers")):
            # In a layer list the group is named after the class: conv2d_3 is a Conv2D.
            class_name = _SNAKE_CLASSES.get(re.sub(r"_\d+$", "", leaf), "")
        kind = _keras_kind(class_name, (), kernel)
        if kind is None and class_name is None and kernel is None and 2 <= len(arrays) <= 7:
            # A layer held by an attribute (self.norm): 1-D vectors of one length are a BN.
            sizes = {a.size for a in arrays}
            kind = _BN if len(sizes) == 1 and all(a.ndim <= 1 for a in arrays) else None
        layer = _Layer(key=key, kind=kind, label=placed_layer.name if placed_layer else None)
        if kind is None:
            unused.extend(name for name, _ in values)
            continue
        roles: list[str] = []
        if kind == _BN:
            if placed_layer is not None:
                roles = _bn_roles(len(values), placed_layer.config)
        elif len(values) in (1, 2):
            roles = ["kernel", "bias"][: len(values)]
        if roles:
            for role, (name, value) in zip(roles, values, strict=True):
                layer.arrays[role] = value
                layer.names[role] = name
        else:
            layer.raw = values  # roles decided per module (.weights.h5 stores no names)
        layer.order = placed_layer.order if placed_layer is not None else 0
        layer.auto = True
        layers.append(layer)
        paths.append(path)
    if not placed:
        # No config: the generated names (batch_normalization, batch_normalization_1, ...)
        # count layers of one class within one container in model order; across containers
        # (nested models, layers held by attributes) the file records no order.
        ranked = sorted(zip(layers, paths, strict=True), key=lambda lp: _natural_key(lp[1]))
        containers: dict[str | None, set[str]] = {}
        for rank, (layer, path) in enumerate(ranked):
            layer.order = rank
            containers.setdefault(layer.kind, set()).add(path.rpartition("/")[0])
        for layer in layers:
            layer.order_known = len(containers[layer.kind]) == 1
    else:
        for layer, path in zip(layers, paths, strict=True):
            layer.order_known = path in placed
    return _Parsed(source, layers, sorted(ignored), unused, step, ordered=True)


# ---------------------------------------------------------------------- matching


@dataclass
class _Target:
    name: str
    module: nn.Module
    kind: str


def _module_kind(module: nn.Module) -> str | None:
    if isinstance(module, BatchNorm | nn.modules.batchnorm._BatchNorm):
        return _BN
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv3d):
        return "conv3d"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def _label(name: str) -> str:
    return name if name else "<model>"


def _compatible(target_kind: str, layer_kind: str | None) -> bool:
    return layer_kind == target_kind or (target_kind == _BN and layer_kind == _BN_MAYBE)


def _path_candidates(name: str, kind: str) -> list[str]:
    """Scopes a module at ``name`` may have had in slim: see load_tf_checkpoint."""
    if not name:
        return []
    parts = name.split(".")
    here = "/".join(parts)
    parent = "/".join(parts[:-1])
    if kind == _BN:
        out = [here, f"{here}/BatchNorm"]
        if parent:
            out.append(f"{parent}/BatchNorm")
        return out
    return [here, parent] if parent else [here]


@dataclass
class _Matching:
    pairs: dict[str, _Layer] = field(default_factory=dict)  # module name -> layer
    skipped: list[str] = field(default_factory=list)
    unmatched: list[tuple[_Target, list[str]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _find(parsed: _Parsed, wanted: str, *, suffix: bool) -> list[_Layer]:
    exact = [lay for lay in parsed.layers if wanted in (lay.key, lay.label)]
    if exact or not suffix or wanted.split("/")[0].isdigit():
        return exact
    return [lay for lay in parsed.layers if lay.key.endswith("/" + wanted)]


def _close(wanted: Iterable[str], keys: list[str]) -> list[str]:
    found: list[str] = []
    for w in wanted:
        for match in difflib.get_close_matches(w, keys, n=3, cutoff=0.4):
            if match not in found:
                found.append(match)
    return found[:3]


def _quote(items: Iterable[str]) -> str:
    return ", ".join(repr(i) for i in items)


def _check_mapping(mapping: ModuleMapping, model: nn.Module, targets: list[_Target]) -> None:
    if mapping is None or callable(mapping):
        return
    if not isinstance(mapping, Mapping):
        raise TypeError(
            f"mapping must be a dict {{module name: scope}}, a callable or None, got "
            f"{type(mapping).__name__}"
        )
    names = {name for name, _ in model.named_modules()}
    kinds = {t.name for t in targets}
    unknown = [k for k in mapping if k not in names]
    if unknown:
        hints = _close(unknown, sorted(kinds))
        raise ValueError(
            f"mapping names module(s) the model does not have: {_quote(unknown)}. Keys are "
            "names from model.named_modules() (e.g. 'features.1')"
            + (f"; close matches: {_quote(hints)}" if hints else "")
        )
    wrong = [k for k in mapping if k not in kinds]
    if wrong:
        raise ValueError(
            f"mapping names module(s) that are not batch-norm, Conv1d/2d/3d or Linear "
            f"layers: {_quote(wrong)}; only those are loaded from checkpoints"
        )


def _match(parsed: _Parsed, targets: list[_Target], mapping: ModuleMapping) -> _Matching:
    result = _Matching()
    claimed: dict[str, str] = {}  # layer key -> module name
    pending: list[_Target] = []
    src = parsed.source

    def claim(target: _Target, layer: _Layer) -> None:
        other = claimed.get(layer.key)
        if other is not None:
            result.errors.append(
                f"{_label(other)!r} and {_label(target.name)!r} both map to {layer.key!r}; "
                "each checkpoint layer fills one module: pass mapping= for one of them"
            )
            result.pairs.pop(other, None)
            return
        claimed[layer.key] = target.name
        result.pairs[target.name] = layer

    for target in targets:
        via = None
        wanted: str | None = None
        if mapping is not None and callable(mapping) and not isinstance(mapping, Mapping):
            via, wanted = "mapping", mapping(target.name)
        elif isinstance(mapping, Mapping) and target.name in mapping:
            via, wanted = "mapping", mapping[target.name]
        else:
            scope = getattr(target.module, "tf_scope", None)
            if isinstance(scope, str) and scope:
                via, wanted = "tf_scope", scope
        if via is None:
            pending.append(target)
            continue
        if wanted is None:
            result.skipped.append(target.name)
            continue
        found = _find(parsed, wanted, suffix=True)
        fitting = [lay for lay in found if _compatible(target.kind, lay.kind)]
        if not fitting:
            if found:
                result.errors.append(
                    f"{_label(target.name)!r} ({type(target.module).__name__}): {via} "
                    f"{wanted!r} is a {_KIND_LABEL.get(found[0].kind or '', 'other')} layer "
                    f"in {src}, not a {_KIND_LABEL[target.kind]} layer"
                )
            else:
                keys = [lay.key for lay in parsed.layers if _compatible(target.kind, lay.kind)]
                hints = _close([wanted], keys)
                result.errors.append(
                    f"{_label(target.name)!r} ({type(target.module).__name__}): {via} "
                    f"{wanted!r} is not in {src}"
                    + (f"; close matches: {_quote(hints)}" if hints else "")
                )
            continue
        if len(fitting) > 1:
            result.errors.append(
                f"{_label(target.name)!r}: {via} {wanted!r} matches several layers "
                f"({_quote(lay.key for lay in fitting)}); give the full scope"
            )
            continue
        claim(target, fitting[0])

    still: list[_Target] = []
    tried: dict[str, list[str]] = {}
    # Module paths as scopes (slim's layout, Keras layer names, object-graph attributes).
    proposals: dict[str, list[_Target]] = {}
    chosen: dict[str, _Layer] = {}
    for target in pending:
        candidates = _path_candidates(target.name, target.kind)
        tried[target.name] = candidates
        hit: list[_Layer] = []
        for suffix in (False, True):
            for candidate in candidates:
                hit = [
                    lay
                    for lay in _find(parsed, candidate, suffix=suffix)
                    if _compatible(target.kind, lay.kind) and lay.key not in claimed
                ]
                if hit:
                    break
            if hit:
                break
        if len(hit) > 1:
            result.errors.append(
                f"{_label(target.name)!r}: several scopes fit ({_quote(h.key for h in hit)}); "
                "pass mapping= to choose"
            )
        elif hit:
            proposals.setdefault(hit[0].key, []).append(target)
            chosen[target.name] = hit[0]
        else:
            still.append(target)
    for key, wanting in proposals.items():
        if len(wanting) > 1:
            result.errors.append(
                f"{_quote(_label(t.name) for t in wanting)} would all load {key!r}; "
                "pass mapping= to say which module it belongs to"
            )
            continue
        claim(wanting[0], chosen[wanting[0].name])

    # Generated names (and Keras files, which keep model order): same kind, same order.
    by_kind: dict[str, list[_Target]] = {}
    for target in still:
        by_kind.setdefault(target.kind, []).append(target)
    for kind, wanting in by_kind.items():
        free = [
            lay for lay in parsed.layers if _compatible(kind, lay.kind) and lay.key not in claimed
        ]
        orderable = sorted((lay for lay in free if lay.auto), key=lambda lay: lay.order)
        unknown = [lay.key for lay in orderable if not lay.order_known]
        if len(wanting) == 1 and len(free) == 1:
            claim(wanting[0], free[0])
        elif len(wanting) == len(orderable) and not unknown:
            for target, layer in zip(wanting, orderable, strict=True):
                claim(target, layer)
        else:
            result.unmatched.extend((t, tried.get(t.name, [])) for t in wanting)
            if unknown and len(wanting) == len(orderable):
                result.errors.append(
                    f"{src} does not record the order of the {_KIND_LABEL[kind]} layers "
                    f"{_quote(unknown)} (a .weights.h5 file keeps no order across nested or "
                    "attribute-held layers), so they cannot be matched by position; pass "
                    "mapping= with their paths, or load the .keras file, whose config records "
                    "the order"
                )
            elif parsed.ordered and orderable:
                result.errors.append(
                    f"the model has {len(wanting)} {_KIND_LABEL[kind]} module(s) left to "
                    f"match ({_quote(_label(t.name) for t in wanting)}) but {src} has "
                    f"{len(orderable)} such layer(s) left "
                    f"({_quote(lay.key for lay in orderable)}); "
                    "matching by order needs equal numbers"
                )
    return result


# ---------------------------------------------------------------------- loading


@dataclass
class _Plan:
    """What to copy into one module, and what is wrong with it."""

    copies: list[tuple[Tensor, Tensor, str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    stat_issue: str | None = None


def _as_tensor(value: Array | float, like: Tensor) -> Tensor:
    array = np.asarray(value)
    if like.dtype in (torch.long, torch.int32, torch.int64):
        array = np.rint(array)
    return torch.as_tensor(np.array(array, order="C")).to(dtype=like.dtype, device=like.device)


def _tensor_attr(module: nn.Module, name: str) -> Tensor | None:
    value = getattr(module, name, None)
    return value if isinstance(value, Tensor) else None


def _plan_copy(plan: _Plan, who: str, attr: str, dest: Tensor, value: Array, source: str) -> bool:
    if tuple(value.shape) != tuple(dest.shape):
        if value.size == dest.numel() and dest.dim() == 1:
            value = value.reshape(-1)  # Keras virtual_batch_size keeps (1, ..., C)
        else:
            plan.problems.append(
                f"{who}.{attr}: {source} has shape {list(value.shape)} but the module "
                f"expects {list(dest.shape)}"
            )
            return False
    plan.copies.append((dest, _as_tensor(value, dest), attr, source))
    return True


def _resolve_raw_bn(layer: _Layer, module: nn.Module, who: str, plan: _Plan) -> None:
    """Name the variables of a .weights.h5 batch norm from their count and the module."""
    assert layer.raw is not None
    count = len(layer.raw)
    renorm = count >= 5
    affine = count - 2 - (3 if renorm else 0)
    has_w = _tensor_attr(module, "weight") is not None
    has_b = _tensor_attr(module, "bias") is not None
    roles: list[str] | None = None
    if affine == 2:
        roles = ["gamma", "beta"]
    elif affine == 0:
        roles = []
    elif affine == 1 and has_w != has_b:
        roles = ["gamma"] if has_w else ["beta"]
    if roles is None:
        plan.problems.append(
            f"{who}: cannot tell which of the {count} unnamed variables of {layer.key!r} are "
            "gamma and beta (the .weights.h5 format stores no names); load the .keras file, "
            "whose config says, or build the module with the same center/scale as the layer"
        )
        return
    roles += ["moving_mean", "moving_variance"]
    if renorm:
        roles += ["moving_stddev", "renorm_mean", "renorm_stddev"]
    for role, (name, value) in zip(roles, layer.raw, strict=True):
        layer.arrays[role] = value
        layer.names[role] = name
    layer.raw = None


def _plan_batch_norm(target: _Target, layer: _Layer, trained: str | None) -> _Plan:
    plan = _Plan()
    module, who = target.module, _label(target.name)
    if layer.raw is not None:
        _resolve_raw_bn(layer, module, who, plan)
        if plan.problems:
            return plan
    arrays, names = layer.arrays, layer.names
    used: set[str] = set()
    for role, attr, neutral, option in (
        ("gamma", "weight", 1.0, "scale=True"),
        ("beta", "bias", 0.0, "center=True"),
    ):
        dest = _tensor_attr(module, attr)
        if role in arrays:
            used.add(role)
            if dest is not None:
                _plan_copy(plan, who, attr, dest, arrays[role], names[role])
            elif not np.all(arrays[role] == neutral):
                plan.problems.append(
                    f"{who}: {names[role]} holds a learned {role}, but the module has no "
                    f"{attr}; build it with {option} (affine=True for torch.nn layers)"
                )
        elif dest is not None:
            plan.copies.append((dest, torch.full_like(dest, neutral), attr, f"<{neutral:g}>"))
            plan.notes.append(
                f"{who}.{attr} set to {neutral:g}: {layer.key!r} has no {role} "
                f"(saved with {option.replace('True', 'False')})"
            )

    mean_dest = _tensor_attr(module, "running_mean")
    var_dest = _tensor_attr(module, "running_var")
    stats = ("moving_mean", "moving_variance")
    if mean_dest is None or var_dest is None:
        present = [names[s] for s in stats if s in arrays]
        if present:
            used.update(s for s in stats if s in arrays)
            plan.notes.append(
                f"{who} keeps no running statistics (track_running_stats=False): "
                f"{_quote(present)} not loaded"
            )
    else:
        missing = [s for s in stats if s not in arrays]
        if missing:
            plan.stat_issue = (
                f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
            )
        else:
            used.update(stats)
            mean, var = arrays["moving_mean"], arrays["moving_variance"]
            ok = _plan_copy(plan, who, "running_mean", mean_dest, mean, names["moving_mean"])
            ok = (
                _plan_copy(plan, who, "running_var", var_dest, var, names["moving_variance"]) and ok
            )
            if ok and trained is not None and np.all(mean == 0) and np.all(var == 1):
                plan.stat_issue = (
                    "moving_mean is exactly 0 and moving_variance exactly 1, their initial "
                    f"values, although the model was trained ({trained})"
                )

    derived_from: dict[str, Tensor] = {}
    for role, attr in (
        ("moving_mean/biased", "running_mean_biased"),
        ("moving_mean/local_step", "running_mean_local_step"),
        ("moving_variance/biased", "running_var_biased"),
        ("moving_variance/local_step", "running_var_local_step"),
        ("moving_stddev", "running_stddev"),
        ("renorm_mean", "renorm_mean"),
        ("renorm_stddev", "renorm_stddev"),
    ):
        dest = _tensor_attr(module, attr)
        if role in arrays and dest is not None:
            used.add(role)
            _plan_copy(plan, who, attr, dest, arrays[role], names[role])
        elif dest is not None:
            derived_from[attr] = dest
    if (
        derived_from
        and isinstance(module, BatchNorm)
        and mean_dest is not None
        and var_dest is not None
        and not plan.stat_issue
    ):
        mean_t = _as_tensor(arrays["moving_mean"].reshape(-1), mean_dest)
        var_t = _as_tensor(arrays["moving_variance"].reshape(-1), var_dest)
        derived = module._derived_statistics(mean_t, var_t)
        for attr, dest in derived_from.items():
            if attr in derived and derived[attr].shape == dest.shape:
                plan.copies.append((dest, derived[attr].to(dest), attr, "<derived>"))
        plan.notes.append(
            f"{who}: {_quote(derived_from)} not in the checkpoint; started from the "
            "loaded statistics as a fresh layer starts them"
        )
    counter = _tensor_attr(module, "num_batches_tracked")
    step_source = arrays.get("moving_mean/local_step")
    if counter is not None and step_source is not None:
        plan.copies.append(
            (
                counter,
                _as_tensor(step_source.reshape(()), counter),
                "num_batches_tracked",
                names["moving_mean/local_step"],
            )
        )
    for role in arrays:
        if role not in used and not any(names[role] == source for *_, source in plan.copies):
            plan.unused.append(names[role])
    plan.unused.extend(layer.extra)
    return plan


def _plan_kernel(target: _Target, layer: _Layer) -> _Plan:
    plan = _Plan()
    module, who = target.module, _label(target.name)
    if layer.raw is not None:
        roles = ["kernel", "bias"][: len(layer.raw)]
        for role, (name, value) in zip(roles, layer.raw, strict=False):
            layer.arrays[role] = value
            layer.names[role] = name
        layer.raw = None
    weight = _tensor_attr(module, "weight")
    bias = _tensor_attr(module, "bias")
    if isinstance(weight, nn.parameter.UninitializedParameter):
        plan.problems.append(f"{who}: lazy module not initialized; run one forward pass first")
        return plan
    kernel = layer.arrays.get("kernel")
    if kernel is None or weight is None:
        plan.problems.append(f"{who}: {layer.key!r} has no kernel/weights variable")
    else:
        converted = (
            kernel.T
            if kernel.ndim == 2
            else np.transpose(kernel, (kernel.ndim - 1, kernel.ndim - 2, *range(kernel.ndim - 2)))
        )
        if tuple(converted.shape) != tuple(weight.shape):
            layout = "[in, out]" if kernel.ndim == 2 else "[k..., in, out]"
            plan.problems.append(
                f"{who}.weight: {layer.names['kernel']} has TF shape {list(kernel.shape)} "
                f"{layout}, i.e. {list(converted.shape)} in PyTorch's layout, but the module "
                f"expects {list(weight.shape)}"
            )
        else:
            plan.copies.append(
                (weight, _as_tensor(converted, weight), "weight", layer.names["kernel"])
            )
    if "bias" in layer.arrays:
        if bias is not None:
            _plan_copy(plan, who, "bias", bias, layer.arrays["bias"], layer.names["bias"])
        elif np.any(layer.arrays["bias"] != 0):
            plan.problems.append(
                f"{who}: {layer.names['bias']} holds a learned bias but the module has none; "
                "build it with bias=True"
            )
    elif bias is not None:
        plan.copies.append((bias, torch.zeros_like(bias), "bias", "<0>"))
        plan.notes.append(f"{who}.bias set to 0: {layer.key!r} has no bias")
    plan.unused.extend(layer.extra)
    return plan


def _training_evidence(parsed: _Parsed) -> str | None:
    """Why we believe the checkpoint comes from a trained model, or None."""
    if parsed.step is not None and parsed.step > 0:
        return f"training step {parsed.step} is stored in the checkpoint"
    for layer in parsed.layers:
        if layer.kind not in (_BN, _BN_MAYBE):
            continue
        gamma, beta = layer.arrays.get("gamma"), layer.arrays.get("beta")
        if (gamma is not None and np.any(gamma != 1)) or (beta is not None and np.any(beta != 0)):
            return f"gamma/beta of {layer.key!r} moved from their initial values"
    return None


_WHAT_HAPPENED = {
    "missing": (
        "missing statistics: the checkpoint was probably written with "
        "Saver(var_list=tf.trainable_variables()) (or only trainable weights were exported). "
        "Moving means and variances are not trainable variables, so they were left out. "
        "Save with tf.compat.v1.train.Saver() (all global variables) instead."
    ),
    "never": (
        "never updated: the batch-norm update ops probably never ran - the train op was not "
        "built under tf.control_dependencies(tf.compat.v1.get_collection("
        "tf.compat.v1.GraphKeys.UPDATE_OPS)) (or the layers always ran with training=False), "
        "so the moving averages kept their initial values 0 and 1."
    ),
}


def _stats_message(issues: list[tuple[str, str, str]], source: str, function: str) -> str:
    lines = [
        f"{len(issues)} batch-norm layer(s) in {source} have no usable moving statistics; "
        "in eval mode the model would normalize with wrong values:"
    ]
    lines += [f"  - {_label(name)!r} <- {scope!r}: {issue}" for name, scope, issue in issues]
    lines.append("What probably happened:")
    kinds = {"missing" if "missing" in issue else "never" for *_, issue in issues}
    lines += [f"  {_WHAT_HAPPENED[k]}" for k in ("missing", "never") if k in kinds]
    lines += [
        "How to fix it:",
        "  1. Fix the TensorFlow training/saving code and save the checkpoint again.",
        "  2. Or load everything else with strict=False and re-estimate the statistics from "
        "training data (exact population statistics; parameters are left as loaded):",
        "",
        "         import bnkit",
        f"         report = bnkit.{function}(model, path, strict=False)",
        "         bnkit.recalibrate(model, train_inputs)  # a few hundred batches, no labels",
        "         model.eval()",
    ]
    return "\n".join(lines)


def _unmatched_message(matching: _Matching, parsed: _Parsed, claimed: set[str]) -> list[str]:
    lines: list[str] = []
    if matching.unmatched:
        lines.append(f"{len(matching.unmatched)} module(s) found no layer in {parsed.source}:")
        free_by_kind: dict[str, list[str]] = {}
        example: tuple[str, str] | None = None
        for target, tried in matching.unmatched:
            free = [
                lay.key
                for lay in sorted(parsed.layers, key=lambda lay: _natural_key(lay.key))
                if _compatible(target.kind, lay.kind) and lay.key not in claimed
            ]
            free_by_kind[target.kind] = free
            # Only names that say something: '1/BatchNorm' is close to every batch norm.
            telling = [
                c
                for c in tried or [target.name.replace(".", "/")]
                if any(not (p.isdigit() or p == "BatchNorm") for p in c.split("/"))
            ]
            hints = _close(telling, free)
            text = f"  - {_label(target.name)!r} ({type(target.module).__name__})"
            if tried:
                text += f": tried {_quote(tried)}"
            if hints:
                text += f"; close matches: {_quote(hints)}"
                example = example or (target.name, hints[0])
            lines.append(text)
        for kind, free in free_by_kind.items():
            shown = _quote(free) if free else "none"
            lines.append(f"Unclaimed {_KIND_LABEL[kind]} layers in the checkpoint: {shown}")
        if example is None:
            first = matching.unmatched[0][0].name
            sample = f"mapping={{{first!r}: '<scope or layer name>', ...}}"
        else:
            sample = f"mapping={{{example[0]!r}: {example[1]!r}}}"
        lines.append(
            f"Fix: pass {sample} (module name -> checkpoint scope/layer), or a callable; "
            "map a module to None to leave it as it is, or pass strict=False to load what "
            "matches and list the rest in the report."
        )
    return lines


def _load(
    model: nn.Module,
    parsed: _Parsed,
    mapping: ModuleMapping,
    strict: bool,
    function: str,
) -> ImportReport:
    targets = [
        _Target(name, module, kind)
        for name, module in model.named_modules()
        if (kind := _module_kind(module)) is not None
    ]
    _check_mapping(mapping, model, targets)
    matching = _match(parsed, targets, mapping)
    report = ImportReport(source=parsed.source, step=parsed.step)
    report.ignored_variables = list(parsed.ignored)
    report.skipped_modules = list(matching.skipped)
    report.unmatched_modules = [_label(t.name) for t, _ in matching.unmatched]
    trained = _training_evidence(parsed)

    plans: dict[str, tuple[_Layer, _Plan]] = {}
    stat_issues: list[tuple[str, str, str]] = []
    for target in targets:
        layer = matching.pairs.get(target.name)
        if layer is None:
            continue
        if target.kind == _BN:
            plan = _plan_batch_norm(target, layer, trained)
        else:
            plan = _plan_kernel(target, layer)
        plans[target.name] = (layer, plan)
        if plan.stat_issue:
            stat_issues.append((target.name, layer.key, plan.stat_issue))

    claimed = {layer.key for layer, _ in plans.values()}
    shape_problems = [p for _, plan in plans.values() for p in plan.problems]
    unmatched_lines = _unmatched_message(matching, parsed, claimed)
    report.problems.extend(matching.errors)
    report.problems.extend(f"{_label(t.name)}: no layer found" for t, _ in matching.unmatched)
    report.problems.extend(shape_problems)
    report.problems.extend(
        f"{_label(name)} <- {scope}: {issue} ("
        + ("left at the module's values" if "missing" in issue else "loaded as they are")
        + "; re-estimate them before evaluating)"
        for name, scope, issue in stat_issues
    )
    if strict and (matching.errors or unmatched_lines or shape_problems or stat_issues):
        sections: list[str] = []
        if matching.errors:
            sections.append(
                "Ambiguous or impossible matches:\n"
                + "\n".join(f"  - {e}" for e in matching.errors)
            )
        if unmatched_lines:
            sections.append("\n".join(unmatched_lines))
        if shape_problems:
            sections.append(
                "Values that do not fit their module:\n"
                + "\n".join(f"  - {p}" for p in shape_problems)
                + "\nFix: build the PyTorch layers with the TF layers' sizes, or map the "
                "module to the right scope with mapping=."
            )
        if stat_issues:
            sections.append(_stats_message(stat_issues, parsed.source, function))
        sections.append("Nothing was loaded (strict=True).")
        raise CheckpointImportError(
            f"{function}: cannot load {parsed.source} into the model.\n\n" + "\n\n".join(sections),
            report,
        )

    with torch.no_grad():
        for name, (layer, plan) in plans.items():
            for dest, value, _, _ in plan.copies:
                dest.copy_(value)
            variables = {attr: source for _, _, attr, source in plan.copies}
            if variables:
                report.loaded[_label(name)] = LoadedLayer(layer.key, variables)
            report.notes.extend(plan.notes)
            report.unused_variables.extend(plan.unused)
    for layer in parsed.layers:
        if layer.key not in claimed:
            report.unused_variables.extend(layer.var_names())
    report.unused_variables.extend(parsed.unused)
    if report.problems:
        warnings.warn(
            f"{function}(strict=False) loaded {len(report.loaded)} module(s) from "
            f"{parsed.source} with {len(report.problems)} problem(s):\n"
            + "\n".join(f"  - {p}" for p in report.problems)
            + ("\n" + _stats_message(stat_issues, parsed.source, function) if stat_issues else ""),
            UserWarning,
            stacklevel=3,
        )
    return report


def _shorten(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit})" if len(items) > limit else "")
