"""underway's benchmark suite (GitHub issue #6): run ``python bench/run.py``."""
