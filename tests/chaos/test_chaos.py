"""Soak and chaos (issue 8): real worker and beat processes, real Redis, real clusters, and the
faults of nights nobody watched — a killed worker, a restarted broker, a restarted portal
database, a rebooting target, a full disk. Every scenario counts what it expected and what
became of each run; none may lose a run, run one twice, or harm a live database.

Run with `make chaos` (BANKVAULT_CHAOS_SOAK_MINUTES sets the soak's length, default 15)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.db import connections
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule

from audit.models import AuditEvent
from backups import services as backup_services
from backups.engine.repository import sha256_file
from backups.models import Archive, BackupPolicy, BackupRun
from backups.tasks import execute_run, run_policy
from recovery import services as restore_services
from recovery.models import RestoreRequest
from recovery.tasks import execute_restore
from tests.chaos.conftest import Row, fingerprint, record, wait_for
from tests.conftest import FIXTURE_SQL
from tests.plugin import services

pytestmark = [pytest.mark.pg, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

SOAK_MINUTES = int(os.environ.get("BANKVAULT_CHAOS_SOAK_MINUTES", "15"))
SMALL_SQL = ("CREATE TABLE items (id int PRIMARY KEY, v text);"
             "INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, 500) g;")
# Incompressible enough that its archive takes megabytes (the disk-full scenario).
BULKY_SQL = ("CREATE TABLE blobs (id int PRIMARY KEY, v text);"
             "INSERT INTO blobs SELECT g, md5(random()::text) || md5(random()::text) "
             "FROM generate_series(1, 120000) g;")
ENDED = (BackupRun.State.SUCCEEDED, BackupRun.State.FAILED)
REQ_ENDED = (RestoreRequest.State.SUCCEEDED, RestoreRequest.State.FAILED)


# -- helpers ---------------------------------------------------------------------------------------
def policy_for(db, *, minute: str = "*", hour: str = "*", name: str = "chaos") -> BackupPolicy:
    cron, _ = CrontabSchedule.objects.get_or_create(minute=minute, hour=hour, day_of_week="*", day_of_month="*",
                                                    month_of_year="*", timezone="UTC")
    return BackupPolicy.objects.create(database=db, name=name, schedule=cron)


def far_policy(db) -> BackupPolicy:
    """A policy whose crontab does not come round during the test: its slot messages are sent by
    the test (as beat would), so a scenario need not wait for a minute to turn."""
    return policy_for(db, minute="0", hour=str((timezone.now().astimezone(UTC).hour + 12) % 24), name="far")


def through(db, link) -> None:
    """Point the registered database at a slow loopback link, so a run lasts long enough to hurt."""
    type(db).objects.filter(pk=db.pk).update(port=link.port)


def ready(procs, *names: str, timeout: float = 60) -> None:
    for name in names:
        wait_for(lambda n=name: b" ready." in (procs.logs / f"{n}.log").read_bytes(), timeout, f"worker {name} ready")


def workers(procs, *names: str, env: dict | None = None) -> None:
    for name in names:
        procs.worker(name, env=env)
    ready(procs, *names)


def beat(procs, name: str = "beat") -> None:
    procs.beat(name)
    wait_for(lambda: b"beat: Starting" in (procs.logs / f"{name}.log").read_bytes(), 60, "beat started")


def owner_of(procs, worker_label: str) -> str:
    """The Procs entry whose process group holds the pool process named in a run's `worker`."""
    pid = int(worker_label.rsplit(":", 1)[1])
    group = os.getpgid(pid)
    return next(name for name, proc in procs.procs.items() if proc.pid == group)


def archive_ok(archive: Archive | None) -> bool:
    """Every file the catalog lists is in the repository with the cataloged size and sha256."""
    if archive is None:
        return False
    root = Path(django_settings.BANKVAULT_REPOSITORY) / archive.path
    files = list(archive.files.all())
    if not files or not (root / "manifest.json").is_file():
        return False
    for f in files:
        path = root / f.path
        if not path.is_file() or sha256_file(path) != (f.sha256, f.bytes):
            return False
    return True


