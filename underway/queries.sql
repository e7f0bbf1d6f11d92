-- Every query underway sends, each headed by its name and what it is for.
-- Named parameters use psycopg2's %(name)s style; `underway/queries.py` loads them.

-- name: enqueue
-- Insert one task and return its id; the insert trigger wakes idle workers.
INSERT INTO underway.task (job, input, priority, run_at, max_attempts, queue, serial_queue,
                           dead_letter_queue, keep_for)
VALUES (%(job)s, %(input)s::jsonb, %(priority)s,
        now() + make_interval(secs => %(delay)s), %(max_attempts)s, %(queue)s,
        %(serial_queue)s, %(dead_letter_queue)s, make_interval(secs => %(keep_for)s))
RETURNING id;

-- name: enqueue_keyed
-- Enqueue one task with a job key (see underway.enqueue in the schema).
SELECT underway.enqueue(
    %(job)s, %(input)s::jsonb, %(delay)s, %(priority)s, %(max_attempts)s, %(key)s,
    %(key_mode)s, %(serial_queue)s, %(queue)s, %(dead_letter_queue)s,
    make_interval(secs => %(keep_for)s)
);

-- name: enqueue_many
-- Insert many tasks of one job in one statement, in the order given.
INSERT INTO underway.task (job, input, priority, run_at, max_attempts, queue, serial_queue,
                           dead_letter_queue, keep_for)
SELECT %(job)s, item.value, %(priority)s,
       now() + make_interval(secs => %(delay)s), %(max_attempts)s, %(queue)s,
       %(serial_queue)s, %(dead_letter_queue)s, make_interval(secs => %(keep_for)s)
FROM jsonb_array_elements(%(inputs)s::jsonb) WITH ORDINALITY AS item (value, n)
ORDER BY item.n
RETURNING id;

-- name: claim_task
-- Claim the next ready task of the given jobs (see underway.claim_task in the schema).
SELECT id, job, step, input, attempts AS attempt, max_attempts, scheduled_at, serial_queue
FROM underway.claim_task(%(jobs)s, %(token)s, %(lease)s);

-- name: seconds_until_due
-- How long until the next pending task of these jobs is due; NULL when there is none.
-- Tasks due for a while are left out: none was ready at the claim just before, so they
-- wait for their queue (paused or serial), and a resume or a finished serial task wakes
-- workers with NOTIFY.
SELECT extract(epoch FROM run_at - now())::float8
FROM underway.task
WHERE state = 'pending' AND job = ANY (%(jobs)s) AND run_at > now() - interval '0.25 s'
ORDER BY run_at
LIMIT 1;

