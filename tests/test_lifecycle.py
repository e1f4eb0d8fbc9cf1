"""Tests for the model lifecycle helpers in bnkit.convert: freeze/unfreeze, fold, eval_mode and
train_mode.

Oracles: the torch.nn model in evaluation mode (a frozen layer must compute exactly what the
unfrozen one computes in evaluation, in training mode too); the closed-form float64 derivative of
the running-statistics transform, dy/dx = γ/sqrt(var + eps); and, for fold, the unfolded model in
evaluation mode on the same input (float64, so any folding error shows far above rounding).
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bnkit
from bnkit.convert import (
    FoldReport,
    FoldResult,
    RankCheck,
    eval_mode,
    fold,
    freeze,
    train_mode,
    unfreeze,
)

NORMS = (nn.modules.batchnorm._BatchNorm, bnkit.BatchNorm)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm non-trivial statistics and affine parameters (so folding is tested)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, NORMS):
                continue
            for name, low, high in [
                ("running_mean", -1.0, 1.0),
                ("running_var", 0.3, 3.0),
                ("weight", 0.5, 1.5),
                ("bias", -1.0, 1.0),
            ]:
                t = getattr(m, name, None)
                if t is not None:
                    t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64) * (high - low))
                    t.add_(low)
    return model


def norms(model: nn.Module) -> dict[str, nn.Module]:
    return {p: m for p, m in model.named_modules() if isinstance(m, NORMS)}


def clone_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    now = model.state_dict()
    assert list(now) == list(state)
    for key, value in state.items():
        assert torch.equal(now[key], value), key


class ConvNet(nn.Module):
    """Conv + BN2d + ReLU, a Linear head with BN1d, all torch.nn."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((2, 3)))


def conv_net() -> ConvNet:
    return randomize(ConvNet().double())  # type: ignore[return-value]


# ------------------------------------------------------------------------------ freeze


def test_freeze_converts_torch_layers_and_computes_the_eval_output_in_training_mode() -> None:
    net = conv_net()
    reference = copy.deepcopy(net).eval()
    old = {p: (m.weight, m.running_mean) for p, m in norms(net).items()}
    out = freeze(net)
    assert out is net
    layers = norms(net)
    assert list(layers) == list(old)
    assert type(layers["features.1"]) is bnkit.BatchNorm2d
    assert type(layers["head.1"]) is bnkit.BatchNorm1d
    for path, layer in layers.items():
        assert layer.frozen, path
        # The same Parameter and buffer objects (optimizers keep working), in float64.
        assert layer.weight is old[path][0]
        assert layer.running_mean is old[path][1]
        assert layer.weight.dtype == torch.float64
    net.train()
    x = torch.randn(6, 3, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(net(x), reference(x), rtol=0, atol=1e-12)


def test_frozen_statistics_do_not_move_while_training() -> None:
    net = freeze(conv_net(), affine_trainable=True)
    stats = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "batches" in k}
    gammas = {p: m.weight.detach().clone() for p, m in norms(net).items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net.train()
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(4, 3, 7, 7, dtype=torch.float64) * 3 + 2).square().mean().backward()
        opt.step()
    now = net.state_dict()
    for key, value in stats.items():
        assert torch.equal(now[key], value), key
    # γ kept learning (affine_trainable=True).
    for path, layer in norms(net).items():
        assert not torch.equal(layer.weight, gammas[path]), path


@pytest.mark.parametrize("affine_trainable", [False, True])
def test_gradients_of_a_frozen_layer_match_the_closed_form(affine_trainable: bool) -> None:
    bn = randomize(nn.BatchNorm2d(3).double())
    frozen = freeze(bn, affine_trainable=affine_trainable)
    assert isinstance(frozen, bnkit.BatchNorm2d)
    assert frozen.frozen
    frozen.train()
    x = torch.randn(4, 3, 2, 5, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, 3, 2, 5, dtype=torch.float64)
    (frozen(x) * c).sum().backward()
    mean, var = bn.running_mean.view(1, 3, 1, 1), bn.running_var.view(1, 3, 1, 1)
    inv_std = 1.0 / torch.sqrt(var + bn.eps)
    gamma = bn.weight.detach().view(1, 3, 1, 1)
    assert x.grad is not None
    torch.testing.assert_close(x.grad, c * gamma * inv_std, rtol=1e-12, atol=1e-12)
    if affine_trainable:
        x_hat = (x.detach() - mean) * inv_std
        assert frozen.weight.grad is not None
        assert frozen.bias.grad is not None
        torch.testing.assert_close(frozen.weight.grad, (c * x_hat).sum((0, 2, 3)))
        torch.testing.assert_close(frozen.bias.grad, c.sum((0, 2, 3)))
    else:
        assert not frozen.weight.requires_grad
        assert not frozen.bias.requires_grad
        assert frozen.weight.grad is None


