"""The scenarios behind ``bnkit demo``: the seed documents' batch-norm failures, on embedded data.

Each scenario is a library function returning a result dataclass; :func:`run_demo` runs them,
writes ``report.md``, the plots and the checkpoints, and the CLI prints the report.

* :func:`run_regression` (seed 002): a tiny tanh regression net trained, saved, restored;
  training- vs evaluation-mode error, recalibration, warm-up, a lower decay; statistics never
  updated and not saved.
* :func:`run_digits` (seed 000): a 1024-unit MLP on the digits; decay 0.999 vs 0.9, warm-up
  and zero-debias over the steps; recalibration after the fact.
* :func:`run_conv` (seeds 000/003): a conv net on channels-last (NHWC) images; statistics
  never updated.
"""

from __future__ import annotations

from bnkit.demo.common import BrokenCase, Curve, Diagnosis
from bnkit.demo.conv import ConvResult, run_conv
from bnkit.demo.digits import DigitsResult, run_digits
from bnkit.demo.regression import RegressionResult, run_regression
from bnkit.demo.runner import FULL, QUICK, SCENARIOS, DemoResult, DemoSettings, run_demo

__all__ = [
    "FULL",
    "QUICK",
    "SCENARIOS",
    "BrokenCase",
    "ConvResult",
    "Curve",
    "DemoResult",
    "DemoSettings",
    "Diagnosis",
    "DigitsResult",
    "RegressionResult",
    "run_conv",
    "run_demo",
    "run_digits",
    "run_regression",
]
