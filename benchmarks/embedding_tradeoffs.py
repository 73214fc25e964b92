"""Embedding trade-offs: parameters against test AUC for fixed widths, DNIS's searched mixed
dimensions, low-rank compression, and unified (multiplexed) embeddings against per-feature
tables and per-feature hashing at equal budgets.

Parts (all AutoInt, trained by the project's own trainer, 2 Ray workers):
  fixed     per-feature tables at d in {2, 4, 8, 12, 16, 32} on ml100k-ctr, 3 seeds: the fixed-d
            curve (the same trainer, epoch budget and seeds as DNIS's retrain); every table
            sharded (train.replicate_max_mb=0) as in DNIS's retrain, except d=2, which only
            trains replicated (FBGEMM's sharded kernels need widths divisible by 4)
  dnis      `recsys search-dims` (search + pruning + retrain), 3 seeds: the default, a
            fine-tune of the searched weights with α folded in at a tenth of the learning
            rates, at 1/2 of d=16's table parameters (dnis/finetune/...); the retrain from the
            searched weights at the full rates at 1/2 and 3/8, and from scratch at 1/2, 1/4
            and 3/8, pruned by α; also pruned by magnitude (mean |α e| per block and dim, the
            authors' notebooks) at 1/2; and searched over d=32, pruned to d=8's parameter
            count and retrained from the search; each cell also records the pruned searched
            model's valid and test AUC before the retrain
  lowrank   AutoInt+ (DNN [400, 400]) trained, compressed by activation PCA to a 3x and a 4x
            smaller model (the same trained model) and fine-tuned; weight SVD at the same ranks
            and a small model trained from scratch at about the same size, 3 seeds
  unified   ml100k-ctr, 3 seeds: unified and hashed at budgets of a quarter and a half of the
            d=16 collisionless parameter count (per-feature tables at those budgets are the
            fixed-d points d=4 and d=8)
  synthetic synthetic-ctr (1M rows, vocabularies up to 10M so collisions matter), 1 seed:
            per-feature at d in {4, 16} and unified / hashed at a few budgets
  epochs    the epoch-budget check: the fixed-d curve (d in {2, 4, 8, 16, 32}) and DNIS from
            scratch at 1/2 of d=16, both with train.max_epochs=20 instead of the config's 10
            (many 10-epoch cells pick their last epoch), 3 seeds, cells e20/...; reported
            beside the 10-epoch headline as `epoch_budget_20`, not in place of it
  finetune  the control of the fine-tune point: the fixed d=8 and d=16 models (the fixed
            part's, 3 seeds) trained again from their own weights at the same tenth of the
            learning rates, cells finetune/fixed/...; reported as `finetune_control`
  seeds     two more seeds (3, 4) of the fixed-d curve, of the fine-tune control and of DNIS
            at 1/2 of d=16 retrained from the searched weights, from scratch and fine-tuned:
            the three-seed comparison with d=16 is inside its own noise (paired se ~0.001);
            reported as `five_seeds` beside the three-seed headline, not in place of it

Prints figures and writes benchmarks/results/embedding_tradeoffs.json: per-cell results
(config, metrics, embedding parameters, the run's log), git sha, machine, date and a `summary`.
Each cell is saved as soon as it finishes and skipped when the script runs again, so a sweep
can span sessions (`--fresh` starts over; `--parts` runs some parts only; `--rerun PREFIX`
runs the saved cells whose names start with PREFIX again).

    python benchmarks/embedding_tradeoffs.py                      # everything (hours)
    python benchmarks/embedding_tradeoffs.py --parts fixed dnis   # some parts
    python benchmarks/embedding_tradeoffs.py --smoke --output /tmp/et.json   # minutes
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _common import git_sha, machine, saved_doc  # benchmarks/ is the script folder on sys.path

from recsys.data.movielens import default_data_dir, prepare_movielens
from training.config import ExperimentConfig, load_config
from training.jobs import train

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "embedding_tradeoffs.json"
AUTOINT = ROOT / "configs" / "autoint_ml100k.yaml"
SEEDS = (0, 1, 2)
# d = 2 is not trainable sharded: FBGEMM's table kernels need widths divisible by 4 (TorchRec
# asserts local_cols % 4 == 0), so it runs with its (small) tables replicated; d = 12 fills
# the gap between 8 and 16.
FIXED_DIMS = (2, 4, 8, 12, 16, 32)
SHARDED = "train.replicate_max_mb=0"  # the setting the curve's other points and DNIS ran with
REPLICATED = "train.replicate_max_mb=1"
# DNIS's points: (where the retrain starts, parameter target as a share of the searched
# width's tables, what ranks the pruned entries: search.prune_score, the searched width d).
# Scratch cells of α pruning from d=16 at the config's own target (0.5) are named dnis/seed<N>,
# other scratch targets dnis/r<share>/seed<N>, the others
# dnis/<start>[-<score>][-d<d>]/r<share>/seed<N> (`-<score>` when it is not α, `-d<d>` when the
# search is not over d=16).
DNIS_POINTS = (
    # the default of `recsys search-dims` (configs/dnis_ml100k.yaml, search.retrain_lr_scale
    # null): a fine-tune of the searched weights (METHODS.md §7(b)6) at a tenth of the train
    # section's learning rates; the retrain's fresh row-wise Adagrad at the full table_lr 0.05
    # moves every row by ~0.05 on its first steps, about the scale of the searched embeddings
    ("finetune", 0.5, "alpha", 16),
    # the retrain from the searched weights at the full learning rates (the default until the
    # fine-tune beat it on seeds 0-2 and then on the fresh seeds 3 and 4)
    ("searched", 0.5, "alpha", 16),
    ("searched", 0.375, "alpha", 16),
    ("searched", 0.5, "magnitude", 16),
    ("scratch", 0.5, "alpha", 16),
    ("scratch", 0.25, "alpha", 16),
    ("scratch", 0.375, "alpha", 16),
    # searched over d=32 (a wider space than the kept widths, as the paper's d=64), pruned to
    # d=8's parameter count
    ("searched", 0.25, "alpha", 32),
    # the same fine-tune with α fitted on half of the valid rows and the retrain selecting its
    # epoch on the other half: α is fitted on valid, so a fine-tune that early-stops on the same
    # rows sees a valid AUC that falls from α's optimistic fit while test still rises
    ("finetune-heldout", 0.5, "alpha", 16),
)
# the learning rates of the `finetune` start's retrain (the config's 1e-3 and 0.05 times
# search.retrain_lr_scale 0.1); the fine-tune control trains the fixed models again at these
FINETUNE = ("train.dense_lr=0.0001", "train.table_lr=0.005")
HELDOUT_SHARE = 0.5  # `finetune-heldout`: search.alpha_valid_share
# what each DNIS start runs: search.retrain_from and the overrides it adds (the retrain's
# learning-rate scale is explicit, so a start means the same whatever the config's default)
STARTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "searched": ("searched", ("search.retrain_lr_scale=1",)),
    "scratch": ("scratch", ("search.retrain_lr_scale=1",)),
    "finetune": ("searched", ("search.retrain_lr_scale=0.1",)),
    "finetune-heldout": (
        "searched",
        ("search.retrain_lr_scale=0.1", f"search.alpha_valid_share={HELDOUT_SHARE}"),
    ),
}
# low-rank size targets (whole model, x smaller); cells lowrank/seed<N> (3x), lowrank/r<R>/seed<N>
LOWRANK_RATIOS = (3.0, 4.0)
PARTS = ("fixed", "dnis", "lowrank", "unified", "synthetic", "epochs", "finetune", "seeds")
# unified / hashed budgets on ml100k-ctr, as fractions of the d=16 collisionless parameters
# (the smoke run takes the first); 1/8, 1/4, 1/2 and 1 are d=2's, d=4's, d=8's and d=16's counts
ML100K_BUDGET_FRACTIONS = (0.25, 0.5, 0.125, 1.0)
SYNTHETIC_ROWS = 1_000_000
SYNTHETIC_DIMS = (4, 16)
# of per-feature d=16's parameters; 1/4 and 1 are d=4's and d=16's counts
SYNTHETIC_BUDGET_FRACTIONS = (1 / 16, 1 / 4, 1.0)
SYNTHETIC_EPOCHS = 3
SMOKE_SYNTHETIC_ROWS = 20_000
SUMMARY_KEYS = (
    "d16_test_auc",
    "d16_embedding_params",
    "dnis_test_auc",
    "dnis_embedding_params",
    "dnis_fixed_curve_auc_at_same_params",
    "lowrank_size_ratio",
    "lowrank_test_auc",
    "uncompressed_test_auc",
    "weight_svd_test_auc",
    "unified_ml100k_pareto",
    "per_feature_ml100k_pareto",
    "unified_synthetic_pareto",
    "per_feature_synthetic_pareto",
)


def embedding_params(artifact: Path) -> int:
    """Parameters in the artifact's embedding tables (rows x width summed over tables)."""
    config = json.loads((artifact / "config.json").read_text())
    return int(sum(math.prod(shape) for shape in config["tables"].values()))


