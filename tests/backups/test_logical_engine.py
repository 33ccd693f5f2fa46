"""The logical backup engine against a real cluster: archives are complete, self-describing,
verified, and restore to the same rows."""

import gzip
import hashlib
import json
import subprocess

import pytest
from django_celery_beat.models import CrontabSchedule

from audit.models import AuditEvent
from backups.engine import compress, pgbin, runner
from backups.models import Archive, BackupPolicy, BackupRun
from tests.conftest import archive_dir, manual_backup, table_counts

pytestmark = [pytest.mark.pg, pytest.mark.django_db]


def backup(db, policy=None):
    run = BackupRun.enqueue(db, trigger=BackupRun.Trigger.MANUAL, actor_label="test", policy=policy)
    archive = runner.execute(run.pk)
    run.refresh_from_db()
    return run, archive


def restore_into(cluster, archive, dbname):
    """Restore the archive's dump into a new empty database with plain pg_restore."""
    cluster.sql(f'CREATE DATABASE "{dbname}"')
    dump = archive.files.get(role="dump")
    tool = pgbin.for_server().tool("pg_restore")
    with compress.open_decompressed(archive_dir(archive) / dump.path, archive.compression) as src:
        proc = subprocess.run([tool, "-h", str(cluster.socket_dir), "-p", str(cluster.port), "-U", "postgres",
                               "-d", dbname, "--exit-on-error"], input=src.read(), capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()


def test_backup_restores_into_an_empty_database_with_identical_row_counts(target_db, target_cluster, repo):
    run, archive = backup(target_db)

    assert run.state == BackupRun.State.SUCCEEDED, run.error
    assert run.bytes == archive.bytes > 0
    assert run.started_at <= run.finished_at
    source_counts = table_counts(target_cluster, target_db.dbname)
    restore_into(target_cluster, archive, f"{target_db.dbname}_restored")
    assert table_counts(target_cluster, f"{target_db.dbname}_restored") == source_counts
    # The large object and the sequence position came along too.
    assert target_cluster.sql("SELECT convert_from(lo_get(blob), 'UTF8') FROM documents",
                              dbname=f"{target_db.dbname}_restored") == [("large object content",)]
    assert target_cluster.sql("SELECT last_value FROM ledger.accounts_id_seq",
                              dbname=f"{target_db.dbname}_restored") == [(5000,)]
    target_cluster.sql(f'DROP DATABASE "{target_db.dbname}_restored"')


def test_every_file_matches_the_sha256_in_the_manifest_and_catalog(target_db, repo):
    _, archive = backup(target_db)

    directory = archive_dir(archive)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert {f["path"] for f in manifest["files"]} == set(archive.files.values_list("path", flat=True))
    for f in archive.files.all():
        data = (directory / f.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == f.sha256
        assert len(data) == f.bytes
    assert hashlib.sha256((directory / "manifest.json").read_bytes()).hexdigest() == archive.manifest_sha256


def test_the_row_count_beside_the_dump_runs_without_parallel_workers(target_db, repo, monkeypatch):
    """The count never outlasts the dump it runs beside: parallel workers would only take cores
    from it. (A restore's count, which is waited for, keeps them.)"""
    from backups.engine import logical

    real, settings_seen = logical.count_rows, []

    def count_and_look(conn, tables, **kwargs):
        counts = real(conn, tables, **kwargs)
        settings_seen.append(conn.execute("SHOW max_parallel_workers_per_gather").fetchone()[0])
        return counts

    monkeypatch.setattr(logical, "count_rows", count_and_look)
    run, archive = backup(target_db)
    assert run.state == BackupRun.State.SUCCEEDED, run.error
    assert settings_seen == ["0"]
    manifest = json.loads((archive_dir(archive) / "manifest.json").read_text())
    assert all(t["rows"] is not None for t in manifest["tables"])


def test_a_file_changed_while_it_was_written_fails_the_backup(target_db, repo, monkeypatch):
    """The read-back follows the writer: a dump file that holds more (or other) bytes than were
    hashed fails the run, and nothing that looks like an archive is left."""
    from backups.engine.repository import HashingWriter

    real_close = HashingWriter.close

    def close_after_someone_appended(self):
        if self.path.name.startswith("dump.") and not self._f.closed:
            self._f.flush()
            with open(self.path, "ab") as other:
                other.write(b"x")
        return real_close(self)

    monkeypatch.setattr(HashingWriter, "close", close_after_someone_appended)
    run, archive = manual_backup(target_db)
    assert run.state == BackupRun.State.FAILED and archive is None
    assert "dump.pgdump.zst does not match its manifest entry" in run.error
    assert "the file is damaged" in run.error
    assert not Archive.objects.filter(database=target_db).exists()
    assert list((repo.root / "tmp").iterdir()) == []


def test_manifest_describes_source_tables_and_compression(target_db, target_cluster, repo):
    _, archive = backup(target_db)

    manifest = json.loads((archive_dir(archive) / "manifest.json").read_text())
    assert manifest["format"] == "bankvault-archive"
    assert manifest["kind"] == "logical"
    assert manifest["source"]["name"] == target_db.name
    assert manifest["source"]["dbname"] == target_db.dbname
    assert manifest["source"]["server_version_num"] >= 150000
    assert manifest["compression"] == {"algorithm": "zstd", "level": 3}
    assert manifest["consistency"]["row_counts_exact"] is True
    counts = {(t["schema"], t["name"]): t["rows"] for t in manifest["tables"]}
    assert counts == table_counts(target_cluster, target_db.dbname)
    assert counts[("ledger", "Entries")] == 5000
    assert "password" not in json.dumps(manifest).lower()
    assert {f["role"] for f in manifest["files"]} == {"dump", "globals"}


def test_policy_artifacts_are_derived_from_the_dump_and_gzip_is_standard(target_db, repo):
    schedule = CrontabSchedule.objects.create(minute="0", hour="2")
    policy = BackupPolicy.objects.create(database=target_db, schedule=schedule, compression="gzip",
                                         plain_sql=True, schema_only=True, data_only=True)
    _, archive = backup(target_db, policy)

    directory = archive_dir(archive)
    roles = {f.role: f.path for f in archive.files.all()}
    assert set(roles) == {"dump", "globals", "plain", "schema", "data"}
    assert all(p.endswith(".gz") for p in roles.values())
    plain = gzip.decompress((directory / roles["plain"]).read_bytes()).decode()
    schema = gzip.decompress((directory / roles["schema"]).read_bytes()).decode()
    data = gzip.decompress((directory / roles["data"]).read_bytes()).decode()
    assert 'CREATE TABLE ledger."Entries"' in plain and 'COPY ledger."Entries"' in plain
    assert 'CREATE TABLE ledger."Entries"' in schema and "COPY " not in schema
    assert 'COPY ledger."Entries"' in data and "CREATE TABLE" not in data
    # The system gzip reads what the parallel compressor wrote.
    subprocess.run(["gzip", "-t", str(directory / roles["dump"])], check=True)


def test_zstd_archives_are_readable_by_the_zstd_tool(target_db, repo):
    _, archive = backup(target_db)
    dump = archive.files.get(role="dump")
    out = subprocess.run(["zstd", "-dc", str(archive_dir(archive) / dump.path)], capture_output=True, check=True)
    assert out.stdout[:5] == b"PGDMP"


def test_run_transitions_are_audited(target_db, repo):
    run, archive = backup(target_db)
    actions = list(AuditEvent.objects.filter(target_type="backups.backuprun", target_id=str(run.pk))
                   .order_by("id").values_list("action", flat=True))
    assert actions == ["backup.run.queued", "backup.run.started", "backup.run.succeeded"]


def test_a_run_claimed_twice_runs_once(target_db, repo):
    run = BackupRun.enqueue(target_db, trigger=BackupRun.Trigger.MANUAL, actor_label="test")
    assert runner.execute(run.pk) is not None
    assert runner.execute(run.pk) is None  # a duplicated message is a no-op
    assert Archive.objects.filter(database=target_db).count() == 1


def test_verify_detects_a_flipped_byte_and_marks_the_archive_corrupt(target_db, repo):
    _, archive = backup(target_db)
    ok, error = runner.verify(archive, "test")
    assert ok and not error

    dump = archive_dir(archive) / archive.files.get(role="dump").path
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0x01
    dump.write_bytes(bytes(data))

    ok, error = runner.verify(archive, "test")
    archive.refresh_from_db()
    assert not ok
    assert "does not match its manifest entry" in error and "damaged" in error
    assert archive.state == Archive.State.CORRUPT
    assert AuditEvent.objects.filter(action="archive.verify_failed", target_id=str(archive.pk)).exists()


def test_verify_reports_a_missing_file(target_db, repo):
    _, archive = backup(target_db)
    (archive_dir(archive) / archive.files.get(role="globals").path).unlink()
    ok, error = runner.verify(archive, "test")
    assert not ok and "missing" in error


def test_a_damaged_compressed_stream_is_reported_as_such(target_db, repo):
    """Damage that the re-hash cannot see (catalog and manifest re-hashed to match) is still
    caught when the dump is read."""
    from backups.engine import logical

    _, archive = backup(target_db)
    directory = archive_dir(archive)
    manifest = json.loads((directory / "manifest.json").read_text())
    entry = next(f for f in manifest["files"] if f["role"] == "dump")
    path = directory / entry["path"]
    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF  # inside the first zstd block
    path.write_bytes(bytes(data))
    entry["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(logical.VerificationFailed, match="cannot be decompressed|cannot read the dump"):
        logical.verify_dump_toc(directory, manifest)
