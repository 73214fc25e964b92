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
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.artifact import load_artifact, resolve_version_dir, score_table, verify_artifact
from recsys.errors import USER_ERRORS, ArtifactError, ConfigError, DataError, SchemaError
from recsys.features.schema import OOV_ID, FeatureSchema, coverage_report
from recsys.logs import quiet_libraries
from recsys.metrics import auc_by_group, binary_metrics
from training.config import ExperimentConfig
from training.data import (
    count_rows,
    encode_splits,
    fit_features,
    locate_dataset,
    side_tables,
    split_files,
)
from training.loop import (
    RAY_STORAGE_DIR,
    RESULT_FILE,
    RunPaths,
    cvr_metrics,
    peak_rss_mb,
    split_metrics,
)

logger = logging.getLogger(__name__)

PROB_PREFIX = "p_"


PREPARED_FILE = "prepared.json"
CONFIG_FILE = "config.json"
# Settings that say where and how robustly a run executes, not what it computes: a stopped run
# may be resumed with other values of these.
RESUMABLE_WITH_OTHER = ("ray.address", "ray.collective_timeout_s", "ray.max_failures")


def train(cfg: ExperimentConfig) -> dict[str, Any]:
    """Runs one training job end to end; returns the final report.

    Training again with the same `output.run_name` and config resumes the run: the prepared
    data in its folder is reused and Ray Train restarts from the latest checkpoint. A run that
    already finished returns its result.
    """
    from training.ray_runner import run_trainer

    cfg, run_dir = resolve_run(cfg)
    result_file = run_dir / RESULT_FILE
    if result_file.exists():
        result = dict(json.loads(result_file.read_text()))
        if cfg.output.verify_serving and "serving_verified" not in result:
            # Training ended (the workers wrote the result) but the serving check failed or
            # was interrupted: it runs again rather than the run passing as finished.
            logger.info("run %s finished training; verifying its artifact now", run_dir.name)
            result["serving_verified"] = verify_serving(Path(result["artifact"]))
            result_file.write_text(json.dumps(result, indent=2))
            return result
        logger.info("run %s already finished; its result is %s", run_dir.name, result_file)
        return result
    paths = prepare_run(cfg, run_dir)
    prepare_peak_rss_mb = peak_rss_mb()  # data preparation only: before Ray starts here
    check_trainable(cfg, paths)
    run_trainer(cfg, paths)
    if not result_file.exists():
        raise RuntimeError(f"train: the run ended without writing {result_file}")
    result = dict(json.loads(result_file.read_text()))
    # Peak memory of the whole job: this driver (data preparation) plus every train worker.
    result["prepare_peak_rss_mb"] = prepare_peak_rss_mb
    result["driver_peak_rss_mb"] = peak_rss_mb()
    result["peak_rss_mb"] = result["driver_peak_rss_mb"] + sum(result["worker_peak_rss_mb"])
    if cfg.output.verify_serving:
        result["serving_verified"] = verify_serving(Path(result["artifact"]))
    result_file.write_text(json.dumps(result, indent=2))
    logger.info(
        "throughput train_rows_per_s=%.0f peak_rss_mb=%.0f (driver %.0f, workers %s)",
        result["train_rows_per_s"],
        result["peak_rss_mb"],
        result["driver_peak_rss_mb"],
        " ".join(f"{m:.0f}" for m in result["worker_peak_rss_mb"]),
    )
    return result


def check_trainable(cfg: ExperimentConfig, paths: RunPaths) -> None:
    """Refuses, before Ray starts, a model whose tables the sharded trainer cannot train (a
    sharded table's width must be a multiple of 4), once the vocabularies are known,
    `train.init_weights` that do not fit the model, a batch size no worker can fill and a
    `train.select_metric` the trainer does not compute.

    Raises:
        ConfigError: naming the table and the settings that fix it.
    """
    import torch

    check_batch_size(
        count_rows(split_files(Path(paths.encoded_dir), "train")),
        cfg.train.batch_size,
        cfg.ray.num_workers,
    )

    from recsys.embeddings import build_embedding
    from recsys.models.registry import build_model
    from training.sharding import check_full_state, check_table_widths, model_tables

    schema = FeatureSchema.load(Path(paths.features_dir))
    embedding = build_embedding(schema, cfg.embedding, device=torch.device("meta"))
    model = build_model(cfg.model, embedding, schema)
    check_table_widths(model_tables(model), cfg.train.replicate_max_mb)
    if cfg.train.init_weights is not None:
        check_full_state(model, Path(cfg.train.init_weights))
    check_select_metric(cfg.train.select_metric, schema, model.served_tasks, paths)


