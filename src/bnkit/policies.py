"""What a batch-norm layer does when something goes wrong: warn, raise, or carry on.

Three situations have a policy each, set globally (``set_policy``), for a block of code
(``with policy(...)``) or per layer (``BatchNorm(..., policy={...})`` / ``layer.policy``); a
layer's own setting wins over the block's, which wins over the global one.

``no_grad_training`` -- a training-mode forward while autograd is off (``torch.no_grad()``,
``inference_mode``), the classic forgotten ``model.eval()``: ``"warn"`` (default, once per
layer), ``"raise"`` or ``"ignore"``. Recalibration runs inside :func:`calibrating`, which
silences it.

``nonfinite`` -- batch statistics with a NaN or an infinity: ``"skip"`` (default: the running
statistics keep their values, the layer counts the skip in ``num_skipped_updates`` and warns
once), ``"raise"``, or ``"update"`` (let the NaN in, as PyTorch does).

``single_value`` -- one value per channel in training (a batch of one, or a ghost batch of
one), where the batch variance is 0 and the output all zeros: ``"raise"`` (default),
``"running"`` (normalize with the running statistics, no update) or ``"skip-update"``
(normalize with the batch statistics but leave the running statistics alone).

``kernels`` -- which CPU kernels run a layer: ``"torch"`` (default: PyTorch's own kernels
where they are exact, so the default configuration is bit-identical to
``torch.nn.BatchNorm*d``) or ``"cpp"`` (bnkit's C++ kernels, built on first use: up to 4x
faster than PyTorch's CPU kernel in training, and covering renorm, ghost batches, sample
weights, ReLU and half-precision input too; results agree with PyTorch's to float rounding,
not bit for bit; see ``docs/guide.md``). If the C++ kernels cannot be built,
``"cpp"`` warns once and runs PyTorch's. The environment variable ``BNKIT_KERNELS`` sets the
global default when bnkit is imported.

Example:
    >>> import bnkit
    >>> with bnkit.policy(nonfinite="raise"):
    ...     bnkit.get_policy("nonfinite")
    'raise'
    >>> bnkit.get_policy("nonfinite")
    'skip'
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import types
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = [
    "POLICIES",
    "BatchNormWarning",
    "calibrating",
    "get_policy",
    "is_calibrating",
    "name_layers",
    "policy",
    "set_policy",
]


class BatchNormWarning(UserWarning):
    """A batch-norm layer did something that usually means a bug (see the message's fix)."""


POLICIES: dict[str, tuple[str, ...]] = {
    "no_grad_training": ("warn", "raise", "ignore"),
    "nonfinite": ("skip", "raise", "update"),
    "single_value": ("raise", "running", "skip-update"),
    "kernels": ("torch", "cpp"),
}
_DEFAULTS = {name: choices[0] for name, choices in POLICIES.items()}
if os.environ.get("BNKIT_KERNELS") in POLICIES["kernels"]:
    _DEFAULTS["kernels"] = os.environ["BNKIT_KERNELS"]
_global: dict[str, str] = dict(_DEFAULTS)
_scoped: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "bnkit_policy", default=types.MappingProxyType({})
)
_calibrating: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "bnkit_calibrating", default=False
)
# torch.compile cannot read a ContextVar (Dynamo does not trace ContextVar.get), so compiled
# code reads these plain mirrors of the innermost policy() / calibrating() block instead.
# Dynamo guards on what it reads from them: a graph traced outside a block is recompiled
# inside it. They are process-wide, not per thread or task.
_scoped_compiled: dict[str, str] = {}
_calibrating_compiled: dict[str, bool] = {"active": False}


def check_policies(policies: Mapping[str, Any]) -> dict[str, str]:
    """Validate ``{name: value}``; raise ValueError naming the accepted names and values."""
    out = {}
    for name, value in policies.items():
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; the policies are {sorted(POLICIES)}")
        if value not in POLICIES[name]:
            raise ValueError(
                f"policy {name}={value!r} is not one of {list(POLICIES[name])} "
                f"(default {POLICIES[name][0]!r})"
            )
        out[name] = str(value)
    return out


def set_policy(**policies: str) -> None:
    """Set the global default of one or more policies (``set_policy()`` with none resets all).

    Example:
        >>> import bnkit
        >>> bnkit.set_policy(no_grad_training="raise")
        >>> bnkit.get_policy("no_grad_training")
        'raise'
        >>> bnkit.set_policy()  # back to the defaults
        >>> bnkit.get_policy("no_grad_training")
        'warn'
    """
    if not policies:
        _global.clear()
        _global.update(_DEFAULTS)
        return
    _global.update(check_policies(policies))


@contextlib.contextmanager
def policy(**policies: str) -> Iterator[None]:
    """Use these policies inside the block (layers with their own setting keep it)."""
    scoped = {**_scoped.get(), **check_policies(policies)}
    token = _scoped.set(scoped)
    outer = dict(_scoped_compiled)
    _scoped_compiled.clear()
    _scoped_compiled.update(scoped)
    try:
        yield
    finally:
        _scoped.reset(token)
        _scoped_compiled.clear()
        _scoped_compiled.update(outer)


def get_policy(name: str, layer: Mapping[str, str] | None = None) -> str:
    """The policy in force: the layer's own, else the block's, else the global default."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; the policies are {sorted(POLICIES)}")
    if not torch.compiler.is_compiling():
        return get_policy_eager(name, layer or {})
    if layer and name in layer:
        return layer[name]
    return _scoped_compiled.get(name, _global[name])


def get_policy_eager(name: str, layer: Mapping[str, str]) -> str:
    """:func:`get_policy` for a caller outside torch.compile that passes a known name.

    The layers' one-call path reads two or three policies per step; skipping the name check and
    the compile test saves microseconds there.
    """
    value = layer.get(name)
    if value is None:
        value = _scoped.get().get(name, _global[name])
    return value


@contextlib.contextmanager
def calibrating() -> Iterator[None]:
    """Mark training-mode forwards without gradients as intended (statistics estimation)."""
    token = _calibrating.set(True)
    outer = _calibrating_compiled["active"]
    _calibrating_compiled["active"] = True
    try:
        yield
    finally:
        _calibrating.reset(token)
        _calibrating_compiled["active"] = outer


def is_calibrating() -> bool:
    """True inside :func:`calibrating`."""
    if torch.compiler.is_compiling():
        return _calibrating_compiled["active"]
    return _calibrating.get()


def name_layers(model: Any) -> None:
    """Give each bnkit layer in ``model`` its path (``layer.layer_name``) for messages.

    Layers do not know where they sit in a model; warnings and errors name them by this path
    once it is set (``bnkit.convert`` and the lifecycle tools set it too).

    >>> import torch, bnkit
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), bnkit.BatchNorm(2))
    >>> bnkit.policies.name_layers(model)
    >>> model[1].layer_name
    '1'
    """
    for name, module in model.named_modules():
        if hasattr(module, "layer_name") and hasattr(module, "policy"):
            module.layer_name = name or type(module).__name__
