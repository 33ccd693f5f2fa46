"""GnuPG encryption of archives and WAL, with real gpg and real clusters: what lands in the
repository is unreadable without the key, the workers' key restores it to identical rows, and
every bad-key case fails with a clear error before anything is written or touched."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule, PeriodicTask
from psycopg import sql

from audit.models import AuditEvent
from backups import walpush
from backups.engine import gpg, pgbin, runner, wal
from backups.models import Archive, BackupKind, BackupPolicy, BackupRun, EncryptionKey
from tests.conftest import archive_dir, table_counts
from tests.conftest import manual_backup as backup

PASSPHRASE = "Gpg-Pass-" + "7f3a9c2e"  # distinctive: greppable in logs, argv and the trail


# -- keys, made once per session with real gpg -----------------------------------------------------
def _gpg(home: Path, *args: str, passphrase: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback",
                           "--passphrase", passphrase, *args], capture_output=True, text=True, check=True)


def _new_key(home: Path, uid: str, *, algo="future-default", usage="default", expire="1y", passphrase="",
             faked_time: str | None = None) -> tuple[str, str]:
    """(fingerprint, ASCII-armored public key) of a fresh key in ``home``."""
    extra = ["--faked-system-time", faked_time] if faked_time else []
    _gpg(home, *extra, "--quick-gen-key", uid, algo, usage, expire, passphrase=passphrase)
    listing = _gpg(home, "--with-colons", "--list-keys", uid).stdout
    fpr = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
    return fpr, _gpg(home, "--armor", "--export", fpr).stdout


def _home(base: Path, name: str) -> Path:
    home = base / name
    home.mkdir(mode=0o700)
    return home


@pytest.fixture(scope="session")
def keys():
    """Worker key (no passphrase) in `worker`; a passphrase key alone in `pass`; an escrow key whose
    private half no worker holds; an expired key; a sign-only key; one expiring in 10 days."""
    base = Path(tempfile.mkdtemp(prefix="bv-gpg-"))  # short: gpg-agent's socket path has a limit
    homes = {name: _home(base, name) for name in ("worker", "pass", "other", "empty")}
    k = {"base": base, "homes": homes}
    k["worker"] = _new_key(homes["worker"], "Backup Worker <worker@bank.example>")
    k["pass"] = _new_key(homes["pass"], "Passphrase Worker <pass@bank.example>", passphrase=PASSPHRASE)
    k["escrow"] = _new_key(homes["other"], "Escrow <escrow@bank.example>")
    k["expired"] = _new_key(homes["other"], "Expired <expired@bank.example>", expire="1d",
                            faked_time="20200101T000000")
    k["signonly"] = _new_key(homes["other"], "Signer <signer@bank.example>", algo="ed25519", usage="sign")
    k["soon"] = _new_key(homes["other"], "Soon <soon@bank.example>", expire="10d")
    k["secret"] = _gpg(homes["worker"], "--armor", "--export-secret-keys", k["worker"][0]).stdout
    yield k
    for home in homes.values():
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def worker_key(keys, settings):
    """The workers hold the private key of `worker` (no passphrase)."""
    settings.BANKVAULT_GPG_HOME = keys["homes"]["worker"]
    settings.BANKVAULT_GPG_PASSPHRASE = ""
    return keys


def stored_key(keys, name: str) -> EncryptionKey:
    """A catalog row as the admin would store it (read from the key, not typed)."""
    fpr, armored = keys[name]
    info = gpg.inspect(armored)
    return EncryptionKey.objects.create(fingerprint=fpr, owner=info.owner, public_key=armored,
                                        expires_at=info.expires_at)


def encrypted_policy(db, *key_rows, kind=BackupKind.LOGICAL, **extra) -> BackupPolicy:
    schedule, _ = CrontabSchedule.objects.get_or_create(minute="0", hour="2")
    policy = BackupPolicy.objects.create(database=db, schedule=schedule, kind=kind, name=f"enc-{kind}", **extra)
    policy.encrypt_to.set(key_rows)
    return policy


def manifest_of(archive) -> dict:
    return json.loads((archive_dir(archive) / "manifest.json").read_text())


def databases_on(cluster) -> set[str]:
    return {r[0] for r in cluster.sql("SELECT datname FROM pg_database")}


# -- the admin --------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_admin_reads_fingerprint_owner_and_expiry_from_the_pasted_key_and_audits_it(admin_client, keys):
    fpr, armored = keys["worker"]
    response = admin_client.post("/admin/backups/encryptionkey/add/",
                                 {"public_key": armored, "comment": "workers", "fingerprint": "0" * 40,
                                  "owner": "typed by hand"})
    assert response.status_code == 302, response.content.decode()[:3000]
    key = EncryptionKey.objects.get()
    assert key.fingerprint == fpr  # from the key, whatever was posted
    assert key.owner == "Backup Worker <worker@bank.example>"
    assert key.expires_at and timedelta(days=360) < key.expires_at - timezone.now() < timedelta(days=370)
    event = AuditEvent.objects.get(action="config.encryption_key.created")
    assert event.details["changes"]["fingerprint"] == [None, fpr]
    assert "BEGIN PGP" not in json.dumps(event.details)  # the trail names the key, it does not copy it


@pytest.mark.django_db
@pytest.mark.parametrize("name, error", [
    ("secret", "SECRET (private) key"),
    ("expired", "expired on 2020-01-02"),
    ("signonly", "no encryption-capable"),
    ("garbage", "not an OpenPGP public key"),
])
def test_admin_refuses_private_expired_sign_only_and_garbage_keys(admin_client, keys, name, error):
    text = keys[name] if name == "secret" else "hello, not a key" if name == "garbage" else keys[name][1]
    response = admin_client.post("/admin/backups/encryptionkey/add/", {"public_key": text, "comment": ""})
    assert response.status_code == 200
    assert error in response.content.decode()
    assert not EncryptionKey.objects.exists()
    assert not AuditEvent.objects.filter(action__startswith="config.encryption_key").exists()


@pytest.mark.django_db
def test_a_key_named_by_a_policy_cannot_be_deleted_and_another_key_cannot_replace_it(admin_client, keys,
                                                                                    target_db_row):
    key = stored_key(keys, "worker")
    encrypted_policy(target_db_row, key)
    assert admin_client.post(f"/admin/backups/encryptionkey/{key.pk}/delete/", {"post": "yes"}).status_code == 403
    response = admin_client.post(f"/admin/backups/encryptionkey/{key.pk}/change/",
                                 {"public_key": keys["escrow"][1], "comment": ""})
    assert "this is a different key" in response.content.decode()
    key.refresh_from_db()
    assert key.fingerprint == keys["worker"][0] and EncryptionKey.objects.count() == 1


@pytest.fixture
def target_db_row(db):
    from backups.models import Database

    return Database.objects.create(name="auth", host="127.0.0.1", port=5432, dbname="authdb", user="u")


# -- backups and restores ---------------------------------------------------------------------------
@pytest.mark.pg
@pytest.mark.django_db
def test_encrypted_archive_is_unreadable_without_the_key_and_restores_to_identical_rows(
        worker_key, target_db, target_cluster, repo, caplog):
    from recovery.engine import restore

    key = stored_key(worker_key, "worker")
    policy = encrypted_policy(target_db, key, plain_sql=True, schema_only=True, data_only=True)
    caplog.set_level(logging.INFO)
    run, archive = backup(target_db, policy)
    assert run.state == BackupRun.State.SUCCEEDED, run.error

    directory = archive_dir(archive)
    man = manifest_of(archive)
    assert man["encryption"]["tool"] == "gpg" and man["encryption"]["recipients"] == [key.fingerprint]
    assert man["encryption"]["compress_algo"] == "none"
    assert man["verification"]["content"] is True
    assert archive.encrypted_for == [key.fingerprint]
    assert {f["role"] for f in man["files"]} == {"dump", "globals", "plain", "schema", "data"}
    for entry in man["files"]:
        path = directory / entry["path"]
        data = path.read_bytes()
        assert entry["path"].endswith(".zst.gpg")
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]  # encrypted bytes
        assert b"PGDMP" not in data and b"ledger" not in data and b"CREATE TABLE" not in data
        assert subprocess.run(["zstd", "-t", str(path)], capture_output=True).returncode != 0
    dump = directory / man["files"][0]["path"]
    listed = subprocess.run([pgbin.for_server().tool("pg_restore"), "--list", str(dump)], capture_output=True)
    assert listed.returncode != 0  # not a valid dump
    # gpg without the private key cannot read it either.
    nokey = subprocess.run(["gpg", "--homedir", str(worker_key["homes"]["empty"]), "--batch", "--decrypt",
                            str(dump)], capture_output=True)
    assert nokey.returncode != 0 and nokey.stdout == b""
    # The derived artifacts decrypt to what they promise.
    roles = {f["role"]: f for f in man["files"]}
    with gpg.open_content(directory / roles["plain"]["path"], "zstd", True) as f:
        plain = f.read().decode()
    assert 'CREATE TABLE ledger."Entries"' in plain and 'COPY ledger."Entries"' in plain
    with gpg.open_content(directory / roles["data"]["path"], "zstd", True) as f:
        data_sql = f.read().decode()
    assert 'COPY ledger."Entries"' in data_sql and "CREATE TABLE" not in data_sql

    # The restore engine, with the workers' key, gives identical rows.
    source = restore.Source.open(directory, f"archive {archive.pk}")
    copy = f"{target_db.dbname}_enc"
    prepared = restore.restore_database(target_db, source, live_name=target_db.dbname, final_name=copy,
                                        replace=False, request_id=archive.pk)
    restore.finish(prepared)
    assert table_counts(target_cluster, copy) == table_counts(target_cluster, target_db.dbname)
    q = "SELECT md5(string_agg(memo, ',' ORDER BY id)) FROM ledger.\"Entries\""
    assert target_cluster.sql(q, dbname=copy) == target_cluster.sql(q, dbname=target_db.dbname)
    target_cluster.sql(f'DROP DATABASE "{copy}"')
    # Re-verification decrypts too, and the catalog agrees.
    assert runner.verify(archive, "test") == (True, "")


@pytest.mark.pg
@pytest.mark.django_db
def test_escrow_only_keys_still_back_up_but_say_the_content_was_not_read_back(worker_key, target_db,
                                                                            target_cluster, repo):
    from recovery.engine import restore

    escrow = stored_key(worker_key, "escrow")
    run, archive = backup(target_db, encrypted_policy(target_db, escrow))
    assert run.state == BackupRun.State.SUCCEEDED, run.error
    man = manifest_of(archive)
    assert man["verification"]["content"] is False
    assert "no private key" in man["verification"]["limited"] and escrow.fingerprint in man["verification"]["limited"]
    before = databases_on(target_cluster)
    with pytest.raises(restore.RestoreError) as failed:
        restore.Source.open(archive_dir(archive), f"archive {archive.pk}")
    assert "holds none of their private keys" in failed.value.message and escrow.fingerprint in failed.value.message
    assert databases_on(target_cluster) == before


@pytest.mark.pg
@pytest.mark.django_db
def test_a_wrong_passphrase_at_backup_time_backs_up_and_says_why_the_content_was_not_read_back(
        keys, settings, target_db, repo):
    settings.BANKVAULT_GPG_HOME, settings.BANKVAULT_GPG_PASSPHRASE = keys["homes"]["pass"], "not-it"
    gpg.flush_passphrase_cache()  # an earlier test's right passphrase may sit in gpg-agent's cache
    run, archive = backup(target_db, encrypted_policy(target_db, stored_key(keys, "pass")))
    assert run.state == BackupRun.State.SUCCEEDED, run.error
    verification = manifest_of(archive)["verification"]
    assert verification["content"] is False and verification["checksums"] is True
    assert "passphrase of the workers' private key is wrong" in verification["limited"]
    # With the right passphrase the same archive reads back in full.
    settings.BANKVAULT_GPG_PASSPHRASE = PASSPHRASE
    assert runner.verify(archive, "test") == (True, "")


@pytest.mark.pg
@pytest.mark.django_db
def test_an_encrypted_backup_that_fails_after_its_dump_leaves_no_gpg_behind(worker_key, target_db, repo,
                                                                          monkeypatch):
    """The in-stream decryption and the derived artifacts' tools all end with the run, whatever
    fails after the dump (here: a derived artifact)."""
    from backups.engine import logical
    from tests.backups.test_failures import _children

    def broken(self):
        raise logical.ToolFailed("pg_restore (plain artifact) failed: simulated")

    monkeypatch.setattr(logical._Derived, "result", broken)
    run, archive = backup(target_db, encrypted_policy(target_db, stored_key(worker_key, "worker"), plain_sql=True))
    assert run.state == BackupRun.State.FAILED and "simulated" in run.error and archive is None
    assert _children("gpg") == [] and _children("pg_restore") == []


def test_decrypting_as_written_confirms_a_whole_stream_and_refuses_an_altered_or_cut_one(worker_key, tmp_path):
    """What a backup's in-stream check does with the bytes it is fed (real gpg, worker's key)."""
    plain = os.urandom(3 << 20)
    sealed = subprocess.run(["gpg", "--homedir", str(worker_key["homes"]["worker"]), "--batch", "--trust-model",
                             "always", "--compress-algo", "none", "--encrypt", "--recipient",
                             worker_key["worker"][0], "--output", "-"], input=plain, capture_output=True,
                            check=True).stdout

    def verdict(data: bytes):
        check = gpg.StreamCheck("test.gpg", [worker_key["worker"][0]])
        for start in range(0, len(data), 1 << 16):
            check.feed(data[start:start + (1 << 16)])
        check.verdict()

    verdict(sealed)  # gpg confirmed the integrity of all of it
    flipped = bytearray(sealed)
    flipped[len(sealed) // 2] ^= 0x01
    with pytest.raises(gpg.IntegrityError):
        verdict(bytes(flipped))
    with pytest.raises(gpg.GpgError):
        verdict(sealed[:len(sealed) - 1000])
    with pytest.raises(gpg.GpgError, match="not a GnuPG-encrypted file"):
        verdict(plain[:1 << 16])


@pytest.mark.pg
@pytest.mark.django_db
@pytest.mark.parametrize("problem", ["expired", "signonly", "different", "unreadable"])
def test_a_bad_recipient_key_fails_the_backup_before_anything_is_written(worker_key, target_db, repo, problem):
    if problem == "different":  # the row says one fingerprint, its key is another
        key = stored_key(worker_key, "worker")
        EncryptionKey.objects.filter(pk=key.pk).update(public_key=worker_key["escrow"][1])
    elif problem == "unreadable":
        key = stored_key(worker_key, "worker")
        EncryptionKey.objects.filter(pk=key.pk).update(public_key="-----BEGIN PGP PUBLIC KEY BLOCK-----\nxx\n")
    else:
        key = stored_key(worker_key, problem)
    run, archive = backup(target_db, encrypted_policy(target_db, key))
    assert run.state == BackupRun.State.FAILED and archive is None
    expected = {"expired": "expired on 2020-01-02", "signonly": "no usable encryption", "different":
                "is a different key", "unreadable": "cannot be read from the catalog"}[problem]
    assert expected in run.error and key.fingerprint in run.error
    # Nothing was written: no staging directory was even made, no archive, pg_dump never ran.
    assert not any((repo.root / "archives").rglob("*")) if (repo.root / "archives").exists() else True
    assert not (repo.tmp.exists() and any(repo.tmp.iterdir()))
    assert not Archive.objects.exists()


@pytest.mark.pg
@pytest.mark.django_db
def test_missing_key_and_wrong_passphrase_fail_the_restore_before_anything_is_touched(
        keys, settings, target_db, target_cluster, repo, caplog):
    """Every case fails in Source.open — before a database is created on the target."""
    from recovery.engine import restore

    settings.BANKVAULT_GPG_HOME = keys["homes"]["pass"]
    settings.BANKVAULT_GPG_PASSPHRASE = PASSPHRASE
    caplog.set_level(logging.DEBUG)
    run, archive = backup(target_db, encrypted_policy(target_db, stored_key(keys, "pass")))
    assert run.state == BackupRun.State.SUCCEEDED, run.error
    assert manifest_of(archive)["verification"]["content"] is True  # the passphrase opened it
    directory = archive_dir(archive)
    before = databases_on(target_cluster)

    def refused(home, passphrase) -> str:
        settings.BANKVAULT_GPG_HOME, settings.BANKVAULT_GPG_PASSPHRASE = home, passphrase
        with pytest.raises(restore.RestoreError) as failed:
            restore.Source.open(directory, f"archive {archive.pk}")
        assert databases_on(target_cluster) == before
        return failed.value.message

    # The right passphrase was used (and cached by gpg-agent) a moment ago: still refused.
    assert "passphrase of the workers' private key is wrong" in refused(keys["homes"]["pass"], "not-it")
    assert "needs a passphrase and none is configured" in refused(keys["homes"]["pass"], "")
    assert "holds none of their private keys" in refused(keys["homes"]["empty"], PASSPHRASE)
    assert "does not exist" in refused(keys["base"] / "nowhere", PASSPHRASE)
    settings.BANKVAULT_GPG_HOME, settings.BANKVAULT_GPG_PASSPHRASE = keys["homes"]["pass"], PASSPHRASE
    assert restore.Source.open(directory, "again").encryption["recipients"] == [keys["pass"][0]]
    # The passphrase never reached argv (logged for every tool), logs, or the audit trail.
    assert PASSPHRASE not in caplog.text
    assert not AuditEvent.objects.filter(details__icontains=PASSPHRASE).exists()


@pytest.mark.pg
@pytest.mark.django_db
@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_decrypted_output_without_gpgs_integrity_check_is_discarded(worker_key, target_db, target_cluster, repo,
                                                                   damage):
    """An attacker who rewrites a file AND its manifest entry gets past the sha256; gpg's
    integrity check (MDC) still stops the restore, and what was restored is dropped."""
    from backups.engine import manifest as manifest_mod
    from recovery.engine import restore

    run, archive = backup(target_db, encrypted_policy(target_db, stored_key(worker_key, "worker")))
    directory = archive_dir(archive)
    man = manifest_of(archive)
    entry = next(f for f in man["files"] if f["role"] == "dump")
    path = directory / entry["path"]
    data = bytearray(path.read_bytes())
    if damage == "flipped":
        data[len(data) - 40] ^= 0x01  # near the end: most of the data streams out before gpg's verdict
    else:
        del data[len(data) - 30:]
    path.write_bytes(bytes(data))
    entry["sha256"], entry["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    manifest_mod.write(directory, man)

    source = restore.Source.open(directory, "tampered")
    before = databases_on(target_cluster)
    with pytest.raises(restore.RestoreError) as failed:
        restore.restore_database(target_db, source, live_name=target_db.dbname, final_name="tampered_copy",
                                 replace=False, request_id=990)
    assert "integrity check" in failed.value.message
    assert databases_on(target_cluster) == before  # the work database was dropped
    ok, error = runner.verify(Archive.objects.get(pk=archive.pk), "test")
    assert not ok and "integrity check" in error


# -- WAL, base backups and point-in-time recovery -------------------------------------------------------
@pytest.mark.pg
@pytest.mark.slow
@pytest.mark.django_db
def test_encrypted_wal_and_base_backup_recover_to_the_latest_rows(worker_key, make_archiving_cluster, repo):
    from recovery.engine import pitr

    cluster, db = make_archiving_cluster()
    key = stored_key(worker_key, "worker")
    encrypted_policy(db, key, kind=BackupKind.BASE, verify_deep=True)
    out = StringIO()
    call_command("databases", "archive-command", db.name, stdout=out)
    assert f"--encrypt-to {key.fingerprint}" in out.getvalue()
    assert (repo.root / "bin" / "keys" / f"{key.fingerprint}.asc").read_text() == key.public_key
    assert AuditEvent.objects.filter(action="config.wal.keys_installed").exists()
    with cluster.connect() as conn:
        command = sql.Literal(wal.archive_command(db, repo))
        conn.execute(sql.SQL("ALTER SYSTEM SET archive_command = {}").format(command))
        conn.execute("SELECT pg_reload_conf()")
        conn.execute("CREATE TABLE t (id serial PRIMARY KEY, label text)")
        conn.execute("INSERT INTO t (label) SELECT 'before' FROM generate_series(1, 100)")

    run, base = backup(db, kind=BackupKind.BASE)  # no policy: the database's keys apply
    assert run.state == BackupRun.State.SUCCEEDED, run.error
    man = manifest_of(base)
    assert [f["path"] for f in man["files"]] == ["base/base.tar.zst.gpg"]
    assert man["encryption"]["recipients"] == [key.fingerprint] and base.encrypted_for == [key.fingerprint]
    assert man["wal"]["start_lsn"] and man["wal"]["stop_lsn"]

    with cluster.connect() as conn:
        conn.execute("INSERT INTO t (label) SELECT 'after' FROM generate_series(1, 50)")
        conn.execute("SELECT pg_switch_wal()")
        segment = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0]
    stored = wal.wait_for_segments(wal.area_path(db, repo), [segment], 0)  # noqa: F841 - the area is listed below
    area = wal.area_path(db, repo)
    segs, _ = wal.scan(area)
    assert segs and all(s.encrypted and s.filename.endswith(".zst.gpg") for s in segs.values())
    some = next(iter(segs.values()))
    assert b"before" not in some.path.read_bytes()
    # PostgreSQL's own restore_command (the script, no key) refuses the encrypted copy.
    dest = repo.root / "fetched"
    assert walpush.restore_to(str(area), some.name, str(dest)) == walpush.ABORT and not dest.exists()

    # Missing key: refused before anything is unpacked.
    worker_home = worker_key["homes"]["worker"]
    from django.conf import settings

    settings.BANKVAULT_GPG_HOME = worker_key["homes"]["empty"]
    with pytest.raises(pitr.PitrError) as failed:
        pitr.recover(db, None)
    assert "holds none of their private keys" in failed.value.message
    assert not list(Path(settings.BANKVAULT_SCRATCH_DIR).glob(f"{db.name}-*"))
    settings.BANKVAULT_GPG_HOME = worker_home

    _wait_archived(cluster, segment)
    recovered = pitr.recover(db, None)
    try:
        with recovered.cluster.connect(db.dbname) as conn:
            labels = dict(conn.execute("SELECT label, count(*) FROM t GROUP BY label").fetchall())
        assert labels == {"before": 100, "after": 50}
    finally:
        recovered.destroy()


def _wait_archived(cluster, segment: str, timeout: float = 30):
    from backups.engine.cluster import wait_until

    def archived():
        with cluster.connect() as c:
            last = c.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0]
        return last is not None and last[:24] >= segment

    wait_until(archived, timeout, what=f"segment {segment} to be archived")


def test_push_refuses_an_unknown_or_unusable_recipient_and_stores_nothing(keys, tmp_path):
    area = tmp_path / "area"
    area.mkdir()
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    segment = tmp_path / "000000010000000000000001"
    segment.write_bytes(os.urandom(64 * 1024))
    argv = ["push", "--area", str(area), "--encrypt-to", keys["worker"][0], "--keys", str(keys_dir),
            str(segment), segment.name]
    assert walpush.main(argv) == 1  # unknown: its key file is not installed
    assert not any(area.rglob("*0001-*"))
    (keys_dir / f"{keys['expired'][0]}.asc").write_text(keys["expired"][1])
    argv[4] = keys["expired"][0]
    assert walpush.main(argv) == 1  # gpg refuses the expired key
    assert not [p for p in area.rglob("*") if p.is_file() and not p.name.startswith(".")]
    (keys_dir / f"{keys['worker'][0]}.asc").write_text(keys["worker"][1])
    argv[4] = keys["worker"][0]
    assert walpush.main(argv) == 0
    stored = walpush.stored(str(area), segment.name)
    sha = hashlib.sha256(segment.read_bytes()).hexdigest()
    assert [(s[1], s[2]) for s in stored] == [(sha, ".zst.gpg")]  # the name's sha256 is the original's
    assert walpush.main(argv) == 0 and len(walpush.stored(str(area), segment.name)) == 1  # identical re-push


# -- health and the decrypt canary -----------------------------------------------------------------------
@pytest.mark.django_db
def test_key_expiry_is_a_warning_within_30_days_and_failing_once_expired(keys, target_db_row):
    from monitoring import health
    from monitoring.models import Status

    soon = stored_key(keys, "soon")
    later = stored_key(keys, "worker")
    gone = EncryptionKey.objects.create(fingerprint="A" * 40, owner="Gone <gone@bank.example>",
                                        public_key="x", expires_at=timezone.now() - timedelta(days=1))
    unused = EncryptionKey.objects.create(fingerprint="B" * 40, owner="Unused", public_key="x",
                                          expires_at=timezone.now() - timedelta(days=1))
    encrypted_policy(target_db_row, soon, later, gone)
    results = {r.details["fingerprint"]: r for r in health.encryption_keys()}
    assert unused.fingerprint not in results  # no enabled policy uses it
    assert results[soon.fingerprint].status == Status.WARNING and "expires in" in results[soon.fingerprint].summary
    assert results[later.fingerprint].status == Status.OK
    assert results[gone.fingerprint].status == Status.FAILING and "expired" in results[gone.fingerprint].summary
    assert "keys" in health.CHECKS


@pytest.mark.pg
@pytest.mark.django_db
def test_decrypt_canary_proves_the_newest_archive_readable_and_alerts_when_it_is_not(worker_key, settings,
                                                                                   target_db, repo):
    from monitoring import drills
    from monitoring.models import CheckState, Status

    run, archive = backup(target_db, encrypted_policy(target_db, stored_key(worker_key, "worker")))
    [result] = drills.decrypt_canary()
    assert result.status == Status.OK and result.details["files"] == 2, result.summary
    assert AuditEvent.objects.filter(action="archive.decrypt_canary", outcome="success").exists()

    settings.BANKVAULT_GPG_HOME = worker_key["homes"]["empty"]
    [result] = drills.decrypt_canary()
    assert result.status == Status.FAILING and "holds none of their private keys" in result.summary
    assert CheckState.objects.get(name="decrypt-canary").status == Status.FAILING
    assert AuditEvent.objects.filter(action="archive.decrypt_canary", outcome="failure").exists()
    assert AuditEvent.objects.filter(action="alert.failing").exists()


@pytest.mark.django_db
def test_scheduler_setup_creates_the_weekly_decrypt_canary():
    call_command("backup_scheduler", "--setup", stdout=StringIO())
    task = PeriodicTask.objects.get(name="bankvault: weekly decrypt canary")
    assert task.task == "monitoring.tasks.decrypt_canary" and task.crontab.day_of_week == "6"
    assert task.expire_seconds and task.expire_seconds < 7 * 86400
