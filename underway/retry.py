"""Retry policies: how many tries a step gets, and how long to wait between them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """How a failing step is retried: capped exponential backoff.

    The wait before try ``n + 1`` is ``initial_interval * backoff_coefficient ** (n - 1)``
    seconds, never more than ``max_interval``. ``max_attempts`` counts every try, the first
    included: ``max_attempts=1`` means no retry at all.

    :param max_attempts: tries in all before the task fails for good.
    :param initial_interval: seconds to wait after the first failure.
    :param max_interval: the longest wait, in seconds, however many failures came before.
    :param backoff_coefficient: how much each wait grows over the one before.
    """

    max_attempts: int = 5
    initial_interval: float = 1.0
    max_interval: float = 60.0
    backoff_coefficient: float = 2.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be an integer >= 1, not {self.max_attempts!r}")
        if self.initial_interval < 0 or self.max_interval < 0:
            raise ValueError("initial_interval and max_interval must not be negative")
        if self.backoff_coefficient < 1:
            raise ValueError(f"backoff_coefficient must be >= 1, not {self.backoff_coefficient!r}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt`` (counting from 1)."""
        exponent = max(attempt - 1, 0)
        try:
            wait = self.initial_interval * self.backoff_coefficient**exponent
        except OverflowError:
            wait = self.max_interval
        return min(wait, self.max_interval)

    def should_retry(self, attempt: int) -> bool:
        """Whether a failure of try number ``attempt`` leaves a try to make."""
        return attempt < self.max_attempts
