"""Sharded training with two real gloo processes (no Ray): the plan shards tables, each rank
holds only its own shards, dense replicas stay identical, distributed evaluation covers every
row once and equals the unsharded model built from the gathered state. Run twice: every table
sharded (`train.replicate_max_mb=0`); mixed, the small tables replicated (data-parallel)
beside sharded large ones; and every table replicated at width 2, which sharded (FBGEMM) kernels
cannot train."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from recsys.data.movielens import ML100K_CTR_SCHEMA
from recsys.embeddings import build_embedding
from recsys.errors import ConfigError
from recsys.features.batch import batch_from_encoded, features_from_encoded
from recsys.features.schema import fit_feature_schema
from recsys.models.registry import build_model
from tests.tiny_data import make_tiny_table
from training.config import load_config

SCRIPT = Path(__file__).with_name("dist_check.py")
# (train.replicate_max_mb, embedding.dim): every table sharded; mixed: tables of up to 10 rows
# (at width 8) replicated, larger ones sharded; every table replicated at width 2
MODES = {"sharded": (0.0, 8), "mixed": (10 * 8 * 4 / 2**20, 8), "replicated-d2": (1.0, 2)}


def _table_rows(schema: Any) -> dict[str, int]:
    cfg = load_config(None, [])
    embedding = build_embedding(schema, cfg.embedding, device=torch.device("meta"))
    return {
        c.name: c.num_embeddings
        for ebc in embedding.modules()
        if hasattr(ebc, "embedding_bag_configs")
        for c in ebc.embedding_bag_configs()
    }


@pytest.fixture(scope="module", params=list(MODES.values()), ids=list(MODES))
def ranks(tmp_path_factory: pytest.TempPathFactory, request: Any) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("dist")
    train, valid = make_tiny_table(num_rows=768, seed=1), make_tiny_table(num_rows=101, seed=2)
    fit_feature_schema(ML100K_CTR_SCHEMA, [train]).save(out / "features")
    pq.write_table(train, out / "train.parquet")
    pq.write_table(valid, out / "valid.parquet")
    subprocess.run(
        [sys.executable, str(SCRIPT), str(out), *map(str, request.param)],
        check=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_plan_replicates_small_tables_and_shards_the_rest(ranks: list[dict[str, Any]]) -> None:
    plan = ranks[0]["plan"]
    assert set(plan) == {f"t_{name}" for name in ML100K_CTR_SCHEMA.input_columns()}
    replicate_mb = ranks[0]["replicate_max_mb"]
    schema = fit_feature_schema(ML100K_CTR_SCHEMA, [make_tiny_table(num_rows=768, seed=1)])
    for table, rows in _table_rows(schema).items():
        if rows * ranks[0]["dim"] * 4 / 2**20 <= replicate_mb:
            assert plan[table] == "data_parallel", (table, rows, plan)
        else:
            assert plan[table] in {"table_wise", "row_wise"}, (table, rows, plan)


def test_each_rank_holds_only_its_own_shards(ranks: list[dict[str, Any]]) -> None:
    rows_held: dict[str, int] = {}
    sharded = {t for t, kind in ranks[0]["plan"].items() if kind != "data_parallel"}
    for record in ranks:
        held_here = {k: v for k, v in record["local_shards"].items() if v}
        if len(sharded) > 1:  # tables are split between the ranks: neither holds every one
            assert 0 < len(held_here) < len(record["local_shards"])
        for key, shards in held_here.items():
            rows_held[key] = rows_held.get(key, 0) + sum(size[0] for _, size in shards)
    full = ranks[0]["full_state"]
    # together the ranks hold each sharded table's rows exactly once
    assert rows_held == {
        k: v.shape[0]
        for k, v in full.items()
        if ".embedding_bags." in k and k.split(".")[-2] in sharded
    }


def test_dense_replicas_stay_identical(ranks: list[dict[str, Any]]) -> None:
    """Dense weights and replicated tables: equal on both ranks after training, and trained."""
    dense0, dense1 = ranks[0]["dense"], ranks[1]["dense"]
    assert dense0.keys() == dense1.keys() and dense0
    for key in dense0:
        torch.testing.assert_close(dense0[key], dense1[key], rtol=0, atol=0, msg=key)
        assert not torch.equal(dense0[key], ranks[0]["initial"][key]), f"{key} did not train"
    replicated = [k for k in dense0 if ".embedding_bags." in k]
    expected = [t for t, kind in ranks[0]["plan"].items() if kind == "data_parallel"]
    assert sorted(k.split(".")[-2] for k in replicated) == sorted(expected)


def test_replicated_tables_train_with_row_wise_adagrad(ranks: list[dict[str, Any]]) -> None:
    """A replicated table keeps one Adagrad accumulator per row (row-wise, as the fused
    optimizer of sharded tables), not Adam's per-element moments."""
    state = ranks[0]["optimizer_state"]
    for table, kind in ranks[0]["plan"].items():
        if kind != "data_parallel":
            continue
        weight = next(v for k, v in ranks[0]["dense"].items() if k.endswith(f"{table}.weight"))
        entries = {k: shape for k, shape in state.items() if f".{table}.weight." in k}
        assert entries, (table, sorted(state))
        assert not any("exp_avg" in k for k in entries), entries
        rows = weight.shape[0]
        assert any(s and s[0] == rows and np.prod(s) == rows for s in entries.values()), entries


