"""Settings read from an environment (a Lambda's, the Modal deployer's, a CLI's): one parser, one error.

Every reader returns the default for an unset or blank variable and raises `SettingsError` for a
malformed one, naming the variable, what it allows and what it got, e.g.
`MAX_GPUS must be one of 1, 2, 4, 8, got '3'`. Standard library only: Lambdas import this at cold start.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TypeVar

Env = Mapping[str, str]
_Choice = TypeVar("_Choice", bound=str)


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names it and the values it allows."""


def invalid(name: str, allowed: str, raw: object) -> SettingsError:
    """`{name} must be {allowed}, got {raw!r}`: the one shape of a malformed setting's message."""
    return SettingsError(f"{name} must be {allowed}, got {raw!r}")


def require(env: Env, names: Sequence[str]) -> None:
    """Every one of `names` is set (not blank); else one error naming all that are not."""
    missing = [n for n in names if not env.get(n, "").strip()]
    if missing:
        raise SettingsError(f"missing environment variables: {', '.join(missing)}")


def text(env: Env, name: str, default: str = "") -> str:
    """The variable, trimmed; `default` when unset or blank."""
    return env.get(name, "").strip() or default


def names(raw: str, lower: bool = False) -> tuple[str, ...]:
    """A comma-separated list, each item trimmed (and lower-cased with `lower`), blanks dropped."""
    items = (n.strip() for n in raw.split(","))
    return tuple(n.lower() if lower else n for n in items if n)


def _range_words(low: float | None, high: float | None, above: float | None = None) -> str:
    if above is not None:
        return f"greater than {above:g}" + (f" and at most {high:g}" if high is not None else "")
    if low is not None and high is not None:
        return f"from {low:g} to {high:g}"
    if low is not None:
        return f"of at least {low:g}"
    return f"of at most {high:g}" if high is not None else ""


def integer(
    env: Env,
    name: str,
    default: int,
    low: int | None = 1,
    high: int | None = None,
    allowed: Sequence[int] | None = None,
) -> int:
    """A whole number within [low, high] (or one of `allowed`)."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if allowed is not None:
        words = "one of " + ", ".join(str(a) for a in allowed)
    else:
        words = " ".join(("a whole number", _range_words(low, high))).strip()
    try:
        value = int(raw)
    except ValueError:
        raise invalid(name, words, raw) from None
    out_of_range = (low is not None and value < low) or (high is not None and value > high)
    if (allowed is not None and value not in allowed) or (allowed is None and out_of_range):
        raise invalid(name, words, raw)
    return value


def number(
    env: Env,
    name: str,
    default: float,
    low: float | None = None,
    high: float | None = None,
    above: float | None = None,
) -> float:
    """A finite number within [low, high], or (above, high] with `above`."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    words = " ".join(("a number", _range_words(low, high, above))).strip()
    try:
        value = float(raw)
    except ValueError:
        raise invalid(name, words, raw) from None
    if (
        not math.isfinite(value)
        or (low is not None and value < low)
        or (above is not None and value <= above)
        or (high is not None and value > high)
    ):
        raise invalid(name, words, raw)
    return value


def choice(env: Env, name: str, options: Sequence[_Choice], default: _Choice) -> _Choice:
    """One of `options` (lower-case words), matched case-insensitively."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    for option in options:
        if option == raw.lower():
            return option
    raise invalid(name, "one of " + ", ".join(options), raw)


def flag(env: Env, name: str, default: bool = False) -> bool:
    """`1` (on) or `0` (off)."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if raw not in ("0", "1"):
        raise invalid(name, "0 or 1", raw)
    return raw == "1"
