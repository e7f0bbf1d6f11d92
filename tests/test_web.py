"""The dashboard end to end, in headless Chromium: every page renders without a console
error, the buttons do what they say in the database, user data stays text, and the
enhancements (auto-refresh, chart tooltips) work. One browser serves the whole module;
each test gets a fresh database and its own dashboard server.

The screenshots land in tests/artifacts/.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import web_jobs

from underway.testing import drain

from .web_helpers import (
    CHROMEDRIVER,
    CHROMIUM,
    browser_errors,
    chromium,
    failed_flaky_task,
    http,
    register,
    save_screenshot,
    seed_shop,
    serve,
    sql,
)

pytest.importorskip("flask")
pytest.importorskip("selenium")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Chromium and its driver: apt-get install chromium chromium-driver",
)

WAIT = 10.0


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module, its viewport 1280x800."""
    with chromium() as driver:
        yield driver


@pytest.fixture
def site(browser: Any, dsn: str) -> Iterator[str]:
    """The dashboard of this test's database, served in a thread; yields its URL."""
    yield from _site(browser, dsn)


@pytest.fixture
def read_only_site(browser: Any, dsn: str) -> Iterator[str]:
    """The same, read-only."""
    yield from _site(browser, dsn, read_only=True)


def _site(browser: Any, dsn: str, refresh: float = 5.0, **options: Any) -> Iterator[str]:
    from underway.web import create_app

    app = create_app(dsn=dsn, **options)
    app.config["UNDERWAY_REFRESH_SECONDS"] = refresh
    with serve(app) as url:
        yield url
        # Leave the page before its server goes: a refresh would log a failed fetch.
        browser.get("about:blank")
        browser.get_log("browser")
    app.extensions["underway"].pool.close()


def wait(driver: Any, condition: Any, message: str = "") -> Any:
    """Wait up to WAIT seconds for ``condition(driver)`` to be truthy."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT).until(condition, message)


def flash(driver: Any) -> str:
    """The flash message the page shows after an action (read again if the page was
    replaced while it was read)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def text(d: Any) -> str | None:
        found = d.find_elements(By.CSS_SELECTOR, ".flash")
        return found[0].text if found else None

    stale = [StaleElementReferenceException]
    return WebDriverWait(driver, WAIT, ignored_exceptions=stale).until(text, "a flash message")


def click(
    driver: Any, form_action: str, label: str, row: Any = None, confirm: bool = False
) -> None:
    """Click the button labelled ``label`` of a form posting to ``/actions/FORM_ACTION``
    (``confirm``: and accept the confirmation it asks for)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.expected_conditions import alert_is_present, staleness_of

    scope = row or driver
    selector = f"form.action[action$='/actions/{form_action}'] button"
    buttons = [b for b in scope.find_elements(By.CSS_SELECTOR, selector) if b.text == label]
    assert buttons, f"no {label!r} button posting to {form_action}"
    buttons[0].click()
    if confirm:
        wait(driver, alert_is_present(), "the confirmation").accept()
    # The form posts and the answer replaces the page: wait for that, so that what is read
    # next (a flash message) is the new page's, not the old one's.
    wait(driver, staleness_of(buttons[0]), f"the page after {label!r}")


def state_of(dsn: str, task_id: int) -> tuple[Any, ...]:
    """A task's state, step and attempts, as stored."""
    return sql(
        dsn, "SELECT state::text, step, attempts FROM underway.task WHERE id = %s", (task_id,)
    )[0]


def test_every_page_loads_without_console_errors(browser: Any, dsn: str, site: str) -> None:
    """With a realistic database, each page renders (its heading, the stylesheet applied,
    the chart's 60 minutes drawn) and the browser logs no error; a missing task logs only
    its own 404. Saves the screenshots of the overview, a task and the failures."""
    from selenium.webdriver.common.by import By

    ids = seed_shop(dsn)
    pages = [
        ("/", "Overview"),
        ("/tasks", "Tasks"),
        ("/tasks?state=pending&queue=webhooks", "Tasks"),
        ("/failures", "Failures"),
        (f"/tasks/{ids['failed']}", f"#{ids['failed']}"),
        (f"/tasks/{ids['running']}", f"#{ids['running']}"),
        ("/dead-letters", "Dead letters"),
        ("/dead-letters?queue=billing-dead", "Dead letters"),
        ("/schedules", "Schedules"),
        ("/supervisors", "Supervisors"),
    ]
    for path, heading in pages:
        browser.get(site + path)
        assert heading in browser.find_element(By.TAG_NAME, "h1").text, path
        assert browser_errors(browser) == [], path
    browser.get(site + "/")
    wait(browser, lambda d: "Refreshing" in d.find_element(By.CSS_SELECTOR, ".refresh").text)
    topbar = browser.find_element(By.CSS_SELECTOR, ".topbar")
    assert topbar.value_of_css_property("background-color") == "rgba(17, 24, 39, 1)"
    assert len(browser.find_elements(By.CSS_SELECTOR, ".chart .col")) == 60
    assert browser.find_elements(By.CSS_SELECTOR, ".chart .s-failed")
    assert "paused" in browser.find_element(By.CSS_SELECTOR, "tr.is-paused").text
    save_screenshot(browser, "overview")
    save_screenshot(browser, "overview-full", full_page=True)
    browser.get(f"{site}/tasks/{ids['failed']}")
    save_screenshot(browser, "task", full_page=True)
    browser.get(site + "/failures")
    save_screenshot(browser, "failures", full_page=True)
    assert browser_errors(browser) == []

    browser.get(site + "/tasks/987654321")
    assert browser.find_element(By.TAG_NAME, "h1").text == "No task 987654321"
    assert browser_errors(browser, allow=("404",)) == []


