-- Least privilege for underway: three roles, each with only what it needs.
--
--   owner     owns the underway schema and everything in it, and runs the migrations
--             (underway.run_migrations, python -m underway.migrations). Nothing else
--             connects as it.
--   worker    runs supervisors (workers, scheduler, upkeep), the dashboard and the admin
--             commands: reads and writes underway's tables and calls its functions, but
--             cannot create, alter or drop anything. It ends its own dead workers'
--             sessions, which PostgreSQL allows between sessions of the same role.
--   enqueuer  may only add tasks: Job.enqueue and Job.enqueue_many from Python (without a
--             key), and underway.enqueue(...) from SQL (without a key). It cannot read a
--             task's input, output or state (only the ids it is given back), nor change or
--             delete any. Keyed enqueues look at the task holding the key and may update
--             it: give them to the worker role.
--
-- The role names are psql variables; these are the defaults:
--
--   psql "postgresql://postgres@db/app" -v ON_ERROR_STOP=1 \
--        -v owner=underway_owner -v worker=underway_worker -v enqueuer=underway_enqueue \
--        -f examples/least_privilege.sql
--
-- Run it as a superuser (or a role that may create roles and grant on the database)
-- connected to the application's database, in three steps:
--
--   1. this script: it creates the roles (NOLOGIN), the schema owned by the owner, and
--      the default privileges that cover every table and function the owner creates
--      later, in this and every future migration;
--   2. the migrations, connected as the owner;
--   3. this script again: it grants on what the migrations created, gives the enqueuer
--      its few grants, and takes back the database's CREATE privilege the owner needed
--      for the first migration only.
--
-- Run steps 2 and 3 again after every upgrade of underway: a migration that replaces a
-- function (as 0003 replaced underway.enqueue) drops the enqueuer's grant on it. The
-- script is idempotent.
--
-- Give each role a way to log in, e.g.
--   ALTER ROLE underway_worker LOGIN PASSWORD '...';
-- or grant the role to an existing login role (GRANT underway_worker TO app_worker).
-- Keep passwords in ~/.pgpass or the environment, never on a command line.

\set ON_ERROR_STOP on
\if :{?owner}
\else
\set owner underway_owner
\endif
\if :{?worker}
\else
\set worker underway_worker
\endif
\if :{?enqueuer}
\else
\set enqueuer underway_enqueue
\endif

-- 1. The roles, if they do not exist yet; none can log in until you say so.
SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'owner') AS create_owner,
       NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'worker') AS create_worker,
       NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'enqueuer') AS create_enqueuer,
       current_database() AS dbname,
       to_regclass('underway.migration') IS NOT NULL AS migrated
\gset
\if :create_owner
CREATE ROLE :"owner" NOLOGIN;
\endif
\if :create_worker
CREATE ROLE :"worker" NOLOGIN;
\endif
\if :create_enqueuer
CREATE ROLE :"enqueuer" NOLOGIN;
\endif

-- 2. The schema, owned by the owner. Nobody else may create objects in it; the worker
-- and the enqueuer may look up what is in it (USAGE), as far as their grants go.
CREATE SCHEMA IF NOT EXISTS underway AUTHORIZATION :"owner";
REVOKE ALL ON SCHEMA underway FROM PUBLIC;
GRANT USAGE ON SCHEMA underway TO :"worker", :"enqueuer";

-- 3. Default privileges: what the owner creates from now on, in every migration to come.
-- Functions are not executable by everyone (PostgreSQL's default), only by the worker.
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA underway
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"worker";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA underway
    GRANT USAGE, SELECT ON SEQUENCES TO :"worker";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA underway
    GRANT EXECUTE ON FUNCTIONS TO :"worker";

\if :migrated
-- 4. What the migrations created already (step 3 of the instructions above).
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA underway TO :"worker";
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA underway TO :"worker";
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA underway FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA underway TO :"worker";

-- The enqueuer: insert tasks and learn their ids (INSERT ... RETURNING id reads the id
-- column), take ids from the task table's identity sequence, and call underway.enqueue,
-- which reads the jobs' registered defaults (queue, priority, tries, retention).
SELECT pg_get_serial_sequence('underway.task', 'id') AS task_id_sequence \gset
GRANT INSERT, SELECT (id) ON underway.task TO :"enqueuer";
GRANT USAGE ON SEQUENCE :task_id_sequence TO :"enqueuer";
GRANT SELECT ON underway.job TO :"enqueuer";
GRANT EXECUTE ON FUNCTION underway.enqueue TO :"enqueuer";

-- underway's bootstrap (CREATE SCHEMA IF NOT EXISTS) needs CREATE on the database; only
-- the first migration runs it, so the owner does not keep it.
REVOKE CREATE ON DATABASE :"dbname" FROM :"owner";
\else
-- Before the first migration: the owner's bootstrap runs CREATE SCHEMA IF NOT EXISTS,
-- which PostgreSQL allows only with CREATE on the database, even though the schema
-- exists. Run this script again after migrating: it takes the privilege back.
GRANT CREATE ON DATABASE :"dbname" TO :"owner";
\echo 'underway: now run the migrations as' :"owner" ', then run this script again'
\endif
