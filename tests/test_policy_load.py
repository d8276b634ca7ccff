"""Policy files: parsing, defaults, glob matching and every validation message (plain data)."""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path

import pytest

from oomguard.errors import ConfigError
from oomguard.policy import (
    DEFAULT_STEPS,
    PLAIN_KINDS,
    STEP_TYPES,
    ExecStep,
    KillStep,
    OnExit,
    PlainStep,
    Policy,
    Rule,
    SignalStep,
    StepKind,
    Strategy,
    Target,
    compile_glob,
    default_policy,
    default_rule,
    load_policy,
    parse_policy,
    parse_signal,
)

REPO = Path(__file__).resolve().parent.parent
SRC = "policy.toml"


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_policy(text, SRC)
    assert caught.value.exit_code == 5
    lines = str(caught.value).splitlines()
    assert lines, "a ConfigError must say something"
    for line in lines:
        assert line.startswith(f"{SRC}: "), line
    return lines


def one_error(text: str) -> str:
    lines = errors(text)
    assert len(lines) == 1, lines
    return lines[0]


def rule_text(body: str, name: str = "ci", match: str = "/ci/**") -> str:
    return f'[[rule]]\nname = "{name}"\nmatch = "{match}"\n{body}\n'


def only_rule(text: str) -> Rule:
    policy = parse_policy(text, SRC)
    assert len(policy.rules) == 1
    return policy.rules[0]


# --- defaults and a full file ------------------------------------------------------------------


def test_default_rule_is_the_safe_first_run() -> None:
    rule = default_rule()
    assert [step.kind for step in rule.steps] == [StepKind.HOLD, StepKind.SNAPSHOT, StepKind.KILL]
    assert rule.strategy is Strategy.AUTO  # the grower, else the largest
    assert rule.ranks_by_growth()
    assert rule.grace == 2.0
    assert rule.deadline == 10.0
    assert rule.max_victims == 3
    assert rule.protect == rule.prefer == rule.avoid == ()
    assert not rule.dry_run
    assert rule.matches("/anything/at/all")
    policy = default_policy()
    assert policy.source == "<defaults>"
    assert policy.rule_for("/a") is policy.rules[0]


def test_minimal_rule_gets_the_defaults() -> None:
    rule = only_rule('[[rule]]\nmatch = "/ci/*"\n')
    assert rule.name == "/ci/*"
    assert rule.steps == DEFAULT_STEPS
    assert rule == Rule(name="/ci/*", match="/ci/*", steps=DEFAULT_STEPS)


