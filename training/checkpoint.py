"""Per-epoch checkpoints of a sharded run, and resuming from them.

A checkpoint is one folder that Ray Train assembles from every worker's files:

- `.metadata`, `__<rank>_0.distcp`: torch.distributed.checkpoint (DCP) of the model state
  (each rank writes only its own table shards; dense replicas are written once) and of the
  CombinedOptimizer state (the fused row-wise Adagrad's sharded `momentum1` and Adam's
  `exp_avg`/`exp_avg_sq`/`step`). Loading needs the same world size and plan.
- `progress.json` (rank 0): epoch, step, learning-rate scale, early-stopping state, the best
  epoch's valid metrics and parity sample, and the running totals for throughput.
- `best_state.safetensors` (rank 0): the best epoch's full (gathered) state, which the run
  exports at the end.
- `rng_rank<r>.pt`: each rank's torch RNG state (dropout).
- `digest.json` (rank 0): sha256 of every tensor of the model and optimizer state as saved, so
  a restore can prove it got the same state back.

Rank 0 also appends one line per checkpoint to `<run>/checkpoints.jsonl` and one per restore to
`<run>/restores.jsonl` (epoch, digest saved, digest after the restore): the run folder keeps
that history after Ray deletes old checkpoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray.train
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed._shard.sharded_tensor import ShardedTensor

from training.early_stopping import EarlyStopping

if TYPE_CHECKING:
    from torchrec.optim.keyed import CombinedOptimizer

logger = logging.getLogger("training")

PROGRESS_FILE = "progress.json"
BEST_STATE_FILE = "best_state.safetensors"
DIGEST_FILE = "digest.json"
CHECKPOINT_LOG = "checkpoints.jsonl"
RESTORE_LOG = "restores.jsonl"


@dataclass
class BestValid:
    """The best epoch's valid metrics and the first rows' predictions (the export's parity
    check rescored them from the artifact)."""

    metrics: dict[str, float]
    rows: list[int]
    probs: dict[str, list[float]]


@dataclass
class Progress:
    """Everything besides tensors that a resumed run needs to go on as if never stopped."""

    stopper: EarlyStopping
    epoch: int = 0  # last finished epoch
    step: int = 0
    lr_scale: float = 1.0  # every learning rate is its initial value times this
    stopped: bool = False  # early stopping decided to stop after `epoch`
    best_valid: BestValid | None = None
    train_rows: int = 0  # rows trained, all ranks together, over every finished epoch
    train_s: float = 0.0  # seconds in training steps (no evaluation), over the same epochs
    wall_s: float = 0.0  # seconds of finished epochs, evaluation and checkpoints included

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Progress:
        raw = json.loads(text)
        raw["stopper"] = EarlyStopping(**raw["stopper"])
        if raw["best_valid"] is not None:
            raw["best_valid"] = BestValid(**raw["best_valid"])
        return cls(**raw)


@dataclass
class Restored:
    """What `restore_checkpoint` brought back (best_state only on rank 0)."""

    progress: Progress
    best_state: dict[str, torch.Tensor] | None
    digest: dict[str, str] = field(default_factory=dict)


def set_lr_scale(optimizer: CombinedOptimizer, initial_lrs: list[float], scale: float) -> None:
    """Sets every param group's learning rate to its initial value times `scale` (the fused
    table optimizer passes it to fbgemm at the next zero_grad/step)."""
    for group, initial in zip(optimizer.param_groups, initial_lrs, strict=True):
        group["lr"] = initial * scale


def state_digest(dmp: torch.nn.Module, optimizer: CombinedOptimizer) -> dict[str, str]:
    """sha256 of the model and the optimizer state over all ranks (a collective).

    Every rank hashes each tensor it holds: a table shard keyed by its global offsets, a dense
    replica keyed by its rank; learning rates are part of the optimizer's digest. The same
    state on the same world size and plan gives the same digest.
    """
    rank = dist.get_rank()
    local: dict[str, list[tuple[str, str]]] = {"model": [], "optimizer": []}
    for part, state in (("model", dmp.state_dict()), ("optimizer", optimizer.state_dict())):
        for key, value in _flatten(state):
            if isinstance(value, ShardedTensor):
                for shard in value.local_shards():
                    where = "@" + ",".join(map(str, shard.metadata.shard_offsets))
                    local[part].append((key + where, _tensor_sha(shard.tensor)))
            elif isinstance(value, torch.Tensor):
                local[part].append((f"{key}#rank{rank}", _tensor_sha(value)))
            else:
                local[part].append((f"{key}#rank{rank}", repr(value)))
    lrs = [float(group["lr"]) for group in optimizer.param_groups]
    local["optimizer"].append((f"lr#rank{rank}", repr(lrs)))
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    digest = {}
    for part in ("model", "optimizer"):
        entries = sorted(entry for per_rank in gathered for entry in per_rank[part])
        digest[part] = hashlib.sha256(json.dumps(entries).encode()).hexdigest()
    return digest


def _tensor_sha(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous()
    head = f"{data.dtype}{tuple(data.shape)}".encode()
    return hashlib.sha256(head + data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _flatten(state: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in state.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield prefix + str(key), value


def _dcp_state(dmp: torch.nn.Module, optimizer: CombinedOptimizer) -> dict[str, Any]:
    return {"model": dmp.state_dict(), "optimizer": optimizer.state_dict()}


def save_checkpoint(
    directory: Path,
    dmp: torch.nn.Module,
    optimizer: CombinedOptimizer,
    progress: Progress,
    best_state: dict[str, torch.Tensor] | None,
    run_dir: Path,
) -> dict[str, str]:
    """Writes this rank's part of the checkpoint of `progress.epoch` into `directory` (a
    collective: every rank calls it; Ray Train merges the ranks' folders when they report)."""
    rank = dist.get_rank()
    digest = state_digest(dmp, optimizer)
    dcp.save(_dcp_state(dmp, optimizer), checkpoint_id=str(directory))
    torch.save(torch.get_rng_state(), directory / f"rng_rank{rank}.pt")
    if rank == 0:
        (directory / PROGRESS_FILE).write_text(progress.to_json())
        (directory / DIGEST_FILE).write_text(json.dumps(digest))
        if best_state is not None:
            save_file(
                {k: v.contiguous() for k, v in best_state.items()}, directory / BEST_STATE_FILE
            )
        record = {"epoch": progress.epoch, "step": progress.step, "digest": digest}
        with (run_dir / CHECKPOINT_LOG).open("a") as f:
            f.write(json.dumps(record) + "\n")
    return digest


