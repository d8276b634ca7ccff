"""Three small file helpers, so the daemon need not import shutil and tempfile.

Those pull in bz2, lzma, random and more: a few MB of RSS that a daemon meant to
stay small (and locked in memory) would carry for ever, for one call each.
"""

from __future__ import annotations

import os
from typing import BinaryIO


def which(name: str) -> str | None:
    """The first executable `name` on PATH (or the standard dirs), like shutil.which."""
    path = os.environ.get("PATH") or "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    for directory in path.split(os.pathsep):
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Delete a directory tree, ignoring what is already gone (never follows symlinks)."""
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            try:
                os.unlink(os.path.join(root, name))
            except FileNotFoundError:
                pass
        for name in dirs:
            full = os.path.join(root, name)
            try:
                if os.path.islink(full):
                    os.unlink(full)
                else:
                    os.rmdir(full)
            except FileNotFoundError:
                pass
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass


def memory_file(name: str) -> BinaryIO:
    """An anonymous in-memory file (memfd) to capture a hook's output."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    return os.fdopen(fd, "w+b")
