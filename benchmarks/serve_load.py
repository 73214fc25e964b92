"""Serving load: the gRPC scoring server under a closed-loop concurrency sweep and an open-loop
1-row run, the in-process ceiling of the same model, and int8/int4 table figures.

Processes (BENCHMARKS.md, serving latency protocol; issue 4 item 7):
  server      `recsys serve --port 0 --metrics-port 0` (`python -m recsys.cli serve`), pinned
              to one core (os.sched_setaffinity in a trampoline that then execs it), one torch
              thread (OMP_NUM_THREADS=1) and one scoring thread (the server's default).
  load gen    this file with `--worker loadgen`, one process per cell, pinned to another core;
              grpc.aio on one channel to 127.0.0.1 only, N concurrent workers each sending the
              next request as soon as the previous one answers (closed loop), or Poisson arrivals
              at a fixed rate (open loop). Requests are generic rows drawn from the ml100k-ctr
              test split, serialised once before the cell.
  ceiling     this file with `--worker ceiling`, pinned to the server's core with one torch
              thread, after the server has stopped: the same requests through the server's own
              path, parsed ScoreRequest -> RequestConverter.encode (serving.convert) -> concat ->
              serving.batcher.forward (features -> model -> probabilities), at the batch size the
              micro-batcher actually formed at each row size's knee (mean rows per forward pass,
              read from the server's Prometheus histogram over that cell).
  quant       `--worker quant-ml100k` / `--worker quant-synthetic`: fp32 vs int8 vs int4 tables
              (serving.quantize.quantize_tables, the transform `recsys serve --quantize` applies)
              on the ml100k-ctr test split, and on an AutoInt (the served config, D=16) with
              1.06M table rows fitted on 1M synthetic-ctr rows, trained for 60 steps of 4096
              rows in-process (not by the project trainer), compared on 50k of its test rows.

Figures per closed-loop cell (warm-up, then a fixed window; a request counts when it completes
inside the window): QPS and rows/s of OK answers, p50/p95/p99 latency, errors by status code
(warm-up and drain included), CPU of server and load generator (utime+stime deltas from
/proc/<pid>/stat over the window, the counters psutil reads; psutil is not in the pinned stack),
per-thread CPU of the server, and the server's own metrics over the window (mean rows per forward
pass, batch-size histogram, statuses). The knee of a row size is the last concurrency before
rows/s grows by less than 5%; `errors_below_knee` counts every non-OK answer in the cells at or
below each row size's knee. The open-loop run offers half the 1-row knee's QPS for 10 s and
reports latency from each request's scheduled send time (so client lateness counts).

Artifact: by default configs/autoint_ml100k.yaml trained once by `training.jobs.train` in a
subprocess (Ray exits with it) into the work folder and reused; `--artifact DIR` serves an
existing one. Cells are saved to the JSON as they finish and skipped when the script runs again
with the same artifact and settings (`--fresh` starts over; `--smoke` always starts over).

    python benchmarks/serve_load.py                          # full run, quiet 2-core machine
    python benchmarks/serve_load.py --smoke --output /tmp/serve_load_smoke.json   # < 2 min

Full run on a quiet 2-core machine: about 5 min to train the artifact, about 3 min for the
synthetic model (data generation and training are cached in the work folder and the data cache;
scoring 50k rows x 3 is not), then 28 closed-loop cells x ~11 s (1 s warm-up, 8 s window,
process start) = ~5 min, the open loop ~15 s and the ceiling ~1.5 min: about 15 min from
scratch, 8-9 min with `--fresh` once the artifacts are cached. Needs 2 usable cores; run it on a
quiet machine (each cell records the load average). `--rows 64 --concurrency 8 --only sweep`
and the like run a subset (the summary then lacks keys, which is not an error).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import itertools
import json
import math
import os
import queue
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _common import git_sha, machine, saved_doc  # benchmarks/ is the script folder on sys.path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "serve_load.json"
MODEL_CONFIG = ROOT / "configs" / "autoint_ml100k.yaml"
SCORE_METHOD = "/recsys.v1.Scoring/Score"

# The sweep (BENCHMARKS.md: closed loop 1..64 at 1, 16, 64, 256 rows per request).
FULL_PLAN: dict[str, Any] = {
    "rows": [1, 16, 64, 256],
    "concurrency": [1, 2, 4, 8, 16, 32, 64],
    "warmup_s": 1.0,
    "duration_s": 8.0,
    "open_loop_warmup_s": 1.0,
    "open_loop_s": 10.0,
    "ceiling_reps": 5,
    "ceiling_rep_s": 1.5,
}
SMOKE_PLAN: dict[str, Any] = {
    "rows": [1, 16],
    "concurrency": [1, 4],
    "warmup_s": 0.5,
    "duration_s": 1.0,
    "open_loop_warmup_s": 0.5,
    "open_loop_s": 1.0,
    "ceiling_reps": 3,
    "ceiling_rep_s": 0.3,
}
KNEE_GROWTH = 0.05  # the knee: the last concurrency before rows/s grows by less than this
EFFICIENCY_ROWS = 64
EFFICIENCY_TARGET = 0.6
INT8_AUC_DELTA_TARGET = 0.001
INT8_BYTES_RATIO_TARGET = 0.55
CALL_TIMEOUT_S = 10.0  # deadline of every request (bounds a cell; feeds admission control)
MAX_RECORDED = 2_000_000  # completions recorded per cell (memory bound)
MAX_IN_FLIGHT_OPEN = 4096  # open loop: arrivals beyond this many in flight are dropped (counted)
MAX_REQUESTS_PER_SIZE = 512  # distinct requests per row size, cycled
REQUEST_SEED = 0
OPEN_LOOP_SEED = 1
CLIENT_BOUND_CPU = 0.9  # a knee is client-bound when the load generator uses this much of a core
SERVER_FLAGS = ["--poll-interval-s", "3600", "--grace-s", "2"]  # batching flags: defaults
SINGLE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}

# Artifacts.
TRAINED_MODEL_NAME = "autoint_ml100k"  # configs/autoint_ml100k.yaml's output.model_name
TINY_MODEL_NAME = "autoint_ml100k_tiny"
TINY_MODEL = {"name": "autoint", "num_layers": 1, "num_heads": 2, "attention_dim": 16,
              "variant": "paper", "use_scale": True}  # fmt: skip
TINY_DIM = 16
TINY_TRAIN_STEPS = 60
TINY_BATCH = 1024

# The synthetic model with large tables.
SYNTHETIC_ROWS = 1_000_000
SMOKE_SYNTHETIC_ROWS = 20_000
SYNTHETIC_NAME = "autoint_synthetic"
SYNTHETIC_BATCH = 4096
SMOKE_SYNTHETIC_BATCH = 1024
# The served AutoInt on 39 fields costs ~25x its ml100k forward (attention is quadratic in
# fields), so the synthetic model gets a quarter epoch and a 50k-row test sample: enough for a
# paired fp32-vs-quantized comparison, which is what it is for.
SYNTHETIC_MAX_STEPS = 60  # ~245k of the 800k train rows at 4096 rows per step
SYNTHETIC_TEST_ROWS = 50_000  # the first rows of the test split (rows are i.i.d.)
SYNTHETIC_TABLE_LR = 0.05  # Adagrad on the tables, Adam on the rest: the trainer's defaults
SYNTHETIC_DENSE_LR = 1e-3

SUMMARY_KEYS = (
    "efficiency_at_64_rows",
    "errors_below_knee",
    "qps_1row_knee",
    "p50_ms_1row",
    "p99_ms_1row",
    "int8_test_auc_delta",
    "int8_embedding_bytes_ratio",
)

# Sets the affinity of the process, then execs the real command in it (so every thread the
# server ever starts inherits the one core).
PIN_TRAMPOLINE = (
    "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])}); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)


class BenchmarkError(RuntimeError):
    """A step of the benchmark failed; the message says which and why."""


# ---------------------------------------------------------------------------------------------
# Small helpers shared by the orchestrator and the workers (stdlib only at import time).
# ---------------------------------------------------------------------------------------------


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(path: str) -> tuple[str, list[str]]:
    text = Path(path).read_text()
    return text[text.index("(") + 1 : text.rindex(")")], text.rpartition(")")[2].split()


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds, from /proc/<pid>/stat."""
    _, rest = _stat_fields(f"/proc/{pid}/stat")
    return (int(rest[11]) + int(rest[12])) / _CLK_TCK


