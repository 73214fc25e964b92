"""Fixtures for model tests: a tiny synthetic table shaped like ml100k-ctr, its fitted
FeatureSchema and Batches, built through the same encode path as real data (no download).

The label is planted: click = 1 iff the user's and the item's integer ids differ in parity.
No single field predicts it (per-value click rates of any one field reach a train AUC of only
about 0.6), so a model can fit it only through a user x item interaction.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pytest

from recsys.data.movielens import GENRES, ML100K_CTR_SCHEMA
from recsys.features.batch import Batch, batch_from_encoded
from recsys.features.schema import FeatureSchema, fit_feature_schema

NUM_ROWS = 512
NUM_USERS = 24
NUM_ITEMS = 40
OCCUPATIONS = ("student", "engineer", "writer", "other", "educator")


def planted_click(user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
    """The planted label: 1 iff user and item ids differ in parity (an XOR)."""
    return ((user_ids % 2) ^ (item_ids % 2)).astype(np.int8)


def make_tiny_table(num_rows: int = NUM_ROWS, seed: int = 0) -> pa.Table:
    """Rows with every ml100k-ctr column; user and item attributes are fixed per id."""
    rng = np.random.default_rng(seed)
    user_age = rng.choice(["18", "25", "35", "45", "56"], NUM_USERS)
    user_gender = rng.choice(["M", "F"], NUM_USERS)
    user_occupation = rng.choice(OCCUPATIONS, NUM_USERS)
    user_zip3 = rng.choice(["021", "100", "554", "941"], NUM_USERS)
    item_year = rng.choice(["1977", "1994", "1995", "1996", "unk"], NUM_ITEMS)
    item_genres = [
        sorted(rng.choice(GENRES, size=rng.integers(1, 4), replace=False).tolist())
        for _ in range(NUM_ITEMS)
    ]
    users = rng.integers(1, NUM_USERS + 1, num_rows)
    items = rng.integers(1, NUM_ITEMS + 1, num_rows)
    click = planted_click(users, items)
    rating = np.where(click == 1, rng.integers(4, 6, num_rows), rng.integers(1, 4, num_rows))
    u, i = users - 1, items - 1
    return pa.table(
        {
            "user_id": pa.array(users.astype(str).tolist(), pa.string()),
            "item_id": pa.array(items.astype(str).tolist(), pa.string()),
            "age": pa.array(user_age[u].tolist(), pa.string()),
            "gender": pa.array(user_gender[u].tolist(), pa.string()),
            "occupation": pa.array(user_occupation[u].tolist(), pa.string()),
            "zip3": pa.array(user_zip3[u].tolist(), pa.string()),
            "release_year": pa.array(item_year[i].tolist(), pa.string()),
            "genres": pa.array([item_genres[k] for k in i], pa.list_(pa.string())),
            "click": pa.array(click),
            "rating": pa.array(rating.astype(np.int64)),
            "timestamp": pa.array(874_000_000 + np.arange(num_rows, dtype=np.int64)),
        }
    )


@pytest.fixture(scope="session")
def tiny_table() -> pa.Table:
    return make_tiny_table()


@pytest.fixture(scope="session")
def tiny_schema(tiny_table: pa.Table) -> FeatureSchema:
    return fit_feature_schema(ML100K_CTR_SCHEMA, [tiny_table])


@pytest.fixture(scope="session")
def encode_batch(tiny_schema: FeatureSchema) -> Callable[[pa.Table], Batch]:
    """Raw rows -> Batch through `FeatureSchema.encode` and `batch_from_encoded`."""

    def encode(table: pa.Table) -> Batch:
        return batch_from_encoded(tiny_schema, tiny_schema.encode(table))

    return encode


@pytest.fixture
def tiny_batch(tiny_table: pa.Table, encode_batch: Callable[[pa.Table], Batch]) -> Batch:
    """All NUM_ROWS rows of the tiny table."""
    return encode_batch(tiny_table)
