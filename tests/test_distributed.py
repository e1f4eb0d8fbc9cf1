"""Synchronized batch norm across processes (bnkit.distributed) equals one process on all data.

Every check runs in real processes: CPU, gloo, spawned on localhost with a ``file://``
rendezvous, each process group with a timeout and each process joined with a deadline, so a
bug can fail a check but never hang the suite. One spawn runs many checks (spawning costs
seconds); each check records its mismatches instead of raising, so the ranks stay in step
through the collectives of the checks that follow, and the pytest tests below read the
records, one test per check.

The oracle is one process running the concatenated batch with an unsynchronized layer
(``torch.nn.BatchNorm2d`` for the converted ``SyncBatchNorm``): outputs, input gradients,
parameter gradients (summed over the ranks, as DDP sums before it averages) and every buffer
after several steps must agree to 1e-5. Data with mean 1e4 is compared with float64 math.
"""

from __future__ import annotations

import copy
import datetime
import gc
import io
import json
import math
import multiprocessing
import os
import time
import traceback
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

import bnkit
from bnkit import distributed as bnd
from bnkit.kernels import cpp

TOL = {"rtol": 1e-5, "atol": 1e-5}
PG_TIMEOUT = datetime.timedelta(seconds=30)
JOIN_SECONDS = 150.0
CHANNELS = 4


# --------------------------------------------------------------------------- plumbing


