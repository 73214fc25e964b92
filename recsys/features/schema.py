"""FeatureSchema: the DatasetSchema plus what was fitted on train (vocabularies, OOV ids, bucket
edges, dense statistics), and `encode`, the one function that turns raw rows into ids.

Data flow: raw Arrow rows (a Parquet split, or a serving request) -> `FeatureSchema.encode` ->
encoded Arrow table (ids, standardised floats, labels) -> `recsys.features.batch` -> Features.
Id 0 of every table is the reserved OOV id: unseen, missing or too-rare values map there, never
to an exception and never to a silent collision with a real value.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.data.schema import ColumnSpec, DatasetSchema, Role
from recsys.errors import SchemaError

logger = logging.getLogger(__name__)

OOV_ID = 0
VALUE_OUTCOMES = ("known", "out_of_vocabulary", "missing")
DOMAIN_COLUMN = "__domain__"
SCHEMA_FILE = "schema.json"
VOCAB_DIR = "vocab"


@dataclass(frozen=True)
class Vocabulary:
    """Values of one sparse feature in id order (id = position + 1; id 0 is OOV).

    Values are ordered by train frequency, most frequent first (ties by value), which is the
    order DNIS's frequency blocks rely on.
    """

    values: pa.Array
    _index: dict[object, int] | None = field(default=None, compare=False, repr=False)

    @property
    def num_embeddings(self) -> int:
        return len(self.values) + 1

    def lookup(self, column: pa.Array | pa.ChunkedArray, name: str | None = None) -> np.ndarray:
        """Ids (int64) of `column`'s values; null and unseen values get OOV_ID.

        `name` (the feature) is only used in the error for values of an unreadable type.
        """
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if pa.types.is_dictionary(column.type):
            column = column.dictionary_decode()
        if len(self.values) == 0:
            return np.zeros(len(column), dtype=np.int64)
        if pa.types.is_integer(self.values.type):
            if not pa.types.is_integer(column.type):
                column = _cast_like(column, self.values.type, name)
            # Sorted keys + searchsorted: no hash table rebuilt per call, so large integer
            # vocabularies (synthetic-ctr, millions of ids) stay cheap per batch. Integers of
            # any width are compared as 64-bit numbers rather than cast to the vocabulary's
            # type: an id a narrow vocabulary type cannot hold (300 against int8 ids) is
            # simply unseen.
            keys, ids = self._sorted_integer_index()
            raw, valid = _integer_values(column, keys.dtype)
            pos = np.clip(np.searchsorted(keys, raw), 0, len(keys) - 1)
            found = (keys[pos] == raw) & valid
            return np.where(found, ids[pos], OOV_ID).astype(np.int64)
        column = _cast_like(column, self.values.type, name)
        index = pc.index_in(column, value_set=self.values)
        return (pc.fill_null(index, -1).to_numpy(zero_copy_only=False) + 1).astype(np.int64)

    def _sorted_integer_index(self) -> tuple[np.ndarray, np.ndarray]:
        cached = self.__dict__.get("_sorted")
        if cached is None:
            wide = np.uint64 if self.values.type == pa.uint64() else np.int64
            values = self.values.to_numpy(zero_copy_only=False).astype(wide)
            order = np.argsort(values, kind="stable")
            cached = (values[order], order.astype(np.int64) + 1)
            object.__setattr__(self, "_sorted", cached)
        return cached


def _integer_values(column: pa.Array, wide: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """An integer column's values as `wide` (int64 or uint64), and which rows hold a value
    `wide` can represent (nulls, negatives against uint64 and uint64 values above the int64
    range against int64 are False: they cannot be in the vocabulary)."""
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    values = column.fill_null(0).to_numpy(zero_copy_only=False)
    if wide == np.uint64 and np.issubdtype(values.dtype, np.signedinteger):
        valid &= values >= 0
    elif wide == np.int64 and values.dtype == np.uint64:
        valid &= values <= np.iinfo(np.int64).max
    return values.astype(wide), valid  # any wrapped value is masked out by `valid`


def _cast_like(column: pa.Array, target: pa.DataType, name: str | None = None) -> pa.Array:
    if column.type == target:
        return column
    if pa.types.is_null(column.type):
        return pa.nulls(len(column), target)
    try:
        return column.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        what = f"'{name}' values" if name else "values"
        raise SchemaError(
            f"features: cannot read {what} of type {column.type} as {target} (first values "
            f"{column.slice(0, 3).to_pylist()}); send the same type the model was trained on"
        ) from e


@dataclass(frozen=True)
class SparseFeature:
    """A feature embedded through a table: categorical, multi-categorical or bucketised dense."""

    name: str
    kind: Literal["categorical", "multi_categorical", "bucketized"]
    num_embeddings: int
    bucket_edges: tuple[float, ...] = ()

    @property
    def is_bag(self) -> bool:
        return self.kind == "multi_categorical"


@dataclass(frozen=True)
class DenseFeature:
    """A dense feature, standardised with train statistics: (x - mean) / std; a missing, NaN or
    infinite value -> 0 (the train mean, which is fitted on finite values only)."""

    name: str
    mean: float
    std: float


@dataclass(frozen=True)
class FeatureSchema:
    """The one feature contract between data, model, trainer and server."""

    dataset: DatasetSchema
    sparse: tuple[SparseFeature, ...]
    dense: tuple[DenseFeature, ...]
    vocabs: dict[str, Vocabulary]

    # --- views --------------------------------------------------------------------------------
    @property
    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    @property
    def dense_names(self) -> list[str]:
        return [f.name for f in self.dense]

    @property
    def num_fields(self) -> int:
        return len(self.sparse) + len(self.dense)

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.dataset.tasks

    @property
    def num_domains(self) -> int:
        """Domain ids run 0..num_domains-1 (0 = unseen domain); 0 when there is no domain."""
        if self.dataset.domain is None:
            return 0
        return self.vocabs[self.dataset.domain].num_embeddings

    def sparse_feature(self, name: str) -> SparseFeature:
        for f in self.sparse:
            if f.name == name:
                return f
        raise SchemaError(f"features: unknown sparse feature '{name}' (got {self.sparse_names})")

    # --- encoding -----------------------------------------------------------------------------
    def encode(self, table: pa.Table, require_labels: bool = True, where: str = "rows") -> pa.Table:
        """Raw rows -> encoded rows: sparse ids (int64 or list<int64>), standardised dense floats
        (float32), domain ids and float32 labels. Used for training data and serving requests.

        Raises:
            SchemaError: a column is missing or mistyped, or a label is not 0/1.
        """
        self.dataset.validate_table(table.schema, where, require_labels=require_labels)
        out: dict[str, pa.Array] = {}
        for feature in self.sparse:
            out[feature.name] = self._encode_sparse(feature, table[feature.name])
        for dense in self.dense:
            values = _as_float(table[dense.name]).astype(np.float64)
            standardised = (values - dense.mean) / dense.std
            # missing, NaN and infinite values all become the mean (0 after standardising)
            standardised[~np.isfinite(standardised)] = 0.0
            out[dense.name] = pa.array(standardised.astype(np.float32))
        if self.dataset.domain is not None:
            out[DOMAIN_COLUMN] = pa.array(
                self.vocabs[self.dataset.domain].lookup(
                    table[self.dataset.domain], self.dataset.domain
                )
            )
        if require_labels:
            for label in self.dataset.labels:
                out[label.name] = pa.array(_check_label(table[label.name], label.name, where))
        return pa.table(out)

    def _encode_sparse(self, feature: SparseFeature, column: pa.ChunkedArray) -> pa.Array:
        if feature.kind == "bucketized":
            values = _as_float(column)
            ids = np.searchsorted(np.asarray(feature.bucket_edges), values, side="right") + 1
            return pa.array(np.where(np.isfinite(values), ids, OOV_ID).astype(np.int64))
        vocab = self.vocabs[feature.name]
        if feature.kind == "categorical":
            return pa.array(vocab.lookup(column, feature.name))
        bags = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        bags = (
            bags.cast(pa.list_(bags.type.value_type)) if pa.types.is_large_list(bags.type) else bags
        )
        # An empty or missing bag becomes [OOV] so every field has an embedding.
        lengths = pc.fill_null(pc.list_value_length(bags), 0).to_numpy(zero_copy_only=False)
        flat_ids = vocab.lookup(pc.list_flatten(bags), feature.name)
        empty = lengths == 0
        if empty.any():
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            flat_ids = np.insert(flat_ids, starts[empty], OOV_ID)
            lengths = np.where(empty, 1, lengths)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat_ids, pa.int64()))

    @cached_property
    def counted_features(self) -> tuple[str, ...]:
        """The features `value_outcomes` counts: categorical and multi-categorical ones (dense
        and bucketised features have no vocabulary)."""
        return tuple(f.name for f in self.sparse if f.kind != "bucketized")

    def value_outcomes(
        self, raw: pa.Table, encoded: pa.Table | None = None
    ) -> dict[str, np.ndarray]:
        """How many values of each categorical feature the vocabularies knew.

        Returns, per feature of `counted_features`, counts in `VALUE_OUTCOMES` order: values
        that map to a trained id; values present but outside the vocabulary (unseen in training
        or below its min count: they get the OOV id); missing values (null, an empty bag or a
        null in a bag). Bag elements count one by one. `encoded`: `encode(raw)` when the caller
        has it, so the lookups are not done twice. The server uses the two halves,
        `missing_values` per request and `id_counts` per batch, to stay cheap.
        """
        if encoded is None:
            names = self.counted_features
            encoded = pa.table(
                {
                    f.name: self._encode_sparse(f, raw[f.name])
                    for f in self.sparse
                    if f.name in names
                }
            )
        return self.outcomes_from(self.missing_values(raw), self.id_counts(encoded))

    def missing_values(self, raw: pa.Table) -> np.ndarray:
        """Missing values per counted feature of raw rows (null values, empty or null bags and
        nulls in bags), in `counted_features` order."""
        missing = np.zeros(len(self.counted_features), dtype=np.int64)
        for i, name in enumerate(self.counted_features):
            sent = raw.column(name)
            if not pa.types.is_list(sent.type) and not pa.types.is_large_list(sent.type):
                missing[i] = sent.null_count
                continue
            for chunk in sent.chunks:
                lengths = chunk.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
                missing[i] += np.count_nonzero(lengths == 0) + chunk.flatten().null_count
        return missing

    def id_counts(self, encoded: pa.Table) -> np.ndarray:
        """[ids other than OOV, all ids] per counted feature of encoded rows (bags: per
        element, an empty bag being one OOV id), shape (features, 2)."""
        counts = np.zeros((len(self.counted_features), 2), dtype=np.int64)
        for i, name in enumerate(self.counted_features):
            for chunk in encoded.column(name).chunks:
                if pa.types.is_list(chunk.type):
                    chunk = chunk.flatten()
                ids = chunk.to_numpy(zero_copy_only=False)
                counts[i] += (np.count_nonzero(ids != OOV_ID), len(ids))
        return counts

    def outcomes_from(self, missing: np.ndarray, id_counts: np.ndarray) -> dict[str, np.ndarray]:
        """`VALUE_OUTCOMES` counts per counted feature from `missing_values` and `id_counts` of
        the same rows (summed over requests and batches alike): every missing value, empty bag
        or null encodes as the OOV id, so the OOV ids beyond the missing values are the unseen
        ones."""
        known, total = id_counts[:, 0], id_counts[:, 1]
        outcomes = np.stack([known, total - known - missing, missing], axis=1)
        return dict(zip(self.counted_features, outcomes, strict=True))

    # --- persistence --------------------------------------------------------------------------
    def save(self, directory: Path) -> list[Path]:
        """Writes schema.json and one vocabulary Parquet file per table; returns the files."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / VOCAB_DIR).mkdir(exist_ok=True)
        files = [directory / SCHEMA_FILE]
        doc = {
            "dataset": self.dataset.model_dump(mode="json"),
            "sparse": [
                {
                    "name": f.name,
                    "kind": f.kind,
                    "num_embeddings": f.num_embeddings,
                    "bucket_edges": list(f.bucket_edges),
                }
                for f in self.sparse
            ],
            "dense": [{"name": f.name, "mean": f.mean, "std": f.std} for f in self.dense],
            "vocabs": sorted(self.vocabs),
        }
        (directory / SCHEMA_FILE).write_text(json.dumps(doc, indent=2))
        for name, vocab in self.vocabs.items():
            path = directory / VOCAB_DIR / f"{name}.parquet"
            pq.write_table(pa.table({"value": vocab.values}), path)
            files.append(path)
        return files

    @classmethod
    def load(cls, directory: Path) -> FeatureSchema:
        doc = json.loads((directory / SCHEMA_FILE).read_text())
        vocabs = {
            name: Vocabulary(
                pq.read_table(directory / VOCAB_DIR / f"{name}.parquet")["value"].combine_chunks()
            )
            for name in doc["vocabs"]
        }
        return cls(
            dataset=DatasetSchema.model_validate(doc["dataset"]),
            sparse=tuple(
                SparseFeature(f["name"], f["kind"], f["num_embeddings"], tuple(f["bucket_edges"]))
                for f in doc["sparse"]
            ),
            dense=tuple(DenseFeature(f["name"], f["mean"], f["std"]) for f in doc["dense"]),
            vocabs=vocabs,
        )


