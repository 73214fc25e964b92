"""Training-side subcommands of `recsys`: data, train, predict, evaluate.

Each function takes the arguments after the subcommand name and returns an exit code; errors
from the library (ConfigError, SchemaError, DataError, ArtifactError) become one line on stderr
and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from recsys.errors import USER_ERRORS, ConfigError, DataError, Interrupted
from recsys.logs import configure_logging

if TYPE_CHECKING:  # the config module imports torch-side code; the CLI loads it lazily
    from training.config import ExperimentConfig


def _run(fn: Callable[[], int]) -> int:
    configure_logging("%(asctime)s %(levelname)s %(message)s")
    try:
        return fn()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130  # the shell's code for a job stopped by SIGINT
    except KeyboardInterrupt:
        print("interrupted: stopped by the user (Ctrl-C)", file=sys.stderr)
        return 130
    finally:
        try:
            stop_ray()
        except KeyboardInterrupt:  # pressed just before stop_ray's own handler was in place
            stop_ray()


def stop_ray() -> None:
    """Stops the Ray this command started or joined, before the interpreter's exit would.

    Ray stops itself in an atexit hook, which takes a few seconds (it waits for its
    processes); a Ctrl-C in those seconds interrupted the hook with a traceback and could leave
    it half done. Here the command's work is over, so Ctrl-C no longer raises: the first press
    says what is going on, a second one exits at once. The handler stays in place, since the
    process exits next.
    """
    ray = sys.modules.get("ray")  # commands that never imported Ray have nothing to stop
    if ray is None or not ray.is_initialized():
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_ctrl_c_while_stopping)
    ray.shutdown()


def _on_ctrl_c_while_stopping(signum: int, frame: FrameType | None) -> None:
    _CTRL_C_WHILE_STOPPING.append(signum)
    if len(_CTRL_C_WHILE_STOPPING) == 1:
        print(
            "stopping Ray's processes (a few seconds); Ctrl-C again to exit without waiting",
            file=sys.stderr,
            flush=True,
        )
        return
    print("interrupted: exited before Ray's processes had stopped", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


_CTRL_C_WHILE_STOPPING: list[int] = []


def data(argv: list[str]) -> int:
    """`recsys data prepare ml100k-ctr|ml100k-esmm|ml100k-domains|synthetic-ctr [--data-dir D]`"""
    parser = argparse.ArgumentParser(prog="recsys data", description="Prepare a dataset.")
    sub = parser.add_subparsers(dest="action", required=True)
    prep = sub.add_parser("prepare", help="download/generate a dataset and write its splits")
    prep.add_argument(
        "dataset", choices=["ml100k-ctr", "ml100k-esmm", "ml100k-domains", "synthetic-ctr"]
    )
    prep.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="cache folder (default $RECSYS_DATA or ~/.cache/recsys)",
    )
    prep.add_argument(
        "--out", type=Path, default=None, help="output folder (default DATA_DIR/<dataset>)"
    )
    prep.add_argument(
        "--source",
        type=Path,
        default=None,
        help="ml100k-*: a local GroupLens ml-100k folder instead of the download",
    )
    prep.add_argument("--rows", type=int, default=1_000_000, help="synthetic-ctr: rows")
    prep.add_argument("--seed", type=int, default=0, help="synthetic-ctr: seed")
    args = parser.parse_args(argv)

    def go() -> int:
        from recsys.data.movielens import MOVIELENS_TASKS, default_data_dir, prepare_movielens

        data_dir = args.data_dir or default_data_dir()
        out = args.out or data_dir / args.dataset
        if args.dataset in MOVIELENS_TASKS:
            counts = prepare_movielens(
                args.dataset, out, data_dir=data_dir, source=args.source, show_progress=True
            )
        else:
            from recsys.data.synthetic import generate_synthetic_ctr

            if args.rows < 1:
                raise ConfigError(f"data prepare: --rows must be at least 1 (got {args.rows})")
            if not 0 <= args.seed < 2**64:
                raise ConfigError(f"data prepare: --seed must be in [0, 2**64) (got {args.seed})")
            try:
                info = generate_synthetic_ctr(
                    out, num_rows=args.rows, seed=args.seed, show_progress=True
                )
            except FileExistsError as e:  # its message names the folder and the fix
                raise DataError(str(e).replace("out_dir", "--out")) from e
            counts = dict(info.split_rows)
        print(f"{args.dataset} ready in {out}: {counts}")
        return 0

    return _run(go)


def experiment_parser(
    prog: str, description: str, workers_help: str, set_example: str
) -> argparse.ArgumentParser:
    """The options of every command that runs an ExperimentConfig (`train`, `search-dims`)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, required=True, help="YAML ExperimentConfig")
    parser.add_argument("--num-workers", type=int, default=None, help=workers_help)
    parser.add_argument(
        "--address",
        default=None,
        help="join an existing Ray cluster (host:port, ray://..., or auto under `ray job submit`)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. {set_example}",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The config file with `--set`, `--num-workers` and `--address` applied, validated before
    Ray and torch are imported, so a typo is reported at once."""
    from training.config import load_config

    overrides = list(args.overrides)
    if args.num_workers is not None:
        overrides.append(f"ray.num_workers={args.num_workers}")
    if args.address is not None:
        overrides.append(f"ray.address={args.address}")
    return load_config(args.config, overrides)


def train(argv: list[str]) -> int:
    """`recsys train --config FILE [--num-workers N] [--address A] [--set key=value ...]`

    Running it again with the same `--set output.run_name=X` and config resumes run X from its
    latest checkpoint.
    """
    parser = experiment_parser(
        "recsys train",
        "Train a model on Ray and export an artifact.",
        "Ray Train workers",
        "train.seed=1",
    )
    args = parser.parse_args(argv)

    def go() -> int:
        cfg = config_from_args(args)
        from training.jobs import train as train_job

        result = train_job(cfg)
        _print_result(result)
        return 0

    return _run(go)


def _print_result(result: dict[str, Any]) -> None:
    print(
        f"best epoch {result.get('best_epoch')}: "
        f"valid auc={result.get('valid_auc', float('nan')):.4f} "
        f"logloss={result.get('valid_logloss', float('nan')):.4f} | "
        f"test auc={result.get('test_auc', float('nan')):.4f} "
        f"logloss={result.get('test_logloss', float('nan')):.4f}"
    )
    # the per-task and per-domain figures beyond the first task's (ESMM, multi-domain)
    test = result.get("test", {})
    extra = [
        f"{k}={test[k]:.4f}"
        for k in ("ctr_auc", "cvr_auc", "ctcvr_auc", "domain_weighted_auc")
        if k in test and not (k == "ctr_auc" and "cvr_auc" not in test)
    ]
    if extra:
        note = "cvr on clicked rows; " if "cvr_auc" in test else ""
        print(f"test {' '.join(extra)} ({note}select on {result.get('select_metric')})")
    print(
        f"artifact: {result.get('artifact')} (parity max |diff| "
        f"{result.get('parity_max_abs_diff', float('nan')):.1e} on "
        f"{result.get('parity_rows')} valid rows)"
    )
    print(
        f"throughput: {result.get('train_rows_per_s', float('nan')):.0f} train rows/s; "
        f"peak memory {result.get('peak_rss_mb', float('nan')):.0f} MB "
        f"(driver + workers)"
    )


def predict(argv: list[str]) -> int:
    """`recsys predict --artifact DIR --input PARQUET --output PARQUET`"""
    parser = argparse.ArgumentParser(
        prog="recsys predict", description="Score Parquet rows with an artifact (Ray Data)."
    )
    parser.add_argument(
        "--artifact",
        type=Path,
        required=True,
        help="MODEL_REPO/<name>[/<version>] (newest version by default)",
    )
    parser.add_argument("--input", type=Path, nargs="+", required=True, help="Parquet file(s)")
    parser.add_argument("--output", type=Path, required=True, help="predictions Parquet file")
    parser.add_argument("--address", default=None, help="join an existing Ray cluster")
    args = parser.parse_args(argv)

    def go() -> int:
        from training.jobs import predict as predict_job

        rows = predict_job(args.artifact, args.input, args.output, address=args.address)
        print(f"wrote {rows} predictions to {args.output}")
        return 0

    return _run(go)


def evaluate(argv: list[str]) -> int:
    """`recsys evaluate --artifact DIR (--split test | --input PARQUET) --output DIR2`"""
    parser = argparse.ArgumentParser(
        prog="recsys evaluate",
        description="Recompute metrics from fresh predictions into OUTPUT/metrics.json.",
    )
    parser.add_argument(
        "--artifact",
        type=Path,
        required=True,
        help="MODEL_REPO/<name>[/<version>] (newest version by default)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--split", choices=["train", "valid", "test"])
    source.add_argument("--input", type=Path, nargs="+", help="labelled Parquet file(s)")
    parser.add_argument(
        "--data-path",
        type=Path,
        default=None,
        help="dataset folder for --split (default: where the model was trained)",
    )
    parser.add_argument("--output", type=Path, required=True, help="output folder")
    parser.add_argument("--address", default=None, help="join an existing Ray cluster")
    args = parser.parse_args(argv)

    def go() -> int:
        from recsys.features.schema import coverage_line
        from training.jobs import evaluate as evaluate_job

        report = evaluate_job(
            args.artifact,
            args.output,
            split=args.split,
            inputs=args.input,
            data_path=args.data_path,
            address=args.address,
        )
        for task, m in report["tasks"].items():
            line = " ".join(
                f"{k}={v:.4f}" for k, v in m.items() if isinstance(v, float) and k != "num_rows"
            )
            print(f"{task}: {line} rows={int(m['num_rows'])}")
            for column, slices in m.get("cold_start", {}).items():
                unseen = slices.get("unseen")
                if unseen is not None:
                    auc = "n/a (one class)" if unseen["auc"] is None else f"{unseen['auc']:.4f}"
                    rows = unseen["rows"]
                    print(f"  rows whose {column} is unseen in training: {rows}, auc={auc}")
        unseen = coverage_line(report["vocabulary"])
        print(f"out of vocabulary (scored as the OOV id): {unseen}")
        print(f"metrics written to {args.output / 'metrics.json'}")
        print(json.dumps({t: m["auc"] for t, m in report["tasks"].items()}))
        return 0

    return _run(go)
