"""`recsys search-dims` end to end on ml100k-ctr with tiny settings: the search runs as a Ray
task, writes its spec, α and curve into the run folder, and the regular (DMP) trainer retrains
the pruned mixed-dimension AutoInt into a loadable artifact; a second call reuses both. Bad
input fails fast with exit code 2 and a message naming the setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from recsys.artifact import load_artifact
from recsys.embeddings.config import MixedDimSpec
from recsys.embeddings.mixed_dim import MixedDimEmbedding, table_param_count
from training.config import load_config

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "dnis_ml100k.yaml"
TINY = [
    "search.warm_max_epochs=1",
    "search.search_epochs=1",
    "search.steps_per_epoch=8",
    "search.l1=1e-3",
    "search.target_ratio=0.4",
    "search.sweep_ratios=[1.0, 0.4, 0.2]",
    "train.max_epochs=1",
    "output.verify_serving=false",
]
SHARE = 0.5  # search.alpha_valid_share of the module's search: α on half of valid


def _search_dims(
    work: Path, data: Path, *overrides: str, num_workers: int = 1
) -> subprocess.CompletedProcess[str]:
    args = ["--config", str(CONFIG), "--num-workers", str(num_workers)]
    for item in (
        f"data.path={data}",
        "output.run_root=runs",
        "output.model_repo=repo",
        "output.run_name=dnis",
        *overrides,
    ):
        args += ["--set", item]
    return subprocess.run(
        [sys.executable, "-m", "recsys.cli", "search-dims", *args],
        cwd=work,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.fixture(scope="module")
def searched(ml100k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("search-dims")
    done = _search_dims(work, ml100k_dir, *TINY, f"search.alpha_valid_share={SHARE}")
    assert done.returncode == 0, done.stderr[-4000:]
    run = work / "runs" / "dnis"
    return {
        "work": work,
        "data": ml100k_dir,
        "stdout": done.stdout,
        "run": run,
        "summary": json.loads((run / "search_dims.json").read_text()),
    }


@pytest.mark.slow
def test_search_writes_spec_alpha_and_curve(searched: dict[str, Any]) -> None:
    search = searched["run"] / "search"
    spec = MixedDimSpec.model_validate_json((search / "spec.json").read_text())
    assert set(spec.fields) == {
        "user_id",
        "item_id",
        "age",
        "gender",
        "occupation",
        "zip3",
        "release_year",
        "genres",
    }
    tensors = load_file(str(search / "alpha.safetensors"))
    alpha, kept = tensors["alpha"], tensors["kept"].bool()
    assert alpha.shape == (8, 5, 16) and ((alpha >= 0) & (alpha <= 1)).all()
    assert (alpha < 1).any()  # the α steps ran
    curve = json.loads((search / "curve.json").read_text())
    params = [p["params"] for p in curve["points"]]
    assert params[0] == curve["full_params"] and params == sorted(params, reverse=True)
    assert all(0.5 < p["valid_auc"] < 1 for p in curve["points"])
    summary = searched["summary"]
    assert summary["embedding_params"] <= 0.4 * summary["full_params"]
    assert (
        summary["full_params"]
        == curve["full_params"]
        == 16 * sum(b["rows"] for b in summary["blocks"])
    )
    # the kept mask and the spec agree block by block
    for f, (name, blocks) in enumerate(spec.fields.items()):
        for s, block in enumerate(blocks):
            assert block.kept == tuple(torch.nonzero(kept[f, s]).flatten().tolist()), (name, s)


@pytest.mark.slow
def test_retrain_exports_a_loadable_mixed_dim_artifact(searched: dict[str, Any]) -> None:
    summary = searched["summary"]
    artifact = load_artifact(summary["artifact"])
    assert artifact.name == "dnis_ml100k" and artifact.version == 1
    config = json.loads((artifact.path / "config.json").read_text())
    assert config["embedding"]["variant"] == "mixed_dim"
    widths = {shape[1] for shape in config["tables"].values()}
    assert len(widths) > 1 and all(w % 4 == 0 for w in widths)  # kept widths differ
    spec = MixedDimSpec.model_validate_json((searched["run"] / "search" / "spec.json").read_text())
    assert artifact.embedding_config.mixed_dim == spec
    assert isinstance(artifact.model.embedding, MixedDimEmbedding)
    assert table_param_count(artifact.model) == summary["embedding_params"]
    retrain = summary["retrain"]
    assert retrain["epochs"] == 1 and retrain["test_auc"] > 0.7  # learned, from one epoch
    assert "embedding params:" in searched["stdout"] and "retrained:" in searched["stdout"]


def _valid_halves(data: Path, folder: Path) -> tuple[list[Path], list[Path]]:
    """The raw valid rows split as the search split them (by position, the `__row__` number):
    the α part, and the rest, each as one Parquet file."""
    import pyarrow.parquet as pq

    from training.data import split_files, valid_part

    table = pq.read_table(split_files(data, "valid")[0])
    part = valid_part(np.arange(table.num_rows), SHARE)
    folder.mkdir(exist_ok=True)
    pq.write_table(table.filter(part), folder / "alpha.parquet")
    pq.write_table(table.filter(~part), folder / "select.parquet")
    return [folder / "alpha.parquet"], [folder / "select.parquet"]


@pytest.mark.slow
def test_retrain_starts_from_the_searched_weights_alpha_folded(searched: dict[str, Any]) -> None:
    """METHODS.md §7(b)6: init.safetensors is the searched model pruned to the spec with α folded
    into the tables; in the exported architecture it scores the search's valid rows exactly as
    the pruning sweep scored the searched model at that budget, and the retrain was pointed at
    it. The search read only its `alpha_valid_share` of the valid rows; the summary's valid
    figures for the searched model are on the other rows, where the retrain selects."""
    from recsys.compression.lowrank import evaluate
    from training.data import split_files

    summary = searched["summary"]
    assert summary["retrain_from"] == "searched"
    init = searched["run"] / "search" / "init.safetensors"
    retrain_config = json.loads((searched["run"] / "retrain" / "config.json").read_text())
    assert retrain_config["train"]["init_weights"] == str(init)
    # a fine-tune: a tenth of the train section's learning rates (search.retrain_lr_scale)
    shipped = load_config(CONFIG)
    assert summary["retrain_lr_scale"] == pytest.approx(0.1)
    assert retrain_config["train"]["dense_lr"] == pytest.approx(shipped.train.dense_lr / 10)
    assert retrain_config["train"]["table_lr"] == pytest.approx(shipped.train.table_lr / 10)
    artifact = load_artifact(summary["artifact"])
    model = artifact.model
    model.load_state_dict(load_file(str(init)))
    swept = {p["ratio"]: p["valid_auc"] for p in summary["curve"]}
    alpha_rows, select_rows = _valid_halves(searched["data"], searched["work"] / "halves")
    metrics = evaluate(model, artifact.schema, alpha_rows)
    assert metrics["auc"] == pytest.approx(swept[0.4], abs=1e-6)
    whole = evaluate(model, artifact.schema, split_files(searched["data"], "valid"))
    assert whole["auc"] != pytest.approx(swept[0.4], abs=1e-4)  # the sweep read half of valid
    # the summary reports that model before retraining, on valid and on test
    test = evaluate(model, artifact.schema, split_files(searched["data"], "test"))
    before = summary["searched_model"]
    selected = evaluate(model, artifact.schema, select_rows)
    assert before["valid_auc"] == pytest.approx(selected["auc"], abs=1e-6)
    assert before["test_auc"] == pytest.approx(test["auc"], abs=1e-6)
    assert before["test_logloss"] == pytest.approx(test["logloss"], rel=1e-5)
    assert before["test_auc"] != pytest.approx(before["valid_auc"], abs=1e-9)  # two splits
    assert "searched model, pruned, before retraining:" in searched["stdout"]


@pytest.mark.slow
def test_retrain_selects_on_the_valid_rows_the_search_did_not_read(
    searched: dict[str, Any],
) -> None:
    """With `search.alpha_valid_share` below 1 the retrain runs with
    `train.valid_exclude_share` at that share: its best epoch's valid metrics are those of the
    exported model on the rows outside the search's part, not on the whole split."""
    from recsys.compression.lowrank import evaluate
    from training.data import split_files

    retrain_config = json.loads((searched["run"] / "retrain" / "config.json").read_text())
    assert retrain_config["train"]["valid_exclude_share"] == SHARE
    artifact = load_artifact(searched["summary"]["artifact"])
    _, select_rows = _valid_halves(searched["data"], searched["work"] / "halves")
    selected = evaluate(artifact.model, artifact.schema, select_rows)
    whole = evaluate(artifact.model, artifact.schema, split_files(searched["data"], "valid"))
    retrain = searched["summary"]["retrain"]
    assert retrain["valid_auc"] == pytest.approx(selected["auc"], abs=1e-5)
    assert retrain["valid_logloss"] == pytest.approx(selected["logloss"], rel=1e-4)
    assert retrain["valid_auc"] != pytest.approx(whole["auc"], abs=1e-4)


