"""A tiny table shaped like ml100k-ctr with a planted label, shared by model, sharding and
artifact tests (no download).

The label is planted: click = 1 iff the user's and the item's integer ids differ in parity.
No single field predicts it (per-value click rates of any one field reach a train AUC of only
about 0.6), so a model can fit it only through a user x item interaction.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from recsys.data.movielens import GENRES, ML100K_CTR_SCHEMA
from recsys.data.schema import DatasetSchema

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


# ml100k-ctr's columns (its domain is the occupation) plus an entire-space ctcvr label, so one
# tiny table serves single-task, multi-task (ESMM) and multi-domain (AdaptDHM) models.
_CTR = ML100K_CTR_SCHEMA.model_dump(mode="json")
TINY_MULTITASK_SCHEMA = DatasetSchema.model_validate(
    {
        **_CTR,
        "name": "tiny-multitask",
        "columns": [*_CTR["columns"], {"name": "ctcvr", "role": "label", "task": "ctcvr"}],
    }
)


def with_ctcvr(table: pa.Table) -> pa.Table:
    """Adds an entire-space `ctcvr` label (click AND a planted conversion) for multi-task
    models: a clicked row converts iff its item id is not a multiple of 3, so conversion is
    learnable from the item alone and ctcvr needs both the interaction and the item."""
    items = np.asarray([int(i) for i in table["item_id"].to_pylist()])
    click = table["click"].to_numpy(zero_copy_only=False)
    conversion = (items % 3 != 0).astype(np.int8)
    return table.append_column("ctcvr", pa.array((click * conversion).astype(np.int8)))
