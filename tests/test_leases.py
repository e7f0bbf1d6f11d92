"""Leases: the supervisor's renewal (the heartbeat), reclaim once a lease lapsed, and the
fence that keeps a worker which lost its task from committing anything.

Real supervisors in their own process groups, real signals (SIGKILL and SIGSTOP to whole
groups, as when a host dies or freezes), a real server. Steps that must hang wait on advisory
locks the test holds (``jobs_leases``); how long something has run is measured on the
database clock, which is also the clock leases are kept on. Effects are rows the steps write
through their own transaction, with the worker's pid: they prove which try committed, where.
"""

from __future__ import annotations

import math
import signal
from datetime import datetime
from typing import Any

import jobs_leases
import psutil
import psycopg2
import pytest
from jobs_faults import (
    Gate,
    attempts_of,
    effects,
    enqueue_fresh,
    idle_listening_workers,
    sql,
    task_row,
    worker_backends,
)

from .faults_common import wait_blocked, wait_idle
from .helpers import Supervisor, dbname_of, run_python, wait_until
from .pgtest import PgTestServer

pytestmark = pytest.mark.fault

MODULE = "jobs_leases"
LEASE_EXPIRED = "lease expired: the worker holding the task stopped renewing it"
TAKEN = "the task was taken from this worker"


def supervisor(dsn: str, *args: str, workers: int = 1) -> Supervisor:
    """A supervisor for the lease jobs (not yet started); idle workers only wake by NOTIFY."""
    return Supervisor([MODULE], dsn, ["--workers", str(workers), "--poll-interval", "30", *args])


def effects_by(dsn: str, task_id: int) -> list[tuple[int, int, int]]:
    """The committed effect rows of a task as (step, attempt, worker pid), oldest first."""
    rows = sql(
        dsn,
        "SELECT step, attempt, pid FROM faults_effect WHERE task_id = %s ORDER BY id",
        (task_id,),
    )
    return [tuple(r) for r in rows]  # type: ignore[misc]


def attempt_rows(dsn: str, task_id: int) -> list[dict[str, Any]]:
    """The task's attempt rows as dicts (outcome, error, finished_at...), oldest first."""
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT * FROM underway.attempt WHERE task_id = %s ORDER BY id", (task_id,))
            return [{d.name: v for d, v in zip(cur.description, row)} for row in cur.fetchall()]
    finally:
        conn.close()


def gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def frozen(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:
        return False


def kill_host(sup: Supervisor) -> None:
    """SIGKILL the supervisor's whole process group at once, as when its host dies."""
    sup.worker_pids()  # remember the children, so that leaving the block reaps them too
    sup.kill_group()
    assert sup.wait(5) == -signal.SIGKILL, sup


class Watch:
    """Looks at one task's running try, on a connection of the test's own and by the database
    clock; at every look the try must still be the first, running, with its lease ahead."""

    def __init__(self, dsn: str, task_id: int) -> None:
        self.task_id = task_id
        self.conn = psycopg2.connect(dsn, connect_timeout=10)
        self.conn.autocommit = True
        self.expiries: set[datetime] = set()
        self.looks = 0
        self.least_left = math.inf  # the shortest time left on the lease at any look

    def now(self) -> datetime:
        """The database's clock."""
        with self.conn.cursor() as cur:
            cur.execute("SELECT clock_timestamp()")
            return cur.fetchone()[0]

    def look(self, since: datetime | None = None) -> float:
        """Check the try; return for how long it has run (or since ``since``), in seconds."""
        with self.conn.cursor() as cur:
            cur.execute(
                "SELECT state::text, attempts, lease_expires_at,"
                " extract(epoch FROM lease_expires_at - clock_timestamp())::float8,"
                " extract(epoch FROM clock_timestamp() - coalesce(%s, started_at))::float8"
                " FROM underway.task WHERE id = %s",
                (since, self.task_id),
            )
            state, attempts, expires, left, elapsed = cur.fetchone()
        self.looks += 1
        assert (state, attempts) == ("running", 1), (
            f"task {self.task_id} is {state} with {attempts} tries after {elapsed:.2f}s"
        )
        assert left is not None and left > 0, (
            f"the lease of task {self.task_id} lapsed {-(left or 0):.3f}s ago, after "
            f"{elapsed:.2f}s, while its supervisor was alive"
        )
        self.expiries.add(expires)
        self.least_left = min(self.least_left, left)
        return elapsed

    def hold(self, seconds: float, since: datetime | None = None) -> None:
        """Keep looking until the try has run for more than ``seconds`` (or that long since
        ``since``)."""
        wait_until(
            lambda: self.look(since) > seconds,
            timeout=seconds + 15,
            interval=0.02,
            message=f"task {self.task_id} running for {seconds}s",
        )

    def close(self) -> None:
        self.conn.close()


# -- a host dies --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_whole_host_dies_and_another_supervisor_finishes_its_tasks(fdsn: str, gate: Gate) -> None:
    """SIGKILL to a supervisor's whole process group (supervisor and both workers, mid-step,
    as if the host died): nobody renews the two leases, and a second supervisor releases both
    tasks once -- and only once -- they lapsed ('lost', logged as expired) and runs them again.
    Each effect commits exactly once, from the second supervisor's worker.

    What becomes of the dead processes' sessions is asserted as observed: the idle ones
    (supervisor, scheduler) end as soon as their socket closes; the workers' backends,
    waiting on a lock, only notice their client is gone when they next talk to it, so they
    linger until the gate opens -- yet they hold nothing the reclaim or the rerun needs, and
    then die without committing."""
    key = gate.hold(501)
    with supervisor(fdsn, "--lease", "2", workers=2) as host:
        wait_idle(fdsn, 2)
        ids = enqueue_fresh(fdsn, jobs_leases.gated, [{"locks": {"1": key}}] * 2)
        dead = wait_blocked(fdsn, key, count=2)
        kill_host(host)
        wait_until(lambda: all(gone(pid) for pid in dead), message="the workers died too")
        # Nobody renews them now: these are the instants the leases lapse.
        lapse = {i: task_row(fdsn, i)["lease_expires_at"] for i in ids}
        with supervisor(fdsn, "--lease", "2", workers=2) as rescuer:
            wait_until(
                lambda: all(task_row(fdsn, i)["state"] == "succeeded" for i in ids),
                timeout=20,
                message=f"both tasks reclaimed and finished: {rescuer!r}",
            )
            rescuers = set(rescuer.worker_pids())
            for i in ids:
                assert f"task {i} released: its lease expired" in rescuer.output(), rescuer
                assert attempts_of(fdsn, i) == [(0, 1, "lost"), (0, 2, "succeeded")]
                lost = attempt_rows(fdsn, i)[0]
                assert lost["error"] == LEASE_EXPIRED
                assert lost["finished_at"] > lapse[i], "released before its lease lapsed"
                row = task_row(fdsn, i)
                assert (row["attempts"], row["claim_token"], row["lease_expires_at"]) == (
                    2,
                    None,
                    None,
                )
                [(step, attempt, pid)] = effects_by(fdsn, i)
                assert (step, attempt) == (0, 2) and pid in rescuers
            print(f"\nreclaimed after lapse: {[str(lapse[i]) for i in ids]}")

            # The dead host's idle sessions are gone at once...
            wait_until(
                lambda: (
                    not sql(
                        fdsn,
                        "SELECT 1 FROM pg_stat_activity WHERE application_name IN (%s, %s)",
                        (f"underway supervisor {host.pid}", f"underway scheduler {host.pid}"),
                    )
                ),
                timeout=5,
                message="the dead supervisor's and scheduler's sessions ended",
            )
            # ...but a backend blocked on a lock notices its client is gone only when it next
            # talks to it (unless client_connection_check_interval is set, PostgreSQL 14+).
            check = sql(
                fdsn,
                "SELECT setting FROM pg_settings WHERE name = 'client_connection_check_interval'",
            )
            lingering = [pid for pid in dead if worker_backends(fdsn, pid)]
            print(f"dead workers' backends still there after the rerun: {lingering} ({check})")
            if check in ([], [("0",)]):
                assert lingering == dead
            gate.release(key)
            wait_until(
                lambda: all(worker_backends(fdsn, pid) == 0 for pid in dead),
                timeout=10,
                message="the dead workers' backends ended once they got the lock",
            )
            for i in ids:
                assert effects(fdsn, i) == [(i, 0, 2)]
            rescuer.signal(signal.SIGTERM)
            assert rescuer.wait(20) == 0, rescuer


@pytest.mark.timeout(60)
def test_any_supervisor_reclaims_and_a_lapsed_last_try_fails(fdsn: str, gate: Gate) -> None:
    """A host dies holding two tasks; the supervisor that reclaims them runs other jobs only
    (any supervisor on the database gives lapsed tasks back, whatever it runs). The task on
    its last try (max_attempts=1) is failed for good -- 'lost', finished, the error saying
    the lease expired -- and never runs again, not even on a supervisor that knows its job;
    the other goes back to the queue with its try counted, and such a supervisor finishes
    it."""
    key = gate.hold(502)
    with supervisor(fdsn, "--lease", "1", workers=2) as host:
        wait_idle(fdsn, 2)
        last = jobs_leases.last_try.enqueue({"locks": {"1": key}}).id
        again = jobs_leases.gated.enqueue({"locks": {"1": key}}).id
        dead = wait_blocked(fdsn, key, count=2)
        kill_host(host)
        bystander = Supervisor(
            ["jobs_enqueue"], fdsn, ["--workers", "1", "--poll-interval", "30", "--lease", "1"]
        )
        with bystander:
            wait_until(
                lambda: all(task_row(fdsn, i)["state"] != "running" for i in (last, again)),
                timeout=15,
                message=f"tasks reclaimed: {bystander!r}",
            )
            for i in (last, again):
                assert f"task {i} released: its lease expired" in bystander.output(), bystander
                assert attempts_of(fdsn, i) == [(0, 1, "lost")]
                assert [r["error"] for r in attempt_rows(fdsn, i)] == [LEASE_EXPIRED]
            row = task_row(fdsn, last)
            assert (row["state"], row["attempts"], row["claim_token"]) == ("failed", 1, None)
            assert (row["lease_expires_at"], row["error"]) == (None, LEASE_EXPIRED)
            assert row["finished_at"] is not None
            row = task_row(fdsn, again)
            assert (row["state"], row["attempts"], row["claim_token"]) == ("pending", 1, None)
            assert (row["lease_expires_at"], row["error"]) == (None, LEASE_EXPIRED)
            bystander.signal(signal.SIGTERM)
            assert bystander.wait(20) == 0, bystander
        with supervisor(fdsn, "--lease", "1") as runner:
            wait_until(
                lambda: task_row(fdsn, again)["state"] == "succeeded",
                message=f"the released task finished: {runner!r}",
            )
            wait_idle(fdsn, 1)  # and nothing else to do
            assert attempts_of(fdsn, again) == [(0, 1, "lost"), (0, 2, "succeeded")]
            [(step, attempt, pid)] = effects_by(fdsn, again)
            assert (step, attempt) == (0, 2) and pid in runner.worker_pids()
            assert task_row(fdsn, last)["state"] == "failed"
            assert f"task_id={last} " not in runner.output(), runner
            gate.release(key)
            wait_until(
                lambda: all(worker_backends(fdsn, pid) == 0 for pid in dead),
                message="the dead workers' sessions ended",
            )
            assert effects(fdsn, last) == []
            assert effects(fdsn, again) == [(again, 0, 2)]
            runner.signal(signal.SIGTERM)
            assert runner.wait(20) == 0, runner


# -- the heartbeat ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("others", [0, 1], ids=["alone", "beside-another-supervisor"])
def test_heartbeat_keeps_a_step_five_leases_long(fdsn: str, gate: Gate, others: int) -> None:
    """With ``--lease 1`` a step that runs for more than five leases is never reclaimed, by
    its own supervisor nor by another one watching the same queue: at every look its lease
    lies more than a third of a lease ahead (it is renewed every third, whatever the step
    does), and the step runs exactly once -- one try, 'succeeded', one effect."""
    key = gate.hold(510)
    with supervisor(fdsn, "--lease", "1") as sup:
        wait_idle(fdsn, 1)
        task = jobs_leases.gated.enqueue({"locks": {"1": key}})
        [busy] = wait_blocked(fdsn, key)
        others_ = [supervisor(fdsn, "--lease", "1").start() for _ in range(others)]
        watch = Watch(fdsn, task.id)
        try:
            wait_idle(fdsn, others)
            watch.hold(5.0)
            gate.release(key)
            wait_until(lambda: task_row(fdsn, task.id)["state"] == "succeeded", message=f"{sup!r}")
            for other in others_:
                assert "released" not in other.output() and "task_id=" not in other.output()
                other.signal(signal.SIGTERM)
                assert other.wait(20) == 0, other
        finally:
            watch.close()
            for other in others_:
                other.close()
        print(
            f"\n{len(watch.expiries)} lease expiry times seen in {watch.looks} looks;"
            f" never less than {watch.least_left:.3f}s left"
        )
        assert len(watch.expiries) >= 5  # renewed, not merely long enough
        # Renewed every third of the lease, so it never runs low: one more renewal could fail.
        assert watch.least_left > 1 / 3
        assert attempts_of(fdsn, task.id) == [(0, 1, "succeeded")]
        assert task_row(fdsn, task.id)["attempts"] == 1
        assert effects_by(fdsn, task.id) == [(0, 1, busy)]
        assert "lost" not in sup.output() and "released" not in sup.output(), sup
        sup.signal(signal.SIGTERM)
        assert sup.wait(20) == 0, sup


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_leases_are_renewed_through_the_grace_period(fdsn: str, gate: Gate) -> None:
    """A graceful stop does not stop the heartbeat: a step still running three leases into
    the grace period keeps its lease (another supervisor is watching), finishes on its own
    worker exactly once, and the supervisor then exits 0."""
    key = gate.hold(511)
    with supervisor(fdsn, "--lease", "1", "--grace", "30") as sup:
        wait_idle(fdsn, 1)
        task = jobs_leases.gated.enqueue({"locks": {"1": key}})
        [busy] = wait_blocked(fdsn, key)
        with supervisor(fdsn, "--lease", "1") as other:
            watch = Watch(fdsn, task.id)
            try:
                wait_idle(fdsn, 1)
                stopped_at = watch.now()
                sup.signal(signal.SIGTERM)
                watch.hold(3.0, since=stopped_at)
            finally:
                watch.close()
            assert sup.is_running(), sup  # still in its grace period
            gate.release(key)
            assert sup.wait(20) == 0, sup
            assert "released" not in other.output(), other
            other.signal(signal.SIGTERM)
            assert other.wait(20) == 0, other
    assert attempts_of(fdsn, task.id) == [(0, 1, "succeeded")]
    assert effects_by(fdsn, task.id) == [(0, 1, busy)]


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_renewal_resumes_after_the_supervisor_loses_its_connection(
    fdsn: str, gate: Gate, pg_server: PgTestServer
) -> None:
    """The supervisor's own connection is terminated three times while its worker's step
    runs (the worker's connection is untouched): each time it reconnects at its next renewal,
    before the lease lapses, so the watching second supervisor never takes the task and the
    step runs exactly once."""
    key = gate.hold(512)
    dbname = dbname_of(fdsn)
    with supervisor(fdsn, "--lease", "2") as sup:
        wait_idle(fdsn, 1)
        task = jobs_leases.gated.enqueue({"locks": {"1": key}})
        [busy] = wait_blocked(fdsn, key)
        name = f"underway supervisor {sup.pid}"
        with supervisor(fdsn, "--lease", "2") as other:
            watch = Watch(fdsn, task.id)
            try:
                wait_idle(fdsn, 1)
                first = watch.now()
                for round_ in range(3):
                    wait_until(
                        lambda: watch.look() and pg_server.backend_count(dbname, name) == 1,
                        timeout=10,
                        message=f"round {round_}: the supervisor connected: {sup!r}",
                    )
                    assert pg_server.terminate_backends(dbname, name) == 1
                watch.hold(6.0, since=first)  # three leases since the first loss
            finally:
                watch.close()
            gate.release(key)
            wait_until(lambda: task_row(fdsn, task.id)["state"] == "succeeded", message=f"{sup!r}")
            assert "released" not in other.output(), other
            other.signal(signal.SIGTERM)
            assert other.wait(20) == 0, other
        # Reconnected after the third loss too. (Not every loss is logged: one found while
        # idle, by the socket's end, is simply reconnected at the next renewal.)
        wait_until(
            lambda: pg_server.backend_count(dbname, name) == 1,
            timeout=10,
            message=f"the supervisor connected again: {sup!r}",
        )
        assert attempts_of(fdsn, task.id) == [(0, 1, "succeeded")]
        assert effects_by(fdsn, task.id) == [(0, 1, busy)]
        sup.signal(signal.SIGTERM)
        assert sup.wait(20) == 0, sup


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_postgres_restart_with_short_leases(fdsn: str, gate: Gate, pg_server: PgTestServer) -> None:
    """PostgreSQL restarted under two supervisors with ``--lease 1`` while a step runs.

    What the design promises here: the step's transaction dies with its session, so the step
    runs once more -- given back by its worker or, if the outage outlasted the lease,
    reclaimed, but never both -- and its effect commits exactly once, in two tries. Renewal
    is not lost with the connections: afterwards a step running three leases long keeps its
    lease and runs once."""
    if not pg_server.can_restart:
        pytest.skip("the server comes from DATABASE_URL: cannot restart it")
    key = gate.hold(513)
    with supervisor(fdsn, "--lease", "1") as sup:
        wait_idle(fdsn, 1)
        task = jobs_leases.gated.enqueue({"locks": {"1": key}})
        wait_blocked(fdsn, key)
        with supervisor(fdsn, "--lease", "1") as other:
            wait_idle(fdsn, 1)
            pg_server.restart("fast")  # the gate's lock goes too; the rerun does not wait
            wait_until(
                lambda: task_row(fdsn, task.id)["state"] == "succeeded",
                timeout=30,
                message=f"step rerun after the restart: {sup!r} {other!r}",
            )
            history = attempts_of(fdsn, task.id)
            print(f"\nattempts across the restart: {history}")
            assert len(history) == 2 and history[0][:2] == (0, 1), history
            assert history[0][2] in ("crashed", "lost"), history
            assert history[1] == (0, 2, "succeeded")
            assert effects(fdsn, task.id) == [(task.id, 0, 2)]

            after = Gate(fdsn)
            try:
                key2 = after.hold(514)
                wait_idle(fdsn, 2)
                [second] = enqueue_fresh(fdsn, jobs_leases.gated, [{"locks": {"1": key2}}])
                [busy] = wait_blocked(fdsn, key2)
                watch = Watch(fdsn, second)
                try:
                    watch.hold(3.0)
                finally:
                    watch.close()
                after.release(key2)
            finally:
                after.close()
            wait_until(lambda: task_row(fdsn, second)["state"] == "succeeded")
            assert attempts_of(fdsn, second) == [(0, 1, "succeeded")]
            assert effects_by(fdsn, second) == [(0, 1, busy)]
            for s in (sup, other):
                assert s.is_running(), s
                s.signal(signal.SIGTERM)
                assert s.wait(20) == 0, s


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_locked_task_row_does_not_stall_the_heartbeat_of_the_others(
    fdsn: str, gate: Gate
) -> None:
    """A transaction of someone else's holds the row of one running task for three leases.
    The supervisor's other task must keep its lease all along (another supervisor is
    watching), and run exactly once; the locked task, whatever becomes of its lease, commits
    its effect exactly once."""
    held, other_key = gate.hold(515), gate.hold(516)
    with supervisor(fdsn, "--lease", "1", workers=2) as sup:
        wait_idle(fdsn, 2)
        locked = jobs_leases.gated.enqueue({"locks": {"1": held}}).id
        wait_blocked(fdsn, held)
        task = jobs_leases.gated.enqueue({"locks": {"1": other_key}}).id
        [busy] = wait_blocked(fdsn, other_key)
        with supervisor(fdsn, "--lease", "1") as other:
            wait_idle(fdsn, 1)
            locker = psycopg2.connect(fdsn, connect_timeout=10)
            watch = Watch(fdsn, task)
            try:
                with locker.cursor() as cur:
                    cur.execute("SELECT 1 FROM underway.task WHERE id = %s FOR UPDATE", (locked,))
                watch.hold(3.0, since=watch.now())
            finally:
                watch.close()
                locker.close()  # rolls back: the row is free again
            gate.release(other_key)
            gate.release(held)
            wait_until(
                lambda: all(task_row(fdsn, i)["state"] == "succeeded" for i in (task, locked)),
                message=f"both finished: {sup!r} {other!r}",
            )
            assert attempts_of(fdsn, task) == [(0, 1, "succeeded")]
            assert effects_by(fdsn, task) == [(0, 1, busy)]
            assert len(effects(fdsn, locked)) == 1
            other.signal(signal.SIGTERM)
            assert other.wait(20) == 0, other
        sup.signal(signal.SIGTERM)
        assert sup.wait(20) == 0, sup


# -- fencing --------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_frozen_supervisor_loses_its_tasks_and_cannot_commit(fdsn: str, gate: Gate) -> None:
    """SIGSTOP freezes supervisor A's whole group while its three workers are mid-step, each
    with its effect written in its open transaction. Supervisor B reclaims the tasks once
    their leases lapse and reruns them, and its tries wait too. A is thawed and its steps go
    on to record their outcome -- done, next step, failure -- while B holds the tasks: every
    one is fenced off by the claim token, nothing A wrote commits, and A's workers log that
    the task was taken from them. B then finishes each task, so the only effects are B's.
    A carries on: the same workers run a fresh task, and A stops cleanly on SIGTERM."""
    modes = ["done", "next", "fail"]
    a_keys = {m: gate.hold(520 + n) for n, m in enumerate(modes)}
    b_keys = {m: gate.hold(530 + n) for n, m in enumerate(modes)}
    with supervisor(fdsn, "--lease", "2", workers=3) as a:
        wait_idle(fdsn, 3)
        ids = {
            m: enqueue_fresh(
                fdsn, jobs_leases.gated, [{"then": m, "locks": {"1": a_keys[m], "2": b_keys[m]}}]
            )[0]
            for m in modes
        }
        a_workers = {m: wait_blocked(fdsn, a_keys[m])[0] for m in modes}
        a.worker_pids()
        a.signal_group(signal.SIGSTOP)
        try:
            wait_until(
                lambda: all(frozen(pid) for pid in [a.pid, *a.worker_pids()]),
                message="A's whole group frozen",
            )
            with supervisor(fdsn, "--lease", "2", workers=3) as b:
                b_workers = {m: wait_blocked(fdsn, b_keys[m], timeout=20)[0] for m in modes}
                tokens = {}
                for m in modes:
                    assert f"task {ids[m]} released: its lease expired" in b.output(), b
                    row = task_row(fdsn, ids[m])
                    assert (row["state"], row["attempts"]) == ("running", 2)
                    tokens[m] = row["claim_token"]
                    assert attempts_of(fdsn, ids[m]) == [(0, 1, "lost")]

                a.signal_group(signal.SIGCONT)
                for m in modes:
                    gate.release(a_keys[m])
                for m in modes:
                    line = f"task lost: job=leases-gated task_id={ids[m]} "
                    a.wait_for_output(line)
                    [logged] = [x for x in a.output().splitlines() if line in x]
                    assert TAKEN in logged, logged
                    if m == "fail":
                        assert "the step failed" in logged, logged
                # A recorded nothing: B still holds each task, as B left it.
                for m in modes:
                    row = task_row(fdsn, ids[m])
                    assert (row["state"], row["attempts"], row["claim_token"]) == (
                        "running",
                        2,
                        tokens[m],
                    ), m
                    assert attempts_of(fdsn, ids[m]) == [(0, 1, "lost")], m
                    assert effects_by(fdsn, ids[m]) == [], m

                for m in modes:
                    gate.release(b_keys[m])
                wait_until(
                    lambda: all(task_row(fdsn, i)["state"] == "succeeded" for i in ids.values()),
                    message=f"B finished the tasks: {b!r}",
                )
                b.signal(signal.SIGTERM)
                assert b.wait(20) == 0, b
        finally:
            a.signal_group(signal.SIGCONT)

        for m in modes:
            done = effects_by(fdsn, ids[m])
            assert done[0] == (0, 2, b_workers[m]), (m, done)
            if m == "next":
                assert len(done) == 2 and done[1][:2] == (1, 1), done
                assert attempts_of(fdsn, ids[m]) == [
                    (0, 1, "lost"),
                    (0, 2, "succeeded"),
                    (1, 1, "succeeded"),
                ]
            else:
                assert len(done) == 1, (m, done)
                assert attempts_of(fdsn, ids[m]) == [(0, 1, "lost"), (0, 2, "succeeded")]

        # A carries on with the same workers.
        assert set(a_workers.values()) <= set(a.worker_pids()), a
        [fresh] = enqueue_fresh(fdsn, jobs_leases.gated, [{}])
        wait_until(lambda: task_row(fdsn, fresh)["state"] == "succeeded", message=f"{a!r}")
        [(_, _, pid)] = effects_by(fdsn, fresh)
        assert pid in a_workers.values()
        assert "Traceback" not in a.output() and "restarting" not in a.output(), a
        a.signal(signal.SIGTERM)
        assert a.wait(20) == 0, a


# -- the --lease option ---------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "value",
    [
        "abc",
        "0",
        "-1",
        "nan",
        "inf",
        "1e20",
        "0.1",
    ],
)
def test_bad_lease_is_refused_at_start(dsn: str, value: str) -> None:
    """``--lease`` must be a positive, finite number of seconds that PostgreSQL can add to a
    time: anything else is refused before anything starts, with exit status 2 and a message
    naming the option (as ``--workers 0`` is). Run with ``--burst`` on an empty queue, so that
    a supervisor which wrongly accepts the value soon exits on its own instead of running on."""
    result = run_python(
        [
            "-m",
            "underway.supervisor",
            MODULE,
            "--dsn",
            dsn,
            "--burst",
            "--workers",
            "1",
            "--lease",
            value,
        ],
        timeout=10,
    )
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "--lease" in result.stderr, result.stderr
    assert "starting" not in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.timeout(60)