def test_retry_button_runs_a_failed_task_again(browser: Any, dsn: str, site: str) -> None:
    """Retry on a task that failed at its second step puts it back to pending at that
    step with no tries used; a worker then runs it to success, and the page shows it."""
    from selenium.webdriver.common.by import By

    register(dsn)
    task_id = failed_flaky_task(dsn)
    assert state_of(dsn, task_id) == ("failed", 1, 1)
    browser.get(f"{site}/tasks/{task_id}")
    click(browser, "retry", "Retry")
    assert f"Task {task_id}: retried" in flash(browser)
    assert state_of(dsn, task_id) == ("pending", 1, 0)
    assert browser.find_element(By.CSS_SELECTOR, "h1 .badge").text == "pending"

    web_jobs.FLAKY["fail"] = False
    try:
        assert drain([web_jobs.flaky], dsn=dsn) == 1
    finally:
        web_jobs.FLAKY["fail"] = True
    assert state_of(dsn, task_id) == ("succeeded", 1, 1)
    browser.get(f"{site}/tasks/{task_id}")
    assert browser.find_element(By.CSS_SELECTOR, "h1 .badge").text == "succeeded"
    assert '"worked": true' in browser.find_element(By.CSS_SELECTOR, ".io-grid").text


def test_cancel_button_cancels_a_pending_task(browser: Any, dsn: str, site: str) -> None:
    """Cancel asks for confirmation, then cancels a waiting task: it never runs, and the
    flash says "cancelled" (the CancelResult)."""

    task_id = web_jobs.emails.enqueue({"user_id": 1, "name": "Ada"}).id
    browser.get(f"{site}/tasks/{task_id}")
    click(browser, "cancel", "Cancel", confirm=True)
    assert flash(browser) == f"Task {task_id}: cancelled — it will not run."
    assert state_of(dsn, task_id)[0] == "cancelled"
    assert drain([web_jobs.emails], dsn=dsn) == 0


def test_pause_and_resume_a_queue(browser: Any, dsn: str, site: str) -> None:
    """Pause on the overview pauses the queue (workers then leave its tasks alone) and
    turns into Resume, which resumes it."""
    from selenium.webdriver.common.by import By

    web_jobs.exports.enqueue({"day": 1})

    def exports_row() -> Any:
        rows = browser.find_elements(By.CSS_SELECTOR, "table.queues tbody tr")
        return next(r for r in rows if r.text.startswith("exports"))

    browser.get(site + "/")
    click(browser, "pause", "Pause", exports_row())
    assert flash(browser).startswith("Queue 'exports' paused")
    assert sql(dsn, "SELECT queue FROM underway.paused_queue") == [("exports",)]
    assert "paused" in exports_row().text
    assert drain([web_jobs.exports], dsn=dsn) == 0

    click(browser, "resume", "Resume", exports_row())
    assert flash(browser) == "Queue 'exports' resumed."
    assert sql(dsn, "SELECT queue FROM underway.paused_queue") == []
    assert drain([web_jobs.exports], dsn=dsn) == 1


def test_markup_in_inputs_and_errors_is_shown_as_text(browser: Any, dsn: str, site: str) -> None:
    """A task whose input and error hold <script> and an <img onerror> shows them as text
    on the task, tasks, failures and overview pages; none of it runs (no alert, no global
    set) and no element is created from it."""
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    script = "<script>window.__pwned = 1; alert('xss')</script>"
    image = '<img src="x" onerror="window.__pwned = 2; alert(2)">'
    task = web_jobs.hostile.enqueue({"name": script, "error": f"bad {image} {script}"})
    drain([web_jobs.hostile], dsn=dsn)
    for path in (f"/tasks/{task.id}", "/tasks", "/failures", "/"):
        browser.get(site + path)
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert.text  # noqa: B018 - reading it is the check
        assert browser.execute_script("return window.__pwned") is None, path
        assert browser.find_elements(By.CSS_SELECTOR, "main img, main script") == [], path
        assert "<img src=" in browser.find_element(By.TAG_NAME, "main").text, path
    browser.get(f"{site}/tasks/{task.id}")
    shown = browser.find_element(By.CSS_SELECTOR, ".io-grid pre").text
    assert script in shown
    assert script in browser.find_element(By.CSS_SELECTOR, ".traceback pre").text


