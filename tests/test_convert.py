"""Tests for bnkit.convert: convert (torch.nn -> bnkit) and to_torch (bnkit -> torch.nn).

Oracles: the torch.nn model itself (bnkit's default configuration is bit-identical to
torch.nn.BatchNorm*d, so a converted model must reproduce it exactly, in training and in
evaluation, including the running statistics), and closed-form float64 moving averages for
options that change the numerics.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

import bnkit
from bnkit.convert import convert, to_torch

TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class Net(nn.Module):
    """Conv + BN + ReLU, Linear + BN, nested Sequential and ModuleDict, one of each flavour."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Sequential(
                nn.Conv2d(6, 4, 3, bias=False),
                nn.BatchNorm2d(4, momentum=None, bias=False),  # cumulative average, no β
                nn.ReLU(),
            ),
        )
        self.bn3d = nn.BatchNorm3d(4, eps=1e-3, momentum=0.3)
        self.heads = nn.ModuleDict(
            {
                "a": nn.Sequential(nn.Linear(16, 5), nn.BatchNorm1d(5, affine=False)),
                "b": nn.Sequential(nn.Linear(16, 5), nn.BatchNorm1d(5, track_running_stats=False)),
            }
        )
        self.proj = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)  # (N, 4, 2, 2)
        flat = h.flatten(1)
        volume = self.bn3d(h.unsqueeze(2)).flatten(1)
        return self.heads["a"](flat) + self.heads["b"](flat) + self.proj(volume)


NET_INPUT = (8, 3, 6, 6)


def batches(
    n: int,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    shape: tuple[int, ...] = NET_INPUT,
) -> Iterator[Tensor]:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)


def trained_net(dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(0)
    net = Net().to(dtype)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for x in batches(3, dtype=dtype, seed=1):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    return net


def bn_paths(model: nn.Module) -> dict[str, type[nn.Module]]:
    return {
        name: type(m)
        for name, m in model.named_modules()
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, bnkit.BatchNorm))
    }


def structure(model: nn.Module) -> list[tuple[str, int]]:
    """Every module's path and identity: equal before/after means the model was not touched."""
    return [(name, id(m)) for name, m in model.named_modules()]


def assert_state_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert sa[key].device == sb[key].device, key
        assert torch.equal(sa[key], sb[key]), key


def assert_same_run(
    reference: nn.Module,
    other: nn.Module,
    *,
    steps: int = 2,
    shape: tuple[int, ...] = NET_INPUT,
) -> None:
    """Train both for a few steps and evaluate: every output, gradient and state must match."""
    dtype = next(reference.parameters()).dtype
    opt_r = torch.optim.SGD(reference.parameters(), lr=0.05)
    opt_o = torch.optim.SGD(other.parameters(), lr=0.05)
    reference.train()
    other.train()
    for x in batches(steps, dtype=dtype, seed=7, shape=shape):
        opt_r.zero_grad()
        opt_o.zero_grad()
        y_r, y_o = reference(x), other(x)
        assert torch.equal(y_r, y_o)
        y_r.square().mean().backward()
        y_o.square().mean().backward()
        grads_r = {n: p.grad for n, p in reference.named_parameters()}
        grads_o = {n: p.grad for n, p in other.named_parameters()}
        assert list(grads_r) == list(grads_o)
        for name, grad in grads_r.items():
            assert grad is not None
            assert torch.equal(grad, grads_o[name]), name
        opt_r.step()
        opt_o.step()
        assert_state_equal(reference, other)
    reference.eval()
    other.eval()
    x = next(batches(1, dtype=dtype, seed=8, shape=shape))
    assert torch.equal(reference(x), other(x))


# ----------------------------------------------------------------------------- convert


