"""bnkit's C++ CPU kernels: built on first use, registered as ``torch.library`` operators.

``bnkit.BatchNorm`` and ``bnkit.functional.batch_norm`` run on them under the policy
``kernels="cpp"`` (``bnkit.set_policy(kernels="cpp")``, ``with bnkit.policy(kernels="cpp")``,
a layer's ``policy={"kernels": "cpp"}``, or ``BNKIT_KERNELS=cpp``) or with
``functional.batch_norm(..., impl="cpp")``; the default policy keeps PyTorch's kernels.

The sources (``kernels/cpu/*.cpp``, shipped as package data) are compiled with
``torch.utils.cpp_extension.load`` the first time :func:`available` or :func:`load` is called,
against the user's own PyTorch (no wheels to ship, no ABI to match), and cached in PyTorch's
extensions directory, or in ``$BNKIT_EXTENSIONS_DIR`` when set. Flags: ``-O3 -march=native
-fopenmp -fno-math-errno`` (the library is built on, and for, the machine that runs it;
``errno`` is never read, and without it square roots compile to one instruction).

Operators (CPU; float32/float64, and bfloat16/float16 input with float32 accumulation and
float32 statistics; channels on dim 1; NCHW-contiguous, channels-last and 2-D (N, C) input,
other strides are made contiguous first):

* ``bnkit::bn_train(x, weight?, bias?, eps, ghosts=1, strided=False, renorm_mean?,
  renorm_std?, rmin?, rmax?, dmax?, relu=False, running_mean?, running_var?, momentum,
  sample_weight?, num_batches_tracked?, guard=False, running_std?, renorm_momentum=0.0,
  biased=False) -> (y, mean, var, r, d, updated)``: the
  training forward. Statistics per (ghost batch, channel) -- shifted by the first value, runs
  of at most 2048 values summed in the accumulation type, the runs in float64 -- then
  ``y = act(γ·(x̂·r + d) + β)`` with batch renormalization's r, d from the ghost-averaged
  statistics; PyTorch's running-statistics rule, or Keras' renorm rule, on the buffers given
  (see :func:`train`).
  Differentiable: its autograd formula (C++, ``bn_backward``) covers x, γ, β and
  the mean/var outputs; r and d are constants. With ``create_graph=True`` (double backward)
  the gradient is recomputed with differentiable ATen operations. :func:`train` is the Python
  entry point.
* ``bnkit::bn_backward(dy, x, mean, invstd, weight?, grad_mean?, grad_var?, ghosts, strided,
  r?, d?, output?) -> (dx, dweight, dbias)``: Σdy' and Σdy'·(x − μ) per (ghost, channel)
  (dy' = dy masked by ``output > 0`` for the fused ReLU), then
  ``dx = γ·r·invstd·(dy' − Σdy'/n − x̂·Σdy'·x̂/n)`` plus the statistics outputs' gradients.
* ``bnkit::bn_eval(x, mean, var, weight?, bias?, eps, relu=False) -> y``: the inference pass
  (fold in float64). Its autograd formula (C++) uses
  ``bnkit::bn_eval_backward(dy, x, mean, var, weight?, eps, output?, param_grads=True) -> (dx,
  dweight, dbias)``: ``dx = γ·invstd·dy'`` in one pass, the sums for dγ, dβ in another only when
  ``param_grads``; the statistics get no gradient.
* ``bnkit::bn_stats(x, float64=False, sample_weight?) -> (mean, var)`` and
  ``bnkit::bn_normalize(x, mean, scale, shift, relu=False)``: the two halves of a training
  forward, for synchronized layers (the statistics are merged over the processes in
  between), tests and ``bnkit bench --kernels ops``.
* ``bnkit::bn_grad_sums(dy, x, mean, output?) -> (2, C) float64`` and
  ``bnkit::bn_grad_apply(dy, x, mean, invstd, weight?, grad_mean, grad_var, count, output?,
  sample_weight?) -> dx``: the two halves of a training backward, for synchronized layers
  (the statistics' gradients are all-reduced in between).

Memory passes: on NCHW input whose channels are small enough for a core's cache, one task
per channel computes the statistics and then normalizes the channel while it is still cached
(about one read and one write of memory, as a copy); otherwise a statistics pass then a
normalize pass. Outputs of 1 MiB or more come from a pool of blocks given back by earlier
outputs (:func:`cached_bytes`, :func:`set_pool_limit`; ``$BNKIT_POOL_MIB``, default 1024):
fresh memory from the operating system costs a page fault per 4 KiB, several times the
kernel's own time on large activations. Outputs of 16 MiB or more are written with streaming
stores, past the cache (:func:`set_stream_threshold`). Without any input that requires a
gradient (or under ``torch.no_grad()``) the operators skip their autograd bookkeeping.

If no compiler is available or the build fails, :func:`available` warns once
(:class:`CppKernelWarning`) and returns False; callers fall back to PyTorch's kernels.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "ENTRY",
    "CppKernelWarning",
    "KernelStatus",
    "TrainOutput",
    "available",
    "bn_backward",
    "bn_eval",
    "bn_grad_apply",
    "bn_grad_sums",
    "bn_normalize",
    "bn_stats",
    "bn_train",
    "build_directory",
    "build_error",
    "cached_bytes",
    "eval_call",
    "load",
    "ready",
    "set_pool_limit",
    "set_stream_threshold",
    "status",
    "train",
    "train_call",
]

_NAME = "bnkit_cpu_kernels"
_SOURCES = ("bn_kernels.cpp",)
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-std=c++17"]
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


def build_directory() -> str:
    """Where the compiled library is cached: ``$BNKIT_EXTENSIONS_DIR/bnkit_cpu_kernels``, or
    PyTorch's extensions directory (``$TORCH_EXTENSIONS_DIR``, by default under
    ``~/.cache/torch_extensions``)."""
    root = os.environ.get("BNKIT_EXTENSIONS_DIR")
    if root:
        return str(Path(root) / _NAME)
    from torch.utils import cpp_extension

    # PyTorch's own rule for the default location (a private helper; its layout has been
    # stable across releases: <root>/py<version>_<cpu|cuXY>/<name>).
    return str(cpp_extension._get_build_directory(_NAME, False))


def _build() -> None:
    """Compile (or load from the cache) and register the operators. Raises on failure."""
    from torch.utils import cpp_extension

    kwargs: dict[str, Any] = {}
    if os.environ.get("BNKIT_EXTENSIONS_DIR"):
        path = Path(build_directory())
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

    def output_like(x: Tensor) -> Tensor:
        # The kernels keep x's layout when it is contiguous or has its channels innermost
        # (channels-last); anything else is copied to contiguous first, and so is the output.
        if x.is_contiguous() or x.movedim(1, -1).is_contiguous():
            return torch.empty_like(x)
        return x.new_empty(x.shape)

    def stats_dtype(x: Tensor) -> torch.dtype:
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def stats_fake(
        x: Tensor, float64: bool = False, sample_weight: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        c = x.shape[1]
        dt = torch.float64 if float64 else stats_dtype(x)
        return x.new_empty((c,), dtype=dt), x.new_empty((c,), dtype=dt)

    def normalize_fake(
        x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, relu: bool = False
    ) -> Tensor:
        return output_like(x)

    def grad_sums_fake(
        grad_out: Tensor, x: Tensor, mean: Tensor, output: Tensor | None = None
    ) -> Tensor:
        return x.new_empty((2, x.shape[1]), dtype=torch.float64)

    def grad_apply_fake(
        grad_out: Tensor,
        x: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        grad_mean: Tensor,
        grad_var: Tensor,
        count: float,
        output: Tensor | None = None,
        sample_weight: Tensor | None = None,
    ) -> Tensor:
        return output_like(x)

    def eval_fake(
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        relu: bool = False,
    ) -> Tensor:
        return output_like(x)

    def backward_fake(
        grad_out: Tensor,
        x: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        grad_mean: Tensor | None = None,
        grad_var: Tensor | None = None,
        ghosts: int = 1,
        strided: bool = False,
        r: Tensor | None = None,
        d: Tensor | None = None,
        output: Tensor | None = None,
        sample_weight: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        c = x.shape[1]
        dt = stats_dtype(x)
        return output_like(x), x.new_empty((c,), dtype=dt), x.new_empty((c,), dtype=dt)

    def train_fake(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        ghosts: int = 1,
        strided: bool = False,
        renorm_mean: Tensor | None = None,
        renorm_std: Tensor | None = None,
        rmin: float | None = None,
        rmax: float | None = None,
        dmax: float | None = None,
        relu: bool = False,
        running_mean: Tensor | None = None,
        running_var: Tensor | None = None,
        momentum: float = 0.0,
        sample_weight: Tensor | None = None,
        num_batches_tracked: Tensor | None = None,
        guard: bool = False,
        running_std: Tensor | None = None,
        renorm_momentum: float = 0.0,
        biased: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        c = x.shape[1]
        dt = stats_dtype(x)
        stat_shape = (c,) if ghosts == 1 else (ghosts, c)
        rd = (c,) if renorm_std is not None else (0,)
        return (
            output_like(x),
            x.new_empty(stat_shape, dtype=dt),
            x.new_empty(stat_shape, dtype=dt),
            x.new_empty(rd, dtype=dt),
            x.new_empty(rd, dtype=dt),
            x.new_empty((), dtype=torch.bool),
        )

    def eval_backward_fake(
        grad_out: Tensor,
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        eps: float,
        output: Tensor | None = None,
        param_grads: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor]:
        c = x.shape[1]
        dt = stats_dtype(x)
        return output_like(x), x.new_empty((c,), dtype=dt), x.new_empty((c,), dtype=dt)

    for name, fn in (
        ("bnkit::bn_stats", stats_fake),
        ("bnkit::bn_eval_backward", eval_backward_fake),
        ("bnkit::bn_normalize", normalize_fake),
        ("bnkit::bn_eval", eval_fake),
        ("bnkit::bn_backward", backward_fake),
        ("bnkit::bn_train", train_fake),
        ("bnkit::bn_grad_sums", grad_sums_fake),
        ("bnkit::bn_grad_apply", grad_apply_fake),
    ):
        torch.library.register_fake(name, fn)
    # bnkit::bn_train's autograd formula is registered in C++ (TrainFunction in
    # bn_kernels.cpp): no Python runs per training step.


def load() -> None:
    """Build and register the operators now; raises whatever the build raised."""
    with _lock:
        if _state["loaded"]:
            return
        _build()
        _bind_entry_points()
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


class KernelStatus(NamedTuple):
    """What :func:`status` reports (``bnkit kernels`` prints it)."""

    available: bool
    build_error: str | None
    build_directory: str
    flags: tuple[str, ...]
    threads: int
    pool_limit_bytes: int | None  # None when the kernels are not available
    cached_bytes: int | None
    # Outputs this large are written with streaming stores; None when the kernels are not
    # available or the machine has none (not x86-64).
    stream_threshold_bytes: int | None


def status() -> KernelStatus:
    """Build the kernels if needed (one :class:`CppKernelWarning` if they cannot be built) and
    report where they live, their flags, the threads they use, the output pool and the size
    from which outputs are written with streaming stores.

    Example:
        >>> from bnkit.kernels import cpp
        >>> s = cpp.status()
        >>> s.available == (s.build_error is None)
        True
    """
    ok = available()
    limit = cached = stream = None
    if ok:
        limit = int(torch.ops.bnkit.pool_set_limit(-1))  # a negative limit only reads it
        cached = cached_bytes()
        stream = int(torch.ops.bnkit.stream_set_threshold(-1))  # likewise; -1: cannot stream
        stream = None if stream < 0 else stream
    return KernelStatus(
        available=ok,
        build_error=build_error(),
        build_directory=build_directory(),
        flags=tuple(_CFLAGS),
        threads=torch.get_num_threads(),
        pool_limit_bytes=limit,
        cached_bytes=cached,
        stream_threshold_bytes=stream,
    )


def ready() -> bool:
    """True when the operators are registered already (never builds; safe while compiling)."""
    loaded: bool = _state["loaded"]
    return loaded


def build_error() -> str | None:
    """Why the last build failed (None if it did not fail or was not tried)."""
    error: str | None = _state["error"]
    return error


def bn_stats(
    x: Tensor, *, float64: bool = False, sample_weight: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` (channels on dim 1), in ``x``'s dtype
    (float32 for half-precision input), or in float64 with ``float64``.

    ``μ_c = Σ x / n``, ``σ²_c = Σ (x - μ_c)² / n`` over every dim but 1; no gradient. With
    ``sample_weight`` (the same for every channel: N values, or one per sample and position
    in the order of the non-channel dims), ``μ_c = Σ w·x / W``, ``σ²_c = Σ w·(x − μ_c)² / W``
    with ``W = Σ w`` over the values of a channel, which must be positive. The kernel computes
    both in float64 whatever ``x``'s dtype; ``float64`` keeps them so (the synchronized
    layers merge the processes' moments in float64).
    """
    if not _state["loaded"]:
        load()
    mean, var = torch.ops.bnkit.bn_stats.default(x, float64, sample_weight)
    return mean, var


