"""Migrations against a real PostgreSQL: idempotent, safe to run concurrently, equal to
``schema.sql``, usable from a shell, and giving a dequeue plan that needs no statistics."""

from __future__ import annotations

import datetime
import difflib
import json
import multiprocessing
import re
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg2
import pytest

import underway
import underway.testing
from underway.testing import drain

from .helpers import REPO_ROOT, query, run_python, scalar
from .pgtest import PgTestServer

#: Objects that enqueueing, dequeueing and retries need, as (kind, name) in schema
#: ``underway``. A subset: other features (schedules, ...) add objects of their own.
CORE_OBJECTS = {
    ("table", "migration"),
    ("table", "task"),
    ("table", "attempt"),
    ("index", "task_ready_idx"),
    ("index", "task_due_idx"),
    ("index", "task_lease_idx"),
    ("index", "attempt_task_idx"),
    ("type", "task_state"),
    ("function", "claim_task"),
    ("function", "notify_task_inserted"),
    ("trigger", "task_inserted"),
}


def schema_objects(dsn: str) -> set[tuple[str, str]]:
    """(kind, name) of the tables, indexes, enum types, functions and triggers in underway."""
    rows = query(
        dsn,
        """
        SELECT CASE c.relkind WHEN 'r' THEN 'table' WHEN 'i' THEN 'index' END, c.relname
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'underway' AND c.relkind IN ('r', 'i') AND c.relname NOT LIKE '%_pkey'
        UNION ALL
        SELECT 'type', t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE n.nspname = 'underway' AND t.typtype = 'e'
        UNION ALL
        SELECT 'function', p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'underway'
        UNION ALL
        SELECT 'trigger', tg.tgname FROM pg_trigger tg
        JOIN pg_class c ON c.oid = tg.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'underway' AND NOT tg.tgisinternal
        """,
    )
    return set(rows)


ALL_MIGRATIONS = [(1, "initial"), (2, "lifecycle"), (3, "operating"), (4, "fixes")]


def migration_rows(dsn: str) -> list[tuple[int, str]]:
    return query(dsn, "SELECT version, name FROM underway.migration ORDER BY version")


