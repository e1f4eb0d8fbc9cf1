"""bnkit.tf_import end to end: train in TensorFlow, save, load into PyTorch, same predictions.

Slim models are built in graph mode the way slim users write them
(``normalizer_fn=slim.batch_norm``, the train op under a control dependency on
``UPDATE_OPS``), trained for a few steps, saved with ``tf.compat.v1.train.Saver`` and loaded
with :func:`bnkit.tf_import.load_tf_checkpoint`; a tf_keras model is trained with ``fit`` and
saved in every format tf_keras 2.21 writes. The oracle is TensorFlow's own inference output
on fresh data (atol/rtol 1e-5). The two classic mistakes - a Saver restricted to the
trainable variables, update ops never run - are reproduced in TF and must be refused.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tfcompat import tensorflow_modules
from torch import nn

import bnkit
from bnkit.tf_import import CheckpointImportError, load_keras_weights, load_tf_checkpoint

TOL = {"rtol": 1e-5, "atol": 1e-5}
STEPS = 12
DECAY = 0.8  # moving averages that move visibly in a few steps

# slim's layers call the deprecated `Layer.apply` / tf.layers.flatten of TF's Keras 1 shim
pytestmark = pytest.mark.filterwarnings(
    r"ignore:`(layer\.apply|tf\.layers\.flatten)` is deprecated:UserWarning"
)


def data(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * 2.0 + 0.5).astype(np.float32)


def train_slim(
    build: Any,
    x_shape: tuple[int, ...],
    path: Path,
    *,
    wire_updates: bool = True,
    trainable_only: bool = False,
    extra_step: bool = False,
) -> dict[str, Any]:
    """Build with ``build(slim, x, is_training)``, train, save; return TF's numbers."""
    t = tensorflow_modules()
    tf, slim, v1 = t.tf, t.slim, t.tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        v1.set_random_seed(0)
        x = v1.placeholder(tf.float32, (None, *x_shape[1:]))
        is_training = v1.placeholder_with_default(True, ())
        logits = build(slim, x, is_training)
        loss = tf.reduce_mean(tf.square(logits - 1.0))
        step = v1.train.get_or_create_global_step()
        optimizer = v1.train.MomentumOptimizer(0.05, 0.9)
        update_ops = v1.get_collection(v1.GraphKeys.UPDATE_OPS)
        if wire_updates:
            with tf.control_dependencies(update_ops):
                train_op = optimizer.minimize(loss, global_step=step)
        else:  # the classic mistake: the moving averages are never updated
            train_op = optimizer.minimize(loss, global_step=step)
        saver = v1.train.Saver(var_list=v1.trainable_variables() if trainable_only else None)
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            for i in range(STEPS):
                sess.run(train_op, {x: data(x_shape, i)})
            prefix = saver.save(sess, str(path / "model.ckpt"), global_step=step)
            x_test = data(x_shape, 100)
            out: dict[str, Any] = {
                "prefix": prefix,
                "x_test": x_test,
                "y_test": sess.run(logits, {x: x_test, is_training: False}),
            }
            if extra_step:  # one more update of the moving statistics, no optimizer step
                x_next = data(x_shape, 200)
                sess.run(update_ops, {x: x_next})
                out["x_next"] = x_next
                out["after"] = {
                    v.op.name: sess.run(v) for v in v1.global_variables() if "moving" in v.op.name
                }
    return out


# ------------------------------------------------------------------ slim, dense


def build_dense(slim: Any, x: Any, is_training: Any) -> Any:
    params = {"decay": DECAY, "scale": True, "is_training": is_training}
    h = slim.fully_connected(
        x, 8, normalizer_fn=slim.batch_norm, normalizer_params=params, scope="fc1"
    )
    return slim.fully_connected(h, 3, activation_fn=None, scope="logits")


class DenseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Sequential(nn.Linear(6, 8, bias=False), bnkit.from_slim(8, scale=True))
        self.logits = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(torch.relu(self.fc1(x)))


