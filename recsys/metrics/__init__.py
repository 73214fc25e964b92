"""Metrics of the data flow's last step: binary AUC/GAUC/logloss/NE/calibration over whole splits.

Pure numpy functions plus `BinaryMetricAccumulator`, which streams batches (and merges Ray
workers) and computes over all rows. Depends on tensors only, never on `recsys.models`.
"""

from recsys.metrics.binary import (
    BinaryMetricAccumulator,
    auc,
    auc_by_group,
    binary_metrics,
    calibration,
    gauc,
    logloss,
    normalized_entropy,
)

__all__ = [
    "BinaryMetricAccumulator",
    "auc",
    "auc_by_group",
    "binary_metrics",
    "calibration",
    "gauc",
    "logloss",
    "normalized_entropy",
]
