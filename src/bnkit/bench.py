"""Benchmark harness behind ``bnkit bench``: bnkit against PyTorch's kernel and a plain copy.

Every row times three things on the same input tensor, interleaved in one loop (the order
rotates every repeat, so drift on a noisy machine hits all three alike):

* ``bnkit``: a :class:`bnkit.BatchNorm` module (channels on axis 1) with the row's
  configuration, called as a user calls it, including its running-statistics update.
* ``torch``: ``torch.nn.functional.batch_norm`` with running buffers, weight and bias, i.e.
  the same work (normalize, affine, update running statistics). For the non-default
  configurations (renorm, per-sample weights, ghost batches) this is still *plain* batch
  norm: the question is what the option costs over PyTorch's own kernel.
* ``copy``: ``dst.copy_(x)`` into a preallocated tensor of the same memory format, one read
  and one write of the input: the memory-traffic floor of a training forward.

Modes: ``fwd`` (training forward under ``torch.no_grad``), ``fwd+bwd`` (training forward, then
``torch.autograd.grad`` for the input, weight and bias with a fixed output gradient) and
``eval`` (inference with the running statistics, under ``torch.no_grad``). In ``eval`` every
configuration runs the same code (no ghosts, renorm or sample weights in inference), so only
the default configuration is timed there.

Times are medians over repeats of one timed sample each; a sample averages ``inner``
back-to-back calls, the same count for every contender of a row, when the row's slowest call
is shorter than about a millisecond. Peak memory (``fwd+bwd``
rows) is the largest number of bytes that PyTorch's CPU allocator held at once during one
forward+backward beyond what was allocated before it (output, saved tensors, gradients and
temporaries), read from the allocation events of ``torch.profiler`` with ``profile_memory``.
Each row also records the share of the machine's CPU time that other processes took while it
ran (:class:`CpuMonitor`): on a shared machine that is what makes timings unreliable.

With ``compare_tf`` (``--compare-tf``) each row also times tf_keras' BatchNormalization on the
same values (:mod:`bnkit.bench_tf`), in its own loop right after the other contenders.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnkit.modules import BatchNorm

__all__ = [
    "CONFIGS",
    "DEFAULT_CONFIGS",
    "DEFAULT_SHAPES",
    "LAYOUTS",
    "MODES",
    "QUICK_SHAPES",
    "TARGETS",
    "BenchReport",
    "BenchResult",
    "CpuMonitor",
    "KernelResult",
    "add_arguments",
    "cpp_speedup",
    "format_kernel_table",
    "format_table",
    "machine_info",
    "parse_shapes",
    "run_benchmark",
    "run_cli",
    "run_kernel_benchmark",
]

#: Every configuration the harness knows; ``ghost_strided`` (Keras' ghost layout) is opt-in.
CONFIGS = ("default", "renorm", "weights", "ghost", "ghost_strided")
#: The configurations ``bnkit bench`` runs unless told otherwise.
DEFAULT_CONFIGS = ("default", "renorm", "weights", "ghost")
MODES = ("fwd", "fwd+bwd", "eval")
LAYOUTS = ("contiguous", "channels_last")
DEFAULT_SHAPES: tuple[tuple[int, ...], ...] = (
    (64, 64, 56, 56),
    (32, 256, 14, 14),
    (128, 512, 7, 7),
    (256, 1024),
)
QUICK_SHAPES: tuple[tuple[int, ...], ...] = ((16, 8, 6, 6), (32, 16))
#: Largest allowed bnkit/torch ratio: the default configuration must stay within 10% of
#: PyTorch's kernel; renorm, sample weights and ghost batches within 2x of plain batch norm.
TARGETS = {"default": 1.10, "renorm": 2.0, "weights": 2.0, "ghost": 2.0, "ghost_strided": 2.0}
#: ``--kernels cpp`` (issue 7): every row at most this many times the copy, and never slower
#: than ``F.batch_norm`` (bnkit/torch <= 1), with peak memory no higher than torch's.
CPP_COPY_TARGETS = {"fwd": 2.0, "fwd+bwd": 4.0, "eval": 1.3}


def cpp_copy_target(shape: Sequence[int], mode: str) -> float | None:
    """The copy-time target of a ``--kernels cpp`` row: :data:`CPP_COPY_TARGETS` on the
    ResNet-like shapes (N, C, H, W), the ones issue 7 sets them for; None for 2-D (N, C) rows,
    which are judged by never being slower than ``F.batch_norm`` (and by memory). A 256x1024
    copy takes about 13 µs, less than one Python call of any batch-norm module; PyTorch's own
    kernel takes 6x the copy there.

    >>> cpp_copy_target((32, 256, 14, 14), "fwd"), cpp_copy_target((256, 1024), "fwd")
    (2.0, None)
    """
    return CPP_COPY_TARGETS[mode] if len(shape) >= 3 else None


#: ``--kernels cpp``: the geometric mean of torch/bnkit over the NCHW fwd+bwd rows of the
#: default configuration must reach this.
CPP_SPEEDUP_TARGET = 3.0
#: ``--kernels``: torch = the default policy; cpp = the C++ kernels (policy kernels="cpp");
#: ops = the C++ operators alone (``run_kernel_benchmark``).
KERNEL_CHOICES = ("torch", "cpp", "ops")

_EPS = 1e-5
_MOMENTUM = 0.1
_SAMPLE_S = 1e-3  # a timed sample should last at least this long (calls are batched)
_ROW_BUDGET_S = 1.5  # wall time the repeats of one row aim at when repeats are automatic
_MIN_REPEATS, _MAX_REPEATS, _MAX_INNER = 5, 51, 200


@dataclass(frozen=True)
class BenchResult:
    """One row: a shape, layout, configuration and mode, timed three ways.

    Times are medians in milliseconds; ratios are ``bnkit_ms / torch_ms`` etc. Peak memory is
    in MiB (``fwd+bwd`` rows only, else None). ``other_cpu`` is the share of the machine's CPU
    time that other processes (and the hypervisor, as steal time) took while the row ran:
    above a few percent, the row's timings are disturbed.
    """

    shape: tuple[int, ...]
    layout: str
    config: str
    mode: str
    path: str
    repeats: int
    inner: tuple[int, int, int]
    bnkit_ms: float
    torch_ms: float
    copy_ms: float
    bnkit_vs_torch: float
    bnkit_vs_copy: float
    torch_vs_copy: float
    target: float
    meets_target: bool
    peak_bnkit_mib: float | None = None
    peak_torch_mib: float | None = None
    other_cpu: float | None = None
    #: ``torch.nn.BatchNorm*d`` (the module, with its own call overhead and counter update)
    #: over ``torch.nn.functional.batch_norm``; default configuration only.
    torch_module_vs_torch: float | None = None
    #: ``--compare-tf``: tf_keras' BatchNormalization on the same values (``bnkit.bench_tf``),
    #: median ms, and ``bnkit_ms / tf_ms``; None when TensorFlow was not compared.
    tf_ms: float | None = None
    vs_tf: float | None = None
    #: ``--kernels cpp``: the largest allowed bnkit/copy ratio (None otherwise).
    copy_target: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["inner"] = list(self.inner)
        return d


@dataclass
class BenchReport:
    """All rows plus what the numbers depend on (machine, threads, versions, command)."""

    meta: dict[str, Any]
    results: list[BenchResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "results": [r.to_dict() for r in self.results]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ----------------------------------------------------------------------------- parsing


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """Parse ``"64x64x56x56,256x1024"`` into shapes (rank 2 or 4, positive sizes).

    Raises:
        ValueError: for a malformed shape, a rank other than 2 or 4, or a batch of one.

    >>> parse_shapes("8x4x3x3, 16x32")
    [(8, 4, 3, 3), (16, 32)]
    """
    shapes: list[tuple[int, ...]] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            shape = tuple(int(s) for s in part.lower().split("x"))
        except ValueError:
            raise ValueError(
                f"bad shape {part!r}: write sizes joined by 'x', e.g. 32x256x14x14 or 256x1024"
            ) from None
        if len(shape) not in (2, 4) or min(shape) < 1:
            raise ValueError(
                f"bad shape {part!r}: use rank 4 (N x C x H x W) or rank 2 (N x C) with "
                "positive sizes"
            )
        if shape[0] < 2:
            raise ValueError(f"bad shape {part!r}: training needs a batch of 2 or more")
        shapes.append(shape)
    if not shapes:
        raise ValueError("no shapes given")
    return shapes


def _parse_names(text: str | Sequence[str], known: Sequence[str], what: str) -> list[str]:
    names = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; choose from {', '.join(known)}")
    if not names:
        raise ValueError(f"no {what} given; choose from {', '.join(known)}")
    return list(dict.fromkeys(names))


def ghost_batch_size(n: int) -> int:
    """Samples per ghost batch for a batch of ``n``: the largest of 16, 8, 4, 2 below ``n``
    that divides it (16 for every default shape)."""
    for v in (16, 8, 4, 2):
        if v < n and n % v == 0:
            return v
    raise ValueError(f"batch size {n} cannot be split into ghost batches of 2 or more")


def path_of(config: str, mode: str, kernels: str = "torch") -> str:
    """Which family of code bnkit's functional core runs for a row (see
    ``docs/architecture.md``): PyTorch's training kernel with its own running update for the
    default configuration and always in inference; the statistics-then-normalize kernel path
    (``bnkit.kernels``) for the options; its weighted statistics for sample weights. Under
    ``kernels="cpp"`` the C++ kernels run every row."""
    if kernels == "cpp":
        return "cpp"
    if mode == "eval" or config == "default":
        return "native kernel"
    if config == "weights":
        return "kernels, weighted"
    return "kernels"


# ---------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _stream_line(meta: dict[str, Any]) -> str:
    """The header line saying from which output size the C++ kernels stream their stores
    (``bnkit.kernels.cpp.set_stream_threshold``): it changes the large rows' timings."""
    threshold = meta.get("stream_threshold_bytes")
    if threshold is None:
        return "C++ kernels: no streaming stores on this machine (not x86-64)"
    return f"C++ kernels: streaming stores for outputs of {threshold / 2**20:g} MiB or more"


