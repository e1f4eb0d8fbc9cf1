"""bnkit.tf_import without TensorFlow: Keras files written with h5py, TF variables as dicts.

The Keras writers below reproduce byte-for-byte layouts observed from tf_keras 2.21
(``model.save('m.h5')``, ``save_weights('w.h5')``, ``save_weights('w.weights.h5')``,
``model.save('m.keras')``); tests/parity/test_checkpoint_import.py checks the same loader
against files TensorFlow itself writes. The oracle for loaded models is a NumPy forward
pass of the Keras model in its own (NHWC, ``[in, out]`` kernel) layout.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
import types
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py  # the dev extra installs it: Keras files are read without TensorFlow
import numpy as np
import pytest
import torch
from torch import nn

import bnkit
from bnkit.tf_import import (
    CheckpointImportError,
    ImportReport,
    load_keras_weights,
    load_tf_checkpoint,
    load_tf_variables,
)

EPS = 1e-3
RNG = np.random.default_rng(0)

# One Keras layer: (name, class_name, config, [(variable name, value), ...]) in model order.
Layer = tuple[str, str, dict[str, Any], list[tuple[str, np.ndarray]]]


def f32(*shape: int, low: float | None = None, high: float | None = None) -> np.ndarray:
    if low is not None and high is not None:
        return RNG.uniform(low, high, size=shape).astype(np.float32)
    return RNG.normal(size=shape).astype(np.float32)


def bn_layer(
    name: str,
    c: int,
    *,
    center: bool = True,
    scale: bool = True,
    renorm: bool = False,
    stats: tuple[np.ndarray, np.ndarray] | None = None,
) -> Layer:
    weights: list[tuple[str, np.ndarray]] = []
    if scale:
        weights.append(("gamma", f32(c, low=0.5, high=1.5)))
    if center:
        weights.append(("beta", f32(c)))
    mean, var = stats if stats is not None else (f32(c), f32(c, low=0.5, high=2.0))
    weights += [("moving_mean", mean), ("moving_variance", var)]
    if renorm:
        weights += [
            ("moving_stddev", np.sqrt(var + EPS).astype(np.float32)),
            ("renorm_mean", f32(c)),
            ("renorm_stddev", f32(c, low=0.5, high=1.5)),
        ]
    config = {
        "name": name,
        "axis": [3],
        "epsilon": EPS,
        "center": center,
        "scale": scale,
        "renorm": renorm,
    }
    return name, "BatchNormalization", config, weights


def dense_layer(name: str, n_in: int, n_out: int) -> Layer:
    config = {"name": name, "units": n_out, "use_bias": True}
    return name, "Dense", config, [("kernel", f32(n_in, n_out)), ("bias", f32(n_out))]


def conv_layer(name: str, k: int, c_in: int, c_out: int) -> Layer:
    config = {"name": name, "filters": c_out, "kernel_size": [k, k], "use_bias": True}
    return name, "Conv2D", config, [("kernel", f32(k, k, c_in, c_out)), ("bias", f32(c_out))]


def plain_layer(name: str, class_name: str) -> Layer:
    return name, class_name, {"name": name}, []


def keras_model() -> list[Layer]:
    """Conv2D(4, 3) -> BN -> relu -> Flatten -> Dense(5) -> BN -> Dense(2) on (6, 6, 3)."""
    return [
        conv_layer("conv2d", 3, 3, 4),
        bn_layer("batch_normalization", 4),
        plain_layer("activation", "Activation"),
        plain_layer("flatten", "Flatten"),
        dense_layer("dense", 64, 5),
        bn_layer("batch_normalization_1", 5),
        dense_layer("dense_1", 5, 2),
    ]


def value(layers: list[Layer], name: str, var: str) -> np.ndarray:
    for layer_name, _, _, weights in layers:
        if layer_name == name:
            return dict(weights)[var]
    raise KeyError(name)


def keras_forward(x: np.ndarray, layers: list[Layer]) -> np.ndarray:
    """The Keras model in float64 NumPy, channels-last, inference mode."""
    h = x.astype(np.float64)
    for _, class_name, _config, weights in layers:
        w = {k: v.astype(np.float64) for k, v in weights}
        if class_name == "Conv2D":
            k = w["kernel"]
            kh, kw = k.shape[:2]
            rows, cols = h.shape[1] - kh + 1, h.shape[2] - kw + 1
            out = np.zeros((h.shape[0], rows, cols, k.shape[3]))
            for i in range(kh):
                for j in range(kw):
                    out += np.einsum("nyxc,co->nyxo", h[:, i : i + rows, j : j + cols], k[i, j])
            h = out + w["bias"]
        elif class_name == "BatchNormalization":
            gamma = w.get("gamma", np.ones_like(w["moving_mean"]))
            beta = w.get("beta", np.zeros_like(w["moving_mean"]))
            h = (h - w["moving_mean"]) / np.sqrt(w["moving_variance"] + EPS) * gamma + beta
        elif class_name == "Activation":
            h = np.maximum(h, 0.0)
        elif class_name == "Flatten":
            h = h.reshape(h.shape[0], -1)
        elif class_name == "Dense":
            h = h @ w["kernel"] + w["bias"]
    return h


class TorchNet(nn.Module):
    """The same network in PyTorch (NCHW convs, an NHWC flatten like Keras')."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = bnkit.from_keras(4, axis=1)
        self.fc = nn.Linear(64, 5)
        self.bn_fc = nn.BatchNorm1d(5, eps=EPS)
        self.out = nn.Linear(5, 2)

    def forward(self, x_nhwc: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x_nhwc.permute(0, 3, 1, 2))))
        h = h.permute(0, 2, 3, 1).flatten(1)
        return self.out(self.bn_fc(self.fc(h)))


