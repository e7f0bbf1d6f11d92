-- underway 0003: task results, absolute run times, abort, retry, rate and concurrency
-- limits, the supervisor registry, per-minute statistics, step names, trace context, and
-- bounds that keep one bad row from failing upkeep for every task.

ALTER TABLE underway.task
    -- What the task's last step returned: its result, kept as long as the task.
    ADD COLUMN output jsonb,
    -- Set by cancel(abort=True) of a running task: the supervisor holding it ends the step.
    ADD COLUMN abort_requested_at timestamptz,
    -- Someone waits on the task's result: its end notifies underway_result.
    ADD COLUMN awaited boolean NOT NULL DEFAULT false,
    -- Tasks sharing a concurrency group run at most underway.concurrency_limit's N at once.
    ADD COLUMN concurrency_group text,
    -- The W3C trace context (traceparent) of the code that enqueued the task, if traced.
    ADD COLUMN trace_context text,
    -- finished_at + keep_for must stay a timestamp: a keep_for of a million years made the
    -- state trigger fail, and with it every statement that touched such a row.
    ADD CONSTRAINT task_keep_for_range
        CHECK (keep_for >= interval '0' AND keep_for <= interval '100 years') NOT VALID;

ALTER TABLE underway.attempt DROP CONSTRAINT attempt_outcome_check;
ALTER TABLE underway.attempt ADD CONSTRAINT attempt_outcome_check
    CHECK (outcome IN (
        'succeeded', 'failed', 'crashed', 'interrupted', 'lost', 'timed_out', 'cancelled',
        'aborted'
    ));

-- Failed and cancelled tasks, newest first: the failures page and `retry --job`.
CREATE INDEX task_failed_idx ON underway.task (finished_at)
    WHERE state IN ('failed', 'cancelled');

-- Running tasks by concurrency group: how many a group has under way.
CREATE INDEX task_group_idx ON underway.task (concurrency_group)
    WHERE concurrency_group IS NOT NULL AND state = 'running';

-- What supervisors register of their jobs: step names, for operators' tools, and the
-- concurrency group their tasks join.
ALTER TABLE underway.job
    ADD COLUMN steps text[] NOT NULL DEFAULT '{}',
    ADD COLUMN concurrency_group text;

-- Per-queue rate limits: a token bucket of `count` tokens, refilled at count per `per`.
-- A claim takes a token; a queue whose bucket is empty is passed over, not waited on.
CREATE TABLE underway.rate_limit (
    queue text PRIMARY KEY,
    count integer NOT NULL CHECK (count >= 1),
    per interval NOT NULL CHECK (per > interval '0' AND per <= interval '1 day'),
    tokens double precision NOT NULL,
    refilled_at timestamptz NOT NULL DEFAULT now()
);

-- The tokens a bucket holds now: what it held, plus the refill since, up to its size.
-- The clock, not now(): a claim may run in a transaction that began long ago.
CREATE FUNCTION underway.rate_tokens(r underway.rate_limit) RETURNS double precision
LANGUAGE sql VOLATILE AS $$
    SELECT least(r.count, r.tokens + greatest(extract(epoch FROM clock_timestamp() - r.refilled_at), 0)
                                     * r.count / extract(epoch FROM r.per))
$$;

