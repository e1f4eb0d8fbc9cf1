"""Whole-model batch-norm tools: swap layers, freeze them, fold them, switch modes.

``convert(model, **options)`` replaces every ``torch.nn`` batch-norm layer with its bnkit
equivalent; ``to_torch(model)`` goes back wherever torch can express the layer's configuration.
``freeze(model)`` / ``unfreeze(model)`` pin every batch-norm layer to its running statistics
and release it again. These follow ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: they
recurse through the model, re-attach only the children that changed, and return the (possibly
new) root. They are all-or-nothing: every layer is checked and every replacement is built
before the model is touched, so an error leaves the model exactly as it was.

``fold(model)`` builds a new inference model with each batch-norm layer that directly follows a
convolution or linear layer folded into that layer's weights, and reports what it did.
``eval_mode(model)`` / ``train_mode(model)`` switch a whole model's mode for a ``with`` block
and restore every submodule's own flag afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import itertools
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypeVar, cast

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.lazy import LazyModuleMixin

from bnkit import functional as bnf
from bnkit.modules import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = [
    "FoldReport",
    "FoldResult",
    "FoldedPair",
    "RankCheck",
    "SkippedNorm",
    "convert",
    "eval_mode",
    "fold",
    "freeze",
    "to_torch",
    "train_mode",
    "unfreeze",
]

_HALF = (torch.float16, torch.bfloat16)

# torch class -> bnkit class. SyncBatchNorm accepts any rank >= 2, like the generic BatchNorm.
_TO_BNKIT: dict[type[nn.Module], type[BatchNorm]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
    nn.SyncBatchNorm: BatchNorm,
}
_TO_TORCH: dict[type[BatchNorm], type[_BatchNorm]] = {
    BatchNorm1d: nn.BatchNorm1d,
    BatchNorm2d: nn.BatchNorm2d,
    BatchNorm3d: nn.BatchNorm3d,
}
_GENERIC_TARGETS: tuple[type[_BatchNorm], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
)

# Options that would contradict the state being carried over, with the reason.
_FIXED_OPTIONS: dict[str, str] = {
    "num_features": "it comes from the layer",
    "axis": "torch.nn batch norm always normalizes over channel axis 1",
    "affine": "it comes from the layer's parameters",
    "center": "it comes from the layer's parameters",
    "scale": "it comes from the layer's parameters",
    "track_running_stats": "it comes from the layer's buffers",
    "device": "the layer's tensors are kept where they are",
    "dtype": "the layer's tensors are kept in their dtype",
    "weight_init": "the layer's trained weight is kept",
    "bias_init": "the layer's trained bias is kept",
    "running_mean_init": "the layer's running_mean is kept",
    "running_var_init": "the layer's running_var is kept",
}
_BNKIT_OPTIONS = frozenset(inspect.signature(BatchNorm.__init__).parameters) - {"self"}

_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)

_TORCH_HAS_BIAS_FLAG = "bias" in inspect.signature(nn.BatchNorm2d.__init__).parameters


# ----------------------------------------------------------------------------- walking


def _walk(root: nn.Module, stop: Callable[[nn.Module], bool]) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(path, module)`` for every distinct module, depth first, root first.

    A module that appears under several names is yielded once (with its first path); the
    children of modules for which ``stop`` is true are not visited.
    """
    seen: set[int] = set()

    def visit(module: nn.Module, path: str) -> Iterator[tuple[str, nn.Module]]:
        if id(module) in seen:
            return
        seen.add(id(module))
        yield path, module
        if stop(module):
            return
        for name, child in module.named_children():
            yield from visit(child, f"{path}.{name}" if path else name)

    yield from visit(root, "")


