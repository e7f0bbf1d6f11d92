"""The operator's command line, ``python -m underway.admin``, run as a real subprocess
against a real database: every subcommand's output and exit status, and how it fails (a
missing task, a database without the schema, one that cannot be reached, no database at
all): one line on stderr, exit status 1, no traceback, no password.

The tasks it looks at are made by the lifecycle jobs (``tests/jobs_lifecycle.py``), run by
an in-process worker.
"""

from __future__ import annotations

import jobs_lifecycle as jl
import pytest
from jobs_faults import task_row

from underway import TaskState, admin
from underway.worker import Worker

from .helpers import query, run_python, scalar

SECRET = "s3cr3t-pw"

#: Every subcommand, with arguments that would make it do something.
COMMANDS = [
    ["queues"],
    ["pause", "emails"],
    ["resume", "emails"],
    ["dead-letters", "emails-dead"],
    ["redrive", "emails-dead"],
    ["redrive", "emails-dead", "--id", "1"],
    ["status", "1"],
    ["cancel", "1"],
    ["purge"],
    ["list"],
    ["show", "1"],
    ["retry", "1"],
    ["enqueue", "emails", "{}"],
    ["schedules"],
    ["supervisors"],
    ["limits"],
    ["rate-limit", "emails", "10/s"],
]


@pytest.fixture
def ldsn(dsn):
    """The test database, with the tables the lifecycle jobs write to."""
    query(dsn, jl.DDL)
    return dsn


def drain_lifecycle(dsn):
    """Run every ready task of the in-process-safe lifecycle jobs, retries made due at once."""
    worker = Worker(dsn, {j.name: j for j in (jl.one, jl.dlq, jl.no_dlq)}, poll_interval=0.1)
    try:
        while True:
            while worker.run_once():
                pass
            moved = query(
                dsn,
                "UPDATE underway.task SET run_at = now() - interval '1 hour'"
                " WHERE state = 'pending' AND run_at > now() - interval '1 hour' RETURNING id",
            )
            if not moved:
                return
    finally:
        worker.disconnect()


def cli(dsn, *args, env=None):
    """``python -m underway.admin --dsn DSN ARGS...`` (no --dsn when ``dsn`` is None)."""
    dsn_args = [] if dsn is None else ["--dsn", dsn]
    return run_python(["-m", "underway.admin", *dsn_args, *args], env=env, timeout=30)


def table(stdout):
    """The rows of a printed table, each split into its cells (the header first)."""
    return [line.split("  ") for line in stdout.splitlines()]


def cells(line):
    """A table line's cells, however wide the padding."""
    return [c.strip() for c in line.split("  ") if c.strip()]


def assert_one_line_error(result, *fragments, one_line=True):
    """Exit status 1, nothing on stdout, one line on stderr (unless ``one_line`` is False)
    holding every fragment, and no traceback or password anywhere."""
    assert result.returncode == 1, result
    assert result.stdout == "", result
    lines = result.stderr.splitlines()
    if one_line:
        assert len(lines) == 1, result.stderr
    assert lines[0].startswith("underway: "), lines
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)
    assert "Traceback" not in result.stderr
    assert SECRET not in result.stderr + result.stdout


# -- the subcommands ------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_queues_pause_and_resume(ldsn):
    """`queues` prints a header (and nothing else on an empty database); `pause Q` says so
    and `queues` then shows Q paused with its pending tasks and their lag; `resume Q` says
    'resumed', a second time 'was not paused', both exit 0."""
    empty = cli(ldsn, "queues")
    assert (empty.returncode, empty.stderr) == (0, "")
    assert [cells(line) for line in empty.stdout.splitlines()] == [
        ["QUEUE", "PENDING", "RUNNING", "FAILED", "PAUSED", "LAG"]
    ]

    paused = cli(ldsn, "pause", "lifecycle-one")
    assert (paused.returncode, paused.stdout, paused.stderr) == (
        0,
        "paused queue 'lifecycle-one'\n",
        "",
    )
    assert scalar(ldsn, "SELECT queue FROM underway.paused_queue") == "lifecycle-one"
    jl.one.enqueue_many([{"n": 1}, {"n": 2}])
    jl.no_dlq.enqueue({"n": 3})
    drain_lifecycle(ldsn)  # the no-dlq task fails; lifecycle-one is paused
    shown = cli(ldsn, "queues")
    assert shown.returncode == 0, shown
    header, *rows = [cells(line) for line in shown.stdout.splitlines()]
    assert header == ["QUEUE", "PENDING", "RUNNING", "FAILED", "PAUSED", "LAG"]
    assert rows[0] == ["lifecycle-no-dlq", "0", "0", "1"]
    assert rows[1][:5] == ["lifecycle-one", "2", "0", "0", "yes"]
    assert rows[1][5].endswith("s") and float(rows[1][5][:-1]) >= 0
    assert len(rows) == 2

    resumed = cli(ldsn, "resume", "lifecycle-one")
    assert (resumed.returncode, resumed.stdout) == (0, "resumed queue 'lifecycle-one'\n")
    again = cli(ldsn, "resume", "lifecycle-one")
    assert (again.returncode, again.stdout) == (0, "queue 'lifecycle-one' was not paused\n")
    assert admin.queues()[1].paused is False


