-- underway 0001: tasks, their attempts, the wake-up notification, and cron schedules.

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
    -- The fire time of a task enqueued by a schedule (NULL for other tasks).
    scheduled_at timestamptz,
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
-- With sorting off, the only cheap plan is to walk task_ready_idx in order and stop
-- at the first row: the plan no longer depends on statistics, which on a busy
-- queue are always stale (a planner that believes few rows are due would sort
-- them all on every claim).
CREATE FUNCTION underway.claim_task(jobs text[], token bigint, lease_seconds double precision)
RETURNS SETOF underway.task
LANGUAGE plpgsql
SET enable_sort = off
AS $$
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

-- A job's schedules, by name. Stored or replaced by job.schedule(...); schedulers
-- reload them when notified, so changes apply without a restart.
CREATE TABLE underway.schedule (
    job text NOT NULL,
    name text NOT NULL DEFAULT 'default',
    expression text NOT NULL,
    input jsonb NOT NULL,
    -- After an outage: fire the most recent missed tick once (true), or skip to the next.
    catch_up boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- Ticks at or before this instant never fire: a schedule has no past.
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job, name)
);

-- One row per tick handled: fired (with its task) or passed over after an outage
-- (task_id NULL). The primary key, not a lock, is what makes a tick fire once however
-- many schedulers run, on however many hosts, across restarts.
CREATE TABLE underway.schedule_tick (
    job text NOT NULL,
    name text NOT NULL,
    fire_at timestamptz NOT NULL,
    -- No foreign key: the task may be deleted by retention while the tick stays.
    task_id bigint,
    handled_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job, name, fire_at)
);

-- Tell running schedulers to reload when a schedule is stored, replaced or removed.
CREATE FUNCTION underway.notify_schedule_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('underway_schedule', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER schedule_changed AFTER INSERT OR UPDATE OR DELETE ON underway.schedule
    FOR EACH STATEMENT EXECUTE FUNCTION underway.notify_schedule_changed();

-- Fire one tick of a schedule: record it, then enqueue the schedule's stored input.
-- Returns the new task's id, or NULL when the tick was fired already (by any
-- scheduler), the schedule is gone, or the tick is older than the schedule itself.
CREATE FUNCTION underway.fire_tick(
    p_job text, p_name text, p_fire_at timestamptz, p_priority integer, p_max_attempts integer
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    new_id bigint;
BEGIN
    INSERT INTO underway.schedule_tick (job, name, fire_at)
    VALUES (p_job, p_name, p_fire_at)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    INSERT INTO underway.task (job, input, priority, max_attempts, scheduled_at)
    SELECT job, input, p_priority, p_max_attempts, p_fire_at
    FROM underway.schedule
    WHERE job = p_job AND name = p_name AND updated_at < p_fire_at
    RETURNING id INTO new_id;
    IF new_id IS NULL THEN
        DELETE FROM underway.schedule_tick
        WHERE job = p_job AND name = p_name AND fire_at = p_fire_at;
        RETURN NULL;
    END IF;
    UPDATE underway.schedule_tick SET task_id = new_id
    WHERE job = p_job AND name = p_name AND fire_at = p_fire_at;
    RETURN new_id;
END;
$$;
