"""oomguard benchmarks: resolution latency, notification scaling, idle cost, footprint, storms.

Run through `bench/run` (which makes the venv if needed); see docs/benchmarks.md for the
method and the meaning of every JSON field. Everything here runs on cgroup v1 (the memory
controller of this project's machines); every hog runs in a memcg with a limit, joined
between fork and exec; every group lives under /oomguard-bench/run-<pid>-<start> and is
destroyed at the end (stale ones from crashed runs are cleaned at the start).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import os
import platform
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from oomguard.cgroup import MemoryCgroup, discover
from oomguard.cgroup.transient import clean_stale, destroy, ensure_parent, new_group, release
from oomguard.errors import CgroupError
from oomguard.events.v1 import OomNotifier
from oomguard.procs import spawn_in
from oomguard.workloads import LEAK, argv

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
OOMGUARD = str(Path(PY).parent / "oomguard")
MiB = 1 << 20
GiB = 1 << 30
BENCH_PARENT = "/oomguard-bench"
GROW_STEP = 16 * MiB
# The rules' settle time: an OOM this soon after a resolution joins the same incident, so
# the bench starts the next hog in an oomguard group only once the last incident closed.
SETTLE_S = 1.0
KILL_MODES = ("kernel", "bare", "oomguard_kill")
GROW_MODES = ("oomguard_grow", "bare_grow")
ALL_MODES = ("kernel", "bare", "oomguard_kill", "oomguard_grow", "bare_grow")
OOMGUARD_MODES = ("oomguard_kill", "oomguard_grow")
NOTIFY_SIZES = (1, 100, 1000, 10000)
WATCHING_RE = re.compile(rb"oomguard: watching (\d+) cgroups?\b")
SCENARIOS = ("defaults", "resolution", "notify", "idle", "footprint", "storm")

# The storm's hog: takes PREFILL bytes (touched), reports "r", waits for its stdin to close
# (the start line, shared by all), then runs LEAK: a few steps later it hits its limit.
STORM_PREFILL = 16 * MiB
STORM_LIMIT = 24 * MiB
STORM_HOG = (
    "import os as _os, sys as _sys\n"
    f"_pre = bytearray({STORM_PREFILL})\n"
    f"_pre[::4096] = b'\\x01' * {STORM_PREFILL // 4096}\n"
    "_os.write(1, b'r\\n')\n_sys.stdin.buffer.read(1)\n" + LEAK
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- statistics ---------------------------------------------------------------------------
def pct(xs: Sequence[float], q: float) -> float | None:
    """Percentile q (0-100) by linear interpolation between closest ranks (numpy 'linear')."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(xs: Sequence[float], digits: int = 4) -> dict[str, Any]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v, digits)

    return {
        "n": len(xs),
        "min_ms": r(min(xs)) if xs else None,
        "median_ms": r(pct(xs, 50)),
        "p95_ms": r(pct(xs, 95)),
        "p99_ms": r(pct(xs, 99)),
        "max_ms": r(max(xs)) if xs else None,
        "mean_ms": r(sum(xs) / len(xs)) if xs else None,
        "samples_ms": [round(x, digits) for x in xs],
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 4)


# -- processes ----------------------------------------------------------------------------
class Procs:
    """Every long-lived process the bench starts; ended by pidfd, never by name."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def add(self, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
        """SIGTERM by pidfd, SIGKILL after `timeout`; returns the exit code."""
        if proc.returncode is None:
            try:
                fd = os.pidfd_open(proc.pid)
            except ProcessLookupError:
                fd = -1
            if fd >= 0:
                try:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(fd, signal.SIGTERM)
                    if not _poll_fd(fd, timeout):
                        with contextlib.suppress(ProcessLookupError):
                            signal.pidfd_send_signal(fd, signal.SIGKILL)
                finally:
                    os.close(fd)
            with contextlib.suppress(ChildProcessError):
                proc.wait(timeout=timeout)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.returncode

    def stop_all(self) -> None:
        for proc in list(self.procs):
            with contextlib.suppress(Exception):
                self.stop(proc, timeout=5.0)


def _poll_fd(fd: int, timeout: float | None) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else int(timeout * 1000)))


def kill_by_pidfd(proc: subprocess.Popen[bytes]) -> None:
    try:
        fd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        return
    try:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    finally:
        os.close(fd)


def reap(proc: subprocess.Popen[bytes], timeout: float | None) -> int | None:
    """Wait (pidfd poll, then waitpid) for the child; monotonic ns right after the reap."""
    try:
        fd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        fd = -1
    try:
        if fd >= 0 and not _poll_fd(fd, timeout):
            return None
        _, status = os.waitpid(proc.pid, 0)
        t = time.monotonic_ns()
        proc.returncode = os.waitstatus_to_exitcode(status)
        return t
    finally:
        if fd >= 0:
            os.close(fd)


class LineReader:
    """Lines from a child's pipe, with a timeout, without a thread."""

    def __init__(self, stream: Any) -> None:
        self.fd = stream.fileno()
        os.set_blocking(self.fd, False)
        self.buf = b""

    def readline(self, timeout: float) -> bytes | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not _poll_fd(self.fd, left):
                return None
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            if not data:
                return None
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def drain(self) -> list[bytes]:
        with contextlib.suppress(BlockingIOError):
            while True:
                data = os.read(self.fd, 65536)
                if not data:
                    break
                self.buf += data
        lines = self.buf.split(b"\n")
        self.buf = lines.pop()
        return lines


