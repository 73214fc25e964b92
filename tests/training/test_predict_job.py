"""`recsys predict` / `recsys evaluate` as library calls on a tiny artifact: what they refuse
before Ray starts (a repeated input, an output they cannot write, a column the model cannot
read), and, through a local Ray, that inputs of mixed encodings are all scored, that a library
error raised inside the Ray Data actor comes back as itself, and that a short output is never
written."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys.artifact import load_artifact, score_table, write_artifact
from recsys.data.movielens import ML100K_CTR_SCHEMA
from recsys.embeddings import EmbeddingConfig, build_embedding
from recsys.errors import ConfigError, DataError, SchemaError
from recsys.features.schema import fit_feature_schema
from recsys.models.autoint import AutoIntConfig
from recsys.models.registry import build_model
from tests.tiny_data import make_tiny_table
from training import jobs
from training.jobs import evaluate, predict

EMBEDDING = EmbeddingConfig(dim=4)
MODEL = AutoIntConfig(num_layers=1, attention_dim=8)


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return make_tiny_table(num_rows=300)


@pytest.fixture(scope="module")
def artifact(table: pa.Table, tmp_path_factory: pytest.TempPathFactory) -> Path:
    schema = fit_feature_schema(ML100K_CTR_SCHEMA, [table])
    torch.manual_seed(0)
    model = build_model(MODEL, build_embedding(schema, EMBEDDING), schema)
    repo = tmp_path_factory.mktemp("repo")
    return write_artifact(repo, "m", model, MODEL, EMBEDDING, schema, {"auc": 0.5})


@pytest.fixture()
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails the test if the job gets as far as starting Ray: refusals must come first."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was started before the inputs and output were checked")

    monkeypatch.setattr("training.ray_runner.ensure_ray", refuse)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray

    started = not ray.is_initialized()
    if started:  # predict joins it (ensure_ray returns at once when Ray is up)
        ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.ERROR)
    yield
    if started:
        ray.shutdown()


def _write(path: Path, table: pa.Table) -> Path:
    pq.write_table(table, path, row_group_size=70)
    return path


def test_a_repeated_input_is_refused_naming_it(
    artifact: Path, table: pa.Table, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_ray: None
) -> None:
    """Ray Data reads a repeated path once: 2 x 300 rows in gave 300 predictions out."""
    data = _write(tmp_path / "a.parquet", table)
    output = tmp_path / "out.parquet"
    with pytest.raises(ConfigError, match=rf"--input: {data} is given twice; pass each file once"):
        predict(artifact, [data, data], output)
    # the same file spelled another way is the same mistake
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=rf"a.parquet is given twice \(also given as {data}\)"):
        predict(artifact, [data, Path("a.parquet")], output)
    assert not output.exists()


def test_an_output_that_cannot_be_written_is_refused_before_scoring(
    artifact: Path, table: pa.Table, tmp_path: Path, no_ray: None
) -> None:
    data = _write(tmp_path / "a.parquet", table)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(ConfigError, match=rf"--output: {folder} is a folder \(expected a Parquet"):
        predict(artifact, [data], folder)
    with pytest.raises(ConfigError, match=rf"--output: {data} is also an --input"):
        predict(artifact, [data], data)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=rf"--output: cannot create the folder {a_file}/sub"):
        predict(artifact, [data], a_file / "sub" / "out.parquet")
    with pytest.raises(ConfigError, match=rf"--output: {a_file} is a file \(expected a folder"):
        evaluate(artifact, a_file, inputs=[data])
    (folder / "metrics.json").mkdir()
    with pytest.raises(ConfigError, match=rf"--output: {folder}/metrics.json is a folder"):
        evaluate(artifact, folder, inputs=[data])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "file", "folder"]


def test_evaluate_refuses_an_input_without_labels_before_scoring(
    artifact: Path, table: pa.Table, tmp_path: Path, no_ray: None
) -> None:
    # it scored every file, then failed on "labels must be binary (got nan ...)"
    labelled = _write(tmp_path / "a.parquet", table)
    unlabelled = _write(tmp_path / "b.parquet", table.drop_columns(["click"]))
    with pytest.raises(SchemaError, match=rf"evaluate: input {unlabelled}: .*'click'"):
        evaluate(artifact, tmp_path / "report", inputs=[labelled, unlabelled])
    assert not (tmp_path / "report").exists()


def test_a_column_the_model_cannot_read_is_one_error_naming_file_and_column(
    artifact: Path, table: pa.Table, tmp_path: Path, no_ray: None
) -> None:
    """A list of user ids passes the column checks but not the encoder; it used to fail
    inside the Ray Data actor as a traceback."""
    ids = pa.array([[u] for u in table["user_id"].to_pylist()])
    data = _write(tmp_path / "lists.parquet", table.set_column(0, "user_id", ids))
    with pytest.raises(
        SchemaError, match=rf"^predict: input {data}: features: cannot read 'user_id' values"
    ):
        predict(artifact, [data], tmp_path / "out.parquet")


def test_a_column_of_two_unrelated_types_in_two_inputs_is_refused_naming_both(
    artifact: Path, table: pa.Table, tmp_path: Path, no_ray: None
) -> None:
    first = _write(tmp_path / "a.parquet", table)
    numbers = pa.array(np.arange(table.num_rows, dtype=np.int64))
    second = _write(tmp_path / "b.parquet", table.set_column(1, "item_id", numbers))
    with pytest.raises(
        SchemaError, match=rf"column 'item_id' is string in {first} but int64 in {second}"
    ):
        predict(artifact, [first, second], tmp_path / "out.parquet")


def test_the_read_schema_decodes_dictionaries_and_widens_numbers(tmp_path: Path) -> None:
    plain = pa.schema([("user_id", pa.string()), ("click", pa.int8())])
    encoded = pa.schema(
        [
            ("user_id", pa.dictionary(pa.int32(), pa.string())),
            ("click", pa.int64()),
            ("genres", pa.list_(pa.dictionary(pa.int8(), pa.string()))),
        ]
    )
    got = jobs._read_schema(
        {tmp_path / "a": plain, tmp_path / "b": encoded}, ["user_id", "genres", "click", "x"]
    )
    assert got == pa.schema(
        [("user_id", pa.string()), ("genres", pa.list_(pa.string())), ("click", pa.int64())]
    )


@pytest.mark.slow
def test_inputs_with_a_dictionary_column_in_one_file_are_all_scored(
    artifact: Path, table: pa.Table, tmp_path: Path, local_ray: None
) -> None:
    """A pandas `category` column in one file and plain strings in another used to stop the
    job with an ArrowTypeError; also the second file lacks the label column."""
    first, second = table.slice(0, 180), table.slice(180)
    category = second.set_column(0, "user_id", second["user_id"].dictionary_encode())
    inputs = [
        _write(tmp_path / "a.parquet", first),
        _write(tmp_path / "b.parquet", category.drop(["click"])),
    ]
    output = tmp_path / "out.parquet"
    assert predict(artifact, inputs, output) == table.num_rows
    got = pq.read_table(output)
    assert got["user_id"].to_pylist() == table["user_id"].to_pylist()
    assert got["click"].to_pylist() == [*first["click"].to_pylist(), *[None] * second.num_rows]
    loaded = load_artifact(artifact)
    expected = score_table(loaded.model, loaded.schema, table)["ctr"].double()
    torch.testing.assert_close(torch.tensor(got["p_ctr"].to_numpy()), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "b.parquet", "out.parquet"]


@pytest.mark.slow
def test_a_library_error_in_the_ray_actor_comes_back_as_itself(
    artifact: Path,
    table: pa.Table,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    local_ray: None,
) -> None:
    """With the driver-side check skipped, the encoder fails inside the Ray Data actor: the
    caller gets that SchemaError (one line, exit 2 in the CLI), not a RayTaskError."""
    monkeypatch.setattr(jobs, "_check_inputs_encode", lambda *args: None, raising=False)
    ids = pa.array([[u] for u in table["user_id"].to_pylist()])
    data = _write(tmp_path / "lists.parquet", table.set_column(0, "user_id", ids))
    output = tmp_path / "out.parquet"
    with pytest.raises(SchemaError) as raised:
        predict(artifact, [data], output)
    assert type(raised.value) is SchemaError
    assert str(raised.value).startswith("features: cannot read 'user_id' values of type list")
    assert "\n" not in str(raised.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lists.parquet"]


@pytest.mark.slow
def test_a_short_output_is_never_written(
    artifact: Path,
    table: pa.Table,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    local_ray: None,
) -> None:
    """If fewer rows come back than the inputs hold, the job fails and writes nothing."""
    data = _write(tmp_path / "a.parquet", table)
    count = jobs._parquet_schema_and_rows
    monkeypatch.setattr(
        jobs, "_parquet_schema_and_rows", lambda path: (count(path)[0], count(path)[1] + 1)
    )
    output = tmp_path / "out.parquet"
    with pytest.raises(
        DataError, match=rf"scored 300 rows but the inputs hold 301 .*; {output} was not written"
    ):
        predict(artifact, [data], output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet"]