def _replace(root: nn.Module, new: dict[int, nn.Module]) -> nn.Module:
    """Re-attach the replacements in ``new`` (keyed by ``id`` of the old module) everywhere."""
    if id(root) in new:
        return new[id(root)]
    seen: set[int] = set()

    def visit(module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        # Not named_children(): it yields a module shared under several names only once.
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            if id(child) in new:
                module.add_module(name, new[id(child)])
            else:
                visit(child)

    visit(root)
    return root


def _label(path: str) -> str:
    return path or "<root>"


def _hooks(module: nn.Module) -> list[str]:
    """Names of the hook kinds registered on ``module`` itself."""
    return [name.strip("_") for name in _HOOK_DICTS if getattr(module, name, None)]


def _hook_error(func: str, hooked: list[tuple[str, nn.Module, list[str]]]) -> ValueError:
    lines = "\n".join(
        f"  - {_label(p)} ({type(m).__name__}): {', '.join(kinds)}" for p, m, kinds in hooked
    )
    return ValueError(
        f"bnkit.{func}: these batch-norm layers have hooks registered on them, which a new "
        f"module would not carry; nothing was converted:\n{lines}\n"
        "Fix: remove the hooks (handle.remove()), convert, then register them again on the "
        "modules of the returned model."
    )


def _factory(*tensors: Tensor | None) -> tuple[torch.device | None, torch.dtype | None]:
    for t in tensors:
        if t is not None:
            return t.device, t.dtype
    return None, None


# ----------------------------------------------------------------------------- convert


def _check_options(options: dict[str, Any]) -> None:
    """Reject unknown or state-contradicting options, and bad values, before any walking."""
    unknown = sorted(set(options) - _BNKIT_OPTIONS)
    if unknown:
        allowed = sorted(_BNKIT_OPTIONS - set(_FIXED_OPTIONS))
        raise TypeError(
            f"bnkit.convert got unknown option(s) {unknown}; options are bnkit.BatchNorm "
            f"keywords applied to every converted layer: {', '.join(allowed)}"
        )
    fixed = [f"{k} ({_FIXED_OPTIONS[k]})" for k in options if k in _FIXED_OPTIONS]
    if fixed:
        raise TypeError(
            f"bnkit.convert cannot set {'; '.join(fixed)}. Convert first, then build a new "
            "bnkit layer yourself where you want a different structure."
        )
    # A probe layer validates the values (bad running_var, momentum and decay together, ...).
    BatchNorm(1, **_fresh(options))


def _fresh(options: dict[str, Any]) -> dict[str, Any]:
    """Options for one layer: module-valued options (activation=nn.PReLU()) are deep-copied
    so converted layers never share parameters through them."""
    return {k: copy.deepcopy(v) if isinstance(v, nn.Module) else v for k, v in options.items()}


def _to_bnkit(old: _BatchNorm, options: dict[str, Any]) -> BatchNorm:
    """Build the bnkit layer for ``old``; shares its Parameters and running buffers."""
    cls = _TO_BNKIT[type(old)]
    weight: Tensor | None = old.weight
    bias: Tensor | None = old.bias
    mean, var, count = old.running_mean, old.running_var, old.num_batches_tracked
    tracked = mean is not None and var is not None
    if bool(old.track_running_stats) != tracked or (tracked and count is None):
        raise ValueError(
            f"track_running_stats={old.track_running_stats} but running_mean/running_var/"
            "num_batches_tracked are "
            f"{'present' if mean is not None else 'None'}/"
            f"{'present' if var is not None else 'None'}/"
            f"{'present' if count is not None else 'None'}; this state was edited by hand "
            "and its torch semantics are ambiguous. Fix: restore a consistent state (e.g. "
            "build the layer with track_running_stats=False instead of setting the flag)"
        )
    if weight is None and bias is not None and cls is not BatchNorm:
        raise ValueError(
            f"the layer has a bias but no weight, which torch.nn.{type(old).__name__}'s "
            "constructor cannot produce; Fix: give it a weight, or build a "
            "bnkit.BatchNorm(center=True, scale=False) yourself"
        )
    device, dtype = _factory(weight, bias, mean, var)
    settings: dict[str, Any] = {"eps": old.eps, "momentum": old.momentum}
    if "decay" in options:
        del settings["momentum"]
    if isinstance(old, nn.SyncBatchNorm) and "sync" not in options:
        # Synchronization carries over, with the layer's own process group.
        settings["sync"] = True
        settings["process_group"] = old.process_group
    settings.update(_fresh(options))
    new: BatchNorm
    build: Callable[..., BatchNorm] = cls
    if cls is BatchNorm:
        new = BatchNorm(
            old.num_features,
            axis=1,
            center=bias is not None,
            scale=weight is not None,
            track_running_stats=tracked,
            device=device,
            dtype=dtype,
            **settings,
        )
    else:
        new = build(
            old.num_features,
            affine=weight is not None,
            track_running_stats=tracked,
            device=device,
            dtype=dtype,
            bias=bias is not None,
            **settings,
        )
    new.register_parameter("weight", old.weight)
    new.register_parameter("bias", old.bias)
    if tracked:
        assert mean is not None
        assert var is not None
        # bnkit keeps half-precision layers' statistics in float32 (exact upcast).
        new.running_mean = mean.float() if mean.dtype in _HALF else mean
        new.running_var = var.float() if var.dtype in _HALF else var
        new.num_batches_tracked = count
        # Options that add statistics start them from the carried-over ones, as a fresh
        # layer starts them from its initial running_mean/running_var.
        new._start_option_statistics()
    new.train(old.training)
    return new


def convert(model: nn.Module, **options: Any) -> nn.Module:
    """Replace every ``torch.nn`` batch-norm layer of ``model`` with its bnkit equivalent.

    ``torch.nn.BatchNorm1d/2d/3d`` (and materialized ``LazyBatchNorm1d/2d/3d``) become
    ``bnkit.BatchNorm1d/2d/3d``; ``torch.nn.SyncBatchNorm``, which accepts any input rank
    >= 2, becomes ``bnkit.BatchNorm(axis=1, sync=True)`` with its ``process_group`` (unless
    ``sync`` is among the options). Each new layer keeps the old layer's
    Parameters (the same objects, so optimizers holding them keep working), its running
    statistics and ``num_batches_tracked`` (the same tensors), ``eps``, ``momentum``
    (``None`` included), affine and ``track_running_stats`` configuration, device, dtype and
    training mode. With no options the converted model computes bit-identical outputs and
    running statistics.

    Nothing is changed unless every layer can be converted: options, lazy layers and hooks
    are all checked, and every new layer is built, before the first one is attached.

    Args:
        model: any module; it may itself be a batch-norm layer.
        **options: ``bnkit.BatchNorm`` keywords applied to every converted layer, e.g.
            ``running_var="biased"``, ``warmup=True``, ``renorm=True``, ``activation="relu"``,
            or ``momentum``/``decay``/``eps`` to override the layers' own; ``sync=True``
            (with an optional ``process_group``) synchronizes the batch statistics of every
            converted layer across processes (see docs/distributed.md). Options fixed by
            the carried-over state (``affine``, ``center``, ``scale``,
            ``track_running_stats``, ``axis``, ``device``, ``dtype``, ``*_init``) are refused.
            Module-valued options (``activation=nn.PReLU()``) are deep-copied per layer.

    Returns:
        The root: ``model`` itself with its batch-norm children replaced, or a new module
        when ``model`` is a batch-norm layer.

    Raises:
        TypeError: an unknown option, or one fixed by the carried-over state.
        ValueError: a bad option value (also one invalid for a particular layer, e.g.
            ``renorm=True`` on a layer with ``track_running_stats=False``; the message names
            the layer); an uninitialized lazy batch-norm layer; a batch-norm layer with hooks.

    Warns:
        UserWarning: for subclasses of torch's batch norm that are not torch's own classes
            (e.g. timm's ``BatchNormAct2d``), which are left unchanged because their forward
            may differ. The warning is issued before the model is touched.

    Notes:
        Layers that are already bnkit modules are left unchanged, even when options are given.
        Options that add statistics start them from the carried-over ones (renorm's
        ``running_stddev``/``renorm_stddev`` = sqrt(running_var), ``renorm_mean`` =
        running_mean); ``zero_debias`` starts from zero, so the next training step replaces the
        running estimate (TensorFlow's semantics: the initial value is ignored). A layer used
        at several places in the model is replaced by one new layer at all of them.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> net = convert(net, running_var="biased")
        >>> net[1]
        BatchNorm2d(8, eps=1e-05, momentum=0.1 (decay=0.9), running_var='biased')
    """
    _check_options(options)
    lazy: list[str] = []
    hooked: list[tuple[str, nn.Module, list[str]]] = []
    foreign: list[str] = []
    found: list[tuple[str, _BatchNorm]] = []
    for path, module in _walk(model, lambda m: isinstance(m, (_BatchNorm, BatchNorm))):
        if not isinstance(module, _BatchNorm):
            continue
        if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
            lazy.append(path)
        elif type(module) not in _TO_BNKIT:
            foreign.append(f"{_label(path)} ({type(module).__name__})")
        elif kinds := _hooks(module):
            hooked.append((path, module, kinds))
        else:
            found.append((path, module))
    if lazy:
        raise ValueError(
            "bnkit.convert: these lazy batch-norm layers have not seen any input yet, so their "
            f"number of features is unknown: {', '.join(map(_label, lazy))}. Nothing was "
            "converted. Fix: run one forward pass first (e.g. model(example_batch)), then "
            "convert."
        )
    if hooked:
        raise _hook_error("convert", hooked)
    new: dict[int, nn.Module] = dict(_convert_each("convert", found, options, "converted"))
    if foreign:
        warnings.warn(
            "bnkit.convert: these layers subclass torch's batch norm with classes bnkit does "
            f"not know, and were left unchanged: {', '.join(foreign)}. Convert them yourself "
            "if their forward is plain batch norm.",
            UserWarning,
            stacklevel=2,
        )
    return _replace(model, new)


# ---------------------------------------------------------------------------- to_torch


def _torch_blockers(module: BatchNorm, generic_as: type[_BatchNorm] | None) -> list[str]:
    """Why torch.nn cannot express ``module`` (empty when it can)."""
    reasons: list[str] = []
    if type(module) is BatchNorm:
        # A synchronized layer becomes SyncBatchNorm, which accepts any rank.
        if generic_as is None and not module.sync:
            reasons.append(
                "bnkit.BatchNorm accepts any input rank and torch's classes check it; pass "
                "generic_as=torch.nn.BatchNorm1d/2d/3d (or torch.nn.SyncBatchNorm)"
            )
    elif type(module) not in _TO_TORCH:
        reasons.append(f"{type(module).__name__} is a subclass bnkit does not know")
    if module.axis != 1:
        reasons.append(f"axis={module.axis} (torch normalizes over axis 1)")
    if module.running_var_mode != "unbiased":
        reasons.append(
            f"running_var={module.running_var_mode!r} (torch feeds the unbiased variance)"
        )
    for name in ("warmup", "zero_debias", "renorm", "virtual_batch_size", "adjustment"):
        value = getattr(module, name)
        if value is not None and value is not False:
            reasons.append(f"{name}={value!r}")
    if module.activation is not None:
        reasons.append(f"activation={module.activation!r} (torch's batch norm has none)")
    if module.center and not module.scale:
        reasons.append("center=True, scale=False (torch has no bias without a weight)")
    elif module.scale and not module.center and not _TORCH_HAS_BIAS_FLAG:
        reasons.append("scale=True, center=False (this torch has no bias=False)")
    return reasons


def _to_torch(old: BatchNorm, cls: type[_BatchNorm]) -> _BatchNorm:
    """Build the torch layer for ``old``; shares its Parameters and running buffers."""
    weight, bias = old.weight, old.bias
    device, dtype = _factory(weight, bias, old.running_mean, old.running_var)
    kwargs: dict[str, Any] = {}
    if weight is not None and bias is None:
        kwargs["bias"] = False
    new = cls(
        old.num_features,
        eps=old.eps,
        momentum=old.momentum,
        affine=weight is not None,
        track_running_stats=old.track_running_stats,
        device=device,
        dtype=dtype,
        **kwargs,
    )
    if isinstance(new, nn.SyncBatchNorm):
        new.process_group = old.process_group if old.sync else None
    new.register_parameter("weight", weight)
    new.register_parameter("bias", bias)
    if old.track_running_stats:
        mean, var = old.running_mean, old.running_var
        assert mean is not None
        assert var is not None
        if weight is not None and weight.dtype in _HALF:
            # torch keeps the statistics in the layer's dtype (its CPU kernel requires it).
            mean, var = mean.to(weight.dtype), var.to(weight.dtype)
        new.running_mean = mean
        new.running_var = var
        new.num_batches_tracked = old.num_batches_tracked
    new.train(old.training)
    return new


def to_torch(
    model: nn.Module,
    *,
    strict: bool = True,
    generic_as: type[nn.Module] | None = None,
) -> nn.Module:
    """Replace bnkit batch-norm layers with ``torch.nn`` ones where torch can express them.

    ``bnkit.BatchNorm1d/2d/3d`` become ``torch.nn.BatchNorm1d/2d/3d``. The generic
    ``bnkit.BatchNorm`` accepts any input rank while each torch class checks it, so it is
    converted only to the class named by ``generic_as``. Layers with ``sync=True`` become
    ``torch.nn.SyncBatchNorm`` with their ``process_group`` (torch's SyncBatchNorm
    synchronizes only GPU input, and raises on CPU input under an initialized group). The
    new layers keep the Parameters and running buffers (the same objects), ``eps``,
    ``momentum``, affine configuration (``center=False, scale=True`` becomes torch's
    ``bias=False``), ``track_running_stats`` and training mode. Half-precision layers get
    their float32 statistics cast to the layer's dtype, as torch keeps them.

    torch can express a layer with ``axis=1``, ``running_var="unbiased"`` and none of
    ``warmup``, ``zero_debias``, ``renorm``, ``virtual_batch_size``, ``adjustment``,
    ``activation``, and not ``center=True, scale=False``. Custom ``*_init`` values are not
    carried over (the current values are): torch's ``reset_parameters`` resets to 1/0.

    Args:
        model: any module; it may itself be a bnkit layer.
        strict: with True, raise if any layer cannot be expressed; with False, leave those
            layers as bnkit modules and convert the rest.
        generic_as: the torch class for generic ``bnkit.BatchNorm`` layers:
            ``torch.nn.BatchNorm1d``, ``BatchNorm2d``, ``BatchNorm3d`` or ``SyncBatchNorm``
            (the last accepts any rank, and synchronizes under ``torch.distributed``).

    Returns:
        The root: ``model`` with its bnkit children replaced, or a new module when ``model``
        is a convertible bnkit layer.

    Raises:
        ValueError: with ``strict=True``, some layers cannot be expressed (the message lists
            each layer's path and reasons); a bnkit layer has hooks registered. Nothing is
            converted then.
        TypeError: ``generic_as`` is not one of the classes above.

    Example:
        >>> import bnkit
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), bnkit.BatchNorm1d(8))
        >>> to_torch(net)[1]
        BatchNorm1d(8, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)
    """
    target: type[_BatchNorm] | None = None
    if generic_as is not None:
        matches = [cls for cls in _GENERIC_TARGETS if cls is generic_as]
        if not matches:
            raise TypeError(
                "generic_as must be torch.nn.BatchNorm1d, BatchNorm2d, BatchNorm3d or "
                f"SyncBatchNorm, got {generic_as!r}"
            )
        target = matches[0]
    blocked: list[tuple[str, BatchNorm, list[str]]] = []
    hooked: list[tuple[str, nn.Module, list[str]]] = []
    found: list[tuple[BatchNorm, type[_BatchNorm]]] = []
    for path, module in _walk(model, lambda m: isinstance(m, (_BatchNorm, BatchNorm))):
        if not isinstance(module, BatchNorm):
            continue
        reasons = _torch_blockers(module, target)
        if reasons:
            blocked.append((path, module, reasons))
        elif kinds := _hooks(module):
            hooked.append((path, module, kinds))
        else:
            cls = nn.SyncBatchNorm if module.sync else _TO_TORCH.get(type(module), target)
            assert cls is not None
            found.append((module, cls))
    if blocked and strict:
        lines = "\n".join(
            f"  - {_label(p)} ({type(m).__name__}): {'; '.join(r)}" for p, m, r in blocked
        )
        raise ValueError(
            f"bnkit.to_torch: {len(blocked)} layer(s) use options that torch.nn batch norm "
            f"cannot express; nothing was converted:\n{lines}\n"
            "Fix:\n"
            "  1. pass strict=False to keep these layers as bnkit modules and convert the rest;\n"
            "  2. rebuild them without those options (the numerics will change);\n"
            "  3. for generic bnkit.BatchNorm layers, pass generic_as= the torch class that "
            "matches their input rank."
        )
    if hooked:
        raise _hook_error("to_torch", hooked)
    new: dict[int, nn.Module] = {id(m): _to_torch(m, cls) for m, cls in found}
    return _replace(model, new)


# ------------------------------------------------------------------------------ freeze

# γ/β requires_grad flags before freeze(affine_trainable=False), for unfreeze.
_SAVED_FLAGS = "_bnkit_requires_grad"


def _no_statistics(module: nn.Module) -> bool:
    tracked = bool(getattr(module, "track_running_stats", False))
    return not tracked or getattr(module, "running_mean", None) is None


def freeze(model: nn.Module, *, affine_trainable: bool = False) -> nn.Module:
    """Pin every batch-norm layer of ``model`` to its running statistics.

    A frozen layer normalizes with its running statistics and never updates them, in training
    mode too, so ``model.train()`` (fine-tuning, a training loop that switches modes) does not
    unfreeze it::

        y = (x - running_mean) / sqrt(running_var + eps) · γ + β      # always

    bnkit layers (and their subclasses, e.g. the presets) get ``layer.frozen = True``.
    ``torch.nn`` batch-norm layers (``BatchNorm1d/2d/3d``, materialized lazy ones,
    ``SyncBatchNorm``) are first replaced by their bnkit equivalent exactly as
    :func:`convert` does (same Parameters, statistics, device, dtype and training mode) and
    then frozen; a frozen ``SyncBatchNorm`` has nothing left to synchronize. The flag is part
    of the state dict (a ``frozen`` buffer), so saving and loading keeps layers frozen.

    Gradients still flow through a frozen layer to its input. With
    ``affine_trainable=False`` (the default) γ and β also stop learning: their
    ``requires_grad`` becomes False, and the previous flags are remembered on the layer for
    :func:`unfreeze`. ``requires_grad`` is not part of a state dict.

    Args:
        model: any module; it may itself be a batch-norm layer.
        affine_trainable: keep γ and β trainable. True also gives back the flags a previous
            ``freeze(affine_trainable=False)`` took away.

    Returns:
        The root: ``model`` with its torch batch-norm children replaced, or a new module when
        ``model`` itself is a torch batch-norm layer.

    Raises:
        ValueError: nothing is changed when some layer cannot be frozen: a layer with
            ``track_running_stats=False`` (it has no statistics to freeze on), an
            uninitialized lazy layer, a torch layer with hooks, or a subclass of torch's batch
            norm that bnkit does not know (the message lists every such layer).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = freeze(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
        >>> net[1].frozen, net[1].weight.requires_grad
        (True, False)
        >>> _ = net(torch.randn(2, 3, 5, 5))
        >>> int(net[1].num_batches_tracked)  # no update in training mode
        0
    """
    problems: list[str] = []
    hooked: list[tuple[str, nn.Module, list[str]]] = []
    torch_layers: list[tuple[str, _BatchNorm]] = []
    layers: list[BatchNorm] = []
    for path, module in _walk(model, lambda m: isinstance(m, (_BatchNorm, BatchNorm))):
        if isinstance(module, BatchNorm):
            if _no_statistics(module):
                problems.append(f"{_label(path)} ({type(module).__name__}): no running statistics")
            else:
                layers.append(module)
        elif isinstance(module, _BatchNorm):
            name = f"{_label(path)} ({type(module).__name__})"
            if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
                problems.append(f"{name}: lazy layer that has not seen any input yet")
            elif type(module) not in _TO_BNKIT:
                problems.append(f"{name}: a subclass bnkit does not know (its forward may differ)")
            elif _no_statistics(module):
                problems.append(f"{name}: no running statistics")
            elif kinds := _hooks(module):
                hooked.append((path, module, kinds))
            else:
                torch_layers.append((path, module))
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ValueError(
            f"bnkit.freeze: {len(problems)} batch-norm layer(s) cannot be frozen; nothing was "
            f"changed:\n{lines}\n"
            "Fix:\n"
            "  1. track_running_stats=False: a frozen layer normalizes with running statistics "
            "and these have none; rebuild the layer with track_running_stats=True and estimate "
            "them (bnkit.recalibrate), or leave it out of the model you freeze;\n"
            "  2. lazy layers: run one forward pass first (model(example_batch));\n"
            "  3. unknown subclasses: convert them to bnkit layers yourself, then freeze."
        )
    if hooked:
        raise _hook_error("freeze", hooked)
    converted = _convert_each("freeze", torch_layers, {}, "changed")
    layers.extend(converted.values())
    for layer in layers:
        layer.frozen = True
        if affine_trainable:
            _restore_requires_grad(layer)
        else:
            if not hasattr(layer, _SAVED_FLAGS):
                flags = {n: p.requires_grad for n, p in _affine(layer).items()}
                object.__setattr__(layer, _SAVED_FLAGS, flags)
            for p in _affine(layer).values():
                p.requires_grad_(False)
    return _replace(model, dict(converted))


def _convert_each(
    func: str, found: list[tuple[str, _BatchNorm]], options: dict[str, Any], outcome: str
) -> dict[int, BatchNorm]:
    """bnkit equivalents of torch layers, by id; an error names the layer that failed."""
    new: dict[int, BatchNorm] = {}
    for path, module in found:
        try:
            new[id(module)] = _to_bnkit(module, options)
        except (TypeError, ValueError) as err:
            raise type(err)(
                f"bnkit.{func}: cannot convert {_label(path)} ({type(module).__name__}); "
                f"nothing was {outcome}: {err}"
            ) from err
    return new


def _affine(layer: BatchNorm) -> dict[str, nn.Parameter]:
    return {n: p for n, p in (("weight", layer.weight), ("bias", layer.bias)) if p is not None}


def _restore_requires_grad(layer: BatchNorm) -> None:
    flags: dict[str, bool] | None = layer.__dict__.pop(_SAVED_FLAGS, None)
    if flags is None:
        return
    for name, p in _affine(layer).items():
        p.requires_grad_(flags.get(name, True))


def unfreeze(model: nn.Module) -> nn.Module:
    """Let every batch-norm layer of ``model`` use batch statistics in training mode again.

    Sets ``layer.frozen = False`` on every bnkit layer and gives γ and β back the
    ``requires_grad`` flags they had before :func:`freeze` took them away (a layer frozen by
    loading a state dict has no such memory; its flags are left as they are). Layers that
    :func:`freeze` converted from ``torch.nn`` stay bnkit layers, with bit-identical numerics;
    :func:`to_torch` converts them back. Layers that are not frozen are left alone.

    Args:
        model: any module; it may itself be a batch-norm layer.

    Returns:
        ``model`` itself (for symmetry with :func:`freeze`).

    Example:
        >>> from torch import nn
        >>> net = unfreeze(freeze(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))))
        >>> net[1].frozen, net[1].weight.requires_grad, type(net[1]).__module__
        (False, True, 'bnkit.modules')
    """
    for _, module in _walk(model, lambda m: isinstance(m, (_BatchNorm, BatchNorm))):
        if isinstance(module, BatchNorm):
            module.frozen = False
            _restore_requires_grad(module)
    return model


# -------------------------------------------------------------------------------- mode

_M = TypeVar("_M", bound=nn.Module)


@contextlib.contextmanager
def _mode(model: _M, training: bool) -> Iterator[_M]:
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.train(training)
        yield model
    finally:
        # Exactly the previous flags, module by module (not model.train(root_flag), which
        # would also overwrite submodules that were in the other mode on purpose).
        for module, flag in flags:
            module.training = flag


def eval_mode(model: _M) -> contextlib.AbstractContextManager[_M]:
    """Put the whole model in evaluation mode for a ``with`` block, then restore every flag.

    On exit (also on an exception) every submodule gets back its own previous ``training``
    flag, so a model with some layers deliberately in eval mode comes back exactly as it was.

    Args:
        model: any module.

    Returns:
        A context manager that yields ``model``.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2).eval())
        >>> with eval_mode(net):
        ...     print(net.training, net[1].training)
        False False
        >>> net.training, net[0].training, net[1].training
        (True, True, False)
    """
    return _mode(model, False)


def train_mode(model: _M) -> contextlib.AbstractContextManager[_M]:
    """Put the whole model in training mode for a ``with`` block, then restore every flag.

    The counterpart of :func:`eval_mode`: on exit (also on an exception) every submodule gets
    back its own previous ``training`` flag. Frozen bnkit layers (:func:`freeze`) keep using
    their running statistics inside the block.

    Args:
        model: any module.

    Returns:
        A context manager that yields ``model``.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval()
        >>> with train_mode(net):
        ...     print(net[1].training)
        True
        >>> net[1].training
        False
    """
    return _mode(model, True)


# -------------------------------------------------------------------------------- fold

_CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED: tuple[type[nn.Module], ...] = (
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_FOLD_INTO = (*_CONVS, *_TRANSPOSED, nn.Linear)

# Activation names of bnkit layers -> the torch module that computes the same function.
_ACTIVATION_MODULES: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
}


@dataclass(frozen=True)
class FoldedPair:
    """One batch-norm layer folded into the layer that feeds it.

    Attributes:
        layer: path of the Conv/ConvTranspose/Linear layer whose weights now include the norm.
        norm: path of the batch-norm layer that was folded.
        replaced_by: what now stands where the norm was (``Identity``, its activation, or a
            :class:`RankCheck`).
    """

    layer: str
    norm: str
    replaced_by: str


@dataclass(frozen=True)
class SkippedNorm:
    """A batch-norm layer that :func:`fold` left in place.

    Attributes:
        norm: path of the batch-norm layer.
        layer: path of the layer that feeds it, when known.
        reason: why it was not folded.
    """

    norm: str
    layer: str | None
    reason: str


@dataclass(frozen=True)
class FoldReport:
    """What :func:`fold` did: the folded pairs, the layers left alone and why.

    Attributes:
        folded: the folded (layer, norm) pairs, in module order.
        skipped: the batch-norm layers left in place, each with its reason.
        dataflow: ``"fx"`` when the pairs were found in the dataflow graph from
            ``torch.fx``; ``"sequential"`` when tracing failed and only adjacent children of
            ``nn.Sequential`` containers were considered.
        notes: anything else worth knowing (why tracing failed, tracer warnings).
    """

    folded: tuple[FoldedPair, ...]
    skipped: tuple[SkippedNorm, ...]
    dataflow: Literal["fx", "sequential"]
    notes: tuple[str, ...] = ()

    def __str__(self) -> str:
        source = {"fx": "torch.fx", "sequential": "nn.Sequential adjacency only"}[self.dataflow]
        lines = [
            f"bnkit.fold: folded {len(self.folded)} batch-norm layer(s), left "
            f"{len(self.skipped)} in place (dataflow: {source})"
        ]
        if self.folded:
            lines.append("folded:")
            lines += [f"  - {p.norm} into {p.layer} -> {p.replaced_by}" for p in self.folded]
        if self.skipped:
            lines.append("left in place:")
            lines += [f"  - {s.norm}: {s.reason}" for s in self.skipped]
        if self.notes:
            lines.append("notes:")
            lines += [f"  - {n}" for n in self.notes]
        return "\n".join(lines)


class FoldResult(NamedTuple):
    """The return value of :func:`fold`: unpack it as ``folded_model, report``."""

    model: nn.Module
    report: FoldReport


class RankCheck(nn.Module):
    """Stands where :func:`fold` removed a batch-norm layer whose channel axis matches the
    folded layer's only at one input rank; any other rank raises instead of computing
    something the original model did not.

    Args:
        rank: the input rank at which the fold is exact.
        norm: path of the folded batch-norm layer (for the error message).
    """

    def __init__(self, rank: int, norm: str) -> None:
        super().__init__()
        self.rank = rank
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.rank:
            raise ValueError(
                f"bnkit.fold folded the batch norm {self.norm!r} into the layer before it "
                f"assuming {self.rank}-D input there, where its channel axis is that layer's "
                f"output-feature axis; got {x.dim()}-D input of shape {tuple(x.shape)}. Fold "
                "is exact only for the shapes the original model normalized per feature: use "
                "the unfolded model for this input."
            )
        return x

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


class _ActivationModule(nn.Module):
    """A bnkit layer's callable activation as a module (for callables that are not modules)."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def _get_name(self) -> str:
        return "Activation"

    def extra_repr(self) -> str:
        fn = self.fn
        if isinstance(fn, functools.partial):
            args = [repr(a) for a in fn.args] + [f"{k}={v!r}" for k, v in fn.keywords.items()]
            return ", ".join([getattr(fn.func, "__name__", repr(fn.func)), *args])
        return getattr(fn, "__name__", repr(fn))


class _FoldTracer(fx.Tracer):
    """torch.fx tracer that keeps every batch-norm layer (bnkit or torch) as one call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (BatchNorm, _BatchNorm)):
            return True
        leaf: bool = super().is_leaf_module(m, module_qualified_name)
        return leaf


