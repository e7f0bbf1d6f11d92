"""The dashboard's template filters: :mod:`underway.display`'s functions, by name."""

from __future__ import annotations

from flask import Flask

from ..display import ago, between, clip, compact, count, duration, exact, first_line, iso, pretty


def install(app: Flask) -> None:
    """Make these the templates' filters."""
    app.jinja_env.filters.update(
        ago=ago,
        exact=exact,
        iso=iso,
        duration=duration,
        pretty=pretty,
        compact=compact,
        clip=clip,
        first_line=first_line,
        count=count,
    )
    app.jinja_env.globals["between"] = between
