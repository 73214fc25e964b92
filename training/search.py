"""`recsys search-dims`: DNIS embedding-dimension search as a Ray job, then the retrain.

config -> run folder, fitted features and encoded splits (as `recsys train`, training/jobs.py)
-> the search in one Ray task (`search_task`, single-process by design: it needs unfused tables
with explicit optimizers and valid batches for α; recsys/search/dnis.py) -> the run folder's
`search/`: spec.json (the MixedDimSpec), alpha.safetensors (α, pruning scores, kept mask),
init.safetensors (the searched weights in the pruned model's layout, α folded in), curve.json
(valid AUC vs table parameters of the pruning sweep), result.json, search.log -> the pruned
model retrained by the regular trainer (`training.jobs.train`, DMP-sharded) on a copy of the
config with `embedding.variant=mixed_dim` and the spec, same epoch budget and seed, starting
from init.safetensors (`search.retrain_from: searched`, the default, fine-tuned at a tenth of
the train section's learning rates: `search.retrain_lr_scale`) or from scratch, into
`<run>/retrain/`; the trainer writes it as a new version of `output.model_name`.
Running it again with the same `output.run_name` reuses a finished search and resumes the
retrain.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from recsys.embeddings import build_embedding
from recsys.embeddings.config import MixedDimSpec
from recsys.errors import ConfigError
from recsys.features.batch import Batch, batch_from_encoded
from recsys.features.schema import FeatureSchema
from recsys.logs import configure_logging
from recsys.models.outputs import CTRModel
from recsys.models.registry import build_model
from recsys.search.dnis import (
    SearchData,
    build_search_model,
    evaluate,
    folded_state,
    run_search,
)
from training.cli import USER_ERRORS, _run, config_from_args, experiment_parser
from training.config import ExperimentConfig
from training.data import (
    filter_valid_part,
    iter_tables,
    rebatch,
    split_files,
)
from training.loop import RunPaths

logger = logging.getLogger(__name__)

SEARCH_DIR = "search"
RETRAIN_RUN = "retrain"
SUMMARY_FILE = "search_dims.json"
SEARCH_LOG = "search.log"
INIT_WEIGHTS = "init.safetensors"


def _echo(text: str) -> None:
    """The command's results on stdout (what `recsys train` prints with print)."""
    sys.stdout.write(text + "\n")


def search_dims(argv: list[str]) -> int:
    """`recsys search-dims --config FILE [--num-workers N] [--address A] [--set key=value ...]`

    `--num-workers` sets the retrain's Ray Train workers; the search itself is one Ray task.
    """
    parser = experiment_parser(
        "recsys search-dims",
        "DNIS: search a mixed embedding dimension per (field, frequency block) on Ray, then "
        "retrain the pruned model and export it as a new artifact version.",
        "retrain's Ray workers",
        "search.target_ratio=0.3",
    )
    args = parser.parse_args(argv)

    def go() -> int:
        cfg = config_from_args(args)  # before Ray starts: typos fail at once
        summary = run_search_dims(cfg)
        _print_summary(summary)
        return 0

    return _run(go)


def check_search_config(cfg: ExperimentConfig, schema: FeatureSchema | None = None) -> None:
    """Checks the settings the search needs beyond the config's own validators.

    Raises:
        ConfigError: the embedding is not per-feature, `search.width_multiple` does not divide
            `embedding.dim`, or `search.fields` names a field the schema lacks.
    """
    if cfg.embedding.variant != "per_feature":
        raise ConfigError(
            f"search-dims: embedding.variant is '{cfg.embedding.variant}' (expected "
            f"'per_feature'); the search starts from full-width per-feature tables and writes "
            f"the mixed_dim variant itself"
        )
    if cfg.embedding.dim % cfg.search.width_multiple:
        raise ConfigError(
            f"search.width_multiple={cfg.search.width_multiple} must divide "
            f"embedding.dim={cfg.embedding.dim}; pick a dim that is a multiple of it"
        )
    if schema is not None and cfg.search.fields is not None:
        unknown = sorted(set(cfg.search.fields) - set(schema.sparse_names))
        if unknown:
            raise ConfigError(
                f"search.fields: {unknown} are not sparse fields of {cfg.data.dataset} "
                f"(expected some of {schema.sparse_names})"
            )


