"""BatchNorm: every option of TF-slim, Keras, PyTorch and Flax batch norm in one module.

The module holds parameters and buffers, checks its input, and calls the functional core
(`bnkit.functional.batch_norm`); the rules for moving statistics live in `bnkit.running`.
Under the policy ``kernels="cpp"`` the steps the C++ operator does alone call it directly
(`BatchNorm._one_kernel_call`; see docs/architecture.md).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from bnkit import distributed, running
from bnkit import functional as bnf
from bnkit.functional import Activation, Adjustment, GhostLayout
from bnkit.kernels import cpp
from bnkit.policies import (
    BatchNormWarning,
    check_policies,
    get_policy,
    get_policy_eager,
    is_calibrating,
)
from bnkit.running import MovingAverageRule, RunningState, RunningVar, ZeroDebias

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

Init = float | Sequence[float] | Tensor | Callable[[Tensor], Any] | None


class _Default(float):
    """Marks an argument left at its default (so ``decay`` alone is not a conflict)."""


_MOMENTUM_DEFAULT = _Default(0.1)
_HALF = (torch.float16, torch.bfloat16)
_FULL = (torch.float32, torch.float64)
# Bound once: the one-call path asks on every step (Dynamo knows the function, not the name).
_is_compiling = torch.compiler.is_compiling

# Buffers that exist only when needed: while frozen, and once an update was skipped.
LAZY_BUFFERS = ("frozen", "num_skipped_updates")

# Buffers that hold statistics, in the order they are registered.
_STAT_BUFFERS = (
    "running_mean",
    "running_var",
    "running_mean_biased",
    "running_mean_local_step",
    "running_var_biased",
    "running_var_local_step",
    "running_stddev",
    "renorm_mean",
    "renorm_stddev",
)

# Renorm's buffers (Keras' rule), which the kernels update in place with the running ones.
_RENORM_BUFFERS = ("running_stddev", "renorm_mean", "renorm_stddev")


def _apply_init(target: Tensor, init: Init, default: float, name: str) -> None:
    """Fill ``target`` from a number, an array-like, an in-place callable, or the default."""
    with torch.no_grad():
        if init is None:
            target.fill_(default)
        elif callable(init) and not isinstance(init, Tensor):
            init(target)
        else:
            value = torch.as_tensor(init, dtype=target.dtype, device=target.device)
            if value.numel() not in (1, target.numel()):
                raise ValueError(
                    f"{name} has {value.numel()} values but the layer has {target.numel()} "
                    "channels; pass a single number, one value per channel, or a callable "
                    "that fills the tensor in place (e.g. torch.nn.init.ones_)"
                )
            target.copy_(value.reshape(-1).expand(target.numel()).reshape(target.shape))


class BatchNorm(nn.Module):
    r"""Batch normalization with every option of TF-slim, Keras, PyTorch and Flax.

    Training normalizes with batch statistics over every axis but ``axis`` (the biased
    variance), then applies renorm's correction, the adjustment, the affine transform and
    the activation; inference uses the running statistics::

        x̂ = (x - μ_B) / sqrt(σ²_B + eps)
        y = act(((x̂ · r + d) · a + b) · γ + β)            # training
        y = act((x - μ_run) / sqrt(σ²_run + eps) · γ + β)  # inference

    Each training call moves the running statistics once (see ``bnkit.running``):
    ``μ_run ← (1 - momentum) μ_run + momentum μ_B`` and likewise for the variance, with the
    Bessel-corrected (``running_var="unbiased"``, PyTorch and TF's fused kernels) or biased
    (``"biased"``, Keras non-fused, Flax) batch variance.

    Args:
        num_features: C, the number of channels.
        axis: the channel axis: 1 for (N, C, ...) data, -1 for channels-last (N, ..., C).
        eps: added to the variance. PyTorch: 1e-5; TensorFlow/Keras: 1e-3.
        momentum: weight of the new batch (PyTorch convention, default 0.1); ``None`` means
            a cumulative average of all batches. Give this or ``decay``, not both.
        decay: weight of the old value (TensorFlow convention): ``decay = 1 - momentum``.
        center: learn an offset β (``bias``). TF-slim's ``center``.
        scale: learn a scale γ (``weight``). TF-slim's ``scale`` (its default is False!).
        affine: PyTorch's name for ``center`` and ``scale`` together; overrides both.
        track_running_stats: keep running statistics. False: no buffers, and batch
            statistics are used in inference too (PyTorch semantics).
        running_var: ``"unbiased"`` or ``"biased"``: which batch variance feeds the running
            estimate. Normalization in training always uses the biased one.
        warmup: TensorFlow's ``num_updates`` rule: effective decay
            ``min(decay, (1 + t) / (10 + t))`` after t updates, so early running statistics
            are not dominated by their initial values.
        zero_debias: ``False``, ``"mean"`` (TF-slim's ``zero_debias_moving_mean``) or
            ``"both"``: TF's zero-debiased moving average (the initial value is ignored).
        renorm: batch renormalization (Ioffe 2017) as Keras and TF-slim implement it.
        renorm_clipping: ``{"rmin", "rmax", "dmax"}`` bounds for r and d (missing = no clip).
        renorm_momentum: weight of the new batch in the renorm statistics (PyTorch
            convention); or ``renorm_decay`` (TF convention, Keras' ``renorm_momentum``).
            Default: decay 0.99.
        virtual_batch_size: ghost batch normalization: samples per ghost batch, in training
            only; must divide the batch size.
        ghost_layout: ``"contiguous"`` (ghost j = samples j·v … j·v+v−1) or ``"strided"``
            (Keras: ghost j = samples j, j+G, j+2G, …).
        adjustment: ``callable(input_shape) -> (scale, bias)`` applied to x̂ in training only
            (Keras/slim ``adjustment``); 1-D results of length C are per channel.
        activation: None, ``"relu"``, ``"leaky_relu"``, ``"elu"``, ``"silu"``, ``"gelu"`` or a
            callable, applied after the affine transform.
        sync: synchronize batch statistics across processes: in training, with an
            initialized ``torch.distributed`` group of more than one rank, the statistics are
            those of the union of all ranks' batches (count-weighted; empty batches take part
            and return empty outputs); running statistics end identical on every rank. Every
            rank must run the layer's forward and backward (docs/distributed.md). Ghost
            batches stay per rank. Assignable (``bn.sync = True``).
        process_group: synchronize over this group instead of the default one (needs
            ``sync=True``); e.g. a group from ``torch.distributed.new_subgroups()``.
        weight_init, bias_init, running_mean_init, running_var_init: a number, one value per
            channel, or a callable that fills the tensor in place.
        policy: this layer's own policies, e.g. ``{"nonfinite": "raise"}``; the others
            follow ``bnkit.set_policy`` / ``bnkit.policy`` (see ``bnkit.policies``).
        device, dtype: where and how to create parameters. Running statistics of a
            float16/bfloat16 module are kept in float32.

    Raises:
        ValueError: ``momentum`` and ``decay`` both given or out of [0, 1], unknown
            ``renorm_clipping`` keys, bad ``running_var``/``zero_debias``/``ghost_layout``,
            options that need running statistics with ``track_running_stats=False``,
            ``process_group`` without ``sync=True``.

    Shape:
        Input (N, C, \*) with ``axis=1`` or (N, \*, C) with ``axis=-1``; output the same.
        ``forward(x, weights=w)``: ``w`` of shape (N,) (per-sample weights, TF-slim's
        ``batch_weights``) or a mask over the leading non-channel dims, e.g. (N, L).

    Example:
        >>> bn = BatchNorm(3, decay=0.9, running_var="biased")
        >>> bn
        BatchNorm(3, eps=1e-05, momentum=0.1 (decay=0.9), running_var='biased')
        >>> y = bn(torch.randn(8, 3, 4, 4))
        >>> int(bn.num_batches_tracked)
        1
    """

    _version = 2
    running_mean: Tensor | None
    running_var: Tensor | None
    running_mean_biased: Tensor | None
    running_mean_local_step: Tensor | None
    running_var_biased: Tensor | None
    running_var_local_step: Tensor | None
    running_stddev: Tensor | None
    renorm_mean: Tensor | None
    renorm_stddev: Tensor | None

    def __init__(
        self,
        num_features: int,
        *,
        axis: int = 1,
        eps: float = 1e-5,
        momentum: float | None = _MOMENTUM_DEFAULT,
        decay: float | None = None,
        center: bool = True,
        scale: bool = True,
        affine: bool | None = None,
        track_running_stats: bool = True,
        running_var: RunningVar = "unbiased",
        warmup: bool = False,
        zero_debias: ZeroDebias = False,
        renorm: bool = False,
        renorm_clipping: dict[str, float] | None = None,
        renorm_momentum: float | None = None,
        renorm_decay: float | None = None,
        virtual_batch_size: int | None = None,
        ghost_layout: GhostLayout = "contiguous",
        adjustment: Adjustment | None = None,
        activation: Activation = None,
        sync: bool = False,
        process_group: Any = None,
        weight_init: Init = None,
        bias_init: Init = None,
        running_mean_init: Init = None,
        running_var_init: Init = None,
        policy: Mapping[str, str] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int):
            raise TypeError(f"num_features must be an int, got {num_features!r}")
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        if not eps > 0:
            raise ValueError(
                f"eps must be > 0, got {eps!r}: it keeps 1/sqrt(var + eps) finite on a constant "
                "channel. PyTorch uses 1e-5, TensorFlow/Keras 1e-3."
            )
        if running_var not in ("unbiased", "biased"):
            raise ValueError(f"running_var must be 'unbiased' or 'biased', got {running_var!r}")
        if ghost_layout not in ("contiguous", "strided"):
            raise ValueError(
                f"ghost_layout must be 'contiguous' or 'strided', got {ghost_layout!r}"
            )
        if virtual_batch_size is not None and (
            isinstance(virtual_batch_size, bool)
            or not isinstance(virtual_batch_size, int)
            or virtual_batch_size < 1
        ):
            raise ValueError(
                f"virtual_batch_size must be a positive int or None, got {virtual_batch_size!r}"
            )
        if affine is not None:
            center = scale = bool(affine)
        if isinstance(momentum, _Default) and decay is not None:
            momentum = None
            resolved = running.resolve_momentum(None, decay, default_momentum=None)
        else:
            resolved = running.resolve_momentum(
                None if momentum is None else float(momentum), decay, default_momentum=None
            )
        if renorm_clipping is not None:
            unknown = set(renorm_clipping) - {"rmin", "rmax", "dmax"}
            if unknown:
                raise ValueError(
                    f"renorm_clipping has unknown keys {sorted(unknown)}; allowed keys are "
                    "'rmin', 'rmax' and 'dmax' (a missing key means no clipping)"
                )
            if not renorm:
                raise ValueError("renorm_clipping was given but renorm=False; pass renorm=True")
        if (renorm_momentum is not None or renorm_decay is not None) and not renorm:
            raise ValueError("renorm_momentum/renorm_decay need renorm=True")
        renorm_m = running.resolve_momentum(
            renorm_momentum,
            renorm_decay,
            default_momentum=1.0 - 0.99,
            names=("renorm_momentum", "renorm_decay"),
        )
        needs_running = {
            "renorm": renorm,
            "warmup": warmup,
            "zero_debias": bool(zero_debias),
        }
        if not track_running_stats and any(needs_running.values()):
            given = [k for k, v in needs_running.items() if v]
            raise ValueError(
                f"{', '.join(given)} configure running statistics, but "
                "track_running_stats=False keeps none. Fix: drop those options or keep "
                "track_running_stats=True."
            )
        if renorm and zero_debias == "both":
            raise ValueError(
                "renorm keeps the moving variance as a moving standard deviation, and no "
                "reference system defines zero-debiasing it; use zero_debias='mean' with renorm"
            )
        self._rule = MovingAverageRule(resolved, warmup=warmup, zero_debias=zero_debias)
        bnf.resolve_activation(activation)  # fail early on an unknown name
        if not isinstance(sync, bool):
            raise TypeError(f"sync must be True or False, got {sync!r}")
        if process_group is not None and not sync:
            raise ValueError(
                "process_group was given but sync=False: the group is only used to "
                "synchronize batch statistics. Fix: pass sync=True as well"
            )

        self.num_features = num_features
        self.axis = axis
        self.eps = float(eps)
        self.center = center
        self.scale = scale
        self.track_running_stats = track_running_stats
        self.running_var_mode: RunningVar = running_var
        self.renorm = renorm
        self.renorm_clipping = dict(renorm_clipping) if renorm_clipping else None
        self.renorm_momentum = renorm_m if renorm else None
        self.virtual_batch_size = virtual_batch_size
        self.ghost_layout: GhostLayout = ghost_layout
        self.adjustment = adjustment
        self.activation = activation
        self.sync = sync
        self._group = distributed.GroupHandle(process_group)
        self.policy: dict[str, str] = check_policies(policy or {})
        self.layer_name: str | None = None
        self._warned: set[str] = set()
        self._inits = {
            "weight": weight_init,
            "bias": bias_init,
            "running_mean": running_mean_init,
            "running_var": running_var_init,
        }

        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        param_dtype = dtype if dtype is not None else torch.get_default_dtype()
        stat_dtype = torch.float32 if param_dtype in _HALF else param_dtype
        stats: dict[str, Any] = {"device": device, "dtype": stat_dtype}
        self.weight: nn.Parameter | None
        self.bias: nn.Parameter | None
        if scale:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
        if center:
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("bias", None)

        self.num_batches_tracked: Tensor | None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **stats))
            self.register_buffer("running_var", torch.ones(num_features, **stats))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
            debiased = {"mean": ("running_mean",), "both": ("running_mean", "running_var")}
            for stat in debiased.get(zero_debias or "", ()):
                self.register_buffer(f"{stat}_biased", torch.zeros(num_features, **stats))
                self.register_buffer(
                    f"{stat}_local_step", torch.tensor(0, dtype=torch.long, device=device)
                )
            if renorm:
                for name in ("running_stddev", "renorm_mean", "renorm_stddev"):
                    self.register_buffer(name, torch.zeros(num_features, **stats))
        else:
            self.register_buffer("num_batches_tracked", None)
        # Options that are off still have their attribute, as None. Registered after the real
        # buffers: torch.export numbers a root module's buffers counting the None ones before
        # a real one (an IndexError in non-strict export of a bare layer, torch 2.13).
        for name in _STAT_BUFFERS:
            if name not in self._buffers:
                self.register_buffer(name, None)
        self.reset_parameters()

    # ----------------------------------------------------------------- state

    @property
    def momentum(self) -> float | None:
        """Weight of the new batch (PyTorch convention); None for a cumulative average.

        Assignable, as on PyTorch's layers (``bn.momentum = None`` switches to a cumulative
        average); the new value is validated.
        """
        return self._rule.momentum

    @momentum.setter
    def momentum(self, value: float | None) -> None:
        resolved = (
            None if value is None else running.resolve_momentum(value, None, default_momentum=None)
        )
        self._rule = replace(self._rule, momentum=resolved)

    @property
    def decay(self) -> float | None:
        """The TensorFlow-convention decay, ``1 - momentum`` (None for a cumulative average).

        Assignable: ``bn.decay = 0.99`` sets ``momentum`` to 0.01.
        """
        return self._rule.decay

    @decay.setter
    def decay(self, value: float) -> None:
        self._rule = replace(
            self._rule, momentum=running.resolve_momentum(None, value, default_momentum=None)
        )

    @property
    def warmup(self) -> bool:
        """TensorFlow's ``num_updates`` warm-up of the decay (assignable)."""
        return self._rule.warmup

    @warmup.setter
    def warmup(self, value: bool) -> None:
        self._rule = replace(self._rule, warmup=bool(value))

    @property
    def zero_debias(self) -> ZeroDebias:
        """Which statistics use TF's zero-debiased average (fixed: it decides the buffers)."""
        return self._rule.zero_debias

    @property
    def process_group(self) -> Any:
        """The group statistics are synchronized over (None: the default group); assignable.

        Copying the layer shares the group; pickling a layer with an explicit group raises
        (save the state dict instead).
        """
        return self._group.group

    @process_group.setter
    def process_group(self, group: Any) -> None:
        self._group = distributed.GroupHandle(group)

    @property
    def affine(self) -> bool:
        """PyTorch's ``affine``: True when the layer learns both a scale and an offset."""
        return self.center and self.scale

    def reset_running_stats(self) -> None:
        """Reset every statistic to its initial value and the step counters to zero."""
        if not self.track_running_stats:
            return
        assert self.running_mean is not None
        assert self.running_var is not None
        _apply_init(self.running_mean, self._inits["running_mean"], 0.0, "running_mean_init")
        _apply_init(self.running_var, self._inits["running_var"], 1.0, "running_var_init")
        with torch.no_grad():
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.zero_()
        self._start_option_statistics()

    def _derived_statistics(self, mean: Tensor, var: Tensor) -> dict[str, Tensor]:
        """Where the statistics that options add start, given running_mean and running_var.

        Renorm's ``running_stddev`` and ``renorm_stddev`` start at ``sqrt(running_var)`` and
        ``renorm_mean`` at ``running_mean`` (Keras); zero-debias shadows start at zero (TF),
        so their first update replaces the statistic with the batch's.
        """
        values: dict[str, Tensor] = {}
        if self._buffers.get("running_stddev") is not None:
            values["running_stddev"] = torch.sqrt(var)
        if self._buffers.get("renorm_mean") is not None:
            values["renorm_mean"] = mean.clone()
            values["renorm_stddev"] = torch.sqrt(var)
        for stat, source in (("running_mean", mean), ("running_var", var)):
            if self._buffers.get(f"{stat}_biased") is not None:
                values[f"{stat}_biased"] = torch.zeros_like(source)
                values[f"{stat}_local_step"] = torch.zeros((), dtype=torch.long)
        return values

    def _start_option_statistics(self) -> None:
        """Set the statistics that options add from the current running_mean/running_var."""
        if self.running_mean is None or self.running_var is None:
            return
        derived = self._derived_statistics(self.running_mean, self.running_var)
        with torch.no_grad():
            for name, value in derived.items():
                getattr(self, name).copy_(value)

    def reset_parameters(self) -> None:
        """Reset running statistics and the affine parameters to their initial values."""
        self.reset_running_stats()
        if self.weight is not None:
            _apply_init(self.weight, self._inits["weight"], 1.0, "weight_init")
        if self.bias is not None:
            _apply_init(self.bias, self._inits["bias"], 0.0, "bias_init")

    def _running_state(self) -> RunningState:
        # Read the buffer dict directly: this runs on every training call.
        b = self._buffers
        mean, var = b["running_mean"], b["running_var"]
        if mean is None or var is None:
            missing = " and ".join(
                name for name, t in (("running_mean", mean), ("running_var", var)) if t is None
            )
            raise ValueError(
                f"{self._display_name()} tracks running statistics (track_running_stats=True) "
                f"but its {missing} is None, so a training step has nothing to update. Fix: "
                f"assign a tensor of {self.num_features} values (e.g. layer.running_mean = "
                f"torch.zeros({self.num_features}), then layer.reset_running_stats()), or set "
                "layer.track_running_stats = False to normalize with batch statistics only."
            )
        return RunningState(
            mean=mean,
            var=var,
            num_batches_tracked=b["num_batches_tracked"],
            mean_biased=b["running_mean_biased"],
            mean_local_step=b["running_mean_local_step"],
            var_biased=b["running_var_biased"],
            var_local_step=b["running_var_local_step"],
            stddev=b["running_stddev"],
            renorm_mean=b["renorm_mean"],
            renorm_stddev=b["renorm_stddev"],
        )

    # ---------------------------------------------------------------- checks

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(
                f"expected input of rank >= 2 (batch, channels, ...), got {x.dim()}D input "
                f"of shape {tuple(x.shape)}"
            )

    def _check_input(self, x: Tensor) -> int:
        self._check_input_dim(x)
        if not x.is_floating_point():
            raise TypeError(
                f"{type(self).__name__} needs floating-point input, got {x.dtype}; "
                "convert with x.float()"
            )
        own = self.weight if self.weight is not None else self.running_mean
        full = (torch.float32, torch.float64)
        if own is not None and x.dtype in full and own.dtype in full and x.dtype != own.dtype:
            raise TypeError(
                f"{type(self).__name__} holds {own.dtype} parameters but got {x.dtype} input. "
                f"Fix: convert the input (x.to({own.dtype})) or the layer "
                f"(layer.to({x.dtype})); float16/bfloat16 input is accepted by float32 layers."
            )
        a = bnf.canonical_axis(self.axis, x.dim())
        if x.shape[a] != self.num_features:
            hint = ""
            other = -1 if a == 1 else 1
            if x.shape[bnf.canonical_axis(other, x.dim())] == self.num_features:
                layout = "channels-last" if other == -1 else "channels-first"
                hint = f" The input looks {layout}: construct the layer with axis={other}."
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) expected {self.num_features} "
                f"channels on axis {self.axis} of the input, got {x.shape[a]} (input shape "
                f"{tuple(x.shape)}). Fix: build the layer with num_features={x.shape[a]}, or "
                f"check which layer feeds this one.{hint}"
            )
        return a

    # --------------------------------------------------------------- forward

    def forward(
        self, x: Tensor, *, weights: Tensor | None = None, training: bool | None = None
    ) -> Tensor:
        """Normalize ``x``.

        Args:
            x: input with ``num_features`` channels on ``axis``.
            weights: per-sample weights (N,) or a mask over the leading non-channel dims
                (TF-slim ``batch_weights``, Keras ``mask``); they weight the batch statistics.
            training: override the module's mode for this call (a frozen layer ignores it).

        Returns:
            The normalized tensor, same shape and dtype as ``x``.
        """
        if training is None:
            y = self._one_kernel_call(x, weights)
            if y is not None:
                return y
        a = self._check_input(x)
        training = self.training if training is None else bool(training)
        if self._buffers.get("frozen") is not None:
            training = False  # frozen: running statistics, never updated (bnkit.freeze)
        single_value = False
        # Synchronized: whether a batch has one value per channel is known only after the
        # collective (the global count), so no rank may decide alone to skip it, except with
        # ghost batches, whose size is the same on every rank.
        synced = self.sync and training and distributed.is_active(self._group.group)
        if training and self.track_running_stats:
            if not torch.is_grad_enabled() and not is_calibrating():
                self._on_no_grad_training()
            if not synced or self.virtual_batch_size is not None:
                single_value = bnf._one_value_per_channel(x, a, self.virtual_batch_size)
            if single_value and get_policy("single_value", self.policy) == "running":
                training = False
        # The layer's own kernels policy, if it has one; else functional reads the block's.
        impl: bnf.Impl = "cpp" if self.policy.get("kernels") == "cpp" else "auto"
        if self.policy.get("kernels") == "torch":
            impl = "torch"
        if not training and self.track_running_stats:
            return bnf.batch_norm(
                x,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                training=False,
                eps=self.eps,
                axis=self.axis,
                activation=self.activation,
                impl=impl,
            )
        renorm = self.renorm and training
        skip_update = (
            single_value and get_policy("single_value", self.policy) == "skip-update"
        ) or not self._updates_running_stats(x, weights)
        options: dict[str, Any] = {
            "training": True,
            "eps": self.eps,
            "axis": self.axis,
            "weights": weights,
            "virtual_batch_size": self.virtual_batch_size if training else None,
            "ghost_layout": self.ghost_layout,
            "renorm_mean": self.renorm_mean if renorm else None,
            "renorm_stddev": self.renorm_stddev if renorm else None,
            "renorm_clipping": self.renorm_clipping,
            "adjustment": self.adjustment if training else None,
            "activation": self.activation,
            "allow_single_value": skip_update,
            "sync": synced,
            "process_group": self._group.group,
            "impl": impl,
        }
        if skip_update or not (training and self.track_running_stats):
            # Batch statistics with nothing to update (track_running_stats=False, or the
            # single_value="skip-update" policy on a batch of one value per channel).
            out: Tensor = bnf.batch_norm(x, None, None, self.weight, self.bias, **options)
            return out
        state = self._running_state()
        nonfinite = get_policy("nonfinite", self.policy)
        before = running.snapshot(state) if nonfinite != "update" else None
        y = self._train_and_update(x, weights, state, options)
        if before is not None:
            self._check_update(state, before, nonfinite)
        return y

    def _one_kernel_call(self, x: Tensor, weights: Tensor | None) -> Tensor | None:
        """The whole call as one C++ operator, or None where :meth:`forward`'s path must run.

        Under the policy ``kernels="cpp"``, in eager mode, a layer whose step is only what the
        operators do -- statistics (per ghost batch, or weighted), renorm, a running-statistics
        rule the kernel knows (``running.kernel_rule``: PyTorch's, the biased feed of TF-slim
        and Keras, Keras' renorm rule), the affine transform, a fused ReLU; or the inference
        pass, with or without gradients -- skips the general path's dispatch: on mid-sized
        activations its checks, snapshots and small operations cost about a third as much as
        the kernel itself. The operator also advances ``num_batches_tracked`` and makes the
        non-finite guard's decision (it skips an update that would store a NaN or an
        infinity), so the policies behave as on the general path.

        Anything unusual (no kernels yet, compiling, half-precision input, mismatched dtypes
        or channels, one value per channel, training without gradients that the
        ``no_grad_training`` policy reports, an option beyond these) returns None, and
        :meth:`forward` handles it, with its checks and messages.
        """
        # Every check here runs on each step, usually with the interpreter's caches cold from the
        # large kernels around it, where each distinct operation costs a microsecond or more:
        # the checks are ordered cheapest first and read each attribute once.
        # cpp.ready() first: one dict read, False for every user who never turned the kernels on.
        if not cpp.ready() or _is_compiling():
            return None
        layer = self.policy
        if get_policy_eager("kernels", layer) != "cpp":
            return None
        dtype = x.dtype
        activation = self.activation
        if dtype not in _FULL or not x.is_cpu or (activation is not None and activation != "relu"):
            return None
        ndim = x.dim()
        if ndim < 2:
            return None
        # In forward()'s order, so a bad input gets the same message: rank, dtype, then axis.
        self._check_input_dim(x)  # a subclass's rank check (BatchNorm2d wants 4-D input)
        p, b = self._parameters, self._buffers
        weight, bias = p["weight"], p["bias"]
        running_mean, running_var = b["running_mean"], b["running_var"]
        own = weight if weight is not None else running_mean
        if own is not None and own.dtype != dtype:
            return None
        a = self.axis + ndim if self.axis < 0 else self.axis
        if not 0 < a < ndim or x.shape[a] != self.num_features:
            return None  # forward() names the bad axis or channel count
        numel = x.numel()
        # track_running_stats: the flag, not the buffers (it may be switched off with them kept)
        if not self.track_running_stats or running_mean is None or running_var is None:
            return None
        if numel == 0:
            return None  # an empty batch: forward() counts it without statistics
        xt = x.movedim(a, 1) if a != 1 else x
        relu = activation == "relu"
        if not self.training or b.get("frozen") is not None:
            # Sample weights weight batch statistics only: inference ignores them, as forward().
            y = cpp.ENTRY["bn_eval"](xt, running_mean, running_var, weight, bias, self.eps, relu)
            return bnf._kernel_layout(y.movedim(1, a), x, a) if a != 1 else y
        ghosts = 1 if self.virtual_batch_size is None else self._ghosts_in(x)
        if (
            ghosts is None
            or numel <= ghosts * x.shape[a]  # one value per channel: single_value policy
            or self.sync
            or self.adjustment is not None
        ):
            return None
        stddev, renorm_mean, renorm_stddev = (
            b["running_stddev"],
            b["renorm_mean"],
            b["renorm_stddev"],
        )
        if renorm_mean is not None and not self.renorm:
            return None  # renorm switched off after construction, its buffers kept
        for t in (running_mean, running_var, stddev, renorm_mean, renorm_stddev):
            if t is not None and (t.dtype != dtype or not t.is_contiguous()):
                return None
        counter = b["num_batches_tracked"]
        if counter is not None and (counter.dtype != torch.long or counter.numel() != 1):
            return None
        if not self._updates_running_stats(x, weights):
            return None
        sample_weight = None
        if weights is not None:
            # Same for every channel and without a gradient, else the general path.
            sample_weight = bnf._cpp_sample_weights(weights, x, a)
            if sample_weight is None:
                return None
        if not torch.is_grad_enabled() and not (
            is_calibrating() or get_policy_eager("no_grad_training", layer) == "ignore"
        ):
            return None  # forward() warns (or raises) about the forgotten model.eval()
        # Zero-debias buffers stay out: running.py declines zero-debias rules for the kernel.
        state = RunningState(
            running_mean,
            running_var,
            counter,
            stddev=stddev,
            renorm_mean=renorm_mean,
            renorm_stddev=renorm_stddev,
        )
        rule = running.eager_kernel_rule(
            state, self._rule, self._running_var_for(x, weights), self.renorm_momentum
        )
        if rule is None:
            return None
        nonfinite = get_policy_eager("nonfinite", layer)
        guard = nonfinite != "update"
        rmin, rmax, dmax = bnf._renorm_bounds(self.renorm_clipping)
        # cpp.train's arguments, positionally: its keyword binding costs microseconds per step.
        y, _, _, _, _, updated = cpp.ENTRY["bn_train"](
            xt,
            weight,
            bias,
            self.eps,
            ghosts,
            self.ghost_layout == "strided",
            renorm_mean,
            renorm_stddev,
            rmin,
            rmax,
            dmax,
            relu,
            running_mean,
            running_var,
            rule.momentum,
            sample_weight,
            counter,
            guard,
            stddev,
            rule.renorm_momentum or 0.0,
            rule.biased,
        )
        if guard and not updated.item():
            self._report_skipped_update(state, nonfinite)
        return bnf._kernel_layout(y.movedim(1, a), x, a) if a != 1 else y

    def _ghosts_in(self, x: Tensor) -> int | None:
        """How many ghost batches a training call on ``x`` has (1 without ghost batches), or
        None when ``virtual_batch_size`` does not divide the batch (the general path says so)."""
        size = self.virtual_batch_size
        if size is None:
            return 1
        if size < 1 or x.shape[0] % size != 0:
            return None
        return x.shape[0] // size

    def _train_and_update(
        self, x: Tensor, weights: Tensor | None, state: RunningState, options: dict[str, Any]
    ) -> Tensor:
        """One training step that moves the running statistics once."""
        feed = self._running_var_for(x, weights)
        momentum = running.kernel_momentum(state, self._rule, feed)
        if momentum is not None:
            # PyTorch's rule: the kernel (or the functional core) updates the buffers.
            y: Tensor = bnf.batch_norm(
                x, state.mean, state.var, self.weight, self.bias, momentum=momentum, **options
            )
            running.count_update_(state)
            return y
        y, stats = bnf.batch_norm(
            x, None, None, self.weight, self.bias, return_stats=True, **options
        )
        if stats is not None:
            running.update_running_stats_(
                state,
                stats,
                self._rule,
                running_var=feed,
                eps=self.eps,
                renorm_momentum=self.renorm_momentum,
            )
        else:
            # An empty batch has no statistics to absorb, but it is a training call: count
            # it, as torch (and the kernel path above) does.
            running.count_update_(state)
        return y

    # ---------------------------------------------------------------- guards

    def _display_name(self) -> str:
        name = self.layer_name or getattr(self, "tf_scope", None)
        if name is None and not torch.compiler.is_compiling():
            name = self._path_in_calling_model()
        short = f"{type(self).__name__}({self.num_features})"
        return f"{short} {name!r}" if name else short

    def _path_in_calling_model(self) -> str | None:
        """This layer's path in the outermost module whose forward is running, if any.

        A layer does not know its parent; the modules that called it are on the stack. Only
        used to word a warning or an error, so the frame walk costs nothing in the hot path.
        """
        path = None
        frame = inspect.currentframe()
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and owner is not self:
                for name, module in owner.named_modules():
                    if module is self:
                        path = name  # keep walking out: the outermost model names it fully
                        break
            frame = frame.f_back
        return path

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, BatchNormWarning, stacklevel=4)

    def _on_no_grad_training(self) -> None:
        """The classic forgotten ``model.eval()``: training mode while autograd is off."""
        action = get_policy("no_grad_training", self.policy)
        if action == "ignore":
            return
        message = (
            f"{self._display_name()} ran in training mode under torch.no_grad() / "
            "inference_mode: it normalized with this batch's statistics and moved its running "
            "statistics. If this is evaluation or prediction, call model.eval() first (and "
            "model.train() after). If you are estimating statistics on purpose, use "
            "bnkit.recalibrate(model, data) or wrap the loop in "
            "bnkit.policies.calibrating(); to silence this, set the policy "
            "no_grad_training='ignore'."
        )
        if action == "raise":
            raise RuntimeError(message)
        self._warn_once("no_grad_training", message)

    def _check_update(self, state: RunningState, before: dict[str, Tensor], nonfinite: str) -> None:
        """Undo an update that made the running statistics non-finite (policy ``nonfinite``)."""
        if torch.compiler.is_compiling():
            ok = running.all_finite(state)
            # No data-dependent Python in a compiled graph: keep or restore with tensor ops.
            # The skip is neither warned about nor counted; "raise" is an in-graph assertion
            # (RuntimeError), checked after the restore.
            running.restore_(state, before, keep=ok)
            if nonfinite == "raise":
                torch._assert_async(
                    ok,
                    f"{self._display_name()}: this training batch has non-finite statistics "
                    "(NaN or inf in the input); the running statistics were left unchanged "
                    "(policy nonfinite='raise', under torch.compile)",
                )
            return
        if running.is_finite(state):
            return
        running.restore_(state, before)
        self._report_skipped_update(state, nonfinite)

    def _report_skipped_update(self, state: RunningState, nonfinite: str) -> None:
        """Count an update left out for non-finite statistics; warn, or raise under "raise".

        ``state`` holds the statistics as they were before the batch (restored, or never
        written when the kernel's guard decided).
        """
        skipped = self._buffers.get("num_skipped_updates")
        if skipped is None:
            skipped = torch.zeros((), dtype=torch.long, device=state.mean.device)
            self.register_buffer("num_skipped_updates", skipped)
        skipped.add_(1)
        was_finite = running.is_finite(state)
        already = (
            ""
            if was_finite
            else (
                " The running statistics were already non-finite before this batch: reset them "
                "(layer.reset_running_stats()) or recalibrate (bnkit.recalibrate)."
            )
        )
        message = (
            f"{self._display_name()}: this training batch has non-finite statistics (NaN or "
            "inf in the input), which would have made the running statistics non-finite for "
            "good. The update was skipped and counted in layer.num_skipped_updates "
            f"(now {int(skipped)}).{already} Look for the source of the NaN (learning rate, "
            "loss scaling, bad data); policy nonfinite='raise' stops at the first one."
        )
        if nonfinite == "raise":
            raise FloatingPointError(message)
        self._warn_once("nonfinite", message)

    # ---------------------------------------------------------------- freeze

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "frozen":
            # The property, not nn.Module's buffer assignment for the buffer of that name.
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def frozen(self) -> bool:
        """A frozen layer normalizes with its running statistics and never updates them,
        in training mode too; the flag is saved in the state dict (``bnkit.freeze``)."""
        return self._buffers.get("frozen") is not None

    @frozen.setter
    def frozen(self, value: bool) -> None:
        if value and not self.track_running_stats:
            raise ValueError(
                f"{self._display_name()} keeps no running statistics "
                "(track_running_stats=False), so it cannot be frozen on them"
            )
        if value and not self.frozen:
            device = self.running_mean.device if self.running_mean is not None else None
            # Straight into _buffers: register_buffer refuses a name the class uses (the
            # property), and the state dict key should be plain "frozen".
            self._buffers["frozen"] = torch.tensor(True, device=device)
        elif not value and self.frozen:
            del self._buffers["frozen"]

    def _updates_running_stats(self, x: Tensor, weights: Tensor | None) -> bool:
        """Whether a training call on this input moves the running statistics (True here;
        slim's core-layer path with ``trainable=False`` never does)."""
        return True

    def _running_var_for(self, x: Tensor, weights: Tensor | None) -> RunningVar:
        """Which batch variance feeds the running estimate for this input.

        ``running_var_mode`` here; the TF presets override it because slim and Keras pick
        their code path, and with it the variance, from the input's rank and the weights.
        """
        return self.running_var_mode

    # ------------------------------------------------------- torch plumbing

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> BatchNorm:
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        # Running statistics never drop to half precision: variances above 65504 would
        # become inf in float16, and EMA updates would round away in bfloat16.
        for name in _STAT_BUFFERS:
            buf = self._buffers.get(name)
            if buf is not None and buf.dtype in _HALF:
                self._buffers[name] = buf.float()
        return self

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        version = local_metadata.get("version")
        key = prefix + "num_batches_tracked"
        # Checkpoints written before PyTorch added the counter (version < 2) lack it. Like
        # torch, keep the layer's own counter (0 when fresh; 0 for a meta-device layer).
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            current = self.num_batches_tracked
            keep = current is not None and current.device.type != "meta"
            state_dict[key] = current if keep else torch.tensor(0, dtype=torch.long)
        self._adopt_lazy_buffers(state_dict, prefix)
        mean, var = state_dict.get(prefix + "running_mean"), state_dict.get(prefix + "running_var")
        if isinstance(mean, Tensor) and isinstance(var, Tensor):
            # A state without the statistics that this layer's options add (a torch.nn or a
            # plain bnkit checkpoint): start them from the loaded statistics, as a fresh layer
            # starts them from its initial ones, instead of leaving them at their init.
            for name, value in self._derived_statistics(mean, var).items():
                state_dict.setdefault(prefix + name, value)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _adopt_lazy_buffers(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Buffers that exist only when needed (``frozen``, ``num_skipped_updates``).

        A state that has them creates them here, so they load; a state without them leaves
        the layer's own (a frozen layer stays frozen when plain weights are loaded into it).
        """
        for name in LAZY_BUFFERS:
            key = prefix + name
            if key in state_dict and self._buffers.get(name) is None:
                value = state_dict[key]
                if isinstance(value, Tensor):
                    self._buffers[name] = torch.empty_like(value, device=self._device())
            elif key not in state_dict and self._buffers.get(name) is not None:
                state_dict[key] = self._buffers[name]

    def _device(self) -> torch.device | None:
        ref = self.running_mean if self.running_mean is not None else self.weight
        return None if ref is None else ref.device

    def extra_repr(self) -> str:
        parts = [f"{self.num_features}"]
        if self.axis != 1:
            parts.append(f"axis={self.axis}")
        parts.append(f"eps={self.eps}")
        if self.momentum is None:
            parts.append("momentum=None (cumulative average)")
        else:
            parts.append(f"momentum={_fmt(self.momentum)} (decay={_fmt(1.0 - self.momentum)})")
        if not self.affine:
            parts.append(f"center={self.center}, scale={self.scale}")
        defaults: dict[str, Any] = {
            "track_running_stats": True,
            "running_var_mode": "unbiased",
            "warmup": False,
            "zero_debias": False,
            "renorm": False,
            "renorm_clipping": None,
            "virtual_batch_size": None,
            "adjustment": None,
            "activation": None,
            "sync": False,
        }
        for name, default in defaults.items():
            value = getattr(self, name)
            if value is not default and value != default:
                label = "running_var" if name == "running_var_mode" else name
                parts.append(f"{label}={_describe(value)}")
        if self.renorm and self.renorm_momentum is not None:
            m = self.renorm_momentum
            parts.append(f"renorm_momentum={_fmt(m)} (renorm_decay={_fmt(1.0 - m)})")
        if self.virtual_batch_size is not None:
            parts.append(f"ghost_layout={self.ghost_layout!r}")
        if self.process_group is not None:
            parts.append(f"process_group={_group_label(self.process_group)}")
        if self.frozen:
            parts.append("frozen=True")
        if self.policy:
            parts.append(f"policy={self.policy!r}")
        return ", ".join(parts)


def _fmt(x: float) -> str:
    """Format a rate without float noise: 1 - 0.999 prints as 0.001."""
    return f"{round(x, 12):g}" if math.isfinite(x) else str(x)


def _group_label(group: Any) -> str:
    name = getattr(group, "group_name", None)
    return f"<process group {name!r}>" if name is not None else repr(group)


def _describe(value: Any) -> str:
    if callable(value) and not isinstance(value, nn.Module):
        return getattr(value, "__name__", type(value).__name__)
    return repr(value)


class _TorchSignature(BatchNorm):
    """PyTorch's positional signature ``(num_features, eps, momentum, affine,
    track_running_stats, device, dtype, *, bias)`` plus every bnkit option as a keyword."""

    _expected_ranks: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = _MOMENTUM_DEFAULT,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        **options: Any,
    ) -> None:
        if "center" in options or "scale" in options or "affine" in options:
            raise TypeError(
                f"{type(self).__name__} takes PyTorch's affine (and bias=) arguments; use "
                "bnkit.BatchNorm for center/scale"
            )
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            center=affine and bias,
            scale=affine,
            track_running_stats=track_running_stats,
            device=device,
            dtype=dtype,
            **options,
        )

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in self._expected_ranks:
            wanted = " or ".join(f"{r}D" for r in self._expected_ranks)
            raise ValueError(
                f"{type(self).__name__} expected {wanted} input (got {x.dim()}D input of "
                f"shape {tuple(x.shape)})"
            )


class BatchNorm1d(_TorchSignature):
    """Drop-in for ``torch.nn.BatchNorm1d``: (N, C) or (N, C, L) input, same state_dict keys.

    >>> bn = BatchNorm1d(4)
    >>> sorted(bn.state_dict())
    ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight']
    """

    _expected_ranks = (2, 3)


class BatchNorm2d(_TorchSignature):
    """Drop-in for ``torch.nn.BatchNorm2d``: (N, C, H, W) input, same state_dict keys.

    >>> BatchNorm2d(8, momentum=None)
    BatchNorm2d(8, eps=1e-05, momentum=None (cumulative average))
    """

    _expected_ranks = (4,)


class BatchNorm3d(_TorchSignature):
    """Drop-in for ``torch.nn.BatchNorm3d``: (N, C, D, H, W) input, same state_dict keys."""

    _expected_ranks = (5,)
