"""The model artifact: write, verify, load. The only contract between training and serving.

Layout: `MODEL_REPO/<name>/<version>/` with
  manifest.json   format_version, sha256 of every other file, created_at, git sha
  config.json     registry key + model config, embedding config, per-table shapes, tasks
  schema.json     the FeatureSchema (+ vocab/<feature>.parquet)
  metrics.json    metrics measured at export
  model.safetensors  full, unsharded weights (never pickle)
  side/user.parquet, side/item.parquet  entity features keyed by id (when the data has ids)
An artifact is written to a temporary folder and renamed into place, so a reader never sees a
half-written version; it is never modified afterwards.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ValidationError
from safetensors.torch import load_file, save_file

from recsys.compression.factorized import apply_compression
from recsys.embeddings import EmbeddingConfig, build_embedding
from recsys.errors import ArtifactError, ConfigError
from recsys.features.batch import features_from_encoded
from recsys.features.schema import FeatureSchema
from recsys.models.outputs import CTRModel
from recsys.models.registry import build_model, model_spec

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class Artifact:
    """A loaded, verified artifact: the model in eval mode plus everything that describes it."""

    path: Path
    name: str
    version: int
    model: CTRModel
    schema: FeatureSchema
    model_config: BaseModel
    embedding_config: EmbeddingConfig
    metrics: dict[str, Any]
    manifest: dict[str, Any]

    def side_table(self, entity: str) -> pa.Table | None:
        """The side table of `user` or `item` features keyed by id, if the artifact has one."""
        path = self.path / "side" / f"{entity}.parquet"
        return pq.read_table(path) if path.exists() else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def _plain_folder_mode(private_dir: Path) -> int:
    """The permission bits `mkdir` gives a new folder under this process's umask.

    Read from a probe folder made inside `private_dir` (a folder only this writer uses, so the
    fixed name cannot clash) rather than with os.umask(), which can only be read by setting it
    and so would race with other threads creating files meanwhile.
    """
    probe = private_dir / ".mode-probe"
    probe.mkdir()
    try:
        return probe.stat().st_mode & 0o777
    finally:
        probe.rmdir()


def list_versions(model_dir: Path) -> list[int]:
    """Integer version folders under `MODEL_REPO/<name>/`, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def write_artifact(
    model_repo: Path,
    name: str,
    model: CTRModel,
    model_config: BaseModel,
    embedding_config: EmbeddingConfig,
    schema: FeatureSchema,
    metrics: dict[str, Any],
    side_tables: dict[str, pa.Table] | None = None,
    compression: dict[str, Any] | None = None,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Writes a new version of `name` and returns its folder.

    `model` must be unsharded (full tables); its state dict is saved as safetensors.
    `compression` (from `recsys compress`) lists the factorised layers; it is stored in
    config.json so `load_artifact` rebuilds them before loading the weights.
    `check` (a parity check, say) gets the finished but unpublished folder, which
    `load_artifact` accepts; if it raises, no version is claimed and nothing is left behind,
    so a server watching the repo never loads an artifact that failed it, and a retried job
    does not leave a second copy.
    """
    model_dir = Path(model_repo) / name
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".writing-", dir=model_dir))
    except OSError as e:
        raise ArtifactError(
            f"artifact: cannot write a new version under {model_dir} ({e.strerror}); make it "
            f"writable or choose another model repo"
        ) from e
    try:
        schema.save(tmp)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        tables = {k: list(v.shape) for k, v in state.items() if ".embedding_bags." in k}
        config = {
            "model": model_config.model_dump(mode="json"),
            "embedding": embedding_config.model_dump(mode="json"),
            "tables": tables,
            "served_tasks": list(model.served_tasks),
            "trained_tasks": list(model.trained_tasks),
        }
        if compression is not None:
            config["compression"] = compression
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if side_tables:
            (tmp / "side").mkdir()
            for entity, table in side_tables.items():
                pq.write_table(table, tmp / "side" / f"{entity}.parquet")
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "git_sha": _git_sha(),
            "files": {str(p.relative_to(tmp)): _sha256(p) for p in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        for p in [*files, tmp / MANIFEST]:
            p.chmod(0o444)
        # mkdtemp makes the folder 0700 whatever the umask, so a server running as another
        # user (a container mounting the model repo read-only) could not read the artifact.
        tmp.chmod(_plain_folder_mode(tmp))
        if check is not None:
            check(tmp)
        # Claim the next version with an atomic rename; retry if another writer won the race.
        for _ in range(100):
            version = (list_versions(model_dir) or [0])[-1] + 1
            target = model_dir / str(version)
            try:
                os.rename(tmp, target)
            except OSError as e:
                # The race shows as "exists" or, for a non-empty folder, "not empty"; any
                # other failure (permissions, a read-only disk) would fail every retry too.
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    continue
                raise ArtifactError(
                    f"artifact: cannot move the new artifact into {target} ({e.strerror}); "
                    f"make {model_dir} writable or choose another model repo"
                ) from e
            logger.info("wrote artifact %s", target)
            return target
        raise ArtifactError(f"artifact: could not claim a version folder under {model_dir}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_version_dir(path: Path) -> Path:
    """Accepts a version folder, or a model folder (then the newest version is used)."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return path
    versions = list_versions(path)
    if versions:
        return path / str(versions[-1])
    raise ArtifactError(
        f"artifact: {path} is neither an artifact version folder (no "
        f"{MANIFEST}) nor a model folder with integer versions; pass "
        f"MODEL_REPO/<name> or MODEL_REPO/<name>/<version>"
    )


def verify_artifact(path: Path) -> dict[str, Any]:
    """Checks format_version and every file's sha256; returns the manifest.

    Raises:
        ArtifactError: naming the file that is missing, extra or changed.
    """
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError as e:
        raise ArtifactError(f"artifact {path}: {MANIFEST} is missing") from e
    except json.JSONDecodeError as e:
        raise ArtifactError(f"artifact {path}: {MANIFEST} is not valid JSON ({e})") from e
    got = manifest.get("format_version")
    if got != FORMAT_VERSION:
        raise ArtifactError(
            f"artifact {path}: format_version {got!r} is not supported "
            f"(expected {FORMAT_VERSION}); re-export it with this version"
        )
    for rel, expected in manifest["files"].items():
        file = path / rel
        if not file.exists():
            raise ArtifactError(f"artifact {path}: file {rel} listed in the manifest is missing")
        actual = _sha256(file)
        if actual != expected:
            raise ArtifactError(
                f"artifact {path}: checksum mismatch for {rel} (got sha256 "
                f"{actual[:12]}..., expected {expected[:12]}...); the file was "
                f"modified or corrupted, re-export the model"
            )
    return manifest


def load_artifact(path: str | Path) -> Artifact:
    """Verifies and loads an artifact (a version folder, or a model folder -> newest version)."""
    path = resolve_version_dir(Path(path))
    manifest = verify_artifact(path)
    config = json.loads((path / "config.json").read_text())
    spec = model_spec(config["model"]["name"])
    try:
        model_config = spec.config_class.model_validate(config["model"])
        embedding_config = EmbeddingConfig.model_validate(config["embedding"])
    except ValidationError as e:
        raise ArtifactError(
            f"artifact {path}: config.json does not match this version's "
            f"model config ({e.errors()[0]['msg']})"
        ) from e
    schema = FeatureSchema.load(path)
    model = build_model(model_config, build_embedding(schema, embedding_config), schema)
    if "compression" in config:
        try:
            apply_compression(model, config["compression"])
        except ConfigError as e:
            raise ArtifactError(f"artifact {path}: config.json compression: {e}") from e
    state = load_file(str(path / WEIGHTS))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ArtifactError(
            f"artifact {path}: weights do not match the model built from "
            f"config.json (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ArtifactError(
                f"artifact {path}: weight '{key}' has shape "
                f"{tuple(tensor.shape)} (expected {tuple(expected[key].shape)})"
            )
    model.load_state_dict(state)
    model.eval()
    metrics = json.loads((path / "metrics.json").read_text())
    return Artifact(
        path=path,
        name=manifest["name"],
        # 0: a staged folder not yet published (write_artifact's `check` loads it)
        version=int(path.name) if path.name.isdigit() else 0,
        model=model,
        schema=schema,
        model_config=model_config,
        embedding_config=embedding_config,
        metrics=metrics,
        manifest=manifest,
    )


@torch.inference_mode()
def score_table(
    model: CTRModel, schema: FeatureSchema, table: pa.Table, batch_size: int = 8192
) -> dict[str, torch.Tensor]:
    """Probabilities of every served task for raw rows, through encode -> Features -> model."""
    model.eval()
    outputs: dict[str, list[torch.Tensor]] = {t: [] for t in model.served_tasks}
    for start in range(0, table.num_rows, batch_size):
        chunk = schema.encode(table.slice(start, batch_size), require_labels=False)
        probs = model.probabilities(model(features_from_encoded(schema, chunk)))
        for task, p in probs.items():
            outputs[task].append(p)
    return {t: torch.cat(v) if v else torch.zeros(0) for t, v in outputs.items()}