def test_full_rule_parses_every_key() -> None:
    rule = only_rule(
        rule_text(
            """
memory = "1G"
memsw = "1.5G"
grow_step = "128M"
grow_max = "2G"
grow_budget = 2
strategy = "growth"
protect = ["sshd", {comm = "^postgres$", uid = [0, 26]}]
prefer = "leak"
avoid = [{exe = "/usr/bin/java$"}]
grace = "500ms"
deadline = "30s"
kill_process_group = true
dry_run = true
max_victims = 1
settle = 2
steps = [
  "hold",
  "snapshot",
  {kind = "signal", signal = "SIGUSR1", wait = "2s", to = "all"},
  {kind = "exec", argv = ["/usr/bin/logger", "oom"], timeout = "5s", on_exit = {0 = "resolved", \
1 = "next", 3 = "kill", default = "grow", timeout = "kernel"}},
  {kind = "grow", by = "256M"},
  {kind = "move", target = "quarantine/", strategy = "newest"},
  {kind = "core", timeout = "20s", dry_run = false},
  {kind = "kill", strategy = "oom_score", grace = "1s"},
  "stop", "freeze", "continue", "kernel",
]
"""
        )
    )
    assert rule.memory == 1 << 30
    assert rule.memsw == 3 << 29
    assert rule.grow_step == 128 << 20
    assert rule.grow_max == 2 << 30
    assert rule.grow_budget == 2
    assert rule.strategy is Strategy.GROWTH
    assert [m.label for m in rule.protect] == ["'sshd'", "comm='^postgres$' uid=0 uid=26"]
    assert rule.protect[1].uids == frozenset({0, 26})
    assert [m.label for m in rule.prefer] == ["'leak'"]
    assert rule.avoid[0].exe is not None
    assert (rule.grace, rule.deadline, rule.settle) == (0.5, 30.0, 2.0)
    assert rule.kill_process_group and rule.dry_run
    assert rule.max_victims == 1
    kinds = [step.kind.value for step in rule.steps]
    assert kinds == [
        "hold", "snapshot", "signal", "exec", "grow", "move", "core", "kill",
        "stop", "freeze", "continue", "kernel",
    ]  # fmt: skip
    sig, exe, grow, move, core, kill = rule.steps[2:8]
    assert (sig.signal, sig.wait, sig.to) == (signal.SIGUSR1, 2.0, Target.ALL)
    assert exe.argv == ("/usr/bin/logger", "oom") and exe.timeout == 5.0
    assert exe.exit_action(0) is OnExit.RESOLVED
    assert exe.exit_action(1) is OnExit.NEXT
    assert exe.exit_action(3) is OnExit.KILL
    assert exe.exit_action(42) is OnExit.GROW
    assert exe.exit_action(None) is OnExit.KERNEL
    assert rule.grow_by(grow) == 256 << 20
    assert move.target == "/quarantine" and rule.strategy_for(move) is Strategy.NEWEST
    assert rule.timeout_for(core) == 20.0 and rule.dry_run_for(core) is False
    assert rule.strategy_for(kill) is Strategy.OOM_SCORE and rule.grace_for(kill) == 1.0
    assert rule.dry_run_for(kill) is True
    hash(rule)  # frozen and hashable, on_exit included


def test_step_dry_run_overrides_an_acting_rule() -> None:
    """The other direction from the full file above (a dry rule with one acting step): the
    engine applies this per step (steps/runner.run_step; the real-kernel proof is
    test_signal_step.py::test_kill_step_marked_dry_run_signals_nobody)."""
    rule = only_rule(rule_text(
        'steps = ["hold", {kind="kill", dry_run=true}, {kind="grow", dry_run=false}, "kill"]'))
    assert not rule.dry_run
    assert [rule.dry_run_for(s) for s in rule.steps] == [False, True, False, False]
    assert rule.steps[1].describe() == "kill [dry-run]"


# One frozen type per kind with options; the loader builds it and accepts exactly its fields.
_STEP_KEY_FIELDS = {"by": ("grow_by",), "on_exit": ("on_exit", "on_other_exit", "on_timeout")}


@pytest.mark.parametrize("kind", list(StepKind), ids=lambda k: k.value)
def test_each_kind_loads_as_its_own_type_with_exactly_its_options(kind: StepKind) -> None:
    from oomguard.policy.load import _KIND_OPTIONS

    step_type = STEP_TYPES[kind]
    assert (step_type is PlainStep) == (kind in PLAIN_KINDS)
    own = {f.name for f in dataclasses.fields(step_type) if f.init} - {"kind", "dry_run"}
    accepted = {name for key in _KIND_OPTIONS[kind] for name in _STEP_KEY_FIELDS.get(key, (key,))}
    assert accepted == own, f"{kind.value}: the loader accepts {accepted}, the type has {own}"
    required = {"signal": 'signal="USR1"', "move": 'target="/q"', "exec": 'argv=["/x"]'}
    extra = f", {required[kind.value]}" if kind.value in required else ""
    step = only_rule(rule_text(f'steps = [{{kind="{kind.value}", dry_run=true{extra}}}]')).steps[0]
    assert type(step) is step_type and step.kind is kind and step.dry_run is True
    hash(step)


def test_plain_step_refuses_a_kind_with_options() -> None:
    with pytest.raises(ValueError, match="kill step has options"):
        PlainStep(StepKind.KILL)
    assert KillStep().kind is StepKind.KILL and KillStep(grace=1.0) == KillStep(grace=1.0)


