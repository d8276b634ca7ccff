"""The evidence directory: the files an incident leaves behind for a post-mortem.

One directory per incident, beside the journal by default::

    /var/lib/oomguard/evidence/<incident-id>/          (root; else $XDG_STATE_HOME/oomguard/...)
        ps.txt                  the process table, as `oomguard ps` prints it (escaped)
        cgroup.txt              usage, limits and event counters of the group
        memory.stat             the group's memory.stat, verbatim
        tasks/<pid>.status      /proc/PID/status of each task at the OOM (largest first, <= 64)
        tasks/<pid>.smaps_rollup  read right after the decisive step: a victim's may be missing
        core.<pid>              a core dump, when a `core` step took one

`$OOMGUARD_EVIDENCE_DIR` overrides the directory, `$OOMGUARD_EVIDENCE_MAX` the total cap
(default 256M). Bounded: each file is cut at FILE_MAX, and the whole directory is kept under
the total cap by deleting the evidence of the least recently written incidents first (never
the one being written). Only entries named like incident directories are ever deleted.
The journal names the directory (evidence kind "evidence-dir").
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from oomguard.cgroup.files import parse_kv
from oomguard.cli.output import table
from oomguard.errors import OomguardError
from oomguard.escape import printable
from oomguard.fsutil import remove_tree
from oomguard.procs.reader import dying, parse_smaps_rollup, read_cmdline
from oomguard.units import format_size, parse_size

if TYPE_CHECKING:
    from oomguard.cgroup import MemoryCgroup
    from oomguard.procs.reader import ProcessSnapshot

DEFAULT_TOTAL_MAX = 256 << 20
FILE_MAX = 4 << 20
PROC_READ_MAX = 256 << 10
MAX_TASKS = 64  # tasks whose /proc files are kept, largest first (the snapshot's order)
_INCIDENT_DIR = re.compile(r"^\d+(-\d+)?$")


def default_evidence_root(journal_path: str | os.PathLike[str]) -> Path | None:
    """$OOMGUARD_EVIDENCE_DIR, else `evidence/` beside the journal; None for an in-memory one."""
    override = os.environ.get("OOMGUARD_EVIDENCE_DIR")
    if override:
        return Path(override).expanduser()
    path = os.fspath(journal_path)
    if path == ":memory:" or not path:
        return None
    return Path(path).resolve().parent / "evidence"


def default_total_max() -> int:
    text = os.environ.get("OOMGUARD_EVIDENCE_MAX", "")
    if text:
        try:
            return parse_size(text)
        except ValueError:
            pass
    return DEFAULT_TOTAL_MAX


class EvidenceStore:
    """Writes incident evidence under `root`, within `total_max` bytes overall."""

    def __init__(self, root: Path, total_max: int = DEFAULT_TOTAL_MAX,
                 file_max: int = FILE_MAX) -> None:
        self.root = root
        self.total_max = total_max
        self.file_max = file_max
        self._dirs: dict[int, Path] = {}
        # (last written, bytes on disk) of each incident directory: scanned once, then kept
        # up to date by this store, so the cap costs no walk over old evidence per incident.
        self._sizes: dict[Path, tuple[float, int]] | None = None

    # -- directories -------------------------------------------------------------------
    def dir_for(self, incident_id: int) -> tuple[Path, bool]:
        """The incident's directory (made 0700 if new) and whether it was just made.

        A directory left by an earlier journal with the same incident number is not
        reused: the new one gets a suffix (`7-2`), and the journal records the real path.
        """
        known = self._dirs.get(incident_id)
        if known is not None and known.is_dir():
            return known, False
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for n in range(1, 1000):
            path = self.root / (str(incident_id) if n == 1 else f"{incident_id}-{n}")
            try:
                path.mkdir(mode=0o700)
            except FileExistsError:
                continue
            self._dirs[incident_id] = path
            if self._sizes is not None:
                self._sizes[path] = (time.time(), 0)
            return path, True
        raise OSError(f"{self.root}: no free directory name for incident {incident_id}")

    def write(self, directory: Path, name: str, data: bytes) -> int:
        """Write one file (cut at file_max, saying so at the end); returns bytes written."""
        if len(data) > self.file_max:
            note = f"\n[oomguard: cut at {format_size(self.file_max)}]\n".encode()
            data = data[: self.file_max - len(note)] + note
        path = directory / name
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        return len(data)

    # -- the cap -----------------------------------------------------------------------
    def _incident_dirs(self) -> list[Path]:
        try:
            entries = list(self.root.iterdir())
        except FileNotFoundError:
            return []
        return [p for p in entries if _INCIDENT_DIR.match(p.name) and p.is_dir()
                and not p.is_symlink()]

    @staticmethod
    def size_of(path: Path) -> int:
        total = 0
        for dirpath, _dirs, files in os.walk(path):
            for name in files:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
                except OSError:
                    continue
        return total

    def _index(self) -> dict[Path, tuple[float, int]]:
        if self._sizes is None:
            sizes = {}
            for p in self._incident_dirs():
                try:
                    sizes[p] = (p.stat().st_mtime, self.size_of(p))
                except OSError:
                    continue
            self._sizes = sizes
        return self._sizes

    def refresh(self, directory: Path) -> None:
        """Take note of what was just written into `directory`."""
        if self._sizes is not None:
            self._sizes[directory] = (time.time(), self.size_of(directory))

    def usage(self) -> int:
        return sum(size for _, size in self._index().values())

    def make_room(self, need: int, keep: Path | None = None) -> bool:
        """Delete the least recently written incidents' evidence (never `keep`) until `need`
        more bytes fit under the cap; False if they cannot."""
        if need > self.total_max:
            return False
        index = self._index()
        total = sum(size for _, size in index.values())
        for path, (_, size) in sorted(index.items(), key=lambda item: item[1][0]):
            if total + need <= self.total_max:
                break
            if keep is not None and path == keep:
                continue
            remove_tree(path)
            index.pop(path, None)
            total -= size
        return total + need <= self.total_max

    def room_left(self) -> int:
        return max(0, self.total_max - self.usage())

    # -- what a snapshot leaves --------------------------------------------------------
    def snapshot_files(self, data: Mapping[str, object], look: ProcessSnapshot | None,
                       raw: Mapping[str, bytes]) -> dict[str, bytes]:
        """The snapshot's files from what was read already: the listing and each task's
        status as they were at the OOM (`look`), memory.stat and smaps_rollup as read just
        after the decision (`raw`, from `enrich`). Nothing is read from /proc here."""
        files: dict[str, bytes] = {}
        rows = data.get("ps")
        listing = rows if isinstance(rows, list) else []
        files["ps.txt"] = (format_ps(listing) + "\n").encode("utf-8", "surrogateescape")
        files["cgroup.txt"] = format_cgroup(data).encode("utf-8", "surrogateescape")
        files["memory.stat"] = raw.get("memory.stat", b"[oomguard: memory.stat not read]\n")
        for row in listing[:MAX_TASKS]:
            pid = int(str(row.get("pid", 0))) if isinstance(row, dict) else 0
            if pid <= 0:
                continue
            task = look.by_pid(pid) if look is not None else None
            if task is not None and task.status:
                files[f"tasks/{pid}.status"] = task.status[:PROC_READ_MAX]
            rollup = raw.get(f"{pid}.smaps_rollup")
            if rollup is not None:
                files[f"tasks/{pid}.smaps_rollup"] = rollup
        return files

    def save_files(self, incident_id: int, files: Mapping[str, bytes]) -> dict[str, object]:
        """Write `files` into the incident's directory, within the caps; returns what the
        journal records about them ("new": the directory was just made)."""
        directory, new = self.dir_for(incident_id)
        self.make_room(sum(min(len(b), self.file_max) for b in files.values()), keep=directory)
        written = sum(self.write(directory, name, raw) for name, raw in files.items())
        self.refresh(directory)
        self.make_room(0, keep=directory)
        return {"path": str(directory), "files": sorted(files), "bytes": written, "new": new}


def _read_proc(pid: int, name: str) -> bytes | None:
    try:
        fd = os.open(f"/proc/{pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks, total = [], 0
        while total < PROC_READ_MAX:
            chunk = os.read(fd, min(65536, PROC_READ_MAX - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def listing_at_oom(look: ProcessSnapshot) -> list[dict[str, object]]:
    """The RFC's ps listing of the group from the look taken at the OOM: pid, ppid, uid,
    state, vsz, rss, anon rss, comm (and args where the ranking read them), largest first."""
    rows: list[dict[str, object]] = [
        {"pid": t.pid, "ppid": t.ppid, "uid": t.uid, "state": t.state, "vsz": t.vsz,
         "rss": t.rss, "rss_anon": t.rss_anon, "comm": t.comm, "args": t.args}
        for t in look]
    if look.groups > 1:  # a subtree's look: which group each task is a member of
        for row, t in zip(rows, look, strict=True):
            row["cgroup"] = t.cgroup
    rows.sort(key=lambda row: -int(str(row["rss"])))
    return rows


def at_oom(group: MemoryCgroup, look: ProcessSnapshot) -> dict[str, object]:
    """What the snapshot records before the decisive step: the listing (already read for
    the ranking) and the group's usage and limit: two small cgroupfs reads."""
    data: dict[str, object] = {"cgroup": group.relpath}
    try:
        data["usage"] = group.usage()
        data["limit"] = group.limit()
    except OomguardError as exc:
        data["error"] = str(exc)
    data["ps"] = listing_at_oom(look)
    if look.derived.get("ahead"):  # system mode's look taken ahead (sysmem.ready_look)
        data["look_age_ms"] = round((time.monotonic() - look.taken) * 1000.0, 1)
    if look.groups > 1 or look.cut:
        data["subtree"] = {"groups": look.groups, **({"cut": look.cut} if look.cut else {})}
    return data


