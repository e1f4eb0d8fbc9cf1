"""bnkit layers under torch.compile and torch.export match eager execution.

Every option that needs no data-dependent Python compiles with ``fullgraph=True`` (one graph,
no break) in training and in evaluation, and the compiled layer computes what the eager one
does: outputs, input and parameter gradients, and every buffer after several steps. Most
cases use ``backend="eager"`` (Dynamo's capture, run by PyTorch's eager kernels: what bnkit's
code controls) or ``"aot_eager"`` (adds AOTAutograd's functionalization of the in-place buffer
updates and its joint forward/backward graph); the default configuration also runs through
inductor. What does not compile as one graph, and why, is written down in the tests at the end
of the compile section (and in the user guide).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import bnkit
from bnkit import functional as bnf
from bnkit.policies import BatchNormWarning, calibrating

# Float32 outputs and gradients of compiled and eager code differ by a few ulp where the two
# take different kernels (e.g. the statistics of the compiled path vs PyTorch's fused kernel).
# Gradients through batch statistics cancel (g - mean(g) - x̂·mean(g·x̂)): absolute tolerance.
TIGHT = {"rtol": 1e-5, "atol": 1e-6}
GRAD = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles its own layers: start from an empty cache (Dynamo's per-code-object
    recompile limit would otherwise be reached by the many BatchNorm instances)."""
    torch._dynamo.reset()
    bnkit.set_policy()
    yield
    bnkit.set_policy()


