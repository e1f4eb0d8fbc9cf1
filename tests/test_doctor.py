"""bnkit.diagnose and ``bnkit doctor``: each check fires on a broken checkpoint, never on a
healthy one; exit codes, JSON, --fix, rank checkpoints, Keras files (written with h5py).

Oracles are closed-form float64 computations written here (decay**t, standardized shifts,
relative output gaps) and bnkit.recalibrate for --fix. TensorFlow checkpoints are in
tests/parity/test_doctor_tf.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import h5py  # the dev extra installs it; Keras files are read without TensorFlow
import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

import bnkit
from bnkit.checkpoint import Finding
from bnkit.cli import main
from bnkit.doctor import (
    INITIAL_WEIGHT_LIMIT,
    MEAN_SHIFT_LIMIT,
    Report,
    diagnose,
    repair,
)

# --------------------------------------------------------------------------- helpers


def mlp(norm: Any = nn.BatchNorm1d, **options: Any) -> nn.Sequential:
    """Linear -> BN -> ReLU -> Linear -> BN -> ReLU -> Linear on 6 features."""
    return nn.Sequential(
        nn.Linear(6, 16),
        norm(16, **options),
        nn.ReLU(),
        nn.Linear(16, 8),
        norm(8, **options),
        nn.ReLU(),
        nn.Linear(8, 1),
    )


def batches(n: int = 12, size: int = 64, seed: int = 1, shift: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 6, generator=g) * 2 + shift for _ in range(n)]


def train(model: nn.Module, steps: int = 60, seed: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for x in batches(steps, seed=seed):
        loss = (model(x) - x[:, :1]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["doctor", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def codes(report: Report, *severities: str) -> list[str]:
    return report.codes(*severities)


def only(report: Report, code: str) -> Finding:
    found = [f for f in report.findings if f.code == code]
    assert len(found) == 1, [str(f) for f in report.findings]
    return found[0]


FACTORY = """
import torch
from torch import nn

def make():
    return nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1),
    )

def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(64, 6, generator=g) * 2 + 1.0 for _ in range(12)]

def number():
    return 3

def shifted():
    g = torch.Generator().manual_seed(2)
    return [torch.randn(64, 6, generator=g) * 2 - 3.0 for _ in range(12)]
