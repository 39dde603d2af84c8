"""Policy settings models: the one place pydantic is imported, shimmed for pydantic 1.10 and 2.x.

Every section of the policy file is a frozen `Settings` model that rejects unknown keys.
Rule modules (linnixd/detectors/) declare their own `RuleSettings` subclass with the field
helpers below; linnixd/config.py assembles them into the policy and loads the file.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, Field

from .constants import MAX_CPU_PCT

PYDANTIC_V2 = int(pydantic.VERSION.split(".")[0]) >= 2
ValidationError = pydantic.ValidationError

Severity = Literal["info", "notice", "warning", "critical"]

if PYDANTIC_V2:

    class Settings(BaseModel):
        """A frozen policy section that rejects unknown keys."""

        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)  # type: ignore[typeddict-item,attr-defined]

else:

    class Settings(BaseModel):  # type: ignore[no-redef]
        """A frozen policy section that rejects unknown keys."""

        class Config:
            extra = "forbid"
            frozen = True


def field_names(model: type[BaseModel]) -> list[str]:
    """The model's field names in declaration order."""
    fields: Mapping[str, Any] = (
        model.model_fields if PYDANTIC_V2 else model.__fields__  # type: ignore[attr-defined]
    )
    return list(fields)


def field_types(model: type[BaseModel]) -> dict[str, Any]:
    """Field name -> resolved annotation, the same way on pydantic 1 and 2."""
    hints = typing.get_type_hints(model)
    return {name: hints[name] for name in field_names(model)}


def dump(model: BaseModel) -> dict[str, Any]:
    """The model as nested plain dicts."""
    return model.model_dump() if PYDANTIC_V2 else model.dict()  # type: ignore[attr-defined,no-any-return]


def validate_field(name: str) -> Callable[[Callable[..., Any]], Any]:
    """A field validator `(cls, value) -> value` for `name`, on either pydantic."""

    def wrap(fn: Callable[..., Any]) -> Any:
        if PYDANTIC_V2:
            return pydantic.field_validator(name)(fn)  # type: ignore[attr-defined]
        return pydantic.validator(name, allow_reuse=True)(fn)

    return wrap


def compose(name: str, doc: str, fields: Mapping[str, type[Settings]]) -> type[Settings]:
    """A Settings model with one section per entry, each defaulting to its model's defaults."""
    namespace: dict[str, Any] = {
        "__doc__": doc,
        "__module__": __name__,
        "__annotations__": dict(fields),
    }
    for key, section in fields.items():
        namespace[key] = Field(default_factory=section)
    built: type[Settings] = type(name, (Settings,), namespace)  # by pydantic's metaclass
    return built


# ---- field helpers ----------------------------------------------------------------------


def seconds(default: float) -> Any:
    """A duration in seconds within (0, 3600]."""
    return Field(default, gt=0, le=3600)


def percent(default: float) -> Any:
    """A percentage within (0, 100]."""
    return Field(default, gt=0, le=100)


def top_n(default: int) -> Any:
    """How many culprits a finding names, 1 to 50."""
    return Field(default, ge=1, le=50)


def cooldown(default: float) -> Any:
    """Seconds a new incident for the same culprit stays suppressed, 0 to a day."""
    return Field(default, ge=0, le=86400)


# ---- what every rule has ----------------------------------------------------------------


class Exclude(Settings):
    """Who a rule never blames: systemd units, cgroup paths and comms (fnmatch globs)."""

    units: tuple[str, ...] = ()
    cgroups: tuple[str, ...] = ()
    comms: tuple[str, ...] = ()


class RuleSettings(Settings):
    """What every rule has: on/off, severity, cooldown and exclusions."""

    enabled: bool = True
    severity: Severity = "warning"
    cooldown_s: float = cooldown(300.0)
    exclude: Exclude = Field(default_factory=Exclude)

    def lookback_s(self) -> float:
        """How far back the rule looks (its window or sustain time): what the daemon keeps."""
        spans = [getattr(self, name) for name in ("window_s", "sustain_s") if hasattr(self, name)]
        return float(max(spans, default=0.0))


__all__ = [
    "MAX_CPU_PCT",
    "PYDANTIC_V2",
    "Exclude",
    "Field",
    "RuleSettings",
    "Settings",
    "Severity",
    "ValidationError",
    "compose",
    "cooldown",
    "dump",
    "field_names",
    "field_types",
    "percent",
    "seconds",
    "top_n",
    "validate_field",
]
