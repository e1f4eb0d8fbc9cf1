"""TF-slim and Keras batch norm, argument for argument: ``from_slim`` and ``from_keras``.

Each preset takes the emulated function's argument names and defaults and returns a
``bnkit.BatchNorm`` subclass that reproduces its numerics, verified against TensorFlow 2.21
(``make parity``). The parts that are not a plain mapping of arguments:

* **Which variance feeds the moving average.** TF's fused kernel feeds the Bessel-corrected
  (unbiased) batch variance, its non-fused code the biased one, and slim and Keras pick the
  code path from the *input* (rank, batch weights, mask), so the presets pick it per call
  (``SlimBatchNorm.slim_path``, ``KerasBatchNorm.uses_fused_kernel``).
* **Decay vs momentum.** ``decay=0.999`` / ``momentum=0.99`` are the weight of the *old*
  value; the module stores PyTorch's ``momentum = 1 - decay``.
* **TF-only arguments** (``scope``, ``reuse``, ``*_collections``, ``name``) are accepted and
  mean what ``docs/migrating-from-tensorflow.md`` says; anything else is a TypeError that
  lists the accepted names.

Example:
    >>> import torch, bnkit
    >>> bn = bnkit.from_slim(16, decay=0.99, scale=True)
    >>> bn.momentum, bn.eps, bn.axis
    (0.010000000000000009, 0.001, -1)
    >>> y = bn(torch.randn(8, 5, 5, 16))            # NHWC, as slim's default data_format
    >>> bn.slim_path(rank=4, weighted=False)
    'layer'
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnkit import functional as bnf
from bnkit import optim
from bnkit.modules import BatchNorm, Init
from bnkit.running import RunningVar

__all__ = ["KerasBatchNorm", "SlimBatchNorm", "from_keras", "from_slim"]

SlimPath = Literal["fused", "layer", "legacy"]

# tf.compat.v1.GraphKeys.UPDATE_OPS is this string; comparing to it needs no TensorFlow.
UPDATE_OPS = "update_ops"

_SLIM_DEFAULTS: dict[str, Any] = {
    "decay": 0.999,
    "center": True,
    "scale": False,
    "epsilon": 0.001,
    "activation_fn": None,
    "param_initializers": None,
    "param_regularizers": None,
    "updates_collections": UPDATE_OPS,
    "is_training": True,
    "reuse": None,
    "variables_collections": None,
    "outputs_collections": None,
    "trainable": True,
    "fused": None,
    "data_format": "NHWC",
    "zero_debias_moving_mean": False,
    "scope": None,
    "renorm": False,
    "renorm_clipping": None,
    "renorm_decay": 0.99,
    "adjustment": None,
    "device": None,
    "dtype": None,
}

_KERAS_DEFAULTS: dict[str, Any] = {
    "axis": -1,
    "momentum": 0.99,
    "epsilon": 0.001,
    "center": True,
    "scale": True,
    "beta_initializer": "zeros",
    "gamma_initializer": "ones",
    "moving_mean_initializer": "zeros",
    "moving_variance_initializer": "ones",
    "beta_regularizer": None,
    "gamma_regularizer": None,
    "beta_constraint": None,
    "gamma_constraint": None,
    "renorm": False,
    "renorm_clipping": None,
    "renorm_momentum": 0.99,
    "fused": None,
    "trainable": True,
    "virtual_batch_size": None,
    "adjustment": None,
    "synchronized": False,
    "name": None,
    "dtype": None,
    "device": None,
}


def _options(
    given: dict[str, Any], defaults: dict[str, Any], emulated: str, batch_arg: str
) -> dict[str, Any]:
    """``defaults`` updated with ``given``; an unknown name is a TypeError listing the known."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        hint = ""
        if batch_arg in unknown:
            hint = f" {batch_arg} is passed per call: module(x, weights=w) / module(x, mask=m)."
        raise TypeError(
            f"{emulated} got unexpected argument(s) {', '.join(map(repr, unknown))}. Accepted: "
            f"{', '.join(defaults)}.{hint} See docs/migrating-from-tensorflow.md for what each "
            "one becomes in bnkit."
        )
    return {**defaults, **given}


