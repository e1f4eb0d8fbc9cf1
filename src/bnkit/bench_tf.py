"""TensorFlow's contender in ``bnkit bench --compare-tf``: tf_keras' BatchNormalization.

:func:`keras_step` builds a ``tf_keras.layers.BatchNormalization`` with the row's
configuration and returns a zero-argument callable that runs one step of it on **the same
values** as the PyTorch contenders (the input is converted once with ``.numpy()``):

* ``fwd``: ``layer(x, training=True)`` (normalizes and updates the moving statistics);
* ``fwd+bwd``: the same call under ``tf.GradientTape``, then
  ``tape.gradient(y, [x, gamma, beta], output_gradients=dy)`` with a fixed ``dy``;
* ``eval``: ``layer(x, training=False)``.

The step is wrapped in ``tf.function``, traced once and run once before it is returned; a
timed call runs the traced graph (its ``ConcreteFunction``, called directly: about 45 µs of
Python per call, against 110-200 µs through ``tf.function``'s argument dispatch) from eager
Python, with no per-op Python dispatch, as a Keras training step does. Eager execution is
synchronous on CPU (TensorFlow's default), so when the call returns the outputs are computed;
nothing is copied back to NumPy while timing.

Which Keras code path runs (``KerasStep.fused``):

* 4-D input, default configuration: ``fused=True``, i.e. ``FusedBatchNormV3``. NCHW input
  (``layout="contiguous"``) is fed as NCHW with ``axis=1``; NHWC input
  (``layout="channels_last"``) as the NHWC array with ``axis=-1``. With oneDNN (on by default
  in TensorFlow's x86 Linux wheels) the op is rewritten to ``_MklNativeFusedBatchNormV3``,
  which takes NCHW directly; without oneDNN (``TF_ENABLE_ONEDNN_OPTS=0``) TensorFlow's own CPU
  kernel transposes NCHW to NHWC and back inside the op. Either way that cost is TensorFlow's
  and is in its time.
* 2-D ``(N, C)`` input: Keras cannot fuse (``fused=None`` resolves to the composite path of
  ``tf.nn.moments`` and ``tf.nn.batch_normalization``).
* ``renorm=True``, ``virtual_batch_size`` (Keras' ghost batches, always the strided layout)
  and ``sample_weights`` (passed as Keras' ``mask``, which Keras feeds to
  ``tf.nn.weighted_moments`` as frequency weights: bnkit's semantics of sample weights) are
  not fusable in Keras and run the composite path.

``momentum`` and ``eps`` are PyTorch's (Keras gets ``momentum = 1 - momentum``); note that
``tf.nn.fused_batch_norm`` raises ``epsilon`` to at least 1.001e-5.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "INSTALL_HINT",
    "KerasStep",
    "TensorFlowNotInstalledError",
    "keras_step",
    "load",
    "tf_info",
]

INSTALL_HINT = "pip install 'bnkit[tf]'"

#: TensorFlow's C++ start-up lines, written to fd 2 before its logging honours
#: ``TF_CPP_MIN_LOG_LEVEL``; other lines written during the import are passed through.
_BANNERS = (
    "All log messages before absl::InitializeLog()",
    "oneDNN custom operations are on",
    "Could not find cuda drivers",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "rebuild TensorFlow with the appropriate compiler flags",
)

_MODES = ("fwd", "fwd+bwd", "eval")
_LAYOUTS = ("contiguous", "channels_last")


class TensorFlowNotInstalledError(ImportError):
    """TensorFlow or tf_keras cannot be imported; the message says how to install them."""


def _quiet_banners() -> contextlib.AbstractContextManager[None]:
    """Drop TensorFlow's start-up banners from fd 2; pass every other line through."""
    from bnkit.bench import filtered_stderr

    return filtered_stderr(lambda line: any(banner in line for banner in _BANNERS))


