"""Scenario `defaults`: what a user gets, next to the kernel's own killer, in one run.

Modes, rotated every iteration (one 64 MiB group each):

  kernel     the group's own OOM killer (oom_kill_disable=0)
  run        `oomguard run --memory 64M -- HOG` (its default steps)
  daemon     `oomguard daemon` with examples/policy.toml, its catch-all rule pointed at the group
  run_grow   `oomguard run --memory 64M --grow 64M --grow-max 256M -- HOG` (HOG stops at 96 MiB)

The hog stamps CLOCK_MONOTONIC before each 64 KiB it touches, into a FIFO only it holds
(so `oomguard run`, its parent, cannot keep the pipe open). The kill latency is its last
stamp -> its pidfd turning readable (exit), the same clock and the same wait in every mode.
The grow figure is the longest gap between two stamps of the grow run: how long the
allocating task stood still while oomguard saw the OOM and raised the limit.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import itertools
import json
import os
import re
import select
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oomguard.cgroup import MemoryCgroup
from oomguard.errors import CgroupError
from oomguard.procs import spawn_in

MiB = 1 << 20
STEP = 64 << 10
F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20  # every stamp of a run fits: nobody reads while the hog runs
MODES = ("kernel", "kernel_fresh", "run", "daemon", "run_grow")
ALT_MODES = ("run_alt", "daemon_alt", "run_grow_alt")  # with --alt-src: another version
RUN_GROW_TOTAL = 96 * MiB

# Writes its pid, then a stamp before each STEP it touches; stops at TOTAL (0: never).
HOG = r"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY)
step, total = int(sys.argv[2]), int(sys.argv[3])
os.write(fd, b"pid %d\n" % os.getpid())
page, chunks, used = b"\x01" * (step // 4096), [], 0
while not total or used < total:
    os.write(fd, b"%d\n" % time.monotonic_ns())
    b = bytearray(step)
    b[::4096] = page
    chunks.append(b)
    used += step
os.write(fd, b"done\n")
"""

CATCH_ALL = re.compile(r'^match = "/\*\*"$', re.M)


def example_policy(root: Path, relpath: str) -> str:
    """examples/policy.toml with its catch-all rule matched to `relpath` only."""
    text = (root / "examples" / "policy.toml").read_text()
    text, n = CATCH_ALL.subn(f'match = "{relpath}"', text)
    if n != 1:
        raise RuntimeError("examples/policy.toml: no single catch-all `match = \"/**\"` line")
    return text


class Fifo:
    """A FIFO the hog opens for writing; read only after the hog exited."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.mkfifo(path, 0o600)
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.fd, F_SETPIPE_SZ, PIPE_SIZE)
        self.buf = b""

    def read_some(self, timeout: float) -> bool:
        """Wait up to `timeout` for data; False at EOF or timeout."""
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        if not p.poll(int(timeout * 1000)):
            return False
        try:
            data = os.read(self.fd, 1 << 20)
        except BlockingIOError:
            return True
        self.buf += data
        return bool(data)

    def pid(self, timeout: float, parent: subprocess.Popen[bytes] | None = None) -> int | None:
        """The hog's pid, its first line; None on timeout or if `parent` (`oomguard run`)
        exited first (it could not start the hog)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or (parent is not None and parent.poll() is not None):
                return None
            self.read_some(min(left, 0.1))
        first = self.buf.split(b"\n", 1)[0]
        return int(first.split()[1]) if first.startswith(b"pid ") else None

    def rest(self) -> tuple[list[int], bool]:
        """Every stamp and whether the hog said done (the writer is gone: read to EOF)."""
        with contextlib.suppress(BlockingIOError):
            while True:
                data = os.read(self.fd, 1 << 20)
                if not data:
                    break
                self.buf += data
        lines = self.buf.split(b"\n")
        return [int(x) for x in lines if x.isdigit()], b"done" in lines

    def close(self) -> None:
        os.close(self.fd)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def journal_rows(journal: Path, sql: str) -> list[Any]:
    """Rows of a run's journal, read-only; [] when it cannot be read (yet)."""
    try:
        db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return []


def signal_times(journal: Path) -> list[int]:
    """The journal's kills, oldest first: when each first signal went out (monotonic ns,
    the stamps' clock), from the kill step's row. Not "exit - the journal's signal ->
    exit": that exit is when the loop saw it, later by any process_mrelease it ran."""
    rows = journal_rows(journal, "SELECT after_json FROM steps WHERE kind = 'kill' AND "
                        "result = 'killed' ORDER BY id")
    out = []
    for (after,) in rows:
        mono = json.loads(after or "{}").get("first_signal_mono")
        if mono is not None:
            out.append(int(float(mono) * 1e9))
    return out


