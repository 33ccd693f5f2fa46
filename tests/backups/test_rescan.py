"""`repository rescan`: the catalog comes back from the repository alone after the portal's own
database is lost, the databases come back without passwords, and a rescanned archive restores.

The main test really loses the catalog: a new, empty portal database on the session's portal
cluster, migrated and rescanned by `manage.py` in subprocesses, as the disaster-recovery
runbook does it. The others delete the catalog rows in the test database instead (the audit
table is append-only and stays, as it would not after a real loss)."""

import json
import os
import subprocess
import sys
import uuid
from io import StringIO
from pathlib import Path

import psycopg
import pytest
from django.core.management import CommandError, call_command

from audit.models import AuditEvent
from backups.engine import runner, wal
from backups.engine.pgtools import BackupError
from backups.models import Archive, ArchiveFile, BackupKind, BackupPolicy, BackupRun, Database, WalTimeline
from tests.conftest import FIXTURE_SQL

pytestmark = [pytest.mark.pg, pytest.mark.django_db]
ROOT = Path(__file__).resolve().parents[2]
SMALL_SQL = ("CREATE TABLE t (id int PRIMARY KEY, v text); "
             "INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 50) g")


def backup(db, kind=BackupKind.LOGICAL):
    run = BackupRun.enqueue(db, trigger=BackupRun.Trigger.MANUAL, actor_label="test", kind=kind)
    return runner.execute(run.pk)


def rescan(*args) -> str:
    out = StringIO()
    try:
        call_command("repository", "rescan", *args, stdout=out, stderr=out)
    finally:
        print(out.getvalue())  # shown when a test fails
    return out.getvalue()


def lose_catalog():
    """What losing the portal's database costs the catalog (the audit table refuses DELETE)."""
    ArchiveFile.objects.all().delete()
    Archive.objects.all().delete()
    BackupRun.objects.all().delete()
    BackupPolicy.objects.all().delete()
    WalTimeline.objects.all().delete()
    Database.objects.all().delete()


def catalog() -> dict:
    """The catalog in a comparable form: per archive path, its facts and files."""
    return {a.path: {"database": a.database.name, "kind": a.kind, "state": a.state, "bytes": a.bytes,
                     "manifest_sha256": a.manifest_sha256, "started_at": a.started_at,
                     "timeline": a.timeline, "start_lsn": a.start_lsn, "stop_lsn": a.stop_lsn,
                     "files": sorted(a.files.values_list("path", "role", "bytes", "sha256"))}
            for a in Archive.objects.select_related("database")}


def snapshot() -> dict:
    """Every catalog row, to prove a re-run changes nothing."""
    return {
        "databases": list(Database.objects.order_by("pk").values()),
        "archives": list(Archive.objects.order_by("pk").values()),
        "files": list(ArchiveFile.objects.order_by("pk").values()),
        "wal": list(WalTimeline.objects.order_by("pk").values("database", "timeline", "first_segment",
                                                              "last_segment", "segment_count", "gaps")),
    }


