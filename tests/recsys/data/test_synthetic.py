"""Tests of the synthetic-ctr generator: splits, determinism, planted model, memory, schema."""

from __future__ import annotations

import json
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.preprocessing import OneHotEncoder

from recsys.data.schema import DatasetSchema, Role
from recsys.data.splits import SPLITS
from recsys.data.synthetic import (
    CATEGORICAL_COLUMNS,
    DENSE_COLUMNS,
    FIRST_ORDER_STD,
    LATENT_DIM,
    LATENT_STD,
    SyntheticInfo,
    _exact_auc,
    first_order_weights,
    generate_synthetic_ctr,
    latent_vectors,
    synthetic_schema,
    vocab_sizes,
)

NUM_ROWS = 20_000
CHUNK_ROWS = 5_000


def _read_split(out_dir: Path, split: str) -> pa.Table:
    return pa.concat_tables(
        pq.read_table(path) for path in sorted((out_dir / split).glob("part-*.parquet"))
    )


def _read_all(out_dir: Path) -> pa.Table:
    table = pa.concat_tables(_read_split(out_dir, split) for split in SPLITS)
    return table.sort_by("row_index")


@pytest.fixture(scope="module")
def ctr_20k(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SyntheticInfo]:
    out_dir = tmp_path_factory.mktemp("synthetic_ctr")
    return out_dir, generate_synthetic_ctr(out_dir, NUM_ROWS, seed=0, chunk_rows=CHUNK_ROWS)


def test_split_counts_sum_and_rows_belong_to_their_split(
    ctr_20k: tuple[Path, SyntheticInfo],
) -> None:
    out_dir, info = ctr_20k
    bucket_splits = {**dict.fromkeys(range(8), "train"), 8: "valid", 9: "test"}
    all_rows = []
    for split in SPLITS:
        files = sorted((out_dir / split).glob("part-*.parquet"))
        assert [f.name for f in files] == [f"part-{c:05d}.parquet" for c in range(4)]
        rows = _read_split(out_dir, split).column("row_index").to_pylist()
        assert len(rows) == info.split_rows[split]
        wrong = [r for r in rows if bucket_splits[zlib.crc32(str(r).encode()) % 10] != split]
        assert wrong == [], f"{split} holds rows of other splits: {wrong[:5]}"
        all_rows += rows
    assert sum(info.split_rows.values()) == NUM_ROWS
    assert sorted(all_rows) == list(range(NUM_ROWS))  # every row exactly once


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    infos = [
        generate_synthetic_ctr(tmp_path / run, 3_000, seed=7, chunk_rows=1_000)
        for run in ("a", "b")
    ]
    assert infos[0] == infos[1]
    for split in SPLITS:
        for file_a in sorted((tmp_path / "a" / split).glob("*.parquet")):
            file_b = tmp_path / "b" / split / file_a.name
            assert pq.read_table(file_a).equals(pq.read_table(file_b)), file_a.name
    assert (tmp_path / "a/info.json").read_text() == (tmp_path / "b/info.json").read_text()

    other_seed = generate_synthetic_ctr(tmp_path / "c", 3_000, seed=8, chunk_rows=1_000)
    table_a, table_c = _read_all(tmp_path / "a"), _read_all(tmp_path / "c")
    assert not np.array_equal(table_a["cat_25"].to_numpy(), table_c["cat_25"].to_numpy())
    assert other_seed.bias != infos[0].bias


def test_chunk_size_does_not_change_rows(tmp_path: Path) -> None:
    # 6,500 rows: the last chunk is partial for both chunk sizes.
    small = generate_synthetic_ctr(tmp_path / "small", 6_500, seed=3, chunk_rows=1_000)
    large = generate_synthetic_ctr(tmp_path / "large", 6_500, seed=3, chunk_rows=3_000)
    assert len(list((tmp_path / "small/test").glob("*.parquet"))) == 7
    assert len(list((tmp_path / "large/test").glob("*.parquet"))) == 3
    assert _read_all(tmp_path / "small").equals(_read_all(tmp_path / "large"))
    assert small == large


