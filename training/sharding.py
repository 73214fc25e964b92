"""Sharding a model's tables with TorchRec and building its two optimizers.

Tables are sharded table-wise or row-wise (never data-parallel: each rank holds only its own
shards) by TorchRec's planner; the dense part is replicated by DMP (DDP inside). Tables train
with a fused row-wise Adagrad applied in backward; dense parameters with Adam. Both sit in one
CombinedOptimizer so the loop calls `step()` once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from recsys.models.outputs import CTRModel
from training.config import ExperimentConfig

ALLOWED_SHARDING = [ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value]


def shard_model(
    model: CTRModel, cfg: ExperimentConfig, world_size: int, device: torch.device | None = None
) -> tuple[DistributedModelParallel, CombinedOptimizer, ShardingPlan]:
    """Wraps `model` (tables on the meta device) in DMP and builds the combined optimizer."""
    device = device or torch.device("cpu")
    tables = [m for m in model.modules() if isinstance(m, EmbeddingBagCollection)]
    for ebc in tables:
        _apply_optimizer_in_backward(
            RowWiseAdagrad,
            ebc.parameters(),
            {"lr": cfg.train.table_lr, "eps": cfg.train.table_eps},
        )
    constraints = {
        config.name: ParameterConstraints(sharding_types=ALLOWED_SHARDING)
        for ebc in tables
        for config in ebc.embedding_bag_configs()
    }
    topology = Topology(world_size=world_size, compute_device=device.type)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    plan = planner.collective_plan(model, [EmbeddingBagCollectionSharder()], dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(
        model, device=device, plan=plan, sharders=[EmbeddingBagCollectionSharder()]
    )
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.Adam(
            params, lr=cfg.train.dense_lr, weight_decay=cfg.train.dense_weight_decay
        ),
    )
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense]), plan


def gather_full_state(dmp: torch.nn.Module, rank: int) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) state dict on rank 0, None elsewhere. A collective: every rank
    must call it. Keys match the unsharded model's state dict."""
    full: dict[str, torch.Tensor] = {}
    for key, value in dmp.state_dict().items():
        if isinstance(value, ShardedTensor):
            out = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
            value.gather(dst=0, out=out)
            if out is not None:
                full[key] = out
        elif rank == 0:
            full[key] = value.detach().clone()
    return full if rank == 0 else None
