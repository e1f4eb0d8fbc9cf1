"""bnkit.recalibrate: exact population statistics over data, and nothing else touched.

Oracles are float64 closed-form population statistics of the layers' inputs, computed here
by running the layers' math independently (not through the hooks under test).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import bnkit
from bnkit.calibrate import CalibrationReport, recalibrate
from bnkit.policies import is_calibrating

# ---------------------------------------------------------------------- oracles


def population(
    x: Tensor, axis: int, weights: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Float64 (W, mean, M2) per channel of ``x`` (weights: per-sample (N,) or a mask over
    the leading non-channel dims, as bnkit aligns them)."""
    axis = axis % x.ndim
    xd = x.double().movedim(axis, -1)
    c = xd.shape[-1]
    if weights is None:
        w = torch.ones(xd.shape[:-1], dtype=torch.float64)
    else:
        w = (
            weights.double()
            .reshape(tuple(weights.shape) + (1,) * (xd.ndim - 1 - weights.ndim))
            .expand(xd.shape[:-1])
        )
    flat, wf = xd.reshape(-1, c), w.reshape(-1, 1)
    total = wf.sum(0).expand(c)
    mean = (wf * flat).sum(0) / total
    m2 = (wf * (flat - mean) ** 2).sum(0)
    return total, mean, m2


