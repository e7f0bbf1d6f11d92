"""Run the Flask example end to end: gunicorn serving sign-ups, then an underway supervisor
sending the welcome emails, then the outbox.

Two of the four sign-ups roll back (a taken email; an error after the enqueue) and get no
email. Needs ``pip install -e '.[flask]'``; uses ``$DATABASE_URL``, else an embedded
PostgreSQL. Run it: ``python examples/flask_app/demo.py``. It removes its tables and tasks
when done, so it can run again.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # for examples/embedded.py

from embedded import database_url  # noqa: E402
from jobs import welcome  # noqa: E402
from models import Base, Outbox, init_db, make_engine  # noqa: E402
from sqlalchemy import inspect, select, text  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

SIGNUPS = [
    {"email": "ada@example.com", "name": "Ada"},
    {"email": "grace@example.com", "name": "Grace"},
    {"email": "ada@example.com", "name": "Ada again"},  # taken: 409, rolled back
    {"email": "linus@example.com", "name": "Linus", "fail": True},  # error: 500, rolled back
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    """Wait until gunicorn listens on ``port`` (requests queue there until a worker is up)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def post(url: str, data: dict[str, Any]) -> tuple[int, Any]:
    """POST ``data`` as JSON; return the status and the reply (JSON, else the reason)."""
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(url, json.dumps(data).encode(), headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:  # 409, 500: still a reply
        is_json = err.headers.get_content_type() == "application/json"
        return err.code, json.load(err) if is_json else err.reason


def main() -> None:
    """Sign up over HTTP, run the workers until the queue is empty, print the outbox."""
    url = database_url()
    env = dict(os.environ, DATABASE_URL=url)
    engine = make_engine(url)
    if inspect(engine).has_table("users") or inspect(engine).has_table("outbox"):
        sys.exit("tables users/outbox exist already: run the demo on another database")
    init_db(url)
    try:
        port = free_port()
        with tempfile.TemporaryFile() as log:
            gunicorn = ["gunicorn", "--workers", "2", "--bind", f"127.0.0.1:{port}"]
            web = subprocess.Popen(
                [sys.executable, "-m", *gunicorn, "app:create_app()"],
                cwd=HERE,
                env=env,
                stdout=log,
                stderr=log,
            )
            try:
                wait_for_port(port)
                for form in SIGNUPS:
                    status, reply = post(f"http://127.0.0.1:{port}/signup", form)
                    print(f"POST /signup {json.dumps(form)} -> {status} {reply}", flush=True)
            except BaseException:
                log.seek(0)
                sys.stderr.write(log.read().decode(errors="replace"))
                raise
            finally:
                web.terminate()
                web.wait(timeout=30)

        # The workers: --burst stops once no email is left to send.
        subprocess.run(
            [sys.executable, "-m", "underway.supervisor", "jobs", "--workers", "2", "--burst"],
            cwd=HERE,
            env=env,
            check=True,
        )
        with Session(engine) as session:
            for mail in session.scalars(select(Outbox).order_by(Outbox.id)):
                print(f"Outbox: to {mail.recipient}: {mail.subject} {mail.body}")
    finally:
        # Leave the database as we found it.
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM underway.task WHERE job = :job"), {"job": welcome.name})
            Base.metadata.drop_all(conn)
        engine.dispose()


if __name__ == "__main__":
    main()
