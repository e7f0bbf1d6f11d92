"""The examples run as the README says, against the test server and against an embedded one."""

from __future__ import annotations

import pytest

from .helpers import REPO_ROOT, run_python, scalar

EXAMPLES = REPO_ROOT / "examples"


@pytest.mark.timeout(120)
def test_examples_run_against_database_url(dsn):
    """`python examples/run_examples.py` runs both examples; every task they enqueue succeeds,
    and the receipt written through the worker's transaction exists once."""
    result = run_python([str(EXAMPLES / "run_examples.py")], env={"DATABASE_URL": dsn}, timeout=100)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Sending welcome email to Ferris <ferris@example.com> (user_id: 42)" in out
    assert "Generated receipts_bucket/42-receipt.pdf" in out
    assert "Emailing receipt for receipts_bucket/42-receipt.pdf (try 2)" in out
    assert "== all examples ran" in out
    assert scalar(dsn, "SELECT count(*) FROM underway.task WHERE state <> 'succeeded'") == 0
    assert scalar(dsn, "SELECT count(*) FROM underway.task") == 2
    assert scalar(dsn, "SELECT count(*) FROM receipts") == 1


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_welcome_email_runs_on_an_embedded_postgres():
    """Without DATABASE_URL an example starts its own embedded PostgreSQL (pgserver)."""
    result = run_python([str(EXAMPLES / "welcome_email.py")], env={}, timeout=100)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Sending welcome email to Ferris" in result.stdout