def _data(shape: tuple[int, ...], step: int) -> Tensor:
    """Deterministic input for ``step``: shifted and scaled so running statistics move."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(shape, generator=g) * (1.0 + 0.5 * step) + 0.25 * step


def _randomize(model: nn.Module) -> nn.Module:
    """Affine parameters away from 1 and 0, so a wrong γ/β gradient cannot hide."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def _upstream(shape: tuple[int, ...], step: int) -> Tensor:
    """The gradient flowing into the output (not sum(): its input gradient is ~0 for BN)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(2000 + step))


def _same(
    actual: Tensor | None,
    expected: Tensor | None,
    exact: bool,
    what: str,
    tolerance: dict[str, float] = TIGHT,
) -> None:
    assert (actual is None) == (expected is None), what
    if actual is None or expected is None:
        return
    if exact:
        assert torch.equal(actual, expected), what
    else:
        torch.testing.assert_close(actual, expected, **tolerance, msg=lambda m: f"{what}: {m}")


def _same_state(model: nn.Module, eager: nn.Module, exact: bool, when: str) -> None:
    """Every parameter and buffer (the state dict, so lazily created buffers count too)."""
    got, want = model.state_dict(), eager.state_dict()
    assert sorted(got) == sorted(want), when
    for key, value in want.items():
        _same(got[key], value, exact or not value.is_floating_point(), f"{key} {when}")


def _adjustment(shape: torch.Size) -> tuple[Tensor, float]:
    """Keras-style adjustment: a per-channel scale (channels on axis 1 here) and a shift."""
    return torch.linspace(0.5, 1.5, shape[1]), 0.25


def _frozen_bn(channels: int = 3) -> nn.Module:
    layer = bnkit.BatchNorm2d(channels)
    with torch.no_grad():
        layer.running_mean.copy_(torch.linspace(-0.5, 0.5, channels))
        layer.running_var.copy_(torch.linspace(0.5, 2.0, channels))
    layer.frozen = True
    return layer


@dataclass(frozen=True)
class Case:
    make: Callable[[], nn.Module]
    shape: tuple[int, ...]
    # keyword arguments of the call (sample weights, masks), from the step number
    call: Callable[[int], dict[str, Any]] = field(default=lambda step: {})
    backend: str = "eager"
    # True where eager and compiled code run the same kernels (bit-identical)
    exact: bool = False


def _sample_weights(n: int) -> Callable[[int], dict[str, Any]]:
    def call(step: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(step)
        return {"weights": torch.rand(n, generator=g) + 0.1}

    return call


def _mask(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    mask = torch.rand(4, 5, generator=g) > 0.3
    mask[:, 0] = True  # every sample keeps a position
    return {"mask": mask}


CASES = {
    "default": Case(lambda: bnkit.BatchNorm2d(3), (4, 3, 2, 3)),
    "momentum_none": Case(
        lambda: bnkit.BatchNorm2d(3, momentum=None), (4, 3, 2, 3), backend="aot_eager"
    ),
    "decay_biased": Case(lambda: bnkit.BatchNorm(3, decay=0.9, running_var="biased"), (4, 3, 5)),
    "warmup": Case(lambda: bnkit.BatchNorm(3, warmup=True), (4, 3, 5)),
    "zero_debias_mean": Case(lambda: bnkit.BatchNorm(3, zero_debias="mean"), (4, 3, 5)),
    "zero_debias_both": Case(
        lambda: bnkit.BatchNorm(3, decay=0.9, zero_debias="both", warmup=True),
        (4, 3, 5),
        backend="aot_eager",
    ),
    "ghost_contiguous": Case(lambda: bnkit.BatchNorm2d(3, virtual_batch_size=2), (4, 3, 2, 2)),
    "ghost_strided": Case(
        lambda: bnkit.BatchNorm(3, virtual_batch_size=2, ghost_layout="strided"), (6, 3, 2)
    ),
    "ghost_2d": Case(lambda: bnkit.BatchNorm1d(3, virtual_batch_size=3), (6, 3)),
    "sample_weights": Case(lambda: bnkit.BatchNorm2d(3), (4, 3, 2, 2), call=_sample_weights(4)),
    "weights_ghosts": Case(
        lambda: bnkit.BatchNorm(3, virtual_batch_size=2),
        (4, 3, 3),
        call=_sample_weights(4),
        backend="aot_eager",
    ),
    "adjustment": Case(lambda: bnkit.BatchNorm(3, adjustment=_adjustment), (4, 3, 5)),
    "activation": Case(lambda: bnkit.BatchNorm2d(3, activation="silu"), (4, 3, 2, 2)),
    "axis_last": Case(lambda: bnkit.BatchNorm(3, axis=-1), (4, 5, 3)),
    "no_running_stats": Case(
        lambda: bnkit.BatchNorm(3, track_running_stats=False), (4, 3, 5), exact=True
    ),
    "bn1d": Case(lambda: bnkit.BatchNorm1d(3), (4, 3)),
    "bn3d": Case(lambda: bnkit.BatchNorm3d(3), (4, 3, 2, 1, 2)),
    "frozen": Case(_frozen_bn, (4, 3, 2, 2), exact=True),
    "slim": Case(lambda: bnkit.from_slim(3), (4, 2, 2, 3)),
    "slim_weights_zero_debias": Case(
        lambda: bnkit.from_slim(3, scale=True, zero_debias_moving_mean=True),
        (4, 2, 2, 3),
        call=_sample_weights(4),
    ),
    "keras": Case(lambda: bnkit.from_keras(3), (4, 2, 2, 3)),
    "keras_mask": Case(lambda: bnkit.from_keras(3), (4, 5, 3), call=_mask),
    "keras_ghosts": Case(lambda: bnkit.from_keras(3, virtual_batch_size=2), (4, 5, 3)),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fullgraph_compile_matches_eager_in_training_and_eval(case: Case) -> None:
    eager = _randomize(case.make())
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend=case.backend, fullgraph=True)
    for step in range(3):  # later steps run against updated running statistics
        x = _data(case.shape, step)
        x_e, x_c = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_e, y_c = eager(x_e, **case.call(step)), compiled(x_c, **case.call(step))
        _same(y_c, y_e, case.exact, f"output, step {step}")
        grad = _upstream(y_e.shape, step)
        y_e.backward(grad)
        y_c.backward(grad)
        _same(x_c.grad, x_e.grad, case.exact, f"input gradient, step {step}", GRAD)
        for (name, p_c), p_e in zip(model.named_parameters(), eager.parameters(), strict=True):
            _same(p_c.grad, p_e.grad, case.exact, f"{name}.grad, step {step}", GRAD)
        _same_state(model, eager, case.exact, f"after step {step}")
    eager.eval()
    model.eval()  # a mode switch is a guard: the same compiled module recompiles for eval
    x = _data(case.shape, 3)
    # Evaluation runs PyTorch's inference kernel in both, on statistics that agree to ulps.
    _same(compiled(x), eager(x), case.exact, "eval output")


@pytest.mark.slow
def test_inductor_default_configuration_training_and_eval() -> None:
    torch.manual_seed(0)
    eager = _randomize(nn.Sequential(nn.Conv2d(3, 4, 1), bnkit.BatchNorm2d(4), nn.ReLU()))
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True)  # inductor, the default backend
    for step in range(2):
        x = _data((4, 3, 3, 3), step)
        y_e, y_c = eager(x), compiled(x)
        torch.testing.assert_close(y_c, y_e, **TIGHT)
        grad = _upstream(y_e.shape, step)
        y_e.backward(grad)
        y_c.backward(grad)
        for (name, p_c), p_e in zip(model.named_parameters(), eager.parameters(), strict=True):
            _same(p_c.grad, p_e.grad, False, f"{name}.grad, step {step}", GRAD)
        _same_state(model, eager, False, f"after step {step}")
    eager.eval()
    model.eval()
    x = _data((4, 3, 3, 3), 2)
    torch.testing.assert_close(compiled(x), eager(x), **TIGHT)


@pytest.mark.slow
def test_inductor_renorm_gradients_match_eager() -> None:
    """The case pytorch/pytorch#197039 gets wrong when r and d are traced ops (see below)."""
    torch.manual_seed(1)
    layer = bnkit.BatchNorm(3, renorm=True, renorm_clipping={"rmin": 0.8, "rmax": 1.2})
    eager = _randomize(nn.Sequential(nn.Conv1d(2, 3, 1), layer))
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True)
    for step in range(3):
        x = _data((4, 2, 5), step)
        y_e, y_c = eager(x), compiled(x)
        torch.testing.assert_close(y_c, y_e, **TIGHT)
        grad = _upstream(y_e.shape, step)
        y_e.backward(grad)
        y_c.backward(grad)
        for (name, p_c), p_e in zip(model.named_parameters(), eager.parameters(), strict=True):
            _same(p_c.grad, p_e.grad, False, f"{name}.grad, step {step}", GRAD)
        _same_state(model, eager, False, f"after step {step}")


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [{}, {"momentum": None}, {"virtual_batch_size": 2}, {"weights": True}],
    ids=["default", "momentum_none", "ghosts", "sample_weights"],
)
def test_changing_batch_size_recompiles_with_dynamic_shapes(options: dict[str, Any]) -> None:
    """A smaller last batch: Dynamo recompiles with a symbolic batch size, still one graph."""
    options = dict(options)
    weighted = options.pop("weights", False)
    eager = _randomize(bnkit.BatchNorm(3, **options))
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for step, n in enumerate((4, 6, 8)):
        x = _data((n, 3, 2), step)
        kwargs = _sample_weights(n)(step) if weighted else {}
        torch.testing.assert_close(compiled(x, **kwargs), eager(x, **kwargs), **TIGHT)
        _same_state(model, eager, False, f"after batch of {n}")


