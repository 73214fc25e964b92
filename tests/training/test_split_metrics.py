"""The trainer's split metrics for multi-task and multi-domain models, against scikit-learn:
ESMM's CVR on clicked rows only, the domain-weighted AUC and the per-domain table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from recsys.features.schema import fit_feature_schema
from tests.tiny_data import TINY_MULTITASK_SCHEMA, make_tiny_table, with_ctcvr
from training.jobs import PROB_PREFIX, metrics_from_predictions, vocabulary_coverage
from training.loop import owned_columns, per_domain_metrics, split_metrics, table_of


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return with_ctcvr(make_tiny_table(num_rows=2000, seed=3))


def _probs(table: pa.Table, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    click = table["click"].to_numpy().astype(float)
    ctcvr = table["ctcvr"].to_numpy().astype(float)
    p_ctr = np.clip(0.5 * click + rng.uniform(0, 0.6, len(click)), 0.01, 0.99)
    # cvr scores that rank clicked rows by conversion, but are anti-correlated on unclicked
    # rows: a metric over all rows would differ from the clicked-only one
    p_cvr = np.clip(0.4 * ctcvr + 0.4 * (1 - click) + rng.uniform(0, 0.5, len(click)), 0, 1)
    return {"ctr": p_ctr, "cvr": p_cvr, "ctcvr": p_ctr * p_cvr}


def test_cvr_is_measured_on_clicked_rows_only(table: pa.Table) -> None:
    schema = fit_feature_schema(TINY_MULTITASK_SCHEMA, [table])
    probs = _probs(table, 0)
    metrics = split_metrics(schema, table, probs)
    clicked = table["click"].to_numpy() == 1
    conversion = table["ctcvr"].to_numpy()[clicked]
    expected = roc_auc_score(conversion, probs["cvr"][clicked])
    assert metrics["cvr_auc"] == pytest.approx(expected, abs=1e-12)
    assert metrics["cvr_num_rows"] == clicked.sum()
    all_rows = roc_auc_score(table["ctcvr"].to_numpy(), probs["cvr"])
    assert abs(metrics["cvr_auc"] - all_rows) > 0.05  # the mask matters on this data
    assert metrics["ctcvr_auc"] == pytest.approx(
        roc_auc_score(table["ctcvr"].to_numpy(), probs["ctcvr"]), abs=1e-12
    )
    assert metrics["auc"] == metrics["ctr_auc"]  # the first label's task, unprefixed


def test_domain_weighted_auc_and_per_domain_table(table: pa.Table) -> None:
    schema = fit_feature_schema(TINY_MULTITASK_SCHEMA, [table])
    probs = _probs(table, 1)
    metrics = split_metrics(schema, table, probs)
    rows = per_domain_metrics(schema, table, probs)
    domains = np.asarray(table["occupation"].to_pylist())
    click = table["click"].to_numpy()
    assert set(rows) == set(domains.tolist())
    weighted, weights = 0.0, 0
    for domain, row in rows.items():
        mask = domains == domain
        assert row["rows"] == mask.sum()
        assert row["auc"] == pytest.approx(roc_auc_score(click[mask], probs["ctr"][mask]))
        weighted += row["auc"] * row["rows"]
        weights += row["rows"]
    assert metrics["domain_weighted_auc"] == pytest.approx(weighted / weights, abs=1e-12)


def test_no_cvr_or_domain_metrics_without_their_inputs(table: pa.Table) -> None:
    schema = fit_feature_schema(TINY_MULTITASK_SCHEMA, [table])
    probs = {"ctr": _probs(table, 2)["ctr"]}
    metrics = split_metrics(schema, table.drop_columns(["occupation"]), probs)
    assert "cvr_auc" not in metrics and "domain_weighted_auc" not in metrics
    assert per_domain_metrics(schema, table.drop_columns(["occupation"]), probs) == {}


def test_evaluate_report_has_cvr_on_clicked_rows(table: pa.Table) -> None:
    """`recsys evaluate` (metrics_from_predictions) measures cvr as the trainer does."""
    schema = fit_feature_schema(TINY_MULTITASK_SCHEMA, [table])
    probs = _probs(table, 4)
    predictions = table
    for task, values in probs.items():
        predictions = predictions.append_column(PROB_PREFIX + task, pa.array(values))
    report = metrics_from_predictions(schema, predictions)
    trainer = split_metrics(schema, table, probs)
    assert set(report["tasks"]) == {"ctr", "ctcvr", "cvr"}
    assert report["tasks"]["cvr"]["auc"] == pytest.approx(trainer["cvr_auc"], abs=1e-12)
    assert report["tasks"]["cvr"]["num_rows"] == (table["click"].to_numpy() == 1).sum()


def test_evaluate_report_slices_auc_by_users_and_items_unseen_in_training(
    table: pa.Table,
) -> None:
    train, held_out = table.slice(0, 20), table.slice(20)
    schema = fit_feature_schema(TINY_MULTITASK_SCHEMA, [train])
    p_ctr = _probs(held_out, 5)["ctr"]
    report = metrics_from_predictions(
        schema, held_out.append_column(PROB_PREFIX + "ctr", pa.array(p_ctr))
    )
    click = held_out["click"].to_numpy()
    for column in ("user_id", "item_id"):
        known = np.isin(held_out[column].to_numpy(zero_copy_only=False), train[column].to_numpy())
        assert 0 < known.sum() < len(known), "the fixture should hold both kinds of rows"
        slices = report["tasks"]["ctr"]["cold_start"][column]
        for name, mask in (("known", known), ("unseen", ~known)):
            assert slices[name]["rows"] == mask.sum()
            assert slices[name]["auc"] == pytest.approx(
                roc_auc_score(click[mask], p_ctr[mask]), abs=1e-12
            )


def test_vocabulary_coverage_streams_the_inputs_in_batches(table: pa.Table, tmp_path: Path) -> None:
    train, rest = table.slice(0, 20), table.slice(20)
    schema = fit_feature_schema(TINY_MULTITASK_SCHEMA, [train])
    users = [None if i % 7 == 0 else v for i, v in enumerate(rest["user_id"].to_pylist())]
    genres = [[] if i % 5 == 0 else v for i, v in enumerate(rest["genres"].to_pylist())]
    rest = rest.set_column(rest.schema.get_field_index("user_id"), "user_id", pa.array(users))
    rest = rest.set_column(
        rest.schema.get_field_index("genres"), "genres", pa.array(genres, rest["genres"].type)
    )
    paths = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    pq.write_table(rest.slice(0, 900), paths[0])
    pq.write_table(rest.slice(900), paths[1])
    coverage = vocabulary_coverage(schema, paths, batch_rows=128)
    for column in ("user_id", "item_id", "occupation"):
        values = rest[column].to_pylist()
        vocabulary = {v for v in train[column].to_pylist() if v is not None}
        missing = sum(v is None for v in values)
        oov = sum(v is not None and v not in vocabulary for v in values)
        expected = {
            "known": len(values) - missing - oov,
            "out_of_vocabulary": oov,
            "missing": missing,
            "out_of_vocabulary_share": pytest.approx(oov / (len(values) - missing)),
        }
        assert coverage[column] == expected, column
    assert coverage["user_id"]["missing"] > 0 and coverage["user_id"]["out_of_vocabulary"] > 0
    vocabulary = {g for bag in train["genres"].to_pylist() for g in bag}
    elements = [g for bag in genres for g in bag]
    assert coverage["genres"]["known"] == sum(g in vocabulary for g in elements)
    assert coverage["genres"]["missing"] == sum(not bag for bag in genres) > 0


def test_kept_columns_are_copies_that_reassemble_the_split() -> None:
    # evaluation keeps a few columns of every batch until the split ends: as copies, so no
    # batch's Arrow buffers stay alive (see owned_columns)
    table = pa.table({"click": [1, 0, 1, 1], "user": ["a", "b", None, "a"], "x": [0.1] * 4})
    parts = [owned_columns(table.slice(i, 2), ["click", "user", "missing"]) for i in (0, 2)]
    for part in parts:
        assert set(part) == {"click", "user"}
        assert all(array.flags.owndata for array in part.values())
    assert table_of(parts).to_pydict() == table.select(["click", "user"]).to_pydict()
