"""Low-rank field embeddings (`variant: lowrank`): tables of k_f-wide codes plus a per-field
affine map back to the model's width.

Features -> EBC lookup of codes (B, k_f) per field -> `codes @ U_f^T + mu_f` (B, D) -> stacked
(B, F, D), so a model cannot tell this stack from the per-feature one. `recsys compress`
(recsys/compression/lowrank.py) writes this variant: U_f holds the top-k_f principal directions
of field f's trained embeddings and mu_f their data-weighted mean (METHODS.md §8(b), the table
step). The projection is kept per field instead of being merged into the next layer because
attention, not a linear layer, consumes the embedding in AutoInt (§8(b) step 4).
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recsys.embeddings.config import EmbeddingConfig
from recsys.embeddings.per_feature import FieldEmbedding, per_feature_tables
from recsys.errors import ConfigError
from recsys.features.batch import Features
from recsys.features.schema import FeatureSchema


class LowRankFieldEmbedding(FieldEmbedding):
    """Field embedding whose tables store k_f-wide codes, mapped back to width D per field.

    Field f with a rank: `e_f = U_f c_f + mu_f`, with c_f the pooled code row (B, k_f),
    U_f (D, k_f) and mu_f (D,). Fields without a rank keep a D-wide table used as is. Pooling
    commutes with the affine map (MEAN of `U c_i + mu` is `U mean(c_i) + mu`), so a bag's
    output equals the map of its pooled codes.

    Paper: Yu et al., "Unified Low-rank Compression Framework for Click-through Rate
    Prediction" (Atomic Feature Mimicking), KDD 2024 ADS, arXiv:2405.18146.

    Differences from the paper:
        - The official DeepFM_EMB applies one einsum over all fields with a shared bias tensor;
          here each field has its own (U_f, mu_f) and its own rank, and fields may stay full
          width.
        - U_f and mu_f are trainable parameters (fine-tuned with the dense part), not buffers.

    Shapes: Features with B rows -> (B, F, D), F = num sparse + num dense, in schema order.

    Args:
        tables: the EmbeddingBagCollection; table of field f is k_f wide (D for a full field).
        sparse_names: sparse feature names in field order.
        num_dense: number of dense features.
        dim: D, the width the model sees.
        ranks: field name -> k_f for the factorised fields (each 1 <= k_f <= D).

    Example:
        >>> import pyarrow as pa
        >>> from recsys.data.schema import DatasetSchema
        >>> from recsys.embeddings.config import EmbeddingConfig, LowRankSpec
        >>> from recsys.features.batch import features_from_rows
        >>> from recsys.features.schema import fit_feature_schema
        >>> dataset = DatasetSchema.model_validate({"name": "toy", "columns": [
        ...     {"name": "user_id", "role": "categorical"},
        ...     {"name": "click", "role": "label"}]})
        >>> schema = fit_feature_schema(dataset, [pa.table({"user_id": ["a"], "click": [1]})])
        >>> config = EmbeddingConfig(variant="lowrank", dim=8,
        ...                          lowrank=LowRankSpec(ranks={"user_id": 2}))
        >>> embedding = build_lowrank_embedding(schema, config)
        >>> embedding(features_from_rows(schema, [{"user_id": "a"}])).shape
        torch.Size([1, 1, 8])
    """

    def __init__(
        self,
        tables: EmbeddingBagCollection,
        sparse_names: list[str],
        num_dense: int,
        dim: int,
        ranks: dict[str, int],
    ) -> None:
        super().__init__(tables, sparse_names, num_dense, dim)
        # schema order, so parameter i always belongs to the same field whatever the dict order
        self.lowrank_names = [name for name in sparse_names if name in ranks]
        self.ranks = {name: ranks[name] for name in self.lowrank_names}
        self._slot = {name: i for i, name in enumerate(self.lowrank_names)}
        # A ParameterList, not a ParameterDict: feature names may hold characters (dots) that
        # are not valid module keys. Real CPU values even when the tables are on meta.
        self.projections = nn.ParameterList(
            nn.Parameter(_orthonormal_columns(dim, ranks[name])) for name in self.lowrank_names
        )
        self.means = nn.ParameterList(nn.Parameter(torch.zeros(dim)) for _ in self.lowrank_names)

    def forward(self, features: Features) -> torch.Tensor:
        pooled = self.tables(features.sparse).to_dict()
        fields = []
        for name in self.sparse_names:
            slot = self._slot.get(name)
            if slot is None:
                fields.append(pooled[name])  # (B, D)
            else:
                codes = pooled[name]  # (B, k_f)
                fields.append(codes @ self.projections[slot].T + self.means[slot])  # (B, D)
        return self.stack_fields(fields, features)  # (B, F, D)


def _orthonormal_columns(dim: int, rank: int) -> torch.Tensor:
    """A random (dim, rank) matrix with orthonormal columns: a fresh lowrank stack (trained
    from scratch rather than written by `recsys compress`) starts as a rotation of its codes."""
    q, _ = torch.linalg.qr(torch.randn(dim, rank))
    return q.contiguous()


def build_lowrank_embedding(
    schema: FeatureSchema,
    config: EmbeddingConfig,
    device: torch.device | None = None,
    table_prefix: str = "",
) -> FieldEmbedding:
    """Per-field tables, k_f wide for the fields in `config.lowrank.ranks`, D wide otherwise.

    Only the EmbeddingBagCollection goes on `device` (DMP shards a meta one); U_f and mu_f
    are created on the CPU. Table names are those of the per-feature stack, so a compressed
    artifact keeps its tables' names.

    Raises:
        ConfigError: `config.lowrank` is missing or names a field the schema does not embed.
    """
    if config.lowrank is None:
        raise ConfigError(
            "embedding.lowrank: missing for variant 'lowrank' (expected the per-field ranks); "
            "set embedding.lowrank.ranks or use `recsys compress`"
        )
    ranks = dict(config.lowrank.ranks)
    unknown = sorted(set(ranks) - set(schema.sparse_names))
    if unknown:
        raise ConfigError(
            f"embedding.lowrank.ranks: unknown field(s) {unknown} (expected sparse features "
            f"of the schema: {schema.sparse_names}); remove them or fix the names"
        )
    ebc = per_feature_tables(schema, config, device, table_prefix, widths=ranks)
    return LowRankFieldEmbedding(ebc, schema.sparse_names, len(schema.dense), config.dim, ranks)