def test_describe_and_rule_fallbacks_for_every_kind() -> None:
    """describe() and the Rule helpers, as they read before the per-kind step types."""
    rule = only_rule(rule_text(
        'steps = ["hold", "snapshot", "stop", "freeze", "continue",\n'
        '  {kind="signal", signal="SIGUSR1", wait="2s", to="all", strategy="newest",'
        ' even_if_fatal=true, dry_run=true},\n'
        '  {kind="signal", signal="RTMIN+3"},\n'
        '  {kind="exec", argv=["/usr/bin/logger", "oom x"], timeout="3s"},\n'
        '  {kind="grow", by="256M"}, "grow",\n'
        '  {kind="move", target="/quarantine", to="all", strategy="largest"},\n'
        '  {kind="move", target="/q2"},\n'
        '  {kind="core", strategy="oom_score", timeout="5s", max_size="512M"}, "core",\n'
        '  {kind="ask", actions=["kill"], bus="unix:path=/x", timeout="4s"}, "ask",\n'
        '  {kind="kill", strategy="growth", grace="1s", dry_run=false},\n'
        '  {kind="kill", dry_run=true}, "kernel"]'))
    got = [(s.describe(), rule.strategy_for(s).value, rule.grace_for(s), rule.wait_for(s),
            rule.grow_by(s) >> 20, rule.timeout_for(s), rule.dry_run_for(s)) for s in rule.steps]
    plain = ("auto", 2.0, 1.0, 64, 10.0, False)
    assert got == [
        ("hold", *plain), ("snapshot", *plain), ("stop", *plain), ("freeze", *plain),
        ("continue", *plain),
        ("signal SIGUSR1 to all even if fatal (newest) [dry-run]",
         "newest", 2.0, 2.0, 64, 10.0, True),
        ("signal SIGRTMIN+3", *plain),
        ("exec /usr/bin/logger oom x", "auto", 2.0, 1.0, 64, 3.0, False),
        ("grow by 256M", "auto", 2.0, 1.0, 256, 10.0, False),
        ("grow", *plain),
        ("move to all -> /quarantine (largest)", "largest", 2.0, 1.0, 64, 10.0, False),
        ("move -> /q2", *plain),
        ("core (oom_score)", "oom_score", 2.0, 1.0, 64, 5.0, False),
        ("core", *plain),
        ("ask", "auto", 2.0, 1.0, 64, 4.0, False),
        ("ask", "auto", 2.0, 1.0, 64, 5.0, False),
        ("kill (growth)", "growth", 1.0, 1.0, 64, 10.0, False),
        ("kill [dry-run]", "auto", 2.0, 1.0, 64, 10.0, True),
        ("kernel", *plain),
    ]  # fmt: skip
    assert rule.ranks_by_growth()
    assert isinstance(rule.steps[5], SignalStep) and isinstance(rule.steps[7], ExecStep)


def test_signal_even_if_fatal() -> None:
    rule = only_rule(rule_text(
        'steps = [{kind="signal", signal="SIGUSR1", to="all"}, '
        '{kind="signal", signal="SIGTERM", even_if_fatal=true}, "kill"]'))
    asks, forces, _ = rule.steps
    assert not asks.even_if_fatal and forces.even_if_fatal
    assert forces.describe() == "signal SIGTERM even if fatal"
    line = one_error(rule_text('steps = [{kind="signal", signal="USR1", even_if_fatal="yes"}]'))
    assert "steps[1].even_if_fatal" in line
    line = one_error(rule_text('steps = [{kind="kill", even_if_fatal=true}]'))
    assert "steps[1].even_if_fatal" in line and "not an option of a kill step" in line


def test_step_fallbacks_to_the_rule() -> None:
    rule = only_rule(rule_text('steps = ["grow", {kind="exec", argv=["/bin/true"]}, "kill"]'))
    grow, exe, kill = rule.steps
    assert rule.grow_by(grow) == rule.grow_step == 64 << 20
    assert rule.timeout_for(exe) == 5.0
    assert rule.timeout_for(kill) == rule.deadline
    assert rule.grace_for(kill) == rule.grace
    assert rule.wait_for(kill) == rule.settle
    assert rule.strategy_for(kill) is Strategy.AUTO
    short = only_rule(rule_text('deadline = "3s"\nsteps = [{kind="exec", argv=["/bin/true"]}]'))
    assert short.timeout_for(short.steps[0]) == 3.0


