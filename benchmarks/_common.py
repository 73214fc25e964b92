"""What every benchmark records about the run (the code's git sha and the machine) and how it
picks up the cells a previous run saved.

Standard library only, so the benchmarks' worker subprocesses can import it cheaply.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def git_sha() -> str:
    """HEAD of the checkout the benchmark runs from ("unknown" outside git)."""
    out = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=False
    )
    return out.stdout.strip() or "unknown"


def machine() -> dict[str, Any]:
    """Platform, Python, CPU count and model, and memory of this machine."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        first = meminfo.read_text().splitlines()[0].split()
        info["memory_gb"] = round(int(first[1]) / 2**20, 1)
    return info


def saved_doc(output: Path, fresh: bool, smoke: bool) -> dict[str, Any]:
    """The document a previous full run saved at `output`, to resume from its cells; a fresh
    one ({"cells": {}}) with `--fresh`, in smoke mode (a smoke run checks today's plumbing, not
    a saved cell), when nothing is saved, or when what is saved came from a smoke run (its
    one-epoch cells are not measurements)."""
    if fresh or smoke or not output.exists():
        return {"cells": {}}
    doc: dict[str, Any] = json.loads(output.read_text())
    if doc.get("smoke"):
        return {"cells": {}}
    doc.setdefault("cells", {})
    return doc