def _known_norm_classes() -> tuple[type[nn.Module], ...]:
    """Classes whose inference forward is exactly the running-statistics affine map."""
    from bnkit.presets import KerasBatchNorm, SlimBatchNorm  # here: presets imports bnkit

    return (
        BatchNorm,
        BatchNorm1d,
        BatchNorm2d,
        BatchNorm3d,
        KerasBatchNorm,
        SlimBatchNorm,
        *_TO_BNKIT,
    )


def _accepted_ranks(norm: nn.Module) -> tuple[int, ...] | None:
    """Input ranks the layer accepts (None: any rank >= 2)."""
    if isinstance(norm, BatchNorm):
        ranks: tuple[int, ...] = getattr(norm, "_expected_ranks", ())
        return ranks or None
    torch_ranks: dict[type[nn.Module], tuple[int, ...]] = {
        nn.BatchNorm1d: (2, 3),
        nn.BatchNorm2d: (4,),
        nn.BatchNorm3d: (5,),
    }
    return torch_ranks.get(type(norm))


def _norm_blocker(norm: nn.Module, known: tuple[type[nn.Module], ...]) -> str | None:
    """Why ``norm`` on its own cannot be folded (None when it can)."""
    if type(norm) not in known:
        return (
            f"{type(norm).__name__} is a subclass bnkit does not know; its inference forward "
            "may not be the plain running-statistics transform"
        )
    if _no_statistics(norm):
        return (
            "track_running_stats=False: it normalizes with batch statistics in evaluation too, "
            "which no fixed weights can reproduce"
        )
    if kinds := _hooks(norm):
        return f"it has hooks ({', '.join(kinds)}), which would be lost with the layer"
    return None


