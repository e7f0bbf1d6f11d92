-- underway 0004: fixes found by operating 0003. Supervisors say for themselves how long
-- they count as alive; a legacy keep_for can no longer fail an UPDATE; the input bound is
-- on the JSON text; tasks queued before their job joined a concurrency group are counted
-- in it; a completion locks its task before claiming the next, so limits cannot deadlock.

-- How long a supervisor counts as alive after its heartbeat, by its own lease: during a
-- rolling deploy supervisors may run with different leases, and none may judge another by
-- its own.
ALTER TABLE underway.supervisor
    ADD COLUMN alive_until timestamptz NOT NULL DEFAULT now() + interval '30 seconds';

-- 0003 added the keep_for bounds NOT VALID, and PostgreSQL checks even a NOT VALID
-- constraint on every UPDATE of a row: a legacy row beyond them failed its claim, its
-- lease renewal and the reclaim of every lapsed lease beside it. Any UPDATE now brings
-- such a row within bounds first (BEFORE triggers run in name order, before the check),
-- and the rows there are brought within them now, so the check holds for every row.
CREATE FUNCTION underway.task_keep_for_clamped() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.keep_for := least(greatest(NEW.keep_for, interval '0'), interval '100 years');
    RETURN NEW;
END;
$$;

CREATE TRIGGER task_keep_for_clamped BEFORE UPDATE ON underway.task
    FOR EACH ROW
    WHEN (NEW.keep_for < interval '0' OR NEW.keep_for > interval '100 years')
    EXECUTE FUNCTION underway.task_keep_for_clamped();

UPDATE underway.task SET keep_for = keep_for
WHERE keep_for < interval '0' OR keep_for > interval '100 years';

ALTER TABLE underway.task VALIDATE CONSTRAINT task_keep_for_range;

-- Enqueue one task (see 0003); the 16 MiB bound is now measured on the input's JSON text.
CREATE OR REPLACE FUNCTION underway.enqueue(
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
    -- The bound is on the JSON text, not on how PostgreSQL stores it: a value read from a
    -- table arrives compressed. No compressor PostgreSQL uses packs JSON a thousandfold,
    -- so only a value stored in over 16 kB can be over 16 MiB as text.
    IF pg_column_size(input) > 16384 AND octet_length(input::text) > 16777216 THEN
        RAISE EXCEPTION 'underway.enqueue: input is % bytes of JSON; the limit is 16 MiB',
            octet_length(input::text) USING ERRCODE = 'program_limit_exceeded';
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

-- Claim the next ready task (see 0003). A task queued before its job was registered with a
-- concurrency group (from SQL before the first supervisor, or by an older deploy) carries
-- no group: it now joins its job's group when claimed, and counts from then on.
CREATE OR REPLACE FUNCTION underway.claim_task(
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
        SELECT l.id, coalesce(l.queue, l.job) AS queue,
               coalesce(l.concurrency_group, j.concurrency_group) AS concurrency_group
        INTO candidate
        FROM underway.task AS l
        LEFT JOIN underway.job AS j ON j.name = l.job AND l.concurrency_group IS NULL
        WHERE l.state = 'pending' AND l.run_at <= now() AND l.job = ANY (jobs)
          AND coalesce(l.queue, l.job) <> ALL (empty_queues)
          AND (coalesce(l.concurrency_group, j.concurrency_group) IS NULL
               OR coalesce(l.concurrency_group, j.concurrency_group) <> ALL (full_groups))
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
        FOR UPDATE OF l SKIP LOCKED;
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
            started_at = clock_timestamp(),
            concurrency_group = candidate.concurrency_group
        WHERE t.id = candidate.id
        RETURNING t.*;
        RETURN;
    END LOOP;
END;
$$;

-- Claim a worker's next task in the statement that records its current one (the fused
-- completion). The current task's row is locked first: a claim may wait on a rate or
-- concurrency limit's row, and must not while its transaction has yet to lock its own
-- task, which another claim may hold (it locked the row, found it running already, and
-- keeps the lock until it commits) while waiting on the limit's row this one holds.
CREATE FUNCTION underway.claim_after(
    current_id bigint, current_token bigint, jobs text[], token bigint,
    lease_seconds double precision
)
RETURNS SETOF underway.task
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM underway.task AS t
    WHERE t.id = current_id AND t.claim_token = current_token AND t.state = 'running'
    FOR UPDATE;
    RETURN QUERY SELECT * FROM underway.claim_task(jobs, token, lease_seconds, false);
END;
$$;
