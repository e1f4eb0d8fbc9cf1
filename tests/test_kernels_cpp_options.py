"""The options of the C++ training kernel (``cpp.train``) against closed-form float64 math.

Ghost batches (contiguous and strided), batch renormalization with and without clipping, the
fused ReLU, optional affine parameters, half-precision input, the autograd formula
(``bnkit::bn_backward``), tracing (opcheck, ``torch.compile``), the output pool and the errors.

The oracle (:func:`reference_train`) is written from the formulas of the operator's
documentation only: per (ghost, channel) mean and biased variance over the ghost's samples
and every position, ``x̂ = (x − μ_gc)/sqrt(σ²_gc + eps)``, renorm's ``r, d`` from the
ghost-averaged statistics (detached), ``y = act(γ·(x̂·r + d) + β)``; gradients come from
autograd through it in float64.

The shapes are chosen to reach every code path of ``bn_kernels.cpp`` (see ``CASES``); the
extension is built once per module (a build failure is a test error, never a skip).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bnkit.kernels import cpp

F64 = torch.float64
EPS = 1e-5
HALF = [torch.bfloat16, torch.float16]

# (shape, layout) and the path of bn_kernels.cpp each one takes.
CASES = [
    # blocks, C >= threads: tiles of channels; inner >= 64: one loop per (sample, channel)
    ((8, 4, 16, 16), "contiguous"),
    ((8, 4, 16, 16), "channels_last"),  # rows layout
    # tiles with inner < 64 and at least 32 samples per ghost: one loop per sample over the
    # tile, per-channel constants spread
    ((32, 6, 3, 5), "contiguous"),
    ((16, 6, 3, 5), "contiguous"),  # ... fewer samples: one loop per (sample, channel)
    ((16, 6, 3, 5), "channels_last"),
    # ... and N > 2048: the element-wise sums are folded into float64 every 2048 samples
    ((2052, 2, 3), "contiguous"),
    ((4, 3, 48, 48), "contiguous"),  # inner > 2048: two runs per (sample, channel)
    ((8, 40, 20, 20), "channels_last"),  # rows: a ghost spans several row pieces
    # rows in ghosts small enough for the cache (float32): one task per ghost, which sums,
    # finishes and normalizes it; with two ghosts each spans two row pieces (128 + 16 rows)
    ((8, 512, 6, 6), "channels_last"),
    ((12, 1, 6, 7), "contiguous"),  # C = 1
    ((12, 5, 1, 1), "contiguous"),  # HW = 1 (rows: inner == 1)
    ((12, 5, 1, 1), "channels_last"),
    ((24, 19), "contiguous"),  # (N, C), C not a multiple of the vector width
    ((8, 5, 13), "contiguous"),  # (N, C, L)
    ((8, 5, 13), "transposed"),  # (N, L, C) memory seen as (N, C, L): rows, no copy
    ((8, 6, 5, 7), "sliced"),  # non-contiguous view: copied first
    ((16, 6, 3, 5), "permuted"),  # (C, N, H, W) memory: copied first
    ((8, 6, 5, 5), "sliced_channels_last"),  # a slice of a channels-last tensor: copied
]
CASE_IDS = [f"{'x'.join(map(str, s))}-{layout}" for s, layout in CASES]


@dataclass(frozen=True)
class Options:
    name: str
    ghosts: int = 1
    strided: bool = False
    renorm: str | None = None  # None, "free", "clipped" (rmin, rmax, dmax) or "rmax" (rmax only)
    relu: bool = False
    weight: bool = True
    bias: bool = True
    stats_grad: bool = False  # the loss also uses the mean and var outputs


OPTIONS = [
    Options("plain"),
    Options("no-affine", weight=False, bias=False, stats_grad=True),
    Options("weight-only-relu", bias=False, relu=True),
    Options("bias-only-g2", weight=False, ghosts=2, stats_grad=True),
    Options("g2-relu", ghosts=2, relu=True),
    Options("g2-strided", ghosts=2, strided=True, stats_grad=True),
    Options("g4-renorm", ghosts=4, renorm="free", stats_grad=True),
    Options("g4-strided-clip-relu", ghosts=4, strided=True, renorm="clipped", relu=True),
    Options("clip-no-affine", renorm="clipped", weight=False, bias=False, stats_grad=True),
    Options("g2-strided-rmax-relu", ghosts=2, strided=True, renorm="rmax", relu=True),
]


@pytest.fixture(scope="module")
def built() -> None:
    cpp.load()  # raises (test error) if the extension cannot be built here


# ------------------------------------------------------------------------------ helpers


def make(
    shape: tuple[int, ...], layout: str, dtype: torch.dtype, *, loc: float = 2.0, scale: float = 1.5
) -> torch.Tensor:
    """Random input of ``shape`` in the given memory layout (values N(loc, scale²))."""

    def draw(s: tuple[int, ...]) -> torch.Tensor:
        return (torch.randn(s, dtype=F64) * scale + loc).to(dtype)

    if layout == "contiguous":
        return draw(shape)
    if layout == "channels_last":
        return draw(shape).contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        n, c, length = shape
        x = draw((n, length, c)).transpose(1, 2)
        assert not x.is_contiguous()
        assert x.movedim(1, -1).is_contiguous()
        return x
    if layout == "sliced":
        x = draw((*shape[:-1], 2 * shape[-1]))[..., ::2]
    elif layout == "permuted":
        x = draw((shape[1], shape[0], *shape[2:])).transpose(0, 1)
    elif layout == "sliced_channels_last":
        wide = draw((*shape[:-1], 2 * shape[-1])).contiguous(memory_format=torch.channels_last)
        x = wide[..., ::2]
    else:
        raise AssertionError(layout)
    # The copy path: neither NC... contiguous nor channels-innermost.
    assert not x.is_contiguous()
    assert not x.movedim(1, -1).is_contiguous()
    return x


def ghost_indices(n: int, ghosts: int, strided: bool) -> list[torch.Tensor]:
    """Sample indices of each ghost: [g·v, (g+1)·v), or g, g+G, g+2G, … when strided."""
    if strided:
        return [torch.arange(g, n, ghosts) for g in range(ghosts)]
    v = n // ghosts
    return [torch.arange(g * v, (g + 1) * v) for g in range(ghosts)]


@dataclass
class Reference:
    y: torch.Tensor  # after the activation
    pre: torch.Tensor  # before the activation
    core: torch.Tensor  # x̂·r + d
    mean: torch.Tensor  # (G, C)
    var: torch.Tensor  # (G, C), biased
    r: torch.Tensor  # (C,) (ones without renorm)
    d: torch.Tensor  # (C,) (zeros without renorm)


def reference_train(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    ghosts: int = 1,
    strided: bool = False,
    renorm_mean: torch.Tensor | None = None,
    renorm_std: torch.Tensor | None = None,
    rmin: float | None = None,
    rmax: float | None = None,
    dmax: float | None = None,
    relu: bool = False,
) -> Reference:
    """Closed-form training batch norm in float64; differentiable in x, weight, bias."""
    assert x.dtype == F64
    n, c = x.shape[:2]
    bshape = [1, c] + [1] * (x.ndim - 2)
    dims = [0, *range(2, x.ndim)]
    idx = ghost_indices(n, ghosts, strided)
    means, variances = [], []
    for i in idx:
        xg = x[i]
        m = xg.mean(dims)
        means.append(m)
        variances.append(((xg - m.view(bshape)) ** 2).mean(dims))
    mean, var = torch.stack(means), torch.stack(variances)
    if renorm_std is not None:
        assert renorm_mean is not None
        mu_bar, var_bar = mean.detach().mean(0), var.detach().mean(0)
        s = torch.clamp(renorm_std.to(F64), min=math.sqrt(eps))
        r = torch.sqrt(var_bar + eps) / s
        d = (mu_bar - renorm_mean.to(F64)) / s
        if rmin is not None:
            r = torch.clamp(r, min=rmin)
        if rmax is not None:
            r = torch.clamp(r, max=rmax)
        if dmax is not None:
            d = torch.clamp(d, -dmax, dmax)
    else:
        r, d = torch.ones(c, dtype=F64), torch.zeros(c, dtype=F64)
    gamma = weight.to(F64) if weight is not None else torch.ones(c, dtype=F64)
    beta = bias.to(F64) if bias is not None else torch.zeros(c, dtype=F64)
    pieces = []
    for g, i in enumerate(idx):
        xhat = (x[i] - mean[g].view(bshape)) / torch.sqrt(var[g].view(bshape) + eps)
        pieces.append(xhat * r.view(bshape) + d.view(bshape))
    core = torch.cat(pieces)[torch.argsort(torch.cat(idx))]  # back in sample order
    pre = gamma.view(bshape) * core + beta.view(bshape)
    y = torch.clamp(pre, min=0.0) if relu else pre
    return Reference(y, pre, core, mean, var, r, d)


def renorm_kwargs(x: torch.Tensor, kind: str | None) -> dict[str, object]:
    """renorm_mean/renorm_std (and clipping) that put r and d where ``kind`` wants them.

    Per channel c (pattern c mod 4): renorm_std = factor·std_c and renorm_mean =
    μ_c + offset·std_c, so r ≈ 1/factor and d ≈ −offset/factor (μ_c, std_c of the whole batch).
    """
    if kind is None:
        return {}
    x64 = x.to(F64).movedim(1, -1).reshape(-1, x.shape[1])
    mu, std = x64.mean(0), x64.std(0, correction=0)
    c = x.shape[1]
    if kind == "free":
        # r ≈ 2, 0.77, 0.5; the 4th channel's renorm_std is below sqrt(eps): s = sqrt(eps).
        factor = torch.tensor([0.5, 1.3, 2.0, 0.0], dtype=F64)[torch.arange(c) % 4]
        offset = torch.tensor([0.7, -0.3, 1.1, 0.2], dtype=F64)[torch.arange(c) % 4]
        renorm_std = torch.where(factor > 0, factor * std, torch.full_like(std, 1e-4))
        return {"renorm_mean": mu + offset * std, "renorm_std": renorm_std}
    # r ≈ 10 (clipped to 3), ≈ 1, ≈ 0.1 (clipped to 1/3), ≈ 5 (clipped to 3);
    # d ≈ −30 (clipped to −2), 0.5, 0.6, 10 (clipped to 2).
    factor = torch.tensor([0.1, 1.0, 10.0, 0.2], dtype=F64)[torch.arange(c) % 4]
    offset = torch.tensor([3.0, -0.5, -6.0, -2.0], dtype=F64)[torch.arange(c) % 4]
    out: dict[str, object] = {"renorm_mean": mu + offset * std, "renorm_std": factor * std}
    if kind == "clipped":
        out.update(rmin=1 / 3, rmax=3.0, dmax=2.0)
    elif kind == "rmax":
        out.update(rmax=3.0)
    else:
        raise AssertionError(kind)
    return out


def max_abs(t: torch.Tensor) -> float:
    return float(t.abs().max().item()) if t.numel() else 0.0


def assert_near(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Elementwise, with an absolute floor relative to the largest expected value.

    float32: 1e-4 relative (float32 runs of up to 2048 shifted values sum with errors of some
    1e-5 relative to the variance), with an absolute floor of 1e-5 of the largest value
    (renorm's r and d can reach the 1/sqrt(eps) scale). float64: 1e-10.
    """
    scale = max(1.0, max_abs(want))
    if dtype == F64:
        rtol, atol = 1e-10, 1e-10 * scale
    else:
        rtol, atol = 1e-4, 1e-5 * scale
    torch.testing.assert_close(
        got.to(F64), want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
    )


