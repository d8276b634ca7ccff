"""Journal incidents as text for a terminal: one line for `oomguard events`, a page for `show`.

Input is the dict `Journal.incident()` returns. Every string in it may come from a process
(comm, cmdline, hook output) or a cgroup name, so every string goes through `printable`
exactly once before it reaches the terminal.
"""

from __future__ import annotations

from collections.abc import Mapping

from oomguard.escape import printable
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


def _items(d: Mapping[str, object], key: str) -> list[Mapping[str, object]]:
    v = d.get(key)
    if not isinstance(v, list):
        return []
    return [x for x in v if isinstance(x, Mapping)]


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


def _victim(v: Mapping[str, object]) -> str:
    return f"{_text(v.get('pid'))} {_text(v.get('comm'))} {_size(v.get('rss'))}"


def render(obj: object) -> str:
    """A JSON-like value on one line, every string escaped for the terminal."""
    if isinstance(obj, Mapping):
        return "{" + ", ".join(f"{_text(k)}: {render(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, list | tuple):
        return "[" + ", ".join(render(v) for v in obj) + "]"
    if isinstance(obj, bool) or obj is None:
        return {True: "true", False: "false", None: "null"}[obj]
    return _text(obj)


def format_incident_line(d: Mapping[str, object]) -> str:
    """`#12  2024-05-01 12:00:03Z  /app  killed  83.2ms  victims: 1234 chrome 1.2G`."""
    outcome = d.get("outcome")
    state = _text(outcome) if outcome is not None else "open"
    if d.get("dry_run"):
        state += " (dry-run)"
    victims = _items(d, "victims")
    if victims:
        shown = ", ".join(_victim(v) for v in victims[:_MAX_LINE_VICTIMS])
        more = len(victims) - _MAX_LINE_VICTIMS
        who = f"victims: {shown}" + (f" +{more} more" if more > 0 else "")
    else:
        who = "no victims"
    return (
        f"#{_text(d.get('id'))}  {_when(d.get('opened_at'))}  {_text(d.get('cgroup'))}  "
        f"{state}  {_ms(d.get('latency_ms'))}  {who}"
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


def format_incident_detail(d: Mapping[str, object]) -> str:
    """Everything about one incident, for `oomguard show ID`."""
    dry = "  (dry-run)" if d.get("dry_run") else ""
    outcome = d.get("outcome")
    lines = [
        f"incident {_text(d.get('id'))}  cgroup {_text(d.get('cgroup'))}  "
        f"rule {_text(d.get('rule'))}{dry}",
        f"  opened   {_text(d.get('opened_at'))}",
        f"  closed   {_text(d.get('closed_at'))}",
        f"  outcome  {_text(outcome) if outcome is not None else 'open'}",
        f"  latency  {_ms(d.get('latency_ms'))}",
    ]
    steps = _items(d, "steps")
    if steps:
        lines.append("steps:")
        for s in steps:
            pid = s.get("pid")
            line = (
                f"  {_text(s.get('seq'))}. {_text(s.get('kind'))}"
                + (f" pid {_text(pid)}" if pid is not None else "")
                + f"  {_text(s.get('result') or 'unfinished')}  {_ms(s.get('duration_ms'))}"
                + f"  at {_text(s.get('started_at'))}"
            )
            lines.append(line)
            if s.get("detail"):
                lines.append(f"       {_text(s.get('detail'))}")
            for key in ("before", "after"):
                if s.get(key) is not None:
                    lines.append(f"       {key}: {render(s.get(key))}")
    victims = _items(d, "victims")
    if victims:
        lines.append("victims:")
        for v in victims:
            reaped = v.get("reaped_ms")
            lines.append(
                f"  pid {_text(v.get('pid'))}  {_text(v.get('comm'))}  rss {_size(v.get('rss'))}"
                f"  {_text(v.get('signal'))}"
                + (f"  reaped in {_ms(reaped)}" if reaped is not None else "  not seen to exit")
            )
    events = _items(d, "events")
    if events:
        lines.append("events:")
        for e in events:
            data = e.get("data")
            lines.append(
                f"  {_text(e.get('at'))}  {_text(e.get('kind'))}  {_text(e.get('cgroup'))}"
                + (f"  {render(data)}" if data is not None else "")
            )
    changes = _items(d, "changes")
    if changes:
        lines.append("changes:")
        for c in changes:
            restored = c.get("restored_at")
            lines.append(
                f"  {_text(c.get('kind'))} {_text(c.get('target'))}: "
                f"{_text(c.get('before'))} -> {_text(c.get('after'))}  "
                + (f"restored {_text(restored)}" if restored is not None else "NOT RESTORED")
            )
    evidence = _items(d, "evidence")
    if evidence:
        lines.append("evidence:")
        for ev in evidence:
            lines.append(f"  {_text(ev.get('kind'))} ({_text(ev.get('at'))}):")
            lines.extend(_block(ev.get("data"), "    "))
    return "\n".join(lines)
