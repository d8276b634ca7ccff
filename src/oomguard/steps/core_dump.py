"""Core dump of the victim before it dies: gdb's gcore, run from outside the cgroup.

A task asleep in the OOM wait cannot be ptrace-stopped until it wakes, so the step:

1. picks the victim as a kill would (the step's or the rule's strategy);
2. refuses, with the reason in the journal and the log, when gdb's `gcore` is not on
   PATH, when the victim's RSS is above the cap (`max_size`, default 1G), and, once it
   is stopped (a dry run ends at the stop), when the evidence directory's total cap or
   the free disk space leaves no room (it is continued then);
3. stops it (SIGSTOP, through the ledger: it is always continued) and, if it sleeps in
   the OOM wait, lets it wake with a small temporary grow (through the ledger, tagged
   like any grow: it shrinks back once usage fits under the limit again). A woken task
   stops before it runs another instruction;
4. runs `gcore -o <evidence dir>/core <pid>` in a session of its own (oomguard's cgroup,
   not the one out of memory) under `prlimit --fsize=N --core=0`, so the file can never
   outgrow the room it was given; its exit arrives through a pidfd, a timer kills its
   session at the step's `timeout` (default: the rule's deadline);
5. continues the victim and goes on with the next step (typically `kill`).

The core is `<evidence dir>/core.<pid>`; the journal has it as evidence of kind "core".
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from oomguard.errors import OomguardError
from oomguard.fsutil import which
from oomguard.ledger import ActiveChange, pid_target
from oomguard.policy import Candidate, CoreStep
from oomguard.policy.model import DEFAULT_CORE_MAX
from oomguard.procs import read_stat
from oomguard.steps.context import Outcome, StepContext
from oomguard.steps.grow import raise_limit
from oomguard.steps.victims import choose, open_verified
from oomguard.units import format_size

WAKE_GROW = 8 << 20  # enough for the sleeper to finish its fault and reach the stop
DISK_MARGIN = 64 << 20  # free space left on the evidence file system after the core
# How long to watch a woken victim reach the stop before gcore attaches anyway (gdb's
# attach then waits for it, within the step's timeout).
STOP_CHECKS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.25)
OUTPUT_TAIL = 4096


def find_gcore() -> str | None:
    return which("gcore")


def core_estimate(rss: int) -> int:
    """Room to ask for: a core holds the resident memory, plus stacks and libraries' data."""
    return rss + rss // 8 + (16 << 20)


def core(ctx: StepContext) -> None:
    step = ctx.options(CoreStep)
    cand = None
    for c in choose(ctx):
        pfd = open_verified(c.sample)
        if pfd is not None:
            pfd.close()  # the stop below names the process by pid and start time
            cand = c
            break
    if cand is None:
        ctx.fail("no-victim", "no process to dump")
        return
    s = cand.sample
    cap = step.max_size if step.max_size is not None else DEFAULT_CORE_MAX
    ctx.begin(s.pid, {"comm": s.comm, "rss": s.rss, "max_size": cap})

    def refuse(result: str, reason: str) -> None:
        ctx.log.info(f"no core of pid {s.pid} in {ctx.group.relpath}: {reason}")
        ctx.fail(result, reason)

    gcore = find_gcore()
    if gcore is None:
        refuse("refused", "gdb is not installed (no gcore on PATH)")
        return
    if s.rss > cap:
        refuse("skipped", f"its rss {format_size(s.rss)} is above the core cap "
                          f"{format_size(cap)} (max_size)")
        return
    store = ctx.services.evidence_store()
    if store is None:
        refuse("refused", "no evidence directory (the journal is in memory)")
        return
    # The victim is stopped first: a dry run ends there, before the evidence directory
    # is made or older incidents' evidence deleted to make room.
    what = f"dump pid {s.pid} ({s.comm}) in {ctx.group.relpath}"
    try:
        stat = read_stat(s.pid)
        stop = ctx.effects.apply(ctx.group, "stop", pid_target(s.pid, stat.start_ticks),
                                 "running", "stopped", ctx.incident_id, tag="incident",
                                 what=what)
    except OomguardError as exc:
        ctx.fail("failed", f"could not stop it: {exc}")
        return
    ctx.episode.changes.append(stop)
    need = core_estimate(s.rss)
    why, free, directory = "", 0, None
    try:
        directory = ctx.services.evidence_dir(ctx.incident_id)
        assert directory is not None
        if not store.make_room(need, keep=directory):
            why = (f"the evidence cap {format_size(store.total_max)} leaves no room "
                   f"for a core of about {format_size(need)}")
        else:
            st = os.statvfs(directory)
            free = st.f_bavail * st.f_frsize
            if free < need + DISK_MARGIN:
                why = f"only {format_size(free)} free for the evidence directory"
    except OSError as exc:
        why = f"evidence directory: {exc}"
    if why:
        ctx.effects.restore(stop)  # continue it: the next step decides its fate
        refuse("failed" if why.startswith("evidence directory") else "skipped", why)
        return
    assert directory is not None
    room = min(max(cap, need), store.room_left(), free - DISK_MARGIN)
    _wake_and_dump(ctx, cand, gcore, directory, room, stop, stat.state)