"""


@pytest.fixture
def factory(tmp_path: Path) -> str:
    path = tmp_path / "factory.py"
    path.write_text(textwrap.dedent(FACTORY))
    return str(path)


def factory_module(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("doctor_test_factory", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    return train(mlp())


@pytest.fixture
def trained_pt(tmp_path: Path, trained: nn.Module) -> Path:
    path = tmp_path / "trained.pt"
    torch.save(trained.state_dict(), path)
    return path


@pytest.fixture
def data_pt(tmp_path: Path) -> Path:
    path = tmp_path / "data.pt"
    torch.save(torch.cat(batches()), path)  # 12 batches of 64 again with --batch-size 64
    return path


# ---------------------------------------------------------------- healthy: no false alarms


def test_trained_torch_checkpoint_is_healthy_static_and_with_data(
    trained_pt: Path, data_pt: Path, factory: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli([str(trained_pt)], capsys)
    assert (code, err) == (0, "")
    assert "healthy: no problems found" in out
    assert "\x1b[" not in out  # captured stdout is not a terminal: no colours
    code, out, _ = cli(
        [str(trained_pt), "--model", f"{factory}:make", "--data", str(data_pt)], capsys
    )
    assert code == 0, out
    assert "train-vs-eval output gap" in out


def test_fresh_models_are_healthy(tmp_path: Path) -> None:
    torch.manual_seed(0)
    for model in (
        mlp(),
        mlp(bnkit.BatchNorm, decay=0.999, zero_debias="both", warmup=True),
        nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), bnkit.from_slim(4, data_format="NCHW")
        ),
    ):
        torch.save(model.state_dict(), tmp_path / "fresh.pt")
        bnkit.save(model, tmp_path / "fresh.safetensors")
        for report in (
            diagnose(model),
            diagnose(state=tmp_path / "fresh.pt"),
            diagnose(state=tmp_path / "fresh.safetensors"),
            diagnose(model, state=str(tmp_path / "fresh.pt")),
        ):
            assert report.findings == [], [str(f) for f in report.findings]
            assert report.layers
            assert all(layer.steps == 0 for layer in report.layers)


def test_zero_initialized_gamma_is_not_trained() -> None:
    """ResNet-style ``zeros_(bn.weight)`` is a constant, not a sign of training."""
    model = mlp()
    nn.init.zeros_(model[4].weight)
    assert diagnose(state=model.state_dict()).findings == []


@pytest.mark.parametrize(
    "options",
    [
        {"decay": 0.9, "warmup": True, "zero_debias": "both", "running_var": "biased"},
        {"renorm": True, "zero_debias": "mean"},
        {"decay": 0.99, "warmup": True, "zero_debias": "mean"},
        {"virtual_batch_size": 16, "running_var": "biased"},
    ],
    ids=["warmup-debias-both", "renorm-debias-mean", "decay0.99-warmup", "ghost"],
)
def test_trained_bnkit_with_options_is_healthy(tmp_path: Path, options: dict[str, Any]) -> None:
    model = train(mlp(bnkit.BatchNorm, **options))
    bnkit.save(model, tmp_path / "m.safetensors")
    assert diagnose(state=tmp_path / "m.safetensors").findings == []
    report = diagnose(model, state=tmp_path / "m.safetensors", data=batches())
    assert report.healthy, report
    assert report.train_eval_gap is not None


def test_recalibrated_zero_debias_checkpoint_is_consistent(tmp_path: Path) -> None:
    model = train(mlp(bnkit.BatchNorm, decay=0.9, zero_debias="both", warmup=True))
    bnkit.recalibrate(model, batches(), progress=False)
    bnkit.save(model, tmp_path / "m.safetensors")
    assert diagnose(state=tmp_path / "m.safetensors").findings == []


def test_model_without_batch_norm_is_healthy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 1))
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    code, out, _ = cli([str(tmp_path / "plain.pt")], capsys)
    assert code == 0
    assert "no batch-norm layers found" in out
    report = diagnose(state=tmp_path / "plain.pt")
    assert report.healthy
    assert codes(report) == ["no-batch-norm"]
    assert only(report, "no-batch-norm").evidence["layers"] == ["1"]


# ----------------------------------------------------------------------- Keras files


def write_keras_h5(
    path: Path,
    layers: dict[str, dict[str, np.ndarray]],
    *,
    iterations: int | None,
    momentum: float | None = 0.99,
) -> Path:
    """A tf_keras ``model.save('m.h5')`` layout: model_weights/, optional config and step."""
    with h5py.File(path, "w") as f:
        if momentum is not None:
            items = [
                {"class_name": "BatchNormalization", "config": {"name": n, "momentum": momentum}}
                for n in layers
            ]
            config = {"class_name": "Sequential", "config": {"name": "s", "layers": items}}
            f.attrs["model_config"] = json.dumps(config)
        root = f.create_group("model_weights")
        root.attrs["layer_names"] = [n.encode() for n in layers]
        for name, weights in layers.items():
            group = root.create_group(name)
            names = [f"{name}/{var}:0".encode() for var in weights]
            group.attrs["weight_names"] = names
            for weight_name, value in zip(names, weights.values(), strict=True):
                group.create_dataset(weight_name, data=value)
        if iterations is not None:
            opt = f.create_group("optimizer_weights")
            opt.attrs["weight_names"] = [b"iteration:0"]
            opt.create_dataset(b"iteration:0", (), dtype=np.int64)[()] = iterations
    return path


def keras_bn(c: int, rng: np.random.Generator, *, initial: bool = False) -> dict[str, np.ndarray]:
    return {
        "gamma": rng.uniform(0.5, 1.5, c).astype(np.float32),
        "beta": rng.normal(size=c).astype(np.float32),
        "moving_mean": np.zeros(c, np.float32)
        if initial
        else rng.normal(size=c).astype(np.float32),
        "moving_variance": np.ones(c, np.float32)
        if initial
        else rng.uniform(0.5, 2, c).astype(np.float32),
    }


def test_keras_h5_healthy_and_never_updated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    healthy = {"batch_normalization": keras_bn(4, rng), "batch_normalization_1": keras_bn(3, rng)}
    write_keras_h5(tmp_path / "ok.h5", healthy, iterations=1000)
    code, out, _ = cli([str(tmp_path / "ok.h5")], capsys)
    assert code == 0, out
    assert "batch_normalization_1" in out

    broken = {
        "batch_normalization": keras_bn(4, rng),
        "batch_normalization_1": keras_bn(3, rng, initial=True),
    }
    write_keras_h5(tmp_path / "bad.h5", broken, iterations=50)
    code, out, _ = cli([str(tmp_path / "bad.h5")], capsys)
    assert code == 1
    finding = only(diagnose(state=tmp_path / "bad.h5"), "never-updated")
    assert finding.layer == "batch_normalization_1"
    assert finding.evidence["steps"] == 50
    assert finding.evidence["steps_from"] == "optimizer iterations"
    gamma = broken["batch_normalization_1"]["gamma"].astype(np.float64)
    assert finding.evidence["gamma_moved"] == pytest.approx(np.abs(gamma - 1).max())
    assert "moving_mean is exactly 0 and moving_variance exactly 1" in finding.message


def test_keras_momentum_from_the_file_config(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    layers = {"batch_normalization": keras_bn(4, rng)}
    write_keras_h5(tmp_path / "m.h5", layers, iterations=100, momentum=0.99)
    finding = only(diagnose(state=tmp_path / "m.h5"), "initial-dominated")
    assert finding.severity == "warning"
    assert finding.evidence["initial_weight"] == pytest.approx(0.99**100)
    assert finding.evidence["decay_from"] == "the file's layer config, momentum 0.99"
    # Without a config the decay is Keras' default, assumed: a note, not a problem.
    write_keras_h5(tmp_path / "w.h5", layers, iterations=100, momentum=None)
    report = diagnose(state=tmp_path / "w.h5")
    assert report.healthy
    assert only(report, "initial-dominated").severity == "info"


# ----------------------------------------------------------------- static checks fire


def trained_state(model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    model = model if model is not None else mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    for prefix, c in (("1.", 16), ("4.", 8)):
        state[prefix + "running_mean"] = torch.randn(c, generator=g)
        state[prefix + "running_var"] = torch.rand(c, generator=g) + 0.5
        state[prefix + "num_batches_tracked"] = torch.tensor(500)
    return state


def test_never_updated_with_step_counter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = trained_state()
    state["4.running_mean"] = torch.zeros(8)
    state["4.running_var"] = torch.ones(8)
    torch.save(state, tmp_path / "never.pt")
    code, out, _ = cli([str(tmp_path / "never.pt")], capsys)
    assert code == 1
    assert "never-updated" in out
    finding = only(diagnose(state=tmp_path / "never.pt"), "never-updated")
    assert (finding.severity, finding.layer) == ("error", "4")
    assert finding.evidence["steps"] == 500
    assert finding.evidence["steps_from"] == "num_batches_tracked"
    assert finding.evidence["channels"] == 8


def test_missing_statistics_named_parameters_only(
    tmp_path: Path, factory: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model = train(mlp(), steps=10)
    torch.save(dict(model.named_parameters()), tmp_path / "params.pt")
    code, out, _ = cli([str(tmp_path / "params.pt"), "--model", f"{factory}:make"], capsys)
    assert code == 1
    assert "missing-statistics" in out
    report = diagnose(mlp(), state=tmp_path / "params.pt")
    missing = [f for f in report.findings if f.code == "missing-statistics"]
    assert [(f.severity, f.layer) for f in missing] == [("error", "1"), ("error", "4")]
    assert missing[0].evidence == {
        "missing": ["running_mean", "running_var"],
        "present": ["weight", "bias"],
    }
    # Without a model, only a batch-norm name says what a weight/bias pair is.
    named = nn.Sequential()
    named.add_module("fc", nn.Linear(6, 4))
    named.add_module("bn1", nn.BatchNorm1d(4))
    named.add_module("ln", nn.LayerNorm(4))
    report = diagnose(state=dict(named.named_parameters()))
    assert [(f.severity, f.layer, f.code) for f in report.findings] == [
        ("warning", "bn1", "missing-statistics")
    ]


def test_checkpoint_of_another_architecture() -> None:
    state = trained_state()
    other = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5))
    other.add_module("4", nn.BatchNorm1d(5))
    report = diagnose(other, state=state)
    mismatch = {f.layer: f.message for f in report.findings if f.code == "shape-mismatch"}
    assert sorted(mismatch) == ["3", "4"]
    assert "running_mean has shape (8,), the model's has (5,)" in mismatch["4"]
    assert report.exit_code == 1


def test_non_finite_and_negative_variances(tmp_path: Path) -> None:
    state = trained_state()
    state["1.running_var"][2] = float("nan")
    state["1.running_mean"][5] = float("inf")
    state["4.running_var"][[1, 6]] = torch.tensor([-0.25, -2.0])
    report = diagnose(state=state)
    assert report.codes() == ["non-finite", "negative-variance"]
    nonfinite = only(report, "non-finite")
    assert nonfinite.layer == "1"
    assert nonfinite.evidence["running_var"] == {"nan": 1, "inf": 0}
    assert nonfinite.evidence["running_mean"] == {"nan": 0, "inf": 1}
    assert "channel 2" in nonfinite.message
    negative = only(report, "negative-variance")
    assert negative.layer == "4"
    assert negative.evidence["running_var"] == {"negative": 2, "min": -2.0}
    assert "channels 1, 6" in negative.message


def test_degenerate_variances() -> None:
    state = trained_state()
    state["1.running_var"] = torch.full((16,), 1e-12)
    state["4.running_var"][3] = 1e-9
    report = diagnose(state=state)
    tiny, ratio = (f for f in report.findings if f.code == "degenerate-variance")
    assert tiny.layer == "1"
    assert tiny.evidence["var_max"] == pytest.approx(1e-12)
    assert ratio.layer == "4"
    var = state["4.running_var"].double()
    assert ratio.evidence["ratio"] == pytest.approx(float(var.max() / var.min()))
    assert ratio.evidence["channels"] == [3]
    # Ratios up to the limit are fine.
    state = trained_state()
    state["4.running_var"] = torch.linspace(1e-3, 1e2, 8)  # ratio 1e5
    assert diagnose(state=state).findings == []


def test_zero_debias_mismatch_with_known_and_unknown_decay(tmp_path: Path) -> None:
    model = train(mlp(bnkit.BatchNorm, decay=0.9, zero_debias="mean"), steps=40)
    with torch.no_grad():
        model[4].running_mean.mul_(2.0)  # edited without its shadow
    bnkit.save(model, tmp_path / "zd.safetensors")
    finding = only(diagnose(state=tmp_path / "zd.safetensors"), "zero-debias-mismatch")
    assert (finding.severity, finding.layer) == ("warning", "4")
    assert finding.evidence["local_step"] == 40
    assert finding.evidence["expected_factor"] == pytest.approx(1 - 0.9**40)
    assert finding.evidence["factor_min"] == pytest.approx((1 - 0.9**40) / 2, rel=1e-5)

    # TF variables, decay unknown: only consistency across channels can be checked.
    k, d = 30, 0.95
    mean = np.array([1.0, -2.0, 0.5], np.float32)
    variables = {
        "bn/beta": np.array([0.1, 0.2, 0.3], np.float32),
        "bn/moving_mean": mean,
        "bn/moving_variance": np.ones(3, np.float32) * 2,
        "bn/bn/moving_mean/biased": mean * np.float32(1 - d**k),
        "bn/bn/moving_mean/local_step": np.float32(k),
    }
    assert diagnose(state=variables).findings == []
    variables["bn/bn/moving_mean/biased"] = mean * np.array([0.7, 0.5, 0.7], np.float32)
    finding = only(diagnose(state=variables), "zero-debias-mismatch")
    assert finding.layer == "bn"
    assert (finding.evidence["factor_min"], finding.evidence["factor_max"]) == pytest.approx(
        (0.5, 0.7)
    )
    assert "moving_mean/biased" in finding.message


def test_initial_dominated_decay_from_metadata_model_and_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = mlp(bnkit.BatchNorm, decay=0.999)
    state = trained_state(model)
    state["1.num_batches_tracked"] = torch.tensor(1000)
    model.load_state_dict(state)
    bnkit.save(model, tmp_path / "slow.safetensors")
    report = diagnose(state=tmp_path / "slow.safetensors")
    finding = [f for f in report.findings if f.code == "initial-dominated"]
    assert [f.layer for f in finding] == ["1", "4"]
    first = finding[0].evidence
    assert first["initial_weight"] == pytest.approx(0.999**1000)  # 36.8%
    assert first["steps"] == 1000
    assert first["suggested_decay"] == pytest.approx(INITIAL_WEIGHT_LIMIT ** (1 / 1000))
    assert first["updates_needed"] == math.ceil(math.log(0.05) / math.log(0.999))
    assert finding[1].evidence["initial_weight"] == pytest.approx(0.999**500)
    assert report.layers[0].initial_weight == pytest.approx(0.999**1000)

    # A plain .pt records no decay: PyTorch's default is assumed (0.9**500: nothing to say)...
    torch.save(state, tmp_path / "slow.pt")
    assert diagnose(state=tmp_path / "slow.pt").findings == []
    # ... unless --decay or the model says otherwise.
    code, out, _ = cli([str(tmp_path / "slow.pt"), "--decay", "0.999"], capsys)
    assert code == 1
    assert "36.8%" in out
    assert diagnose(mlp(bnkit.BatchNorm, decay=0.999), state=tmp_path / "slow.pt").codes() == [
        "initial-dominated"
    ]
    # Few steps at the assumed default: a note only.
    state["1.num_batches_tracked"] = torch.tensor(10)
    report = diagnose(state=state)
    assert report.healthy
    assert only(report, "initial-dominated").evidence["initial_weight"] == pytest.approx(0.9**10)


def test_cumulative_and_warmup_averages_forget_their_start() -> None:
    for model in (
        mlp(bnkit.BatchNorm, momentum=None),
        mlp(bnkit.BatchNorm, decay=0.999, warmup=True),
    ):
        state = trained_state(model)
        state["1.num_batches_tracked"] = torch.tensor(20)
        assert diagnose(model, state=state).findings == []


def test_skipped_updates_is_a_note() -> None:
    model = mlp(bnkit.BatchNorm)
    state = trained_state(model)
    state["1.num_skipped_updates"] = torch.tensor(3)
    report = diagnose(state=state)
    assert report.healthy
    assert only(report, "skipped-updates").evidence == {"skipped": 3}


# ------------------------------------------------------------------------- ranks


def test_rank_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = trained_state()
    paths = []
    for rank in range(3):
        state = {k: v.clone() for k, v in base.items()}
        paths.append(tmp_path / f"rank{rank}.pt")
        torch.save(state, paths[-1])
    code, out, _ = cli([str(p) for p in paths], capsys)
    assert code == 0, out
    assert "rank 2 (rank2.pt)" in out

    shifted = {k: v.clone() for k, v in base.items()}
    shifted["4.running_mean"][5] += 0.5
    shifted["1.running_var"][0] *= 2.0
    torch.save(shifted, paths[2])
    code, out, _ = cli([str(p) for p in paths], capsys)
    assert code == 1
    report = diagnose(states=paths)
    found = {f.layer: f for f in report.findings if f.code == "rank-disagreement"}
    assert sorted(found) == ["1", "4"]
    var4 = base["4.running_var"].double()
    expected = 0.5 / math.sqrt(float(var4[5]) + 1e-5)
    assert found["4"].evidence["mean_spread"] == pytest.approx(expected, rel=1e-4)
    assert found["4"].evidence["mean_channel"] == 5
    v0 = float(base["1.running_var"][0])
    assert found["1"].evidence["var_ratio"] == pytest.approx((2 * v0 + 1e-5) / (v0 + 1e-5))

    diverged = {k: v.clone() for k, v in base.items()}
    diverged["1.weight"][0] += 0.1
    torch.save(diverged, paths[1])
    report = diagnose(states=paths[:2])
    assert report.codes() == ["rank-parameters-differ"]
    assert only(report, "rank-parameters-differ").layer == "1"


# ---------------------------------------------------------------------- data checks


def test_stale_statistics_and_gap_match_closed_form() -> None:
    """One BatchNorm1d: population statistics are the data's; the gap is computable."""
    bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.0, 1.0, 5.0]))
        bn.running_var.copy_(torch.tensor([1.0, 4.0, 1.0]))
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.num_batches_tracked.fill_(1000)
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(50, 3, generator=g) * torch.tensor([1.0, 2.0, 3.0]) for _ in range(4)]
    report = diagnose(bn, data=data)
    x = torch.cat(data).double()
    mu, var = x.mean(0), x.var(0)  # recalibrate's unbiased population variance
    shift = (torch.tensor([0.0, 1.0, 5.0]).double() - mu).abs() / torch.sqrt(var + 1e-5)
    ratio = (torch.tensor([1.0, 4.0, 1.0]).double() + 1e-5) / (var + 1e-5)
    stale = only(report, "stale-statistics")
    assert stale.layer == ""
    assert stale.evidence["mean_shift"] == pytest.approx(float(shift.max()), rel=1e-5)
    assert stale.evidence["mean_channel"] == 2
    assert stale.evidence["var_ratio_min"] == pytest.approx(float(ratio.min()), rel=1e-5)
    assert stale.evidence["samples"] == 200

    def gap(mean: torch.Tensor, variance: torch.Tensor) -> float:
        num = den = 0.0
        w, b = bn.weight.detach().double(), bn.bias.detach().double()
        for xb in data:
            xb = xb.double()
            train_out = (xb - xb.mean(0)) / torch.sqrt(xb.var(0, unbiased=False) + 1e-5) * w + b
            eval_out = (xb - mean) / torch.sqrt(variance + 1e-5) * w + b
            num += float(((train_out - eval_out) ** 2).sum())
            den += float((train_out**2).sum())
        return math.sqrt(num / den)

    running = gap(torch.tensor([0.0, 1.0, 5.0]).double(), torch.tensor([1.0, 4.0, 1.0]).double())
    assert report.train_eval_gap == pytest.approx(running, rel=1e-5)
    assert report.gap_floor == pytest.approx(gap(mu, var), rel=1e-4)
    assert only(report, "train-eval-gap").evidence["gap"] == pytest.approx(running, rel=1e-5)
    assert report.batches == 4
    assert report.layers[0].mean_shift == pytest.approx(float(shift.max()), rel=1e-5)
    assert float(shift.max()) > MEAN_SHIFT_LIMIT