@pytest.mark.slow
def test_rerun_reuses_the_search_and_the_retrain(searched: dict[str, Any]) -> None:
    search = searched["run"] / "search"
    written = {p.name: p.stat().st_mtime_ns for p in search.iterdir()}
    again = _search_dims(
        searched["work"], searched["data"], *TINY, f"search.alpha_valid_share={SHARE}"
    )
    assert again.returncode == 0, again.stderr[-4000:]
    assert {p.name: p.stat().st_mtime_ns for p in search.iterdir()} == written  # not searched
    summary = json.loads((searched["run"] / "search_dims.json").read_text())
    assert summary["artifact"] == searched["summary"]["artifact"]  # not retrained
    assert f"artifact: {summary['artifact']}" in again.stdout
    assert sorted(p.name for p in (searched["work"] / "repo" / "dnis_ml100k").iterdir()) == ["1"]


@pytest.mark.slow  # three CLI processes and a data preparation: about 20 s
def test_bad_input_names_the_setting(ml100k_dir: Path, tmp_path: Path) -> None:
    done = _search_dims(
        tmp_path, ml100k_dir, "embedding.variant=hashed", "embedding.param_budget=20000"
    )
    assert done.returncode == 2
    assert "embedding.variant is 'hashed' (expected 'per_feature')" in done.stderr
    done = _search_dims(tmp_path, ml100k_dir, "search.fields=[movie]")
    assert done.returncode == 2
    assert "search.fields: ['movie'] are not sparse fields of ml100k-ctr" in done.stderr
    done = _search_dims(tmp_path, ml100k_dir, "search.width_multiple=3")
    assert done.returncode == 2 and "search.width_multiple=3 must be a multiple of 4" in done.stderr


