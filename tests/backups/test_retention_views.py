"""The retention pages (the dry run, legal holds on the archive page) and `manage.py archives
hold|release|cleanup`."""

from __future__ import annotations

import json
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from audit.models import AuditEvent
from backups.models import Archive, Database
from tests.backups.test_retention import alive, make_archive, make_policy

pytestmark = [pytest.mark.django_db]


@pytest.fixture
def auth(repo):
    return Database.objects.create(name="auth", host="127.0.0.1", port=1, dbname="authdb", user="u")


@pytest.fixture
def history(auth, repo):
    """Three archives; the policy keeps one daily archive and nothing by age, so the two older go."""
    make_policy(auth, keep_daily=1, keep_weekly=0, keep_monthly=0, keep_days=0)
    old = make_archive(auth, repo, started=timezone.now() - timedelta(days=9))
    older = make_archive(auth, repo, started=timezone.now() - timedelta(days=10))
    newest = make_archive(auth, repo)
    return old, older, newest


def run(*args) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=out)
    return out.getvalue()


# -- the dry-run page ------------------------------------------------------------------------------------
def test_every_role_reads_the_dry_run_and_it_changes_nothing(client, personas, history):
    old, older, newest = history
    for who in ("operator", "approver_a", "auditor", "superuser"):
        client.force_login(personas[who])
        page = client.get("/retention/")
        assert page.status_code == 200, who
    html = page.content.decode()
    assert 'data-testid="retention-total">2 archives' in html
    assert f'data-testid="delete-{old.pk}"' in html and f'data-testid="delete-{older.pk}"' in html
    assert f'data-testid="keep-{newest.pk}"' in html and "newest good archive" in html
    assert "not the newest archive of one of the last 1 days, 0 weeks or 0 months, older than 0 days" in html
    assert "No enabled base policy: nothing is deleted." in html
    assert alive(old.database) == {old.path, older.path, newest.path}
    assert not AuditEvent.objects.filter(action="archive.expired").exists()
    client.force_login(personas["outsider"])
    assert client.get("/retention/").status_code == 403
    client.logout()
    assert client.get("/retention/").status_code == 302


def test_the_nav_links_to_the_retention_page(client, personas):
    client.force_login(personas["auditor"])
    assert 'href="/retention/">Retention</a>' in client.get("/").content.decode()


# -- legal hold on the archive page ---------------------------------------------------------------------------
def test_an_operator_places_and_lifts_a_hold_with_a_reason(client, personas, history):
    old, _, _ = history
    client.force_login(personas["operator"])
    page = client.get(f"/archives/{old.pk}/").content.decode()
    assert f'action="/archives/{old.pk}/hold/"' in page
    response = client.post(f"/archives/{old.pk}/hold/", {"reason": "case 2026-117"}, follow=True)
    assert "is under legal hold" in response.content.decode()
    old.refresh_from_db()
    assert old.legal_hold and old.legal_hold_reason == "case 2026-117"
    page = client.get(f"/archives/{old.pk}/").content.decode()
    assert "case 2026-117" in page and f'action="/archives/{old.pk}/release/"' in page
    plan = client.get("/retention/").content.decode()
    assert f'data-testid="keep-{old.pk}"' in plan and "legal hold" in plan

    client.post(f"/archives/{old.pk}/release/", {"reason": "case closed"})
    old.refresh_from_db()
    assert not old.legal_hold
    actions = list(AuditEvent.objects.filter(target_id=str(old.pk), action__startswith="archive.legal_hold")
                   .order_by("sequence").values_list("action", "actor_label", "outcome"))
    assert actions == [("archive.legal_hold.placed", "olga", "success"),
                       ("archive.legal_hold.lifted", "olga", "success")]


def test_a_hold_without_a_reason_changes_nothing(client, personas, history):
    old, _, _ = history
    client.force_login(personas["operator"])
    response = client.post(f"/archives/{old.pk}/hold/", {"reason": "  "}, follow=True)
    assert "Nothing changed: give a reason" in response.content.decode()
    old.refresh_from_db()
    assert not old.legal_hold
    assert not AuditEvent.objects.filter(action__startswith="archive.legal_hold").exists()