def unbiased(x: Tensor, axis: int, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    total, mean, m2 = population(x, axis, weights)
    return mean, m2 / (total - 1)


def biased(x: Tensor, axis: int, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    total, mean, m2 = population(x, axis, weights)
    return mean, m2 / total


def close(actual: Tensor, expected: Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def batches(x: Tensor, size: int) -> list[Tensor]:
    return list(x.split(size))


def clone_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def data(n: int = 100, shape: tuple[int, ...] = (3, 5, 5), dtype: torch.dtype = torch.float32):
    """Channels with large, different means and scales (a naive sum of squares would lose
    digits)."""
    c = shape[0]
    loc = torch.linspace(-40.0, 60.0, c).reshape(c, *([1] * (len(shape) - 1)))
    scale = torch.linspace(0.5, 3.0, c).reshape(loc.shape)
    return (torch.randn(n, *shape, dtype=dtype) * scale + loc).to(dtype)


# ----------------------------------------------------------------- models


class Branches(nn.Module):
    """Every batch-norm layer sees raw data or a conv of it: no upstream batch statistics,
    so any split of the data must give the same statistics."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, dtype=dtype)
        self.torch_bn = nn.BatchNorm2d(4, dtype=dtype)
        self.unbiased = bnkit.BatchNorm2d(3, dtype=dtype)
        self.biased = bnkit.BatchNorm(3, running_var="biased", dtype=dtype)
        self.last = bnkit.BatchNorm(3, axis=-1, momentum=None, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        a = self.torch_bn(self.conv(x)).mean()
        b = self.unbiased(x).mean() + self.biased(x).mean()
        return a + b + self.last(x.permute(0, 2, 3, 1)).mean()


def branch_oracle(model: Branches, x: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    conv = torch.nn.functional.conv2d(
        x.double(), model.conv.weight.double(), model.conv.bias.double(), padding=1
    )
    return {
        "torch_bn": unbiased(conv, 1),
        "unbiased": unbiased(x, 1),
        "biased": biased(x, 1),
        "last": unbiased(x.permute(0, 2, 3, 1), -1),
    }


def stats_of(model: nn.Module, names: list[str]) -> dict[str, tuple[Tensor, Tensor]]:
    out = {}
    for name in names:
        layer = model.get_submodule(name)
        out[name] = (layer.running_mean.clone(), layer.running_var.clone())
    return out


# ---------------------------------------------------------- exactness


@pytest.mark.parametrize(
    ("dtype", "rtol"), [(torch.float32, 1e-6), (torch.float64, 1e-12)], ids=["f32", "f64"]
)
def test_resplitting_the_data_gives_the_same_statistics(dtype: torch.dtype, rtol: float) -> None:
    x = data(100, dtype=dtype)
    names = ["torch_bn", "unbiased", "biased", "last"]
    results = []
    for size in (7, 16, 50, 100):
        model = Branches(dtype)
        torch.manual_seed(1)
        model.conv.reset_parameters()  # the same conv for every split
        report = recalibrate(model, batches(x, size), progress=False)
        assert report.calibrated == names
        assert report.num_batches == math.ceil(100 / size)
        results.append(stats_of(model, names))
    for other in results[1:]:
        for name in names:
            close(other[name][0], results[0][name][0], rtol=rtol, atol=rtol)
            close(other[name][1], results[0][name][1], rtol=rtol, atol=0.0)
    expected = branch_oracle(model, x)
    for name in names:
        close(results[0][name][0], expected[name][0], rtol=rtol * 10, atol=rtol * 10)
        close(results[0][name][1], expected[name][1], rtol=rtol * 10, atol=0.0)


def test_batch_order_does_not_matter() -> None:
    """Also downstream of a renorm layer, whose training output depends on its renorm
    statistics: every batch starts from the layers' original buffers."""
    x = data(60, (3,))
    parts = batches(x, 8)
    results = []
    for order in (parts, parts[::-1]):
        torch.manual_seed(3)
        model = nn.Sequential(
            bnkit.BatchNorm1d(3, renorm=True), nn.Linear(3, 3), bnkit.BatchNorm1d(3)
        )
        recalibrate(model, order, progress=False)
        results.append(model)
    for a, b in zip(results[0].buffers(), results[1].buffers(), strict=True):
        close(a, b, rtol=1e-6, atol=1e-6)


def test_downstream_layers_see_training_mode_inputs() -> None:
    """Sequential model: the oracle runs each batch through the layers itself (float64,
    batch statistics in the upstream layer, as in training) and pools the inputs."""
    model = nn.Sequential(
        nn.Linear(6, 5),
        bnkit.BatchNorm1d(5, weight_init=lambda t: t.uniform_(0.5, 2), bias_init=0.3),
        nn.ReLU(),
        nn.Linear(5, 4),
        bnkit.BatchNorm1d(4, running_var="biased"),
    ).eval()
    x = torch.randn(90, 6) * 2 + 1
    parts = batches(x, 16)
    report = recalibrate(model, parts, progress=False)
    lin1, bn1, lin2 = model[0], model[1], model[3]
    inputs1, inputs2 = [], []
    for part in parts:
        h = part.double() @ lin1.weight.double().T + lin1.bias.double()
        inputs1.append(h)
        mean, var = h.mean(0), h.var(0, unbiased=False)
        z = (h - mean) / torch.sqrt(var + bn1.eps) * bn1.weight.double() + bn1.bias.double()
        inputs2.append(torch.relu(z) @ lin2.weight.double().T + lin2.bias.double())
    for layer, inputs, oracle in ((model[1], inputs1, unbiased), (model[4], inputs2, biased)):
        mean, var = oracle(torch.cat(inputs), 1)
        close(layer.running_mean, mean, rtol=1e-5, atol=1e-5)
        close(layer.running_var, var, rtol=1e-5, atol=0.0)
    assert report.layers["1"].samples == 90
    assert report.layers["4"].running_var == "biased"
    assert report.layers["4"].batches == len(parts)


def test_biased_and_unbiased_layers_differ_by_bessel() -> None:
    model = Branches()
    x = data(40)
    recalibrate(model, batches(x, 9), progress=False)
    n = 40 * 5 * 5
    ratio = model.unbiased.running_var.double() / model.biased.running_var.double()
    close(ratio, torch.full((3,), n / (n - 1), dtype=torch.float64), rtol=1e-6, atol=0.0)
    close(model.unbiased.running_mean, model.biased.running_mean, rtol=0.0, atol=0.0)


# ----------------------------------------------------- nothing else touched


def _trained_zoo() -> nn.Sequential:
    """Layers with every kind of extra state, trained a few steps so nothing is at init."""
    model = nn.Sequential(
        bnkit.BatchNorm1d(4, zero_debias="both", decay=0.9),
        bnkit.BatchNorm1d(4, zero_debias="mean", warmup=True, decay=0.99),
        bnkit.BatchNorm1d(4, renorm=True, renorm_clipping={"rmax": 3.0}, eps=0.01),
        bnkit.BatchNorm1d(4, momentum=None),
        nn.BatchNorm1d(4),
        bnkit.from_keras(4, virtual_batch_size=2),
        bnkit.from_slim(4, zero_debias_moving_mean=True, scale=True),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4) * 3 + 2).pow(2).mean().backward()
        opt.step()
    return model


CHANGING = ("running_mean", "running_var", "running_stddev", "_biased")


def test_only_the_statistics_change_and_stay_consistent() -> None:
    model = _trained_zoo()
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    before = clone_state(model)
    renorm_before = model[2].renorm_mean.clone(), model[2].renorm_stddev.clone()
    report = recalibrate(model, batches(torch.randn(48, 4) * 2 - 1, 8), progress=False)
    assert len(report.calibrated) == 7
    for k, p in model.named_parameters():
        assert torch.equal(p, params[k]), k
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        if key.endswith(CHANGING):
            if key.endswith(("running_mean", "running_var")):
                assert not torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key], value), key  # counters, local steps, renorm_*
    assert torch.equal(model[2].renorm_mean, renorm_before[0])
    # Renorm: running_var = relu(running_stddev² − eps) still holds.
    renorm = model[2]
    close(renorm.running_stddev**2 - renorm.eps, renorm.running_var, rtol=1e-5, atol=0.0)
    # Zero-debias: running = biased / (1 − d^k), d the decay of the next update.
    for layer, stats in ((model[0], ("mean", "var")), (model[1], ("mean",)), (model[6], ("mean",))):
        t = int(layer.num_batches_tracked)
        decay = layer.decay
        if layer.warmup:
            decay = min(decay, (1 + t) / (10 + t))
        for stat in stats:
            k = int(getattr(layer, f"running_{stat}_local_step"))
            assert k == 3
            biased = getattr(layer, f"running_{stat}_biased").double()
            close(biased / (1 - decay**k), getattr(layer, f"running_{stat}"), rtol=1e-6)