# ------------------------------------------------------------- non-finite guard


def _nan_batch(step: int) -> Tensor:
    x = _data((4, 3, 2, 2), step)
    x[1, 2, 0, 1] = float("nan")
    return x


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_nonfinite_batch_under_compile_leaves_running_statistics_unchanged(backend: str) -> None:
    eager = _randomize(bnkit.BatchNorm2d(3))
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for bn in (model, eager):
        bn(_data((4, 3, 2, 2), 0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y = compiled(_nan_batch(1))
    assert y[:, 2].isnan().all()  # the batch's own output is what it is
    assert y[:, :2].isfinite().all()
    after = model.state_dict()
    assert sorted(after) == sorted(before)  # compiled: no num_skipped_updates counter
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    with pytest.warns(BatchNormWarning, match="non-finite"):
        eager(_nan_batch(1))
    # Both skipped the update; training goes on identically.
    x = _data((4, 3, 2, 2), 2)
    torch.testing.assert_close(compiled(x), eager(x), **TIGHT)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, eager.state_dict()[key], **TIGHT, msg=key)


def test_nonfinite_policy_is_read_when_tracing_and_guarded() -> None:
    """Policies come from context variables in eager code; compiled code reads a mirror that
    Dynamo guards on, so entering a ``bnkit.policy`` block recompiles instead of going stale."""
    layer = bnkit.BatchNorm2d(3)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    compiled(_nan_batch(0))
    assert layer.running_mean.isfinite().all()  # default "skip"
    with bnkit.policy(nonfinite="update"):
        compiled(_nan_batch(1))
    assert layer.running_mean[2].isnan()  # "update": the NaN is let in, as PyTorch does
    layer.reset_running_stats()
    compiled(_nan_batch(2))
    assert layer.running_mean.isfinite().all()  # outside the block: "skip" again
    bnkit.set_policy(nonfinite="update")  # the global default is guarded
    compiled(_nan_batch(3))
    assert layer.running_mean[2].isnan()
    bnkit.set_policy()
    layer.reset_running_stats()
    compiled(_nan_batch(4))
    assert layer.running_mean.isfinite().all()
    layer.policy = {"nonfinite": "update"}  # and so is the layer's own policy
    compiled(_nan_batch(5))
    assert layer.running_mean[2].isnan()


def test_nonfinite_policy_raise_is_an_in_graph_assertion_under_compile() -> None:
    layer = bnkit.BatchNorm2d(3, policy={"nonfinite": "raise"})
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    compiled(_data((4, 3, 2, 2), 0))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match="non-finite"):
        compiled(_nan_batch(1))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_calibrating_without_grad_compiles_as_one_graph() -> None:
    eager = bnkit.BatchNorm2d(3)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad(), calibrating():
        for step in range(2):
            x = _data((4, 3, 2, 2), step)
            torch.testing.assert_close(compiled(x), eager(x), **TIGHT)
    _same_state(model, eager, False, "after calibration")