def check_select_metric(
    name: str, schema: FeatureSchema, tasks: tuple[str, ...], paths: RunPaths
) -> None:
    """Refuses a `train.select_metric` the trainer will not compute. Inside the workers it
    fails only after the first epoch (and again on each of Ray's retries). The valid metric
    names come from `split_metrics` itself, on the first encoded valid rows with stand-in
    scores, so the check cannot drift from what the trainer computes.

    Raises:
        ConfigError: naming the AUC metrics this model and dataset have.
    """
    files = split_files(Path(paths.encoded_dir), "valid")
    if not files:
        return
    table = pq.read_table(files[0]).slice(0, 4096)
    scores = np.random.default_rng(0).random(table.num_rows)
    try:
        names = split_metrics(schema, table, {task: scores for task in tasks})
    except SchemaError:  # e.g. one class in these rows: the workers see every row
        return
    if name not in names:
        raise ConfigError(
            f"train.select_metric: '{name}' is not a valid metric of this model and dataset "
            f"(expected one of {sorted(k for k in names if k.endswith('auc'))})"
        )


def verify_serving(artifact: Path) -> bool:
    """Runs `recsys verify-artifact` (the serving side's parity gate) on a new artifact.

    A subprocess, because training never imports serving: it serves the artifact over gRPC
    and compares with the eager scores of the training path.

    Raises:
        ArtifactError: the served scores differ from the eager ones, or the check failed.
    """
    command = [sys.executable, "-m", "recsys.cli", "verify-artifact", "--artifact", str(artifact)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=900)
    if done.returncode != 0:
        raise ArtifactError(
            f"train: {artifact} fails the serving parity check (recsys verify-artifact exit "
            f"{done.returncode}: {(done.stdout + done.stderr).strip()[-600:]})"
        )
    logger.info("%s", done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "verified")
    return True


