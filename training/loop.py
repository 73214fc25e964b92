"""`train_loop_per_worker`: what each Ray Train worker runs, top to bottom.

typed config -> fitted features -> model (tables on meta, then sharded by TorchRec DMP over
gloo) -> fused row-wise Adagrad on tables + Adam on dense parameters -> resume from Ray Train's
latest checkpoint if there is one -> epochs over this worker's shard of the train split (Ray
Data) -> distributed evaluation on valid (streamed from Parquet, every row once, gathered) ->
one broadcast early-stopping decision -> a checkpoint reported with the epoch's metrics ->
rank 0 exports the best epoch's full state, scores test and rescored valid rows from the
artifact as a parity check; the result (with rows/s and peak memory) goes to the run folder.
"""

from __future__ import annotations

import itertools
import json
import logging
import resource
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
import ray.train
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict
from ray.train import Checkpoint
from safetensors.torch import load_file

from recsys.artifact import load_artifact, score_table, write_artifact
from recsys.embeddings import build_embedding
from recsys.errors import ConfigError, DataError
from recsys.features.batch import batch_from_encoded, features_from_encoded
from recsys.features.schema import DOMAIN_COLUMN, FeatureSchema
from recsys.logs import configure_logging, quiet_libraries
from recsys.metrics import auc_by_group, binary_metrics, gauc
from recsys.models.outputs import CTRModel
from recsys.models.registry import build_model
from training.checkpoint import (
    Progress,
    best_valid_sample,
    checkpoint_folder,
    restore_checkpoint,
    save_checkpoint,
    set_lr_scale,
)
from training.config import ExperimentConfig
from training.data import (
    GROUP_COLUMN,
    ROW_COLUMN,
    count_rows,
    filter_valid_part,
    iter_tables,
    read_vocabulary_counts,
    rebatch,
    split_files,
)
from training.early_stopping import EarlyStopping
from training.sharding import (
    gather_full_state,
    load_full_state,
    shard_model,
    share_rank0_norm_statistics,
)

logger = logging.getLogger("training")
RESULT_FILE = "result.json"
LOG_FILE = "train.log"
RAY_STORAGE_DIR = "_ray"  # beside the run folders: Ray Train's checkpoints, per run name


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


