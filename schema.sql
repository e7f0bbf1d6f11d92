-- The whole underway schema, for a fresh install or to read in one place.
-- It equals the numbered migrations in underway/migrations/ applied in order
-- (tests/test_migrations.py checks that). Prefer underway.run_migrations(dsn),
-- which also upgrades an existing schema.

-- Bootstrap: the schema and the record of applied migrations.
CREATE SCHEMA IF NOT EXISTS underway;
CREATE TABLE IF NOT EXISTS underway.migration (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- Migration 0001_initial
-- underway 0001: tasks, their attempts, and the wake-up notification.

CREATE TYPE underway.task_state AS ENUM ('pending', 'running', 'succeeded', 'failed', 'cancelled');

-- One row per job run. The row advances in place from step to step: a step's
-- completion rewrites `step` and `input` in the same transaction as the step's
-- own writes, so a completed step can never run again.
CREATE TABLE underway.task (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job text NOT NULL,
    step integer NOT NULL DEFAULT 0 CHECK (step >= 0),
    input jsonb NOT NULL,
    state underway.task_state NOT NULL DEFAULT 'pending',
    -- Higher runs first.
    priority integer NOT NULL DEFAULT 0,
    run_at timestamptz NOT NULL DEFAULT now(),
    -- Tries of the current step that have started, including one running now.
    attempts integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts integer NOT NULL DEFAULT 5 CHECK (max_attempts >= 1),
    -- Set by the claim that made the row 'running': every later write by that
    -- worker is fenced on it, so a worker that lost its task cannot touch it.
    claim_token bigint,
    lease_expires_at timestamptz,
    error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    finished_at timestamptz
);

-- Dequeue: the next ready task, highest priority first, then oldest. Partial, so
-- finished rows, however many, never enter it and the plan needs no statistics.
CREATE INDEX task_ready_idx ON underway.task (priority DESC, run_at, id)
    WHERE state = 'pending';

-- When is the next delayed task due? Idle workers sleep until then.
CREATE INDEX task_due_idx ON underway.task (run_at) WHERE state = 'pending';

-- Running tasks whose lease lapsed, found without touching finished rows.
CREATE INDEX task_lease_idx ON underway.task (lease_expires_at) WHERE state = 'running';

-- Every try of every step, with how it ended.
CREATE TABLE underway.attempt (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id bigint NOT NULL REFERENCES underway.task (id) ON DELETE CASCADE,
    step integer NOT NULL,
    attempt integer NOT NULL,
    outcome text NOT NULL
        CHECK (outcome IN ('succeeded', 'failed', 'crashed', 'interrupted', 'lost')),
    error text,
    traceback text,
    started_at timestamptz,
    finished_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX attempt_task_idx ON underway.attempt (task_id);

-- Wake idle workers once per enqueue statement, whoever inserts (Python, SQL or
-- a trigger). The payload stays empty: NOTIFY is a wake-up, the table is the truth.
CREATE FUNCTION underway.notify_task_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('underway', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER task_inserted AFTER INSERT ON underway.task
    FOR EACH STATEMENT EXECUTE FUNCTION underway.notify_task_inserted();

-- Claim the next ready task of the given jobs, in a transaction of its own.
-- The claim commits asynchronously: losing it in a server crash only forgets
-- that a try began, and the step's own synchronous commit flushes it first.
CREATE FUNCTION underway.claim_task(jobs text[], token bigint, lease_seconds double precision)
RETURNS SETOF underway.task
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    RETURN QUERY
    UPDATE underway.task AS t
    SET state = 'running',
        attempts = t.attempts + 1,
        claim_token = token,
        lease_expires_at = now() + make_interval(secs => lease_seconds),
        started_at = now()
    FROM (
        SELECT id FROM underway.task
        WHERE state = 'pending' AND run_at <= now() AND job = ANY (jobs)
        ORDER BY priority DESC, run_at, id
        LIMIT 1
        -- Workers never wait on each other: a locked row is someone else's claim.
        FOR UPDATE SKIP LOCKED
    ) AS ready
    WHERE t.id = ready.id
    RETURNING t.*;
END;
$$;

INSERT INTO underway.migration (version, name) VALUES (1, 'initial');
