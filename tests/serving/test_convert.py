"""Request conversion (serving.convert): the same encoded rows as the trainer's path, ranking
side-feature fill, every bad-input class named by feature (and row), and a fuzz test that no
request raises anything but RequestError."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys.features.schema import OOV_ID, VALUE_OUTCOMES, FeatureSchema
from serving._pb.recsys.v1 import scoring_pb2 as pb
from serving.columns import column_from_values, column_to_arrow
from serving.convert import (
    InputSpec,
    RequestConverter,
    SideTable,
    input_specs,
    warmup_table,
)
from serving.errors import RequestError
from tests.serving.conftest import explicit_rows, mixed_side_tables, side_tables

MAX_ROWS = 16


@pytest.fixture(scope="module")
def mixed_converter(mixed_schema: FeatureSchema) -> RequestConverter:
    sides = mixed_side_tables()
    return RequestConverter(mixed_schema, sides["user"], sides["item"], MAX_ROWS)


@pytest.fixture(scope="module")
def converter(tiny_schema: FeatureSchema, tiny_table: pa.Table) -> RequestConverter:
    sides = side_tables(tiny_table)
    return RequestConverter(tiny_schema, sides["user"], sides["item"], MAX_ROWS)


def rows_request(table: pa.Table) -> pb.ScoreRequest:
    return pb.ScoreRequest(
        model="m",
        rows=pb.Rows(columns={n: column_from_values(n, table[n]) for n in table.column_names}),
    )


def _inputs(schema: FeatureSchema, table: pa.Table) -> pa.Table:
    return table.select(schema.dataset.input_columns())


# --- the same encoding as the trainer ---------------------------------------------------------
def test_rows_encode_exactly_like_the_training_path(
    converter: RequestConverter, tiny_schema: FeatureSchema, tiny_table: pa.Table
) -> None:
    raw = _inputs(tiny_schema, tiny_table).slice(0, MAX_ROWS)
    encoded = converter.encode(rows_request(raw))
    assert encoded.equals(tiny_schema.encode(raw, require_labels=False))


def test_mixed_types_and_missing_values_encode_like_the_training_path(
    mixed_converter: RequestConverter, mixed_schema: FeatureSchema
) -> None:
    raw = pa.table(
        {
            "uid": pa.array([1, None, 99], pa.int64()),
            "iid": ["a", None, "zzz"],
            "tags": pa.array([["x", "q"], None, []], pa.list_(pa.string())),
            "codes": pa.array([[9], [], None], pa.list_(pa.int64())),
            "age": [25.0, None, 1e9],
            "price": [float("nan"), None, 2.5],
        }
    )
    encoded = mixed_converter.encode(rows_request(raw))
    assert encoded.equals(mixed_schema.encode(raw, require_labels=False))
    # unseen (99, zzz, q) and missing values go to the OOV id
    assert encoded["uid"].to_pylist()[1:] == [OOV_ID, OOV_ID]
    assert encoded["iid"].to_pylist()[1:] == [OOV_ID, OOV_ID]
    assert encoded["tags"].to_pylist()[0][1] == OOV_ID
    assert encoded["tags"].to_pylist()[1:] == [[OOV_ID], [OOV_ID]]


def test_integers_for_a_string_vocabulary_read_as_their_decimal_text(
    converter: RequestConverter, tiny_schema: FeatureSchema, tiny_table: pa.Table
) -> None:
    raw = _inputs(tiny_schema, tiny_table).slice(0, 4)
    as_ints = raw.set_column(0, "user_id", raw["user_id"].cast(pa.int64()))
    assert converter.encode(rows_request(as_ints)).equals(converter.encode(rows_request(raw)))


# --- ranking ----------------------------------------------------------------------------------
def test_ranking_fills_side_features_likeexplicit_rows(
    converter: RequestConverter, tiny_table: pa.Table
) -> None:
    user = tiny_table["user_id"][0].as_py()
    items = [*tiny_table["item_id"].to_pylist()[:5], "not-an-item"]
    ranking = pb.ScoreRequest(
        model="m",
        ranking=pb.RankingRequest(
            context={"user_id": column_from_values("user_id", [user])},
            candidate_item_ids=column_from_values("item_id", items),
        ),
    )
    explicit = explicit_rows(tiny_table, user, items)
    expected = converter.encode(rows_request(explicit))
    got = converter.encode(ranking)
    assert got.equals(expected)
    # the unknown item's side features are missing, hence OOV
    assert got["release_year"][5].as_py() == OOV_ID and got["genres"][5].as_py() == [OOV_ID]


def test_sent_features_override_side_tables(
    converter: RequestConverter, tiny_table: pa.Table
) -> None:
    user = tiny_table["user_id"][0].as_py()
    items = tiny_table["item_id"].to_pylist()[:3]
    genres = [["Comedy"], ["Drama", "War"], []]
    ranking = pb.ScoreRequest(
        model="m",
        ranking=pb.RankingRequest(
            context={
                "user_id": column_from_values("user_id", [user]),
                "age": column_from_values("age", ["56"]),
            },
            candidate_item_ids=column_from_values("item_id", items),
            candidate_features={"genres": column_from_values("genres", genres)},
        ),
    )
    raw = converter.ranking_table(ranking.ranking)
    assert raw["age"].to_pylist() == ["56"] * 3
    assert raw["genres"].to_pylist() == genres
    explicit = explicit_rows(tiny_table, user, items)
    assert raw["zip3"].to_pylist() == explicit["zip3"].to_pylist()
    assert raw["release_year"].to_pylist() == explicit["release_year"].to_pylist()


def test_ranking_without_user_id_needs_the_user_features(converter: RequestConverter) -> None:
    ranking = pb.RankingRequest(candidate_item_ids=column_from_values("item_id", ["1"]))
    with pytest.raises(RequestError, match="carries the user id in context") as info:
        converter.ranking_table(ranking)
    assert info.value.field == "user_id"


def test_integer_side_ids_are_looked_up_by_value(mixed_converter: RequestConverter) -> None:
    ranking = pb.RankingRequest(
        context={"uid": column_from_values("uid", [2])},
        candidate_item_ids=column_from_values("iid", ["d", "a", "nope"]),
    )
    raw = mixed_converter.ranking_table(ranking)
    assert raw["age"].to_pylist() == [30.0] * 3
    assert raw["price"].to_pylist() == [4.0, 1.0, None]
    assert raw["codes"].to_pylist() == [[], [7], None]


def test_a_very_long_candidate_id_is_unknown_without_a_padded_copy(
    mixed_converter: RequestConverter,
) -> None:
    # One 50,000-character id among 512 candidates used to pad every id to its width in a
    # fixed-width array (512 x 50,000 x 4 bytes = 100 MB) on the event loop.
    num_rows, long_chars = 512, 50_000
    side = SideTable(mixed_side_tables()["item"], "iid")
    ids = pa.array(["a"] * (num_rows - 1) + ["z" * long_chars])
    tracemalloc.start()
    try:
        rows = side.lookup(ids, "candidate_item_ids")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000, f"lookup allocated {peak / 1e6:.0f} MB"
    assert rows["price"].to_pylist() == [1.0] * (num_rows - 1) + [None]


def test_side_ids_match_exactly_even_with_trailing_nuls() -> None:
    # NumPy's fixed-width text drops trailing NULs: "a\x00" must still not find "a"
    side = SideTable(pa.table({"iid": ["a", "b\x00", ""], "price": [1.0, 2.0, 3.0]}), "iid")
    ids = pa.array(["a\x00", "a", "b", "b\x00", "", "\x00", None])
    rows = side.lookup(ids, "candidate_item_ids")
    assert rows["price"].to_pylist() == [None, 1.0, None, 2.0, 3.0, None, None]


def test_an_integer_id_a_narrow_side_table_cannot_hold_is_unknown_not_an_error() -> None:
    # a model trained on int32 user ids gets int64 ids from every client
    side = SideTable(pa.table({"uid": pa.array([5, 7], pa.int32()), "age": [20, 30]}), "uid")
    ids = pa.array([7, 2**40, -(2**40), 5, None], pa.int64())
    assert side.lookup(ids, "user_id")["age"].to_pylist() == [30, None, None, 20, None]
    unsigned = SideTable(pa.table({"uid": pa.array([1, 2], pa.uint8()), "age": [1, 2]}), "uid")
    assert unsigned.lookup(pa.array([-1, 2, 300]), "user_id")["age"].to_pylist() == [None, 2, None]


# --- bad inputs -------------------------------------------------------------------------------
def _valid_columns(tiny_table: pa.Table, converter: RequestConverter) -> dict[str, pb.Column]:
    raw = tiny_table.select(list(converter.specs)).slice(0, 3)
    return {n: column_from_values(n, raw[n]) for n in raw.column_names}


def _bad_bag() -> pb.Column:
    return pb.Column(string_bags=pb.StringBags(values=["Drama"], lengths=[1, 1, 0]))


BAD_ROWS: list[tuple[str, Callable[[dict[str, pb.Column]], None], str, int | None, str]] = [
    (
        "unknown feature",
        lambda c: c.update(genre=column_from_values("genre", [["Drama"]] * 3)),
        "genre",
        None,
        r"is not an input feature of this model .*did you mean 'genres'\?",
    ),
    (
        "wrong kind: doubles for a categorical bag",
        lambda c: c.update(genres=column_from_values("genres", [1.0, 2.0, 3.0])),
        "genres",
        None,
        r"has doubles values \(expected string_bags or int_bags for a multi_categorical",
    ),
    (
        "wrong kind: doubles for a string category",
        lambda c: c.update(age=column_from_values("age", [1.5, 2.5, 3.5])),
        "age",
        None,
        r"has doubles values \(expected strings or ints for a categorical feature",
    ),
    (
        "missing required feature",
        lambda c: c.pop("zip3"),
        "zip3",
        None,
        r"is missing \(expected every input feature",
    ),
    (
        "inconsistent column lengths",
        lambda c: c.update(gender=column_from_values("gender", ["M", "F"])),
        "gender",
        None,
        r"has 2 rows \(expected 3, the length of 'user_id'\)",
    ),
    (
        "bag lengths do not add up",
        lambda c: c.update(genres=_bad_bag()),
        "genres",
        None,
        r"has string_bags lengths adding up to 2 \(expected 1",
    ),
    (
        "missing flags of the wrong length",
        lambda c: c["age"].missing.extend([True, False]),
        "age",
        None,
        r"has 2 `missing` flags \(expected 3, one per row\)",
    ),
    (
        "no value kind",
        lambda c: c.update(age=pb.Column()),
        "age",
        None,
        r"has no values",
    ),
    (
        "empty request",
        lambda c: c.clear(),
        "rows",
        None,
        r"field 'rows' has no columns",
    ),
    (
        "zero rows",
        lambda c: c.update({n: column_from_values(n, pa.array([], c_type(n))) for n in list(c)}),
        "rows",
        None,
        r"holds no rows \(expected at least 1\)",
    ),
]


def c_type(name: str) -> pa.DataType:
    return pa.list_(pa.string()) if name == "genres" else pa.string()


@pytest.mark.parametrize(
    ("mutate", "field", "row", "pattern"),
    [case[1:] for case in BAD_ROWS],
    ids=[case[0] for case in BAD_ROWS],
)
def test_each_bad_input_class_names_the_feature(
    converter: RequestConverter,
    tiny_table: pa.Table,
    mutate: Callable[[dict[str, pb.Column]], None],
    field: str,
    row: int | None,
    pattern: str,
) -> None:
    columns = _valid_columns(tiny_table, converter)
    mutate(columns)
    request = pb.ScoreRequest(model="m", rows=pb.Rows(columns=columns))
    with pytest.raises(RequestError, match=pattern) as info:
        converter.encode(request)
    assert (info.value.field, info.value.row) == (field, row)
    assert f"'{field}'" in str(info.value)


def test_too_many_rows_names_the_limit(
    converter: RequestConverter, tiny_schema: FeatureSchema, tiny_table: pa.Table
) -> None:
    raw = _inputs(tiny_schema, tiny_table).slice(0, MAX_ROWS + 1)
    with pytest.raises(RequestError, match=rf"holds {MAX_ROWS + 1} rows \(expected at most"):
        converter.encode(rows_request(raw))
    items = pb.RankingRequest(
        context={"user_id": column_from_values("user_id", ["1"])},
        candidate_item_ids=column_from_values("item_id", ["1"] * (MAX_ROWS + 1)),
    )
    with pytest.raises(RequestError, match="holds 17 candidates") as info:
        converter.ranking_table(items)
    assert info.value.field == "candidate_item_ids"


def test_a_non_finite_dense_value_is_named_with_its_row(
    mixed_converter: RequestConverter,
) -> None:
    raw = pa.table(
        {
            "uid": [1, 2, 3],
            "iid": ["a", "b", "c"],
            "tags": pa.array([["x"]] * 3, pa.list_(pa.string())),
            "codes": pa.array([[7]] * 3, pa.list_(pa.int64())),
            "age": [1.0, 2.0, 3.0],
            "price": [1.0, 2.0, float("inf")],
        }
    )
    with pytest.raises(RequestError, match=r"feature 'price' row 2 holds inf") as info:
        mixed_converter.encode(rows_request(raw))
    assert (info.value.field, info.value.row) == ("price", 2)
    huge = raw.set_column(5, "price", pa.array([1.0, 1e300, 2.0]))
    with pytest.raises(RequestError, match=r"feature 'price' row 1 holds 1e\+300, which overflows"):
        mixed_converter.encode(rows_request(huge))
    # the same value marked missing is fine (and scores as a missing dense value)
    column = column_from_values("price", raw["price"])
    column.missing.extend([False, False, True])
    request = rows_request(raw)
    request.rows.columns["price"].CopyFrom(column)
    assert mixed_converter.encode(request).num_rows == 3


def test_strings_for_an_integer_vocabulary_are_refused(
    mixed_converter: RequestConverter,
) -> None:
    ranking = pb.RankingRequest(
        context={"uid": column_from_values("uid", ["2"])},
        candidate_item_ids=column_from_values("iid", ["a"]),
    )
    with pytest.raises(RequestError, match=r"feature 'uid' has strings values \(expected ints"):
        mixed_converter.ranking_table(ranking)


@pytest.mark.parametrize(
    ("ranking", "field", "pattern"),
    [
        (
            pb.RankingRequest(
                context={"user_id": column_from_values("user_id", ["1", "2"])},
                candidate_item_ids=column_from_values("item_id", ["1"]),
            ),
            "user_id",
            r"has 2 rows in context \(expected 1",
        ),
        (
            pb.RankingRequest(
                context={
                    "user_id": column_from_values("user_id", ["1"]),
                    "item_id": column_from_values("item_id", ["1"]),
                },
                candidate_item_ids=column_from_values("item_id", ["1"]),
            ),
            "item_id",
            r"is sent in context \(expected it in candidate_item_ids\)",
        ),
        (
            pb.RankingRequest(
                context={"user_id": column_from_values("user_id", ["1"])},
                candidate_item_ids=column_from_values("item_id", ["1", "2"]),
                candidate_features={"genres": column_from_values("genres", [["Drama"]])},
            ),
            "genres",
            r"has 1 rows in candidate_features \(expected 2",
        ),
        (
            pb.RankingRequest(context={"user_id": column_from_values("user_id", ["1"])}),
            "candidate_item_ids",
            r"field 'candidate_item_ids' is not set",
        ),
    ],
    ids=["context of 2 rows", "item id in context", "candidate rows", "no candidates"],
)
def test_bad_ranking_requests_name_the_feature(
    converter: RequestConverter, ranking: pb.RankingRequest, field: str, pattern: str
) -> None:
    with pytest.raises(RequestError, match=pattern) as info:
        converter.ranking_table(ranking)
    assert info.value.field == field


def test_request_without_input_is_refused(converter: RequestConverter) -> None:
    with pytest.raises(RequestError, match=r"field 'input' is not set"):
        converter.encode(pb.ScoreRequest(model="m"))


# --- helpers used by the model manager --------------------------------------------------------
@pytest.mark.parametrize("schema_name", ["tiny", "mixed"])
def test_warmup_rows_encode_without_oov(
    schema_name: str, tiny_schema: FeatureSchema, mixed_schema: FeatureSchema
) -> None:
    schema = tiny_schema if schema_name == "tiny" else mixed_schema
    encoded = schema.encode(warmup_table(schema, 5), require_labels=False)
    assert encoded.num_rows == 5
    for spec in input_specs(schema).values():
        if spec.kind in ("categorical", "multi_categorical"):
            ids = pa.array(encoded[spec.name].to_pylist()).to_pylist()
            flat = [i for bag in ids for i in bag] if spec.kind != "categorical" else ids
            assert OOV_ID not in flat, spec.name


def test_value_outcomes_count_known_unseen_and_missing_values(
    mixed_converter: RequestConverter, mixed_schema: FeatureSchema
) -> None:
    # vocabularies fitted on mixed_table: uid 1-3, iid a-d, tags x/y/z, codes 7/8/9
    raw = pa.table(
        {
            "uid": pa.array([1, 99, None, 2], pa.int64()),
            "iid": ["a", "zz", "b", None],
            "tags": pa.array([["x", "new"], [], None, ["y", None]], pa.list_(pa.string())),
            "codes": pa.array([[7], [8, 100], [9], []], pa.list_(pa.int64())),
            "age": [20.0, None, 40.0, 20.0],
            "price": [1.0, 2.0, None, 4.0],
        }
    )
    assert VALUE_OUTCOMES == ("known", "out_of_vocabulary", "missing")
    from_encoded = mixed_schema.value_outcomes(raw, mixed_converter.encode_table(raw))
    from_raw = mixed_schema.value_outcomes(raw)  # the lookups done here (batch evaluation)
    for counts in (from_encoded, from_raw):
        # dense and bucketised features have no vocabulary, so they are not counted
        assert {name: c.tolist() for name, c in counts.items()} == {
            "uid": [2, 1, 1],
            "iid": [2, 1, 1],
            "tags": [2, 1, 3],  # the empty bag, the null bag and the null element are missing
            "codes": [3, 1, 1],
        }


def test_value_outcomes_of_a_ranking_request_count_unknown_candidates_and_their_features(
    converter: RequestConverter, tiny_schema: FeatureSchema, tiny_table: pa.Table
) -> None:
    user = tiny_table["user_id"][0].as_py()
    item = tiny_table["item_id"][0].as_py()
    request = pb.ScoreRequest(
        model="m",
        ranking=pb.RankingRequest(
            context={"user_id": column_from_values("user_id", [user])},
            candidate_item_ids=column_from_values("item_id", [item, "no-such-item"]),
        ),
    )
    raw = converter.raw_table(request)
    counts = tiny_schema.value_outcomes(raw, converter.encode_table(raw))
    assert counts["user_id"].tolist() == [2, 0, 0]
    assert counts["item_id"].tolist() == [1, 1, 0]
    # the unknown item has no side row, so its item features are missing, not out of vocabulary
    assert counts["release_year"].tolist() == [1, 0, 1]
    assert counts["genres"][1:].tolist() == [0, 1]


@pytest.mark.parametrize(
    ("values", "row"),
    [([[7], [8, None]], 1), ([["Comedy", None], ["Drama"]], 0), ([None, [None]], 1)],
)
def test_a_none_inside_a_bag_is_refused_naming_the_feature_and_row(
    values: list[Any], row: int
) -> None:
    # the proto has no missing flag per bag value: None used to travel as 0 (or fail on "")
    with pytest.raises(ValueError, match=rf"feature 'tags' row {row} has a bag holding a missing"):
        column_from_values("tags", values)


def test_column_round_trip_keeps_values_and_missing_rows() -> None:
    cases: list[tuple[str, list[Any], str]] = [
        ("s", ["a", None, "c"], "strings"),
        ("i", [1, None, -(2**63)], "ints"),
        ("d", [0.5, None, float("inf")], "doubles"),
        ("b", [["a", "b"], None, []], "string_bags"),
        ("ib", [[1], [], None], "int_bags"),
        ("n", [None, None], ""),
    ]
    for name, values, kind in cases:
        column = column_from_values(name, values)
        arrow = column_to_arrow(name, column)
        assert (arrow.kind or "") == kind
        assert arrow.array.to_pylist() == values


# --- fuzzing ----------------------------------------------------------------------------------
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=6)
_int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_double = st.floats(allow_nan=True, allow_infinity=True)


@st.composite
def _columns(draw: st.DrawFn, num_rows: int | None = None) -> pb.Column:
    """Arbitrary Column messages: any kind, any length, consistent or not."""
    n = draw(st.integers(0, 5)) if num_rows is None else num_rows
    kind = draw(st.sampled_from(["strings", "ints", "doubles", "string_bags", "int_bags", ""]))
    column = pb.Column()
    if kind == "strings":
        column.strings.values.extend(draw(st.lists(_text, min_size=n, max_size=n)))
    elif kind == "ints":
        column.ints.values.extend(draw(st.lists(_int64, min_size=n, max_size=n)))
    elif kind == "doubles":
        column.doubles.values.extend(draw(st.lists(_double, min_size=n, max_size=n)))
    elif kind:
        lengths = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
        if draw(st.booleans()):
            lengths = draw(st.lists(st.integers(0, 2**32 - 1), max_size=4))  # inconsistent
        total = sum(lengths) if sum(lengths) < 50 else draw(st.integers(0, 5))
        values = draw(
            st.lists(_text if kind == "string_bags" else _int64, min_size=total, max_size=total)
        )
        bags = column.string_bags if kind == "string_bags" else column.int_bags
        bags.values.extend(values)
        bags.lengths.extend(lengths)
    if draw(st.booleans()):
        column.missing.extend(draw(st.lists(st.booleans(), max_size=6)))
    return column


@st.composite
def _accepted_columns(draw: st.DrawFn, spec: InputSpec, vocab: list[Any], n: int) -> pb.Column:
    """A column the feature accepts: an accepted kind, n rows, known or unseen values."""
    kind = draw(st.sampled_from(spec.accepted))
    scalar = {
        "strings": st.one_of(st.sampled_from(vocab or [""]), _text),
        "ints": st.one_of(st.sampled_from([v for v in vocab if isinstance(v, int)] or [0]), _int64),
        "doubles": st.floats(-1e6, 1e6) if spec.kind == "dense" else _double,
    }
    column = pb.Column()
    if kind in scalar:
        getattr(column, kind).values.extend(draw(st.lists(scalar[kind], min_size=n, max_size=n)))
    else:
        lengths = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
        element = scalar["strings" if kind == "string_bags" else "ints"]
        bags = getattr(column, kind)
        bags.values.extend(draw(st.lists(element, min_size=sum(lengths), max_size=sum(lengths))))
        bags.lengths.extend(lengths)
    if draw(st.booleans()):
        column.missing.extend(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    return column


def _vocab(converter: RequestConverter, name: str) -> list[Any]:
    vocab = converter.schema.vocabs.get(name)
    return vocab.values.to_pylist()[:20] if vocab is not None else []


@st.composite
def _rows_requests(draw: st.DrawFn, converter: RequestConverter) -> pb.ScoreRequest:
    """Valid requests, requests with one arbitrary column, and arbitrary requests."""
    mode = draw(st.sampled_from(["valid", "one arbitrary column", "arbitrary"]))
    n = draw(st.integers(1 if mode == "valid" else 0, 4))
    names = list(converter.specs)
    columns = {}
    for name, spec in converter.specs.items():
        if mode == "arbitrary":
            if draw(st.integers(0, 9)):
                columns[name] = draw(_columns(num_rows=n if draw(st.booleans()) else None))
        else:
            columns[name] = draw(_accepted_columns(spec, _vocab(converter, name), n))
    if mode == "one arbitrary column":
        columns[draw(st.one_of(_text, st.sampled_from(names)))] = draw(_columns())
    return pb.ScoreRequest(model="m", rows=pb.Rows(columns=columns))


@st.composite
def _ranking_requests(draw: st.DrawFn, converter: RequestConverter) -> pb.ScoreRequest:
    """Ranking requests: mostly well-formed ids and context, plus arbitrary extras."""
    specs = converter.specs
    user, item = converter.user_id or "", converter.item_id or ""
    n = draw(st.integers(0, 4))
    ranking = pb.RankingRequest()
    if user in specs:
        ranking.context[user].CopyFrom(
            draw(_accepted_columns(specs[user], _vocab(converter, user), 1))
            if draw(st.integers(0, 4))
            else draw(_columns())
        )
    if draw(st.integers(0, 5)):
        ranking.candidate_item_ids.CopyFrom(
            draw(_accepted_columns(specs[item], _vocab(converter, item), n))
            if draw(st.integers(0, 3))
            else draw(_columns())
        )
    for name in draw(st.lists(st.sampled_from(list(specs)), max_size=2)):
        if draw(st.booleans()):
            ranking.context[name].CopyFrom(draw(_columns(num_rows=1)))
        else:
            ranking.candidate_features[name].CopyFrom(
                draw(_accepted_columns(specs[name], _vocab(converter, name), n))
                if draw(st.booleans())
                else draw(_columns())
            )
    return pb.ScoreRequest(model="m", ranking=ranking)


def _converts_or_refuses(converter: RequestConverter, request: pb.ScoreRequest) -> None:
    try:
        features = converter.features(request)
    except RequestError as e:
        assert str(e).startswith("request: ")
        return
    assert features.batch_size >= 1
    assert np.isfinite(features.dense.numpy()).all()


FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(data=st.data())
def test_fuzzed_rows_only_ever_raise_request_error(
    data: st.DataObject, converter: RequestConverter, mixed_converter: RequestConverter
) -> None:
    for conv in (converter, mixed_converter):
        _converts_or_refuses(conv, data.draw(_rows_requests(conv)))


@FUZZ
@given(data=st.data())
def test_fuzzed_ranking_requests_only_ever_raise_request_error(
    data: st.DataObject, converter: RequestConverter, mixed_converter: RequestConverter
) -> None:
    for conv in (converter, mixed_converter):
        _converts_or_refuses(conv, data.draw(_ranking_requests(conv)))