def staging_left(run_id: int | None = None) -> list[str]:
    tmp = Path(django_settings.BANKVAULT_REPOSITORY) / "tmp"
    if not tmp.is_dir():
        return []
    prefix = f"run-{run_id}-" if run_id else "run-"
    return [p.name for p in tmp.iterdir() if p.name.startswith(prefix)]


def mid_run(run_id: int, timeout: float = 60) -> BackupRun:
    """The run once it is running and writing its staging directory, a moment in."""
    wait_for(lambda: BackupRun.objects.filter(pk=run_id, state="running").exists() and staging_left(run_id), timeout,
             f"run {run_id} writing into the repository")
    time.sleep(2)
    return BackupRun.objects.get(pk=run_id)


def wait_slot_start(latest_second: int = 30) -> None:
    """Wait until the minute is young enough that a run sent now ends before the next slot."""
    while not 2 <= timezone.now().second <= latest_second:
        time.sleep(0.5)


def ended(run_id: int) -> BackupRun | None:
    run = BackupRun.objects.get(pk=run_id)
    return run if run.state in ENDED else None


def req_ended(pk: int) -> RestoreRequest | None:
    req = RestoreRequest.objects.get(pk=pk)
    return req if req.state in REQ_ENDED else None


def received(procs, needle: str) -> int:
    """How many times the workers received a message (a redelivery is the same message again):
    ``needle`` is a task id, or a task name to count all its messages."""
    head = re.escape(f"Task {needle}[") + r"[^]]+" if "." in needle else re.escape(f"[{needle}")
    pattern = head + r"\] received"
    return sum(len(re.findall(pattern, (procs.logs / f"{name}.log").read_text(errors="replace")))
               for name in ("w1", "w2") if (procs.logs / f"{name}.log").exists())


def approved(personas, **fields) -> RestoreRequest:
    req = restore_services.file_request(personas["operator"], kind="archive", reason="chaos", **fields)
    for who in ("approver_a", "approver_b"):
        req.refresh_from_db()
        if req.state == RestoreRequest.State.PENDING:
            req.approve(personas[who], password_ok=True)
    req.refresh_from_db()
    assert req.state in (RestoreRequest.State.APPROVED, RestoreRequest.State.RUNNING, *REQ_ENDED), req.state
    return req


def database_names(cluster) -> set[str]:
    with cluster.connect() as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()}


def tally(runs, *, reason: str | None = None) -> dict:
    """good: succeeded with a verified archive; failed with reason: failed and the error matches
    ``reason``; lost: anything else (still active, wrong reason, bad archive); duplicates: a
    second archive of a run, or an archive of a run that did not succeed."""
    good = failed = lost = dup = 0
    for run in runs:
        archives = list(Archive.objects.filter(run=run))
        if run.state == BackupRun.State.SUCCEEDED and len(archives) >= 1 and archive_ok(archives[0]):
            good += 1
            dup += len(archives) - 1
        elif run.state == BackupRun.State.FAILED and reason and re.search(reason, run.error, re.I):
            failed += 1
            dup += len(archives)
        else:
            lost += 1
    return {"good": good, "failed_with_reason": failed, "lost": lost, "duplicates": dup}


def finish(row: Row) -> None:
    record(row)
    assert row.lost == 0, row
    assert row.duplicates == 0, row
    assert row.harmed == 0, row
    assert row.good + row.failed_with_reason == row.expected, row


def archive_dirs(db) -> int:
    d = Path(django_settings.BANKVAULT_REPOSITORY) / "archives" / db.name
    return len([p for p in d.iterdir() if p.is_dir()]) if d.is_dir() else 0