def enrich(group: MemoryCgroup, data: dict[str, object]) -> dict[str, bytes]:
    """The costly rest, read once the decisive step has been sent (the waiting tasks do
    not wait for it): memsw and event counters, memory.stat, the args of the tasks whose
    were not read (the victim's are often gone by now), each task's smaps_rollup (it walks
    the task's page tables: ~0.9 ms at 64 MiB). Returns the raw bytes for the files."""
    raw: dict[str, bytes] = {}
    try:
        data["memsw_usage"] = group.memsw_usage()
        data["memsw_limit"] = group.memsw_limit()
        data["events"] = group.events()
        text = group.read("memory.stat")
        raw["memory.stat"] = text.encode()
        data["memory_stat"] = parse_kv(text)
    except (OomguardError, OSError) as exc:
        data.setdefault("error", str(exc))
    rows = data.get("ps")
    listing = rows if isinstance(rows, list) else []
    for row in listing[:MAX_TASKS]:
        pid = int(str(row.get("pid", 0)))
        if dying(pid):
            # A victim being torn down: smaps_rollup and cmdline take its mmap lock, which
            # its exit needs (measured: a 0.9 ms smaps walk delayed a 64M victim's exit).
            continue
        if row.get("args") is None:
            try:
                row["args"] = read_cmdline(pid, str(row.get("state", "")))
            except OomguardError:
                pass
        rollup = _read_proc(pid, "smaps_rollup")
        if rollup:
            raw[f"{pid}.smaps_rollup"] = rollup
        row["smaps_rollup"] = parse_smaps_rollup(rollup) if rollup else None
    return raw


def format_ps(rows: list[object]) -> str:
    """The listing as `oomguard ps` prints it: every cell escaped, sizes in KiB."""
    body: list[list[object]] = []
    for row in rows:
        if not isinstance(row, dict):
            continue
        args = row.get("args")
        command = " ".join(map(str, args)) if isinstance(args, list) and args \
            else f"[{row.get('comm', '')}]"
        body.append([row.get("pid"), row.get("ppid"), row.get("uid"), row.get("state"),
                     int(str(row.get("vsz", 0))) // 1024, int(str(row.get("rss", 0))) // 1024,
                     command])
    return table(["PID", "PPID", "UID", "S", "VSZ", "RSS", "ARGS"], body)


def format_cgroup(data: Mapping[str, object]) -> str:
    lines = [f"cgroup: {data.get('cgroup')}"]
    for key in ("usage", "limit", "memsw_usage", "memsw_limit"):
        value = data.get(key)
        lines.append(f"{key}: {'max' if value is None else value}")
    events = data.get("events")
    if isinstance(events, dict):
        lines += [f"events.{k}: {v}" for k, v in events.items()]
    if "error" in data:
        lines.append(f"error: {data['error']}")
    return "\n".join(printable(line) for line in lines) + "\n"
