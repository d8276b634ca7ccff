"""`oomguard top`: a live view of memory cgroups, and decisions by hand on held groups.

Keys: up/down (or k/j) select, s cycles the sort (use%, usage, tree), g grows the selected
held group by --grow, K hands it to the kernel's killer, r refreshes, q quits.
An action is journaled like the daemon's and refused while a daemon holds the journal.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from oomguard.cgroup import MemoryCgroup, resolve
from oomguard.errors import OomguardError, UsageError
from oomguard.journal import default_journal_path
from oomguard.units import format_size, parse_size

INCIDENTS = 5
BAR = 20


def add_parser(sub: Any) -> None:
    p = sub.add_parser("top", help="live view of memory cgroups; act on held groups by hand",
                       description=__doc__)
    p.add_argument("cgroup", nargs="?", metavar="CGROUP",
                   help="show only this group and those below it")
    p.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                   help="refresh the numbers this often (default 2)")
    p.add_argument("--grow", default="64M", metavar="SIZE",
                   help="what g adds to a held group's limit (default 64M)")
    p.add_argument("--journal", type=Path, default=None,
                   help="journal to record actions in and read incidents from")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise UsageError("top: --interval must be above 0")
    by = parse_size(args.grow)
    if by <= 0:
        raise UsageError("top: --grow must be above 0")
    import curses  # only here: nothing else in oomguard needs a terminal library

    under = resolve(args.cgroup) if args.cgroup else None  # a typo fails here, not in curses
    journal = args.journal or default_journal_path()
    curses.wrapper(lambda scr: _Screen(scr, journal, args.interval, by, under).loop())
    return 0


class _Screen:
    def __init__(self, scr: Any, journal: Path, interval: float, by: int,
                 under: MemoryCgroup | None) -> None:
        self.scr, self.journal, self.interval, self.by = scr, journal, interval, by
        self.under = under
        self.sort = 0
        self.selected = 0
        self.selected_path: str | None = None  # the selection follows its group, not a line
        self.status = "q quit  s sort  up/down select  g grow  K to the kernel"

    def loop(self) -> None:
        import curses

        curses.curs_set(0)
        # getch waits for a key at most one interval: a key redraws at once, else the
        # numbers are refreshed once per interval; nothing runs in between.
        self.scr.timeout(int(self.interval * 1000))
        while True:
            from oomguard import top_model

            rows = top_model.rows(top_model.SORTS[self.sort], self.under)
            paths = [r.group.relpath for r in rows]
            if self.selected_path in paths:  # a re-sort must not move an action elsewhere
                self.selected = paths.index(self.selected_path)
            self.selected = max(0, min(self.selected, len(rows) - 1))
            self.selected_path = paths[self.selected] if paths else None
            self._draw(rows)
            key = self.scr.getch()
            if key in (ord("q"), ord("Q")):
                return
            self._key(key, rows)

    def _key(self, key: int, rows: list[Any]) -> None:
        import curses

        from oomguard import top_model

        if key in (curses.KEY_DOWN, ord("j")):
            self.selected += 1
            self.selected_path = None
        elif key in (curses.KEY_UP, ord("k")):
            self.selected = max(0, self.selected - 1)
            self.selected_path = None
        elif key == ord("s"):
            self.sort = (self.sort + 1) % len(top_model.SORTS)
        elif key in (ord("g"), ord("K")) and rows:
            group = rows[self.selected].group
            try:
                if key == ord("g"):
                    self.status = top_model.grow(self.journal, group, self.by)
                else:
                    self.status = top_model.hand_to_kernel(self.journal, group)
            except OomguardError as exc:
                self.status = str(exc)

    def _draw(self, rows: list[Any]) -> None:
        import curses

        from oomguard import top_model

        self.scr.erase()
        h, w = self.scr.getmaxyx()
        sort = top_model.SORTS[self.sort]
        head = f"oomguard top  sort:{sort}  every {self.interval:g}s  grow:{format_size(self.by)}"
        self._put(0, head, w, curses.A_BOLD)
        self._put(1, f"{'CGROUP':40} {'USAGE':>7} {'LIMIT':>7} {'USE':{BAR + 6}} "
                     f"{'KILLS':>5} {'TASKS':>5} STATE", w, curses.A_UNDERLINE)
        incidents = top_model.recent_incidents(self.journal, INCIDENTS)
        space = max(0, h - 4 - len(incidents) - 1)
        first = max(0, self.selected - space + 1)
        for i, r in enumerate(rows[first:first + space]):
            if sort == "tree":  # the tree by indentation: the name's head matters
                name = ("  " * r.depth + r.group.relpath.rsplit("/", 1)[-1])[:40]
            else:  # a full path: its tail tells groups apart
                name = r.group.relpath[-40:]
            pct = f"{100 * r.ratio:5.1f}%" if r.limit else "    - "
            line = (f"{name:40} {format_size(r.usage):>7} {format_size(r.limit):>7} "
                    f"{bar(r.ratio, BAR)}{pct} {r.oom_kills:>5} {r.tasks:>5} {r.state}")
            attr = curses.A_REVERSE if first + i == self.selected else 0
            if r.under_oom:
                attr |= curses.A_BOLD
            self._put(2 + i, line, w, attr)
        y = h - 2 - len(incidents)
        self._put(y, "last incidents:" if incidents else "no incidents in the journal", w,
                  curses.A_BOLD)
        for k, inc in enumerate(incidents):
            self._put(y + 1 + k, top_model.incident_line(inc), w, 0)
        self._put(h - 1, self.status, w, curses.A_REVERSE)
        self.scr.refresh()

    def _put(self, y: int, text: str, w: int, attr: int) -> None:
        import curses

        from oomguard.cli import one_line

        if 0 <= y < self.scr.getmaxyx()[0]:
            try:  # the bottom-right cell raises once written: harmless
                self.scr.addnstr(y, 0, one_line(text), w - 1, attr)
            except curses.error:
                pass


def bar(ratio: float, width: int) -> str:
    from oomguard.top_model import bar as _bar

    return _bar(ratio, width)
