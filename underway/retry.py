"""Retry policies: how many tries a step gets, and how long to wait between them."""

from __future__ import annotations

import math
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
        attempts = self.max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ValueError(f"max_attempts must be an integer >= 1, not {attempts!r}")
        for name in ("initial_interval", "max_interval"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
        coefficient = self.backoff_coefficient
        if not math.isfinite(coefficient) or coefficient < 1:
            raise ValueError(f"backoff_coefficient must be finite and >= 1, not {coefficient!r}")

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
        return float(min(wait, self.max_interval))

    def should_retry(self, attempt: int, max_attempts: int | None = None) -> bool:
        """Whether a failure of try number ``attempt`` leaves a try to make, of
        ``max_attempts`` in all (default: the policy's own; a task row's count, which an
        enqueue from SQL may have set, takes precedence in the worker)."""
        return attempt < (self.max_attempts if max_attempts is None else max_attempts)
