"""``python -m underway.web``: serve the dashboard.

It listens on 127.0.0.1 unless told otherwise, and refuses any other address unless a
password is set in ``$UNDERWAY_WEB_PASSWORD`` (then every page asks for it, with HTTP
basic auth). A ``--dsn`` given on the command line is moved into the environment at once
(the process starts itself again, same pid), so ``ps`` never shows its password.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import psycopg2

from ..db import check_schema, close_quietly, connect, hidden_dsn, hide_dsn_argument, resolve_dsn
from ..errors import UnderwayError

PROG = "python -m underway.web"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line of ``python -m underway.web``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Serve underway's dashboard. Binds to 127.0.0.1 unless --host is given; any other "
            "address needs a password in $UNDERWAY_WEB_PASSWORD (HTTP basic auth)."
        ),
    )
    parser.add_argument("--dsn", help="database (default: $DATABASE_URL)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8088, help="port (default: 8088)")
    parser.add_argument(
        "--read-only", action="store_true", help="hide the actions and refuse their POSTs"
    )
    return parser.parse_args(argv)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return value


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    from . import PASSWORD_ENV, create_app

    if argv is None:
        hide_dsn_argument("underway.web", sys.argv[1:])
    args = parse_args(argv)
    password = os.environ.get(PASSWORD_ENV) or None
    if not is_loopback(args.host) and not password:
        print(
            f"underway web: refusing to listen on {args.host}, which other machines can reach, "
            f"without a password: set {PASSWORD_ENV}, or use --host 127.0.0.1",
            file=sys.stderr,
        )
        return 2
    try:
        dsn = resolve_dsn(args.dsn or hidden_dsn())
        conn = connect(dsn, application_name="underway web")
        try:
            check_schema(conn)
        finally:
            close_quietly(conn)
    except (UnderwayError, psycopg2.Error) as exc:
        print(f"underway web: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1

    from werkzeug.serving import make_server

    import underway

    underway.configure(dsn=dsn)  # this process is the dashboard's own: metrics use it too
    app = create_app(dsn=dsn, read_only=args.read_only, password=password)
    try:
        server = make_server(args.host, args.port, app, threaded=True)
    except OSError as exc:
        print(f"underway web: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _stop)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    notes = [name for name, on in (("read-only", args.read_only), ("password", password)) if on]
    extra = f" ({', '.join(notes)})" if notes else ""
    print(f"underway web: serving http://{shown}:{server.port}/{extra}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _stop(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
