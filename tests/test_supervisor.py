"""The supervisor's command line and signals, against a real PostgreSQL and real processes.

Steps that must "hang" wait on an advisory lock the test holds (``jobs_faults.Gate``), so the
test decides when they may finish. Every outcome is checked in the database: task states, the
attempt history and the ``faults_effect`` rows the steps write in their own transaction.
Idle workers run with ``--poll-interval 30``, so anything picked up within seconds was picked up
through LISTEN, not by polling.
"""

from __future__ import annotations

import contextlib
import re
import signal
from collections import Counter

import jobs_faults
import psutil
import psycopg2
import pytest
from jobs_faults import (
    UNDEFINED_JOB,
    Gate,
    attempts_of,
    effects,
    holds_for,
    lock_waiters,
    sql,
    states,
    task_row,
    worker_backends,
)

import underway

from .faults_common import IDLE, MODULE, supervisor, wait_blocked, wait_idle
from .helpers import Supervisor, dbname_of, run_python, wait_until
from .pgtest import PgTestServer

#: Child processes of a supervisor with 2 workers: the workers and the scheduler.
CHILDREN = 3


def assert_cut_off_write_never_commits(dsn: str, gate: Gate, key: int, pid: int) -> None:
    """Let whatever is left of the killed worker's session take the lock its step waited for:
    with its client gone it can only fail, so the effect row it wrote never commits."""
    gate.release(key)
    wait_until(
        lambda: worker_backends(dsn, pid) == 0, timeout=10, message="killed worker's session gone"
    )


# -- burst -----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_burst_runs_every_ready_task_exactly_once_then_exits(fdsn: str) -> None:
    """--burst drains all ready tasks of its jobs, each step's effect committed exactly once,
    and exits 0 without waiting for a delayed task or tasks of jobs it does not know."""
    tasks = jobs_faults.two_step.enqueue_many([{"n": i} for i in range(50)])
    delayed = jobs_faults.one_step.enqueue({"late": True}, delay=3600)
    (foreign,) = sql(
        fdsn,
        "INSERT INTO underway.task (job, input) VALUES (%s, '{}') RETURNING id",
        (UNDEFINED_JOB,),
    )[0]
    with supervisor(fdsn, "--burst") as sup:
        assert sup.wait(45) == 0, sup
        assert "burst done" in sup.output()
    assert states(fdsn, "faults-two-step") == {"succeeded": 50}
    expected = Counter((t.id, step) for t in tasks for step in (0, 1))
    assert Counter((task_id, step) for task_id, step, _ in effects(fdsn)) == expected
    assert all(attempt == 1 for _, _, attempt in effects(fdsn))
    outcomes = sql(fdsn, "SELECT outcome, count(*) FROM underway.attempt GROUP BY 1")
    assert outcomes == [("succeeded", 100)]
    for task_id in (delayed.id, foreign):
        row = task_row(fdsn, task_id)
        assert (row["state"], row["attempts"], row["started_at"]) == ("pending", 0, None)


@pytest.mark.timeout(60)
def test_max_tasks_replaces_each_worker_after_that_many_tasks(fdsn: str) -> None:
    """--max-tasks 3: a worker exits after its third task and a fresh process takes its slot;
    every task still runs exactly once."""
    tasks = jobs_faults.two_step.enqueue_many([{"n": i} for i in range(5)])
    with supervisor(fdsn, "--max-tasks", "3", workers=1) as sup:
        wait_until(
            lambda: states(fdsn, "faults-two-step") == {"succeeded": 5},
            timeout=30,
            message=f"all tasks done: {sup!r}",
        )
        sup.signal(signal.SIGTERM)
        assert sup.wait(20) == 0, sup
        assert "ran 3 tasks: exiting to be replaced" in sup.output()
    runs = effects(fdsn)
    assert sorted((task_id, step) for task_id, step, _ in runs) == sorted(
        (t.id, step) for t in tasks for step in (0, 1)
    )
    pids = [pid for (pid,) in sql(fdsn, "SELECT pid FROM faults_effect ORDER BY id")]
    # 10 steps, a fresh process every 3: pids change after the 3rd, 6th and 9th step.
    assert [len(set(pids[i : i + 3])) for i in range(0, 9, 3)] == [1, 1, 1]
    assert len(set(pids)) == 4


