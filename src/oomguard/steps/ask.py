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

from oomguard.containers import default_index
from oomguard.errors import OomguardError
from oomguard.policy import AskStep, KillStep
from oomguard.policy.model import ASK_ACTIONS
from oomguard.steps.context import Outcome, StepContext
from oomguard.steps.victims import choose
from oomguard.units import format_size


def _labels(ctx: StepContext, keys: tuple[str, ...]) -> list[tuple[str, str]]:
    top = None
    try:
        ranked = choose(ctx, KillStep())
        top = ranked[0].sample if ranked else None
    except OomguardError:
        pass
    out = []
    for key in keys:
        if key == "grow":
            out.append((key, f"Grow by {format_size(ctx.rule.grow_step)}"))
        elif key == "kill":
            out.append((key, f"Kill {top.comm} ({top.pid})" if top else "Kill the largest"))
        elif key == "core":
            out.append((key, "Dump core"))
    return out


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
    desktop = ctx.services.desktop
    if desktop is None:
        ctx.finish("no-bus", None, "desktop notifications are not set up")
        ctx.log.info(f"{group.relpath}: no desktop to ask; going on")
        ctx.done(Outcome.DONE)
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
        if key is not None and key in keys:
            ctx.finish(key, {"answer": key, "ms": ms})
            ctx.log.info(f"{group.relpath}: the desktop chose {key} after {ms / 1000.0:.1f} s")
            inc.run_kind(key, ctx.done)
            return
        result = how.split(":")[0]
        ctx.finish(result, {"ms": ms}, how)
        ctx.log.info(f"{group.relpath}: no answer from the desktop ({how}); going on")
        ctx.done(Outcome.DONE)

    handle = ctx.effects.ask(desktop, [step.bus] if step.bus else None,
                             f"Out of memory in {group.relpath}{_container(group.relpath)}",
                             _body(ctx, timeout),
                             _labels(ctx, keys), timeout, answer,
                             what=f"ask the desktop about {group.relpath}")
    if handle is None:
        answered[0] = True
        ctx.finish("no-bus", None, "no session bus could be reached")
        ctx.log.info(f"{group.relpath}: no session bus to ask; going on")
        ctx.done(Outcome.DONE)
        return

    def expire() -> None:
        if answered[0]:
            return  # answered already (the timer is not cancelled then): nothing to take down
        handle.cancel()
        answer(None, "timeout")

    ctx.later(timeout, expire)
    ctx.on_close(lambda: None if answered[0] else handle.cancel())
