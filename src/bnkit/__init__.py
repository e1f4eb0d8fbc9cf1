"""bnkit: batch normalization for PyTorch, done completely and done right.

>>> import torch, bnkit
>>> bn = bnkit.BatchNorm2d(3)
>>> bn(torch.randn(4, 3, 5, 5)).shape
torch.Size([4, 3, 5, 5])
"""

from __future__ import annotations

from bnkit import functional, running
from bnkit.calibrate import CalibrationReport, recalibrate
from bnkit.checkpoint import CheckpointError, Finding, LoadReport, load, save, verify
from bnkit.convert import (
    FoldReport,
    FoldResult,
    convert,
    eval_mode,
    fold,
    freeze,
    to_torch,
    train_mode,
    unfreeze,
)
from bnkit.distributed import sync_running_stats
from bnkit.doctor import Report, diagnose
from bnkit.ema import ExponentialMovingAverage
from bnkit.modules import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnkit.optim import apply_constraints, param_groups, regularization_loss
from bnkit.policies import get_policy, policy, set_policy
from bnkit.presets import from_keras, from_slim
from bnkit.tf_import import (
    CheckpointImportError,
    ImportReport,
    load_keras_weights,
    load_tf_checkpoint,
    load_tf_variables,
)

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "CalibrationReport",
    "CheckpointError",
    "CheckpointImportError",
    "ExponentialMovingAverage",
    "Finding",
    "FoldReport",
    "FoldResult",
    "ImportReport",
    "LoadReport",
    "Report",
    "__version__",
    "apply_constraints",
    "convert",
    "diagnose",
    "eval_mode",
    "fold",
    "freeze",
    "from_keras",
    "from_slim",
    "functional",
    "get_policy",
    "load",
    "load_keras_weights",
    "load_tf_checkpoint",
    "load_tf_variables",
    "param_groups",
    "policy",
    "recalibrate",
    "regularization_loss",
    "running",
    "save",
    "set_policy",
    "sync_running_stats",
    "to_torch",
    "train_mode",
    "unfreeze",
    "verify",
]