def resolve_run(cfg: ExperimentConfig) -> tuple[ExperimentConfig, Path]:
    """Makes the output paths absolute, names the run, and claims its folder.

    A new folder gets the config; an existing one must hold the same config (but for
    RESUMABLE_WITH_OTHER), which is how a stopped run is resumed.

    Raises:
        ConfigError: the run folder holds a run with a different config.
    """
    # Workers run in their own working directory: every path they see must be absolute.
    run_name = cfg.output.run_name or (
        f"{cfg.output.model_name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    )
    output = cfg.output.model_copy(
        update={
            "model_repo": str(Path(cfg.output.model_repo).resolve()),
            "run_root": str(Path(cfg.output.run_root).resolve()),
            "run_name": run_name,
        }
    )
    cfg = cfg.model_copy(update={"output": output})
    # Checked here, before any work: the artifact is only written after training.
    _usable_folder(Path(output.run_root), "output.run_root")
    _usable_folder(Path(output.model_repo), "output.model_repo")
    run_dir = Path(cfg.output.run_root) / run_name
    config_file = run_dir / CONFIG_FILE
    if config_file.exists():
        stored = ExperimentConfig.model_validate_json(config_file.read_text())
        changed = _config_changes(stored, cfg)
        if changed:
            raise ConfigError(
                f"train: run folder {run_dir} holds a run with another config ("
                + "; ".join(changed)
                + "); resume it with the same config, or pick another output.run_name"
            )
        logger.info("resuming run %s", run_dir)
    else:
        # Ray Train resumes from any checkpoint under the run's name: those of an earlier run
        # whose folder was deleted would be picked up by this new run, whatever its config.
        stale = run_dir.parent / RAY_STORAGE_DIR / run_name
        if stale.exists():
            raise ConfigError(
                f"output.run_name: checkpoints of an earlier run named {run_name} remain in "
                f"{stale}, but its run folder {run_dir} is gone; delete {stale} to start "
                f"over, or pick another output.run_name"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        config_file.write_text(cfg.model_dump_json(indent=2))
        logger.info("run folder %s", run_dir)
    return cfg, run_dir


def _usable_folder(path: Path, setting: str) -> None:
    """Creates `path` if needed; raises ConfigError unless it is a folder this user can write."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"{setting}: cannot use {path} as a folder ({e.strerror}); set --set {setting}=DIR"
        ) from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{setting}: {path} is not writable; set --set {setting}=DIR")


def _config_changes(stored: ExperimentConfig, new: ExperimentConfig) -> list[str]:
    before, after = _flat(stored.model_dump(mode="json")), _flat(new.model_dump(mode="json"))
    return [
        f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        for key in sorted(before.keys() | after.keys())
        if key not in RESUMABLE_WITH_OTHER and before.get(key) != after.get(key)
    ]


def _flat(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def check_batch_size(train_rows: int, batch_size: int, num_workers: int) -> None:
    """Raises ConfigError when a worker's share of train holds no full batch: every worker
    trains on full batches only (ranks must take the same number of steps), so such a run
    would finish without one step and export an untrained model."""
    share = train_rows // num_workers
    if share >= batch_size:
        return
    if share == 0:
        raise ConfigError(
            f"ray.num_workers: {num_workers} workers for {train_rows} train rows leaves a "
            f"worker without rows; use --num-workers {max(train_rows, 1)} or fewer"
        )
    fits = 1 << (share.bit_length() - 1)  # the largest power of two a share holds
    raise ConfigError(
        f"train.batch_size: {batch_size} rows per step is more than each worker's share of "
        f"the train split ({train_rows} rows over {num_workers} workers = {share}), so no "
        f"step would run; lower it (--set train.batch_size={fits}) or use fewer workers"
    )


def prepare_run(cfg: ExperimentConfig, run_dir: Path) -> RunPaths:
    """Fits features on train, encodes the splits and writes the side tables into the run
    folder, streaming (memory bounded by `data.chunk_rows`), unless a previous attempt of the
    same run finished doing so."""
    data = locate_dataset(cfg.data)
    paths = RunPaths(
        run_dir=str(run_dir.resolve()),
        features_dir=str((run_dir / "features").resolve()),
        encoded_dir=str((run_dir / "encoded").resolve()),
        raw_root=str(data.root.resolve()),
        side_dir=str((run_dir / "side").resolve()),
    )
    marker = run_dir / PREPARED_FILE
    if marker.exists():
        logger.info("reusing the features and encoded splits prepared in %s", run_dir)
        return paths
    for folder in (paths.features_dir, paths.encoded_dir, paths.side_dir):
        shutil.rmtree(folder, ignore_errors=True)  # leftovers of an interrupted preparation
    started = time.perf_counter()
    features = fit_features(data, chunk_rows=cfg.data.chunk_rows)
    features.save(Path(paths.features_dir))
    encode_splits(
        data,
        features,
        Path(paths.encoded_dir),
        seed=cfg.train.seed,
        chunk_rows=cfg.data.chunk_rows,
        show_progress=True,
    )
    side_dir = Path(paths.side_dir)
    side_dir.mkdir()
    for entity, table in side_tables(data, chunk_rows=cfg.data.chunk_rows).items():
        pq.write_table(table, side_dir / f"{entity}.parquet")
    rows = {split: count_rows(files) for split, files in data.files.items()}
    marker.write_text(json.dumps({"rows": rows, "seconds": time.perf_counter() - started}))
    logger.info("prepared %s in %.1fs", rows, time.perf_counter() - started)
    return paths


class _BatchScorer:
    """Ray Data callable: loads the artifact once per actor, scores Arrow batches."""

    def __init__(self, artifact_dir: str, keep: list[str]) -> None:
        quiet_libraries()  # a fresh actor process: drop the known library lines here too
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


def _parquet_schema_and_rows(path: Path) -> tuple[pa.Schema, int]:
    if not path.is_file():
        raise DataError(f"predict: input {path} is not a file (expected a Parquet file)")
    try:
        return pq.read_schema(path), pq.read_metadata(path).num_rows
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"predict: input {path} is not a readable Parquet file ({e})") from e


def _check_distinct_inputs(inputs: list[Path]) -> None:
    """Refuses a file given twice: Ray Data reads a repeated path once, so its rows would be
    scored once (and the same file spelled twice would be scored twice)."""
    seen: dict[Path, Path] = {}
    for path in inputs:
        resolved = path.resolve()
        if resolved in seen:
            same = "" if seen[resolved] == path else f" (also given as {seen[resolved]})"
            raise ConfigError(
                f"--input: {path} is given twice{same}; pass each file once (to score rows "
                f"twice, copy the file)"
            )
        seen[resolved] = path


def _check_writable_folder(folder: Path, flag: str) -> None:
    """Raises ConfigError unless `folder` is, or could be created as, a folder this user can
    write. Creates nothing: a job refused later leaves no empty folder behind."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"{flag}: cannot create the folder {folder}: {existing} is a file (expected a "
            f"folder); choose another {flag}"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag}: the folder {existing} is not writable; choose another {flag}")


def _check_predictions_file(output: Path, inputs: list[Path]) -> None:
    """Refuses, before any scoring, an output `predict` could not write or must not replace."""
    if output.is_dir():
        raise ConfigError(
            f"--output: {output} is a folder (expected a Parquet file path); give a file "
            f"name, e.g. {output / 'predictions.parquet'}"
        )
    if any(output.resolve() == path.resolve() for path in inputs):
        raise ConfigError(
            f"--output: {output} is also an --input (the predictions would replace the rows "
            f"they score); write them to another file"
        )
    _check_writable_folder(output.parent, "--output")


def _decoded(arrow_type: pa.DataType) -> pa.DataType:
    """A dictionary type (e.g. a pandas `category` column) as its value type, also inside a
    list: the feature lookups read values, whatever their encoding in a file."""
    if pa.types.is_dictionary(arrow_type):
        return _decoded(arrow_type.value_type)
    if pa.types.is_list(arrow_type):
        return pa.list_(_decoded(arrow_type.value_type))
    if pa.types.is_large_list(arrow_type):
        return pa.large_list(_decoded(arrow_type.value_type))
    return arrow_type


def _read_schema(file_schemas: dict[Path, pa.Schema], columns: list[str]) -> pa.Schema:
    """The one schema every input is read as: `columns` that some file has, each with its
    types in all files unified (dictionaries decoded, narrower numbers widened).

    Ray Data joins the rows of different files into one batch and refuses to join differing
    types (string in one file, dictionary in another); read with this schema, every batch has
    the same columns and types, and a column a file lacks (labels) reads as nulls.

    Raises:
        SchemaError: a column's types in two files cannot be unified, naming both files.
    """
    fields = []
    for name in dict.fromkeys(columns):
        typed = [
            (path, _decoded(s.field(name).type))
            for path, s in file_schemas.items()
            if name in s.names
        ]
        if not typed:
            continue
        unified = typed[0][1]
        for path, arrow_type in typed[1:]:
            pair = [pa.schema([(name, unified)]), pa.schema([(name, arrow_type)])]
            try:
                merged = pa.unify_schemas(pair, promote_options="permissive")
            except (pa.ArrowTypeError, pa.ArrowInvalid) as e:
                first, first_type = typed[0]
                raise SchemaError(
                    f"predict: column '{name}' is {first_type} in {first} but {arrow_type} in "
                    f"{path} (expected one type in every input); write the inputs with the "
                    f"same column types"
                ) from e
            unified = merged.field(name).type
        fields.append(pa.field(name, unified))
    return pa.schema(fields)


def _check_inputs_encode(schema: FeatureSchema, file_schemas: dict[Path, pa.Schema]) -> None:
    """Encodes the first rows of each input on the driver, so that a column of a type the
    model cannot read (a list where one id is expected) is one error naming the file, before
    Ray starts, rather than a failure inside the Ray Data actor. Files whose input columns have
    the same types read the same way, so one file of each is enough.

    Raises:
        SchemaError: naming the file and the column.
    """
    columns = schema.dataset.input_columns()
    checked: set[tuple[str, ...]] = set()
    for path, file_schema in file_schemas.items():
        layout = tuple(str(file_schema.field(name).type) for name in columns)
        if layout in checked:
            continue
        with pq.ParquetFile(path) as parquet:
            first = next(parquet.iter_batches(batch_size=64, columns=columns), None)
        if first is None:  # no rows: nothing of this file reaches the model
            continue
        checked.add(layout)
        try:
            schema.encode(pa.Table.from_batches([first]), require_labels=False, where=str(path))
        except SchemaError as e:
            raise SchemaError(f"predict: input {path}: {e}") from e


def predict(
    artifact: Path,
    inputs: list[Path],
    output: Path,
    batch_size: int = 8192,
    address: str | None = None,
    verified: bool = False,
) -> int:
    """Scores Parquet rows with an artifact as a Ray Data job; writes one Parquet file in the
    input order (ids, labels when present, `p_<task>` per served task). Returns rows written.
    `verified`: the caller has already checked the artifact's checksums.

    Inputs, output and column types are checked before Ray starts; the output is replaced only
    once every input row has its prediction.
    """
    import ray.data
    from ray.exceptions import RayTaskError

    from training.ray_runner import ensure_ray

    version_dir = resolve_version_dir(artifact)
    if not verified:
        verify_artifact(version_dir)  # here, not as a traceback from inside a Ray actor
    schema = FeatureSchema.load(version_dir)
    _check_distinct_inputs(inputs)
    _check_predictions_file(output, inputs)
    file_schemas: dict[Path, pa.Schema] = {}
    rows_in = 0
    for path in inputs:
        columns, rows = _parquet_schema_and_rows(path)
        schema.dataset.validate_table(columns, str(path), require_labels=False)
        file_schemas[path] = columns
        rows_in += rows
    if rows_in == 0:
        names = ", ".join(str(path) for path in inputs)
        raise DataError(f"predict: {names}: no rows to score (expected at least one)")
    keep = _kept_columns(schema)
    read_schema = _read_schema(file_schemas, schema.dataset.input_columns() + keep)
    _check_inputs_encode(schema, file_schemas)
    ensure_ray(address, num_workers=1, cpus_per_worker=1)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    # A library error raised in the scorer then reaches this driver as its cause (unwrapped
    # below); Ray Data's own wrapper (UserCodeException) would drop it.
    context.raise_original_map_exception = True
    dataset = ray.data.read_parquet(
        [str(p.resolve()) for p in inputs], schema=read_schema
    ).map_batches(
        _BatchScorer,
        fn_constructor_args=(str(version_dir), keep),
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=1),  # one actor loads the artifact once
    )
    tmp = output.with_name(output.name + ".partial")
    writer: pq.ParquetWriter | None = None
    rows = 0
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                if writer is None:
                    writer = pq.ParquetWriter(tmp, batch.schema)
                writer.write_table(batch)
                rows += batch.num_rows
        except RayTaskError as e:
            if isinstance(e.cause, USER_ERRORS):
                # Ray Data appends its retry advice on new lines; the library's own message
                # is the first line.
                raise type(e.cause)(str(e.cause).split("\n", 1)[0]) from None
            raise
        if writer is None:
            raise DataError(f"predict: {', '.join(map(str, inputs))}: no rows to score")
        writer.close()
        writer = None
        if rows != rows_in:
            raise DataError(
                f"predict: scored {rows} rows but the inputs hold {rows_in} (expected one "
                f"prediction per row); {output} was not written"
            )
        tmp.replace(output)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)  # a failed job leaves no partial file
    logger.info("wrote %d predictions to %s", rows, output)
    return rows


