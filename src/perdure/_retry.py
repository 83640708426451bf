"""Retry policies for steps."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from ._errors import ConfigurationError


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    """How often, and how far apart, a failing step is tried again.

    The n-th retry waits ``initial_interval * backoff_factor ** (n - 1)``,
    capped at ``max_interval``. ``max_attempts`` counts the first try: 1
    means "never retry". Raise :class:`perdure.TerminalError` from a step to
    stop retrying at once.

    >>> RetryPolicy(max_attempts=5, initial_interval=timedelta(seconds=1))
    RetryPolicy(max_attempts=5, ...)
    """

    max_attempts: int = 3
    initial_interval: timedelta = timedelta(milliseconds=100)
    backoff_factor: float = 2.0
    max_interval: timedelta = timedelta(seconds=10)

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ConfigurationError(
                f"RetryPolicy.max_attempts must be an int >= 1, not {self.max_attempts!r}"
            )
        for field in ("initial_interval", "max_interval"):
            value = getattr(self, field)
            if not isinstance(value, timedelta) or value < timedelta(0):
                raise ConfigurationError(
                    f"RetryPolicy.{field} must be a non-negative timedelta, not {value!r}"
                )
        if self.backoff_factor < 1:
            raise ConfigurationError(
                f"RetryPolicy.backoff_factor must be >= 1, not {self.backoff_factor!r}"
            )

    def delay(self, failed_attempts: int) -> float:
        """Seconds to wait after ``failed_attempts`` failures."""
        seconds = self.initial_interval.total_seconds() * self.backoff_factor ** (
            failed_attempts - 1
        )
        return min(seconds, self.max_interval.total_seconds())

    def __repr__(self) -> str:  # doctest-friendly and short
        return (
            f"RetryPolicy(max_attempts={self.max_attempts}, ...)"
            if self == RetryPolicy(max_attempts=self.max_attempts)
            else f"RetryPolicy(max_attempts={self.max_attempts}, "
            f"initial_interval={self.initial_interval!r}, backoff_factor={self.backoff_factor}, "
            f"max_interval={self.max_interval!r})"
        )


NO_RETRY = RetryPolicy(max_attempts=1)
