"""The ceiling: pgbench (C, libpq) running the classic claim-and-complete transaction on a
pre-filled ``underway.task``, with underway's own SQL.

Each task is one transaction of four round trips, as issue #6 defines the ceiling: BEGIN,
underway's ``claim_task`` (the claim ``UPDATE ... FROM (SELECT ... WHERE state = 'pending'
ORDER BY priority DESC, run_at, id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING``), underway's
``complete_task`` (the fenced UPDATE and the attempt INSERT, its claim of a next task turned
off), COMMIT: one synchronous commit per task. An underway worker does the same work in one
round trip per task, its completion and its next claim in one statement. With
``async_commit`` the session has ``synchronous_commit=off`` (via PGOPTIONS: no extra round
trip), as underway's ``--async-commit`` workers do.
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import Any, Callable

import psycopg2

from ..harness import Server

FILL = """
INSERT INTO underway.task (job, input)
SELECT 'bench-noop', to_jsonb(g) FROM generate_series(0, %(n)s - 1) AS g;
"""


def script() -> str:
    """The pgbench script: the classic claim-and-complete transaction, four round trips
    (BEGIN, underway's claim, underway's completion, COMMIT) and one commit per task."""
    from underway.store import QUERIES

    def pgbench_sql(text: str) -> str:
        text = text.replace("%(jobs)s", "ARRAY['bench-noop']").replace("%(lease)s", "30")
        text = text.replace("%(token)s", ":token").replace("%(id)s", ":id")
        unknown = re.findall(r"%\(\w+\)s", text)
        if unknown:
            raise ValueError(f"underway's queries take parameters the script lacks: {unknown}")
        # pgbench ends a command at its semicolon: one line per statement keeps it simple.
        return " ".join(line for line in text.split("\n") if not line.startswith("--")).strip()

    # underway's completion, with its claim of a next task turned off (no jobs).
    complete = QUERIES["complete_task"].replace("%(jobs)s", "'{}'::text[]")
    complete = complete.replace("%(next_token)s", "0").replace("%(output)s", "NULL")
    return (
        "\\set token random(1, 9000000000000000000)\n"
        "BEGIN;\n"
        "SELECT id FROM underway.claim_task(ARRAY['bench-noop'], :token, 30, false) \\gset\n"
        f"{pgbench_sql(complete)}\n"
        "COMMIT;\n"
    )


def measure_pgbench(
    server: Server,
    clients: int,
    n: int,
    async_commit: bool = False,
    snapshot: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Run ``n`` claim-and-complete transactions with ``clients`` connections (``-t n/clients``
    each) on ``n`` pending tasks; tasks per second as pgbench reports tps (connection time
    excluded), and a check that every task ended ``succeeded``. ``snapshot(dsn)``, if given,
    is taken just before and just after pgbench runs (``"snapshots"``), for counters."""
    binary = server.pgbench()
    if binary is None:
        raise FileNotFoundError("pgbench not found (pgserver ships it; or put it on PATH)")
    with server.database("pgbench") as dsn:
        import underway

        underway.run_migrations(dsn)
        conn = psycopg2.connect(dsn)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(FILL, {"n": n})
        finally:
            conn.close()
        server.checkpoint()
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"underway-bench-{os.getpid()}.sql")
        with open(path, "w") as f:
            f.write(script())
        env = dict(os.environ)
        if async_commit:
            env["PGOPTIONS"] = "-c synchronous_commit=off"
        per_client = n // clients
        snapshots = [snapshot(dsn)] if snapshot else []
        try:
            out = subprocess.run(
                [
                    str(binary),
                    "-n",
                    "-r",
                    "-c",
                    str(clients),
                    "-j",
                    str(clients),
                    "-t",
                    str(per_client),
                    "-f",
                    path,
                    dsn,
                ],
                env=env,
                capture_output=True,
                text=True,
                check=True,
                timeout=600,
            ).stdout
        finally:
            os.unlink(path)
        if snapshot:
            snapshots.append(snapshot(dsn))
        done = server.fetch("SELECT count(*) FROM underway.task WHERE state = 'succeeded'", dsn)
    tps = float(re.search(r"tps = ([\d.]+) \(without initial connection time\)", out).group(1))
    result = {
        "value": tps,
        "verified_done": int(done[0][0]),
        "transactions": per_client * clients,
        "statement_latencies": _statement_latencies(out),
    }
    if snapshot:
        result["snapshots"] = snapshots
    return result


def _statement_latencies(output: str) -> list[str]:
    """pgbench -r's per-statement latency lines, shortened."""
    lines = output.split("statement latencies in milliseconds", 1)[-1].strip().splitlines()
    return [re.sub(r"\s+", " ", line.strip())[:90] for line in lines[1:] if line.strip()]


ROUND_TRIPS = 4
"""Round trips per pgbench transaction: the script's four SQL commands (``\\set`` runs in the
client), each sent as one simple-protocol query."""
