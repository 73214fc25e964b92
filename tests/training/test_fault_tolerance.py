"""A 2-worker run survives a killed worker and a killed driver, resuming from checkpoints.

The test starts its own Ray head on loopback (token auth on) and runs `recsys train --address`
against it. After the first checkpoint is registered it SIGKILLs one RayTrainWorker process,
found by pid through Ray's state API: Ray Train restarts the worker group from the latest
checkpoint. After a later checkpoint it SIGKILLs the driver, and running the same command again
resumes the run from its run folder and Ray Train's storage. Nothing in the code knows about
these faults.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from recsys.artifact import load_artifact
from tests.training.ray_cluster import REPO, LocalCluster, start_head, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

RUN = "faults"
# An epoch takes about 5 s here: one spare epoch keeps the driver kill (after the first
# checkpoint that follows the restore) ahead of the run's end even if the worker kill lands an
# epoch late.
MAX_EPOCHS = 4


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    head = start_head(num_cpus=4)
    try:
        yield head
    finally:
        head.stop()


def _train_args(cluster: LocalCluster, ml100k_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "recsys.cli",
        "train",
        "--config",
        str(REPO / "configs" / "autoint_ml100k.yaml"),
        "--num-workers",
        "2",
        "--address",
        cluster.address,
        "--set",
        f"data.path={ml100k_dir}",
        "--set",
        f"train.max_epochs={MAX_EPOCHS}",
        "--set",
        "train.patience=10",  # no early stop: the run must outlive both faults
        "--set",
        "ray.collective_timeout_s=30",  # a dead peer fails the step fast
        "--set",
        "output.run_root=runs",
        "--set",
        "output.model_repo=repo",
        "--set",
        f"output.run_name={RUN}",
    ]


def _registered_epoch(work: Path) -> int:
    """The newest epoch whose checkpoint Ray Train registered (0 if none yet)."""
    snapshot = work / "runs" / "_ray" / RUN / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return 0
    try:
        latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
    except (json.JSONDecodeError, KeyError):
        return 0  # caught mid-write
    found = re.findall(r"epoch-(\d{4})", json.dumps(latest))
    return max((int(e) for e in found), default=0)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_run_resumes_after_a_killed_worker_and_a_killed_driver(
    cluster: LocalCluster, ml100k_dir: Path, tmp_path: Path
) -> None:
    work, args = tmp_path, _train_args(cluster, ml100k_dir)
    run_dir = work / "runs" / RUN
    with (work / "first.log").open("wb") as log:
        driver = subprocess.Popen(args, cwd=work, env=cluster.env, stdout=log, stderr=log)
    try:
        # 1. a worker dies after the first registered checkpoint. Its pid is looked up while
        #    the first epoch runs: the state API takes seconds in a fresh interpreter, longer
        #    than an epoch on a loaded machine, so the kill then follows the checkpoint at once.
        workers: list[dict[str, Any]] = []

        def group_started() -> bool:
            workers[:] = cluster.alive_actors("RayTrainWorker")
            return len(workers) == 2 or driver.poll() is not None

        wait_for(group_started, 600, "the worker group")
        wait_for(lambda: _registered_epoch(work) >= 1 or driver.poll() is not None, 600, "ckpt")
        assert driver.poll() is None, (work / "first.log").read_text()[-4000:]
        assert len(workers) == 2, workers
        first_checkpoint = _registered_epoch(work)
        os.kill(workers[-1]["pid"], signal.SIGKILL)
        killed_at = time.monotonic()

        # 2. Ray Train restarts the group from the latest checkpoint; after the next
        #    checkpoint the driver dies too
        restores = run_dir / "restores.jsonl"
        wait_for(lambda: len(_jsonl(restores)) >= 1 or driver.poll() is not None, 600, "restore")
        assert driver.poll() is None, (work / "first.log").read_text()[-4000:]
        restart_s = time.monotonic() - killed_at
        resumed_at = _jsonl(restores)[0]["epoch"]
        wait_for(lambda: _registered_epoch(work) > resumed_at, 600, "a checkpoint after restore")
        assert _registered_epoch(work) < MAX_EPOCHS, "the run ended before the driver was killed"
        driver.kill()
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()

    # 3. the same command again resumes the stopped run
    second = subprocess.run(
        args, cwd=work, env=cluster.env, capture_output=True, text=True, timeout=900, check=False
    )
    assert second.returncode == 0, second.stderr[-4000:]
    assert "reusing the features and encoded splits" in second.stderr

    # Both restores loaded exactly the state that was checkpointed: the digest of the model
    # and of both optimizers (sharded row-wise Adagrad state, Adam state, learning rates) after
    # the restore equals the one computed when the checkpoint was saved.
    restored = _jsonl(run_dir / "restores.jsonl")
    saved = _jsonl(run_dir / "checkpoints.jsonl")
    assert len(restored) == 2, restored
    assert restored[0]["epoch"] >= first_checkpoint >= 1  # not from scratch
    for record in restored:
        digests_of_epoch = [s["digest"] for s in saved if s["epoch"] == record["epoch"]]
        assert record["restored_digest"] == record["saved_digest"]
        assert record["restored_digest"] in digests_of_epoch

    # Each restore goes on at the checkpoint's epoch + 1, and every epoch is evaluated.
    lines = (run_dir / "train.log").read_text().splitlines()
    resumed = [i for i, line in enumerate(lines) if "resumed from epoch" in line]
    assert len(resumed) == 2
    for index, record in zip(resumed, restored, strict=True):
        assert f"resumed from epoch {record['epoch']} " in lines[index]
        next_eval = next(line for line in lines[index:] if " eval " in f" {line}")
        assert f"epoch={record['epoch'] + 1} " in next_eval, next_eval
    evaluated = {int(m) for line in lines for m in re.findall(r"eval\s+epoch=(\d+) ", line)}
    assert evaluated == set(range(1, MAX_EPOCHS + 1))

    result = json.loads((run_dir / "result.json").read_text())
    assert result["epochs"] == MAX_EPOCHS
    artifact = load_artifact(result["artifact"])
    assert artifact.metrics["num_workers"] == 2
    assert result["parity_max_abs_diff"] <= 1e-5 and result["valid_auc"] > 0.75
    assert restart_s < 300  # a dead peer fails the group fast (gloo timeout lowered)