class Expect:
    """Collects mismatches without raising, so every rank reaches the same collectives."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def close(self, what: str, actual: Tensor, expected: Tensor, **tol: float) -> None:
        try:
            torch.testing.assert_close(
                actual, expected.to(actual.dtype), **(tol or TOL), check_device=False
            )
        except AssertionError as err:
            self.errors.append(f"{what}: {err}")

    def true(self, what: str, condition: bool) -> None:
        if not condition:
            self.errors.append(what)


Check = Callable[[int, int, Expect], None]


def _entry(rank: int, world: int, init_file: str, out_dir: str, suite: str) -> None:
    """Process entry: join the group, run the suite's checks, write this rank's record."""
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=4) if suite == "hang" else PG_TIMEOUT
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timeout
    )
    results: dict[str, list[str]] = {}
    for name, check in SUITES[suite]:
        expect = Expect()
        try:
            check(rank, world, expect)
        except Exception:
            expect.errors.append(traceback.format_exc())
        results[name] = expect.errors
    Path(out_dir, f"{suite}-{rank}.json").write_text(json.dumps(results))
    if suite == "hang":
        # A group with a timed-out collective aborts in its destructor at exit (gloo):
        # leave without running it; the record is written.
        os._exit(0)
    dist.destroy_process_group()


def _spawn(suite: str, world: int, tmp: Path) -> dict[str, list[str]]:
    """Run ``suite`` on ``world`` processes; return ``{check: errors}`` merged over ranks."""
    ctx = multiprocessing.get_context("spawn")
    init_file = tmp / f"{suite}-rendezvous"
    procs = [
        ctx.Process(target=_entry, args=(rank, world, str(init_file), str(tmp), suite))
        for rank in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_SECONDS
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0.1))
    stuck = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    assert not stuck, f"suite {suite!r}: ranks {stuck} did not finish within {JOIN_SECONDS}s"
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"suite {suite!r}: exit codes {codes}"
    merged: dict[str, list[str]] = {}
    for rank in range(world):
        record = json.loads((tmp / f"{suite}-{rank}.json").read_text())
        for name, errors in record.items():
            merged.setdefault(name, []).extend(f"rank {rank}: {e}" for e in errors)
    return merged


# ------------------------------------------------------------------------ equivalence


def _randomized(layer: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)
    return layer


def _gather_rows(t: Tensor, group: Any = None) -> list[Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def _equivalence(
    rank: int,
    expect: Expect,
    make: Callable[[bool], nn.Module],
    sizes: list[int],
    *,
    shape: tuple[int, ...] = (CHANNELS, 3, 3),
    steps: int = 3,
    weighted: bool = False,
    call: Callable[[nn.Module, Tensor, Tensor | None], Tensor] | None = None,
    loc: float = 0.0,
    scale: float = 1.0,
    group: Any = None,
    members: list[int] | None = None,
    oracle_dtype: torch.dtype | None = None,
    tol: dict[str, float] | None = None,
    param_tol: dict[str, float] | None = None,
) -> tuple[nn.Module, nn.Module]:
    """Train a synced layer on this rank's slice and the oracle on the whole batch.

    ``sizes`` are the batch sizes of the ranks in ``members`` (default: all ranks).
    """
    members = members if members is not None else list(range(len(sizes)))
    position = members.index(rank)
    start = sum(sizes[:position])
    rows = slice(start, start + sizes[position])
    synced = _randomized(make(True))
    oracle = make(False)
    oracle.load_state_dict(synced.state_dict())
    if oracle_dtype is not None:
        oracle.to(oracle_dtype)
    run = call or (lambda layer, x, w: layer(x) if w is None else layer(x, weights=w))
    tol = tol or TOL
    for step in range(steps):
        g = torch.Generator().manual_seed(100 * step + 1)
        full = torch.randn(sum(sizes), *shape, generator=g) * scale * (1 + step) + loc
        upstream = torch.randn(full.shape, generator=g)
        w = torch.rand(sum(sizes), generator=g) + 0.2 if weighted else None
        x = full[rows].clone().requires_grad_()
        y = run(synced, x, None if w is None else w[rows])
        (y * upstream[rows]).sum().backward()
        dtype = oracle_dtype or full.dtype
        xf = full.to(dtype).requires_grad_()
        yf = run(oracle, xf, None if w is None else w.to(dtype))
        (yf * upstream.to(dtype)).sum().backward()
        expect.close(f"output, step {step}", y, yf[rows].detach(), **tol)
        assert x.grad is not None
        assert xf.grad is not None
        expect.close(f"input gradient, step {step}", x.grad, xf.grad[rows], **tol)
        for (name, p), q in zip(synced.named_parameters(), oracle.parameters(), strict=True):
            assert p.grad is not None
            assert q.grad is not None
            total = p.grad.clone()
            dist.all_reduce(total, group=group)
            what = f"{name} gradient (sum over ranks), step {step}"
            expect.close(what, total, q.grad, **(param_tol or tol))
            p.grad = q.grad = None
    for key, value in oracle.state_dict().items():
        mine = synced.state_dict()[key]
        if value.is_floating_point():
            expect.close(f"buffer {key}", mine, value, **tol)
        else:
            expect.true(f"buffer {key}: {mine} != {value}", torch.equal(mine, value))
    _same_bits_everywhere(expect, synced, group)
    return synced, oracle


def _same_bits_everywhere(expect: Expect, layer: nn.Module, group: Any = None) -> None:
    """Running statistics end bit-identical on every rank of the group."""
    for key, value in layer.state_dict().items():
        rows = _gather_rows(value.reshape(-1).double(), group)
        same = all(torch.equal(r, rows[0]) for r in rows)
        expect.true(f"buffer {key} differs between ranks: {rows}", same)


def _bn2d(**options: Any) -> Callable[[bool], nn.Module]:
    return lambda sync: bnkit.BatchNorm2d(CHANNELS, sync=sync, **options)


def _check_equal(rank: int, world: int, expect: Expect) -> None:
    _equivalence(rank, expect, _bn2d(), [4] * world)


def _check_uneven(rank: int, world: int, expect: Expect) -> None:
    _equivalence(rank, expect, _bn2d(), [5, 3, 1][:world])


def _check_one_rank_empty(rank: int, world: int, expect: Expect) -> None:
    sizes = [4, 0, 3][:world] if world == 3 else [0, 5]
    synced, _ = _equivalence(rank, expect, _bn2d(), sizes)
    expect.true("num_batches_tracked counts every step", int(synced.num_batches_tracked) == 3)


def _check_one_sample_on_a_rank(rank: int, world: int, expect: Expect) -> None:
    # (N, C) data: a rank with one sample has one value per channel, fine over all ranks.
    def make(sync: bool) -> nn.Module:
        return bnkit.BatchNorm1d(CHANNELS, sync=sync)

    _equivalence(rank, expect, make, [1, 3, 0][:world], shape=(CHANNELS,))
    # One value per channel over all ranks: every rank raises, so none is left waiting.
    layer = bnkit.BatchNorm1d(CHANNELS, sync=True)
    try:
        layer(torch.randn(1 if rank == 0 else 0, CHANNELS))
    except ValueError as err:
        expect.true(f"message: {err}", "all processes" in str(err))
    else:
        expect.errors.append("one value per channel over all ranks did not raise")


def _check_sample_weights(rank: int, world: int, expect: Expect) -> None:
    _equivalence(rank, expect, _bn2d(running_var="biased"), [5, 3, 2][:world], weighted=True)


def _check_renorm(rank: int, world: int, expect: Expect) -> None:
    options = {"renorm": True, "renorm_clipping": {"rmax": 1.5, "dmax": 0.5}, "momentum": 0.3}
    _equivalence(rank, expect, _bn2d(**options), [5, 3, 1][:world], steps=4, scale=1.5)


def _check_warmup_zero_debias(rank: int, world: int, expect: Expect) -> None:
    options = {"warmup": True, "zero_debias": "both", "decay": 0.9, "running_var": "biased"}
    _equivalence(rank, expect, _bn2d(**options), [2, 5, 3][:world], steps=4)


def _check_cumulative_average(rank: int, world: int, expect: Expect) -> None:
    _equivalence(rank, expect, _bn2d(momentum=None), [3, 2, 4][:world])


def _check_large_mean(rank: int, world: int, expect: Expect) -> None:
    # Mean 1e4, standard deviation 1, float32. The all-reduced form Σ(M2 + n μ²) − N μ² in
    # float32 loses every digit of the variance here (μ² = 1e8, its ulp is 8), and rank
    # means rounded to float32 before the merge would cost ~1e-4 of it. The statistics must
    # match float64 math to 1e-5. Outputs and gradients carry float32's resolution of values
    # near 1e4: μ rounded to float32 is off by up to 4.9e-4 (half an ulp), so x̂ is off by
    # that much over σ ≈ 1 (atol 2e-3), and γ's gradient Σ g·x̂ by 4.9e-4·Σ|g| per channel
    # (Σ|g| ≈ 0.8·81 here: atol 0.05). Torch's float32 layers have the same resolution.
    make = _bn2d(momentum=0.5)
    sizes = [5, 3, 1][:world]
    synced, oracle = _equivalence(
        rank,
        expect,
        make,
        sizes,
        loc=1e4,
        scale=1.0,
        oracle_dtype=torch.float64,
        tol={"rtol": 1e-5, "atol": 2e-3},
        param_tol={"rtol": 1e-5, "atol": 0.05},
    )
    for key in ("running_mean", "running_var"):
        expect.close(f"{key} vs float64", synced.state_dict()[key], oracle.state_dict()[key])


def _check_channels_last_mask(rank: int, world: int, expect: Expect) -> None:
    # (N, L, C) with a padding mask (N, L): frequency weights over the sequence positions.
    def make(sync: bool) -> nn.Module:
        return bnkit.BatchNorm(CHANNELS, axis=-1, sync=sync, running_var="biased")

    def call(layer: nn.Module, x: Tensor, w: Tensor | None) -> Tensor:
        assert w is not None
        n, steps = x.shape[0], x.shape[1]
        mask = (torch.arange(steps)[None, :] < (w[:, None] * steps)).to(x.dtype)
        return layer(x, weights=mask.reshape(n, steps))

    _equivalence(
        rank, expect, make, [3, 4, 2][:world], shape=(5, CHANNELS), weighted=True, call=call
    )


def _check_ghost_batches(rank: int, world: int, expect: Expect) -> None:
    # Ghost batches stay per rank: one process with contiguous ghosts of the concatenated
    # batch sees the same ghosts, so everything matches, renorm's r and d included.
    options = {"virtual_batch_size": 2, "renorm": True, "momentum": 0.3}
    _equivalence(rank, expect, _bn2d(**options), [4, 2, 0][:world] if world == 3 else [2, 4])


def _check_keras_synchronized(rank: int, world: int, expect: Expect) -> None:
    # Keras' synchronized layer is its non-fused layer (biased moving variance) over all
    # replicas' data.
    def make(sync: bool) -> nn.Module:
        if sync:
            return bnkit.from_keras(CHANNELS, axis=1, synchronized=True)
        return bnkit.from_keras(CHANNELS, axis=1, fused=False)

    def call(layer: nn.Module, x: Tensor, w: Tensor | None) -> Tensor:
        return layer(x, training=True)

    _equivalence(rank, expect, make, [3, 5, 2][:world], call=call)


def _check_converted_sync_batch_norm(rank: int, world: int, expect: Expect) -> None:
    # convert() carries SyncBatchNorm's synchronization over; the oracle is torch itself.
    def make(sync: bool) -> nn.Module:
        if sync:
            layer = bnkit.convert(nn.SyncBatchNorm(CHANNELS))
            assert isinstance(layer, bnkit.BatchNorm)
            expect.true("converted layer synchronizes", layer.sync)
            return layer
        return nn.BatchNorm2d(CHANNELS)

    _equivalence(rank, expect, make, [4, 1, 3][:world])


def _check_sub_group(rank: int, world: int, expect: Expect) -> None:
    # Ranks 0 and 2 synchronize with each other; rank 1 is a group of one (no collective).
    group, _ = dist.new_subgroups_by_enumeration([[0, 2], [1]])
    members = [0, 2] if rank in (0, 2) else [1]
    sizes = [3, 5] if rank in (0, 2) else [4]

    def make(sync: bool) -> nn.Module:
        if sync:
            return bnkit.BatchNorm2d(CHANNELS, sync=True, process_group=group)
        return bnkit.BatchNorm2d(CHANNELS)

    _equivalence(rank, expect, make, sizes, group=group, members=members)


class _Counter:
    """Counts the collectives bnkit calls (and can refuse them)."""

    NAMES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce")

    def __init__(self, refuse: bool = False) -> None:
        self.calls: dict[str, int] = dict.fromkeys(self.NAMES, 0)
        self.refuse = refuse
        self.saved: dict[str, Any] = {}

    def __enter__(self) -> _Counter:
        for name in self.NAMES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self.saved[name] = original

            def wrapped(*args: Any, _name: str = name, _orig: Any = original, **kw: Any) -> Any:
                self.calls[_name] += 1
                if self.refuse:
                    raise AssertionError(f"collective {_name} called")
                return _orig(*args, **kw)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self.saved.items():
            setattr(dist, name, original)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def _check_collectives_per_step(rank: int, world: int, expect: Expect) -> None:
    """One gather in the forward and one all-reduce in the backward per layer and step; none
    outside training; none for unsynchronized layers."""
    synced = bnkit.BatchNorm2d(CHANNELS, sync=True)
    no_tracking = bnkit.BatchNorm2d(CHANNELS, sync=True, track_running_stats=False)
    plain = bnkit.BatchNorm2d(CHANNELS)
    x = torch.randn(3, CHANNELS, 2, 2, requires_grad=True)
    with _Counter() as counter:
        plain(x).sum().backward()
        synced.eval()(x)
        synced.train()(x, training=False)
        no_tracking.eval()(x).sum().backward()  # batch statistics, but not training
    expect.true(f"collectives outside training: {counter.calls}", counter.total == 0)
    with _Counter() as counter:
        y = synced.train()(x)
    expect.true(f"forward: one gather, got {counter.calls}", counter.total == 1)
    with _Counter() as counter:
        (y * torch.randn_like(y)).sum().backward()
    expect.true(
        f"backward: one all_reduce, got {counter.calls}",
        counter.calls["all_reduce"] == 1 and counter.total == 1,
    )
    ghosts = bnkit.BatchNorm2d(CHANNELS, sync=True, virtual_batch_size=1)
    with _Counter() as counter:
        ghosts(torch.randn(2, CHANNELS, 2, 2, requires_grad=True)).sum().backward()
    expect.true(f"ghost batches: one gather only, got {counter.calls}", counter.total == 1)


def _check_sync_running_stats(rank: int, world: int, expect: Expect) -> None:
    """Unsynchronized layers trained on different data; then averaged, identical everywhere."""
    torch.manual_seed(3)
    frozen = bnkit.BatchNorm2d(CHANNELS)
    model = nn.Sequential(
        bnkit.BatchNorm2d(CHANNELS),  # moving average: equal weights
        bnkit.BatchNorm2d(CHANNELS, momentum=None),  # cumulative: weighted by batches
        bnkit.BatchNorm2d(CHANNELS, renorm=True, zero_debias="mean"),
        nn.BatchNorm2d(CHANNELS),
        frozen,
    )
    frozen.frozen = True
    for _ in range(rank + 2):  # ranks ran different numbers of batches
        x = torch.randn(4, CHANNELS, 3, 3) * (rank + 1) + rank
        model(x)
    frozen_before = frozen.state_dict()
    before = {k: _gather_rows(v.double()) for k, v in model.state_dict().items()}
    names = bnkit.sync_running_stats(model)
    expect.true(f"synchronized layers: {names}", names == ["0", "1", "2", "3"])
    after = model.state_dict()
    for key, rows in before.items():
        stacked = torch.stack(rows)
        if key.startswith("4."):
            expect.true(f"frozen {key} changed", torch.equal(after[key], frozen_before[key[2:]]))
            continue
        if not after[key].is_floating_point():
            expect.true(
                f"{key}: max over ranks", torch.equal(after[key].double(), stacked.max(0).values)
            )
            continue
        if key == "2.running_var":
            continue  # recomputed from running_stddev, checked below
        if key.startswith("1."):
            weights = torch.stack(before["1.num_batches_tracked"]).reshape(-1, 1)
        else:
            weights = torch.ones(world, 1, dtype=torch.float64)
        expected = (weights * stacked.reshape(world, -1)).sum(0) / weights.sum()
        expected = expected.reshape(after[key].shape)
        expect.close(f"{key} averaged", after[key], expected, rtol=1e-6, atol=1e-7)
    renorm = model[2]
    expect.close(
        "renorm running_var = relu(running_stddev² − eps)",
        renorm.running_var,
        torch.clamp(renorm.running_stddev**2 - renorm.eps, min=0.0),
        rtol=1e-6,
        atol=1e-7,
    )
    _same_bits_everywhere(expect, model)


# ----------------------------------------------------------------- world size 2 only


def _check_ddp_training(rank: int, world: int, expect: Expect) -> None:
    """DDP of a small conv net with synchronized BN equals one process on the full batch."""

    def net(sync: bool) -> nn.Module:
        torch.manual_seed(11)
        return nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            bnkit.BatchNorm2d(6, sync=sync),
            nn.ReLU(),
            nn.Conv2d(6, 6, 3),
            bnkit.BatchNorm2d(6, sync=sync, renorm=True),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, 5),
        )

    single = net(False)
    ddp = nn.parallel.DistributedDataParallel(net(True))
    opt_single = torch.optim.SGD(single.parameters(), lr=0.1, momentum=0.9)
    opt_ddp = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    per_rank = 4
    for step in range(4):
        g = torch.Generator().manual_seed(500 + step)
        images = torch.randn(per_rank * world, 3, 6, 6, generator=g) + 0.5
        labels = torch.randint(0, 5, (per_rank * world,), generator=g)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        for model, opt, x, t in (
            (single, opt_single, images, labels),
            (ddp, opt_ddp, images[mine], labels[mine]),
        ):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), t).backward()  # DDP averages over ranks
            opt.step()
    for (key, value), mine_value in zip(
        single.state_dict().items(), ddp.module.state_dict().values(), strict=True
    ):
        if value.is_floating_point():
            expect.close(f"DDP {key} after 4 steps", mine_value, value)
        else:
            expect.true(f"DDP {key}", torch.equal(mine_value, value))
    _same_bits_everywhere(expect, ddp.module)


def _check_compile(rank: int, world: int, expect: Expect) -> None:
    """torch.compile(fullgraph=True) of synchronized layers computes what eager does."""
    torch._dynamo.reset()
    group = dist.new_group([0, 1])
    cases: list[tuple[str, Callable[[], nn.Module], bool]] = [
        ("default", lambda: bnkit.BatchNorm2d(CHANNELS, sync=True), False),
        (
            "weights, renorm, warm-up, explicit group",
            lambda: bnkit.BatchNorm2d(
                CHANNELS, sync=True, process_group=group, renorm=True, warmup=True
            ),
            True,
        ),
    ]
    for label, make, weighted in cases:
        eager = _randomized(make())
        compiled_layer = copy.deepcopy(eager)
        compiled = torch.compile(compiled_layer, backend="aot_eager", fullgraph=True)
        for step in range(3):
            g = torch.Generator().manual_seed(50 * step + rank)
            x = torch.randn(3 + 2 * rank, CHANNELS, 2, 2, generator=g) * (1 + step)
            w = torch.rand(x.shape[0], generator=g) + 0.2 if weighted else None
            upstream = torch.randn(x.shape, generator=g)
            outs = []
            for layer in (eager, compiled):
                xi = x.clone().requires_grad_()
                y = layer(xi) if w is None else layer(xi, weights=w)
                (y * upstream).sum().backward()
                outs.append((y.detach(), xi.grad))
            expect.close(f"{label}: compiled output, step {step}", outs[1][0], outs[0][0])
            expect.close(f"{label}: compiled input gradient, step {step}", outs[1][1], outs[0][1])
        for (key, a), b in zip(
            eager.state_dict().items(), compiled_layer.state_dict().values(), strict=True
        ):
            expect.close(f"{label}: compiled {key}", b.double(), a.double())
        for (name, a), b in zip(eager.named_parameters(), compiled_layer.parameters(), strict=True):
            assert a.grad is not None
            assert b.grad is not None
            expect.close(f"{label}: compiled {name} gradient", b.grad, a.grad)


def _check_recalibrate(rank: int, world: int, expect: Expect) -> None:
    """recalibrate pools all ranks' data exactly, also through synchronized layers (whose
    forwards run their collectives on every calibration batch)."""
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Linear(3, CHANNELS), bnkit.BatchNorm1d(CHANNELS, sync=True), nn.Linear(CHANNELS, 2)
    ).eval()
    g = torch.Generator().manual_seed(9)
    data = [torch.randn(6, 3, generator=g) * 2 + 1 for _ in range(2 * world)]
    mine = data[rank::world]  # the same number of batches on every rank
    report = bnkit.recalibrate(model, mine, progress=False)
    expect.true(f"world size in the report: {report.world_size}", report.world_size == world)
    with torch.no_grad():
        inputs = model[0](torch.cat(data))
    expect.close("recalibrated running_mean", model[1].running_mean, inputs.mean(0))
    expect.close("recalibrated running_var", model[1].running_var, inputs.var(0))
    _same_bits_everywhere(expect, model)


# -------------------------------------------------------------------- world size 1


def _check_world_of_one_runs_no_collective(rank: int, world: int, expect: Expect) -> None:
    layer = _randomized(bnkit.BatchNorm2d(CHANNELS, sync=True, renorm=True))
    plain = bnkit.BatchNorm2d(CHANNELS, renorm=True)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(5, CHANNELS, 3, 3)
    with _Counter(refuse=True):
        y = layer(x)
        y.sum().backward()
        names = bnkit.sync_running_stats(nn.Sequential(layer))
    expect.true(f"sync_running_stats names {names}", names == ["0"])
    expect.true("same output as unsynchronized", torch.equal(y, plain(x)))
    for key, value in plain.state_dict().items():
        expect.true(f"same {key}", torch.equal(layer.state_dict()[key], value))


def _check_sync_moments_gradcheck(rank: int, world: int, expect: Expect) -> None:
    # The autograd Function itself (it runs its collectives in a group of one), in float64:
    # gradients for the input and for sample weights that require them.
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True) * 3 + 1
    w = (torch.rand(4, 1, 2, dtype=torch.float64) + 0.3).requires_grad_()

    def first_two(x: Tensor, w: Tensor | None) -> tuple[Tensor, Tensor]:
        out = bnd._SyncMoments.apply(x, w, (0, 2), None)
        return out[0], out[1]

    expect.true("gradcheck x", torch.autograd.gradcheck(lambda x: first_two(x, None), (x,)))
    expect.true("gradcheck x and weights", torch.autograd.gradcheck(first_two, (x, w)))
    mean, var = first_two(x, w)
    ref_mean, ref_var = bnkit.functional.moments(x, (0, 2), weights=w, keepdim=True)
    expect.close("weighted mean", mean, ref_mean, rtol=1e-12, atol=1e-12)
    expect.close("weighted var", var, ref_var, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------- C++ kernels


def _on_kernels(make: Callable[[bool], nn.Module]) -> Callable[[bool], nn.Module]:
    """The synchronized layer under the policy kernels="cpp"; the oracle as it was."""

    def build(sync: bool) -> nn.Module:
        layer = make(sync)
        if sync:
            assert isinstance(layer, bnkit.BatchNorm)
            layer.policy = {"kernels": "cpp"}
        return layer

    return build


class _KernelCalls:
    """Counts the synchronized kernel path's operator calls (forward and backward)."""

    NAMES = ("bn_normalize", "bn_grad_sums", "bn_grad_apply", "train")

    def __init__(self) -> None:
        self.calls: dict[str, int] = dict.fromkeys(self.NAMES, 0)
        self.saved: dict[str, Any] = {}

    def __enter__(self) -> _KernelCalls:
        for name in self.NAMES:
            original = getattr(cpp, name)
            self.saved[name] = original

            def wrapped(*args: Any, _name: str = name, _orig: Any = original, **kw: Any) -> Any:
                self.calls[_name] += 1
                return _orig(*args, **kw)

            setattr(cpp, name, wrapped)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self.saved.items():
            setattr(cpp, name, original)


