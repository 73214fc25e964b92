"""Binary-label metrics (AUC, GAUC, logloss, NE, calibration) and a streaming accumulator.

This is the last step of the data flow: models give logits, the trainer turns them into
probabilities, and these functions score them against 0/1 labels over a *whole* split. The
functions are pure and work on numpy arrays in float64; `BinaryMetricAccumulator` collects the
rows of many batches (and of many Ray workers, through `state()`/`merge`) and calls
`binary_metrics` once over all of them, so AUC is never averaged over batches.

Definitions follow BENCHMARKS.md ("ml100k-ctr"): AUC counts a tied (positive, negative) pair as
1/2; NE = logloss / entropy of the base rate; GAUC = AUC per group (user) weighted by the group's
rows, groups whose rows are all one class left out; calibration = mean predicted p / observed
positive rate.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from recsys.errors import SchemaError

logger = logging.getLogger(__name__)

DEFAULT_EPS = 1e-7

ArrayLike = npt.ArrayLike
FloatArray = npt.NDArray[np.float64]


# ---------------------------------------------------------------------------------------------
# validation at the edge: every public function converts and checks its inputs here
# ---------------------------------------------------------------------------------------------


def _as_float64(values: ArrayLike | torch.Tensor, name: str) -> FloatArray:
    if isinstance(values, torch.Tensor):
        # bfloat16 has no numpy dtype; cast on the torch side first.
        values = values.detach().to(device="cpu", dtype=torch.float64).numpy()
    try:
        array = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise SchemaError(
            f"metrics: {name} are not numeric (got {type(values).__name__}, expected an array "
            "of numbers)"
        ) from e
    return array


def _as_groups(values: ArrayLike | torch.Tensor) -> npt.NDArray[Any]:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy().reshape(-1)
    return np.asarray(values).reshape(-1)


def _present_groups(
    labels: FloatArray, scores: FloatArray, groups: npt.NDArray[Any]
) -> tuple[FloatArray, FloatArray, npt.NDArray[Any]]:
    """The rows whose group key is present: a missing key (None, or NaN in a float or object
    array, as a null user id reads from Arrow) names no group, so its rows are left out rather
    than pooled into one made-up group."""
    if groups.dtype == object:
        missing = np.equal(groups, None) | (groups != groups)
    elif np.issubdtype(groups.dtype, np.floating):
        missing = np.isnan(groups)
    else:
        return labels, scores, groups
    if not missing.any():
        return labels, scores, groups
    keep = ~np.asarray(missing, dtype=bool)
    return labels[keep], scores[keep], groups[keep]


def _check_same_length(first: npt.NDArray[Any], second: npt.NDArray[Any], names: str) -> None:
    if len(first) != len(second):
        raise SchemaError(
            f"metrics: {names} differ in length (got {len(first)} and {len(second)}, "
            "expected equal lengths)"
        )


def _check_labels(labels: FloatArray) -> None:
    if len(labels) == 0:
        raise SchemaError("metrics: no rows to evaluate (got 0 rows, expected at least 1)")
    bad = np.flatnonzero((labels != 0.0) & (labels != 1.0))
    if len(bad):
        raise SchemaError(
            f"metrics: labels must be binary (got {float(labels[bad[0]])} at row {bad[0]}, "
            f"{len(bad)} such rows, expected values in {{0, 1}})"
        )


def _check_finite(values: FloatArray, name: str) -> None:
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise SchemaError(
            f"metrics: {name} must be finite (got {float(values[bad[0]])} at row {bad[0]}, "
            "expected a finite number)"
        )


def _check_probs(probs: FloatArray) -> None:
    bad = np.flatnonzero(~((probs >= 0.0) & (probs <= 1.0)))  # also catches NaN
    if len(bad):
        raise SchemaError(
            f"metrics: probabilities must lie in [0, 1] (got {float(probs[bad[0]])} at row "
            f"{bad[0]}, expected 0 <= p <= 1); pass sigmoid(logits), not logits"
        )


def _checked(
    labels: ArrayLike | torch.Tensor, preds: ArrayLike | torch.Tensor, *, are_probs: bool
) -> tuple[FloatArray, FloatArray]:
    preds_name = "probs" if are_probs else "scores"
    labels_arr = _as_float64(labels, "labels")
    preds_arr = _as_float64(preds, preds_name)
    _check_same_length(labels_arr, preds_arr, f"labels and {preds_name}")
    _check_labels(labels_arr)
    if are_probs:
        _check_probs(preds_arr)
    else:
        _check_finite(preds_arr, preds_name)
    return labels_arr, preds_arr


# ---------------------------------------------------------------------------------------------
# unchecked kernels (inputs already validated)
# ---------------------------------------------------------------------------------------------


def _grouped_auc_terms(
    labels: FloatArray, scores: FloatArray, weights: FloatArray, group_ids: npt.NDArray[np.intp]
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Per group: the Mann-Whitney numerator, positive weight and negative weight.

    AUC_g = numerator_g / (pos_g * neg_g), where numerator_g sums, over positives, the weight of
    the negatives scored below them plus half the weight of the negatives tied with them. This
    equals the average-rank formula for unit weights and sklearn's trapezoid for any weights.
    One stable sort by (group, score), then everything is a segment sum over "blocks" (runs of
    equal (group, score)), so the cost is O(n log n) with no Python loop over groups.
    """
    order = np.lexsort((scores, group_ids))  # primary key group, secondary score
    sorted_groups = group_ids[order]
    sorted_scores = scores[order]
    sorted_pos = (weights * labels)[order]
    sorted_neg = (weights * (1.0 - labels))[order]

    new_group = np.empty(len(order), dtype=bool)
    new_group[0] = True
    np.not_equal(sorted_groups[1:], sorted_groups[:-1], out=new_group[1:])
    new_block = new_group.copy()
    new_block[1:] |= sorted_scores[1:] != sorted_scores[:-1]

    block_starts = np.flatnonzero(new_block)
    block_pos = np.add.reduceat(sorted_pos, block_starts)
    block_neg = np.add.reduceat(sorted_neg, block_starts)

    # Negative weight strictly below each block, within its group: a running sum over all
    # blocks, minus the running sum where the block's group began.
    group_starts = np.flatnonzero(new_group[block_starts])  # indices into blocks
    neg_before_all = np.cumsum(block_neg) - block_neg
    blocks_per_group = np.diff(np.append(group_starts, len(block_starts)))
    neg_before = neg_before_all - np.repeat(neg_before_all[group_starts], blocks_per_group)

    contributions = block_pos * (neg_before + 0.5 * block_neg)
    numerator = np.add.reduceat(contributions, group_starts)
    pos_weight = np.add.reduceat(block_pos, group_starts)
    neg_weight = np.add.reduceat(block_neg, group_starts)
    return numerator, pos_weight, neg_weight


