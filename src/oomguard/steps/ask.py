"""Ask the person at the desktop, while the OOM is held: a notification with buttons.

`{ kind = "ask", timeout = "20s", actions = ["grow", "kill", "core"] }` pops up
"Out of memory in /jobs/a" with "Grow by 64M", "Kill leak (4242)" and "Dump core"
(obs/desktop.py). The button pressed runs that step now (the rule's settings), then the
incident goes on after the ask like after any step; no answer within `timeout`, a
dismissed pop-up, or no session bus or notification server: the next step, at once.
The journal has the answer as the ask step's result ("kill", "timeout", "no-bus", ...).

System mode's freeze-and-ask (policy/system.py: a stop or freeze step pauses the offender
first) offers Kill / Keep paused / Resume: "kill" lets the paused tasks go and runs the
kill step (as no answer does); "keep" closes the incident "kept paused", the pause handed
from the incident to the ledger (undone when oomguard exits, or by the guardian if it
dies); "resume" lets them run and closes the incident "resumed".
"""

from __future__ import annotations

import time

from oomguard.containers import default_index
from oomguard.errors import OomguardError
from oomguard.policy import AskStep, KillStep, ProcSample
from oomguard.policy.model import ASK_ACTIONS
from oomguard.steps import pause
from oomguard.steps.context import Outcome, StepContext
from oomguard.steps.victims import choose
from oomguard.sysmem import SystemGroup
from oomguard.units import format_size


def _first_victim(ctx: StepContext) -> ProcSample | None:
    """Whom the kill step would take now, to name it in the question; None if nobody."""
    try:
        ranked = choose(ctx, KillStep())
    except OomguardError:
        return None
    return ranked[0].sample if ranked else None


def _labels(ctx: StepContext, keys: tuple[str, ...]) -> list[tuple[str, str]]:
    top = _first_victim(ctx)
    out = []
    for key in keys:
        if key == "grow":
            out.append((key, f"Grow by {format_size(ctx.rule.grow_step)}"))
        elif key == "kill":
            out.append((key, f"Kill {top.comm} ({top.pid})" if top else "Kill the largest"))
        elif key == "core":
            out.append((key, "Dump core"))
        elif key == "keep":
            out.append((key, "Keep paused"))
        elif key == "resume":
            out.append((key, "Resume"))
    return out


def _paused_question(ctx: StepContext, timeout: float) -> tuple[str, str]:
    """Freeze-and-ask's words: "leak is using 1.2G and memory is almost gone"."""
    top = _first_victim(ctx)
    who = f"{top.comm} (pid {top.pid}) is using {format_size(top.rss)}" if top else \
        "A program is using much memory"
    return (f"{who} and memory is almost gone",
            f"It is paused. Kill it, keep it paused or resume it; in {timeout:g} s "
            "oomguard kills it.")


def _settle_paused(ctx: StepContext, key: str, ms: float) -> None:
    """Keep paused or resume: the user's choice ends the incident."""
    inc = ctx.episode
    if key == "resume":
        n = pause.resume(ctx, what=f"resume what {ctx.group.relpath} paused")
        ctx.finish("resume", {"answer": key, "ms": ms, "resumed": n})
        ctx.log.info(f"the desktop chose resume after {ms / 1000.0:.1f} s: {n} let go")
        inc.close("resumed")
        return
    kept = [c for c in inc.changes if c.kind in ("stop", "freeze") and c.id in ctx.ledger.active]
    for change in kept:
        inc.changes.remove(change)  # the ledger's now: undone when oomguard exits
    ctx.finish("keep", {"answer": key, "ms": ms, "kept": [c.target for c in kept]})
    ctx.log.info(f"the desktop chose keep paused after {ms / 1000.0:.1f} s: "
                 f"{len(kept)} kept paused until oomguard exits")
    inc.close("kept paused")


def _body(ctx: StepContext, timeout: float) -> str:
    try:
        usage, limit = ctx.group.usage(), ctx.group.limit()
        used = f"{format_size(usage)} of {format_size(limit) if limit else 'no limit'} used. "
    except OomguardError:
        used = ""
    return (f"{used}The programs in it wait. Choose within {timeout:g} s, "
            "or oomguard goes on with its rule.")


def _container(relpath: str) -> str:
    """" (container shop/web-7d9f/app (burstable))" when the group is one (read at its
    adoption; nothing is read here). The desktop escapes the text it shows."""
    known = default_index().peek(relpath)
    return f" (container {known.label()})" if known is not None else ""


def ask(ctx: StepContext) -> None:
    step, group, inc = ctx.options(AskStep), ctx.group, ctx.episode
    keys = step.actions or ASK_ACTIONS
    timeout = ctx.rule.timeout_for(step)
    ctx.begin(before={"actions": list(keys), "timeout": timeout})
    paused_ask = isinstance(group, SystemGroup) and "resume" in keys
    if paused_ask:
        summary, body = _paused_question(ctx, timeout)
    else:
        summary = f"Out of memory in {group.relpath}{_container(group.relpath)}"
        body = _body(ctx, timeout)

    def go_on() -> None:
        """No answer: the tasks paused for the question run again, for the kill to come."""
        if paused_ask:
            pause.resume(ctx, what="let the paused offender go for the kill")
        ctx.done(Outcome.DONE)

    desktop = ctx.services.desktop
    if desktop is None:
        ctx.finish("no-bus", None, "desktop notifications are not set up")
        ctx.log.info(f"{group.relpath}: no desktop to ask; going on")
        go_on()
        return
    started = time.monotonic()
    gen = inc.generation
    answered = [False]

    def answer(key: str | None, how: str) -> None:
        if answered[0]:
            return
        answered[0] = True
        ms = (time.monotonic() - started) * 1000.0
        if inc.generation != gen or not inc.acting:
            ctx.finish("late", {"answer": key, "ms": ms}, how)
            return  # the incident moved on (deadline, close) before the answer
        if paused_ask and key in ("keep", "resume"):
            _settle_paused(ctx, key, ms)
            return
        if key is not None and key in keys:
            if paused_ask:  # kill: let the paused tasks go first (SIGCONT, thaw)
                pause.resume(ctx, what="let the paused offender go for the kill")
            ctx.finish(key, {"answer": key, "ms": ms})
            ctx.log.info(f"{group.relpath}: the desktop chose {key} after {ms / 1000.0:.1f} s")
            inc.run_kind(key, ctx.done)
            return
        result = how.split(":")[0]
        ctx.finish(result, {"ms": ms}, how)
        ctx.log.info(f"{group.relpath}: no answer from the desktop ({how}); going on")
        go_on()

    handle = ctx.effects.ask(desktop, [step.bus] if step.bus else None,
                             summary, body, _labels(ctx, keys), timeout, answer,
                             what=f"ask the desktop about {group.relpath}")
    if handle is None:
        answered[0] = True
        ctx.finish("no-bus", None, "no session bus could be reached")
        ctx.log.info(f"{group.relpath}: no session bus to ask; going on")
        go_on()
        return

    def expire() -> None:
        if answered[0]:
            return  # answered already (the timer is not cancelled then): nothing to take down
        handle.cancel()
        answer(None, "timeout")

    ctx.later(timeout, expire)
    ctx.on_close(lambda: None if answered[0] else handle.cancel())