# ----------------------------------------------------------- writers (as tf_keras)


def _save_attr(group: Any, name: str, data: list[bytes], chunks: int = 1) -> None:
    """tf_keras' save_attributes_to_hdf5_group (chunks > 1: as for > 64 KiB of names)."""
    if chunks == 1:
        group.attrs[name] = data
    else:
        for i, chunk in enumerate(np.array_split(np.asarray(data), chunks)):
            group.attrs[f"{name}{i}"] = chunk


def _write_legacy_weights(root: Any, layers: list[Layer], chunks: int = 1) -> None:
    _save_attr(root, "layer_names", [n.encode("utf8") for n, *_ in layers], chunks)
    root.attrs["backend"] = b"tensorflow"
    root.attrs["keras_version"] = b"2.21.0"
    for name, _, _, weights in sorted(layers, key=lambda layer: layer[0]):
        group = root.create_group(name)
        names = [f"{name}/{var}:0".encode() for var, _ in weights]
        _save_attr(group, "weight_names", names)
        for weight_name, (_, val) in zip(names, weights, strict=True):
            dset = group.create_dataset(weight_name, val.shape, dtype=val.dtype)
            dset[...] = val
    _save_attr(root.create_group("top_level_model_weights"), "weight_names", [])


def write_legacy_weights(path: Path, layers: list[Layer], chunks: int = 1) -> Path:
    """model.save_weights('w.h5')."""
    with h5py.File(path, "w") as f:
        _write_legacy_weights(f, layers, chunks)
    return path


def _config(layers: list[Layer]) -> dict[str, Any]:
    items = [
        {
            "module": "keras.layers",
            "class_name": "InputLayer",
            "config": {"batch_input_shape": [None, 6, 6, 3], "name": "input_1"},
            "registered_name": None,
        }
    ]
    items += [
        {"module": "keras.layers", "class_name": cls, "config": cfg, "registered_name": None}
        for _, cls, cfg, _ in layers
    ]
    return {
        "module": "keras",
        "class_name": "Sequential",
        "config": {"name": "sequential", "layers": items},
        "registered_name": None,
    }


def write_legacy_model(path: Path, layers: list[Layer], step: int = 7) -> Path:
    """model.save('m.h5'): weights under model_weights/, SGD state under optimizer_weights/."""
    with h5py.File(path, "w") as f:
        f.attrs["backend"] = "tensorflow"
        f.attrs["keras_version"] = "2.21.0"
        f.attrs["model_config"] = json.dumps(_config(layers))
        f.attrs["training_config"] = json.dumps({"loss": "mse"})
        _write_legacy_weights(f.create_group("model_weights"), layers)
        opt = f.create_group("optimizer_weights")
        names = [b"iteration:0"] + [
            f"SGD/m/{n}/{var}:0".encode() for n, _, _, w in layers for var, _ in w[:2]
        ]
        _save_attr(opt, "weight_names", names)
        opt.create_dataset(b"iteration:0", (), dtype=np.int64)[()] = step
        for weight_name in names[1:]:
            n, var = weight_name.decode()[6:-2].split("/")
            val = value(layers, n, var)
            opt.create_dataset(weight_name, val.shape, dtype=val.dtype)[...] = 0.1
    return path


def _snake(name: str) -> str:
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _write_v3(f: Any, layers: list[Layer], step: int | None) -> None:
    used: dict[str, int] = {}
    for _, cls, _, weights in layers:
        name = _snake(cls)
        used[name] = used.get(name, -1) + 1
        name = f"{name}_{used[name]}" if used[name] else name
        group = f.create_group(f"layers/{name}").create_group("vars")
        for i, (_, val) in enumerate(weights):
            group[str(i)] = val
    f.create_group("vars")
    if step is not None:
        opt = f.create_group("optimizer").create_group("vars")
        opt["0"] = np.int64(step)
        for i, (*_, weights) in enumerate(w for w in layers if w[3]):
            opt[str(i + 1)] = np.zeros_like(weights[0][1])
        metrics = f.create_group("metrics/mean").create_group("vars")
        metrics["0"] = np.float32(3.0)
        metrics["1"] = np.float32(2.0)


def write_weights_h5(path: Path, layers: list[Layer], step: int | None = 7) -> Path:
    """model.save_weights('w.weights.h5'): positions only, no names."""
    with h5py.File(path, "w") as f:
        _write_v3(f, layers, step)
    return path


def write_keras(path: Path, layers: list[Layer], step: int | None = 7) -> Path:
    """model.save('m.keras'): a zip of metadata.json, config.json, model.weights.h5."""
    weights = path.with_suffix(".tmp.h5")
    write_weights_h5(weights, layers, step)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": "2.21.0"}))
        archive.writestr("config.json", json.dumps(_config(layers)))
        archive.write(weights, "model.weights.h5")
    weights.unlink()
    return path


