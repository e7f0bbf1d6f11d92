"""Enqueueing against a real PostgreSQL: what lands in ``underway.task``, and when.

Covers the process connection (autocommit, fork- and thread-safe, reconnecting), the
caller's transaction (``conn=``), batches, input validation, missing schema, unreachable
servers and the wake-up NOTIFY.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import threading
import traceback
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import jobs_enqueue
import psycopg2
import pytest
from jobs_enqueue import basic, prioritised
from psycopg2.extensions import connection as PgConnection

import underway
from underway import SchemaMissing, Task

from .helpers import dbname_of, query, scalar, wait_until
from .pgtest import PgTestServer

APP_NAME = "underway enqueue"


def task_count(dsn: str) -> int:
    return scalar(dsn, "SELECT count(*) FROM underway.task")


def enqueue_backends(dsn: str) -> list[int]:
    """Backend pids of the process connections (``application_name`` 'underway enqueue')."""
    rows = query(
        dsn,
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = %s"
        " ORDER BY pid",
        (dbname_of(dsn), APP_NAME),
    )
    return [pid for (pid,) in rows]


@pytest.fixture
def txn(dsn: str) -> Iterator[PgConnection]:
    """A psycopg2 connection in its default mode: every statement opens a transaction."""
    connection = psycopg2.connect(dsn, connect_timeout=10)
    assert connection.autocommit is False
    try:
        yield connection
    finally:
        connection.close()


# ---------------------------------------------------------------------------- plain enqueue


def test_plain_enqueue_commits_at_once_with_the_right_row(dsn: str, conn: PgConnection) -> None:
    """enqueue() without conn commits on its own: another connection sees a pending row at
    step 0 with the input as jsonb, priority 0 and the first step's max_attempts."""
    inp = {"order_id": 42, "tags": ["a", "b"], "nested": {"x": 1.5, "none": None}}
    task = basic.enqueue(inp)

    assert isinstance(task, Task)
    assert task.job == "enqueue-basic"
    assert isinstance(task.id, int)
    with conn.cursor() as cur:  # a different session, no transaction of ours open
        cur.execute(
            "SELECT job, state::text, step, input, jsonb_typeof(input), priority,"
            " max_attempts, attempts, run_at <= now() FROM underway.task"
        )
        rows = cur.fetchall()
    assert rows == [("enqueue-basic", "pending", 0, inp, "object", 0, 7, 0, True)]
    assert scalar(dsn, "SELECT id FROM underway.task") == task.id


def test_enqueue_of_scalars_and_none_stores_them_as_json(dsn: str) -> None:
    """Any JSON value is an input: None becomes JSON null, not SQL NULL; strings stay strings."""
    values = [None, 0, "text with 'quotes' and ünïcode", [1, [2]], True]
    ids = [basic.enqueue(v).id for v in values]
    rows = query(dsn, "SELECT id, input, jsonb_typeof(input) FROM underway.task ORDER BY id")
    assert [r[0] for r in rows] == ids
    assert [r[1] for r in rows] == values
    assert [r[2] for r in rows] == ["null", "number", "string", "array", "boolean"]


# ---------------------------------------------------------------------------- conn=


@pytest.mark.parametrize("use_cursor", [False, True], ids=["connection", "cursor"])
def test_enqueue_in_the_callers_transaction_is_invisible_until_commit(
    dsn: str, txn: PgConnection, use_cursor: bool
) -> None:
    """With conn= (connection or cursor) the row is written in the caller's transaction:
    invisible elsewhere before commit, present after it."""
    with txn.cursor() as cur:
        target = cur if use_cursor else txn
        task = basic.enqueue({"in": "txn"}, conn=target)
        assert txn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INTRANS
        cur.execute("SELECT count(*) FROM underway.task WHERE id = %s", (task.id,))
        assert cur.fetchone() == (1,)  # the caller's own transaction sees it
        assert task_count(dsn) == 0
        assert enqueue_backends(dsn) == []  # the process connection was never opened
    txn.commit()
    assert query(dsn, "SELECT id, input FROM underway.task") == [(task.id, {"in": "txn"})]


@pytest.mark.parametrize("use_cursor", [False, True], ids=["connection", "cursor"])
def test_enqueue_in_the_callers_transaction_vanishes_on_rollback(
    dsn: str, txn: PgConnection, use_cursor: bool
) -> None:
    """With conn= the task never exists if the caller rolls back."""
    with txn.cursor() as cur:
        basic.enqueue({"in": "txn"}, conn=cur if use_cursor else txn)
        cur.execute("SELECT count(*) FROM underway.task")
        assert cur.fetchone() == (1,)
    txn.rollback()
    assert task_count(dsn) == 0
    # The caller's cursor is not closed by the library: it is still usable.
    with txn.cursor() as cur:
        basic.enqueue({"again": True}, conn=cur)
        cur.execute("SELECT 1")
    txn.commit()
    assert query(dsn, "SELECT input FROM underway.task") == [({"again": True},)]


