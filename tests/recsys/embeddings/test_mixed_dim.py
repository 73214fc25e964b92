"""The mixed-dimension embedding (DNIS's export form): per-(field, block) tables of their kept
widths must reproduce the per-feature embedding whose rows are zero outside the kept dims, for
single ids and for bags spanning blocks; it builds on the meta device, round-trips through the
artifact, and trains sharded by DMP over two gloo processes.

Run as a script (`python test_mixed_dim.py OUT_DIR`) it is the two-rank DMP check that
`test_sharded_training_matches_the_unsharded_model` starts.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.artifact import load_artifact, write_artifact
from recsys.data.movielens import ML100K_CTR_SCHEMA
from recsys.embeddings import EmbeddingConfig, build_embedding
from recsys.embeddings.config import BlockSpec, MixedDimSpec
from recsys.embeddings.mixed_dim import (
    MixedDimEmbedding,
    block_table_name,
    embedding_param_count,
    table_param_count,
)
from recsys.errors import ConfigError
from recsys.features.batch import Batch, batch_from_encoded
from recsys.features.schema import FeatureSchema, fit_feature_schema
from recsys.models.autoint import AutoIntConfig
from recsys.models.registry import build_model
from tests.tiny_data import make_tiny_table

REPO = Path(__file__).resolve().parents[3]
DIM = 8
TINY_AUTOINT = AutoIntConfig(num_layers=2, num_heads=2, attention_dim=8)


@pytest.fixture(scope="module")
def schema() -> FeatureSchema:
    return fit_feature_schema(ML100K_CTR_SCHEMA, [make_tiny_table()])


@pytest.fixture(scope="module")
def batch(schema: FeatureSchema) -> Batch:
    # other rows than the fit: some values are unseen (OOV id 0)
    return batch_from_encoded(schema, schema.encode(make_tiny_table(num_rows=300, seed=5)))


def _ends(rows: int, num_blocks: int) -> list[int]:
    """Contiguous blocks of about equal size, at least one id each."""
    num_blocks = min(num_blocks, rows)
    return [round(rows * (i + 1) / num_blocks) for i in range(num_blocks)]


def _spec(schema: FeatureSchema, seed: int, full: bool) -> MixedDimSpec:
    """Every field but `gender` (left full width) split in up to 3 blocks; `full` keeps every
    dim, else each block keeps a random subset of 4 or 8 (or, for genres' tail, none)."""
    rng = np.random.default_rng(seed)
    fields = {}
    for feature in schema.sparse:
        if feature.name == "gender":
            continue
        blocks = []
        ends = _ends(feature.num_embeddings, 3)
        for i, end in enumerate(ends):
            if full:
                kept: tuple[int, ...] = tuple(range(DIM))
            elif feature.name == "genres" and i == len(ends) - 1:
                kept = ()
            else:
                width = int(rng.choice([4, 8]))
                kept = tuple(sorted(rng.choice(DIM, size=width, replace=False).tolist()))
            blocks.append(BlockSpec(end=end, kept=kept))
        fields[feature.name] = tuple(blocks)
    return MixedDimSpec(fields=fields)


def _mixed_config(spec: MixedDimSpec) -> EmbeddingConfig:
    return EmbeddingConfig(variant="mixed_dim", dim=DIM, mixed_dim=spec)


def _copy_from_per_feature(
    mixed: MixedDimEmbedding, per_feature_weights: dict[str, torch.Tensor], spec: MixedDimSpec
) -> dict[str, torch.Tensor]:
    """Loads block tables from per-feature tables (rows of the block, kept columns); returns
    the per-feature tables with every non-kept entry zeroed (the reference)."""
    masked = {}
    bags = mixed.tables.embedding_bags
    for field, weight in per_feature_weights.items():
        weight = weight.clone()
        if field not in spec.fields:
            bags[f"t_{field}"].weight.data.copy_(weight)
            masked[field] = weight
            continue
        start = 0
        for i, block in enumerate(spec.fields[field]):
            rows = slice(start, block.end)
            dropped = [d for d in range(DIM) if d not in block.kept]
            if block.kept:
                bags[block_table_name(field, i)].weight.data.copy_(
                    weight[rows][:, list(block.kept)]
                )
            weight[rows, dropped] = 0.0
            start = block.end
        masked[field] = weight
    return masked


def _per_feature_weights(per_feature: torch.nn.Module) -> dict[str, torch.Tensor]:
    bags = per_feature.tables.embedding_bags  # type: ignore[union-attr]
    return {name.removeprefix("t_"): bag.weight.detach() for name, bag in bags.items()}


def _set_per_feature(per_feature: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    bags = per_feature.tables.embedding_bags  # type: ignore[union-attr]
    for field, weight in weights.items():
        bags[f"t_{field}"].weight.data.copy_(weight)


def _bags_spanning_blocks(schema: FeatureSchema, spec: MixedDimSpec, batch: Batch) -> int:
    """How many genres bags of the batch hold ids of at least two blocks."""
    genres = batch.features.sparse.to_dict()["genres"]
    ends = torch.tensor([b.end for b in spec.fields["genres"]])
    count = 0
    for start, end in zip(genres.offsets()[:-1], genres.offsets()[1:], strict=True):
        blocks = torch.bucketize(genres.values()[start:end], ends, right=True)
        count += int(blocks.unique().numel() >= 2)
    return count


@pytest.mark.parametrize("full", [True, False], ids=["every-dim-kept", "random-dims-kept"])
def test_reproduces_the_per_feature_embedding_with_unkept_dims_zeroed(
    schema: FeatureSchema, batch: Batch, full: bool
) -> None:
    spec = _spec(schema, seed=1, full=full)
    assert _bags_spanning_blocks(schema, spec, batch) > 10  # bags do span blocks here
    torch.manual_seed(0)
    per_feature = build_embedding(schema, EmbeddingConfig(dim=DIM))
    mixed = build_embedding(schema, _mixed_config(spec))
    assert isinstance(mixed, MixedDimEmbedding)
    reference = _copy_from_per_feature(mixed, _per_feature_weights(per_feature), spec)
    _set_per_feature(per_feature, reference)
    with torch.no_grad():
        expected = per_feature(batch.features)
        got = mixed(batch.features)
    assert got.shape == (batch.batch_size, schema.num_fields, DIM)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    if not full:  # an empty block (genres' tail) and unkept dims really are zero somewhere
        assert (got == 0).any() and not (expected == 0).all()


def test_tables_follow_the_spec(schema: FeatureSchema) -> None:
    spec = _spec(schema, seed=2, full=False)
    mixed = build_embedding(schema, _mixed_config(spec), table_prefix="p_")
    configs = {c.name: c for c in mixed.tables.embedding_bag_configs()}
    expected = {"p_t_gender": (schema.sparse_feature("gender").num_embeddings, DIM)}
    for field, blocks in spec.fields.items():
        start = 0
        for i, block in enumerate(blocks):
            if block.kept:
                expected[f"p_t_{field}__b{i}"] = (block.end - start, len(block.kept))
            start = block.end
    assert {n: (c.num_embeddings, c.embedding_dim) for n, c in configs.items()} == expected
    assert "p_t_genres__b2" not in configs  # an empty block has no table
    assert table_param_count(mixed) == sum(r * w for r, w in expected.values())
    assert embedding_param_count(schema, _mixed_config(spec)) == table_param_count(mixed)
    total_rows = sum(f.num_embeddings for f in schema.sparse)
    assert embedding_param_count(schema, EmbeddingConfig(dim=DIM)) == total_rows * DIM


def test_builds_on_the_meta_device_with_buffers_on_cpu(schema: FeatureSchema) -> None:
    spec = _spec(schema, seed=3, full=False)
    mixed = build_embedding(schema, _mixed_config(spec), device=torch.device("meta"))
    assert all(p.device.type == "meta" for p in mixed.tables.parameters())
    others = [t for n, t in mixed.named_buffers()] + [
        p for n, p in mixed.named_parameters() if not n.startswith("tables.")
    ]
    assert others and all(t.device.type == "cpu" for t in others)


def test_meta_build_rejects_widths_the_fused_kernels_cannot_shard(schema: FeatureSchema) -> None:
    rows = schema.sparse_feature("age").num_embeddings
    spec = MixedDimSpec(
        fields={"age": (BlockSpec(end=2, kept=(0, 1, 2, 3)), BlockSpec(end=rows, kept=(5, 6)))}
    )
    build_embedding(schema, _mixed_config(spec))  # unsharded: any width works
    with pytest.raises(ConfigError, match=r"keeps 2 dims \(expected a multiple of 4"):
        build_embedding(schema, _mixed_config(spec), device=torch.device("meta"))


def test_bad_specs_name_the_field_and_the_fix(schema: FeatureSchema) -> None:
    rows = schema.sparse_feature("age").num_embeddings
    with pytest.raises(ConfigError, match=r"\['nope'\] are not sparse fields"):
        build_embedding(
            schema, _mixed_config(MixedDimSpec(fields={"nope": (BlockSpec(end=3, kept=(0,)),)}))
        )
    short = MixedDimSpec(fields={"age": (BlockSpec(end=rows - 1, kept=(0,)),)})
    with pytest.raises(ConfigError, match=f"fields.age: the last block ends at id {rows - 1}"):
        build_embedding(schema, _mixed_config(short))
    with pytest.raises(ValueError, match="strictly increasing"):
        MixedDimSpec(fields={"age": (BlockSpec(end=5, kept=()), BlockSpec(end=5, kept=(1,)))})
    with pytest.raises(ValueError, match="below dim=8"):
        _mixed_config(MixedDimSpec(fields={"age": (BlockSpec(end=rows, kept=(8,)),)}))
    nothing = MixedDimSpec(
        fields={f.name: (BlockSpec(end=f.num_embeddings, kept=()),) for f in schema.sparse}
    )
    with pytest.raises(ConfigError, match="no block of any field keeps a dimension"):
        build_embedding(schema, _mixed_config(nothing))


def test_artifact_round_trip_gives_identical_scores(
    schema: FeatureSchema, batch: Batch, tmp_path: Path
) -> None:
    spec = _spec(schema, seed=4, full=False)
    config = _mixed_config(spec)
    torch.manual_seed(0)
    model = build_model(TINY_AUTOINT, build_embedding(schema, config), schema).eval()
    with torch.no_grad():  # make the tables distinguishable from a fresh init
        for p in model.embedding.tables.parameters():
            p.add_(torch.randn_like(p))
        expected = model.probabilities(model(batch.features))["ctr"]
    path = write_artifact(tmp_path, "mixed", model, TINY_AUTOINT, config, schema, {})
    loaded = load_artifact(path)
    assert loaded.embedding_config.variant == "mixed_dim"
    assert loaded.embedding_config.mixed_dim == spec
    with torch.no_grad():
        got = loaded.model.probabilities(loaded.model(batch.features))["ctr"]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# --- DMP: two gloo ranks train the mixed-dim AutoInt sharded ----------------------------------
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _eval_batch(schema: FeatureSchema) -> Batch:
    """The fixed rows both ranks and the unsharded model score."""
    return batch_from_encoded(schema, schema.encode(make_tiny_table(num_rows=64, seed=99)))


def _rank_main(rank: int, out_dir: str, port: int) -> None:
    """One rank: shard, train 3 steps, gather the full state, and score an eval batch."""
    import torch.distributed as dist

    from training.config import ExperimentConfig
    from training.sharding import gather_full_state, shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    schema = fit_feature_schema(ML100K_CTR_SCHEMA, [make_tiny_table()])
    spec = _spec(schema, seed=6, full=False)
    cfg = ExperimentConfig.model_validate(
        {"model": TINY_AUTOINT.model_dump(), "embedding": _mixed_config(spec).model_dump()}
    )
    model = build_model(
        cfg.model, build_embedding(schema, cfg.embedding, device=torch.device("meta")), schema
    )
    dmp, optimizer, plan = shard_model(model, cfg, WORLD)
    table = make_tiny_table(num_rows=256, seed=10 + rank)  # each rank its own rows
    for step in range(3):
        part = table.slice(step * 64, 64)
        batch = batch_from_encoded(schema, schema.encode(part))
        loss = model.loss(dmp(batch.features), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    dmp.eval()
    with torch.no_grad():
        sharded = model.probabilities(dmp(_eval_batch(schema).features))["ctr"]
    full = gather_full_state(dmp, rank)
    record = {
        "sharded": sharded,
        "tables": sorted(plan.plan["embedding.tables"].keys()),  # type: ignore[union-attr]
        "spec": spec.model_dump(mode="json"),
    }
    if rank == 0:
        record["full_state"] = full
    torch.save(record, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_training_matches_the_unsharded_model(
    tmp_path: Path, schema: FeatureSchema
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the script imports tests.tiny_data
    subprocess.run(
        [sys.executable, __file__, str(tmp_path)], check=True, timeout=300, cwd=REPO, env=env
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    spec = MixedDimSpec.model_validate(ranks[0]["spec"])
    # the planner placed every block table (and gender's full-width table)
    expected_tables = {"t_gender"} | {
        f"t_{field}__b{i}"
        for field, blocks in spec.fields.items()
        for i, b in enumerate(blocks)
        if b.kept
    }
    assert set(ranks[0]["tables"]) == expected_tables
    # both ranks score the same rows identically (the tables are shared, the dense replicas
    # stayed in sync) ...
    torch.testing.assert_close(ranks[0]["sharded"], ranks[1]["sharded"])
    # ... and as the unsharded mixed-dim model with the gathered state, which did train
    model = build_model(TINY_AUTOINT, build_embedding(schema, _mixed_config(spec)), schema).eval()
    fresh = model.probabilities(model(_eval_batch(schema).features))["ctr"].detach()
    model.load_state_dict(ranks[0]["full_state"])  # strict: the same keys and shapes
    with torch.no_grad():
        unsharded = model.probabilities(model(_eval_batch(schema).features))["ctr"]
    torch.testing.assert_close(unsharded, ranks[0]["sharded"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fresh, unsharded)  # the gathered state is not a fresh init


def _main(out_dir: str) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(out_dir, _free_port()), nprocs=WORLD, join=True)


if __name__ == "__main__":
    _main(sys.argv[1])