def test_zero_debias_next_update_blends_the_calibrated_value() -> None:
    """After recalibration the next zero-debiased update is the convex blend
    ``((d − d^{k+1}) · value + (1 − d) · batch) / (1 − d^{k+1})``."""
    layer = bnkit.BatchNorm1d(3, zero_debias="mean", decay=0.8)
    for _ in range(2):
        layer(torch.randn(6, 3))
    recalibrate(layer, [torch.randn(20, 3) + 5], progress=False)
    value = layer.running_mean.double().clone()
    batch = torch.randn(10, 3) - 2
    layer(batch)
    d, k = 0.8, 2
    expected = ((d - d ** (k + 1)) * value + (1 - d) * batch.double().mean(0)) / (1 - d ** (k + 1))
    close(layer.running_mean, expected, rtol=1e-5, atol=1e-6)


def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_modes_hooks_and_momenta_restored_and_dropout_left_alone() -> None:
    model = nn.Sequential(
        nn.Linear(4, 4), nn.Dropout(0.5), bnkit.BatchNorm1d(4), nn.BatchNorm1d(4, momentum=0.3)
    )
    model.eval()
    model[1].train()  # Monte Carlo dropout: the user wants it on
    calls: list[Any] = []
    user_hook = model[2].register_forward_pre_hook(lambda m, a: calls.append("user"))
    modes, momenta = _modes(model), (model[2].momentum, model[3].momentum)
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
    seen: list[tuple[list[bool], bool, bool]] = []

    def forward(m: nn.Module, batch: Tensor) -> None:
        seen.append((_modes(m), torch.is_grad_enabled(), is_calibrating()))
        m(batch)

    recalibrate(model, batches(torch.randn(24, 4), 8), forward=forward, progress=False)
    # During: batch norm in training mode, everything else as the user left it.
    assert seen[0] == ([False, False, True, True, True], False, True)
    assert len(seen) == 3
    assert calls == ["user"] * 3  # the user's hook still runs, once per batch
    # After: all as before.
    assert _modes(model) == modes
    assert (model[2].momentum, model[3].momentum) == momenta
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()] == hooks
    user_hook.remove()
    assert not is_calibrating()
    assert torch.is_grad_enabled()