def thread_cpu_s(pid: int) -> dict[str, tuple[str, float]]:
    """tid -> (thread name, utime + stime seconds) of every thread of a process."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm, rest = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
        except OSError:  # the thread ended meanwhile
            continue
        out[tid] = (comm, (int(rest[11]) + int(rest[12])) / _CLK_TCK)
    return out


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def write_payloads(path: Path, payloads: list[bytes]) -> None:
    """Serialised requests, each prefixed by its length (uint32 little-endian)."""
    with path.open("wb") as f:
        for payload in payloads:
            f.write(struct.pack("<I", len(payload)))
            f.write(payload)


def read_payloads(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    out, offset = [], 0
    while offset < len(data):
        (size,) = struct.unpack_from("<I", data, offset)
        out.append(data[offset + 4 : offset + 4 + size])
        offset += 4 + size
    return out


def percentiles_ms(seconds: list[float]) -> dict[str, float | None]:
    if not seconds:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    import numpy as np

    values = np.asarray(seconds) * 1e3
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {
        "p50": float(p50),
        "p95": float(p95),
        "p99": float(p99),
        "mean": float(values.mean()),
        "max": float(values.max()),
    }


def version_dir_of(path: Path) -> Path:
    """A version folder, or a model folder's newest version (the artifact rule, without torch)."""
    path = Path(path)
    if (path / "manifest.json").exists():
        return path.resolve()
    versions = (
        sorted(
            (int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit()),
        )
        if path.is_dir()
        else []
    )
    if not versions:
        raise BenchmarkError(
            f"artifact: {path} is neither a version folder (no manifest.json) nor a model folder "
            "with integer versions; pass MODEL_REPO/<name> or MODEL_REPO/<name>/<version>"
        )
    return (path / str(versions[-1])).resolve()


def test_files(data_path: Path) -> list[Path]:
    single = data_path / "test.parquet"
    if single.exists():
        return [single]
    shards = sorted((data_path / "test").glob("*.parquet"))
    if not shards:
        raise BenchmarkError(f"data: no test split under {data_path} (expected test.parquet)")
    return shards


# ---------------------------------------------------------------------------------------------
# Workers: each runs in its own process (`--worker KIND --spec JSON --result PATH [--cpu N]`).
# ---------------------------------------------------------------------------------------------


def worker_train(spec: dict[str, Any]) -> dict[str, Any]:
    """Trains configs/autoint_ml100k.yaml with the project's trainer (Ray exits with us)."""
    import logging

    from training.config import load_config
    from training.jobs import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = load_config(spec["config"], spec["overrides"])
    started = time.perf_counter()
    result = train(cfg)
    return {
        "artifact": result["artifact"],
        "result": result,
        "wall_s": time.perf_counter() - started,
        "config": cfg.model_dump(mode="json"),
    }