def _check_kernels(rank: int, world: int, expect: Expect) -> None:
    """The kernel path equals one process on all data: uneven batches, renorm with a fused
    ReLU in channels-last memory, 2-D input, and it is the kernels that ran."""
    if not cpp.available():
        expect.errors.append(f"the C++ kernels did not build: {cpp.build_error()}")
        return
    with _KernelCalls() as ops:
        _equivalence(rank, expect, _on_kernels(_bn2d()), [5, 3, 2][:world])
    # 3 steps: one normalize pass forward, the sums and the gradient pass backward, each.
    expected = {**dict.fromkeys(_KernelCalls.NAMES, 3), "train": 0}
    expect.true(f"kernel calls {ops.calls}, wanted {expected}", ops.calls == expected)

    options = {
        "renorm": True,
        "renorm_clipping": {"rmax": 1.5, "dmax": 0.5},
        "momentum": 0.3,
        "activation": "relu",
    }

    def channels_last(layer: nn.Module, x: Tensor, w: Tensor | None) -> Tensor:
        return layer(x.contiguous(memory_format=torch.channels_last))

    _equivalence(
        rank,
        expect,
        _on_kernels(_bn2d(**options)),
        [4, 2, 3][:world],
        shape=(CHANNELS, 3, 2),
        steps=4,
        scale=1.5,
        call=channels_last,
    )

    def two_d(sync: bool) -> nn.Module:
        return bnkit.BatchNorm1d(CHANNELS, sync=sync, momentum=None)

    _equivalence(rank, expect, _on_kernels(two_d), [6, 2, 3][:world], shape=(CHANNELS,))