# -- the acceptance test: a new, empty portal database --------------------------------------------------
@pytest.mark.slow
def test_a_new_portal_database_gets_every_archive_back_from_the_repository(make_target_db, repo):
    from tests.plugin import services

    auth = make_target_db(name="auth", sql=FIXTURE_SQL)
    account = make_target_db(name="account", sql=SMALL_SQL)
    backup(auth)
    backup(auth)
    backup(account)
    before = catalog()
    assert len(before) == 3

    portal = services()["portal"]
    name = f"bankvault_dr_{uuid.uuid4().hex[:8]}"
    portal.sql(f'CREATE DATABASE "{name}"')
    env = dict(os.environ, DATABASE_URL=portal.url(name), BANKVAULT_REPOSITORY=str(repo.root))

    def manage(*args, check=True):
        proc = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        print(proc.stdout, proc.stderr)
        assert not check or proc.returncode == 0, proc.stderr
        return proc

    def rows(query):
        with psycopg.connect(portal.url(name)) as conn:
            return conn.execute(query).fetchall()

    try:
        manage("migrate", "--noinput")
        assert rows("SELECT count(*) FROM backups_archive") == [(0,)]
        first = json.loads(manage("repository", "rescan", "--json").stdout)
        assert (first["new"], first["damaged"], first["known"], first["databases_registered"]) == \
            (3, 0, 0, ["account", "auth"])

        archives = {path: (db, kind, state, nbytes, msha, started, run)
                    for path, db, kind, state, nbytes, msha, started, run in rows(
                        "SELECT a.path, d.name, a.kind, a.state, a.bytes, a.manifest_sha256, a.started_at, a.run_id "
                        "FROM backups_archive a JOIN backups_database d ON d.id = a.database_id")}
        assert set(archives) == set(before)
        for path, (db, kind, state, nbytes, msha, started, run) in archives.items():
            assert (db, kind, state, nbytes, msha, started) == tuple(before[path][k] for k in (
                "database", "kind", "state", "bytes", "manifest_sha256", "started_at"))
            assert run is None  # the run's history was lost with the old catalog
        files = {}
        for path, fpath, role, nbytes, sha in rows(
                "SELECT a.path, f.path, f.role, f.bytes, f.sha256 FROM backups_archivefile f "
                "JOIN backups_archive a ON a.id = f.archive_id"):
            files.setdefault(path, []).append((fpath, role, nbytes, sha))
        assert {p: sorted(f) for p, f in files.items()} == {p: a["files"] for p, a in before.items()}

        # The databases, from the manifests: where they are, and that they need a password.
        dbs = {r[0]: r[1:] for r in rows("SELECT name, host, port, dbname, \"user\", password_encrypted, "
                                          "needs_credentials FROM backups_database")}
        assert dbs == {d.name: (d.host, d.port, d.dbname, d.user, "", True) for d in (auth, account)}
        events = rows("SELECT action, actor_label, target_label FROM audit_auditevent ORDER BY sequence")
        assert [e[0] for e in events] == ["config.database.created", "config.database.created",
                                          "repository.rescanned"]
        assert all(e[1].startswith("cli:") for e in events)

        # Re-running changes nothing.
        tables = "backups_database", "backups_archive", "backups_archivefile"
        dump = {t: rows(f"SELECT * FROM {t} ORDER BY id") for t in tables}
        second = json.loads(manage("repository", "rescan", "--json").stdout)
        assert (second["new"], second["known"], second["databases_registered"]) == (0, 3, [])
        assert {t: rows(f"SELECT * FROM {t} ORDER BY id") for t in tables} == dump
        assert "0 new" in manage("repository", "check").stdout

        # A backup before the password is given fails and says how to give it.
        failed = manage("backup", "--database", "auth", check=False)
        assert failed.returncode != 0
        assert "databases set-password auth --password-env" in failed.stdout + failed.stderr
    finally:
        portal.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", params=(name,))
        portal.sql(f'DROP DATABASE IF EXISTS "{name}"')


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_rescanned_archive_restores_identical_rows_once_the_password_is_given(
        personas, make_target_db, repo, target_cluster, target_password, monkeypatch):
    from recovery import services
    from recovery.engine import runner as restore_runner
    from tests.recovery.test_restore_e2e import fingerprint

    db = make_target_db(name="account", sql=FIXTURE_SQL)
    backup(db)
    before = fingerprint(target_cluster, db.dbname)
    lose_catalog()
    rescan()
    db = Database.objects.get(name="account")
    assert db.needs_credentials and not db.has_password
    archive = Archive.objects.get()
    assert archive.state == Archive.State.COMPLETE and archive.run is None

    # Backing up fails, clearly, until someone gives the password.
    run = BackupRun.enqueue(db, trigger=BackupRun.Trigger.MANUAL, actor_label="test")
    with pytest.raises(BackupError):
        runner.execute(run.pk)
    run.refresh_from_db()
    assert run.state == BackupRun.State.FAILED
    assert "databases set-password account --password-env VAR" in run.error
    monkeypatch.setenv("ACCOUNT_PW", target_password)
    call_command("databases", "set-password", "account", "--password-env", "ACCOUNT_PW", stdout=StringIO())
    db.refresh_from_db()
    assert not db.needs_credentials and db.get_password() == target_password
    assert backup(db).state == Archive.State.COMPLETE

    # Live data changes; the rescanned archive brings back exactly what it held.
    with target_cluster.connect(db.dbname) as conn:
        conn.execute("DELETE FROM ledger.\"Entries\" WHERE id % 2 = 0")
        conn.execute("INSERT INTO ledger.accounts (iban, balance) VALUES ('AFTER-THE-LOSS', 1)")
    assert fingerprint(target_cluster, db.dbname)["data"] != before["data"]
    req = services.file_request(personas["operator"], kind="archive", mode="replace", archive=archive, database=db,
                                reason="disaster recovery: restore from the rescanned catalog")
    monkeypatch.setattr("recovery.models._dispatch", lambda pk: None)  # run it here, not on a worker
    req.approve(personas["approver_a"], password_ok=True)
    req.approve(personas["approver_b"], password_ok=True)
    restore_runner.execute(req.pk)
    req.refresh_from_db()
    assert req.state == "succeeded", req.error
    after = fingerprint(target_cluster, db.dbname)
    assert after["data"] == before["data"] and after["sequences"] == before["sequences"]
    assert after["schema"] == before["schema"]


