"""The serving half of `make demo`: start `recsys serve` on the demo's model repository, rank a
few ml100k users' candidate lists through gRPC (ids only: the server fills user and item
features from the artifact's side tables), print the scores next to the eager model's scores
computed through the training path, and stop the server with SIGTERM.

    python scripts/demo_serve.py --model-repo demo_runs/model_repo --model autoint_ml100k
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.artifact import load_artifact, score_table
from serving.client import ScoringClient

NUM_USERS = 3
NUM_CANDIDATES = 8


def start_server(model_repo: Path) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "recsys.cli",
            "serve",
            "--model-repo",
            str(model_repo),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 120
    for line in process.stdout:
        if line.startswith("serving on "):
            return process, line.split()[2]
        if time.monotonic() > deadline:
            break
    process.kill()
    raise SystemExit("demo: the server did not announce its address within 120 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repo", type=Path, required=True)
    parser.add_argument("--model", required=True)
    args = parser.parse_args()

    artifact = load_artifact(args.model_repo / args.model)
    valid_path = Path(artifact.metrics["data"]["path"]) / "valid.parquet"
    valid = pq.read_table(valid_path)
    items = artifact.side_table("item")
    assert items is not None and artifact.schema.dataset.item is not None
    item_column = artifact.schema.dataset.item.id_column
    rng = np.random.default_rng(0)
    users = valid["user_id"].unique().to_pylist()[:NUM_USERS]
    users_side = artifact.side_table("user")
    assert users_side is not None

    process, address = start_server(args.model_repo)
    try:
        with ScoringClient(address, timeout_s=30) as client:
            deadline = time.monotonic() + 120
            while client.health(args.model) != "SERVING":
                if time.monotonic() > deadline:
                    raise SystemExit("demo: the model did not become SERVING within 120 s")
                time.sleep(0.2)
            worst = 0.0
            for user in users:
                candidates = rng.choice(
                    items[item_column].to_numpy(zero_copy_only=False), NUM_CANDIDATES, replace=False
                ).tolist()
                served = client.rank(args.model, {"user_id": user}, candidates)
                # eager: the same rows built by hand from the side tables, training path
                user_row = users_side.filter(pc.equal(users_side["user_id"], user))
                rows = items.take(
                    pa.array([items[item_column].to_pylist().index(c) for c in candidates])
                )
                for name in user_row.column_names:
                    rows = rows.append_column(
                        name,
                        pa.array([user_row[name][0].as_py()] * NUM_CANDIDATES, user_row[name].type),
                    )
                eager = score_table(artifact.model, artifact.schema, rows)["ctr"].numpy()
                print(f"user {user} (model {served.model} v{served.version}):")
                print("  item    gRPC p(click)  eager p(click)")
                for item, p_served, p_eager in zip(
                    candidates, served.scores["ctr"], eager, strict=True
                ):
                    print(f"  {item:>6}  {p_served:13.6f}  {p_eager:14.6f}")
                worst = max(worst, float(np.abs(served.scores["ctr"] - eager).max()))
            print(f"max |gRPC - eager| over {NUM_USERS * NUM_CANDIDATES} candidates: {worst:.2e}")
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    print(f"server stopped (exit {code})")
    return 0 if worst <= 1e-5 and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
