-- underway 0002: queues and pausing, serial queues, job keys, dead-letter queues,
-- cancellation, timeouts, retention, the job registry and enqueue from SQL.

ALTER TABLE underway.task
    -- The queue a task belongs to: the unit of pausing. NULL (as for tasks inserted by
    -- hand, or before this migration) means the queue named after the task's job.
    ADD COLUMN queue text,
    -- Tasks sharing a serial queue run one at a time, in dequeue order.
    ADD COLUMN serial_queue text,
    -- A job key: at most one pending or running task of a job holds a given key.
    ADD COLUMN key text,
    -- Where the task goes when it fails for good; NULL: it just fails.
    ADD COLUMN dead_letter_queue text,
    -- How long a finished task is kept; retention deletes it at expires_at.
    ADD COLUMN keep_for interval NOT NULL DEFAULT interval '14 days',
    ADD COLUMN expires_at timestamptz,
    -- Set by a cancel() of a running task: it stops at the next step boundary.
    ADD COLUMN cancel_requested_at timestamptz;

-- Tasks finished before retention existed expire on the default schedule.
UPDATE underway.task SET expires_at = finished_at + keep_for
WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished_at IS NOT NULL;

CREATE UNIQUE INDEX task_key_idx ON underway.task (job, key)
    WHERE key IS NOT NULL AND state IN ('pending', 'running');

CREATE INDEX task_serial_idx ON underway.task (serial_queue, priority DESC, run_at, id)
    WHERE serial_queue IS NOT NULL AND state IN ('pending', 'running');

CREATE INDEX task_expires_idx ON underway.task (expires_at) WHERE expires_at IS NOT NULL;

CREATE INDEX task_dead_letter_idx ON underway.task (dead_letter_queue, id)
    WHERE dead_letter_queue IS NOT NULL AND state = 'failed';

-- A try ends when its outcome is recorded, not when its transaction began (now()).
ALTER TABLE underway.attempt ALTER COLUMN finished_at SET DEFAULT clock_timestamp();

ALTER TABLE underway.attempt DROP CONSTRAINT attempt_outcome_check;
ALTER TABLE underway.attempt ADD CONSTRAINT attempt_outcome_check
    CHECK (outcome IN (
        'succeeded', 'failed', 'crashed', 'interrupted', 'lost', 'timed_out', 'cancelled'
    ));

-- Queues whose tasks workers leave alone until resumed.
CREATE TABLE underway.paused_queue (
    queue text PRIMARY KEY,
    paused_at timestamptz NOT NULL DEFAULT now()
);

