"""Policy: the rules (data from TOML), how they match cgroups, and how victims are ranked.

Pure: nothing here touches /proc or cgroupfs; only `load_policy` reads the file it is given.
"""

from oomguard.policy.load import load_policy, parse_policy, parse_signal
from oomguard.policy.match import (
    PathGlob,
    ProcessMatcher,
    compile_glob,
    normalize_path,
    process_matcher,
)
from oomguard.policy.model import (
    DEFAULT_STEPS,
    GROWTH_STRATEGIES,
    VICTIM_STEPS,
    OnExit,
    Policy,
    Pressure,
    Rule,
    Step,
    StepKind,
    Strategy,
    Target,
    default_policy,
    default_rule,
    signal_name,
)
from oomguard.policy.ranking import (
    GROWTH_MIN,
    Candidate,
    GrowthTracker,
    ProcSample,
    is_untouchable,
    matches,
    rank_for_rule,
    rank_victims,
)

__all__ = [
    "DEFAULT_STEPS",
    "GROWTH_MIN",
    "GROWTH_STRATEGIES",
    "VICTIM_STEPS",
    "Candidate",
    "GrowthTracker",
    "OnExit",
    "PathGlob",
    "Policy",
    "Pressure",
    "ProcSample",
    "ProcessMatcher",
    "Rule",
    "Step",
    "StepKind",
    "Strategy",
    "Target",
    "compile_glob",
    "default_policy",
    "default_rule",
    "is_untouchable",
    "load_policy",
    "matches",
    "normalize_path",
    "parse_policy",
    "parse_signal",
    "process_matcher",
    "rank_for_rule",
    "rank_victims",
    "signal_name",
]
