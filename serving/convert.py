"""Score requests -> raw Arrow rows -> encoded rows -> Features, through the trainer's own code.

A request (generic `Rows`, or a `RankingRequest` of one context and N candidate items) is
checked against the model's FeatureSchema and assembled into a table of raw rows, one column
per input feature; `FeatureSchema.encode` and `features_from_encoded` (the same functions the
trainer runs on Parquet rows) then turn it into ids and tensors, so unseen categorical values go
to the OOV id exactly as in training. For ranking, features the client does not send are filled
from the artifact's side tables: user features by the context's user id, item features by the
candidate item ids (vectorised lookups; unknown ids give missing values, hence OOV ids).

Every problem with the request raises `RequestError` naming the feature (and row), which the
interceptor answers with INVALID_ARGUMENT.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.data.schema import Role
from recsys.errors import SchemaError
from recsys.features.batch import Features, features_from_encoded
from recsys.features.schema import FeatureSchema
from serving._pb.recsys.v1 import scoring_pb2 as pb
from serving.columns import ArrowColumn, column_to_arrow
from serving.errors import RequestError, shorten

CATEGORICAL, MULTI_CATEGORICAL, BUCKETIZED, DENSE = (
    "categorical",
    "multi_categorical",
    "bucketized",
    "dense",
)
_BAG_KIND = {"strings": "string_bags", "ints": "int_bags"}
# a standardised dense value this many std from the mean is named when a row scores NaN
_EXTREME_STD = 100.0


@dataclass(frozen=True)
class InputSpec:
    """What the server accepts for one input column of a model.

    Attributes:
        name: the column (feature) name.
        kind: categorical | multi_categorical | bucketized | dense.
        value_type: the Arrow type the column had in training (vocabulary type, or float64).
        accepted: the Column value kinds accepted for it.
    """

    name: str
    kind: str
    value_type: pa.DataType
    accepted: tuple[str, ...]

    def typed_nulls(self, num_rows: int) -> pa.Array:
        """A column of `num_rows` missing values of the type training saw."""
        if self.kind == MULTI_CATEGORICAL:
            return pa.nulls(num_rows, pa.list_(self.value_type))
        return pa.nulls(num_rows, self.value_type)


def input_specs(schema: FeatureSchema) -> dict[str, InputSpec]:
    """The accepted request columns of a model, in the schema's input order."""
    specs = {}
    for name in schema.dataset.input_columns():
        column = schema.dataset.column(name)
        if column.role == Role.DENSE:
            kind = DENSE if column.num_buckets is None else BUCKETIZED
            specs[name] = InputSpec(name, kind, pa.float64(), ("doubles", "ints"))
            continue
        value_type = schema.vocabs[name].values.type
        bag = column.role == Role.MULTI_CATEGORICAL
        if pa.types.is_integer(value_type):
            accepted: tuple[str, ...] = ("ints",)
        elif pa.types.is_string(value_type) or pa.types.is_large_string(value_type):
            # integers are read as their decimal strings, as `FeatureSchema.encode` casts them
            accepted = ("strings", "ints")
        elif pa.types.is_floating(value_type):
            accepted = ("doubles", "ints")
        else:
            accepted = ("strings", "ints", "doubles")
        if bag:  # bags carry strings or integers only
            accepted = tuple(_BAG_KIND[k] for k in accepted if k in _BAG_KIND)
        kind = MULTI_CATEGORICAL if bag else CATEGORICAL
        specs[name] = InputSpec(name, kind, value_type, accepted)
    return specs