# ------------------------------------------- what does not compile as one graph


# Dynamo itself, resuming a frame after a graph break with a non-leaf tensor, reads its .grad
# and PyTorch warns about that (a warning in the compiler, not about the user's code).
_RESUME_CHATTER = pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning"
)


def _break_reasons(module: nn.Module, *args: Any) -> list[str]:
    return [b.reason for b in torch._dynamo.explain(module)(*args).break_reasons]


@_RESUME_CHATTER
def test_renorm_compiles_as_one_graph() -> None:
    """Under compile renorm's r and d come from an opaque custom op: AOTAutograd's
    partitioner would otherwise recompute them in the backward from the renorm buffers, after
    the forward has updated them in place (pytorch/pytorch#197039: wrong γ gradients with
    inductor, an error with aot_eager_decomp_partition)."""
    layer = bnkit.BatchNorm(3, renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 0.5})
    assert _break_reasons(layer, _data((4, 3, 5), 0)) == []
    assert _break_reasons(layer.eval(), _data((4, 3, 5), 0)) == []


@pytest.mark.slow
@_RESUME_CHATTER
def test_renorm_compiles_with_the_partitioner_and_matches_eager() -> None:
    """aot_eager_decomp_partition: the min-cut partitioner of inductor, without its codegen."""
    eager = _randomize(
        nn.Sequential(
            nn.Conv1d(2, 3, 1),
            bnkit.BatchNorm(3, renorm=True, renorm_clipping={"rmin": 0.8, "rmax": 1.2}),
        )
    )
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager_decomp_partition")
    for step in range(3):
        x = _data((4, 2, 5), step)
        y_e, y_c = eager(x), compiled(x)
        torch.testing.assert_close(y_c, y_e, **TIGHT)
        grad = _upstream(y_e.shape, step)
        y_e.backward(grad)
        y_c.backward(grad)
        for (name, p_c), p_e in zip(model.named_parameters(), eager.parameters(), strict=True):
            _same(p_c.grad, p_e.grad, False, f"{name}.grad, step {step}", GRAD)
        _same_state(model, eager, False, f"after step {step}")


