"""System mode side by side: oomguard --system, earlyoom, nohang, oomd, systemd-oomd (packaged).

Global memory pressure ONLY in the VM: run as `bench/run --only system` (or
`bench/system.py`), which boots the cgroup v2 VM (tests/vm/run-in-vm.sh, emulated,
OOMGUARD_VM_MEM, default 1536 MiB, no swap) and runs this file inside with --in-vm; the
guest sees the host's /, so the host's earlyoom, nohang, oomd and systemd-oomd packages are
there (a tool that is not installed is left out with a message). The VM's init is not
systemd: for systemd-oomd the bench plays PID 1's part (below).

In one boot, for each tool in turn: start it, measure its idle cost (voluntary and
involuntary context switches of all its threads over --idle-s seconds, i.e. wake-ups,
and its RSS), then run the same workloads, each beside two bystanders ('sshd' 32 MiB and
'steady' 64 MiB):
- fast: one leaker, 16 MiB chunks as fast as it can;
- slow: a leaker filled fast to 2.5x the level, then 4 MiB every 0.2 s;
- bomb: a fork bomb of 6 MiB children in a leaf cgroup (pids.max bounds it);
- bigsteady: a big process that stopped growing, beside a small leaker (8 MiB / 0.1 s).
A 2 ms sampler reads MemAvailable and watches every workload pid by pidfd; each hog
writes a monotonic stamp on SIGTERM (then exits), so "to signal" is the first stamp or
exit after the tool's own SIGTERM level was crossed (oomguard and earlyoom 10%, nohang's
packaged 5%), "to memory back" the first sample above that level again. Who died is
read from the pidfds; the kernel's own kills from /proc/vmstat oom_kill.

oomd (Facebook's, Debian's 0.5.0) kills cgroups, not processes, and has no MemAvailable
detector. Its configuration here (written to the tool's tmp dir, see OOMD_CONFIG) is the
closest to the others' defaults: `memory_above` on the root at 90%, which for the root
reads MemTotal - MemFree, i.e. "MemFree at or below 10%", then `kill_by_memory_size_or_growth`
(its standard kill plugin, default arguments) over the workloads' cgroups; `--interval 1`, the
packaged /etc/default/oomd's (the binary's own default is 5 s). For oomd only, each workload
process (hogs and both bystanders) runs in its own leaf cgroup under OOMD_ROOT, made and
removed by the bench, so that oomd has candidates (the bomb has its group already); its
level is measured on MemFree, not MemAvailable (LEVEL_FIELD), and "to signal" is the exit
of the first victim (SIGKILL, no SIGTERM).

systemd-oomd (Debian 12's package systemd-oomd, 252) learns what to watch from PID 1
over varlink; the VM's init is not systemd, so the bench plays that part (FAKE_PID1, a
separate process, stdlib only). As in v252's src/oom/oomd-manager.c and
src/core/core-varlink.c: systemd-oomd, started as root with its packaged configuration
(/etc/systemd/oomd.conf, all commented out, plus Debian's
/usr/lib/systemd/oomd.conf.d/10-oomd-defaults.conf: DefaultMemoryPressureDurationSec=20s;
the compiled DefaultMemoryPressureLimit=60% and SwapUsedLimit=90%), connects to
/run/systemd/io.system.ManagedOOM and calls io.systemd.ManagedOOM.SubscribeManagedOOMCGroups
with "more"; PID 1 replies {"parameters": {"cgroups": [{"mode", "path", "property",
"limit"}]}, "continues": true} (JSON, NUL-terminated), first with every unit that has a
ManagedOOM*=kill, then with each unit that starts or stops. "path" is the cgroup path
under /sys/fs/cgroup; "limit" is ManagedOOMMemoryPressureLimit= as a UINT32-scaled
fraction (UINT32_MAX = 100%; systemd-oomd 252 converts it with UINT32_SCALE_TO_PERMYRIAD),
0 when unset, which means DefaultMemoryPressureLimit. The fake PID 1 sends what PID 1
sends on a Debian 12 machine with the package installed: "/" with ManagedOOMSwap=kill (the
package's -.slice drop-in; it never acts without swap, but it turns on systemd-oomd's
0.15 s swap timer, a cost a real install has too), and each workload's cgroups as a unit
with ManagedOOMMemoryPressure=kill and no limit of its own (so 60% for 20 s), announced
when the bench makes them and withdrawn ("auto", as for a stopped unit) before it removes
them: OOMD_ROOT (the leaves as for oomd) and, for the bomb, its group. systemd-oomd itself
also needs cgroup v2 with the memory controller and PSI (it checks), its own varlink
server's directory /run/systemd/oom (the fake PID 1 makes it), and no D-Bus (it waits
for the system bus in the background) nor /run/systemd/system. It acts when a watched
cgroup's memory.pressure "full avg10" stays above the limit for the duration, with reclaim
in the last 30 s: it SIGKILLs the descendant leaf cgroup with the highest page-scan rate
(then 15 s before its next kill), checked every second. It has no memory level: its "to
signal" is measured from the crossing of 10% MemAvailable (oomguard's and earlyoom's
level), and `pressure_full_avg10_max` in each run is the highest full avg10 of the watched
cgroups, the figure it acts on. Readiness: the fake PID 1's "subscribed" line.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from oomguard.events.psi import parse_pressure

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
MiB = 1 << 20

HOG = r"""
import ctypes, mmap, os, signal, sys, time
name, prefill, step, every, cap = sys.argv[1], *map(float, sys.argv[2:6])
open("/proc/self/oom_score_adj", "w").write("0")  # the bench runs at -1000
ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)
def term(_s, _f):
    os.write(1, b"T %d\n" % time.monotonic_ns()); os._exit(143)
