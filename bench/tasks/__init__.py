"""Worker-side task modules, one per peer, imported by the peers' worker processes.

They import nothing of the harness, so that worker start-up and memory carry only the queue
library, the no-op task and :mod:`bench.probe`. Each reads its database from ``$BENCH_DSN``.
"""
