"""Two ways the C++ kernels save time without changing a result.

* Streaming stores: outputs of at least ``cpp.set_stream_threshold()`` bytes (16 MiB by
  default) are written with non-temporal stores through an L1 buffer. Threshold 0 streams every
  output whose runs or rows are whole cache lines; every pass (training forward in tiles, in
  tiles of short channels and in two passes, the rows layout, ghosts, sample weights per sample
  and per position, ReLU, inference, the normalize operator, the training backward, the
  inference backward) must then give bit-for-bit the results of normal stores.
* Calls that need no autograd (grad mode off, or no input that requires a gradient) skip the
  ``torch::autograd::Function`` of ``bn_train`` and ``bn_eval``: same values, outputs without
  ``grad_fn``, buffers' version counters still bumped; a forward-mode tangent still reaches the
  Function (which rejects it, as before).
"""

from __future__ import annotations

import platform
from collections.abc import Iterator

import pytest
import torch
import torch.autograd.forward_ad as fwad

from bnkit.kernels import cpp

OFF = 1 << 62  # no output is that large: normal stores

# (shape, memory layout, what it reaches). float32 rows/runs are whole 64-byte lines when the
# run (inner) or the row (C) holds a multiple of 16 values; float64 a multiple of 8.
CASES = [
    ((8, 4, 16, 16), "contiguous", "tiles, one run per (sample, channel)"),
    ((64, 4, 4, 4), "contiguous", "tiles of short channels (spread constants)"),
    ((4, 2, 192, 192), "contiguous", "two passes: a channel too large for a tile, runs of 2048"),
    ((12, 1, 8, 8), "contiguous", "two passes: fewer channels than threads"),
    ((8, 16, 6, 6), "channels_last", "rows of 16 channels"),
    ((4096, 16), "contiguous", "2-D rows, several threads"),
    ((8, 5, 13), "contiguous", "runs of 13: not whole lines, normal stores"),
]
IDS = [f"{'x'.join(map(str, s))}-{layout}" for s, layout, _ in CASES]


@pytest.fixture(scope="module")
def built() -> None:
    cpp.load()  # raises (test error) if the extension cannot be built here


@pytest.fixture
def restore_threshold() -> Iterator[None]:
    old = cpp.set_stream_threshold(OFF)
    try:
        yield
    finally:
        cpp.set_stream_threshold(old)


def _input(shape: tuple[int, ...], layout: str, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + 2).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _weights(kind: str, x: torch.Tensor) -> torch.Tensor | None:
    """Sample weights as the kernels take them: per sample (N) or per position (N·spatial)."""
    gen = torch.Generator().manual_seed(3)
    n = x.shape[0]
    if kind == "none":
        return None
    if kind == "sample":
        return torch.rand(n, generator=gen, dtype=x.dtype) + 0.5
    spatial = x.numel() // (n * x.shape[1])
    mask = (torch.rand(n * spatial, generator=gen) > 0.3).to(x.dtype)
    mask[0] = 1  # every ghost keeps a value
    mask[mask.numel() // 2] = 1
    return mask


def _train_step(x: torch.Tensor, ghosts: int, weights: str, relu: bool) -> list[torch.Tensor]:
    """Forward (with the running update) and backward of cpp.train; every tensor it produces."""
    c = x.shape[1]
    gen = torch.Generator().manual_seed(7)
    weight = (torch.rand(c, generator=gen, dtype=x.dtype) + 0.5).requires_grad_()
    bias = torch.randn(c, generator=gen, dtype=x.dtype).requires_grad_()
    running_mean = torch.zeros(c, dtype=x.dtype)
    running_var = torch.ones(c, dtype=x.dtype)
    xg = x.detach().clone().requires_grad_()
    out = cpp.train(
        xg,
        weight,
        bias,
        ghosts=ghosts,
        relu=relu,
        running_mean=running_mean,
        running_var=running_var,
        momentum=0.1,
        sample_weight=_weights(weights, x),
    )
    dy = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(memory_format=_format(x))
    grads = torch.autograd.grad(out.y, (xg, weight, bias), dy)
    return [out.y, out.mean, out.var, running_mean, running_var, *grads]


def _format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _eval_step(x: torch.Tensor, relu: bool) -> list[torch.Tensor]:
    """bn_eval with gradients to x, γ and β, and bn_normalize."""
    c = x.shape[1]
    gen = torch.Generator().manual_seed(11)
    mean = torch.randn(c, generator=gen, dtype=x.dtype)
    var = torch.rand(c, generator=gen, dtype=x.dtype) + 0.5
    weight = (torch.rand(c, generator=gen, dtype=x.dtype) + 0.5).requires_grad_()
    bias = torch.randn(c, generator=gen, dtype=x.dtype).requires_grad_()
    xg = x.detach().clone().requires_grad_()
    y = cpp.bn_eval(xg, mean, var, weight, bias, 1e-3, relu=relu)
    dy = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(memory_format=_format(x))
    grads = torch.autograd.grad(y, (xg, weight, bias), dy)
    normalized = cpp.bn_normalize(x, mean, var, weight.detach())
    return [y, *grads, normalized]


def _both_ways(step: object) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    assert callable(step)
    cpp.set_stream_threshold(OFF)
    normal = step()
    cpp.set_stream_threshold(0)
    streamed = step()
    return normal, streamed


def _assert_identical(normal: list[torch.Tensor], streamed: list[torch.Tensor]) -> None:
    assert len(normal) == len(streamed)
    for i, (a, b) in enumerate(zip(normal, streamed, strict=True)):
        assert a.stride() == b.stride(), i
        assert torch.equal(a, b), f"output {i} differs with streaming stores"


@pytest.mark.usefixtures("built", "restore_threshold")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("shape", "layout", "path"), CASES, ids=IDS)
@pytest.mark.parametrize(
    ("ghosts", "weights", "relu"),
    [(1, "none", False), (2, "none", True), (1, "sample", False), (2, "position", True)],
    ids=["plain", "ghosts-relu", "sample-weights", "mask-ghosts-relu"],
)
def test_streaming_stores_change_no_training_result(
    shape, layout, path, dtype, ghosts, weights, relu, threads
) -> None:
    x = _input(shape, layout, dtype, seed=1)
    normal, streamed = _both_ways(lambda: _train_step(x, ghosts, weights, relu))
    _assert_identical(normal, streamed)


