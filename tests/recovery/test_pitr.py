"""Base backups and point-in-time recovery against real clusters with archiving on: a recovery
to a target holds exactly the transactions committed at or before it."""

import time
from datetime import timedelta

import pytest
from django.utils import timezone

from backups.engine import runner, wal
from backups.engine.cluster import wait_until
from backups.engine.pgtools import BackupError
from backups.models import Archive, BackupKind, BackupRun
from recovery.engine import pitr
from tests.conftest import archive_dir

pytestmark = [pytest.mark.pg, pytest.mark.slow, pytest.mark.django_db]


def base_backup(db):
    run = BackupRun.enqueue(db, trigger=BackupRun.Trigger.MANUAL, actor_label="test", kind=BackupKind.BASE)
    archive = runner.execute(run.pk)
    run.refresh_from_db()
    return run, archive


def commit_rows(cluster, n: int, label: str, pause: float = 0.002):
    with cluster.connect() as conn:
        for _ in range(n):
            conn.execute("INSERT INTO t (label) VALUES (%s)", (label,))
            time.sleep(pause)


def switch_and_wait(cluster, timeout: float = 30):
    """Close the current segment and wait until the archiver has stored it."""
    with cluster.connect() as conn:
        conn.execute("SELECT txid_current()")  # pg_switch_wal() does nothing on an empty segment
        current = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]

    def archived():
        with cluster.connect() as c:
            last = c.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0]
        return last is not None and last[:24] >= current

    wait_until(archived, timeout, what=f"segment {current} to be archived")
    return current


def commit_times(cluster) -> dict[int, object]:
    with cluster.connect() as conn:
        return dict(conn.execute("SELECT id, pg_xact_commit_timestamp(xmin) FROM t").fetchall())


def recovered_ids(rc) -> set[int]:
    with rc.cluster.connect(rc.database.dbname) as conn:
        return {r[0] for r in conn.execute("SELECT id FROM t").fetchall()}


def midpoint(a, b):
    return a + (b - a) / 2


@pytest.fixture
def source(make_archiving_cluster):
    cluster, db = make_archiving_cluster()
    with cluster.connect() as conn:
        conn.execute("CREATE TABLE t (id serial PRIMARY KEY, label text, ts timestamptz DEFAULT clock_timestamp())")
        conn.execute("CREATE ROLE app_rw LOGIN PASSWORD 'app-rw-pw'")
        conn.execute("GRANT SELECT, INSERT ON t TO app_rw")
    return cluster, db


def test_pitr_holds_exactly_the_rows_committed_up_to_each_target(source, repo):
    cluster, db = source
    run, base1 = base_backup(db)
    assert run.state == BackupRun.State.SUCCEEDED, run.error
    assert base1.state == Archive.State.COMPLETE and base1.timeline == 1 and base1.start_lsn and base1.stop_lsn
    assert {f.role for f in base1.files.all()} == {"base", "backup_manifest"}

    commit_rows(cluster, 40, "a")
    first_switch = switch_and_wait(cluster)
    commit_rows(cluster, 40, "b")           # in the next segment
    _, base2 = base_backup(db)
    commit_rows(cluster, 40, "c")
    switch_and_wait(cluster)
    commits = commit_times(cluster)
    ids = sorted(commits, key=lambda i: commits[i])
    a, b, c = ids[:40], ids[40:80], ids[80:]

    targets = {
        "between two commits in the first segment": midpoint(commits[a[19]], commits[a[20]]),
        "across the segment switch": midpoint(commits[b[9]], commits[b[10]]),
        "exactly a commit's timestamp (inclusive), after the second base backup": commits[c[20]],
    }
    used = {}
    for what, target in targets.items():
        rc = pitr.recover(db, target)
        try:
            expected = {i for i, ts in commits.items() if ts <= target}
            assert recovered_ids(rc) == expected, what
            used[what] = rc.base.pk
            assert rc.timeline == 2  # promoted
        finally:
            rc.destroy()
    assert used["between two commits in the first segment"] == base1.pk
    assert used["across the segment switch"] == base1.pk
    assert used["exactly a commit's timestamp (inclusive), after the second base backup"] == base2.pk
    assert first_switch < wal.segment_name(1, wal.parse_segment(first_switch, db.wal_segment_size)[1] + 1,
                                           db.wal_segment_size)


def test_latest_recovers_everything_archived_and_the_copy_is_locked_down(source, repo, target_password):
    cluster, db = source
    base_backup(db)
    commit_rows(cluster, 25, "x")
    switch_and_wait(cluster)
    rc = pitr.recover(db, None, port=None)
    try:
        assert recovered_ids(rc) == set(commit_times(cluster))
        with rc.cluster.connect() as conn:
            assert conn.execute("SHOW listen_addresses").fetchone()[0] == "127.0.0.1"
            assert conn.execute("SHOW archive_mode").fetchone()[0] == "off"
            assert conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = 'app_rw'").fetchone()[0] == 1
            hba = conn.execute("SELECT type, address FROM pg_hba_file_rules").fetchall()
        assert {(t, a) for t, a in hba} == {("local", None), ("host", "127.0.0.1")}
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=rc.port, dbname="postgres", user="app_rw",
                             password="app-rw-pw") as conn:  # the source's role and password work
            assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 25
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(host="127.0.0.1", port=rc.port, dbname="postgres", user="app_rw", password="nope")
        assert rc.connection_string() == f"postgresql://postgres@127.0.0.1:{rc.port}/postgres"
    finally:
        rc.destroy()
    assert not rc.scratch.exists()