def test_freeze_bnkit_and_preset_layers_in_place_and_sync_batch_norm_without_warning() -> None:
    keras = bnkit.from_keras(4, axis=1)
    plain = bnkit.BatchNorm(4, renorm=True)
    sync = nn.SyncBatchNorm(4)
    net = nn.Sequential(OrderedDict(keras=keras, plain=plain, sync=sync))
    freeze(net)  # filterwarnings=error: converting SyncBatchNorm here must not warn
    assert net.keras is keras
    assert net.plain is plain
    assert type(net.sync) is bnkit.BatchNorm
    assert all(m.frozen for m in norms(net).values())
    stats = clone_state(net)
    net.train()
    net(torch.randn(8, 4, 3))
    assert_state(net, stats)


def test_freeze_refuses_layers_without_statistics_and_changes_nothing() -> None:
    net = nn.Sequential(
        OrderedDict(
            a=nn.BatchNorm1d(3),
            b=nn.BatchNorm1d(3, track_running_stats=False),
            c=bnkit.BatchNorm(3, track_running_stats=False),
            d=bnkit.BatchNorm1d(3),
        )
    )
    before = [(p, id(m)) for p, m in net.named_modules()]
    flags = [p.requires_grad for p in net.parameters()]
    with pytest.raises(ValueError, match="cannot be frozen") as info:
        freeze(net)
    message = str(info.value)
    assert "b (BatchNorm1d): no running statistics" in message
    assert "c (BatchNorm): no running statistics" in message
    assert " a (" not in message
    assert [(p, id(m)) for p, m in net.named_modules()] == before
    assert not net.d.frozen
    assert [p.requires_grad for p in net.parameters()] == flags


class OwnBatchNorm(nn.BatchNorm2d):
    pass


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (nn.LazyBatchNorm2d(), "lazy layer that has not seen any input"),
        (OwnBatchNorm(3), "OwnBatchNorm.*subclass bnkit does not know"),
    ],
)
def test_freeze_refuses_lazy_and_unknown_layers(layer: nn.Module, match: str) -> None:
    net = nn.Sequential(nn.Conv2d(3, 3, 1), layer)
    with pytest.raises(ValueError, match=match):
        freeze(net)
    assert net[1] is layer


def test_freeze_refuses_hooked_torch_layers_and_handles_materialized_lazy_ones() -> None:
    hooked = nn.Sequential(nn.BatchNorm2d(3))
    hooked[0].register_forward_pre_hook(lambda *args: None)
    with pytest.raises(ValueError, match=r"0 \(BatchNorm2d\): forward_pre_hooks"):
        freeze(hooked)
    lazy = nn.Sequential(nn.LazyBatchNorm2d())
    lazy(torch.randn(4, 3, 2, 2))
    freeze(lazy)
    assert type(lazy[0]) is bnkit.BatchNorm2d
    assert lazy[0].frozen


def test_freeze_remembers_requires_grad_and_unfreeze_restores_it() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    net[1].bias.requires_grad_(False)  # the user froze β on purpose
    freeze(net)
    layer = net[1]
    assert (layer.weight.requires_grad, layer.bias.requires_grad) == (False, False)
    freeze(net)  # a second freeze must not forget the original flags
    freeze(net, affine_trainable=True)  # gives them back, stays frozen
    assert layer.frozen
    assert (layer.weight.requires_grad, layer.bias.requires_grad) == (True, False)
    freeze(net)
    out = unfreeze(net)
    assert out is net
    assert net[1] is layer  # stays a bnkit layer
    assert isinstance(layer, bnkit.BatchNorm1d)
    assert not layer.frozen
    assert (layer.weight.requires_grad, layer.bias.requires_grad) == (True, False)
    assert net[0].weight.requires_grad  # other layers are never touched


def test_unfrozen_converted_model_trains_like_the_torch_model() -> None:
    reference = conv_net()
    net = unfreeze(freeze(copy.deepcopy(reference)))
    reference.train()
    net.train()
    x = torch.randn(5, 3, 7, 7, dtype=torch.float64)
    assert torch.equal(net(x), reference(x))
    assert_state(net, clone_state(reference))
    assert int(net.head[1].num_batches_tracked) == 1
    back = bnkit.to_torch(net)
    assert type(back.head[1]) is nn.BatchNorm1d


