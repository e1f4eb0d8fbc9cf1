"""bnkit's C++ CPU kernels (``bnkit.kernels.cpp``) against closed-form float64 math.

The extension is built once per test session (module-scoped fixture). A build failure on
this machine is a test failure, never a skip: the fixture calls ``cpp.load()``, which raises.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from bnkit.kernels import cpp

F64 = torch.float64
EPS = 1e-5

# (shape, memory layout); "strided" is a non-contiguous view the kernels copy first.
GRID = [
    ((4, 3, 5, 7), "contiguous"),
    ((4, 3, 5, 7), "channels_last"),
    ((3, 1, 9, 11), "contiguous"),  # C = 1
    ((3, 1, 9, 11), "channels_last"),
    ((5, 17, 1, 1), "contiguous"),  # HW = 1, C not a multiple of the vector width
    ((5, 17, 1, 1), "channels_last"),
    ((2, 3, 50, 47), "contiguous"),  # inner 2350 > one 2048-value run
    ((2, 3, 50, 47), "channels_last"),
    ((3, 5, 13), "contiguous"),  # (N, C, L)
    ((2, 3, 3, 4, 5), "contiguous"),
    ((2, 3, 3, 4, 5), "channels_last_3d"),
    ((7, 5), "contiguous"),  # 2-D (N, C)
    ((300, 33), "contiguous"),
    ((3000, 2), "contiguous"),  # many rows: several runs of rows
    ((4, 6, 5, 7), "strided"),
]
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(scope="module")
def built() -> None:
    cpp.load()  # raises (test error) if the extension cannot be built here


def make(
    shape: tuple[int, ...], layout: str, dtype: torch.dtype, *, loc: float = 2.0
) -> torch.Tensor:
    x = torch.randn(shape, dtype=F64) * 1.5 + loc
    if layout == "channels_last":
        return x.to(dtype).contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_3d":
        return x.to(dtype).contiguous(memory_format=torch.channels_last_3d)
    if layout == "strided":
        wide = torch.randn((shape[0], shape[1], shape[2], 2 * shape[3]), dtype=F64) + loc
        return wide[..., ::2].to(dtype)
    return x.to(dtype)


def closed_form_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """μ_c = Σx/n, σ²_c = Σ(x - μ_c)²/n in float64, channels on dim 1."""
    x64 = x.to(F64).movedim(1, -1).reshape(-1, x.shape[1])
    mean = x64.sum(0) / x64.shape[0]
    var = ((x64 - mean) ** 2).sum(0) / x64.shape[0]
    return mean, var


def closed_form_normalize(
    x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    shape = [1, -1] + [1] * (x.ndim - 2)
    return (x.to(F64) - mean.to(F64).view(shape)) * scale.to(F64).view(shape) + shift.to(F64).view(
        shape
    )


def tol(dtype: torch.dtype) -> dict[str, float]:
    return (
        {"rtol": 2e-5, "atol": 2e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    )


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "layout"), GRID)
def test_stats_match_closed_form(shape, layout, dtype, threads) -> None:
    x = make(shape, layout, dtype)
    mean, var = cpp.bn_stats(x)
    ref_mean, ref_var = closed_form_moments(x)
    assert mean.dtype == dtype
    assert var.dtype == dtype
    assert mean.shape == (shape[1],)
    torch.testing.assert_close(mean.to(F64), ref_mean, **tol(dtype))
    torch.testing.assert_close(var.to(F64), ref_var, **tol(dtype))


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "layout"), GRID)
def test_normalize_matches_closed_form(shape, layout, dtype, threads) -> None:
    x = make(shape, layout, dtype)
    c = shape[1]
    mean = torch.randn(c, dtype=dtype)
    scale = torch.rand(c, dtype=dtype) + 0.5
    shift = torch.randn(c, dtype=dtype)
    y = cpp.bn_normalize(x, mean, scale, shift)
    assert y.dtype == dtype
    assert y.shape == x.shape
    if layout != "strided":
        assert y.stride() == x.stride()  # memory format preserved
    torch.testing.assert_close(
        y.to(F64), closed_form_normalize(x, mean, scale, shift), **tol(dtype)
    )


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("shape", "layout"), [*GRID, ((1, 4, 1, 1), "contiguous"), ((1, 3), "contiguous")]
)
@pytest.mark.parametrize("affine", [True, False])
def test_eval_matches_closed_form_and_torch(shape, layout, dtype, affine, threads) -> None:
    x = make(shape, layout, dtype)
    c = shape[1]
    running_mean = torch.randn(c, dtype=dtype)
    running_var = torch.rand(c, dtype=dtype) + 0.1
    weight = torch.randn(c, dtype=dtype) if affine else None
    bias = torch.randn(c, dtype=dtype) if affine else None
    y = cpp.bn_eval(x, running_mean, running_var, weight, bias, EPS)
    gamma = weight.to(F64) if weight is not None else torch.ones(c, dtype=F64)
    beta = bias.to(F64) if bias is not None else torch.zeros(c, dtype=F64)
    scale = gamma / torch.sqrt(running_var.to(F64) + EPS)
    expected = closed_form_normalize(x, running_mean, scale, beta)
    torch.testing.assert_close(y.to(F64), expected, **tol(dtype))
    torch_y = torch.nn.functional.batch_norm(
        x, running_mean, running_var, weight, bias, False, 0.0, EPS
    )
    torch.testing.assert_close(y, torch_y, **tol(dtype))


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize(
    ("shape", "layout"),
    [((8, 4, 32, 32), "contiguous"), ((8, 4, 32, 32), "channels_last"), ((4096, 3), "contiguous")],
)
def test_large_mean_float32_variance(shape, layout, threads) -> None:
    # mean 1e4, std 1: a sum of squares about the origin would lose every digit in float32.
    x = make(shape, layout, torch.float32, loc=0.0)
    x = (x / 1.5 + 1e4).to(torch.float32)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    mean, var = cpp.bn_stats(x)
    ref_mean, ref_var = closed_form_moments(x)
    rel = ((var.to(F64) - ref_var).abs() / ref_var).max().item()
    assert rel < 1e-4, rel
    torch.testing.assert_close(mean.to(F64), ref_mean, rtol=1e-7, atol=0.0)
    # Normalizing with those statistics gives unit variance, zero mean.
    y = cpp.bn_normalize(x, mean, torch.rsqrt(var + EPS), torch.zeros_like(var))
    y_mean, y_var = closed_form_moments(y)
    assert y_mean.abs().max().item() < 1e-3
    torch.testing.assert_close(y_var, torch.ones_like(y_var), rtol=1e-3, atol=0.0)


@pytest.mark.usefixtures("built")
def test_thread_counts_agree() -> None:
    x = make((16, 8, 33, 33), "contiguous", torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpp.bn_stats(x)
        torch.set_num_threads(2)
        two = cpp.bn_stats(x)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.usefixtures("built")
def test_errors_are_clear() -> None:
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(RuntimeError, match="float32, float64, bfloat16 or float16"):
        cpp.bn_stats(x.to(torch.int32))
    with pytest.raises(RuntimeError, match="does not split into 3 ghost batches"):
        cpp.train(x, ghosts=3)
    with pytest.raises(RuntimeError, match="mean must have 3 values"):
        cpp.bn_normalize(x, torch.zeros(4), torch.ones(3), torch.zeros(3))
    with pytest.raises(RuntimeError, match="at least 2 dims"):
        cpp.bn_stats(torch.randn(5))


@pytest.mark.usefixtures("built")
def test_ops_registered_for_tracing() -> None:
    x = torch.randn(4, 3, 5, 5)
    mean, var = torch.zeros(3), torch.ones(3)
    torch.library.opcheck(torch.ops.bnkit.bn_stats.default, (x,))
    torch.library.opcheck(torch.ops.bnkit.bn_normalize.default, (x, mean, var, mean))
    torch.library.opcheck(torch.ops.bnkit.bn_eval.default, (x, mean, var, None, None, EPS))

    def train_forward(t: torch.Tensor) -> torch.Tensor:
        m, v = torch.ops.bnkit.bn_stats(t)
        return torch.ops.bnkit.bn_normalize(t, m, torch.rsqrt(v + EPS), torch.zeros_like(v))

    compiled = torch.compile(train_forward, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), train_forward(x))


def test_build_failure_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise OSError("no C++ compiler found (simulated)")

    monkeypatch.setattr(cpp, "_state", {"loaded": False, "error": None, "warned": False})
    monkeypatch.setattr(cpp, "_build", broken)
    with pytest.warns(cpp.CppKernelWarning, match="no C\\+\\+ compiler found") as record:
        assert cpp.available() is False
    assert len(record) == 1
    assert "using PyTorch's kernels instead" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call must neither warn nor raise
        assert cpp.available() is False
    assert cpp.build_error() == "OSError: no C++ compiler found (simulated)"


@pytest.mark.usefixtures("built")
def test_available_after_build() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpp.available() is True
    assert cpp.build_error() is None


@pytest.mark.usefixtures("built")
def test_entry_points_are_the_operators() -> None:
    """The layers' per-step entry points call the registered operators directly (the
    overload's own callable) and give what the documented wrappers give."""
    for name in ("bn_train", "bn_eval"):
        overload = getattr(torch.ops.bnkit, name).default
        assert cpp.ENTRY[name] is getattr(overload, "_op", cpp.ENTRY[name])
        assert cpp.ENTRY[name] is not cpp.train_call
        assert cpp.ENTRY[name] is not cpp.eval_call
    x = torch.randn(6, 3, 4, 4)
    weight, bias = torch.rand(3) + 0.5, torch.randn(3)
    mean, var = torch.randn(3), torch.rand(3) + 0.1
    args = (x, weight, bias, EPS, 2, False, None, None, None, None, None, True)
    args += (None, None, 0.0, None, None, False, None, 0.0, False)
    direct, wrapped = (
        cpp.ENTRY["bn_train"](*args),
        cpp.train(x, weight, bias, EPS, ghosts=2, relu=True),
    )
    assert type(direct) is tuple
    assert len(direct) == 6
    for a, b in zip(direct, wrapped, strict=True):
        assert torch.equal(a, b)
    for relu in (False, True):
        y = cpp.ENTRY["bn_eval"](x, mean, var, weight, bias, EPS, relu)
        assert torch.equal(y, cpp.bn_eval(x, mean, var, weight, bias, EPS, relu=relu))
        assert torch.equal(y, cpp.eval_call(x, mean, var, weight, bias, EPS, relu))