def kernel_script_main(
    argv: list[str] | None,
    *,
    prog: str,
    doc: str,
    title: str,
    default_shapes: str,
    table: Callable[[list[tuple[int, ...]], int | None], str],
) -> int:
    """The command line of the scripts in ``benchmarks/`` that time the C++ kernels.

    ``--shapes`` and ``--repeats`` are parsed, the kernels built (exit status 1 with the build
    error when they cannot be), and ``table(shapes, repeats)`` printed under a header line
    that starts with ``title`` and names the date, torch, its threads and the CPU.

    Example:
        >>> import contextlib, io
        >>> from bnkit.kernels import cpp
        >>> out = io.StringIO()
        >>> with contextlib.redirect_stdout(out):
        ...     code = kernel_script_main(["--shapes", "4x3"], prog="x.py", doc="X.",
        ...                               title="demo", default_shapes="8x2",
        ...                               table=lambda shapes, repeats: f"{shapes} {repeats}")
        >>> if cpp.available():
        ...     assert code == 0 and out.getvalue().startswith("demo, ")
        ...     assert out.getvalue().splitlines()[-2:] == ["", "[(4, 3)] None"]
    """
    parser = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    parser.add_argument("--shapes", default=default_shapes, help="e.g. 32x256x14x14,256x1024")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per row")
    args = parser.parse_args(argv)
    from bnkit.kernels import cpp

    if not cpp.available():
        print(f"the C++ kernels cannot be built here: {cpp.build_error()}", file=sys.stderr)
        return 1
    info = machine_info()
    print(
        f"{title}, {info['date']}: torch {info['torch_version']}, "
        f"{info['torch_threads']} torch threads, {info['cpu_model']}"
    )
    print()
    print(table(parse_shapes(args.shapes), args.repeats))
    return 0


def machine_info() -> dict[str, Any]:
    """What the timings depend on: CPU, cores, torch threads and versions, date."""
    import bnkit

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "bnkit_version": bnkit.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "dtype": "float32",
        "load_average": _load_average(),
    }


class CpuMonitor:
    """How much CPU time *other* processes used between :meth:`start` and :meth:`stop`.

    Busy time of the whole machine comes from ``/proc/stat`` (user, nice, system, irq,
    softirq and steal jiffies); this process's own CPU time (all its threads) from
    ``resource.getrusage``. Their difference, divided by wall time times the number of
    CPUs, is the share of the machine others took. None where ``/proc/stat`` is missing.
    """

    def __init__(self) -> None:
        self._start: tuple[float, float, float] | None = None

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                fields = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        busy_s = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), busy_s, usage.ru_utime + usage.ru_stime

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> float | None:
        """Share (0 to 1) of all CPUs' time used by others since :meth:`start`."""
        end = self._sample()
        if self._start is None or end is None:
            return None
        wall = end[0] - self._start[0]
        if wall <= 0:
            return None
        others = (end[1] - self._start[1]) - (end[2] - self._start[2])
        return min(1.0, max(0.0, others / (wall * (os.cpu_count() or 1))))