def test_frozen_state_dict_loads_into_fresh_unfrozen_and_frozen_models() -> None:
    source = freeze(conv_net())
    state = source.state_dict()
    assert state["features.1.frozen"].item() is True
    assert state["head.1.frozen"].item() is True
    x = torch.randn(3, 3, 7, 7, dtype=torch.float64)
    expected = source.eval()(x)

    # A fresh bnkit model (not frozen) becomes frozen by loading.
    fresh = bnkit.convert(ConvNet().double())
    assert not any(m.frozen for m in norms(fresh).values())
    fresh.load_state_dict(state)
    assert all(m.frozen for m in norms(fresh).values())
    fresh.train()
    stats = clone_state(fresh)
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
    assert_state(fresh, stats)

    # A fresh frozen model loads the statistics and stays frozen.
    fresh_frozen = freeze(ConvNet().double())
    fresh_frozen.load_state_dict(state)
    assert all(m.frozen for m in norms(fresh_frozen).values())
    torch.testing.assert_close(fresh_frozen.train()(x), expected, rtol=0, atol=0)

    # The unfrozen state of the same model has no "frozen" keys; loading it into a frozen
    # model keeps that model frozen (plain weights do not unfreeze).
    plain = unfreeze(copy.deepcopy(source)).state_dict()
    assert not any(k.endswith("frozen") for k in plain)
    fresh_frozen.load_state_dict(plain)
    assert all(m.frozen for m in norms(fresh_frozen).values())


def test_freeze_shared_and_root_layers() -> None:
    shared = nn.BatchNorm1d(3)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    freeze(net)
    assert net[0] is net[2]
    assert isinstance(net[0], bnkit.BatchNorm1d)
    root = freeze(shared)
    assert isinstance(root, bnkit.BatchNorm1d)
    assert root.frozen
    assert root.weight is shared.weight


# --------------------------------------------------------------------------- modes


def mixed_model() -> nn.Sequential:
    net = nn.Sequential(
        nn.Linear(2, 3),
        nn.Sequential(nn.BatchNorm1d(3), nn.Dropout(0.5)),
        nn.BatchNorm1d(3),
    )
    net.train()
    net[1][0].eval()  # a deliberately frozen-by-mode layer inside a training block
    net[2].eval()
    return net


def flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


Manager = Callable[[nn.Module], AbstractContextManager[nn.Module]]


@pytest.mark.parametrize(("manager", "inside"), [(eval_mode, False), (train_mode, True)])
def test_mode_managers_restore_every_modules_flag(manager: Manager, inside: bool) -> None:
    net = mixed_model()
    before = flags(net)
    assert len(set(before)) == 2  # really mixed
    with manager(net) as yielded:
        assert yielded is net
        assert flags(net) == [inside] * len(before)
    assert flags(net) == before
    seen: list[list[bool]] = []

    def fail() -> None:
        with manager(net):
            seen.append(flags(net))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail()
    assert seen == [[inside] * len(before)]
    assert flags(net) == before


def test_mode_managers_nest_and_eval_mode_gives_eval_outputs() -> None:
    net = randomize(mixed_model().double())
    reference = copy.deepcopy(net).eval()
    before = flags(net)
    x = torch.randn(4, 2, dtype=torch.float64)
    with eval_mode(net):
        torch.testing.assert_close(net(x), reference(x), rtol=0, atol=0)
        with train_mode(net):
            assert all(flags(net))
        assert not any(flags(net))
    assert flags(net) == before
    assert torch.equal(net[2].running_mean, reference[2].running_mean)


# --------------------------------------------------------------------------------- fold


