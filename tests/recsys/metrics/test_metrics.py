"""Tests of recsys.metrics: references are scikit-learn, torchrec, naive loops and hand algebra."""

from __future__ import annotations

import itertools
import math
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score
from torchrec.metrics.auc import compute_auc, compute_auc_per_group
from torchrec.metrics.calibration import compute_calibration, get_calibration_states
from torchrec.metrics.gauc import compute_gauc_3d
from torchrec.metrics.ne import compute_logloss, compute_ne, get_ne_states

from recsys.errors import SchemaError
from recsys.metrics import (
    BinaryMetricAccumulator,
    auc,
    auc_by_group,
    binary_metrics,
    calibration,
    gauc,
    logloss,
    normalized_entropy,
)

SEEDS = [0, 1, 2]


def _random_rows(
    seed: int, num_rows: int = 2000, decimals: int | None = 1, num_groups: int = 50
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, probabilities that carry signal, and group ids; `decimals` rounds to make ties."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(num_rows) < 0.4).astype(np.int64)
    probs = 0.35 * labels + 0.65 * rng.random(num_rows)
    if decimals is not None:
        probs = np.round(probs, decimals)
    probs = np.clip(probs, 0.01, 0.99)  # after rounding: no exact 0 or 1, so no eps clipping
    groups = rng.integers(0, num_groups, num_rows)
    return labels, probs, groups


def _entropy(rate: float) -> float:
    return -(rate * math.log(rate) + (1.0 - rate) * math.log(1.0 - rate))


# ---------------------------------------------------------------------------------------------
# AUC
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("decimals", [1, 2, None])
@pytest.mark.parametrize("weighted", [False, True])
def test_auc_matches_sklearn(seed: int, decimals: int | None, weighted: bool) -> None:
    labels, probs, _ = _random_rows(seed, decimals=decimals)
    weights = np.random.default_rng(seed + 100).random(len(labels)) * 3 if weighted else None
    if decimals == 1:
        assert len(np.unique(probs)) <= 100  # the tie-heavy case really has many ties

    expected = roc_auc_score(labels, probs, sample_weight=weights)

    assert auc(labels, probs, weights) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("labels", "scores", "expected"),
    [
        ([0, 1], [0.5, 0.5], 0.5),  # one tied pair counts 1/2
        ([0, 1, 1], [0.3, 0.3, 0.9], 0.75),  # (1/2 + 1) / 2 pairs
        ([1, 0, 1, 0], [0.2, 0.2, 0.2, 0.2], 0.5),  # all tied
        ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),  # 3 of 4 pairs ordered
        ([1, 1, 0], [0.1, 0.2, 0.9], 0.0),  # perfectly reversed
    ],
)
def test_auc_hand_examples(labels: list[int], scores: list[float], expected: float) -> None:
    assert auc(labels, scores) == expected


def test_auc_accepts_torch_tensors() -> None:
    labels, probs, _ = _random_rows(3)
    labels_t = torch.from_numpy(labels).float().unsqueeze(1)  # (B, 1), as a model emits
    probs_t = torch.from_numpy(probs)

    assert auc(labels_t, probs_t) == auc(labels, probs)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("weighted", [False, True])
def test_auc_matches_torchrec_on_tie_free_data(seed: int, weighted: bool) -> None:
    # torchrec's `_compute_auc_helper` sorts with an unstable argsort and integrates the step
    # curve point by point, so tied scores get an order-dependent share instead of 1/2
    # (and one class gives 0.5 where we raise). The two agree only without ties.
    labels, probs, _ = _random_rows(seed, decimals=None)
    keep = (probs > 0.01) & (probs < 0.99)  # drop the clipped (tied) ends
    labels, probs = labels[keep], probs[keep]
    assert len(np.unique(probs)) == len(probs)
    weights = np.random.default_rng(seed).random(len(labels)) if weighted else np.ones(len(labels))

    expected = compute_auc(
        1,
        [torch.from_numpy(probs)[None]],
        [torch.from_numpy(labels).double()[None]],
        [torch.from_numpy(weights)[None]],
    )

    torch.testing.assert_close(
        torch.tensor([auc(labels, probs, weights)], dtype=torch.float64),
        expected.double(),
        rtol=1e-9,
        atol=1e-12,
    )


# ---------------------------------------------------------------------------------------------
# logloss, NE, calibration
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_logloss_matches_sklearn(seed: int) -> None:
    labels, probs, _ = _random_rows(seed, decimals=2)

    assert logloss(labels, probs) == pytest.approx(log_loss(labels, probs), rel=1e-12)