def bn_normalize(
    x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, *, relu: bool = False
) -> Tensor:
    """``y = act((x - mean_c)·scale_c + shift_c)`` in ``x``'s dtype and memory format, ``act``
    the ReLU with ``relu``; no gradient."""
    if not _state["loaded"]:
        load()
    y: Tensor = torch.ops.bnkit.bn_normalize.default(x, mean, scale, shift, relu)
    return y


def bn_grad_sums(
    grad_out: Tensor, x: Tensor, mean: Tensor, *, output: Tensor | None = None
) -> Tensor:
    """The training backward's per-channel sums alone: a (2, C) float64 tensor of ``Σdy'`` and
    ``Σdy'·(x − mean_c)``, ``dy' = dy`` or, with ``output`` (a fused ReLU's result),
    ``dy·[output > 0]``. One pass; no gradient.

    With :func:`bn_grad_apply`, the backward of statistics shared by several processes: each
    process sums its own values, the terms are all-reduced, then each computes its gradient.
    """
    if not _state["loaded"]:
        load()
    sums: Tensor = torch.ops.bnkit.bn_grad_sums.default(grad_out, x, mean, output)
    return sums


def bn_grad_apply(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    grad_mean: Tensor,
    grad_var: Tensor,
    count: float,
    *,
    output: Tensor | None = None,
    sample_weight: Tensor | None = None,
) -> Tensor:
    """The training backward's input gradient from the statistics' gradients, one pass:
    ``dx = γ_c·invstd_c·dy' + w·(grad_mean_c + 2·grad_var_c·(x − mean_c))/count``.

    ``grad_mean`` and ``grad_var`` are ``∂L/∂μ`` and ``∂L/∂σ²`` summed over every process
    that shares the statistics (from :func:`bn_grad_sums`: ``−γ·invstd·Σdy'`` and
    ``−½·γ·invstd³·Σdy'·(x − μ)`` per process), ``count`` the values per channel over all of
    them (their total weight with ``sample_weight``), ``weight`` γ (γ·r with batch
    renormalization; None for 1), ``w`` each value's sample weight (1 without; as in
    :func:`bn_stats`, and it may sum to zero on this process); ``dy'`` as in
    :func:`bn_grad_sums`. No gradient.

    Example:
        >>> import torch
        >>> from bnkit.kernels import cpp
        >>> x, dy = torch.randn(6, 3, 4), torch.randn(6, 3, 4)
        >>> if cpp.available():  # one process: the same as the fused backward
        ...     mean, var = cpp.bn_stats(x, float64=True)
        ...     invstd = (var + 1e-5).rsqrt()
        ...     s1, s2 = cpp.bn_grad_sums(dy, x, mean)
        ...     gx = cpp.bn_grad_apply(dy, x, mean, invstd, None, -invstd * s1,
        ...                            -0.5 * invstd**3 * s2, 24.0)
        ...     ref = cpp.bn_backward(dy, x, mean, invstd)[0]
        ...     torch.testing.assert_close(gx, ref, rtol=1e-4, atol=1e-5)
    """
    if not _state["loaded"]:
        load()
    gx: Tensor = torch.ops.bnkit.bn_grad_apply.default(
        grad_out, x, mean, invstd, weight, grad_mean, grad_var, float(count), output, sample_weight
    )
    return gx


