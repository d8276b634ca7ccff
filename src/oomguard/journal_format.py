"""Journal incidents as text for a terminal: one line for `oomguard events`, a page for `show`.

Input is the `IncidentRecord` `Journal.incident()` returns. Every string in it may come
from a process (comm, cmdline, hook output) or a cgroup name, so every string goes through
`printable` exactly once before it reaches the terminal.
"""

from __future__ import annotations

from collections.abc import Mapping

from oomguard.escape import printable
from oomguard.journal_records import IncidentRecord, VictimRecord
from oomguard.units import format_size

_MAX_LINE_VICTIMS = 3


def _text(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, str | bytes):
        return printable(v)
    return printable(str(v))


def _ms(v: object) -> str:
    if isinstance(v, int | float) and not isinstance(v, bool):
        return f"{v:.1f}ms"
    return "-"


def _when(v: object) -> str:
    """An ISO time such as 2024-05-01T12:00:03.123Z as "2024-05-01 12:00:03Z"."""
    if not isinstance(v, str):
        return "-"
    date, _, rest = v.partition("T")
    return printable(f"{date} {rest[:8]}Z" if rest else date)


def _size(v: object) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        return format_size(v)
    return "-"


def _victim(v: VictimRecord) -> str:
    return f"{v.pid} {_text(v.comm)} {_size(v.rss)}"


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
    return (
        f"#{d.id}  {_when(d.opened_at)}  {_text(d.cgroup)}  "
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


def format_incident_detail(d: IncidentRecord) -> str:
    """Everything about one incident, for `oomguard show ID`."""
    dry = "  (dry-run)" if d.dry_run else ""
    lines = [
        f"incident {d.id}  cgroup {_text(d.cgroup)}  rule {_text(d.rule)}{dry}",
        f"  opened   {_text(d.opened_at)}",
        f"  closed   {_text(d.closed_at)}",
        f"  outcome  {_text(d.outcome) if d.outcome is not None else 'open'}",
        f"  latency  {_ms(d.latency_ms)}",
    ]
    if d.steps:
        lines.append("steps:")
        for s in d.steps:
            lines.append(
                f"  {s.seq}. {_text(s.kind)}"
                + (f" pid {s.pid}" if s.pid is not None else "")
                + f"  {_text(s.result or 'unfinished')}  {_ms(s.duration_ms)}"
                + f"  at {_text(s.started_at)}"
            )
            if s.detail:
                lines.append(f"       {_text(s.detail)}")
            for key, data in (("before", s.before), ("after", s.after)):
                if data is not None:
                    lines.append(f"       {key}: {render(data)}")
    if d.victims:
        lines.append("victims:")
        for v in d.victims:
            lines.append(
                f"  pid {v.pid}  {_text(v.comm)}  rss {_size(v.rss)}  {_text(v.signal)}"
                + (f"  reaped in {_ms(v.reaped_ms)}" if v.reaped_ms is not None
                   else "  not seen to exit")
            )
    if d.events:
        lines.append("events:")
        for e in d.events:
            lines.append(
                f"  {_text(e.at)}  {_text(e.kind)}  {_text(e.cgroup)}"
                + (f"  {render(e.data)}" if e.data is not None else "")
            )
    if d.changes:
        lines.append("changes:")
        for c in d.changes:
            lines.append(
                f"  {_text(c.kind)} {_text(c.target)}: {_text(c.before)} -> {_text(c.after)}  "
                + (f"restored {_text(c.restored_at)}" if c.restored_at is not None
                   else "NOT RESTORED")
            )
    if d.evidence:
        lines.append("evidence:")
        for ev in d.evidence:
            lines.append(f"  {_text(ev.kind)} ({_text(ev.at)}):")
            lines.extend(_block(ev.data, "    "))
    return "\n".join(lines)
