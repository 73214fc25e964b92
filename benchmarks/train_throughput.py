"""Training throughput: our AutoInt (Ray Train, sharded TorchRec tables) against DeepCTR-Torch's.

Cells, each saved to the JSON as soon as it finishes and skipped when the script is run again
(`--fresh` starts over):

  ours/ml100k-ctr/1w, ours/ml100k-ctr/2w   AutoInt on ml100k-ctr at the PEER's configuration
        (embedding 16, 3 layers, 2 heads of width 8, paper variant, no dropout, 1024 rows per
        step in all), 1 and 2 Ray workers of 1 thread each, a fixed number of epochs
  ours/synthetic-ctr-1m/2w                 the same model on 1M synthetic-ctr rows, 2 workers
  peer/deepctr-torch/autoint               DeepCTR-Torch 0.3.0's AutoInt on the same ml100k-ctr
        split files and features, with the total thread count of our 2-worker run, in its own
        virtualenv (benchmarks/.venvs/deepctr, created on first use; the project never imports
        the peer), through benchmarks/peers/deepctr_autoint.py

The three ml100k-ctr cells run in ROUNDS interleaved rounds (1w, 2w, peer, then again; later
rounds are named `<cell>@round<N>`): this machine is shared and its speed drifts by a quarter
between minutes, so the summary gives each cell's median over rounds and the ratio to the peer
as the median of the per-round ratios (both runs of a round saw the same machine).

Steady-state samples/s = train rows / median epoch time over the epochs after the first (data
already materialised); end to end = wall time of the whole `train(cfg)` call (Ray start-up,
feature fitting, encoding, training, export and the parity check). Each of our cells runs in a
fresh subprocess, so every end-to-end time includes starting Ray; a thread samples the RSS of
that process tree every 0.5 s.

Quality is compared at OUR configuration (configs/autoint_ml100k.yaml, benchmarks/
model_quality.py); this file records that configuration beside the peer's.

    python benchmarks/train_throughput.py                 # full run (see the docstring's end)
    python benchmarks/train_throughput.py --smoke --output /tmp/tt.json   # plumbing check

`--smoke`: ml100k-ctr for 1 epoch with 1 worker only (it stands in for the 2-worker figures),
a 20k-row synthetic set instead of 1M, and the peer for 1 epoch on 1 thread; it still creates
the peer's virtualenv when it is missing and fails (never skips) when that is impossible; it
ignores saved cells. About 2-3 minutes on 2 cores (plus a minute the first time, for the
virtualenv).
Full run: about 10-15 minutes on a quiet 2-core machine (the 1M-row synthetic cell is most of
it). Run it on a quiet machine: each cell records the load average, and a busy machine ruins
the peer's 2-thread timing in particular (OpenMP threads spin waiting for a core).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import git_sha, machine, saved_doc  # benchmarks/ is the script folder on sys.path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "train_throughput.json"
BASE_CONFIG = ROOT / "configs" / "autoint_ml100k.yaml"
PEER_SCRIPT = ROOT / "benchmarks" / "peers" / "deepctr_autoint.py"
PEER_VENV = ROOT / "benchmarks" / ".venvs" / "deepctr"
PEER_PACKAGE = "deepctr-torch==0.3.0"
# torch first and pinned in every later install: otherwise pip pulls a multi-GB CUDA build
# (DESIGN.md, pitfalls). The CPU wheel lies on disk; the machine's pip config finds it.
PEER_TORCH = "torch==2.13.0"
# requests: deepctr_torch imports it (for a version check at import) without declaring it.
PEER_EXTRAS = ("scikit-learn", "pandas", "pyarrow", "tqdm", "requests")

FULL_EPOCHS = 4
ROUNDS = 3  # interleaved rounds of the ml100k-ctr cells (1 in smoke mode)
SYNTHETIC_EPOCHS = 2
SYNTHETIC_ROWS = 1_000_000
SMOKE_SYNTHETIC_ROWS = 20_000
GLOBAL_BATCH = 1024
THREADS_PER_WORKER = 1
CPUS_PER_WORKER = 0.5
RSS_INTERVAL_S = 0.5

# The peer's configuration (BENCHMARKS.md): speed is compared at this point for both.
PEER_CONFIG_OVERRIDES = [
    "model.name=autoint",
    "model.num_layers=3",
    "model.num_heads=2",
    "model.attention_dim=16",  # 2 heads of width 8
    "model.variant=paper",
    "model.use_scale=false",
    "model.use_residual=true",
    "model.attention_dropout=0.0",
    "model.dnn_hidden_units=[]",
    "model.dnn_dropout=0.0",
    "embedding.dim=16",
    "train.dense_lr=0.001",
]

ML100K_1W = "ours/ml100k-ctr/1w"
ML100K_2W = "ours/ml100k-ctr/2w"
SYNTH_2W = "ours/synthetic-ctr-1m/2w"
PEER = "peer/deepctr-torch/autoint"
SUMMARY_KEYS = (
    "autoint_samples_per_s_1w",
    "autoint_samples_per_s_2w",
    "peer_autoint_samples_per_s",
    "autoint_end_to_end_s_2w",
    "synthetic_1m_samples_per_s_2w",
    "synthetic_1m_peak_rss_mb",
    "ratio_2w_vs_peer",
)
# In smoke mode the 1-worker run stands in for the 2-worker figures (one short run only).
SMOKE_STAND_INS = {ML100K_2W: ML100K_1W}


class BenchmarkError(RuntimeError):
    """A cell could not run; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# Plan: what each cell runs.
