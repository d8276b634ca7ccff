"""Journal incidents as text for a terminal: one line for `oomguard events`, a page for `show`.

Input is the `IncidentRecord` `Journal.incident()` returns. Every string in it may come
from a process (comm, cmdline, hook output) or a cgroup name, so every string goes through
`printable` exactly once before it reaches the terminal.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping

from oomguard.escape import printable
from oomguard.journal_records import EvidenceRecord, IncidentRecord, StepRecord, VictimRecord
from oomguard.obs.log import format_ms
from oomguard.units import format_size

_MAX_LINE_VICTIMS = 3


def _text(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, str | bytes):
        return printable(v)
    return printable(str(v))


def _ms(v: object) -> str:
    """A duration in milliseconds as a person reads it: 3.1 ms, 250 ms, 1.25 s."""
    if isinstance(v, int | float) and not isinstance(v, bool):
        return format_ms(float(v))
    return "-"


def _when(v: object) -> str:
    """An ISO time such as 2024-05-01T12:00:03.123Z as "2024-05-01 12:00:03Z"."""
    if not isinstance(v, str):
        return "-"
    date, _, rest = v.partition("T")
    return printable(f"{date} {rest[:8]}Z" if rest else date)


def _clock(v: object) -> str:
    """The time of day with milliseconds ("12:00:03.123Z"): the date is in the header."""
    if not isinstance(v, str):
        return "-"
    return printable(v.partition("T")[2] or v)


def _size(v: object) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        return format_size(v)
    return "-"


def _victim(v: VictimRecord) -> str:
    return f"{v.pid} {_text(v.comm)} {_size(v.rss)}"


# What a person reads: one name per size (rss_anon is "anon" wherever it appears), sizes
# in units, durations in ms. `--json` keeps the stored keys and raw numbers.
_NAMES = {"rss_anon": "anon", "memsw_usage": "memory+swap usage",
          "memsw_limit": "memory+swap limit", "reaped_ms": "reaped in",
          "waited_ms": "waited", "hierarchical_memory_limit": "hierarchical limit"}
_SIZE_KEYS = frozenset({
    "rss", "rss_anon", "anon", "vsz", "usage", "limit", "memsw_usage", "memsw_limit",
    "size", "max_size", "bytes", "old", "new", "from", "to", "high", "max", "grow",
    "core_max", "cache", "file", "shmem", "swap", "kernel", "sock", "slab",
})
_COUNT_SUFFIXES = ("fault", "pgin", "pgout", "refault", "_count", "activate", "restore")


def _is_size_key(key: str) -> bool:
    return key in _SIZE_KEYS or key.endswith(("_bytes", "_anon", "_file", "_limit", "_usage"))


def _value(key: str, v: object) -> str:
    """One value for a person: a size, a duration, a yes/no, or the text."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int | float) and not isinstance(v, bool):
        if key.endswith("_ms") or key == "ms":
            return format_ms(float(v))
        if isinstance(v, int) and _is_size_key(key) and not key.endswith(_COUNT_SUFFIXES):
            return format_size(v) if v < 1 << 60 else "max"  # v1 prints "no limit" as ~2^63
        if isinstance(v, float):
            return f"{v:.3g}"
    if v is None and key.endswith("limit"):
        return "max"  # no limit
    if isinstance(v, list | tuple | Mapping):
        return render(v)
    return _text(v)


def _stat_value(key: str, v: object) -> str:
    """memory.stat: bytes, except the event counters (pgfault, workingset_refault...)."""
    if isinstance(v, int) and not key.startswith(("pg", "workingset_", "thp_", "numa_")):
        return format_size(v) if v < 1 << 60 else "max"
    return _text(v)


def _pairs(m: Mapping[str, object]) -> str:
    """`rss 74M, anon 67M, signal SIGKILL`: a step's before/after and the like."""
    return ", ".join(f"{_text(_NAMES.get(str(k), k))} {_value(str(k), v)}" for k, v in m.items())


