"""Bad input, each through a real Celery worker against real services: the run ends `failed`
with a message an operator understands, no archive that looks complete, no temp files, and
the worker goes on to serve the next task."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from backups import services
from backups.engine.cluster import free_port, wait_until
from backups.models import Archive, BackupRun

pytestmark = [pytest.mark.pg]


def wait_for_end(run: BackupRun, timeout: float = 60) -> BackupRun:
    def ended():
        run.refresh_from_db()
        return run.state in (BackupRun.State.SUCCEEDED, BackupRun.State.FAILED)

    wait_until(ended, timeout, interval=0.1, what=f"run {run.pk} to end")
    return run


def start(db) -> BackupRun:
    from django.db import transaction

    with transaction.atomic():
        run = services.start_backup(db, actor_label="test")
    return run


def assert_nothing_left(repo, db):
    assert not Archive.objects.filter(database=db).exists()
    archives = repo.root / "archives"
    assert not archives.exists() or not any(archives.rglob("manifest.json"))
    tmp = repo.root / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []


def assert_worker_still_serves(make_target_db, repo):
    healthy = make_target_db(name="healthy")
    run = wait_for_end(start(healthy))
    assert run.state == BackupRun.State.SUCCEEDED, run.error


@pytest.fixture
def failing(celery_worker_thread, make_target_db, repo):
    """Runs a backup of a database bent by ``mutate`` and returns the ended run."""

    def go(mutate, **db_kwargs):
        db = make_target_db(**db_kwargs)
        mutate(db)
        db.save()
        return db, wait_for_end(start(db))

    return go


def test_unreachable_database_fails_clearly(failing, make_target_db, repo):
    port = free_port()
    db, run = failing(lambda d: setattr(d, "port", port))

    assert run.state == BackupRun.State.FAILED
    assert f"cannot reach the database server at 127.0.0.1:{port}" in run.error
    assert "is it running" in run.error
    assert_nothing_left(repo, db)
    assert_worker_still_serves(make_target_db, repo)


def test_wrong_password_fails_clearly(failing, make_target_db, repo):
    db, run = failing(lambda d: d.set_password("not-the-password"))

    assert run.state == BackupRun.State.FAILED
    assert "rejected the credentials of user 'postgres'" in run.error
    assert "not-the-password" not in run.error + run.error_detail
    assert_nothing_left(repo, db)
    assert_worker_still_serves(make_target_db, repo)


def test_missing_database_fails_clearly(failing, make_target_db, repo):
    db, run = failing(lambda d: setattr(d, "dbname", "no_such_db"))

    assert run.state == BackupRun.State.FAILED
    assert "database 'no_such_db' does not exist" in run.error
    assert_nothing_left(repo, db)
    assert_worker_still_serves(make_target_db, repo)


@contextlib.contextmanager
def tmpfs(path: Path, size: str, readonly: bool = False):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_repository_not_writable_fails_before_touching_the_database(failing, make_target_db, repo):
    with tmpfs(repo.root, "1m", readonly=True):
        db, run = failing(lambda d: None)
        assert run.state == BackupRun.State.FAILED
        assert "repository is not writable" in run.error
        assert "Read-only file system" in run.error
        assert_nothing_left(repo, db)
    assert_worker_still_serves(make_target_db, repo)


def test_full_repository_disk_fails_and_leaves_no_partial_files(failing, make_target_db, repo, target_cluster):
    # ~6 MB of poorly compressible data cannot fit in a 1 MB repository.
    sql = ("CREATE TABLE noise (id int, v text);"
           "INSERT INTO noise SELECT g, md5(random()::text) || md5(random()::text) FROM generate_series(1, 80000) g;")
    with tmpfs(repo.root, "1m"):
        db, run = failing(lambda d: None, name="big", sql=sql)
        assert run.state == BackupRun.State.FAILED
        assert "repository disk is full" in run.error
        assert_nothing_left(repo, db)
        # Everything written before the disk filled up was removed again.
        used = int(subprocess.run(["du", "-sk", str(repo.root)], capture_output=True, text=True).stdout.split()[0])
        assert used < 64
        assert not _pg_tools_running()
    assert_worker_still_serves(make_target_db, repo)


def _children(name: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError):
            continue
        if comm == name and ppid == os.getpid():
            pids.append(int(entry.name))
    return pids


def _pg_tools_running() -> bool:
    return bool(_children("pg_dump") or _children("pg_dumpall") or _children("pg_restore"))


def test_pg_dump_killed_mid_run_fails_the_run(celery_worker_thread, make_target_db, repo, target_cluster):
    db = make_target_db(name="victim")
    # Hold an exclusive lock so pg_dump is certainly still running when we kill it.
    locker = target_cluster.connect(db.dbname, autocommit=False)
    locker.execute("LOCK TABLE ledger.accounts IN ACCESS EXCLUSIVE MODE")
    try:
        run = start(db)
        pid = wait_until(lambda: _children("pg_dump"), 30, what="pg_dump to start")[0]
        wait_until(lambda: target_cluster.sql(
            "SELECT 1 FROM pg_stat_activity WHERE application_name = 'bankvault' AND wait_event_type = 'Lock' "
            "AND query LIKE 'LOCK TABLE%%'", dbname="postgres"), 30, what="pg_dump to wait on the lock")
        os.kill(pid, signal.SIGKILL)
        wait_for_end(run)
    finally:
        locker.rollback()
        locker.close()

    assert run.state == BackupRun.State.FAILED
    assert run.error == "pg_dump was killed by SIGKILL before it finished"
    assert_nothing_left(repo, db)
    assert not _pg_tools_running()
    assert_worker_still_serves(make_target_db, repo)


def test_row_count_waits_are_cancelled_when_the_dump_fails(make_target_db, repo, target_cluster, db):
    """A failing pg_dump must not leave our counting query behind on the server."""
    from backups.engine import runner
    from backups.engine.pgtools import BackupError

    victim = make_target_db(name="victim2")
    locker = target_cluster.connect(victim.dbname, autocommit=False)
    locker.execute("LOCK TABLE ledger.accounts IN ACCESS EXCLUSIVE MODE")
    run = BackupRun.enqueue(victim, trigger=BackupRun.Trigger.MANUAL, actor_label="test")
    killer = threading.Thread(target=lambda: (time.sleep(0.2), [
        os.kill(p, signal.SIGKILL) for p in wait_until(lambda: _children("pg_dump"), 30)]))
    killer.start()
    try:
        with pytest.raises(BackupError):
            runner.execute(run.pk)
    finally:
        killer.join()
        locker.rollback()
        locker.close()
    leftover = target_cluster.sql("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                                  "AND application_name = 'bankvault'", dbname="postgres", params=(victim.dbname,))
    assert leftover == [(0,)]


def test_a_table_locked_longer_than_the_lock_wait_fails_clearly(make_target_db, repo, target_cluster, db, settings):
    from backups.engine import runner
    from backups.engine.pgtools import LockTimeout

    settings.BANKVAULT_LOCK_WAIT_TIMEOUT = 1
    victim = make_target_db(name="locked")
    locker = target_cluster.connect(victim.dbname, autocommit=False)
    locker.execute("LOCK TABLE ledger.accounts IN ACCESS EXCLUSIVE MODE")
    run = BackupRun.enqueue(victim, trigger=BackupRun.Trigger.MANUAL, actor_label="test")
    try:
        with pytest.raises(LockTimeout):
            runner.execute(run.pk)
    finally:
        locker.rollback()
        locker.close()
    run.refresh_from_db()
    assert run.state == BackupRun.State.FAILED
    assert "stayed locked by another session" in run.error
    assert_nothing_left(repo, victim)