def test_everything_restored_when_the_forward_raises_midway() -> None:
    model = _trained_zoo()
    model[3].eval()
    model[1].policy = {"nonfinite": "skip"}
    before = clone_state(model)
    params = [p.detach().clone() for p in model.parameters()]
    modes = _modes(model)
    warned = [set(getattr(m, "_warned", ())) for m in model]

    calls: list[int] = []

    def forward(m: nn.Module, batch: Tensor) -> None:
        m(batch)
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom on the third batch")

    parts = batches(torch.randn(40, 4), 8)
    parts[1][0, 0] = float("nan")  # a non-finite batch: the layers' guards fire meanwhile
    with pytest.raises(RuntimeError, match="third batch"):
        recalibrate(model, parts, forward=forward, progress=False)
    after = model.state_dict()
    assert after.keys() == before.keys()  # no num_skipped_updates left behind
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    for p, q in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, q)
    assert _modes(model) == modes
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert [set(getattr(m, "_warned", ())) for m in model] == warned
    assert not is_calibrating()


# ----------------------------------------------------------- sample weights


class Weighted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = bnkit.BatchNorm(3)
        self.ghost = bnkit.BatchNorm(3, running_var="biased", virtual_batch_size=4)
        self.strided = bnkit.BatchNorm(
            3, running_var="biased", virtual_batch_size=4, ghost_layout="strided"
        )
        self.keras = bnkit.from_keras(3)  # channels-last, (N, L, C) with a mask

    def forward(self, x: Tensor, w: Tensor, mask: Tensor) -> Tensor:
        a = self.bn(x, weights=w) + self.ghost(x, weights=w) + self.strided(x, weights=w)
        return a.mean() + self.keras(x.transpose(1, 2), mask=mask).mean()


def test_sample_weights_and_masks_pool_as_frequency_weights() -> None:
    n, length = 48, 5
    x = data(n, (3, length))
    w = torch.rand(n) * 2
    w[::5] = 0.0
    mask = torch.rand(n, length) > 0.3
    results = []
    for size in (8, 16):
        model = Weighted()
        parts = list(zip(x.split(size), w.split(size), mask.split(size), strict=True))
        report = recalibrate(model, parts, forward=lambda m, b: m(*b), progress=False)
        results.append((model, report))
    (model, report), (other, _) = results
    for name in ("bn", "keras"):  # ghosts depend on the batch composition by design
        first, second = model.get_submodule(name), other.get_submodule(name)
        for a, b in zip(first.buffers(), second.buffers(), strict=True):
            close(a, b, rtol=1e-6, atol=1e-6)
    # Per-sample weights: mean Σwx/W, var M2/(W − 1), W the total weight (frequency weights).
    mean, var = unbiased(x, 1, w)
    close(model.bn.running_mean, mean)
    close(model.bn.running_var, var)
    assert report.layers["bn"].samples == pytest.approx(float(w.sum()) * length)
    # Keras with a mask: its masked path feeds the biased variance.
    mean, var = biased(x.transpose(1, 2), -1, mask)
    close(model.keras.running_mean, mean)
    close(model.keras.running_var, var)
    assert report.layers["keras"].running_var == "biased"
    assert report.layers["keras"].samples == int(mask.sum())
    # Weighted ghosts: n_g is the ghost's total weight. Batches of 8 = 2 ghosts of 4:
    # contiguous ghosts are samples (0-3), (4-7); strided (Keras) ones (0, 2, 4, 6), (1, 3, 5, 7).
    total, mean, m2 = population(x, 1, w)
    per_batch = w.double().reshape(-1, 8)  # the 8-sample split's batches
    layouts = {
        "ghost": per_batch.reshape(-1, 2, 4).sum(2),
        "strided": per_batch.reshape(-1, 4, 2).sum(1),
    }
    for name, ghost_weights in layouts.items():
        n_g = ghost_weights.flatten() * length
        factor = ((n_g - 1).clamp(min=0) / n_g).mean()
        close(model.get_submodule(name).running_mean, mean)
        close(model.get_submodule(name).running_var, m2 / (total - 1) * factor)
        assert report.layers[name].ghost_factor == pytest.approx(float(factor)), name