def report(
    kind: str, metrics: dict[str, Any], rank: int, checkpoint_dir: Path | None = None
) -> None:
    """The one progress path: a log line on rank 0; eval lines (with the epoch's checkpoint) and
    the final line also go to Ray Train. Every rank calls it the same number of times, as Ray
    Train's report is a barrier."""
    if rank == 0:
        body = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        logger.info("%-5s %s", kind, body)
    if kind in ("eval", "final"):
        checkpoint = None if checkpoint_dir is None else Checkpoint.from_directory(checkpoint_dir)
        name = f"epoch-{metrics['epoch']:04d}" if checkpoint is not None else None
        ray.train.report({"kind": kind, **metrics}, checkpoint=checkpoint, checkpoint_dir_name=name)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg = ExperimentConfig.model_validate(config["experiment"])
    paths = RunPaths.model_validate(config["paths"])
    run_dir = Path(paths.run_dir)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if rank == 0:
        _log_to_run_folder(run_dir)
    else:  # only rank 0 reports; the others keep library INFO (TorchRec, fbgemm) off too
        quiet_libraries()
    torch.set_num_threads(cfg.ray.threads_per_worker)
    torch.manual_seed(cfg.train.seed)

    schema = FeatureSchema.load(Path(paths.features_dir))
    embedding = build_embedding(schema, cfg.embedding, device=torch.device("meta"))
    model = build_model(cfg.model, embedding, schema)
    dmp, optimizer, plan = shard_model(model, cfg, world)
    initial_lrs = [group["lr"] for group in optimizer.param_groups]
    if rank == 0:
        logger.info("sharding plan:\n%s", str(plan).rstrip())

    progress = Progress(EarlyStopping(cfg.train.patience))
    best_state: dict[str, torch.Tensor] | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        restored = restore_checkpoint(checkpoint, dmp, optimizer, initial_lrs, run_dir)
        progress, best_state = restored.progress, restored.best_state
    elif cfg.train.init_weights is not None:
        load_full_state(dmp, load_file(cfg.train.init_weights))
        if rank == 0:
            logger.info("initial weights from %s", cfg.train.init_weights)

    ray.data.DataContext.get_current().enable_progress_bars = False
    valid_files = split_files(Path(paths.encoded_dir), "valid")
    exclude = cfg.train.valid_exclude_share
    selected_rows = _selection_rows(valid_files, exclude)
    while not progress.stopped and progress.epoch < cfg.train.max_epochs:
        epoch, epoch_start = progress.epoch + 1, time.perf_counter()
        rows, train_s = _train_epoch(dmp, model, optimizer, schema, cfg, epoch, progress, rank)
        result = evaluate_distributed(
            dmp,
            model,
            schema,
            rebatch(
                filter_valid_part(
                    iter_tables(valid_files, batch_rows=cfg.train.eval_batch_size),
                    exclude,
                    inside=False,
                ),
                cfg.train.eval_batch_size,
            ),
            len(selected_rows),
            cfg.train.eval_batch_size,
            rank,
            world,
            expected_rows=selected_rows,
        )
        improved = progress.stopper.update(_selected(result.metrics, cfg), epoch)
        if not improved:
            # reduce on plateau: the same decision on every rank (metrics were gathered)
            scaled = progress.lr_scale * cfg.train.lr_decay_on_plateau
            progress.lr_scale = max(scaled, cfg.train.min_lr_scale)
            set_lr_scale(optimizer, initial_lrs, progress.lr_scale)
        # One decision for all ranks: rank 0's, broadcast (ranks computed the same metrics,
        # but a broadcast makes disagreement impossible rather than unlikely).
        decision = torch.tensor([int(progress.stopper.should_stop)])
        dist.broadcast(decision, src=0)
        if improved:
            best_state = gather_full_state(dmp, rank)
            progress.best_valid = best_valid_sample(
                result.metrics, result.rows, result.probs, cfg.train.parity_rows
            )
        progress.epoch, progress.stopped = epoch, bool(decision.item())
        progress.train_rows += rows * world
        progress.train_s += train_s
        progress.wall_s += time.perf_counter() - epoch_start
        metrics = {
            "epoch": epoch,
            "auc": result.metrics["auc"],
            "logloss": result.metrics["logloss"],
            **(
                {cfg.train.select_metric: result.metrics[cfg.train.select_metric]}
                if cfg.train.select_metric != "auc"
                else {}
            ),
            "best_auc": progress.stopper.best,
            "patience": f"{progress.stopper.bad_epochs}/{cfg.train.patience}",
            "train_s": train_s,
            "train_ex_per_s": rows * world / max(train_s, 1e-9),
        }
        with checkpoint_folder(epoch) as folder:
            save_checkpoint(folder, dmp, optimizer, progress, best_state, run_dir)
            report("eval", metrics, rank, checkpoint_dir=folder)

    final: list[dict[str, Any] | None] = [None]
    if rank == 0:
        assert best_state is not None and progress.best_valid is not None
        final[0] = _finish_on_rank0(cfg, paths, schema, best_state, progress)
    peak_rss: list[Any] = [None] * world
    dist.all_gather_object(peak_rss, peak_rss_mb())
    if rank == 0:
        assert final[0] is not None
        final[0]["worker_peak_rss_mb"] = peak_rss
        (run_dir / RESULT_FILE).write_text(json.dumps(final[0], indent=2))
    dist.broadcast_object_list(final, src=0)
    # Ray prints every reported dict: the headline figures only; result.json has the rest
    headline = {k: v for k, v in (final[0] or {}).items() if not isinstance(v, dict)}
    report("final", headline, rank)


