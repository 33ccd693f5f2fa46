"""backups.offsite against a real S3-compatible server (SeaweedFS on loopback): copy and verify,
corruption, bad configuration and a dead endpoint, idempotent retries, reading a copy back,
deleting and expiring copies, the lifecycle, and the secret staying secret."""

import hashlib
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from django.utils import timezone

from audit.models import AuditEvent
from backups import offsite
from backups.models import ArchiveCopy
from tests.offsite.conftest import BUCKET, free_http_ports, start_seaweed

pytestmark = [pytest.mark.django_db]


def objects(seaweed, remote) -> dict[str, bytes]:
    """Everything under the remote's prefix: relative key -> bytes."""
    client = seaweed.client()
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=remote.prefix):
        for o in page.get("Contents", []):
            found[o["Key"][len(remote.prefix):]] = client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
    return found


def local_state(archive) -> dict[str, str]:
    from django.conf import settings

    root = Path(settings.BANKVAULT_REPOSITORY) / archive.path
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


def events(action):
    return list(AuditEvent.objects.filter(action=action).order_by("id"))


def test_copy_uploads_every_file_verifies_it_and_puts_the_manifest_last(seaweed, remote, make_archive, monkeypatch):
    archive = make_archive()
    calls = []
    real_upload, real_put = offsite.S3Repository.upload_file, offsite.S3Repository.put_bytes
    monkeypatch.setattr(offsite.S3Repository, "upload_file",
                        lambda self, path, rel, sha: calls.append(rel) or real_upload(self, path, rel, sha))
    monkeypatch.setattr(offsite.S3Repository, "put_bytes",
                        lambda self, data, rel: calls.append(rel) or real_put(self, data, rel))

    copy = offsite.copy_archive(archive, remote, "cli:test")

    assert copy.state == ArchiveCopy.State.COMPLETE and copy.verified_at and copy.finished_at
    assert calls[-1] == f"{archive.path}/manifest.json"  # last: a partial copy never looks complete
    stored = objects(seaweed, remote)
    local = local_state(archive)
    assert {k.rsplit("/", 1)[1]: hashlib.sha256(v).hexdigest() for k, v in stored.items()} == local
    assert all(k.startswith(archive.path + "/") for k in stored)
    assert copy.bytes == sum(len(v) for v in stored.values())
    started, succeeded = events("archive.copy.started")[0], events("archive.copy.succeeded")[0]
    assert started.actor_label == "cli:test" and started.details["remote"] == "offsite"
    assert succeeded.details["bytes"] == copy.bytes and succeeded.details["seconds"] >= 0
    assert succeeded.details["files"] == 3


def test_large_files_go_up_in_parts_of_the_configured_size(seaweed, remote, make_archive, settings):
    settings.BANKVAULT_OFFSITE_PART_MB = 5
    archive = make_archive({"dump.pgdump.zst": 12 * 1024 * 1024 + 17, "globals.sql.zst": 100})
    offsite.copy_archive(archive, remote)
    head = seaweed.client().head_object(Bucket=BUCKET, Key=f"{remote.prefix}{archive.path}/dump.pgdump.zst")
    assert head["ETag"].strip('"').endswith("-3")  # three parts of 5 MiB at most
    assert head["Metadata"]["sha256"] == archive.files.get(path="dump.pgdump.zst").sha256


def test_an_object_damaged_in_the_bucket_fails_verification_and_marks_the_copy_failed(seaweed, remote,
                                                                                      make_archive):
    archive = make_archive()
    copy = offsite.copy_archive(archive, remote)
    before = local_state(archive)
    key = f"{remote.prefix}{archive.path}/dump.pgdump.zst"
    good = seaweed.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
    seaweed.client().put_object(Bucket=BUCKET, Key=key, Body=good[:-1] + bytes([good[-1] ^ 1]))

    with pytest.raises(offsite.CopyDamaged, match="dump.pgdump.zst read back from remote offsite"):
        offsite.verify_copy(copy, "cli:test")
    copy.refresh_from_db()
    assert copy.state == ArchiveCopy.State.FAILED and "does not match the catalog" in copy.error
    assert events("archive.copy.verify_failed")[0].outcome == "failure"
    assert local_state(archive) == before  # the local archive is never touched
    # A copy that failed its check is not read by restores.
    assert offsite.readable_copies(archive) == []