def worker_tiny_artifact(spec: dict[str, Any]) -> dict[str, Any]:
    """The smoke artifact: a 1-layer AutoInt (D=16) on the ml100k-ctr features fitted on train,
    trained for a few dozen Adam steps in-process (enough to spread the scores)."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from recsys.artifact import write_artifact
    from recsys.embeddings import EmbeddingConfig, build_embedding
    from recsys.features.batch import batch_from_encoded
    from recsys.models.autoint import AutoIntConfig
    from recsys.models.registry import build_model
    from training.config import DataConfig
    from training.data import fit_features, locate_dataset, side_tables

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    data = locate_dataset(DataConfig(dataset="ml100k-ctr", path=spec["data_path"]))
    schema = fit_features(data)
    model_config = AutoIntConfig.model_validate(spec["model"])
    embedding = EmbeddingConfig(dim=spec["dim"])
    model = build_model(model_config, build_embedding(schema, embedding), schema)
    train_table = pq.read_table(data.files["train"][0])
    order = np.random.default_rng(0).permutation(train_table.num_rows)
    encoded = schema.encode(train_table.take(order))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(spec["steps"]):
        start = (step * spec["batch"]) % max(encoded.num_rows - spec["batch"], 1)
        batch = batch_from_encoded(schema, encoded.slice(start, spec["batch"]))
        optimizer.zero_grad()
        model.loss(model(batch.features), batch.labels).backward()
        optimizer.step()
    model.eval()
    metrics = {
        "data": {"dataset": "ml100k-ctr", "path": str(Path(spec["data_path"]).resolve())},
        "note": f"serve_load smoke artifact: untuned tiny AutoInt, {spec['steps']} Adam steps",
    }
    path = write_artifact(
        Path(spec["repo"]),
        spec["name"],
        model,
        model_config,
        embedding,
        schema,
        metrics,
        side_tables(data),
    )
    return {"artifact": str(path)}


def _weight_dtypes(model: Any) -> list[str]:
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
        IntNBitTableBatchedEmbeddingBagsCodegen,
    )

    return sorted(
        {
            str(m.weights_host.dtype)
            for m in model.modules()
            if isinstance(m, IntNBitTableBatchedEmbeddingBagsCodegen) and m.weights_host.numel()
        }
    )


def quant_figures(model: Any, schema: Any, table: Any) -> dict[str, Any]:
    """fp32 vs int8 vs int4 served tables: test AUC of every labelled task, score differences,
    and the bytes of the tensors served (nbytes of the uint8 storage) against fp32."""
    import numpy as np

    from recsys.artifact import score_table
    from recsys.metrics import auc
    from serving.quantize import embedding_bytes, fp32_embedding_bytes, quantize_tables

    labels = {
        c.task_name: table[c.name].to_numpy(zero_copy_only=False).astype(np.float64)
        for c in schema.dataset.labels
        if c.name in table.column_names
    }
    started = time.perf_counter()
    fp32 = {t: p.numpy() for t, p in score_table(model, schema, table).items()}
    out: dict[str, Any] = {
        "test_rows": table.num_rows,
        "embedding_dim": model_dim(model),
        "table_rows": int(sum(f.num_embeddings for f in schema.sparse)),
        "fp32": {
            "test_auc": {t: auc(y, fp32[t]) for t, y in labels.items()},
            "embedding_bytes": embedding_bytes(model),
            "fp32_embedding_bytes": fp32_embedding_bytes(model),
            "score_s": time.perf_counter() - started,
        },
    }
    for dtype in ("int8", "int4"):
        started = time.perf_counter()
        quantized = quantize_tables(model, dtype)  # a copy; `model` stays fp32
        quantize_s = time.perf_counter() - started
        started = time.perf_counter()
        probs = {t: p.numpy() for t, p in score_table(quantized, schema, table).items()}
        score_s = time.perf_counter() - started
        served, fp32_bytes = embedding_bytes(quantized), fp32_embedding_bytes(quantized)
        diffs = {t: np.abs(probs[t].astype(np.float64) - fp32[t]) for t in probs}
        aucs = {t: auc(y, probs[t]) for t, y in labels.items()}
        out[dtype] = {
            "test_auc": aucs,
            "test_auc_delta": {t: aucs[t] - out["fp32"]["test_auc"][t] for t in aucs},
            "max_abs_prob_diff": {t: float(d.max()) for t, d in diffs.items()},
            "mean_abs_prob_diff": {t: float(d.mean()) for t, d in diffs.items()},
            "embedding_bytes": served,
            "fp32_embedding_bytes": fp32_bytes,
            "embedding_bytes_ratio": served / fp32_bytes,
            "served_weight_dtypes": _weight_dtypes(quantized),
            "quantize_s": quantize_s,
            "score_s": score_s,
        }
        del quantized
    return out


def model_dim(model: Any) -> int:
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            return int(module.embedding_bag_configs()[0].embedding_dim)
    return 0


def worker_quant_ml100k(spec: dict[str, Any]) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from recsys.artifact import load_artifact

    torch.set_num_threads(spec["threads"])
    artifact = load_artifact(spec["artifact"])
    table = pa.concat_tables([pq.read_table(p) for p in spec["test_files"]])
    figures = quant_figures(artifact.model, artifact.schema, table)
    figures["what"] = (
        f"the served artifact {spec['artifact']} (fp32 as exported) and its tables quantized by "
        "serving.quantize.quantize_tables (the --quantize transform), scored with "
        "recsys.artifact.score_table on the whole test split"
    )
    figures["artifact_test_metrics"] = artifact.metrics.get("test")
    return figures


def ensure_synthetic(out_dir: Path, rows: int) -> Path:
    """synthetic-ctr generated once into the shared cache (the same folder and parameters as
    benchmarks/train_throughput.py, so either script reuses the other's data)."""
    from recsys.data.synthetic import SyntheticInfo, generate_synthetic_ctr

    info_file = out_dir / "info.json"
    if info_file.exists() and SyntheticInfo.from_json(info_file).num_rows == rows:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    print(f"generating synthetic-ctr ({rows:,} rows) into {out_dir} ...", flush=True)
    generate_synthetic_ctr(tmp, num_rows=rows, seed=0, vocab_scale=1.0, show_progress=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def _iter_parquet(files: list[Path], batch_rows: int) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
            yield pa.Table.from_batches([batch])


def _rebatch(tables: Iterator[Any], rows: int) -> Iterator[Any]:
    """Tables of exactly `rows` rows (the last may be shorter) from a stream of tables."""
    import pyarrow as pa

    pending: list[Any] = []
    count = 0
    for table in tables:
        pending.append(table)
        count += table.num_rows
        while count >= rows:
            merged = pa.concat_tables(pending)
            yield merged.slice(0, rows)
            pending, count = [merged.slice(rows)], count - rows
    if count:
        yield pa.concat_tables(pending)


def worker_quant_synthetic(spec: dict[str, Any]) -> dict[str, Any]:
    """int8/int4 on large tables: an AutoInt (the served model's config, D=16) on a FeatureSchema
    fitted on synthetic-ctr's train split, trained one epoch in-process, written as an artifact
    (cached), then scored fp32/int8/int4 on the synthetic test split."""
    import json as json_

    import pyarrow as pa
    import torch

    from recsys.artifact import load_artifact, write_artifact
    from recsys.data.schema import DatasetSchema
    from recsys.data.synthetic import SyntheticInfo
    from recsys.embeddings import EmbeddingConfig, build_embedding
    from recsys.features.batch import batch_from_encoded
    from recsys.features.schema import fit_feature_schema
    from recsys.models.autoint import AutoIntConfig
    from recsys.models.registry import build_model

    torch.set_num_threads(spec["threads"])
    data_dir = ensure_synthetic(Path(spec["data_path"]), spec["rows"])
    train_files = sorted((data_dir / "train").glob("*.parquet"))
    test_files_ = sorted((data_dir / "test").glob("*.parquet"))
    repo, name = Path(spec["repo"]), SYNTHETIC_NAME
    recipe = {k: spec[k] for k in ("rows", "model", "dim", "batch", "max_steps")}
    cached = None
    model_dir = repo / name
    if model_dir.is_dir():
        for version in sorted((p for p in model_dir.iterdir() if p.name.isdigit()), reverse=True):
            metrics = json_.loads((version / "metrics.json").read_text())
            if metrics.get("recipe") == recipe:
                cached = version
                break
    training: dict[str, Any]
    if cached is None:
        started = time.perf_counter()
        dataset = DatasetSchema.from_yaml(data_dir / "schema.yaml")
        schema = fit_feature_schema(dataset, _iter_parquet(train_files, 65_536))
        fit_s = time.perf_counter() - started
        torch.manual_seed(0)
        model_config = AutoIntConfig.model_validate(spec["model"])
        embedding = EmbeddingConfig(dim=spec["dim"])
        model = build_model(model_config, build_embedding(schema, embedding), schema)
        tables = [p for n, p in model.named_parameters() if ".embedding_bags." in n]
        dense = [p for n, p in model.named_parameters() if ".embedding_bags." not in n]
        optimizers = [
            torch.optim.Adagrad(tables, lr=SYNTHETIC_TABLE_LR),
            torch.optim.Adam(dense, lr=SYNTHETIC_DENSE_LR),
        ]
        model.train()
        steps, losses, started = 0, [], time.perf_counter()
        for chunk in _rebatch(_iter_parquet(train_files, 65_536), spec["batch"]):
            batch = batch_from_encoded(schema, schema.encode(chunk))
            for optimizer in optimizers:
                optimizer.zero_grad()
            loss = model.loss(model(batch.features), batch.labels)
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            losses.append(float(loss.detach()))
            steps += 1
            if steps >= spec["max_steps"]:
                break
        model.eval()
        training = {
            "how": (
                "in-process, one pass over the train split in file order (rows are i.i.d. by "
                f"construction), at most {spec['max_steps']} steps of {spec['batch']} rows; "
                f"Adagrad lr {SYNTHETIC_TABLE_LR} on the tables, Adam lr {SYNTHETIC_DENSE_LR} on "
                "the rest (the project trainer's defaults, unsharded); not the Ray trainer"
            ),
            "steps": steps,
            "rows_seen": steps * spec["batch"],
            "fit_features_s": fit_s,
            "train_s": time.perf_counter() - started,
            "loss_first_last": [losses[0], losses[-1]] if losses else None,
        }
        cached = write_artifact(
            repo, name, model, model_config, embedding, schema,
            {"recipe": recipe, "training": training},
        )  # fmt: skip
    artifact = load_artifact(cached)
    training = artifact.metrics["training"]
    table = pa.concat_tables(list(_iter_parquet(test_files_, 65_536)))
    table = table.slice(0, spec["test_rows"])
    figures = quant_figures(artifact.model, artifact.schema, table)
    info = SyntheticInfo.from_json(data_dir / "info.json")
    figures.update(
        {
            "what": (
                f"AutoInt ({spec['model']}, D={spec['dim']}) on a FeatureSchema fitted on the "
                f"train split of synthetic-ctr ({spec['rows']:,} rows, seed 0, vocab_scale 1.0), "
                f"trained briefly in-process; scores on the first {spec['test_rows']:,} rows of "
                "its own test split, fp32 vs quantized (paired)"
            ),
            "artifact": str(cached),
            "data_path": str(data_dir),
            "training": training,
            "oracle_test_auc": info.oracle_test_auc,
            "table_rows_per_feature": {f.name: f.num_embeddings for f in artifact.schema.sparse},
        }
    )
    return figures


def worker_ceiling(spec: dict[str, Any]) -> dict[str, Any]:
    """In-process rows/s of the served model through the server's own request path, one torch
    thread, on the pinned core: parsed ScoreRequest -> RequestConverter.encode -> concat ->
    serving.batcher.forward. Also the forward alone (requests encoded beforehand)."""
    import pyarrow as pa
    import torch

    from recsys.artifact import load_artifact
    from serving._pb.recsys.v1 import scoring_pb2 as pb
    from serving.batcher import forward
    from serving.convert import RequestConverter

    torch.set_num_threads(1)
    artifact = load_artifact(spec["artifact"])
    model, schema = artifact.model, artifact.schema
    model.eval()
    converter = RequestConverter(
        schema, artifact.side_table("user"), artifact.side_table("item"), spec["max_rows"]
    )
    results = []
    for point in spec["points"]:
        rows, per_batch = point["rows"], point["requests_per_batch"]
        requests = [pb.ScoreRequest.FromString(b) for b in read_payloads(point["requests_file"])]
        num_groups = max(1, len(requests) // per_batch)
        groups = [
            [requests[(g * per_batch + i) % len(requests)] for i in range(per_batch)]
            for g in range(num_groups)
        ]

        def convert_and_forward(group: list[Any]) -> None:
            tables = [converter.encode(request) for request in group]
            forward(model, schema, tables[0] if len(tables) == 1 else pa.concat_tables(tables))

        encoded = []
        for group in groups:
            tables = [converter.encode(request) for request in group]
            encoded.append(tables[0] if len(tables) == 1 else pa.concat_tables(tables))

        def timed(step: Any, items: list[Any], rows_per_step: int) -> list[float]:
            deadline = time.perf_counter() + spec["warmup_s"]
            i = 0
            while time.perf_counter() < deadline or i < 2:
                step(items[i % len(items)])
                i += 1
            rates = []
            for _ in range(spec["reps"]):
                start, i = time.perf_counter(), 0
                while True:
                    step(items[i % len(items)])
                    i += 1
                    elapsed = time.perf_counter() - start
                    if elapsed >= spec["rep_s"]:
                        break
                rates.append(i * rows_per_step / elapsed)
            return rates

        path_rates = timed(convert_and_forward, groups, rows * per_batch)
        forward_rates = timed(
            lambda table: forward(model, schema, table), encoded, rows * per_batch
        )
        results.append(
            {
                **point,
                "batch_rows": rows * per_batch,
                "rows_per_s": statistics.median(path_rates),
                "rows_per_s_reps": path_rates,
                "forward_only_rows_per_s": statistics.median(forward_rates),
                "forward_only_rows_per_s_reps": forward_rates,
            }
        )
    return {
        "points": results,
        "torch_threads": torch.get_num_threads(),
        "affinity": sorted(os.sched_getaffinity(0)),
    }


# --- the load generator -----------------------------------------------------------------------


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


def _snapshot(spec: dict[str, Any]) -> dict[str, Any]:
    snap: dict[str, Any] = {
        "t": time.perf_counter(),
        "server_cpu_s": proc_cpu_s(spec["server_pid"]),
        "server_threads": thread_cpu_s(spec["server_pid"]),
        "self_cpu_s": proc_cpu_s(os.getpid()),
    }
    snap["metrics"] = _scrape(spec["metrics_url"])
    return snap


def _metric_delta(
    start: dict[Any, float], end: dict[Any, float], name: str, **labels: str
) -> float:
    total = 0.0
    for (sample, sample_labels), value in end.items():
        if sample != name or any(dict(sample_labels).get(k) != v for k, v in labels.items()):
            continue
        total += value - start.get((sample, sample_labels), 0.0)
    return total


def _window_figures(spec: dict[str, Any], start: dict[str, Any], end: dict[str, Any]) -> dict:
    wall = end["t"] - start["t"]
    m0, m1 = start["metrics"], end["metrics"]
    batches = _metric_delta(m0, m1, "recsys_batch_rows_count")
    batch_rows = _metric_delta(m0, m1, "recsys_batch_rows_sum")
    histogram = {}
    for (sample, labels), _ in m1.items():
        if sample == "recsys_batch_rows_bucket":
            le = dict(labels)["le"]
            histogram[le] = _metric_delta(m0, m1, sample, le=le)
    statuses = {}
    for (sample, labels), _ in m1.items():
        if sample == "recsys_requests_total" and dict(labels).get("method") == SCORE_METHOD:
            status = dict(labels)["status"]
            statuses[status] = _metric_delta(m0, m1, sample, method=SCORE_METHOD, status=status)
    latency_n = _metric_delta(m0, m1, "recsys_request_latency_seconds_count", method=SCORE_METHOD)
    latency_s = _metric_delta(m0, m1, "recsys_request_latency_seconds_sum", method=SCORE_METHOD)
    threads = []
    for tid, (comm, cpu) in end["server_threads"].items():
        before = start["server_threads"].get(tid, (comm, 0.0))[1]
        name = f"{comm} (main: event loop)" if int(tid) == spec["server_pid"] else comm
        threads.append({"tid": int(tid), "name": name, "cores": (cpu - before) / wall})
    threads.sort(key=lambda t: -t["cores"])
    return {
        "cpu": {
            "window_s": wall,
            "server_cores": (end["server_cpu_s"] - start["server_cpu_s"]) / wall,
            "loadgen_cores": (end["self_cpu_s"] - start["self_cpu_s"]) / wall,
            "server_busiest_threads": [t for t in threads[:4] if t["cores"] > 0.005],
            "source": "/proc/<pid>/stat utime+stime deltas over the window",
        },
        "server_metrics": {
            "forward_passes": batches,
            "mean_batch_rows": batch_rows / batches if batches else None,
            "batch_rows_histogram_cumulative": histogram,
            "requests_by_status": {k: v for k, v in statuses.items() if v},
            "server_mean_latency_ms": 1e3 * latency_s / latency_n if latency_n else None,
        },
    }


async def _run_load(spec: dict[str, Any], payloads: list[bytes]) -> dict[str, Any]:
    import asyncio

    import grpc.aio
    import numpy as np

    from serving._pb.recsys.v1 import scoring_pb2 as pb

    rows = spec["rows"]
    channel = grpc.aio.insecure_channel(
        spec["address"], options=[("grpc.max_receive_message_length", 64 << 20)]
    )
    await asyncio.wait_for(channel.channel_ready(), 30)
    call = channel.unary_unary(
        SCORE_METHOD, request_serializer=None, response_deserializer=pb.ScoreResponse.FromString
    )
    now = time.perf_counter
    t_begin = now()
    t_start = t_begin + spec["warmup_s"]
    t_stop = t_start + spec["duration_s"]
    counts: dict[str, dict[str, int]] = {"warmup": {}, "window": {}, "drain": {}}
    latencies: list[float] = []  # OK answers completing in the window
    from_send: list[float] = []  # open loop: latency from the actual send
    send_lag: list[float] = []  # open loop: actual send - scheduled send
    state = {"recorded": 0, "dropped": 0}

    async def one(payload: bytes, t_sched: float | None) -> float:
        t_sent = now()
        try:
            response = await call(payload, timeout=spec["timeout_s"])
            code = "OK" if response.num_rows == rows else "WRONG_NUM_ROWS"
        except grpc.aio.AioRpcError as e:
            code = e.code().name
        t_done = now()
        t_ref = t_sent if t_sched is None else t_sched
        phase_time = t_done if t_sched is None else t_sched
        phase = (
            "warmup" if phase_time < t_start else ("window" if phase_time <= t_stop else "drain")
        )
        counts[phase][code] = counts[phase].get(code, 0) + 1
        if phase == "window" and code == "OK" and state["recorded"] < MAX_RECORDED:
            state["recorded"] += 1
            latencies.append(t_done - t_ref)
            if t_sched is not None:
                from_send.append(t_done - t_sent)
                send_lag.append(t_sent - t_sched)
        return t_done

    async def closed_worker(index: int) -> None:
        k = index
        while now() < t_stop and state["recorded"] < MAX_RECORDED:
            await one(payloads[k % len(payloads)], None)
            k += spec["concurrency"]

    async def open_arrivals() -> None:
        rng = np.random.default_rng(spec["seed"])
        in_flight: set[asyncio.Task[float]] = set()
        t, k = t_begin, 0
        while True:
            t += float(rng.exponential(1.0 / spec["rate"]))
            if t >= t_stop:
                break
            delay = t - now()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(in_flight) >= MAX_IN_FLIGHT_OPEN:
                state["dropped"] += 1
                phase = "warmup" if t < t_start else "window"
                counts[phase]["CLIENT_DROPPED"] = counts[phase].get("CLIENT_DROPPED", 0) + 1
                continue
            task = asyncio.get_running_loop().create_task(one(payloads[k % len(payloads)], t))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            k += 1
        if in_flight:
            await asyncio.gather(*in_flight)

    snaps: dict[str, dict[str, Any]] = {}

    async def snapshots() -> None:
        await asyncio.sleep(max(0.0, t_start - now()))
        snaps["start"] = await asyncio.to_thread(_snapshot, spec)
        await asyncio.sleep(max(0.0, t_stop - now()))
        snaps["end"] = await asyncio.to_thread(_snapshot, spec)

    if spec["mode"] == "closed":
        load = [closed_worker(i) for i in range(spec["concurrency"])]
    else:
        load = [open_arrivals()]
    await asyncio.gather(snapshots(), *load)
    await channel.close()

    window = counts["window"]
    ok = window.get("OK", 0)
    errors_total = {}
    for phase in counts.values():
        for code, n in phase.items():
            if code != "OK":
                errors_total[code] = errors_total.get(code, 0) + n
    out: dict[str, Any] = {
        "mode": spec["mode"],
        "rows": rows,
        "window_s": spec["duration_s"],
        "ok_in_window": ok,
        "qps": ok / spec["duration_s"],
        "rows_per_s": ok * rows / spec["duration_s"],
        "latency_ms": percentiles_ms(latencies),
        "errors_in_window": {k: v for k, v in window.items() if k != "OK"},
        "errors_total": errors_total,
        "error_count": sum(errors_total.values()),
        "answers_by_phase": counts,
        "recorded_capped": state["recorded"] >= MAX_RECORDED,
        **_window_figures(spec, snaps["start"], snaps["end"]),
        "loadgen_affinity": sorted(os.sched_getaffinity(0)),
    }
    if spec["mode"] == "closed":
        out["concurrency"] = spec["concurrency"]
    else:
        arrivals = sum(window.values())
        out.update(
            {
                "offered_qps": spec["rate"],
                "arrivals_in_window_per_s": arrivals / spec["duration_s"],
                "latency_from": "scheduled send time (Poisson arrivals)",
                "latency_from_actual_send_ms": percentiles_ms(from_send),
                "send_lag_ms": percentiles_ms(send_lag),
                "client_dropped": state["dropped"],
            }
        )
    return out


def worker_loadgen(spec: dict[str, Any]) -> dict[str, Any]:
    import asyncio

    payloads = read_payloads(Path(spec["requests_file"]))
    return asyncio.run(_run_load(spec, payloads))


WORKERS = {
    "train": worker_train,
    "tiny-artifact": worker_tiny_artifact,
    "quant-ml100k": worker_quant_ml100k,
    "quant-synthetic": worker_quant_synthetic,
    "ceiling": worker_ceiling,
    "loadgen": worker_loadgen,
}


def worker_main(args: argparse.Namespace) -> int:
    if args.cpu is not None:  # first, before any import starts a thread
        os.sched_setaffinity(0, {args.cpu})
    spec = json.loads(args.spec)
    result = WORKERS[args.worker](spec)
    Path(args.result).write_text(json.dumps(result, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------
# The orchestrator.
# ---------------------------------------------------------------------------------------------


class Orchestrator:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.tmp = work / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        usable = sorted(os.sched_getaffinity(0))
        self.original_affinity = set(usable)
        if len(usable) >= 2:
            self.server_cpu, self.loadgen_cpu = usable[0], usable[1]
        else:
            self.server_cpu = self.loadgen_cpu = usable[0]
            print(
                f"warning: only CPU {usable[0]} is usable: server and load generator share it",
                flush=True,
            )

    def run_worker(
        self,
        kind: str,
        spec: dict[str, Any],
        timeout_s: float,
        cpu: int | None = None,
        single_thread: bool = False,
    ) -> dict[str, Any]:
        result = self.tmp / f"{kind}-{uuid.uuid4().hex[:8]}.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            kind,
            "--spec",
            json.dumps(spec),
            "--result",
            str(result),
        ]
        if cpu is not None:
            cmd += ["--cpu", str(cpu)]
        env = dict(os.environ)
        if single_thread:
            env.update(SINGLE_THREAD_ENV)
        try:
            proc = subprocess.run(cmd, env=env, cwd=ROOT, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as e:
            raise BenchmarkError(f"worker {kind}: no result within {timeout_s:.0f}s") from e
        if proc.returncode != 0 or not result.exists():
            raise BenchmarkError(
                f"worker {kind}: exited with code {proc.returncode} (see its output above)"
            )
        out = json.loads(result.read_text())
        result.unlink()
        return dict(out)


class Server:
    """`recsys serve` in a subprocess pinned to one core, on port 0 with the metrics side port."""

    def __init__(self, repo: Path, model: str, cpu: int, log_path: Path) -> None:
        self.model = model
        self.log_path = log_path
        self.command = [
            sys.executable, "-c", PIN_TRAMPOLINE, str(cpu),
            "-m", "recsys.cli", "serve", "--model-repo", str(repo),
            "--port", "0", "--metrics-port", "0", *SERVER_FLAGS,
        ]  # fmt: skip
        env = dict(os.environ)
        env.update(SINGLE_THREAD_ENV)
        self._log = log_path.open("w")
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env, cwd=ROOT
        )
        lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
        try:
            line = lines.get(timeout=180)
        except queue.Empty as e:
            self.stop()
            raise BenchmarkError(
                f"server: no 'serving on' line within 180s (log: {log_path})"
            ) from e
        parts = line.split()
        if not line.startswith("serving on ") or "metrics" not in parts:
            self.stop()
            raise BenchmarkError(f"server: unexpected first line {line!r} (log: {log_path})")
        self.address = parts[2]
        self.metrics_address = parts[parts.index("metrics") + 2]
        if not self.address.startswith("127.0.0.1:"):
            self.stop()
            raise BenchmarkError(f"server: bound {self.address} (expected 127.0.0.1 only)")
        self.affinity = sorted(os.sched_getaffinity(self.proc.pid))
        self._wait_serving()
        self.ready_s = time.perf_counter() - started

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def metrics_url(self) -> str:
        return f"http://{self.metrics_address}/metrics"

    def _wait_serving(self) -> None:
        from serving.client import ScoringClient

        deadline = time.monotonic() + 300
        with ScoringClient(self.address, timeout_s=10) as client:
            while True:
                try:
                    if client.health(self.model) == "SERVING":
                        return
                except Exception as e:  # retried until the deadline, then raised
                    if time.monotonic() > deadline:
                        raise BenchmarkError(f"server: health check failed ({e})") from e
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise BenchmarkError(
                        f"server: model '{self.model}' not SERVING within 300s (log: "
                        f"{self.log_path})"
                    )
                time.sleep(0.2)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def ensure_artifact(
    args: argparse.Namespace, orch: Orchestrator, ml100k_dir: Path
) -> tuple[Path, dict[str, Any]]:
    """The artifact to serve: --artifact, the smoke tiny model, or configs/autoint_ml100k.yaml
    trained once into the work folder (reused when its folder holds a version)."""
    if args.artifact:
        version_dir = version_dir_of(args.artifact)
        return version_dir, {"source": "--artifact", "path": str(version_dir)}
    if args.smoke:
        repo = orch.work / "repo" / "tiny"
        spec = {
            "data_path": str(ml100k_dir), "repo": str(repo), "name": TINY_MODEL_NAME,
            "model": TINY_MODEL, "dim": TINY_DIM, "steps": TINY_TRAIN_STEPS,
            "batch": TINY_BATCH, "threads": 2,
        }  # fmt: skip
        how = (
            f"smoke: tiny AutoInt {TINY_MODEL} D={TINY_DIM} on ml100k-ctr features fitted on "
            f"train, {TINY_TRAIN_STEPS} Adam steps of {TINY_BATCH} rows (not a trained model)"
        )
        if not (repo / TINY_MODEL_NAME).is_dir():
            orch.run_worker("tiny-artifact", spec, timeout_s=600)
        return version_dir_of(repo / TINY_MODEL_NAME), {"source": "smoke", "how": how}
    overrides = [
        f"data.path={ml100k_dir}",
        "train.seed=0",
        *args.train_set,
    ]
    key = (
        "default"
        if not args.train_set
        else hashlib.sha1(json.dumps(args.train_set).encode()).hexdigest()[:10]
    )
    repo = orch.work / "repo" / f"trained-{key}"
    overrides += [
        f"output.run_root={orch.work / 'runs'}",
        f"output.model_repo={repo}",
        f"output.run_name=serve_load-{key}",
    ]
    info: dict[str, Any] = {
        "source": "trained by training.jobs.train",
        "config": str(MODEL_CONFIG.relative_to(ROOT)),
        "overrides": overrides,
    }
    if not (repo / TRAINED_MODEL_NAME).is_dir():
        print(f"training the artifact ({MODEL_CONFIG.name}, {overrides}) ...", flush=True)
        out = orch.run_worker(
            "train",
            {"config": str(MODEL_CONFIG), "overrides": overrides},
            timeout_s=3 * 3600,
        )
        info["train_result"] = out["result"]
        info["train_wall_s"] = out["wall_s"]
    return version_dir_of(repo / TRAINED_MODEL_NAME), info


def build_requests(
    version_dir: Path, model_name: str, data_path: Path, rows_list: list[int], out_dir: Path
) -> dict[int, dict[str, Any]]:
    """Serialised generic-rows ScoreRequests per row size, from the shuffled test split."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recsys.features.schema import FeatureSchema
    from serving.client import rows_request

    schema = FeatureSchema.load(version_dir)
    inputs = schema.dataset.input_columns()
    table = pa.concat_tables([pq.read_table(p, columns=inputs) for p in test_files(data_path)])
    table = table.take(np.random.default_rng(REQUEST_SEED).permutation(table.num_rows))
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for rows in rows_list:
        count = max(1, min(MAX_REQUESTS_PER_SIZE, table.num_rows // rows))
        payloads = [
            rows_request(
                model_name, table.slice((i * rows) % table.num_rows, rows)
            ).SerializeToString()
            for i in range(count)
        ]
        path = out_dir / f"rows-{rows}.bin"
        write_payloads(path, payloads)
        files[rows] = {
            "file": str(path),
            "requests": count,
            "mean_bytes": sum(map(len, payloads)) / count,
        }
    return files


def find_knee(points: list[tuple[int, float]]) -> tuple[int, bool]:
    """(concurrency, reached): the last concurrency before rows/s grows by < KNEE_GROWTH; the
    largest one, not reached, when it still grows at the end of the sweep."""
    points = sorted(points)
    for (c, rate), (_, next_rate) in itertools.pairwise(points):
        if next_rate < (1 + KNEE_GROWTH) * rate:
            return c, True
    return points[-1][0], False


def closed_key(rows: int, concurrency: int) -> str:
    return f"closed/rows={rows}/c={concurrency}"


def analyse(doc: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
    """Knee, figures at the knee and errors at or below it, per row size."""
    cells = doc["cells"]
    out: dict[str, Any] = {}
    for rows in plan["rows"]:
        measured = [
            (c, cells[closed_key(rows, c)]) for c in plan["concurrency"]
            if closed_key(rows, c) in cells
        ]  # fmt: skip
        if not measured:
            continue
        knee, reached = find_knee([(c, cell["rows_per_s"]) for c, cell in measured])
        at = dict(measured)[knee]
        server_cores = at["cpu"]["server_cores"]
        loadgen_cores = at["cpu"]["loadgen_cores"]
        out[str(rows)] = {
            "knee_concurrency": knee,
            "knee_reached": reached,
            "qps": at["qps"],
            "rows_per_s": at["rows_per_s"],
            "max_rows_per_s": max(cell["rows_per_s"] for _, cell in measured),
            "latency_ms_at_knee": at["latency_ms"],
            "errors_at_or_below_knee": sum(
                cell["error_count"] for c, cell in measured if c <= knee
            ),
            "errors_above_knee": {
                str(c): cell["errors_total"]
                for c, cell in measured
                if c > knee and cell["errors_total"]
            },
            "server_cores_at_knee": server_cores,
            "loadgen_cores_at_knee": loadgen_cores,
            "client_bound_at_knee": loadgen_cores >= CLIENT_BOUND_CPU
            and loadgen_cores > server_cores,
            "mean_batch_rows_at_knee": at["server_metrics"]["mean_batch_rows"],
        }  # fmt: skip
    return out


def summarise(doc: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
    cells = doc["cells"]
    per_rows = analyse(doc, plan)
    summary: dict[str, Any] = {}
    if per_rows:
        summary["errors_below_knee"] = sum(r["errors_at_or_below_knee"] for r in per_rows.values())
        summary["knee_concurrency"] = {k: r["knee_concurrency"] for k, r in per_rows.items()}
        summary["rows_per_s_at_knee"] = {k: r["rows_per_s"] for k, r in per_rows.items()}
        summary["client_bound_at_knee"] = {
            k: r["client_bound_at_knee"] for k, r in per_rows.items()
        }
        summary["cpu_cores_at_knee"] = {
            k: {"server": r["server_cores_at_knee"], "loadgen": r["loadgen_cores_at_knee"]}
            for k, r in per_rows.items()
        }
    if "1" in per_rows:
        summary["qps_1row_knee"] = per_rows["1"]["qps"]
    if "open/rows=1" in cells:
        open_cell = cells["open/rows=1"]
        summary["p50_ms_1row"] = open_cell["latency_ms"]["p50"]
        summary["p99_ms_1row"] = open_cell["latency_ms"]["p99"]
        summary["open_loop_offered_qps"] = open_cell["offered_qps"]
        summary["open_loop_errors"] = open_cell["error_count"]
    if "ceiling" in cells:
        ceiling = {str(p["rows"]): p for p in cells["ceiling"]["points"]}
        efficiency = {
            k: per_rows[k]["rows_per_s"] / p["rows_per_s"]
            for k, p in ceiling.items()
            if k in per_rows
        }
        summary["efficiency"] = efficiency
        target = str(EFFICIENCY_ROWS) if str(EFFICIENCY_ROWS) in efficiency else None
        if target is None and efficiency:  # smoke: no 64-row cells; the largest size stands in
            target = max(efficiency, key=int)
        if target is not None:
            summary["efficiency_at_64_rows"] = efficiency[target]
            summary["efficiency_measured_at_rows"] = int(target)
            summary["ceiling_rows_per_s"] = ceiling[target]["rows_per_s"]
            summary["ceiling_batch_rows"] = ceiling[target]["batch_rows"]
            summary["served_rows_per_s"] = per_rows[target]["rows_per_s"]
    if "quant/ml100k" in cells:
        q = cells["quant/ml100k"]
        task = next(iter(q["fp32"]["test_auc"]))
        summary["fp32_test_auc"] = q["fp32"]["test_auc"][task]
        for dtype in ("int8", "int4"):
            summary[f"{dtype}_test_auc_delta"] = q[dtype]["test_auc_delta"][task]
            summary[f"{dtype}_embedding_bytes_ratio"] = q[dtype]["embedding_bytes_ratio"]
    if "quant/synthetic" in cells:
        q = cells["quant/synthetic"]
        task = next(iter(q["fp32"]["test_auc"]))
        summary["synthetic_table_rows"] = q["table_rows"]
        summary["synthetic_fp32_test_auc"] = q["fp32"]["test_auc"][task]
        for dtype in ("int8", "int4"):
            summary[f"synthetic_{dtype}_test_auc_delta"] = q[dtype]["test_auc_delta"][task]
            summary[f"synthetic_{dtype}_embedding_bytes_ratio"] = q[dtype]["embedding_bytes_ratio"]
    targets = {}
    if "efficiency_at_64_rows" in summary:
        targets["efficiency_at_64_rows>=0.6"] = (
            summary["efficiency_at_64_rows"] >= EFFICIENCY_TARGET
        )
    if "errors_below_knee" in summary:
        targets["errors_below_knee==0"] = summary["errors_below_knee"] == 0
    if "int8_test_auc_delta" in summary:
        targets["|int8_test_auc_delta|<=0.001"] = (
            abs(summary["int8_test_auc_delta"]) <= INT8_AUC_DELTA_TARGET
        )
        targets["int8_embedding_bytes_ratio<=0.55"] = (
            summary["int8_embedding_bytes_ratio"] <= INT8_BYTES_RATIO_TARGET
        )
    summary["targets_met"] = targets
    return summary


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return format(value, spec)


def print_table(doc: dict[str, Any], plan: dict[str, Any]) -> None:
    cells = doc["cells"]
    per_rows = analyse(doc, plan)
    print(
        f"\nclosed loop (server on CPU {doc.get('pinning', {}).get('server_cpu')}, load "
        f"generator on CPU {doc.get('pinning', {}).get('loadgen_cpu')}); * = knee"
    )
    header = (
        f"{'rows':>5} {'conc':>5} {'QPS':>9} {'rows/s':>10} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'p99 ms':>8} {'errors':>7} {'srv CPU':>8} {'gen CPU':>8} {'batch':>6}"
    )
    print(header)
    print("-" * len(header))
    for rows in plan["rows"]:
        knee = per_rows.get(str(rows), {}).get("knee_concurrency")
        for c in plan["concurrency"]:
            cell = cells.get(closed_key(rows, c))
            if cell is None:
                continue
            lat = cell["latency_ms"]
            mark = "*" if c == knee else " "
            print(
                f"{rows:>5} {c:>4}{mark} {cell['qps']:>9.0f} {cell['rows_per_s']:>10.0f} "
                f"{_fmt(lat['p50'], '.2f'):>8} {_fmt(lat['p95'], '.2f'):>8} "
                f"{_fmt(lat['p99'], '.2f'):>8} {cell['error_count']:>7} "
                f"{cell['cpu']['server_cores']:>8.2f} {cell['cpu']['loadgen_cores']:>8.2f} "
                f"{_fmt(cell['server_metrics']['mean_batch_rows']):>6}"
            )
    if "open/rows=1" in cells:
        o = cells["open/rows=1"]
        print(
            f"\nopen loop, 1 row: offered {o['offered_qps']:.0f} QPS (half the knee), got "
            f"{o['qps']:.0f} OK/s; latency from scheduled send p50 "
            f"{_fmt(o['latency_ms']['p50'], '.2f')} ms, p99 {_fmt(o['latency_ms']['p99'], '.2f')}"
            f" ms; errors {o['error_count']}; send lag p99 "
            f"{_fmt(o['send_lag_ms']['p99'], '.2f')} ms"
        )
    if "ceiling" in cells:
        print("\nceiling (in-process, same core, 1 thread, server's request path):")
        for p in cells["ceiling"]["points"]:
            served = per_rows.get(str(p["rows"]), {}).get("rows_per_s")
            eff = served / p["rows_per_s"] if served else None
            print(
                f"  {p['rows']:>4} rows/request x {p['requests_per_batch']} per batch "
                f"({p['batch_rows']} rows, server formed {_fmt(p['server_mean_batch_rows'])}): "
                f"{p['rows_per_s']:,.0f} rows/s (forward alone "
                f"{p['forward_only_rows_per_s']:,.0f}); served {_fmt(served, ',.0f')} -> "
                f"efficiency {_fmt(eff, '.2f')}"
            )
    for key, label in (("quant/ml100k", "ml100k-ctr"), ("quant/synthetic", "synthetic")):
        if key not in cells:
            continue
        q = cells[key]
        task = next(iter(q["fp32"]["test_auc"]))
        print(
            f"\ntables, {label} ({q['table_rows']:,} rows): fp32 test AUC "
            f"{q['fp32']['test_auc'][task]:.4f}, {q['fp32']['embedding_bytes']:,} bytes"
        )
        for dtype in ("int8", "int4"):
            d = q[dtype]
            print(
                f"  {dtype}: AUC delta {d['test_auc_delta'][task]:+.5f}, bytes ratio "
                f"{d['embedding_bytes_ratio']:.3f} ({d['embedding_bytes']:,} bytes, "
                f"{'/'.join(d['served_weight_dtypes'])}), max |p diff| "
                f"{d['max_abs_prob_diff'][task]:.2e}"
            )


PROTOCOL = (
    "closed loop: N workers on one grpc.aio channel each send the next request as soon as the "
    "previous answers; a request counts when it completes in the window after the warm-up; QPS "
    "and rows/s count OK answers. Knee: the last concurrency before rows/s grows by < "
    f"{KNEE_GROWTH:.0%}; errors_below_knee counts every non-OK answer (warm-up and drain "
    "included) in the cells at or below each row size's knee. Open loop: Poisson arrivals at "
    "half the 1-row knee's QPS, latency from the scheduled send time. Ceiling: the served model "
    "in-process on the server's core, one thread, through the server's request path (parsed "
    "request -> RequestConverter.encode -> concat -> serving.batcher.forward) at the batch size "
    "the micro-batcher formed at the knee; efficiency = served rows/s at the knee / ceiling "
    "rows/s"
)
PARTS = ("int8", "synthetic", "sweep", "open", "ceiling")


class Run:
    """One invocation of the benchmark: plan, saved document, artifact, phases."""

    def __init__(self, args: argparse.Namespace) -> None:
        from recsys.data.movielens import default_data_dir, prepare_ml100k_ctr

        self.args = args
        self.started = time.perf_counter()
        plan = dict(SMOKE_PLAN if args.smoke else FULL_PLAN)
        if args.rows:
            plan["rows"] = [int(x) for x in args.rows.split(",")]
        if args.concurrency:
            plan["concurrency"] = sorted(int(x) for x in args.concurrency.split(","))
        for key, value in (
            ("duration_s", args.duration_s),
            ("warmup_s", args.warmup_s),
            ("open_loop_s", args.open_loop_s),
        ):
            if value is not None:
                plan[key] = value
        self.plan = plan
        self.restricted = bool(args.rows or args.concurrency or args.only)
        self.parts = set(args.only or PARTS)
        self.data_root = (args.data_dir or default_data_dir()).resolve()
        self.ml100k_dir = self.data_root / "ml100k-ctr"
        prepare_ml100k_ctr(self.ml100k_dir, data_dir=self.data_root, show_progress=True)
        self.work = (args.work_dir or args.output.parent / f".{args.output.stem}_work").resolve()
        self.orch = Orchestrator(args, self.work)
        # a smoke run always starts over
        self.doc: dict[str, Any] = saved_doc(args.output, args.fresh, args.smoke)
        self.doc["timings_s_this_run"] = {}
        self.failures: list[str] = []

    @property
    def cells(self) -> dict[str, Any]:
        return dict(self.doc["cells"])

    def save(self) -> None:
        self.doc.update(
            {
                "benchmark": "serve_load",
                "task": "ml100k-ctr",
                "smoke": self.args.smoke,
                "restricted_run": self.restricted,
                "git_sha": git_sha(),
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "machine": machine(),
                "plan": self.plan,
                "protocol": PROTOCOL,
                "analysis": analyse(self.doc, self.plan),
                "summary": summarise(self.doc, self.plan),
                "failures_this_run": self.failures,
            }
        )
        out = self.args.output
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".partial.json")
        tmp.write_text(json.dumps(self.doc, indent=2))
        tmp.replace(out)

    def timed(self, name: str, started: float) -> None:
        self.doc["timings_s_this_run"][name] = round(time.perf_counter() - started, 2)

    def estimate(self) -> None:
        plan = self.plan
        cells = len(plan["rows"]) * len(plan["concurrency"]) if "sweep" in self.parts else 0
        load_s = cells * (plan["warmup_s"] + plan["duration_s"] + 2.5)
        if "open" in self.parts:
            load_s += plan["open_loop_warmup_s"] + plan["open_loop_s"] + 3
        print(
            f"serve_load: {cells} closed-loop cells ({plan['rows']} rows x "
            f"{plan['concurrency']} concurrency, {plan['warmup_s']}+{plan['duration_s']} s each):"
            f" about {load_s / 60:.1f} min of load, plus artifacts and the ceiling",
            flush=True,
        )

    # --- phases ------------------------------------------------------------------------------
    def prepare_artifact(self) -> None:
        started = time.perf_counter()
        version_dir, info = ensure_artifact(self.args, self.orch, self.ml100k_dir)
        manifest = json.loads((version_dir / "manifest.json").read_text())
        config = json.loads((version_dir / "config.json").read_text())
        metrics = json.loads((version_dir / "metrics.json").read_text())
        self.version_dir = version_dir
        self.model_config = config["model"]
        self.artifact_id = manifest["files"]["model.safetensors"]
        self.model_name = manifest["name"]
        recorded = metrics.get("data", {}).get("path")
        self.data_path = Path(recorded) if recorded and Path(recorded).is_dir() else self.ml100k_dir
        if self.doc.get("artifact", {}).get("id") not in (None, self.artifact_id):
            print("saved cells were measured on another artifact; starting over", flush=True)
            self.doc["cells"] = {}
        self.doc["artifact"] = {
            **info,
            "path": str(version_dir),
            "id": self.artifact_id,
            "name": self.model_name,
            "created_at": manifest.get("created_at"),
            "model": config["model"],
            "embedding": config["embedding"],
            "table_rows": sum(shape[0] for shape in config["tables"].values()),
            "test_metrics_at_export": metrics.get("test"),
            "request_and_test_data": str(self.data_path),
        }
        self.timed("artifact", started)
        self.save()

    def quantized_tables(self) -> None:
        """Before the server starts: both cores are free and nothing is being timed. A failure
        here is recorded and the load phases still run (the exit code is then 1)."""
        from recsys.data.synthetic import GENERATOR_VERSION

        if "int8" in self.parts:
            spec = {
                "artifact": str(self.version_dir),
                "test_files": [str(p) for p in test_files(self.data_path)],
                "threads": 2,
            }
            self.quant_cell("quant/ml100k", "quant-ml100k", spec, "the ml100k-ctr test split")
        if "synthetic" in self.parts:
            rows = SMOKE_SYNTHETIC_ROWS if self.args.smoke else SYNTHETIC_ROWS
            spec = {
                "data_path": str(
                    self.data_root / f"synthetic-ctr-{rows}-seed0-v{GENERATOR_VERSION}"
                ),
                "rows": rows,
                "repo": str(self.work / "repo" / "synthetic"),
                "model": self.model_config,
                "dim": 16,
                "batch": SMOKE_SYNTHETIC_BATCH if self.args.smoke else SYNTHETIC_BATCH,
                "max_steps": SYNTHETIC_MAX_STEPS,
                "test_rows": SYNTHETIC_TEST_ROWS,
                "threads": 2,
            }
            what = f"a synthetic model ({rows:,} data rows)"
            self.quant_cell("quant/synthetic", "quant-synthetic", spec, what)

    def quant_cell(self, key: str, kind: str, spec: dict[str, Any], what: str) -> None:
        saved = {**spec, "artifact_id": self.artifact_id}
        if self.doc["cells"].get(key, {}).get("spec") == saved:
            return
        started = time.perf_counter()
        print(f"int8/int4 tables on {what} ...", flush=True)
        try:
            result = self.orch.run_worker(kind, spec, timeout_s=3600)
        except BenchmarkError as e:
            self.failures.append(f"{key}: {e}")
            print(f"serve_load: {key} failed ({e}); going on with the load phases", flush=True)
            return
        self.doc["cells"][key] = {**result, "spec": saved}
        self.timed(key.replace("/", "_"), started)
        self.save()

    def load(self) -> None:
        """The closed-loop sweep, then the open loop, against one server process."""
        plan = self.plan
        self.requests = build_requests(
            self.version_dir,
            self.model_name,
            self.data_path,
            sorted(set(plan["rows"]) | {1}),
            self.work / "requests",
        )
        self.doc["requests"] = {
            str(r): {k: v for k, v in info.items() if k != "file"}
            for r, info in self.requests.items()
        }
        base = {
            "artifact_id": self.artifact_id,
            "warmup_s": plan["warmup_s"],
            "duration_s": plan["duration_s"],
            "server_flags": SERVER_FLAGS,
            "timeout_s": CALL_TIMEOUT_S,
        }
        todo = []
        if "sweep" in self.parts:
            for rows in plan["rows"]:
                for c in plan["concurrency"]:
                    spec = {**base, "rows": rows, "concurrency": c}
                    if self.doc["cells"].get(closed_key(rows, c), {}).get("spec") != spec:
                        todo.append((closed_key(rows, c), spec))
        self.server: Server | None = None
        try:
            started = time.perf_counter()
            for key, spec in todo:
                result = self.load_cell(key, {**spec, "mode": "closed"})
                lat = result["latency_ms"]
                print(
                    f"{key}: {result['qps']:,.0f} QPS, {result['rows_per_s']:,.0f} rows/s, p50 "
                    f"{_fmt(lat['p50'], '.2f')} ms, p99 {_fmt(lat['p99'], '.2f')} ms, errors "
                    f"{result['error_count']}, CPU server {result['cpu']['server_cores']:.2f} "
                    f"gen {result['cpu']['loadgen_cores']:.2f}, mean batch "
                    f"{_fmt(result['server_metrics']['mean_batch_rows'])} rows",
                    flush=True,
                )
            if todo:
                self.timed("sweep", started)
            per_rows = analyse(self.doc, plan)
            if "open" in self.parts and per_rows.get("1", {}).get("qps"):
                started = time.perf_counter()
                rate = per_rows["1"]["qps"] / 2
                spec = {
                    **base,
                    "warmup_s": plan["open_loop_warmup_s"],
                    "duration_s": plan["open_loop_s"],
                    "rows": 1,
                    "rate": rate,
                    "seed": OPEN_LOOP_SEED,
                }
                if self.doc["cells"].get("open/rows=1", {}).get("spec") != spec:
                    result = self.load_cell("open/rows=1", {**spec, "mode": "open"})
                    print(
                        f"open/rows=1 at {rate:,.0f} QPS: p50 "
                        f"{_fmt(result['latency_ms']['p50'], '.2f')} ms, p99 "
                        f"{_fmt(result['latency_ms']['p99'], '.2f')} ms, errors "
                        f"{result['error_count']}",
                        flush=True,
                    )
                    self.timed("open_loop", started)
        finally:
            if self.server is not None:
                self.stop_server()

    def load_cell(self, key: str, spec: dict[str, Any]) -> dict[str, Any]:
        if self.server is None:
            self.start_server()
        assert self.server is not None
        load_before = load_average()
        cell_spec = {k: v for k, v in spec.items() if k != "mode"}
        result = self.orch.run_worker(
            "loadgen",
            {
                **spec,
                "address": self.server.address,
                "metrics_url": self.server.metrics_url,
                "server_pid": self.server.pid,
                "requests_file": self.requests[spec["rows"]]["file"],
            },
            timeout_s=spec["warmup_s"] + spec["duration_s"] + CALL_TIMEOUT_S + 60,
            cpu=self.orch.loadgen_cpu,
            single_thread=True,
        )
        self.doc["cells"][key] = {
            **result,
            "spec": cell_spec,
            "load_average_1min": {"before": load_before, "after": load_average()},
        }
        self.save()
        return result

    def start_server(self) -> None:
        """Serves only the artifact (a repository of one symlinked version) on the server's
        core; this process moves to the load generator's core while the server runs."""
        started = time.perf_counter()
        orch = self.orch
        repo = self.work / "serve_repo"
        shutil.rmtree(repo, ignore_errors=True)
        name = self.version_dir.name
        version = int(name) if name.isdigit() else 1
        (repo / self.model_name).mkdir(parents=True)
        (repo / self.model_name / str(version)).symlink_to(
            self.version_dir, target_is_directory=True
        )
        os.sched_setaffinity(0, {orch.loadgen_cpu})  # before any grpc channel starts threads
        print(f"starting the server on CPU {orch.server_cpu} ...", flush=True)
        server = Server(repo, self.model_name, orch.server_cpu, self.work / "server.log")
        self.server = server
        self.doc["pinning"] = {
            "server_cpu": orch.server_cpu,
            "loadgen_cpu": orch.loadgen_cpu,
            "server_affinity_observed": server.affinity,
            "how": (
                "os.sched_setaffinity: in a trampoline that then execs the server, at the start "
                "of each load-generator and ceiling process; OMP/MKL/OpenBLAS threads 1"
            ),
        }
        self.doc["server"] = {
            "command": ["python", *server.command[4:]],
            "address": server.address,
            "metrics": server.metrics_url,
            "ready_s": server.ready_s,
            "rss_mb_at_start": rss_mb(server.pid),
            "env": SINGLE_THREAD_ENV,
            "batching": (
                "server defaults: max_batch_rows 256, max_wait_ms 2, max_queue_rows 8192, "
                "num_scoring_threads 1"
            ),
        }
        self.timed("server_start", started)
        print(
            f"server {server.address} (metrics {server.metrics_url}) SERVING after "
            f"{server.ready_s:.1f}s, affinity {server.affinity}",
            flush=True,
        )

    def stop_server(self) -> None:
        assert self.server is not None
        server, self.server = self.server, None
        self.doc["server"]["rss_mb_at_end"] = rss_mb(server.pid)
        self.doc["server"]["exit_code"] = server.stop()
        self.doc["server"]["log_warnings_or_errors"] = sum(
            " WARNING " in line or " ERROR " in line
            for line in server.log_path.read_text().splitlines()
        )
        os.sched_setaffinity(0, self.orch.original_affinity)
        self.save()

    def ceiling(self) -> None:
        """After the server stopped: its core, one thread, the batch sizes it formed."""
        per_rows = analyse(self.doc, self.plan)
        if "ceiling" not in self.parts or not per_rows:
            return
        points = []
        for rows_key, figures in sorted(per_rows.items(), key=lambda kv: int(kv[0])):
            rows = int(rows_key)
            formed = figures["mean_batch_rows_at_knee"]
            points.append(
                {
                    "rows": rows,
                    "requests_per_batch": max(1, round((formed or rows) / rows)),
                    "server_mean_batch_rows": formed,
                    "requests_file": self.requests[rows]["file"],
                }
            )
        spec = {
            "artifact": str(self.version_dir),
            "points": points,
            "reps": self.plan["ceiling_reps"],
            "rep_s": self.plan["ceiling_rep_s"],
            "warmup_s": 0.2 if self.args.smoke else 0.5,
            "max_rows": 4096,
        }
        saved = {**spec, "artifact_id": self.artifact_id}
        if self.doc["cells"].get("ceiling", {}).get("spec") == saved:
            return
        started = time.perf_counter()
        print(
            f"ceiling on CPU {self.orch.server_cpu} at "
            f"{[(p['rows'], p['requests_per_batch']) for p in points]} "
            "(rows per request, requests per batch) ...",
            flush=True,
        )
        result = self.orch.run_worker(
            "ceiling", spec, timeout_s=1800, cpu=self.orch.server_cpu, single_thread=True
        )
        self.doc["cells"]["ceiling"] = {**result, "spec": saved}
        self.timed("ceiling", started)
        self.save()

    def finish(self) -> int:
        self.doc["wall_s_this_run"] = time.perf_counter() - self.started
        self.save()
        print_table(self.doc, self.plan)
        summary = self.doc["summary"]
        print(json.dumps(summary, indent=2))
        missing = [k for k in SUMMARY_KEYS if k not in summary]
        print(f"wrote {self.args.output} in {self.doc['wall_s_this_run']:.0f}s")
        for failure in self.failures:
            print(f"serve_load: {failure}", file=sys.stderr)
        if self.failures:
            return 1
        if missing and not self.restricted:
            print(f"serve_load: summary lacks {missing}", file=sys.stderr)
            return 1
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny artifact, concurrency 1 and 4, 1 and 16 rows, 1 s cells; checks keys (< 2 min)",
    )
    parser.add_argument("--fresh", action="store_true", help="ignore saved cells")
    parser.add_argument("--artifact", type=Path, default=None, help="serve this artifact")
    parser.add_argument("--data-dir", type=Path, default=None, help="dataset cache")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="artifacts, requests, logs (default: beside the output file)",
    )
    parser.add_argument(
        "--train-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override of the artifact's training config (cached as a separate artifact)",
    )
    parser.add_argument("--rows", type=str, default=None, help="row sizes, e.g. 1,64")
    parser.add_argument("--concurrency", type=str, default=None, help="e.g. 1,4,16")
    parser.add_argument("--duration-s", type=float, default=None, help="measured window per cell")
    parser.add_argument("--warmup-s", type=float, default=None, help="warm-up per cell")
    parser.add_argument("--open-loop-s", type=float, default=None, help="open-loop window")
    parser.add_argument(
        "--only", action="append", choices=PARTS, default=None, help="run just these parts"
    )
    # internal: one worker, in its own process
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args)

    run = Run(args)
    run.estimate()
    try:
        run.prepare_artifact()
        run.quantized_tables()
        run.load()
        run.ceiling()
    except BenchmarkError as e:
        run.save()
        print(f"serve_load: {e}", file=sys.stderr)
        return 1
    return run.finish()


if __name__ == "__main__":
    sys.exit(main())
