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
# the known lines every worker printed are dropped, others of the same loggers are not
logging.warning("Sharding spec not found for embedding.tables.t_user_id")
logging.getLogger("torchrec.distributed.utils").warning(
    "Sharding Type is data_parallel, caching params will be ignored")
logging.getLogger("torch.fx._symbolic_trace").warning("is_fx_tracing will return true for both")
logging.getLogger("torchrec.distributed.utils").warning("Sharding spec not found for x")
logging.getLogger("torch.fx._symbolic_trace").warning("fx-other-warning")
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
        "Sharding spec not found for x",  # on another logger than the planner's
        "fx-other-warning",
        "ours-debug-after",  # a lower level reaches the project's loggers only
    ]


WARNINGS_SCRIPT = """
import warnings
from recsys.logs import quiet_libraries
quiet_libraries()
warnings.warn("`broadcast_buffers` is deprecated. Use `forward_sync_buffers`", FutureWarning)
warnings.warn("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning)
warnings.warn("fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel was not "
              "registered to the Autograd key(s)", UserWarning)
warnings.warn("other-library-future", FutureWarning)
warnings.warn("fbgemm::some_other_op: an autograd kernel was not registered", UserWarning)
warnings.warn("Please use DTensor instead and we are deprecating ShardedTensor.", UserWarning)
"""


def test_only_the_known_library_warnings_are_dropped() -> None:
    """The three library warnings every worker printed are dropped by message and category;
    another message, or the same message in another category, still shows."""
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", WARNINGS_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    shown = [line for line in done.stderr.splitlines() if "Warning: " in line]
    assert len(shown) == 3, done.stderr
    assert "FutureWarning: other-library-future" in shown[0]
    assert "UserWarning: fbgemm::some_other_op" in shown[1]
    assert "UserWarning: Please use DTensor" in shown[2]
