"""A throwaway Ray cluster on loopback for the slow cluster tests: a head node and optional
worker nodes, each a `ray start --block` process in its own process group, with token auth on.

Nodes are stopped by signalling the process groups this helper started (never `ray stop`,
which would stop every Ray on the machine). Ports are chosen free; the temp dir is short, as
Ray's Unix socket paths must stay under about 100 characters.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalCluster:
    """`address` (host:port of the GCS) for `--address`, `dashboard_url` for `ray job` and
    the state API, `env` for every process that talks to it (it carries the auth token)."""

    address: str
    dashboard_url: str
    env: dict[str, str]
    temp_dir: Path
    nodes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def add_worker_node(self, num_cpus: int) -> None:
        self.nodes.append(
            _start_node(
                [
                    f"--address={self.address}",
                    f"--num-cpus={num_cpus}",
                    f"--dashboard-agent-listen-port={free_port()}",
                ],
                self.env,
                self.temp_dir,
            )
        )

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Runs the `ray` CLI against this cluster."""
        return subprocess.run(
            [str(BIN / "ray"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def alive_actors(self, class_name: str) -> list[dict[str, Any]]:
        """ALIVE actors of a class, through Ray's state API (`ray.util.state.list_actors`)."""
        code = (
            "import json, sys\n"
            "from ray.util.state import list_actors\n"
            "actors = list_actors(address=sys.argv[1], filters=[('class_name', '=', sys.argv[2]),"
            " ('state', '=', 'ALIVE')], detail=True)\n"
            "print(json.dumps([{'pid': a.pid, 'node_id': a.node_id, 'actor_id': a.actor_id}"
            " for a in actors]))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, self.dashboard_url, class_name],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return list(json.loads(out.stdout.strip().splitlines()[-1]))

    def alive_nodes(self) -> int:
        code = (
            "import sys\n"
            "from ray.util.state import list_nodes\n"
            "print(len(list_nodes(address=sys.argv[1], filters=[('state', '=', 'ALIVE')])))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, self.dashboard_url],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return int(out.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        """SIGTERM to each node's process group (workers first), SIGKILL what is left."""
        for node in reversed(self.nodes):
            _signal_group(node, signal.SIGTERM)
        deadline = time.monotonic() + 8
        for node in reversed(self.nodes):
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait(timeout=max(1.0, deadline - time.monotonic()))
            _signal_group(node, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _signal_group(node: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # the node's own process group: it was started in a new session
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.pid, sig)


def _start_node(args: list[str], env: dict[str, str], temp_dir: Path) -> subprocess.Popen[bytes]:
    log = open(temp_dir / f"node-{len(list(temp_dir.glob('node-*.log')))}.log", "wb")  # noqa: SIM115
    return subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            *args,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def start_head(num_cpus: int, timeout_s: float = 120) -> LocalCluster:
    """Starts a head node with the dashboard (job server, state API) and waits until its
    state API answers."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    port, dashboard_port = free_port(), free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_TRAIN_V2_ENABLED": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("RAY_ADDRESS", None)
    cluster = LocalCluster(
        address=f"127.0.0.1:{port}",
        dashboard_url=f"http://127.0.0.1:{dashboard_port}",
        env=env,
        temp_dir=temp_dir,
    )
    cluster.nodes.append(
        _start_node(
            [
                "--head",
                f"--port={port}",
                f"--num-cpus={num_cpus}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard_port}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--ray-client-server-port={free_port()}",
            ],
            env,
            temp_dir,
        )
    )
    wait_for(lambda: _answers(cluster), timeout_s, "the Ray head's state API", cluster)
    return cluster


def _answers(cluster: LocalCluster) -> bool:
    try:
        return cluster.alive_nodes() >= 1
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, ValueError, IndexError):
        return False


def wait_for(
    condition: Any, timeout_s: float, what: str, cluster: LocalCluster | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1.0)
    logs = ""
    if cluster is not None:
        logs = "\n".join(p.read_text()[-2000:] for p in sorted(cluster.temp_dir.glob("node-*.log")))
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{logs}")
