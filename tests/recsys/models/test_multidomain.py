"""The multi-domain baselines: PerDomainTowers scores each row with its own domain's tower (and
only that tower learns from it); SharedBottom ignores the domain id."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pyarrow as pa
import pytest
import torch

from recsys.embeddings import EmbeddingConfig, build_embedding
from recsys.errors import ConfigError
from recsys.features.batch import Batch, Features
from recsys.features.schema import FeatureSchema, fit_feature_schema
from recsys.models.multidomain import (
    PerDomainTowers,
    PerDomainTowersConfig,
    SharedBottom,
    SharedBottomConfig,
)
from tests.tiny_data import TINY_MULTITASK_SCHEMA

EMBEDDING = EmbeddingConfig(dim=4)
TINY = {"bottom_hidden_units": (16,), "tower_hidden_units": (8,)}


def _per_domain(schema: FeatureSchema) -> PerDomainTowers:
    torch.manual_seed(0)
    return PerDomainTowers(
        PerDomainTowersConfig(**TINY), build_embedding(schema, EMBEDDING), schema
    )


def _with_domain(features: Features, domain: torch.Tensor) -> Features:
    return dataclasses.replace(features, domain=domain)


def test_one_tower_per_domain_id_including_unseen(tiny_schema: FeatureSchema) -> None:
    model = _per_domain(tiny_schema)
    assert tiny_schema.num_domains > 2
    for weight in model.towers.weights:
        assert weight.shape[0] == tiny_schema.num_domains


def test_per_domain_towers_require_a_domain_column(tiny_table: pa.Table) -> None:
    dataset = TINY_MULTITASK_SCHEMA.model_copy(update={"domain": None})
    schema = fit_feature_schema(dataset, [tiny_table])
    with pytest.raises(ConfigError, match="needs a domain column"):
        _per_domain(schema)


def test_changing_a_rows_domain_changes_only_its_score(
    tiny_schema: FeatureSchema, tiny_batch: Batch
) -> None:
    model = _per_domain(tiny_schema).eval()
    domain = tiny_batch.features.domain
    assert domain is not None
    moved = domain.clone()
    moved[0] = (domain[0] + 1) % tiny_schema.num_domains
    with torch.no_grad():
        before = model(tiny_batch.features).logits["ctr"]
        after = model(_with_domain(tiny_batch.features, moved)).logits["ctr"]
    assert after[0] != before[0]
    torch.testing.assert_close(after[1:], before[1:], rtol=0, atol=0)


def test_a_domain_tower_learns_only_from_its_own_rows(
    tiny_schema: FeatureSchema,
    tiny_table: pa.Table,
    encode_batch: Callable[[pa.Table], Batch],
    tiny_batch: Batch,
) -> None:
    domain = tiny_batch.features.domain
    assert domain is not None
    excluded = int(domain[0])
    others = torch.nonzero(domain != excluded).squeeze(-1)
    batch = encode_batch(tiny_table.take(pa.array(others.numpy())))
    model = _per_domain(tiny_schema).train()
    model.loss(model(batch.features), batch.labels).backward()
    present = torch.unique(batch.features.domain)
    for params in (model.towers.weights, model.towers.biases):
        for layer, param in enumerate(params):
            assert param.grad is not None
            per_tower = param.grad.abs().flatten(start_dim=1).sum(dim=-1)
            assert per_tower[excluded] == 0, f"layer {layer}: domain {excluded} got a gradient"
            assert (per_tower[present] > 0).all(), f"layer {layer}: {per_tower[present]}"


def test_shared_bottom_ignores_the_domain_id(tiny_schema: FeatureSchema, tiny_batch: Batch) -> None:
    torch.manual_seed(0)
    config = SharedBottomConfig(**TINY)
    model = SharedBottom(config, build_embedding(tiny_schema, EMBEDDING), tiny_schema).eval()
    domain = tiny_batch.features.domain
    assert domain is not None
    with torch.no_grad():
        before = model(tiny_batch.features).logits["ctr"]
        after = model(_with_domain(tiny_batch.features, torch.zeros_like(domain))).logits["ctr"]
    torch.testing.assert_close(after, before, rtol=0, atol=0)
