"""Tests for bnkit.checkpoint: save, load, verify.

Oracles: the saved model itself (a round trip must reproduce every tensor bit for bit, with
its dtype), safetensors' own reader for what is in the file, torch's ``load_state_dict`` for
missing/unexpected keys, and hand-made broken states whose defects are known by construction.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import stat
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

import bnkit
from bnkit.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    Finding,
    LoadReport,
    load,
    read_metadata,
    save,
    verify,
)

# ----------------------------------------------------------------------------- helpers


class Net(nn.Module):
    """Conv + torch BN, Linear + bnkit BN, and layers that are not batch norm."""

    def __init__(self, bn1d: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 5)
        self.head = nn.Sequential(nn.Linear(5, 5), (bn1d or bnkit.BatchNorm1d)(5))
        self.group = nn.GroupNorm(2, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.group(torch.relu(self.bn(self.conv(x))))  # (N, 4, 2, 2)
        return self.head(self.fc(self.norm(h.flatten(1))))


def net_input(n: int = 8) -> Tensor:
    return torch.randn(n, 3, 4, 4)


def trained(model: nn.Module, make_input: Callable[[], Tensor], steps: int = 3) -> nn.Module:
    """A few training-mode forwards (statistics move) and perturbed parameters."""
    model.train()
    for _ in range(steps):
        model(make_input())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


def state_copy(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def bits(t: Tensor) -> Tensor:
    """The tensor's bytes: equality of these is bit-identity (NaN payloads included)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same_state(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert list(got) == list(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert got[key].shape == value.shape, key
        assert torch.equal(bits(got[key]), bits(value)), key


def differs(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if k in b and a[k].shape == b[k].shape)


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------- round trips


def test_round_trip_torch_nn_model_is_bit_identical(tmp_path: Path) -> None:
    model = trained(Net(nn.BatchNorm1d), net_input)
    path = tmp_path / "net.safetensors"
    save(model, path)
    fresh = Net(nn.BatchNorm1d)
    assert differs(state_copy(fresh), state_copy(model))
    report = load(fresh, path)
    assert isinstance(report, LoadReport)
    assert report.ok
    assert report.findings == []
    assert report.format == "safetensors"
    assert report.missing_keys == report.unexpected_keys == report.skipped_keys == []
    assert_same_state(state_copy(fresh), state_copy(model))
    model.eval()
    fresh.eval()
    x = net_input()
    assert torch.equal(fresh(x), model(x))


def _bn_model(factory: Callable[[], nn.Module]) -> nn.Module:
    return nn.Sequential(factory())


def _layer_input(layer: nn.Module) -> Tensor:
    if getattr(layer, "axis", 1) == -1:
        return torch.randn(8, 3, 3, 4)
    return torch.randn(8, 4, 3, 3)


BNKIT_LAYERS: dict[str, Callable[[], nn.Module]] = {
    "default-2d": lambda: bnkit.BatchNorm2d(4),
    "renorm": lambda: bnkit.BatchNorm(4, renorm=True, renorm_clipping={"rmax": 3.0, "dmax": 5.0}),
    "zero-debias-both": lambda: bnkit.BatchNorm(4, zero_debias="both", decay=0.9),
    "zero-debias-mean-warmup": lambda: bnkit.BatchNorm(4, zero_debias="mean", warmup=True),
    "ghost-strided-channels-last": lambda: bnkit.BatchNorm(
        4, axis=-1, virtual_batch_size=2, ghost_layout="strided", running_var="biased"
    ),
    "cumulative": lambda: bnkit.BatchNorm(4, momentum=None),
    "no-affine": lambda: bnkit.BatchNorm2d(4, affine=False),
    "no-running-stats": lambda: bnkit.BatchNorm(4, track_running_stats=False),
    "bfloat16": lambda: bnkit.BatchNorm2d(4, dtype=torch.bfloat16),
    "slim-zero-debias": lambda: bnkit.from_slim(
        4, zero_debias_moving_mean=True, scale=True, scope="net/bn"
    ),
    "keras-renorm": lambda: bnkit.from_keras(4, renorm=True, name="bn"),
}


