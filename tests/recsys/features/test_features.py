"""FeatureSchema fitting and encoding, and the Features built from it, on hand-made tables whose
expected ids and values are worked out by hand in the comments."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from recsys.data.schema import DatasetSchema
from recsys.errors import SchemaError
from recsys.features.batch import (
    Features,
    batch_from_encoded,
    features_from_encoded,
    features_from_rows,
)
from recsys.features.schema import (
    DOMAIN_COLUMN,
    OOV_ID,
    FeatureSchema,
    Vocabulary,
    fit_feature_schema,
)

DATASET = DatasetSchema.from_dict(
    {
        "name": "tiny",
        "columns": [
            {"name": "user", "role": "categorical"},
            {"name": "city", "role": "categorical", "min_count": 2},
            {"name": "tags", "role": "multi_categorical"},
            {"name": "age", "role": "dense", "num_buckets": 4},
            {"name": "price", "role": "dense"},
            {"name": "occupation", "role": "categorical"},
            {"name": "click", "role": "label"},
        ],
        "domain": "occupation",
    }
)
INPUTS = ["user", "city", "tags", "age", "price", "occupation"]


def _train() -> pa.Table:
    return pa.table(
        {
            # counts b:3, a:2, z:2, c:1 -> ids b=1, a=2, z=3 (tie a/z by value), c=4
            "user": ["z", "a", "b", "z", "a", "b", "b", "c"],
            # min_count 2: oslo:3, paris:2 kept (ids 1, 2); rome, lima (1 each) -> OOV
            "city": ["paris", "paris", "rome", "oslo", "oslo", "oslo", "lima", None],
            # flattened counts y:5, x:3, v:1, w:1 -> y=1, x=2, v=3, w=4
            "tags": pa.array(
                [["x", "y"], ["y"], ["y", "w"], [], None, ["x"], ["y"], ["y", "x", "v"]],
                pa.list_(pa.string()),
            ),
            # 4 quantile buckets of 10..80: edges at positions 0.25*7, 0.5*7, 0.75*7 of the sorted
            # values = 20 + 0.75*10 = 27.5, 40 + 0.5*10 = 45, 60 + 0.25*10 = 62.5
            "age": [10, 20, 30, 40, 50, 60, 70, 80],
            # mean 5, population std 2
            "price": [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0],
            # eng:4, art:3, doc:1 -> eng=1, art=2, doc=3
            "occupation": ["eng", "eng", "art", "art", "eng", "doc", "eng", "art"],
            "click": pa.array([1, 0, 1, 0, 1, 0, 1, 0], pa.int8()),
        }
    )


def _valid() -> pa.Table:
    return pa.table(
        {
            "user": ["a", "q", None, "c", "b"],
            "city": ["rome", "oslo", "paris", None, "lima"],
            "tags": pa.array(
                [["x", "y"], [], None, ["q", "w"], ["v", "v", "y"]], pa.list_(pa.string())
            ),
            "age": [10.0, 27.5, 45.0, None, 100.0],
            "price": [5.0, 9.0, None, 1.0, 7.0],
            "occupation": ["art", "eng", "doc", "pilot", None],
            "click": pa.array([0, 1, 0, 1, 1], pa.int8()),
        }
    )


# Hand-computed encodings of _valid() under the vocabularies fitted on _train().
VALID_USER = [2, 0, 0, 4, 1]
VALID_CITY = [0, 1, 2, 0, 0]
VALID_TAGS = [[2, 1], [0], [0], [0, 4], [3, 3, 1]]
VALID_AGE = [1, 2, 3, 0, 4]  # right-closed buckets: 27.5 and 45 fall above their edge
VALID_PRICE = [0.0, 2.0, 0.0, -2.0, 1.0]
VALID_DOMAIN = [2, 1, 3, 0, 0]


@pytest.fixture(scope="module")
def schema() -> FeatureSchema:
    return fit_feature_schema(DATASET, [_train()])


def _assert_features_equal(got: Features, expected: Features) -> None:
    assert got.sparse.keys() == expected.sparse.keys()
    torch.testing.assert_close(got.sparse.values(), expected.sparse.values(), rtol=0, atol=0)
    torch.testing.assert_close(got.sparse.lengths(), expected.sparse.lengths(), rtol=0, atol=0)
    torch.testing.assert_close(got.dense, expected.dense, rtol=0, atol=0)
    assert (got.domain is None) == (expected.domain is None)
    if expected.domain is not None:
        torch.testing.assert_close(got.domain, expected.domain, rtol=0, atol=0)


# --- fitting --------------------------------------------------------------------------------
def test_vocabularies_are_frequency_ordered_with_ties_by_value(schema: FeatureSchema) -> None:
    assert schema.vocabs["user"].values.to_pylist() == ["b", "a", "z", "c"]
    assert schema.vocabs["tags"].values.to_pylist() == ["y", "x", "v", "w"]
    assert schema.vocabs["occupation"].values.to_pylist() == ["eng", "art", "doc"]


def test_min_count_drops_rare_values(schema: FeatureSchema) -> None:
    assert schema.vocabs["city"].values.to_pylist() == ["oslo", "paris"]
    assert schema.sparse_feature("city").num_embeddings == 3


def test_table_sizes_include_the_oov_row(schema: FeatureSchema) -> None:
    sizes = {f.name: f.num_embeddings for f in schema.sparse}
    assert sizes == {"user": 5, "city": 3, "tags": 5, "age": 5, "occupation": 4}
    assert schema.num_domains == 4
    assert schema.sparse_names == ["user", "city", "tags", "age", "occupation"]
    assert schema.dense_names == ["price"]


def test_bucket_edges_are_train_quantiles(schema: FeatureSchema) -> None:
    assert schema.sparse_feature("age").bucket_edges == (27.5, 45.0, 62.5)


def test_dense_statistics_come_from_train(schema: FeatureSchema) -> None:
    (price,) = schema.dense
    assert (price.mean, price.std) == (5.0, 2.0)


def test_dense_statistics_skip_train_nulls() -> None:
    train = _train().set_column(4, "price", pa.array([1.0, None, 3.0, None, 1.0, 3.0, None, None]))
    (price,) = fit_feature_schema(DATASET, [train]).dense
    assert (price.mean, price.std) == (2.0, 1.0)


def test_fitting_in_batches_equals_fitting_at_once(schema: FeatureSchema) -> None:
    train = _train()
    streamed = fit_feature_schema(DATASET, [train.slice(0, 3), train.slice(3, 2), train.slice(5)])
    assert streamed.sparse == schema.sparse
    for got, want in zip(streamed.dense, schema.dense, strict=True):  # equal up to rounding
        assert got.mean == pytest.approx(want.mean, rel=1e-12)
        assert got.std == pytest.approx(want.std, rel=1e-12)
    for name, vocab in schema.vocabs.items():
        assert streamed.vocabs[name].values.to_pylist() == vocab.values.to_pylist()


# --- encoding -------------------------------------------------------------------------------
def test_encode_valid_rows_by_hand(schema: FeatureSchema) -> None:
    encoded = schema.encode(_valid(), where="valid split")
    assert encoded["user"].to_pylist() == VALID_USER
    assert encoded["city"].to_pylist() == VALID_CITY
    assert encoded["tags"].to_pylist() == VALID_TAGS
    assert encoded["age"].to_pylist() == VALID_AGE
    np.testing.assert_allclose(encoded["price"].to_numpy(), VALID_PRICE)
    assert encoded[DOMAIN_COLUMN].to_pylist() == VALID_DOMAIN
    assert encoded["click"].to_pylist() == [0.0, 1.0, 0.0, 1.0, 1.0]


def test_values_seen_only_outside_train_are_oov(schema: FeatureSchema) -> None:
    # "q" and "pilot" occur in valid only; the schema was fitted on train, so they are OOV
    assert "q" not in schema.vocabs["user"].values.to_pylist()
    encoded = schema.encode(_valid())
    assert encoded["user"][1].as_py() == OOV_ID
    assert encoded[DOMAIN_COLUMN][3].as_py() == OOV_ID


def test_bags_keep_their_lengths_and_empty_bags_become_oov(schema: FeatureSchema) -> None:
    encoded = schema.encode(_valid())
    lengths = [len(bag) for bag in encoded["tags"].to_pylist()]
    assert lengths == [2, 1, 1, 2, 3]  # [] and null -> [OOV]; duplicates kept
    assert encoded["tags"][1].as_py() == [OOV_ID]
    assert encoded["tags"][2].as_py() == [OOV_ID]


def test_large_list_bags_encode_like_lists(schema: FeatureSchema) -> None:
    valid = _valid()
    large = valid.set_column(2, "tags", valid["tags"].cast(pa.large_list(pa.string())))
    assert schema.encode(large)["tags"].to_pylist() == VALID_TAGS


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ([0, 1, 2, 1, 0], r"valid split: label 'click' has value 2 at row 2 \(expected 0 or 1\)"),
        ([0, 1, 1, 0.5, 0], r"label 'click' has value 0\.5 at row 3 \(expected 0 or 1\)"),
        ([-1, 1, 1, 0, 0], r"label 'click' has value -1 at row 0"),
        (
            [0, None, 1, 0, 0],
            r"label 'click' has 1 missing values \(expected 0 or 1 in every row\)",
        ),
    ],
)
def test_bad_labels_name_the_label_and_row(
    schema: FeatureSchema, labels: list[Any], expected: str
) -> None:
    valid = _valid().set_column(6, "click", pa.array(labels, pa.float64()))
    with pytest.raises(SchemaError, match=expected):
        schema.encode(valid, where="valid split")


def test_boolean_labels_are_accepted(schema: FeatureSchema) -> None:
    valid = _valid().set_column(6, "click", pa.array([False, True, False, True, True]))
    assert schema.encode(valid)["click"].to_pylist() == [0.0, 1.0, 0.0, 1.0, 1.0]


def test_encode_without_labels_drops_them(schema: FeatureSchema) -> None:
    encoded = schema.encode(_valid().drop_columns(["click"]), require_labels=False)
    assert "click" not in encoded.column_names
    assert encoded["user"].to_pylist() == VALID_USER


def test_encode_missing_column_names_it(schema: FeatureSchema) -> None:
    with pytest.raises(
        SchemaError,
        match=r"request: column 'city' required by dataset schema "
        r"'tiny' is missing",
    ):
        schema.encode(_valid().drop_columns(["city"]), where="request")


# --- integer vocabularies (searchsorted path) vs string vocabularies (hash path) -------------
INT_DATASET = DatasetSchema.from_dict(
    {
        "name": "ints",
        "columns": [{"name": "item", "role": "categorical"}, {"name": "click", "role": "label"}],
    }
)
# counts 30:3, 10:2, 20:1, 999999999999:1 -> 30=1, 10=2, 20=3, 999999999999=4 (ties by value,
# which is the same order for these ints and their strings)
INT_TRAIN = [30, 10, 30, 20, 30, 10, 999_999_999_999]
# unseen below, between and above the vocabulary, and null -> OOV
INT_QUERY = [10, 20, 30, 40, 5, None, 999_999_999_999, -1, 15, 10**15]
INT_EXPECTED = [2, 3, 1, 0, 0, 0, 4, 0, 0, 0]


def _str_or_none(values: list[int | None]) -> list[str | None]:
    return [None if v is None else str(v) for v in values]


# the int32 request holds the values of INT_QUERY that fit in 32 bits
SMALL = [i for i, v in enumerate(INT_QUERY) if v is None or abs(v) < 2**31]


@pytest.mark.parametrize(
    ("train_values", "query", "expected"),
    [
        (pa.array(INT_TRAIN, pa.int64()), pa.array(INT_QUERY, pa.int64()), INT_EXPECTED),
        (
            pa.array(INT_TRAIN, pa.int64()),
            pa.chunked_array([INT_QUERY[:4], INT_QUERY[4:]], pa.int64()),
            INT_EXPECTED,
        ),
        (
            pa.array(INT_TRAIN, pa.int64()),
            pa.array([INT_QUERY[i] for i in SMALL], pa.int32()),
            [INT_EXPECTED[i] for i in SMALL],
        ),
        (pa.array(_str_or_none(INT_TRAIN)), pa.array(_str_or_none(INT_QUERY)), INT_EXPECTED),
        (
            pa.array(_str_or_none(INT_TRAIN)),
            pa.chunked_array([_str_or_none(INT_QUERY[:4]), _str_or_none(INT_QUERY[4:])]),
            INT_EXPECTED,
        ),
    ],
    ids=["int64", "int64-chunked", "int32-request", "string", "string-chunked"],
)
def test_integer_and_string_vocabularies_give_the_same_ids(
    train_values: pa.Array, query: pa.Array | pa.ChunkedArray, expected: list[int]
) -> None:
    train = pa.table({"item": train_values, "click": pa.array([0] * len(train_values))})
    schema = fit_feature_schema(INT_DATASET, [train])
    assert schema.vocabs["item"].values.type == train_values.type
    encoded = schema.encode(pa.table({"item": query}), require_labels=False)
    assert encoded["item"].to_pylist() == expected


def test_integer_vocabulary_from_unsorted_values() -> None:
    vocab = Vocabulary(pa.array([30, 10, 20], pa.int64()))
    strings = Vocabulary(pa.array(["30", "10", "20"]))
    query = [10, 20, 30, 40, 5, None]
    assert vocab.lookup(pa.array(query, pa.int64())).tolist() == [2, 3, 1, 0, 0, 0]
    assert strings.lookup(pa.array(_str_or_none(query))).tolist() == [2, 3, 1, 0, 0, 0]
    # a request sending ints to a string vocabulary is read as the same tokens
    assert strings.lookup(pa.array(query, pa.int64())).tolist() == [2, 3, 1, 0, 0, 0]


def test_empty_vocabulary_maps_everything_to_oov() -> None:
    vocab = Vocabulary(pa.array([], pa.int64()))
    assert vocab.num_embeddings == 1
    assert vocab.lookup(pa.array([1, 2, None], pa.int64())).tolist() == [0, 0, 0]


# --- Features and Batch ---------------------------------------------------------------------
def test_batch_from_encoded_layout(schema: FeatureSchema) -> None:
    batch = batch_from_encoded(schema, schema.encode(_valid()))
    kjt = batch.features.sparse
    assert kjt.keys() == ["user", "city", "tags", "age", "occupation"]
    per_key = kjt.to_dict()
    assert per_key["user"].values().tolist() == VALID_USER
    assert per_key["user"].lengths().tolist() == [1] * 5
    assert per_key["tags"].values().tolist() == [i for bag in VALID_TAGS for i in bag]
    assert per_key["tags"].lengths().tolist() == [len(bag) for bag in VALID_TAGS]
    assert per_key["age"].values().tolist() == VALID_AGE
    torch.testing.assert_close(
        batch.features.dense, torch.tensor(VALID_PRICE, dtype=torch.float32).unsqueeze(1)
    )
    assert batch.features.domain is not None
    assert batch.features.domain.tolist() == VALID_DOMAIN
    assert batch.labels.keys() == {"click"}
    assert batch.labels["click"].tolist() == [0.0, 1.0, 0.0, 1.0, 1.0]
    assert batch.batch_size == 5


def test_features_from_rows_is_the_training_path(schema: FeatureSchema) -> None:
    valid = _valid()
    rows = valid.select(INPUTS).to_pylist()
    expected = batch_from_encoded(schema, schema.encode(valid)).features
    _assert_features_equal(features_from_rows(schema, rows), expected)


@pytest.mark.parametrize("row", range(5))
def test_one_row_request_equals_that_row_of_the_batch(schema: FeatureSchema, row: int) -> None:
    # one row alone: type inference sees a lone null, empty bag or None price
    valid = _valid()
    request = valid.select(INPUTS).slice(row, 1).to_pylist()
    expected = batch_from_encoded(schema, schema.encode(valid.slice(row, 1))).features
    _assert_features_equal(features_from_rows(schema, request), expected)


def test_features_from_rows_ignores_extra_keys(schema: FeatureSchema) -> None:
    rows = _valid().to_pylist()  # has the label and would-be extras
    for r in rows:
        r["request_id"] = "abc"
    expected = batch_from_encoded(schema, schema.encode(_valid())).features
    _assert_features_equal(features_from_rows(schema, rows), expected)


def test_features_from_rows_missing_feature_names_it(schema: FeatureSchema) -> None:
    rows = _valid().select(INPUTS).to_pylist()
    del rows[1]["price"]
    with pytest.raises(SchemaError, match=r"rows: feature 'price' is missing in row 1"):
        features_from_rows(schema, rows)


def test_features_from_rows_needs_a_row(schema: FeatureSchema) -> None:
    with pytest.raises(SchemaError, match="no rows given"):
        features_from_rows(schema, [])


def _request(**changes: Any) -> list[dict[str, Any]]:
    rows = _valid().select(INPUTS).slice(0, 2).to_pylist()
    for key, values in changes.items():
        for r, v in zip(rows, values, strict=True):
            r[key] = v
    return rows


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (_request(user=[["a"], ["b"]]), r"'user'"),  # a list for a categorical
        (_request(user=[{"k": 1}, {"k": 2}]), r"'user'"),  # an object for a categorical
        (_request(user=["a", 3]), r"'user'"),  # mixed types across rows
        (_request(tags=[["x", 2], ["y"]]), r"'tags'"),  # mixed types inside a bag
        (_request(tags=["x", "y"]), r"column 'tags' has role multi_categorical but type string"),
        (_request(price=["cheap", "dear"]), r"column 'price' has role dense but type string"),
        (_request(price=[[1.0], [2.0]]), r"column 'price' has role dense but type list"),
        (_request(age=[1.0, "old"]), r"'age'"),
    ],
    ids=[
        "list-categorical",
        "struct-categorical",
        "mixed-categorical",
        "mixed-bag",
        "string-bag",
        "string-dense",
        "list-dense",
        "mixed-bucketized",
    ],
)
def test_wrongly_typed_request_is_a_schema_error(
    schema: FeatureSchema, rows: list[dict[str, Any]], expected: str
) -> None:
    with pytest.raises(SchemaError, match=expected):
        features_from_rows(schema, rows)


def test_wrongly_typed_request_for_integer_vocabulary() -> None:
    train = pa.table({"item": pa.array(INT_TRAIN, pa.int64()), "click": [0] * len(INT_TRAIN)})
    schema = fit_feature_schema(INT_DATASET, [train])
    with pytest.raises(SchemaError, match=r"'item'.*string.*int64"):
        features_from_rows(schema, [{"item": "abc"}])
    with pytest.raises(SchemaError, match=r"'item'.*double.*int64"):
        features_from_rows(schema, [{"item": 1.5}])


@pytest.mark.parametrize(
    ("column", "ids", "bad"),
    [
        ("user", [2, 0, 0, 5, 1], 5),  # 5 == table size: one past the end
        ("user", [2, 0, -1, 4, 1], -1),
        ("occupation", [1, 1, 1, 1, 9], 9),
    ],
)
def test_out_of_range_encoded_id(
    schema: FeatureSchema, column: str, ids: list[int], bad: int
) -> None:
    encoded = schema.encode(_valid())
    encoded = encoded.set_column(
        encoded.column_names.index(column), column, pa.array(ids, pa.int64())
    )
    size = schema.sparse_feature(column).num_embeddings
    with pytest.raises(
        SchemaError,
        match=rf"id {bad} for '{column}' is out of range for a "
        rf"table of {size} rows",
    ):
        features_from_encoded(schema, encoded)


def test_out_of_range_id_in_a_bag(schema: FeatureSchema) -> None:
    encoded = schema.encode(_valid())
    bags = pa.array([[1], [2, 5], [0], [1], [1]], pa.list_(pa.int64()))
    encoded = encoded.set_column(encoded.column_names.index("tags"), "tags", bags)
    with pytest.raises(SchemaError, match="id 5 for 'tags' is out of range"):
        features_from_encoded(schema, encoded)


# --- persistence ----------------------------------------------------------------------------
def test_save_load_round_trip_encodes_identically(schema: FeatureSchema, tmp_path: Path) -> None:
    files = schema.save(tmp_path / "features")
    assert all(f.exists() for f in files)
    loaded = FeatureSchema.load(tmp_path / "features")
    assert loaded.dataset == schema.dataset
    assert loaded.sparse == schema.sparse
    assert loaded.dense == schema.dense
    assert loaded.encode(_valid()).equals(schema.encode(_valid()))


def test_save_load_keeps_integer_vocabularies(tmp_path: Path) -> None:
    train = pa.table({"item": pa.array(INT_TRAIN, pa.int64()), "click": [0] * len(INT_TRAIN)})
    schema = fit_feature_schema(INT_DATASET, [train])
    schema.save(tmp_path)
    loaded = FeatureSchema.load(tmp_path)
    assert loaded.vocabs["item"].values.type == pa.int64()
    query = pa.table({"item": pa.array(INT_QUERY, pa.int64())})
    assert loaded.encode(query, require_labels=False)["item"].to_pylist() == INT_EXPECTED


def test_standardisation_is_finite_for_constant_train_column() -> None:
    train = _train().set_column(4, "price", pa.array([3.0] * 8))
    schema = fit_feature_schema(DATASET, [train])
    (price,) = schema.dense
    assert price.std == 1.0  # a zero std would divide by zero
    encoded = schema.encode(_valid())
    assert all(math.isfinite(v) for v in encoded["price"].to_pylist())


# --- column types a user's own Parquet brings ----------------------------------------------------
ID_DATASET = DatasetSchema.from_dict(
    {
        "name": "ids",
        "columns": [
            {"name": "u", "role": "categorical"},
            {"name": "tags", "role": "multi_categorical"},
            {"name": "y", "role": "label"},
        ],
    }
)


def _id_table(ids: pa.Array, tags: pa.Array) -> pa.Table:
    return pa.table({"u": ids, "tags": tags, "y": pa.array([0] * len(ids), pa.int8())})


@pytest.mark.parametrize(
    "id_type", [pa.int8(), pa.int16(), pa.int32(), pa.uint8(), pa.uint32(), pa.uint64()]
)
def test_integer_ids_of_any_width_encode_like_int64_ids(id_type: pa.DataType) -> None:
    # counts 7:2, 5:1, 9:1 -> ids 7=1, 5=2, 9=3; null -> OOV. Bags: 3:2, 4:1 -> 3=1, 4=2.
    ids, bags = [5, 7, 7, None, 9], [[3, 4], [3], [], None, [4, None]]
    narrow = fit_feature_schema(
        ID_DATASET, [_id_table(pa.array(ids, id_type), pa.array(bags, pa.list_(id_type)))]
    )
    wide = fit_feature_schema(
        ID_DATASET, [_id_table(pa.array(ids, pa.int64()), pa.array(bags, pa.list_(pa.int64())))]
    )
    for schema in (narrow, wide):
        encoded = schema.encode(
            _id_table(pa.array(ids, id_type), pa.array(bags, pa.list_(id_type)))
        )
        assert encoded["u"].to_pylist() == [2, 1, 1, OOV_ID, 3]
        assert encoded["tags"].to_pylist() == [[1, 2], [1], [OOV_ID], [OOV_ID], [2, OOV_ID]]


def test_an_id_wider_than_a_narrow_vocabulary_is_unseen_not_an_error() -> None:
    schema = fit_feature_schema(
        ID_DATASET,
        [_id_table(pa.array([5, 7], pa.int8()), pa.array([[1], [2]], pa.list_(pa.int8())))],
    )
    query = pa.table({"u": pa.array([300, 2**40, -(2**40), 7, 5]), "tags": [[1]] * 5})
    assert schema.encode(query, require_labels=False)["u"].to_pylist() == [0, 0, 0, 2, 1]


def test_uint64_ids_above_the_int64_range_keep_their_identity() -> None:
    big = [2**63 + 1, 2**63 + 3, 2**63 + 3, 1]
    schema = fit_feature_schema(
        ID_DATASET, [_id_table(pa.array(big, pa.uint64()), pa.array([[1]] * 4))]
    )
    # 2**63 + 3 -> 1; then 1 and 2**63 + 1 by value; a negative int64 cannot be a uint64 id
    query = pa.table(
        {"u": pa.array([2**63 + 3, 2**63 + 1, 1, 2**63 + 2], pa.uint64()), "tags": [[1]] * 4}
    )
    assert schema.encode(query, require_labels=False)["u"].to_pylist() == [1, 3, 2, 0]
    signed = pa.table({"u": pa.array([1, -1], pa.int64()), "tags": [[1]] * 2})
    assert schema.encode(signed, require_labels=False)["u"].to_pylist() == [2, 0]


def test_dictionary_encoded_columns_fit_and_encode_like_plain_ones() -> None:
    # pandas writes a `category` column as dictionary<string>, also inside lists
    plain = _id_table(pa.array(["b", "a", "b", None]), pa.array([["x"], ["x", "y"], [], None]))
    coded = _id_table(
        plain["u"].combine_chunks().dictionary_encode(),
        pa.ListArray.from_arrays(
            pa.array([0, 1, 3, 3, 3]), pa.array(["x", "x", "y"]).dictionary_encode()
        ),
    )
    from_plain = fit_feature_schema(ID_DATASET, [plain])
    from_coded = fit_feature_schema(ID_DATASET, [coded])
    assert from_coded.vocabs["u"].values.to_pylist() == ["b", "a"]
    for schema in (from_plain, from_coded):
        for table in (plain, coded):
            encoded = schema.encode(table)
            assert encoded["u"].to_pylist() == [1, 2, 1, OOV_ID]
            assert encoded["tags"].to_pylist()[:3] == [[1], [1, 2], [OOV_ID]]


def test_files_of_one_split_may_hold_compatible_column_types() -> None:
    # string and large_string ids, an all-null id column (type null), an all-empty bag column
    shards = [
        _id_table(pa.array(["a", "b"]), pa.array([["x"], ["y", "x"]])),
        _id_table(pa.array(["b", "c"], pa.large_string()), pa.array([[], []], pa.list_(pa.null()))),
        _id_table(pa.nulls(2), pa.array([["x"], None], pa.list_(pa.large_string()))),
    ]
    schema = fit_feature_schema(ID_DATASET, shards)
    assert schema.vocabs["u"].values.to_pylist() == ["b", "a", "c"]
    assert schema.vocabs["tags"].values.to_pylist() == ["x", "y"]


def test_files_of_one_split_with_incompatible_types_name_the_column() -> None:
    shards = [
        _id_table(pa.array(["a", "b"]), pa.array([["x"], ["y"]])),
        _id_table(pa.array([1, 2]), pa.array([["x"], ["y"]])),
    ]
    with pytest.raises(SchemaError, match=r"column 'u' has values of different types.*int64"):
        fit_feature_schema(ID_DATASET, shards)


# --- dense values that are not finite, and large offsets ---------------------------------------
def test_infinite_dense_values_count_as_missing() -> None:
    price = [1.0, 2.0, math.inf, 3.0, -math.inf, None, 6.0, math.nan]
    age = [10.0, 20.0, 30.0, math.inf, 40.0, -math.inf, 50.0, 60.0]
    schema = fit_feature_schema(
        DATASET,
        [_train().set_column(4, "price", pa.array(price)).set_column(3, "age", pa.array(age))],
    )
    (fitted,) = schema.dense
    assert fitted.mean == pytest.approx(3.0) and fitted.std == pytest.approx(math.sqrt(3.5))
    assert all(math.isfinite(e) for e in schema.sparse_feature("age").bucket_edges)
    query = _valid().slice(0, 4)
    query = query.set_column(4, "price", pa.array([math.inf, -math.inf, math.nan, 3.0]))
    query = query.set_column(3, "age", pa.array([math.inf, -math.inf, math.nan, 10.0]))
    encoded = schema.encode(query)
    assert encoded["price"].to_pylist() == [0.0, 0.0, 0.0, 0.0]  # 3.0 is the mean
    assert encoded["age"].to_pylist()[:3] == [OOV_ID] * 3 and encoded["age"][3].as_py() != OOV_ID


@pytest.mark.parametrize("offset", [1e6, 1e9, 1.7e9])
def test_dense_spread_survives_a_large_mean(offset: float) -> None:
    rng = np.random.default_rng(0)
    values = offset + rng.uniform(0.0, 1.0, 4000)
    batches = [
        pa.concat_tables([_train()] * 63)
        .slice(0, len(chunk))
        .set_column(4, "price", pa.array(chunk))
        for chunk in np.array_split(values, 8)
    ]
    (fitted,) = fit_feature_schema(DATASET, batches).dense
    assert fitted.mean == pytest.approx(values.mean(), rel=1e-12)
    assert fitted.std == pytest.approx(values.std(), rel=1e-6)  # E[x^2] - E[x]^2 gave 0 -> 1.0


def test_a_column_constant_up_to_rounding_is_not_scaled() -> None:
    train = pa.concat_tables([_train()] * 4)
    train = train.set_column(4, "price", pa.array(np.full(train.num_rows, 1e6 + 0.1)))
    (fitted,) = fit_feature_schema(DATASET, [train] * 3).dense
    assert fitted.std == 1.0