def _check_kernels_ghost_batches(rank: int, world: int, expect: Expect) -> None:
    """Ghost batches on the kernels: each rank's own ghosts through bn_train, the running
    statistics from every ghost of every rank (rank 2's batch is empty: reference path)."""
    if not cpp.available():
        expect.errors.append(f"the C++ kernels did not build: {cpp.build_error()}")
        return
    sizes = [4, 2, 0][:world] if world == 3 else [2, 4]
    with _KernelCalls() as ops:
        _equivalence(
            rank,
            expect,
            _on_kernels(_bn2d(virtual_batch_size=2, momentum=0.3, activation="relu")),
            sizes,
        )
    steps = 3 if sizes[rank] else 0
    expect.true(f"bn_train calls {ops.calls}", ops.calls["train"] == steps)
    # With sample weights: each ghost's total weight feeds the gather, as its count.
    with _KernelCalls() as ops:
        _equivalence(
            rank,
            expect,
            _on_kernels(_bn2d(virtual_batch_size=2, momentum=0.3)),
            sizes,
            weighted=True,
        )
    expect.true(f"weighted: bn_train calls {ops.calls}", ops.calls["train"] == steps)
    # Strided ghosts have no one-process oracle over the concatenated batch: the kernel path
    # against the reference path, the same layer on the same data.
    outputs = []
    for kernels in ("cpp", "torch"):
        layer = _randomized(
            bnkit.BatchNorm2d(
                CHANNELS,
                sync=True,
                virtual_batch_size=2,
                ghost_layout="strided",
                policy={"kernels": kernels},
            )
        )
        g = torch.Generator().manual_seed(60 + rank)
        x = torch.randn(4 + 2 * rank, CHANNELS, 3, 3, generator=g).requires_grad_()
        # Weights that differ between the strided ghosts (samples 0, 2, ... and 1, 3, ...).
        w = torch.arange(x.shape[0], dtype=torch.float32) % 2 + 0.5 + 0.1 * rank
        y = layer(x, weights=w)
        (y * torch.randn(y.shape, generator=g)).sum().backward()
        assert x.grad is not None
        outputs.append((y.detach(), x.grad, layer.running_mean, layer.running_var))
    names = ("output", "input gradient", "running_mean", "running_var")
    for what, a, b in zip(names, *outputs, strict=True):
        expect.close(f"strided ghosts: {what}, kernels against reference", a, b)