# -- 1. redelivery and duplicated messages ----------------------------------------------------------
def test_redelivered_and_duplicated_messages_are_no_ops(stack, make_target_db, target_cluster, slow_link, personas):
    started = time.monotonic()
    db = make_target_db(name="redeliver", sql=FIXTURE_SQL)
    live = fingerprint(target_cluster, db.dbname)
    through(db, slow_link(target_cluster.port, rate=80_000, both_ways=True))
    policy = far_policy(db)
    # Redis hands an unacknowledged message to another consumer after a second: every long task
    # is redelivered while it runs.
    workers(stack, "w1", "w2", env={"CELERY_VISIBILITY_TIMEOUT": "1",
                                    "DJANGO_SETTINGS_MODULE": "tests.chaos.redelivery_settings"})

    first = run_policy.delay(policy.pk)
    run = wait_for(lambda: BackupRun.objects.filter(policy=policy, state="running").first(), 30, "the slot's run")
    run_policy.delay(policy.pk)  # beat's message, twice more
    run_policy.delay(policy.pk)
    execute_run.delay(run.pk)  # and the run's own message, once more
    run = wait_for(lambda: ended(run.pk), 120, "the run to end")
    time.sleep(3)  # let any redelivered copy reach a worker
    wait_for(lambda: not BackupRun.objects.filter(policy=policy, state__in=BackupRun.ACTIVE_STATES).exists(), 30,
             "no active run")
    runs = list(BackupRun.objects.filter(database=db))
    backups = tally(runs)
    redelivered = received(stack, first.id)
    assert run.state == "succeeded", run.error
    assert len(runs) == 1 and archive_dirs(db) == 1 and not staging_left()
    assert redelivered >= 2, f"the slot's message was received {redelivered} times; expected a redelivery"

    # One restore, its message duplicated and (being long) redelivered.
    archive = Archive.objects.get(run=run)
    req = approved(personas, mode="copy", archive=archive, new_name=f"{db.dbname}_copy")
    wait_for(lambda: RestoreRequest.objects.get(pk=req.pk).state != "approved", 30, "the restore to start")
    execute_restore.delay(req.pk)
    execute_restore.delay(req.pk)
    req = wait_for(lambda: req_ended(req.pk), 120, "the restore to end")
    time.sleep(3)
    executions = AuditEvent.objects.filter(action="restore.request.started", target_id=str(req.pk)).count()
    restore_messages = received(stack, "recovery.tasks.execute_restore")
    assert req.state == "succeeded", req.error
    assert f"{db.dbname}_copy" in database_names(target_cluster)
    harmed = int(fingerprint(target_cluster, db.dbname) != live)
    finish(Row("redelivery + duplicate messages", expected=2,
               good=backups["good"] + int(req.state == "succeeded" and executions == 1),
               failed_with_reason=0, lost=backups["lost"] + int(req.state != "succeeded"),
               duplicates=backups["duplicates"] + (len(runs) - 1) + max(0, executions - 1), harmed=harmed,
               seconds=time.monotonic() - started,
               note=f"slot message received {redelivered}x (visibility 1 s) + 3 duplicates sent; restore "
                    f"messages received {restore_messages}x (1 + 2 duplicates + redeliveries), executed {executions}x"))
    target_cluster.sql(f'DROP DATABASE IF EXISTS "{db.dbname}_copy"')


