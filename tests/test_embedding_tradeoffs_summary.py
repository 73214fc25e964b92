"""The arithmetic behind benchmarks/embedding_tradeoffs.py's claims: the fixed-d curve read at a
parameter count, paired per-seed differences, which DNIS point is the headline, and the
fine-tune control compared with its own fine-tuned fixed models (not the once-trained ones).

The cells here are hand-made (no training): each test plants AUCs whose answer is known.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import embedding_tradeoffs as et  # benchmarks/ is a script folder, not a package

D8, D16 = 25_344, 50_688


def _fixed(cells: dict[str, Any], aucs: dict[int, list[float]], prefix: str = "") -> None:
    for dim, per_seed in aucs.items():
        for seed, auc in enumerate(per_seed):
            cells[f"{prefix}fixed/d{dim}/seed{seed}"] = {
                "test_auc": auc,
                "embedding_params": 3_168 * dim,  # ml100k-ctr's rows over all fields
            }


def _dnis(cells: dict[str, Any], start: str, aucs: list[float], target: float = 0.5) -> None:
    for seed, auc in enumerate(aucs):
        cells[et.dnis_name(target, seed, start)] = {
            "test_auc": auc,
            "embedding_params": int(target * D16),
            "kept_widths": [4, 8, 16],
        }


def test_the_curve_is_read_linearly_in_log_parameters_and_not_outside_it() -> None:
    curve = [[1_000.0, 0.70], [4_000.0, 0.74]]
    assert et.interpolate(curve, 2_000.0) == pytest.approx(0.72)  # halfway in log(params)
    assert et.interpolate(curve, 1_000.0) == pytest.approx(0.70)
    assert et.interpolate(curve, 999.0) is None
    assert et.interpolate(curve, 4_001.0) is None
    assert et.interpolate(curve[:1], 1_000.0) is None


def test_paired_differences_have_the_sample_standard_error() -> None:
    diffs = [0.003, -0.001, 0.0025, 0.0]
    got = et.paired(diffs)
    assert got["mean"] == pytest.approx(np.mean(diffs))
    assert got["se"] == pytest.approx(np.std(diffs, ddof=1) / math.sqrt(len(diffs)))
    assert et.paired([0.002])["se"] is None


def test_a_dnis_point_is_held_against_each_seeds_own_curve_and_d16() -> None:
    cells: dict[str, Any] = {}
    _fixed(cells, {8: [0.770, 0.780, 0.790], 16: [0.772, 0.784, 0.794]})
    _dnis(cells, "scratch", [0.771, 0.783, 0.789])
    summary = et.summarise(cells, {})
    point = summary["dnis_points"][0]
    assert point["embedding_params"] == D8
    # at d=8's count the curve is d=8's mean; the DNIS mean (0.781) is 0.001 above it
    assert point["fixed_curve_auc_at_same_params"] == pytest.approx(0.780)
    assert point["above_fixed_curve"]
    assert point["minus_fixed_curve_paired"]["per_seed"] == pytest.approx([0.001, 0.003, -0.001])
    assert point["minus_d16_paired"]["per_seed"] == pytest.approx([-0.001, -0.001, -0.005])
    assert point["params_ratio_vs_d16"] == pytest.approx(2.0)
    assert not point["at_least_d16_auc"]
    assert summary["dnis_test_auc"] == pytest.approx(0.781)


def test_the_headline_is_the_first_point_that_meets_the_bar_else_the_first_point() -> None:
    cells: dict[str, Any] = {}
    _fixed(cells, {8: [0.780] * 3, 16: [0.785] * 3})
    _dnis(cells, "finetune", [0.779] * 3)  # DNIS_POINTS' first: below the curve
    assert et.summarise(cells, {})["dnis_headline_retrain_from"] == "finetune"
    _dnis(cells, "searched", [0.786] * 3)  # later in DNIS_POINTS, above the curve and d=16
    summary = et.summarise(cells, {})
    assert summary["dnis_headline_retrain_from"] == "searched"
    assert summary["dnis_test_auc"] == pytest.approx(0.786)
    assert [p["retrain_from"] for p in summary["dnis_points"]] == ["finetune", "searched"]


def test_the_first_dnis_point_is_what_search_dims_runs_by_default() -> None:
    """The headline falls back to DNIS_POINTS' first point: it must be the recipe of
    configs/dnis_ml100k.yaml as shipped (start, learning-rate scale, target, score, width)."""
    from training.config import load_config

    cfg = load_config(et.DNIS, [])
    start, target, score, dim = et.DNIS_POINTS[0]
    retrain_from, overrides = et.STARTS[start]
    assert retrain_from == cfg.search.retrain_from
    assert overrides == (f"search.retrain_lr_scale={cfg.search.retrain_lr_factor:g}",)
    assert (target, score, dim) == (
        cfg.search.target_ratio,
        cfg.search.prune_score,
        cfg.embedding.dim,
    )
    # the fine-tune control trains the fixed models again at the rates this retrain uses
    factor = cfg.search.retrain_lr_factor
    assert (
        f"train.dense_lr={cfg.train.dense_lr * factor:g}",
        f"train.table_lr={cfg.train.table_lr * factor:g}",
    ) == et.FINETUNE


def test_the_finetune_control_compares_with_the_fine_tuned_fixed_models() -> None:
    cells: dict[str, Any] = {}
    _fixed(cells, {8: [0.778] * 3, 16: [0.780] * 3})
    _fixed(cells, {8: [0.779] * 3, 16: [0.783] * 3}, et.FINETUNE_PREFIX)
    _dnis(cells, "finetune", [0.781] * 3)
    summary = et.summarise(cells, {})
    head = summary["dnis_points"][0]
    assert head["at_least_d16_auc"]  # above the once-trained d=16 (0.780) ...
    control = summary["finetune_control"]
    assert control["d16_test_auc"] == pytest.approx(0.783)
    assert control["overrides"] == list(et.FINETUNE)
    assert not control["dnis"]["at_least_d16_auc"]  # ... but not the fine-tuned one
    assert control["dnis"]["minus_d16_paired"]["mean"] == pytest.approx(-0.002)
    assert control["dnis"]["fixed_curve_auc_at_same_params"] == pytest.approx(0.779)
    # the 10-epoch curve is not mixed with the fine-tuned cells
    assert summary["d16_test_auc"] == pytest.approx(0.780)


def test_no_finetune_cells_no_control_section() -> None:
    cells: dict[str, Any] = {}
    _fixed(cells, {8: [0.778], 16: [0.780]})
    assert "finetune_control" not in et.summarise(cells, {})


def test_extra_seeds_feed_the_five_seed_section_and_leave_the_headline_at_three() -> None:
    cells: dict[str, Any] = {}
    _fixed(cells, {8: [0.780, 0.780, 0.780, 0.770, 0.770], 16: [0.790] * 3 + [0.775] * 2})
    _dnis(cells, "finetune", [0.785] * 3 + [0.776] * 2)
    summary = et.summarise(cells, {})
    # the three-seed headline reads seeds 0-2 only
    assert summary["d16_test_auc"] == pytest.approx(0.790)
    assert summary["dnis_test_auc"] == pytest.approx(0.785)
    assert summary["dnis_points"][0]["seeds"] == 3
    five = summary["five_seeds"]
    assert five["seeds"] == list(et.FIVE_SEEDS)
    assert five["fixed_cells"]["d16"] == 5
    assert five["d16_test_auc"] == pytest.approx((3 * 0.790 + 2 * 0.775) / 5)
    point = five["dnis_points"][0]
    assert point["retrain_from"] == "finetune"
    assert point["seeds"] == 5
    assert point["test_auc"] == pytest.approx((3 * 0.785 + 2 * 0.776) / 5)
    assert point["minus_d16_paired"]["per_seed"] == pytest.approx([-0.005] * 3 + [0.001] * 2)
    assert point["minus_fixed_curve_paired"]["per_seed"] == pytest.approx([0.005] * 3 + [0.006] * 2)
    assert "finetune_control" not in five  # no extra seed's fine-tuned fixed cells yet
    # the control over five seeds once its extra cells exist; the three-seed one stays at three
    _fixed(cells, {8: [0.781] * 5, 16: [0.791] * 3 + [0.777] * 2}, et.FINETUNE_PREFIX)
    summary = et.summarise(cells, {})
    assert summary["finetune_control"]["d16_test_auc"] == pytest.approx(0.791)
    control = summary["five_seeds"]["finetune_control"]
    assert control["d16_test_auc"] == pytest.approx((3 * 0.791 + 2 * 0.777) / 5)
    assert control["dnis"]["minus_d16_paired"]["per_seed"] == pytest.approx(
        [-0.006] * 3 + [-0.001] * 2
    )


def test_no_extra_seed_cells_no_five_seed_section() -> None:
    cells: dict[str, Any] = {}
    _fixed(cells, {8: [0.778] * 3, 16: [0.780] * 3})
    assert "five_seeds" not in et.summarise(cells, {})