def _wake_and_dump(ctx: StepContext, cand: Candidate, gcore: str, directory: Path,
                   room: int, stop: ActiveChange, state: str) -> None:
    group = ctx.group
    s = cand.sample
    woke_by = 0
    if state == "D":  # asleep (in the OOM wait): a SIGSTOP waits until it wakes
        try:
            current = group.hold_level()
            if current is not None:
                raise_limit(ctx.effects, group, current, current + WAKE_GROW, ctx.incident_id)
                woke_by = WAKE_GROW
                # Said, so that the "shrank" line later has the grow it takes back.
                ctx.log.grew(group.relpath, current, current + WAKE_GROW,
                             why=f"briefly, to wake pid {s.pid} for its core dump")
        except OomguardError as exc:
            ctx.log.warning(f"{group.relpath}: could not wake pid {s.pid} for its core: {exc}")

    def check(i: int) -> None:
        try:
            state = read_stat(s.pid).state
        except OomguardError:
            state = "gone"
        if state in ("T", "t", "gone") or i >= len(STOP_CHECKS):
            _dump(ctx, cand, gcore, directory, room, stop, woke_by, state)
        else:
            ctx.later(STOP_CHECKS[i], lambda: check(i + 1))

    check(0)


def _dump(ctx: StepContext, cand: Candidate, gcore: str, directory: Path, room: int,
          stop: ActiveChange, woke_by: int, state: str) -> None:
    journal, ledger = ctx.journal, ctx.ledger
    s = cand.sample
    if state == "gone":
        if stop.id in ledger.active:
            ctx.effects.restore(stop)
        ctx.finish("gone", None, "the victim exited before its core")
        ctx.done(Outcome.RELIEF)
        return
    path = directory / f"core.{s.pid}"
    argv: list[str] = [gcore, "-o", str(directory / "core"), str(s.pid)]
    prlimit = which("prlimit")
    if prlimit is not None:
        argv = [prlimit, f"--fsize={room}", "--core=0", *argv]
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C"}
    timeout = ctx.rule.timeout_for(ctx.step)

    def finished(rec: dict[str, object]) -> None:
        status, timed_out = rec.get("status"), bool(rec.get("timed_out"))
        try:
            size = path.stat().st_size
        except OSError:
            size = 0
        ok = status == 0 and size > 0 and not timed_out and not rec.get("cancelled")
        if stop.id in ledger.active:
            ctx.effects.restore(stop)  # continue it: the next step decides its fate
        if ok:
            result, detail = "dumped", ""
            try:
                os.chmod(path, 0o600)  # gdb made it 0644; the directory is 0700 anyway
            except OSError:
                pass
        else:
            result = ("timeout" if timed_out else "cancelled" if rec.get("cancelled")
                      else "too-large" if status in (128 + signal.SIGXFSZ, -signal.SIGXFSZ)
                      else "failed")
            detail = f"gcore: {result} (status {status})"
            try:
                path.unlink()
            except OSError:
                pass
            size = 0
        output = str(rec.get("output", ""))[-OUTPUT_TAIL:]
        ms = float(str(rec.get("ms", 0.0)))
        journal.add_evidence(ctx.incident_id, "core", {
            "pid": s.pid, "comm": s.comm, "path": str(path) if ok else None, "size": size,
            "ms": ms, "status": status, "timed_out": timed_out, "limit": room,
            "woke_by": woke_by, "output": output})
        ctx.finish(result, {"path": str(path) if ok else None, "size": size, "ms": ms}, detail)
        if ok:
            ctx.log.info(f"dumped core of pid {s.pid} ({s.comm}) in {ctx.group.relpath}: "
                         f"{format_size(size)} in {ms:.0f} ms, {path}")
        else:
            ctx.log.info(f"no core of pid {s.pid} in {ctx.group.relpath}: {detail}")
        store = ctx.services.evidence_store()
        if store is not None:
            store.refresh(directory)
            store.make_room(0, keep=directory)
        ctx.done(Outcome.DONE if ok else Outcome.FAILED)

    hook = ctx.effects.spawn(tuple(argv), env, timeout, finished)
    if hook is not None:
        ctx.on_close(hook.cancel)
