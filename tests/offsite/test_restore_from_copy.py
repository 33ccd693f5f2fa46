"""The acceptance flow with a real SeaweedFS S3 server and real PostgreSQL: a policy's backup is
copied off-site by the Celery task and verified; the local archive directory is deleted; the
normal two-person restore path restores from S3 alone and the rows are identical. Drills read
from the copy the same way."""

import shutil
from pathlib import Path

import pytest
from django_celery_beat.models import CrontabSchedule

from audit.models import AuditEvent
from backups import offsite
from backups.engine import runner as backup_runner
from backups.engine.cluster import wait_until
from backups.models import ArchiveCopy, BackupPolicy, BackupRun
from recovery import services
from tests.conftest import archive_dir
from tests.recovery.test_restore_e2e import fingerprint, make_rich_db, wait_done

pytestmark = [pytest.mark.pg, pytest.mark.slow]


def scratch_leftovers(settings) -> list[Path]:
    """What a restore or drill left in scratch (the host's job-slot files aside)."""
    root = Path(settings.BANKVAULT_SCRATCH_DIR)
    return sorted(p for p in root.iterdir() if p.name != "slots") if root.exists() else []


@pytest.mark.django_db(transaction=True)
def test_backup_is_copied_verified_and_restored_from_s3_alone_after_the_local_copy_is_gone(
        celery_worker_thread, personas, make_target_db, target_cluster, repo, remote, seaweed, settings):
    db = make_rich_db(make_target_db, target_cluster)
    policy = BackupPolicy.objects.create(database=db, name="daily",
                                         schedule=CrontabSchedule.objects.create(minute="0", hour="2"))
    policy.copy_to.set([remote])
    before = fingerprint(target_cluster, db.dbname)

    # The backup; its copy task is queued when the run's success commits and runs in the worker.
    run = BackupRun.enqueue(db, trigger=BackupRun.Trigger.SCHEDULED, policy=policy, actor_label="system:beat")
    archive = backup_runner.execute(run.pk)
    copy = wait_until(lambda: ArchiveCopy.objects.filter(archive=archive, remote=remote,
                                                         state__in=["complete", "failed"]).first(),
                      60, interval=0.2, what="the off-site copy")
    assert copy.state == ArchiveCopy.State.COMPLETE, copy.error
    assert copy.verified_at is not None and copy.bytes > archive.bytes  # the files plus manifest.json
    succeeded = AuditEvent.objects.get(action="archive.copy.succeeded")
    assert succeeded.actor_label == "system:worker" and succeeded.details["remote"] == "offsite"

    # The local archive is lost; the live database changes after the backup.
    shutil.rmtree(archive_dir(archive))
    with target_cluster.connect(db.dbname) as conn:
        conn.execute('DELETE FROM ledger."Entries" WHERE id % 2 = 0')
        conn.execute("UPDATE ledger.accounts SET balance = 0")
    assert fingerprint(target_cluster, db.dbname)["data"] != before["data"]

    req = services.file_request(personas["operator"], kind="archive", mode="replace", archive=archive, database=db,
                                reason="the repository disk was lost", change_ticket="CHG-7")
    req.approve(personas["approver_a"], password_ok=True)
    req.approve(personas["approver_b"], password_ok=True)
    wait_done(req, timeout=180)
    assert req.state == "succeeded", req.error

    after = fingerprint(target_cluster, db.dbname)
    assert after["data"] == before["data"] and after["sequences"] == before["sequences"]
    assert after["schema"] == before["schema"]
    item = req.result["items"][0]
    assert "from its off-site copy in offsite" in item["source"]
    fetched = AuditEvent.objects.get(action="archive.copy.fetched")
    assert fetched.details["purpose"] == f"restore request {req.pk}"
    assert "is missing" in fetched.details["reason"] and fetched.outcome == "success"
    # The fetched files are gone; the repository was not written to.
    assert [p for p in scratch_leftovers(settings) if p.name.startswith("offsite-")] == []
    assert not archive_dir(archive).exists()


@pytest.mark.django_db
def test_a_drill_restores_from_the_copy_when_the_local_archive_is_gone(target_db, repo, remote, settings):
    from monitoring import drills
    from monitoring.models import Drill

    run = BackupRun.enqueue(target_db, trigger="manual", actor_label="test")
    archive = backup_runner.execute(run.pk)
    offsite.copy_archive(archive, remote)
    shutil.rmtree(archive_dir(archive))
    drill = drills.run_archive_drill(target_db)
    assert drill.state == Drill.State.SUCCEEDED, drill.error
    assert drill.tables_verified >= 6
    assert AuditEvent.objects.get(action="archive.copy.fetched").details["purpose"] == f"drill {drill.pk}"
    assert scratch_leftovers(settings) == []
