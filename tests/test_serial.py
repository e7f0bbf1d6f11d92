"""Serial queues: tasks sharing a ``serial_queue`` (of any job) run one at a time, in order.

Real supervisors with several workers (and, for the sharpest race, four in-process workers in
threads claiming as fast as they can) run the jobs of ``tests/jobs_serial.py``. Each step
records its run in ``serial_run`` in its own transaction, with the moment it started and
ended and whether another step of its queue held the queue's detector lock at the same time
(see the jobs module): that lock is held until the step's outcome commits, so it catches a
second task claimed before the first one was done, however short the steps are.

What ``claim_task`` does with a serial task waiting to retry (documented by a test below): it
does not hold its queue. Only a *running* task, or an earlier *ready* one, holds back a serial
task; a task whose retry (or delay) lies in the future lets later tasks of its queue overtake
it, and runs when due, in the order of its new run time.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta

import jobs_serial as js
import psycopg2
import pytest
from jobs_faults import Gate, idle_listening_workers, lock_waiters

from underway.worker import Worker

from .helpers import Supervisor, query, scalar, wait_until

SLOW = 0.1
"""Seconds a step sleeps where a test wants steps long enough to overlap if they could."""


@pytest.fixture
def sdsn(dsn: str) -> str:
    """The test database, with the table the steps record their runs in."""
    js.prepare(dsn)
    return dsn


@contextlib.contextmanager
def supervisor(dsn: str, workers: int) -> Iterator[Supervisor]:
    """A supervisor for the serial jobs, its idle workers woken only through LISTEN. A block
    that completes ends with a graceful stop, which must succeed."""
    with Supervisor(
        ["jobs_serial"],
        dsn,
        ["--workers", str(workers), "--poll-interval", "30", "--no-scheduler"],
    ) as sup:
        yield sup
        sup.signal(signal.SIGTERM)
        assert sup.wait(15) == 0, repr(sup)


def runs(dsn: str) -> list[dict]:
    """Every committed run, in the order the steps started."""
    rows = query(
        dsn,
        "SELECT task_id, job, step, queue, seq, attempt, pid, overlap, peak, started, finished"
        " FROM serial_run ORDER BY started, id",
    )
    keys = [
        "task",
        "job",
        "step",
        "queue",
        "seq",
        "attempt",
        "pid",
        "overlap",
        "peak",
        "started",
        "end",
    ]
    return [dict(zip(keys, row)) for row in rows]


def by_queue(rows: list[dict]) -> dict[str | None, list[dict]]:
    """Runs grouped by serial queue, each group in start order."""
    grouped: dict[str | None, list[dict]] = defaultdict(list)
    for row in rows:
        grouped[row["queue"]].append(row)
    return grouped


def assert_one_at_a_time_in_order(queue_runs: list[dict], expected_seqs: list[int]) -> None:
    """The runs of one serial queue: none overlapped another (by the detector lock or by the
    clock), and they ran in the expected order."""
    assert [r["seq"] for r in queue_runs] == expected_seqs
    assert not any(r["overlap"] for r in queue_runs), [r for r in queue_runs if r["overlap"]]
    for before, after in zip(queue_runs, queue_runs[1:]):
        assert before["end"] <= after["started"], (before, after)


def overlapping(a: list[dict], b: list[dict]) -> bool:
    """Whether some run in ``a`` overlapped some run in ``b`` in time."""
    return any(x["started"] < y["end"] and y["started"] < x["end"] for x in a for y in b)


def states(dsn: str) -> dict[str, int]:
    """How many tasks are in each state."""
    return dict(query(dsn, "SELECT state::text, count(*) FROM underway.task GROUP BY 1"))


def all_done(dsn: str, count: int) -> bool:
    """Whether ``count`` tasks have succeeded and none is left to run."""
    return states(dsn) == {"succeeded": count}


def claimed_at(dsn: str, task_id: int, attempt: int = 1):
    """When a try of a task was claimed (its attempt's started_at)."""
    return scalar(
        dsn,
        "SELECT started_at FROM underway.attempt WHERE task_id = %s AND attempt = %s",
        (task_id, attempt),
    )


def enqueue_alternating(queue: str, seqs: range, **extra) -> list[int]:
    """Enqueue one task per seq into serial queue ``queue``, alternating the two jobs, each in
    its own transaction (so run_at grows with seq); returns the task ids."""
    ids = []
    for seq in seqs:
        job = (js.serial_a, js.serial_b)[seq % 2]
        ids.append(job.enqueue({"queue": queue, "seq": seq, **extra}, serial_queue=queue).id)
    return ids


# -- one at a time, in order, while the rest flows ---------------------------------------------


@pytest.mark.timeout(60)
def test_serial_queue_shared_by_two_jobs_runs_one_at_a_time_in_enqueue_order(sdsn: str) -> None:
    """Ten tasks of serial queue s1 (alternating two jobs), six of s2 and twelve without a
    serial queue are enqueued before three workers start, so the workers race for them from
    the first claim. Each serial queue runs strictly one task at a time, in enqueue order
    (same priority), each exactly once; meanwhile its neighbours run in parallel with it:
    plain tasks and the other serial queue overlap s1 in time."""
    enqueue_alternating("s1", range(10), sleep=SLOW)
    enqueue_alternating("s2", range(6), sleep=SLOW)
    js.plain.enqueue_many([{"seq": i, "sleep": SLOW} for i in range(12)])
    with supervisor(sdsn, 3) as sup:
        wait_until(lambda: all_done(sdsn, 28), timeout=20, message=f"all done: {sup!r}")
    done = runs(sdsn)
    assert len(done) == len({r["task"] for r in done}) == 28
    grouped = by_queue(done)
    assert_one_at_a_time_in_order(grouped["s1"], list(range(10)))
    assert_one_at_a_time_in_order(grouped["s2"], list(range(6)))
    assert {r["job"] for r in grouped["s1"]} == {"serial-a", "serial-b"}
    assert overlapping(grouped["s1"], grouped[None]), "plain tasks never ran beside s1"
    assert overlapping(grouped["s1"], grouped["s2"]), "s2 never ran beside s1"
    # The database agrees: no try of s1 was claimed before the step before it had ended.
    for before, after in zip(grouped["s1"], grouped["s1"][1:]):
        assert claimed_at(sdsn, after["task"]) >= before["end"]


@pytest.mark.timeout(60)
def test_busy_serial_task_holds_back_only_its_own_queue(sdsn: str) -> None:
    """While the first task of serial queue s is stuck (waiting for a lock the test holds),
    the second task of s is not claimed, even by an idle worker; the other worker runs every
    other task (plain ones, and serial queue t) and goes idle. Once the first task finishes,
    the second one runs at once, after it."""
    gate = Gate(sdsn)
    key = gate.hold(9191)
    try:
        first = js.serial_a.enqueue({"queue": "s", "seq": 0, "lock": key}, serial_queue="s")
        second = js.serial_b.enqueue({"queue": "s", "seq": 1}, serial_queue="s")
        others = [t.id for t in js.plain.enqueue_many([{"seq": i} for i in range(8)])]
        others += enqueue_alternating("t", range(3))
        with supervisor(sdsn, 2) as sup:
            wait_until(lambda: lock_waiters(sdsn, key), timeout=10, message=repr(sup))
            wait_until(
                lambda: states(sdsn) == {"running": 1, "pending": 1, "succeeded": 11},
                timeout=10,
                message=f"all but s done: {sup!r}",
            )
            wait_until(lambda: len(idle_listening_workers(sdsn)) == 1, timeout=10)
            assert query(
                sdsn, "SELECT state::text, attempts FROM underway.task WHERE id = %s", (second.id,)
            ) == [("pending", 0)]

            gate.release(key)
            wait_until(lambda: all_done(sdsn, 13), timeout=10, message=f"s done: {sup!r}")
        s_runs = by_queue(runs(sdsn))["s"]
        assert_one_at_a_time_in_order(s_runs, [0, 1])
        assert [r["task"] for r in s_runs] == [first.id, second.id]
        waited = (claimed_at(sdsn, second.id) - s_runs[0]["end"]).total_seconds()
        assert 0 <= waited < 2, waited
    finally:
        gate.close()


@pytest.mark.timeout(60)
def test_finished_serial_task_wakes_idle_workers_for_the_next_in_its_queue(sdsn: str) -> None:
    """The next task of a serial queue became claimable when the one before it finished; an
    idle worker (polling only every 30 s, and not counting on a due time for a task that was
    due long ago) must be woken for it. Here the first task runs on a worker that knows only
    its job (in a thread of this process), so the supervisor's idle workers must take the
    second: they do within a couple of seconds of the first one's end."""
    gate = Gate(sdsn)
    key = gate.hold(9292)
    inproc = Worker(sdsn, {js.serial_a.name: js.serial_a})
    ran: list[bool] = []
    thread = threading.Thread(target=lambda: ran.append(inproc.run_once()), daemon=True)
    try:
        first = js.serial_a.enqueue({"queue": "n", "seq": 0, "lock": key}, serial_queue="n")
        second = js.serial_b.enqueue({"queue": "n", "seq": 1}, serial_queue="n")
        thread.start()
        wait_until(lambda: lock_waiters(sdsn, key), timeout=10, message="first task started")
        with supervisor(sdsn, 2) as sup:
            wait_until(lambda: len(idle_listening_workers(sdsn)) == 2, timeout=15)
            assert states(sdsn) == {"running": 1, "pending": 1}
            gate.release(key)
            thread.join(timeout=10)
            assert ran == [True]
            wait_until(lambda: all_done(sdsn, 2), timeout=10, message=f"second ran: {sup!r}")
        s_runs = by_queue(runs(sdsn))["n"]
        assert [r["task"] for r in s_runs] == [first.id, second.id]
        assert s_runs[1]["pid"] != s_runs[0]["pid"]
        waited = (claimed_at(sdsn, second.id) - s_runs[0]["end"]).total_seconds()
        assert 0 <= waited < 2, waited
    finally:
        gate.close()
        thread.join(timeout=10)
        inproc.disconnect()


@pytest.mark.timeout(60)
def test_serial_task_waiting_to_retry_or_delayed_does_not_block_its_queue(sdsn: str) -> None:
    """What the code does (by design of claim_task): a serial task whose run time lies in the
    future (delayed at enqueue, or failed and waiting 30 s for its retry) does not hold its
    queue. The tasks behind it run meanwhile, still one at a time; the retry runs when it is
    due (made due here), and the delayed task keeps waiting for its own time."""
    delayed = js.serial_a.enqueue({"queue": "s", "seq": 0}, serial_queue="s", delay=3600)
    failing = js.serial_b.enqueue({"queue": "s", "seq": 1, "fail_tries": 1}, serial_queue="s").id
    rest = enqueue_alternating("s", range(2, 4))
    with supervisor(sdsn, 2) as sup:
        wait_until(
            lambda: [r["seq"] for r in runs(sdsn)] == [2, 3],
            timeout=10,
            message=f"the tasks behind the retry ran: {sup!r}",
        )
        (row,) = query(
            sdsn,
            "SELECT state::text, attempts, run_at > now() + interval '20 s' FROM underway.task"
            " WHERE id = %s",
            (failing,),
        )
        assert row == ("pending", 1, True)
        assert claimed_at(sdsn, rest[0]) > claimed_at(sdsn, failing)

        query(
            sdsn,
            "UPDATE underway.task SET run_at = now() WHERE id = %s;"
            " SELECT pg_notify('underway', '')",
            (failing,),
        )
        wait_until(
            lambda: [r["seq"] for r in runs(sdsn)] == [2, 3, 1],
            timeout=10,
            message=f"the retry ran: {sup!r}",
        )
    assert_one_at_a_time_in_order(by_queue(runs(sdsn))["s"], [2, 3, 1])
    assert query(
        sdsn,
        "SELECT id, state::text, attempts FROM underway.task WHERE id IN (%s, %s) ORDER BY id",
        (delayed.id, failing),
    ) == [(delayed.id, "pending", 0), (failing, "succeeded", 2)]


# -- volume and races ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_two_hundred_tasks_over_five_serial_queues_with_two_workers(sdsn: str) -> None:
    """200 tasks over 5 serial queues (40 each, the two jobs alternating) drain through 2
    workers: every task runs exactly once with one successful try, and each queue runs
    strictly one task at a time, in order. The tasks are enqueued queue after queue in one
    transaction, so in plain dequeue order (priority, run_at, id) both workers would go for
    the same queue: only the serial rule sends the second worker to another one."""
    queues = [f"q{i}" for i in range(5)]
    conn = psycopg2.connect(sdsn)
    try:
        with conn:
            for queue in queues:
                for seq in range(40):
                    job = (js.serial_a, js.serial_b)[seq % 2]
                    job.enqueue({"queue": queue, "seq": seq}, serial_queue=queue, conn=conn)
    finally:
        conn.close()
    with supervisor(sdsn, 2) as sup:
        wait_until(lambda: all_done(sdsn, 200), timeout=60, message=f"all done: {sup!r}")
    done = runs(sdsn)
    assert len(done) == len({r["task"] for r in done}) == 200
    grouped = by_queue(done)
    assert sorted(grouped) == queues
    for queue in queues:
        assert_one_at_a_time_in_order(grouped[queue], list(range(40)))
    assert query(sdsn, "SELECT attempt, outcome, count(*) FROM underway.attempt GROUP BY 1, 2") == [
        (1, "succeeded", 200)
    ]
    assert len({r["pid"] for r in done}) == 2


@pytest.mark.timeout(60)
def test_racing_in_process_workers_never_run_two_tasks_of_a_serial_queue_at_once(
    sdsn: str,
) -> None:
    """Four workers in threads of this process call run_once as fast as they can over two
    serial queues (30 and 15 tasks, steps of a few milliseconds): no two steps of a queue
    ever run at once (neither by the detector lock nor by this process's own count of the
    steps running), and each queue still runs in order, every task exactly once."""
    enqueue_alternating("r1", range(30), sleep=0.003)
    enqueue_alternating("r2", range(15), sleep=0.003)
    jobs = {job.name: job for job in (js.serial_a, js.serial_b)}
    workers = [Worker(sdsn, jobs) for _ in range(4)]
    stop = threading.Event()
    errors: list[BaseException] = []
    claimed = [0] * len(workers)

    def drive(index: int) -> None:
        try:
            while not stop.is_set():
                if workers[index].run_once():
                    claimed[index] += 1
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=drive, args=(i,), daemon=True) for i in range(4)]
    try:
        for thread in threads:
            thread.start()
        wait_until(lambda: all_done(sdsn, 45) or errors, timeout=40, message="all done")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        for worker in workers:
            worker.disconnect()
    assert not errors, errors
    done = runs(sdsn)
    assert len(done) == len({r["task"] for r in done}) == 45
    assert max(r["peak"] for r in done) == 1
    grouped = by_queue(done)
    assert_one_at_a_time_in_order(grouped["r1"], list(range(30)))
    assert_one_at_a_time_in_order(grouped["r2"], list(range(15)))
    assert sum(claimed) == 45 and sum(1 for c in claimed if c) >= 2, claimed


