"""The man pages cover every command, option, choice and exit code of the parsers, and every
key of the policy schema: a new option or policy key without documentation fails here."""

from __future__ import annotations

import argparse
import itertools
import re
import subprocess
import typing
from pathlib import Path
from typing import Any

import pytest

from linnixd import ctl, daemon, demos
from linnixd.config import DaemonSettings, Enforcement, Policy, RuleAction
from linnixd.registry import RULES
from linnixd.settings import Exclude, RuleSettings, field_names, field_types

MAN = Path(__file__).resolve().parent.parent / "packaging" / "man"


def plain(roff: str) -> str:
    """Roff source as the words it shows (escapes and font changes removed, macros kept)."""
    text = re.sub(r"\\f[BIRP]", "", roff)
    for escape, char in (
        ("\\-", "-"),
        ("\\%", ""),
        ("\\(ha", "^"),
        ("\\(->", "->"),
        ("\\(em", "-"),
    ):
        text = text.replace(escape, char)
    return text


def sections(page: str, level: str = ".SH") -> dict[str, list[str]]:
    """Lines of each section (.SH or .SS) by its title."""
    out: dict[str, list[str]] = {}
    current = ""
    for line in plain((MAN / page).read_text()).splitlines():
        if line.startswith(level + " "):
            current = line[len(level) + 1 :].strip().strip('"')
            out[current] = []
        elif current:
            out[current].append(line)
    return out


def heading_word(line: str) -> str:
    """The first word an item heading shows: `.BR enable-enforcement " [" ...` -> enable-enforcement."""
    words = line.split(maxsplit=1)
    if len(words) < 2 or not words[0].startswith("."):
        return ""
    return words[1].split()[0].strip('"')


def blocks(lines: list[str], names: set[str]) -> dict[str, str]:
    """Text from each `.TP` heading naming one of `names` to the next such heading."""
    out: dict[str, str] = {}
    current: str | None = None
    previous = ""
    for line in lines:
        word = heading_word(line) if previous == ".TP" else ""
        if word in names:
            current = word
            out[current] = ""
        if current is not None:
            out[current] += line + "\n"
        previous = line
    return out


def item_headings(lines: list[str]) -> list[str]:
    return [heading_word(b) for a, b in itertools.pairwise(lines) if a == ".TP"]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def documented(parser: argparse.ArgumentParser) -> list[str]:
    """What the page must name for a parser: long options and the choices they (or positionals) take."""
    words: list[str] = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        words += [s for s in action.option_strings if s.startswith("--")]
        words += [str(c) for c in action.choices or ()]
    return words


def exit_codes(epilog: str) -> set[str]:
    """The codes an epilog's "exit status:" block lists (its indented lines' leading numbers)."""
    block = epilog.split("exit status:", 1)[1].split("\n\n", 1)[0]
    return set(re.findall(r"(?:^|\s{2,}|\n\s*)(\d+(?:\+N)?)\s{2,}", block))


def man_exit_codes(page: str) -> list[str]:
    """The codes of the EXIT STATUS list, in order (a code listed twice shows up twice)."""
    headings = item_headings(sections(page)["EXIT STATUS"])
    return [w for w in headings if re.fullmatch(r"\d+(\+N)?", w)]


# ---- linnixctl(1) --------------------------------------------------------------------------


def test_linnixctl_page_names_every_command_and_its_options() -> None:
    parser = ctl.build_parser()
    subs = subcommands(parser)
    page = sections("linnixctl.1")
    commands = blocks(page["COMMANDS"], set(subs))
    assert sorted(commands) == sorted(subs), "commands without an entry in COMMANDS"
    missing = {
        name: [w for w in documented(sub) if w not in commands[name]]
        for name, sub in subs.items()
        if name != "demo"
    }
    assert not any(missing.values()), f"undocumented options or choices: {missing}"
    demo_block = commands["demo"]
    missing_demo = [w for w in documented(demos.build_parser()) if w not in demo_block]
    assert not missing_demo, f"linnixctl demo: undocumented {missing_demo}"
    options = "\n".join(page["OPTIONS"])
    assert not [w for w in documented(parser) if w not in options], "global options"


def test_linnixctl_exit_codes_match_the_parser() -> None:
    codes = exit_codes(ctl.EPILOG)
    assert {"0", "1", "64", "69", "77", "78"} <= codes
    # the demos' own codes are linnixctl's too (linnixctl demo)
    demo_codes = set(re.findall(r"\d+(?:\+N)?", demos.build_parser().epilog or ""))
    assert demo_codes <= codes, demo_codes - codes
    assert sorted(man_exit_codes("linnixctl.1")) == sorted(codes)


