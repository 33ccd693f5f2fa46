"""The WAL and recovery commands: archive-command, wal-mode, check --wal, backup --kind base,
pitr, recover --list — and the admin's view of WAL and restore points."""

import os
import pwd
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from audit.models import AuditEvent
from backups.engine import wal
from backups.models import Archive
from tests.recovery.test_pitr import commit_rows, switch_and_wait

pytestmark = [pytest.mark.pg, pytest.mark.django_db]


def run(*args) -> str:
    out = StringIO()
    try:
        call_command(*args, stdout=out, stderr=out)
    finally:
        print(out.getvalue())
    return out.getvalue()


def test_archive_command_prints_the_server_settings_and_prepares_the_area(make_target_db, repo):
    db = make_target_db(name="auth")
    out = run("databases", "archive-command", "auth")
    area = wal.area_path(db, repo)
    assert "archive_mode = on" in out and "archive_timeout = 60" in out
    assert f"archive_command = '/usr/bin/python3 -S {repo.root}/bin/bankvault-walpush push --area {area} %p %f'" in out
    assert f"restore_command = '/usr/bin/python3 -S {repo.root}/bin/bankvault-walpush fetch --area {area} %f %p'" in out
    assert "databases wal-mode auth archive" in out  # still in mode 'none'
    assert os.access(repo.root / "bin" / "bankvault-walpush", os.X_OK)
    if os.geteuid() == 0:
        assert area.stat().st_uid == pwd.getpwnam("postgres").pw_uid

    run("databases", "wal-mode", "auth", "archive")
    db.refresh_from_db()
    assert db.wal_mode == "archive"
    assert AuditEvent.objects.filter(action="config.database.changed",
                                     details__changes__wal_mode=["none", "archive"]).exists()


def test_check_wal_confirms_a_working_archive_command(make_archiving_cluster):
    cluster, db = make_archiving_cluster(name="good")
    out = run("databases", "check", "good", "--wal")
    assert "WAL OK, segment 0000000100000000000000" in out and "reached the repository" in out


def test_check_wal_catches_a_wrong_archive_command(make_archiving_cluster, repo):
    cluster, db = make_archiving_cluster(name="wrong", settings={"archive_command": "cp %p /tmp/elsewhere-%f"})
    with pytest.raises(CommandError, match="did not reach .* within 3s: the server's archive_command is "
                                           "'cp %p /tmp/elsewhere-%f'; expected .*bankvault-walpush push"):
        run("databases", "check", "wrong", "--wal", "--timeout", "3")
    assert AuditEvent.objects.filter(action="database.wal_checked", outcome="failure").exists()
    for leftover in __import__("glob").glob("/tmp/elsewhere-*"):
        os.unlink(leftover)


def test_check_wal_without_archiving_says_how_to_set_it_up(make_target_db):
    make_target_db(name="plain")
    with pytest.raises(CommandError, match="databases archive-command plain"):
        run("databases", "check", "plain", "--wal")


def test_base_backup_pitr_and_recover_list_from_the_command_line(make_archiving_cluster, repo):
    cluster, db = make_archiving_cluster(name="cli")
    with cluster.connect() as conn:
        conn.execute("CREATE TABLE t (id serial PRIMARY KEY, label text)")
    out = run("backup", "--database", "cli", "--kind", "base")
    archive = Archive.objects.get(database=db)
    assert f"archive {archive.pk} {archive.path}" in out and archive.kind == "base"
    commit_rows(cluster, 7, "x")
    switch_and_wait(cluster)

    listing = run("recover", "--list", "--database", "cli")
    assert f"archive {archive.pk:>5}" in listing and "base     complete" in listing
    assert "WAL timeline 1:" in listing and "point in time:" in listing

    out = run("pitr", "--database", "cli", "--target", "latest")
    port = int(out.split("postgresql://postgres@127.0.0.1:")[1].split("/")[0])
    assert "recovered to latest" in out and f"manage.py pitr --destroy {port}" in out
    assert f"port {port}" in run("pitr", "--list")
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                         password=db.get_password()) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 7
    assert "removed the recovered cluster" in run("pitr", "--destroy", str(port))
    assert f"port {port}" not in run("pitr", "--list")
    assert AuditEvent.objects.filter(action="recovery.pitr.succeeded", target_id=str(db.pk)).exists()

    with pytest.raises(CommandError, match="is in the future"):
        run("pitr", "--database", "cli", "--target", "2999-01-01 00:00:00")
    with pytest.raises(CommandError, match="not a time"):
        run("pitr", "--database", "cli", "--target", "noon")
    with pytest.raises(CommandError, match="port .* is already in use"):
        run("pitr", "--database", "cli", "--target", "latest", "--into-port", str(cluster.port))
    assert AuditEvent.objects.filter(action="recovery.pitr.failed", outcome="failure").count() == 3


def test_admin_shows_wal_timelines_and_restore_points(make_archiving_cluster, repo, admin_client):
    cluster, db = make_archiving_cluster(name="shown")
    run("backup", "--database", "shown", "--kind", "base")
    with cluster.connect() as conn:
        conn.execute("SELECT pg_switch_wal() FROM (SELECT txid_current()) x")
    switch_and_wait(cluster)
    page = admin_client.get(f"/admin/backups/database/{db.pk}/change/").content.decode()
    assert "Restore points available" in page and "and latest (timeline 1)" in page
    assert "WAL in the repository" in page and "000000010000000000000001" in page


def test_hourly_wal_check_is_scheduled_and_records_each_database(make_archiving_cluster, make_target_db):
    from django_celery_beat.models import PeriodicTask

    from backups.tasks import check_wal_archiving

    task = PeriodicTask.objects.get(name="bankvault: hourly WAL archiving check")
    assert task.interval.every == 1 and task.interval.period == "hours" and task.enabled
    make_archiving_cluster(name="fine")
    make_archiving_cluster(name="failing", settings={"archive_command": "/bin/false"})
    make_target_db(name="nowal")  # WAL mode none: not checked
    results = check_wal_archiving(timeout=2)
    assert set(results) == {"fine", "failing"}
    assert results["fine"]["ok"] is True
    assert results["failing"]["ok"] is False and "did not reach" in results["failing"]["error"]
    assert AuditEvent.objects.filter(action="database.wal_checked", actor_label="system:beat").count() == 2
