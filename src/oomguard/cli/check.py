"""`oomguard check FILE` (or `--config FILE`): validate a policy file, show what each rule
will do, and which cgroups on this host each rule would adopt now and what it would change
on each (limit from -> to, hold). Nothing is changed."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from oomguard.cgroup import Hierarchies, discover
from oomguard.discovery import AdoptionPlan, matching_groups, plan_adoption
from oomguard.errors import OomguardError, UsageError
from oomguard.escape import printable
from oomguard.policy import Policy, load_policy
from oomguard.units import format_size

SHOWN = 20  # groups listed per rule unless --all: a catch-all rule can match thousands


def add_parser(sub: Any) -> None:
    p = sub.add_parser("check", help="validate a policy file and list the cgroups it would "
                       "adopt here (exit 5 if invalid)", description=__doc__)
    p.add_argument("config", metavar="FILE", nargs="?")
    p.add_argument("--config", dest="config_opt", metavar="FILE",
                   help="the policy file (the same as the FILE argument)")
    p.add_argument("--all", action="store_true",
                   help=f"list every cgroup a rule would adopt (default: the first {SHOWN})")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> str:
    given: list[str] = [c for c in (args.config, args.config_opt) if c is not None]
    if not given:
        raise UsageError("check: which policy file? oomguard check FILE "
                         "(e.g. examples/policy.toml)")
    if len(given) == 2 and given[0] != given[1]:
        raise UsageError("check: two policy files given; pass one, as FILE or --config")
    return given[0]


def _run_groups(relpath: str) -> bool:
    return "/oomguard.run/" in relpath  # `run`'s groups: their own process handles them


def run(args: argparse.Namespace) -> int:
    config = _config(args)
    policy = load_policy(config)
    print(f"{printable(config)}: {len(policy.rules)} rule(s), valid")
    for rule in policy.rules:
        steps = ", ".join(s.describe() for s in rule.steps)
        limit = f", memory {format_size(rule.memory)}" if rule.memory else ""
        dry = " (dry-run)" if rule.dry_run else ""
        print(f"  {printable(rule.name)}{dry}: {printable(rule.match)}{limit}: {steps}; "
              f"deadline {rule.deadline:g}s")
    for line in host_lines(policy, shown=None if args.all else SHOWN):
        print(line)
    return 0


def host_lines(policy: Policy, hier: Hierarchies | None = None,
               skip: Callable[[str], bool] = _run_groups, shown: int | None = SHOWN,
               ) -> list[str]:
    """Per rule, the groups it would adopt on this host now and what it would change."""
    try:
        hier = hier or discover()
    except OomguardError as exc:
        return [f"on this host: cannot look ({exc})"]
    if hier.memory is None:
        return ["on this host: no memory cgroup hierarchy is mounted; nothing to adopt"]
    plans: dict[str, list[AdoptionPlan]] = {r.name: [] for r in policy.rules}
    for group, rule in matching_groups(hier, policy, skip):
        try:
            plans[rule.name].append(plan_adoption(group, rule))
        except OomguardError:
            continue  # removed while we looked
    lines = [f"on this host now (memory cgroups under {hier.memory.mount_point}; "
             "nothing changed):"]
    for rule in policy.rules:
        found = plans[rule.name]
        if not found:
            lines.append(f"  rule {printable(rule.name)}: no cgroup now "
                         "(adopted when one appears)")
            continue
        n = len(found)
        note = " (dry-run: would change nothing)" if rule.dry_run else ""
        lines.append(f"  rule {printable(rule.name)}: would adopt {n} "
                     f"cgroup{'' if n == 1 else 's'}{note}")
        for plan in found[:shown]:
            what = "watched only" if rule.dry_run else plan.summary()
            lines.append(f"    {printable(plan.relpath)}: {what}")
        if shown is not None and n > shown:
            lines.append(f"    ... and {n - shown} more (--all lists every one)")
    return lines