@pytest.mark.slow
def test_base_backups_and_their_wal_come_back_for_point_in_time_recovery(make_archiving_cluster, repo):
    cluster, db = make_archiving_cluster(name="ledger")
    with cluster.connect() as conn:
        conn.execute("CREATE TABLE t (id serial PRIMARY KEY, label text)")
    archive = backup(db, kind=BackupKind.BASE)
    assert archive.state == Archive.State.COMPLETE
    wal.force_switch_and_wait(db, timeout=30)
    wal.refresh_catalog(db, repo)
    timelines = list(WalTimeline.objects.values_list("timeline", "first_segment", "last_segment", "segment_count"))
    before = catalog()
    lose_catalog()

    rescan()
    db = Database.objects.get(name="ledger")
    assert db.needs_credentials and db.wal_mode == "archive"  # its WAL is in the repository
    assert catalog() == before
    assert list(WalTimeline.objects.values_list("timeline", "first_segment", "last_segment", "segment_count")) \
        == timelines
    assert wal.restore_windows(db, repo), "no point in time to recover to after the rescan"

    # Without the WAL it needs, a base backup comes back as incomplete, saying why.
    area = wal.area_path(db, repo)
    segments, _ = wal.scan(area)
    needed = wal.segments_between(before[archive.path]["timeline"], before[archive.path]["start_lsn"],
                                  before[archive.path]["stop_lsn"], db.wal_segment_size)
    segments[needed[0]].path.unlink()
    lose_catalog()
    out = rescan()  # an incomplete base backup is not damage: the command succeeds
    again = Archive.objects.get()
    assert again.state == Archive.State.INCOMPLETE
    assert needed[0] in again.verify_error and "INCOMPLETE" in out


# -- damage, bad input and idempotence ------------------------------------------------------------------
@pytest.fixture
def archived(make_target_db, repo):
    """A small database backed up twice, then the catalog lost."""
    db = make_target_db(name="auth", sql=SMALL_SQL)
    first, second = backup(db), backup(db)
    paths = [first.path, second.path]
    files = {a.path: sorted(a.files.values_list("path", "bytes", "sha256")) for a in (first, second)}
    lose_catalog()
    return {"paths": paths, "files": files, "dirs": [Path(repo.root) / p for p in paths], "dbname": db.dbname}


def test_rescan_twice_changes_nothing_the_second_time(archived):
    rescan()
    state = snapshot()
    events = AuditEvent.objects.count()
    out = rescan()
    assert snapshot() == state
    assert "0 new" in out and "2 known" in out and "0 database(s) registered again" in out
    # The second run is recorded too, with nothing new.
    assert AuditEvent.objects.count() == events + 1
    event = AuditEvent.objects.filter(action="repository.rescanned").latest("sequence")
    assert (event.details["new"], event.details["known"]) == (0, 2)