def test_linnixctl_json_shapes_are_documented() -> None:
    text = "\n".join(sections("linnixctl.1")["JSON OUTPUT"])
    assert "one JSON object per line" in text and "exactly one JSON document" in text
    for name, sub in subcommands(ctl.build_parser()).items():
        if any("--json" in a.option_strings for a in sub._actions):
            assert f".B {name}" in text or f".BR {name}" in text or name in text, name


# ---- linnixd(8) ----------------------------------------------------------------------------


def test_linnixd_page_names_every_option_and_exit_code() -> None:
    page = sections("linnixd.8")
    options = "\n".join(page["OPTIONS"])
    missing = [w for w in documented(daemon.build_parser()) if w not in options]
    assert not missing, f"linnixd options not in linnixd(8) OPTIONS: {missing}"
    assert sorted(man_exit_codes("linnixd.8")) == sorted(exit_codes(daemon.EPILOG))


# ---- linnixd-policy(5) ---------------------------------------------------------------------


def literal_values(annotation: Any) -> list[str]:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(v) for v in typing.get_args(annotation)]
    return []


def test_policy_page_covers_the_schema() -> None:
    subsections = sections("linnixd-policy.5", ".SS")
    whole = plain((MAN / "linnixd-policy.5").read_text())
    for key in field_names(Policy):
        assert re.search(rf"^\.B {key}$", whole, re.M), f"top-level key {key}"

    daemon_text = "\n".join(subsections["daemon"])
    assert not [k for k in field_names(DaemonSettings) if k not in daemon_text], "daemon keys"

    common = "\n".join(subsections["Keys of every rule"])
    common_keys = field_names(RuleSettings) + field_names(Exclude)
    assert not [k for k in common_keys if k not in common], "keys of every rule"
    assert not [v for v in literal_values(field_types(RuleSettings)["severity"]) if v not in common]

    rules = blocks(subsections["Rules"], {r.name for r in RULES})
    assert sorted(rules) == sorted(r.name for r in RULES), "rules without an entry"
    for rule in RULES:
        own = [k for k in field_names(rule.settings) if k not in field_names(RuleSettings)]
        types = field_types(rule.settings)
        words = own + [v for k in own for v in literal_values(types[k])]
        missing = [w for w in words if w not in rules[rule.name]]
        assert not missing, f"rules.{rule.name}: undocumented {missing}"

    enforcement = "\n".join(subsections["enforcement"])
    action_types = field_types(RuleAction)
    words = field_names(Enforcement) + field_names(RuleAction)
    words += [v for k in ("type", "signal") for v in literal_values(action_types[k])]
    missing = [w for w in words if w not in enforcement]
    assert not missing, f"enforcement: undocumented {missing}"


@pytest.mark.parametrize(
    "page", ["linnixctl.1", "linnixd.8", "linnixd-policy.5", "linnixd-forward.8"]
)
def test_pages_render_without_warnings(page: str) -> None:
    """groff's own check (man --warnings): no unknown macros, no broken escapes."""
    out = subprocess.run(
        ["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(MAN / page)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr


def test_versions_agree_everywhere() -> None:
    """`linnixctl --version`, `linnixd --version`, the man pages and the package say one version."""
    import linnixd

    root = MAN.parent.parent
    for module, name in (("linnixd.ctl", "linnixctl"), ("linnixd", "linnixd")):
        out = subprocess.run(
            ["/usr/bin/python3", "-m", module, "--version"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=root,
        )
        assert out.returncode == 0 and out.stdout == f"{name} {linnixd.__version__}\n", out
    changelog = (root / "packaging" / "debian" / "changelog").read_text().splitlines()[0]
    assert changelog.startswith(f"linnixd ({linnixd.__version__})"), changelog
    for page in ("linnixctl.1", "linnixd.8", "linnixd-policy.5", "linnixd-forward.8"):
        header = (MAN / page).read_text().splitlines()[0]
        assert f'"linnixd {linnixd.__version__}"' in header, (page, header)


def test_linnixd_forward_page_names_every_option_and_exit_code() -> None:
    from linnixd import forward

    options = "\n".join(sections("linnixd-forward.8")["OPTIONS"])
    missing = [w for w in documented(forward.build_parser()) if w not in options]
    assert not missing, f"linnixd-forward options not in linnixd-forward(8) OPTIONS: {missing}"
    assert sorted(man_exit_codes("linnixd-forward.8")) == sorted(exit_codes(forward.EPILOG))
