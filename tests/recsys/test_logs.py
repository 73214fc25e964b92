"""recsys.logs: the project's loggers at INFO, third-party and root-logged INFO dropped,
warnings from anywhere kept. Run in a fresh interpreter: it configures the root logger."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import logging
from recsys.logs import configure_logging, quiet_libraries
configure_logging("%(name)s|%(levelname)s|%(message)s")
logging.getLogger("training.loop").info("ours-training")
logging.getLogger("recsys.search.dnis").info("ours-recsys")
logging.getLogger("serving.server").info("ours-serving")
logging.getLogger("torchrec.distributed.planner.stats").info("library-info")
logging.info("root-info")  # how fbgemm_gpu logs
logging.getLogger("torchrec.distributed.utils").warning("library-warning")
logging.warning("root-warning")
logging.getLogger("training.loop").debug("ours-debug")
quiet_libraries(logging.DEBUG)
logging.getLogger("training.loop").debug("ours-debug-after")
logging.getLogger("torchrec.x").debug("library-debug-after")
"""


def test_project_info_and_all_warnings_show_library_info_does_not() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True
    )
    shown = [line.split("|")[2] for line in done.stderr.splitlines() if line.count("|") == 2]
    assert shown == [
        "ours-training",
        "ours-recsys",
        "ours-serving",
        "library-warning",
        "root-warning",
        "ours-debug-after",  # a lower level reaches the project's loggers only
    ]
