"""Optimizer-side helpers: weight decay groups, TF-style regularizers and constraints.

TensorFlow attaches regularizers and constraints to variables; PyTorch puts weight decay in
the optimizer. ``param_groups`` gives batch-norm parameters their own weight decay (usually
none), ``regularization_loss`` adds the penalties that ``from_slim``/``from_keras`` modules
carry (Keras ``beta_regularizer``/``gamma_regularizer``, slim ``param_regularizers``), and
``apply_constraints`` projects parameters after ``optimizer.step()`` as Keras does after each
update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "Constraint",
    "Regularizer",
    "apply_constraints",
    "constraint",
    "is_normalization",
    "param_groups",
    "regularization_loss",
    "regularizer",
]

Regularizer = Callable[[Tensor], Tensor]
Constraint = Callable[[Tensor], Tensor]

# Keras' defaults for the bare names ("l2" means L2(0.01)); tf_keras/keras regularizers.py.
_KERAS_DEFAULT_FACTOR = 0.01
_NORMS = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def is_normalization(module: nn.Module) -> bool:
    """True for batch-, instance-, group- and layer-norm modules (torch's and bnkit's).

    >>> import bnkit
    >>> is_normalization(bnkit.BatchNorm(3)), is_normalization(torch.nn.Linear(2, 2))
    (True, False)
    """
    from bnkit.modules import BatchNorm

    rms = getattr(nn, "RMSNorm", None)
    kinds = (*_NORMS, BatchNorm) if rms is None else (*_NORMS, BatchNorm, rms)
    return isinstance(module, kinds)


def param_groups(
    model: nn.Module, weight_decay: float, *, norm_weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into normalization and other parameters.

    Weight decay on a batch-norm scale fights the normalization it follows (the layer's
    output does not depend on the scale of its input), and TF/Keras models usually put no
    regularizer on ``gamma``/``beta``. This gives them their own decay, 0 by default.

    Args:
        model: any module.
        weight_decay: decay for every parameter outside normalization layers.
        norm_weight_decay: decay for the parameters of normalization layers
            (``bnkit.BatchNorm``, ``torch.nn`` batch/instance/group/layer norms).

    Returns:
        Parameter groups for a ``torch.optim`` optimizer: ``[{"params": [...],
        "weight_decay": weight_decay}, {"params": [...], "weight_decay": norm_weight_decay}]``;
        an empty group is left out. Shared parameters appear once; frozen ones
        (``requires_grad=False``) not at all.

    Example:
        >>> import bnkit
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), bnkit.BatchNorm(3))
        >>> groups = bnkit.param_groups(model, 1e-4)
        >>> [(len(g["params"]), g["weight_decay"]) for g in groups]
        [(2, 0.0001), (2, 0.0)]
        >>> opt = torch.optim.SGD(groups, lr=0.1)
    """
    seen: set[int] = set()
    norm: list[nn.Parameter] = []
    other: list[nn.Parameter] = []
    for module in model.modules():
        target = norm if is_normalization(module) else other
        for p in module.parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                target.append(p)
    groups = [
        {"params": other, "weight_decay": float(weight_decay)},
        {"params": norm, "weight_decay": float(norm_weight_decay)},
    ]
    return [g for g in groups if g["params"]]


# ------------------------------------------------------------------ regularizers


class _Penalty:
    """``l1 * sum(|w|) + l2 * sum(w²)``: Keras' L1/L2/L1L2 (not tf.nn.l2_loss's half)."""

    def __init__(self, l1: float = 0.0, l2: float = 0.0) -> None:
        self.l1 = float(l1)
        self.l2 = float(l2)

    def __call__(self, w: Tensor) -> Tensor:
        total = w.new_zeros(())
        if self.l1:
            total = total + self.l1 * w.abs().sum()
        if self.l2:
            total = total + self.l2 * w.square().sum()
        return total

    def __repr__(self) -> str:
        return f"Penalty(l1={self.l1}, l2={self.l2})"


