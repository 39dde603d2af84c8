"""linnixctl's shell completion, generated as the package build does, completes in a real bash."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from linnixd.ctl import build_parser

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    subprocess.run(["/usr/bin/python3", "-c", "import shtab"], capture_output=True).returncode != 0,
    reason="needs python3-shtab (.ci/setup-host installs it)",
)


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("completions")
    subprocess.run([str(ROOT / "packaging" / "gen-completions"), str(out)], check=True, timeout=60)
    return out


def complete(script: Path, *words: str) -> list[str]:
    """What bash offers for `linnixctl WORDS...` (the last word is the one being completed)."""
    words_q = " ".join(f"'{w}'" for w in ("linnixctl", *words))
    program = (
        f"source {script}; COMP_WORDS=({words_q}); COMP_CWORD={len(words)}; "
        'COMP_LINE="${COMP_WORDS[*]}"; COMP_POINT=${#COMP_LINE}; '
        '_shtab_linnixctl; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    out = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", program],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def long_options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--")}


def test_bash_completes_every_subcommand(scripts: Path) -> None:
    offered = complete(scripts / "linnixctl", "")
    assert set(offered) == set(subparsers()), offered
    assert set(complete(scripts / "linnixctl", "th")) == {"throttle"}
    assert set(complete(scripts / "linnixctl", "en")) == {"enable-enforcement"}


def test_bash_completes_options_of_each_subcommand_and_choices(scripts: Path) -> None:
    bash = scripts / "linnixctl"
    assert long_options(build_parser()) <= set(complete(bash, "--"))
    assert "--no-ask-password" in complete(bash, "--no")
    for name, sub in subparsers().items():
        if name == "demo":
            continue  # everything after demo belongs to the demos' own parser
        offered = set(complete(bash, name, "--"))
        assert long_options(sub) <= offered, (name, offered)
    sort = next(a for a in subparsers()["top"]._actions if "--sort" in a.option_strings)
    assert sort.choices and set(complete(bash, "top", "--sort", "")) == set(sort.choices)
    # after --bus, the global options are behind: the subcommands come next
    assert "status" in complete(bash, "--bus", "system", "")


@pytest.mark.skipif(shutil.which("zsh") is None, reason="needs zsh")
def test_zsh_script_is_valid_and_names_everything(scripts: Path) -> None:
    script = scripts / "_linnixctl"
    text = script.read_text()
    assert text.startswith("#compdef linnixctl")
    subprocess.run(["zsh", "-n", str(script)], check=True, timeout=30)
    for name, sub in subparsers().items():
        assert f'"{name}:' in text or f"'{name}:" in text or name in text, name
        for option in long_options(sub):
            assert option in text, (name, option)


@pytest.mark.skipif(
    shutil.which("zsh") is None or shutil.which("tmux") is None, reason="needs zsh and tmux"
)
def test_zsh_completes_subcommands_and_options_on_tab(scripts: Path, tmp_path: Path) -> None:
    """A real zsh (compinit, the script on fpath) in tmux, Tab pressed after `linnixctl `."""
    sock = str(tmp_path / "tmux.sock")
    home = tmp_path / "home"
    home.mkdir()

    def tmux(*args: str) -> str:
        return subprocess.run(
            ["tmux", "-S", sock, *args], check=True, capture_output=True, text=True, timeout=30
        ).stdout

    def wait_screen(pred: object, what: str) -> str:
        deadline = time.monotonic() + 20
        while True:
            screen = tmux("capture-pane", "-p")
            if pred(screen):  # type: ignore[operator]
                return screen
            assert time.monotonic() < deadline, f"no {what}; screen:\n{screen}"
            time.sleep(0.2)

    tmux(
        "new-session",
        "-d",
        "-x",
        "150",
        "-y",
        "30",
        f"env -i HOME={home} TERM=xterm PATH=/usr/bin:/bin zsh -f",
    )
    try:
        tmux(
            "send-keys",
            f"fpath=({scripts} $fpath); autoload -U compinit; compinit -u; PS1='ok%% '",
            "Enter",
        )
        wait_screen(lambda s: "ok%" in s.replace("ok% ", "ok%"), "prompt")
        tmux("send-keys", "linnixctl ", "Tab")
        screen = wait_screen(lambda s: "enable-enforcement" in s, "subcommand list")
        for name in subparsers():
            assert name in screen, (name, screen)
        tmux("send-keys", "C-u", "linnixctl top --so", "Tab")
        wait_screen(lambda s: "linnixctl top --sort" in s, "--sort completed")
    finally:
        subprocess.run(["tmux", "-S", sock, "kill-server"], capture_output=True, timeout=30)
