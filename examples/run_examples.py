"""Run every example against one database: ``$DATABASE_URL``, else an embedded PostgreSQL.

python examples/run_examples.py

The Flask app's demo runs too when Flask, SQLAlchemy and gunicorn are installed
(``pip install -e '.[flask]'``); otherwise it is skipped with that hint.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from embedded import database_url

EXAMPLES = ["welcome_email.py", "order_receipts.py"]
FLASK_DEMO = "flask_app/demo.py"
FLASK_NEEDS = ["flask", "sqlalchemy", "gunicorn"]


def run(path: Path, env: dict[str, str]) -> None:
    """Run one example script; exit with an error if it fails."""
    done = subprocess.run([sys.executable, str(path)], env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"{path.name} failed with exit status {done.returncode}")


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    env = dict(os.environ, DATABASE_URL=database_url())
    for name in EXAMPLES:
        print(f"== {name}", flush=True)
        run(here / name, env)
    missing = [name for name in FLASK_NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        print(f"== {FLASK_DEMO} skipped: needs {', '.join(missing)}: pip install -e '.[flask]'")
    else:
        print(f"== {FLASK_DEMO}", flush=True)
        run(here / FLASK_DEMO, env)
    print("== all examples ran")
