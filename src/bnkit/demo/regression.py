"""Scenario 1 (seed 002): a tiny tanh regression network whose restored model "is wrong".

The seed's question: a 2-5-3-1 tanh network with ``tf.layers.batch_normalization`` after
every dense layer (update ops attached to the train op) fits ``y = 2a + 3b + 3`` on 1000
samples, full batch, Adam 0.05, to a training-mode error near 1e-6; saved and restored, it
evaluates (inference mode) to 0.04. The answer given there, that the statistics were never
trained, does not fit that code. What happens, with numbers:

* Saving works: the restored model reproduces the saved model's evaluation-mode outputs bit
  for bit.
* Evaluation mode differs from training mode. The moving averages (decay 0.99: about the last
  100 steps) describe weights that have since moved, and Adam at a constant 0.05 never stops
  moving them; late in training it oscillates. Statistics off by a fraction of a standard
  deviation shift every output, while the training error is already ~1e-6. Reproduced in real
  TF 1.x: training-mode MSE ~2e-5 against evaluation-mode ~0.2 after 3000 steps.
* What closes the gap: exact statistics for the final weights (``bnkit.recalibrate``) close it
  completely; a lower decay narrows it; warm-up helps early in training only.

Then the two broken variants the seed documents warn about: statistics never updated
(``UPDATE_OPS`` not run) and statistics not saved (``Saver(var_list=tf.trainable_variables())``),
what ``bnkit doctor`` says about each, and the repair.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import bnkit
from bnkit.checkpoint import CheckpointError
from bnkit.demo.common import (
    BrokenCase,
    Curve,
    Diagnosis,
    ShadowStatistics,
    batch_statistics_forward,
    diagnose_checkpoint,
    diagnose_model,
    first_line,
    never_updated_copy,
    population_statistics,
    progress_range,
    quiet_load,
    regression_data,
    running_statistics,
    same_statistics,
    with_statistics,
)

__all__ = ["REGRESSION_RULES", "RegressionResult", "build_regression_model", "run_regression"]

#: The moving-average rules compared, as ``bnkit.BatchNorm`` options (2-D input in TF/Keras'
#: non-fused path feeds the biased batch variance to the moving average).
REGRESSION_RULES: dict[str, dict[str, object]] = {
    "decay 0.99 (TF default)": {"decay": 0.99, "running_var": "biased"},
    "decay 0.99 + warm-up": {"decay": 0.99, "running_var": "biased", "warmup": True},
    "decay 0.9": {"decay": 0.9, "running_var": "biased"},
}
_DEFAULT_RULE = "decay 0.99 (TF default)"


@dataclass(frozen=True)
class RegressionResult:
    """Scenario 1's numbers (all errors are mean squared errors on the 1000 samples).

    Attributes:
        samples, steps, learning_rate: the training setup (full batch, Adam).
        train_mse: the final weights in training mode (batch statistics).
        saved_eval_mse: the trained model in evaluation mode (moving statistics, decay 0.99).
        restored_eval_mse: a fresh model after ``bnkit.save`` → ``bnkit.load``, eval mode.
        restored_identical: the restored model's outputs equal the saved model's exactly.
        final_eval_mse: evaluation-mode error at the end under each moving-average rule.
        recalibrated_eval_mse: the restored model after ``bnkit.recalibrate`` on the data.
        train_curve: the training-mode loss of each step (what TF prints while training).
        eval_curves: evaluation-mode error over the steps, one curve per rule.
        lag_curves: the output layer's moving mean minus its population mean (the batch
            mean of the current weights), in population standard deviations, per rule.
        shadow_matches_model: the shadow statistics of the default rule equal the model's
            own running statistics exactly (the comparison is fair).
        healthy_checkpoint: the doctor on the saved checkpoint.
        lagging_model: the doctor, with the data, on the trained model.
        recalibrated_model: the doctor, with the data, after recalibration.
        broken: the never-updated and not-saved variants.
        checkpoints: the checkpoint files written.
    """

    samples: int
    steps: int
    learning_rate: float
    train_mse: float
    saved_eval_mse: float
    restored_eval_mse: float
    restored_identical: bool
    final_eval_mse: dict[str, float]
    recalibrated_eval_mse: float
    train_curve: Curve
    eval_curves: tuple[Curve, ...]
    lag_curves: tuple[Curve, ...]
    shadow_matches_model: bool
    healthy_checkpoint: Diagnosis
    lagging_model: Diagnosis
    recalibrated_model: Diagnosis
    broken: tuple[BrokenCase, ...]
    checkpoints: tuple[Path, ...]


def build_regression_model(seed: int = 0) -> nn.Sequential:
    """The seed's network: dense 5 → BN → tanh → dense 3 → BN → tanh → dense 1 → BN.

    Dense layers start as ``tf.layers.dense`` does (Glorot-uniform kernel, zero bias); the
    batch norms are ``bnkit.from_keras`` layers, which is what ``tf.layers.batch_normalization``
    builds (momentum/decay 0.99, epsilon 1e-3). The global random state is left untouched.

    Example:
        >>> model = build_regression_model()
        >>> model(torch.rand(8, 2)).shape
        torch.Size([8, 1])
    """
    layers: list[nn.Module] = []
    width_in = 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for width in (5, 3, 1):
            dense = nn.Linear(width_in, width)
            nn.init.xavier_uniform_(dense.weight)
            nn.init.zeros_(dense.bias)
            layers += [dense, bnkit.from_keras(width)]
            if width > 1:
                layers.append(nn.Tanh())
            width_in = width
    return nn.Sequential(*layers)


def _mse(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float(((model(x) - y) ** 2).mean())


def _recalibrated(model: nn.Module, x: Tensor) -> nn.Module:
    bnkit.recalibrate(model, [x], progress=False)
    return model.eval()


def run_regression(
    out_dir: Path,
    *,
    steps: int = 3000,
    log_every: int = 10,
    seed: int = 0,
    progress: bool = False,
) -> RegressionResult:
    """Train the seed-002 network, save, restore, evaluate; then break it two ways.

    Args:
        out_dir: where the checkpoints go (``checkpoints/regression-*.safetensors``).
        steps: full-batch Adam steps (the seed ran 3000).
        log_every: measure the curves every this many steps.
        seed: seeds the data and the initialization.
        progress: show a progress bar on stderr.

    Returns:
        A :class:`RegressionResult`.
    """
    x, y = regression_data(1000, seed=seed)
    model = build_regression_model(seed)
    shadows = ShadowStatistics(model, REGRESSION_RULES)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    output_layer = [n for n, m in model.named_modules() if isinstance(m, bnkit.BatchNorm)][-1]

    logged: list[int] = []
    train_values: list[float] = []
    eval_values: dict[str, list[float]] = {rule: [] for rule in REGRESSION_RULES}
    lag_values: dict[str, list[float]] = {rule: [] for rule in REGRESSION_RULES}
    try:
        for step in progress_range(steps, "1 regression", progress):
            model.train()
            optimizer.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            optimizer.step()
            done = step + 1
            if done % log_every and done not in (1, steps):
                continue
            logged.append(done)
            train_values.append(float(loss.detach()))
            model.eval()
            pop_mean, pop_var = population_statistics(model, [x])[output_layer]
            for rule in REGRESSION_RULES:
                stats = shadows.statistics(rule)
                with with_statistics(model, stats):
                    eval_values[rule].append(_mse(model, x, y))
                mean = stats[output_layer][0]
                lag = (mean - pop_mean).abs() / torch.sqrt(pop_var + 1e-3)
                lag_values[rule].append(float(lag.max()))
    finally:
        shadows.close()

    shadow_matches = same_statistics(shadows.statistics(_DEFAULT_RULE), running_statistics(model))

    # Training mode (the batch statistics of the final weights) vs evaluation mode.
    train_mse = float(((batch_statistics_forward(model, x) - y) ** 2).mean())
    model.eval()
    with torch.no_grad():
        saved_out = model(x)
    saved_eval = float(((saved_out - y) ** 2).mean())

    # Save with bnkit.save, restore into a freshly built (differently initialized) model.
    ckpt_dir = out_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    trained_path = ckpt_dir / "regression-trained.safetensors"
    bnkit.save(model, trained_path)
    restored = build_regression_model(seed + 1)
    bnkit.load(restored, trained_path)
    restored.eval()
    with torch.no_grad():
        restored_out = restored(x)
    restored_eval = float(((restored_out - y) ** 2).mean())
    identical = torch.equal(saved_out, restored_out)

    healthy = diagnose_checkpoint(build_regression_model(seed), trained_path)
    lagging = diagnose_model(model, [x], target="trained model (decay 0.99), with the data")
    recalibrated_eval = _mse(_recalibrated(restored, x), x, y)
    recalibrated_doc = diagnose_model(restored, [x], target="after bnkit.recalibrate")

    broken = (
        _never_updated(model, x, y, ckpt_dir, seed),
        _not_saved(model, x, y, ckpt_dir, seed),
    )
    return RegressionResult(
        samples=len(x),
        steps=steps,
        learning_rate=0.05,
        train_mse=train_mse,
        saved_eval_mse=saved_eval,
        restored_eval_mse=restored_eval,
        restored_identical=identical,
        final_eval_mse={rule: values[-1] for rule, values in eval_values.items()},
        recalibrated_eval_mse=recalibrated_eval,
        train_curve=Curve("training mode (batch statistics)", tuple(logged), tuple(train_values)),
        eval_curves=tuple(
            Curve(rule, tuple(logged), tuple(values)) for rule, values in eval_values.items()
        ),
        lag_curves=tuple(
            Curve(rule, tuple(logged), tuple(values)) for rule, values in lag_values.items()
        ),
        shadow_matches_model=shadow_matches,
        healthy_checkpoint=healthy,
        lagging_model=lagging,
        recalibrated_model=recalibrated_doc,
        broken=broken,
        checkpoints=(
            trained_path,
            ckpt_dir / "regression-never-updated.safetensors",
            ckpt_dir / "regression-params-only.safetensors",
        ),
    )


def _never_updated(model: nn.Module, x: Tensor, y: Tensor, ckpt_dir: Path, seed: int) -> BrokenCase:
    """TF's UPDATE_OPS never ran: trained weights, initial statistics."""
    broken = never_updated_copy(model).eval()
    path = ckpt_dir / "regression-never-updated.safetensors"
    bnkit.save(broken, path)
    notes: list[str] = []
    try:
        bnkit.load(build_regression_model(seed), path)
    except CheckpointError as err:
        notes.append("bnkit.load refused it: " + first_line(str(err)))
    repaired = build_regression_model(seed)
    _, warned = quiet_load(repaired, path)
    notes += ["bnkit.load(strict=False) warned: " + first_line(w) for w in warned]
    return BrokenCase(
        name="statistics never updated",
        setup="UPDATE_OPS never ran: trained weights, moving mean 0 / variance 1",
        value=_mse(broken, x, y),
        answer="load(strict=False) + recalibrate",
        fixed_value=_mse(_recalibrated(repaired, x), x, y),
        prevented_by="bnkit layers update their statistics in the forward pass: no update ops",
        diagnosis=diagnose_checkpoint(build_regression_model(seed), path),
        notes=tuple(notes),
    )


def _not_saved(model: nn.Module, x: Tensor, y: Tensor, ckpt_dir: Path, seed: int) -> BrokenCase:
    """Saver(var_list=trainable_variables()): the checkpoint holds the parameters only."""
    path = ckpt_dir / "regression-params-only.safetensors"
    bnkit.save({k: v.detach() for k, v in model.named_parameters()}, path)
    notes: list[str] = []
    try:
        bnkit.load(build_regression_model(seed), path)
    except CheckpointError as err:
        notes.append("bnkit.load refused it: " + first_line(str(err)))
    restored = build_regression_model(seed + 1)
    _, warned = quiet_load(restored, path)
    notes += ["bnkit.load(strict=False) warned: " + first_line(w) for w in warned]
    value = _mse(restored.eval(), x, y)
    return BrokenCase(
        name="statistics not saved",
        setup="checkpoint of the parameters only, loaded with strict=False",
        value=value,
        answer="load(strict=False) + recalibrate",
        fixed_value=_mse(_recalibrated(restored, x), x, y),
        prevented_by="bnkit.save(model, path) saves every buffer; bnkit.load refuses such files",
        diagnosis=diagnose_checkpoint(build_regression_model(seed), path),
        notes=tuple(notes),
    )
