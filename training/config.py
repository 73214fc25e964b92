"""ExperimentConfig: everything a training run needs, typed, frozen and strict.

A YAML file under configs/ is a serialised ExperimentConfig. `load_config(path, overrides)`
applies `--set section.key=value` overrides and turns pydantic's error into one message naming
the key (and, for an unknown key, the closest valid one).
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from recsys.data.schema import format_validation_error
from recsys.embeddings import EmbeddingConfig
from recsys.errors import ConfigError
from recsys.models.autoint import AutoIntConfig
from recsys.models.registry import ModelConfig
from recsys.search.dnis import DNISConfig

logger = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataConfig(_Strict):
    """Where the rows come from.

    Args:
        dataset: `ml100k-ctr`, `ml100k-esmm`, `ml100k-domains` and `synthetic-ctr` are
            prepared by `recsys data prepare` (the three MovieLens tasks also by the first
            run that needs them); `parquet` is your own data: `path` holds train/valid/test
            Parquet (a file `<split>.parquet` or a folder `<split>/` of shards each) and
            `schema_file` a YAML DatasetSchema.
        path: the prepared dataset folder; defaults to `<data_dir>/<dataset>`.
        schema_file: YAML DatasetSchema; defaults to `<path>/schema.yaml`. A relative path
            is read from the current folder if it is there, else from `path`.
        data_dir: the cache directory; defaults to `$RECSYS_DATA` or `~/.cache/recsys`.
        chunk_rows: rows the driver reads, encodes and shuffles at a time. It bounds the
            driver's memory whatever the split sizes; train rows are shuffled within a chunk,
            and the shard files are read in a new random order every epoch.
        materialize_max_mb: a train split whose encoded columns take at most this many MB
            (uncompressed, from the Parquet metadata) is read once into Ray's object store
            and replayed every epoch; a larger one streams from Parquet every epoch, so
            memory stays bounded. Re-reading costs seconds per epoch (Ray Data starts its
            read tasks again), which dominates an epoch of a small set. 0 always streams.
        ingest_block_mb: the largest block of the train split (Ray Data's
            target_max_block_size when streamed; the driver cuts a materialised split into
            blocks of this size as it reads the files). A worker maps a whole block and its
            shuffle buffer copies rows out of it, so this bounds that part of its memory; with
            Ray's default (128 MB) a small streamed split became one block, read at once.
        ingest_buffer_mb: object-store memory, per worker, that the train read may fill ahead
            of the workers (Ray Data's resource_limits.object_store_memory for the ingest).
            A worker's resident memory counts every object-store page it has read, and the
            store only reuses pages of blocks already freed, so without a limit the read ran
            ahead through the whole split and each worker's resident memory grew with it.
            16 MB is about 50 batches of 1024 rows of 40 int64 columns.
    """

    dataset: Literal["ml100k-ctr", "ml100k-esmm", "ml100k-domains", "synthetic-ctr", "parquet"] = (
        "ml100k-ctr"
    )
    path: str | None = None
    schema_file: str | None = None
    data_dir: str | None = None
    chunk_rows: int = Field(262_144, ge=1024)
    materialize_max_mb: int = Field(1024, ge=0)
    ingest_block_mb: float = Field(4.0, gt=0)
    ingest_buffer_mb: float = Field(16.0, gt=0)

    @model_validator(mode="after")
    def _parquet_needs_path(self) -> DataConfig:
        if self.dataset == "parquet" and self.path is None:
            raise ValueError(
                "data.path is required when data.dataset is 'parquet' (the folder "
                "with train/valid/test Parquet)"
            )
        return self


class TrainConfig(_Strict):
    """Optimisation and evaluation settings (the same for every model).

    Args:
        max_epochs: upper bound; early stopping on valid AUC usually ends the run sooner.
        patience: epochs without a better valid AUC before stopping.
        batch_size: rows per optimizer step per worker.
        dense_lr: Adam learning rate of the dense (non-table) parameters.
        dense_weight_decay: L2 on dense parameters (Adam's decoupled-from-tables penalty).
        table_lr: learning rate of the fused row-wise Adagrad on embedding tables.
        table_eps: row-wise Adagrad epsilon.
        replicate_max_mb: tables of at most this many MB (fp32 rows x width) are replicated
            on every worker (TorchRec data-parallel sharding: no all-to-all of ids and pooled
            embeddings, their dense gradients are all-reduced with the dense part and they
            train with the same row-wise Adagrad, unfused); larger tables are sharded
            table- or row-wise. 0 shards every table. A single worker shards every table
            whose width allows it (nothing to exchange, and the fused kernel is faster).
            The default, 0.25 MB (4,096 rows at width 16), weighs a replicated table's
            all-reduce of its whole gradient every step against the batch's ids and pooled
            embeddings a sharded one exchanges: at 1 MB, synthetic-ctr's 2-worker run
            all-reduced 1.9 MB of tables per step and slowed from 10.1k to 8.9k samples/s.
        eval_batch_size: rows per forward pass in evaluation.
        seed: seeds model init and the train order (file and per-epoch block order of the
            Ray dataset, each worker's shuffle buffer); a materialised train split trains
            bitwise the same model again with the same seed and worker count.
        log_every_steps: rank 0 prints one progress line per this many steps.
        parity_rows: valid rows rescored from the exported artifact as the final check.
        lr_decay_on_plateau: after an epoch without a better valid AUC, every learning rate
            (dense and table) is multiplied by this (FuxiCTR's reduce-on-plateau); 1 disables.
        min_lr_scale: learning rates never fall below this fraction of their start.
        select_metric: the valid metric (higher is better) that early stopping and the choice
            of the exported epoch follow: `auc` (the first task's), or a task's, e.g.
            `ctcvr_auc`, `cvr_auc` (ESMM; CVR on clicked rows), `domain_weighted_auc`.
        init_weights: a safetensors file with a full (unsharded) state dict of this very
            model (its keys and shapes): training starts from those weights instead of a
            fresh init, with fresh optimizer state. `recsys search-dims` points its retrain at
            the searched model's folded weights this way. A resumed run restores its
            checkpoint instead.
        valid_exclude_share: leave this share of the valid rows out of early stopping, the
            choice of the exported epoch and the reported valid metrics (the rows of
            `training.data.valid_part`, a fixed hash of the row number). `recsys search-dims`
            sets it to its `search.alpha_valid_share` when that is below 1, so its retrain
            selects on valid rows that α was not fitted on. 0 (the default) uses every row.
    """

    max_epochs: int = Field(10, ge=1)
    patience: int = Field(2, ge=0)
    batch_size: int = Field(1024, ge=1)
    dense_lr: float = Field(1e-3, gt=0)
    dense_weight_decay: float = Field(0.0, ge=0)
    table_lr: float = Field(0.05, gt=0)
    table_eps: float = Field(1e-8, gt=0)
    replicate_max_mb: float = Field(0.25, ge=0)
    eval_batch_size: int = Field(8192, ge=1)
    seed: int = Field(0, ge=0, lt=2**32)
    log_every_steps: int = Field(50, ge=1)
    parity_rows: int = Field(512, ge=1)
    lr_decay_on_plateau: float = Field(1.0, gt=0, le=1)
    min_lr_scale: float = Field(1e-3, gt=0, le=1)
    select_metric: str = Field("auc", pattern=r"^[a-z_]*auc$")
    init_weights: str | None = None
    valid_exclude_share: float = Field(0.0, ge=0, lt=1)


class RayConfig(_Strict):
    """Where and how wide the job runs.

    Args:
        num_workers: Ray Train workers; each holds a shard of the tables (DMP over gloo).
        cpus_per_worker: CPUs reserved per worker; fractional so Ray Data keeps CPUs to read.
        threads_per_worker: torch/OMP threads in each worker.
        address: an existing Ray cluster (`ray://` or `host:port`); None starts a local one.
        collective_timeout_s: gloo timeout, so a dead peer fails the step instead of hanging.
        max_failures: times Ray Train restarts the worker group from the latest checkpoint
            after a worker dies or raises (0: the first failure ends the run).
    """

    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0)
    threads_per_worker: int = Field(1, ge=1)
    address: str | None = None
    collective_timeout_s: int = Field(300, ge=5)
    max_failures: int = Field(2, ge=0)


class OutputConfig(_Strict):
    """Where results go.

    Args:
        model_name: the artifact's name under the model repository.
        model_repo: `MODEL_REPO/<model_name>/<version>/` receives the artifact.
        run_root: run folders (fitted features, encoded data, Ray's checkpoints, logs).
        run_name: the run folder's name; defaults to `<model_name>-<timestamp>`. Training again
            with the same run_name and the same config resumes that run from its latest
            checkpoint (a finished run returns its result).
        verify_serving: after export, run `recsys verify-artifact` on the artifact (serve it
            over gRPC and compare with the eager scores); the job fails if they differ.
    """

    model_name: str = Field("model", pattern=r"^[A-Za-z0-9_.-]+$")
    model_repo: str = "model_repo"
    run_root: str = "runs"
    run_name: str | None = None
    verify_serving: bool = True


class ExperimentConfig(_Strict):
    """One training run: data, model, embedding, training, Ray and output settings."""

    data: DataConfig = DataConfig()
    model: ModelConfig = Field(default_factory=AutoIntConfig)
    embedding: EmbeddingConfig = EmbeddingConfig()
    train: TrainConfig = TrainConfig()
    ray: RayConfig = RayConfig()
    output: OutputConfig = OutputConfig()
    search: DNISConfig = DNISConfig()  # `recsys search-dims` only

    @field_validator("model", mode="before")
    @classmethod
    def _default_model_name(cls, value: Any) -> Any:
        # `name` selects the model's config class; a block without one means AutoInt, the
        # default model, so older configs keep working.
        if isinstance(value, dict) and "name" not in value:
            return {"name": "autoint", **value}
        return value

    @model_validator(mode="after")
    def _shardable_widths(self) -> ExperimentConfig:
        # TorchRec's sharded table kernels (FBGEMM) assert that every table's width is a
        # multiple of 4; say so here, naming the key, instead of in a worker's traceback.
        # Replicated tables have no such limit; which tables are small enough to be
        # replicated is known once the vocabularies are fitted, so with replication on the
        # check runs then, per table (training.sharding.check_table_widths).
        if self.train.replicate_max_mb > 0:
            return self
        for key, width in table_widths(self.embedding):
            if width % 4:
                raise ValueError(
                    f"{key}={width}: sharded training needs every embedding table's width to "
                    f"be a multiple of 4 (FBGEMM's table kernels); use a multiple of 4, or "
                    f"replicate small tables with train.replicate_max_mb > 0"
                )
        return self


def table_widths(config: EmbeddingConfig) -> list[tuple[str, int]]:
    """(config key, width) of the tables an embedding config creates (empty blocks aside)."""
    widths = [("embedding.dim", config.dim)]
    if config.variant == "unified":
        widths.append(("embedding.unified.chunk_dim", config.unified.chunk_dim))
    if config.variant == "mixed_dim" and config.mixed_dim is not None:
        for field, blocks in config.mixed_dim.fields.items():
            for index, block in enumerate(blocks):
                if block.kept:
                    key = f"embedding.mixed_dim.fields.{field}[{index}] kept width"
                    widths.append((key, len(block.kept)))
    if config.variant == "lowrank" and config.lowrank is not None:
        for field, rank in config.lowrank.ranks.items():
            widths.append((f"embedding.lowrank.ranks.{field}", rank))
    return widths


def _parse_value(key: str, text: str) -> Any:
    """`--set` values are YAML scalars/lists: `3`, `1e-3`, `true`, `[400, 400]`, `null`; a
    setting that takes a string keeps the text as typed (YAML would read `exp #2` as `exp`
    plus a comment, `20240101` as a number and `on` as true), unless it is quoted or `null`."""
    kind = _string_setting(key.split("."))
    stripped = text.strip()
    quoted = len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "'\""
    if kind is not None and not quoted:
        if kind == "optional" and stripped in ("null", "~", ""):
            return None
        return stripped
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(
            f"--set: the value of '{key}' is not valid YAML (got {text!r}: {problem}); "
            f"e.g. --set model.dnn_hidden_units=[400,400], or quote a string"
        ) from e


def _string_setting(parts: list[str]) -> str | None:
    """ "required" or "optional" when the ExperimentConfig setting at `parts` takes a string
    (`str`, or `str | None`); None for any other setting, or a path that names none."""
    model: Any = ExperimentConfig
    for depth, part in enumerate(parts):
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return None
        annotation = field.annotation
        options = (
            set(get_args(annotation))
            if get_origin(annotation) in (Union, UnionType)
            else {annotation}
        )
        if depth == len(parts) - 1:
            if options == {str}:
                return "required"
            return "optional" if options == {str, type(None)} else None
        model = next((o for o in options if isinstance(o, type) and issubclass(o, BaseModel)), None)
        if model is None:
            return None
    return None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies `section.key=value` overrides to a raw config dict (a copy is returned)."""
    result: dict[str, Any] = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"--set: '{item}' is not of the form key=value (e.g. --set model.num_heads=4)"
            )
        key, value = item.split("=", 1)
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set: '{key}' goes through a value, not a section")
        node[parts[-1]] = _parse_value(key.strip(), value)
    return result


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Loads a YAML ExperimentConfig strictly and applies overrides.

    Raises:
        ConfigError: naming the bad key (and the closest valid key for a typo).
    """
    raw: dict[str, Any] = {}
    where = "config"
    if path is not None:
        where = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as e:
            raise ConfigError(
                f"config: file {path} does not exist; pass a YAML file, e.g. "
                "configs/autoint_ml100k.yaml"
            ) from e
        except OSError as e:
            raise ConfigError(
                f"config: cannot read {path} ({e.strerror}); pass a YAML file, e.g. "
                "configs/autoint_ml100k.yaml"
            ) from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path}: not valid YAML ({e})") from e
        if not isinstance(raw, dict):
            raise ConfigError(
                f"config {path}: expected sections (data:, model:, train:, ...) at the top "
                f"level (got a {type(raw).__name__}); see configs/autoint_ml100k.yaml"
            )
    from_file = raw
    raw = apply_overrides(raw, overrides or [])
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        if overrides and _validates(from_file):
            where = "--set"  # the file alone is fine: the bad key or value came from a --set
        raise ConfigError(f"{where}: {format_validation_error(e, ExperimentConfig)}") from e
    for setting in ignored_settings(raw, config.embedding.variant):
        logger.warning(
            "config: %s is set but embedding.variant is '%s', which does not use it",
            setting,
            config.embedding.variant,
        )
    return config


def ignored_settings(raw: dict[str, Any], variant: str) -> list[str]:
    """The embedding settings given (in the file or by --set) that `variant` ignores:
    `param_budget` is read by `hashed` and `unified` only, `unified.*` by `unified`."""
    embedding = raw.get("embedding") or {}
    ignored = []
    if embedding.get("param_budget") is not None and variant not in ("hashed", "unified"):
        ignored.append("embedding.param_budget")
    if variant != "unified":
        ignored += [f"embedding.unified.{key}" for key in sorted(embedding.get("unified") or {})]
    return ignored


def _validates(raw: dict[str, Any]) -> bool:
    try:
        ExperimentConfig.model_validate(raw)
    except ValidationError:
        return False
    return True
