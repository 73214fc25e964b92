"""Model quality: every registered model on its task over 3 seeds, plus the logistic
regression floor, trained by the project's own trainer (2 Ray workers, sharded tables).

Tasks: ml100k-ctr (AutoInt, ARM-Net), ml100k-domains (AdaptDHM and the shared-bottom and
per-domain-tower baselines: overall, domain-weighted and per-domain test AUC, cluster
occupancy entropy, training time), ml100k-esmm (ESMM's CTR/CVR/CTCVR AUC and the naive CVR
model trained on clicked rows only).

Prints a table and writes benchmarks/results/model_quality.json: per-cell results (config,
metrics, the run's log), the peer figures of BENCHMARKS.md beside ours, git sha, machine, date,
and a `summary`. Each cell is saved as soon as it finishes and skipped when the script is run
again, so a long sweep survives an interruption (`--fresh` starts over; `--smoke` always
starts over, and trains every model but ARM-Net, which its end-to-end test trains).

    python benchmarks/model_quality.py                  # full run (a few minutes per cell)
    python benchmarks/model_quality.py --models esmm naive_cvr   # some models only
    python benchmarks/model_quality.py --smoke --output /tmp/mq.json   # minutes-long check
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
import torch
from _common import git_sha, machine, saved_doc  # benchmarks/ is the script folder on sys.path
from scipy import sparse
from sklearn.linear_model import LogisticRegression

from recsys.artifact import load_artifact
from recsys.data.movielens import default_data_dir, prepare_movielens
from recsys.features.batch import features_from_encoded
from recsys.features.schema import FeatureSchema, fit_feature_schema
from recsys.metrics import auc, logloss
from training.config import load_config
from training.jobs import train

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "model_quality.json"
SEEDS = (0, 1, 2)
# cell name -> (config file, its task); every registered model has a line here (the naive CVR
# baseline is ESMM's clicked-only objective).
MODELS: dict[str, tuple[str, str]] = {
    "autoint": ("configs/autoint_ml100k.yaml", "ml100k-ctr"),
    "armnet": ("configs/armnet_ml100k.yaml", "ml100k-ctr"),
    "adaptdhm": ("configs/adaptdhm_ml100k.yaml", "ml100k-domains"),
    "shared_bottom": ("configs/shared_bottom_ml100k.yaml", "ml100k-domains"),
    "per_domain_towers": ("configs/per_domain_towers_ml100k.yaml", "ml100k-domains"),
    "esmm": ("configs/esmm_ml100k.yaml", "ml100k-esmm"),
    "naive_cvr": ("configs/esmm_naive_cvr_ml100k.yaml", "ml100k-esmm"),
}
# BENCHMARKS.md, this machine, one seed each; METHODS.md §0 for the ml100k-esmm LR floors.
PEERS = {
    "sklearn_lr": 0.7722,
    "deepctr_torch_deepfm": 0.7711,
    "deepctr_torch_autoint": 0.7776,
    "fuxictr_autoint": 0.7783,
    "fuxictr_deepfm": 0.7855,
    "deepctr_torch_esmm_ctr": 0.8883,
    "deepctr_torch_esmm_cvr": 0.7740,
    "deepctr_torch_esmm_ctcvr": 0.8634,
    "lr_esmm_ctr_floor": 0.846,
    "lr_esmm_cvr_floor": 0.771,
    "lr_esmm_ctcvr_floor": 0.836,
}
# summary key -> (cell name, how to read the value from a finished cell)
METRICS: dict[str, tuple[str, str]] = {
    "autoint_test_auc": ("autoint", "test.auc"),
    "armnet_test_auc": ("armnet", "test.auc"),
    "adaptdhm_test_auc": ("adaptdhm", "test.auc"),
    "shared_bottom_test_auc": ("shared_bottom", "test.auc"),
    "per_domain_towers_test_auc": ("per_domain_towers", "test.auc"),
    "adaptdhm_domain_weighted_auc": ("adaptdhm", "test.domain_weighted_auc"),
    "shared_bottom_domain_weighted_auc": ("shared_bottom", "test.domain_weighted_auc"),
    "per_domain_towers_domain_weighted_auc": ("per_domain_towers", "test.domain_weighted_auc"),
    "adaptdhm_cluster_entropy_ratio": ("adaptdhm", "clusters.entropy_ratio"),
    "esmm_ctr_auc": ("esmm", "test.ctr_auc"),
    "esmm_cvr_auc": ("esmm", "test.cvr_auc"),
    "esmm_ctcvr_auc": ("esmm", "test.ctcvr_auc"),
    "naive_cvr_auc": ("naive_cvr", "test.cvr_auc"),
    "adaptdhm_train_s": ("adaptdhm", "train_wall_s"),
    "shared_bottom_train_s": ("shared_bottom", "train_wall_s"),
    "per_domain_towers_train_s": ("per_domain_towers", "train_wall_s"),
    "armnet_test_logloss": ("armnet", "test.logloss"),
    "autoint_test_logloss": ("autoint", "test.logloss"),
}
SUMMARY_KEYS = (*METRICS, "lr_test_auc")
# Left out of the smoke run (it keeps `make test` under its time limit): ARM-Net is trained end
# to end on 2 sharded workers, exported and served by tests/training/test_train_models_e2e.py.
SMOKE_SKIPS = ("armnet",)


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


def run_cell(
    name: str, seed: int, data_dirs: dict[str, Path], work: Path, smoke: bool
) -> dict[str, Any]:
    config_file, task = MODELS[name]
    overrides = [
        f"train.seed={seed}",
        f"data.path={data_dirs[task]}",
        f"output.run_root={work / 'runs'}",
        f"output.model_repo={work / 'repo'}",
        f"output.run_name={name}-seed{seed}-{int(time.time())}",
    ]
    if smoke:
        overrides += ["train.max_epochs=1", "ray.num_workers=1"]
    cfg = load_config(ROOT / config_file, overrides)
    started = time.perf_counter()
    result = train(cfg)
    run_dir = Path(cfg.output.run_root) / str(cfg.output.run_name)
    log_file = run_dir / "train.log"
    cell = {
        "model": name,
        "task": task,
        "seed": seed,
        "config": cfg.model_dump(mode="json"),
        "result": result,
        "wall_s": time.perf_counter() - started,
        "log": log_file.read_text().splitlines() if log_file.exists() else [],
    }
    if cfg.model.name == "adaptdhm":
        cell["clusters"] = cluster_occupancy(Path(result["artifact"]), data_dirs[task])
    return cell


def cluster_occupancy(artifact: Path, data_dir: Path) -> dict[str, Any]:
    """Which learned cluster each test row is routed to: counts, entropy / log K, and the
    contingency with the true domains (occupations)."""
    loaded = load_artifact(artifact)
    model, schema = loaded.model.eval(), loaded.schema
    table = pq.read_table(data_dir / "test.parquet")
    with torch.no_grad():
        output = model(features_from_encoded(schema, schema.encode(table)))
    clusters = output.extras["cluster"].numpy()
    k = int(output.extras["routing"].shape[1])
    counts = np.bincount(clusters, minlength=k)
    share = counts / counts.sum()
    entropy = float(-(share[share > 0] * np.log(share[share > 0])).sum())
    domains = np.asarray(table[schema.dataset.domain].to_pylist())
    by_domain = {
        str(d): np.bincount(clusters[domains == d], minlength=k).tolist()
        for d in sorted(set(domains.tolist()))
    }
    return {
        "k": k,
        "counts": counts.tolist(),
        "entropy": entropy,
        "entropy_ratio": entropy / np.log(k) if k > 1 else 1.0,
        "counts_by_domain": by_domain,
    }


def _read(cell: dict[str, Any], path: str) -> float:
    result = cell["result"]
    if path.startswith("test.") and "test" not in result:  # cells saved before result["test"]
        return float(result[path.replace(".", "_")])
    value: Any = {**result, **cell}
    for part in path.split("."):
        value = value[part]
    return float(value)


def summarise(cells: dict[str, Any], lr: dict[str, Any] | None) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for key, (name, path) in METRICS.items():
        runs = sorted((c for c in cells.values() if c["model"] == name), key=lambda c: c["seed"])
        if runs:
            values = [_read(c, path) for c in runs]
            summary[key] = float(np.mean(values))
            summary[f"{key}_seeds"] = values
            summary[f"{key}_std"] = float(np.std(values))
    if lr is not None:
        summary["lr_test_auc"] = lr["test_auc"]
    return summary


def print_table(summary: dict[str, Any]) -> None:
    """One line per summary figure: mean, spread and seeds."""
    for key in METRICS:
        if key in summary:
            seeds = ", ".join(f"{v:.4f}" for v in summary[f"{key}_seeds"])
            print(f"{key:40s} {summary[key]:9.4f} +- {summary[f'{key}_std']:.4f}  [{seeds}]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="1 seed, 1 epoch, 1 worker, 1 layer: checks the plumbing and keys",
    )
    parser.add_argument("--fresh", action="store_true", help="ignore saved cells")
    parser.add_argument(
        "--models", nargs="+", choices=sorted(MODELS), default=None, help="default: all"
    )
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="runs and artifacts (default: next to the output file)",
    )
    args = parser.parse_args(argv)

    data_root = args.data_dir or default_data_dir()
    data_dirs = {task: data_root / task for _, task in MODELS.values()}
    for task, folder in data_dirs.items():
        prepare_movielens(task, folder, data_dir=data_root, show_progress=True)
    data_dir = data_dirs["ml100k-ctr"]
    work = args.work_dir or args.output.parent / f".{args.output.stem}_work"
    # A smoke run always starts over (it used to read the cells of the previous `make test` from
    # the same output and train nothing); a full run resumes from a full run's cells only.
    doc = saved_doc(args.output, args.fresh, args.smoke)
    seeds = SEEDS[:1] if args.smoke else SEEDS

    def save() -> None:
        doc.update(
            {
                "benchmark": "model_quality",
                "tasks": {name: task for name, (_, task) in MODELS.items()},
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
    models = args.models or [m for m in MODELS if not (args.smoke and m in SMOKE_SKIPS)]
    for name in models:
        for seed in seeds:
            key = f"{name}/seed{seed}"
            if key in doc["cells"]:
                print(f"{key}: saved, test auc {doc['cells'][key]['result']['test_auc']:.4f}")
                continue
            doc["cells"][key] = run_cell(name, seed, data_dirs, work, args.smoke)
            save()
            r = doc["cells"][key]["result"]
            extra = {k: r["test"][k] for k in ("cvr_auc", "ctcvr_auc") if k in r["test"]}
            print(
                f"{key}: test auc {r['test_auc']:.4f} logloss {r['test_logloss']:.4f} {extra} "
                f"(best epoch {r['best_epoch']}, {doc['cells'][key]['wall_s']:.0f}s)"
            )
    save()
    summary = doc["summary"]
    print(json.dumps(summary, indent=2))
    print_table(summary)
    wanted = [k for k in SUMMARY_KEYS if k not in METRICS or METRICS[k][0] in models]
    missing = [k for k in wanted if k not in summary]
    if missing:
        print(f"model_quality: summary lacks {missing}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
