"""The `recsys` command: finds subcommands by entry point and dispatches to them lazily.

Subcommands are contributed by the packages that own them (group `recsys.commands` in
pyproject.toml), so the library imports neither training nor serving, and `recsys serve`
never imports Ray.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points


def _commands() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group="recsys.commands")}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: recsys <command> [options]\n\ncommands:")
        for name in sorted(commands):
            print(f"  {name}")
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
