"""Acceptance, the WAL half: on a real archiving cluster, base backups taken at simulated times
across 400 days with WAL written between them; retention expires the old base backups and the
WAL only they needed, keeps every segment from the oldest kept base backup on, and a
point-in-time recovery to a moment after a kept base backup still holds exactly the right rows."""

from __future__ import annotations

from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from audit.models import AuditEvent
from backups import retention
from backups.engine import wal
from backups.models import Archive, WalTimeline
from recovery.engine import pitr
from tests.backups.test_retention import make_policy
from tests.recovery.test_pitr import base_backup, commit_rows, commit_times, recovered_ids, switch_and_wait

pytestmark = [pytest.mark.pg, pytest.mark.slow, pytest.mark.django_db]


def test_retention_keeps_the_wal_of_kept_base_backups_and_pitr_still_works(make_archiving_cluster, repo):
    cluster, db = make_archiving_cluster()
    with cluster.connect() as conn:
        conn.execute("CREATE TABLE t (id serial PRIMARY KEY, label text)")
    # two dailies, two monthlies, nothing by age: of the bases below, the newest two stay
    make_policy(db, kind="base", name="weekly-base", keep_daily=2, keep_weekly=0, keep_monthly=2, keep_days=0)
    now = timezone.now()

    with time_machine.travel(now - timedelta(days=400), tick=True):
        _, oldest = base_backup(db)                      # day 1 of the simulated range
    commit_rows(cluster, 10, "a", pause=0)
    switch_and_wait(cluster)
    with time_machine.travel(now - timedelta(days=200), tick=True):
        _, middle = base_backup(db)
    commit_rows(cluster, 10, "b", pause=0)
    switch_and_wait(cluster)
    with time_machine.travel(now - timedelta(days=40), tick=True):
        _, kept = base_backup(db)                        # the oldest base backup that stays
    commit_rows(cluster, 30, "c")
    switch_and_wait(cluster)
    _, newest = base_backup(db)                          # today
    commit_rows(cluster, 10, "d", pause=0)
    switch_and_wait(cluster)
    assert all(a.state == Archive.State.COMPLETE for a in (oldest, middle, kept, newest))
    assert oldest.finished_at < now - timedelta(days=399) and kept.finished_at < now - timedelta(days=39)

    segsize = db.wal_segment_size
    area = wal.area_path(db, repo)
    first_kept = wal.segment_of_lsn(kept.start_lsn, segsize)
    before = set(wal.timelines(area, segsize)[1].segnos)
    assert min(before) < wal.segment_of_lsn(middle.start_lsn, segsize) < first_kept

    summary = retention.cleanup(databases=[db])

    assert summary[db.name]["archives_expired"] == 2, summary
    assert set(Archive.objects.filter(database=db).exclude(state="expired").values_list("pk", flat=True)) == {
        kept.pk, newest.pk}
    assert not (repo.root / oldest.path).exists() and not (repo.root / middle.path).exists()
    after = wal.timelines(area, segsize)[1]
    assert set(after.segnos) == {n for n in before if n >= first_kept}   # exactly the older WAL went
    assert after.gaps == [] and min(after.segnos) == first_kept
    wal.verify_segments(area, after.names)                               # what stays is intact
    row = WalTimeline.objects.get(database=db, timeline=1)
    assert row.first_segment == wal.segment_name(1, first_kept, segsize) and row.gaps == []
    event = AuditEvent.objects.get(action="wal.expired")
    assert event.details["segments"] == len(before) - len(after.segnos)
    windows = wal.restore_windows(db, repo)
    assert windows[0]["bases"][0] == kept.pk

    # PITR to a moment between two commits after the kept base backup (and before the newest one)
    commits = commit_times(cluster)
    ordered = sorted(commits, key=lambda i: commits[i])  # a: 0-9, b: 10-19, c: 20-49, d: 50-59
    c_rows = ordered[20:50]
    target = commits[c_rows[14]] + (commits[c_rows[15]] - commits[c_rows[14]]) / 2
    rc = pitr.recover(db, target)
    try:
        assert rc.base.pk == kept.pk
        assert recovered_ids(rc) == {i for i, ts in commits.items() if ts <= target}
        assert len(recovered_ids(rc)) == 35
    finally:
        rc.destroy()
    # what the expired base backups covered is gone, with a clear reason
    with pytest.raises(pitr.PitrError, match="before the oldest base backup"):
        pitr.plan(db, now - timedelta(days=300))