# ------------------------------------------------------------- ghost batches


def test_ghost_rule_closed_form() -> None:
    n, length, v = 64, 3, 4
    x = data(n, (3, length))
    model = nn.ModuleDict(
        {
            "unbiased": bnkit.BatchNorm(3, virtual_batch_size=v),
            "biased": bnkit.BatchNorm(3, virtual_batch_size=v, running_var="biased"),
            "strided": bnkit.BatchNorm(
                3, virtual_batch_size=v, running_var="biased", ghost_layout="strided"
            ),
        }
    )

    def forward(m: nn.Module, batch: Tensor) -> None:
        for layer in m.values():
            layer(batch)

    results = []
    for size in (8, 16, 32):
        report = recalibrate(model, batches(x, size), forward=forward, progress=False)
        results.append(stats_of(model, ["unbiased", "biased", "strided"]))
    mean, var = unbiased(x, 1)
    n_g = v * length
    for stats in results:
        close(stats["unbiased"][0], mean)
        close(stats["unbiased"][1], var)
        for name in ("biased", "strided"):
            close(stats[name][1], var * (n_g - 1) / n_g)
    assert report.layers["unbiased"].ghost_factor is None
    assert report.layers["biased"].ghost_factor == pytest.approx((n_g - 1) / n_g)


@pytest.mark.parametrize("mode", ["unbiased", "biased"])
def test_ghost_rule_is_what_training_feeds_on_average(mode: str) -> None:
    """The cumulative average of what training feeds the moving variance approaches the
    recalibrated value (a plain population variance would be 1/n_g = 12.5% off for biased)."""
    v, length = 4, 2  # n_g = 8 values per channel per ghost
    x = torch.randn(16384, 3, length) * 2 + 1
    parts = batches(x, 256)  # 64 ghosts per batch, 4096 in all
    trained = bnkit.BatchNorm(3, virtual_batch_size=v, running_var=mode, momentum=None)
    for part in parts:
        trained(part)
    calibrated = bnkit.BatchNorm(3, virtual_batch_size=v, running_var=mode)
    recalibrate(calibrated, parts, progress=False)
    close(calibrated.running_var, trained.running_var, rtol=0.03, atol=0.0)
    _, population_var = biased(x, 1)
    if mode == "biased":
        assert ((calibrated.running_var.double() / population_var - 1).abs() > 0.1).all()


# ------------------------------------------------------------- layer kinds