-- name: complete_task
-- Mark the claimed task succeeded and record the try, fenced on the claim token; in the
-- same statement (one round trip, one commit) claim the worker's next task, unless `jobs`
-- is empty. The claim runs first (the completion reads its result), so it never sees the
-- task being completed. Returns one row: whether the completion happened, NULL (the
-- task's new state, see advance_task), and the claimed task's columns (NULLs for none).
WITH claimed AS (
    SELECT id, job, step, input, attempts AS attempt, max_attempts, scheduled_at, serial_queue
    FROM underway.claim_task(%(jobs)s, %(next_token)s, %(lease)s, false)
), done AS (
    UPDATE underway.task AS t
    SET state = 'succeeded', claim_token = NULL, lease_expires_at = NULL, error = NULL
    WHERE t.id = %(id)s AND t.claim_token = %(token)s AND t.state = 'running'
      AND NOT EXISTS (SELECT 1 FROM claimed WHERE claimed.id = t.id)
    RETURNING t.id, t.step, t.attempts, t.started_at
), recorded AS (
    INSERT INTO underway.attempt (task_id, step, attempt, outcome, started_at)
    SELECT id, step, attempts, 'succeeded', started_at FROM done
)
SELECT (SELECT count(*) FROM done) = 1 AS done, NULL::text AS state, claimed.*
FROM (VALUES (1)) AS one
LEFT JOIN claimed ON true;

-- name: cancel_requested
-- Whether cancelling the task was asked for (Context.cancelled).
SELECT cancel_requested_at IS NOT NULL FROM underway.task WHERE id = %(id)s;

-- name: advance_task
-- Move the claimed task on to its next step with the previous step's output, fenced on
-- the claim token, recording the finished step's try; and claim the worker's next task
-- as complete_task does. Returns one row: whether the task advanced, its new state
-- ('cancelled' when its cancellation was asked for meanwhile), and the claimed task.
WITH claimed AS (
    SELECT id, job, step, input, attempts AS attempt, max_attempts, scheduled_at, serial_queue
    FROM underway.claim_task(%(jobs)s, %(next_token)s, %(lease)s, false)
), finished AS (
    SELECT t.id, t.step, t.attempts, t.started_at FROM underway.task AS t
    WHERE t.id = %(id)s AND t.claim_token = %(token)s AND t.state = 'running'
      AND NOT EXISTS (SELECT 1 FROM claimed WHERE claimed.id = t.id)
    FOR UPDATE
), advanced AS (
    UPDATE underway.task AS t
    SET step = t.step + 1, input = %(input)s::jsonb, state = 'pending', attempts = 0,
        max_attempts = %(max_attempts)s, run_at = now() + make_interval(secs => %(delay)s),
        claim_token = NULL, lease_expires_at = NULL, error = NULL, started_at = NULL
    FROM finished
    WHERE t.id = finished.id
    RETURNING t.id, t.state
), recorded AS (
    INSERT INTO underway.attempt (task_id, step, attempt, outcome, started_at)
    SELECT finished.id, finished.step, finished.attempts, 'succeeded', finished.started_at
    FROM finished JOIN advanced USING (id)
)
SELECT (SELECT count(*) FROM advanced) = 1 AS done, (SELECT state::text FROM advanced) AS state,
       claimed.*
FROM (VALUES (1)) AS one
LEFT JOIN claimed ON true;

-- name: fail_task
-- Record a failed (or timed-out) try of the claimed task; retry it at the given delay
-- or fail it for good, into its dead-letter queue if it has one. Fenced on the claim
-- token. Returns the task's new state.
WITH failed AS (
    SELECT id, step, attempts, started_at FROM underway.task
    WHERE id = %(id)s AND claim_token = %(token)s AND state = 'running'
    FOR UPDATE
), updated AS (
    UPDATE underway.task AS t
    SET state = CASE WHEN %(retry)s THEN 'pending' ELSE 'failed' END::underway.task_state,
        run_at = CASE WHEN %(retry)s THEN now() + make_interval(secs => %(delay)s)
                 ELSE t.run_at END,
        claim_token = NULL, lease_expires_at = NULL, error = %(error)s
    FROM failed
    WHERE t.id = failed.id
    RETURNING t.id, t.state
), recorded AS (
    INSERT INTO underway.attempt (task_id, step, attempt, outcome, error, traceback, started_at)
    SELECT failed.id, failed.step, failed.attempts, %(outcome)s, %(error)s, %(traceback)s,
           failed.started_at
    FROM failed JOIN updated USING (id)
)
SELECT state::text AS state FROM updated;

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
        run_at = now(), claim_token = NULL, lease_expires_at = NULL, error = %(error)s
    FROM held
    WHERE t.id = held.id
    RETURNING t.id, t.state
), recorded AS (
    INSERT INTO underway.attempt (task_id, step, attempt, outcome, error, started_at)
    SELECT held.id, held.step, held.attempts, %(outcome)s, %(error)s, held.started_at
    FROM held JOIN released USING (id)
)
SELECT id, state::text AS state, pg_notify(%(channel)s, '') FROM released;

-- name: renew_leases
-- Extend the leases of the tasks this supervisor's live workers hold. A row someone else
-- holds locked is skipped, not waited for (reclaiming skips it too), so one locked row
-- cannot stall the renewal of the others, nor the supervisor.
UPDATE underway.task
SET lease_expires_at = now() + make_interval(secs => %(lease)s)
WHERE id IN (
    SELECT id FROM underway.task
    WHERE state = 'running' AND claim_token = ANY (%(tokens)s)
    FOR UPDATE SKIP LOCKED
);

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
SELECT id, pg_notify(%(channel)s, '') FROM released;

-- name: schema_version
-- The newest migration applied; fails with undefined_table when there is no schema.
SELECT max(version) FROM underway.migration;

-- name: clock
-- The database's clock: the one time every host agrees on.
SELECT now();

-- name: notify
-- Wake the services listening on a channel (idle workers, schedulers).
SELECT pg_notify(%(channel)s, '');

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
-- (the later of its last change and its last fired tick).
SELECT s.job, s.name, s.expression, s.catch_up, greatest(s.updated_at, last.fire_at) AS anchor
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

-- name: register_jobs
-- Store the jobs a supervisor runs, with their tasks' defaults, for enqueue from SQL.
INSERT INTO underway.job AS j (name, queue, priority, max_attempts, dead_letter_queue, keep_for)
SELECT x.name, x.queue, x.priority, x.max_attempts, x.dead_letter_queue,
       make_interval(secs => x.keep_for)