# -- start-up errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"lease": 0.5}, "run_workers: lease must be between 1 and 86400 seconds, not 0.5"),
        ({"grace": -1}, "run_workers: grace must be a number of seconds, 0 or more, not -1"),
        ({"max_tasks": 0}, "run_workers: max_tasks must be at least 1"),
        ({"workers": 0}, "run_workers: workers must be at least 1"),
    ],
)
def test_run_workers_refuses_bad_options_before_starting(options, message) -> None:
    """run_workers checks its options as the command line does, before it connects."""
    with pytest.raises(underway.ConfigurationError) as info:
        underway.run_workers({}, dsn="postgresql://nobody@127.0.0.1:1/none", **options)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lease", "0"], "--lease must be between 1 and 86400 seconds"),
        (["--lease", "nan"], "--lease must be between 1 and 86400 seconds"),
        (["--poll-interval", "-1"], "--poll-interval must be a number of seconds more than 0"),
        (["--grace", "-5"], "--grace must be a number of seconds, 0 or more"),
        (["--max-tasks", "0"], "--max-tasks must be at least 1"),
        (["--workers", "0"], "--workers must be at least 1"),
    ],
)
def test_bad_options_exit_2_saying_what_is_wrong(args: list[str], message: str) -> None:
    """Nonsense option values are refused before anything starts, naming the option."""
    result = run_python(["-m", "underway.supervisor", MODULE, *args])
    assert result.returncode == 2, result
    assert message in result.stderr, result.stderr


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    return lines[0]


@pytest.mark.timeout(60)
def test_cli_prints_no_runpy_warning(fdsn: str) -> None:
    """A start-up error is the only thing on stderr: no RuntimeWarning from runpy."""
    result = run_python(["-m", "underway.supervisor", "no_such_module_xyz", "--dsn", fdsn])
    assert result.returncode == 2, result
    assert result.stderr.strip().splitlines() == [
        "underway: cannot import module 'no_such_module_xyz': no such module"
    ]


@pytest.mark.timeout(60)
def test_unknown_module_exits_2_with_one_line(fdsn: str) -> None:
    """An unknown module: exit 2 and one line on stderr naming it, no traceback."""
    result = run_python(
        ["-m", "underway.supervisor", "no_such_module_xyz", "--dsn", fdsn], timeout=30
    )
    assert result.returncode == 2, result
    assert "no_such_module_xyz" in _one_line(result.stderr)
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.timeout(60)
def test_unknown_dotted_module_exits_2_with_one_line(fdsn: str) -> None:
    """A dotted module whose package does not exist is just as unknown: exit 2, one line."""
    result = run_python(["-m", "underway.supervisor", "no_such_pkg_xyz.jobs", "--dsn", fdsn])
    assert result.returncode == 2, result
    assert "no_such_pkg_xyz" in _one_line(result.stderr)
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.timeout(60)
def test_missing_schema_exits_1_telling_to_migrate(empty_dsn: str) -> None:
    """Against a database without the schema: exit 1, one line saying to run migrations."""
    result = run_python(["-m", "underway.supervisor", MODULE, "--dsn", empty_dsn], timeout=30)
    assert result.returncode == 1, result
    line = _one_line(result.stderr)
    assert line.startswith("underway: ") and "migrations" in line, line
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "unreachable",
    [
        "postgresql://postgres:s3cr3tpw@127.0.0.1:1/nodb?connect_timeout=5",
        "postgresql://postgres@/nodb?host=/nonexistent-underway-dir&password=s3cr3tpw",
        "host=/nonexistent-underway-dir dbname=nodb user=postgres password=s3cr3tpw",
    ],
    ids=["uri-password", "query-password", "keyword-password"],
)
def test_unreachable_database_exits_1_without_password(unreachable: str) -> None:
    """An unreachable server: exit 1, one line on stderr, the password nowhere."""
    result = run_python(["-m", "underway.supervisor", MODULE, "--dsn", unreachable], timeout=30)
    assert result.returncode == 1, result
    line = _one_line(result.stderr)
    assert line.startswith("underway: ") and "connect" in line, line
    assert "s3cr3tpw" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "invalid",
    [
        "postgresql://postgres:50%ofs3cr3tpw@/nodb?host=/nonexistent-underway-dir",
        "host=/nonexistent-underway-dir dbname=nodb password=correct s3cr3tpw",
    ],
    ids=["raw-percent-in-uri", "unquoted-space"],
)
def test_invalid_dsn_exits_1_without_password(invalid: str) -> None:
    """A DSN libpq cannot parse: exit 1, one line, and no part of the password in it."""
    result = run_python(["-m", "underway.supervisor", MODULE, "--dsn", invalid], timeout=30)
    assert result.returncode == 1, result
    line = _one_line(result.stderr)
    assert line.startswith("underway: invalid database DSN"), line
    assert "s3cr3tpw" not in result.stderr + result.stdout


