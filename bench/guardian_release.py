"""How long after the handler's death the guardian has released every hold, per stage.

For each crash stage of tests/test_fault_injection.py (STAGES), N times: a real
`oomguard daemon` adopts a fresh 64 MiB group (under /oomguard-bench), an 8 MiB service
and a leaker start in it, the daemon SIGKILLs itself at the stage (OOMGUARD_CRASH_AT; the
`exec-running` stage is killed by this script while the exec step's command runs), and
the time from the daemon's pidfd turning readable to the kernel files saying "nothing
held" (killer on, nothing stopped or frozen, limits back; polled every 1 ms) is recorded.
Prints a table (median, p95, max per stage, ms) and the JSON; `--json FILE` keeps it.

    .venv/bin/python bench/guardian_release.py [-n 5] [--stage change:limit ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the crash driver is the suite's own

from oomguard.cgroup import MemoryCgroup, discover  # noqa: E402
from oomguard.cgroup.transient import clean_stale, destroy, ensure_parent, new_group  # noqa: E402
from oomguard.procs import spawn_in  # noqa: E402
from oomguard.workloads import argv  # noqa: E402
from test_fault_injection import STAGES, crash_and_measure  # noqa: E402

from conftest import Daemon  # noqa: E402

MiB = 1 << 20
PARENT = "/oomguard-bench"


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def one(parent: MemoryCgroup, stage: str, workdir: Path, rep: int) -> float:
    group = new_group(parent, "g", suffix=f"{stage.replace(':', '_')}-{rep}")
    group.set_limits(64 * MiB, 64 * MiB if group.version == 1 else None)
    started: list[subprocess.Popen[bytes]] = []
    daemons: list[Daemon] = []

    def spawn(source: str, *args: object, **_: object) -> subprocess.Popen[bytes]:
        dirs = [group.path]
        if group.version == 1 and group.hierarchies.freezer_v1 is not None:
            dirs.append(group.ensure_freezer())  # type: ignore[attr-defined]
        proc = spawn_in(dirs, argv(source, *args), stdout=subprocess.PIPE)
        started.append(proc)
        return proc

    def start_daemon(text: str, env: dict[str, str] | None = None) -> Daemon:
        run = workdir / f"{stage.replace(':', '_')}-{rep}"
        run.mkdir()
        (run / "policy.toml").write_text(text)
        d = Daemon(run / "policy.toml", run / "journal.db", env=env)
        daemons.append(d)
        d.wait_for("watching")
        return d

    try:
        return crash_and_measure(group, spawn, start_daemon, stage).release_ms
    finally:
        for d in daemons:
            d.stop()
        destroy(group)  # kills what is left of the service and leaker, by pidfd
        for proc in started:
            proc.wait(timeout=30)
            if proc.stdout:
                proc.stdout.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=5, help="runs per stage (default 5)")
    ap.add_argument("--stage", action="append", choices=list(STAGES),
                    help="only these stages (default: all)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("guardian_release: needs root (it makes memory cgroups)", file=sys.stderr)
        return 2
    hier = discover()
    parent = ensure_parent(hier, PARENT)
    clean_stale(parent)
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="oomguard-guardian-") as tmp:
        for stage in args.stage or list(STAGES):
            samples[stage] = [one(parent, stage, Path(tmp), rep) for rep in range(args.n)]
            print(f"# {stage}: {', '.join(f'{x:.1f}' for x in samples[stage])}",
                  file=sys.stderr)
    rows: dict[str, Any] = {
        stage: {"n": len(xs), "median_ms": round(pct(xs, 0.5), 2),
                "p95_ms": round(pct(xs, 0.95), 2), "max_ms": round(max(xs), 2),
                "samples_ms": [round(x, 2) for x in xs]}
        for stage, xs in samples.items()}
    result = {"what": "handler SIGKILL -> every hold released (kernel files, 1 ms poll)",
              "cgroup_version": hier.memory_version, "kernel": platform.release(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stages": rows}
    print("| stage | n | median ms | p95 ms | max ms |\n|---|---|---|---|---|")
    for stage, r in rows.items():
        print(f"| {stage} | {r['n']} | {r['median_ms']} | {r['p95_ms']} | {r['max_ms']} |")
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