FROM jsonb_to_recordset(%(jobs)s::jsonb) AS x (
    name text, queue text, priority integer, max_attempts integer, dead_letter_queue text,
    keep_for double precision
)
ON CONFLICT (name) DO UPDATE
SET queue = excluded.queue, priority = excluded.priority, max_attempts = excluded.max_attempts,
    dead_letter_queue = excluded.dead_letter_queue, keep_for = excluded.keep_for,
    updated_at = now()
WHERE (j.queue, j.priority, j.max_attempts, j.dead_letter_queue, j.keep_for)
      IS DISTINCT FROM
      (excluded.queue, excluded.priority, excluded.max_attempts, excluded.dead_letter_queue,
       excluded.keep_for);

-- name: cancel_task
-- Cancel a task: a pending one at once (it never runs); a running one at its next step
-- boundary. Returns its state afterwards, or nothing when it had finished already.
UPDATE underway.task
SET cancel_requested_at = coalesce(cancel_requested_at, now()),
    state = CASE WHEN state = 'pending' THEN 'cancelled' ELSE state END
WHERE id = %(id)s AND state IN ('pending', 'running')
RETURNING state::text;

-- name: task_status
-- Where a task stands.
SELECT id, job, state::text AS state, step, attempts, max_attempts,
       coalesce(queue, job) AS queue, error, cancel_requested_at IS NOT NULL AS cancel_requested,
       dead_letter_queue, created_at, run_at, finished_at
FROM underway.task WHERE id = %(id)s;

-- name: pause_queue
-- Pause a queue: workers claim none of its tasks until it is resumed.
INSERT INTO underway.paused_queue (queue) VALUES (%(queue)s) ON CONFLICT DO NOTHING;

-- name: resume_queue
-- Resume a paused queue and wake idle workers.
WITH resumed AS (DELETE FROM underway.paused_queue WHERE queue = %(queue)s RETURNING queue)
SELECT count(*) AS resumed, pg_notify(%(channel)s, '') FROM resumed;

-- name: queue_summary
-- Every queue with unfinished or failed tasks, or paused: its task counts by state,
-- whether it is paused, and its lag (how long its oldest ready task has waited).
WITH counts AS (
    SELECT coalesce(queue, job) AS queue,
           count(*) FILTER (WHERE state = 'pending') AS pending,
           count(*) FILTER (WHERE state = 'running') AS running,
           count(*) FILTER (WHERE state = 'failed') AS failed,
           extract(epoch FROM now() - min(run_at) FILTER (
               WHERE state = 'pending' AND run_at <= now()))::float8 AS lag
    FROM underway.task
    WHERE state IN ('pending', 'running', 'failed')
    GROUP BY 1
)
SELECT coalesce(c.queue, p.queue) AS queue, coalesce(c.pending, 0) AS pending,
       coalesce(c.running, 0) AS running, coalesce(c.failed, 0) AS failed,
       p.queue IS NOT NULL AS paused, c.lag
FROM counts AS c
FULL JOIN underway.paused_queue AS p ON p.queue = c.queue
ORDER BY 1;

-- name: dead_letters
-- The tasks in a dead-letter queue, oldest first.
SELECT id, job, step, input, attempts, error, finished_at
FROM underway.task
WHERE dead_letter_queue = %(queue)s AND state = 'failed'
ORDER BY id;

-- name: redrive
-- Put tasks from a dead-letter queue back in their queue, each at the step that failed,
-- with its tries renewed; its attempts so far stay in its history. All of them, or
-- those whose ids are given. Re-driving overrides a cancellation asked for during the
-- last try: it is the operator's newer word.
WITH redriven AS (
    UPDATE underway.task
    SET state = 'pending', attempts = 0, run_at = now(), error = NULL,
        cancel_requested_at = NULL
    WHERE dead_letter_queue = %(queue)s AND state = 'failed'
      AND (%(ids)s::bigint[] IS NULL OR id = ANY (%(ids)s::bigint[]))
    RETURNING id
)
SELECT id, pg_notify(%(channel)s, '') FROM redriven ORDER BY id;

-- name: purge_expired
-- Delete up to a batch of finished tasks whose retention ran out, with their attempts.
-- Locked rows are skipped, so purging never waits on anyone.
DELETE FROM underway.task
WHERE id IN (
    SELECT id FROM underway.task
    WHERE expires_at <= now()
    ORDER BY expires_at
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
);

-- name: run_delayed_now
-- Make every delayed task of these jobs due now (testing.drain); returns how many.
UPDATE underway.task SET run_at = now()
WHERE state = 'pending' AND job = ANY (%(jobs)s) AND run_at > now();

-- name: last_failure
-- The error and traceback of a task's last failed try.
SELECT error, traceback FROM underway.attempt
WHERE task_id = %(id)s AND outcome <> 'succeeded'
ORDER BY id DESC
LIMIT 1;
