"""Tests for bnkit.bench: the harness runs end to end and reports well-formed results.

No timing assertions: times only have to be positive and the ratios have to be the ratios of
the reported times. The peak-memory reader is checked against allocations of known size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from bnkit import bench

RESULT_KEYS = {
    "shape",
    "layout",
    "config",
    "mode",
    "path",
    "repeats",
    "inner",
    "bnkit_ms",
    "torch_ms",
    "copy_ms",
    "bnkit_vs_torch",
    "bnkit_vs_copy",
    "torch_vs_copy",
    "target",
    "meets_target",
    "peak_bnkit_mib",
    "peak_torch_mib",
    "other_cpu",
    "torch_module_vs_torch",
    "tf_ms",
    "vs_tf",
    "copy_target",
}
META_KEYS = {
    "date",
    "cpu_model",
    "cpu_count",
    "torch_threads",
    "torch_version",
    "bnkit_version",
    "load_average",
    "load_average_end",
    "other_cpu",
    "quick",
    "repeats",
    "warmup",
    "targets",
}


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def quick_report() -> bench.BenchReport:
    return bench.run_benchmark(bench.QUICK_SHAPES, quick=True)


# ----------------------------------------------------------------------- end to end


def test_quick_run_covers_every_row(quick_report: bench.BenchReport) -> None:
    rows = {(r.shape, r.layout, r.config, r.mode) for r in quick_report.results}
    assert len(rows) == len(quick_report.results)  # no duplicates
    expected = set()
    for shape in bench.QUICK_SHAPES:
        layouts = ["contiguous", "channels_last"] if len(shape) == 4 else ["contiguous"]
        for layout in layouts:
            expected |= {(shape, layout, "default", mode) for mode in ("fwd", "fwd+bwd", "eval")}
            for config in ("renorm", "weights", "ghost"):
                expected |= {(shape, layout, config, mode) for mode in ("fwd", "fwd+bwd")}
    assert rows == expected


def test_quick_run_results_are_well_formed(quick_report: bench.BenchReport) -> None:
    assert set(quick_report.meta) >= META_KEYS
    assert quick_report.meta["torch_threads"] == torch.get_num_threads()
    assert quick_report.meta["torch_version"] == torch.__version__
    for r in quick_report.results:
        d = r.to_dict()
        assert set(d) == RESULT_KEYS
        assert r.bnkit_ms > 0
        assert r.torch_ms > 0
        assert r.copy_ms > 0
        assert r.bnkit_vs_torch == pytest.approx(r.bnkit_ms / r.torch_ms)
        assert r.bnkit_vs_copy == pytest.approx(r.bnkit_ms / r.copy_ms)
        assert r.torch_vs_copy == pytest.approx(r.torch_ms / r.copy_ms)
        assert r.target == (1.10 if r.config == "default" else 2.0)
        assert r.meets_target == (r.bnkit_vs_torch <= r.target)
        assert r.repeats == 3
        assert r.other_cpu is None or 0.0 <= r.other_cpu <= 1.0
        assert r.inner == (1, 1, 1)
        if r.config == "default" or r.mode == "eval":
            expected_path = "native kernel"
        else:
            expected_path = "kernels, weighted" if r.config == "weights" else "kernels"
        assert r.path == expected_path
        if r.mode == "fwd+bwd":
            # Output, input gradient and saved statistics at least: more than one tensor.
            one_tensor = 4 * torch.Size(r.shape).numel() / 2**20
            assert r.peak_bnkit_mib is not None
            assert r.peak_bnkit_mib >= 2 * one_tensor
            assert r.peak_torch_mib is not None
            assert r.peak_torch_mib >= 2 * one_tensor
        else:
            assert r.peak_bnkit_mib is None
            assert r.peak_torch_mib is None


def test_table_lists_every_row_and_the_verdicts(quick_report: bench.BenchReport) -> None:
    table = bench.format_table(quick_report)
    lines = table.splitlines()
    assert "torch " + torch.__version__ in lines[0]
    body = [line for line in lines if line.startswith(("16x8x6x6", "32x16 "))]
    assert len(body) == len(quick_report.results)
    for line, r in zip(body, quick_report.results, strict=True):
        assert ("pass" if r.meets_target else "FAIL") in line.split()
        assert f"{r.bnkit_vs_torch:.2f}" in line.split()
    met = sum(r.meets_target for r in quick_report.results)
    assert f"targets met: {met}/{len(quick_report.results)} rows" in table
    markdown = bench.format_table(quick_report, markdown=True).splitlines()
    rows = [line for line in markdown if line.startswith("|")]
    assert len(rows) == len(quick_report.results) + 2  # header and alignment line
    assert len({line.count("|") for line in rows}) == 1


def test_json_output_parses(capsys: pytest.CaptureFixture[str]) -> None:
    status = bench.run_cli(
        _args("--quick", "--json", "--shapes", "8x4x3x3", "--configs", "default,ghost")
    )
    assert status == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["meta"]) >= META_KEYS
    assert data["meta"]["command"] == (
        "bnkit bench --quick --shapes 8x4x3x3 --configs default,ghost"
    )
    results = data["results"]
    assert {(tuple(r["shape"]), r["config"]) for r in results} == {
        ((8, 4, 3, 3), "default"),
        ((8, 4, 3, 3), "ghost"),
    }
    assert len(results) == 2 * (3 + 2)  # two layouts; eval only for default
    for r in results:
        assert set(r) == RESULT_KEYS
        assert r["bnkit_vs_torch"] == pytest.approx(r["bnkit_ms"] / r["torch_ms"])


def test_text_output_goes_to_stdout_and_progress_to_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = bench.run_cli(
        _args("--quick", "--shapes", "4x3", "--configs", "default", "--modes", "fwd", "--no-memory")
    )
    assert status == 0
    out, err = capsys.readouterr()
    assert "4x3" in out
    assert "targets met:" in out
    assert "[1/1] 4x3 contiguous default fwd" in err


def test_cli_entry_point_runs_bench(capsys: pytest.CaptureFixture[str]) -> None:
    from bnkit.cli import main

    argv = ["bench", "--quick", "--json", "--shapes", "4x3", "--modes", "eval", "--no-memory"]
    assert main(argv) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [(r["config"], r["mode"]) for r in results] == [("default", "eval")]
    assert main(["bench", "--configs", "nope"]) == 2


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--configs", "default,fancy"], "unknown configuration ['fancy']"),
        (["--modes", "backward"], "unknown mode ['backward']"),
        (["--layouts", "nhwc"], "unknown layout ['nhwc']"),
        (["--shapes", "32x256x14"], "bad shape '32x256x14'"),
        (["--shapes", "axb"], "bad shape 'axb'"),
        (["--shapes", "1x8"], "batch of 2 or more"),
        (["--shapes", "9x8", "--configs", "ghost"], "batch size 9"),
        (["--repeats", "0"], "--repeats must be at least 1"),
    ],
)
def test_bad_options_exit_with_status_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench.run_cli(_args("--quick", *argv)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert message in err


def test_library_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown configuration"):
        bench.run_benchmark([(4, 3)], configs=["default", "bogus"], quick=True)
    with pytest.raises(ValueError, match="unknown mode"):
        bench.run_benchmark([(4, 3)], modes=["train"], quick=True)
    with pytest.raises(ValueError, match="repeats"):
        bench.run_benchmark([(4, 3)], repeats=0)


# ----------------------------------------------------------------------- pieces


def test_parse_shapes() -> None:
    assert bench.parse_shapes("64x64x56x56, 256X1024,") == [(64, 64, 56, 56), (256, 1024)]
    with pytest.raises(ValueError, match="no shapes"):
        bench.parse_shapes(" , ")


@pytest.mark.parametrize(("n", "v"), [(64, 16), (256, 16), (16, 8), (12, 4), (6, 2), (2, 0)])
def test_ghost_batch_size(n: int, v: int) -> None:
    if v == 0:
        with pytest.raises(ValueError, match="batch size 2"):
            bench.ghost_batch_size(n)
    else:
        assert bench.ghost_batch_size(n) == v


def test_eval_runs_other_configs_only_without_default() -> None:
    report = bench.run_benchmark(
        [(4, 3)], configs=["renorm"], modes=["eval"], quick=True, memory=False
    )
    assert [(r.config, r.mode, r.path) for r in report.results] == [
        ("renorm", "eval", "native kernel")
    ]


def test_strided_ghosts_are_an_opt_in_config() -> None:
    assert "ghost_strided" not in bench.DEFAULT_CONFIGS
    report = bench.run_benchmark(
        [(8, 4, 2, 2)],
        configs=["ghost_strided"],
        modes=["fwd"],
        layouts=["contiguous"],
        quick=True,
        memory=False,
    )
    assert [(r.config, r.mode, r.path, r.target) for r in report.results] == [
        ("ghost_strided", "fwd", "kernels", 2.0)
    ]


def test_interleaved_timing_rotates_the_order() -> None:
    calls: list[int] = []

    def recorder(i: int) -> Callable[[], None]:
        return lambda: calls.append(i)

    medians, repeats, inner = bench.time_interleaved(
        [recorder(0), recorder(1), recorder(2)], repeats=4, warmup=1, batch_calls=False
    )
    assert repeats == 4
    assert inner == [1, 1, 1]
    assert len(medians) == 3
    assert all(m >= 0 for m in medians)
    timed = calls[3:]  # after one warmup call of each
    assert [timed[k : k + 3] for k in range(0, 12, 3)] == [
        [0, 1, 2],
        [1, 2, 0],
        [2, 0, 1],
        [0, 1, 2],
    ]


def test_interleaved_timing_batches_short_calls() -> None:
    calls = [0]

    def tick() -> None:
        calls[0] += 1

    _, repeats, inner = bench.time_interleaved([tick], repeats=None, warmup=1)
    # A call this short is far under a millisecond: samples batch many calls.
    assert inner[0] > 1
    assert 5 <= repeats <= 51
    assert calls[0] == 1 + repeats * inner[0]


def test_interleaved_timing_gives_every_contender_the_slowest_ones_count() -> None:
    calls = [0, 0]

    def tick() -> None:
        calls[0] += 1

    def slow() -> None:  # at least 2 ms: one call fills a sample on its own
        calls[1] += 1
        time.sleep(0.002)

    _, _, inner = bench.time_interleaved([tick, slow], repeats=3, warmup=1)
    # A tick looped 200 times would find its data in the cache; the slow call, once, would not.
    assert inner == [1, 1]
    assert calls == [1 + 3, 1 + 3]

    def fast_sleep() -> None:  # at least 0.25 ms: at most 4 calls fill a sample
        calls[1] += 1
        time.sleep(0.00025)

    calls[:] = [0, 0]
    _, _, inner = bench.time_interleaved([tick, fast_sleep], repeats=2, warmup=1)
    assert inner[0] == inner[1] <= 4
    assert calls == [1 + 2 * inner[0], 1 + 2 * inner[1]]


def test_interleaved_timing_takes_a_given_count() -> None:
    # A contender timed in a loop of its own (TensorFlow) takes its row's count.
    calls = [0]

    def tick() -> None:
        calls[0] += 1

    _, repeats, inner = bench.time_interleaved([tick], repeats=2, warmup=1, inner=7)
    assert (repeats, inner) == (2, [7])
    assert calls[0] == 1 + 2 * 7
    _, _, inner = bench.time_interleaved([tick], repeats=2, warmup=1, inner=7, batch_calls=False)
    assert inner == [1]


def test_peak_memory_counts_live_bytes_not_total() -> None:
    mib = 2**20

    def two_at_once() -> None:
        a = torch.empty(mib, dtype=torch.uint8)
        b = torch.empty(mib, dtype=torch.uint8)
        del a, b

    def one_after_another() -> None:
        for _ in range(3):
            a = torch.empty(mib, dtype=torch.uint8)
            del a

    both = bench.peak_allocated_bytes(two_at_once)
    serial = bench.peak_allocated_bytes(one_after_another)
    assert both is not None
    assert serial is not None
    assert 2 * mib <= both < 2 * mib + 64 * 1024
    assert mib <= serial < mib + 64 * 1024


def test_cpu_monitor_sees_other_processes() -> None:
    monitor = bench.CpuMonitor()
    monitor.start()
    # A child process spins one CPU for half a second: CPU time that is not ours.
    spin = "import time\nt = time.perf_counter()\nwhile time.perf_counter() - t < 0.5:\n    pass"
    subprocess.run([sys.executable, "-c", spin], check=True)
    share = monitor.stop()
    if not os.path.exists("/proc/stat"):
        assert share is None
        return
    assert share is not None
    # One of cpu_count CPUs busy for most of the wall time (startup makes it less than 1).
    cpus = os.cpu_count() or 1
    assert 0.4 / cpus <= share <= 1.0


def test_rows_without_compare_tf_have_no_tf_columns(quick_report: bench.BenchReport) -> None:
    assert all(r.tf_ms is None and r.vs_tf is None for r in quick_report.results)
    assert not any(key.startswith("tf_") for key in quick_report.meta)
    for markdown in (False, True):
        table = bench.format_table(quick_report, markdown=markdown)
        assert "tf ms" not in table
        assert "bnkit/tf" not in table
        assert "TensorFlow" not in table


@pytest.fixture
def _without_tensorflow(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import tensorflow` fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    monkeypatch.setitem(sys.modules, "tf_keras", None)


@pytest.mark.usefixtures("_without_tensorflow")
@pytest.mark.parametrize("kernels", ["torch", "cpp", "ops"])
def test_compare_tf_without_tensorflow_exits_2_naming_the_install(
    kernels: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench.run_cli(_args("--quick", "--compare-tf", "--kernels", kernels)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("bnkit bench: error: --compare-tf needs TensorFlow and tf_keras")
    assert err.endswith("install them with: pip install 'bnkit[tf]'\n")
    assert err.count("\n") == 1


@pytest.mark.usefixtures("_without_tensorflow")
def test_compare_tf_without_tensorflow_raises_from_python() -> None:
    from bnkit import bench_tf

    message = r"needs TensorFlow and tf_keras.*pip install 'bnkit\[tf\]'"
    with pytest.raises(bench_tf.TensorFlowNotInstalledError, match=message) as info:
        bench.run_benchmark([(4, 3)], modes=["fwd"], quick=True, memory=False, compare_tf=True)
    assert isinstance(info.value, ImportError)
    with pytest.raises(bench_tf.TensorFlowNotInstalledError, match=message):
        bench.run_kernel_benchmark([(4, 3)], repeats=1, warmup=1, compare_tf=True)
    with pytest.raises(bench_tf.TensorFlowNotInstalledError, match=message):
        bench_tf.keras_step(torch.ones(4, 3), layout="contiguous", mode="fwd")


def test_default_rows_also_time_torch_module(quick_report: bench.BenchReport) -> None:
    for r in quick_report.results:
        if r.config == "default":
            assert r.torch_module_vs_torch is not None
            assert r.torch_module_vs_torch > 0
        else:
            assert r.torch_module_vs_torch is None


def _kernel_script(name: str) -> Any:
    """benchmarks/<name>.py imported as a module (skips the test without the C++ kernels)."""
    import importlib.util
    import pathlib

    from bnkit.kernels import cpp

    if not cpp.available():
        pytest.skip(f"C++ kernels cannot be built here: {cpp.build_error()}")
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_grad_benchmark_script_prints_its_table(capsys: pytest.CaptureFixture[str]) -> None:
    module = _kernel_script("eval_grad")
    assert module.main(["--shapes", "4x3x2x2,6x5", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    rows = [
        line
        for line in out.splitlines()
        if line.startswith("| 4x3x2x2") or line.startswith("| 6x5")
    ]
    # NCHW and NHWC for the 4-D shape, NC for the 2-D one; each with both gradient sets.
    assert [row.split("|")[2].strip() for row in rows] == [
        "NCHW",
        "NCHW",
        "NHWC",
        "NHWC",
        "NC",
        "NC",
    ]
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert all(float(v) >= 0 for v in cells[3:])  # milliseconds may round to 0.000
    # The ratio columns, on numbers chosen here.
    line = module.format_table(
        [
            {
                "shape": "8x4",
                "layout": "NC",
                "grads": "x",
                "kernel_ms": 3.0,
                "torch_ms": 4.0,
                "copy_ms": 0.5,
            }
        ]
    ).splitlines()[-1]
    assert line == "| 8x4 | NC | x | 3.000 | 4.000 | 0.500 | 0.75 | 6.0 |"


def test_traffic_floor_script_prints_its_table(capsys: pytest.CaptureFixture[str]) -> None:
    module = _kernel_script("traffic_floor")
    assert module.main(["--shapes", "4x3x2x2,6x5", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| 4x3x2x2", "| 6x5"))]
    assert [row.split("|")[2].strip() for row in rows] == ["NCHW", "NHWC", "NC"]
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert len(cells) == 11
        assert all(float(v) > 0 for v in cells[3:])  # ratios of positive times
    # The floor and the fwd+bwd sum, on numbers chosen here.
    row = {"shape": "8x4", "layout": "NC", "copy_ms": 0.5}
    row.update(dict(zip(module.COLUMNS, (0.5, 1.0, 1.5, 1.25, 2.0, 4.5), strict=True)))
    assert module.two_pass_floor(row) == 4.0
    line = module.format_table([row]).splitlines()[-1]
    assert line == "| 8x4 | NC | 0.500 | 0.50 | 1.00 | 1.50 | 4.00 | 1.25 | 2.00 | 4.50 | 3.25 |"


def test_sync_benchmark_script_prints_its_table() -> None:
    # Spawns two gloo processes (a few seconds): the rows, in order, with positive times.
    import pathlib
    import subprocess
    import sys

    from bnkit.kernels import cpp

    if not cpp.available():
        pytest.skip(f"C++ kernels cannot be built here: {cpp.build_error()}")
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "sync_bench.py"
    done = subprocess.run(
        [sys.executable, str(path), "--shapes", "4x3x2x2,6x5", "--repeats", "1", "--markdown"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| 4x3x2x2", "| 6x5"))]
    assert [row.split("|")[2].strip() for row in rows] == ["NCHW", "NHWC", "NC"]
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        times = [float(v) for v in cells[2:7]]
        assert all(t > 0 for t in times), row
        # The ratio columns are the times' ratios (rounded as printed).
        assert float(cells[7]) == pytest.approx(times[0] / times[1], abs=0.006)
    bad = subprocess.run(
        [sys.executable, str(path), "--shapes", "5x3", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert bad.returncode == 2
    assert "batch 5 of 5x3 does not split over 2 ranks" in bad.stderr
