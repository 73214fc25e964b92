"""Proto `Column` <-> Arrow arrays, without any model knowledge (no torch import).

The server side (`column_to_arrow`) checks a column's structure (bag lengths, `missing` flags)
and turns it into an Arrow array with nulls for missing values; `serving.convert` then checks it
against the model's FeatureSchema. The client side (`column_from_values`) picks the value kind
from the values' types, so Python lists, NumPy arrays and Arrow columns all travel columnar.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from serving._pb.recsys.v1 import scoring_pb2 as pb
from serving.errors import RequestError

SCALAR_KINDS = ("strings", "ints", "doubles")
BAG_KINDS = ("string_bags", "int_bags")
MAX_BAG_VALUES = (1 << 31) - 1  # Arrow list offsets are int32


@dataclass(frozen=True)
class ArrowColumn:
    """A request column as Arrow.

    Attributes:
        kind: which value kind was sent (`strings`, `ints`, `doubles`, `string_bags`,
            `int_bags`), or None for a column of missing values only.
        array: one entry per row; missing rows are null. For `kind=None` the type is null.
    """

    kind: str | None
    array: pa.Array

    def __len__(self) -> int:
        return len(self.array)


def column_to_arrow(name: str, column: pb.Column) -> ArrowColumn:
    """Checks a Column's structure and returns it as Arrow (missing rows become nulls).

    Args:
        name: the feature the column belongs to (named in errors).
        column: the proto column.

    Raises:
        RequestError: bag lengths do not add up, `missing` has the wrong length, or no value
            kind is set without every row marked missing.
    """
    kind = column.WhichOneof("values")
    missing = np.asarray(column.missing, dtype=bool)
    if kind is None:
        if len(missing) and missing.all():
            return ArrowColumn(None, pa.nulls(len(missing)))
        raise RequestError(
            name,
            None,
            "has no values (got no value kind set, expected one of "
            f"{[*SCALAR_KINDS, *BAG_KINDS]}, or every row marked in `missing`)",
        )
    array: pa.Array
    if kind == "strings":
        array = pa.array(list(column.strings.values), pa.string())
    elif kind == "ints":
        array = pa.array(np.asarray(column.ints.values, dtype=np.int64))
    elif kind == "doubles":
        array = pa.array(np.asarray(column.doubles.values, dtype=np.float64))
    else:
        bags = column.string_bags if kind == "string_bags" else column.int_bags
        lengths = np.asarray(bags.lengths, dtype=np.int64)
        total = int(lengths.sum())
        if total != len(bags.values) or total > MAX_BAG_VALUES:
            raise RequestError(
                name,
                None,
                f"has {kind} lengths adding up to {total} (expected {len(bags.values)}, the "
                "number of values; `lengths` holds one bag size per row)",
            )
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        values = (
            pa.array(list(bags.values), pa.string())
            if kind == "string_bags"
            else pa.array(np.asarray(bags.values, dtype=np.int64))
        )
        array = pa.ListArray.from_arrays(offsets, values)
    if len(missing):
        if len(missing) != len(array):
            raise RequestError(
                name,
                None,
                f"has {len(missing)} `missing` flags (expected {len(array)}, one per row)",
            )
        if missing.any():
            array = pc.if_else(pa.array(missing), pa.scalar(None, array.type), array)
    return ArrowColumn(kind, array)


def column_from_values(name: str, values: Any) -> pb.Column:
    """Builds a Column from Python values, a NumPy array or an Arrow array, by the value types.

    Strings -> `strings`, integers and booleans -> `ints`, floats -> `doubles`, lists of
    strings -> `string_bags`, lists of integers -> `int_bags`; None (or NaN in a float
    column stays NaN, a missing dense value) marks a row missing. A bag cannot hold a None
    (the proto has no missing flag per bag value).

    Args:
        name: the feature name (used in error messages).
        values: one value per row.

    Raises:
        ValueError: the values cannot be read as one of the column kinds, or a bag holds None.
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not isinstance(values, pa.Array):
        try:
            values = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
            raise ValueError(
                f"client: feature '{name}' has values Arrow cannot read as one type "
                f"(got {list(values)[:3]!r}: {e}); send one type per feature"
            ) from e
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    kind_type = values.type
    missing = values.is_null().to_numpy(zero_copy_only=False)
    column = pb.Column()
    if pa.types.is_null(kind_type):
        column.missing.extend([True] * len(values))
        return column
    if pa.types.is_list(kind_type) or pa.types.is_large_list(kind_type):
        value_type = kind_type.value_type
        lengths = values.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
        flat = values.flatten()
        if flat.null_count:
            # a bag has no per-value missing flag: a None would travel as "" or 0, a real value
            nulls = flat.is_null().to_numpy(zero_copy_only=False)
            row = pc.list_parent_indices(values)[int(np.argmax(nulls))].as_py()
            raise ValueError(
                f"client: feature '{name}' row {row} has a bag holding a missing value (got "
                f"{values[row].as_py()!r}, expected strings or integers only); drop the None "
                "from the bag, or send None for the whole row to mark it missing"
            )
        if pa.types.is_string(value_type) or pa.types.is_large_string(value_type):
            column.string_bags.values.extend(flat.to_pylist())
            column.string_bags.lengths.extend(lengths.tolist())
        elif (
            pa.types.is_integer(value_type)
            or pa.types.is_boolean(value_type)
            or pa.types.is_null(value_type)
        ):
            column.int_bags.values.extend(_int64(name, flat).tolist())
            column.int_bags.lengths.extend(lengths.tolist())
        else:
            raise ValueError(
                f"client: feature '{name}' is a list of {value_type} (expected lists of "
                "strings or integers)"
            )
    elif pa.types.is_string(kind_type) or pa.types.is_large_string(kind_type):
        column.strings.values.extend(values.fill_null("").to_pylist())
    elif pa.types.is_integer(kind_type) or pa.types.is_boolean(kind_type):
        column.ints.values.extend(_int64(name, values).tolist())
    elif pa.types.is_floating(kind_type) or pa.types.is_decimal(kind_type):
        doubles = values.cast(pa.float64()).fill_null(0.0)
        column.doubles.values.extend(doubles.to_numpy(zero_copy_only=False).tolist())
    else:
        raise ValueError(
            f"client: feature '{name}' has values of type {kind_type} (expected strings, "
            "integers, floats, or lists of strings or integers)"
        )
    if missing.any():
        column.missing.extend(missing.tolist())
    return column


def _int64(name: str, values: pa.Array) -> np.ndarray:
    try:
        cast = values.cast(pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise ValueError(
            f"client: feature '{name}' has integers outside int64 (got {e}); send them as strings"
        ) from e
    return np.asarray(cast.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