def _seen_in_training(schema: FeatureSchema, table: pa.Table) -> dict[str, np.ndarray]:
    """Per entity id column (user, item) in `table`: "known" for rows whose id the model has an
    embedding for, "unseen" for cold-start rows (scored through the OOV id)."""
    dataset = schema.dataset
    seen = {}
    for entity in (dataset.user, dataset.item):
        if entity is None or entity.id_column not in table.column_names:
            continue
        vocab = schema.vocabs.get(entity.id_column)
        if vocab is None:  # the id keys side features but is not itself a model input
            continue
        ids = vocab.lookup(table[entity.id_column], entity.id_column)
        seen[entity.id_column] = np.where(ids != OOV_ID, "known", "unseen")
    return seen


def vocabulary_coverage(
    schema: FeatureSchema, inputs: list[Path], batch_rows: int = 65_536
) -> dict[str, dict[str, int | float]]:
    """Per categorical feature over the input files: values known to the model's vocabulary,
    out of it (they score as the OOV id) and missing, with the out-of-vocabulary share.

    Streams only the categorical columns, a batch at a time, so it runs on inputs of any size.
    """
    totals: dict[str, np.ndarray] = {}
    for path in inputs:
        batches = pq.ParquetFile(path).iter_batches(
            batch_size=batch_rows, columns=list(schema.counted_features)
        )
        for batch in batches:
            for name, counts in schema.value_outcomes(pa.Table.from_batches([batch])).items():
                totals[name] = totals.get(name, 0) + counts
    return coverage_report(totals)