def test_diagnose_leaves_the_model_as_it_was(trained: nn.Module, tmp_path: Path) -> None:
    model = mlp(bnkit.BatchNorm)
    model.load_state_dict(train(mlp(bnkit.BatchNorm), steps=20).state_dict())
    model[4].train()
    model.eval()
    model[1].train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    torch.save(trained.state_dict(), tmp_path / "other.pt")
    report = diagnose(model, state=tmp_path / "other.pt", data=batches(4))
    assert report.batches == 4
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert [m.training for m in model.modules()] == modes


def test_stale_statistics_on_shifted_data_and_fix(
    tmp_path: Path, trained_pt: Path, factory: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(trained_pt), "--model", f"{factory}:make", "--data", f"{factory}:shifted"]
    code, out, _ = cli([*argv, "--json"], capsys)
    assert code == 1
    payload = json.loads(out)
    assert payload["exit_code"] == 1
    assert payload["dynamic"]["batches"] == 12
    stale = [f for f in payload["findings"] if f["code"] == "stale-statistics"]
    # The first layer sees the shifted inputs; the second sees batch-normalized ones.
    assert "1" in {f["layer"] for f in stale}
    assert all(f["evidence"]["mean_shift"] > MEAN_SHIFT_LIMIT for f in stale)
    assert {f["code"] for f in payload["findings"]} >= {"train-eval-gap"}

    for out_name in ("fixed.safetensors", "fixed.pt"):
        fixed = tmp_path / out_name
        code, out, _ = cli([*argv, "--fix", str(fixed)], capsys)
        assert code == 0, out
        assert f"wrote {fixed}" in out
        assert out.count("bnkit doctor:") == 2
        # The repaired statistics are bnkit.recalibrate's on the same data.
        reference = mlp()
        bnkit.load(reference, trained_pt)
        bnkit.recalibrate(reference, factory_module(factory).shifted(), progress=False)
        repaired = mlp()
        bnkit.load(repaired, fixed)
        for key, value in reference.state_dict().items():
            assert torch.equal(repaired.state_dict()[key], value), key
    code, out, _ = cli(
        [str(fixed), "--model", f"{factory}:make", "--data", f"{factory}:shifted"], capsys
    )
    assert code == 0, out


