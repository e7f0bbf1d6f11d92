-- Every query underway sends, each headed by its name and what it is for.
-- Named parameters use psycopg2's %(name)s style; `underway/queries.py` loads them.

-- name: enqueue
-- Insert one task and return its id; the insert trigger wakes idle workers.
INSERT INTO underway.task (job, input, priority, run_at, max_attempts, queue, serial_queue,
                           dead_letter_queue, keep_for, concurrency_group, trace_context)
VALUES (%(job)s, %(input)s::jsonb, %(priority)s,
        coalesce(%(run_at)s::timestamptz, now() + make_interval(secs => %(delay)s)),
        %(max_attempts)s, %(queue)s, %(serial_queue)s, %(dead_letter_queue)s,
        make_interval(secs => %(keep_for)s), %(concurrency_group)s, %(trace_context)s)
RETURNING id;

-- name: enqueue_keyed
-- Enqueue one task with a job key (see underway.enqueue in the schema).
SELECT underway.enqueue(
    %(job)s, %(input)s::jsonb, %(delay)s, %(priority)s, %(max_attempts)s, %(key)s,
    %(key_mode)s, %(serial_queue)s, %(queue)s, %(dead_letter_queue)s,
    make_interval(secs => %(keep_for)s), %(run_at)s::timestamptz, %(concurrency_group)s,
    %(trace_context)s
);

-- name: enqueue_named
-- Enqueue one task of a job known only by name (the command line): what is not given
-- takes the defaults a supervisor registered for the job.
SELECT underway.enqueue(
    %(job)s, %(input)s::jsonb, delay => %(delay)s, priority => %(priority)s, key => %(key)s,
    run_at => %(run_at)s::timestamptz
);

-- name: enqueue_many
-- Insert many tasks of one job in one statement, in the order given.
INSERT INTO underway.task (job, input, priority, run_at, max_attempts, queue, serial_queue,
                           dead_letter_queue, keep_for, concurrency_group, trace_context)
SELECT %(job)s, item.value, %(priority)s,
       coalesce(%(run_at)s::timestamptz, now() + make_interval(secs => %(delay)s)),
       %(max_attempts)s, %(queue)s, %(serial_queue)s, %(dead_letter_queue)s,
       make_interval(secs => %(keep_for)s), %(concurrency_group)s, %(trace_context)s
FROM jsonb_array_elements(%(inputs)s::jsonb) WITH ORDINALITY AS item (value, n)
ORDER BY item.n
RETURNING id;

-- name: claim_task
-- Claim the next ready task of the given jobs (see underway.claim_task in the schema).
SELECT id, job, coalesce(queue, job) AS queue, step, input::text AS input,
       attempts AS attempt, max_attempts, scheduled_at, serial_queue, trace_context,
       extract(epoch FROM started_at - run_at)::float8 AS waited
FROM underway.claim_task(%(jobs)s, %(token)s, %(lease)s);

-- name: seconds_until_due
-- How long until the next pending task of these jobs is due, or a rate-limited queue with
-- ready tasks of these jobs gains a token; NULL when neither will happen. Tasks due for a
-- while are left out: none was ready at the claim just before, so they wait for their
-- queue (paused or serial), and a resume or a finished serial task wakes workers with
-- NOTIFY. Also the session's backend pid: a worker behind a transaction-pooling proxy
-- sees it change, and must say so (it would miss its notifications).
SELECT least(
           (SELECT extract(epoch FROM run_at - now())::float8
            FROM underway.task
            WHERE state = 'pending' AND job = ANY (%(jobs)s)
              AND run_at > now() - interval '0.25 s'
            ORDER BY run_at
            LIMIT 1),
           (SELECT min((1 - underway.rate_tokens(r)) * extract(epoch FROM r.per) / r.count)
            FROM underway.rate_limit AS r
            WHERE underway.rate_tokens(r) < 1 AND EXISTS (
                SELECT 1 FROM underway.task AS t
                WHERE t.state = 'pending' AND t.run_at <= now() AND t.job = ANY (%(jobs)s)
                  AND coalesce(t.queue, t.job) = r.queue
            ))
       )::float8,
       pg_backend_pid();