def test_logloss_clips_confident_mistakes() -> None:
    eps = 1e-4

    got = logloss([1, 0, 1], [0.0, 1.0, 1.0], eps=eps)

    assert got == pytest.approx((2 * -math.log(eps) - math.log(1 - eps)) / 3, rel=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_ne_is_logloss_over_base_entropy(seed: int) -> None:
    labels, probs, _ = _random_rows(seed)
    rate = labels.sum() / len(labels)

    assert normalized_entropy(labels, probs) == pytest.approx(
        log_loss(labels, probs) / _entropy(rate), rel=1e-12
    )


@pytest.mark.parametrize("rate_numerator", [1, 3, 7])
def test_ne_of_predicting_the_base_rate_is_one(rate_numerator: int) -> None:
    labels = np.array([1] * rate_numerator + [0] * (10 - rate_numerator))
    probs = np.full(10, rate_numerator / 10)

    assert normalized_entropy(labels, probs) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_ne_matches_torchrec(seed: int) -> None:
    # torchrec works in bits (log2) for both the cross-entropy and the base entropy, so NE (a
    # ratio) is unit-free and equal; its logloss is in bits, ours in nats (a factor ln 2).
    labels, probs, _ = _random_rows(seed)
    eta = 1e-7
    states = get_ne_states(
        torch.from_numpy(labels).double()[None],
        torch.from_numpy(probs)[None],
        torch.ones(1, len(labels), dtype=torch.float64),
        eta,
    )
    expected_ne = compute_ne(
        states["cross_entropy_sum"],
        states["weighted_num_samples"],
        states["pos_labels"],
        states["neg_labels"],
        eta,
    )
    expected_logloss_bits = compute_logloss(
        states["cross_entropy_sum"], states["pos_labels"], states["neg_labels"], eta
    )

    torch.testing.assert_close(
        torch.tensor([normalized_entropy(labels, probs, eps=eta)], dtype=torch.float64),
        expected_ne,
        rtol=1e-12,
        atol=0.0,
    )
    torch.testing.assert_close(
        torch.tensor([logloss(labels, probs, eps=eta)], dtype=torch.float64),
        expected_logloss_bits * math.log(2.0),
        rtol=1e-12,
        atol=0.0,
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_calibration_is_mean_prob_over_positive_rate(seed: int) -> None:
    labels, probs, _ = _random_rows(seed)

    expected = float(np.mean(probs)) / float(np.mean(labels))

    assert calibration(labels, probs) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_calibration_matches_torchrec(seed: int) -> None:
    # torchrec returns 0.0 when there is no positive; we raise SchemaError instead.
    labels, probs, _ = _random_rows(seed)
    states = get_calibration_states(
        torch.from_numpy(labels).double()[None],
        torch.from_numpy(probs)[None],
        torch.ones(1, len(labels), dtype=torch.float64),
    )

    expected = compute_calibration(states["calibration_num"], states["calibration_denom"])

    torch.testing.assert_close(
        torch.tensor([calibration(labels, probs)], dtype=torch.float64),
        expected,
        rtol=1e-12,
        atol=0.0,
    )


def test_calibration_hand_example() -> None:
    assert calibration([0, 1, 0, 1], [0.25, 0.5, 0.25, 0.5]) == 0.75


# ---------------------------------------------------------------------------------------------
# GAUC
# ---------------------------------------------------------------------------------------------


def _naive_gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    total, rows = 0.0, 0
    for group in np.unique(groups):
        mask = groups == group
        if len(np.unique(labels[mask])) < 2:
            continue
        total += mask.sum() * roc_auc_score(labels[mask], scores[mask])
        rows += mask.sum()
    return total / rows


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("num_groups", [3, 50, 400])
def test_gauc_matches_naive_loop(seed: int, num_groups: int) -> None:
    labels, probs, groups = _random_rows(seed, num_groups=num_groups)
    num_single_class = sum(len(np.unique(labels[groups == g])) == 1 for g in np.unique(groups))
    if num_groups == 400:
        assert num_single_class > 0  # the skipping rule is exercised

    assert gauc(labels, probs, groups) == pytest.approx(
        _naive_gauc(labels, probs, groups), rel=1e-12
    )


def test_gauc_hand_example() -> None:
    # group a: AUC 1 (2 rows), b: AUC 0 (2 rows), c: one class, left out -> (2*1 + 2*0) / 4.
    got = gauc([0, 1, 0, 1, 1], [0.1, 0.9, 0.8, 0.2, 0.5], ["a", "a", "b", "b", "c"])

    assert got == 0.5


def test_gauc_weights_groups_by_rows() -> None:
    # group 0: 4 rows, AUC 1; group 1: 2 rows, AUC 0 -> 4/6, not the unweighted 1/2.
    labels = [0, 0, 1, 1, 0, 1]
    scores = [0.1, 0.2, 0.3, 0.4, 0.9, 0.1]
    groups = [0, 0, 0, 0, 1, 1]

    assert gauc(labels, scores, groups) == pytest.approx(4 / 6)


def test_gauc_does_not_depend_on_group_key_type_or_row_order() -> None:
    labels, probs, groups = _random_rows(5)
    perm = np.random.default_rng(5).permutation(len(labels))
    string_groups = np.array([f"user{g}" for g in groups])

    expected = gauc(labels, probs, groups)

    assert gauc(labels, probs, string_groups) == pytest.approx(expected, rel=1e-12)
    assert gauc(labels[perm], probs[perm], groups[perm]) == pytest.approx(expected, rel=1e-12)


def test_rows_without_a_group_key_are_left_out_of_gauc() -> None:
    # a null user id reads from Arrow as None (strings) or NaN (numbers): no user, no group
    labels, probs, groups = _random_rows(6)
    missing = np.random.default_rng(6).random(len(labels)) < 0.2
    expected = gauc(labels[~missing], probs[~missing], groups[~missing])
    with_none = np.array([f"user{g}" for g in groups], dtype=object)
    with_none[missing] = None
    with_nan = groups.astype(np.float64)
    with_nan[missing] = np.nan
    mixed = with_none.copy()
    mixed[missing] = np.where(np.arange(missing.sum()) % 2, None, np.nan)
    for keys in (with_none, with_nan, mixed):
        assert gauc(labels, probs, keys) == pytest.approx(expected, rel=1e-12)
        assert binary_metrics(labels, probs, keys)["gauc"] == pytest.approx(expected, rel=1e-12)
    table = auc_by_group(labels, probs, with_none)
    assert sum(entry["rows"] for entry in table.values()) == int((~missing).sum())
    assert "None" not in table


def _equal_size_tie_free_groups(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """20 groups of 30 rows, each with both classes and distinct scores (torchrec's terms)."""
    rng = np.random.default_rng(seed)
    num_groups, group_size = 20, 30
    labels = (rng.random((num_groups, group_size)) < 0.5).astype(np.int64)
    labels[:, 0], labels[:, 1] = 0, 1
    scores = rng.random((num_groups, group_size)) + 0.3 * labels
    groups = np.repeat(np.arange(num_groups), group_size).reshape(num_groups, group_size)
    return labels, scores, groups


@pytest.mark.parametrize("seed", SEEDS)
def test_gauc_matches_torchrec_session_auc(seed: int) -> None:
    # torchrec's GAUC (`compute_gauc_3d`) is an *unweighted* mean over groups and also skips
    # groups whose predictions are all identical; `compute_auc_per_group` is an unweighted mean
    # that counts one-class groups as 0.5. With equal-size groups that all have both classes and
    # no tied scores, all three definitions coincide.
    labels, scores, groups = _equal_size_tie_free_groups(seed)
    assert len(np.unique(scores)) == scores.size

    gauc_3d = compute_gauc_3d(
        torch.from_numpy(scores)[None],
        torch.from_numpy(labels).double()[None],
        torch.ones(1, *scores.shape, dtype=torch.float64),
    )
    per_group = compute_auc_per_group(
        1,
        [torch.from_numpy(scores.reshape(1, -1))],
        [torch.from_numpy(labels.reshape(1, -1)).double()],
        [torch.ones(1, scores.size, dtype=torch.float64)],
        torch.from_numpy(groups.reshape(-1)),
    )
    got = torch.tensor([gauc(labels.ravel(), scores.ravel(), groups.ravel())], dtype=torch.float64)

    torch.testing.assert_close(
        got, gauc_3d["auc_sum"] / gauc_3d["num_samples"], rtol=1e-9, atol=0.0
    )
    torch.testing.assert_close(got, per_group.double(), rtol=1e-6, atol=0.0)  # float32 sum


# ---------------------------------------------------------------------------------------------
# binary_metrics and the accumulator
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_groups", [False, True])
def test_binary_metrics_equals_the_single_functions(with_groups: bool) -> None:
    labels, probs, groups = _random_rows(7)

    got = binary_metrics(labels, probs, groups if with_groups else None)

    expected = {
        "auc": auc(labels, probs),
        "logloss": logloss(labels, probs),
        "ne": normalized_entropy(labels, probs),
        "calibration": calibration(labels, probs),
        "positive_rate": float(np.mean(labels)),
        "num_rows": float(len(labels)),
    }
    if with_groups:
        expected["gauc"] = gauc(labels, probs, groups)
    assert got == expected


def _batch_bounds(num_rows: int, num_batches: int, seed: int) -> list[tuple[int, int]]:
    cuts = np.sort(
        np.random.default_rng(seed).choice(np.arange(1, num_rows), num_batches - 1, replace=False)
    )
    edges = [0, *cuts.tolist(), num_rows]
    return list(itertools.pairwise(edges))


def _fill(
    accumulator: BinaryMetricAccumulator,
    bounds: list[tuple[int, int]],
    rows: tuple[np.ndarray, np.ndarray, np.ndarray],
    with_groups: bool,
) -> None:
    labels, probs, groups = rows
    for i, (start, stop) in enumerate(bounds):
        # Alternate numpy and torch inputs, as the trainer may hand either over.
        if i % 2:
            accumulator.update(
                torch.from_numpy(labels[start:stop]).float(),
                torch.from_numpy(probs[start:stop]),
                torch.from_numpy(groups[start:stop]) if with_groups else None,
            )
        else:
            accumulator.update(
                labels[start:stop], probs[start:stop], groups[start:stop] if with_groups else None
            )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("with_groups", [False, True])
def test_accumulator_over_uneven_batches_equals_one_shot(seed: int, with_groups: bool) -> None:
    rows = _random_rows(seed)
    labels, probs, groups = rows
    bounds = _batch_bounds(len(labels), 7, seed)
    assert len({stop - start for start, stop in bounds}) > 1  # really uneven

    accumulator = BinaryMetricAccumulator()
    _fill(accumulator, bounds, rows, with_groups)

    assert accumulator.num_rows == len(labels)
    assert accumulator.compute() == binary_metrics(labels, probs, groups if with_groups else None)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("with_groups", [False, True])
def test_merged_workers_equal_one_shot(seed: int, with_groups: bool) -> None:
    rows = _random_rows(seed)
    labels, probs, groups = rows
    bounds = _batch_bounds(len(labels), 7, seed)
    worker_a, worker_b = BinaryMetricAccumulator(), BinaryMetricAccumulator()
    _fill(worker_a, bounds[:3], rows, with_groups)
    _fill(worker_b, bounds[3:], rows, with_groups)
    expected = binary_metrics(labels, probs, groups if with_groups else None)

    # As after ray's all-gather of python objects: each worker's state, pickled and unpickled.
    gathered = [pickle.loads(pickle.dumps(w.state())) for w in (worker_a, worker_b)]
    merged_states = BinaryMetricAccumulator.merged(gathered)
    merged_objects = BinaryMetricAccumulator.merged([worker_a, worker_b])
    in_place = BinaryMetricAccumulator.from_state(worker_a.state())
    in_place.merge(worker_b)

    assert merged_states.compute() == expected
    assert merged_objects.compute() == expected
    assert in_place.compute() == expected
    assert worker_a.num_rows == bounds[2][1]  # merging does not modify the parts


def test_accumulator_state_round_trips_through_pickle_and_is_small() -> None:
    labels, probs, groups = _random_rows(4)
    accumulator = BinaryMetricAccumulator()
    accumulator.update(labels, probs, groups)

    state = accumulator.state()
    payload = pickle.dumps(state)
    restored = pickle.loads(payload)

    assert set(restored) == {"labels", "probs", "groups"}
    np.testing.assert_array_equal(restored["labels"], labels)
    np.testing.assert_array_equal(restored["probs"], probs)
    np.testing.assert_array_equal(restored["groups"], groups)
    assert restored["labels"].dtype == np.uint8
    # 1 byte label + 8 bytes prob + 8 bytes int64 group per row, plus a little framing.
    assert len(payload) < len(labels) * 17 + 1024
    assert BinaryMetricAccumulator.from_state(restored).compute() == accumulator.compute()


def test_accumulator_reset_forgets_rows() -> None:
    labels, probs, _ = _random_rows(6)
    accumulator = BinaryMetricAccumulator()
    accumulator.update(labels[:10], probs[:10])
    accumulator.reset()
    accumulator.update(labels, probs)

    assert accumulator.compute() == binary_metrics(labels, probs)


def test_accumulator_rejects_groups_in_some_updates_only() -> None:
    accumulator = BinaryMetricAccumulator()
    accumulator.update([0, 1], [0.2, 0.7], groups=[1, 1])

    with pytest.raises(SchemaError, match="groups given in some updates only"):
        accumulator.update([0, 1], [0.2, 0.7])


def test_accumulator_rejects_bad_labels_at_update() -> None:
    accumulator = BinaryMetricAccumulator()

    with pytest.raises(SchemaError, match=r"labels must be binary \(got 2.0 at row 1"):
        accumulator.update([0, 2], [0.2, 0.7])
    assert accumulator.num_rows == 0


def test_empty_accumulator_cannot_compute() -> None:
    with pytest.raises(SchemaError, match="no rows to evaluate"):
        BinaryMetricAccumulator().compute()


# ---------------------------------------------------------------------------------------------
# error paths
# ---------------------------------------------------------------------------------------------

MetricFn = Callable[..., Any]

ALL_FUNCTIONS: list[tuple[str, MetricFn]] = [
    ("auc", auc),
    ("logloss", logloss),
    ("ne", normalized_entropy),
    ("calibration", calibration),
    ("binary_metrics", binary_metrics),
    ("gauc", lambda labels, scores: gauc(labels, scores, np.zeros(len(labels)))),
]


@pytest.mark.parametrize(("name", "fn"), ALL_FUNCTIONS, ids=[n for n, _ in ALL_FUNCTIONS])
@pytest.mark.parametrize("bad_label", [2, -1, 0.5, float("nan")])
def test_labels_outside_zero_one_are_rejected(name: str, fn: MetricFn, bad_label: float) -> None:
    with pytest.raises(SchemaError, match=r"metrics: labels must be binary \(got .* at row 2"):
        fn([0, 1, bad_label, 1], [0.1, 0.2, 0.3, 0.4])


@pytest.mark.parametrize(("name", "fn"), ALL_FUNCTIONS, ids=[n for n, _ in ALL_FUNCTIONS])
def test_length_mismatch_is_rejected(name: str, fn: MetricFn) -> None:
    with pytest.raises(SchemaError, match=r"differ in length \(got 3 and 2, expected equal"):
        fn([0, 1, 1], [0.1, 0.2])


def test_groups_length_mismatch_is_rejected() -> None:
    with pytest.raises(SchemaError, match=r"labels and groups differ in length \(got 3 and 2"):
        gauc([0, 1, 1], [0.1, 0.2, 0.3], [7, 7])


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (auc, r"AUC is undefined with one class \(got 3 positive and 0 negative rows"),
        (binary_metrics, r"AUC is undefined with one class"),
        (normalized_entropy, r"NE is undefined with one class \(got base rate 1.0"),
    ],
)
def test_single_class_is_rejected(fn: MetricFn, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        fn([1, 1, 1], [0.2, 0.5, 0.9])


def test_auc_with_zero_weight_on_one_class_is_rejected() -> None:
    with pytest.raises(SchemaError, match=r"AUC is undefined with one class \(got positive weight"):
        auc([0, 1, 1], [0.1, 0.2, 0.3], weights=[0.0, 1.0, 1.0])


def test_calibration_without_positives_is_rejected() -> None:
    with pytest.raises(SchemaError, match=r"calibration is undefined without positives"):
        calibration([0, 0, 0], [0.2, 0.5, 0.9])


def test_gauc_with_no_two_class_group_is_rejected() -> None:
    with pytest.raises(SchemaError, match=r"GAUC is undefined when every group has one class"):
        gauc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], [1, 1, 2, 2])


@pytest.mark.parametrize("fn", [logloss, normalized_entropy, calibration, binary_metrics])
@pytest.mark.parametrize("bad_prob", [1.5, -0.1, float("nan")])
def test_probabilities_outside_zero_one_are_rejected(fn: MetricFn, bad_prob: float) -> None:
    with pytest.raises(SchemaError, match=r"probabilities must lie in \[0, 1\].*not logits"):
        fn([0, 1, 1], [0.1, bad_prob, 0.3])


@pytest.mark.parametrize("bad_score", [float("inf"), float("nan")])
def test_non_finite_scores_are_rejected(bad_score: float) -> None:
    with pytest.raises(SchemaError, match=r"scores must be finite"):
        auc([0, 1, 1], [0.1, bad_score, 0.3])


def test_negative_weights_are_rejected() -> None:
    with pytest.raises(SchemaError, match=r"weights must be non-negative"):
        auc([0, 1, 1], [0.1, 0.2, 0.3], weights=[1.0, -1.0, 1.0])
