"""Helpers for the test suite: polling, one-shot SQL, and running supervisors/scripts.

Every subprocess started here gets ``PYTHONPATH`` = repo root + ``tests/`` (so test job modules
such as ``tests/jobs_basic.py`` import as plain ``jobs_basic``, exactly as in the pytest process)
and an ``UNDERWAY_TEST_OWNER`` variable naming the pytest process, which lets the leak check in
``conftest.py`` find processes that escaped their parent (e.g. workers of a SIGKILLed supervisor).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, TypeVar

import psutil
from psycopg2.extensions import parse_dsn

from underway.slots import Slots
from underway.upkeep import Upkeep

try:
    from .jobs_common import sql
except ImportError:  # imported by plain name (``import helpers``), as subprocesses may
    from jobs_common import sql  # type: ignore[no-redef]

T = TypeVar("T")

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

#: Environment variable set on every subprocess we start; its value is the pytest pid.
OWNER_ENV = "UNDERWAY_TEST_OWNER"

#: Helper processes of the multiprocessing module that may outlive a test legitimately.
_MP_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.005,
    message: str = "",
) -> T:
    """Poll ``predicate()`` until it returns something truthy and return that value.

    Raises AssertionError (with ``message`` and the last value seen) at the deadline. Tests use
    this instead of fixed sleeps so they are both fast and tolerant of a slow machine.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:.2f}s waiting for {message or predicate!r}; "
                f"last value: {value!r}"
            )
        time.sleep(interval)


query = sql
"""Run one statement on its own short autocommit connection; return all rows as tuples."""


