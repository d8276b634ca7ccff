"""Observability and operations: the decision log, Prometheus metrics, sd_notify.

Self-contained: nothing here imports the engine. The daemon wires them in:

    log = DecisionLog(fmt=args.log_format)          # one line per decision on stderr
    metrics = Metrics()                              # only with --metrics ADDR
    server = MetricsServer(args.metrics, metrics)
    server.attach(loop)
    notifier = Notifier()                            # no-op outside systemd
    notifier.ready(status="watching 3 cgroups")
"""

from __future__ import annotations

from oomguard.obs.log import DecisionLog
from oomguard.obs.metrics import (
    RESOLUTION_BUCKETS,
    Metrics,
    MetricsServer,
    metrics_addr_arg,
    parse_metrics_addr,
)
from oomguard.obs.sdnotify import Notifier, watchdog_interval

__all__ = [
    "RESOLUTION_BUCKETS",
    "DecisionLog",
    "Metrics",
    "MetricsServer",
    "Notifier",
    "metrics_addr_arg",
    "parse_metrics_addr",
    "watchdog_interval",
]