# -- what the attempt history says ------------------------------------------------------------


@pytest.mark.timeout(30)
def test_attempt_window_covers_the_whole_try(sdsn: str) -> None:
    """A try's recorded window (attempt started_at to finished_at) covers the whole step: for
    a step that sends its first statement through cx and then works 0.3 s more, the window is
    at least 0.3 s long."""
    t = js.serial_a.enqueue({"queue": "w", "seq": 0, "sleep": 0.3}, serial_queue="w")
    worker = Worker(sdsn, {js.serial_a.name: js.serial_a})
    try:
        assert worker.run_once() is True
    finally:
        worker.disconnect()
    (run,) = by_queue(runs(sdsn))["w"]
    assert run["end"] - run["started"] >= timedelta(seconds=0.3)
    (window,) = query(
        sdsn,
        "SELECT finished_at - started_at FROM underway.attempt WHERE task_id = %s",
        (t.id,),
    )[0]
    assert window >= timedelta(seconds=0.3), window


@pytest.mark.timeout(30)
def test_multi_step_task_holds_its_serial_queue_between_steps(sdsn: str) -> None:
    """A task is one run of a job, through all its steps: two 2-step tasks sharing a serial
    queue run one after the other (A step 0, A step 1, B step 0, B step 1), not interleaved,
    even though A's step 1 is enqueued (run_at = now) after B was."""
    a = js.two_steps.enqueue({"queue": "m", "seq": 0}, serial_queue="m")
    b = js.two_steps.enqueue({"queue": "m", "seq": 1}, serial_queue="m")
    worker = Worker(sdsn, {js.two_steps.name: js.two_steps})
    try:
        while worker.run_once():
            pass
    finally:
        worker.disconnect()
    order = [(r["task"], r["step"]) for r in runs(sdsn)]
    assert order == [(a.id, 0), (a.id, 1), (b.id, 0), (b.id, 1)]
