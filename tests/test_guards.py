"""The lifecycle guards: no-grad training, non-finite statistics, one value per channel, frozen
layers, half precision — and the policies that choose what each one does."""

from __future__ import annotations

import warnings

import pytest
import torch

import bnkit
from bnkit.policies import BatchNormWarning, calibrating, name_layers


def _stats(layer: bnkit.BatchNorm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _assert_same(before: dict[str, torch.Tensor], layer: bnkit.BatchNorm) -> None:
    after = layer.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


@pytest.fixture(autouse=True)
def _default_policies():
    bnkit.set_policy()
    yield
    bnkit.set_policy()


# ------------------------------------------------------------ no-grad training


def test_training_under_no_grad_warns_once_per_layer_with_the_fix() -> None:
    model = torch.nn.Sequential(bnkit.BatchNorm(3), bnkit.BatchNorm(3))
    name_layers(model)
    x = torch.randn(4, 3)
    with torch.no_grad(), pytest.warns(BatchNormWarning, match="model.eval") as record:
        model(x)
    assert len(record) == 2  # one per layer
    assert "'0'" in str(record[0].message)
    assert "'1'" in str(record[1].message)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)  # once per layer: silent now


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_policy_raise_stops_no_grad_training(context: str) -> None:
    layer = bnkit.BatchNorm(3, policy={"no_grad_training": "raise"})
    before = _stats(layer)
    block = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with block, pytest.raises(RuntimeError, match=r"training mode under torch\.no_grad"):
        layer(torch.randn(4, 3))
    _assert_same(before, layer)