def test_convert_replaces_every_layer_with_the_bnkit_equivalent() -> None:
    net = trained_net()
    before = bn_paths(net)
    out = convert(net)
    assert out is net
    after = bn_paths(net)
    assert list(after) == list(before)
    assert len(after) == 5
    expected = {
        nn.BatchNorm1d: bnkit.BatchNorm1d,
        nn.BatchNorm2d: bnkit.BatchNorm2d,
        nn.BatchNorm3d: bnkit.BatchNorm3d,
    }
    for path, cls in before.items():
        assert after[path] is expected[cls], path
    # Other modules are the same objects.
    assert isinstance(net.features[0], nn.Conv2d)
    assert isinstance(net.heads["a"][0], nn.Linear)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_converted_model_is_bit_identical_in_training_and_evaluation(dtype: torch.dtype) -> None:
    reference = trained_net(dtype)
    converted = convert(copy.deepcopy(reference))
    assert_state_equal(reference, converted)
    assert_same_run(reference, converted, steps=3)


def test_convert_keeps_parameters_buffers_and_flags() -> None:
    net = trained_net()
    old = dict(net.named_modules())
    net.features[1].weight.requires_grad_(False)
    net.bn3d.bias.requires_grad_(False)
    values = {k: v.clone() for k, v in net.state_dict().items()}
    convert(net)
    new = dict(net.named_modules())
    for path in bn_paths(net):
        o, n = old[path], new[path]
        assert n is not o
        for name in ("weight", "bias"):
            # The same Parameter objects: optimizers that hold them keep working.
            assert getattr(n, name) is getattr(o, name), (path, name)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert getattr(n, name) is getattr(o, name), (path, name)
        assert n.eps == o.eps
        assert n.momentum == o.momentum
        assert n.track_running_stats == o.track_running_stats
        assert n.num_features == o.num_features
    assert not net.features[1].weight.requires_grad
    assert net.features[1].bias.requires_grad
    assert not net.bn3d.bias.requires_grad
    assert net.bn3d.weight.requires_grad
    assert list(net.state_dict()) == list(values)
    for key, value in net.state_dict().items():
        assert torch.equal(value, values[key]), key


def test_convert_keeps_momentum_none_affine_false_and_no_running_stats() -> None:
    net = convert(trained_net())
    cumulative = net.features[3][1]
    assert cumulative.momentum is None
    assert cumulative.weight is not None
    assert cumulative.bias is None
    assert (cumulative.center, cumulative.scale) == (False, True)
    assert int(cumulative.num_batches_tracked) == 3
    no_affine = net.heads["a"][1]
    assert no_affine.weight is None
    assert no_affine.bias is None
    assert no_affine.running_mean is not None
    no_stats = net.heads["b"][1]
    assert not no_stats.track_running_stats
    assert no_stats.running_mean is None
    assert no_stats.running_var is None
    assert no_stats.num_batches_tracked is None
    assert net.bn3d.eps == 1e-3
    assert net.bn3d.momentum == 0.3


def test_convert_keeps_each_layers_training_mode() -> None:
    net = trained_net()
    net.train()
    net.features[1].eval()
    net.heads["a"].eval()  # the Linear and its BN
    modes = {name: m.training for name, m in net.named_modules()}
    convert(net)
    assert {name: m.training for name, m in net.named_modules()} == modes
    assert not net.features[1].training
    assert net.features[3][1].training


def test_convert_keeps_device_and_dtype() -> None:
    net = convert(trained_net(torch.float64))
    for path in bn_paths(net):
        for name, t in [
            *net.get_submodule(path).named_parameters(),
            *net.get_submodule(path).named_buffers(),
        ]:
            expected = torch.long if name == "num_batches_tracked" else torch.float64
            assert t.dtype == expected, (path, name)
    meta = nn.Sequential(nn.BatchNorm2d(3, device="meta", dtype=torch.float64))
    converted = convert(meta)[0]
    assert isinstance(converted, bnkit.BatchNorm2d)
    for t in [*converted.parameters(), *converted.buffers()]:
        assert t.device.type == "meta"
    assert converted.weight.dtype == torch.float64