def metrics_from_predictions(schema: FeatureSchema, table: pa.Table) -> dict[str, Any]:
    """Every metric of every task with labels, overall and per domain, from a predictions table."""
    dataset = schema.dataset
    groups = None
    if dataset.user is not None and dataset.user.id_column in table.column_names:
        groups = table[dataset.user.id_column].to_numpy(zero_copy_only=False)
    report: dict[str, Any] = {"num_rows": table.num_rows, "tasks": {}}
    seen = _seen_in_training(schema, table)
    for label in dataset.labels:
        prob_col = PROB_PREFIX + label.task_name
        if label.name not in table.column_names or prob_col not in table.column_names:
            continue
        labels = table[label.name].to_numpy(zero_copy_only=False).astype(np.float64)
        probs = table[prob_col].to_numpy(zero_copy_only=False)
        task: dict[str, Any] = binary_metrics(labels, probs, groups)
        if dataset.domain and dataset.domain in table.column_names:
            domains = table[dataset.domain].cast(pa.string()).to_numpy(zero_copy_only=False)
            # domains with both classes (the others have no AUC)
            by_domain = auc_by_group(labels, probs, domains)
            task["per_domain"] = {d: m for d, m in by_domain.items() if m["auc"] is not None}
        cold_start = {column: auc_by_group(labels, probs, known) for column, known in seen.items()}
        if cold_start:
            task["cold_start"] = cold_start
        report["tasks"][label.task_name] = task
    # post-click conversion (ESMM's cvr): on clicked rows, the ctcvr label is the conversion
    tasks = {label.task_name: label.name for label in dataset.labels}
    cvr_col = PROB_PREFIX + "cvr"
    if (
        cvr_col in table.column_names
        and {"ctr", "ctcvr"} <= set(tasks)
        and {tasks["ctr"], tasks["ctcvr"]} <= set(table.column_names)
    ):
        report["tasks"]["cvr"] = {
            **cvr_metrics(
                table[tasks["ctr"]].to_numpy(zero_copy_only=False),
                table[tasks["ctcvr"]].to_numpy(zero_copy_only=False),
                table[cvr_col].to_numpy(zero_copy_only=False),
                groups,
            ),
            "rows": "clicked rows only; label = ctcvr (the conversion of a clicked row)",
        }
    if not report["tasks"]:
        raise DataError(
            f"evaluate: the predictions have no label column of the schema "
            f"(expected one of {[c.name for c in dataset.labels]}); evaluate needs "
            f"labelled rows"
        )
    return report


