"""`oomguard check FILE`: validate a policy file and show what each rule will do."""

from __future__ import annotations

import argparse
from typing import Any

from oomguard.escape import printable
from oomguard.policy import load_policy
from oomguard.units import format_size


def add_parser(sub: Any) -> None:
    p = sub.add_parser("check", help="validate a policy file (exit 5 if invalid)",
                       description=__doc__)
    p.add_argument("config", metavar="FILE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    policy = load_policy(args.config)
    print(f"{printable(args.config)}: {len(policy.rules)} rule(s), valid")
    for rule in policy.rules:
        steps = ", ".join(s.describe() for s in rule.steps)
        limit = f", memory {format_size(rule.memory)}" if rule.memory else ""
        print(f"  {printable(rule.name)}: {printable(rule.match)}{limit}: {steps}; "
              f"deadline {rule.deadline:g}s")
    return 0