@pytest.fixture
def other_empty_dsn(pg_server: PgTestServer) -> Iterator[str]:
    """A second fresh database without the library schema."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    pg_server.ensure_running()
    dsn = pg_server.create_database(name)
    try:
        yield dsn
    finally:
        pg_server.ensure_running()
        pg_server.drop_database(name)


# ---------------------------------------------------------------------------- run_migrations


def test_run_migrations_applies_once_then_is_idempotent(empty_dsn: str) -> None:
    """run_migrations applies every migration on an empty database, then [] on every later
    run, and records each migration once."""
    assert underway.run_migrations(empty_dsn) == [1, 2, 3, 4]
    assert underway.run_migrations(empty_dsn) == []
    assert underway.run_migrations(empty_dsn) == []
    assert migration_rows(empty_dsn) == ALL_MIGRATIONS
    assert schema_objects(empty_dsn) >= CORE_OBJECTS


def test_upgrade_from_version_1_keeps_tasks_and_backfills_them(empty_dsn: str) -> None:
    """A database at version 1 with queued and finished tasks upgrades to the latest: the
    tasks stay, in their job's queue (NULL), finished ones expiring 14 days after they
    finished, and the queued one then runs to the end on the new version."""
    from underway.migrations import BOOTSTRAP_SQL, migrations

    first = migrations()[0]
    with psycopg2.connect(empty_dsn) as conn, conn.cursor() as cur:
        cur.execute(BOOTSTRAP_SQL)
        cur.execute(first.sql)
        cur.execute("INSERT INTO underway.migration VALUES (1, 'initial')")
        cur.execute(
            "INSERT INTO underway.task (job, input, state, finished_at) VALUES"
            " ('migrations-upgrade', '1', 'pending', NULL),"
            " ('migrations-upgrade', '2', 'succeeded', now() - interval '1 day')"
        )
    conn.close()
    assert underway.run_migrations(empty_dsn) == [2, 3, 4]
    rows = query(
        empty_dsn,
        "SELECT input::text, queue, expires_at - finished_at FROM underway.task ORDER BY id",
    )
    assert rows == [
        ("1", None, None),
        ("2", None, datetime.timedelta(days=14)),
    ]
    upgraded = underway.Job("migrations-upgrade")
    seen = []
    upgraded.step(lambda cx, inp: seen.append(inp))
    try:
        assert drain([upgraded], dsn=empty_dsn) == 1
    finally:
        underway.testing.unregister_job(upgraded.name)
    assert seen == [1]
    assert scalar(empty_dsn, "SELECT count(*) FROM underway.task WHERE state = 'succeeded'") == 2


def test_supervisor_refuses_a_schema_older_than_it_needs(empty_dsn: str) -> None:
    """Against a database migrated only to version 1, the supervisor exits 1 with one line
    saying the schema is too old and to run the migrations, and starts nothing."""
    from underway.migrations import BOOTSTRAP_SQL, migrations

    with psycopg2.connect(empty_dsn) as conn, conn.cursor() as cur:
        cur.execute(BOOTSTRAP_SQL)
        cur.execute(migrations()[0].sql)
        cur.execute("INSERT INTO underway.migration VALUES (1, 'initial')")
    conn.close()
    result = run_python(["-m", "underway.supervisor", "jobs_enqueue", "--dsn", empty_dsn])
    assert result.returncode == 1, result
    assert result.stderr.strip().splitlines() == [
        "underway: the underway schema is at version 1, this version needs 4: "
        "run underway.run_migrations(dsn)"
    ], result.stderr


def _migrate_at_once(dsn: str, barrier: Any, results: Any) -> None:
    """Child process: wait for the others, then migrate; report the outcome on the queue."""
    try:
        barrier.wait(timeout=30)
        results.put(("ok", underway.run_migrations(dsn)))
    except BaseException as exc:
        results.put(("error", repr(exc)))


def test_concurrent_migrations_apply_exactly_once(empty_dsn: str, other_empty_dsn: str) -> None:
    """4 processes released together by a barrier all migrate one empty database: all
    succeed, exactly one applies version 1, and the schema is complete: its pg_dump equals
    that of a database migrated by one process alone."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_migrate_at_once, args=(empty_dsn, barrier, results)) for _ in range(4)
    ]
    for proc in procs:
        proc.start()
    try:
        outcomes = [results.get(timeout=60) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    assert sorted(outcomes) == [("ok", []), ("ok", []), ("ok", []), ("ok", [1, 2, 3, 4])], outcomes
    assert all(proc.exitcode == 0 for proc in procs)
    assert migration_rows(empty_dsn) == ALL_MIGRATIONS
    assert schema_objects(empty_dsn) >= CORE_OBJECTS
    assert underway.run_migrations(other_empty_dsn) == [1, 2, 3, 4]
    assert_same_schema(schema_dump(other_empty_dsn), schema_dump(empty_dsn), "concurrent run")


# ---------------------------------------------------------------------------- schema.sql


_VOLATILE_DUMP_LINE = re.compile(r"^(--|SET |SELECT pg_catalog\.set_config|\\(un)?restrict )")


def schema_dump(dsn: str) -> list[str]:
    """pg_dump --schema-only of schema underway, without comments, SET lines and blanks."""
    from pgserver._commands import POSTGRES_BIN_PATH

    proc = subprocess.run(
        [
            str(POSTGRES_BIN_PATH / "pg_dump"),
            "--schema-only",
            "--schema=underway",
            "--no-owner",
            "--no-privileges",
            "--dbname",
            dsn,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [
        line
        for line in proc.stdout.splitlines()
        if line.strip() and not _VOLATILE_DUMP_LINE.match(line)
    ]
    assert any("CREATE TABLE underway.task" in line for line in lines), proc.stdout
    return lines


def assert_same_schema(expected: list[str], actual: list[str], label: str) -> None:
    """Fail with a readable unified diff when two schema dumps differ."""
    diff = "\n".join(difflib.unified_diff(expected, actual, "run_migrations", label, lineterm=""))
    assert not diff, f"{label} differs from the migrations (pg_dump, comments dropped):\n{diff}"


def test_schema_sql_equals_the_migrations(empty_dsn: str, other_empty_dsn: str) -> None:
    """schema.sql, run in one go, builds exactly the schema run_migrations builds (pg_dump
    of both compared line by line) and records the same migrations."""
    conn = psycopg2.connect(other_empty_dsn, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute((REPO_ROOT / "schema.sql").read_text(encoding="utf-8"))
        conn.commit()
    finally:
        conn.close()
    underway.run_migrations(empty_dsn)

    from_migrations = schema_dump(empty_dsn)
    from_schema_sql = schema_dump(other_empty_dsn)
    assert_same_schema(from_migrations, from_schema_sql, "schema.sql")
    assert migration_rows(other_empty_dsn) == migration_rows(empty_dsn) == ALL_MIGRATIONS
    # A database built from schema.sql is one the migrations consider up to date.
    assert underway.run_migrations(other_empty_dsn) == []


# ---------------------------------------------------------------------------- command line


def test_command_line_migrates_then_says_up_to_date(empty_dsn: str) -> None:
    """`python -m underway.migrations --dsn DSN` applies 1 and exits 0, then says up to date."""
    first = run_python(["-m", "underway.migrations", "--dsn", empty_dsn])
    assert first.returncode == 0, first
    assert first.stdout.strip() == "underway: applied migrations 1, 2, 3, 4", first
    second = run_python(["-m", "underway.migrations", "--dsn", empty_dsn])
    assert second.returncode == 0, second
    assert "up to date" in second.stdout, second
    assert migration_rows(empty_dsn) == ALL_MIGRATIONS


def test_command_line_unreachable_database_one_line_no_password() -> None:
    """With an unreachable DSN the command exits non-zero with one line on stderr saying it
    cannot connect: no traceback, no password."""
    secret = "secretpw-" + uuid.uuid4().hex[:8]
    result = run_python(
        ["-m", "underway.migrations", "--dsn", f"postgresql://u:{secret}@127.0.0.1:1/x"]
    )
    assert result.returncode != 0, result
    assert result.stdout == "", result
    assert len(result.stderr.strip().splitlines()) == 1, result
    assert "cannot connect" in result.stderr, result
    assert "Traceback" not in result.stderr
    assert secret not in result.stdout + result.stderr


# ---------------------------------------------------------------------------- dequeue index


def ready_query(cur: Any) -> str:
    """The claim's inner SELECT, cut out of claim_task's own source, with its arguments
    filled in: what EXPLAIN must show walking task_ready_idx."""
    cur.execute(
        "SELECT prosrc FROM pg_proc"
        " WHERE proname = 'claim_task' AND pronamespace = 'underway'::regnamespace"
    )
    (source,) = cur.fetchone()
    inner = source[source.index("SELECT c.id") : source.index("SKIP LOCKED") + len("SKIP LOCKED")]
    return inner.replace("ANY (jobs)", "ANY (ARRAY['enqueue-claim'])")


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


def claim_task_settings(cur: Any) -> list[str]:
    """The settings claim_task runs with (its ``SET`` clause, e.g. ``enable_sort=off``)."""
    cur.execute(
        "SELECT coalesce(proconfig, '{}') FROM pg_proc"
        " WHERE proname = 'claim_task' AND pronamespace = 'underway'::regnamespace"
    )
    (settings,) = cur.fetchone()
    return list(settings)


def assert_uses_ready_index(cur: Any, settings: Sequence[str] = ()) -> None:
    """EXPLAIN the claim's inner SELECT (under ``settings``, each 'name=value', as the
    function applies them) and assert it walks task_ready_idx and never scans task."""
    cur.execute("BEGIN")
    try:
        for setting in settings:
            name, _, value = setting.partition("=")
            cur.execute("SELECT set_config(%s, %s, true)", (name, value))
        cur.execute(f"EXPLAIN (FORMAT JSON) {ready_query(cur)}")
        (raw,) = cur.fetchone()
    finally:
        cur.execute("ROLLBACK")
    plan = (raw if isinstance(raw, list) else json.loads(raw))[0]["Plan"]
    nodes = list(plan_nodes(plan))
    pretty = json.dumps(plan, indent=1)
    assert any(n.get("Index Name") == "task_ready_idx" for n in nodes), pretty
    assert not any(
        n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "task" for n in nodes
    ), pretty


@pytest.mark.slow
def test_dequeue_uses_the_ready_index_among_a_million_finished_tasks_without_statistics(
    dsn: str,
) -> None:
    """With 1,000,000 finished tasks and no planner statistics, the claim query's plan uses
    task_ready_idx (no Seq Scan), claim_task returns the ready tasks highest priority first
    then oldest, and the plan (under claim_task's own settings) still uses the index after
    ANALYZE."""
    conn = psycopg2.connect(dsn, connect_timeout=10)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("ALTER TABLE underway.task SET (autovacuum_enabled = false)")
            cur.execute(
                "INSERT INTO underway.task (job, input, state, run_at, finished_at)"
                " SELECT 'enqueue-claim', '{}', 'succeeded', now() - interval '1 day', now()"
                " FROM generate_series(1, 1000000)"
            )
            pending = {}
            for key, job, priority, run_at in [
                ("old-low", "enqueue-claim", 0, "-1 hour"),
                ("new-high", "enqueue-claim", 5, "-10 minutes"),
                ("old-high", "enqueue-claim", 5, "-20 minutes"),
                ("future-top", "enqueue-claim", 9, "+1 hour"),  # not due yet
                ("other-job", "enqueue-other", 9, "-1 hour"),  # not asked for
            ]:
                cur.execute(
                    "INSERT INTO underway.task (job, input, priority, run_at)"
                    " VALUES (%s, '{}', %s, now() + %s::interval) RETURNING id",
                    (job, priority, run_at),
                )
                pending[key] = cur.fetchone()[0]
            cur.execute(
                "INSERT INTO underway.task (job, input, state, priority)"
                " VALUES ('enqueue-claim', '{}', 'running', 10)"
            )
            # No statistics exist: the plan below is made without any.
            cur.execute(
                "SELECT count(*) FROM pg_stats WHERE schemaname = 'underway' AND tablename = 'task'"
            )
            assert cur.fetchone() == (0,)
            cur.execute(
                "SELECT last_analyze, last_autoanalyze FROM pg_stat_user_tables"
                " WHERE relid = 'underway.task'::regclass"
            )
            assert cur.fetchone() == (None, None)

            # Without statistics the planner picks the ready index on its own, and with the
            # settings claim_task itself runs with.
            settings = claim_task_settings(cur)
            assert_uses_ready_index(cur)
            assert_uses_ready_index(cur, settings)

            claimed = []
            for token in (1, 2, 3, 4):
                cur.execute(
                    "SELECT id, state::text, claim_token, attempts"
                    " FROM underway.claim_task(ARRAY['enqueue-claim'], %s, 30)",
                    (token,),
                )
                claimed.append(cur.fetchall())
            assert claimed == [
                [(pending["old-high"], "running", 1, 1)],
                [(pending["new-high"], "running", 2, 1)],
                [(pending["old-low"], "running", 3, 1)],
                [],
            ]

            cur.execute("ANALYZE underway.task")
            cur.execute(
                "SELECT count(*) > 0 FROM pg_stats WHERE schemaname = 'underway'"
                " AND tablename = 'task'"
            )
            assert cur.fetchone() == (True,)
            # With statistics (which see almost no pending row) a plain EXPLAIN may go either
            # way between this index and task_due_idx + Sort; claim_task's own settings
            # keep it on the ready index whatever the statistics say.
            for _ in range(3):
                cur.execute("ANALYZE underway.task")
                assert_uses_ready_index(cur, settings)
    finally:
        conn.close()
    assert scalar(dsn, "SELECT count(*) FROM underway.task WHERE state = 'pending'") == 2
