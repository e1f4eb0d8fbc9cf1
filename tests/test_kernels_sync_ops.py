"""The C++ operators of the synchronized kernel path against closed-form float64 math.

``bn_stats(..., float64=True)``, ``bn_normalize(..., relu=True)``, ``bn_grad_sums`` and
``bn_grad_apply`` (the halves of a training step that leave room for a collective in between;
the processes themselves are tested in ``test_distributed.py``). The oracle for the input
gradient is autograd through a float64 batch norm whose statistics the gradient flows
through: splitting the sums of one batch into "ranks" and adding their terms must give it.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from bnkit.kernels import cpp

F64 = torch.float64
EPS = 1e-3

# (shape, memory layout): blocks and rows layouts, C = 1, HW = 1, odd widths, 2-D, long runs.
GRID = [
    ((4, 3, 5, 7), "contiguous"),
    ((4, 3, 5, 7), "channels_last"),
    ((3, 1, 9, 11), "contiguous"),
    ((5, 17, 1, 1), "channels_last"),
    ((2, 3, 50, 47), "contiguous"),
    ((3, 5, 13), "contiguous"),
    ((2, 3, 3, 4, 5), "channels_last_3d"),
    ((7, 5), "contiguous"),
    ((3000, 2), "contiguous"),
    ((4, 6, 5, 7), "strided"),
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def built() -> None:
    cpp.load()  # a build failure is a test error here, never a skip


def _make(shape: tuple[int, ...], layout: str, dtype: torch.dtype, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":
        wide = torch.randn((*shape[:-1], 2 * shape[-1]), generator=g, dtype=F64) * 1.5 + 2
        return wide[..., ::2].to(dtype)
    x = (torch.randn(shape, generator=g, dtype=F64) * 1.5 + 2).to(dtype)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_3d":
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def _per_channel(t: Tensor) -> Tensor:
    """(values, C) float64 view of t with the channels on dim 1."""
    return t.to(F64).movedim(1, -1).reshape(-1, t.shape[1])


def _broadcast(v: Tensor, ndim: int) -> Tensor:
    return v.to(F64).view([1, -1] + [1] * (ndim - 2))


def _tol(dtype: torch.dtype) -> dict[str, float]:
    if dtype == torch.float64:
        return {"rtol": 1e-10, "atol": 1e-10}
    if dtype == torch.float32:
        return {"rtol": 1e-4, "atol": 1e-4}
    # Inputs and outputs in half precision: the outputs carry their rounding (2^-8, 2^-11
    # relative) at magnitudes up to ~10.
    return {"rtol": 2e-2, "atol": 5e-2}


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "layout"), GRID)
def test_float64_moments(shape: tuple[int, ...], layout: str, dtype: torch.dtype) -> None:
    x = _make(shape, layout, dtype, 1)
    mean, var = cpp.bn_stats(x, float64=True)
    assert mean.dtype == var.dtype == F64
    rows = _per_channel(x)
    # Runs of values are summed in the accumulation type (float32 below float64 input).
    close = {"rtol": 1e-11, "atol": 1e-11} if dtype == F64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(mean, rows.mean(0), **close)
    torch.testing.assert_close(var, rows.var(0, unbiased=False), **close)
    narrow_mean, _ = cpp.bn_stats(x)
    assert narrow_mean.dtype == (F64 if dtype == F64 else torch.float32)
    torch.testing.assert_close(narrow_mean, mean.to(narrow_mean.dtype))


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "layout"), GRID)
def test_normalize_with_relu(
    shape: tuple[int, ...], layout: str, dtype: torch.dtype, relu: bool
) -> None:
    x = _make(shape, layout, dtype, 2)
    c = x.shape[1]
    mean = torch.linspace(1.5, 2.5, c, dtype=F64)
    scale = torch.linspace(0.5, 1.5, c, dtype=F64)
    shift = torch.linspace(-0.5, 0.5, c, dtype=F64)
    y = cpp.bn_normalize(x, mean, scale, shift, relu=relu)
    expected = (x.to(F64) - _broadcast(mean, x.ndim)) * _broadcast(scale, x.ndim)
    expected = expected + _broadcast(shift, x.ndim)
    if relu:
        expected = expected.clamp_min(0.0)
    assert y.dtype == x.dtype
    if layout != "strided":
        assert y.stride() == x.stride()
    torch.testing.assert_close(y.to(F64), expected, **_tol(dtype))
    if relu:
        assert bool((y >= 0).all())


def _reference_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Float64 (mean, 1/sqrt(var + eps)) per channel."""
    rows = _per_channel(x)
    return rows.mean(0), torch.rsqrt(rows.var(0, unbiased=False) + EPS)