@contextmanager
def checkpoint_folder(epoch: int) -> Iterator[Path]:
    """A fresh local folder for one rank's checkpoint files, removed after the report."""
    with tempfile.TemporaryDirectory(prefix=f"recsys-ckpt-e{epoch}-") as tmp:
        yield Path(tmp)


def restore_checkpoint(
    checkpoint: ray.train.Checkpoint,
    dmp: torch.nn.Module,
    optimizer: CombinedOptimizer,
    initial_lrs: list[float],
    run_dir: Path,
) -> Restored:
    """Loads the model, both optimizers, learning rates, RNG and progress from `checkpoint`
    (a collective), then proves the state equals the saved one by its digest.

    Raises:
        RuntimeError: the restored state's digest differs from the one saved with it.
    """
    rank = dist.get_rank()
    with checkpoint.as_directory() as path:
        folder = Path(path)
        _init_lazy_optimizer_state(optimizer)
        state = _dcp_state(dmp, optimizer)
        dcp.load(state, checkpoint_id=str(folder))
        dmp.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        progress = Progress.from_json((folder / PROGRESS_FILE).read_text())
        set_lr_scale(optimizer, initial_lrs, progress.lr_scale)
        rng = folder / f"rng_rank{rank}.pt"
        if rng.exists():
            torch.set_rng_state(torch.load(rng, weights_only=True))
        best_state = None
        if rank == 0 and (folder / BEST_STATE_FILE).exists():
            best_state = load_file(folder / BEST_STATE_FILE)
        saved = json.loads((folder / DIGEST_FILE).read_text())
    digest = state_digest(dmp, optimizer)
    if rank == 0:
        record = {
            "epoch": progress.epoch,
            "checkpoint": str(checkpoint.path),
            "saved_digest": saved,
            "restored_digest": digest,
        }
        with (run_dir / RESTORE_LOG).open("a") as f:
            f.write(json.dumps(record) + "\n")
        logger.info(
            "resumed from epoch %d (checkpoint %s; state sha256 model=%s optimizer=%s)",
            progress.epoch,
            checkpoint.path,
            digest["model"][:16],
            digest["optimizer"][:16],
        )
    if digest != saved:
        raise RuntimeError(
            f"checkpoint: the state restored from {checkpoint.path} differs from the state "
            f"saved there (digest {digest} != {saved}); was it written with another world "
            f"size or sharding plan?"
        )
    return Restored(progress, best_state, digest)


def _init_lazy_optimizer_state(optimizer: CombinedOptimizer) -> None:
    """Adam creates its state at the first step; DCP loads into existing tensors only. A
    zero-gradient step creates it (the fused table optimizer's state exists already); the
    parameters it may touch are overwritten by the load that follows."""
    for _, keyed in optimizer.optimizers:
        if not keyed.state:
            keyed.init_state()


def best_valid_sample(
    metrics: dict[str, float], rows: np.ndarray, probs: dict[str, np.ndarray], num_rows: int
) -> BestValid:
    """The best epoch's metrics and its first `num_rows` predictions, as stored in progress."""
    return BestValid(
        metrics={k: float(v) for k, v in metrics.items()},
        rows=[int(r) for r in rows[:num_rows]],
        probs={t: [float(p) for p in v[:num_rows]] for t, v in probs.items()},
    )