def test_fix_json_reports_both(
    tmp_path: Path,
    trained_pt: Path,
    factory: str,
    data_pt: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = torch.load(trained_pt, weights_only=True)
    state["4.running_mean"].zero_()
    state["4.running_var"].fill_(1.0)
    torch.save(state, tmp_path / "never.pt")
    argv = [str(tmp_path / "never.pt"), "--model", f"{factory}:make", "--data", str(data_pt)]
    code, out, _ = cli([*argv, "--fix", str(tmp_path / "ok.pt"), "--json"], capsys)
    payload = json.loads(out)
    assert code == payload["exit_code"] == 0
    assert "never-updated" in {f["code"] for f in payload["before"]["findings"]}
    assert payload["after"]["healthy"] is True
    assert payload["fix"]["calibrated"] == ["1", "4"]
    assert payload["fix"]["batches"] == 12


def test_repair_library(tmp_path: Path) -> None:
    model = mlp()
    data = batches(6)
    report = repair(model, data, tmp_path / "r.safetensors")
    assert report.calibrated == ["1", "4"]
    loaded = mlp()
    bnkit.load(loaded, tmp_path / "r.safetensors")
    assert torch.equal(loaded[1].running_mean, model[1].running_mean)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        repair(model, data, tmp_path / "r.bin")


def test_initial_dominated_is_a_note_when_the_data_agrees() -> None:
    model = mlp(bnkit.BatchNorm, decay=0.99)
    data = batches(8)
    bnkit.recalibrate(model, data, progress=False)
    for layer in (model[1], model[4]):
        layer.num_batches_tracked.fill_(100)  # 0.99**100 = 36.6% on paper ...
    assert diagnose(model).codes("warning") == ["initial-dominated"]
    report = diagnose(model, data=data)  # ... but the statistics match the data
    assert report.healthy, report
    finding = report.findings[0]
    assert (finding.code, finding.severity) == ("initial-dominated", "info")
    assert finding.evidence["confirmed_by_data"] is True


class ForcesTraining(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.bn = bnkit.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x), training=True)  # the bug: training mode in evaluation


