"""bnkit.from_slim against tf_slim.layers.batch_norm (TF 2.21 graph mode), number for number.

Every case builds a fresh ``tf.Graph`` with a training tower (``is_training=True``) and an
inference tower that reuses its variables, runs three training steps on the same float32
batches in TF and bnkit, and compares outputs, input and γ/β gradients of
``sum(y * upstream)``, every moving statistic after every step, and inference on a fresh
batch (rtol 1e-4, atol 1e-5). The grid covers slim's three code paths (fused
``_fused_batch_norm`` "A", the Keras V1 core layer "B" with its fused-kernel fallback, the
legacy ``nn.moments`` path "C"), both data formats, ranks 2–5, and each option. The trap
tests at the end check TF itself against independent numpy formulas, so a bnkit that
merely agreed with a misconfigured TF graph, or fed the wrong variance, could not pass.
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
R3_NHWC, R3_NCHW = (4, 5, 3), (4, 3, 5)
R4_NHWC, R4_NCHW = (4, 3, 3, 4), (4, 4, 3, 3)
R5_NHWC, R5_NCHW = (2, 2, 3, 2, 3), (2, 3, 2, 3, 2)
NCHW = {"data_format": "NCHW"}
FAST = {"decay": 0.7}  # moving averages that move visibly in three steps
INITS = {"gamma": 1.5, "beta": 0.3, "moving_mean": -0.5, "moving_variance": 2.0}


@dataclass
class SlimCase:
    """One configuration; ``kwargs`` go unchanged to slim.batch_norm and bnkit.from_slim."""

    id: str
    shape: tuple[int, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    inits: dict[str, Any] | None = None  # param_initializers as numbers / per-channel tuples
    inits_as: str = "number"  # what bnkit gets: "number", or "tf" (the TF initializer objects)
    weights: bool = False  # batch_weights (N,) per step
    adjustment: tuple[Any, Any] | None = None  # (scale, bias): floats or per-channel tuples
    activation: str | None = None  # "tf.nn.relu" to both, or "torch.relu" to bnkit

    @property
    def axis(self) -> int:
        return 1 if self.kwargs.get("data_format") == "NCHW" else -1


def case(id: str, shape: tuple[int, ...], *kwargs: dict[str, Any], **fields: Any) -> Any:
    merged: dict[str, Any] = {}
    for part in kwargs:
        merged.update(part)
    return pytest.param(SlimCase(id, shape, merged, **fields), id=id)


PER_CHANNEL_ADJ = ((1.2, 0.8, 1.5, 0.9, 1.1), (0.1, -0.2, 0.3, 0.0, 0.5))
# NCHW adjustments have the broadcast shape (1, C, 1, 1): slim's layer path adds a 1-D (C,)
# bias to β already reshaped to (1, C, 1, 1), which TF rejects (or, with C == W, broadcasts
# along W); bnkit takes 1-D length-C values as per-channel, so only this shape means the same.
ADJ_NCHW = (
    np.array([1.2, 0.8, 1.5, 0.9], np.float32).reshape(1, 4, 1, 1),
    np.array([0.1, -0.2, 0.3, 0.0], np.float32).reshape(1, 4, 1, 1),
)
CLIP = {"renorm_clipping": {"rmin": 0.8, "rmax": 1.2, "dmax": 0.3}}
RENORM = {"renorm": True, "renorm_decay": 0.8, "scale": True}
SCALE = {"scale": True}

CASES = [
    # rank 2: path A by default (fused=None/True), B with fused=False, C with batch weights
    case("r2-all_defaults-pathA", R2),
    case("r2-scale-pathA", R2, FAST, SCALE),
    case("r2-fused_true-pathA", R2, FAST, SCALE, {"fused": True}),
    case("r2-fused_false-pathB", R2, FAST, SCALE, {"fused": False}),
    case(
        "r2-zero_debias-mm_init3-pathA",
        R2,
        FAST,
        {"zero_debias_moving_mean": True},
        inits={"moving_mean": 3.0},
    ),
    case(
        "r2-zero_debias-fused_false-pathC",
        R2,
        FAST,
        {"zero_debias_moving_mean": True, "fused": False},
    ),
    case("r2-updates_inplace-pathA", R2, FAST, SCALE, {"updates_collections": None}),
    case("r2-updates_custom-pathA", R2, FAST, {"updates_collections": "bn_updates"}),
    case("r2-batch_weights-pathC", R2, FAST, SCALE, weights=True),
    case(
        "r2-batch_weights-updates_inplace-pathC",
        R2,
        FAST,
        {"updates_collections": None},
        weights=True,
    ),
    case("r2-renorm-decay0.8-pathB", R2, FAST, RENORM),
    case("r2-renorm-clipped-pathB", R2, FAST, RENORM, CLIP),
    case("r2-adjustment_per_channel-pathB", R2, FAST, SCALE, adjustment=PER_CHANNEL_ADJ),
    case("r2-adjustment_scalar-pathB", R2, FAST, adjustment=(2.0, 0.5)),
    case(
        "r2-initializers_tf_objects-tf_relu-pathA",
        R2,
        FAST,
        SCALE,
        inits=INITS,
        inits_as="tf",
        activation="tf.nn.relu",
    ),
    case("r2-no_center-scale-pathA", R2, FAST, {"center": False, "scale": True}),
    case("r2-trainable_false-pathA", R2, FAST, SCALE, {"trainable": False}),
    # rank 4 NHWC: B's fused kernel by default, A for zero-debias / custom updates, C for
    # weights or fused=False with custom updates
    case("r4-nhwc-fused_none-pathB_fused", R4_NHWC, FAST, SCALE),
    case("r4-nhwc-fused_true-pathB_fused", R4_NHWC, FAST, SCALE, {"fused": True}),
    case("r4-nhwc-fused_false-pathB", R4_NHWC, FAST, SCALE, {"fused": False}),
    case("r4-nhwc-zero_debias-pathA", R4_NHWC, FAST, {"zero_debias_moving_mean": True}),
    case("r4-nhwc-updates_inplace-pathA", R4_NHWC, FAST, SCALE, {"updates_collections": None}),
    case(
        "r4-nhwc-updates_inplace-fused_false-pathC",
        R4_NHWC,
        FAST,
        {"updates_collections": None, "fused": False},
    ),
    case("r4-nhwc-batch_weights-pathC", R4_NHWC, FAST, SCALE, weights=True),
    case("r4-nhwc-renorm-pathB", R4_NHWC, FAST, RENORM),
    case("r4-nhwc-adjustment_scalar-pathB", R4_NHWC, FAST, SCALE, adjustment=(0.5, -1.0)),
    case(
        "r4-nhwc-initializers_per_channel-torch_relu-pathB_fused",
        R4_NHWC,
        FAST,
        SCALE,
        inits={"moving_mean": (0.5, -0.5, 1.0, 0.0), "moving_variance": 2.0, "gamma": 1.5},
        activation="torch.relu",
    ),
    case("r4-nhwc-trainable_false-pathB_fused", R4_NHWC, FAST, SCALE, {"trainable": False}),
    # rank 4 NCHW
    case("r4-nchw-fused_none-pathB_fused", R4_NCHW, FAST, NCHW, SCALE),
    case("r4-nchw-fused_false-pathB", R4_NCHW, FAST, NCHW, SCALE, {"fused": False}),
    case(
        "r4-nchw-zero_debias-pathA", R4_NCHW, FAST, NCHW, SCALE, {"zero_debias_moving_mean": True}
    ),
    case(
        "r4-nchw-zero_debias-fused_false-pathC",
        R4_NCHW,
        FAST,
        NCHW,
        {"zero_debias_moving_mean": True, "fused": False},
    ),
    case(
        "r4-nchw-updates_custom-pathA", R4_NCHW, FAST, NCHW, {"updates_collections": "bn_updates"}
    ),
    case("r4-nchw-batch_weights-pathC", R4_NCHW, FAST, NCHW, weights=True),
    case("r4-nchw-renorm-clipped-pathB", R4_NCHW, FAST, NCHW, RENORM, CLIP),
    case(
        "r4-nchw-adjustment_per_channel-pathB",
        R4_NCHW,
        FAST,
        NCHW,
        adjustment=ADJ_NCHW,
    ),
    case(
        "r4-nchw-initializers-no_center-pathB_fused",
        R4_NCHW,
        FAST,
        NCHW,
        {"center": False, "scale": True},
        inits=INITS,
    ),
    # rank 3: slim's layer path falls back from the fused kernel (biased feed); in-place
    # updates or zero-debias take the legacy path (rank 3 cannot use path A)
    case("r3-nhwc-fused_none-pathB_fallback", R3_NHWC, FAST, SCALE),
    case("r3-nchw-fused_none-pathB_fallback", R3_NCHW, FAST, NCHW, SCALE),
    case("r3-nhwc-updates_inplace-pathC", R3_NHWC, FAST, {"updates_collections": None}),
    case("r3-nhwc-zero_debias-pathC", R3_NHWC, FAST, {"zero_debias_moving_mean": True}),
    # rank 5: the layer's fused kernel (unbiased); custom updates -> legacy path (biased)
    case("r5-ndhwc-fused_none-pathB_fused", R5_NHWC, FAST, SCALE),
    case("r5-ncdhw-fused_none-pathB_fused", R5_NCHW, FAST, NCHW, SCALE),
    case("r5-ndhwc-updates_custom-pathC", R5_NHWC, FAST, {"updates_collections": "bn_updates"}),
    case("r5-ncdhw-fused_false-pathB", R5_NCHW, FAST, NCHW, {"fused": False}),
]


def _side_kwargs(t: Any, c: SlimCase, side: str) -> dict[str, Any]:
    """slim's keyword arguments for one side ("tf" or "bnkit")."""
    tf = t.tf
    kw = dict(c.kwargs)
    if c.inits is not None:
        kw["param_initializers"] = {
            name: (
                tf.compat.v1.constant_initializer(list(v) if isinstance(v, tuple) else v)
                if side == "tf" or c.inits_as == "tf"
                else v
            )
            for name, v in c.inits.items()
        }
    if c.adjustment is not None:
        a, b = c.adjustment
        if side == "tf":
            kw["adjustment"] = lambda shape: (
                tf.constant(a, tf.float32),
                tf.constant(b, tf.float32),
            )
        else:

            def adjustment(shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
                assert tuple(shape) == c.shape, shape
                return torch.tensor(a), torch.tensor(b)

            kw["adjustment"] = adjustment
    if c.activation == "tf.nn.relu" or (c.activation is not None and side == "tf"):
        kw["activation_fn"] = tf.nn.relu
    elif c.activation == "torch.relu":
        kw["activation_fn"] = torch.relu
    return kw


def run_slim(t: Any, c: SlimCase, data: Data) -> Trace:
    """The slim side of a case: train three steps in a fresh graph, then infer."""
    tf = t.tf
    v1 = tf.compat.v1
    kwargs = _side_kwargs(t, c, "tf")
    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.float32, c.shape, name="x")
        up = v1.placeholder(tf.float32, c.shape, name="upstream")
        w = v1.placeholder(tf.float32, c.shape[:1], name="batch_weights") if c.weights else None
        y = t.slim.batch_norm(x, is_training=True, scope="bn", batch_weights=w, **kwargs)
        variables = {bnkit_name(v.name): v for v in v1.global_variables()}
        trainable = {bnkit_name(v.name) for v in v1.trainable_variables()}
        params = [n for n in PARAMS if n in variables]
        grad_of = [n for n in params if n in trainable]
        grads = tf.gradients(tf.reduce_sum(y * up), [x] + [variables[n] for n in grad_of])

        update_ops = v1.get_collection(v1.GraphKeys.UPDATE_OPS)
        explicit: list[Any] = []
        if "updates_collections" not in c.kwargs:
            # The documented recipe: the train step depends on UPDATE_OPS.
            # ... except that slim's layer path with trainable=False collects none: Keras
            # V1's Layer.updates skips frozen layers.
            assert update_ops or c.kwargs.get("trainable") is False, "no ops in UPDATE_OPS"
            with tf.control_dependencies(update_ops):
                y = tf.identity(y)
                grads = [tf.identity(g) for g in grads]
        elif c.kwargs["updates_collections"] is None:
            assert not update_ops, "updates_collections=None must update in place"
        else:
            explicit = v1.get_collection(c.kwargs["updates_collections"])
            assert explicit, "slim put no update ops in the custom collection"
            assert not update_ops

        x_infer = v1.placeholder(tf.float32, c.shape, name="x_infer")
        y_infer = t.slim.batch_norm(x_infer, is_training=False, scope="bn", reuse=True, **kwargs)
        assert len(v1.global_variables()) == len(variables), "the inference tower made variables"
        stats = {n: v for n, v in variables.items() if n not in PARAMS}
        init = [v1.global_variables_initializer(), v1.local_variables_initializer()]
    graph.finalize()

    trace = Trace()
    with v1.Session(graph=graph) as sess:
        sess.run(init)
        for step in range(len(data.xs)):
            feed = {x: data.xs[step], up: data.upstream[step]}
            if w is not None:
                assert data.weights is not None
                feed[w] = data.weights[step]
            out_y, out_grads, _ = sess.run([y, grads, explicit], feed)
            trace.outputs.append(out_y)
            trace.grad_x.append(out_grads[0])
            by_name = dict(zip(grad_of, out_grads[1:], strict=True))
            trace.grad_params.append({n: by_name.get(n) for n in params})
            trace.stats.append({n: np.reshape(v, -1) for n, v in sess.run(stats).items()})
        trace.inference = sess.run(y_infer, {x_infer: data.x_infer})
    return trace


