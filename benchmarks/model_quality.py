"""Model quality on ml100k-ctr: every benchmarked model over 3 seeds, plus the logistic
regression floor, trained by the project's own trainer (2 Ray workers, sharded tables).

Prints a table and writes benchmarks/results/model_quality.json: per-cell results (config,
metrics, the run's log), the peer figures of BENCHMARKS.md beside ours, git sha, machine, date,
and a `summary`. Each cell is saved as soon as it finishes and skipped when the script is run
again, so a long sweep survives an interruption (`--fresh` starts over).

    python benchmarks/model_quality.py                  # full run (about 10 min per model)
    python benchmarks/model_quality.py --smoke --output /tmp/mq.json   # seconds-long check
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from _common import git_sha, machine  # benchmarks/ is the script folder on sys.path
from scipy import sparse
from sklearn.linear_model import LogisticRegression

from recsys.data.movielens import default_data_dir, prepare_ml100k_ctr
from recsys.features.schema import FeatureSchema, fit_feature_schema
from recsys.metrics import auc, logloss
from training.config import load_config
from training.jobs import train

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "model_quality.json"
SEEDS = (0, 1, 2)
# name -> (config file, overrides); later models add a line here.
MODELS: dict[str, tuple[str, list[str]]] = {
    "autoint": ("configs/autoint_ml100k.yaml", []),
}
# BENCHMARKS.md, this machine, one seed each.
PEERS = {
    "sklearn_lr": 0.7722,
    "deepctr_torch_deepfm": 0.7711,
    "deepctr_torch_autoint": 0.7776,
    "fuxictr_autoint": 0.7783,
    "fuxictr_deepfm": 0.7855,
}
SUMMARY_KEYS = ("autoint_test_auc", "autoint_test_auc_seeds", "lr_test_auc")


def one_hot(schema: FeatureSchema, table: Any) -> sparse.csr_matrix:
    """One column per (feature, id); a bag's values are weighted 1/|bag| (METHODS.md §0)."""
    encoded = schema.encode(table)
    blocks = []
    for feature in schema.sparse:
        column = encoded[feature.name]
        if feature.is_bag:
            lengths = column.combine_chunks().value_lengths().to_numpy()
            ids = column.combine_chunks().flatten().to_numpy()
            rows = np.repeat(np.arange(len(lengths)), lengths)
            weights = np.repeat(1.0 / lengths, lengths)
        else:
            ids = column.to_numpy()
            rows = np.arange(len(ids))
            weights = np.ones(len(ids))
        blocks.append(
            sparse.csr_matrix(
                (weights, (rows, ids)), shape=(table.num_rows, feature.num_embeddings)
            )
        )
    return sparse.hstack(blocks).tocsr()


def logistic_regression(data_dir: Path, c_values: tuple[float, ...]) -> dict[str, Any]:
    """scikit-learn LR on one-hot features, C chosen on valid AUC, test reported once."""
    splits = {s: pq.read_table(data_dir / f"{s}.parquet") for s in ("train", "valid", "test")}
    from recsys.data.schema import DatasetSchema

    schema = fit_feature_schema(
        DatasetSchema.from_yaml(data_dir / "schema.yaml"), [splits["train"]]
    )
    x = {s: one_hot(schema, t) for s, t in splits.items()}
    y = {s: t["click"].to_numpy() for s, t in splits.items()}
    best: dict[str, Any] | None = None
    for c in c_values:
        model = LogisticRegression(C=c, max_iter=2000).fit(x["train"], y["train"])
        valid_auc = auc(y["valid"], model.predict_proba(x["valid"])[:, 1])
        if best is None or valid_auc > best["valid_auc"]:
            test_p = model.predict_proba(x["test"])[:, 1]
            best = {
                "C": c,
                "valid_auc": valid_auc,
                "test_auc": auc(y["test"], test_p),
                "test_logloss": logloss(y["test"], test_p),
            }
    assert best is not None
    return best