@pytest.mark.timeout(60)
def test_dead_letters_and_redrive(ldsn):
    """`dead-letters Q` lists each dead letter (id, job, step, tries, when, error) and only a
    header for an empty queue; `redrive Q --id N` re-drives that one task and says which,
    `redrive Q` the rest, and once none is left it re-drives 0; all exit 0."""
    query(ldsn, "INSERT INTO lifecycle_flag VALUES ('deliver')")
    first, second = (jl.dlq.enqueue({"n": n, "fatal": True}) for n in range(2))
    drain_lifecycle(ldsn)

    listed = cli(ldsn, "dead-letters", jl.DEAD)
    assert (listed.returncode, listed.stderr) == (0, "")
    header, *rows = listed.stdout.splitlines()
    assert cells(header) == ["ID", "JOB", "STEP", "TRIES", "FAILED AT", "ERROR"]
    assert len(rows) == 2
    for task, row in zip((first, second), rows):
        found = cells(row)
        assert found[:4] == [str(task.id), "lifecycle-dlq", "1", "1"]
        assert found[-1] == "Fatal: cannot deliver, ever"
        assert str(task_row(ldsn, task.id)["finished_at"]) in row
    empty = cli(ldsn, "dead-letters", "lifecycle-nothing-here")
    assert (empty.returncode, len(empty.stdout.splitlines())) == (0, 1)

    one = cli(ldsn, "redrive", jl.DEAD, "--id", str(second.id))
    assert (one.returncode, one.stdout) == (
        0,
        f"re-drove 1 task(s) from 'lifecycle-dead': {second.id}\n",
    )
    assert [first.status(), second.status()] == ["failed", "pending"]
    rest = cli(ldsn, "redrive", jl.DEAD)
    assert (rest.returncode, rest.stdout) == (
        0,
        f"re-drove 1 task(s) from 'lifecycle-dead': {first.id}\n",
    )
    none = cli(ldsn, "redrive", jl.DEAD)
    assert none.returncode == 0
    assert none.stdout.startswith("re-drove 0 task(s) from 'lifecycle-dead'")
    assert [first.status(), second.status()] == ["pending", "pending"]


@pytest.mark.timeout(60)
def test_status_shows_one_task_and_a_missing_one_exits_1(ldsn):
    """`status N` prints the task's fields, one per line; for an id with no task it prints
    one line on stderr and exits 1."""
    task = jl.no_dlq.enqueue({"n": 1})
    drain_lifecycle(ldsn)
    shown = cli(ldsn, "status", str(task.id))
    assert (shown.returncode, shown.stderr) == (0, ""), shown
    fields = dict(line.strip().split(": ", 1) for line in shown.stdout.splitlines())
    assert fields["id"] == str(task.id)
    assert fields["job"] == "lifecycle-no-dlq"
    assert fields["state"] == "failed"
    assert (fields["step"], fields["attempts"], fields["max_attempts"]) == ("0", "3", "3")
    assert fields["queue"] == "lifecycle-no-dlq"
    assert fields["error"] == "RuntimeError: no dead-letter queue for me"
    assert fields["cancel_requested"] == "False"
    assert set(fields) >= {"created_at", "run_at", "finished_at", "dead_letter_queue"}

    missing = cli(ldsn, "status", "987654")
    assert_one_line_error(missing, "no task 987654")


