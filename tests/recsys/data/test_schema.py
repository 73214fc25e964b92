"""DatasetSchema: YAML round trip, strict loading with 'did you mean' hints, reference checks,
and validate_table's column/type checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml

from recsys.data.schema import DatasetSchema, Role
from recsys.errors import SchemaError


@pytest.fixture
def raw() -> dict[str, Any]:
    """A schema using every optional field, as a user writes it in YAML."""
    return {
        "name": "my_clicks",
        "columns": [
            {"name": "user_id", "role": "categorical"},
            {"name": "item_id", "role": "categorical", "min_count": 2},
            {"name": "occupation", "role": "categorical"},
            {"name": "tags", "role": "multi_categorical"},
            {"name": "price", "role": "dense"},
            {"name": "age", "role": "dense", "num_buckets": 4},
            {"name": "clicked", "role": "label", "task": "ctr"},
            {"name": "bought", "role": "label"},
            {"name": "timestamp", "role": "other"},
        ],
        "split_key": ["user_id", "item_id"],
        "domain": "occupation",
        "user": {"id_column": "user_id", "feature_columns": ["occupation", "age"]},
        "item": {"id_column": "item_id", "feature_columns": ["tags", "price"]},
    }


@pytest.fixture
def schema(raw: dict[str, Any]) -> DatasetSchema:
    return DatasetSchema.from_dict(raw)


def _arrow_schema(**overrides: pa.DataType) -> pa.Schema:
    """An Arrow schema that satisfies the `raw` fixture, with some fields' types replaced."""
    types = {
        "user_id": pa.string(),
        "item_id": pa.string(),
        "occupation": pa.string(),
        "tags": pa.list_(pa.string()),
        "price": pa.float64(),
        "age": pa.int64(),
        "clicked": pa.int8(),
        "bought": pa.bool_(),
    }
    types.update(overrides)
    return pa.schema(list(types.items()))


# --- loading and round trip ------------------------------------------------------------------
def test_yaml_round_trip(schema: DatasetSchema, tmp_path: Path) -> None:
    path = tmp_path / "schema.yaml"
    schema.to_yaml(path)
    loaded = DatasetSchema.from_yaml(path)
    assert loaded == schema
    assert loaded.column("age").num_buckets == 4
    assert loaded.column("item_id").min_count == 2
    assert loaded.split_key == ("user_id", "item_id")


def test_role_views(schema: DatasetSchema) -> None:
    # bucketised dense is sparse (embedded through a table); plain dense is dense
    assert [c.name for c in schema.sparse] == ["user_id", "item_id", "occupation", "tags", "age"]
    assert [c.name for c in schema.dense] == ["price"]
    assert schema.tasks == ("ctr", "bought")
    assert schema.label_for_task("ctr") == "clicked"
    assert schema.column("tags").role == Role.MULTI_CATEGORICAL


def test_from_yaml_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match=r"file .*nope\.yaml does not exist"):
        DatasetSchema.from_yaml(tmp_path / "nope.yaml")


def test_from_yaml_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(SchemaError, match="not valid YAML"):
        DatasetSchema.from_yaml(path)


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        (
            lambda r: r.update(colums=r.pop("columns")),
            r"unknown key 'colums'; did you mean 'columns'\?",
        ),
        (
            lambda r: r.update(domian=r.pop("domain")),
            r"unknown key 'domian'; did you mean 'domain'\?",
        ),
        (
            lambda r: r["columns"][0].update(rol=r["columns"][0].pop("role")),
            r"unknown key 'columns\.0\.rol'; did you mean 'columns\.0\.role'\?",
        ),
        (
            lambda r: r["user"].update(id_colum=r["user"].pop("id_column")),
            r"unknown key 'user\.id_colum'; did you mean 'user\.id_column'\?",
        ),
    ],
    ids=["top-level", "top-level-domain", "column", "entity"],
)
def test_unknown_key_names_the_closest_valid_key(
    raw: dict[str, Any], patch: Any, expected: str, tmp_path: Path
) -> None:
    patch(raw)
    with pytest.raises(SchemaError, match=expected):
        DatasetSchema.from_dict(raw)
    # the same through the YAML edge, which also names the file
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SchemaError, match=rf"typo\.yaml: .*{expected}"):
        DatasetSchema.from_yaml(path)


