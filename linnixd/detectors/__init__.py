"""The detector registry: every rule's detector class, instantiated by `all_detectors()`."""

from __future__ import annotations

from .base import Detector


def all_detectors() -> list[Detector]:
    """One instance of every detector; each module adds its classes here (rule names are unique)."""
    from .cpu import CpuSpikeDetector, RunawayTreeDetector
    from .fds import FdExhaustionDetector
    from .forks import ForkStormDetector, ShortLivedJobsDetector
    from .memory import MemoryLeakDetector
    from .pressure import PsiSaturationDetector
    from .stall import CircuitBreakerDetector, NoisyNeighbourDetector

    detectors: list[Detector] = [
        ForkStormDetector(),
        ShortLivedJobsDetector(),
        CpuSpikeDetector(),
        RunawayTreeDetector(),
        MemoryLeakDetector(),
        FdExhaustionDetector(),
        PsiSaturationDetector(),
        NoisyNeighbourDetector(),
        CircuitBreakerDetector(),
    ]
    return detectors