-- The jobs supervisors run, with the defaults their tasks take: what enqueue from SQL
-- (underway.enqueue) and the scheduler use. Supervisors store their jobs at start.
CREATE TABLE underway.job (
    name text PRIMARY KEY,
    queue text NOT NULL,
    priority integer NOT NULL DEFAULT 0,
    max_attempts integer NOT NULL DEFAULT 5 CHECK (max_attempts >= 1),
    dead_letter_queue text,
    keep_for interval NOT NULL DEFAULT interval '14 days',
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Enqueue one task: from Python with a job key, and from SQL, triggers and other
-- languages:
--     SELECT underway.enqueue('welcome-email', '{"user_id": 42}');
-- Arguments left NULL take the job's registered defaults (underway.job). With a key,
-- a pending task of the job holding it, not yet started, is updated instead ('replace':
-- new input, run time and priority; 'preserve_run_at': new input, same run time), or
-- left alone ('keep'). A task under way (running, or between steps) holding the key
-- gives it up to the new task, except in 'keep' mode, where the enqueue does nothing.
-- Returns the id of the task enqueued or updated.
CREATE FUNCTION underway.enqueue(
    job text,
    input jsonb DEFAULT 'null',
    delay double precision DEFAULT 0,
    priority integer DEFAULT NULL,
    max_attempts integer DEFAULT NULL,
    key text DEFAULT NULL,
    key_mode text DEFAULT 'replace',
    serial_queue text DEFAULT NULL,
    queue text DEFAULT NULL,
    dead_letter_queue text DEFAULT NULL,
    keep_for interval DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    registered underway.job%ROWTYPE;
    found_id bigint;
    found_state underway.task_state;
    found_step integer;
    found_cancelled boolean;
    task_id bigint;
BEGIN
    IF job IS NULL OR btrim(job) = '' THEN
        RAISE EXCEPTION 'underway.enqueue: job must be a job''s name, not %', quote_nullable(job)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF key_mode IS NULL OR key_mode NOT IN ('replace', 'preserve_run_at', 'keep') THEN
        RAISE EXCEPTION 'underway.enqueue: key_mode must be replace, preserve_run_at or keep, not %',
            quote_nullable(key_mode) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF delay IS NULL OR delay < 0 OR delay = 'Infinity' OR delay = 'NaN' THEN
        RAISE EXCEPTION 'underway.enqueue: delay must be finite seconds >= 0, not %',
            quote_nullable(delay) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF btrim(key) = '' OR btrim(queue) = '' OR btrim(serial_queue) = ''
       OR btrim(dead_letter_queue) = '' THEN
        RAISE EXCEPTION 'underway.enqueue: key, queue, serial_queue and dead_letter_queue '
            'must be NULL or non-empty names' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF keep_for < interval '0' THEN
        RAISE EXCEPTION 'underway.enqueue: keep_for must not be negative, not %', keep_for
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF max_attempts < 1 THEN
        RAISE EXCEPTION 'underway.enqueue: max_attempts must be at least 1, not %', max_attempts
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO registered FROM underway.job AS j WHERE j.name = enqueue.job;
    priority := coalesce(priority, registered.priority, 0);
    max_attempts := coalesce(max_attempts, registered.max_attempts, 5);
    queue := coalesce(queue, registered.queue, job);
    dead_letter_queue := coalesce(dead_letter_queue, registered.dead_letter_queue);
    keep_for := coalesce(keep_for, registered.keep_for, interval '14 days');
    LOOP
        IF key IS NOT NULL THEN
            SELECT t.id, t.state, t.step, t.cancel_requested_at IS NOT NULL
            INTO found_id, found_state, found_step, found_cancelled
            FROM underway.task AS t
            WHERE t.job = enqueue.job AND t.key = enqueue.key
              AND t.state IN ('pending', 'running')
            FOR UPDATE;
            -- A task that began (running, or pending between steps) is under way: its input
            -- is a step's output and must not be rewritten. One being cancelled will not do
            -- the work asked for: it gives the key up in every mode.
            IF found_cancelled THEN
                UPDATE underway.task AS t SET key = NULL WHERE t.id = found_id;
            ELSIF found_state = 'running' OR found_step > 0 THEN
                IF key_mode = 'keep' THEN
                    RETURN found_id;
                END IF;
                UPDATE underway.task AS t SET key = NULL WHERE t.id = found_id;
            ELSIF found_state = 'pending' THEN
                IF key_mode <> 'keep' THEN
                    UPDATE underway.task AS t
                    SET input = enqueue.input,
                        priority = enqueue.priority,
                        run_at = CASE WHEN key_mode = 'replace'
                                 THEN now() + make_interval(secs => delay) ELSE t.run_at END
                    WHERE t.id = found_id;
                    PERFORM pg_notify('underway', '');
                END IF;
                RETURN found_id;
            END IF;
        END IF;
        BEGIN
            INSERT INTO underway.task AS t (
                job, input, priority, run_at, max_attempts, queue, serial_queue, key,
                dead_letter_queue, keep_for
            ) VALUES (
                job, input, priority, now() + make_interval(secs => delay), max_attempts,
                queue, serial_queue, key, dead_letter_queue, keep_for
            )
            RETURNING t.id INTO task_id;
            RETURN task_id;
        EXCEPTION WHEN unique_violation THEN
            -- Another transaction enqueued the same key meanwhile: look again.
            NULL;
        END;
    END LOOP;
END;
$$;

-- Claim the next ready task of the given jobs (see 0001): now also skipping paused
-- queues, and a task of a serial queue while another task of that queue is under way
-- (running, or between its steps) or, for a task not yet started, while an earlier
-- ready task waits in front of it. Two workers racing for the same serial queue both
-- aim at its first ready task; its row lock lets one through, and the other sees an
-- earlier ready (or running) task in front of every later one, so a serial queue never
-- has two tasks under way at once.
-- With async_claim (the default, as in 0001), the claim is meant to be a transaction of its
-- own and commits asynchronously; a worker that claims its next task in the transaction that
-- completes the previous one passes false, and the completion's commit stays synchronous.
DROP FUNCTION underway.claim_task(text[], bigint, double precision);
CREATE FUNCTION underway.claim_task(
    jobs text[], token bigint, lease_seconds double precision, async_claim boolean DEFAULT true
)
RETURNS SETOF underway.task
LANGUAGE plpgsql
SET enable_sort = off
AS $$
BEGIN
    IF cardinality(jobs) IS NOT DISTINCT FROM 0 OR jobs IS NULL THEN
        RETURN;  -- nothing to claim: do not walk the queue to find so
    END IF;
    IF async_claim THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    RETURN QUERY
    UPDATE underway.task AS t
    SET state = 'running',
        attempts = t.attempts + 1,
        claim_token = token,
        -- The clock, not now(): a claim made in the transaction that recorded the previous
        -- task began with that task's step.
        lease_expires_at = clock_timestamp() + make_interval(secs => lease_seconds),
        started_at = clock_timestamp()
    FROM (
        SELECT c.id FROM underway.task AS c
        WHERE c.state = 'pending' AND c.run_at <= now() AND c.job = ANY (jobs)
          AND NOT EXISTS (
              SELECT 1 FROM underway.paused_queue AS p WHERE p.queue = coalesce(c.queue, c.job)
          )
          AND (c.serial_queue IS NULL OR NOT EXISTS (
              SELECT 1 FROM underway.task AS s
              WHERE s.serial_queue = c.serial_queue AND s.id <> c.id
                AND s.state IN ('pending', 'running')
                AND (s.state = 'running' OR s.step > 0
                     OR (c.step = 0 AND s.run_at <= now()
                         AND (s.priority > c.priority
                              OR (s.priority = c.priority
                                  AND (s.run_at, s.id) < (c.run_at, c.id)))))
          ))
        ORDER BY c.priority DESC, c.run_at, c.id
        LIMIT 1
        FOR UPDATE SKIP LOCKED
    ) AS ready
    WHERE t.id = ready.id
    RETURNING t.*;
END;
$$;

-- Fire one tick of a schedule (see 0001), now through underway.enqueue so the task
-- takes its job's queue, dead-letter queue and retention.
CREATE OR REPLACE FUNCTION underway.fire_tick(
    p_job text, p_name text, p_fire_at timestamptz, p_priority integer, p_max_attempts integer
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    tick_input jsonb;
    new_id bigint;
BEGIN
    INSERT INTO underway.schedule_tick (job, name, fire_at)
    VALUES (p_job, p_name, p_fire_at)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT s.input INTO tick_input FROM underway.schedule AS s
    WHERE s.job = p_job AND s.name = p_name AND s.updated_at < p_fire_at;
    IF NOT FOUND THEN
        DELETE FROM underway.schedule_tick
        WHERE job = p_job AND name = p_name AND fire_at = p_fire_at;
        RETURN NULL;
    END IF;
    new_id := underway.enqueue(
        p_job, tick_input, priority => p_priority, max_attempts => p_max_attempts
    );
    UPDATE underway.task SET scheduled_at = p_fire_at WHERE id = new_id;
    UPDATE underway.schedule_tick SET task_id = new_id
    WHERE job = p_job AND name = p_name AND fire_at = p_fire_at;
    RETURN new_id;
END;
$$;

-- Every change of a task's state outside a claim passes through here, so the rules
-- hold whichever query (or operator) makes it:
-- - a task whose cancellation was requested while it ran stops at the step boundary:
--   instead of going back to 'pending' (next step, retry, release) it is cancelled;
-- - a finished task expires (retention) keep_for after it finished, except one in a
--   dead-letter queue, which stays until re-driven or deleted;
-- - a task going back to the queue is neither finished nor expiring.
CREATE FUNCTION underway.task_state_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state = 'pending' AND NEW.cancel_requested_at IS NOT NULL THEN
        NEW.state := 'cancelled';
    END IF;
    IF NEW.state = 'pending' THEN
        NEW.finished_at := NULL;
        NEW.expires_at := NULL;
    ELSE
        NEW.finished_at := coalesce(NEW.finished_at, clock_timestamp());
        NEW.expires_at := CASE
            WHEN NEW.state = 'failed' AND NEW.dead_letter_queue IS NOT NULL THEN NULL
            ELSE NEW.finished_at + NEW.keep_for END;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER task_state_changed BEFORE UPDATE OF state ON underway.task
    FOR EACH ROW WHEN (NEW.state <> 'running' AND OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION underway.task_state_changed();
