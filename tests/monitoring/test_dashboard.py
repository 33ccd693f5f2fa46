"""The dashboard pages: who sees them, what they show, and a number of queries that does not
grow with the history behind them."""

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from audit.models import AuditEvent
from backups.models import Archive, ArchiveFile, BackupRun, Database
from monitoring.models import CheckState, Drill

pytestmark = [pytest.mark.django_db]
PAGES = ["/", "/runs/", "/archives/", "/health/"]


def history(db: Database, n: int):
    """n finished runs with their archives, spread over 60 days."""
    now = timezone.now()
    runs = BackupRun.objects.bulk_create([
        BackupRun(database=db, trigger="scheduled", state="succeeded", queued_at=now - timedelta(hours=12 * i),
                  started_at=now - timedelta(hours=12 * i), finished_at=now - timedelta(hours=12 * i, seconds=-30),
                  bytes=1000 + i) for i in range(n)])
    archives = Archive.objects.bulk_create([
        Archive(run=r, database=db, path=f"archives/{db.name}/{r.pk}", started_at=r.started_at,
                finished_at=r.finished_at, bytes=r.bytes, compression="zstd", manifest_sha256="0" * 64)
        for r in runs])
    ArchiveFile.objects.bulk_create([ArchiveFile(archive=a, path="dump.pgdump.zst", role="dump", bytes=a.bytes,
                                                 sha256="a" * 64) for a in archives])


@pytest.fixture
def dbs():
    return [Database.objects.create(name=n, host="127.0.0.1", port=5433 + i, dbname=f"{n}db", user="u")
            for i, n in enumerate(("auth", "account"))]


def queries(client, url) -> int:
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url)
    assert response.status_code == 200, url
    return len(ctx.captured_queries)


def test_pages_need_a_role(client, personas, dbs):
    for url in PAGES + ["/databases/auth/"]:
        assert client.get(url).status_code == 302  # anonymous: sign in first
        client.force_login(personas["outsider"])
        assert client.get(url).status_code == 403
        for who in ("operator", "approver_a", "auditor", "superuser"):
            client.force_login(personas[who])
            assert client.get(url).status_code == 200, (who, url)
        client.logout()


def test_the_overview_shows_every_database_with_its_state(client, personas, dbs):
    auth, account = dbs
    history(auth, 3)
    CheckState.objects.create(name="connectivity", target="account", status="failing",
                              summary="cannot reach the database server at 127.0.0.1:5434")
    Drill.objects.create(database=auth, kind="archive", state="succeeded", rto_seconds=12.5,
                         finished_at=timezone.now())
    client.force_login(personas["operator"])
    page = client.get("/").content.decode()
    assert 'data-database="auth"' in page and 'data-database="account"' in page
    assert "RTO 12.5 s" in page and "cannot reach the database server" in page
    assert 'data-testid="overall">failing' in page
    assert "Back up now" in page
    client.force_login(personas["auditor"])
    assert "Back up now" not in client.get("/").content.decode()


def test_query_counts_do_not_grow_with_history(client, personas, dbs):
    auth, _ = dbs
    client.force_login(personas["auditor"])
    history(auth, 5)
    small = {url: queries(client, url) for url in PAGES + ["/databases/auth/", "/databases/auth/?days=90"]}
    history(auth, 200)

    large = {url: queries(client, url) for url in small}
    assert large == small


def test_backup_now_needs_the_permission(client, personas, dbs, monkeypatch):
    sent = []
    monkeypatch.setattr("backups.services.dispatch", lambda run: sent.append(run.pk))
    client.force_login(personas["approver_a"])
    assert client.post("/databases/auth/backup/", {"kind": "logical"}).status_code == 403
    client.force_login(personas["operator"])
    response = client.post("/databases/auth/backup/", {"kind": "logical"})
    run = BackupRun.objects.get()
    assert response.status_code == 302 and response.url == f"/runs/{run.pk}/"
    assert run.requested_by == personas["operator"] and run.trigger == "manual"
    assert client.post("/databases/auth/backup/", {"kind": "base"}, follow=True).content.decode().count(
        "auth has no WAL archiving: a base backup could not be restored") == 1
    progress = client.get(f"/runs/{run.pk}/progress/").content.decode()
    assert 'data-state="queued"' in progress and 'hx-trigger="every 1s"' in progress


