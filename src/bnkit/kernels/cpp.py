"""bnkit's C++ CPU kernels: built on first use, registered as ``torch.library`` operators.

The sources (``kernels/cpu/*.cpp``, shipped as package data) are compiled with
``torch.utils.cpp_extension.load`` the first time :func:`available` or :func:`load` is called,
against the user's own PyTorch (no wheels to ship, no ABI to match), and cached in PyTorch's
extensions directory, or in ``$BNKIT_EXTENSIONS_DIR`` when set. Flags: ``-O3 -march=native
-fopenmp`` (the library is built on, and for, the machine that runs it).

Operators (float32/float64, CPU, channels on dim 1; NCHW-contiguous, channels-last and 2-D
(N, C) input; other strides are made contiguous first):

* ``bnkit::bn_stats(x) -> (mean, var)``: per-channel mean μ_c and biased variance
  σ²_c = Σ (x - μ_c)² / n in one pass over memory. Values are shifted by the channel's first
  element K_c; runs of at most 2048 values accumulate S1 = Σ (x - K), S2 = Σ (x - K)² in the
  input precision and the runs are summed in float64; μ = K + S1/n, σ² = S2/n - (S1/n)².
* ``bnkit::bn_normalize(x, mean, scale, shift) -> y``: ``y = (x - mean_c)·scale_c + shift_c``
  in one pass (the training normalize with the affine folded in: scale = γ/sqrt(σ² + eps),
  shift = β). Subtracting the mean first keeps large-mean data exact where ``x·a + b`` would
  cancel.
* ``bnkit::bn_eval(x, mean, var, weight, bias, eps) -> y``: the inference pass,
  ``y = (x - μ_c)·γ_c/sqrt(σ²_c + eps) + β_c``, the fold computed in float64.
* ``bnkit::bn_backward(grad_out, x, mean, invstd, weight?, grad_mean?, grad_var?)
  -> (grad_x, grad_weight, grad_bias)``: the training backward (biased batch variance).
  One pass accumulates Σdy and Σdy·(x - μ) per channel (runs in the input precision, summed
  in float64), a second writes ``grad_x = γ·invstd·(dy - Σdy/n - x̂·Σdy·x̂/n)``, plus
  ``grad_mean/n + 2·grad_var·(x - μ)/n`` when gradients of the statistics outputs are given.
* ``bnkit::bn_train(x, weight?, bias?, eps) -> (y, mean, var)``: the training forward
  (``bn_stats`` then the normalize pass), with an autograd formula (``bn_backward``)
  registered by ``torch.library.register_autograd``: differentiable, ``gradcheck`` passes in
  float64, and ``torch.compile(fullgraph=True)`` traces forward and backward.

Not yet here (next steps of issue 7): double backward, half precision, fused activations and
the other options, and dispatch from ``bnkit.functional`` (the default path is untouched).

If no compiler is available or the build fails, :func:`available` warns once
(:class:`CppKernelWarning`) and returns False; callers fall back to PyTorch's kernels.
"""

from __future__ import annotations

import os
import threading
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CppKernelWarning",
    "available",
    "bn_backward",
    "bn_eval",
    "bn_normalize",
    "bn_stats",
    "bn_train",
    "build_error",
    "load",
]

_NAME = "bnkit_cpu_kernels"
_SOURCES = ("bn_kernels.cpp",)
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17"]
_LDFLAGS = ["-fopenmp"]


class CppKernelWarning(UserWarning):
    """The C++ kernels could not be built or loaded; bnkit uses PyTorch's kernels instead."""


_lock = threading.Lock()
_state: dict[str, Any] = {"loaded": False, "error": None, "warned": False}


def _source_paths() -> list[str]:
    root = resources.files("bnkit.kernels") / "cpu"
    paths = [str(root / name) for name in _SOURCES]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"bnkit's C++ sources are missing from the install: {missing}")
    return paths


def _build() -> None:
    """Compile (or load from the cache) and register the operators. Raises on failure."""
    from torch.utils import cpp_extension

    build_dir = os.environ.get("BNKIT_EXTENSIONS_DIR")
    kwargs: dict[str, Any] = {}
    if build_dir:
        path = Path(build_dir) / _NAME
        path.mkdir(parents=True, exist_ok=True)
        kwargs["build_directory"] = str(path)
    cpp_extension.load(
        name=_NAME,
        sources=_source_paths(),
        extra_cflags=_CFLAGS,
        extra_ldflags=_LDFLAGS,
        is_python_module=False,
        verbose=False,
        **kwargs,
    )
    _register_fakes()