def _decay_value(value: Any, name: str) -> float:
    decay = float(value)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(
            f"{name}={value!r} is outside [0, 1]. It is TensorFlow's decay, the weight of the old "
            f"value (0.99 keeps 99%); PyTorch's momentum is 1 - {name}."
        )
    return decay


# ------------------------------------------------------------------ initializers


def _random_init(kind: str, cfg: Mapping[str, Any]) -> Callable[[Tensor], Any]:
    """Keras' random initializers (same distribution, not TF's random stream)."""
    if kind == "randomnormal":
        mean, std = float(cfg.get("mean", 0.0)), float(cfg.get("stddev", 0.05))
        return functools.partial(nn.init.normal_, mean=mean, std=std)
    if kind == "randomuniform":
        low, high = float(cfg.get("minval", -0.05)), float(cfg.get("maxval", 0.05))
        return functools.partial(nn.init.uniform_, a=low, b=high)
    mean, std = float(cfg.get("mean", 0.0)), float(cfg.get("stddev", 0.05))
    return functools.partial(
        nn.init.trunc_normal_, mean=mean, std=std, a=mean - 2 * std, b=mean + 2 * std
    )


def _initializer(spec: Any, name: str) -> Init:
    """A bnkit ``*_init`` value from a TF/Keras initializer description.

    Numbers, per-channel values and torch callables (``torch.nn.init.ones_``) pass through;
    Keras names (``"zeros"``, ``"ones"``, ``"random_normal"``, ...), Keras serialized dicts
    and Keras/TF initializer objects (read through ``get_config``) are translated.
    """
    config: tuple[str, dict[str, Any]] | None = None
    if isinstance(spec, str):
        config = (spec, {})
    elif isinstance(spec, Mapping) and "class_name" in spec:
        config = (str(spec["class_name"]), dict(spec.get("config") or {}))
    elif callable(getattr(spec, "get_config", None)) and not isinstance(spec, Tensor):
        config = (type(spec).__name__, dict(spec.get_config()))
    if config is None:
        return spec  # type: ignore[no-any-return]
    kind = config[0].lower().replace("_", "").removesuffix("initializer")
    cfg = config[1]
    if kind in ("zeros", "zero"):
        return 0.0
    if kind in ("ones", "one"):
        return 1.0
    if kind == "constant":
        value = cfg.get("value", 0.0)
        return float(value) if isinstance(value, (int, float)) else torch.as_tensor(value)
    if kind in ("randomnormal", "randomuniform", "truncatednormal"):
        return _random_init(kind, cfg)
    raise ValueError(
        f"{name}: initializer {config[0]!r} has no bnkit equivalent for a per-channel vector; "
        "use 'zeros', 'ones', 'constant' (Keras Constant), 'random_normal', 'random_uniform', "
        "'truncated_normal', a number, one value per channel, or a callable that fills the "
        "tensor in place"
    )


# ------------------------------------------------------------------- activations

# tf.nn / Keras activation functions by name. tf.nn.leaky_relu's default slope is 0.2,
# PyTorch's 0.01: mapping by name keeps TF's.
_TF_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor] | None] = {
    "relu": F.relu,
    "relu6": F.relu6,
    "elu": F.elu,
    "selu": F.selu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "softplus": F.softplus,
    "softsign": F.softsign,
    "swish": F.silu,
    "silu": F.silu,
    "gelu": F.gelu,
    "leaky_relu": functools.partial(F.leaky_relu, negative_slope=0.2),
    "linear": None,
    "identity": None,
}