def _reference_grad(x: Tensor, w: Tensor, b: Tensor, dy: Tensor, mask: Tensor | None) -> Tensor:
    """dx of a float64 batch norm whose statistics the gradient flows through (autograd); the
    ReLU's mask given (the kernel's own output > 0, so both agree at values that round to 0)."""
    xr = x.to(F64).requires_grad_()
    dims = [d for d in range(x.ndim) if d != 1]
    mean = xr.mean(dims, keepdim=True)
    var = xr.var(dims, unbiased=False, keepdim=True)
    y = (xr - mean) * torch.rsqrt(var + EPS) * _broadcast(w, x.ndim) + _broadcast(b, x.ndim)
    if mask is not None:
        y = y * mask
    (dx,) = torch.autograd.grad(y, xr, dy.to(F64))
    return dx


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "layout"), GRID)
def test_split_backward_equals_the_full_gradient(
    shape: tuple[int, ...], layout: str, dtype: torch.dtype, relu: bool
) -> None:
    x = _make(shape, layout, dtype, 3)
    dy = _make(shape, layout, dtype, 4) - 2
    c = x.shape[1]
    w = torch.linspace(0.5, 1.5, c, dtype=F64)
    b = torch.linspace(-0.3, 0.3, c, dtype=F64)
    mean, invstd = _reference_moments(x)
    output = cpp.bn_normalize(x, mean, w * invstd, b, relu=True) if relu else None
    mask = None if output is None else (output > 0).to(F64)
    dx_ref = _reference_grad(x, w, b, dy, mask)

    sums = cpp.bn_grad_sums(dy, x, mean, output=output)
    assert sums.shape == (2, c)
    assert sums.dtype == F64
    grad = _per_channel(dy.to(F64) * (1.0 if mask is None else mask))
    centered = _per_channel(x) - mean
    atol = 1e-8 if dtype == F64 else 1e-2 * grad.abs().sum(0).max().item() * 1e-3 + 1e-4
    torch.testing.assert_close(sums[0], grad.sum(0), rtol=1e-5, atol=atol)
    torch.testing.assert_close(sums[1], (grad * centered).sum(0), rtol=1e-5, atol=atol)

    # One "rank" here: its ∂L/∂μ and ∂L/∂σ² are the whole batch's.
    k = w * invstd
    count = float(x.numel() // c)
    grad_mean, grad_var = -k * sums[0], -0.5 * k * invstd * invstd * sums[1]
    dx = cpp.bn_grad_apply(dy, x, mean, invstd, w, grad_mean, grad_var, count, output=output)
    assert dx.dtype == x.dtype
    if layout != "strided":
        assert dx.stride() == x.stride()
    torch.testing.assert_close(dx.to(F64), dx_ref, **_tol(dtype))


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("ranks", [2, 3])
def test_terms_added_over_parts_give_the_whole_batch_gradient(ranks: int) -> None:
    # Split the batch into "ranks", sum each part's ∂L/∂μ, ∂L/∂σ² terms (what the all-reduce
    # does), apply them to each part with the global count: the parts' gradients make the
    # whole batch's.
    x = _make((9, 4, 3, 3), "channels_last", F64, 5)
    dy = _make((9, 4, 3, 3), "channels_last", F64, 6) - 2
    w = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=F64)
    b = torch.zeros(4, dtype=F64)
    mean, invstd = _reference_moments(x)
    dx_ref = _reference_grad(x, w, b, dy, None)
    parts = [
        (x[i::ranks].contiguous(memory_format=torch.channels_last), dy[i::ranks])
        for i in range(ranks)
    ]
    k = w * invstd
    terms = [cpp.bn_grad_sums(d, xp, mean) for xp, d in parts]
    grad_mean = sum(-k * t[0] for t in terms)
    grad_var = sum(-0.5 * k * invstd * invstd * t[1] for t in terms)
    assert isinstance(grad_mean, Tensor)
    assert isinstance(grad_var, Tensor)
    for i, (xp, d) in enumerate(parts):
        dx = cpp.bn_grad_apply(d, xp, mean, invstd, w, grad_mean, grad_var, float(9 * 9))
        torch.testing.assert_close(dx, dx_ref[i::ranks], rtol=1e-10, atol=1e-10)
        # The part's own sums alone give a different (wrong here) gradient: the test can fail.
        own = cpp.bn_grad_apply(
            d, xp, mean, invstd, w, -k * terms[i][0], -0.5 * k * invstd**2 * terms[i][1], 81.0
        )
        assert not torch.allclose(own, dx_ref[i::ranks], rtol=1e-3, atol=1e-3)


