"""TF-slim's and Keras' running-statistics rules inside the C++ training kernel.

``bnkit::bn_train`` applies, besides PyTorch's rule, the biased-variance rule (TF-slim, Keras,
``running_var="biased"``) and Keras' batch-renorm rule (a moving standard deviation and the
renorm statistics, ``renorm=True``) when ``running.kernel_rule`` says the layer's rule is one of
them. ``running.update_running_stats_`` is the reference: the operator is checked against it on
float64 statistics, the module's one-call path against the general path (which runs the
reference after the same kernel), and the non-finite guard over all five renorm buffers.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import bnkit
from bnkit import running
from bnkit.kernels import cpp
from bnkit.policies import BatchNormWarning

F64 = torch.float64
EPS = 1e-3


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    if not cpp.available():
        pytest.skip(f"C++ kernels cannot be built here: {cpp.build_error()}")


def _state(c: int, dtype: torch.dtype = F64, *, renorm: bool) -> running.RunningState:
    gen = torch.Generator().manual_seed(11)
    mean = torch.randn(c, generator=gen, dtype=dtype)
    var = torch.rand(c, generator=gen, dtype=dtype) + 0.5
    state = running.RunningState(mean, var, torch.tensor(4))
    if renorm:
        state.stddev = torch.sqrt(var + EPS)
        state.renorm_mean = mean + 0.1
        state.renorm_stddev = torch.rand(c, generator=gen, dtype=dtype) + 0.7
    return state


def _clone(state: running.RunningState) -> running.RunningState:
    fields = {k: (None if v is None else v.clone()) for k, v in vars(state).items()}
    return running.RunningState(**fields)


def _kernel_step(
    x: torch.Tensor,
    state: running.RunningState,
    rule: running.KernelRule,
    *,
    ghosts: int = 1,
    guard: bool = False,
) -> cpp.TrainOutput:
    return cpp.train(
        x,
        eps=EPS,
        ghosts=ghosts,
        renorm_mean=state.renorm_mean,
        renorm_std=state.renorm_stddev,
        running_mean=state.mean,
        running_var=state.var,
        momentum=rule.momentum,
        num_batches_tracked=state.num_batches_tracked,
        guard=guard,
        running_std=state.stddev,
        renorm_momentum=rule.renorm_momentum or 0.0,
        biased=rule.biased,
    )


def _reference_stats(x: torch.Tensor, ghosts: int) -> running.BatchStats:
    """Float64 batch statistics per ghost (contiguous ghosts), averaged as running.py wants."""
    g = x.reshape(ghosts, x.shape[0] // ghosts, *x.shape[1:]).movedim(2, 1).flatten(2)
    mean, var = g.mean(-1), g.var(-1, correction=0)
    n = g.shape[-1]
    unbiased = var * n / (n - 1)
    return running.BatchStats(mean.mean(0), var.mean(0), unbiased.mean(0), torch.tensor(n))


@pytest.mark.parametrize("ghosts", [1, 3])
@pytest.mark.parametrize("renorm", [False, True], ids=["plain", "renorm"])
@pytest.mark.parametrize("running_var", ["unbiased", "biased"])
def test_kernel_rule_matches_running_py_in_float64(
    running_var: str, renorm: bool, ghosts: int
) -> None:
    x = torch.randn(12, 5, 3, 4, dtype=F64) * 2 + 1
    state = _state(5, renorm=renorm)
    reference = _clone(state)
    moving = running.MovingAverageRule(0.2)
    rule = running.kernel_rule(state, moving, running_var, 0.3 if renorm else None)  # type: ignore[arg-type]
    assert rule is not None
    assert rule.biased == (running_var == "biased")
    out = _kernel_step(x, state, rule, ghosts=ghosts)
    assert bool(out.updated)
    running.update_running_stats_(
        reference,
        _reference_stats(x, ghosts),
        moving,
        running_var=running_var,  # type: ignore[arg-type]
        eps=EPS,
        renorm_momentum=0.3 if renorm else None,
    )
    for name, got in vars(state).items():
        want = getattr(reference, name)
        if got is None:
            assert want is None, name
        else:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)
    assert int(state.num_batches_tracked) == 5  # type: ignore[arg-type]


def test_renorm_factors_use_the_statistics_from_before_the_update() -> None:
    # Keras computes r and d from the renorm statistics, then moves them.
    x = torch.randn(16, 3, 5, dtype=F64) * 3 - 1
    state = _state(3, renorm=True)
    rm, rs = state.renorm_mean.clone(), state.renorm_stddev.clone()  # type: ignore[union-attr]
    rule = running.kernel_rule(state, running.MovingAverageRule(0.1), "biased", 0.5)
    assert rule is not None
    out = _kernel_step(x, state, rule)
    std = torch.sqrt(x.var((0, 2), correction=0) + EPS)
    torch.testing.assert_close(out.r, std / rs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.d, (x.mean((0, 2)) - rm) / rs, rtol=1e-12, atol=1e-12)
    assert not torch.equal(state.renorm_stddev, rs)  # type: ignore[arg-type]


def test_running_var_follows_the_stored_stddev() -> None:
    x = torch.randn(32, 4, dtype=torch.float32) * 0.01  # small variance: std² − eps < 0 possible
    state = _state(4, torch.float32, renorm=True)
    state.stddev = torch.full((4,), 0.02)
    rule = running.kernel_rule(state, running.MovingAverageRule(0.9), "unbiased", 0.1)
    assert rule is not None
    _kernel_step(x, state, rule)
    # running.py's float32 formula, bit for bit (it cancels when the variance is below eps).
    want = torch.clamp(state.stddev * state.stddev - EPS, min=0)
    assert torch.equal(state.var, want)
    assert bool((state.var == 0).any())  # the clamp at zero was reached
    assert bool((state.var > 0).any())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_guard_keeps_all_five_renorm_buffers(bad: float) -> None:
    x = torch.randn(8, 3, 4, dtype=F64)
    x[3, 2, 1] = bad
    state = _state(3, renorm=True)
    saved = _clone(state)
    rule = running.kernel_rule(state, running.MovingAverageRule(0.1), "unbiased", 0.1)
    assert rule is not None
    out = _kernel_step(x, state, rule, guard=True)
    assert not bool(out.updated)
    kept = {k: v for k, v in vars(saved).items() if v is not None}
    assert len(kept) == 6  # five statistics and the counter
    for name, value in kept.items():
        assert torch.equal(getattr(state, name), value), name
    _kernel_step(x, state, rule, guard=False)
    assert not bool(torch.isfinite(state.renorm_stddev).all())  # type: ignore[arg-type]


def test_guard_judges_the_variance_from_a_float32_stddev() -> None:
    # A running stddev of 2e19 is a finite float32; its square (4e38) is not.
    x = torch.tensor([[-1e19], [1e19]], dtype=torch.float32)
    state = _state(1, torch.float32, renorm=True)
    state.stddev = torch.full((1,), 2e19)
    rule = running.kernel_rule(state, running.MovingAverageRule(0.01), "unbiased", 0.01)
    assert rule is not None
    out = _kernel_step(x, state, rule, guard=True)
    assert not bool(out.updated)
    assert int(state.num_batches_tracked) == 4  # type: ignore[arg-type]
    _kernel_step(x, state, rule, guard=False)
    assert bool(state.var.isinf().all())  # what the guard prevented


def test_kernel_rule_declines_what_the_kernel_does_not_do() -> None:
    plain = _state(2, renorm=False)
    renorm = _state(2, renorm=True)
    assert running.kernel_rule(plain, running.MovingAverageRule(0.1, warmup=True), "biased") is None
    debiased = running.MovingAverageRule(0.1, zero_debias="mean")
    assert running.kernel_rule(renorm, debiased, "biased", 0.1) is None
    assert running.kernel_rule(renorm, running.MovingAverageRule(0.1), "biased", None) is None
    cumulative = running.kernel_rule(plain, running.MovingAverageRule(None), "unbiased")
    assert cumulative == running.KernelRule(1.0 / 5.0, False, None)  # the counter is at 4
    no_counter = running.RunningState(torch.zeros(2), torch.ones(2))
    assert running.kernel_rule(no_counter, running.MovingAverageRule(None), "unbiased") is None


def test_keras_rule_needs_its_buffers() -> None:
    x = torch.randn(4, 3, 2)
    with pytest.raises(
        RuntimeError, match=r"running_std \(Keras. renorm rule\) needs running_mean"
    ):
        cpp.train(
            x, running_mean=torch.zeros(3), running_var=torch.ones(3), running_std=torch.ones(3)
        )
    with pytest.raises(RuntimeError, match="renorm_mean must be a contiguous"):
        cpp.train(
            x,
            renorm_mean=torch.zeros(3, 2)[:, 0],
            renorm_std=torch.ones(3),
            running_mean=torch.zeros(3),
            running_var=torch.ones(3),
            running_std=torch.ones(3),
        )


def test_operator_with_the_keras_rule_passes_opcheck() -> None:
    x = torch.randn(6, 4, 3, 3, dtype=F64)
    for requires_grad in (False, True):
        state = _state(4, renorm=True)
        args = (
            x.clone().requires_grad_(requires_grad),
            None,
            None,
            EPS,
            2,
            False,
            state.renorm_mean,
            state.renorm_stddev,
            0.5,
            2.0,
            1.0,
            False,
            state.mean,
            state.var,
            0.1,
            None,
            state.num_batches_tracked,
            True,
            state.stddev,
            0.2,
            True,
        )
        torch.library.opcheck(torch.ops.bnkit.bn_train.default, args)


def test_autograd_sees_the_renorm_buffers_change() -> None:
    state = _state(3, renorm=True)
    versions = [t._version for t in (state.stddev, state.renorm_mean, state.renorm_stddev)]
    x = torch.randn(4, 3, 5, dtype=F64, requires_grad=True)
    rule = running.kernel_rule(state, running.MovingAverageRule(0.1), "unbiased", 0.1)
    assert rule is not None
    _kernel_step(x, state, rule)
    after = [t._version for t in (state.stddev, state.renorm_mean, state.renorm_stddev)]
    assert all(a > b for a, b in zip(after, versions, strict=True))


# -------------------------------------------------------------- the module's one-call path

TF_RULE_CONFIGS: list[dict[str, Any]] = [
    {"running_var": "biased"},
    {"running_var": "biased", "virtual_batch_size": 2, "activation": "relu"},
    {"renorm": True},
    {"renorm": True, "renorm_clipping": {"rmax": 1.2, "dmax": 0.3}, "running_var": "biased"},
    {"renorm": True, "virtual_batch_size": 4, "ghost_layout": "strided", "renorm_decay": 0.9},
    {"renorm": True, "momentum": None},
    {"renorm": True, "axis": -1},
]


@pytest.mark.usefixtures("cpp_policy")
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("cfg", TF_RULE_CONFIGS, ids=repr)
def test_one_call_with_tf_rules_matches_the_general_path(
    cfg: dict[str, Any], dtype: torch.dtype, channels_last: bool, general_calls: dict[str, int]
) -> None:
    torch.manual_seed(3)
    one = bnkit.BatchNorm(4, eps=EPS, **cfg).to(dtype)
    with torch.no_grad():
        one.weight.uniform_(0.5, 1.5)  # type: ignore[union-attr]
        one.bias.uniform_(-0.5, 0.5)  # type: ignore[union-attr]
    general = bnkit.BatchNorm(4, eps=EPS, **cfg).to(dtype)
    general.load_state_dict(one.state_dict())
    gen = torch.Generator().manual_seed(8)
    shape = (8, 4, 3, 5) if cfg.get("axis", 1) == 1 else (8, 3, 5, 4)
    # Float32 buffers may differ in the last bit (float64 arithmetic rounded once against
    # running.py's float32 operations), and later steps normalize with them (renorm's r, d).
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for step in range(4):
        x = (torch.randn(shape, generator=gen, dtype=F64) * 2 + step).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = one(xa)
        yb = general(xb, training=True)  # an explicit mode takes the general path
        torch.testing.assert_close(ya, yb, **tol)
        if step == 0:
            assert torch.equal(ya, yb)  # same buffers, same kernel: the same bits
        grad = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
        ya.backward(grad)
        yb.backward(grad)
        torch.testing.assert_close(xa.grad, xb.grad, **tol)
    assert general_calls["batch_norm"] == 4  # the twin's calls only
    for (name, a), (_, b) in zip(
        one.state_dict().items(), general.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, **tol, msg=name)
    assert int(one.num_batches_tracked) == 4  # type: ignore[arg-type]


@pytest.mark.usefixtures("cpp_policy")
def test_renorm_nonfinite_batch_is_skipped_and_reported(general_calls: dict[str, int]) -> None:
    layer = bnkit.BatchNorm2d(3, renorm=True)
    layer(torch.randn(8, 3, 4, 4))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(8, 3, 4, 4)
    x[0, 1, 2, 2] = float("nan")
    with pytest.warns(BatchNormWarning, match="non-finite statistics"):
        layer(x)
    after = layer.state_dict()
    assert int(after.pop("num_skipped_updates")) == 1
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert general_calls["batch_norm"] == 0


@pytest.mark.usefixtures("cpp_policy")
def test_presets_take_the_one_call_path(general_calls: dict[str, int]) -> None:
    slim = bnkit.from_slim(num_features=3)
    keras = bnkit.from_keras(3, renorm=True)
    slim(torch.randn(8, 4, 4, 3))  # NHWC: both systems' default layout
    keras(torch.randn(8, 4, 4, 3))
    assert general_calls["batch_norm"] == 0
    assert int(slim.num_batches_tracked) == 1  # type: ignore[arg-type]
    assert int(keras.num_batches_tracked) == 1  # type: ignore[arg-type]


@pytest.mark.usefixtures("cpp_policy")
def test_renorm_buffers_the_kernel_cannot_take_fall_back(general_calls: dict[str, int]) -> None:
    layer = bnkit.BatchNorm2d(3, renorm=True)
    layer.renorm_stddev = layer.renorm_stddev.double()  # type: ignore[union-attr]
    layer(torch.randn(8, 3, 4, 4))
    assert general_calls["batch_norm"] == 1
    assert int(layer.num_batches_tracked) == 1  # type: ignore[arg-type]


@pytest.mark.usefixtures("cpp_policy")
@pytest.mark.parametrize("running_var", ["unbiased", "biased"])
def test_weighted_renorm_one_call_matches_the_general_path(
    running_var: str, general_calls: dict[str, int]
) -> None:
    torch.manual_seed(6)
    cfg: dict[str, Any] = {"eps": EPS, "renorm": True, "running_var": running_var}
    one = bnkit.BatchNorm(4, **cfg).double()
    general = bnkit.BatchNorm(4, **cfg).double()
    general.load_state_dict(one.state_dict())
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.randn(8, 4, 3, 5, generator=gen, dtype=F64) * 2 + 1
        w = torch.rand(8, generator=gen, dtype=F64) + 0.5
        torch.testing.assert_close(
            one(x, weights=w), general(x, weights=w, training=True), rtol=1e-12, atol=1e-12
        )
    assert general_calls["batch_norm"] == 3  # the twin's calls only
    for (name, a), (_, b) in zip(
        one.state_dict().items(), general.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.usefixtures("cpp_policy")
def test_renorm_switched_off_later_takes_the_general_path(general_calls: dict[str, int]) -> None:
    # The buffers stay (and keep Keras' rule, as on the general path); the correction stops.
    layer = bnkit.BatchNorm2d(3, renorm=True)
    twin = bnkit.BatchNorm2d(3, renorm=True)
    layer.renorm = False
    twin.renorm = False
    x = torch.randn(8, 3, 4, 4) * 2 + 1
    y = layer(x)
    assert general_calls["batch_norm"] == 1
    with bnkit.policy(kernels="torch"):
        torch.testing.assert_close(y, twin(x))
    for (name, a), (_, b) in zip(
        layer.state_dict().items(), twin.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)