def test_exec_exit_convention_without_on_exit() -> None:
    step = ExecStep(argv=("/bin/true",))
    assert step.exit_action(0) is OnExit.RESOLVED
    assert step.exit_action(1) is OnExit.NEXT
    assert step.exit_action(None) is OnExit.NEXT
    remapped = only_rule(rule_text('steps=[{kind="exec", argv=["/x"], on_exit={0="next"}}]'))
    assert remapped.steps[0].exit_action(0) is OnExit.NEXT


def test_defaults_merge_under_every_rule() -> None:
    policy = parse_policy(
        """
[defaults]
grace = "1s"
strategy = "newest"
protect = ["sshd"]
steps = ["hold", "kill"]

[[rule]]
name = "ci"
match = "/ci/*"
grace = "3s"
protect = ["postgres"]

[[rule]]
match = "/**"
""",
        SRC,
    )
    ci, rest = policy.rules
    assert ci.grace == 3.0 and rest.grace == 1.0
    assert ci.strategy is rest.strategy is Strategy.NEWEST
    assert [m.label for m in ci.protect] == ["'sshd'", "'postgres'"]
    assert [m.label for m in rest.protect] == ["'sshd'"]
    assert [s.kind for s in ci.steps] == [StepKind.HOLD, StepKind.KILL]
    assert policy.rule_for("/ci/job1") is ci
    assert policy.rule_for("/ci/a/b") is rest
    assert policy.rule_for("/") is None


def test_example_file_loads() -> None:
    policy = load_policy(REPO / "examples" / "policy.toml")
    assert policy.source.endswith("policy.toml")
    assert policy.rules


def test_load_policy_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read the policy file"):
        load_policy(missing)


def test_load_policy_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b'[[rule]]\nmatch = "\xff"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: not UTF-8"):
        load_policy(path)


def test_load_policy_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[[rule]]\nmatch = "/a"\n')
    assert load_policy(path) == Policy(
        (Rule(name="/a", match="/a", steps=DEFAULT_STEPS),), str(path)
    )


# --- globs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/ci/*", "/ci/job1", True),
        ("/ci/*", "ci/job1/", True),
        ("/ci/*", "/ci/a/b", False),
        ("/ci/*", "/ci", False),
        ("/ci/**", "/ci/job1", True),
        ("/ci/**", "/ci/a/b", True),
        ("/ci/**", "/ci", False),
        ("/ci/**", "/cix/a", False),
        ("/a/**/b", "/a/b", True),
        ("/a/**/b", "/a/x/y/b", True),
        ("/a/**/b", "/a/x/c", False),
        ("/**/leaf", "/leaf", True),
        ("/**/leaf", "/x/y/leaf", True),
        ("/**", "/x", True),
        ("/**", "/", False),
        ("/", "/", True),
        ("/user.slice/user-*.slice", "/user.slice/user-1000.slice", True),
        ("/job?", "/job1", True),
        ("/job?", "/job10", False),
        ("/job[0-9]", "/job7", True),
        ("/job[!0-9]", "/job7", False),
        ("ci", "/ci", True),
    ],
)
def test_glob(pattern: str, path: str, expected: bool) -> None:
    assert compile_glob(pattern).matches(path) is expected


def test_first_matching_rule_wins() -> None:
    policy = parse_policy(
        rule_text("", name="one", match="/ci/special")
        + rule_text("", name="two", match="/ci/*")
        + rule_text("", name="three", match="/**"),
        SRC,
    )
    assert [policy.rule_for(p).name for p in ("/ci/special", "/ci/x", "/a/b")] == [  # type: ignore[union-attr]
        "one",
        "two",
        "three",
    ]


# --- signals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["SIGUSR1", "USR1", "usr1", 10, "10"])
def test_signal_spellings(text: str | int) -> None:
    assert parse_signal(text) == signal.SIGUSR1