def bn_eval(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    relu: bool = False,
) -> Tensor:
    """Inference batch norm ``y = (x - μ_c)·γ_c/sqrt(σ²_c + eps) + β_c`` in one pass.

    With ``relu`` the ReLU is applied in the same pass.

    The per-channel fold ``γ/sqrt(σ² + eps)`` is computed in float64. Differentiable in x, γ and
    β (``dx = γ/sqrt(σ² + eps)·dy``, masked by the ReLU; ``bnkit::bn_eval_backward``); the
    statistics are constants, as running statistics are.
    """
    if not _state["loaded"]:
        load()
    # The overload itself, not the packet: the packet's Python dispatch costs about 9 µs per
    # call when the interpreter's caches are cold (between the large kernels of a network).
    y: Tensor = torch.ops.bnkit.bn_eval.default(x, mean, var, weight, bias, eps, relu)
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
    ``γ = 1`` when ``weight`` is None. Not differentiable itself: double backward through
    :func:`train` recomputes the forward with differentiable operations instead.
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

    ``y = (x − μ_c)·γ_c/sqrt(σ²_c + eps) + β_c`` with the batch's ``μ, σ²``; the gradient (to
    ``x``, ``weight``, ``bias``, also through the ``mean``/``var`` outputs) is
    :func:`bn_backward`. No running statistics are updated here. :func:`train` has the options.
    """
    out = train(x, weight, bias, eps)
    return out.y, out.mean, out.var


class TrainOutput(NamedTuple):
    """What :func:`train` returns: the output, the batch statistics and renorm's r and d."""

    y: Tensor
    mean: Tensor  # (C,), or (ghosts, C) with ghost batches
    var: Tensor  # biased, same shape as mean
    r: Tensor  # (C,) with renorm, else empty
    d: Tensor
    updated: Tensor  # 0-d bool: False when the guard skipped the running update


