"""End to end through the `recsys` command: 2 real Ray workers train AutoInt with DMP-sharded
tables on ml100k-ctr, export a verified artifact, and `recsys evaluate` recomputes the test
metrics from fresh predictions (checked against scikit-learn); a second run with the same seed
trains bitwise the same model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from recsys.artifact import load_artifact, write_artifact

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _recsys(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "recsys.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, f"recsys {args[0]} failed:\n{result.stderr[-4000:]}"
    return result


def _train(work: Path, data: Path, repo: str, run_name: str, *sets: str) -> dict[str, Any]:
    """`recsys train` of AutoInt on 2 workers for 2 epochs; returns the run's result.json."""
    overrides = [
        f"data.path={data}",
        "train.max_epochs=2",
        "output.run_root=runs",
        f"output.model_repo={repo}",
        f"output.run_name={run_name}",
        *sets,
    ]
    config = str(REPO / "configs" / "autoint_ml100k.yaml")
    args = ["train", "--config", config, "--num-workers", "2"]
    for override in overrides:
        args += ["--set", override]
    done = _recsys(*args, cwd=work)
    (work / "runs" / run_name / "console.txt").write_text(done.stdout + done.stderr)
    return json.loads((work / "runs" / run_name / "result.json").read_text())


@pytest.fixture(scope="module")
def trained(ml100k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("e2e")
    return {"work": work, "result": _train(work, ml100k_dir, "repo", "e2e")}


def test_training_exports_a_verified_artifact(trained: dict[str, Any]) -> None:
    result = trained["result"]
    artifact = load_artifact(result["artifact"])
    assert artifact.version == 1 and artifact.name == "autoint_ml100k"
    # rescoring valid rows from the artifact on disk matched the sharded model's scores
    assert result["parity_rows"] == 512 and result["parity_max_abs_diff"] <= 1e-5
    # and the serving side's gate (recsys verify-artifact, run by the job) passed
    assert result["serving_verified"] is True
    # two epochs already learn far more than a constant predictor
    assert result["valid_auc"] > 0.75 and result["test_auc"] > 0.75
    assert artifact.metrics["num_workers"] == 2
    users, items = artifact.side_table("user"), artifact.side_table("item")
    assert users is not None and users.num_rows == 943
    assert items is not None and items.num_rows == 1682


def test_the_console_shows_progress_not_library_internals(trained: dict[str, Any]) -> None:
    """Both workers log our progress at INFO and libraries only from WARNING (recsys/logs.py):
    no TorchRec planner tables or per-table notes, no fbgemm per-TBE dumps, on either rank, and
    no fbgemm library-load lines (the worker entry sets the levels before TorchRec is imported,
    training/worker.py), none of the known library warnings, no planner-setup warnings."""
    console = (trained["work"] / "runs" / "e2e" / "console.txt").read_text()
    assert "eval  epoch=1 auc=" in console and "final artifact=" in console
    for internal in (
        "Estimated Sharding Distribution",
        "Collective validation initialized",
        "GroupedPooledEmbeddingsLookup",
        "Feature Gates",
        "SplitTableBatchedEmbeddingBagsCodegen Arguments",
        "Successfully loaded",
        # the known library warnings of recsys/logs.py
        "is_fx_tracing will return true",
        "`broadcast_buffers` is deprecated",
        "deprecating ShardedTensor",
        "caching params will be ignored",
        "The topology was constructed directly",  # training/sharding.py's planner setup
        "HeuristicalStorageReservation",
    ):
        assert internal not in console, internal


def test_the_same_seed_trains_the_same_model(trained: dict[str, Any], ml100k_dir: Path) -> None:
    """2 workers, sharded tables, 2 epochs: the second run with the same config and seed sees
    the same batches on the same ranks and ends with bitwise the same weights."""
    work = trained["work"]
    again = _train(work, ml100k_dir, "repo_again", "e2e_again", "output.verify_serving=false")
    first = trained["result"]
    for key in ("best_epoch", "valid_auc", "valid_logloss", "test_auc", "test_logloss"):
        assert again[key] == first[key], key
    weights = load_artifact(first["artifact"]).model.state_dict()
    weights_again = load_artifact(again["artifact"]).model.state_dict()
    assert weights.keys() == weights_again.keys()
    assert all(torch.equal(weights[k], weights_again[k]) for k in weights)


def test_evaluate_recomputes_test_auc_from_fresh_predictions(trained: dict[str, Any]) -> None:
    work, result = trained["work"], trained["result"]
    out = work / "eval_test"
    _recsys(
        "evaluate",
        "--artifact",
        str(work / "repo" / "autoint_ml100k"),
        "--split",
        "test",
        "--output",
        str(out),
        cwd=work,
    )
    report = json.loads((out / "metrics.json").read_text())
    predictions = pq.read_table(out / "predictions.parquet")
    labels = predictions["click"].to_numpy()
    probs = predictions["p_ctr"].to_numpy()
    assert predictions.num_rows == 10_013
    assert report["tasks"]["ctr"]["auc"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-12)
    assert report["tasks"]["ctr"]["logloss"] == pytest.approx(log_loss(labels, probs), abs=1e-6)
    # the same test AUC the training job measured at export
    assert report["tasks"]["ctr"]["auc"] == pytest.approx(result["test_auc"], abs=1e-9)
    assert len(report["tasks"]["ctr"]["per_domain"]) >= 15  # occupations with both classes
    # the test split's value counts: the same whether taken while training encoded the split
    # (stored in the artifact) or by evaluate from the raw rows
    stored = json.loads((Path(report["artifact"]) / "metrics.json").read_text())
    assert report["vocabulary"] == stored["data"]["vocabulary"]["test"]
    assert report["vocabulary"]["item_id"]["out_of_vocabulary"] > 0


def test_evaluate_a_parquet_file_the_artifact_has_no_metrics_for(
    trained: dict[str, Any], ml100k_dir: Path
) -> None:
    work = trained["work"]
    test = pq.read_table(ml100k_dir / "test.parquet")
    rows = np.sort(np.random.default_rng(7).choice(test.num_rows, 3000, replace=False))
    subset = test.take(rows)
    pq.write_table(subset, work / "subset.parquet")
    out = work / "eval_subset"
    result = _recsys(
        "evaluate",
        "--artifact",
        str(work / "repo" / "autoint_ml100k" / "1"),
        "--input",
        str(work / "subset.parquet"),
        "--output",
        str(out),
        cwd=work,
    )
    report = json.loads((out / "metrics.json").read_text())
    predictions = pq.read_table(out / "predictions.parquet")
    # predictions come back in input order, one per row
    assert predictions["user_id"].to_pylist() == subset["user_id"].to_pylist()
    assert predictions["item_id"].to_pylist() == subset["item_id"].to_pylist()
    expected = roc_auc_score(subset["click"].to_numpy(), predictions["p_ctr"].to_numpy())
    assert report["tasks"]["ctr"]["auc"] == pytest.approx(expected, abs=1e-12)
    assert report["num_rows"] == 3000
    # test items the model never trained on are counted, and their rows scored as a slice
    vocab_dir = work / "repo" / "autoint_ml100k" / "1" / "vocab"
    trained_items = set(pq.read_table(vocab_dir / "item_id.parquet")["value"].to_pylist())
    unseen = ~np.isin(subset["item_id"].to_numpy(zero_copy_only=False), list(trained_items))
    assert report["vocabulary"]["item_id"]["out_of_vocabulary"] == unseen.sum() > 0
    assert report["vocabulary"]["item_id"]["known"] == 3000 - unseen.sum()
    assert report["tasks"]["ctr"]["cold_start"]["item_id"]["unseen"]["rows"] == unseen.sum()
    assert f"rows whose item_id is unseen in training: {unseen.sum()}" in result.stdout
    assert "out of vocabulary (scored as the OOV id): " in result.stdout
    # the scoring actor drops the known library lines too (recsys/logs.py)
    assert "is_fx_tracing will return true" not in result.stderr + result.stdout


@pytest.mark.parametrize("case", ["no rows", "missing", "not parquet"])
def test_predict_refuses_bad_inputs_before_starting_ray(
    trained: dict[str, Any], ml100k_dir: Path, case: str
) -> None:
    work = trained["work"]
    bad = work / f"{case.replace(' ', '_')}.parquet"
    if case == "no rows":
        pq.write_table(pq.read_table(ml100k_dir / "test.parquet").slice(0, 0), bad)
        expected = f"error: predict: {bad}: no rows to score (expected at least one)"
    elif case == "missing":
        expected = f"error: predict: input {bad} is not a file (expected a Parquet file)"
    else:
        bad.write_text("user_id,item_id\n1,2\n")
        expected = f"error: predict: input {bad} is not a readable Parquet file ("
    output = work / "bad_predictions.parquet"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "recsys.cli",
            "predict",
            "--artifact",
            str(work / "repo" / "autoint_ml100k"),
            "--input",
            str(bad),
            "--output",
            str(output),
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()  # one line: no traceback, no Ray start-up
    assert line.startswith(expected), line
    assert not output.exists()


def test_train_on_your_own_parquet_with_a_yaml_schema(tmp_path: Path) -> None:
    """`recsys data prepare synthetic-ctr` writes shard folders and a schema.yaml; training on
    them as bring-your-own Parquet (dense and categorical columns) needs no code."""
    data = tmp_path / "mine"
    _recsys("data", "prepare", "synthetic-ctr", "--rows", "30000", "--out", str(data), cwd=tmp_path)
    info = json.loads((data / "info.json").read_text())
    _recsys(
        "train",
        "--config",
        str(REPO / "configs" / "autoint_ml100k.yaml"),
        "--num-workers",
        "1",
        "--set",
        "data.dataset=parquet",
        "--set",
        f"data.path={data}",
        "--set",
        "data.schema_file=" + str(data / "schema.yaml"),
        "--set",
        "train.max_epochs=2",
        "--set",
        "train.batch_size=512",
        "--set",
        "output.model_name=mine",
        "--set",
        "output.run_name=mine",
        "--set",
        "output.run_root=runs",
        "--set",
        "output.model_repo=repo",
        cwd=tmp_path,
    )
    result = json.loads((tmp_path / "runs" / "mine" / "result.json").read_text())
    artifact = load_artifact(result["artifact"])
    assert len(artifact.schema.dense) == 13 and len(artifact.schema.sparse) == 26
    # the planted signal is learned: well above chance, at or below the oracle
    assert 0.6 < result["test_auc"] <= info["oracle_test_auc"] + 0.01


def test_a_tampered_artifact_or_a_moved_dataset_is_one_error_line(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    """Both are checked before Ray starts: a changed file failed the checksum inside the
    scoring actor (a Ray traceback), and a dataset folder that moved was reported as a
    missing split with no word of --data-path."""
    source = load_artifact(trained["result"]["artifact"])
    moved = write_artifact(
        tmp_path / "repo",
        "moved",
        source.model,
        source.model_config,
        source.embedding_config,
        source.schema,
        {"data": {"dataset": "ml100k-ctr", "path": str(tmp_path / "gone")}},
    )
    result = _run_recsys(
        "evaluate", "--artifact", str(moved), "--split", "test", "--output", "out", cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: evaluate: the artifact's dataset folder {tmp_path / 'gone'}")
    assert "--data-path" in line

    (moved / "metrics.json").write_text("{}")
    for command in (
        ["evaluate", "--split", "test", "--data-path", str(tmp_path), "--output", "out"],
        ["predict", "--input", str(tmp_path / "x.parquet"), "--output", "x.parquet"],
    ):
        result = _run_recsys(command[0], "--artifact", str(moved), *command[1:], cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"error: artifact {moved}: checksum mismatch for metrics.json")
    assert not (tmp_path / "out").exists()


def _run_recsys(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`recsys ARGS` expected to fail: its result, whatever the exit code."""
    return subprocess.run(
        [sys.executable, "-m", "recsys.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_ctrl_c_stops_training_with_a_line_that_says_how_to_resume(
    ml100k_dir: Path, tmp_path: Path
) -> None:
    """Ray Train's own SIGINT handler aborts the run and exits; the command says so, keeps the
    run folder, and exits 130 like any job stopped by SIGINT."""
    args = ["train", "--config", str(REPO / "configs" / "autoint_ml100k.yaml")]
    for override in (
        f"data.path={ml100k_dir}",
        "train.max_epochs=50",
        "train.patience=50",
        "output.run_root=runs",
        "output.model_repo=repo",
        "output.run_name=stopped",
    ):
        args += ["--set", override]
    log = tmp_path / "console.txt"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "recsys.cli", *args],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            deadline = time.monotonic() + 600
            while "eval  epoch=1 " not in log.read_text():
                assert process.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no epoch finished in 600 s"
                time.sleep(0.5)
            process.send_signal(signal.SIGINT)
            code = process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    console = log.read_text()
    assert code == 130, console[-3000:]
    (line,) = [line for line in console.splitlines() if line.startswith("interrupted:")]
    assert "training run stopped stopped by the user (Ctrl-C)" in line
    assert "--set output.run_name=stopped resumes it" in line
    assert "Traceback" not in console
    assert (tmp_path / "runs" / "stopped" / "config.json").exists()  # the run folder stays
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())