@pytest.mark.parametrize("name", list(BNKIT_LAYERS))
def test_round_trip_bnkit_layers_is_bit_identical(name: str, tmp_path: Path) -> None:
    factory = BNKIT_LAYERS[name]
    model = _bn_model(factory)
    dtype = next(iter(model.parameters()), torch.ones(1)).dtype
    trained(model, lambda: _layer_input(model[0]).to(dtype))
    path = tmp_path / f"{name}.safetensors"
    save(model, path)
    in_file = safetensors.torch.load_file(path)
    assert set(in_file) == set(model.state_dict())  # every buffer of every option is saved
    fresh = _bn_model(factory)
    assert differs(state_copy(fresh), state_copy(model))
    report = load(fresh, path)
    assert report.findings == []
    assert_same_state(state_copy(fresh), state_copy(model))
    model.eval()
    fresh.eval()
    x = _layer_input(model[0]).to(dtype)
    assert torch.equal(fresh(x), model(x))


def test_torch_checkpoint_into_bnkit_layer_with_options_derives_their_statistics(
    tmp_path: Path,
) -> None:
    torch_model = trained(nn.Sequential(nn.BatchNorm2d(4)), lambda: torch.randn(8, 4, 3, 3))
    path = tmp_path / "torch.safetensors"
    save(torch_model, path)
    target = nn.Sequential(bnkit.BatchNorm2d(4, renorm=True, zero_debias="mean"))
    report = load(target, path)  # strict: the option statistics are not "missing"
    assert report.missing_keys == []
    layer = target[0]
    assert torch.equal(layer.running_var, torch_model[0].running_var)
    assert torch.equal(layer.renorm_mean, torch_model[0].running_mean)
    assert torch.equal(layer.running_stddev, torch.sqrt(torch_model[0].running_var))


def test_frozen_flag_round_trips_into_a_fresh_layer(tmp_path: Path) -> None:
    model = trained(nn.Sequential(bnkit.BatchNorm2d(4)), lambda: torch.randn(8, 4, 3, 3))
    model[0].frozen = True
    assert "0.frozen" in model.state_dict()
    path = tmp_path / "frozen.safetensors"
    save(model, path)
    assert json.loads(read_metadata(path)["bnkit.layers"])["0"]["frozen"] is True
    fresh = nn.Sequential(bnkit.BatchNorm2d(4))
    report = load(fresh, path)
    assert report.findings == []
    assert fresh[0].frozen
    assert_same_state(state_copy(fresh), state_copy(model))