-- name: complete_task
-- Mark the claimed task succeeded and record the try, fenced on the claim token; in the
-- same statement (one round trip, one commit) claim the worker's next task, unless `jobs`
-- is empty. The claim runs first (the completion reads its result), so it never sees the
-- task being completed; claim_after locks that task before claiming (see its comment).
-- Returns one row: whether the completion happened, NULL (the task's new state, see
-- advance_task), and the claimed task's columns (NULLs for none).
WITH claimed AS (
    SELECT id, job, coalesce(queue, job) AS queue, step, input::text AS input,
           attempts AS attempt, max_attempts, scheduled_at, serial_queue, trace_context,
           extract(epoch FROM started_at - run_at)::float8 AS waited
    FROM underway.claim_after(%(id)s, %(token)s, %(jobs)s, %(next_token)s, %(lease)s)
), done AS (
    UPDATE underway.task AS t
    SET state = 'succeeded', claim_token = NULL, lease_expires_at = NULL, error = NULL,
        output = %(output)s::jsonb
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
    SELECT id, job, coalesce(queue, job) AS queue, step, input::text AS input,
           attempts AS attempt, max_attempts, scheduled_at, serial_queue, trace_context,
           extract(epoch FROM started_at - run_at)::float8 AS waited
    FROM underway.claim_after(%(id)s, %(token)s, %(jobs)s, %(next_token)s, %(lease)s)
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
-- when it was the last); an interruption by our own shutdown returns it; an abort ends it
-- cancelled, even on its last try; a timeout fails it, or retries it after `delay`, as its
-- step's policy says (`retry`). Fenced on the claim token, so a task that finished or was
-- reclaimed meanwhile is left alone.
WITH held AS (
    SELECT id, step, attempts, max_attempts, started_at FROM underway.task
    WHERE claim_token = %(token)s AND state = 'running'
    FOR UPDATE
), released AS (
    UPDATE underway.task AS t
    SET state = CASE WHEN %(outcome)s = 'aborted' THEN 'cancelled'
                     WHEN %(counts)s AND (held.attempts >= held.max_attempts OR NOT %(retry)s)
                     THEN 'failed' ELSE 'pending' END::underway.task_state,
        attempts = CASE WHEN %(counts)s THEN held.attempts ELSE held.attempts - 1 END,
        run_at = now() + make_interval(secs => %(delay)s), claim_token = NULL,
        lease_expires_at = NULL, error = %(error)s
    FROM held
    WHERE t.id = held.id
    RETURNING t.id, t.state
), recorded AS (
    INSERT INTO underway.attempt (task_id, step, attempt, outcome, error, started_at)
    SELECT held.id, held.step, held.attempts, %(outcome)s, %(error)s, held.started_at
    FROM held JOIN released USING (id)
)
SELECT id, state::text AS state, pg_notify(%(channel)s, '') FROM released;

-- name: held_task
-- The job, step and try of the task running under a claim token (for the supervisor,
-- to ask the step's retry policy about a try it ended), or no row.
SELECT job, step, attempts, max_attempts FROM underway.task
WHERE claim_token = %(token)s AND state = 'running';

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

-- name: session
-- This session's backend pid and start time: what identifies it on the server, so that
-- a supervisor ends exactly this session once its worker died, and no other on any host.
SELECT pg_backend_pid(), extract(epoch FROM backend_start)::float8
FROM pg_stat_activity WHERE pid = pg_backend_pid();

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

-- name: end_session
-- End the server session a dead worker left, known by its backend pid and start time
-- (a pid alone may have been reused since). PostgreSQL notices a vanished client only
-- when it next talks to it, so a session busy with a long statement would live on,
-- holding its locks and a connection slot.
SELECT pg_terminate_backend(pid)
FROM pg_stat_activity
WHERE pid = %(pid)s AND abs(extract(epoch FROM backend_start) - %(started)s) < 0.001
  AND pid <> pg_backend_pid();

-- name: register_jobs
-- Store the jobs a supervisor runs, with their tasks' defaults (for enqueue from SQL)
-- and their steps' names (for operators' tools).
INSERT INTO underway.job AS j (
    name, queue, priority, max_attempts, dead_letter_queue, keep_for, steps, concurrency_group
)
SELECT x.name, x.queue, x.priority, x.max_attempts, x.dead_letter_queue,
       make_interval(secs => x.keep_for), x.steps, x.concurrency_group
