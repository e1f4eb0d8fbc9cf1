"""A layer's whole step as one C++ operator call (policy ``kernels="cpp"``, eager mode).

``BatchNorm.forward`` hands a plain training step (PyTorch's running-statistics rule, fused
ReLU at most) or an inference step without gradients straight to the kernels, which also
advance ``num_batches_tracked`` and make the non-finite guard's decision. These tests check
that operator contract against closed forms, that the one-call path gives the same bits as the
general path (which runs the same kernel after its own checks and snapshots), that the
``nonfinite`` policies behave as documented, and that everything unusual still takes the
general path with its messages.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import bnkit
from bnkit import functional as bnf
from bnkit import running
from bnkit.kernels import cpp
from bnkit.policies import BatchNormWarning

F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    if not cpp.available():
        pytest.skip(f"C++ kernels cannot be built here: {cpp.build_error()}")


def _buffers(n: int = 3, dtype: torch.dtype = F64) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(5)
    mean = torch.randn(n, generator=gen, dtype=dtype)
    var = torch.rand(n, generator=gen, dtype=dtype) + 0.5
    return mean, var, torch.tensor(7)


def _step(
    x: torch.Tensor, buffers: tuple[torch.Tensor, ...], *, momentum: float = 0.1, guard: bool
) -> cpp.TrainOutput:
    """One training call that updates (running_mean, running_var, counter) in place."""
    running_mean, running_var, counter = buffers
    return cpp.train(
        x,
        running_mean=running_mean,
        running_var=running_var,
        momentum=momentum,
        num_batches_tracked=counter,
        guard=guard,
    )


# ------------------------------------------------------------------ the operator's contract


def test_counter_advances_with_the_update_closed_form() -> None:
    x = torch.randn(6, 3, 4, 5, dtype=F64)
    running_mean, running_var, counter = _buffers()
    want_mean = running_mean + 0.2 * (x.mean((0, 2, 3)) - running_mean)
    want_var = running_var + 0.2 * (x.var((0, 2, 3), correction=1) - running_var)
    out = _step(x, (running_mean, running_var, counter), momentum=0.2, guard=True)
    assert bool(out.updated)
    assert int(counter) == 8
    torch.testing.assert_close(running_mean, want_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(running_var, want_var, rtol=1e-12, atol=1e-12)


def test_guard_changes_nothing_on_a_finite_batch() -> None:
    x = torch.randn(5, 3, 7, dtype=torch.float32)
    guarded, plain = _buffers(dtype=torch.float32), _buffers(dtype=torch.float32)
    a = _step(x, guarded, guard=True)
    b = _step(x, plain, guard=False)
    assert torch.equal(a.y, b.y)
    for got, want in zip(guarded, plain, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_guard_skips_a_nonfinite_batch_whole(bad: float) -> None:
    x = torch.randn(6, 3, 4, 4, dtype=F64)
    x[2, 1, 3, 0] = bad
    running_mean, running_var, counter = _buffers()
    saved = (running_mean.clone(), running_var.clone())
    out = _step(x, (running_mean, running_var, counter), guard=True)
    assert not bool(out.updated)
    assert int(counter) == 7  # not counted either
    # Whole: channels 0 and 2 are finite, but an update is all or nothing.
    assert torch.equal(running_mean, saved[0])
    assert torch.equal(running_var, saved[1])
    assert not bool(torch.isfinite(out.mean[1]))  # the batch statistics are still reported


def test_without_guard_a_nonfinite_batch_is_absorbed_and_counted() -> None:
    x = torch.randn(6, 3, 4, 4, dtype=F64)
    x[0, 0, 0, 0] = float("nan")
    running_mean, running_var, counter = _buffers()
    out = _step(x, (running_mean, running_var, counter), guard=False)
    assert bool(out.updated)
    assert int(counter) == 8
    assert bool(running_mean[0].isnan())
    assert bool(running_mean[1].isfinite())


def test_guard_skips_when_the_buffers_are_already_nonfinite() -> None:
    x = torch.randn(6, 3, 4, 4, dtype=F64)
    running_mean, running_var, counter = _buffers()
    running_var[2] = float("nan")
    out = _step(x, (running_mean, running_var, counter), guard=True)
    assert not bool(out.updated)
    assert int(counter) == 7


def test_guard_judges_the_value_in_the_buffers_dtype() -> None:
    # float64 input whose unbiased variance (~4e38) is finite in float64; a float32 buffer at
    # 3e38 moved 90% of the way would hold 3.9e38, beyond float32's largest value (3.4e38).
    x = torch.tensor([[-2e19], [2e19]], dtype=F64)
    running_mean = torch.zeros(1)
    running_var = torch.full((1,), 3e38)
    counter = torch.tensor(0)
    assert bool(torch.isfinite(x.var(0, correction=1)).all())
    out = _step(x, (running_mean, running_var, counter), momentum=0.9, guard=True)
    assert not bool(out.updated)
    assert float(running_var) == pytest.approx(3e38)
    assert int(counter) == 0
    cpp.train(x, running_mean=running_mean, running_var=running_var, momentum=0.9)
    assert bool(running_var.isinf())  # what the guard prevented


def test_counter_needs_the_running_buffers_and_int64() -> None:
    x = torch.randn(4, 3, 2)
    with pytest.raises(RuntimeError, match="running_mean/running_var; give them too"):
        cpp.train(x, num_batches_tracked=torch.tensor(0))
    with pytest.raises(RuntimeError, match="one-element int64"):
        cpp.train(
            x,
            running_mean=torch.zeros(3),
            running_var=torch.ones(3),
            momentum=0.1,
            num_batches_tracked=torch.tensor(0.0),
        )


def test_operator_with_counter_and_guard_passes_opcheck() -> None:
    x = torch.randn(6, 4, 3, 3, dtype=F64)
    for requires_grad in (False, True):
        args = (
            x.clone().requires_grad_(requires_grad),
            None,
            None,
            1e-5,
            1,
            False,
            None,
            None,
            None,
            None,
            None,
            False,
            torch.zeros(4, dtype=F64),
            torch.ones(4, dtype=F64),
            0.1,
            None,
            torch.tensor(0),
            True,
        )
        torch.library.opcheck(torch.ops.bnkit.bn_train.default, args)


def test_autograd_sees_the_counter_change() -> None:
    running_mean, running_var, counter = _buffers()
    version = counter._version
    x = torch.randn(4, 3, 5, dtype=F64, requires_grad=True)
    cpp.train(
        x,
        running_mean=running_mean,
        running_var=running_var,
        momentum=0.1,
        num_batches_tracked=counter,
    )
    assert counter._version > version


# -------------------------------------------------------------- the module's one-call path

ONE_CALL_CONFIGS: list[dict[str, Any]] = [
    {},
    {"affine": False},
    {"momentum": None},  # cumulative average: the momentum comes from the counter
    {"activation": "relu"},
    {"axis": -1},
    {"virtual_batch_size": 2},
    {"virtual_batch_size": 4, "ghost_layout": "strided", "activation": "relu"},
]


def _twins(cfg: dict[str, Any], dtype: torch.dtype) -> tuple[bnkit.BatchNorm, bnkit.BatchNorm]:
    torch.manual_seed(2)
    one = bnkit.BatchNorm(4, **cfg).to(dtype)
    if one.weight is not None:
        with torch.no_grad():
            one.weight.uniform_(0.5, 1.5)
            one.bias.uniform_(-0.5, 0.5)  # type: ignore[union-attr]
    general = bnkit.BatchNorm(4, **cfg).to(dtype)
    general.load_state_dict(one.state_dict())
    return one, general


@pytest.mark.usefixtures("cpp_policy")
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("cfg", ONE_CALL_CONFIGS, ids=repr)
def test_one_call_equals_the_general_path_bit_for_bit(
    cfg: dict[str, Any], dtype: torch.dtype, channels_last: bool, general_calls: dict[str, int]
) -> None:
    one, general = _twins(cfg, dtype)
    gen = torch.Generator().manual_seed(9)
    shape = (8, 4, 3, 5) if cfg.get("axis", 1) == 1 else (8, 3, 5, 4)
    for step in range(3):
        x = (torch.randn(shape, generator=gen, dtype=F64) * 2 + step).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = one(xa)
        calls_before = general_calls["batch_norm"]
        yb = general(xb, training=True)  # an explicit mode takes the general path
        assert general_calls["batch_norm"] == calls_before + 1
        assert torch.equal(ya, yb)
        assert ya.stride() == yb.stride()
        grad = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
        ya.backward(grad)
        yb.backward(grad)
        assert torch.equal(xa.grad, xb.grad)  # type: ignore[arg-type]
    for pa, pb in zip(one.parameters(), general.parameters(), strict=True):
        assert torch.equal(pa.grad, pb.grad)  # type: ignore[arg-type]  # summed over 3 steps
    assert general_calls["batch_norm"] == 3  # the twin's three calls only
    for (name, a), (_, b) in zip(
        one.state_dict().items(), general.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert int(one.num_batches_tracked) == 3  # type: ignore[arg-type]
    one.eval()
    general.eval()
    x = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
    with torch.no_grad():
        assert torch.equal(one(x), general(x, training=False))
    assert general_calls["batch_norm"] == 4


@pytest.mark.usefixtures("cpp_policy")
@pytest.mark.parametrize(
    ("axis", "shape", "weight_shape"),
    [(1, (8, 4, 3, 5), (8,)), (1, (8, 4, 3, 5), (8, 1, 3, 5)), (-1, (8, 6, 4), (8, 6))],
    ids=["per-sample", "per-position", "mask-channels-last"],
)
def test_weighted_one_call_equals_the_general_path(
    axis: int, shape: tuple[int, ...], weight_shape: tuple[int, ...], general_calls: dict[str, int]
) -> None:
    one, general = _twins({"axis": axis}, torch.float32)
    gen = torch.Generator().manual_seed(4)
    for _ in range(2):
        x = torch.randn(shape, generator=gen) * 3 + 1
        w = (torch.rand(weight_shape, generator=gen) > 0.3).float() + 0.5
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = one(xa, weights=w)
        yb = general(xb, weights=w, training=True)
        assert torch.equal(ya, yb)
        grad = torch.randn(shape, generator=gen)
        ya.backward(grad)
        yb.backward(grad)
        assert torch.equal(xa.grad, xb.grad)  # type: ignore[arg-type]
    for pa, pb in zip(one.parameters(), general.parameters(), strict=True):
        assert torch.equal(pa.grad, pb.grad)  # type: ignore[arg-type]
    assert general_calls["batch_norm"] == 2  # the twin's calls only
    for (name, a), (_, b) in zip(
        one.state_dict().items(), general.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="sum to zero"):
        one(torch.randn(shape), weights=torch.zeros(weight_shape))
    assert int(one.num_batches_tracked) == 2  # type: ignore[arg-type]


@pytest.mark.usefixtures("cpp_policy")
@pytest.mark.parametrize(
    ("layout", "weight_shape"),
    [("contiguous", (8,)), ("strided", (8,)), ("contiguous", (8, 1, 3, 5)), ("strided", (8, 3, 5))],
    ids=["per-sample", "per-sample-strided", "per-position", "mask-strided"],
)
def test_weights_with_ghosts_one_call_equals_the_general_path(
    layout: str, weight_shape: tuple[int, ...], general_calls: dict[str, int]
) -> None:
    one, general = _twins({"virtual_batch_size": 4, "ghost_layout": layout}, torch.float32)
    gen = torch.Generator().manual_seed(7)
    for _ in range(2):
        x = torch.randn(8, 4, 3, 5, generator=gen) * 3 + 1
        w = (torch.rand(weight_shape, generator=gen) > 0.3).float() + 0.25
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = one(xa, weights=w)
        yb = general(xb, weights=w, training=True)
        assert torch.equal(ya, yb)
        grad = torch.randn(x.shape, generator=gen)
        ya.backward(grad)
        yb.backward(grad)
        assert torch.equal(xa.grad, xb.grad)  # type: ignore[arg-type]
    assert general_calls["batch_norm"] == 2  # the twin's calls only
    for (name, a), (_, b) in zip(
        one.state_dict().items(), general.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.usefixtures("cpp_policy")
def test_one_call_path_takes_no_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = bnkit.BatchNorm2d(3)
    layer(torch.randn(4, 3, 2, 2))  # builds nothing new: the kernels are loaded already

    def refuse(*args: Any) -> None:
        raise AssertionError("the one-call path must leave the guard to the kernel")

    monkeypatch.setattr(running, "snapshot", refuse)
    monkeypatch.setattr(running, "is_finite", refuse)
    layer(torch.randn(4, 3, 2, 2))
    assert int(layer.num_batches_tracked) == 2  # type: ignore[arg-type]


def _nan_batch() -> torch.Tensor:
    x = torch.randn(8, 3, 4, 4)
    x[1, 2, 0, 3] = float("nan")
    return x


@pytest.mark.usefixtures("cpp_policy")
def test_nonfinite_skip_warns_counts_and_keeps_the_statistics(
    general_calls: dict[str, int],
) -> None:
    layer = bnkit.BatchNorm2d(3)
    layer(torch.randn(8, 3, 4, 4))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.warns(BatchNormWarning, match=r"non-finite statistics .*\(now 1\)") as record:
        y = layer(_nan_batch())
    assert "already non-finite" not in str(record[0].message)
    assert general_calls["batch_norm"] == 0
    assert y.shape == (8, 3, 4, 4)
    after = layer.state_dict()
    assert int(after.pop("num_skipped_updates")) == 1
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    layer(_nan_batch())  # warned once per layer; counted every time
    assert int(layer.num_skipped_updates) == 2


@pytest.mark.usefixtures("cpp_policy")
def test_nonfinite_skip_says_when_the_statistics_were_already_broken() -> None:
    layer = bnkit.BatchNorm2d(3)
    with torch.no_grad():
        layer.running_var[0] = float("inf")  # type: ignore[index]
    with pytest.warns(BatchNormWarning, match="already non-finite before this batch"):
        layer(torch.randn(8, 3, 4, 4))
    assert int(layer.num_batches_tracked) == 0  # type: ignore[arg-type]


def test_nonfinite_raise_stops_with_the_statistics_unchanged() -> None:
    layer = bnkit.BatchNorm2d(3, policy={"kernels": "cpp", "nonfinite": "raise"})
    layer(torch.randn(8, 3, 4, 4))
    saved = layer.running_mean.clone()  # type: ignore[union-attr]
    with pytest.raises(FloatingPointError, match="nonfinite='raise'"):
        layer(_nan_batch())
    assert torch.equal(layer.running_mean, saved)  # type: ignore[arg-type]
    assert int(layer.num_batches_tracked) == 1  # type: ignore[arg-type]
    assert int(layer.num_skipped_updates) == 1


def test_nonfinite_update_policy_lets_the_batch_in() -> None:
    import warnings

    layer = bnkit.BatchNorm2d(3, policy={"kernels": "cpp", "nonfinite": "update"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(_nan_batch())
    assert bool(layer.running_mean.isnan().any())  # type: ignore[union-attr]
    assert int(layer.num_batches_tracked) == 1  # type: ignore[arg-type]
    assert "num_skipped_updates" not in layer.state_dict()


@pytest.mark.usefixtures("cpp_policy")
def test_training_without_gradients_still_warns(general_calls: dict[str, int]) -> None:
    layer = bnkit.BatchNorm2d(3)
    with torch.no_grad(), pytest.warns(BatchNormWarning, match=r"model\.eval\(\)"):
        layer(torch.randn(4, 3, 2, 2))
    assert general_calls["batch_norm"] == 1
    quiet = bnkit.BatchNorm2d(3, policy={"no_grad_training": "ignore"})
    with torch.no_grad():
        quiet(torch.randn(4, 3, 2, 2))
    with torch.no_grad(), bnkit.policies.calibrating():
        quiet(torch.randn(4, 3, 2, 2))
    assert general_calls["batch_norm"] == 1  # both on the one-call path
    assert int(quiet.num_batches_tracked) == 2  # type: ignore[arg-type]


@pytest.mark.usefixtures("cpp_policy")
@pytest.mark.parametrize(
    ("make_layer", "x", "call"),
    [
        (
            lambda: bnkit.BatchNorm2d(3),
            torch.randn(4, 3, 2, 2),
            {"weights": torch.ones(4, requires_grad=True)},
        ),
        (
            lambda: bnkit.BatchNorm2d(3, virtual_batch_size=2),
            torch.randn(4, 3, 2, 2),
            {"weights": torch.rand(4, 3, 2, 2)},  # weights that differ between channels
        ),
        (lambda: bnkit.BatchNorm2d(3), torch.randn(4, 3, 2, 2), {"training": True}),
        (lambda: bnkit.BatchNorm2d(3), torch.randn(4, 3, 2, 2).half(), {}),
        (
            lambda: bnkit.BatchNorm2d(3, renorm=True, zero_debias="mean"),
            torch.randn(4, 3, 2, 2),
            {},
        ),
        (lambda: bnkit.BatchNorm2d(3, zero_debias="mean"), torch.randn(4, 3, 2, 2), {}),
        (
            lambda: bnkit.BatchNorm2d(3, virtual_batch_size=1, policy={"single_value": "running"}),
            torch.randn(4, 3, 1, 1),
            {},
        ),
        (lambda: bnkit.BatchNorm2d(3, activation="silu"), torch.randn(4, 3, 2, 2), {}),
        (lambda: bnkit.BatchNorm2d(3, track_running_stats=False), torch.randn(4, 3, 2, 2), {}),
        (lambda: bnkit.BatchNorm1d(3, running_var="biased", warmup=True), torch.randn(4, 3), {}),
    ],
    ids=[
        "weights-with-grad",
        "per-channel-weights",
        "training",
        "half",
        "renorm-zero_debias",
        "zero_debias",
        "ghosts-of-one",
        "silu",
        "no-running",
        "biased-warmup",
    ],
)
def test_other_steps_take_the_general_path(
    make_layer: Any, x: torch.Tensor, call: dict[str, Any], general_calls: dict[str, int]
) -> None:
    layer = make_layer()
    layer(x, **call)
    assert general_calls["batch_norm"] == 1


@pytest.mark.usefixtures("cpp_policy")
def test_eval_with_or_without_gradients_is_one_call(general_calls: dict[str, int]) -> None:
    layer = bnkit.BatchNorm2d(3).eval()
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None
    assert layer.weight.grad is not None  # type: ignore[union-attr]
    with torch.no_grad():
        layer(x)
    frozen = bnkit.BatchNorm2d(3)
    frozen.frozen = True
    with torch.no_grad():
        y = frozen(torch.randn(4, 3, 2, 2))  # a frozen layer in training mode: inference
    assert general_calls["batch_norm"] == 0
    assert int(frozen.num_batches_tracked) == 0  # type: ignore[arg-type]
    assert y.shape == (4, 3, 2, 2)


@pytest.mark.usefixtures("cpp_policy")
def test_bad_input_gets_the_general_paths_messages() -> None:
    layer = bnkit.BatchNorm2d(3)
    with pytest.raises(ValueError, match="expected 3 channels"):
        layer(torch.randn(4, 5, 2, 2))
    with pytest.raises(ValueError, match="4D"):
        layer(torch.randn(4, 3, 2))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3, 1, 1))
    ghosts = bnkit.BatchNorm2d(3, virtual_batch_size=4)
    with pytest.raises(ValueError, match="not divisible by virtual_batch_size=4"):
        ghosts(torch.randn(6, 3, 2, 2))
    with pytest.raises(TypeError, match="float64 input"):
        layer(torch.randn(4, 3, 2, 2, dtype=F64))
    assert int(layer.num_batches_tracked) == 0  # type: ignore[arg-type]


# ----------------------------------------------- per-sample weights in the operator's tiles


@pytest.mark.usefixtures("threads")
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize(
    "shape",
    [(6, 4, 9, 9), (40, 6, 5, 5), (2052, 3, 2, 2), (6, 1, 9, 9), (7, 3, 2, 2)],
    ids=["tiles-long", "tiles-short-spread", "tiles-spread-folded", "two-pass", "tiles-tiny"],
)
def test_per_sample_weights_match_the_float64_reference(shape: tuple[int, ...], relu: bool) -> None:
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(shape, generator=gen, dtype=F64) * 2 + 3
    w = torch.rand(shape[0], generator=gen, dtype=F64) + 0.2
    gamma = torch.rand(shape[1], generator=gen, dtype=F64) + 0.5
    beta = torch.rand(shape[1], generator=gen, dtype=F64) - 0.5
    dy = torch.randn(shape, generator=gen, dtype=F64)
    act = "relu" if relu else None
    leaves = [t.clone().requires_grad_() for t in (x, gamma, beta)]
    want, stats = bnf.batch_norm(
        leaves[0], weight=leaves[1], bias=leaves[2], training=True, weights=w, eps=1e-3,
        activation=act, return_stats=True, impl="reference",
    )  # fmt: skip
    want_grads = torch.autograd.grad(want, leaves, dy)
    for dtype, tol in ((F64, 1e-10), (torch.float32, 2e-5)):
        got_leaves = [t.detach().to(dtype).requires_grad_() for t in (x, gamma, beta)]
        out = cpp.train(*got_leaves, 1e-3, relu=relu, sample_weight=w.to(dtype))
        torch.testing.assert_close(out.mean, stats.mean.to(dtype), rtol=tol, atol=tol)
        torch.testing.assert_close(out.var, stats.var.to(dtype), rtol=tol, atol=tol)
        torch.testing.assert_close(out.y, want.detach().to(dtype), rtol=tol, atol=tol)
        got_grads = torch.autograd.grad(out.y, got_leaves, dy.to(dtype))
        for got, ref in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(got, ref.to(dtype), rtol=tol * 10, atol=tol * 10)


@pytest.mark.usefixtures("threads")
@pytest.mark.parametrize(("n", "ghosts"), [(128, 16), (128, 2), (64, 2)], ids=str)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_ghosts_on_short_channels_match_the_float64_reference(
    n: int, ghosts: int, strided: bool
) -> None:
    # 16 ghosts of 8: the per-run walk; 2 ghosts of 64 or 32: the spread walk.
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(n, 4, 3, 3, generator=gen, dtype=F64) * 2 + 1
    gamma = torch.rand(4, generator=gen, dtype=F64) + 0.5
    dy = torch.randn(x.shape, generator=gen, dtype=F64)
    leaves = [t.clone().requires_grad_() for t in (x, gamma)]
    want = bnf.batch_norm(
        leaves[0],
        weight=leaves[1],
        training=True,
        virtual_batch_size=n // ghosts,
        ghost_layout="strided" if strided else "contiguous",
        impl="reference",
    )
    want_grads = torch.autograd.grad(want, leaves, dy)
    got_leaves = [t.detach().float().requires_grad_() for t in (x, gamma)]
    out = cpp.train(got_leaves[0], got_leaves[1], None, 1e-5, ghosts=ghosts, strided=strided)
    torch.testing.assert_close(out.y, want.detach().float(), rtol=2e-5, atol=2e-5)
    got_grads = torch.autograd.grad(out.y, got_leaves, dy.float())
    for got, ref in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, ref.float(), rtol=2e-4, atol=2e-4)


@pytest.mark.usefixtures("cpp_policy")
def test_track_running_stats_switched_off_later_is_respected(
    general_calls: dict[str, int],
) -> None:
    # A common adaptation idiom: keep the buffers, stop using and updating them.
    layer = bnkit.BatchNorm2d(3)
    layer.track_running_stats = False
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(8, 3, 4, 4) * 3 + 2
    y = layer(x)
    for name, value in saved.items():
        assert torch.equal(layer.state_dict()[name], value), name
    layer.eval()
    with torch.no_grad():
        y_eval = layer(x)  # batch statistics, as in training
    torch.testing.assert_close(y_eval, y.detach())
    assert general_calls["batch_norm"] == 2


@pytest.mark.usefixtures("cpp_policy")
def test_buffers_the_kernel_cannot_take_fall_back(general_calls: dict[str, int]) -> None:
    reference = bnkit.BatchNorm2d(3)
    strided = bnkit.BatchNorm2d(3)
    wide = torch.zeros(3, 2)
    wide[:, 0] = 0.5
    state = strided.state_dict()
    state["running_mean"] = wide[:, 0]  # a non-contiguous view
    strided.load_state_dict(state, assign=True)
    assert not strided.running_mean.is_contiguous()  # type: ignore[union-attr]
    with torch.no_grad():
        reference.running_mean.fill_(0.5)  # type: ignore[union-attr]
    counter32 = bnkit.BatchNorm2d(3)
    counter32.num_batches_tracked = torch.tensor(0, dtype=torch.int32)
    x = torch.randn(8, 3, 4, 4)
    want = reference(x)
    assert general_calls["batch_norm"] == 0
    torch.testing.assert_close(strided(x), want)
    torch.testing.assert_close(strided.running_mean, reference.running_mean)
    counter32(x)
    assert general_calls["batch_norm"] == 2
    assert int(counter32.num_batches_tracked) == 1  # type: ignore[arg-type]
