"""Signal chosen tasks (the RFC's "send a signal to ... shrink"), then wait for relief.

E.g. SIGUSR1 to a program that drops its caches on it. A task asleep in the OOM
wait cannot handle a signal until it wakes; the others in the group can, and
what they free wakes the sleepers.

A signal step asks; it never kills. Most signals end (or stop) a task that neither
catches nor ignores them: SIGUSR1 kills sh and python. So the step sends only to
tasks whose /proc/PID/status says they catch or ignore the signal (SigCgt, SigIgn),
or whatever the signal when it is harmless by default (SIGCHLD, SIGCONT, SIGURG,
SIGWINCH), unless the step says `even_if_fatal = true`. A task that dies anyway
while the step waits (it changed its mind, or even_if_fatal) is a victim in the
journal and the log, like a kill's.
"""

from __future__ import annotations

import functools
import signal
import time

from oomguard.errors import OomguardError
from oomguard.policy import Candidate, SignalStep, Target, signal_name
from oomguard.procs import Pidfd
from oomguard.procs.reader import read_status
from oomguard.steps.context import Outcome, StepContext
from oomguard.steps.victims import choose, open_verified

# Default action "ignore" or "continue": sending one never ends or stops a task.
HARMLESS_BY_DEFAULT = frozenset({signal.SIGCHLD, signal.SIGCONT, signal.SIGURG,
                                 signal.SIGWINCH})


def handles(pid: int, signum: int) -> bool:
    """Does the process catch or ignore `signum`? False if it cannot be read (gone)."""
    try:
        status = read_status(pid)
    except OomguardError:
        return False
    bit = 1 << (signum - 1)
    try:
        return any(int(status.get(key) or "0", 16) & bit for key in ("SigCgt", "SigIgn"))
    except ValueError:
        return False


def safe_to_signal(pid: int, signum: int) -> bool:
    """Sending `signum` to `pid` cannot end or stop it by the signal's default action."""
    if signum in (signal.SIGKILL, signal.SIGSTOP):
        return False  # cannot be caught or ignored
    return signum in HARMLESS_BY_DEFAULT or handles(pid, signum)


def split_targets(ctx: StepContext, signum: int) -> tuple[list[Candidate], list[int]]:
    """(whom to signal, pids left out because the signal would kill or stop them).
    `to = "victim"`: the best-ranked candidate that handles the signal."""
    step = ctx.options(SignalStep)
    chosen: list[Candidate] = []
    skipped: list[int] = []
    for cand in choose(ctx):
        if step.even_if_fatal or safe_to_signal(cand.sample.pid, signum):
            chosen.append(cand)
            if step.to is Target.VICTIM:
                break
        else:
            skipped.append(cand.sample.pid)
    return chosen, skipped


def signal_step(ctx: StepContext) -> None:
    step, group, inc = ctx.options(SignalStep), ctx.group, ctx.episode
    signum = step.signal
    name = signal_name(signum)
    targets, skipped = split_targets(ctx, signum)
    pids = [c.sample.pid for c in targets]
    ctx.begin(pids[0] if len(pids) == 1 else None,
              {"signal": name, "pids": pids, "skipped": skipped,
               "even_if_fatal": step.even_if_fatal})
    if not targets:
        why = (f"no process catches or ignores {name} (would kill: {skipped}; "
               f"even_if_fatal = true sends anyway)" if skipped else "no process may be signalled")
        ctx.log.info(f"{group.relpath}: signal step sent nothing: {why}")
        ctx.fail("no-target", why)
        return
    what = f"send {name} to {pids} in {group.relpath}"
    ctx.journal.commit()
    watched: list[tuple[Candidate, Pidfd]] = []
    sent_at = time.monotonic()
    for cand in targets:
        pfd = open_verified(cand.sample)
        if pfd is None:
            continue
        try:
            ok = ctx.effects.signal(pfd, signum, what=what)
        except BaseException:  # a dry run's WouldChange too: no pidfd outlives the step
            pfd.close()
            for _, other in watched:
                other.close()
            raise
        if ok:
            watched.append((cand, pfd))
        else:
            pfd.close()
    sent = [c.sample.pid for c, _ in watched]
    ctx.finish("signalled", {"pids": sent})
    note = f"; not to {skipped}: {name} would kill them" if skipped else ""
    ctx.log.info(f"sent {name} to {sent} in {group.relpath}{note}")

    gen = inc.generation  # this step's run; a later step (a kill) reports its own deaths

    def exited(_revents: int, cand: Candidate, pfd: Pidfd) -> None:
        """A signalled task exited: a victim of this step, unless a later step has begun
        meanwhile. Watched until the incident closes, since a dying task frees its memory
        (and so may end the OOM) before its pidfd turns readable."""
        forget(pfd)
        if inc.generation != gen:
            return
        s = cand.sample
        ms = (time.monotonic() - sent_at) * 1000.0
        inc.victims += 1
        ctx.journal.add_victim(inc.id, s.pid, s.comm, s.rss, name, ms)
        ctx.log.killed(s.pid, s.comm, group.relpath, s.rss,
                       ctx.ms_since_event(time.monotonic()), signal=name,
                       why=f"exited after the signal step's {name}", member=s.cgroup)
        ctx.services.victim_killed(group)

    def forget(pfd: Pidfd) -> None:
        if pfd.fileno() >= 0:
            ctx.loop.remove_reader(pfd.fileno())
            pfd.close()

    def cleanup() -> None:
        for _, pfd in watched:
            forget(pfd)

    for cand, pfd in watched:
        ctx.loop.add_reader(pfd.fileno(), functools.partial(exited, cand=cand, pfd=pfd))
    ctx.on_close(cleanup)
    inc.await_relief(lambda: ctx.done(Outcome.RELIEF), lambda: ctx.done(Outcome.DONE),
                     budget=ctx.rule.wait_for(step))