class SideTable:
    """Entity features keyed by id (an artifact's `side/<entity>.parquet`), looked up in bulk.

    The ids are sorted once at load, so a lookup is a vectorised binary search: no hash table is
    rebuilt per request, whatever the table's size.
    """

    def __init__(self, table: pa.Table, id_column: str) -> None:
        table = table.combine_chunks()
        ids = table[id_column].combine_chunks()
        valid = ids.is_valid().to_numpy(zero_copy_only=False)
        keys = _lookup_keys(ids)
        rows = np.flatnonzero(valid)
        order = np.argsort(keys[rows], kind="stable")
        self.table = table
        self.id_column = id_column
        self.id_type = ids.type
        self._keys = keys[rows][order]
        self._rows = rows[order].astype(np.int64)
        # the longest string id, in characters: a longer request id matches nothing
        self._max_chars = (
            int(pc.max(pc.utf8_length(ids)).as_py() or 0) if _is_string(ids.type) else None
        )

    def lookup(self, ids: pa.Array, where: str) -> pa.Table:
        """The side rows of `ids` in order; unknown or missing ids give rows of nulls.

        Raises:
            RequestError: the ids cannot be read as the side table's id type.
        """
        if (
            pa.types.is_integer(ids.type)
            and pa.types.is_integer(self.id_type)
            and ids.type != self.id_type
        ):
            # An id the table's (narrower) integer type cannot hold is in no row: unknown,
            # like any unseen id, rather than a cast error refusing the whole request.
            bounds = np.iinfo(self.id_type.to_pandas_dtype())
            values = ids.fill_null(0).to_numpy(zero_copy_only=False)
            fits = (values >= bounds.min) & (values <= bounds.max)
            ids = pc.if_else(pa.array(fits), ids, pa.scalar(None, ids.type))
        try:
            ids = ids if ids.type == self.id_type else ids.cast(self.id_type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise RequestError(
                where,
                None,
                f"has ids that cannot be read as {self.id_type} (got {ids.type}: {e}); send "
                "the ids with the type the model was trained on",
            ) from e
        if self._max_chars is not None:
            # Fixed-width text pads every id to the longest one: a single 60,000-character id
            # among 4,096 candidates would allocate ~1 GB. An id longer than every key cannot
            # match, so it becomes a missing id before the keys are built.
            fits = pc.less_equal(pc.utf8_length(ids), self._max_chars)
            ids = pc.if_else(fits, ids, pa.scalar(None, ids.type))
        query = _lookup_keys(ids)
        if len(self._keys) == 0:
            found = np.zeros(len(ids), dtype=bool)
            pos = np.zeros(len(ids), dtype=np.int64)
        else:
            pos = np.clip(np.searchsorted(self._keys, query), 0, len(self._keys) - 1)
            found = (self._keys[pos] == query) & ids.is_valid().to_numpy(zero_copy_only=False)
        indices = pa.array(self._rows[pos] if len(self._rows) else pos, mask=~found)
        return self.table.take(indices)


# Ends every string key: NumPy's fixed-width text drops trailing NULs, so without it "a\x00"
# would equal "a"; with it no key ends in NUL and equal keys are equal strings.
_KEY_END = "\x01"


def _is_string(value_type: pa.DataType) -> bool:
    return pa.types.is_string(value_type) or pa.types.is_large_string(value_type)


def _lookup_keys(ids: pa.Array) -> np.ndarray:
    """Ids as a NumPy array that sorts and compares by value (strings as fixed-width text, as
    wide as the longest id, so callers drop ids that cannot match first)."""
    if _is_string(ids.type):
        return np.asarray([key + _KEY_END for key in ids.fill_null("").to_pylist()], dtype=str)
    filled = ids.fill_null(0) if ids.null_count else ids
    return np.asarray(filled.to_numpy(zero_copy_only=False))


class RequestConverter:
    """Turns Score requests for one model version into encoded rows and Features.

    Args:
        schema: the artifact's FeatureSchema.
        user_side: the artifact's user side table, if any.
        item_side: the artifact's item side table, if any.
        max_rows: rows (or candidates) allowed per request.
    """

    def __init__(
        self,
        schema: FeatureSchema,
        user_side: pa.Table | None,
        item_side: pa.Table | None,
        max_rows: int,
    ) -> None:
        self.schema = schema
        self.specs = input_specs(schema)
        self.max_rows = max_rows
        dataset = schema.dataset
        self.user_id = dataset.user.id_column if dataset.user else None
        self.item_id = dataset.item.id_column if dataset.item else None
        self.user_side = (
            SideTable(user_side, self.user_id) if user_side is not None and self.user_id else None
        )
        self.item_side = (
            SideTable(item_side, self.item_id) if item_side is not None and self.item_id else None
        )

    # --- public entry points -----------------------------------------------------------------
    def raw_table(self, request: pb.ScoreRequest) -> pa.Table:
        """The raw rows of a request, one column per input feature (before encoding)."""
        which = request.WhichOneof("input")
        if which == "rows":
            return self.rows_table(request.rows)
        if which == "ranking":
            return self.ranking_table(request.ranking)
        raise RequestError(
            "input", None, "is not set (expected `rows` or `ranking` in the ScoreRequest)"
        )

    def encode(self, request: pb.ScoreRequest) -> pa.Table:
        """A request's encoded rows (ids, standardised floats), via `FeatureSchema.encode`."""
        return self.encode_table(self.raw_table(request))

    def encode_table(self, table: pa.Table) -> pa.Table:
        """Encodes raw rows exactly as the trainer does; schema problems become RequestError.

        Raises:
            RequestError: the schema refuses the rows, or a dense value is so large that it
                overflows float32 once standardised (the model would score NaN).
        """
        try:
            with np.errstate(over="ignore"):  # an overflow is refused just below, by row
                encoded = self.schema.encode(table, require_labels=False, where="rows")
        except SchemaError as e:
            raise RequestError(None, None, str(e)) from e
        for dense in self.schema.dense:
            finite = np.isfinite(encoded[dense.name].to_numpy(zero_copy_only=False))
            if not finite.all():
                row = int(np.argmin(finite))
                raise RequestError(
                    dense.name,
                    row,
                    f"holds {table[dense.name][row].as_py()!r}, which overflows float32 once "
                    f"standardised (expected a value near the training range, mean "
                    f"{dense.mean:g}, std {dense.std:g})",
                )
        return encoded

    def check_scores(
        self, raw: pa.Table, encoded: pa.Table, scores: Mapping[str, np.ndarray]
    ) -> None:
        """Refuses a request whose scores are not all finite probabilities.

        A dense value far outside the training range (a price of 1e30) standardises to a finite
        float32 but overflows inside the model, which then scores NaN. Only the scored request
        can tell, so this runs on each request's own slice of a batch: the other requests of
        the batch keep their scores.

        Raises:
            RequestError: a row scored NaN or inf; names the row and, when there are any, its
                dense values far outside the training range (the most extreme is the field).
        """
        bad = np.zeros(raw.num_rows, dtype=bool)
        for probabilities in scores.values():
            bad |= ~np.isfinite(probabilities)
        if not bad.any():
            return
        row = int(np.argmax(bad))
        got = ", ".join(f"{task}={p[row]}" for task, p in scores.items() if not np.isfinite(p[row]))
        more = f"; {int(bad.sum()) - 1} other row(s) too" if bad.sum() > 1 else ""
        extreme = []
        for dense in self.schema.dense:
            deviation = encoded[dense.name][row].as_py()
            if deviation is not None and abs(deviation) > _EXTREME_STD:
                extreme.append((abs(deviation), dense))
        if not extreme:
            raise RequestError(
                None,
                row,
                f"row {row} scored {got} (expected probabilities in [0, 1]{more}); the model "
                "cannot score it",
            )
        extreme.sort(key=lambda pair: -pair[0])
        values = ", ".join(
            f"{dense.name}={raw[dense.name][row].as_py()!r} ({deviation:.3g} std from the "
            f"training mean {dense.mean:g})"
            for deviation, dense in extreme
        )
        raise RequestError(
            extreme[0][1].name,
            row,
            f"makes the model score {got} (expected probabilities in [0, 1]{more}): dense values "
            f"far outside the training range ({values}); send values near the training range, "
            "or mark them missing",
        )

    def features(self, request: pb.ScoreRequest) -> Features:
        """A request's Features (the model input)."""
        try:
            return features_from_encoded(self.schema, self.encode(request))
        except SchemaError as e:
            raise RequestError(None, None, str(e)) from e

    # --- generic rows ------------------------------------------------------------------------
    def rows_table(self, rows: pb.Rows) -> pa.Table:
        """Generic rows -> raw table. Every input feature must be sent, with N rows each."""
        if not rows.columns:
            raise RequestError(
                "rows",
                None,
                f"has no columns (expected the model's input features {list(self.specs)})",
            )
        for name in sorted(rows.columns):
            self._check_known(name, self.specs, "rows")
        columns = {
            name: self._column(name, rows.columns[name])
            for name in self.specs
            if name in rows.columns
        }
        self._common_length(columns, "rows")
        for name in self.specs:
            if name not in columns:
                raise RequestError(
                    name,
                    None,
                    f"is missing (expected every input feature of the model: {list(self.specs)})",
                )
        return pa.table({name: columns[name] for name in self.specs})

    # --- ranking -----------------------------------------------------------------------------
    def ranking_table(self, ranking: pb.RankingRequest) -> pa.Table:
        """One context + N candidate item ids -> N raw rows, side features filled by id."""
        if self.item_id is None:
            raise RequestError(
                "candidate_item_ids",
                None,
                "cannot be used: this model has no item entity (expected a dataset schema with "
                "`item`); send generic rows instead",
            )
        if not ranking.HasField("candidate_item_ids"):
            raise RequestError(
                "candidate_item_ids", None, "is not set (expected the N candidate item ids)"
            )
        item_spec = self.specs.get(self.item_id)
        candidates = column_to_arrow(self.item_id, ranking.candidate_item_ids)
        if item_spec is not None:
            self._check_kind(item_spec, candidates)
        num_rows = len(candidates)
        self._check_num_rows(num_rows, "candidate_item_ids", "candidates")

        context: dict[str, pa.Array] = {}
        user_ids: pa.Array | None = None
        for name in sorted(ranking.context):
            if name == self.user_id and name not in self.specs:
                # the user id only keys the side table when it is not itself a model input
                array = column_to_arrow(name, ranking.context[name]).array
            else:
                self._check_known(name, self.specs, "context")
                array = context[name] = self._column(name, ranking.context[name])
            if len(array) != 1:
                raise RequestError(
                    name,
                    None,
                    f"has {len(array)} rows in context (expected 1; per-candidate values go in "
                    "candidate_features)",
                )
            if name == self.user_id:
                user_ids = array
        sent: dict[str, pa.Array] = {}
        for name in sorted(ranking.candidate_features):
            self._check_known(name, self.specs, "candidate_features")
            if name in context or name == self.item_id:
                other = "context" if name in context else "candidate_item_ids"
                raise RequestError(
                    name, None, f"is sent both in candidate_features and in {other} (expected one)"
                )
            sent[name] = self._column(name, ranking.candidate_features[name])
            if len(sent[name]) != num_rows:
                raise RequestError(
                    name,
                    None,
                    f"has {len(sent[name])} rows in candidate_features (expected {num_rows}, "
                    "one per candidate item id)",
                )
        if self.item_id in context:
            raise RequestError(
                self.item_id, None, "is sent in context (expected it in candidate_item_ids)"
            )

        item_rows = self._side_rows(self.item_side, candidates.array, self.item_id)
        user_rows = (
            self._side_rows(self.user_side, user_ids, self.user_id or "")
            if user_ids is not None
            else None
        )
        broadcast = pa.array(np.zeros(num_rows, dtype=np.int64))
        columns: dict[str, pa.Array] = {}
        for name, spec in self.specs.items():
            if name in sent:
                columns[name] = sent[name]
            elif name in context:
                columns[name] = context[name].take(broadcast)
            elif name == self.item_id:
                columns[name] = self._typed(spec, candidates)
            elif item_rows is not None and name in item_rows.column_names:
                columns[name] = item_rows[name].combine_chunks()
            elif user_rows is not None and name in user_rows.column_names:
                columns[name] = user_rows[name].combine_chunks().take(broadcast)
            else:
                raise RequestError(
                    name,
                    None,
                    "is missing (not sent in context or candidate_features, and not in a side "
                    f"table{self._side_hint(name)})",
                )
        return pa.table(columns)

    # --- helpers -----------------------------------------------------------------------------
    def _side_hint(self, name: str) -> str:
        dataset = self.schema.dataset
        if name == self.user_id:
            return "; a ranking request carries the user id in context"
        if dataset.user and name in dataset.user.feature_columns:
            if self.user_side is None:
                return "; the artifact has no user side table"
            return f"; send the user id '{self.user_id}' in context to fill user features"
        if dataset.item and name in dataset.item.feature_columns and self.item_side is None:
            return "; the artifact has no item side table"
        return ""

    def _side_rows(self, side: SideTable | None, ids: pa.Array, field: str) -> pa.Table | None:
        if side is None:
            return None
        table = side.lookup(ids, field)
        return table.drop_columns([side.id_column])

    def _check_known(self, name: str, known: Mapping[str, object], where: str) -> None:
        if name not in known:
            # a name far longer than every known one resembles none of them
            longest = max(map(len, known), default=0)
            match = (
                difflib.get_close_matches(name, list(known), n=1)
                if len(name) <= 2 * longest
                else []
            )
            hint = f"; did you mean '{match[0]}'?" if match else ""
            raise RequestError(
                shorten(name),
                None,
                f"is not an input feature of this model (sent in {where}; expected one of "
                f"{list(known)}){hint}",
            )

    def _check_num_rows(self, num_rows: int, field: str, what: str) -> None:
        if num_rows == 0:
            raise RequestError(field, None, f"holds no {what} (expected at least 1)")
        if num_rows > self.max_rows:
            raise RequestError(
                field,
                None,
                f"holds {num_rows} {what} (expected at most {self.max_rows} per request); "
                "split the request",
            )

    def _common_length(self, columns: dict[str, pa.Array], field: str) -> int:
        lengths = {name: len(array) for name, array in columns.items()}
        if not lengths:
            return 0
        reference = next(iter(lengths))
        for name, length in lengths.items():
            if length != lengths[reference]:
                raise RequestError(
                    name,
                    None,
                    f"has {length} rows (expected {lengths[reference]}, the length of "
                    f"'{reference}'); every column needs one value per row",
                )
        self._check_num_rows(lengths[reference], field, "rows")
        return lengths[reference]

    def _column(self, name: str, column: pb.Column) -> pa.Array:
        spec = self.specs[name]
        arrow = column_to_arrow(name, column)
        self._check_kind(spec, arrow)
        if spec.kind in (DENSE, BUCKETIZED) and arrow.kind is not None:
            # integers beyond 2**53 round to the nearest double instead of failing the cast
            values = arrow.array.cast(pa.float64(), safe=False)
            arrow = ArrowColumn(arrow.kind, values)
        if spec.kind == DENSE and arrow.kind is not None:
            values = arrow.array
            infinite = pc.fill_null(pc.is_inf(values), False).to_numpy(zero_copy_only=False)
            if infinite.any():
                row = int(np.argmax(infinite))
                raise RequestError(
                    name,
                    row,
                    f"holds {values[row].as_py()}, which is not finite (expected a finite "
                    "number; mark missing values in `missing`)",
                )
        return self._typed(spec, arrow)

    @staticmethod
    def _check_kind(spec: InputSpec, arrow: ArrowColumn) -> None:
        if arrow.kind is not None and arrow.kind not in spec.accepted:
            raise RequestError(
                spec.name,
                None,
                f"has {arrow.kind} values (expected {' or '.join(spec.accepted)} for a "
                f"{spec.kind} feature with {spec.value_type} values)",
            )

    @staticmethod
    def _typed(spec: InputSpec, arrow: ArrowColumn) -> pa.Array:
        if arrow.kind is None:
            return spec.typed_nulls(len(arrow))
        return arrow.array


def warmup_table(schema: FeatureSchema, num_rows: int) -> pa.Table:
    """Raw rows of known values (the vocabularies' first values, zeros for dense features), for
    the forward pass a model version runs before it serves."""
    columns = {}
    for name, spec in input_specs(schema).items():
        if spec.kind in (DENSE, BUCKETIZED):
            columns[name] = pa.array(np.zeros(num_rows), pa.float64())
            continue
        vocab = schema.vocabs[name].values
        if len(vocab) == 0:
            columns[name] = spec.typed_nulls(num_rows)
            continue
        values = vocab.take(pa.array(np.arange(num_rows) % len(vocab)))
        if spec.kind == MULTI_CATEGORICAL:
            offsets = pa.array(np.arange(num_rows + 1, dtype=np.int32))
            values = pa.ListArray.from_arrays(offsets, values)
        columns[name] = values
    return pa.table(columns)


def feature_infos(schema: FeatureSchema) -> list[pb.FeatureInfo]:
    """The model's input features as ModelInfo reports them."""
    sizes = {f.name: f.num_embeddings for f in schema.sparse}
    return [
        pb.FeatureInfo(
            name=name,
            kind=spec.kind,
            value_type=str(spec.value_type),
            num_embeddings=sizes.get(name, 0),
        )
        for name, spec in input_specs(schema).items()
    ]
