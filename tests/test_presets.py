"""from_slim / from_keras without TensorFlow: arguments, code paths, and the variance each feeds.

The numbers are checked against real TensorFlow in tests/parity/; here the oracle is closed-form
float64 math, and the code-path tables are the ones read from tf_slim 1.1.0 and tf_keras 2.21
(docs/migrating-from-tensorflow.md).
"""

from __future__ import annotations

import functools
import types

import pytest
import torch
import torch.nn.functional as F

import bnkit
from bnkit.presets import KerasBatchNorm, SlimBatchNorm

# ------------------------------------------------------------------ helpers


def _channel_dims(x: torch.Tensor, axis: int) -> list[int]:
    a = axis % x.dim()
    return [d for d in range(x.dim()) if d != a]


def _batch_var64(x: torch.Tensor, axis: int, unbiased: bool) -> torch.Tensor:
    x64 = x.double()
    dims = _channel_dims(x64, axis)
    n = x64.numel() // x64.shape[axis]
    mean = x64.mean(dim=dims, keepdim=True)
    ss = ((x64 - mean) ** 2).sum(dim=dims)
    return ss / (n - 1 if unbiased else n)


def _fed_variance(bn: bnkit.BatchNorm, x: torch.Tensor, **call: object) -> str:
    """Which batch variance a decay-0 layer copies into running_var: 'unbiased' or 'biased'."""
    bn.train()
    bn(x, **call)
    got = bn.running_var.double()
    unbiased = _batch_var64(x, bn.axis, unbiased=True)
    biased = _batch_var64(x, bn.axis, unbiased=False)
    if torch.allclose(got, unbiased, rtol=1e-5, atol=0):
        return "unbiased"
    assert torch.allclose(got, biased, rtol=1e-5, atol=0), (got, biased, unbiased)
    return "biased"


def _shape(rank: int, channels: int = 3, last: bool = True) -> tuple[int, ...]:
    # Small spatial sizes keep n/(n-1) far from 1, so the two variances differ visibly.
    spatial = {2: (), 3: (3,), 4: (2, 3), 5: (2, 2, 2)}[rank]
    return (4, *spatial, channels) if last else (4, channels, *spatial)


# ------------------------------------------------------------------ defaults


def test_slim_defaults_are_slims() -> None:
    bn = bnkit.from_slim(5)
    assert isinstance(bn, SlimBatchNorm)
    assert bn.eps == pytest.approx(1e-3)
    assert bn.decay == pytest.approx(0.999)
    assert bn.momentum == pytest.approx(0.001)
    assert bn.weight is None  # slim's scale=False
    assert bn.bias is not None
    assert bn.axis == -1  # NHWC
    assert bn.training
    assert bn.fused is True  # None means True in slim
    assert "preset='tf_slim'" in repr(bn)


def test_keras_defaults_are_keras() -> None:
    bn = bnkit.from_keras(5)
    assert isinstance(bn, KerasBatchNorm)
    assert bn.eps == pytest.approx(1e-3)
    assert bn.decay == pytest.approx(0.99)
    assert bn.weight is not None
    assert bn.bias is not None
    assert bn.axis == -1
    assert bn.trainable
    assert "preset='tf_keras'" in repr(bn)


@pytest.mark.parametrize(
    ("factory", "bad", "listed"),
    [
        (bnkit.from_slim, {"decay_rate": 0.9}, "zero_debias_moving_mean"),
        (bnkit.from_slim, {"momentum": 0.9}, "decay"),
        (bnkit.from_keras, {"decay": 0.9}, "virtual_batch_size"),
        (bnkit.from_keras, {"eps": 1e-3}, "epsilon"),
    ],
)
def test_unknown_argument_lists_the_accepted_ones(factory, bad, listed) -> None:
    with pytest.raises(TypeError, match="Accepted") as info:
        factory(3, **bad)
    assert repr(next(iter(bad))) in str(info.value)
    assert listed in str(info.value)


def test_batch_weights_at_construction_points_to_the_call() -> None:
    with pytest.raises(TypeError, match=r"module\(x, weights=w\)"):
        bnkit.from_slim(3, batch_weights=torch.ones(4))
    with pytest.raises(TypeError, match="mask=m"):
        bnkit.from_keras(3, mask=torch.ones(4))