def test_lease_shorter_than_renewal_is_refused_or_kept(fdsn: str, gate: Gate) -> None:
    """``--lease 0.1`` is shorter than the supervisor's shortest renewal interval (0.2 s). It
    must either be refused at start (exit 2, naming ``--lease``) or be kept: the lease of a
    live supervisor's step must never lapse, or any other supervisor would take the task."""
    key = gate.hold(540)
    with supervisor(fdsn, "--lease", "0.1") as sup:
        wait_until(
            lambda: not sup.is_running() or len(idle_listening_workers(fdsn)) == 1,
            message=f"supervisor refused the lease or is up: {sup!r}",
        )
        if not sup.is_running():
            assert sup.wait() == 2 and "--lease" in sup.output(), sup
            return
        task = jobs_leases.gated.enqueue({"locks": {"1": key}})
        [busy] = wait_blocked(fdsn, key)
        watch = Watch(fdsn, task.id)
        try:
            watch.hold(1.5)
        finally:
            watch.close()
            gate.release(key)
        wait_until(lambda: task_row(fdsn, task.id)["state"] == "succeeded", message=f"{sup!r}")
        assert attempts_of(fdsn, task.id) == [(0, 1, "succeeded")]
        assert effects_by(fdsn, task.id) == [(0, 1, busy)]
        sup.signal(signal.SIGTERM)
        assert sup.wait(20) == 0, sup