def run_search_dims(cfg: ExperimentConfig) -> dict[str, Any]:
    """The whole job: prepare, search on Ray, write the search results, retrain; returns the
    summary (also written to `<run>/search_dims.json`)."""
    from training.jobs import prepare_run, resolve_run, train

    check_search_config(cfg)
    cfg, run_dir = resolve_run(cfg)
    paths = prepare_run(cfg, run_dir)
    schema = FeatureSchema.load(Path(paths.features_dir))
    check_search_config(cfg, schema)
    search_dir = run_dir / SEARCH_DIR
    if (search_dir / "result.json").exists():
        logger.info("reusing the finished search in %s", search_dir)
        result = json.loads((search_dir / "result.json").read_text())
    else:
        started = time.perf_counter()
        found = _search_on_ray(cfg, paths)
        found["search_wall_s"] = time.perf_counter() - started
        result = write_search_results(search_dir, found)
    spec = MixedDimSpec.model_validate_json((search_dir / "spec.json").read_text())
    retrain_cfg = retrain_config(cfg, spec, run_dir)
    logger.info(
        "retraining the pruned model from %s (%d of %d table parameters) at dense_lr=%g "
        "table_lr=%g",
        "the searched weights" if cfg.search.retrain_from == "searched" else "scratch",
        result["params"],
        result["full_params"],
        retrain_cfg.train.dense_lr,
        retrain_cfg.train.table_lr,
    )
    trained = train(retrain_cfg)
    summary = {
        "run_dir": str(run_dir),
        "search_dir": str(search_dir),
        "artifact": trained["artifact"],
        "embedding_params": result["params"],
        "full_params": result["full_params"],
        "param_ratio": result["params"] / result["full_params"],
        "dim": cfg.embedding.dim,
        "blocks": result["blocks"],
        "curve": result["curve"],
        "warm_history": result["warm_history"],
        "search_history": result["search_history"],
        "search_wall_s": result.get("search_wall_s"),
        "searched_model": result.get("searched_model"),
        "retrain_from": cfg.search.retrain_from,
        "retrain_lr_scale": cfg.search.retrain_lr_factor,
        "retrain": {
            k: trained.get(k)
            for k in (
                "best_epoch",
                "epochs",
                "valid_auc",
                "valid_logloss",
                "test_auc",
                "test_logloss",
                "train_wall_s",
            )
        },
    }
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def retrain_config(cfg: ExperimentConfig, spec: MixedDimSpec, run_dir: Path) -> ExperimentConfig:
    """The search's config with the searched mixed-dim embedding, trained in `<run>/retrain`
    (same model, train settings, seed and model name); with `search.retrain_from: searched`
    it starts from the search's folded weights (`<run>/search/init.safetensors`), at the train
    section's learning rates times `search.retrain_lr_factor`."""
    raw = cfg.model_dump(mode="json")
    factor = cfg.search.retrain_lr_factor
    raw["train"] = {
        **raw["train"],
        "dense_lr": cfg.train.dense_lr * factor,
        "table_lr": cfg.train.table_lr * factor,
    }
    raw["embedding"] = {
        **raw["embedding"],
        "variant": "mixed_dim",
        "mixed_dim": spec.model_dump(mode="json"),
    }
    if cfg.search.retrain_from == "searched":
        raw["train"] = {
            **raw["train"],
            "init_weights": str(run_dir / SEARCH_DIR / INIT_WEIGHTS),
        }
    if cfg.search.alpha_valid_share < 1:  # select on the valid rows the search never read
        raw["train"] = {**raw["train"], "valid_exclude_share": cfg.search.alpha_valid_share}
    raw["output"] = {**raw["output"], "run_root": str(run_dir), "run_name": RETRAIN_RUN}
    return ExperimentConfig.model_validate(raw)


