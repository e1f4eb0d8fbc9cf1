"""Train a small CNN on CPU with bnkit's C++ kernels, and check they change nothing but time.

The same network, seed and batches are trained twice: once on PyTorch's kernels (the default
policy) and once under ``bnkit.policy(kernels="cpp")``. The script prints the time per
training step (the whole step: convolutions, batch norm, optimizer), the test accuracy of both
runs, and how far their running statistics are apart after one step: float rounding, since
the kernels sum in another order. Over many steps any two runs that differ in the last bits
drift apart (a max-pooling or ReLU choice flips), PyTorch's own runs included; the accuracies
are what to compare. Last, it takes input gradients of the trained model in eval mode (a
saliency map: how each pixel moves the predicted class's score), which runs the inference
pass and its gradient, both ways.

Run: ``python examples/fast_cpu_training.py`` (add ``--steps 300`` for a longer run)
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from torch import nn

import bnkit
from bnkit.kernels import cpp


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (shipped inside the package), upsampled to 32x32, split
    1500/297."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False)
    y = torch.tensor(data.target)
    return x[:1500], y[:1500], x[1500:], y[1500:]


def network() -> nn.Module:
    """Conv → BN (ReLU fused) → pool, twice: batch norm on 64x16x32x32 and 64x32x16x16."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        bnkit.BatchNorm2d(16, activation="relu"),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        bnkit.BatchNorm2d(32, activation="relu"),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )


@dataclass
class Run:
    kernels: str
    seconds_per_step: float
    accuracy: float
    running_means: list[torch.Tensor]
    model: nn.Module


def train(kernels: str, steps: int, batch: int = 64, seed: int = 0) -> Run:
    """Train under the given kernels policy; the same seed gives the same batches."""
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = digits()
    model = network()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(seed)
    with bnkit.policy(kernels=kernels):
        start = time.perf_counter()
        for _ in range(steps):
            index = torch.randint(0, len(x_train), (batch,), generator=generator)
            loss = nn.functional.cross_entropy(model(x_train[index]), y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seconds = (time.perf_counter() - start) / steps
        model.eval()
        with torch.no_grad():
            accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    means = [m.running_mean.clone() for m in model.modules() if isinstance(m, bnkit.BatchNorm)]
    return Run(kernels, seconds, accuracy, means, model)  # type: ignore[arg-type]


def saliency(model: nn.Module, x: torch.Tensor, kernels: str) -> tuple[float, torch.Tensor]:
    """Seconds per call and d(score of the predicted class)/d(input), the model in eval mode."""
    model.eval()
    times = []
    with bnkit.policy(kernels=kernels):
        for _ in range(6):  # the first call warms up; the best of the others is reported
            start = time.perf_counter()
            xg = x.clone().requires_grad_()
            scores = model(xg)
            top = scores.gather(1, scores.argmax(1, keepdim=True)).sum()
            (grad,) = torch.autograd.grad(top, xg)
            times.append(time.perf_counter() - start)
    return min(times[1:]), grad


def main(argv: list[str] | None = None) -> list[Run]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)
    if not cpp.available():
        print(f"the C++ kernels cannot be built here ({cpp.build_error()}); both runs use torch")
    runs = [train("torch", args.steps), train("cpp", args.steps)]
    for run in runs:
        print(
            f"kernels={run.kernels:5s}: {1e3 * run.seconds_per_step:6.2f} ms per training step, "
            f"test accuracy {100 * run.accuracy:.1f}%"
        )
    first = [train(kernels, 1) for kernels in ("torch", "cpp")]
    gap = max(
        float((a - b).abs().max())
        for a, b in zip(first[0].running_means, first[1].running_means, strict=True)
    )
    print(f"largest difference between the running means after one step: {gap:.1e}")
    model, x = runs[0].model, digits()[2][:256]
    (t_torch, g_torch), (t_cpp, g_cpp) = (saliency(model, x, k) for k in ("torch", "cpp"))
    # A max-pooling window whose two largest inputs differ in the last bits can route the
    # gradient to the other one, so compare the maps as a whole: their cosine similarity.
    cosine = float(nn.functional.cosine_similarity(g_torch.flatten(), g_cpp.flatten(), dim=0))
    print(
        f"saliency in eval mode (256 images): {1e3 * t_torch:.2f} ms on PyTorch's kernels, "
        f"{1e3 * t_cpp:.2f} ms under kernels='cpp'; cosine similarity of the maps {cosine:.6f}"
    )
    return runs


if __name__ == "__main__":
    main()
