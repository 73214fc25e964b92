"""Activation-PCA compression (METHODS.md §8): statistics, PCA, ranks, the compressed model,
its artifact, fine-tuning and the `recsys compress` command."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from recsys.artifact import load_artifact, score_table, write_artifact
from recsys.compression.cli import compress
from recsys.compression.factorized import FactorizedLinear
from recsys.compression.lowrank import (
    ActivationStats,
    CompressedModel,
    FineTuneConfig,
    PrincipalComponents,
    RankPlan,
    Target,
    choose_ranks,
    collect_statistics,
    compress_model,
    energy_rank,
    evaluate,
    find_targets,
    fine_tune,
    iter_batches,
    linear_factors,
    planned_parameters,
    principal_components,
    total_parameters,
)
from recsys.data.movielens import ML100K_CTR_SCHEMA
from recsys.embeddings import EmbeddingConfig, build_embedding
from recsys.embeddings.lowrank import LowRankFieldEmbedding
from recsys.errors import ConfigError
from recsys.features.batch import Batch
from recsys.features.schema import FeatureSchema, fit_feature_schema
from recsys.models.autoint import AutoIntConfig
from recsys.models.outputs import CTRModel
from recsys.models.registry import build_model
from tests.tiny_data import make_tiny_table

MODEL = AutoIntConfig(num_layers=2, num_heads=2, attention_dim=16, dnn_hidden_units=(32, 32))
EMBEDDING = EmbeddingConfig(dim=8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Raw train/valid/test Parquet cut from one tiny table (same attributes per id)."""
    folder = tmp_path_factory.mktemp("tiny-ctr")
    table = make_tiny_table(num_rows=1536)
    for split, (start, rows) in {
        "train": (0, 1024),
        "valid": (1024, 256),
        "test": (1280, 256),
    }.items():
        pq.write_table(table.slice(start, rows), folder / f"{split}.parquet")
    return folder


@pytest.fixture(scope="module")
def splits(data_dir: Path) -> dict[str, list[Path]]:
    return {s: [data_dir / f"{s}.parquet"] for s in ("train", "valid", "test")}


@pytest.fixture(scope="module")
def schema(data_dir: Path) -> FeatureSchema:
    return fit_feature_schema(ML100K_CTR_SCHEMA, [pq.read_table(data_dir / "train.parquet")])


@pytest.fixture(scope="module")
def batch(schema: FeatureSchema, splits: dict[str, list[Path]]) -> Batch:
    return next(iter_batches(schema, splits["train"], batch_size=1024))


def _model(schema: FeatureSchema, seed: int = 0) -> CTRModel:
    torch.manual_seed(seed)
    model = build_model(MODEL, build_embedding(schema, EMBEDDING), schema)
    # non-zero biases, so the means the PCA factors must carry are not trivially zero
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _components(model: CTRModel, targets: list[Target], batch: Batch) -> dict:
    stats = collect_statistics(model, targets, [batch])
    return {name: principal_components(s) for name, s in stats.items()}


# --- statistics and PCA ------------------------------------------------------------------------