def test_realtime_signals() -> None:
    assert parse_signal("SIGRTMIN+3") == signal.SIGRTMIN + 3
    assert parse_signal("RTMAX-1") == signal.SIGRTMAX - 1


# --- validation: one line per problem, naming file, rule and key --------------------------------


def test_syntax_error_names_line() -> None:
    line = one_error('[[rule]]\nmatch = "/a"\ngrace = \n')
    assert line.startswith("policy.toml: line 3, column")
    assert "invalid TOML" in line


def test_bad_duration_message_matches_the_brief() -> None:
    line = one_error(rule_text('grace = "fast"'))
    assert line == (
        'policy.toml: rule "ci" (#1): key \'grace\': expected a duration like "2s", got "fast"'
    )


def test_unnamed_rule_is_named_by_position() -> None:
    line = one_error(rule_text("") + '[[rule]]\nmatch = "/x"\nmax_victims = 0\n')
    assert line == "policy.toml: rule #2: key 'max_victims': must be at least 1, got 0"


@pytest.mark.parametrize(
    ("body", "key", "fragment"),
    [
        ("grce = 1", "grce", "unknown key; did you mean 'grace'?"),
        ('memory = "lots"', "memory", 'expected a size like "64M"'),
        ("memory = 0", "memory", "must be greater than 0"),
        ("memory = 1.5", "memory", "got 1.5"),
        ("grow_budget = -1", "grow_budget", "must be at least 0"),
        ('grow_budget = "2"', "grow_budget", 'expected a whole number, got "2"'),
        ('deadline = "0s"', "deadline", "must be greater than 0"),
        ("grace = -1", "grace", "must be at least 0"),
        ("grace = true", "grace", "got true"),
        ('dry_run = "yes"', "dry_run", 'expected true or false, got "yes"'),
        ('strategy = "largset"', "strategy", "did you mean 'largest'?"),
        ('strategy = ""', "strategy", "expected one of auto, largest, growth"),
        ("steps = []", "steps", "got an empty list"),
        ('steps = "kill"', "steps", "expected a non-empty list"),
        ('steps = ["hold", "kil"]', "steps[2]", "did you mean 'kill'?"),
        ("steps = [3]", "steps[1]", "got 3"),
        ('steps = ["signal"]', "steps[1]", "write it as a table"),
        ('steps = ["exec"]', "steps[1]", "write it as a table"),
        ('steps = ["move"]', "steps[1]", "write it as a table"),
        ('steps = [{signal = "USR1"}]', "steps[1].kind", "needs kind="),
        ('steps = [{kind = "nap"}]', "steps[1].kind", 'got "nap"'),
        ('steps = [{kind = "signal"}]', "steps[1].signal", "needs signal="),
        ('steps = [{kind = "signal", signal = "SIGFOO"}]', "steps[1].signal", "unknown signal"),
        ('steps = [{kind = "signal", signal = "USR3"}]', "steps[1].signal", "did you mean"),
        ('steps = [{kind = "signal", signal = 0}]', "steps[1].signal", "no such signal"),
        ('steps = [{kind = "signal", signal = 1.5}]', "steps[1].signal", "expected a signal"),
        ('steps = [{kind = "signal", signal = "RTMIN+99"}]', "steps[1].signal", "out of range"),
        ('steps = [{kind = "signal", signal = 10, to = "some"}]', "steps[1].to", "victim, all"),
        ('steps = [{kind = "exec", argv = []}]', "steps[1].argv", "non-empty list"),
        ('steps = [{kind = "exec"}]', "steps[1].argv", "needs argv="),
        ('steps = [{kind = "exec", argv = "/bin/x y"}]', "steps[1].argv", "no shell is used"),
        ('steps = [{kind = "exec", argv = ["logger"]}]', "steps[1].argv", "absolute path"),
        ('steps = [{kind = "exec", argv = ["/x", 1]}]', "steps[1].argv", "must be a string"),
        (
            'steps = [{kind = "exec", argv = ["/x"], on_exit = {0 = "done"}}]',
            "steps[1].on_exit.0",
            "expected one of resolved, next",
        ),
        (
            'steps = [{kind = "exec", argv = ["/x"], on_exit = {256 = "next"}}]',
            "steps[1].on_exit.256",
            "exit status 0-255",
        ),
        (
            'steps = [{kind = "exec", argv = ["/x"], on_exit = "next"}]',
            "steps[1].on_exit",
            "expected a table",
        ),
        ('steps = [{kind = "exec", argv = ["/x"], timeout = 0}]', "steps[1].timeout", "than 0"),
        ('steps = [{kind = "move"}]', "steps[1].target", "needs target="),
        ('steps = [{kind = "move", target = "/a/../b"}]', "steps[1].target", '".."'),
        ('steps = [{kind = "grow", by = "x"}]', "steps[1].by", "expected a size"),
        ('steps = [{kind = "kill", strategy = "big"}]', "steps[1].strategy", "expected one of"),
        ('steps = [{kind = "kill", wait = "1s"}]', "steps[1].wait", "not an option of a kill"),
        ('steps = [{kind = "grow", strategy = "largest"}]', "steps[1].strategy", "options: by"),
        ('steps = [{kind = "hold", dry_run = 1}]', "steps[1].dry_run", "true or false"),
        ('protect = ["(oops"]', "protect[1]", 'invalid regex "(oops"'),
        ('protect = ["ok", {comm = "[z"}]', "protect[2].comm", 'invalid regex "[z"'),
        ('prefer = [{cmd = "x"}]', "prefer[1].cmd", "did you mean 'cmdline'?"),
        ("avoid = [{}]", "avoid[1]", "matches every process"),
        ("avoid = [{uid = -1}]", "avoid[1].uid", "expected a uid"),
        ("avoid = [{uid = []}]", "avoid[1].uid", "at least one uid"),
        ('avoid = [{uid = "root"}]', "avoid[1].uid", 'got "root"'),
        ("avoid = [1]", "avoid[1]", "expected a regex string or a table"),
        ('avoid = [{comm = ""}]', "avoid[1].comm", "expected a regular expression"),
        ('memory = "1G"\ngrow_max = "512M"', "grow_max", "ceiling 512M is below the memory"),
        (
            'memory = "1G"\ngrow_max = "1G"\nsteps = ["grow"]',
            "grow_max",
            "equals the memory limit",
        ),
        ('memory = "1G"\nmemsw = "512M"', "memsw", "below the memory limit 1G"),
        ('grow_budget = 0\nsteps = ["hold", "grow"]', "grow_budget", "can never act"),
        (
            'grow_budget = 0\nsteps = [{kind="exec", argv=["/x"], on_exit={1="grow"}}]',
            "grow_budget",
            "can never act",
        ),
        ('grace = "20s"', "grace", "longer than the deadline 10s"),
        ('settle = "11s"', "settle", "longer than the deadline 10s"),
        ('deadline = "1s"\ngrace = "500ms"\nsettle = "2s"', "settle", "deadline 1s"),
        ('steps = [{kind = "kill", grace = "1m"}]', "steps[1].grace", "deadline 10s"),
        (
            'steps = [{kind = "signal", signal = 10, wait = "30s"}]',
            "steps[1].wait",
            "deadline 10s",
        ),
        (
            'steps = [{kind = "exec", argv = ["/x"], timeout = "11s"}]',
            "steps[1].timeout",
            "deadline 10s",
        ),
        ('steps = ["hold", "kernel", "kill"]', "steps[3]", "is never reached"),
        ('match = "/a"', "match", "Cannot overwrite a value"),  # TOML itself: a duplicate key
    ],
)
def test_rule_validation(body: str, key: str, fragment: str) -> None:
    line = one_error(rule_text(body))
    if fragment == "Cannot overwrite a value":  # syntax errors come from tomllib, by line
        assert line.startswith("policy.toml: line 4, column") and "invalid TOML" in line
        return
    prefix = f"policy.toml: rule \"ci\" (#1): key '{key}': "
    assert line.startswith(prefix), line
    assert fragment in line, line


