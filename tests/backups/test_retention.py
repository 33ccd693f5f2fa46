"""Retention planning (pure, no database) and the cleanup that carries it out against the catalog
and a real repository directory — including the 400-day grandfather-father-son simulation."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import time_machine
from django.utils import timezone

from audit.models import AuditEvent
from backups import retention
from backups.models import Archive, BackupPolicy, Database
from backups.retention import Item, Rule, plan_archives

BERLIN = ZoneInfo("Europe/Berlin")
GFS = Rule("daily", daily=7, weekly=4, monthly=12, days=30)


def kept(decisions) -> dict[int, list[str]]:
    return {d.item.pk: d.reasons for d in decisions if d.keep}


def dailies(end: datetime, n: int, state: str = "complete") -> list[Item]:
    """n archives, one a day, the newest at ``end``; pk 1 is the oldest."""
    return [Item(pk=i + 1, kind="logical", state=state, started_at=end - timedelta(days=n - 1 - i)) for i in range(n)]


def by_day(items) -> dict[date, int]:
    return {i.started_at.date(): i.pk for i in items}


# -- the planner ---------------------------------------------------------------------------------------
END = datetime(2026, 11, 20, 1, 30, tzinfo=UTC)
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
MONTH_ENDS = [date(2026, 9, 30), date(2026, 8, 31), date(2026, 7, 31), date(2026, 6, 30), date(2026, 5, 31),
              date(2026, 4, 30), date(2026, 3, 31), date(2026, 2, 28), date(2026, 1, 31), date(2025, 12, 31)]


def test_400_days_of_dailies_keep_30_days_and_the_monthly_grandfathers():
    items = dailies(END, 400)
    pk = by_day(items)
    decisions = plan_archives(items, [GFS], NOW, UTC)
    last_30 = {END.date() - timedelta(days=d) for d in range(30)}  # 10-22 .. 11-20: younger than 30 days
    assert set(kept(decisions)) == {pk[d] for d in last_30} | {pk[d] for d in MONTH_ENDS}
    assert len(kept(decisions)) == 40
    reasons = kept(decisions)
    assert reasons[pk[date(2026, 11, 20)]] == ["newest good archive", "younger than 30 days", "daily 2026-11-20",
                                               "weekly 2026-W47", "monthly 2026-11"]
    assert reasons[pk[date(2026, 11, 15)]] == ["younger than 30 days", "daily 2026-11-15", "weekly 2026-W46"]
    assert reasons[pk[date(2026, 10, 31)]] == ["younger than 30 days", "monthly 2026-10"]
    assert reasons[pk[date(2025, 12, 31)]] == ["monthly 2025-12"]
    gone = [d for d in decisions if not d.keep]
    assert len(gone) == 360
    assert gone[0].reasons == ["not the newest archive of one of the last 7 days, 4 weeks or 12 months, "
                               "older than 30 days"]


def test_without_a_minimum_age_exactly_the_gfs_set_survives():
    items = dailies(END, 400)
    pk = by_day(items)
    decisions = plan_archives(items, [Rule("gfs", 7, 4, 12, days=0)], NOW, UTC)
    daily = {date(2026, 11, 20) - timedelta(days=d) for d in range(7)}          # 11-14 .. 11-20
    weekly = {date(2026, 11, 20), date(2026, 11, 15), date(2026, 11, 8), date(2026, 11, 1)}  # W47..W44 (Sundays)
    monthly = {date(2026, 11, 20), date(2026, 10, 31), *MONTH_ENDS[:-1]}          # 2026-11 .. 2025-12
    monthly.add(date(2025, 12, 31))
    assert set(kept(decisions)) == {pk[d] for d in daily | weekly | monthly}
    assert len(kept(decisions)) == 7 + 2 + 11


def test_days_weeks_and_months_are_those_of_the_time_zone():
    # 22:30 and 23:30 UTC on Sunday 2026-11-22 are 23:30 Sunday and 00:30 Monday 2026-11-23 in Berlin.
    items = [Item(1, "logical", "complete", datetime(2026, 11, 21, 12, 0, tzinfo=UTC)),
             Item(2, "logical", "complete", datetime(2026, 11, 22, 22, 30, tzinfo=UTC)),
             Item(3, "logical", "complete", datetime(2026, 11, 22, 23, 30, tzinfo=UTC))]
    now = datetime(2026, 11, 23, 6, 0, tzinfo=UTC)
    two_days = Rule("r", daily=2, weekly=0, monthly=0, days=0)
    in_utc = kept(plan_archives(items, [two_days], now, UTC))
    in_berlin = kept(plan_archives(items, [two_days], now, BERLIN))
    assert set(in_utc) == {1, 3} and in_utc[3] == ["newest good archive", "daily 2026-11-22"]
    assert set(in_berlin) == {2, 3} and in_berlin[2] == ["daily 2026-11-22"] and "daily 2026-11-23" in in_berlin[3]
    one_week = Rule("r", daily=0, weekly=2, monthly=0, days=0)
    assert kept(plan_archives(items, [one_week], now, BERLIN))[2] == ["weekly 2026-W47"]
    assert "weekly 2026-W48" in kept(plan_archives(items, [one_week], now, BERLIN))[3]


def test_the_newest_good_archive_survives_whatever_the_counts():
    items = dailies(NOW - timedelta(days=500), 3)
    items.append(Item(9, "logical", "corrupt", NOW - timedelta(days=100)))
    decisions = plan_archives(items, [Rule("none", 0, 0, 0, 0)], NOW, UTC)
    assert kept(decisions) == {3: ["newest good archive"]}
    assert {d.item.pk: d.reasons for d in decisions if not d.keep}[9] == ["corrupt, older than 0 days"]


def test_corrupt_and_incomplete_archives_hold_no_slot_and_go_once_old():
    day = datetime(2026, 10, 1, 2, 0, tzinfo=UTC)
    items = [Item(1, "base", "complete", day), Item(2, "base", "corrupt", day + timedelta(hours=10)),
             Item(3, "base", "incomplete", day + timedelta(hours=11)),
             Item(4, "base", "complete", NOW - timedelta(hours=2)),
             Item(5, "base", "corrupt", NOW - timedelta(hours=1))]
    decisions = plan_archives(items, [GFS], NOW, UTC)
    # the good one of that day, week and month holds the slots, not the newer corrupt one
    assert kept(decisions)[1] == ["daily 2026-10-01", "weekly 2026-W40", "monthly 2026-10"]
    assert kept(decisions)[5] == ["younger than 30 days"]
    assert {d.item.pk: d.reasons for d in decisions if not d.keep} == {
        2: ["corrupt, older than 30 days"], 3: ["incomplete, older than 30 days"]}


def test_without_an_enabled_policy_nothing_is_deleted():
    decisions = plan_archives(dailies(END, 50), [], NOW, UTC)
    assert all(d.keep for d in decisions)
    assert decisions[-1].reasons == ["no enabled policy for logical archives: retention does not apply"]


def test_several_policies_keep_the_union_and_say_which_kept_what():
    items = dailies(END, 100)
    pk = by_day(items)
    short = Rule("nightly", daily=3, weekly=0, monthly=0, days=0)
    long = Rule("monthly", daily=0, weekly=0, monthly=3, days=0)
    decisions = kept(plan_archives(items, [short, long], NOW, UTC))
    assert set(decisions) == {pk[date(2026, 11, d)] for d in (18, 19, 20)} | {pk[date(2026, 10, 31)],
                                                                             pk[date(2026, 9, 30)]}
    assert decisions[pk[date(2026, 11, 20)]] == ["newest good archive", "daily 2026-11-20 (policy nightly)",
                                                 "monthly 2026-11 (policy monthly)"]
    gone = [d for d in plan_archives(items, [short, long], NOW, UTC) if not d.keep][0]
    assert len(gone.reasons) == 2 and gone.reasons[0].endswith("(policy nightly)")


def test_held_pinned_and_unfinished_archives_stay_and_expired_ones_are_left_out():
    old = NOW - timedelta(days=900)
    items = [Item(1, "base", "complete", old, legal_hold=True),
             Item(2, "base", "complete", old + timedelta(days=1), pinned=["needed by restore request 4 (pending)"]),
             Item(3, "base", "waiting_for_wal", old + timedelta(days=2)),
             Item(4, "base", "expired", old + timedelta(days=3)),
             Item(5, "base", "corrupt", old + timedelta(days=4), legal_hold=True),
             Item(6, "base", "complete", NOW)]
    decisions = plan_archives(items, [Rule("r", 1, 1, 1, 0)], NOW, UTC)
    assert [d.item.pk for d in decisions] == [6, 5, 3, 2, 1]
    assert kept(decisions) == {
        1: ["legal hold"], 2: ["needed by restore request 4 (pending)"],
        3: ["waiting for wal: not a finished archive"], 5: ["legal hold"],
        6: ["newest good archive", "daily 2026-11-20", "weekly 2026-W47", "monthly 2026-11"]}


def test_an_archive_from_the_future_counts_as_young():
    items = [Item(1, "logical", "complete", NOW - timedelta(days=40)), Item(2, "logical", "corrupt",
                                                                         NOW + timedelta(hours=3))]
    assert kept(plan_archives(items, [Rule("r", 0, 0, 0, 30)], NOW, UTC))[2] == ["younger than 30 days"]


STATES = ["complete", "complete", "complete", "corrupt", "incomplete", "waiting_for_wal"]


@pytest.mark.parametrize("seed", range(200))
def test_invariants_hold_for_any_history(seed):
    import random

    rnd = random.Random(seed)
    spec = [(rnd.randrange(24 * 800), rnd.choice(STATES), rnd.random() < 0.1) for _ in range(rnd.randrange(60))]
    daily, weekly, monthly, days = rnd.randrange(11), rnd.randrange(7), rnd.randrange(16), rnd.randrange(61)
    items = [Item(i, "logical", state, NOW - timedelta(hours=h), legal_hold=held)
             for i, (h, state, held) in enumerate(spec)]
    rule = Rule("r", daily, weekly, monthly, days)
    decisions = plan_archives(items, [rule], NOW, BERLIN)
    keep = kept(decisions)
    good = sorted((i for i in items if i.state == "complete"), key=lambda i: (i.started_at, i.pk))
    if good:
        assert good[-1].pk in keep                                     # the newest good archive
    for item in items:
        if item.legal_hold or item.state == "waiting_for_wal" or item.started_at > NOW - timedelta(days=days):
            assert item.pk in keep
    for bucket, n in (("daily", daily), ("weekly", weekly), ("monthly", monthly)):
        slots = [r for reasons in keep.values() for r in reasons if r.startswith(bucket + " ")]
        assert len(slots) == len(set(slots)) <= n                      # one archive per period, at most n periods
    deleted = [d for d in decisions if not d.keep]
    assert all(d.item.state in ("complete", "corrupt", "incomplete") and d.reasons for d in deleted)


# -- the cleanup, against the catalog and a real repository directory ----------------------------------------
def make_archive(db, repo, kind="logical", state="complete", started=None, **extra) -> Archive:
    """A catalog row and a small real directory with a manifest and a file, as a run leaves them."""
    started = started or timezone.now()
    rel = f"archives/{db.name}/{timezone.localtime(started):%Y%m%d_%H%M%S}_{kind}_x{Archive.objects.count()}"
    path = repo.root / rel
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"started_at": started.isoformat()}))
    (path / "dump.pgdump.zst").write_bytes(b"x" * 100)
    return Archive.objects.create(database=db, kind=kind, state=state, path=rel, started_at=started,
                                  finished_at=started + timedelta(minutes=1), bytes=100, compression="zstd",
                                  manifest_sha256="0" * 64, **extra)


def make_policy(db, kind="logical", name="daily", **keep) -> BackupPolicy:
    from django_celery_beat.models import CrontabSchedule

    schedule, _ = CrontabSchedule.objects.get_or_create(minute="0", hour="2", day_of_week="*", day_of_month="*",
                                                        month_of_year="*")
    return BackupPolicy.objects.create(database=db, name=name, kind=kind, schedule=schedule, **keep)


@pytest.fixture
def auth(db):
    return Database.objects.create(name="auth", host="127.0.0.1", port=1, dbname="authdb", user="u")


def on_disk(repo, db) -> set[str]:
    root = repo.root / "archives" / db.name
    return {f"archives/{db.name}/{p.name}" for p in root.iterdir()} if root.is_dir() else set()


def alive(db) -> set[str]:
    return set(Archive.objects.filter(database=db).exclude(state="expired").values_list("path", flat=True))


@pytest.mark.django_db
def test_400_simulated_days_leave_exactly_the_gfs_set_the_held_and_the_young(auth, repo, settings):
    """Acceptance: a daily archive for 400 days (the clock moved day by day), one of them under
    legal hold; the monthly cleanup at the end keeps exactly the GFS set, the held archive and the
    last 30 days — on disk and in the catalog — and audits every deletion with its reasons."""
    from backups import tasks

    settings.TIME_ZONE = "Europe/Berlin"
    make_policy(auth)  # 7 daily, 4 weekly, 12 monthly, RETENTION_DAYS (30)
    first = datetime(2025, 10, 17, 1, 30, tzinfo=UTC)  # 02:30 / 03:30 in Berlin
    with time_machine.travel(first, tick=False) as clock:
        by_date = {}
        for day in range(400):
            clock.move_to(first + timedelta(days=day))
            by_date[timezone.localdate()] = make_archive(auth, repo)
        held = by_date[date(2026, 3, 14)]
        retention.place_hold(held.pk, "cli:legal", "case 2026-117: preserve March statements")
        clock.move_to(datetime(2026, 11, 20, 11, 0, tzinfo=UTC))
        result = tasks.cleanup()

    young = {date(2026, 11, 20) - timedelta(days=d) for d in range(30)}
    expected = {by_date[d].path for d in young | set(MONTH_ENDS)} | {held.path}
    assert alive(auth) == expected
    assert on_disk(repo, auth) == expected
    assert len(expected) == 41
    assert result["retention"]["auth"]["archives_expired"] == 359
    expired = Archive.objects.filter(database=auth, state="expired")
    assert expired.count() == 359 and not expired.filter(expired_at=None).exists()
    events = AuditEvent.objects.filter(action="archive.expired")
    assert events.count() == 359 and {e.actor_label for e in events} == {"system:cleanup"}
    sample = events.get(target_id=str(by_date[date(2026, 8, 15)].pk))
    assert sample.details["reasons"] == ["not the newest archive of one of the last 7 days, 4 weeks or 12 months, "
                                         "older than 30 days"]
    assert sample.details["path"] == by_date[date(2026, 8, 15)].path
    assert not list((repo.root / "tmp").glob("expiring-*"))

    # A month later, no backup since (they stopped): the 30-day window has moved past every archive,
    # but the slots count days, weeks and months that *have* an archive, so the last 7 dailies,
    # 4 weeklies and 12 monthlies stay, as Borg and restic users expect.
    with time_machine.travel(datetime(2026, 12, 21, 11, 0, tzinfo=UTC), tick=False):
        tasks.cleanup()
    daily = {date(2026, 11, 20) - timedelta(days=d) for d in range(7)}
    weekly = {date(2026, 11, 8), date(2026, 11, 1)}  # and 11-15, 11-20 (daily too)
    assert alive(auth) == {by_date[d].path for d in daily | weekly | {date(2026, 10, 31)} | set(MONTH_ENDS)} | {
        held.path}
    assert on_disk(repo, auth) == alive(auth)


@pytest.mark.django_db
def test_a_hold_placed_after_the_plan_still_stops_the_deletion(auth, repo):
    make_policy(auth, keep_daily=1, keep_weekly=0, keep_monthly=0, keep_days=0)
    old = make_archive(auth, repo, started=timezone.now() - timedelta(days=3))
    make_archive(auth, repo)
    the_plan = retention.plan_database(auth)
    assert [d.item.pk for d in the_plan.delete] == [old.pk]
    retention.place_hold(old.pk, "cli:legal", "subpoena")
    assert retention.expire_archive(old.pk, the_plan.delete[0].reasons, "system:cleanup", repo) is None
    old.refresh_from_db()
    assert old.state == "complete" and (repo.root / old.path).is_dir()
    assert not AuditEvent.objects.filter(action="archive.expired").exists()


@pytest.mark.django_db
def test_a_hold_survives_a_catalog_that_lost_it(auth, repo):
    """A catalog rebuilt from the repository (or edited by hand) without the flag: the marker in the
    archive's directory still keeps the archive."""
    make_policy(auth, keep_daily=1, keep_weekly=0, keep_monthly=0, keep_days=0)
    old = make_archive(auth, repo, started=timezone.now() - timedelta(days=3))
    make_archive(auth, repo)
    retention.place_hold(old.pk, "cli:legal", "case 7")
    Archive.objects.filter(pk=old.pk).update(legal_hold=False, legal_hold_reason="")
    the_plan = retention.plan_database(auth)
    assert the_plan.delete == []
    assert {d.item.pk: d.reasons for d in the_plan.kept}[old.pk] == [
        "legal hold marker (legal-hold.json) in the repository"]
    assert retention.expire_archive(old.pk, ["test"], "system:cleanup", repo) is None
    retention.cleanup(databases=[auth])
    assert old.path in alive(auth) and (repo.root / old.path / "dump.pgdump.zst").exists()


