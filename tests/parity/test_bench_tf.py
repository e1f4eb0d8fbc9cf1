"""bnkit.bench_tf and ``bnkit bench --compare-tf``: the TensorFlow contender computes what the
benchmark says it times, on the same values, and its times reach the tables.

The Keras step's outputs (forward, inference, and the gradients to x, γ and β with the bench's
fixed upstream gradient) are compared in float64 with ``torch.nn.functional.batch_norm`` for
the default configuration, and with bnkit's reference path (strided ghosts, renorm with the
layer's renorm statistics, sample weights) for the options, in NCHW, NHWC and (N, C).
No timing assertions: times only have to be positive and the ratios the ratios of the times.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tfcompat import tensorflow_modules

from bnkit import bench, bench_tf
from bnkit.functional import batch_norm

EPS = 1e-5
MOMENTUM = 0.1
TOL = {"rtol": 1e-4, "atol": 1e-4}
LAYOUTS = [
    pytest.param((6, 4, 3, 5), "contiguous", id="nchw"),
    pytest.param((6, 4, 3, 5), "channels_last", id="nhwc"),
    pytest.param((10, 6), "contiguous", id="nc"),
]


@pytest.fixture(autouse=True, scope="module")
def _tensorflow() -> Any:
    return tensorflow_modules()  # skips the module without TensorFlow (fails under make parity)


def _inputs(shape: tuple[int, ...], layout: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen) * 2.0 + 0.5
    dy = torch.randn(shape, generator=gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    return {
        "x": x,
        "dy": dy,
        "weight": torch.rand(c, generator=gen) + 0.5,
        "bias": torch.rand(c, generator=gen) - 0.5,
        "sample_weights": torch.rand(shape[0], generator=gen) + 0.5,
    }


def _leaves(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(  # type: ignore[return-value]
        t[k].detach().double().requires_grad_(True) for k in ("x", "weight", "bias")
    )


@pytest.mark.parametrize(("shape", "layout"), LAYOUTS)
def test_forward_is_torch_training_batch_norm(shape: tuple[int, ...], layout: str) -> None:
    t = _inputs(shape, layout)
    step = bench_tf.keras_step(
        t["x"], layout=layout, mode="fwd", weight=t["weight"], bias=t["bias"], eps=EPS
    )
    assert step.fused == (len(shape) == 4)  # Keras cannot fuse 2-D input
    step()
    (y,) = step.results()
    assert y.shape == t["x"].shape
    x, w, b = (v.double() for v in (t["x"], t["weight"], t["bias"]))
    expected = F.batch_norm(x, None, None, w, b, training=True, eps=EPS)
    torch.testing.assert_close(y.double(), expected, **TOL)
    # Three training calls (tracing, the call above, results): Keras' momentum is 1 - 0.1.
    dims = [d for d in range(x.ndim) if d != 1]
    moving_mean = torch.from_numpy(step.layer.moving_mean.numpy()).double()
    torch.testing.assert_close(moving_mean, x.mean(dims) * (1 - 0.9**3), **TOL)


@pytest.mark.parametrize(("shape", "layout"), LAYOUTS)
def test_eval_uses_the_moving_statistics(shape: tuple[int, ...], layout: str) -> None:
    t = _inputs(shape, layout)
    step = bench_tf.keras_step(
        t["x"], layout=layout, mode="eval", weight=t["weight"], bias=t["bias"], eps=EPS
    )
    (y,) = step.results()
    x, w, b = (v.double() for v in (t["x"], t["weight"], t["bias"]))
    c = shape[1]
    mean, var = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    expected = F.batch_norm(x, mean, var, w, b, training=False, eps=EPS)
    torch.testing.assert_close(y.double(), expected, **TOL)


@pytest.mark.parametrize(("shape", "layout"), LAYOUTS)
def test_forward_backward_gradients_are_torch_gradients(
    shape: tuple[int, ...], layout: str
) -> None:
    t = _inputs(shape, layout)
    step = bench_tf.keras_step(
        t["x"],
        layout=layout,
        mode="fwd+bwd",
        weight=t["weight"],
        bias=t["bias"],
        grad_out=t["dy"],
        eps=EPS,
    )
    y, dx, dgamma, dbeta = step.results()
    x, w, b = _leaves(t)
    ref = F.batch_norm(x, None, None, w, b, training=True, eps=EPS)
    expected = torch.autograd.grad(ref, (x, w, b), t["dy"].double())
    torch.testing.assert_close(y.double(), ref.detach(), **TOL)
    for got, want in zip((dx, dgamma, dbeta), expected, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got.double(), want, **TOL)


@pytest.mark.parametrize("config", ["renorm", "ghost", "weights"])
@pytest.mark.parametrize(("shape", "layout"), LAYOUTS)
def test_options_compute_the_configuration(
    config: str, shape: tuple[int, ...], layout: str
) -> None:
    t = _inputs(shape, layout)
    options: dict[str, Any] = {
        "renorm": {"renorm": True},
        "ghost": {"virtual_batch_size": 2},
        "weights": {"sample_weights": t["sample_weights"]},
    }[config]
    step = bench_tf.keras_step(
        t["x"],
        layout=layout,
        mode="fwd+bwd",
        weight=t["weight"],
        bias=t["bias"],
        grad_out=t["dy"],
        eps=EPS,
        momentum=MOMENTUM,
        **options,
    )
    assert not step.fused
    reference: dict[str, Any] = {}
    if config == "renorm":  # the renorm statistics as the next call sees them
        reference = {
            name: torch.from_numpy(getattr(step.layer, name).numpy()).double().reshape(-1)
            for name in ("renorm_mean", "renorm_stddev")
        }
    elif config == "ghost":  # Keras' ghost batches are strided
        reference = {"virtual_batch_size": 2, "ghost_layout": "strided"}
    else:
        reference = {"weights": t["sample_weights"].double()}
    y, dx, dgamma, dbeta = step.results()
    x, w, b = _leaves(t)
    ref = batch_norm(x, weight=w, bias=b, training=True, eps=EPS, impl="reference", **reference)
    expected = torch.autograd.grad(ref, (x, w, b), t["dy"].double())
    torch.testing.assert_close(y.double(), ref.detach(), **TOL)
    for got, want in zip((dx, dgamma, dbeta), expected, strict=True):
        torch.testing.assert_close(got.double(), want, **TOL)


def test_bad_arguments_are_named() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="unknown mode 'train'"):
        bench_tf.keras_step(x, layout="contiguous", mode="train")
    with pytest.raises(ValueError, match="channels_last"):
        bench_tf.keras_step(x, layout="channels_last", mode="fwd")
    with pytest.raises(ValueError, match="needs grad_out"):
        bench_tf.keras_step(x, layout="contiguous", mode="fwd+bwd")
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        bench_tf.keras_step(x, layout="contiguous", mode="fwd", sample_weights=torch.ones(3))


# ----------------------------------------------------------------------------- bench


def test_run_benchmark_fills_the_tf_columns() -> None:
    report = bench.run_benchmark(
        [(8, 4, 3, 3), (8, 4)],
        configs=["default", "ghost"],
        modes=["fwd", "fwd+bwd"],
        quick=True,
        memory=False,
        compare_tf=True,
    )
    meta = report.meta
    assert meta["tf_version"] == tensorflow_modules().tf.__version__
    assert meta["tf_keras_version"] == tensorflow_modules().keras.__version__
    assert isinstance(meta["tf_intra_op_threads"], int)
    assert isinstance(meta["tf_inter_op_threads"], int)
    assert len(report.results) == 3 * 2 * 2  # NCHW, NHWC, NC; two configs; two modes
    for r in report.results:
        assert r.tf_ms is not None
        assert r.tf_ms > 0
        assert r.vs_tf == pytest.approx(r.bnkit_ms / r.tf_ms)
        d = r.to_dict()
        assert d["tf_ms"] == r.tf_ms
        assert d["vs_tf"] == r.vs_tf
    for markdown in (False, True):
        table = bench.format_table(report, markdown=markdown)
        assert "tf ms" in table
        assert "bnkit/tf" in table
        assert f"TensorFlow {meta['tf_version']}" in table
        body = [line for line in table.splitlines() if line.lstrip("| ").startswith("8x4")]
        assert len(body) == len(report.results)
        for line, r in zip(body, report.results, strict=True):
            cells = line.replace("|", " ").split()
            assert cells[-2:] == [f"{r.tf_ms:.3f}", f"{r.vs_tf:.2f}"]


def test_cli_compare_tf_json(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    argv = ["--compare-tf", "--quick", "--json", "--shapes", "4x3x2x2", "--configs", "default"]
    assert bench.run_cli(parser.parse_args([*argv, "--modes", "fwd,eval", "--no-memory"])) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["meta"]["command"].endswith("--compare-tf")
    assert {"tf_version", "tf_intra_op_threads", "tf_inter_op_threads"} <= set(data["meta"])
    assert len(data["results"]) == 2 * 2  # two layouts, two modes
    for r in data["results"]:
        assert r["tf_ms"] > 0
        assert r["vs_tf"] == pytest.approx(r["bnkit_ms"] / r["tf_ms"])


def test_kernel_table_gets_the_tf_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    from bnkit.kernels import cpp

    # The kernel column's source does not matter here: skip building the extension.
    monkeypatch.setattr(cpp, "available", lambda: False)
    monkeypatch.setattr(cpp, "build_error", lambda: "not built in this test")
    meta, rows = bench.run_kernel_benchmark(
        [(4, 3, 2, 2)], layouts=["channels_last"], repeats=1, warmup=1, compare_tf=True
    )
    assert meta["tf_version"] == tensorflow_modules().tf.__version__
    assert [r.mode for r in rows] == ["fwd", "fwd+bwd", "eval"]
    for r in rows:
        assert r.tf_ms is not None
        assert r.tf_ms > 0
        assert r.vs_tf == pytest.approx(r.kernel_ms / r.tf_ms)
        assert r.to_dict()["vs_tf"] == r.vs_tf
    table = bench.format_kernel_table(meta, rows)
    assert "tf ms" in table
    assert "kernel/tf" in table