def _wrap(text: str, width: int, indent: str) -> list[str]:
    """`text` (already indented) folded at `width`, continuation lines under `indent`."""
    if len(text) <= width:
        return [text]
    lead = len(text) - len(text.lstrip(" "))
    return textwrap.wrap(text.strip(), width=width, initial_indent=" " * lead,
                         subsequent_indent=indent, break_on_hyphens=False) or [text]


def render(obj: object) -> str:
    """A JSON-like value on one line, every string escaped for the terminal."""
    if isinstance(obj, Mapping):
        return "{" + ", ".join(f"{_text(k)}: {render(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, list | tuple):
        return "[" + ", ".join(render(v) for v in obj) + "]"
    if isinstance(obj, bool) or obj is None:
        return {True: "true", False: "false", None: "null"}[obj]
    return _text(obj)


def format_incident_line(d: IncidentRecord) -> str:
    """`#12  2024-05-01 12:00:03Z  /app  killed  83.2ms  victims: 1234 chrome 1.2G`."""
    state = _text(d.outcome) if d.outcome is not None else "open"
    if d.dry_run:
        state += " (dry-run)"
    if d.victims:
        shown = ", ".join(_victim(v) for v in d.victims[:_MAX_LINE_VICTIMS])
        more = len(d.victims) - _MAX_LINE_VICTIMS
        who = f"victims: {shown}" + (f" +{more} more" if more > 0 else "")
    else:
        who = "no victims"
    where = _text(d.cgroup) + (f" [{_text(d.container.label())}]" if d.container else "")
    return (
        f"#{d.id}  {_when(d.opened_at)}  {where}  "
        f"{state}  {_ms(d.latency_ms)}  {who}"
    )


def _block(data: object, indent: str) -> list[str]:
    """Evidence over several lines: text line by line, a list item by item, a dict by key."""
    if isinstance(data, str | bytes):
        text = data.decode("utf-8", "surrogateescape") if isinstance(data, bytes) else data
        return [indent + printable(line) for line in text.splitlines()]
    if isinstance(data, list):
        return [indent + render(item) for item in data]
    if isinstance(data, Mapping):
        return [f"{indent}{_text(k)}: {render(v)}" for k, v in data.items()]
    return [indent + render(data)]


# memory.stat keys worth a person's first look, in this order (v1 and v2 names); the
# whole file is in the evidence directory.
_STAT_KEYS = ("rss", "anon", "cache", "file", "shmem", "mapped_file", "file_mapped", "dirty",
              "file_dirty", "writeback", "file_writeback", "swap", "kernel", "slab", "sock",
              "inactive_anon", "active_anon", "inactive_file", "active_file", "unevictable",
              "pgfault", "pgmajfault")
_PS_HEAD = ["PID", "PPID", "UID", "S", "VSZ", "RSS", "ANON", "ARGS"]


def format_incident_detail(d: IncidentRecord, width: int = 100) -> str:
    """Everything about one incident, for `oomguard show ID`, folded at `width` columns.

    Sizes and durations in units; the latency (OOM event -> resolved) named beside the
    incident's open -> close span; memory.stat and the process list as short tables with
    a pointer to the evidence directory, which holds them in full."""
    width = max(width, 60)
    lines = _header(d)
    anon = _anon_by_pid(d)
    if d.steps:
        lines.append("steps:")
        for s in d.steps:
            lines.extend(_step_lines(s, width))
    if d.victims:
        lines.append("victims:")
        for v in d.victims:
            sizes = f"rss {_size(v.rss)}" + (f", anon {_size(anon[v.pid])}" if v.pid in anon
                                            else "")
            lines.append(
                f"  pid {v.pid}  {_text(v.comm)}  {sizes}  {_text(v.signal)}"
                + (f"  reaped in {_ms(v.reaped_ms)}" if v.reaped_ms is not None
                   else "  not seen to exit")
            )
    if d.events:
        lines.append("events:")
        for e in d.events:
            lines.extend(_wrap(
                f"  {_clock(e.at)}  {_text(e.kind)}  {_text(e.cgroup)}"
                + (f"  {_pairs(e.data)}" if e.data is not None else ""), width, "      "))
    if d.changes:
        lines.append("changes:")
        # A change by hand meant to stay (oomguard top): its row is closed, not undone.
        kept = {e.data.get("change") for e in d.events if e.kind == "kept" and e.data}
        for c in d.changes:
            lines.append(
                f"  {_text(c.kind)} {_text(c.target)}: {_change_value(c.kind, c.before)} -> "
                f"{_change_value(c.kind, c.after)}  "
                + (f"kept by hand at {_clock(c.restored_at)}" if c.id in kept
                   and c.restored_at is not None
                   else f"restored at {_clock(c.restored_at)}" if c.restored_at is not None
                   else "NOT RESTORED")
            )
    if d.evidence:
        lines.append("evidence:")
        where = _evidence_dir(d)
        for ev in d.evidence:
            lines.extend(_evidence_lines(ev, where, width))
    return "\n".join(lines)


def _header(d: IncidentRecord) -> list[str]:
    dry = "  (dry-run)" if d.dry_run else ""
    span = ""
    if d.opened_ts is not None and d.closed_ts is not None:
        span = f"  (open -> closed: {format_ms((d.closed_ts - d.opened_ts) * 1000)}, " \
               "with the settling time)"
    latency = (f"{_ms(d.latency_ms)}  (the OOM event -> resolved: how long the group was "
               "out of memory)" if d.latency_ms is not None else "-  (not resolved)")
    head = [
        f"incident {d.id}  cgroup {_text(d.cgroup)}  rule {_text(d.rule)}{dry}",
        f"  opened   {_when(d.opened_at)[:-1]}{_clock(d.opened_at)[8:]}",
        f"  closed   {_clock(d.closed_at) if d.closed_at else 'still open'}{span}",
        f"  outcome  {_text(d.outcome) if d.outcome is not None else 'open'}",
        f"  latency  {latency}",
    ]
    if d.container is not None:
        c = d.container
        ids = "  ".join(f"{k} {_text(v)}" for k, v in (("pod uid", c.pod_uid),
                        ("runtime", c.runtime), ("id", c.short_id)) if v)
        head.append(f"  container  {_text(c.label())}" + (f"  ({ids})" if ids else ""))
    return head


def _step_lines(s: StepRecord, width: int) -> list[str]:
    out = [
        f"  {s.seq}. {_text(s.kind)}"
        + (f" pid {s.pid}" if s.pid is not None else "")
        + f"  {_text(s.result or 'unfinished')}  took {_ms(s.duration_ms)}"
        + f"  at {_clock(s.started_at)}"
    ]
    if s.detail:
        out.extend(_wrap(f"       {_text(s.detail)}", width, "         "))
    for key, data in (("before", s.before), ("after", s.after)):
        if data is not None:
            out.extend(_wrap(f"       {key}: {_pairs(data)}", width, "         "))
    return out


def _anon_by_pid(d: IncidentRecord) -> dict[int, int]:
    """Each task's anonymous rss, from the kill steps and the snapshot: the victims' line
    shows the same two sizes, under the same names, as the step and the process list."""
    anon: dict[int, int] = {}
    for ev in d.evidence_named("snapshot"):
        rows = ev.fields.get("ps")
        for row in rows if isinstance(rows, list) else []:
            if isinstance(row, Mapping) and isinstance(row.get("rss_anon"), int):
                anon[int(str(row.get("pid")))] = int(str(row["rss_anon"]))
    for s in d.steps:
        value = s.before.get("rss_anon") if s.before else None
        if s.pid is not None and isinstance(value, int):
            anon[s.pid] = value
    return anon


def _change_value(kind: str, v: str) -> str:
    if v.isdigit() and kind in ("limit", "memsw_limit", "high", "max", "memory.high",
                                "memory.max", "swap_max"):
        return format_size(int(v))
    return _text(v)


def _evidence_dir(d: IncidentRecord) -> str | None:
    for ev in d.evidence_named("evidence-dir"):
        path = ev.fields.get("path")
        if isinstance(path, str):
            return path
    return None


def _evidence_lines(ev: EvidenceRecord, where: str | None, width: int) -> list[str]:
    if ev.kind == "snapshot" and ev.fields:
        return _snapshot_lines(ev, where, width)
    if ev.kind == "evidence-dir" and ev.fields:
        f = ev.fields
        files = f.get("files")
        n = len(files) if isinstance(files, list) else 0
        return _wrap(f"  evidence directory {_text(f.get('path'))}: {n} files, "
                     f"{_value('bytes', f.get('bytes'))} (ps.txt, memory.stat, cgroup.txt, "
                     "tasks/: the full dumps)", width, "    ")
    out = [f"  {_text(ev.kind)} (at {_clock(ev.at)}):"]
    out.extend(line for item in _block(ev.data, "    ") for line in _wrap(item, width, "      "))
    return out


def _snapshot_lines(ev: EvidenceRecord, where: str | None, width: int) -> list[str]:
    f = ev.fields
    full = (f" (all of it: {printable(where)}/" if where
            else " (all of it in the evidence directory: ")
    head = (f"  snapshot at {_clock(ev.at)}: usage {_value('usage', f.get('usage'))} of limit "
            f"{_value('limit', f.get('limit'))}")
    if f.get("memsw_usage") is not None:
        head += (f", memory+swap {_value('memsw_usage', f.get('memsw_usage'))} of "
                 f"{_value('memsw_limit', f.get('memsw_limit'))}")
    events = f.get("events")
    if isinstance(events, Mapping):
        head += f"; {_pairs(events)}"
    out = _wrap(head, width, "    ")
    stat = f.get("memory_stat")
    if isinstance(stat, Mapping):
        shown = {k: stat[k] for k in _STAT_KEYS if k in stat}
        text = ", ".join(f"{_text(k)} {_stat_value(k, v)}" for k, v in shown.items())
        out.extend(_wrap(f"    memory.stat: {text}{full}memory.stat)", width, "      "))
    rows = f.get("ps")
    if isinstance(rows, list):
        out.extend(_wrap(f"    processes at the OOM{full}ps.txt):", width, "      "))
        out.extend("      " + line for line in _ps_table(rows, width - 6))
    for key, value in f.items():
        if key not in ("cgroup", "usage", "limit", "memsw_usage", "memsw_limit", "events",
                       "memory_stat", "ps"):
            out.extend(_wrap(f"    {_text(key)}: {_value(str(key), value)}", width, "      "))
    return out


def _ps_table(rows: list[object], width: int) -> list[str]:
    """The process list as a table; ARGS in full, folded under itself where it must."""
    cells: list[list[str]] = []
    for row in rows:
        if not isinstance(row, Mapping):
            continue
        args = row.get("args")
        argv = " ".join(str(a) for a in args) if isinstance(args, list) and args else ""
        cells.append([_text(row.get("pid")), _text(row.get("ppid")), _text(row.get("uid")),
                      _text(row.get("state")), _value("vsz", row.get("vsz")),
                      _value("rss", row.get("rss")), _value("rss_anon", row.get("rss_anon")),
                      printable(argv) if argv else f"[{_text(row.get('comm'))}]"])
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(_PS_HEAD[:-1])]
    out = []
    for row in [_PS_HEAD, *cells]:
        fixed = " ".join(c.rjust(w) if i not in (3,) else c.ljust(w)
                         for i, (c, w) in enumerate(zip(row[:-1], widths, strict=True)))
        room = max(width - len(fixed) - 1, 20)
        folded = textwrap.wrap(row[-1], width=room, break_on_hyphens=False) or [""]
        out.append(f"{fixed} {folded[0]}")
        out.extend(" " * (len(fixed) + 1) + more for more in folded[1:])
    return out
