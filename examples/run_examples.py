"""Run every example against one database: ``$DATABASE_URL``, else an embedded PostgreSQL.

python examples/run_examples.py
"""

import os
import subprocess
import sys
from pathlib import Path

from embedded import database_url

EXAMPLES = ["welcome_email.py", "order_receipts.py"]

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    env = dict(os.environ, DATABASE_URL=database_url())
    for name in EXAMPLES:
        print(f"== {name}", flush=True)
        done = subprocess.run([sys.executable, str(here / name)], env=env, check=False)
        if done.returncode != 0:
            sys.exit(f"{name} failed with exit status {done.returncode}")
    print("== all examples ran")