@pytest.mark.django_db
def test_archives_that_restores_drills_and_uploads_need_are_kept(auth, repo, personas):
    from backups.models import ArchiveCopy, RemoteRepository
    from monitoring.models import Drill
    from recovery.models import RestoreRequest

    make_policy(auth, keep_daily=1, keep_weekly=0, keep_monthly=0, keep_days=0)
    make_policy(auth, kind="base", name="base", keep_daily=1, keep_weekly=0, keep_monthly=0, keep_days=0)
    days = timezone.now() - timedelta(days=10)
    requested, drilled, uploading, free = (make_archive(auth, repo, started=days + timedelta(hours=h))
                                           for h in range(4))
    base_old = make_archive(auth, repo, kind="base", started=days, timeline=1, start_lsn="0/2000028")
    base_mid = make_archive(auth, repo, kind="base", started=days + timedelta(days=5), timeline=1,
                            start_lsn="0/9000028")
    make_archive(auth, repo, kind="base", timeline=1, start_lsn="0/A000028")
    make_archive(auth, repo)
    common = {"requester": personas["operator"], "reason": "test", "digest": "0" * 64}
    by_archive = RestoreRequest.objects.create(kind="archive", archive=requested, database=auth, state="approved",
                                               new_name="copy1", items=[{"database": auth.pk, "archive": requested.pk}],
                                               **common)
    # every database to a point in time (no database named): the base backup it would start from stays
    to_a_time = RestoreRequest.objects.create(kind="pitr", mode="replace", target_time=days + timedelta(hours=2),
                                              items=[{"database": auth.pk, "name": "auth"}], **common)
    RestoreRequest.objects.create(kind="archive", archive=free, database=auth, state="succeeded", new_name="copy2",
                                  items=[{"database": auth.pk, "archive": free.pk}], **common)
    drill = Drill.objects.create(database=auth, kind="archive", archive=drilled)
    remote = RemoteRepository.objects.create(name="s3", bucket="b", access_key_id="k")
    ArchiveCopy.objects.create(archive=uploading, remote=remote)

    the_plan = retention.plan_database(auth)
    reasons = {d.item.pk: d.reasons for d in the_plan.kept}
    assert reasons[requested.pk] == [f"needed by restore request {by_archive.pk} (approved)"]
    assert reasons[drilled.pk] == [f"in use by running drill {drill.pk}"]
    assert reasons[uploading.pk] == ["being copied to s3"]
    assert reasons[base_old.pk] == [f"needed by restore request {to_a_time.pk} (pending)"]
    assert {d.item.pk for d in the_plan.delete} == {free.pk, base_mid.pk}
    retention.cleanup(databases=[auth])
    assert alive(auth) >= {requested.path, drilled.path, uploading.path, base_old.path}
    assert free.path not in alive(auth)