def test_search_box_jumps_to_a_task(browser: Any, dsn: str, site: str) -> None:
    """Typing an id in the top bar's box and pressing Enter opens that task; an id with
    no task says so."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    task_id = web_jobs.emails.enqueue({"user_id": 2, "name": "Grace"}).id
    browser.get(site + "/failures")
    box = browser.find_element(By.CSS_SELECTOR, ".topbar input[name=id]")
    box.send_keys(f"#{task_id}", Keys.ENTER)
    wait(browser, lambda d: d.current_url.endswith(f"/tasks/{task_id}"))
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith(f"#{task_id}")

    box = browser.find_element(By.CSS_SELECTOR, ".topbar input[name=id]")
    box.send_keys(str(task_id + 1000), Keys.ENTER)
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "h1").text == f"No task {task_id + 1000}")


def test_read_only_dashboard_has_no_actions(browser: Any, dsn: str, read_only_site: str) -> None:
    """Read-only: no page carries an action form, the top bar says read-only, and a POST
    is refused (403) without changing anything."""
    from selenium.webdriver.common.by import By

    register(dsn)
    failed = failed_flaky_task(dsn)
    pending = web_jobs.exports.enqueue({"day": 3}).id
    for path in ("/", f"/tasks/{failed}", f"/tasks/{pending}", "/failures", "/tasks"):
        browser.get(read_only_site + path)
        assert browser.find_elements(By.CSS_SELECTOR, "form[method=post]") == [], path
        assert browser.find_element(By.CSS_SELECTOR, ".pill-ro").text == "read-only"
    for action, form in (("cancel", {"id": pending}), ("pause", {"queue": "exports"})):
        reply = http(f"{read_only_site}/actions/{action}", form)
        assert reply.status == 403 and "read-only" in reply.text
    assert state_of(dsn, pending)[0] == "pending"
    assert sql(dsn, "SELECT count(*) FROM underway.paused_queue") == [(0,)]


@pytest.fixture
def quick_site(browser: Any, dsn: str) -> Iterator[str]:
    """The dashboard, its overview refreshing every 0.3 s."""
    yield from _site(browser, dsn, refresh=0.3)


def test_overview_refreshes_itself(browser: Any, dsn: str, quick_site: str) -> None:
    """The overview's script reloads its content in place: a queue that appears after the
    page loaded shows up without navigating (the page's own state survives)."""
    from selenium.webdriver.common.by import By

    browser.get(quick_site + "/")
    browser.execute_script("window.__same_page = true")
    web_jobs.reports.enqueue({"period": "weekly"})
    wait(
        browser,
        lambda d: "reports" in d.find_element(By.CSS_SELECTOR, "[data-refresh]").text,
        "the new queue to appear",
    )
    assert browser.execute_script("return window.__same_page") is True
    assert "Updated" in browser.find_element(By.CSS_SELECTOR, ".refresh").text
    assert browser_errors(browser) == []


def test_chart_shows_a_minute_on_hover(browser: Any, dsn: str, site: str) -> None:
    """Hovering a minute of the throughput chart shows its time and counts."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    sql(
        dsn,
        """INSERT INTO underway.minute_stat (minute, queue, job, succeeded, failed, retried)
           VALUES (date_trunc('minute', now()) - interval '5 minutes', 'q', 'j', 42, 3, 1)""",
    )
    browser.get(site + "/")
    column = browser.find_elements(By.CSS_SELECTOR, ".chart .col")[-6]
    ActionChains(browser).move_to_element(column).perform()
    tip = browser.find_element(By.CSS_SELECTOR, ".chart .tooltip")
    wait(browser, lambda d: tip.is_displayed())
    assert tip.text.endswith("UTC: 42 succeeded, 1 retried, 3 failed")


def test_the_flask_example_serves_the_dashboard_at_its_mount(browser: Any, dsn: str) -> None:
    """examples/flask_app under gunicorn shows the dashboard at /underway: styled, its
    navigation and search staying under the mount, no console error."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from .test_flask_example import gunicorn

    task_id = web_jobs.emails.enqueue({"user_id": 5, "name": "Barbara"}).id
    env = {"UNDERWAY_WEB_PASSWORD": "", "UNDERWAY_WEB_SECRET_KEY": ""}
    with gunicorn(dsn, env=env) as base_url:
        browser.get(base_url + "/underway/")
        assert browser.find_element(By.TAG_NAME, "h1").text == "Overview"
        topbar = browser.find_element(By.CSS_SELECTOR, ".topbar")
        assert topbar.value_of_css_property("background-color") == "rgba(17, 24, 39, 1)"
        browser.find_element(By.LINK_TEXT, "Tasks").click()
        wait(browser, lambda d: d.current_url == f"{base_url}/underway/tasks")
        box = browser.find_element(By.CSS_SELECTOR, ".topbar input[name=id]")
        box.send_keys(str(task_id), Keys.ENTER)
        wait(browser, lambda d: d.current_url == f"{base_url}/underway/tasks/{task_id}")
        assert "send-welcome-email" in browser.find_element(By.TAG_NAME, "h1").text
        assert browser_errors(browser) == []
        browser.get("about:blank")