def _activation(spec: Any) -> bnf.Activation:
    """A bnkit activation from a torch callable, a bnkit name, or a TF/Keras function."""
    if spec is None or isinstance(spec, str):
        bnf.resolve_activation(spec)  # unknown names fail here, listing the known ones
        return spec
    module = getattr(spec, "__module__", "") or ""
    if module.split(".")[0] in ("tensorflow", "tf_keras", "keras"):
        name = getattr(spec, "__name__", "")
        if name not in _TF_ACTIVATIONS:
            raise ValueError(
                f"activation {module}.{name} has no bnkit mapping; pass a torch callable such "
                f"as torch.nn.functional.{name} (known TF names: {sorted(_TF_ACTIVATIONS)})"
            )
        return _TF_ACTIVATIONS[name]
    if not callable(spec):
        raise ValueError(f"activation must be None, a name or a callable, got {spec!r}")
    return spec  # type: ignore[no-any-return]


def _dtype(value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    names = {
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "float32": torch.float32,
        "float64": torch.float64,
        # Keras mixed precision keeps its variables in float32; bnkit runs half input in
        # float32 statistics either way.
        "mixed_float16": torch.float32,
        "mixed_bfloat16": torch.float32,
    }
    name = getattr(value, "name", value)
    if isinstance(name, str) and name in names:
        return names[name]
    raise ValueError(f"dtype {value!r} is not understood; pass a torch dtype or one of {names}")


def _set_trainable(module: BatchNorm, trainable: bool) -> None:
    for p in (module.weight, module.bias):
        if p is not None:
            p.requires_grad_(trainable)


# ------------------------------------------------------------------------- slim


class SlimBatchNorm(BatchNorm):
    """``tf_slim.layers.batch_norm`` as a module; build it with :func:`from_slim`.

    Slim has three code paths that differ numerically; :meth:`slim_path` says which one the
    given input takes and the module feeds the moving variance as that path does.
    """

    def __init__(
        self,
        num_features: int,
        *,
        fused: bool,
        custom_updates: bool,
        tf_scope: str | None,
        regularizers: dict[str, optim.Regularizer],
        **options: Any,
    ) -> None:
        super().__init__(num_features, **options)
        self.fused = fused
        self.custom_updates = custom_updates
        self.tf_scope = tf_scope
        self.regularizers = regularizers
        self.slim_trainable = True

    def slim_path(self, rank: int, weighted: bool, dtype: torch.dtype | None = None) -> SlimPath:
        """The code path slim takes for input of this rank, with or without batch weights.

        * ``"fused"`` (``_fused_batch_norm``): ``fused`` and rank 2 or 4, no batch weights,
          renorm or adjustment, and zero-debias, rank 2 or non-default
          ``updates_collections``. Feeds the unbiased variance.
        * ``"layer"`` (Keras' V1 layer): no batch weights, default ``updates_collections``,
          no zero-debias. Unbiased when the layer's fused kernel runs (rank 4/5, float32 or
          half, no renorm or adjustment), biased otherwise.
        * ``"legacy"`` (``nn.moments``/``nn.weighted_moments``): everything else. Biased.

        Example:
            >>> bn = from_slim(3, zero_debias_moving_mean=True)
            >>> bn.slim_path(4, weighted=False), bn.slim_path(4, weighted=True)
            ('fused', 'legacy')
        """
        zero_debias = bool(self.zero_debias)
        possible_to_fuse = (
            not weighted and not self.renorm and rank in (2, 4) and self.adjustment is None
        )
        if (
            self.fused
            and possible_to_fuse
            and (zero_debias or rank == 2 or self.custom_updates)
            and dtype != torch.float64
        ):
            return "fused"
        if not weighted and not self.custom_updates and not zero_debias:
            return "layer"
        return "legacy"

    def _layer_uses_fused_kernel(self, rank: int, dtype: torch.dtype) -> bool:
        # tf_keras V1 build(): fused = rank in (4, 5) and _fused_can_be_used(); the fused
        # kernel has no float64 version.
        return (
            self.fused
            and rank in (4, 5)
            and not self.renorm
            and self.adjustment is None
            and dtype != torch.float64
        )

    def _running_var_for(self, x: Tensor, weights: Tensor | None) -> RunningVar:
        path = self.slim_path(x.dim(), weights is not None, x.dtype)
        if path == "fused" or (path == "layer" and self._layer_uses_fused_kernel(x.dim(), x.dtype)):
            return "unbiased"
        return "biased"

    def _updates_running_stats(self, x: Tensor, weights: Tensor | None) -> bool:
        # slim's core-layer path builds a Keras V1 layer, whose update ops are dropped when the
        # layer is not trainable (base_layer_v1 `updates`): it normalizes with batch statistics
        # and never moves the moving ones. The fused and legacy paths update regardless.
        if self.slim_trainable:
            return True
        return self.slim_path(x.dim(), weights is not None, x.dtype) != "layer"

    def forward(
        self, x: Tensor, *, weights: Tensor | None = None, training: bool | None = None
    ) -> Tensor:
        """Normalize ``x``; ``weights`` are slim's ``batch_weights`` (shape (N,))."""
        if weights is not None and self.renorm:
            raise ValueError(
                "tf_slim.batch_norm refuses renorm with batch_weights, and so does its preset. "
                "Fix: drop the weights, or use bnkit.BatchNorm(..., renorm=True) directly, which "
                "supports both together"
            )
        return super().forward(x, weights=weights, training=training)

    def extra_repr(self) -> str:
        scope = f", tf_scope={self.tf_scope!r}" if self.tf_scope else ""
        return (
            f"{super().extra_repr()}, preset='tf_slim', fused={self.fused}, "
            f"running_var='per slim code path'{scope}"
        )


def from_slim(num_features: int, **kwargs: Any) -> SlimBatchNorm:
    """``tf_slim.layers.batch_norm``'s arguments and numerics in a PyTorch module.

    Args:
        num_features: C, the number of channels (slim infers it from the input).
        **kwargs: slim's arguments, with slim's defaults: ``decay=0.999``, ``center=True``,
            ``scale=False``, ``epsilon=0.001``, ``activation_fn=None``,
            ``param_initializers=None``, ``param_regularizers=None``,
            ``updates_collections=tf.GraphKeys.UPDATE_OPS``, ``is_training=True``,
            ``reuse``, ``variables_collections``, ``outputs_collections``, ``trainable=True``,
            ``fused=None``, ``data_format="NHWC"``, ``zero_debias_moving_mean=False``,
            ``scope=None``, ``renorm=False``, ``renorm_clipping=None``, ``renorm_decay=0.99``,
            ``adjustment=None``; and bnkit's ``device``, ``dtype``. What each becomes:
            docs/migrating-from-tensorflow.md. ``batch_weights`` is passed per call:
            ``module(x, weights=w)``.

    Returns:
        A :class:`SlimBatchNorm` in training mode (eval mode for ``is_training=False``).

    Raises:
        TypeError: an argument slim does not have (the message lists the accepted ones).
        ValueError: combinations slim refuses (renorm with zero-debias or custom
            ``updates_collections``), a bad ``data_format`` or ``decay``.

    Example:
        >>> import torch
        >>> bn = from_slim(4, decay=0.9, data_format="NCHW", zero_debias_moving_mean=True)
        >>> _ = bn(torch.randn(8, 4, 3, 3) + 5.0)
        >>> bool((bn.running_mean > 4).all())  # zero-debias: the 0 start is ignored
        True
    """
    o = _options(kwargs, _SLIM_DEFAULTS, "from_slim (tf_slim.layers.batch_norm)", "batch_weights")
    if o["data_format"] not in ("NHWC", "NCHW"):
        raise ValueError(f"data_format has to be 'NHWC' or 'NCHW', got {o['data_format']!r}")
    custom_updates = o["updates_collections"] != UPDATE_OPS
    if o["renorm"] and (o["zero_debias_moving_mean"] or custom_updates):
        raise ValueError(
            "renorm is not supported with updates_collections or zero_debias_moving_mean "
            "(tf_slim raises the same): use the default updates_collections and no zero-debias"
        )
    inits = dict(o["param_initializers"] or {})
    regs = dict(o["param_regularizers"] or {})
    for label, given, allowed in (
        ("param_initializers", inits, {"beta", "gamma", "moving_mean", "moving_variance"}),
        ("param_regularizers", regs, {"beta", "gamma"}),
    ):
        if set(given) - allowed:
            raise ValueError(
                f"{label} has unknown keys {sorted(set(given) - allowed)}; slim reads "
                f"{sorted(allowed)}"
            )
    decay = _decay_value(o["decay"], "decay")
    renorm = bool(o["renorm"])
    module = SlimBatchNorm(
        num_features,
        fused=True if o["fused"] is None else bool(o["fused"]),
        custom_updates=custom_updates,
        tf_scope=o["scope"],
        regularizers=optim._named(
            (("bias", regs.get("beta")), ("weight", regs.get("gamma"))), optim.regularizer
        ),
        axis=1 if o["data_format"] == "NCHW" else -1,
        eps=float(o["epsilon"]),
        decay=decay,
        center=bool(o["center"]),
        scale=bool(o["scale"]),
        zero_debias="mean" if o["zero_debias_moving_mean"] else False,
        renorm=renorm,
        renorm_clipping=dict(o["renorm_clipping"]) if renorm and o["renorm_clipping"] else None,
        renorm_decay=_decay_value(o["renorm_decay"], "renorm_decay") if renorm else None,
        adjustment=o["adjustment"],
        activation=_activation(o["activation_fn"]),
        weight_init=_initializer(inits.get("gamma"), "gamma"),
        bias_init=_initializer(inits.get("beta"), "beta"),
        running_mean_init=_initializer(inits.get("moving_mean"), "moving_mean"),
        running_var_init=_initializer(inits.get("moving_variance"), "moving_variance"),
        device=o["device"],
        dtype=_dtype(o["dtype"]),
    )
    _set_trainable(module, bool(o["trainable"]))
    module.slim_trainable = bool(o["trainable"])
    module.train(bool(o["is_training"]))
    return module


# ------------------------------------------------------------------------ Keras


class KerasBatchNorm(BatchNorm):
    """``tf_keras.layers.BatchNormalization`` (Keras 2) as a module; see :func:`from_keras`.

    ``trainable=False`` makes the layer run in inference mode whatever its training flag,
    as Keras 2 does, and freezes γ and β. ``mask`` in :meth:`forward` weights the batch
    statistics (Keras' ``mask``).
    """

    def __init__(
        self,
        num_features: int,
        *,
        fused: bool | None,
        synchronized: bool,
        trainable: bool,
        tf_scope: str | None,
        regularizers: dict[str, optim.Regularizer],
        constraints: dict[str, optim.Constraint],
        **options: Any,
    ) -> None:
        # Keras' synchronized layer is its non-fused layer with the batch statistics of all
        # replicas (count-weighted): bnkit's sync.
        super().__init__(num_features, sync=synchronized, **options)
        self.fused = fused
        self.tf_scope = tf_scope
        self.regularizers = regularizers
        self.constraints = constraints
        self._trainable = True
        self.trainable = trainable

    @property
    def synchronized(self) -> bool:
        """Keras' ``synchronized``: the layer's ``sync`` (statistics over all processes)."""
        return self.sync

    @property
    def trainable(self) -> bool:
        """Keras' ``trainable``: False freezes γ/β and forces inference mode."""
        return self._trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        self._trainable = bool(value)
        _set_trainable(self, self._trainable)

    def uses_fused_kernel(self, rank: int, dtype: torch.dtype = torch.float32) -> bool:
        """Whether Keras runs its fused kernel (unbiased moving variance) on this input.

        ``fused`` not False, rank 4 or 5 with the channel axis first or last, no renorm,
        ``virtual_batch_size``, ``adjustment`` or ``synchronized``, and not float64.

        Example:
            >>> bn = from_keras(3)
            >>> bn.uses_fused_kernel(4), bn.uses_fused_kernel(2)
            (True, False)
        """
        if self.fused is False or rank not in (4, 5) or dtype == torch.float64:
            return False
        if self.renorm or self.virtual_batch_size is not None or self.adjustment is not None:
            return False
        if self.synchronized:
            return False
        axis = bnf.canonical_axis(self.axis, rank)
        return axis in (1, rank - 1)

    def _running_var_for(self, x: Tensor, weights: Tensor | None) -> RunningVar:
        # Keras' fused kernel ignores a mask; bnkit applies it, with the statistics of the
        # path that honours masks (weighted moments, biased variance).
        if weights is None and self.uses_fused_kernel(x.dim(), x.dtype):
            return "unbiased"
        return "biased"

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        weights: Tensor | None = None,
        training: bool | None = None,
    ) -> Tensor:
        """Normalize ``x``.

        Args:
            x: input with the channels on ``axis``.
            mask: Keras' mask over the leading non-channel dimensions (e.g. (N, L) for
                (N, L, C) input); masked-out positions do not count in the statistics.
            weights: bnkit's name for the same thing; give one of the two.
            training: Keras' ``training`` argument; ignored (inference) when
                ``trainable=False``.
        """
        if mask is not None and weights is not None:
            raise ValueError("give mask or weights, not both (they are the same thing)")
        if self.fused is True and x.dim() not in (4, 5):
            raise ValueError(
                "Keras' BatchNormalization with fused=True only supports 4D or 5D input, got "
                f"shape {tuple(x.shape)}. Fix: fused=None (automatic) or fused=False"
            )
        if not self._trainable:
            training = False
        w = mask.to(x.dtype) if mask is not None and not mask.is_floating_point() else mask
        return super().forward(x, weights=w if w is not None else weights, training=training)

    def extra_repr(self) -> str:
        extra = ["preset='tf_keras'", f"fused={self.fused}", "running_var='per Keras code path'"]
        if not self._trainable:
            extra.append("trainable=False")
        if self.tf_scope:
            extra.append(f"tf_scope={self.tf_scope!r}")
        return ", ".join([super().extra_repr(), *extra])