def spawn_hog(group: MemoryCgroup, *args: object, source: str = LEAK,
              stdin: Any = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    """A LEAK hog inside `group` (joined between fork and exec: never outside a limit)."""
    return spawn_in([group.path], argv(source, *args), stdin=stdin, stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL)


def read_stamps(proc: subprocess.Popen[bytes]) -> tuple[list[int], bool]:
    assert proc.stdout is not None
    out = proc.stdout.read().split(b"\n")
    proc.stdout.close()
    stamps, done = [], False
    for line in out:
        if line.isdigit():
            stamps.append(int(line))
        elif line.startswith(b"done"):
            done = True
    return stamps, done


def under_oom(group: MemoryCgroup) -> bool:
    return bool(group.read_kv("memory.oom_control").get("under_oom", 0))


def wait_oom_clear(group: MemoryCgroup, timeout: float = 5.0) -> int | None:
    """Monotonic ns when under_oom reads 0 (polled every 0.1 ms), None on timeout."""
    deadline = time.monotonic() + timeout
    while under_oom(group):
        if time.monotonic() > deadline:
            return None
        time.sleep(0.0001)
    return time.monotonic_ns()


def oom_kill_disabled(group: MemoryCgroup) -> bool:
    return bool(group.read_kv("memory.oom_control").get("oom_kill_disable", 0))


# -- /proc sampling -------------------------------------------------------------------------
def proc_status(pid: int) -> dict[str, int]:
    return _numeric_status(f"/proc/{pid}/status")


def _numeric_status(path: str) -> dict[str, int]:
    """The numeric fields of a /proc status file (kB figures in kB)."""
    out: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(":")
            bits = value.split()
            if bits and bits[0].isdigit():
                out[key] = int(bits[0])
    return out


def ctx_switches(pid: int) -> int:
    """voluntary + nonvoluntary context switches, summed over every thread of `pid`."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            st = proc_status_task(pid, int(tid))
            total += st.get("voluntary_ctxt_switches", 0) + st.get("nonvoluntary_ctxt_switches", 0)
    return total


def proc_status_task(pid: int, tid: int) -> dict[str, int]:
    return _numeric_status(f"/proc/{pid}/task/{tid}/status")


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15)


def cpu_ns(pid: int) -> int:
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = int(value.split()[0]) * 1024
    return out


# -- the oomguard daemon --------------------------------------------------------------------
def daemon_available() -> tuple[bool, str]:
    if not Path(OOMGUARD).exists():
        return False, f"{OOMGUARD} not found"
    try:
        res = subprocess.run([OOMGUARD, "daemon", "--help"], capture_output=True, timeout=30,
                             check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"oomguard daemon --help: {exc}"
    if res.returncode != 0:
        err = res.stderr.decode(errors="replace").strip()[:200]
        return False, f"oomguard daemon --help exited {res.returncode}: {err}"
    return True, ""


def rule_toml(name: str, match: str, steps: Sequence[str], **extra: str) -> str:
    lines = ["[[rule]]", f'name = "{name}"', f'match = "{match}"',
             "steps = [" + ", ".join(f'"{s}"' for s in steps) + "]",
             'strategy = "largest"', 'grace = "0s"', f'settle = "{SETTLE_S:g}s"']
    lines += [f'{k} = "{v}"' for k, v in extra.items()]
    return "\n".join(lines) + "\n"


class Daemon:
    """`oomguard daemon --config FILE --journal PATH`, stderr to a file."""

    def __init__(self, ctx: Context, name: str, rules: str, profile: bool = False,
                 trace: bool = False, env: dict[str, str] | None = None) -> None:
        self.ctx = ctx
        self.env = env  # None: this process's environment
        self.dir = ctx.tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "oomguard.toml"
        self.config.write_text(rules)
        self.journal = self.dir / "journal.db"
        self.stderr_path = self.dir / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.t_spawn = 0
        self.profile = self.dir / "daemon.prof" if profile else None
        self.trace = self.dir / "trace.jsonl" if trace else None

    def start(self) -> None:
        cmd = [OOMGUARD, "daemon", "--config", str(self.config), "--journal", str(self.journal)]
        if self.profile is not None:
            cmd = [PY, "-m", "cProfile", "-o", str(self.profile), "-m", "oomguard", *cmd[1:]]
        elif self.trace is not None:
            cmd = [PY, str(HERE / "trace_daemon.py"), str(self.trace), *cmd[1:]]
        self.stderr_f = open(self.stderr_path, "wb")  # noqa: SIM115
        self.t_spawn = time.monotonic_ns()
        self.proc = self.ctx.procs.add(subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.stderr_f,
            env=self.env))

    def wait_watching(self, expect: int, timeout: float = 120.0) -> tuple[float, int]:
        """Seconds from spawn to the `oomguard: watching N cgroups` line (N >= expect)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        pos, buf = 0, b""
        while time.monotonic() < deadline:
            with open(self.stderr_path, "rb") as f:
                f.seek(pos)
                data = f.read()
            t = time.monotonic_ns()
            pos += len(data)
            buf += data
            for m in WATCHING_RE.finditer(buf):
                n = int(m.group(1))
                if n >= expect:
                    return (t - self.t_spawn) / 1e9, n
            if self.proc.poll() is not None:
                raise RuntimeError(f"oomguard daemon exited {self.proc.returncode}: "
                                   + self.tail())
            time.sleep(0.002)
        raise RuntimeError(f"oomguard daemon: no 'watching {expect} cgroups' line in "
                           f"{timeout:.0f} s: " + self.tail())

    def closed_count(self, relpath: str) -> int:
        """Incidents of `relpath` the decision log reports closed."""
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return 0
        return text.count(f" in {relpath} closed")

    def wait_closed(self, relpath: str, count: int, since: float) -> None:
        """Until `count` incidents of `relpath` closed, or settle + 1 s after `since`."""
        limit = since + SETTLE_S + 1.0
        while time.monotonic() < limit and self.closed_count(relpath) < count:
            time.sleep(0.01)

    def tail(self, n: int = 8) -> str:
        try:
            lines = self.stderr_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-n:])

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        code = self.ctx.procs.stop(self.proc, timeout=180.0)
        self.stderr_f.close()
        return code

    def incidents(self) -> list[dict[str, Any]]:
        res = subprocess.run([OOMGUARD, "events", "--json", "--journal", str(self.journal)],
                             capture_output=True, timeout=120, check=False)
        if res.returncode != 0:
            err = res.stderr.decode(errors="replace").strip()[:300]
            raise RuntimeError(f"oomguard events exited {res.returncode}: {err}")
        text = res.stdout.decode().strip()
        if not text:
            return []
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        if isinstance(data, dict):
            data = data.get("incidents", [data])
        return list(data)


# -- the run --------------------------------------------------------------------------------
class Context:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.procs = Procs()
        self.hier = discover()
        if self.hier.memory_version != 1:
            raise SystemExit("bench: needs the cgroup v1 memory controller "
                             "(memory.oom_control events); none found in /proc/self/mountinfo")
        self.parent = ensure_parent(self.hier, BENCH_PARENT)
        stale = clean_stale(self.parent)
        if stale:
            log(f"cleaned stale groups: {', '.join(stale)}")
        self.run = new_group(self.parent, "run")
        self.tmp = Path(tempfile.mkdtemp(prefix="oomguard-bench-"))
        self.results: dict[str, Any] = {}
        self.errors: list[str] = []
        self.notes: list[str] = []
        self.observers: list[OomNotifier] = []
        ok, why = daemon_available()
        self.oomguard_ok = ok
        if not ok:
            self.error(f"oomguard daemon unavailable, oomguard modes skipped: {why}")

    def error(self, msg: str) -> None:
        log("ERROR: " + msg)
        self.errors.append(msg)

    def group(self, relname: str, limit: int | None = None) -> MemoryCgroup:
        g = self.run
        for part in relname.split("/"):
            g = g.child(part)
            g.create(exist_ok=True)
        if limit is not None:
            g.set_limit(limit)
        return g

    def observer(self, group: MemoryCgroup) -> OomNotifier:
        """The bench's own passive eventfd on a group: read (never waited on) afterwards."""
        obs = OomNotifier(group)
        self.observers.append(obs)
        return obs

    def close(self) -> None:
        self.procs.stop_all()
        for obs in self.observers:
            with contextlib.suppress(Exception):
                obs.close()
        try:
            t = time.monotonic()
            destroy(self.run, timeout=60.0)
            log(f"removed {self.run.relpath} in {time.monotonic() - t:.1f} s")
        except CgroupError as exc:
            self.error(f"cleanup of {self.run.relpath}: {exc}")
        with contextlib.suppress(CgroupError):
            if not self.parent.children():
                self.parent.remove()
        if not self.args.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            log(f"daemon logs and journals kept in {self.tmp}")