# ---------------------------------------------------------------------------------------------


def plan_cells(smoke: bool, ml100k_dir: Path, synthetic_dir: Path) -> dict[str, dict[str, Any]]:
    """Cell name -> spec (everything that decides its figures; a saved cell whose spec differs
    is run again)."""
    epochs = 1 if smoke else FULL_EPOCHS
    cells: dict[str, dict[str, Any]] = {
        ML100K_1W: {
            "kind": "ours",
            "dataset": "ml100k-ctr",
            "data_path": str(ml100k_dir),
            "num_workers": 1,
            "epochs": epochs,
        },
    }
    if not smoke:
        cells[ML100K_2W] = {**cells[ML100K_1W], "num_workers": 2}
    cells[PEER] = {
        "kind": "peer",
        "dataset": "ml100k-ctr",
        "data_path": str(ml100k_dir),
        "epochs": epochs,
        # the total thread count of our 2-worker run (smoke: 1, which keeps the plumbing check
        # fast on a busy machine, where 2 OpenMP threads on 2 shared cores crawl)
        "threads": 1 if smoke else 2 * THREADS_PER_WORKER,
        "batch_size": GLOBAL_BATCH,
        "package": PEER_PACKAGE,
    }
    for round_ in range(2, 1 + (1 if smoke else ROUNDS)):
        for name in (ML100K_1W, ML100K_2W, PEER):
            cells[round_name(name, round_)] = {**cells[name], "round": round_}
    cells[SYNTH_2W] = {
        "kind": "ours",
        "dataset": "synthetic-ctr",
        "data_path": str(synthetic_dir),
        "rows": SMOKE_SYNTHETIC_ROWS if smoke else SYNTHETIC_ROWS,
        "num_workers": 1 if smoke else 2,
        "epochs": 1 if smoke else SYNTHETIC_EPOCHS,
    }
    return cells


def round_name(cell: str, round_: int) -> str:
    """The name of `cell`'s run in round `round_` (round 1 keeps the plain name)."""
    return cell if round_ == 1 else f"{cell}@round{round_}"


def rounds_of(cells: dict[str, Any], cell: str) -> list[dict[str, Any]]:
    """Every saved round of `cell`, round 1 first."""
    found, round_ = [], 1
    while (name := round_name(cell, round_)) in cells:
        found.append(cells[name])
        round_ += 1
    return found