def _check_kernels_sample_weights(rank: int, world: int, expect: Expect) -> None:
    """Sample weights and masks on the kernels: per-sample weights, a padding mask of (N, L, C)
    sequences, a rank whose weights are all zero; weights that sum to zero over every rank
    raise the same ValueError everywhere."""
    if not cpp.available():
        expect.errors.append(f"the C++ kernels did not build: {cpp.build_error()}")
        return
    with _KernelCalls() as ops:
        _equivalence(
            rank, expect, _on_kernels(_bn2d(running_var="biased")), [5, 3, 2][:world], weighted=True
        )
    expect.true(f"per-sample weights on the kernels: {ops.calls}", ops.calls["bn_grad_apply"] == 3)

    def make(sync: bool) -> nn.Module:
        return bnkit.BatchNorm(CHANNELS, axis=-1, sync=sync, running_var="biased")

    sizes = [3, 4, 2][:world]

    def masked(layer: nn.Module, x: Tensor, w: Tensor | None) -> Tensor:
        # Padding masks from w; rank 1's rows contribute no weight at all (the oracle, which
        # sees the whole batch, masks the same rows).
        assert w is not None
        n, steps = x.shape[0], x.shape[1]
        mask = (torch.arange(steps)[None, :] < (w[:, None] * steps)).to(x.dtype)
        if layer.sync and rank == 1:
            mask = torch.zeros_like(mask)
        elif not layer.sync:
            mask[sizes[0] : sizes[0] + sizes[1]] = 0.0
        return layer(x, weights=mask.reshape(n, steps))

    with _KernelCalls() as ops:
        _equivalence(
            rank,
            expect,
            _on_kernels(make),
            sizes,
            shape=(5, CHANNELS),
            weighted=True,
            call=masked,
        )
    expect.true(f"masks on the kernels: {ops.calls}", ops.calls["bn_grad_apply"] == 3)
    layer = bnkit.BatchNorm2d(CHANNELS, sync=True, policy={"kernels": "cpp"})
    try:
        layer(torch.randn(3, CHANNELS, 2, 2), weights=torch.zeros(3))
    except ValueError as err:
        expect.true(f"message: {err}", "all processes" in str(err))
    else:
        expect.errors.append("weights summing to zero over every rank did not raise")


def _check_kernels_adjustment(rank: int, world: int, expect: Expect) -> None:
    """A per-channel adjustment (Keras' ``adjustment``) is folded into γ and β on the kernels;
    one that is not per channel takes the reference path with the values drawn once."""
    if not cpp.available():
        expect.errors.append(f"the C++ kernels did not build: {cpp.build_error()}")
        return
    scale = torch.linspace(0.5, 1.5, CHANNELS)
    shift = torch.linspace(-0.2, 0.2, CHANNELS)

    def per_channel(shape: torch.Size) -> tuple[Tensor, Tensor]:
        return scale, shift

    with _KernelCalls() as ops:
        _equivalence(rank, expect, _on_kernels(_bn2d(adjustment=per_channel)), [3, 2, 4][:world])
    expect.true(f"per channel, on the kernels: {ops.calls}", ops.calls["bn_grad_apply"] == 3)
    draws = []

    def per_sample(shape: torch.Size) -> tuple[Tensor, float]:
        draws.append(shape)
        return torch.linspace(0.5, 1.5, shape[0]).reshape(-1, 1, 1, 1), 0.0

    layer = bnkit.BatchNorm2d(CHANNELS, sync=True, adjustment=per_sample, policy={"kernels": "cpp"})
    with _KernelCalls() as ops:
        y = layer(torch.randn(3, CHANNELS, 2, 2, requires_grad=True))
        y.sum().backward()
    expect.true(f"per sample: the reference path, {ops.calls}", sum(ops.calls.values()) == 0)
    expect.true(f"per sample: one draw, got {len(draws)}", len(draws) == 1)


def _check_kernels_meet_reference_ranks(rank: int, world: int, expect: Expect) -> None:
    """A rank with an empty batch (or one value per channel) takes the reference path while
    the others run the kernels: their collectives are the same, so the result still is."""
    if not cpp.available():
        expect.errors.append(f"the C++ kernels did not build: {cpp.build_error()}")
        return
    sizes = [4, 0, 3][:world] if world == 3 else [0, 5]
    with _KernelCalls() as ops:
        synced, _ = _equivalence(rank, expect, _on_kernels(_bn2d()), sizes)
    expect.true("num_batches_tracked counts every step", int(synced.num_batches_tracked) == 3)
    on_kernels = 3 if sizes[rank] else 0  # the empty rank on the reference path
    expect.true(f"rank {rank}: kernel calls {ops.calls}", ops.calls["bn_normalize"] == on_kernels)

    def make(sync: bool) -> nn.Module:
        return bnkit.BatchNorm1d(CHANNELS, sync=sync)

    sizes = [1, 3, 2][:world]  # rank 0: one value per channel, the reference path
    with _KernelCalls() as ops:
        _equivalence(rank, expect, _on_kernels(make), sizes, shape=(CHANNELS,))
    on_kernels = 3 if sizes[rank] > 1 else 0
    expect.true(f"rank {rank}: kernel calls {ops.calls}", ops.calls["bn_normalize"] == on_kernels)