def test_tf_only_arguments_are_accepted() -> None:
    bn = bnkit.from_slim(
        3,
        scope="conv1/BatchNorm",
        reuse=True,
        variables_collections=["x"],
        outputs_collections="y",
        updates_collections="update_ops",
    )
    assert bn.tf_scope == "conv1/BatchNorm"
    assert bnkit.from_keras(3, name="batch_normalization_2").tf_scope == "batch_normalization_2"


@pytest.mark.parametrize("decay", [1.5, -0.1])
def test_decay_outside_unit_interval_explains_the_convention(decay: float) -> None:
    with pytest.raises(ValueError, match="weight of the old"):
        bnkit.from_slim(3, decay=decay)
    with pytest.raises(ValueError, match="weight of the old"):
        bnkit.from_keras(3, momentum=decay)


# ------------------------------------------------------- slim's code paths


SLIM_PATHS = [
    # (kwargs, rank, weighted, expected path, fed variance)
    ({}, 4, False, "layer", "unbiased"),
    ({}, 2, False, "fused", "unbiased"),
    ({}, 3, False, "layer", "biased"),  # V1 layer falls back to non-fused for rank 3
    ({}, 5, False, "layer", "unbiased"),
    ({"fused": False}, 4, False, "layer", "biased"),
    ({"fused": False}, 2, False, "layer", "biased"),
    ({"zero_debias_moving_mean": True}, 4, False, "fused", "unbiased"),
    ({"zero_debias_moving_mean": True}, 3, False, "legacy", "biased"),
    ({"zero_debias_moving_mean": True, "fused": False}, 4, False, "legacy", "biased"),
    ({"updates_collections": None}, 4, False, "fused", "unbiased"),
    ({"updates_collections": None, "fused": False}, 4, False, "legacy", "biased"),
    ({}, 4, True, "legacy", "biased"),
    ({}, 2, True, "legacy", "biased"),
    ({"renorm": True}, 4, False, "layer", "biased"),
    ({"adjustment": lambda shape: (2.0, 0.5)}, 4, False, "layer", "biased"),
]


@pytest.mark.parametrize(
    ("kwargs", "rank", "weighted", "path", "fed"),
    SLIM_PATHS,
    ids=[f"{k}-rank{r}-{'w' if w else 'nw'}" for k, r, w, _, _ in SLIM_PATHS],
)
def test_slim_feeds_the_variance_of_its_code_path(kwargs, rank, weighted, path, fed) -> None:
    bn = bnkit.from_slim(3, decay=0.0, **kwargs)
    assert bn.slim_path(rank, weighted) == path
    torch.manual_seed(rank)
    x = torch.randn(*_shape(rank)) * 2 + 1
    call = {"weights": torch.ones(x.shape[0])} if weighted else {}
    assert _fed_variance(bn, x, **call) == fed


def test_slim_batch_weights_weight_the_statistics() -> None:
    torch.manual_seed(0)
    bn = bnkit.from_slim(2, decay=0.0)
    x = torch.randn(6, 2)
    w = torch.tensor([1.0, 2.0, 0.0, 1.0, 3.0, 1.0])
    bn(x, weights=w)
    x64, w64 = x.double(), w.double()[:, None]
    mean = (w64 * x64).sum(0) / w64.sum()
    var = (w64 * (x64 - mean) ** 2).sum(0) / w64.sum()  # tf.nn.weighted_moments: biased
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-6, atol=1e-7)


def test_slim_zero_debias_ignores_the_initial_mean() -> None:
    decay = 0.9
    bn = bnkit.from_slim(1, decay=decay, zero_debias_moving_mean=True, data_format="NCHW")
    biased = 0.0
    for t, value in enumerate([2.0, 4.0, 6.0], start=1):
        x = torch.full((2, 1, 2, 2), value)
        x[0] -= 1.0
        x[1] += 1.0
        bn(x)
        biased = biased - (biased - value) * (1 - decay)
        assert bn.running_mean.item() == pytest.approx(biased / (1 - decay**t), rel=1e-6)
    assert int(bn.running_mean_local_step) == 3
    # The variance is not debiased in slim: it starts from 1.
    assert bn.running_var_biased is None