def build_bnkit(t: Any, c: SlimCase) -> bnkit.BatchNorm:
    return bnkit.from_slim(c.shape[c.axis], **_side_kwargs(t, c, "bnkit"))


def run_both(c: SlimCase, seed: int = 0) -> tuple[Trace, Trace]:
    t = tensorflow_modules()
    data = make_data(c.shape, c.axis, seed=seed, weights="sample" if c.weights else None)
    return run_bnkit(build_bnkit(t, c), data), run_slim(t, c, data)


@pytest.mark.parametrize("c", CASES)
def test_slim_parity(c: SlimCase) -> None:
    ours, theirs = run_both(c)
    assert_traces_close(ours, theirs)


# ------------------------------------------------------------------------- traps


@pytest.mark.parametrize(
    ("c", "feed"),
    [
        pytest.param(SlimCase("r2", (4, 3), FAST), "unbiased", id="r2-pathA-unbiased"),
        pytest.param(
            SlimCase("r2", (4, 3), {**FAST, "fused": False}), "biased", id="r2-fused_false-biased"
        ),
        pytest.param(SlimCase("r4", (2, 2, 2, 3), FAST), "unbiased", id="r4-fused-unbiased"),
        pytest.param(
            SlimCase("r4", (2, 2, 2, 3), {**FAST, "fused": False}),
            "biased",
            id="r4-fused_false-biased",
        ),
        pytest.param(
            SlimCase("r4", (2, 3, 2, 2), {**FAST, **NCHW, "zero_debias_moving_mean": True}),
            "unbiased",
            id="r4-nchw-zero_debias-pathA-unbiased",
        ),
        pytest.param(SlimCase("r3", (2, 3, 3), FAST), "biased", id="r3-fused_fallback-biased"),
        pytest.param(SlimCase("r5", (2, 2, 2, 1, 3), FAST), "unbiased", id="r5-fused-unbiased"),
        pytest.param(
            SlimCase("r5", (2, 2, 2, 1, 3), {**FAST, "updates_collections": "bn_updates"}),
            "biased",
            id="r5-custom_updates-pathC-biased",
        ),
    ],
)
def test_moving_variance_feed_per_code_path(c: SlimCase, feed: str) -> None:
    """TF feeds the variance slim's code path implies, and so does bnkit; the other fails."""
    ours, theirs = run_both(c, seed=1)
    data = make_data(c.shape, c.axis, seed=1)
    moments = [batch_moments(x, c.axis) for x in data.xs]
    biased = ema([m[1] for m in moments], 1.0, 0.7)
    unbiased = ema([m[2] for m in moments], 1.0, 0.7)
    expected, other = (unbiased, biased) if feed == "unbiased" else (biased, unbiased)
    for trace in (theirs, ours):
        got = trace.stats[-1]["running_var"]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        assert np.abs(got - other).min() > 1e-2, "the test data cannot tell the feeds apart"


