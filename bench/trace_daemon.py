"""Run `oomguard ARGS...` with a timeline of its hot path, for `bench/run --trace`.

    trace_daemon.py TRACE_FILE daemon --config FILE --journal PATH

Wraps the functions an OOM goes through (the eventfd read, the incident, the journal
writes, the victim sampling, the signal, the decision log, ...) so that each call
records (name, monotonic_ns at entry, at return), and writes them as JSON lines to
TRACE_FILE at exit. A wrapper costs about a microsecond; nothing else changes. The
bench lines the records up with the hog's timestamps to show where the time between
the kernel's event and the resolution goes. Not a handler: it runs oomguard's own.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import json
import sys
import time
import types
from typing import Any

# (module, attribute path) of what to time. Methods are wrapped on their class; plain
# functions are replaced everywhere an oomguard module holds a reference to them.
TARGETS = [
    ("oomguard.events.v1", "EventfdRegistration.read"),
    ("oomguard.engine", "Engine._on_oom"),
    ("oomguard.engine", "Engine.arm_shrink"),
    ("oomguard.engine", "Engine.try_shrink"),
    ("oomguard.engine", "Engine.incident_closed"),
    ("oomguard.incident", "Incident.__init__"),
    ("oomguard.incident", "Incident.start"),
    ("oomguard.incident", "Incident.under_oom"),
    ("oomguard.incident", "Incident._resolved"),
    ("oomguard.incident", "Incident.close"),
    ("oomguard.incident", "Incident.on_event"),
    ("oomguard.journal", "Journal.open_incident"),
    ("oomguard.journal", "Journal.add_event"),
    ("oomguard.journal", "Journal.begin_step"),
    ("oomguard.journal", "Journal.finish_step"),
    ("oomguard.journal", "Journal.add_victim"),
    ("oomguard.journal", "Journal.close_incident"),
    ("oomguard.journal", "Journal.record_change"),
    ("oomguard.journal", "Journal.mark_restored"),
    ("oomguard.journal", "Journal.checkpoint"),
    ("oomguard.ledger", "Ledger.apply"),
    ("oomguard.ledger", "Ledger.restore"),
    ("oomguard.steps.hold", "hold"),
    ("oomguard.steps.grow", "grow"),
    ("oomguard.steps.grow", "raise_limit"),
    ("oomguard.steps.kill", "kill"),
    ("oomguard.steps.victims", "choose"),
    ("oomguard.steps.kill", "_kill_one"),
    ("oomguard.steps.kill", "_asleep_in_oom_wait"),
    ("oomguard.steps.kill", "_group_members"),
    ("oomguard.steps.pause", "thaw_for_kill"),
    ("oomguard.steps.victims", "sample_group"),
    ("oomguard.steps.victims", "open_verified"),
    ("oomguard.procs.reader", "process_info"),
    ("oomguard.procs.reader", "read_cmdline"),
    ("oomguard.policy", "rank_for_rule"),
    ("oomguard.procs.pidfd", "Pidfd.send"),
    ("oomguard.procs.pidfd", "Pidfd.mrelease"),
    ("oomguard.obs.log", "DecisionLog._write"),
    ("oomguard.ledger", "write_change"),
    ("oomguard.cgroup.files", "write_text"),
    ("oomguard.procs.reader", "read_stat"),
    ("oomguard.procs.reader", "read_status"),
    ("oomguard.procs.reader", "read_exe"),
    ("oomguard.procs.reader", "read_oom_score"),
    ("oomguard.events.v1", "ThresholdNotifier.__init__"),
    ("oomguard.procs.pidfd", "Pidfd.open"),
    ("oomguard.journal", "Journal._write"),
    ("oomguard.obs.metrics", "Metrics.incident_closed"),
    ("oomguard.obs.metrics", "Metrics.victim"),
    ("oomguard.guardian.link", "GuardianLink.incident_opened"),
    ("oomguard.guardian.link", "GuardianLink._send"),
    ("oomguard.journal", "Journal.commit"),
    ("oomguard.journal", "Journal.defer"),
    ("oomguard.steps.snapshot", "snapshot"),
]

RECORDS: list[tuple[str, int, int]] = []


def _wrap(name: str, fn: Any) -> Any:
    now = time.monotonic_ns
    rec = RECORDS.append

    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = now()
        try:
            return fn(*args, **kwargs)
        finally:
            rec((name, t0, now()))

    timed.__wrapped_by_trace__ = True  # type: ignore[attr-defined]
    return timed


def install() -> list[str]:
    import oomguard.cli

    oomguard.cli._commands()  # import every subcommand and, through them, the engine
    missing = []
    plain: dict[int, Any] = {}
    for modname, path in TARGETS:
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            missing.append(f"{modname}:{path}")
            continue
        obj: Any = mod
        parts = path.split(".")
        for part in parts[:-1]:
            obj = getattr(obj, part, None)
        fn = getattr(obj, parts[-1], None) if obj is not None else None
        if fn is None:
            missing.append(f"{modname}:{path}")
            continue
        label = path
        wrapped = _wrap(label, fn)
        if isinstance(obj, type):
            setattr(obj, parts[-1], wrapped)
        else:
            plain[id(fn)] = wrapped
    # Replace every reference an oomguard module (or a dict in one) holds to a plain function.
    for modname, mod in list(sys.modules.items()):
        if not modname.startswith("oomguard") or not isinstance(mod, types.ModuleType):
            continue
        for attr, value in list(vars(mod).items()):
            if id(value) in plain:
                setattr(mod, attr, plain[id(value)])
            elif isinstance(value, dict):
                for k, v in list(value.items()):
                    if id(v) in plain:
                        value[k] = plain[id(v)]
    return missing


def main() -> int:
    out = sys.argv[1]
    missing = install()
    if missing:
        print("trace_daemon: not found (skipped): " + ", ".join(missing), file=sys.stderr)

    def dump() -> None:
        with open(out, "w") as f:
            for name, t0, t1 in RECORDS:
                f.write(json.dumps([name, t0, t1]) + "\n")

    atexit.register(dump)
    from oomguard.cli import main as cli_main

    return cli_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