def test_labels_are_binary_and_calibrated_to_true_prob(
    ctr_20k: tuple[Path, SyntheticInfo],
) -> None:
    table = _read_all(ctr_20k[0])
    click = table["click"].to_numpy()
    prob = table["true_prob"].to_numpy()
    assert table.schema.field("click").type == pa.int8()
    assert set(np.unique(click).tolist()) == {0, 1}
    assert np.all((prob > 0.0) & (prob < 1.0))
    assert 0.15 <= click.mean() <= 0.25
    standard_error = np.sqrt(np.sum(prob * (1.0 - prob))) / len(prob)
    assert abs(click.mean() - prob.mean()) <= 3.0 * standard_error


def test_oracle_metrics_match_sklearn_and_beat_a_first_order_model(
    ctr_20k: tuple[Path, SyntheticInfo],
) -> None:
    out_dir, info = ctr_20k
    test = _read_split(out_dir, "test")
    test_click, test_prob = test["click"].to_numpy(), test["true_prob"].to_numpy()
    assert info.oracle_test_auc == pytest.approx(roc_auc_score(test_click, test_prob), abs=1e-12)
    assert info.oracle_test_logloss == pytest.approx(log_loss(test_click, test_prob), rel=1e-9)
    assert info.oracle_test_auc > 0.7

    smallest = sorted(info.vocab_sizes, key=info.vocab_sizes.__getitem__)[:5]
    train = _read_split(out_dir, "train")
    encoder = OneHotEncoder(handle_unknown="ignore")
    x_train = encoder.fit_transform(np.column_stack([train[c].to_numpy() for c in smallest]))
    x_test = encoder.transform(np.column_stack([test[c].to_numpy() for c in smallest]))
    model = LogisticRegression(max_iter=1_000).fit(x_train, train["click"].to_numpy())
    first_order_auc = roc_auc_score(test_click, model.predict_proba(x_test)[:, 1])
    assert 0.5 < first_order_auc < info.oracle_test_auc


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_auc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=500)
    scores = np.round(rng.random(500) + 0.3 * labels, 1)  # few distinct values: many ties
    assert _exact_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert _exact_auc(np.ones(5), scores[:5]) is None


def test_per_id_parameters_are_pure_functions_of_seed_field_and_id() -> None:
    ids = np.array([0, 1, 17, 9_999_999], dtype=np.int64)
    weights = first_order_weights(0, 25, ids)
    one_at_a_time = np.concatenate([first_order_weights(0, 25, ids[i : i + 1]) for i in range(4)])
    np.testing.assert_array_equal(weights, first_order_weights(0, 25, ids.copy()))
    np.testing.assert_array_equal(weights, one_at_a_time)
    assert np.all(weights != first_order_weights(1, 25, ids))  # another seed
    assert np.all(weights != first_order_weights(0, 24, ids))  # another field

    vectors = latent_vectors(0, 25, ids)
    assert vectors.shape == (4, LATENT_DIM)
    np.testing.assert_array_equal(vectors, latent_vectors(0, 25, ids))
    assert np.all(vectors != latent_vectors(1, 25, ids))

    # Over many ids the hash gives the intended distribution, independently across seeds.
    many = np.arange(200_000, dtype=np.int64)
    w0, w1 = first_order_weights(0, 3, many), first_order_weights(1, 3, many)
    assert abs(w0.mean()) < 5 * FIRST_ORDER_STD / np.sqrt(len(many))
    assert w0.std() == pytest.approx(FIRST_ORDER_STD, rel=0.02)
    assert abs(np.corrcoef(w0, w1)[0, 1]) < 0.01
    assert latent_vectors(0, 3, many).std(axis=0) == pytest.approx([LATENT_STD] * 4, rel=0.02)


def test_ids_are_in_range_and_zipf_like(ctr_20k: tuple[Path, SyntheticInfo]) -> None:
    out_dir, info = ctr_20k
    table = _read_all(out_dir)
    assert list(info.vocab_sizes.values()) == list(vocab_sizes(1.0))
    assert info.vocab_sizes["cat_0"] == 10 and info.vocab_sizes["cat_25"] == 10_000_000
    for name in CATEGORICAL_COLUMNS:
        ids = table[name].to_numpy()
        assert table.schema.field(name).type == pa.int64()
        assert ids.min() >= 0 and ids.max() < info.vocab_sizes[name], name
    for name in CATEGORICAL_COLUMNS[:5]:  # head of the distribution: id 0 most frequent
        counts = np.bincount(table[name].to_numpy())
        assert counts[0] > counts[1] > counts[2], name
    _, counts = np.unique(table["cat_25"].to_numpy(), return_counts=True)
    assert np.mean(counts == 1) > 0.5  # the 10M field is dominated by ids seen once
    for name in DENSE_COLUMNS:
        values = table[name].to_numpy()
        assert values.dtype == np.float32 and np.all(np.isfinite(values) & (values >= 0)), name