def test_bad_match_glob() -> None:
    line = one_error('[[rule]]\nmatch = "/ci/job**"\n')
    assert line.startswith("policy.toml: rule #1: key 'match': ")
    assert "whole path segment" in line
    line = one_error('[[rule]]\nmatch = ""\n')
    assert line.startswith("policy.toml: rule #1: key 'match': ")


def test_missing_match() -> None:
    line = one_error('[[rule]]\nname = "x"\n')
    assert line.startswith("policy.toml: rule \"x\" (#1): key 'match': missing")


def test_duplicate_names_and_matches() -> None:
    lines = errors(rule_text("", "a", "/x") + rule_text("", "a", "/y") + rule_text("", "b", "x/"))
    assert lines == [
        'policy.toml: rule "a" (#2): key \'name\': "a" is already the name of rule #1',
        'policy.toml: rule "b" (#3): key \'match\': rule #1 has the same match "x/" and comes '
        "first, so this rule is never used",
    ]


def test_defaults_errors_and_origin_note() -> None:
    lines = errors('[defaults]\ngrace = "x"\nname = "n"\nmatch = "/a"\ngrase = 1\n' + rule_text(""))
    assert lines == [
        'policy.toml: [defaults]: key \'grace\': expected a duration like "2s", got "x"',
        "policy.toml: [defaults]: key 'name': 'name' belongs in a [[rule]], not in [defaults]",
        "policy.toml: [defaults]: key 'match': 'match' belongs in a [[rule]], not in [defaults]",
        "policy.toml: [defaults]: key 'grase': unknown key; did you mean 'grace'?",
    ]
    line = one_error('[defaults]\ngrace = "15s"\n' + rule_text(""))
    assert line.startswith("policy.toml: rule \"ci\" (#1): key 'grace': 15s is longer")
    assert line.endswith("(from [defaults])")