def _auc(labels: FloatArray, scores: FloatArray, weights: FloatArray | None) -> float:
    num_pos = int(np.count_nonzero(labels))
    num_neg = len(labels) - num_pos
    if num_pos == 0 or num_neg == 0:
        raise SchemaError(
            f"metrics: AUC is undefined with one class (got {num_pos} positive and {num_neg} "
            "negative rows, expected at least one of each)"
        )
    unit_weights = np.ones_like(labels) if weights is None else weights
    group_ids = np.zeros(len(labels), dtype=np.intp)
    numerator, pos_weight, neg_weight = _grouped_auc_terms(labels, scores, unit_weights, group_ids)
    if pos_weight[0] <= 0.0 or neg_weight[0] <= 0.0:
        raise SchemaError(
            f"metrics: AUC is undefined with one class (got positive weight {pos_weight[0]} "
            f"and negative weight {neg_weight[0]}, expected both > 0)"
        )
    return float(numerator[0] / (pos_weight[0] * neg_weight[0]))


def _logloss(labels: FloatArray, probs: FloatArray, eps: float) -> float:
    clipped = np.clip(probs, eps, 1.0 - eps)
    losses = -(labels * np.log(clipped) + (1.0 - labels) * np.log1p(-clipped))
    return float(np.mean(losses))


