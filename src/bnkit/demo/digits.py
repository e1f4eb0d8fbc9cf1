"""Scenario 2 (seed 000, TF issue 7469): a decay too high for the number of steps.

An MLP with a 1024-unit hidden layer and ``slim.batch_norm`` with its defaults (decay 0.999,
epsilon 1e-3, no scale) learns scikit-learn's 8x8 digits with SGD in a few hundred steps.
After ``t`` steps its moving averages still hold ``0.999**t`` of their initial values (mean 0,
variance 1): 90% after 100 steps, 74% after 300. Training accuracy looks fine; held-out
accuracy in inference mode is far lower, and "setting is_training=True at test time makes it
better" (the seed's observation). The seed's remedies, measured on one training run:

* a lower decay (0.9), as slim's docstring recommends;
* warm-up: TF's ``num_updates`` rule ``decay_t = min(decay, (1 + t) / (10 + t))``
  (``bnkit.BatchNorm(warmup=True)``);
* zero-debias: TF's ``zero_debias_moving_mean=True`` (the mean only) and bnkit's
  ``zero_debias="both"`` (mean and variance);
* and after the fact, ``bnkit.recalibrate(model, data)``: exact population statistics for the
  final weights, whatever the decay was.

The weights of a run do not depend on the moving-average rule (training mode normalizes with
batch statistics), so the demo trains once and lets each rule average the same layer inputs
(:class:`bnkit.demo.common.ShadowStatistics`); the rules differ in their statistics only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import bnkit
from bnkit.demo.common import (
    Curve,
    Diagnosis,
    ShadowStatistics,
    batch_statistics_forward,
    diagnose_model,
    load_digits_data,
    minibatches,
    population_statistics,
    progress_range,
    running_statistics,
    same_statistics,
    with_statistics,
)

__all__ = [
    "DIGITS_RULES",
    "DigitsResult",
    "StatisticsTrace",
    "build_digits_mlp",
    "run_digits",
]

#: The moving-average rules compared, as ``bnkit.BatchNorm`` options. slim's batch norm on a
#: 2-D input takes its fused path, which feeds the unbiased (Bessel-corrected) batch variance.
DIGITS_RULES: dict[str, dict[str, object]] = {
    "decay 0.999 (slim default)": {"decay": 0.999, "running_var": "unbiased"},
    "decay 0.9": {"decay": 0.9, "running_var": "unbiased"},
    "decay 0.999 + warm-up": {"decay": 0.999, "running_var": "unbiased", "warmup": True},
    "decay 0.999 + zero-debias mean (slim)": {
        "decay": 0.999,
        "running_var": "unbiased",
        "zero_debias": "mean",
    },
    "decay 0.999 + zero-debias mean and variance": {
        "decay": 0.999,
        "running_var": "unbiased",
        "zero_debias": "both",
    },
}
_DEFAULT_RULE = "decay 0.999 (slim default)"
_LAYER = "1"  # the batch-norm layer's name in the Sequential
_EPS = 1e-3  # slim's epsilon


@dataclass(frozen=True)
class StatisticsTrace:
    """One hidden unit's moving statistics against its population statistics over steps.

    Attributes:
        channel: the hidden unit shown (the one whose population mean ends farthest from
            the initial value 0, in population standard deviations).
        population_mean, population_var: the exact statistics of the unit's input over the
            training set for the weights at each logged step.
        mean, var: the moving statistics under each rule (same labels as the rules).
        mean_error: per rule, ``mean_c |moving mean - population mean| / population std``
            over all hidden units.
        std_error: per rule, ``mean_c |moving std / population std - 1|`` over all hidden
            units (std = ``sqrt(var + eps)``, what the layer divides by).
    """

    channel: int
    population_mean: Curve
    population_var: Curve
    mean: tuple[Curve, ...]
    var: tuple[Curve, ...]
    mean_error: tuple[Curve, ...]
    std_error: tuple[Curve, ...]


@dataclass(frozen=True)
class DigitsResult:
    """Scenario 2's numbers (accuracies are fractions in [0, 1]).

    Attributes:
        train_samples, test_samples, steps, batch_size, learning_rate, hidden: the setup.
        early_step: the step at which "early" accuracies are read.
        train_accuracy: training-mode accuracy on the training batches since the last log.
        test_accuracy: held-out accuracy in inference mode, one curve per rule.
        population_accuracy: held-out accuracy with the exact population statistics of the
            weights at each logged step (what the weights can do).
        test_accuracy_batch_statistics: the final held-out accuracy in training mode (the
            test set's own batch statistics; TF's ``is_training=True`` at test time).
        recalibrated_accuracy: the final model (decay 0.999) after ``bnkit.recalibrate``.
        statistics: the moving statistics against the population statistics.
        shadow_matches_model: the default rule's shadow statistics equal the model's own.
        before_recalibration, after_recalibration: the doctor, with the training data.
    """

    train_samples: int
    test_samples: int
    steps: int
    batch_size: int
    learning_rate: float
    hidden: int
    early_step: int
    train_accuracy: Curve
    test_accuracy: tuple[Curve, ...]
    population_accuracy: Curve
    test_accuracy_batch_statistics: float
    recalibrated_accuracy: float
    statistics: StatisticsTrace
    shadow_matches_model: bool
    before_recalibration: Diagnosis
    after_recalibration: Diagnosis

    def accuracy(self, rule: str, step: int | None = None) -> float:
        """Held-out inference-mode accuracy under ``rule`` at ``step`` (default: the end)."""
        curve = next(c for c in self.test_accuracy if c.label == rule)
        return curve.last if step is None else curve.at(step)


def build_digits_mlp(seed: int = 0, *, hidden: int = 1024) -> nn.Sequential:
    """64 pixels → dense ``hidden`` → ``slim.batch_norm`` (defaults) → ReLU → dense 10.

    The batch norm is ``bnkit.from_slim(hidden)``: decay 0.999, epsilon 1e-3, ``center=True``,
    ``scale=False``. The global random state is left untouched.

    Example:
        >>> build_digits_mlp(hidden=8)(torch.rand(4, 64)).shape
        torch.Size([4, 10])
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(64, hidden),
            bnkit.from_slim(hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )


