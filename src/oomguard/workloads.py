"""Small programs that use memory on purpose, for the demo, the tests and bench.

Each is Python source run with the current interpreter. They must only ever be
started inside a memory cgroup with a limit (see procs.spawn).
"""

from __future__ import annotations

import sys

# Allocates STEP bytes at a time, touching every page, printing a monotonic
# timestamp (ns) per step on stdout if asked; never frees. Stops at TOTAL if given.
LEAK = r"""
import os, sys, time
step = int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 20
total = int(sys.argv[2]) if len(sys.argv) > 2 else 0
stamp = len(sys.argv) > 3 and sys.argv[3] == "stamps"
pause = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
chunks, used = [], 0
page = b"\x01" * (step // 4096)
while not total or used < total:
    b = bytearray(step)
    b[::4096] = page
    chunks.append(b)
    used += step
    if stamp:
        os.write(1, b"%d\n" % time.monotonic_ns())
    if pause:
        time.sleep(pause)
print("done", used, flush=True)
"""

# Takes SIZE bytes once, then sleeps: a well-behaved service.
STEADY = r"""
import signal, sys, time
size = int(sys.argv[1]) if len(sys.argv) > 1 else 8 << 20
b = bytearray(size)
b[::4096] = b"\x01" * (size // 4096)
print("ready", flush=True)
while True:
    time.sleep(3600)
"""

# Like STEADY but ignores SIGTERM, so only SIGKILL ends it.
STUBBORN = "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + STEADY

# Takes SIZE bytes, ignores SIGTERM, and exits on its own (status 0) DELAY seconds after
# FILE holds NEEDLE (polled every millisecond; a read refused for want of memory counts
# too): a victim that leaves just as it is chosen.
QUITTER = r"""
import os, signal, sys, time
size, path, needle = int(sys.argv[1]), sys.argv[2], sys.argv[3].encode()
delay = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
signal.signal(signal.SIGTERM, signal.SIG_IGN)
b = bytearray(size)
b[::4096] = b"\x01" * (size // 4096)
fd = os.open(path, os.O_RDONLY)
print("ready", flush=True)
try:
    while needle not in os.pread(fd, 4096, 0):
        time.sleep(0.001)
except OSError:
    pass
if delay:
    time.sleep(delay)
os._exit(0)
"""

# Frees its cache on SIGUSR1: the RFC's "send a signal to shrink".
SHRINKABLE = r"""
import signal, sys, time
size = int(sys.argv[1]) if len(sys.argv) > 1 else 32 << 20
cache = []
def drop(*_):
    cache.clear()
    print("dropped", flush=True)
signal.signal(signal.SIGUSR1, drop)
while True:
    if sum(map(len, cache)) < size:
        b = bytearray(1 << 20); b[::4096] = b"\x01" * 256; cache.append(b)
    else:
        time.sleep(0.05)
"""

# Grows on command: each line "N" on stdin takes N MiB more (private anonymous, every page
# touched) and answers "ok"; says "ready" first. A leaker whose growth a test or bench
# times (system mode's look taken ahead).
GROWER = r"""
import mmap, sys
chunks = []
print("ready", flush=True)
for line in sys.stdin:
    m = mmap.mmap(-1, int(line) << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(0, len(m), 4096):
        m[i] = 1
    chunks.append(m)
    print("ok", flush=True)
"""


def argv(source: str, *args: object) -> list[str]:
    return [sys.executable, "-c", source, *map(str, args)]


def run_as(argv_: list[str], name: str | None = None) -> list[str]:
    """argv that runs workload `argv_[0]` (leak, steady, stubborn, shrinkable) by name,
    so that ps and the journal show what it is: python -m oomguard.workloads KIND ARGS."""
    tail = [f"--name={name}"] if name else []
    return [sys.executable, "-m", "oomguard.workloads", *argv_, *tail]


_BY_NAME = {"leak": LEAK, "steady": STEADY, "stubborn": STUBBORN, "shrinkable": SHRINKABLE}


def _main() -> None:
    import ctypes

    kind, *args = sys.argv[1:]
    names = [a for a in args if a.startswith("--name=")]
    args = [a for a in args if not a.startswith("--name=")]
    if names:
        name = names[0].split("=", 1)[1].encode()[:15]
        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name), 0, 0, 0)  # PR_SET_NAME
    sys.argv = [kind, *args]
    exec(compile(_BY_NAME[kind], f"<oomguard workload {kind}>", "exec"), {"__name__": "__main__"})


if __name__ == "__main__":
    _main()