def test_presets_use_the_variance_of_their_code_path() -> None:
    n = 32
    x4 = data(n, (4, 3, 3)).permute(0, 2, 3, 1)  # NHWC
    x3 = data(n, (4, 6)).transpose(1, 2)  # (N, L, C)
    w = torch.rand(n) + 0.5
    model = nn.ModuleDict(
        {
            "slim_fused": bnkit.from_slim(4),
            "slim_weighted": bnkit.from_slim(4),
            "keras_fused": bnkit.from_keras(4),
            "keras_3d": bnkit.from_keras(4),
        }
    )

    def forward(m: nn.ModuleDict, batch: tuple[Tensor, Tensor, Tensor]) -> None:
        a, b, weights = batch
        m["slim_fused"](a)
        m["slim_weighted"](a, weights=weights)
        m["keras_fused"](a)
        m["keras_3d"](b)

    parts = list(zip(x4.split(8), x3.split(8), w.split(8), strict=True))
    report = recalibrate(model, parts, forward=forward, progress=False)
    # slim: fused path (4-D, no weights) unbiased, weighted path biased; Keras: fused 4-D
    # unbiased, 3-D (non-fused) biased.
    expected = {
        "slim_fused": ("unbiased", unbiased(x4, -1)),
        "slim_weighted": ("biased", biased(x4, -1, w)),
        "keras_fused": ("unbiased", unbiased(x4, -1)),
        "keras_3d": ("biased", biased(x3, -1)),
    }
    for name, (mode, (mean, var)) in expected.items():
        assert report.layers[name].running_var == mode, name
        close(model[name].running_mean, mean)
        close(model[name].running_var, var)


def test_torch_layers_sync_batchnorm_and_skipped_layers() -> None:
    model = nn.Sequential(
        nn.BatchNorm1d(3),
        nn.SyncBatchNorm(3),
        nn.BatchNorm1d(3, track_running_stats=False),
        bnkit.BatchNorm1d(3, track_running_stats=False),
        bnkit.BatchNorm1d(3),
        bnkit.from_keras(3, axis=1, trainable=False),
    )
    model[4].frozen = True
    frozen_before = clone_state(model[4])
    x = data(30, (3, 4))
    report = recalibrate(model, batches(x, 10), progress=False)
    assert report.calibrated == ["0", "1"]
    assert report.skipped == ["2", "3", "4", "5"]
    assert "track_running_stats=False" in report.layers["2"].reason
    assert "track_running_stats=False" in report.layers["3"].reason
    assert "frozen" in report.layers["4"].reason
    assert "trainable=False" in report.layers["5"].reason
    mean, var = unbiased(x, 1)
    close(model[0].running_mean, mean)
    close(model[0].running_var, var)
    assert model[4].frozen
    for key, value in model[4].state_dict().items():
        assert torch.equal(value, frozen_before[key]), key
    assert "skipped" in str(report)


def test_a_model_without_layers_to_calibrate_returns_an_empty_report() -> None:
    consumed = []

    def stream() -> Iterator[Tensor]:
        consumed.append(1)
        yield torch.randn(4, 3)

    report = recalibrate(nn.Sequential(nn.Linear(3, 3)), stream(), progress=False)
    assert report.layers == {}
    assert consumed == []  # no data drawn for nothing
    assert "0 of 0" in str(report)


def test_uninitialized_lazy_layer_is_refused() -> None:
    with pytest.raises(ValueError, match="lazy module"):
        recalibrate(nn.LazyBatchNorm1d(), [torch.randn(4, 3)], progress=False)


def test_inference_calls_and_shared_layers() -> None:
    """Calls with training=False do not count (training would not absorb them); a layer
    called twice per batch pools both inputs but counts the batch once."""
    bn = bnkit.BatchNorm(3)

    def forward(m: nn.Module, batch: Tensor) -> None:
        m(batch)
        m(batch * 2 + 7)
        m(batch * 100, training=False)

    x = data(24, (3,))
    report = recalibrate(bn, batches(x, 8), forward=forward, progress=False)
    mean, var = unbiased(torch.cat([x, x * 2 + 7]), 1)
    close(bn.running_mean, mean)
    close(bn.running_var, var)
    assert report.layers[""].batches == 3
    assert report.layers[""].samples == 48
    assert "(model)" in str(report)


# ------------------------------------------------------------------- data


class Keyword(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, image: Tensor, label: Tensor | None = None) -> Tensor:
        return self.bn(image)