@pytest.mark.django_db
def test_a_database_without_a_policy_keeps_everything(auth, repo):
    archives = [make_archive(auth, repo, started=timezone.now() - timedelta(days=d)) for d in (900, 400, 1)]
    make_policy(auth, kind="base", name="base", keep_daily=0, keep_weekly=0, keep_monthly=0, keep_days=0)
    summary = retention.cleanup(databases=[auth])
    assert summary["auth"]["archives_expired"] == 0
    assert alive(auth) == {a.path for a in archives}
    policy = make_policy(auth, keep_daily=0, keep_weekly=0, keep_monthly=0, keep_days=0)
    policy.enabled = False
    policy.save()
    assert retention.cleanup(databases=[auth])["auth"]["archives_expired"] == 0


@pytest.mark.django_db
def test_a_deletion_interrupted_by_a_crash_is_finished_by_the_next_cleanup(auth, repo):
    make_policy(auth, keep_daily=1, keep_weekly=0, keep_monthly=0, keep_days=0)
    crashed = make_archive(auth, repo, started=timezone.now() - timedelta(days=5))
    make_archive(auth, repo)
    # The row was marked expired, then the worker died before it removed the files ...
    Archive.objects.filter(pk=crashed.pk).update(state="expired", expired_at=timezone.now())
    # ... and another died after moving an archive aside.
    stray = repo.root / "tmp" / "expiring-1234abcd-20261101_020000_logical_r9"
    (stray / "base").mkdir(parents=True)
    (stray / "base" / "base.tar.zst").write_bytes(b"y" * 10)
    retention.cleanup(databases=[auth])
    assert not (repo.root / crashed.path).exists()
    assert not stray.exists()
    assert len(on_disk(repo, auth)) == 1