def _load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages: more than ``cpu_count`` means other processes
    competed for the cores and the timings are noisy."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ----------------------------------------------------------------------------- cases


@dataclass
class _Case:
    """Callables for one row: bnkit, torch and copy, each doing one full step."""

    bnkit: Callable[[], None]
    torch: Callable[[], None]
    copy: Callable[[], None]
    torch_module: Callable[[], None] | None = None
    tf: Callable[[], None] | None = None


def _tf_step(
    x: Tensor,
    layout: str,
    mode: str,
    weight: Tensor,
    bias: Tensor,
    grad_out: Tensor | None,
    options: dict[str, Any],
    sample_weights: Tensor | None,
) -> Callable[[], None]:
    """``--compare-tf``: tf_keras' BatchNormalization on the row's values (``bnkit.bench_tf``)."""
    from bnkit import bench_tf

    return bench_tf.keras_step(
        x,
        layout=layout,
        mode=mode,
        weight=weight,
        bias=bias,
        grad_out=grad_out,
        renorm=bool(options.get("renorm", False)),
        virtual_batch_size=options.get("virtual_batch_size"),
        sample_weights=sample_weights,
        momentum=_MOMENTUM,
        eps=_EPS,
    )


def _make_input(shape: tuple[int, ...], layout: str, gen: torch.Generator) -> Tensor:
    x = torch.randn(shape, generator=gen) * 2.0 + 0.5
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _build_case(
    shape: tuple[int, ...],
    layout: str,
    config: str,
    mode: str,
    seed: int,
    compare_tf: bool = False,
    kernels: str = "torch",
) -> _Case:
    gen = torch.Generator().manual_seed(seed)
    n, c = shape[0], shape[1]
    x = _make_input(shape, layout, gen)
    options: dict[str, Any] = {}
    if config == "renorm":
        options["renorm"] = True
    elif config in ("ghost", "ghost_strided"):
        options["virtual_batch_size"] = ghost_batch_size(n)
        options["ghost_layout"] = "strided" if config == "ghost_strided" else "contiguous"
    # The fwd mode times a training forward without autograd on purpose.
    quiet = {"no_grad_training": "ignore", "kernels": kernels}
    module = BatchNorm(c, axis=1, eps=_EPS, momentum=_MOMENTUM, policy=quiet, **options)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5, generator=gen)  # type: ignore[union-attr]
        module.bias.uniform_(-0.5, 0.5, generator=gen)  # type: ignore[union-attr]
    module.train(mode != "eval")
    sample_weights = torch.rand(n, generator=gen) + 0.5 if config == "weights" else None

    t_weight = module.weight.detach().clone().requires_grad_(True)  # type: ignore[union-attr]
    t_bias = module.bias.detach().clone().requires_grad_(True)  # type: ignore[union-attr]
    t_mean, t_var = torch.zeros(c), torch.ones(c)
    training = mode != "eval"

    def run_bnkit(inp: Tensor) -> Tensor:
        y: Tensor = module(inp, weights=sample_weights)
        return y

    def run_torch(inp: Tensor) -> Tensor:
        return F.batch_norm(inp, t_mean, t_var, t_weight, t_bias, training, _MOMENTUM, _EPS)

    dst = torch.empty_like(x)
    # PyTorch's own module, as a second reference for the default configuration: module
    # calls carry overhead that the functional baseline does not.
    torch_module: nn.Module | None = None
    if config == "default":
        torch_module = (nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(
            c, eps=_EPS, momentum=_MOMENTUM
        )
        with torch.no_grad():
            torch_module.weight.copy_(t_weight)
            torch_module.bias.copy_(t_bias)
        torch_module.train(training)

    def copy() -> None:
        dst.copy_(x)

    if mode == "fwd+bwd":
        xg = x.detach().requires_grad_(True)
        grad_out = _make_input(shape, layout, gen)
        b_inputs = (xg, module.weight, module.bias)
        t_inputs = (xg, t_weight, t_bias)

        def bnkit_step() -> None:
            torch.autograd.grad(run_bnkit(xg), b_inputs, grad_out)  # type: ignore[arg-type]

        def torch_step() -> None:
            torch.autograd.grad(run_torch(xg), t_inputs, grad_out)

        module_step = None
        if torch_module is not None:
            m_inputs = [xg, *torch_module.parameters()]

            def module_step() -> None:
                torch.autograd.grad(torch_module(xg), m_inputs, grad_out)

        tf_step = None
        if compare_tf:
            tf_step = _tf_step(x, layout, mode, t_weight, t_bias, grad_out, options, sample_weights)
        return _Case(bnkit_step, torch_step, copy, module_step, tf_step)

    def bnkit_fwd() -> None:
        with torch.no_grad():
            run_bnkit(x)

    def torch_fwd() -> None:
        with torch.no_grad():
            run_torch(x)

    module_fwd = None
    if torch_module is not None:
        reference_module = torch_module

        def module_fwd() -> None:
            with torch.no_grad():
                reference_module(x)

    tf_fwd = None
    if compare_tf:
        tf_fwd = _tf_step(x, layout, mode, t_weight, t_bias, None, options, sample_weights)
    return _Case(bnkit_fwd, torch_fwd, copy, module_fwd, tf_fwd)


# ---------------------------------------------------------------------------- timing


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _time_once(fn: Callable[[], None], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def time_interleaved(
    fns: Sequence[Callable[[], None]],
    *,
    repeats: int | None,
    warmup: int,
    batch_calls: bool = True,
    inner: int | None = None,
) -> tuple[list[float], int, list[int]]:
    """Median seconds per call of each function, timed alternately in one loop.

    Each repeat times every function once, starting with a different one each time (the
    order rotates), so slow drifts of a shared machine affect all of them alike. With
    ``batch_calls`` a timed sample runs ``inner`` calls back to back when the slowest
    function's call is shorter than about a millisecond; every function gets that same count,
    so all are timed in the same state of the caches. ``inner`` fixes that count instead (a
    contender timed in a loop of its own, as TensorFlow is, takes its row's count).
    ``repeats=None`` picks a count (5 to 51) that fits a budget of about 1.5 seconds for the
    row.

    Returns:
        ``(medians, repeats, inner)``: median seconds per call of each function, the number
        of repeats and the calls per sample of each function.
    """
    k = len(fns)
    with _gc_paused():
        estimate = [0.0] * k
        for _ in range(max(1, warmup)):
            for i, fn in enumerate(fns):
                estimate[i] = _time_once(fn, 1)
        # One count for every contender, the slowest one's: a contender timed in a longer
        # back-to-back loop than the others finds its data in the cache the previous call left,
        # and the others after them do not, so their ratio would compare a warm loop with cold
        # calls (on 128x512x7x7 a copy looped twice took 0.58 ms, called once 0.72 ms).
        if inner is None:
            slowest = max(estimate, default=0.0)
            inner = min(_MAX_INNER, max(1, math.ceil(_SAMPLE_S / max(slowest, 1e-9))))
        counts = [inner if batch_calls else 1] * k
        if repeats is None:
            per_repeat = sum(e * m for e, m in zip(estimate, counts, strict=True))
            repeats = int(min(_MAX_REPEATS, max(_MIN_REPEATS, _ROW_BUDGET_S / per_repeat)))
        samples: list[list[float]] = [[] for _ in fns]
        for r in range(repeats):
            for j in range(k):
                i = (r + j) % k
                samples[i].append(_time_once(fns[i], counts[i]))
    return [statistics.median(s) for s in samples], repeats, counts


# ---------------------------------------------------------------------------- memory


@contextlib.contextmanager
def filtered_stderr(drop: Callable[[str], bool]) -> Iterator[None]:
    """Capture what C++ code writes to fd 2 in the block; print back the lines ``drop`` keeps.

    C++ libraries write to the file descriptor directly, past ``sys.stderr``: the profiler's
    start/stop lines, TensorFlow's start-up banners. Without a usable fd 2, nothing is done.
    """
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode("utf-8", "replace").splitlines():
                if not drop(line):
                    print(line, file=sys.stderr)


def _quiet_stderr() -> contextlib.AbstractContextManager[None]:
    """Hide the profiler's C++ start/stop lines on fd 2; pass any other line through."""
    return filtered_stderr(lambda line: "profiler_st" in line)


def peak_allocated_bytes(fn: Callable[[], None]) -> int | None:
    """Largest number of bytes PyTorch's CPU allocator held during ``fn()`` above its
    starting point, from ``torch.profiler``'s allocation events (None if unavailable).

    This counts every tensor allocation made through PyTorch's allocator, temporaries inside
    kernels included; it does not count memory that was already allocated when ``fn``
    started (the input), nor allocations outside PyTorch. The events are read from
    ``prof.profiler.kineto_results``, which is not a public API: should it move, the result
    is None rather than a wrong number.
    """
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    try:
        with (
            _quiet_stderr(),
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
        ):
            fn()
        results: Any = getattr(prof.profiler, "kineto_results", None)
        if results is None:
            return None
        events = [
            (int(e.start_ns()), int(e.nbytes()))
            for e in results.events()
            if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
        ]
    except (RuntimeError, AttributeError, TypeError):
        return None
    live = peak = 0
    for _, nbytes in sorted(events, key=lambda ev: ev[0]):
        live += nbytes
        peak = max(peak, live)
    return peak


# ------------------------------------------------------------------------------ runs


def _plan(
    shapes: Sequence[tuple[int, ...]],
    layouts: Sequence[str],
    configs: Sequence[str],
    modes: Sequence[str],
) -> list[tuple[tuple[int, ...], str, str, str]]:
    rows = []
    for shape in shapes:
        for layout in layouts:
            if layout == "channels_last" and len(shape) != 4:
                continue  # a 2-D tensor has one layout
            for config in configs:
                for mode in modes:
                    if mode == "eval" and config != "default" and "default" in configs:
                        continue  # inference ignores the option: same code as default
                    rows.append((shape, layout, config, mode))
    return rows


def run_benchmark(
    shapes: Sequence[tuple[int, ...]] = DEFAULT_SHAPES,
    *,
    configs: Sequence[str] = DEFAULT_CONFIGS,
    modes: Sequence[str] = MODES,
    layouts: Sequence[str] = LAYOUTS,
    repeats: int | None = None,
    warmup: int = 2,
    quick: bool = False,
    memory: bool = True,
    seed: int = 0,
    progress: Callable[[int, int, BenchResult], None] | None = None,
    compare_tf: bool = False,
    kernels: str = "torch",
) -> BenchReport:
    """Time bnkit against ``torch.nn.functional.batch_norm`` and a copy, row by row.

    Args:
        shapes: input shapes (N, C, H, W) or (N, C); 2-D shapes run in one layout only.
        configs: names from :data:`CONFIGS` (default :data:`DEFAULT_CONFIGS`).
        modes: names from :data:`MODES`. ``eval`` runs only for ``default`` when ``default``
            is among the configurations (inference ignores the other options).
        layouts: ``"contiguous"`` and/or ``"channels_last"`` (NHWC in memory).
        repeats: timed repeats per row; None picks 5 to 51 to fit about 1.5 s per row.
        warmup: untimed calls of each function before timing.
        quick: tiny shapes' budget: 3 repeats, 1 warmup, no call batching (smoke tests).
        memory: measure peak allocator memory of ``fwd+bwd`` rows (two profiled calls).
        seed: seed of the random inputs.
        progress: called after each row with (index, total, result).
        compare_tf: also time tf_keras' BatchNormalization on the same values
            (``bnkit.bench_tf``; fills ``tf_ms`` and ``vs_tf``), in its own loop right after
            the row's other contenders; TensorFlow's version and threads go into ``meta``.
        kernels: ``"torch"`` (the default policy) or ``"cpp"``: bnkit's rows run under the
            policy ``kernels="cpp"`` (building the C++ kernels first) and are judged by the
            issue-7 targets (:data:`CPP_COPY_TARGETS`, never slower than torch, memory no
            higher); ``meta["kernels"]`` says what ran (``"torch (fallback)"`` with the
            build error in ``meta["kernel_build_error"]`` when they cannot be built).

    The load average is recorded before (``meta["load_average"]``) and after
    (``meta["load_average_end"]``) the run.

    Returns:
        A :class:`BenchReport` with one :class:`BenchResult` per row.

    Raises:
        ValueError: unknown configuration, mode or layout name.
        bnkit.bench_tf.TensorFlowNotInstalledError: ``compare_tf`` without TensorFlow/tf_keras.
    """
    configs = _parse_names(configs, CONFIGS, "configuration")
    modes = _parse_names(modes, MODES, "mode")
    layouts = _parse_names(layouts, LAYOUTS, "layout")
    if repeats is not None and repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if quick:
        repeats, warmup = repeats or 3, 1
    for shape in shapes:
        if {"ghost", "ghost_strided"} & set(configs):
            ghost_batch_size(shape[0])
    if kernels not in ("torch", "cpp"):
        raise ValueError(f"kernels must be 'torch' or 'cpp', got {kernels!r}")
    meta = machine_info()
    meta.update(
        quick=quick,
        warmup=warmup,
        repeats=repeats if repeats is not None else "auto",
        targets=dict(TARGETS),
        kernels=kernels,
    )
    if kernels == "cpp":
        from bnkit.kernels import cpp

        if cpp.available():
            meta.update(
                cpp_copy_targets=dict(CPP_COPY_TARGETS),
                cpp_speedup_target=CPP_SPEEDUP_TARGET,
                stream_threshold_bytes=cpp.status().stream_threshold_bytes,
            )
        else:
            kernels = "torch"
            meta.update(kernels="torch (fallback)", kernel_build_error=cpp.build_error())
    if compare_tf:
        from bnkit import bench_tf

        meta.update(bench_tf.tf_info())
    report = BenchReport(meta=meta)
    plan = _plan(shapes, layouts, configs, modes)
    whole_run, row_monitor = CpuMonitor(), CpuMonitor()
    whole_run.start()
    for index, (shape, layout, config, mode) in enumerate(plan):
        row_monitor.start()
        case = _build_case(shape, layout, config, mode, seed, compare_tf, kernels)
        fns = [case.bnkit, case.torch, case.copy]
        if case.torch_module is not None:
            fns.append(case.torch_module)
        times, reps, inner = time_interleaved(
            fns, repeats=repeats, warmup=warmup, batch_calls=not quick
        )
        b, t, c = times[:3]
        module_ratio = times[3] / t if len(times) > 3 else None
        tf_s = None
        if case.tf is not None:
            # Its own loop: TensorFlow's and PyTorch's thread pools slow each other down when
            # their calls alternate (docs/benchmarks.md, "Against TensorFlow").
            tf_times, _, _ = time_interleaved(
                [case.tf], repeats=reps, warmup=warmup, batch_calls=not quick, inner=inner[0]
            )
            tf_s = tf_times[0]
        peak_b = peak_t = None
        if memory and mode == "fwd+bwd":
            pb, pt = peak_allocated_bytes(case.bnkit), peak_allocated_bytes(case.torch)
            peak_b = None if pb is None else pb / 2**20
            peak_t = None if pt is None else pt / 2**20
        target = TARGETS[config] if kernels == "torch" else 1.0
        copy_target = cpp_copy_target(shape, mode) if kernels == "cpp" else None
        meets = b / t <= target
        if copy_target is not None:
            meets = meets and b / c <= copy_target
        if kernels == "cpp" and peak_b is not None and peak_t is not None:
            meets = meets and peak_b <= peak_t
        result = BenchResult(
            shape=tuple(shape),
            layout=layout,
            config=config,
            mode=mode,
            path=path_of(config, mode, kernels),
            repeats=reps,
            inner=(inner[0], inner[1], inner[2]),
            bnkit_ms=b * 1e3,
            torch_ms=t * 1e3,
            copy_ms=c * 1e3,
            bnkit_vs_torch=b / t,
            bnkit_vs_copy=b / c,
            torch_vs_copy=t / c,
            target=target,
            meets_target=meets,
            peak_bnkit_mib=peak_b,
            peak_torch_mib=peak_t,
            other_cpu=row_monitor.stop(),
            torch_module_vs_torch=module_ratio,
            tf_ms=None if tf_s is None else tf_s * 1e3,
            vs_tf=None if tf_s is None else b / tf_s,
            copy_target=copy_target,
        )
        report.results.append(result)
        if progress is not None:
            progress(index + 1, len(plan), result)
        del case
    report.meta["load_average_end"] = _load_average()
    report.meta["other_cpu"] = whole_run.stop()
    return report


# ---------------------------------------------------------------------------- output


def _shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def _percent(v: float | None) -> str:
    return "unknown" if v is None else f"{100 * v:.0f}%"


def _mib(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def format_row(r: BenchResult, *, tf: bool = False) -> list[str]:
    """The table cells of one result (with ``tf``, also the ``--compare-tf`` columns)."""
    cells = [
        _shape_str(r.shape),
        "NHWC" if r.layout == "channels_last" else "NCHW" if len(r.shape) == 4 else "NC",
        r.config,
        r.mode,
        r.path,
        f"{r.bnkit_ms:.3f}",
        f"{r.torch_ms:.3f}",
        f"{r.copy_ms:.3f}",
        f"{r.bnkit_vs_torch:.2f}",
        "-" if r.torch_module_vs_torch is None else f"{r.torch_module_vs_torch:.2f}",
        f"{r.bnkit_vs_copy:.1f}",
        f"{r.torch_vs_copy:.1f}",
        f"<={r.target:.2f}"
        if r.copy_target is None
        else f"<={r.target:g}, copy<={r.copy_target:g}",
        "pass" if r.meets_target else "FAIL",
        f"{_mib(r.peak_bnkit_mib)}/{_mib(r.peak_torch_mib)}",
        "-" if r.other_cpu is None else f"{100 * r.other_cpu:.0f}%",
    ]
    if tf:
        cells += _tf_cells(r.tf_ms, r.vs_tf)
    return cells


def _tf_cells(tf_ms: float | None, vs_tf: float | None) -> list[str]:
    return [
        "-" if tf_ms is None else f"{tf_ms:.3f}",
        "-" if vs_tf is None else f"{vs_tf:.2f}",
    ]


def _tf_line(meta: dict[str, Any]) -> str:
    """The header line that says which TensorFlow ran, when ``--compare-tf`` was given."""
    onednn = meta.get("tf_onednn")
    onednn = "unknown" if onednn is None else "on" if onednn else "off"
    return (
        f"tf ms: tf_keras {meta['tf_keras_version']} BatchNormalization on TensorFlow "
        f"{meta['tf_version']} (oneDNN {onednn}; {meta['tf_intra_op_threads']} intra-op / "
        f"{meta['tf_inter_op_threads']} inter-op threads, 0 = TF's default), timed in its own "
        "loop after each row"
    )


_HEADER = [
    "shape",
    "layout",
    "config",
    "mode",
    "path",
    "bnkit ms",
    "torch ms",
    "copy ms",
    "bnkit/torch",
    "nn-module/torch",
    "bnkit/copy",
    "torch/copy",
    "target",
    "ok",
    "peak MiB bnkit/torch",
    "others' CPU",
]
_RIGHT = {5, 6, 7, 8, 9, 10, 11, 14, 15}
_TF_HEADER = ["tf ms", "bnkit/tf"]
#: Above this share of the machine taken by other processes, the table warns.
NOISY_OTHER_CPU = 0.05


def format_table(report: BenchReport, *, markdown: bool = False) -> str:
    """The results as an aligned text table (or a Markdown table), with a header of the
    machine facts and a summary of targets met."""
    tf = "tf_version" in report.meta
    header = _HEADER + _TF_HEADER if tf else _HEADER
    right = _RIGHT | {len(_HEADER), len(_HEADER) + 1} if tf else _RIGHT
    rows = [format_row(r, tf=tf) for r in report.results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |" if markdown else "  ".join(padded)

    m = report.meta
    out = [
        f"bnkit {m['bnkit_version']} bench, {m['date']}: torch {m['torch_version']}, "
        f"{m['torch_threads']} torch threads on {m['cpu_count']} CPUs ({m['cpu_model']}), "
        f"{m['dtype']}, repeats {m['repeats']}, warmup {m['warmup']}",
        f"load average before/after: {m.get('load_average')} / {m.get('load_average_end')}; "
        f"other processes took {_percent(m.get('other_cpu'))} of the CPUs during the run",
        *([_stream_line(m)] if "stream_threshold_bytes" in m else []),
        *([_tf_line(m)] if tf else []),
        "",
        line(header),
    ]
    if markdown:
        out.append(
            "|"
            + "|".join(
                ("-" * (w + 1) + ":") if i in right else ("-" * (w + 2))
                for i, w in enumerate(widths)
            )
            + "|"
        )
    else:
        out.append("  ".join("-" * w for w in widths))
    out.extend(line(row) for row in rows)
    failed = [r for r in report.results if not r.meets_target]
    noisy = [r for r in report.results if r.other_cpu is not None and r.other_cpu > NOISY_OTHER_CPU]
    out.append("")
    if noisy:
        out.append(
            f"WARNING: other processes took more than {NOISY_OTHER_CPU:.0%} of the CPUs during "
            f"{len(noisy)} row(s): those timings are disturbed (multi-threaded kernels wait for "
            "descheduled threads); rerun on an idle machine."
        )
    out.append(f"targets met: {len(report.results) - len(failed)}/{len(report.results)} rows")
    for r in failed:
        out.append(f"  missed: {_shape_str(r.shape)} {r.layout} {r.config} {r.mode}: {_miss(r)}")
    speedup = cpp_speedup(report)
    if speedup is not None:
        verdict = "pass" if speedup >= CPP_SPEEDUP_TARGET else "FAIL"
        out.append(
            f"speed-up over F.batch_norm, fwd+bwd, NCHW, default configuration (geometric "
            f"mean): {speedup:.2f}x (target >= {CPP_SPEEDUP_TARGET:g}x): {verdict}"
        )
    return "\n".join(out)


def _miss(r: BenchResult) -> str:
    why = []
    if r.bnkit_vs_torch > r.target:
        why.append(f"bnkit/torch {r.bnkit_vs_torch:.2f} > {r.target:.2f}")
    if r.copy_target is not None and r.bnkit_vs_copy > r.copy_target:
        why.append(f"bnkit/copy {r.bnkit_vs_copy:.2f} > {r.copy_target:g}")
    if (
        r.copy_target is not None
        and r.peak_bnkit_mib is not None
        and r.peak_torch_mib is not None
        and r.peak_bnkit_mib > r.peak_torch_mib
    ):
        why.append(f"peak memory {r.peak_bnkit_mib:.1f} > {r.peak_torch_mib:.1f} MiB")
    return "; ".join(why)


def cpp_speedup(report: BenchReport) -> float | None:
    """``--kernels cpp``: geometric mean of torch_ms / bnkit_ms over the NCHW (4-D,
    contiguous) fwd+bwd rows of the default configuration; None without such rows."""
    if report.meta.get("kernels") != "cpp":
        return None
    rows = [
        r
        for r in report.results
        if r.mode == "fwd+bwd"
        and r.config == "default"
        and r.layout == "contiguous"
        and len(r.shape) == 4
    ]
    if not rows:
        return None
    return math.exp(sum(math.log(r.torch_ms / r.bnkit_ms) for r in rows) / len(rows))


# ------------------------------------------------------------------- C++ kernels (opt-in)

#: Modes the C++ kernels cover so far.
KERNEL_MODES = ("fwd", "fwd+bwd", "eval")


@dataclass(frozen=True)
class KernelResult:
    """One row of ``bnkit bench --kernels ops``: a C++ kernel pass against PyTorch and a copy.

    ``fwd`` is the training forward's work without running statistics: ``bnkit::bn_stats``,
    the per-channel fold ``scale = γ/sqrt(σ² + eps)``, then ``bnkit::bn_normalize``; ``torch``
    is ``F.batch_norm(training=True)`` with running buffers. ``eval`` is ``bnkit::bn_eval``
    against ``F.batch_norm(training=False)``. ``fwd+bwd`` is one autograd step,
    ``bnkit::bn_train`` (statistics + normalize) then ``.backward`` through ``bnkit::bn_backward``
    (gradients to x, γ, β), against the same step through ``F.batch_norm(training=True)``; the
    copy column is still one copy of x. ``path`` says what ran in the ``kernel`` column:
    ``"cpp"``, or ``"torch (fallback)"`` when the extension could not be built.
    """

    shape: tuple[int, ...]
    layout: str
    mode: str
    path: str
    repeats: int
    kernel_ms: float
    torch_ms: float
    copy_ms: float
    kernel_vs_torch: float
    kernel_vs_copy: float
    torch_vs_copy: float
    #: ``--compare-tf``: tf_keras' BatchNormalization (fused on 4-D) on the same values, median
    #: ms, and ``kernel_ms / tf_ms``; None when TensorFlow was not compared.
    tf_ms: float | None = None
    vs_tf: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def _kernel_case(
    shape: tuple[int, ...],
    layout: str,
    mode: str,
    seed: int,
    use_cpp: bool,
    tf_steps: list[Callable[[], None]] | None = None,
) -> tuple[Callable[[], None], Callable[[], None], Callable[[], None]]:
    """The kernel, torch and copy callables of a row; with ``tf_steps`` (``--compare-tf``),
    also appends tf_keras' step on the same values to that list."""
    from bnkit.kernels import cpp

    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = _make_input(shape, layout, gen)
    weight = torch.rand(c, generator=gen) + 0.5
    bias = torch.rand(c, generator=gen) - 0.5
    running_mean, running_var = torch.zeros(c), torch.ones(c)
    training = mode != "eval"
    dst = torch.empty_like(x)

    def copy() -> None:
        dst.copy_(x)

    if mode == "fwd+bwd":
        grad_y = _make_input(shape, layout, gen)
        if tf_steps is not None:
            tf_steps.append(_tf_step(x, layout, mode, weight, bias, grad_y, {}, None))
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]

        def step(use_kernel: bool) -> None:
            xl, wl, bl = leaves
            for t in leaves:
                t.grad = None
            with torch.enable_grad():
                if use_kernel:
                    y, _, _ = cpp.bn_train(xl, wl, bl, _EPS)
                else:
                    y = F.batch_norm(xl, running_mean, running_var, wl, bl, True, _MOMENTUM, _EPS)
                torch.autograd.backward(y, grad_y)

        return (lambda: step(use_cpp)), (lambda: step(False)), copy

    def run_torch() -> None:
        F.batch_norm(x, running_mean, running_var, weight, bias, training, _MOMENTUM, _EPS)

    if tf_steps is not None:
        tf_steps.append(_tf_step(x, layout, mode, weight, bias, None, {}, None))
    if not use_cpp:
        return run_torch, run_torch, copy

    def run_kernel() -> None:
        if training:
            mean, var = cpp.bn_stats(x)
            cpp.bn_normalize(x, mean, weight * torch.rsqrt(var + _EPS), bias)
        else:
            cpp.bn_eval(x, running_mean, running_var, weight, bias, _EPS)

    return run_kernel, run_torch, copy


def run_kernel_benchmark(
    shapes: Sequence[tuple[int, ...]] = DEFAULT_SHAPES,
    *,
    modes: Sequence[str] = KERNEL_MODES,
    layouts: Sequence[str] = LAYOUTS,
    repeats: int | None = None,
    warmup: int = 2,
    seed: int = 0,
    progress: Callable[[int, int, KernelResult], None] | None = None,
    compare_tf: bool = False,
) -> tuple[dict[str, Any], list[KernelResult]]:
    """Time the C++ kernels (``bnkit.kernels.cpp``) against ``F.batch_norm`` and a copy.

    Builds the extension first if needed; if it cannot be built (one
    :class:`bnkit.kernels.cpp.CppKernelWarning`), every row times PyTorch's kernel in the
    kernel column and says so in ``path``. Modes outside :data:`KERNEL_MODES` are skipped.
    ``compare_tf`` also times tf_keras' BatchNormalization on the same values in its own loop
    after each row (``tf_ms``, ``vs_tf``; see :func:`run_benchmark`).

    Returns:
        ``(meta, rows)``: the machine facts (with ``kernel_path`` and, on fallback,
        ``kernel_build_error``) and one :class:`KernelResult` per shape, layout and mode.
    """
    from bnkit.kernels import cpp

    tf_meta: dict[str, Any] = {}
    if compare_tf:  # before the extension's build: fail fast without TensorFlow
        from bnkit import bench_tf

        tf_meta = bench_tf.tf_info()
    use_cpp = cpp.available()
    meta = machine_info()
    meta.update(repeats=repeats if repeats is not None else "auto", warmup=warmup)
    meta["kernel_path"] = "cpp" if use_cpp else "torch (fallback)"
    if use_cpp:
        meta["stream_threshold_bytes"] = cpp.status().stream_threshold_bytes
    else:
        meta["kernel_build_error"] = cpp.build_error()
    meta.update(tf_meta)
    plan = [
        (shape, layout, mode)
        for shape in shapes
        for layout in layouts
        if not (layout == "channels_last" and len(shape) != 4)
        for mode in modes
        if mode in KERNEL_MODES
    ]
    results: list[KernelResult] = []
    for index, (shape, layout, mode) in enumerate(plan):
        tf_steps: list[Callable[[], None]] | None = [] if compare_tf else None
        fns = _kernel_case(shape, layout, mode, seed, use_cpp, tf_steps)
        with torch.no_grad():
            (k, t, c), reps, inner = time_interleaved(fns, repeats=repeats, warmup=warmup)
            tf_s = None
            if tf_steps:  # its own loop, as in run_benchmark, with the row's count
                tf_s = time_interleaved(tf_steps, repeats=reps, warmup=warmup, inner=inner[0])[0][0]
        row = KernelResult(
            shape=tuple(shape),
            layout=layout,
            mode=mode,
            path=meta["kernel_path"],
            repeats=reps,
            kernel_ms=1e3 * k,
            torch_ms=1e3 * t,
            copy_ms=1e3 * c,
            kernel_vs_torch=k / t,
            kernel_vs_copy=k / c,
            torch_vs_copy=t / c,
            tf_ms=None if tf_s is None else 1e3 * tf_s,
            vs_tf=None if tf_s is None else k / tf_s,
        )
        results.append(row)
        if progress is not None:
            progress(index + 1, len(plan), row)
    return meta, results


_KERNEL_HEADER = [
    "shape",
    "layout",
    "mode",
    "path",
    "kernel ms",
    "torch ms",
    "copy ms",
    "kernel/torch",
    "kernel/copy",
    "torch/copy",
]


def format_kernel_table(
    meta: dict[str, Any], rows: Sequence[KernelResult], *, markdown: bool = False
) -> str:
    """The ``--kernels ops`` rows as an aligned text (or Markdown) table with the machine facts."""
    tf = "tf_version" in meta
    header = [*_KERNEL_HEADER, "tf ms", "kernel/tf"] if tf else _KERNEL_HEADER
    cells = [
        [
            _shape_str(r.shape),
            "NHWC" if r.layout == "channels_last" else "NCHW" if len(r.shape) == 4 else "NC",
            r.mode,
            r.path,
            f"{r.kernel_ms:.3f}",
            f"{r.torch_ms:.3f}",
            f"{r.copy_ms:.3f}",
            f"{r.kernel_vs_torch:.2f}",
            f"{r.kernel_vs_copy:.1f}",
            f"{r.torch_vs_copy:.1f}",
            *(_tf_cells(r.tf_ms, r.vs_tf) if tf else []),
        ]
        for r in rows
    ]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(header)]

    def line(items: Sequence[str]) -> str:
        padded = [
            v.rjust(w) if i >= 4 else v.ljust(w)
            for i, (v, w) in enumerate(zip(items, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |" if markdown else "  ".join(padded)

    out = [
        f"bnkit {meta['bnkit_version']} bench --kernels ops, {meta['date']}: torch "
        f"{meta['torch_version']}, {meta['torch_threads']} torch threads on {meta['cpu_count']} "
        f"CPUs ({meta['cpu_model']}); kernel path: {meta['kernel_path']}",
    ]
    if meta.get("kernel_build_error"):
        out.append(f"C++ build failed: {meta['kernel_build_error']}")
    if "stream_threshold_bytes" in meta:
        out.append(_stream_line(meta))
    if tf:
        out.append(_tf_line(meta))
    out += ["", line(header)]
    if markdown:
        out.append(
            "|"
            + "|".join(
                ("-" * (w + 1) + ":") if i >= 4 else ("-" * (w + 2)) for i, w in enumerate(widths)
            )
            + "|"
        )
    else:
        out.append("  ".join("-" * w for w in widths))
    out.extend(line(row) for row in cells)
    return "\n".join(out)


# ------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``bnkit bench``'s options to ``parser``."""
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes, 3 repeats (smoke test, seconds)"
    )
    parser.add_argument(
        "--shapes",
        help="comma-separated shapes, e.g. 32x256x14x14,256x1024 (default: the ResNet-like "
        "64x64x56x56, 32x256x14x14, 128x512x7x7, 256x1024)",
    )
    parser.add_argument(
        "--configs",
        default=",".join(DEFAULT_CONFIGS),
        help=f"comma-separated, from {','.join(CONFIGS)} (default: {','.join(DEFAULT_CONFIGS)})",
    )
    parser.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    parser.add_argument(
        "--layouts", default=",".join(LAYOUTS), help=f"subset of {','.join(LAYOUTS)}"
    )
    parser.add_argument(
        "--repeats", type=int, help="timed repeats per row (default: 5 to 51, ~1.5 s per row)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    parser.add_argument(
        "--markdown", action="store_true", help="print the table as Markdown (for docs)"
    )
    parser.add_argument(
        "--no-memory", dest="memory", action="store_false", help="skip peak-memory profiling"
    )
    parser.add_argument(
        "--kernels",
        choices=KERNEL_CHOICES,
        default="torch",
        help="torch (default): bnkit.BatchNorm under the default kernels policy; cpp: the same "
        "rows under the policy kernels='cpp' (bnkit's C++ kernels, built on first use), judged "
        "by the fast-kernel targets; ops: the C++ operators alone against F.batch_norm",
    )
    parser.add_argument(
        "--compare-tf",
        action="store_true",
        help="also time tf_keras' BatchNormalization (fused on 4-D) on the same values: "
        "columns 'tf ms' and 'bnkit/tf' (or 'kernel/tf'); needs the tf extra",
    )


def run_cli(args: argparse.Namespace) -> int:
    """Run ``bnkit bench`` from parsed arguments; returns the exit status (2: bad options)."""
    try:
        shapes = (
            parse_shapes(args.shapes)
            if args.shapes
            else list(QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
        )
        configs = _parse_names(args.configs, CONFIGS, "configuration")
        modes = _parse_names(args.modes, MODES, "mode")
        layouts = _parse_names(args.layouts, LAYOUTS, "layout")
        if args.repeats is not None and args.repeats < 1:
            raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
        if {"ghost", "ghost_strided"} & set(configs):
            for shape in shapes:
                ghost_batch_size(shape[0])
    except ValueError as exc:
        print(f"bnkit bench: error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "compare_tf", False):
        from bnkit import bench_tf

        try:
            bench_tf.load()
        except bench_tf.TensorFlowNotInstalledError as exc:
            print(f"bnkit bench: error: {exc}", file=sys.stderr)
            return 2

    if getattr(args, "kernels", "torch") == "ops":
        return _run_kernel_cli(args, shapes, modes, layouts)

    def progress(i: int, n: int, r: BenchResult) -> None:
        print(
            f"[{i}/{n}] {_shape_str(r.shape)} {r.layout} {r.config} {r.mode}: "
            f"bnkit {r.bnkit_ms:.3f} ms, torch {r.torch_ms:.3f} ms, copy {r.copy_ms:.3f} ms"
            + ("" if r.tf_ms is None else f", tf {r.tf_ms:.3f} ms"),
            file=sys.stderr,
            flush=True,
        )

    report = run_benchmark(
        shapes,
        configs=configs,
        modes=modes,
        layouts=layouts,
        repeats=args.repeats,
        warmup=args.warmup,
        quick=args.quick,
        memory=args.memory,
        progress=None if args.json else progress,
        compare_tf=getattr(args, "compare_tf", False),
        kernels=getattr(args, "kernels", "torch"),
    )
    report.meta["command"] = " ".join(["bnkit bench", *_argv_of(args)])
    if args.json:
        print(report.to_json())
    else:
        print(format_table(report, markdown=args.markdown))
    return 0


def _run_kernel_cli(
    args: argparse.Namespace,
    shapes: Sequence[tuple[int, ...]],
    modes: Sequence[str],
    layouts: Sequence[str],
) -> int:
    def progress(i: int, n: int, r: KernelResult) -> None:
        print(
            f"[{i}/{n}] {_shape_str(r.shape)} {r.layout} {r.mode} ({r.path}): "
            f"kernel {r.kernel_ms:.3f} ms, torch {r.torch_ms:.3f} ms, copy {r.copy_ms:.3f} ms"
            + ("" if r.tf_ms is None else f", tf {r.tf_ms:.3f} ms"),
            file=sys.stderr,
            flush=True,
        )

    meta, rows = run_kernel_benchmark(
        shapes,
        modes=modes,
        layouts=layouts,
        repeats=args.repeats if not args.quick else (args.repeats or 3),
        warmup=args.warmup if not args.quick else 1,
        progress=None if args.json else progress,
        compare_tf=getattr(args, "compare_tf", False),
    )
    meta["command"] = " ".join(["bnkit bench", *_argv_of(args)])
    if args.json:
        print(json.dumps({"meta": meta, "results": [r.to_dict() for r in rows]}, indent=2))
    else:
        print(format_kernel_table(meta, rows, markdown=args.markdown))
    return 0


def _argv_of(args: argparse.Namespace) -> list[str]:
    """Reconstruct the options that differ from the defaults (for the record)."""
    argv = []
    if args.quick:
        argv.append("--quick")
    if args.shapes:
        argv.append(f"--shapes {args.shapes}")
    for name, default in (
        ("configs", DEFAULT_CONFIGS),
        ("modes", MODES),
        ("layouts", LAYOUTS),
    ):
        value = getattr(args, name)
        if value != ",".join(default):
            argv.append(f"--{name} {value}")
    if args.repeats is not None:
        argv.append(f"--repeats {args.repeats}")
    if args.warmup != 2:
        argv.append(f"--warmup {args.warmup}")
    if not args.memory:
        argv.append("--no-memory")
    if getattr(args, "kernels", "torch") != "torch":
        argv.append(f"--kernels {args.kernels}")
    if getattr(args, "compare_tf", False):
        argv.append("--compare-tf")
    return argv
