"""`train_loop_per_worker`: what each Ray Train worker runs, top to bottom.

typed config -> fitted features -> model (tables on meta, then sharded by TorchRec DMP over
gloo) -> fused row-wise Adagrad on tables + Adam on dense parameters -> epochs over this
worker's shard of the train split (Ray Data) -> distributed evaluation on valid (every row once,
gathered) -> one broadcast early-stopping decision -> rank 0 gathers full tables of the best
epoch, scores test, exports the artifact and rescored valid rows from it as a parity check.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data
import ray.train
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict

from recsys.artifact import load_artifact, score_table, write_artifact
from recsys.embeddings import build_embedding
from recsys.features.batch import batch_from_encoded, features_from_encoded
from recsys.features.schema import FeatureSchema
from recsys.metrics import binary_metrics
from recsys.models.outputs import CTRModel
from recsys.models.registry import build_model
from training.config import ExperimentConfig
from training.data import GROUP_COLUMN, ROW_COLUMN, iter_tables, split_files
from training.early_stopping import EarlyStopping
from training.sharding import gather_full_state, shard_model

logger = logging.getLogger("training")
RESULT_FILE = "result.json"
LOG_FILE = "train.log"


class RunPaths(BaseModel):
    """Folders the driver prepared for this run (passed to workers with the config)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_dir: str
    features_dir: str
    encoded_dir: str
    raw_root: str
    side_dir: str


@dataclass
class EvalResult:
    metrics: dict[str, float]
    rows: np.ndarray  # row indices, ascending
    probs: dict[str, np.ndarray]  # task -> probabilities in row order


