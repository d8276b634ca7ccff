"""What the incident's look costs for a group with children, against a leaf.

    .venv/bin/python bench/subtree_look.py

Makes, under a parent of oomguard's own (`oomguard-bench-subtree`, removed at the end), a
leaf with 2 tasks, a leaf with 20, and a parent with 10 children x 2 tasks (each task a
`sleep`: no memory to speak of), and times `subtree_procs` (the walk: cgroup.procs of each
group, a stat of each) and `take_snapshot` (the walk and /proc/PID/stat and status of each
task). Best of 7 batches of 200 calls, in microseconds.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable

from oomguard.cgroup import discover
from oomguard.cgroup.transient import destroy, ensure_parent, new_group
from oomguard.procs import spawn_in
from oomguard.steps.victims import take_snapshot


def per_call(fn: Callable[[], object], n: int = 200, batches: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def main() -> None:
    hier = discover()
    top = ensure_parent(hier, "oomguard-bench-subtree")
    group = new_group(top, "t", suffix="look")
    group.set_limits(64 << 20, 64 << 20 if group.version == 1 else None)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        def sleepers(where: str, n: int) -> None:
            for _ in range(n):
                procs.append(spawn_in([group.path / where], ["sleep", "120"]))

        leaf2, leaf20, parent = (group.child(n) for n in ("leaf2", "leaf20", "parent"))
        for g in (leaf2, leaf20, parent):
            g.create()
        sleepers("leaf2", 2)
        sleepers("leaf20", 20)
        for i in range(10):
            parent.child(f"k{i}").create()
            sleepers(f"parent/k{i}", 2)
        time.sleep(0.3)
        print(f"one stat of a group directory: {per_call(lambda: os.stat(leaf2.dir)):.1f} us")
        for name, g in (("leaf, 2 tasks", leaf2), ("leaf, 20 tasks", leaf20),
                        ("parent, 10 children x 2 tasks", parent)):
            print(f"{name}: cgroup.procs {per_call(g.procs):.1f} us, "
                  f"walk {per_call(g.subtree_procs):.1f} us, "
                  f"look {per_call(lambda g=g: take_snapshot(g)):.1f} us")
    finally:
        for p in procs:
            p.kill()
            p.wait()
        destroy(group)
        top.remove()


if __name__ == "__main__":
    main()
