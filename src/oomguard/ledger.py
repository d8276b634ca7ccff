"""Every change oomguard makes to the system, recorded before it is made.

A change is (kind, cgroup, target, before, after). The ledger writes the
journal row first, then the kernel file or signal; undoing needs nothing but
the row, so the changes a crashed run left behind are put back at the next
start (`recover`), and a SIGTERM puts back the ones still active (`restore_all`).

Kinds and what undoing them means:
  limit, memsw_limit, high          write `before` back to the cgroup file
  oom_kill_disable                  write `before` ("0"/"1")
  freeze                            thaw
  stop                              SIGCONT the process (target "pid:N:start")
  move                              move the process back to `before`
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable
from dataclasses import dataclass

from oomguard.cgroup import Hierarchies, MemoryCgroup, cgroup_at
from oomguard.cgroup.v2 import V2MemoryCgroup
from oomguard.errors import CgroupError, OomguardError
from oomguard.journal import Change, Journal
from oomguard.procs.pidfd import Pidfd
from oomguard.procs.reader import read_stat

MAX = "max"


def pid_target(pid: int, start_ticks: int) -> str:
    """Names a process so that a reused pid never matches: pid:N:start."""
    return f"pid:{pid}:{start_ticks}"


def _parse_pid_target(target: str) -> tuple[int, int]:
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
        if not isinstance(group, V2MemoryCgroup):
            raise CgroupError(str(group.path), "memory.high is cgroup v2 only")
        group.set_high(_value(value))
    elif kind == "oom_kill_disable":
        group.set_oom_kill_disable(value == "1")
    elif kind == "freeze":
        if value == "FROZEN":
            group.freeze()
        else:
            group.thaw()
    elif kind == "stop":
        pfd = Pidfd.open_if_same(*_parse_pid_target(target))
        if pfd is not None:
            with pfd:
                pfd.send(signal.SIGSTOP if value == "stopped" else signal.SIGCONT)
    elif kind == "move":
        pid, start = _parse_pid_target(target)
        with contextlib.suppress(OomguardError):
            if read_stat(pid).start_ticks == start:
                cgroup_at(group.hierarchies, value).move(pid)
    else:
        raise ValueError(f"unknown change kind {kind!r}")


@dataclass
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

    def apply(self, group: MemoryCgroup, kind: str, target: str, before: str, after: str,
              incident_id: int | None = None, tag: str = "") -> ActiveChange:
        change_id = self.journal.record_change(group.relpath, kind, target, before, after,
                                               incident_id)
        change = ActiveChange(change_id, group, kind, target, before, after, tag)
        self.journal.commit()  # the intent is on disk before the change is made
        try:
            write_change(group, kind, target, after)
        except BaseException:
            # Nothing changed, so there is nothing to restore.
            self.journal.mark_restored(change_id)
            raise
        self.active[change_id] = change
        self._by_group.setdefault(group.relpath, {})[change_id] = change
        return change

    def forget(self, change: ActiveChange) -> None:
        """Drop a change that needs no undoing (its group is gone)."""
        self.active.pop(change.id, None)
        changes = self._by_group.get(change.group.relpath)
        if changes is not None:
            changes.pop(change.id, None)
            if not changes:
                del self._by_group[change.group.relpath]

    def restore(self, change: ActiveChange) -> bool:
        """Put `before` back; True if the system took it (or the group is gone)."""
        try:
            write_change(change.group, change.kind, change.target, change.before)
        except CgroupError as exc:
            if change.group.exists():
                self._log(f"could not restore {change.kind} of {change.group.relpath}: {exc}")
                return False
        self.journal.mark_restored(change.id)
        self.forget(change)
        return True

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


def recover(journal: Journal, hier: Hierarchies, log: Callable[[str], None]) -> list[Change]:
    """Put back what a crashed run left changed; returns the changes that still failed."""
    failed = []
    pending = sorted(journal.pending_changes(), key=lambda c: _restore_order(c.kind, c.id),
                     reverse=True)
    for change in pending:
        group = cgroup_at(hier, change.cgroup)
        if not group.exists():
            journal.mark_restored(change.id)
            continue
        try:
            write_change(group, change.kind, change.target, change.before)
        except (CgroupError, OomguardError, ValueError) as exc:
            log(f"recovery: could not restore {change.kind} of {change.cgroup}: {exc}")
            failed.append(change)
            continue
        log(f"recovery: restored {change.kind} of {change.cgroup} to {change.before}")
        journal.mark_restored(change.id)
    return failed
