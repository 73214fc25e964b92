"""The compose file's services, run as local processes on loopback (no Docker engine here).

Each service's command is read from docker/docker-compose.yml and run with only what a
container gives for free swapped for local equivalents: the service names and 0.0.0.0 become
127.0.0.1, fixed ports become free ones, the /models and /data volumes become temp folders,
and each Ray node gets its own temp dir. Then a training job is submitted with `ray job submit`
as the compose file's header shows, the server picks up the exported version, and a ranking
request is scored through it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from serving.client import ScoringClient
from tests.training.ray_cluster import BIN, REPO, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
COMPOSE = REPO / "docker" / "docker-compose.yml"


def _localise(command: str, replace: dict[str, str], volumes: dict[str, Path]) -> list[str]:
    """The compose command with container-only values swapped for local ones."""
    args = []
    for arg in shlex.split(command):
        for old, new in replace.items():
            arg = arg.replace(old, new)
        for mount, local in volumes.items():
            if arg == mount or arg.startswith(mount + "/"):
                arg = str(local) + arg[len(mount) :]
        args.append(arg)
    return args


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    executable = BIN / args[0]
    return subprocess.Popen(
        [str(executable) if executable.exists() else args[0], *args[1:]],
        env=env,
        stdout=log.open("ab"),  # a restarted service appends, as compose keeps its log
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _wait(condition: object, timeout_s: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(1.0)
    tails = "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in logs if p.exists()
    )
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{tails}")


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    work = tmp_path_factory.mktemp("compose")
    volumes = {"/models": work / "models", "/data": work / "data"}
    for folder in volumes.values():
        folder.mkdir()
    gcs, dashboard, grpc_port, metrics = free_port(), free_port(), free_port(), free_port()
    replace = {
        "ray-head:6379": f"127.0.0.1:{gcs}",
        "--port=6379": f"--port={gcs}",
        "--dashboard-host=0.0.0.0": "--dashboard-host=127.0.0.1",
        "0.0.0.0": "127.0.0.1",
        "50051": str(grpc_port),
        "9100": str(metrics),
    }
    env = {
        **os.environ,
        # the compose file's environment, with a fresh token
        **{k: str(v) for k, v in compose["ray-head"]["environment"].items()},
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RECSYS_DATA": str(volumes["/data"]),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("RAY_ADDRESS", None)
    temp = Path(tempfile.mkdtemp(prefix="cp", dir="/tmp"))  # Ray's socket paths must be short
    # Local-only additions: a node needs its own temp dir, loopback address and free ports,
    # which a container gets from its own network namespace.
    node_args = ["--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--num-cpus=2"]
    head_args = [
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--include-dashboard=true",
    ]
    logs = [work / "ray-head.log", work / "ray-worker.log", work / "server.log"]
    processes = []
    try:
        head = _localise(compose["ray-head"]["command"], replace, volumes)
        processes.append(_start([*head, *node_args, *head_args], env, logs[0]))
        dashboard_url = f"http://127.0.0.1:{dashboard}"

        def nodes_alive() -> int:
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    (
                        "import sys; from ray.util.state import list_nodes; "
                        "print(len(list_nodes(address=sys.argv[1], "
                        "filters=[('state','=','ALIVE')])))"
                    ),
                    dashboard_url,
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0

        _wait(lambda: nodes_alive() >= 1, 180, "the Ray head", logs)
        worker = _localise(compose["ray-worker"]["command"], replace, volumes)

        def start_worker() -> subprocess.Popen[bytes]:
            args = [*worker, *node_args, f"--dashboard-agent-listen-port={free_port()}"]
            return _start(args, env, logs[1])

        processes.append(start_worker())
        restarts = 0

        def worker_joined() -> bool:
            # compose restarts a node that exits (`restart: unless-stopped`); so does this, up
            # to twice: on a loaded machine `ray start` can give up on the head's GCS (its 30 s
            # "node timed out during startup") before the node ever registers
            nonlocal restarts
            if processes[-1].poll() is not None and restarts < 2:
                restarts += 1
                processes[-1] = start_worker()
            return nodes_alive() == 2

        _wait(worker_joined, 180, "the Ray worker node", logs)
        server = _localise(compose["server"]["command"], replace, volumes)
        processes.append(_start(server, env, logs[2]))
        yield {
            "env": env,
            "dashboard_url": dashboard_url,
            "volumes": volumes,
            "server": f"127.0.0.1:{grpc_port}",
            "logs": logs,
            "work": work,
        }
    finally:
        for process in reversed(processes):
            _stop(process)


def test_compose_services_train_through_a_job_and_serve_it(
    services: dict[str, object], ml100k_dir: Path
) -> None:
    env, volumes = services["env"], services["volumes"]
    assert isinstance(env, dict) and isinstance(volumes, dict)
    # the submission the compose file documents, with its /app and volume paths made local
    submitted = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            str(services["dashboard_url"]),
            "--runtime-env-json",
            json.dumps({"env_vars": {"OMP_NUM_THREADS": "1"}}),
            "--",
            sys.executable,
            "-m",
            "recsys.cli",
            "train",
            "--config",
            str(REPO / "configs" / "autoint_ml100k.yaml"),
            "--address",
            "auto",
            "--set",
            f"output.model_repo={volumes['/models']}",
            "--set",
            f"output.run_root={volumes['/data'] / 'runs'}",
            "--set",
            f"data.path={ml100k_dir}",
            "--set",
            "train.max_epochs=1",
            "--set",
            "ray.collective_timeout_s=60",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-4000:]
    assert (volumes["/models"] / "autoint_ml100k" / "1" / "manifest.json").exists()

    logs = services["logs"]
    assert isinstance(logs, list)
    with ScoringClient(str(services["server"]), timeout_s=30) as client:

        def serving() -> bool:
            try:
                return client.health("autoint_ml100k") == "SERVING"
            except Exception:  # noqa: BLE001 - the server may still be starting
                return False

        _wait(serving, 180, "the server to load version 1", logs)
        result = client.rank("autoint_ml100k", {"user_id": "196"}, ["242", "302", "377"])
    assert (result.model, result.version) == ("autoint_ml100k", 1)
    probabilities = result.scores["ctr"]
    assert probabilities.shape == (3,) and ((probabilities > 0) & (probabilities < 1)).all()