def test_zero_debias_ignores_the_initial_moving_mean() -> None:
    """zero_debias_moving_mean: biased/local_step shadows, and mean = biased / (1 - decay^t)."""
    c = SlimCase("zd", R2, {**FAST, "zero_debias_moving_mean": True}, inits={"moving_mean": 3.0})
    ours, theirs = run_both(c, seed=2)
    data = make_data(c.shape, c.axis, seed=2)
    means = [batch_moments(x, -1)[0] for x in data.xs]
    for trace in (theirs, ours):
        for step, stats in enumerate(trace.stats):
            biased = ema(means[: step + 1], 0.0, 0.7)
            debiased = biased / (1.0 - 0.7 ** (step + 1))
            np.testing.assert_allclose(stats["running_mean_biased"], biased, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(stats["running_mean_local_step"], step + 1)
            np.testing.assert_allclose(stats["running_mean"], debiased, rtol=1e-4, atol=1e-5)
    plain = ema(means, 3.0, 0.7)
    assert np.abs(theirs.stats[-1]["running_mean"] - plain).min() > 1e-2


def test_batch_weights_weight_the_statistics() -> None:
    """Path C with batch_weights: the moving mean follows the weighted batch mean."""
    c = SlimCase("w", R4_NCHW, {**FAST, **NCHW}, weights=True)
    ours, theirs = run_both(c, seed=3)
    data = make_data(c.shape, c.axis, seed=3, weights="sample")
    assert data.weights is not None
    weighted = []
    unweighted = []
    for x, w in zip(data.xs, data.weights, strict=True):
        x64 = x.astype(np.float64)
        wb = np.broadcast_to(w.reshape(-1, 1, 1, 1), x.shape)
        weighted.append((x64 * wb).sum(axis=(0, 2, 3)) / wb.sum(axis=(0, 2, 3)))
        unweighted.append(x64.mean(axis=(0, 2, 3)))
    for trace in (theirs, ours):
        got = trace.stats[-1]["running_mean"]
        np.testing.assert_allclose(got, ema(weighted, 0.0, 0.7), rtol=1e-4, atol=1e-5)
        assert np.abs(got - ema(unweighted, 0.0, 0.7)).min() > 1e-3


FROZEN = {**FAST, **SCALE, "trainable": False}


@pytest.mark.parametrize(
    ("c", "updates"),
    [
        pytest.param(SlimCase("A", R2, FROZEN), True, id="r2-pathA-updates"),
        pytest.param(
            SlimCase("A", R4_NHWC, {**FROZEN, "updates_collections": None}),
            True,
            id="r4-updates_inplace-pathA-updates",
        ),
        pytest.param(SlimCase("C", R4_NHWC, FROZEN, weights=True), True, id="r4-pathC-updates"),
        pytest.param(SlimCase("B", R4_NHWC, FROZEN), False, id="r4-pathB_fused-no_updates"),
        pytest.param(
            SlimCase("B", R3_NHWC, {**FROZEN, "fused": False}), False, id="r3-pathB-no_updates"
        ),
    ],
)
def test_trainable_false_freezes_parameters_and_on_path_b_statistics(
    c: SlimCase, updates: bool
) -> None:
    """slim's trainable=False: γ/β get no gradient and is_training=True still normalizes with
    batch statistics; the moving statistics move on slim's own paths (A, C) but not on the
    core-layer path B, whose update ops Keras V1's ``Layer.updates`` drops for a frozen layer.
    """
    ours, theirs = run_both(c, seed=4)
    data = make_data(c.shape, c.axis, seed=4, weights="sample" if c.weights else None)
    w = np.ones(c.shape[0]) if data.weights is None else data.weights[-1].astype(np.float64)
    w = np.broadcast_to(w.reshape(-1, *[1] * (len(c.shape) - 1)), c.shape)
    for trace in (theirs, ours):
        assert all(g is None for g in trace.grad_params[-1].values())
        y = trace.outputs[-1].astype(np.float64)
        batch_mean = (y * w).sum(axis=tuple(range(len(c.shape) - 1))) / w[..., 0].sum()
        np.testing.assert_allclose(batch_mean, 0.0, atol=1e-5)  # normalized by batch statistics
        moved = np.abs(trace.stats[-1]["running_mean"]).min() > 1e-2
        assert moved == updates, trace.stats[-1]