def test_dataloader_tuples_dicts_and_custom_forward() -> None:
    x = data(50, (3,))
    y = torch.arange(50)
    mean, var = unbiased(x, 1)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)  # yields [x, y] lists
    sources: dict[str, Any] = {
        "loader": loader,
        "tuples": [(a, b) for a, b in zip(x.split(8), y.split(8), strict=True)],
        "dicts": [{"image": a, "label": b} for a, b in zip(x.split(9), y.split(9), strict=True)],
    }
    for kind, source in sources.items():
        model = Keyword()
        report = recalibrate(model, source, progress=False)
        close(model.bn.running_mean, mean)
        close(model.bn.running_var, var)
        assert report.layers["bn"].samples == 50, kind
    model = Keyword()
    recalibrate(model, [{"x": x}], forward=lambda m, b: m(b["x"]), progress=False)
    close(model.bn.running_var, var)
    with pytest.raises(TypeError, match="forward=lambda"):
        recalibrate(Keyword(), [3, 4], progress=False)


def test_num_batches_caps_without_drawing_more() -> None:
    drawn = []
    x = data(40, (3,))

    def stream() -> Iterator[Tensor]:
        for i, part in enumerate(x.split(8)):
            drawn.append(i)
            yield part

    model = Keyword()
    report = recalibrate(model, stream(), num_batches=3, progress=False)
    assert drawn == [0, 1, 2]
    assert report.num_batches == 3
    assert report.layers["bn"].batches == 3
    close(model.bn.running_var, unbiased(x[:24], 1)[1])
    with pytest.raises(ValueError, match="num_batches"):
        recalibrate(model, [x], num_batches=0, progress=False)


