"""Shared machinery of the TensorFlow parity suite: data, traces, and comparing them.

A *trace* records what one training run shows from outside: for every training step the
output, the input gradient, the γ/β gradients of ``sum(y * upstream)`` and every moving
statistic after the step (under bnkit's names), then the output of inference on a fresh
batch. The TF side and the bnkit side each produce one from the same float32 arrays, and
:func:`assert_traces_close` compares them at rtol 1e-4 / atol 1e-5.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

RTOL = 1e-4
ATOL = 1e-5
STEPS = 3

# TF variable name (last components, without ":0") -> bnkit attribute. Longest first, so
# "moving_mean/biased" is not taken for "moving_mean".
TF_TO_BNKIT: tuple[tuple[str, str], ...] = (
    ("moving_mean/biased", "running_mean_biased"),
    ("moving_mean/local_step", "running_mean_local_step"),
    ("moving_mean", "running_mean"),
    ("moving_variance", "running_var"),
    ("moving_stddev", "running_stddev"),
    ("renorm_mean", "renorm_mean"),
    ("renorm_stddev", "renorm_stddev"),
    ("gamma", "weight"),
    ("beta", "bias"),
)
PARAMS = ("weight", "bias")


def bnkit_name(tf_name: str) -> str:
    """The bnkit attribute for a TF variable name such as ``bn/bn/moving_mean/biased:0``."""
    base = tf_name.split(":")[0]
    for suffix, name in TF_TO_BNKIT:
        if base == suffix or base.endswith("/" + suffix):
            return name
    raise KeyError(f"TF variable {tf_name!r} has no bnkit counterpart in the parity map")


@dataclass
class Data:
    """The float32 arrays both frameworks see: training batches, upstream gradients, weights."""

    xs: list[np.ndarray]
    upstream: list[np.ndarray]
    x_infer: np.ndarray
    weights: list[np.ndarray] | None = None


def make_data(
    shape: Sequence[int],
    axis: int,
    *,
    seed: int,
    steps: int = STEPS,
    weights: str | None = None,
) -> Data:
    """Random batches whose channels differ in mean and spread and drift from step to step.

    Args:
        shape: the input shape.
        axis: the channel axis (negative allowed).
        seed: numpy seed.
        steps: number of training batches.
        weights: None; ``"sample"`` for per-sample weights of shape (N,) in [0, 2) with one
            exact zero (slim's ``batch_weights``); ``"mask"`` for a 0/1 mask over
            ``shape[:-1]`` (Keras' mask for channels-last input) with about 30% zeros.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(shape)
    channels = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = channels
    shift = np.linspace(-1.0, 2.0, channels).reshape(bshape)
    spread = np.linspace(0.5, 2.0, channels).reshape(bshape)

    def batch(step: int) -> np.ndarray:
        x = rng.standard_normal(shape) * spread + shift + 0.4 * step
        return x.astype(np.float32)

    xs = [batch(i) for i in range(steps)]
    upstream = [rng.standard_normal(shape).astype(np.float32) for _ in range(steps)]
    w: list[np.ndarray] | None = None
    if weights == "sample":
        w = []
        for _ in range(steps):
            wi = rng.uniform(0.0, 2.0, shape[0]).astype(np.float32)
            wi[1] = 0.0
            w.append(wi)
    elif weights == "mask":
        w = [(rng.uniform(size=shape[:-1]) > 0.3).astype(np.float32) for _ in range(steps)]
        for wi in w:
            wi.reshape(shape[0], -1)[:, 0] = 1.0  # every sample keeps a position
    elif weights is not None:
        raise ValueError(weights)
    return Data(xs=xs, upstream=upstream, x_infer=batch(steps), weights=w)


@dataclass
class Trace:
    """What a training run shows: per step outputs, gradients, statistics; then inference."""

    outputs: list[np.ndarray] = field(default_factory=list)
    grad_x: list[np.ndarray] = field(default_factory=list)
    grad_params: list[dict[str, np.ndarray | None]] = field(default_factory=list)
    stats: list[dict[str, np.ndarray]] = field(default_factory=list)
    inference: np.ndarray | None = None


def _close(actual: Any, expected: Any, what: str) -> None:
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64),
        np.asarray(expected, dtype=np.float64),
        rtol=RTOL,
        atol=ATOL,
        err_msg=what,
    )


