"""Jobs for the dashboard tests: a small shop's background work (emails, billing,
reports, webhooks, exports) whose failures look like real ones, and a job that fails
until told not to, for the retry button."""

from __future__ import annotations

from typing import Any

from underway import Context, Fatal, Job, RetryPolicy, To


class PaymentDeclined(Exception):
    """The card issuer said no."""


#: Whether web-flaky's second step fails; the retry test turns it off.
FLAKY = {"fail": True}

emails = Job("send-welcome-email", queue="emails", retry=RetryPolicy(max_attempts=3))
billing = Job(
    "charge-invoice",
    queue="billing",
    dead_letter_queue="billing-dead",
    retry=RetryPolicy(max_attempts=3),
)
reports = Job("generate-report", queue="reports", retry=RetryPolicy(max_attempts=2))
webhooks = Job("sync-crm-contact", queue="webhooks", retry=RetryPolicy(max_attempts=4))
exports = Job("export-orders-csv", queue="exports")
flaky = Job("web-flaky", queue="flaky", retry=RetryPolicy(max_attempts=1))
hostile = Job("web-hostile", queue="hostile", retry=RetryPolicy(max_attempts=1))
ALL = (emails, billing, reports, webhooks, exports, flaky, hostile)


@emails.step
def render(cx: Context, inp: dict[str, Any]) -> To:
    """Render the email for the user."""
    return To.next({**inp, "subject": f"Welcome, {inp['name']}!"})


@emails.step
def deliver(cx: Context, inp: dict[str, Any]) -> To:
    """Hand it to the mail server."""
    return To.done({"message_id": f"<{inp['user_id']}@mail.example.com>"})


@billing.step
def load_invoice(cx: Context, inp: dict[str, Any]) -> To:
    """Load the invoice."""
    return To.next({**inp, "currency": "EUR"})


@billing.step
def charge_card(cx: Context, inp: dict[str, Any]) -> To:
    """Charge the customer's card; big amounts are declined."""
    if inp["amount"] > 900:
        raise PaymentDeclined(
            f"card declined for invoice {inp['invoice']}: insufficient funds (issuer code 51)"
        )
    return To.next({**inp, "charge": f"ch_{inp['invoice']}"})


@billing.step
def send_receipt(cx: Context, inp: dict[str, Any]) -> To:
    """Email the receipt."""
    return To.done({"receipt": f"R-{inp['invoice']}"})


@reports.step
def query(cx: Context, inp: dict[str, Any]) -> To:
    """Gather the report's rows."""
    return To.next({**inp, "rows": 1200})


@reports.step
def render_pdf(cx: Context, inp: dict[str, Any]) -> To:
    """Render it; the quarterly one times out."""
    if inp["period"] == "quarterly":
        raise TimeoutError("PDF renderer at http://pdf:3000 did not answer within 30 s")
    return To.next(inp)


@reports.step
def upload(cx: Context, inp: dict[str, Any]) -> To:
    """Upload it."""
    return To.done({"url": f"s3://reports/{inp['period']}.pdf"})


@webhooks.step
def push_contact(cx: Context, inp: dict[str, Any]) -> To:
    """POST the contact to the CRM; some contacts it refuses."""
    if inp["contact"] % 7 == 0:
        raise ConnectionError(
            "POST https://crm.example.com/api/v2/contacts: 503 Service Unavailable"
        )
    if inp["contact"] % 11 == 0:
        raise Fatal(f"contact {inp['contact']} has no email address")
    return To.done()


@exports.step
def export(cx: Context, inp: dict[str, Any]) -> To:
    """Write the CSV."""
    return To.done()


@flaky.step
def prepare(cx: Context, inp: Any) -> To:
    """A first step that always works."""
    return To.next({"prepared": inp})


@flaky.step
def work(cx: Context, inp: Any) -> To:
    """Fails while FLAKY says so."""
    if FLAKY["fail"]:
        raise RuntimeError("the flaky step failed on purpose")
    return To.done({"worked": True})


@hostile.step
def explode(cx: Context, inp: dict[str, Any]) -> None:
    """Fail with the error the input asks for: markup, for the escaping test."""
    raise RuntimeError(inp["error"])
