"""Driver-side data preparation for a run: locate the splits, fit features on train, encode.

Raw split Parquet -> FeatureSchema fitted on train (streamed) -> encoded Parquet in the run
folder (train shuffled once and cut into shards so Ray Data can shuffle file order per epoch;
valid/test carry a `__row__` index so gathered predictions can be put back in order) ->
side tables of user and item features keyed by id, for the artifact.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from recsys.data.movielens import MOVIELENS_TASKS, default_data_dir, prepare_movielens
from recsys.data.schema import DatasetSchema
from recsys.data.splits import SPLITS, split_files
from recsys.errors import DataError, SchemaError
from recsys.features.schema import (
    FeatureSchema,
    coverage_line,
    coverage_report,
    fit_feature_schema,
)
from training.config import DataConfig

logger = logging.getLogger(__name__)

ROW_COLUMN = "__row__"
GROUP_COLUMN = "__group__"  # the raw user id of valid/test rows, for GAUC
VOCABULARY_FILE = "vocabulary.json"  # per split: values known to the train vocabulary or not


# A fixed 64-bit multiplicative hash (Knuth's golden-ratio constant) of a valid row's number,
# so a share of the valid rows can be set apart reproducibly in every process without a stored
# list; numpy's uint64 product wraps modulo 2**64, which is the hash.
_ROW_HASH = np.uint64(0x9E3779B97F4A7C15)


def valid_part(rows: np.ndarray, share: float) -> np.ndarray:
    """Which valid rows (by their `__row__` number) fall in the first `share` of them.

    A fixed hash of the row number, uniform in [0, 1), is compared with `share`: the same rows
    for the same share in every process and run, and a larger share holds every row of a
    smaller one. `recsys search-dims` fits α on this part (`search.alpha_valid_share`) and the
    retrain selects its epoch on the rest (`train.valid_exclude_share`).

    Example:
        >>> part = valid_part(np.arange(100_000), 0.5)
        >>> round(float(part.mean()), 2)
        0.5
    """
    hashed = np.asarray(rows, dtype=np.uint64) * _ROW_HASH
    return (hashed >> np.uint64(11)).astype(np.float64) / float(1 << 53) < share


def filter_valid_part(tables: Iterable[pa.Table], share: float, inside: bool) -> Iterator[pa.Table]:
    """The rows of encoded valid tables inside `valid_part(share)`, or outside it; tables left
    empty are dropped. Inside a share of 1 and outside a share of 0 is every row, unread."""
    for table in tables:
        if (share < 1) if inside else (share > 0):
            part = valid_part(table.column(ROW_COLUMN).to_numpy(), share)
            table = table.filter(pa.array(part if inside else ~part))
        if table.num_rows:
            yield table


@dataclass(frozen=True)
class SplitFiles:
    """The raw Parquet files of one dataset, per split, with its DatasetSchema."""

    schema: DatasetSchema
    root: Path
    files: dict[str, list[Path]]


def locate_dataset(config: DataConfig, prepare: bool = True) -> SplitFiles:
    """Finds (and for the MovieLens tasks prepares on first use) the dataset of the config."""
    data_dir = Path(config.data_dir) if config.data_dir else default_data_dir()
    root = Path(config.path) if config.path else data_dir / config.dataset
    if config.dataset in MOVIELENS_TASKS and prepare:
        prepare_movielens(config.dataset, root, data_dir=data_dir, show_progress=True)
    schema_path = schema_file_path(config.schema_file, root)
    if config.dataset == "parquet":
        fix = "set data.path to your folder and data.schema_file to its YAML DatasetSchema"
    else:
        fix = f"run `recsys data prepare {config.dataset} --out {root}` or fix data.path"
    if not root.is_dir():
        raise DataError(
            f"data: {root} is not a folder (expected the dataset's train/valid/test Parquet "
            f"under it); {fix}"
        )
    if not schema_path.exists():
        where = str(schema_path.absolute())
        if config.schema_file and not Path(config.schema_file).is_absolute():
            where = f"{where} nor {(root / config.schema_file).absolute()}"
        raise DataError(
            f"data: schema file {config.schema_file or 'schema.yaml'} not found ({where}; "
            f"expected a YAML DatasetSchema); {fix}"
        )
    schema = DatasetSchema.from_yaml(schema_path)
    return SplitFiles(schema, root, {s: split_files(root, s) for s in SPLITS})


def schema_file_path(schema_file: str | None, root: Path) -> Path:
    """`data.schema_file` as a path: `<root>/schema.yaml` when unset; a relative path is
    taken from the current folder if it is there, else from the data folder `root`."""
    if not schema_file:
        return root / "schema.yaml"
    path = Path(schema_file)
    if not path.is_absolute() and not path.exists() and (root / path).exists():
        return root / path
    return path


def iter_tables(
    files: list[Path], columns: list[str] | None = None, batch_rows: int = 65_536
) -> Iterator[pa.Table]:
    """Streams Parquet files as tables of at most `batch_rows` rows (bounded memory)."""
    for path in files:
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
            yield pa.Table.from_batches([batch])


def fit_features(data: SplitFiles, chunk_rows: int = 1 << 16) -> FeatureSchema:
    """Fits the FeatureSchema on the train split only, streaming `chunk_rows` rows at a time."""
    return fit_feature_schema(data.schema, iter_tables(data.files["train"], batch_rows=chunk_rows))


def encode_splits(
    data: SplitFiles,
    features: FeatureSchema,
    out_dir: Path,
    seed: int,
    chunk_rows: int = 1 << 18,
    rows_per_shard: int = 16_384,
    show_progress: bool = False,
) -> dict[str, Path]:
    """Encodes every split into `out_dir/<split>/part-*.parquet`; returns the split folders.

    Splits are read `chunk_rows` rows at a time, so memory does not grow with their size.
    Train rows are shuffled with `seed` within each chunk and written as shards of
    `rows_per_shard`, so reading files in a random order mixes users and items. Valid and test
    keep their row order (shards numbered in order). Each split's categorical values are
    counted as known, out of the train vocabulary or missing into `out_dir/vocabulary.json`
    (see `read_vocabulary_counts`), and the unseen shares are logged.
    """
    rng = np.random.default_rng(seed)
    folders = {}
    coverage = {}
    for split in SPLITS:
        counts: dict[str, np.ndarray] = {}
        folder = out_dir / split
        folder.mkdir(parents=True, exist_ok=True)
        row_offset, shard = 0, 0
        total = count_rows(data.files[split])
        bar = tqdm(
            total=total,
            desc=f"encode {split}",
            unit="rows",
            disable=not show_progress,
            mininterval=1.0,
        )
        for table in iter_tables(data.files[split], batch_rows=chunk_rows):
            encoded = features.encode(table, where=f"{split} split")
            for name, per_outcome in features.value_outcomes(table, encoded).items():
                counts[name] = counts.get(name, 0) + per_outcome
            encoded = encoded.append_column(
                ROW_COLUMN, pa.array(np.arange(row_offset, row_offset + table.num_rows))
            )
            if split != "train" and data.schema.user is not None:
                encoded = encoded.append_column(
                    GROUP_COLUMN, table[data.schema.user.id_column].cast(pa.string())
                )
            if split == "train":
                encoded = encoded.take(pa.array(rng.permutation(encoded.num_rows)))
            for start in range(0, encoded.num_rows, rows_per_shard):
                part = encoded.slice(start, rows_per_shard)
                pq.write_table(part, folder / f"part-{shard:05d}.parquet")
                shard += 1
            row_offset += table.num_rows
            bar.update(table.num_rows)
        bar.close()
        folders[split] = folder
        coverage[split] = coverage_report(counts)
        if split != "train":  # train's vocabulary misses only its own rare values
            logger.info(
                "%s split: out of the train vocabulary (scored as the OOV id): %s",
                split,
                coverage_line(coverage[split]),
            )
    (out_dir / VOCABULARY_FILE).write_text(json.dumps(coverage, indent=2))
    return folders


def read_vocabulary_counts(encoded_dir: Path) -> dict[str, Any] | None:
    """What `encode_splits` counted per split (None for a folder encoded before it counted)."""
    path = encoded_dir / VOCABULARY_FILE
    return json.loads(path.read_text()) if path.exists() else None


def side_tables(data: SplitFiles, chunk_rows: int = 1 << 18) -> dict[str, pa.Table]:
    """User and item features keyed by id, from every split (entity attributes, not labels).

    Each id keeps the features of its first row (train, then valid, then test, in file order).
    Streams the splits `chunk_rows` rows at a time: memory grows with the number of distinct
    ids, not with the number of rows.
    """
    tables = {}
    for entity_name, entity in (("user", data.schema.user), ("item", data.schema.item)):
        if entity is None:
            continue
        columns = [entity.id_column, *entity.feature_columns]
        kept: list[pa.Table] = []
        seen: pa.Array | None = None  # ids kept so far
        for split in SPLITS:
            for table in iter_tables(data.files[split], columns=columns, batch_rows=chunk_rows):
                table = _with_id_type(table, entity.id_column, seen, split)
                # a row without an id describes no user or item
                table = table.filter(pc.is_valid(table[entity.id_column]))
                ids = table[entity.id_column].combine_chunks()
                _, first = np.unique(ids.to_numpy(zero_copy_only=False), return_index=True)
                new = table.take(pa.array(np.sort(first)))
                if seen is not None:
                    new = new.filter(pc.invert(pc.is_in(new[entity.id_column], value_set=seen)))
                if new.num_rows:
                    kept.append(new)
                    added = new[entity.id_column].combine_chunks()
                    seen = added if seen is None else pa.concat_arrays([seen, added])
        tables[entity_name] = pa.concat_tables(kept).combine_chunks() if kept else None
    return {k: v for k, v in tables.items() if v is not None}


def _with_id_type(table: pa.Table, id_column: str, seen: pa.Array | None, split: str) -> pa.Table:
    """`table` with its id column decoded (a dictionary-encoded column, as pandas writes a
    `category`) and cast to the type of the ids kept so far (a split may store numeric ids as
    strings, or in a narrower integer type, as encoding allows)."""
    column = table[id_column]
    target = seen.type if seen is not None else column.type
    if pa.types.is_dictionary(target):
        target = target.value_type
    if column.type == target:
        return table
    try:
        cast = column.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise SchemaError(
            f"{split} split: id column '{id_column}' of type {column.type} cannot be read as "
            f"{target}, the type of the earlier splits' ids (first values "
            f"{column.slice(0, 3).to_pylist()}); write the id with one type in every split"
        ) from e
    return table.set_column(table.schema.get_field_index(id_column), id_column, cast)


def count_rows(files: list[Path]) -> int:
    """Rows in Parquet files, from their footers."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def rebatch(tables: Iterable[pa.Table], batch_rows: int) -> Iterator[pa.Table]:
    """Re-cuts a stream of tables into tables of exactly `batch_rows` rows, in order (the last
    one may be shorter); holds at most about two batches at a time."""
    pending: list[pa.Table] = []
    held = 0
    for table in tables:
        pending.append(table)
        held += table.num_rows
        while held >= batch_rows:
            joined = pa.concat_tables(pending)
            yield joined.slice(0, batch_rows).combine_chunks()
            rest = joined.slice(batch_rows)
            pending, held = [rest], rest.num_rows
    if held:
        yield pa.concat_tables(pending).combine_chunks()
