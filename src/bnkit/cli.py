"""Command line: ``bnkit demo``, ``doctor``, ``bench`` and ``kernels`` (also ``python -m bnkit``).

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

    kernels_parser = commands.add_parser(
        "kernels",
        help="build bnkit's C++ CPU kernels now (if needed) and say where they are",
        description="Build (or load from the cache) bnkit's C++ CPU kernels, the ones the "
        "policy kernels='cpp' runs, and print their status. Run it once in an image build to "
        "spare the first training step the compile. Exit status: 0 built, 1 they cannot be "
        "built here (the reason is printed).",
    )
    kernels_parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    kernels_parser.set_defaults(handler=_kernels)
    return parser


def _kernels(args: argparse.Namespace) -> int:
    import json
    import warnings

    from bnkit.kernels import cpp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cpp.CppKernelWarning)  # the status says it instead
        status = cpp.status()
    if args.json:
        print(json.dumps(status._asdict(), indent=2))
        return 0 if status.available else 1
    print(f"bnkit C++ kernels: {'built' if status.available else 'NOT AVAILABLE'}")
    print(f"  cache:   {status.build_directory}")
    print(f"  flags:   {' '.join(status.flags)}")
    print(f"  threads: {status.threads} (torch.get_num_threads())")
    if status.available:
        limit_mib = (status.pool_limit_bytes or 0) / 2**20
        cached_mib = (status.cached_bytes or 0) / 2**20
        print(f"  output pool: {cached_mib:.1f} MiB cached, limit {limit_mib:.0f} MiB")
        if status.stream_threshold_bytes is None:
            print("  streaming stores: none on this machine (not x86-64)")
        else:
            stream_mib = status.stream_threshold_bytes / 2**20
            print(f"  streaming stores: outputs of {stream_mib:g} MiB or more")
        print("  use them: bnkit.set_policy(kernels='cpp') or BNKIT_KERNELS=cpp")
        return 0
    print(f"  error:   {status.build_error}")
    print("  bnkit runs PyTorch's kernels instead; a C++17 compiler and ninja are needed.")
    return 1


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
