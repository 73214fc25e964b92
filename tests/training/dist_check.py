"""Two gloo processes train a DMP-sharded model a few steps and record what each rank sees.

Run by tests/training/test_sharding.py as a subprocess (`python dist_check.py OUT_DIR`), so the
spawned ranks import nothing from pytest. OUT_DIR must hold `features/` (a saved FeatureSchema)
and `train.parquet`/`valid.parquet` (raw rows). Each rank writes `rank<r>.pt` with its plan,
local shards, dense parameters, eval results; rank 0 also writes the gathered full state.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
STEPS = 6
BATCH = 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(rank: int, out_dir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from recsys.embeddings import build_embedding
    from recsys.features.batch import batch_from_encoded
    from recsys.features.schema import FeatureSchema
    from recsys.models.registry import build_model
    from training.config import load_config
    from training.data import ROW_COLUMN
    from training.loop import evaluate_distributed
    from training.sharding import gather_full_state, shard_model

    out = Path(out_dir)
    cfg = load_config(None, ["model.num_layers=2", "embedding.dim=8", "model.attention_dim=16"])
    schema = FeatureSchema.load(out / "features")
    model = build_model(
        cfg.model, build_embedding(schema, cfg.embedding, device=torch.device("meta")), schema
    )
    dmp, optimizer, plan = shard_model(model, cfg, WORLD)
    train = schema.encode(pq.read_table(out / "train.parquet"))
    for step in range(STEPS):
        # each rank trains on its own rows, as Ray Data's split gives it
        batch = batch_from_encoded(schema, train.slice((step * WORLD + rank) * BATCH, BATCH))
        loss = model.loss(dmp(batch.features), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    valid = schema.encode(pq.read_table(out / "valid.parquet"))
    valid = valid.append_column(ROW_COLUMN, pa.array(np.arange(valid.num_rows)))
    result = evaluate_distributed(dmp, model, schema, valid, batch_size=48, rank=rank, world=WORLD)
    local_shards = {
        key: [
            (list(s.metadata.shard_offsets), list(s.metadata.shard_sizes))
            for s in value.local_shards()
        ]
        for key, value in dmp.state_dict().items()
        if hasattr(value, "local_shards")
    }
    dense = {
        k: v.detach().clone() for k, v in dmp.state_dict().items() if not hasattr(v, "local_shards")
    }
    full = gather_full_state(dmp, rank)
    record = {
        "plan": {
            table: str(p.sharding_type)
            for module_plan in plan.plan.values()
            for table, p in module_plan.items()
        },  # type: ignore[attr-defined]
        "local_shards": local_shards,
        "dense": dense,
        "rows": result.rows,
        "probs": result.probs,
        "metrics": result.metrics,
        "full_state": full,
    }
    torch.save(record, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(_run, args=(sys.argv[1], _free_port()), nprocs=WORLD)
