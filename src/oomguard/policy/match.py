"""Matching primitives: cgroup path globs and process matchers.

Pure functions on strings; nothing here reads /proc or cgroupfs.

Glob semantics (paths are relative to the cgroup mount, e.g. "/ci/job1"):
- a leading or trailing "/" is optional, on the pattern and on the path; "/" is the root;
- `*`, `?` and `[...]` match within one path segment (they never cross "/");
- `**` as a whole segment matches any number of segments: zero in the middle or at the start
  ("/a/**/b" matches "/a/b" and "/a/x/y/b"), one or more at the end ("/ci/**" matches
  "/ci/job1" and "/ci/a/b" but not "/ci" itself);
- `**` inside a segment ("/ci/job**") is an error.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from oomguard.containers import ContainerIdentity

_DOUBLE_STAR = "**"


def split_path(path: str) -> tuple[str, ...]:
    """Segments of a cgroup path; "/", "" and "//" are the root (no segments)."""
    return tuple(part for part in path.split("/") if part)


def normalize_path(path: str) -> str:
    """The canonical form of a cgroup path: "/a/b" (the root is "/")."""
    return "/" + "/".join(split_path(path))


@dataclass(frozen=True)
class PathGlob:
    """A compiled cgroup path glob; see the module docstring for its semantics."""

    pattern: str
    _segments: tuple[re.Pattern[str] | None, ...] = field(repr=False, compare=False)

    def matches(self, path: str) -> bool:
        return _match_segments(self._segments, split_path(path), 0, 0)


def compile_glob(pattern: str) -> PathGlob:
    """Compile a path glob; raises ValueError with a one-line reason when it is invalid."""
    if not pattern.strip():
        raise ValueError('an empty pattern matches nothing; use "/**" to match every cgroup')
    compiled: list[re.Pattern[str] | None] = []
    for segment in split_path(pattern):
        if segment == _DOUBLE_STAR:
            compiled.append(None)
        elif _DOUBLE_STAR in segment:
            raise ValueError(f'"**" must be a whole path segment (like "/ci/**"), got "{segment}"')
        else:
            compiled.append(re.compile(fnmatch.translate(segment)))
    return PathGlob(pattern, tuple(compiled))


def _match_segments(
    pattern: tuple[re.Pattern[str] | None, ...], path: tuple[str, ...], pi: int, si: int
) -> bool:
    while pi < len(pattern):
        segment = pattern[pi]
        if segment is None:
            last = pi == len(pattern) - 1
            if last:
                # A trailing "**" matches one or more segments: everything below, not the node.
                return si < len(path)
            return any(
                _match_segments(pattern, path, pi + 1, start) for start in range(si, len(path) + 1)
            )
        if si >= len(path) or segment.match(path[si]) is None:
            return False
        pi += 1
        si += 1
    return si == len(path)


@dataclass(frozen=True)
class ProcessMatcher:
    """Which processes a protect/prefer/avoid entry names.

    `anywhere` (from a plain string in the config) matches comm OR cmdline OR exe; the other fields
    must all match when given (re.search). `uids` matches when the uid is one of them.
    `label` is how the entry is shown to a person, e.g. "'leak'" or "comm='java' uid=1000".
    `container_init` (when not None) matches a process that is (True) or is not (False) the
    first process of its pid namespace: a container's PID 1, whose death ends the container.
    """

    label: str
    anywhere: re.Pattern[str] | None = None
    comm: re.Pattern[str] | None = None
    cmdline: re.Pattern[str] | None = None
    exe: re.Pattern[str] | None = None
    uids: frozenset[int] = frozenset()
    container_init: bool | None = None

    def matches(self, comm: str, cmdline: str | None, exe: str, uid: int,
                container_init: bool = False) -> bool:
        """`cmdline` None: it could not be read (a task asleep in the kernel holding its
        mmap lock); the cmdline patterns then count as matched: "could be this process".
        Callers that act on a match only where it spares a process (protect) use that."""
        if self.container_init is not None and self.container_init != container_init:
            return False
        if self.anywhere is not None and cmdline is not None and not (
            self.anywhere.search(comm) or self.anywhere.search(cmdline) or self.anywhere.search(exe)
        ):
            return False
        if self.comm is not None and self.comm.search(comm) is None:
            return False
        if (self.cmdline is not None and cmdline is not None
                and self.cmdline.search(cmdline) is None):
            return False
        if self.exe is not None and self.exe.search(exe) is None:
            return False
        return not (self.uids and uid not in self.uids)


def process_matcher(
    *,
    anywhere: str | None = None,
    comm: str | None = None,
    cmdline: str | None = None,
    exe: str | None = None,
    uids: frozenset[int] | set[int] | tuple[int, ...] = (),
    label: str | None = None,
    container_init: bool | None = None,
) -> ProcessMatcher:
    """Build a matcher from regex strings (re.error propagates for invalid ones)."""
    if label is None:
        if anywhere is not None:
            label = repr(anywhere)
        else:
            parts = [
                f"{key}={value!r}"
                for key, value in (("comm", comm), ("cmdline", cmdline), ("exe", exe))
                if value is not None
            ]
            parts += [f"uid={uid}" for uid in sorted(uids)]
            if container_init is not None:
                parts.append(f"container_init={str(container_init).lower()}")
            label = " ".join(parts) or "<everything>"
    return ProcessMatcher(
        label=label,
        anywhere=None if anywhere is None else re.compile(anywhere),
        comm=None if comm is None else re.compile(comm),
        cmdline=None if cmdline is None else re.compile(cmdline),
        exe=None if exe is None else re.compile(exe),
        uids=frozenset(uids),
        container_init=container_init,
    )


def container_matches(
    identity: ContainerIdentity,
    namespace: Sequence[str] = (),
    pod: Sequence[str] = (),
    container: Sequence[str] = (),
    qos: Sequence[str] = (),
    annotations: Sequence[tuple[str, str]] = (),
) -> bool:
    """Does a container identity meet a rule's conditions? Each non-empty one must: names
    and annotation values by glob (fnmatch, case-sensitive), QoS by class name."""

    def any_glob(globs: Sequence[str], value: str) -> bool:
        return not globs or (bool(value) and any(fnmatch.fnmatchcase(value, g) for g in globs))

    if qos and identity.qos not in qos:
        return False
    if not (any_glob(namespace, identity.namespace) and any_glob(pod, identity.pod)
            and any_glob(container, identity.container)):
        return False
    for key, glob in annotations:
        value = identity.annotations.get(key)
        if value is None or not fnmatch.fnmatchcase(value, glob):
            return False
    return True