@pytest.mark.timeout(60)
def test_cancel_a_pending_task_then_again(ldsn):
    """`cancel N` cancels a pending task (exit 0, says "cancelled", as cancel() does); a
    second time ("finished"), or for an id with no task, it prints one line on stderr and
    exits 1."""
    task = jl.one.enqueue({"n": 1}, delay=3600)
    done = cli(ldsn, "cancel", str(task.id))
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith(f"cancelled: task {task.id}")
    assert task.status() is TaskState.CANCELLED
    assert_one_line_error(cli(ldsn, "cancel", str(task.id)), f"task {task.id} had finished")
    assert_one_line_error(cli(ldsn, "cancel", "987654"), "987654")


@pytest.mark.timeout(60)
def test_purge_deletes_expired_tasks_now(ldsn):
    """`purge` deletes the finished tasks whose retention ran out and says how many."""
    old, young = jl.one.enqueue_many([{"n": 1}, {"n": 2}])
    drain_lifecycle(ldsn)
    query(
        ldsn,
        "UPDATE underway.task SET expires_at = now() - interval '1 s' WHERE id = %s",
        (old.id,),
    )
    purged = cli(ldsn, "purge")
    assert (purged.returncode, purged.stderr) == (0, "")
    assert purged.stdout == "deleted 1 finished task(s) past their retention\n"
    assert [old.status(), young.status()] == [None, "succeeded"]
    assert cli(ldsn, "purge").stdout == "deleted 0 finished task(s) past their retention\n"


@pytest.mark.timeout(60)
def test_database_url_is_the_default(ldsn):
    """Without --dsn, the command line uses $DATABASE_URL."""
    result = cli(None, "pause", "from-env", env={"DATABASE_URL": ldsn})
    assert (result.returncode, result.stderr) == (0, ""), result
    assert admin.queues()[0].queue == "from-env"


# -- failing clearly ------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: "-".join(c))
def test_database_without_the_schema(empty_dsn, command):
    """Every subcommand, on a database without underway's schema: an error saying to run
    the migrations, exit 1, no traceback (how many lines: see the next test)."""
    assert_one_line_error(
        cli(empty_dsn, *command), "no underway schema", "run_migrations", one_line=False
    )


@pytest.mark.timeout(60)
def test_database_without_the_schema_is_one_line(empty_dsn):
    """On a database without the schema, the error is one line."""
    assert_one_line_error(cli(empty_dsn, "queues"), "no underway schema", "run_migrations")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: "-".join(c))
def test_unreachable_database(command):
    """Every subcommand, with a database nothing listens for: one line saying it cannot
    connect, exit 1, no traceback, and the password in the DSN shown as ***."""
    dsn = f"postgresql://lifecycle:{SECRET}@127.0.0.1:9/nowhere?connect_timeout=5"
    result = cli(dsn, *command)
    assert_one_line_error(result, "cannot connect to the database", "lifecycle:***@127.0.0.1")


@pytest.mark.timeout(60)
def test_unreachable_database_with_a_keyword_dsn():
    """A key=value DSN with a password: the password is hidden as well."""
    dsn = f"host=127.0.0.1 port=9 dbname=nowhere user=lifecycle password={SECRET}"
    assert_one_line_error(cli(dsn, "queues"), "cannot connect", "password=***")


@pytest.mark.timeout(60)
def test_no_database_configured():
    """No --dsn and no $DATABASE_URL: one line saying how to name the database, exit 1."""
    assert_one_line_error(cli(None, "queues"), "no database configured", "DATABASE_URL")


@pytest.mark.timeout(60)
def test_bad_arguments(ldsn):
    """A blank queue name is refused in one line (exit 1); a missing subcommand or a task
    id that is not a number is a usage error (exit 2)."""
    assert_one_line_error(cli(ldsn, "pause", " "), "a queue name is a non-empty string")
    assert scalar(ldsn, "SELECT count(*) FROM underway.paused_queue") == 0
    for args in ([], ["status", "forty-two"], ["cancel"], ["explode"]):
        result = cli(ldsn, *args)
        assert result.returncode == 2, result
        assert "usage: python -m underway.admin" in result.stderr
        assert "Traceback" not in result.stderr