@_RESUME_CHATTER
def test_renorm_statistics_that_require_grad_compile_and_get_none() -> None:
    """r and d carry no gradient: renorm statistics passed with requires_grad (a functional
    user's own tensors) compile and get no gradient, as in eager mode."""
    renorm_mean = torch.zeros(3, requires_grad=True)
    renorm_stddev = torch.ones(3, requires_grad=True)

    def step(x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = bnf.batch_norm(
            x,
            training=True,
            renorm_mean=renorm_mean,
            renorm_stddev=renorm_stddev,
            renorm_clipping={"rmax": 1.5},
        )
        return y

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x_e = _data((4, 3, 5), 0).requires_grad_()
    x_c = x_e.detach().clone().requires_grad_()
    y_e, y_c = step(x_e), compiled(x_c)
    torch.testing.assert_close(y_c, y_e, **TIGHT)
    y_e.sum().backward()
    y_c.sum().backward()
    torch.testing.assert_close(x_c.grad, x_e.grad, **TIGHT)
    assert renorm_mean.grad is None
    assert renorm_stddev.grad is None


def test_no_grad_training_warning_is_python_and_breaks_the_graph() -> None:
    """The forgotten-``model.eval()`` warning (and ``"raise"``) is Python: a compiled
    training-mode call without gradients is one graph only with the policy ``"ignore"`` or
    inside ``calibrating()``."""
    layer = bnkit.BatchNorm2d(3)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = _data((4, 3, 2, 2), 0)
    with torch.no_grad(), pytest.raises(torch._dynamo.exc.Unsupported, match="warn"):
        compiled(x)
    with torch.no_grad(), bnkit.policy(no_grad_training="ignore"):
        compiled(x)
    assert int(layer.num_batches_tracked) == 1


def test_input_errors_reach_the_caller_of_a_compiled_layer() -> None:
    """bnkit's errors are raised while tracing; without fullgraph they surface unchanged (with
    fullgraph=True Dynamo wraps them: ``Unsupported: Observed exception``, message inside)."""
    compiled = torch.compile(bnkit.BatchNorm2d(3), backend="eager")
    with pytest.raises(ValueError, match="expected 3 channels"):
        compiled(_data((4, 5, 2, 2), 0))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        compiled(_data((1, 3, 1, 1), 0))


# ------------------------------------------------------------------ torch.export


def _conv(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 1), norm)


def _linear(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), norm)


# model, input shape: (N, C, H, W) into a convolution or (N, L, C) into a Linear layer
EXPORT_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "default": (lambda: _conv(bnkit.BatchNorm2d(4)), (4, 3, 2, 2)),
    "activation": (lambda: _conv(bnkit.BatchNorm2d(4, activation="gelu")), (4, 3, 2, 2)),
    "axis_last": (lambda: _linear(bnkit.BatchNorm(4, axis=-1)), (4, 5, 3)),
    "slim": (lambda: _conv(bnkit.from_slim(4, data_format="NCHW", scale=True)), (4, 3, 2, 2)),
    "keras": (lambda: _linear(bnkit.from_keras(4)), (4, 5, 3)),
    "renorm_ghosts": (
        lambda: _conv(bnkit.BatchNorm2d(4, renorm=True, virtual_batch_size=2)),
        (4, 3, 2, 2),
    ),
}


def _trained(make: Callable[[], nn.Module], shape: tuple[int, ...]) -> nn.Module:
    """A model (in eval mode) whose running statistics moved away from their initial values."""
    model = _randomize(make())
    for step in range(3):
        model(_data(shape, step))
    return model.eval()