-- Concurrency groups: at most max_concurrency of their tasks run at once, on all hosts.
CREATE TABLE underway.concurrency_limit (
    name text PRIMARY KEY,
    max_concurrency integer NOT NULL CHECK (max_concurrency >= 1),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Live supervisors: each writes its row at every lease renewal and deletes it when it
-- stops; one whose heartbeat is old is gone. `workers` is what each worker runs now.
CREATE TABLE underway.supervisor (
    id uuid PRIMARY KEY,
    host text NOT NULL,
    pid integer NOT NULL,
    jobs text[] NOT NULL,
    workers jsonb NOT NULL DEFAULT '[]',
    started_at timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);

-- Tasks finished per minute, queue and job, counted by the workers and added up here in
-- a statement every few seconds: the throughput chart, without counting the task table.
CREATE TABLE underway.minute_stat (
    minute timestamptz NOT NULL,
    queue text NOT NULL,
    job text NOT NULL,
    succeeded integer NOT NULL DEFAULT 0,
    failed integer NOT NULL DEFAULT 0,
    retried integer NOT NULL DEFAULT 0,
    PRIMARY KEY (minute, queue, job)
);

-- Enqueue one task (see 0002), now also at an absolute time (run_at, instead of delay),
-- into a concurrency group, and with the enqueuer's trace context; every argument is
-- bounded, so no value can make a later state change overflow.
DROP FUNCTION underway.enqueue(
    text, jsonb, double precision, integer, integer, text, text, text, text, text, interval
);
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
    keep_for interval DEFAULT NULL,
    run_at timestamptz DEFAULT NULL,
    concurrency_group text DEFAULT NULL,
    trace_context text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    registered underway.job%ROWTYPE;
    found_id bigint;
    found_state underway.task_state;
    found_step integer;
    found_cancelled boolean;
    task_id bigint;
    due timestamptz;
BEGIN
    IF job IS NULL OR btrim(job) = '' THEN
        RAISE EXCEPTION 'underway.enqueue: job must be a job''s name, not %', quote_nullable(job)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF key_mode IS NULL OR key_mode NOT IN ('replace', 'preserve_run_at', 'keep') THEN
        RAISE EXCEPTION 'underway.enqueue: key_mode must be replace, preserve_run_at or keep, not %',
            quote_nullable(key_mode) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF delay IS NULL OR delay < 0 OR delay = 'Infinity' OR delay = 'NaN' OR delay > 3155760000 THEN
        RAISE EXCEPTION 'underway.enqueue: delay must be finite seconds >= 0, at most 100 years, not %',
            quote_nullable(delay) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF run_at IS NOT NULL AND delay <> 0 THEN
        RAISE EXCEPTION 'underway.enqueue: give delay or run_at, not both'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF run_at IN ('infinity', '-infinity') OR run_at > now() + interval '100 years' THEN
        RAISE EXCEPTION 'underway.enqueue: run_at must be within 100 years, not %', run_at
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF btrim(key) = '' OR btrim(queue) = '' OR btrim(serial_queue) = ''
       OR btrim(dead_letter_queue) = '' OR btrim(concurrency_group) = '' THEN
        RAISE EXCEPTION 'underway.enqueue: key, queue, serial_queue, dead_letter_queue and '
            'concurrency_group must be NULL or non-empty names'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF keep_for < interval '0' OR keep_for > interval '100 years' THEN
        RAISE EXCEPTION 'underway.enqueue: keep_for must be from 0 to 100 years, not %', keep_for
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF max_attempts < 1 THEN
        RAISE EXCEPTION 'underway.enqueue: max_attempts must be at least 1, not %', max_attempts
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF pg_column_size(input) > 16777216 THEN
        RAISE EXCEPTION 'underway.enqueue: input is % bytes; the limit is 16 MiB',
            pg_column_size(input) USING ERRCODE = 'program_limit_exceeded';
    END IF;
    SELECT * INTO registered FROM underway.job AS j WHERE j.name = enqueue.job;
    priority := coalesce(priority, registered.priority, 0);
    max_attempts := coalesce(max_attempts, registered.max_attempts, 5);
    queue := coalesce(queue, registered.queue, job);
    dead_letter_queue := coalesce(dead_letter_queue, registered.dead_letter_queue);
    keep_for := coalesce(keep_for, registered.keep_for, interval '14 days');
    concurrency_group := coalesce(concurrency_group, registered.concurrency_group);
    due := coalesce(run_at, now() + make_interval(secs => delay));
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
                        run_at = CASE WHEN key_mode = 'replace' THEN due ELSE t.run_at END
                    WHERE t.id = found_id;
                    PERFORM pg_notify('underway', '');
                END IF;
                RETURN found_id;
            END IF;
        END IF;
        BEGIN
            INSERT INTO underway.task AS t (
                job, input, priority, run_at, max_attempts, queue, serial_queue, key,
                dead_letter_queue, keep_for, concurrency_group, trace_context
            ) VALUES (
                job, input, priority, due, max_attempts, queue, serial_queue, key,
                dead_letter_queue, keep_for, concurrency_group, trace_context
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

-- Claim the next ready task of the given jobs (see 0002), now also honouring rate limits
-- and concurrency groups. While no limit exists (the usual case) the claim is 0002's one
-- statement. Otherwise queues whose bucket is empty and groups that are full are passed
-- over, never waited on, so a limited queue never holds up the others. A candidate's
-- group row (and bucket row) is locked before its room is counted, and each statement
-- here sees what committed before it began, so two workers never both take a group's
-- last place, on any host; a task whose lease is being reclaimed still counts, as it is
-- still running.
DROP FUNCTION underway.claim_task(text[], bigint, double precision, boolean);
CREATE FUNCTION underway.claim_task(
    jobs text[], token bigint, lease_seconds double precision, async_claim boolean DEFAULT true
)
RETURNS SETOF underway.task
LANGUAGE plpgsql
SET enable_sort = off
AS $$
DECLARE
    empty_queues text[];
    full_groups text[];
    candidate record;
    room integer;
BEGIN
    IF cardinality(jobs) IS NOT DISTINCT FROM 0 OR jobs IS NULL THEN
        RETURN;  -- nothing to claim: do not walk the queue to find so
    END IF;
    IF async_claim THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM underway.rate_limit)
       AND NOT EXISTS (SELECT 1 FROM underway.concurrency_limit) THEN
        RETURN QUERY
        UPDATE underway.task AS t
        SET state = 'running',
            attempts = t.attempts + 1,
            claim_token = token,
            -- The clock, not now(): a claim made in the transaction that recorded the
            -- previous task began with that task's step.
            lease_expires_at = clock_timestamp() + make_interval(secs => lease_seconds),
            started_at = clock_timestamp()
        FROM (
            SELECT c.id FROM underway.task AS c
            WHERE c.state = 'pending' AND c.run_at <= now() AND c.job = ANY (jobs)
              AND NOT EXISTS (
                  SELECT 1 FROM underway.paused_queue AS p
                  WHERE p.queue = coalesce(c.queue, c.job)
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
        RETURN;
    END IF;
    empty_queues := ARRAY(
        SELECT r.queue FROM underway.rate_limit AS r WHERE underway.rate_tokens(r) < 1
    );
    full_groups := ARRAY(
        SELECT g.name FROM underway.concurrency_limit AS g
        WHERE (SELECT count(*) FROM underway.task AS r
               WHERE r.concurrency_group = g.name AND r.state = 'running')
              >= g.max_concurrency
    );
    LOOP
        SELECT l.id, coalesce(l.queue, l.job) AS queue, l.concurrency_group INTO candidate
        FROM underway.task AS l
        WHERE l.state = 'pending' AND l.run_at <= now() AND l.job = ANY (jobs)
          AND coalesce(l.queue, l.job) <> ALL (empty_queues)
          AND (l.concurrency_group IS NULL OR l.concurrency_group <> ALL (full_groups))
          AND NOT EXISTS (
              SELECT 1 FROM underway.paused_queue AS p WHERE p.queue = coalesce(l.queue, l.job)
          )
          AND (l.serial_queue IS NULL OR NOT EXISTS (
              SELECT 1 FROM underway.task AS s
              WHERE s.serial_queue = l.serial_queue AND s.id <> l.id
                AND s.state IN ('pending', 'running')
                AND (s.state = 'running' OR s.step > 0
                     OR (l.step = 0 AND s.run_at <= now()
                         AND (s.priority > l.priority
                              OR (s.priority = l.priority
                                  AND (s.run_at, s.id) < (l.run_at, l.id)))))
          ))
        ORDER BY l.priority DESC, l.run_at, l.id
        LIMIT 1
        FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        IF candidate.concurrency_group IS NOT NULL THEN
            SELECT g.max_concurrency INTO room FROM underway.concurrency_limit AS g
            WHERE g.name = candidate.concurrency_group
            FOR UPDATE;
            IF FOUND AND room <= (
                SELECT count(*) FROM underway.task AS r
                WHERE r.concurrency_group = candidate.concurrency_group AND r.state = 'running'
            ) THEN
                full_groups := full_groups || candidate.concurrency_group;
                CONTINUE;
            END IF;
        END IF;
        -- Take a token; the condition is checked again on the row as any concurrent
        -- claim left it, so a bucket is never overdrawn.
        UPDATE underway.rate_limit AS r
        SET tokens = underway.rate_tokens(r) - 1, refilled_at = clock_timestamp()
        WHERE r.queue = candidate.queue AND underway.rate_tokens(r) >= 1;
        IF NOT FOUND AND EXISTS (
            SELECT 1 FROM underway.rate_limit AS r WHERE r.queue = candidate.queue
        ) THEN
            empty_queues := empty_queues || candidate.queue;
            CONTINUE;
        END IF;
        RETURN QUERY
        UPDATE underway.task AS t
        SET state = 'running',
            attempts = t.attempts + 1,
            claim_token = token,
            lease_expires_at = clock_timestamp() + make_interval(secs => lease_seconds),
            started_at = clock_timestamp()
        WHERE t.id = candidate.id
        RETURNING t.*;
        RETURN;
    END LOOP;
END;
$$;

-- Every change of a task's state outside a claim passes through here (see 0002); now a
-- keep_for beyond its bounds (from a row older than the check) is cut to 100 years rather
-- than overflowing, and a task someone waits on announces its end on underway_result.
CREATE OR REPLACE FUNCTION underway.task_state_changed() RETURNS trigger
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
            ELSE NEW.finished_at + least(greatest(NEW.keep_for, interval '0'),
                                         interval '100 years') END;
        IF NEW.awaited THEN
            PERFORM pg_notify('underway_result', NEW.id::text);
        END IF;
    END IF;
    RETURN NEW;
END;
$$;