def coverage_report(counts: dict[str, np.ndarray]) -> dict[str, dict[str, int | float]]:
    """`value_outcomes` counts (summed over any rows) as JSON: per feature the three counts and
    `out_of_vocabulary_share`, the unseen share of the values present."""
    report = {}
    for name, per_outcome in counts.items():
        entry: dict[str, int | float] = dict(
            zip(VALUE_OUTCOMES, map(int, per_outcome), strict=True)
        )
        present = entry["known"] + entry["out_of_vocabulary"]
        entry["out_of_vocabulary_share"] = entry["out_of_vocabulary"] / present if present else 0.0
        report[name] = entry
    return report


def coverage_line(report: dict[str, dict[str, int | float]]) -> str:
    """The features with unseen values and their share, for one log or console line."""
    shares = [
        f"{name} {entry['out_of_vocabulary_share']:.1%}"
        for name, entry in report.items()
        if entry["out_of_vocabulary"]
    ]
    return ", ".join(shares) or "none"


def _as_float(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return column.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)


def _check_label(column: pa.ChunkedArray, name: str, where: str) -> np.ndarray:
    if column.null_count:
        raise SchemaError(
            f"{where}: label '{name}' has {column.null_count} missing values "
            f"(expected 0 or 1 in every row); drop or fill those rows"
        )
    values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
    bad = ~np.isin(values, (0.0, 1.0))
    if bad.any():
        row = int(np.argmax(bad))
        raise SchemaError(
            f"{where}: label '{name}' has value {values[row]:g} at row {row} "
            f"(expected 0 or 1); binarise the label before training"
        )
    return values.astype(np.float32)