def _pair_blocker(layer: nn.Module, norm: nn.Module) -> tuple[str | None, int | None]:
    """Why ``layer`` -> ``norm`` cannot be folded, else (None, rank to check or None)."""
    if type(layer) not in _FOLD_INTO:
        return (
            f"its input comes from {type(layer).__name__}, not from a Conv, ConvTranspose or "
            "Linear layer (subclasses are not folded: their forward may differ)",
            None,
        )
    if isinstance(layer, LazyModuleMixin) and layer.has_uninitialized_params():
        return "the layer before it is a lazy layer that has not seen any input yet", None
    if kinds := _hooks(layer):
        return f"the layer before it has hooks ({', '.join(kinds)})", None
    linear = isinstance(layer, nn.Linear)
    channels = layer.out_features if linear else layer.out_channels
    num_features = int(getattr(norm, "num_features", -1))
    if channels != num_features:
        return f"it has {num_features} features but the layer before it has {channels}", None
    axis = norm.axis if isinstance(norm, BatchNorm) else 1
    accepted = _accepted_ranks(norm)
    if linear:
        # Linear's features are on the last axis of (N, ..., C).
        if axis == -1:
            return None, None
        if axis != 1:
            return f"it normalizes axis {axis}, Linear's features are the last axis", None
        if accepted is not None and 2 not in accepted:
            ranks = " or ".join(f"{r}-D" for r in accepted)
            return (
                f"it takes only {ranks} input, where its channel axis 1 is not the Linear's "
                "feature axis (the last)",
                None,
            )
        # Channels on axis 1 are Linear's features only for 2-D (N, C) data.
        return None, None if accepted == (2,) else 2
    # Conv and ConvTranspose: (N, C, *spatial); unbatched (C, *spatial) has channels on 0.
    assert isinstance(layer, _ConvNd)
    batched = len(layer.kernel_size) + 2
    if axis not in (1, -batched):
        return f"it normalizes axis {axis}; {type(layer).__name__}'s channels are on axis 1", None
    if accepted is not None and batched not in accepted:
        return f"it does not take the {batched}-D output of {type(layer).__name__}", None
    rank_check = accepted is None or batched - 1 in accepted or axis != 1
    return None, batched if rank_check else None


