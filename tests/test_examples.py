"""The scripts in examples/ run and show what they claim."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_masked_sequences_mask_recovers_the_real_statistics(capsys):
    example = _load("masked_sequences")
    mean, var = example.running_statistics(use_mask=True, steps=150)
    assert mean == pytest.approx(3.0, abs=0.1)
    assert var == pytest.approx(4.0, rel=0.1)
    # Without the mask the padding zeros pull the mean down (to about 0.6 * 3) and widen the
    # variance (a mixture of the data and zeros: about 0.6 * 13 - 1.8**2 = 4.56).
    mean_unmasked, var_unmasked = example.running_statistics(use_mask=False, steps=150)
    assert mean_unmasked < 2.2
    assert var_unmasked > var + 0.3
    example.main()
    assert "with weights=mask" in capsys.readouterr().out


@pytest.mark.parametrize("kernels", ["torch", "cpp"])
def test_ddp_train_under_torchrun_ends_with_identical_statistics(kernels: str) -> None:
    # Two processes with uneven shares (17 and 13 of 30 samples), as torchrun starts them;
    # with the default policy and with --kernels cpp (that the kernels then serve the
    # synchronized layers is checked in test_distributed.py's kernels* checks).
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(EXAMPLES / "ddp_train.py"),
        "--steps",
        "6",
        "--kernels",
        kernels,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    stats = dict(re.findall(r"^rank (\d+): (running_mean .*)$", done.stdout, re.MULTILINE))
    assert sorted(stats) == ["0", "1"], done.stdout
    assert stats["0"] == stats["1"]  # the running statistics, printed in full on each rank
    assert "identical on all 2 ranks: True" in done.stdout
    assert f"kernels={kernels}" in done.stdout


def test_fast_cpu_training_agrees_with_pytorch_kernels(capsys):
    from bnkit.kernels import cpp

    example = _load("fast_cpu_training")
    runs = example.main(["--steps", "60"])
    assert [run.kernels for run in runs] == ["torch", "cpp"]
    assert runs[0].accuracy > 0.7  # it learns
    assert abs(runs[0].accuracy - runs[1].accuracy) < 0.05
    out = capsys.readouterr().out
    gap = float(out.rsplit("after one step: ", 1)[1].split()[0])
    assert gap < 1e-5
    cosine = float(out.rsplit("cosine similarity of the maps ", 1)[1].split()[0])
    assert cosine > 0.9999  # eval-mode input gradients agree between the two paths
    if not cpp.available():  # pragma: no cover - no compiler
        assert "cannot be built" in out