# -- graceful stop ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_sigterm_waits_for_running_step_and_starts_nothing_new(fdsn: str, gate: Gate) -> None:
    """SIGTERM: the running step finishes and commits, nothing new starts, a repeated SIGTERM
    changes nothing, and the supervisor exits 0 once the step is done."""
    key = gate.hold(101)
    with supervisor(fdsn, "--grace", "30") as sup:
        wait_idle(fdsn, 2)
        task = jobs_faults.blocking.enqueue({"lock": key})
        [busy] = wait_blocked(fdsn, key)
        sup.signal(signal.SIGTERM)
        # The idle worker leaves at once; the busy one stays with its step.
        wait_until(lambda: sup.worker_pids() == [busy], message=f"only {busy} left: {sup!r}")
        later = jobs_faults.one_step.enqueue_many([{"n": i} for i in range(3)])
        sup.signal(signal.SIGTERM)
        holds_for(
            1.5,
            lambda: sup.is_running() and sup.worker_pids() == [busy] and lock_waiters(fdsn, key),
            "supervisor and busy worker still there, step still waiting",
        )
        assert states(fdsn, "faults-one-step") == {"pending": 3}
        gate.release(key)
        assert sup.wait(20) == 0, sup
    row = task_row(fdsn, task.id)
    assert (row["state"], row["attempts"]) == ("succeeded", 1)
    assert effects(fdsn, task.id) == [(task.id, 0, 1)]
    assert attempts_of(fdsn, task.id) == [(0, 1, "succeeded")]
    for t in later:
        row = task_row(fdsn, t.id)
        assert (row["state"], row["attempts"], row["started_at"]) == ("pending", 0, None)
        assert attempts_of(fdsn, t.id) == []
        assert effects(fdsn, t.id) == []


@pytest.mark.timeout(60)
def test_grace_expiry_kills_step_and_gives_task_back_uncounted(fdsn: str, gate: Gate) -> None:
    """--grace 1 and a step that never ends: the worker is killed at the deadline, the
    supervisor exits 0, the task is pending again with its try not counted, and the step's
    partial write never commits."""
    key = gate.hold(102)
    with supervisor(fdsn, "--grace", "1", workers=1) as sup:
        wait_idle(fdsn, 1)
        task = jobs_faults.blocking.enqueue({"lock": key})
        [busy] = wait_blocked(fdsn, key)
        sup.signal(signal.SIGTERM)
        holds_for(0.7, sup.is_running, "supervisor waits out the grace period")
        assert sup.wait(15) == 0, sup
        assert "grace period over" in sup.output()
        assert f"worker {busy} (slot 0) killed by SIGKILL" in sup.output()
    row = task_row(fdsn, task.id)
    assert (row["state"], row["attempts"], row["claim_token"]) == ("pending", 0, None)
    assert attempts_of(fdsn, task.id) == [(0, 1, "interrupted")]
    assert_cut_off_write_never_commits(fdsn, gate, key, busy)
    assert effects(fdsn, task.id) == []


# -- hard stop ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "signals", [("SIGINT", "SIGINT"), ("SIGQUIT",)], ids=["2xSIGINT", "SIGQUIT"]
)
def test_hard_stop_kills_running_step_at_once(
    fdsn: str, gate: Gate, signals: tuple[str, ...]
) -> None:
    """A second SIGINT (the first is graceful), or SIGQUIT: exit 1 at once, even with a step
    running and 30 s of grace left; the task goes back with its try not counted."""
    key = gate.hold(103)
    with supervisor(fdsn, "--grace", "30") as sup:
        wait_idle(fdsn, 2)
        task = jobs_faults.blocking.enqueue({"lock": key})
        [busy] = wait_blocked(fdsn, key)
        if len(signals) == 2:
            sup.signal(signal.SIGINT)
            # The graceful stop began: the idle worker left; the step still runs.
            wait_until(lambda: sup.worker_pids() == [busy], message=f"only {busy} left: {sup!r}")
            assert lock_waiters(fdsn, key) == [busy]
        sup.signal(getattr(signal, signals[-1]))
        assert sup.wait(10) == 1, sup
        assert "hard stop" in sup.output()
    row = task_row(fdsn, task.id)
    assert (row["state"], row["attempts"], row["claim_token"]) == ("pending", 0, None)
    assert attempts_of(fdsn, task.id) == [(0, 1, "interrupted")]
    assert_cut_off_write_never_commits(fdsn, gate, key, busy)
    assert effects(fdsn, task.id) == []


