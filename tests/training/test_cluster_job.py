"""The same entry point runs unchanged on a real cluster through `ray job submit`.

A head node and a second node process start on loopback with token auth on; the job is
submitted to the head's job server with the token in the environment and only environment
variables in its runtime env (the code is installed on every node, nothing is uploaded), joins
the cluster with `--address auto`, trains 2 workers and exports an artifact.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from recsys.artifact import load_artifact
from tests.training.ray_cluster import REPO, LocalCluster, start_head, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[LocalCluster]:
    cluster = start_head(num_cpus=2)
    try:
        cluster.add_worker_node(num_cpus=2)
        wait_for(lambda: cluster.alive_nodes() == 2, 120, "the second node", cluster)
        yield cluster
    finally:
        cluster.stop()


def test_ray_job_submit_trains_on_a_two_node_cluster(
    two_nodes: LocalCluster, ml100k_dir: Path, tmp_path: Path
) -> None:
    runtime_env = {"env_vars": {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}}
    submitted = two_nodes.ray(
        "job",
        "submit",
        "--address",
        two_nodes.dashboard_url,
        "--submission-id",
        "recsys-train-cluster-test",
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        sys.executable,
        "-m",
        "recsys.cli",
        "train",
        "--config",
        str(REPO / "configs" / "autoint_ml100k.yaml"),
        "--num-workers",
        "2",
        "--address",
        "auto",
        "--set",
        f"data.path={ml100k_dir}",
        "--set",
        "train.max_epochs=1",
        "--set",
        "ray.collective_timeout_s=60",
        "--set",
        f"output.run_root={tmp_path / 'runs'}",
        "--set",
        f"output.model_repo={tmp_path / 'repo'}",
        "--set",
        "output.run_name=cluster",
        timeout=900,
    )
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output[-4000:]
    assert "Job 'recsys-train-cluster-test' succeeded" in output
    status = two_nodes.ray(
        "job", "status", "--address", two_nodes.dashboard_url, "recsys-train-cluster-test"
    )
    assert "succeeded" in (status.stdout + status.stderr).lower()

    result = json.loads((tmp_path / "runs" / "cluster" / "result.json").read_text())
    artifact = load_artifact(result["artifact"])
    assert artifact.metrics["num_workers"] == 2
    assert result["parity_max_abs_diff"] <= 1e-5 and result["valid_auc"] > 0.7
    assert result["train_rows_per_s"] > 0 and len(result["worker_peak_rss_mb"]) == 2
