"""The `lowrank` embedding variant: k_f-wide code tables plus a per-field affine map to D."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from recsys.data.movielens import ML100K_CTR_SCHEMA
from recsys.embeddings import EmbeddingConfig, build_embedding
from recsys.embeddings.config import LowRankSpec
from recsys.embeddings.lowrank import LowRankFieldEmbedding, build_lowrank_embedding
from recsys.errors import ConfigError
from recsys.features.batch import Features, features_from_encoded
from recsys.features.schema import FeatureSchema, fit_feature_schema
from tests.tiny_data import make_tiny_table

DIM = 8


@pytest.fixture(scope="module")
def schema() -> FeatureSchema:
    return fit_feature_schema(ML100K_CTR_SCHEMA, [make_tiny_table(num_rows=300)])


@pytest.fixture(scope="module")
def features(schema: FeatureSchema) -> Features:
    table: pa.Table = make_tiny_table(num_rows=64, seed=3)
    return features_from_encoded(schema, schema.encode(table))


def _config(ranks: dict[str, int]) -> EmbeddingConfig:
    return EmbeddingConfig(variant="lowrank", dim=DIM, lowrank=LowRankSpec(ranks=ranks))


def test_dispatch_builds_k_wide_tables_and_full_width_for_unlisted_fields(
    schema: FeatureSchema, features: Features
) -> None:
    ranks = {"user_id": 2, "genres": 3}
    embedding = build_embedding(schema, _config(ranks))
    assert isinstance(embedding, LowRankFieldEmbedding)
    widths = {c.feature_names[0]: c.embedding_dim for c in embedding.tables.embedding_bag_configs()}
    assert widths == {name: ranks.get(name, DIM) for name in schema.sparse_names}
    assert [p.shape for p in embedding.projections] == [(DIM, 2), (DIM, 3)]  # schema order
    out = embedding(features)
    assert out.shape == (features.batch_size, schema.num_fields, DIM)
    assert embedding.dim == DIM and embedding.num_fields == schema.num_fields


def test_full_rank_codes_reproduce_the_per_feature_embedding(
    schema: FeatureSchema, features: Features
) -> None:
    """codes = (E - mu) U with an orthogonal U (k = D) gives back E for every field, the
    MEAN-pooled genres bag included (pooling commutes with the affine map)."""
    torch.manual_seed(0)
    dense = build_embedding(schema, EmbeddingConfig(dim=DIM))
    ranks = {name: DIM for name in schema.sparse_names if name != "gender"}
    lowrank = build_embedding(schema, _config(ranks))
    assert isinstance(lowrank, LowRankFieldEmbedding)
    old, new = dense.state_dict(), lowrank.state_dict()
    with torch.no_grad():
        for key in new:
            if key in old and new[key].shape == old[key].shape:
                new[key] = old[key].clone()
        for slot, name in enumerate(lowrank.lowrank_names):
            basis, _ = torch.linalg.qr(torch.randn(DIM, DIM))
            mean = torch.randn(DIM)
            key = f"tables.embedding_bags.t_{name}.weight"
            new[key] = (old[key] - mean) @ basis
            new[f"projections.{slot}"] = basis
            new[f"means.{slot}"] = mean
    lowrank.load_state_dict(new)
    expected, got = dense(features), lowrank(features)
    assert (got - expected).abs().max() < 1e-5
    # and the codes really are different numbers from the rows they encode
    assert not torch.allclose(
        lowrank.tables.embedding_bags["t_user_id"].weight,
        dense.tables.embedding_bags["t_user_id"].weight,
    )


def test_builds_on_meta_with_only_the_tables_on_meta(schema: FeatureSchema) -> None:
    embedding = build_lowrank_embedding(
        schema, _config({"user_id": 3, "item_id": 2}), device=torch.device("meta")
    )
    assert isinstance(embedding, LowRankFieldEmbedding)
    for name, param in embedding.named_parameters():
        if name.startswith("tables."):
            assert param.is_meta, name
        else:
            assert param.device.type == "cpu" and torch.isfinite(param).all(), name
    # a fresh projection has orthonormal columns, so it neither shrinks nor blows up codes
    basis = embedding.projections[0].detach()
    torch.testing.assert_close(basis.T @ basis, torch.eye(3), atol=1e-5, rtol=0)


def test_projection_and_mean_receive_gradients(schema: FeatureSchema, features: Features) -> None:
    embedding = build_embedding(schema, _config({"item_id": 2}))
    embedding(features).square().sum().backward()
    assert isinstance(embedding, LowRankFieldEmbedding)
    assert embedding.projections[0].grad is not None
    assert embedding.projections[0].grad.abs().sum() > 0
    assert embedding.means[0].grad is not None and embedding.means[0].grad.abs().sum() > 0


def test_unknown_field_is_a_config_error_naming_it(schema: FeatureSchema) -> None:
    with pytest.raises(ConfigError, match="not_a_field"):
        build_embedding(schema, _config({"not_a_field": 2}))


def test_rank_above_dim_is_rejected_by_the_config() -> None:
    with pytest.raises(ValueError, match=r"embedding\.lowrank\.ranks\.user_id=9 exceeds dim=8"):
        _config({"user_id": 9})