def grow_gap(journal: Path, stamps: list[int]) -> int | None:
    """Index of the gap between stamps that holds the grow step's start (the journal's
    monotonic clock is the stamps' clock): the stall that the OOM and the raise caused,
    as opposed to the kernel's reclaim just before the OOM, which any handler sees."""
    rows = journal_rows(journal, "SELECT started_mono FROM steps WHERE kind = 'grow'")
    for (mono,) in rows:
        t = int(float(mono) * 1e9)
        if stamps[0] < t < stamps[-1]:
            return bisect.bisect_left(stamps, t) - 1
    return None


def alt_env(ctx: Any) -> dict[str, str]:
    """The environment of the *_alt modes: oomguard imported from --alt-src first."""
    return {**os.environ, "PYTHONPATH": str(Path(ctx.args.alt_src).resolve())}


def _tail(path: Path, n: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _exit_time(pid: int, timeout: float) -> int | None:
    """monotonic ns when the process's pidfd turns readable (it exited)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    try:
        p = select.poll()
        p.register(fd, select.POLLIN)
        if not p.poll(int(timeout * 1000)):
            return None
        return time.monotonic_ns()
    finally:
        os.close(fd)


def once(h: Any, ctx: Any, mode: str, group: MemoryCgroup | None, i: int,
         daemon: Any) -> dict[str, Any]:
    """One hog, one mode: {"latency_ms"} (kill modes) or {"stall_ms"} (run_grow)."""
    fifo = Fifo(ctx.tmp / f"defaults-{mode}-{i}.fifo")
    alt = mode.endswith("_alt")
    env = alt_env(ctx) if alt else None
    full_mode, mode = mode, mode.removesuffix("_alt")
    total = RUN_GROW_TOTAL if mode == "run_grow" else 0
    hog_argv = [h.PY, "-c", HOG, str(fifo.path), str(STEP), str(total)]
    out: dict[str, Any] = {"mode": full_mode, "iter": i}
    runner = None
    try:
        if mode in ("kernel", "kernel_fresh", "daemon"):
            assert group is not None
            proc = ctx.procs.add(spawn_in([group.path], hog_argv, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        else:
            grow = ["--grow", "64M", "--grow-max", "256M"] if mode == "run_grow" else []
            cmd = [h.OOMGUARD, "run", "--memory", "64M", *grow,
                   "--journal", str(ctx.tmp / f"defaults-{full_mode}.db"), "--", *hog_argv]
            runner = ctx.procs.add(subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env,
                stderr=open(ctx.tmp / f"defaults-{full_mode}.log", "ab")))  # noqa: SIM115
            proc = None
        pid = fifo.pid(60, runner)
        if pid is None:
            out["error"] = "hog did not start" + (
                f" (oomguard run exited {runner.returncode}: "
                f"{_tail(ctx.tmp / f'defaults-{full_mode}.log')})" if runner is not None
                and runner.returncode is not None else "")
            return out
        t_exit = _exit_time(pid, 20)
        stamps, done = fifo.rest()
        if t_exit is None:
            out["error"] = "hog not resolved within 20 s"
            return out
        if proc is not None:
            out["status"] = proc.wait(timeout=20)
            ctx.procs.procs.remove(proc)
        if runner is not None:
            out["status"] = runner.wait(timeout=30)
            ctx.procs.procs.remove(runner)
        out["stamps"] = len(stamps)
        if mode == "run_grow":
            gaps = [(b - a) / 1e6 for a, b in itertools.pairwise(stamps)]
            if not done or not gaps:
                out["error"] = f"grow hog did not finish (status {out.get('status')})"
                return out
            out["stall_ms"] = max(gaps)
            out["median_gap_ms"] = sorted(gaps)[len(gaps) // 2]
            at = grow_gap(ctx.tmp / f"defaults-{full_mode}.db", stamps)
            if at is not None:
                out["oom_stall_ms"] = gaps[at]
                out["longest_is_oom"] = gaps[at] == out["stall_ms"]
        else:
            if done or not stamps:
                out["error"] = f"hog was not killed (status {out.get('status')})"
                return out
            out["latency_ms"] = (t_exit - stamps[-1]) / 1e6
            out["last_stamp_ns"] = stamps[-1]
            if mode == "run":  # oomguard's own part: the hog's last stamp -> the signal
                sent = signal_times(ctx.tmp / f"defaults-{full_mode}.db")
                if sent:
                    out["to_signal_ms"] = (sent[-1] - stamps[-1]) / 1e6
        return out
    finally:
        fifo.close()
        for p in (runner,):
            if p is not None and p.returncode is None:
                ctx.procs.stop(p)


@dataclass
class DaemonMode:
    """A daemon mode (daemon, daemon_alt): its daemon, its group, and the hogs it was given
    (how many, when the last ended), so that each hog waits for the last incident's close."""

    daemon: Any
    group: MemoryCgroup
    ran: int = 0
    last: float = 0.0

    def wait_closed(self) -> None:
        self.daemon.wait_closed(self.group.relpath, self.ran, self.last)

    def one_more(self) -> None:
        self.ran += 1
        self.last = time.monotonic()


def start_daemon(h: Any, ctx: Any, mode: str, env: dict[str, str] | None = None,
                 trace: bool = False) -> DaemonMode | None:
    """`mode`'s daemon with examples/policy.toml pointed at a 64 MiB group of its own,
    watching; None (an error said) if it does not get there."""
    group = ctx.group(f"defaults/{mode}", 64 * MiB)
    daemon = h.Daemon(ctx, "defaults" + mode.removeprefix("daemon"),
                      example_policy(h.ROOT, group.relpath), trace=trace, env=env)
    daemon.start()
    try:
        secs, _ = daemon.wait_watching(1)
    except RuntimeError as exc:
        ctx.error(f"defaults {mode}: {exc}")
        ctx.procs.stop(daemon.proc)
        return None
    h.log(f"defaults: {mode} with examples/policy.toml watching after {secs:.3f} s")
    return DaemonMode(daemon, group)


def scenario_defaults(h: Any, ctx: Any) -> None:
    """h: the harness module (its helpers and statistics); ctx: its Context."""
    n = ctx.args.n_defaults or (8 if ctx.quick else 30)
    kernel_g = ctx.group("defaults/kernel", 64 * MiB)
    kernel_g.set_oom_kill_disable(False)
    modes = list(MODES)
    daemons: dict[str, DaemonMode] = {}
    started = start_daemon(h, ctx, "daemon", trace=ctx.args.trace)
    if started is not None:
        daemons["daemon"] = started
    else:
        modes.remove("daemon")
    if getattr(ctx.args, "alt_src", None):
        modes += list(ALT_MODES)
        started = start_daemon(h, ctx, "daemon_alt", env=alt_env(ctx))
        if started is not None:
            daemons["daemon_alt"] = started
        else:
            modes.remove("daemon_alt")
        h.log(f"defaults: *_alt modes import oomguard from {ctx.args.alt_src}")
    daemon = daemons["daemon"].daemon if "daemon" in daemons else None
    samples: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    h.log(f"defaults: {n} iterations x {len(modes)} modes, interleaved (load "
          f"{os.getloadavg()[0]:.2f})")
    for i in range(n):
        order = modes[i % len(modes):] + modes[: i % len(modes)]
        for mode in order:
            dm = daemons.get(mode)
            if dm is not None:
                dm.wait_closed()
            g = kernel_g if mode == "kernel" else dm.group if dm is not None else None
            if mode == "kernel_fresh":  # a new group, as `run` (or systemd-run) makes one
                g = ctx.group(f"defaults/fresh-{i}", 64 * MiB)
                g.set_oom_kill_disable(False)
            s = once(h, ctx, mode, g, i, daemon)
            if mode == "kernel_fresh" and g is not None:
                with contextlib.suppress(CgroupError):
                    g.remove()
            if dm is not None:
                dm.one_more()
            if "error" in s:
                ctx.error(f"defaults {mode} iter {i}: {s['error']}")
            samples[mode].append(s)
            time.sleep(0.05)
    for mode, dm in daemons.items():
        dm.wait_closed()
        killed = [s for s in samples[mode] if "latency_ms" in s]
        sent = signal_times(dm.daemon.journal)
        if len(sent) == len(killed):  # one victim per hog, in order
            for s, t in zip(killed, sent, strict=True):
                s["to_signal_ms"] = (t - s["last_stamp_ns"]) / 1e6
    out: dict[str, Any] = {"n": n, "step_kib": STEP >> 10, "modes": {}}
    for mode, ss in samples.items():
        grow_mode = mode.startswith("run_grow")
        key = "stall_ms" if grow_mode else "latency_ms"
        st = h.summary([s[key] for s in ss if key in s])
        st["errors"] = sum(1 for s in ss if "error" in s)
        to_signal = [s["to_signal_ms"] for s in ss if "to_signal_ms" in s]
        if to_signal:  # the hog's last stamp -> the kill's first signal
            st["to_signal"] = h.summary(to_signal)
            h.log(f"  defaults {mode:9s} stamp -> signal median "
                  f"{st['to_signal']['median_ms']:.3f} p95 {st['to_signal']['p95_ms']:.3f} ms")
        if grow_mode:
            st["median_gap_ms"] = h.pct([s["median_gap_ms"] for s in ss if "median_gap_ms" in s],
                                        50)
            oom = [s["oom_stall_ms"] for s in ss if "oom_stall_ms" in s]
            st["oom_stall"] = h.summary(oom)
            st["longest_is_oom"] = sum(1 for s in ss if s.get("longest_is_oom"))
        out["modes"][mode] = st
        if st["median_ms"] is not None:
            h.log(f"  defaults {mode:9s} n={st['n']:3d} median {st['median_ms']:.3f} "
                  f"p95 {st['p95_ms']:.3f} max {st['max_ms']:.3f} ms")
        if grow_mode and st["oom_stall"]["median_ms"] is not None:
            o = st["oom_stall"]
            h.log(f"  defaults {'  at OOM':9s} n={o['n']:3d} median {o['median_ms']:.3f} "
                  f"p95 {o['p95_ms']:.3f} max {o['max_ms']:.3f} ms (the gap holding the grow)")
    if "daemon_alt" in daemons:
        daemons["daemon_alt"].wait_closed()
        daemons["daemon_alt"].daemon.stop()
    if getattr(ctx.args, "alt_src", None):
        for m in ALT_MODES:
            base = out["modes"].get(m.removesuffix("_alt"), {}).get("median_ms")
            ctx.results[f"default_{m}_vs_{m.removesuffix('_alt')}_ratio"] = h.ratio(
                out["modes"].get(m, {}).get("median_ms"), base)
        ctx.results["default_run_alt_vs_kernel_ratio"] = h.ratio(
            out["modes"].get("run_alt", {}).get("median_ms"),
            out["modes"].get("kernel", {}).get("median_ms"))
        ctx.results["default_daemon_alt_vs_kernel_ratio"] = h.ratio(
            out["modes"].get("daemon_alt", {}).get("median_ms"),
            out["modes"].get("kernel", {}).get("median_ms"))
    if "daemon" in daemons and daemon is not None:
        daemons["daemon"].wait_closed()
        code = daemon.stop()
        out["daemon_exit_code"] = code
        out["daemon_restored"] = not h.oom_kill_disabled(daemons["daemon"].group)
        if daemon.trace is not None and daemon.trace.exists() and ctx.args.keep_tmp:
            out["daemon_trace_file"] = str(daemon.trace)
    ctx.results["defaults"] = out
    med = {m: out["modes"].get(m, {}).get("median_ms") for m in MODES}
    p95 = {m: out["modes"].get(m, {}).get("p95_ms") for m in MODES}
    ctx.results["default_kernel_median_ms"] = med["kernel"]
    ctx.results["default_run_median_ms"] = med["run"]
    ctx.results["default_daemon_median_ms"] = med["daemon"]
    ctx.results["default_kernel_fresh_median_ms"] = med["kernel_fresh"]
    ctx.results["default_kill_vs_kernel_ratio"] = h.ratio(med["run"], med["kernel"])
    ctx.results["default_kill_vs_fresh_kernel_ratio"] = h.ratio(med["run"], med["kernel_fresh"])
    ctx.results["default_kill_vs_kernel_ratio_daemon"] = h.ratio(med["daemon"], med["kernel"])
    ctx.results["default_kill_vs_kernel_ratio_p95"] = h.ratio(p95["run"], p95["kernel"])
    ctx.results["default_grow_stall_ms"] = med["run_grow"]
    ctx.results["default_grow_stall_ms_p95"] = p95["run_grow"]
    oom_stall = out["modes"].get("run_grow", {}).get("oom_stall", {})
    ctx.results["default_grow_oom_stall_ms"] = oom_stall.get("median_ms")
    ctx.results["default_grow_oom_stall_ms_p95"] = oom_stall.get("p95_ms")
