"""`bnkit demo`: the seed scenarios (run once per session with --quick) and the command line.

The numbers come from actually training; these tests check the qualitative outcomes the demo
reports (a restored model is exact, recalibration closes the train/eval gap, a too-high decay
hurts early, the doctor flags the broken checkpoints and not the healthy one), not the
numbers themselves.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bnkit
from bnkit.cli import main
from bnkit.demo import SCENARIOS, DemoResult, run_demo
from bnkit.demo.common import (
    ShadowStatistics,
    minibatches,
    never_updated_copy,
    running_statistics,
    with_statistics,
)
from bnkit.demo.digits import DIGITS_RULES
from bnkit.demo.plots import PLOT_FILES
from bnkit.demo.regression import REGRESSION_RULES
from bnkit.demo.report import doctor_commands, render_text, summary_table

DEFAULT_REGRESSION = next(iter(REGRESSION_RULES))
DEFAULT_DIGITS = next(iter(DIGITS_RULES))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    """`bnkit demo --quick`, all scenarios, plots included, into a temporary directory."""
    return run_demo(tmp_path_factory.mktemp("demo"), quick=True)


# ----------------------------------------------------------------- scenario 1: regression


def test_restored_model_reproduces_the_saved_eval_error_exactly(demo: DemoResult) -> None:
    r = demo.regression
    assert r is not None
    assert r.restored_identical
    assert r.restored_eval_mse == r.saved_eval_mse


def test_eval_mode_lags_training_mode_until_recalibrated(demo: DemoResult) -> None:
    r = demo.regression
    assert r is not None
    # The moving statistics lag weights that keep moving: eval mode is far worse ...
    assert r.saved_eval_mse > 5 * r.train_mse
    # ... and exact statistics for the final weights close the gap.
    assert r.recalibrated_eval_mse <= 2 * r.train_mse


def test_lower_decay_and_warmup_narrow_the_regression_gap(demo: DemoResult) -> None:
    r = demo.regression
    assert r is not None
    assert r.final_eval_mse["decay 0.9"] < r.final_eval_mse[DEFAULT_REGRESSION]
    curves = {c.label: c for c in r.eval_curves}
    # Warm-up forgets the initial statistics faster, which matters early in training.
    early = 300
    assert curves["decay 0.99 + warm-up"].at(early) < curves[DEFAULT_REGRESSION].at(early)


def test_regression_broken_variants_are_diagnosed_and_repaired(demo: DemoResult) -> None:
    r = demo.regression
    assert r is not None
    never, not_saved = r.broken
    assert "never-updated" in never.diagnosis.codes
    assert "missing-statistics" in not_saved.diagnosis.codes
    for case in (never, not_saved):
        assert not case.diagnosis.healthy
        assert case.value > 100 * r.train_mse
        assert case.fixed_value <= 2 * r.train_mse
        assert any("refus" in note for note in case.notes)  # bnkit.load(strict=True) refused
    assert r.healthy_checkpoint.healthy
    assert r.healthy_checkpoint.codes == ()
    assert r.recalibrated_model.healthy


def test_the_printed_doctor_commands_flag_the_broken_checkpoints(
    demo: DemoResult, capsys: pytest.CaptureFixture[str]
) -> None:
    commands = doctor_commands(demo)
    assert len(commands) == 3
    for command in commands:
        argv = command.split()[1:]
        assert main(argv) == 1, command
    out = capsys.readouterr().out
    assert "never-updated" in out
    assert "missing-statistics" in out
    healthy = next(p for p in demo.checkpoints if p.name == "regression-trained.safetensors")
    assert main(["doctor", str(healthy)]) == 0


def test_shadow_statistics_are_the_models_own_under_the_default_rule(demo: DemoResult) -> None:
    assert demo.regression is not None
    assert demo.digits is not None
    assert demo.regression.shadow_matches_model
    assert demo.digits.shadow_matches_model


# --------------------------------------------------------------------- scenario 2: digits


def test_high_decay_hurts_early_and_each_remedy_helps(demo: DemoResult) -> None:
    d = demo.digits
    assert d is not None
    step = d.early_step
    slow = d.accuracy(DEFAULT_DIGITS, step)
    assert slow < d.accuracy("decay 0.999 + warm-up", step) - 0.1
    for rule in DIGITS_RULES:
        if rule != DEFAULT_DIGITS:
            assert d.accuracy(rule, step) > slow, rule
    # Training looks fine while held-out evaluation suffers: the train/test gap.
    assert d.train_accuracy.at(step) > slow + 0.1


def test_moving_statistics_of_high_decay_stay_far_from_the_population(demo: DemoResult) -> None:
    d = demo.digits
    assert d is not None
    errors = {c.label: c for c in d.statistics.mean_error}
    step = d.early_step
    assert errors[DEFAULT_DIGITS].at(step) > 3 * errors["decay 0.999 + warm-up"].at(step)
    assert errors[DEFAULT_DIGITS].at(step) > 3 * errors["decay 0.9"].at(step)


def test_doctor_flags_the_high_decay_model_until_recalibrated(demo: DemoResult) -> None:
    d = demo.digits
    assert d is not None
    assert {"initial-dominated", "stale-statistics"} & set(d.before_recalibration.codes)
    assert d.after_recalibration.healthy


def test_recalibration_closes_the_digits_gap_after_the_fact(demo: DemoResult) -> None:
    d = demo.digits
    assert d is not None
    assert d.recalibrated_accuracy > d.accuracy(DEFAULT_DIGITS) + 0.05
    # Recalibrating on the training set gives the population statistics of the final weights.
    assert d.recalibrated_accuracy == d.population_accuracy.last
    # Seed 000's observation: is_training=True at test time looks better than eval mode.
    assert d.test_accuracy_batch_statistics > d.accuracy(DEFAULT_DIGITS)


# ----------------------------------------------------------------------- scenario 3: conv


def test_channels_last_conv_net_matches_torch_and_restores_exactly(demo: DemoResult) -> None:
    c = demo.conv
    assert c is not None
    assert c.input_shape[1:] == (8, 8, 1)
    assert "axis=-1" in c.first_layer
    assert c.layout_max_difference < 1e-5
    assert c.restored_identical
    assert c.restored_accuracy == c.test_accuracy
    assert c.test_accuracy > 0.9
    assert c.healthy_checkpoint.healthy


def test_conv_never_updated_shows_seed_000s_symptom(demo: DemoResult) -> None:
    c = demo.conv
    assert c is not None
    broken = c.broken
    assert broken.value < c.test_accuracy - 0.1
    # Batch statistics of the test set (is_training=True) hide the broken moving statistics.
    assert c.never_updated_batch_statistics_accuracy > broken.value + 0.1
    assert broken.fixed_value >= c.test_accuracy - 0.02
    assert "never-updated" in broken.diagnosis.codes


# ------------------------------------------------------------------------------- output


def test_report_plots_and_checkpoints_are_written(demo: DemoResult) -> None:
    report = demo.report.read_text(encoding="utf-8")
    assert report.startswith("# bnkit demo report")
    assert "## Summary" in report
    assert demo.regression is not None
    assert f"{demo.regression.train_mse:.2e}" in report
    expected = {name for names in PLOT_FILES.values() for name in names}
    assert {p.name for p in demo.plots} == expected
    for plot in demo.plots:
        data = plot.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert 10_000 < len(data) < 400_000
        assert f"]({plot.name})" in report
    assert len(demo.checkpoints) == 5
    for checkpoint in demo.checkpoints:
        assert checkpoint.is_file()
    assert demo.ok
    assert demo.threads == 1


def test_text_report_has_every_scenario_and_the_summary(demo: DemoResult) -> None:
    text = render_text(demo)
    for heading in ("1. Regression", "2. Digits MLP", "3. Conv net", "Summary"):
        assert heading in text
    assert "never-updated" in text
    assert "missing-statistics" in text
    rows = summary_table(demo).rows
    assert [row[0] for row in rows] == [
        "1 regression",
        "1 regression",
        "1 regression",
        "2 digits",
        "2 digits",
        "3 conv NHWC",
    ]


# --------------------------------------------------------------------- the command line


def test_cli_runs_one_scenario_into_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    out = tmp_path / "nested" / "demo"
    argv = ["demo", "--quick", "--scenario", "conv", "--out", str(out), "--no-progress"]
    assert main([*argv, "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "3. Conv net" in text
    assert "1. Regression" not in text
    assert "outputs bit-identical" in text
    assert (out / "report.md").is_file()
    assert not list(out.glob("*.png"))
    assert torch.get_num_threads() == threads


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--scenario", "mnist"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["demo", "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err


def test_run_demo_rejects_unknown_scenarios(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown scenario"):
        run_demo(tmp_path, scenarios=["regression", "imagenet"])
    assert SCENARIOS == ("regression", "digits", "conv")


def test_cli_without_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_python_dash_m_reports_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bnkit", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("bnkit ")


# ------------------------------------------------------------------- the building blocks


def test_a_scenario_is_deterministic(tmp_path: Path) -> None:
    runs = [
        run_demo(tmp_path / name, quick=True, scenarios=["conv"], plots=False).conv
        for name in ("a", "b")
    ]
    first, second = runs
    assert first is not None
    assert second is not None
    assert first.test_accuracy == second.test_accuracy
    assert first.broken.value == second.broken.value
    assert first.train_accuracy == second.train_accuracy


def test_shadow_statistics_follow_their_own_rule_and_ignore_copies() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), bnkit.BatchNorm1d(4))
    shadows = ShadowStatistics(model, {"same": {"momentum": 0.1}, "slow": {"decay": 0.999}})
    clone = copy.deepcopy(model)
    for _ in range(3):
        model(torch.randn(16, 3))
        clone(torch.randn(16, 3) + 5)  # a copy carries the hook but must not feed the shadows
    own = running_statistics(model)["1"]
    shadows.close()
    model(torch.randn(16, 3))  # after close(): nothing fed
    same = shadows.statistics("same")["1"]
    assert torch.equal(same[0], own[0])
    assert torch.equal(same[1], own[1])
    reference = torch.nn.BatchNorm1d(4)
    torch.manual_seed(0)
    reference_model = torch.nn.Sequential(torch.nn.Linear(3, 4), reference)
    for _ in range(3):
        reference_model(torch.randn(16, 3))
        torch.randn(16, 3)
    torch.testing.assert_close(same[0], reference.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(same[1], reference.running_var, rtol=0, atol=0)
    slow_mean = shadows.statistics("slow")["1"][0]
    assert float(slow_mean.abs().max()) < float(same[0].abs().max())


def test_with_statistics_puts_the_models_own_back_even_on_error() -> None:
    layer = bnkit.BatchNorm1d(2)
    layer(torch.randn(8, 2))
    own = running_statistics(layer)[""]
    other = {"": (torch.full((2,), 5.0), torch.full((2,), 9.0))}
    seen: list[torch.Tensor] = []

    def fail_inside() -> None:
        with with_statistics(layer, other):
            seen.append(running_statistics(layer)[""][0])
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_inside()
    assert torch.equal(seen[0], other[""][0])
    assert torch.equal(running_statistics(layer)[""][0], own[0])
    assert torch.equal(running_statistics(layer)[""][1], own[1])


def test_never_updated_copy_keeps_weights_and_counter_and_resets_statistics() -> None:
    layer = bnkit.BatchNorm1d(3)
    with torch.no_grad():
        assert layer.weight is not None
        layer.weight.fill_(2.0)
    for _ in range(4):
        layer(torch.randn(8, 3) + 1)
    broken = never_updated_copy(layer)
    assert isinstance(broken, bnkit.BatchNorm)
    assert broken.num_batches_tracked is not None
    assert int(broken.num_batches_tracked) == 4
    assert broken.running_mean is not None
    assert broken.running_var is not None
    assert torch.equal(broken.running_mean, torch.zeros(3))
    assert torch.equal(broken.running_var, torch.ones(3))
    assert broken.weight is not None
    assert torch.equal(broken.weight, torch.full((3,), 2.0))
    assert layer.running_mean is not None
    assert not torch.equal(layer.running_mean, torch.zeros(3))  # the original is untouched


def test_minibatches_drop_the_ragged_tail_and_cover_each_sample_once() -> None:
    batches = list(minibatches(10, 4, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [4, 4]
    seen = torch.cat(batches)
    assert len(set(seen.tolist())) == 8