FROM jsonb_to_recordset(%(jobs)s::jsonb) AS x (
    name text, queue text, priority integer, max_attempts integer, dead_letter_queue text,
    keep_for double precision, steps text[], concurrency_group text
)
ON CONFLICT (name) DO UPDATE
SET queue = excluded.queue, priority = excluded.priority, max_attempts = excluded.max_attempts,
    dead_letter_queue = excluded.dead_letter_queue, keep_for = excluded.keep_for,
    steps = excluded.steps, concurrency_group = excluded.concurrency_group, updated_at = now()
WHERE (j.queue, j.priority, j.max_attempts, j.dead_letter_queue, j.keep_for, j.steps,
       j.concurrency_group)
      IS DISTINCT FROM
      (excluded.queue, excluded.priority, excluded.max_attempts, excluded.dead_letter_queue,
       excluded.keep_for, excluded.steps, excluded.concurrency_group);

-- name: cancel_task
-- Cancel a task: a pending one at once (it never runs); a running one at its next step
-- boundary, or at once with abort (its supervisor, woken on the abort channel, ends the
-- step). Returns its state afterwards, or nothing when it had finished already.
WITH asked AS (
    UPDATE underway.task
    SET cancel_requested_at = coalesce(cancel_requested_at, now()),
        abort_requested_at = CASE WHEN %(abort)s AND state = 'running'
                                  THEN coalesce(abort_requested_at, now())
                                  ELSE abort_requested_at END,
        state = CASE WHEN state = 'pending' THEN 'cancelled' ELSE state END
    WHERE id = %(id)s AND state IN ('pending', 'running')
    RETURNING id, state, abort_requested_at
)
SELECT state::text AS state,
       CASE WHEN abort_requested_at IS NOT NULL THEN pg_notify(%(abort_channel)s, id::text) END
FROM asked;

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
-- whether it is paused, and its lag (how long its oldest ready task has waited). One
-- branch per state, so each reads only its partial index (ready, lease, failed), never
-- the finished tasks kept for retention: 17 ms instead of 237 ms beside a million.
WITH open AS (
    SELECT coalesce(queue, job) AS queue, 1 AS pending, 0 AS running, 0 AS failed,
           CASE WHEN run_at <= now() THEN run_at END AS ready_at
    FROM underway.task WHERE state = 'pending'
    UNION ALL
    SELECT coalesce(queue, job), 0, 1, 0, NULL FROM underway.task WHERE state = 'running'
    UNION ALL
    SELECT coalesce(queue, job), 0, 0, 1, NULL FROM underway.task WHERE state = 'failed'
), counts AS (
    SELECT queue, sum(pending) AS pending, sum(running) AS running, sum(failed) AS failed,
           extract(epoch FROM now() - min(ready_at))::float8 AS lag
    FROM open GROUP BY 1
)
SELECT coalesce(c.queue, p.queue) AS queue, coalesce(c.pending, 0)::bigint AS pending,
       coalesce(c.running, 0)::bigint AS running, coalesce(c.failed, 0)::bigint AS failed,
       p.queue IS NOT NULL AS paused, c.lag
FROM counts AS c
FULL JOIN underway.paused_queue AS p ON p.queue = c.queue
ORDER BY 1;

-- name: dead_letters
-- The tasks in a dead-letter queue, oldest first, up to a limit.
SELECT id, job, step, input::text AS input, attempts, error, finished_at
FROM underway.task
WHERE dead_letter_queue = %(queue)s AND state = 'failed'
ORDER BY id
LIMIT %(limit)s;

-- name: dead_letter_queues
-- Every dead-letter queue holding tasks, with how many: read from the dead-letter index.
SELECT dead_letter_queue AS queue, count(*) AS tasks
FROM underway.task
WHERE dead_letter_queue IS NOT NULL AND state = 'failed'
GROUP BY 1
ORDER BY 1;

