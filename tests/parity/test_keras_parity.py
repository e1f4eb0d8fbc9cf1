"""bnkit.from_keras against tf_keras.layers.BatchNormalization (Keras 2, eager), number for number.

Each case calls a fresh Keras layer eagerly under ``tf.GradientTape`` with ``training=True``
for three steps and the bnkit preset on the same float32 batches, then both in inference on
a fresh batch, and compares outputs, input and γ/β gradients of ``sum(y * upstream)``, every
moving statistic after every step (read by name from ``layer.weights``) and the inference
output (rtol 1e-4, atol 1e-5). The grid covers the fused kernel (rank 4/5, channel axis first
or last; unbiased moving variance) and the non-fused code (biased), renorm with and without
clipping, masks, strided ghost batches, adjustment, initializers and ``trainable=False``.
The trap tests check TF against independent numpy formulas, so a test that compares bnkit
to TF also pins down which semantics both have.

Not compared: a mask on the fused path. Keras ignores it there (with a warning); bnkit applies
it, by design.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from harness import (
    PARAMS,
    Data,
    Trace,
    assert_traces_close,
    batch_moments,
    bnkit_name,
    ema,
    make_data,
    run_bnkit,
)
from tfcompat import tensorflow_modules

import bnkit

R2 = (8, 5)
R3_NLC, R3_NCL = (4, 5, 3), (4, 3, 5)
R4_NHWC, R4_NCHW = (4, 3, 3, 4), (4, 4, 3, 3)
R4_NHWC_6, R4_NCHW_6 = (6, 3, 2, 4), (6, 4, 2, 3)  # batch 6 for ghost batches of 2
R5_NDHWC, R5_NCDHW = (2, 2, 3, 2, 3), (2, 3, 2, 3, 2)
FAST = {"momentum": 0.7}  # moving averages that move visibly in three steps
AXIS1 = {"axis": 1}
RENORM = {"renorm": True, "renorm_momentum": 0.8}
CLIP = {"renorm_clipping": {"rmin": 0.8, "rmax": 1.2, "dmax": 0.3}}
INITS = {
    "gamma_initializer": 1.5,
    "beta_initializer": 0.3,
    "moving_mean_initializer": -0.5,
    "moving_variance_initializer": 2.0,
}


@dataclass
class KerasCase:
    """One configuration; ``kwargs`` go unchanged to BatchNormalization and from_keras."""

    id: str
    shape: tuple[int, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    inits: dict[str, Any] | None = None  # *_initializer values: numbers / per-channel tuples
    inits_as: str = "number"  # what bnkit gets: "number", or "keras" (the Keras objects)
    mask: bool = False  # a 0/1 mask over shape[:-1] per step (channels-last input only)
    adjustment: tuple[Any, Any] | None = None  # (scale, bias): numbers or arrays

    @property
    def axis(self) -> int:
        axis = self.kwargs.get("axis", -1)
        return int(axis[0] if isinstance(axis, list) else axis)


def case(id: str, shape: tuple[int, ...], *kwargs: dict[str, Any], **fields: Any) -> Any:
    merged: dict[str, Any] = {}
    for part in kwargs:
        merged.update(part)
    return pytest.param(KerasCase(id, shape, merged, **fields), id=id)


def _channel_array(values: list[float], ndim: int, axis: int) -> np.ndarray:
    """Per-channel values in the broadcast shape (1, …, C, …, 1)."""
    shape = [1] * ndim
    shape[axis] = len(values)
    return np.array(values, np.float32).reshape(shape)


ADJ_C5 = ((1.2, 0.8, 1.5, 0.9, 1.1), (0.1, -0.2, 0.3, 0.0, 0.5))
# Channels-first adjustments need the broadcast shape: Keras adds a 1-D (C,) bias to β that it
# already reshaped to (1, C, 1, …), which TF rejects; bnkit reads 1-D values as per-channel.
ADJ_NCL = (_channel_array([1.2, 0.8, 1.5], 3, 1), _channel_array([0.1, -0.2, 0.3], 3, 1))
ADJ_NCHW = (
    _channel_array([1.2, 0.8, 1.5, 0.9], 4, 1),
    _channel_array([0.1, -0.2, 0.3, 0.0], 4, 1),
)

CASES = [
    # rank 2: never fused, biased moving variance
    case("r2-all_defaults", R2),
    case("r2-momentum0.7", R2, FAST),
    case("r2-no_center-no_scale", R2, FAST, {"center": False, "scale": False}),
    case("r2-axis_list", R2, FAST, {"axis": [-1]}),
    case("r2-fused_false", R2, FAST, {"fused": False}),
    case("r2-renorm-momentum0.8", R2, FAST, RENORM),
    case("r2-renorm-clipped", R2, FAST, RENORM, CLIP),
    case("r2-mask", R2, FAST, mask=True),
    case("r2-ghost4-strided", R2, FAST, {"virtual_batch_size": 4}),
    case("r2-ghost2-strided", R2, FAST, {"virtual_batch_size": 2}),
    case("r2-ghost4-renorm-clipped", R2, FAST, RENORM, CLIP, {"virtual_batch_size": 4}),
    case("r2-adjustment_per_channel", R2, FAST, adjustment=ADJ_C5),
    case("r2-adjustment_scalar", R2, FAST, adjustment=(2.0, 0.5)),
    case("r2-adjustment_scalar-no_scale", R2, FAST, {"scale": False}, adjustment=(2.0, 0.5)),
    case("r2-initializers-keras_objects", R2, FAST, inits=INITS, inits_as="keras"),
    case(
        "r2-initializers-per_channel",
        R2,
        FAST,
        inits={"moving_mean_initializer": (0.5, -0.5, 1.0, 0.0, 2.0), "gamma_initializer": 0.7},
    ),
    case("r2-trainable_false", R2, FAST, {"trainable": False}),
    # rank 3: not fused
    case("r3-nlc-mask", R3_NLC, FAST, mask=True),
    case("r3-ncl-axis1", R3_NCL, FAST, AXIS1),
    case("r3-nlc-ghost2-strided", R3_NLC, FAST, {"virtual_batch_size": 2}),
    case("r3-ncl-renorm", R3_NCL, FAST, AXIS1, RENORM),
    case("r3-ncl-adjustment", R3_NCL, FAST, AXIS1, adjustment=ADJ_NCL),
    # rank 4: the fused kernel (unbiased) unless fused=False or an option rules it out
    case("r4-nhwc-fused_none", R4_NHWC, FAST),
    case("r4-nhwc-axis3-fused_true", R4_NHWC, FAST, {"axis": 3, "fused": True}),
    case("r4-nhwc-fused_false", R4_NHWC, FAST, {"fused": False}),
    case("r4-nhwc-mask-fused_false", R4_NHWC, FAST, {"fused": False}, mask=True),
    case("r4-nhwc-ghost2-strided", R4_NHWC_6, FAST, {"virtual_batch_size": 2}),
    case("r4-nhwc-renorm-clipped", R4_NHWC, FAST, RENORM, CLIP),
    case("r4-nhwc-initializers-fused", R4_NHWC, FAST, inits=INITS, inits_as="keras"),
    case("r4-nhwc-trainable_false-fused", R4_NHWC, FAST, {"trainable": False}, inits=INITS),
    case("r4-nchw-fused_none", R4_NCHW, FAST, AXIS1),
    case("r4-nchw-fused_false", R4_NCHW, FAST, AXIS1, {"fused": False}),
    case("r4-nchw-ghost2-strided", R4_NCHW_6, FAST, AXIS1, {"virtual_batch_size": 2}),
    case("r4-nchw-adjustment", R4_NCHW, FAST, AXIS1, adjustment=ADJ_NCHW),
    case("r4-nchw-no_center-fused", R4_NCHW, FAST, AXIS1, {"center": False}),
    case("r4-axis2-not_fused", (4, 3, 4, 2), FAST, {"axis": 2}),
    # rank 5
    case("r5-ndhwc-fused_none", R5_NDHWC, FAST),
    case("r5-ncdhw-fused_none", R5_NCDHW, FAST, AXIS1),
    case("r5-ncdhw-fused_false", R5_NCDHW, FAST, AXIS1, {"fused": False}),
    case("r5-axis3-not_fused", (2, 2, 3, 3, 2), FAST, {"axis": 3}),
]


def _side_kwargs(t: Any, c: KerasCase, side: str) -> dict[str, Any]:
    """BatchNormalization's keyword arguments for one side ("tf" or "bnkit")."""
    kw = dict(c.kwargs)
    if c.inits is not None:
        for name, v in c.inits.items():
            value = list(v) if isinstance(v, tuple) else v
            if side == "tf" or c.inits_as == "keras":
                kw[name] = t.keras.initializers.Constant(value)
            else:
                kw[name] = value
    if c.adjustment is not None:
        a, b = c.adjustment
        if side == "tf":
            tf = t.tf
            kw["adjustment"] = lambda shape: (
                tf.constant(a, tf.float32),
                tf.constant(b, tf.float32),
            )
        else:

            def adjustment(shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
                assert tuple(shape) == c.shape, shape
                return torch.tensor(np.asarray(a, np.float32)), torch.tensor(
                    np.asarray(b, np.float32)
                )

            kw["adjustment"] = adjustment
    return kw


def run_keras(t: Any, c: KerasCase, data: Data) -> Trace:
    """The Keras side of a case: three eager training steps, then inference."""
    tf = t.tf
    layer = t.keras.layers.BatchNormalization(**_side_kwargs(t, c, "tf"))
    trace = Trace()
    for step in range(len(data.xs)):
        x = tf.constant(data.xs[step])
        call: dict[str, Any] = {"training": True}
        if data.weights is not None:
            call["mask"] = tf.constant(data.weights[step])
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, **call)
            loss = tf.reduce_sum(y * data.upstream[step])
        variables = {bnkit_name(v.name): v for v in layer.weights}
        trainable = {bnkit_name(v.name) for v in layer.trainable_weights}
        params = [n for n in PARAMS if n in variables]
        grad_of = [n for n in params if n in trainable]
        grads = tape.gradient(loss, [x] + [variables[n] for n in grad_of])
        trace.outputs.append(y.numpy())
        trace.grad_x.append(grads[0].numpy())
        by_name = {n: g.numpy().reshape(-1) for n, g in zip(grad_of, grads[1:], strict=True)}
        trace.grad_params.append({n: by_name.get(n) for n in params})
        trace.stats.append(
            {n: v.numpy().reshape(-1) for n, v in variables.items() if n not in PARAMS}
        )
    trace.inference = layer(tf.constant(data.x_infer), training=False).numpy()
    return trace