@pytest.mark.timeout(60)
def test_ctrl_c_to_process_group_leaves_running_step_alone(fdsn: str, gate: Gate) -> None:
    """SIGINT to the whole process group (Ctrl-C): workers ignore it, the supervisor stops
    gracefully; the running step finishes and commits, exit 0."""
    key = gate.hold(104)
    with supervisor(fdsn, "--grace", "30") as sup:
        wait_idle(fdsn, 2)
        task = jobs_faults.blocking.enqueue({"lock": key})
        [busy] = wait_blocked(fdsn, key)
        sup.signal_group(signal.SIGINT)
        wait_until(lambda: sup.worker_pids() == [busy], message=f"only {busy} left: {sup!r}")
        holds_for(0.5, lambda: lock_waiters(fdsn, key) == [busy], "step still waiting")
        gate.release(key)
        assert sup.wait(20) == 0, sup
    row = task_row(fdsn, task.id)
    assert (row["state"], row["attempts"]) == ("succeeded", 1)
    assert attempts_of(fdsn, task.id) == [(0, 1, "succeeded")]
    assert effects(fdsn, task.id) == [(task.id, 0, 1)]


# -- restart ------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_sighup_replaces_workers_and_loses_no_task(fdsn: str, gate: Gate) -> None:
    """SIGHUP: idle workers are replaced at once, a busy one after its step; tasks keep
    flowing through the new workers (which listen) and every task runs exactly once."""
    key = gate.hold(105)
    with supervisor(fdsn, "--grace", "30") as sup:
        wait_idle(fdsn, 2)
        old = set(sup.worker_pids())
        held = jobs_faults.blocking.enqueue({"lock": key})
        [busy] = wait_blocked(fdsn, key)
        sup.signal(signal.SIGHUP)
        wait_until(
            lambda: (
                len(pids := set(sup.worker_pids())) == CHILDREN
                and busy in pids
                and len(pids - old) == CHILDREN - 1
            ),
            message=f"idle worker (and scheduler) replaced: {sup!r}",
        )
        during = jobs_faults.one_step.enqueue_many([{"n": i} for i in range(20)])
        wait_until(
            lambda: states(fdsn, "faults-one-step") == {"succeeded": 20},
            message="tasks run by the new worker while the old one finishes its step",
        )
        gate.release(key)
        wait_until(lambda: task_row(fdsn, held.id)["state"] == "succeeded")
        wait_until(
            lambda: len(pids := set(sup.worker_pids())) == CHILDREN and not pids & old,
            message=f"all workers replaced: {sup!r}",
        )
        wait_idle(fdsn, 2)
        after = jobs_faults.one_step.enqueue_many([{"n": i} for i in range(10)])
        wait_until(
            lambda: states(fdsn, "faults-one-step") == {"succeeded": 30},
            timeout=10,
            message="tasks picked up by the new workers (through LISTEN)",
        )
        assert sup.is_running()
        sup.signal(signal.SIGTERM)
        assert sup.wait(20) == 0, sup
    assert attempts_of(fdsn, held.id) == [(0, 1, "succeeded")]
    assert effects(fdsn, held.id) == [(held.id, 0, 1)]
    ids = [t.id for t in during + after]
    assert Counter(task_id for task_id, _, _ in effects(fdsn) if task_id in ids) == Counter(ids)
    assert sql(fdsn, "SELECT DISTINCT outcome FROM underway.attempt") == [("succeeded",)]


# -- logging ------------------------------------------------------------------------------------