def _register_fakes() -> None:
    """Shape-only implementations so torch.compile / FakeTensor can trace the operators."""

    def stats_fake(x: Tensor) -> tuple[Tensor, Tensor]:
        c = x.shape[1]
        return x.new_empty((c,)), x.new_empty((c,))

    def normalize_fake(x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        return torch.empty_like(x)

    def eval_fake(
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ) -> Tensor:
        return torch.empty_like(x)

    def backward_fake(
        grad_out: Tensor,
        x: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        grad_mean: Tensor | None = None,
        grad_var: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        c = x.shape[1]
        return torch.empty_like(x), x.new_empty((c,)), x.new_empty((c,))

    def train_fake(
        x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        c = x.shape[1]
        return torch.empty_like(x), x.new_empty((c,)), x.new_empty((c,))

    for name, fn in (
        ("bnkit::bn_stats", stats_fake),
        ("bnkit::bn_normalize", normalize_fake),
        ("bnkit::bn_eval", eval_fake),
        ("bnkit::bn_backward", backward_fake),
        ("bnkit::bn_train", train_fake),
    ):
        torch.library.register_fake(name, fn)
    torch.library.register_autograd(
        "bnkit::bn_train", _train_backward, setup_context=_train_setup_context
    )


def _train_setup_context(
    ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]
) -> None:
    x, weight, bias, eps = inputs
    _, mean, var = output
    ctx.save_for_backward(x, weight, mean, var)
    ctx.eps = eps
    ctx.has_bias = bias is not None


def _train_backward(
    ctx: Any, grad_y: Tensor, grad_mean: Tensor | None, grad_var: Tensor | None
) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
    x, weight, mean, var = ctx.saved_tensors
    invstd = torch.rsqrt(var + ctx.eps)
    grad_x, grad_weight, grad_bias = torch.ops.bnkit.bn_backward(
        grad_y, x, mean, invstd, weight, grad_mean, grad_var
    )
    return (
        grad_x,
        grad_weight if weight is not None else None,
        grad_bias if ctx.has_bias else None,
        None,
    )


def load() -> None:
    """Build and register the operators now; raises whatever the build raised."""
    with _lock:
        if _state["loaded"]:
            return
        _build()
        _state["loaded"] = True


def available() -> bool:
    """True when the C++ operators are registered (building them on the first call).

    Never raises: a missing compiler or a failed build gives one :class:`CppKernelWarning`
    naming the cause, and False (here and on every later call, without retrying).
    """
    if _state["loaded"]:
        return True
    if _state["error"] is not None:
        return False
    try:
        load()
    except Exception as exc:  # any build or load failure means "fall back"
        error = f"{type(exc).__name__}: {exc}"
        _state["error"] = error
        if not _state["warned"]:
            _state["warned"] = True
            warnings.warn(
                "bnkit: could not build the C++ CPU kernels "
                f"({error.splitlines()[0][:300]}); "
                "using PyTorch's kernels instead (same results, slower). "
                "A C++17 compiler and ninja are needed; set BNKIT_EXTENSIONS_DIR to choose "
                "the build cache.",
                CppKernelWarning,
                stacklevel=2,
            )
        return False
    return True


def build_error() -> str | None:
    """Why the last build failed (None if it did not fail or was not tried)."""
    error: str | None = _state["error"]
    return error


def bn_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` (channels on dim 1), in ``x``'s dtype.

    ``μ_c = Σ x / n``, ``σ²_c = Σ (x - μ_c)² / n`` over every dim but 1; no gradient.
    """
    if not _state["loaded"]:
        load()
    mean, var = torch.ops.bnkit.bn_stats(x)
    return mean, var


def bn_normalize(x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``y = (x - mean_c)·scale_c + shift_c`` in ``x``'s dtype and memory format; no gradient."""
    if not _state["loaded"]:
        load()
    y: Tensor = torch.ops.bnkit.bn_normalize(x, mean, scale, shift)
    return y


def bn_eval(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Inference batch norm ``y = (x - μ_c)·γ_c/sqrt(σ²_c + eps) + β_c`` in one pass.

    The per-channel fold ``γ/sqrt(σ² + eps)`` is computed in float64; no gradient.
    """
    if not _state["loaded"]:
        load()
    y: Tensor = torch.ops.bnkit.bn_eval(x, mean, var, weight, bias, eps)
    return y


def bn_backward(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training batch-norm backward (biased batch variance): ``(grad_x, grad_weight, grad_bias)``.

    ``grad_bias = Σdy``, ``grad_weight = Σdy·x̂`` (one pass, float64 per run) and
    ``grad_x = γ·invstd·(dy − Σdy/n − x̂·Σdy·x̂/n)`` (second pass), ``x̂ = (x − μ)·invstd``;
    ``γ = 1`` when ``weight`` is None. Not differentiable itself (no double backward).
    """
    if not _state["loaded"]:
        load()
    grad_x, grad_weight, grad_bias = torch.ops.bnkit.bn_backward(grad_out, x, mean, invstd, weight)
    return grad_x, grad_weight, grad_bias


def bn_train(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training batch norm with batch statistics: ``(y, mean, biased var)``, differentiable.

    ``y = (x − μ_c)·γ_c/sqrt(σ²_c + eps) + β_c`` with ``μ, σ²`` from :func:`bn_stats`; the
    gradient (to ``x``, ``weight``, ``bias``, also through the ``mean``/``var`` outputs) is
    :func:`bn_backward`. No running statistics are updated here.
    """
    if not _state["loaded"]:
        load()
    y, mean, var = torch.ops.bnkit.bn_train(x, weight, bias, eps)
    return y, mean, var
