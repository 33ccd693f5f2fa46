"""A restore that fails — damaged archive, pg_restore dying midway, the server down at swap time,
roles the restore may not create — leaves the live database untouched and the request failed
with a clear reason."""

import os
import signal

import pytest
from psycopg import sql

from backups.engine.cluster import LocalCluster, wait_until
from backups.models import Database
from recovery import services
from recovery.engine import restore, runner
from tests.conftest import archive_dir
from tests.recovery.test_restore_e2e import backup, fingerprint, make_rich_db

pytestmark = [pytest.mark.pg, pytest.mark.slow]


@pytest.fixture
def approved(personas, monkeypatch):
    """File and approve a request; the test runs the task itself."""
    monkeypatch.setattr("recovery.models._dispatch", lambda pk: None)

    def make(**fields):
        req = services.file_request(personas["operator"], reason="failure test", **fields)
        req.approve(personas["approver_a"], password_ok=True)
        req.approve(personas["approver_b"], password_ok=True)
        return req

    return make


def run_and_fail(req):
    with pytest.raises(restore.RestoreError):
        runner.execute(req.pk)
    req.refresh_from_db()
    assert req.state == "failed"
    return req


def databases(cluster) -> set[str]:
    return {r[0] for r in cluster.sql("SELECT datname FROM pg_database")}


@pytest.mark.django_db
def test_a_flipped_byte_in_the_archive_fails_before_anything_is_created(approved, make_target_db, repo,
                                                                         target_cluster):
    db = make_rich_db(make_target_db, target_cluster)
    archive = backup(db)
    before, names = fingerprint(target_cluster, db.dbname), databases(target_cluster)
    dump = archive_dir(archive) / archive.main_file.path
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0x01
    dump.write_bytes(bytes(data))

    req = run_and_fail(approved(kind="archive", mode="replace", archive=archive))
    assert "failed its checksum verification" in req.error and "nothing was restored" in req.error
    assert fingerprint(target_cluster, db.dbname) == before
    assert databases(target_cluster) == names


def _pg_restore_pids() -> list[int]:
    """pg_restore processes started by this test process (never anyone else's on the machine)."""
    from tests.backups.test_failures import _children

    return _children("pg_restore")


@pytest.mark.django_db
def test_pg_restore_dying_midway_leaves_the_live_database_and_no_half_restore(approved, make_target_db, repo,
                                                                              target_cluster, monkeypatch):
    db = make_rich_db(make_target_db, target_cluster)
    with target_cluster.connect(db.dbname) as conn:  # enough data that pg_restore is caught at work
        conn.execute("CREATE TABLE big AS SELECT g, md5(g::text) v FROM generate_series(1, 300000) g")
    archive = backup(db)
    before, names = fingerprint(target_cluster, db.dbname), databases(target_cluster)
    real = restore.run_pg_restore

    def killed_midway(work, conn, dbname, jobs, progress=None, extra=()):
        import threading

        def killer():
            pid = wait_until(_pg_restore_pids, 30, interval=0.005)[0]
            os.kill(pid, signal.SIGKILL)

        thread = threading.Thread(target=killer)
        thread.start()
        try:
            return real(work, conn, dbname, jobs, progress, extra)
        finally:
            thread.join()

    monkeypatch.setattr(restore, "run_pg_restore", killed_midway)
    req = run_and_fail(approved(kind="archive", mode="replace", archive=archive))
    assert "pg_restore failed" in req.error
    assert fingerprint(target_cluster, db.dbname) == before
    assert databases(target_cluster) == names  # the half-restored work database was dropped


@pytest.mark.django_db
def test_the_server_down_at_swap_time_leaves_the_live_database_untouched(approved, make_target_db, repo,
                                                                         target_cluster, monkeypatch):
    db = make_rich_db(make_target_db, target_cluster)
    archive = backup(db)
    before = fingerprint(target_cluster, db.dbname)
    real_swap = restore.swap

    def swap_with_server_down(server, live, new, pre):
        target_cluster.stop()
        return real_swap(server, live, new, pre)

    monkeypatch.setattr(restore, "swap", swap_with_server_down)
    try:
        req = run_and_fail(approved(kind="archive", mode="replace", archive=archive))
    finally:
        target_cluster.start()
    assert "the live database" in req.error and "was not touched" in req.error
    assert fingerprint(target_cluster, db.dbname) == before
    with target_cluster.connect("postgres") as conn:  # live still accepts connections
        assert conn.execute("SELECT datallowconn FROM pg_database WHERE datname = %s", (db.dbname,)).fetchone()[0]
    # the proven copy could not be dropped while the server was down; it is named, not hidden
    leftover = f"{db.dbname}__restore_{req.pk}"
    if leftover in databases(target_cluster):
        target_cluster.sql(f'DROP DATABASE "{leftover}"')


@pytest.mark.django_db
def test_missing_roles_that_may_not_be_created_are_refused_in_preflight(approved, make_target_db, repo,
                                                                        target_cluster, target_password):
    db = make_rich_db(make_target_db, target_cluster)
    archive = backup(db)
    host = LocalCluster.create(tcp_auth="scram-sha-256", throwaway=True)
    host.start()
    try:
        with host.connect() as conn:
            conn.execute(sql.SQL("CREATE ROLE restorer LOGIN CREATEDB PASSWORD {}").format(
                sql.Literal(target_password)))
        server = Database(name="restore-test", host="127.0.0.1", port=host.port, dbname="postgres",
                          user="restorer", restore_user="restorer")
        server.set_password(target_password)
        server.set_restore_password(target_password)
        server.save()
        names = databases(host)
        req = run_and_fail(approved(kind="archive", mode="copy", new_name="account_check", archive=archive,
                                    target_server=server))
        assert "pre-flight refused the restore" in req.error
        assert "missing: app_ro, app_rw" in req.error and "CREATEROLE" in req.error
        assert databases(host) == names
        checks = {c["check"]: c["ok"] for c in req.result["report"]["checks"]}
        assert checks["roles"] is False and checks["versions"] is True
    finally:
        host.destroy()


@pytest.mark.django_db
def test_a_taken_copy_name_is_refused_in_preflight(approved, make_target_db, repo, target_cluster):
    db = make_rich_db(make_target_db, target_cluster)
    archive = backup(db)
    target_cluster.sql('CREATE DATABASE "taken_name"')
    try:
        req = run_and_fail(approved(kind="archive", mode="copy", new_name="taken_name", archive=archive))
        assert "taken_name is taken" in req.error
    finally:
        target_cluster.sql('DROP DATABASE "taken_name"')