def test_convert_half_precision_keeps_float32_statistics_and_round_trips() -> None:
    torch.manual_seed(3)
    bn = nn.BatchNorm2d(3).to(torch.bfloat16)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(3))
        bn.running_var.copy_(torch.rand(3) + 0.5)
    converted = convert(copy.deepcopy(bn))
    assert converted.weight.dtype == torch.bfloat16
    assert converted.running_mean.dtype == torch.float32
    assert torch.equal(converted.running_mean, bn.running_mean.float())
    assert torch.equal(converted.running_var, bn.running_var.float())
    back = to_torch(converted)
    assert type(back) is nn.BatchNorm2d
    assert_state_equal(bn, back)


def test_convert_applies_options_to_every_layer() -> None:
    net = convert(trained_net(), running_var="biased", eps=1e-4)
    layers = [m for m in net.modules() if isinstance(m, bnkit.BatchNorm)]
    assert len(layers) == 5
    for layer in layers:
        assert layer.running_var_mode == "biased"
        assert layer.eps == 1e-4


def test_convert_running_var_biased_matches_closed_form() -> None:
    torch.manual_seed(4)
    bn = nn.BatchNorm1d(3, dtype=torch.float64)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([1.5, 0.25, 4.0]))
    old_mean, old_var = bn.running_mean.clone(), bn.running_var.clone()
    converted = convert(bn, running_var="biased")
    x = torch.randn(10, 3, dtype=torch.float64) * 3 + 1
    converted(x)
    mean = x.sum(0) / 10
    biased = ((x - mean) ** 2).sum(0) / 10
    torch.testing.assert_close(converted.running_mean, 0.9 * old_mean + 0.1 * mean)
    torch.testing.assert_close(converted.running_var, 0.9 * old_var + 0.1 * biased)


def test_convert_decay_option_overrides_momentum_including_none() -> None:
    net = convert(trained_net(), decay=0.99)
    for layer in (m for m in net.modules() if isinstance(m, bnkit.BatchNorm)):
        assert layer.decay == pytest.approx(0.99)
    assert net.features[3][1].momentum == pytest.approx(0.01)


def test_convert_activation_option_and_module_options_are_copied_per_layer() -> None:
    torch.manual_seed(5)
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([-1.0, 0.0, 1.0]))
    x = torch.randn(2, 3, 4, 4)
    expected = torch.relu(bn(x))
    relu_bn = convert(copy.deepcopy(bn), activation="relu")
    assert torch.equal(relu_bn(x), expected)

    prelu = nn.PReLU()
    net = convert(nn.Sequential(nn.BatchNorm1d(2), nn.BatchNorm1d(2)), activation=prelu)
    assert isinstance(net[0].activation, nn.PReLU)
    assert net[0].activation is not prelu
    assert net[0].activation is not net[1].activation


def test_convert_renorm_statistics_start_from_running_statistics() -> None:
    torch.manual_seed(6)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(4))
        bn.running_var.copy_(torch.rand(4) + 0.1)
    converted = convert(copy.deepcopy(bn), renorm=True)
    root = bn.running_var.sqrt()
    assert torch.equal(converted.renorm_mean, bn.running_mean)
    assert torch.equal(converted.renorm_stddev, root)
    assert torch.equal(converted.running_stddev, root)
    x = torch.randn(3, 4, 2, 2)
    assert torch.equal(converted.eval()(x), bn.eval()(x))


def test_convert_root_batch_norm_returns_a_new_module() -> None:
    bn = nn.BatchNorm2d(3)
    out = convert(bn)
    assert type(out) is bnkit.BatchNorm2d
    assert type(bn) is nn.BatchNorm2d
    assert out.weight is bn.weight