LINE = re.compile(
    r"task (?P<event>started|advanced|succeeded): job=(?P<job>\S+) task_id=(?P<id>\d+) "
    r"step=(?P<step>\d+)\(\w+\) attempt=(?P<attempt>\d+)/\d+(?: duration=(?P<ms>[\d.]+)ms)?"
)


def _with_password(dsn: str, password: str) -> str:
    if not dsn.startswith("postgresql://postgres@"):
        pytest.skip("needs the private test server's DSN form to add a password")
    return dsn.replace("postgresql://postgres@", f"postgresql://postgres:{password}@", 1)


@pytest.mark.timeout(60)
def test_log_has_start_and_finish_lines_and_never_the_password(
    fdsn: str, pg_server: PgTestServer
) -> None:
    """One log line per task start and per finish with job, task id, step, attempt and
    duration; the DSN's password appears nowhere, not even around lost connections."""
    secret = "s3cr3tpw"
    secret_dsn = _with_password(fdsn, secret)
    psycopg2.connect(secret_dsn).close()  # trust auth ignores the password
    dbname = dbname_of(fdsn)
    with Supervisor([MODULE], secret_dsn, ["--workers", "2", *IDLE, "--lease", "3"]) as sup:
        wait_idle(fdsn, 2)
        tasks = jobs_faults.two_step.enqueue_many([{"n": i} for i in range(5)])
        wait_until(lambda: states(fdsn, "faults-two-step") == {"succeeded": 5})
        # Make the library report connection trouble: the DSN must stay redacted there too.
        sql(pg_server.admin_dsn, f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        try:
            # Workers, supervisor and scheduler; not this process's enqueue connection.
            pg_server.terminate_backends(dbname, "underway w%")
            pg_server.terminate_backends(dbname, "underway s%")
            sup.wait_for_output("not currently accepting connections")
        finally:
            sql(pg_server.admin_dsn, f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        wait_idle(fdsn, 2)
        more = jobs_faults.two_step.enqueue({"n": 99})
        wait_until(lambda: task_row(fdsn, more.id)["state"] == "succeeded", timeout=10)
        sup.signal(signal.SIGTERM)
        assert sup.wait(20) == 0, sup
    output = sup.output()
    assert secret not in output
    assert "postgres:***@" in output  # the DSN is logged, redacted
    seen = Counter()
    for match in LINE.finditer(output):
        assert match["job"] == "faults-two-step" and match["attempt"] == "1", match[0]
        assert (match["ms"] is None) == (match["event"] == "started"), match[0]
        seen[(int(match["id"]), int(match["step"]), match["event"])] += 1
    expected = Counter()
    for task_id in [t.id for t in tasks] + [more.id]:
        for step, finish in ((0, "advanced"), (1, "succeeded")):
            expected.update([(task_id, step, "started"), (task_id, step, finish)])
    assert seen == expected


def _dead(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie not yet reaped counts as dead)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.timeout(60)
def test_sigquit_to_process_group_does_not_count_the_try(fdsn: str, gate: Gate) -> None:
    """Ctrl-\\ in a terminal (SIGQUIT to the whole group) is a hard stop like SIGQUIT to the
    supervisor: exit 1, and the cut-off step goes back with its try not counted.

    To make the order of events certain, the supervisor is frozen (SIGSTOP) while the signal
    reaches everyone: the workers get it first, and the supervisor only when it thaws."""
    key = gate.hold(106)
    with supervisor(fdsn, "--grace", "30", "--lease", "3") as sup:
        wait_idle(fdsn, 2)
        task = jobs_faults.blocking.enqueue({"lock": key})
        [busy] = wait_blocked(fdsn, key)
        sup.signal(signal.SIGSTOP)
        try:
            sup.signal_group(signal.SIGQUIT)
            # A worker that did not ignore SIGQUIT would die now: give it a second to.
            with contextlib.suppress(AssertionError):
                wait_until(lambda: _dead(busy), timeout=1)
            assert not _dead(busy), "the worker died of SIGQUIT"
        finally:
            sup.signal(signal.SIGCONT)
        assert sup.wait(10) == 1, sup
    row = task_row(fdsn, task.id)
    assert (row["state"], row["attempts"], row["claim_token"]) == ("pending", 0, None), sup
    assert attempts_of(fdsn, task.id) == [(0, 1, "interrupted")]
    assert_cut_off_write_never_commits(fdsn, gate, key, busy)
    assert effects(fdsn, task.id) == []
