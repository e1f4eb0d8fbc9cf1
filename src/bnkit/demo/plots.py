"""The demo's PNG plots, drawn with matplotlib's Agg renderer (no display, no pyplot state).

``regression-mse.png``      scenario 1: training- vs evaluation-mode error over the steps,
                            and how far the output layer's moving mean lags its population mean.
``digits-accuracy.png``     scenario 2: held-out accuracy over the steps per decay setting.
``digits-statistics.png``   scenario 2: moving statistics against the true population
                            statistics over the steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bnkit.demo.common import Curve
from bnkit.demo.digits import DigitsResult
from bnkit.demo.regression import RegressionResult

__all__ = ["PLOT_FILES", "write_plots"]

#: File names of the plots, by scenario.
PLOT_FILES: dict[str, tuple[str, ...]] = {
    "regression": ("regression-mse.png",),
    "digits": ("digits-accuracy.png", "digits-statistics.png"),
}
_DPI = 72
_PALETTE = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
# Rules that coincide in one statistic (zero-debias of the mean only and of both share the
# mean; the mean-only one shares the variance with plain decay 0.999) stay visible: later
# lines are dashed or dotted and drawn on top.
_STYLES = ("-", "--", "-", "--", ":", "-.")


def _figure(width: float, height: float, rows: int = 1, cols: int = 1) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure  # Agg canvas: no display, no global state

    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False)
    return figure, [ax for row in axes for ax in row]


def _lines(ax: Any, curves: Sequence[Curve], **style: Any) -> None:
    for index, curve in enumerate(curves):
        ax.plot(
            curve.steps,
            curve.values,
            color=_PALETTE[index % len(_PALETTE)],
            linestyle=_STYLES[index % len(_STYLES)],
            label=curve.label,
            linewidth=1.3 if index % 2 == 0 else 1.8,
            zorder=2 + index,
            **style,
        )


def _reference(ax: Any, curve: Curve, label: str | None = None, color: str = "black") -> None:
    ax.plot(
        curve.steps,
        curve.values,
        color=color,
        linestyle="--",
        linewidth=1.6,
        label=label or curve.label,
    )


def _save(figure: Any, path: Path) -> None:
    figure.savefig(path, pil_kwargs={"optimize": True})


def _regression(result: RegressionResult, path: Path) -> Path:
    figure, (mse, lag) = _figure(11, 4.2, 1, 2)
    _reference(mse, result.train_curve, "training mode (batch statistics)")
    _lines(mse, result.eval_curves)
    mse.set_yscale("log")
    mse.set_xlabel("training step")
    mse.set_ylabel("mean squared error")
    mse.set_title("Evaluation mode (moving statistics) vs training mode")
    mse.legend(fontsize=8)
    mse.grid(alpha=0.3)
    _lines(lag, result.lag_curves)
    lag.set_yscale("log")
    lag.set_xlabel("training step")
    lag.set_ylabel("|moving mean - population mean| / population std")
    lag.set_title("Output layer: how far the moving mean lags")
    lag.legend(fontsize=8)
    lag.grid(alpha=0.3)
    _save(figure, path)
    return path


def _digits_accuracy(result: DigitsResult, path: Path) -> Path:
    figure, (ax,) = _figure(8, 4.8)
    _reference(ax, result.population_accuracy, "population statistics (exact)")
    _reference(ax, result.train_accuracy, "training mode, training batches", color="grey")
    _lines(ax, result.test_accuracy)
    ax.axvline(result.early_step, color="grey", linewidth=0.8, linestyle=":")
    low = min(min(c.values) for c in result.test_accuracy)
    ax.set_ylim(max(0.0, low - 0.05), 1.005)
    ax.set_xscale("log")
    ax.set_xlabel("training step (log scale)")
    ax.set_ylabel("held-out accuracy, evaluation mode")
    ax.set_title(f"Digits MLP ({result.hidden} hidden units, SGD): accuracy per averaging rule")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    _save(figure, path)
    return path


def _digits_statistics(result: DigitsResult, path: Path) -> Path:
    trace = result.statistics
    figure, (mean, var, mean_err, std_err) = _figure(11, 7.5, 2, 2)
    for ax, curves, population, what in (
        (mean, trace.mean, trace.population_mean, "mean"),
        (var, trace.var, trace.population_var, "variance"),
    ):
        _reference(ax, population, "population (exact, current weights)")
        _lines(ax, curves)
        ax.set_title(f"Hidden unit {trace.channel}: moving {what} vs population {what}")
        ax.set_xscale("log")
        ax.set_xlabel("training step (log scale)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    _lines(mean_err, trace.mean_error)
    mean_err.set_title("All units: mean |moving mean - population mean| / std")
    _lines(std_err, trace.std_error)
    std_err.set_title("All units: mean |moving std / population std - 1|")
    for ax in (mean_err, std_err):
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xlabel("training step (log scale)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    _save(figure, path)
    return path


def write_plots(
    out_dir: Path,
    *,
    regression: RegressionResult | None = None,
    digits: DigitsResult | None = None,
) -> tuple[Path, ...]:
    """Draw the plots of the scenarios given into ``out_dir``.

    Args:
        out_dir: the directory to write into (must exist).
        regression: scenario 1's result, or None.
        digits: scenario 2's result, or None.

    Returns:
        The files written.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib  # noqa: F401  (fail early and clearly when it is missing)

    written: list[Path] = []
    if regression is not None:
        written.append(_regression(regression, out_dir / PLOT_FILES["regression"][0]))
    if digits is not None:
        accuracy_file, statistics_file = PLOT_FILES["digits"]
        written.append(_digits_accuracy(digits, out_dir / accuracy_file))
        written.append(_digits_statistics(digits, out_dir / statistics_file))
    return tuple(written)
