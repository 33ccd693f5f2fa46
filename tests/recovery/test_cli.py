"""The recover command files requests (never runs them); users provisions people and roles."""

from io import StringIO

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command

import audit
from audit.models import AuditEvent
from recovery.models import RestoreRequest
from tests.recovery.conftest import PASSWORD
from tests.recovery.test_bypass import make_archive

pytestmark = [pytest.mark.django_db]


def run(*args, stdin=None, monkeypatch=None) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=out)
    return out.getvalue()


def test_recover_archive_files_a_pending_request_and_prints_id_and_url(personas):
    archive = make_archive("auth")
    out = run("recover", "--database", "auth", "--archive", str(archive.pk), "--user", "olga",
              "--reason", "table dropped by mistake", "--ticket", "CHG-7")
    req = RestoreRequest.objects.get()
    assert f"id: {req.pk}" in out and f"url: http://127.0.0.1:8000/restores/{req.pk}/" in out
    assert "after 2 approvals" in out
    assert (req.kind, req.mode, req.state, req.change_ticket) == ("archive", "replace", "pending", "CHG-7")
    assert req.started_at is None  # nothing ran
    assert AuditEvent.objects.get(action="restore.request.created").details["via"].startswith("cli (cli:")


def test_recover_copy_as_full_and_pitr(personas):
    auth, account = make_archive("auth"), make_archive("account")
    run("recover", "--database", "auth", "--archive", str(auth.pk), "--copy-as", "auth_check",
        "--user", "olga", "--reason", "r")
    RestoreRequest.objects.filter(new_name="auth_check").update(state="cancelled")
    stamp = auth.started_at.strftime("%Y%m%d_%H%M%S")
    run("recover", "--full", stamp, "--user", "olga", "--reason", "r")
    system = RestoreRequest.objects.get(kind="system")
    assert {i["archive"] for i in system.items} == {auth.pk, account.pk}
    RestoreRequest.objects.filter(kind="system").update(state="cancelled")
    auth.database.wal_mode = "archive"
    auth.database.save()
    run("recover", "--pitr", "2026-11-20 14:30:00", "--timezone", "Europe/Berlin", "--database", "auth",
        "--user", "olga", "--reason", "r")
    pitr = RestoreRequest.objects.get(kind="pitr")
    assert pitr.target_time.isoformat() == "2026-11-20T13:30:00+00:00"


def test_recover_refuses_without_a_proper_user_or_reason(personas):
    archive = make_archive("auth")
    with pytest.raises(CommandError, match="--user USERNAME"):
        run("recover", "--archive", str(archive.pk), "--reason", "r")
    with pytest.raises(CommandError, match="only active members of the operator group"):
        run("recover", "--archive", str(archive.pk), "--user", "anna", "--reason", "r")
    with pytest.raises(CommandError, match="reason: Say why"):
        run("recover", "--archive", str(archive.pk), "--user", "olga")
    with pytest.raises(CommandError, match="choose one of"):
        run("recover", "--user", "olga", "--reason", "r")
    assert not RestoreRequest.objects.exists()
    assert AuditEvent.objects.filter(action="restore.request.denied", actor_label="anna").exists()


def test_recover_interactive_shows_the_old_menu(personas, monkeypatch):
    make_archive("auth")
    make_archive("account")
    answers = iter(["2", "restore account as drill"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    out = run("recover", "--interactive", "--user", "olga")
    assert "=== Recovery Options ===\n1. Restore Account Service\n2. Restore Auth Service\n" \
           "3. Restore Both Services\n4. Point-in-Time Recovery\n5. Exit" in out
    assert RestoreRequest.objects.get().database.name == "auth"
    monkeypatch.setattr("builtins.input", lambda prompt="": "5")
    run("recover", "--interactive", "--user", "olga")
    assert RestoreRequest.objects.count() == 1


def test_users_add_list_deactivate(monkeypatch, client, db):
    from tests.recovery.conftest import ensure_roles

    ensure_roles()
    monkeypatch.setenv("NEW_PW", PASSWORD)
    out = run("users", "add", "ines", "--email", "ines@bank.example", "--role", "operator", "--role", "approver",
              "--password-env", "NEW_PW")
    assert "added ines (approver, operator)" in out
    ines = User.objects.get(username="ines")
    assert ines.check_password(PASSWORD) and sorted(g.name for g in ines.groups.all()) == ["approver", "operator"]
    assert "ines" in run("users", "list") and '"roles": [' in run("users", "list", "--json")
    with pytest.raises(CommandError, match="exists already"):
        run("users", "add", "ines", "--role", "auditor", "--password-env", "NEW_PW")
    monkeypatch.setenv("WEAK", "123")
    with pytest.raises(CommandError, match="too short"):
        run("users", "add", "weak", "--role", "auditor", "--password-env", "WEAK")

    client.force_login(ines)
    assert client.get("/restores/").status_code == 200
    assert "1 session(s) ended" in run("users", "deactivate", "ines")
    assert client.get("/restores/").status_code == 302  # signed out at once
    trail = list(AuditEvent.objects.filter(target_id=str(ines.pk), action__startswith="config.")
                 .order_by("sequence").values_list("actor_label", "action"))
    me = audit.cli_actor()
    assert trail == [(me, "config.user.created"), (me, "config.user.groups.added"), (me, "config.user.deactivated")]
    created = AuditEvent.objects.get(action="config.user.created", target_id=str(ines.pk))
    assert created.details["changes"]["email"] == [None, "ines@bank.example"]


def test_pitr_latest_and_overlapping_requests(personas):
    auth = make_archive("auth")
    make_archive("account")
    Database = type(auth.database)
    Database.objects.update(wal_mode="archive")
    out = run("recover", "--pitr", "latest", "--database", "auth", "--user", "olga", "--reason", "server lost")
    req = RestoreRequest.objects.get()
    assert "filed" in out and req.kind == "pitr" and req.target_time is None
    # an all-database request would cover auth too: one live restore per database
    with pytest.raises(CommandError, match="auth already has an open restore request"):
        run("recover", "--full", auth.started_at.strftime("%Y%m%d_%H%M%S"), "--user", "olga", "--reason", "r")
    with pytest.raises(CommandError, match="Give the point in time, or 'latest'"):
        from recovery import services

        try:
            services.file_request(personas["operator"], kind="pitr", reason="r", mode="replace")
        except Exception as exc:
            raise CommandError(str(exc)) from None
