"""An operator's morning, in a real browser: sign in, see both databases, back one up and
watch the bar move to done, verify the new archive, ask for a restore and see it wait for
two approvals — then the same pages on a phone, checked for labels, contrast and keyboard use."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from django.utils import timezone

from tests.conftest import FIXTURE_SQL, PASSWORD, ensure_roles, make_user

pytestmark = [pytest.mark.browser, pytest.mark.pg, pytest.mark.slow]

# About 25 MB of incompressible rows behind a 5 MB/s link: the dump takes several seconds.
BIG_SQL = FIXTURE_SQL + """
CREATE TABLE sessions AS SELECT g AS id, md5(g::text) AS token, md5((g * 7)::text) AS secret_hash
FROM generate_series(1, 250000) g;
ANALYZE;
"""

A11Y_JS = (Path(__file__).parent / "a11y.js").read_text()


def accessible(page) -> list[str]:
    return page.evaluate(A11Y_JS)


def fits(page) -> bool:
    return page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth + 1")


def sign_in(page, base: str, username: str):
    page.goto(base + "/")
    assert page.url.startswith(base + "/accounts/login/")  # anonymous visitors are sent to sign in
    page.get_by_label("Username", exact=True).fill(username)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(base + "/")


@pytest.fixture
def stack(transactional_db, live_server, repo, celery_worker_thread, make_target_db, target_cluster, slow_link):
    # transactional_db first: the test database is then set up before the (session-long) live
    # server and torn down after it, so the server's connection is gone by then.
    ensure_roles()
    operator = make_user("olga", "operator")
    auth = make_target_db("auth", sql=BIG_SQL)
    link = slow_link(target_cluster.port, 5 * 1024 * 1024)
    auth.port = link.port
    auth.save(update_fields=["port"])
    account = make_target_db("account")
    return {"base": live_server.url, "operator": operator, "auth": auth, "account": account}


def test_an_operators_morning(stack, chromium, artifacts):
    from backups.models import Archive
    from recovery.models import RestoreRequest

    base = stack["base"]
    page = chromium.new_page(viewport={"width": 1280, "height": 800})
    sign_in(page, base, "olga")

    # Both databases, each with its card.
    for name in ("auth", "account"):
        assert page.locator(f'article[data-database="{name}"]').is_visible()
    page.screenshot(path=str(artifacts / "overview.png"), full_page=True)
    assert accessible(page) == []

    # Back up auth and watch the bar: it must be seen moving, never backwards, and end at done.
    page.get_by_role("button", name="Back up auth now").click()
    page.wait_for_url(f"{base}/runs/*/")
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = page.get_by_test_id("run-state").inner_text()
        bar = page.get_by_test_id("run-progress")
        value = int(bar.get_attribute("value")) if bar.count() else None
        if not seen or seen[-1] != (state, value):
            seen.append((state, value))
        if state in ("succeeded", "failed"):
            break
        time.sleep(0.1)
    assert seen[-1] == ("succeeded", 100), seen
    values = [v for _, v in seen if v is not None]
    assert values == sorted(values), seen
    assert any(s == "running" and 0 < v < 100 for s, v in seen), f"the bar never showed a step between: {seen}"

    # The new archive, verified from its page.
    page.get_by_test_id("archive-link").click()
    archive = Archive.objects.get(database=stack["auth"])
    page.wait_for_url(f"{base}/archives/{archive.pk}/")
    checked_when_written = archive.verified_at  # the backup itself re-reads what it wrote
    page.get_by_role("button", name="Verify now").click()
    page.wait_for_url(f"{base}/archives/{archive.pk}/")
    assert "every file matches its checksum" in page.content()
    archive.refresh_from_db()
    assert archive.verified_at > checked_when_written and not archive.verify_error
    assert page.get_by_test_id("verified-at").inner_text() == timezone.localtime(archive.verified_at).strftime(
        "%Y-%m-%d %H:%M:%S")
    assert accessible(page) == []

    # The database page, with its charts.
    page.goto(f"{base}/databases/auth/")
    page.wait_for_selector("canvas")
    page.screenshot(path=str(artifacts / "database-auth.png"), full_page=True)
    assert accessible(page) == []

    # Ask for a restore of that archive: it waits for two approvals, nothing runs.
    page.goto(f"{base}/archives/{archive.pk}/")
    page.get_by_role("link", name="Request a restore of this archive").click()
    page.get_by_label("Mode").select_option("copy")
    page.get_by_label("New name").fill("auth_investigation")
    page.get_by_label("Reason (required)").fill("INC-4711: compare yesterday's sessions")
    assert accessible(page) == []
    page.get_by_role("button", name="File the request").click()
    page.wait_for_url(f"{base}/restores/*/")
    req = RestoreRequest.objects.get()
    assert req.state == "pending" and req.requester == stack["operator"]
    assert page.locator("[data-state]").first.inner_text() == "pending"
    assert "Approvals (0 of 2)" in page.content()

    # Keyboard only: the first Tab lands on the skip link, and it leads to the content.
    page.goto(base + "/")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.textContent.trim()") == "Skip to content"
    page.keyboard.press("Enter")
    assert page.evaluate("() => location.hash") == "#main"

    # A phone: the same pages, without sideways scrolling.
    phone = chromium.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
    sign_in(phone, base, "olga")
    for url in ("/", "/databases/auth/", f"/archives/{archive.pk}/", "/runs/", f"/restores/{req.pk}/"):
        phone.goto(base + url)
        assert fits(phone), url
        assert accessible(phone) == [], url
    phone.goto(base + "/")
    phone.screenshot(path=str(artifacts / "overview-phone.png"), full_page=True)