# -- 2. soak ---------------------------------------------------------------------------------------
def test_soak_every_slot_makes_exactly_one_verified_archive(stack, make_target_db, target_cluster):
    started = time.monotonic()
    dbs = [make_target_db(name=f"soak{i:02d}", sql=SMALL_SQL) for i in range(20)]
    before = {db.pk: fingerprint(target_cluster, db.dbname) for db in dbs}
    policies = [policy_for(db) for db in dbs]
    workers(stack, "w1", "w2")
    # Start beat early in a minute later than the one the policies were made in, and stop it at
    # the same second N minutes later: N minute boundaries lie between, none close to either end.
    # Beat also sends the start minute's slot at once (it is due: its boundary passed since the
    # entry was made), so N + 1 slots in all.
    made = timezone.now().replace(second=0, microsecond=0)
    while not (timezone.now() - made >= timedelta(minutes=1) and 10 <= timezone.now().second <= 25):
        time.sleep(0.5)
    beat_from = timezone.now()
    beat(stack)
    time.sleep(max(0.0, (beat_from + timedelta(minutes=SOAK_MINUTES) - timezone.now()).total_seconds()))
    stack.stop("beat")
    beat_to = timezone.now()
    first_slot = beat_from.replace(second=0, microsecond=0)
    slots = {first_slot + timedelta(minutes=i) for i in range(SOAK_MINUTES + 1)}
    assert all(beat_from - timedelta(seconds=30) < s < beat_to for s in slots) and len(slots) == SOAK_MINUTES + 1

    ids = [p.pk for p in policies]
    wait_for(lambda: not BackupRun.objects.filter(policy_id__in=ids, state__in=BackupRun.ACTIVE_STATES).exists(),
             180, "the last slot's runs to end")
    good = failed = lost = dup = unexpected = 0
    notes = []
    for policy in policies:
        runs = list(BackupRun.objects.filter(policy=policy))
        by_slot: dict[datetime, list[BackupRun]] = {}
        for run in runs:
            key = run.slot_key.split("@", 1)[1].removesuffix("+retry")
            by_slot.setdefault(datetime.strptime(key, "%Y-%m-%dT%H:%MZ").replace(tzinfo=UTC), []).append(run)
        for slot in slots:
            t = tally(by_slot.get(slot, []), reason=None)
            if t["good"] == 1:
                good += 1
            elif not by_slot.get(slot):
                lost += 1
                notes.append(f"{policy.database.name} {slot:%H:%M}: no run")
            else:
                lost += 1
                notes.append(f"{policy.database.name} {slot:%H:%M}: " +
                             "; ".join(f"run {r.pk} {r.state} {r.error[:80]}" for r in by_slot[slot]))
            dup += t["duplicates"] + max(0, t["good"] - 1)
        extra = set(by_slot) - slots
        unexpected += sum(len(by_slot[s]) for s in extra)
        if extra:
            notes.append(f"{policy.database.name}: runs for slots outside the window: "
                         f"{sorted(f'{s:%H:%M}' for s in extra)}")
    harmed = sum(fingerprint(target_cluster, db.dbname) != before[db.pk] for db in dbs)
    dup += unexpected
    record_note = (f"{len(dbs)} databases x {len(slots)} one-minute slots in {SOAK_MINUTES} min on 2 workers; "
                   f"{Archive.objects.filter(run__policy_id__in=ids).count()} archives, sha256 checked")
    if notes:
        record_note += " | " + " | ".join(notes[:10])
    finish(Row("soak", expected=len(dbs) * len(slots), good=good, failed_with_reason=failed, lost=lost,
               duplicates=dup, harmed=harmed, seconds=time.monotonic() - started, note=record_note))


# -- 3. a worker killed in the middle of a scheduled backup -----------------------------------------
def test_worker_killed_mid_backup_is_failed_cleaned_and_retried_once(stack, make_target_db, target_cluster,
                                                                      slow_link):
    started = time.monotonic()
    db = make_target_db(name="killed", sql=FIXTURE_SQL)
    live = fingerprint(target_cluster, db.dbname)
    through(db, slow_link(target_cluster.port, rate=80_000))
    policy = far_policy(db)
    workers(stack, "w1", "w2")
    beat(stack)  # the watchdog's clock
    run_policy.delay(policy.pk)
    run = mid_run(wait_for(lambda: BackupRun.objects.filter(policy=policy).first(), 30, "the scheduled run").pk)
    stack.kill(owner_of(stack, run.worker))
    run = wait_for(lambda: ended(run.pk), 60, "the watchdog to fail the lost run")
    assert run.state == "failed" and run.error.startswith("worker lost"), run.error
    assert not staging_left(run.pk), "the lost run's partial files are still there"
    retry = wait_for(lambda: BackupRun.objects.filter(retry_of=run).first(), 30, "the retry")
    retry = wait_for(lambda: ended(retry.pk), 120, "the retry to end")
    assert retry.state == "succeeded", retry.error
    assert retry.slot_key == f"{run.slot_key}+retry" and retry.trigger == "scheduled"
    time.sleep(4)  # a second retry would be queued by now
    runs = list(BackupRun.objects.filter(database=db))
    t = tally(runs, reason=r"^worker lost")
    dup = t["duplicates"] + max(0, len(runs) - 2) + max(0, archive_dirs(db) - 1)
    finish(Row("SIGKILL worker mid-backup", expected=2, good=t["good"], failed_with_reason=t["failed_with_reason"],
               lost=t["lost"], duplicates=dup, harmed=int(fingerprint(target_cluster, db.dbname) != live),
               seconds=time.monotonic() - started, note=f"run {run.pk}: {run.error[:90]}; retry {retry.pk} good"))


