"""`recsys compress`: low-rank compression of a trained artifact into a new artifact version.

artifact + its training data -> activation statistics -> ranks (a size ratio or retained
energy) -> factorised model -> fine-tuning -> MODEL_REPO/<name>/<next version>/ whose
config.json lists the factorised layers. Prints the ranks, sizes and valid/test AUC before
compression, after it and after fine-tuning. A compressed version is never compressed again
(`MODEL_REPO/<name>` picks the newest uncompressed version). Library errors become one line on
stderr and exit code 2 (the training CLI's convention, re-implemented because recsys never
imports training).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from recsys.data.splits import SPLITS, split_files
from recsys.errors import USER_ERRORS, ArtifactError, ConfigError, DataError
from recsys.logs import configure_logging


def _run(fn: Callable[[], int]) -> int:
    configure_logging("%(asctime)s %(levelname)s %(message)s")
    try:
        return fn()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)  # noqa: T201 - the CLI's one error line
        return 2


def _say(text: str) -> None:
    print(text, flush=True)  # noqa: T201 - this module is a CLI entry point that prints results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys compress",
        description="Compress a trained artifact by activation PCA (low-rank layers and "
        "tables), fine-tune it, and write it as a new version.",
    )
    parser.add_argument(
        "--artifact",
        type=Path,
        required=True,
        help="MODEL_REPO/<name>[/<version>] (default: the newest version that is not "
        "already compressed; a compressed version is refused)",
    )
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument(
        "--target-ratio",
        type=float,
        default=None,
        help="shrink the whole model at least this many times (e.g. 3)",
    )
    rule.add_argument(
        "--energy",
        type=float,
        default=None,
        help="instead: keep this share of every layer's output variance (default 0.95)",
    )
    data = parser.add_argument_group("data (raw labelled Parquet, encoded with the artifact)")
    data.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder with train/valid/test as <split>.parquet or <split>/*.parquet",
    )
    data.add_argument(
        "--dataset",
        default=None,
        help="a prepared dataset under --data-dir (default: the folder the artifact was "
        "trained on, else ml100k-ctr)",
    )
    data.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="dataset cache folder (default $RECSYS_DATA or ~/.cache/recsys)",
    )
    layers = parser.add_argument_group("layers and method")
    layers.add_argument(
        "--method",
        choices=["pca", "svd"],
        default="pca",
        help="pca: factor each layer along the principal directions of its outputs on the "
        "train rows (METHODS.md §8, default); svd: truncated SVD of the weights alone",
    )
    layers.add_argument(
        "--include",
        nargs="+",
        default=["*"],
        metavar="PATTERN",
        help="layers to compress (fnmatch on names such as dnn.0, layers.1.query, "
        "embedding.user_id); default every layer that can shrink",
    )
    layers.add_argument(
        "--exclude", nargs="+", default=[], metavar="PATTERN", help="layers to keep dense"
    )
    layers.add_argument(
        "--rank",
        action="append",
        default=[],
        metavar="NAME=K",
        help="pin a layer's rank (repeatable)",
    )
    layers.add_argument(
        "--ada-act", action="store_true", help="ReLU between the two factors (Ada_Act)"
    )
    layers.add_argument(
        "--compare-svd",
        action="store_true",
        help="also fine-tune and report the weight-SVD baseline at the same ranks",
    )
    tune = parser.add_argument_group("fine-tuning")
    tune.add_argument(
        "--epochs",
        type=int,
        default=2,
        help="fine-tuning epochs on the train split (default 2; 0 skips fine-tuning)",
    )
    tune.add_argument(
        "--dense-lr",
        type=float,
        default=1e-4,
        help="Adam learning rate of the dense layers and factors (default 1e-4)",
    )
    tune.add_argument(
        "--table-lr",
        type=float,
        default=5e-3,
        help="row-wise Adagrad learning rate of the embedding tables (default 5e-3)",
    )
    tune.add_argument("--batch-size", type=int, default=1024, help="rows per step (default 1024)")
    tune.add_argument(
        "--patience",
        type=int,
        default=1,
        help="stop after this many epochs without a better valid AUC; the best epoch's "
        "weights are kept (default 1)",
    )
    tune.add_argument("--seed", type=int, default=0, help="shuffling seed (default 0)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 is faster on a busy machine)",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--name", default=None, help="model name (default: the artifact's)")
    out.add_argument(
        "--model-repo",
        type=Path,
        default=None,
        help="model repository (default: the artifact's, MODEL_REPO of MODEL_REPO/<name>/<v>)",
    )
    return parser


def compress(argv: list[str]) -> int:
    """`recsys compress --artifact DIR [--target-ratio R | --energy E] [--data PATH] ...`"""
    args = _parser().parse_args(argv)

    def go() -> int:
        import torch

        from recsys.artifact import load_artifact

        if args.threads is not None:
            if args.threads < 1:
                raise ConfigError(f"--threads: must be >= 1 (got {args.threads})")
            torch.set_num_threads(args.threads)

        version_dir = _uncompressed_version(args.artifact)
        artifact = load_artifact(version_dir)
        options = _options(args)
        if args.model_repo is not None:  # written at the end: checked before the work
            try:
                args.model_repo.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(
                    f"--model-repo: cannot use {args.model_repo} as a folder ({e.strerror})"
                ) from e
        data_info, splits = _locate_data(args, artifact.metrics)
        _say(f"compressing {version_dir} with data from {data_info['path']}")
        return _compress(artifact, options, splits, data_info, version_dir, args)

    return _run(go)


def _uncompressed_version(path: Path) -> Path:
    """The version folder to compress. A version folder is used as given unless it is already
    compressed; a model folder gives its newest version that is not compressed (so running
    the same command twice compresses the original twice, not the first result again).

    Raises:
        ConfigError: the version (or every version of the model folder) is already compressed;
            the message names the uncompressed version it was made from when recorded.
        ArtifactError: `path` is neither a version folder nor a model folder.
    """
    from recsys.artifact import list_versions, resolve_version_dir

    newest = resolve_version_dir(path)
    if newest != Path(path):  # a model folder: skip its compressed versions
        versions = list_versions(Path(path))
        for version in reversed(versions):
            candidate = Path(path) / str(version)
            if not _is_compressed(candidate):
                if candidate != newest:
                    _say(
                        f"{newest} is already compressed; using {candidate}, the newest "
                        f"uncompressed version of {path}"
                    )
                return candidate
    if _is_compressed(newest):
        source = _recorded_source(newest)
        fix = (
            f"compress the version it was made from instead: --artifact {source}"
            if source
            else "pass --artifact MODEL_REPO/<name>/<version> of the uncompressed model it was "
            "made from"
        )
        every = "" if newest == Path(path) else f" (as is every version of {path})"
        raise ConfigError(
            f"compress: --artifact {newest} is already compressed{every}, and a compressed "
            f"model cannot be compressed again; {fix}"
        )
    return newest


def _is_compressed(version_dir: Path) -> bool:
    """Whether config.json lists factorised layers or low-rank tables (both are written by
    `recsys compress`). An unreadable config counts as not compressed: `load_artifact` then
    reports what is wrong with it."""
    try:
        config = json.loads((version_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    embedding = config.get("embedding") if isinstance(config, dict) else None
    variant = embedding.get("variant") if isinstance(embedding, dict) else None
    return isinstance(config, dict) and ("compression" in config or variant == "lowrank")


def _recorded_source(version_dir: Path) -> str | None:
    """The version a compressed artifact was made from (metrics.json `compression.source`)."""
    try:
        metrics = json.loads((version_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    report = metrics.get("compression") if isinstance(metrics, dict) else None
    source = report.get("source") if isinstance(report, dict) else None
    return source if isinstance(source, str) and source else None


def _options(args: argparse.Namespace) -> Any:
    from recsys.compression.lowrank import CompressionOptions

    pinned = {}
    for item in args.rank:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise ConfigError(f"--rank: '{item}' is not NAME=K with an integer K (e.g. dnn.3=64)")
        pinned[name.strip()] = int(value)
    raw = {
        "method": args.method,
        "target_ratio": args.target_ratio,
        "energy": args.energy if args.energy is not None or args.target_ratio else 0.95,
        "include": tuple(args.include),
        "exclude": tuple(args.exclude),
        "ranks": pinned,
        "ada_act": args.ada_act,
        "compare_svd": args.compare_svd,
        "fine_tune": {
            "epochs": args.epochs,
            "dense_lr": args.dense_lr,
            "table_lr": args.table_lr,
            "batch_size": args.batch_size,
            "patience": args.patience,
            "seed": args.seed,
        },
    }
    try:
        return CompressionOptions.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "options"
        raise ConfigError(f"compress: {where}: {first['msg']} (got {first.get('input')!r})") from e


def _locate_data(
    args: argparse.Namespace, stored: dict[str, Any]
) -> tuple[dict[str, str], dict[str, list[Path]]]:
    """The raw splits: --data; else --dataset under the data dir; else the folder the artifact
    records (metrics.json `data.path`); else ml100k-ctr under the data dir (prepared on first
    use, like training does)."""
    from recsys.data.movielens import MOVIELENS_TASKS, default_data_dir, prepare_movielens

    recorded = stored.get("data", {}) if isinstance(stored.get("data"), dict) else {}
    if args.data is not None:
        root, dataset = args.data, recorded.get("dataset", "parquet")
    elif args.dataset is None and recorded.get("path") and Path(recorded["path"]).is_dir():
        root, dataset = Path(recorded["path"]), recorded.get("dataset", "parquet")
    else:
        dataset = args.dataset or "ml100k-ctr"
        data_dir = args.data_dir or default_data_dir()
        root = data_dir / dataset
        if dataset in MOVIELENS_TASKS:
            prepare_movielens(dataset, root, data_dir=data_dir, show_progress=True)
    try:
        files = {split: split_files(Path(root), split) for split in SPLITS}
    except DataError as e:
        raise DataError(
            f"compress: {e}; or pass --data with the folder the model was trained on"
        ) from e
    return {"dataset": dataset, "path": str(Path(root).resolve())}, files


def _compress(
    artifact: Any,
    options: Any,
    splits: dict[str, list[Path]],
    data_info: dict[str, str],
    version_dir: Path,
    args: argparse.Namespace,
) -> int:
    import numpy as np
    import pyarrow.parquet as pq

    from recsys.artifact import WEIGHTS, load_artifact, score_table, write_artifact
    from recsys.compression.lowrank import compress_trained_model, rank_summary

    run = compress_trained_model(
        artifact.model,
        artifact.model_config,
        artifact.embedding_config,
        artifact.schema,
        splits,
        options,
        show_progress=True,
    )
    compressed, sizes = run.compressed, run.sizes
    final = "fine_tuned" if "fine_tuned" in run.metrics["test"] else "compressed"
    report = {
        "source": str(version_dir.resolve()),  # named again if this version is passed
        "params_before": sizes["params_before"],
        "params_after": sizes["params_after"],
        "param_ratio": sizes["params_before"] / sizes["params_after"],
        "bytes_before": sizes["bytes_before"],
        "bytes_after": sizes["bytes_after"],
        "layers": compressed.layers,
        "stages": run.metrics,
        "options": options.model_dump(mode="json"),
    }
    if "svd_params_after" in sizes:
        report["svd_params_after"] = sizes["svd_params_after"]
    if run.fine_tune is not None:
        report["fine_tune"] = {
            "best_epoch": run.fine_tune.best_epoch,
            "valid_auc": [m["auc"] for m in run.fine_tune.history],
        }
    metrics = {
        "valid": run.metrics["valid"][final],
        "test": run.metrics["test"][final],
        "data": data_info,
        "compression": report,
    }
    side = {
        entity: table
        for entity in ("user", "item")
        if (table := artifact.side_table(entity)) is not None
    }
    model_repo = args.model_repo or version_dir.parent.parent
    sample = pq.read_table(splits["valid"][0]).slice(0, 512)
    parity: dict[str, float] = {}

    def check_parity(staged: Path) -> None:
        # The artifact as written must score like the model in memory; checked before the
        # version is published, so a server watching the repo never loads one that fails.
        loaded = load_artifact(staged)
        expected = score_table(compressed.model, artifact.schema, sample)
        got = score_table(loaded.model, loaded.schema, sample)
        parity["max_diff"] = max(
            float(np.abs(got[t].numpy() - expected[t].numpy()).max()) for t in got
        )
        if parity["max_diff"] > 1e-5:
            raise ArtifactError(
                f"compress: the new artifact scores valid rows differently from the "
                f"compressed model (max |diff| {parity['max_diff']:.2e}, expected <= 1e-5); "
                f"no version was written"
            )

    target = write_artifact(
        model_repo,
        args.name or artifact.name,
        compressed.model,
        artifact.model_config,
        compressed.embedding_config,
        artifact.schema,
        metrics,
        side,
        compression=compressed.description,
        check=check_parity,
    )

    _say("\nper-layer ranks:\n" + rank_summary(compressed.layers))
    file_before = (version_dir / WEIGHTS).stat().st_size
    file_after = (target / WEIGHTS).stat().st_size
    _say(
        f"\nparameters {sizes['params_before']:.0f} -> {sizes['params_after']:.0f} "
        f"({sizes['params_before'] / sizes['params_after']:.2f}x smaller); state bytes "
        f"{sizes['bytes_before']:.0f} -> {sizes['bytes_after']:.0f}; weights file "
        f"{file_before} -> {file_after} bytes"
    )
    if "svd_params_after" in sizes:
        _say(f"weight-SVD baseline: {sizes['svd_params_after']:.0f} parameters")
    _say(f"energy threshold: {compressed.description['energy_threshold']}")
    _say(f"\n{'stage':<16} {'valid auc':>9} {'test auc':>9} {'test logloss':>12}")
    for stage in run.metrics["test"]:
        valid, test = run.metrics["valid"][stage], run.metrics["test"][stage]
        _say(f"{stage:<16} {valid['auc']:>9.4f} {test['auc']:>9.4f} {test['logloss']:>12.4f}")
    _say(
        f"\nartifact: {target} (parity max |diff| {parity['max_diff']:.1e} on "
        f"{sample.num_rows} valid rows)"
    )
    _say(json.dumps({"artifact": str(target), "test_auc": run.metrics["test"][final]["auc"]}))
    return 0
