"""The one way a schema rule fails: a ConfigError naming the key, the problem and the fix."""

from __future__ import annotations

from qlora_exp.errors import ConfigError


def require(condition: bool, key: str, problem: str, fix: str) -> None:
    """Raise a ConfigError `KEY: PROBLEM. Fix: FIX` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{key}: {problem}. Fix: {fix}")


def require_choice(value: str, key: str, choices: tuple[str, ...]) -> None:
    """Refuse a value outside `choices`, listing them as the fix."""
    require(value in choices, key, f"got {value!r}", f"use one of {', '.join(choices)}")
