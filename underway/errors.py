"""The exceptions underway raises, and the one a step raises to give up at once."""

from __future__ import annotations


class UnderwayError(Exception):
    """Base class of every error underway raises."""


class Fatal(UnderwayError):
    """Raise from a step to fail its task now, without the retries its policy allows.

    Use it for errors that no retry can mend, such as an input that will never be valid::

        raise Fatal("order 42 does not exist")
    """


class ConfigurationError(UnderwayError):
    """underway was asked to do something it cannot do as configured (no DSN, bad job)."""


class SchemaMissing(UnderwayError):
    """The database has no underway schema, or an older one than this version needs."""


class StepTimeout(BaseException):
    """Raised inside a step that ran past its timeout, to stop it.

    It derives from :class:`BaseException`, as :class:`KeyboardInterrupt` does, so that a
    step's own ``except Exception:`` cannot swallow it. The try is recorded as timed out
    and retried as the step's policy says.
    """


class UndecodableInput(Fatal, ValueError):
    """A stored JSON value that PostgreSQL accepted but Python cannot decode: a number of
    thousands of digits, or nesting thousands deep. A task with such an input fails for
    good at its first try, naming its job (no retry could decode it: it is
    :class:`Fatal`); it never stops a worker."""


class TaskFailed(UnderwayError):
    """The task failed for good. The message holds its last error and that error's
    traceback; :attr:`error` and :attr:`traceback` hold them apart."""

    def __init__(self, message: str, error: str | None = None, traceback: str | None = None):
        super().__init__(message)
        self.error = error
        self.traceback = traceback


class TaskCancelled(UnderwayError):
    """The task was cancelled, so it has no result."""
