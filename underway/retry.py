"""Retry policies: how many tries a step gets, which errors deserve another, and how long
to wait between them."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .values import INT_MAX, MAX_DELAY

DEFAULT_MAX_ATTEMPTS = 5
"""Tries a step gets unless its policy says otherwise (the schema's default too)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How a failing step is retried: capped exponential backoff.

    The wait before try ``n + 1`` is ``initial_interval * backoff_coefficient ** (n - 1)``
    seconds, never more than ``max_interval``. ``max_attempts`` counts every try, the first
    included: ``max_attempts=1`` means no retry at all.

    :param max_attempts: tries in all before the task fails for good.
    :param initial_interval: seconds to wait after the first failure.
    :param max_interval: the longest wait, in seconds, however many failures came before
        (at most 100 years).
    :param backoff_coefficient: how much each wait grows over the one before.
    :param retry_on: only these exception types (and their subclasses) are retried; any
        other error fails the task at once, as :class:`~underway.Fatal` does. A timed-out
        try raises :class:`~underway.errors.StepTimeout`: list it to retry timeouts too.
        ``None`` (the default) retries every error.
    :param jitter: wait a random time between half the computed wait and all of it, so
        that a thousand tasks failing together do not all come back at the same instant.
    """

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    initial_interval: float = 1.0
    max_interval: float = 60.0
    backoff_coefficient: float = 2.0
    retry_on: tuple[type[BaseException], ...] | None = None
    jitter: bool = False

    def __post_init__(self) -> None:
        attempts = self.max_attempts
        if (
            isinstance(attempts, bool)
            or not isinstance(attempts, int)
            or not 1 <= attempts <= INT_MAX
        ):
            raise ValueError(f"max_attempts must be an integer >= 1, not {attempts!r}")
        for name in ("initial_interval", "max_interval"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
            if value > MAX_DELAY:
                raise ValueError(f"{name} must be at most 100 years of seconds, not {value!r}")
        coefficient = self.backoff_coefficient
        if not math.isfinite(coefficient) or coefficient < 1:
            raise ValueError(f"backoff_coefficient must be finite and >= 1, not {coefficient!r}")
        if self.retry_on is not None:
            given = self.retry_on
            kinds = (given,) if isinstance(given, type) else tuple(given)
            if not all(isinstance(k, type) and issubclass(k, BaseException) for k in kinds):
                raise TypeError(f"retry_on must be exception types, not {self.retry_on!r}")
            object.__setattr__(self, "retry_on", kinds)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt`` (counting from 1)."""
        if self.initial_interval == 0:
            return 0.0
        # Floats, so that a huge attempt number overflows at once instead of growing a
        # big integer for seconds.
        try:
            wait = float(self.initial_interval) * float(self.backoff_coefficient) ** max(
                attempt - 1, 0
            )
        except OverflowError:
            wait = math.inf
        wait = float(min(wait, self.max_interval))
        return wait * random.uniform(0.5, 1.0) if self.jitter else wait

    def should_retry(
        self, attempt: int, max_attempts: int | None = None, error: BaseException | None = None
    ) -> bool:
        """Whether a failure of try number ``attempt`` (with ``error``, if given) earns
        another try, of ``max_attempts`` in all (default: the policy's own; a task row's
        count, which an enqueue from SQL may have set, takes precedence in the worker)."""
        if error is not None and self.retry_on is not None and not isinstance(error, self.retry_on):
            return False
        return attempt < (self.max_attempts if max_attempts is None else max_attempts)

    def retry_after(self, attempt: int, max_attempts: int, error: BaseException) -> float | None:
        """Seconds to wait before retrying after try ``attempt`` failed with ``error``, or
        ``None`` when it earns no retry (see :meth:`should_retry`)."""
        return self.delay(attempt) if self.should_retry(attempt, max_attempts, error) else None
