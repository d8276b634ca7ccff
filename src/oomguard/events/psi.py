"""PSI triggers: the kernel wakes us when stall time in a window passes a bound.

Works on `/proc/pressure/memory` and on a v2 cgroup's `memory.pressure`. The
trigger lives as long as the fd. Note: the memcg v1 OOM wait is not counted as
a stall, so PSI cannot see a held v1 OOM; it is an early warning, not the OOM.
Without CAP_SYS_RESOURCE the window must be a multiple of 2 s.
"""

from __future__ import annotations

import errno
import os
import select
from pathlib import Path

from oomguard.errors import CgroupError, CgroupPermissionDenied, CgroupRemoved, Unsupported


def parse_pressure(text: str) -> dict[str, float]:
    """A pressure file's averages, e.g. {"some_avg10": 1.5, "full_total": 1234.0}."""
    out = {}
    for line in text.splitlines():
        kind, *pairs = line.split()
        for pair in pairs:
            key, _, value = pair.partition("=")
            out[f"{kind}_{key}"] = float(value)
    return out


class PsiTrigger:
    poll_events = select.EPOLLPRI | select.EPOLLERR

    def __init__(self, path: Path | str, kind: str = "some", stall_us: int = 150_000,
                 window_us: int = 2_000_000) -> None:
        if kind not in ("some", "full"):
            raise ValueError(f"PSI kind must be some or full, not {kind!r}")
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise Unsupported(str(self.path), "no PSI file (kernel without CONFIG_PSI?)") from None
        except PermissionError:
            raise CgroupPermissionDenied(str(self.path)) from None
        try:
            os.write(self._fd, f"{kind} {stall_us} {window_us}\0".encode())
        except OSError as exc:
            os.close(self._fd)
            self._fd = -1
            if exc.errno == errno.EINVAL:
                raise CgroupError(str(self.path), f"trigger '{kind} {stall_us} {window_us}' "
                                  "refused (without CAP_SYS_RESOURCE the window must be a "
                                  "multiple of 2 s)") from None
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise CgroupPermissionDenied(str(self.path), "PSI trigger") from None
            raise CgroupError(str(self.path), exc.strerror or "PSI trigger") from None
        self.trigger = (kind, stall_us, window_us)

    def fileno(self) -> int:
        return self._fd

    def read(self) -> dict[str, float]:
        """The current averages, e.g. {"some_avg10": 1.5, "full_total": 1234.0}."""
        try:
            text = os.pread(self._fd, 512, 0).decode()
        except OSError as exc:
            if exc.errno in (errno.ENODEV, errno.ENOENT):
                raise CgroupRemoved(str(self.path.parent)) from None
            raise
        return parse_pressure(text)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