def _base_entropy(labels: FloatArray) -> float:
    base_rate = float(np.mean(labels))
    if base_rate <= 0.0 or base_rate >= 1.0:
        raise SchemaError(
            f"metrics: NE is undefined with one class (got base rate {base_rate}, "
            "expected 0 < base rate < 1)"
        )
    return float(-(base_rate * np.log(base_rate) + (1.0 - base_rate) * np.log1p(-base_rate)))


def _calibration(labels: FloatArray, probs: FloatArray) -> float:
    num_pos = float(np.sum(labels))
    if num_pos == 0.0:
        raise SchemaError(
            f"metrics: calibration is undefined without positives (got 0 positive of "
            f"{len(labels)} rows, expected at least 1)"
        )
    return float(np.sum(probs) / num_pos)


def _gauc(labels: FloatArray, scores: FloatArray, groups: npt.NDArray[Any]) -> float:
    labels, scores, groups = _present_groups(labels, scores, groups)
    _, group_ids = np.unique(groups, return_inverse=True)
    group_ids = group_ids.reshape(-1).astype(np.intp, copy=False)
    numerator, num_pos, num_neg = _grouped_auc_terms(
        labels, scores, np.ones_like(labels), group_ids
    )
    both = (num_pos > 0) & (num_neg > 0)
    if not both.any():
        raise SchemaError(
            f"metrics: GAUC is undefined when every group has one class (got {len(numerator)} "
            "groups, none with both classes, expected at least one group with both)"
        )
    logger.debug("gauc: %d of %d groups left out (one class)", int((~both).sum()), len(numerator))
    group_auc = numerator[both] / (num_pos[both] * num_neg[both])
    group_rows = num_pos[both] + num_neg[both]
    return float(np.sum(group_rows * group_auc) / np.sum(group_rows))


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------


def auc(
    labels: ArrayLike | torch.Tensor,
    scores: ArrayLike | torch.Tensor,
    weights: ArrayLike | torch.Tensor | None = None,
) -> float:
    """Exact area under the ROC curve, a tied (positive, negative) pair counting 1/2.

    Rank-based (Mann-Whitney), O(n log n): one stable sort, then segment sums over runs of tied
    scores. Inputs are flattened and computed in float64.

    Args:
        labels: 0/1 labels, one per row.
        scores: any finite scores (probabilities or logits; only their order matters).
        weights: optional non-negative row weights (as sklearn's `sample_weight`).

    Returns:
        The AUC in [0, 1].

    Raises:
        SchemaError: labels outside {0, 1}, lengths that differ, non-finite scores or weights,
            negative weights, or only one class present (AUC is undefined).

    Example:
        >>> auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
        0.75
    """
    labels_arr, scores_arr = _checked(labels, scores, are_probs=False)
    weights_arr: FloatArray | None = None
    if weights is not None:
        weights_arr = _as_float64(weights, "weights")
        _check_same_length(labels_arr, weights_arr, "labels and weights")
        _check_finite(weights_arr, "weights")
        if (weights_arr < 0.0).any():
            raise SchemaError(
                f"metrics: weights must be non-negative (got {float(weights_arr.min())}, "
                "expected >= 0)"
            )
    return _auc(labels_arr, scores_arr, weights_arr)


def logloss(
    labels: ArrayLike | torch.Tensor, probs: ArrayLike | torch.Tensor, eps: float = DEFAULT_EPS
) -> float:
    """Mean binary cross-entropy in nats.

    Args:
        labels: 0/1 labels, one per row.
        probs: predicted probabilities in [0, 1]; clipped to [eps, 1 - eps] so that a confident
            mistake costs a large but finite loss.
        eps: clipping margin, in (0, 0.5).

    Returns:
        The mean of -(y log p + (1 - y) log(1 - p)).

    Raises:
        SchemaError: labels outside {0, 1}, lengths that differ, or probabilities outside
            [0, 1] (usually logits passed by mistake).

    Example:
        >>> round(logloss([0, 1], [0.5, 0.5]), 6)
        0.693147
    """
    labels_arr, probs_arr = _checked(labels, probs, are_probs=True)
    return _logloss(labels_arr, probs_arr, eps)