def _config_of(spec: Any) -> tuple[str, dict[str, Any]] | None:
    """(class name, config) for Keras serialized dicts and Keras/TF objects, else None."""
    if isinstance(spec, Mapping) and "class_name" in spec:
        return str(spec["class_name"]), dict(spec.get("config") or {})
    get_config = getattr(spec, "get_config", None)
    if callable(get_config):
        return type(spec).__name__, dict(get_config())
    return None


def regularizer(spec: Any) -> Regularizer | None:
    """A penalty function from a TF/Keras-style regularizer description.

    Accepted: ``None``; a callable ``tensor -> scalar tensor`` (used as is); Keras names
    ``"l1"``, ``"l2"``, ``"l1_l2"`` (factor 0.01, Keras' default); a dict ``{"l1": a, "l2": b}``;
    a Keras serialized dict or a Keras/TF ``L1``/``L2``/``L1L2`` object (read through
    ``get_config``, no TensorFlow needed). The penalty is ``l1·Σ|w| + l2·Σw²`` as in Keras.
    TF-slim's ``l2_regularizer(scale)`` is ``scale·Σw²/2`` (``tf.nn.l2_loss``): pass
    ``{"l2": scale / 2}`` for it.

    Raises:
        ValueError: for anything else, with the accepted forms.

    Example:
        >>> penalty = regularizer({"l2": 0.5})
        >>> float(penalty(torch.tensor([1.0, 2.0])))
        2.5
    """
    if spec is None:
        return None
    config = _config_of(spec)
    if config is not None:
        name, cfg = config
        if name.lower() in ("l1", "l2", "l1l2", "l1_l2"):
            return _Penalty(float(cfg.get("l1", 0.0)), float(cfg.get("l2", 0.0)))
        raise ValueError(
            f"regularizer {name!r} has no bnkit equivalent; pass a callable "
            "tensor -> scalar penalty instead"
        )
    if isinstance(spec, str):
        factor = _KERAS_DEFAULT_FACTOR
        named = {
            "l1": _Penalty(l1=factor),
            "l2": _Penalty(l2=factor),
            "l1_l2": _Penalty(factor, factor),
        }
        if spec.lower() in named:
            return named[spec.lower()]
    elif isinstance(spec, Mapping) and set(spec) <= {"l1", "l2"}:
        return _Penalty(float(spec.get("l1", 0.0)), float(spec.get("l2", 0.0)))
    elif callable(spec):
        return spec  # type: ignore[no-any-return]
    raise ValueError(
        f"cannot use {spec!r} as a regularizer; pass None, 'l1', 'l2', 'l1_l2', "
        "{'l1': a, 'l2': b}, a Keras L1/L2/L1L2 object, or a callable tensor -> scalar"
    )


def regularization_loss(model: nn.Module) -> Tensor:
    """Sum of the penalties that the model's layers carry (TF's regularization losses).

    Modules built by ``bnkit.from_slim``/``bnkit.from_keras`` with regularizers keep them in a
    ``regularizers`` dict (parameter name → penalty); add this to the loss, as TF adds
    ``tf.losses.get_regularization_loss()``.

    Returns:
        A scalar tensor (0 when no layer has regularizers).

    Example:
        >>> import bnkit
        >>> bn = bnkit.from_keras(2, gamma_regularizer={"l2": 0.1})
        >>> bnkit.regularization_loss(torch.nn.Sequential(bn))  # 0.1 * (1² + 1²)
        tensor(0.2000, grad_fn=<AddBackward0>)
    """
    total: Tensor | None = None
    for module in model.modules():
        for name, penalty in getattr(module, "regularizers", {}).items():
            param = getattr(module, name, None)
            if param is None:
                continue
            value = penalty(param)
            total = value if total is None else total + value
    if total is None:
        first = next(model.parameters(), None)
        return torch.zeros((), device=None if first is None else first.device)
    return total


