"""Start a command inside cgroups, joined between fork and exec.

The child writes "0" (itself) to each group's cgroup.procs before exec, so not
one page of the new program is charged outside its limit. Nothing passes
through a shell.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _joiner(procs_files: list[bytes]) -> Any:
    def join() -> None:
        for name in procs_files:
            fd = os.open(name, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)

    return join


def spawn_in(cgroup_dirs: Sequence[Path], argv: Sequence[str],
             **popen: Any) -> subprocess.Popen[bytes]:
    """Popen(argv) with the child already a member of every group in `cgroup_dirs`."""
    files = [os.fsencode(Path(d) / "cgroup.procs") for d in cgroup_dirs]
    return subprocess.Popen(list(argv), preexec_fn=_joiner(files), **popen)