# -- a. resolution latency ------------------------------------------------------------------
def scenario_resolution(ctx: Context) -> None:
    sizes = [("64M", 64 * MiB, 10 if ctx.quick else 30)]
    n_1g = ctx.args.n_1g if ctx.args.n_1g is not None else (3 if ctx.quick else 30)
    if n_1g > 0:
        sizes.append(("1G", GiB, n_1g))
    if ctx.args.n is not None:
        sizes[0] = ("64M", 64 * MiB, ctx.args.n)
    modes = [m for m in ALL_MODES if ctx.oomguard_ok or m not in OOMGUARD_MODES]
    groups: dict[tuple[str, str], MemoryCgroup] = {}
    for label, size, _ in sizes:
        for mode in modes:
            g = ctx.group(f"res-{label}/{mode}", size)
            g.set_oom_kill_disable(False)
            groups[(label, mode)] = g
    handlers = []
    for (_label, mode), g in groups.items():
        if mode in ("bare", "bare_grow"):
            cmd = [PY, str(HERE / "bare_handler.py"), "kill" if mode == "bare" else "grow",
                   str(g.path)] + ([str(GROW_STEP)] if mode == "bare_grow" else [])
            p = ctx.procs.add(subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                               stdout=subprocess.PIPE))
            line = LineReader(p.stdout).readline(30)
            if line != b"ready":
                raise RuntimeError(f"bare_handler for {g.relpath} did not start: {line!r}")
            handlers.append(p)
    daemon = None
    if ctx.oomguard_ok:
        res = ctx.run.relpath + "/res-*"
        rules = rule_toml("bench-kill", res + "/oomguard_kill", ["hold", "kill"])
        rules += "\n" + rule_toml("bench-grow", res + "/oomguard_grow", ["hold", "grow"],
                                  grow_step="16M", grow_max="2G")
        daemon = Daemon(ctx, "resolution", rules, profile=ctx.args.profile,
                        trace=ctx.args.trace)
        daemon.start()
        try:
            secs, n = daemon.wait_watching(len(sizes) * 2)
            log(f"resolution: oomguard daemon watching {n} cgroups after {secs:.3f} s")
        except RuntimeError as exc:
            ctx.error(f"resolution: {exc}")
            ctx.procs.stop(daemon.proc)  # type: ignore[arg-type]
            daemon = None
            modes = [m for m in modes if m not in OOMGUARD_MODES]
    observers = {key: ctx.observer(g) for key, g in groups.items()}

    out: dict[str, Any] = {}
    all_samples: dict[str, list[dict[str, Any]]] = {}
    ran: dict[tuple[str, str], int] = {}
    last: dict[tuple[str, str], float] = {}
    for label, size, n in sizes:
        timeout = 15.0 if size <= 64 * MiB else 90.0
        samples: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        errs: dict[str, list[str]] = {}
        log(f"resolution {label}: {n} iterations x {len(modes)} modes, interleaved")
        for i in range(n):
            order = modes[i % len(modes):] + modes[: i % len(modes)]
            for mode in order:
                g = groups[(label, mode)]
                obs = observers[(label, mode)]
                if mode in OOMGUARD_MODES and daemon is not None:
                    done = ran.get((label, mode), 0)
                    daemon.wait_closed(g.relpath, done, last.get((label, mode), 0.0))
                s = run_resolution_once(ctx, g, obs, mode, size, timeout)
                ran[(label, mode)] = ran.get((label, mode), 0) + 1
                last[(label, mode)] = time.monotonic()
                s["iter"] = i
                samples[mode].append(s)
                if "error" in s:
                    errs.setdefault(mode, []).append(f"iter {i}: {s['error']}")
                time.sleep(0.02)
        out[label] = finish_resolution(ctx, label, samples)
        out[label]["error_messages"] = errs
        for m in OOMGUARD_MODES:
            all_samples[f"{label}/{m}"] = samples.get(m, [])
    if daemon is not None:
        for key, count in ran.items():  # let the last incidents close (settle) first
            if key[1] in OOMGUARD_MODES:
                daemon.wait_closed(groups[key].relpath, count, last[key])
        try:
            incidents = daemon.incidents()
            by_group = collections.Counter(inc.get("cgroup") for inc in incidents)
            out["oomguard_incidents"] = {str(k): v for k, v in by_group.items()}
            lat: dict[str, list[float]] = collections.defaultdict(list)
            for inc in incidents:
                if isinstance(inc.get("latency_ms"), (int, float)):
                    lat[str(inc.get("cgroup"))].append(float(inc["latency_ms"]))
            out["oomguard_journal_latency_ms_p50"] = {k: pct(v, 50) for k, v in lat.items()}
            out["oomguard_outcomes"] = collections.Counter(
                str(inc.get("outcome")) for inc in incidents).most_common()
        except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
            ctx.error(f"resolution: oomguard events: {exc}")
        code = daemon.stop()
        out["oomguard_exit_code"] = code
        out["oomguard_restored"] = all(
            not oom_kill_disabled(groups[(lb, m)]) for lb, _, _ in sizes for m in OOMGUARD_MODES)
        if code != 0:
            ctx.error(f"resolution: oomguard daemon exited {code} on SIGTERM: {daemon.tail()}")
        if daemon.profile is not None and daemon.profile.exists():
            out["oomguard_profile"] = profile_text(daemon.profile)
        if daemon.trace is not None and daemon.trace.exists():
            out["oomguard_trace"] = analyse_trace(daemon.trace, all_samples)
    for p in handlers:
        ctx.procs.stop(p)
    ctx.results["resolution"] = out
    flat = ctx.results
    for label, suffix in (("64M", ""), ("1G", "_1g")):
        r = out.get(label)
        if not r:
            continue
        med = {m: r["modes"].get(m, {}).get("median_ms") for m in ALL_MODES}
        for m in ALL_MODES:
            flat[f"{m}_median_ms{suffix}"] = med[m]
        flat[f"kill_vs_kernel_ratio{suffix}"] = ratio(med["oomguard_kill"], med["kernel"])
        flat[f"kill_vs_bare_ratio{suffix}"] = ratio(med["oomguard_kill"], med["bare"])
        flat[f"bare_vs_kernel_ratio{suffix}"] = ratio(med["bare"], med["kernel"])
        flat[f"grow_median_ms{suffix}"] = med["oomguard_grow"]
        flat[f"grow_vs_bare_ratio{suffix}"] = ratio(med["oomguard_grow"], med["bare_grow"])