def run_both(c: KerasCase, seed: int = 0) -> tuple[Trace, Trace]:
    t = tensorflow_modules()
    data = make_data(c.shape, c.axis, seed=seed, weights="mask" if c.mask else None)
    module = bnkit.from_keras(c.shape[c.axis], **_side_kwargs(t, c, "bnkit"))
    return run_bnkit(module, data, weights_kw="mask"), run_keras(t, c, data)


@pytest.mark.parametrize("c", CASES)
def test_keras_parity(c: KerasCase) -> None:
    ours, theirs = run_both(c)
    assert_traces_close(ours, theirs)


# ------------------------------------------------------------------------- traps


@pytest.mark.parametrize(
    ("c", "feed"),
    [
        pytest.param(KerasCase("", (4, 3), FAST), "biased", id="r2-biased"),
        pytest.param(KerasCase("", (2, 2, 2, 3), FAST), "unbiased", id="r4-nhwc-fused-unbiased"),
        pytest.param(
            KerasCase("", (2, 3, 2, 2), {**FAST, **AXIS1}), "unbiased", id="r4-nchw-fused-unbiased"
        ),
        pytest.param(
            KerasCase("", (2, 2, 2, 3), {**FAST, "fused": False}),
            "biased",
            id="r4-fused_false-biased",
        ),
        pytest.param(
            KerasCase("", (2, 2, 2, 3), {**FAST, **RENORM}), "biased", id="r4-renorm-biased"
        ),
        pytest.param(KerasCase("", (2, 2, 1, 2, 3), FAST), "unbiased", id="r5-fused-unbiased"),
        pytest.param(
            KerasCase("", (2, 2, 3, 1, 2), {**FAST, "axis": 2}), "biased", id="r5-axis2-biased"
        ),
    ],
)
def test_moving_variance_feed_per_code_path(c: KerasCase, feed: str) -> None:
    """Keras' fused kernel feeds the unbiased variance, its other code the biased one (and
    renorm keeps a moving stddev); bnkit picks the same per input, and the other feed fails."""
    ours, theirs = run_both(c, seed=1)
    data = make_data(c.shape, c.axis, seed=1)
    moments = [batch_moments(x, c.axis) for x in data.xs]
    eps = 1e-3
    if c.kwargs.get("renorm"):
        # moving_stddev is the EMA of sqrt(var + eps); moving_variance = stddev^2 - eps
        biased = ema([np.sqrt(m[1] + eps) for m in moments], 1.0, 0.7) ** 2 - eps
        unbiased = ema([np.sqrt(m[2] + eps) for m in moments], 1.0, 0.7) ** 2 - eps
    else:
        biased = ema([m[1] for m in moments], 1.0, 0.7)
        unbiased = ema([m[2] for m in moments], 1.0, 0.7)
    expected, other = (unbiased, biased) if feed == "unbiased" else (biased, unbiased)
    for trace in (theirs, ours):
        got = trace.stats[-1]["running_var"]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        assert np.abs(got - other).min() > 1e-2, "the test data cannot tell the feeds apart"