def test_training_mode_under_no_grad_is_reported() -> None:
    model = ForcesTraining()
    report = diagnose(model, data=batches(3))
    finding = only(report, "no-grad-training")
    assert (finding.severity, finding.layer) == ("warning", "bn")
    assert finding.evidence == {"calls": 3, "seen": "during diagnose"}
    assert model.bn._warned == set()  # the warn-once memory is as it was

    # Seen earlier in user code: an evaluation loop that forgot model.eval().
    model = mlp(bnkit.BatchNorm)
    with torch.no_grad(), pytest.warns(bnkit.policies.BatchNormWarning, match="no_grad"):
        model(batches(1)[0])
    report = diagnose(model)
    seen = [f for f in report.findings if f.code == "no-grad-training"]
    assert [(f.severity, f.layer) for f in seen] == [("warning", "1"), ("warning", "4")]
    assert seen[0].evidence == {"seen": "before diagnose"}
    # That one stray update is also all the averages have seen: 0.9**1 of the start remains.
    dominated = [f for f in report.findings if f.code == "initial-dominated"]
    assert [f.evidence["initial_weight"] for f in dominated] == pytest.approx([0.9, 0.9])


def test_layers_the_forward_never_reaches_are_noted() -> None:
    model = nn.ModuleDict({"used": nn.BatchNorm1d(6), "unused": nn.BatchNorm1d(6)})
    report = diagnose(model, data=batches(2), forward=lambda m, x: m["used"](x))
    assert [(f.layer, f.code) for f in report.notes if f.code == "not-reached"] == [
        ("unused", "not-reached")
    ]