def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_slim_dense_batch_norm_predicts_like_tf(tmp_path: Path) -> None:
    tf_run = train_slim(build_dense, (16, 6), tmp_path)
    model = DenseNet()
    report = load_tf_checkpoint(model, tmp_path)  # the directory: its 'checkpoint' file
    assert report.source == tf_run["prefix"]
    assert report.step == STEPS
    assert {n: lay.scope for n, lay in report.loaded.items()} == {
        "fc1.0": "fc1",
        "fc1.1": "fc1/BatchNorm",
        "logits": "logits",
    }
    assert "fc1/weights/Momentum" in report.ignored_variables
    assert report.ok
    np.testing.assert_allclose(predict(model, tf_run["x_test"]), tf_run["y_test"], **TOL)


# ---------------------------------------------------------------- slim, conv NHWC


def build_conv(slim: Any, x: Any, is_training: Any) -> Any:
    debiased = {"decay": DECAY, "is_training": is_training, "zero_debias_moving_mean": True}
    plain = {"decay": DECAY, "is_training": is_training, "scale": True}
    h = slim.conv2d(
        x, 4, [3, 3], normalizer_fn=slim.batch_norm, normalizer_params=debiased, scope="conv1"
    )
    h = slim.conv2d(
        h, 5, [3, 3], normalizer_fn=slim.batch_norm, normalizer_params=plain, scope="conv2"
    )
    return slim.fully_connected(slim.flatten(h), 2, activation_fn=None, scope="logits")