def _keras_axis(axis: Any) -> int:
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            raise ValueError(
                f"axis={list(axis)}: bnkit normalizes over one channel axis; Keras' multi-axis "
                "batch norm (parameters over several axes) has no equivalent. Fix: reshape so "
                "the axes form one channel axis, then use axis=that axis"
            )
        axis = axis[0]
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"axis must be an int or a one-element list, got {axis!r}")
    if axis == 0:
        raise ValueError("axis 0 is the batch axis; use -1 (channels-last) or 1 (channels-first)")
    return axis


def _check_keras_fused(o: dict[str, Any], axis: int) -> None:
    """The errors Keras raises for fused=True (and synchronized=True with fused=True)."""
    if o["synchronized"] and o["fused"]:
        raise ValueError("fused=True is not supported when synchronized=True (Keras raises too)")
    if o["fused"] is not True:
        return
    reasons = {
        "renorm=True": o["renorm"],
        "virtual_batch_size": o["virtual_batch_size"] is not None,
        "adjustment": o["adjustment"] is not None,
        f"axis={axis} (fused needs axis 1 or -1)": axis not in (-4, -3, -1, 1, 3, 4),
    }
    bad = [name for name, present in reasons.items() if present]
    if bad:
        raise ValueError(
            f"fused=True cannot be used with {', '.join(bad)} (Keras raises the same). "
            "Fix: fused=None picks the fused kernel when it applies"
        )


