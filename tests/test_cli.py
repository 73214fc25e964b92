"""The `recsys` command as a user runs it (a subprocess): help, dispatch, and user errors as one
'error: ...' line with exit code 2 and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMMANDS = (
    "compress",
    "data",
    "evaluate",
    "predict",
    "score",
    "search-dims",
    "serve",
    "train",
    "verify-artifact",
)


def _recsys(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RECSYS_DATA": str(cwd / "data")}  # never touch the user's cache
    return subprocess.run(
        [sys.executable, "-m", "recsys.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_the_commands(tmp_path: Path, flag: str) -> None:
    result = _recsys(flag, cwd=tmp_path)
    assert result.returncode == 0
    listed = [line.split(maxsplit=1) for line in result.stdout.splitlines() if line[:2] == "  "]
    assert sorted(name for name, *_ in listed) == sorted(COMMANDS)
    for name, *summary in listed:
        assert summary and len(summary[0]) > 20, f"{name} has no one-line summary"


def test_compress_missing_artifact_is_one_error_line_without_library_noise(
    tmp_path: Path,
) -> None:
    """compress imports torchrec (so fbgemm_gpu, which logs each .so it loads at INFO on the
    root logger) before it resolves the artifact; the user sees only the error."""
    result = _recsys(
        "compress", "--artifact", tmp_path / "nope", "--target-ratio", "3", cwd=tmp_path
    )
    assert result.returncode == 2
    (line,) = _error_lines(result.stderr)
    assert "artifact:" in line and "nope" in line
    assert "Successfully loaded" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_unknown_command_exits_2_naming_the_valid_ones(tmp_path: Path) -> None:
    result = _recsys("trian", "--config", "x.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown command 'trian'" in result.stderr
    for name in COMMANDS:
        assert f"'{name}'" in result.stderr
    assert "Traceback" not in result.stderr


def test_train_with_a_typo_in_the_config_is_one_error_line(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "configs" / "autoint_ml100k.yaml").read_text())
    raw["model"]["num_head"] = raw["model"].pop("num_heads")
    config = tmp_path / "typo.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = _recsys("train", "--config", config, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = _error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert "unknown key 'model.num_head'; did you mean 'model.num_heads'?" in errors[0]
    assert str(config) in errors[0]
    # nothing was started: no run folder or model repository in the working directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["typo.yaml"]


def test_evaluate_missing_artifact_exits_2_with_artifact_error(tmp_path: Path) -> None:
    missing = tmp_path / "model_repo" / "nope"
    output = tmp_path / "eval"
    result = _recsys(
        "evaluate", "--artifact", missing, "--split", "test", "--output", output, cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = _error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"error: artifact: {missing} is neither an artifact version folder")
    assert not output.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rows", "0"], "error: data prepare: --rows must be at least 1 (got 0)"),
        (["--seed", "-1"], "error: data prepare: --seed must be in [0, 2**64) (got -1)"),
    ],
)
def test_data_prepare_out_of_range_arguments_are_one_error_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "synthetic"
    result = _recsys("data", "prepare", "synthetic-ctr", "--out", out, *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert _error_lines(result.stderr) == [message]
    assert not out.exists()


def test_data_prepare_refuses_to_write_over_generated_shards(tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    first = _recsys("data", "prepare", "synthetic-ctr", "--rows", "50", "--out", out, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    again = _recsys("data", "prepare", "synthetic-ctr", "--rows", "50", "--out", out, cwd=tmp_path)
    assert again.returncode == 2, again.stderr
    assert "Traceback" not in again.stderr
    (error,) = _error_lines(again.stderr)
    assert f"{out / 'train'} already holds Parquet shards" in error and "--out" in error
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == before


def test_subcommand_usage_error_exits_2(tmp_path: Path) -> None:
    # argparse's own errors (a missing required flag) keep its exit code 2 and usage line
    result = _recsys("train", cwd=tmp_path)
    assert result.returncode == 2
    assert "the following arguments are required: --config" in result.stderr


@pytest.mark.parametrize(
    ("test", "expected"),
    [
        ({"domain_weighted_auc": 0.75}, "test domain_weighted_auc=0.7500 (select on auc)"),
        (
            {"ctr_auc": 0.9, "cvr_auc": 0.78, "ctcvr_auc": 0.88},
            (
                "test ctr_auc=0.9000 cvr_auc=0.7800 ctcvr_auc=0.8800 "
                "(cvr on clicked rows; select on auc)"
            ),
        ),
        ({"ctr_auc": 0.9}, None),  # a single-task model: the headline line has it already
    ],
)
def test_train_prints_the_extra_test_metrics_with_a_note_that_fits_them(
    capsys: pytest.CaptureFixture[str], test: dict[str, float], expected: str | None
) -> None:
    from training.cli import _print_result

    _print_result({"best_epoch": 3, "select_metric": "auc", "test": test})
    lines = capsys.readouterr().out.splitlines()
    extra = [line for line in lines if line.startswith("test ")]
    assert extra == ([expected] if expected else [])