def test_vocab_scale_shrinks_vocabularies(tmp_path: Path) -> None:
    info = generate_synthetic_ctr(tmp_path, 2_000, chunk_rows=1_000, vocab_scale=1e-4)
    assert min(info.vocab_sizes.values()) == 2
    assert info.vocab_sizes["cat_25"] == 1_000
    table = _read_all(tmp_path)
    for name, size in info.vocab_sizes.items():
        assert table[name].to_numpy().max() < size, name


def _peak_traced_bytes(out_dir: Path, num_rows: int, chunk_rows: int) -> int:
    tracemalloc.start()
    try:
        generate_synthetic_ctr(out_dir, num_rows, chunk_rows=chunk_rows)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_does_not_grow_with_num_rows(tmp_path: Path) -> None:
    _peak_traced_bytes(tmp_path / "warmup", 1_000, chunk_rows=1_000)  # one-time allocations
    small = _peak_traced_bytes(tmp_path / "small", 3_000, chunk_rows=1_000)
    large = _peak_traced_bytes(tmp_path / "large", 12_000, chunk_rows=1_000)
    assert large <= 1.5 * small, (small, large)
    # The measurement can see growth: the same rows in one chunk need far more memory.
    one_chunk = _peak_traced_bytes(tmp_path / "one_chunk", 12_000, chunk_rows=12_000)
    assert one_chunk > 3 * large, (large, one_chunk)


def test_schema_yaml_loads_and_matches_parquet(ctr_20k: tuple[Path, SyntheticInfo]) -> None:
    out_dir, _ = ctr_20k
    schema = DatasetSchema.from_yaml(out_dir / "schema.yaml")
    assert schema == synthetic_schema()
    assert schema.name == "synthetic-ctr"
    assert schema.split_key == ("row_index",)
    assert [c.name for c in schema.dense] == list(DENSE_COLUMNS)
    assert [c.name for c in schema.sparse] == list(CATEGORICAL_COLUMNS)
    assert schema.tasks == ("ctr",) and schema.label_for_task("ctr") == "click"
    assert {c.name for c in schema.columns if c.role == Role.OTHER} == {"true_prob", "row_index"}
    for split in SPLITS:
        arrow_schema = pq.read_schema(out_dir / split / "part-00000.parquet")
        assert sorted(arrow_schema.names) == sorted(c.name for c in schema.columns)
        schema.validate_table(arrow_schema, where=split)


def test_info_json_matches_returned_info_and_files(ctr_20k: tuple[Path, SyntheticInfo]) -> None:
    out_dir, info = ctr_20k
    assert SyntheticInfo.from_json(out_dir / "info.json") == info
    raw = json.loads((out_dir / "info.json").read_text())
    assert raw["num_rows"] == NUM_ROWS and raw["seed"] == 0
    for split in SPLITS:
        clicks = _read_split(out_dir, split)["click"].to_numpy()
        assert info.split_positive_rate[split] == pytest.approx(clicks.mean(), abs=1e-12)


def test_refuses_to_overwrite_and_rejects_bad_arguments(tmp_path: Path) -> None:
    generate_synthetic_ctr(tmp_path, 100, chunk_rows=100)
    with pytest.raises(FileExistsError, match="already holds Parquet shards"):
        generate_synthetic_ctr(tmp_path, 100, chunk_rows=100)
    with pytest.raises(ValueError, match="num_rows must be positive"):
        generate_synthetic_ctr(tmp_path / "x", 0)
    with pytest.raises(ValueError, match="chunk_rows must be positive"):
        generate_synthetic_ctr(tmp_path / "x", 10, chunk_rows=0)
    with pytest.raises(ValueError, match="vocab_scale must be positive"):
        generate_synthetic_ctr(tmp_path / "x", 10, vocab_scale=0.0)
