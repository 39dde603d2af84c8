"""The policy loader: shipped file, defaults, and one exact problem line per kind of bad input."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from linnixd.config import (
    MAX_FILE_BYTES,
    RULE_NAMES,
    Policy,
    PolicyError,
    check_config,
    load_policy,
)
from linnixd.constants import EXIT_CONFIG, EXIT_OK, EXIT_USAGE

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "policy" / "rules.yaml"
# sys.executable is /usr/bin/python3 here; under a pydantic 2 venv it checks pydantic 2.
CHECK = "import sys; from linnixd.config import main_check_config; sys.exit(main_check_config(sys.argv[1:]))"


def run_check(*files: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHECK, *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def write(tmp_path: Path, text: str, name: str = "rules.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_shipped_policy_loads_with_every_rule_enabled() -> None:
    policy = load_policy(SHIPPED)
    assert policy.enabled_rules() == list(RULE_NAMES)
    assert policy.daemon.tick_s == 0.5
    assert policy.daemon.max_processes == 32768
    assert policy.rules.fork_storm.rate_per_s == 10
    assert policy.rule("fork_storm") is policy.rules.fork_storm
    assert policy.rule("psi_saturation").severity == "critical"
    assert policy.rules.psi_saturation.resources == ("cpu", "io", "memory")
    assert policy.rules.memory_leak.scope == ("process", "cgroup")
    assert policy.rules.cpu_spike.exclude.comms == ()
    with pytest.raises(KeyError):
        policy.rule("fork_strom")


def test_model_defaults_equal_the_shipped_file() -> None:
    shipped = yaml.safe_load(SHIPPED.read_text())
    assert Policy().as_dict() == shipped
    # Same keys and types too: 300 == 300.0 would hide an int where a float belongs.
    for name in RULE_NAMES:
        defaults = Policy().as_dict()["rules"][name]
        assert sorted(defaults) == sorted(shipped["rules"][name])
        for key, value in shipped["rules"][name].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert float(defaults[key]) == float(value), (name, key)


def test_missing_sections_mean_defaults_and_partial_sections_keep_the_rest(tmp_path: Path) -> None:
    bare = load_policy(write(tmp_path, "version: 1\n"))
    assert bare.as_dict() == load_policy(SHIPPED).as_dict()
    text = "rules:\n  cpu_spike:\n    cpu_pct: 75\n    exclude: {comms: [make, 'cc1*']}\n  fork_storm: {enabled: false}\n"
    policy = load_policy(write(tmp_path, text))
    assert policy.rules.cpu_spike.cpu_pct == 75.0
    assert policy.rules.cpu_spike.sustain_s == 5.0
    assert policy.rules.cpu_spike.exclude.comms == ("make", "cc1*")
    assert policy.rules.cpu_spike.exclude.units == ()
    assert "fork_storm" not in policy.enabled_rules()
    assert len(policy.enabled_rules()) == len(RULE_NAMES) - 1


def test_yaml_1_2_numbers_and_aliases_are_accepted(tmp_path: Path) -> None:
    text = (
        "rules:\n"
        "  memory_leak: {min_growth_mb: 1e3, window_s: 120}\n"
        "  cpu_spike:\n    exclude: &ex {units: [backup.service]}\n"
        "  runaway_tree:\n    exclude: *ex\n"
    )
    policy = load_policy(write(tmp_path, text))
    assert policy.rules.memory_leak.min_growth_mb == 1000.0
    assert policy.rules.runaway_tree.exclude.units == ("backup.service",)


def test_policy_is_immutable() -> None:
    policy = load_policy(SHIPPED)
    # pydantic 1 raises TypeError, pydantic 2 a ValidationError (a ValueError).
    with pytest.raises((TypeError, ValueError)):
        policy.daemon.tick_s = 5.0  # type: ignore[misc]
    with pytest.raises((TypeError, ValueError)):
        policy.rules.fork_storm.rate_per_s = 1.0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        policy.rules.cpu_spike.exclude.comms.append("x")  # type: ignore[attr-defined]


def test_check_config_ok_line(tmp_path: Path) -> None:
    result = run_check(str(SHIPPED))
    assert result.returncode == EXIT_OK
    assert result.stderr == ""
    assert (
        result.stdout
        == f"{SHIPPED}: OK ({len(RULE_NAMES)} rules enabled: {', '.join(RULE_NAMES)})\n"
    )
    path = write(
        tmp_path, "rules:\n" + "".join(f"  {n}: {{enabled: false}}\n" for n in RULE_NAMES[1:])
    )
    out, err = io.StringIO(), io.StringIO()
    assert check_config(path, out=out, err=err) == EXIT_OK
    assert (out.getvalue(), err.getvalue()) == (f"{path}: OK (1 rule enabled: fork_storm)\n", "")


# (policy text, expected stderr lines with {f} for the file name)
BAD = {
    "negative_rate": (
        "version: 1\nrules:\n  fork_storm:\n    rate_per_s: -5\n",
        ["{f}:4: rules.fork_storm.rate_per_s: must be greater than 0 (got -5)"],
    ),
    "misspelt_rule": (
        "rules:\n  fork_strom:\n    enabled: true\n",
        ["{f}:2: rules.fork_strom: unknown rule (did you mean fork_storm?)"],
    ),
    "unknown_rule_no_match": (
        "rules:\n  zzz: {}\n",
        ["{f}:2: rules.zzz: unknown rule (expected one of " + ", ".join(RULE_NAMES) + ")"],
    ),
    "misspelt_field": (
        "daemon:\n  tick_s: 1\n  max_procs: 10\n",
        ["{f}:3: daemon.max_procs: unknown field (did you mean max_processes?)"],
    ),
    "word_for_number": (
        "rules:\n  cpu_spike:\n    cpu_pct: high\n",
        ["{f}:3: rules.cpu_spike.cpu_pct: expected a number, got 'high'"],
    ),
    "quoted_number": (
        "rules:\n  cpu_spike:\n    cpu_pct: '50'\n",
        ["{f}:3: rules.cpu_spike.cpu_pct: expected a number, got '50'"],
    ),
    "bool_for_number": (
        "daemon:\n  tick_s: yes\n",
        ["{f}:2: daemon.tick_s: expected a number, got true"],
    ),
    "fraction_for_count": (
        "rules:\n  fork_storm: {top: 2.5}\n",
        ["{f}:2: rules.fork_storm.top: expected a whole number, got 2.5"],
    ),
    "top_out_of_range": (
        "rules:\n  psi_saturation:\n    top: 51\n",
        ["{f}:3: rules.psi_saturation.top: must be at most 50 (got 51)"],
    ),
    "percent_over_100": (
        "rules:\n  fd_exhaustion:\n    system_pct: 150\n",
        ["{f}:3: rules.fd_exhaustion.system_pct: must be at most 100 (got 150)"],
    ),
    "r2_zero": (
        "rules:\n  memory_leak:\n    min_r2: 0\n",
        ["{f}:3: rules.memory_leak.min_r2: must be greater than 0 (got 0)"],
    ),
    "negative_cooldown": (
        "rules:\n  cpu_spike:\n    cooldown_s: -1\n",
        ["{f}:3: rules.cpu_spike.cooldown_s: must be at least 0 (got -1)"],
    ),
    "window_too_long": (
        "rules:\n  noisy_neighbour:\n    window_s: 3601\n",
        ["{f}:3: rules.noisy_neighbour.window_s: must be at most 3600 (got 3601)"],
    ),
    "huge_number": (
        "rules:\n  cpu_spike:\n    sustain_s: 1e400\n    cpu_pct: 1.0e+400\n",
        [
            "{f}:3: rules.cpu_spike.sustain_s: must be a finite number (got 1e400)",
            "{f}:4: rules.cpu_spike.cpu_pct: must be a finite number (got 1.0e+400)",
        ],
    ),
    "huge_integer": (
        "daemon:\n  max_cgroups: " + "9" * 60 + "\n",
        [
            "{f}:2: daemon.max_cgroups: must be at most 1048576 (got 9999999999999999999999999999999999999...)"
        ],
    ),
    "bad_severity": (
        "rules:\n  cpu_spike: {severity: urgent}\n",
        [
            "{f}:2: rules.cpu_spike.severity: must be one of info, notice, warning, critical (got 'urgent')"
        ],
    ),
    "bad_enabled": (
        "rules:\n  cpu_spike:\n    enabled: maybe\n",
        ["{f}:3: rules.cpu_spike.enabled: expected true or false, got 'maybe'"],
    ),
    "version_2": (
        "version: 2\n",
        ["{f}:1: version: must be 1 (got 2)"],
    ),
    "string_for_list": (
        "rules:\n  cpu_spike:\n    exclude:\n      comms: make\n",
        ["{f}:4: rules.cpu_spike.exclude.comms: expected a list, got 'make'"],
    ),
    "bad_list_items": (
        "rules:\n  cpu_spike:\n    exclude:\n      cgroups:\n        - 12\n        - ''\n        - [a]\n",
        [
            "{f}:5: rules.cpu_spike.exclude.cgroups[0]: expected a string, got 12",
            "{f}:6: rules.cpu_spike.exclude.cgroups[1]: must not be empty",
            "{f}:7: rules.cpu_spike.exclude.cgroups[2]: expected a string, got a list",
        ],
    ),
    "bad_resources": (
        "rules:\n  psi_saturation:\n    resources: [cpu, cpu, disk]\n  memory_leak:\n    scope: []\n",
        [
            "{f}:3: rules.psi_saturation.resources[1]: duplicate item 'cpu'",
            "{f}:3: rules.psi_saturation.resources[2]: must be one of cpu, io, memory (got 'disk')",
            "{f}:5: rules.memory_leak.scope: must not be empty (one or more of process, cgroup)",
        ],
    ),
    "nulls": (
        "daemon:\nrules:\n  cpu_spike:\n    exclude: {units: null}\n    cpu_pct:\n",
        [
            "{f}:1: daemon: expected a mapping, got null",
            "{f}:4: rules.cpu_spike.exclude.units: expected a list, got null",
            "{f}:5: rules.cpu_spike.cpu_pct: expected a number, got null",
        ],
    ),
    "duplicate_keys": (
        "rules:\n  fork_storm:\n    rate_per_s: 5\n    rate_per_s: 50\n  fork_storm: {}\n",
        [
            "{f}:4: rules.fork_storm.rate_per_s: duplicate key (first at line 3)",
            "{f}:5: rules.fork_storm: duplicate key (first at line 2)",
        ],
    ),
    "tags_and_merge_keys": (
        "rules:\n  cpu_spike: !!set {a, b}\n  fd_exhaustion:\n    <<: {top: 1}\n    process_pct: !pct 5\n",
        [
            "{f}:2: rules.cpu_spike: unsupported YAML tag !!set",
            "{f}:4: rules.fd_exhaustion.<<: YAML merge keys are not supported; repeat the fields",
            "{f}:5: rules.fd_exhaustion.process_pct: unsupported YAML tag !pct",
        ],
    ),
    "alias_points_at_its_use": (
        "word: &w high\nrules:\n  cpu_spike:\n    cpu_pct: *w\n",
        [
            "{f}:1: word: unknown field (expected one of version, daemon, rules, enforcement)",
            "{f}:4: rules.cpu_spike.cpu_pct: expected a number, got 'high'",
        ],
    ),
    "yaml_syntax": (
        "version: 1\nrules:\n  fork_storm: [\n",
        ["{f}:4:1: YAML syntax error: expected the node content, but found '<stream end>'"],
    ),
    "tab_indent": (
        "rules:\n\tfork_storm: {}\n",
        ["{f}:2:1: YAML syntax error: found character '\\t' that cannot start any token"],
    ),
    "nul_character": (
        "version: \x00\n",
        [
            "{f}:1:10: YAML syntax error: unacceptable character #x0000: special characters are not allowed"
        ],
    ),
    "two_documents": (
        "version: 1\n---\nversion: 1\n",
        [
            "{f}:2:1: YAML syntax error: expected a single document in the stream, but found another document"
        ],
    ),
    "empty": ("", ["{f}: empty policy file (expected a mapping with version, daemon and rules)"]),
    "comments_only": (
        "# nothing\n",
        ["{f}: empty policy file (expected a mapping with version, daemon and rules)"],
    ),
    "top_level_list": (
        "- fork_storm\n",
        ["{f}:1: (top level): expected a mapping with version, daemon and rules, got a list"],
    ),
    "top_level_scalar": (
        "hello\n",
        [
            "{f}:1: (top level): expected a mapping with version, daemon and rules, got a single value"
        ],
    ),
    "deep_nesting": (
        "rules:\n  fork_storm:\n    top: " + "[" * 5000 + "]" * 5000 + "\n",
        ["{f}: YAML nested too deeply"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_policy_gives_exact_lines_and_exit_78(tmp_path: Path, case: str) -> None:
    text, expected = BAD[case]
    path = write(tmp_path, text)
    result = run_check(path)
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [line.format(f=path) for line in expected]
    assert result.stdout == ""
    assert result.returncode == EXIT_CONFIG
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.problems == [line.format(f=path) for line in expected]


def test_unreadable_files(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    garbage = tmp_path / "garbage.yaml"
    garbage.write_bytes(b"version: 1\n\xff\xfe\x00binary\n")
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (MAX_FILE_BYTES // 10 + 1))
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    expected = [
        (str(fifo), f"{fifo}: not a regular file"),
        (str(tmp_path), f"{tmp_path}: cannot read: Is a directory"),
        (missing, f"{missing}: cannot read: No such file or directory"),
        (str(garbage), f"{garbage}:2: not UTF-8 text (byte 0xff)"),
        (str(big), f"{big}: too large for a policy file (over {MAX_FILE_BYTES} bytes)"),
    ]
    for path, line in expected:
        result = run_check(path)
        assert (result.returncode, result.stdout, result.stderr) == (EXIT_CONFIG, "", line + "\n")


def test_random_bytes_never_trace(tmp_path: Path) -> None:
    for seed in range(3):
        path = tmp_path / f"random{seed}.yaml"
        path.write_bytes(os.urandom(512))
        result = run_check(str(path))
        assert result.returncode == EXIT_CONFIG
        assert "Traceback" not in result.stderr
        assert len(result.stderr.splitlines()) == 1
        assert result.stderr.startswith(f"{path}:")


def test_alias_bomb_is_cheap_and_reported(tmp_path: Path) -> None:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    lines.append("rules:\n  fork_storm:\n    exclude: {comms: *i}")
    path = write(tmp_path, "\n".join(lines) + "\n")
    start = time.monotonic()
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert time.monotonic() - start < 5.0  # 9^9 strings if expanded; a few ms when not
    comms = [p for p in info.value.problems if "comms" in p]
    assert comms[0] == f"{path}:9: rules.fork_storm.exclude.comms[0]: expected a string, got a list"
    assert len(comms) == 9


def test_problem_lines_are_capped_and_the_rest_counted(tmp_path: Path) -> None:
    items = "".join(f"        - {i}\n" for i in range(120))
    path = write(tmp_path, "rules:\n  cpu_spike:\n    exclude:\n      comms:\n" + items)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert len(info.value.problems) == 51
    assert (
        info.value.problems[0]
        == f"{path}:5: rules.cpu_spike.exclude.comms[0]: expected a string, got 0"
    )
    assert info.value.problems[-1] == f"{path}: ... and 70 more problems"


def test_usage_and_several_files(tmp_path: Path) -> None:
    result = run_check()
    assert (result.returncode, result.stderr) == (EXIT_USAGE, "usage: check-config FILE...\n")
    bad = write(tmp_path, "version: 2\n")
    result = run_check(str(SHIPPED), bad)
    assert result.returncode == EXIT_CONFIG
    assert result.stdout.startswith(f"{SHIPPED}: OK ({len(RULE_NAMES)} rules enabled")
    assert result.stderr == f"{bad}:1: version: must be 1 (got 2)\n"


def test_rule_names_match_the_models_and_message_ids() -> None:
    from linnixd.constants import MESSAGE_IDS

    assert list(Policy().as_dict()["rules"]) == list(RULE_NAMES)
    assert set(RULE_NAMES) <= set(MESSAGE_IDS)
