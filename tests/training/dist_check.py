"""Two gloo processes train a DMP-sharded model a few steps and record what each rank sees.

Run by tests/training/test_sharding.py as a subprocess (`python dist_check.py OUT_DIR
[REPLICATE_MAX_MB [DIM]]`: `train.replicate_max_mb`, default 0, and `embedding.dim`,
default 8), so the spawned ranks import nothing from pytest. OUT_DIR must hold `features/` (a
saved FeatureSchema) and `train.parquet`/`valid.parquet` (raw rows). Each rank writes
`rank<r>.pt` with its plan, local shards, dense parameters, eval results; rank 0 also writes
the gathered full state. The first step is recorded apart: the full state before and after it
and the gradients it left on unfused parameters.

Then the ranks checkpoint (torch.distributed.checkpoint into OUT_DIR/ckpt), restore into a
freshly built model and optimizer, and train the original and the restored copy on the same
batches: the record holds the digests saved and restored and of both copies afterwards.
Last, a third copy built from other weights loads the gathered full state (`load_full_state`,
what `train.init_weights` does) and gathers it back, then trains a step.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

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


def _unfused_grads(dmp: Any) -> dict[str, torch.Tensor]:
    """The gradients left on parameters after backward (the dense layers and the replicated
    tables, after DDP's all-reduce; sharded tables update in backward and keep none), by
    state-dict key."""
    by_storage = {p.data_ptr(): p for p in dmp.parameters() if p.grad is not None}
    return {
        key: by_storage[value.data_ptr()].grad.detach().clone()
        for key, value in dmp.state_dict().items()
        if not hasattr(value, "local_shards") and value.data_ptr() in by_storage
    }


def _run(rank: int, out_dir: str, port: int, replicate_max_mb: float, dim: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from ray.train import Checkpoint

    from recsys.embeddings import build_embedding
    from recsys.features.batch import batch_from_encoded
    from recsys.features.schema import FeatureSchema
    from recsys.models.registry import build_model
    from training.checkpoint import (
        Progress,
        _flatten,
        restore_checkpoint,
        save_checkpoint,
        set_lr_scale,
        state_digest,
    )
    from training.config import load_config
    from training.data import ROW_COLUMN, rebatch
    from training.early_stopping import EarlyStopping
    from training.loop import evaluate_distributed
    from training.sharding import gather_full_state, load_full_state, shard_model

    out = Path(out_dir)
    cfg = load_config(
        None,
        [
            "model.num_layers=2",
            f"embedding.dim={dim}",
            "model.attention_dim=16",
            f"train.replicate_max_mb={replicate_max_mb}",
        ],
    )
    schema = FeatureSchema.load(out / "features")

    def build() -> tuple[Any, Any, Any, Any]:
        model = build_model(
            cfg.model, build_embedding(schema, cfg.embedding, device=torch.device("meta")), schema
        )
        return model, *shard_model(model, cfg, WORLD)

    def train_steps(
        model: Any, dmp: Any, optimizer: Any, steps: range, grads: dict[str, Any] | None = None
    ) -> None:
        for step in steps:
            # each rank trains on its own rows, as Ray Data's split gives it
            rows = train.slice(((step * WORLD + rank) * BATCH) % train.num_rows, BATCH)
            batch = batch_from_encoded(schema, rows)
            loss = model.loss(dmp(batch.features), batch.labels)
            optimizer.zero_grad()
            loss.backward()
            if grads is not None:
                grads.update(_unfused_grads(dmp))
            optimizer.step()

    model, dmp, optimizer, plan = build()
    initial = {
        k: v.detach().clone() for k, v in dmp.state_dict().items() if not hasattr(v, "local_shards")
    }
    start = gather_full_state(dmp, rank)
    train = schema.encode(pq.read_table(out / "train.parquet"))
    first_grads: dict[str, Any] = {}
    train_steps(model, dmp, optimizer, range(1), first_grads)
    after_first = gather_full_state(dmp, rank)
    train_steps(model, dmp, optimizer, range(1, STEPS))
    valid = schema.encode(pq.read_table(out / "valid.parquet"))
    valid = valid.append_column(ROW_COLUMN, pa.array(np.arange(valid.num_rows)))
    result = evaluate_distributed(
        dmp, model, schema, rebatch([valid], 48), valid.num_rows, 48, rank=rank, world=WORLD
    )
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

    # checkpoint with a decayed learning rate, restore into a fresh copy, train both further
    initial_lrs = [group["lr"] for group in optimizer.param_groups]
    set_lr_scale(optimizer, initial_lrs, 0.5)
    progress = Progress(EarlyStopping(2, best=0.7, best_epoch=3), epoch=3, step=STEPS, lr_scale=0.5)
    (out / "ckpt").mkdir(exist_ok=True)
    saved = save_checkpoint(out / "ckpt", dmp, optimizer, progress, full, run_dir=out)
    dist.barrier()
    torch.manual_seed(1)  # the fresh copy starts from other weights
    model2, dmp2, optimizer2, _ = build()
    fresh = state_digest(dmp2, optimizer2)
    initial_lrs2 = [group["lr"] for group in optimizer2.param_groups]
    restored = restore_checkpoint(
        Checkpoint.from_directory(out / "ckpt"), dmp2, optimizer2, initial_lrs2, run_dir=out
    )
    train_steps(model, dmp, optimizer, range(STEPS, STEPS + 3))
    train_steps(model2, dmp2, optimizer2, range(STEPS, STEPS + 3))
    record_checkpoint = {
        "saved": saved,
        "fresh": fresh,
        "restored": restored.digest,
        "progress_saved": progress.to_json(),
        "progress_restored": restored.progress.to_json(),
        "best_state": restored.best_state,
        "lrs": [group["lr"] for group in optimizer2.param_groups],
        "initial_lrs": initial_lrs2,
        "continued_original": state_digest(dmp, optimizer),
        "continued_restored": state_digest(dmp2, optimizer2),
    }
    # train.init_weights: a third copy from other weights loads the full state rank 0 gathered
    shared = [full]
    dist.broadcast_object_list(shared, src=0)
    torch.manual_seed(2)
    model3, dmp3, optimizer3, _ = build()
    before_load = gather_full_state(dmp3, rank)
    load_full_state(dmp3, shared[0])
    loaded = gather_full_state(dmp3, rank)
    train_steps(model3, dmp3, optimizer3, range(STEPS, STEPS + 1))  # its optimizers still step
    record_init = {
        "before": before_load,
        "loaded": loaded,
        "stepped": gather_full_state(dmp3, rank),
    }
    record = {
        "replicate_max_mb": replicate_max_mb,
        "dim": dim,
        "plan": {
            table: str(p.sharding_type)
            for module_plan in plan.plan.values()
            for table, p in module_plan.items()
        },  # type: ignore[attr-defined]
        "local_shards": local_shards,
        "initial": initial,
        "dense": dense,
        "optimizer_state": {
            key: tuple(value.shape)
            for key, value in _flatten(optimizer.state_dict())
            if isinstance(value, torch.Tensor)
        },
        "rows": result.rows,
        "probs": result.probs,
        "metrics": result.metrics,
        "full_state": full,
        "first_step": {"start": start, "grads": first_grads, "after": after_first},
        "checkpoint": record_checkpoint,
        "init_weights": record_init,
    }
    torch.save(record, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    replicate = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    dim = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    mp.spawn(_run, args=(sys.argv[1], _free_port(), replicate, dim), nprocs=WORLD)