-- name: redrive
-- Put tasks from a dead-letter queue back in their queue, each at the step that failed,
-- with its tries renewed; its attempts so far stay in its history. All of them, or
-- those whose ids are given. Re-driving overrides a cancellation asked for during the
-- last try: it is the operator's newer word.
WITH redriven AS (
    UPDATE underway.task
    SET state = 'pending', attempts = 0, run_at = now(), error = NULL,
        cancel_requested_at = NULL, abort_requested_at = NULL
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

-- name: task_job
-- The job of a task, to make a handle for a task enqueued elsewhere.
SELECT job FROM underway.task WHERE id = %(id)s;

-- name: await_task
-- Mark a task as awaited, so that its end notifies the result channel. A statement of its
-- own, before task_outcome: when the task's end is committing, this waits for it, and the
-- read that follows then sees the end (one statement would read from before it).
UPDATE underway.task SET awaited = true
WHERE id = %(id)s AND NOT awaited AND state IN ('pending', 'running');

-- name: task_outcome
-- Where a task stands, with its output, error and the traceback of its last failed try.
SELECT t.state::text AS state, t.output::text AS output, t.error,
       (SELECT a.traceback FROM underway.attempt AS a
        WHERE a.task_id = t.id AND a.outcome <> 'succeeded'
        ORDER BY a.id DESC LIMIT 1) AS traceback
FROM underway.task AS t WHERE t.id = %(id)s;

-- name: retry_tasks
-- Put failed tasks back to work at the step that failed, with its tries renewed; the same
-- row goes back, never a copy, and its attempts stay in its history. All of them or, when
-- one is missing, not failed, or keyed with a key another task took since, none. Returns
-- every task asked for that exists, with the state it was in, the task holding its key
-- now (if another does), and whether it went back.
WITH asked AS (
    SELECT t.id, t.state,
           (SELECT o.id FROM underway.task AS o
            WHERE t.key IS NOT NULL AND o.job = t.job AND o.key = t.key AND o.id <> t.id
              AND o.state IN ('pending', 'running')) AS key_holder
    FROM underway.task AS t WHERE t.id = ANY (%(ids)s::bigint[])
    ORDER BY t.id
    FOR UPDATE OF t
), verdict AS (
    SELECT count(*) = cardinality(ARRAY(SELECT DISTINCT unnest(%(ids)s::bigint[])))
           AND bool_and(state = 'failed' AND key_holder IS NULL) AS all_failed
    FROM asked
), retried AS (
    UPDATE underway.task AS t
    SET state = 'pending', attempts = 0, run_at = now(), error = NULL,
        cancel_requested_at = NULL, abort_requested_at = NULL
    FROM asked, verdict
    WHERE t.id = asked.id AND verdict.all_failed
    RETURNING t.id
)
SELECT asked.id, asked.state::text AS state, asked.key_holder,
       retried.id IS NOT NULL AS retried, pg_notify(%(channel)s, '')
FROM asked LEFT JOIN retried USING (id)
ORDER BY asked.id;

-- name: failed_task_ids
-- The failed tasks of a job, those that failed since a time if one is given: what
-- `retry --job` puts back. Walks task_failed_idx, never the whole table.
SELECT id FROM underway.task
WHERE state = 'failed' AND job = %(job)s
  AND (%(since)s::timestamptz IS NULL OR finished_at >= %(since)s::timestamptz)
ORDER BY id
LIMIT %(limit)s;

-- name: abort_requested
-- Which of the tasks claimed with these tokens an operator asked to abort.
SELECT id FROM underway.task
WHERE claim_token = ANY (%(tokens)s) AND state = 'running' AND abort_requested_at IS NOT NULL;

-- name: set_rate_limit
-- Limit a queue to `count` claims per `per` seconds, across all hosts; a full bucket to
-- start with.
INSERT INTO underway.rate_limit AS r (queue, count, per, tokens)
VALUES (%(queue)s, %(count)s, make_interval(secs => %(per)s), %(count)s)
ON CONFLICT (queue) DO UPDATE
SET count = excluded.count, per = excluded.per, tokens = least(r.tokens, excluded.count);

-- name: clear_rate_limit
-- Lift a queue's rate limit; returns whether it had one.
DELETE FROM underway.rate_limit WHERE queue = %(queue)s;

-- name: set_concurrency_limits
-- Store concurrency groups' limits (from jobs' definitions, at a supervisor's start).
INSERT INTO underway.concurrency_limit AS g (name, max_concurrency)
SELECT x.name, x.max_concurrency
FROM jsonb_to_recordset(%(groups)s::jsonb) AS x (name text, max_concurrency integer)
ON CONFLICT (name) DO UPDATE
SET max_concurrency = excluded.max_concurrency, updated_at = now()
WHERE g.max_concurrency IS DISTINCT FROM excluded.max_concurrency;

-- name: limits
-- Every rate limit and concurrency limit, with the tokens left and the tasks running.
SELECT 'rate' AS kind, r.queue AS name, r.count AS limit_count,
       extract(epoch FROM r.per)::float8 AS per_seconds,
       floor(underway.rate_tokens(r))::integer AS available
FROM underway.rate_limit AS r
UNION ALL
SELECT 'concurrency', g.name, g.max_concurrency, NULL,
       g.max_concurrency - (SELECT count(*) FROM underway.task AS t
                            WHERE t.concurrency_group = g.name AND t.state = 'running')::integer
FROM underway.concurrency_limit AS g
ORDER BY 1, 2;

-- name: heartbeat
-- A supervisor says it is alive and what its workers run now.
-- It counts as alive for `alive_for` seconds (three of its heartbeats): each supervisor
-- says so for itself, as supervisors of one deploy may run with different leases.
INSERT INTO underway.supervisor AS s (id, host, pid, jobs, workers, alive_until)
VALUES (%(id)s, %(host)s, %(pid)s, %(jobs)s, %(workers)s::jsonb,
        now() + make_interval(secs => %(alive_for)s))
ON CONFLICT (id) DO UPDATE
SET workers = excluded.workers, heartbeat_at = now(), alive_until = excluded.alive_until;

-- name: sign_off
-- A supervisor that stops removes its row.
DELETE FROM underway.supervisor WHERE id = %(id)s;

-- name: supervisors
-- Live supervisors (their last heartbeat said they would beat again by now), with what
-- each worker runs:
-- the task, its job and step, since when.
SELECT s.id::text AS id, s.host, s.pid, s.jobs, s.started_at, s.heartbeat_at,
       coalesce((
           SELECT jsonb_agg(w.value || jsonb_build_object(
                      'job', t.job, 'step', t.step, 'step_name', j.steps[t.step + 1],
                      'started_at', t.started_at) ORDER BY (w.value ->> 'slot')::integer)
           FROM jsonb_array_elements(s.workers) AS w
           LEFT JOIN underway.task AS t
                  ON t.id = (w.value ->> 'task_id')::bigint AND t.state = 'running'
           LEFT JOIN underway.job AS j ON j.name = t.job
       ), '[]')::text AS workers
FROM underway.supervisor AS s
WHERE s.alive_until > now()
ORDER BY s.host, s.pid;

-- name: prune_supervisors
-- Forget supervisors whose heartbeat stopped a day ago (their host died).
DELETE FROM underway.supervisor WHERE heartbeat_at < now() - interval '1 day';

-- name: count_finished
-- Add a worker's tally of finished tries to the per-minute statistics.
INSERT INTO underway.minute_stat AS m (minute, queue, job, succeeded, failed, retried)
SELECT x.minute, x.queue, x.job, x.succeeded, x.failed, x.retried
FROM jsonb_to_recordset(%(tally)s::jsonb) AS x (
    minute timestamptz, queue text, job text, succeeded integer, failed integer, retried integer
)
ON CONFLICT (minute, queue, job) DO UPDATE
SET succeeded = m.succeeded + excluded.succeeded, failed = m.failed + excluded.failed,
    retried = m.retried + excluded.retried;

-- name: throughput
-- Tasks finished per minute over the last `minutes` minutes, of one queue or all.
SELECT g.minute, coalesce(sum(m.succeeded), 0)::integer AS succeeded,
       coalesce(sum(m.failed), 0)::integer AS failed,
       coalesce(sum(m.retried), 0)::integer AS retried
FROM generate_series(date_trunc('minute', now()) - make_interval(mins => %(minutes)s - 1),
                     date_trunc('minute', now()), interval '1 minute') AS g (minute)
LEFT JOIN underway.minute_stat AS m
       ON m.minute = g.minute AND (%(queue)s::text IS NULL OR m.queue = %(queue)s)
GROUP BY g.minute
ORDER BY g.minute;

-- name: prune_statistics
-- Forget per-minute statistics older than a day.
DELETE FROM underway.minute_stat WHERE minute < now() - interval '1 day';

-- name: prune_ticks
-- Forget fired ticks older than a day, except each schedule's latest: a scheduler only
-- fires ticks after its schedule's latest one (or its last change), so a forgotten tick
-- can never fire again, and exactly-once holds.
DELETE FROM underway.schedule_tick AS t
WHERE t.ctid IN (
    SELECT o.ctid FROM underway.schedule_tick AS o
    WHERE o.handled_at < now() - interval '1 day'
      AND o.fire_at < (SELECT max(l.fire_at) FROM underway.schedule_tick AS l
                       WHERE l.job = o.job AND l.name = o.name)
    LIMIT %(batch)s
);

-- name: schedules
-- Every stored schedule, with its input and the last tick it fired.
SELECT s.job, s.name, s.expression, s.input::text AS input, s.catch_up, s.updated_at,
       (SELECT max(t.fire_at) FROM underway.schedule_tick AS t
        WHERE t.job = s.job AND t.name = s.name AND t.task_id IS NOT NULL) AS last_fire
FROM underway.schedule AS s
ORDER BY s.job, s.name;

-- name: unhandled_jobs
-- Jobs with tasks that have waited over a minute and that no live supervisor runs: left
-- by a renamed job, enqueued from SQL by mistake, or shipped before its workers. Looks
-- at up to 10,000 such tasks, so the check stays cheap.
SELECT job, count(*) AS tasks FROM (
    SELECT t.job FROM underway.task AS t
    WHERE t.state = 'pending' AND t.run_at < now() - interval '1 minute'
      AND NOT EXISTS (
          SELECT 1 FROM underway.supervisor AS s
          WHERE t.job = ANY (s.jobs)
            AND s.alive_until > now()
      )
    LIMIT 10000
) AS waiting
GROUP BY job
ORDER BY job;

-- name: list_tasks
-- Tasks newest first, filtered, one line each: the list command and the dashboard. Only
-- indexed paths: by id downwards, or the failed index for failed and cancelled tasks.
SELECT t.id, t.job, t.step, j.steps[t.step + 1] AS step_name, t.state::text AS state,
       t.attempts, t.max_attempts, coalesce(t.queue, t.job) AS queue, t.error,
       t.created_at, t.run_at, t.started_at, t.finished_at
FROM underway.task AS t
LEFT JOIN underway.job AS j ON j.name = t.job
WHERE (%(state)s::text IS NULL OR t.state = %(state)s::underway.task_state)
  AND (%(job)s::text IS NULL OR t.job = %(job)s)
  AND (%(queue)s::text IS NULL OR coalesce(t.queue, t.job) = %(queue)s)
  AND (%(since)s::timestamptz IS NULL OR t.created_at >= %(since)s::timestamptz)
  AND (%(before)s::bigint IS NULL OR t.id < %(before)s::bigint)
ORDER BY t.id DESC
LIMIT %(limit)s;

-- name: task_detail
-- One task, whole: its input and output, where it stands, and its timing.
SELECT t.id, t.job, t.step, j.steps[t.step + 1] AS step_name,
       coalesce(cardinality(j.steps), 0) AS step_count, coalesce(j.steps, '{}') AS step_names,
       t.state::text AS state, t.attempts,
       t.max_attempts, coalesce(t.queue, t.job) AS queue, t.serial_queue, t.concurrency_group,
       t.key, t.priority, t.dead_letter_queue, t.input::text AS input,
       t.output::text AS output, t.error, t.cancel_requested_at, t.abort_requested_at,
       t.scheduled_at, t.created_at, t.run_at, t.started_at, t.finished_at, t.expires_at
FROM underway.task AS t
LEFT JOIN underway.job AS j ON j.name = t.job
WHERE t.id = %(id)s;

-- name: task_attempts
-- Every try of a task, in order, with how it ended, its error and traceback.
SELECT a.step, j.steps[a.step + 1] AS step_name, a.attempt, a.outcome, a.error, a.traceback,
       a.started_at, a.finished_at
FROM underway.attempt AS a
JOIN underway.task AS t ON t.id = a.task_id
LEFT JOIN underway.job AS j ON j.name = t.job
WHERE a.task_id = %(id)s
ORDER BY a.id;
