"""Batch jobs: train, predict and evaluate (each a function the CLI calls).

train:    locate data -> fit features on train -> encode splits -> Ray Train -> artifact.
predict:  an artifact scores a Parquet file as a Ray Data batch job -> predictions Parquet.
evaluate: predict a split (or any Parquet), then recompute every metric from those fresh
          predictions into OUTPUT/metrics.json; the artifact's stored metrics are never read.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.artifact import load_artifact, resolve_version_dir, score_table
from recsys.errors import ConfigError, DataError
from recsys.features.schema import FeatureSchema
from recsys.metrics import auc, binary_metrics
from training.config import ExperimentConfig
from training.data import encode_splits, fit_features, locate_dataset, side_tables, split_files
from training.loop import RESULT_FILE, RunPaths

logger = logging.getLogger(__name__)

PROB_PREFIX = "p_"


def train(cfg: ExperimentConfig) -> dict[str, Any]:
    """Runs one training job end to end; returns the final report."""
    from training.ray_runner import run_trainer

    # Workers run in their own working directory: every path they see must be absolute.
    output = cfg.output.model_copy(
        update={
            "model_repo": str(Path(cfg.output.model_repo).resolve()),
            "run_root": str(Path(cfg.output.run_root).resolve()),
        }
    )
    cfg = cfg.model_copy(update={"output": output})
    data = locate_dataset(cfg.data)
    run_name = cfg.output.run_name or (
        f"{cfg.output.model_name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    )
    run_dir = Path(cfg.output.run_root) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    logger.info("run folder %s", run_dir)

    features = fit_features(data)
    features.save(run_dir / "features")
    encode_splits(data, features, run_dir / "encoded", seed=cfg.train.seed, show_progress=True)
    side_dir = run_dir / "side"
    side_dir.mkdir(exist_ok=True)
    for entity, table in side_tables(data).items():
        pq.write_table(table, side_dir / f"{entity}.parquet")
    paths = RunPaths(
        run_dir=str(run_dir.resolve()),
        features_dir=str((run_dir / "features").resolve()),
        encoded_dir=str((run_dir / "encoded").resolve()),
        raw_root=str(data.root.resolve()),
        side_dir=str(side_dir.resolve()),
    )
    run_trainer(cfg, paths)
    result_file = run_dir / RESULT_FILE
    if not result_file.exists():
        raise RuntimeError(f"train: the run ended without writing {result_file}")
    return dict(json.loads(result_file.read_text()))


class _BatchScorer:
    """Ray Data callable: loads the artifact once per actor, scores Arrow batches."""

    def __init__(self, artifact_dir: str, keep: list[str]) -> None:
        self.artifact = load_artifact(artifact_dir)
        self.keep = keep

    def __call__(self, batch: pa.Table) -> pa.Table:
        probs = score_table(self.artifact.model, self.artifact.schema, batch)
        out = batch.select([c for c in self.keep if c in batch.column_names])
        for task, p in probs.items():
            out = out.append_column(PROB_PREFIX + task, pa.array(p.numpy().astype(np.float64)))
        return out


def _kept_columns(schema: FeatureSchema) -> list[str]:
    dataset = schema.dataset
    keep = list(dataset.split_key or ())
    for entity in (dataset.user, dataset.item):
        if entity is not None:
            keep.append(entity.id_column)
    if dataset.domain:
        keep.append(dataset.domain)
    keep += [c.name for c in dataset.labels]
    return list(dict.fromkeys(keep))


def predict(
    artifact: Path,
    inputs: list[Path],
    output: Path,
    batch_size: int = 8192,
    address: str | None = None,
) -> int:
    """Scores Parquet rows with an artifact as a Ray Data job; writes one Parquet file in the
    input order (ids, labels when present, `p_<task>` per served task). Returns rows written."""
    import ray.data

    from training.ray_runner import ensure_ray

    version_dir = resolve_version_dir(artifact)
    schema = FeatureSchema.load(version_dir)
    for path in inputs:
        schema.dataset.validate_table(pq.read_schema(path), str(path), require_labels=False)
    ensure_ray(address, num_workers=1, cpus_per_worker=1)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    dataset = ray.data.read_parquet([str(p) for p in inputs]).map_batches(
        _BatchScorer,
        fn_constructor_args=(str(version_dir), _kept_columns(schema)),
        batch_size=batch_size,
        batch_format="pyarrow",
        concurrency=1,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".partial")
    writer: pq.ParquetWriter | None = None
    rows = 0
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        if writer is None:
            writer = pq.ParquetWriter(tmp, batch.schema)
        writer.write_table(batch)
        rows += batch.num_rows
    if writer is None:
        raise DataError(f"predict: {inputs} has no rows (expected at least one)")
    writer.close()
    tmp.replace(output)
    logger.info("wrote %d predictions to %s", rows, output)
    return rows


def metrics_from_predictions(schema: FeatureSchema, table: pa.Table) -> dict[str, Any]:
    """Every metric of every task with labels, overall and per domain, from a predictions table."""
    dataset = schema.dataset
    groups = None
    if dataset.user is not None and dataset.user.id_column in table.column_names:
        groups = table[dataset.user.id_column].to_numpy(zero_copy_only=False)
    report: dict[str, Any] = {"num_rows": table.num_rows, "tasks": {}}
    for label in dataset.labels:
        prob_col = PROB_PREFIX + label.task_name
        if label.name not in table.column_names or prob_col not in table.column_names:
            continue
        labels = table[label.name].to_numpy(zero_copy_only=False).astype(np.float64)
        probs = table[prob_col].to_numpy(zero_copy_only=False)
        task: dict[str, Any] = binary_metrics(labels, probs, groups)
        if dataset.domain and dataset.domain in table.column_names:
            domains = table[dataset.domain].cast(pa.string()).to_numpy(zero_copy_only=False)
            per_domain = {}
            for value in np.unique(domains):
                mask = domains == value
                if 0 < labels[mask].sum() < mask.sum():
                    per_domain[str(value)] = {
                        "auc": auc(labels[mask], probs[mask]),
                        "num_rows": int(mask.sum()),
                    }
            task["per_domain"] = per_domain
        report["tasks"][label.task_name] = task
    if not report["tasks"]:
        raise DataError(
            f"evaluate: the predictions have no label column of the schema "
            f"(expected one of {[c.name for c in dataset.labels]}); evaluate needs "
            f"labelled rows"
        )
    return report


def evaluate(
    artifact: Path,
    output: Path,
    split: str | None = None,
    inputs: list[Path] | None = None,
    data_path: Path | None = None,
    address: str | None = None,
) -> dict[str, Any]:
    """Predicts `split` of the artifact's dataset (or `inputs`), then recomputes metrics from
    those fresh predictions into `output/metrics.json`."""
    version_dir = resolve_version_dir(artifact)
    if inputs is None:
        if split is None:
            raise ConfigError("evaluate: give --split or --input (got neither)")
        if data_path is None:
            stored = json.loads((version_dir / "metrics.json").read_text()).get("data", {})
            if "path" not in stored:
                raise ConfigError(
                    f"evaluate: the artifact does not record its dataset folder; "
                    f"pass --data-path (the folder with {split}.parquet)"
                )
            data_path = Path(stored["path"])
        inputs = split_files(data_path, split)
    output.mkdir(parents=True, exist_ok=True)
    predictions = output / "predictions.parquet"
    predict(version_dir, inputs, predictions, address=address)
    schema = FeatureSchema.load(version_dir)
    report = metrics_from_predictions(schema, pq.read_table(predictions))
    report.update(
        {"artifact": str(version_dir), "inputs": [str(p) for p in inputs], "split": split}
    )
    (output / "metrics.json").write_text(json.dumps(report, indent=2))
    return report