@pytest.mark.django_db
def test_two_cleanups_at_once_are_refused(auth, repo):
    with retention._CleanupLock(repo), pytest.raises(retention.RetentionError, match="another cleanup is running"):
        retention.cleanup(databases=[auth])


@pytest.mark.django_db
def test_a_database_busy_with_a_backup_or_restore_is_cleaned_when_free(auth, repo, monkeypatch):
    from backups import locks

    make_policy(auth, keep_daily=1, keep_weekly=0, keep_monthly=0, keep_days=0)
    old = make_archive(auth, repo, started=timezone.now() - timedelta(days=5))
    make_archive(auth, repo)
    monkeypatch.setattr(retention, "BUSY_WAIT", 0.2)
    with locks.database_lock(auth, "restore request 4"):
        summary = retention.cleanup(databases=[auth])
    assert "auth is busy: restore request 4" in summary["auth"]["error"]
    assert "archives cleanup --database auth" in summary["auth"]["error"]
    assert old.path in alive(auth)
    assert retention.cleanup(databases=[auth])["auth"]["archives_expired"] == 1


@pytest.mark.django_db
def test_a_repository_that_refuses_the_removal_is_reported_and_finished_later(auth, repo, monkeypatch):
    import os

    make_policy(auth, keep_daily=1, keep_weekly=0, keep_monthly=0, keep_days=0)
    old = make_archive(auth, repo, started=timezone.now() - timedelta(days=5))
    make_archive(auth, repo)
    real_rename = os.rename

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "rename", refuse)
    summary = retention.cleanup(databases=[auth])
    assert "not writable" in summary["auth"]["error"]
    assert AuditEvent.objects.filter(action="retention.cleanup", outcome="failure").exists()
    old.refresh_from_db()
    assert old.state == "expired" and (repo.root / old.path).is_dir()  # no restore picks it; files still there
    monkeypatch.setattr(os, "rename", real_rename)
    retention.cleanup(databases=[auth])
    assert not (repo.root / old.path).exists()