class Residual(nn.Module):
    """A pre-activation block: conv output used by the norm and by the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = bnkit.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))  # foldable: conv1 feeds only bn1
        z = self.conv2(y)
        return self.bn2(z) + z  # conv2's output also feeds the sum: not foldable


class Channels(nn.Module):
    """Every layer kind and norm flavour the fold supports, plus some it must leave alone."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 3, dilation=2, padding=2, padding_mode="circular")
        self.n1 = nn.BatchNorm1d(4, affine=False)
        self.c3 = nn.Conv3d(4, 6, (1, 2, 2), groups=2, bias=False)
        self.n3 = bnkit.BatchNorm3d(6, activation="relu")
        self.t2 = nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2)
        self.n2 = bnkit.from_keras(4, axis=1)  # channels-first preset
        self.c2 = nn.Conv2d(4, 4, 1, padding_mode="reflect")
        self.k2 = bnkit.BatchNorm(4, activation=nn.PReLU(4))  # a module activation
        self.lin = nn.Linear(4, 5, bias=False)
        self.ln = bnkit.from_keras(5)  # channels-last: Linear's features on the last axis
        self.lin2 = nn.Linear(5, 3)
        elu = functools.partial(F.elu, alpha=0.5)
        self.ln2 = bnkit.BatchNorm(3, axis=-1, center=False, activation=elu)
        self.stats_free = nn.BatchNorm1d(3, track_running_stats=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.n1(self.c1(x))  # (N, 4, L)
        h = self.n3(self.c3(h.unsqueeze(2).unsqueeze(3).expand(-1, -1, 1, 2, -1)))
        h = self.n2(self.t2(h.squeeze(2)))
        h = self.k2(self.c2(h))  # (N, 4, H, W)
        seq = h.flatten(2).transpose(1, 2)  # (N, H·W, 4): channels last
        out = self.ln2(self.lin2(self.ln(self.lin(seq))))
        return self.stats_free(out.mean(1))


def check_fold(model: nn.Module, x: Tensor, atol: float = 1e-10) -> FoldReport:
    model.eval()
    state = clone_state(model)
    expected = model(x)
    result = fold(model)
    assert isinstance(result, FoldResult)
    folded, report = result
    assert folded is not model
    assert not folded.training
    assert all(not m.training for m in folded.modules())
    torch.testing.assert_close(folded(x), expected, rtol=0, atol=atol)
    assert_state(model, state)  # the original is untouched
    return report


def test_fold_residual_block_folds_only_the_exclusive_pair() -> None:
    block = randomize(Residual().double())
    block.train()
    modes = flags(block)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    report = check_fold(copy.deepcopy(block), x)
    assert [(p.layer, p.norm, p.replaced_by) for p in report.folded] == [
        ("conv1", "bn1", "Identity()")
    ]
    assert len(report.skipped) == 1
    skip = report.skipped[0]
    assert (skip.norm, skip.layer) == ("bn2", "conv2")
    assert "also feeds add" in skip.reason
    assert report.dataflow == "fx"
    folded = fold(block).model
    assert flags(block) == modes  # the original keeps its modes
    assert isinstance(folded.bn1, nn.Identity)
    assert isinstance(folded.bn2, bnkit.BatchNorm2d)
    assert folded.conv1.bias is not None  # a bias was created
    assert block.conv1.bias is None


def test_fold_every_layer_kind_matches_the_unfolded_model() -> None:
    model = randomize(Channels().double())
    x = torch.randn(3, 3, 6, dtype=torch.float64)
    report = check_fold(model, x)
    folded = {p.norm: (p.layer, p.replaced_by) for p in report.folded}
    assert folded == {
        "n1": ("c1", "RankCheck(rank=3)"),  # BatchNorm1d also takes 2-D input
        "n3": ("c3", "ReLU()"),
        "n2": ("t2", "RankCheck(rank=4)"),  # generic layer: any rank
        "k2": ("c2", "Sequential(\n  (0): RankCheck(rank=4)\n  (1): PReLU(num_parameters=4)\n)"),
        "ln": ("lin", "Identity()"),
        "ln2": ("lin2", "Activation(elu, alpha=0.5)"),
    }
    assert [(s.norm, s.layer) for s in report.skipped] == [("stats_free", None)]
    assert "track_running_stats=False" in report.skipped[0].reason


def test_fold_float32_within_1e_5_and_keeps_dtype_and_requires_grad() -> None:
    model = randomize(Channels())
    model.lin.weight.requires_grad_(False)
    x = torch.randn(4, 3, 6)
    report = check_fold(model, x, atol=1e-5)
    assert len(report.folded) == 6
    folded = fold(model).model
    assert folded.lin.weight.dtype == torch.float32
    assert folded.lin.bias is not None
    assert not folded.lin.weight.requires_grad
    assert not folded.lin.bias.requires_grad
    assert folded.c2.weight.requires_grad


def test_fold_weights_match_the_closed_form() -> None:
    conv = nn.Conv2d(2, 3, 1, bias=True).double()
    bn = randomize(nn.BatchNorm2d(3).double())
    folded = fold(nn.Sequential(conv, bn)).model[0]
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(folded.weight, conv.weight * s.view(3, 1, 1, 1))
    torch.testing.assert_close(folded.bias, (conv.bias - bn.running_mean) * s + bn.bias)


def test_fold_rank_check_refuses_inputs_where_the_fold_would_be_wrong() -> None:
    # Linear + BatchNorm1d on (N, L, C) input with L == C: the norm's axis 1 is L, not the
    # Linear's features, so folding is wrong there; the RankCheck stops it.
    net = randomize(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).double()).eval()
    folded = fold(net).model
    assert isinstance(folded[1], RankCheck)
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(folded(x), net(x), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="assuming 2-D input"):
        folded(torch.randn(5, 4, 4, dtype=torch.float64))