class _AdjustedNet(nn.Module):
    """Linear → synchronized BN (kernels policy) → ReLU → Linear; the BN's adjustment is none,
    fixed per channel, or learnable (operations on a parameter of the model)."""

    def __init__(self, sync: bool, kind: str) -> None:
        super().__init__()
        torch.manual_seed(13)
        self.first = nn.Linear(4, CHANNELS)
        if kind == "learnable":  # DDP refuses parameters that no loss uses
            self.log_scale = nn.Parameter(torch.linspace(-0.3, 0.3, CHANNELS))
        adjustment = {"none": None, "fixed": self._fixed, "learnable": self._learnable}[kind]
        self.norm = bnkit.BatchNorm1d(
            CHANNELS, sync=sync, adjustment=adjustment, policy={"kernels": "cpp"}
        )
        self.last = nn.Linear(CHANNELS, 2)

    def _fixed(self, shape: torch.Size) -> tuple[Tensor, float]:
        return torch.linspace(0.5, 1.5, CHANNELS), 0.1

    def _learnable(self, shape: torch.Size) -> tuple[Tensor, float]:
        return self.log_scale.exp(), 0.1

    def forward(self, x: Tensor) -> Tensor:
        return self.last(torch.relu(self.norm(self.first(x))))


def _check_kernels_under_ddp_with_an_empty_rank(rank: int, world: int, expect: Expect) -> None:
    """DDP with buckets of one parameter: its bucket all-reduces interleave with the layers'
    collectives, in the same order on the rank without data (reference path) as on the
    others (kernels), also with a per-channel adjustment folded into γ and β, fixed or
    learnable. Trained together, the model equals one process on the whole batch."""
    if not cpp.available():
        expect.errors.append(f"the C++ kernels did not build: {cpp.build_error()}")
        return
    for kind in ("none", "fixed", "learnable"):
        sizes = [0, 5, 3][:world]
        single = _AdjustedNet(False, kind)
        ddp = nn.parallel.DistributedDataParallel(_AdjustedNet(True, kind), bucket_cap_mb=1e-6)
        opt_single = torch.optim.SGD(single.parameters(), lr=0.1)
        opt_ddp = torch.optim.SGD(ddp.parameters(), lr=0.1)
        total = sum(sizes)
        start = sum(sizes[:rank])
        mine = slice(start, start + sizes[rank])
        with _KernelCalls() as ops:
            for step in range(3):
                g = torch.Generator().manual_seed(70 + step)
                x, target = torch.randn(total, 4, generator=g), torch.randn(total, 2, generator=g)
                for model, opt, xs, ts, factor in (
                    (single, opt_single, x, target, 1.0),
                    (ddp, opt_ddp, x[mine], target[mine], float(world)),  # DDP averages
                ):
                    opt.zero_grad()
                    loss = ((model(xs) - ts) ** 2).sum() / total
                    (loss * factor).backward()
                    opt.step()
        wanted = 3 if sizes[rank] else 0
        ran = ops.calls["bn_grad_apply"] == wanted
        expect.true(f"{kind}: rank {rank}: kernel calls {ops.calls}", ran)
        for (key, value), mine_value in zip(
            single.state_dict().items(), ddp.module.state_dict().values(), strict=True
        ):
            if value.is_floating_point():
                expect.close(f"{kind}: DDP {key} after 3 steps", mine_value, value)
            else:
                expect.true(f"{kind}: DDP {key}", torch.equal(mine_value, value))
        del ddp  # its reducer holds communication work


def _check_kernels_leave_nothing_behind(rank: int, world: int, expect: Expect) -> None:
    """A backward that does not ask for x's gradient (the statistics node does not run)
    leaves no dy for a later pass, and keeps nothing alive (the ReLU's output and a graph-
    carrying dy reach back into the step's own nodes)."""
    if not cpp.available():
        expect.errors.append(f"the C++ kernels did not build: {cpp.build_error()}")
        return
    g = torch.Generator().manual_seed(80 + rank)
    x0 = torch.randn(3 + rank, CHANNELS, 2, 2, generator=g, dtype=torch.float64)
    c = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    results, hooked = [], []
    for impl in ("cpp", "reference"):
        x = x0.clone().requires_grad_()
        w = torch.linspace(0.5, 1.5, CHANNELS, dtype=torch.float64).requires_grad_()
        b = torch.zeros(CHANNELS, dtype=torch.float64, requires_grad=True)
        with _KernelCalls() as ops:
            y = bnkit.functional.batch_norm(
                x, None, None, w, b, training=True, sync=True, impl=impl
            )
        if impl == "cpp":
            expect.true(f"on the kernels: {ops.calls}", ops.calls["bn_normalize"] == 1)
        # γ's gradient of a loss linear in y, with a graph: the statistics node is pruned...
        (gw,) = torch.autograd.grad((y * c).sum(), [w], create_graph=True)
        # ...and reached by this pass, which must not see the first pass's dy.
        (gx,) = torch.autograd.grad(gw.pow(2).sum(), [x])
        results.append(gx)
        # A hook on γ that runs a backward through the same layer inside the outer pass: the
        # inner pass arms the shared terms too and takes its own entry, not the outer's.
        x = x0.clone().requires_grad_()
        y = bnkit.functional.batch_norm(x, None, None, w, b, training=True, sync=True, impl=impl)
        inner: list[int] = []

        def reenter(
            grad: Tensor, y: Tensor = y, x: Tensor = x, b: Tensor = b, inner: list[int] = inner
        ) -> Tensor:
            if not inner:
                inner.append(1)
                with torch.enable_grad():
                    torch.autograd.grad((y * c.flip(0)).sum(), [x, b], retain_graph=True)
            return grad

        handle = w.register_hook(reenter)
        (y * y * c).sum().backward(inputs=[x, w], retain_graph=True)  # the hook: between nodes
        handle.remove()
        expect.true(f"{impl}: the hook ran", inner == [1])
        assert x.grad is not None
        hooked.append(x.grad)
    expect.close("second pass after a pruned first pass", results[0], results[1])
    expect.close("a backward through the layer inside the backward", hooked[0], hooked[1])
    for create_graph in (False, True):
        layer = bnkit.BatchNorm2d(CHANNELS, sync=True, activation="relu", policy={"kernels": "cpp"})
        x = torch.randn(3 + rank, CHANNELS, 4, 4, requires_grad=True)
        alive = weakref.ref(x)
        y = layer(x)
        torch.autograd.grad((y * y).sum(), [layer.weight], create_graph=create_graph)
        del x, y
        gc.collect()
        expect.true(f"create_graph={create_graph}: the step kept x alive", alive() is None)


def _check_kernels_without_the_input_gradient(rank: int, world: int, expect: Expect) -> None:
    """autograd.grad to γ alone while x requires grad: no backward collective on any path
    (rank 1 empty: reference path), so the ranks stay in step for the next call."""
    if not cpp.available():
        expect.errors.append(f"the C++ kernels did not build: {cpp.build_error()}")
        return
    sizes = [4, 0, 3][:world] if world == 3 else [3, 0]
    layer = _randomized(bnkit.BatchNorm2d(CHANNELS, sync=True, policy={"kernels": "cpp"}))
    x = torch.randn(sizes[rank], CHANNELS, 2, 2, requires_grad=True)
    with _Counter() as counter:
        y = layer(x)
        (grad_weight,) = torch.autograd.grad((y * y).sum(), [layer.weight])
    expect.true(f"one gather and no all-reduce, got {counter.calls}", counter.total == 1)
    expect.true("γ's gradient has the channels", grad_weight.shape == (CHANNELS,))
    # The next step's collectives pair up (a mismatch would fail or time out here).
    _equivalence(rank, expect, _on_kernels(_bn2d()), [2, 3, 4][:world], steps=1)