def run_cell(name: str, seed: int, data_dir: Path, work: Path, smoke: bool) -> dict[str, Any]:
    config_file, overrides = MODELS[name]
    overrides = [
        *overrides,
        f"train.seed={seed}",
        f"data.path={data_dir}",
        f"output.run_root={work / 'runs'}",
        f"output.model_repo={work / 'repo'}",
        f"output.run_name={name}-seed{seed}-{int(time.time())}",
    ]
    if smoke:
        overrides += ["train.max_epochs=1", "ray.num_workers=1", "model.num_layers=1"]
    cfg = load_config(ROOT / config_file, overrides)
    started = time.perf_counter()
    result = train(cfg)
    run_dir = Path(cfg.output.run_root) / str(cfg.output.run_name)
    log_file = run_dir / "train.log"
    return {
        "model": name,
        "seed": seed,
        "config": cfg.model_dump(mode="json"),
        "result": result,
        "wall_s": time.perf_counter() - started,
        "log": log_file.read_text().splitlines() if log_file.exists() else [],
    }


def summarise(cells: dict[str, Any], lr: dict[str, Any] | None) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name in MODELS:
        runs = [c for c in cells.values() if c["model"] == name]
        if runs:
            aucs = [c["result"]["test_auc"] for c in sorted(runs, key=lambda c: c["seed"])]
            summary[f"{name}_test_auc"] = float(np.mean(aucs))
            summary[f"{name}_test_auc_seeds"] = aucs
            summary[f"{name}_test_auc_std"] = float(np.std(aucs))
            summary[f"{name}_test_logloss"] = float(
                np.mean([c["result"]["test_logloss"] for c in runs])
            )
    if lr is not None:
        summary["lr_test_auc"] = lr["test_auc"]
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="1 seed, 1 epoch, 1 worker, 1 layer: checks the plumbing and keys",
    )
    parser.add_argument("--fresh", action="store_true", help="ignore saved cells")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="runs and artifacts (default: next to the output file)",
    )
    args = parser.parse_args(argv)

    data_root = args.data_dir or default_data_dir()
    data_dir = data_root / "ml100k-ctr"
    prepare_ml100k_ctr(data_dir, data_dir=data_root, show_progress=True)
    work = args.work_dir or args.output.parent / f".{args.output.stem}_work"
    doc: dict[str, Any] = {"cells": {}}
    if args.output.exists() and not args.fresh:
        doc = json.loads(args.output.read_text())
    seeds = SEEDS[:1] if args.smoke else SEEDS

    def save() -> None:
        doc.update(
            {
                "benchmark": "model_quality",
                "task": "ml100k-ctr",
                "smoke": args.smoke,
                "git_sha": git_sha(),
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "machine": machine(),
                "peers_test_auc": PEERS,
                "summary": summarise(doc["cells"], doc.get("lr")),
            }
        )
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_suffix(".partial.json")
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(args.output)

    if "lr" not in doc:
        doc["lr"] = logistic_regression(data_dir, (1.0,) if args.smoke else (0.3, 1.0))
        save()
    print(f"logistic regression: test auc {doc['lr']['test_auc']:.4f} (C={doc['lr']['C']})")
    for name in MODELS:
        for seed in seeds:
            key = f"{name}/seed{seed}"
            if key in doc["cells"]:
                print(f"{key}: saved, test auc {doc['cells'][key]['result']['test_auc']:.4f}")
                continue
            doc["cells"][key] = run_cell(name, seed, data_dir, work, args.smoke)
            save()
            r = doc["cells"][key]["result"]
            print(
                f"{key}: test auc {r['test_auc']:.4f} logloss {r['test_logloss']:.4f} "
                f"(best epoch {r['best_epoch']}, {doc['cells'][key]['wall_s']:.0f}s)"
            )
    save()
    summary = doc["summary"]
    print(json.dumps(summary, indent=2))
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if missing:
        print(f"model_quality: summary lacks {missing}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