def run_resolution_once(ctx: Context, g: MemoryCgroup, obs: OomNotifier, mode: str, size: int,
                        timeout: float) -> dict[str, Any]:
    g.set_limit(size)
    if mode == "kernel":
        g.set_oom_kill_disable(False)
    obs.read()
    grow = mode in GROW_MODES
    hog = spawn_hog(g, MiB, size + 4 * MiB if grow else 0, "stamps")
    t_reaped = reap(hog, timeout)
    sample: dict[str, Any] = {"mode": mode}
    if t_reaped is None:
        sample["error"] = f"not resolved within {timeout:.0f} s"
        ctx.error(f"resolution {mode} {g.relpath}: hog not resolved within {timeout:.0f} s; "
                  "released the group to the kernel")
        release(g)
        kill_by_pidfd(hog)
        reap(hog, 30)
        if mode != "kernel":
            g.set_oom_kill_disable(True)  # back to the handler's hold
        read_stamps(hog)
        return sample
    t_clear = t_reaped
    if under_oom(g):
        t_clear = wait_oom_clear(g) or time.monotonic_ns()
        sample["under_oom_after_reap"] = True
    stamps, done = read_stamps(hog)
    sample["stamps"] = len(stamps)
    sample["oom_events"] = obs.read().count
    sample["status"] = hog.returncode
    if grow:
        sample["done"] = done
        sample["limit_after"] = g.limit()
        sample["_stamps"] = stamps
        if not done:
            sample["error"] = f"grow hog did not finish (status {hog.returncode})"
    else:
        if hog.returncode != -signal.SIGKILL:
            sample["error"] = f"hog ended with status {hog.returncode}, not SIGKILL"
        if stamps:
            sample["latency_ms"] = (max(t_reaped, t_clear) - stamps[-1]) / 1e6
            sample["reap_ms"] = (t_reaped - stamps[-1]) / 1e6
            sample["_t_last"], sample["_t_res"] = stamps[-1], max(t_reaped, t_clear)
    return sample


