"""The `oomguard` command: thin subcommands over the library.

Each subcommand lives in its own module with `add_parser` and `run`. Errors
become one line on stderr and the exit code of their type (see errors.py).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from types import ModuleType

from oomguard import __version__
from oomguard.errors import EXIT_FAILURE, EXIT_USAGE, ConfigError, OomguardError
from oomguard.escape import printable


def _commands() -> list[ModuleType]:
    from oomguard.cli import ps, status, wait

    mods = [wait, ps, status]
    for name in ("run", "daemon", "check", "events", "demo", "top"):
        try:
            mods.append(__import__(f"oomguard.cli.{name}", fromlist=["add_parser"]))
        except ModuleNotFoundError as exc:
            if exc.name != f"oomguard.cli.{name}":
                raise
    return mods


_INVALID_CHOICE = re.compile(r"invalid choice: '(.*)' \(choose from (.*)\)$", re.DOTALL)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, not argparse's usage block: the user sees what was wrong.
        self.exit(EXIT_USAGE, f"{self.prog}: {one_line(_with_suggestion(message))}\n")


def _with_suggestion(message: str) -> str:
    """`oomguard stauts`: argparse lists every choice; name the one that was meant."""
    m = _INVALID_CHOICE.search(message)
    if m is None:
        return message
    import difflib  # only to word an error

    choices = re.findall(r"'([^']*)'", m.group(2))
    close = difflib.get_close_matches(m.group(1), choices, n=1, cutoff=0.6)
    if close:
        return f"{message[: m.start()]}invalid choice: {m.group(1)!r}; did you mean {close[0]}?"
    return message


def one_line(text: str) -> str:
    """`text` with what a terminal would act on escaped (a newline in a path, an escape
    sequence, bytes that are not UTF-8); backslashes are left as they are."""
    return "".join(ch if ch.isprintable() else printable(ch) for ch in text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="oomguard", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"oomguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for mod in _commands():
        mod.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:  # bare `oomguard`: what can it do?
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except OomguardError as exc:
        # A policy file's problems are one line each; any other error is one line, whatever
        # the user typed into it (a newline in a path is shown as \n).
        lines = str(exc).split("\n") if isinstance(exc, ConfigError) else [str(exc)]
        _error("\n".join(one_line(line) for line in lines))
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:  # a file the user named (a journal, a directory) is not usable
        where = f"{exc.filename}: " if exc.filename else ""
        _error(one_line(f"{where}{exc.strerror or exc}"))
        return EXIT_FAILURE
    except Exception as exc:
        # Last resort: no input should get here (the tests feed odd input to every
        # subcommand), but if one does, the user still gets one line, not a traceback.
        if os.environ.get("OOMGUARD_DEBUG"):
            raise
        _error(one_line(f"internal error: {type(exc).__name__}: {exc} "
                        "(OOMGUARD_DEBUG=1 shows the traceback)"))
        return EXIT_FAILURE


def _error(text: str) -> None:
    print(f"oomguard: {text}", file=sys.stderr)