WRITERS: dict[str, Callable[[Path, list[Layer]], Path]] = {
    "w.h5": write_legacy_weights,
    "m.h5": write_legacy_model,
    "w.weights.h5": write_weights_h5,
    "m.keras": write_keras,
}


def x_input() -> np.ndarray:
    return RNG.normal(size=(3, 6, 6, 3)).astype(np.float32)


def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(x).to(next(model.parameters()).dtype)).double().numpy()


# ------------------------------------------------------------------------- Keras


@pytest.mark.parametrize("filename", list(WRITERS))
def test_keras_files_load_and_predict_like_keras(tmp_path: Path, filename: str) -> None:
    layers = keras_model()
    path = WRITERS[filename](tmp_path / filename, layers)
    model = TorchNet()
    report = load_keras_weights(model, path)
    x = x_input()
    np.testing.assert_allclose(predict(model, x), keras_forward(x, layers), rtol=1e-5, atol=1e-5)
    assert list(report.loaded) == ["conv", "bn", "fc", "bn_fc", "out"]
    assert report.ok
    assert report.loaded["bn"].variables.keys() == {"weight", "bias", "running_mean", "running_var"}
    np.testing.assert_array_equal(
        model.bn_fc.running_var.numpy(), value(layers, "batch_normalization_1", "moving_variance")
    )
    if filename == "w.h5":
        assert report.step is None
        assert report.loaded["bn"].scope == "batch_normalization"
        assert (
            report.loaded["bn"].variables["weight"]
            == "batch_normalization/batch_normalization/gamma:0"
        )
    else:
        assert report.step == 7
        assert report.ignored_variables  # optimizer state, never loaded


def test_chunked_layer_names_are_read(tmp_path: Path) -> None:
    layers = keras_model()
    path = write_legacy_weights(tmp_path / "w.h5", layers, chunks=3)
    with h5py.File(path, "r") as f:
        assert "layer_names" not in f.attrs
        assert "layer_names2" in f.attrs
    model = TorchNet()
    load_keras_weights(model, path)
    x = x_input()
    np.testing.assert_allclose(predict(model, x), keras_forward(x, layers), rtol=1e-5, atol=1e-5)


def test_generated_names_sort_naturally(tmp_path: Path) -> None:
    """batch_normalization_10 comes after batch_normalization_9 (.weights.h5 has no order)."""
    layers = [bn_layer("batch_normalization" + (f"_{i}" if i else ""), i + 1) for i in range(12)]
    model = nn.Sequential(*[bnkit.BatchNorm(i + 1, eps=EPS) for i in range(12)])
    load_keras_weights(model, write_weights_h5(tmp_path / "w.weights.h5", layers))
    for i, (*_, weights) in enumerate(layers):
        np.testing.assert_array_equal(model[i].running_mean.numpy(), dict(weights)["moving_mean"])


def test_tf_scope_names_the_keras_layer(tmp_path: Path) -> None:
    layers = [bn_layer("first", 3), bn_layer("second", 3)]
    model = nn.Sequential(bnkit.from_keras(3, name="second"), bnkit.from_keras(3, name="first"))
    for writer in (write_legacy_weights, write_keras):
        report = load_keras_weights(model, writer(tmp_path / f"f{writer.__name__}", layers))
        assert report.loaded["0"].scope.endswith("batch_normalization_1") or (
            report.loaded["0"].scope == "second"
        )
        np.testing.assert_array_equal(
            model[0].bias.detach().numpy(), value(layers, "second", "beta")
        )
        np.testing.assert_array_equal(
            model[1].bias.detach().numpy(), value(layers, "first", "beta")
        )


def test_mapping_dict_and_callable(tmp_path: Path) -> None:
    layers = [bn_layer("a", 3), bn_layer("b", 3)]
    path = write_legacy_weights(tmp_path / "w.h5", layers)
    model = nn.Sequential(nn.BatchNorm1d(3, eps=EPS), nn.BatchNorm1d(3, eps=EPS))
    load_keras_weights(model, path, mapping={"0": "b", "1": "a"})
    np.testing.assert_array_equal(model[0].running_mean.numpy(), value(layers, "b", "moving_mean"))
    np.testing.assert_array_equal(model[1].running_mean.numpy(), value(layers, "a", "moving_mean"))
    fresh = nn.Sequential(nn.BatchNorm1d(3, eps=EPS), nn.BatchNorm1d(3, eps=EPS))
    report = load_keras_weights(fresh, path, mapping=lambda name: "a" if name == "0" else None)
    np.testing.assert_array_equal(fresh[0].running_mean.numpy(), value(layers, "a", "moving_mean"))
    assert fresh[1].running_mean.eq(0).all()
    assert report.skipped_modules == ["1"]
    assert "b/b/moving_mean:0" in report.unused_variables


def test_mapping_with_unknown_module_is_an_error(tmp_path: Path) -> None:
    path = write_legacy_weights(tmp_path / "w.h5", [bn_layer("a", 3)])
    model = nn.Sequential(nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match=r"does not have: 'bn'.*model.named_modules"):
        load_keras_weights(model, path, mapping={"bn": "a"})


