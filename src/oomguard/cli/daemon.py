"""`oomguard daemon --config FILE`: watch the cgroups a policy's rules match."""

from __future__ import annotations

import argparse
from typing import Any

from oomguard.daemon import run_daemon


def add_parser(sub: Any) -> None:
    p = sub.add_parser("daemon", help="watch the cgroups a policy matches and handle their OOMs",
                       description=__doc__)
    p.add_argument("--config", required=True, metavar="FILE", help="policy file (TOML)")
    p.add_argument("--journal", metavar="PATH", help="incident journal (SQLite)")
    p.add_argument("--log-format", choices=["text", "json"], default="text")
    p.add_argument("--metrics", metavar="ADDR",
                   help="serve Prometheus metrics on ADDR (port, or host:port; 127.0.0.1 default)")
    p.add_argument("--dry-run", action="store_true", help="decide and record; change nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_daemon(args.config, args.journal, args.log_format, args.metrics, args.dry_run)
