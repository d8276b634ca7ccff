"""Scrape `oomguard daemon --metrics` after a real incident."""

from __future__ import annotations

import re
import signal
import time
import urllib.request

from oomguard.cgroup import MemoryCgroup
from oomguard.workloads import LEAK

from conftest import Spawn, wait_until
from journal_helpers import closed_incident, rule

MiB = 1 << 20


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_scrape_after_a_real_incident(memcg: MemoryCgroup, spawn: Spawn, run_daemon) -> None:
    d = run_daemon(rule(memcg, 'steps = ["hold", "snapshot", "kill"]\ngrace = "0s"\n'
                               'settle = "200ms"'), "--metrics", "127.0.0.1:0")
    d.wait_for("serving metrics at")
    url = re.search(r"serving metrics at (\S+)", d.log).group(1)  # type: ignore[union-attr]
    assert url.startswith("http://127.0.0.1:")
    before = scrape(url)
    label = memcg.relpath.replace("\\", "\\\\").replace('"', '\\"')
    assert before["oomguard_up"] == 1 and before["oomguard_watched_cgroups"] == 1
    assert before[f'oomguard_cgroup_memory_limit_bytes{{cgroup="{label}"}}'] == 64 * MiB
    assert f'oomguard_cgroup_memory_usage_bytes{{cgroup="{label}"}}' in before
    assert not any(k.startswith("oomguard_incidents_total{") for k in before)
    assert before["oomguard_last_event_timestamp_seconds"] == 0  # none yet
    started = time.time()
    leaker = spawn(LEAK, MiB)
    assert leaker.wait(timeout=30) == -signal.SIGKILL
    closed_incident(d.journal)
    wait_until(lambda: 'oomguard_incidents_total{outcome="resolved"}' in scrape(url),
               what="the incident in the metrics")
    after = scrape(url)
    assert after['oomguard_incidents_total{outcome="resolved"}'] == 1
    assert after['oomguard_actions_total{kind="hold",result="held"}'] == 1
    assert after['oomguard_actions_total{kind="snapshot",result="done"}'] == 1
    assert after['oomguard_actions_total{kind="kill",result="killed"}'] == 1
    assert after[f'oomguard_victims_total{{cgroup="{label}"}}'] == 1
    assert after["oomguard_resolution_seconds_count"] == 1
    # Health is fed: the OOM's wall time, and how late the loop ran its last timer (the
    # incident's settle timer ran, on a quiet loop, well within a second).
    assert started <= after["oomguard_last_event_timestamp_seconds"] <= time.time()
    assert 0 < after["oomguard_loop_lag_seconds"] < 1
    assert 0 < after["oomguard_resolution_seconds_sum"] < 5
    # Usage refreshed at the close (no polling): the leaker's 64M are gone.
    assert after[f'oomguard_cgroup_memory_usage_bytes{{cgroup="{label}"}}'] < 32 * MiB
    assert d.stop() == 0