def test_count_mismatch_names_both_sides_and_loads_nothing(tmp_path: Path) -> None:
    path = write_legacy_weights(tmp_path / "w.h5", [bn_layer("a", 3), bn_layer("b", 3)])
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3), nn.BatchNorm1d(3))
    with pytest.raises(
        CheckpointImportError, match=r"3 batch norm module\(s\).*2 such layer"
    ) as err:
        load_keras_weights(model, path)
    message = str(err.value)
    assert "'a', 'b'" in message
    assert "mapping=" in message
    assert "strict=False" in message
    assert all(m.running_mean.eq(0).all() for m in model)
    assert isinstance(err.value.report, ImportReport)


def test_shape_mismatch_is_refused_with_both_shapes(tmp_path: Path) -> None:
    layers = keras_model()
    path = write_legacy_weights(tmp_path / "w.h5", layers)
    model = TorchNet()
    model.out = nn.Linear(5, 3)
    before = model.bn.running_mean.clone()
    with pytest.raises(
        CheckpointImportError, match=re.escape("out.weight: dense_1/dense_1/kernel:0")
    ) as err:
        load_keras_weights(model, path)
    assert "[5, 2]" in str(err.value)
    assert "[3, 5]" in str(err.value)
    assert torch.equal(model.bn.running_mean, before)  # nothing loaded
    with pytest.warns(UserWarning, match="expects"):
        report = load_keras_weights(model, path, strict=False)
    assert "out" not in report.loaded
    np.testing.assert_array_equal(
        model.bn.running_mean.numpy(), value(layers, "batch_normalization", "moving_mean")
    )


