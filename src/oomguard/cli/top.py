"""`oomguard top`: a live view of memory cgroups, and decisions by hand on held groups.

Keys: up/down (or k/j) select, s cycles the sort (use%, usage, tree), g grows the selected
held group by --grow, K hands it to the kernel's killer, x (twice) kills the selected group's
largest process (n between the two names the next one), z stops the group's processes and
c continues them, q quits (continuing what this top stopped). An action is journaled like
the daemon's; while a daemon holds the journal, g, K and x are asked of it over its control
socket. The screen is redrawn when a key is pressed, when a shown group runs out of memory
and when the journal changes; the numbers are re-read every --interval.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oomguard.cgroup import MemoryCgroup, resolve
from oomguard.errors import OomguardError, UsageError
from oomguard.journal import default_journal_path
from oomguard.units import format_size, parse_size

if TYPE_CHECKING:
    from oomguard.containers import ContainerIdentity

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
    left: list[str] = []
    curses.wrapper(lambda scr: _Screen(scr, journal, args.interval, by, under, left).loop())
    for line in left:
        print(f"oomguard top: {line}", file=sys.stderr)
    return 0


HELP = ("q quit  s sort  up/down select  g grow  K to the kernel  x kill (n: next)  z stop  "
        "c continue")


class _Screen:
    def __init__(self, scr: Any, journal: Path, interval: float, by: int,
                 under: MemoryCgroup | None, left: list[str]) -> None:
        from oomguard import top_model

        self.scr, self.journal, self.interval, self.by = scr, journal, interval, by
        self.under = under
        self.left = left  # lines for the terminal once curses has ended
        self.sort = 0
        self.selected = 0
        self.selected_path: str | None = None  # the selection follows its group, not a line
        self.status = HELP
        self.rates = top_model.Rates(gap=min(0.25, interval / 2))
        self.view = top_model.JournalView(journal)
        # x pressed once: the group, its processes (largest first), the one named.
        self.armed: tuple[str, list[top_model.Victim], int] | None = None
        self.stopped: dict[str, MemoryCgroup] = {}  # groups this top stopped: continued at q
        from oomguard.containers import ContainerIndex

        # A container's group is shown by its names (namespace/pod/container, else pod UID
        # or runtime and short id, and the QoS class) instead of a tail of hashes.
        self.names = ContainerIndex()

    def loop(self) -> None:
        import curses

        from oomguard import top_model

        curses.curs_set(0)
        self.scr.nodelay(True)  # keys are read when stdin is readable: never block in getch
        wake = top_model.Wakeups(self.journal)
        try:
            while True:
                rows = top_model.rows(top_model.SORTS[self.sort], self.under, self.rates)
                wake.track([r.group for r in rows])
                paths = [r.group.relpath for r in rows]
                if self.selected_path in paths:  # a re-sort must not move an action elsewhere
                    self.selected = paths.index(self.selected_path)
                self.selected = max(0, min(self.selected, len(rows) - 1))
                self.selected_path = paths[self.selected] if paths else None
                self._draw(rows)
                # Sleep until a key, an OOM of a shown group, a journal write, or the next
                # refresh of the numbers: nothing is redrawn in between (a write to another
                # file in the journal's directory wakes the poll, not the screen).
                deadline = time.monotonic() + self.interval
                while not (why := wake.wait(deadline - time.monotonic())):
                    if time.monotonic() >= deadline:
                        break
                if "hangup" in why:  # the terminal is gone: poll would return at once
                    return
                while (key := self.scr.getch()) != -1:
                    if key in (ord("q"), ord("Q")):
                        return
                    self._key(key, rows)
        finally:
            wake.close()
            self.view.close()
            self._continue_stopped()

    def _continue_stopped(self) -> None:
        """What this top stopped is a pause, not a decision: continued when it quits (a
        daemon's recovery would continue it too: the rows stay open until then)."""
        from oomguard import top_model

        for group in self.stopped.values():
            try:
                self.left.append(top_model.cont(self.journal, group))
            except OomguardError as exc:
                self.left.append(f"{group.relpath}: could not continue: {exc}")

    def _key(self, key: int, rows: list[Any]) -> None:
        import curses

        from oomguard import top_model

        armed, self.armed = self.armed, None  # any key but x or n disarms the kill
        if key == ord("n") and armed is not None:  # name the next process instead
            group_path, victims, i = armed
            self._arm(group_path, victims, (i + 1) % len(victims))
        elif key in (curses.KEY_DOWN, ord("j")):
            self.selected += 1
            self.selected_path = None
        elif key in (curses.KEY_UP, ord("k")):
            self.selected = max(0, self.selected - 1)
            self.selected_path = None
        elif key == ord("s"):
            self.sort = (self.sort + 1) % len(top_model.SORTS)
        elif key in (ord("g"), ord("K"), ord("x"), ord("z"), ord("c")) and rows:
            group = rows[self.selected].group
            started = time.monotonic()
            try:
                if key == ord("g"):
                    self.status = top_model.grow(self.journal, group, self.by)
                elif key == ord("K"):
                    self.status = top_model.hand_to_kernel(self.journal, group)
                elif key == ord("z"):
                    self.status = top_model.stop(self.journal, group)
                    self.stopped[group.relpath] = group
                elif key == ord("c"):
                    self.status = top_model.cont(self.journal, group)
                    self.stopped.pop(group.relpath, None)
                elif armed is not None and armed[0] == group.relpath:
                    self.status = top_model.kill(self.journal, group, armed[1][armed[2]])
                else:
                    victims = top_model.candidates(group)
                    if not victims:
                        self.status = f"{group.relpath}: no process to kill"
                    else:
                        self._arm(group.relpath, victims, 0)
                        return
            except OomguardError as exc:
                self.status = str(exc)
            if time.monotonic() - started > 0.5:
                self.status += f" [{time.monotonic() - started:.1f} s]"
        elif key == curses.KEY_RESIZE:
            pass  # redrawn below at the new size

    def _arm(self, group_path: str, victims: list[Any], i: int) -> None:
        self.armed = (group_path, victims, i)
        self.status = (f"kill {victims[i].describe()} ({i + 1}/{len(victims)})? x again to "
                       f"kill, n next, any key not")

    def _draw(self, rows: list[Any]) -> None:
        import curses

        from oomguard import top_model

        self.scr.erase()
        h, w = self.scr.getmaxyx()
        sort = top_model.SORTS[self.sort]
        head = f"oomguard top  sort:{sort}  every {self.interval:g}s  grow:{format_size(self.by)}"
        self._put(0, head, w, curses.A_BOLD)
        self._put(1, f"{'CGROUP':40} {'USAGE':>7} {'LIMIT':>7} {'USE':{BAR + 7}} "
                     f"{'GROWTH':>8} {'PSI':>5} {'KILLS':>5} {'TASKS':>5} STATE", w,
                  curses.A_UNDERLINE)
        incidents = self.view.recent(INCIDENTS)
        space = max(0, h - 4 - len(incidents) - 1)
        first = max(0, self.selected - space + 1)
        for i, r in enumerate(rows[first:first + space]):
            who = self.names.refresh(r.group.relpath)  # read once named; bounded reads
            if sort == "tree":  # the tree by indentation: the name's head matters
                own = shown(who) if who is not None else r.group.relpath.rsplit("/", 1)[-1]
                name = ("  " * r.depth + own)[:40]
            elif who is not None:
                name = shown(who)[:40]
            else:  # a full path: its tail tells groups apart
                name = r.group.relpath[-40:]
            pct = f" {100 * r.ratio:5.1f}%" if r.limit else "     - "
            line = (f"{name:40} {format_size(r.usage):>7} {format_size(r.limit):>7} "
                    f"{bar(r.ratio, BAR)}{pct} {top_model.format_rate(r.growth):>8} "
                    f"{'-' if r.psi is None else f'{r.psi:.1f}':>5} {r.oom_kills:>5} "
                    f"{r.tasks:>5} {r.state}")
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


def shown(who: ContainerIdentity) -> str:
    """A container's group in 40 columns: its names when the runtime wrote them
    ("shop/web-7d9f/app (burstable)"), else the pod UID's and container id's heads
    ("pod 3c1f2a4b 9f2e1234abcd (burstable)") rather than a tail of hashes."""
    if who.pod or who.namespace:
        return who.label()
    parts = [f"pod {who.pod_uid[:8]}"] if who.pod_uid else [who.runtime or "container"]
    if who.id:
        parts.append(who.short_id)
    return " ".join(parts) + (f" ({who.qos})" if who.qos else "")


def bar(ratio: float, width: int) -> str:
    from oomguard.top_model import bar as _bar

    return _bar(ratio, width)