def test_slim_refuses_what_slim_refuses() -> None:
    with pytest.raises(ValueError, match="renorm is not supported"):
        bnkit.from_slim(3, renorm=True, zero_debias_moving_mean=True)
    with pytest.raises(ValueError, match="renorm is not supported"):
        bnkit.from_slim(3, renorm=True, updates_collections=None)
    with pytest.raises(ValueError, match="data_format"):
        bnkit.from_slim(3, data_format="NDHWC")
    bn = bnkit.from_slim(3, renorm=True)
    with pytest.raises(ValueError, match="batch_weights"):
        bn(torch.randn(4, 3), weights=torch.ones(4))


def test_slim_is_training_and_trainable() -> None:
    bn = bnkit.from_slim(3, is_training=False, scale=True, trainable=False)
    assert not bn.training
    assert not bn.weight.requires_grad
    assert not bn.bias.requires_grad
    x = torch.randn(4, 3)
    y = bn(x)
    # Inference with fresh statistics: x / sqrt(1 + eps).
    torch.testing.assert_close(y, x / (1 + 1e-3) ** 0.5)
    assert int(bn.num_batches_tracked) == 0


def test_slim_data_format_sets_the_axis() -> None:
    assert bnkit.from_slim(3, data_format="NCHW").axis == 1
    assert bnkit.from_slim(3, data_format="NHWC").axis == -1


def test_slim_renorm_decay_is_tf_convention() -> None:
    bn = bnkit.from_slim(3, renorm=True, renorm_decay=0.9, renorm_clipping={"rmax": 3.0})
    assert bn.renorm_momentum == pytest.approx(0.1)
    assert bn.renorm_clipping == {"rmax": 3.0}
    # renorm_clipping without renorm is ignored by slim, and so here.
    assert bnkit.from_slim(3, renorm_clipping={"rmax": 3.0}).renorm_clipping is None


def test_slim_param_initializers() -> None:
    bn = bnkit.from_slim(
        3,
        scale=True,
        param_initializers={"gamma": 1.5, "beta": [0.0, 1.0, 2.0], "moving_variance": "ones"},
    )
    torch.testing.assert_close(bn.weight.detach(), torch.full((3,), 1.5))
    torch.testing.assert_close(bn.bias.detach(), torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="unknown keys"):
        bnkit.from_slim(3, param_initializers={"gama": 1.0})


# ------------------------------------------------------ Keras' code paths


KERAS_PATHS = [
    # (kwargs, rank, channels_last, fed variance)
    ({}, 4, True, "unbiased"),
    ({"axis": 1}, 4, False, "unbiased"),
    ({}, 5, True, "unbiased"),
    ({}, 2, True, "biased"),
    ({}, 3, True, "biased"),
    ({"fused": False}, 4, True, "biased"),
    ({"renorm": True}, 4, True, "biased"),
    ({"adjustment": lambda shape: (1.0, 0.0)}, 4, True, "biased"),
    ({"synchronized": True}, 4, True, "biased"),
    ({"axis": 2}, 4, False, "biased"),
]


@pytest.mark.parametrize(
    ("kwargs", "rank", "last", "fed"),
    KERAS_PATHS,
    ids=[f"{sorted(k)}-rank{r}" for k, r, _, _ in KERAS_PATHS],
)
def test_keras_feeds_the_variance_of_its_code_path(kwargs, rank, last, fed) -> None:
    bn = bnkit.from_keras(3, momentum=0.0, **kwargs)
    torch.manual_seed(rank)
    shape = list(_shape(rank, last=last))
    if kwargs.get("axis") == 2:  # channels on axis 2 of (N, H, C, W)
        shape = [4, 2, 3, 2]
    x = torch.randn(*shape) * 2 + 1
    assert bn.uses_fused_kernel(rank) == (fed == "unbiased")
    assert _fed_variance(bn, x) == fed


def test_keras_float64_is_never_fused() -> None:
    bn = bnkit.from_keras(3, momentum=0.0, dtype="float64")
    x = torch.randn(4, 2, 2, 3, dtype=torch.float64)
    assert _fed_variance(bn, x) == "biased"