def sum_atol(dtype: torch.dtype, dy: torch.Tensor, ref: Reference) -> float:
    """Absolute tolerance of Σdy'·(x̂·r + d) and Σdy': a few ulps of the sum of |terms|.

    Those sums cancel (the result is far smaller than its terms), so float32 rounding is
    bounded relative to Σ|terms|, not to the result.
    """
    if dtype == F64:
        return 1e-10
    dims = [0, *range(2, dy.ndim)]
    terms = (dy.to(F64).abs() * (1.0 + ref.core.detach().abs())).sum(dims)
    return 2e-6 * float(terms.max().item())


# ------------------------------------------------------------------------------ the grid


@dataclass
class Run:
    x: torch.Tensor
    out: cpp.TrainOutput
    ref: Reference
    dy: torch.Tensor
    names: list[str]  # "x", then "weight" and "bias" when present
    got: list[torch.Tensor]  # gradients, in the order of names
    want: list[torch.Tensor]


def run_case(shape: tuple[int, ...], layout: str, dtype: torch.dtype, opts: Options) -> Run:
    """Kernel and reference forward and gradients for one configuration."""
    x = make(shape, layout, dtype)
    c = shape[1]
    assert shape[0] % opts.ghosts == 0, f"{shape} does not split into {opts.ghosts} ghosts"
    params = {
        "weight": (torch.rand(c, dtype=F64) + 0.5).to(dtype) if opts.weight else None,
        "bias": torch.randn(c, dtype=F64).to(dtype) if opts.bias else None,
    }
    names = ["x"] + [k for k, v in params.items() if v is not None]
    kw = {
        "ghosts": opts.ghosts,
        "strided": opts.strided,
        "relu": opts.relu,
        **renorm_kwargs(x, opts.renorm),
    }
    stat_shape = (c,) if opts.ghosts == 1 else (opts.ghosts, c)

    # Reference (float64, from the same rounded input and parameters).
    leaves64 = {"x": x.to(F64, copy=True).requires_grad_()}
    leaves64 |= {k: v.to(F64).requires_grad_() for k, v in params.items() if v is not None}
    ref = reference_train(leaves64["x"], leaves64.get("weight"), leaves64.get("bias"), EPS, **kw)

    # Upstream gradients; zero where the ReLU's input is within 1e-4 of its kink, where the
    # kernel's mask (its own rounded output > 0) and the reference's may legitimately differ.
    dy = torch.randn(shape, dtype=F64)
    if opts.relu:
        dy = dy * (ref.pre.detach().abs() > 1e-4)
    dy = dy.to(dtype)
    gm = torch.randn(stat_shape, dtype=F64)
    gv = torch.randn(stat_shape, dtype=F64)
    outs64, grads64 = [ref.y], [dy.to(F64)]
    if opts.stats_grad:
        outs64 += [ref.mean.reshape(stat_shape), ref.var.reshape(stat_shape)]
        grads64 += [gm, gv]
    want = list(torch.autograd.grad(outs64, list(leaves64.values()), grads64))

    # Kernel (detach keeps the strides of x, dense or not).
    leaves = {"x": x.detach().requires_grad_()}
    leaves |= {k: v.detach().clone().requires_grad_() for k, v in params.items() if v is not None}
    out = cpp.train(leaves["x"], leaves.get("weight"), leaves.get("bias"), EPS, **kw)
    outs, grads = [out.y], [dy]
    if opts.stats_grad:
        outs += [out.mean, out.var]
        grads += [gm.to(out.mean.dtype), gv.to(out.var.dtype)]
    got = list(torch.autograd.grad(outs, list(leaves.values()), grads))
    return Run(x, out, ref, dy, names, got, want)


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: o.name)
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize(("shape", "layout"), CASES, ids=CASE_IDS)
def test_train_options_match_reference(shape, layout, dtype, opts, threads) -> None:
    check_against_reference(shape, layout, dtype, opts)


