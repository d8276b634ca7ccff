"""Which cgroups the rules match, found at start and as they appear (inotify).

Walks start at each rule's fixed prefix (the path before its first wildcard)
rather than the whole hierarchy, and only directories that could still lead
to a match are watched for new children.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from oomguard.cgroup import Hierarchies, MemoryCgroup, cgroup_at
from oomguard.containers import ContainerIdentity, default_index
from oomguard.errors import OomguardError
from oomguard.events.inotify import DirectoryWatcher
from oomguard.events.loop import EventLoop
from oomguard.policy import Policy, Rule, StepKind
from oomguard.policy.match import split_path
from oomguard.units import format_size

_WILD = set("*?[")


def fixed_prefix(pattern: str) -> str:
    parts = []
    for seg in split_path(pattern):
        if _WILD & set(seg):
            break
        parts.append(seg)
    return "/" + "/".join(parts)


def max_depth(pattern: str) -> int | None:
    """How deep below the root a match can be; None for `**` (any depth)."""
    segs = split_path(pattern)
    return None if "**" in segs else len(segs)


@dataclass(frozen=True)
class AdoptionPlan:
    """What adopting `relpath` under `rule` changes, read before anything is changed: the
    same facts for `oomguard check` (nothing changed), the daemon's "adopted" line, and
    dry-run's "would" lines."""

    relpath: str
    rule: str
    limit_was: int | None
    limit_to: int | None  # None: the limit is left as it is
    memsw_was: int | None
    memsw_to: int | None
    holds: bool  # the rule holds OOMs (a hold step)
    held_already: bool
    hold_how: str

    def changes(self) -> list[str]:
        """One phrase per change: "limit 64M (was max)", "OOM held (kernel killer off)"."""
        out = []
        if self.limit_to is not None:
            out.append(f"limit {format_size(self.limit_to)} (was {format_size(self.limit_was)})")
        if self.memsw_to is not None:
            out.append(f"memory+swap limit {format_size(self.memsw_to)} "
                       f"(was {format_size(self.memsw_was)})")
        if self.holds:
            out.append(f"OOM held ({self.hold_how})"
                       + (" as it already was" if self.held_already else ""))
        return out

    def summary(self) -> str:
        """`limit 64M (was max), OOM held (kernel killer off)`, or what is left alone."""
        return ", ".join(self.changes()) or "nothing changed (only watched)"

    def would_lines(self) -> list[str]:
        """Dry-run's lines: every change a real run would make, as "would ..."."""
        out = []
        if self.limit_to is not None:
            out.append(f"dry-run: would set limit of {self.relpath} to "
                       f"{format_size(self.limit_to)} (was {format_size(self.limit_was)})")
        if self.memsw_to is not None:
            out.append(f"dry-run: would set memory+swap limit of {self.relpath} to "
                       f"{format_size(self.memsw_to)} (was {format_size(self.memsw_was)})")
        if self.holds and not self.held_already:
            out.append(f"dry-run: would hold OOMs of {self.relpath} ({self.hold_how}); "
                       "the kernel's killer acts as usual meanwhile")
        return out


def plan_adoption(group: MemoryCgroup, rule: Rule) -> AdoptionPlan:
    """Read what adopting `group` under `rule` would change (the engine's `_adopt`)."""
    limit = group.limit()
    memsw = group.memsw_limit() if rule.memsw is not None else None
    return AdoptionPlan(
        relpath=group.relpath, rule=rule.name, limit_was=limit,
        limit_to=rule.memory if rule.memory is not None and rule.memory != limit else None,
        memsw_was=memsw,
        memsw_to=rule.memsw if rule.memsw is not None and rule.memsw != memsw else None,
        holds=any(st.kind is StepKind.HOLD for st in rule.steps),
        held_already=group.is_held(),
        hold_how=group.hold_note or "kernel killer off",
    )


#: A group that looks like a container, with no rule yet because its names are not on the
#: node yet, is considered again after these delays (seconds). runc writes state.json
#: 50-250 ms after it made the cgroup here (containerd's and CRI-O's bundles exist before):
#: until then an OOM in it is the kernel's (seen: a leaker filling 64M in 0.3 s).
NAME_RETRIES = (0.05, 0.1, 0.2, 0.4, 1.0, 5.0)


def _identity(policy: Policy, relpath: str) -> ContainerIdentity | None:
    """Who the group is as a container, only when a rule asks (read once, cached)."""
    return default_index().lookup(relpath) if policy.speaks_containers else None


