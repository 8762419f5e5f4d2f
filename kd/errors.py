"""User errors: raised for bad input and reported as one line, never as a traceback."""


class UserError(ValueError):
    """A mistake in the user's configuration, data or checkpoint; the message says what to do."""


def check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise UserError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


def check_range(key: str, value, low=None, high=None, low_open=False, high_open=False) -> None:
    """Check low <= value <= high (open ends when asked); None bounds are unbounded."""
    bad = (
        not isinstance(value, (int, float))
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