def test_fold_report_lists_reasons_for_everything_left_in_place() -> None:
    class Misc(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.after_relu = nn.BatchNorm2d(3)
            self.twice = nn.BatchNorm2d(3)
            self.lin = nn.Linear(4, 3)
            self.wrong_axis = nn.BatchNorm2d(3)  # (N, 3, 4, 3): axis 1 is not the features
            self.hooked_conv = nn.Conv2d(3, 3, 1)
            self.hooked_norm = nn.BatchNorm2d(3)
            self.unused = nn.BatchNorm2d(3)

        def forward(self, x: Tensor) -> Tensor:
            h = self.after_relu(F.relu(self.conv(x)))
            h = self.twice(self.twice(h))
            h = self.hooked_norm(self.hooked_conv(h))
            return self.wrong_axis(self.lin(h))

    model = randomize(Misc().double())
    model.hooked_conv.register_forward_hook(lambda *args: None)
    report = check_fold(model, torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert report.folded == ()
    reasons = {s.norm: s.reason for s in report.skipped}
    assert list(reasons) == [
        "after_relu",
        "twice",
        "wrong_axis",
        "hooked_norm",
        "unused",
    ]
    assert "its input comes from relu" in reasons["after_relu"]
    assert "called 2 times" in reasons["twice"]
    assert "takes only 4-D input" in reasons["wrong_axis"]
    assert "hooks (forward_hooks)" in reasons["hooked_norm"]
    assert "not called in forward" in reasons["unused"]
    text = str(report)
    assert text.splitlines()[0] == (
        "bnkit.fold: folded 0 batch-norm layer(s), left 5 in place (dataflow: torch.fx)"
    )
    assert "  - twice: it is called 2 times" in text


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.side = nn.Conv2d(4, 4, 1)
        self.side_bn = nn.BatchNorm2d(4)  # not in a Sequential: unknown dataflow
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(36, 2), bnkit.BatchNorm1d(2))

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        if h.sum() > 0:
            h = self.side_bn(self.side(h))
        return self.head(h)


def test_fold_falls_back_to_sequential_adjacency_when_tracing_fails() -> None:
    model = randomize(Branchy().double())
    x = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    report = check_fold(model, x)
    assert report.dataflow == "sequential"
    assert [(p.layer, p.norm) for p in report.folded] == [
        ("stem.0", "stem.1"),
        ("head.1", "head.2"),
    ]
    assert [s.norm for s in report.skipped] == ["side_bn"]
    assert "nn.Sequential" in report.skipped[0].reason
    assert any("torch.fx could not trace" in note for note in report.notes)
    text = str(report)
    assert "(dataflow: nn.Sequential adjacency only)" in text
    assert "notes:" in text


def test_fold_sequential_fallback_refuses_layers_registered_twice() -> None:
    shared = nn.Conv2d(3, 3, 1)
    model = Branchy()
    model.stem = nn.Sequential(shared, nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3))
    model.extra = nn.Sequential(shared)
    report = fold(model).report
    assert report.dataflow == "sequential"
    assert report.skipped[0].norm == "stem.1"
    assert "registered at several places" in report.skipped[0].reason


def test_fold_frozen_layers_and_root_norm() -> None:
    net = freeze(randomize(nn.Sequential(nn.Conv1d(2, 3, 1), nn.BatchNorm1d(3)).double()))
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    report = check_fold(net, x)
    assert [p.norm for p in report.folded] == ["1"]
    root = fold(nn.BatchNorm1d(3))
    assert isinstance(root.model, nn.BatchNorm1d)
    assert root.report.folded == ()
    assert "the model is this batch-norm layer" in root.report.skipped[0].reason
