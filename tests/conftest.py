"""Shared pytest set-up: tests marked `bpf` are skipped, with the reason, where BPF cannot load."""

from __future__ import annotations

import os

import pytest

_bpf_problem: str | None = None
_bpf_checked = False


def bpf_unavailable() -> str | None:
    """Why BPF programs cannot be loaded here (None when they can); checked once per session."""
    global _bpf_problem, _bpf_checked
    if not _bpf_checked:
        _bpf_checked = True
        if os.geteuid() != 0:
            _bpf_problem = "loads BPF: needs root"
        else:
            from linnixd.collector.bpfload import KernelFeatureError, preflight

            try:
                preflight()
            except KernelFeatureError as exc:
                _bpf_problem = str(exc)
    return _bpf_problem


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    marked = [item for item in items if item.get_closest_marker("bpf") is not None]
    if not marked:
        return
    problem = bpf_unavailable()
    if problem is not None:
        skip = pytest.mark.skip(reason=problem)
        for item in marked:
            item.add_marker(skip)
