"""Fast unit tests that need no database: retry policies, To, Job definition and the checks
enqueue makes before it connects, DSN resolution and redaction, and the query loader.
"""

import dataclasses
import math
import uuid
from datetime import timedelta

import pytest

import underway
import underway.db
import underway.job
import underway.testing
from underway import ConfigurationError, Job, RetryPolicy, To
from underway.db import redact_dsn, resolve_dsn
from underway.store import QUERIES, load_queries

#: A DSN nothing listens on: connecting to it fails with a connection error, never a
#: TypeError or ValueError, so an error of those types proves no connection was tried.
UNREACHABLE_DSN = "postgresql://nobody@127.0.0.1:1/x"


@pytest.fixture
def make_job():
    """Make jobs with unique names, and unregister them after the test."""
    made = []

    def make(name=None, **kwargs):
        name = name or f"test-units-{uuid.uuid4().hex}"
        job = Job(name, **kwargs)
        made.append(name)
        return job

    yield make
    for name in made:
        underway.testing.unregister_job(name)


@pytest.fixture
def job_with_step(make_job):
    job = make_job()

    @job.step
    def only(cx, inp):
        return To.done()

    return job


@pytest.fixture
def unconfigured(monkeypatch):
    """No DSN anywhere: neither configure() nor DATABASE_URL."""
    underway.configure(dsn=None)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    yield
    underway.configure(dsn=None)


@pytest.fixture
def unreachable_db(monkeypatch):
    """DATABASE_URL points nowhere, and any attempt to connect fails the test loudly."""
    underway.configure(dsn=None)
    monkeypatch.setenv("DATABASE_URL", UNREACHABLE_DSN)

    def tripwire(*args, **kwargs):
        raise AssertionError("a database connection was attempted")

    monkeypatch.setattr(underway.db, "connect", tripwire)
    yield
    underway.configure(dsn=None)


# -- RetryPolicy -------------------------------------------------------------------------


def test_retry_policy_defaults():
    policy = RetryPolicy()
    assert policy.max_attempts == 5
    assert policy.initial_interval == 1.0
    assert policy.max_interval == 60.0
    assert policy.backoff_coefficient == 2.0


def test_retry_delay_doubles_from_the_initial_interval():
    policy = RetryPolicy(max_interval=1000)
    assert [policy.delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 32, 64]


def test_retry_delay_is_capped_at_max_interval():
    policy = RetryPolicy()
    assert [policy.delay(n) for n in range(5, 10)] == [16, 32, 60, 60, 60]


def test_retry_delay_with_custom_interval_and_coefficient():
    policy = RetryPolicy(initial_interval=0.5, backoff_coefficient=3, max_interval=10)
    assert [policy.delay(n) for n in range(1, 5)] == [0.5, 1.5, 4.5, 10]


def test_retry_delay_with_coefficient_one_is_constant():
    policy = RetryPolicy(initial_interval=7, backoff_coefficient=1)
    assert {policy.delay(n) for n in range(1, 50)} == {7}


def test_retry_delay_before_the_first_attempt_is_the_initial_interval():
    """Attempt numbers below 1 are treated as the first failure, not as a shorter wait."""
    policy = RetryPolicy(initial_interval=3)
    assert policy.delay(0) == 3
    assert policy.delay(-5) == 3


@pytest.mark.parametrize("attempt", [1_100, 10**6, 10**18])
@pytest.mark.parametrize("coefficient", [1.5, 2.0, 10.0])
def test_retry_delay_for_huge_attempt_numbers_does_not_overflow(attempt, coefficient):
    policy = RetryPolicy(backoff_coefficient=coefficient)
    assert policy.delay(attempt) == 60.0


def test_should_retry_until_max_attempts_are_used():
    policy = RetryPolicy(max_attempts=3)
    assert [policy.should_retry(n) for n in (1, 2, 3, 4)] == [True, True, False, False]


def test_one_attempt_means_no_retry():
    assert not RetryPolicy(max_attempts=1).should_retry(1)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": -1}, "max_attempts"),
        ({"max_attempts": 2.5}, "max_attempts"),
        ({"initial_interval": -1}, "initial_interval"),
        ({"max_interval": -0.1}, "max_interval"),
        ({"backoff_coefficient": 0.5}, "backoff_coefficient"),
        ({"backoff_coefficient": 0}, "backoff_coefficient"),
    ],
)
def test_retry_policy_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RetryPolicy(**kwargs)


