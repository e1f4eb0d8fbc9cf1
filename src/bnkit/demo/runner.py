"""``run_demo``: run the scenarios, write ``report.md`` and the plots, return the results."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bnkit.demo.conv import ConvResult, run_conv
from bnkit.demo.digits import DigitsResult, run_digits
from bnkit.demo.regression import RegressionResult, run_regression

__all__ = ["FULL", "QUICK", "SCENARIOS", "DemoResult", "DemoSettings", "run_demo"]

#: The scenarios, in order: the seed-002 regression, the seed-000 decay study, the NHWC conv net.
SCENARIOS: tuple[str, ...] = ("regression", "digits", "conv")


@dataclass(frozen=True)
class DemoSettings:
    """How long each scenario trains.

    Attributes:
        regression_steps: full-batch Adam steps of scenario 1 (the seed ran 3000).
        regression_log_every: measure scenario 1's curves every this many steps.
        digits_steps: SGD steps of scenario 2.
        digits_log_every: measure scenario 2's curves every this many steps.
        early_step: the step scenario 2 reports as "early".
        conv_steps: SGD steps of scenario 3.
    """

    regression_steps: int
    regression_log_every: int
    digits_steps: int
    digits_log_every: int
    early_step: int
    conv_steps: int


#: The full demo (``bnkit demo``): the seed's 3000 regression steps; 3000 digits steps, after
#: which even decay 0.999 has forgotten 95% of its initial value.
FULL = DemoSettings(
    regression_steps=3000,
    regression_log_every=10,
    digits_steps=3000,
    digits_log_every=25,
    early_step=100,
    conv_steps=1000,
)
#: ``bnkit demo --quick``: the same scenarios, shorter (for CI).
QUICK = DemoSettings(
    regression_steps=1000,
    regression_log_every=10,
    digits_steps=300,
    digits_log_every=10,
    early_step=100,
    conv_steps=200,
)


@dataclass(frozen=True)
class DemoResult:
    """Everything one demo run measured and wrote.

    Attributes:
        out_dir: the output directory.
        quick: whether this was the ``--quick`` run.
        seed: the seed of every random choice.
        settings: the training lengths used.
        regression, digits, conv: each scenario's result (None when not run).
        seconds: wall time per scenario that ran.
        threads: torch's intra-op threads during the run.
        report: the ``report.md`` written.
        plots: the PNG files written (empty without matplotlib or with ``plots=False``).
        notes: remarks about the run (e.g. why plots are missing).
    """

    out_dir: Path
    quick: bool
    seed: int
    settings: DemoSettings
    regression: RegressionResult | None
    digits: DigitsResult | None
    conv: ConvResult | None
    seconds: dict[str, float]
    threads: int
    report: Path
    plots: tuple[Path, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def checkpoints(self) -> tuple[Path, ...]:
        """The checkpoint files the scenarios wrote."""
        found: tuple[Path, ...] = ()
        if self.regression is not None:
            found += self.regression.checkpoints
        if self.conv is not None:
            found += self.conv.checkpoints
        return found

    @property
    def ok(self) -> bool:
        """The invariants the demo relies on held: restored models reproduce the saved ones
        exactly, and the shadow statistics are the model's own under the default rule."""
        checks: list[bool] = []
        if self.regression is not None:
            checks += [self.regression.restored_identical, self.regression.shadow_matches_model]
        if self.digits is not None:
            checks.append(self.digits.shadow_matches_model)
        if self.conv is not None:
            checks.append(self.conv.restored_identical)
        return all(checks)


def run_demo(
    out_dir: Path | str = "bnkit-demo",
    *,
    quick: bool = False,
    scenarios: Sequence[str] = SCENARIOS,
    seed: int = 0,
    progress: bool = False,
    plots: bool = True,
    threads: int | None = 1,
) -> DemoResult:
    """Run the demo scenarios; write ``report.md``, the plots and the checkpoints.

    Args:
        out_dir: output directory (created if needed).
        quick: the short version (:data:`QUICK`) instead of :data:`FULL`.
        scenarios: which of :data:`SCENARIOS` to run, in any order.
        seed: seeds data, initialization and batch order; a run is deterministic.
        progress: progress bars on stderr.
        plots: write the PNG plots (needs matplotlib).
        threads: torch's intra-op threads while the demo runs (restored afterwards); None
            keeps the current setting. The default 1 is the fastest for the demo's small
            tensors and keeps the numbers independent of the machine's core count; with
            other processes busy on the same cores, more threads can be several times slower.

    Returns:
        A :class:`DemoResult`.

    Raises:
        ValueError: an unknown scenario name.
    """
    unknown = [name for name in scenarios if name not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(Path(out_dir), quick, scenarios, seed, progress, plots)
    finally:
        torch.set_num_threads(previous)


def _run(
    out: Path, quick: bool, scenarios: Sequence[str], seed: int, progress: bool, plots: bool
) -> DemoResult:
    out.mkdir(parents=True, exist_ok=True)
    settings = QUICK if quick else FULL
    seconds: dict[str, float] = {}
    regression = digits = conv = None

    if "regression" in scenarios:
        start = time.perf_counter()
        regression = run_regression(
            out,
            steps=settings.regression_steps,
            log_every=settings.regression_log_every,
            seed=seed,
            progress=progress,
        )
        seconds["regression"] = time.perf_counter() - start
    if "digits" in scenarios:
        start = time.perf_counter()
        digits = run_digits(
            steps=settings.digits_steps,
            log_every=settings.digits_log_every,
            early_step=settings.early_step,
            seed=seed,
            progress=progress,
        )
        seconds["digits"] = time.perf_counter() - start
    if "conv" in scenarios:
        start = time.perf_counter()
        conv = run_conv(out, steps=settings.conv_steps, seed=seed, progress=progress)
        seconds["conv"] = time.perf_counter() - start

    from bnkit.demo import plots as plotting
    from bnkit.demo import report as reporting

    written: tuple[Path, ...] = ()
    notes: tuple[str, ...] = ()
    if plots:
        try:
            written = plotting.write_plots(out, regression=regression, digits=digits)
        except ImportError:
            notes = ("matplotlib is not installed: no plots (pip install 'bnkit[demo]')",)
    result = DemoResult(
        out_dir=out,
        quick=quick,
        seed=seed,
        settings=settings,
        regression=regression,
        digits=digits,
        conv=conv,
        seconds=seconds,
        threads=torch.get_num_threads(),
        report=out / "report.md",
        plots=written,
        notes=notes,
    )
    result.report.write_text(reporting.render_markdown(result), encoding="utf-8")
    return result
