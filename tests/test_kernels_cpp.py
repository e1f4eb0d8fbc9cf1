"""bnkit's C++ CPU kernels (``bnkit.kernels.cpp``) against closed-form float64 math.

The extension is built once per test session (module-scoped fixture). A build failure on
this machine is a test failure, never a skip: the fixture calls ``cpp.load()``, which raises.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator

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
THREADS = [1, 2]


@pytest.fixture(scope="module")
def built() -> None:
    cpp.load()  # raises (test error) if the extension cannot be built here


@pytest.fixture(params=THREADS, ids=lambda n: f"threads{n}")
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


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
    with pytest.raises(RuntimeError, match="float32 or float64"):
        cpp.bn_stats(x.half())
    with pytest.raises(RuntimeError, match="mean must have shape"):
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
def test_bench_kernels_cpp_reports_cpp_path(capsys: pytest.CaptureFixture[str]) -> None:
    from bnkit.cli import main

    assert main(["bench", "--kernels", "cpp", "--quick", "--json", "--shapes", "4x3x5x5,8x3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["meta"]["kernel_path"] == "cpp"
    assert "--kernels cpp" in report["meta"]["command"]
    rows = {(tuple(r["shape"]), r["layout"], r["mode"]) for r in report["results"]}
    assert rows == {
        ((4, 3, 5, 5), layout, mode)
        for layout in ("contiguous", "channels_last")
        for mode in ("fwd", "eval")
    } | {((8, 3), "contiguous", mode) for mode in ("fwd", "eval")}
    assert all(r["path"] == "cpp" and r["kernel_ms"] > 0 for r in report["results"])


def test_bench_kernels_says_when_it_fell_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from bnkit import bench

    monkeypatch.setattr(cpp, "_state", {"loaded": False, "error": None, "warned": False})
    monkeypatch.setattr(cpp, "_build", lambda: (_ for _ in ()).throw(OSError("no g++")))
    with pytest.warns(cpp.CppKernelWarning, match="no g\\+\\+"):
        meta, rows = bench.run_kernel_benchmark([(4, 3)], repeats=1, warmup=1)
    assert meta["kernel_path"] == "torch (fallback)"
    assert meta["kernel_build_error"] == "OSError: no g++"
    assert [r.path for r in rows] == ["torch (fallback)"] * 2
    table = bench.format_kernel_table(meta, rows)
    assert "kernel path: torch (fallback)" in table
    assert "C++ build failed: OSError: no g++" in table
