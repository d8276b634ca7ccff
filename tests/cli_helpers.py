"""Run the real `oomguard` command as a user would, in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from typing import Any


def oomguard(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    kw.setdefault("timeout", 60)
    return subprocess.run([sys.executable, "-m", "oomguard", *args], capture_output=True,
                          text=True, errors="surrogateescape", **kw)


def oomguard_bg(*args: str, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "oomguard", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="surrogateescape", **kw)
