"""The `recsys` command: finds subcommands by entry point and dispatches to them lazily.

Subcommands are contributed by the packages that own them (group `recsys.commands` in
pyproject.toml), so the library imports neither training nor serving, and `recsys serve`
never imports Ray.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

# One line per command for `recsys --help`; kept here rather than read from each command's
# module so that the overview imports neither Ray nor torch.
SUMMARIES = {
    "compress": "low-rank compression of a trained artifact into a new version (METHODS.md §8)",
    "data": "prepare a dataset (ml100k-ctr, synthetic-ctr, ...) into the data folder",
    "evaluate": "recompute an artifact's metrics on a split or labelled Parquet (Ray)",
    "predict": "score Parquet rows with an artifact on Ray Data into a Parquet file",
    "score": "gRPC client: score JSON-lines rows or ranking requests on a running server",
    "search-dims": "DNIS mixed-dimension search + retrain on Ray, exported as a new version",
    "serve": "the gRPC scoring server over a model repository (ranking and row scoring)",
    "train": "train a model from a YAML config on Ray and export a versioned artifact",
    "verify-artifact": "serving-parity gate: gRPC scores of an artifact vs its eager scores",
}


def _commands() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group="recsys.commands")}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: recsys <command> [options]\n\ncommands:")
        width = max(map(len, commands), default=0)
        for name in sorted(commands):
            print(f"  {name:<{width}}  {SUMMARIES.get(name, '')}".rstrip())
        print("\nrun `recsys <command> --help` for a command's options")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(
            f"recsys: unknown command '{name}' (expected one of {sorted(commands)})",
            file=sys.stderr,
        )
        return 2
    command = commands[name].load()  # type: ignore[attr-defined]
    return int(command(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
