"""Welcome emails: defer work out of a sign-up request.

A one-step job. The sign-up code enqueues it with a plain call and returns at once;
a worker sends the email in the background.

Run it: ``python examples/welcome_email.py`` (uses ``$DATABASE_URL``, else an
embedded PostgreSQL).
"""

import underway
from underway import Job, To

welcome = Job("welcome-email")


@welcome.step
def send_welcome_email(cx, inp):
    # Here we would send the email; the example only says so.
    print(f"Sending welcome email to {inp['name']} <{inp['email']}> (user_id: {inp['user_id']})")
    return To.done()


if __name__ == "__main__":
    from embedded import database_url

    underway.configure(dsn=database_url())
    underway.run_migrations()

    task = welcome.enqueue({"user_id": 42, "email": "ferris@example.com", "name": "Ferris"})
    print(f"Enqueued task {task.id}")

    # Work through the queue with one worker process, and stop once nothing is ready.
    raise SystemExit(underway.run_workers(workers=1, burst=True))
