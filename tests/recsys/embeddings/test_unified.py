"""Unified (multiplexed) and per-feature hashed embeddings (recsys/embeddings/unified.py).

Checks the hash (bit-exact against an unsigned reference, identical in another process, salted
per feature and probe, collision rate and probe independence as the birthday maths predicts),
the budget accounting of both variants, the lookup against a naive per-row loop, quality
against the per-feature stack when hashing cannot collide, and the model contract for AutoInt
with both variants (meta build, gradients, table updates, row independence, seeding, overfit,
artifact round-trip).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError

from recsys.artifact import load_artifact, write_artifact
from recsys.data.movielens import ML100K_CTR_SCHEMA
from recsys.data.schema import DatasetSchema
from recsys.embeddings import EmbeddingConfig, build_embedding
from recsys.embeddings.config import UnifiedSpec
from recsys.embeddings.unified import (
    HashedEmbedding,
    SaltedLookupEmbedding,
    UnifiedEmbedding,
    feature_salt,
    hash_ids,
    mix64,
    share_table_rows,
)
from recsys.errors import ConfigError
from recsys.features.batch import Batch, batch_from_encoded, features_from_rows
from recsys.features.schema import FeatureSchema, fit_feature_schema
from recsys.metrics import auc
from recsys.models.autoint import AutoInt, AutoIntConfig
from recsys.models.outputs import CTRModel
from tests.recsys.models.test_model_contract import (
    TINY_CONFIGS,
    _loss,
    _scores,
    _table_params,
)
from tests.tiny_data import TINY_MULTITASK_SCHEMA, make_tiny_table, with_ctcvr

REPO_ROOT = Path(__file__).resolve().parents[3]
MASK64 = (1 << 64) - 1

# The tiny schema has 110 rows over 8 features (collisionless: 440 parameters at D = 4).
# Unified: gender (3 ids) stays exact, the rest share 2 sub-tables of 2-wide rows, 2 probes each.
TINY_VARIANTS: dict[str, EmbeddingConfig] = {
    "unified": EmbeddingConfig(
        variant="unified",
        dim=4,
        param_budget=300,
        unified=UnifiedSpec(num_tables=2, chunk_dim=2, collisionless_max_rows=3),
    ),
    "hashed": EmbeddingConfig(variant="hashed", dim=4, param_budget=360),
}
variants = pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: these tiny models gain nothing from more, and on a busy 2-core
    machine oversubscribed threads made the training tests 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_table() -> pa.Table:
    return with_ctcvr(make_tiny_table())


@pytest.fixture(scope="module")
def tiny_schema(tiny_table: pa.Table) -> FeatureSchema:
    return fit_feature_schema(TINY_MULTITASK_SCHEMA, [tiny_table])


def _encode(schema: FeatureSchema, table: pa.Table) -> Batch:
    return batch_from_encoded(schema, schema.encode(table))


def _num_table_params(embedding: SaltedLookupEmbedding) -> int:
    return sum(p.numel() for p in embedding.tables.parameters())


# --- the hash -----------------------------------------------------------------------------------
def _mix64_reference(x: int) -> int:
    """splitmix64's finaliser in unsigned 64-bit arithmetic (Python ints, explicit masks)."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _hash_reference(x: int, salt: int, num_rows: int) -> int:
    """The row of id `x`: two finaliser rounds with the salt between, low 63 bits mod rows."""
    mixed = _mix64_reference(_mix64_reference(x & MASK64) ^ (salt & MASK64))
    return (mixed & (MASK64 >> 1)) % num_rows


def test_mix64_is_bit_identical_to_unsigned_reference() -> None:
    # negative and extreme values exercise the sign bit: an unmasked (arithmetic) shift or a
    # saturating multiply would diverge from the unsigned reference on them
    edge = [0, 1, 2, -1, -2, 2**62, 2**63 - 1, -(2**63), 12345678901234]
    rng = np.random.default_rng(0)
    values = edge + rng.integers(-(2**63), 2**63 - 1, 2000, dtype=np.int64).tolist()
    got = mix64(torch.tensor(values, dtype=torch.int64)).tolist()
    expected = [_mix64_reference(v & MASK64) for v in values]
    assert [g & MASK64 for g in got] == expected
    salt, num_rows = feature_salt("item_id", 1, 7), 1009
    rows = hash_ids(torch.tensor(values, dtype=torch.int64), salt, num_rows).tolist()
    assert rows == [_hash_reference(v, salt, num_rows) for v in values]