def finish_resolution(ctx: Context, label: str,
                      samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Grow latencies need the stamp index of the OOM. The same hog in the same group stops
    after the same number of stamps in the kill modes (at 1 GiB it varies by one), so the
    OOM of a grow run is after stamp S-1 for one of the S seen there: of those candidate
    gaps, the largest (a normal 1 MiB step takes ~0.4 ms, an OOM and a raise more)."""
    counts = collections.Counter(
        s["stamps"] for m in KILL_MODES for s in samples.get(m, []) if "latency_ms" in s)
    ref = counts.most_common(1)[0][0] if counts else None
    flagged = 0
    for m in GROW_MODES:
        for s in samples.get(m, []):
            stamps = s.pop("_stamps", None)
            if not stamps or "error" in s:
                continue
            gaps = [b - a for a, b in itertools.pairwise(stamps)]
            cands = sorted(c - 1 for c in counts if 0 < c < len(stamps))
            if cands:
                k = max(cands, key=gaps.__getitem__)
                s["oom_index"] = k
                window = gaps[max(0, k - 3): k + 4]
                if gaps[k] < max(window):
                    s["gap_not_largest_nearby"] = True
                    flagged += 1
            else:
                k = max(range(len(gaps)), key=gaps.__getitem__)
                s["oom_index"] = k
                s["oom_index_from_largest_gap"] = True
            s["latency_ms"] = gaps[k] / 1e6
            s["_t_last"], s["_t_res"] = stamps[k], stamps[k + 1]
            steps = sorted(gaps[:k] + gaps[k + 1:])
            s["median_step_ms"] = steps[len(steps) // 2] / 1e6 if steps else None
    modes = {}
    for m, ss in samples.items():
        lat = [s["latency_ms"] for s in ss if "latency_ms" in s and "error" not in s]
        st = summary(lat)
        st["errors"] = sum(1 for s in ss if "error" in s)
        st["oom_events"] = [s.get("oom_events") for s in ss]
        if m in KILL_MODES:
            st["reap_median_ms"] = pct([s["reap_ms"] for s in ss if "reap_ms" in s], 50)
            st["under_oom_after_reap"] = sum(1 for s in ss if s.get("under_oom_after_reap"))
        else:
            st["median_step_ms"] = pct([s["median_step_ms"] for s in ss
                                        if s.get("median_step_ms") is not None], 50)
            st["grows"] = collections.Counter(s.get("limit_after") for s in ss).most_common()
        modes[m] = st
        if st["median_ms"] is not None:
            log(f"  {label} {m:14s} n={st['n']:3d} min {st['min_ms']:.3f} median "
                f"{st['median_ms']:.3f} p95 {st['p95_ms']:.3f} max {st['max_ms']:.3f} ms")
    return {"modes": modes, "oom_stamp_index": ref, "stamp_counts": dict(counts),
            "grow_gap_flagged": flagged}


def analyse_trace(path: Path, samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Line the daemon's timeline (trace_daemon.py) up with each sample's window, from the
    hog's last timestamp to resolved: when the eventfd read returned, when the signal or the
    raise went out, and the time spent in each traced function inside the window."""
    recs = []
    with open(path) as f:
        for line in f:
            name, t0, t1 = json.loads(line)
            recs.append((t0, t1, name))
    recs.sort()
    out: dict[str, Any] = {}
    for key, ss in samples.items():
        marks: dict[str, list[float]] = collections.defaultdict(list)
        inside: dict[str, list[float]] = collections.defaultdict(list)
        after: dict[str, list[float]] = collections.defaultdict(list)
        for s in ss:
            if "_t_last" not in s:
                continue
            lo, hi = s["_t_last"], s["_t_res"]
            # the incident's own work may run past `hi`: count it up to 50 ms later
            win = [r for r in recs if lo <= r[0] <= hi + 50_000_000]
            tot: dict[str, float] = collections.defaultdict(float)
            tot_after: dict[str, float] = collections.defaultdict(float)
            for t0, t1, name in win:
                (tot if t0 <= hi else tot_after)[name] += (t1 - t0) / 1e3
            for name, us in tot.items():
                inside[name].append(us)
            for name, us in tot_after.items():
                after[name].append(us)
            reads = [r for r in win if r[2] == "EventfdRegistration.read" and r[0] <= hi]
            if reads:
                marks["eventfd_read_returned_ms"].append((reads[0][1] - lo) / 1e6)
            sends = [r for r in win if r[2] == "Pidfd.send" and r[0] <= hi]
            if sends:
                marks["sigkill_sent_ms"].append((sends[0][0] - lo) / 1e6)
                if reads:
                    marks["event_to_sigkill_ms"].append((sends[0][0] - reads[0][1]) / 1e6)
            raises = [r for r in win if r[2] == "write_change" and r[0] <= hi]
            if raises and not sends:
                marks["limit_write_started_ms"].append((raises[0][0] - lo) / 1e6)
                if reads:
                    marks["event_to_limit_write_ms"].append((raises[0][0] - reads[0][1]) / 1e6)
            marks["resolved_ms"].append((hi - lo) / 1e6)
        out[key] = {
            "timeline_median_ms": {k: round(pct(v, 50) or 0, 4) for k, v in marks.items()},
            "before_resolved_us_median": {
                k: round(pct(v, 50) or 0, 1)
                for k, v in sorted(inside.items(), key=lambda kv: -(pct(kv[1], 50) or 0))},
            "after_resolved_us_median": {
                k: round(pct(v, 50) or 0, 1)
                for k, v in sorted(after.items(), key=lambda kv: -(pct(kv[1], 50) or 0))},
            "samples": len(marks["resolved_ms"]),
        }
    return out


def profile_text(path: Path, n: int = 25) -> str:
    import io
    import pstats
    buf = io.StringIO()
    pstats.Stats(str(path), stream=buf).sort_stats("cumulative").print_stats(n)
    return buf.getvalue()


# -- many watched groups (b, c, d) ------------------------------------------------------------
def make_many(ctx: Context, count: int) -> MemoryCgroup:
    many = ctx.group("many")
    before = meminfo()
    t = time.monotonic()
    for i in range(count):
        os.mkdir(many.path / f"g{i:05d}")
    took = time.monotonic() - t
    after = meminfo()
    used = (before["MemAvailable"] - after["MemAvailable"]) / MiB
    slab = (after["Slab"] + after["Percpu"] - before["Slab"] - before["Percpu"]) / MiB
    ctx.results[f"cgroups_create_s_{count}"] = round(took, 3)
    ctx.results[f"cgroups_kernel_mb_{count}"] = round(used, 1)
    ctx.results[f"cgroups_slab_percpu_mb_{count}"] = round(slab, 1)
    log(f"made {count} empty memcgs in {took:.2f} s; kernel memory {used:.0f} MiB "
        f"(slab+percpu {slab:.0f} MiB)")
    return many


# -- b. notification latency ----------------------------------------------------------------
def scenario_notify(ctx: Context, many: MemoryCgroup, count: int) -> None:
    sizes = [s for s in NOTIFY_SIZES if s <= count]
    n = ctx.args.n_notify or (20 if ctx.quick else 100)
    target = many.child("g00000")
    target.set_limit(64 * MiB)
    target.set_oom_kill_disable(True)  # the hog waits; the bench kills it after the event
    probes: dict[int | str, tuple[subprocess.Popen[bytes], LineReader]] = {}
    setup: dict[int | str, dict[str, Any]] = {}
    keys: list[int | str] = ["raw", *sizes]
    try:
        for size in keys:
            extra = ["1", "raw"] if size == "raw" else [str(size)]
            p = ctx.procs.add(subprocess.Popen(
                [PY, str(HERE / "notify_probe.py"), str(many.path), *extra],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE))
            rd = LineReader(p.stdout)
            line = rd.readline(300)
            if not line or not line.startswith(b"ready"):
                raise RuntimeError(f"notify probe {size} did not start: {line!r}")
            _, idle, secs, one_fd = line.split()
            setup[size] = {"idle_registered": int(idle), "register_s": float(secs),
                           "control_fd_closed": bool(int(one_fd)),
                           "rss_mb": proc_status(p.pid).get("VmRSS", 0) / 1024}
            probes[size] = (p, rd)
        log(f"notify: probes ready {setup}; {n} iterations x {len(keys)} probes, interleaved")
        samples: dict[int | str, list[float]] = {s: [] for s in keys}
        errors = 0
        for i in range(n):
            order = keys[i % len(keys):] + keys[: i % len(keys)]
            for size in order:
                p, rd = probes[size]
                assert p.stdin is not None
                p.stdin.write(b"arm\n")
                p.stdin.flush()
                if rd.readline(10) != b"armed":
                    raise RuntimeError(f"notify probe {size} did not arm")
                t0 = time.monotonic_ns()
                hog = spawn_hog(target, MiB, 0, "stamps")
                t_event = None
                while True:
                    line = rd.readline(15)
                    if line is None:
                        break
                    if line.startswith(b"event"):
                        t = int(line.split()[1])
                        if t > t0:
                            t_event = t
                            break
                kill_by_pidfd(hog)
                reap(hog, 30)
                stamps, _ = read_stamps(hog)
                wait_oom_clear(target)
                p.stdin.write(b"disarm\n")
                p.stdin.flush()
                while True:
                    line = rd.readline(10)
                    if line is None or line == b"disarmed":
                        break
                if t_event is None or not stamps:
                    errors += 1
                    ctx.error(f"notify {size}: no event seen (iteration {i})")
                    continue
                samples[size].append((t_event - stamps[-1]) / 1e6)
                time.sleep(0.02)
    finally:
        for p, _ in probes.values():
            if p.stdin is not None:
                with contextlib.suppress(OSError):
                    p.stdin.write(b"quit\n")
                    p.stdin.flush()
            ctx.procs.stop(p)
        with contextlib.suppress(CgroupError):
            target.set_oom_kill_disable(False)
    out: dict[str, Any] = {}
    for size in keys:
        st = summary(samples[size])
        st.update(setup[size])
        out[str(size)] = st
        ctx.results[f"notify_p50_ms_{size}"] = st["median_ms"]
        ctx.results[f"notify_p99_ms_{size}"] = st["p99_ms"]
        if st["n"]:
            log(f"  notify {size!s:>5} watched: n={st['n']} p50 {st['median_ms']:.3f} "
                f"p99 {st['p99_ms']:.3f} max {st['max_ms']:.3f} ms")
    out["errors"] = errors
    ctx.results["notify"] = out
    top = max(sizes)
    ctx.results[f"notify_p99_ratio_{top}_vs_1"] = ratio(
        out[str(top)]["p99_ms"], out["1"]["p99_ms"])
    ctx.results[f"notify_p50_ratio_{top}_vs_1"] = ratio(
        out[str(top)]["median_ms"], out["1"]["median_ms"])
    ctx.results["notify_p50_ratio_1_vs_raw"] = ratio(out["1"]["median_ms"], out["raw"]["median_ms"])


# -- c. idle cost and d. footprint ------------------------------------------------------------
def watched_patterns(n: int) -> list[str]:
    """Globs over many/g00000.. that together match exactly the first n groups
    (n = 1, or a multiple of 100 up to 10,000)."""
    if n == 1:
        return ["g00000"]
    if n >= 10000:
        return ["g0????"]
    thousands, hundreds = divmod(n // 100, 10)
    pats = []
    if thousands:
        pats.append(f"g0[0-{thousands - 1}]???")
    if hundreds:
        pats.append(f"g0{thousands}[0-{hundreds - 1}]??")
    return pats


def nofile_fit() -> int:
    """The most groups a daemon with two fds per group can watch under RLIMIT_NOFILE."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(100, (soft - 200) // 2 // 100 * 100)


def footprint_once(ctx: Context, many: MemoryCgroup, size: int, rep: int,
                   idle_s: float | None) -> dict[str, Any]:
    rules = "\n".join(
        rule_toml(f"bench-watch-{i}", f"{many.relpath}/{pat}", ["hold", "kill"])
        for i, pat in enumerate(watched_patterns(size)))
    d = Daemon(ctx, f"footprint-{size}-{rep}", rules)
    d.start()
    r: dict[str, Any] = {"watched": size}
    try:
        secs, seen = d.wait_watching(size, timeout=300)
    except RuntimeError as exc:
        d.stop()
        r["error"] = str(exc)
        return r
    assert d.proc is not None
    pid = d.proc.pid
    st = proc_status(pid)
    r["startup_s"] = round(secs, 4)
    r["watching"] = seen
    r["rss_mb"] = round(st["VmRSS"] / 1024, 2)
    r["rss_anon_mb"] = round(st.get("RssAnon", 0) / 1024, 2)
    r["rss_file_mb"] = round(st.get("RssFile", 0) / 1024, 2)
    r["locked_mb"] = round(st.get("VmLck", 0) / 1024, 2)
    r["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    r["threads"] = len(os.listdir(f"/proc/{pid}/task"))
    time.sleep(1.0)
    r["rss_mb_after_1s"] = round(proc_status(pid)["VmRSS"] / 1024, 2)
    if idle_s:
        c0, t0, n0, w0 = ctx_switches(pid), cpu_ticks(pid), cpu_ns(pid), time.monotonic()
        log(f"idle: oomguard daemon watching {seen} cgroups, sampling {idle_s:.0f} s")
        time.sleep(idle_s)
        c1, t1, n1, w1 = ctx_switches(pid), cpu_ticks(pid), cpu_ns(pid), time.monotonic()
        window = w1 - w0
        ctx.results["idle_window_s"] = round(window, 2)
        ctx.results["idle_watched"] = seen
        ctx.results["idle_ctx_switches"] = c1 - c0
        ctx.results["idle_wakeups_per_s"] = round((c1 - c0) / window, 4)
        ctx.results["idle_cpu_s"] = round((t1 - t0) / os.sysconf("SC_CLK_TCK"), 4)
        ctx.results["idle_cpu_s_schedstat"] = round((n1 - n0) / 1e9, 6)
        ctx.results["idle_rss_mb_end"] = round(proc_status(pid)["VmRSS"] / 1024, 2)
        log(f"  idle: {c1 - c0} context switches in {window:.1f} s, cpu {(n1 - n0) / 1e6:.2f} ms")
    t = time.monotonic()
    code = d.stop()
    r["shutdown_s"] = round(time.monotonic() - t, 3)
    r["exit_code"] = code
    r["restored"] = not any(oom_kill_disabled(many.child(f"g{i:05d}")) for i in range(size))
    if code != 0 or not r["restored"]:
        ctx.error(f"footprint {size}: daemon exit {code}, restored={r['restored']}: {d.tail()}")
    log(f"  footprint {size:5d}: start-up {r['startup_s']:.3f} s, RSS {r['rss_mb']:.1f} MiB "
        f"(anon {r['rss_anon_mb']:.1f}, file {r['rss_file_mb']:.1f}), {r['fds']} fds, "
        f"SIGTERM to exit {r['shutdown_s']:.2f} s")
    return r


def scenario_footprint(ctx: Context, many: MemoryCgroup, count: int, want_idle: bool,
                       want_footprint: bool) -> None:
    sizes = [s for s in (1, 1000, 10000) if s <= count] if want_footprint else [1000]
    repeats = 1 if ctx.quick else 3
    idle_s = ctx.args.idle_s or (15.0 if ctx.quick else 60.0)
    out: dict[str, Any] = {}
    for size in sizes:
        runs = []
        for rep in range(repeats):
            r = footprint_once(ctx, many, size, rep,
                               idle_s if want_idle and size == 1000 and rep == 0 else None)
            if "error" in r:
                ctx.error(f"footprint {size}: {r['error'][-600:]}")
                fit = nofile_fit()
                if "Too many open files" in r["error"] and fit < size:
                    ctx.results[f"footprint_{size}_error"] = (
                        f"EMFILE: the daemon keeps 2 fds per watched v1 group and "
                        f"RLIMIT_NOFILE is {fit * 2 + 200} here; measured {fit} instead")
                    ctx.results["footprint_max_watched"] = fit
                    out[f"{size}_failed"] = r
                    size = fit  # measure what fits, under its own name
                    r = footprint_once(ctx, many, size, rep, None)
                    if "error" in r:
                        ctx.error(f"footprint {size}: {r['error'][-600:]}")
                        break
                else:
                    break
            runs.append(r)
        if not runs:
            continue
        out[str(size)] = runs
        if want_footprint:
            ctx.results[f"startup_s_{size}"] = pct([r["startup_s"] for r in runs], 50)
            ctx.results[f"rss_mb_{size}"] = pct([r["rss_mb"] for r in runs], 50)
            ctx.results[f"shutdown_s_{size}"] = pct([r["shutdown_s"] for r in runs], 50)
    ctx.results["footprint"] = out
    one, big = out.get("1"), [k for k in out if k.isdigit() and int(k) >= 1000]
    if one and big:
        top = max(big, key=int)
        per = ((pct([r["rss_mb"] for r in out[top]], 50) or 0)
               - (pct([r["rss_mb"] for r in one], 50) or 0)) / (int(top) - 1)
        ctx.results["rss_kb_per_watched"] = round(per * 1024, 2)


# -- e. storm -------------------------------------------------------------------------------
def scenario_storm(ctx: Context) -> None:
    n_groups = ctx.args.storm_groups
    limit = STORM_LIMIT
    repeats = 1 if ctx.quick else 3
    groups = [ctx.group(f"storm/s{i:03d}", limit) for i in range(n_groups)]
    observers = [ctx.observer(g) for g in groups]
    modes = ["kernel"] + (["oomguard"] if ctx.oomguard_ok else [])
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for rep in range(repeats):
        for mode in modes if rep % 2 == 0 else modes[::-1]:
            log(f"storm: {n_groups} groups, {mode}, run {rep + 1}/{repeats}")
            runs[mode].append(run_storm_once(ctx, groups, observers, mode, rep))
    out: dict[str, Any] = {"groups": n_groups, "limit_mb": limit // MiB, "runs": runs}
    for mode in modes:
        ok = [r for r in runs[mode] if r.get("resolve_s") is not None]
        out[mode] = {"resolve_s_median": pct([r["resolve_s"] for r in ok], 50),
                     "resolve_s_max": max((r["resolve_s"] for r in ok), default=None),
                     "per_group_p50_ms": pct([r["per_group_ms"]["median_ms"] for r in ok
                                              if r.get("per_group_ms")], 50),
                     "per_group_max_ms": max((r["per_group_ms"]["max_ms"] for r in ok
                                              if r.get("per_group_ms")), default=None)}
    ctx.results["storm"] = out
    ctx.results["storm_groups"] = n_groups
    ctx.results["storm_resolve_s_kernel"] = out["kernel"]["resolve_s_median"]
    ctx.results["storm_group_p50_ms_kernel"] = out["kernel"]["per_group_p50_ms"]
    ctx.results["storm_group_max_ms_kernel"] = out["kernel"]["per_group_max_ms"]
    if "oomguard" in runs:
        ctx.results["storm_resolve_s"] = out["oomguard"]["resolve_s_median"]
        ctx.results["storm_group_p50_ms"] = out["oomguard"]["per_group_p50_ms"]
        ctx.results["storm_group_max_ms"] = out["oomguard"]["per_group_max_ms"]
        ctx.results["storm_vs_kernel_ratio"] = ratio(ctx.results["storm_resolve_s"],
                                                     ctx.results["storm_resolve_s_kernel"])
        lost = [r.get("lost_events") for r in runs["oomguard"]]
        ctx.results["storm_lost_events"] = (
            None if any(x is None for x in lost) else sum(lost))  # type: ignore[misc]
        ctx.results["storm_kernel_kills_under_oomguard"] = sum(
            r.get("kernel_kills", 0) for r in runs["oomguard"])


def run_storm_once(ctx: Context, groups: list[MemoryCgroup], observers: list[OomNotifier],
                   mode: str, rep: int) -> dict[str, Any]:
    for g, obs in zip(groups, observers, strict=True):
        g.set_limit(STORM_LIMIT)
        if mode == "kernel":
            g.set_oom_kill_disable(False)
        obs.read()
    kills_before = [g.oom_state().oom_kill for g in groups]
    daemon = None
    res: dict[str, Any] = {}
    if mode == "oomguard":
        rules = rule_toml("bench-storm", ctx.run.relpath + "/storm/*", ["hold", "kill"])
        daemon = Daemon(ctx, f"storm-{rep}", rules, profile=ctx.args.profile)
        daemon.start()
        try:
            secs, _ = daemon.wait_watching(len(groups))
            res["daemon_startup_s"] = round(secs, 3)
        except RuntimeError as exc:
            ctx.error(f"storm: {exc}")
            daemon.stop()
            return {"error": str(exc)}
    r_fd, w_fd = os.pipe()
    hogs = []
    try:
        for g in groups:
            hogs.append(spawn_hog(g, MiB, 0, "stamps", source=STORM_HOG, stdin=r_fd))
    finally:
        os.close(r_fd)
    readers = [LineReader(h.stdout) for h in hogs]
    for h, rd in zip(hogs, readers, strict=True):
        if rd.readline(60) != b"r":
            ctx.error(f"storm: hog {h.pid} not ready")
    t_go = time.monotonic_ns()
    os.close(w_fd)  # every hog's read(1) returns at once: go
    ep = select.epoll()
    pidfds = {}
    for idx, h in enumerate(hogs):
        fd = os.pidfd_open(h.pid)
        pidfds[fd] = idx
        ep.register(fd, select.EPOLLIN)
    t_exit: dict[int, int] = {}
    deadline = time.monotonic() + 120
    while len(t_exit) < len(hogs) and time.monotonic() < deadline:
        for fd, _ in ep.poll(max(0.0, deadline - time.monotonic())):
            idx = pidfds[fd]
            if idx in t_exit:
                continue
            _, status = os.waitpid(hogs[idx].pid, 0)
            t_exit[idx] = time.monotonic_ns()
            hogs[idx].returncode = os.waitstatus_to_exitcode(status)
            ep.unregister(fd)
    unresolved = [i for i in range(len(hogs)) if i not in t_exit]
    if unresolved:
        ctx.error(f"storm {mode}: {len(unresolved)} hogs not resolved in 120 s; released")
        for i in unresolved:
            release(groups[i])
            kill_by_pidfd(hogs[i])
            reap(hogs[i], 30)
    t_done, after_oom, oom_at = [], [], []
    for i, g in enumerate(groups):
        t_clear = wait_oom_clear(g) if under_oom(g) else None
        if i in t_exit:
            t_done.append(max(t_exit[i], t_clear or 0))
            rest = [*readers[i].drain(), readers[i].buf]
            stamps = [int(x) for x in rest if x.isdigit()]
            if stamps:
                oom_at.append((stamps[-1] - t_go) / 1e9)
                after_oom.append((t_done[-1] - stamps[-1]) / 1e6)
    for fd in pidfds:
        os.close(fd)
    ep.close()
    for h in hogs:
        if h.stdout is not None:
            h.stdout.close()
    if daemon is not None:  # let the incidents close (settle) before SIGTERM
        t_wait = time.monotonic()
        for g in groups:
            daemon.wait_closed(g.relpath, 1, t_wait)
    counts = [obs.read().count for obs in observers]
    kills = [g.oom_state().oom_kill - b for g, b in zip(groups, kills_before, strict=True)]
    oomed = [i for i, c in enumerate(counts) if c > 0 or kills[i] > 0]
    per_group = sorted((t - t_go) / 1e9 for t in t_done)
    res.update({
        "resolve_s": round(per_group[-1], 4) if per_group and not unresolved else None,
        "resolve_s_p50": round(pct(per_group, 50) or 0, 4),
        "last_oom_at_s": round(max(oom_at), 4) if oom_at else None,
        "first_oom_at_s": round(min(oom_at), 4) if oom_at else None,
        "per_group_ms": summary(after_oom, 3) if after_oom else None,
        "unresolved": len(unresolved),
        "groups_oomed": len(oomed),
        "kernel_kills": sum(kills),
        "killed_by_sigkill": sum(1 for h in hogs if h.returncode == -signal.SIGKILL),
        "eventfd_counts": collections.Counter(counts).most_common(),
    })
    if daemon is not None:
        code = daemon.stop()
        res["daemon_exit_code"] = code
        try:
            incidents = daemon.incidents()
            paths = {g.relpath: i for i, g in enumerate(groups)}
            per = collections.Counter()
            for inc in incidents:
                cg = str(inc.get("cgroup", ""))
                cg = "/" + cg.strip("/") if not cg.startswith(str(ctx.hier.memory.mount_point)) \
                    else "/" + os.path.relpath(cg, ctx.hier.memory.mount_point)  # type: ignore[union-attr]
                if cg in paths:
                    per[paths[cg]] += 1
            res["incidents"] = sum(per.values())
            res["groups_with_incident"] = len(per)
            res["outcomes"] = collections.Counter(
                str(inc.get("outcome")) for inc in incidents).most_common()
            res["lost_events"] = sum(1 for i in oomed if per[i] == 0)
            lat = [inc.get("latency_ms") for inc in incidents
                   if isinstance(inc.get("latency_ms"), (int, float))]
            if lat:
                res["incident_latency_ms_p50"] = pct(lat, 50)
                res["incident_latency_ms_max"] = max(lat)
        except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
            ctx.error(f"storm: oomguard events: {exc}")
        if daemon.profile is not None and daemon.profile.exists():
            res["profile"] = profile_text(daemon.profile)
    pg = res.get("per_group_ms") or {}
    log(f"  storm {mode}: OOMs from {res['first_oom_at_s']} to {res['last_oom_at_s']} s; "
        f"each resolved (last stamp -> reaped) p50 {pg.get('median_ms')} max "
        f"{pg.get('max_ms')} ms")
    log(f"  storm {mode}: all resolved in {res['resolve_s']} s (p50 {res['resolve_s_p50']} s), "
        f"oomed {res['groups_oomed']}, kernel kills {res['kernel_kills']}"
        + (f", incidents {res.get('incidents')}, lost {res.get('lost_events')}"
           if daemon else ""))
    return res


# -- targets ---------------------------------------------------------------------------------
TARGETS: list[tuple[str, str, float, Callable[[float, float], bool]]] = [
    ("default_kill_vs_kernel_ratio", "<=", 0.8, lambda v, t: v <= t),
    ("default_kill_vs_kernel_ratio_daemon", "<=", 0.8, lambda v, t: v <= t),
    ("default_grow_stall_ms", "<=", 1.0, lambda v, t: v <= t),
    ("kill_vs_kernel_ratio", "<=", 0.6, lambda v, t: v <= t),
    ("kill_vs_bare_ratio", "<=", 1.2, lambda v, t: v <= t),
    ("grow_median_ms", "<=", 1.0, lambda v, t: v <= t),
    ("notify_p99_ratio_10000_vs_1", "<=", 1.5, lambda v, t: v <= t),
    ("idle_wakeups_per_s", "==", 0.0, lambda v, t: v == t),
    ("rss_mb_1000", "<=", 25.0, lambda v, t: v <= t),
    ("startup_s_10000", "<=", 5.0, lambda v, t: v <= t),
    ("storm_lost_events", "==", 0, lambda v, t: v == t),
]


def judge(results: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, op, target, ok in TARGETS:
        v = results.get(name)
        out[name] = {"target": f"{op} {target:g}", "value": v,
                     "met": None if v is None else bool(ok(v, target))}
    fit = results.get("footprint_max_watched")
    if results.get("startup_s_10000") is None and fit is not None:
        out["startup_s_10000"].update(
            met=False, note=f"could not watch 10,000: {results.get('footprint_10000_error')}; "
            f"start-up at {fit:,}: {results.get(f'startup_s_{fit}')} s")
    return out


def cpu_times() -> tuple[int, int, int]:
    """(busy, total) jiffies of the whole machine, and this process tree's own jiffies."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + vals[4]
    t = os.times()
    own = int((t.user + t.system + t.children_user + t.children_system)
              * os.sysconf("SC_CLK_TCK"))
    return sum(vals) - idle, sum(vals), own


def other_busy(start: tuple[int, int, int], _t0: float) -> float | None:
    """Share of the machine's CPU time used by anything but this bench and its children
    (other sessions' tests, VMs) while the bench ran: a noise indicator."""
    busy1, total1, own1 = cpu_times()
    total = total1 - start[1]
    if total <= 0:
        return None
    return round(max(0, (busy1 - start[0]) - (own1 - start[2])) / total, 3)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "mem_total_mb": meminfo()["MemTotal"] // MiB,
        "swap_total_mb": meminfo().get("SwapTotal", 0) // MiB,
    }
    with contextlib.suppress(OSError):
        info["nofile_limit"] = list(__import__("resource").getrlimit(
            __import__("resource").RLIMIT_NOFILE))
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["oomguard_commit"] = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=False).stdout.strip()
    return info