def test_clear_errors_for_impossible_targets(source, repo):
    cluster, db = source
    with pytest.raises(pitr.PitrError, match="no complete base backup"):
        pitr.plan(db, None)
    _, base1 = base_backup(db)
    commit_rows(cluster, 5, "a")
    switch_and_wait(cluster)

    with pytest.raises(pitr.PitrError, match="before the oldest base backup"):
        pitr.plan(db, base1.started_at - timedelta(minutes=5))
    with pytest.raises(pitr.PitrError, match="in the future"):
        pitr.plan(db, timezone.now() + timedelta(hours=1))
    with pytest.raises(pitr.PitrError, match="not a time"):
        pitr.parse_target("yesterday at noon")
    assert pitr.parse_target("latest") is None
    t = pitr.parse_target("2026-11-20 14:30:00.25", "Europe/Berlin")
    assert t.utcoffset() == timedelta(hours=1) and t.microsecond == 250000
    assert pitr.parse_target("2026-11-20T14:30:00+02:00").utcoffset() == timedelta(hours=2)


def test_a_gap_in_the_wal_is_reported_not_papered_over(source, repo):
    cluster, db = source
    base_backup(db)
    commit_rows(cluster, 5, "a")
    gap = switch_and_wait(cluster)
    commit_rows(cluster, 5, "b")
    switch_and_wait(cluster)
    commit_rows(cluster, 5, "c")
    switch_and_wait(cluster)
    after = max(commit_times(cluster).values())
    for path in wal.area_path(db, repo).rglob(f"{gap}-*"):
        path.unlink()

    with pytest.raises(pitr.PitrError, match=f"WAL gap: segment\\(s\\) {gap}"):
        pitr.recover(db, after)
    states = wal.timelines(wal.area_path(db, repo), db.wal_segment_size)
    assert states[1].gaps == [(gap, gap)]
    windows = pitr.restore_windows(db)
    assert len(windows) == 1 and windows[0]["gap_after"] == gap


def test_a_base_backup_that_fails_its_checksum_is_refused(source, repo):
    cluster, db = source
    _, base1 = base_backup(db)
    commit_rows(cluster, 3, "a")
    switch_and_wait(cluster)
    tar = archive_dir(base1) / base1.files.get(role="base").path
    data = bytearray(tar.read_bytes())
    data[len(data) // 3] ^= 0x01
    tar.write_bytes(bytes(data))
    with pytest.raises(pitr.PitrError, match="failed verification.*does not match"):
        pitr.recover(db, None)
    assert not any(repo.root.parent.joinpath("scratch").glob("*/data"))


def test_a_damaged_wal_segment_stops_recovery_instead_of_ending_it_early(source, repo):
    cluster, db = source
    base_backup(db)
    commit_rows(cluster, 5, "a")
    damaged = switch_and_wait(cluster)
    commit_rows(cluster, 5, "b")
    switch_and_wait(cluster)
    [path] = list(wal.area_path(db, repo).rglob(f"{damaged}-*"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(pitr.PitrError, match="damaged"):
        pitr.recover(db, None)


def test_base_backup_needs_wal_archiving(make_target_db, repo):
    db = make_target_db()
    run = BackupRun.enqueue(db, trigger=BackupRun.Trigger.MANUAL, actor_label="test", kind=BackupKind.BASE)
    with pytest.raises(BackupError, match="no WAL archiving"):
        runner.execute(run.pk)
    run.refresh_from_db()
    assert run.state == BackupRun.State.FAILED


def test_a_base_backup_whose_wal_never_arrives_fails_after_a_bounded_wait(make_archiving_cluster, repo, settings):
    settings.BANKVAULT_WAL_WAIT_TIMEOUT = 3
    cluster, db = make_archiving_cluster(name="broken", settings={"archive_command": "/bin/false"})
    run = BackupRun.enqueue(db, trigger=BackupRun.Trigger.MANUAL, actor_label="test", kind=BackupKind.BASE)
    with pytest.raises(BackupError, match="its WAL was not archived within 3s"):
        runner.execute(run.pk)
    run.refresh_from_db()
    assert run.state == BackupRun.State.FAILED and "databases check broken --wal" in run.error
    from audit.models import AuditEvent

    actions = list(AuditEvent.objects.filter(target_id=str(run.pk), target_type="backups.backuprun")
                   .order_by("id").values_list("action", flat=True))
    assert actions == ["backup.run.queued", "backup.run.started", "backup.run.waiting_for_wal", "backup.run.failed"]
    assert not Archive.objects.filter(run=run).exists()
    assert list((repo.root / "tmp").iterdir()) == []
    with pytest.raises(pitr.PitrError, match="no complete base backup"):
        pitr.plan(db, None)