def test_convert_materialized_lazy_layer() -> None:
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.LazyBatchNorm2d())
    x = torch.randn(4, 2, 3, 3)
    net(x)
    reference = copy.deepcopy(net)
    convert(net)
    assert type(net[1]) is bnkit.BatchNorm2d
    assert net[1].num_features == 3
    assert_same_run(reference, net, shape=(4, 2, 3, 3))


def test_convert_refuses_uninitialized_lazy_layer_without_touching_the_model() -> None:
    net = nn.Sequential(nn.BatchNorm1d(3), nn.Sequential(nn.LazyBatchNorm2d()))
    before = structure(net)
    with pytest.raises(ValueError, match=r"1\.0.*forward pass first"):
        convert(net)
    assert structure(net) == before
    assert type(net[0]) is nn.BatchNorm1d


def test_convert_sync_batch_norm_keeps_synchronization_in_a_generic_batch_norm() -> None:
    torch.manual_seed(7)
    group = object()  # stands in for a process group: carried over by identity
    net = nn.Sequential(nn.Linear(3, 4), nn.Sequential(OrderedDict(sync=nn.SyncBatchNorm(4))))
    net[1].sync.process_group = group
    reference = copy.deepcopy(net)
    convert(net)  # filterwarnings=error: no warning any more
    layer = net[1].sync
    assert type(layer) is bnkit.BatchNorm
    assert layer.axis == 1
    assert layer.sync
    assert layer.process_group is group
    # Outside torch.distributed a synchronized layer is a plain one (tests/test_distributed.py
    # checks the synchronization itself).
    # Any rank >= 2, as SyncBatchNorm: (N, C) through the net, and (N, C, L) directly.
    assert_same_run(reference, net, shape=(6, 3))
    x = torch.randn(5, 4, 3)
    assert torch.equal(layer.eval()(x), reference[1].sync.eval()(x))


def test_convert_sync_option_turns_synchronization_on_or_off() -> None:
    net = nn.Sequential(nn.BatchNorm2d(3), nn.SyncBatchNorm(3))
    synced = convert(copy.deepcopy(net), sync=True)
    assert [m.sync for m in synced] == [True, True]
    assert [m.process_group for m in synced] == [None, None]
    plain = convert(copy.deepcopy(net), sync=False)  # explicit: SyncBatchNorm's is dropped
    assert [m.sync for m in plain] == [False, False]
    group = object()
    grouped = convert(copy.deepcopy(net), sync=True, process_group=group)
    assert all(m.process_group is group for m in grouped)
    with pytest.raises(ValueError, match=r"process_group.*sync=True"):
        convert(copy.deepcopy(net), process_group=group)


def test_convert_refuses_hooks_without_touching_the_model() -> None:
    net = trained_net()
    net.bn3d.register_forward_hook(lambda *args: None)
    before = structure(net)
    with pytest.raises(ValueError, match=r"bn3d \(BatchNorm3d\): forward_hooks"):
        convert(net)
    assert structure(net) == before


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"running_var": "bogus"}, ValueError, "running_var"),
        ({"momentum": 0.1, "decay": 0.9}, ValueError, "not both"),
        ({"activation": "swish-ish"}, ValueError, "unknown activation"),
        ({"no_such_option": 1}, TypeError, "no_such_option"),
        ({"affine": False}, TypeError, "affine"),
        ({"axis": -1}, TypeError, "axis"),
        ({"weight_init": 0.0}, TypeError, "weight_init"),
    ],
)
def test_invalid_options_raise_before_the_model_is_touched(
    options: dict[str, object], error: type[Exception], match: str
) -> None:
    net = trained_net()
    before = structure(net)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(error, match=match):
        convert(net, **options)
    assert structure(net) == before
    assert_state_equal(net, _loaded(state))


def _loaded(state: dict[str, Tensor]) -> Net:
    net = Net()
    net.load_state_dict(state)
    return net