def test_no_grad_warning_is_silent_where_it_is_meant() -> None:
    layer = bnkit.BatchNorm(3)
    x = torch.randn(4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad(), calibrating():
            layer(x)  # recalibration
        with torch.no_grad(), bnkit.policy(no_grad_training="ignore"):
            layer(x)
        layer.eval()
        with torch.no_grad():
            layer(x)  # evaluation, as it should be
        layer.train()
        layer(x)  # training with autograd on
        no_stats = bnkit.BatchNorm(3, track_running_stats=False)
        with torch.no_grad():
            no_stats(x)  # nothing to corrupt
    assert int(layer.num_batches_tracked) == 3


def test_policy_precedence_layer_then_block_then_global() -> None:
    bnkit.set_policy(no_grad_training="raise")
    own = bnkit.BatchNorm(3, policy={"no_grad_training": "ignore"})
    plain = bnkit.BatchNorm(3)
    x = torch.randn(4, 3)
    with torch.no_grad():
        own(x)  # the layer's own setting wins
        with pytest.raises(RuntimeError):
            plain(x)
        with bnkit.policy(no_grad_training="ignore"):
            plain(x)  # the block's wins over the global one
    assert bnkit.get_policy("no_grad_training") == "raise"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"nonfinite": "ignore"}, "not one of"), ({"nan": "skip"}, "unknown policy")],
)
def test_bad_policies_are_refused(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        bnkit.set_policy(**kwargs)
    with pytest.raises(ValueError, match=match):
        bnkit.BatchNorm(3, policy=kwargs)


# ------------------------------------------------------------ non-finite statistics

LAYERS = {
    "torch-rule": lambda: bnkit.BatchNorm(3),  # PyTorch's kernel updates the buffers
    "biased-decay": lambda: bnkit.BatchNorm(3, decay=0.9, running_var="biased"),
    "zero-debias": lambda: bnkit.BatchNorm(3, decay=0.9, zero_debias="both"),
    "renorm": lambda: bnkit.BatchNorm(3, renorm=True),
    "warmup-weights": lambda: bnkit.BatchNorm(3, decay=0.99, warmup=True),
}


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
def test_nonfinite_batch_leaves_the_statistics_and_counts_the_skip(make) -> None:
    layer = make()
    layer(torch.randn(8, 3))
    before = _stats(layer)
    bad = torch.randn(8, 3)
    bad[2, 1] = float("nan")
    with pytest.warns(BatchNormWarning, match="non-finite"):
        layer(bad)
    _assert_same(before, layer)  # every statistic, num_batches_tracked included
    assert int(layer.num_skipped_updates) == 1
    bad[0, 0] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once already
        layer(bad)
    assert int(layer.num_skipped_updates) == 2
    layer(torch.randn(8, 3))  # a good batch updates again
    assert int(layer.num_batches_tracked) == 2


def test_nonfinite_policy_raise_and_update() -> None:
    bad = torch.randn(8, 3)
    bad[0, 0] = float("nan")
    strict = bnkit.BatchNorm(3, policy={"nonfinite": "raise"})
    before = _stats(strict)
    with pytest.raises(FloatingPointError, match="non-finite"):
        strict(bad)
    _assert_same(before, strict)
    torch_like = bnkit.BatchNorm(3, policy={"nonfinite": "update"})
    torch_like(bad)
    assert torch.isnan(torch_like.running_mean[0])
    assert "num_skipped_updates" not in torch_like.state_dict()


def test_skip_counter_is_saved_and_loaded() -> None:
    layer = bnkit.BatchNorm2d(3)
    bad = torch.randn(4, 3, 2, 2)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.warns(BatchNormWarning):
        layer(bad)
    state = layer.state_dict()
    assert int(state["num_skipped_updates"]) == 1
    fresh = bnkit.BatchNorm2d(3)
    fresh.load_state_dict(state)
    assert int(fresh.num_skipped_updates) == 1
    # A plain torch state (no counter) still loads strictly into a fresh layer.
    bnkit.BatchNorm2d(3).load_state_dict(torch.nn.BatchNorm2d(3).state_dict())


def test_already_nonfinite_statistics_are_reported_as_such() -> None:
    layer = bnkit.BatchNorm(2)
    with torch.no_grad():
        layer.running_var.fill_(float("nan"))
    with pytest.warns(BatchNormWarning, match="already non-finite"):
        layer(torch.randn(4, 2))


# ------------------------------------------------------------ one value per channel


def test_one_value_per_channel_raises_by_default_with_the_policies_in_the_fix() -> None:
    with pytest.raises(ValueError, match="more than 1 value per channel") as info:
        bnkit.BatchNorm(3)(torch.randn(1, 3))
    assert "single_value='running'" in str(info.value)
    ghost = bnkit.BatchNorm(3, virtual_batch_size=1)
    with pytest.raises(ValueError, match="ghost batch of 1"):
        ghost(torch.randn(4, 3))


@pytest.mark.parametrize("ghosts", [False, True], ids=["batch-of-one", "ghost-of-one"])
def test_single_value_policy_running(ghosts: bool) -> None:
    layer = bnkit.BatchNorm(
        3, policy={"single_value": "running"}, virtual_batch_size=1 if ghosts else None
    )
    layer(torch.randn(8, 3))  # a normal batch of 8 (ghosts of 1 when ghosts=True: see below)
    x = torch.randn(1, 3) if not ghosts else torch.randn(4, 3)
    before = _stats(layer)
    y = layer(x)
    _assert_same(before, layer)
    expected = (x - layer.running_mean) / (layer.running_var + layer.eps).sqrt()
    expected = expected * layer.weight + layer.bias
    torch.testing.assert_close(y, expected)


def test_single_value_policy_skip_update() -> None:
    layer = bnkit.BatchNorm(3, policy={"single_value": "skip-update"})
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
        layer.weight.fill_(3.0)
    before = _stats(layer)
    x = torch.randn(1, 3, requires_grad=True)
    y = layer(x)
    # Batch statistics of a single value: x̂ = 0, so the output is β.
    torch.testing.assert_close(y, layer.bias.detach().expand(1, 3))
    y.sum().backward()
    assert x.grad is not None
    _assert_same(before, layer)


# ------------------------------------------------------------------ frozen


def test_frozen_layer_uses_running_statistics_in_training_and_round_trips() -> None:
    layer = bnkit.BatchNorm2d(3)
    for _ in range(3):
        layer(torch.randn(4, 3, 2, 2) * 2 + 1)
    layer.frozen = True
    layer.train()
    before = _stats(layer)
    x = torch.randn(4, 3, 2, 2)
    y = layer(x)
    _assert_same(before, layer)
    layer.eval()
    torch.testing.assert_close(y, layer(x))
    state = layer.state_dict()
    assert "frozen" in state
    fresh = bnkit.BatchNorm2d(3)
    fresh.load_state_dict(state)
    assert fresh.frozen
    # Plain weights loaded into a frozen layer keep it frozen.
    plain = torch.nn.BatchNorm2d(3).state_dict()
    fresh.load_state_dict(plain)
    assert fresh.frozen
    fresh.frozen = False
    assert "frozen" not in fresh.state_dict()
    with pytest.raises(ValueError, match="cannot be frozen"):
        bnkit.BatchNorm(3, track_running_stats=False).frozen = True


# ------------------------------------------------------------- half precision


def test_float16_layer_keeps_float32_statistics_that_do_not_overflow() -> None:
    layer = bnkit.BatchNorm(2, dtype=torch.float16, momentum=1.0)
    x = (torch.randn(64, 2) * 1000).half()  # variance ~1e6 > float16's max 65504
    y = layer(x)
    assert y.dtype == torch.float16
    assert layer.running_var.dtype == torch.float32
    assert torch.isfinite(layer.running_var).all()
    expected = x.double().var(0, unbiased=True)
    torch.testing.assert_close(layer.running_var.double(), expected, rtol=1e-3, atol=0)
    assert y.float().std(0).sub(1).abs().max() < 0.05


def test_autocast_bfloat16_on_cpu() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), bnkit.BatchNorm(3))
    reference = torch.nn.Sequential(torch.nn.Linear(4, 3), bnkit.BatchNorm(3))
    reference.load_state_dict(model.state_dict())
    x = torch.randn(32, 4) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().sum().backward()
    reference(x)
    assert model[1].running_mean.dtype == torch.float32
    torch.testing.assert_close(
        model[1].running_mean, reference[1].running_mean, rtol=0.05, atol=0.05
    )
    assert model[0].weight.grad is not None
    assert torch.isfinite(model[0].weight.grad).all()


def test_warnings_name_the_layer_by_its_path_without_name_layers() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Sequential(bnkit.BatchNorm(3)))
    with torch.no_grad(), pytest.warns(BatchNormWarning, match=r"BatchNorm\(3\) '1\.0'"):
        model(torch.randn(4, 4))