# -- 4. a worker killed in the middle of a replace restore ----------------------------------------
def test_worker_killed_mid_restore_leaves_the_live_database_alone(stack, make_target_db, target_cluster, slow_link,
                                                                   personas):
    from backups.engine import runner as backup_runner

    started = time.monotonic()
    db = make_target_db(name="restored", sql=FIXTURE_SQL)
    archived = fingerprint(target_cluster, db.dbname)
    archive = backup_runner.execute(BackupRun.enqueue(db, trigger="manual", actor_label="test").pk)
    with target_cluster.connect(db.dbname) as conn:  # the live database moves on after the backup
        conn.execute("INSERT INTO ledger.accounts (iban, balance) VALUES ('NEW-AFTER-BACKUP', 1)")
    live = fingerprint(target_cluster, db.dbname)
    through(db, slow_link(target_cluster.port, rate=80_000, both_ways=True))
    workers(stack, "w1", "w2")
    beat(stack)
    req = approved(personas, mode="replace", archive=archive)
    work = f"{db.dbname}__restore_{req.pk}"
    wait_for(lambda: work in database_names(target_cluster), 60, "the restore's work database")
    req.refresh_from_db()
    time.sleep(1)
    stack.kill(owner_of(stack, req.worker))
    req = wait_for(lambda: req_ended(req.pk), 60, "the watchdog to fail the lost restore")
    names = database_names(target_cluster)
    leftovers = sorted(n for n in names if n.endswith(f"_{req.pk}") and n != db.dbname)
    harmed = int(fingerprint(target_cluster, db.dbname) != live)
    assert req.state == "failed" and req.error.startswith("worker lost"), req.error
    assert "live database was not touched" in req.error and not leftovers, (req.error, leftovers)
    assert not harmed, "the live database changed under a restore that failed"

    again = approved(personas, mode="replace", archive=archive)
    again = wait_for(lambda: req_ended(again.pk), 180, "the fresh restore")
    assert again.state == "succeeded", again.error
    restored_ok = fingerprint(target_cluster, db.dbname) == archived
    assert restored_ok, "the fresh restore did not bring back the archive's data"
    good, failed = int(again.state == "succeeded" and restored_ok), int(req.error.startswith("worker lost"))
    finish(Row("SIGKILL worker mid-restore", expected=2, good=good, failed_with_reason=failed, lost=2 - good - failed,
               duplicates=max(0, AuditEvent.objects.filter(action="restore.request.started",
                                                            target_id=str(again.pk)).count() - 1),
               harmed=harmed, seconds=time.monotonic() - started, note=f"request {req.pk}: {req.error[:110]}"))


