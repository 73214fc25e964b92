"""The driver's side of resuming and of bounded memory, without Ray: a run folder is claimed by
its config (the same run name with another config is refused), prepared data is reused, and the
streaming data preparation gives the same results as reading whole splits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.data.schema import DatasetSchema
from recsys.errors import ConfigError, DataError, SchemaError
from recsys.features.schema import FeatureSchema
from training import jobs
from training.config import ExperimentConfig, load_config
from training.data import (
    ROW_COLUMN,
    SplitFiles,
    encode_splits,
    fit_features,
    iter_tables,
    locate_dataset,
    read_vocabulary_counts,
    rebatch,
    schema_file_path,
    side_tables,
)
from training.jobs import PREPARED_FILE, check_batch_size, prepare_run, resolve_run
from training.loop import RESULT_FILE


def _config(tmp_path: Path, ml100k_dir: Path, *overrides: str) -> ExperimentConfig:
    return load_config(
        None,
        [
            f"data.path={ml100k_dir}",
            f"output.run_root={tmp_path / 'runs'}",
            f"output.model_repo={tmp_path / 'repo'}",
            "output.run_name=r1",
            *overrides,
        ],
    )


def test_the_same_run_name_with_another_config_is_refused(tmp_path: Path, ml100k_dir: Path) -> None:
    resolve_run(_config(tmp_path, ml100k_dir))
    with pytest.raises(
        ConfigError, match=r"another config \(model\.num_heads: 2 -> 1; train\.seed: 0 -> 1\)"
    ):
        resolve_run(_config(tmp_path, ml100k_dir, "train.seed=1", "model.num_heads=1"))


def test_a_run_resumes_on_another_cluster_or_with_other_fault_settings(
    tmp_path: Path, ml100k_dir: Path
) -> None:
    cfg, run_dir = resolve_run(_config(tmp_path, ml100k_dir))
    again, same_dir = resolve_run(
        _config(
            tmp_path,
            ml100k_dir,
            "ray.address=auto",
            "ray.max_failures=5",
            "ray.collective_timeout_s=30",
        )
    )
    assert same_dir == run_dir and again.ray.address == "auto"
    assert cfg.output.run_name == "r1" and Path(cfg.output.run_root).is_absolute()


def test_prepared_data_is_reused_when_the_run_resumes(tmp_path: Path, ml100k_dir: Path) -> None:
    cfg, run_dir = resolve_run(_config(tmp_path, ml100k_dir))
    paths = prepare_run(cfg, run_dir)
    assert (run_dir / PREPARED_FILE).exists()
    files = sorted(p for p in run_dir.rglob("*") if p.is_file() and p.name != PREPARED_FILE)
    stamps = {p: p.stat().st_mtime_ns for p in files}
    assert len(list(Path(paths.encoded_dir, "train").glob("*.parquet"))) > 1
    assert paths == prepare_run(*resolve_run(cfg))
    assert {p: p.stat().st_mtime_ns for p in files} == stamps  # nothing refitted or rewritten


def test_streamed_side_tables_equal_whole_split_ones(ml100k_dir: Path) -> None:
    data = locate_dataset(load_config(None, [f"data.path={ml100k_dir}"]).data)
    streamed = side_tables(data, chunk_rows=5000)
    for entity_name, entity in (("user", data.schema.user), ("item", data.schema.item)):
        assert entity is not None
        columns = [entity.id_column, *entity.feature_columns]
        whole = pa.concat_tables(
            pq.read_table(f, columns=columns)
            for s in ("train", "valid", "test")
            for f in data.files[s]
        )
        _, first = np.unique(whole[entity.id_column].to_numpy(), return_index=True)
        expected = whole.take(pa.array(np.sort(first)))
        assert streamed[entity_name].equals(expected)
    assert streamed["user"].num_rows == 943 and streamed["item"].num_rows == 1682


ENTITY_DATASET = DatasetSchema.from_dict(
    {
        "name": "entities",
        "columns": [
            {"name": "u", "role": "categorical"},
            {"name": "age", "role": "dense"},
            {"name": "y", "role": "label"},
        ],
        "user": {"id_column": "u", "feature_columns": ["age"]},
    }
)


def _entity_splits(tmp_path: Path, ids: dict[str, pa.Array]) -> SplitFiles:
    files = {}
    for split, column in ids.items():
        path = tmp_path / f"{split}.parquet"
        ages = pa.array([float(10 * (n + 1)) for n in range(len(column))])
        pq.write_table(pa.table({"u": column, "age": ages, "y": [0] * len(column)}), path)
        files[split] = [path]
    return SplitFiles(schema=ENTITY_DATASET, root=tmp_path, files=files)


@pytest.mark.parametrize(
    "valid_ids",
    [
        pa.array(["b", None, "c"]),  # a null id describes no user
        pa.array(["b", None, "c"]).dictionary_encode(),  # pandas `category`
        pa.array(["b", None, "c"], pa.large_string()),
    ],
    ids=["string", "dictionary", "large_string"],
)
def test_side_tables_skip_null_ids_and_read_any_id_encoding(
    tmp_path: Path, valid_ids: pa.Array
) -> None:
    data = _entity_splits(
        tmp_path,
        {
            "train": pa.array(["a", "b", None]).dictionary_encode(),
            "valid": valid_ids,
            "test": pa.array(["d"]),
        },
    )
    users = side_tables(data)["user"]
    # each id keeps its first row: a and b from train, c from valid (age 30), d from test
    assert users["u"].to_pylist() == ["a", "b", "c", "d"]
    assert users["age"].to_pylist() == [10.0, 20.0, 30.0, 10.0]


def test_side_tables_read_numeric_ids_written_as_strings_in_a_later_split(tmp_path: Path) -> None:
    data = _entity_splits(
        tmp_path,
        {
            "train": pa.array([7, 5], pa.int32()),
            "valid": pa.array(["5", "9"]),
            "test": pa.array([9, 11]),
        },
    )
    users = side_tables(data)["user"]
    assert users["u"].type == pa.int32() and users["u"].to_pylist() == [7, 5, 9, 11]


def test_side_tables_name_an_id_column_another_split_cannot_match(tmp_path: Path) -> None:
    data = _entity_splits(
        tmp_path, {"train": pa.array([7, 5]), "valid": pa.array(["x"]), "test": pa.array([9])}
    )
    with pytest.raises(SchemaError, match=r"valid split: id column 'u' of type string .* int64"):
        side_tables(data)


def test_small_chunks_encode_valid_and_test_in_row_order(tmp_path: Path, ml100k_dir: Path) -> None:
    data = locate_dataset(load_config(None, [f"data.path={ml100k_dir}"]).data)
    features = fit_features(data)
    small = encode_splits(data, features, tmp_path / "small", seed=0, chunk_rows=3000)
    large = encode_splits(data, features, tmp_path / "large", seed=0, chunk_rows=1 << 20)
    for split in ("valid", "test"):
        a = pq.read_table(small[split])
        b = pq.read_table(large[split])
        assert a.equals(b)
        assert np.array_equal(a[ROW_COLUMN].to_numpy(), np.arange(a.num_rows))
    # train is shuffled within chunks: the same rows, in another order
    a, b = pq.read_table(small["train"]), pq.read_table(large["train"])
    assert sorted(a[ROW_COLUMN].to_pylist()) == sorted(b[ROW_COLUMN].to_pylist())
    # the per-split value counts do not depend on the chunking, and match a count with sets
    counted = read_vocabulary_counts(tmp_path / "small")
    assert counted is not None and counted == read_vocabulary_counts(tmp_path / "large")
    train_items = set(
        pq.read_table(data.files["train"], columns=["item_id"])["item_id"].to_pylist()
    )
    for split in ("valid", "test"):
        items = pq.read_table(data.files[split], columns=["item_id"])["item_id"].to_pylist()
        unseen = sum(item not in train_items for item in items)
        assert counted[split]["item_id"]["out_of_vocabulary"] == unseen > 0
        assert counted[split]["item_id"]["known"] == len(items) - unseen
    assert counted["train"]["item_id"]["out_of_vocabulary"] == 0  # min_count 1: all kept


@pytest.mark.parametrize("sizes", [[7, 3, 10, 1], [25], [5, 5], []])
def test_rebatch_cuts_a_stream_into_equal_batches_in_order(sizes: list[int]) -> None:
    start, tables = 0, []
    for n in sizes:
        tables.append(pa.table({"x": np.arange(start, start + n)}))
        start += n
    batches = list(rebatch(iter(tables), 4))
    assert [b.num_rows for b in batches[:-1]] == [4] * (len(batches) - 1)
    assert 0 < batches[-1].num_rows <= 4 if batches else start == 0
    joined = [v for b in batches for v in b["x"].to_pylist()]
    assert joined == list(range(start))


def test_iter_tables_streams_bounded_chunks(tmp_path: Path) -> None:
    pq.write_table(pa.table({"x": np.arange(1000)}), tmp_path / "a.parquet", row_group_size=100)
    chunks = list(iter_tables([tmp_path / "a.parquet"], batch_rows=64))
    assert max(c.num_rows for c in chunks) == 64
    assert sum(c.num_rows for c in chunks) == 1000


@pytest.mark.parametrize(
    ("overrides", "fix"),
    [
        (["data.dataset=parquet", "data.path={missing}"], "set data.path to your folder and"),
        (["data.dataset=synthetic-ctr", "data.path={missing}"], "run `recsys data prepare"),
    ],
)
def test_a_missing_dataset_folder_names_it_and_the_fix(
    tmp_path: Path, overrides: list[str], fix: str
) -> None:
    missing = tmp_path / "nowhere"
    config = load_config(None, [o.format(missing=missing) for o in overrides])
    with pytest.raises(DataError, match="is not a folder") as error:
        locate_dataset(config.data)
    assert str(missing) in str(error.value) and fix in str(error.value)


def test_a_folder_without_its_schema_names_the_schema_file(tmp_path: Path) -> None:
    config = load_config(None, ["data.dataset=parquet", f"data.path={tmp_path}"])
    with pytest.raises(DataError, match=r"schema file .*schema\.yaml not found"):
        locate_dataset(config.data)


def test_a_relative_schema_file_is_found_in_the_data_folder(
    tmp_path: Path, ml100k_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's own-data command (`--set data.schema_file=schema.yaml` with the schema in
    data.path) failed unless it was run from inside data.path."""
    data = tmp_path / "own"
    shutil.copytree(ml100k_dir, data)
    (data / "schema.yaml").rename(data / "mine.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    overrides = ["data.dataset=parquet", f"data.path={data}", "data.schema_file=mine.yaml"]
    found = locate_dataset(load_config(None, overrides).data)
    assert found.schema == DatasetSchema.from_yaml(data / "mine.yaml")
    # one in the current folder comes first
    shutil.copy(data / "mine.yaml", elsewhere / "mine.yaml")
    assert schema_file_path("mine.yaml", data) == Path("mine.yaml")
    overrides[-1] = "data.schema_file=absent.yaml"
    with pytest.raises(DataError, match=r"schema file absent\.yaml not found") as error:
        locate_dataset(load_config(None, overrides).data)
    assert str(elsewhere / "absent.yaml") in str(error.value)
    assert str(data / "absent.yaml") in str(error.value)


@pytest.mark.parametrize("setting", ["output.model_repo", "output.run_root"])
def test_an_output_folder_that_is_a_file_is_refused_before_any_work(
    tmp_path: Path, ml100k_dir: Path, setting: str
) -> None:
    """The artifact is written only after training: a model_repo that cannot be a folder
    used to fail every attempt at export, after the whole run."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = _config(tmp_path, ml100k_dir, f"{setting}={blocker}")
    with pytest.raises(ConfigError, match=rf"{setting}: cannot use {blocker} as a folder"):
        resolve_run(cfg)
    assert not (tmp_path / "runs" / "r1").exists()  # no run folder claimed


@pytest.mark.parametrize(
    ("train_rows", "batch_size", "workers", "error"),
    [
        (2048, 1024, 2, None),  # one full batch per worker
        (2047, 1024, 2, r"train\.batch_size: 1024 .* \(2047 rows over 2 workers = 1023\).*=512"),
        (200, 1024, 2, r"= 100\), so no step would run; lower it \(--set train\.batch_size=64\)"),
        (1, 1, 2, r"ray\.num_workers: 2 workers for 1 train rows .* --num-workers 1 or fewer"),
    ],
)
def test_a_batch_size_no_worker_can_fill_is_refused_before_ray_starts(
    train_rows: int, batch_size: int, workers: int, error: str | None
) -> None:
    # workers train on full batches only: a smaller share would export an untrained model
    if error is None:
        check_batch_size(train_rows, batch_size, workers)
    else:
        with pytest.raises(ConfigError, match=error):
            check_batch_size(train_rows, batch_size, workers)


def test_a_new_run_refuses_checkpoints_left_by_a_deleted_run_of_the_same_name(
    tmp_path: Path, ml100k_dir: Path
) -> None:
    # Ray Train resumes from any checkpoint under the run name, whatever the new config
    cfg = _config(tmp_path, ml100k_dir)
    _, run_dir = resolve_run(cfg)
    stale = tmp_path / "runs" / "_ray" / "r1"
    (stale / "epoch-0001").mkdir(parents=True)
    resolve_run(cfg)  # the run folder is there: resuming is fine
    shutil.rmtree(run_dir)
    with pytest.raises(ConfigError, match=rf"earlier run named r1 remain in {stale}.*delete"):
        resolve_run(_config(tmp_path, ml100k_dir, "train.seed=7"))
    assert not run_dir.exists()


def test_a_finished_run_whose_serving_check_did_not_pass_is_checked_again(
    tmp_path: Path, ml100k_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the workers write result.json before the driver's serving check: a failed or
    # interrupted check must not let the next attempt report the run as finished
    cfg = _config(tmp_path, ml100k_dir, "output.verify_serving=true")
    _, run_dir = resolve_run(cfg)
    (run_dir / RESULT_FILE).write_text(json.dumps({"artifact": str(tmp_path / "a")}))
    checked: list[Path] = []
    monkeypatch.setattr(jobs, "verify_serving", lambda artifact: checked.append(artifact) or True)
    assert jobs.train(cfg)["serving_verified"] is True
    assert jobs.train(cfg)["serving_verified"] is True
    assert checked == [tmp_path / "a"]  # once: the second attempt found it recorded


def test_a_select_metric_the_trainer_does_not_compute_is_refused_before_ray_starts(
    tmp_path: Path, ml100k_dir: Path
) -> None:
    # in the workers it failed only after the first epoch, on each of Ray's retries
    cfg, run_dir = resolve_run(_config(tmp_path, ml100k_dir))
    paths = prepare_run(cfg, run_dir)
    schema = FeatureSchema.load(Path(paths.features_dir))
    for name in ("auc", "gauc", "ctr_auc", "domain_weighted_auc"):
        jobs.check_select_metric(name, schema, ("ctr",), paths)
    with pytest.raises(
        ConfigError, match=r"'ctcvr_auc' is not a valid metric .*\['auc', 'ctr_auc', 'ctr_gauc'"
    ):
        jobs.check_select_metric("ctcvr_auc", schema, ("ctr",), paths)