@pytest.mark.parametrize(
    ("overrides", "factor"),
    [
        ([], 0.1),  # the default: fine-tune the searched weights
        (["search.retrain_from=scratch"], 1.0),  # a fresh init trains at the full rates
        (["search.retrain_lr_scale=1"], 1.0),
        (["search.retrain_from=scratch", "search.retrain_lr_scale=0.5"], 0.5),
    ],
)
def test_retrain_learning_rates_follow_retrain_lr_scale(
    tmp_path: Path, overrides: list[str], factor: float
) -> None:
    from training.search import retrain_config

    cfg = load_config(CONFIG, overrides)
    spec = MixedDimSpec.model_validate({"fields": {"user_id": [{"end": 944, "kept": [0, 1]}]}})
    retrain = retrain_config(cfg, spec, tmp_path)
    assert cfg.search.retrain_lr_factor == factor
    assert retrain.train.dense_lr == pytest.approx(cfg.train.dense_lr * factor)
    assert retrain.train.table_lr == pytest.approx(cfg.train.table_lr * factor)
    # nothing else in the train section changes: same epochs, early stopping and seed
    rest = {"dense_lr", "table_lr", "init_weights"}
    assert retrain.train.model_dump(exclude=rest) == cfg.train.model_dump(exclude=rest)
    assert (retrain.train.init_weights is not None) == (cfg.search.retrain_from == "searched")


def test_retrain_lr_scale_out_of_range_names_the_setting() -> None:
    from recsys.errors import ConfigError

    with pytest.raises(ConfigError, match="retrain_lr_scale"):
        load_config(CONFIG, ["search.retrain_lr_scale=0"])


def test_shipped_config_loads_and_matches_the_fixed_d_run() -> None:
    raw = yaml.safe_load(CONFIG.read_text())
    cfg = load_config(CONFIG)
    for section, values in raw.items():
        for key, value in values.items():
            got = getattr(getattr(cfg, section), key)
            assert (list(got) if isinstance(got, tuple) else got) == value, f"{section}.{key}"
    # the retrain is compared with `recsys train` on the AutoInt config: same model, width,
    # epoch budget and seed
    fixed = load_config(REPO / "configs" / "autoint_ml100k.yaml")
    assert cfg.model == fixed.model and cfg.train == fixed.train
    assert cfg.embedding == fixed.embedding and cfg.embedding.variant == "per_feature"
