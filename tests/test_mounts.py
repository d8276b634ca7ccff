"""Finding the hierarchies (mountinfo, pure) and resolve() on this machine's real groups."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from oomguard.cgroup import MemoryCgroup, resolve
from oomguard.cgroup.mounts import Hierarchies, Mount, discover, hierarchies_from, parse_mountinfo
from oomguard.errors import (
    CgroupError,
    CgroupNotFound,
    NoSuchProcess,
    NotAMemoryCgroup,
    UsageError,
)
from oomguard.workloads import STEADY

from conftest import Spawn

# What this project's machines show (v1 memory and freezer, cgroup2 without memory).
V1_MACHINE = """\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime shared:12 master:3 - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 22 0:50 / /proc rw - proc proc rw
"""


def _v2_line(mount_point: Path, root: str = "/") -> str:
    return (f"30 23 0:27 {root} {mount_point} rw,nosuid,nodev shared:4 - "
            "cgroup2 cgroup2 rw,nsdelegate\n")


def test_v1_memory_and_freezer() -> None:
    mounts = parse_mountinfo(V1_MACHINE)
    assert [m.fstype for m in mounts] == ["cgroup"] * 4 + ["cgroup2"]  # no tmpfs, ext4, proc
    hier = hierarchies_from(mounts)
    assert hier.memory_v1 == Mount(Path("/sys/fs/cgroup/memory"), "/", "cgroup",
                                   frozenset({"rw", "memory"}))
    assert hier.freezer_v1 is not None
    assert hier.freezer_v1.mount_point == Path("/sys/fs/cgroup/freezer")
    assert hier.unified is not None and hier.unified.mount_point == Path("/sys/fs/cgroup/unified")
    assert hier.memory is hier.memory_v1
    assert hier.memory_version == 1
    assert len(hier.mounts) == 5


def test_name_only_hierarchy_is_not_memory() -> None:
    [m] = parse_mountinfo("40 31 0:37 / /x rw - cgroup cgroup rw,name=systemd\n")
    hier = hierarchies_from([m])
    assert (hier.memory_v1, hier.freezer_v1, hier.memory, hier.memory_version) == (
        None, None, None, None)


def test_v2_only_with_memory(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids\n")
    hier = hierarchies_from(parse_mountinfo(_v2_line(tmp_path)))
    assert hier.memory_v1 is None and hier.freezer_v1 is None
    assert hier.unified is not None and hier.unified.mount_point == tmp_path
    assert "memory" in hier.unified_controllers
    assert hier.memory is hier.unified
    assert hier.memory_version == 2


def test_v2_without_memory(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("hugetlb\n")
    hier = hierarchies_from(parse_mountinfo(_v2_line(tmp_path)))
    assert hier.unified_controllers == frozenset({"hugetlb"})
    assert hier.memory is None and hier.memory_version is None


def test_v2_unreadable_controllers_means_none(tmp_path: Path) -> None:
    hier = hierarchies_from(parse_mountinfo(_v2_line(tmp_path / "absent")))
    assert hier.unified is not None and hier.unified_controllers == frozenset()
    assert hier.memory is None


def test_v1_memory_wins_over_v2_memory(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("memory\n")
    text = _v2_line(tmp_path) + "35 31 0:32 / /cg/memory rw - cgroup cgroup rw,memory\n"
    hier = hierarchies_from(parse_mountinfo(text))
    assert hier.memory is hier.memory_v1 and hier.memory_version == 1


def test_octal_escapes_in_mount_point() -> None:
    text = (r"35 31 0:32 /a\040b /mnt/my\040cgroups\011tab\134back\012nl rw - "
            "cgroup cgroup rw,memory,freezer\n")
    [m] = parse_mountinfo(text)
    assert m.mount_point == Path("/mnt/my cgroups\ttab\\back\nnl")
    assert m.root == "/a b"
    hier = hierarchies_from([m])
    assert hier.memory_v1 is m and hier.freezer_v1 is m  # co-mounted controllers


def test_bind_mount_with_non_root_root() -> None:
    text = "60 22 0:32 /process_api/job /srv/memcg rw,relatime - cgroup cgroup rw,memory\n"
    [m] = parse_mountinfo(text)
    assert m.root == "/process_api/job"
    assert m.mount_point == Path("/srv/memcg")


def test_malformed_lines_are_skipped() -> None:
    text = "garbage\n1 2 3 - cgroup\n\n" + V1_MACHINE
    assert len(parse_mountinfo(text)) == 5


def test_discover_this_machine() -> None:
    """The real mountinfo: whatever it says, discover() agrees with the kernel's files."""
    hier = discover()
    with open("/proc/self/mountinfo") as f:
        raw = f.read()
    assert len(hier.mounts) == sum(1 for line in raw.splitlines()
                                   if " - cgroup " in line or " - cgroup2 " in line)
    if hier.memory_version == 1:
        assert hier.memory is not None
        assert (hier.memory.mount_point / "memory.oom_control").exists()
    elif hier.memory_version == 2:
        assert hier.memory is not None
        assert "memory" in (hier.memory.mount_point / "cgroup.controllers").read_text().split()


