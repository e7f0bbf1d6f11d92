"""Per-peer adapters for the benchmark harness, and the worker-side task modules they start.

Every adapter implements :class:`bench.harness.Peer`; :data:`PEERS` lists them in report
order. Adapters import their queue library lazily, so a missing library only skips that peer.
"""

from __future__ import annotations

from ..harness import Peer
from .huey_ import HueyPeer
from .pgqueuer_ import PgQueuerPeer
from .procrastinate_ import ProcrastinatePeer
from .rq_ import RqPeer
from .underway_ import UnderwayPeer


def all_peers() -> list[Peer]:
    """One adapter per measured configuration, underway's first."""
    return [
        UnderwayPeer(),
        UnderwayPeer(async_commit=True),
        ProcrastinatePeer(),
        PgQueuerPeer(driver="psycopg", batch_size=None),
        PgQueuerPeer(driver="asyncpg", batch_size=50),
        HueyPeer(),
        RqPeer(simple=False),
        RqPeer(simple=True),
    ]
