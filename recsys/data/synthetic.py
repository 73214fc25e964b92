"""synthetic-ctr: Criteo-shaped CTR data drawn from a planted model, so the optimum is known.

`generate_synthetic_ctr` writes 13 dense and 26 categorical features, a `click` label and each
row's true click probability as Parquet shards, split by `recsys.data.splits` with the key
`str(row_index)` (BENCHMARKS.md, "Data: synthetic-ctr"). It sits at the bottom of the data flow,
beside the real datasets: its output is a Parquet directory plus a `DatasetSchema` YAML, read
like any user's data.

Every value of a row is a pure function of `(seed, row_index)`, and every parameter of the
planted model is a pure function of `(seed, field, id)`: both come from a keyed hash rather than
from a stateful generator. So the rows do not depend on how they are chunked, any chunk can be
produced on its own, and a 10,000,000-id vocabulary costs no memory. The planted model is

    logit = bias + sum_f w_f[id_f]                              (first order, every field)
                 + sum_{(f, g) in PAIRS} <v_f[id_f], v_g[id_g]>  (rank-4 pairwise terms)
                 + c * sum_{(f, g, h) in TRIPLES} sum_k v_f[id_f]_k v_g[id_g]_k v_h[id_h]_k
                 + sum_j beta_j * log1p(dense_j)
    true_prob = sigmoid(logit),  click ~ Bernoulli(true_prob)

with `bias` calibrated on the first rows so that the base CTR is near 0.2. Categorical ids are
Zipf-distributed with id 0 the most frequent, so large fields are dominated by ids seen a few
times: their parameters cannot be learned, which keeps the oracle out of any model's reach.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict
from tqdm import tqdm

from recsys.data.schema import DatasetSchema, Role
from recsys.data.splits import SPLITS, split_codes

logger = logging.getLogger(__name__)

DATASET_NAME = "synthetic-ctr"
# Bumped whenever the planted model or the row distribution changes, so old data is not mixed
# with new data under the same seed.
GENERATOR_VERSION = 1

NUM_DENSE = 13
NUM_CATEGORICAL = 26
DENSE_COLUMNS: tuple[str, ...] = tuple(f"dense_{j}" for j in range(NUM_DENSE))
CATEGORICAL_COLUMNS: tuple[str, ...] = tuple(f"cat_{f}" for f in range(NUM_CATEGORICAL))
LABEL_COLUMN = "click"
PROB_COLUMN = "true_prob"
ROW_INDEX_COLUMN = "row_index"

MIN_VOCAB = 10
MAX_VOCAB = 10_000_000
BASE_CTR = 0.2
LATENT_DIM = 4  # K, the rank of the pairwise interactions

# Field pairs and triples of the interaction terms. Field f has the f-th smallest vocabulary,
# so the pairs mix small (learnable) and large (mostly unlearnable) fields.
PAIRS: tuple[tuple[int, int], ...] = (
    (0, 1), (2, 3), (1, 4), (5, 8), (6, 10), (3, 12),
    (7, 15), (9, 18), (11, 20), (4, 23), (13, 25), (14, 17),
)  # fmt: skip
TRIPLES: tuple[tuple[int, int, int], ...] = ((0, 2, 5), (1, 3, 7), (4, 6, 9))

# Scales of the planted model, chosen so that no group of terms dominates the logit variance
# (with seed 0: about 0.95 first order, 0.65 pairwise, 0.15 three-way, 0.3 dense; the oracle
# AUC is then about 0.81, near Criteo's best models).
FIRST_ORDER_STD = 0.2
LATENT_STD = 0.36  # a rank-4 dot product then has variance 4 * LATENT_STD**4, about 0.07
TRIPLE_SCALE = 3.0
DENSE_WEIGHT_STD = 0.2

# Zipf exponents s per field (density of id rank r proportional to r^-s); s = 1 exactly is
# excluded by the inverse-CDF formula in `_zipf_ids`.
ZIPF_EXPONENTS: tuple[float, ...] = tuple(1.05 + 0.1 * (f % 3) for f in range(NUM_CATEGORICAL))


@dataclass(frozen=True)
class _DenseSpec:
    """How one dense feature is drawn from z ~ N(0, 1) or U ~ Uniform(0, 1).

    `kind` is one of "lognormal_count" (floor(exp(a + b z))), "lognormal" (exp(a + b z)),
    "exponential" (a * -log U) and "pareto_count" (floor(b * (U^(-1/a) - 1)), tail index a).
    """

    kind: str
    a: float
    b: float = 1.0


# Counts and durations in the style of Criteo's integer features; several have heavy tails
# (Pareto tail index <= 1.5 has infinite variance), which is what makes log1p necessary.
DENSE_SPECS: tuple[_DenseSpec, ...] = (
    _DenseSpec("lognormal_count", 0.5, 1.5),
    _DenseSpec("lognormal_count", 2.0, 1.2),
    _DenseSpec("pareto_count", 1.1, 2.0),
    _DenseSpec("exponential", 1.0),
    _DenseSpec("lognormal_count", 1.0, 2.0),
    _DenseSpec("pareto_count", 1.5, 10.0),
    _DenseSpec("exponential", 10.0),
    _DenseSpec("lognormal_count", 3.0, 1.0),
    _DenseSpec("lognormal_count", 0.0, 1.0),
    _DenseSpec("pareto_count", 2.0, 5.0),
    _DenseSpec("exponential", 100.0),
    _DenseSpec("lognormal_count", 4.0, 1.5),
    _DenseSpec("lognormal", 0.0, 0.5),
)
assert len(DENSE_SPECS) == NUM_DENSE

# Rows used to calibrate the bias; a pure function of the seed, whatever num_rows is.
_CALIBRATION_ROWS = 16_384

# Hash streams: each kind of random quantity hashes its inputs under its own key.
_STREAM_ROW_CATEGORICAL = 1
_STREAM_ROW_DENSE = 2
_STREAM_ROW_LABEL = 3
_STREAM_FIRST_ORDER = 4
_STREAM_LATENT = 5
_STREAM_DENSE_WEIGHT = 6


# ---------------------------------------------------------------------------------------------
# Keyed hash. numpy has no vectorised keyed hash (its Generators are stateful streams, and
# seeding one Generator per id would be far too slow), so SplitMix64 is written out on uint64
# arrays: `hash_u64(key, x)` is the (x+1)-th output of a SplitMix64 generator whose state
# starts at `key`. numpy integer arrays wrap on overflow: the modular arithmetic SplitMix64 needs.
# ---------------------------------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(state: np.ndarray) -> np.ndarray:
    """SplitMix64 output for each uint64 state (a new array; `state` is not modified)."""
    z = state + _GOLDEN
    z ^= z >> np.uint64(30)
    z *= _MIX_1
    z ^= z >> np.uint64(27)
    z *= _MIX_2
    z ^= z >> np.uint64(31)
    return z


def stream_key(seed: int, *parts: int) -> np.uint64:
    """Key of one hash stream, e.g. `stream_key(seed, stream, field)`.

    Args:
        seed: the dataset seed, in [0, 2**64).
        *parts: non-negative integers naming the stream (kind of quantity, field, ...).

    Returns:
        A uint64 key for `hash_u64`.
    """
    # 1-element arrays rather than numpy scalars: array arithmetic wraps silently, scalar
    # arithmetic warns on overflow.
    key = _splitmix64(np.array([seed], dtype=np.uint64))
    for part in parts:
        key = _splitmix64(key ^ np.uint64(part))
    return np.uint64(key[0])


def hash_u64(key: np.uint64 | np.ndarray, values: np.ndarray) -> np.ndarray:
    """Keyed hash of non-negative integers: 64 well-mixed bits per value, broadcasting.

    Args:
        key: from `stream_key`; an array of keys broadcasts against `values`.
        values: non-negative integers (ids or row indices).

    Returns:
        uint64 array of the broadcast shape.
    """
    return _splitmix64(np.asarray(values).astype(np.uint64) * _GOLDEN + key)


def _uniform(bits: np.ndarray) -> np.ndarray:
    """Top 53 bits as a float64 in (0, 1), never exactly 0 or 1."""
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def _box_muller(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Radius and angle of the Box-Muller transform, from the two 32-bit halves of each hash."""
    u1 = ((bits >> np.uint64(32)).astype(np.float64) + 0.5) * 2.0**-32
    u2 = (bits & np.uint64(0xFFFFFFFF)).astype(np.float64) * 2.0**-32
    return np.sqrt(-2.0 * np.log(u1)), 2.0 * math.pi * u2


