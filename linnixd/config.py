"""The policy file: its schema, loading with FILE:LINE problems, and check-config.

The rule sections come from the rule registry (linnixd/registry.py: each rule's settings
model); pydantic itself is behind linnixd/settings.py (pydantic 1.10 and 2.x). The model
field defaults are the shipped policy/rules.yaml (a test keeps the two equal).

Loading is two passes over the YAML node tree (never a constructed Python tree, so alias
bombs cost nothing): a structural pass that knows each field's type from the models and
reports unknown or duplicate keys and wrong types with the exact line, then pydantic for the
bounds, whose errors are mapped back to their node's line and reworded so that pydantic 1
and 2 print identical lines.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
import stat
import sys
import typing
from typing import TYPE_CHECKING, Any, Literal, TextIO, TypeVar

import yaml

from .constants import EXIT_CONFIG, EXIT_OK, EXIT_SOFTWARE, EXIT_USAGE, MAX_ACTION_S
from .registry import RULE_NAMES, RULES, rule_of
from .settings import (
    MAX_CPU_PCT,
    Field,
    RuleSettings,
    Settings,
    ValidationError,
    compose,
    dump,
    field_types,
    seconds,
    validate_field,
)

__all__ = ["RULE_NAMES", "Policy", "PolicyError", "RuleSettings", "check_config", "load_policy"]

S = TypeVar("S", bound=RuleSettings)

MAX_FILE_BYTES = 256 << 10  # a policy is a few KiB; this bounds parse time (~1 s) and memory
MAX_PROBLEMS = 50  # lines printed for one file; the rest are counted in a last line
MAX_SHOWN_CHARS = 40  # a bad value is quoted up to this length in a problem line


class PolicyError(Exception):
    """A policy file that cannot be used; `problems` are `FILE:LINE: FIELD: what` lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class DaemonSettings(Settings):
    """The `daemon` section: tick, model caps, short-lived limit and history retention."""

    tick_s: float = Field(0.5, ge=0.1, le=60)
    # ticks this far apart while the host is calm (daemon.py CALM_*); <= tick_s turns it off
    calm_tick_s: float = Field(1.0, ge=0.1, le=60)
    # bpf/sched.c attributes stalls only while the host shows CPU pressure, or always
    stall_attribution: Literal["pressure", "always"] = "pressure"
    max_processes: int = Field(32768, ge=16, le=4194304)  # 4194304 = the kernel's PID_MAX_LIMIT
    max_cgroups: int = Field(4096, ge=16, le=1048576)
    short_lived_s: float = seconds(1.0)
    history_days: int = Field(30, ge=1, le=3650)
    history_max: int = Field(100000, ge=1, le=100_000_000)
    # node_exporter's textfile directory; used when it exists, "" turns the metrics file off
    metrics_dir: str = "/var/lib/prometheus/node-exporter"
    metrics_interval_s: float = Field(15.0, ge=1, le=3600)
    metrics_top_k: int = Field(20, ge=1, le=500)  # units/pods with a series of their own


if TYPE_CHECKING:
    Rules = Settings
else:
    Rules = compose(
        "Rules",
        "One section per rule (linnixd/registry.py); a missing section is that rule with its defaults.",
        {rule.name: rule.settings for rule in RULES},
    )


ActionType = Literal["none", "throttle_cpu", "limit_memory", "freeze", "kill"]


def _one_action_per_rule(cls: Any, actions: tuple[Any, ...]) -> tuple[Any, ...]:
    seen: set[str] = set()
    for action in actions:
        if action.rule in seen:
            raise ValueError(f"rule {action.rule} has more than one action")
        seen.add(action.rule)
    return actions


class RuleAction(Settings):
    """What enforcement does to the unit (or process) a rule blames, and for how long."""

    rule: Literal[RULE_NAMES]  # type: ignore[valid-type]
    type: ActionType = "none"
    cpu_pct: float = Field(
        20.0, gt=0, le=MAX_CPU_PCT
    )  # throttle_cpu: CPUQuota=, percent of one CPU
    memory_high_mb: float = Field(512.0, gt=0, le=1 << 30)  # limit_memory: MemoryHigh=
    duration_s: float = Field(
        300.0, gt=0, le=MAX_ACTION_S
    )  # reverted after this long (or when resolved)
    signal: Literal["TERM", "KILL"] = "TERM"  # kill: the signal sent to the culprit process


class Enforcement(Settings):
    """The `enforcement` section: per-rule actions, the rate limit and extra protected units."""

    max_actions_per_min: int = Field(6, ge=1, le=600)
    protected_units: tuple[str, ...] = ()  # fnmatch globs never acted on, besides the built-in list
    actions: tuple[RuleAction, ...] = ()

    check_one_action_per_rule = validate_field("actions")(_one_action_per_rule)


