"""Find a database for the examples: ``$DATABASE_URL``, or else a throwaway embedded one.

The embedded server comes from the optional ``pgserver`` package
(``pip install 'underway[embedded]'``); underway itself never needs it.
"""

from __future__ import annotations

import os
import sys
import tempfile


def database_url() -> str:
    """``$DATABASE_URL`` if set; otherwise start an embedded PostgreSQL for this process."""
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    try:
        import pgserver
    except ImportError:
        sys.exit(
            "set DATABASE_URL, or install the embedded server: pip install 'underway[embedded]'"
        )
    data_dir = tempfile.mkdtemp(prefix="underway-example-")
    server = pgserver.get_server(data_dir, cleanup_mode="delete")
    return server.get_uri()
