"""Ask the person at the desktop, while the OOM is held: a notification with buttons.

`{ kind = "ask", timeout = "20s", actions = ["grow", "kill", "core"] }` pops up
"Out of memory in /jobs/a" with "Grow by 64M", "Kill leak (4242)" and "Dump core"
(obs/desktop.py). The button pressed runs that step now (the rule's settings), then the
incident goes on after the ask like after any step; no answer within `timeout`, a
dismissed pop-up, or no session bus or notification server: the next step, at once.
The journal has the answer as the ask step's result ("kill", "timeout", "no-bus", ...).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from oomguard.actions.kill import choose
from oomguard.errors import OomguardError
from oomguard.policy import Rule, Step, StepKind
from oomguard.policy.model import ASK_ACTIONS
from oomguard.units import format_size

if TYPE_CHECKING:
    from oomguard.engine import Engine
    from oomguard.incident import Done, Incident


def setup(engine: Engine, rules: Iterable[Rule]) -> None:
    """At start-up, if a rule asks: import the D-Bus client and connect to the buses."""
    steps = [s for r in rules for s in r.steps if s.kind is StepKind.ASK]
    if not steps or engine.desktop is not None:
        return
    try:
        from oomguard.obs.desktop import Desktop
    except ImportError as exc:
        engine.log.warning(f"desktop notifications off: {exc.name or exc} is not installed "
                           "(pip install 'oomguard[desktop]'); ask steps will go on without")
        return
    desktop = Desktop(engine.loop, engine.log.info)
    n = desktop.start(sorted({s.bus for s in steps if s.bus}))
    engine.desktop = desktop
    engine.log.info(f"desktop notifications: {n} session bus{'es' if n != 1 else ''} "
                    "reached for ask steps")


def _labels(inc: Incident, keys: tuple[str, ...]) -> list[tuple[str, str]]:
    top = None
    try:
        ranked = choose(inc, Step(StepKind.KILL))
        top = ranked[0].sample if ranked else None
    except OomguardError:
        pass
    out = []
    for key in keys:
        if key == "grow":
            out.append((key, f"Grow by {format_size(inc.rule.grow_step)}"))
        elif key == "kill":
            out.append((key, f"Kill {top.comm} ({top.pid})" if top else "Kill the largest"))
        elif key == "core":
            out.append((key, "Dump core"))
    return out


def _body(inc: Incident, timeout: float) -> str:
    try:
        usage, limit = inc.group.usage(), inc.group.limit()
        used = f"{format_size(usage)} of {format_size(limit) if limit else 'no limit'} used. "
    except OomguardError:
        used = ""
    return (f"{used}The programs in it wait. Choose within {timeout:g} s, "
            "or oomguard goes on with its rule.")


def ask(inc: Incident, step: Step, done: Done) -> None:
    engine, journal = inc.engine, inc.engine.journal
    keys = step.actions or ASK_ACTIONS
    timeout = inc.rule.timeout_for(step)
    sid = journal.begin_step(inc.id, "ask", None, {"actions": list(keys), "timeout": timeout})
    if inc.skip_if_dry_run(sid, done, "would ask the desktop"):
        return
    desktop = engine.desktop
    if desktop is None:
        journal.finish_step(sid, "no-bus", None, "desktop notifications are not set up")
        engine.log.info(f"{inc.group.relpath}: no desktop to ask; going on")
        done("done")
        return
    started = time.monotonic()
    gen = inc.generation
    answered = [False]

    def answer(key: str | None, how: str) -> None:
        if answered[0]:
            return
        answered[0] = True
        ms = (time.monotonic() - started) * 1000.0
        if inc.generation != gen or inc.state != "acting":
            journal.finish_step(sid, "late", {"answer": key, "ms": ms}, how)
            return  # the incident moved on (deadline, close) before the answer
        if key is not None and key in keys:
            journal.finish_step(sid, key, {"answer": key, "ms": ms})
            engine.log.info(f"{inc.group.relpath}: the desktop chose {key} "
                            f"after {ms / 1000.0:.1f} s")
            engine.run_kind(inc, key, done)
            return
        result = how.split(":")[0]
        journal.finish_step(sid, result, {"ms": ms}, how)
        engine.log.info(f"{inc.group.relpath}: no answer from the desktop ({how}); going on")
        done("done")

    handle = desktop.ask([step.bus] if step.bus else None,
                         f"Out of memory in {inc.group.relpath}", _body(inc, timeout),
                         _labels(inc, keys), timeout, answer)
    if handle is None:
        answered[0] = True
        journal.finish_step(sid, "no-bus", None, "no session bus could be reached")
        engine.log.info(f"{inc.group.relpath}: no session bus to ask; going on")
        done("done")
        return

    def expire() -> None:
        if answered[0]:
            return  # answered already (the timer is not cancelled then): nothing to take down
        handle.cancel()
        answer(None, "timeout")

    inc.later(timeout, expire)
    inc.on_close(lambda: None if answered[0] else handle.cancel())
