"""What `run`, `daemon` and `demo` share: the loop, journal, log and engine, set up
in one place and torn down in the right order (incidents closed, changes undone,
journal closed)."""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from oomguard.cgroup import Hierarchies, discover
from oomguard.engine import Engine
from oomguard.events.loop import EventLoop
from oomguard.guardian import GuardianLink, guardian_report_path
from oomguard.journal import Journal, default_journal_path
from oomguard.obs.log import DecisionLog
from oomguard.obs.metrics import Metrics


@dataclass
class Session:
    loop: EventLoop
    journal: Journal
    engine: Engine
    log: DecisionLog
    hier: Hierarchies
    metrics: Metrics
    guardian: GuardianLink | None = None

    @classmethod
    def open(cls, journal_path: str | Path | None, log_format: str = "text",
             log_stream: TextIO | None = None, guarded: bool = True) -> Session:
        hier = discover()
        loop = EventLoop()
        journal = Journal(journal_path or default_journal_path())
        log = DecisionLog(log_stream, log_format)
        metrics = Metrics()
        engine = Engine(loop, journal, hier, log, metrics)
        session = cls(loop, journal, engine, log, hier, metrics)
        if guarded:
            # Started before any change is made, so that every hold has a guardian.
            session.guardian = GuardianLink(guardian_report_path(journal.path), log.warning)
            session.guardian.attach(loop)
            engine.attach_guardian(session.guardian)
        return session

    def on_signals(self, handler: Callable[[int], None],
                   signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM,
                                               signal.SIGHUP)) -> None:
        for signum in signums:
            self.loop.add_signal(signum, handler)

    def close(self) -> None:
        try:
            self.engine.shutdown()
        finally:
            if self.guardian is not None:
                self.guardian.close()  # after every change is undone: it leaves quietly
            self.journal.checkpoint()
            self.journal.close()
            self.loop.close()