def train(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    ghosts: int = 1,
    strided: bool = False,
    renorm_mean: Tensor | None = None,
    renorm_std: Tensor | None = None,
    rmin: float | None = None,
    rmax: float | None = None,
    dmax: float | None = None,
    relu: bool = False,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    momentum: float = 0.0,
    sample_weight: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
    guard: bool = False,
    running_std: Tensor | None = None,
    renorm_momentum: float = 0.0,
    biased: bool = False,
) -> TrainOutput:
    """The training forward with every option the kernels serve, differentiable.

    Per ghost batch g (``ghosts`` of them: samples ``[g·v, (g+1)·v)``, or ``g, g+G, …`` when
    ``strided``) and channel c: ``x̂ = (x − μ_gc)/sqrt(σ²_gc + eps)``, then
    ``y = act(γ_c·(x̂·r_c + d_c) + β_c)`` with ``act`` = ReLU when ``relu``. Without renorm
    ``r = 1, d = 0``; with it (``renorm_mean``/``renorm_std`` given) ``r = sqrt(σ̄² + eps)/s``,
    ``d = (μ̄ − renorm_mean)/s``, ``s = max(renorm_std, sqrt(eps))``, ``μ̄, σ̄²`` the averages
    over ghosts, r clipped to [rmin, rmax] and d to [−dmax, dmax]; no gradient through r, d.

    With ``running_mean``/``running_var`` (contiguous float32/float64 buffers), PyTorch's rule
    is applied to them in place, as ``torch.nn.functional.batch_norm`` does:
    ``stat += momentum·(batch − stat)`` with the mean and the Bessel-corrected variance
    (``n/max(n − 1, 1)``; the biased variance when ``biased``, as TF-slim and Keras), averaged
    over ghosts, in float64. With ``running_std`` too (renorm), Keras' rule instead:
    ``running_std`` absorbs ``sqrt(var + eps)``, ``running_var := max(running_std² − eps, 0)``,
    and ``renorm_mean``/``renorm_std`` absorb the mean and ``sqrt(biased var + eps)`` with
    ``renorm_momentum`` (after r and d are computed from their old values); the reference is
    ``bnkit.running.update_running_stats_``. ``num_batches_tracked`` (a
    one-element int64 tensor; needs the running buffers) is then advanced by one, as PyTorch
    counts. With ``guard``, an update that would store a NaN or an infinity in any of the buffers
    it writes is skipped whole (buffers and counter unchanged) and ``updated`` is False; the layer's
    ``nonfinite`` policy reports it.

    ``sample_weight`` (no gradient): frequency weights, the same for every channel, per sample
    (``N`` values) or per position (``N·H·W`` values in sample-then-position order):
    ``μ = Σw·x/W``, ``σ² = Σw·(x − μ)²/W`` (``tf.nn.weighted_moments``), ``n = W`` above, with
    ``W`` the total weight of each ghost batch.

    Example:
        >>> import torch
        >>> from bnkit.kernels import cpp
        >>> x = torch.randn(8, 3, 4, 4)
        >>> if cpp.available():
        ...     out = cpp.train(x, ghosts=2, relu=True)
        ...     assert out.mean.shape == (2, 3) and bool((out.y >= 0).all())
    """
    if not _state["loaded"]:
        load()
    y, mean, var, r, d, updated = torch.ops.bnkit.bn_train.default(  # the overload: see bn_eval
        x,
        weight,
        bias,
        eps,
        ghosts,
        strided,
        renorm_mean,
        renorm_std,
        rmin,
        rmax,
        dmax,
        relu,
        running_mean,
        running_var,
        momentum,
        sample_weight,
        num_batches_tracked,
        guard,
        running_std,
        renorm_momentum,
        biased,
    )
    return TrainOutput(y, mean, var, r, d, updated)


