"""Features (the model input) and Batch (Features + labels), built from encoded Arrow rows.

`features_from_encoded` is the one place where ids become a TorchRec KeyedJaggedTensor; the
trainer's collate function, the predict job and the server's converter all call it, so a
training row and a serving request become identical tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.schema import Role
from recsys.errors import SchemaError
from recsys.features.schema import DOMAIN_COLUMN, FeatureSchema


@dataclass
class Features:
    """Model input for B rows.

    Attributes:
        sparse: one key per sparse feature in schema order; values are ids, lengths per row
            (1 for categorical, the bag size for multi-categorical).
        dense: (B, num_dense) standardised floats; (B, 0) when the schema has none.
        domain: (B,) domain ids, or None when the dataset has no domain column.
    """

    sparse: KeyedJaggedTensor
    dense: torch.Tensor
    domain: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.dense.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Features:
        return Features(
            sparse=self.sparse.to(torch.device(device), non_blocking=non_blocking),
            dense=self.dense.to(device, non_blocking=non_blocking),
            domain=None
            if self.domain is None
            else self.domain.to(device, non_blocking=non_blocking),
        )


@dataclass
class Batch:
    """Features plus one float label tensor (B,) per task, keyed by task name."""

    features: Features
    labels: dict[str, torch.Tensor]

    @property
    def batch_size(self) -> int:
        return self.features.batch_size

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            self.features.to(device, non_blocking),
            {k: v.to(device, non_blocking=non_blocking) for k, v in self.labels.items()},
        )


def features_from_encoded(schema: FeatureSchema, encoded: pa.Table) -> Features:
    """Encoded rows (see `FeatureSchema.encode`) -> Features, checking ids against table sizes.

    Raises:
        SchemaError: an id is outside its table (stale encoding or a vocabulary mismatch).
    """
    num_rows = encoded.num_rows
    values, lengths = [], []
    for feature in schema.sparse:
        column = encoded[feature.name].combine_chunks()
        if feature.is_bag:
            ids = pc.list_flatten(column).to_numpy(zero_copy_only=False)
            row_lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        else:
            ids = column.to_numpy(zero_copy_only=False)
            row_lengths = np.ones(num_rows, dtype=np.int32)
        if len(ids) and (ids.max() >= feature.num_embeddings or ids.min() < 0):
            bad = int(ids.max() if ids.max() >= feature.num_embeddings else ids.min())
            raise SchemaError(
                f"features: id {bad} for '{feature.name}' is out of range for a table of "
                f"{feature.num_embeddings} rows (was the vocab built on the train split?)"
            )
        values.append(ids.astype(np.int64, copy=False))
        lengths.append(row_lengths.astype(np.int32, copy=False))
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=schema.sparse_names,
        values=torch.from_numpy(np.concatenate(values) if values else np.zeros(0, np.int64)),
        lengths=torch.from_numpy(np.concatenate(lengths) if lengths else np.zeros(0, np.int32)),
    )
    if schema.dense:
        dense_np = np.stack(
            [encoded[name].to_numpy(zero_copy_only=False) for name in schema.dense_names], axis=1
        ).astype(np.float32, copy=False)
    else:
        dense_np = np.zeros((num_rows, 0), dtype=np.float32)
    domain = None
    if DOMAIN_COLUMN in encoded.column_names:
        domain = torch.from_numpy(
            encoded[DOMAIN_COLUMN].to_numpy(zero_copy_only=False).astype(np.int64)
        )
    return Features(sparse=sparse, dense=torch.from_numpy(dense_np), domain=domain)


def batch_from_encoded(schema: FeatureSchema, encoded: pa.Table) -> Batch:
    """Encoded rows with labels -> Batch (labels keyed by task)."""
    labels = {
        label.task_name: torch.from_numpy(
            encoded[label.name].to_numpy(zero_copy_only=False).astype(np.float32)
        )
        for label in schema.dataset.labels
    }
    return Batch(features_from_encoded(schema, encoded), labels)


def features_from_rows(schema: FeatureSchema, rows: list[dict[str, object]]) -> Features:
    """Raw row dicts (a request) -> Features, through the same encode path as training data."""
    if not rows:
        raise SchemaError("rows: no rows given (expected at least one)")
    columns = schema.dataset.input_columns()
    data = {}
    for name in columns:
        missing = [i for i, r in enumerate(rows) if name not in r]
        if missing:
            raise SchemaError(
                f"rows: feature '{name}' is missing in row {missing[0]} "
                f"(expected every row to have {columns})"
            )
        data[name] = _request_column(schema, name, [r[name] for r in rows])
    table = pa.table(data)
    return features_from_encoded(schema, schema.encode(table, require_labels=False))


def _request_column(schema: FeatureSchema, name: str, values: list[object]) -> pa.Array:
    """One request column as Arrow; mixed or unreadable Python types become a SchemaError, and
    a column of nulls only (nothing to infer a type from) gets the type its role expects."""
    try:
        column = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
        raise SchemaError(
            f"rows: feature '{name}' has values Arrow cannot read as one type (got "
            f"{values[:3]!r}: {e}); send every row's '{name}' as the type the model was "
            f"trained on"
        ) from e
    if pa.types.is_null(column.type):
        spec = schema.dataset.column(name)
        if spec.role == Role.DENSE:
            return pa.nulls(len(values), pa.float64())
        if spec.role == Role.MULTI_CATEGORICAL:
            return pa.nulls(len(values), pa.list_(schema.vocabs[name].values.type))
    return column
