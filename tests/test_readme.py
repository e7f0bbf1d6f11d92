"""Every code sample in README.rst is run, or checked against the file it quotes.

- ``python`` and ``sql`` code blocks run in order, as one program, against a fresh database
  (the README's example DSN is replaced by the test database's); the ``test_*`` functions
  they define are then called as pytest would, and every task the samples enqueued is run
  to the end with ``underway.testing.drain``: none may fail.
- A block preceded by the comment ``.. readme-quote: PATH`` must appear, line for line, in
  that file, which its own tests run (the Flask app).
- Every ``python -m underway.<tool> ...`` command line in any block must be accepted by
  that tool's argument parser.
"""

from __future__ import annotations

import re
import shlex
import textwrap
from dataclasses import dataclass

import pytest

from underway import cli, migrations, run
from underway.web import __main__ as web_main

from .helpers import REPO_ROOT, run_python

README = REPO_ROOT / "README.rst"
EXAMPLE_DSN = "postgresql://app@localhost/app"

#: What the README's reader has already: their send_email, their own connection, the
#: receipts table the two-step job writes to.
PRELUDE = """
import os, psycopg2
dsn = os.environ["DATABASE_URL"]
underway_prelude = psycopg2.connect(dsn)
underway_prelude.autocommit = True
underway_prelude.cursor().execute("CREATE TABLE receipts (order_id int, key text)")
pg_conn = psycopg2.connect(dsn)
sent = []
def send_email(key):
    sent.append(key)
"""

EPILOGUE = """
import underway.testing
def reset():
    underway_prelude.cursor().execute("TRUNCATE underway.task CASCADE")
for name, value in list(globals().items()):
    if name.startswith("test_") and callable(value):
        reset()
        value()
        print("passed", name)
underway.testing.drain()
cur = underway_prelude.cursor()
cur.execute("SELECT job, state::text, error FROM underway.task WHERE state <> 'succeeded'")
leftover = cur.fetchall()
assert all(state in ("cancelled", "pending") for _, state, _ in leftover), leftover
print("README samples ran; emails sent:", len(sent))
"""


@dataclass
class Block:
    """One code block of the README: its language (``""`` for a literal ``::`` block), its
    text, the line it starts on, and the file it says it quotes."""

    language: str
    code: str
    line: int
    quotes: str | None = None


def readme_blocks() -> list[Block]:
    """Every code block and literal block of README.rst, in order."""
    lines = README.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    quote: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        directive = re.match(r"\.\. code-block:: *(\w*)", line)
        marker = re.match(r"\.\. readme-quote: *(\S+)", line)
        if marker:
            quote = marker[1]
        if directive or (line.rstrip().endswith("::") and not line.startswith("..")):
            start = i + 1
            while start < len(lines) and not lines[start].strip():
                start += 1
            end = start
            while end < len(lines) and (not lines[end].strip() or lines[end].startswith(" ")):
                end += 1
            code = textwrap.dedent("\n".join(lines[start:end])).strip("\n")
            language = directive[1] if directive else ""
            blocks.append(Block(language, code, start + 1, quote if directive else None))
            quote = None
            i = end
            continue
        i += 1
    return blocks


def test_the_readme_has_the_samples_this_file_expects() -> None:
    """The parser finds the README's samples: a guard against it silently finding none."""
    languages = [block.language for block in readme_blocks()]
    assert languages.count("python") >= 10
    assert "sql" in languages and "console" in languages


@pytest.mark.timeout(120)
def test_python_and_sql_samples_run_in_order(dsn: str) -> None:
    """The README's Python and SQL samples run top to bottom on a fresh database; the tests
    they show pass; every task they enqueue then runs without failing."""
    parts = [PRELUDE]
    for block in readme_blocks():
        if block.quotes:
            continue
        if block.language == "python":
            parts.append(f"# README line {block.line}\n{block.code}")
        elif block.language == "sql":
            for statement in filter(str.strip, block.code.split(";")):
                parts.append(f"underway_prelude.cursor().execute({statement.strip()!r})")
    program = "\n\n".join([*parts, EPILOGUE]).replace(EXAMPLE_DSN, dsn)
    result = run_python(program, env={"DATABASE_URL": dsn}, timeout=100)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed test_receipt_is_generated_once" in result.stdout
    assert "passed test_an_enqueued_task_runs" in result.stdout
    assert "README samples ran" in result.stdout


@pytest.mark.parametrize(
    "block", [b for b in readme_blocks() if b.quotes], ids=lambda b: f"line{b.line}"
)
def test_quoted_samples_match_their_files(block: Block) -> None:
    """A sample quoted from a file appears in it line for line, so the file's own tests
    (tests/test_flask_example.py for the Flask app) run the code the README shows."""
    source = [line.strip() for line in (REPO_ROOT / str(block.quotes)).read_text().splitlines()]
    wanted = [line.strip() for line in block.code.splitlines()]
    starts = [i for i, line in enumerate(source) if line == wanted[0]]
    assert any(source[i : i + len(wanted)] == wanted for i in starts), block.code


PARSERS = {
    "underway.supervisor": run.parse_args,
    "underway.admin": cli.parse_args,
    "underway.web": web_main.parse_args,
}


def command_lines() -> list[tuple[int, str, list[str]]]:
    """Every ``python -m underway.<tool> ARGS`` in the README: (line, tool, ARGS)."""
    found = []
    for block in readme_blocks():
        text = block.code.replace("\\\n", " ")
        for line in text.splitlines():
            match = re.search(r"python -m (underway\.\w+)(.*)", line)
            if match:
                args = shlex.split(match[2].split("#")[0])
                found.append((block.line, match[1], args))
    return found


def test_the_readme_shows_every_tool() -> None:
    """The README shows the supervisor, the admin tool, the dashboard and the migrations
    command."""
    tools = {tool for _, tool, _ in command_lines()}
    assert tools == {"underway.supervisor", "underway.admin", "underway.web", "underway.migrations"}


@pytest.mark.parametrize("line, tool, args", command_lines(), ids=lambda v: str(v))
def test_command_lines_are_accepted(line: int, tool: str, args: list[str]) -> None:
    """Each command line shown parses with its tool's real argument parser."""
    if tool == "underway.migrations":
        assert set(args) <= {"--dsn", EXAMPLE_DSN}, args  # all migrations.main accepts
        assert callable(migrations.main)
        return
    PARSERS[tool](args)