# ------------------------------------------------------------------- constraints


class _NonNeg:
    def __call__(self, w: Tensor) -> Tensor:
        return w.clamp_min(0)

    def __repr__(self) -> str:
        return "NonNeg()"


class _NormConstraint:
    """Keras MaxNorm/MinMaxNorm/UnitNorm on a 1-D parameter (its norm over all channels)."""

    def __init__(self, min_value: float, max_value: float, rate: float = 1.0) -> None:
        self.min_value = float(min_value)
        self.max_value = float(max_value)
        self.rate = float(rate)

    def __call__(self, w: Tensor) -> Tensor:
        norm = w.square().sum().sqrt()
        desired = self.rate * norm.clamp(self.min_value, self.max_value) + (1 - self.rate) * norm
        # Keras adds its epsilon (1e-7) to the norm in the denominator.
        return w * (desired / (norm + 1e-7))

    def __repr__(self) -> str:
        return f"NormConstraint(min={self.min_value}, max={self.max_value}, rate={self.rate})"


def constraint(spec: Any) -> Constraint | None:
    """A projection ``tensor -> tensor`` from a Keras-style constraint description.

    Accepted: ``None``; a callable (used as is); Keras names ``"non_neg"``, ``"unit_norm"``,
    ``"max_norm"`` (max 2, Keras' default); Keras serialized dicts or objects ``NonNeg``,
    ``UnitNorm``, ``MaxNorm(max_value)``, ``MinMaxNorm(min_value, max_value, rate)``.

    Example:
        >>> constraint("non_neg")(torch.tensor([-1.0, 2.0]))
        tensor([0., 2.])
    """
    if spec is None:
        return None
    config = _config_of(spec)
    if isinstance(spec, str):
        config = (spec, {})
    if config is not None:
        name, cfg = config
        key = name.lower().replace("_", "")
        if key == "nonneg":
            return _NonNeg()
        if key == "unitnorm":
            return _NormConstraint(1.0, 1.0)
        if key == "maxnorm":
            return _NormConstraint(0.0, float(cfg.get("max_value", 2.0)))
        if key == "minmaxnorm":
            return _NormConstraint(
                float(cfg.get("min_value", 0.0)),
                float(cfg.get("max_value", 1.0)),
                float(cfg.get("rate", 1.0)),
            )
        raise ValueError(
            f"constraint {name!r} has no bnkit equivalent; use 'non_neg', 'unit_norm', "
            "'max_norm', 'min_max_norm' or a callable tensor -> tensor"
        )
    if callable(spec):
        return spec  # type: ignore[no-any-return]
    raise ValueError(f"cannot use {spec!r} as a constraint; pass a name or a callable")


def apply_constraints(model: nn.Module) -> None:
    """Project constrained parameters in place; call after each ``optimizer.step()``.

    Keras applies ``beta_constraint``/``gamma_constraint`` after every update; PyTorch
    optimizers know nothing of them. Modules from ``bnkit.from_keras`` keep theirs in a
    ``constraints`` dict (parameter name → projection).

    Example:
        >>> import bnkit
        >>> bn = bnkit.from_keras(2, gamma_constraint="non_neg")
        >>> with torch.no_grad():
        ...     _ = bn.weight.fill_(-1.0)
        >>> bnkit.apply_constraints(bn)
        >>> bn.weight
        Parameter containing:
        tensor([0., 0.], requires_grad=True)
    """
    with torch.no_grad():
        for module in model.modules():
            for name, project in getattr(module, "constraints", {}).items():
                param = getattr(module, name, None)
                if param is not None:
                    param.copy_(project(param))


def _named(specs: Iterable[tuple[str, Any]], convert: Callable[[Any], Any]) -> dict[str, Any]:
    """Convert (parameter name, spec) pairs, dropping the ones that are None."""
    out = {}
    for name, spec in specs:
        value = convert(spec)
        if value is not None:
            out[name] = value
    return out
