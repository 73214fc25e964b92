"""Unified (multiplexed) embedding and per-feature hashing under a parameter budget (METHODS §6).

Features -> `probe_features` remaps the KJT (keys = sparse features, ids = vocab ids) into the
lookup KJT the tables expect -> EmbeddingBagCollection -> per-field concatenation of the pooled
lookups -> (B, F, D). The remap is vectorised torch code inside `forward`, before the EBC is
called, so `features/` is the same for every variant and DMP shards the EBC like any other.

  unified  every multiplexed feature does k = D / c probes; probe j of feature t looks up
           `hash(id; salt(t, j)) mod M_s` in sub-table s (round-robin over S sub-tables that
           all features share); the field is the concatenation of its k pooled probes.
  hashed   one table per feature; a feature whose table is smaller than its vocabulary looks
           up `hash(id; salt(t)) mod rows_t` (the per-feature hashing baseline of §6(c)).

The hash is splitmix64's finaliser, applied twice with the salt in between, in int64 torch ops
(wrap-around multiplication; right shifts are masked to be logical). Salts come from
`zlib.crc32` of the feature NAME, the probe index and `embedding.unified.salt`, so the same id
gets the same row in any process, on any worker, in training and in serving.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.embeddings.config import EmbeddingConfig, UnifiedSpec
from recsys.embeddings.per_feature import FieldEmbedding, table_name
from recsys.errors import ConfigError
from recsys.features.batch import Features
from recsys.features.schema import FeatureSchema, SparseFeature

logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _to_int64(value: int) -> int:
    """An unsigned 64-bit value as the signed int64 with the same bits (what torch stores)."""
    value &= _MASK64
    return value - (1 << 64) if value >> 63 else value


def _mix64_int(value: int) -> int:
    """splitmix64's finaliser on Python ints (unsigned 64-bit); used for salts."""
    z = (value + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic (copies the sign bit); the mask makes it logical, as
    # the unsigned algorithm needs.
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on an int64 tensor, bit-identical to the unsigned 64-bit version.

    int64 addition and multiplication wrap around modulo 2**64, which is the unsigned
    arithmetic the finaliser is defined in; only the shifts need masking.
    """
    z = z + _to_int64(_GOLDEN)
    z = (z ^ _shift_right(z, 30)) * _to_int64(_MIX1)
    z = (z ^ _shift_right(z, 27)) * _to_int64(_MIX2)
    return z ^ _shift_right(z, 31)


def feature_salt(feature: str, probe: int = 0, salt: int = 0) -> int:
    """The salt of probe `probe` of `feature` (an int64), stable across processes and runs.

    A hash chain over (crc32 of the feature name, probe, global salt): never Python's `hash()`,
    which is randomised per process. Names, not field positions, so adding a feature to the
    schema does not move the rows of the others.
    """
    value = 0
    for part in (zlib.crc32(feature.encode("utf-8")), probe, salt):
        value = _mix64_int(value ^ (part & _MASK64))
    return _to_int64(value)


def hash_ids(
    ids: torch.Tensor, salt: int | torch.Tensor, num_rows: int | torch.Tensor
) -> torch.Tensor:
    """Rows of `ids` in a table of `num_rows` rows: `mix64(mix64(id) ^ salt) mod num_rows`.

    The first round spreads small consecutive ids over 64 bits, so XOR with a salt cannot make
    ids of two salts collide systematically; the second decorrelates the salts. The sign bit is
    dropped before the modulo, so rows are the low 63 bits' residue (non-negative).

    Shapes: `ids`, `salt` and `num_rows` broadcast together (e.g. (1, n), (k, 1), (k, 1) ->
    (k, n)); ids must be int64.
    """
    hashed = mix64(mix64(ids) ^ salt)
    return torch.remainder(hashed & _MASK63, num_rows)


@dataclass(frozen=True)
class _FieldLookups:
    """How one sparse field is looked up: `keys` of the lookup KJT, concatenated in order.

    `salts`/`num_rows` are empty for an exact field (its one key is the feature name and its
    ids pass unchanged); otherwise key i gets `hash_ids(ids, salts[i], num_rows[i])`.
    """

    feature: str
    keys: tuple[str, ...]
    salts: tuple[int, ...] = ()
    num_rows: tuple[int, ...] = ()

    @property
    def is_hashed(self) -> bool:
        return bool(self.salts)


class SaltedLookupEmbedding(FieldEmbedding):
    """A field embedding whose sparse ids are remapped by salted hashes before the lookup.

    The shared machinery of `UnifiedEmbedding` and `HashedEmbedding`: field f looks up the
    keys of its `_FieldLookups` (one per probe; a single identity key for an exact field) and
    concatenates their pooled vectors in key order, so the widths of a field's keys must sum
    to D. Salts and row counts live in non-persistent CPU buffers: they are a function of the
    config and schema, rebuilt identically on load, so they are not written to the artifact.

    Shapes: Features with B rows -> (B, F, D), F = num sparse + num dense, dense fields last.

    Args:
        tables: the EmbeddingBagCollection; its feature names are the lookup keys.
        sparse_names: sparse feature names in field order.
        num_dense: number of dense features.
        dim: D, the width of every field.
        lookups: one entry per sparse feature, in field order.
    """

    probe_salts: torch.Tensor
    probe_rows: torch.Tensor

    def __init__(
        self,
        tables: EmbeddingBagCollection,
        sparse_names: list[str],
        num_dense: int,
        dim: int,
        lookups: list[_FieldLookups],
    ) -> None:
        super().__init__(tables, sparse_names, num_dense, dim)
        assert [lookup.feature for lookup in lookups] == self.sparse_names
        self.lookups = list(lookups)
        self._exact = [lookup for lookup in self.lookups if not lookup.is_hashed]
        self._hashed = [lookup for lookup in self.lookups if lookup.is_hashed]
        # one entry per hashed key, in the order `probe_features` lays the keys out
        salts = [salt for lookup in self._hashed for salt in lookup.salts]
        num_rows = [rows for lookup in self._hashed for rows in lookup.num_rows]
        self.register_buffer("probe_salts", torch.tensor(salts, dtype=torch.int64), False)
        self.register_buffer("probe_rows", torch.tensor(num_rows, dtype=torch.int64), False)

    def probe_features(self, sparse: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Input KJT (keys = sparse features, vocab ids) -> the lookup KJT the tables read.

        Exact fields keep their key and ids. The ids of every hashed key are hashed in one
        vectorised call: a field with k keys contributes its ids k times (key-major), and
        each value gets its key's salt and row count by `repeat_interleave`. The lookup KJT
        lists the exact keys first, then the hashed keys in field order; the EBC reads keys
        by name, so the order is free.
        """
        jagged = sparse.to_dict()
        keys = [lookup.keys[0] for lookup in self._exact]
        values = [jagged[lookup.feature].values() for lookup in self._exact]
        lengths = [jagged[lookup.feature].lengths() for lookup in self._exact]
        if self._hashed:
            ids, counts = [], []
            for lookup in self._hashed:
                field = jagged[lookup.feature]
                num_keys = len(lookup.keys)
                keys += lookup.keys
                ids.append(field.values().repeat(num_keys))
                lengths.append(field.lengths().repeat(num_keys))
                counts += [field.values().numel()] * num_keys
            flat_ids = torch.cat(ids).to(torch.int64)  # (sum over keys of the key's values,)
            # sizes from shapes, so repeat_interleave needs no device sync for its output size
            per_value = torch.tensor(counts, device=flat_ids.device)
            total = flat_ids.numel()
            salts = self.probe_salts.repeat_interleave(per_value, output_size=total)
            num_rows = self.probe_rows.repeat_interleave(per_value, output_size=total)
            values.append(hash_ids(flat_ids, salts, num_rows))
        return KeyedJaggedTensor(
            keys=keys,
            values=torch.cat(values),
            lengths=torch.cat(lengths),
            stride=sparse.stride(),
        )

    def forward(self, features: Features) -> torch.Tensor:
        pooled = self.tables(self.probe_features(features.sparse)).to_dict()
        fields = [
            torch.cat([pooled[key] for key in lookup.keys], dim=1)  # (B, D)
            for lookup in self.lookups
        ]
        return self.stack_fields(fields, features)  # (B, F, D)


class UnifiedEmbedding(SaltedLookupEmbedding):
    """Unified Embedding: the multiplexed features share S sub-tables of c-wide rows.

    Paper: Coleman et al., "Unified Embedding: Battle-Tested Feature Representations for
    Web-Scale ML Systems", NeurIPS 2023, arXiv:2305.12102.

    Feature t does k = D / c probes; probe j reads row `hash(id; salt(t, j)) mod M_s` of
    sub-table s, where probes go to sub-tables round-robin, continuing across features (the
    TFRS `UnifiedEmbeddingConfig` layout). Each probe is MEAN-pooled over a bag (for a single
    id that is the row itself), then the k probes are concatenated in probe order. Features
    kept collisionless have a D-wide exact table of their own in the same EBC.

    Differences from the paper:
        - Every multiplexed feature has the same width k * c = D (AutoInt and the other models
          need one width); the paper allows a different k per feature.
        - Inputs are the vocabulary ids of `features/` (id 0 = OOV), hashed again here, not raw
          values; unseen values all share the OOV id's rows.
        - Sub-tables differ by at most one row: the budget left after the exact tables is
          split evenly (see `unified_table_rows`).

    Shapes: Features with B rows -> (B, F, D), F = num sparse + num dense, dense fields last.

    Example:
        >>> import pyarrow as pa
        >>> from recsys.data.schema import DatasetSchema
        >>> from recsys.embeddings.config import EmbeddingConfig, UnifiedSpec
        >>> from recsys.features.batch import features_from_rows
        >>> from recsys.features.schema import fit_feature_schema
        >>> dataset = DatasetSchema.model_validate({"name": "toy", "columns": [
        ...     {"name": "user_id", "role": "categorical"},
        ...     {"name": "item_id", "role": "categorical"},
        ...     {"name": "click", "role": "label"}]})
        >>> rows = pa.table({"user_id": ["u1", "u2"], "item_id": ["i1", "i2"], "click": [1, 0]})
        >>> schema = fit_feature_schema(dataset, [rows])
        >>> config = EmbeddingConfig(variant="unified", dim=8, param_budget=64,
        ...                          unified=UnifiedSpec(num_tables=2, chunk_dim=4))
        >>> embedding = build_unified_embedding(schema, config)
        >>> [(c.name, c.num_embeddings, c.feature_names) for c in
        ...  embedding.tables.embedding_bag_configs()]
        [('ue_0', 8, ['user_id__p0', 'item_id__p0']), ('ue_1', 8, ['user_id__p1', 'item_id__p1'])]
        >>> embedding(features_from_rows(schema, [{"user_id": "u1", "item_id": "i9"}])).shape
        torch.Size([1, 2, 8])
    """


class HashedEmbedding(SaltedLookupEmbedding):
    """Per-feature hashing: one D-wide table per feature, sized by a shared row budget.

    The baseline Unified Embedding is compared with (METHODS §6(c)): a feature whose table is
    smaller than its vocabulary maps id x to row `hash(x; salt(t)) mod rows_t`; the others
    keep their exact table. `share_table_rows` decides the sizes.

    Differences from the reference (TFRS uet.ipynb): table sizes come from water-filling one
    budget instead of hand-picked bucket counts per feature, and ids are vocabulary ids.

    Shapes: Features with B rows -> (B, F, D), F = num sparse + num dense, dense fields last.

    Example:
        >>> import pyarrow as pa
        >>> from recsys.data.schema import DatasetSchema
        >>> from recsys.embeddings.config import EmbeddingConfig
        >>> from recsys.features.batch import features_from_rows
        >>> from recsys.features.schema import fit_feature_schema
        >>> dataset = DatasetSchema.model_validate({"name": "toy", "columns": [
        ...     {"name": "user_id", "role": "categorical"},
        ...     {"name": "click", "role": "label"}]})
        >>> rows = pa.table({"user_id": ["a", "b", "c", "d"], "click": [1, 0, 1, 0]})
        >>> schema = fit_feature_schema(dataset, [rows])
        >>> config = EmbeddingConfig(variant="hashed", dim=4, param_budget=12)
        >>> embedding = build_hashed_embedding(schema, config)
        >>> embedding.tables.embedding_bag_configs()[0].num_embeddings
        3
        >>> embedding(features_from_rows(schema, [{"user_id": "a"}])).shape
        torch.Size([1, 1, 4])
    """


def _feature_table(
    feature: SparseFeature, config: EmbeddingConfig, table_prefix: str, num_rows: int
) -> EmbeddingBagConfig:
    """A D-wide table of one feature, named and pooled as in the per-feature stack."""
    return EmbeddingBagConfig(
        num_embeddings=num_rows,
        embedding_dim=config.dim,
        name=table_name(feature.name, table_prefix),
        feature_names=[feature.name],
        pooling=PoolingType.MEAN if feature.is_bag else PoolingType.SUM,
        weight_init_min=-config.init_scale,
        weight_init_max=config.init_scale,
    )


def multiplexed_features(schema: FeatureSchema, spec: UnifiedSpec) -> list[str]:
    """The features `spec` multiplexes, in schema order.

    A feature is multiplexed when `spec.features` is None or names it, and it has more than
    `spec.collisionless_max_rows` ids; the others keep an exact table.

    Raises:
        ConfigError: `spec.features` names a feature the schema lacks.
    """
    if spec.features is not None:
        unknown = sorted(set(spec.features) - set(schema.sparse_names))
        if unknown:
            raise ConfigError(
                f"embedding.unified.features: unknown sparse features {unknown} (expected "
                f"names from {schema.sparse_names}); fix the names or leave it unset"
            )
    return [
        f.name
        for f in schema.sparse
        if (spec.features is None or f.name in spec.features)
        and f.num_embeddings > spec.collisionless_max_rows
    ]


def unified_table_rows(
    param_budget: int, exact_params: int, num_tables: int, chunk_dim: int
) -> list[int]:
    """Rows M_s of each of the S sub-tables.

    The budget counts every table parameter of the stack: `exact_params` (the exact tables,
    rows x D) plus sum_s M_s * c. The remaining `param_budget - exact_params` buys
    floor(remaining / c) rows, split evenly (the first sub-tables take one row more when it
    does not divide), so the total lies in (param_budget - c, param_budget]. Dense-feature
    vectors are not tables and are not counted.

    Raises:
        ConfigError: the budget leaves less than one row per sub-table.
    """
    total_rows = (param_budget - exact_params) // chunk_dim
    if total_rows < num_tables:
        minimum = exact_params + num_tables * chunk_dim
        raise ConfigError(
            f"embedding.param_budget={param_budget} is too small for variant 'unified' "
            f"(expected at least {minimum}: the exact tables take {exact_params} parameters "
            f"and each of the {num_tables} sub-tables needs at least one {chunk_dim}-wide "
            f"row); raise embedding.param_budget, or lower embedding.unified."
            f"collisionless_max_rows so fewer features keep exact tables"
        )
    base, extra = divmod(total_rows, num_tables)
    return [base + (1 if s < extra else 0) for s in range(num_tables)]


def build_unified_embedding(
    schema: FeatureSchema,
    config: EmbeddingConfig,
    device: torch.device | None = None,
    table_prefix: str = "",
) -> FieldEmbedding:
    """The `unified` stack: S shared sub-tables `{table_prefix}ue_{s}` plus exact tables.

    Probe keys are `{feature}__p{j}`; probes are dealt to sub-tables round-robin in schema
    order, feature by feature (probe j of the i-th probe overall goes to table i mod S).

    Raises:
        ConfigError: no feature is multiplexed, `num_tables` exceeds the number of probes, an
            unknown feature is named, or `param_budget` is too small (see
            `unified_table_rows`).
    """
    spec = config.unified
    multiplexed = set(multiplexed_features(schema, spec))
    if not multiplexed:
        raise ConfigError(
            f"embedding.unified: no feature is multiplexed (got collisionless_max_rows="
            f"{spec.collisionless_max_rows}, features={spec.features}, table sizes "
            f"{ {f.name: f.num_embeddings for f in schema.sparse} }); lower "
            f"collisionless_max_rows or use variant 'per_feature'"
        )
    num_probes = config.dim // spec.chunk_dim
    if spec.num_tables > len(multiplexed) * num_probes:
        raise ConfigError(
            f"embedding.unified.num_tables={spec.num_tables} exceeds the number of probes "
            f"(expected at most {len(multiplexed) * num_probes}: {len(multiplexed)} features x "
            f"{num_probes} probes); lower num_tables so every sub-table gets a probe"
        )
    exact = [f for f in schema.sparse if f.name not in multiplexed]
    exact_params = sum(f.num_embeddings for f in exact) * config.dim
    assert config.param_budget is not None  # EmbeddingConfig requires it for this variant
    rows = unified_table_rows(config.param_budget, exact_params, spec.num_tables, spec.chunk_dim)

    sub_table_keys: list[list[str]] = [[] for _ in rows]
    lookups: list[_FieldLookups] = []
    probe_index = 0
    for feature in schema.sparse:
        if feature.name not in multiplexed:
            lookups.append(_FieldLookups(feature.name, (feature.name,)))
            continue
        keys, salts, num_rows = [], [], []
        for probe in range(num_probes):
            table = probe_index % spec.num_tables
            probe_index += 1
            key = f"{feature.name}__p{probe}"
            sub_table_keys[table].append(key)
            keys.append(key)
            salts.append(feature_salt(feature.name, probe, spec.salt))
            num_rows.append(rows[table])
        lookups.append(_FieldLookups(feature.name, tuple(keys), tuple(salts), tuple(num_rows)))

    tables = [_feature_table(f, config, table_prefix, f.num_embeddings) for f in exact] + [
        EmbeddingBagConfig(
            num_embeddings=num_rows_s,
            embedding_dim=spec.chunk_dim,
            name=f"{table_prefix}ue_{s}",
            feature_names=keys_s,
            # MEAN is right for both: a single id pools to its row, a bag to its mean.
            pooling=PoolingType.MEAN,
            weight_init_min=-config.init_scale,
            weight_init_max=config.init_scale,
        )
        for s, (num_rows_s, keys_s) in enumerate(zip(rows, sub_table_keys, strict=True))
    ]
    logger.info(
        "unified embedding: %d sub-tables of %s rows x %d, exact tables %s",
        spec.num_tables,
        rows,
        spec.chunk_dim,
        [f.name for f in exact],
    )
    ebc = EmbeddingBagCollection(tables=tables, device=device)
    return UnifiedEmbedding(ebc, schema.sparse_names, len(schema.dense), config.dim, lookups)


def share_table_rows(vocab_sizes: dict[str, int], total_rows: int) -> dict[str, int]:
    """Water-filling: splits `total_rows` table rows across features, none above its vocab.

    Features are visited from the smallest vocabulary up; one whose vocabulary fits in an even
    share of the rows still unassigned keeps an exact table; once one does not fit, it and all
    larger ones split the rest evenly (the largest vocabularies take the one-row remainders).
    Every row is used unless every feature fits exactly, and the capped features end up within
    one row of each other.

    Raises:
        ConfigError: fewer rows than features (each needs at least one).
    """
    if total_rows < len(vocab_sizes):
        raise ConfigError(
            f"embedding.param_budget is too small for variant 'hashed' (got {total_rows} rows "
            f"of width embedding.dim, expected at least one per feature: "
            f"{len(vocab_sizes)}); raise embedding.param_budget"
        )
    order = sorted(vocab_sizes, key=lambda name: (vocab_sizes[name], name))
    rows: dict[str, int] = {}
    remaining = total_rows
    for i, name in enumerate(order):
        left = len(order) - i
        if vocab_sizes[name] * left <= remaining:
            rows[name] = vocab_sizes[name]
            remaining -= vocab_sizes[name]
            continue
        base, extra = divmod(remaining, left)
        for k, capped in enumerate(order[i:]):
            rows[capped] = base + (1 if k >= left - extra else 0)
        break
    return rows


def build_hashed_embedding(
    schema: FeatureSchema,
    config: EmbeddingConfig,
    device: torch.device | None = None,
    table_prefix: str = "",
) -> FieldEmbedding:
    """The `hashed` stack: one D-wide table per feature, `param_budget // D` rows shared out by
    `share_table_rows`; a table smaller than its vocabulary is addressed by the salted hash.

    Raises:
        ConfigError: `param_budget // D` is below the number of sparse features.
    """
    assert config.param_budget is not None  # EmbeddingConfig requires it for this variant
    rows = share_table_rows(
        {f.name: f.num_embeddings for f in schema.sparse}, config.param_budget // config.dim
    )
    lookups = []
    for f in schema.sparse:
        if rows[f.name] >= f.num_embeddings:
            lookups.append(_FieldLookups(f.name, (f.name,)))
        else:
            lookups.append(
                _FieldLookups(f.name, (f.name,), (feature_salt(f.name),), (rows[f.name],))
            )
    tables = [_feature_table(f, config, table_prefix, rows[f.name]) for f in schema.sparse]
    logger.info(
        "hashed embedding: table rows %s (vocab sizes %s)",
        rows,
        {f.name: f.num_embeddings for f in schema.sparse},
    )
    ebc = EmbeddingBagCollection(tables=tables, device=device)
    return HashedEmbedding(ebc, schema.sparse_names, len(schema.dense), config.dim, lookups)