def test_keras_ghost_batches_are_strided() -> None:
    torch.manual_seed(0)
    bn = bnkit.from_keras(2, virtual_batch_size=2)
    x = torch.randn(6, 2)
    y = bn(x)
    # Keras reshapes to [vbs, -1, ...]: ghost j holds samples j, j+3 (6 samples, 3 ghosts).
    for j in range(3):
        ghost = x[[j, j + 3]].double()
        mean, var = ghost.mean(0), ghost.var(0, unbiased=False)
        expected = (ghost - mean) / (var + 1e-3).sqrt()
        torch.testing.assert_close(y[[j, j + 3]].double(), expected, rtol=1e-5, atol=1e-6)


def test_keras_ghost_moving_statistics_average_the_ghosts() -> None:
    # One EMA step with the mean of the ghost means and of the ghost *biased* variances.
    torch.manual_seed(4)
    bn = bnkit.from_keras(3, momentum=0.0, virtual_batch_size=2)
    assert not bn.uses_fused_kernel(4)
    x = torch.randn(4, 2, 2, 3) * 2 + 1
    bn(x)
    ghosts = [x[[0, 2]].double(), x[[1, 3]].double()]  # strided: G = 2 ghosts
    means = torch.stack([g.mean(dim=(0, 1, 2)) for g in ghosts])
    vars_ = torch.stack([g.var(dim=(0, 1, 2), unbiased=False) for g in ghosts])
    torch.testing.assert_close(bn.running_mean.double(), means.mean(0), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bn.running_var.double(), vars_.mean(0), rtol=1e-6, atol=1e-7)


def test_keras_trainable_false_runs_inference() -> None:
    bn = bnkit.from_keras(3, trainable=False)
    assert not bn.weight.requires_grad
    bn.train()
    x = torch.randn(8, 3) * 3 + 2
    y = bn(x, training=True)
    torch.testing.assert_close(y, x / (1 + 1e-3) ** 0.5)
    assert int(bn.num_batches_tracked) == 0
    bn.trainable = True
    assert bn.weight.requires_grad
    bn(x, training=True)
    assert int(bn.num_batches_tracked) == 1


def test_keras_mask_is_weights() -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 5, 2)  # (N, L, C)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    a = bnkit.from_keras(2, momentum=0.0)
    b = bnkit.from_keras(2, momentum=0.0)
    ya = a(x, mask=mask)
    yb = b(x, weights=mask.float())
    torch.testing.assert_close(ya, yb)
    kept = x[mask].double()  # (valid positions, C)
    torch.testing.assert_close(a.running_mean.double(), kept.mean(0), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        a.running_var.double(), kept.var(0, unbiased=False), rtol=1e-6, atol=1e-7
    )
    with pytest.raises(ValueError, match="not both"):
        a(x, mask=mask, weights=mask.float())


def test_keras_refuses_what_keras_refuses() -> None:
    with pytest.raises(ValueError, match="renorm=True"):
        bnkit.from_keras(3, fused=True, renorm=True)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        bnkit.from_keras(3, fused=True, virtual_batch_size=2)
    with pytest.raises(ValueError, match="synchronized"):
        bnkit.from_keras(3, fused=True, synchronized=True)
    with pytest.raises(ValueError, match="cannot be combined"):
        bnkit.from_keras(3, virtual_batch_size=2, adjustment=lambda s: (1.0, 0.0))
    with pytest.raises(ValueError, match="4D or 5D"):
        bnkit.from_keras(3, fused=True)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="one channel axis"):
        bnkit.from_keras(3, axis=[1, 2])
    with pytest.raises(ValueError, match="batch axis"):
        bnkit.from_keras(3, axis=0)
    assert bnkit.from_keras(3, axis=[1]).axis == 1


def test_keras_synchronized_in_one_process_is_plain() -> None:
    torch.manual_seed(2)
    x = torch.randn(4, 3, 2, 2)
    a = bnkit.from_keras(3, axis=1, synchronized=True)
    b = bnkit.from_keras(3, axis=1, fused=False)
    torch.testing.assert_close(a(x), b(x))
    torch.testing.assert_close(a.running_var, b.running_var)