def test_distributed_eval_covers_every_row_once_and_ranks_agree(
    ranks: list[dict[str, Any]],
) -> None:
    assert np.array_equal(ranks[0]["rows"], np.arange(101))
    np.testing.assert_array_equal(ranks[0]["probs"]["ctr"], ranks[1]["probs"]["ctr"])
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    assert ranks[1]["full_state"] is None  # gathered on rank 0 only


def test_gathered_state_scores_like_the_sharded_model(
    ranks: list[dict[str, Any]], tmp_path: Path
) -> None:
    train, valid = make_tiny_table(num_rows=768, seed=1), make_tiny_table(num_rows=101, seed=2)
    schema = fit_feature_schema(ML100K_CTR_SCHEMA, [train])
    dim = ranks[0]["dim"]
    cfg = load_config(
        None, ["model.num_layers=2", f"embedding.dim={dim}", "model.attention_dim=16"]
    )
    model = build_model(cfg.model, build_embedding(schema, cfg.embedding), schema)
    model.load_state_dict(ranks[0]["full_state"])
    model.eval()
    with torch.no_grad():
        probs = model.probabilities(model(features_from_encoded(schema, schema.encode(valid))))
    np.testing.assert_allclose(probs["ctr"].numpy(), ranks[0]["probs"]["ctr"], atol=1e-6)


def test_the_first_step_is_the_unsharded_models_step_on_both_ranks_rows(
    ranks: list[dict[str, Any]],
) -> None:
    """One step of the two ranks (64 rows each) against the plain model on all 128 rows: the
    gradients left on the dense layers and replicated tables (DDP averages the ranks'
    gradients) are the reference's, and each sharded table moved by exactly one row-wise
    Adagrad step on the same averaged gradient (TorchRec averages over the ranks too; a sum
    misses by the epsilon's share on rows with small gradients)."""
    first = ranks[0]["first_step"]
    train = make_tiny_table(num_rows=768, seed=1)
    schema = fit_feature_schema(ML100K_CTR_SCHEMA, [train])
    cfg = load_config(
        None, ["model.num_layers=2", f"embedding.dim={ranks[0]['dim']}", "model.attention_dim=16"]
    )
    model = build_model(cfg.model, build_embedding(schema, cfg.embedding), schema)
    model.load_state_dict(first["start"])
    encoded = schema.encode(train)
    batches = [batch_from_encoded(schema, encoded.slice(r * 64, 64)) for r in range(2)]
    loss = sum(model.loss(model(b.features), b.labels) for b in batches) / 2
    loss.backward()
    reference = {key: p.grad for key, p in model.named_parameters()}

    grads = first["grads"]
    replicated = {t for t, kind in ranks[0]["plan"].items() if kind == "data_parallel"}
    assert {k.split(".")[-2] for k in grads if ".embedding_bags." in k} == replicated
    assert len(grads) > len(replicated)  # the dense layers too
    for key, grad in grads.items():
        torch.testing.assert_close(grad, reference[key], rtol=1e-4, atol=1e-7, msg=key)
        torch.testing.assert_close(ranks[1]["first_step"]["grads"][key], grad, msg=key)

    sharded = [t for t in ranks[0]["plan"] if t not in replicated]
    for table in sharded:
        key = next(k for k in first["start"] if k.endswith(f".embedding_bags.{table}.weight"))
        grad = reference[key]
        step = grad / ((grad**2).mean(dim=1, keepdim=True).sqrt() + cfg.train.table_eps)
        expected = first["start"][key] - cfg.train.table_lr * step
        assert not torch.equal(first["after"][key], first["start"][key]), key
        torch.testing.assert_close(first["after"][key], expected, rtol=1e-5, atol=1e-6, msg=key)