# --- fitting on train -------------------------------------------------------------------------
def fit_feature_schema(
    dataset: DatasetSchema,
    batches: Iterable[pa.Table | pa.RecordBatch],
    max_quantile_sample: int = 1_000_000,
) -> FeatureSchema:
    """Fits vocabularies, bucket edges and dense statistics on the train split only.

    `batches` streams the train split (e.g. Parquet row groups), so memory is bounded by the
    number of distinct values, not the number of rows.
    """
    counts: dict[str, list[pa.Table]] = {c.name: [] for c in _vocab_columns(dataset)}
    moments: dict[str, np.ndarray] = {c.name: np.zeros(3) for c in dataset.dense}  # n, mean, M2
    samples: dict[str, list[np.ndarray]] = {
        c.name: [] for c in dataset.sparse if c.role == Role.DENSE
    }
    sampled = 0
    for batch in batches:
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        dataset.validate_table(table.schema, "train split")
        for name in counts:
            column = table[name]
            if dataset.column(name).role == Role.MULTI_CATEGORICAL:
                column = pc.list_flatten(column)
            if pa.types.is_dictionary(column.type):  # e.g. a pandas `category` column
                column = column.cast(column.type.value_type)
            vc = pc.value_counts(column.drop_null()).flatten()
            counts[name].append(pa.table({"value": vc[0], "count": vc[1]}))
            if len(counts[name]) > 16:
                counts[name] = [_merge_counts(counts[name], name)]
        for name, m in moments.items():
            _merge_moments(m, _as_float(table[name]))
        if sampled < max_quantile_sample:
            for name in samples:
                samples[name].append(_as_float(table[name])[: max_quantile_sample - sampled])
            sampled += table.num_rows

    vocabs = {}
    for name, tables in counts.items():
        merged = _merge_counts(tables, name)
        spec = dataset.column(name)
        merged = merged.filter(pc.greater_equal(merged["count"], spec.min_count))
        # most frequent first, ties by value: deterministic and frequency-ordered
        merged = merged.sort_by([("count", "descending"), ("value", "ascending")])
        vocabs[name] = Vocabulary(merged["value"].combine_chunks())
    sparse = []
    for spec in dataset.sparse:
        if spec.role == Role.DENSE:
            values = np.concatenate(samples[spec.name]) if samples[spec.name] else np.zeros(0)
            values = values[np.isfinite(values)]
            assert spec.num_buckets is not None
            quantiles = np.linspace(0, 1, spec.num_buckets + 1)[1:-1]
            edges = np.unique(np.quantile(values, quantiles)) if len(values) else np.zeros(0)
            sparse.append(
                SparseFeature(
                    spec.name, "bucketized", len(edges) + 2, tuple(float(e) for e in edges)
                )
            )
        else:
            sparse.append(
                SparseFeature(
                    spec.name,
                    spec.role.value,  # type: ignore[arg-type]
                    vocabs[spec.name].num_embeddings,
                )
            )
    dense = []
    for spec in dataset.dense:
        n, mean, m2 = moments[spec.name]
        if n == 0:
            raise SchemaError(
                f"train split: dense column '{spec.name}' has no finite values "
                f"(expected numbers); drop it from the schema"
            )
        std = float(np.sqrt(m2 / n))
        if std <= 1e-12 * max(abs(mean), 1.0):  # constant up to rounding: nothing to scale
            std = 1.0
        dense.append(DenseFeature(spec.name, float(mean), std))
    schema = FeatureSchema(dataset, tuple(sparse), tuple(dense), vocabs)
    logger.info("fitted features: %s", {f.name: f.num_embeddings for f in sparse})
    return schema


