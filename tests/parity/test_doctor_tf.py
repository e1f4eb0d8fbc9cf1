"""``bnkit doctor`` on checkpoints TensorFlow itself writes (TF-slim, tf_keras).

A tiny slim model is trained in graph mode the way slim users write it and saved with
``tf.compat.v1.train.Saver``: with the update ops wired (healthy), without them (the moving
statistics never move: ``never-updated``), and with ``Saver(var_list=trainable_variables())``
(the statistics are not saved: ``missing-statistics``). The doctor must name the slim scope
``fc1/BatchNorm`` and give the numbers (the step count from ``global_step``, ``decay**t``).
"""

from __future__ import annotations

import json
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from tfcompat import tensorflow_modules

from bnkit.cli import main
from bnkit.doctor import diagnose

STEPS = 20
DECAY = 0.8  # 0.8**20 = 1.2%: moving averages that have forgotten their start

# slim's layers call the deprecated `Layer.apply` of TF's Keras 1 shim
pytestmark = pytest.mark.filterwarnings(r"ignore:`layer\.apply` is deprecated:UserWarning")


def data(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * 2.0 + 0.5).astype(np.float32)


def train_slim(
    path: Path,
    *,
    wire_updates: bool = True,
    trainable_only: bool = False,
    zero_debias: bool = False,
) -> str:
    """fc1 (slim.fully_connected + slim.batch_norm) -> logits; train STEPS steps; save."""
    t = tensorflow_modules()
    tf, slim, v1 = t.tf, t.slim, t.tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        v1.set_random_seed(0)
        x = v1.placeholder(tf.float32, (None, 6))
        params = {
            "decay": DECAY,
            "scale": True,
            "is_training": True,
            "zero_debias_moving_mean": zero_debias,
        }
        h = slim.fully_connected(
            x, 8, normalizer_fn=slim.batch_norm, normalizer_params=params, scope="fc1"
        )
        logits = slim.fully_connected(h, 3, activation_fn=None, scope="logits")
        loss = tf.reduce_mean(tf.square(logits - 1.0))
        step = v1.train.get_or_create_global_step()
        optimizer = v1.train.MomentumOptimizer(0.05, 0.9)
        update_ops = v1.get_collection(v1.GraphKeys.UPDATE_OPS)
        if wire_updates:
            with tf.control_dependencies(update_ops):
                train_op = optimizer.minimize(loss, global_step=step)
        else:  # the classic mistake
            train_op = optimizer.minimize(loss, global_step=step)
        saver = v1.train.Saver(var_list=v1.trainable_variables() if trainable_only else None)
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            for i in range(STEPS):
                sess.run(train_op, {x: data((16, 6), i)})
            prefix: str = saver.save(sess, str(path / "model.ckpt"), global_step=step)
    return prefix


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["doctor", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_wired_update_ops_are_healthy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = train_slim(tmp_path)
    code, out, err = run([prefix], capsys)
    assert code == 0, out + err
    assert "fc1/BatchNorm" in out
    # The decay is not in the file: at slim's default 0.999 the start would still dominate,
    # which is said as a note (informational), not as a problem.
    report = diagnose(state=prefix)
    (note,) = report.findings
    assert (note.severity, note.layer, note.code) == ("info", "fc1/BatchNorm", "initial-dominated")
    assert note.evidence["steps"] == STEPS
    assert note.evidence["steps_from"] == "global_step"
    assert note.evidence["initial_weight"] == pytest.approx(0.999**STEPS)
    # With the real decay it is healthy without notes; a directory with a 'checkpoint' file
    # names the latest checkpoint.
    code, out, _ = run([str(tmp_path), "--decay", str(DECAY)], capsys)
    assert code == 0
    assert diagnose(state=tmp_path, decay=DECAY).findings == []
    # With a decay too high for 20 steps it is a warning with the numbers.
    finding = diagnose(state=prefix, decay=0.99).findings[0]
    assert (finding.severity, finding.code) == ("warning", "initial-dominated")
    assert finding.evidence["initial_weight"] == pytest.approx(0.99**STEPS)


def test_update_ops_never_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = train_slim(tmp_path, wire_updates=False)
    code, out, _ = run([prefix, "--json"], capsys)
    assert code == 1
    payload = json.loads(out)
    (finding,) = [f for f in payload["findings"] if f["severity"] == "error"]
    assert (finding["layer"], finding["code"]) == ("fc1/BatchNorm", "never-updated")
    assert finding["evidence"]["steps"] == STEPS
    assert finding["evidence"]["steps_from"] == "global_step"
    assert finding["evidence"]["channels"] == 8
    assert "moving_mean is exactly 0 and moving_variance exactly 1" in finding["message"]
    assert "UPDATE_OPS" in finding["fix"]


def test_saver_with_trainable_variables_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = train_slim(tmp_path, trainable_only=True)
    code, out, _ = run([prefix], capsys)
    assert code == 1
    assert "fc1/BatchNorm" in out
    report = diagnose(state=prefix)
    (finding,) = report.errors
    assert (finding.layer, finding.code) == ("fc1/BatchNorm", "missing-statistics")
    assert finding.evidence == {
        "missing": ["moving_mean", "moving_variance"],
        "present": ["gamma", "beta"],
    }
    assert "trainable_variables" in finding.fix


def test_zero_debiased_slim_checkpoint(tmp_path: Path) -> None:
    prefix = train_slim(tmp_path, zero_debias=True)
    # Known decay: moving_mean == biased / (1 - decay**local_step) exactly as TF computes it.
    report = diagnose(state=prefix, decay=DECAY)
    assert report.findings == [], [str(f) for f in report.findings]
    assert report.layers[0].steps_from == "local_step"
    # Unknown decay: the debias factor must still be one number for every channel.
    assert diagnose(state=prefix).healthy
    # A wrong decay breaks the identity, and the doctor says so with the numbers.
    finding = diagnose(state=prefix, decay=0.5).findings[0]
    assert finding.code == "zero-debias-mismatch"
    assert finding.evidence["expected_factor"] == pytest.approx(1 - 0.5**STEPS)


FACTORY = """
import numpy as np
import torch
from torch import nn
import bnkit

class DenseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Sequential(
            nn.Linear(6, 8, bias=False), bnkit.from_slim(8, scale=True, decay={decay})
        )
        self.logits = nn.Linear(8, 3)

    def forward(self, x):
        return self.logits(torch.relu(self.fc1(x)))

def make():
    return DenseNet()

def batches():
    out = []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        out.append(torch.from_numpy((rng.normal(size=(16, 6)) * 2.0 + 0.5).astype(np.float32)))
    return out
"""


def test_model_data_and_fix_on_a_tf_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = train_slim(tmp_path, wire_updates=False)
    factory = tmp_path / "factory.py"
    factory.write_text(textwrap.dedent(FACTORY.format(decay=DECAY)))
    argv = [prefix, "--model", f"{factory}:make", "--data", f"{factory}:batches"]
    code, out, _ = run([*argv, "--json"], capsys)
    assert code == 1
    payload = json.loads(out)
    found = {(f["layer"], f["code"]) for f in payload["findings"]}
    # Static findings name the TF scope; data findings name the PyTorch module.
    assert ("fc1/BatchNorm", "never-updated") in found
    assert ("fc1.1", "stale-statistics") in found
    assert payload["dynamic"]["batches"] == 8
    fixed = tmp_path / "fixed.safetensors"
    code, out, _ = run([*argv, "--fix", str(fixed)], capsys)
    assert code == 0, out
    assert fixed.is_file()
    # The model's decay (from_slim(decay=0.8)) is used for the repaired file's layers.
    report = diagnose(state=fixed)
    assert report.healthy
    assert report.layers[0].decay == pytest.approx(DECAY)


def test_keras_fit_and_save_h5(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t = tensorflow_modules()
    keras = t.keras
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.layers.Dense(8, input_shape=(6,)),
            # Named: Keras numbers unnamed layers per process (batch_normalization_2, ...).
            keras.layers.BatchNormalization(momentum=0.5, name="bn"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    x = data((160, 6), 0)
    model.fit(x, x[:, :1], batch_size=16, epochs=2, verbose=0)  # 20 steps: 0.5**20 ~ 0
    with warnings.catch_warnings():  # tf_keras calls .h5 "legacy"; it is what we test
        warnings.filterwarnings("ignore", message=".*HDF5 file.*legacy", category=UserWarning)
        model.save(tmp_path / "m.h5")
    code, out, _ = run([str(tmp_path / "m.h5")], capsys)
    assert code == 0, out
    report = diagnose(state=tmp_path / "m.h5")
    (layer,) = report.layers
    assert layer.name == "bn"
    assert (layer.steps, layer.steps_from) == (20, "optimizer iterations")
    assert layer.decay == pytest.approx(0.5)