# ---------------------------------------------------------------------------- delay, priority


@pytest.mark.parametrize(
    "delay, expected",
    [
        (timedelta(minutes=5, milliseconds=250), timedelta(minutes=5, milliseconds=250)),
        (90, timedelta(seconds=90)),
        (2.5, timedelta(seconds=2.5)),
        (timedelta(days=3), timedelta(days=3)),
    ],
    ids=["timedelta", "int-seconds", "float-seconds", "days"],
)
def test_delay_sets_run_at_after_the_insert_time(dsn: str, delay: Any, expected: timedelta) -> None:
    """delay (timedelta or seconds) sets run_at = now() + delay on the database clock."""
    basic.enqueue({"delayed": True}, delay=delay)
    basic.enqueue({"delayed": False})
    rows = query(dsn, "SELECT run_at - created_at, run_at > now() FROM underway.task ORDER BY id")
    (delayed_gap, delayed_future), (plain_gap, plain_future) = rows
    assert abs(delayed_gap - expected) < timedelta(milliseconds=1), delayed_gap
    assert delayed_future is True
    assert plain_gap == timedelta(0)
    assert plain_future is False


def test_priority_override_and_job_default(dsn: str) -> None:
    """priority= overrides the job's default priority; without it the job's own applies."""
    a = basic.enqueue({}, priority=7)
    b = basic.enqueue({})
    c = prioritised.enqueue({})
    d = prioritised.enqueue({}, priority=-3)
    e = prioritised.enqueue({}, priority=0)
    many = prioritised.enqueue_many([{}, {}])
    rows = dict(query(dsn, "SELECT id, priority FROM underway.task"))
    assert rows == {a.id: 7, b.id: 0, c.id: 5, d.id: -3, e.id: 0, many[0].id: 5, many[1].id: 5}


# ---------------------------------------------------------------------------- enqueue_many


def test_enqueue_many_is_one_statement_in_input_order(dsn: str) -> None:
    """enqueue_many of 1,000 inputs: one INSERT (one xmin, one command id), tasks returned in
    input order with ascending ids, and each task's stored input is the input at its place."""
    values = list(range(1000))
    random.Random(7).shuffle(values)  # input order must not coincide with any sort order
    inputs = [{"v": v, "s": f"item-{v}"} for v in values]

    tasks = basic.enqueue_many(iter(inputs))  # any iterable

    assert len(tasks) == 1000
    assert all(t.job == "enqueue-basic" for t in tasks)
    ids = [t.id for t in tasks]
    assert ids == sorted(ids) and len(set(ids)) == 1000
    stored = dict(query(dsn, "SELECT id, input FROM underway.task"))
    assert [stored[t.id] for t in tasks] == inputs
    assert query(
        dsn,
        "SELECT count(DISTINCT xmin::text), count(DISTINCT cmin::text), count(*),"
        " count(*) FILTER (WHERE state = 'pending' AND step = 0 AND max_attempts = 7)"
        " FROM underway.task",
    ) == [(1, 1, 1000, 1000)]


def test_enqueue_many_with_one_bad_item_writes_nothing(dsn: str) -> None:
    """A batch with one non-serialisable item raises TypeError naming the job; no row is
    written, not even the valid items before it."""
    batch = [{"ok": 1}, {"ok": 2}, {"bad": object()}, {"ok": 3}]
    with pytest.raises(TypeError, match="enqueue-basic"):
        basic.enqueue_many(batch)
    with pytest.raises(ValueError, match="enqueue-basic"):
        basic.enqueue_many([{"ok": 1}, {"bad": float("nan")}])
    assert task_count(dsn) == 0
    assert enqueue_backends(dsn) == []  # refused before any connection was opened


def test_enqueue_many_in_the_callers_transaction(dsn: str, txn: PgConnection) -> None:
    """enqueue_many(conn=) writes in the caller's transaction: nothing after a rollback,
    everything after a commit, nothing visible in between."""
    basic.enqueue_many([{"n": n} for n in range(10)], conn=txn)
    assert task_count(dsn) == 0
    txn.rollback()
    assert task_count(dsn) == 0

    tasks = basic.enqueue_many([{"n": n} for n in range(10)], conn=txn)
    assert task_count(dsn) == 0
    txn.commit()
    assert query(dsn, "SELECT id, input->>'n' FROM underway.task ORDER BY id") == [
        (t.id, str(n)) for n, t in enumerate(tasks)
    ]