def train_call(*args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`train` with all 21 arguments positional, in the order of its signature, and a
    plain tuple back: :data:`ENTRY`'s ``"bn_train"`` as a Python function (what the layers call
    before the kernels are bound). Skipping :func:`train`'s keyword binding and named tuple
    saves about 7 µs per call with the caches cold (a 4x8x3x3 layer's training call after a
    16 MB copy: 81–93 → 73–81 µs). The kernels must be loaded (:func:`ready`).

    Example:
        >>> import torch
        >>> from bnkit.kernels import cpp
        >>> x = torch.randn(8, 3, 4, 4)
        >>> if cpp.available():
        ...     y, mean, var, r, d, updated = cpp.train_call(
        ...         x, None, None, 1e-5, 1, False, None, None, None, None, None, False,
        ...         None, None, 0.0, None, None, False, None, 0.0, False)
        ...     assert mean.shape == (3,) and bool(updated)
    """
    out: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor] = torch.ops.bnkit.bn_train.default(
        *args
    )
    return out


def eval_call(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    relu: bool,
) -> Tensor:
    """:func:`bn_eval` with every argument positional (``relu`` too), for :data:`ENTRY`. The
    kernels must be loaded (:func:`ready`).

    Example:
        >>> import torch
        >>> from bnkit.kernels import cpp
        >>> x = torch.randn(8, 3, 4, 4)
        >>> if cpp.available():
        ...     y = cpp.eval_call(x, torch.zeros(3), torch.ones(3), None, None, 0.0, True)
        ...     assert torch.equal(y, x.clamp_min(0))
    """
    y: Tensor = torch.ops.bnkit.bn_eval.default(x, mean, var, weight, bias, eps, relu)
    return y


#: The layers' per-step entry points, by operator: ``"bn_train"`` takes :func:`train_call`'s
#: arguments, ``"bn_eval"`` :func:`eval_call`'s. Once the kernels are loaded each is the
#: operator's own C++ callable, the one that ``torch.ops.bnkit.<name>.default`` forwards to:
#: with the interpreter's caches cold from the large kernels around a layer, the overload's
#: Python ``__call__`` and a wrapper's frame and keyword binding cost 3–5 µs per call (a 4x8x3x3
#: inference call after a 16 MB copy: 18.7–19.5 µs through :func:`bn_eval`, 15.6 through the
#: overload, 14.0 through its callable). Before loading, and where torch has no such callable,
#: they are :func:`train_call` and :func:`eval_call`. Every call still enters PyTorch's
#: dispatcher (autograd, fake tensors and dispatch modes see it as an operator call).
ENTRY: dict[str, Callable[..., Any]] = {"bn_train": train_call, "bn_eval": eval_call}


def _bind_entry_points() -> None:
    """Point :data:`ENTRY` at the registered operators' own callables."""
    for name, fallback in (("bn_train", train_call), ("bn_eval", eval_call)):
        overload = getattr(torch.ops.bnkit, name).default
        # OpOverload.__call__ is `return self._op(*args, **kwargs)` (torch 2.4 to 2.13).
        ENTRY[name] = getattr(overload, "_op", fallback)