def walk(hier: Hierarchies, relpath: str, depth_limit: int | None) -> Iterator[str]:
    """`relpath` and the groups below it, down to `depth_limit` levels from the root."""
    depth = len(split_path(relpath))
    yield relpath
    if depth_limit is not None and depth >= depth_limit:
        return
    group = cgroup_at(hier, relpath)
    try:
        names = sorted(e.name for e in os.scandir(group.dir) if e.is_dir())
    except OSError:
        return
    for name in names:
        yield from walk(hier, f"{relpath.rstrip('/')}/{name}", depth_limit)


def rule_roots(policy: Policy) -> list[str]:
    """Each rule's fixed prefix, without those inside another's."""
    prefixes = sorted({fixed_prefix(r.match) for r in policy.rules})
    roots: list[str] = []
    for p in prefixes:
        if not any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots):
            roots.append(p)
    return roots


def depth_limit(policy: Policy) -> int | None:
    depths = [max_depth(r.match) for r in policy.rules]
    return None if any(d is None for d in depths) else max(d or 0 for d in depths)


def matching_groups(hier: Hierarchies, policy: Policy,
                    skip: Callable[[str], bool] = lambda _p: False,
                    ) -> Iterator[tuple[MemoryCgroup, Rule]]:
    """Every existing group a rule would adopt now, with its rule; nothing is changed."""
    limit = depth_limit(policy)
    for root in rule_roots(policy):
        for relpath in walk(hier, root, limit):
            if skip(relpath):
                continue
            rule = policy.rule_for(relpath, _identity(policy, relpath))
            group = cgroup_at(hier, relpath)
            if rule is not None and group.path.is_dir():
                yield group, rule


class Discovery:
    def __init__(self, hier: Hierarchies, policy: Policy, loop: EventLoop,
                 on_match: Callable[[MemoryCgroup, Rule], None],
                 skip: Callable[[str], bool] = lambda _p: False) -> None:
        self.hier = hier
        self.policy = policy
        self.loop = loop
        self.on_match = on_match
        self.skip = skip
        self.mount = hier.memory
        self.watcher = DirectoryWatcher()
        loop.add_reader(self.watcher.fileno(), self._on_dir_event, self.watcher.poll_events)
        self._depth_limit = self._limits()
        self.closed = False

    def _limits(self) -> int | None:
        return depth_limit(self.policy)

    def _roots(self) -> list[str]:
        return rule_roots(self.policy)

    def _walk(self, relpath: str) -> Iterator[str]:
        return walk(self.hier, relpath, self._depth_limit)

    def scan(self, start: str | None = None) -> int:
        """Adopt every matching group below `start` (default: each rule's root)."""
        found = 0
        for root in [start] if start else self._roots():
            for relpath in self._walk(root):
                group = cgroup_at(self.hier, relpath)
                if not group.exists():
                    continue
                if self._could_lead_to_match(relpath):
                    try:
                        self.watcher.watch(group.dir)
                    except OSError:
                        pass  # vanished, or out of inotify watches: still adopt what we see
                found += self._consider(group)
        return found

    def _could_lead_to_match(self, relpath: str) -> bool:
        depth = len(split_path(relpath))
        return self._depth_limit is None or depth < self._depth_limit

    def _again(self, group: MemoryCgroup, retry: int) -> None:
        if not self.closed and group.path.is_dir():
            default_index().forget(group.relpath)
            self._consider(group, retry)

    def _consider(self, group: MemoryCgroup, retry: int = 0) -> int:
        if self.skip(group.relpath):
            return 0
        identity = _identity(self.policy, group.relpath)
        rule = self.policy.rule_for(group.relpath, identity)
        if rule is None:
            if identity is not None and identity.id and not identity.named and retry < len(
                    NAME_RETRIES):
                # A rule may want its names, which the runtime writes just after it made
                # the cgroup (runc: state.json): consider the group again a little later.
                self.loop.call_later(NAME_RETRIES[retry], lambda: self._again(group, retry + 1))
            return 0
        try:
            self.on_match(group, rule)
        except OomguardError:
            return 0  # removed between seeing and adopting it, or not a memory cgroup
        return 1

    def _on_dir_event(self, _revents: int) -> None:
        for ev in self.watcher.read():
            if ev.overflow:
                self.scan()
                continue
            if not ev.created or self.mount is None:
                continue
            parent_rel = "/" + os.path.relpath(ev.path, self.mount.mount_point).lstrip(".")
            relpath = f"{parent_rel.rstrip('/')}/{ev.name}"
            self.scan(relpath)

    def close(self) -> None:
        self.closed = True
        self.loop.remove_reader(self.watcher.fileno())
        self.watcher.close()