# Outputs of 16 MiB or more (streamed) over planes of 8 KiB or more change the walk: the forward
# takes two passes instead of tiles (16x64x64x64), and in the backward a channel too large for
# a tile with its output is a tile of its own (16x32x96x96; with the ReLU its three reads, 1.8
# MB, still fit 7/8 of a 2 MiB L2). The backward's case depends on the machine: with a smaller
# L2 (or none reported) it takes the two-pass route, which the test then checks instead.
LARGE_CASES = [((16, 64, 64, 64), "contiguous"), ((16, 32, 96, 96), "contiguous")]


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("opts", [OPTIONS[0], OPTIONS[4], OPTIONS[6]], ids=lambda o: o.name)
@pytest.mark.parametrize(("shape", "layout"), LARGE_CASES, ids=str)
def test_large_outputs_over_long_planes_match_reference(shape, layout, opts, threads) -> None:
    check_against_reference(shape, layout, torch.float32, opts)


def check_against_reference(
    shape: tuple[int, ...], layout: str, dtype: torch.dtype, opts: Options
) -> None:
    """The kernel's forward, statistics, r, d and gradients against :func:`reference_train`."""
    run = run_case(shape, layout, dtype, opts)
    x, out, ref = run.x, run.out, run.ref
    c = shape[1]
    stat_shape = (c,) if opts.ghosts == 1 else (opts.ghosts, c)

    # Shapes and dtypes.
    assert out.y.dtype == dtype
    assert out.y.shape == x.shape
    if layout in ("contiguous", "channels_last", "transposed"):
        assert out.y.stride() == x.stride()  # the memory format is kept
    assert out.mean.shape == stat_shape
    assert out.var.shape == stat_shape
    assert out.mean.dtype == out.var.dtype == dtype
    rd_shape = (c,) if opts.renorm else (0,)
    assert out.r.shape == rd_shape
    assert out.d.shape == rd_shape
    assert out.r.dtype == out.d.dtype == dtype

    # Forward.
    assert_near(out.y, ref.y.detach(), dtype, "y")
    assert_near(out.mean, ref.mean.detach().reshape(stat_shape), dtype, "mean")
    assert_near(out.var, ref.var.detach().reshape(stat_shape), dtype, "var")
    if opts.renorm:
        assert_near(out.r, ref.r, dtype, "r")
        assert_near(out.d, ref.d, dtype, "d")
    if opts.relu:
        assert bool((out.y >= 0).all())
        assert bool((ref.pre < -0.1).any())  # the ReLU had something to do
    if opts.renorm in ("clipped", "rmax"):
        # Clipping is active on channel 0 (r ≈ 10 → 3, d → −2), 2 (r → 1/3) and 3 (d → 2).
        assert float(ref.r[0]) == 3.0
        if opts.renorm == "clipped":
            assert float(ref.d[0]) == -2.0
            if c > 3:
                assert float(ref.r[2]) == pytest.approx(1 / 3)
                assert float(ref.d[3]) == 2.0
        if c > 1:
            assert 1 / 3 < float(ref.r[1]) < 3.0  # and inactive on channel 1

    # Gradients: x, then weight and bias when present.
    assert run.got[0].shape == x.shape
    assert run.got[0].dtype == dtype
    assert_near(run.got[0], run.want[0], dtype, "grad x")
    atol = sum_atol(dtype, run.dy, ref)
    for name, got, want in zip(run.names[1:], run.got[1:], run.want[1:], strict=True):
        assert got.dtype == dtype
        assert got.shape == (c,)
        rtol = 1e-5 if dtype != F64 else 1e-10
        torch.testing.assert_close(got.to(F64), want, rtol=rtol, atol=atol, msg=name)


