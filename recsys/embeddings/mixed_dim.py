"""Mixed-dimension embeddings: one TorchRec table per (field, frequency block), each as wide as
the dimensions its block kept (DNIS's export form, METHODS.md §7(b)6 and §7(h)).

Features -> MixedDimEmbedding -> (B, F, D). Vocabulary ids are frequency ordered (id 0 is OOV,
then the most frequent value first), so a field's blocks are contiguous id ranges: the head
block holds the frequent ids, the tail block the rare ones, and each may keep a different
subset of the D dimensions. Inside `forward` the field-keyed KJT is remapped, vectorised, into a
block-keyed KJT with block-local ids; the weighted EmbeddingBagCollection pools each block, and
each block's pooled vector is scattered into its kept coordinates of the D-wide layout, so the
model sees the same (B, F, D) tensor as with per-feature tables. Only the EBC is created on the
build device, so DMP shards the block tables (table- or row-wise) like any other tables.

`table_param_count` and `embedding_param_count` count table parameters (rows x width summed
over the tables) of any variant, for the search summary and the benchmarks.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.embeddings.config import BlockSpec, EmbeddingConfig, MixedDimSpec
from recsys.embeddings.per_feature import FieldEmbedding, table_name
from recsys.errors import ConfigError
from recsys.features.batch import Features
from recsys.features.schema import FeatureSchema

# TorchRec's fused (FBGEMM) table kernels, which DMP uses for every sharded table, need a width
# divisible by this (torchrec's `_assert_local_cols_divisible_by_4`).
SHARDED_WIDTH_MULTIPLE = 4


def block_feature_name(field: str, block: int) -> str:
    """The KJT key (and pooled output name) of one block of a field."""
    return f"{field}__b{block}"


def block_table_name(field: str, block: int, prefix: str = "") -> str:
    """The table of one block of a field: `{prefix}t_{field}__b{block}`."""
    return f"{table_name(field, prefix)}__b{block}"


class BlockLayout(nn.Module):
    """Locates every id of a field-keyed KJT in its field's contiguous id blocks, vectorised.

    Fields are laid end to end in one global id space (field f's ids are offset by the rows of
    the fields before it), so one `bucketize` over the blocks' global ends finds every value's
    block at once, whatever its field.

    Shapes: a KJT with F keys (in field order), stride B and N values -> three (N,) int64
    tensors: the value's segment (key * B + row), its global id (the id plus its field's
    offset) and its global block index; `global_start[block]` turns a global id local.

    Args:
        num_embeddings: rows of each field's id space, in field order.
        block_ends: per field, the exclusive end ids of its blocks (strictly increasing, the
            last equal to the field's rows).

    Example:
        >>> layout = BlockLayout([4, 3], [[2, 4], [3]])  # field 0: blocks [0, 2) and [2, 4)
        >>> values, lengths = torch.tensor([1, 3, 2]), torch.tensor([1, 1, 1, 0])  # B = 2
        >>> segment, gid, block = layout.locate(values, lengths, batch_size=2)
        >>> segment.tolist(), gid.tolist(), block.tolist()
        ([0, 1, 2], [1, 3, 6], [0, 1, 2])
    """

    field_offset: torch.Tensor
    global_start: torch.Tensor
    global_end: torch.Tensor
    block_field: torch.Tensor

    def __init__(self, num_embeddings: list[int], block_ends: list[list[int]]) -> None:
        super().__init__()
        offsets, starts, ends, fields = [], [], [], []
        offset = 0
        for field, (rows, field_ends) in enumerate(zip(num_embeddings, block_ends, strict=True)):
            assert field_ends and field_ends[-1] == rows, (rows, field_ends)
            offsets.append(offset)
            previous = 0
            for end in field_ends:
                starts.append(offset + previous)
                ends.append(offset + end)
                fields.append(field)
                previous = end
            offset += rows
        self.num_fields = len(num_embeddings)
        # Derived from the config, never trained: kept out of the state dict and the artifact.
        self.register_buffer("field_offset", torch.tensor(offsets, dtype=torch.int64), False)
        self.register_buffer("global_start", torch.tensor(starts, dtype=torch.int64), False)
        self.register_buffer("global_end", torch.tensor(ends, dtype=torch.int64), False)
        self.register_buffer("block_field", torch.tensor(fields, dtype=torch.int64), False)

    @property
    def num_blocks(self) -> int:
        return int(self.global_end.numel())

    def locate(
        self, values: torch.Tensor, lengths: torch.Tensor, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(segment, global id, block) of every value; see the class docstring."""
        num_segments = lengths.numel()
        segment = torch.repeat_interleave(
            torch.arange(num_segments, device=values.device), lengths.long()
        )  # (N,)
        gid = values.long() + self.field_offset[segment // batch_size]
        # right=True: block g holds global_start[g] <= gid < global_end[g]
        block = torch.bucketize(gid, self.global_end, right=True)
        return segment, gid, block


def in_field_order(kjt: KeyedJaggedTensor, names: list[str]) -> KeyedJaggedTensor:
    """The KJT with its keys in `names` order (Features are built in schema order already)."""
    keys = kjt.keys()
    if keys == names:
        return kjt
    missing = [n for n in names if n not in keys]
    if missing:
        raise ConfigError(
            f"embedding: the features lack the sparse fields {missing} (got keys {keys}); "
            f"build Features with the model's schema"
        )
    return kjt.permute([keys.index(n) for n in names])


class MixedDimEmbedding(FieldEmbedding):
    """Field embeddings from per-(field, frequency block) tables of different widths.

    Paper: Cheng, Shen, Huang, "Differentiable Neural Input Search for Recommender Systems"
    (DNIS), arXiv:2006.04466 — this is the pruned model its search exports.

    Block i of field f covers the contiguous vocabulary ids [end_{i-1}, end_i) and keeps the
    dimensions `kept_i` of the D-wide layout; its table has end_i - end_{i-1} rows and
    len(kept_i) columns (no table when nothing is kept: those ids embed to zeros). An id's
    D-wide embedding is its block row scattered into `kept_i`, zeros elsewhere. Bags are
    MEAN-pooled over the whole bag even when its ids fall in several blocks: every id gets the
    per-sample weight 1/|bag| and each block table SUM-pools (a weighted EBC), so the blocks'
    partial sums add up to the bag mean. Single ids get weight 1 (exactly their row).

    Differences from the paper:
        - The paper's export folds α into one table per field and prunes entries; we keep one
          dense table per (field, block) holding only the kept dimensions, so the saved
          parameters are real, and the tables shard with TorchRec like any other.
        - Dense (numeric) fields keep their D-wide vector (`e_f = v_f * x_f`), unpruned.

    Shapes: Features with B rows -> (B, F, D), F = num sparse + num dense, in schema order.

    Args:
        tables: the weighted EmbeddingBagCollection of the block tables, one feature per table,
            in the order of `block_keys`.
        layout: where every (field, id) falls: the field's blocks, empty ones included.
        block_keys: the KJT key of each non-empty block, in table order.
        block_key_index: (num blocks,) the position of each block's key in `block_keys`, or -1
            for a block that keeps no dimension.
        scatter_index: (sum of kept widths,) the column of the flattened (F * D) layout each
            pooled column lands in, in `block_keys` order.
        sparse_names: sparse feature names in field order.
        num_dense: number of dense features.
        dim: D.

    Example:
        >>> import pyarrow as pa
        >>> from recsys.data.schema import DatasetSchema
        >>> from recsys.embeddings.config import BlockSpec, EmbeddingConfig, MixedDimSpec
        >>> from recsys.features.batch import features_from_rows
        >>> from recsys.features.schema import fit_feature_schema
        >>> dataset = DatasetSchema.model_validate({"name": "toy", "columns": [
        ...     {"name": "item_id", "role": "categorical"},
        ...     {"name": "click", "role": "label", "task": "ctr"}]})
        >>> rows = pa.table({"item_id": ["a", "a", "b", "c"], "click": [1, 0, 1, 0]})
        >>> schema = fit_feature_schema(dataset, [rows])  # ids: 0 OOV, 1 a, 2 b, 3 c
        >>> spec = MixedDimSpec(fields={"item_id": (
        ...     BlockSpec(end=2, kept=(0, 1, 2, 3)), BlockSpec(end=4, kept=(1,)))})
        >>> config = EmbeddingConfig(variant="mixed_dim", dim=4, mixed_dim=spec)
        >>> embedding = build_mixed_dim_embedding(schema, config)
        >>> emb = embedding(features_from_rows(schema, [{"item_id": "a"}, {"item_id": "c"}]))
        >>> emb.shape, int((emb[1, 0] != 0).sum())  # "c" is in the tail block: 1 dim kept
        (torch.Size([2, 1, 4]), 1)
    """

    block_key_index: torch.Tensor
    scatter_index: torch.Tensor

    def __init__(
        self,
        tables: EmbeddingBagCollection,
        layout: BlockLayout,
        block_keys: list[str],
        block_key_index: torch.Tensor,
        scatter_index: torch.Tensor,
        sparse_names: list[str],
        num_dense: int,
        dim: int,
    ) -> None:
        super().__init__(tables, sparse_names, num_dense, dim)
        self.layout = layout
        self.block_keys = list(block_keys)
        self.register_buffer("block_key_index", block_key_index, False)
        self.register_buffer("scatter_index", scatter_index, False)

    def remap(self, features: Features) -> KeyedJaggedTensor:
        """The field-keyed KJT as a block-keyed, weighted KJT of block-local ids.

        Values keep their row order within each block key (a stable sort by key, then row);
        ids of blocks without a table are dropped, but still count in their bag's 1/|bag|.
        """
        kjt = in_field_order(features.sparse, self.sparse_names)
        batch_size = features.batch_size
        lengths = kjt.lengths()
        segment, gid, block = self.layout.locate(kjt.values(), lengths, batch_size)
        local = gid - self.layout.global_start[block]
        weights = (1.0 / lengths.clamp(min=1).to(torch.float32))[segment]
        key = self.block_key_index[block]
        kept = key >= 0
        new_segment = key[kept] * batch_size + segment[kept] % batch_size
        order = torch.argsort(new_segment, stable=True)
        new_lengths = torch.bincount(new_segment, minlength=len(self.block_keys) * batch_size)
        return KeyedJaggedTensor(
            keys=self.block_keys,
            values=local[kept][order],
            weights=weights[kept][order],
            lengths=new_lengths.to(torch.int32),
        )

    def forward(self, features: Features) -> torch.Tensor:
        batch_size = features.batch_size
        pooled = self.tables(self.remap(features)).to_dict()
        flat = torch.cat([pooled[key] for key in self.block_keys], dim=1)  # (B, sum of widths)
        num_sparse = len(self.sparse_names)
        # index_add: the blocks of one field write disjoint rows' values into shared columns
        emb = flat.new_zeros(batch_size, num_sparse * self.dim).index_add_(
            1, self.scatter_index, flat
        )
        emb = emb.view(batch_size, num_sparse, self.dim)  # (B, F_sparse, D)
        return self.append_dense(emb, features)  # (B, F, D)


def _checked_blocks(schema: FeatureSchema, spec: MixedDimSpec) -> dict[str, tuple[BlockSpec, ...]]:
    names = schema.sparse_names
    unknown = sorted(set(spec.fields) - set(names))
    if unknown:
        raise ConfigError(
            f"embedding.mixed_dim.fields: {unknown} are not sparse fields of this schema "
            f"(expected some of {names}); use a spec searched on this dataset"
        )
    for field, blocks in spec.fields.items():
        rows = schema.sparse_feature(field).num_embeddings
        if blocks[-1].end != rows:
            raise ConfigError(
                f"embedding.mixed_dim.fields.{field}: the last block ends at id {blocks[-1].end} "
                f"(expected the table's {rows} rows); the spec was searched on another "
                f"vocabulary, rerun `recsys search-dims` on this dataset"
            )
    return dict(spec.fields)


def build_mixed_dim_embedding(
    schema: FeatureSchema,
    config: EmbeddingConfig,
    device: torch.device | None = None,
    table_prefix: str = "",
) -> FieldEmbedding:
    """A `MixedDimEmbedding` for `config.mixed_dim`; fields it does not list keep one
    `config.dim`-wide table named as in the per-feature variant.

    On `device='meta'` (the trainer, which shards the tables with DMP) every kept width must be
    a multiple of 4, as TorchRec's fused table kernels require.

    Raises:
        ConfigError: the spec names an unknown field, its blocks do not cover the field's
            rows, nothing is kept anywhere, or a width cannot be sharded.
    """
    if config.mixed_dim is None:
        raise ConfigError(
            "embedding.mixed_dim is required for variant 'mixed_dim' (the block layout "
            "`recsys search-dims` writes)"
        )
    blocks_of = _checked_blocks(schema, config.mixed_dim)
    dim = config.dim
    sharded = device is not None and torch.device(device).type == "meta"
    tables: list[EmbeddingBagConfig] = []
    block_keys: list[str] = []
    key_index: list[int] = []
    scatter: list[int] = []
    ends_per_field: list[list[int]] = []
    for position, feature in enumerate(schema.sparse):
        blocks = blocks_of.get(feature.name)
        # (KJT key, table name, first id, end id, kept dims) of each block of the field
        field_blocks: list[tuple[str, str, int, int, tuple[int, ...]]]
        if blocks is None:  # not searched: one full-width block named like a per-feature table
            field_blocks = [
                (
                    feature.name,
                    table_name(feature.name, table_prefix),
                    0,
                    feature.num_embeddings,
                    tuple(range(dim)),
                )
            ]
        else:
            starts = [0, *(b.end for b in blocks[:-1])]
            field_blocks = [
                (
                    block_feature_name(feature.name, i),
                    block_table_name(feature.name, i, table_prefix),
                    start,
                    b.end,
                    b.kept,
                )
                for i, (start, b) in enumerate(zip(starts, blocks, strict=True))
            ]
        ends_per_field.append([end for _, _, _, end, _ in field_blocks])
        for key, name, start, end, kept in field_blocks:
            if not kept:
                key_index.append(-1)
                continue
            if sharded and len(kept) % SHARDED_WIDTH_MULTIPLE:
                raise ConfigError(
                    f"embedding.mixed_dim.fields.{feature.name}: table {name} keeps {len(kept)} "
                    f"dims (expected a multiple of {SHARDED_WIDTH_MULTIPLE} for the sharded "
                    f"trainer's fused kernels); search with search.width_multiple=4"
                )
            key_index.append(len(block_keys))
            block_keys.append(key)
            scatter.extend(position * dim + d for d in kept)
            tables.append(
                EmbeddingBagConfig(
                    num_embeddings=end - start,
                    embedding_dim=len(kept),
                    name=name,
                    feature_names=[key],
                    # SUM of 1/|bag|-weighted rows: the bag mean, summed across blocks
                    pooling=PoolingType.SUM,
                    weight_init_min=-config.init_scale,
                    weight_init_max=config.init_scale,
                )
            )
    if not tables:
        raise ConfigError(
            "embedding.mixed_dim: no block of any field keeps a dimension (expected at least "
            "one non-empty `kept`); prune to a larger parameter budget"
        )
    ebc = EmbeddingBagCollection(tables=tables, is_weighted=True, device=device)
    layout = BlockLayout([f.num_embeddings for f in schema.sparse], ends_per_field)
    return MixedDimEmbedding(
        ebc,
        layout,
        block_keys,
        torch.tensor(key_index, dtype=torch.int64),
        torch.tensor(scatter, dtype=torch.int64),
        schema.sparse_names,
        len(schema.dense),
        dim,
    )


def table_param_count(module: nn.Module) -> int:
    """Embedding-table parameters of a module: rows x width summed over the tables of every
    (unsharded) EmbeddingBagCollection in it; works on the meta device too. Other parameters
    of an embedding (dense-feature vectors, low-rank projections) are not counted."""
    return sum(
        table.num_embeddings * table.embedding_dim
        for ebc in module.modules()
        if isinstance(ebc, EmbeddingBagCollection)
        for table in ebc.embedding_bag_configs()
    )


def embedding_param_count(schema: FeatureSchema, config: EmbeddingConfig) -> int:
    """Table parameters of the embedding `config` builds for `schema` (any variant), counted on
    the meta device, so nothing is allocated."""
    from recsys.embeddings.per_feature import build_embedding

    return table_param_count(build_embedding(schema, config, device=torch.device("meta")))
