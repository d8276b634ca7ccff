"""`oomguard daemon --config FILE`: watch the cgroups a policy's rules match.
`oomguard daemon --system`: also (or only, without --config) the whole machine's memory."""

from __future__ import annotations

import argparse
from typing import Any

from oomguard.daemon import run_daemon
from oomguard.errors import OomguardError, UsageError
from oomguard.obs.metrics import check_metrics_addr


def add_parser(sub: Any) -> None:
    p = sub.add_parser("daemon", help="watch the cgroups a policy matches and handle their OOMs",
                       description=__doc__)
    p.add_argument("--config", metavar="FILE", help="policy file (TOML)")
    p.add_argument("--system", action="store_true",
                   help="watch the whole machine's memory (MemAvailable, PSI) with the "
                        "[system] defaults unless the policy has a [system] table")
    p.add_argument("--journal", metavar="PATH", help="incident journal (SQLite)")
    p.add_argument("--log-format", choices=["text", "json"], default="text")
    p.add_argument("--metrics", metavar="ADDR",
                   help="serve Prometheus metrics on ADDR (port, or host:port; 127.0.0.1 default)")
    p.add_argument("--dry-run", action="store_true", help="decide and record; change nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.config is None and not args.system:
        raise UsageError("daemon: give --config FILE, --system, or both")
    if args.metrics is not None:
        _check_metrics(args.metrics)  # before any group is adopted: nothing to put back
    return run_daemon(args.config, args.journal, args.log_format, args.metrics, args.dry_run,
                      args.system)


def _check_metrics(addr: str) -> None:
    try:
        check_metrics_addr(addr)
    except ValueError as exc:
        raise UsageError(f"daemon: --metrics: {exc}") from None
    except OSError as exc:  # socket.gaierror too: a host name that does not resolve
        reason = exc.strerror or str(exc)
        raise OomguardError(f"daemon: --metrics {addr!r}: cannot listen there: {reason}") \
            from None
