"""Where linnixd finds its shipped files: a source checkout or the Debian package layout."""

from __future__ import annotations

import os
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent


def bpf_dir() -> Path:
    """Directory of the BPF C sources: $LINNIXD_BPF_DIR, the checkout's bpf/, or /usr/share."""
    env = os.environ.get("LINNIXD_BPF_DIR")
    if env:
        return Path(env)
    if (_CHECKOUT / "bpf").is_dir():
        return _CHECKOUT / "bpf"
    return Path("/usr/share/linnixd/bpf")


def default_policy() -> Path:
    """The policy used when none is given: /etc/linnixd/rules.yaml, else the checkout's."""
    etc = Path("/etc/linnixd/rules.yaml")
    if etc.is_file():
        return etc
    return _CHECKOUT / "policy" / "rules.yaml"
