"""Which cgroups the rules match, found at start and as they appear (inotify).

Walks start at each rule's fixed prefix (the path before its first wildcard)
rather than the whole hierarchy, and only directories that could still lead
to a match are watched for new children.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from oomguard.cgroup import Hierarchies, MemoryCgroup, cgroup_at
from oomguard.errors import OomguardError
from oomguard.events.inotify import DirectoryWatcher
from oomguard.events.loop import EventLoop
from oomguard.policy import Policy, Rule
from oomguard.policy.match import split_path

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

    def _limits(self) -> int | None:
        depths = [max_depth(r.match) for r in self.policy.rules]
        return None if any(d is None for d in depths) else max(d or 0 for d in depths)

    def _roots(self) -> list[str]:
        prefixes = sorted({fixed_prefix(r.match) for r in self.policy.rules})
        roots: list[str] = []
        for p in prefixes:
            if not any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots):
                roots.append(p)
        return roots

    def _walk(self, relpath: str) -> Iterator[str]:
        depth = len(split_path(relpath))
        yield relpath
        if self._depth_limit is not None and depth >= self._depth_limit:
            return
        group = cgroup_at(self.hier, relpath)
        try:
            names = sorted(e.name for e in os.scandir(group.path) if e.is_dir())
        except OSError:
            return
        for name in names:
            yield from self._walk(f"{relpath.rstrip('/')}/{name}")

    def scan(self, start: str | None = None) -> int:
        """Adopt every matching group below `start` (default: each rule's root)."""
        found = 0
        for root in [start] if start else self._roots():
            for relpath in self._walk(root):
                group = cgroup_at(self.hier, relpath)
                if not group.path.is_dir():
                    continue
                if self._could_lead_to_match(relpath):
                    try:
                        self.watcher.watch(str(group.path))
                    except OSError:
                        pass  # vanished, or out of inotify watches: still adopt what we see
                found += self._consider(group)
        return found

    def _could_lead_to_match(self, relpath: str) -> bool:
        depth = len(split_path(relpath))
        return self._depth_limit is None or depth < self._depth_limit

    def _consider(self, group: MemoryCgroup) -> int:
        if self.skip(group.relpath):
            return 0
        rule = self.policy.rule_for(group.relpath)
        if rule is None:
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
        self.loop.remove_reader(self.watcher.fileno())
        self.watcher.close()
