"""The management commands: databases, backup, archives."""

import json
import os
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from audit.models import AuditEvent
from backups.models import Archive, Database
from tests.conftest import archive_dir

pytestmark = [pytest.mark.pg, pytest.mark.django_db]
ROOT = Path(__file__).resolve().parents[2]


def run(*args) -> str:
    out = StringIO()
    try:
        call_command(*args, stdout=out, stderr=out)
    finally:
        print(out.getvalue())  # shown by pytest when the test fails
    return out.getvalue()


def test_databases_add_reads_the_password_from_the_environment(monkeypatch, target_cluster, target_password):
    monkeypatch.setenv("AUTH_DB_PASSWORD", target_password)
    out = run("databases", "add", "auth", "--host", "127.0.0.1", "--port", str(target_cluster.port),
              "--dbname", "postgres", "--user", "postgres", "--password-env", "AUTH_DB_PASSWORD")

    assert "registered auth" in out
    db = Database.objects.get(name="auth")
    assert db.get_password() == target_password
    assert target_password not in db.password_encrypted
    event = AuditEvent.objects.get(action="config.database.created")
    assert event.details["changes"]["password"] == [None, "********"]
    assert event.actor_label.startswith("cli:")


def test_databases_add_refuses_an_unset_password_variable():
    with pytest.raises(CommandError, match="environment variable NOPE is not set"):
        run("databases", "add", "auth", "--host", "h", "--dbname", "d", "--user", "u", "--password-env", "NOPE")
    assert not Database.objects.exists()


def test_databases_add_validates_the_name():
    with pytest.raises(CommandError, match="name"):
        run("databases", "add", "Bad Name!", "--host", "h", "--dbname", "d", "--user", "u")


def test_databases_add_twice_updates_and_keeps_the_password(monkeypatch):
    monkeypatch.setenv("PW", "first-password")
    run("databases", "add", "auth", "--host", "h1", "--dbname", "d", "--user", "u", "--password-env", "PW")
    out = run("databases", "add", "auth", "--host", "h2", "--dbname", "d", "--user", "u")
    assert "updated auth" in out
    db = Database.objects.get(name="auth")
    assert db.host == "h2" and db.get_password() == "first-password"


def test_databases_list_and_check(target_db, target_cluster):
    out = run("databases", "list")
    assert target_db.name in out and str(target_cluster.port) in out
    rows = json.loads(run("databases", "list", "--json"))
    assert rows[0]["name"] == target_db.name and rows[0]["has_password"] is True
    assert "password" not in {k for r in rows for k in r if k != "has_password"}

    out = run("databases", "check", target_db.name)
    assert "PostgreSQL 15" in out and "bytes" in out


def test_databases_check_of_an_unknown_or_failing_database(target_db):
    with pytest.raises(CommandError, match="no database named 'nope' is registered"):
        run("databases", "check", "nope")
    target_db.set_password("wrong")
    target_db.save()
    with pytest.raises(CommandError, match="rejected the credentials"):
        run("databases", "check", target_db.name)
    assert AuditEvent.objects.filter(action="database.checked", outcome="failure").exists()


def test_backup_prints_archive_id_path_size_and_sha256(target_db, repo):
    out = run("backup", "--database", target_db.name)

    archive = Archive.objects.get(database=target_db)
    dump = archive.files.get(role="dump")
    assert f"archive {archive.pk} {archive.path}" in out
    assert f"({archive.bytes} bytes)" in out
    assert f"sha256 {dump.sha256}" in out
    assert (archive_dir(archive) / dump.path).exists()


@pytest.mark.django_db(transaction=True)
def test_backup_all_and_unknown_names(make_target_db, repo):
    a = make_target_db(name="auth")
    b = make_target_db(name="account")
    out = run("backup", "--all")
    assert f"{a.name}: archive" in out and f"{b.name}: archive" in out
    with pytest.raises(CommandError, match="not registered: ghost"):
        run("backup", "--database", "ghost")
    with pytest.raises(CommandError, match="--all"):
        run("backup")


def test_backup_fails_with_non_zero_status_for_a_failing_database(target_db, repo):
    target_db.dbname = "gone"
    target_db.save()
    with pytest.raises(CommandError, match="1 of 1 backups failed"):
        run("backup", "--database", target_db.name)


def test_archives_list_json_has_the_documented_fields(target_db, repo):
    run("backup", "--database", target_db.name)
    rows = json.loads(run("archives", "list", "--json", "--database", target_db.name))
    assert len(rows) == 1
    row = rows[0]
    for key in ("id", "database", "kind", "state", "started_at", "finished_at", "bytes", "path", "verified_at"):
        assert key in row
    assert row["database"] == target_db.name and row["kind"] == "logical" and row["state"] == "complete"
    assert not row["path"].startswith("/")
    assert json.loads(run("archives", "list", "--json", "--database", "other")) == []


def test_archives_verify_ok_and_corrupt(target_db, repo):
    run("backup", "--database", target_db.name)
    archive = Archive.objects.get(database=target_db)
    assert "OK" in run("archives", "verify", str(archive.pk))

    path = archive_dir(archive) / archive.files.get(role="dump").path
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CommandError, match="FAILED verification"):
        run("archives", "verify", str(archive.pk))
    with pytest.raises(CommandError, match="no archive with id 999999"):
        run("archives", "verify", "999999")


@pytest.mark.django_db(transaction=True)
def test_manage_py_exit_status_reflects_the_outcome(target_db, repo, portal_env):
    ok = subprocess.run([sys.executable, "manage.py", "backup", "--database", target_db.name],
                        cwd=ROOT, env=portal_env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "sha256" in ok.stdout
    bad = subprocess.run([sys.executable, "manage.py", "databases", "check", "nope"],
                         cwd=ROOT, env=portal_env, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0
    assert "no database named 'nope'" in bad.stderr
    assert os.environ["DATABASE_URL"] != portal_env["DATABASE_URL"]  # we really used the test DB