@pytest.mark.django_db
def test_the_remote_copy_hook_is_called_for_each_expired_archive(auth, repo, monkeypatch):
    from backups import offsite

    calls = []
    monkeypatch.setattr(offsite, "expire_copies", lambda archive, actor=None: calls.append((archive.pk, actor)),
                        raising=False)
    make_policy(auth, keep_daily=1, keep_weekly=0, keep_monthly=0, keep_days=0)
    old = make_archive(auth, repo, started=timezone.now() - timedelta(days=5))
    make_archive(auth, repo)
    retention.cleanup("cli:ops", databases=[auth])
    assert calls == [(old.pk, "cli:ops")]


# -- legal hold -----------------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_holds_need_a_reason_a_live_archive_and_the_permission(auth, repo, personas):
    from django.core.exceptions import PermissionDenied

    archive = make_archive(auth, repo)
    with pytest.raises(retention.RetentionError, match="give a reason"):
        retention.place_hold(archive.pk, personas["operator"], "   ")
    with pytest.raises(PermissionDenied):
        retention.place_hold(archive.pk, personas["approver_a"], "case 1")
    with pytest.raises(retention.RetentionError, match="not under legal hold"):
        retention.lift_hold(archive.pk, personas["operator"], "done")
    with pytest.raises(retention.RetentionError, match="no archive with id 999999"):
        retention.place_hold(999999, personas["operator"], "case 1")
    archive.refresh_from_db()
    assert not archive.legal_hold and not AuditEvent.objects.filter(action__startswith="archive.legal_hold").exists()

    retention.place_hold(archive.pk, personas["operator"], "case 1")
    marker = json.loads((repo.root / archive.path / "legal-hold.json").read_text())
    assert marker["reason"] == "case 1" and marker["placed_by"] == "olga" and marker["archive"] == archive.pk
    with pytest.raises(retention.RetentionError, match=r"already under legal hold \(case 1\)"):
        retention.place_hold(archive.pk, personas["operator"], "case 2")
    retention.lift_hold(archive.pk, personas["superuser"], "case closed")
    archive.refresh_from_db()
    assert not archive.legal_hold and archive.legal_hold_reason == ""
    assert not (repo.root / archive.path / "legal-hold.json").exists()
    placed, lifted = AuditEvent.objects.filter(action__startswith="archive.legal_hold").order_by("sequence")
    assert (placed.action, placed.actor_label, placed.details["reason"]) == ("archive.legal_hold.placed", "olga",
                                                                            "case 1")
    assert (lifted.action, lifted.details["reason"], lifted.details["hold_reason"]) == (
        "archive.legal_hold.lifted", "case closed", "case 1")

    Archive.objects.filter(pk=archive.pk).update(state="expired", expired_at=timezone.now())
    with pytest.raises(retention.RetentionError, match="files are gone"):
        retention.place_hold(archive.pk, personas["operator"], "too late")