# ---------------------------------------------------------------------------- invalid input


@pytest.mark.parametrize(
    "bad",
    [object(), {1, 2}, b"bytes", {"nested": [object()]}, {"when": timedelta(1)}],
    ids=["object", "set", "bytes", "nested-object", "timedelta"],
)
def test_non_json_input_is_a_type_error_naming_the_job(
    dsn: str, txn: PgConnection, bad: Any
) -> None:
    """Non-JSON input raises TypeError naming the job, writes nothing, and leaves the
    caller's transaction usable."""
    with pytest.raises(TypeError, match="enqueue-basic"):
        basic.enqueue(bad)
    with pytest.raises(TypeError, match="enqueue-basic"):
        basic.enqueue(bad, conn=txn)
    basic.enqueue({"fine": True}, conn=txn)  # the transaction was not aborted
    txn.commit()
    assert query(dsn, "SELECT input FROM underway.task") == [({"fine": True},)]


@pytest.mark.parametrize(
    "bad",
    [float("nan"), {"x": [float("inf")]}, -float("inf")],
    ids=["nan", "nested-inf", "minus-inf"],
)
def test_nan_and_infinity_are_a_value_error_naming_the_job(dsn: str, bad: Any) -> None:
    """NaN and infinities raise ValueError naming the job, and nothing is written."""
    with pytest.raises(ValueError, match="enqueue-basic"):
        basic.enqueue(bad)
    assert task_count(dsn) == 0


@pytest.mark.parametrize("bad", ["a\x00b", {"k": "\ud800"}], ids=["nul", "lone-surrogate"])
def test_strings_jsonb_cannot_store_are_a_value_error_naming_the_job(
    dsn: str, txn: PgConnection, bad: Any
) -> None:
    """An input jsonb cannot store is refused like NaN: ValueError naming the job, nothing
    written, the caller's transaction still usable."""
    with pytest.raises(ValueError, match="enqueue-basic"):
        basic.enqueue(bad, conn=txn)
    basic.enqueue({"fine": True}, conn=txn)
    txn.commit()
    assert query(dsn, "SELECT input FROM underway.task") == [({"fine": True},)]


@pytest.mark.parametrize("bad", ["a\x00b", {"k": "\ud800"}], ids=["nul", "lone-surrogate"])
def test_a_batch_with_a_string_jsonb_cannot_store_names_its_index(dsn: str, bad: Any) -> None:
    """enqueue_many encodes a batch in one go, yet still finds an input jsonb cannot store,
    names it by its index, and writes none of the batch."""
    with pytest.raises(ValueError, match="input 2 of the batch holds a string"):
        basic.enqueue_many([{"ok": 1}, "fine \U0001f600", bad, {"ok": 3}])
    assert task_count(dsn) == 0


def test_a_batch_over_16_mib_in_all_is_stored_when_each_input_is_within_it(dsn: str) -> None:
    """The 16 MiB limit is per input: a batch of two 9 MiB inputs is enqueued whole, and
    an emoji (an escaped surrogate pair in the JSON text) is stored as given."""
    big = "x" * (9 * 1024 * 1024)
    tasks = basic.enqueue_many([big, big, "\U0001f600"])
    rows = query(
        dsn,
        "SELECT id, length(input #>> '{}'), input #>> '{}' = '\U0001f600' "
        "FROM underway.task ORDER BY id",
    )
    assert [(r[0], r[1]) for r in rows] == [(t.id, n) for t, n in zip(tasks, [len(big)] * 2 + [1])]
    assert rows[2][2] is True


def test_priority_outside_the_integer_column_is_a_value_error_naming_the_job(
    dsn: str, txn: PgConnection
) -> None:
    """A priority the integer column cannot hold is refused before the database, naming
    the job, and the caller's transaction stays usable."""
    with pytest.raises(ValueError, match="enqueue-basic"):
        basic.enqueue({}, priority=2**31, conn=txn)
    basic.enqueue({"fine": True}, conn=txn)
    txn.commit()
    assert query(dsn, "SELECT input FROM underway.task") == [({"fine": True},)]


# ---------------------------------------------------------------------------- failures