def cached_bytes() -> int:
    """Bytes held by the kernels' output pool (blocks of freed outputs kept for reuse)."""
    if not _state["loaded"]:
        load()
    n: int = torch.ops.bnkit.pool_cached_bytes()
    return n


def set_pool_limit(nbytes: int) -> int:
    """Keep at most ``nbytes`` of freed output blocks for reuse (0 disables the pool).

    The default is 1 GiB, or ``$BNKIT_POOL_MIB`` MiB. Returns the previous limit; lowering it
    frees the oldest cached blocks at once, so ``set_pool_limit(0)`` releases everything.

    Raises:
        ValueError: a negative ``nbytes``.
    """
    return _set_bytes("pool_set_limit", "the pool limit", nbytes)


def set_stream_threshold(nbytes: int) -> int:
    """Write outputs of at least ``nbytes`` with streaming (non-temporal) stores; returns the
    previous threshold.

    The default is 16 MiB: above it an output is out of cache by the time the next layer reads
    it, and stores that bypass the cache save the read of every destination line (on a 48 MiB
    activation, eval 6.0 → 5.0 ms together with the next layer's read of the output here).
    Streaming never changes a value; ``set_stream_threshold(0)`` streams every output whose
    rows are whole cache lines (the tests use it), a huge value turns it off. Builds for other
    machines than x86-64 have no streaming stores: there this returns -1 and changes nothing.

    Raises:
        ValueError: a negative ``nbytes``.
    """
    return _set_bytes("stream_set_threshold", "the stream threshold", nbytes)


def _set_bytes(op: str, what: str, nbytes: int) -> int:
    """Call the size-setting operator ``bnkit::<op>`` with ``nbytes``; returns its old value."""
    if nbytes < 0:
        raise ValueError(f"{what} is a number of bytes >= 0, got {nbytes}")
    if not _state["loaded"]:
        load()
    old: int = getattr(torch.ops.bnkit, op)(int(nbytes))
    return old
