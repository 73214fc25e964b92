"""The ml100k-ctr task on the real MovieLens-100K (BENCHMARKS.md figures), the GroupLens-layout
loader against the recbole one, and the download cache's checksum."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from recsys.data.movielens import (
    GENRES,
    ML100K_CTR_SCHEMA,
    RECBOLE_WHEEL,
    RawMovieLens,
    build_ctr_table,
    fetch_recbole_wheel,
    load_raw,
    prepare_movielens,
)
from recsys.data.schema import DatasetSchema
from recsys.data.splits import SPLITS
from recsys.errors import DataError

# BENCHMARKS.md "ml100k-ctr": the check of an implementation (rows, click rate).
EXPECTED = {"train": (79_995, 0.553672), "valid": (9_992, 0.557046), "test": (10_013, 0.551084)}
SPLIT_OF_BUCKET = {**dict.fromkeys(range(8), "train"), 8: "valid", 9: "test"}
UNK_ITEMS = (267, 1412)  # the two movies whose recbole release_year is not a year


@pytest.fixture(scope="module")
def raw(ml100k_cache_dir: Path) -> RawMovieLens:
    return load_raw(data_dir=ml100k_cache_dir)


@pytest.fixture(scope="module")
def splits(ml100k_dir: Path) -> dict[str, pa.Table]:
    return {s: pq.read_table(ml100k_dir / f"{s}.parquet") for s in SPLITS}


# --- the real data ----------------------------------------------------------------------------
@pytest.mark.parametrize("split", SPLITS)
def test_split_rows_and_click_rate(splits: dict[str, pa.Table], split: str) -> None:
    rows, rate = EXPECTED[split]
    table = splits[split]
    assert table.num_rows == rows
    click = table["click"].to_numpy()
    assert round(float(click.mean()), 6) == rate


def test_raw_tables_have_movielens_100k_sizes(raw: RawMovieLens) -> None:
    assert raw.ratings.num_rows == 100_000
    assert raw.users.num_rows == 943
    assert raw.items.num_rows == 1_682


@pytest.mark.parametrize("split", SPLITS)
def test_every_row_is_in_its_crc32_bucket(splits: dict[str, pa.Table], split: str) -> None:
    table = splits[split]
    keys = [
        f"{u}:{i}"
        for u, i in zip(table["user_id"].to_pylist(), table["item_id"].to_pylist(), strict=True)
    ]
    wrong = [k for k in keys if SPLIT_OF_BUCKET[zlib.crc32(k.encode()) % 10] != split]
    assert wrong == []


def test_splits_partition_the_ratings(splits: dict[str, pa.Table]) -> None:
    pairs = [
        (u, i)
        for t in splits.values()
        for u, i in zip(t["user_id"].to_pylist(), t["item_id"].to_pylist(), strict=True)
    ]
    assert len(pairs) == 100_000
    assert len(set(pairs)) == 100_000


def test_click_is_rating_at_least_4(splits: dict[str, pa.Table]) -> None:
    for table in splits.values():
        np.testing.assert_array_equal(
            table["click"].to_numpy(), (table["rating"].to_numpy() >= 4).astype(np.int8)
        )


def test_release_year_has_exactly_two_unk_items(raw: RawMovieLens) -> None:
    years = raw.items["release_year"].to_pylist()
    unk_items = sorted(
        i for i, y in zip(raw.items["item_id"].to_pylist(), years, strict=True) if y == "unk"
    )
    assert unk_items == list(UNK_ITEMS)
    assert all(len(y) == 4 and y.isdigit() for y in years if y != "unk")


def test_release_year_unk_reaches_the_task_table(splits: dict[str, pa.Table]) -> None:
    table = pa.concat_tables(splits.values())
    unk = table.filter(pc.equal(table["release_year"], "unk"))
    assert set(unk["item_id"].to_pylist()) == {str(i) for i in UNK_ITEMS}


def test_genre_bags_have_one_to_six_known_genres(
    raw: RawMovieLens, splits: dict[str, pa.Table]
) -> None:
    lengths = pc.list_value_length(raw.items["genres"]).to_numpy()
    assert lengths.min() == 1
    assert lengths.max() == 6
    flat = set(pc.list_flatten(raw.items["genres"]).to_pylist())
    assert flat <= set(GENRES)
    for table in splits.values():
        row_lengths = pc.list_value_length(table["genres"]).to_numpy()
        assert row_lengths.min() >= 1 and row_lengths.max() <= 6


def test_zip3_is_three_characters(splits: dict[str, pa.Table]) -> None:
    for table in splits.values():
        lengths = pc.utf8_length(table["zip3"]).to_numpy()
        assert set(lengths.tolist()) == {3}


def test_split_tables_match_the_schema(ml100k_dir: Path, splits: dict[str, pa.Table]) -> None:
    assert DatasetSchema.from_yaml(ml100k_dir / "schema.yaml") == ML100K_CTR_SCHEMA
    for table in splits.values():
        assert table.column_names == [c.name for c in ML100K_CTR_SCHEMA.columns]
        ML100K_CTR_SCHEMA.validate_table(table.schema, "ml100k-ctr")
        # ids are tokens (strings), never magnitudes
        assert table.schema.field("user_id").type == pa.string()
        assert table.schema.field("item_id").type == pa.string()


# --- the GroupLens layout gives the same task rows ---------------------------------------------
def _subset(raw: RawMovieLens, users: set[int], items: set[int]) -> RawMovieLens:
    keep = pc.and_(
        pc.is_in(raw.ratings["user_id"], pa.array(sorted(users))),
        pc.is_in(raw.ratings["item_id"], pa.array(sorted(items))),
    )
    return RawMovieLens(
        ratings=raw.ratings.filter(keep),
        users=raw.users.filter(pc.is_in(raw.users["user_id"], pa.array(sorted(users)))),
        items=raw.items.filter(pc.is_in(raw.items["item_id"], pa.array(sorted(items)))),
    )


def _write_grouplens(raw: RawMovieLens, folder: Path) -> None:
    """Writes u.data (tab-separated), u.user and u.item ('|', latin-1) as GroupLens does."""
    folder.mkdir()
    ratings = raw.ratings.to_pylist()[::-1]  # any order: the task table is sorted
    (folder / "u.data").write_text(
        "".join(
            f"{r['user_id']}\t{r['item_id']}\t{r['rating']}\t{r['timestamp']}\n" for r in ratings
        )
    )
    (folder / "u.user").write_text(
        "".join(
            f"{u['user_id']}|{u['age']}|{u['gender']}|{u['occupation']}|{u['zip_code']}\n"
            for u in raw.users.to_pylist()
        )
    )
    lines = []
    for item in raw.items.to_pylist():
        year = item["release_year"]
        if year == "unk":
            # like GroupLens' "unknown" and "... (1995) (V)": no year at the end of the title
            title = "unknown" if item["item_id"] % 2 else f"Café Movie {item['item_id']} (1995) (V)"
            date = ""
        else:
            # inner parentheses and a latin-1 character, as in real titles
            title = f"Café (Le Film) {item['item_id']} ({year})"
            date = f"01-Jan-{year}"
        flags = ["1" if g in item["genres"] else "0" for g in GENRES]
        url = f"http://us.imdb.com/M/title-exact?{item['item_id']}"
        lines.append("|".join([str(item["item_id"]), title, date, "", url, *flags]) + "\n")
    (folder / "u.item").write_bytes("".join(lines).encode("latin-1"))


def test_grouplens_layout_gives_the_same_rows_as_recbole(raw: RawMovieLens, tmp_path: Path) -> None:
    users = set(range(1, 16)) | set(
        raw.ratings.filter(pc.is_in(raw.ratings["item_id"], pa.array(UNK_ITEMS)))[
            "user_id"
        ].to_pylist()
    )
    items = set(range(1, 61)) | set(UNK_ITEMS)
    subset = _subset(raw, users, items)
    folder = tmp_path / "ml-100k"
    _write_grouplens(subset, folder)

    from_grouplens = build_ctr_table(load_raw(source=folder))
    from_recbole = build_ctr_table(subset)

    assert from_grouplens.schema == from_recbole.schema
    assert from_grouplens.to_pylist() == from_recbole.to_pylist()
    # the subset exercises what differs between the layouts: titles without a year, bags
    assert set(from_recbole["release_year"].to_pylist()) >= {"unk", "1995"}
    assert pc.max(pc.list_value_length(from_recbole["genres"])).as_py() >= 3
    assert from_recbole.num_rows > 500


@pytest.mark.parametrize("missing", ["u.data", "u.user", "u.item"])
def test_grouplens_folder_missing_a_file(raw: RawMovieLens, tmp_path: Path, missing: str) -> None:
    folder = tmp_path / "ml-100k"
    _write_grouplens(_subset(raw, {1}, {1}), folder)
    (folder / missing).unlink()
    with pytest.raises(DataError, match=rf"{missing} not found \(expected the GroupLens"):
        load_raw(source=folder)


# --- the download cache -----------------------------------------------------------------------
def test_corrupt_cached_wheel_is_reported_not_used(tmp_path: Path) -> None:
    (tmp_path / RECBOLE_WHEEL).write_bytes(b"this is not a wheel")
    with pytest.raises(DataError, match=r"is corrupt \(sha256 .*; delete it and run again"):
        fetch_recbole_wheel(tmp_path)


# --- ml100k-esmm and ml100k-domains (BENCHMARKS.md) -------------------------------------------
ESMM_EXPECTED = {
    "train": (160_152, 0.499494, 0.276556),
    "valid": (19_835, 0.503756, 0.280615),
    "test": (20_013, 0.500325, 0.275721),
}


@pytest.fixture(scope="module")
def esmm_splits(ml100k_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ml100k-esmm")
    prepare_movielens("ml100k-esmm", out, data_dir=ml100k_cache_dir)
    return out


@pytest.mark.parametrize("split", SPLITS)
def test_esmm_split_rows_click_and_ctcvr_rates(
    esmm_splits: Path, splits: dict[str, pa.Table], split: str
) -> None:
    rows, click_rate, ctcvr_rate = ESMM_EXPECTED[split]
    table = pq.read_table(esmm_splits / f"{split}.parquet")
    assert table.num_rows == rows
    click, ctcvr = table["click"].to_numpy(), table["ctcvr"].to_numpy()
    assert round(float(click.mean()), 6) == click_rate
    assert round(float(ctcvr.mean()), 6) == ctcvr_rate
    assert not (ctcvr > click).any(), "a conversion without a click"
    # the clicked impressions of each split are exactly that split's ml100k-ctr rows, and
    # their conversion is ml100k-ctr's click label
    clicked = table.filter(pc.equal(table["click"], 1))
    ctr = splits[split]
    got = dict(zip(_keys(clicked), clicked["ctcvr"].to_pylist(), strict=True))
    assert got == dict(zip(_keys(ctr), ctr["click"].to_pylist(), strict=True))


def _keys(table: pa.Table) -> list[str]:
    users, items = table["user_id"].to_pylist(), table["item_id"].to_pylist()
    return [f"{u}:{i}" for u, i in zip(users, items, strict=True)]


def test_esmm_negatives_are_unrated_and_as_many_as_rated(esmm_splits: Path) -> None:
    table = pa.concat_tables(pq.read_table(esmm_splits / f"{s}.parquet") for s in SPLITS)
    users = table["user_id"].to_numpy(zero_copy_only=False)
    click = table["click"].to_numpy()
    pairs = set(zip(users, table["item_id"].to_numpy(zero_copy_only=False), strict=True))
    assert len(pairs) == table.num_rows, "an impression appears twice"
    for user in np.unique(users)[:50]:
        mine = click[users == user]
        assert (mine == 1).sum() == (mine == 0).sum()
    assert table.filter(pc.equal(table["click"], 0))["rating"].null_count == (click == 0).sum()


def test_domains_task_is_the_ctr_rows_with_occupation_as_domain(
    ml100k_cache_dir: Path, tmp_path: Path, splits: dict[str, pa.Table]
) -> None:
    prepare_movielens("ml100k-domains", tmp_path, data_dir=ml100k_cache_dir)
    schema = DatasetSchema.from_yaml(tmp_path / "schema.yaml")
    assert schema.name == "ml100k-domains" and schema.domain == "occupation"
    assert "occupation" in schema.input_columns()
    test = pq.read_table(tmp_path / "test.parquet")
    assert test.equals(splits["test"])
    assert len(set(test["occupation"].to_pylist())) == 21
