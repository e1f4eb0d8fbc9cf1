"""Scenario 3 (seeds 000 and 003): a conv net with slim's batch norm on channels-last images.

TensorFlow keeps images as NHWC (channels last) and ``slim.batch_norm`` normalizes over every
axis but the last. The same model in PyTorch, with the data kept in TF's layout: 8x8 digit
images of shape ``(N, 8, 8, 1)``, two 3x3 convolutions each followed by
``bnkit.from_slim(C, decay=0.9, scale=True)`` (``data_format="NHWC"``, so ``axis=-1``), max
pooling and a dense classifier. It shows:

* channels-last batch norm gives exactly the numbers of PyTorch's channels-first
  ``batch_norm`` on the transposed tensor (training and inference mode);
* the model trains, and ``bnkit.save`` → ``bnkit.load`` restores it exactly;
* seed 000's symptom of statistics that were never updated (``UPDATE_OPS`` not run): poor
  test accuracy with ``is_training=False`` and much better with ``is_training=True`` (the
  test set's own batch statistics), what the doctor says, and ``bnkit.recalibrate`` as the
  repair.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import bnkit
from bnkit.checkpoint import CheckpointError
from bnkit.demo.common import (
    BrokenCase,
    Diagnosis,
    batch_statistics_forward,
    diagnose_checkpoint,
    first_line,
    load_digits_data,
    minibatches,
    never_updated_copy,
    progress_range,
    quiet_load,
)
from bnkit.policies import calibrating

__all__ = ["ConvNHWC", "ConvResult", "MaxPoolNHWC", "build_conv_net", "run_conv"]


class ConvNHWC(nn.Conv2d):
    """``nn.Conv2d`` on channels-last tensors: ``(N, H, W, C_in) → (N, H', W', C_out)``."""

    def forward(self, x: Tensor) -> Tensor:
        """Convolve NHWC input (transposed to PyTorch's NCHW and back)."""
        out: Tensor = super().forward(x.permute(0, 3, 1, 2))
        return out.permute(0, 2, 3, 1)


class MaxPoolNHWC(nn.Module):
    """2x2 max pooling of channels-last tensors."""

    def forward(self, x: Tensor) -> Tensor:
        """Pool NHWC input."""
        pooled = nn.functional.max_pool2d(x.permute(0, 3, 1, 2), 2)
        return pooled.permute(0, 2, 3, 1)


def build_conv_net(seed: int = 0) -> nn.Sequential:
    """Conv 16 → BN → ReLU → conv 32 → BN+ReLU → 2x2 max pool → dense 10, all NHWC.

    The batch norms are ``bnkit.from_slim(C, decay=0.9, scale=True)``: slim's NHWC layout
    (``axis=-1``), epsilon 1e-3, and the decay slim's docstring recommends. The global
    random state is left untouched.

    Example:
        >>> build_conv_net()(torch.rand(2, 8, 8, 1)).shape
        torch.Size([2, 10])
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            ConvNHWC(1, 16, 3, padding=1, bias=False),
            bnkit.from_slim(16, decay=0.9, scale=True),
            nn.ReLU(),
            ConvNHWC(16, 32, 3, padding=1, bias=False),
            bnkit.from_slim(32, decay=0.9, scale=True, activation_fn="relu"),
            MaxPoolNHWC(),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 10),
        )


@dataclass(frozen=True)
class ConvResult:
    """Scenario 3's numbers (accuracies are fractions in [0, 1], on the held-out split).

    Attributes:
        train_samples, test_samples, steps, batch_size, learning_rate: the setup.
        input_shape: the shape of the held-out input (channels last).
        first_layer: the first batch-norm layer's repr.
        layout_max_difference: the largest difference between the channels-last layer and
            ``torch.nn.functional.batch_norm`` on the channels-first transpose of the same
            input, over training and inference mode.
        train_accuracy: training mode, on the training batches of the last epoch.
        test_accuracy: inference mode (moving statistics).
        restored_accuracy: a fresh model after ``bnkit.save`` → ``bnkit.load``.
        restored_identical: the restored model's outputs equal the trained model's exactly.
        healthy_checkpoint: the doctor on the saved checkpoint.
        never_updated_batch_statistics_accuracy: the never-updated model with
            ``is_training=True`` at test time (the test set as one batch).
        broken: the never-updated variant (seed 000).
        checkpoints: the checkpoint files written.
    """

    train_samples: int
    test_samples: int
    steps: int
    batch_size: int
    learning_rate: float
    input_shape: tuple[int, ...]
    first_layer: str
    layout_max_difference: float
    train_accuracy: float
    test_accuracy: float
    restored_accuracy: float
    restored_identical: bool
    healthy_checkpoint: Diagnosis
    never_updated_batch_statistics_accuracy: float
    broken: BrokenCase
    checkpoints: tuple[Path, ...]


def _accuracy_of(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return _accuracy_of(model.eval()(x), y)


def _layout_difference(model: nn.Sequential, x: Tensor) -> float:
    """Channels-last bnkit vs torch's channels-first kernel on the first layer's real input."""
    layer = model[1]
    assert isinstance(layer, bnkit.BatchNorm)
    with torch.no_grad():
        h = model[0](x)  # the first batch norm's input, (N, 8, 8, 16)
        nchw = h.permute(0, 3, 1, 2)
        weight, bias = layer.weight, layer.bias
        trained = copy.deepcopy(layer)
        with calibrating():
            ours_train = trained(h, training=True).permute(0, 3, 1, 2)
        ours_eval = layer(h, training=False).permute(0, 3, 1, 2)
        args: dict[str, Any] = {"weight": weight, "bias": bias, "eps": layer.eps}
        torch_train = nn.functional.batch_norm(nchw, None, None, training=True, **args)
        torch_eval = nn.functional.batch_norm(
            nchw, layer.running_mean, layer.running_var, training=False, **args
        )
    return max(
        float((ours_train - torch_train).abs().max()), float((ours_eval - torch_eval).abs().max())
    )


def run_conv(
    out_dir: Path,
    *,
    steps: int = 1000,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> ConvResult:
    """Train the channels-last conv net, check the layout, save/restore, break it, repair it.

    Args:
        out_dir: where the checkpoints go (``checkpoints/conv-*.safetensors``).
        steps: SGD steps.
        batch_size: images per step.
        seed: seeds the split, the initialization and the batch order.
        progress: show a progress bar on stderr.

    Returns:
        A :class:`ConvResult`.
    """
    data = load_digits_data(seed=seed, layout="NHWC")
    model = build_conv_net(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    per_epoch = len(data.y_train) // batch_size
    batches = minibatches(len(data.y_train), batch_size, generator)
    correct = seen = 0
    model.train()
    for step in progress_range(steps, "3 conv NHWC", progress):
        idx = next(batches, None)
        if idx is None:
            batches = minibatches(len(data.y_train), batch_size, generator)
            idx = next(batches)
        optimizer.zero_grad()
        logits = model(data.x_train[idx])
        loss = loss_fn(logits, data.y_train[idx])
        loss.backward()
        optimizer.step()
        if step >= steps - per_epoch:  # the last epoch's worth of steps
            correct += int((logits.argmax(1) == data.y_train[idx]).sum())
            seen += len(idx)

    test_accuracy = _accuracy(model, data.x_test, data.y_test)
    layout = _layout_difference(model, data.x_test)

    ckpt_dir = out_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    trained_path = ckpt_dir / "conv-trained.safetensors"
    bnkit.save(model, trained_path)
    restored = build_conv_net(seed + 1)
    bnkit.load(restored, trained_path)
    with torch.no_grad():
        identical = torch.equal(model.eval()(data.x_test), restored.eval()(data.x_test))
    restored_accuracy = _accuracy(restored, data.x_test, data.y_test)

    broken = never_updated_copy(model)
    broken_path = ckpt_dir / "conv-never-updated.safetensors"
    bnkit.save(broken, broken_path)
    notes: list[str] = []
    try:
        bnkit.load(build_conv_net(seed), broken_path)
    except CheckpointError as err:
        notes.append("bnkit.load refused it: " + first_line(str(err)))
    repaired = build_conv_net(seed)
    _, warned = quiet_load(repaired, broken_path)
    notes += ["bnkit.load(strict=False) warned: " + first_line(w) for w in warned]
    bnkit.recalibrate(repaired, [data.x_train], progress=False)
    batch_stats = _accuracy_of(batch_statistics_forward(broken, data.x_test), data.y_test)
    case = BrokenCase(
        name="statistics never updated",
        setup="UPDATE_OPS never ran: trained weights, moving mean 0 / variance 1",
        value=_accuracy(broken, data.x_test, data.y_test),
        answer="load(strict=False) + recalibrate",
        fixed_value=_accuracy(repaired, data.x_test, data.y_test),
        prevented_by="bnkit layers update their statistics in the forward pass: no update ops",
        diagnosis=diagnose_checkpoint(build_conv_net(seed), broken_path),
        notes=tuple(notes),
    )
    return ConvResult(
        train_samples=len(data.y_train),
        test_samples=len(data.y_test),
        steps=steps,
        batch_size=batch_size,
        learning_rate=0.05,
        input_shape=tuple(data.x_test.shape),
        first_layer=repr(model[1]),
        layout_max_difference=layout,
        train_accuracy=correct / max(seen, 1),
        test_accuracy=test_accuracy,
        restored_accuracy=restored_accuracy,
        restored_identical=identical,
        healthy_checkpoint=diagnose_checkpoint(build_conv_net(seed), trained_path),
        never_updated_batch_statistics_accuracy=batch_stats,
        broken=case,
        checkpoints=(trained_path, broken_path),
    )