def test_checkpoint_restores_weights_and_both_optimizers_exactly(
    ranks: list[dict[str, Any]],
) -> None:
    """DCP checkpoint of sharded tables, row-wise Adagrad momentum, Adam state and the decayed
    learning rates: a fresh copy restored from it has the saved state's digest, and training
    both copies on the same batches keeps them bitwise equal."""
    for record in ranks:
        ckpt = record["checkpoint"]
        assert ckpt["fresh"]["model"] != ckpt["saved"]["model"]  # the copy started elsewhere
        assert ckpt["fresh"]["optimizer"] != ckpt["saved"]["optimizer"]
        assert ckpt["restored"] == ckpt["saved"]
        assert ckpt["continued_restored"] == ckpt["continued_original"]
        assert ckpt["continued_original"] != ckpt["saved"]  # the extra steps did train
        assert ckpt["progress_restored"] == ckpt["progress_saved"]
        assert ckpt["lrs"] == [lr * 0.5 for lr in ckpt["initial_lrs"]]
    best = ranks[0]["checkpoint"]["best_state"]
    full = ranks[0]["full_state"]
    assert best.keys() == full.keys()
    for key in full:
        torch.testing.assert_close(best[key], full[key], rtol=0, atol=0, msg=key)
    assert ranks[1]["checkpoint"]["best_state"] is None  # kept by rank 0 only


def test_a_full_state_loads_into_every_rank_shard(ranks: list[dict[str, Any]]) -> None:
    """train.init_weights: the unsharded state loaded into a sharded model from other weights
    gathers back exactly (each rank copied its own shards and the replicated weights), and
    the model then trains from there."""
    full = ranks[0]["full_state"]
    init = ranks[0]["init_weights"]
    assert init["before"].keys() == full.keys() == init["loaded"].keys()
    assert any(not torch.equal(init["before"][k], full[k]) for k in full)  # started elsewhere
    for key in full:
        torch.testing.assert_close(init["loaded"][key], full[key], rtol=0, atol=0, msg=key)
    assert any(not torch.equal(init["stepped"][k], full[k]) for k in full)
    assert ranks[1]["init_weights"]["loaded"] is None  # gathered on rank 0 only


def test_init_weights_that_do_not_fit_the_model_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from training.sharding import check_full_state

    schema = fit_feature_schema(ML100K_CTR_SCHEMA, [make_tiny_table(num_rows=256, seed=1)])
    cfg = load_config(None, ["model.num_layers=2", "embedding.dim=8", "model.attention_dim=16"])
    model = build_model(cfg.model, build_embedding(schema, cfg.embedding), schema)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "ok.safetensors"))
    check_full_state(model, tmp_path / "ok.safetensors")  # fits: no error
    first = next(iter(state))
    save_file({k: v for k, v in state.items() if k != first}, str(tmp_path / "short.safetensors"))
    with pytest.raises(ConfigError, match=f"train.init_weights: .*missing \\['{first}'\\]"):
        check_full_state(model, tmp_path / "short.safetensors")
    with pytest.raises(ConfigError, match="does not exist"):
        check_full_state(model, tmp_path / "absent.safetensors")


def test_one_worker_shards_every_table_whose_width_allows_it() -> None:
    """Replication saves the all-to-all only with several workers; one worker keeps the fused
    kernel, except for widths that only the replicated kernel trains."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    from training.sharding import table_sharding_types

    small = EmbeddingBagConfig(num_embeddings=100, embedding_dim=8, name="t_small")
    narrow = EmbeddingBagConfig(num_embeddings=100, embedding_dim=2, name="t_narrow")
    large = EmbeddingBagConfig(num_embeddings=100_000, embedding_dim=8, name="t_large")
    assert table_sharding_types(small, 1.0, world_size=2) == ["data_parallel"]
    assert table_sharding_types(small, 1.0, world_size=1) == ["table_wise", "row_wise"]
    assert table_sharding_types(narrow, 1.0, world_size=1) == ["data_parallel"]
    assert table_sharding_types(large, 1.0, world_size=2) == ["table_wise", "row_wise"]
    assert table_sharding_types(small, 0.0, world_size=2) == ["table_wise", "row_wise"]


def test_ranks_score_with_rank_0s_batchnorm_statistics() -> None:
    # TorchRec's DDP does not broadcast buffers: ARM-Net's BatchNorm statistics drift apart per
    # rank, so the ranks (and the exported model, rank 0's) scored the same rows differently
    script = Path(__file__).with_name("norm_sync_check.py")
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=True
    )
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["before"] > 1e-6  # the ranks had drifted: the check can fail
    assert record["after"] == 0.0 and record["same_statistics"]