# -- main ------------------------------------------------------------------------------------
def parse_args(argv_: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="fewer iterations, 15 s idle window, no repeats (under 5 minutes)")
    p.add_argument("--json", metavar="FILE", help="write every figure here "
                   "(default bench/results/results.json, or results-quick.json with --quick)")
    p.add_argument("--plots", metavar="DIR", default=str(HERE / "results"),
                   help="write the PNG plots here (default bench/results); '' for none")
    p.add_argument("--only", metavar="LIST", default=",".join(SCENARIOS),
                   help=f"comma-separated subset of: {', '.join(SCENARIOS)}")
    p.add_argument("--n", type=int, help="iterations per mode at 64 MiB (default 30; quick 10)")
    p.add_argument("--n-defaults", type=int,
                   help="iterations per mode of the defaults scenario (default 30; quick 8)")
    p.add_argument("--n-1g", type=int, help="iterations per mode at 1 GiB (default 30; quick 3)")
    p.add_argument("--n-notify", type=int, help="iterations per size (default 100; quick 20)")
    p.add_argument("--idle-s", type=float, help="idle window (default 60 s; quick 15 s)")
    p.add_argument("--watched", type=int, default=10000,
                   help="largest number of watched cgroups (default 10000)")
    p.add_argument("--storm-groups", type=int, default=100)
    p.add_argument("--profile", action="store_true",
                   help="run the daemon under cProfile in the resolution and storm scenarios "
                   "and put the top of the profile in the JSON")
    p.add_argument("--trace", action="store_true",
                   help="run the resolution daemon under bench/trace_daemon.py and put a "
                   "timeline of its hot path in the JSON (resolution.oomguard_trace)")
    p.add_argument("--alt-src", metavar="DIR",
                   help="defaults: also run `run`, the daemon and `run --grow` with oomguard "
                        "imported from DIR (PYTHONPATH), interleaved with the others: A/B "
                        "of two versions in one run (modes *_alt)")
    p.add_argument("--keep-tmp", action="store_true", help="keep daemon logs and journals")
    return p.parse_args(argv_)