# ------------------------------------------------------------------------------ half precision

HALF_OPTIONS = [OPTIONS[0], OPTIONS[4], OPTIONS[7]]  # plain, g2-relu, g4-strided-clip-relu


def half_rtol(dtype: torch.dtype) -> float:
    # One unit in the last place of the output format, relative.
    return 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("opts", HALF_OPTIONS, ids=lambda o: o.name)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize(("shape", "layout"), CASES, ids=CASE_IDS)
def test_half_precision_matches_reference(shape, layout, dtype, opts, threads) -> None:
    x = make(shape, layout, dtype)
    c = shape[1]
    # float32 parameters with half input (mixed precision, as torch.autocast keeps them).
    weight = torch.rand(c) + 0.5
    bias = torch.randn(c)
    rk = renorm_kwargs(x, opts.renorm)
    kw = {"ghosts": opts.ghosts, "strided": opts.strided, "relu": opts.relu, **rk}
    out = cpp.train(x, weight, bias, EPS, **kw)
    ref = reference_train(x.to(F64), weight.to(F64), bias.to(F64), EPS, **kw)
    stat_shape = (c,) if opts.ghosts == 1 else (opts.ghosts, c)

    assert out.y.dtype == dtype
    assert out.y.shape == x.shape
    if layout in ("contiguous", "channels_last", "transposed"):
        assert out.y.stride() == x.stride()
    # Statistics accumulate in float32 and come back as float32.
    for t in (out.mean, out.var, out.r, out.d):
        assert t.dtype == torch.float32
    assert out.mean.shape == out.var.shape == stat_shape
    torch.testing.assert_close(out.mean.to(F64), ref.mean.reshape(stat_shape), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.var.to(F64), ref.var.reshape(stat_shape), rtol=1e-4, atol=1e-5)
    if opts.renorm:
        torch.testing.assert_close(out.r.to(F64), ref.r, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.d.to(F64), ref.d, rtol=1e-4, atol=1e-5)
    # The output is the reference rounded to the half format (within one ulp).
    atol = 1e-3 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.y.to(F64), ref.y, rtol=half_rtol(dtype), atol=atol)


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_half_precision_large_mean(dtype, layout, threads) -> None:
    # Mean 300, std 8: half-precision accumulation (or an unshifted sum of squares) would lose
    # the variance; float32 accumulation of shifted values keeps it.
    x = make((16, 4, 8, 8), layout, dtype, loc=300.0, scale=8.0)
    out = cpp.train(x, ghosts=2, strided=True)
    ref = reference_train(x.to(F64), None, None, EPS, ghosts=2, strided=True)
    torch.testing.assert_close(out.mean.to(F64), ref.mean, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(out.var.to(F64), ref.var, rtol=1e-4, atol=0.0)
    torch.testing.assert_close(out.y.to(F64), ref.y, rtol=half_rtol(dtype), atol=1e-3)


def _rounding_grid(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-precision values and float32 offsets whose sums land on the cases that rounding
    to ``dtype`` must get right: ties (to even), just above and below a tie, subnormals, the
    overflow boundary, zeros of both signs, infinities and NaN."""
    info = torch.finfo(dtype)
    ulp1 = info.eps  # the spacing at 1.0
    values = torch.tensor(
        [
            1.0,
            1.0 + ulp1,
            -1.0 - ulp1,
            3.0,
            0.0,
            -0.0,
            info.tiny,
            info.tiny / 4,
            -info.tiny / 2,
            info.max,
            -info.max,
            1e-3,
            100.0,
            float("inf"),
            float("-inf"),
            float("nan"),
        ]
    ).to(dtype)
    offsets = torch.tensor(
        [
            0.0,
            ulp1 / 2,
            -ulp1 / 2,
            ulp1 / 2 * (1 + 2**-10),
            ulp1 / 2 * (1 - 2**-10),
            info.tiny / 8,
            -info.tiny * 3 / 8,
            info.max * ulp1 / 2,
            -0.0,
            1e-30,
        ]
    )
    return values, offsets


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_half_precision_outputs_round_as_pytorch(dtype, layout, threads) -> None:
    # The kernels convert half-precision values with their own vectorizable code; it must
    # read every value exactly and round float32 results as PyTorch's .to(dtype) does.
    # bn_eval with mean 0 and var + eps == 1 exactly computes y = x·1 + β in float32, so y's
    # rounding is all that is tested.
    values, offsets = _rounding_grid(dtype)
    n, c = 64, offsets.numel()
    x = values.repeat(n * 9 // values.numel() + 1)[: n * 9].reshape(n, 1, 3, 3).expand(n, c, 3, 3)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    eps = 2.0**-20
    var = torch.full((c,), 1.0 - eps)
    y = cpp.bn_eval(x, torch.zeros(c), var, torch.ones(c), offsets, eps)
    want = (x.float() + offsets.view(1, c, 1, 1)).to(dtype)
    assert y.dtype == dtype
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(y), nan)
    assert torch.equal(y[~nan].float(), want[~nan].float())
    assert torch.equal(torch.signbit(y[~nan]), torch.signbit(want[~nan]))  # -0.0 stays -0.0


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_backward(dtype, threads) -> None:
    shape = (8, 4, 16, 16)
    x = make(shape, "contiguous", dtype)
    weight = (torch.rand(4) + 0.5).requires_grad_()
    bias = torch.randn(4).requires_grad_()
    xk = x.clone().requires_grad_()
    out = cpp.train(xk, weight, bias, EPS, ghosts=2, relu=True)
    x64 = x.to(F64).requires_grad_()
    w64 = weight.detach().to(F64).requires_grad_()
    b64 = bias.detach().to(F64).requires_grad_()
    ref = reference_train(x64, w64, b64, EPS, ghosts=2, relu=True)
    dy = (torch.randn(shape, dtype=F64) * (ref.pre.detach().abs() > 1e-2)).to(dtype)
    got = torch.autograd.grad(out.y, [xk, weight, bias], dy)
    want = torch.autograd.grad(ref.y, [x64, w64, b64], dy.to(F64))
    assert got[0].dtype == dtype
    assert got[1].dtype == got[2].dtype == torch.float32
    scale = max_abs(want[0])
    torch.testing.assert_close(
        got[0].to(F64), want[0], rtol=half_rtol(dtype), atol=2 * half_rtol(dtype) * scale
    )
    for g, w in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(g.to(F64), w, rtol=1e-3, atol=1e-3 * max(1.0, max_abs(w)))


@pytest.mark.usefixtures("built")
def test_bfloat16_close_values_normalize_to_plus_minus_one() -> None:
    # Two bfloat16 values 0.5 apart at -100: PyTorch's own CPU kernel returns about
    # [-1.41, 0] here; the exact answer is ±0.25/sqrt(0.0625 + eps) ≈ ±1.
    x = torch.tensor([[-100.5], [-100.0]], dtype=torch.bfloat16)
    out = cpp.train(x)
    assert out.y.dtype == torch.bfloat16
    assert out.mean.dtype == torch.float32
    assert float(out.mean) == -100.25
    assert float(out.var) == 0.0625
    expected = torch.tensor([[-1.0], [1.0]], dtype=F64) * 0.25 / math.sqrt(0.0625 + EPS)
    torch.testing.assert_close(out.y.to(F64), expected, rtol=2.0**-8, atol=0.0)


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize(
    ("dtype", "stats"),
    [
        (torch.float32, torch.float32),
        (F64, F64),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
    ids=str,
)
@pytest.mark.parametrize("ghosts", [1, 2, 3])
@pytest.mark.parametrize("renorm", [False, True])
def test_output_shapes_and_dtypes(dtype, stats, ghosts, renorm) -> None:
    x = torch.randn(6, 5, 4, 3).to(dtype)
    rk = {"renorm_mean": torch.zeros(5), "renorm_std": torch.ones(5)} if renorm else {}
    out = cpp.train(x, ghosts=ghosts, **rk)
    stat_shape = (5,) if ghosts == 1 else (ghosts, 5)
    assert out.y.dtype == dtype
    assert out.y.shape == (6, 5, 4, 3)
    assert out.mean.shape == out.var.shape == stat_shape
    assert out.r.shape == out.d.shape == ((5,) if renorm else (0,))
    for t in (out.mean, out.var, out.r, out.d):
        assert t.dtype == stats
    # The fake (meta) implementation agrees with the real one.
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        rkf = {k: mode.from_tensor(v) for k, v in rk.items()}
        fake = torch.ops.bnkit.bn_train(fx, None, None, EPS, ghosts, False, *rkf.values())
    for real, f in zip(out, fake, strict=True):
        assert f.shape == real.shape
        assert f.dtype == real.dtype


# ------------------------------------------------------------------------------ gradcheck


def all_clipped_renorm(x: torch.Tensor) -> dict[str, object]:
    """renorm arguments whose r and d are clipped in every channel, far from the bounds.

    Then r and d are locally constant and a finite-difference check sees the same function
    as the analytic gradient (which treats them as constants).
    """
    c = x.shape[1]
    x64 = x.detach().movedim(1, -1).reshape(-1, c)
    mu, std = x64.mean(0), x64.std(0, correction=0)
    even = torch.arange(c) % 2 == 0
    factor = torch.where(even, 0.01, 100.0).to(F64)  # r ≈ 100 → 2, r ≈ 0.01 → 0.5
    offset = torch.where(even, 50.0, -500.0).to(F64)  # d ≈ −5000 → −1, d ≈ 5 → 1
    return {
        "renorm_mean": mu + offset * std,
        "renorm_std": factor * std,
        "rmin": 0.5,
        "rmax": 2.0,
        "dmax": 1.0,
    }


GRADCHECK_OPTIONS = [
    Options("plain", weight=False, bias=False),
    Options("affine"),
    Options("g2", ghosts=2),
    Options("g2-strided", ghosts=2, strided=True),
    Options("clip-g2-strided", ghosts=2, strided=True, renorm="all-clipped"),
    Options("relu-g2", ghosts=2, relu=True),
    Options("relu-clip", renorm="all-clipped", relu=True),
]
GRADCHECK_INPUTS = [((4, 3, 2, 3), "contiguous"), ((4, 3, 2, 3), "channels_last"), ((6, 5), "")]


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("opts", GRADCHECK_OPTIONS, ids=lambda o: o.name)
@pytest.mark.parametrize(("shape", "layout"), GRADCHECK_INPUTS, ids=str)
def test_gradcheck_float64(shape, layout, opts) -> None:
    c = shape[1]
    for _ in range(100):  # with ReLU: draw until no pre-activation is within 1e-3 of the kink
        x = torch.randn(shape, dtype=F64)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        weight = torch.rand(c, dtype=F64) + 0.5
        bias = torch.randn(c, dtype=F64)
        rk = all_clipped_renorm(x) if opts.renorm else {}
        kw = {"ghosts": opts.ghosts, "strided": opts.strided, "relu": opts.relu, **rk}
        w = weight if opts.weight else None
        b = bias if opts.bias else None
        ref = reference_train(x, w, b, EPS, **kw)
        if not opts.relu or float(ref.pre.abs().min()) > 1e-3:
            break
    else:
        raise AssertionError("no input away from the ReLU's kink")
    if opts.renorm:
        # Every channel clipped: r ∈ {0.5, 2}, d = ±1.
        assert set(ref.r.tolist()) <= {0.5, 2.0}
        assert set(ref.d.abs().tolist()) == {1.0}
    if opts.relu:
        assert bool((ref.pre < 0).any())
        assert bool((ref.pre > 0).any())

    inputs = [x.requires_grad_()]
    if opts.weight:
        inputs.append(weight.requires_grad_())
    if opts.bias:
        inputs.append(bias.requires_grad_())

    def fn(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rest = list(args[1:])
        wt = rest.pop(0) if opts.weight else None
        bt = rest.pop(0) if opts.bias else None
        out = cpp.train(args[0], wt, bt, EPS, **kw)
        return out.y, out.mean, out.var  # every differentiable output

    assert torch.autograd.gradcheck(fn, tuple(inputs))


# ------------------------------------------------------------------------------ tracing


def opcheck_train_args(x: torch.Tensor) -> tuple[object, ...]:
    """bn_train's arguments with strided ghosts, renorm with clipping and ReLU."""
    c = x.shape[1]
    w = torch.rand(c, dtype=x.dtype) + 0.5
    b = torch.randn(c, dtype=x.dtype)
    rm, rs = torch.randn(c, dtype=x.dtype), torch.rand(c, dtype=x.dtype) + 0.5
    return (x, w, b, EPS, 2, True, rm, rs, 0.5, 2.0, 1.0, True)


OPCHECK_INPUTS = {
    "nchw-f64": lambda: torch.randn(4, 3, 5, 5, dtype=F64),
    "channels-last-f32": lambda: torch.randn(4, 3, 5, 5).contiguous(
        memory_format=torch.channels_last
    ),
    "2d-f64": lambda: torch.randn(6, 7, dtype=F64),
    "transposed-f32": lambda: make((4, 5, 7), "transposed", torch.float32),
    # Inputs the kernels copy first: the fake (meta) outputs must have the real outputs' strides.
    "sliced-f64": lambda: make((4, 6, 5, 5), "sliced", F64),
    "permuted-f32": lambda: make((4, 6, 3, 5), "permuted", torch.float32),
    "sliced-channels-last-f32": lambda: make((4, 6, 5, 5), "sliced_channels_last", torch.float32),
}


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("make_x", OPCHECK_INPUTS.values(), ids=OPCHECK_INPUTS.keys())
def test_opcheck_train_and_backward_with_options(make_x) -> None:
    x = make_x()
    args = opcheck_train_args(x)
    y, mean, var, r, d, _updated = torch.ops.bnkit.bn_train(*args)
    assert mean.shape == (2, x.shape[1])
    # With every differentiable input requiring grad (checks the autograd registration too).
    grad_args = tuple(a.clone().requires_grad_() if i < 3 else a for i, a in enumerate(args))
    torch.library.opcheck(torch.ops.bnkit.bn_train.default, grad_args)
    torch.library.opcheck(torch.ops.bnkit.bn_train.default, args)

    dy = torch.randn_like(x)
    gm, gv = torch.randn_like(mean), torch.randn_like(var)
    invstd = torch.rsqrt(var + EPS)
    w = args[1]
    torch.library.opcheck(
        torch.ops.bnkit.bn_backward.default, (dy, x, mean, invstd, w, gm, gv, 2, True, r, d, y)
    )
    torch.library.opcheck(
        torch.ops.bnkit.bn_backward.default,
        (dy, x, mean, invstd, None, None, None, 2, False, None, None, None),
    )


@pytest.mark.usefixtures("built")
def test_compiled_training_step_equals_eager() -> None:
    x = torch.randn(8, 3, 5, 5)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    rm, rs = torch.randn(3) * 0.3, torch.rand(3) + 0.5
    dy = torch.randn(8, 3, 5, 5)
    gm, gv = torch.randn(2, 3), torch.randn(2, 3)

    def step(
        t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y, mean, var, _r, _d, _updated = torch.ops.bnkit.bn_train(
            t, weight, bias, EPS, 2, True, rm, rs, 0.8, 1.25, 0.5, True
        )
        loss = (y * dy).sum() + (mean * gm).sum() + (var * gv).sum()
        return loss, y

    def run(fn) -> tuple[torch.Tensor, ...]:
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        loss, y = fn(*leaves)
        loss.backward()
        return (y.detach(), *(t.grad for t in leaves))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, want = run(compiled), run(step)
    # Bit for bit: the traced backward runs ATen's rsqrt(var + eps) where eager runs its own
    # loop, with the same arithmetic.
    for g, e in zip(got, want, strict=True):
        assert torch.equal(g, e)
    # Eager itself against the closed form.
    x64 = x.to(F64).requires_grad_()
    w64, b64 = w.to(F64).requires_grad_(), b.to(F64).requires_grad_()
    ref = reference_train(
        x64, w64, b64, EPS, ghosts=2, strided=True, renorm_mean=rm, renorm_std=rs,
        rmin=0.8, rmax=1.25, dmax=0.5, relu=True,
    )  # fmt: skip
    ref_loss = (ref.y * dy).sum() + (ref.mean * gm).sum() + (ref.var * gv).sum()
    ref_grads = torch.autograd.grad(ref_loss, [x64, w64, b64])
    torch.testing.assert_close(want[0].to(F64), ref.y.detach(), rtol=1e-4, atol=1e-5)
    for g, e in zip(want[1:], ref_grads, strict=True):
        torch.testing.assert_close(g.to(F64), e, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ eval + ReLU


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    ("shape", "layout"),
    [
        ((8, 4, 16, 16), "contiguous"),
        ((8, 4, 16, 16), "channels_last"),
        ((24, 19), "contiguous"),
        ((8, 6, 5, 7), "sliced"),
        ((8, 64, 32, 32), "contiguous"),  # >= 1 MiB: the output comes from the pool
    ],
)
def test_eval_relu_equals_relu_of_eval(shape, layout, dtype, threads) -> None:
    x = make(shape, layout, dtype, loc=0.0)
    c = shape[1]
    mean, var = torch.randn(c) * 0.2, torch.rand(c) + 0.5
    weight, bias = torch.randn(c), torch.randn(c) * 0.5
    fused = torch.ops.bnkit.bn_eval(x, mean, var, weight, bias, EPS, relu=True)
    plain = torch.ops.bnkit.bn_eval(x, mean, var, weight, bias, EPS, relu=False)
    assert fused.dtype == dtype
    assert bool((plain < 0).any())
    assert bool((plain > 0).any())
    assert torch.equal(fused, torch.relu(plain))
    assert torch.equal(cpp.bn_eval(x, mean, var, weight, bias, EPS), plain)  # default: no ReLU


# ------------------------------------------------------------------------------ output pool

MIB = 1 << 20


@pytest.fixture
def pool() -> Iterator[int]:
    """An empty pool with a known limit (64 MiB); the previous limit is restored after.

    The cyclic garbage collector is paused meanwhile, so that no output of an earlier test
    is freed into the pool in the middle of the byte counts.
    """
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    previous = cpp.set_pool_limit(0)  # also drops whatever earlier tests left cached
    cpp.set_pool_limit(64 * MIB)
    try:
        assert cpp.cached_bytes() == 0
        yield 64 * MIB
    finally:
        cpp.set_pool_limit(previous)
        if gc_was_enabled:
            gc.enable()


@pytest.mark.usefixtures("built")
def test_pool_reuses_freed_outputs(pool: int) -> None:
    x = torch.randn(8, 64, 32, 32)  # 2 MiB
    nbytes = x.numel() * x.element_size()
    first = cpp.train(x).y
    ptr, values = first.data_ptr(), first.clone()
    assert cpp.cached_bytes() == 0  # the output is alive
    del first
    assert cpp.cached_bytes() == nbytes
    second = cpp.train(x).y
    assert second.data_ptr() == ptr  # the freed block, reused
    assert cpp.cached_bytes() == 0
    assert torch.equal(second, values)
    del second
    assert cpp.cached_bytes() == nbytes
    # Small outputs do not go through the pool.
    small = cpp.train(torch.randn(4, 3, 5, 5)).y
    del small
    assert cpp.cached_bytes() == nbytes


@pytest.mark.usefixtures("built")
def test_pool_outputs_are_independent(pool: int) -> None:
    x = torch.randn(8, 64, 32, 32)
    mean, var = torch.randn(64), torch.rand(64) + 0.5
    a = cpp.bn_eval(x, mean, var)
    b = cpp.bn_eval(x, mean, var)
    expected = b.clone()
    assert a.data_ptr() != b.data_ptr()
    a.fill_(7.0)
    assert torch.equal(b, expected)
    del a  # its block, full of 7s, goes back to the pool and is reused: fully overwritten
    c = cpp.bn_eval(x, mean, var)
    assert torch.equal(c, expected)

    # The training forward's output and the backward's gradient are different blocks too.
    xr = x.clone().requires_grad_()
    y = cpp.train(xr, relu=True).y
    y_before = y.detach().clone()
    y.backward(torch.randn_like(y))
    assert xr.grad is not None
    assert xr.grad.data_ptr() != y.data_ptr()
    assert torch.equal(y.detach(), y_before)


@pytest.mark.usefixtures("built")
def test_pool_output_storage_is_resizable(pool: int) -> None:
    x = torch.randn(8, 64, 32, 32)
    nbytes = x.numel() * x.element_size()
    y = cpp.train(x).y
    values = y.clone()
    n = y.numel()
    y.resize_(2 * n)
    assert y.shape == (2 * n,)
    assert torch.equal(y[:n], values.reshape(-1))  # the old contents are kept
    assert cpp.cached_bytes() == nbytes  # the old block went back to the pool
    y[n:] = 1.0
    assert bool((y[n:] == 1.0).all())
    assert torch.equal(y[:n], values.reshape(-1))
    del y  # the grown block belongs to the pool too
    assert cpp.cached_bytes() == 3 * nbytes


@pytest.mark.usefixtures("built")
def test_pool_limit_bounds_and_releases(pool: int) -> None:
    x = torch.randn(8, 64, 32, 32)
    nbytes = x.numel() * x.element_size()
    outs = [cpp.train(x).y for _ in range(3)]
    assert len({t.data_ptr() for t in outs}) == 3
    del outs
    assert cpp.cached_bytes() == 3 * nbytes
    # Lowering the limit frees the oldest blocks at once; it returns the previous limit.
    assert cpp.set_pool_limit(nbytes) == pool
    assert cpp.cached_bytes() == nbytes
    assert cpp.set_pool_limit(0) == nbytes
    assert cpp.cached_bytes() == 0
    # With the pool off, freed outputs are not kept.
    y = cpp.train(x).y
    del y
    assert cpp.cached_bytes() == 0
    assert cpp.set_pool_limit(pool) == 0


# ------------------------------------------------------------------------------ errors


@pytest.mark.usefixtures("built")
def test_option_errors_are_clear() -> None:
    x = torch.randn(6, 3, 4)
    with pytest.raises(RuntimeError, match="6 samples does not split into 4 ghost batches"):
        cpp.train(x, ghosts=4)
    with pytest.raises(RuntimeError, match="renorm_mean and renorm_std"):
        cpp.train(x, renorm_mean=torch.zeros(3))
    with pytest.raises(RuntimeError, match="renorm_mean and renorm_std"):
        cpp.train(x, renorm_std=torch.ones(3))
    with pytest.raises(RuntimeError, match="weight must have 3 values"):
        cpp.train(x, torch.ones(4))
    with pytest.raises(RuntimeError, match="bias must have 3 values"):
        cpp.train(x, None, torch.ones(2))
    with pytest.raises(RuntimeError, match="renorm_std must have 3 values"):
        cpp.train(x, renorm_mean=torch.zeros(3), renorm_std=torch.ones(5))
    with pytest.raises(RuntimeError, match="weight must have 3 values"):
        cpp.bn_eval(x, torch.zeros(3), torch.ones(3), torch.ones(2))
    with pytest.raises(RuntimeError, match="ghosts must be >= 1"):
        cpp.train(x, ghosts=0)