def test_retry_policy_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RetryPolicy().max_attempts = 10


def test_zero_initial_interval_stays_zero_for_huge_attempt_numbers():
    assert RetryPolicy(initial_interval=0).delay(1_100) == 0.0


@pytest.mark.parametrize("field", ["initial_interval", "max_interval", "backoff_coefficient"])
def test_retry_policy_rejects_nan(field):
    with pytest.raises(ValueError, match=field):
        RetryPolicy(**{field: math.nan})


# -- To ----------------------------------------------------------------------------------


def test_to_next_passes_the_value_at_once():
    outcome = To.next({"a": 1})
    assert (outcome.kind, outcome.value, outcome.wait) == ("next", {"a": 1}, 0.0)


def test_to_next_without_a_value_passes_none():
    assert To.next().value is None


@pytest.mark.parametrize(
    ("delay", "wait"),
    [
        (timedelta(minutes=2), 120.0),
        (timedelta(milliseconds=250), 0.25),
        (90, 90.0),
        (1.5, 1.5),
        (0, 0.0),
        (None, 0.0),
    ],
)
def test_to_delay_converts_the_delay_to_seconds(delay, wait):
    outcome = To.delay(delay, "v")
    assert (outcome.kind, outcome.value, outcome.wait) == ("next", "v", wait)
    assert isinstance(outcome.wait, float)


def test_to_done_ends_the_run():
    outcome = To.done()
    assert (outcome.kind, outcome.value, outcome.wait) == ("done", None, 0.0)


@pytest.mark.parametrize("delay", [-1, -0.001, timedelta(seconds=-1)])
def test_to_delay_refuses_a_negative_delay(delay):
    with pytest.raises(ValueError, match="negative"):
        To.delay(delay, "v")


def test_to_delay_refuses_nan():
    with pytest.raises(ValueError):
        To.delay(math.nan, "v")


# -- Job definition ----------------------------------------------------------------------


def test_step_decorator_without_arguments_uses_the_job_retry_policy(make_job):
    policy = RetryPolicy(max_attempts=2)
    job = make_job(retry=policy)

    @job.step
    def first(cx, inp):
        return To.done()

    (step,) = job.steps
    assert (step.index, step.name, step.function, step.retry) == (0, "first", first, policy)


def test_job_without_retry_gets_the_default_policy(make_job):
    job = make_job()

    @job.step
    def first(cx, inp):
        return None

    assert job.retry == RetryPolicy()
    assert job.steps[0].retry == RetryPolicy()


def test_step_decorator_with_retry_overrides_the_job_default(make_job):
    default = RetryPolicy(max_attempts=2)
    special = RetryPolicy(max_attempts=9, initial_interval=0.1)
    job = make_job(retry=default)

    @job.step
    def first(cx, inp):
        return To.next(inp)

    @job.step(retry=special)
    def second(cx, inp):
        return To.next(inp)

    @job.step()
    def third(cx, inp):
        return To.done()

    assert [s.retry for s in job.steps] == [default, special, default]


def test_steps_run_in_the_order_they_are_added(make_job):
    job = make_job()
    for name in ("a", "b", "c", "d"):

        def fn(cx, inp):
            return None

        fn.__name__ = name
        job.step(fn)

    assert [s.name for s in job.steps] == ["a", "b", "c", "d"]
    assert [s.index for s in job.steps] == [0, 1, 2, 3]


def test_step_decorator_returns_the_function_unchanged(make_job):
    job = make_job()

    def plain(cx, inp):
        return To.next(inp + 1)

    def with_retry(cx, inp):
        return To.done()

    assert job.step(plain) is plain
    assert job.step(retry=RetryPolicy(max_attempts=1))(with_retry) is with_retry
    assert plain(None, 1) == To.next(2)


