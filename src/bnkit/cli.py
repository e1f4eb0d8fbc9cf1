"""Command line: ``bnkit demo``, ``bnkit doctor`` and ``bnkit bench`` (also ``python -m bnkit``).

The CLI parses arguments and prints; the work happens in library functions.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bnkit import __version__


def build_parser() -> argparse.ArgumentParser:
    """The ``bnkit`` argument parser with one sub-command per tool."""
    parser = argparse.ArgumentParser(
        prog="bnkit", description="Batch normalization for PyTorch, done completely and right."
    )
    parser.add_argument("--version", action="version", version=f"bnkit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    from bnkit import bench
    from bnkit.demo import cli as demo_cli

    demo_parser = commands.add_parser(
        "demo", help="the seed documents' TF batch-norm failures and bnkit's answers"
    )
    demo_cli.add_arguments(demo_parser)
    demo_parser.set_defaults(handler=demo_cli.run)

    bench_parser = commands.add_parser(
        "bench",
        help="time bnkit against PyTorch's kernel and a plain copy (and TensorFlow's with "
        "--compare-tf)",
    )
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(handler=bench.run_cli)

    from bnkit import doctor

    doctor_parser = commands.add_parser(
        "doctor",
        help="find, explain and repair broken batch-norm statistics in checkpoints",
        description="Check batch-norm statistics in checkpoints (PyTorch, safetensors, "
        "TensorFlow, Keras); with --model and --data also against data; --fix repairs. "
        "Exit status: 0 healthy, 1 problems found, 2 usage or input error.",
    )
    doctor.add_arguments(doctor_parser)
    doctor_parser.set_defaults(handler=doctor.run_cli)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status (2 for usage errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        status: int = args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