def normalized_entropy(
    labels: ArrayLike | torch.Tensor, probs: ArrayLike | torch.Tensor, eps: float = DEFAULT_EPS
) -> float:
    """Normalized entropy: logloss divided by the entropy of the base rate (mean label).

    Predicting the base rate for every row gives exactly 1; lower is better.

    Args:
        labels: 0/1 labels, one per row.
        probs: predicted probabilities in [0, 1].
        eps: clipping margin for the logloss, as in `logloss`.

    Returns:
        logloss / H(mean label), both in nats.

    Raises:
        SchemaError: as `logloss`, or only one class present (the base entropy is 0).

    Example:
        >>> normalized_entropy([0, 1, 1, 1], [0.75] * 4)
        1.0
    """
    labels_arr, probs_arr = _checked(labels, probs, are_probs=True)
    return _logloss(labels_arr, probs_arr, eps) / _base_entropy(labels_arr)


def calibration(labels: ArrayLike | torch.Tensor, probs: ArrayLike | torch.Tensor) -> float:
    """Calibration: mean predicted probability over the observed positive rate.

    1 is calibrated; above 1 the model over-predicts clicks.

    Args:
        labels: 0/1 labels, one per row.
        probs: predicted probabilities in [0, 1].

    Returns:
        sum(probs) / sum(labels).

    Raises:
        SchemaError: as `logloss`, or no positive label (the ratio is undefined).

    Example:
        >>> calibration([0, 1, 0, 1], [0.2, 0.6, 0.4, 0.8])
        1.0
    """
    labels_arr, probs_arr = _checked(labels, probs, are_probs=True)
    return _calibration(labels_arr, probs_arr)


def gauc(
    labels: ArrayLike | torch.Tensor,
    scores: ArrayLike | torch.Tensor,
    groups: ArrayLike | torch.Tensor,
) -> float:
    """Group AUC: AUC per group (e.g. user id) averaged with weights equal to the group's rows.

    Groups whose rows are all one class have no AUC and are left out (of the weights too), and
    so are rows with a missing group key (None or NaN).
    Vectorised over groups: one sort by (group, score), no Python loop.

    Args:
        labels: 0/1 labels, one per row.
        scores: any finite scores; only their order within a group matters.
        groups: one group key per row (ints or strings).

    Returns:
        sum_g rows_g * AUC_g / sum_g rows_g over groups with both classes.

    Raises:
        SchemaError: as `auc`, a `groups` length that differs, or no group with both classes.

    Example:
        >>> gauc([0, 1, 0, 1, 1], [0.1, 0.9, 0.8, 0.2, 0.5], ["a", "a", "b", "b", "c"])
        0.5
    """
    labels_arr, scores_arr = _checked(labels, scores, are_probs=False)
    groups_arr = _as_groups(groups)
    _check_same_length(labels_arr, groups_arr, "labels and groups")
    return _gauc(labels_arr, scores_arr, groups_arr)