# -- 5, 6. the broker and the portal's database restart during a run -----------------------------
def _restart_during_run(stack, make_target_db, target_cluster, slow_link, *, scenario: str, restart) -> None:
    started = time.monotonic()
    db = make_target_db(name="restarts", sql=FIXTURE_SQL)
    live = fingerprint(target_cluster, db.dbname)
    through(db, slow_link(target_cluster.port, rate=80_000))
    policy = policy_for(db)  # every minute: beat must keep sending after the restart
    workers(stack, "w1", "w2")
    beat(stack)
    wait_slot_start(latest_second=35)
    run_policy.delay(policy.pk)  # this minute's slot, now rather than in a minute
    run = mid_run(wait_for(lambda: BackupRun.objects.filter(policy=policy).first(), 30, "the slot's run").pk)
    restarted_at = timezone.now()
    restart()
    connections.close_all()
    run = wait_for(lambda: ended(run.pk), 120, "the run across the restart")
    assert run.state == "succeeded", run.error
    later = wait_for(lambda: BackupRun.objects.filter(policy=policy, queued_at__gt=restarted_at + timedelta(seconds=5),
                                                      state__in=ENDED).first(), 150,
                     "a later scheduled run (beat and workers without a person)")
    assert later.state == "succeeded", later.error
    stack.stop("beat")
    wait_for(lambda: not BackupRun.objects.filter(policy=policy, state__in=BackupRun.ACTIVE_STATES).exists(), 60,
             "the last runs to end")
    runs = list(BackupRun.objects.filter(database=db))
    minutes = {r.slot_key for r in runs}
    t = tally(runs)
    dup = t["duplicates"] + (len(runs) - len(minutes)) + max(0, archive_dirs(db) - len(runs))
    finish(Row(scenario, expected=len(runs), good=t["good"], failed_with_reason=0, lost=t["lost"], duplicates=dup,
               harmed=int(fingerprint(target_cluster, db.dbname) != live), seconds=time.monotonic() - started,
               note=f"run {run.pk} across the restart, then scheduled run {later.pk} ({len(runs)} slots in all)"))


def test_redis_restart_during_a_run(stack, make_target_db, target_cluster, slow_link):
    redis = services()["redis"]

    def restart():
        redis.stop()
        time.sleep(3)
        redis.restart()

    _restart_during_run(stack, make_target_db, target_cluster, slow_link, scenario="Redis restart mid-run",
                        restart=restart)


def test_portal_database_restart_during_a_run(stack, make_target_db, target_cluster, slow_link):
    portal = services()["portal"]

    def restart():
        connections.close_all()
        portal.stop()
        time.sleep(3)
        portal.start()

    _restart_during_run(stack, make_target_db, target_cluster, slow_link, scenario="portal PostgreSQL restart",
                        restart=restart)


def _next_run_is_good_then_finish(scenario: str, db, failed, reason: str, target_cluster, live, started) -> None:
    """After a run that failed on purpose: the next run of the same database succeeds, and the
    two are tallied (one good, one failed for ``reason``) into the scenario's row."""
    nxt = backup_services.start_backup(db, actor_label="chaos")
    nxt = wait_for(lambda: ended(nxt.pk), 90, "the next run")
    assert nxt.state == "succeeded", nxt.error
    t = tally(list(BackupRun.objects.filter(database=db)), reason=reason)
    finish(Row(scenario, expected=2, good=t["good"], failed_with_reason=t["failed_with_reason"],
               lost=t["lost"], duplicates=t["duplicates"] + max(0, archive_dirs(db) - 1),
               harmed=int(fingerprint(target_cluster, db.dbname) != live), seconds=time.monotonic() - started,
               note=f"run {failed.pk}: {failed.error[:110]}"))


# -- 7. the target cluster restarts during its backup -------------------------------------------
def test_target_restart_during_backup_fails_clearly_and_the_next_run_is_good(stack, make_target_db, target_cluster,
                                                                              slow_link):
    started = time.monotonic()
    db = make_target_db(name="rebooted", sql=FIXTURE_SQL)
    live = fingerprint(target_cluster, db.dbname)
    through(db, slow_link(target_cluster.port, rate=80_000))
    workers(stack, "w1")
    run = backup_services.start_backup(db, actor_label="chaos")
    mid_run(run.pk)
    target_cluster.restart()
    run = wait_for(lambda: ended(run.pk), 60, "the interrupted run to end")
    reason = r"terminat|server closed|connection|shut ?down|could not connect"
    assert run.state == "failed" and re.search(reason, run.error, re.I), run.error
    assert not staging_left(), "the interrupted run left partial files"
    # The next run goes straight to the server: SlowLink's relay stops accepting once a connection
    # to a server that is down fails (tests/netutil.py), which is the test's link, not bankvault.
    type(db).objects.filter(pk=db.pk).update(port=target_cluster.port)
    _next_run_is_good_then_finish("target restart mid-backup", db, run, reason, target_cluster, live, started)