def test_a_copy_whose_upload_is_damaged_on_the_way_fails_and_has_no_manifest(seaweed, remote, make_archive,
                                                                             monkeypatch):
    archive = make_archive()
    real_upload = offsite.S3Repository.upload_file

    def upload_then_damage(self, path, rel, sha):  # the server stores other bytes than were sent
        result = real_upload(self, path, rel, sha)
        if rel.endswith("dump.pgdump.zst"):
            self.client.put_object(Bucket=BUCKET, Key=self.key(rel), Body=b"not the dump")
        return result

    monkeypatch.setattr(offsite.S3Repository, "upload_file", upload_then_damage)
    with pytest.raises(offsite.CopyDamaged):
        offsite.copy_archive(archive, remote)
    copy = ArchiveCopy.objects.get(archive=archive, remote=remote)
    assert copy.state == ArchiveCopy.State.FAILED and "dump.pgdump.zst" in copy.error
    assert copy.verified_at is None
    assert not any(k.endswith("manifest.json") for k in objects(seaweed, remote))
    assert events("archive.copy.failed")[0].details["error"] == copy.error


def test_a_damaged_local_file_is_not_copied_and_stays_as_it_was(seaweed, remote, make_archive):
    from django.conf import settings

    archive = make_archive()
    path = Path(settings.BANKVAULT_REPOSITORY) / archive.path / "dump.pgdump.zst"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(data)
    before = local_state(archive)
    with pytest.raises(offsite.OffsiteError, match="the local archive is damaged"):
        offsite.copy_archive(archive, remote)
    assert ArchiveCopy.objects.get().state == ArchiveCopy.State.FAILED
    assert not any(k.endswith("manifest.json") for k in objects(seaweed, remote))
    assert local_state(archive) == before


@pytest.mark.parametrize("problem, message", [
    ("secret", "rejected the secret key of remote offsite"),
    ("access_key", "does not know the access key id of remote offsite"),
    ("bucket", "bucket no-such-bucket does not exist at http://127.0.0.1:"),
    ("endpoint", "cannot reach the S3 endpoint http://127.0.0.1:"),
])
def test_bad_configuration_or_a_dead_endpoint_gives_a_clear_error_on_the_copy(seaweed, make_remote, make_archive,
                                                                              problem, message):
    fields = {"secret": {"secret_key": "wrong-secret"}, "access_key": {"access_key_id": "NOBODY"},
              "bucket": {"bucket": "no-such-bucket"},
              "endpoint": {"endpoint_url": f"http://127.0.0.1:{free_http_ports(1)[0]}"}}[problem]
    remote = make_remote(**fields)
    archive = make_archive()
    before = local_state(archive)
    with pytest.raises(offsite.OffsiteError, match=message) as caught:
        offsite.copy_archive(archive, remote)
    assert isinstance(caught.value, offsite.Unreachable) == (problem == "endpoint")  # only that one is retried
    copy = ArchiveCopy.objects.get()
    assert copy.state == ArchiveCopy.State.FAILED and message in copy.error
    assert local_state(archive) == before
    failed = events("archive.copy.failed")[0]
    assert failed.outcome == "failure" and message in failed.details["error"]
    assert "wrong-secret" not in copy.error and seaweed.secret_key not in copy.error
    if problem == "bucket":  # and the server did not quietly create it
        names = [b["Name"] for b in seaweed.client().list_buckets()["Buckets"]]
        assert "no-such-bucket" not in names


def test_retrying_a_failed_copy_overwrites_it_and_a_complete_copy_is_left_alone(seaweed, make_remote, make_archive):
    remote = make_remote(secret_key="wrong-secret")
    archive = make_archive()
    with pytest.raises(offsite.OffsiteError):
        offsite.copy_archive(archive, remote)
    remote.set_secret_key(seaweed.secret_key)
    remote.save()
    copy = offsite.copy_archive(archive, remote)
    assert copy.state == ArchiveCopy.State.COMPLETE and copy.error == ""
    first_verified = copy.verified_at
    assert offsite.copy_archive(archive, remote) is None  # a duplicated task message costs nothing
    again = offsite.copy_archive(archive, remote, force=True)
    assert again.state == ArchiveCopy.State.COMPLETE and again.verified_at > first_verified
    assert ArchiveCopy.objects.count() == 1
    assert len(objects(seaweed, remote)) == 3
    assert [e.action for e in AuditEvent.objects.filter(action__startswith="archive.copy.").order_by("id")] == [
        "archive.copy.started", "archive.copy.failed", "archive.copy.started", "archive.copy.succeeded",
        "archive.copy.started", "archive.copy.succeeded"]