class Policy(Settings):
    """The whole policy file."""

    version: Literal[1] = 1
    daemon: DaemonSettings = Field(default_factory=DaemonSettings)
    rules: Rules = Field(default_factory=Rules)
    enforcement: Enforcement = Field(default_factory=Enforcement)

    def action_for(self, rule: str) -> RuleAction | None:
        """The action configured for `rule`, or None when it only alerts (the default)."""
        for action in self.enforcement.actions:
            if action.rule == rule and action.type != "none":
                return action
        return None

    def rule(self, name: str) -> RuleSettings:
        """The section of rule `name`; KeyError for a name that is not a rule."""
        if name not in RULE_NAMES:
            raise KeyError(f"unknown rule {name!r}")
        section: RuleSettings = getattr(self.rules, name)
        return section

    def settings(self, model: type[S]) -> S:
        """The section whose settings model is `model` (typed: policy.settings(PsiSaturation))."""
        section = self.rule(rule_of(model).name)
        assert isinstance(section, model)
        return section

    def enabled_rules(self) -> list[str]:
        """Names of the enabled rules, in the policy's canonical order."""
        return [name for name in RULE_NAMES if self.rule(name).enabled]

    def as_dict(self) -> dict[str, Any]:
        """Plain data (tuples become lists), the shape of the YAML file."""
        return _plain(dump(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---- loading ------------------------------------------------------------------------------


class _Invalid(Exception):
    """One problem found while reading a value: the walker turns it into a line."""


_SKIP = object()  # a value that had a problem: left out so the model default stands in

_YAML12_NUMBER = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_STD_TAG = "tag:yaml.org,2002:"
_MAP_TAG = _STD_TAG + "map"
_SEQ_TAG = _STD_TAG + "seq"


def _short_tag(tag: str) -> str:
    return "!!" + tag.removeprefix(_STD_TAG) if tag.startswith(_STD_TAG) else tag


def _looks_numeric(node: yaml.Node, value: Any) -> bool:
    """An unquoted YAML 1.2 number that PyYAML (YAML 1.1) left a string, such as 1e3."""
    plain = isinstance(value, str) and getattr(node, "style", None) is None
    return plain and bool(_YAML12_NUMBER.fullmatch(value))


class _Reader:
    """Walks the YAML node tree along the models, collecting problems and plain data."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[tuple[int, str]] = []  # (line, text): sorted by line when raised
        self._constructor = yaml.constructor.SafeConstructor()

    def problem(self, node: yaml.Node, field: str, what: str) -> None:
        line = node.start_mark.line + 1
        self.problems.append((line, f"{self.path}:{line}: {field}: {what}"))

    # -- scalars

    def scalar(self, node: yaml.Node, wanted: str) -> Any:
        """The Python value of a scalar node (YAML 1.1 safe types); `wanted` names the type."""
        if not isinstance(node, yaml.ScalarNode):
            raise _Invalid(f"expected {wanted}, got {self.describe(node)}")
        if not node.tag.startswith(_STD_TAG):
            raise _Invalid(f"unsupported YAML tag {_short_tag(node.tag)}")
        try:
            return self._constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, OverflowError) as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            raise _Invalid(f"cannot read value: {problem}") from None

    def number(self, node: yaml.Node) -> float:
        value = self.scalar(node, "a number")
        if _looks_numeric(node, value):
            value = float(value)  # PyYAML reads 1e3 (YAML 1.2, no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(f"expected a number, got {self.describe(node)}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise _Invalid(f"must be a finite number (got {self.describe(node)})")
        return number

    def integer(self, node: yaml.Node) -> int:
        value = self.scalar(node, "a whole number")
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected a whole number, got {self.describe(node)}")
        return value

    def boolean(self, node: yaml.Node) -> bool:
        value = self.scalar(node, "true or false")
        if not isinstance(value, bool):
            raise _Invalid(f"expected true or false, got {self.describe(node)}")
        return value

    def string(self, node: yaml.Node) -> str:
        value = self.scalar(node, "a string")
        if not isinstance(value, str):
            raise _Invalid(f"expected a string, got {self.describe(node)}")
        if not value:
            raise _Invalid("must not be empty")
        return value

    def choice(self, node: yaml.Node, allowed: tuple[Any, ...]) -> Any:
        options = ", ".join(str(o) for o in allowed)
        wanted = options if len(allowed) == 1 else f"one of {options}"
        value = self.scalar(node, wanted)
        for option in allowed:
            if type(value) is type(option) and value == option:
                return option
        raise _Invalid(f"must be {wanted} (got {self.describe(node)})")

    def describe(self, node: yaml.Node) -> str:
        """A bad value as the problem line quotes it: 'high', -5, null, true, a list, a mapping."""
        if isinstance(node, yaml.SequenceNode):
            return "a list"
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        try:
            value = self._constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, OverflowError):  # shown as written instead
            return _clip(node.value)
        if value is None:
            return "null"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str) and not _looks_numeric(node, value):
            return "'" + _clip(value).replace("'", "\\'") + "'"
        return _clip(str(node.value))

    # -- structure

    def value(self, annotation: Any, node: yaml.Node, field: str) -> Any:
        """The plain value of `node` for a field typed `annotation`, or _SKIP after a problem."""
        try:
            if isinstance(annotation, type) and issubclass(annotation, Settings):
                return self.mapping(annotation, node, field)
            if typing.get_origin(annotation) is tuple:
                return self.sequence(typing.get_args(annotation)[0], node, field)
            if typing.get_origin(annotation) is Literal:
                return self.choice(node, typing.get_args(annotation))
            if annotation is float:
                return self.number(node)
            if annotation is bool:
                return self.boolean(node)
            if annotation is int:
                return self.integer(node)
            return self.string(node)
        except _Invalid as exc:
            self.problem(node, field, str(exc))
            return _SKIP

    def sequence(self, item: Any, node: yaml.Node, field: str) -> Any:
        if not isinstance(node, yaml.SequenceNode):
            raise _Invalid(f"expected a list, got {self.describe(node)}")
        if node.tag != _SEQ_TAG:
            raise _Invalid(f"unsupported YAML tag {_short_tag(node.tag)}")
        choices = typing.get_origin(item) is Literal
        if choices and not node.value:
            options = ", ".join(typing.get_args(item))
            raise _Invalid(f"must not be empty (one or more of {options})")
        items: list[Any] = []
        for i, child in enumerate(node.value):
            got = self.value(item, child, f"{field}[{i}]")
            if got is _SKIP:
                continue
            if choices and got in items:
                self.problem(child, f"{field}[{i}]", f"duplicate item '{got}'")
                continue
            items.append(got)
        return tuple(items)

    def mapping(self, model: type[Settings], node: yaml.Node, field: str) -> Any:
        if not isinstance(node, yaml.MappingNode):
            raise _Invalid(f"expected a mapping, got {self.describe(node)}")
        if node.tag != _MAP_TAG:
            raise _Invalid(f"unsupported YAML tag {_short_tag(node.tag)}")
        types = field_types(model)
        out: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(key_node, field or "(top level)", "keys must be plain names")
                continue
            key = key_node.value
            path = f"{field}.{key}" if field else key
            if key == "<<":
                self.problem(key_node, path, "YAML merge keys are not supported; repeat the fields")
                continue
            if key in first_line:
                self.problem(key_node, path, f"duplicate key (first at line {first_line[key]})")
                continue
            first_line[key] = key_node.start_mark.line + 1
            if key not in types:
                self.problem(key_node, path, _unknown(model, key, list(types)))
                continue
            got = self.value(types[key], value_node, path)
            if got is not _SKIP:
                out[key] = got
        return out


def _clip(text: str) -> str:
    return text if len(text) <= MAX_SHOWN_CHARS else text[: MAX_SHOWN_CHARS - 3] + "..."


def _unknown(model: type[Settings], key: str, known: list[str]) -> str:
    what = "unknown rule" if model is Rules else "unknown field"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"{what} (did you mean {close[0]}?)"
    return f"{what} (expected one of {', '.join(known)})"


def _field_nodes(root: yaml.Node, loc: tuple[Any, ...]) -> tuple[yaml.Node, yaml.Node | None]:
    """The key node naming a pydantic error location (else its nearest parent), its value node."""
    key, value = root, root
    for part in loc:
        if not isinstance(value, yaml.MappingNode):
            return key, None
        pair = next(((k, v) for k, v in reversed(value.value) if k.value == part), None)
        if pair is None:
            return key, None
        key, value = pair
    return key, value


# pydantic 1 error types and pydantic 2 error types -> one wording.
_BOUNDS = {
    "value_error.number.not_gt": "must be greater than",
    "greater_than": "must be greater than",
    "value_error.number.not_ge": "must be at least",
    "greater_than_equal": "must be at least",
    "value_error.number.not_lt": "must be less than",
    "less_than": "must be less than",
    "value_error.number.not_le": "must be at most",
    "less_than_equal": "must be at most",
}


def _number_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def _pydantic_problem(reader: _Reader, root: yaml.Node, error: dict[str, Any]) -> None:
    loc = tuple(error.get("loc", ()))
    field = ".".join(str(p) for p in loc) or "(top level)"
    key, value = _field_nodes(root, loc)
    bound = _BOUNDS.get(str(error.get("type")))
    if bound is not None:
        ctx = error.get("ctx") or {}
        limit = next(iter(ctx.values()), "?")
        what = f"{bound} {_number_text(limit)}"
        if value is not None:
            what += f" (got {reader.describe(value)})"
    else:
        what = "invalid value: " + str(error.get("msg", "")).removeprefix("Value error, ")
    reader.problem(key, field, what)


class _PolicyLoader(yaml.SafeLoader):
    """SafeLoader whose alias nodes carry the alias's own position, so problems point at the use."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if not self.check_event(yaml.AliasEvent):
            return super().compose_node(parent, index)
        mark = self.peek_event().start_mark
        node = super().compose_node(parent, index)
        if node is None:
            return None
        alias = copy.copy(node)  # shallow: shares the children, so an alias bomb stays small
        alias.start_mark = mark
        return alias


_TOP_LEVEL = "a mapping with version, daemon and rules"


def _compose(path: str) -> yaml.Node:
    """The file's YAML node tree; PolicyError for anything that is not one YAML mapping."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it would stall the daemon's loop)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise PolicyError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "cannot read: Is a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise PolicyError([f"{path}: {what}"])
    with os.fdopen(fd, "rb") as f:
        try:
            raw = f.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise PolicyError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise PolicyError([f"{path}: too large for a policy file (over {MAX_FILE_BYTES} bytes)"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        bad = f"not UTF-8 text (byte 0x{raw[exc.start]:02x})"
        raise PolicyError([f"{path}:{line}: {bad}"]) from None
    try:
        # The pure-Python composer: libyaml's recursion is not bounded by Python's limit.
        root = yaml.compose(text, Loader=_PolicyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{mark.line + 1}:{mark.column + 1}" if mark else "1:1"
        problem = exc.problem or exc.context or "invalid YAML"
        if problem.startswith("but ") and exc.context:  # "expected X" is in the context
            problem = f"{exc.context}, {problem}"
        raise PolicyError([f"{path}:{where}: YAML syntax error: {problem}"]) from None
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        code = ord(exc.character) if isinstance(exc.character, str) else exc.character
        problem = f"unacceptable character #x{code:04x}: {exc.reason}"
        raise PolicyError([f"{path}:{line}:{column}: YAML syntax error: {problem}"]) from None
    except RecursionError:
        raise PolicyError([f"{path}: YAML nested too deeply"]) from None
    if root is None:
        raise PolicyError([f"{path}: empty policy file (expected {_TOP_LEVEL})"])
    if not isinstance(root, yaml.MappingNode):
        got = "a list" if isinstance(root, yaml.SequenceNode) else "a single value"
        line = root.start_mark.line + 1
        raise PolicyError([f"{path}:{line}: (top level): expected {_TOP_LEVEL}, got {got}"])
    return root


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read and validate a policy file; PolicyError lists every problem found, one line each."""
    name = str(path)
    root = _compose(name)
    reader = _Reader(name)
    data = reader.mapping(Policy, root, "")
    policy: Policy | None = None
    try:
        policy = Policy(**data)
    except ValidationError as exc:
        for error in exc.errors():
            _pydantic_problem(reader, root, dict(error))
    if reader.problems or policy is None:
        lines = [text for _, text in sorted(reader.problems, key=lambda p: p[0])]
        if len(lines) > MAX_PROBLEMS:
            more = len(lines) - MAX_PROBLEMS
            lines = [*lines[:MAX_PROBLEMS], f"{name}: ... and {more} more problems"]
        raise PolicyError(lines)
    return policy


def check_config(path: str, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Validate one policy file: an OK line on `out` (0), or one line per problem on `err` (78)."""
    out = out or sys.stdout  # looked up per call: tests and the CLI may swap sys.stdout
    err = err or sys.stderr
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=err)
        return EXIT_CONFIG
    except Exception as exc:  # a bug in here must still be one line, not a traceback
        print(f"{path}: internal error while checking: {type(exc).__name__}: {exc}", file=err)
        return EXIT_SOFTWARE
    enabled = policy.enabled_rules()
    count = f"{len(enabled)} rule{'' if len(enabled) == 1 else 's'} enabled"
    print(f"{path}: OK ({count}{': ' + ', '.join(enabled) if enabled else ''})", file=out)
    return EXIT_OK


def main_check_config(argv: list[str]) -> int:
    """`linnixd --check-config FILE` and `linnixctl check-config FILE`: the worst exit code."""
    if not argv or any(a.startswith("-") for a in argv):
        print("usage: check-config FILE...", file=sys.stderr)
        return EXIT_USAGE
    return max(check_config(a) for a in argv)
