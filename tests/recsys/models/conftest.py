"""Fixtures for model tests: a tiny synthetic table shaped like ml100k-ctr, its fitted
FeatureSchema and Batches, built through the same encode path as real data (no download).

The label is planted: click = 1 iff the user's and the item's integer ids differ in parity;
ctcvr = click AND a conversion planted on the item (tests/tiny_data.py, `with_ctcvr`).
No single field predicts it (per-value click rates of any one field reach a train AUC of only
about 0.6), so a model can fit it only through a user x item interaction.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pytest

from recsys.features.batch import Batch, batch_from_encoded
from recsys.features.schema import FeatureSchema, fit_feature_schema
from tests.tiny_data import TINY_MULTITASK_SCHEMA, make_tiny_table, with_ctcvr


@pytest.fixture(scope="session")
def tiny_table() -> pa.Table:
    return with_ctcvr(make_tiny_table())


@pytest.fixture(scope="session")
def tiny_schema(tiny_table: pa.Table) -> FeatureSchema:
    """ml100k-ctr's features, its occupation domain, and two labels (ctr, ctcvr)."""
    return fit_feature_schema(TINY_MULTITASK_SCHEMA, [tiny_table])


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