def _ghost_oracle(x: np.ndarray, v: int, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """Channels-last ghost-batch normalization in float64: (output, mean of ghost variances)."""
    x64 = x.astype(np.float64)
    n = x.shape[0]
    g = n // v
    groups = [list(range(j, n, g)) for j in range(g)]  # strided: j, j+G, j+2G, ...
    if layout == "contiguous":
        groups = [list(range(j * v, (j + 1) * v)) for j in range(g)]
    y = np.empty_like(x64)
    variances = []
    for idx in groups:
        part = x64[idx]
        flat = part.reshape(-1, x.shape[-1])
        mean, var = flat.mean(axis=0), flat.var(axis=0)
        y[idx] = (part - mean) / np.sqrt(var + 1e-3)
        variances.append(var)
    return y, np.mean(variances, axis=0)


@pytest.mark.parametrize(("shape", "v"), [((8, 3), 4), ((6, 2, 2, 3), 2)], ids=["r2", "r4"])
def test_ghost_batches_are_strided(shape: tuple[int, ...], v: int) -> None:
    """virtual_batch_size: ghost j holds samples j, j+G, j+2G, …; contiguous ghosts differ.
    The moving variance takes one step with the mean of the ghosts' biased variances."""
    c = KerasCase("", shape, {**FAST, "virtual_batch_size": v})
    ours, theirs = run_both(c, seed=5)
    x = make_data(shape, -1, seed=5).xs[0]
    strided, ghost_var = _ghost_oracle(x, v, "strided")
    contiguous, _ = _ghost_oracle(x, v, "contiguous")
    assert np.abs(strided - contiguous).max() > 0.1, "the test data cannot tell layouts apart"
    for trace in (theirs, ours):
        np.testing.assert_allclose(trace.outputs[0], strided, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            trace.stats[0]["running_var"], 0.7 + 0.3 * ghost_var, rtol=1e-4, atol=1e-5
        )


def test_renorm_first_step_with_clipping() -> None:
    """Renorm step 1 from the initial statistics (0, 1): y = x̂·r + d, r and d clipped."""
    c = KerasCase("", (8, 3), {**FAST, **RENORM, **CLIP})
    ours, theirs = run_both(c, seed=6)
    x = make_data(c.shape, -1, seed=6).xs[0].astype(np.float64)
    mean, var = x.mean(axis=0), x.var(axis=0)
    xhat = (x - mean) / np.sqrt(var + 1e-3)
    r, d = np.sqrt(var + 1e-3), mean  # renorm_stddev = 1, renorm_mean = 0 before the step
    clipped = xhat * np.clip(r, 0.8, 1.2) + np.clip(d, -0.3, 0.3)
    assert np.abs(clipped - (xhat * r + d)).max() > 0.1, "clipping is not active on this data"
    for trace in (theirs, ours):
        np.testing.assert_allclose(trace.outputs[0], clipped, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            trace.stats[0]["renorm_stddev"], 0.8 + 0.2 * np.sqrt(var + 1e-3), rtol=1e-4, atol=1e-5
        )


def test_trainable_false_means_inference() -> None:
    """Keras 2: trainable=False runs inference even with training=True; statistics stay."""
    c = KerasCase("", (4, 3), {**FAST, "trainable": False}, inits=INITS)
    ours, theirs = run_both(c, seed=7)
    x = make_data(c.shape, -1, seed=7).xs[0].astype(np.float64)
    expected = (x + 0.5) / np.sqrt(2.0 + 1e-3) * 1.5 + 0.3
    for trace in (theirs, ours):
        np.testing.assert_allclose(trace.outputs[0], expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(trace.stats[-1]["running_mean"], -0.5)
        np.testing.assert_allclose(trace.stats[-1]["running_var"], 2.0)
        assert all(g is None for g in trace.grad_params[-1].values())