@pytest.mark.usefixtures("built", "restore_threshold")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("shape", "layout", "path"), CASES, ids=IDS)
@pytest.mark.parametrize("relu", [False, True])
def test_streaming_stores_change_no_inference_result(
    shape, layout, path, dtype, relu, threads
) -> None:
    x = _input(shape, layout, dtype, seed=2)
    normal, streamed = _both_ways(lambda: _eval_step(x, relu))
    _assert_identical(normal, streamed)


@pytest.mark.usefixtures("built", "restore_threshold")
def test_streamed_values_match_closed_form() -> None:
    # Not only equal to the normal stores: right (a regression that broke both alike).
    cpp.set_stream_threshold(0)
    x = _input((4, 2, 192, 192), "contiguous", torch.float64, seed=4)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), correction=0)
    y = cpp.bn_eval(x, mean, var, None, None, 1e-5)
    want = (x - mean[:, None, None]) / (var + 1e-5).sqrt()[:, None, None]
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    out = cpp.train(x, eps=1e-5)
    torch.testing.assert_close(out.y, want, rtol=1e-10, atol=1e-10)


X86_64 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.mark.usefixtures("built", "restore_threshold")
@pytest.mark.skipif(not X86_64, reason="streaming stores exist on x86-64 builds only")
def test_stream_threshold_is_set_read_and_checked() -> None:
    cpp.set_stream_threshold(12345)
    assert cpp.set_stream_threshold(4096) == 12345
    assert cpp.status().stream_threshold_bytes == 4096
    with pytest.raises(ValueError, match="bytes >= 0"):
        cpp.set_stream_threshold(-1)
    assert cpp.status().stream_threshold_bytes == 4096


# ------------------------------------------------------- calls that need no autograd


def _buffers(c: int) -> dict[str, torch.Tensor]:
    return {
        "running_mean": torch.zeros(c),
        "running_var": torch.ones(c),
        "num_batches_tracked": torch.zeros((), dtype=torch.long),
        "running_std": torch.ones(c),
        "renorm_mean": torch.zeros(c),
        "renorm_std": torch.ones(c),
    }


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("grad_mode", ["no_grad", "nothing_requires_grad"])
def test_train_without_autograd_bumps_every_updated_buffer(grad_mode: str) -> None:
    x = torch.randn(6, 3, 4)
    buffers = _buffers(3)
    before = {k: t._version for k, t in buffers.items()}
    with torch.set_grad_enabled(grad_mode != "no_grad"):
        out = cpp.train(x, momentum=0.2, renorm_momentum=0.1, **buffers)  # type: ignore[arg-type]
    assert out.y.grad_fn is None
    assert not out.y.requires_grad
    assert bool(out.updated)
    assert int(buffers["num_batches_tracked"]) == 1
    for name, t in buffers.items():
        assert t._version > before[name], name  # autograd and compiled graphs see the update


