"""Every change oomguard makes to the system, recorded before it is made.

A change is (kind, cgroup, target, before, after). The ledger writes the
journal row first, then the kernel file or signal; undoing needs nothing but
the row, so the changes a crashed run left behind are put back at the next
start (`recover`), and a SIGTERM puts back the ones still active (`restore_all`).

Kinds and what undoing them means:
  limit, memsw_limit, high          write `before` back to the cgroup file, unless the
                                    file no longer holds `after`: its owner wrote it
                                    since (a pod resized in place, `docker update`),
                                    and the owner's value stands (`owners_value`)
  oom_kill_disable                  write `before` ("0"/"1")
  freeze                            thaw
  stop                              SIGCONT the process (target "pid:N:start")
  move                              move the process back to `before`
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from oomguard.cgroup import Hierarchies, MemoryCgroup, cgroup_at
from oomguard.cgroup.base import FileChange
from oomguard.errors import CgroupError, OomguardError
from oomguard.faults import crash_point
from oomguard.journal import Change, Journal
from oomguard.procs.pidfd import Pidfd
from oomguard.procs.reader import read_stat
from oomguard.units import format_size

if TYPE_CHECKING:
    from oomguard.guardian.link import GuardianLink

MAX = "max"


def pid_target(pid: int, start_ticks: int) -> str:
    """Names a process so that a reused pid never matches: pid:N:start."""
    return f"pid:{pid}:{start_ticks}"


def parse_pid_target(target: str) -> tuple[int, int]:
    _, pid, start = target.split(":")
    return int(pid), int(start)


def _value(text: str) -> int | None:
    return None if text == MAX else int(text)


def _text(value: int | None) -> str:
    return MAX if value is None else str(value)


def write_change(group: MemoryCgroup, kind: str, target: str, value: str) -> None:
    """Make the system hold `value` for a change of `kind` (forward or undo)."""
    if kind == "limit":
        group.set_limits(_value(value))
    elif kind == "memsw_limit":
        group.set_memsw_limit(_value(value))
    elif kind == "high":
        group.set_high(_value(value))  # v1 raises CgroupError: memory.high is v2 only
    elif kind == "oom_kill_disable":
        group.set_oom_kill_disable(value == "1")
    elif kind == "freeze":
        if value == "FROZEN":
            group.freeze()
        else:
            group.thaw()
    elif kind == "stop":
        pfd = Pidfd.open_if_same(*parse_pid_target(target))
        if pfd is not None:
            with pfd:
                pfd.send(signal.SIGSTOP if value == "stopped" else signal.SIGCONT)
    elif kind == "move":
        pid, start = parse_pid_target(target)
        with contextlib.suppress(OomguardError):
            if read_stat(pid).start_ticks == start:
                cgroup_at(group.hierarchies, value).move(pid)
    else:
        raise ValueError(f"unknown change kind {kind!r}")


PAGE = os.sysconf("SC_PAGE_SIZE")
LIMIT_KINDS = ("limit", "memsw_limit", "high")
_LIMIT_NAMES = {"limit": "limit", "memsw_limit": "memory+swap limit", "high": "memory.high"}


def _limit_now(group: MemoryCgroup, kind: str) -> int | None:
    if kind == "limit":
        return group.limit()
    if kind == "memsw_limit":
        return group.memsw_limit()
    return group.soft_limit()  # v2: memory.high


def same_limit(now: int | None, text: str) -> bool:
    """`now` (as the file reads) is what writing `text` left: the kernel rounds a limit
    down to whole pages."""
    wrote = _value(text)
    if now is None or wrote is None:
        return now is wrote
    return now // PAGE == wrote // PAGE


def limit_family(kind: str) -> tuple[str, ...]:
    """The limit files written together: v1's memory and memory+swap limits are one
    resize (memsw must stay >= memory), memory.high is its own."""
    return ("limit", "memsw_limit") if kind in ("limit", "memsw_limit") else (kind,)


def owners_value(group: MemoryCgroup, newest: Mapping[str, str]) -> str | None:
    """Why oomguard must not put back a limit family whose files held, after oomguard's
    newest change of each, `newest` (kind -> the value written): someone else wrote one of
    them since (its value, said as a line's end); None while they all hold oomguard's
    values (or cannot be read: the restore says why)."""
    for kind, after in newest.items():
        if kind not in LIMIT_KINDS or (kind == "memsw_limit" and group.version != 1):
            continue
        try:
            now = _limit_now(group, kind)
        except (OomguardError, ValueError):
            continue
        if not same_limit(now, after):
            return (f"{_LIMIT_NAMES[kind]} {format_size(now)} set by someone else since "
                    f"oomguard set it to {format_size(_value(after))}")
    return None


@dataclass(slots=True)
class ActiveChange:
    id: int
    group: MemoryCgroup
    kind: str
    target: str
    before: str
    after: str
    tag: str = ""  # why: "grow" (shrunk back when usage allows), "hold", "incident", ...


class Ledger:
    """Applies changes with their intent recorded first; undoes them on request."""

    def __init__(self, journal: Journal, log: Callable[[str], None] | None = None) -> None:
        self.journal = journal
        self.active: dict[int, ActiveChange] = {}
        # The same changes by cgroup path: shutdown restores group by group, and a scan of
        # every change per group would grow with the square of the groups watched.
        self._by_group: dict[str, dict[int, ActiveChange]] = {}
        self._log = log or (lambda _msg: None)
        # The guardian process (guardian/link.py), told of every hold before it is made so
        # that it can undo it if this process dies or stalls; None where nothing guards.
        self.guardian: GuardianLink | None = None
        self.deadline_for: Callable[[MemoryCgroup], float] = lambda _g: 10.0

    def apply(self, group: MemoryCgroup, kind: str, target: str, before: str, after: str,
              incident_id: int | None = None, tag: str = "") -> ActiveChange:
        change_id = self.journal.record_change(group.relpath, kind, target, before, after,
                                               incident_id)
        change = ActiveChange(change_id, group, kind, target, before, after, tag)
        self.journal.commit()  # the intent is on disk before the change is made
        if self.guardian is not None:  # and the guardian knows how to undo it
            self.guardian.added(change, self.deadline_for(group))
        self._make(change)
        return change

    def apply_many(self, changes: Sequence[tuple[MemoryCgroup, FileChange]],
                   tag: str = "") -> list[ActiveChange]:
        """`apply` for many groups at once, their intents committed in one transaction
        (start-up's holds of 10,000 groups: one commit, not one each); each is still told
        to the guardian and on disk before it is made. A group gone or refusing is
        skipped (its row marked restored)."""
        self.journal.defer()
        try:
            recorded = [(group, c, self.journal.record_change(
                group.relpath, c.kind, group.relpath, c.before, c.after, None))
                for group, c in changes]
        finally:
            self.journal.commit()
        planned = [ActiveChange(change_id, group, c.kind, group.relpath, c.before, c.after, tag)
                   for group, c, change_id in recorded]
        if self.guardian is not None:  # told of them all before the first is made
            self.guardian.added_many(planned, lambda ch: self.deadline_for(ch.group))
        applied = []
        for change in planned:
            with contextlib.suppress(CgroupError):
                self._make(change)
                applied.append(change)
        return applied

    def _make(self, change: ActiveChange) -> None:
        """Write a change whose intent is recorded (and told to the guardian); if the
        write fails nothing changed: its row is marked restored and the error raised."""
        try:
            write_change(change.group, change.kind, change.target, change.after)
        except BaseException:
            self.journal.mark_restored(change.id)
            if self.guardian is not None:
                self.guardian.removed(change.id)
            raise
        crash_point(f"change:{change.kind}")
        self.active[change.id] = change
        self._by_group.setdefault(change.group.relpath, {})[change.id] = change

    def forget(self, change: ActiveChange) -> None:
        """Drop a change that needs no undoing (its group is gone, or it was undone)."""
        self.active.pop(change.id, None)
        if self.guardian is not None:
            self.guardian.removed(change.id)
        changes = self._by_group.get(change.group.relpath)
        if changes is not None:
            changes.pop(change.id, None)
            if not changes:
                del self._by_group[change.group.relpath]

    def let_go(self, change: ActiveChange) -> None:
        """Done with a change without undoing it (its group is gone, or what it would put
        back is no longer anyone's): marked restored in the journal, and forgotten here
        and by the guardian."""
        self.journal.mark_restored(change.id)
        self.forget(change)

    def restore(self, change: ActiveChange) -> bool:
        """Put `before` back; True if the system took it (or the group is gone, or its
        owner has written the limit since: then the owner's value stays)."""
        return self._undo([change])

    def put_back(self, group: MemoryCgroup, kind: str) -> bool:
        """Undo every active change of `kind` on `group` in one write of the oldest one's
        `before` (the value before any of them), not walked back change by change through
        values that would throttle or kill on the way; True as for restore."""
        return self._undo([c for c in self.for_group(group) if c.kind == kind])

    def _undo(self, changes: list[ActiveChange]) -> bool:
        """Write the first of `changes` (one group's, one file's, oldest first) back to its
        `before`, then let them all go."""
        if not changes:
            return True
        first = changes[0]
        # The files hold what oomguard's newest changes of them wrote, unless their owner
        # wrote one since (then the owner's value stands).
        owners = owners_value(first.group, self._newest(first.group, first.kind))
        if owners is not None:
            self._log(f"{first.group.relpath}: {owners}: left as it is")
        else:
            try:
                write_change(first.group, first.kind, first.target, first.before)
            except CgroupError as exc:
                if first.group.exists():
                    self._log(f"could not restore {first.kind} of {first.group.relpath}: "
                              f"{exc}")
                    return False
        for change in reversed(changes):
            self.let_go(change)
        return True

    def let_go_owners(self, group: MemoryCgroup) -> None:
        """Let go of `group`'s limit changes whose file its owner has written since (the
        owner's value stands), before deciding anything from what is left to restore."""
        for kind in ("limit", "high"):
            owners = owners_value(group, self._newest(group, kind))
            if owners is None:
                continue
            self._log(f"{group.relpath}: {owners}: left as it is")
            for change in self.for_group(group):
                if change.kind in limit_family(kind):
                    self.let_go(change)

    def _newest(self, group: MemoryCgroup, kind: str) -> dict[str, str]:
        """kind -> what oomguard's newest active change of it wrote, for `kind`'s family."""
        family = limit_family(kind)
        return {c.kind: c.after for c in self.for_group(group) if c.kind in family}

    def find(self, group: MemoryCgroup, kind: str,
             target: str | None = None) -> ActiveChange | None:
        """The oldest active change of `kind` on `group` (whose `before` is the original)."""
        for change in self.for_group(group):
            if change.kind == kind and target in (None, change.target):
                return change
        return None

    def for_group(self, group: MemoryCgroup) -> list[ActiveChange]:
        """Active changes of `group`, oldest first."""
        return sorted(self._by_group.get(group.relpath, {}).values(), key=lambda c: c.id)

    def restore_all(self, group: MemoryCgroup | None = None) -> list[ActiveChange]:
        """Undo active changes newest first; returns those the kernel refused."""
        failed = []
        changes = self.active.values() if group is None else self.for_group(group)
        ordered = sorted(changes, key=lambda c: _restore_order(c.kind, c.id), reverse=True)
        for change in ordered:
            if not self.restore(change):
                failed.append(change)
        return failed


def _restore_order(kind: str, change_id: int) -> tuple[int, int]:
    # Let tasks run again (continue, thaw) before limits come down, and limits come
    # down before the kernel's killer is switched back on; newest first within a kind.
    rank = {"stop": 3, "freeze": 3, "move": 2, "memsw_limit": 1, "limit": 1, "high": 1}
    return (rank.get(kind, 0), change_id)


# Recovery's last resort (Daemon supplies it, see engine.kill_until_restored): kill in
# `group` by its rule's ranking until `retry()` has restored its limits; the pids killed.
LastResort = Callable[[MemoryCgroup, Callable[[], bool]], list[int]]


def recover(journal: Journal, hier: Hierarchies, log: Callable[[str], None],
            last_resort: LastResort | None = None,
            skip: Callable[[str], bool] = lambda _p: False) -> list[Change]:
    """Put back what a crashed run left changed and close the incidents it left open
    (outcome "crashed", with an event naming what was undone); returns the changes that
    still failed.

    A grown limit that v1 refuses to lower (usage above it: EBUSY) is dealt with as at
    shutdown: `last_resort` kills by the rule's ranking until it can be restored, so the
    next run's baseline is the original limit, not the raised one. Incidents of groups
    `skip` names (another live owner's, e.g. `run`'s) are left open."""
    pending = sorted(journal.pending_changes(), key=lambda c: _restore_order(c.kind, c.id),
                     reverse=True)
    undone: dict[str, list[str]] = {}
    owned = _owners_limits(hier, pending, log)
    failed = [c for c in pending if not _recover_one(journal, hier, c, undone, owned, log)]
    killed: dict[str, list[int]] = {}
    if last_resort is not None and failed:
        by_group: dict[str, list[Change]] = {}
        for change in failed:
            by_group.setdefault(change.cgroup, []).append(change)
        failed = []
        for cgroup, left in by_group.items():
            def retry(left: list[Change] = left) -> bool:
                left[:] = [c for c in left
                           if not _recover_one(journal, hier, c, undone, owned)]
                return not left

            killed[cgroup] = last_resort(cgroup_at(hier, cgroup), retry)
            failed += left
    for change in failed:
        log(f"recovery: left {change.kind} of {change.cgroup} at {change.after} "
            f"(was {change.before}); it stays in the journal for the next start")
    _close_crashed(journal, undone, killed, skip, log)
    return failed


def _owners_limits(hier: Hierarchies, pending: list[Change],
                   log: Callable[[str], None]) -> set[tuple[str, str]]:
    """(cgroup, family) of the limits whose owner wrote them since oomguard did (while it
    was down): judged once, before any restore, from oomguard's newest write of each."""
    newest: dict[str, dict[str, str]] = {}
    for change in sorted(pending, key=lambda c: c.id):
        if change.kind in LIMIT_KINDS:
            newest.setdefault(change.cgroup, {})[change.kind] = change.after
    owned = set()
    for cgroup, wrote in newest.items():
        group = cgroup_at(hier, cgroup)
        for head in ("limit", "high"):
            family = {k: v for k, v in wrote.items() if k in limit_family(head)}
            owners = owners_value(group, family) if family else None
            if owners is not None:
                log(f"recovery: {cgroup}: {owners}: left as it is")
                owned.add((cgroup, head))
    return owned


def _recover_one(journal: Journal, hier: Hierarchies, change: Change,
                 undone: dict[str, list[str]], owned: set[tuple[str, str]],
                 log: Callable[[str], None] | None = None) -> bool:
    """Restore one pending change; True when done (or its group is gone, or its owner
    wrote the limit since: `owned`)."""
    group = cgroup_at(hier, change.cgroup)
    if not group.exists():
        journal.mark_restored(change.id)
        return True
    if (change.cgroup, limit_family(change.kind)[0]) in owned:
        undone.setdefault(change.cgroup, []).append(
            f"{change.kind} {change.after} -> left as its owner set it")
        journal.mark_restored(change.id)
        return True
    try:
        write_change(group, change.kind, change.target, change.before)
    except (CgroupError, OomguardError, ValueError) as exc:
        if log is not None:
            log(f"recovery: could not restore {change.kind} of {change.cgroup}: {exc}")
        return False
    if log is not None:
        log(f"recovery: restored {change.kind} of {change.cgroup} to {change.before}")
    undone.setdefault(change.cgroup, []).append(
        f"{change.kind} {change.after} -> {change.before}")
    journal.mark_restored(change.id)
    return True


def _close_crashed(journal: Journal, undone: dict[str, list[str]],
                   killed: dict[str, list[int]], skip: Callable[[str], bool],
                   log: Callable[[str], None]) -> None:
    """The incidents a crash left open: closed "crashed", saying what was undone."""
    for incident_id, cgroup in journal.open_incidents():
        if skip(cgroup):
            continue
        data: dict[str, object] = {"undone": undone.get(cgroup, []),
                                   "killed": killed.get(cgroup, [])}
        journal.add_event(incident_id, cgroup, "recovered", data)
        journal.close_incident(incident_id, "crashed", None)
        what = "; ".join(undone.get(cgroup, [])) or "nothing left to undo"
        kills = killed.get(cgroup)
        if kills:
            what += f"; killed {', '.join(map(str, kills))}"
        log(f"recovery: incident {incident_id} of {cgroup} closed as crashed ({what})")
