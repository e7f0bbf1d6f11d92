"""The ceiling: pgbench (C, libpq) running underway's claim-and-complete transaction shape
on a pre-filled ``underway.task``.

The script is generated from ``underway/queries.sql``, so it sends the very statements an
underway worker sends for a no-op task, one round trip each: ``claim_task`` (the claim
``UPDATE ... FROM (SELECT ... WHERE state = 'pending' ORDER BY priority DESC, run_at, id
LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING``, committed asynchronously, as underway does), then
``complete_task`` (the fenced UPDATE and the attempt INSERT, committed synchronously). With
``async_commit`` the session has ``synchronous_commit=off`` (via PGOPTIONS: no extra round
trip), as underway's ``--async-commit`` workers do.
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import Any

import psycopg2

from ..harness import Server

FILL = """
INSERT INTO underway.task (job, input)
SELECT 'bench-noop', to_jsonb(g) FROM generate_series(0, %(n)s - 1) AS g;
"""


def script() -> str:
    """The pgbench script: underway's claim_task and complete_task with pgbench variables."""
    from underway.queries import QUERIES

    def pgbench_sql(text: str) -> str:
        text = text.replace("%(jobs)s", "ARRAY['bench-noop']").replace("%(lease)s", "30")
        text = text.replace("%(token)s", ":token").replace("%(id)s", ":id")
        unknown = re.findall(r"%\(\w+\)s", text)
        if unknown:
            raise ValueError(f"underway's queries take parameters the script lacks: {unknown}")
        # pgbench ends a command at its semicolon: one line per statement keeps it simple.
        return " ".join(line for line in text.split("\n") if not line.startswith("--")).strip()

    claim = pgbench_sql(QUERIES["claim_task"]).rstrip(";")
    # Only the id is needed (and pgbench's \gset refuses NULL columns such as scheduled_at).
    claim = re.sub(r"^SELECT .*? FROM", "SELECT id FROM", claim)
    return (
        "\\set token random(1, 9000000000000000000)\n"
        f"{claim} \\gset\n"
        f"{pgbench_sql(QUERIES['complete_task'])}\n"
    )


def measure_pgbench(
    server: Server, clients: int, n: int, async_commit: bool = False
) -> dict[str, Any]:
    """Run ``n`` claim-and-complete transactions with ``clients`` connections (``-t n/clients``
    each) on ``n`` pending tasks; tasks per second as pgbench reports tps (connection time
    excluded), and a check that every task ended ``succeeded``."""
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
        done = server.fetch("SELECT count(*) FROM underway.task WHERE state = 'succeeded'", dsn)
    tps = float(re.search(r"tps = ([\d.]+) \(without initial connection time\)", out).group(1))
    return {
        "value": tps,
        "verified_done": int(done[0][0]),
        "transactions": per_client * clients,
        "statement_latencies": _statement_latencies(out),
    }


def _statement_latencies(output: str) -> list[str]:
    """pgbench -r's per-statement latency lines, shortened."""
    lines = output.split("statement latencies in milliseconds", 1)[-1].strip().splitlines()
    return [re.sub(r"\s+", " ", line.strip())[:90] for line in lines[1:] if line.strip()]


ROUND_TRIPS = 2
"""Round trips per pgbench transaction: the script's two SQL commands (``\\set`` runs in the
client), each sent as one simple-protocol query."""