def assert_traces_close(bnkit: Trace, tf: Trace) -> None:
    """Every recorded quantity of the bnkit run equals the TF run's (rtol 1e-4, atol 1e-5)."""
    assert len(bnkit.outputs) == len(tf.outputs) >= 1
    for step in range(len(tf.outputs)):
        at = f"after training step {step + 1}"
        _close(bnkit.outputs[step], tf.outputs[step], f"output of training step {step + 1}")
        _close(bnkit.grad_x[step], tf.grad_x[step], f"input gradient of step {step + 1}")
        ours, theirs = bnkit.grad_params[step], tf.grad_params[step]
        assert ours.keys() == theirs.keys(), f"parameters differ: {ours.keys()} vs {theirs}"
        for name, expected in theirs.items():
            got = ours[name]
            if expected is None or got is None:
                assert got is None, f"bnkit has a {name} gradient where TF has none"
                assert expected is None, f"TF has a {name} gradient where bnkit has none"
            else:
                _close(got, expected, f"gradient of {name} in step {step + 1}")
        stats_b, stats_t = bnkit.stats[step], tf.stats[step]
        assert sorted(stats_b) == sorted(stats_t), (
            f"moving statistics differ {at}: bnkit has {sorted(stats_b)}, TF {sorted(stats_t)}"
        )
        for name, expected in stats_t.items():
            _close(stats_b[name], expected, f"{name} {at}")
    assert bnkit.inference is not None
    assert tf.inference is not None
    _close(bnkit.inference, tf.inference, "inference output on a fresh batch")


def run_bnkit(
    module: torch.nn.Module,
    data: Data,
    *,
    weights_kw: str = "weights",
    call: Callable[..., torch.Tensor] | None = None,
) -> Trace:
    """Train ``module`` on ``data`` (one call per batch), then run inference in eval mode.

    ``weights_kw`` names the keyword the per-call weights go to (``weights`` for slim's
    batch_weights, ``mask`` for Keras).
    """
    trace = Trace()
    module.train()
    for step, (x_np, up_np) in enumerate(zip(data.xs, data.upstream, strict=True)):
        x = torch.tensor(x_np, requires_grad=True)
        kwargs: dict[str, Any] = {}
        if data.weights is not None:
            kwargs[weights_kw] = torch.tensor(data.weights[step])
        for name in PARAMS:
            p = getattr(module, name, None)
            if p is not None:
                p.grad = None
        y = module(x, **kwargs) if call is None else call(module, x, **kwargs)
        (y * torch.tensor(up_np)).sum().backward()
        trace.outputs.append(y.detach().numpy().copy())
        assert x.grad is not None
        trace.grad_x.append(x.grad.numpy().copy())
        grads: dict[str, np.ndarray | None] = {}
        for name in PARAMS:
            p = getattr(module, name, None)
            if p is not None:
                grads[name] = None if p.grad is None else p.grad.numpy().copy()
        trace.grad_params.append(grads)
        trace.stats.append(bnkit_stats(module))
    module.eval()
    with torch.no_grad():
        trace.inference = module(torch.tensor(data.x_infer)).numpy().copy()
    return trace


def bnkit_stats(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """Every moving statistic the module holds, flattened, under its attribute name."""
    return {
        name: buf.detach().double().numpy().reshape(-1).copy()
        for name, buf in module.named_buffers()
        if name != "num_batches_tracked"
    }


# ----------------------------------------------------------- independent oracles


def ema(values: Sequence[np.ndarray], init: np.ndarray | float, decay: float) -> np.ndarray:
    """TF's moving average ``v -= (v - value) * (1 - decay)`` over ``values``, in float64."""
    v = np.asarray(init, dtype=np.float64)
    for value in values:
        v = v - (v - np.asarray(value, dtype=np.float64)) * (1.0 - decay)
    return v


def batch_moments(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel mean, biased and Bessel-corrected variance of ``x`` in float64."""
    x64 = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    flat = x64.reshape(-1, x64.shape[-1])
    n = flat.shape[0]
    mean = flat.mean(axis=0)
    var = flat.var(axis=0)
    return mean, var, var * n / (n - 1)
