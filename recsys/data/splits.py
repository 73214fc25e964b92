"""The one deterministic train/valid/test split of the project (BENCHMARKS.md).

`bucket = zlib.crc32(KEY.encode()) % 10`; buckets 0-7 train, 8 valid, 9 test. The split is a
pure function of the key, so every implementation (and every peer benchmark) gets the same rows.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np

from recsys.errors import DataError

Split = Literal["train", "valid", "test"]
SPLITS: tuple[Split, ...] = ("train", "valid", "test")


def split_of_key(key: str) -> Split:
    """Maps one key to its split."""
    bucket = zlib.crc32(key.encode()) % 10
    if bucket <= 7:
        return "train"
    return "valid" if bucket == 8 else "test"


def split_codes(keys: Iterable[str]) -> np.ndarray:
    """Split of many keys as codes: 0 train, 1 valid, 2 test (int8 array)."""
    buckets = np.fromiter((zlib.crc32(k.encode()) % 10 for k in keys), dtype=np.int8)
    return np.where(buckets <= 7, 0, np.where(buckets == 8, 1, 2)).astype(np.int8)


def split_files(root: Path, split: str) -> list[Path]:
    """`<root>/<split>.parquet`, or every `*.parquet` under `<root>/<split>/` (sorted)."""
    single = root / f"{split}.parquet"
    if single.exists():
        return [single]
    folder = root / split
    shards = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not shards:
        raise DataError(
            f"data: no Parquet for split '{split}' under {root} (expected "
            f"{single} or {folder}/*.parquet); run `recsys data prepare` first"
        )
    return shards