def test_missing_schema_raises_schema_missing_and_creates_nothing(empty_dsn: str) -> None:
    """Against a database without the schema, enqueue (plain or conn=) raises SchemaMissing
    telling to run the migrations, and creates nothing there."""
    underway.configure(dsn=empty_dsn)
    with pytest.raises(SchemaMissing, match="run_migrations"):
        basic.enqueue({"x": 1})
    with pytest.raises(SchemaMissing, match="run_migrations"):
        basic.enqueue_many([{"x": 1}, {"x": 2}])
    other = psycopg2.connect(empty_dsn, connect_timeout=10)
    try:
        with pytest.raises(SchemaMissing, match="run_migrations"):
            basic.enqueue({"x": 1}, conn=other)
        other.rollback()
    finally:
        other.close()
    assert (
        query(
            empty_dsn,
            "SELECT n.nspname, c.relname FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')",
        )
        == []
    )
    assert scalar(empty_dsn, "SELECT count(*) FROM pg_namespace WHERE nspname = 'underway'") == 0


def test_unreachable_database_error_hides_the_password() -> None:
    """Enqueue to a server that is not there raises OperationalError; neither its message
    nor its printed traceback contains the password."""
    secret = "secretpw-" + uuid.uuid4().hex[:8]
    underway.configure(dsn=f"postgresql://u:{secret}@127.0.0.1:1/x")
    try:
        with pytest.raises(psycopg2.OperationalError) as excinfo:
            basic.enqueue({"x": 1})
    finally:
        underway.configure(dsn=None)
    exc = excinfo.value
    printed = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    assert secret not in str(exc)
    assert secret not in printed
    assert "127.0.0.1" in str(exc)  # it still says where it tried


# ---------------------------------------------------------------------------- processes, threads


def test_fork_child_uses_its_own_connection_and_spares_the_parents(dsn: str) -> None:
    """After fork the child enqueues on a new backend of its own, and the parent's session
    (same backend pid) still works afterwards: 3 rows."""
    basic.enqueue({"who": "parent-before"})
    (parent_backend,) = enqueue_backends(dsn)
    release_r, release_w = os.pipe()

    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            os.close(release_w)
            basic.enqueue({"who": "child", "pid": os.getpid()})
            os.read(release_r, 1)  # hold the connection until the parent has looked
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)

    os.close(release_r)
    try:
        backends = wait_until(
            lambda: [b for b in [enqueue_backends(dsn)] if len(b) == 2],
            message="the child's own enqueue connection",
        )[0]
        assert parent_backend in backends
    finally:
        os.write(release_w, b"x")
        os.close(release_w)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status

    basic.enqueue({"who": "parent-after"})
    assert enqueue_backends(dsn) == [parent_backend]  # the parent's session was never reset
    assert query(dsn, "SELECT input FROM underway.task ORDER BY id") == [
        ({"who": "parent-before"},),
        ({"who": "child", "pid": pid},),
        ({"who": "parent-after"},),
    ]


def test_multiprocessing_pool_workers_enqueue(dsn: str) -> None:
    """A fork-context Pool of 2, each call enqueueing 50 tasks, writes 100 rows from the
    worker processes, and the parent's connection still works after."""
    basic.enqueue({"who": "parent-before"})
    (parent_backend,) = enqueue_backends(dsn)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        pids = pool.map(jobs_enqueue.enqueue_range, [0, 50], chunksize=1)
        pool.close()
        pool.join()
    basic.enqueue({"who": "parent-after"})

    assert os.getpid() not in pids
    assert enqueue_backends(dsn) == [parent_backend]
    rows = query(dsn, "SELECT input FROM underway.task ORDER BY id")
    assert len(rows) == 102
    assert rows[0] == ({"who": "parent-before"},) and rows[-1] == ({"who": "parent-after"},)
    worker_rows = [r[0] for r in rows[1:-1]]
    assert sorted(r["n"] for r in worker_rows) == list(range(100))
    assert {r["pid"] for r in worker_rows} <= set(pids)


def test_threads_share_the_process_connection(dsn: str) -> None:
    """4 threads x 50 enqueues on the process connection: 200 rows, no error, one backend."""
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def work(t: int) -> None:
        try:
            start.wait(timeout=10)
            for i in range(50):
                basic.enqueue({"t": t, "i": i})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert query(
        dsn, "SELECT count(*), count(DISTINCT input), count(DISTINCT id) FROM underway.task"
    ) == [(200, 200, 200)]
    assert len(enqueue_backends(dsn)) == 1


# ---------------------------------------------------------------------------- dropped connection


