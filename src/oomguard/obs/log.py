"""The decision log: one line per decision, for a person (text) or a machine (json).

Text, on stderr by default (journald adds the timestamp under systemd):

    oomguard: watching 3 cgroups
    oomguard: incident 7 opened in /jobs/a (oom)
    oomguard: killed pid 123 (leak) in /jobs/a: grew 47M in 2.1 s, rss 250M, 3.1 ms after the OOM
    oomguard: incident 7 in /jobs/a resolved after 3.4 ms (the kernel let go)
    oomguard: incident 7 in /jobs/a closed: resolved in 3.4 ms

A kill line never says "resolved": only the kernel's own state does (v1 `under_oom` back to 0,
v2 usage back under the hold), and the `resolved` line is logged when the incident sees it.

JSON (`--log-format json`), one object per line, ASCII only:

    {"ts": 1712345678.123, "event": "killed", "msg": "killed pid 123 ...", "pid": 123, ...}

A process names itself: every string that reaches a text line goes through
`oomguard.escape.printable`, so a comm with a newline cannot forge a second line
and an escape sequence cannot repaint the operator's terminal. In JSON the
encoder escapes control characters and `ensure_ascii` the rest; bytes that were
not UTF-8 appear as `\\xNN` text.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TextIO

from oomguard.containers import ContainerIdentity
from oomguard.escape import printable
from oomguard.units import format_size

FORMATS = ("text", "json")
PREFIX = "oomguard: "
BATCH_LINES = 256  # lines per write(2) inside `Log.batched()`


def format_ms(ms: float) -> str:
    """3.1 ms, 250 ms, 1.25 s."""
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    if ms >= 100:
        return f"{ms:.0f} ms"
    return f"{ms:.1f} ms"


def _s(value: object) -> str:
    """A value for a text line: escaped, whatever it is."""
    if isinstance(value, (str, bytes)):
        return printable(value)
    return printable(str(value))


def _size(value: object) -> str:
    if value is None or isinstance(value, int):
        return format_size(value)
    return _s(value)


# One formatter per standard event, so `decision("killed", ...)` and `killed(...)`
# print the same line. Each gets the fields and returns the text after the prefix.
def _fmt_killed(f: Mapping[str, object]) -> str:
    where = _s(f.get("cgroup"))
    if f.get("member"):  # a task of a child group of the watched one: say which
        where = f"{_s(f['member'])} (under {where})"
    text = f"killed pid {_s(f.get('pid'))} ({_s(f.get('comm', '?'))}) in {where}"
    if f.get("why"):
        text += f": {_s(f['why'])}"
    if f.get("rss") is not None:
        text += f", rss {_size(f['rss'])}"
    if f.get("signal") not in (None, "SIGKILL"):
        text += f" with {_s(f['signal'])}"
    ms = f.get("ms")
    if isinstance(ms, (int, float)):
        # When it exited, not when the OOM ended: that is the `resolved` line.
        text += f", {format_ms(float(ms))} after the OOM"
    return text


def _fmt_resolved(f: Mapping[str, object]) -> str:
    ident = f" {_s(f['incident'])}" if f.get("incident") is not None else ""
    text = f"incident{ident} in {_s(f.get('cgroup'))} resolved"
    ms = f.get("ms")
    if isinstance(ms, (int, float)):
        text += f" after {format_ms(float(ms))}"
    return text + f" ({_s(f.get('how') or 'the kernel let go')})"


def _fmt_signalled(f: Mapping[str, object]) -> str:
    return (f"sent {_s(f.get('signal'))} to pid {_s(f.get('pid'))} ({_s(f.get('comm', '?'))})"
            f" in {_s(f.get('cgroup'))}")


def _fmt_grew(f: Mapping[str, object]) -> str:
    what = _s(f.get("what", "limit"))
    why = f": {_s(f['why'])}" if f.get("why") else ""
    return (f"grew {_s(f.get('cgroup'))} {what} {_size(f.get('old'))} -> "
            f"{_size(f.get('new'))}{why}")


def _fmt_shrank(f: Mapping[str, object]) -> str:
    what = _s(f.get("what", "limit"))
    return f"shrank {_s(f.get('cgroup'))} {what} {_size(f.get('old'))} -> {_size(f.get('new'))}"


def _fmt_held(f: Mapping[str, object]) -> str:
    how = _s(f.get("how") or "kernel killer off, tasks wait")
    return f"holding the OOM in {_s(f.get('cgroup'))} ({how})"


def _fmt_stopped(f: Mapping[str, object]) -> str:
    n = f.get("tasks")
    how = _s(f.get("how", "SIGSTOP"))
    count = f"{_s(n)} tasks" if n is not None else "all tasks"
    return f"stopped {count} in {_s(f.get('cgroup'))} ({how})"


def _fmt_continued(f: Mapping[str, object]) -> str:
    n = f.get("tasks")
    count = f"{_s(n)} tasks" if n is not None else "all tasks"
    return f"continued {count} in {_s(f.get('cgroup'))}"


def _fmt_kernel(f: Mapping[str, object]) -> str:
    return f"handed {_s(f.get('cgroup'))} to the kernel OOM killer: {_s(f.get('reason'))}"


def _fmt_watching(f: Mapping[str, object]) -> str:
    n = f.get("n")
    return f"watching {_s(n)} cgroup{'' if n == 1 else 's'}"


def _fmt_opened(f: Mapping[str, object]) -> str:
    ident = f" {_s(f['incident'])}" if f.get("incident") is not None else ""
    reason = f" ({_s(f['reason'])})" if f.get("reason") else ""
    return f"incident{ident} opened in {_s(f.get('cgroup'))}{reason}"


def _fmt_closed(f: Mapping[str, object]) -> str:
    ident = f" {_s(f['incident'])}" if f.get("incident") is not None else ""
    where = f" in {_s(f['cgroup'])}" if f.get("cgroup") is not None else ""
    text = f"incident{ident}{where} closed: {_s(f.get('outcome'))}"
    ms = f.get("ms")
    if isinstance(ms, (int, float)):
        text += f" in {format_ms(float(ms))}"
    return text


def _fmt_restored(f: Mapping[str, object]) -> str:
    return f"restored {_s(f.get('what'))} of {_s(f.get('cgroup'))}"


def _fmt_info(f: Mapping[str, object]) -> str:
    return _s(f.get("msg", ""))


def _fmt_warning(f: Mapping[str, object]) -> str:
    return "warning: " + _s(f.get("msg", ""))


def _fmt_error(f: Mapping[str, object]) -> str:
    return "error: " + _s(f.get("msg", ""))


_FORMATTERS: dict[str, Callable[[Mapping[str, object]], str]] = {
    "killed": _fmt_killed,
    "signalled": _fmt_signalled,
    "grew": _fmt_grew,
    "shrank": _fmt_shrank,
    "held": _fmt_held,
    "stopped": _fmt_stopped,
    "continued": _fmt_continued,
    "kernel": _fmt_kernel,
    "resolved": _fmt_resolved,
    "watching": _fmt_watching,
    "incident_opened": _fmt_opened,
    "incident_closed": _fmt_closed,
    "restored": _fmt_restored,
    "info": _fmt_info,
    "warning": _fmt_warning,
    "error": _fmt_error,
}


def format_text(event: str, fields: Mapping[str, object]) -> str:
    """The text line for `event` (without prefix or newline); unknown events as key=value."""
    formatter = _FORMATTERS.get(event)
    if formatter is not None:
        return formatter(fields)
    pairs = " ".join(f"{_s(k)}={_s(v)}" for k, v in fields.items())
    return f"{_s(event)} {pairs}".rstrip()


def _json_safe(value: object) -> object:
    """Strings with undecodable bytes (surrogateescape) or bytes become valid text."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(_json_safe(k)): _json_safe(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return _json_safe(str(value))