def test_streaming_statistics_equal_a_one_shot_float64_covariance() -> None:
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(6, 6))
    rows = rng.normal(size=(1000, 6)) @ mixing + 100.0  # a large mean: float32 sums would drift
    stats = ActivationStats(6)
    first, second = ActivationStats(6), ActivationStats(6)
    for start, stop in [(0, 1), (1, 300), (300, 1000)]:
        stats.update(torch.from_numpy(rows[start:stop]).float())
    # (B, F, dim) outputs count B*F rows, as an attention projection's do
    first.update(torch.from_numpy(rows[:400].reshape(100, 4, 6)).float())
    second.update(torch.from_numpy(rows[400:]).float())
    first.merge(second)
    as_float32 = rows.astype(np.float32).astype(np.float64)
    expected_cov = np.cov(as_float32, rowvar=False, bias=True)
    for candidate in (stats, first):
        assert candidate.count == 1000
        np.testing.assert_allclose(candidate.mean.numpy(), as_float32.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(candidate.covariance.numpy(), expected_cov, rtol=1e-8, atol=1e-8)


def test_pca_is_sorted_descending_and_rebuilds_the_covariance() -> None:
    stats = ActivationStats(5)
    stats.update(torch.randn(500, 5) @ torch.randn(5, 5))
    pcs = principal_components(stats)
    assert torch.all(pcs.eigenvalues[:-1] >= pcs.eigenvalues[1:])
    rebuilt = pcs.basis @ torch.diag(pcs.eigenvalues) @ pcs.basis.T
    torch.testing.assert_close(rebuilt, stats.covariance, atol=1e-8, rtol=1e-8)
    assert pcs.retained_energy(5) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("energy", "expected"), [(0.5, 1), (0.6, 2), (0.9, 2), (0.91, 3), (1.0, 4), (1e-9, 1)]
)
def test_energy_rank_is_the_smallest_k_keeping_the_share(energy: float, expected: int) -> None:
    eigenvalues = torch.tensor([5.0, 4.0, 0.9, 0.1], dtype=torch.float64)  # cumulative .5 .9 .99 1
    assert energy_rank(eigenvalues, energy) == expected


def test_reconstruction_error_falls_with_k_and_equals_the_discarded_eigenvalues() -> None:
    """MSE(k) = E ||y - y_hat||^2 = sum of eigenvalues beyond k (METHODS.md §8(g)); dropping
    B's (I - U U^T) mu bias adds ||(I - U U^T) mu||^2 and breaks the equality."""
    torch.manual_seed(0)
    linear = nn.Linear(10, 8)
    with torch.no_grad():
        linear.bias.copy_(torch.randn(8) * 3)  # a mean far from the principal subspace
    x = torch.randn(2000, 10) @ torch.randn(10, 10)
    with torch.no_grad():
        y = linear(x).double()
    stats = ActivationStats(8)
    stats.update(y)
    pcs = principal_components(stats)
    errors = []
    for k in range(1, 9):
        layer = linear_factors(linear, k, "pca", pcs)
        with torch.no_grad():
            mse = float((layer(x).double() - y).square().sum(dim=1).mean())
            errors.append(mse)
            assert mse == pytest.approx(pcs.discarded_variance(k), rel=1e-3, abs=1e-4)
            if k < 8:
                layer.second.bias.zero_()
                no_bias = float((layer(x).double() - y).square().sum(dim=1).mean())
                basis = pcs.top(k)
                shift = pcs.mean - basis @ (basis.T @ pcs.mean)
                assert no_bias == pytest.approx(mse + float(shift @ shift), rel=1e-3)
                assert no_bias > pcs.discarded_variance(k) + 1.0
    assert all(a > b for a, b in itertools.pairwise(errors))
    assert errors[-1] < 1e-4  # full rank is exact


