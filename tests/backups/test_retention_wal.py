"""WAL retention on a WAL area laid out exactly as the push script stores it (small files with
real segment names, checksums and history files; no cluster): what stays is what a kept base
backup can use, on its timeline and the timelines that descend from it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from audit.models import AuditEvent
from backups import retention, walpush
from backups.engine import wal
from backups.models import WalTimeline
from tests.backups.test_retention import alive, make_archive, make_policy

pytestmark = [pytest.mark.django_db]
SEG = 16 * 1024 * 1024


def lsn(segno: int) -> str:
    return wal.int_to_lsn(segno * SEG + 0x28)


@pytest.fixture
def db(repo):
    from backups.models import Database

    return Database.objects.create(name="ledger", host="127.0.0.1", port=1, dbname="ledger", user="u",
                                   wal_mode="archive")


@pytest.fixture
def area(db, repo, tmp_path):
    path = wal.area_path(db, repo)
    path.mkdir(parents=True)
    return path


def push(area, tmp_path, name: str, content: bytes | None = None):
    src = tmp_path / "src"
    src.write_bytes(content if content is not None else name.encode() * 10)
    walpush.push(str(area), str(src), name, compress="none")


def segments(area, tmp_path, tli: int, first: int, last: int):
    for n in range(first, last + 1):
        push(area, tmp_path, wal.segment_name(tli, n, SEG))


def history(area, tmp_path, tli: int, lines: list[tuple[int, int]]):
    text = "".join(f"{parent}\t{wal.int_to_lsn(seg * SEG)}\tno recovery target specified\n" for parent, seg in lines)
    push(area, tmp_path, f"{tli:08X}.history", text.encode())


def stored(area) -> dict[int, set[int]]:
    segs, _ = wal.scan(area)
    out: dict[int, set[int]] = {}
    for name in segs:
        tli, n = wal.parse_segment(name, SEG)
        out.setdefault(tli, set()).add(n)
    return out


def others(area) -> set[str]:
    return set(wal.scan(area)[1])


def bases(db, repo, *specs):
    """(timeline, start segment, days ago) -> base archive rows and directories."""
    return [make_archive(db, repo, kind="base", started=timezone.now() - timedelta(days=ago), timeline=tli,
                         start_lsn=lsn(seg), stop_lsn=lsn(seg + 1)) for tli, seg, ago in specs]


def test_wal_before_the_oldest_kept_base_backup_goes_and_history_stays(db, repo, area, tmp_path):
    """Timeline 1: segments 1..30; timeline 2 branched off at segment 20 and runs to 40. The old
    base backup (segment 3) expires; the kept one on timeline 1 starts at segment 12."""
    segments(area, tmp_path, 1, 1, 30)
    history(area, tmp_path, 2, [(1, 20)])
    segments(area, tmp_path, 2, 20, 40)
    push(area, tmp_path, wal.segment_name(1, 3, SEG) + ".00000028.backup", b"START WAL LOCATION 0/3000028")
    push(area, tmp_path, wal.segment_name(1, 12, SEG) + ".00000028.backup", b"START WAL LOCATION 0/C000028")
    make_policy(db, kind="base", name="base", keep_daily=1, keep_weekly=0, keep_monthly=2, keep_days=30)
    old, kept, newest = bases(db, repo, (1, 3, 400), (1, 12, 60), (2, 33, 0))
    wal.refresh_catalog(db, repo)

    the_plan = retention.plan_database(db)
    assert [d.item.pk for d in the_plan.delete] == [old.pk]
    assert the_plan.wal.ranges == [{"timeline": 1, "first": wal.segment_name(1, 1, SEG),
                                    "last": wal.segment_name(1, 11, SEG), "segments": 11}]
    summary = retention.cleanup(databases=[db])

    assert summary["ledger"]["archives_expired"] == 1 and summary["ledger"]["wal_files"] == 12  # + the .backup
    assert alive(db) == {kept.path, newest.path}
    assert stored(area) == {1: set(range(12, 31)), 2: set(range(20, 41))}
    assert others(area) == {"00000002.history", wal.segment_name(1, 12, SEG) + ".00000028.backup"}
    event = AuditEvent.objects.get(action="wal.expired")
    assert event.actor_label == "system:cleanup" and event.target_label == "ledger"
    assert event.details["segments"] == 11 and event.details["files"] == 12
    assert event.details["ranges"] == the_plan.wal.ranges
    assert event.details["kept_from"] == {"1": wal.segment_name(1, 12, SEG), "2": wal.segment_name(2, 12, SEG)}
    row = WalTimeline.objects.get(database=db, timeline=1)
    assert row.first_segment == wal.segment_name(1, 12, SEG) and row.segment_count == 19 and row.gaps == []
    # every segment from the kept base backup's start is still readable, checksum-verified
    wal.verify_segments(area, [wal.segment_name(1, n, SEG) for n in range(12, 31)])
    # and a second cleanup finds nothing more to do
    retention.cleanup(databases=[db])
    assert AuditEvent.objects.filter(action="wal.expired").count() == 1


def test_a_timeline_no_kept_base_backup_needs_goes_whole_but_its_history_file_stays(db, repo, area, tmp_path):
    segments(area, tmp_path, 1, 1, 25)
    history(area, tmp_path, 2, [(1, 20)])
    segments(area, tmp_path, 2, 20, 40)
    history(area, tmp_path, 3, [(1, 20), (2, 38)])
    segments(area, tmp_path, 3, 38, 45)
    make_policy(db, kind="base", name="base", keep_daily=1, keep_weekly=0, keep_monthly=0, keep_days=0)
    bases(db, repo, (1, 2, 30), (2, 33, 10), (3, 39, 0))

    retention.cleanup(databases=[db])
    # only the newest base backup (timeline 3, segment 39) is kept: timelines 1 and 2 are its ancestors
    assert stored(area) == {3: set(range(39, 46))}
    assert others(area) == {"00000002.history", "00000003.history"}
    ranges = AuditEvent.objects.get(action="wal.expired").details["ranges"]
    assert [(r["timeline"], r["segments"]) for r in ranges] == [(1, 25), (2, 21), (3, 1)]
    assert set(WalTimeline.objects.filter(database=db).values_list("timeline", flat=True)) == {3}


def test_without_a_kept_base_backup_or_a_base_policy_no_wal_is_deleted(db, repo, area, tmp_path):
    segments(area, tmp_path, 1, 1, 10)
    make_policy(db, kind="base", name="base", keep_daily=0, keep_weekly=0, keep_monthly=0, keep_days=0)
    the_plan = retention.plan_database(db)
    assert the_plan.wal.files == [] and the_plan.wal.notes == ["no kept base backup: all WAL is kept"]
    retention.cleanup(databases=[db])
    assert stored(area) == {1: set(range(1, 11))}

    db.policies.all().delete()
    bases(db, repo, (1, 8, 1))
    the_plan = retention.plan_database(db)
    assert the_plan.wal.notes == ["no enabled base-backup policy: WAL is not expired"]
    retention.cleanup(databases=[db])
    assert stored(area) == {1: set(range(1, 11))}
    assert not AuditEvent.objects.filter(action="wal.expired").exists()


def test_a_timeline_without_a_history_file_and_the_newest_timeline_are_kept_whole(db, repo, area, tmp_path):
    segments(area, tmp_path, 1, 1, 10)
    segments(area, tmp_path, 2, 6, 12)   # no 00000002.history: where it came from is unknown
    segments(area, tmp_path, 4, 30, 31)  # the newest timeline, unrelated to the kept base backup
    history(area, tmp_path, 4, [(3, 30)])
    make_policy(db, kind="base", name="base", keep_daily=1, keep_weekly=0, keep_monthly=0, keep_days=0)
    bases(db, repo, (1, 5, 0))
    the_plan = retention.plan_database(db)
    assert "timeline 2 has no readable history file: its WAL is kept" in the_plan.wal.notes
    assert "timeline 4 is the newest: its WAL is kept" in the_plan.wal.notes
    retention.cleanup(databases=[db])
    assert stored(area) == {1: set(range(5, 11)), 2: set(range(6, 13)), 4: {30, 31}}


def test_a_damaged_history_file_counts_as_unknown(db, repo, area, tmp_path):
    segments(area, tmp_path, 1, 1, 4)
    history(area, tmp_path, 2, [(1, 3)])
    segments(area, tmp_path, 2, 3, 6)
    (hist,) = [p for p in area.iterdir() if p.name.startswith("00000002.history")]
    hist.write_bytes(b"tampered")  # no longer matches the sha256 in its name
    make_policy(db, kind="base", name="base", keep_daily=1, keep_weekly=0, keep_monthly=0, keep_days=0)
    bases(db, repo, (1, 3, 0))
    retention.cleanup(databases=[db])
    assert stored(area) == {1: {3, 4}, 2: {3, 4, 5, 6}}


def test_wal_that_cannot_be_removed_is_reported_in_the_trail(db, repo, area, tmp_path, monkeypatch):
    from pathlib import Path

    segments(area, tmp_path, 1, 1, 6)
    make_policy(db, kind="base", name="base", keep_daily=1, keep_weekly=0, keep_monthly=0, keep_days=0)
    bases(db, repo, (1, 4, 0))

    def refuse(self, missing_ok=False):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", refuse)
    summary = retention.cleanup(databases=[db])
    assert "not writable" in summary["ledger"]["error"]
    event = AuditEvent.objects.get(action="wal.expired")
    assert event.outcome == "failure" and event.details["files"] == 0 and "not writable" in event.details["error"]
    monkeypatch.undo()
    assert stored(area) == {1: set(range(1, 7))}
    retention.cleanup(databases=[db])
    assert stored(area) == {1: {4, 5, 6}}