@pytest.mark.pg
def test_verify_button_verifies_a_real_archive(client, personas, target_db, repo):
    from backups.engine import runner

    archive = runner.execute(BackupRun.enqueue(target_db, trigger="manual", actor_label="test").pk)
    client.force_login(personas["auditor"])
    assert client.post(f"/archives/{archive.pk}/verify/").status_code == 403
    client.force_login(personas["operator"])
    page = client.post(f"/archives/{archive.pk}/verify/", follow=True).content.decode()
    assert "every file matches its checksum" in page
    assert AuditEvent.objects.filter(action="archive.verified", actor_label="olga").exists()


def test_runs_and_archives_filter_and_page_by_keyset(client, personas, dbs):
    auth, account = dbs
    history(auth, 60)
    history(account, 2)
    client.force_login(personas["operator"])
    page = client.get("/runs/?database=account").content.decode()
    assert page.count("<tr><td><a href=\"/runs/") == 2
    first = client.get("/runs/?database=auth").content.decode()
    assert "Older runs" in first
    oldest_shown = min(int(x) for x in __import__("re").findall(r'href="/runs/(\d+)/"', first))
    second = client.get(f"/runs/?database=auth&before={oldest_shown}").content.decode()
    assert second.count("<tr><td><a href=\"/runs/") == 10
    assert client.get("/archives/?database=auth&kind=logical").status_code == 200


def test_a_running_drill_shows_a_progress_bar_until_it_ends(client, personas, dbs):
    auth, _ = dbs
    drill = Drill.objects.create(database=auth, kind="archive")
    drill.report_progress(3, 4, "restoring into auth")
    client.force_login(personas["outsider"])
    assert client.get(f"/drills/{drill.pk}/").status_code == 403
    assert client.get(f"/drills/{drill.pk}/progress/").status_code == 403
    client.force_login(personas["auditor"])
    bar = client.get(f"/drills/{drill.pk}/progress/").content.decode()
    assert 'value="75"' in bar and "restoring into auth" in bar and 'hx-trigger="every 1s"' in bar
    Drill.objects.filter(pk=drill.pk).update(state="failed", error="pg_restore failed: disk full")
    drill.report_progress(4, 4, "too late")  # a finished drill's progress no longer moves
    page = client.get(f"/drills/{drill.pk}/").content.decode()
    assert "pg_restore failed: disk full" in page and "hx-trigger" not in page and "too late" not in page
    assert f'href="/drills/{drill.pk}/"' in client.get("/databases/auth/").content.decode()


@pytest.mark.pg
def test_downloads_are_for_operators_and_every_one_is_audited(client, personas, target_db, repo):
    import hashlib

    from backups.engine import runner

    archive = runner.execute(BackupRun.enqueue(target_db, trigger="manual", actor_label="test").pk)
    dump = archive.files.get(role="dump")
    url = f"/archives/{archive.pk}/files/{dump.path}"
    client.force_login(personas["auditor"])
    assert client.get(url).status_code == 403
    assert f"/files/{dump.path}" not in client.get(f"/archives/{archive.pk}/").content.decode()
    denied = AuditEvent.objects.get(action="archive.download.denied")
    assert (denied.actor_label, denied.outcome, denied.details["file"]) == ("audrey", "denied", dump.path)

    client.force_login(personas["operator"])
    assert f'href="{url}"' in client.get(f"/archives/{archive.pk}/").content.decode()
    response = client.get(url)
    body = b"".join(response.streaming_content)
    assert response.status_code == 200 and hashlib.sha256(body).hexdigest() == dump.sha256
    assert response["X-Checksum-SHA256"] == dump.sha256
    assert f'filename="{dump.path}"' in response["Content-Disposition"]
    event = AuditEvent.objects.filter(action="archive.downloaded").get()
    assert (event.actor_label, event.outcome, event.target_id) == ("olga", "success", str(archive.pk))
    assert event.details == {"file": dump.path, "bytes": dump.bytes, "sha256": dump.sha256}
    manifest = b"".join(client.get(f"/archives/{archive.pk}/files/manifest.json").streaming_content)
    assert hashlib.sha256(manifest).hexdigest() == archive.manifest_sha256

    # Only the archive's own files: no way out of its directory.
    for name in ("../../../../etc/passwd", "globals.sql.bak", "%2e%2e/manifest.json"):
        assert client.get(f"/archives/{archive.pk}/files/{name}").status_code == 404, name

    # A file gone from the repository: a clear message, and the failure is on record.
    (repo.archive_dir(archive.path) / dump.path).unlink()
    page = client.get(url, follow=True).content.decode()
    assert "cannot be read from the repository" in page and "verify the archive" in page
    assert AuditEvent.objects.filter(action="archive.downloaded", outcome="failure").count() == 1