@pytest.mark.parametrize(
    ("options", "match"),
    [
        # renorm needs running statistics; heads.b.1 keeps none.
        ({"renorm": True}, r"heads\.b\.1 \(BatchNorm1d\).*track_running_stats"),
        # warmup reshapes an exponential decay; features.3.1 has momentum=None.
        ({"warmup": True}, r"features\.3\.1 \(BatchNorm2d\).*momentum=None"),
    ],
)
def test_invalid_option_for_one_layer_changes_nothing(options: dict[str, bool], match: str) -> None:
    net = trained_net()
    before = structure(net)
    with pytest.raises(ValueError, match=match):
        convert(net, **options)
    assert structure(net) == before
    assert all(issubclass(cls, TORCH_BN) for cls in bn_paths(net).values())


def test_convert_leaves_bnkit_layers_alone_even_with_options() -> None:
    own = bnkit.BatchNorm2d(3, warmup=True)
    net = nn.Sequential(own, nn.BatchNorm2d(3))
    convert(net, running_var="biased")
    assert net[0] is own
    assert own.running_var_mode == "unbiased"
    assert net[1].running_var_mode == "biased"


def test_convert_shared_layer_is_replaced_by_one_layer_everywhere() -> None:
    shared = nn.BatchNorm1d(3)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    convert(net)
    assert type(net[0]) is bnkit.BatchNorm1d
    assert net[0] is net[2]


def test_convert_warns_about_unknown_subclasses_and_leaves_them() -> None:
    class ActBN(nn.BatchNorm2d):
        def forward(self, x: Tensor) -> Tensor:
            return torch.relu(super().forward(x))

    custom = ActBN(3)
    net = nn.Sequential(custom, nn.BatchNorm2d(3))
    with pytest.warns(UserWarning, match=r"0 \(ActBN\)"):
        convert(net)
    assert net[0] is custom
    assert type(net[1]) is bnkit.BatchNorm2d


def test_convert_model_without_batch_norm_is_unchanged() -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    before = structure(net)
    assert convert(net, running_var="biased") is net
    assert structure(net) == before


# ---------------------------------------------------------------------------- to_torch


def test_round_trip_is_bit_identical_to_the_original() -> None:
    reference = trained_net()
    back = to_torch(convert(copy.deepcopy(reference)))
    assert bn_paths(back) == bn_paths(reference)
    for path, module in dict(back.named_modules()).items():
        ref = reference.get_submodule(path)
        assert type(module) is type(ref), path
        if isinstance(ref, nn.modules.batchnorm._BatchNorm):
            assert module.momentum == ref.momentum
            assert module.eps == ref.eps
            assert module.affine == ref.affine
            assert module.track_running_stats == ref.track_running_stats
            assert (module.bias is None) == (ref.bias is None)
    assert_state_equal(reference, back)
    assert_same_run(reference, back)


def test_to_torch_keeps_parameters_flags_and_modes() -> None:
    net = convert(trained_net())
    net.features[1].eval()
    net.features[1].weight.requires_grad_(False)
    old = dict(net.named_modules())
    to_torch(net)
    for path in bn_paths(net):
        new = net.get_submodule(path)
        assert isinstance(new, TORCH_BN)
        assert new.training == old[path].training
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert getattr(new, name) is getattr(old[path], name), (path, name)
    assert not net.features[1].training
    assert not net.features[1].weight.requires_grad


