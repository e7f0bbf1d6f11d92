"""Packaging for underway: durable multi-step background jobs on PostgreSQL."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="underway",
    version="0.1.0",
    description="Durable multi-step background jobs on PostgreSQL for synchronous Python.",
    long_description=Path(__file__).with_name("README.rst").read_text(encoding="utf-8"),
    long_description_content_type="text/x-rst",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["underway", "underway.*"]),
    package_data={
        "underway": [
            "py.typed",
            "*.sql",
            "migrations/*.sql",
            "web/templates/*.html",
            "web/static/*",
        ]
    },
    install_requires=[
        "psycopg2-binary>=2.9",
        "croniter>=2.0",
        "python-dateutil>=2.8",
    ],
    entry_points={"console_scripts": ["underway = underway.cli:main"]},
    extras_require={
        # An embedded PostgreSQL for the examples and the test suite; never needed at run time.
        "embedded": ["pgserver>=0.1.4"],
        # The dashboard: python -m underway.web, or underway.web.create_app() in your app.
        "web": ["flask>=2.2"],
        # Prometheus metrics: --metrics-port on the supervisor, /metrics on the dashboard.
        "metrics": ["prometheus-client>=0.17"],
        # OpenTelemetry spans for each enqueue and each try of a step.
        "otel": ["opentelemetry-api>=1.20"],
        # The optional SQLAlchemy integration and the Flask example app.
        "flask": ["flask>=2.2", "sqlalchemy>=2.0", "gunicorn>=21"],
        "test": [
            "pgserver>=0.1.4",
            "psutil>=5",
            "pytest>=7",
            "pytest-timeout>=2",
            "pytest-xdist>=3",
            "ruff>=0.6",
            "flask>=2.2",
            "sqlalchemy>=2.0",
            "gunicorn>=21",
            "selenium>=4.10",
            "prometheus-client>=0.17",
            "opentelemetry-api>=1.20",
            "opentelemetry-sdk>=1.20",
        ],
        # bench/: the peers measured side by side with underway, and the chart.
        "bench": [
            "pgserver>=0.1.4",
            "psutil>=5",
            "matplotlib>=3.7",
            "procrastinate>=2",
            "psycopg[binary,pool]>=3.1",
            "pgqueuer>=0.10",
            "asyncpg>=0.29",
            "huey>=2.5",
            "peewee>=3.17",
            "rq>=1.16",
            "redis>=5",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Topic :: Database",
        "Topic :: System :: Distributed Computing",
    ],
)
