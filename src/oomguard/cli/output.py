"""Printing for people (escaped, aligned) and for machines (JSON)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from oomguard.escape import printable


def emit_json(obj: object) -> None:
    # ensure_ascii keeps control characters and invalid UTF-8 (surrogates) escaped
    sys.stdout.write(json.dumps(obj, ensure_ascii=True, sort_keys=False) + "\n")
    sys.stdout.flush()


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], last_free: bool = True) -> str:
    """Aligned columns; every cell escaped; the last column left unpadded (ARGS)."""
    cells = [[printable(str(c)) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    lines = []
    for row in [list(headers), *cells]:
        parts = []
        for i, c in enumerate(row):
            if last_free and i == len(row) - 1:
                parts.append(c)
            elif i == 0 or not _numeric(c):
                parts.append(c.ljust(widths[i]))
            else:
                parts.append(c.rjust(widths[i]))
        lines.append(" ".join(parts).rstrip())
    return "\n".join(lines)


def _numeric(text: str) -> bool:
    return text.replace(".", "", 1).replace("%", "").isdigit()
