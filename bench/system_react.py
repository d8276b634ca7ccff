"""System mode's reaction: from the wake-up that finds memory at the level to the signal.

Issue 12's target is "act within 10 ms of the PSI trigger". In the VM everything is
emulated (TCG: every syscall ~10-50x slower), so this measures the same code path on the
host, on real hardware, without any global memory pressure (forbidden on the host):

- a fake /proc/meminfo (the only thing made up): total 1 GB, SIGTERM level 100 MB;
- the host's real /proc, with --procs extra sleeping processes started in a memcg of the
  bench's own (a desktop has 300-500 processes; each `sleep` holds ~1 MiB, each under a
  name of its own: 300 young `sleep`s would be a swarm), and a grower
  (the leaker: 8 MiB, then 40 MiB, on command) in another;
- `SystemMonitor.check()` with the defaults in dry run: the wake's whole path (read
  meminfo, open the incident, the snapshot step's look, ranking, the swarm check, the
  pidfd opened and checked) up to the kill's first signal, where the dry run stops (the
  one thing not done is the pidfd_send_signal syscall itself). Two ways, interleaved:
  - `ahead`: as memory runs short, as in the daemon: two checks near the level (the
    monitor's growth samples, a look at every process each) while the grower grows 8
    MiB; then it grows 40 MiB, memory falls by as much past the level, and the timed
    check ranks on the look taken ahead (SystemGroup.ready_look);
  - `cold`: the level reached with no look ahead (every process read at the event);
- beside them, in the same run, a bare minimal handler: pread meminfo, list /proc, read
  each pid's stat and oom_score_adj, pick the largest RSS, pidfd_open it.

The PSI wake itself (epoll_wait returning, the loop's dispatch) is in none of the figures
(tens of microseconds; bench/notify_probe.py measures that kind of wake).

    bench/system_react.py [--procs 300] [--reps 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from oomguard.cgroup import discover  # noqa: E402
from oomguard.cgroup.transient import clean_stale, destroy, ensure_parent, new_group  # noqa: E402
from oomguard.procs import spawn_in  # noqa: E402
from oomguard.workloads import GROWER  # noqa: E402

BENCH_PARENT = "/oomguard-bench"
MEMINFO = """MemTotal:        1000000 kB
MemFree:           80000 kB
MemAvailable:      {avail} kB
Buffers:               0 kB
Cached:            10000 kB
SwapTotal:             0 kB
SwapFree:              0 kB
"""


MiB = 1 << 20
LEVEL_KB = 100000  # 10% of the fake MemTotal


def write_meminfo(path: Path, avail_kb: int) -> None:
    path.write_text(MEMINFO.format(avail=avail_kb))


def grow(proc: subprocess.Popen[bytes], mib: int) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(f"{mib}\n".encode())
    proc.stdin.flush()
    if proc.stdout.readline() != b"ok\n":
        raise SystemExit("system_react: the grower died")


def oomguard_once(tmp: Path, meminfo: Path,
                  grower: subprocess.Popen[bytes] | None) -> tuple[float, bool]:
    """ms from check() to the kill's first signal (dry run: raised there, not sent), and
    whether the incident ranked on the look taken ahead. With `grower`: memory runs
    short first, as in the daemon (see the module's docstring)."""
    from oomguard.engine import Engine
    from oomguard.events.loop import EventLoop
    from oomguard.journal import Journal
    from oomguard.obs.log import DecisionLog
    from oomguard.policy.system import SystemSpec
    from oomguard.steps import context
    from oomguard.system import SystemMonitor

    stamps: list[float] = []
    original = context.DryEffects.signal

    def stamped(self: context.DryEffects, pfd: Any, sig: int, *, what: str = "") -> bool:
        stamps.append(time.perf_counter())
        return original(self, pfd, sig, what=what)

    context.DryEffects.signal = stamped  # type: ignore[method-assign]
    loop = EventLoop()
    journal = Journal(tmp / "j.db")
    engine = Engine(loop, journal, discover(), DecisionLog(io.StringIO(), "text"))
    near = LEVEL_KB + 30 * 1024  # within twice the level: the monitor samples
    write_meminfo(meminfo, near if grower is not None else LEVEL_KB - 10000)
    mon = SystemMonitor(engine, SystemSpec(dry_run=True), str(meminfo), str(tmp / "nopsi"))
    ahead = [False]
    real_ready = mon.group.ready_look

    def ready() -> Any:
        look = real_ready()
        ahead[0] = look is not None
        return look

    mon.group.ready_look = ready  # type: ignore[method-assign]
    try:
        if grower is not None:
            mon.check()  # two growth samples while memory is short
            grow(grower, 8)
            mon._sampled = 0.0
            mon.check()
            grow(grower, 40)
            write_meminfo(meminfo, near - 40 * 1024)  # past the level by what it took
        t0 = time.perf_counter()
        mon.check()
        if not stamps:
            raise SystemExit("system_react: the kill step never reached its signal")
        return (stamps[0] - t0) * 1000.0, ahead[0]
    finally:
        context.DryEffects.signal = original  # type: ignore[method-assign]
        mon.close()
        engine.shutdown()
        journal.close()
        loop.close()
        (tmp / "j.db").unlink(missing_ok=True)


def bare_once(meminfo: Path) -> float:
    """A minimal handler's same path: meminfo, every pid's stat and oom_score_adj, the
    largest RSS (kernel threads and -1000 left out), its pidfd."""
    t0 = time.perf_counter()
    fd = os.open(meminfo, os.O_RDONLY)
    os.pread(fd, 4096, 0)
    os.close(fd)
    best, best_rss = 0, -1
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{name}/oom_score_adj", "rb") as f:
                adj = int(f.read())
        except (OSError, ValueError):
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if int(fields[6]) & 0x00200000 or adj == -1000:  # PF_KTHREAD
            continue
        rss = int(fields[21])
        if rss > best_rss:
            best, best_rss = int(name), rss
    try:
        os.close(os.pidfd_open(best))
    except OSError:
        pass
    return (time.perf_counter() - t0) * 1000.0


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--procs", type=int, default=300, help="extra sleeping processes")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    hier = discover()
    parent = ensure_parent(hier, BENCH_PARENT)
    clean_stale(parent)
    sleepers_group = new_group(parent, "react")
    sleepers_group.set_limit(1 << 30)  # ~1 MiB each; nothing allocates on purpose
    grower_group = new_group(parent, "react", "grower")
    grower_group.set_limit(256 * MiB)  # the grower takes 48 MiB (and Python's own)
    sleepers: list[subprocess.Popen[bytes]] = []
    results: dict[str, list[float]] = {"ahead": [], "cold": [], "bare": []}
    used_ahead = 0
    tmp = Path(tempfile.mkdtemp(prefix="oomguard-react-"))
    try:
        sleep = shutil.which("sleep") or "/bin/sleep"
        for i in range(args.procs):
            # Each under a name of its own, as a desktop's processes are: 300 young
            # `sleep`s in one cgroup are a swarm (policy/swarm.py), a fork bomb's shape,
            # and the cold figure would time killing them all.
            name = tmp / f"sleeper{i}"
            name.symlink_to(sleep)
            sleepers.append(spawn_in([sleepers_group.path], [str(name), "600"]))
        time.sleep(0.5)
        meminfo = tmp / "meminfo"
        nprocs = sum(1 for n in os.listdir("/proc") if n.isdigit())
        oomguard_once(tmp, meminfo, None)  # warm: imports, first reads
        for _ in range(args.reps):  # interleaved
            grower = spawn_in([grower_group.path], [sys.executable, "-c", GROWER],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            try:
                assert grower.stdout is not None
                if grower.stdout.readline() != b"ready\n":
                    raise SystemExit("system_react: the grower did not start")
                ms, ahead = oomguard_once(tmp, meminfo, grower)
            finally:
                grower.kill()
                grower.wait()
            results["ahead"].append(ms)
            used_ahead += ahead
            results["cold"].append(oomguard_once(tmp, meminfo, None)[0])
            write_meminfo(meminfo, LEVEL_KB - 10000)
            results["bare"].append(bare_once(meminfo))
    finally:
        destroy(grower_group)
        destroy(sleepers_group)
        shutil.rmtree(tmp, ignore_errors=True)

    def p95(xs: list[float]) -> float:
        return sorted(xs)[max(0, round(0.95 * len(xs)) - 1)]

    med = {k: statistics.median(v) for k, v in results.items()}
    result: dict[str, Any] = {
        "what": "system mode: the wake-up that finds the level -> the kill's first signal "
                "(host, real /proc, fake meminfo, defaults, dry run stops at the signal)",
        "pids_in_proc": nprocs, "reps": args.reps,
        "ahead_used": f"{used_ahead}/{args.reps}",
        **{f"{k}_ms_median": round(v, 2) for k, v in med.items()},
        **{f"{k}_ms_p95": round(p95(v), 2) for k, v in results.items()},
        "ahead_vs_bare": round(med["ahead"] / med["bare"], 2),
        "cold_vs_bare": round(med["cold"] / med["bare"], 2),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
