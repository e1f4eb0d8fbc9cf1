"""Tests for bnkit.modules: BatchNorm and the drop-in BatchNorm1d/2d/3d.

Oracles:
- ``tests/reference.py``: an independent closed-form float64 model of the module (written from
  the contract, not from bnkit.functional/running); autograd through it gives reference
  gradients.
- ``torch.nn.BatchNorm1d/2d/3d`` for the default configuration (bit-identical in float32).
- Hand-derived facts (Keras renorm's first step returns x, strided ghost groups, zero-debias
  after one step, frequency weights equal duplicated samples).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from bnkit import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from reference import F64, ReferenceBN

TIGHT = {"rtol": 1e-10, "atol": 1e-12}
# Layers need eps > 0; this one is far below float64's resolution of the variances used with
# it, so results equal those of eps=0 exactly.
TINY_EPS = 1e-300
FLOAT32 = {"rtol": 1e-4, "atol": 1e-5}


# ----------------------------------------------------------------------------- helpers


def adjust_per_channel(shape: torch.Size) -> tuple[Tensor, Tensor]:
    """Per-channel (C=3) adjustment, as 1-D tensors."""
    return (
        torch.tensor([1.5, 0.5, 2.0], dtype=F64),
        torch.tensor([0.25, -0.5, 0.0], dtype=F64),
    )


def adjust_full(shape: torch.Size) -> tuple[Tensor, Tensor]:
    """Full-shape adjustment, a deterministic function of the input shape."""
    n = 1
    for s in shape:
        n *= s
    idx = torch.arange(n, dtype=F64).reshape(shape)
    return 1.0 + 0.5 * torch.sin(idx), 0.1 * torch.cos(idx)


def adjust_scalar(shape: torch.Size) -> tuple[float, float]:
    return 2.0, 0.5


@dataclass
class Case:
    kwargs: dict[str, Any] = field(default_factory=dict)
    shape: tuple[int, ...] = (8, 3, 5)
    weights: str | None = None  # None | "sample" | "mask" | "full"
    channels_last: bool = False

    @property
    def axis(self) -> int:
        return int(self.kwargs.get("axis", 1))

    @property
    def c(self) -> int:
        return self.shape[self.axis]


def _case(
    name: str,
    shape: tuple[int, ...] = (8, 3, 5),
    weights: str | None = None,
    channels_last: bool = False,
    **kwargs: Any,
) -> Any:
    return pytest.param(Case(kwargs, shape, weights, channels_last), id=name)


CLIP = {"rmin": 0.9, "rmax": 1.1, "dmax": 0.05}

CASES = [
    # layouts and ranks
    _case("default-rank3"),
    _case("rank2", (8, 3)),
    _case("rank4", (4, 3, 3, 4)),
    _case("rank5", (4, 3, 2, 3, 2)),
    _case("axis-1-rank2", (8, 3), axis=-1),
    _case("axis-1-rank3", (8, 5, 3), axis=-1),
    _case("axis-1-rank4", (4, 3, 4, 3), axis=-1),
    _case("channels_last-rank4", (4, 3, 3, 4), channels_last=True),
    _case("eps1e-3", eps=1e-3),
    # moving-average rules
    _case("momentum0.3", momentum=0.3),
    _case("momentum-None", momentum=None),
    _case("momentum-None-biased", momentum=None, running_var="biased"),
    _case("decay0.7", decay=0.7),
    _case("biased", running_var="biased"),
    _case("warmup", warmup=True),
    _case("warmup-decay0.2", warmup=True, decay=0.2),
    _case("zero_debias-mean", zero_debias="mean", running_mean_init=3.0),
    _case("zero_debias-both", zero_debias="both", decay=0.8),
    _case("zero_debias-both-biased", zero_debias="both", running_var="biased"),
    _case("warmup+zero_debias-both", warmup=True, zero_debias="both", decay=0.95),
    # renorm
    _case("renorm", renorm=True),
    _case("renorm-biased", renorm=True, running_var="biased"),
    _case("renorm-clip", renorm=True, renorm_clipping=CLIP),
    _case("renorm-clip-rmax-only", renorm=True, renorm_clipping={"rmax": 1.2}),
    _case("renorm-decay0.5", renorm=True, renorm_decay=0.5, momentum=0.2),
    _case("renorm-momentum0.3", renorm=True, renorm_momentum=0.3),
    _case("renorm-momentum-None", renorm=True, momentum=None),
    _case("renorm+warmup", renorm=True, warmup=True),
    _case("renorm+zero_debias-mean", renorm=True, zero_debias="mean"),
    _case(
        "renorm-inits",
        renorm=True,
        running_mean_init=[0.5, -1.0, 2.0],
        running_var_init=torch.tensor([4.0, 0.25, 1e-7]),
    ),
    _case("renorm-axis-1-rank4", (4, 3, 4, 3), axis=-1, renorm=True, renorm_clipping=CLIP),
    # ghost batches
    _case("ghost-contiguous", virtual_batch_size=2),
    _case("ghost-strided", virtual_batch_size=2, ghost_layout="strided"),
    _case("ghost-strided-vbs4", virtual_batch_size=4, ghost_layout="strided"),
    _case("ghost-rank2", (8, 3), virtual_batch_size=4, ghost_layout="strided"),
    _case("ghost-vbs1-rank3", virtual_batch_size=1),
    _case("ghost-biased", virtual_batch_size=4, running_var="biased"),
    _case("ghost-axis-1", (8, 5, 3), axis=-1, virtual_batch_size=2, ghost_layout="strided"),
    _case("renorm+ghost", renorm=True, virtual_batch_size=2),
    _case(
        "renorm+clip+ghost-strided",
        renorm=True,
        renorm_clipping=CLIP,
        virtual_batch_size=4,
        ghost_layout="strided",
    ),
    _case(
        "channels_last-renorm+ghost",
        (4, 3, 3, 4),
        channels_last=True,
        renorm=True,
        virtual_batch_size=2,
        ghost_layout="strided",
    ),
    # sample weights and masks
    _case("weights-sample", weights="sample"),
    _case("weights-rank2", (8, 3), weights="sample"),
    _case("weights-mask-axis1", weights="mask"),
    _case("weights-mask-axis-1", (8, 5, 3), weights="mask", axis=-1),
    _case("weights-mask-rank4", (4, 3, 3, 4), weights="mask"),
    _case("weights-full", weights="full"),
    _case("weights-biased", weights="sample", running_var="biased"),
    _case("weights+zero_debias-both", weights="sample", zero_debias="both"),
    _case("weights+zero_debias-mean", weights="mask", zero_debias="mean", axis=-1, shape=(8, 5, 3)),
    _case("weights+renorm", weights="sample", renorm=True),
    _case("weights+renorm-clip", weights="mask", renorm=True, renorm_clipping=CLIP),
    _case("weights+ghost", weights="sample", virtual_batch_size=4),
    _case("mask+ghost-strided", weights="mask", virtual_batch_size=2, ghost_layout="strided"),
    _case("weights+momentum-None", weights="sample", momentum=None),
    # adjustment
    _case("adjust-per-channel", adjustment=adjust_per_channel),
    _case("adjust-full", adjustment=adjust_full),
    _case("adjust-scalar", adjustment=adjust_scalar),
    _case("adjust-per-channel-axis-1", (8, 5, 3), axis=-1, adjustment=adjust_per_channel),
    _case("adjust-full-axis-1", (4, 3, 4, 3), axis=-1, adjustment=adjust_full),
    _case("adjust+renorm", adjustment=adjust_full, renorm=True, renorm_clipping=CLIP),
    _case("adjust+weights", adjustment=adjust_per_channel, weights="sample"),
    _case(
        "adjust+ghost-strided", adjustment=adjust_full, virtual_batch_size=2, ghost_layout="strided"
    ),
    # activation, affine
    _case("act-relu", activation="relu"),
    _case("act-leaky_relu", activation="leaky_relu"),
    _case("act-elu", activation="elu"),
    _case("act-silu", activation="silu"),
    _case("act-gelu", activation="gelu"),
    _case("act-callable", activation=torch.tanh),
    _case("center-off", center=False),
    _case("scale-off", scale=False),
    _case("affine-off", affine=False),
    _case("affine-off+renorm", affine=False, renorm=True),
    # no running statistics
    _case("no-running-stats", track_running_stats=False),
    _case("no-running-stats+ghost", track_running_stats=False, virtual_batch_size=2),
    _case("no-running-stats+weights", track_running_stats=False, weights="mask"),
    _case("no-running-stats+adjust", track_running_stats=False, adjustment=adjust_full),
    # initial values
    _case(
        "inits",
        weight_init=[0.5, 2.0, -1.0],
        bias_init=0.3,
        running_mean_init=torch.tensor([1.0, -2.0, 0.5]),
        running_var_init=[0.5, 2.0, 3.0],
    ),
    _case(
        "inits+zero_debias-both", running_mean_init=5.0, running_var_init=9.0, zero_debias="both"
    ),
]


def channel_view(v: Tensor, ndim: int, axis: int) -> Tensor:
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return v.reshape(shape)


def make_x(shape: tuple[int, ...], axis: int = 1, dtype: torch.dtype = F64) -> Tensor:
    """Random data with a different mean and spread per channel."""
    c = shape[axis % len(shape)]
    scale = 0.5 + 2.5 * torch.rand(c, dtype=F64)
    shift = 4.0 * torch.randn(c, dtype=F64)
    x = torch.randn(shape, dtype=F64)
    return (x * channel_view(scale, x.dim(), axis) + channel_view(shift, x.dim(), axis)).to(dtype)


def make_weights(kind: str | None, x: Tensor, axis: int) -> Tensor | None:
    a = axis % x.dim()
    if kind is None:
        return None
    if kind == "sample":
        return 0.25 + 2.0 * torch.rand(x.shape[0], dtype=x.dtype)
    if kind == "full":
        return 0.25 + 2.0 * torch.rand(x.shape, dtype=x.dtype)
    assert kind == "mask"
    # 0/1 mask over the first two non-channel dims; every sample keeps its first entry.
    non_channel = [s for i, s in enumerate(x.shape) if i != a]
    mask = (torch.rand(non_channel[:2]) > 0.4).to(x.dtype)
    mask[:, 0] = 1.0
    return mask


def randomize_params(m: nn.Module) -> None:
    with torch.no_grad():
        if m.weight is not None:
            m.weight.copy_(0.5 + torch.rand_like(m.weight))
        if m.bias is not None:
            m.bias.copy_(torch.randn_like(m.bias))


def assert_buffers_match(m: nn.Module, ref: ReferenceBN, **tol: float) -> None:
    got = dict(m.named_buffers())
    want = ref.buffers()
    assert set(got) == set(want)
    for name, b in want.items():
        if b.dtype == torch.long:
            assert got[name].dtype == torch.long, name
            assert int(got[name]) == int(b), name
        else:
            assert_close(got[name].to(F64), b, msg=lambda s, n=name: f"{n}: {s}", **tol)


def grads_of(y: Tensor, g: Tensor, inputs: list[Tensor | None]) -> list[Tensor | None]:
    present = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(y, present, g, allow_unused=True))
    return [next(got) if t is not None else None for t in inputs]


def run_against_reference(case: Case, dtype: torch.dtype, steps: int, **tol: float) -> None:
    kwargs = case.kwargs
    m = BatchNorm(case.c, dtype=dtype, **kwargs)
    ref = ReferenceBN(case.c, **kwargs)
    if "weight_init" not in kwargs and "bias_init" not in kwargs:
        randomize_params(m)
        ref.set_params(m.weight, m.bias)
    assert_buffers_match(m, ref, **tol)
    for _ in range(steps):
        x = make_x(case.shape, case.axis)
        w = make_weights(case.weights, x, case.axis)
        xm = x.to(dtype, copy=True)
        if case.channels_last:
            xm = xm.to(memory_format=torch.channels_last)
        xm.requires_grad_()
        xr = x.clone().requires_grad_()
        y = m(xm, weights=None if w is None else w.to(dtype))
        yr = ref.step(xr, w)
        assert y.dtype == dtype
        assert y.shape == x.shape
        assert_close(y.to(F64), yr.detach(), **tol)
        assert_buffers_match(m, ref, **tol)
        g = torch.randn_like(yr)
        got = grads_of(y, g.to(dtype), [xm, m.weight, m.bias])
        want = grads_of(yr, g, [xr, ref.weight, ref.bias])
        for a, b in zip(got, want, strict=True):
            assert (a is None) == (b is None)
            if a is not None and b is not None:
                assert_close(a.to(F64), b, **tol)
    m.eval()
    x = make_x(case.shape, case.axis)
    w = make_weights(case.weights, x, case.axis)
    xm = x.to(dtype, copy=True).requires_grad_()
    xr = x.clone().requires_grad_()
    y = m(xm, weights=None if w is None else w.to(dtype))
    yr = ref.infer(xr, w)
    assert_close(y.to(F64), yr.detach(), **tol)
    g = torch.randn_like(yr)
    assert_close(
        torch.autograd.grad(y, xm, g.to(dtype))[0].to(F64), torch.autograd.grad(yr, xr, g)[0], **tol
    )
    assert_buffers_match(m, ref, **tol)  # eval changes nothing


# ------------------------------------------------------------- against the reference


@pytest.mark.parametrize("case", CASES)
def test_float64_matches_reference(case: Case) -> None:
    run_against_reference(case, F64, steps=4, **TIGHT)


FLOAT32_CASES = [
    p
    for p in CASES
    if p.id
    in {
        "default-rank3",
        "axis-1-rank4",
        "warmup+zero_debias-both",
        "renorm-clip",
        "renorm+clip+ghost-strided",
        "weights+ghost",
        "weights-mask-axis-1",
        "momentum-None",
        "act-gelu",
        "no-running-stats+ghost",
    }
]


@pytest.mark.parametrize("case", FLOAT32_CASES)
def test_float32_matches_reference(case: Case) -> None:
    run_against_reference(case, torch.float32, steps=3, **FLOAT32)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="default"),
        pytest.param({"virtual_batch_size": 2, "ghost_layout": "strided"}, id="ghost"),
        pytest.param({"axis": -1, "virtual_batch_size": 2}, id="axis-1-ghost"),
        pytest.param({"zero_debias": "both", "warmup": True}, id="zero_debias"),
        pytest.param({"activation": "elu", "adjustment": adjust_scalar}, id="act+adjust"),
        pytest.param({"track_running_stats": False}, id="no-running-stats"),
    ],
)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_gradcheck_training(kwargs: dict[str, Any], weighted: bool) -> None:
    """Finite differences agree with the analytic gradient in training mode.

    Renorm is absent on purpose: r and d depend on the batch but carry no gradient
    (stop_gradient), so finite differences disagree by design; renorm gradients are
    checked against the reference's autograd in test_float64_matches_reference.
    """
    m = BatchNorm(3, dtype=F64, **kwargs)
    randomize_params(m)
    axis = int(kwargs.get("axis", 1))
    x = make_x((4, 2, 3) if axis == -1 else (4, 3, 2), axis).requires_grad_()
    w = make_weights("sample", x, axis) if weighted else None

    def f(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        fresh = copy.deepcopy(m)  # the running state must not move between evaluations
        params = {"weight": weight, "bias": bias}
        out: Tensor = torch.func.functional_call(fresh, params, (x,), {"weights": w})
        return out

    weight = m.weight.detach().clone().requires_grad_()
    bias = m.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (x, weight, bias))


# ------------------------------------------------------ torch.nn.BatchNorm*d equivalence

TORCH_SHAPES = [
    pytest.param(BatchNorm1d, nn.BatchNorm1d, (8, 4), id="1d-rank2"),
    pytest.param(BatchNorm1d, nn.BatchNorm1d, (8, 4, 5), id="1d-rank3"),
    pytest.param(BatchNorm2d, nn.BatchNorm2d, (4, 4, 3, 5), id="2d"),
    pytest.param(BatchNorm3d, nn.BatchNorm3d, (2, 4, 3, 2, 3), id="3d"),
]
TORCH_OPTIONS = [
    pytest.param({}, id="default"),
    pytest.param({"momentum": None}, id="momentum-None"),
    pytest.param({"momentum": 0.3, "eps": 1e-3}, id="momentum0.3-eps1e-3"),
    pytest.param({"affine": False}, id="affine-off"),
    pytest.param({"bias": False}, id="bias-off"),
    pytest.param({"track_running_stats": False}, id="no-running-stats"),
]


def _torch_pair(
    ours: type[BatchNorm], theirs: type[nn.Module], kwargs: dict[str, Any], c: int = 4
) -> tuple[nn.Module, nn.Module]:
    a = ours(c, **kwargs)
    b = theirs(c, **kwargs)
    randomize_params(b)
    a.load_state_dict(b.state_dict())
    return a, b


def _assert_identical_step(a: nn.Module, b: nn.Module, x: Tensor) -> None:
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    assert torch.equal(ya, yb)
    g = torch.randn_like(ya)
    ga = grads_of(ya, g, [xa, a.weight, a.bias])
    gb = grads_of(yb, g, [xb, b.weight, b.bias])
    for u, v in zip(ga, gb, strict=True):
        assert (u is None) == (v is None)
        if u is not None and v is not None:
            assert torch.equal(u, v)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("kwargs", TORCH_OPTIONS)
@pytest.mark.parametrize(("ours", "theirs", "shape"), TORCH_SHAPES)
def test_bit_identical_to_torch(
    ours: type[BatchNorm], theirs: type[nn.Module], shape: tuple[int, ...], kwargs: dict[str, Any]
) -> None:
    a, b = _torch_pair(ours, theirs, kwargs)
    for _ in range(3):
        _assert_identical_step(a, b, make_x(shape, dtype=torch.float32))
    a.eval()
    b.eval()
    for _ in range(2):
        _assert_identical_step(a, b, make_x(shape, dtype=torch.float32))
    a.train()
    b.train()
    _assert_identical_step(a, b, make_x(shape, dtype=torch.float32))


def test_bit_identical_to_torch_channels_last() -> None:
    a, b = _torch_pair(BatchNorm2d, nn.BatchNorm2d, {})
    for _ in range(3):
        x = make_x((4, 4, 3, 5), dtype=torch.float32).to(memory_format=torch.channels_last)
        _assert_identical_step(a, b, x)
    a.eval()
    b.eval()
    _assert_identical_step(a, b, make_x((4, 4, 3, 5), dtype=torch.float32))


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="default"),
        pytest.param({"affine": False}, id="affine-off"),
        pytest.param({"bias": False}, id="bias-off"),
        pytest.param({"track_running_stats": False}, id="no-running-stats"),
    ],
)
@pytest.mark.parametrize(("ours", "theirs", "shape"), TORCH_SHAPES)
def test_state_dict_keys_match_torch(
    ours: type[BatchNorm], theirs: type[nn.Module], shape: tuple[int, ...], kwargs: dict[str, Any]
) -> None:
    a, b = ours(4, **kwargs), theirs(4, **kwargs)
    assert list(a.state_dict()) == list(b.state_dict())
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]


def test_default_bnkit_batchnorm_keys_are_torchs() -> None:
    assert list(BatchNorm(3).state_dict()) == list(nn.BatchNorm1d(3).state_dict())


def _train(m: nn.Module, shape: tuple[int, ...], steps: int) -> None:
    m.train()
    for _ in range(steps):
        m(make_x(shape, dtype=torch.float32))


def test_load_torch_state_into_bnkit() -> None:
    theirs = nn.BatchNorm2d(4)
    randomize_params(theirs)
    _train(theirs, (4, 4, 3, 3), 3)
    ours = BatchNorm2d(4)
    ours.load_state_dict(theirs.state_dict())
    assert int(ours.num_batches_tracked) == 3
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v)
    ours.eval()
    theirs.eval()
    _assert_identical_step(ours, theirs, make_x((4, 4, 3, 3), dtype=torch.float32))
    ours.train()
    theirs.train()
    _assert_identical_step(ours, theirs, make_x((4, 4, 3, 3), dtype=torch.float32))


def test_load_bnkit_state_into_torch() -> None:
    ours = BatchNorm1d(4, momentum=None)
    randomize_params(ours)
    _train(ours, (6, 4, 5), 3)
    theirs = nn.BatchNorm1d(4, momentum=None)
    theirs.load_state_dict(ours.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[k], v)
    _assert_identical_step(ours, theirs, make_x((6, 4, 5), dtype=torch.float32))
    ours.eval()
    theirs.eval()
    _assert_identical_step(ours, theirs, make_x((6, 4, 5), dtype=torch.float32))


def test_plain_bnkit_batchnorm_loads_torch_state() -> None:
    theirs = nn.BatchNorm1d(3)
    randomize_params(theirs)
    _train(theirs, (8, 3), 2)
    ours = BatchNorm(3)
    ours.load_state_dict(theirs.state_dict())
    ours.eval()
    theirs.eval()
    x = make_x((5, 3), dtype=torch.float32)
    assert torch.equal(ours(x), theirs(x))


def _old_checkpoint(m: nn.Module, prefix: str = "") -> dict[str, Any]:
    """A state_dict as written before torch added num_batches_tracked (version 1)."""
    sd = m.state_dict()
    del sd[prefix + "num_batches_tracked"]
    sd._metadata[prefix.rstrip(".")]["version"] = 1  # type: ignore[attr-defined]
    return sd


@pytest.mark.parametrize("trained_before", [0, 3], ids=["fresh", "trained"])
def test_old_checkpoint_without_counter_loads_like_torch(trained_before: int) -> None:
    source = nn.BatchNorm2d(4)
    randomize_params(source)
    _train(source, (4, 4, 2, 2), 2)
    ours, theirs = BatchNorm2d(4), nn.BatchNorm2d(4)
    _train(ours, (4, 4, 2, 2), trained_before)
    _train(theirs, (4, 4, 2, 2), trained_before)
    ours.load_state_dict(_old_checkpoint(source))
    theirs.load_state_dict(_old_checkpoint(source))
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    assert torch.equal(ours.running_mean, source.running_mean)


def test_old_checkpoint_without_counter_loads_nested() -> None:
    source = nn.Sequential(nn.BatchNorm1d(3))
    _train(source, (4, 3), 2)
    target = nn.Sequential(BatchNorm1d(3))
    target.load_state_dict(_old_checkpoint(source, prefix="0."))
    assert torch.equal(target[0].running_var, source[0].running_var)
    assert int(target[0].num_batches_tracked) == 0


def test_new_checkpoint_missing_counter_is_an_error() -> None:
    sd = nn.BatchNorm1d(3).state_dict()
    del sd["num_batches_tracked"]
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        BatchNorm1d(3).load_state_dict(sd)


# -------------------------------------------------------------------- precision / dtypes


def test_half_module_keeps_float32_statistics() -> None:
    for m in (
        BatchNorm(3, dtype=torch.float16, renorm=True, zero_debias="mean"),
        BatchNorm(3, renorm=True, zero_debias="mean").half(),
        BatchNorm2d(3, zero_debias="both").to(torch.bfloat16),
    ):
        assert m.weight.dtype in (torch.float16, torch.bfloat16)
        for name, b in m.named_buffers():
            want = torch.long if name.endswith(("local_step", "num_batches_tracked")) else None
            assert b.dtype == (want or torch.float32), name
    m64 = BatchNorm(3).double()
    assert m64.running_mean.dtype == F64  # only half precision is kept back


HALF_OPTIONS = [
    pytest.param({}, None, id="default"),
    pytest.param({"renorm": True, "renorm_clipping": CLIP}, None, id="renorm-clip"),
    pytest.param({"virtual_batch_size": 2, "ghost_layout": "strided"}, None, id="ghost"),
    pytest.param({"zero_debias": "both", "warmup": True}, "sample", id="weights+zero_debias"),
    pytest.param({"axis": -1}, "mask", id="axis-1-mask"),
]


@pytest.mark.parametrize(("kwargs", "weights"), HALF_OPTIONS)
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("module_half", [False, True], ids=["float32-module", "half-module"])
def test_half_input(
    kwargs: dict[str, Any], weights: str | None, half: torch.dtype, module_half: bool
) -> None:
    shape = (8, 5, 3) if kwargs.get("axis") == -1 else (8, 3, 5)
    axis = int(kwargs.get("axis", 1))
    full = BatchNorm(3, **kwargs)
    randomize_params(full)
    low = copy.deepcopy(full)
    if module_half:
        low = low.to(half)
    tol = {"rtol": 2e-2, "atol": 2e-2} if half == torch.bfloat16 else {"rtol": 3e-3, "atol": 3e-3}
    for _ in range(3):
        x = make_x(shape, axis).to(half)  # the same (rounded) data for both modules
        w = make_weights(weights, x.float(), axis)
        y = low(x, weights=w)
        assert y.dtype == half
        y32 = full(x.float(), weights=w)
        assert_close(y.float(), y32, **tol)
        for (name, b), b32 in zip(low.named_buffers(), full.buffers(), strict=True):
            assert b.dtype == b32.dtype, name
            # statistics are accumulated in float32 from the same values
            assert_close(b.double(), b32.double(), rtol=1e-5, atol=1e-5, msg=name)
    low.eval()
    full.eval()
    x = make_x(shape, axis).to(half)
    assert_close(low(x).float(), full(x.float()), **tol)


def test_float16_large_variance_running_var_stays_finite() -> None:
    m = BatchNorm1d(2).half()
    x = (torch.randn(16, 2) * 400.0).half()  # variance ~ 160000 > float16 max
    m(x)
    assert m.running_var.dtype == torch.float32
    assert torch.isfinite(m.running_var).all()
    assert (m.running_var > 1000.0).all()


# ------------------------------------------------------------------- forward behaviour


def test_training_override_in_eval_mode() -> None:
    m = BatchNorm(3, dtype=F64, zero_debias="mean")
    ref = ReferenceBN(3, zero_debias="mean")
    m.eval()
    x = make_x((6, 3, 4))
    assert_close(m(x, training=True), ref.step(x).detach(), **TIGHT)
    assert not m.training
    assert_buffers_match(m, ref, **TIGHT)
    assert_close(m(x), ref.infer(x).detach(), **TIGHT)


def test_training_false_override_in_train_mode() -> None:
    m = BatchNorm(3, dtype=F64, renorm=True)
    m(make_x((6, 3)))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = make_x((6, 3))
    y = m(x, training=False)
    assert m.training
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    want = (x - m.running_mean) / torch.sqrt(m.running_var + m.eps) * m.weight + m.bias
    assert_close(y, want, **TIGHT)


def test_weights_forward_zero_weights_drop_samples() -> None:
    """0/1 weights give exactly the statistics of the kept samples (also the unbiased count)."""
    x = make_x((10, 3, 4))
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    weighted, plain = BatchNorm(3, dtype=F64), BatchNorm(3, dtype=F64)
    y = weighted(x, weights=keep.to(F64))
    y_kept = plain(x[keep])
    assert_close(y[keep], y_kept, **TIGHT)
    assert_close(weighted.running_mean, plain.running_mean, **TIGHT)
    assert_close(weighted.running_var, plain.running_var, **TIGHT)


def test_weights_forward_are_frequency_weights() -> None:
    """An integer weight k equals repeating the sample k times (tf.nn.weighted_moments)."""
    x = make_x((5, 3, 2))
    counts = torch.tensor([1, 3, 2, 1, 2])
    weighted, plain = BatchNorm(3, dtype=F64), BatchNorm(3, dtype=F64)
    y = weighted(x, weights=counts.to(F64))
    y_rep = plain(torch.repeat_interleave(x, counts, dim=0))
    starts = torch.cumsum(counts, 0) - counts
    assert_close(y, y_rep[starts], **TIGHT)
    assert_close(weighted.running_mean, plain.running_mean, **TIGHT)
    assert_close(weighted.running_var, plain.running_var, **TIGHT)


def test_weights_bad_shape_is_an_error() -> None:
    with pytest.raises(ValueError, match="do not broadcast"):
        BatchNorm(3)(torch.randn(4, 3), weights=torch.ones(5))


def test_adjustment_receives_input_shape_and_only_in_training() -> None:
    seen: list[torch.Size] = []

    def adjustment(shape: torch.Size) -> tuple[float, float]:
        seen.append(shape)
        return 2.0, 0.5

    m = BatchNorm(3, dtype=F64, adjustment=adjustment, eps=TINY_EPS)
    x = make_x((4, 3, 5))
    y = m(x)
    assert seen == [x.shape]
    mean = x.mean(dim=(0, 2), keepdim=True)
    var = x.var(dim=(0, 2), unbiased=False, keepdim=True)
    assert_close(y, 2.0 * (x - mean) / var.sqrt() + 0.5, **TIGHT)
    m.eval()
    m(x)
    assert len(seen) == 1


def test_callable_inits() -> None:
    m = BatchNorm(
        4,
        weight_init=nn.init.zeros_,
        bias_init=lambda t: t.fill_(0.5),
        running_mean_init=lambda t: t.copy_(torch.arange(4.0)),
        running_var_init=lambda t: t.fill_(4.0),
        renorm=True,
    )
    assert torch.equal(m.weight.data, torch.zeros(4))
    assert torch.equal(m.bias.data, torch.full((4,), 0.5))
    assert torch.equal(m.running_mean, torch.arange(4.0))
    assert torch.equal(m.renorm_mean, torch.arange(4.0))
    assert torch.equal(m.running_stddev, torch.full((4,), 2.0))
    assert torch.equal(m.renorm_stddev, torch.full((4,), 2.0))
    m(torch.randn(4, 4))
    m.reset_parameters()
    assert torch.equal(m.running_var, torch.full((4,), 4.0))
    assert torch.equal(m.renorm_stddev, torch.full((4,), 2.0))
    assert int(m.num_batches_tracked) == 0


def test_init_wrong_length_is_an_error() -> None:
    with pytest.raises(ValueError, match="has 2 values but the layer has 3"):
        BatchNorm(3, running_mean_init=[1.0, 2.0])


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="default"),
        pytest.param({"running_var": "biased"}, id="biased"),
        pytest.param({"renorm": True}, id="renorm"),
        pytest.param({"zero_debias": "both", "warmup": True}, id="zero_debias+warmup"),
        pytest.param({"virtual_batch_size": 2}, id="ghost"),
    ],
)
def test_empty_batch_in_training(kwargs: dict[str, Any]) -> None:
    """Empty output, no statistic moves; the call is counted on every path, as torch does."""
    m = BatchNorm(3, **kwargs)
    m(torch.randn(4, 3, 2))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert m(torch.empty(0, 3, 4)).shape == (0, 3, 4)
    assert m(torch.empty(0, 3, 4), weights=torch.empty(0)).shape == (0, 3, 4)
    for k, v in m.state_dict().items():
        if k == "num_batches_tracked":
            assert int(v) == int(before[k]) + 2
        else:
            assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("kwargs", [{}, {"momentum": None}], ids=["default", "momentum-None"])
def test_empty_batch_like_torch(kwargs: dict[str, Any]) -> None:
    a, b = _torch_pair(BatchNorm2d, nn.BatchNorm2d, kwargs)
    _assert_identical_step(a, b, make_x((4, 4, 2, 2), dtype=torch.float32))
    ya, yb = a(torch.empty(0, 4, 2, 2)), b(torch.empty(0, 4, 2, 2))
    assert ya.shape == yb.shape == (0, 4, 2, 2)
    for k, v in b.state_dict().items():
        assert torch.equal(a.state_dict()[k], v), k
    _assert_identical_step(a, b, make_x((4, 4, 2, 2), dtype=torch.float32))


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="default"),
        pytest.param({"renorm": True}, id="renorm"),
        pytest.param({"virtual_batch_size": 2, "ghost_layout": "strided"}, id="ghost"),
        pytest.param({"zero_debias": "both"}, id="zero_debias"),
    ],
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_output_stays_channels_last(kwargs: dict[str, Any], training: bool) -> None:
    m = BatchNorm2d(3, **kwargs).train(training)
    x = make_x((4, 3, 5, 5), dtype=torch.float32).to(memory_format=torch.channels_last)
    assert m(x).is_contiguous(memory_format=torch.channels_last)


def test_torch_signature_subclass_takes_bnkit_options() -> None:
    options = {"renorm": True, "virtual_batch_size": 2, "ghost_layout": "strided"}
    m = BatchNorm2d(3, 1e-3, 0.2, dtype=F64, **options)
    ref = ReferenceBN(3, eps=1e-3, momentum=0.2, **options)
    for _ in range(2):
        x = make_x((4, 3, 2, 2))
        assert_close(m(x), ref.step(x).detach(), **TIGHT)
        assert_buffers_match(m, ref, **TIGHT)


@pytest.mark.parametrize(
    "case", [p for p in CASES if p.id in {"renorm-inits", "inits+zero_debias-both", "inits"}]
)
def test_reset_running_stats_restores_initial_state(case: Case) -> None:
    m = BatchNorm(case.c, dtype=F64, **case.kwargs)
    for _ in range(2):
        m(make_x(case.shape, case.axis))
    m.reset_running_stats()
    assert_buffers_match(m, ReferenceBN(case.c, **case.kwargs), **TIGHT)


def test_no_running_stats_has_no_buffers_and_uses_batch_stats_in_eval() -> None:
    m = BatchNorm(3, track_running_stats=False, virtual_batch_size=2, dtype=F64).eval()
    assert dict(m.named_buffers()) == {}
    assert m.running_mean is None
    x = make_x((4, 3, 5))
    mean = x.mean(dim=(0, 2), keepdim=True)
    var = x.var(dim=(0, 2), unbiased=False, keepdim=True)
    # one batch for the statistics: no ghosts in eval
    assert_close(m(x), (x - mean) / torch.sqrt(var + m.eps), **TIGHT)


def test_num_batches_tracked_counts_training_calls_only() -> None:
    m = BatchNorm(3, warmup=True)
    for _ in range(3):
        m(torch.randn(4, 3))
    m(torch.randn(4, 3), training=False)
    m.eval()
    m(torch.randn(4, 3))
    assert int(m.num_batches_tracked) == 3


# ------------------------------------------------------------------------------- repr


@pytest.mark.parametrize(
    ("kwargs", "pieces"),
    [
        pytest.param({}, ["momentum=0.1", "decay=0.9"], id="default"),
        pytest.param({"decay": 0.999}, ["momentum=0.001", "decay=0.999"], id="decay"),
        pytest.param({"momentum": 0.01}, ["momentum=0.01", "decay=0.99"], id="momentum"),
        pytest.param({"momentum": None}, ["momentum=None", "cumulative"], id="cumulative"),
        pytest.param(
            {"renorm": True, "renorm_decay": 0.9},
            ["renorm=True", "renorm_momentum=0.1", "renorm_decay=0.9"],
            id="renorm",
        ),
        pytest.param(
            {"virtual_batch_size": 4, "ghost_layout": "strided", "running_var": "biased"},
            ["virtual_batch_size=4", "'strided'", "running_var='biased'"],
            id="ghost",
        ),
    ],
)
def test_repr_shows_both_conventions(kwargs: dict[str, Any], pieces: list[str]) -> None:
    text = repr(BatchNorm(3, **kwargs))
    assert text.startswith("BatchNorm(3")
    for piece in pieces:
        assert piece in text


def test_decay_and_momentum_attributes() -> None:
    m = BatchNorm(3, decay=0.999)
    assert m.momentum == pytest.approx(0.001, abs=1e-15)
    assert m.decay == pytest.approx(0.999, abs=1e-15)
    assert BatchNorm(3, momentum=None).decay is None
    assert BatchNorm(3, renorm=True).renorm_momentum == pytest.approx(0.01, abs=1e-15)
    assert BatchNorm(3, renorm=True, renorm_decay=0.9).renorm_momentum == pytest.approx(0.1)


def test_torch_signature_positional_arguments() -> None:
    m = BatchNorm2d(5, 1e-3, 0.2, False, True)
    assert (m.eps, m.momentum, m.affine, m.weight, m.bias) == (1e-3, 0.2, False, None, None)
    assert BatchNorm1d(3, bias=False).bias is None
    assert BatchNorm1d(3, bias=False).weight is not None


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        pytest.param(
            lambda: BatchNorm2d(3)(torch.randn(2, 3, 4)),
            ValueError,
            r"expected 4D input \(got 3D input",
            id="rank-2d",
        ),
        pytest.param(
            lambda: BatchNorm1d(3)(torch.randn(2, 3, 4, 4)),
            ValueError,
            r"expected 2D or 3D input",
            id="rank-1d",
        ),
        pytest.param(lambda: BatchNorm(3)(torch.randn(3)), ValueError, r"rank >= 2", id="rank-1"),
        pytest.param(
            lambda: BatchNorm(3)(torch.randn(4, 5, 2)),
            ValueError,
            r"expected 3 channels on axis 1.*got 5",
            id="channels",
        ),
        pytest.param(
            lambda: BatchNorm2d(3)(torch.randn(2, 5, 5, 3)),
            ValueError,
            r"channels-last.*axis=-1",
            id="channels-last-hint",
        ),
        pytest.param(
            lambda: BatchNorm(3, axis=-1)(torch.randn(2, 3, 5)),
            ValueError,
            r"axis=1",
            id="channels-first-hint",
        ),
        pytest.param(
            lambda: BatchNorm(3)(torch.randint(0, 3, (4, 3))),
            TypeError,
            r"floating-point",
            id="integer-input",
        ),
        pytest.param(
            lambda: BatchNorm(3)(torch.randn(1, 3)),
            ValueError,
            r"more than 1 value per channel",
            id="one-value",
        ),
        pytest.param(
            lambda: BatchNorm(3, virtual_batch_size=1)(torch.randn(4, 3)),
            ValueError,
            r"more than 1 value per channel",
            id="one-value-per-ghost",
        ),
        pytest.param(
            lambda: BatchNorm(3, momentum=0.1, decay=0.9),
            ValueError,
            r"either momentum .* or decay",
            id="momentum-and-decay",
        ),
        pytest.param(
            lambda: BatchNorm(3, momentum=1.5),
            ValueError,
            r"momentum must be in \[0, 1\]",
            id="momentum-range",
        ),
        pytest.param(
            lambda: BatchNorm(3, momentum=-0.1),
            ValueError,
            r"momentum must be in \[0, 1\]",
            id="momentum-negative",
        ),
        pytest.param(
            lambda: BatchNorm(3, decay=1.5),
            ValueError,
            r"decay must be in \[0, 1\]",
            id="decay-range",
        ),
        pytest.param(
            lambda: BatchNorm(3, renorm=True, renorm_momentum=0.1, renorm_decay=0.9),
            ValueError,
            r"renorm_momentum.*renorm_decay",
            id="renorm-momentum-and-decay",
        ),
        pytest.param(
            lambda: BatchNorm(3, renorm=True, renorm_clipping={"r_max": 3.0}),
            ValueError,
            r"unknown keys \['r_max'\]",
            id="renorm-clipping-key",
        ),
        pytest.param(
            lambda: BatchNorm(3, renorm_clipping={"rmax": 3.0}),
            ValueError,
            r"renorm=True",
            id="clipping-without-renorm",
        ),
        pytest.param(
            lambda: BatchNorm(3, virtual_batch_size=4)(torch.randn(6, 3)),
            ValueError,
            r"(?s)(?=.*\b6\b)(?=.*\b4\b).*not divisible",
            id="ghost-divisible",
        ),
        pytest.param(
            lambda: BatchNorm(3, activation="swishy"),
            ValueError,
            r"unknown activation 'swishy'",
            id="activation",
        ),
        pytest.param(
            lambda: BatchNorm(3, track_running_stats=False, renorm=True),
            ValueError,
            r"renorm.*track_running_stats=False",
            id="no-stats-renorm",
        ),
        pytest.param(
            lambda: BatchNorm(3, track_running_stats=False, warmup=True),
            ValueError,
            r"warmup.*track_running_stats=False",
            id="no-stats-warmup",
        ),
        pytest.param(
            lambda: BatchNorm(3, track_running_stats=False, zero_debias="mean"),
            ValueError,
            r"zero_debias.*track_running_stats=False",
            id="no-stats-zero-debias",
        ),
        pytest.param(
            lambda: BatchNorm(3, renorm=True, zero_debias="both"),
            ValueError,
            r"zero_debias='mean'",
            id="renorm-zero-debias-both",
        ),
        pytest.param(
            lambda: BatchNorm(3, momentum=None, warmup=True),
            ValueError,
            r"cumulative average",
            id="cumulative-warmup",
        ),
        pytest.param(
            lambda: BatchNorm(3, running_var="unbiassed"),
            ValueError,
            r"running_var must be",
            id="running-var-mode",
        ),
        pytest.param(
            lambda: BatchNorm(3, ghost_layout="interleaved"),
            ValueError,
            r"ghost_layout must be",
            id="ghost-layout",
        ),
        pytest.param(
            lambda: BatchNorm(3, virtual_batch_size=0),
            ValueError,
            r"virtual_batch_size must be a positive int",
            id="vbs-zero",
        ),
        pytest.param(
            lambda: BatchNorm(0), ValueError, r"num_features must be >= 1", id="num-features"
        ),
        pytest.param(
            lambda: BatchNorm2d(3, center=False), TypeError, r"affine", id="torch-signature-center"
        ),
        pytest.param(
            lambda: BatchNorm(3)(torch.randn(4, 3), weights=torch.zeros(4)),
            ValueError,
            r"weights sum to zero",
            id="zero-total-weight",
        ),
    ],
)
def test_errors(make: Callable[[], object], exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize("kernels", ["torch", "cpp"])
@pytest.mark.parametrize(
    "missing", [("running_mean",), ("running_var",), ("running_mean", "running_var")]
)
def test_training_without_running_buffers_says_what_to_do(
    missing: tuple[str, ...], kernels: str
) -> None:
    m = BatchNorm1d(3, policy={"kernels": kernels})
    for name in missing:
        setattr(m, name, None)
    with pytest.raises(ValueError, match=rf"its {' and '.join(missing)} is None") as info:
        m(torch.randn(4, 3))
    assert "track_running_stats = False" in str(info.value)
    assert "torch.zeros(3)" in str(info.value)


def test_error_leaves_state_untouched() -> None:
    m = BatchNorm(3, virtual_batch_size=4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="not divisible"):
        m(torch.randn(6, 3))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------------ Keras facts


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.5])
@pytest.mark.parametrize("shape_axis", [((8, 3, 5), 1), ((6, 4, 4, 3), -1)], ids=["nc", "nhwc"])
def test_renorm_first_step_returns_input(eps: float, shape_axis: tuple[Any, int]) -> None:
    """Default inits: renorm_stddev=1, renorm_mean=0, so r = σ_B, d = μ_B and y = x̂σ_B + μ_B = x."""
    shape, axis = shape_axis
    m = BatchNorm(shape[axis], axis=axis, eps=eps, renorm=True, dtype=F64)
    x = make_x(shape, axis)
    assert_close(m(x), x, **TIGHT)
    # the second step no longer returns x: renorm statistics moved by 1%
    assert not torch.allclose(m(x), x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["strided", "contiguous"])
def test_ghost_groups(layout: str) -> None:
    """N=6, v=2: strided ghosts are {j, j+3}; contiguous ghosts are {2j, 2j+1}.

    Each ghost holds c_g - s_g and c_g + s_g, so a ghost normalizes to exactly -1/+1
    (biased variance s_g²; eps far below its resolution), whatever the other ghosts contain.
    """
    centers, spreads = [10.0, -4.0, 1.0], [1.0, 3.0, 0.5]
    sign = [-1.0, +1.0]
    members = [[0, 3], [1, 4], [2, 5]] if layout == "strided" else [[0, 1], [2, 3], [4, 5]]
    x = torch.zeros(6, 2, dtype=F64)
    want = torch.zeros(6, 2, dtype=F64)
    for g, (i, j) in enumerate(members):
        for k, n in enumerate((i, j)):
            x[n] = centers[g] + sign[k] * spreads[g]
            want[n] = sign[k]
    m = BatchNorm(
        2,
        eps=TINY_EPS,
        virtual_batch_size=2,
        ghost_layout=layout,
        running_var="biased",
        momentum=1.0,
        dtype=F64,
    )
    assert_close(m(x), want, **TIGHT)
    # running statistics: one update with the average over ghosts
    assert_close(m.running_mean, torch.full((2,), sum(centers) / 3, dtype=F64), **TIGHT)
    var = sum(s * s for s in spreads) / 3
    assert_close(m.running_var, torch.full((2,), var, dtype=F64), **TIGHT)
    m_unbiased = BatchNorm(
        2, eps=TINY_EPS, virtual_batch_size=2, ghost_layout=layout, momentum=1.0, dtype=F64
    )
    m_unbiased(x)
    assert_close(m_unbiased.running_var, torch.full((2,), 2 * var, dtype=F64), **TIGHT)
    # in eval there are no ghosts: the running statistics normalize every sample alike
    m.eval()
    assert_close(m(x), (x - m.running_mean) / m.running_var.sqrt(), **TIGHT)


def test_strided_and_contiguous_ghosts_differ() -> None:
    x = make_x((8, 3, 2))
    a = BatchNorm(3, virtual_batch_size=2, ghost_layout="strided", dtype=F64)
    b = BatchNorm(3, virtual_batch_size=2, ghost_layout="contiguous", dtype=F64)
    assert not torch.allclose(a(x), b(x))
    # re-ordering the batch so strided ghosts become contiguous gives the same result
    order = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])
    c = BatchNorm(3, virtual_batch_size=2, ghost_layout="contiguous", dtype=F64)
    assert_close(c(x[order]), a(x)[order], **TIGHT)


@pytest.mark.parametrize("init", [0.0, 5.0, -123.0])
@pytest.mark.parametrize("decay", [0.9, 0.999])
def test_zero_debias_first_step_is_batch_mean(init: float, decay: float) -> None:
    m = BatchNorm(3, decay=decay, zero_debias="mean", running_mean_init=init, dtype=F64)
    x = make_x((6, 3, 4))
    m(x)
    assert_close(m.running_mean, x.mean(dim=(0, 2)), rtol=1e-12, atol=1e-12)
    # the variance is not debiased with zero_debias="mean"
    want_var = (1 - (1 - decay)) * 1.0 + (1 - decay) * x.var(dim=(0, 2))
    assert_close(m.running_var, want_var, rtol=1e-12, atol=1e-12)


def test_zero_debias_both_first_step_is_batch_stats() -> None:
    m = BatchNorm(3, decay=0.99, zero_debias="both", running_var_init=100.0, dtype=F64)
    x = make_x((6, 3, 4))
    m(x)
    assert_close(m.running_mean, x.mean(dim=(0, 2)), rtol=1e-12, atol=1e-12)
    assert_close(m.running_var, x.var(dim=(0, 2)), rtol=1e-12, atol=1e-12)


def test_zero_debias_matches_tensorflow_numbers() -> None:
    """TF assign_moving_average(zero_debias=True, decay=0.9): 2, 4, 6 give 2, 3.0526, 4.1402."""
    m = BatchNorm(1, decay=0.9, zero_debias="mean", dtype=F64)
    got = []
    for v in (2.0, 4.0, 6.0):
        m(torch.tensor([[v - 1.0], [v + 1.0]], dtype=F64))
        got.append(float(m.running_mean))
    assert got == pytest.approx([2.0, 3.0526, 4.1402], abs=1e-4)


def test_warmup_first_decay_is_point_one() -> None:
    """TF num_updates rule: the first effective decay is min(decay, 1/10) = 0.1."""
    m = BatchNorm(2, decay=0.999, warmup=True, dtype=F64)
    x = make_x((5, 2))
    m(x)
    assert_close(m.running_mean, 0.9 * x.mean(0), **TIGHT)


def test_renorm_running_var_is_relu_of_stddev_square() -> None:
    m = BatchNorm(2, renorm=True, running_var_init=1e-9, eps=1e-3, momentum=0.0, dtype=F64)
    x = make_x((4, 2))
    m(x)
    # momentum 0: stddev stays sqrt(1e-9) and running_var = relu(1e-9 - 1e-3) = 0
    assert torch.equal(m.running_var, torch.zeros(2, dtype=F64))


def test_momentum_is_assignable_like_torch() -> None:
    # Recalibration code (fvcore, torch.optim.swa_utils) sets bn.momentum = None to switch
    # to a cumulative average; the assignment must take effect.
    bn = BatchNorm1d(3)
    batches = [torch.randn(8, 3, dtype=torch.float32) * (i + 1) for i in range(3)]
    bn.momentum = None
    for b in batches:
        bn(b)
    want = torch.stack([b.mean(0) for b in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, want)
    assert "cumulative" in repr(bn)

    bn.decay = 0.75
    assert bn.momentum == pytest.approx(0.25)
    bn.warmup = True
    assert bn.warmup
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bn.momentum = 1.5
    with pytest.raises(AttributeError):
        bn.zero_debias = "mean"  # decides the buffers, so it is fixed at construction


def test_empty_training_batch_gives_zero_parameter_gradients_like_torch() -> None:
    ours, theirs = BatchNorm2d(2, renorm=True), nn.BatchNorm2d(2)
    for layer in (ours, theirs):
        layer(torch.randn(0, 2, 3, 3, requires_grad=True)).sum().backward()
    assert torch.equal(ours.weight.grad, theirs.weight.grad)
    assert torch.equal(ours.bias.grad, theirs.bias.grad)


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_eps_must_be_positive(eps: float) -> None:
    with pytest.raises(ValueError, match="eps must be > 0"):
        BatchNorm(3, eps=eps)


def test_input_dtype_must_match_a_full_precision_layer() -> None:
    layer = BatchNorm2d(3).double()
    with pytest.raises(TypeError, match=r"x\.to\(torch\.float64\)"):
        layer(torch.randn(4, 3, 2, 2))
    layer.eval()
    with pytest.raises(TypeError, match="float32 input"):
        layer(torch.randn(4, 3, 2, 2))
    # Half input into a float32 layer is mixed precision, not a mismatch.
    assert BatchNorm2d(3)(torch.randn(4, 3, 2, 2, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_loading_torch_state_into_renorm_layer_derives_its_statistics() -> None:
    source = nn.BatchNorm2d(3)
    with torch.no_grad():
        source.running_mean.fill_(2.0)
        source.running_var.fill_(4.0)
    layer = BatchNorm2d(3, renorm=True)
    layer.load_state_dict(source.state_dict())  # strict: the renorm keys are derived
    assert torch.equal(layer.running_stddev, torch.full((3,), 2.0))
    assert torch.equal(layer.renorm_mean, torch.full((3,), 2.0))
    assert torch.equal(layer.renorm_stddev, torch.full((3,), 2.0))
    # One training step must move the loaded variance slightly, not reset it.
    layer(torch.randn(8, 3, 4, 4))
    assert bool((layer.running_var > 3.0).all())


def test_loading_torch_state_into_zero_debias_layer_starts_shadows_at_zero() -> None:
    layer = BatchNorm2d(3, zero_debias="both")
    layer.load_state_dict(nn.BatchNorm2d(3).state_dict())
    assert torch.equal(layer.running_mean_biased, torch.zeros(3))
    assert int(layer.running_var_local_step) == 0
