"""The decision log: one text line per decision, hostile names escaped, JSON that parses."""

from __future__ import annotations

import io
import json

import pytest

from oomguard.obs.log import DecisionLog, format_ms

HOSTILE = "evil\n\x1b[2Joomguard: killed pid 1 (init)\r\\\u202e"


def _all_decisions(log: DecisionLog) -> None:
    log.watching(3)
    log.incident_opened("/jobs/a", incident=7)
    log.held("/jobs/a")
    log.stopped("/jobs/a", tasks=3)
    log.grew("/jobs/a", 100 << 20, 150 << 20)
    log.signalled(124, "svc", "/jobs/a", "SIGUSR1")
    log.killed(123, "leak", "/jobs/a", 250 << 20, 3.1)
    log.shrank("/jobs/a", 150 << 20, 100 << 20)
    log.continued("/jobs/a")
    log.incident_closed("resolved", 3.1, incident=7, cgroup="/jobs/a")
    log.handed_to_kernel("/jobs/b", "deadline 5s passed")
    log.restored("/jobs/a", "limit 100M")
    log.info("shutting down")
    log.warning("no memsw accounting")
    log.decision("moved", pid=5, to="/parking")


def test_text_one_line_per_decision() -> None:
    out = io.StringIO()
    log = DecisionLog(out)
    _all_decisions(log)
    lines = out.getvalue().splitlines()
    assert len(lines) == 15
    assert all(line.startswith("oomguard: ") for line in lines)
    assert lines[0] == "oomguard: watching 3 cgroups"
    assert lines[1] == "oomguard: incident 7 opened in /jobs/a (oom)"
    assert lines[4] == "oomguard: grew /jobs/a limit 100M -> 150M"
    # A kill is not the end of the OOM: only the `resolved` line (the kernel's word) says so.
    assert lines[6] == "oomguard: killed pid 123 (leak) in /jobs/a, rss 250M, 3.1 ms after the OOM"
    assert "resolved" not in lines[6]
    assert lines[9] == "oomguard: incident 7 in /jobs/a closed: resolved in 3.1 ms"
    assert lines[10] == (
        "oomguard: handed /jobs/b to the kernel OOM killer: deadline 5s passed")
    assert lines[12] == "oomguard: shutting down"
    assert lines[14] == "oomguard: moved pid=5 to=/parking"


def test_killed_says_who_and_why() -> None:
    out = io.StringIO()
    log = DecisionLog(out)
    log.killed(123, "python3", "/jobs/a", 250 << 20, 2.0,
               why="grew 47M in 2.1 s, anon rss 249M")
    log.killed(124, HOSTILE, "/jobs/a", 1 << 20,
               why=f"largest anon rss 1M, preferred by {HOSTILE}")
    lines = out.getvalue().splitlines()
    assert lines[0] == ("oomguard: killed pid 123 (python3) in /jobs/a: grew 47M in 2.1 s, "
                        "anon rss 249M, rss 250M, 2.0 ms after the OOM")
    assert len(lines) == 2  # a hostile name or reason cannot forge a second line
    assert "\x1b" not in lines[1] and r"\x1b" in lines[1] and r"\n" in lines[1]


def test_resolved_line() -> None:
    out = io.StringIO()
    log = DecisionLog(out)
    log.resolved("/jobs/a", 3.4, incident=7)
    log.resolved("/jobs/b", 120.0, how="the kernel let go, after the hand-over")
    assert out.getvalue().splitlines() == [
        "oomguard: incident 7 in /jobs/a resolved after 3.4 ms (the kernel let go)",
        "oomguard: incident in /jobs/b resolved after 120 ms (the kernel let go, after the "
        "hand-over)",
    ]


def test_watching_exact() -> None:
    out = io.StringIO()
    DecisionLog(out).watching(12)
    assert out.getvalue() == "oomguard: watching 12 cgroups\n"


def test_killed_without_timing() -> None:
    out = io.StringIO()
    DecisionLog(out).killed(9, "x", "/g", None)
    assert out.getvalue() == "oomguard: killed pid 9 (x) in /g\n"


def test_hostile_comm_escaped_in_text() -> None:
    out = io.StringIO()
    log = DecisionLog(out)
    log.killed(123, HOSTILE, "/jobs/\nfake", 1 << 20, 1.0)
    log.killed(124, b"bad\xff\xfe", "/jobs/a", 1 << 20, 1.0)
    text = out.getvalue()
    lines = text.splitlines()
    assert len(lines) == 2, "a newline in a name must not make a second line"
    assert "\x1b" not in text and "\r" not in text and "\u202e" not in text
    assert "(evil\\n\\x1b[2Joomguard: killed pid 1 (init)\\r\\\\\\u202e)" in lines[0]
    assert "in /jobs/\\nfake" in lines[0]
    assert "(bad\\xff\\xfe)" in lines[1]


def test_info_escaped() -> None:
    out = io.StringIO()
    DecisionLog(out).info("a\nb")
    assert out.getvalue() == "oomguard: a\\nb\n"


def test_json_lines_parse() -> None:
    out = io.StringIO()
    log = DecisionLog(out, fmt="json", clock=lambda: 1712345678.25)
    _all_decisions(log)
    log.killed(125, HOSTILE, "/jobs/a", 1 << 20, 2.0)
    log.killed(126, b"bad\xff", "/jobs/\udcfe", None)
    raw = out.getvalue()
    assert raw.isascii()
    lines = raw.splitlines()
    assert len(lines) == 17
    records = [json.loads(line) for line in lines]
    assert all(r["ts"] == 1712345678.25 for r in records)
    killed = records[6]
    assert killed["event"] == "killed"
    assert (killed["pid"], killed["comm"], killed["cgroup"]) == (123, "leak", "/jobs/a")
    assert killed["rss"] == 250 << 20 and killed["ms"] == 3.1
    assert killed["msg"].startswith("killed pid 123 (leak)")
    assert records[0] == {"ts": 1712345678.25, "event": "watching", "msg": "watching 3 cgroups",
                          "n": 3}
    assert records[15]["comm"] == HOSTILE  # the exact name, losslessly
    assert records[16]["comm"] == "bad\\xff"
    assert records[16]["cgroup"] == "/jobs/\\xfe"
    assert records[14] == {"ts": 1712345678.25, "event": "moved", "msg": "moved pid=5 to=/parking",
                           "pid": 5, "to": "/parking"}


def test_bad_format_rejected() -> None:
    with pytest.raises(ValueError):
        DecisionLog(io.StringIO(), fmt="xml")


def test_default_stream_is_current_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    DecisionLog().watching(1)
    assert capsys.readouterr().err == "oomguard: watching 1 cgroup\n"


def test_closed_stream_does_not_raise() -> None:
    out = io.StringIO()
    log = DecisionLog(out)
    out.close()
    log.info("x")
    assert log.dropped == 1


def test_format_ms() -> None:
    assert format_ms(3.14) == "3.1 ms"
    assert format_ms(250.4) == "250 ms"
    assert format_ms(1250) == "1.25 s"
