"""DNIS search core (METHODS.md §7(g)): frequency blocks, the soft selection layer (α = 1 is
the per-feature model; α scales each looked-up row by its block's α), the two alternating
steps touch only their own parameters, α stays in [0, 1] with per-block gradient
normalisation, pruning keeps exactly what it should, and a whole small search yields a spec the
mixed-dim embedding builds."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest
import torch

from recsys.data.movielens import ML100K_CTR_SCHEMA
from recsys.embeddings import EmbeddingConfig, build_embedding
from recsys.embeddings.mixed_dim import embedding_param_count, table_param_count
from recsys.errors import ConfigError
from recsys.features.batch import Batch, batch_from_encoded
from recsys.features.schema import FeatureSchema, fit_feature_schema
from recsys.models.autoint import AutoIntConfig
from recsys.models.outputs import CTRModel
from recsys.models.registry import build_model
from recsys.search.dnis import (
    DNISConfig,
    SearchData,
    SoftSelectionEmbedding,
    alpha_step,
    build_search_model,
    embedding_optimizer,
    folded_state,
    frequency_blocks,
    masked_param_count,
    prune_by_threshold,
    prune_to_budget,
    run_search,
    spec_from_mask,
    train_step,
    update_alpha,
)
from tests.tiny_data import make_tiny_table
from training.config import load_config

DIM = 8
FRACTIONS = (0.1, 0.2, 0.2, 0.2, 0.3)
TINY_AUTOINT = AutoIntConfig(num_layers=2, num_heads=2, attention_dim=8, attention_dropout=0.2)
EMBEDDING = EmbeddingConfig(dim=DIM)


@pytest.fixture(scope="module")
def schema() -> FeatureSchema:
    return fit_feature_schema(ML100K_CTR_SCHEMA, [make_tiny_table()])


@pytest.fixture(scope="module")
def batch(schema: FeatureSchema) -> Batch:
    return batch_from_encoded(schema, schema.encode(make_tiny_table(num_rows=256, seed=3)))


def _search_model(schema: FeatureSchema, config: DNISConfig | None = None) -> CTRModel:
    torch.manual_seed(0)
    return build_search_model(TINY_AUTOINT, schema, EMBEDDING, config or DNISConfig())


def _embedding(model: CTRModel) -> SoftSelectionEmbedding:
    embedding = model.embedding
    assert isinstance(embedding, SoftSelectionEmbedding)
    return embedding


# --- blocks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 3, 5, 6, 22, 62, 944, 1661])
def test_frequency_blocks_cover_the_ids_in_order(rows: int) -> None:
    ends = frequency_blocks(rows, FRACTIONS)
    assert len(ends) == min(len(FRACTIONS), rows)  # fewer blocks for tiny fields
    assert ends[-1] == rows
    sizes = np.diff([0, *ends])
    assert (sizes >= 1).all()  # at least one id per block
    if rows >= 100:  # boundaries at the cumulative fractions
        np.testing.assert_allclose(np.array(ends) / rows, np.cumsum(FRACTIONS), atol=1 / rows)


def test_unequal_fractions_put_the_small_block_at_the_head() -> None:
    assert frequency_blocks(100, (0.1, 0.9)) == [10, 100]
    assert frequency_blocks(100, (0.9, 0.1)) == [90, 100]


def test_blocks_follow_train_frequency(schema: FeatureSchema) -> None:
    # item "hot" is by far the most frequent, "cold" seen once: frequency-ordered ids put them
    # in the head and the tail block, whatever their values' order
    items = ["hot"] * 40 + [f"m{i:02d}" for i in range(30) for _ in range(2)] + ["cold"]
    table = make_tiny_table(num_rows=len(items), seed=4).set_column(
        1, "item_id", pa.array(items, pa.string())
    )
    fitted = fit_feature_schema(ML100K_CTR_SCHEMA, [table])
    model = build_search_model(TINY_AUTOINT, fitted, EMBEDDING, DNISConfig())
    embedding = _embedding(model)
    rows = batch_from_encoded(fitted, fitted.encode(table.take([0, len(items) - 1])))
    kjt = rows.features.sparse
    segment, _, block = embedding.layout.locate(kjt.values(), kjt.lengths(), 2)
    field = fitted.sparse_names.index("item_id")
    item_blocks = block[segment // 2 == field].tolist()
    field_blocks = (embedding.layout.block_field == field).nonzero().flatten().tolist()
    assert len(field_blocks) == len(FRACTIONS)
    assert item_blocks == [field_blocks[0], field_blocks[-1]]  # hot: head, cold: tail


def test_boundary_ids_fall_in_the_blocks_their_ends_say(schema: FeatureSchema) -> None:
    embedding = _embedding(_search_model(schema))
    field = schema.sparse_names.index("item_id")
    ends = embedding.block_ends[field]
    ids = torch.tensor([0, ends[0] - 1, ends[0], ends[1] - 1, ends[-1] - 1])
    lengths = torch.zeros(len(schema.sparse_names) * len(ids), dtype=torch.int32)
    lengths[field * len(ids) : (field + 1) * len(ids)] = 1
    _, _, block = embedding.layout.locate(ids, lengths, len(ids))
    first = int((embedding.layout.block_field == field).nonzero()[0])
    assert (block - first).tolist() == [0, 0, 1, 1, len(ends) - 1]


# --- the soft selection layer -----------------------------------------------------------------
def test_alpha_one_reproduces_the_per_feature_autoint(schema: FeatureSchema, batch: Batch) -> None:
    torch.manual_seed(0)
    plain = build_model(TINY_AUTOINT, build_embedding(schema, EMBEDDING), schema).eval()
    search = _search_model(schema).eval()
    missing, unexpected = search.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["embedding.alpha"] and not unexpected  # same weights, α = 1
    with torch.no_grad():
        expected = plain(batch.features).logits["ctr"]
        got = search(batch.features).logits["ctr"]
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        _embedding(search).alpha[schema.sparse_names.index("genres"), 0, 0] = 0.5
        assert not torch.allclose(search(batch.features).logits["ctr"], expected)


def test_alpha_scales_each_row_by_its_block_before_pooling(
    schema: FeatureSchema, batch: Batch
) -> None:
    embedding = _embedding(_search_model(schema))
    with torch.no_grad():
        embedding.alpha.uniform_(0.0, 1.0)
        got = embedding(batch.features)
    # naive reference: look every id up, scale by its block's α, average the bag
    expected = torch.zeros_like(got)
    sparse = batch.features.sparse.to_dict()
    for f, name in enumerate(schema.sparse_names):
        weight = embedding.tables.embedding_bags[f"t_{name}"].weight.detach()
        ends = embedding.block_ends[f]
        jagged = sparse[name]
        offsets = jagged.offsets()
        for row in range(batch.batch_size):
            ids = jagged.values()[offsets[row] : offsets[row + 1]].tolist()
            scaled = [
                weight[i] * embedding.alpha[f, sum(i >= e for e in ends)].detach() for i in ids
            ]
            expected[row, f] = torch.stack(scaled).mean(0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


# --- the alternating steps --------------------------------------------------------------------
def _split(model: CTRModel) -> dict[str, dict[str, torch.Tensor]]:
    embedding = _embedding(model)
    table_ids = {id(p) for p in embedding.embedding_parameters()}
    groups: dict[str, dict[str, torch.Tensor]] = {"tables": {}, "alpha": {}, "dense": {}}
    for name, p in model.named_parameters():
        group = "alpha" if p is embedding.alpha else "tables" if id(p) in table_ids else "dense"
        groups[group][name] = p.detach().clone()
    return groups


def _changed(before: dict[str, torch.Tensor], model: CTRModel) -> set[str]:
    now = dict(model.named_parameters())
    return {n for n, v in before.items() if not torch.equal(v, now[n].detach())}


def test_a_train_step_updates_only_the_embedding_side(schema: FeatureSchema, batch: Batch) -> None:
    model = _search_model(schema)
    with torch.no_grad():  # α off 1, so a leaked α gradient step would show
        _embedding(model).alpha.fill_(0.7)
    before = _split(model)
    optimizer = embedding_optimizer(model, lr=1e-2)
    train_step(model, batch, optimizer)
    changed = _changed(before["tables"], model)
    assert changed == set(before["tables"])  # every table moved (Adam, dense gradients)
    assert not _changed(before["alpha"], model)
    assert not _changed(before["dense"], model)
    assert _embedding(model).alpha.grad is None


def test_a_valid_step_updates_only_alpha(schema: FeatureSchema, batch: Batch) -> None:
    model = _search_model(schema)
    before = _split(model)
    alpha_step(model, batch, lr=1e-2, l1=1e-5)
    assert _changed(before["alpha"], model) == {"embedding.alpha"}
    assert not _changed(before["tables"], model)
    assert not _changed(before["dense"], model)
    assert all(p.grad is None for p in model.parameters())


def test_alpha_is_clipped_to_the_unit_interval(schema: FeatureSchema, batch: Batch) -> None:
    model = _search_model(schema)
    embedding = _embedding(model)
    with torch.no_grad():
        embedding.alpha.fill_(0.5)
    for _ in range(3):  # normalised steps of lr 10 throw α far outside [0, 1] both ways
        alpha_step(model, batch, lr=10.0, l1=1e-5)
    alpha = embedding.alpha.detach()[embedding.searched]
    assert alpha.min() == 0.0 and alpha.max() == 1.0
    assert ((alpha >= 0) & (alpha <= 1)).all()


def test_block_normalisation_moves_a_tail_block_as_far_as_a_head_block() -> None:
    searched = torch.ones(1, 2, dtype=torch.bool)
    grad = torch.stack([torch.full((4,), 1.0), torch.full((4,), 1e-4)]).unsqueeze(0)  # (1, 2, 4)
    normalised = torch.ones(1, 2, 4)
    update_alpha(normalised, grad, searched, lr=0.1, use_grad_norm=True)
    torch.testing.assert_close(normalised, torch.full((1, 2, 4), 0.9))
    raw = torch.ones(1, 2, 4)
    update_alpha(raw, grad, searched, lr=0.1, use_grad_norm=False)
    assert float(1 - raw[0, 1, 0]) == pytest.approx(1e-5, rel=0.05)  # tail barely moves (fp32)
    frozen = torch.ones(1, 2, 4)
    update_alpha(frozen, grad, torch.tensor([[True, False]]), lr=0.1)
    assert torch.equal(frozen[0, 1], torch.ones(4))  # an unsearched block never moves


def test_blocks_absent_from_the_batch_shrink_by_lr_under_l1(
    schema: FeatureSchema, batch: Batch
) -> None:
    # a block with no id in the batch has only the L1 gradient λ; normalised, it moves by lr
    model = _search_model(schema)
    embedding = _embedding(model)
    with torch.no_grad():
        embedding.alpha.fill_(0.5)
    kjt = batch.features.sparse
    _, _, block = embedding.layout.locate(kjt.values(), kjt.lengths(), batch.batch_size)
    present = torch.zeros(embedding.layout.num_blocks, dtype=torch.bool)
    present[block] = True
    absent = embedding.block_slot[~present]
    assert absent.numel() > 0
    alpha_step(model, batch, lr=0.01, l1=1e-3)
    moved = embedding.alpha.detach().view(-1, DIM)[absent]
    # λ / (λ + 1e-8) = 1 - 1e-5: the normalised step is lr to within 1e-7
    torch.testing.assert_close(moved, torch.full_like(moved, 0.49), rtol=0, atol=1e-6)


# --- pruning ----------------------------------------------------------------------------------
def test_threshold_pruning_drops_exactly_the_dims_below_it(schema: FeatureSchema) -> None:
    embedding = _embedding(_search_model(schema, DNISConfig(fields=("user_id", "item_id"))))
    generator = torch.Generator().manual_seed(0)
    alpha = torch.rand(embedding.alpha.shape, generator=generator)
    mask = prune_by_threshold(alpha, embedding.searched, threshold=0.5)
    searched = embedding.searched.unsqueeze(-1).expand_as(mask)
    assert torch.equal(mask[searched], (alpha >= 0.5)[searched])
    assert mask[~searched].all()  # unsearched fields keep every dim
    spec = spec_from_mask(embedding, mask)
    assert set(spec.fields) == {"user_id", "item_id"}
    for name, blocks in spec.fields.items():
        f = schema.sparse_names.index(name)
        for s, block in enumerate(blocks):
            assert block.end == embedding.block_ends[f][s]
            assert set(block.kept) == {j for j in range(DIM) if alpha[f, s, j] >= 0.5}
    # rounded to widths of 4: a superset, each block's next-highest α added
    rounded = prune_by_threshold(alpha, embedding.searched, threshold=0.5, width_multiple=4)
    assert (rounded | ~mask).all() and (rounded.sum(-1) % 4 == 0).all()


def test_budget_pruning_fits_the_budget_and_keeps_the_best_dims(schema: FeatureSchema) -> None:
    embedding = _embedding(_search_model(schema))
    generator = torch.Generator().manual_seed(1)
    scores = torch.rand(embedding.alpha.shape, generator=generator)
    rows = embedding.block_rows
    full = masked_param_count(torch.ones_like(scores, dtype=torch.bool), rows)
    assert full == sum(f.num_embeddings for f in schema.sparse) * DIM
    previous = -1
    for ratio in (0.1, 0.25, 0.5, 0.75, 1.0):
        mask = prune_to_budget(scores, rows, embedding.searched, ratio * full, width_multiple=4)
        params = masked_param_count(mask, rows)
        assert params <= ratio * full and params >= previous
        previous = params
        assert (mask.sum(-1) % 4 == 0).all()
        # inside a block, every kept dim outscores every dropped one
        kept_min = torch.where(mask, scores, torch.inf).amin(-1)
        dropped_max = torch.where(mask, -torch.inf, scores).amax(-1)
        assert (kept_min > dropped_max).all()
    assert previous == full
    half = prune_to_budget(scores, rows, embedding.searched, 0.5 * full, width_multiple=4)
    widths = half.sum(-1)[embedding.searched]
    assert len(set(widths.tolist())) > 1  # blocks keep different widths
    # the spec builds a mixed-dim embedding with exactly those parameters
    spec = spec_from_mask(embedding, half)
    config = EmbeddingConfig(variant="mixed_dim", dim=DIM, mixed_dim=spec)
    assert embedding_param_count(schema, config) == masked_param_count(half, rows)
    assert table_param_count(build_embedding(schema, config, device=torch.device("meta"))) == (
        masked_param_count(half, rows)
    )


def test_folded_weights_reproduce_the_pruned_search_model(
    schema: FeatureSchema, batch: Batch
) -> None:
    # METHODS.md §7(b)6: α folded into the kept columns of per-block tables; the mixed-dim model
    # with those weights computes what the search model computes under its pruning mask
    model = _search_model(schema, DNISConfig(fields=("user_id", "item_id", "zip3", "genres")))
    embedding = _embedding(model)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        embedding.alpha.copy_(torch.rand(embedding.alpha.shape, generator=generator))
        embedding.alpha[~embedding.searched] = 1.0
    scores = torch.rand(embedding.alpha.shape, generator=generator)
    full = masked_param_count(torch.ones_like(scores, dtype=torch.bool), embedding.block_rows)
    mask = prune_to_budget(
        scores, embedding.block_rows, embedding.searched, 0.4 * full, width_multiple=4
    )
    assert (mask.sum(-1)[embedding.searched] == 0).any()  # a block with no table at all
    config = EmbeddingConfig(
        variant="mixed_dim", dim=DIM, mixed_dim=spec_from_mask(embedding, mask)
    )
    torch.manual_seed(5)  # different init: every weight must come from the fold
    pruned = build_model(TINY_AUTOINT, build_embedding(schema, config), schema)
    model.eval(), pruned.eval()
    pruned.load_state_dict(folded_state(model, mask, pruned))
    with torch.no_grad():
        embedding.dim_mask.copy_(mask)
        expected = model(batch.features).logits["ctr"]
        embedding.dim_mask.fill_(1.0)
        got = pruned(batch.features).logits["ctr"]
        unpruned = model(batch.features).logits["ctr"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(unpruned, expected, atol=1e-4)  # the mask mattered


def test_folding_into_another_architecture_is_a_config_error(schema: FeatureSchema) -> None:
    model = _search_model(schema)
    mask = torch.ones_like(_embedding(model).alpha, dtype=torch.bool)
    config = EmbeddingConfig(
        variant="mixed_dim", dim=DIM, mixed_dim=spec_from_mask(_embedding(model), mask)
    )
    other = build_model(
        TINY_AUTOINT.model_copy(update={"num_layers": 3}), build_embedding(schema, config), schema
    )
    with pytest.raises(ConfigError, match="no counterpart in the searched model"):
        folded_state(model, mask, other)


# --- config and the whole search --------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("search.block_fractions=[0.5, 0.4]", "positive shares summing to 1"),
        ("search.prune_threshold=0.1", "exactly one of prune_threshold and target_ratio"),
        ("search.width_multiple=6", "must be a multiple of 4"),
        ("search.sweep_ratios=[0.5, 1.5]", "must lie in"),
        ("search.lr_alpa=0.1", "unknown key 'search.lr_alpa'; did you mean 'search.lr_alpha'"),
    ],
)
def test_bad_search_settings_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_searched_field_is_a_config_error(schema: FeatureSchema) -> None:
    with pytest.raises(ConfigError, match=r"search.fields: \['movie'\] are not sparse fields"):
        build_search_model(TINY_AUTOINT, schema, EMBEDDING, DNISConfig(fields=("movie",)))


def _data(schema: FeatureSchema) -> SearchData:
    train = schema.encode(make_tiny_table(num_rows=512, seed=7))
    valid = schema.encode(make_tiny_table(num_rows=256, seed=8))

    def batches(table: pa.Table, size: int, seed: int | None) -> list[Batch]:
        if seed is not None:
            table = table.take(np.random.default_rng(seed).permutation(table.num_rows))
        return [
            batch_from_encoded(schema, table.slice(i, size)) for i in range(0, table.num_rows, size)
        ]

    return SearchData(
        train_epoch=lambda epoch: batches(train, 64, epoch),
        valid_stream=itertools.cycle(batches(valid, 64, 0)),
        valid_eval=lambda: batches(valid, 128, None),
    )


def test_a_small_search_yields_a_buildable_spec_within_budget(schema: FeatureSchema) -> None:
    config = DNISConfig(
        batch_size=64,
        warm_max_epochs=2,
        search_epochs=2,
        steps_per_epoch=4,
        lr_w=1e-2,
        l1=1e-3,
        prune_score="magnitude",  # the α path is covered by the e2e test
        target_ratio=0.5,
        sweep_ratios=(1.0, 0.5, 0.2),
    )
    model = _search_model(schema, config)
    result = run_search(model, _data(schema), config)
    assert len(result.warm_history) == 2
    assert [r["steps"] for r in result.search_history] == [4, 4]
    assert result.params <= 0.5 * result.full_params
    assert [p["ratio"] for p in result.curve] == [1.0, 0.5, 0.2]
    assert [p["params"] for p in result.curve] == sorted(
        (p["params"] for p in result.curve), reverse=True
    )
    assert result.curve[0]["params"] == result.full_params
    assert ((result.alpha >= 0) & (result.alpha <= 1)).all()
    assert not torch.equal(result.alpha, torch.ones_like(result.alpha))  # α was searched
    assert torch.equal(_embedding(model).dim_mask, torch.ones_like(result.alpha))  # sweep undone
    config_out = EmbeddingConfig(variant="mixed_dim", dim=DIM, mixed_dim=result.spec)
    assert embedding_param_count(schema, config_out) == result.params
    kept = {len(b.kept) for blocks in result.spec.fields.values() for b in blocks}
    assert len(kept) > 1 and all(k % 4 == 0 for k in kept)