def test_a_copy_in_progress_elsewhere_is_not_started_twice(remote, make_archive):
    archive = make_archive()
    ArchiveCopy.objects.create(archive=archive, remote=remote, state=ArchiveCopy.State.COPYING)
    with pytest.raises(offsite.CopyInProgress):
        offsite.copy_archive(archive, remote)
    assert offsite.copy_by_id(archive.pk, remote.pk) is None
    # ... unless its worker died long ago (older than any job may run)
    ArchiveCopy.objects.update(started_at=timezone.now() - timezone.timedelta(days=2))
    assert offsite.copy_archive(archive, remote).state == ArchiveCopy.State.COMPLETE


def test_only_complete_archives_and_enabled_remotes_are_copied(make_remote, make_archive):
    archive = make_archive()
    with pytest.raises(offsite.OffsiteError, match="is disabled"):
        offsite.copy_archive(archive, make_remote(name="off", enabled=False))
    archive.state = "corrupt"
    archive.save()
    with pytest.raises(offsite.OffsiteError, match="only complete archives are copied"):
        offsite.copy_archive(archive, make_remote(name="on"))
    assert not ArchiveCopy.objects.exists()


def test_fetch_downloads_and_verifies_every_file_and_removes_a_damaged_fetch(seaweed, remote, make_archive,
                                                                             tmp_path):
    archive = make_archive()
    copy = offsite.copy_archive(archive, remote)
    got = offsite.fetch_archive(archive, copy, tmp_path / "fetched")
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in got.iterdir()} == local_state(archive)

    key = f"{remote.prefix}{archive.path}/globals.sql.zst"
    seaweed.client().put_object(Bucket=BUCKET, Key=key, Body=b"x" * 3000)  # same size, other bytes
    with pytest.raises(offsite.CopyDamaged, match="globals.sql.zst fetched from remote offsite"):
        offsite.fetch_archive(archive, copy, tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_a_missing_local_archive_is_read_from_its_copy_and_the_fetch_is_removed(seaweed, remote, make_archive,
                                                                                settings):
    archive = make_archive()
    offsite.copy_archive(archive, remote)
    local = Path(settings.BANKVAULT_REPOSITORY) / archive.path
    want = local_state(archive)

    located = offsite.open_readable(archive, purpose="test")
    assert located.directory == local and located.copy is None  # sound: the local one

    shutil.rmtree(local)
    with offsite.readable(archive, purpose="restore request 7") as located:
        assert located.copy.remote.name == "offsite" and located.temporary
        assert str(located.directory).startswith(str(settings.BANKVAULT_SCRATCH_DIR))
        assert "from its off-site copy in offsite" in located.label
        assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in located.directory.iterdir()} == want
        fetched_dir = located.directory
    assert not fetched_dir.exists()
    event = events("archive.copy.fetched")[0]
    assert event.details["purpose"] == "restore request 7" and "is missing" in event.details["reason"]


def test_a_silently_damaged_local_archive_is_read_from_its_copy(seaweed, remote, make_archive, settings):
    archive = make_archive()
    offsite.copy_archive(archive, remote)
    path = Path(settings.BANKVAULT_REPOSITORY) / archive.path / "dump.pgdump.zst"
    data = bytearray(path.read_bytes())
    data[5] ^= 1  # same size: only the sha256 tells
    path.write_bytes(data)
    with offsite.readable(archive) as located:
        assert located.copy is not None and "does not match its manifest entry" in located.local_problem


def test_without_a_copy_a_missing_archive_says_so(make_archive, settings):
    archive = make_archive()
    shutil.rmtree(Path(settings.BANKVAULT_REPOSITORY) / archive.path)
    with pytest.raises(offsite.OffsiteError, match="is missing, and it has no complete off-site copy"):
        offsite.open_readable(archive)