def test_the_rescan_is_audited_and_the_database_registered_without_a_password(archived):
    rescan()
    db = Database.objects.get(name="auth")
    assert (db.needs_credentials, db.has_password, db.dbname, db.wal_mode) == (True, False, archived["dbname"], "none")
    created = AuditEvent.objects.get(action="config.database.created")
    assert created.actor_label.startswith("cli:") and created.details["source"] == "repository rescan"
    assert created.details["changes"]["password"] == [None, ""]
    scanned = AuditEvent.objects.get(action="repository.rescanned")
    assert scanned.details["new"] == 2 and scanned.details["databases"] == ["auth"]
    assert scanned.outcome == "success"
    assert {a.path: sorted(a.files.values_list("path", "bytes", "sha256")) for a in Archive.objects.all()} \
        == archived["files"]


def test_dry_run_reports_what_it_would_do_and_changes_nothing(archived):
    events = AuditEvent.objects.count()
    out = rescan("--dry-run")
    assert "would be registered again" in out and "dry run: 2 new" in out
    assert not Database.objects.exists() and not Archive.objects.exists()
    assert AuditEvent.objects.count() == events


def test_a_truncated_file_is_cataloged_as_corrupt_with_the_reason(archived):
    dump = next(archived["dirs"][0].glob("dump.pgdump*"))
    with open(dump, "r+b") as f:
        f.truncate(dump.stat().st_size // 2)
    with pytest.raises(CommandError, match="1 damaged"):
        rescan()
    bad = Archive.objects.get(path=archived["paths"][0])
    assert bad.state == Archive.State.CORRUPT
    assert dump.name in bad.verify_error and "damaged or truncated" in bad.verify_error
    assert Archive.objects.get(path=archived["paths"][1]).state == Archive.State.COMPLETE
    event = AuditEvent.objects.get(action="repository.rescanned")
    assert event.outcome == "failure" and event.details["damaged_archives"][0]["path"] == archived["paths"][0]
    # and nothing changes on a second run: it is known and already corrupt
    state = snapshot()
    with pytest.raises(CommandError, match="1 damaged"):
        rescan()
    assert snapshot() == state


def test_a_flipped_byte_is_found_by_verify_not_by_the_size_check(archived):
    dump = next(archived["dirs"][1].glob("dump.pgdump*"))
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dump.write_bytes(bytes(data))
    out = rescan("--dry-run")
    assert "0 damaged" in out  # same size: only a re-hash can tell
    with pytest.raises(CommandError, match="1 damaged"):
        rescan("--verify")
    bad = Archive.objects.get(path=archived["paths"][1])
    assert bad.state == Archive.State.CORRUPT and "does not match its manifest entry" in bad.verify_error


def test_an_archive_without_its_manifest_is_cataloged_as_corrupt(archived):
    (archived["dirs"][0] / "manifest.json").unlink()
    with pytest.raises(CommandError, match="1 damaged"):
        rescan()
    bad = Archive.objects.get(path=archived["paths"][0])
    assert bad.state == Archive.State.CORRUPT and "manifest.json is missing" in bad.verify_error
    assert bad.database.name == "auth"  # known from the other archive's manifest
    assert not bad.files.exists() and bad.bytes > 0


def test_a_manifest_that_names_another_database_is_damage(archived, repo):
    moved = Path(repo.root) / "archives" / "other" / archived["dirs"][0].name
    moved.parent.mkdir()
    archived["dirs"][0].rename(moved)
    with pytest.raises(CommandError, match="1 not cataloged"):
        rescan()
    # "other" cannot be registered: no manifest names it; its archive is reported, not lost silently
    assert not Database.objects.filter(name="other").exists()
    event = AuditEvent.objects.get(action="repository.rescanned")
    assert "other" in event.details["not_registered"]
    assert Archive.objects.count() == 1


def test_a_changed_manifest_of_a_known_archive_marks_it_corrupt(archived):
    rescan()
    path = archived["dirs"][0] / "manifest.json"
    man = json.loads(path.read_text())
    man["tables"][0]["rows"] = 999
    path.write_text(json.dumps(man))
    with pytest.raises(CommandError, match="1 damaged"):
        rescan()
    bad = Archive.objects.get(path=archived["paths"][0])
    assert bad.state == Archive.State.CORRUPT and "manifest.json changed" in bad.verify_error
    assert AuditEvent.objects.filter(action="archive.verify_failed", target_id=str(bad.pk)).exists()


def test_a_cataloged_archive_gone_from_the_repository_is_reported_by_check(archived):
    import shutil

    rescan()
    call_command("repository", "check", stdout=StringIO())  # in step: exit 0
    shutil.rmtree(archived["dirs"][1])
    with pytest.raises(CommandError, match="differ"):
        call_command("repository", "check", stdout=StringIO())
    out = rescan()
    assert "is cataloged but not in the repository" in out and "1 missing" in out
    assert Archive.objects.get(path=archived["paths"][1]).state == Archive.State.COMPLETE  # reported, not changed


def test_an_archive_of_a_running_backup_is_left_to_its_run(archived, repo):
    rescan()
    db = Database.objects.get(name="auth")
    run = BackupRun.enqueue(db, trigger=BackupRun.Trigger.MANUAL, actor_label="test")
    run.claim("test-worker")
    fake = Path(repo.root) / "archives" / "auth" / f"20991231_000000_logical_r{run.pk}"
    import shutil

    shutil.copytree(archived["dirs"][0], fake)
    out = rescan()
    assert f"its backup run {run.pk} is still in progress" in out
    assert not Archive.objects.filter(path__endswith=fake.name).exists()


def test_an_unmounted_repository_is_refused_and_nothing_changes(settings, tmp_path):
    settings.BANKVAULT_REPOSITORY = tmp_path / "empty-mount"
    (tmp_path / "empty-mount").mkdir()
    Database.objects.create(name="keep", host="h", dbname="d", user="u")
    with pytest.raises(CommandError, match="volume mounted"):
        rescan()
    assert list(Database.objects.values_list("name", flat=True)) == ["keep"]
    assert not AuditEvent.objects.filter(action="repository.rescanned").exists()


def test_other_directories_are_reported_as_ignored(archived, repo):
    (Path(repo.root) / "archives" / "auth" / "notes.txt").write_text("x")
    out = rescan()
    assert "ignored" in out and "notes.txt" in out and "2 new" in out


# -- giving the password ---------------------------------------------------------------------------------
def test_set_password_refuses_a_wrong_password_and_stores_nothing(archived, monkeypatch):
    rescan()
    monkeypatch.setenv("PW", "not-the-password")
    with pytest.raises(CommandError, match="NOT stored"):
        call_command("databases", "set-password", "auth", "--password-env", "PW", stdout=StringIO())
    db = Database.objects.get(name="auth")
    assert db.needs_credentials and not db.has_password
    with pytest.raises(CommandError, match="environment variable NOPE is not set"):
        call_command("databases", "set-password", "auth", "--password-env", "NOPE", stdout=StringIO())
    with pytest.raises(CommandError, match="no database named 'ghost'"):
        call_command("databases", "set-password", "ghost", "--password-env", "PW", stdout=StringIO())
    assert not AuditEvent.objects.filter(action="config.database.changed").exists()


def test_set_password_clears_the_flag_and_is_audited_without_the_secret(archived, monkeypatch, target_password):
    rescan()
    monkeypatch.setenv("PW", target_password)
    out = StringIO()
    call_command("databases", "set-password", "auth", "--password-env", "PW", stdout=out)
    assert "password stored (connected with it)" in out.getvalue()
    db = Database.objects.get(name="auth")
    assert not db.needs_credentials and db.get_password() == target_password
    event = AuditEvent.objects.get(action="config.database.changed")
    assert event.details["changes"]["password"] == ["", "********"]
    assert target_password not in json.dumps(event.details)


def test_the_overview_shows_a_database_that_needs_its_password(archived, client, personas):
    rescan()
    client.force_login(personas["auditor"])
    page = client.get("/").content.decode()
    assert 'data-testid="needs-credentials"' in page
    assert "manage.py databases set-password auth --password-env VAR" in page
