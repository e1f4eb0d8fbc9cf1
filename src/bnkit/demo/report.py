"""Render a demo run as text (what ``bnkit demo`` prints) and as Markdown (``report.md``)."""

from __future__ import annotations

import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from bnkit import __version__
from bnkit.demo.common import BrokenCase, Curve, Diagnosis
from bnkit.demo.conv import ConvResult
from bnkit.demo.digits import DigitsResult
from bnkit.demo.regression import RegressionResult
from bnkit.demo.runner import DemoResult

__all__ = ["Table", "doctor_commands", "render_markdown", "render_text", "summary_table"]


@dataclass(frozen=True)
class Table:
    """A table with a header row, rendered as aligned text or as a Markdown table.

    Example:
        >>> print(Table(("a", "bb"), (("1", "2"), ("333", "4"))).text())
        a    bb
        1    2
        333  4
    """

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def text(self, indent: str = "") -> str:
        """Columns padded to their widest cell, two spaces apart."""
        cells = [self.header, *self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
        return "\n".join(indent + line.rstrip() for line in lines)

    def markdown(self) -> str:
        """A GitHub-flavoured Markdown table."""

        def row(cells: Sequence[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        return "\n".join(
            [row(self.header), row(["---"] * len(self.header)), *(row(r) for r in self.rows)]
        )


# ------------------------------------------------------------------------------ format


def _mse(value: float) -> str:
    return f"{value:.3g}" if 1e-3 <= abs(value) < 1e3 else f"{value:.2e}"


def _pct(value: float) -> str:
    return f"{value:.1%}"


def _ratio(value: float, reference: float) -> str:
    if reference <= 0:
        return ""
    ratio = value / reference
    return f"{ratio:.2f}x training mode" if ratio < 10 else f"{ratio:.0f}x training mode"


def _doctor(diagnosis: Diagnosis) -> str:
    return ", ".join(diagnosis.codes) if diagnosis.codes else "healthy"


def _steps_for(curve: Curve, wanted: Sequence[int]) -> list[int]:
    last = curve.steps[-1]
    picked: list[int] = []
    for step in [*wanted, last]:
        step = min(step, last)
        if step not in picked:
            picked.append(step)
    return sorted(picked)


# --------------------------------------------------------------------------- sections


def _regression_intro(r: RegressionResult) -> list[str]:
    return [
        "Regression (seed 002): dense 5 > BN > tanh > dense 3 > BN > tanh > dense 1 > BN",
        "BN = bnkit.from_keras(C) = tf.layers.batch_normalization (decay 0.99, epsilon 1e-3)",
        f"{r.samples} samples of y = 2a + 3b + 3, full batch, Adam {r.learning_rate}, "
        f"{r.steps} steps; save, restore, evaluate",
    ]


def _regression_table(r: RegressionResult) -> Table:
    default = r.eval_curves[0].label
    rows: list[tuple[str, str, str]] = [
        ("training mode (batch statistics)", _mse(r.train_mse), ""),
        (
            f"eval mode, {default}",
            _mse(r.saved_eval_mse),
            _ratio(r.saved_eval_mse, r.train_mse),
        ),
        (
            "restored (bnkit.save > bnkit.load), eval mode",
            _mse(r.restored_eval_mse),
            "outputs bit-identical" if r.restored_identical else "outputs DIFFER (bug!)",
        ),
    ]
    for rule, value in list(r.final_eval_mse.items())[1:]:
        rows.append((f"eval mode, {rule}", _mse(value), _ratio(value, r.train_mse)))
    rows.append(
        (
            "restored, after bnkit.recalibrate",
            _mse(r.recalibrated_eval_mse),
            _ratio(r.recalibrated_eval_mse, r.train_mse),
        )
    )
    for case in r.broken:
        rows += _broken_rows(case, _mse)
    return Table(("final weights", "MSE", ""), tuple(rows))


def _broken_rows(case: BrokenCase, fmt: Callable[[float], str]) -> list[tuple[str, str, str]]:
    return [
        (f"BROKEN: {case.name}", fmt(case.value), f"doctor: {_doctor(case.diagnosis)}"),
        (f"  fixed: {case.answer}", fmt(case.fixed_value), ""),
    ]


def _regression_curve_table(r: RegressionResult) -> Table:
    steps = _steps_for(r.train_curve, (100, 300, 1000, 2000))
    rows = [("training mode (the step's loss)", *(_mse(r.train_curve.at(s)) for s in steps))]
    rows += [(f"eval mode, {c.label}", *(_mse(c.at(s)) for s in steps)) for c in r.eval_curves]
    return Table(("MSE after step", *(str(s) for s in steps)), tuple(rows))


def _regression_doctor(r: RegressionResult) -> list[str]:
    return [
        f"doctor: saved checkpoint: {_doctor(r.healthy_checkpoint)}",
        f"        trained model, with the data: {_doctor(r.lagging_model)}",
        f"        after recalibration, with the data: {_doctor(r.recalibrated_model)}",
    ]


def _digits_intro(d: DigitsResult) -> list[str]:
    return [
        f"Digits MLP (seed 000): 64 > dense {d.hidden} > BN > ReLU > dense 10",
        "BN = bnkit.from_slim(C) = slim.batch_norm with its defaults (decay 0.999)",
        f"{d.train_samples} training / {d.test_samples} held-out images, SGD {d.learning_rate} "
        f"(momentum 0.9), batch {d.batch_size}, {d.steps} steps",
        "one training run; every averaging rule watches the same layer inputs",
    ]


def _digits_table(d: DigitsResult) -> Table:
    steps = _steps_for(d.population_accuracy, (d.early_step, 3 * d.early_step, 1000))
    errors = {c.label: c for c in d.statistics.mean_error}
    rows = [
        (c.label, *(_pct(c.at(s)) for s in steps), f"{errors[c.label].at(d.early_step):.3f}")
        for c in d.test_accuracy
    ]
    rows.append(
        ("exact population statistics", *(_pct(d.population_accuracy.at(s)) for s in steps), "0")
    )
    rows.append(
        ("training mode, training batches", *(_pct(d.train_accuracy.at(s)) for s in steps), "")
    )
    return Table(
        ("held-out accuracy, step", *(str(s) for s in steps), f"mean lag @{d.early_step}"),
        tuple(rows),
    )


def _digits_lines(d: DigitsResult) -> list[str]:
    default = d.test_accuracy[0].label
    return [
        "mean lag: mean over units of |moving mean - population mean| / population std",
        f"decay 0.999 model at the end: {_pct(d.accuracy(default))} in eval mode, "
        f"{_pct(d.test_accuracy_batch_statistics)} with is_training=True at test time,",
        f"{_pct(d.recalibrated_accuracy)} in eval mode after bnkit.recalibrate",
        f"doctor, with the data: {_doctor(d.before_recalibration)}; "
        f"after recalibration: {_doctor(d.after_recalibration)}",
    ]


def _conv_intro(c: ConvResult) -> list[str]:
    return [
        "Conv net, channels last (seeds 000/003): conv 16 > BN > ReLU > conv 32 > BN+ReLU > "
        "pool > dense 10",
        f"input {c.input_shape} (NHWC); BN = bnkit.from_slim(C, decay=0.9, scale=True), axis=-1",
        f"SGD {c.learning_rate} (momentum 0.9), batch {c.batch_size}, {c.steps} steps",
    ]


def _conv_table(c: ConvResult) -> Table:
    rows: list[tuple[str, str, str]] = [
        ("training mode, last epoch's batches", _pct(c.train_accuracy), ""),
        ("eval mode (moving statistics)", _pct(c.test_accuracy), ""),
        (
            "restored (bnkit.save > bnkit.load)",
            _pct(c.restored_accuracy),
            "outputs bit-identical" if c.restored_identical else "outputs DIFFER (bug!)",
        ),
    ]
    rows += _broken_rows(c.broken, _pct)
    rows.insert(
        4,
        (
            "  same, is_training=True at test time",
            _pct(c.never_updated_batch_statistics_accuracy),
            "seed 000's symptom",
        ),
    )
    return Table(("held-out images", "accuracy", ""), tuple(rows))


def _conv_lines(c: ConvResult) -> list[str]:
    return [
        "channels-last BN vs torch's batch_norm on the NCHW transpose: "
        f"max |difference| {c.layout_max_difference:.3g}",
        f"doctor: saved checkpoint: {_doctor(c.healthy_checkpoint)}",
    ]


def summary_table(result: DemoResult) -> Table:
    """One row per broken setup: its metric, bnkit's answer, and what the doctor said."""
    rows: list[tuple[str, ...]] = []
    r, d, c = result.regression, result.digits, result.conv
    if r is not None:
        rows.append(
            (
                "1 regression",
                f"decay 0.99, eval mode at step {r.steps}",
                "MSE",
                _mse(r.saved_eval_mse),
                "recalibrate",
                _mse(r.recalibrated_eval_mse),
                _doctor(r.lagging_model),
            )
        )
        rows += [
            (
                "1 regression",
                case.name,
                "MSE",
                _mse(case.value),
                case.answer,
                _mse(case.fixed_value),
                _doctor(case.diagnosis),
            )
            for case in r.broken
        ]
    if d is not None:
        default, warmup = d.test_accuracy[0].label, "decay 0.999 + warm-up"
        rows.append(
            (
                "2 digits",
                f"decay 0.999, step {d.early_step}",
                "accuracy",
                _pct(d.accuracy(default, d.early_step)),
                "warm-up",
                _pct(d.accuracy(warmup, d.early_step)),
                "",
            )
        )
        rows.append(
            (
                "2 digits",
                f"decay 0.999, step {d.steps}",
                "accuracy",
                _pct(d.accuracy(default)),
                "recalibrate",
                _pct(d.recalibrated_accuracy),
                _doctor(d.before_recalibration),
            )
        )
    if c is not None:
        rows.append(
            (
                "3 conv NHWC",
                c.broken.name,
                "accuracy",
                _pct(c.broken.value),
                c.broken.answer,
                _pct(c.broken.fixed_value),
                _doctor(c.broken.diagnosis),
            )
        )
    return Table(
        ("scenario", "broken setup", "metric", "broken", "bnkit's answer", "fixed", "doctor"),
        tuple(rows),
    )


def doctor_commands(result: DemoResult) -> list[str]:
    """``bnkit doctor`` command lines for the broken checkpoints the run wrote."""
    commands: list[str] = []
    for path in result.checkpoints:
        if "never-updated" in path.name:
            commands.append(f"bnkit doctor {path}")
        elif "params-only" in path.name:
            # Without the model, parameters alone do not say which layers are batch norms.
            factory = "bnkit.demo.regression:build_regression_model"
            commands.append(f"bnkit doctor {path} --model {factory}")
    return commands


def _timing(result: DemoResult) -> str:
    parts = [f"{name} {seconds:.1f} s" for name, seconds in result.seconds.items()]
    total = sum(result.seconds.values())
    return f"{', '.join(parts)}; total {total:.1f} s"


def _mode(result: DemoResult) -> str:
    return "quick run" if result.quick else "full run"


# ---------------------------------------------------------------------------- renderers


def _numbered(number: int, lines: list[str]) -> list[str]:
    return [f"{number}. {line}" if i == 0 else f"   {line}" for i, line in enumerate(lines)]


def render_text(result: DemoResult) -> str:
    """The console report: one section per scenario, then the summary table."""
    out: list[str] = [
        f"bnkit demo: the TF 1.x batch-norm failures of the seed documents, on embedded data "
        f"({_mode(result)}, seed {result.seed})",
        "",
    ]
    if result.regression is not None:
        r = result.regression
        out += _numbered(1, _regression_intro(r))
        out += ["", _regression_table(r).text("   "), "", _regression_curve_table(r).text("   ")]
        out += ["", *(f"   {line}" for line in _regression_doctor(r)), ""]
    if result.digits is not None:
        d = result.digits
        out += _numbered(2, _digits_intro(d))
        out += ["", _digits_table(d).text("   "), ""]
        out += [*(f"   {line}" for line in _digits_lines(d)), ""]
    if result.conv is not None:
        c = result.conv
        out += _numbered(3, _conv_intro(c))
        out += ["", _conv_table(c).text("   "), ""]
        out += [*(f"   {line}" for line in _conv_lines(c)), ""]
    out += ["Summary", summary_table(result).text("  "), ""]
    out.append(f"time: {_timing(result)} ({result.threads} torch thread(s))")
    written = [result.report, *result.plots]
    out.append(f"wrote into {result.out_dir}: {', '.join(p.name for p in written)}")
    if result.checkpoints:
        out.append(f"checkpoints in {result.out_dir / 'checkpoints'}; try:")
        out += [f"  {command}" for command in doctor_commands(result)]
    out += list(result.notes)
    return "\n".join(out)


def _block(text: str) -> str:
    return f"```text\n{text}\n```"


def render_markdown(result: DemoResult) -> str:
    """``report.md``: the numbers, the doctor's reports and the plots of one run."""
    out: list[str] = [
        "# bnkit demo report",
        "",
        f"{_mode(result).capitalize()} (`bnkit demo{' --quick' if result.quick else ''}`), "
        f"seed {result.seed}; bnkit {__version__}, torch "
        f"{torch.__version__}, Python {platform.python_version()}, "
        f"{result.threads} torch thread(s). Time: {_timing(result)}.",
        "",
        "Every number below comes from training on embedded data (scikit-learn's digits and "
        "a seeded synthetic regression); nothing is downloaded and runs are deterministic.",
        "",
        "## Summary",
        "",
        summary_table(result).markdown(),
        "",
    ]
    plots = {p.name for p in result.plots}
    if result.regression is not None:
        r = result.regression
        out += ["## 1. Regression that is wrong after restoring (seed 002)", ""]
        out += [f"- {line}" for line in _regression_intro(r)] + [""]
        out += [_regression_table(r).markdown(), "", _regression_curve_table(r).markdown(), ""]
        if "regression-mse.png" in plots:
            out += ["![training vs evaluation mode error](regression-mse.png)", ""]
        out += ["What the doctor says:", ""]
        for diagnosis in (r.healthy_checkpoint, r.lagging_model, r.recalibrated_model):
            out += [f"- {diagnosis.target}: {_doctor(diagnosis)}"]
        out += [""]
        for case in r.broken:
            out += [f"Broken: {case.name} ({case.setup}). Prevented by: {case.prevented_by}.", ""]
            out += [f"- {note}" for note in case.notes] + [""]
            out += [_block(case.diagnosis.text), ""]
    if result.digits is not None:
        d = result.digits
        out += ["## 2. Decay too high for the number of steps (seed 000)", ""]
        out += [f"- {line}" for line in _digits_intro(d)] + [""]
        out += [_digits_table(d).markdown(), ""]
        out += [f"- {line}" for line in _digits_lines(d)] + [""]
        for name, alt in (
            ("digits-accuracy.png", "held-out accuracy per moving-average rule"),
            ("digits-statistics.png", "moving statistics against the population statistics"),
        ):
            if name in plots:
                out += [f"![{alt}]({name})", ""]
        out += [_block(d.before_recalibration.text), ""]
    if result.conv is not None:
        c = result.conv
        out += ["## 3. Conv net on channels-last images (seeds 000 and 003)", ""]
        out += [f"- {line}" for line in _conv_intro(c)] + [""]
        out += [_conv_table(c).markdown(), ""]
        out += [f"- {line}" for line in _conv_lines(c)]
        out += [f"- {note}" for note in c.broken.notes] + [""]
        out += [_block(c.broken.diagnosis.text), ""]
    commands = doctor_commands(result)
    if commands:
        out += ["## The doctor on the broken checkpoints", ""]
        out += ["```console", *(f"$ {command}" for command in commands), "```", ""]
    out += list(result.notes)
    return "\n".join(out).rstrip() + "\n"