def _log_lines(cfg: ExperimentConfig) -> list[str]:
    log_file = Path(cfg.output.run_root) / str(cfg.output.run_name) / "train.log"
    return log_file.read_text().splitlines() if log_file.exists() else []


def train_cell(
    config_file: Path, overrides: list[str], work: Path, name: str, smoke: bool
) -> dict[str, Any]:
    """One `recsys train` run; its result, the embedding parameters and the log."""
    overrides = [
        *overrides,
        f"output.run_root={work / 'runs'}",
        f"output.model_repo={work / 'repo'}",
        f"output.model_name={name.replace('/', '_')}",
        f"output.run_name={name.replace('/', '_')}-{int(time.time())}",
        "output.verify_serving=false",
    ]
    if smoke:
        overrides += ["train.max_epochs=1", "ray.num_workers=1"]
    cfg = load_config(config_file, overrides)
    started = time.perf_counter()
    result = train(cfg)
    return {
        "config": cfg.model_dump(mode="json"),
        "result": result,
        "test_auc": result["test_auc"],
        "embedding_params": embedding_params(Path(result["artifact"])),
        "wall_s": time.perf_counter() - started,
        "log": _log_lines(cfg),
    }


# --- the cells of each part: name -> a function that runs it ----------------------------------
Cell = Callable[[], dict[str, Any]]


def fixed_cells(
    ml100k: Path,
    work: Path,
    smoke: bool,
    dims: tuple[int, ...] = FIXED_DIMS,
    extra: tuple[str, ...] = (),
    prefix: str = "",
    seeds: tuple[int, ...] = SEEDS,
) -> dict[str, Cell]:
    """Cells `<prefix>fixed/d<d>/seed<N>`: AutoInt at width d, the config's settings plus
    `extra` overrides."""
    dims = (16,) if smoke else dims  # smoke: the d16 keys; make test's time is short
    seeds = seeds[:1] if smoke else seeds
    run_prefix = prefix.replace("/", "-")
    return {
        f"{prefix}fixed/d{d}/seed{seed}": (
            lambda d=d, seed=seed: train_cell(
                AUTOINT,
                [
                    f"data.path={ml100k}",
                    f"embedding.dim={d}",
                    f"train.seed={seed}",
                    SHARDED if d % 4 == 0 else REPLICATED,
                    *extra,
                ],
                work,
                f"{run_prefix}fixed-d{d}-seed{seed}",
                smoke,
            )
        )
        for d in dims
        for seed in seeds
    }