def main(argv_: Sequence[str] | None = None) -> int:
    args = parse_args(argv_)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = set(only) - set(SCENARIOS)
    if bad:
        raise SystemExit(f"bench/run: unknown scenario(s): {', '.join(sorted(bad))}")
    if os.geteuid() != 0:
        raise SystemExit("bench/run: must run as root (it makes memory cgroups)")
    json_path = Path(args.json) if args.json else HERE / "results" / (
        "results-quick.json" if args.quick else "results.json")

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    started = time.monotonic()
    load_start = os.getloadavg()
    cpu_start = cpu_times()
    ctx = Context(args)
    status = 0
    try:
        log(f"bench: {'quick' if args.quick else 'full'} run in {ctx.run.relpath}; "
            f"oomguard daemon {'available' if ctx.oomguard_ok else 'NOT available'}")
        if "defaults" in only:
            import defaults  # bench/defaults.py, beside this file
            defaults.scenario_defaults(sys.modules[__name__], ctx)
        if "resolution" in only:
            scenario_resolution(ctx)
        many = None
        count = args.watched
        if {"notify", "idle", "footprint"} & set(only):
            many = make_many(ctx, count)
        if "notify" in only and many is not None:
            scenario_notify(ctx, many, count)
        if ({"idle", "footprint"} & set(only)) and many is not None:
            if ctx.oomguard_ok:
                scenario_footprint(ctx, many, count, "idle" in only, "footprint" in only)
            else:
                ctx.error("idle/footprint skipped: the oomguard daemon is not available")
        if "storm" in only:
            scenario_storm(ctx)
    except KeyboardInterrupt as exc:
        ctx.error(f"interrupted: {exc}")
        status = 130
    except Exception as exc:
        import traceback
        traceback.print_exc()
        ctx.error(f"failed: {type(exc).__name__}: {exc}")
        status = 1
    finally:
        ctx.close()
    results = ctx.results
    results["targets"] = judge(results)
    results["meta"] = {
        "quick": args.quick,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "other_cpu_busy": other_busy(cpu_start, started),
        "scenarios": only,
        "duration_s": round(time.monotonic() - started, 1),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "oomguard_daemon": ctx.oomguard_ok,
        "command": "bench/run " + " ".join(sys.argv[1:] if argv_ is None else argv_),
    }
    results["errors"] = ctx.errors
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    log(f"wrote {json_path}")
    if args.plots:
        try:
            from plots import make_plots  # bench/plots.py, beside this file
            for f in make_plots(results, Path(args.plots), suffix="-quick" if args.quick else ""):
                log(f"wrote {f}")
        except ModuleNotFoundError as exc:
            log(f"no plots: {exc} (pip install -e '.[bench]')")
    log(f"done in {results['meta']['duration_s']} s")
    for name, t in results["targets"].items():
        log(f"  target {name:30s} {t['target']:8s} value {t['value']!s:10s} met {t['met']}")
    return status


if __name__ == "__main__":
    sys.exit(main())