@pytest.mark.parametrize("not_callable", [42, "step", {"a": 1}])
def test_a_step_must_be_callable(make_job, not_callable):
    job = make_job()
    with pytest.raises(TypeError, match="callable"):
        job.step(not_callable)
    with pytest.raises(TypeError, match="callable"):
        job.step(retry=RetryPolicy())(not_callable)
    assert job.steps == []


@pytest.mark.parametrize("name", ["", "   ", None, 42, b"bytes"])
def test_a_job_name_must_be_a_non_empty_string(name):
    with pytest.raises(ValueError, match="non-empty string"):
        Job(name)


def test_a_duplicate_job_name_is_refused(make_job):
    original = make_job()
    with pytest.raises(ConfigurationError, match="already defined"):
        Job(original.name)
    assert underway.job.registered_jobs()[original.name] is original


def test_registered_jobs_lists_defined_jobs(make_job):
    job = make_job()
    jobs = underway.job.registered_jobs()
    assert jobs[job.name] is job
    jobs.clear()  # a copy: clearing it leaves the registry alone
    assert underway.job.registered_jobs()[job.name] is job


# -- Checks enqueue makes before it connects ---------------------------------------------


def test_enqueue_of_a_job_without_steps_fails_without_a_database(make_job, unconfigured):
    """With no DSN anywhere, a connection attempt would raise 'no database configured';
    the error must instead be about the missing steps."""
    job = make_job()
    with pytest.raises(ConfigurationError, match="has no steps"):
        job.enqueue({"a": 1})
    with pytest.raises(ConfigurationError, match="has no steps"):
        job.enqueue_many([{"a": 1}])


@pytest.mark.parametrize("bad", [{1, 2}, object(), {"when": timedelta(1)}, b"bytes"])
def test_enqueue_of_non_json_input_is_a_type_error_naming_the_job(
    job_with_step, unreachable_db, bad
):
    with pytest.raises(TypeError, match=job_with_step.name) as info:
        job_with_step.enqueue(bad)
    assert "JSON" in str(info.value)


@pytest.mark.parametrize("bad", [math.nan, math.inf, {"x": [-math.inf]}])
def test_enqueue_of_nan_or_infinity_is_a_value_error_naming_the_job(
    job_with_step, unreachable_db, bad
):
    with pytest.raises(ValueError, match=job_with_step.name):
        job_with_step.enqueue(bad)


@pytest.mark.parametrize("priority", ["high", 1.5, "1"])
def test_enqueue_with_a_non_integer_priority_is_a_type_error(
    job_with_step, unreachable_db, priority
):
    with pytest.raises(TypeError, match="priority"):
        job_with_step.enqueue({}, priority=priority)


def test_a_non_integer_job_priority_is_refused_when_the_job_is_defined(make_job):
    """A bad default priority is caught at definition, not at the first enqueue."""
    with pytest.raises(TypeError, match="priority"):
        make_job(priority="urgent")


def test_enqueue_with_a_negative_delay_is_refused(job_with_step, unreachable_db):
    with pytest.raises(ValueError, match="negative"):
        job_with_step.enqueue({}, delay=timedelta(seconds=-5))


def test_enqueue_many_with_one_bad_item_is_refused(job_with_step, unreachable_db):
    with pytest.raises(TypeError, match=job_with_step.name):
        job_with_step.enqueue_many([{"ok": 1}, {"ok": 2}, {"bad": {1}}])
    with pytest.raises(ValueError, match=job_with_step.name):
        job_with_step.enqueue_many([1.0, math.nan])


def test_enqueue_many_of_nothing_returns_an_empty_list_without_connecting(
    job_with_step, unreachable_db
):
    assert job_with_step.enqueue_many([]) == []
    assert job_with_step.enqueue_many(iter(())) == []


# -- configure / resolve_dsn -------------------------------------------------------------


def test_resolve_dsn_without_any_dsn_says_how_to_configure(unconfigured):
    with pytest.raises(ConfigurationError) as info:
        resolve_dsn()
    message = str(info.value)
    assert "configure" in message
    assert "DATABASE_URL" in message


