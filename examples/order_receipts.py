"""Order receipts: two steps, where the second can be retried without redoing the first.

The first step "generates" a receipt and records it in the database through the worker's
transaction, so the row commits exactly when the step does. The second step emails it;
if the mail service is down, only that step is retried.

Run it: ``python examples/order_receipts.py`` (uses ``$DATABASE_URL``, else an
embedded PostgreSQL).
"""

import underway
from underway import Fatal, Job, RetryPolicy, To

receipts = Job(
    "order-receipt",
    retry=RetryPolicy(max_attempts=5, initial_interval=0.1, max_interval=60.0),
)


@receipts.step
def generate_receipt(cx, inp):
    receipt_key = f"receipts_bucket/{inp['order_id']}-receipt.pdf"
    # Written through the worker's transaction: committed with this step, or not at all.
    with cx.cursor() as cur:
        cur.execute(
            "INSERT INTO receipts (order_id, receipt_key) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (inp["order_id"], receipt_key),
        )
    print(f"Generated {receipt_key}")
    return To.next({"receipt_key": receipt_key})


# This step overrides the job's policy. Retries here start at once (initial_interval=0)
# so the example finishes quickly; real code would back off for a while.
@receipts.step(retry=RetryPolicy(max_attempts=10, initial_interval=0))
def email_receipt(cx, inp):
    if not inp.get("receipt_key"):
        raise Fatal("no receipt to email")  # no retry can mend this
    if cx.attempt == 1:
        # Stands in for a flaky mail service: only this step is retried, the receipt
        # is not generated again.
        raise ConnectionError("mail service unavailable")
    print(f"Emailing receipt for {inp['receipt_key']} (try {cx.attempt})")
    return To.done()


if __name__ == "__main__":
    import psycopg2
    from embedded import database_url

    dsn = database_url()
    underway.configure(dsn=dsn)
    underway.run_migrations()
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "CREATE TABLE IF NOT EXISTS receipts (order_id int PRIMARY KEY, receipt_key text)"
        )
        # Enqueue in our own transaction: the task exists once this block commits.
        task = receipts.enqueue({"order_id": 42}, conn=conn)
    print(f"Enqueued task {task.id}")

    # Work until nothing is ready, then report what happened to the task.
    underway.run_workers(workers=1, burst=True)
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT state FROM underway.task WHERE id = %s", (task.id,))
        print(f"Task {task.id} {cur.fetchone()[0]}")
