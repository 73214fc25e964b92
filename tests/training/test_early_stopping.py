"""Policy test of early stopping: scripted valid-AUC sequences, exact stop and best epochs.

Epochs are numbered from 1 as in `training.loop`. A run stops after the epoch at which
`patience + 1` epochs in a row have not beaten the best value so far.
"""

from __future__ import annotations

import pytest

from training.early_stopping import EarlyStopping

# epoch:  1     2     3     4      5     6
AUCS = [0.70, 0.72, 0.71, 0.715, 0.70, 0.73]


def _run(values: list[float], patience: int, min_delta: float = 0.0) -> tuple[int | None, int]:
    """Drives EarlyStopping like the training loop; returns (stop epoch or None, best epoch)."""
    stopper = EarlyStopping(patience, min_delta=min_delta)
    for epoch, value in enumerate(values, start=1):
        stopper.update(value, epoch)
        if stopper.should_stop:
            return epoch, stopper.best_epoch
    return None, stopper.best_epoch


@pytest.mark.parametrize(
    ("patience", "stop_epoch", "best_epoch"),
    [
        # best 0.72 at epoch 2; epochs 3, 4, 5 are worse (0.71, 0.715, 0.70):
        (0, 3, 2),  # the first bad epoch (3) ends the run
        (1, 4, 2),  # the second bad epoch in a row (4)
        (2, 5, 2),  # the third (5)
        (3, None, 6),  # 3 bad epochs are tolerated; epoch 6 (0.73) is a new best
    ],
)
def test_stop_epoch_and_best_epoch(patience: int, stop_epoch: int | None, best_epoch: int) -> None:
    assert _run(AUCS, patience) == (stop_epoch, best_epoch)


@pytest.mark.parametrize(
    ("values", "patience", "stop_epoch", "best_epoch"),
    [
        # a bad epoch followed by a new best resets the count: 1 bad, best, 1 bad, best ...
        ([0.6, 0.5, 0.7, 0.6, 0.8, 0.7], 1, None, 5),
        # ... so patience 0 stops at the first bad epoch even if a better one would follow
        ([0.6, 0.5, 0.7, 0.6, 0.8, 0.7], 0, 2, 1),
        # an equal value is not an improvement
        ([0.75, 0.75, 0.75], 1, 3, 1),
        # strictly increasing never stops
        ([0.5, 0.6, 0.7, 0.8], 0, None, 4),
        # a NaN metric (e.g. one class in valid) counts as a bad epoch, never as a best
        ([0.7, float("nan"), float("nan")], 1, 3, 1),
    ],
)
def test_scripted_sequences(
    values: list[float], patience: int, stop_epoch: int | None, best_epoch: int
) -> None:
    assert _run(values, patience) == (stop_epoch, best_epoch)


def test_update_reports_new_bests_and_tracks_the_best_value() -> None:
    stopper = EarlyStopping(patience=2)
    flags = [stopper.update(v, e) for e, v in enumerate(AUCS, start=1)]
    assert flags == [True, True, False, False, False, True]
    assert (stopper.best, stopper.best_epoch, stopper.bad_epochs) == (0.73, 6, 0)


def test_min_delta_requires_a_large_enough_gain() -> None:
    # values exact in binary so the comparison with best + min_delta is exact
    values = [0.5, 0.625, 0.5625, 0.875]
    # min_delta 0.125 over the best (0.5): epoch 2 gains exactly 0.125, not more, so it is bad
    # like epoch 3; patience 1 stops at epoch 3 with epoch 1 the best
    assert _run(values, patience=1, min_delta=0.125) == (3, 1)
    # with patience 2, epoch 4 (0.875 > 0.5 + 0.125) becomes the best
    assert _run(values, patience=2, min_delta=0.125) == (None, 4)
