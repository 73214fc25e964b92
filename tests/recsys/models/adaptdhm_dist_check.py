"""Two gloo processes run AdaptDHM training forwards on different rows; each records its centres.

Run by tests/recsys/models/test_adaptdhm.py as a subprocess (`python adaptdhm_dist_check.py
OUT_DIR`), so the spawned ranks import nothing from pytest. OUT_DIR must hold `features/` (a
saved FeatureSchema) and `rank0.parquet`/`rank1.parquet` (raw rows; rank r reads its own file).
Each rank writes `rank<r>.pt` with the router buffers of every case after the forwards.

Forwards only, no optimizer step: the dense weights stay equal on both ranks without DDP, so the
test can compare with one process routing the two ranks' rows as one batch.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
STEPS = 4
BATCH = 64
# case name -> config fields; "perturbed" starts rank 1 from other centres, which the
# first training forward must replace by rank 0's.
CASES = {
    "reseeding": {"min_occupancy": 0.05},
    "perturbed": {"min_occupancy": 0.0},
}
TINY = {"num_clusters": 3, "bottom_hidden_units": (16,), "tower_hidden_units": (8,)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(rank: int, out_dir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    from recsys.embeddings import EmbeddingConfig, build_embedding
    from recsys.features.batch import features_from_encoded
    from recsys.features.schema import FeatureSchema
    from recsys.models.adaptdhm import AdaptDHM, AdaptDHMConfig

    out = Path(out_dir)
    schema = FeatureSchema.load(out / "features")
    rows = schema.encode(pq.read_table(out / f"rank{rank}.parquet"))
    record = {}
    for case, fields in CASES.items():
        torch.manual_seed(0)
        config = AdaptDHMConfig(**TINY, **fields)
        model = AdaptDHM(config, build_embedding(schema, EmbeddingConfig(dim=4)), schema).train()
        if case == "perturbed" and rank == 1:
            model.router.centres.copy_(torch.nn.functional.normalize(torch.randn(3, 16), dim=-1))
        for step in range(STEPS):
            model(features_from_encoded(schema, rows.slice(step * BATCH, BATCH)))
        record[case] = {k: v.clone() for k, v in model.router.state_dict().items()}
    torch.save(record, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(_run, args=(sys.argv[1], _free_port()), nprocs=WORLD)
