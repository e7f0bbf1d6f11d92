"""The command line's operating commands (issue #12): list, show, retry, enqueue, schedules,
supervisors, limits and rate-limit, ``--json`` on each, terminal-safe output, and one-line
errors. Most run in-process through ``cli.main`` (fast); the console script and a terminal
escape run as real subprocesses. The jobs are the api jobs, run by an in-process worker.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys

import jobs_api as ja
import pytest
from jobs_api import run_all

from underway import TaskState, admin, cli
from underway.upkeep import Heartbeat

from .helpers import REPO_ROOT, query, register, run_python, scalar

EVIL = "evil\x1b[31m\nforged"


@pytest.fixture
def worker(make_worker):
    """An in-process worker for the api jobs."""
    return make_worker()


def run(capsys, *args):
    """``python -m underway.admin ARGS`` in this process: (exit status, stdout, stderr)."""
    status = cli.main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def one_line_error(result, *fragments):
    """Exit status 1, nothing on stdout, one line on stderr holding every fragment."""
    status, out, err = result
    assert (status, out) == (1, ""), result
    assert len(err.splitlines()) == 1 and err.startswith("underway: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def failed_task(adsn, worker, **inp):
    """A task of api-fails, failed for good after its two tries."""
    task = ja.fails.enqueue(inp or {"n": 1})
    run_all(worker, adsn)
    assert task.status() is TaskState.FAILED
    return task


# -- list and show ----------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_list_shows_newest_first_with_step_state_tries_age_and_error(adsn, worker, capsys):
    """`list` prints one line per task, newest first: id, job, step (index:name once the job
    is registered), state, tries, age and the last error; its filters narrow it; --json
    gives the same tasks as records."""
    register(adsn, ja.fails, ja.echo)
    bad = failed_task(adsn, worker)
    good = ja.echo.enqueue({"n": 2})
    status, out, err = run(capsys, "list")
    assert (status, err) == (0, "")
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "JOB", "STEP", "STATE", "TRIES", "AGE", "LAST", "ERROR"]
    assert [row.split()[:5] for row in rows] == [
        [str(good.id), "api-echo", "0:echo_back", "pending", "0/1"],
        [str(bad.id), "api-fails", "0:failing_step", "failed", "2/2"],
    ]
    assert rows[1].endswith("RuntimeError: no luck on try 2")
    _, out, _ = run(capsys, "list", "--state", "failed", "--job", "api-fails", "--since", "1h")
    assert [row.split()[0] for row in out.splitlines()[1:]] == [str(bad.id)]
    _, out, _ = run(capsys, "list", "--queue", "api-echo", "--limit", "1", "--json")
    assert [(t["id"], t["state"], t["step_name"]) for t in json.loads(out)] == [
        (good.id, "pending", "echo_back")
    ]


@pytest.mark.timeout(30)
def test_show_prints_the_task_whole(adsn, worker, capsys):
    """`show` prints input, step by name and index, state, timing and every try with its
    outcome, error and full traceback; a succeeded task's output too."""
    register(adsn, ja.fails)
    bad = failed_task(adsn, worker, n=7)
    status, out, err = run(capsys, "show", str(bad.id))
    assert (status, err) == (0, "")
    assert "state: failed" in out
    assert "step: 0:failing_step (step 0 of 1, counting from 0)" in out
    assert 'input: {"n": 7}' in out
    assert "step 0:failing_step, try 1: failed" in out
    assert "step 0:failing_step, try 2: failed" in out
    assert "| Traceback (most recent call last):" in out
    assert "in explode_for_the_traceback" in out
    good = ja.echo.enqueue({"n": 3})
    run_all(worker, adsn)
    _, out, _ = run(capsys, "show", str(good.id))
    assert 'output: {"n": 3}' in out
    _, out, _ = run(capsys, "show", str(good.id), "--json")
    shown = json.loads(out)
    assert (shown["output"], shown["state"], len(shown["history"])) == ({"n": 3}, "succeeded", 1)
    one_line_error(run(capsys, "show", "987654"), "no task 987654")


# -- retry, redrive, enqueue, cancel ------------------------------------------------------------


