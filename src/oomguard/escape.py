"""Make attacker-controlled text (process names, cmdlines) safe for a terminal.

A process can name itself anything: newlines that forge log lines, escape
sequences that repaint the screen, bytes that are not UTF-8. Everything printed
for a person goes through `printable`.
"""

from __future__ import annotations

_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\"}
# U+2028/9 separate lines; the rest are the bidi controls of "Trojan Source"
# (CVE-2021-42574): marks, embeddings/overrides and the isolates.
_BIDI_AND_SEPARATORS = frozenset(
    (0x061C, 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
)


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0:
        return f"\\x{code:02x}"
    if code in _BIDI_AND_SEPARATORS or 0xD800 <= code <= 0xDFFF:
        return f"\\u{code:04x}"  # line separators, bidi controls, lone surrogates
    return ch


def printable(text: str | bytes) -> str:
    """Return `text` with control characters, backslashes and invalid UTF-8 escaped."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_escape_char(ch) for ch in text)
