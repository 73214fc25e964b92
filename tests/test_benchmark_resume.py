"""Which saved cells a benchmark resumes from (benchmarks/_common.py `saved_doc`): a full run
picks up a full run's cells; `--fresh`, smoke mode and a smoke run's document start over, so a
smoke run never stands in for a measurement and `make test` always trains its cells."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import saved_doc  # benchmarks/ is a script folder, not a package

FULL = {"smoke": False, "cells": {"autoint/seed0": {"test_auc": 0.779}}, "summary": {}}


def _write(tmp_path: Path, doc: dict[str, object]) -> Path:
    output = tmp_path / "bench.json"
    output.write_text(json.dumps(doc))
    return output


def test_a_full_run_resumes_from_a_full_runs_cells(tmp_path: Path) -> None:
    doc = saved_doc(_write(tmp_path, FULL), fresh=False, smoke=False)
    assert doc["cells"] == FULL["cells"]


@pytest.mark.parametrize(("fresh", "smoke"), [(True, False), (False, True), (True, True)])
def test_fresh_and_smoke_runs_start_over(tmp_path: Path, fresh: bool, smoke: bool) -> None:
    assert saved_doc(_write(tmp_path, FULL), fresh=fresh, smoke=smoke) == {"cells": {}}


def test_a_full_run_does_not_resume_from_a_smoke_runs_cells(tmp_path: Path) -> None:
    output = _write(tmp_path, {**FULL, "smoke": True})
    assert saved_doc(output, fresh=False, smoke=False) == {"cells": {}}


def test_nothing_saved_starts_over_and_a_doc_without_cells_gets_them(tmp_path: Path) -> None:
    assert saved_doc(tmp_path / "missing.json", fresh=False, smoke=False) == {"cells": {}}
    doc = saved_doc(_write(tmp_path, {"smoke": False}), fresh=False, smoke=False)
    assert doc == {"smoke": False, "cells": {}}
