"""The cgroup v1 memory controller (and the v1 freezer beside it).

v1 is where the RFC's interface lives: `memory.oom_control` can switch the
kernel's OOM killer off so that tasks sleep until someone acts.
"""

from __future__ import annotations

from pathlib import Path

from oomguard.cgroup import files
from oomguard.cgroup.base import (
    UNLIMITED_THRESHOLD,
    FileChange,
    MemoryCgroup,
    OomState,
)
from oomguard.errors import Unsupported


def _limit(value: int) -> int | None:
    return None if value >= UNLIMITED_THRESHOLD else value


class V1MemoryCgroup(MemoryCgroup):
    __slots__ = ()
    version = 1
    has_usage_thresholds = True
    memsw_bounds_memory = True

    def tasks(self) -> list[int]:
        return files.parse_pids(self.read("tasks"))

    def usage(self) -> int:
        return self.read_int("memory.usage_in_bytes")

    def limit(self) -> int | None:
        return _limit(self.read_int("memory.limit_in_bytes"))

    def set_limit(self, value: int | None) -> None:
        self.write("memory.limit_in_bytes", "-1" if value is None else str(value))

    def memsw_usage(self) -> int | None:
        if not self.has_file("memory.memsw.usage_in_bytes"):
            return None
        return self.read_int("memory.memsw.usage_in_bytes")

    def memsw_limit(self) -> int | None:
        if not self.has_file("memory.memsw.limit_in_bytes"):
            return None
        return _limit(self.read_int("memory.memsw.limit_in_bytes"))

    def set_memsw_limit(self, value: int | None) -> None:
        if not self.has_file("memory.memsw.limit_in_bytes"):
            raise Unsupported(str(self.path), "no swap accounting (memory.memsw.*)")
        self.write("memory.memsw.limit_in_bytes", "-1" if value is None else str(value))

    def _raise_memsw_to_at_least(self, memory: int | None) -> None:
        if not self.has_file("memory.memsw.limit_in_bytes"):
            return
        memsw = self.memsw_limit()
        if memsw is not None and (memory is None or memsw < memory):
            self.set_memsw_limit(memory)

    def soft_limit(self) -> int | None:
        return _limit(self.read_int("memory.soft_limit_in_bytes"))

    def set_soft_limit(self, value: int | None) -> None:
        self.write("memory.soft_limit_in_bytes", "-1" if value is None else str(value))

    def oom_state(self) -> OomState:
        kv = self.read_kv("memory.oom_control")
        return OomState(
            under_oom=bool(kv.get("under_oom", 0)),
            kill_disabled=bool(kv.get("oom_kill_disable", 0)),
            oom=None,
            oom_kill=kv.get("oom_kill", 0),
        )

    def events(self, local: bool = False) -> dict[str, int]:
        kv = self.read_kv("memory.oom_control")
        return {"oom_kill": kv.get("oom_kill", 0), "under_oom": kv.get("under_oom", 0)}

    def set_oom_kill_disable(self, disabled: bool) -> None:
        self.write("memory.oom_control", "1" if disabled else "0")

    # -- the hold: oom_kill_disable=1, tasks asleep in the OOM wait -----------------------
    def hold_level(self) -> int | None:
        return self.limit()

    def is_held(self) -> bool:
        return bool(self.oom_state().kill_disabled)

    def hold_changes(self, limit: int | None) -> list[FileChange]:
        return [] if self.is_held() else [FileChange("oom_kill_disable", "0", "1")]

    def unrecorded_hold(self) -> list[FileChange]:
        return [FileChange("oom_kill_disable", "0", "1")] if self.is_held() else []

    def release_changes(self) -> list[FileChange]:
        return [FileChange("oom_kill_disable", "1", "0")] if self.is_held() else []

    def grow_changes(self, current: int, new: int) -> list[FileChange]:
        changes = []
        memsw = self.memsw_limit()
        if memsw is not None:  # memsw first: it must stay >= memory
            changes.append(FileChange("memsw_limit", str(memsw), str(memsw + new - current)))
        changes.append(FileChange("limit", str(current), str(new)))
        return changes

    def out_of_memory(self, held_at: int | None = None) -> bool:
        return self.oom_state().under_oom

    # -- the v1 freezer is its own hierarchy: the group at the same path there --
    def freezer_path(self) -> Path:
        mount = self.hierarchies.freezer_v1
        if mount is None:
            raise Unsupported(str(self.path), "no v1 freezer hierarchy mounted")
        return mount.mount_point / self.relpath.lstrip("/")

    def ensure_freezer(self) -> Path:
        """Create the matching freezer group (for groups oomguard itself makes)."""
        path = self.freezer_path()
        path.mkdir(parents=True, exist_ok=True)
        return path

    def join_freezer(self, pid: int) -> None:
        files.write_text(self.ensure_freezer(), "cgroup.procs", str(pid))

    def _freezer_dir(self) -> Path:
        path = self.freezer_path()
        if not path.is_dir():
            raise Unsupported(str(self.path), f"no freezer group at {path}; use stop")
        return path

    def freeze(self) -> None:
        files.write_text(self._freezer_dir(), "freezer.state", "FROZEN")

    def thaw(self) -> None:
        files.write_text(self._freezer_dir(), "freezer.state", "THAWED")

    def freezer_state(self) -> str:
        return files.read_text(self._freezer_dir(), "freezer.state").strip()

    def remove(self) -> None:
        super().remove()
        mount = self.hierarchies.freezer_v1
        if mount is not None and self.relpath != "/":
            try:
                (mount.mount_point / self.relpath.lstrip("/")).rmdir()
            except OSError:
                pass  # not ours, busy or already gone: the memory group is what mattered
