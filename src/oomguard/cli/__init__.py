"""The `oomguard` command: thin subcommands over the library.

Each subcommand lives in its own module with `add_parser` and `run`. Errors
become one line on stderr and the exit code of their type (see errors.py).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from oomguard import __version__
from oomguard.errors import EXIT_USAGE, OomguardError


def _commands() -> list[ModuleType]:
    from oomguard.cli import ps, status, wait

    mods = [wait, ps, status]
    for name in ("run", "daemon", "check", "events", "demo"):
        try:
            mods.append(__import__(f"oomguard.cli.{name}", fromlist=["add_parser"]))
        except ModuleNotFoundError as exc:
            if exc.name != f"oomguard.cli.{name}":
                raise
    return mods


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, not argparse's usage block: the user sees what was wrong.
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="oomguard", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"oomguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for mod in _commands():
        mod.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except OomguardError as exc:
        print(f"oomguard: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