def _check_kernels_no_channels(rank: int, world: int, expect: Expect) -> None:
    # C = 0: the kernels step aside; the reference path's empty output.
    y = bnkit.functional.batch_norm(
        torch.randn(4, 0, 5),
        torch.zeros(0),
        torch.ones(0),
        training=True,
        momentum=0.1,
        sync=True,
        impl="cpp",
    )
    expect.true(f"empty output, got {tuple(y.shape)}", tuple(y.shape) == (4, 0, 5))


def _check_kernels_large_mean(rank: int, world: int, expect: Expect) -> None:
    # As _check_large_mean: the kernels' float64 moments keep the variance of mean-1e4 data.
    if not cpp.available():
        expect.errors.append(f"the C++ kernels did not build: {cpp.build_error()}")
        return
    synced, oracle = _equivalence(
        rank,
        expect,
        _on_kernels(_bn2d(momentum=0.5)),
        [5, 3, 1][:world],
        loc=1e4,
        oracle_dtype=torch.float64,
        tol={"rtol": 1e-5, "atol": 2e-3},
        param_tol={"rtol": 1e-5, "atol": 0.05},
    )
    for key in ("running_mean", "running_var"):
        expect.close(f"{key} vs float64", synced.state_dict()[key], oracle.state_dict()[key])


def _check_kernels_collectives(rank: int, world: int, expect: Expect) -> None:
    """One gather forward and one all-reduce backward per step, as on the reference path."""
    if not cpp.available():
        expect.errors.append(f"the C++ kernels did not build: {cpp.build_error()}")
        return
    layer = bnkit.BatchNorm2d(CHANNELS, sync=True, policy={"kernels": "cpp"})
    x = torch.randn(3, CHANNELS, 2, 2, requires_grad=True)
    with _Counter() as counter, _KernelCalls() as ops:
        y = layer(x)
    expect.true(f"forward: one gather, got {counter.calls}", counter.total == 1)
    expect.true(f"forward on the kernels: {ops.calls}", ops.calls["bn_normalize"] == 1)
    with _Counter() as counter:
        (y * torch.randn_like(y)).sum().backward()
    expect.true(
        f"backward: one all_reduce, got {counter.calls}",
        counter.calls["all_reduce"] == 1 and counter.total == 1,
    )


def _check_kernels_double_backward(rank: int, world: int, expect: Expect) -> None:
    """A gradient penalty (create_graph) through the kernel path equals one process on the
    whole batch, also with rank 1's batch empty (it takes the reference path in that step)."""
    if not cpp.available():
        expect.errors.append(f"the C++ kernels did not build: {cpp.build_error()}")
        return
    _gradient_penalty(rank, world, expect, "cpp")


def _check_gradient_penalty(rank: int, world: int, expect: Expect) -> None:
    """The same on the reference path (with sample weights, a second backward through the
    statistics' all-reduce must all-reduce again)."""
    _gradient_penalty(rank, world, expect, "torch")


def _gradient_penalty(rank: int, world: int, expect: Expect, kernels: str) -> None:
    cases = [([3, 4, 5][:world], False), ([3, 0, 4][:world], False), ([3, 4, 5][:world], True)]
    for sizes, weighted in cases:
        start = sum(sizes[:rank])
        rows = slice(start, start + sizes[rank])
        g = torch.Generator().manual_seed(40)
        full = torch.randn(sum(sizes), CHANNELS, 2, 2, generator=g) * 2
        upstream = torch.randn(full.shape, generator=g)
        weights = torch.rand(sum(sizes), generator=g) + 0.2
        penalty_weights = torch.randn(full.shape, generator=g)
        results = []
        for sync in (True, False):
            layer = _randomized(
                bnkit.BatchNorm2d(
                    CHANNELS, sync=sync, activation="relu", policy={"kernels": kernels}
                )
            )
            x = (full[rows] if sync else full).clone().requires_grad_()
            up = upstream[rows] if sync else upstream
            w = (weights[rows] if sync else weights) if weighted else None
            with _KernelCalls() as ops:
                y = layer(x, weights=w)
            if sync and kernels == "cpp":
                ran = ops.calls["bn_normalize"] == (1 if sizes[rank] else 0)
                expect.true(f"sizes {sizes}, rank {rank}: kernel calls {ops.calls}", ran)
            (gx,) = torch.autograd.grad((y * up).sum(), x, create_graph=True)
            # Not Σ gx²: its second-order terms through the statistics nearly cancel.
            (gx * penalty_weights[rows if sync else slice(None)]).pow(2).sum().backward()
            assert x.grad is not None
            assert layer.weight.grad is not None
            weight_grad = layer.weight.grad.clone()
            if sync:
                dist.all_reduce(weight_grad)
            results.append((gx.detach(), x.grad, weight_grad))
        (gx, x_grad, w_grad), (gf, xf_grad, wf_grad) = results
        what = f"sizes {sizes}{', weighted' if weighted else ''}"
        expect.close(f"{what}: input gradient", gx, gf[rows])
        expect.close(f"{what}: penalty's input gradient", x_grad, xf_grad[rows])
        expect.close(f"{what}: penalty's weight gradient (summed)", w_grad, wf_grad)


def _check_kernel_step_gradcheck(rank: int, world: int, expect: Expect) -> None:
    # The kernel step's autograd Function in float64, its collectives in a group of one: the
    # backward's gradient through the statistics included, with and without the fused ReLU.
    # (Second order: _check_kernels_double_backward, against one process.)
    if not cpp.available():
        expect.errors.append(f"the C++ kernels did not build: {cpp.build_error()}")
        return
    g = torch.Generator().manual_seed(21)  # fixed: no value of y near the ReLU's kink
    x = (torch.randn(4, 3, 5, generator=g, dtype=torch.float64) * 3 + 1).requires_grad_()
    w = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
    for relu in (False, True):

        def step(x: Tensor, w: Tensor, b: Tensor, relu: bool = relu) -> Tensor:
            y, _ = bnkit.functional._cpp_sync_training_step(
                x,
                1,
                weight=w,
                bias=b,
                running_mean=None,
                running_var=None,
                momentum=None,
                eps=1e-3,
                renorm_mean=None,
                renorm_stddev=None,
                renorm_clipping=None,
                relu=relu,
                group=None,
            )
            return y

        ok = torch.autograd.gradcheck(step, (x, w, b))
        expect.true(f"gradcheck relu={relu}", ok)


# ------------------------------------------------------------------------- failures


