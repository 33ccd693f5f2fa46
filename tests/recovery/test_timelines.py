"""Timelines: a recovered copy that is promoted lives on timeline 2 and archives into its own
area; the original's recovery is unaffected, and a recovery that would cross onto a timeline
that branched before its base backup ended is refused."""

import shutil

import pytest
from psycopg import sql

from backups.engine import wal
from backups.models import Database
from recovery.engine import pitr
from tests.recovery.test_pitr import base_backup, commit_rows, commit_times, midpoint, switch_and_wait

pytestmark = [pytest.mark.pg, pytest.mark.slow, pytest.mark.django_db]


def labels(rc) -> dict[str, int]:
    with rc.cluster.connect() as conn:
        return dict(conn.execute("SELECT label, count(*) FROM t GROUP BY 1").fetchall())


def test_a_promoted_copy_does_not_disturb_the_original_and_wrong_crossings_fail(
        make_archiving_cluster, repo, target_password):
    cluster, db = make_archiving_cluster(name="orig")
    with cluster.connect() as conn:
        conn.execute("CREATE TABLE t (id serial PRIMARY KEY, label text)")
    base_backup(db)
    commit_rows(cluster, 20, "a")
    switch_and_wait(cluster)
    commits = commit_times(cluster)
    order = sorted(commits, key=commits.get)
    fork = midpoint(commits[order[9]], commits[order[10]])

    # A recovered copy, promoted (timeline 2), archiving into its own area.
    copy = pitr.recover(db, fork)
    try:
        assert copy.timeline == 2
        copy_db = Database.objects.create(name="orig_copy", host="127.0.0.1", port=copy.port, dbname="postgres",
                                          user="postgres", wal_mode="archive")
        wal.prepare_area(copy_db, repo=repo)
        with copy.cluster.connect() as conn:
            conn.execute(sql.SQL("ALTER SYSTEM SET archive_command = {}").format(
                sql.Literal(wal.archive_command(copy_db, repo))))
            conn.execute("ALTER SYSTEM SET archive_mode = on")
        copy.cluster.restart()
        # The copy was promoted before it archived, so push its timeline history as a copy that
        # archived from the start would have.
        from backups import walpush

        walpush.push(str(wal.area_path(copy_db, repo)), str(copy.datadir / "pg_wal" / "00000002.history"),
                     "00000002.history")
        commit_rows(copy.cluster, 10, "copy")
        switch_and_wait(copy.cluster)
        copy_area = wal.area_path(copy_db, repo)
        assert 2 in wal.timelines(copy_area, db.wal_segment_size)

        # The original goes on; its recovery never sees the copy's rows.
        commit_rows(cluster, 10, "a2")
        switch_and_wait(cluster)
        rc = pitr.recover(db, None)
        try:
            assert labels(rc) == {"a": 20, "a2": 10}
        finally:
            rc.destroy()

        # A base backup taken after the fork, then the copy's WAL lands in the original's
        # area by mistake (a misdirected archive_command).
        base_backup(db)
        commit_rows(cluster, 5, "a3")
        switch_and_wait(cluster)
        area = wal.area_path(db, repo)
        for path in copy_area.rglob("*"):
            if path.is_file() and (path.name.startswith("00000002") or ".history" in path.name):
                dest = area / path.relative_to(copy_area)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)
        assert 2 in wal.timelines(area, db.wal_segment_size)

        rc = pitr.recover(db, None)  # stays on the backup's own timeline
        try:
            assert labels(rc) == {"a": 20, "a2": 10, "a3": 5}
        finally:
            rc.destroy()
        with pytest.raises(pitr.PitrError, match="branched off timeline 1 at .* before this base backup ended"):
            pitr.recover(db, None, timeline=2)
    finally:
        copy.destroy()