class ConvNet(nn.Module):
    """slim's NHWC network with NCHW convs; flattened in NHWC order like slim.flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=False),
            bnkit.from_slim(4, data_format="NCHW", zero_debias_moving_mean=True, decay=DECAY),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(4, 5, 3, padding=1, bias=False),
            bnkit.from_slim(5, data_format="NCHW", scale=True, decay=DECAY),
        )
        self.logits = nn.Linear(5 * 5 * 5, 2)

    def forward(self, x_nhwc: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x_nhwc.permute(0, 3, 1, 2)))
        h = torch.relu(self.conv2(h))
        return self.logits(h.permute(0, 2, 3, 1).flatten(1))


def test_slim_conv_nhwc_with_zero_debias_predicts_like_tf(tmp_path: Path) -> None:
    tf_run = train_slim(build_conv, (8, 5, 5, 3), tmp_path, extra_step=True)
    model = ConvNet()
    report = load_tf_checkpoint(model, tf_run["prefix"])
    assert report.loaded["conv1.1"].variables["running_mean_biased"] == (
        "conv1/BatchNorm/conv1/BatchNorm/moving_mean/biased"
    )
    np.testing.assert_allclose(predict(model, tf_run["x_test"]), tf_run["y_test"], **TOL)
    bn = model.conv1[1]
    assert int(bn.running_mean_local_step) == STEPS
    # The shadows carry the zero-debiased average on: one more batch in TF and in bnkit
    # (train mode, statistics only) gives the same moving mean.
    model.train()
    with torch.no_grad(), bnkit.policies.calibrating():
        model(torch.from_numpy(tf_run["x_next"]))
    after = tf_run["after"]
    np.testing.assert_allclose(
        bn.running_mean_biased.numpy(),
        after["conv1/BatchNorm/conv1/BatchNorm/moving_mean/biased"],
        **TOL,
    )
    np.testing.assert_allclose(bn.running_mean.numpy(), after["conv1/BatchNorm/moving_mean"], **TOL)
    np.testing.assert_allclose(
        model.conv2[1].running_mean.numpy(), after["conv2/BatchNorm/moving_mean"], **TOL
    )


# ----------------------------------------------------------- the classic mistakes


def test_saver_of_trainable_variables_is_refused(tmp_path: Path) -> None:
    tf_run = train_slim(build_conv, (8, 5, 5, 3), tmp_path, trainable_only=True)
    model = ConvNet()
    with pytest.raises(CheckpointImportError) as err:
        load_tf_checkpoint(model, tf_run["prefix"])
    message = str(err.value)
    assert "'conv1.1' <- 'conv1/BatchNorm': moving_mean and moving_variance are missing" in (
        message
    )
    assert "'conv2.1' <- 'conv2/BatchNorm'" in message
    assert "Saver(var_list=tf.trainable_variables())" in message
    with pytest.warns(UserWarning, match="2 problem"):
        report = load_tf_checkpoint(model, tf_run["prefix"], strict=False)
    assert report.loaded["conv2.1"].variables.keys() == {"weight", "bias"}


def test_never_updated_statistics_are_refused(tmp_path: Path) -> None:
    tf_run = train_slim(build_dense, (16, 6), tmp_path, wire_updates=False)
    with pytest.raises(CheckpointImportError, match=re.escape("'fc1.1' <- 'fc1/BatchNorm'")) as err:
        load_tf_checkpoint(DenseNet(), tf_run["prefix"])
    assert "UPDATE_OPS" in str(err.value)
    assert f"training step {STEPS}" in str(err.value)
    model = DenseNet()
    with pytest.warns(UserWarning, match="exactly 0"):
        load_tf_checkpoint(model, tf_run["prefix"], strict=False)
    # What TF itself predicts from that checkpoint: statistics 0 and 1.
    np.testing.assert_allclose(predict(model, tf_run["x_test"]), tf_run["y_test"], **TOL)


# ------------------------------------------------------------------------ Keras


@pytest.fixture(scope="module")
def keras_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    t = tensorflow_modules()
    keras, layers = t.keras, t.keras.layers
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            layers.Conv2D(4, 3),
            layers.BatchNormalization(momentum=DECAY),
            layers.Activation("relu"),
            layers.Flatten(),
            layers.Dense(5),
            layers.BatchNormalization(momentum=DECAY, renorm=True),
            layers.Dense(2),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
    x, y = data((64, 6, 6, 3), 1), data((64, 2), 2)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    root = tmp_path_factory.mktemp("keras")
    paths = {
        "h5": root / "model.h5",
        "weights.h5": root / "w.weights.h5",
        "keras": root / "model.keras",
        "legacy weights": root / "w.h5",
    }
    with warnings.catch_warnings():
        # tf_keras recommends the .keras format when asked for .h5: that is the point here
        warnings.filterwarnings("ignore", message=".*HDF5 file.*legacy", category=UserWarning)
        model.save(paths["h5"])
    model.save_weights(paths["weights.h5"])
    model.save(paths["keras"])
    model.save_weights(paths["legacy weights"])
    model.save_weights(str(root / "tf_format" / "ckpt"))  # TF checkpoint, object-based
    model.save(root / "saved_model", save_format="tf")  # SavedModel: variables/ is one too
    x_test = data((5, 6, 6, 3), 3)
    return {
        "paths": paths,
        "tf_format": root / "tf_format",
        "saved_model": root / "saved_model",
        "x_test": x_test,
        "y_test": model.predict(x_test, verbose=0),
    }


class KerasNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = bnkit.from_keras(4, axis=1, momentum=DECAY)
        self.fc = nn.Linear(64, 5)
        self.bn_fc = bnkit.from_keras(5, momentum=DECAY, renorm=True)
        self.out = nn.Linear(5, 2)

    def forward(self, x_nhwc: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x_nhwc.permute(0, 3, 1, 2))))
        return self.out(self.bn_fc(self.fc(h.permute(0, 2, 3, 1).flatten(1))))


@pytest.mark.parametrize("fmt", ["h5", "weights.h5", "keras", "legacy weights"])
def test_keras_files_predict_like_keras(keras_run: dict[str, Any], fmt: str) -> None:
    model = KerasNet()
    report = load_keras_weights(model, keras_run["paths"][fmt])
    assert list(report.loaded) == ["conv", "bn", "fc", "bn_fc", "out"]
    assert "renorm_stddev" in report.loaded["bn_fc"].variables
    np.testing.assert_allclose(predict(model, keras_run["x_test"]), keras_run["y_test"], **TOL)


@pytest.mark.parametrize("fmt", ["tf_format", "saved_model"])
def test_keras_tf_checkpoints_predict_like_keras(keras_run: dict[str, Any], fmt: str) -> None:
    model = KerasNet()
    report = load_tf_checkpoint(model, keras_run[fmt])
    assert report.loaded["bn_fc"].scope == "layer_with_weights-3"
    assert report.step == 8  # 64 samples / 16 per batch * 2 epochs
    assert report.unused_variables == []  # metric totals and optimizer state are bookkeeping
    np.testing.assert_allclose(predict(model, keras_run["x_test"]), keras_run["y_test"], **TOL)
