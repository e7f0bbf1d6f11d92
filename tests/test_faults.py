"""Faults: workers killed mid-step, poison tasks, PostgreSQL restarts, terminated backends.

Real processes, real signals, a real server. Steps that must hang wait on an advisory lock
the test holds (``jobs_faults.Gate``). Idle workers run with ``--poll-interval 30``: a task
picked up within seconds after a fault was picked up through LISTEN on a re-established
connection, never by polling. Effects are rows the steps write through ``cx.cursor()``;
counting them proves which tries committed.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections import Counter

import jobs_faults
import psutil
import psycopg2
import pytest
from jobs_faults import (
    Gate,
    attempts_of,
    effects,
    enqueue_fresh,
    sql,
    states,
    task_row,
    underway_backends,
    worker_backends,
)

from .faults_common import supervisor, wait_blocked, wait_idle
from .helpers import dbname_of, wait_until
from .pgtest import PgTestServer

pytestmark = pytest.mark.fault

#: How fast a task must be picked up after a fault; the poll interval is 30 s.
PICKUP_LIMIT = 5.0


def assert_all_listening(dsn: str, workers: int, key: int) -> float:
    """Prove every idle worker hears NOTIFY: enqueue one blocking task per worker in one
    statement; each worker can hold only one, so all must start within seconds (the poll
    interval is 30 s). Returns the slowest pickup, by the database clock."""
    wait_idle(dsn, workers)
    gate = Gate(dsn)
    try:
        gate.hold(key)
        ids = enqueue_fresh(dsn, jobs_faults.blocking, [{"lock": key}] * workers)
        wait_blocked(dsn, key, count=workers, timeout=PICKUP_LIMIT)
        gate.release(key)
    finally:
        gate.close()
    wait_until(
        lambda: (
            states(dsn, "faults-block").get("succeeded", 0) >= workers
            and all(task_row(dsn, i)["state"] == "succeeded" for i in ids)
        ),
        message="the blocking tasks finished",
    )
    slowest = sql(
        dsn,
        "SELECT max(extract(epoch FROM a.started_at - t.created_at))::float8"
        " FROM underway.task t JOIN underway.attempt a ON a.task_id = t.id WHERE t.id = ANY(%s)",
        (ids,),
    )[0][0]
    assert slowest < PICKUP_LIMIT
    return slowest


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def terminate_ours(pg_server: PgTestServer, dsn: str) -> int:
    """Terminate the backends of workers, supervisor and scheduler (not this process's own
    enqueue connection); returns how many there were."""
    dbname = dbname_of(dsn)
    return pg_server.terminate_backends(dbname, "underway w%") + pg_server.terminate_backends(
        dbname, "underway s%"
    )


# -- crashes ------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_sigkill_mid_step_reruns_at_once_and_commits_exactly_once(fdsn: str, gate: Gate) -> None:
    """A worker SIGKILLed mid-step: its task is given back at once (the try counts), runs
    again on another worker, and its effect row is committed exactly once."""
    key = gate.hold(201)
    with supervisor(fdsn) as sup:
        wait_idle(fdsn, 2)
        task = jobs_faults.blocking.enqueue({"lock": key, "block_attempts": 1})
        [busy] = wait_blocked(fdsn, key)
        killed_at = sql(fdsn, "SELECT clock_timestamp()")[0][0]
        os.kill(busy, signal.SIGKILL)
        wait_until(
            lambda: task_row(fdsn, task.id)["state"] == "succeeded",
            message=f"task rerun after SIGKILL: {sup!r}",
        )
        rerun_started = sql(
            fdsn,
            "SELECT started_at FROM underway.attempt WHERE task_id = %s AND outcome = 'succeeded'",
            (task.id,),
        )[0][0]
        gap = (rerun_started - killed_at).total_seconds()
        print(f"\nSIGKILL to rerun started (database clock): {gap * 1000:.1f} ms")
        assert gap < 5.0
        assert f"worker {busy} (slot" in sup.output()
        assert f"killed by SIGKILL holding task {task.id}" in sup.output()
        row = task_row(fdsn, task.id)
        assert (row["attempts"], row["claim_token"]) == (2, None)
        assert attempts_of(fdsn, task.id) == [(0, 1, "crashed"), (0, 2, "succeeded")]
        assert effects(fdsn, task.id) == [(task.id, 0, 2)]
        # Whatever is left of the killed try's session may have the lock now: with its
        # client gone it cannot commit.
        gate.release(key)
        wait_until(lambda: worker_backends(fdsn, busy) == 0, message="killed worker's session gone")
        assert effects(fdsn, task.id) == [(task.id, 0, 2)]
        # The slot got a new worker and the supervisor carries on.
        wait_idle(fdsn, 2)
        assert busy not in sup.worker_pids()
        sup.signal(signal.SIGTERM)
        assert sup.wait(20) == 0, sup


@pytest.mark.timeout(60)
def test_sigkilled_workers_backend_does_not_outlive_it(fdsn: str, gate: Gate) -> None:
    """After a worker is SIGKILLed mid-statement and replaced, its old backend goes away:
    the supervisor is back within its N + 2 connections (2 workers + supervisor + scheduler)
    while the statement the dead worker started would still be waiting."""
    key = gate.hold(208)
    with supervisor(fdsn) as sup:
        wait_idle(fdsn, 2)
        wait_until(lambda: len(underway_backends(fdsn)) == 4, message="all connected")
        task = jobs_faults.blocking.enqueue({"lock": key, "block_attempts": 1})
        [busy] = wait_blocked(fdsn, key)
        os.kill(busy, signal.SIGKILL)
        wait_until(lambda: task_row(fdsn, task.id)["state"] == "succeeded")
        wait_idle(fdsn, 2)  # the replacement worker is up
        wait_until(
            lambda: len(underway_backends(fdsn)) <= 4,
            timeout=5,
            message="the dead worker's backend gone",
        )
        assert worker_backends(fdsn, busy) == 0
        sup.signal(signal.SIGTERM)
        assert sup.wait(20) == 0, sup


@pytest.mark.timeout(60)
def test_poison_task_fails_after_exactly_max_attempts_while_others_flow(fdsn: str) -> None:
    """A step that SIGKILLs its own worker every time (max_attempts=3) fails after exactly
    three counted tries, while 20 normal tasks all succeed and the supervisor stays up."""
    bad = jobs_faults.poison.enqueue({})
    normal = jobs_faults.one_step.enqueue_many([{"n": i} for i in range(20)])
    with supervisor(fdsn) as sup:
        wait_until(
            lambda: (
                task_row(fdsn, bad.id)["state"] == "failed"
                and states(fdsn, "faults-one-step") == {"succeeded": 20}
            ),
            timeout=30,
            message=f"poison failed and the others done: {sup!r}",
        )
        assert sup.is_running(), sup
        wait_idle(fdsn, 2)  # the killed workers were replaced
        sup.signal(signal.SIGTERM)
        assert sup.wait(20) == 0, sup
    row = task_row(fdsn, bad.id)
    assert (row["state"], row["attempts"], row["claim_token"]) == ("failed", 3, None)
    assert row["finished_at"] is not None
    assert attempts_of(fdsn, bad.id) == [(0, 1, "crashed"), (0, 2, "crashed"), (0, 3, "crashed")]
    assert effects(fdsn, bad.id) == []  # each try wrote, none committed
    ids = [t.id for t in normal]
    assert Counter(task_id for task_id, _, _ in effects(fdsn) if task_id in ids) == Counter(ids)
    assert sup.output().count(f"killed by SIGKILL holding task {bad.id}") == 3


# -- the database going away --------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_workers_listen_again_after_postgres_restart(fdsn: str, pg_server: PgTestServer) -> None:
    """PostgreSQL stopped and started while workers wait idle: the supervisor survives the
    outage, and afterwards every worker picks up work through LISTEN again."""
    if not pg_server.can_restart:
        pytest.skip("the server comes from DATABASE_URL: cannot restart it")
    with supervisor(fdsn, "--lease", "3") as sup:
        wait_idle(fdsn, 2)
        before = set(sup.worker_pids())
        pg_server.stop()
        try:
            sup.wait_for_output("database connection lost")
            sup.wait_for_output("maintenance skipped, database unavailable")
            assert sup.is_running(), sup
        finally:
            pg_server.start_again()
        slowest = assert_all_listening(fdsn, 2, key=202)
        print(f"\npickup after PostgreSQL restart: slowest {slowest * 1000:.1f} ms")
        assert sup.is_running(), sup
        after = set(sup.worker_pids())
        print(f"children before {sorted(before)}, after {sorted(after)}")
        assert "restarting worker" not in sup.output()  # no crash loop
        sup.signal(signal.SIGTERM)
        assert sup.wait(20) == 0, sup


@pytest.mark.timeout(60)
def test_workers_listen_again_after_backends_terminated(fdsn: str, pg_server: PgTestServer) -> None:
    """Every underway backend terminated while idle: tasks enqueued afterwards still start
    within seconds on every worker (LISTEN re-established), and nobody crashed."""
    with supervisor(fdsn, "--lease", "3") as sup:
        wait_idle(fdsn, 2)
        # 2 workers, the supervisor and the scheduler.
        assert terminate_ours(pg_server, fdsn) == 4
        slowest = assert_all_listening(fdsn, 2, key=203)
        print(f"\npickup after terminated backends: slowest {slowest * 1000:.1f} ms")
        assert sup.is_running(), sup
        assert "crashed" not in sup.output() and "restarting" not in sup.output()
        sup.signal(signal.SIGTERM)
        assert sup.wait(20) == 0, sup


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restart_mid_step_reruns_the_step_and_commits_once(
    fdsn: str, pg_server: PgTestServer, gate: Gate, mode: str
) -> None:
    """PostgreSQL restarted (or crashed: ``immediate``) while a step runs: the step's
    transaction is lost, the worker reconnects and gives the task back, the step runs again
    and its effect is committed exactly once."""
    if not pg_server.can_restart:
        pytest.skip("the server comes from DATABASE_URL: cannot restart it")
    key = gate.hold(205)
    with supervisor(fdsn) as sup:
        wait_idle(fdsn, 2)
        task = jobs_faults.blocking.enqueue({"lock": key, "block_attempts": 1})
        wait_blocked(fdsn, key)
        pg_server.restart(mode)  # the gate's lock goes too: the rerun does not block anyway
        wait_until(
            lambda: task_row(fdsn, task.id)["state"] == "succeeded",
            timeout=20,
            message=f"step rerun after the restart: {sup!r}",
        )
        assert sup.is_running(), sup
        history = attempts_of(fdsn, task.id)
        print(f"\nattempts across the {mode} restart: {history}")
        if mode == "immediate" and history == [(0, 1, "succeeded")]:
            # A crash may lose the claim itself (it commits asynchronously, by design): the
            # try is forgotten, not lost, and the step ran again as try 1.
            assert effects(fdsn, task.id) == [(task.id, 0, 1)]
        else:
            assert history[:-1] in ([(0, 1, "crashed")], [(0, 1, "interrupted")])
            assert history[-1] == (0, 2, "succeeded")
            assert effects(fdsn, task.id) == [(task.id, 0, 2)]
        sup.signal(signal.SIGTERM)
        assert sup.wait(20) == 0, sup


@pytest.mark.timeout(60)
def test_dead_workers_task_is_released_once_the_database_is_back(
    fdsn: str, pg_server: PgTestServer, gate: Gate
) -> None:
    """A worker SIGKILLed while its supervisor cannot reach the database: the supervisor
    keeps the task to give back, does so once the database is reachable again, and the
    task then runs to completion exactly once."""
    key = gate.hold(206)
    dbname = dbname_of(fdsn)
    observer = psycopg2.connect(fdsn)  # stays connected while new connections are refused
    observer.autocommit = True

    def state() -> str:
        with observer.cursor() as cur:
            cur.execute("SELECT state::text FROM underway.task WHERE id = %s", (task.id,))
            return cur.fetchone()[0]

    with supervisor(fdsn, "--lease", "3") as sup:
        wait_idle(fdsn, 2)
        task = jobs_faults.blocking.enqueue({"lock": key, "block_attempts": 1})
        [busy] = wait_blocked(fdsn, key)
        sql(pg_server.admin_dsn, f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        try:
            assert pg_server.terminate_backends(dbname, "underway supervisor %") == 1
            os.kill(busy, signal.SIGKILL)
            wait_until(
                lambda: re.search(r"cannot .*dead worker.* yet", sup.output()),
                message=f"the supervisor tried and failed to give the task back: {sup!r}",
            )
            assert state() == "running"  # nobody could give it back yet
            assert sup.is_running(), sup
        finally:
            sql(pg_server.admin_dsn, f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        wait_until(
            lambda: state() == "succeeded",
            timeout=20,
            message=f"task released and rerun: {sup!r}",
        )
        assert attempts_of(fdsn, task.id) == [(0, 1, "crashed"), (0, 2, "succeeded")]
        assert effects(fdsn, task.id) == [(task.id, 0, 2)]
        gate.release(key)
        wait_until(lambda: worker_backends(fdsn, busy) == 0, message="killed worker's session gone")
        assert effects(fdsn, task.id) == [(task.id, 0, 2)]
        sup.signal(signal.SIGTERM)
        assert sup.wait(20) == 0, sup
    observer.close()


@pytest.mark.timeout(60)
def test_supervisor_survives_postgres_crash(fdsn: str, pg_server: PgTestServer) -> None:
    """PostgreSQL crashes (immediate stop) and comes back while everyone is idle: the
    supervisor survives and reconnects at its next lease renewal, and the workers listen
    again."""
    if not pg_server.can_restart:
        pytest.skip("the server comes from DATABASE_URL: cannot restart it")
    with supervisor(fdsn, "--lease", "3") as sup:
        wait_idle(fdsn, 2)
        pg_server.restart("immediate")
        wait_until(
            lambda: (
                not sup.is_running()
                or any(
                    name.startswith("underway supervisor ")
                    for name, _, _ in underway_backends(fdsn)
                )
            ),
            timeout=15,
            message="the supervisor reconnected (or died)",
        )
        assert sup.is_running(), sup
        assert "Traceback" not in sup.output(), sup
        assert_all_listening(fdsn, 2, key=207)
        sup.signal(signal.SIGTERM)
        assert sup.wait(20) == 0, sup


class BackendSampler(threading.Thread):
    """Counts the supervisor's, workers' and scheduler's backends in pg_stat_activity, as
    often as it can, until stopped; keeps the highest count and what made it up."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.conn = psycopg2.connect(dsn, connect_timeout=10)
        self.conn.autocommit = True
        self.done = threading.Event()
        self.samples = 0
        self.peak: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.conn.cursor() as cur:
                while not self.done.is_set():
                    # pg_stat_activity is a per-transaction snapshot: one per statement here.
                    cur.execute(
                        "SELECT coalesce(array_agg(application_name ORDER BY application_name),"
                        " '{}') FROM pg_stat_activity WHERE datname = current_database()"
                        " AND application_name ~ '^underway (worker|supervisor|scheduler) '"
                    )
                    names = cur.fetchone()[0]
                    self.samples += 1
                    if len(names) > len(self.peak):
                        self.peak = names
                    time.sleep(0.002)
        except BaseException as exc:  # reported by stop()
            self.error = exc
        finally:
            self.conn.close()

    def stop(self) -> None:
        self.done.set()
        self.join(10)
        if self.error is not None:
            raise self.error


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("extra", "budget"),
    [([], 3 + 2), (["--no-scheduler"], 3 + 1)],
    ids=["with-scheduler", "no-scheduler"],
)
def test_connection_budget_holds_while_backends_are_terminated(
    fdsn: str, pg_server: PgTestServer, extra: list[str], budget: int
) -> None:
    """With 3 workers, terminating all underway backends again and again never makes them
    use more than the documented N + 2 connections (N + 1 without the scheduler), and after
    each round every idle worker listens again."""
    sampler = BackendSampler(fdsn)
    with supervisor(fdsn, "--lease", "3", *extra, workers=3) as sup:
        wait_idle(fdsn, 3)
        wait_until(lambda: len(underway_backends(fdsn)) == budget, message="all connected")
        sampler.start()
        try:
            for round_ in range(5):
                assert terminate_ours(pg_server, fdsn) == budget
                wait_until(
                    lambda: len(underway_backends(fdsn)) == budget,
                    message=f"round {round_}: everyone reconnected: {sup!r}",
                )
                slowest = assert_all_listening(fdsn, 3, key=300 + round_)
                print(f"\nround {round_}: slowest pickup {slowest * 1000:.1f} ms")
        finally:
            sampler.stop()
        assert sup.is_running(), sup
        sup.signal(signal.SIGTERM)
        assert sup.wait(20) == 0, sup
    print(f"{sampler.samples} samples, peak {len(sampler.peak)}: {sampler.peak}")
    assert sampler.samples > 100
    assert len(sampler.peak) <= budget, sampler.peak


