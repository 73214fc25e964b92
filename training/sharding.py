"""Sharding a model's tables with TorchRec and building its optimizers.

Tables are sharded table-wise or row-wise by TorchRec's planner, except tables no larger than
`train.replicate_max_mb`, which are replicated (data-parallel); the dense part is replicated by
DMP (DDP inside). Sharded tables train with a fused row-wise Adagrad applied in backward,
replicated tables with the same row-wise Adagrad as a regular optimizer after DDP's all-reduce
(TorchRec's data-parallel kernel is the dense one, not fused), dense parameters with Adam. All
sit in one CombinedOptimizer so the loop calls `step()` once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from recsys.errors import ConfigError
from recsys.models.outputs import CTRModel
from training.config import ExperimentConfig

ALLOWED_SHARDING = [ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value]
REPLICATED = ShardingType.DATA_PARALLEL.value


def table_mb(config: EmbeddingBagConfig) -> float:
    """A table's fp32 weights in MB."""
    return config.num_embeddings * config.embedding_dim * 4 / 2**20


def table_sharding_types(
    config: EmbeddingBagConfig, replicate_max_mb: float, world_size: int = 2
) -> list[str]:
    """The sharding types the planner may pick for one table: replicated when its fp32 weights
    fit in `replicate_max_mb`, else table- or row-wise.

    On one worker there is nothing to exchange, and the sharded (fused, sparse-update) kernel
    is faster than the replicated (dense-gradient) one: measured on AutoInt at the peer's
    configuration, 33.5 ms against 39.8 ms per 1024-row step. So one worker shards every table
    it can, and replicates only widths the sharded kernels refuse.
    """
    if table_mb(config) > replicate_max_mb or (world_size == 1 and config.embedding_dim % 4 == 0):
        return ALLOWED_SHARDING
    return [REPLICATED]


def check_table_widths(tables: Iterable[EmbeddingBagConfig], replicate_max_mb: float) -> None:
    """Refuses a sharded table whose width is not a multiple of 4 (FBGEMM's sharded kernels
    assert it); replicated tables may have any width.

    Raises:
        ConfigError: naming the table and both ways out.
    """
    for config in tables:
        if config.embedding_dim % 4 == 0:
            continue
        if REPLICATED in table_sharding_types(config, replicate_max_mb):
            continue
        raise ConfigError(
            f"table {config.name} ({config.num_embeddings} rows, width "
            f"{config.embedding_dim}): a sharded table's width must be a multiple of 4 "
            f"(FBGEMM's kernels); use a width that is a multiple of 4, or replicate the table "
            f"with train.replicate_max_mb >= {math.ceil(table_mb(config) * 100) / 100:g}"
        )


def model_tables(model: torch.nn.Module) -> list[EmbeddingBagConfig]:
    """The table configs of every EmbeddingBagCollection in `model`."""
    return [
        config
        for ebc in model.modules()
        if isinstance(ebc, EmbeddingBagCollection)
        for config in ebc.embedding_bag_configs()
    ]


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
    configs = model_tables(model)
    check_table_widths(configs, cfg.train.replicate_max_mb)
    constraints = {
        config.name: ParameterConstraints(
            sharding_types=table_sharding_types(config, cfg.train.replicate_max_mb, world_size)
        )
        for config in configs
    }
    # The factory builds the same topology as `Topology(...)`, and the fixed reservation keeps
    # the default's 15% margin without its estimate of the dense weights and input batches
    # (small beside the tables here). Built that way, TorchRec 1.8 no longer prints three
    # warnings on every worker: a directly built topology, the heuristic's deprecation and its
    # dense-size estimate.
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=world_size), kernel_config=KernelConfig(compute_device=device.type)
    )
    planner = EmbeddingShardingPlanner(
        topology=topology,
        constraints=constraints,
        storage_reservation=FixedPercentageStorageReservation(percentage=0.15),
    )
    plan = planner.collective_plan(model, [EmbeddingBagCollectionSharder()], dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(
        model, device=device, plan=plan, sharders=[EmbeddingBagCollectionSharder()]
    )
    replicated_suffixes = tuple(
        f"{path}.embedding_bags.{table}.weight"
        for path, module_plan in plan.plan.items()
        for table, parameter_sharding in module_plan.items()  # type: ignore[attr-defined]
        if parameter_sharding.sharding_type == REPLICATED
    )
    unfused = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    replicated = {k: v for k, v in unfused.items() if k.endswith(replicated_suffixes)}
    dense = KeyedOptimizerWrapper(
        {k: v for k, v in unfused.items() if k not in replicated},
        lambda params: torch.optim.Adam(
            params, lr=cfg.train.dense_lr, weight_decay=cfg.train.dense_weight_decay
        ),
    )
    optimizers: list[KeyedOptimizer] = [dmp.fused_optimizer, dense]
    if replicated:
        optimizers.insert(
            1,
            KeyedOptimizerWrapper(
                replicated,
                lambda params: RowWiseAdagrad(
                    params, lr=cfg.train.table_lr, eps=cfg.train.table_eps
                ),
            ),
        )
    return dmp, CombinedOptimizer(optimizers), plan


def check_full_state(model: torch.nn.Module, path: Path) -> None:
    """Checks that the safetensors file `path` holds every weight of `model` (an unsharded or
    meta-device model) with its shape, and nothing else, reading only the file's header.

    Raises:
        ConfigError: the file is missing or unreadable, or its keys or shapes differ.
    """
    if not path.is_file():
        raise ConfigError(
            f"train.init_weights: {path} does not exist (expected a safetensors state dict of "
            f"this model, e.g. the search's init.safetensors)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ConfigError(f"train.init_weights: {path} is not a safetensors file ({e})") from e
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if expected[k] != shapes[k])
    if missing or unexpected or wrong:
        raise ConfigError(
            f"train.init_weights: {path} does not fit this model (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, other shapes {wrong[:5]}); it must be written for "
            f"the same model, embedding and vocabularies"
        )


@torch.no_grad()
def load_full_state(dmp: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Loads a full (unsharded) state dict into a sharded model: each rank copies its own rows
    and columns of every sharded table (its local shards' offsets) and all of every replicated
    weight. The reverse of `gather_full_state`; every rank calls it with the same `full`.

    Raises:
        ConfigError: a key is missing from `full` or has another shape.
    """
    state = dmp.state_dict()
    for key, value in state.items():
        source = full.get(key)
        if source is None or tuple(source.shape) != tuple(value.size()):
            raise ConfigError(
                f"train.init_weights: no weight {key} of shape {tuple(value.size())} in the "
                f"file (got {None if source is None else tuple(source.shape)})"
            )
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                offsets, sizes = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                index = tuple(slice(o, o + n) for o, n in zip(offsets, sizes, strict=True))
                shard.tensor.copy_(source[index])
        else:
            value.copy_(source)
    dmp.load_state_dict(state)


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


def share_rank0_norm_statistics(dmp: torch.nn.Module) -> None:
    """Gives every rank rank 0's BatchNorm running statistics (ARM-Net's). A collective.

    TorchRec wraps the dense part in DDP with `broadcast_buffers=False`, so each rank's running
    mean and variance follow only its own batches. Ranks then scored the same row differently
    in the distributed evaluation (which early stopping follows), and differently from the
    exported model, which holds rank 0's. Only BatchNorm buffers are shared: the sharded tables'
    kernels hold per-rank buffers too, and those must stay each rank's own.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
    for module in dmp.modules():
        if isinstance(module, norms):
            for buffer in module.buffers(recurse=False):
                dist.broadcast(buffer, src=0)
