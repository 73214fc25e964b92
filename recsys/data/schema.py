"""DatasetSchema: the role of every column of a dataset, as a user writes it in YAML.

This is the lowest layer of the data flow: a Parquet table plus a DatasetSchema is everything
the trainer needs to build features. Nothing here is fitted on data; fitted facts (vocabularies,
bucket edges) live in `recsys.features.schema.FeatureSchema`.

Example YAML (bring-your-own Parquet):

    name: my_clicks
    columns:
      - {name: user_id, role: categorical}
      - {name: item_id, role: categorical}
      - {name: tags, role: multi_categorical}
      - {name: price, role: dense}
      - {name: clicked, role: label, task: ctr}
    split_key: [user_id, item_id]
    user: {id_column: user_id, feature_columns: []}
    item: {id_column: item_id, feature_columns: [tags, price]}
"""

from __future__ import annotations

import difflib
from enum import StrEnum
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from recsys.errors import SchemaError


class Role(StrEnum):
    """What a column is to the model."""

    CATEGORICAL = "categorical"  # one id per row
    MULTI_CATEGORICAL = "multi_categorical"  # a bag of ids per row (Parquet list column)
    DENSE = "dense"  # a float; standardised, or bucketised when `num_buckets` is set
    TEXT = "text"  # free text (X-Cross); not an input of the CTR models
    SEQUENCE = "sequence"  # an ordered item history (X-Cross); not a CTR model input
    LABEL = "label"  # a 0/1 target of one task
    OTHER = "other"  # carried along (ratings, timestamps), never a model input


SPARSE_ROLES = (Role.CATEGORICAL, Role.MULTI_CATEGORICAL)


class ColumnSpec(BaseModel):
    """One column of the dataset.

    Args:
        name: column name in the Parquet file.
        role: see `Role`.
        task: for labels, the task this label trains (e.g. `ctr`); defaults to the name.
        num_buckets: for dense columns, bucketise into this many train quantiles and treat the
            column as categorical; when unset the value is standardised and embedded as
            `v_f * x_f`.
        min_count: for sparse columns, values seen fewer times in train map to the OOV id.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    role: Role
    task: str | None = None
    num_buckets: int | None = Field(None, ge=2)
    min_count: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _role_specific_fields(self) -> ColumnSpec:
        if self.task is not None and self.role != Role.LABEL:
            raise ValueError(
                f"column '{self.name}': task={self.task!r} is only valid for role 'label' "
                f"(got role '{self.role}')"
            )
        if self.num_buckets is not None and self.role != Role.DENSE:
            raise ValueError(
                f"column '{self.name}': num_buckets is only valid for role 'dense' "
                f"(got role '{self.role}')"
            )
        return self

    @property
    def task_name(self) -> str:
        """The task a label column trains (its name unless `task` says otherwise)."""
        return self.task or self.name


class EntitySpec(BaseModel):
    """An entity (user or item): its id column and the columns that describe it.

    The artifact stores a side table keyed by the id with these feature columns, so a ranking
    request can send ids only.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id_column: str
    feature_columns: tuple[str, ...] = ()