def test_to_torch_refuses_inexpressible_layers_listing_each_path() -> None:
    net = nn.Sequential(
        nn.Sequential(bnkit.BatchNorm2d(4, running_var="biased")),
        bnkit.BatchNorm2d(4),  # expressible: must not be converted either
        nn.ModuleDict(
            {
                "renorm": bnkit.BatchNorm1d(4, renorm=True),
                "generic": bnkit.BatchNorm(4),
                "act": bnkit.BatchNorm1d(4, activation="relu"),
                "beta_only": bnkit.BatchNorm(4, center=True, scale=False),
                "last": bnkit.BatchNorm(4, axis=-1),
                "ghost": bnkit.BatchNorm3d(4, virtual_batch_size=2),
            }
        ),
    )
    before = structure(net)
    with pytest.raises(ValueError, match="nothing was converted") as info:
        to_torch(net)
    message = str(info.value)
    for fragment in (
        "0.0 (BatchNorm2d): running_var='biased'",
        "2.renorm (BatchNorm1d): renorm=True",
        "2.generic (BatchNorm): bnkit.BatchNorm accepts any input rank",
        "2.act (BatchNorm1d): activation='relu'",
        "2.beta_only (BatchNorm)",
        "center=True, scale=False",
        "2.last (BatchNorm)",
        "axis=-1",
        "2.ghost (BatchNorm3d): virtual_batch_size=2",
    ):
        assert fragment in message
    assert "\n  - 1 " not in message
    assert structure(net) == before


def test_to_torch_non_strict_converts_what_it_can() -> None:
    odd = bnkit.BatchNorm2d(4, warmup=True)
    net = nn.Sequential(odd, bnkit.BatchNorm2d(4), bnkit.BatchNorm(4))
    to_torch(net, strict=False)
    assert net[0] is odd
    assert type(net[1]) is nn.BatchNorm2d
    assert type(net[2]) is bnkit.BatchNorm


@pytest.mark.parametrize("cls", [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm])
def test_to_torch_generic_as(cls: type[nn.Module]) -> None:
    layer = bnkit.BatchNorm(4, momentum=None)
    out = to_torch(layer, generic_as=cls)
    assert type(out) is cls
    assert out.momentum is None
    assert out.weight is layer.weight


def test_to_torch_generic_as_rejects_other_classes() -> None:
    with pytest.raises(TypeError, match="generic_as"):
        to_torch(bnkit.BatchNorm(4), generic_as=nn.LayerNorm)


def test_to_torch_sync_round_trip() -> None:
    torch.manual_seed(8)
    reference = nn.Sequential(nn.Linear(3, 4), nn.SyncBatchNorm(4))
    converted = convert(copy.deepcopy(reference))
    back = to_torch(converted)  # synchronized layers go back to SyncBatchNorm by themselves
    assert type(back[1]) is nn.SyncBatchNorm
    assert_same_run(reference, back, shape=(6, 3))


def test_to_torch_scale_without_center_uses_bias_false() -> None:
    layer = bnkit.BatchNorm2d(4, bias=False)
    out = to_torch(layer)
    assert type(out) is nn.BatchNorm2d
    assert out.bias is None
    assert out.weight is layer.weight
    assert "bias" not in out.state_dict()


def test_to_torch_refuses_hooks_without_touching_the_model() -> None:
    net = nn.Sequential(bnkit.BatchNorm1d(3), bnkit.BatchNorm1d(3))
    net[1].register_forward_pre_hook(lambda *args: None)
    before = structure(net)
    with pytest.raises(ValueError, match=r"1 \(BatchNorm1d\): forward_pre_hooks"):
        to_torch(net)
    assert structure(net) == before


def test_to_torch_leaves_torch_layers_and_other_modules_alone() -> None:
    bn = nn.BatchNorm1d(3)
    net = nn.Sequential(nn.Linear(2, 3), bn)
    before = structure(net)
    assert to_torch(net) is net
    assert structure(net) == before


def test_convert_refuses_hand_edited_state_without_touching_the_model() -> None:
    flag_flipped = nn.BatchNorm2d(3)
    flag_flipped.track_running_stats = False  # buffers still there: torch still uses them
    net = nn.Sequential(nn.BatchNorm2d(3), flag_flipped)
    before = structure(net)
    with pytest.raises(ValueError, match=r"cannot convert 1 \(BatchNorm2d\).*edited by hand"):
        convert(net)
    assert structure(net) == before

    beta_only = nn.BatchNorm1d(3)
    beta_only.weight = None
    with pytest.raises(ValueError, match="bias but no weight"):
        convert(nn.Sequential(beta_only))
