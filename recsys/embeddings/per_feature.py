"""Per-feature TorchRec embedding tables: one EmbeddingBagConfig per sparse feature.

Features -> FieldEmbedding -> field embeddings (B, F, D). The TorchRec EmbeddingBagCollection
inside is what `DistributedModelParallel` shards; the model only sees the (B, F, D) tensor, so
other variants (unified, mixed-dimension, low-rank) can be injected in its place.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recsys.embeddings.config import EmbeddingConfig
from recsys.features.batch import Features
from recsys.features.schema import FeatureSchema


def table_name(feature: str, prefix: str = "") -> str:
    return f"{prefix}t_{feature}"


class FieldEmbedding(nn.Module):
    """Embeds every field of a row: sparse features through TorchRec tables, dense features as
    a learned vector scaled by the value (`e_f = v_f * x_f`, AutoInt's numeric embedding).

    Bags (multi-categorical) are MEAN-pooled, single ids SUM-pooled (one id, so the row).

    Shapes: Features with B rows -> (B, F, D), F = num sparse + num dense, in schema order.

    Args:
        tables: the EmbeddingBagCollection, one feature per table.
        sparse_names: sparse feature names in field order.
        num_dense: number of dense features.
        dim: D.
    """

    def __init__(
        self, tables: EmbeddingBagCollection, sparse_names: list[str], num_dense: int, dim: int
    ) -> None:
        super().__init__()
        self.tables = tables
        self.sparse_names = list(sparse_names)
        self.dim = dim
        self.num_dense = num_dense
        # only registered when there are dense fields: an empty parameter would never get a
        # gradient, which DDP's static graph reports as an unused parameter.
        self.dense_vectors = nn.Parameter(torch.randn(num_dense, dim) * 0.01) if num_dense else None

    @property
    def num_fields(self) -> int:
        return len(self.sparse_names) + self.num_dense

    def forward(self, features: Features) -> torch.Tensor:
        pooled = self.tables(features.sparse).to_dict()
        return self.stack_fields([pooled[name] for name in self.sparse_names], features)

    def stack_fields(self, sparse: list[torch.Tensor], features: Features) -> torch.Tensor:
        """The sparse fields' (B, D) vectors in field order, then the dense fields (`v_f * x_f`)
        -> (B, F, D). Every variant ends its forward here, so the layout is the same for all."""
        emb = (
            torch.stack(sparse, dim=1)
            if sparse
            else features.dense.new_zeros(features.batch_size, 0, self.dim)
        )
        return self.append_dense(emb, features)

    def append_dense(self, sparse_emb: torch.Tensor, features: Features) -> torch.Tensor:
        """(B, F_sparse, D) -> (B, F, D): the dense fields' `v_f * x_f` after the sparse ones."""
        if self.dense_vectors is None:
            return sparse_emb
        dense_emb = features.dense.unsqueeze(-1) * self.dense_vectors  # (B, F_dense, D)
        return torch.cat([sparse_emb, dense_emb], dim=1)


def build_embedding(
    schema: FeatureSchema,
    config: EmbeddingConfig,
    device: torch.device | None = None,
    table_prefix: str = "",
) -> FieldEmbedding:
    """Builds the field embedding `config.variant` names for a schema.

    `device='meta'` defers the tables' allocation to DMP (every variant creates only its
    EmbeddingBagCollection on `device`; its other parameters and buffers live on the CPU).
    `table_prefix` names the tables of a second embedding inside one model (ARM-Net+'s DNN
    has its own tables), so every table name in the model stays unique for the planner."""
    if config.variant == "per_feature":
        return build_per_feature_embedding(schema, config, device, table_prefix)
    # Imported here: each variant's module imports this one (for FieldEmbedding).
    if config.variant in ("hashed", "unified"):
        from recsys.embeddings import unified

        builder = (
            unified.build_unified_embedding
            if config.variant == "unified"
            else unified.build_hashed_embedding
        )
    elif config.variant == "mixed_dim":
        from recsys.embeddings.mixed_dim import build_mixed_dim_embedding as builder
    else:
        from recsys.embeddings.lowrank import build_lowrank_embedding as builder
    return builder(schema, config, device, table_prefix)


def build_per_feature_embedding(
    schema: FeatureSchema,
    config: EmbeddingConfig,
    device: torch.device | None = None,
    table_prefix: str = "",
) -> FieldEmbedding:
    """One table per sparse feature, `config.dim` wide, all ids exact."""
    ebc = per_feature_tables(schema, config, device, table_prefix)
    return FieldEmbedding(ebc, schema.sparse_names, len(schema.dense), config.dim)


def per_feature_tables(
    schema: FeatureSchema,
    config: EmbeddingConfig,
    device: torch.device | None = None,
    table_prefix: str = "",
    widths: dict[str, int] | None = None,
) -> EmbeddingBagCollection:
    """One exact table per sparse feature, `widths[name]` wide (default `config.dim`); bags
    MEAN-pooled, single ids SUM-pooled."""
    widths = widths or {}
    tables = [
        EmbeddingBagConfig(
            num_embeddings=f.num_embeddings,
            embedding_dim=widths.get(f.name, config.dim),
            name=table_name(f.name, table_prefix),
            feature_names=[f.name],
            pooling=PoolingType.MEAN if f.is_bag else PoolingType.SUM,
            weight_init_min=-config.init_scale,
            weight_init_max=config.init_scale,
        )
        for f in schema.sparse
    ]
    return EmbeddingBagCollection(tables=tables, device=device)