def _check_report_folder(output: Path) -> None:
    """Refuses, before any scoring, an `evaluate --output` that cannot hold the report."""
    if output.exists() and not output.is_dir():
        raise ConfigError(
            f"--output: {output} is a file (expected a folder for predictions.parquet and "
            f"metrics.json); remove it or choose another folder"
        )
    for name in ("predictions.parquet", "metrics.json"):
        if (output / name).is_dir():
            raise ConfigError(
                f"--output: {output / name} is a folder (expected a file evaluate writes); "
                f"remove it or choose another --output"
            )
    _check_writable_folder(output, "--output")


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
    verify_artifact(version_dir)  # here, not as a traceback from inside a Ray actor
    _check_report_folder(output)
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
            if not data_path.is_dir():
                raise DataError(
                    f"evaluate: the artifact's dataset folder {data_path} is gone; pass "
                    f"--data-path with the folder that holds {split}.parquet or {split}/*.parquet"
                )
        inputs = split_files(data_path, split)
    schema = FeatureSchema.load(version_dir)
    for path in inputs:  # every row needs its labels: checked before any scoring
        columns, _ = _parquet_schema_and_rows(path)
        schema.dataset.validate_table(columns, f"evaluate: input {path}", require_labels=True)
    predictions = output / "predictions.parquet"
    predict(version_dir, inputs, predictions, address=address, verified=True)  # makes `output`
    report = metrics_from_predictions(schema, pq.read_table(predictions))
    report.update(
        {
            "artifact": str(version_dir),
            "inputs": [str(p) for p in inputs],
            "split": split,
            "vocabulary": vocabulary_coverage(schema, inputs),
        }
    )
    (output / "metrics.json").write_text(json.dumps(report, indent=2))
    return report
