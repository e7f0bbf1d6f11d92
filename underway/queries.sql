-- Every query underway sends, each headed by its name and what it is for.
-- Named parameters use psycopg2's %(name)s style; `underway/queries.py` loads them.

-- name: enqueue
-- Insert one task and return its id; the insert trigger wakes idle workers.
INSERT INTO underway.task (job, input, priority, run_at, max_attempts)
VALUES (%(job)s, %(input)s::jsonb, %(priority)s,
        now() + make_interval(secs => %(delay)s), %(max_attempts)s)
RETURNING id;

-- name: enqueue_many
-- Insert many tasks of one job in one statement, in the order given.
INSERT INTO underway.task (job, input, priority, run_at, max_attempts)
SELECT %(job)s, item.value, %(priority)s,
       now() + make_interval(secs => %(delay)s), %(max_attempts)s
FROM jsonb_array_elements(%(inputs)s::jsonb) WITH ORDINALITY AS item (value, n)
ORDER BY item.n
RETURNING id;

-- name: claim_task
-- Claim the next ready task of the given jobs (see underway.claim_task in the schema).
SELECT id, job, step, input, attempts, max_attempts, scheduled_at
FROM underway.claim_task(%(jobs)s, %(token)s, %(lease)s);

-- name: seconds_until_due
-- How long until the next pending task of these jobs is due; NULL when there is none.
SELECT extract(epoch FROM run_at - now())::float8
FROM underway.task
WHERE state = 'pending' AND job = ANY (%(jobs)s)
ORDER BY run_at
LIMIT 1;

-- name: complete_task
-- Mark the claimed task succeeded and record the try, fenced on the claim token.
WITH done AS (
    UPDATE underway.task
    SET state = 'succeeded', finished_at = now(), claim_token = NULL,
        lease_expires_at = NULL, error = NULL
    WHERE id = %(id)s AND claim_token = %(token)s AND state = 'running'
    RETURNING id, step, attempts, started_at
)
INSERT INTO underway.attempt (task_id, step, attempt, outcome, started_at)
SELECT id, step, attempts, 'succeeded', started_at FROM done;

-- name: advance_task
-- Move the claimed task on to its next step with the previous step's output,
-- fenced on the claim token. The try of the finished step is recorded.
WITH finished AS (
    SELECT id, step, attempts, started_at FROM underway.task
    WHERE id = %(id)s AND claim_token = %(token)s AND state = 'running'
    FOR UPDATE
), advanced AS (
    UPDATE underway.task AS t
    SET step = t.step + 1, input = %(input)s::jsonb, state = 'pending', attempts = 0,
        max_attempts = %(max_attempts)s, run_at = now() + make_interval(secs => %(delay)s),
        claim_token = NULL, lease_expires_at = NULL, error = NULL, started_at = NULL
    FROM finished
    WHERE t.id = finished.id
    RETURNING t.id
)
INSERT INTO underway.attempt (task_id, step, attempt, outcome, started_at)
SELECT finished.id, finished.step, finished.attempts, 'succeeded', finished.started_at
FROM finished JOIN advanced USING (id);

-- name: fail_task
-- Record a failed try of the claimed task; retry it at the given delay or fail it
-- for good. Fenced on the claim token.
WITH failed AS (
    SELECT id, step, attempts, started_at FROM underway.task
    WHERE id = %(id)s AND claim_token = %(token)s AND state = 'running'
    FOR UPDATE
), updated AS (
    UPDATE underway.task AS t
    SET state = CASE WHEN %(retry)s THEN 'pending' ELSE 'failed' END::underway.task_state,
        run_at = CASE WHEN %(retry)s THEN now() + make_interval(secs => %(delay)s)
                 ELSE t.run_at END,
        finished_at = CASE WHEN %(retry)s THEN NULL ELSE now() END,
        claim_token = NULL, lease_expires_at = NULL, error = %(error)s
    FROM failed
    WHERE t.id = failed.id
    RETURNING t.id
)
INSERT INTO underway.attempt (task_id, step, attempt, outcome, error, traceback, started_at)
SELECT failed.id, failed.step, failed.attempts, %(outcome)s, %(error)s, %(traceback)s,
       failed.started_at
FROM failed JOIN updated USING (id);

-- name: release_task
-- Give back the task a dead worker held. A crash uses up the try (and fails the task
-- when it was the last); an interruption by our own shutdown returns it. Fenced on the
-- claim token, so a task that finished or was reclaimed meanwhile is left alone.
WITH held AS (
    SELECT id, step, attempts, max_attempts, started_at FROM underway.task
    WHERE claim_token = %(token)s AND state = 'running'
    FOR UPDATE
), released AS (
    UPDATE underway.task AS t
    SET state = CASE WHEN %(counts)s AND held.attempts >= held.max_attempts
                     THEN 'failed' ELSE 'pending' END::underway.task_state,
        attempts = CASE WHEN %(counts)s THEN held.attempts ELSE held.attempts - 1 END,
        finished_at = CASE WHEN %(counts)s AND held.attempts >= held.max_attempts
                           THEN now() END,
        run_at = now(), claim_token = NULL, lease_expires_at = NULL, error = %(error)s
    FROM held
    WHERE t.id = held.id
    RETURNING t.id, t.state
), recorded AS (
    INSERT INTO underway.attempt (task_id, step, attempt, outcome, error, started_at)
    SELECT held.id, held.step, held.attempts, %(outcome)s, %(error)s, held.started_at
    FROM held JOIN released USING (id)
)
SELECT id, state::text, pg_notify('underway', '') FROM released;