def test_pid_resolution_below_a_bind_mount_root(tmp_path: Path) -> None:
    """pid:N reads a hierarchy path; under a mount whose root is a subtree, strip it."""
    with open("/proc/self/cgroup") as f:
        lines = f.read().splitlines()
    mem = next((ln.split(":", 2)[2] for ln in lines if "memory" in ln.split(":")[1].split(",")),
               None)
    if mem is None or mem == "/":
        pytest.skip("this process is not below the memory hierarchy's root")
    top, _, rest = mem.lstrip("/").partition("/")
    mount = Mount(tmp_path, "/" + top, "cgroup", frozenset({"rw", "memory"}))
    hier = Hierarchies(mount, None, None, frozenset(), (mount,))
    group_dir = tmp_path / rest if rest else tmp_path
    group_dir.mkdir(parents=True, exist_ok=True)
    (group_dir / "memory.usage_in_bytes").write_text("0\n")
    (group_dir / "cgroup.procs").write_text(f"{os.getpid()}\n")
    g = resolve(f"pid:{os.getpid()}", hier)
    assert g.path == group_dir
    assert g.relpath == ("/" + rest if rest else "/")
    # a mount showing a subtree the process is not in: it is not visible there
    other = Mount(tmp_path, "/elsewhere", "cgroup", frozenset({"memory"}))
    with pytest.raises(CgroupNotFound) as ei:
        resolve(f"pid:{os.getpid()}", Hierarchies(other, None, None, frozenset(), (other,)))
    assert ei.value.path == f"pid:{os.getpid()}"


# -- resolve() on this machine's real memory hierarchy ----------------------------------


def _memory_line(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, ctrl, path = line.rstrip("\n").split(":", 2)
            if "memory" in ctrl.split(","):
                return path
    raise AssertionError(f"pid {pid}: no memory line in /proc/{pid}/cgroup")


def test_resolve_spellings(memcg: MemoryCgroup, hier: Hierarchies) -> None:
    rel = memcg.relpath
    assert rel.startswith("/oomguard-test/")
    spellings = [str(memcg.path), str(memcg.path) + "/", str(memcg.path) + "//", rel, rel + "/",
                 rel.lstrip("/"), "/" + rel + "/./", rel.replace("/", "//")]
    for spec in spellings:
        g = resolve(spec, hier)
        assert g == memcg, spec
        assert g.relpath == rel and g.path == memcg.path and type(g) is type(memcg)


def test_resolve_root(hier: Hierarchies) -> None:
    assert hier.memory is not None
    g = resolve(str(hier.memory.mount_point), hier)
    assert g.relpath == "/" and g.path == hier.memory.mount_point
    assert resolve("/", hier) == g


def test_resolve_pid_of_this_process(hier: Hierarchies, backend: int) -> None:
    g = resolve(f"pid:{os.getpid()}", hier)
    if backend == 1:
        assert g.relpath == (_memory_line(os.getpid()) or "/")
    assert os.getpid() in g.procs()


def test_resolve_pid_of_a_workload(memcg: MemoryCgroup, spawn: Spawn) -> None:
    p = spawn(STEADY, 1 << 20)
    assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    assert resolve(f"pid:{p.pid}") == memcg


@pytest.mark.parametrize(
    ("spec", "error", "text"),
    [
        ("", UsageError, "empty or invalid"),
        ("jobs/\0a", UsageError, "empty or invalid"),
        ("/oomguard-test/../x", UsageError, "'..' is not allowed"),
        ("oomguard-test/..", UsageError, "'..' is not allowed"),
        ("pid:abc", UsageError, "expected pid:NUMBER"),
        ("pid:0", UsageError, "positive pid"),
        ("pid:-3", UsageError, "positive pid"),
    ],
)
def test_resolve_usage_errors(hier: Hierarchies, spec: str, error: type[Exception],
                              text: str) -> None:
    with pytest.raises(error, match=text):
        resolve(spec, hier)


def test_resolve_missing_pid(hier: Hierarchies) -> None:
    with pytest.raises(NoSuchProcess) as ei:
        resolve("pid:999999999", hier)
    assert ei.value.pid == 999999999


def test_resolve_not_found_carries_the_path(hier: Hierarchies, test_parent: MemoryCgroup) -> None:
    assert hier.memory is not None
    for spec in ["/oomguard-test/no-such-group", "oomguard-test/no/such",
                 str(hier.memory.mount_point / "no-such-group"),
                 str(hier.memory.mount_point / "memory.stat")]:  # a file, not a group
        with pytest.raises(CgroupNotFound) as ei:
            resolve(spec, hier)
        assert ei.value.path == spec
        assert spec in str(ei.value)


def test_resolve_other_hierarchy_is_not_memory(hier: Hierarchies) -> None:
    others = [m for m in hier.mounts if m != hier.memory and "memory" not in m.options
              and m.mount_point.is_dir()]
    if not others:
        pytest.skip("no second cgroup hierarchy mounted on this machine")
    for m in others:
        spec = str(m.mount_point)
        with pytest.raises(NotAMemoryCgroup) as ei:
            resolve(spec, hier)
        assert ei.value.path == spec
        # a missing group in that hierarchy is "not found", still naming what was typed
        with pytest.raises(CgroupNotFound) as nf:
            resolve(spec + "/oomguard-no-such", hier)
        assert nf.value.path == spec + "/oomguard-no-such"


def test_resolve_dotdot_in_an_absolute_path_leading_elsewhere(hier: Hierarchies) -> None:
    """An absolute cgroupfs path is normalised lexically; '..' into cpu is not memory."""
    assert hier.memory is not None
    cpu = next((m for m in hier.mounts if "cpu" in m.options and m.mount_point.is_dir()), None)
    if cpu is None:
        pytest.skip("no v1 cpu hierarchy mounted here")
    spec = f"{hier.memory.mount_point}/../{cpu.mount_point.name}"
    with pytest.raises(CgroupError) as ei:
        resolve(spec, hier)
    assert isinstance(ei.value, NotAMemoryCgroup) and ei.value.path == spec
