"""Session fixtures shared by the whole suite.

`ml100k_dir` is the real ml100k-ctr task. The only download (the ~2 MB recbole wheel, through
`pip download`) is cached under `$RECSYS_TEST_DATA` (default `~/.cache/recsys-test`), so a second
run does not touch the network; the splits themselves are rebuilt into a temporary folder every
session (about a second), so the tests never read splits written by an older version of the code.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recsys.data.movielens import prepare_ml100k_ctr


@pytest.fixture(scope="session")
def ml100k_cache_dir() -> Path:
    """Where the verified recbole wheel is kept between test sessions."""
    default = Path.home() / ".cache" / "recsys-test"
    return Path(os.environ.get("RECSYS_TEST_DATA", default))


@pytest.fixture(scope="session")
def ml100k_dir(ml100k_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the ml100k-ctr `{train,valid,test}.parquet` and `schema.yaml`."""
    out_dir = tmp_path_factory.mktemp("ml100k-ctr")
    prepare_ml100k_ctr(out_dir, data_dir=ml100k_cache_dir)
    return out_dir