def test_resolve_dsn_falls_back_to_database_url(unconfigured, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://env/db")
    assert resolve_dsn() == "postgresql://env/db"


def test_configure_wins_over_database_url(unconfigured, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://env/db")
    underway.configure(dsn="postgresql://configured/db")
    assert resolve_dsn() == "postgresql://configured/db"


def test_an_explicit_dsn_wins_over_everything(unconfigured, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://env/db")
    underway.configure(dsn="postgresql://configured/db")
    assert resolve_dsn("postgresql://explicit/db") == "postgresql://explicit/db"


def test_configure_none_resets_to_database_url(unconfigured, monkeypatch):
    underway.configure(dsn="postgresql://configured/db")
    underway.configure(dsn=None)
    with pytest.raises(ConfigurationError):
        resolve_dsn()
    monkeypatch.setenv("DATABASE_URL", "postgresql://env/db")
    assert resolve_dsn() == "postgresql://env/db"


# -- redact_dsn --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "secret", "expected"),
    [
        ("postgresql://u:secret@h/db", "secret", "postgresql://u:***@h/db"),
        (
            "postgres://u:p%40ss@h:5432/db?sslmode=require",
            "p%40ss",
            "postgres://u:***@h:5432/db?sslmode=require",
        ),
        ("postgresql://:secret@h/db", "secret", "postgresql://:***@h/db"),
        ("postgresql://u@h/db?password=secret", "secret", "postgresql://u@h/db?password=***"),
        (
            "postgresql://u@h/db?sslmode=require&password=secret",
            "secret",
            "postgresql://u@h/db?sslmode=require&password=***",
        ),
        ("host=h password=secret user=u", "secret", "host=h password=*** user=u"),
        ("host=h password='a b' user=u", "a b", "host=h password=*** user=u"),
        (r"password='it\'s secret' host=h", "secret", "password=*** host=h"),
        ("host=h PASSWORD = secret", "secret", "host=h PASSWORD = ***"),
    ],
)
def test_redact_dsn_hides_the_password(dsn, secret, expected):
    redacted = redact_dsn(dsn)
    assert redacted == expected
    assert secret not in redacted


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://u@h/db",
        "postgresql://u@h:5432/db?sslmode=require",
        "postgresql://h:5432/db",
        "postgresql:///db?host=/var/run/postgresql",
        "host=h user=u dbname=d",
        "dbname=app",
        "",
    ],
)
def test_redact_dsn_leaves_a_dsn_without_password_unchanged(dsn):
    assert redact_dsn(dsn) == dsn


def test_redact_dsn_hides_an_unquoted_password_with_an_escaped_space():
    """libpq reads ``password=se\\ cret`` as the password ``se cret``."""
    assert "cret" not in redact_dsn(r"host=h password=se\ cret user=u")


def test_redact_dsn_keeps_query_parameters_after_the_password():
    dsn = "postgresql://u@h/db?password=secret&application_name=app"
    assert redact_dsn(dsn) == "postgresql://u@h/db?password=***&application_name=app"


def test_redact_dsn_leaves_an_at_sign_in_a_query_parameter_alone():
    dsn = "postgresql://h:5432/db?application_name=me@laptop"
    assert redact_dsn(dsn) == dsn


# -- queries -----------------------------------------------------------------------------

EXPECTED_QUERIES = [
    "enqueue",
    "enqueue_many",
    "claim_task",
    "complete_task",
    "advance_task",
    "fail_task",
    "release_task",
    "renew_leases",
    "reclaim_expired",
    "seconds_until_due",
    "schema_version",
]


@pytest.mark.parametrize("name", EXPECTED_QUERIES)
def test_expected_query_exists(name):
    assert name in QUERIES


@pytest.mark.parametrize("name", sorted(QUERIES))
def test_query_is_non_empty_and_has_no_comment_lines(name):
    sql = QUERIES[name]
    assert sql.strip()
    assert sql == sql.strip()
    assert not [line for line in sql.splitlines() if line.lstrip().startswith("--")]


def test_load_queries_splits_by_name_and_drops_comments():
    text = (
        "-- file header\n"
        "\n"
        "-- name: one\n"
        "-- what one does\n"
        "SELECT 1;\n"
        "\n"
        "-- name: two\n"
        "SELECT 2\n"
        "-- between lines\n"
        "FROM t;\n"
    )
    assert load_queries(text) == {"one": "SELECT 1;", "two": "SELECT 2\nFROM t;"}
