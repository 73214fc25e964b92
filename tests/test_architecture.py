"""Dependency rules that import-linter cannot see: what importing a package drags in."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("serving", ["ray", "training"]),
        ("recsys.artifact", ["ray", "training", "serving", "grpc"]),
        ("recsys.cli", ["ray", "training", "serving", "torch"]),
    ],
)
def test_import_leaves_forbidden_modules_out(package: str, forbidden: list[str]) -> None:
    code = f"import sys, {package}; print(','.join(m for m in {forbidden!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "", f"importing {package} imported {out.stdout.strip()}"