def test_a_copy_that_turns_out_damaged_when_read_is_marked_failed_and_the_next_one_is_used(
        seaweed, make_remote, make_archive, settings):
    archive = make_archive()
    first, second = make_remote(name="first"), make_remote(name="second")
    offsite.copy_archive(archive, first)
    offsite.copy_archive(archive, second)
    ArchiveCopy.objects.filter(remote=first).update(verified_at=timezone.now() + timezone.timedelta(hours=1))
    seaweed.client().put_object(Bucket=BUCKET, Key=f"{first.prefix}{archive.path}/dump.pgdump.zst", Body=b"bad")
    shutil.rmtree(Path(settings.BANKVAULT_REPOSITORY) / archive.path)
    with offsite.readable(archive) as located:
        assert located.copy.remote == second
    assert ArchiveCopy.objects.get(remote=first).state == ArchiveCopy.State.FAILED


def test_deleting_and_expiring_copies_removes_the_objects_unless_held(seaweed, make_remote, make_archive):
    archive = make_archive()
    a, b = make_remote(name="a"), make_remote(name="b")
    offsite.copy_archive(archive, a)
    offsite.copy_archive(archive, b)
    archive.legal_hold = True
    archive.save()
    with pytest.raises(offsite.OffsiteError, match="legal hold"):
        offsite.expire_copies(archive)
    with pytest.raises(offsite.OffsiteError, match="legal hold"):
        offsite.delete_copy(ArchiveCopy.objects.get(remote=a), "cli:test")
    assert len(objects(seaweed, a)) == 3
    archive.legal_hold = False
    archive.save()
    result = offsite.expire_copies(archive, actor="system:retention")
    assert sorted(result["deleted"]) == ["a", "b"] and result["failed"] == {}
    assert objects(seaweed, a) == {} and objects(seaweed, b) == {}
    assert set(ArchiveCopy.objects.values_list("state", flat=True)) == {ArchiveCopy.State.DELETED}
    assert [e.actor_label for e in events("archive.copy.deleted")] == ["system:retention"] * 2


def test_a_copy_that_cannot_be_deleted_keeps_its_state_and_maintenance_retries_it(seaweed, make_remote,
                                                                                   make_archive):
    archive = make_archive()
    remote = make_remote()
    offsite.copy_archive(archive, remote)
    remote.set_secret_key("wrong-secret")
    remote.save()
    result = offsite.expire_copies(archive)
    assert "rejected the secret key" in result["failed"]["offsite"]
    copy = ArchiveCopy.objects.get()
    assert copy.state == ArchiveCopy.State.COMPLETE and copy.error.startswith("delete failed")
    archive.state = "expired"
    archive.save()
    remote.set_secret_key(seaweed.secret_key)
    remote.save()
    assert offsite.maintenance()["expired_copies_deleted"] == 1
    assert ArchiveCopy.objects.get().state == ArchiveCopy.State.DELETED and objects(seaweed, remote) == {}


def test_lifecycle_moves_older_copies_to_the_archive_storage_class(seaweed, make_remote, make_archive):
    """SeaweedFS records the storage class it is given (it does not tier data by it), so this
    shows what bankvault asks of the server and that the data is intact afterwards."""
    remote = make_remote(archive_after_days=30, archive_storage_class="STANDARD_IA")
    old, young = make_archive(age_days=40), make_archive(age_days=3)
    offsite.copy_archive(old, remote)
    offsite.copy_archive(young, remote)
    result = offsite.apply_lifecycle()
    assert result == {"transitioned": 1, "failed": {}}
    client = seaweed.client()
    for archive, want in ((old, "STANDARD_IA"), (young, "STANDARD")):
        for key in objects(seaweed, remote):
            if key.startswith(archive.path + "/"):
                head = client.head_object(Bucket=BUCKET, Key=remote.prefix + key)
                assert (head.get("StorageClass") or "STANDARD") == want, key
    assert ArchiveCopy.objects.get(archive=old).storage_class == "STANDARD_IA"
    copy = ArchiveCopy.objects.get(archive=old)
    assert offsite.verify_copy(copy, "cli:test").state == ArchiveCopy.State.COMPLETE  # bytes unchanged
    assert offsite.apply_lifecycle() == {"transitioned": 0, "failed": {}}
    assert events("archive.copy.transitioned")[0].details["storage_class"] == ["default", "STANDARD_IA"]