def _selected(metrics: dict[str, float], cfg: ExperimentConfig) -> float:
    """The valid metric that early stopping and model selection follow."""
    name = cfg.train.select_metric
    if name not in metrics:
        raise ConfigError(
            f"train.select_metric: '{name}' is not a valid metric of this model and dataset "
            f"(expected one of {sorted(metrics)})"
        )
    return float(metrics[name])


def _log_to_run_folder(run_dir: Path) -> None:
    # A worker process is an entry point: rank 0 logs to the driver's output (Ray forwards it)
    # and to LOG_FILE in the run folder, so the log outlives the session.
    configure_logging("%(message)s", force=True)
    file_handler = logging.FileHandler(run_dir / LOG_FILE)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(file_handler)


def _train_epoch(
    dmp: torch.nn.Module,
    model: CTRModel,
    optimizer: torch.optim.Optimizer,
    schema: FeatureSchema,
    cfg: ExperimentConfig,
    epoch: int,
    progress: Progress,
    rank: int,
) -> tuple[int, float]:
    """One pass over this worker's shard of train; returns (rows on this rank, seconds)."""
    dmp.train()
    world = dist.get_world_size()
    epoch_start, epoch_rows, loss_sum = time.perf_counter(), 0, 0.0
    batches = ray.train.get_dataset_shard("train").iter_batches(
        batch_size=cfg.train.batch_size,
        batch_format="pyarrow",
        drop_last=True,
        local_shuffle_buffer_size=4 * cfg.train.batch_size,
        local_shuffle_seed=cfg.train.seed + epoch * 1000 + rank,
    )
    for epoch_steps, table in enumerate(batches, start=1):
        batch = batch_from_encoded(schema, table)
        loss = model.loss(dmp(batch.features), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        progress.step += 1
        epoch_rows += batch.batch_size
        loss_sum += float(loss.detach())
        if progress.step % cfg.train.log_every_steps == 0:
            elapsed = time.perf_counter() - epoch_start
            report(
                "train",
                {
                    "step": progress.step,
                    "epoch": epoch,
                    "loss": loss_sum / epoch_steps,
                    "ex_per_s": epoch_rows * world / max(elapsed, 1e-9),
                    "lr": optimizer.param_groups[-1]["lr"],
                },
                rank,
            )
    return epoch_rows, time.perf_counter() - epoch_start


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB.

    Read from VmHWM in /proc/self/status where there is one: Linux keeps ru_maxrss across
    exec, so a process started by fork+exec from a large parent (a test runner holding a
    generated dataset, Ray's raylet) reported the parent's size at the fork as its own peak.
    Elsewhere ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _selection_rows(valid_files: list[Path], exclude_share: float) -> np.ndarray:
    """The `__row__` numbers (sorted) of the valid rows that early stopping scores: all of
    them, or those outside `valid_part(exclude_share)`. Reads only the row-number column."""
    if exclude_share <= 0:
        return np.arange(count_rows(valid_files))
    numbers = (pq.read_table(f, columns=[ROW_COLUMN]) for f in valid_files)
    parts = filter_valid_part(numbers, exclude_share, inside=False)
    kept = np.sort(
        np.concatenate([np.zeros(0, np.int64), *(t.column(0).to_numpy() for t in parts)])
    )
    if not len(kept):
        raise DataError(
            f"train.valid_exclude_share={exclude_share} leaves no valid rows for early "
            f"stopping; lower it"
        )
    return kept


@torch.no_grad()
def evaluate_distributed(
    dmp: torch.nn.Module,
    model: CTRModel,
    schema: FeatureSchema,
    batches: Iterable[pa.Table],
    num_rows: int,
    batch_size: int,
    rank: int,
    world: int,
    expected_rows: np.ndarray | None = None,
) -> EvalResult:
    """Scores every row of a split exactly once across ranks and gathers the predictions.

    `batches` streams the encoded split in row order, `batch_size` rows each (the last may be
    shorter), with a `__row__` column numbering its `num_rows` rows from 0 (or, for a subset of
    the split, holding `expected_rows`, sorted, `num_rows` of them). Every rank reads the
    stream and scores batch i when i % world == rank, so memory is bounded by a batch plus the
    gathered predictions. Ranks with fewer batches repeat one and drop its output, because the
    sharded tables need every rank in every forward pass; every forward pass has exactly
    `batch_size` rows (a short batch is padded by repeating its rows), so all ranks send equal
    batches through the embedding all-to-all, as in training.
    """
    dmp.eval()
    share_rank0_norm_statistics(dmp)  # every rank scores with the exported model's statistics
    num_batches = -(-num_rows // batch_size)
    per_rank = -(-num_batches // world)
    stream = iter(batches)
    rows, probs = [], {t: [] for t in model.served_tasks}
    columns: list[dict[str, np.ndarray]] = []  # labels and GAUC groups of the rows scored here
    previous: pa.Table | None = None
    for _ in range(per_rank):
        group = list(itertools.islice(stream, world))
        real = rank < len(group)
        chunk = group[rank] if real else (previous if previous is not None else group[0])
        previous = chunk
        size = chunk.num_rows
        if size < batch_size:
            chunk = chunk.take(pa.array(np.arange(batch_size) % size))
        output = model.probabilities(dmp(features_from_encoded(schema, chunk)))
        if real:
            head = chunk.slice(0, size)
            rows.append(owned_columns(head, [ROW_COLUMN])[ROW_COLUMN])
            for task, p in output.items():
                probs[task].append(p[:size].numpy().copy())
            keep = (*_label_names(schema), GROUP_COLUMN, DOMAIN_COLUMN)
            columns.append(owned_columns(head, keep))
    local = (
        np.concatenate(rows) if rows else np.zeros(0, np.int64),
        {t: np.concatenate(v) if v else np.zeros(0) for t, v in probs.items()},
        columns,
    )
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, local)
    all_rows = np.concatenate([g[0] for g in gathered])
    order = np.argsort(all_rows, kind="stable")
    all_probs = {t: np.concatenate([g[1][t] for g in gathered])[order] for t in probs}
    sorted_rows = all_rows[order]
    expected = np.arange(num_rows) if expected_rows is None else expected_rows
    if not np.array_equal(sorted_rows, expected):
        raise RuntimeError("evaluation: gathered rows do not cover the split exactly once")
    labels = table_of([part for g in gathered for part in g[2]]).take(pa.array(order))
    return EvalResult(split_metrics(schema, labels, all_probs), sorted_rows, all_probs)


def owned_columns(table: pa.Table, names: Iterable[str]) -> dict[str, np.ndarray]:
    """The columns of `table` among `names` as numpy arrays that own their memory.

    Evaluation keeps a few columns of every batch until the end of the split. Kept as Arrow
    slices (or zero-copy numpy views) they hold on to buffers of Arrow's memory pool
    (mimalloc), which then cannot return the pages around them that each batch's decoding
    used: scoring a 128k-row split that way peaked about 370 MB higher than keeping copies."""
    return {
        name: np.array(table[name].to_numpy(zero_copy_only=False), copy=True)
        for name in names
        if name in table.column_names
    }


def table_of(parts: list[dict[str, np.ndarray]]) -> pa.Table:
    """One table from per-batch column arrays (as `owned_columns` returns them)."""
    names = list(parts[0]) if parts else []
    return pa.table({name: np.concatenate([part[name] for part in parts]) for name in names})


def _label_names(schema: FeatureSchema) -> list[str]:
    return [label.name for label in schema.dataset.labels]


def split_metrics(
    schema: FeatureSchema, table: pa.Table, probs: dict[str, np.ndarray]
) -> dict[str, float]:
    """Metrics of every served task with labels in `table` (raw or encoded rows; GAUC groups
    by the raw user id, in the `__group__` column of encoded rows). The first task's metrics
    are also given unprefixed.

    Post-click conversion ("cvr", ESMM) is measured on clicked rows only: the label is ctcvr
    (click AND conversion), which on a clicked row is the conversion. With a domain column, the
    first task also gets `domain_weighted_auc`: per-domain AUCs averaged with row weights
    (domains with one class left out)."""
    groups = None
    if GROUP_COLUMN in table.column_names:
        groups = table[GROUP_COLUMN].to_numpy(zero_copy_only=False)
    elif schema.dataset.user is not None and schema.dataset.user.id_column in table.column_names:
        groups = table[schema.dataset.user.id_column].to_numpy(zero_copy_only=False)
    metrics: dict[str, float] = {}
    labels_of: dict[str, np.ndarray] = {}
    for i, label in enumerate(schema.dataset.labels):
        if label.name not in table.column_names:
            continue
        labels = table[label.name].to_numpy(zero_copy_only=False)
        labels_of[label.task_name] = labels
        if label.task_name not in probs:
            continue
        values = binary_metrics(labels, probs[label.task_name], groups)
        metrics.update({f"{label.task_name}_{k}": v for k, v in values.items()})
        if i == 0:
            metrics.update(values)
    if "cvr" in probs and "ctr" in labels_of and "ctcvr" in labels_of:
        values = cvr_metrics(labels_of["ctr"], labels_of["ctcvr"], probs["cvr"], groups)
        metrics.update({f"cvr_{k}": v for k, v in values.items()})
    domains = _domains(schema, table)
    first = schema.dataset.labels[0].task_name if schema.dataset.labels else None
    if domains is not None and first in probs and first in labels_of:
        metrics["domain_weighted_auc"] = gauc(labels_of[first], probs[first], domains)
    return metrics


def cvr_metrics(
    click: np.ndarray, ctcvr: np.ndarray, p_cvr: np.ndarray, groups: np.ndarray | None
) -> dict[str, float]:
    """Post-click conversion metrics on clicked rows only, where the ctcvr label (click AND
    conversion) is the conversion (used by the trainer and by `recsys evaluate`)."""
    clicked = click == 1
    return binary_metrics(
        ctcvr[clicked].astype(np.float64),
        p_cvr[clicked],
        None if groups is None else groups[clicked],
    )


def _domains(schema: FeatureSchema, table: pa.Table) -> np.ndarray | None:
    """The domain of every row: raw values, or encoded ids in `__domain__`; None without."""
    if schema.dataset.domain is not None and schema.dataset.domain in table.column_names:
        column = table[schema.dataset.domain].cast(pa.string())
        return column.to_numpy(zero_copy_only=False)
    if DOMAIN_COLUMN in table.column_names:
        return table[DOMAIN_COLUMN].to_numpy(zero_copy_only=False)
    return None


def per_domain_metrics(
    schema: FeatureSchema, table: pa.Table, probs: dict[str, np.ndarray]
) -> dict[str, dict[str, float | None]]:
    """{domain: {rows, positive_rate, auc}} of the first task on raw rows (auc None for a
    domain with one class); empty when the dataset has no domain."""
    domains = _domains(schema, table)
    if domains is None or not schema.dataset.labels:
        return {}
    label = schema.dataset.labels[0]
    if label.task_name not in probs or label.name not in table.column_names:
        return {}
    labels = table[label.name].to_numpy(zero_copy_only=False).astype(np.float64)
    return auc_by_group(labels, probs[label.task_name], domains)


def _finish_on_rank0(
    cfg: ExperimentConfig,
    paths: RunPaths,
    schema: FeatureSchema,
    best_state: dict[str, torch.Tensor],
    progress: Progress,
) -> dict[str, Any]:
    """Rebuilds the best epoch's model unsharded, scores test, exports, checks parity."""
    best_valid, stopper = progress.best_valid, progress.stopper
    assert best_valid is not None
    model = build_model(cfg.model, build_embedding(schema, cfg.embedding), schema)
    model.load_state_dict(best_state)
    model.eval()
    raw_root = Path(paths.raw_root)
    test_metrics, test_per_domain = _score_split_streaming(
        model, schema, split_files(raw_root, "test"), cfg
    )
    metrics = {
        "best_epoch": stopper.best_epoch,
        "valid": best_valid.metrics,
        "test": test_metrics,
        "test_per_domain": test_per_domain,
        "select_metric": cfg.train.select_metric,
        "train_wall_s": progress.wall_s,
        "data": {
            "dataset": cfg.data.dataset,
            "path": str(raw_root.resolve()),
            "vocabulary": read_vocabulary_counts(Path(paths.encoded_dir)),
        },
        "num_workers": cfg.ray.num_workers,
    }
    side_dir = Path(paths.side_dir)
    side = {p.stem: pq.read_table(p) for p in sorted(side_dir.glob("*.parquet"))}
    parity: dict[str, float] = {}

    def check_parity(staged: Path) -> None:
        # Parity: rescore the first valid rows from the artifact as written to disk, through
        # the raw-rows path, and compare with what the sharded model predicted at the best
        # epoch (rows are numbered by position; with train.valid_exclude_share they skip
        # some positions). Run before the version is published, so a failing artifact is
        # never served and a retried run does not leave it behind.
        loaded = load_artifact(staged)
        span = max(best_valid.rows) + 1
        head = next(rebatch(iter_tables(split_files(raw_root, "valid"), batch_rows=span), span))
        sample = head.take(pa.array(best_valid.rows))
        rescored = score_table(loaded.model, loaded.schema, sample)
        parity["max_diff"] = max(
            float(np.abs(rescored[t].numpy() - np.asarray(best_valid.probs[t])).max())
            for t in rescored
        )
        if parity["max_diff"] > 1e-5:
            raise RuntimeError(
                f"export: the new {cfg.output.model_name} artifact scores valid rows "
                f"differently from the trained model (max |diff| {parity['max_diff']:.2e}, "
                f"expected <= 1e-5); no version was written"
            )

    artifact_dir = write_artifact(
        Path(cfg.output.model_repo),
        cfg.output.model_name,
        model,
        cfg.model,
        cfg.embedding,
        schema,
        metrics,
        side,
        check=check_parity,
    )
    n, max_diff = len(best_valid.rows), parity["max_diff"]
    return {
        "artifact": str(artifact_dir),
        "best_epoch": stopper.best_epoch,
        "epochs": progress.epoch,
        "valid_auc": best_valid.metrics["auc"],
        "valid_logloss": best_valid.metrics["logloss"],
        "test_auc": test_metrics["auc"],
        "test_logloss": test_metrics["logloss"],
        "test": test_metrics,
        "test_per_domain": test_per_domain,
        "valid": best_valid.metrics,
        "select_metric": cfg.train.select_metric,
        "parity_max_abs_diff": max_diff,
        "parity_rows": n,
        "train_rows": progress.train_rows,
        "train_rows_per_s": progress.train_rows / max(progress.train_s, 1e-9),
        "train_wall_s": progress.wall_s,
    }


def _score_split_streaming(
    model: CTRModel, schema: FeatureSchema, files: list[Path], cfg: ExperimentConfig
) -> tuple[dict[str, float], dict[str, dict[str, float | None]]]:
    """Metrics (and the per-domain table) of an unsharded model on raw Parquet rows, read a
    batch at a time (only the probabilities, labels, user ids and domains are kept)."""
    keep = _label_names(schema)
    if schema.dataset.user is not None:
        keep.append(schema.dataset.user.id_column)
    if schema.dataset.domain is not None and schema.dataset.domain not in keep:
        keep.append(schema.dataset.domain)
    probs: dict[str, list[np.ndarray]] = {t: [] for t in model.served_tasks}
    columns = []
    for table in iter_tables(files, batch_rows=cfg.train.eval_batch_size):
        for task, p in score_table(model, schema, table, cfg.train.eval_batch_size).items():
            probs[task].append(p.numpy().copy())
        columns.append(owned_columns(table, keep))  # copies: see owned_columns
    merged = {t: np.concatenate(v) for t, v in probs.items()}
    table = table_of(columns)
    return split_metrics(schema, table, merged), per_domain_metrics(schema, table, merged)