def test_duplicate_columns(raw: dict[str, Any]) -> None:
    raw["columns"].append({"name": "price", "role": "dense"})
    with pytest.raises(SchemaError, match=r"duplicate column names \['price'\]"):
        DatasetSchema.from_dict(raw)


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        (
            lambda r: r.update(domain="ocupation"),
            r"domain: unknown column 'ocupation'; did you mean 'occupation'\?",
        ),
        (
            lambda r: r.update(split_key=["user_id", "itemid"]),
            r"split_key: unknown column 'itemid'; did you mean 'item_id'\?",
        ),
        (
            lambda r: r["user"].update(id_column="userid"),
            r"user\.id_column: unknown column 'userid'; did you mean 'user_id'\?",
        ),
        (
            lambda r: r["item"].update(feature_columns=["tags", "prices"]),
            r"item\.feature_columns: unknown column 'prices'; did you mean 'price'\?",
        ),
    ],
    ids=["domain", "split_key", "user.id_column", "item.feature_columns"],
)
def test_reference_to_unknown_column_names_it_and_the_closest(
    raw: dict[str, Any], patch: Any, expected: str
) -> None:
    patch(raw)
    with pytest.raises(SchemaError, match=expected):
        DatasetSchema.from_dict(raw)


def test_reference_without_close_match_gives_no_hint(raw: dict[str, Any]) -> None:
    raw["domain"] = "zzzzzz"
    with pytest.raises(SchemaError, match="domain: unknown column 'zzzzzz'") as info:
        DatasetSchema.from_dict(raw)
    assert "did you mean" not in str(info.value)


def test_task_on_non_label_column(raw: dict[str, Any]) -> None:
    raw["columns"][4]["task"] = "ctr"  # price, a dense column
    with pytest.raises(
        SchemaError,
        match=r"column 'price': task='ctr' is only valid for role 'label' "
        r"\(got role 'dense'\)",
    ):
        DatasetSchema.from_dict(raw)


def test_num_buckets_on_non_dense_column(raw: dict[str, Any]) -> None:
    raw["columns"][0]["num_buckets"] = 8
    with pytest.raises(
        SchemaError, match="column 'user_id': num_buckets is only valid for role 'dense'"
    ):
        DatasetSchema.from_dict(raw)


def test_no_label(raw: dict[str, Any]) -> None:
    raw["columns"] = [c for c in raw["columns"] if c["role"] != "label"]
    with pytest.raises(SchemaError, match="no column has role 'label'"):
        DatasetSchema.from_dict(raw)


def test_two_labels_with_the_same_task(raw: dict[str, Any]) -> None:
    raw["columns"][7]["task"] = "ctr"
    with pytest.raises(SchemaError, match="two labels train the same task"):
        DatasetSchema.from_dict(raw)


def test_no_input_feature() -> None:
    raw = {"name": "x", "columns": [{"name": "y", "role": "label"}, {"name": "t", "role": "other"}]}
    with pytest.raises(SchemaError, match="no input feature"):
        DatasetSchema.from_dict(raw)


def test_column_lookup_names_closest(schema: DatasetSchema) -> None:
    with pytest.raises(SchemaError, match=r"unknown column 'pric'; did you mean 'price'\?"):
        schema.column("pric")


# --- validate_table ---------------------------------------------------------------------------
def test_validate_table_accepts_matching_types(schema: DatasetSchema) -> None:
    schema.validate_table(_arrow_schema(), "train split")
    # large lists are lists too; a label may be any number or bool
    schema.validate_table(
        _arrow_schema(tags=pa.large_list(pa.string()), clicked=pa.float32()), "train split"
    )


def test_validate_table_missing_column_names_it_and_the_fix(schema: DatasetSchema) -> None:
    arrow = _arrow_schema()
    arrow = arrow.remove(arrow.get_field_index("price")).append(pa.field("prices", pa.float64()))
    with pytest.raises(
        SchemaError,
        match=r"train split: column 'price' required by dataset schema 'my_clicks' is missing "
        r"\(got columns .*; did you mean 'prices'\?\); add it or change the schema's columns",
    ):
        schema.validate_table(arrow, "train split")


def test_validate_table_labels_only_required_when_asked(schema: DatasetSchema) -> None:
    arrow = _arrow_schema()
    arrow = arrow.remove(arrow.get_field_index("clicked"))
    schema.validate_table(arrow, "request", require_labels=False)
    with pytest.raises(SchemaError, match="column 'clicked' required"):
        schema.validate_table(arrow, "request")


def test_validate_table_multi_categorical_must_be_a_list(schema: DatasetSchema) -> None:
    with pytest.raises(
        SchemaError,
        match=r"valid split: column 'tags' has role multi_categorical but type string "
        r"\(expected a list column\)",
    ):
        schema.validate_table(_arrow_schema(tags=pa.string()), "valid split")


@pytest.mark.parametrize(
    ("column", "role"), [("price", "dense"), ("age", "dense"), ("clicked", "label")]
)
def test_validate_table_dense_and_label_must_be_numeric(
    schema: DatasetSchema, column: str, role: str
) -> None:
    with pytest.raises(
        SchemaError,
        match=rf"column '{column}' has role {role} but type string \(expected a number\)",
    ):
        schema.validate_table(_arrow_schema(**{column: pa.string()}), "train split")
