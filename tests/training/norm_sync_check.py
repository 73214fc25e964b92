"""Two gloo ranks train ARM-Net (BatchNorm in its neurons and MLP) through `shard_model` on
different rows, then score the same rows: prints one JSON line with the largest difference
between the ranks' eval probabilities before and after `share_rank0_norm_statistics`, and
whether rank 1 then holds rank 0's statistics.

Run by tests/training/test_sharding.py as a subprocess (`python norm_sync_check.py`), so the
spawned ranks import nothing from pytest.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[2]
WORLD, STEPS, BATCH = 2, 4, 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(rank: int, port: int) -> None:
    sys.path.insert(0, str(REPO))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from recsys.data.movielens import ML100K_CTR_SCHEMA
    from recsys.embeddings import build_embedding
    from recsys.features.batch import batch_from_encoded
    from recsys.features.schema import fit_feature_schema
    from recsys.models.registry import build_model
    from tests.tiny_data import make_tiny_table
    from training.config import load_config
    from training.sharding import shard_model, share_rank0_norm_statistics

    table = make_tiny_table()
    schema = fit_feature_schema(ML100K_CTR_SCHEMA, [table])
    cfg = load_config(
        REPO / "configs" / "armnet_ml100k.yaml",
        ["embedding.dim=4", "model.num_neurons=8", "model.mlp_hidden_units=[16]"],
    )
    embedding = build_embedding(schema, cfg.embedding, device=torch.device("meta"))
    model = build_model(cfg.model, embedding, schema)
    dmp, optimizer, _ = shard_model(model, cfg, WORLD)
    encoded = schema.encode(table)
    dmp.train()
    for step in range(STEPS):  # each rank its own rows, as in training
        batch = batch_from_encoded(schema, encoded.slice((step * WORLD + rank) * BATCH, BATCH))
        loss = model.loss(dmp(batch.features), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def spread() -> float:
        dmp.eval()
        with torch.no_grad():
            same = batch_from_encoded(schema, encoded.slice(0, BATCH))
            probs = torch.sigmoid(dmp(same.features).logits["ctr"])
        gathered = [torch.empty_like(probs) for _ in range(WORLD)]
        dist.all_gather(gathered, probs)
        return float((gathered[0] - gathered[1]).abs().max())

    before = spread()
    share_rank0_norm_statistics(dmp)
    after = spread()
    norm = model.neuron_norm
    mean = norm.running_mean.clone()
    means = [torch.empty_like(mean) for _ in range(WORLD)]
    dist.all_gather(means, mean)
    if rank == 0:
        print(  # noqa: T201 - the test reads this line
            json.dumps(
                {
                    "before": before,
                    "after": after,
                    "same_statistics": bool(torch.equal(means[0], means[1])),
                }
            ),
            flush=True,
        )
    dist.barrier()
    dist.destroy_process_group()
    # Past this point only interpreter teardown remains, where a gloo/DDP thread still
    # joinable aborted the process now and then ("terminate called without an active
    # exception"), after the record was printed; it says nothing about the check.
    os._exit(0)


if __name__ == "__main__":
    mp.spawn(_rank, args=(_free_port(),), nprocs=WORLD)
