"""Policy tests of the one train/valid/test split (BENCHMARKS.md):
`bucket = zlib.crc32(KEY.encode()) % 10`; buckets 0-7 train, 8 valid, 9 test."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from recsys.data.splits import SPLITS, split_codes, split_of_key

SPLIT_OF_BUCKET = {**dict.fromkeys(range(8), "train"), 8: "valid", 9: "test"}
CODE_OF_SPLIT = {"train": 0, "valid": 1, "test": 2}


def _expected_split(key: str) -> str:
    """The BENCHMARKS.md rule, written out independently of recsys.data.splits."""
    return SPLIT_OF_BUCKET[zlib.crc32(key.encode("utf-8")) % 10]


def _first_key_in_bucket(bucket: int) -> str:
    """The first ml100k-style key "u:i" (u, i from 1) whose crc32 falls in `bucket`."""
    for user in range(1, 100):
        for item in range(1, 100):
            key = f"{user}:{item}"
            if zlib.crc32(key.encode()) % 10 == bucket:
                return key
    raise AssertionError(f"no key found for bucket {bucket}")


def test_crc32_check_value_key_is_train() -> None:
    # "123456789" is the standard CRC-32 check input: crc32 = 0xCBF43926 = 3421780262, and
    # 3421780262 % 10 = 2, a train bucket. This pins the polynomial, not just self-consistency.
    assert zlib.crc32(b"123456789") == 0xCBF43926
    assert split_of_key("123456789") == "train"


@pytest.mark.parametrize("bucket", range(10))
def test_split_of_key_maps_each_bucket_to_its_split(bucket: int) -> None:
    key = _first_key_in_bucket(bucket)
    assert split_of_key(key) == SPLIT_OF_BUCKET[bucket]


@pytest.mark.parametrize(
    "key", ["1:1", "196:242", "943:1682", "0", "", "user with spaces:item", "ü:é", "日本:1"]
)
def test_split_of_key_matches_zlib_rule(key: str) -> None:
    assert split_of_key(key) == _expected_split(key)


def test_split_codes_agrees_with_split_of_key_on_random_keys() -> None:
    rng = np.random.default_rng(7)
    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789:_-é")
    keys = ["".join(rng.choice(alphabet, size=rng.integers(0, 20))) for _ in range(2_000)]
    codes = split_codes(keys)
    assert codes.dtype == np.int8
    expected = np.array([CODE_OF_SPLIT[split_of_key(k)] for k in keys], dtype=np.int8)
    np.testing.assert_array_equal(codes, expected)
    # 2,000 keys hit every split (P(no valid key) = 0.9**2000)
    assert set(codes.tolist()) == {0, 1, 2}


def test_split_codes_accepts_a_generator_and_empty_input() -> None:
    keys = [f"{u}:{i}" for u in range(1, 30) for i in range(1, 30)]
    from_generator = split_codes(k for k in keys)
    expected = [CODE_OF_SPLIT[_expected_split(k)] for k in keys]
    assert from_generator.tolist() == expected
    assert split_codes([]).shape == (0,)


def test_codes_follow_splits_order() -> None:
    # code i is SPLITS[i]: write_splits relies on this to name the files
    assert SPLITS == ("train", "valid", "test")
    keys = [_first_key_in_bucket(b) for b in (0, 8, 9)]
    assert [SPLITS[c] for c in split_codes(keys)] == ["train", "valid", "test"]
