"""DeepCTR-Torch's AutoInt on a CTR task's Parquet splits (the peer of train_throughput.py).

Runs ONLY inside the peer virtualenv (benchmarks/.venvs/deepctr), never in the project's:
it imports deepctr_torch, which the project never does. Reads `<data>/{train,valid,test}.parquet`
(or a folder of shards per split), label-encodes every sparse column with a vocabulary fitted on
train (known values 1..n, unseen -> 0; a bag's padding is 0 too, which DeepCTR-Torch masks),
trains with the library's own `fit` loop for a fixed number of epochs, times each epoch
(training only: the per-epoch valid/test scoring happens outside the timed span) and prints ONE
JSON line on stdout (everything the library prints goes to stderr):

    {"per_epoch_s": [...], "samples_per_s": ..., "test_auc": ..., "versions": {...},
     "config": {...}, ...}

samples/s = train rows / median epoch time over the epochs after the first (the only epoch
when there is one), as in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()

SPLITS = ("train", "valid", "test")


def split_paths(root: Path, split: str) -> list[Path]:
    single = root / f"{split}.parquet"
    if single.exists():
        return [single]
    shards = sorted((root / split).glob("*.parquet"))
    if not shards:
        raise SystemExit(f"deepctr_autoint: no Parquet for split '{split}' under {root}")
    return shards


def read_split(root: Path, split: str, columns: list[str]) -> Any:
    import pandas as pd
    import pyarrow.parquet as pq

    frames = [pq.read_table(p, columns=columns).to_pandas() for p in split_paths(root, split)]
    return pd.concat(frames, ignore_index=True)


def encode(
    frames: dict[str, Any], sparse: list[str], bags: list[str], max_bag_len: int | None
) -> tuple[dict[str, dict[str, Any]], dict[str, int], dict[str, int]]:
    """Per split, a dict of model inputs; vocab sizes (with id 0); bag lengths."""
    import numpy as np

    inputs: dict[str, dict[str, Any]] = {s: {} for s in frames}
    vocab_sizes: dict[str, int] = {}
    bag_lens: dict[str, int] = {}
    train = frames["train"]
    for col in sparse:
        values = train[col].astype(str)
        vocab = {v: i + 1 for i, v in enumerate(sorted(values.unique()))}
        vocab_sizes[col] = len(vocab) + 1
        for split, frame in frames.items():
            mapped = frame[col].astype(str).map(vocab).fillna(0)
            inputs[split][col] = mapped.to_numpy(dtype=np.int64)
    for col in bags:
        seen = sorted({str(v) for bag in train[col] for v in bag})
        vocab = {v: i + 1 for i, v in enumerate(seen)}
        vocab_sizes[col] = len(vocab) + 1
        longest = max(len(bag) for bag in train[col])
        length = min(longest, max_bag_len) if max_bag_len else longest
        bag_lens[col] = length
        for split, frame in frames.items():
            out = np.zeros((len(frame), length), dtype=np.int64)
            for row, bag in enumerate(frame[col]):
                ids = [vocab.get(str(v), 0) for v in bag][:length]
                out[row, : len(ids)] = ids
            inputs[split][col] = out
    return inputs, vocab_sizes, bag_lens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with the splits")
    parser.add_argument("--sparse", required=True, help="comma-separated single-id columns")
    parser.add_argument("--bags", default="", help="comma-separated multi-value columns")
    parser.add_argument("--label", default="click")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--embedding-dim", type=int, default=16)
    parser.add_argument("--att-layers", type=int, default=3)
    parser.add_argument("--att-heads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1024)
    parser.add_argument("--max-bag-len", type=int, default=None)
    parser.add_argument("--eval-batch-size", type=int, default=8192)
    args = parser.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import numpy as np
    import torch
    from sklearn.metrics import log_loss, roc_auc_score

    torch.set_num_threads(args.threads)
    # `import deepctr_torch` starts a thread that asks PyPI for the latest release (no timeout)
    # and prints a nag; a stand-in `requests` answers "no data" at once, so the measurement
    # makes no network call and prints nothing.
    sys.modules["requests"] = types.SimpleNamespace(  # type: ignore[assignment]
        get=lambda *a, **k: types.SimpleNamespace(status_code=0, text=""),
        codes=types.SimpleNamespace(ok=200),
    )
    with contextlib.redirect_stdout(sys.stderr):
        from deepctr_torch.callbacks import Callback
        from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat
        from deepctr_torch.models import AutoInt
    del sys.modules["requests"]

    sparse = [c for c in args.sparse.split(",") if c]
    bags = [c for c in args.bags.split(",") if c]
    load_start = time.perf_counter()
    frames = {s: read_split(args.data, s, [*sparse, *bags, args.label]) for s in SPLITS}
    inputs, vocab_sizes, bag_lens = encode(frames, sparse, bags, args.max_bag_len)
    labels = {s: frames[s][args.label].to_numpy(dtype=np.float32) for s in SPLITS}
    load_s = time.perf_counter() - load_start

    columns: list[Any] = [
        SparseFeat(c, vocabulary_size=vocab_sizes[c], embedding_dim=args.embedding_dim)
        for c in sparse
    ]
    columns += [
        VarLenSparseFeat(
            SparseFeat(c, vocabulary_size=vocab_sizes[c], embedding_dim=args.embedding_dim),
            maxlen=bag_lens[c],
            combiner="mean",
        )
        for c in bags
    ]
    model_kwargs = {
        "att_layer_num": args.att_layers,
        "att_head_num": args.att_heads,
        "att_res": True,
        "dnn_hidden_units": (),
    }
    model = AutoInt(columns, columns, device="cpu", seed=args.seed, **model_kwargs)
    model.compile(torch.optim.Adam(model.parameters(), lr=args.lr), "binary_crossentropy")

    def scores(split: str) -> dict[str, float]:
        p = model.predict(inputs[split], args.eval_batch_size).reshape(-1)
        y = labels[split]
        return {
            "auc": float(roc_auc_score(y, p)),
            "logloss": float(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7))),
        }

    epochs: list[dict[str, Any]] = []

    class EpochTimer(Callback):  # type: ignore[misc]
        """Times the library's training pass; scores valid/test after the clock stops."""

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            train_s = time.perf_counter() - self.start
            eval_start = time.perf_counter()
            valid, test = scores("valid"), scores("test")
            epochs.append(
                {
                    "epoch": epoch + 1,
                    "train_s": train_s,
                    "loss": float((logs or {}).get("loss", float("nan"))),
                    "valid_auc": valid["auc"],
                    "valid_logloss": valid["logloss"],
                    "test_auc": test["auc"],
                    "test_logloss": test["logloss"],
                    "eval_s": time.perf_counter() - eval_start,
                }
            )
            model.train()

    train_rows = len(labels["train"])
    with contextlib.redirect_stdout(sys.stderr):
        model.fit(
            inputs["train"],
            labels["train"],
            batch_size=args.batch_size,
            epochs=args.epochs,
            verbose=0,
            shuffle=True,
            callbacks=[EpochTimer()],
        )
    per_epoch = [e["train_s"] for e in epochs]
    steady = per_epoch[1:] or per_epoch
    median_s = statistics.median(steady)
    best = max(epochs, key=lambda e: e["valid_auc"])
    record = {
        "library": "deepctr-torch",
        "model": "AutoInt",
        "versions": {
            "deepctr-torch": importlib.metadata.version("deepctr-torch"),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "config": {
            "embedding_dim": args.embedding_dim,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in model_kwargs.items()},
            "att_embedding_size": args.embedding_dim // args.att_heads,
            "batch_size": args.batch_size,
            "optimizer": "Adam",
            "lr": args.lr,
            "loss": "binary_crossentropy (reduction=sum, the library's fit)",
            "l2_reg_embedding": 1e-5,
            "init_std": 1e-4,
            "epochs": args.epochs,
            "threads": torch.get_num_threads(),
            "seed": args.seed,
            "sparse_features": sparse,
            "bag_features": {c: {"maxlen": bag_lens[c], "combiner": "mean"} for c in bags},
            "vocab_sizes": vocab_sizes,
            "linear_part": True,
        },
        "train_rows": train_rows,
        "per_epoch_s": per_epoch,
        "median_epoch_s": median_s,
        "samples_per_s": train_rows / median_s,
        "epochs": epochs,
        "final_test_auc": epochs[-1]["test_auc"],
        "best_epoch": best["epoch"],
        "test_auc": best["test_auc"],
        "test_logloss": best["test_logloss"],
        "load_s": load_s,
        "wall_s": time.perf_counter() - STARTED,
    }
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