@pytest.mark.parametrize(("make", "shape"), EXPORT_MODELS.values(), ids=EXPORT_MODELS.keys())
def test_export_in_eval_mode_matches_eager(
    make: Callable[[], nn.Module], shape: tuple[int, ...]
) -> None:
    model = _trained(make, shape)
    exported = torch.export.export(model, (_data(shape, 0),))
    x = _data(shape, 1)
    assert torch.equal(exported.module()(x), model(x))


def test_export_of_a_frozen_layer_in_training_mode_uses_running_statistics() -> None:
    model = _randomize(_conv(_frozen_bn(4))).train()
    exported = torch.export.export(model, (_data((4, 3, 2, 2), 0),))
    x = _data((4, 3, 2, 2), 1)
    assert torch.equal(exported.module()(x), model.eval()(x))


def test_export_eval_with_a_dynamic_batch_dimension() -> None:
    make, shape = EXPORT_MODELS["default"]
    model = _trained(make, shape)
    x = _data(shape, 0)
    batch = torch.export.Dim("batch", min=1)
    exported = torch.export.export(model, (x,), dynamic_shapes={"input": {0: batch}})
    for n in (1, 7):
        x = _data((n, 3, 2, 2), n)
        assert torch.equal(exported.module()(x), model(x))


def test_export_in_training_mode_captures_the_statistics_update() -> None:
    """A training-mode export bakes the mode in and updates the running buffers in place."""
    eager = _randomize(nn.Sequential(bnkit.BatchNorm2d(3)))
    exported = torch.export.export(copy.deepcopy(eager), (_data((4, 3, 2, 2), 0),)).module()
    for step in range(2):
        x = _data((4, 3, 2, 2), step)
        torch.testing.assert_close(exported(x), eager(x), **TIGHT)
    for name, value in eager.named_buffers():
        torch.testing.assert_close(exported.get_buffer(name), value, **TIGHT, msg=name)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_export_of_a_layer_as_the_root_module(strict: bool) -> None:
    """A bare layer exports in both modes, with renorm and zero-debias buffers too: bnkit
    registers the None placeholders of options that are off after its real buffers (torch
    2.13's non-strict export numbers a root's buffers counting None ones before a real one)."""
    for make in (
        lambda: bnkit.BatchNorm2d(3),
        lambda: bnkit.BatchNorm(3, renorm=True, zero_debias="mean"),
    ):
        layer = _trained(make, (4, 3, 2, 2))
        x = _data((4, 3, 2, 2), 1)
        exported = torch.export.export(layer, (x,), strict=strict)
        assert torch.equal(exported.module()(x), layer(x))


def _conv_bn_relu() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), bnkit.BatchNorm2d(4, activation="relu"))


def test_folded_model_exports_and_matches_eager() -> None:
    shape = (4, 3, 3, 3)
    model = _trained(lambda: nn.Sequential(_conv_bn_relu(), nn.Flatten(), nn.Linear(4, 2)), shape)
    folded, report = bnkit.fold(model)
    assert len(report.folded) == 1
    x = _data(shape, 5)
    exported = torch.export.export(folded, (x,))
    assert not any(isinstance(m, bnkit.BatchNorm) for m in exported.module().modules())
    torch.testing.assert_close(exported.module()(x), model(x), **TIGHT)


def test_folded_model_exports_to_onnx(tmp_path) -> None:
    onnx = pytest.importorskip("onnx", reason="the ONNX export check needs the onnx package")
    pytest.importorskip("onnxscript", reason="torch.onnx.export (dynamo) needs onnxscript")
    shape = (2, 3, 6, 6)
    model = _trained(_conv_bn_relu, shape)
    folded, _ = bnkit.fold(model)
    x = _data(shape, 5)
    path = tmp_path / "folded.onnx"
    with warnings.catch_warnings():
        # onnxscript's own deprecation chatter about torch's pytree API, not bnkit's
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec")
        torch.onnx.export(folded, (x,), path, dynamo=True)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    ops = {node.op_type for node in proto.graph.node}
    assert "BatchNormalization" not in ops, ops
    try:
        import onnxruntime
    except ImportError:
        return  # valid ONNX; comparing its numerics needs a runtime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), model(x), **TIGHT)