_cross_entropy = nn.CrossEntropyLoss()


def _log_now(done: int, steps: int, log_every: int, early_step: int) -> bool:
    """Measure every ``log_every`` steps, every 10 steps up to twice ``early_step`` (the
    plots use a log-scale step axis), and after the last step."""
    return done == steps or done % log_every == 0 or (done <= 2 * early_step and done % 10 == 0)


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def run_digits(
    *,
    steps: int = 3000,
    batch_size: int = 32,
    log_every: int = 25,
    early_step: int = 100,
    hidden: int = 1024,
    seed: int = 0,
    progress: bool = False,
) -> DigitsResult:
    """Train the MLP once with SGD and measure every moving-average rule along the way.

    Args:
        steps: SGD steps (batches of ``batch_size``; a new shuffle every epoch).
        batch_size: samples per step.
        log_every: measure the curves every this many steps.
        early_step: the step reported as "early" (rounded to a logged step).
        hidden: width of the hidden layer.
        seed: seeds the split, the initialization and the batch order.
        progress: show a progress bar on stderr.

    Returns:
        A :class:`DigitsResult`.
    """
    data = load_digits_data(seed=seed)
    model = build_digits_mlp(seed, hidden=hidden)
    shadows = ShadowStatistics(model, DIGITS_RULES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    batches: Iterator[Tensor] = iter(())

    logged: list[int] = []
    train_acc: list[float] = []
    test_acc: dict[str, list[float]] = {rule: [] for rule in DIGITS_RULES}
    pop_acc: list[float] = []
    pop_stats: list[tuple[Tensor, Tensor]] = []
    rule_stats: dict[str, list[tuple[Tensor, Tensor]]] = {rule: [] for rule in DIGITS_RULES}
    correct = seen = 0
    try:
        for step in progress_range(steps, "2 digits MLP", progress):
            idx = next(batches, None)
            if idx is None:
                batches = minibatches(len(data.y_train), batch_size, generator)
                idx = next(batches)
            model.train()
            optimizer.zero_grad()
            logits = model(data.x_train[idx])
            loss = _cross_entropy(logits, data.y_train[idx])
            loss.backward()
            optimizer.step()
            correct += int((logits.argmax(1) == data.y_train[idx]).sum())
            seen += len(idx)
            done = step + 1
            if not _log_now(done, steps, log_every, early_step):
                continue
            logged.append(done)
            train_acc.append(correct / seen)
            correct = seen = 0
            model.eval()
            population = population_statistics(model, [data.x_train])
            pop_stats.append(population[_LAYER])
            with with_statistics(model, population):
                pop_acc.append(_accuracy(model, data.x_test, data.y_test))
            for rule in DIGITS_RULES:
                stats = shadows.statistics(rule)
                rule_stats[rule].append(stats[_LAYER])
                with with_statistics(model, stats):
                    test_acc[rule].append(_accuracy(model, data.x_test, data.y_test))
    finally:
        shadows.close()

    shadow_matches = same_statistics(shadows.statistics(_DEFAULT_RULE), running_statistics(model))
    logits = batch_statistics_forward(model, data.x_test)
    batch_acc = float((logits.argmax(1) == data.y_test).float().mean())
    before = diagnose_model(model, [data.x_train], target="final model (decay 0.999)")
    bnkit.recalibrate(model, [data.x_train], progress=False)
    model.eval()
    recalibrated = _accuracy(model, data.x_test, data.y_test)
    after = diagnose_model(model, [data.x_train], target="after bnkit.recalibrate")

    steps_t = tuple(logged)
    return DigitsResult(
        train_samples=len(data.y_train),
        test_samples=len(data.y_test),
        steps=steps,
        batch_size=batch_size,
        learning_rate=0.1,
        hidden=hidden,
        early_step=early_step,
        train_accuracy=Curve("training mode, training batches", steps_t, tuple(train_acc)),
        test_accuracy=tuple(
            Curve(rule, steps_t, tuple(values)) for rule, values in test_acc.items()
        ),
        population_accuracy=Curve("population statistics", steps_t, tuple(pop_acc)),
        test_accuracy_batch_statistics=batch_acc,
        recalibrated_accuracy=recalibrated,
        statistics=_trace(steps_t, pop_stats, rule_stats, _EPS),
        shadow_matches_model=shadow_matches,
        before_recalibration=before,
        after_recalibration=after,
    )


def _trace(
    steps: tuple[int, ...],
    population: list[tuple[Tensor, Tensor]],
    rules: dict[str, list[tuple[Tensor, Tensor]]],
    eps: float,
) -> StatisticsTrace:
    final_mean, final_var = population[-1]
    channel = int((final_mean.abs() / torch.sqrt(final_var + eps)).argmax())

    def curve(label: str, values: list[float]) -> Curve:
        return Curve(label, steps, tuple(values))

    mean_errors, std_errors = [], []
    for rule, stats in rules.items():
        pairs = list(zip(stats, population, strict=True))
        mean_errors.append(
            curve(
                rule,
                [
                    float(((m - pm).abs() / torch.sqrt(pv + eps)).mean())
                    for (m, _), (pm, pv) in pairs
                ],
            )
        )
        std_errors.append(
            curve(
                rule,
                [
                    float((torch.sqrt((v + eps) / (pv + eps)) - 1).abs().mean())
                    for (_, v), (_, pv) in pairs
                ],
            )
        )
    return StatisticsTrace(
        channel=channel,
        population_mean=curve("population", [float(m[channel]) for m, _ in population]),
        population_var=curve("population", [float(v[channel]) for _, v in population]),
        mean=tuple(curve(r, [float(m[channel]) for m, _ in s]) for r, s in rules.items()),
        var=tuple(curve(r, [float(v[channel]) for _, v in s]) for r, s in rules.items()),
        mean_error=tuple(mean_errors),
        std_error=tuple(std_errors),
    )