def test_salts_are_distinct_per_feature_probe_and_global_salt() -> None:
    names = ML100K_CTR_SCHEMA.input_columns()
    salts = {
        (name, probe, salt): feature_salt(name, probe, salt)
        for name in names
        for probe in range(4)
        for salt in (0, 1)
    }
    assert len(set(salts.values())) == len(salts)


_SUBPROCESS_SCRIPT = """
import json, torch
from recsys.embeddings.config import EmbeddingConfig, UnifiedSpec
from recsys.embeddings.unified import build_unified_embedding
from recsys.features.batch import batch_from_encoded
from recsys.features.schema import fit_feature_schema
from tests.tiny_data import TINY_MULTITASK_SCHEMA, make_tiny_table, with_ctcvr
table = with_ctcvr(make_tiny_table())
schema = fit_feature_schema(TINY_MULTITASK_SCHEMA, [table])
config = EmbeddingConfig.model_validate_json({config!r})
embedding = build_unified_embedding(schema, config)
probes = embedding.probe_features(batch_from_encoded(schema, schema.encode(table)).features.sparse)
print(json.dumps({{k: v.values().tolist() for k, v in probes.to_dict().items()}}))
"""


def test_probe_ids_are_identical_in_another_process(
    tiny_schema: FeatureSchema, tiny_table: pa.Table
) -> None:
    config = TINY_VARIANTS["unified"]
    script = _SUBPROCESS_SCRIPT.format(config=config.model_dump_json())
    # another hash seed: a salt drawn from Python's hash() would change with it
    env = {**os.environ, "PYTHONHASHSEED": "4321", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    embedding = build_embedding(tiny_schema, config)
    ours = embedding.probe_features(_encode(tiny_schema, tiny_table).features.sparse)
    assert theirs == {k: v.values().tolist() for k, v in ours.to_dict().items()}


def test_two_instances_map_the_same_values_to_the_same_rows(
    tiny_schema: FeatureSchema, tiny_table: pa.Table
) -> None:
    sparse = _encode(tiny_schema, tiny_table).features.sparse
    torch.manual_seed(0)
    first = build_embedding(tiny_schema, TINY_VARIANTS["unified"])
    torch.manual_seed(1)
    second = build_embedding(tiny_schema, TINY_VARIANTS["unified"])
    a, b = first.probe_features(sparse), second.probe_features(sparse)
    assert a.keys() == b.keys()
    torch.testing.assert_close(a.values(), b.values(), rtol=0, atol=0)
    torch.testing.assert_close(a.lengths(), b.lengths(), rtol=0, atol=0)
    # and the ids really are remapped, not passed through
    assert not torch.equal(a["user_id__p0"].values(), sparse["user_id"].values())


def test_equal_ids_of_two_features_or_two_probes_do_not_collide_systematically() -> None:
    num_ids, num_rows = 20_000, 1_000
    ids = torch.arange(num_ids, dtype=torch.int64)
    user_p0 = hash_ids(ids, feature_salt("user_id", 0), num_rows)
    pairs = {
        "other feature": hash_ids(ids, feature_salt("item_id", 0), num_rows),
        "other probe": hash_ids(ids, feature_salt("user_id", 1), num_rows),
        "other global salt": hash_ids(ids, feature_salt("user_id", 0, 1), num_rows),
    }
    # Independent rows agree with probability 1/M: Poisson(20) agreements; 45 is p < 1e-6.
    expected = num_ids / num_rows
    for what, rows in pairs.items():
        agreements = int((rows == user_p0).sum())
        assert agreements < expected + 5.5 * math.sqrt(expected), (what, agreements)


@pytest.mark.parametrize(("num_ids", "num_rows"), [(20_000, 40_000), (5_000, 1_000)])
def test_collision_rate_matches_the_birthday_expectation(num_ids: int, num_rows: int) -> None:
    # Consecutive ids (as vocab ids are) are the hard case for a weak hash: `id mod M`
    # would give no collision at all in the first case.
    ids = torch.arange(1, num_ids + 1, dtype=torch.int64)
    fractions = []
    for probe in range(4):
        rows = hash_ids(ids, feature_salt("item_id", probe), num_rows)
        counts = torch.bincount(rows, minlength=num_rows)
        fractions.append(float((counts[rows] > 1).float().mean()))
    expected = 1 - (1 - 1 / num_rows) ** (num_ids - 1)
    # Each id collides with probability p; the indicators of ids in one row are dependent,
    # which at most doubles the binomial variance. Four salts averaged; 5 sigma.
    sigma = math.sqrt(2 * expected * (1 - expected) / (num_ids * len(fractions)))
    assert abs(np.mean(fractions) - expected) < 5 * sigma, (fractions, expected)


def test_probe_rows_of_the_same_value_are_independent() -> None:
    num_ids, num_rows, num_bins = 40_000, 4_096, 16
    ids = torch.arange(num_ids, dtype=torch.int64)
    p0 = hash_ids(ids, feature_salt("user_id", 0), num_rows).double()
    p1 = hash_ids(ids, feature_salt("user_id", 1), num_rows).double()
    corr = float(torch.corrcoef(torch.stack([p0, p1]))[0, 1])
    assert abs(corr) < 5 / math.sqrt(num_ids), corr
    # chi-square test of independence on a 16 x 16 grid of the row pairs
    b0, b1 = (p0 * num_bins / num_rows).long(), (p1 * num_bins / num_rows).long()
    observed = torch.bincount(b0 * num_bins + b1, minlength=num_bins**2).double()
    expected = num_ids / num_bins**2
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    dof = (num_bins - 1) ** 2
    # Wilson-Hilferty: the chi2(dof) quantile at z = 4 (p ~ 3e-5)
    bound = dof * (1 - 2 / (9 * dof) + 4 * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < bound, (chi2, bound)


# --- budgets and layout ---------------------------------------------------------------------
@pytest.mark.parametrize("budget", [300, 1_000, 4_097])
def test_unified_tables_fill_the_budget(tiny_schema: FeatureSchema, budget: int) -> None:
    config = EmbeddingConfig(
        variant="unified",
        dim=4,
        param_budget=budget,
        unified=UnifiedSpec(num_tables=3, chunk_dim=2, collisionless_max_rows=3),
    )
    embedding = build_embedding(tiny_schema, config)
    assert isinstance(embedding, UnifiedEmbedding)
    total = _num_table_params(embedding)
    assert budget - config.unified.chunk_dim < total <= budget
    configs = {c.name: c for c in embedding.tables.embedding_bag_configs()}
    assert configs["t_gender"].num_embeddings == 3  # at most 3 ids: exact, D wide
    assert configs["t_gender"].embedding_dim == 4
    sub_rows = [configs[f"ue_{s}"].num_embeddings for s in range(3)]
    assert max(sub_rows) - min(sub_rows) <= 1
    # probes dealt round-robin in schema order, continuing across features
    assert configs["ue_0"].feature_names[:3] == ["user_id__p0", "item_id__p1", "occupation__p0"]
    assert configs["ue_1"].feature_names[:3] == ["user_id__p1", "age__p0", "occupation__p1"]
    assert configs["ue_2"].feature_names[:3] == ["item_id__p0", "age__p1", "zip3__p0"]


def test_unified_budget_too_small_names_the_key(tiny_schema: FeatureSchema) -> None:
    # gender's exact table takes 12 of the 14 parameters; 2 sub-tables need 2 x 2 more
    config = EmbeddingConfig(
        variant="unified",
        dim=4,
        param_budget=14,
        unified=UnifiedSpec(num_tables=2, chunk_dim=2, collisionless_max_rows=3),
    )
    with pytest.raises(ConfigError, match=r"embedding\.param_budget=14 is too small.*at least 16"):
        build_embedding(tiny_schema, config)


def test_unified_rejects_unknown_features_and_too_many_tables(tiny_schema: FeatureSchema) -> None:
    unknown = EmbeddingConfig(
        variant="unified",
        dim=4,
        param_budget=400,
        unified=UnifiedSpec(chunk_dim=2, features=("user",)),
    )
    with pytest.raises(ConfigError, match=r"embedding\.unified\.features: unknown"):
        build_embedding(tiny_schema, unknown)
    too_many = EmbeddingConfig(
        variant="unified",
        dim=4,
        param_budget=400,
        unified=UnifiedSpec(num_tables=3, chunk_dim=4, features=("user_id", "item_id")),
    )
    with pytest.raises(ConfigError, match=r"num_tables=3 exceeds the number of probes"):
        build_embedding(tiny_schema, too_many)
    with pytest.raises(ValidationError, match=r"embedding\.unified\.features is empty"):
        UnifiedSpec(features=())
    nothing = EmbeddingConfig(
        variant="unified",
        dim=4,
        param_budget=400,
        unified=UnifiedSpec(chunk_dim=2, collisionless_max_rows=1_000),
    )
    with pytest.raises(ConfigError, match=r"embedding\.unified: no feature is multiplexed"):
        build_embedding(tiny_schema, nothing)


def test_unified_features_limits_what_is_multiplexed(tiny_schema: FeatureSchema) -> None:
    config = EmbeddingConfig(
        variant="unified",
        dim=4,
        param_budget=400,
        unified=UnifiedSpec(num_tables=1, chunk_dim=2, features=("user_id", "item_id")),
    )
    embedding = build_embedding(tiny_schema, config)
    configs = {c.name: c for c in embedding.tables.embedding_bag_configs()}
    assert configs["ue_0"].feature_names == [
        "user_id__p0",
        "user_id__p1",
        "item_id__p0",
        "item_id__p1",
    ]
    exact = {name for name in configs if name.startswith("t_")}
    assert exact == {f"t_{n}" for n in tiny_schema.sparse_names if n not in ("user_id", "item_id")}


def test_share_table_rows_water_fills() -> None:
    vocab = {"a": 3, "b": 20, "c": 100, "d": 1000}
    # 300 rows: a, b and c fit their shares and stay exact; d takes the rest
    assert share_table_rows(vocab, 300) == {"a": 3, "b": 20, "c": 100, "d": 177}
    # 100 rows: after a and b, 77 rows for c and d (38 and 39: the larger takes the remainder)
    assert share_table_rows(vocab, 100) == {"a": 3, "b": 20, "c": 38, "d": 39}
    # everything fits: exact tables, rows left unused
    assert share_table_rows(vocab, 5000) == vocab
    with pytest.raises(ConfigError, match=r"embedding\.param_budget is too small"):
        share_table_rows(vocab, 3)


@pytest.mark.parametrize("budget", [200, 301, 360])
def test_hashed_tables_fill_the_budget(tiny_schema: FeatureSchema, budget: int) -> None:
    config = EmbeddingConfig(variant="hashed", dim=4, param_budget=budget)
    embedding = build_embedding(tiny_schema, config)
    assert isinstance(embedding, HashedEmbedding)
    assert budget - config.dim < _num_table_params(embedding) <= budget
    rows = {c.feature_names[0]: c.num_embeddings for c in embedding.tables.embedding_bag_configs()}
    vocab = {f.name: f.num_embeddings for f in tiny_schema.sparse}
    assert rows["gender"] == vocab["gender"]  # the smallest vocabulary always fits its share
    capped = [name for name in vocab if rows[name] < vocab[name]]
    assert capped, "the budget is below the collisionless size, so some table must be hashed"
    assert max(rows[n] for n in capped) - min(rows[n] for n in capped) <= 1
    # exact features keep their ids; hashed ones are remapped into their smaller table
    hashed = {lookup.feature for lookup in embedding.lookups if lookup.is_hashed}
    assert hashed == set(capped)


# --- the lookup -------------------------------------------------------------------------------
@variants
def test_forward_matches_a_naive_per_row_lookup(
    variant: str, tiny_schema: FeatureSchema, tiny_table: pa.Table
) -> None:
    embedding = build_embedding(tiny_schema, TINY_VARIANTS[variant])
    batch = _encode(tiny_schema, tiny_table.slice(0, 32))
    got = embedding(batch.features)
    assert got.shape == (32, tiny_schema.num_fields, 4)
    weights = {
        c.name: embedding.tables.embedding_bags[c.name].weight
        for c in embedding.tables.embedding_bag_configs()
    }
    table_of = {
        key: c.name for c in embedding.tables.embedding_bag_configs() for key in c.feature_names
    }
    sparse = batch.features.sparse.to_dict()
    for f, lookup in enumerate(embedding.lookups):
        for row in range(32):
            ids = sparse[lookup.feature].to_dense()[row].tolist()  # one id, or a bag
            parts = []
            for i, key in enumerate(lookup.keys):
                if lookup.is_hashed:
                    rows = [_hash_reference(x, lookup.salts[i], lookup.num_rows[i]) for x in ids]
                else:
                    rows = ids
                parts.append(weights[table_of[key]][rows].mean(dim=0))  # pool, then concat
            torch.testing.assert_close(got[row, f], torch.cat(parts), rtol=1e-6, atol=1e-7)


@variants
def test_dense_fields_come_after_sparse_ones(variant: str) -> None:
    dataset = DatasetSchema.model_validate(
        {
            "name": "toy",
            "columns": [
                {"name": "user_id", "role": "categorical"},
                {"name": "price", "role": "dense"},
                {"name": "click", "role": "label"},
            ],
        }
    )
    rows = pa.table({"user_id": ["a", "b", "c"], "price": [1.0, 2.0, 6.0], "click": [1, 0, 1]})
    schema = fit_feature_schema(dataset, [rows])
    config = TINY_VARIANTS[variant].model_copy(
        update={"param_budget": 8, "unified": UnifiedSpec(num_tables=1, chunk_dim=2)}
    )
    embedding = build_embedding(schema, config)
    assert embedding.num_fields == 2
    features = features_from_rows(schema, [{"user_id": "a", "price": 6.0}])
    emb = embedding(features)
    assert emb.shape == (1, 2, 4)
    assert embedding.dense_vectors is not None
    torch.testing.assert_close(emb[0, 1], features.dense[0, 0] * embedding.dense_vectors[0])


@variants
def test_builds_on_meta_with_only_the_tables_there(
    variant: str, tiny_schema: FeatureSchema
) -> None:
    embedding = build_embedding(tiny_schema, TINY_VARIANTS[variant], device=torch.device("meta"))
    model = AutoInt(AutoIntConfig.model_validate(TINY_CONFIGS["autoint"]), embedding, tiny_schema)
    table_ids = {id(p) for p in _table_params(model).values()}
    assert table_ids
    for name, param in model.named_parameters():
        assert param.is_meta == (id(param) in table_ids), name
    for name, buffer in model.named_buffers():
        assert not buffer.is_meta, name
    # the meta build describes the same tables as the CPU build
    cpu = build_embedding(tiny_schema, TINY_VARIANTS[variant])
    assert [
        (c.name, c.num_embeddings, c.embedding_dim, c.feature_names)
        for c in embedding.tables.embedding_bag_configs()
    ] == [
        (c.name, c.num_embeddings, c.embedding_dim, c.feature_names)
        for c in cpu.tables.embedding_bag_configs()
    ]


def test_table_prefix_names_every_table(tiny_schema: FeatureSchema) -> None:
    embedding = build_embedding(tiny_schema, TINY_VARIANTS["unified"], table_prefix="dnn_")
    names = [c.name for c in embedding.tables.embedding_bag_configs()]
    assert names == ["dnn_t_gender", "dnn_ue_0", "dnn_ue_1"]


# --- quality: with M >> vocabulary and one probe, unified == per-feature ---------------------
def _autoint(schema: FeatureSchema, config: EmbeddingConfig) -> CTRModel:
    torch.manual_seed(0)
    model_config = AutoIntConfig(num_layers=2, num_heads=2, attention_dim=8)
    return AutoInt(model_config, build_embedding(schema, config), schema)


def _train(model: CTRModel, batches: list[Batch], steps: int = 300) -> CTRModel:
    """Plain Adam on every parameter (tables included), batches in a fixed order."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        batch = batches[step % len(batches)]
        optimizer.zero_grad()
        _loss(model, model(batch.features), batch).backward()
        optimizer.step()
    return model.eval()


def _start_like(unified: CTRModel, per_feature: CTRModel, schema: FeatureSchema) -> None:
    """Gives `unified` the per-feature model's starting point: the same dense weights, and
    each (feature, id)'s exact row copied to the shared row its probe hashes it to."""
    source, state = per_feature.state_dict(), unified.state_dict()
    for key in state:
        if ".embedding_bags." not in key:
            state[key] = source[key]
    shared_key = "embedding.tables.embedding_bags.ue_0.weight"
    shared = state[shared_key].clone()
    used: set[int] = set()
    assert isinstance(unified.embedding, UnifiedEmbedding)
    for lookup in unified.embedding.lookups:
        ids = torch.arange(schema.sparse_feature(lookup.feature).num_embeddings)
        rows = hash_ids(ids, lookup.salts[0], lookup.num_rows[0])
        # the premise of the comparison: no two (feature, id) pairs share a row
        assert used.isdisjoint(rows.tolist()) and len(set(rows.tolist())) == len(ids)
        used.update(rows.tolist())
        shared[rows] = source[f"embedding.tables.embedding_bags.t_{lookup.feature}.weight"]
    state[shared_key] = shared
    unified.load_state_dict(state)


def test_unified_with_ample_rows_matches_per_feature_quality() -> None:
    """With one probe per feature (chunk_dim == dim) into one table of 20k rows for ~110 ids,
    the unified stack is a relabelling of the per-feature tables. From the same starting point
    both must train to the same held-out AUC and the same scores: a difference would come from
    the lookup itself (collisions, pooling, gradients routed to the wrong rows). 30 steps (two
    passes) learn the planted signal; longer runs at this learning rate turn chaotic, and float
    rounding alone then moves the two AUCs apart by up to 0.006 after 300 steps."""
    train_table = make_tiny_table(num_rows=4096, seed=0)
    test_table = make_tiny_table(num_rows=2048, seed=1)  # same planted label, new pairs
    schema = fit_feature_schema(ML100K_CTR_SCHEMA, [train_table])
    batches = [_encode(schema, train_table.slice(i, 256)) for i in range(0, 4096, 256)]
    test = _encode(schema, test_table)
    per_feature = _autoint(schema, EmbeddingConfig(dim=8))
    unified = _autoint(
        schema,
        EmbeddingConfig(
            variant="unified",
            dim=8,
            param_budget=8 * 20_000,
            unified=UnifiedSpec(num_tables=1, chunk_dim=8),
        ),
    )
    _start_like(unified, per_feature, schema)
    before = _scores(per_feature.eval(), test)["ctr"]
    torch.testing.assert_close(_scores(unified.eval(), test)["ctr"], before)
    scores = {
        name: _scores(_train(model, batches, steps=30), test)["ctr"]
        for name, model in [("per_feature", per_feature), ("unified", unified)]
    }
    aucs = {name: auc(test.labels["ctr"], s) for name, s in scores.items()}
    assert aucs["per_feature"] > 0.8, aucs  # the planted signal was learned
    assert abs(aucs["per_feature"] - aucs["unified"]) < 0.002, aucs
    torch.testing.assert_close(scores["unified"], scores["per_feature"], rtol=0, atol=1e-4)


# --- AutoInt around both variants: the artifact keeps the variant (the contract suite,
# tests/recsys/models/test_model_contract.py, runs every check on both) -------------------
def _build_autoint(variant: str, schema: FeatureSchema, seed: int = 0) -> CTRModel:
    torch.manual_seed(seed)
    config = AutoIntConfig.model_validate(TINY_CONFIGS["autoint"])
    return AutoInt(config, build_embedding(schema, TINY_VARIANTS[variant]), schema)


@variants
def test_autoint_artifact_round_trip_gives_identical_scores(
    variant: str, tiny_schema: FeatureSchema, tiny_table: pa.Table, tmp_path: Path
) -> None:
    model = _build_autoint(variant, tiny_schema).eval()
    config = AutoIntConfig.model_validate(TINY_CONFIGS["autoint"])
    path = write_artifact(
        tmp_path, "autoint", model, config, TINY_VARIANTS[variant], tiny_schema, {"auc": 0.5}
    )
    loaded = load_artifact(path)
    assert loaded.embedding_config == TINY_VARIANTS[variant]
    assert isinstance(loaded.model.embedding, type(model.embedding))
    batch = _encode(tiny_schema, tiny_table)
    torch.testing.assert_close(
        _scores(loaded.model, batch)["ctr"], _scores(model, batch)["ctr"], rtol=0, atol=0
    )