def from_keras(num_features: int, **kwargs: Any) -> KerasBatchNorm:
    """``tf_keras.layers.BatchNormalization``'s arguments and numerics in a PyTorch module.

    Args:
        num_features: C, the number of channels (Keras infers it from the input).
        **kwargs: Keras' arguments, with Keras' defaults: ``axis=-1`` (an int or a
            one-element list), ``momentum=0.99`` (Keras' momentum is TF's decay: the weight
            of the old value), ``epsilon=0.001``, ``center=True``, ``scale=True``,
            ``beta_initializer="zeros"``, ``gamma_initializer="ones"``,
            ``moving_mean_initializer="zeros"``, ``moving_variance_initializer="ones"``,
            ``beta_regularizer``, ``gamma_regularizer``, ``beta_constraint``,
            ``gamma_constraint``, ``renorm=False``, ``renorm_clipping=None``,
            ``renorm_momentum=0.99``, ``fused=None``, ``trainable=True``,
            ``virtual_batch_size=None``, ``adjustment=None``, ``synchronized=False``,
            ``name=None``, ``dtype=None``; and bnkit's ``device``. What each becomes:
            docs/migrating-from-tensorflow.md.

    Returns:
        A :class:`KerasBatchNorm` in training mode; call it with ``mask=`` for masked data.

    Raises:
        TypeError: an argument Keras does not have (the message lists the accepted ones).
        ValueError: what Keras refuses (fused=True with renorm, virtual_batch_size,
            adjustment or an unsupported axis; virtual_batch_size with adjustment), a
            multi-axis ``axis``.

    Example:
        >>> import torch
        >>> bn = from_keras(8, momentum=0.9, virtual_batch_size=4)
        >>> bn.ghost_layout, bn.momentum
        ('strided', 0.09999999999999998)
        >>> bn(torch.randn(16, 8)).shape
        torch.Size([16, 8])
    """
    o = _options(kwargs, _KERAS_DEFAULTS, "from_keras (tf_keras BatchNormalization)", "mask")
    axis = _keras_axis(o["axis"])
    _check_keras_fused(o, axis)
    if o["virtual_batch_size"] is not None and o["adjustment"] is not None:
        raise ValueError("virtual_batch_size and adjustment cannot be combined (Keras raises too)")
    renorm = bool(o["renorm"])
    regularizers = optim._named(
        (("bias", o["beta_regularizer"]), ("weight", o["gamma_regularizer"])), optim.regularizer
    )
    constraints = optim._named(
        (("bias", o["beta_constraint"]), ("weight", o["gamma_constraint"])), optim.constraint
    )
    return KerasBatchNorm(
        num_features,
        fused=None if o["fused"] is None else bool(o["fused"]),
        synchronized=bool(o["synchronized"]),
        trainable=bool(o["trainable"]),
        tf_scope=o["name"],
        regularizers=regularizers,
        constraints=constraints,
        axis=axis,
        eps=float(o["epsilon"]),
        decay=_decay_value(o["momentum"], "momentum"),
        center=bool(o["center"]),
        scale=bool(o["scale"]),
        renorm=renorm,
        renorm_clipping=dict(o["renorm_clipping"]) if renorm and o["renorm_clipping"] else None,
        renorm_decay=_decay_value(o["renorm_momentum"], "renorm_momentum") if renorm else None,
        virtual_batch_size=o["virtual_batch_size"],
        ghost_layout="strided",
        adjustment=o["adjustment"],
        weight_init=_initializer(o["gamma_initializer"], "gamma_initializer"),
        bias_init=_initializer(o["beta_initializer"], "beta_initializer"),
        running_mean_init=_initializer(o["moving_mean_initializer"], "moving_mean_initializer"),
        running_var_init=_initializer(
            o["moving_variance_initializer"], "moving_variance_initializer"
        ),
        device=o["device"],
        dtype=_dtype(o["dtype"]),
    )
