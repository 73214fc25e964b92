"""The committed stubs in serving/_pb are exactly what scripts/gen_protos.py makes from proto/."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def _gen_protos() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = module
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_up_to_date(tmp_path: Path) -> None:
    gen = _gen_protos()
    fresh = tmp_path / "_pb"
    written = gen.generate(fresh)
    assert {p.name for p in written} >= {"scoring_pb2.py", "scoring_pb2_grpc.py", "__init__.py"}
    stale = gen.differences(fresh, REPO / "serving" / "_pb")
    assert stale == [], f"serving/_pb is stale ({stale}); run python scripts/gen_protos.py"


def test_generated_modules_import_each_other_inside_serving(tmp_path: Path) -> None:
    gen = _gen_protos()
    for path in gen.generate(tmp_path / "_pb"):
        text = path.read_text()
        # `from recsys.v1 import` would resolve to the library package `recsys`
        assert "from recsys.v1" not in text and "import recsys.v1" not in text, path
    grpc_module = (tmp_path / "_pb" / "recsys" / "v1" / "scoring_pb2_grpc.py").read_text()
    assert "from serving._pb.recsys.v1 import scoring_pb2" in grpc_module


def test_a_changed_stub_is_reported(tmp_path: Path) -> None:
    gen = _gen_protos()
    first, second = tmp_path / "a", tmp_path / "b"
    gen.generate(first)
    gen.generate(second)
    assert gen.differences(first, second) == []  # deterministic output
    target = second / "recsys" / "v1" / "scoring_pb2.py"
    target.write_text(target.read_text() + "# edited by hand\n")
    assert gen.differences(first, second) == ["recsys/v1/scoring_pb2.py"]


def test_a_folder_with_other_files_is_never_wiped(tmp_path: Path) -> None:
    gen = _gen_protos()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match=r"holds files this script did not generate"):
        gen.generate(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