@pytest.mark.timeout(30)
def test_retry_puts_failed_tasks_back_and_refuses_others(adsn, worker, capsys):
    """`retry ID` puts a failed task back at its failed step (no copy); on a task that is
    not failed it exits 1 saying what the task is, and retries nothing; `retry --job J`
    takes every failed task of J."""
    one, two = failed_task(adsn, worker, n=1), failed_task(adsn, worker, n=2)
    pending = ja.echo.enqueue({"n": 3})
    one_line_error(
        run(capsys, "retry", str(one.id), str(pending.id)), f"task {pending.id} is pending"
    )
    assert one.status() is TaskState.FAILED
    assert run(capsys, "retry", str(one.id)) == (0, f"retried 1 task(s): {one.id}\n", "")
    assert one.status() is TaskState.PENDING
    status, out, _ = run(capsys, "retry", "--job", "api-fails", "--json")
    assert (status, json.loads(out)) == (0, {"retried": [two.id]})
    assert scalar(adsn, "SELECT count(*) FROM underway.task WHERE job = 'api-fails'") == 2
    one_line_error(run(capsys, "retry"), "task ids, or --job")


@pytest.mark.timeout(30)
def test_redrive_by_id_says_why_nothing_moved(adsn, worker, capsys):
    """`redrive Q --id N` of a failed task without a dead-letter queue used to print
    "re-drove 0" and exit 0: now it exits 1 and points to `retry`; an id too big for a task
    is a usage error, not a traceback."""
    bad = failed_task(adsn, worker)
    one_line_error(
        run(capsys, "redrive", "api-dead", "--id", str(bad.id)),
        f"task {bad.id} failed without a dead-letter queue",
        f"retry {bad.id}",
    )
    with pytest.raises(SystemExit) as usage:
        cli.main(["redrive", "x", "--id", "99999999999999999999"])
    assert usage.value.code == 2
    assert "a task id is a whole number" in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_enqueue_prints_the_new_id_and_cancel_says_what_it_did(adsn, capsys):
    """`enqueue JOB JSON` prints the new task's id (with --delay, --priority, --key as
    given); `cancel` then cancels it; bad JSON is a usage error."""
    status, out, err = run(
        capsys, "enqueue", "api-echo", '{"n": 1}', "--delay", "1h", "--priority", "5", "--key", "k"
    )
    assert (status, err) == (0, "")
    task_id = int(out)
    row = query(
        adsn,
        "SELECT input, priority, key, run_at > now() + interval '59 minutes' FROM underway.task"
        " WHERE id = %s",
        (task_id,),
    )
    assert row == [({"n": 1}, 5, "k", True)]
    assert run(capsys, "cancel", str(task_id), "--json")[1] == as_text(
        {"id": task_id, "result": "cancelled"}
    )
    with pytest.raises(SystemExit):
        cli.main(["enqueue", "api-echo", "{not json"])
    assert "the input must be JSON" in capsys.readouterr().err


def as_text(value):
    """What --json prints for ``value``."""
    return json.dumps(value, indent=2) + "\n"


# -- schedules, supervisors, limits -------------------------------------------------------------


@pytest.mark.timeout(30)
def test_schedules_show_spec_zone_and_fires_in_their_zone_and_utc(adsn, capsys):
    """`schedules` shows each schedule's spec, zone and input, and its next fire both in its
    zone and in UTC."""
    ja.echo.schedule("0 6 * * *[Europe/Berlin]", {"daily": True}, name="morning")
    _, out, _ = run(capsys, "schedules")
    header, row = out.splitlines()
    assert header.split()[:4] == ["JOB", "NAME", "SCHEDULE", "ZONE"]
    assert "api-echo" in row and "morning" in row and "Europe/Berlin" in row
    assert "06:00 CE" in row and "UTC)" in row  # 06:00 CET or CEST, and the UTC time
    [found] = json.loads(run(capsys, "schedules", "--json")[1])
    assert (found["name"], found["zone"], found["input"]) == (
        "morning",
        "Europe/Berlin",
        {"daily": True},
    )


@pytest.mark.timeout(30)
def test_supervisors_show_host_pid_workers_and_what_they_run(adsn, cur, capsys):
    """`supervisors` lists live supervisors with host, pid, jobs, and each worker's task,
    step and for how long; without any it says so."""
    assert run(capsys, "supervisors") == (0, "no live supervisor\n", "")
    task = ja.echo.enqueue({"n": 1})
    query(
        adsn,
        "UPDATE underway.task SET state = 'running', started_at = now() - interval '5 s'"
        " WHERE id = %s",
        (task.id,),
    )
    register(adsn, ja.echo)
    query(adsn, "DELETE FROM underway.supervisor")  # register's own; the one below is ours
    Heartbeat(
        30.0,
        ["api-echo"],
        lambda: [{"slot": 0, "pid": 4242, "task_id": task.id}, {"slot": 1, "pid": 4243}],
    ).run_once(cur)
    _, out, _ = run(capsys, "supervisors")
    assert " 2 worker(s)" in out
    assert "jobs: api-echo" in out
    assert f"worker 0 pid 4242: task {task.id} (api-echo, step 0:echo_back) for 5 s" in out
    assert "worker 1 pid 4243: idle" in out
    [sup] = json.loads(run(capsys, "supervisors", "--json")[1])
    assert sup["workers"][0]["task_id"] == task.id


