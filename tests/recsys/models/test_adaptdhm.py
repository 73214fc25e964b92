"""AdaptDHM: the routing, its centres (buffers), the cross-rank sync and cluster usage, beyond
the contract suite. Runs on the tiny ml100k-like table (conftest.py) and on a table with three
planted groups of rows whose features differ."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError
from torch.nn import functional as F

from recsys.data.movielens import GENRES
from recsys.embeddings import EmbeddingConfig, build_embedding
from recsys.features.batch import Batch, features_from_encoded
from recsys.features.schema import FeatureSchema
from recsys.models.adaptdhm import (
    AdaptDHM,
    AdaptDHMConfig,
    _DistributionRouter,
    occupancy_entropy,
)
from tests.recsys.models import adaptdhm_dist_check
from tests.tiny_data import OCCUPATIONS, make_tiny_table, planted_click, with_ctcvr

EMBEDDING = EmbeddingConfig(dim=4)
TINY = {"num_clusters": 3, "bottom_hidden_units": (16,), "tower_hidden_units": (8,)}
DIST_SCRIPT = Path(adaptdhm_dist_check.__file__)


def _model(schema: FeatureSchema, seed: int = 0, **fields: Any) -> AdaptDHM:
    torch.manual_seed(seed)
    config = AdaptDHMConfig(**{**TINY, **fields})
    return AdaptDHM(config, build_embedding(schema, EMBEDDING), schema)


def _train(model: AdaptDHM, batches: list[Batch], steps: int, lr: float = 1e-2) -> None:
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        batch = batches[step % len(batches)]
        optimizer.zero_grad()
        model.loss(model(batch.features), batch.labels).backward()
        optimizer.step()


def _planted_groups(rows_per_group: int, seed: int = 0) -> pa.Table:
    """Three groups of rows: disjoint users and items, and one fixed value per group in every
    other field (age, gender, occupation, zip3, release year, genre); click as in tiny_data."""
    rng = np.random.default_rng(seed)
    n = rows_per_group
    parts = []
    for g in range(3):
        users = rng.integers(8 * g + 1, 8 * g + 9, n)
        items = rng.integers(13 * g + 1, 13 * g + 14, n)
        click = planted_click(users, items)
        parts.append(
            pa.table(
                {
                    "user_id": pa.array(users.astype(str).tolist()),
                    "item_id": pa.array(items.astype(str).tolist()),
                    "age": pa.array([("18", "35", "56")[g]] * n),
                    "gender": pa.array([("M", "F", "M")[g]] * n),
                    "occupation": pa.array([OCCUPATIONS[g]] * n),
                    "zip3": pa.array([("021", "554", "941")[g]] * n),
                    "release_year": pa.array([("1977", "1995", "1996")[g]] * n),
                    "genres": pa.array([[GENRES[g]]] * n, pa.list_(pa.string())),
                    "click": pa.array(click),
                    "rating": pa.array(np.where(click == 1, 5, 2).astype(np.int64)),
                    "timestamp": pa.array(np.arange(n, dtype=np.int64)),
                }
            )
        )
    return with_ctcvr(pa.concat_tables(parts))


@pytest.fixture(scope="module")
def planted(
    encode_batch: Callable[[pa.Table], Batch],
) -> tuple[Batch, list[Batch], torch.Tensor]:
    """The planted table as one batch, as shuffled mini-batches of 128, and its group ids."""
    table = _planted_groups(rows_per_group=256)
    perm = np.random.default_rng(1).permutation(table.num_rows)
    shuffled = table.take(pa.array(perm))
    batches = [encode_batch(shuffled.slice(i, 128)) for i in range(0, table.num_rows, 128)]
    groups = torch.arange(table.num_rows) // 256
    return encode_batch(table), batches, groups


# --- routing and centres ------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False])
def test_routing_coefficients_sum_to_one_and_pick_the_cluster(
    training: bool, tiny_schema: FeatureSchema, tiny_batch: Batch
) -> None:
    model = _model(tiny_schema).train(training)
    output = model(tiny_batch.features)
    routing, cluster = output.extras["routing"], output.extras["cluster"]
    assert routing.shape == (tiny_batch.batch_size, 3)
    assert (routing >= 0).all()
    torch.testing.assert_close(routing.sum(dim=-1), torch.ones(tiny_batch.batch_size))
    assert torch.equal(cluster, routing.argmax(dim=-1))


def test_centres_stay_unit_norm_and_move_in_training_only(
    tiny_schema: FeatureSchema, tiny_batch: Batch
) -> None:
    model = _model(tiny_schema)
    initial = model.router.centres.clone()
    _train(model, [tiny_batch], steps=3)
    trained = model.router.centres.clone()
    assert not torch.allclose(trained, initial)
    torch.testing.assert_close(trained.norm(dim=-1), torch.ones(3))
    occupancy = model.router.occupancy.clone()
    model.eval()
    with torch.no_grad():
        model(tiny_batch.features)
    assert torch.equal(model.router.centres, trained)
    assert torch.equal(model.router.occupancy, occupancy)


def test_training_routes_a_row_on_what_eval_sees_despite_dropout(
    tiny_schema: FeatureSchema, tiny_batch: Batch
) -> None:
    # routed on dropped-out features, a third of the rows went to another cluster in training
    # than in eval (dropout 0.3), and the centres learned from noisy points
    model = _model(tiny_schema, dropout=0.3, bottom_hidden_units=(16, 16))
    seen: list[torch.Tensor] = []
    model.router.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    torch.manual_seed(1)
    model.train()(tiny_batch.features)
    with torch.no_grad():
        model.eval()(tiny_batch.features)
    torch.testing.assert_close(seen[0], seen[1])
    model.train()
    hidden = model.bottom(model.embedding(tiny_batch.features).flatten(start_dim=1))
    assert not torch.allclose(F.normalize(hidden.detach(), dim=-1), seen[0])  # dropout is on


def test_centres_are_buffers_that_survive_a_state_dict_round_trip(
    tiny_schema: FeatureSchema, tiny_batch: Batch, tmp_path: Path
) -> None:
    model = _model(tiny_schema)
    _train(model, [tiny_batch], steps=5)
    assert {"router.centres", "router.occupancy"} <= set(model.state_dict())
    assert "router.centres" not in dict(model.named_parameters())
    torch.save(model.state_dict(), tmp_path / "state.pt")
    restored = _model(tiny_schema, seed=1)
    assert not torch.allclose(restored.router.centres, model.router.centres)
    restored.load_state_dict(torch.load(tmp_path / "state.pt"))
    assert torch.equal(restored.router.centres, model.router.centres)
    assert torch.equal(restored.router.occupancy, model.router.occupancy)
    with torch.no_grad():
        expected = model.eval()(tiny_batch.features)
        got = restored.eval()(tiny_batch.features)
    torch.testing.assert_close(got.logits["ctr"], expected.logits["ctr"], rtol=0, atol=0)
    assert torch.equal(got.extras["cluster"], expected.extras["cluster"])


def test_buffers_follow_to(tiny_schema: FeatureSchema) -> None:
    model = _model(tiny_schema).to(torch.float64)
    assert model.router.centres.dtype == torch.float64
    assert model.router.occupancy.dtype == torch.float64


# --- every cluster in use -----------------------------------------------------------------------
def test_first_training_batch_gives_every_tower_rows_and_gradient(
    tiny_schema: FeatureSchema, tiny_batch: Batch
) -> None:
    model = _model(tiny_schema).train()
    output = model(tiny_batch.features)
    assert (torch.bincount(output.extras["cluster"], minlength=3) > 0).all()
    model.loss(output, tiny_batch.labels).backward()
    for layer, weight in enumerate(model.towers.cluster_weights):
        assert weight.grad is not None
        per_cluster = weight.grad.abs().flatten(start_dim=1).sum(dim=-1)
        assert (per_cluster > 0).all(), f"layer {layer}: a tower without gradient {per_cluster}"


@pytest.mark.parametrize("min_occupancy", [0.05, 0.0])
def test_a_collapsed_cluster_is_reseeded_only_when_enabled(
    min_occupancy: float, tiny_schema: FeatureSchema, tiny_batch: Batch
) -> None:
    model = _model(tiny_schema, min_occupancy=min_occupancy)
    _train(model, [tiny_batch], steps=3)
    # collapse cluster 2 onto cluster 0: argmax ties go to cluster 0, so 2 gets no rows
    with torch.no_grad():
        model.router.centres[2] = model.router.centres[0]
        model.router.occupancy.copy_(torch.tensor([0.6, 0.4, 0.0]))
    cluster = model.train()(tiny_batch.features).extras["cluster"]
    count = int((cluster == 2).sum())
    assert (count > 0) == (min_occupancy > 0), count
    if min_occupancy > 0:
        assert model.router.occupancy[2] > min_occupancy  # the grace share, then this batch's


def test_planted_groups_keep_every_cluster_in_use(
    tiny_schema: FeatureSchema, planted: tuple[Batch, list[Batch], torch.Tensor]
) -> None:
    full, batches, _ = planted
    model = _model(tiny_schema)
    _train(model, batches, steps=30)
    with torch.no_grad():
        clusters = model.eval()(full.features).extras["cluster"]
    assert occupancy_entropy(clusters, 3) >= 0.5


def test_embedding_routing_recovers_planted_groups(
    tiny_schema: FeatureSchema, planted: tuple[Batch, list[Batch], torch.Tensor]
) -> None:
    """Routing alone (training forwards, no weight update) on the raw embeddings, where the
    groups differ in six of eight fields, puts each group in its own cluster."""
    full, batches, groups = planted
    model = _model(tiny_schema, routing_input="embedding").train()
    with torch.no_grad():
        for batch in batches:
            model(batch.features)
        clusters = model.eval()(full.features).extras["cluster"]
    table = torch.zeros(3, 3, dtype=torch.long)
    table.index_put_((groups, clusters), torch.ones_like(clusters), accumulate=True)
    assert (table.amax(dim=1) == 256).all(), table  # each group in one cluster
    assert len(set(table.argmax(dim=1).tolist())) == 3, table  # and no two share one


# --- K = 1 and the entropy helper ---------------------------------------------------------------
def test_one_cluster_is_a_product_weight_mlp(tiny_schema: FeatureSchema, tiny_batch: Batch) -> None:
    model = _model(tiny_schema, num_clusters=1, tower_hidden_units=(8, 4))
    _train(model, [tiny_batch], steps=3)  # moves the cluster weights away from ones
    model.eval()
    with torch.no_grad():
        output = model(tiny_batch.features)
        hidden = model.bottom(model.embedding(tiny_batch.features).flatten(start_dim=1))
        towers = model.towers
        num_layers = len(towers.shared_weights)
        for layer in range(num_layers):
            weight = towers.shared_weights[layer] * towers.cluster_weights[layer][0]
            bias = towers.shared_biases[layer] + towers.cluster_biases[layer][0]
            hidden = F.linear(hidden, weight, bias)
            if layer < num_layers - 1:
                hidden = torch.relu(hidden)
    assert not torch.equal(towers.cluster_weights[0][0], torch.ones_like(towers.shared_weights[0]))
    assert (output.extras["cluster"] == 0).all()
    torch.testing.assert_close(output.extras["routing"], torch.ones(tiny_batch.batch_size, 1))
    torch.testing.assert_close(output.logits["ctr"], hidden.squeeze(-1), rtol=1e-5, atol=1e-6)


def test_occupancy_entropy_is_normalised() -> None:
    assert occupancy_entropy(torch.tensor([0, 1, 2, 3]), 4) == pytest.approx(1.0)
    assert occupancy_entropy(torch.tensor([2, 2, 2]), 4) == 0.0
    # two of four clusters in equal use: log 2 / log 4
    assert occupancy_entropy(torch.tensor([0, 3, 0, 3]), 4) == pytest.approx(0.5)
    assert occupancy_entropy(torch.tensor([0, 0]), 1) == 1.0


def test_config_rejects_an_occupancy_floor_at_or_above_uniform() -> None:
    with pytest.raises(ValidationError, match=r"min_occupancy=0.25 must be below 1/num_clusters"):
        AdaptDHMConfig(num_clusters=4, min_occupancy=0.25)


# --- two ranks ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_ranks(
    tiny_schema: FeatureSchema, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[dict[str, dict[str, torch.Tensor]]]]:
    out = tmp_path_factory.mktemp("adaptdhm_dist")
    tiny_schema.save(out / "features")
    rows = adaptdhm_dist_check.STEPS * adaptdhm_dist_check.BATCH
    # different distributions on the two ranks: other user attributes and other groups
    pq.write_table(with_ctcvr(make_tiny_table(num_rows=rows, seed=1)), out / "rank0.parquet")
    pq.write_table(
        _planted_groups(rows_per_group=rows // 3 + 1).slice(0, rows), out / "rank1.parquet"
    )
    subprocess.run(
        [sys.executable, str(DIST_SCRIPT), str(out)],
        check=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[3],
    )
    return out, [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _single_process_centres(
    schema: FeatureSchema, tables: list[pa.Table], fields: dict[str, Any]
) -> torch.Tensor:
    """The dist script's forwards in one process, each step's batch = the given tables' rows."""
    model = _model(schema, **{**adaptdhm_dist_check.TINY, **fields}).train()
    size = adaptdhm_dist_check.BATCH
    with torch.no_grad():
        for step in range(adaptdhm_dist_check.STEPS):
            rows = pa.concat_tables([t.slice(step * size, size) for t in tables])
            model(features_from_encoded(schema, rows))
    return model.router.centres


