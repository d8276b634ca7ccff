"""Typed errors and the exit codes a user sees for them.

Every error carries what it is about (a cgroup path, a pid, a config key) so the
CLI can print one line that names it.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # runtime failure: cgroup not found, permission denied, ...
EXIT_USAGE = 2  # bad command line
EXIT_REMOVED = 3  # `wait`: the cgroup was removed while waiting
EXIT_TIMEOUT = 4  # `wait`: --timeout passed with nothing seen
EXIT_CONFIG = 5  # the policy file is invalid


class OomguardError(Exception):
    """Base of every error oomguard reports to a user."""

    exit_code = EXIT_FAILURE


class UsageError(OomguardError):
    exit_code = EXIT_USAGE


class ConfigError(OomguardError):
    exit_code = EXIT_CONFIG


class CgroupError(OomguardError):
    """Something about one cgroup; `path` is what the user typed or the resolved path."""

    reason = "cgroup error"

    def __init__(self, path: str, detail: str = "") -> None:
        self.path = path
        self.detail = detail
        super().__init__(f"{path}: {self.reason}" + (f" ({detail})" if detail else ""))


class CgroupNotFound(CgroupError):
    reason = "no such cgroup"


class NotAMemoryCgroup(CgroupError):
    reason = "not a memory cgroup"


class CgroupRemoved(CgroupError):
    reason = "cgroup was removed"


class CgroupPermissionDenied(CgroupError):
    reason = "permission denied"


class Unsupported(CgroupError):
    reason = "not supported by this kernel"


class NoSuchProcess(OomguardError):
    """The process is gone (or never was); races with exiting tasks are normal."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        super().__init__(f"pid {pid}: no such process")


class AccessDenied(OomguardError):
    def __init__(self, pid: int, what: str = "") -> None:
        self.pid = pid
        super().__init__(f"pid {pid}: permission denied" + (f" ({what})" if what else ""))