@pytest.mark.usefixtures("built")
def test_train_without_autograd_gives_the_autograd_results() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, 3, 3, generator=gen)
    weight, bias = torch.rand(5, generator=gen) + 0.5, torch.randn(5, generator=gen)
    plain = cpp.train(x, weight, bias, ghosts=2, relu=True)
    tracked = cpp.train(x, weight.requires_grad_(), bias, ghosts=2, relu=True)
    assert tracked.y.grad_fn is not None
    for a, b in zip(plain, tracked, strict=True):
        assert torch.equal(a, b.detach())


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize(
    "needs_grad", ["x", "weight", "bias", "running_mean", "sample_weight", "renorm_mean"]
)
def test_train_keeps_autograd_for_any_input_that_requires_grad(needs_grad: str) -> None:
    c = 3
    args: dict[str, torch.Tensor] = {
        "x": torch.randn(6, c, 4),
        "weight": torch.rand(c) + 0.5,
        "bias": torch.randn(c),
        "sample_weight": torch.rand(6) + 0.5,
        **_buffers(c),
    }
    del args["num_batches_tracked"]  # an integer tensor cannot require grad
    args[needs_grad] = args[needs_grad].clone().requires_grad_()
    x = args.pop("x")
    out = cpp.train(x, momentum=0.1, renorm_momentum=0.1, **args)  # type: ignore[arg-type]
    assert out.y.requires_grad
    assert out.y.grad_fn is not None


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("needs_grad", ["none", "x", "mean", "weight"])
def test_eval_uses_autograd_only_when_an_input_requires_grad(needs_grad: str) -> None:
    x, mean, var = torch.randn(4, 3, 5), torch.randn(3), torch.rand(3) + 0.5
    weight, bias = torch.rand(3) + 0.5, torch.randn(3)
    tensors = {"x": x, "mean": mean, "weight": weight}
    if needs_grad != "none":
        tensors[needs_grad] = tensors[needs_grad].clone().requires_grad_()
    y = cpp.bn_eval(tensors["x"], tensors["mean"], var, tensors["weight"], bias, 1e-5)
    assert (y.grad_fn is not None) == (needs_grad != "none")
    want = (x - mean[:, None]) * (weight / (var + 1e-5).sqrt())[:, None] + bias[:, None]
    torch.testing.assert_close(y.detach(), want)


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("op", ["train", "eval"])
def test_functorch_transforms_accept_calls_on_constants(op: str) -> None:
    # torch.func rejects C++ autograd Functions; a call whose inputs are constants of the
    # transform (nothing requires grad) no longer builds one, so it runs, with the right value.
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, 5, generator=gen, dtype=torch.float64) + 1
    mean, var = torch.randn(3, generator=gen, dtype=torch.float64), torch.rand(3, dtype=x.dtype)
    probe = torch.randn(x.shape, generator=gen, dtype=x.dtype)  # the sum of x̂ alone is 0
    if op == "train":
        mean, var = x.mean((0, 2)), x.var((0, 2), correction=0)
    want = (probe * (x - mean[:, None]) / (var[:, None] + 1e-5).sqrt()).sum()

    def normalized() -> torch.Tensor:
        if op == "train":
            return cpp.train(x, eps=1e-5).y
        return cpp.bn_eval(x, mean, var, None, None, 1e-5)

    got = torch.func.grad(lambda p: p * (probe * normalized()).sum())(
        torch.tensor(2.0, dtype=x.dtype)
    )
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("op", ["train", "eval"])
def test_forward_mode_tangents_still_reach_the_function(op: str) -> None:
    # The C++ Functions have no jvp: a dual input must fail loudly, not lose its tangent.
    x = torch.randn(4, 3, 5)

    def call(dual: torch.Tensor) -> object:
        if op == "train":
            return cpp.train(dual)
        return cpp.bn_eval(dual, torch.zeros(3), torch.ones(3))

    with fwad.dual_level():
        dual = fwad.make_dual(x, torch.randn_like(x))
        with pytest.raises(RuntimeError, match=r"(?i)jvp|forward"):
            call(dual)