def test_embedding_statistics_are_weighted_by_the_data(schema: FeatureSchema, batch: Batch) -> None:
    """A field's statistics are those of the rows the samples look up (a frequent id counts
    as often as it occurs), not of the table's rows taken uniformly."""
    model = _model(schema)
    targets = [t for t in find_targets(model) if t.name == "embedding.user_id"]
    stats = collect_statistics(model, targets, [batch])["embedding.user_id"]
    table = model.embedding.tables.embedding_bags["t_user_id"].weight.detach().double().numpy()
    ids = batch.features.sparse["user_id"].values().numpy()
    looked_up = table[ids]
    assert stats.count == len(ids)
    np.testing.assert_allclose(stats.mean.numpy(), looked_up.mean(axis=0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(
        stats.covariance.numpy(), np.cov(looked_up, rowvar=False, bias=True), atol=1e-9
    )
    # the uniform table mean is another number (ids are not uniformly frequent; id 0 is unseen)
    assert not np.allclose(stats.mean.numpy(), table.mean(axis=0), atol=1e-4)


def test_only_a_single_per_feature_embedding_is_compressible(schema: FeatureSchema) -> None:
    """A model whose tables are another variant (here mixed-dimension) cannot have them
    selected; its Linear layers still can be. (Low-rank tables are refused outright, see
    test_a_compressed_model_is_refused_with_a_config_error.)"""
    rows = schema.sparse_feature("user_id").num_embeddings
    config = EmbeddingConfig.model_validate(
        {
            "dim": 8,
            "variant": "mixed_dim",
            "mixed_dim": {"fields": {"user_id": [{"end": rows, "kept": [0, 1]}]}},
        }
    )
    model = build_model(MODEL, build_embedding(schema, config), schema)
    with pytest.raises(ConfigError, match=r"--exclude 'embedding\.\*'"):
        find_targets(model)
    names = [t.name for t in find_targets(model, exclude=["embedding.*"])]
    assert names and all(not n.startswith("embedding.") for n in names)
    assert "dnn.0" in names and "output" not in names and "dnn.6" not in names  # 1-wide


# --- the compressed model ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["pca", "svd"])
@pytest.mark.parametrize("include", [["embedding.*"], ["layers.*", "dnn.*"], ["*"]])
def test_full_rank_reproduces_the_original_outputs(
    schema: FeatureSchema, batch: Batch, method: str, include: list[str]
) -> None:
    model = _model(schema)
    targets = find_targets(model, include)
    assert targets
    components = _components(model, targets, batch)
    full = {
        t.name: t.out_features if method == "pca" else min(t.in_features, t.out_features)
        for t in targets
    }
    compressed = compress_model(
        model, MODEL, EMBEDDING, schema, targets, RankPlan(full, None), components, method
    )
    with torch.no_grad():
        expected = model(batch.features).logits["ctr"]
        got = compressed.model(batch.features).logits["ctr"]
    assert (got - expected).abs().max() < 1e-5
    factorised = [m for m in compressed.model.modules() if isinstance(m, FactorizedLinear)]
    assert len(factorised) == sum(t.kind == "linear" for t in targets)
    has_tables = any(t.kind == "embedding" for t in targets)
    assert isinstance(compressed.model.embedding, LowRankFieldEmbedding) == has_tables


def test_low_rank_changes_outputs_and_pca_beats_svd_before_fine_tuning(
    schema: FeatureSchema, batch: Batch
) -> None:
    """At the same reduced ranks activation PCA reconstructs the layer outputs better than
    weight SVD (it is optimal for the data's output distribution)."""
    model = _model(schema)
    targets = find_targets(model, ["dnn.*"])
    components = _components(model, targets, batch)
    plan = RankPlan({t.name: 2 for t in targets}, None)
    errors = {}
    for method in ("pca", "svd"):
        compressed = compress_model(
            model, MODEL, EMBEDDING, schema, targets, plan, components, method
        )
        with torch.no_grad():
            diff = (
                compressed.model(batch.features).logits["ctr"] - model(batch.features).logits["ctr"]
            )
        errors[method] = float(diff.square().mean())
    assert 0 < errors["pca"] < errors["svd"]


def test_target_ratio_meets_the_size_and_parameter_counts_follow_the_formulas(
    schema: FeatureSchema, batch: Batch
) -> None:
    model = _model(schema)
    targets = find_targets(model)
    components = _components(model, targets, batch)
    before = total_parameters(model)
    plan = choose_ranks(targets, components, before, target_ratio=2.0)
    looser = choose_ranks(targets, components, before, target_ratio=1.5)
    assert plan.energy is not None and looser.energy is not None
    assert plan.energy <= looser.energy
    compressed = compress_model(model, MODEL, EMBEDDING, schema, targets, plan, components)
    after = total_parameters(compressed.model)
    assert after <= before / 2.0
    assert after == planned_parameters(before, targets, plan.ranks)
    # independently: k(i + o) + o (+ k) per factorised Linear, N k + D k + D per table
    formula = before
    for t in targets:
        k = plan.ranks[t.name]
        if k is None:
            continue
        if t.kind == "linear":
            formula += k * (t.in_features + t.out_features) + t.out_features + k * t.has_bias
            formula -= t.in_features * t.out_features + t.out_features * t.has_bias
        else:
            formula += t.in_features * k + t.out_features * k + t.out_features
            formula -= t.in_features * t.out_features
    assert after == formula
    assert compressed.description["params_after"] == after
    with pytest.raises(ConfigError, match="out of reach"):
        choose_ranks(targets, components, before, target_ratio=1000.0)


def test_target_ratio_with_every_layer_pinned_checks_the_pinned_plan() -> None:
    # nothing is left to search: the pinned plan itself must be accepted or named
    target = Target("dnn.0", "linear", 100, 100, has_bias=True)
    components = {
        "dnn.0": PrincipalComponents(
            torch.linspace(1, 0, 100, dtype=torch.float64),
            torch.eye(100, dtype=torch.float64),
            torch.zeros(100, dtype=torch.float64),
        )
    }
    before = target.dense_parameters + 5000  # 15100, the budget at ratio 2 is 7550
    plan = choose_ranks([target], components, before, target_ratio=2.0, pinned={"dnn.0": 5})
    assert plan == RankPlan({"dnn.0": 5}, None)
    assert planned_parameters(before, [target], plan.ranks) == 6105
    # k=40: 40 * 200 + 100 + 40 + 5000 = 13140 parameters, 15100 / 13140 = 1.15x
    with pytest.raises(ConfigError, match=r"out of reach \(got 1\.15x with the pinned ranks"):
        choose_ranks([target], components, before, target_ratio=2.0, pinned={"dnn.0": 40})


def test_compressed_artifact_round_trips_with_its_factorised_layers(
    tmp_path: Path, schema: FeatureSchema, batch: Batch, data_dir: Path
) -> None:
    model = _model(schema)
    targets = find_targets(model)
    components = _components(model, targets, batch)
    plan = choose_ranks(targets, components, total_parameters(model), target_ratio=2.0)
    compressed = compress_model(model, MODEL, EMBEDDING, schema, targets, plan, components)
    plain = write_artifact(tmp_path, "m", model, MODEL, EMBEDDING, schema, {})
    path = write_artifact(
        tmp_path,
        "m",
        compressed.model,
        MODEL,
        compressed.embedding_config,
        schema,
        {},
        compression=compressed.description,
    )
    assert "compression" not in json.loads((plain / "config.json").read_text())
    config = json.loads((path / "config.json").read_text())
    factorised = {
        name: k
        for name, k in plan.ranks.items()
        if k is not None and not name.startswith("embedding.")
    }
    assert {layer["name"]: layer["rank"] for layer in config["compression"]["layers"]} == factorised
    assert config["embedding"]["variant"] == "lowrank"
    field_ranks = {
        name.split(".", 1)[1]: k
        for name, k in plan.ranks.items()
        if k is not None and name.startswith("embedding.")
    }
    assert config["embedding"]["lowrank"]["ranks"] == field_ranks
    for field, k in field_ranks.items():
        key = f"embedding.tables.embedding_bags.t_{field}.weight"
        assert config["tables"][key] == [schema.sparse_feature(field).num_embeddings, k]

    loaded = load_artifact(path)
    for name in factorised:
        assert isinstance(loaded.model.get_submodule(name), FactorizedLinear)
    assert total_parameters(loaded.model) == total_parameters(compressed.model)
    rows = pq.read_table(data_dir / "valid.parquet")
    expected = score_table(compressed.model, schema, rows)["ctr"]
    got = score_table(loaded.model, loaded.schema, rows)["ctr"]
    assert torch.equal(got, expected)


def _compressed(model: CTRModel, schema: FeatureSchema, batch: Batch) -> CompressedModel:
    """`model` with every Linear and table that can shrink at rank 2."""
    targets = find_targets(model)
    plan = RankPlan({t.name: 2 for t in targets}, None)
    return compress_model(
        model, MODEL, EMBEDDING, schema, targets, plan, _components(model, targets, batch)
    )


def test_a_compressed_model_is_refused_with_a_config_error(
    schema: FeatureSchema, batch: Batch
) -> None:
    compressed = _compressed(_model(schema), schema, batch)
    # Before: the inner Linears of each FactorizedLinear were found as targets, and the
    # rebuilt model then lacked them ("no submodule 'dnn.0.first'", or a RuntimeError).
    for include, exclude in ((["*"], []), (["*"], ["embedding.*"]), (["layers.*"], [])):
        with pytest.raises(ConfigError, match="already compressed"):
            find_targets(compressed.model, include, exclude)
    with pytest.raises(ConfigError, match="already compressed"):
        compress_model(
            compressed.model,
            MODEL,
            compressed.embedding_config,
            schema,
            [],
            RankPlan({}, None),
            {},
        )
    # low-rank tables alone (no factorised Linear) count as compressed too
    lowrank = EmbeddingConfig.model_validate(
        {"dim": 8, "variant": "lowrank", "lowrank": {"ranks": {"user_id": 2}}}
    )
    tables_only = build_model(MODEL, build_embedding(schema, lowrank), schema)
    with pytest.raises(ConfigError, match=r"already compressed \(got compressed layers"):
        find_targets(tables_only, exclude=["embedding.*"])
    # a model that its configs do not build is the caller's error, not a RuntimeError
    model = _model(schema)
    targets = find_targets(model, ["dnn.*"])
    deeper = MODEL.model_copy(update={"num_layers": MODEL.num_layers + 1})
    with pytest.raises(ConfigError, match="does not match the one its configs build"):
        compress_model(
            model,
            deeper,
            EMBEDDING,
            schema,
            targets,
            RankPlan({t.name: 2 for t in targets}, None),
            _components(model, targets, batch),
        )


def test_fine_tuning_keeps_the_best_valid_epoch(
    schema: FeatureSchema, splits: dict[str, list[Path]], batch: Batch
) -> None:
    model = _model(schema)
    targets = find_targets(model, ["dnn.*"])
    components = _components(model, targets, batch)
    plan = RankPlan({t.name: 2 for t in targets}, None)
    compressed = compress_model(model, MODEL, EMBEDDING, schema, targets, plan, components)
    before = {k: v.clone() for k, v in compressed.model.state_dict().items()}
    result = fine_tune(
        compressed.model,
        schema,
        splits["train"],
        splits["valid"],
        FineTuneConfig(epochs=2, dense_lr=3e-3, table_lr=0.05, batch_size=128, patience=2),
    )
    aucs = [h["auc"] for h in result.history]
    assert len(aucs) == 3
    assert result.best_epoch == int(np.argmax(aucs))
    assert evaluate(compressed.model, schema, splits["valid"])["auc"] == pytest.approx(
        aucs[result.best_epoch]
    )
    changed = any(not torch.equal(before[k], v) for k, v in compressed.model.state_dict().items())
    assert changed == (result.best_epoch > 0)


# --- the command ---------------------------------------------------------------------------------


def _trained_artifact(repo: Path, schema: FeatureSchema, splits: dict[str, list[Path]]) -> Path:
    """A tiny AutoInt+ trained for a few epochs in-process, written as an artifact whose
    metrics.json records its data folder (as the trainer does)."""
    model = _model(schema, seed=1)
    fine_tune(
        model,
        schema,
        splits["train"],
        splits["valid"],
        FineTuneConfig(epochs=4, dense_lr=3e-3, table_lr=0.05, batch_size=64, patience=4),
    )
    data = {"dataset": "parquet", "path": str(splits["train"][0].parent)}
    return write_artifact(repo, "tiny", model, MODEL, EMBEDDING, schema, {"data": data})


@pytest.mark.slow
def test_recsys_compress_writes_a_smaller_version_that_scores(
    tmp_path: Path,
    schema: FeatureSchema,
    splits: dict[str, list[Path]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = _trained_artifact(tmp_path, schema, splits)
    code = compress(
        ["--artifact", str(source.parent), "--target-ratio", "2", "--epochs", "1",
         "--compare-svd", "--batch-size", "128"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    new = source.parent / "2"
    loaded = load_artifact(source.parent)
    assert loaded.version == 2
    before = total_parameters(load_artifact(source).model)
    assert before / total_parameters(loaded.model) >= 2.0
    metrics = json.loads((new / "metrics.json").read_text())
    stages = metrics["compression"]["stages"]["test"]
    assert {"original", "compressed", "fine_tuned", "svd_compressed", "svd_fine_tuned"} <= set(
        stages
    )
    assert metrics["data"]["path"] == str(splits["train"][0].parent)
    config = json.loads((new / "config.json").read_text())
    assert config["compression"]["layers"], "no Linear was factorised"
    assert "per-layer ranks" in printed and "x smaller" in printed
    rows = pa.concat_tables([pq.read_table(p) for p in splits["test"]])
    probs = score_table(loaded.model, loaded.schema, rows)["ctr"]
    assert probs.shape == (rows.num_rows,) and torch.all((probs > 0) & (probs < 1))
    assert metrics["test"]["auc"] == pytest.approx(
        evaluate(loaded.model, loaded.schema, splits["test"])["auc"]
    )


def test_recsys_compress_reports_user_errors_on_one_line(
    tmp_path: Path,
    schema: FeatureSchema,
    splits: dict[str, list[Path]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = _model(schema)
    data = {"dataset": "parquet", "path": str(splits["train"][0].parent)}
    source = write_artifact(tmp_path, "tiny", model, MODEL, EMBEDDING, schema, {"data": data})
    code = compress(["--artifact", str(source), "--target-ratio", "1000", "--epochs", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert "target ratio 1000 is out of reach" in err and "Traceback" not in err
    assert [p.name for p in source.parent.iterdir()] == ["1"]  # nothing written
    assert compress(["--artifact", str(tmp_path / "missing"), "--energy", "0.9"]) == 2
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code = compress(["--artifact", str(source), "--energy", "0.9", "--model-repo", str(blocker)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"--model-repo: cannot use {blocker} as a folder" in err and "Traceback" not in err
    empty = tmp_path / "empty_train"
    empty.mkdir()
    for split, files in splits.items():
        table = pq.read_table(files[0])
        pq.write_table(table.slice(0, 0) if split == "train" else table, empty / f"{split}.parquet")
    code = compress(["--artifact", str(source), "--energy", "0.9", "--data", str(empty)])
    err = capsys.readouterr().err
    assert code == 2
    assert "the train split has no rows" in err and "Traceback" not in err


def test_recsys_compress_never_compresses_a_compressed_version(
    tmp_path: Path,
    schema: FeatureSchema,
    splits: dict[str, list[Path]],
    batch: Batch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = _model(schema)
    data = {"dataset": "parquet", "path": str(splits["train"][0].parent)}
    source = write_artifact(tmp_path, "tiny", model, MODEL, EMBEDDING, schema, {"data": data})
    compressed = _compressed(model, schema, batch)

    def write_compressed(metrics: dict) -> Path:
        return write_artifact(
            tmp_path,
            "tiny",
            compressed.model,
            MODEL,
            compressed.embedding_config,
            schema,
            metrics,
            compression=compressed.description,
        )

    recorded = write_compressed({"data": data, "compression": {"source": str(source)}})
    # a compressed version folder: refused on one line, naming the version it came from
    code = compress(["--artifact", str(recorded), "--energy", "0.9", "--epochs", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"--artifact {recorded} is already compressed" in err
    assert f"--artifact {source}" in err and "Traceback" not in err
    unrecorded = write_compressed({"data": data})
    code = compress(["--artifact", str(unrecorded), "--energy", "0.9", "--epochs", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "already compressed" in err and "MODEL_REPO/<name>/<version>" in err
    assert sorted(p.name for p in source.parent.iterdir()) == ["1", "2", "3"]  # nothing new

    # the model folder: its newest uncompressed version, said so
    code = compress(["--artifact", str(source.parent), "--energy", "0.9", "--epochs", "0"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"using {source}, the newest uncompressed version" in out
    written = json.loads((source.parent / "4" / "metrics.json").read_text())
    assert written["compression"]["source"] == str(source.resolve())

    # a model folder holding compressed versions only
    only = tmp_path / "only_compressed"
    write_artifact(
        only,
        "tiny",
        compressed.model,
        MODEL,
        compressed.embedding_config,
        schema,
        {"data": data, "compression": {"source": str(source)}},
        compression=compressed.description,
    )
    code = compress(["--artifact", str(only / "tiny"), "--energy", "0.9", "--epochs", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"as is every version of {only / 'tiny'}" in err and f"--artifact {source}" in err
