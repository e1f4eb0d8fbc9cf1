"""Shared pytest fixtures: every test starts from the same random state."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}")
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """Runs the test with 1 and with 2 torch threads: the C++ kernels pick their code path
    (tiles need at least as many channels as threads) and split work by the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def general_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts calls of the general path (functional.batch_norm) made by bnkit's modules."""
    from bnkit import functional as bnf

    counts = {"batch_norm": 0}
    original = bnf.batch_norm

    def counting(*args: Any, **kwargs: Any) -> Any:
        counts["batch_norm"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(bnf, "batch_norm", counting)
    return counts


@pytest.fixture
def cpp_policy() -> Iterator[None]:
    """The test runs under the policy kernels="cpp"."""
    import bnkit

    with bnkit.policy(kernels="cpp"):
        yield