def test_empty_data_is_an_error_and_changes_nothing() -> None:
    model = _trained_zoo()
    before = clone_state(model)
    with pytest.raises(ValueError, match="no batches"):
        recalibrate(model, [], progress=False)
    with pytest.raises(ValueError, match="no batches"):
        recalibrate(model, iter(()), progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_layers_the_forward_never_reaches() -> None:
    model = nn.ModuleDict({"body": nn.BatchNorm1d(3), "head": bnkit.BatchNorm1d(3)})
    head_before = clone_state(model["head"])
    x = data(20, (3,))
    with pytest.warns(UserWarning, match="'head'"):
        report = recalibrate(model, [x], forward=lambda m, b: m["body"](b), progress=False)
    assert report.calibrated == ["body"]
    assert report.not_reached == ["head"]
    assert "never called" in report.layers["head"].reason
    for key, value in model["head"].state_dict().items():
        assert torch.equal(value, head_before[key]), key
    with pytest.raises(ValueError, match="never called any"):
        recalibrate(model, [x], forward=lambda m, b: None, progress=False)


def test_nonfinite_batches_follow_the_policy() -> None:
    x = data(32, (3,))
    bad = x[:8].clone()
    bad[3, 1] = float("nan")
    model = nn.ModuleDict({"torch": nn.BatchNorm1d(3), "bnkit": bnkit.BatchNorm1d(3)})

    def forward(m: nn.Module, batch: Tensor) -> None:
        m["torch"](batch)
        m["bnkit"](batch)

    # Default "skip": the batch is left out (the bnkit layer's own guard stays quiet).
    report = recalibrate(model, [*batches(x, 8), bad], forward=forward, progress=False)
    mean, var = unbiased(x, 1)
    for name in ("torch", "bnkit"):
        close(model[name].running_mean, mean)
        close(model[name].running_var, var)
        assert report.layers[name].nonfinite_batches == 1
        assert report.layers[name].batches == 5  # called in 5 batches, 1 left out
    assert "non-finite" in str(report)
    assert "num_skipped_updates" not in model["bnkit"].state_dict()
    with bnkit.policy(nonfinite="raise"), pytest.raises(ValueError, match="non-finite"):
        recalibrate(model, [bad], forward=forward, progress=False)
    with pytest.warns(UserWarning, match="non-finite"):
        report = recalibrate(model, [bad], forward=forward, progress=False)
    assert report.not_reached == ["torch", "bnkit"]
    assert "non-finite" in report.layers["torch"].reason


# --------------------------------------------------------------- reporting


def test_report_measures_how_far_the_statistics_moved() -> None:
    model = nn.Sequential(nn.BatchNorm1d(4))
    with torch.no_grad():
        model[0].running_mean.copy_(torch.tensor([0.0, 1.0, -2.0, 3.0]))
        model[0].running_var.copy_(torch.tensor([1.0, 4.0, 0.25, 9.0]))
    old_mean, old_var = model[0].running_mean.double(), model[0].running_var.double()
    x = data(64, (4,))
    report = recalibrate(model, batches(x, 16), progress=False)
    assert isinstance(report, CalibrationReport)
    layer = report.layers["0"]
    mean, var = unbiased(x, 1)
    shift = ((mean - old_mean).abs() / torch.sqrt(old_var + 1e-5)).max()
    assert layer.mean_shift == pytest.approx(float(shift), rel=1e-5)
    assert layer.var_ratio_min == pytest.approx(float((var / old_var).min()), rel=1e-5)
    assert layer.var_ratio_max == pytest.approx(float((var / old_var).max()), rel=1e-5)
    assert (layer.batches, layer.samples, layer.running_var) == (4, 64.0, "unbiased")
    text = str(report)
    assert text.splitlines()[0] == "recalibrated 1 of 1 batch-norm layer(s) from 4 batch(es)"
    assert "mean shift" in text
    assert f"{layer.mean_shift:.4g}" in text
    assert "BatchNorm1d" in text


def test_progress_bar_on_stderr_only_when_asked(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tqdm")  # the optional dependency (the "demo" extra) is installed here
    x = data(40, (3,))
    recalibrate(Keyword(), batches(x, 8), progress=False)
    assert capfd.readouterr() == ("", "")
    recalibrate(Keyword(), batches(x, 8), num_batches=3, progress=True)
    out, err = capfd.readouterr()
    assert out == ""
    assert "recalibrate" in err
    assert "3/3" in err  # total = min(num_batches, len(data))
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if tqdm were not installed
    model = Keyword()
    recalibrate(model, batches(x, 8), progress=True)
    assert capfd.readouterr() == ("", "")
    close(model.bn.running_var, unbiased(x, 1)[1])


# --------------------------------------------------------------- distributed


def _dist_model() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(
        nn.BatchNorm1d(4),
        nn.Linear(4, 4),
        bnkit.BatchNorm1d(4, running_var="biased"),
        nn.ReLU(),
        bnkit.BatchNorm(4, virtual_batch_size=4, running_var="biased"),
    )


def _dist_batches() -> list[Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(8, 4, generator=g) * 3 + 10 for _ in range(5)]


def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        model = _dist_model()
        parts = _dist_batches()
        shard = parts[:3] if rank == 0 else parts[3:]  # uneven: 3 and 2 batches
        report = recalibrate(model, shard, progress=False)
        summary = {n: (r.batches, r.samples, r.ghost_factor) for n, r in report.layers.items()}
        # A rank without any batch: the others' statistics (and variance convention) arrive.
        lonely = _dist_model()
        recalibrate(lonely, parts if rank == 0 else [], progress=False)
        torch.save(
            {
                "state": model.state_dict(),
                "lonely": lonely.state_dict(),
                "summary": summary,
                "world": report.world_size,
                "num_batches": report.num_batches,
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_pool_exactly(tmp_path: Path) -> None:
    context = mp.spawn(
        _distributed_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        join=False,
    )
    deadline = time.monotonic() + 90
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-process gloo calibration did not finish in 90 s")
    single = _dist_model()
    report = recalibrate(single, _dist_batches(), progress=False)
    assert report.world_size == 1
    expected = {n: (r.batches, r.samples, r.ghost_factor) for n, r in report.layers.items()}
    assert expected["0"] == (5, 40.0, None)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["world"] == 2
        assert result["num_batches"] == 5
        assert result["summary"] == expected
        for key, value in single.state_dict().items():
            close(result["state"][key], value, rtol=1e-6, atol=1e-6)
            close(result["lonely"][key], value, rtol=1e-6, atol=1e-6)
