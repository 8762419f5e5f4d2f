"""User errors: raised for bad input and reported as one line, never as a traceback."""

from __future__ import annotations

import math

from hydra.errors import MissingConfigException, OverrideParseException


class UserError(ValueError):
    """A mistake in the user's configuration, data or checkpoint; the message says what to do."""


def check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise UserError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


def check_bool(key: str, value) -> None:
    """Only True or False: a string such as "no" would otherwise read as true."""
    if not isinstance(value, bool):
        raise UserError(f"{key}={value!r} is not valid; choose one of: True, False")


def check_range(key: str, value, low=None, high=None, low_open=False, high_open=False):
    """Check low <= value <= high (open ends when asked; an unbounded end is open, so inf never
    passes) and return the value as a Python number: a numpy number or a 0-d tensor counts as its value."""
    lo = "-inf" if low is None else low
    hi = "inf" if high is None else high
    interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
    number = value.item() if getattr(value, "ndim", None) == 0 and hasattr(value, "item") else value
    if not isinstance(number, (int, float)) or isinstance(number, bool):
        raise UserError(f"{key}={value!r} is not a number; allowed: {interval}")
    bad = (
        not math.isfinite(number)
        or (low is not None and (number <= low if low_open else number < low))
        or (high is not None and (number >= high if high_open else number > high))
    )
    if bad:
        raise UserError(f"{key}={value!r} is out of range; allowed: {interval}")
    return number


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


def one_line(err: BaseException) -> str:
    """What went wrong, in one line: a UserError behind a library's wrapper (Hydra's instantiate),
    a bad ``group=option`` with the options there are, or the first lines of a library's message."""
    cause = err
    while cause is not None and not isinstance(cause, UserError):
        cause = cause.__cause__
    if cause is not None:
        return str(cause)
    if isinstance(err, MissingConfigException) and err.options and err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        return f"{group}={option} is not valid; choose one of: {', '.join(err.options)}"
    lines = [line.strip() for line in str(err).split("Config search path")[0].splitlines() if line.strip()]
    if isinstance(err, OverrideParseException):
        return f"cannot parse the override {err.override!r}: {lines[0]}"
    text = " ".join(lines[:3]) or type(err).__name__
    reason = str(err.__cause__).splitlines()[0] if err.__cause__ is not None and str(err.__cause__) else ""
    return f"{text} ({reason})" if reason and reason not in text else text
