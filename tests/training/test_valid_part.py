"""`valid_part`: the fixed share of valid rows that `recsys search-dims` fits α on, and its
complement, on which the retrain selects its epoch (`train.valid_exclude_share`)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from training.config import TrainConfig
from training.data import ROW_COLUMN, filter_valid_part, valid_part


@pytest.mark.parametrize("share", [0.1, 0.5, 0.8])
def test_share_of_rows_and_reproducible(share: float) -> None:
    rows = np.arange(50_000)
    part = valid_part(rows, share)
    assert part.mean() == pytest.approx(share, abs=0.01)
    # a pure function of the row number: shuffled input, same membership
    order = np.random.default_rng(0).permutation(rows)
    np.testing.assert_array_equal(valid_part(order, share), part[order])


def test_not_a_block_of_consecutive_rows() -> None:
    """Rows are in file order (users, time); the part must spread over all of it."""
    part = valid_part(np.arange(10_000), 0.5)
    for chunk in np.array_split(part, 20):
        assert 0.4 < chunk.mean() < 0.6


def test_larger_share_holds_the_smaller() -> None:
    rows = np.arange(20_000)
    small, large = valid_part(rows, 0.3), valid_part(rows, 0.6)
    assert (small <= large).all() and large.sum() > small.sum()
    assert not valid_part(rows, 0.0).any() and valid_part(rows, 1.0).all()


def test_only_and_without_split_the_rows_exactly() -> None:
    tables = [
        pa.table({ROW_COLUMN: np.arange(start, start + 1000), "x": np.ones(1000)})
        for start in range(0, 5000, 1000)
    ]
    inside = np.concatenate(
        [t.column(ROW_COLUMN).to_numpy() for t in filter_valid_part(tables, 0.5, inside=True)]
    )
    outside = np.concatenate(
        [t.column(ROW_COLUMN).to_numpy() for t in filter_valid_part(tables, 0.5, inside=False)]
    )
    assert not np.intersect1d(inside, outside).size
    np.testing.assert_array_equal(np.sort(np.concatenate([inside, outside])), np.arange(5000))
    np.testing.assert_array_equal(inside, np.flatnonzero(valid_part(np.arange(5000), 0.5)))
    # the defaults leave every row where it was
    assert sum(t.num_rows for t in filter_valid_part(tables, 0.0, inside=False)) == 5000
    assert sum(t.num_rows for t in filter_valid_part(tables, 1.0, inside=True)) == 5000


def test_exclude_share_must_leave_rows() -> None:
    with pytest.raises(ValueError, match="valid_exclude_share"):
        TrainConfig(valid_exclude_share=1.0)