@pytest.mark.usefixtures("built")
def test_empty_batch_and_bad_arguments() -> None:
    empty = torch.zeros(0, 3, 2, 2)
    mean, invstd = torch.zeros(3), torch.ones(3)
    assert torch.equal(cpp.bn_grad_sums(empty, empty, mean), torch.zeros(2, 3, dtype=F64))
    assert cpp.bn_grad_apply(empty, empty, mean, invstd, None, mean, mean, 1.0).shape == (
        0,
        3,
        2,
        2,
    )
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(RuntimeError, match="grad_out shape"):
        cpp.bn_grad_sums(torch.randn(4, 3, 2, 1), x, mean)
    with pytest.raises(RuntimeError, match="output shape"):
        cpp.bn_grad_sums(x, x, mean, output=torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="mean must have 3 values"):
        cpp.bn_grad_sums(x, x, torch.zeros(4))
    with pytest.raises(RuntimeError, match="count must be positive"):
        cpp.bn_grad_apply(x, x, mean, invstd, None, mean, mean, 0.0)
    with pytest.raises(RuntimeError, match="grad_var must have 3 values"):
        cpp.bn_grad_apply(x, x, mean, invstd, None, mean, torch.zeros(2), 16.0)


@pytest.mark.usefixtures("built")
def test_ops_registered_for_tracing() -> None:
    x = torch.randn(4, 3, 5, 5)
    mean, ones = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    torch.library.opcheck(torch.ops.bnkit.bn_stats.default, (x, True))
    torch.library.opcheck(torch.ops.bnkit.bn_normalize.default, (x, mean, ones, mean, True))
    torch.library.opcheck(torch.ops.bnkit.bn_grad_sums.default, (x, x, mean, None))
    torch.library.opcheck(
        torch.ops.bnkit.bn_grad_apply.default, (x, x, mean, ones, None, mean, ones, 100.0, x)
    )


def _weights_for(x: Tensor, kind: str, seed: int) -> tuple[Tensor, Tensor]:
    """(weights in the kernels' form, the same broadcast to x) for per-sample or per-position
    weights of x (channels on dim 1)."""
    g = torch.Generator().manual_seed(seed)
    n, spatial = x.shape[0], list(x.shape[2:])
    if kind == "sample":
        w = torch.rand(n, generator=g, dtype=F64) + 0.2
        return w, w.reshape([n, 1] + [1] * len(spatial))
    w = (torch.rand([n, *spatial], generator=g, dtype=F64) > 0.3).to(F64)  # a 0/1 mask
    w.view(-1)[0] = 1.0
    return w.reshape(-1), w.reshape([n, 1, *spatial])


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("kind", ["sample", "position"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("shape", "layout"), [g for g in GRID if g[1] != "strided"])
def test_weighted_moments_and_gradient(
    shape: tuple[int, ...], layout: str, dtype: torch.dtype, kind: str
) -> None:
    x = _make(shape, layout, dtype, 7)
    dy = _make(shape, layout, dtype, 8) - 2
    samples, w = _weights_for(x, kind, 9)
    c = x.shape[1]
    dims = [d for d in range(x.ndim) if d != 1]
    full_w = w.expand(x.shape).to(F64)
    total = full_w.sum(dims)
    x64 = x.to(F64)
    mean_ref = (full_w * x64).sum(dims) / total
    var_ref = (full_w * (x64 - _broadcast(mean_ref, x.ndim)) ** 2).sum(dims) / total
    mean, var = cpp.bn_stats(x, float64=True, sample_weight=samples.to(dtype))
    close = {"rtol": 1e-10, "atol": 1e-10} if dtype == F64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(mean, mean_ref, **close)
    torch.testing.assert_close(var, var_ref, **close)

    # The gradient of a weighted batch norm whose statistics it flows through, one "rank".
    gamma = torch.linspace(0.5, 1.5, c, dtype=F64)
    xr = x64.clone().requires_grad_()
    m = (full_w * xr).sum(dims, keepdim=True) / _broadcast(total, x.ndim)
    v = (full_w * (xr - m) ** 2).sum(dims, keepdim=True) / _broadcast(total, x.ndim)
    y = (xr - m) * torch.rsqrt(v + EPS) * _broadcast(gamma, x.ndim)
    (dx_ref,) = torch.autograd.grad(y, xr, dy.to(F64))
    invstd = torch.rsqrt(var_ref + EPS)
    sums = cpp.bn_grad_sums(dy, x, mean_ref)
    k = gamma * invstd
    dx = cpp.bn_grad_apply(
        dy,
        x,
        mean_ref,
        invstd,
        gamma,
        -k * sums[0],
        -0.5 * k * invstd**2 * sums[1],
        float(total[0]),
        sample_weight=samples.to(dtype),
    )
    torch.testing.assert_close(dx.to(F64), dx_ref, **_tol(dtype))


@pytest.mark.usefixtures("built")
def test_weights_that_sum_to_zero() -> None:
    x = torch.randn(4, 3, 2, 2)
    zero = torch.zeros(4)
    with pytest.raises(ValueError, match="sum to zero"):
        cpp.bn_stats(x, float64=True, sample_weight=zero)
    # The gradient pass divides by a total over every process: this one's may be zero, and
    # then only the direct term γ·invstd·dy is left.
    mean, ones = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    dx = cpp.bn_grad_apply(x, x, mean, 2 * ones, None, ones, ones, 10.0, sample_weight=zero)
    torch.testing.assert_close(dx, 2 * x)
