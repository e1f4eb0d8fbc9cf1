"""Gradients through the C++ inference pass (``bnkit::bn_eval`` and its autograd formula).

A model in eval mode that needs gradients -- input gradients for saliency maps or adversarial
examples, fine-tuning with frozen batch norm (``bnkit.freeze``) -- runs ``bn_eval`` forward and
``bn_eval_backward`` back: ``dx = γ/sqrt(σ² + eps)·dy'`` (``dy'`` masked by the fused ReLU),
``dγ = Σ dy'·x̂``, ``dβ = Σ dy'``, the running statistics constant. Checked against closed-form
float64 math, gradcheck / gradgradcheck, PyTorch's eval-mode kernel through the module, opcheck
and torch.compile.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import bnkit
from bnkit.kernels import cpp

F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    if not cpp.available():
        pytest.skip(f"C++ kernels cannot be built here: {cpp.build_error()}")


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "rows":  # (N, L, C) memory seen as (N, C, L)
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    return x


SHAPES = [
    ((6, 5, 4, 3), "contiguous"),
    ((6, 5, 4, 3), "channels_last"),
    ((9, 7), "contiguous"),
    ((4, 6, 70), "contiguous"),
    ((4, 6, 5), "rows"),
    ((5, 1, 3, 3), "contiguous"),
]


@pytest.mark.usefixtures("threads")
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(("shape", "layout"), SHAPES, ids=[f"{s}-{lo}" for s, lo in SHAPES])
def test_eval_gradients_match_the_closed_form(
    shape: tuple[int, ...], layout: str, affine: bool, relu: bool
) -> None:
    gen = torch.Generator().manual_seed(3)
    c = shape[1]
    x = _layout(torch.randn(shape, generator=gen, dtype=F64) * 2 + 1, layout)
    mean = torch.randn(c, generator=gen, dtype=F64)
    var = torch.rand(c, generator=gen, dtype=F64) + 0.5
    gamma = torch.rand(c, generator=gen, dtype=F64) + 0.5 if affine else None
    beta = torch.randn(c, generator=gen, dtype=F64) if affine else None
    dy = torch.randn(shape, generator=gen, dtype=F64)
    view = [1, c] + [1] * (len(shape) - 2)
    dims = [d for d in range(len(shape)) if d != 1]
    # Closed form, written out: x̂ = (x − μ)/sqrt(σ² + eps), y = relu(γ x̂ + β).
    invstd = 1.0 / torch.sqrt(var + 1e-3)
    xhat = (x - mean.view(view)) * invstd.view(view)
    pre = xhat * (gamma.view(view) if gamma is not None else 1.0)
    pre = pre + (beta.view(view) if beta is not None else 0.0)
    mask = (pre > 0).to(F64) if relu else torch.ones_like(pre)
    dyp = dy * mask
    want_dx = dyp * (invstd * (gamma if gamma is not None else 1.0)).view(view)

    for dtype, tol in ((F64, 1e-12), (torch.float32, 1e-5)):
        leaves = [t.to(dtype).requires_grad_() for t in (x, gamma, beta) if t is not None]
        xl = leaves[0]
        gl, bl = (leaves[1], leaves[2]) if affine else (None, None)
        y = cpp.bn_eval(xl, mean.to(dtype), var.to(dtype), gl, bl, 1e-3, relu=relu)
        assert y.stride() == xl.stride() or layout == "rows"
        torch.testing.assert_close(y, (pre.clamp(min=0) if relu else pre).to(dtype), rtol=tol,
                                   atol=tol)  # fmt: skip
        grads = torch.autograd.grad(y, leaves, dy.to(dtype))
        torch.testing.assert_close(grads[0], want_dx.to(dtype), rtol=tol, atol=tol)
        if affine:
            want_dg = (dyp * xhat).sum(dims)
            want_db = dyp.sum(dims)
            torch.testing.assert_close(grads[1], want_dg.to(dtype), rtol=tol * 10, atol=tol * 10)
            torch.testing.assert_close(grads[2], want_db.to(dtype), rtol=tol * 10, atol=tol * 10)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_eval_gradcheck_and_gradgradcheck_float64(relu: bool, layout: str) -> None:
    gen = torch.Generator().manual_seed(8)
    x = _layout(torch.randn(4, 3, 2, 3, generator=gen, dtype=F64), layout)
    mean = torch.randn(3, generator=gen, dtype=F64)
    var = torch.rand(3, generator=gen, dtype=F64) + 0.5
    gamma = torch.rand(3, generator=gen, dtype=F64) + 0.5
    beta = torch.randn(3, generator=gen, dtype=F64)

    def f(inp: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return cpp.bn_eval(inp, mean, var, g, b, 1e-3, relu=relu)

    inputs = tuple(t.clone().requires_grad_() for t in (x, gamma, beta))
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_only_the_input_gradient_skips_the_sums() -> None:
    # γ and β without requires_grad (frozen parameters): dx only, in one pass.
    x = torch.randn(6, 4, 5, 5, requires_grad=True)
    mean, var = torch.randn(4), torch.rand(4) + 0.5
    gamma, beta = torch.rand(4) + 0.5, torch.randn(4)
    y = cpp.bn_eval(x, mean, var, gamma, beta, 1e-5)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    want = (gamma / torch.sqrt(var + 1e-5)).view(1, 4, 1, 1).expand_as(x)
    torch.testing.assert_close(dx, want)
    gx, gw, gb = torch.ops.bnkit.bn_eval_backward(
        torch.ones_like(x), x.detach(), mean, var, gamma, 1e-5, None, False
    )
    torch.testing.assert_close(gx, want)
    assert not gw.any()  # not asked for: zeros, not sums
    assert not gb.any()


CONFIGS: list[dict[str, Any]] = [{}, {"affine": False}, {"activation": "relu"}, {"axis": -1}]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=repr)
def test_module_in_eval_mode_matches_pytorchs_kernel(cfg: dict[str, Any], layout: str) -> None:
    torch.manual_seed(5)
    shape = (8, 6, 5, 5) if cfg.get("axis", 1) == 1 else (8, 5, 6)
    ref = bnkit.BatchNorm(6, **cfg)
    with torch.no_grad():
        ref.running_mean.uniform_(-1, 1)  # type: ignore[union-attr]
        ref.running_var.uniform_(0.5, 2)  # type: ignore[union-attr]
        if ref.weight is not None:
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)  # type: ignore[union-attr]
    fast = bnkit.BatchNorm(6, **cfg)
    fast.load_state_dict(ref.state_dict())
    ref.eval()
    fast.eval()
    x = torch.randn(shape) * 2
    if layout == "channels_last" and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = ref(xa)
    with bnkit.policy(kernels="cpp"):
        yb = fast(xb)
    assert yb.grad_fn is not None
    # The operator's node (under a permute for axis=-1): the kernel ran, not PyTorch's.
    assert "EvalFunction" in yb.grad_fn.name() or cfg.get("axis") == -1
    grad = torch.randn(shape)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-5)
    for pa, pb in zip(ref.parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-4)
    assert torch.equal(fast.running_mean, ref.running_mean)  # type: ignore[arg-type]


def test_frozen_batch_norm_fine_tuning_on_the_kernels() -> None:
    torch.manual_seed(9)

    def model() -> torch.nn.Sequential:
        torch.manual_seed(1)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3), bnkit.BatchNorm2d(8, activation="relu"), torch.nn.Flatten()
        )

    ref, fast = model(), model()
    for net in (ref, fast):
        bnkit.freeze(net)
    x = torch.randn(4, 3, 7, 7)
    ref(x).square().sum().backward()
    with bnkit.policy(kernels="cpp"):
        fast(x).square().sum().backward()
    for (name, pa), (_, pb) in zip(ref.named_parameters(), fast.named_parameters(), strict=True):
        if pa.grad is None:
            assert pb.grad is None, name
        else:
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-4, msg=name)
    assert int(fast[1].num_batches_tracked) == 0


def test_eval_operators_pass_opcheck() -> None:
    x = torch.randn(5, 3, 4, 2, dtype=F64)
    stats = (torch.randn(3, dtype=F64), torch.rand(3, dtype=F64) + 0.5)
    params = [torch.rand(3, dtype=F64) + 0.5, torch.randn(3, dtype=F64)]
    for relu in (False, True):
        args = (x.clone().requires_grad_(), *stats, *(p.clone().requires_grad_() for p in params))
        torch.library.opcheck(torch.ops.bnkit.bn_eval.default, (*args, 1e-3, relu))
    dy = torch.randn_like(x)
    torch.library.opcheck(
        torch.ops.bnkit.bn_eval_backward.default, (dy, x, *stats, params[0], 1e-3, None, True)
    )


def test_compiled_eval_with_gradients() -> None:
    layer = bnkit.BatchNorm2d(4, activation="relu").eval()
    with torch.no_grad():
        layer.running_var.fill_(2.0)  # type: ignore[union-attr]
    cpp.load()

    def step(inp: torch.Tensor) -> torch.Tensor:
        return layer(inp).sum()

    compiled = torch.compile(step, fullgraph=True)
    x = torch.randn(6, 4, 3, 3)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with bnkit.policy(kernels="cpp"):
        compiled(xb).backward()
    step(xa).backward()
    torch.testing.assert_close(xb.grad, xa.grad)