-- name: renew_leases
-- Extend the leases of the tasks this supervisor's live workers hold.
UPDATE underway.task
SET lease_expires_at = now() + make_interval(secs => %(lease)s)
WHERE state = 'running' AND claim_token = ANY (%(tokens)s);

-- name: reclaim_expired
-- Release running tasks whose lease lapsed: their worker, or its whole host, is gone.
-- The lost try counts, as a crash does.
WITH expired AS (
    SELECT id, step, attempts, max_attempts, started_at FROM underway.task
    WHERE state = 'running' AND lease_expires_at < now()
    ORDER BY lease_expires_at
    LIMIT 100
    FOR UPDATE SKIP LOCKED
), released AS (
    UPDATE underway.task AS t
    SET state = CASE WHEN expired.attempts >= expired.max_attempts
                     THEN 'failed' ELSE 'pending' END::underway.task_state,
        finished_at = CASE WHEN expired.attempts >= expired.max_attempts THEN now() END,
        run_at = now(), claim_token = NULL, lease_expires_at = NULL,
        error = 'lease expired: the worker holding the task stopped renewing it'
    FROM expired
    WHERE t.id = expired.id
    RETURNING t.id
), recorded AS (
    INSERT INTO underway.attempt (task_id, step, attempt, outcome, error, started_at)
    SELECT expired.id, expired.step, expired.attempts, 'lost',
           'lease expired: the worker holding the task stopped renewing it', expired.started_at
    FROM expired JOIN released USING (id)
)
SELECT id, pg_notify('underway', '') FROM released;

-- name: ready_count
-- How many tasks of these jobs are ready to run now.
SELECT count(*) FROM underway.task
WHERE state = 'pending' AND run_at <= now() AND job = ANY (%(jobs)s);

-- name: schema_version
-- The newest migration applied; fails with undefined_table when there is no schema.
SELECT max(version) FROM underway.migration;

-- name: store_schedule
-- Store a job's schedule, or replace it. A changed schedule starts afresh from now;
-- storing the same one again (as an app does at every start) changes nothing, so
-- ticks missed during a deploy are still caught up.
INSERT INTO underway.schedule AS s (job, name, expression, input, catch_up)
VALUES (%(job)s, %(name)s, %(expression)s, %(input)s::jsonb, %(catch_up)s)
ON CONFLICT (job, name) DO UPDATE
SET expression = excluded.expression, input = excluded.input,
    catch_up = excluded.catch_up,
    updated_at = CASE
        WHEN (s.expression, s.input, s.catch_up)
             IS DISTINCT FROM (excluded.expression, excluded.input, excluded.catch_up)
        THEN now() ELSE s.updated_at END;

-- name: remove_schedule
-- Remove a job's schedule; ticks it already fired stay recorded.
DELETE FROM underway.schedule WHERE job = %(job)s AND name = %(name)s;

-- name: load_schedules
-- The schedules of these jobs, each with the instant after which its next tick counts
-- (the later of its last change and its last fired tick), and the database's clock.
SELECT s.job, s.name, s.expression, s.catch_up,
       greatest(s.updated_at, last.fire_at), now()
FROM underway.schedule AS s
LEFT JOIN LATERAL (
    SELECT max(fire_at) AS fire_at FROM underway.schedule_tick AS t
    WHERE t.job = s.job AND t.name = s.name
) AS last ON true
WHERE s.job = ANY (%(jobs)s)
ORDER BY s.job, s.name;

-- name: fire_tick
-- Enqueue one tick of a schedule exactly once (see underway.fire_tick in the schema).
SELECT underway.fire_tick(%(job)s, %(name)s, %(fire_at)s, %(priority)s, %(max_attempts)s);

-- name: skip_tick
-- Record a missed tick as passed over (no task), so it is neither fired nor reported again.
INSERT INTO underway.schedule_tick (job, name, fire_at)
VALUES (%(job)s, %(name)s, %(fire_at)s)
ON CONFLICT DO NOTHING;

-- name: end_sessions_of
-- End the server sessions of a dead child process. PostgreSQL notices a vanished client
-- only when it next talks to it, so a session busy with a long statement would live on,
-- holding its locks and a connection slot.
SELECT pg_terminate_backend(pid)
FROM pg_stat_activity
WHERE application_name = %(application_name)s AND pid <> pg_backend_pid();