def _normal(bits: np.ndarray) -> np.ndarray:
    """One standard normal per hash (the sine half is skipped: trigonometry dominates cost)."""
    radius, angle = _box_muller(bits)
    return radius * np.cos(angle)


def _normal_pair(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two independent standard normals per hash."""
    radius, angle = _box_muller(bits)
    return radius * np.cos(angle), radius * np.sin(angle)


# ---------------------------------------------------------------------------------------------
# Per-id parameters of the planted model: pure functions of (seed, field, id), never stored.
# ---------------------------------------------------------------------------------------------


def first_order_weights(seed: int, field: int, ids: np.ndarray) -> np.ndarray:
    """First-order logit weight w_f[id] of each id of one field, ~ N(0, FIRST_ORDER_STD^2).

    Args:
        seed: the dataset seed.
        field: categorical field index in [0, NUM_CATEGORICAL).
        ids: int64 ids of that field, any shape.

    Returns:
        float64 array shaped like `ids`.
    """
    return FIRST_ORDER_STD * _normal(hash_u64(stream_key(seed, _STREAM_FIRST_ORDER, field), ids))


def latent_vectors(seed: int, field: int, ids: np.ndarray) -> np.ndarray:
    """Latent vector v_f[id] of each id of one field, entries ~ N(0, LATENT_STD^2).

    Args:
        seed: the dataset seed.
        field: categorical field index in [0, NUM_CATEGORICAL).
        ids: 1-D int64 ids of that field, shape (B,).

    Returns:
        float64 array of shape (B, K) with K = LATENT_DIM.
    """
    return np.stack(_latent_columns(seed, field, ids), axis=-1)  # (B, K)


def _latent_columns(seed: int, field: int, ids: np.ndarray) -> list[np.ndarray]:
    """The K columns of `latent_vectors`, unstacked (the logit reads them column by column)."""
    columns: list[np.ndarray] = []
    for half in range(LATENT_DIM // 2):
        bits = hash_u64(stream_key(seed, _STREAM_LATENT, field, half), ids)
        columns.extend(LATENT_STD * z for z in _normal_pair(bits))
    return columns


def dense_weights(seed: int) -> np.ndarray:
    """Weights beta_j of log1p(dense_j) in the logit, shape (NUM_DENSE,)."""
    bits = hash_u64(stream_key(seed, _STREAM_DENSE_WEIGHT), np.arange(NUM_DENSE))
    return DENSE_WEIGHT_STD * _normal(bits)


def vocab_sizes(vocab_scale: float = 1.0) -> tuple[int, ...]:
    """Vocabulary size of each categorical field: log-uniform from 10 to 10M, times the scale.

    Args:
        vocab_scale: multiplies every size (tests shrink vocabularies with it); sizes are
            rounded and at least 2.
    """
    base = np.geomspace(MIN_VOCAB, MAX_VOCAB, NUM_CATEGORICAL)
    return tuple(max(2, round(float(v) * vocab_scale)) for v in base)


# ---------------------------------------------------------------------------------------------
# Rows: pure functions of (seed, row_index).
# ---------------------------------------------------------------------------------------------


def _zipf_ids(u: np.ndarray, vocab: int, exponent: float) -> np.ndarray:
    """Ids in [0, vocab) with P(id) roughly proportional to (id + 1)^-exponent.

    Inverse CDF of the continuous power law with density proportional to x^-s on [1, vocab+1),
    floored; vectorised, unlike numpy's unbounded `zipf`, which would need clipping and
    rejection.
    """
    one_minus_s = 1.0 - exponent
    top = (vocab + 1.0) ** one_minus_s
    x = (1.0 + u * (top - 1.0)) ** (1.0 / one_minus_s)
    return np.clip(np.floor(x).astype(np.int64) - 1, 0, vocab - 1)


def _dense_value(spec: _DenseSpec, bits: np.ndarray) -> np.ndarray:
    """One dense feature from one hash per row, as float32."""
    if spec.kind == "exponential":
        values = -spec.a * np.log(_uniform(bits))
    elif spec.kind == "pareto_count":
        values = np.floor(spec.b * (_uniform(bits) ** (-1.0 / spec.a) - 1.0))
    else:
        values = np.exp(spec.a + spec.b * _normal(bits))
        if spec.kind == "lognormal_count":
            values = np.floor(values)
    return values.astype(np.float32)


@dataclass(frozen=True)
class _PlantedModel:
    """Row distribution and label model of one (seed, vocab_scale), built by `_build_model`."""

    seed: int
    vocab: tuple[int, ...]
    beta: np.ndarray  # (NUM_DENSE,)
    bias: float

    def features(self, row_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Dense (B, 13) float32 and categorical ids (B, 26) int64 of the given rows."""
        dense = np.empty((len(row_index), NUM_DENSE), dtype=np.float32)
        for j, spec in enumerate(DENSE_SPECS):
            bits = hash_u64(stream_key(self.seed, _STREAM_ROW_DENSE, j), row_index)
            dense[:, j] = _dense_value(spec, bits)
        ids = np.empty((len(row_index), NUM_CATEGORICAL), dtype=np.int64)
        for f in range(NUM_CATEGORICAL):
            u = _uniform(hash_u64(stream_key(self.seed, _STREAM_ROW_CATEGORICAL, f), row_index))
            ids[:, f] = _zipf_ids(u, self.vocab[f], ZIPF_EXPONENTS[f])
        return dense, ids

    def logits_without_bias(self, dense: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Planted logit minus the bias, float64 (B,).

        Sums are written as sequential column additions so that a row's value does not depend
        on how many rows are computed together.
        """
        logits = np.zeros(len(ids), dtype=np.float64)
        for f in range(NUM_CATEGORICAL):
            logits += first_order_weights(self.seed, f, ids[:, f])
        fields = sorted({f for group in (*PAIRS, *TRIPLES) for f in group})
        latent = {f: _latent_columns(self.seed, f, ids[:, f]) for f in fields}  # K x (B,)
        for f, g in PAIRS:
            for k in range(LATENT_DIM):
                logits += latent[f][k] * latent[g][k]
        for f, g, h in TRIPLES:
            for k in range(LATENT_DIM):
                logits += TRIPLE_SCALE * (latent[f][k] * latent[g][k] * latent[h][k])
        for j in range(NUM_DENSE):
            logits += self.beta[j] * np.log1p(dense[:, j].astype(np.float64))
        return logits

    def rows(self, row_index: np.ndarray) -> pa.Table:
        """All columns of the given rows (int64 global row indices) as an Arrow table."""
        dense, ids = self.features(row_index)
        true_prob = 1.0 / (1.0 + np.exp(-(self.logits_without_bias(dense, ids) + self.bias)))
        u = _uniform(hash_u64(stream_key(self.seed, _STREAM_ROW_LABEL), row_index))
        click = (u < true_prob).astype(np.int8)
        columns: dict[str, np.ndarray] = {
            ROW_INDEX_COLUMN: row_index,
            LABEL_COLUMN: click,
            PROB_COLUMN: true_prob,
        }
        columns.update({name: dense[:, j] for j, name in enumerate(DENSE_COLUMNS)})
        columns.update({name: ids[:, f] for f, name in enumerate(CATEGORICAL_COLUMNS)})
        return pa.table(columns, schema=_ARROW_SCHEMA)


_ARROW_SCHEMA = pa.schema(
    [
        (ROW_INDEX_COLUMN, pa.int64()),
        (LABEL_COLUMN, pa.int8()),
        (PROB_COLUMN, pa.float64()),
        *[(name, pa.float32()) for name in DENSE_COLUMNS],
        *[(name, pa.int64()) for name in CATEGORICAL_COLUMNS],
    ]
)


def _build_model(seed: int, vocab_scale: float, block_rows: int) -> _PlantedModel:
    """Builds the planted model and calibrates its bias on the first `_CALIBRATION_ROWS` rows.

    The bias solves mean(sigmoid(logit)) = BASE_CTR by bisection over those rows' logits, which
    are computed `block_rows` at a time so that peak memory follows the chunk size. It depends
    on the seed and vocab_scale only (the rows are pure functions of their index).
    """
    model = _PlantedModel(seed, vocab_sizes(vocab_scale), dense_weights(seed), bias=0.0)
    parts = []
    for start in range(0, _CALIBRATION_ROWS, block_rows):
        rows = np.arange(start, min(start + block_rows, _CALIBRATION_ROWS), dtype=np.int64)
        parts.append(model.logits_without_bias(*model.features(rows)))
    logits = np.concatenate(parts)
    low, high = -30.0, 30.0  # mean sigmoid is increasing in the bias
    for _ in range(100):
        mid = 0.5 * (low + high)
        if np.mean(1.0 / (1.0 + np.exp(-(logits + mid)))) < BASE_CTR:
            low = mid
        else:
            high = mid
    return _PlantedModel(seed, model.vocab, model.beta, bias=0.5 * (low + high))


# ---------------------------------------------------------------------------------------------
# Oracle metrics of the test split.
# ---------------------------------------------------------------------------------------------


def _exact_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties given half credit.

    Written here rather than imported from `recsys.metrics.binary` (same definition, but that
    module imports torch, which the data layer does not need) or sklearn (not a library
    dependency). None when a class is absent.
    """
    n = len(scores)
    num_pos = int(np.count_nonzero(labels))
    num_neg = n - num_pos
    if num_pos == 0 or num_neg == 0:
        return None
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.concatenate(([0], np.flatnonzero(np.diff(sorted_scores)) + 1))
    ends = np.concatenate((starts[1:], [n]))
    ranks = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # 1-based average ranks
    pos_rank_sum = float(ranks[labels[order] != 0].sum())
    return (pos_rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg)


def _logloss(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """Mean binary cross-entropy; None for an empty array."""
    if len(labels) == 0:
        return None
    p = np.clip(probs, 1e-15, 1.0 - 1e-15)
    return float(-np.mean(np.where(labels != 0, np.log(p), np.log1p(-p))))


# ---------------------------------------------------------------------------------------------
# Public entry points.
# ---------------------------------------------------------------------------------------------


class SyntheticInfo(BaseModel):
    """Facts about one generated synthetic-ctr dataset, as written to `info.json`.

    Args:
        name: the dataset name, `synthetic-ctr`.
        generator_version: `GENERATOR_VERSION` of the code that wrote it.
        num_rows: rows over all splits.
        seed: the seed of the planted model and of the rows.
        vocab_scale: the factor applied to the vocabulary sizes.
        vocab_sizes: vocabulary size of each categorical column.
        bias: the calibrated bias of the planted logit.
        split_rows: rows per split.
        split_positive_rate: mean click per split (None for an empty split).
        oracle_test_auc: AUC of `true_prob` against `click` on the test split (None when the
            test split lacks a class).
        oracle_test_logloss: logloss of `true_prob` on the test split (None when it is empty).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    generator_version: int
    num_rows: int
    seed: int
    vocab_scale: float
    vocab_sizes: dict[str, int]
    bias: float
    split_rows: dict[str, int]
    split_positive_rate: dict[str, float | None]
    oracle_test_auc: float | None
    oracle_test_logloss: float | None

    @classmethod
    def from_json(cls, path: str | Path) -> SyntheticInfo:
        """Reads an `info.json` written by `generate_synthetic_ctr`."""
        return cls.model_validate_json(Path(path).read_text())


def synthetic_schema() -> DatasetSchema:
    """The DatasetSchema of synthetic-ctr (what `schema.yaml` holds)."""
    # Validated from plain data, as a user's YAML would be (constructing ColumnSpec directly
    # trips mypy, which reads its positional `Field(None, ...)` defaults as required).
    columns = [{"name": c, "role": Role.DENSE} for c in DENSE_COLUMNS]
    columns += [{"name": c, "role": Role.CATEGORICAL} for c in CATEGORICAL_COLUMNS]
    columns += [
        {"name": LABEL_COLUMN, "role": Role.LABEL, "task": "ctr"},
        {"name": PROB_COLUMN, "role": Role.OTHER},
        {"name": ROW_INDEX_COLUMN, "role": Role.OTHER},
    ]
    return DatasetSchema.model_validate(
        {"name": DATASET_NAME, "columns": columns, "split_key": [ROW_INDEX_COLUMN]}
    )


def generate_synthetic_ctr(
    out_dir: str | Path,
    num_rows: int,
    seed: int = 0,
    chunk_rows: int = 100_000,
    show_progress: bool = False,
    vocab_scale: float = 1.0,
) -> SyntheticInfo:
    """Writes the synthetic-ctr dataset as Parquet shards, `chunk_rows` rows at a time.

    Layout: `out_dir/{train,valid,test}/part-XXXXX.parquet` (one file per chunk and split,
    possibly empty, numbered by chunk), `out_dir/schema.yaml` and `out_dir/info.json`, written
    last. Rows are a pure function of `(seed, row_index)`, so `chunk_rows` changes the files but
    not the rows. Peak memory grows with `chunk_rows`, not with `num_rows`, except for the test
    split's `true_prob` and `click` kept for the exact oracle AUC (9 bytes per test row, about
    9 MB for 10M rows).

    Args:
        out_dir: output directory; must not already hold generated shards.
        num_rows: rows to generate, at least 1.
        seed: seed of the planted model and the rows, in [0, 2**64).
        chunk_rows: rows generated and written per step, at least 1.
        show_progress: show a tqdm bar (only when stderr is a terminal).
        vocab_scale: multiplies every vocabulary size (at least 2 each); > 0.

    Returns:
        The facts also written to `info.json`.

    Raises:
        ValueError: for an out-of-range argument.
        FileExistsError: when `out_dir` already holds generated shards.
    """
    if num_rows < 1:
        raise ValueError(f"synthetic-ctr: num_rows must be positive (got {num_rows})")
    if chunk_rows < 1:
        raise ValueError(f"synthetic-ctr: chunk_rows must be positive (got {chunk_rows})")
    if not 0 <= seed < 2**64:
        raise ValueError(f"synthetic-ctr: seed must be in [0, 2**64) (got {seed})")
    if not (math.isfinite(vocab_scale) and vocab_scale > 0):
        raise ValueError(f"synthetic-ctr: vocab_scale must be positive (got {vocab_scale})")
    out_dir = Path(out_dir)
    for split in SPLITS:
        if any((out_dir / split).glob("part-*.parquet")):
            raise FileExistsError(
                f"synthetic-ctr: {out_dir / split} already holds Parquet shards (expected an "
                f"empty output directory); delete it or choose another out_dir"
            )
        (out_dir / split).mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    # Calibration blocks follow the chunk size (peak memory), but not below 1,024 rows, where
    # per-block overhead would dominate.
    calibration_block = min(max(chunk_rows, 1_024), _CALIBRATION_ROWS)
    model = _build_model(seed, vocab_scale, block_rows=calibration_block)
    split_rows: dict[str, int] = dict.fromkeys(SPLITS, 0)
    split_positives: dict[str, int] = dict.fromkeys(SPLITS, 0)
    test_probs: list[np.ndarray] = []
    test_clicks: list[np.ndarray] = []
    with tqdm(
        total=num_rows,
        desc=DATASET_NAME,
        unit="row",
        unit_scale=True,
        mininterval=1.0,
        disable=not (show_progress and sys.stderr.isatty()),
    ) as bar:
        for chunk, start in enumerate(range(0, num_rows, chunk_rows)):
            row_index = np.arange(start, min(start + chunk_rows, num_rows), dtype=np.int64)
            table = model.rows(row_index)
            codes = split_codes(map(str, row_index.tolist()))
            for code, split in enumerate(SPLITS):
                part = table.filter(pa.array(codes == code))
                pq.write_table(part, out_dir / split / f"part-{chunk:05d}.parquet")
                clicks = part.column(LABEL_COLUMN).to_numpy()
                split_rows[split] += len(clicks)
                split_positives[split] += int(clicks.sum(dtype=np.int64))
                if split == "test":
                    test_probs.append(part.column(PROB_COLUMN).to_numpy())
                    test_clicks.append(clicks)
            bar.update(len(row_index))

    probs = np.concatenate(test_probs)
    clicks = np.concatenate(test_clicks)
    info = SyntheticInfo(
        name=DATASET_NAME,
        generator_version=GENERATOR_VERSION,
        num_rows=num_rows,
        seed=seed,
        vocab_scale=vocab_scale,
        vocab_sizes=dict(zip(CATEGORICAL_COLUMNS, model.vocab, strict=True)),
        bias=model.bias,
        split_rows=split_rows,
        split_positive_rate={
            s: split_positives[s] / split_rows[s] if split_rows[s] else None for s in SPLITS
        },
        oracle_test_auc=_exact_auc(clicks, probs),
        oracle_test_logloss=_logloss(clicks, probs),
    )
    synthetic_schema().to_yaml(out_dir / "schema.yaml")
    (out_dir / "info.json").write_text(json.dumps(info.model_dump(mode="json"), indent=2) + "\n")
    logger.info(
        "synthetic-ctr: wrote %d rows (seed %d) to %s in %.1fs; oracle test auc=%s logloss=%s",
        num_rows,
        seed,
        out_dir,
        time.perf_counter() - started,
        info.oracle_test_auc,
        info.oracle_test_logloss,
    )
    return info