def auc_by_group(
    labels: ArrayLike | torch.Tensor,
    scores: ArrayLike | torch.Tensor,
    groups: ArrayLike | torch.Tensor,
) -> dict[str, dict[str, float | None]]:
    """The per-group table behind `gauc`: {group: {rows, positive_rate, auc}}, groups sorted
    by key, `auc` None for a group with one class; rows with a missing key (None or NaN) are
    left out. Same vectorised kernel as `gauc`.

    Example:
        >>> auc_by_group([0, 1, 0, 1, 1], [0.1, 0.9, 0.8, 0.2, 0.5], ["a", "a", "b", "b", "c"])
        ... # doctest: +NORMALIZE_WHITESPACE
        {'a': {'rows': 2, 'positive_rate': 0.5, 'auc': 1.0},
         'b': {'rows': 2, 'positive_rate': 0.5, 'auc': 0.0},
         'c': {'rows': 1, 'positive_rate': 1.0, 'auc': None}}
    """
    labels_arr, scores_arr = _checked(labels, scores, are_probs=False)
    groups_arr = _as_groups(groups)
    _check_same_length(labels_arr, groups_arr, "labels and groups")
    labels_arr, scores_arr, groups_arr = _present_groups(labels_arr, scores_arr, groups_arr)
    keys, group_ids = np.unique(groups_arr, return_inverse=True)
    group_ids = group_ids.reshape(-1).astype(np.intp, copy=False)
    numerator, num_pos, num_neg = _grouped_auc_terms(
        labels_arr, scores_arr, np.ones_like(labels_arr), group_ids
    )
    table: dict[str, dict[str, float | None]] = {}
    for key, num, pos, neg in zip(keys, numerator, num_pos, num_neg, strict=True):
        both = pos > 0 and neg > 0
        table[str(key)] = {
            "rows": int(pos + neg),
            "positive_rate": float(pos / (pos + neg)),
            "auc": float(num / (pos * neg)) if both else None,
        }
    return table


def binary_metrics(
    labels: ArrayLike | torch.Tensor,
    probs: ArrayLike | torch.Tensor,
    groups: ArrayLike | torch.Tensor | None = None,
) -> dict[str, float]:
    """All binary metrics of one split at once; AUC and GAUC rank the probabilities.

    Args:
        labels: 0/1 labels, one per row.
        probs: predicted probabilities in [0, 1].
        groups: optional group key per row (user id); adds `gauc`.

    Returns:
        A dict with `auc`, `logloss`, `ne`, `calibration`, `positive_rate`, `num_rows`, and
        `gauc` when `groups` is given.

    Raises:
        SchemaError: as the single metrics; in particular when only one class is present.

    Example:
        >>> binary_metrics([0, 1, 0, 1], [0.2, 0.6, 0.7, 0.8])["auc"]
        0.75
    """
    labels_arr, probs_arr = _checked(labels, probs, are_probs=True)
    log_loss = _logloss(labels_arr, probs_arr, DEFAULT_EPS)
    metrics = {
        "auc": _auc(labels_arr, probs_arr, None),
        "logloss": log_loss,
        "ne": log_loss / _base_entropy(labels_arr),
        "calibration": _calibration(labels_arr, probs_arr),
        "positive_rate": float(np.mean(labels_arr)),
        "num_rows": float(len(labels_arr)),
    }
    if groups is not None:
        groups_arr = _as_groups(groups)
        _check_same_length(labels_arr, groups_arr, "labels and groups")
        metrics["gauc"] = _gauc(labels_arr, probs_arr, groups_arr)
    return metrics


# ---------------------------------------------------------------------------------------------
# streaming accumulator
# ---------------------------------------------------------------------------------------------