def report(kind: str, metrics: dict[str, Any], rank: int) -> None:
    """The one progress path: a log line on rank 0; eval lines also go to Ray Train (all ranks
    call it the same number of times, as Ray Train's report is a barrier)."""
    if rank == 0:
        body = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        logger.info("%-5s %s", kind, body)
    if kind in ("eval", "final"):
        ray.train.report({"kind": kind, **metrics})


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg = ExperimentConfig.model_validate(config["experiment"])
    paths = RunPaths.model_validate(config["paths"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if rank == 0:
        # A worker process is an entry point: rank 0 logs to the driver's output (Ray forwards
        # it) and to LOG_FILE in the run folder, so the log outlives the session.
        logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
        file_handler = logging.FileHandler(Path(paths.run_dir) / LOG_FILE)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(file_handler)
    torch.set_num_threads(cfg.ray.threads_per_worker)
    torch.manual_seed(cfg.train.seed)

    schema = FeatureSchema.load(Path(paths.features_dir))
    embedding = build_embedding(schema, cfg.embedding, device=torch.device("meta"))
    model = build_model(cfg.model, embedding, schema)
    dmp, optimizer, plan = shard_model(model, cfg, world)
    initial_lrs = [group["lr"] for group in optimizer.param_groups]
    if rank == 0:
        logger.info("sharding plan:\n%s", plan)

    ray.data.DataContext.get_current().enable_progress_bars = False
    loaded_at = time.perf_counter()
    valid = _load_eval_split("valid")
    if rank == 0:
        logger.info(
            "valid split loaded: %d rows in %.1fs", valid.num_rows, time.perf_counter() - loaded_at
        )
    stopper = EarlyStopping(cfg.train.patience)
    best_state: dict[str, torch.Tensor] | None = None
    best_valid: EvalResult | None = None
    step, started = 0, time.perf_counter()
    for epoch in range(1, cfg.train.max_epochs + 1):
        dmp.train()
        epoch_start, epoch_rows, loss_sum = time.perf_counter(), 0, 0.0
        shard = ray.train.get_dataset_shard("train")
        batches = shard.iter_batches(
            batch_size=cfg.train.batch_size,
            batch_format="pyarrow",
            drop_last=True,
            local_shuffle_buffer_size=4 * cfg.train.batch_size,
            local_shuffle_seed=cfg.train.seed + epoch * 1000 + rank,
        )
        for epoch_steps, table in enumerate(batches, start=1):
            batch = batch_from_encoded(schema, table)
            output = dmp(batch.features)
            loss = model.loss(output, batch.labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            epoch_rows += batch.batch_size
            loss_sum += float(loss.detach())
            if step % cfg.train.log_every_steps == 0:
                elapsed = time.perf_counter() - epoch_start
                report(
                    "train",
                    {
                        "step": step,
                        "epoch": epoch,
                        "loss": loss_sum / epoch_steps,
                        "ex_per_s": epoch_rows * world / max(elapsed, 1e-9),
                        "lr": optimizer.param_groups[-1]["lr"],
                    },
                    rank,
                )
        train_s = time.perf_counter() - epoch_start

        result = evaluate_distributed(
            dmp, model, schema, valid, cfg.train.eval_batch_size, rank, world
        )
        improved = stopper.update(result.metrics["auc"], epoch)
        if not improved:
            # reduce on plateau: the same decision on every rank (metrics were gathered)
            for group, initial in zip(optimizer.param_groups, initial_lrs, strict=True):
                scaled = group["lr"] * cfg.train.lr_decay_on_plateau
                group["lr"] = max(scaled, initial * cfg.train.min_lr_scale)
        # One decision for all ranks: rank 0's, broadcast (ranks computed the same metrics,
        # but a broadcast makes disagreement impossible rather than unlikely).
        decision = torch.tensor([int(stopper.should_stop)])
        dist.broadcast(decision, src=0)
        if improved:
            best_state = gather_full_state(dmp, rank)
            best_valid = result
        report(
            "eval",
            {
                "epoch": epoch,
                "auc": result.metrics["auc"],
                "logloss": result.metrics["logloss"],
                "best_auc": stopper.best,
                "patience": f"{stopper.bad_epochs}/{cfg.train.patience}",
                "train_s": train_s,
                "train_ex_per_s": epoch_rows * world / max(train_s, 1e-9),
            },
            rank,
        )
        if bool(decision.item()):
            break

    final: list[dict[str, Any] | None] = [None]
    if rank == 0:
        assert best_state is not None and best_valid is not None
        final[0] = _finish_on_rank0(
            cfg, paths, schema, best_state, best_valid, stopper, time.perf_counter() - started
        )
        (Path(paths.run_dir) / RESULT_FILE).write_text(json.dumps(final[0], indent=2))
    dist.broadcast_object_list(final, src=0)
    report("final", final[0] or {}, rank)


def _load_eval_split(name: str) -> pa.Table:
    """Every worker materialises the whole (small) eval split, sorted by row index, so all
    ranks agree on its batches without depending on Ray Data's block order."""
    shard = ray.train.get_dataset_shard(name)
    tables = list(shard.iter_batches(batch_size=None, batch_format="pyarrow"))
    table = pa.concat_tables(tables)
    return table.take(pc.sort_indices(table[ROW_COLUMN]))


@torch.no_grad()
def evaluate_distributed(
    dmp: torch.nn.Module,
    model: CTRModel,
    schema: FeatureSchema,
    table: pa.Table,
    batch_size: int,
    rank: int,
    world: int,
) -> EvalResult:
    """Scores every row of `table` exactly once across ranks and gathers the predictions.

    Batch i is scored by rank i % world; ranks with fewer batches repeat their last batch and
    drop its output, because the sharded tables need every rank in every forward pass. Every
    forward pass has exactly `batch_size` rows (a short last batch is padded by repeating its
    rows), so all ranks send equal batches through the embedding all-to-all, as in training.
    """
    dmp.eval()
    num_batches = -(-table.num_rows // batch_size)
    mine = list(range(rank, num_batches, world))
    per_rank = -(-num_batches // world)
    rows, probs = [], {t: [] for t in model.served_tasks}
    for i in range(per_rank):
        real = i < len(mine)
        index = mine[i] if real else (mine[-1] if mine else 0)
        chunk = table.slice(index * batch_size, batch_size)
        size = chunk.num_rows
        if size < batch_size:
            chunk = chunk.take(pa.array(np.arange(batch_size) % size))
        output = model.probabilities(dmp(features_from_encoded(schema, chunk)))
        if real:
            rows.append(chunk[ROW_COLUMN].to_numpy()[:size])
            for task, p in output.items():
                probs[task].append(p.numpy()[:size])
    local = (
        np.concatenate(rows) if rows else np.zeros(0, np.int64),
        {t: np.concatenate(v) if v else np.zeros(0) for t, v in probs.items()},
    )
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, local)
    all_rows = np.concatenate([g[0] for g in gathered])
    order = np.argsort(all_rows)
    all_probs = {t: np.concatenate([g[1][t] for g in gathered])[order] for t in probs}
    sorted_rows = all_rows[order]
    if not np.array_equal(sorted_rows, table[ROW_COLUMN].to_numpy()):
        raise RuntimeError("evaluation: gathered rows do not cover the split exactly once")
    return EvalResult(split_metrics(schema, table, all_probs), sorted_rows, all_probs)


def split_metrics(
    schema: FeatureSchema, table: pa.Table, probs: dict[str, np.ndarray]
) -> dict[str, float]:
    """Metrics of every trained task with a label column in `table` (raw or encoded rows;
    GAUC groups by the raw user id, in the `__group__` column of encoded rows). The first
    task's metrics are also given unprefixed."""
    groups = None
    if GROUP_COLUMN in table.column_names:
        groups = table[GROUP_COLUMN].to_numpy(zero_copy_only=False)
    elif schema.dataset.user is not None and schema.dataset.user.id_column in table.column_names:
        groups = table[schema.dataset.user.id_column].to_numpy(zero_copy_only=False)
    metrics: dict[str, float] = {}
    for i, label in enumerate(schema.dataset.labels):
        if label.task_name not in probs or label.name not in table.column_names:
            continue
        labels = table[label.name].to_numpy(zero_copy_only=False)
        values = binary_metrics(labels, probs[label.task_name], groups)
        metrics.update({f"{label.task_name}_{k}": v for k, v in values.items()})
        if i == 0:
            metrics.update(values)
    return metrics


def _finish_on_rank0(
    cfg: ExperimentConfig,
    paths: RunPaths,
    schema: FeatureSchema,
    best_state: dict[str, torch.Tensor],
    best_valid: EvalResult,
    stopper: EarlyStopping,
    train_wall_s: float,
) -> dict[str, Any]:
    """Rebuilds the best epoch's model unsharded, scores test, exports, checks parity."""
    model = build_model(cfg.model, build_embedding(schema, cfg.embedding), schema)
    model.load_state_dict(best_state)
    model.eval()
    raw_root = Path(paths.raw_root)
    test_raw = pa.concat_tables(list(iter_tables(split_files(raw_root, "test"))))
    test_probs = {t: p.numpy() for t, p in score_table(model, schema, test_raw).items()}
    test_metrics = split_metrics(schema, test_raw, test_probs)
    metrics = {
        "best_epoch": stopper.best_epoch,
        "valid": best_valid.metrics,
        "test": test_metrics,
        "train_wall_s": train_wall_s,
        "data": {"dataset": cfg.data.dataset, "path": str(raw_root.resolve())},
        "num_workers": cfg.ray.num_workers,
    }
    side_dir = Path(paths.side_dir)
    side = {p.stem: pq.read_table(p) for p in sorted(side_dir.glob("*.parquet"))}
    artifact_dir = write_artifact(
        Path(cfg.output.model_repo),
        cfg.output.model_name,
        model,
        cfg.model,
        cfg.embedding,
        schema,
        metrics,
        side,
    )

    # Parity: rescore the first valid rows from the artifact as written to disk, through the
    # raw-rows path, and compare with what the sharded model predicted at the best epoch.
    loaded = load_artifact(artifact_dir)
    n = min(cfg.train.parity_rows, len(best_valid.rows))
    valid_raw = pa.concat_tables(list(iter_tables(split_files(raw_root, "valid"))))
    sample = valid_raw.take(pa.array(best_valid.rows[:n]))
    rescored = score_table(loaded.model, loaded.schema, sample)
    max_diff = max(
        float(np.abs(rescored[t].numpy() - best_valid.probs[t][:n]).max()) for t in rescored
    )
    if max_diff > 1e-5:
        raise RuntimeError(
            f"export: artifact {artifact_dir} scores valid rows differently from "
            f"the trained model (max |diff| {max_diff:.2e}, expected <= 1e-5)"
        )
    return {
        "artifact": str(artifact_dir),
        "best_epoch": stopper.best_epoch,
        "valid_auc": best_valid.metrics["auc"],
        "valid_logloss": best_valid.metrics["logloss"],
        "test_auc": test_metrics["auc"],
        "test_logloss": test_metrics["logloss"],
        "parity_max_abs_diff": max_diff,
        "parity_rows": n,
    }