def test_skipped_update_counter_round_trips_into_a_fresh_layer(tmp_path: Path) -> None:
    model = trained(nn.Sequential(bnkit.BatchNorm2d(4)), lambda: torch.randn(8, 4, 3, 3))
    bad = torch.randn(8, 4, 3, 3)
    bad[0, 1, 0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the layer's own once-per-layer note about the skip
        model(bad)
    assert int(model[0].num_skipped_updates) == 1
    path = tmp_path / "skipped.safetensors"
    save(model, path)
    fresh = nn.Sequential(bnkit.BatchNorm2d(4))
    report = load(fresh, path)
    assert [f.code for f in report.findings] == ["skipped-updates"]
    assert report.findings[0].severity == "info"
    assert "1 update" in report.findings[0].message
    assert_same_state(state_copy(fresh), state_copy(model))


def test_shared_tied_and_non_contiguous_tensors_are_saved(tmp_path: Path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            shared = bnkit.BatchNorm1d(3)
            self.first = shared
            self.second = shared  # one module under two names
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)
            self.b.weight = self.a.weight  # tied weights
            self.register_buffer("transposed", torch.randn(4, 3).t())  # non-contiguous
            base = torch.randn(6)
            self.register_buffer("low", base[:3])  # disjoint views of one storage
            self.register_buffer("high", base[3:])

    model = trained(Tied(), lambda: torch.randn(8, 3), steps=0)
    model.first(torch.randn(8, 3))
    with pytest.raises((RuntimeError, ValueError)):  # what bnkit.save must work around
        safetensors.torch.save_file(model.state_dict(), tmp_path / "plain.safetensors")
    path = tmp_path / "tied.safetensors"
    save(model, path)
    fresh = Tied()
    load(fresh, path)
    assert_same_state(state_copy(fresh), state_copy(model))
    assert fresh.b.weight is fresh.a.weight
    assert fresh.second is fresh.first
    assert model.transposed.stride() == (1, 3)  # the model's own tensors are untouched


# ----------------------------------------------------------------------- metadata


def test_metadata_records_version_format_and_each_layers_configuration(tmp_path: Path) -> None:
    model = nn.Sequential(
        nn.BatchNorm2d(4, eps=1e-3, momentum=None),
        bnkit.BatchNorm(4, zero_debias="mean", renorm=True, running_var="biased"),
        bnkit.BatchNorm(4, axis=-1, virtual_batch_size=4, ghost_layout="strided"),
        bnkit.from_slim(4, scope="net/bn", decay=0.99),
        bnkit.from_keras(4, name="keras_bn"),
        nn.Linear(4, 4),
    )
    path = tmp_path / "meta.safetensors"
    save(model, path)
    with safetensors.safe_open(path, framework="pt") as f:  # the library's own reader
        metadata = f.metadata()
    assert metadata["format"] == "pt"
    assert metadata["bnkit.format"] == "bnkit.checkpoint"
    assert metadata["bnkit.format_version"] == "1"
    assert metadata["bnkit.version"] == bnkit.__version__
    assert read_metadata(path) == metadata
    layers = json.loads(metadata["bnkit.layers"])
    assert sorted(layers) == ["0", "1", "2", "3", "4"]  # the Linear is not a batch norm
    torch_bn = layers["0"]
    assert torch_bn["class"] == "torch.nn.modules.batchnorm.BatchNorm2d"
    assert (torch_bn["num_features"], torch_bn["eps"], torch_bn["momentum"]) == (4, 1e-3, None)
    assert (torch_bn["axis"], torch_bn["running_var"], torch_bn["preset"]) == (1, "unbiased", None)
    options = layers["1"]
    assert options["class"] == "bnkit.modules.BatchNorm"
    assert options["zero_debias"] == "mean"
    assert options["renorm"] is True
    assert options["running_var"] == "biased"
    assert options["momentum"] == 0.1
    assert options["frozen"] is False
    ghosts = layers["2"]
    assert (ghosts["axis"], ghosts["virtual_batch_size"], ghosts["ghost_layout"]) == (
        -1,
        4,
        "strided",
    )
    slim = layers["3"]
    assert (slim["preset"], slim["tf_scope"], slim["eps"]) == ("tf_slim", "net/bn", 0.001)
    assert slim["momentum"] == pytest.approx(0.01)
    assert slim["momentum"] == model[3].momentum  # exactly, through JSON
    keras = layers["4"]
    assert (keras["preset"], keras["tf_scope"]) == ("tf_keras", "keras_bn")
    report = load(model, path)
    assert report.layers == layers
    assert report.bnkit_version == bnkit.__version__


def test_config_difference_that_changes_outputs_is_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "eps.safetensors"
    save(trained(nn.Sequential(nn.BatchNorm2d(4, eps=1e-3)), lambda: torch.randn(8, 4, 2, 2)), path)
    target = nn.Sequential(bnkit.BatchNorm2d(4))
    with pytest.warns(CheckpointWarning, match="eps"):
        report = load(target, path)  # strict: a warning does not refuse
    [finding] = report.findings
    assert (finding.severity, finding.layer, finding.code) == ("warning", "0", "config-mismatch")
    assert "eps=0.001 in the checkpoint, 1e-05 in the model" in finding.message


# -------------------------------------------------------------------- atomic write


@pytest.mark.parametrize("interrupt", [OSError("disk full"), KeyboardInterrupt()])
def test_crash_mid_write_leaves_old_checkpoint_intact(
    interrupt: BaseException, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "model.safetensors"
    old = trained(Net(), net_input)
    save(old, path)
    before = path.read_bytes()
    real = safetensors.torch.save_file

    def crashing_writer(tensors: dict[str, Tensor], filename: object, metadata: object) -> None:
        real(tensors, filename, metadata)  # type: ignore[arg-type]
        data = Path(str(filename)).read_bytes()
        Path(str(filename)).write_bytes(data[: len(data) // 2])  # half written ...
        raise interrupt  # ... then the crash

    monkeypatch.setattr(safetensors.torch, "save_file", crashing_writer)
    with pytest.raises(type(interrupt)):
        save(trained(Net(), net_input), path)
    assert path.read_bytes() == before
    assert files(tmp_path) == ["model.safetensors"]  # no temporary file left behind
    monkeypatch.undo()
    fresh = Net()
    load(fresh, path)
    assert_same_state(state_copy(fresh), state_copy(old))


def test_failed_rename_leaves_old_checkpoint_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "model.safetensors"
    save(Net(), path)
    before = path.read_bytes()

    def failing_replace(src: object, dst: object) -> None:
        raise PermissionError("replace refused")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(PermissionError):
        save(trained(Net(), net_input), path)
    assert path.read_bytes() == before
    assert files(tmp_path) == ["model.safetensors"]


def test_write_is_synced_then_renamed_over_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"previous")
    synced: list[tuple[int, bool, int]] = []  # (inode, is directory, size) at fsync time
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        info = os.fstat(fd)
        synced.append((info.st_ino, stat.S_ISDIR(info.st_mode), info.st_size))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    save(Net(), str(path))  # str accepted as well as os.PathLike
    final = path.stat()
    # The data was flushed in the file that became the checkpoint, complete, before the rename.
    assert (final.st_ino, False, final.st_size) in synced
    if os.name == "posix":
        assert (tmp_path.stat().st_ino, True) in [(i, d) for i, d, _ in synced]
    assert files(tmp_path) == ["model.safetensors"]
    assert path.read_bytes()[:8] != b"previous"


def test_save_refuses_torch_suffix_and_non_tensors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save(Net(), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="not a tensor"):
        save({"w": torch.ones(2), "step": 3}, tmp_path / "x.safetensors")  # type: ignore[dict-item]
    assert files(tmp_path) == []


# --------------------------------------------------------------- strict refusals


LAYERS = ("bn", "head.1")  # a torch.nn BatchNorm2d and a bnkit BatchNorm1d


def _break(state: dict[str, Tensor], kind: str) -> None:
    for layer in LAYERS:
        mean, var = f"{layer}.running_mean", f"{layer}.running_var"
        if kind == "missing-statistics":
            del state[mean], state[var]
        elif kind == "non-finite":
            state[var][1] = float("nan")
            state[mean][0] = float("inf")
        elif kind == "negative-variance":
            state[var][2] = -0.5
        elif kind == "shape-mismatch":
            state[mean] = torch.zeros(state[mean].numel() + 1)
        elif kind == "never-updated":
            state[mean] = torch.zeros_like(state[mean])
            state[var] = torch.ones_like(state[var])
            state[f"{layer}.num_batches_tracked"] = torch.tensor(12)


KINDS = ("missing-statistics", "non-finite", "negative-variance", "shape-mismatch", "never-updated")
DETAILS = {
    "missing-statistics": "running_mean and running_var are missing",
    "non-finite": "running_var has 1 NaN of",
    "negative-variance": "min -0.5",
    "shape-mismatch": "running_mean has shape",
    "never-updated": "num_batches_tracked is 12",
}


def _broken_checkpoint(tmp_path: Path, kind: str, suffix: str = ".safetensors") -> Path:
    state = state_copy(trained(Net(), net_input))
    _break(state, kind)
    path = tmp_path / f"broken{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(state, path)
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("kind", KINDS)
def test_strict_load_refuses_naming_each_layer_and_leaves_model_untouched(
    kind: str, tmp_path: Path
) -> None:
    path = _broken_checkpoint(tmp_path, kind)
    target = trained(Net(), net_input)
    before = state_copy(target)
    with pytest.raises(CheckpointError) as info:
        load(target, path)
    error = info.value
    assert isinstance(error, RuntimeError)
    assert sorted((f.layer, f.code, f.severity) for f in error.findings) == [
        (layer, kind, "error") for layer in LAYERS
    ]
    text = str(error)
    for layer in LAYERS:
        assert f"{layer} [{kind}]" in text
    assert text.count(DETAILS[kind]) == 2
    assert "Fix:" in text
    assert "strict=False" in text
    assert "the model was not changed" in text
    assert_same_state(state_copy(target), before)


def test_missing_statistics_fix_explains_the_classic_mistake(tmp_path: Path) -> None:
    model = trained(Net(), net_input)
    path = tmp_path / "params.pt"
    torch.save(dict(model.named_parameters()), path)  # buffers forgotten
    with pytest.raises(CheckpointError) as info:
        load(Net(), path)
    fixes = {f.layer: f.fix for f in info.value.findings}
    assert set(fixes) == set(LAYERS)
    for fix in fixes.values():
        assert "model.parameters() only" in fix
        assert "model.state_dict()" in fix
        assert "bnkit.recalibrate(model, data)" in fix


def test_non_strict_load_loads_what_is_there_and_warns_once(tmp_path: Path) -> None:
    source = trained(Net(), net_input)
    state = state_copy(source)
    _break(state, "non-finite")
    path = tmp_path / "nan.safetensors"
    safetensors.torch.save_file(state, path)
    target = Net()
    with pytest.warns(CheckpointWarning) as record:
        report = load(target, path, strict=False)
    assert len(record) == 1
    assert "bn [non-finite]" in str(record[0].message)
    assert "head.1 [non-finite]" in str(record[0].message)
    assert not report.ok
    assert sorted(f.layer for f in report.errors) == sorted(LAYERS)
    assert_same_state(state_copy(target), state)  # NaNs included: loaded as it was


def test_non_strict_load_keeps_statistics_that_are_missing(tmp_path: Path) -> None:
    source = trained(Net(), net_input)
    state = state_copy(source)
    _break(state, "missing-statistics")
    path = tmp_path / "missing.safetensors"
    safetensors.torch.save_file(state, path)
    target = Net()
    own = state_copy(target)
    with pytest.warns(CheckpointWarning):
        report = load(target, path, strict=False)
    assert sorted(report.missing_keys) == sorted(
        f"{layer}.{name}" for layer in LAYERS for name in ("running_mean", "running_var")
    )
    loaded = state_copy(target)
    for key in loaded:
        want = own[key] if key in report.missing_keys else state[key]
        assert torch.equal(loaded[key], want), key


def test_non_strict_load_skips_tensors_of_the_wrong_shape(tmp_path: Path) -> None:
    source = trained(Net(), net_input)
    state = state_copy(source)
    _break(state, "shape-mismatch")
    state["fc.weight"] = torch.zeros(6, 16)
    path = tmp_path / "shape.safetensors"
    safetensors.torch.save_file(state, path)
    target = Net()
    own = state_copy(target)
    with pytest.warns(CheckpointWarning):
        report = load(target, path, strict=False)
    assert sorted(report.skipped_keys) == ["bn.running_mean", "fc.weight", "head.1.running_mean"]
    assert ("fc", "shape-mismatch") in [(f.layer, f.code) for f in report.findings]
    loaded = state_copy(target)
    for key in loaded:
        assert torch.equal(loaded[key], own[key] if key in report.skipped_keys else state[key])


def test_missing_and_unexpected_keys_match_torch(tmp_path: Path) -> None:
    source = trained(Net(), net_input)
    state = state_copy(source)
    del state["fc.bias"]
    state["extra.weight"] = torch.ones(2)
    path = tmp_path / "keys.safetensors"
    safetensors.torch.save_file(state, path)
    with pytest.raises(CheckpointError) as info:
        load(Net(), path)
    codes = sorted((f.layer, f.code) for f in info.value.findings)
    assert codes == [("extra", "unexpected-keys"), ("fc", "missing-keys")]
    oracle = Net().load_state_dict(state, strict=False)
    target = Net()
    with pytest.warns(CheckpointWarning):
        report = load(target, path, strict=False)
    assert report.missing_keys == oracle.missing_keys == ["fc.bias"]
    assert report.unexpected_keys == oracle.unexpected_keys == ["extra.weight"]


# -------------------------------------------------------------- torch.load files


def test_torch_files_load_through_weights_only(tmp_path: Path) -> None:
    model = trained(Net(), net_input)
    for name, legacy in (("model.pt", False), ("model.pth", True)):
        path = tmp_path / name
        torch.save(model.state_dict(), path, _use_new_zipfile_serialization=not legacy)
        fresh = Net()
        report = load(fresh, path)
        assert (report.format, report.wrapper_key, report.findings) == ("torch", None, [])
        assert_same_state(state_copy(fresh), state_copy(model))


@pytest.mark.parametrize(
    ("wrap", "key"),
    [
        (lambda sd: {"state_dict": sd, "epoch": 3, "optimizer": {"lr": 0.1}}, "state_dict"),
        (lambda sd: {"model": sd, "step": 10}, "model"),
        (
            lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {"state": {}}},
            "model_state_dict",
        ),
        (lambda sd: {"model": {"state_dict": sd}, "epoch": 1}, "model.state_dict"),
    ],
)
def test_common_wrappers_are_unwrapped_and_named(
    wrap: Callable[[dict[str, Tensor]], object], key: str, tmp_path: Path
) -> None:
    model = trained(Net(), net_input)
    path = tmp_path / "wrapped.pt"
    torch.save(wrap(model.state_dict()), path)
    fresh = Net()
    report = load(fresh, path)
    assert report.wrapper_key == key
    assert key in str(report)
    assert_same_state(state_copy(fresh), state_copy(model))


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_data_parallel_and_compile_prefixes_are_removed(prefix: str, tmp_path: Path) -> None:
    model = trained(Net(), net_input)
    path = tmp_path / "ddp.pt"
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, path)
    fresh = Net()
    report = load(fresh, path)
    assert report.stripped_prefix == prefix
    assert_same_state(state_copy(fresh), state_copy(model))


def test_file_without_a_state_dict_is_refused_listing_its_keys(tmp_path: Path) -> None:
    path = tmp_path / "opt.pt"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, path)
    with pytest.raises(CheckpointError, match=r"no state dict.*'epoch', 'optimizer'"):
        load(Net(), path)


