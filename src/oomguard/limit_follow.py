"""The hold follows the limit its owner writes (v2: memory.high sits at memory.max's value).

A v2 hold is memory.high at the group's limit and memory.max a headroom above it. Two
things move that limit after adoption, and each broke the hold before:

- a container runtime makes the cgroup, then writes memory.max: adopted in between (the
  daemon's discovery often is: seen in CI), the group had nothing to hold at, and was
  never held;
- the owner of a held group writes a new limit (a pod resized in place, `systemctl
  set-property MemoryMax=`, `docker update --memory`): the hold stayed at the old limit,
  throttling the group below a raised one, and oomguard put the old limit back at exit.

So the limit file of every group whose hold sits at the limit is watched (inotify, by
watch.LimitWatcher), and oomguard's own writes are told apart by value: memory.max is what
the ledger's newest limit change wrote. Any other value is the owner's and stands.
v1's hold (oom_kill_disable) needs no limit: nothing here applies to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from oomguard.cgroup import MemoryCgroup
from oomguard.errors import OomguardError
from oomguard.incident import Incident
from oomguard.ledger import same_limit
from oomguard.policy import StepKind
from oomguard.units import format_size
from oomguard.watch import LimitWatcher, Watch

if TYPE_CHECKING:
    from oomguard.engine import Engine


class LimitFollower:
    """Holds a group at the limit its owner wrote last; owned by the engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.watcher = LimitWatcher(engine.loop, self.written, engine.log.warning)

    def applies(self, watch: Watch) -> bool:
        """A rule that holds, on a group whose hold sits at its limit."""
        rule = watch.rule
        return (watch.group.hold_waits_for_file is not None and not rule.dry_run
                and any(s.kind is StepKind.HOLD for s in rule.steps))

    def add(self, watch: Watch) -> None:
        """At adoption: watch the limit file (looked at once right after, too)."""
        if self.applies(watch):
            assert watch.group.hold_waits_for_file is not None
            self.watcher.add(watch, watch.group.hold_waits_for_file)

    def discard(self, watch: Watch) -> None:
        self.watcher.discard(watch)

    def incident_closed(self, watch: Watch) -> None:
        """A write during an incident waited for its close (the incident's own grows and
        hand-over write the file too)."""
        if self.applies(watch):
            self.written(watch)

    def written(self, watch: Watch) -> None:
        """The limit file was written (or is looked at once after the watch began, or
        after an incident). A first limit is held at; a new one moves the hold."""
        engine = self.engine
        if engine.watches.get(watch.relpath) is not watch:
            self.watcher.discard(watch)
            return
        inc = watch.incident
        if isinstance(inc, Incident) and inc.state != "closed":
            return  # looked at again when it closes
        group = watch.group
        try:
            limit = group.limit()
        except OomguardError:
            return  # removed: the removal watch tells
        if self._is_ours(group, limit):
            return  # oomguard's own write
        if any(c.tag == "hold" for c in engine.ledger.for_group(group)):
            self._rebase(watch, limit)
            return
        if limit is None:
            return  # still no limit: nothing to hold at yet
        watch.baseline_limit = group.unheld_limit()
        self._hold(watch, f"limit {format_size(limit)} set after adoption",
                   "its OOMs are held from now on")

    def close(self) -> None:
        self.watcher.close()

    def _rebase(self, watch: Watch, limit: int | None) -> None:
        """The owner of a held group wrote a new limit. It stands: oomguard's limit changes
        are let go, its memory.high comes off, and the group is held again at the new
        limit (none: nothing to hold at, until one is written)."""
        engine, group = self.engine, watch.group
        was = watch.baseline_limit
        self._leave_owners_limit(group)
        # All of oomguard's memory.high comes off, the grows' too: one left behind would
        # later be shrunk back to its old value, over the new hold (seen in CI: the group
        # throttled at 64M under the owner's 256M, and still held after oomguard's exit).
        engine.ledger.put_back(group, "high")
        watch.baseline_limit = limit
        if limit is None:
            engine.log.info(f"{watch.relpath}: its limit was removed by someone else "
                            f"(oomguard held it at {format_size(was)}): nothing held until "
                            "one is set")
            return
        self._hold(watch, f"limit set to {format_size(limit)} by someone else (oomguard "
                   f"held it at {format_size(was)})",
                   "held at the new limit, which is what oomguard leaves in place when it "
                   "lets go")

    def _is_ours(self, group: MemoryCgroup, limit: int | None) -> bool | None:
        """True: `limit` is what oomguard's newest active limit change wrote; False: someone
        wrote another since; None: oomguard has no limit change on the group."""
        ours = [c for c in self.engine.ledger.for_group(group) if c.kind == "limit"]
        return None if not ours else same_limit(limit, ours[-1].after)

    def _leave_owners_limit(self, group: MemoryCgroup) -> None:
        """oomguard's limit changes let go without being undone (what they would put back
        is no longer the owner's), in the journal and with the guardian."""
        ledger = self.engine.ledger
        for change in ledger.for_group(group):
            if change.kind == "limit":
                ledger.let_go(change)

    def _hold(self, watch: Watch, what: str, held: str) -> None:
        """The adoption hold at `watch.baseline_limit`, just learnt; said either way."""
        engine = self.engine
        try:
            engine.hold(watch)
        except OomguardError as exc:
            engine.log.warning(f"{watch.relpath}: {what}, but it could not be held: {exc}")
            return
        engine.log.info(f"{watch.relpath}: {what}: {held}")
        engine.arm_ahead(watch)