# The epoch-budget check: its curve is the d in {2, 4, 8, 16, 32}, its DNIS point the
# from-scratch retrain at 1/2; d = 8 and d = 16 run first (the DNIS point meets those two).
EPOCH_BUDGET = 20
EPOCH_PREFIX = f"e{EPOCH_BUDGET}/"
EPOCH_DIMS = (2, 4, 8, 16, 32)
EPOCH_FIRST_DIMS = (8, 16)

# The fine-tune control: DNIS's `finetune` point trains its pruned model once more at the
# FINETUNE learning rates after the warm start and the search, so the fixed models it is held
# against get the same second stage, from their own trained weights (cells
# finetune/fixed/d<d>/seed<N>). d = 8 has the DNIS point's parameter count; d = 16 is the bar.
FINETUNE_PREFIX = "finetune/"
FINETUNE_DIMS = (8, 16)

# The five-seed check: seeds 3 and 4 of the fixed-d curve and of these DNIS points (at 1/2 of
# d=16, searched over d=16, pruned by α), named as the three-seed cells are (fixed/d16/seed3,
# dnis/finetune/r0.5/seed4, ...). The headline stays the three seeds (SEEDS).
EXTRA_SEEDS = (3, 4)
FIVE_SEEDS = (*SEEDS, *EXTRA_SEEDS)
FIVE_SEED_STARTS = ("searched", "scratch", "finetune")


def finetune_cell(
    ml100k: Path, work: Path, dim: int, seed: int, smoke: bool, doc: dict[str, Any]
) -> dict[str, Any]:
    """The saved fixed/d<dim>/seed<seed> model's weights trained again at the FINETUNE
    learning rates (the same config, epoch budget and early stopping)."""
    base = doc["cells"].get(f"fixed/d{dim}/seed{seed}")
    weights = Path(base["result"]["artifact"]) / "model.safetensors" if base else None
    if weights is None or not weights.is_file():
        raise FileNotFoundError(
            f"{FINETUNE_PREFIX}fixed/d{dim}/seed{seed} starts from the model of the saved cell "
            f"fixed/d{dim}/seed{seed}, which is missing or whose artifact ({weights}) is gone; "
            f"run it again first: --parts fixed finetune --rerun fixed/d{dim}/seed{seed}"
        )
    overrides = [
        f"data.path={ml100k}",
        f"embedding.dim={dim}",
        f"train.seed={seed}",
        SHARDED,
        f"train.init_weights={weights}",
        *FINETUNE,
    ]
    return train_cell(AUTOINT, overrides, work, f"finetune-fixed-d{dim}-seed{seed}", smoke)


def finetune_cells(
    ml100k: Path, work: Path, smoke: bool, doc: dict[str, Any], seeds: tuple[int, ...] = SEEDS
) -> dict[str, Cell]:
    """Cells `finetune/fixed/d<d>/seed<N>` (`finetune_cell`); planned after the fixed cells,
    which they start from."""
    dims = (16,) if smoke else FINETUNE_DIMS
    return {
        f"{FINETUNE_PREFIX}fixed/d{d}/seed{seed}": (
            lambda d=d, seed=seed: finetune_cell(ml100k, work, d, seed, smoke, doc)
        )
        for d in dims
        for seed in (seeds[:1] if smoke else seeds)
    }


AUTOINT_PLUS = ROOT / "configs" / "autoint_plus_ml100k.yaml"
# Small AutoInt+ models trained from scratch; the one closest in size to the compressed model
# is the "same size, no compression" baseline.
SMALL_CANDIDATES = (
    ["embedding.dim=8", "model.attention_dim=32", "model.dnn_hidden_units=[128, 128]"],
    ["embedding.dim=8", "model.attention_dim=32", "model.dnn_hidden_units=[200, 200]"],
    ["embedding.dim=12", "model.attention_dim=32", "model.dnn_hidden_units=[160, 160]"],
    ["embedding.dim=8", "model.attention_dim=64", "model.dnn_hidden_units=[128, 128]"],
)


def total_params(artifact: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(artifact / "model.safetensors"), framework="pt") as f:
        return int(sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()))  # noqa: SIM118 (no __iter__)


def _params_of(overrides: list[str], ml100k: Path) -> int:
    """Parameters of AutoInt+ built with `overrides` (no training)."""
    from recsys.data.schema import DatasetSchema
    from recsys.embeddings import build_embedding
    from recsys.features.schema import fit_feature_schema
    from recsys.models.registry import build_model
    from training.data import iter_tables, split_files

    cfg = load_config(AUTOINT_PLUS, overrides)
    dataset = DatasetSchema.from_yaml(ml100k / "schema.yaml")
    schema = fit_feature_schema(dataset, iter_tables(split_files(ml100k, "train")))
    model = build_model(cfg.model, build_embedding(schema, cfg.embedding), schema)
    return sum(p.numel() for p in model.parameters())


def lowrank_name(ratio: float, seed: int) -> str:
    return f"lowrank/seed{seed}" if ratio == 3 else f"lowrank/r{ratio:g}/seed{seed}"