@pytest.mark.timeout(30)
def test_rate_limit_and_limits(adsn, capsys):
    """`rate-limit Q 100/m` sets a queue's limit, `limits` shows it with its room, and
    `rate-limit Q --clear` lifts it; a malformed rate is one line, exit 1."""
    assert run(capsys, "rate-limit", "emails", "100/m")[0] == 0
    _, out, _ = run(capsys, "limits")
    assert out.splitlines()[1].split() == ["rate", "emails", "100", "per", "1", "min", "100"]
    assert (
        run(capsys, "rate-limit", "emails", "--clear")[1] == "lifted the rate limit of 'emails'\n"
    )
    assert json.loads(run(capsys, "limits", "--json")[1]) == []
    one_line_error(run(capsys, "rate-limit", "emails", "lots"), "N/s, N/m or N/h")


# -- safety -----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_names_and_errors_are_printed_escaped(adsn, worker, capsys):
    """A queue name and an error holding an escape sequence and a newline are printed with
    both escaped: nothing stored can recolour the terminal or forge an output line."""
    admin.pause(EVIL)
    _, out, _ = run(capsys, "queues")
    assert "\x1b" not in out and "forged" in out
    assert "evil\\x1b[31m\\nforged" in out
    assert len(out.splitlines()) == 2
    task = ja.fails.enqueue({"n": 1})
    query(adsn, "UPDATE underway.task SET error = %s WHERE id = %s", (EVIL, task.id))
    _, out, _ = run(capsys, "list")
    assert "\x1b" not in out and len(out.splitlines()) == 2


@pytest.mark.timeout(60)
def test_console_script_and_json_are_clean_subprocess_output(adsn):
    """The `underway` console script (as installed by setup.py) runs the same commands; its
    --json output parses, and an error is one line on stderr with exit status 1."""
    ja.echo.enqueue({"n": 1})
    listed = run_python(
        ["-c", "import sys; from underway.cli import main; sys.exit(main())", "list", "--json"],
        env={"DATABASE_URL": adsn},
        timeout=30,
    )
    assert listed.returncode == 0, listed
    assert [t["job"] for t in json.loads(listed.stdout)] == ["api-echo"]
    assert "underway = underway.cli:main" in (REPO_ROOT / "setup.py").read_text()
    missing = run_python(["-m", "underway.admin", "--dsn", adsn, "show", "5"], timeout=30)
    assert (missing.returncode, missing.stdout) == (1, "")
    assert missing.stderr.startswith("underway: no task 5")


@pytest.mark.timeout(60)
def test_retry_by_job_shows_progress_on_a_terminal_only(adsn):
    """`retry --job` over 1,500 failed tasks writes its progress to standard error when
    that is a terminal, and nothing there when it is a pipe."""
    query(
        adsn,
        "INSERT INTO underway.task (job, input, state, attempts, finished_at)"
        " SELECT 'api-fails', '{}', 'failed', 2, now() FROM generate_series(1, 1500)",
    )
    primary, secondary = pty.openpty()
    try:
        ran = subprocess.run(
            [sys.executable, "-m", "underway.admin", "--dsn", adsn, "retry", "--job", "api-fails"],
            stdout=subprocess.PIPE,
            stderr=secondary,
            timeout=60,
            cwd=REPO_ROOT,
        )
        os.close(secondary)
        shown = b""
        while select.select([primary], [], [], 0.5)[0]:
            try:
                chunk = os.read(primary, 4096)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(primary)
    assert ran.returncode == 0 and ran.stdout.startswith(b"retried 1500 task(s)"), ran
    assert b"1,000 of 1,500" in shown and b"1,500 of 1,500" in shown, shown
    query(adsn, "UPDATE underway.task SET state = 'failed' WHERE job = 'api-fails'")
    piped = run_python(["-m", "underway.admin", "--dsn", adsn, "retry", "--job", "api-fails"])
    assert (piped.returncode, piped.stderr) == (0, ""), piped