class Constant:
    """Stands in for a Keras/TF initializer object (read through get_config)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def get_config(self) -> dict[str, float]:
        return {"value": self.value}

    def __call__(self, shape: object) -> None:  # TF initializers are callable too
        raise AssertionError("must be translated, not called")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("zeros", 0.0),
        ("ones", 1.0),
        ({"class_name": "Constant", "config": {"value": 0.25}}, 0.25),
        (Constant(2.0), 2.0),
        (0.5, 0.5),
        (torch.nn.init.ones_, 1.0),
    ],
)
def test_keras_initializers(spec, expected) -> None:
    bn = bnkit.from_keras(4, gamma_initializer=spec, moving_variance_initializer=spec)
    torch.testing.assert_close(bn.weight.detach(), torch.full((4,), float(expected)))
    torch.testing.assert_close(bn.running_var, torch.full((4,), float(expected)))


def test_keras_random_initializers_use_keras_ranges() -> None:
    torch.manual_seed(0)
    bn = bnkit.from_keras(1000, beta_initializer="random_uniform")
    assert bn.bias.abs().max() <= 0.05
    assert bn.bias.std() > 0.02
    with pytest.raises(ValueError, match="no bnkit equivalent"):
        bnkit.from_keras(3, gamma_initializer="orthogonal")


def test_tf_activation_functions_map_by_name() -> None:
    def fake(name: str) -> types.FunctionType:
        def f(x):  # pragma: no cover - never called: mapped by name
            raise AssertionError

        f.__name__ = name
        f.__module__ = "tensorflow.python.ops.nn_ops"
        return f

    x = torch.tensor([[-1.0, 2.0], [1.0, -2.0]])
    bn = bnkit.from_slim(2, activation_fn=fake("leaky_relu"), is_training=False)
    y = bn(x)
    # tf.nn.leaky_relu's slope is 0.2 (PyTorch's is 0.01).
    torch.testing.assert_close(y, F.leaky_relu(x / (1 + 1e-3) ** 0.5, 0.2))
    with pytest.raises(ValueError, match="no bnkit mapping"):
        bnkit.from_slim(2, activation_fn=fake("crelu"))
    relu = bnkit.from_slim(2, activation_fn=torch.relu, is_training=False)
    assert (relu(x) >= 0).all()


# ------------------------------------------------- regularizers and constraints


class L1L2:
    def __init__(self, l1: float, l2: float) -> None:
        self.l1, self.l2 = l1, l2

    def get_config(self) -> dict[str, float]:
        return {"l1": self.l1, "l2": self.l2}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("l2", 0.01 * (1 + 4)),
        ("l1", 0.01 * 3),
        ({"l2": 0.5}, 0.5 * 5),
        (L1L2(0.1, 0.2), 0.1 * 3 + 0.2 * 5),
        ({"class_name": "L2", "config": {"l2": 1.0}}, 5.0),
        (lambda w: w.sum(), 3.0),
    ],
)
def test_regularizers(spec, expected) -> None:
    bn = bnkit.from_keras(2, gamma_regularizer=spec)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0]))
    loss = bnkit.regularization_loss(torch.nn.Sequential(torch.nn.Linear(2, 2), bn))
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert bn.weight.grad is not None


def test_slim_param_regularizers_and_zero_without_any() -> None:
    bn = bnkit.from_slim(2, param_regularizers={"beta": {"l1": 1.0}})
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([-1.0, 3.0]))
    assert bnkit.regularization_loss(bn).item() == pytest.approx(4.0)
    assert bnkit.regularization_loss(torch.nn.Linear(2, 2)).item() == 0.0
    with pytest.raises(ValueError, match="regularizer"):
        bnkit.from_keras(2, beta_regularizer=42)


@pytest.mark.parametrize(
    ("spec", "before", "after"),
    [
        ("non_neg", [-1.0, 2.0], [0.0, 2.0]),
        ("max_norm", [3.0, 4.0], [1.2, 1.6]),  # norm 5 → 2
        ("unit_norm", [3.0, 4.0], [0.6, 0.8]),
        ({"class_name": "MaxNorm", "config": {"max_value": 10.0}}, [3.0, 4.0], [3.0, 4.0]),
        (lambda w: w * 2, [1.0, 2.0], [2.0, 4.0]),
    ],
)
def test_constraints(spec, before, after) -> None:
    bn = bnkit.from_keras(2, gamma_constraint=spec)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(before))
    bnkit.apply_constraints(torch.nn.Sequential(bn))
    torch.testing.assert_close(bn.weight.detach(), torch.tensor(after), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------- param_groups


def test_param_groups_split_normalization_parameters() -> None:
    shared = torch.nn.Linear(3, 3)
    model = torch.nn.Sequential(
        shared,
        bnkit.BatchNorm(3),
        torch.nn.LayerNorm(3),
        shared,
        torch.nn.BatchNorm1d(3),
        bnkit.from_keras(3, trainable=False),
    )
    groups = bnkit.param_groups(model, 5e-4, norm_weight_decay=1e-5)
    other, norm = groups
    assert other["weight_decay"] == 5e-4
    assert norm["weight_decay"] == 1e-5
    assert {id(p) for p in other["params"]} == {id(shared.weight), id(shared.bias)}
    expected_norm = [model[1], model[2], model[4]]
    assert {id(p) for p in norm["params"]} == {id(p) for m in expected_norm for p in m.parameters()}
    assert len(norm["params"]) == 6  # the frozen Keras layer's γ/β are left out
    opt = torch.optim.SGD(groups, lr=0.1)
    assert len(opt.param_groups) == 2


def test_param_groups_leave_out_empty_groups() -> None:
    groups = bnkit.param_groups(torch.nn.Sequential(bnkit.BatchNorm(2)), 1e-4)
    assert len(groups) == 1
    assert groups[0]["weight_decay"] == 0.0


def test_presets_train_like_their_base_module() -> None:
    # A preset is a BatchNorm: its state dict loads into a BatchNorm with the same options.
    torch.manual_seed(3)
    slim = bnkit.from_slim(3, decay=0.9, scale=True, data_format="NCHW", fused=False)
    plain = bnkit.BatchNorm(3, decay=0.9, eps=1e-3, running_var="biased")
    plain.load_state_dict(slim.state_dict())
    for _ in range(3):
        x = torch.randn(4, 3, 2, 2)
        torch.testing.assert_close(slim(x), plain(x))
    torch.testing.assert_close(slim.running_var, plain.running_var)


def test_dtype_names() -> None:
    assert bnkit.from_keras(2, dtype="float64").weight.dtype == torch.float64
    assert bnkit.from_slim(2, dtype=torch.float64).bias.dtype == torch.float64
    half = bnkit.from_keras(2, dtype="float16")
    assert half.weight.dtype == torch.float16
    assert half.running_var.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        bnkit.from_keras(2, dtype="int8")


def test_partial_activation_passes_through() -> None:
    act = functools.partial(F.leaky_relu, negative_slope=0.3)
    bn = bnkit.from_slim(2, activation_fn=act, is_training=False)
    x = torch.tensor([[-1.0, 1.0]])
    torch.testing.assert_close(bn(x), act(x / (1 + 1e-3) ** 0.5))


def test_slim_trainable_false_on_the_layer_path_never_updates() -> None:
    # Keras V1 drops a non-trainable layer's update ops, so slim's core-layer path keeps its
    # moving statistics; the fused and legacy paths update regardless.
    x = torch.randn(4, 2, 2, 3) + 3.0
    layer = bnkit.from_slim(3, trainable=False, decay=0.5)
    y = layer(x)
    assert layer.slim_path(4, weighted=False) == "layer"
    torch.testing.assert_close(layer.running_mean, torch.zeros(3))
    # It still normalizes with the batch statistics.
    torch.testing.assert_close(y.mean(dim=(0, 1, 2)), torch.zeros(3), atol=1e-5, rtol=0)
    fused = bnkit.from_slim(3, trainable=False, decay=0.5, zero_debias_moving_mean=True)
    fused(x)
    assert (fused.running_mean > 2.0).all()
    legacy = bnkit.from_slim(3, trainable=False, decay=0.5)
    legacy(x, weights=torch.ones(4))
    assert (legacy.running_mean > 1.0).all()