def _never_updated(c: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(c, np.float32), np.ones(c, np.float32)


def test_never_updated_statistics_are_refused_naming_each_layer(tmp_path: Path) -> None:
    layers = keras_model()
    layers[1] = bn_layer("batch_normalization", 4, stats=_never_updated(4))
    layers[5] = bn_layer("batch_normalization_1", 5, stats=_never_updated(5))
    path = write_legacy_weights(tmp_path / "w.h5", layers)
    model = TorchNet()
    with pytest.raises(CheckpointImportError) as err:
        load_keras_weights(model, path)
    message = str(err.value)
    assert "'bn' <- 'batch_normalization'" in message
    assert "'bn_fc' <- 'batch_normalization_1'" in message
    assert "exactly 0" in message
    assert "UPDATE_OPS" in message
    assert "strict=False" in message
    assert "bnkit.recalibrate(model, train_inputs)" in message

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = load_keras_weights(model, path, strict=False)
    assert len(caught) == 1
    assert "2 problem(s)" in str(caught[0].message)
    assert [p.split(" <- ")[0] for p in report.problems] == ["bn", "bn_fc"]
    np.testing.assert_array_equal(
        model.bn.weight.detach().numpy(), value(layers, "batch_normalization", "gamma")
    )


def test_the_recipe_in_the_error_reestimates_the_statistics(tmp_path: Path) -> None:
    """The code the never-updated error offers runs as printed and re-estimates the layer."""
    dense = dense_layer("dense", 4, 3)
    path = write_legacy_weights(
        tmp_path / "w.h5", [dense, bn_layer("batch_normalization", 3, stats=_never_updated(3))]
    )
    model = nn.Sequential(nn.Linear(4, 3), bnkit.BatchNorm1d(3, eps=EPS, momentum=0.3))
    with pytest.raises(CheckpointImportError) as err:
        load_keras_weights(model, path)
    recipe = textwrap.dedent(
        "\n".join(line for line in str(err.value).splitlines() if line.startswith(" " * 9))
    )
    assert "bnkit.recalibrate(model, train_inputs)" in recipe
    train_inputs = [torch.from_numpy(f32(8, 4)) for _ in range(5)]
    namespace = {"bnkit": bnkit, "model": model, "path": path, "train_inputs": train_inputs}
    with pytest.warns(UserWarning, match=r"strict=False\) loaded 2 module"):
        exec(recipe, namespace)
    w = dict(dense[3])
    hs = [x.double().numpy() @ w["kernel"].astype(np.float64) + w["bias"] for x in train_inputs]
    pooled = np.concatenate(hs)
    # Population statistics of the layer's input over all batches (unbiased, as torch feeds).
    np.testing.assert_allclose(model[1].running_mean.numpy(), pooled.mean(0), rtol=1e-5)
    np.testing.assert_allclose(model[1].running_var.numpy(), pooled.var(0, ddof=1), rtol=1e-5)
    assert model[1].momentum == pytest.approx(0.3)
    assert not model.training


def test_the_recipe_works_for_zero_debiased_layers() -> None:
    """The recipe also repairs a slim zero-debias layer (its shadow follows the new value)."""
    v = {
        "fc/weights": f32(4, 3),
        "fc/BatchNorm/beta": f32(3),
        "fc/BatchNorm/moving_mean": np.zeros(3, np.float32),
        "fc/BatchNorm/moving_variance": np.ones(3, np.float32),
        "global_step": np.int64(50),
    }
    model = nn.Sequential()
    model.add_module(
        "fc",
        nn.Sequential(
            nn.Linear(4, 3, bias=False), bnkit.from_slim(3, decay=0.9, zero_debias_moving_mean=True)
        ),
    )
    with pytest.raises(CheckpointImportError) as err:
        load_tf_variables(model, v)
    recipe = textwrap.dedent(
        "\n".join(line for line in str(err.value).splitlines() if line.startswith(" " * 9))
    )
    recipe = recipe.replace("import bnkit", "")  # keep the stand-in below
    train_inputs = [torch.from_numpy(f32(8, 4)) for _ in range(4)]
    fake = types.SimpleNamespace(  # what bnkit.load_tf_checkpoint would do with that file
        load_tf_checkpoint=lambda m, path, strict: load_tf_variables(m, v, strict=strict),
        recalibrate=bnkit.recalibrate,
    )
    namespace = {"bnkit": fake, "model": model, "path": "ckpt", "train_inputs": train_inputs}
    with pytest.warns(UserWarning, match="exactly 0"):
        exec(recipe, namespace)
    inputs = np.concatenate([x.double().numpy() for x in train_inputs])
    expected = (inputs @ v["fc/weights"].astype(np.float64)).mean(0)
    np.testing.assert_allclose(model.fc[1].running_mean.numpy(), expected, rtol=1e-5)


def test_initial_statistics_of_an_untrained_model_load(tmp_path: Path) -> None:
    """0/1 statistics with gamma=1, beta=0 and no step: a fresh model, not a bug."""
    layer = (
        "batch_normalization",
        "BatchNormalization",
        {"name": "batch_normalization"},
        [
            ("gamma", np.ones(3, np.float32)),
            ("beta", np.zeros(3, np.float32)),
            ("moving_mean", np.zeros(3, np.float32)),
            ("moving_variance", np.ones(3, np.float32)),
        ],
    )
    report = load_keras_weights(nn.BatchNorm1d(3), write_legacy_weights(tmp_path / "w.h5", [layer]))
    assert report.ok
    assert list(report.loaded) == ["<model>"]


def test_keras_renorm_and_virtual_batch_shapes(tmp_path: Path) -> None:
    name, cls, cfg, weights = bn_layer("bn", 3, renorm=True)
    weights = [(n, v.reshape(1, 1, 3)) for n, v in weights]  # virtual_batch_size keeps (1, .., C)
    layers = [(name, cls, cfg, weights)]
    module = bnkit.from_keras(3, renorm=True)
    report = load_keras_weights(module, write_keras(tmp_path / "m.keras", layers))
    assert (
        report.loaded["<model>"].variables["running_stddev"] == "layers/batch_normalization/vars/4"
    )
    np.testing.assert_array_equal(
        module.renorm_stddev.numpy(), dict(weights)["renorm_stddev"].ravel()
    )
    plain = nn.BatchNorm1d(3)  # a renorm layer into a plain one: inference needs mean/var only
    report = load_keras_weights(plain, write_legacy_weights(tmp_path / "w.h5", layers))
    np.testing.assert_array_equal(
        plain.running_var.numpy(), dict(weights)["moving_variance"].ravel()
    )
    assert "bn/bn/renorm_mean:0" in report.unused_variables


def test_renorm_statistics_absent_from_file_are_derived(tmp_path: Path) -> None:
    layers = [bn_layer("bn", 3)]
    module = bnkit.from_keras(3, renorm=True)
    report = load_keras_weights(module, write_legacy_weights(tmp_path / "w.h5", layers))
    var = value(layers, "bn", "moving_variance")
    np.testing.assert_allclose(
        module.running_stddev.numpy(), np.sqrt(var.astype(np.float64)), rtol=1e-6
    )
    np.testing.assert_array_equal(module.renorm_mean.numpy(), value(layers, "bn", "moving_mean"))
    assert any("not in the checkpoint" in note for note in report.notes)


@pytest.mark.parametrize(("center", "scale"), [(True, False), (False, True)])
def test_weights_h5_single_affine_uses_the_module(
    tmp_path: Path, center: bool, scale: bool
) -> None:
    layers = [bn_layer("bn", 3, center=center, scale=scale)]
    path = write_weights_h5(tmp_path / "w.weights.h5", layers)
    module = bnkit.BatchNorm(3, center=center, scale=scale, eps=EPS)
    load_keras_weights(module, path)
    learned = module.bias if center else module.weight
    assert learned is not None
    np.testing.assert_array_equal(
        learned.detach().numpy(), value(layers, "bn", "beta" if center else "gamma")
    )
    both = bnkit.BatchNorm(3, eps=EPS)  # 3 unnamed vectors and a module with weight and bias
    with pytest.raises(CheckpointImportError, match="cannot tell which of the 3 unnamed"):
        load_keras_weights(both, path)


def test_weights_h5_without_order_across_nested_models(tmp_path: Path) -> None:
    """Nested Sequential: layers/batch_normalization and layers/sequential/layers/..."""
    with h5py.File(tmp_path / "w.weights.h5", "w") as f:
        inner = [bn_layer("x", 3)]
        outer = [bn_layer("y", 3)]
        f.create_group("layers/sequential/layers/batch_normalization/vars")
        for i, (_, v) in enumerate(inner[0][3]):
            f[f"layers/sequential/layers/batch_normalization/vars/{i}"] = v
        for i, (_, v) in enumerate(outer[0][3]):
            f[f"layers/batch_normalization/vars/{i}"] = v
        f.create_group("layers/sequential/vars")
        f.create_group("vars")
    model = nn.Sequential(bnkit.BatchNorm(3), bnkit.BatchNorm(3))
    with pytest.raises(CheckpointImportError, match=r"does not record the order.*\.keras file"):
        load_keras_weights(model, tmp_path / "w.weights.h5")
    mapping = {"0": "sequential/batch_normalization", "1": "batch_normalization"}
    load_keras_weights(model, tmp_path / "w.weights.h5", mapping=mapping)
    np.testing.assert_array_equal(model[0].running_mean.numpy(), value(inner, "x", "moving_mean"))
    np.testing.assert_array_equal(model[1].running_mean.numpy(), value(outer, "y", "moving_mean"))


def test_legacy_nested_model_layers(tmp_path: Path) -> None:
    """A nested model is one entry of layer_names whose weight names name its sublayers."""
    d_in, bn_in = dense_layer("d_in", 4, 3), bn_layer("bn_in", 3, scale=False)
    with h5py.File(tmp_path / "w.h5", "w") as f:
        _save_attr(f, "layer_names", [b"input_1", b"inner"])
        _save_attr(f.create_group("input_1"), "weight_names", [])
        group = f.create_group("inner")
        names = [f"{n}/{var}:0".encode() for n, _, _, w in (d_in, bn_in) for var, _ in w]
        _save_attr(group, "weight_names", names)
        for weight_name, (_, val) in zip(names, d_in[3] + bn_in[3], strict=True):
            group.create_dataset(weight_name, val.shape, dtype=val.dtype)[...] = val
    model = nn.Sequential(nn.Linear(4, 3), bnkit.from_keras(3, scale=False, name="bn_in"))
    report = load_keras_weights(model, tmp_path / "w.h5")
    assert report.loaded["1"].scope == "inner/bn_in"
    assert report.loaded["0"].scope == "inner/d_in"
    np.testing.assert_array_equal(
        model[0].weight.detach().numpy(), value([d_in], "d_in", "kernel").T
    )


def test_dtype_follows_the_module(tmp_path: Path) -> None:
    layers = keras_model()
    path = write_weights_h5(tmp_path / "w.weights.h5", layers)
    model = TorchNet().double()
    load_keras_weights(model, path)
    assert model.bn.running_var.dtype == torch.float64
    assert model.conv.weight.dtype == torch.float64
    x = x_input()
    np.testing.assert_allclose(predict(model, x), keras_forward(x, layers), rtol=1e-6, atol=1e-6)
    half = TorchNet().half()
    load_keras_weights(half, path)
    assert half.bn.weight.dtype == torch.float16
    assert half.bn.running_var.dtype == torch.float32


def test_not_a_keras_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such Keras file"):
        load_keras_weights(TorchNet(), tmp_path / "missing.h5")
    (tmp_path / "model.ckpt.index").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="load_tf_checkpoint"):
        load_keras_weights(TorchNet(), tmp_path / "model.ckpt.index")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(ValueError, match="not one Keras wrote"):
        load_keras_weights(TorchNet(), tmp_path / "other.h5")