# -- 8. the repository's disk fills up during a run -------------------------------------------------
@pytest.fixture
def small_disk(repo):
    """The repository on a 24 MB tmpfs of its own."""
    root = Path(django_settings.BANKVAULT_REPOSITORY)
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0755", "tmpfs", str(root)], check=True)
    yield root
    subprocess.run(["umount", "-l", str(root)], check=False)


def test_full_repository_disk_fails_the_run_and_the_next_one_is_good(small_disk, stack, make_target_db,
                                                                      target_cluster, slow_link):
    started = time.monotonic()
    db = make_target_db(name="diskfull", sql=BULKY_SQL)
    live = fingerprint(target_cluster, db.dbname)
    through(db, slow_link(target_cluster.port, rate=1_500_000))
    workers(stack, "w1")
    run = backup_services.start_backup(db, actor_label="chaos")
    mid_run(run.pk)
    filler = small_disk / "filler"
    try:  # the disk fills up while the run writes
        with open(filler, "wb") as f:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
    except OSError as exc:
        assert exc.errno == 28, exc  # ENOSPC: full
    run = wait_for(lambda: ended(run.pk), 60, "the run on a full disk")
    reason = r"No space left|disk full|full"
    assert run.state == "failed" and re.search(reason, run.error, re.I), run.error
    assert not staging_left(), "the failed run left partial files on the full disk"
    assert archive_dirs(db) == 0
    filler.unlink()  # the operator frees space
    _next_run_is_good_then_finish("repository disk full", db, run, reason, target_cluster, live, started)


# -- 9. beat down for missed slots ---------------------------------------------------------------
def test_slots_missed_while_beat_was_down_run_once(stack, make_target_db, target_cluster):
    started = time.monotonic()
    db = make_target_db(name="beatdown", sql=SMALL_SQL)
    live = fingerprint(target_cluster, db.dbname)
    policy = policy_for(db)
    workers(stack, "w1")
    beat(stack)
    first = wait_for(lambda: BackupRun.objects.filter(policy=policy, state__in=ENDED).first(), 75,
                     "the first scheduled run")
    stack.stop("beat")
    down_from = timezone.now()
    # Two slots pass with nobody to send them.
    missed_to = down_from.replace(second=0, microsecond=0) + timedelta(minutes=2, seconds=5)
    time.sleep((missed_to - timezone.now()).total_seconds())
    assert not BackupRun.objects.filter(policy=policy, queued_at__gt=down_from).exists()
    back = timezone.now()
    beat(stack, "beat2")
    catch_up = wait_for(lambda: BackupRun.objects.filter(policy=policy, queued_at__gt=back, state__in=ENDED).first(),
                        40, "the catch-up run")
    stack.stop("beat2")
    time.sleep(2)
    wait_for(lambda: not BackupRun.objects.filter(policy=policy, state__in=BackupRun.ACTIVE_STATES).exists(), 60,
             "runs to end")
    after = list(BackupRun.objects.filter(policy=policy, queued_at__gt=down_from))
    t = tally([first, *after])
    extra = max(0, len(after) - 1)  # one run for all the missed slots, not one each
    finish(Row("beat down 2 slots, catch-up", expected=2, good=t["good"], failed_with_reason=0, lost=t["lost"],
               duplicates=t["duplicates"] + extra, harmed=int(fingerprint(target_cluster, db.dbname) != live),
               seconds=time.monotonic() - started,
               note=f"catch-up run {catch_up.pk} for slot {catch_up.slot_key}; {len(after)} run(s) after the outage"))
