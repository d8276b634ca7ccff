"""`oomguard demo`: an OOM handled live, start to finish, on this machine.

A memory cgroup with a small limit holds a steady "service" and a leaking
"batch job". When the job hits the limit, the kernel's killer is held off,
oomguard snapshots the group, kills the leaker (the largest by anonymous
memory) and leaves the service alone; then it prints the incident and cleans
up. Nothing allocates outside the group's limit.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from oomguard.cgroup import MemoryCgroup
from oomguard.cgroup.transient import clean_stale, destroy, ensure_own_parent, new_group
from oomguard.cgroup.v1 import V1MemoryCgroup
from oomguard.journal import format_incident_detail
from oomguard.policy import DEFAULT_STEPS, Rule, process_matcher
from oomguard.procs import process_info, spawn_in
from oomguard.session import Session
from oomguard.units import format_size
from oomguard.workloads import run_as

DEMO_PARENT = "/oomguard.demo"
LIMIT = 96 << 20
SERVICE_SIZE = 24 << 20


def _say(out: TextIO, text: str) -> None:
    out.write(f"demo: {text}\n")
    out.flush()


def run_demo(journal_path: str | None = None, out: TextIO = sys.stdout) -> int:
    tmp = None
    if journal_path is None:
        tmp = tempfile.TemporaryDirectory(prefix="oomguard-demo-")
        journal_path = str(Path(tmp.name) / "journal.db")
    session = Session.open(journal_path, log_stream=out)
    parent = ensure_own_parent(session.hier, DEMO_PARENT)
    clean_stale(parent)
    group = new_group(parent, "demo")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        return _demo(session, group, procs, out)
    finally:
        session.close()
        destroy(group)
        for p in procs:
            p.wait()
            if p.stdout:
                p.stdout.close()
        _say(out, f"removed {group.relpath}; nothing left held, stopped or raised")
        if tmp is not None:
            tmp.cleanup()
            _say(out, "the journal and evidence were temporary: oomguard demo --journal PATH "
                      "keeps them (then: oomguard show 1 --journal PATH)")


def _demo(session: Session, group: MemoryCgroup, procs: list[subprocess.Popen[bytes]],
          out: TextIO) -> int:
    engine, loop = session.engine, session.loop
    v = f"cgroup v{group.version}"
    _say(out, f"made memory cgroup {group.relpath} ({v}) with a {format_size(LIMIT)} limit")
    rule = Rule(name="demo", match=group.relpath, memory=LIMIT, grace=0.0, settle=0.3,
                steps=DEFAULT_STEPS,
                protect=(process_matcher(comm="^service$", label="service"),))
    engine.watch(group, rule)
    _say(out, "policy: hold the OOM, snapshot the group, kill the process that grew as "
              "the group filled (the default, auto: else the largest); protect the service")
    dirs = [group.path]
    if isinstance(group, V1MemoryCgroup) and group.hierarchies.freezer_v1 is not None:
        dirs.append(group.ensure_freezer())
    service = spawn_in(dirs, run_as(["steady", str(SERVICE_SIZE)], "service"),
                       stdout=subprocess.PIPE)
    procs.append(service)
    assert service.stdout is not None
    service.stdout.readline()
    before = process_info(service.pid)
    _say(out, f"service  pid {service.pid} running, rss {format_size(before.rss)}")
    job = spawn_in(dirs, run_as(["leak", str(1 << 20), "0", "quiet", "0.004"], "batch-job"),
                   stdout=subprocess.DEVNULL)
    procs.append(job)
    _say(out, f"batch job pid {job.pid} started: it leaks 1M every 4 ms")
    closed: list[int] = []

    def incident_closed(inc: object) -> None:
        closed.append(getattr(inc, "id", 0))
        loop.stop()

    engine.on_incident_closed = incident_closed
    loop.run(deadline=time.monotonic() + 60)
    if not closed:
        _say(out, "no OOM within 60 s (unexpected); giving up")
        return 1
    incident = session.journal.incident(closed[0])
    assert incident is not None
    _say(out, f"the incident as `oomguard show {incident.id}` prints it (\"processes at the "
              "OOM\" is the RFC's ps listing, from the snapshot):")
    out.write("\n" + format_incident_detail(incident) + "\n\n")
    job_status = job.wait(timeout=5)
    alive = service.poll() is None
    after = process_info(service.pid) if alive else None
    _say(out, f"batch job pid {job.pid}: ended by signal {-job_status}"
              if job_status < 0 else f"batch job exited {job_status}")
    if after is not None:
        _say(out, f"service  pid {service.pid}: still running, rss {format_size(after.rss)}, "
                  "untouched")
    else:
        _say(out, "service was killed (unexpected)")
    ok = job_status < 0 and alive
    _say(out, "OK: the leaker was killed and the service survived" if ok else "FAILED")
    return 0 if ok else 1