def _fold_weights(layer: nn.Module, norm: nn.Module) -> None:
    """layer ← norm ∘ layer: W' = W·s per output channel, b' = (b - μ)·s + β, s = γ/√(σ²+ε)."""
    mean: Tensor = norm.get_buffer("running_mean")
    var: Tensor = norm.get_buffer("running_var")
    gamma: Tensor | None = norm.get_parameter("weight") if norm.weight is not None else None
    beta: Tensor | None = norm.get_parameter("bias") if norm.bias is not None else None
    weight: Tensor = layer.get_parameter("weight")
    bias: Tensor | None = layer.get_parameter("bias") if layer.bias is not None else None
    with torch.no_grad():
        device, f64 = weight.device, torch.float64
        eps = float(cast(Any, norm).eps)
        s = (var.to(device, f64) + eps).rsqrt()
        if gamma is not None:
            s = s * gamma.to(device, f64)
        shift = -mean.to(device, f64) * s
        if beta is not None:
            shift = shift + beta.to(device, f64)
        w = weight.to(device, f64)
        if isinstance(layer, _ConvNd) and layer.transposed:
            # Weight (C_in, C_out / groups, *k): output channel g·(C_out/groups) + j lives in
            # column j of the rows of group g.
            groups = layer.groups
            per_group = w.shape[1]
            grouped = w.reshape(groups, w.shape[0] // groups, per_group, *w.shape[2:])
            scale = s.reshape(groups, 1, per_group, *([1] * (w.dim() - 2)))
            w = (grouped * scale).reshape(w.shape)
        else:
            w = w * s.reshape(-1, *([1] * (w.dim() - 1)))
        b = shift if bias is None else bias.to(device, f64) * s + shift
    dtype = weight.dtype
    layer.weight = nn.Parameter(w.to(dtype), requires_grad=weight.requires_grad)
    layer.bias = nn.Parameter(
        b.to(dtype), requires_grad=weight.requires_grad if bias is None else bias.requires_grad
    )


def _replacement(norm: nn.Module, path: str, rank: int | None) -> nn.Module:
    act: nn.Module | None = None
    spec = norm.activation if isinstance(norm, BatchNorm) else None
    if isinstance(spec, nn.Module):
        act = spec
    elif isinstance(spec, str):
        act = _ACTIVATION_MODULES[spec]()
    elif spec is not None:
        fn = bnf.resolve_activation(spec)
        assert fn is not None
        act = _ActivationModule(fn)
    parts = [m for m in (RankCheck(rank, path) if rank is not None else None, act) if m]
    if not parts:
        return nn.Identity().eval()
    return (parts[0] if len(parts) == 1 else nn.Sequential(*parts)).eval()


def _describe_node(node: object) -> str:
    if not isinstance(node, fx.Node):
        return f"a constant ({node!r})"
    if node.op == "placeholder":
        return f"the model's input {node.target!r}"
    if node.op == "call_module":
        return f"module {node.target}"
    if node.op == "get_attr":
        return f"attribute {node.target}"
    target = node.target
    return getattr(target, "__name__", str(target)) if node.op == "call_function" else str(target)


_Candidate = tuple[str, nn.Module, str, nn.Module]  # layer path, layer, norm path, norm


def _fx_candidates(
    model: nn.Module, graph: fx.Graph, norms: Sequence[tuple[str, nn.Module]]
) -> tuple[list[_Candidate], dict[int, tuple[str | None, str]]]:
    """Pairs (layer, norm) where the layer's output feeds only the norm, from the dataflow."""
    calls: dict[int, list[fx.Node]] = {}
    read: set[int] = set()  # modules whose parameters/buffers are read directly
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(id(model.get_submodule(str(node.target))), []).append(node)
        elif node.op == "get_attr":
            owner = str(node.target).rpartition(".")[0]
            with contextlib.suppress(AttributeError):
                read.add(id(model.get_submodule(owner)))
    found: list[_Candidate] = []
    skipped: dict[int, tuple[str | None, str]] = {}
    for path, norm in norms:
        nodes = calls.get(id(norm), [])
        if len(nodes) != 1:
            skipped[id(norm)] = (
                None,
                "it is not called in forward"
                if not nodes
                else f"it is called {len(nodes)} times; one set of folded weights cannot "
                "serve several inputs",
            )
            continue
        node = nodes[0]
        if node.kwargs or len(node.args) != 1:
            skipped[id(norm)] = (None, "it is called with arguments besides its input")
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module":
            skipped[id(norm)] = (None, f"its input comes from {_describe_node(src)}")
            continue
        layer_path = str(src.target)
        layer = model.get_submodule(layer_path)
        if type(layer) not in _FOLD_INTO:
            found.append((layer_path, layer, path, norm))  # _pair_blocker says why not
            continue
        others = [u for u in src.users if u is not node]
        if others:
            users = ", ".join(_describe_node(u) for u in others)
            skipped[id(norm)] = (
                layer_path,
                f"the output of {layer_path} also feeds {users} (e.g. a residual); folding "
                "would change what they see",
            )
        elif len(calls[id(layer)]) != 1:
            skipped[id(norm)] = (
                layer_path,
                f"{layer_path} is called {len(calls[id(layer)])} times; folding would change "
                "its other calls",
            )
        elif id(layer) in read or id(norm) in read:
            skipped[id(norm)] = (
                layer_path,
                "forward reads its (or the layer's) parameters or buffers directly",
            )
        else:
            found.append((layer_path, layer, path, norm))
    return found, skipped


def _sequential_candidates(
    model: nn.Module, norms: Sequence[tuple[str, nn.Module]]
) -> tuple[list[_Candidate], dict[int, tuple[str | None, str]]]:
    """Pairs of adjacent children of plain nn.Sequential containers."""
    places: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        places[id(m)] = places.get(id(m), 0) + 1
    previous: dict[int, tuple[str, nn.Module]] = {}
    for path, module in model.named_modules():
        if type(module) is not nn.Sequential:
            continue
        items = [(n, c) for n, c in module._modules.items() if c is not None]
        for (name_a, a), (_, b) in itertools.pairwise(items):
            previous[id(b)] = (f"{path}.{name_a}" if path else name_a, a)
    found: list[_Candidate] = []
    skipped: dict[int, tuple[str | None, str]] = {}
    for path, norm in norms:
        if id(norm) not in previous:
            skipped[id(norm)] = (
                None,
                "it does not directly follow another child of an nn.Sequential (the only "
                "dataflow known without torch.fx)",
            )
            continue
        layer_path, layer = previous[id(norm)]
        if type(layer) in _FOLD_INTO and (places[id(layer)] > 1 or places[id(norm)] > 1):
            skipped[id(norm)] = (
                layer_path,
                "it or the layer before it is registered at several places in the model",
            )
            continue
        found.append((layer_path, layer, path, norm))
    return found, skipped


def fold(model: nn.Module) -> FoldResult:
    """Build an inference copy of ``model`` with batch norms folded into the layers before them.

    Each batch-norm layer (bnkit or ``torch.nn``) whose input is the output of a ``Conv1d/2d/3d``,
    ``ConvTranspose1d/2d/3d`` or ``Linear`` layer, where that output feeds nothing else, is
    folded into that layer's weights with its running statistics (per output channel c)::

        s_c = γ_c / sqrt(running_var_c + eps)
        W'_c = W_c · s_c                          # output channel c of the weight
        b'_c = (b_c - running_mean_c) · s_c + β_c  # b = 0 when the layer has no bias

    and replaced by ``nn.Identity`` (by its activation, as a module, when a bnkit layer has
    ``activation`` set). Groups, dilation, strides and padding modes need nothing special;
    transposed convolutions are scaled on their output-channel axis (axis 1 of the weight,
    per group); a layer without bias gets one. In evaluation the result computes the same
    outputs as ``model.eval()`` up to float rounding.

    Which layer feeds which is read from the actual dataflow: ``model`` is traced with
    ``torch.fx`` (batch-norm layers as leaves). A layer whose output is also used elsewhere
    (e.g. by a residual connection) is left alone. When tracing fails (data-dependent control
    flow in some ``forward``), only adjacent children of plain ``nn.Sequential`` containers
    are folded, assuming each container is called as a whole, and the report says so.

    The norm's channel axis has to be the layer's output-channel axis: axis 1 for
    convolutions; for ``Linear``, whose features are on the last axis, a channels-last norm
    (``axis=-1``, e.g. ``bnkit.from_keras``'s default) always matches, and an ``axis=1`` norm
    (``torch.nn.BatchNorm1d``) matches only for 2-D (N, C) data. Where the match depends on
    the input rank like this, the norm is replaced by a :class:`RankCheck` that raises on any
    other rank instead of silently computing something else.

    Args:
        model: the model; it is deep-copied and never modified.

    Returns:
        ``FoldResult(model, report)``: the folded copy, in evaluation mode, and a
        :class:`FoldReport` listing the folded pairs and every batch-norm layer left in place
        with the reason (no running statistics, output shared, channel axis mismatch, ...).

    Raises:
        TypeError: ``model`` cannot be deep-copied.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        >>> folded, report = fold(net)
        >>> folded
        Sequential(
          (0): Conv2d(3, 4, kernel_size=(3, 3), stride=(1, 1))
          (1): Identity()
          (2): ReLU()
        )
        >>> print(report)
        bnkit.fold: folded 1 batch-norm layer(s), left 0 in place (dataflow: torch.fx)
        folded:
          - 1 into 0 -> Identity()
        >>> x = torch.randn(2, 3, 5, 5)
        >>> torch.allclose(folded(x), net.eval()(x), atol=1e-6)
        True
    """
    try:
        new = copy.deepcopy(model)
    except Exception as err:
        raise TypeError(
            f"bnkit.fold works on a copy of the model and could not deep-copy it: {err}. Fix: "
            "make the model deep-copyable (remove open files, locks, generators held as "
            "attributes), or fold a model rebuilt from its state dict."
        ) from err
    new.eval()
    known = _known_norm_classes()
    norms = [
        (path, m)
        for path, m in _walk(new, lambda m: isinstance(m, (_BatchNorm, BatchNorm)))
        if isinstance(m, (_BatchNorm, BatchNorm))
    ]
    notes: list[str] = []
    dataflow: Literal["fx", "sequential"] = "fx"
    if isinstance(new, (_BatchNorm, BatchNorm)):
        why = "the model is this batch-norm layer itself; no layer feeds it"
        report = FoldReport((), (SkippedNorm(_label(""), None, why),), dataflow)
        return FoldResult(new, report)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            graph = _FoldTracer().trace(new)
        except Exception as err:
            dataflow = "sequential"
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            notes.append(
                f"torch.fx could not trace the model ({type(err).__name__}: {first}); only "
                "adjacent children of nn.Sequential containers were considered, assuming each "
                "container is called as a whole"
            )
    notes += [f"tracer warning: {w.message}" for w in caught]
    if dataflow == "fx":
        candidates, skipped = _fx_candidates(new, graph, norms)
    else:
        candidates, skipped = _sequential_candidates(new, norms)
    replacements: dict[int, nn.Module] = {}
    folded: dict[int, FoldedPair] = {}
    for layer_path, layer, norm_path, norm in candidates:
        reason = _norm_blocker(norm, known)
        rank = None
        if reason is None:
            reason, rank = _pair_blocker(layer, norm)
        if reason is not None:
            skipped[id(norm)] = (layer_path, reason)
            continue
        _fold_weights(layer, norm)
        replacements[id(norm)] = _replacement(norm, norm_path, rank)
        folded[id(norm)] = FoldedPair(layer_path, norm_path, repr(replacements[id(norm)]))
    for _, norm in norms:
        if id(norm) in skipped and id(norm) not in folded:
            reason = _norm_blocker(norm, known)
            if reason is not None:  # the norm's own problem is the more useful reason
                skipped[id(norm)] = (skipped[id(norm)][0], reason)
    new = _replace(new, replacements)
    report = FoldReport(
        folded=tuple(folded[id(n)] for _, n in norms if id(n) in folded),
        skipped=tuple(
            SkippedNorm(p, skipped[id(n)][0], skipped[id(n)][1])
            for p, n in norms
            if id(n) in skipped
        ),
        dataflow=dataflow,
        notes=tuple(notes),
    )
    return FoldResult(new, report)