def our_overrides(spec: dict[str, Any], work: Path, run_name: str) -> list[str]:
    workers = int(spec["num_workers"])
    if GLOBAL_BATCH % workers:
        raise BenchmarkError(f"global batch {GLOBAL_BATCH} does not split over {workers} workers")
    return [
        *PEER_CONFIG_OVERRIDES,
        f"data.dataset={spec['dataset']}",
        f"data.path={spec['data_path']}",
        f"train.batch_size={GLOBAL_BATCH // workers}",  # per worker: 1024 rows per step in all
        f"train.max_epochs={spec['epochs']}",
        f"train.patience={spec['epochs'] + 100}",  # never stops early: a fixed epoch count
        "train.lr_decay_on_plateau=1.0",
        "train.seed=0",
        f"ray.num_workers={workers}",
        f"ray.threads_per_worker={THREADS_PER_WORKER}",
        f"ray.cpus_per_worker={CPUS_PER_WORKER}",
        f"output.model_name=throughput_{spec['dataset'].replace('-', '_')}",
        f"output.run_root={work / 'runs'}",
        f"output.model_repo={work / 'repo'}",
        f"output.run_name={run_name}",
    ]


# ---------------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------------


def train_rows(data_path: Path) -> int:
    """Rows of the train split (`train.parquet` or `train/*.parquet`), from Parquet metadata."""
    import pyarrow.parquet as pq

    from training.data import split_files

    return sum(pq.ParquetFile(p).metadata.num_rows for p in split_files(data_path, "train"))