@pytest.mark.usefixtures("built")
def test_bench_kernels_cpp_reports_cpp_path(capsys: pytest.CaptureFixture[str]) -> None:
    from bnkit.cli import main

    assert main(["bench", "--kernels", "ops", "--quick", "--json", "--shapes", "4x3x5x5,8x3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["meta"]["kernel_path"] == "cpp"
    assert report["meta"]["stream_threshold_bytes"] == cpp.status().stream_threshold_bytes
    assert "--kernels ops" in report["meta"]["command"]
    rows = {(tuple(r["shape"]), r["layout"], r["mode"]) for r in report["results"]}
    assert rows == {
        ((4, 3, 5, 5), layout, mode)
        for layout in ("contiguous", "channels_last")
        for mode in ("fwd", "fwd+bwd", "eval")
    } | {((8, 3), "contiguous", mode) for mode in ("fwd", "fwd+bwd", "eval")}
    assert all(r["path"] == "cpp" and r["kernel_ms"] > 0 for r in report["results"])


def test_bench_kernels_says_when_it_fell_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from bnkit import bench

    monkeypatch.setattr(cpp, "_state", {"loaded": False, "error": None, "warned": False})
    monkeypatch.setattr(cpp, "_build", lambda: (_ for _ in ()).throw(OSError("no g++")))
    with pytest.warns(cpp.CppKernelWarning, match="no g\\+\\+"):
        meta, rows = bench.run_kernel_benchmark([(4, 3)], repeats=1, warmup=1)
    assert meta["kernel_path"] == "torch (fallback)"
    assert meta["kernel_build_error"] == "OSError: no g++"
    assert [r.mode for r in rows] == ["fwd", "fwd+bwd", "eval"]
    assert [r.path for r in rows] == ["torch (fallback)"] * 3
    table = bench.format_kernel_table(meta, rows)
    assert "kernel path: torch (fallback)" in table
    assert "C++ build failed: OSError: no g++" in table


# ---------------------------------------------------------------------- training backward


def channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.to(F64).view([1, -1] + [1] * (ndim - 2))


def closed_form_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_x = γ·invstd·(dy − mean(dy) − x̂·mean(dy·x̂)), Σdy·x̂, Σdy in float64."""
    nd = x.ndim
    dims = [d for d in range(nd) if d != 1]
    n = x.numel() // x.shape[1]
    dy64 = dy.to(F64)
    xhat = (x.to(F64) - channel_view(mean, nd)) * channel_view(invstd, nd)
    sum_dy = dy64.sum(dims)
    sum_dy_xhat = (dy64 * xhat).sum(dims)
    gamma = weight.to(F64) if weight is not None else torch.ones(x.shape[1], dtype=F64)
    grad_x = (channel_view(gamma, nd) * channel_view(invstd, nd)) * (
        dy64 - channel_view(sum_dy, nd) / n - xhat * channel_view(sum_dy_xhat, nd) / n
    )
    return grad_x, sum_dy_xhat, sum_dy


def grad_tol(dtype: torch.dtype) -> dict[str, float]:
    # float32 gradients: the sums over n values and the x̂·Σ term cancel more than the forward.
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else tol(dtype)


def sum_tol(dtype: torch.dtype, dy: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    """Tolerance for the per-channel sums Σdy, Σdy·x̂: relative to Σ|terms|, not to the sum.

    Those sums cancel (the result is far smaller than its terms), so float32 rounding is
    bounded by a few ulps of Σ|dy|·|x̂|, not of the result.
    """
    if dtype != torch.float32:
        return tol(dtype)
    x64 = x.to(F64).movedim(1, -1).reshape(-1, x.shape[1])
    xhat = (x64 - x64.mean(0)) / x64.std(0, correction=0).clamp_min(1e-3)
    terms = (dy.to(F64).movedim(1, -1).reshape(-1, x.shape[1]).abs() * (1 + xhat.abs())).sum(0)
    return {"rtol": 1e-4, "atol": 4e-7 * terms.max().item()}


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "layout"), GRID)
@pytest.mark.parametrize("affine", [True, False])
def test_backward_matches_closed_form(shape, layout, dtype, affine, threads) -> None:
    x = make(shape, layout, dtype)
    dy = make(shape, layout, dtype, loc=0.3)
    c = shape[1]
    ref_mean, ref_var = closed_form_moments(x)
    mean = ref_mean.to(dtype)
    invstd = torch.rsqrt(ref_var + EPS).to(dtype)
    weight = (torch.rand(c, dtype=F64) + 0.5).to(dtype) if affine else None
    grad_x, grad_weight, grad_bias = cpp.bn_backward(dy, x, mean, invstd, weight)
    ref_x, ref_w, ref_b = closed_form_backward(dy, x, mean, invstd, weight)
    assert grad_x.dtype == dtype
    assert grad_weight.dtype == dtype
    assert grad_bias.dtype == dtype
    assert grad_x.shape == x.shape
    assert grad_weight.shape == (c,)
    assert grad_bias.shape == (c,)
    if layout != "strided":
        assert grad_x.stride() == x.stride()
    torch.testing.assert_close(grad_x.to(F64), ref_x, **grad_tol(dtype))
    torch.testing.assert_close(grad_weight.to(F64), ref_w, **sum_tol(dtype, dy, x))
    torch.testing.assert_close(grad_bias.to(F64), ref_b, **sum_tol(dtype, dy, x))


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "layout"), GRID)
@pytest.mark.parametrize("affine", [True, False])
def test_train_matches_torch_and_closed_form(shape, layout, dtype, affine, threads) -> None:
    x = make(shape, layout, dtype)
    c = shape[1]
    weight = (torch.rand(c, dtype=F64) + 0.5).to(dtype) if affine else None
    bias = torch.randn(c, dtype=F64).to(dtype) if affine else None
    dy = make(shape, layout, dtype, loc=-0.7)

    def leaves() -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        return (
            x.detach().clone().requires_grad_(),
            weight.detach().clone().requires_grad_() if weight is not None else None,
            bias.detach().clone().requires_grad_() if bias is not None else None,
        )

    xk, wk, bk = leaves()
    y, mean, var = cpp.bn_train(xk, wk, bk, EPS)
    y.backward(dy)
    xt, wt, bt = leaves()
    torch_y = torch.nn.functional.batch_norm(xt, None, None, wt, bt, True, 0.0, EPS)
    torch_y.backward(dy)

    # Forward: closed form and torch.
    ref_mean, ref_var = closed_form_moments(x)
    gamma = weight.to(F64) if weight is not None else torch.ones(c, dtype=F64)
    beta = bias.to(F64) if bias is not None else torch.zeros(c, dtype=F64)
    expected = closed_form_normalize(x, ref_mean, gamma / torch.sqrt(ref_var + EPS), beta)
    assert y.dtype == dtype
    assert mean.dtype == dtype
    assert var.dtype == dtype
    if layout != "strided":
        assert y.stride() == x.stride()
    torch.testing.assert_close(y.to(F64), expected, **tol(dtype))
    torch.testing.assert_close(mean.to(F64), ref_mean, **tol(dtype))
    torch.testing.assert_close(var.to(F64), ref_var, **tol(dtype))
    torch.testing.assert_close(y, torch_y, **tol(dtype))

    # Backward: closed form (float64 statistics) and torch.
    invstd = torch.rsqrt(ref_var + EPS)
    ref_x, ref_w, ref_b = closed_form_backward(dy, x, ref_mean, invstd, weight)
    assert xk.grad is not None
    assert xt.grad is not None
    torch.testing.assert_close(xk.grad.to(F64), ref_x, **grad_tol(dtype))
    torch.testing.assert_close(xk.grad, xt.grad, **grad_tol(dtype))
    if affine:
        assert wk is not None
        assert bk is not None
        assert wt is not None
        assert bt is not None
        stol = sum_tol(dtype, dy, x)
        torch.testing.assert_close(wk.grad.to(F64), ref_w, **stol)
        torch.testing.assert_close(bk.grad.to(F64), ref_b, **stol)
        torch.testing.assert_close(wk.grad, wt.grad, **stol)
        torch.testing.assert_close(bk.grad, bt.grad, **stol)


GRADCHECK_GRID = [
    ((3, 2, 3, 4), "contiguous"),
    ((3, 2, 3, 4), "channels_last"),
    ((4, 1, 5), "contiguous"),  # C = 1
    ((6, 3), "contiguous"),  # (N, C)
    ((5, 3, 1, 1), "channels_last"),  # HW = 1
    ((2, 3, 2, 6), "strided"),
]


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize(("shape", "layout"), GRADCHECK_GRID)
@pytest.mark.parametrize("affine", [True, False])
def test_train_gradcheck_float64(shape, layout, affine) -> None:
    x = make(shape, layout, F64).requires_grad_()
    c = shape[1]
    inputs: list[torch.Tensor] = [x]
    if affine:
        inputs += [
            (torch.rand(c, dtype=F64) + 0.5).requires_grad_(),
            torch.randn(c, dtype=F64).requires_grad_(),
        ]

    def fn(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w, b = (args[1], args[2]) if affine else (None, None)
        return cpp.bn_train(args[0], w, b, EPS)  # every output, mean and var included

    assert torch.autograd.gradcheck(fn, tuple(inputs))


@pytest.mark.usefixtures("built")
def test_train_backward_ops_pass_opcheck() -> None:
    x = torch.randn(4, 3, 5, 5, dtype=F64)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(3, dtype=F64) + 0.5, torch.randn(3, dtype=F64)
    mean, invstd = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    for t in (x, x_cl, torch.randn(7, 3, dtype=F64)):
        torch.library.opcheck(torch.ops.bnkit.bn_backward.default, (t, t, mean, invstd, w))
        torch.library.opcheck(torch.ops.bnkit.bn_backward.default, (t, t, mean, invstd, None))
        torch.library.opcheck(
            torch.ops.bnkit.bn_train.default, (t.clone().requires_grad_(), w, b, EPS)
        )
        torch.library.opcheck(
            torch.ops.bnkit.bn_train.default,
            (t.clone().requires_grad_(), w.requires_grad_(), b.requires_grad_(), EPS),
        )
        w, b = w.detach(), b.detach()
        torch.library.opcheck(torch.ops.bnkit.bn_train.default, (t, None, None, EPS))


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_train_compiles_fullgraph_with_backward(backend: str) -> None:
    x = torch.randn(4, 3, 5, 5)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    dy = torch.randn(4, 3, 5, 5)

    def step(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        y = torch.ops.bnkit.bn_train(t, weight, bias, EPS)[0]
        return (y * dy).sum()

    def grads(fn) -> tuple[torch.Tensor, ...]:  # type: ignore[no-untyped-def]
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        fn(*leaves).backward()
        return tuple(t.grad for t in leaves)  # type: ignore[misc]

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    for got, want in zip(grads(compiled), grads(step), strict=True):
        torch.testing.assert_close(got, want)
    # And against torch's own kernel.
    for got, want in zip(
        grads(compiled),
        grads(
            lambda t, weight, bias: (
                torch.nn.functional.batch_norm(t, None, None, weight, bias, True, 0.0, EPS) * dy
            ).sum()
        ),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