def lowrank_cell(
    ml100k: Path,
    work: Path,
    seed: int,
    smoke: bool,
    ratio: float = 3.0,
    trained: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """AutoInt+ trained (or `trained`, the same seed's run of another ratio's cell, reused),
    `recsys compress --target-ratio R --compare-svd`, and a small model trained from scratch at
    about the compressed size."""
    if trained is None:
        trained = train_cell(
            AUTOINT_PLUS,
            [f"data.path={ml100k}", f"train.seed={seed}"],
            work,
            f"autoint-plus-seed{seed}",
            smoke,
        )
    artifact = Path(trained["result"]["artifact"])
    command = [
        sys.executable, "-m", "recsys.cli", "compress", "--artifact", str(artifact),
        "--target-ratio", f"{ratio:g}", "--compare-svd", "--threads", "1", "--data", str(ml100k),
        "--name", f"autoint-plus-r{ratio:g}-seed{seed}",
    ]  # fmt: skip
    if smoke:
        command += ["--epochs", "1"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"recsys compress failed:\n{done.stderr[-3000:]}")
    compressed = Path(json.loads(done.stdout.strip().splitlines()[-1])["artifact"])
    report = json.loads((compressed / "metrics.json").read_text())["compression"]
    test = report["stages"]["test"]
    final = "fine_tuned" if "fine_tuned" in test else "compressed"
    svd_final = "svd_fine_tuned" if "svd_fine_tuned" in test else "svd_compressed"
    target = report["params_after"]
    candidates = SMALL_CANDIDATES[:1] if smoke else SMALL_CANDIDATES
    sizes = {tuple(o): _params_of(o, ml100k) for o in candidates}
    small = min(sizes, key=lambda o: abs(sizes[o] - target))
    scratch = train_cell(
        AUTOINT_PLUS,
        [f"data.path={ml100k}", f"train.seed={seed}", *small],
        work,
        f"autoint-plus-small-r{ratio:g}-seed{seed}",
        smoke,
    )
    return {
        "target_ratio": ratio,
        "trained": trained,
        "compress_s": time.perf_counter() - started,
        "compress_stdout": done.stdout.splitlines()[-40:],
        "report": report,
        "uncompressed_test_auc": test["original"]["auc"],
        "lowrank_before_fine_tune_test_auc": test["compressed"]["auc"],
        "lowrank_test_auc": test[final]["auc"],
        "weight_svd_test_auc": test[svd_final]["auc"],
        "size_ratio": report["params_before"] / report["params_after"],
        "bytes_ratio": report["bytes_before"] / report["bytes_after"],
        "params_before": report["params_before"],
        "params_after": report["params_after"],
        "small_scratch_overrides": list(small),
        "small_scratch_params": total_params(Path(scratch["result"]["artifact"])),
        "small_scratch_test_auc": scratch["test_auc"],
        "small_scratch": scratch,
        "test_auc": test[final]["auc"],
        "embedding_params": embedding_params(compressed),
        "wall_s": time.perf_counter() - started + trained["wall_s"],
    }


DNIS = ROOT / "configs" / "dnis_ml100k.yaml"


def dnis_name(
    target: float, seed: int, start: str = "scratch", score: str = "alpha", dim: int = 16
) -> str:
    if start == "scratch" and score == "alpha" and dim == 16:
        return f"dnis/seed{seed}" if target == 0.5 else f"dnis/r{target:g}/seed{seed}"
    variant = start if score == "alpha" else f"{start}-{score}"
    if dim != 16:
        variant += f"-d{dim}"
    return f"dnis/{variant}/r{target:g}/seed{seed}"


def dnis_cell(
    ml100k: Path,
    work: Path,
    seed: int,
    smoke: bool,
    target: float = 0.5,
    start: str = "scratch",
    score: str = "alpha",
    dim: int = 16,
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    """`recsys search-dims` (the search on Ray, pruning by `score`, the retrain by the trainer
    from `start`: the searched weights, scratch, `finetune`: the searched weights at the lower
    `FINETUNE` learning rates, or `finetune-heldout`: that with α fitted on `HELDOUT_SHARE`
    of the valid rows and the retrain selecting on the rest), the config's settings plus
    `extra`."""
    from training.search import run_search_dims

    retrain_from, start_overrides = STARTS[start]
    overrides = [
        f"data.path={ml100k}",
        f"train.seed={seed}",
        f"search.target_ratio={target}",
        f"search.retrain_from={retrain_from}",
        f"search.prune_score={score}",
        f"embedding.dim={dim}",
        SHARDED,
        f"output.run_root={work / 'runs'}",
        f"output.model_repo={work / 'repo'}",
        "output.model_name=dnis",
        f"output.run_name=dnis-{start}-{score}-d{dim}-r{target:g}-seed{seed}-{int(time.time())}",
        "output.verify_serving=false",
        *start_overrides,
        *extra,
    ]
    if smoke:
        overrides += [
            "train.max_epochs=1",
            "ray.num_workers=1",
            "search.warm_max_epochs=1",
            "search.search_epochs=1",
        ]
    cfg = load_config(DNIS, overrides)
    started = time.perf_counter()
    summary = run_search_dims(cfg)
    widths = sorted({len(b["kept"]) for b in _blocks(Path(summary["artifact"]))})
    return {
        "config": cfg.model_dump(mode="json"),
        "retrain_from": start,
        "prune_score": score,
        "searched_dim": dim,
        "summary": summary,
        "test_auc": summary["retrain"]["test_auc"],
        "embedding_params": embedding_params(Path(summary["artifact"])),
        "searched_params": summary["embedding_params"],
        # the pruned searched model before the retrain (valid is optimistic: α fitted on it)
        "searched_model": summary.get("searched_model"),
        "kept_widths": widths,
        "wall_s": time.perf_counter() - started,
    }


def _blocks(artifact: Path) -> list[dict[str, Any]]:
    """The kept-dimension blocks of a mixed_dim artifact's config.json."""
    embedding = json.loads((artifact / "config.json").read_text())["embedding"]
    return [b for blocks in embedding["mixed_dim"]["fields"].values() for b in blocks]


def collisionless_params(ml100k: Path, dim: int) -> int:
    """Rows of every per-feature table of ml100k-ctr times `dim` (the fitted vocabularies)."""
    from recsys.data.schema import DatasetSchema
    from recsys.features.schema import fit_feature_schema
    from training.data import iter_tables, split_files

    dataset = DatasetSchema.from_yaml(ml100k / "schema.yaml")
    schema = fit_feature_schema(dataset, iter_tables(split_files(ml100k, "train")))
    return sum(f.num_embeddings for f in schema.sparse) * dim


def budget_cells(
    prefix: str,
    data_overrides: list[str],
    budgets: dict[str, int],
    seeds: tuple[int, ...],
    work: Path,
    smoke: bool,
) -> dict[str, Cell]:
    cells: dict[str, Cell] = {}
    for variant in ("unified",) if smoke else ("unified", "hashed"):
        for label, budget in budgets.items():
            for seed in seeds:
                name = f"{prefix}/{variant}/{label}/seed{seed}"
                overrides = [
                    *data_overrides,
                    f"embedding.param_budget={budget}",
                    f"train.seed={seed}",
                    SHARDED,
                ]
                config = ROOT / "configs" / f"autoint_{variant}_ml100k.yaml"
                cells[name] = lambda c=config, o=overrides, n=name: train_cell(
                    c, o, work, n.replace("/", "-"), smoke
                )
    return cells


def synthetic_cells(doc: dict[str, Any], work: Path, smoke: bool) -> dict[str, Cell]:
    """Per-feature tables at d in SYNTHETIC_DIMS, then unified and hashed at fractions of the
    d=16 cell's embedding parameters (known once that cell has run)."""
    from train_throughput import ensure_synthetic  # benchmarks/ is on sys.path

    rows = SMOKE_SYNTHETIC_ROWS if smoke else SYNTHETIC_ROWS
    folder = ensure_synthetic(default_data_dir() / f"synthetic-ctr-{rows}-seed0-v1", rows)
    data = [
        "data.dataset=synthetic-ctr",
        f"data.path={folder}",
        f"train.max_epochs={1 if smoke else SYNTHETIC_EPOCHS}",
        SHARDED,  # as the part's first cells ran, before small tables were replicated
    ]
    cells: dict[str, Cell] = {}
    dims = (16,) if smoke else SYNTHETIC_DIMS
    for d in sorted(dims, reverse=True):  # d=16 first: it sets the budgets
        cells[f"synthetic/fixed/d{d}/seed0"] = lambda d=d: train_cell(
            AUTOINT, [*data, f"embedding.dim={d}"], work, f"synthetic-fixed-d{d}", smoke
        )

    def budget_cell(variant: str, fraction: float) -> dict[str, Any]:
        d16 = doc["cells"]["synthetic/fixed/d16/seed0"]["embedding_params"]
        budget = int(fraction * d16)
        doc["budgets"].setdefault("synthetic", {})[f"b{fraction:g}"] = budget
        config = ROOT / "configs" / f"autoint_{variant}_ml100k.yaml"
        overrides = [*data, f"embedding.param_budget={budget}"]
        if variant == "unified":
            # synthetic-ctr's 10- to 52-id fields stay exact, as gender does on ml100k
            overrides.append("embedding.unified.collisionless_max_rows=64")
        return train_cell(config, overrides, work, f"synthetic-{variant}-b{fraction:g}", smoke)

    for variant in ("unified",) if smoke else ("unified", "hashed"):
        for fraction in SYNTHETIC_BUDGET_FRACTIONS[:1] if smoke else SYNTHETIC_BUDGET_FRACTIONS:
            name = f"synthetic/{variant}/b{fraction:g}/seed0"
            cells[name] = lambda v=variant, f=fraction: budget_cell(v, f)
    return cells


# --- summary ----------------------------------------------------------------------------------
def _mean(
    cells: dict[str, Any], prefix: str, key: str = "test_auc", seeds: tuple[int, ...] = SEEDS
) -> float | None:
    """Mean of `key` over the cells `<prefix>.../seed<N>` of the given seeds."""
    values = [
        c[key]
        for name, c in cells.items()
        if name.startswith(prefix) and key in c and name.endswith(tuple(f"/seed{s}" for s in seeds))
    ]
    return float(np.mean(values)) if values else None


def pareto_points(
    cells: dict[str, Any], prefix: str, labels: list[str], seeds: tuple[int, ...] = SEEDS
) -> list[list[float]]:
    """[embedding params, mean test AUC over `seeds`] per label, sorted by parameters."""
    points = []
    for label in labels:
        auc = _mean(cells, f"{prefix}/{label}/", seeds=seeds)
        params = _mean(cells, f"{prefix}/{label}/", "embedding_params", seeds)
        if auc is not None and params is not None:
            points.append([params, auc])
    return sorted(points)


def interpolate(curve: list[list[float]], params: float) -> float | None:
    """AUC of a [params, AUC] curve at `params`, linear in log(params) between neighbours."""
    if len(curve) < 2 or not curve[0][0] <= params <= curve[-1][0]:
        return None
    xs = np.log([p for p, _ in curve])
    return float(np.interp(np.log(params), xs, [a for _, a in curve]))


def seed_fixed_curve(
    cells: dict[str, Any], seed: int, prefix: str = "", dims: tuple[int, ...] = FIXED_DIMS
) -> list[list[float]]:
    """One seed's fixed-d curve, [embedding params, test AUC] sorted by parameters."""
    names = [f"{prefix}fixed/d{d}/seed{seed}" for d in dims]
    return sorted([cells[n]["embedding_params"], cells[n]["test_auc"]] for n in names if n in cells)


def paired(diffs: list[float]) -> dict[str, Any]:
    """Per-seed differences, their mean and its standard error (seeds share data order and
    init across variants, so the paired difference is less noisy than the two means)."""
    se = float(np.std(diffs, ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else None
    return {"per_seed": diffs, "mean": float(np.mean(diffs)), "se": se}


def dnis_point(
    cells: dict[str, Any],
    by_seed: dict[int, dict[str, Any]],
    target: float,
    curve: list[list[float]],
    d16: dict[str, Any],
    prefix: str = "",
    dims: tuple[int, ...] = FIXED_DIMS,
) -> dict[str, Any]:
    """One DNIS variant's seeds (`by_seed`) against the fixed-d `curve` (cells `<prefix>fixed/`
    of widths `dims`) and d=16 (`d16`: its `d16_test_auc` and `d16_embedding_params`)."""
    runs = list(by_seed.values())
    auc = float(np.mean([c["test_auc"] for c in runs]))
    params = float(np.mean([c["embedding_params"] for c in runs]))
    curve_auc = interpolate(curve, params)
    point: dict[str, Any] = {
        "target_ratio": target,
        "seeds": len(runs),
        "test_auc": auc,
        "embedding_params": params,
        "fixed_curve_auc_at_same_params": curve_auc,
        "above_fixed_curve": curve_auc is not None and auc > curve_auc,
        "kept_widths": sorted({w for c in runs for w in c["kept_widths"]}),
    }
    # each seed against the same seed's fixed-d curve at its parameter count, and its d=16
    seed_diffs, d16_diffs = [], []
    for seed, c in by_seed.items():
        seed_curve = seed_fixed_curve(cells, seed, prefix, dims)
        if (at := interpolate(seed_curve, c["embedding_params"])) is not None:
            seed_diffs.append(c["test_auc"] - at)
        if (d16_cell := cells.get(f"{prefix}fixed/d16/seed{seed}")) is not None:
            d16_diffs.append(c["test_auc"] - d16_cell["test_auc"])
    if seed_diffs:
        point["minus_fixed_curve_paired"] = paired(seed_diffs)
    if d16_diffs:
        point["minus_d16_paired"] = paired(d16_diffs)
    before = [c["searched_model"] for c in runs if c.get("searched_model")]
    if len(before) == len(runs):  # cells run before it was recorded lack it
        for key in ("valid_auc", "test_auc"):
            point[f"before_retrain_{key}"] = float(np.mean([b[key] for b in before]))
    if "d16_embedding_params" in d16:
        point["params_ratio_vs_d16"] = d16["d16_embedding_params"] / params
        point["at_least_d16_auc"] = auc >= d16["d16_test_auc"]
    return point


def summarise(cells: dict[str, Any], budgets: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    fixed = pareto_points(cells, "fixed", [f"d{d}" for d in FIXED_DIMS])
    summary["fixed_d_ml100k_curve"] = fixed
    summary["per_feature_ml100k_pareto"] = fixed
    if (auc := _mean(cells, "fixed/d16/")) is not None:
        summary["d16_test_auc"] = auc
        summary["d16_embedding_params"] = _mean(cells, "fixed/d16/", "embedding_params")
    labels = list(budgets.get("ml100k", {}))
    for variant in ("unified", "hashed"):
        summary[f"{variant}_ml100k_pareto"] = pareto_points(cells, f"ml100k/{variant}", labels)
    points = []
    for start, target, score, dim in DNIS_POINTS:
        by_seed = {
            seed: cells[n]
            for seed in SEEDS
            if (n := dnis_name(target, seed, start, score, dim)) in cells
        }
        if by_seed:
            point = {"retrain_from": start, "prune_score": score, "searched_dim": dim}
            point.update(dnis_point(cells, by_seed, target, fixed, summary))
            points.append(point)
    if points:
        summary["dnis_points"] = points
        # the headline: the first point (in DNIS_POINTS order) above the curve and at least
        # d=16's AUC, else the first point, `recsys search-dims`'s default; every point is
        # listed
        meets = [p for p in points if p["above_fixed_curve"] and p.get("at_least_d16_auc")]
        head = meets[0] if meets else points[0]
        summary["dnis_headline_retrain_from"] = head["retrain_from"]
        summary["dnis_headline_prune_score"] = head["prune_score"]
        summary["dnis_headline_searched_dim"] = head["searched_dim"]
        summary["dnis_headline_target_ratio"] = head["target_ratio"]
        summary["dnis_test_auc"] = head["test_auc"]
        summary["dnis_embedding_params"] = head["embedding_params"]
        summary["dnis_fixed_curve_auc_at_same_params"] = head["fixed_curve_auc_at_same_params"]
        summary["dnis_kept_widths"] = head["kept_widths"]
        if "params_ratio_vs_d16" in head:
            summary["dnis_params_ratio_vs_d16"] = head["params_ratio_vs_d16"]
    lowrank = []
    for target in LOWRANK_RATIOS:
        runs = [cells[n] for seed in SEEDS if (n := lowrank_name(target, seed)) in cells]
        if not runs:
            continue
        point: dict[str, Any] = {"target_ratio": target, "seeds": len(runs)}
        for key in ("uncompressed", "lowrank", "weight_svd", "small_scratch"):
            point[f"{key}_test_auc"] = float(np.mean([c[f"{key}_test_auc"] for c in runs]))
        point["size_ratio"] = float(np.mean([c["size_ratio"] for c in runs]))
        point["bytes_ratio"] = float(np.mean([c["bytes_ratio"] for c in runs]))
        point["within_0.002_of_uncompressed"] = (
            point["lowrank_test_auc"] >= point["uncompressed_test_auc"] - 0.002
        )
        point["above_weight_svd"] = point["lowrank_test_auc"] > point["weight_svd_test_auc"]
        for key in ("uncompressed", "weight_svd"):
            diffs = [c["lowrank_test_auc"] - c[f"{key}_test_auc"] for c in runs]
            point[f"minus_{key}_paired"] = paired(diffs)
        lowrank.append(point)
    if lowrank:
        summary["lowrank_points"] = lowrank
        # the headline: the first ratio (in LOWRANK_RATIOS order) within 0.002 of the
        # uncompressed model and above weight SVD, else the first; every ratio is listed
        meets = [p for p in lowrank if p["within_0.002_of_uncompressed"] and p["above_weight_svd"]]
        head = meets[0] if meets else lowrank[0]
        summary["lowrank_headline_target_ratio"] = head["target_ratio"]
        for key in ("uncompressed", "lowrank", "weight_svd", "small_scratch"):
            summary[f"{key}_test_auc"] = head[f"{key}_test_auc"]
        summary["lowrank_size_ratio"] = head["size_ratio"]
        summary["lowrank_bytes_ratio"] = head["bytes_ratio"]
    synth_labels = list(budgets.get("synthetic", {}))
    summary["per_feature_synthetic_pareto"] = pareto_points(
        cells, "synthetic/fixed", [f"d{d}" for d in SYNTHETIC_DIMS]
    )
    for variant in ("unified", "hashed"):
        summary[f"{variant}_synthetic_pareto"] = pareto_points(
            cells, f"synthetic/{variant}", synth_labels
        )
    if epochs := epoch_budget_summary(cells):
        summary[f"epoch_budget_{EPOCH_BUDGET}"] = epochs
    if control := finetune_summary(cells):
        summary["finetune_control"] = control
    if five := five_seed_summary(cells):
        summary["five_seeds"] = five
    return summary


def side_curve_summary(
    cells: dict[str, Any],
    prefix: str,
    dims: tuple[int, ...],
    runs: dict[int, dict[str, Any]],
    start: str,
    head: dict[str, Any],
    seeds: tuple[int, ...] = SEEDS,
) -> dict[str, Any]:
    """A check beside the headline: the curve of the cells `<prefix>fixed/d<d>/...` over
    `seeds`, its d=16, and the DNIS seeds `runs` (retrained from `start`, at 1/2 of d=16)
    against them; `head`'s items come first. Empty when no cell has the prefix."""
    if not any(name.startswith(prefix) for name in cells):
        return {}
    curve = pareto_points(cells, f"{prefix}fixed", [f"d{d}" for d in dims], seeds)
    out: dict[str, Any] = {**head, "fixed_d_ml100k_curve": curve}
    if (d16 := _mean(cells, f"{prefix}fixed/d16/", seeds=seeds)) is not None:
        out["d16_test_auc"] = d16
        out["d16_embedding_params"] = _mean(cells, f"{prefix}fixed/d16/", "embedding_params", seeds)
    if runs:
        point = {"retrain_from": start, "prune_score": "alpha", "searched_dim": 16}
        point.update(dnis_point(cells, runs, 0.5, curve, out, prefix, dims))
        out["dnis"] = point
    return out


def epoch_budget_summary(cells: dict[str, Any]) -> dict[str, Any]:
    """The e20 curve, d=16 and the DNIS point against them, as the 10-epoch figures are, and
    the epoch each e20 curve cell picked."""
    prefix = EPOCH_PREFIX
    head: dict[str, Any] = {"max_epochs": EPOCH_BUDGET}
    best_epochs = {
        name: c["result"]["best_epoch"]
        for name, c in cells.items()
        if name.startswith(f"{prefix}fixed/") and "best_epoch" in c.get("result", {})
    }
    if best_epochs:
        head["fixed_cells_best_epoch"] = best_epochs
    runs = {s: cells[n] for s in SEEDS if (n := f"{prefix}{dnis_name(0.5, s)}") in cells}
    return side_curve_summary(cells, prefix, EPOCH_DIMS, runs, "scratch", head)


def finetune_summary(cells: dict[str, Any], seeds: tuple[int, ...] = SEEDS) -> dict[str, Any]:
    """DNIS's `finetune` point against the fixed models given the same second, low-rate
    stage (cells finetune/fixed/...): does it beat them, or only the once-trained ones?"""
    runs = {s: cells[n] for s in seeds if (n := dnis_name(0.5, s, "finetune")) in cells}
    head = {"overrides": list(FINETUNE)}
    return side_curve_summary(cells, FINETUNE_PREFIX, FINETUNE_DIMS, runs, "finetune", head, seeds)


def five_seed_summary(cells: dict[str, Any]) -> dict[str, Any]:
    """The fixed-d curve, d=16, the FIVE_SEED_STARTS DNIS points and the fine-tune control
    over FIVE_SEEDS, as the headline's three seeds are; empty until an extra seed's cell has
    run (the control: once an extra seed's fine-tuned fixed cell has)."""
    extra = tuple(f"/seed{s}" for s in EXTRA_SEEDS)
    if not any(name.endswith(extra) for name in cells):
        return {}
    head: dict[str, Any] = {
        "seeds": list(FIVE_SEEDS),
        "fixed_cells": {
            f"d{d}": sum(f"fixed/d{d}/seed{s}" in cells for s in FIVE_SEEDS) for d in FIXED_DIMS
        },
    }
    out = side_curve_summary(cells, "", FIXED_DIMS, {}, "", head, FIVE_SEEDS)
    points = []
    for start in FIVE_SEED_STARTS:
        runs = {s: cells[n] for s in FIVE_SEEDS if (n := dnis_name(0.5, s, start)) in cells}
        if runs:
            point = {"retrain_from": start, "prune_score": "alpha", "searched_dim": 16}
            point.update(dnis_point(cells, runs, 0.5, out["fixed_d_ml100k_curve"], out))
            points.append(point)
    out["dnis_points"] = points
    if any(n.startswith(FINETUNE_PREFIX) and n.endswith(extra) for n in cells):
        out["finetune_control"] = finetune_summary(cells, FIVE_SEEDS)
    return out


def reusable_training(doc: dict[str, Any], seed: int) -> dict[str, Any] | None:
    """The AutoInt+ training of this seed's saved low-rank cell (any ratio), if its artifact is
    still on disk: every ratio compresses the same trained model."""
    for ratio in LOWRANK_RATIOS:
        cell = doc["cells"].get(lowrank_name(ratio, seed))
        if cell is not None and Path(cell["trained"]["result"]["artifact"]).is_dir():
            return dict(cell["trained"])
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--smoke", action="store_true", help="1 seed, 1 epoch, tiny sets")
    parser.add_argument("--fresh", action="store_true", help="ignore saved cells")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument(
        "--rerun",
        nargs="+",
        default=[],
        metavar="PREFIX",
        help="run again the saved cells whose names start with PREFIX (e.g. dnis/searched/r0.5/)",
    )
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args(argv)

    data_root = args.data_dir or default_data_dir()
    ml100k = data_root / "ml100k-ctr"
    prepare_movielens("ml100k-ctr", ml100k, data_dir=data_root, show_progress=True)
    work = args.work_dir or args.output.parent / f".{args.output.stem}_work"
    doc = saved_doc(args.output, args.fresh, args.smoke)  # a smoke run always starts over
    seeds = SEEDS[:1] if args.smoke else SEEDS
    d16 = collisionless_params(ml100k, 16)
    budgets = doc.setdefault("budgets", {})  # the synthetic budgets are added as they run
    budgets["ml100k_collisionless_d16"] = d16
    budgets["ml100k"] = {
        f"b{fraction:g}": int(fraction * d16)
        for fraction in (ML100K_BUDGET_FRACTIONS[:1] if args.smoke else ML100K_BUDGET_FRACTIONS)
    }

    def save() -> None:
        doc.update(
            {
                "benchmark": "embedding_tradeoffs",
                "smoke": args.smoke,
                "git_sha": git_sha(),
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "machine": machine(),
                "summary": summarise(doc["cells"], doc["budgets"]),
            }
        )
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_suffix(".partial.json")
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(args.output)

    plan: dict[str, Cell] = {}
    if "fixed" in args.parts:
        plan.update(fixed_cells(ml100k, work, args.smoke))
    if "dnis" in args.parts:
        for start, target, score, dim in DNIS_POINTS[:1] if args.smoke else DNIS_POINTS:
            for seed in seeds:
                plan[dnis_name(target, seed, start, score, dim)] = (
                    lambda seed=seed, target=target, start=start, score=score, dim=dim: dnis_cell(
                        ml100k, work, seed, args.smoke, target, start, score, dim
                    )
                )
    if "lowrank" in args.parts:
        for ratio in LOWRANK_RATIOS[:1] if args.smoke else LOWRANK_RATIOS:
            for seed in seeds:
                plan[lowrank_name(ratio, seed)] = lambda seed=seed, ratio=ratio: lowrank_cell(
                    ml100k, work, seed, args.smoke, ratio, reusable_training(doc, seed)
                )
    if "unified" in args.parts:
        plan.update(
            budget_cells(
                "ml100k", [f"data.path={ml100k}"], doc["budgets"]["ml100k"], seeds, work, args.smoke
            )
        )
    if "synthetic" in args.parts:
        plan.update(synthetic_cells(doc, work, args.smoke))
    if "epochs" in args.parts and not args.smoke:  # smoke: the fixed and dnis parts' code
        epochs = (f"train.max_epochs={EPOCH_BUDGET}",)
        rest = tuple(d for d in EPOCH_DIMS if d not in EPOCH_FIRST_DIMS)
        plan.update(fixed_cells(ml100k, work, False, EPOCH_FIRST_DIMS, epochs, EPOCH_PREFIX))
        for seed in seeds:
            plan[f"{EPOCH_PREFIX}{dnis_name(0.5, seed)}"] = lambda seed=seed: dnis_cell(
                ml100k, work, seed, False, extra=epochs
            )
        plan.update(fixed_cells(ml100k, work, False, rest, epochs, EPOCH_PREFIX))
    if "finetune" in args.parts:  # after "fixed": it starts from those cells' models
        plan.update(finetune_cells(ml100k, work, args.smoke, doc))
    if "seeds" in args.parts and not args.smoke:  # smoke: the fixed and dnis parts' code
        # d=8 and d=16 first (the DNIS points meet those two), then DNIS, then the rest
        first = (8, 16)
        rest = tuple(d for d in FIXED_DIMS if d not in first)
        plan.update(fixed_cells(ml100k, work, False, first, seeds=EXTRA_SEEDS))
        plan.update(finetune_cells(ml100k, work, False, doc, EXTRA_SEEDS))  # the control
        for start in FIVE_SEED_STARTS:
            for seed in EXTRA_SEEDS:
                plan[dnis_name(0.5, seed, start)] = lambda seed=seed, start=start: dnis_cell(
                    ml100k, work, seed, False, start=start
                )
        plan.update(fixed_cells(ml100k, work, False, rest, seeds=EXTRA_SEEDS))
    for name, run in plan.items():
        rerun = bool(args.rerun) and name.startswith(tuple(args.rerun))
        if name in doc["cells"] and not rerun:
            print(f"{name}: saved, test auc {doc['cells'][name]['test_auc']:.4f}")
            continue
        # The commit each cell ran at: a rerun cell and an older one can differ in code (the
        # train order is seeded from e53a1e7 on).
        doc["cells"][name] = {**run(), "git_sha": git_sha()}
        save()
        cell = doc["cells"][name]
        print(
            f"{name}: test auc {cell['test_auc']:.4f}, embedding params "
            f"{cell['embedding_params']:,} ({cell['wall_s']:.0f}s)",
            flush=True,
        )
    save()
    summary = doc["summary"]
    print(json.dumps(summary, indent=2))
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if missing and set(args.parts) == set(PARTS):
        print(f"embedding_tradeoffs: summary lacks {missing}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