def _check_failing_rank_does_not_hang(rank: int, world: int, expect: Expect) -> None:
    """Rank 1 fails before the collective and stays alive; rank 0 must time out and end."""
    layer = bnkit.BatchNorm2d(CHANNELS, sync=True)
    if rank == 1:
        try:
            layer(torch.randn(3, CHANNELS + 1, 2, 2))  # wrong channel count: ValueError
        except ValueError:
            time.sleep(7)  # alive (past rank 0's 4 s timeout), never joins the collective
            return
        expect.errors.append("the bad input did not raise")
        return
    try:
        layer(torch.randn(3, CHANNELS, 2, 2))
    except RuntimeError as err:  # gloo: timed out waiting for the peer
        expect.true(f"not a timeout: {err}", "imed out" in str(err) or "imeout" in str(err))
        return
    expect.errors.append("the collective returned although rank 1 never joined it")


SUITES: dict[str, list[tuple[str, Check]]] = {
    "three": [
        ("equal", _check_equal),
        ("uneven", _check_uneven),
        ("one_rank_empty", _check_one_rank_empty),
        ("one_sample_on_a_rank", _check_one_sample_on_a_rank),
        ("sample_weights", _check_sample_weights),
        ("renorm", _check_renorm),
        ("warmup_zero_debias", _check_warmup_zero_debias),
        ("cumulative_average", _check_cumulative_average),
        ("large_mean", _check_large_mean),
        ("channels_last_mask", _check_channels_last_mask),
        ("ghost_batches", _check_ghost_batches),
        ("keras_synchronized", _check_keras_synchronized),
        ("converted_sync_batch_norm", _check_converted_sync_batch_norm),
        ("sub_group", _check_sub_group),
        ("collectives_per_step", _check_collectives_per_step),
        ("sync_running_stats", _check_sync_running_stats),
        ("kernels", _check_kernels),
        ("kernels_ghost_batches", _check_kernels_ghost_batches),
        ("kernels_adjustment", _check_kernels_adjustment),
        ("kernels_sample_weights", _check_kernels_sample_weights),
        ("kernels_meet_reference_ranks", _check_kernels_meet_reference_ranks),
        ("kernels_large_mean", _check_kernels_large_mean),
        ("kernels_collectives", _check_kernels_collectives),
        ("kernels_double_backward", _check_kernels_double_backward),
        ("gradient_penalty", _check_gradient_penalty),
        ("kernels_under_ddp_with_an_empty_rank", _check_kernels_under_ddp_with_an_empty_rank),
        ("kernels_leave_nothing_behind", _check_kernels_leave_nothing_behind),
        ("kernels_without_the_input_gradient", _check_kernels_without_the_input_gradient),
        ("kernels_no_channels", _check_kernels_no_channels),
    ],
    "two": [
        ("equal", _check_equal),
        ("uneven", _check_uneven),
        ("one_rank_empty", _check_one_rank_empty),
        ("sample_weights", _check_sample_weights),
        ("renorm", _check_renorm),
        ("large_mean", _check_large_mean),
        ("ghost_batches", _check_ghost_batches),
        ("ddp_training", _check_ddp_training),
        ("recalibrate", _check_recalibrate),
        ("compile", _check_compile),
    ],
    "one": [
        ("no_collective", _check_world_of_one_runs_no_collective),
        ("gradcheck", _check_sync_moments_gradcheck),
        ("kernel_step_gradcheck", _check_kernel_step_gradcheck),
    ],
    "hang": [("failing_rank", _check_failing_rank_does_not_hang)],
}
WORLDS = {"three": 3, "two": 2, "one": 1, "hang": 2}


# ------------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def suite_results(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Any]:
    """Each suite is spawned once, when its first check runs."""
    tmp = tmp_path_factory.mktemp("distributed")
    spawned: dict[str, Any] = {}

    def results(suite: str) -> Any:
        if suite not in spawned:
            try:
                spawned[suite] = _spawn(suite, WORLDS[suite], tmp)
            except AssertionError as err:  # the spawn itself failed: every check reports it
                spawned[suite] = err
        return spawned[suite]

    return results


CASES = [(suite, name) for suite, checks in SUITES.items() for name, _ in checks]


@pytest.mark.parametrize(("suite", "check"), CASES, ids=[f"{s}-{c}" for s, c in CASES])
def test_distributed(suite_results: Callable[[str], Any], suite: str, check: str) -> None:
    results = suite_results(suite)
    if isinstance(results, AssertionError):
        raise results
    errors = results[check]
    assert not errors, "\n".join(errors)


def test_outside_distributed_nothing_is_active() -> None:
    assert not dist.is_initialized()
    assert bnd.world_size() == 1
    assert not bnd.is_active()
    layer = bnkit.BatchNorm2d(3, sync=True)
    plain = bnkit.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    assert torch.equal(layer(x), plain(x))
    assert torch.equal(layer.running_var, plain.running_var)


def test_sync_options_are_checked() -> None:
    with pytest.raises(ValueError, match=r"process_group.*sync=True"):
        bnkit.BatchNorm(3, process_group=object())
    with pytest.raises(TypeError, match="sync must be True or False"):
        bnkit.BatchNorm(3, sync="yes")  # type: ignore[arg-type]
    layer = bnkit.BatchNorm2d(3, sync=True)
    assert "sync=True" in repr(layer)
    layer.sync = False
    assert "sync" not in repr(layer)


def test_layers_with_a_group_copy_by_sharing_it_and_refuse_pickling() -> None:
    group = object()  # stands in for a ProcessGroup: only identity matters here
    layer = bnkit.BatchNorm2d(3, sync=True, process_group=group)
    assert copy.deepcopy(layer).process_group is group
    with pytest.raises(TypeError, match="state_dict"):
        torch.save(layer, io.BytesIO())
    torch.save(bnkit.BatchNorm2d(3, sync=True), io.BytesIO())  # the default group pickles


def test_to_torch_maps_synchronized_layers_to_sync_batch_norm() -> None:
    group = object()
    net = nn.Sequential(bnkit.BatchNorm2d(3, sync=True, process_group=group), bnkit.BatchNorm(3))
    net[1].sync = True
    back = bnkit.to_torch(net)
    assert type(back[0]) is nn.SyncBatchNorm
    assert back[0].process_group is group
    assert type(back[1]) is nn.SyncBatchNorm  # generic layers need no generic_as when synced
    assert back[1].process_group is None
    again = bnkit.convert(back)
    assert again[0].sync
    assert again[0].process_group is group


def test_sync_moments_is_local_without_a_group() -> None:
    x = torch.randn(6, 3, 4, dtype=torch.float64) * 2 + 5
    mean, var, count, elements = bnd.sync_moments(x, (0, 2))
    torch.testing.assert_close(mean.squeeze(), x.mean((0, 2)))
    torch.testing.assert_close(var.squeeze(), x.var((0, 2), unbiased=False))
    assert torch.equal(count.squeeze(), torch.full((3,), 24.0, dtype=torch.float64))
    assert torch.equal(elements, count)
    empty = bnd.sync_moments(torch.zeros(0, 3), 0)
    assert torch.equal(empty.n, torch.zeros(1, 3))
    assert torch.equal(empty.mean, torch.zeros(1, 3))
    assert math.isfinite(float(empty.var.sum()))