def test_only_operators_hold_and_a_refusal_is_audited(client, personas, history):
    old, _, _ = history
    for who in ("approver_a", "auditor"):
        client.force_login(personas[who])
        assert "hold/" not in client.get(f"/archives/{old.pk}/").content.decode()
        assert client.post(f"/archives/{old.pk}/hold/", {"reason": "x"}).status_code == 403
    client.force_login(personas["operator"])
    assert client.get(f"/archives/{old.pk}/hold/").status_code == 405
    assert client.post("/archives/999999/hold/", {"reason": "x"}).status_code == 404
    old.refresh_from_db()
    assert not old.legal_hold
    denied = AuditEvent.objects.filter(action="archive.legal_hold.placed", outcome="denied")
    assert sorted(denied.values_list("actor_label", flat=True)) == ["anna", "audrey"]


def test_an_expired_archive_shows_when_and_offers_no_hold(client, personas, history):
    old, _, _ = history
    Archive.objects.filter(pk=old.pk).update(state="expired", expired_at=timezone.now())
    client.force_login(personas["operator"])
    page = client.get(f"/archives/{old.pk}/").content.decode()
    assert 'data-testid="expired-at"' in page and "hold/" not in page
    response = client.post(f"/archives/{old.pk}/hold/", {"reason": "late"}, follow=True)
    assert "files are gone and cannot be held" in response.content.decode()


# -- the command ------------------------------------------------------------------------------------------------
def test_cli_dry_run_lists_what_would_go_and_changes_nothing(history):
    old, older, newest = history
    out = run("archives", "cleanup", "--dry-run")
    assert f"delete {old.pk:>6}" in out and f"delete {older.pk:>6}" in out and "dry run: nothing was changed" in out
    assert "logical archives (daily: 1 daily, 0 weekly, 0 monthly, everything younger than 0 days): 2 to delete" in out
    data = json.loads(run("archives", "cleanup", "--dry-run", "--json"))
    assert [r["id"] for r in data[0]["delete"]] == [old.pk, older.pk]
    assert data[0]["keep"][0]["reasons"][0] == "newest good archive"
    assert alive(old.database) == {old.path, older.path, newest.path}


def test_cli_cleanup_expires_and_names_the_os_user(history):
    old, older, newest = history
    out = run("archives", "cleanup", "--database", "auth")
    assert "auth: 2 archive(s) expired" in out
    assert alive(old.database) == {newest.path}
    actors = set(AuditEvent.objects.filter(action="archive.expired").values_list("actor_label", flat=True))
    assert len(actors) == 1 and actors.pop().startswith("cli:")


def test_cli_hold_and_release(history):
    old, _, _ = history
    assert "is under legal hold: case 9" in run("archives", "hold", str(old.pk), "--reason", "case 9")
    assert "[legal hold]" in run("archives", "list")
    run("archives", "cleanup")
    assert old.path in alive(old.database)
    with pytest.raises(CommandError, match="already under legal hold"):
        run("archives", "hold", str(old.pk), "--reason", "again")
    assert "legal hold lifted" in run("archives", "release", str(old.pk), "--reason", "released by counsel")
    event = AuditEvent.objects.filter(action="archive.legal_hold.lifted").get()
    assert event.actor_label.startswith("cli:") and event.details["hold_reason"] == "case 9"


def test_cli_refuses_bad_input_and_changes_nothing(history):
    old, _, _ = history
    with pytest.raises(CommandError, match="--reason"):
        run("archives", "hold", str(old.pk))
    with pytest.raises(CommandError, match="give a reason"):
        run("archives", "hold", str(old.pk), "--reason", "")
    with pytest.raises(CommandError, match="no archive with id 424242"):
        run("archives", "hold", "424242", "--reason", "x")
    with pytest.raises(CommandError, match="no database named nosuch"):
        run("archives", "cleanup", "--database", "nosuch")
    assert len(alive(old.database)) == 3
    assert not AuditEvent.objects.filter(action__in=["archive.expired", "archive.legal_hold.placed"]).exists()