def test_top_level_errors() -> None:
    assert one_error('[[rules]]\nmatch = "/a"\n') == (
        "policy.toml: key 'rules': unknown key; did you mean 'rule'? "
        "(expected [defaults] and [[rule]] tables)"
    )
    assert "write [[rule]]" in one_error('[rule]\nmatch = "/a"\n')
    assert "expected [[rule]] tables" in one_error("rule = 3\n")
    assert "expected a [defaults] table" in one_error("defaults = 3\n" + rule_text(""))
    assert one_error("") == 'policy.toml: no [[rule]] tables; add one, e.g. [[rule]] match = "/**"'
    assert one_error("rule = [1]\n") == ("policy.toml: rule #1: expected a [[rule]] table, got 1")


def test_all_problems_are_reported_together() -> None:
    lines = errors(
        rule_text('grace = "x"\nsteps = ["kil", {kind="signal"}]\nprotect = ["("]')
        + '[[rule]]\nmatch = "/b"\nmemory = "big"\n'
    )
    keys = [line.split(": ")[2] for line in lines]
    assert keys == [
        "key 'grace'",
        "key 'steps[1]'",
        "key 'steps[2].signal'",
        "key 'protect[1]'",
        "key 'memory'",
    ]
    assert lines[-1].startswith("policy.toml: rule #2: ")


def test_psi_early_warning_option() -> None:
    from oomguard.policy import Pressure

    rule = only_rule(rule_text('psi = "some 150ms 1s"'))
    assert rule.psi == Pressure("some", 0.15, 1.0)
    assert rule.psi.describe() == "some 150ms 1s"
    assert only_rule(rule_text('psi = "full 2s 10s"')).psi == Pressure("full", 2.0, 10.0)
    assert only_rule(rule_text("")).psi is None
    for bad, fragment in [('"most 1s 2s"', "some|full"), ('"some 1s"', "some|full"),
                          ('"some soon 2s"', "some|full"), ('"some 100ms 20s"', "500ms..10s"),
                          ('"some 2s 1s"', "below the window"), ("3", "some|full")]:
        line = one_error(rule_text(f"psi = {bad}"))
        assert "key 'psi'" in line and fragment in line, line
