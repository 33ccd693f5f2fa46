"""A scripted day at the bank, through the same doors people use (sign-in page, dashboard,
restore pages, the command line), against a real cluster — and the exact trail it leaves."""

import pytest
from django.core.management import call_command
from django.test import Client

import audit
from audit import chain
from audit.models import AuditEvent
from backups.engine import runner as backup_runner
from backups.models import Archive, BackupRun
from recovery.engine import runner as restore_runner
from recovery.models import RestoreRequest
from tests.conftest import PASSWORD

pytestmark = [pytest.mark.pg, pytest.mark.slow]

OFFICE = "10.20.0.7"  # where the people of this day sit


def person(username, password=PASSWORD, ip=OFFICE) -> Client:
    client = Client(REMOTE_ADDR=ip, HTTP_USER_AGENT="scripted-day")
    client.post("/accounts/login/", {"username": username, "password": password})
    return client


def test_a_day_of_activity_leaves_exactly_this_trail(personas, target_db, repo, monkeypatch,
                                                      django_capture_on_commit_callbacks):
    queued = []
    monkeypatch.setattr("backups.services.dispatch", lambda run: queued.append(("backup", run.pk)))
    monkeypatch.setattr("recovery.models._dispatch", lambda pk: queued.append(("restore", pk)))
    target_db.name = "auth"
    target_db.save()
    start = chain.head()[0]
    CLI = audit.cli_actor()  # cli:<the OS user running the command>

    # 08:00 a stranger tries a password; Olga signs in.
    person("mallory", "guess", ip="203.0.113.9")
    olga = person("olga")
    # 08:05 the administrator adds an approver from the command line.
    monkeypatch.setenv("NEW_PASSWORD", PASSWORD)
    call_command("users", "add", "erik", "--role", "approver", "--email", "erik@bank.example",
                 "--password-env", "NEW_PASSWORD")
    # 08:10 Olga backs up auth from the dashboard; a worker runs it.
    with django_capture_on_commit_callbacks(execute=True):
        olga.post("/databases/auth/backup/", {"kind": "logical"})
    assert queued.pop() == ("backup", BackupRun.objects.get().pk)
    archive = backup_runner.execute(BackupRun.objects.get().pk)
    # 08:20 she verifies the archive and downloads its manifest.
    olga.post(f"/archives/{archive.pk}/verify/")
    olga.get(f"/archives/{archive.pk}/files/manifest.json")
    # 09:00 she asks for a copy of it; Anna and Bert approve; a worker restores.
    with django_capture_on_commit_callbacks(execute=True):
        olga.post("/restores/new/", {"kind": "archive", "archive": archive.pk, "mode": "copy",
                                     "new_name": "auth_inc4711", "reason": "INC-4711: compare sessions"})
        req = RestoreRequest.objects.get()
        for approver in ("anna", "bert"):
            person(approver).post(f"/restores/{req.pk}/approve/", {"password": PASSWORD, "comment": "ok"})
    assert queued.pop() == ("restore", req.pk)
    restore_runner.execute(req.pk)
    # 16:00 Audrey reads Olga's events and exports them; Olga signs out.
    audrey = person("audrey")
    audrey.get("/audit/", {"actor": "olga"})
    b"".join(audrey.get("/audit/export.csv", {"actor": "olga"}).streaming_content)
    olga.post("/accounts/logout/")

    trail = [(e.actor_label, e.action, e.outcome, e.target_type)
             for e in AuditEvent.objects.filter(sequence__gt=start).order_by("sequence")]
    assert trail == [
        ("anonymous:mallory", "auth.login.failed", "failure", "auth.user"),
        ("olga", "auth.login.succeeded", "success", "auth.user"),
        (CLI, "config.user.created", "success", "auth.user"),
        (CLI, "config.user.groups.added", "success", "auth.user"),
        ("olga", "backup.run.queued", "success", "backups.backuprun"),
        ("system:worker", "backup.run.started", "success", "backups.backuprun"),
        ("system:worker", "backup.run.succeeded", "success", "backups.backuprun"),
        ("olga", "archive.verified", "success", "backups.archive"),
        ("olga", "archive.downloaded", "success", "backups.archive"),
        ("olga", "restore.request.created", "success", "recovery.restorerequest"),
        ("anna", "auth.login.succeeded", "success", "auth.user"),
        ("anna", "restore.request.approved_by", "success", "recovery.restorerequest"),
        ("bert", "auth.login.succeeded", "success", "auth.user"),
        ("bert", "restore.request.approved_by", "success", "recovery.restorerequest"),
        ("bert", "restore.request.approved", "success", "recovery.restorerequest"),
        ("system:worker", "restore.request.started", "success", "recovery.restorerequest"),
        ("system:worker", "restore.request.succeeded", "success", "recovery.restorerequest"),
        ("audrey", "auth.login.succeeded", "success", "auth.user"),
        ("audrey", "audit.log.viewed", "success", ""),
        ("audrey", "audit.exported", "success", ""),
        ("olga", "auth.logout", "success", "auth.user"),
    ]
    # Who did it from where, and nothing secret in any of it.
    web = AuditEvent.objects.filter(sequence__gt=start, actor_label__in=["olga", "anna", "bert", "audrey"])
    assert {e.source_ip for e in web} == {OFFICE} and all(e.request_id for e in web)
    assert AuditEvent.objects.get(sequence__gt=start, action="auth.login.failed").source_ip == "203.0.113.9"
    assert RestoreRequest.objects.get().state == "succeeded" and Archive.objects.count() == 1
    everything = "".join(str(e.details) + e.target_label for e in AuditEvent.objects.filter(sequence__gt=start))
    assert PASSWORD not in everything and "guess" not in everything
    assert chain.verify()[1] == []
