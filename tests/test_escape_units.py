"""escape.printable (hostile process names) and units (sizes, durations): pure."""

from __future__ import annotations

import math

import pytest

from oomguard.escape import printable
from oomguard.units import format_size, parse_duration, parse_size

MiB = 1 << 20


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("a\nb", "a\\nb"),
        ("a\tb", "a\\tb"),
        ("a\rb", "a\\rb"),
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),  # ESC
        ("\x07bell\x00nul", "\\x07bell\\x00nul"),
        ("del\x7f", "del\\x7f"),
        ("csi\x9b2J nel\x85", "csi\\x9b2J nel\\x85"),  # C1 controls
        ("evil\u202egnp.exe", "evil\\u202egnp.exe"),  # right-to-left override
        ("iso\u2066late\u2069", "iso\\u2066late\\u2069"),  # bidi isolates (Trojan Source)
        ("alm\u061c", "alm\\u061c"),
        ("line\u2028sep\u2029", "line\\u2028sep\\u2029"),
        ("back\\slash", "back\\\\slash"),
        ("\\x1b", "\\\\x1b"),  # a literal escape sequence stays distinguishable
        ("lone\ud800", "lone\\ud800"),  # would crash print() with UnicodeEncodeError
        ("x\udcffy", "x\\xffy"),  # surrogateescape str from a non-UTF-8 byte
    ],
)
def test_printable_escapes(raw: str, shown: str) -> None:
    out = printable(raw)
    assert out == shown
    assert out.isprintable()
    out.encode("utf-8")  # always printable to a UTF-8 terminal


def test_printable_bytes_with_invalid_utf8() -> None:
    assert printable(b"ok\xff\xfe") == "ok\\xff\\xfe"
    assert printable(b"caf\xc3\xa9") == "café"  # valid UTF-8 decodes
    assert printable(b"\xc3") == "\\xc3"  # truncated sequence
    assert printable(b"a\nb\x1b") == "a\\nb\\x1b"
    # the bytes and the surrogateescape str of the same name print the same
    name = b"py\xffthon\x1b"
    assert printable(name) == printable(name.decode("utf-8", "surrogateescape"))


@pytest.mark.parametrize("plain", ["", "python3 -c pass", "café 日本 ünïcode", "a b  c", "🙂"])
def test_printable_plain_text_unchanged(plain: str) -> None:
    assert printable(plain) == plain
    assert printable(plain.encode()) == plain


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("0", 0),
        ("100B", 100),
        ("512k", 512 << 10),
        ("512K", 512 << 10),
        ("64M", 64 * MiB),
        ("64MiB", 64 * MiB),
        ("64mb", 64 * MiB),
        ("64 M", 64 * MiB),
        (" 2g ", 2 << 30),
        ("1.5G", 3 << 29),
        ("1T", 1 << 40),
        ("1P", 1 << 50),
        (4096, 4096),
    ],
)
def test_parse_size(text: str | int, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "-1", "64X", "100iB", "1.5.5G", "M", "1e3", "64 MB x",
                                 -5, True])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match=r"size"):
        parse_size(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (None, "max"),
        (0, "0B"),
        (900, "900B"),
        (1023, "1023B"),
        (1024, "1K"),
        (1536, "1.5K"),
        (64 * MiB, "64M"),
        (3 << 29, "1.5G"),
        (10 << 30, "10G"),
        (1 << 40, "1T"),
        (3 << 50, "3P"),
    ],
)
def test_format_size(n: int | None, text: str) -> None:
    assert format_size(n) == text


@pytest.mark.parametrize("n", [1024, 64 * MiB, 3 << 29, 1 << 40, 512 << 10])
def test_format_parse_round_trip(n: int) -> None:
    assert parse_size(format_size(n)) == n


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("5 MS", 0.005),
        ("30s", 30.0),
        ("0.5s", 0.5),
        ("3", 3.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        (0.25, 0.25),
        (3, 3.0),
        (0, 0.0),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    value = parse_duration(text)
    assert value == pytest.approx(seconds)
    assert isinstance(value, float)


@pytest.mark.parametrize("bad", ["", "soon", "-2s", "1d", "2 s s", "nan", -1, True,
                                 math.nan, math.inf])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)  # type: ignore[arg-type]
