"""A fake cgroup2 tree in a tmp dir, to drive the v2 code paths on a v1 host.

Only the file layout and contents are faked: reads and writes go through the
real `oomguard.cgroup` code, and the tests check the bytes it leaves behind.
Nothing here is a kernel; writes do not have side effects (freezing, killing).
"""

from __future__ import annotations

from pathlib import Path

from oomguard.cgroup.mounts import Hierarchies, Mount

MiB = 1 << 20

DEFAULT_FILES: dict[str, str] = {
    "memory.current": f"{10 * MiB}\n",
    "memory.max": f"{64 * MiB}\n",
    "memory.high": "max\n",
    "memory.swap.max": "max\n",
    "memory.swap.current": "0\n",
    "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
    "memory.events.local": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
    "memory.stat": "anon 8388608\nfile 2097152\nkernel 65536\nshmem 0\npgfault 1234\n",
    "memory.oom.group": "0\n",
    "cgroup.procs": "",
    "cgroup.threads": "",
    "cgroup.freeze": "0\n",
    "cgroup.events": "populated 0\nfrozen 0\n",
    "cgroup.kill": "",  # write-only in the kernel
    "cgroup.controllers": "memory\n",
    "cgroup.subtree_control": "memory\n",
}

# The root of a cgroup2 hierarchy has no memory.current/max/... of its own.
ROOT_FILES = ("cgroup.procs", "cgroup.threads", "cgroup.controllers", "cgroup.subtree_control")


class FakeCgroupFs:
    """`root` is the mount point; `hier` a Hierarchies whose memory lives there (v2)."""

    def __init__(self, root: Path, controllers: str = "cpu io memory pids") -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        for name in ROOT_FILES:
            (root / name).write_text(DEFAULT_FILES[name])
        (root / "cgroup.controllers").write_text(controllers + "\n")
        self.mount = Mount(mount_point=root, root="/", fstype="cgroup2",
                           options=frozenset({"rw", "nsdelegate"}))
        self.hier = Hierarchies(
            memory_v1=None,
            freezer_v1=None,
            unified=self.mount,
            unified_controllers=frozenset(controllers.split()),
            mounts=(self.mount,),
        )

    def make_group(self, relpath: str, **overrides: str | None) -> Path:
        """A group dir with every v2 memory file; override=None leaves a file out.

        Keyword names use "_" for ".": memory_swap_max="max\\n".
        """
        path = self.root / relpath.strip("/")
        path.mkdir(parents=True, exist_ok=True)
        contents: dict[str, str | None] = dict(DEFAULT_FILES)
        for key, value in overrides.items():
            contents[key.replace("_", ".")] = value
        for name, text in contents.items():
            if text is not None:
                (path / name).write_text(text)
        return path

    @staticmethod
    def set(group_dir: Path, name: str, text: str) -> None:
        """Rewrite a file in place (same inode), as the kernel's counters change."""
        with open(group_dir / name, "r+") as f:
            f.truncate(0)
            f.write(text)

    @staticmethod
    def get(group_dir: Path, name: str) -> str:
        return (group_dir / name).read_text()