def scalar(dsn: str, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> Any:
    """First column of the first row of ``query(...)``; None if there are no rows."""
    rows = query(dsn, sql, params)
    return rows[0][0] if rows else None


def dbname_of(dsn: str) -> str:
    """The database name a DSN/URI points at (e.g. for ``pg_server.terminate_backends``)."""
    name = parse_dsn(dsn).get("dbname")
    if not name:
        raise ValueError(f"DSN names no database: {dsn!r}")
    return name


def subprocess_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` + test PYTHONPATH, unbuffered output and the owner tag, then ``env``."""
    result = dict(os.environ)
    paths = [str(REPO_ROOT), str(TESTS_DIR)]
    if result.get("PYTHONPATH"):
        paths.append(result["PYTHONPATH"])
    result["PYTHONPATH"] = os.pathsep.join(paths)
    result["PYTHONUNBUFFERED"] = "1"
    result["PYTHONFAULTHANDLER"] = "1"
    result[OWNER_ENV] = str(os.getpid())
    if env:
        result.update(env)
    return result


def _kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _peek_exit(pid: int, timeout: float = 0.0) -> int | None:
    """Exit status of child ``pid`` (negative: killed by that signal) once it has exited,
    polling up to ``timeout`` seconds; None if still running.

    The child is NOT reaped (``WNOWAIT``): while it is a zombie its pid, which is also its
    process group id, cannot be reused, so a later ``killpg`` cannot hit a stranger's group.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return None  # already reaped elsewhere
        if info is not None and info.si_pid == pid:
            if info.si_code == os.CLD_EXITED:
                return info.si_status
            return -info.si_status
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.005)


def run_python(
    code_or_args: str | Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -c CODE`` (a str) or ``python ARGS...`` (a sequence) with the test env.

    Output is captured as text; the exit status is not checked. On timeout the whole process
    group is killed and ``subprocess.TimeoutExpired`` is raised.
    """
    if isinstance(code_or_args, str):
        args = [sys.executable, "-c", code_or_args]
    else:
        args = [sys.executable, *code_or_args]
    # Temp files, not pipes: a background grandchild holding a pipe open would make
    # communicate() wait for it even after the script itself has exited.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            args,
            cwd=str(cwd or REPO_ROOT),
            env=subprocess_env(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        timed_out = _peek_exit(proc.pid, timeout) is None
        # Anything still in the script's group (or the script itself on timeout) dies now.
        _kill_group(proc.pid)
        proc.wait()
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    if timed_out:
        raise subprocess.TimeoutExpired(args, timeout, stdout, stderr)
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def _is_mp_helper(proc: psutil.Process) -> bool:
    try:
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return any(h in cmdline for h in _MP_HELPERS)


class Supervisor:
    """``python -m underway.supervisor MODULE... --dsn DSN [args]`` in its own process group.

    Use as a context manager; leaving the block SIGKILLs whatever is left of the group (and any
    worker seen earlier that left it) and reaps it. stdout+stderr go to a temp log file, shown by
    ``output()`` and in ``repr()`` so assertion messages carry the log.
    """

    def __init__(
        self,
        modules: Sequence[str],
        dsn: str,
        args: Sequence[str] = (),
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        module: str = "underway.supervisor",
    ) -> None:
        """Describe the command; nothing runs until ``start()`` / ``with``.

        ``module`` replaces ``underway.supervisor`` (the infrastructure tests use a stand-in).
        """
        if isinstance(modules, str):
            modules = [modules]
        self.args = [
            sys.executable,
            "-m",
            module,
            *modules,
            "--dsn",
            dsn,
            *args,
        ]
        self.cwd = str(cwd or REPO_ROOT)
        self.env = subprocess_env(env)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_fd, log_name = tempfile.mkstemp(prefix="underway-supervisor-", suffix=".log")
        self.log_path = Path(log_name)
        self._seen: dict[int, psutil.Process] = {}
        self._final_output: str | None = None

    # -------------------------------------------------------------- lifecycle

    def start(self) -> Supervisor:
        """Start the process (in a new session, so its pid is also its process group id)."""
        if self.proc is not None:
            raise RuntimeError("already started")
        self.proc = subprocess.Popen(
            self.args,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_fd,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def __enter__(self) -> Supervisor:
        if self.proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Kill everything left of the group and known workers, reap, close the log fd."""
        if self.proc is not None:
            if self.poll() is None:
                self.worker_pids()  # remember current children before they get orphaned
            self.kill_group()
            for p in self._seen.values():
                with suppress(psutil.Error):
                    p.kill()
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
            psutil.wait_procs(list(self._seen.values()), timeout=10)
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1
            # Keep the text for output()/repr() after the block; drop the file.
            self._final_output = self.output()
            with suppress(OSError):
                self.log_path.unlink()

    # -------------------------------------------------------------- control

    @property
    def pid(self) -> int:
        """The supervisor's pid (also its process group id)."""
        return self._require().pid

    @property
    def returncode(self) -> int | None:
        """Exit status, or None while running (negative: killed by that signal)."""
        return self.poll()

    def poll(self) -> int | None:
        """Same as ``returncode`` (the process is only reaped by ``close()``)."""
        proc = self._require()
        if proc.returncode is not None:
            return proc.returncode
        return _peek_exit(proc.pid)

    def is_running(self) -> bool:
        """True while the supervisor process has not exited."""
        return self.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the supervisor process only (not its workers)."""
        if self.poll() is None:
            os.kill(self.pid, sig)

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the whole process group (supervisor and workers)."""
        _kill_group(self.pid, sig)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the supervisor to exit and return its exit status.

        Raises AssertionError (including the log) if it is still running at the deadline.
        """
        proc = self._require()
        if proc.returncode is not None:
            return proc.returncode
        status = _peek_exit(proc.pid, timeout)
        if status is None:
            raise AssertionError(f"supervisor still running after {timeout}s: {self!r}")
        return status

    def kill_group(self) -> None:
        """SIGKILL the whole process group (the supervisor and every worker still in it)."""
        _kill_group(self.pid, signal.SIGKILL)

    def worker_pids(self) -> list[int]:
        """PIDs of the supervisor's live child processes (multiprocessing helpers excluded)."""
        proc = self._require()
        try:
            children = psutil.Process(proc.pid).children()
        except psutil.Error:
            return []
        pids = []
        for child in children:
            try:
                if child.status() == psutil.STATUS_ZOMBIE or _is_mp_helper(child):
                    continue
            except psutil.Error:
                continue
            self._seen.setdefault(child.pid, child)
            pids.append(child.pid)
        return sorted(pids)

    # -------------------------------------------------------------- output

    def output(self) -> str:
        """Everything the supervisor and its workers have written so far."""
        if self._final_output is not None:
            return self._final_output
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def wait_for_output(self, text: str, timeout: float = 10.0) -> str:
        """Wait until ``text`` appears in the output; return the whole output."""
        return wait_until(
            lambda: self.output() if text in self.output() else "",
            timeout=timeout,
            interval=0.02,
            message=f"{text!r} in supervisor output: {self!r}",
        )

    def _require(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise RuntimeError("supervisor not started")
        return self.proc

    def __repr__(self) -> str:
        state = "not started"
        if self.proc is not None:
            rc = self.poll()
            state = f"pid={self.proc.pid} " + ("running" if rc is None else f"exited rc={rc}")
        out = self.output()
        if len(out) > 6000:
            out = "...\n" + out[-6000:]
        return f"<Supervisor {state} args={self.args[3:]!r}>\n--- output ---\n{out}--- end ---"


def leaked_processes(
    since: set[int] | None = None, ignore: Callable[[psutil.Process], bool] | None = None
) -> list[psutil.Process]:
    """Live processes this pytest process is responsible for, excluding ``since`` pids.

    That is: its descendants plus anything carrying our ``UNDERWAY_TEST_OWNER`` tag (orphans
    re-parented to init). Zombies, multiprocessing helpers and ``ignore(proc)`` are skipped.
    """
    me = psutil.Process()
    found: dict[int, psutil.Process] = {p.pid: p for p in me.children(recursive=True)}
    tag = str(me.pid)
    for p in psutil.process_iter():
        if p.pid in found or p.pid == me.pid:
            continue
        with suppress(psutil.Error):
            if p.environ().get(OWNER_ENV) == tag:
                found[p.pid] = p
    result = []
    for pid, p in sorted(found.items()):
        if since is not None and pid in since:
            continue
        try:
            if p.status() == psutil.STATUS_ZOMBIE or _is_mp_helper(p):
                continue
            if ignore is not None and ignore(p):
                continue
        except psutil.Error:
            continue
        result.append(p)
    return result


def describe(proc: psutil.Process) -> str:
    """``pid: command line`` for error messages."""
    try:
        return f"{proc.pid}: {' '.join(proc.cmdline()) or proc.name()}"
    except psutil.Error:
        return f"{proc.pid}: <gone>"


def register(dsn, *jobs):
    """Store the jobs and the limits they declare, as a supervisor does at start."""
    upkeep = Upkeep(
        dsn,
        Slots(1),
        {job.name: job for job in jobs},
        lease=30.0,
        db_timeout=10.0,
        workers=list,
        abort=lambda ids: None,
    )
    try:
        upkeep.register()
    finally:
        upkeep.close()


@contextmanager
def in_process_workers(dsn: str, default_jobs: Sequence[Any] = ()) -> Iterator[Callable[..., Any]]:
    """A maker of in-process workers on ``dsn`` (of the given jobs, else ``default_jobs``;
    polling every 0.1 s unless told otherwise); their connections close afterwards."""
    from underway.worker import Worker

    made: list[Worker] = []

    def make(*jobs: Any, **options: Any) -> Worker:
        options.setdefault("poll_interval", 0.1)
        worker = Worker(dsn, {job.name: job for job in (jobs or default_jobs)}, **options)
        made.append(worker)
        return worker

    try:
        yield make
    finally:
        for worker in made:
            worker.disconnect()
