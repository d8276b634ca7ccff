"""`oomguard demo`: watch an OOM handled live (needs root and a memory cgroup controller)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="show an OOM handled live, then clean up",
                       description=__doc__)
    p.add_argument("--journal", metavar="PATH",
                   help="keep the incident in this journal (default: a temporary one)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from oomguard.demo import run_demo  # the daemon need not carry the demo

    return run_demo(args.journal)