@pytest.mark.parametrize("case", sorted(adaptdhm_dist_check.CASES))
def test_ranks_keep_identical_centres_shaped_by_both_ranks_rows(
    case: str,
    tiny_schema: FeatureSchema,
    two_ranks: tuple[Path, list[dict[str, dict[str, torch.Tensor]]]],
) -> None:
    out, records = two_ranks
    rank0, rank1 = records[0][case], records[1][case]
    for name in ("centres", "occupancy"):
        torch.testing.assert_close(rank1[name], rank0[name], rtol=0, atol=0, msg=name)
    tables = [tiny_schema.encode(pq.read_table(out / f"rank{r}.parquet")) for r in range(2)]
    fields = adaptdhm_dist_check.CASES[case]
    # the all-reduced update equals one process routing both ranks' rows as one batch ...
    both = _single_process_centres(tiny_schema, tables, fields)
    torch.testing.assert_close(rank0["centres"], both, rtol=1e-4, atol=1e-5)
    # ... and differs from what either rank's rows alone would give
    for alone in ([tables[0]], [tables[1]]):
        assert not torch.allclose(
            rank0["centres"], _single_process_centres(tiny_schema, alone, fields), atol=1e-3
        )


def test_merged_centres_are_separated_by_reseeding() -> None:
    """Two equal centres would split their rows by rounding noise: the less occupied one is
    re-seeded to the batch row farthest from the kept centres."""
    config = AdaptDHMConfig(num_clusters=3, routing_iterations=1)
    router = _DistributionRouter(config, 4)
    with torch.no_grad():
        router.centres.copy_(
            torch.nn.functional.normalize(
                torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1e-4, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]),
                dim=-1,
            )
        )
        router.occupancy.copy_(torch.tensor([0.5, 0.2, 0.3]))
    points = torch.nn.functional.normalize(torch.randn(64, 4).abs(), dim=-1)
    assert bool(router._merged()[1]) and not bool(router._merged()[0])
    router.train()(points)
    similarity = router.centres @ router.centres.T
    assert float(similarity[0, 1]) < config.max_centre_similarity
    assert not bool(router._merged().any())