# ------------------------------------------------------------------ output, exit codes


def test_json_schema(trained_pt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = torch.load(trained_pt, weights_only=True)
    state["1.running_var"][0] = float("nan")
    torch.save(state, trained_pt)
    code, out, _ = cli([str(trained_pt), "--json"], capsys)
    payload = json.loads(out)
    assert code == payload["exit_code"] == 1
    assert payload["schema"] == "bnkit.doctor/1"
    assert payload["healthy"] is False
    assert payload["counts"] == {"error": 1, "warning": 0, "info": 0}
    assert payload["sources"] == [str(trained_pt)]
    (finding,) = payload["findings"]
    assert set(finding) == {"severity", "layer", "code", "message", "fix", "evidence"}
    assert (finding["layer"], finding["code"]) == ("1", "non-finite")
    assert finding["evidence"]["running_var"] == {"nan": 1, "inf": 0}
    assert [layer["name"] for layer in payload["layers"]] == ["1", "4"]
    assert payload["layers"][0]["steps"] == 60
    assert payload["dynamic"] is None


def test_colours_only_on_request() -> None:
    report = Report(
        findings=[Finding("error", "bn", "non-finite", "running_var has 1 NaN.", "recalibrate")],
        sources=["x.pt"],
    )
    assert "\x1b[31;1mERROR" in report.render(color=True)
    assert "\x1b[" not in str(report)
    assert str(report).splitlines()[-1] == "problems found: 1 error (exit code 1)"


def test_colour_follows_tty_and_no_color(
    trained_pt: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.delenv("NO_COLOR", raising=False)
    _, out, _ = cli([str(trained_pt)], capsys)
    assert "\x1b[32;1m" in out
    monkeypatch.setenv("NO_COLOR", "1")
    _, out, _ = cli([str(trained_pt)], capsys)
    assert "\x1b[" not in out


@pytest.mark.parametrize(
    ("setup", "argv", "message"),
    [
        (None, ["missing.pt"], "no such file"),
        ("garbage", ["garbage.bin"], "unknown format"),
        ("empty", ["empty.pt"], "is empty"),
        ("dir", ["folder"], "without a TensorFlow 'checkpoint' file"),
        ("pickle", ["evil.pt"], "refused to load"),
        ("ok", ["ok.pt", "--data", "data.pt"], "--data needs --model"),
        ("ok", ["ok.pt", "--fix", "out.pt"], "--fix needs --model"),
        ("ok", ["ok.pt", "--model", "nofile.py:make"], "no such file 'nofile.py'"),
        ("ok", ["ok.pt", "--model", "FACTORY:number"], "returned a int, not an nn.Module"),
        ("ok", ["ok.pt", "--model", "no_such_module_xyz:make"], "cannot import module"),
        ("ok", ["ok.pt", "--decay", "1.5"], "--decay must be in [0, 1)"),
        ("ok", ["ok.pt", "--model", "FACTORY:make", "--data", "FACTORY:number"], "not an iterable"),
        ("ok", ["ok.pt", "--model", "FACTORY:make", "--data", "nodata.npy"], "no such file"),
    ],
)
def test_usage_and_input_errors_exit_2_with_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    factory: str,
    setup: str | None,
    argv: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    if setup == "garbage":
        Path("garbage.bin").write_bytes(b"not a checkpoint at all")
    elif setup == "empty":
        Path("empty.pt").write_bytes(b"")
    elif setup == "dir":
        Path("folder").mkdir()
    elif setup == "pickle":
        import pickle

        Path("evil.pt").write_bytes(pickle.dumps({"w": torch.ones(1), "f": Path("x")}))
    elif setup == "ok":
        torch.save(mlp().state_dict(), "ok.pt")
    argv = [a.replace("FACTORY", factory) for a in argv]
    code, out, err = cli(argv, capsys)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("bnkit doctor: error: ")
    assert message in err
    assert "Traceback" not in err


def test_tensorflow_checkpoint_without_tensorflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "model.ckpt-10.index").write_bytes(b"\0")
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    code, _, err = cli([str(tmp_path / "model.ckpt-10")], capsys)
    assert code == 2
    assert "TensorFlow" in err
    assert "pip install" in err
    assert err.count("\n") == 1


def test_argparse_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["doctor"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["doctor", "x.pt", "--batch-size", "0"])
    assert exc.value.code == 2
    assert "positive integer" in capsys.readouterr().err


def test_data_files_and_callables(
    tmp_path: Path, trained_pt: Path, factory: str, capsys: pytest.CaptureFixture[str]
) -> None:
    x = torch.cat(batches(3)).numpy().astype(np.float64)  # cast to the model's dtype
    np.save(tmp_path / "x.npy", x)
    safetensors.torch.save_file(
        {"inputs": torch.from_numpy(x).float(), "labels": torch.zeros(len(x))},
        str(tmp_path / "x.safetensors"),
    )
    model = ["--model", f"{factory}:make"]
    for data, size, expected in (
        ("x.npy", "64", 3),
        ("x.npy", "50", 3),  # 192 = 3 x 50 + 42: the short last batch is dropped
        ("x.safetensors", "64", 3),
        (f"{factory}:batches", "64", 12),
    ):
        source = data if ":" in data else str(tmp_path / data)
        code, out, _ = cli(
            [str(trained_pt), *model, "--data", source, "--batch-size", size, "--json"], capsys
        )
        assert json.loads(out)["dynamic"]["batches"] == expected, (data, out)
        assert code in (0, 1)
    code, out, _ = cli(
        [str(trained_pt), *model, "--data", f"{factory}:batches", "--num-batches", "5", "--json"],
        capsys,
    )
    assert json.loads(out)["dynamic"]["batches"] == 5


def test_python_m_bnkit_doctor_subprocess(trained_pt: Path, tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "bnkit", "doctor", str(trained_pt)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "healthy" in ok.stdout
    (tmp_path / "junk.pt").write_bytes(b"junk junk junk")
    bad = subprocess.run(
        [sys.executable, "-m", "bnkit", "doctor", str(tmp_path / "junk.pt")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr


def test_library_argument_errors() -> None:
    with pytest.raises(ValueError, match="nothing to check"):
        diagnose()
    with pytest.raises(ValueError, match="model="):
        diagnose(state={}, data=[torch.zeros(2, 6)])
    with pytest.raises(ValueError, match="not both"):
        diagnose(state={}, states=[{}])
    with pytest.raises(ValueError, match="no batches"):
        diagnose(mlp(), data=[])


def test_help_mentions_doctor(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["doctor", "--help"])
    out = capsys.readouterr().out
    assert "--fix" in out
    assert "Exit status: 0 healthy, 1 problems found, 2 usage or input error" in " ".join(
        out.split()
    )
