"""Markdown tables from a bench/run JSON file, for docs/benchmarks.md.

    .venv/bin/python bench/tables.py bench/results/results.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

MODES = ("kernel", "bare", "oomguard_kill", "bare_grow", "oomguard_grow")


def f(v: Any, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def resolution(r: dict[str, Any]) -> list[str]:
    out = []
    for size, res in r.get("resolution", {}).items():
        if not isinstance(res, dict) or "modes" not in res:
            continue
        out += [f"**{size}iB memcg** (ms, from the hog's last timestamp to resolved)", "",
                "| mode | n | min | median | p95 | max |", "|---|---:|---:|---:|---:|---:|"]
        for m in MODES:
            st = res["modes"].get(m)
            if not st or not st.get("n"):
                continue
            out.append(f"| `{m}` | {st['n']} | {f(st['min_ms'])} | {f(st['median_ms'])} | "
                       f"{f(st['p95_ms'])} | {f(st['max_ms'])} |")
        out.append("")
    return out


def notify(r: dict[str, Any]) -> list[str]:
    n = r.get("notify", {})
    keys = [k for k in ("raw", "1", "100", "1000", "10000") if k in n]
    if not keys:
        return []
    out = ["| watched cgroups | n | p50 (ms) | p99 (ms) | max (ms) | probe RSS (MiB) | "
           "registration (s) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for k in keys:
        st = n[k]
        name = "1, floor (blocking read, no oomguard)" if k == "raw" else f"{int(k):,}"
        out.append(f"| {name} | {st['n']} | {f(st['median_ms'], 3)} | {f(st['p99_ms'], 3)} | "
                   f"{f(st['max_ms'], 3)} | {f(st.get('rss_mb'), 1)} | "
                   f"{f(st.get('register_s'), 3)} |")
    return [*out, ""]


def footprint(r: dict[str, Any]) -> list[str]:
    fp = r.get("footprint", {})
    keys = sorted((k for k in fp if k.isdigit()), key=int)
    if not keys:
        return []
    out = ["| watched | runs | start-up (s) | RSS (MiB) | anon | file | locked | fds | "
           "SIGTERM to exit (s) | restored |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for k in keys:
        runs = fp[k]
        med = sorted(runs, key=lambda x: x["startup_s"])[len(runs) // 2]
        out.append(f"| {int(k):,} | {len(runs)} | {f(med['startup_s'])} | {f(med['rss_mb'], 1)} | "
                   f"{f(med['rss_anon_mb'], 1)} | {f(med['rss_file_mb'], 1)} | "
                   f"{f(med['locked_mb'], 1)} | {med['fds']} | {f(med['shutdown_s'])} | "
                   f"{f(all(x['restored'] for x in runs))} |")
    return [*out, ""]


def storm(r: dict[str, Any]) -> list[str]:
    st = r.get("storm")
    if not st:
        return []
    out = ["| handler | run | OOMs between (s after start) | all resolved (s) | per group p50 "
           "(ms) | per group max (ms) | kernel kills | incidents | lost |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for mode, runs in st["runs"].items():
        for i, run in enumerate(runs, 1):
            pg = run.get("per_group_ms") or {}
            out.append(f"| {mode} | {i} | {f(run.get('first_oom_at_s'), 3)} – "
                       f"{f(run.get('last_oom_at_s'), 3)} | {f(run.get('resolve_s'), 3)} | "
                       f"{f(pg.get('median_ms'), 1)} | {f(pg.get('max_ms'), 1)} | "
                       f"{run.get('kernel_kills')} | {f(run.get('incidents'))} | "
                       f"{f(run.get('lost_events'))} |")
    return [*out, ""]


def targets(r: dict[str, Any]) -> list[str]:
    out = ["| figure | target | measured | met |", "|---|---|---:|---|"]
    for name, t in r.get("targets", {}).items():
        met = {True: "**met**", False: "**missed**", None: "not measured"}[t["met"]]
        note = f" ({t['note']})" if t.get("note") else ""
        out.append(f"| `{name}` | {t['target']} | {f(t['value'], 3)}{note} | {met} |")
    return [*out, ""]


def flat(r: dict[str, Any]) -> list[str]:
    out = ["| name | value |", "|---|---:|"]
    for k, v in r.items():
        if isinstance(v, (int, float, str)) or v is None:
            out.append(f"| `{k}` | {f(v, 4)} |")
    return [*out, ""]


def main() -> int:
    with open(sys.argv[1]) as fh:
        r = json.load(fh)
    for title, fn in (("Targets", targets), ("Resolution", resolution), ("Notification", notify),
                      ("Footprint", footprint), ("Storm", storm), ("All flat figures", flat)):
        lines = fn(r)
        if lines:
            print(f"### {title}\n")
            print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
