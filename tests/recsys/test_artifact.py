"""The artifact contract: versions, manifest checksums, format version, side tables."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from recsys.artifact import (
    MANIFEST,
    WEIGHTS,
    list_versions,
    load_artifact,
    resolve_version_dir,
    score_table,
    write_artifact,
)
from recsys.data.movielens import ML100K_CTR_SCHEMA
from recsys.embeddings import EmbeddingConfig, build_embedding
from recsys.errors import ArtifactError
from recsys.features.schema import FeatureSchema, fit_feature_schema
from recsys.models.autoint import AutoIntConfig
from recsys.models.registry import build_model
from tests.tiny_data import make_tiny_table

EMBEDDING = EmbeddingConfig(dim=4)
MODEL = AutoIntConfig(num_layers=1, attention_dim=8)


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return make_tiny_table(num_rows=200)


@pytest.fixture(scope="module")
def schema(table: pa.Table) -> FeatureSchema:
    return fit_feature_schema(ML100K_CTR_SCHEMA, [table])


def _write(repo: Path, schema: FeatureSchema, seed: int = 0, **kwargs: object) -> Path:
    torch.manual_seed(seed)
    model = build_model(MODEL, build_embedding(schema, EMBEDDING), schema)
    return write_artifact(repo, "m", model, MODEL, EMBEDDING, schema, {"auc": 0.5}, **kwargs)


def _flip_byte(path: Path, offset: int) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_versions_increase_and_model_folder_resolves_to_newest(
    tmp_path: Path, schema: FeatureSchema
) -> None:
    first, second = _write(tmp_path, schema), _write(tmp_path, schema, seed=1)
    assert (first.name, second.name) == ("1", "2")
    assert list_versions(tmp_path / "m") == [1, 2]
    assert resolve_version_dir(tmp_path / "m") == second
    assert load_artifact(tmp_path / "m").version == 2
    # no temporary folder is left behind
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "2"]


def test_files_are_read_only_and_listed_with_checksums(
    tmp_path: Path, schema: FeatureSchema
) -> None:
    path = _write(tmp_path, schema)
    manifest = json.loads((path / MANIFEST).read_text())
    listed = set(manifest["files"])
    on_disk = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {MANIFEST}
    assert listed == on_disk
    assert {"config.json", "schema.json", "metrics.json", WEIGHTS} <= listed
    assert all((path / f).stat().st_mode & 0o222 == 0 for f in listed)


@pytest.mark.parametrize("target", [WEIGHTS, "schema.json", "vocab/item_id.parquet"])
def test_one_flipped_byte_is_rejected_naming_the_file(
    tmp_path: Path, schema: FeatureSchema, target: str
) -> None:
    path = _write(tmp_path, schema)
    _flip_byte(path / target, offset=(path / target).stat().st_size // 2)
    with pytest.raises(ArtifactError, match=f"checksum mismatch for {target}"):
        load_artifact(path)


def test_missing_file_and_unknown_format_version_are_named(
    tmp_path: Path, schema: FeatureSchema
) -> None:
    path = _write(tmp_path, schema)
    os.chmod(path / "metrics.json", 0o644)
    (path / "metrics.json").unlink()
    with pytest.raises(ArtifactError, match=r"metrics\.json listed in the manifest is missing"):
        load_artifact(path)
    other = _write(tmp_path, schema)
    manifest = json.loads((other / MANIFEST).read_text())
    manifest["format_version"] = 99
    os.chmod(other / MANIFEST, 0o644)
    (other / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format_version 99 is not supported"):
        load_artifact(other)


def test_not_an_artifact_names_the_expected_layout(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="MODEL_REPO/<name>"):
        load_artifact(tmp_path)


def test_side_tables_round_trip_and_scores_match(
    tmp_path: Path, schema: FeatureSchema, table: pa.Table
) -> None:
    users = table.select(["user_id", "age", "gender", "occupation", "zip3"])
    path = _write(tmp_path, schema, side_tables={"user": users})
    loaded = load_artifact(path)
    side = loaded.side_table("user")
    assert side is not None and side.equals(users)
    assert loaded.side_table("item") is None
    torch.manual_seed(0)
    original = build_model(MODEL, build_embedding(schema, EMBEDDING), schema).eval()
    expected = score_table(original, schema, table)["ctr"]
    torch.testing.assert_close(
        score_table(loaded.model, loaded.schema, table)["ctr"], expected, rtol=0, atol=0
    )


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002], ids=oct)
def test_a_version_folder_gets_the_mode_a_plain_mkdir_gives(
    tmp_path: Path, schema: FeatureSchema, umask: int
) -> None:
    """A server running as another user (a container mounting the repo read-only) must be
    able to read an artifact written under the usual umask; mkdtemp alone gave 0700."""
    previous = os.umask(umask)
    try:
        path = _write(tmp_path, schema)
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(previous)
    expected = (tmp_path / "plain").stat().st_mode & 0o777
    assert path.stat().st_mode & 0o777 == expected
    assert (path / "vocab").stat().st_mode & 0o777 == expected


def test_a_failed_rename_other_than_the_version_race_is_not_retried(
    tmp_path: Path, schema: FeatureSchema, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def refuse(src: str, dst: str) -> None:
        calls.append(dst)
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dst)

    monkeypatch.setattr("recsys.artifact.os.rename", refuse)
    with pytest.raises(ArtifactError, match=r"cannot move the new artifact into .*Permission"):
        _write(tmp_path, schema)
    assert len(calls) == 1
    # the half-claimed temporary folder is removed
    assert list((tmp_path / "m").iterdir()) == []


def test_the_version_race_is_retried_with_the_next_version(
    tmp_path: Path, schema: FeatureSchema, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer claiming version 1 between the listing and the rename (ENOTEMPTY on
    Linux for a non-empty folder) makes this writer take version 2."""
    real_rename = os.rename

    def lose_once(src: str, dst: str) -> None:
        if Path(dst).name == "1":
            (Path(dst) / "manifest.json").parent.mkdir()
            (Path(dst) / "manifest.json").write_text("{}")
        real_rename(src, dst)

    monkeypatch.setattr("recsys.artifact.os.rename", lose_once)
    assert _write(tmp_path, schema).name == "2"


def test_a_failing_check_publishes_no_version_and_leaves_nothing(
    tmp_path: Path, schema: FeatureSchema, table: pa.Table
) -> None:
    """The export's parity check runs on the staged folder, before a version is claimed: a
    server watching the repo must never load an artifact that failed it."""
    first = _write(tmp_path, schema)
    seen: list[Path] = []

    def fails(staged: Path) -> None:
        loaded = load_artifact(staged)  # the staged folder is complete and verifiable
        assert loaded.version == 0 and loaded.name == "m"
        assert score_table(loaded.model, loaded.schema, table.slice(0, 8))
        seen.append(staged)
        raise RuntimeError("parity off")

    with pytest.raises(RuntimeError, match="parity off"):
        _write(tmp_path, schema, seed=1, check=fails)
    assert seen and not seen[0].exists()
    assert list_versions(tmp_path / "m") == [1]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1"]
    assert resolve_version_dir(tmp_path / "m") == first


def test_a_passing_check_publishes_the_checked_files(tmp_path: Path, schema: FeatureSchema) -> None:
    checked: dict[str, str] = {}

    def passes(staged: Path) -> None:
        checked.update(json.loads((staged / MANIFEST).read_text())["files"])

    path = _write(tmp_path, schema, check=passes)
    assert path.name == "1" and checked
    assert json.loads((path / MANIFEST).read_text())["files"] == checked
    load_artifact(path)