def test_probe_writes_reads_and_deletes_a_test_object_and_is_audited(seaweed, make_remote):
    good = make_remote(name="good")
    info = offsite.probe_remote(good, "cli:test")
    assert info["bucket"] == BUCKET and objects(seaweed, good) == {}
    with pytest.raises(offsite.OffsiteError, match="rejected the secret key"):
        offsite.probe_remote(make_remote(name="bad", secret_key="nope-nope"), "cli:test")
    assert [(e.target_label, e.outcome) for e in events("remote.tested")] == [("good", "success"),
                                                                             ("bad", "failure")]


def test_the_secret_key_appears_in_no_log_error_or_audit_event(seaweed, make_remote, make_archive, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "Wr0ng-" + seaweed.secret_key[::-1]
    archive = make_archive()
    offsite.copy_archive(archive, make_remote(name="right"))
    with pytest.raises(offsite.OffsiteError):
        offsite.copy_archive(archive, make_remote(name="wrong", secret_key=wrong))
    blob = caplog.text + str(list(AuditEvent.objects.values_list("details", flat=True))) + \
        str(list(ArchiveCopy.objects.values_list("error", flat=True)))
    for secret in (seaweed.secret_key, wrong):
        assert secret not in blob
    assert "archive.copy.failed" in str(list(AuditEvent.objects.values_list("action", flat=True)))


def test_enqueue_sends_one_task_per_enabled_remote_of_the_policy_on_commit(make_remote, make_archive, monkeypatch,
                                                                           django_capture_on_commit_callbacks):
    from django_celery_beat.models import CrontabSchedule

    from backups.models import BackupPolicy, BackupRun
    from backups.tasks import copy_offsite

    archive = make_archive()
    policy = BackupPolicy.objects.create(database=archive.database, name="daily",
                                         schedule=CrontabSchedule.objects.create(minute="0", hour="2"))
    on, off = make_remote(name="on"), make_remote(name="off", enabled=False)
    policy.copy_to.set([on, off])
    run = BackupRun.enqueue(archive.database, trigger="manual", policy=policy, actor_label="test")
    sent = []
    monkeypatch.setattr(copy_offsite, "apply_async", lambda args, **kw: sent.append(tuple(args)))
    with django_capture_on_commit_callbacks(execute=True):
        assert offsite.enqueue_copies(run, archive) == ["on"]
        assert sent == []  # not before the commit
    assert sent == [(archive.pk, on.pk)]
    manual = BackupRun.enqueue(archive.database, trigger="manual", actor_label="test")
    assert offsite.enqueue_copies(manual, archive) == []  # no policy, no copies


def test_a_copy_that_cannot_be_queued_is_recorded_as_failed_with_what_to_do(make_remote, make_archive,
                                                                            monkeypatch):
    from backups.tasks import copy_offsite

    archive, remote = make_archive(), make_remote()

    def broker_down(*a, **kw):
        raise ConnectionError("redis is down")

    monkeypatch.setattr(copy_offsite, "apply_async", broker_down)
    offsite._dispatch(archive.pk, remote.pk)
    copy = ArchiveCopy.objects.get()
    assert copy.state == ArchiveCopy.State.FAILED
    assert f"manage.py archives copy {archive.pk} --to offsite" in copy.error


@pytest.mark.slow
def test_a_full_disk_on_the_s3_side_fails_the_copy_clearly(make_remote, make_archive):
    """A second server whose data lives on a 24 MiB tmpfs, and an archive larger than that."""
    base = Path(tempfile.mkdtemp(prefix="bv-s3full-"))
    data = base / "data"
    data.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(data)],
                      capture_output=True).returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip("cannot mount a tmpfs here (needs root); the full-disk case is not checked")
    server = None
    try:
        server = start_seaweed(base, data_dir=data)
        remote = make_remote(name="small", endpoint_url=server.endpoint, access_key_id=server.access_key,
                             secret_key=server.secret_key)
        archive = make_archive({"dump.pgdump.zst": 40 * 1024 * 1024, "globals.sql.zst": 100})
        before = local_state(archive)
        with pytest.raises(offsite.OffsiteError, match="storage may be full or failing"):
            offsite.copy_archive(archive, remote)
        copy = ArchiveCopy.objects.get()
        assert copy.state == ArchiveCopy.State.FAILED and "HTTP 500" in copy.error
        assert local_state(archive) == before
    finally:
        if server is not None:
            server.stop()
        subprocess.run(["umount", "-l", str(data)], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
