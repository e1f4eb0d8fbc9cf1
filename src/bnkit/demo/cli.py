"""``bnkit demo``: argument parsing and printing; the work is :func:`bnkit.demo.run_demo`."""

from __future__ import annotations

import argparse
import sys

from bnkit.demo.runner import SCENARIOS, run_demo

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``bnkit demo`` options on ``parser``."""
    parser.description = (
        "Run the batch-norm failures of the seed documents (TF 1.x blog and Q&A posts) on "
        "embedded data, each against bnkit's answer and what `bnkit doctor` says. Prints a "
        "report and writes report.md, PNG plots and checkpoints into --out."
    )
    parser.add_argument(
        "--quick", action="store_true", help="shorter training, same scenarios (for CI)"
    )
    parser.add_argument(
        "--scenario",
        choices=SCENARIOS,
        action="append",
        help="run only this scenario (repeatable; default: all)",
    )
    parser.add_argument(
        "--out",
        default="bnkit-demo",
        metavar="DIR",
        help="output directory for report.md, plots and checkpoints (default: ./bnkit-demo)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="torch threads while the demo runs (default 1: fastest for its small tensors)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run(args: argparse.Namespace) -> int:
    """Run the demo and print the report.

    Returns:
        0 when the demo's invariants held (restored models reproduce the saved ones
        exactly), 1 otherwise, 2 for unusable arguments.
    """
    from bnkit.demo.report import render_text

    out = str(args.out)
    if not out:
        print("bnkit demo: --out must name a directory", file=sys.stderr)
        return 2
    if args.threads < 1:
        print("bnkit demo: --threads must be at least 1", file=sys.stderr)
        return 2
    try:
        result = run_demo(
            out,
            quick=args.quick,
            scenarios=args.scenario or SCENARIOS,
            seed=args.seed,
            progress=not args.no_progress,
            plots=not args.no_plots,
            threads=args.threads,
        )
    except (FileExistsError, NotADirectoryError) as err:
        print(f"bnkit demo: cannot write into {out!r}: {err}", file=sys.stderr)
        return 2
    print(render_text(result))
    return 0 if result.ok else 1
