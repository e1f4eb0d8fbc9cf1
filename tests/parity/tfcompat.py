"""The one place that imports TensorFlow, tf-slim and tf_keras for the parity suite.

tf-slim 1.1.0 predates TensorFlow 2.21 and needs three shims before it imports (see
DEVELOPERS.md): ``ops.Tensor`` is gone, ``control_flow_ops.cond`` moved, and slim's core-layer
path lazily imports ``tf_keras.legacy_tf_layers``, which now lives under ``tf_keras.src``.
Tests call :func:`tensorflow_modules`; without the ``tf`` extra they skip with the reason, and
``make parity`` turns any skip into a failure.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from types import ModuleType
from typing import NamedTuple

import pytest

SKIP_REASON = (
    "TensorFlow parity needs the tf extra (tensorflow-cpu 2.21.0, tf-slim 1.1.0, tf-keras "
    "2.21.0): run `make parity`, or `pip install -e .[tf]`"
)


class TF(NamedTuple):
    tf: ModuleType
    slim: ModuleType
    keras: ModuleType


@functools.cache
def _load() -> TF:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keep oneDNN/CPU banners out of logs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import tensorflow as tf
        import tensorflow.python.framework.ops as tf_ops
        import tensorflow.python.ops.control_flow_ops as tf_control_flow_ops
        import tf_keras
        import tf_keras.src.legacy_tf_layers as legacy_layers
        import tf_keras.src.legacy_tf_layers.normalization as legacy_normalization

        tf_ops.Tensor = tf.Tensor  # type: ignore[attr-defined]
        tf_control_flow_ops.cond = tf.compat.v1.cond  # type: ignore[attr-defined]
        sys.modules.setdefault("tf_keras.legacy_tf_layers", legacy_layers)
        sys.modules.setdefault("tf_keras.legacy_tf_layers.normalization", legacy_normalization)
        import tf_slim

    tf.get_logger().setLevel("ERROR")
    return TF(tf=tf, slim=tf_slim, keras=tf_keras)


def tensorflow_modules() -> TF:
    """Return (tf, tf_slim, tf_keras) with the shims applied, or skip the calling test."""
    try:
        return _load()
    except ImportError as exc:
        pytest.skip(f"{SKIP_REASON} ({exc})")