def test_missing_h5py_names_the_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match="pip install h5py"):
        load_keras_weights(TorchNet(), tmp_path / "w.h5")


# ---------------------------------------------------------------- TF checkpoints


def test_missing_tensorflow_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` raises
    with pytest.raises(ImportError, match=re.escape('pip install "bnkit[tf]"')):
        load_tf_checkpoint(nn.BatchNorm1d(3), "model.ckpt-1")


def slim_variables(prefix: str = "") -> dict[str, np.ndarray]:
    """What slim.conv2d(normalizer_fn=slim.batch_norm) + fully_connected + Momentum save."""
    v = {
        "conv1/weights": f32(3, 3, 2, 4),
        "conv1/BatchNorm/beta": f32(4),
        "conv1/BatchNorm/moving_mean": f32(4),
        "conv1/BatchNorm/moving_variance": f32(4, low=0.5, high=2.0),
        # zero_debias_moving_mean=True: shadows under slim's doubled scope
        "conv1/BatchNorm/conv1/BatchNorm/moving_mean/biased": f32(4),
        "conv1/BatchNorm/conv1/BatchNorm/moving_mean/local_step": np.float32(12.0),
        "fc1/weights": f32(16, 3),
        "fc1/BatchNorm/gamma": f32(3, low=0.5, high=1.5),
        "fc1/BatchNorm/beta": f32(3),
        "fc1/BatchNorm/moving_mean": f32(3),
        "fc1/BatchNorm/moving_variance": f32(3, low=0.5, high=2.0),
        "logits/weights": f32(3, 2),
        "logits/biases": f32(2),
    }
    v = {prefix + k: a for k, a in v.items()}
    slots = {f"{k}/Momentum": np.zeros_like(a) for k, a in v.items() if "moving" not in k}
    return {**v, **slots, "global_step": np.int64(12)}


class SlimNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, bias=False),
            bnkit.from_slim(4, data_format="NCHW", zero_debias_moving_mean=True),
        )
        self.fc1 = nn.Sequential(nn.Linear(16, 3, bias=False), bnkit.from_slim(3, scale=True))
        self.logits = nn.Linear(3, 2)


@pytest.mark.parametrize("prefix", ["", "model/"])
def test_slim_names_by_module_path(prefix: str) -> None:
    v = slim_variables(prefix)
    model = SlimNet()
    report = load_tf_variables(model, v)
    assert {name: layer.scope for name, layer in report.loaded.items()} == {
        "conv1.0": prefix + "conv1",
        "conv1.1": prefix + "conv1/BatchNorm",
        "fc1.0": prefix + "fc1",
        "fc1.1": prefix + "fc1/BatchNorm",
        "logits": prefix + "logits",
    }
    bn = model.conv1[1]
    # conv kernel [kh, kw, in, out] -> [out, in, kh, kw]: element by element
    kernel = v[prefix + "conv1/weights"]
    w = model.conv1[0].weight.detach().numpy()
    for o, i, a, b in [(0, 0, 0, 0), (3, 1, 2, 0), (2, 0, 1, 2)]:
        assert w[o, i, a, b] == kernel[a, b, i, o]
    np.testing.assert_array_equal(model.fc1[0].weight.detach().numpy(), v[prefix + "fc1/weights"].T)
    biased = prefix + "conv1/BatchNorm/conv1/BatchNorm/moving_mean/biased"
    np.testing.assert_array_equal(bn.running_mean_biased.numpy(), v[biased])
    assert int(bn.running_mean_local_step) == 12
    assert int(bn.num_batches_tracked) == 12
    assert bn.weight is None  # slim's default scale=False: nothing to load
    assert report.step == 12
    assert f"{prefix}conv1/weights/Momentum" in report.ignored_variables
    assert "global_step" in report.ignored_variables
    assert report.unused_variables == []
    assert report.ok
    text = str(report)
    assert "conv1.1" in text
    assert "Momentum" in text


def test_missing_statistics_refused_naming_each_layer() -> None:
    """Saver(var_list=tf.trainable_variables()): beta/gamma/weights only."""
    v = {k: a for k, a in slim_variables().items() if "moving" not in k}
    model = SlimNet()
    with pytest.raises(CheckpointImportError) as err:
        load_tf_variables(model, v, source="ckpt")
    message = str(err.value)
    assert "'conv1.1' <- 'conv1/BatchNorm': moving_mean and moving_variance are missing" in message
    assert "'fc1.1' <- 'fc1/BatchNorm'" in message
    assert "Saver(var_list=tf.trainable_variables())" in message
    assert "load_tf_checkpoint(model, path, strict=False)" in message
    assert "Nothing was loaded" in message
    assert model.fc1[1].bias.detach().eq(0).all()
    assert [p.split(" <- ")[0] for p in err.value.report.problems] == ["conv1.1", "fc1.1"]
    assert err.value.report.loaded == {}

    with pytest.warns(UserWarning, match="2 problem") as caught:
        report = load_tf_variables(model, v, strict=False)
    assert len(caught) == 1
    np.testing.assert_array_equal(model.fc1[1].bias.detach().numpy(), v["fc1/BatchNorm/beta"])
    assert model.fc1[1].running_var.eq(1).all()  # left at the module's values
    assert [p.split(" <- ")[0] for p in report.problems] == ["conv1.1", "fc1.1"]


def test_never_updated_statistics_with_global_step() -> None:
    v = slim_variables()
    v["fc1/BatchNorm/moving_mean"] = np.zeros(3, np.float32)
    v["fc1/BatchNorm/moving_variance"] = np.ones(3, np.float32)
    with pytest.raises(
        CheckpointImportError, match=r"'fc1.1' <- 'fc1/BatchNorm': moving_mean is exactly 0"
    ) as err:
        load_tf_variables(SlimNet(), v)
    assert "training step 12" in str(err.value)
    assert "'conv1.1'" not in str(err.value)


def test_ambiguous_scope_names_both_modules() -> None:
    v = {
        "block/BatchNorm/beta": f32(3),
        "block/BatchNorm/moving_mean": f32(3),
        "block/BatchNorm/moving_variance": f32(3, low=0.5, high=1.0),
    }
    model = nn.Module()
    model.block = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3), nn.ReLU(), nn.BatchNorm1d(3))
    with pytest.raises(
        CheckpointImportError, match=r"'block.1', 'block.3' would all load 'block/BatchNorm'"
    ):
        load_tf_variables(model, v)
    report = load_tf_variables(model, v, mapping={"block.3": None})
    assert report.loaded["block.1"].scope == "block/BatchNorm"
    assert report.skipped_modules == ["block.3"]


def test_unmatched_module_error_lists_scopes_and_close_matches() -> None:
    v = {
        "features/bn_1/beta": f32(3),
        "features/bn_1/moving_mean": f32(3),
        "features/bn_1/moving_variance": f32(3, low=0.5, high=1.0),
        "head/BatchNorm/moving_mean": f32(3),
        "head/BatchNorm/moving_variance": f32(3, low=0.5, high=1.0),
    }
    model = nn.Module()
    model.features = nn.Module()
    model.features.bn1 = nn.BatchNorm1d(3)
    model.features.bn2 = nn.BatchNorm1d(3)
    with pytest.raises(CheckpointImportError) as err:
        load_tf_variables(model, v)
    message = str(err.value)
    assert "'features.bn1' (BatchNorm1d): tried 'features/bn1', 'features/bn1/BatchNorm'" in message
    assert "close matches: 'features/bn_1'" in message
    assert (
        "Unclaimed batch norm layers in the checkpoint: 'features/bn_1', 'head/BatchNorm'"
        in message
    )
    assert "mapping={'features.bn1': 'features/bn_1'}" in message
    mapping = {"features.bn1": "features/bn_1", "features.bn2": "head/BatchNorm"}
    report = load_tf_variables(model, v, mapping=mapping)
    assert report.ok
    assert model.features.bn2.bias.detach().eq(0).all()  # no beta in the scope: bias set to 0
    assert any("features.bn2.weight set to 1" in n for n in report.notes)


def test_generated_tf_names_match_by_order() -> None:
    """tf.layers without names: batch_normalization, _1, ..., _10 (natural order)."""
    v: dict[str, np.ndarray] = {}
    for i in range(11):
        scope = "batch_normalization" + (f"_{i}" if i else "")
        v[f"{scope}/gamma"] = f32(i + 1, low=0.5, high=1.5)
        v[f"{scope}/beta"] = f32(i + 1)
        v[f"{scope}/moving_mean"] = f32(i + 1)
        v[f"{scope}/moving_variance"] = f32(i + 1, low=0.5, high=1.5)
    model = nn.Sequential(*[nn.BatchNorm1d(i + 1) for i in range(11)])
    load_tf_variables(model, v)
    np.testing.assert_array_equal(
        model[10].running_mean.numpy(), v["batch_normalization_10/moving_mean"]
    )
    np.testing.assert_array_equal(
        model[2].running_mean.numpy(), v["batch_normalization_2/moving_mean"]
    )


def test_keras_object_checkpoint_names() -> None:
    """save_weights(prefix) in TF format: layer_with_weights-N/.../.ATTRIBUTES/VARIABLE_VALUE."""
    suffix = "/.ATTRIBUTES/VARIABLE_VALUE"
    v = {
        "_CHECKPOINTABLE_OBJECT_GRAPH": np.zeros(()),
        "layer_with_weights-0/kernel" + suffix: f32(4, 3),
        "layer_with_weights-0/bias" + suffix: f32(3),
        "layer_with_weights-1/gamma" + suffix: f32(3, low=0.5, high=1.5),
        "layer_with_weights-1/beta" + suffix: f32(3),
        "layer_with_weights-1/moving_mean" + suffix: f32(3),
        "layer_with_weights-1/moving_variance" + suffix: f32(3, low=0.5, high=1.5),
        "optimizer/_iterations" + suffix: np.int64(5),
        "optimizer/_variables/1" + suffix: f32(4, 3),
        "layer_with_weights-0/kernel/.OPTIMIZER_SLOT/optimizer/m" + suffix: f32(4, 3),
    }
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.BatchNorm1d(3, eps=EPS))
    report = load_tf_variables(model, v)
    assert report.step == 5
    assert report.loaded["2"].scope == "layer_with_weights-1"
    np.testing.assert_array_equal(
        model[0].bias.detach().numpy(), v["layer_with_weights-0/bias" + suffix]
    )
    assert len(report.ignored_variables) == 4


def test_unknown_variables_are_reported_not_loaded() -> None:
    v = slim_variables()
    v["embedding/embeddings"] = f32(10, 4)
    v["beta1_power"] = np.float32(0.9)
    v["conv1/weights/Adam_1"] = np.zeros((3, 3, 2, 4), np.float32)
    report = load_tf_variables(SlimNet(), v)
    assert "embedding/embeddings" in report.unused_variables
    assert {"beta1_power", "conv1/weights/Adam_1"} <= set(report.ignored_variables)


def test_learned_gamma_without_a_module_weight_is_refused() -> None:
    v = slim_variables()
    model = SlimNet()
    model.fc1[1] = bnkit.from_slim(3)  # scale=False, but the checkpoint learned gamma
    with pytest.raises(CheckpointImportError, match=r"holds a learned gamma.*scale=True"):
        load_tf_variables(model, v)


def test_kind_mismatch_and_missing_scope_in_mapping() -> None:
    v = slim_variables()
    with pytest.raises(
        CheckpointImportError, match=r"'fc1.1'.*'fc1' is a dense / fully connected layer"
    ):
        load_tf_variables(SlimNet(), v, mapping={"fc1.1": "fc1"})
    with pytest.raises(
        CheckpointImportError, match=r"'fc1/BatchNrom' is not in .*close matches: 'fc1/BatchNorm'"
    ):
        load_tf_variables(SlimNet(), v, mapping={"fc1.1": "fc1/BatchNrom"})


def test_report_str_is_readable() -> None:
    report = load_tf_variables(SlimNet(), slim_variables(), source="ckpt-12")
    text = str(report)
    assert text.startswith("Loaded 5 module(s) from ckpt-12:")
    assert re.search(r"conv1\.1\s+<- conv1/BatchNorm\s+\(bias, running_mean", text)
    assert "Training step in the checkpoint: 12" in text
