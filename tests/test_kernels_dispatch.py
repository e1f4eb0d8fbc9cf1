"""bnkit.BatchNorm and functional.batch_norm on the C++ kernels (policy ``kernels="cpp"``).

Every configuration the kernels serve is run twice, on PyTorch's kernels / the composite (the
default policy) and on the C++ kernels, over three training steps and an eval step: outputs,
gradients and every buffer agree to float rounding. A counter on ``cpp.train``/``cpp.bn_eval``
proves which path ran.
"""

from __future__ import annotations

import json
import platform
from typing import Any

import pytest
import torch

import bnkit
from bnkit import functional as bnf
from bnkit.kernels import cpp


@pytest.fixture(scope="module")
def built() -> None:
    if not cpp.available():
        pytest.skip(f"C++ kernels cannot be built here: {cpp.build_error()}")


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts calls of the C++ training and eval entry points (a layer's own step enters
    through ``cpp.ENTRY``, the functional core through ``cpp.train`` and ``cpp.bn_eval``)."""
    counts = {"train": 0, "eval": 0}
    train, bn_eval = cpp.train, cpp.bn_eval
    entry_train, entry_eval = cpp.ENTRY["bn_train"], cpp.ENTRY["bn_eval"]

    def counting_train(*args: Any, **kwargs: Any) -> cpp.TrainOutput:
        counts["train"] += 1
        return train(*args, **kwargs)

    def counting_entry_train(*args: Any) -> tuple[torch.Tensor, ...]:
        counts["train"] += 1
        out: tuple[torch.Tensor, ...] = entry_train(*args)
        return out

    def counting_eval(*args: Any, **kwargs: Any) -> torch.Tensor:
        counts["eval"] += 1
        return bn_eval(*args, **kwargs)

    def counting_entry_eval(*args: Any) -> torch.Tensor:
        counts["eval"] += 1
        y: torch.Tensor = entry_eval(*args)
        return y

    monkeypatch.setattr(cpp, "train", counting_train)
    monkeypatch.setattr(cpp, "bn_eval", counting_eval)
    monkeypatch.setitem(cpp.ENTRY, "bn_train", counting_entry_train)
    monkeypatch.setitem(cpp.ENTRY, "bn_eval", counting_entry_eval)
    return counts


CONFIGS: list[dict[str, Any]] = [
    {},
    {"affine": False},
    {"momentum": None},
    {"running_var": "biased", "warmup": True},
    {"zero_debias": "both"},
    {"renorm": True},
    {"renorm": True, "renorm_clipping": {"rmin": 0.8, "rmax": 1.2, "dmax": 0.3}},
    {"virtual_batch_size": 4},
    {"virtual_batch_size": 4, "ghost_layout": "strided"},
    {"virtual_batch_size": 4, "renorm": True, "renorm_clipping": {"rmax": 1.1, "dmax": 0.2}},
    {"activation": "relu"},
    {"activation": "silu"},
    {"axis": -1},
    {"axis": -1, "virtual_batch_size": 8, "activation": "relu"},
    {"track_running_stats": False},
]

TOLERANCES = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.float64: {"rtol": 1e-9, "atol": 1e-9},
    torch.bfloat16: {"rtol": 2e-2, "atol": 3e-2},
}


def _input(cfg: dict[str, Any], dtype: torch.dtype, layout: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    shape = (16, 6, 5, 5) if cfg.get("axis", 1) == 1 else (16, 5, 6)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5
    if layout == "channels_last" and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(dtype)


def _pair(cfg: dict[str, Any], dtype: torch.dtype) -> tuple[bnkit.BatchNorm, bnkit.BatchNorm]:
    torch.manual_seed(3)
    ref = bnkit.BatchNorm(6, **cfg)
    fast = bnkit.BatchNorm(6, **cfg)
    if ref.weight is not None:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)  # type: ignore[union-attr]
    fast.load_state_dict(ref.state_dict())
    return ref.to(dtype), fast.to(dtype)


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("cfg", CONFIGS, ids=repr)
def test_module_on_cpp_kernels_matches_default(
    cfg: dict[str, Any], dtype: torch.dtype, layout: str, calls: dict[str, int]
) -> None:
    tol = TOLERANCES[dtype]
    ref, fast = _pair(cfg, dtype)
    x = _input(cfg, dtype, layout)
    gen = torch.Generator().manual_seed(11)
    for _ in range(3):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = ref(xa)
        with bnkit.policy(kernels="cpp"):
            yb = fast(xb)
        assert yb.dtype == ya.dtype
        assert yb.stride() == ya.stride()
        grad = torch.randn(ya.shape, generator=gen, dtype=torch.float64).to(dtype)
        ya.backward(grad)
        yb.backward(grad)
        torch.testing.assert_close(yb, ya, **tol)
        torch.testing.assert_close(xb.grad, xa.grad, **tol)
        for pa, pb in zip(ref.parameters(), fast.parameters(), strict=True):
            # γ/β gradients are sums over the batch: in bfloat16 their rounding differs by a
            # few units in the last place of the largest term (both paths are that far from
            # float64, checked when this test was written).
            ptol = {"rtol": 2e-2, "atol": 0.15} if dtype == torch.bfloat16 else tol
            torch.testing.assert_close(pb.grad, pa.grad, **ptol)
    assert calls["train"] == 3
    for (name, a), (_, b) in zip(ref.state_dict().items(), fast.state_dict().items(), strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
        else:
            assert torch.equal(a, b), name
    ref.eval()
    fast.eval()
    with torch.no_grad():
        ya = ref(x)
        with bnkit.policy(kernels="cpp"):
            yb = fast(x)
    torch.testing.assert_close(yb, ya, **tol)
    assert calls["eval"] == (0 if cfg.get("track_running_stats") is False else 1)


@pytest.mark.usefixtures("built")
def test_default_policy_never_calls_the_cpp_kernels(calls: dict[str, int]) -> None:
    layer = bnkit.BatchNorm2d(4)
    layer(torch.randn(8, 4, 3, 3))
    layer.eval()
    layer(torch.randn(8, 4, 3, 3))
    assert calls == {"train": 0, "eval": 0}
    assert bnkit.get_policy("kernels") == "torch"


@pytest.mark.usefixtures("built")
def test_layer_policy_wins_over_the_block(calls: dict[str, int]) -> None:
    x = torch.randn(8, 4, 3, 3)
    own = bnkit.BatchNorm2d(4, policy={"kernels": "cpp"})
    own(x)
    assert calls["train"] == 1
    opted_out = bnkit.BatchNorm2d(4, policy={"kernels": "torch"})
    with bnkit.policy(kernels="cpp"):
        y = opted_out(x)
    assert calls["train"] == 1
    assert torch.equal(y, torch.nn.BatchNorm2d(4)(x))  # still bit-identical to torch


@pytest.mark.usefixtures("built")
def test_eval_with_gradient_runs_on_the_kernel(calls: dict[str, int]) -> None:
    layer = bnkit.BatchNorm2d(4).eval()
    x = torch.randn(8, 4, 3, 3, requires_grad=True)
    with bnkit.policy(kernels="cpp"):
        y = layer(x)
    y.sum().backward()
    assert calls["eval"] == 1  # bn_eval has an autograd formula (EvalFunction)
    assert x.grad is not None


@pytest.mark.usefixtures("built")
def test_configurations_the_kernels_do_not_serve_fall_through(calls: dict[str, int]) -> None:
    x = torch.randn(8, 4, 3, 3)
    needs_grad = torch.rand(8, requires_grad=True)
    per_channel = torch.rand(8, 4, 3, 3)  # full-rank weights that differ between channels
    with bnkit.policy(kernels="cpp"):
        outputs = [
            # an adjustment that is not one value per channel
            bnf.batch_norm(
                x, training=True, adjustment=lambda shape: (torch.ones(8, 4, 1, 1), 0.0)
            ),
            bnf.batch_norm(x, training=True, weights=needs_grad),
            bnf.batch_norm(x, training=True, weights=per_channel),
            bnf.batch_norm(x, training=True, weights=per_channel, virtual_batch_size=4),
        ]
    assert calls["train"] == 0
    assert all(y.shape == x.shape for y in outputs)


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kind", ["per-sample", "mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_sample_weights_on_cpp_kernels_match_default(
    kind: str, layout: str, dtype: torch.dtype, calls: dict[str, int]
) -> None:
    gen = torch.Generator().manual_seed(2)
    x = _input({}, dtype, layout)
    if kind == "per-sample":
        weights = torch.rand(16, generator=gen, dtype=dtype) + 0.1
    else:
        weights = (torch.rand(16, 5, 5, generator=gen) > 0.3).to(dtype)
    tol = TOLERANCES[dtype]
    for cfg in ({}, {"renorm": True, "activation": "relu"}):
        ref, fast = _pair(cfg, dtype)
        for _ in range(2):
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya = ref(xa, weights=weights)
            with bnkit.policy(kernels="cpp"):
                yb = fast(xb, weights=weights)
            grad = torch.randn(ya.shape, generator=gen, dtype=dtype)
            ya.backward(grad)
            yb.backward(grad)
            torch.testing.assert_close(yb, ya, **tol)
            torch.testing.assert_close(xb.grad, xa.grad, **tol)
            for pa, pb in zip(ref.parameters(), fast.parameters(), strict=True):
                torch.testing.assert_close(pb.grad, pa.grad, **tol)
        for (name, a), (_, b) in zip(
            ref.state_dict().items(), fast.state_dict().items(), strict=True
        ):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    assert calls["train"] == 4


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("kind", ["per-sample", "mask"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_weighted_training_gradcheck_float64(kind: str, layout: str) -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, 2, 3, generator=gen, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    sample = torch.rand(5, generator=gen, dtype=torch.float64) + 0.2
    w = sample if kind == "per-sample" else torch.rand(30, generator=gen, dtype=torch.float64)
    gamma = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    beta = torch.rand(3, generator=gen, dtype=torch.float64)

    def f(inp: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = cpp.train(inp, g, b, 1e-3, sample_weight=w)
        return out.y, out.mean, out.var

    inputs = tuple(t.clone().requires_grad_() for t in (x, gamma, beta))
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.usefixtures("built")
def test_zero_total_weight_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="sample weights sum to zero"):
        cpp.train(torch.randn(4, 3, 2, 2), sample_weight=torch.zeros(4))
    one_empty_ghost = torch.tensor([1.0, 2.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"sum to zero (.*) of a ghost batch"):
        cpp.train(torch.randn(4, 3, 2, 2), ghosts=2, sample_weight=one_empty_ghost)
    cpp.train(torch.randn(4, 3, 2, 2), ghosts=2, strided=True, sample_weight=one_empty_ghost)
    with pytest.raises(RuntimeError, match=r"sample_weight must have 4 \(per sample\) or 16"):
        cpp.train(torch.randn(4, 3, 2, 2), sample_weight=torch.ones(5))


ADJUSTMENT_CASES: list[tuple[tuple[int, ...], dict[str, Any]]] = [
    ((8, 3, 4, 5), {}),
    ((8, 3, 4, 5), {"virtual_batch_size": 4, "activation": "relu"}),
    ((8, 3, 4, 5), {"weights": "per-sample", "ghost_layout": "strided", "virtual_batch_size": 2}),
    ((12, 5), {"renorm": True}),
]


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("kind", ["tensors", "numbers", "mixed"])
@pytest.mark.parametrize(
    ("shape", "case"), ADJUSTMENT_CASES, ids=[f"{c[0]}-{sorted(c[1])}" for c in ADJUSTMENT_CASES]
)
def test_per_channel_adjustment_runs_on_the_kernels(
    shape: tuple[int, ...], case: dict[str, Any], kind: str, affine: bool, calls: dict[str, int]
) -> None:
    """``((x̂·r + d)·a + b)·γ + β`` with per-channel (a, b) folded into the kernels' affine:
    the reference's values and gradients (to x, γ, β, a and b), one adjustment call per step."""
    f64 = torch.float64
    gen = torch.Generator().manual_seed(13)
    c = shape[1]
    x = torch.randn(shape, generator=gen, dtype=f64) * 2 + 1
    gamma = torch.rand(c, generator=gen, dtype=f64) + 0.5
    beta = torch.randn(c, generator=gen, dtype=f64)
    scale = torch.rand(c, generator=gen, dtype=f64) + 0.5
    shift = torch.randn(c, generator=gen, dtype=f64)
    dy = torch.randn(shape, generator=gen, dtype=f64)
    options: dict[str, Any] = {k: v for k, v in case.items() if k not in ("weights", "renorm")}
    if case.get("weights"):
        options["weights"] = torch.rand(shape[0], generator=gen, dtype=f64) + 0.3
    if case.get("renorm"):
        options["renorm_mean"] = torch.randn(c, generator=gen, dtype=f64) * 0.1
        options["renorm_stddev"] = torch.rand(c, generator=gen, dtype=f64) + 0.8
        options["renorm_clipping"] = {"rmax": 1.1}
    results, drawn = [], []
    for impl in ("reference", "cpp"):
        leaves = [t.clone().requires_grad_() for t in (x, gamma, beta, scale, shift)]
        a, b = leaves[3], leaves[4]
        values = {"tensors": (a, b), "numbers": (1.3, -0.2), "mixed": (a, 0.4)}[kind]

        def adjustment(s: torch.Size, values: Any = values) -> Any:
            drawn.append(s)
            return values

        params = (leaves[1], leaves[2]) if affine else (None, None)
        y = bnf.batch_norm(
            leaves[0], None, None, *params, training=True, eps=1e-3, adjustment=adjustment,
            impl=impl, **options,
        )  # fmt: skip
        wanted = [leaves[0], *(leaves[1:3] if affine else []), a, b]
        grads = torch.autograd.grad(y, wanted, dy, allow_unused=True)
        results.append((y, *grads))
    assert calls["train"] == 1  # impl="cpp" ran the kernels
    assert drawn == [x.shape, x.shape]  # once per step on either path
    for got, want in zip(results[1], results[0], strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.usefixtures("built")
def test_other_adjustments_take_the_general_path_with_one_draw(calls: dict[str, int]) -> None:
    x = torch.randn(8, 3, 4, 5, dtype=torch.float64)
    drawn = []
    values = (torch.rand(8, 3, 1, 1, dtype=torch.float64) + 0.5, 0.1)  # per sample and channel

    def adjustment(shape: torch.Size) -> Any:
        drawn.append(shape)
        return values

    y = bnf.batch_norm(x, training=True, adjustment=adjustment, impl="cpp")
    want = bnf.batch_norm(x, training=True, adjustment=adjustment, impl="reference")
    assert calls["train"] == 0
    assert len(drawn) == 2  # one draw per call
    torch.testing.assert_close(y, want)


@pytest.mark.usefixtures("built")
def test_module_with_adjustment_on_the_kernels_matches_the_default(calls: dict[str, int]) -> None:
    torch.manual_seed(3)
    scale, shift = torch.rand(4) + 0.5, torch.randn(4)
    layers = [bnkit.BatchNorm2d(4, adjustment=lambda s: (scale, shift)) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(8, 4, 3, 3) * 2 + 1
    with bnkit.policy(kernels="cpp"):
        y = layers[0](x)
    assert calls["train"] == 1
    torch.testing.assert_close(y, layers[1](x))
    torch.testing.assert_close(layers[0].running_var, layers[1].running_var)


WEIGHTED_GHOST_CASES: list[tuple[tuple[int, ...], str, int, bool, str]] = [
    # (shape, layout, virtual batch size, strided, weights)
    ((8, 3, 4, 5), "contiguous", 4, False, "per-sample"),  # tiles
    ((8, 3, 4, 5), "contiguous", 2, True, "per-sample"),
    ((8, 3, 4, 5), "channels_last", 4, False, "per-position"),  # rows
    ((8, 3, 4, 5), "contiguous", 4, True, "per-position"),  # blocks, two passes
    ((12, 5), "contiguous", 3, False, "per-sample"),  # 2-D rows
    ((12, 5), "contiguous", 4, True, "per-sample"),
    ((64, 6, 3, 5), "contiguous", 32, False, "per-sample"),  # short runs, spread constants
    ((64, 40, 7, 7), "contiguous", 16, False, "per-sample"),  # several tiles
    ((16, 8, 20, 20), "channels_last", 4, True, "per-position"),  # rows, in parallel
    # rows in pieces of 2048 that start mid-sample (63 rows per sample), 4 rows per update
    ((48, 8, 7, 9), "channels_last", 48, False, "per-sample"),
    ((48, 8, 7, 9), "channels_last", 24, False, "per-position"),
]


def _weighted_ghost_case(
    seed: int, shape: tuple[int, ...], weights: str, vbs: int
) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float64 input ~ N(0.7, 2²), the ``batch_norm`` training options with sample weights of
    the kind named ("per-sample": (N,) in [0.3, 1.3); "per-position": a 0.1/1.1 mask over the
    non-channel dims; "none") in ``vbs``-sample ghost batches, then γ, β and an upstream
    gradient, drawn in that order from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    x = torch.randn(shape, generator=gen, dtype=f64) * 2 + 0.7
    n, c = shape[:2]
    w: torch.Tensor | None = None
    if weights == "per-sample":
        w = torch.rand(n, generator=gen, dtype=f64) + 0.3
    elif weights == "per-position":
        w = (torch.rand(n, 1, *shape[2:], generator=gen, dtype=f64) > 0.3).double() + 0.1
    gamma = torch.rand(c, generator=gen, dtype=f64) + 0.5
    beta = torch.randn(c, generator=gen, dtype=f64)
    dy = torch.randn(shape, generator=gen, dtype=f64)
    options: dict[str, Any] = {
        "training": True,
        "momentum": 0.2,
        "eps": 1e-3,
        "weights": w,
        "virtual_batch_size": vbs,
        "return_stats": True,
    }
    return x, options, gamma, beta, dy


@pytest.mark.usefixtures("built", "threads")
@pytest.mark.parametrize("renorm_relu", [False, True], ids=["plain", "renorm-relu"])
@pytest.mark.parametrize(
    ("shape", "layout", "vbs", "strided", "weights"),
    WEIGHTED_GHOST_CASES,
    ids=[
        "x".join(map(str, c[0])) + f"-{c[1]}-v{c[2]}-{'s' if c[3] else 'c'}-{c[4]}"
        for c in WEIGHTED_GHOST_CASES
    ],
)
def test_sample_weights_with_ghosts_match_the_reference(
    shape: tuple[int, ...],
    layout: str,
    vbs: int,
    strided: bool,
    weights: str,
    renorm_relu: bool,
    calls: dict[str, int],
) -> None:
    """Each ghost batch divides by its own total weight (and takes its own Bessel factor in
    the running variance), as the reference composite computes it; float64, so the kernel and
    the closed form agree to rounding."""
    x, options, gamma, beta, dy = _weighted_ghost_case(12, shape, weights, vbs)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    gen = torch.Generator().manual_seed(13)
    f64 = torch.float64
    options["ghost_layout"] = "strided" if strided else "contiguous"
    if renorm_relu:
        options.update(
            activation="relu",
            renorm_mean=torch.randn(c, generator=gen, dtype=f64) * 0.1,
            renorm_stddev=torch.rand(c, generator=gen, dtype=f64) + 0.5,
            renorm_clipping={"rmax": 1.3},
        )
    results = []
    for impl in ("reference", "cpp"):
        leaves = [t.clone().requires_grad_() for t in (x, gamma, beta)]
        rm, rv = torch.zeros(c, dtype=f64), torch.ones(c, dtype=f64)
        y, stats = bnf.batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], impl=impl, **options)
        grads = torch.autograd.grad(y, leaves, dy)
        results.append((y, *grads, rm, rv, stats.mean, stats.var, stats.var_unbiased))
    assert calls["train"] == 1  # the kernels ran for impl="cpp"
    names = ["y", "dx", "dgamma", "dbeta", "running_mean", "running_var", "mean", "var", "unb"]
    for name, got, want in zip(names, results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.usefixtures("built", "threads")
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("weights", ["none", "per-sample", "per-position"])
@pytest.mark.parametrize(
    ("shape", "vbs"),
    [((8, 512, 6, 6), 4), ((64, 1024), 8)],
    ids=["cl-two-pieces-per-ghost", "2d-eight-ghosts"],
)
def test_cache_sized_ghosts_of_rows_match_the_reference_in_float32(
    shape: tuple[int, ...], vbs: int, weights: str, relu: bool, calls: dict[str, int]
) -> None:
    """Rows (channels-last, 2-D) in contiguous ghost batches that fit a core's cache run one
    task per ghost: sums, statistics, coefficients and the second pass (y, then dx) together.
    In float32 each channels-last ghost of 4 samples x 36 positions spans two row pieces of at
    most 128 rows, the second starting mid-sample, so the per-position weights are stepped from
    there. Checked against the float64 composite on the same float32 values."""
    x64, options, gamma, beta, dy = _weighted_ghost_case(5, shape, weights, vbs)
    x = x64.float()
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    f64 = torch.float64
    w = options["weights"]
    if relu:
        # No gradient where the ReLU's input is within 1e-4 of its kink, where float32 and
        # float64 may legitimately take different sides.
        pre = bnf.batch_norm(x.double(), None, None, gamma, beta, **options)[0]
        dy = dy * (pre.abs() > 1e-4)
        options["activation"] = "relu"
    results = []
    for impl, dtype in (("reference", f64), ("cpp", torch.float32)):
        leaves = [t.to(dtype).clone().requires_grad_() for t in (x, gamma, beta)]
        rm, rv = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)
        wi = None if w is None else w.to(dtype)
        options["weights"] = wi
        y, stats = bnf.batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], impl=impl, **options)
        grads = torch.autograd.grad(y, leaves, dy.to(dtype))
        results.append([t.double() for t in (y, *grads, rm, rv, stats.mean, stats.var)])
    assert calls["train"] == 1  # the kernels ran for impl="cpp"
    assert results[1][0].shape == shape
    names = ["y", "dx", "dgamma", "dbeta", "running_mean", "running_var", "mean", "var"]
    for name, got, want in zip(names, results[1], results[0], strict=True):
        # dgamma and dbeta sum n/ghost values of size ~1 per channel: float32 rounding of sums.
        atol = 2e-3 if name in ("dgamma", "dbeta") else 2e-5
        torch.testing.assert_close(got, want, rtol=1e-5, atol=atol, msg=name)


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("vbs", [None, 2], ids=["no-ghosts", "ghosts"])
@pytest.mark.parametrize("kind", ["mask", "per-sample"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_masked_out_padding_far_from_the_data_keeps_float32_statistics(
    kind: str, layout: str, vbs: int | None, calls: dict[str, int]
) -> None:
    """The statistics shift by a value with positive weight: padding (0 here) thousands of
    standard deviations from the data must not cancel the float32 sums."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 4, 16, 16, generator=gen) * 0.1 + 1000.0
    if kind == "mask":
        w = torch.ones(8, 16, 16)
        w[:, 0, 0] = 0.0  # the first position of every sample is padding
        x[:, :, 0, 0] = 0.0
    else:
        w = torch.ones(8)
        w[:4] = 0.0  # the first sample of every strided ghost (g and g + 4) is padding
        x[:4] = 0.0
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    options: dict[str, Any] = {
        "training": True,
        "weights": w,
        "virtual_batch_size": vbs,
        "ghost_layout": "strided",
        "return_stats": True,
    }
    _, got = bnf.batch_norm(x, impl="cpp", **options)
    _, want = bnf.batch_norm(x.double(), impl="reference", **{**options, "weights": w.double()})
    assert calls["train"] == 1
    torch.testing.assert_close(got.var.double(), want.var, rtol=1e-3, atol=0)
    torch.testing.assert_close(got.mean.double(), want.mean, rtol=1e-6, atol=0)


@pytest.mark.usefixtures("built")
def test_impl_cpp_in_functional(calls: dict[str, int]) -> None:
    x = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    y, stats = bnf.batch_norm(x, rm, rv, training=True, momentum=0.1, impl="cpp", return_stats=True)
    y_ref, stats_ref = bnf.batch_norm(
        x, rm2, rv2, training=True, momentum=0.1, impl="reference", return_stats=True
    )
    assert calls["train"] == 1
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(stats, stats_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rm, rm2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, rv2, rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("built")
def test_compiled_module_on_cpp_kernels() -> None:
    torch.manual_seed(0)
    cfg: dict[str, Any] = {"renorm": True, "virtual_batch_size": 4, "activation": "relu"}
    eager, compiled_layer = bnkit.BatchNorm(6, **cfg), bnkit.BatchNorm(6, **cfg)
    compiled_layer.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(16, 6, 4, 4)
    with bnkit.policy(kernels="cpp"):
        for _ in range(2):
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = eager(xa), compiled(xb)
            ya.sum().backward()
            yb.sum().backward()
            torch.testing.assert_close(yb, ya)
            torch.testing.assert_close(xb.grad, xa.grad)
    for a, b in zip(eager.state_dict().values(), compiled_layer.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a)


def test_unbuildable_kernels_fall_back_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpp, "_state", {"loaded": False, "error": None, "warned": False})

    def fail() -> None:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpp, "_build", fail)
    x = torch.randn(8, 4, 3, 3)
    layer = bnkit.BatchNorm2d(4)
    with bnkit.policy(kernels="cpp"):
        with pytest.warns(cpp.CppKernelWarning, match="no compiler here"):
            y = layer(x)
        again = layer(x)  # no second warning (filterwarnings=error would raise)
    torch.testing.assert_close(y, torch.nn.BatchNorm2d(4)(x))
    assert again.shape == x.shape


def test_kernels_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="kernels='fast' is not one of"):
        bnkit.set_policy(kernels="fast")


@pytest.mark.usefixtures("built")
def test_bench_kernels_cpp_runs_the_module_rows_on_the_kernels(
    capsys: pytest.CaptureFixture[str], calls: dict[str, int]
) -> None:
    from bnkit import bench
    from bnkit.cli import main

    argv = ["bench", "--kernels", "cpp", "--quick", "--json", "--no-memory"]
    shapes = "8x3x4x4,8x3"
    assert main([*argv, "--shapes", shapes, "--configs", "default,weights,ghost"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["meta"]["kernels"] == "cpp"
    assert "--kernels cpp" in report["meta"]["command"]
    rows = report["results"]
    assert {r["path"] for r in rows} == {"cpp"}
    assert {len(r["shape"]) for r in rows} == {2, 4}
    for r in rows:
        assert r["target"] == 1.0
        within = r["bnkit_vs_torch"] <= 1.0
        if len(r["shape"]) == 4:  # the copy targets are for the ResNet-like shapes
            assert r["copy_target"] == bench.CPP_COPY_TARGETS[r["mode"]]
            within = within and r["bnkit_vs_copy"] <= r["copy_target"]
        else:
            assert r["copy_target"] is None
        assert r["meets_target"] == within
    assert calls["train"] > 0
    assert calls["eval"] > 0
    assert report["meta"]["stream_threshold_bytes"] == cpp.status().stream_threshold_bytes


@pytest.mark.usefixtures("built")
def test_bench_kernels_cpp_header_says_when_stores_stream(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from bnkit import bench
    from bnkit.cli import main

    argv = ["bench", "--kernels", "cpp", "--quick", "--no-memory", "--shapes", "8x3"]
    assert main([*argv, "--configs", "default", "--modes", "eval"]) == 0
    out = capsys.readouterr().out
    assert (
        bench._stream_line({"stream_threshold_bytes": 16 << 20})
        == "C++ kernels: streaming stores for outputs of 16 MiB or more"
    )
    threshold = cpp.status().stream_threshold_bytes
    assert bench._stream_line({"stream_threshold_bytes": threshold}) in out
    assert bench._stream_line({"stream_threshold_bytes": None}).endswith("(not x86-64)")


def test_bench_kernels_cpp_says_when_it_fell_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from bnkit import bench

    monkeypatch.setattr(cpp, "_state", {"loaded": False, "error": None, "warned": False})
    monkeypatch.setattr(cpp, "_build", lambda: (_ for _ in ()).throw(OSError("no g++")))
    with pytest.warns(cpp.CppKernelWarning, match="no g\\+\\+"):
        report = bench.run_benchmark(
            [(4, 3)], configs=["default"], modes=["fwd"], quick=True, memory=False, kernels="cpp"
        )
    assert report.meta["kernels"] == "torch (fallback)"
    assert report.meta["kernel_build_error"] == "OSError: no g++"
    assert "stream_threshold_bytes" not in report.meta
    assert [r.path for r in report.results] == ["native kernel"]
    assert report.results[0].copy_target is None
    assert bench.cpp_speedup(report) is None


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("ghosts", [1, 2])
def test_running_update_inside_the_kernel_matches_pytorch_rule(ghosts: int) -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 3, 4, 5, generator=gen, dtype=torch.float64) * 3 + 1
    running_mean = torch.randn(3, generator=gen, dtype=torch.float64)
    running_var = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    expected_mean, expected_var = running_mean.clone(), running_var.clone()
    version = running_mean._version
    cpp.train(x, ghosts=ghosts, running_mean=running_mean, running_var=running_var, momentum=0.3)
    # Closed form: per ghost, mean and Bessel-corrected variance over (samples, H, W), then
    # averaged over ghosts; stat += 0.3 (batch - stat).
    parts = x.reshape(ghosts, 8 // ghosts, 3, 20).transpose(1, 2).reshape(ghosts, 3, -1)
    batch_mean = parts.mean(-1).mean(0)
    batch_var = parts.var(-1, correction=1).mean(0)
    expected_mean += 0.3 * (batch_mean - expected_mean)
    expected_var += 0.3 * (batch_var - expected_var)
    torch.testing.assert_close(running_mean, expected_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(running_var, expected_var, rtol=1e-12, atol=1e-12)
    assert running_mean._version > version  # autograd sees the in-place update


@pytest.mark.usefixtures("built")
def test_train_op_with_running_buffers_passes_opcheck() -> None:
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    args = (x, None, None, 1e-5, 1, False, None, None, None, None, None, False)
    buffers = (torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), 0.1)
    torch.library.opcheck(torch.ops.bnkit.bn_train.default, (*args, *buffers))


@pytest.mark.usefixtures("built")
def test_running_buffers_are_checked() -> None:
    x = torch.randn(6, 4, 3, 3)
    with pytest.raises(RuntimeError, match="running_mean must be a contiguous float32"):
        cpp.train(x, running_mean=torch.zeros(4).half(), running_var=torch.ones(4))
    with pytest.raises(RuntimeError, match="give both running_mean and running_var"):
        cpp.train(x, running_mean=torch.zeros(4))


@pytest.mark.usefixtures("built")
def test_compiled_default_layer_updates_running_statistics() -> None:
    torch.manual_seed(0)
    eager, compiled_layer = bnkit.BatchNorm2d(5), bnkit.BatchNorm2d(5)
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(8, 5, 3, 3) * 2 + 1
    with bnkit.policy(kernels="cpp"):
        for _ in range(3):
            torch.testing.assert_close(compiled(x), eager(x))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(compiled_layer, name), getattr(eager, name))
    assert not torch.equal(eager.running_mean, torch.zeros(5))


@pytest.mark.usefixtures("built")
def test_compiled_layer_with_sample_weights_and_warmup() -> None:
    torch.manual_seed(1)
    cfg: dict[str, Any] = {"warmup": True, "activation": "relu"}
    eager, compiled_layer = bnkit.BatchNorm(6, **cfg), bnkit.BatchNorm(6, **cfg)
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(8, 6, 3, 3) * 2 + 1
    mask = (torch.rand(8, 3, 3) > 0.3).float()
    with bnkit.policy(kernels="cpp"):
        for _ in range(3):
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = eager(xa, weights=mask), compiled(xb, weights=mask)
            ya.sum().backward()
            yb.sum().backward()
            torch.testing.assert_close(yb, ya)
            torch.testing.assert_close(xb.grad, xa.grad)
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(compiled_layer.state_dict()[name], value, msg=name)


@pytest.mark.usefixtures("built")
def test_training_step_inside_inference_mode(calls: dict[str, int]) -> None:
    fast, ref = bnkit.BatchNorm2d(4), bnkit.BatchNorm2d(4)
    x = torch.randn(8, 4, 3, 3)
    quiet = {"no_grad_training": "ignore"}
    with torch.inference_mode(), bnkit.policy(**quiet):
        y_ref = ref(x)
        with bnkit.policy(kernels="cpp"):
            y = fast(x)
    assert calls["train"] == 1
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(fast.running_var, ref.running_var)


@pytest.mark.usefixtures("built")
def test_kernels_command_reports_a_built_extension(capsys: pytest.CaptureFixture[str]) -> None:
    from bnkit.cli import main

    assert main(["kernels"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("bnkit C++ kernels: built")
    assert cpp.build_directory() in out
    assert main(["kernels", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["available"] is True
    assert report["build_error"] is None
    assert report["pool_limit_bytes"] >= 0
    if platform.machine().lower() in ("x86_64", "amd64"):
        threshold = report["stream_threshold_bytes"]
        assert threshold == cpp.set_stream_threshold(threshold) >= 0
        assert "streaming stores: outputs of" in out
    else:  # no streaming stores on this machine: said so
        assert report["stream_threshold_bytes"] is None
        assert "streaming stores: none on this machine" in out
    assert "-fno-math-errno" in report["flags"]


def test_kernels_command_says_when_the_machine_cannot_stream(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bnkit.cli import main

    status = cpp.KernelStatus(True, None, "/cache", ("-O3",), 2, 1 << 30, 0, None)
    monkeypatch.setattr(cpp, "status", lambda: status)
    assert main(["kernels"]) == 0
    out = capsys.readouterr().out
    assert "streaming stores: none on this machine (not x86-64)" in out
    assert "output pool: 0.0 MiB cached, limit 1024 MiB" in out


def test_kernels_command_fails_clearly_without_a_compiler(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bnkit.cli import main

    monkeypatch.setattr(cpp, "_state", {"loaded": False, "error": None, "warned": False})
    monkeypatch.setattr(cpp, "_build", lambda: (_ for _ in ()).throw(OSError("no g++")))
    assert main(["kernels"]) == 1
    out = capsys.readouterr().out
    assert "NOT AVAILABLE" in out
    assert "OSError: no g++" in out
    assert main(["kernels", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["available"] is False
    assert report["pool_limit_bytes"] is None
    assert report["stream_threshold_bytes"] is None


def test_build_directory_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BNKIT_EXTENSIONS_DIR", "/somewhere/else")
    assert cpp.build_directory() == "/somewhere/else/bnkit_cpu_kernels"


@pytest.mark.usefixtures("built")
def test_pool_limit_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="bytes >= 0, got -1"):
        cpp.set_pool_limit(-1)


DOUBLE_BACKWARD_CASES: list[dict[str, Any]] = [
    {},
    {"affine": True},
    {"affine": True, "ghosts": 2},
    {"affine": True, "ghosts": 3, "strided": True},
    {"affine": True, "relu": True},
    {"affine": True, "weights": "per-sample"},
    {"affine": True, "weights": "mask", "layout": "channels_last"},
    {"affine": True, "weights": "per-sample", "ghosts": 2},
    {"affine": True, "weights": "mask", "ghosts": 3, "strided": True, "relu": True},
]


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("case", DOUBLE_BACKWARD_CASES, ids=repr)
def test_double_backward_gradgradcheck_float64(case: dict[str, Any]) -> None:
    """create_graph=True recomputes the forward differentiably: second derivatives are exact.

    Renorm is not here: its r and d are computed from the batch but carry no gradient (Keras'
    stop-gradient), so the numerical second derivative sees them move and the analytical one,
    on every path, does not; the test below compares it with the default path instead.
    """
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(6, 3, 2, 3, generator=gen, dtype=torch.float64) * 2 + 0.5
    if case.get("layout") == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    gamma = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    beta = torch.rand(3, generator=gen, dtype=torch.float64) - 0.5
    if case.get("relu"):
        beta = beta + 3.0  # keep every pre-activation away from the kink
    renorm = {}
    if case.get("renorm"):
        renorm = {
            "renorm_mean": torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64),
            "renorm_std": torch.tensor([1.5, 0.7, 2.5], dtype=torch.float64),
            "rmax": 1.5,
            "dmax": 0.4,
        }
    weights = None
    if case.get("weights") == "per-sample":
        weights = torch.rand(6, generator=gen, dtype=torch.float64) + 0.2
    elif case.get("weights") == "mask":
        weights = (torch.rand(36, generator=gen, dtype=torch.float64) > 0.3).double()

    def f(inp: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = cpp.train(
            inp,
            g if case.get("affine") else None,
            b if case.get("affine") else None,
            1e-3,
            ghosts=case.get("ghosts", 1),
            strided=case.get("strided", False),
            relu=case.get("relu", False),
            sample_weight=weights,
            **renorm,
        )
        return out.y, out.mean, out.var

    inputs = tuple(t.clone().requires_grad_() for t in (x, gamma, beta))
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize(
    "options",
    [{"activation": "relu"}, {"renorm": True, "renorm_clipping": {"rmax": 1.2, "dmax": 0.3}}],
    ids=repr,
)
def test_gradient_penalty_matches_the_default_path(options: dict[str, Any]) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64) * 2 + 1
    results = []
    for kernels in ("torch", "cpp"):
        layer = bnkit.BatchNorm2d(3, **options).double()
        with torch.no_grad():
            layer.bias.fill_(0.1)  # type: ignore[union-attr]
        xg = x.clone().requires_grad_()
        with bnkit.policy(kernels=kernels):
            loss = (layer(xg) ** 3).sum()
        (grad,) = torch.autograd.grad(loss, xg, create_graph=True)
        penalty = (grad**2).sum()
        results.append(torch.autograd.grad(penalty, (xg, layer.weight)))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.usefixtures("built")
def test_nonfinite_batch_is_skipped_on_the_cpp_path(calls: dict[str, int]) -> None:
    layer = bnkit.BatchNorm2d(3)
    layer(torch.randn(8, 3, 4, 4))  # one clean update first
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    bad = torch.randn(8, 3, 4, 4)
    bad[0, 1, 0, 0] = float("nan")
    with bnkit.policy(kernels="cpp"), pytest.warns(bnkit.policies.BatchNormWarning, match="NaN"):
        layer(bad)
    assert calls["train"] == 1  # the kernel ran; its guard left the statistics as they were
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(layer.state_dict()[name], before[name]), name
    assert int(layer.num_skipped_updates) == 1


@pytest.mark.usefixtures("built")
def test_batchnorm3d_channels_last_3d_on_cpp_kernels(calls: dict[str, int]) -> None:
    torch.manual_seed(4)
    x = torch.randn(4, 5, 3, 4, 6).contiguous(memory_format=torch.channels_last_3d)
    ref, fast = bnkit.BatchNorm3d(5), bnkit.BatchNorm3d(5)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = ref(xa)
    with bnkit.policy(kernels="cpp"):
        yb = fast(xb)
    assert yb.is_contiguous(memory_format=torch.channels_last_3d)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.running_var, ref.running_var)
    assert calls["train"] == 1


@pytest.mark.usefixtures("built")
def test_pooled_output_storage_can_shrink_to_nothing_and_grow_again() -> None:
    y = cpp.train(torch.randn(8, 64, 32, 32)).y  # 2 MiB: from the output pool
    storage = y.untyped_storage()
    storage.resize_(0)
    assert storage.nbytes() == 0
    storage.resize_(64)
    assert storage.nbytes() == 64


@pytest.mark.usefixtures("built")
def test_channels_on_a_middle_axis_come_back_in_the_input_layout(calls: dict[str, int]) -> None:
    # The kernels take the channels on dim 1; with axis=2 of a 4-D input the result of moving
    # them back is strided, and callers get their own layout back, as on the default path.
    x = torch.randn(4, 5, 3, 2)
    mean, var = torch.randn(3), torch.rand(3) + 0.5
    for training in (True, False):
        expected = bnf.batch_norm(x, mean, var, training=training, axis=2, impl="reference")
        y = bnf.batch_norm(x, mean, var, training=training, axis=2, impl="cpp")
        assert y.is_contiguous()
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    layer = bnkit.BatchNorm(3, axis=2, policy={"kernels": "cpp"})
    default = bnkit.BatchNorm(3, axis=2)
    for mode in ("train", "eval"):
        getattr(layer, mode)()
        getattr(default, mode)()
        y = layer(x)
        assert y.is_contiguous()
        torch.testing.assert_close(y, default(x), rtol=1e-5, atol=1e-5)
    assert calls == {"train": 2, "eval": 2}  # all four calls on the kernels


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("impl", ["reference", "auto", "cpp"])
def test_number_valued_adjustment_keeps_float64_digits(impl: str) -> None:
    # Python numbers from an adjustment go to the compute dtype directly: through float32 a
    # shift of 0.1 on float64 input was off by 1.5e-9 (float32(0.1) − 0.1).
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    w = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    b = torch.zeros(3, dtype=torch.float64)
    y = bnf.batch_norm(
        x, None, None, w, b, training=True, eps=1e-3, adjustment=lambda s: (1.0, 0.1), impl=impl
    )
    mean = x.mean((0, 2), keepdim=True)
    var = x.var((0, 2), unbiased=False, keepdim=True)
    expected = ((x - mean) / torch.sqrt(var + 1e-3) + 0.1) * w.view(1, -1, 1)
    torch.testing.assert_close(y, expected, rtol=1e-13, atol=1e-13)
