"""The rule registry: one entry per rule, and everything that names rules agrees with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from linnixd import config
from linnixd.constants import MESSAGE_IDS
from linnixd.detectors import all_detectors
from linnixd.detectors.base import COLLECTORS
from linnixd.detectors.memory import MemoryLeak
from linnixd.detectors.pressure import PsiSaturation
from linnixd.registry import BY_NAME, RULE_NAMES, RULES, collectors_for, rule_of
from linnixd.settings import RuleSettings, Settings, ValidationError, compose, dump, field_names

SHIPPED = Path(__file__).resolve().parent.parent / "policy" / "rules.yaml"


def test_names_come_from_the_registry() -> None:
    assert config.RULE_NAMES == RULE_NAMES == tuple(r.name for r in RULES)
    assert len(set(RULE_NAMES)) == len(RULE_NAMES)
    assert all(re.fullmatch(r"[a-z][a-z0-9_]{0,63}", n) for n in RULE_NAMES)
    assert [d.rule for d in all_detectors()] == list(RULE_NAMES)
    assert field_names(config.Rules) == list(RULE_NAMES)
    assert list(config.Policy().as_dict()["rules"]) == list(RULE_NAMES)


def test_every_rule_has_a_message_id_and_ids_are_distinct() -> None:
    missing = [n for n in RULE_NAMES if n not in MESSAGE_IDS]
    assert missing == []
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in MESSAGE_IDS.values())
    assert len(set(MESSAGE_IDS.values())) == len(MESSAGE_IDS)


def test_each_rule_declares_settings_and_collectors() -> None:
    policy = config.Policy()
    for rule in RULES:
        assert issubclass(rule.settings, RuleSettings) and rule.settings is not RuleSettings
        assert rule.detector.settings is rule.settings and rule.detector.rule == rule.name
        assert rule.needs <= set(COLLECTORS), rule.name
        section = policy.rule(rule.name)
        assert type(section) is rule.settings  # the schema holds the rule's own model
        assert rule_of(rule.settings) is rule
        # pure and total on an empty window with its defaults
        assert rule.detector.evaluate([], rule.settings()) == []


def test_collectors_follow_the_enabled_rules() -> None:
    assert collectors_for(RULE_NAMES) == {"lifecycle", "sched", "psi_triggers", "net"}
    assert collectors_for(["noisy_neighbour"]) == {"sched"}
    assert collectors_for(["cpu_spike", "fork_storm"]) == {"sched", "lifecycle"}
    assert collectors_for(["memory_leak", "fd_exhaustion"]) == frozenset()
    assert collectors_for(["psi_saturation", "no_such_rule"]) == {"psi_triggers"}
    sched_rules = {r.name for r in RULES if "sched" in r.needs}
    assert sched_rules == {"cpu_spike", "runaway_tree", "noisy_neighbour", "circuit_breaker"}
    net_rules = {r.name for r in RULES if "net" in r.needs}
    assert net_rules == {"connection_churn", "tcp_retransmits", "port_exhaustion"}


def test_shipped_policy_lists_every_rule_with_its_defaults() -> None:
    shipped = yaml.safe_load(SHIPPED.read_text())["rules"]
    assert list(shipped) == list(RULE_NAMES)
    for name, section in shipped.items():
        defaults = config.Policy().as_dict()["rules"][name]
        assert {k: defaults[k] for k in section} == config._plain(section), name


def test_typed_settings_and_lookback() -> None:
    policy = config.Policy()
    psi = policy.settings(PsiSaturation)
    assert isinstance(psi, PsiSaturation) and psi.resources == ("cpu", "io", "memory")
    assert policy.settings(MemoryLeak).lookback_s() == 60.0
    assert BY_NAME["fork_storm"].settings().lookback_s() == 2.0  # sustain_s
    assert BY_NAME["fd_exhaustion"].settings().lookback_s() == 0.0  # looks at the newest only
    with pytest.raises(KeyError):
        rule_of(RuleSettings)


def test_settings_reject_unknown_and_out_of_bounds_fields() -> None:
    with pytest.raises(ValidationError):
        BY_NAME["fork_storm"].settings(rate_per_sec=5)
    with pytest.raises(ValidationError):
        BY_NAME["fork_storm"].settings(rate_per_s=0)
    with pytest.raises(ValidationError):
        BY_NAME["psi_saturation"].settings(resources=["cpu", "disk"])


def test_compose_builds_a_schema_section_per_entry() -> None:
    """What a new registry entry gets: a section in the schema, defaulted, validated, frozen."""

    class Example(RuleSettings):
        limit: int = 3

    schema = compose(
        "Example", "doc", {"example": Example, "fork_storm": BY_NAME["fork_storm"].settings}
    )
    assert issubclass(schema, Settings) and field_names(schema) == ["example", "fork_storm"]
    made = schema(example={"limit": 5, "exclude": {"comms": ["x"]}})
    assert made.example == Example(limit=5, exclude={"comms": ["x"]})  # type: ignore[attr-defined]
    assert dump(schema())["example"]["limit"] == 3
    with pytest.raises(ValidationError):
        schema(example={"limit": 5, "nope": 1})
    with pytest.raises(ValidationError):
        schema(other={})