signal.signal(signal.SIGTERM, term)
chunks, have = [], 0
def take(mib):
    m = mmap.mmap(-1, int(mib) << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(23)  # MADV_POPULATE_WRITE: no fault per page (fast under emulation)
    chunks.append(m)
while have < prefill:
    take(16); have += 16
os.write(1, b"ready\n")
while have < cap:
    if step:
        take(step); have += step
    time.sleep(every)
time.sleep(300)
"""

BOMB = r"""
import ctypes, os, signal, sys, time
open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
open("/proc/self/oom_score_adj", "w").write("0")  # the bench runs at -1000
ctypes.CDLL(None).prctl(15, b"bomb", 0, 0, 0)
def term(_s, _f):
    os.write(1, b"T %d\n" % time.monotonic_ns()); os._exit(143)
signal.signal(signal.SIGTERM, term)
os.write(1, b"ready\n")
while True:
    try:
        pid = os.fork()
    except OSError:
        time.sleep(0.01); continue
    if pid == 0:
        import mmap
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        m = mmap.mmap(-1, 6 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(23)
        time.sleep(300)
        os._exit(0)
"""

TOOLS = {
    # name: (argv, its SIGTERM level in % of MemTotal, a line that says it runs)
    "oomguard": ([PY, "-m", "oomguard", "daemon", "--system", "--journal", "{tmp}/j.db"],
                 10.0, "watching"),
    # the fork bomb again, with victim = "leaf-cgroup" (the answer to a bomb in a group)
    "oomguard-leaf": ([PY, "-m", "oomguard", "daemon", "--system", "--journal", "{tmp}/j.db",
                       "--config", "{tmp}/p.toml"], 10.0, "watching"),
    "earlyoom": (["earlyoom"], 10.0, "mem avail"),
    "nohang": (["nohang", "--monitor", "-c", "/etc/nohang/nohang.conf"], 5.0,
               "Monitoring has started"),
    # --interval 1: Debian's /etc/default/oomd (the binary's default is 5)
    "oomd": (["oomd", "--config", "{tmp}/oomd.json", "--interval", "1",
              "--runtime-dir", "{tmp}/run"], 10.0, "Running oomd"),
    # no MemAvailable level (memory pressure): 10% is where its "to signal" is counted from;
    # ready when it subscribed to the fake PID 1 (READY_LOG)
    "systemd-oomd": (["/lib/systemd/systemd-oomd"], 10.0, "subscribed"),
}
# where a tool's ready line is, if not in its own log (under the tool's tmp dir)
READY_LOG = {"systemd-oomd": "pid1.log"}
# its log on stderr (else it may go to /dev/kmsg when there is no journal)
TOOL_ENV = {"systemd-oomd": {"SYSTEMD_LOG_TARGET": "console"}}
# what a tool acts on, for the table, where it is not a MemAvailable (or LEVEL_FIELD) level
TRIGGER = {"systemd-oomd": "full PSI > 60% for 20 s"}
WORKLOADS = ("fast", "slow", "bomb", "bigsteady")
BOMB_GROUP = Path("/sys/fs/cgroup/oomguard-bench-bomb")
# oomd kills cgroups: under it each workload process gets a leaf cgroup here
OOMD_ROOT = Path("/sys/fs/cgroup/oomguard-bench-oomd")
LEAF_TOOLS = {"oomd", "systemd-oomd"}
# the /proc/meminfo field a tool's level is measured on (MemAvailable unless named here):
# oomd's memory_above on the root reads MemTotal - MemFree
LEVEL_FIELD = {"oomd": "MemFree"}
OOMD_CONFIG = {"rulesets": [{
    "name": "MemFree at or below 10% of MemTotal",
    "detectors": [["root memory usage (MemTotal - MemFree) above 90%", {
        "name": "memory_above",
        "args": {"cgroup": "/", "threshold": "90%", "duration": "0"}}]],
    "actions": [{
        "name": "kill_by_memory_size_or_growth",
        "args": {"cgroup": f"{OOMD_ROOT.name}/*,{BOMB_GROUP.name}"}}],
}]}


# systemd-oomd's PID 1 (see the docstring): tells it, over varlink, what to watch
FAKE_PID1 = r"""
import json, os, select, socket, sys
path = "/run/systemd/io.system.ManagedOOM"
os.makedirs("/run/systemd/oom", exist_ok=True)  # systemd-oomd's own server binds there
try:
    os.unlink(path)
except FileNotFoundError:
    pass
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(8)
def say(line):
    os.write(1, (line + "\n").encode())
# the units now with a ManagedOOM*=kill: Debian's -.slice drop-in (ManagedOOMSwap=kill)
state = {("/", "ManagedOOMSwap"): {"mode": "kill", "path": "/", "property": "ManagedOOMSwap"}}
conns, subs = {}, set()
def send(c, cgroups):
    msg = {"parameters": {"cgroups": cgroups}, "continues": True}
    try:
        c.sendall(json.dumps(msg).encode() + b"\0")
    except OSError:
        pass
say("listening")
stdin = b""
while True:
    ready = select.select([srv, 0, *conns], [], [])[0]
    for f in ready:
        if f is srv:
            c = srv.accept()[0]
            conns[c] = b""
        elif f == 0:
            data = os.read(0, 65536)
            if not data:
                srv.close()
                os.unlink(path)
                sys.exit(0)
            stdin += data
            while b"\n" in stdin:
                line, _, stdin = stdin.partition(b"\n")
                mode, cg = line.decode().split(" ", 1)  # a unit's start (kill) or stop (auto)
                els = [{"mode": "auto", "path": cg, "property": "ManagedOOMSwap"},
                       {"mode": mode, "path": cg, "property": "ManagedOOMMemoryPressure",
                        "limit": 0}]
                if mode == "kill":
                    state[(cg, "ManagedOOMMemoryPressure")] = els[1]
                else:
                    state.pop((cg, "ManagedOOMMemoryPressure"), None)
                for c in subs:
                    send(c, els)
                say(f"sent {mode} {cg} to {len(subs)}")
        else:
            try:
                data = f.recv(65536)
            except OSError:
                data = b""
            if not data:
                conns.pop(f)
                subs.discard(f)
                f.close()
                say("closed")
                continue
            conns[f] += data
            while b"\0" in conns[f]:
                raw, _, conns[f] = conns[f].partition(b"\0")
                call = json.loads(raw)
                method = call.get("method")
                if method != "io.systemd.ManagedOOM.SubscribeManagedOOMCGroups":
                    f.sendall(json.dumps({"error": "org.varlink.service.MethodNotFound",
                                          "parameters": {"method": method}}).encode() + b"\0")
                    continue
                if call.get("more"):
                    subs.add(f)
                    send(f, list(state.values()))
                    say("subscribed")
                else:
                    f.sendall(json.dumps({"parameters": {"cgroups": list(state.values())}})
                              .encode() + b"\0")
"""
PID1: subprocess.Popen[bytes] | None = None


def managed_oom(mode: str, cgroup: Path) -> None:
    """Tell systemd-oomd (through the fake PID 1, if it runs) that `cgroup`'s unit started
    with ManagedOOMMemoryPressure=kill ("kill") or stopped ("auto")."""
    if PID1 is not None and PID1.stdin is not None:
        rel = "/" + str(cgroup.relative_to("/sys/fs/cgroup"))
        PID1.stdin.write(f"{mode} {rel}\n".encode())
        PID1.stdin.flush()


def full_avg10(cgroup: Path) -> float | None:
    """`full avg10` of a cgroup's memory.pressure (what systemd-oomd acts on)."""
    try:
        return parse_pressure((cgroup / "memory.pressure").read_text()).get("full_avg10")
    except (OSError, ValueError):
        return None


def wait_for_line(path: Path, line: str, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait until `line` is in the file `path` (a process's log), `proc` has exited or
    `timeout` has passed; whether the line came."""
    end = time.monotonic() + timeout
    while line.encode() not in path.read_bytes():
        if proc.poll() is not None or time.monotonic() >= end:
            return line.encode() in path.read_bytes()
        time.sleep(0.05)
    return True


def log(msg: str) -> None:
    print(f"bench/system: {msg}", file=sys.stderr, flush=True)


def meminfo(field: str = "MemAvailable") -> tuple[int, int]:
    """MemTotal and `field` (MemAvailable; MemFree for oomd's level), in bytes."""
    total, values = meminfo_all()
    return total, values[field]


def meminfo_all() -> tuple[int, dict[str, int]]:
    with open("/proc/meminfo", "rb") as f:
        text = f.read().decode()
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0]) * 1024
    return values["MemTotal"], values


def kernel_kills() -> int:
    """The kernel OOM killer's kills so far (/proc/vmstat oom_kill: unlike counting
    dmesg's "Killed process" lines, it does not lose count when the ring buffer wraps)."""
    for line in Path("/proc/vmstat").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0


def tree_pids(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                kids = Path(f"/proc/{p}/task/{tid}/children").read_text().split()
                todo += [int(k) for k in kids]
        except OSError:
            pass
    return out


def switches(pid: int, kinds: tuple[str, ...] = ("voluntary_ctxt_switches",)) -> int:
    """Voluntary context switches of every thread: each is a sleep that ended, i.e. a
    wake-up (involuntary ones are preemptions, the VM's noise)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
                if line.startswith(kinds):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Hog:
    def __init__(self, role: str, argv: list[str], cgroup: Path | None = None) -> None:
        """`cgroup`: a leaf cgroup (made here) the process joins before it runs (oomd's)."""
        self.role = role
        join = None
        if cgroup is not None:
            cgroup.mkdir(exist_ok=True)
            procs = str(cgroup / "cgroup.procs")

            def join() -> None:  # in the child, before exec: the bench has no threads
                with open(procs, "w") as f:
                    f.write(str(os.getpid()))
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, preexec_fn=join)
        self.pidfd = os.pidfd_open(self.proc.pid)
        self.exit_at: float | None = None
        self.term_at: float | None = None
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self._buf = b""

    def ready(self, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while b"ready" not in self._buf and time.monotonic() < end:
            select.select([self.proc.stdout], [], [], 0.1)
            self.read()

    def read(self) -> None:
        assert self.proc.stdout is not None
        try:
            chunk = os.read(self.proc.stdout.fileno(), 4096)
        except BlockingIOError:
            return
        self._buf += chunk
        for line in self._buf.split(b"\n"):
            if line.startswith(b"T ") and self.term_at is None:
                self.term_at = int(line.split()[1]) / 1e9

    def poll(self, now: float) -> None:
        if self.exit_at is None and select.select([self.pidfd], [], [], 0)[0]:
            self.exit_at = now
            self.read()

    def signal_at(self) -> float | None:
        stamps = [t for t in (self.term_at, self.exit_at) if t is not None]
        return min(stamps) if stamps else None

    def end(self) -> None:
        if self.proc.poll() is None:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        os.close(self.pidfd)


def hog(role: str, name: str, prefill: float, step: float = 0, every: float = 0.05,
        cap: float = 0, wait: bool = True, leaves: bool = False) -> Hog:
    """`leaves`: in its own leaf cgroup OOMD_ROOT/<name> (for a tool that kills cgroups)."""
    h = Hog(role, [PY, "-c", HOG, name, str(prefill), str(step), str(every), str(cap)],
            OOMD_ROOT / name if leaves else None)
    if wait:
        h.ready()
    return h


def headroom(margin: float, level_pct: float) -> float:
    total, avail = meminfo()
    return max(0.0, (avail - margin * level_pct / 100.0 * total) / MiB)


def clean_bomb() -> None:
    if BOMB_GROUP.exists():
        (BOMB_GROUP / "cgroup.kill").write_text("1")
        end = time.monotonic() + 10
        while (BOMB_GROUP / "cgroup.procs").read_text().split() and time.monotonic() < end:
            time.sleep(0.05)
        BOMB_GROUP.rmdir()


def make_leaf_root() -> None:
    clean_leaf_root()
    OOMD_ROOT.mkdir()
    (OOMD_ROOT / "cgroup.subtree_control").write_text("+memory +pids")


def clean_leaf_root() -> None:
    """Kill what is left in the leaves (after Hog.end there is nothing) and remove them."""
    if not OOMD_ROOT.exists():
        return
    for leaf in [d for d in OOMD_ROOT.iterdir() if d.is_dir()]:
        (leaf / "cgroup.kill").write_text("1")
        end = time.monotonic() + 10
        while (leaf / "cgroup.procs").read_text().split() and time.monotonic() < end:
            time.sleep(0.05)
        leaf.rmdir()
    OOMD_ROOT.rmdir()


BALLAST = Path("/dev/shm/oomguard-bench-ballast")


def set_ballast(room: int) -> None:
    """A tmpfs file (shmem, owned by no process: no killer takes it) that leaves `room`
    bytes above the 10% level: a workload fills that, not the whole VM."""
    BALLAST.unlink(missing_ok=True)
    total, avail = meminfo()
    size = avail - int(0.10 * total) - room
    fd = os.open(BALLAST, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        if size > 0:
            os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


def run_workload(tool: str, level_pct: float, name: str, limit_s: float) -> dict[str, Any]:
    field = LEVEL_FIELD.get(tool, "MemAvailable")
    leaves = tool in LEAF_TOOLS
    total, _ = meminfo()
    level = total * level_pct / 100.0
    set_ballast(600 * MiB)
    kk = kernel_kills()
    if leaves:
        make_leaf_root()
        managed_oom("kill", OOMD_ROOT)
    hogs = [hog("bystander", "sshd", 32, leaves=leaves),
            hog("bystander", "steady", 64, leaves=leaves)]
    right: set[str] = set()
    if name == "fast":
        hogs.append(hog("leaker", "fastleak", 0, 16, 0.0, headroom(0.3, 10.0), wait=False,
                        leaves=leaves))
        right = {"leaker"}
    elif name == "slow":
        hogs.append(hog("leaker", "slowleak", headroom(2.5, 10.0), 4, 0.2,
                        headroom(0.3, 10.0), leaves=leaves))
        right = {"leaker"}
    elif name == "bigsteady":
        hogs.append(hog("bystander", "bigsteady", headroom(2.2, 10.0), leaves=leaves))
        hogs.append(hog("leaker", "smallleak", 0, 8, 0.1, headroom(0.3, 10.0), wait=False,
                        leaves=leaves))
        right = {"leaker"}
    elif name == "bomb":
        clean_bomb()
        BOMB_GROUP.mkdir()
        (BOMB_GROUP / "pids.max").write_text(str(int(headroom(0.3, 10.0) / 6) + 20))
        managed_oom("kill", BOMB_GROUP)
        h = Hog("bomb", [PY, "-c", BOMB, str(BOMB_GROUP)])
        h.ready()
        hogs.append(h)
        right = {"bomb"}
    crossed = back = None
    min_avail = total
    samples: list[tuple[float, int]] = []  # (time, MemAvailable), whatever the level's field
    # the pressure systemd-oomd acts on (its watched cgroups' full avg10), every ~0.1 s
    watched = [OOMD_ROOT] + ([BOMB_GROUP] if name == "bomb" else [])
    pressure_max: float | None = None
    next_pressure = 0.0
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        now = time.monotonic()
        if tool == "systemd-oomd" and now >= next_pressure:
            next_pressure = now + 0.1
            for cg in watched:
                v = full_avg10(cg)
                if v is not None:
                    pressure_max = v if pressure_max is None else max(pressure_max, v)
        _, values = meminfo_all()
        avail = values[field]
        samples.append((now, values["MemAvailable"]))
        min_avail = min(min_avail, avail)
        if crossed is None and avail <= level:
            crossed = now
        if crossed is not None and back is None and avail > level:
            back = now
        for h in hogs:
            h.poll(now)
            h.read()
        bomb_empty = (name == "bomb" and BOMB_GROUP.exists()
                      and not (BOMB_GROUP / "cgroup.procs").read_text().split())
        done = any(h.exit_at for h in hogs if h.role in right) and back is not None
        if done and (name != "bomb" or bomb_empty):
            break
        time.sleep(0.002)
    time.sleep(0.5)
    for h in hogs:
        h.poll(time.monotonic())
    bomb_left = 0
    if name == "bomb" and BOMB_GROUP.exists():
        bomb_left = len((BOMB_GROUP / "cgroup.procs").read_text().split())
    died = [h for h in hogs if h.exit_at is not None]
    first = min(died, key=lambda h: h.signal_at() or 1e18) if died else None
    sig = first.signal_at() if first else None
    # MemAvailable where the tool's level was crossed, and the lowest before its first
    # signal (stamp, or exit: a SIGKILLed victim frees memory before its pidfd says so):
    # where each tool acts, in one unit
    at_cross = [a for t, a in samples if crossed and t >= crossed][:1]
    before_sig = [a for t, a in samples if sig and t < sig]
    result = {
        "tool": tool, "workload": name, "level_pct": level_pct, "level_field": field,
        "available_at_crossing_mib": round(at_cross[0] / MiB, 1) if at_cross else None,
        "available_min_before_signal_mib": (round(min(before_sig) / MiB, 1) if before_sig
                                            else None),
        "to_signal_ms": round((sig - crossed) * 1000, 1) if sig and crossed else None,
        "to_memory_back_ms": round((back - crossed) * 1000, 1) if back and crossed else None,
        "overshoot_mib": round((level - min_avail) / MiB, 1),
        "chosen": first.proc.args[3] if first and first.role != "bomb" else
                  ("bomb" if first else None),
        "right": bool(first and first.role in right),
        "others_died": [h.proc.args[3] for h in died
                        if h is not first and h.role == "bystander"],
        "bomb_left": bomb_left,
        "kernel_kills": kernel_kills() - kk,
        "signalled_by_term": bool(first and first.term_at),
    }
    if tool == "systemd-oomd":
        result["pressure_full_avg10_max"] = pressure_max
    if name == "bomb":
        managed_oom("auto", BOMB_GROUP)
    if leaves:
        managed_oom("auto", OOMD_ROOT)
    for h in hogs:
        h.end()
    if name == "bomb":
        clean_bomb()
    if leaves:
        clean_leaf_root()
    BALLAST.unlink(missing_ok=True)
    time.sleep(1.0)
    return result


def run_tool(tool: str, idle_s: float, reps: int, limit_s: float) -> dict[str, Any]:
    argv, level_pct, ready_line = TOOLS[tool]
    tmp = tempfile.mkdtemp(prefix=f"bench-{tool}-")
    Path(f"{tmp}/p.toml").write_text('[system]\nvictim = "leaf-cgroup"\n')
    Path(f"{tmp}/oomd.json").write_text(json.dumps(OOMD_CONFIG, indent=1) + "\n")
    Path(f"{tmp}/run").mkdir()
    workloads = ("bomb",) if tool == "oomguard-leaf" else WORKLOADS
    argv = [a.replace("{tmp}", tmp) for a in argv]
    global PID1
    if tool == "systemd-oomd":  # its PID 1 first: it connects to it at start-up
        with open(f"{tmp}/pid1.log", "wb") as pid1_log:  # the child keeps its own copy
            PID1 = subprocess.Popen([PY, "-c", FAKE_PID1], stdin=subprocess.PIPE,
                                    stdout=pid1_log, stderr=subprocess.STDOUT)
        wait_for_line(Path(f"{tmp}/pid1.log"), "listening", PID1, 30)
    logf = open(f"{tmp}/log", "w+b")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT,
                            env={**os.environ, **TOOL_ENV.get(tool, {})})
    ready_log = Path(tmp) / READY_LOG.get(tool, "log")
    if not wait_for_line(ready_log, ready_line, proc, 60):
        log(f"{tool}: not ready ({ready_line!r} not in {ready_log.name}; "
            f"exit status {proc.poll()})")
    time.sleep(3.0)  # start-up settled (journal, guardian, first checks)
    pids = tree_pids(proc.pid)
    before = {p: switches(p) for p in pids}
    inv = "nonvoluntary_ctxt_switches"
    before_inv = {p: switches(p, (inv,)) for p in pids}
    time.sleep(idle_s)
    wakeups = sum(switches(p) - before[p] for p in pids) / idle_s
    main_wakeups = (switches(proc.pid) - before[proc.pid]) / idle_s
    preempted = sum(switches(p, (inv,)) - before_inv[p] for p in pids) / idle_s
    out: dict[str, Any] = {
        "tool": tool, "level_pct": level_pct, "pids": len(pids),
        "idle_wakeups_per_s": round(wakeups, 2),
        "idle_wakeups_main_per_s": round(main_wakeups, 2),
        "idle_preemptions_per_s": round(preempted, 2),
        "rss_mib": round(sum(rss(p) for p in pids) / MiB, 1),
        "rss_main_mib": round(rss(proc.pid) / MiB, 1),
        "runs": [],
    }
    log(f"{tool}: idle {out['idle_wakeups_per_s']}/s, RSS {out['rss_mib']} MiB")
    for _ in range(reps):
        for w in workloads:
            r = run_workload(tool, level_pct, w, limit_s)
            log(f"{tool} {w}: {r}")
            out["runs"].append(r)
            if proc.poll() is not None:
                log(f"{tool} died: {proc.returncode}")
                break
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    logf.seek(0)
    lines = logf.read().decode("utf-8", "replace").splitlines()
    out["log_tail"] = lines[-15:]
    if tool == "oomd":  # its choices, for the record (its log is mostly context dumps)
        out["oomd_picked"] = [line for line in lines if "Picked" in line][:40]
    if tool == "systemd-oomd":
        out["systemd_oomd_killed"] = [line for line in lines if "Killed" in line][:40]
        if "SYSTEMD_LOG_LEVEL" in TOOL_ENV[tool]:
            out["log_head"] = lines[:200]
    logf.close()
    if PID1 is not None:  # EOF on its stdin: it removes its socket and exits
        assert PID1.stdin is not None
        PID1.stdin.close()
        try:
            PID1.wait(timeout=10)
        except subprocess.TimeoutExpired:
            PID1.kill()
            PID1.wait()
        pid1_log.close()
        out["pid1_log"] = Path(f"{tmp}/pid1.log").read_text().splitlines()[-20:]
        PID1 = None
    return out


def in_vm(args: argparse.Namespace) -> int:
    # The bench itself is no candidate for anyone (its hogs set themselves back to 0).
    Path("/proc/self/oom_score_adj").write_text("-1000")
    results: dict[str, Any] = {"tools": [], "meta": {}}
    total, avail = meminfo()
    results["meta"] = {"mem_total_mib": total // MiB, "mem_available_mib": avail // MiB,
                       "mem_free_mib": meminfo("MemFree")[1] // MiB,
                       "kernel": os.uname().release, "emulated": True,
                       "earlyoom": version(["earlyoom", "-v"]),
                       "oomd": version(["oomd", "--version"]),
                       "systemd-oomd": (version(["/lib/systemd/systemd-oomd", "--version"])
                                        or "").split("\n")[0] or None,
                       "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for tool in args.tools.split(","):
        if args.debug_log:
            TOOL_ENV["systemd-oomd"]["SYSTEMD_LOG_LEVEL"] = "debug"
            results["meta"]["debug_log"] = True
        results["tools"].append(run_tool(tool, args.idle_s, args.reps, args.limit_s))
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    log(f"wrote {args.json}")
    return 0


def version(argv: list[str]) -> str | None:
    try:
        return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True).stdout.strip()
    except OSError:
        return None


def table(results: dict[str, Any]) -> str:
    """The markdown table for docs/benchmarks.md."""
    lines = ["| tool | workload | to signal ms | to memory back ms | past the level MiB | "
             "lowest MemAvailable before the signal MiB | chosen (right?) | others killed | "
             "kernel kills |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t in results["tools"]:
        for r in t["runs"]:
            others = ", ".join(r["others_died"]) or "none"
            if r["workload"] == "bomb" and r["bomb_left"]:
                others += f"; {r['bomb_left']} bomb procs left"
            kk = r["kernel_kills"] if r["kernel_kills"] >= 0 else "? (dmesg wrapped)"
            back = r["to_memory_back_ms"] if r["to_memory_back_ms"] is not None else "never"
            field = r.get("level_field", "MemAvailable")
            level = f"{r['level_pct']:g}%" + ("" if field == "MemAvailable" else f" {field}")
            if t["tool"] in TRIGGER:
                level = f"{TRIGGER[t['tool']]}; from {level}"
            lines.append(f"| {t['tool']} ({level}) | {r['workload']} | "
                         f"{r['to_signal_ms']} | {back} | "
                         f"{max(0.0, r['overshoot_mib'])} | "
                         f"{r.get('available_min_before_signal_mib')} | {r['chosen']} "
                         f"({'yes' if r['right'] else 'no'}) | {others} | {kk} |")
    lines += ["", "| tool | idle wake-ups/s, main process | all its processes | "
                  "preemptions/s | RSS MiB (all) |", "|---|---|---|---|---|"]
    for t in results["tools"]:
        lines.append(f"| {t['tool']} | {t['idle_wakeups_main_per_s']} | "
                     f"{t['idle_wakeups_per_s']} | {t.get('idle_preemptions_per_s', '')} | "
                     f"{t['rss_main_mib']} ({t['rss_mib']}) |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--in-vm", action="store_true", help="(inside the VM) run the workloads")
    p.add_argument("--tools", default="oomguard,oomguard-leaf,earlyoom,nohang,oomd,systemd-oomd",
                   help="those not installed are left out (default: %(default)s)")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--idle-s", type=float, default=10.0)
    p.add_argument("--limit-s", type=float, default=40.0, help="per workload run")
    p.add_argument("--debug-log", action="store_true",
                   help="systemd-oomd's log at debug level (what it was told to watch, why "
                        "it did or did not act); not for the figures")
    p.add_argument("--json", default=str(HERE / "results" / "results-system.json"))
    p.add_argument("--table", metavar="JSON", help="print the markdown table of a result")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    if args.in_vm:
        if os.environ.get("OOMGUARD_IN_VM") != "1":
            raise SystemExit("bench/system.py: --in-vm only inside the VM (global memory "
                             "pressure never on the host)")
        return in_vm(args)
    import shutil
    tools = [t for t in args.tools.split(",")
             if t.startswith("oomguard") or (t in TOOLS and shutil.which(TOOLS[t][0][0]))]
    missing = sorted(set(args.tools.split(",")) - set(tools))
    if missing:  # not installed here on purpose: their packages start services on systemd
        log(f"not installed, left out: {', '.join(missing)} (apt-get install "
            f"{' '.join(missing)}; the VM sees the host's packages)")
    args.tools = ",".join(tools)
    out = Path(args.json).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    # six tools in one boot took 13.7 min emulated: a slow boot may pass run-in-vm's 1200 s
    env = {**os.environ, "OOMGUARD_VM_MEM": os.environ.get("OOMGUARD_VM_MEM", "1536"),
           "OOMGUARD_VM_TIMEOUT": os.environ.get("OOMGUARD_VM_TIMEOUT", "3600")}
    cmd = [str(ROOT / "tests/vm/run-in-vm.sh"), "--rw", str(out.parent), "--",
           PY, str(Path(__file__).resolve()), "--in-vm", "--tools", args.tools,
           "--reps", str(args.reps), "--idle-s", str(args.idle_s),
           "--limit-s", str(args.limit_s), "--json", str(out)]
    if args.debug_log:
        cmd.insert(-2, "--debug-log")
    rc = subprocess.call(cmd, env=env, cwd=str(ROOT))
    if rc == 0 and out.exists():
        print(table(json.loads(out.read_text())))
    return rc


if __name__ == "__main__":
    sys.exit(main())