class DecisionLog:
    """Writes one line per decision to `stream` (stderr by default, looked up at each write)."""

    def __init__(
        self,
        stream: TextIO | None = None,
        fmt: str = "text",
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if fmt not in FORMATS:
            raise ValueError(f'log format must be "text" or "json", got {fmt!r}')
        self._stream = stream
        self.fmt = fmt
        self._clock = clock
        self.dropped = 0  # lines that could not be written (a closed or full stream)
        # The open incident of each group, from the opened/closed lines: a kill line whose
        # caller did not pass the incident still carries it (`--log-format json` readers
        # join on it).
        self._open: dict[str, int] = {}
        # Who each watched group is as a container (containers.py): every line about the
        # group carries it, text as " [shop/web-7d9f/app (burstable)]", JSON as "container".
        self._containers: dict[str, ContainerIdentity] = {}
        self._pending: list[str] | None = None  # lines held by `batched()`

    def name_group(self, cgroup: str, identity: ContainerIdentity | None) -> None:
        """Name `cgroup` in every line about it from now on (None: forget it)."""
        if identity is None:
            self._containers.pop(cgroup, None)
        else:
            self._containers[cgroup] = identity

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    # -- the one entry point -----------------------------------------------------------
    def decision(self, event: str, **fields: object) -> None:
        """Log `event` with `fields`: one text line, or one JSON object with every field."""
        text = format_text(event, fields)
        cgroup = fields.get("cgroup")
        known = self._containers.get(cgroup) if isinstance(cgroup, str) else None
        if known is not None:
            text += f" [{printable(known.label())}]"
            if "container" not in fields:
                fields = {**fields, "container": known.to_json()}
        if self.fmt == "json":
            record: dict[str, object] = {"ts": round(self._clock(), 6), "event": event,
                                         "msg": text}
            for key, value in fields.items():
                if key not in record:
                    record[key] = _json_safe(value)
            line = json.dumps(record, ensure_ascii=True, allow_nan=False, default=str)
        else:
            line = PREFIX + text
        self._write(line + "\n")

    def _write(self, line: str) -> None:
        pending = self._pending
        if pending is not None:
            pending.append(line)
            if len(pending) < BATCH_LINES:
                return
            line = "".join(pending)
            pending.clear()
        try:
            stream = self.stream
            stream.write(line)
            stream.flush()
        except (OSError, ValueError):  # closed stderr must not stop the handler
            self.dropped += 1

    @contextmanager
    def batched(self) -> Iterator[None]:
        """Lines written in BATCH_LINES at a time inside the block (a start-up that adopts
        10,000 groups logs a line for each: one write(2) each cost more than the rest of
        the line's work). Only outside the event handling: an incident's lines go at once."""
        if self._pending is not None:
            yield
            return
        self._pending = []
        try:
            yield
        finally:
            pending, self._pending = self._pending, None
            if pending:
                self._write("".join(pending))

    # -- the standard decisions --------------------------------------------------------
    def killed(
        self,
        pid: int,
        comm: str | bytes,
        cgroup: str,
        rss: int | None,
        ms: float | None = None,
        *,
        signal: str = "SIGKILL",
        incident: int | None = None,
        why: str = "",
        member: str = "",
    ) -> None:
        """`killed pid 123 (leak) in /jobs/a: grew 47M in 2.1 s, rss 250M, 3.1 ms after the
        OOM`; `why` is the ranking's reason (or what else ended it), `ms` counts from the
        incident's first event to the victim's exit. `member`: the group the victim was a
        member of when it is a child of the watched `cgroup` (a parent's subtree):
        `killed pid 123 (leak) in /pod/ctr (under /pod): ...`."""
        if incident is None:
            incident = self._open.get(cgroup)
        extra: dict[str, object] = {"member": member} if member and member != cgroup else {}
        self.decision("killed", pid=pid, comm=comm, cgroup=cgroup, rss=rss, ms=ms,
                      signal=signal, incident=incident, why=why, **extra)

    def signalled(self, pid: int, comm: str | bytes, cgroup: str, signal: str) -> None:
        self.decision("signalled", pid=pid, comm=comm, cgroup=cgroup, signal=signal)

    def grew(self, cgroup: str, old: int | None, new: int | None, *, what: str = "limit",
             why: str = "") -> None:
        """`grew /jobs/a limit 100M -> 150M` (`what="memsw limit"` for the v1 memsw limit;
        `why` when it is not the grow step's: `...: to wake pid 42 for its core dump`)."""
        if why:
            self.decision("grew", cgroup=cgroup, old=old, new=new, what=what, why=why)
        else:
            self.decision("grew", cgroup=cgroup, old=old, new=new, what=what)

    def shrank(self, cgroup: str, old: int | None, new: int | None, *, what: str = "limit") -> None:
        self.decision("shrank", cgroup=cgroup, old=old, new=new, what=what)

    def held(self, cgroup: str, how: str | None = None) -> None:
        if how:
            self.decision("held", cgroup=cgroup, how=how)
        else:
            self.decision("held", cgroup=cgroup)

    def stopped(self, cgroup: str, tasks: int | None = None, how: str = "SIGSTOP") -> None:
        """`stopped 3 tasks in /jobs/a (SIGSTOP)`; `how="freezer"` for a freeze."""
        self.decision("stopped", cgroup=cgroup, tasks=tasks, how=how)

    def continued(self, cgroup: str, tasks: int | None = None) -> None:
        self.decision("continued", cgroup=cgroup, tasks=tasks)

    def resolved(self, cgroup: str, ms: float | None, *, incident: int | None = None,
                 how: str = "") -> None:
        """`incident 7 in /jobs/a resolved after 3.4 ms (the kernel let go)`: logged when the
        kernel's own state says the group is no longer out of memory, never before."""
        self.decision("resolved", cgroup=cgroup, ms=ms, incident=incident, how=how)

    def handed_to_kernel(self, cgroup: str, reason: str) -> None:
        self.decision("kernel", cgroup=cgroup, reason=reason)

    def watching(self, n: int) -> None:
        """Exactly `oomguard: watching N cgroups` (`1 cgroup`)."""
        self.decision("watching", n=n)

    def incident_opened(
        self, cgroup: str, incident: int | None = None, reason: str = "oom"
    ) -> None:
        if incident is not None:
            self._open[cgroup] = incident
        self.decision("incident_opened", incident=incident, cgroup=cgroup, reason=reason)

    def incident_closed(
        self,
        outcome: str,
        ms: float | None,
        *,
        incident: int | None = None,
        cgroup: str | None = None,
    ) -> None:
        if cgroup is not None and self._open.get(cgroup) == incident:
            del self._open[cgroup]
        self.decision("incident_closed", outcome=outcome, ms=ms, incident=incident, cgroup=cgroup)

    def restored(self, cgroup: str, what: str) -> None:
        """On shutdown: `restored limit 100M of /jobs/a` and the like."""
        self.decision("restored", cgroup=cgroup, what=what)

    def info(self, msg: str) -> None:
        self.decision("info", msg=msg)

    def warning(self, msg: str) -> None:
        self.decision("warning", msg=msg)

    def error(self, msg: str) -> None:
        self.decision("error", msg=msg)