def _vocab_columns(dataset: DatasetSchema) -> list[ColumnSpec]:
    columns = [c for c in dataset.sparse if c.role != Role.DENSE]
    if dataset.domain is not None and all(c.name != dataset.domain for c in columns):
        columns.append(dataset.column(dataset.domain))
    return columns


def _merge_counts(tables: list[pa.Table], name: str) -> pa.Table:
    """Sums value counts of one column over batches. Files of one split may hold the column
    with different but compatible types (string and large_string; pandas writes an all-null
    column as null), so the types are unified first."""
    tables = [t for t in tables if t.num_rows] or tables[:1]  # an empty batch has no say
    try:
        joined = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        types = sorted({str(t.schema.field("value").type) for t in tables})
        raise SchemaError(
            f"train split: column '{name}' has values of different types across files "
            f"({', '.join(types)}); write it with one type in every file"
        ) from e
    merged = joined.group_by("value").aggregate([("count", "sum")])
    return pa.table({"value": merged["value"], "count": merged["count_sum"]})


def _merge_moments(moments: np.ndarray, values: np.ndarray) -> None:
    """Adds a batch's finite values to running [count, mean, M2] in place (Chan et al.'s
    pairwise update). Written out because E[x^2] - E[x]^2 loses every digit of the spread
    when the mean is large (ids or timestamps near 1e9) and no library streams this."""
    values = values[np.isfinite(values)]
    if not len(values):
        return
    n, mean, m2 = moments
    batch_n = len(values)
    batch_mean = float(values.mean())
    batch_m2 = float(np.square(values - batch_mean).sum())
    total = n + batch_n
    delta = batch_mean - mean
    moments[:] = (
        total,
        mean + delta * batch_n / total,
        m2 + batch_m2 + delta**2 * n * batch_n / total,
    )