def test_enqueue_recovers_after_the_server_drops_its_connection(
    dsn: str, pg_server: PgTestServer
) -> None:
    """After the server terminates the process connection, enqueueing works again by the
    second try at the latest, on a new backend; every success is a row."""
    basic.enqueue({"n": 0})
    (old_backend,) = enqueue_backends(dsn)
    assert pg_server.terminate_backends(dbname_of(dsn), application_name_like=APP_NAME + "%") == 1

    written = 1
    try:
        basic.enqueue({"n": 1})
        written += 1
    except psycopg2.OperationalError:
        pass  # tolerated here; test_next_enqueue_after_a_dropped_connection_succeeds is strict
    basic.enqueue({"n": 2})
    written += 1
    assert task_count(dsn) == written
    backends = enqueue_backends(dsn)
    assert len(backends) == 1 and backends != [old_backend]


def test_next_enqueue_after_a_dropped_connection_succeeds(
    dsn: str, pg_server: PgTestServer
) -> None:
    """The library notices the dead idle process connection and reconnects: the very next
    plain enqueue after the server dropped it succeeds."""
    basic.enqueue({"n": 0})
    assert pg_server.terminate_backends(dbname_of(dsn), application_name_like=APP_NAME + "%") == 1
    basic.enqueue({"n": 1})
    assert query(dsn, "SELECT input->>'n' FROM underway.task ORDER BY id") == [("0",), ("1",)]


# ---------------------------------------------------------------------------- NOTIFY


class Listener:
    """A session LISTENing on 'underway' (and on a private 'probe' channel to synchronise)."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg2.connect(dsn, connect_timeout=10)
        self.conn.autocommit = True
        self._prober = psycopg2.connect(dsn, connect_timeout=10)
        self._prober.autocommit = True
        with self.conn.cursor() as cur:
            cur.execute("LISTEN underway; LISTEN probe")

    def received(self, channel: str = "underway") -> list[Any]:
        self.conn.poll()
        return [n for n in self.conn.notifies if n.channel == channel]

    def sync(self) -> None:
        """Return once every notification committed so far has been delivered.

        Another session commits NOTIFY probe; notifications arrive in commit order, so once
        the probe is here, anything committed before it is here as well.
        """
        token = uuid.uuid4().hex
        with self._prober.cursor() as cur:
            cur.execute("SELECT pg_notify('probe', %s)", (token,))
        wait_until(
            lambda: any(n.payload == token for n in self.received("probe")),
            message="the probe notification",
        )

    def close(self) -> None:
        self.conn.close()
        self._prober.close()


@pytest.fixture
def listener(dsn: str) -> Iterator[Listener]:
    lis = Listener(dsn)
    try:
        yield lis
    finally:
        lis.close()


def test_plain_enqueue_notifies_after_commit(dsn: str, listener: Listener) -> None:
    """A plain enqueue wakes a LISTEN underway session, and the task is visible to it by then."""
    listener.sync()
    assert listener.received() == []
    task = basic.enqueue({"wake": True})
    wait_until(listener.received, message="an 'underway' notification")
    with listener.conn.cursor() as cur:
        cur.execute("SELECT state::text FROM underway.task WHERE id = %s", (task.id,))
        assert cur.fetchone() == ("pending",)


def test_enqueue_in_a_transaction_notifies_only_at_commit(
    dsn: str, listener: Listener, txn: PgConnection
) -> None:
    """enqueue(conn=) in an open transaction sends nothing until commit (nothing at all on
    rollback), and the notification comes with the commit."""
    basic.enqueue({"n": 1}, conn=txn)
    listener.sync()
    assert listener.received() == []
    txn.rollback()
    listener.sync()
    assert listener.received() == []

    basic.enqueue({"n": 2}, conn=txn)
    listener.sync()
    assert listener.received() == []
    txn.commit()
    wait_until(listener.received, message="an 'underway' notification after commit")
    assert query(dsn, "SELECT input FROM underway.task") == [({"n": 2},)]


def test_enqueue_many_notifies(dsn: str, listener: Listener) -> None:
    """One enqueue_many of 100 tasks sends at least one wake-up notification."""
    listener.sync()
    assert listener.received() == []
    basic.enqueue_many([{"n": n} for n in range(100)])
    listener.sync()
    assert len(listener.received()) >= 1
    assert task_count(dsn) == 100


def test_stored_input_round_trips_exactly(dsn: str) -> None:
    """The stored jsonb equals the input after a JSON round trip (unicode, big ints, floats)."""
    inp = {"big": 2**62, "float": 0.1, "neg": -1e-7, "text": '日本語 "quoted" \\ slash', "e": []}
    task = basic.enqueue(inp)
    stored = scalar(dsn, "SELECT input::text FROM underway.task WHERE id = %s", (task.id,))
    assert json.loads(stored) == json.loads(json.dumps(inp))
