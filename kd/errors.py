"""User errors: raised for bad input and reported as one line, never as a traceback."""

from __future__ import annotations

import math

from hydra.errors import MissingConfigException, OverrideParseException


class UserError(ValueError):
    """A mistake in the user's configuration, data or checkpoint; the message says what to do."""


def check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise UserError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


def check_range(key: str, value, low=None, high=None, low_open=False, high_open=False) -> None:
    """Check low <= value <= high (open ends when asked); None bounds are unbounded."""
    bad = (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or math.isnan(value)
        or (low is not None and (value <= low if low_open else value < low))
        or (high is not None and (value >= high if high_open else value > high))
    )
    if bad:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        interval = f"{'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
        raise UserError(f"{key}={value!r} is out of range; allowed: {interval}")


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