class BinaryMetricAccumulator:
    """Collects (label, probability[, group]) rows batch by batch; computes metrics over all.

    It keeps every row (labels as uint8, probabilities as float64), which is cheap for eval
    splits of 10^4-10^6 rows and makes the result exact: `compute()` equals `binary_metrics` on
    the concatenated rows, never an average over batches. Across Ray workers, gather each
    worker's `state()` (plain numpy arrays, small to pickle), then `merged(...)` them.

    Example:
        >>> acc = BinaryMetricAccumulator()
        >>> acc.update([0, 1], [0.2, 0.6])
        >>> acc.update(np.array([0, 1]), torch.tensor([0.7, 0.8]))
        >>> acc.compute()["auc"]
        0.75
    """

    def __init__(self) -> None:
        self._labels: list[npt.NDArray[np.uint8]] = []
        self._probs: list[FloatArray] = []
        self._groups: list[npt.NDArray[Any]] = []
        self._has_groups: bool | None = None  # fixed by the first non-empty update

    @property
    def num_rows(self) -> int:
        """Rows collected so far."""
        return sum(len(chunk) for chunk in self._labels)

    def update(
        self,
        labels: ArrayLike | torch.Tensor,
        probs: ArrayLike | torch.Tensor,
        groups: ArrayLike | torch.Tensor | None = None,
    ) -> None:
        """Adds one batch of rows.

        Args:
            labels: 0/1 labels, shape (B,) or (B, 1); numpy or torch (any device).
            probs: probabilities in [0, 1], same length.
            groups: group keys, same length; give them in every update or in none.

        Raises:
            SchemaError: bad labels or probabilities, lengths that differ, or groups given in
                some updates but not in others.
        """
        labels_arr = _as_float64(labels, "labels")
        probs_arr = _as_float64(probs, "probs")
        _check_same_length(labels_arr, probs_arr, "labels and probs")
        if len(labels_arr) == 0:
            return
        _check_labels(labels_arr)
        _check_probs(probs_arr)
        groups_arr = None if groups is None else _as_groups(groups)
        if groups_arr is not None:
            _check_same_length(labels_arr, groups_arr, "labels and groups")
        self._set_has_groups(groups_arr is not None)
        self._labels.append(labels_arr.astype(np.uint8))
        self._probs.append(probs_arr)
        if groups_arr is not None:
            self._groups.append(groups_arr)

    def _set_has_groups(self, has_groups: bool) -> None:
        if self._has_groups is None:
            self._has_groups = has_groups
        elif self._has_groups != has_groups:
            raise SchemaError(
                f"metrics: groups given in some updates only (got groups={has_groups} after "
                f"groups={self._has_groups}, expected the same in every update)"
            )

    def merge(self, other: BinaryMetricAccumulator) -> None:
        """Appends the rows of `other` (after this accumulator's rows).

        Args:
            other: another accumulator; it is not modified.

        Raises:
            SchemaError: one has groups and the other does not.
        """
        if other._has_groups is None:
            return
        self._set_has_groups(other._has_groups)
        self._labels.extend(other._labels)
        self._probs.extend(other._probs)
        self._groups.extend(other._groups)

    @classmethod
    def merged(
        cls, parts: Iterable[BinaryMetricAccumulator | dict[str, npt.NDArray[Any]]]
    ) -> BinaryMetricAccumulator:
        """One accumulator holding the rows of all `parts`, in order.

        Args:
            parts: accumulators or their `state()` dicts, e.g. the list all-gathered from the
                Ray workers.

        Returns:
            A new accumulator; the parts are not modified.
        """
        result = cls()
        for part in parts:
            result.merge(
                part if isinstance(part, BinaryMetricAccumulator) else cls.from_state(part)
            )
        return result

    def state(self) -> dict[str, npt.NDArray[Any]]:
        """The collected rows as plain numpy arrays (small to pickle or all-gather).

        Returns:
            `labels` (uint8) and `probs` (float64), plus `groups` when groups were given.
        """
        state: dict[str, npt.NDArray[Any]] = {
            "labels": np.concatenate(self._labels) if self._labels else np.empty(0, np.uint8),
            "probs": np.concatenate(self._probs) if self._probs else np.empty(0, np.float64),
        }
        if self._has_groups:
            state["groups"] = np.concatenate(self._groups)
        return state

    @classmethod
    def from_state(cls, state: dict[str, npt.NDArray[Any]]) -> BinaryMetricAccumulator:
        """Rebuilds an accumulator from `state()`.

        Args:
            state: a dict returned by `state()`.

        Returns:
            An accumulator holding the same rows.
        """
        accumulator = cls()
        accumulator.update(state["labels"], state["probs"], state.get("groups"))
        return accumulator

    def compute(self) -> dict[str, float]:
        """`binary_metrics` over all collected rows.

        Returns:
            The dict of `binary_metrics` (with `gauc` when groups were given).

        Raises:
            SchemaError: no rows collected, or only one class among them.
        """
        state = self.state()
        return binary_metrics(state["labels"], state["probs"], state.get("groups"))

    def reset(self) -> None:
        """Forgets all rows (e.g. at the start of the next eval epoch)."""
        self._labels.clear()
        self._probs.clear()
        self._groups.clear()
        self._has_groups = None