# -- throughput ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_workers_drain_ten_thousand_noop_tasks(fdsn: str) -> None:
    """Measure (print) how long 2 burst workers take to drain 10,000 no-op tasks."""
    jobs_faults.noop.enqueue_many([{"n": i} for i in range(10_000)])
    with supervisor(fdsn, "--burst", "--log-level", "WARNING") as sup:
        started = time.monotonic()
        assert sup.wait(170) == 0, sup
        elapsed = time.monotonic() - started
    print(f"\n2 workers drained 10,000 no-op tasks in {elapsed:.2f} s ({10_000 / elapsed:.0f}/s)")
    assert states(fdsn, "faults-noop") == {"succeeded": 10_000}


@pytest.mark.timeout(60)
def test_worker_whose_lease_was_reclaimed_cannot_commit(fdsn: str, gate: Gate) -> None:
    """The supervisor dies (SIGKILL) while its worker runs a step: the lease lapses, another
    supervisor reclaims the task ('lost', counted) and runs it again; when the first worker's
    step finally finishes, its write and completion are fenced out and rolled back, so the
    effect is committed exactly once."""
    key = gate.hold(204)
    with supervisor(fdsn, "--lease", "2", workers=1) as first:
        wait_idle(fdsn, 1)
        task = jobs_faults.blocking.enqueue({"lock": key, "block_attempts": 1})
        [stale] = wait_blocked(fdsn, key)
        first.worker_pids()  # remember the children, so that leaving the block kills them
        first.signal(signal.SIGKILL)
        assert first.wait(5) == -signal.SIGKILL
        with supervisor(fdsn, "--lease", "2", workers=1) as second:
            wait_until(
                lambda: task_row(fdsn, task.id)["state"] == "succeeded",
                timeout=20,
                message=f"task reclaimed and rerun: {second!r}",
            )
            assert f"task {task.id} released: its lease expired" in second.output()
            # The stale worker's step now gets its lock and tries to commit.
            gate.release(key)
            wait_until(lambda: _gone(stale), message="stale worker noticed and stopped")
            assert "taken from this worker" in first.output()  # the stale worker's log
            second.signal(signal.SIGTERM)
            assert second.wait(20) == 0, second
    assert attempts_of(fdsn, task.id) == [(0, 1, "lost"), (0, 2, "succeeded")]
    assert task_row(fdsn, task.id)["attempts"] == 2
    assert effects(fdsn, task.id) == [(task.id, 0, 2)]