class DatasetSchema(BaseModel):
    """Column roles of one dataset, plus the domain column, split key and entities.

    Args:
        name: dataset name, recorded in artifacts and reports.
        columns: every column the project reads, in the order fields are embedded.
        split_key: columns whose values, joined by ':', form the crc32 split key; None means the
            row index (BENCHMARKS.md).
        domain: a column naming the domain of each row (it may also be an input feature).
        user: the user entity, if the data has user ids.
        item: the item entity, if the data has item ids.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    columns: tuple[ColumnSpec, ...] = Field(min_length=1)
    split_key: tuple[str, ...] | None = None
    domain: str | None = None
    user: EntitySpec | None = None
    item: EntitySpec | None = None

    @model_validator(mode="after")
    def _references_exist(self) -> DatasetSchema:
        names = [c.name for c in self.columns]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"columns: duplicate column names {duplicates}")
        if not self.labels:
            raise ValueError("columns: no column has role 'label' (expected at least one)")
        tasks = [c.task_name for c in self.labels]
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"columns: two labels train the same task (got tasks {tasks})")
        if not self.sparse and not self.dense:
            raise ValueError("columns: no input feature (expected a categorical or dense column)")
        referenced: list[tuple[str, str]] = [("domain", self.domain)] if self.domain else []
        referenced += [("split_key", k) for k in self.split_key or ()]
        for entity_name, entity in (("user", self.user), ("item", self.item)):
            if entity is not None:
                referenced.append((f"{entity_name}.id_column", entity.id_column))
                referenced += [
                    (f"{entity_name}.feature_columns", c) for c in entity.feature_columns
                ]
        for where, column in referenced:
            if column not in names:
                raise ValueError(f"{where}: unknown column '{column}'{_closest(column, names)}")
        return self

    # Views by role, in column order (the field order of the model).
    @property
    def sparse(self) -> tuple[ColumnSpec, ...]:
        """Columns embedded through a table: categorical, multi-categorical, bucketised dense."""
        return tuple(
            c
            for c in self.columns
            if c.role in SPARSE_ROLES or (c.role == Role.DENSE and c.num_buckets is not None)
        )

    @property
    def dense(self) -> tuple[ColumnSpec, ...]:
        """Dense columns embedded as a learned vector scaled by the standardised value."""
        return tuple(c for c in self.columns if c.role == Role.DENSE and c.num_buckets is None)

    @property
    def labels(self) -> tuple[ColumnSpec, ...]:
        return tuple(c for c in self.columns if c.role == Role.LABEL)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(c.task_name for c in self.labels)

    def column(self, name: str) -> ColumnSpec:
        for c in self.columns:
            if c.name == name:
                return c
        raise SchemaError(
            f"schema '{self.name}': unknown column '{name}'"
            f"{_closest(name, [c.name for c in self.columns])}"
        )

    def label_for_task(self, task: str) -> str:
        for c in self.labels:
            if c.task_name == task:
                return c.name
        raise SchemaError(
            f"schema '{self.name}': no label column trains task '{task}' "
            f"(got tasks {list(self.tasks)})"
        )

    def input_columns(self) -> list[str]:
        """Columns a model reads (sparse then dense), plus the domain column."""
        cols = [c.name for c in self.sparse] + [c.name for c in self.dense]
        if self.domain and self.domain not in cols:
            cols.append(self.domain)
        return cols

    def validate_table(self, schema: pa.Schema, where: str, require_labels: bool = True) -> None:
        """Checks that an Arrow schema has every column this dataset needs, with usable types.

        Raises:
            SchemaError: naming the first missing or mistyped column and the fix.
        """
        needed = self.input_columns() + ([c.name for c in self.labels] if require_labels else [])
        for name in needed:
            if name not in schema.names:
                raise SchemaError(
                    f"{where}: column '{name}' required by dataset schema '{self.name}' is "
                    f"missing (got columns {schema.names}{_closest(name, schema.names)}); "
                    f"add it or change the schema's columns"
                )
            spec = self.column(name)
            arrow_type = schema.field(name).type
            if (
                spec.role == Role.MULTI_CATEGORICAL
                and not pa.types.is_list(arrow_type)
                and not (pa.types.is_large_list(arrow_type))
            ):
                raise SchemaError(
                    f"{where}: column '{name}' has role multi_categorical but type {arrow_type} "
                    f"(expected a list column); write it as a Parquet list"
                )
            if spec.role in (Role.DENSE, Role.LABEL) and not (
                pa.types.is_integer(arrow_type)
                or pa.types.is_floating(arrow_type)
                or pa.types.is_boolean(arrow_type)
            ):
                raise SchemaError(
                    f"{where}: column '{name}' has role {spec.role} but type {arrow_type} "
                    f"(expected a number)"
                )

    # YAML edge.
    @classmethod
    def from_yaml(cls, path: str | Path) -> DatasetSchema:
        """Loads a DatasetSchema from YAML strictly; errors name the key and the closest one."""
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError as e:
            raise SchemaError(f"dataset schema: file {path} does not exist") from e
        except yaml.YAMLError as e:
            raise SchemaError(f"dataset schema {path}: not valid YAML ({e})") from e
        return cls.from_dict(raw, where=str(path))

    @classmethod
    def from_dict(cls, raw: Any, where: str = "dataset schema") -> DatasetSchema:
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise SchemaError(f"{where}: {format_validation_error(e, cls)}") from e

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))


def _closest(name: str, candidates: list[str], prefix: list[Any] | None = None) -> str:
    """The "did you mean" hint naming the closest candidate as a full key (`prefix` joined
    with it by dots, pasteable into `--set`), or "" when none is close."""
    match = difflib.get_close_matches(name, candidates, n=1)
    if not match:
        return ""
    return f"; did you mean '{'.'.join(str(p) for p in [*(prefix or []), match[0]])}'?"


def format_validation_error(error: ValidationError, model: type[BaseModel]) -> str:
    """Turns a pydantic error into one line per problem, naming the key and a close valid key."""
    lines = []
    for item in error.errors():
        path, at = _resolve_loc(model, item["loc"])
        loc = ".".join(str(p) for p in path)
        if item["type"] == "extra_forbidden":
            valid = list(getattr(at, "model_fields", {}).keys())
            lines.append(f"unknown key '{loc}'{_closest(str(path[-1]), valid, path[:-1])}")
        elif item["type"] == "union_tag_invalid":
            # a discriminated union (model.name): the tag and the valid ones, not the section
            ctx = item.get("ctx", {})
            key = ".".join([*(str(p) for p in path), str(ctx.get("discriminator", "")).strip("'")])
            tags = [t.strip().strip("'") for t in str(ctx.get("expected_tags", "")).split(",")]
            tag = str(ctx.get("tag", ""))
            hint = difflib.get_close_matches(tag, tags, n=1)
            lines.append(
                f"{key}: unknown value {tag!r}"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
                + f" (expected one of {', '.join(tags)})"
            )
        elif item["type"] == "value_error":
            # our validators already name the value and the fix; the input is the whole section
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"{loc}: {message}" if loc else message)
        else:
            lines.append(f"{loc or 'value'}: {item['msg']} (got {item.get('input')!r})")
    return "; ".join(lines)


def _resolve_loc(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[Any], Any]:
    """The error path as the user wrote it, and the pydantic model holding its last key.

    A discriminated union (`model: {name: autoint, ...}`) reports the chosen member's tag as a
    path element; it is dropped from the path and used to pick the member."""
    path: list[Any] = []
    current: Any = model  # a model class, or the annotation of the field just entered
    holder: Any = None
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            members = _union_members_by_tag(current) if current is not None else {}
            if isinstance(part, str) and part in members:
                current = members[part]
                continue
            current = _pydantic_model_in(current) if current is not None else None
        path.append(part)
        if isinstance(part, int) or current is None:
            continue
        holder = current
        field = current.model_fields.get(part)
        current = None if field is None else field.annotation
    return path, holder


def _union_members_by_tag(annotation: Any) -> dict[str, Any]:
    """{tag: member} for the members of a union of models that carry a Literal `name`."""
    import typing

    members: dict[str, Any] = {}
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel) and "name" in arg.model_fields:
            for tag in typing.get_args(arg.model_fields["name"].annotation):
                members[str(tag)] = arg
        else:
            members.update(_union_members_by_tag(arg))
    return members


def _pydantic_model_in(annotation: Any) -> Any:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _pydantic_model_in(arg)
        if found is not None:
            return found
    return None