def write_search_results(search_dir: Path, found: dict[str, Any]) -> dict[str, Any]:
    """Writes spec.json, alpha.safetensors, curve.json and result.json (last, so its presence
    means a finished search); returns result.json's content."""
    search_dir.mkdir(parents=True, exist_ok=True)
    spec = MixedDimSpec.model_validate(found["spec"])
    (search_dir / "spec.json").write_text(spec.model_dump_json(indent=2))
    save_file(
        {
            "alpha": torch.tensor(found["alpha"], dtype=torch.float32),
            "scores": torch.tensor(found["scores"], dtype=torch.float32),
            "kept": torch.tensor(found["mask"], dtype=torch.uint8),
        },
        str(search_dir / "alpha.safetensors"),
    )
    curve = {
        "x": "table parameters",
        "y": "valid AUC of the searched model pruned to them (no retraining)",
        "full_params": found["full_params"],
        "points": found["curve"],
        "chosen": {"params": found["params"]},
    }
    (search_dir / "curve.json").write_text(json.dumps(curve, indent=2))
    result = {k: v for k, v in found.items() if k not in ("alpha", "scores", "mask", "spec")}
    (search_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


# --- inside Ray ---------------------------------------------------------------------------------
def _search_on_ray(cfg: ExperimentConfig, paths: RunPaths) -> dict[str, Any]:
    """Runs `search_task` as one Ray task; a library error raised in it is re-raised as is."""
    import ray
    from ray.exceptions import RayTaskError

    from training.ray_runner import ensure_ray

    ensure_ray(cfg.ray.address, num_workers=1, cpus_per_worker=cfg.ray.cpus_per_worker)
    task = ray.remote(search_task).options(num_cpus=cfg.ray.cpus_per_worker, max_retries=0)
    logger.info("search: one Ray task (%.1f CPU)", cfg.ray.cpus_per_worker)
    try:
        found: dict[str, Any] = ray.get(
            task.remote(cfg.model_dump(mode="json"), paths.model_dump())
        )
        return found
    except RayTaskError as e:
        if isinstance(e.cause, USER_ERRORS):
            raise e.cause from None
        raise


def search_task(config: dict[str, Any], paths_raw: dict[str, Any]) -> dict[str, Any]:
    """The search, in a Ray worker: builds the soft-selection model, streams the encoded
    splits from the run folder, runs DNIS and returns its results as JSON-able values."""
    cfg = ExperimentConfig.model_validate(config)
    paths = RunPaths.model_validate(paths_raw)
    search_dir = Path(paths.run_dir) / SEARCH_DIR
    search_dir.mkdir(exist_ok=True)
    _log_to(search_dir / SEARCH_LOG)
    torch.set_num_threads(cfg.ray.threads_per_worker)
    torch.manual_seed(cfg.train.seed)
    schema = FeatureSchema.load(Path(paths.features_dir))
    model = build_search_model(cfg.model, schema, cfg.embedding, cfg.search)
    result = run_search(model, _search_data(schema, Path(paths.encoded_dir), cfg), cfg.search)
    embedding = model.embedding
    # The searched weights in the pruned model's layout, α folded in: the retrain's start when
    # search.retrain_from is "searched" (written either way; the pruned model is small).
    pruned_cfg = retrain_config(cfg, result.spec, Path(paths.run_dir))
    pruned = build_model(cfg.model, build_embedding(schema, pruned_cfg.embedding), schema)
    state = folded_state(model, result.mask, pruned)
    save_file(state, str(search_dir / INIT_WEIGHTS))
    pruned.load_state_dict(state)
    searched_model = _searched_model_metrics(pruned, schema, Path(paths.encoded_dir), pruned_cfg)
    return {
        "spec": result.spec.model_dump(mode="json"),
        "alpha": result.alpha.tolist(),
        "scores": result.scores.tolist(),
        "mask": result.mask.to(torch.uint8).tolist(),
        "params": result.params,
        "full_params": result.full_params,
        "curve": result.curve,
        "warm_history": result.warm_history,
        "search_history": result.search_history,
        "blocks": result.blocks,
        "searched_model": searched_model,
        "fields": schema.sparse_names,
        "block_ends": getattr(embedding, "block_ends", None),
        "search": cfg.search.model_dump(mode="json"),
    }


def _log_to(path: Path) -> None:
    # A Ray worker is an entry point: progress goes to its stdout (Ray forwards it to the
    # driver) and to the run folder.
    configure_logging("%(message)s", force=True)
    search_logger = logging.getLogger("recsys.search")
    if not any(getattr(h, "baseFilename", None) == str(path) for h in search_logger.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        search_logger.addHandler(handler)


def _shuffled(table: pa.Table, rng: np.random.Generator) -> pa.Table:
    return table.take(pa.array(rng.permutation(table.num_rows)))


def _searched_model_metrics(
    pruned: CTRModel, schema: FeatureSchema, encoded_dir: Path, cfg: ExperimentConfig
) -> dict[str, float]:
    """Valid and test AUC/logloss of the searched model pruned to the spec, α folded in, before
    any retraining: what the retrain adds. Test is read for this report only; no decision of
    the search or the retrain looks at it. `cfg` is the retrain's config (`retrain_config`):
    valid is scored on the rows the retrain selects on. With `search.alpha_valid_share` 1 those
    are the rows α was fitted on (METHODS.md §7(b)4), so the valid figures are optimistic;
    below 1 they are rows the search never read."""
    exclude = cfg.train.valid_exclude_share

    def split(name: str) -> Iterator[Batch]:
        tables = iter_tables(split_files(encoded_dir, name))
        if name == "valid":
            tables = filter_valid_part(tables, exclude, inside=False)
        for table in rebatch(tables, cfg.train.eval_batch_size):
            yield batch_from_encoded(schema, table)

    metrics: dict[str, float] = {}
    for name in ("valid", "test"):
        with torch.no_grad():
            found = evaluate(pruned, split(name))
        metrics.update({f"{name}_auc": found["auc"], f"{name}_logloss": found["logloss"]})
    return metrics


def _search_data(schema: FeatureSchema, encoded_dir: Path, cfg: ExperimentConfig) -> SearchData:
    """Batches streamed from the run folder's encoded shards: train in a new shard order and
    row order every epoch, valid endlessly (reshuffled every pass) for the α steps, and valid in
    order for the AUC; valid is the `search.alpha_valid_share` part of its rows. Memory stays
    at a few shards, whatever the split sizes."""
    train_files = split_files(encoded_dir, "train")
    valid_files = split_files(encoded_dir, "valid")
    size, seed = cfg.search.batch_size, cfg.train.seed
    share = cfg.search.alpha_valid_share

    def shuffled_pass(
        files: list[Path], rng: np.random.Generator, part: float = 1.0
    ) -> Iterator[pa.Table]:
        for index in rng.permutation(len(files)):
            for table in filter_valid_part([pq.read_table(files[index])], part, inside=True):
                yield _shuffled(table, rng)

    def train_epoch(epoch: int) -> Iterator[Batch]:
        rng = np.random.default_rng([seed, epoch])
        for table in rebatch(shuffled_pass(train_files, rng), size):
            yield batch_from_encoded(schema, table)

    def valid_stream() -> Iterator[Batch]:
        for cycle in itertools.count():
            rng = np.random.default_rng([seed, 1_000_000 + cycle])
            for table in rebatch(shuffled_pass(valid_files, rng, share), size):
                yield batch_from_encoded(schema, table)

    def valid_eval() -> Iterator[Batch]:
        tables = filter_valid_part(iter_tables(valid_files), share, inside=True)
        for table in rebatch(tables, cfg.train.eval_batch_size):
            yield batch_from_encoded(schema, table)

    return SearchData(train_epoch=train_epoch, valid_stream=valid_stream(), valid_eval=valid_eval)


# --- the summary --------------------------------------------------------------------------------
def _print_summary(summary: dict[str, Any]) -> None:
    warm, searched = summary["warm_history"], summary["search_history"]
    best_warm = max((r["valid_auc"] for r in warm), default=float("nan"))
    _echo(
        f"search: {len(warm)} warm-start epochs (best valid auc {best_warm:.4f}), "
        f"{len(searched)} search epochs (valid auc "
        f"{searched[-1]['valid_auc'] if searched else float('nan'):.4f}) in "
        f"{summary.get('search_wall_s') or float('nan'):.0f}s"
    )
    _echo("kept dims per block (rows:kept, frequent ids first):")
    by_field: dict[str, list[str]] = {}
    for block in summary["blocks"]:
        by_field.setdefault(block["field"], []).append(f"{block['rows']}:{block['kept']}")
    width = max(len(name) for name in by_field)
    for name, cells in by_field.items():
        _echo(f"  {name:<{width}}  " + "  ".join(cells))
    params, full = summary["embedding_params"], summary["full_params"]
    _echo(
        f"embedding params: {params:,} of {full:,} for per-feature d={summary['dim']} "
        f"({params / full:.2f}, {full / max(params, 1):.1f}x fewer)"
    )
    _echo(
        "pruning sweep, valid auc before retraining: "
        + " | ".join(f"{p['params']:,}: {p['valid_auc']:.4f}" for p in summary["curve"])
    )
    searched = summary.get("searched_model")
    if searched:  # absent from a search finished before it was recorded
        _echo(
            f"searched model, pruned, before retraining: valid auc={searched['valid_auc']:.4f} "
            f"(optimistic: alpha was fitted on valid) | test auc={searched['test_auc']:.4f}"
        )
    retrain = summary["retrain"]
    _echo(
        f"retrained: best epoch {retrain['best_epoch']}: valid auc={retrain['valid_auc']:.4f} "
        f"logloss={retrain['valid_logloss']:.4f} | test auc={retrain['test_auc']:.4f} "
        f"logloss={retrain['test_logloss']:.4f}"
    )
    _echo(f"artifact: {summary['artifact']}")
    _echo(f"search results: {summary['search_dir']}")