def load() -> tuple[Any, Any]:
    """Import TensorFlow and tf_keras quietly and set TensorFlow's CPU threads.

    The first call sets TensorFlow's intra-op threads to ``torch.get_num_threads()`` and its
    inter-op threads to 1, so both libraries use the same cores; if TensorFlow's runtime was
    already initialised (it was used before), its settings stay and :func:`tf_info` reports
    them. Import chatter (Python warnings, C++ banners, ``tf.get_logger()`` below ERROR) is
    silenced as in the parity suite.

    Returns:
        ``(tensorflow, tf_keras)``.

    Raises:
        TensorFlowNotInstalledError: TensorFlow or tf_keras is not installed (or fails to import).
    """
    fresh = "tensorflow" not in sys.modules
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keep oneDNN/CPU banners out of logs
    try:
        with (
            _quiet_banners() if fresh else contextlib.nullcontext(),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            tf = importlib.import_module("tensorflow")
            keras = importlib.import_module("tf_keras")
    except ImportError as exc:
        reason = " ".join(str(exc).split())
        raise TensorFlowNotInstalledError(
            f"--compare-tf needs TensorFlow and tf_keras, which could not be imported "
            f"({reason}); install them with: {INSTALL_HINT}"
        ) from exc
    tf.get_logger().setLevel("ERROR")
    threads = tf.config.threading
    for setter, value in (
        (threads.set_intra_op_parallelism_threads, torch.get_num_threads()),
        (threads.set_inter_op_parallelism_threads, 1),
    ):
        # TensorFlow refuses to change threads once its runtime is initialised; then its
        # own settings stay (and are reported).
        with contextlib.suppress(RuntimeError):
            setter(value)
    return tf, keras


def tf_info() -> dict[str, Any]:
    """What TensorFlow timings depend on, for a benchmark's ``meta`` (imports TensorFlow).

    Keys: ``tf_version``, ``tf_keras_version``, ``tf_intra_op_threads`` and
    ``tf_inter_op_threads`` (0 means TensorFlow's default: one per core), ``tf_onednn``
    (whether oneDNN's CPU ops are on; None if unknown).

    Raises:
        TensorFlowNotInstalledError: TensorFlow or tf_keras is not installed.
    """
    tf, keras = load()
    onednn: bool | None
    try:
        port = importlib.import_module("tensorflow.python.util._pywrap_util_port")
        onednn = bool(port.IsMklEnabled())
    except (ImportError, AttributeError):
        onednn = None
    return {
        "tf_version": str(tf.__version__),
        "tf_keras_version": str(getattr(keras, "__version__", "unknown")),
        "tf_intra_op_threads": int(tf.config.threading.get_intra_op_parallelism_threads()),
        "tf_inter_op_threads": int(tf.config.threading.get_inter_op_parallelism_threads()),
        "tf_onednn": onednn,
    }


def _to_numpy(t: Tensor, nhwc: bool) -> np.ndarray[Any, Any]:
    """The values of ``t`` (logically N, C, ...) as a C-contiguous float array, NHWC if asked."""
    t = t.detach()
    if nhwc:
        t = t.permute(0, 2, 3, 1)
    return np.ascontiguousarray(t.numpy())


class KerasStep:
    """One step of a ``tf_keras.layers.BatchNormalization`` on fixed inputs.

    Call it (no arguments) to run the step; :meth:`results` runs it once more and returns the
    outputs as torch tensors in PyTorch's layout. Build it with :func:`keras_step`.

    Attributes:
        layer: the Keras layer (built; its moving statistics change with every step).
        fused: whether Keras runs its fused kernel (``FusedBatchNormV3``) for this input.
        mode: ``"fwd"``, ``"fwd+bwd"`` or ``"eval"``.
    """

    def __init__(
        self, fn: Any, args: tuple[Any, ...], layer: Any, *, mode: str, nhwc: bool
    ) -> None:
        self._fn = fn
        self._args = args
        self._nhwc = nhwc
        self.layer = layer
        self.fused = bool(layer.fused)
        self.mode = mode

    def __call__(self) -> None:
        self._fn(*self._args)

    def results(self) -> tuple[Tensor, ...]:
        """Run the step once more and return ``(y,)``, or ``(y, dx, dgamma, dbeta)`` for
        ``fwd+bwd``: ``y`` and ``dx`` shaped like the PyTorch input (N, C, ...), ``dgamma`` and
        ``dbeta`` of shape (C,)."""
        outs = self._fn(*self._args)
        if self.mode != "fwd+bwd":
            outs = [outs]
        tensors = [torch.from_numpy(np.array(o.numpy())) for o in outs]
        for i in (0, 1)[: len(tensors)]:
            if self._nhwc:
                tensors[i] = tensors[i].permute(0, 3, 1, 2)
        if self.mode == "fwd+bwd":
            tensors[2] = tensors[2].reshape(-1)
            tensors[3] = tensors[3].reshape(-1)
        return tuple(tensors)


def keras_step(
    x: Tensor,
    *,
    layout: str,
    mode: str,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    grad_out: Tensor | None = None,
    renorm: bool = False,
    virtual_batch_size: int | None = None,
    sample_weights: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> KerasStep:
    """A traced ``tf_keras`` BatchNormalization step on the values of ``x``.

    Args:
        x: float32 input of shape (N, C, H, W) or (N, C), PyTorch's logical layout whatever
            its memory format.
        layout: ``"contiguous"`` (Keras gets NCHW, ``axis=1``; (N, C) for 2-D) or
            ``"channels_last"`` (4-D only; Keras gets NHWC, ``axis=-1``).
        mode: ``"fwd"``, ``"fwd+bwd"`` or ``"eval"``.
        weight, bias: γ and β, shape (C,) (default ones and zeros). The moving statistics
            start at Keras' defaults (mean 0, variance 1), as PyTorch's running buffers.
        grad_out: the fixed upstream gradient ``dy`` (``fwd+bwd`` only; same shape as ``x``).
        renorm: Keras' batch renormalization (``renorm=True``, its default momentum and no
            clipping).
        virtual_batch_size: Keras' ghost batches (strided: ghost j holds samples j, j + G, ...).
        sample_weights: shape (N,), passed to the layer as ``mask`` (weighted moments).
        momentum: PyTorch's momentum (Keras gets ``1 - momentum``).
        eps: epsilon.

    Returns:
        A :class:`KerasStep`, already traced and run once.

    Raises:
        TensorFlowNotInstalledError: TensorFlow or tf_keras is not installed.
        ValueError: unknown mode or layout, channels_last for a 2-D input, a rank other than
            2 or 4, a missing ``grad_out`` for ``fwd+bwd``, or ``sample_weights`` not of shape
            (N,).

    >>> x = torch.randn(8, 4, 3, 3)
    >>> step = keras_step(x, layout="contiguous", mode="fwd")  # doctest: +SKIP
    >>> step()  # doctest: +SKIP
    >>> (y,) = step.results()  # doctest: +SKIP
    """
    if mode not in _MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(_MODES)}")
    if layout not in _LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(_LAYOUTS)}")
    if x.ndim not in (2, 4):
        raise ValueError(f"input must be (N, C, H, W) or (N, C), got shape {tuple(x.shape)}")
    nhwc = layout == "channels_last"
    if nhwc and x.ndim != 4:
        raise ValueError("layout 'channels_last' needs a 4-D input (N, C, H, W)")
    if mode == "fwd+bwd" and grad_out is None:
        raise ValueError("mode 'fwd+bwd' needs grad_out, the fixed upstream gradient")
    n = x.shape[0]
    if sample_weights is not None and tuple(sample_weights.shape) != (n,):
        raise ValueError(
            f"sample_weights must have shape ({n},), one weight per sample; got "
            f"{tuple(sample_weights.shape)}"
        )
    tf, keras = load()
    fusable = x.ndim == 4 and not renorm and virtual_batch_size is None
    fusable = fusable and sample_weights is None
    # Keras ignores a mask on its fused path (with a warning): weights force the composite one.
    fused = True if fusable else (False if sample_weights is not None else None)
    x_np = _to_numpy(x, nhwc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras' tracing chatter is not the benchmark's
        layer = keras.layers.BatchNormalization(
            axis=-1 if nhwc or x.ndim == 2 else 1,
            momentum=1.0 - momentum,
            epsilon=eps,
            fused=fused,
            renorm=renorm,
            virtual_batch_size=virtual_batch_size,
        )
        layer.build(x_np.shape)
        for variable, value in ((layer.gamma, weight), (layer.beta, bias)):
            if value is not None:
                variable.assign(value.detach().numpy().reshape(tuple(variable.shape)))
        if bool(layer.fused) != fusable:  # Keras decides at build time; say if it disagrees
            raise RuntimeError(
                f"tf_keras chose fused={layer.fused} where fused={fusable} was expected"
            )
        mask = None
        if sample_weights is not None:
            shape = (n,) + (1,) * (x.ndim - 2)  # Keras appends the channel dim itself
            mask = tf.constant(np.ascontiguousarray(sample_weights.detach().numpy()).reshape(shape))
        inp = tf.constant(x_np)
        if mode == "fwd+bwd":
            assert grad_out is not None
            dy = tf.constant(_to_numpy(grad_out, nhwc))
            watched = [layer.gamma, layer.beta]

            def train_step(t: Any, g: Any) -> Any:
                with tf.GradientTape() as tape:
                    tape.watch(t)
                    y = layer(t, training=True, mask=mask)
                return [y, *tape.gradient(y, [t, *watched], output_gradients=g)]

            args: tuple[Any, ...] = (inp, dy)
            traced = tf.function(train_step).get_concrete_function(*args)
        else:
            training = mode == "fwd"

            def forward(t: Any) -> Any:
                return layer(t, training=training, mask=mask if training else None)

            args = (inp,)
            traced = tf.function(forward).get_concrete_function(*args)
        step = KerasStep(traced, args, layer, mode=mode, nhwc=nhwc)
        step()  # the first run (graph optimization, allocations) stays outside any timing
    return step