def ensure_synthetic(out_dir: Path, rows: int) -> Path:
    """Generates synthetic-ctr once into a cache folder (atomically: a temp folder renamed)."""
    from recsys.data.synthetic import SyntheticInfo, generate_synthetic_ctr

    info_file = out_dir / "info.json"
    if info_file.exists() and SyntheticInfo.from_json(info_file).num_rows == rows:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    started = time.perf_counter()
    print(f"generating synthetic-ctr ({rows:,} rows) into {out_dir} ...", flush=True)
    generate_synthetic_ctr(tmp, num_rows=rows, seed=0, vocab_scale=1.0, show_progress=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    print(f"synthetic-ctr ready in {time.perf_counter() - started:.0f}s", flush=True)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Our cells: one subprocess each (fresh Ray), RSS sampled over its process tree.
# ---------------------------------------------------------------------------------------------

_EVAL_LINE = re.compile(r"\beval\s+(epoch=\d+\b.*)$")
_PAIR = re.compile(r"(\w+)=(\S+)")


def parse_eval_lines(lines: list[str]) -> list[dict[str, Any]]:
    """Per-epoch `eval  epoch=N key=value ...` lines of train.log, one per epoch (the last one
    wins, should a resumed run repeat an epoch), ordered by epoch. Unknown keys are kept,
    values that are not numbers stay strings."""
    epochs: dict[int, dict[str, Any]] = {}
    for line in lines:
        match = _EVAL_LINE.search(line)
        if not match:
            continue
        record: dict[str, Any] = {}
        for key, raw in _PAIR.findall(match.group(1)):
            try:
                record[key] = int(raw) if re.fullmatch(r"-?\d+", raw) else float(raw)
            except ValueError:
                record[key] = raw
        if isinstance(record.get("epoch"), int):
            epochs[record["epoch"]] = record
    return [epochs[e] for e in sorted(epochs)]


def steady_state(per_epoch_s: list[float], rows: int) -> dict[str, Any]:
    """samples/s = rows / median epoch time over the epochs after the first (the only epoch
    when there is one: then it is not steady state, and says so)."""
    if not per_epoch_s:
        raise BenchmarkError("no epoch times to summarise")
    after_first = per_epoch_s[1:]
    median_s = statistics.median(after_first or per_epoch_s)
    return {
        "median_epoch_s": median_s,
        "samples_per_s": rows / median_s,
        "steady_state": bool(after_first),
        "epochs_in_median": len(after_first or per_epoch_s),
    }


def find_log(run_dir: Path) -> Path | None:
    direct = run_dir / "train.log"
    if direct.exists():
        return direct
    found = sorted(run_dir.rglob("train.log"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def run_our_cell_here(spec: dict[str, Any], work: Path, run_name: str) -> dict[str, Any]:
    """Inside the cell's subprocess: one `train(cfg)` call, timed whole."""
    from training.config import load_config
    from training.jobs import train

    cfg = load_config(BASE_CONFIG, our_overrides(spec, work, run_name))
    started = time.perf_counter()
    result = train(cfg)
    end_to_end_s = time.perf_counter() - started
    return {
        "config": cfg.model_dump(mode="json"),
        "result": result,
        "end_to_end_s": end_to_end_s,
    }


def _process_tree(root_pid: int) -> list[Any]:
    psutil = import_psutil()
    try:
        root = psutil.Process(root_pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def import_psutil() -> Any:
    import importlib

    try:
        return importlib.import_module("psutil")
    except ImportError:
        # the project has it through Ray's vendored copy: importing ray puts
        # ray/thirdparty_files on sys.path
        importlib.import_module("ray")
        return importlib.import_module("psutil")


class RssSampler:
    """Samples the RSS of a process and all its descendants every `interval` seconds."""

    def __init__(self, pid: int, interval: float = RSS_INTERVAL_S) -> None:
        self.pid, self.interval = pid, interval
        self.peak_tree_mb = 0.0
        self.peak_process_mb = 0.0
        self.peak_process_name = ""
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        psutil = import_psutil()
        while not self._stop.is_set():
            total = 0.0
            for proc in _process_tree(self.pid):
                try:
                    rss = proc.memory_info().rss / 2**20
                    name = proc.name()
                except psutil.Error:
                    continue
                total += rss
                if rss > self.peak_process_mb:
                    self.peak_process_mb, self.peak_process_name = rss, name
            self.peak_tree_mb = max(self.peak_tree_mb, total)
            self.samples += 1
            self._stop.wait(self.interval)

    def report(self) -> dict[str, Any]:
        return {
            "peak_rss_tree_mb": self.peak_tree_mb,
            "peak_rss_one_process_mb": self.peak_process_mb,
            "peak_rss_one_process": self.peak_process_name,
            "rss_samples": self.samples,
            "rss_interval_s": self.interval,
            "rss_note": "sum of RSS over the cell's process tree (driver, Ray's processes and "
            "workers; shared pages counted in every process that maps them)",
        }


def kill_tree(proc: subprocess.Popen[Any]) -> None:
    """Ends a cell's subprocess and what it started (Ray's processes), children first."""
    psutil = import_psutil()
    for child in reversed(_process_tree(proc.pid)[1:]):
        with contextlib.suppress(psutil.Error):
            child.kill()
    proc.kill()
    proc.wait()


def run_our_cell(name: str, spec: dict[str, Any], work: Path, timeout_s: float) -> dict[str, Any]:
    """Runs one of our cells in a subprocess (fresh Ray, so end to end includes its start)."""
    run_name = f"{name.replace('/', '_').replace('@', '-')}-{int(time.time())}"
    out_file = work / f"{run_name}.cell.json"
    work.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--run-cell",
        json.dumps(spec),
        "--work-dir",
        str(work),
        "--run-name",
        run_name,
        "--cell-output",
        str(out_file),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    with RssSampler(proc.pid) as sampler:
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            raise BenchmarkError(
                f"{name}: the training run took longer than {timeout_s:.0f}s and was stopped"
            ) from None
    process_s = time.perf_counter() - started
    if code != 0 or not out_file.exists():
        raise BenchmarkError(f"{name}: the training subprocess failed (exit code {code})")
    cell = json.loads(out_file.read_text())
    run_dir = work / "runs" / run_name
    log_file = find_log(run_dir)
    log_lines = log_file.read_text().splitlines() if log_file else []
    epochs = parse_eval_lines(log_lines)
    if not epochs or not all(isinstance(e.get("train_s"), int | float) for e in epochs):
        raise BenchmarkError(
            f"{name}: found no `eval  epoch=N ... train_s=...` lines in "
            f"{log_file or run_dir / 'train.log'}; cannot time the epochs"
        )
    rows = train_rows(Path(spec["data_path"]))
    per_epoch_s = [float(e["train_s"]) for e in epochs]
    result = cell["result"]
    rss = sampler.report()
    reported_rss = result.get("peak_rss_mb")
    return {
        "name": name,
        "spec": spec,
        "train_rows": rows,
        "epochs_run": len(epochs),
        "per_epoch_s": per_epoch_s,
        # what the trainer itself logged (rows actually stepped: drop_last per worker)
        "logged_train_ex_per_s": [e.get("train_ex_per_s") for e in epochs],
        **steady_state(per_epoch_s, rows),
        "end_to_end_s": cell["end_to_end_s"],
        "process_s": process_s,
        "reported_train_rows_per_s": result.get("train_rows_per_s"),
        "reported_peak_rss_mb": reported_rss,
        **rss,
        "peak_rss_mb": reported_rss if reported_rss is not None else rss["peak_rss_tree_mb"],
        "peak_rss_source": "result.json peak_rss_mb"
        if reported_rss is not None
        else "psutil process-tree sampling",
        "test_auc": result.get("test_auc"),
        "valid_auc_per_epoch": [e.get("auc") for e in epochs],
        "config": cell["config"],
        "result": result,
        "log": [line for line in log_lines if _EVAL_LINE.search(line)],
    }


# ---------------------------------------------------------------------------------------------
# The peer: its own virtualenv, a subprocess, one JSON line back.
# ---------------------------------------------------------------------------------------------


def _pip(python: Path, *args: str, log: list[str]) -> None:
    cmd = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log.append(f"$ {' '.join(cmd)}\n{out.stdout}{out.stderr}")
    if out.returncode != 0:
        tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-15:])
        raise BenchmarkError(
            f"could not create the DeepCTR-Torch virtualenv at {python.parents[1]}: "
            f"`pip install {' '.join(args)}` failed (exit {out.returncode}). It needs PyPI "
            f"(deepctr-torch, scikit-learn, pandas, pyarrow) and the torch 2.13.0 CPU wheel "
            f"the machine's pip config points at; without a package index the peer cannot be "
            f"measured. pip said:\n{tail}"
        )


def ensure_peer_venv(venv: Path = PEER_VENV) -> Path:
    """Creates the peer's virtualenv on first use; returns its python. Fails with a clear
    message (never skips) when it cannot be created."""
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    wanted = f"{PEER_TORCH} {PEER_PACKAGE} {' '.join(PEER_EXTRAS)}"
    if python.exists() and stamp.exists() and stamp.read_text().strip() == wanted:
        return python
    base = shutil.which("python3.11") or sys.executable
    print(f"creating the peer virtualenv {venv} (first use; a minute or two) ...", flush=True)
    started = time.perf_counter()
    if not python.exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        made = subprocess.run(
            [base, "-m", "venv", str(venv)], capture_output=True, text=True, check=False
        )
        if made.returncode != 0:
            raise BenchmarkError(
                f"could not create the DeepCTR-Torch virtualenv at {venv} with {base} -m venv: "
                f"{made.stderr.strip()}"
            )
    log: list[str] = []
    # 1) torch alone, from the CPU wheel on disk; 2) the peer with torch pinned again, so no
    # resolver step can swap in a CUDA build.
    _pip(python, PEER_TORCH, log=log)
    _pip(python, PEER_PACKAGE, PEER_TORCH, *PEER_EXTRAS, log=log)
    check = subprocess.run(
        [
            str(python),
            "-c",
            (
                "import deepctr_torch, torch, sklearn, pandas, pyarrow; "
                "print('VERSIONS', deepctr_torch.__version__, torch.__version__)"
            ),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    (venv / "install.log").write_text("\n".join(log))
    found = [line.split()[1:] for line in check.stdout.splitlines() if line.startswith("VERSIONS")]
    versions = found[0] if found else []
    torch_version = versions[1] if len(versions) > 1 else ""
    if check.returncode != 0 or not re.fullmatch(r"2\.13\.0(\+cpu)?", torch_version):
        raise BenchmarkError(
            f"the peer virtualenv {venv} does not import deepctr_torch with torch 2.13.0+cpu "
            f"(got {versions}, {check.stderr.strip()[-500:]!r}); delete it "
            f"and run again"
        )
    stamp.write_text(wanted + "\n")
    print(
        f"peer virtualenv ready (deepctr-torch {versions[0]}, torch {torch_version}) in "
        f"{time.perf_counter() - started:.0f}s",
        flush=True,
    )
    return python


def peer_columns(data_path: Path) -> tuple[list[str], list[str], str]:
    """The same features as ours: single-id columns, bags, and the label, from the schema."""
    from recsys.data.schema import DatasetSchema, Role

    schema = DatasetSchema.from_yaml(data_path / "schema.yaml")
    sparse = [c.name for c in schema.sparse if c.role == Role.CATEGORICAL]
    bags = [c.name for c in schema.sparse if c.role == Role.MULTI_CATEGORICAL]
    if schema.dense:
        raise BenchmarkError("the peer script handles sparse features only")
    return sparse, bags, schema.labels[0].name


def run_peer_cell(
    name: str, spec: dict[str, Any], python: Path, timeout_s: float
) -> dict[str, Any]:
    data_path = Path(spec["data_path"])
    sparse, bags, label = peer_columns(data_path)
    threads = str(spec["threads"])
    cmd = [
        str(python),
        str(PEER_SCRIPT),
        "--data",
        str(data_path),
        "--sparse",
        ",".join(sparse),
        "--bags",
        ",".join(bags),
        "--label",
        label,
        "--epochs",
        str(spec["epochs"]),
        "--threads",
        threads,
        "--batch-size",
        str(spec["batch_size"]),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PYTHONPATH", None)  # nothing of the project's environment leaks into the peer's
    started = time.perf_counter()
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"{name}: the peer took longer than {timeout_s:.0f}s") from None
    process_s = time.perf_counter() - started
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = "\n".join(out.stderr.strip().splitlines()[-20:])
        raise BenchmarkError(f"{name}: the peer script failed (exit {out.returncode}):\n{tail}")
    record = json.loads(lines[-1])
    return {
        "name": name,
        "spec": spec,
        "command": cmd,
        **record,
        "end_to_end_s": process_s,
    }


# ---------------------------------------------------------------------------------------------
# The document: summary, table, machine.
# ---------------------------------------------------------------------------------------------


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): a busy machine shows here."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def summarise(cells: dict[str, Any], smoke: bool) -> dict[str, Any]:
    def cell(name: str) -> dict[str, Any] | None:
        if name in cells:
            return dict(cells[name])
        if smoke and name in SMOKE_STAND_INS and SMOKE_STAND_INS[name] in cells:
            return dict(cells[SMOKE_STAND_INS[name]])
        return None

    def median_of(name: str, key: str) -> float:
        # the median over the saved rounds (smoke: the stand-in's single run)
        runs = rounds_of(cells, name) or [cell(name) or {}]
        return float(statistics.median(r[key] for r in runs))

    def ratio(name: str, base: str) -> float:
        pairs = list(zip(rounds_of(cells, name), rounds_of(cells, base), strict=False))
        if not pairs:  # smoke stand-in
            return median_of(name, "samples_per_s") / median_of(base, "samples_per_s")
        return float(statistics.median(a["samples_per_s"] / b["samples_per_s"] for a, b in pairs))

    summary: dict[str, Any] = {}
    one, two, peer, synth = cell(ML100K_1W), cell(ML100K_2W), cell(PEER), cell(SYNTH_2W)
    summary["rounds"] = len(rounds_of(cells, PEER))
    if one:
        summary["autoint_samples_per_s_1w"] = median_of(ML100K_1W, "samples_per_s")
        summary["autoint_end_to_end_s_1w"] = median_of(ML100K_1W, "end_to_end_s")
    if two:
        summary["autoint_samples_per_s_2w"] = median_of(ML100K_2W, "samples_per_s")
        summary["autoint_end_to_end_s_2w"] = median_of(ML100K_2W, "end_to_end_s")
        summary["autoint_test_auc_peer_config_2w"] = two.get("test_auc")
        summary["autoint_samples_per_s_2w_rounds"] = [
            r["samples_per_s"] for r in rounds_of(cells, ML100K_2W)
        ]
    if peer:
        summary["peer_autoint_samples_per_s"] = median_of(PEER, "samples_per_s")
        summary["peer_end_to_end_s"] = median_of(PEER, "end_to_end_s")
        summary["peer_test_auc"] = peer.get("test_auc")
        summary["peer_autoint_samples_per_s_rounds"] = [
            r["samples_per_s"] for r in rounds_of(cells, PEER)
        ]
        summary["peer_version"] = peer.get("versions", {}).get("deepctr-torch")
        summary["peer_threads"] = peer.get("config", {}).get("threads")
    if synth:
        summary["synthetic_1m_samples_per_s_2w"] = synth["samples_per_s"]
        summary["synthetic_1m_end_to_end_s_2w"] = synth["end_to_end_s"]
        summary["synthetic_1m_peak_rss_mb"] = synth["peak_rss_mb"]
        summary["synthetic_1m_peak_rss_source"] = synth["peak_rss_source"]
        summary["synthetic_rows"] = synth["spec"]["rows"]
    if two and peer:
        summary["ratio_2w_vs_peer"] = ratio(ML100K_2W, PEER)  # median of per-round ratios
        summary["ours_2w_at_least_peer"] = bool(summary["ratio_2w_vs_peer"] >= 1.0)
    if one and peer:
        summary["ratio_1w_vs_peer"] = ratio(ML100K_1W, PEER)
    if one and two and not smoke:
        summary["speedup_2w_vs_1w"] = ratio(ML100K_2W, ML100K_1W)
    if smoke:
        summary["smoke"] = True
        summary["note"] = (
            "smoke run: 1 epoch (not steady state), the 1-worker run stands in for the "
            "2-worker figures, and the synthetic set is small; not a measurement"
        )
    return summary


def print_table(doc: dict[str, Any]) -> None:
    rows = []
    for name, c in doc["cells"].items():
        workers = c["spec"].get("num_workers")
        threads = (
            workers * THREADS_PER_WORKER if workers else c.get("config", {}).get("threads", "")
        )
        rows.append(
            (
                name,
                f"{c['train_rows']:,}",
                str(threads),
                " ".join(f"{s:.2f}" for s in c["per_epoch_s"]),
                f"{c['samples_per_s']:,.0f}",
                f"{c['end_to_end_s']:.1f}",
                f"{c['peak_rss_mb']:,.0f}" if c.get("peak_rss_mb") is not None else "",
                f"{c['test_auc']:.4f}" if c.get("test_auc") is not None else "",
            )
        )
    head = ("cell", "train rows", "threads", "epoch s", "samples/s", "end-to-end s",
            "peak RSS MB", "test AUC")  # fmt: skip
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    s = doc["summary"]
    if "ratio_2w_vs_peer" in s:
        print(
            f"ours (2 workers) / DeepCTR-Torch: {s['ratio_2w_vs_peer']:.2f}x steady-state "
            f"samples/s at the peer's configuration"
            + (" [smoke: not a measurement]" if s.get("smoke") else "")
        )


def configs_side_by_side(doc: dict[str, Any]) -> dict[str, Any]:
    from training.config import load_config

    out: dict[str, Any] = {
        "speed_ours_overrides": [
            *PEER_CONFIG_OVERRIDES,
            f"train.batch_size={GLOBAL_BATCH} // num_workers (per worker)",
        ],
        "quality_ours": {
            "file": str(BASE_CONFIG.relative_to(ROOT)),
            "config": load_config(BASE_CONFIG).model_dump(mode="json"),
        },
    }
    for name in (ML100K_2W, ML100K_1W):
        if name in doc["cells"]:
            out["speed_ours"] = {
                k: doc["cells"][name]["config"][k] for k in ("model", "embedding", "train", "ray")
            }
            break
    if PEER in doc["cells"]:
        out["speed_peer"] = doc["cells"][PEER].get("config")
    return out


# ---------------------------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------------------------


def _cell_main(args: argparse.Namespace) -> int:
    spec = json.loads(args.run_cell)
    cell = run_our_cell_here(spec, args.work_dir, args.run_name)
    args.cell_output.write_text(json.dumps(cell, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="1 epoch, 1 worker, 20k synthetic rows, peer 1 epoch: checks plumbing and keys",
    )
    parser.add_argument("--fresh", action="store_true", help="ignore saved cells")
    parser.add_argument("--data-dir", type=Path, default=None, help="dataset cache")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="runs and artifacts (default: next to the output file)",
    )
    parser.add_argument("--cell-timeout", type=float, default=None, help="seconds per cell")
    parser.add_argument("--only", action="append", default=None, help="run just these cells")
    # internal: one of our cells, in its own process
    parser.add_argument("--run-cell", help=argparse.SUPPRESS)
    parser.add_argument("--run-name", help=argparse.SUPPRESS)
    parser.add_argument("--cell-output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_cell:
        return _cell_main(args)

    from recsys.data.movielens import default_data_dir, prepare_ml100k_ctr
    from recsys.data.synthetic import GENERATOR_VERSION

    data_root = args.data_dir or default_data_dir()
    ml100k_dir = data_root / "ml100k-ctr"
    prepare_ml100k_ctr(ml100k_dir, data_dir=data_root, show_progress=True)
    synthetic_rows = SMOKE_SYNTHETIC_ROWS if args.smoke else SYNTHETIC_ROWS
    synthetic_dir = data_root / f"synthetic-ctr-{synthetic_rows}-seed0-v{GENERATOR_VERSION}"
    work = (args.work_dir or args.output.parent / f".{args.output.stem}_work").resolve()
    timeout_s = args.cell_timeout or (600.0 if args.smoke else 3600.0)

    plan = plan_cells(args.smoke, ml100k_dir.resolve(), synthetic_dir.resolve())
    cells = plan
    if args.only:
        unknown = set(args.only) - set(cells)
        if unknown:
            parser.error(f"--only: unknown cells {sorted(unknown)} (known: {list(cells)})")
        cells = {k: v for k, v in cells.items() if k in args.only}

    doc = saved_doc(args.output, args.fresh, args.smoke)  # a smoke run always starts over

    def save() -> None:
        doc.update(
            {
                "benchmark": "train_throughput",
                "smoke": args.smoke,
                "git_sha": git_sha(),
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "machine": machine(),
                "protocol": (
                    "steady-state samples/s = train rows / median epoch time over the epochs "
                    "after the first; end to end = wall time of the whole train(cfg) call in a "
                    "fresh process (Ray start-up included); both sides at the peer's "
                    "configuration with the same total thread count"
                ),
                "configs": configs_side_by_side(doc),
                "summary": summarise(doc["cells"], args.smoke),
            }
        )
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_suffix(".partial.json")
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(args.output)

    # A saved cell counts only when it ran exactly what this mode plans (a smoke cell never
    # stands in a full run's figures, nor one of another epoch count or data set).
    for name in list(doc["cells"]):
        if doc["cells"][name].get("spec") != plan.get(name):
            print(f"{name}: saved with another setup; dropped (it runs again when planned)")
            del doc["cells"][name]

    # The peer's virtualenv first: when it cannot be made, fail before minutes of training.
    peer_python = ensure_peer_venv() if PEER in cells and PEER not in doc["cells"] else None

    runners: dict[str, Callable[[str, dict[str, Any]], dict[str, Any]]] = {
        "ours": lambda name, spec: run_our_cell(name, spec, work, timeout_s),
        "peer": lambda name, spec: run_peer_cell(name, spec, peer_python or PEER_VENV, timeout_s),
    }
    try:
        for name, spec in cells.items():
            if name in doc["cells"]:
                print(f"{name}: saved, {doc['cells'][name]['samples_per_s']:,.0f} samples/s")
                continue
            if spec["dataset"] == "synthetic-ctr":
                ensure_synthetic(Path(spec["data_path"]), int(spec["rows"]))
            print(f"--- {name}: {json.dumps(spec)}", flush=True)
            load_before = load_average()
            busy = load_before is not None and load_before > 0.5 * (os.cpu_count() or 1)
            if busy:
                print(
                    f"warning: load average {load_before:.1f} on {os.cpu_count()} CPUs before "
                    f"{name}: other work is running and the timings will be low",
                    flush=True,
                )
            doc["cells"][name] = {
                **runners[spec["kind"]](name, spec),
                "load_average_1min": {"before": load_before, "after": load_average()},
            }
            save()
            c = doc["cells"][name]
            print(
                f"{name}: {c['samples_per_s']:,.0f} samples/s (epochs "
                f"{', '.join(f'{s:.2f}s' for s in c['per_epoch_s'])}), end to end "
                f"{c['end_to_end_s']:.1f}s",
                flush=True,
            )
    except BenchmarkError as e:
        print(f"train_throughput: {e}", file=sys.stderr)
        return 1
    save()
    print_table(doc)
    summary = doc["summary"]
    print(json.dumps(summary, indent=2))
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if missing and not args.only:
        print(f"train_throughput: summary lacks {missing}", file=sys.stderr)
        return 1
    print(f"summary keys: {', '.join(k for k in SUMMARY_KEYS if k in summary)}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