class Evil:
    """A pickle payload: unpickling it runs a shell command that writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"echo pwned > {shlex.quote(str(self.marker))}",))


def _write_evil(path: Path, marker: Path, how: str) -> None:
    if how == "raw-pickle":  # a plain pickle (no tensors: their reducer is refused first)
        with open(path, "wb") as f:
            pickle.dump({"bn.bias": Evil(marker)}, f, protocol=2)  # torch.save's protocol
    else:
        payload = {"bn.weight": torch.ones(4), "bn.bias": Evil(marker)}
        torch.save(payload, path, _use_new_zipfile_serialization=how == "zip")


@pytest.mark.parametrize("how", ["zip", "legacy", "raw-pickle"])
def test_malicious_pickle_is_refused_without_running_it(how: str, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    _write_evil(path, marker, how)
    with pytest.raises(CheckpointError, match=r"refused.*weights_only=True") as info:
        load(Net(), path)
    assert "posix.system" in str(info.value) or "nt.system" in str(info.value)
    with pytest.raises(CheckpointError, match="refused"):
        verify(path)
    assert not marker.exists()
    # Control: the payload is real; unpickling it unsafely runs it.
    if how == "raw-pickle":
        with open(path, "rb") as f:
            pickle.load(f)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "empty"),
        (b"not a checkpoint at all", "neither a safetensors file nor"),
    ],
)
def test_unreadable_files_are_refused(content: bytes, match: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load(Net(), path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_truncated_checkpoint_is_refused(suffix: str, tmp_path: Path) -> None:
    model = trained(Net(), net_input)
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save(model, path)
    else:
        torch.save(model.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    target = Net()
    before = state_copy(target)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load(target, path)
    assert_same_state(state_copy(target), before)


# ------------------------------------------------------------------------- verify


HEALTHY: dict[str, Callable[[], nn.Module]] = {
    "fresh-net": Net,
    "trained-net": lambda: trained(Net(), net_input),
    "fresh-options": lambda: nn.Sequential(*(f() for f in BNKIT_LAYERS.values())),
    "trained-bnkit": lambda: trained(
        nn.Sequential(bnkit.BatchNorm2d(4, renorm=True), bnkit.BatchNorm2d(4, zero_debias="both")),
        lambda: torch.randn(8, 4, 3, 3),
    ),
    "no-batch-norm": lambda: nn.Sequential(
        nn.Conv2d(3, 3, 1), nn.LayerNorm(3), nn.Linear(3, 3), nn.InstanceNorm2d(3, affine=True)
    ),
    "instance-norm-stats": lambda: trained(
        nn.Sequential(nn.InstanceNorm2d(3, track_running_stats=True)),
        lambda: torch.randn(2, 3, 4, 4),
    ),
}


@pytest.mark.parametrize("name", list(HEALTHY))
def test_verify_finds_nothing_in_healthy_models(name: str, tmp_path: Path) -> None:
    model = HEALTHY[name]()
    state = model.state_dict()
    assert verify(model) == []
    assert verify(state) == []
    assert verify(state, model=model) == []
    path = tmp_path / "healthy.safetensors"
    save(model, path)
    assert verify(path) == []
    assert verify(path, model=model) == []


def test_state_dict_mode_does_not_flag_linear_conv_or_layer_norm() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 1), nn.LayerNorm(4), nn.GroupNorm(2, 4))
    state = state_copy(model)
    state["0.weight"] = torch.eye(4)
    state["0.bias"] = torch.zeros(4)  # initial-looking values in non-BN layers
    state["2.bias"] = torch.full((4,), 3.0)  # a trained LayerNorm next to no statistics
    assert verify(state) == []


def test_verify_state_dict_identifies_layers_by_key_structure() -> None:
    state = state_copy(trained(Net(), net_input))
    _break(state, "non-finite")
    del state["head.1.running_mean"], state["head.1.running_var"]
    state["head.1.running_mean"] = torch.zeros(5)  # only the variance is missing now
    findings = verify(state)
    assert [(f.layer, f.code) for f in findings] == [
        ("bn", "non-finite"),
        ("head.1", "missing-statistics"),
    ]
    assert "running_var has 1 NaN of 4 values (channel 1)" in findings[0].message
    assert "running_mean has 1 inf of 4 values (channel 0)" in findings[0].message
    assert "running_var is missing" in findings[1].message


def test_verify_model_checks_its_own_buffers() -> None:
    model = trained(Net(), net_input)
    model.bn.running_var[3] = -2.0
    [finding] = verify(model)
    assert (finding.severity, finding.layer, finding.code) == ("error", "bn", "negative-variance")
    assert "1 negative values of 4 (min -2; channel 3)" in finding.message
    assert finding.fix


def test_never_updated_uses_the_layers_configured_initial_values() -> None:
    layer = bnkit.BatchNorm(4, running_var_init=2.0, running_mean_init=[0.0, 1.0, 2.0, 3.0])
    layer.num_batches_tracked.fill_(7)
    model = nn.Sequential(layer)
    assert [f.code for f in verify(model)] == ["never-updated"]
    assert verify(model.state_dict()) == []  # without the model: mean 0 / var 1 are initial
    with torch.no_grad():
        layer.running_mean.zero_()
        layer.running_var.fill_(1.0)
    assert verify(model) == []  # moved away from this layer's initial values
    assert [f.code for f in verify(model.state_dict())] == ["never-updated"]


def test_fresh_statistics_are_fine_until_the_layer_counts_steps() -> None:
    model = Net()
    assert verify(model) == []
    model.bn.num_batches_tracked.fill_(1)
    findings = verify(model)
    assert [(f.layer, f.code, f.severity) for f in findings] == [("bn", "never-updated", "error")]
    assert "num_batches_tracked is 1" in findings[0].message
    assert "bnkit.recalibrate(model, data)" in findings[0].fix


def test_trained_affine_next_to_initial_statistics_without_counter_is_a_warning() -> None:
    state = state_copy(trained(nn.Sequential(nn.BatchNorm1d(3)), lambda: torch.randn(8, 3)))
    state["0.running_mean"] = torch.zeros(3)
    state["0.running_var"] = torch.ones(3)
    del state["0.num_batches_tracked"]  # as in a checkpoint converted from TensorFlow
    [finding] = verify(state)
    assert (finding.severity, finding.code) == ("warning", "initial-statistics")
    assert "weight and bias were trained" in finding.message


def test_verify_against_a_model_reports_keys_and_shapes() -> None:
    model = Net()
    state = state_copy(trained(Net(), net_input))
    state["fc.weight"] = torch.zeros(5, 17)
    del state["conv.bias"]
    findings = verify(state, model=model)
    assert sorted((f.layer, f.code) for f in findings) == [
        ("conv", "missing-keys"),
        ("fc", "shape-mismatch"),
    ]
    assert "fc.weight" not in findings[0].message  # messages name the tensor within the module
    assert any("weight has shape (5, 17), the model's has (5, 16)" in f.message for f in findings)


def test_finding_is_a_small_immutable_record() -> None:
    finding = Finding("error", "", "non-finite", "running_var has 1 NaN of 3 values.", "fix it")
    assert (
        str(finding) == "<root> [non-finite] error: running_var has 1 NaN of 3 values. Fix: fix it"
    )
    with pytest.raises(AttributeError):
        finding.code = "other"  # type: ignore[misc]


def test_state_dict_saves_without_layer_configuration(tmp_path: Path) -> None:
    model = trained(Net(), net_input)
    path = tmp_path / "state.safetensors"
    save(model.state_dict(), path)
    assert json.loads(read_metadata(path)["bnkit.layers"]) == {}
    fresh = Net()
    assert load(fresh, path).findings == []
    assert_same_state(state_copy(fresh), state_copy(model))


def test_file_from_a_newer_checkpoint_format_is_flagged(tmp_path: Path) -> None:
    model = trained(Net(), net_input)
    path = tmp_path / "future.safetensors"
    metadata = {"bnkit.format": "bnkit.checkpoint", "bnkit.format_version": "2"}
    safetensors.torch.save_file(model.state_dict(), path, metadata=metadata)
    with pytest.warns(CheckpointWarning, match="newer-format"):
        report = load(Net(), path)
    assert [(f.code, f.severity) for f in report.findings] == [("newer-format", "warning")]
    torch.save(model.state_dict(), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_metadata(tmp_path / "model.pt")
