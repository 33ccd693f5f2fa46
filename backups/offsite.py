"""Off-site copies: each finished archive copied to S3-compatible object storage, and read back
from there when the local archive is missing or damaged.

Layout in a bucket (the same relative paths as the local repository, under the remote's prefix):

    <prefix>archives/<database>/<stamp>_<kind>_r<run>/<file>        every file the catalog lists
    <prefix>archives/<database>/<stamp>_<kind>_r<run>/manifest.json  uploaded LAST

A copy is complete only when every file has been uploaded AND read back from the server with
its sha256 equal to the catalog's, and then the manifest has been uploaded and read back: a copy
that died half-way, or failed its check, has no manifest.json and never looks complete. Before an
overwrite (a retry), the remote manifest is deleted first, for the same reason; on deletion it
goes first too.

The check reads every byte back (a GET per object). S3's own per-object checksums
(ChecksumAlgorithm=SHA256) are not used for it: for multipart uploads they are checksums of the
parts' checksums, not of the file, and whether an S3-compatible server really checks them varies.
Reading back costs one more transfer and proves what matters: the server returns the bytes the
catalog describes.

Credentials come from the RemoteRepository row (the secret decrypted only here, into the boto3
client in memory): never in argv, the environment, logs, pages or the audit trail.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import math
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

import audit

from . import crypto
from .engine import manifest
from .engine.logical import verify_files
from .engine.pgtools import BackupError
from .engine.repository import CHUNK, LocalRepository, default_repository, os_error
from .models import WORKER, Archive, ArchiveCopy, RemoteRepository

log = logging.getLogger(__name__)

MIB = 1 << 20
MAX_PARTS = 9000  # S3 allows 10,000 parts per upload; keep a margin
# Storage classes whose objects cannot be read without a restore request on the S3 side: a
# restore tries copies in other classes first.
COLD_CLASSES = {"GLACIER", "DEEP_ARCHIVE", "GLACIER_IR_ARCHIVE"}


class OffsiteError(BackupError):
    """A copy, check, fetch or delete failed; the message says why in an operator's words."""


class Unreachable(OffsiteError):
    """The endpoint did not answer (down, wrong URL, network): worth retrying later."""


class CopyDamaged(OffsiteError):
    """What the server returned does not match the catalog."""


class CopyInProgress(OffsiteError):
    """Another worker is copying this archive to this remote right now."""


# -- talking to S3 ----------------------------------------------------------------------------------
class _HashingReader:
    """A file object for s3transfer that hashes the bytes as they are read. s3transfer reads a
    non-seekable object in order, part after part, so the digest is the file's."""

    def __init__(self, f):
        self._f = f
        self._h = hashlib.sha256()
        self.bytes = 0

    def read(self, n=-1):
        data = self._f.read(n)
        self._h.update(data)
        self.bytes += len(data)
        return data

    @property
    def sha256(self) -> str:
        return self._h.hexdigest()


def _unwrap(exc: BaseException) -> BaseException:
    """s3transfer and boto3 wrap the error that matters; find the botocore one."""
    from botocore.exceptions import BotoCoreError, ClientError

    seen = exc
    for _ in range(5):
        if isinstance(seen, (ClientError, BotoCoreError)):
            return seen
        nxt = seen.__cause__ or seen.__context__
        if nxt is None:
            break
        seen = nxt
    return exc


class S3Repository:
    """One RemoteRepository as a boto3 client, with every failure mapped to an OffsiteError."""

    def __init__(self, remote: RemoteRepository):
        self.remote = remote
        self._client = None

    @property
    def endpoint(self) -> str:
        return self.remote.endpoint_url or "AWS S3"

    @property
    def where(self) -> str:
        return f"remote {self.remote.name} (bucket {self.remote.bucket} at {self.endpoint})"

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            try:
                secret = self.remote.get_secret_key()
            except crypto.SecretUnreadable:
                raise OffsiteError(f"the secret key of remote {self.remote.name} cannot be decrypted with the "
                                   "configured BANKVAULT_FIELD_KEYS (was the key changed?); set it again") from None
            if not self.remote.access_key_id or not secret:
                raise OffsiteError(f"remote {self.remote.name} has no access key id or no secret key; set both")
            config = Config(
                region_name=self.remote.region or "us-east-1",
                signature_version="s3v4",
                # Path-style addressing for S3-compatible servers (no wildcard DNS for buckets).
                s3={"addressing_style": "path" if self.remote.endpoint_url else "auto"},
                connect_timeout=settings.BANKVAULT_CONNECT_TIMEOUT, read_timeout=120,
                retries={"max_attempts": 3, "mode": "standard"},
            )
            # A session of its own: boto3's default session is not safe to share between threads.
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=self.remote.endpoint_url or None, aws_access_key_id=self.remote.access_key_id,
                aws_secret_access_key=secret, verify=self.remote.verify_tls, config=config)
        return self._client

    def key(self, relpath: str) -> str:
        prefix = self.remote.prefix.strip("/")
        return f"{prefix}/{relpath}" if prefix else relpath

    def error(self, exc: BaseException, doing: str) -> OffsiteError:
        """An exception from boto3 in words an operator can act on (never with the secret)."""
        from botocore import exceptions as bex

        exc = _unwrap(exc)
        r = self.remote
        if isinstance(exc, OffsiteError):
            return exc
        if isinstance(exc, bex.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            message = err.get("Message", "") or str(exc)
            if code == "NoSuchBucket" or (status == 404 and "bucket" in doing):
                return OffsiteError(f"bucket {r.bucket} does not exist at {self.endpoint} ({doing}): create it, "
                                    f"or correct the bucket of remote {r.name}")
            if code == "InvalidAccessKeyId":
                return OffsiteError(f"the S3 server at {self.endpoint} does not know the access key id of remote "
                                    f"{r.name} ({doing}): correct the access key id")
            if code == "SignatureDoesNotMatch":
                return OffsiteError(f"the S3 server at {self.endpoint} rejected the secret key of remote {r.name} "
                                    f"(signature mismatch, {doing}): set the right secret key")
            if code in ("AccessDenied", "403", "Forbidden") or status == 403:
                return OffsiteError(f"the S3 server at {self.endpoint} refused access to bucket {r.bucket} "
                                    f"({doing}): wrong access key id or secret key of remote {r.name}, or the key "
                                    "lacks permission (it needs to list, put, get and delete objects)")
            if code == "InvalidObjectState":
                return OffsiteError(f"the object is in an archive storage class at {self.where} ({doing}): "
                                    "restore it on the S3 side first, then retry")
            if code in ("NoSuchKey", "404") or status == 404:
                return CopyDamaged(f"an object is missing from {self.where} ({doing})")
            if code in ("InsufficientStorage", "QuotaExceeded", "XMinioStorageFull", "StorageFull") \
                    or status == 507:
                return OffsiteError(f"the S3 server at {self.endpoint} has no room left ({code}, {doing}): free "
                                    "space or raise the quota on the S3 side, then retry the copy")
            if status >= 500:
                transient = code in ("SlowDown", "ServiceUnavailable", "RequestTimeout")
                cls = Unreachable if transient else OffsiteError
                return cls(f"the S3 server at {self.endpoint} failed while {doing} ({code or 'error'}, HTTP "
                           f"{status}: {message}); its storage may be full or failing: check the S3 server")
            return OffsiteError(f"the S3 server at {self.endpoint} refused {doing}: {code} (HTTP {status}): "
                                f"{message}")
        if isinstance(exc, bex.SSLError):
            return OffsiteError(f"TLS verification of {self.endpoint} failed ({doing}): {exc}; fix the server's "
                                "certificate or trust its CA")
        if isinstance(exc, (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ConnectionClosedError)):
            return Unreachable(f"cannot reach the S3 endpoint {self.endpoint} of remote {r.name} ({doing}): is the "
                               "server up and the endpoint URL right?")
        if isinstance(exc, bex.ReadTimeoutError):
            return Unreachable(f"the S3 endpoint {self.endpoint} of remote {r.name} stopped answering ({doing})")
        if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
            return OffsiteError(f"remote {r.name} has no complete credentials ({doing})")
        if isinstance(exc, bex.BotoCoreError):
            return OffsiteError(f"S3 client error at {self.where} ({doing}): {exc}")
        if isinstance(exc, OSError):
            return os_error(exc, getattr(exc, "filename", "") or "", doing)
        return OffsiteError(f"unexpected error at {self.where} ({doing}): {exc.__class__.__name__}: {exc}")

    @contextlib.contextmanager
    def _mapped(self, doing: str):
        try:
            yield
        except OffsiteError:
            raise
        except Exception as exc:
            raise self.error(exc, doing) from None

    def check_bucket(self) -> None:
        # A listing rather than head_bucket: HEAD responses carry no error body, so a wrong secret
        # and a missing permission would both be a bare 403.
        with self._mapped(f"checking bucket {self.remote.bucket}"):
            self.client.list_objects_v2(Bucket=self.remote.bucket, Prefix=self.key(""), MaxKeys=1)

    def _transfer_config(self, size: int):
        from boto3.s3.transfer import TransferConfig

        part = max(settings.BANKVAULT_OFFSITE_PART_MB, 5) * MIB
        # Large files get larger parts rather than more than MAX_PARTS of them.
        part = max(part, math.ceil(size / MAX_PARTS / MIB) * MIB)
        concurrency = max(1, settings.BANKVAULT_OFFSITE_CONCURRENCY)
        config = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=concurrency)
        # Memory stays bounded: at most this many parts are read ahead of the uploads.
        config.max_in_memory_upload_chunks = concurrency * 2
        return config

    def upload_file(self, path: Path, relpath: str, sha256: str) -> tuple[str, int]:
        """Stream one local file up (multipart above the part size); returns (sha256, bytes)
        of what was read and sent."""
        extra = {"Metadata": {"sha256": sha256}, "ContentType": "application/octet-stream"}
        if self.remote.storage_class:
            extra["StorageClass"] = self.remote.storage_class
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise os_error(exc, path, f"reading {relpath} for the off-site copy") from None
        with f, self._mapped(f"uploading {relpath}"):
            reader = _HashingReader(f)
            self.client.upload_fileobj(reader, self.remote.bucket, self.key(relpath), ExtraArgs=extra,
                                       Config=self._transfer_config(path.stat().st_size))
        return reader.sha256, reader.bytes

    def put_bytes(self, data: bytes, relpath: str) -> None:
        extra = {"Metadata": {"sha256": hashlib.sha256(data).hexdigest()}}
        if self.remote.storage_class:
            extra["StorageClass"] = self.remote.storage_class
        with self._mapped(f"uploading {relpath}"):
            self.client.put_object(Bucket=self.remote.bucket, Key=self.key(relpath), Body=data, **extra)

    def _stream(self, relpath: str, sink=None) -> tuple[str, int]:
        """Read one object, hashing it (and writing it to ``sink``)."""
        h = hashlib.sha256()
        n = 0
        with self._mapped(f"reading {relpath} back"):
            body = self.client.get_object(Bucket=self.remote.bucket, Key=self.key(relpath))["Body"]
            try:
                for chunk in body.iter_chunks(CHUNK):
                    h.update(chunk)
                    n += len(chunk)
                    if sink is not None:
                        sink.write(chunk)
            finally:
                body.close()
        return h.hexdigest(), n

    def hash_object(self, relpath: str) -> tuple[str, int]:
        return self._stream(relpath)

    def download(self, relpath: str, dest: Path) -> tuple[str, int]:
        try:
            f = open(dest, "xb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise os_error(exc, dest, f"writing {relpath} fetched from {self.where}") from None
        with f:
            try:
                return self._stream(relpath, f)
            except OSError as exc:
                raise os_error(exc, dest, f"writing {relpath} fetched from {self.where}") from None

    def get_bytes(self, relpath: str) -> bytes:
        buf = io.BytesIO()
        self._stream(relpath, buf)
        return buf.getvalue()

    def delete(self, relpath: str) -> None:
        with self._mapped(f"deleting {relpath}"):
            self.client.delete_object(Bucket=self.remote.bucket, Key=self.key(relpath))

    def delete_tree(self, relpath: str) -> int:
        """Delete every object under ``relpath``/ (manifest.json first, so what remains never
        looks complete). Returns how many were deleted."""
        self.delete(f"{relpath}/{manifest.NAME}")
        prefix = self.key(relpath) + "/"
        deleted = 1
        with self._mapped(f"deleting {relpath}"):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.remote.bucket, Prefix=prefix):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if not keys:
                    continue
                result = self.client.delete_objects(Bucket=self.remote.bucket, Delete={"Objects": keys, "Quiet": True})
                if result.get("Errors"):
                    first = result["Errors"][0]
                    raise OffsiteError(f"the S3 server at {self.endpoint} did not delete {first.get('Key')}: "
                                       f"{first.get('Code')}: {first.get('Message')} (object lock or retention?)")
                deleted += len(keys)
        return deleted

    def set_storage_class(self, relpath: str, storage_class: str, sha256: str) -> str:
        """Rewrite one object in another storage class (server-side copy onto itself; multipart
        for large objects). Returns the class the server reports afterwards."""
        key = self.key(relpath)
        with self._mapped(f"moving {relpath} to storage class {storage_class}"):
            self.client.copy(
                {"Bucket": self.remote.bucket, "Key": key}, self.remote.bucket, key,
                ExtraArgs={"StorageClass": storage_class, "MetadataDirective": "REPLACE",
                           "Metadata": {"sha256": sha256}, "ContentType": "application/octet-stream"})
            head = self.client.head_object(Bucket=self.remote.bucket, Key=key)
        return head.get("StorageClass") or "STANDARD"

    def probe(self) -> dict:
        """The bucket answers a listing, then a small object is put, read back and deleted."""
        started = time.monotonic()
        self.check_bucket()
        relpath = f".bankvault-probe-{secrets.token_hex(8)}"
        data = secrets.token_bytes(1024)
        self.put_bytes(data, relpath)
        try:
            if self.get_bytes(relpath) != data:
                raise CopyDamaged(f"{self.where} returned other bytes than were written to it (probe object)")
        finally:
            self.delete(relpath)
        return {"remote": self.remote.name, "bucket": self.remote.bucket, "endpoint": self.endpoint,
                "seconds": round(time.monotonic() - started, 3)}


# -- state changes of an ArchiveCopy (each audited in its transaction) ------------------------------
def _details(copy: ArchiveCopy, **more) -> dict:
    return {"archive": copy.archive_id, "path": copy.archive.path, "database": copy.archive.database.name,
            "remote": copy.remote.name, **more}


def _claim(archive: Archive, remote: RemoteRepository, actor, force: bool) -> ArchiveCopy | None:
    """new | failed | deleted | stale copying (its worker died) -> copying. A complete copy is
    left alone (None) unless ``force``; a fresh copying one is another worker's."""
    stale_before = timezone.now() - timedelta(seconds=settings.BANKVAULT_TOOL_TIMEOUT)
    with transaction.atomic():
        try:
            with transaction.atomic():
                copy, created = ArchiveCopy.objects.get_or_create(archive=archive, remote=remote)
        except IntegrityError:  # another worker created it just now
            copy, created = ArchiveCopy.objects.get(archive=archive, remote=remote), False
        copy = ArchiveCopy.objects.select_for_update().select_related("archive__database", "remote").get(pk=copy.pk)
        if not created:
            if copy.state == ArchiveCopy.State.COMPLETE and not force:
                return None
            if copy.state == ArchiveCopy.State.COPYING and copy.started_at > stale_before:
                raise CopyInProgress(f"archive {archive.pk} is being copied to {remote.name} since "
                                     f"{timezone.localtime(copy.started_at):%Y-%m-%d %H:%M:%S}")
        copy.state = ArchiveCopy.State.COPYING
        copy.started_at = timezone.now()
        copy.finished_at = copy.verified_at = None
        copy.bytes = 0
        copy.error = ""
        copy.storage_class = remote.storage_class
        copy.save(update_fields=["state", "started_at", "finished_at", "verified_at", "bytes", "error",
                                 "storage_class"])
        audit.record(actor, "archive.copy.started", copy, details=_details(copy))
    return copy


def _succeed(copy: ArchiveCopy, actor, nbytes: int, files: int, seconds: float) -> None:
    with transaction.atomic():
        ArchiveCopy.objects.select_for_update().get(pk=copy.pk)
        now = timezone.now()
        copy.state = ArchiveCopy.State.COMPLETE
        copy.finished_at = copy.verified_at = now
        copy.bytes = nbytes
        copy.error = ""
        copy.save(update_fields=["state", "finished_at", "verified_at", "bytes", "error"])
        audit.record(actor, "archive.copy.succeeded", copy,
                     details=_details(copy, bytes=nbytes, files=files, seconds=round(seconds, 3),
                                      storage_class=copy.storage_class or "default"))


def _fail(copy: ArchiveCopy, actor, error: str, action: str = "archive.copy.failed", **more) -> None:
    with transaction.atomic():
        ArchiveCopy.objects.select_for_update().get(pk=copy.pk)
        copy.state = ArchiveCopy.State.FAILED
        copy.finished_at = timezone.now()
        copy.error = error
        copy.save(update_fields=["state", "finished_at", "error"])
        audit.record(actor, action, copy, outcome="failure", details=_details(copy, error=error, **more))


def _catalog_files(archive: Archive) -> list[dict]:
    return [{"path": f.path, "bytes": f.bytes, "sha256": f.sha256} for f in archive.files.order_by("path")]


# -- copying ----------------------------------------------------------------------------------------
def copy_archive(archive: Archive, remote: RemoteRepository, actor=WORKER, *, force: bool = False,
                 repo: LocalRepository | None = None) -> ArchiveCopy | None:
    """Copy one archive to one remote and verify it there. Returns the complete copy, or None
    when it was already complete (and not ``force``). A failure is recorded on the copy (FAILED,
    with the reason) and raised as OffsiteError; the local archive is only ever read."""
    if not remote.enabled:
        raise OffsiteError(f"remote {remote.name} is disabled")
    if archive.state != Archive.State.COMPLETE:
        raise OffsiteError(f"archive {archive.pk} is {archive.state}; only complete archives are copied")
    copy = _claim(archive, remote, actor, force)
    if copy is None:
        return None
    started = time.monotonic()
    sent = 0
    try:
        sent, files = _upload_and_verify(archive, S3Repository(remote), repo or default_repository())
    except OffsiteError as exc:
        _fail(copy, actor, exc.message, bytes=sent, seconds=round(time.monotonic() - started, 3))
        raise
    except Exception as exc:
        log.exception("copy of archive %s to %s failed unexpectedly", archive.pk, remote.name)
        _fail(copy, actor, f"internal error: {exc.__class__.__name__}: {exc}")
        raise
    _succeed(copy, actor, sent, files, time.monotonic() - started)
    return copy


def _upload_and_verify(archive: Archive, s3: S3Repository, repo: LocalRepository) -> tuple[int, int]:
    directory = repo.archive_dir(archive.path)
    try:
        man, man_sha = manifest.read(directory)
    except manifest.ManifestError as exc:
        raise OffsiteError(f"the local archive cannot be copied: {exc}") from None
    if man_sha != archive.manifest_sha256:
        raise OffsiteError(f"the local manifest.json of archive {archive.pk} does not match the catalog's sha256; "
                           "verify the archive (manage.py archives verify) before copying it")
    files = _catalog_files(archive)
    if {f["path"]: f["sha256"] for f in man["files"]} != {f["path"]: f["sha256"] for f in files}:
        raise OffsiteError(f"the catalog and the manifest of archive {archive.pk} disagree about its files")
    s3.check_bucket()
    # An earlier copy (complete or not) stops looking complete before anything is overwritten.
    s3.delete(f"{archive.path}/{manifest.NAME}")
    sent = 0
    for f in files:
        rel = f"{archive.path}/{f['path']}"
        sha, n = s3.upload_file(directory / f["path"], rel, f["sha256"])
        sent += n
        if sha != f["sha256"] or n != f["bytes"]:
            raise OffsiteError(f"the local file {f['path']} of archive {archive.pk} does not match its catalog entry "
                               f"(read {n} bytes, sha256 {sha[:12]}…; expected {f['bytes']} bytes, "
                               f"{f['sha256'][:12]}…): the local archive is damaged; nothing complete was copied")
    # Read every file back before the manifest goes up: a copy that fails its check never has one.
    for f in files:
        _check_object(s3, f"{archive.path}/{f['path']}", f["sha256"], f["bytes"])
    data = (directory / manifest.NAME).read_bytes()
    if hashlib.sha256(data).hexdigest() != archive.manifest_sha256:
        raise OffsiteError(f"the local manifest.json of archive {archive.pk} changed during the copy")
    s3.put_bytes(data, f"{archive.path}/{manifest.NAME}")
    _check_object(s3, f"{archive.path}/{manifest.NAME}", archive.manifest_sha256, len(data))
    return sent + len(data), len(files) + 1


def _check_object(s3: S3Repository, relpath: str, sha256: str, size: int) -> None:
    sha, n = s3.hash_object(relpath)
    if sha != sha256 or n != size:
        raise CopyDamaged(f"{relpath} read back from {s3.where} does not match the catalog (expected {size} bytes, "
                          f"sha256 {sha256[:12]}…; got {n} bytes, sha256 {sha[:12]}…)")


def copy_by_id(archive_id: int, remote_id: int, actor=WORKER) -> ArchiveCopy | None:
    """The Celery task's body. A copy in progress elsewhere is not an error here."""
    archive = Archive.objects.select_related("database").get(pk=archive_id)
    remote = RemoteRepository.objects.get(pk=remote_id)
    try:
        return copy_archive(archive, remote, actor)
    except CopyInProgress as exc:
        log.info("%s", exc.message)
        return None


def verify_copy(copy: ArchiveCopy, actor) -> ArchiveCopy:
    """Read a complete copy back and compare every object with the catalog. A mismatch marks
    the copy FAILED (archive.copy.verify_failed); restores then no longer read from it."""
    copy = ArchiveCopy.objects.select_related("archive__database", "remote").get(pk=copy.pk)
    if copy.state != ArchiveCopy.State.COMPLETE:
        raise OffsiteError(f"the copy of archive {copy.archive_id} at {copy.remote.name} is {copy.state}, not "
                           "complete; copy it again")
    archive, s3 = copy.archive, S3Repository(copy.remote)
    started = time.monotonic()
    try:
        for f in _catalog_files(archive):
            _check_object(s3, f"{archive.path}/{f['path']}", f["sha256"], f["bytes"])
        data = s3.get_bytes(f"{archive.path}/{manifest.NAME}")
        if hashlib.sha256(data).hexdigest() != archive.manifest_sha256:
            raise CopyDamaged(f"the manifest.json at {s3.where} does not match the catalog")
    except CopyDamaged as exc:
        _fail(copy, actor, exc.message, action="archive.copy.verify_failed")
        raise
    except OffsiteError as exc:  # unreachable, credentials: the copy may be fine; say so, change nothing
        audit.record(actor, "archive.copy.verify_failed", copy, outcome="failure",
                     details=_details(copy, error=exc.message, state_kept=copy.state))
        raise
    with transaction.atomic():
        copy.verified_at = timezone.now()
        copy.save(update_fields=["verified_at"])
        audit.record(actor, "archive.copy.verified", copy,
                     details=_details(copy, seconds=round(time.monotonic() - started, 3)))
    return copy


# -- reading a copy back ----------------------------------------------------------------------------
def fetch_archive(archive: Archive, copy: ArchiveCopy, dest_dir: Path) -> Path:
    """Download a complete copy into ``dest_dir`` (created, must not exist) and verify every
    file's sha256 against the catalog and the manifest. Returns dest_dir; on any failure it is
    removed and OffsiteError raised (CopyDamaged when the copy itself is wrong)."""
    if copy.state != ArchiveCopy.State.COMPLETE:
        raise OffsiteError(f"the copy of archive {archive.pk} at {copy.remote.name} is {copy.state}, not complete")
    s3 = S3Repository(copy.remote)
    dest_dir = Path(dest_dir)
    try:
        dest_dir.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(dest_dir.parent).free
    except OSError as exc:
        raise os_error(exc, dest_dir.parent, "preparing to fetch an off-site copy") from None
    if free < archive.bytes * 1.05 + 16 * MIB:
        raise OffsiteError(f"not enough space to fetch archive {archive.pk} from {copy.remote.name}: "
                           f"{free // MIB} MiB free in {dest_dir.parent}, {archive.bytes // MIB} MiB needed "
                           "(BANKVAULT_SCRATCH_DIR)")
    try:
        dest_dir.mkdir(mode=0o700)
    except OSError as exc:
        raise os_error(exc, dest_dir, "creating the directory for a fetched copy") from None
    try:
        sha, n = s3.download(f"{archive.path}/{manifest.NAME}", dest_dir / manifest.NAME)
        if sha != archive.manifest_sha256:
            raise CopyDamaged(f"the manifest.json of the copy at {s3.where} does not match the catalog")
        man, _ = manifest.read(dest_dir)
        files = _catalog_files(archive)
        if {f["path"]: f["sha256"] for f in man["files"]} != {f["path"]: f["sha256"] for f in files}:
            raise CopyDamaged(f"the copy's manifest at {s3.where} and the catalog disagree about the files")
        for f in files:
            target = dest_dir / f["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            sha, n = s3.download(f"{archive.path}/{f['path']}", target)
            if sha != f["sha256"] or n != f["bytes"]:
                raise CopyDamaged(f"{f['path']} fetched from {s3.where} does not match the catalog (expected "
                                  f"{f['bytes']} bytes, sha256 {f['sha256'][:12]}…; got {n} bytes, {sha[:12]}…)")
    except BaseException:
        shutil.rmtree(dest_dir, ignore_errors=True)
        raise
    return dest_dir


@dataclass
class Located:
    """Where to read an archive from: the local repository, or a verified fetch of a copy in
    scratch (temporary: removed by cleanup())."""

    directory: Path
    label: str
    copy: ArchiveCopy | None = None
    local_problem: str = ""
    temporary: bool = False

    def cleanup(self) -> None:
        if self.temporary:
            shutil.rmtree(self.directory, ignore_errors=True)


def local_problem(archive: Archive, directory: Path, deep: bool) -> str:
    """Why the local archive cannot be used, or "" — cheap checks (present, manifest matches
    the catalog, sizes), and with ``deep`` every file's sha256."""
    if archive.state == Archive.State.CORRUPT:
        return f"the local archive is marked corrupt ({archive.verify_error or 'failed verification'})"
    if not directory.is_dir():
        return f"the local archive directory {archive.path} is missing"
    try:
        _, sha = manifest.read(directory)
    except manifest.ManifestError as exc:
        return str(exc)
    if sha != archive.manifest_sha256:
        return "the local manifest.json does not match the catalog"
    files = _catalog_files(archive)
    for f in files:
        try:
            size = (directory / f["path"]).stat().st_size
        except OSError:
            return f"{f['path']} is missing from the local archive"
        if size != f["bytes"]:
            return f"{f['path']} has {size} bytes in the local archive; the catalog says {f['bytes']}"
    if deep:
        try:
            verify_files(directory, {"files": files})
        except BackupError as exc:
            return exc.message
    return ""


def readable_copies(archive: Archive) -> list[ArchiveCopy]:
    """Complete, verified copies, newest check first, archive storage classes last."""
    copies = list(archive.copies.filter(state=ArchiveCopy.State.COMPLETE, verified_at__isnull=False)
                  .select_related("remote").order_by("-verified_at", "pk"))
    return sorted(copies, key=lambda c: c.storage_class.upper() in COLD_CLASSES)


def open_readable(archive: Archive, *, actor=WORKER, purpose: str = "restore", label: str = "",
                  repo: LocalRepository | None = None) -> Located:
    """The local archive when it is sound; else a verified fetch of its first readable copy into
    BANKVAULT_SCRATCH_DIR (call cleanup() when done). Every file of a local archive is re-hashed
    here only when a copy exists to fall back to; otherwise the restore's own check reports it."""
    repo = repo or default_repository()
    label = label or f"archive {archive.pk} ({archive.path})"
    directory = repo.archive_dir(archive.path)
    copies = readable_copies(archive)
    problem = local_problem(archive, directory, deep=bool(copies))
    if not problem:
        return Located(directory, label)
    if not copies:
        if not directory.is_dir():
            raise OffsiteError(f"{label}: {problem}, and it has no complete off-site copy to read instead")
        return Located(directory, label, local_problem=problem)
    errors = []
    for copy in copies:
        dest = Path(settings.BANKVAULT_SCRATCH_DIR) / f"offsite-{archive.pk}-{secrets.token_hex(4)}"
        started = time.monotonic()
        try:
            fetch_archive(archive, copy, dest)
        except OffsiteError as exc:
            errors.append(f"{copy.remote.name}: {exc.message}")
            if isinstance(exc, CopyDamaged):
                _fail(copy, actor, exc.message, action="archive.copy.verify_failed", purpose=purpose)
            else:
                audit.record(actor, "archive.copy.fetched", copy, outcome="failure",
                             details=_details(copy, purpose=purpose, reason=problem, error=exc.message))
            continue
        audit.record(actor, "archive.copy.fetched", copy,
                     details=_details(copy, purpose=purpose, reason=problem, bytes=archive.bytes,
                                      seconds=round(time.monotonic() - started, 3)))
        return Located(dest, f"{label} from its off-site copy in {copy.remote.name}", copy, problem, True)
    raise OffsiteError(f"{label}: {problem}, and no off-site copy could be read: " + "; ".join(errors))


@contextlib.contextmanager
def readable(archive: Archive, **kwargs) -> Iterator[Located]:
    located = open_readable(archive, **kwargs)
    try:
        yield located
    finally:
        located.cleanup()


# -- deleting ---------------------------------------------------------------------------------------
def delete_copy(copy: ArchiveCopy, actor) -> ArchiveCopy:
    """Remove a copy's objects (manifest first) and mark it DELETED. Refused under legal hold."""
    copy = ArchiveCopy.objects.select_related("archive__database", "remote").get(pk=copy.pk)
    if copy.archive.legal_hold:
        audit.record(actor, "archive.copy.delete_denied", copy, outcome="denied",
                     details=_details(copy, reason="legal hold"))
        raise OffsiteError(f"archive {copy.archive_id} is under legal hold; its copies are not deleted")
    if copy.state == ArchiveCopy.State.DELETED:
        return copy
    try:
        removed = S3Repository(copy.remote).delete_tree(copy.archive.path)
    except OffsiteError as exc:
        with transaction.atomic():
            copy.error = f"delete failed: {exc.message}"
            copy.save(update_fields=["error"])
            audit.record(actor, "archive.copy.delete_failed", copy, outcome="failure",
                         details=_details(copy, error=exc.message))
        raise
    with transaction.atomic():
        copy.state = ArchiveCopy.State.DELETED
        copy.error = ""
        copy.save(update_fields=["state", "error"])
        audit.record(actor, "archive.copy.deleted", copy, details=_details(copy, objects=removed))
    return copy


def expire_copies(archive: Archive, actor="system:retention") -> dict:
    """Retention expired ``archive``: delete all its remote copies. A copy that cannot be
    deleted now keeps its state and an error, and is retried by maintenance(). Raises
    OffsiteError for an archive under legal hold."""
    if archive.legal_hold:
        raise OffsiteError(f"archive {archive.pk} is under legal hold; its copies are not deleted")
    result = {"deleted": [], "failed": {}}
    for copy in archive.copies.exclude(state=ArchiveCopy.State.DELETED).select_related("remote"):
        try:
            delete_copy(copy, actor)
            result["deleted"].append(copy.remote.name)
        except OffsiteError as exc:
            result["failed"][copy.remote.name] = exc.message
    return result


# -- lifecycle and maintenance ----------------------------------------------------------------------
def apply_lifecycle(actor="system:beat", now=None) -> dict:
    """Move complete copies older than their remote's archive_after_days to its
    archive_storage_class (a server-side copy of each object onto itself)."""
    now = now or timezone.now()
    moved, failed = 0, {}
    remotes = RemoteRepository.objects.filter(enabled=True, archive_after_days__isnull=False) \
        .exclude(archive_storage_class="")
    for remote in remotes:
        s3 = S3Repository(remote)
        due = remote.copies.filter(state=ArchiveCopy.State.COMPLETE,
                                   archive__finished_at__lte=now - timedelta(days=remote.archive_after_days)) \
            .exclude(storage_class=remote.archive_storage_class).select_related("archive__database")
        for copy in due:
            archive = copy.archive
            try:
                for f in _catalog_files(archive):
                    got = s3.set_storage_class(f"{archive.path}/{f['path']}", remote.archive_storage_class,
                                               f["sha256"])
                got = s3.set_storage_class(f"{archive.path}/{manifest.NAME}", remote.archive_storage_class,
                                           archive.manifest_sha256)
            except OffsiteError as exc:
                failed[f"{archive.pk}@{remote.name}"] = exc.message
                audit.record(actor, "archive.copy.transition_failed", copy, outcome="failure",
                             details=_details(copy, error=exc.message, storage_class=remote.archive_storage_class))
                continue
            with transaction.atomic():
                before = copy.storage_class or "default"
                copy.storage_class = remote.archive_storage_class
                copy.save(update_fields=["storage_class"])
                audit.record(actor, "archive.copy.transitioned", copy,
                             details=_details(copy, storage_class=[before, remote.archive_storage_class],
                                              reported=got))
            moved += 1
    return {"transitioned": moved, "failed": failed}


def maintenance(actor="system:beat") -> dict:
    """Daily: the lifecycle, and copies of expired archives that could not be deleted before."""
    result = apply_lifecycle(actor)
    retried = 0
    leftovers = ArchiveCopy.objects.filter(archive__state=Archive.State.EXPIRED, archive__legal_hold=False) \
        .exclude(state=ArchiveCopy.State.DELETED).select_related("remote", "archive__database")
    for copy in leftovers:
        with contextlib.suppress(OffsiteError):
            delete_copy(copy, actor)
            retried += 1
    result["expired_copies_deleted"] = retried
    return result


# -- configuration and dispatch ---------------------------------------------------------------------
def probe_remote(remote: RemoteRepository, actor, request=None) -> dict:
    """A listing of the bucket plus a small put/get/delete; audited either way (remote.tested)."""
    try:
        info = S3Repository(remote).probe()
    except OffsiteError as exc:
        audit.record(actor, "remote.tested", remote, outcome="failure",
                     details={"remote": remote.name, "error": exc.message}, request=request)
        raise
    audit.record(actor, "remote.tested", remote, details=info, request=request)
    return info


def enqueue_copies(run, archive: Archive) -> list[str]:
    """After a successful run: one copy task per enabled remote of the run's policy, sent when
    the transaction commits. Never fails the backup: a copy that cannot be queued is recorded
    as a failed copy with what to do."""
    try:
        if run.policy_id is None:
            return []
        remotes = list(run.policy.copy_to.filter(enabled=True))
        for remote in remotes:
            transaction.on_commit(functools.partial(_dispatch, archive.pk, remote.pk))
        return [r.name for r in remotes]
    except Exception:
        log.exception("could not queue the off-site copies of archive %s", archive.pk)
        return []


def _dispatch(archive_id: int, remote_id: int) -> None:
    from .tasks import copy_offsite

    try:
        copy_offsite.apply_async((archive_id, remote_id), retry=True,
                                 retry_policy={"max_retries": 2, "interval_start": 0.5})
    except Exception as exc:
        log.error("could not queue the copy of archive %s to remote %s: %s", archive_id, remote_id, exc)
        with contextlib.suppress(Exception):
            archive = Archive.objects.select_related("database").get(pk=archive_id)
            remote = RemoteRepository.objects.get(pk=remote_id)
            with transaction.atomic():
                copy, _ = ArchiveCopy.objects.get_or_create(archive=archive, remote=remote)
                if copy.state != ArchiveCopy.State.COMPLETE:
                    _fail(copy, WORKER, f"the copy could not be queued ({exc.__class__.__name__}); run "
                                        f"`manage.py archives copy {archive_id} --to {remote.name}`")


def copies_summary(copies) -> list[dict]:
    return [{"id": c.pk, "archive": c.archive_id, "path": c.archive.path, "remote": c.remote.name,
             "state": c.state, "bytes": c.bytes, "storage_class": c.storage_class,
             "started_at": c.started_at.isoformat() if c.started_at else None,
             "finished_at": c.finished_at.isoformat() if c.finished_at else None,
             "verified_at": c.verified_at.isoformat() if c.verified_at else None, "error": c.error}
            for c in copies]


__all__ = ["OffsiteError", "Unreachable", "CopyDamaged", "CopyInProgress", "S3Repository", "copy_archive",
           "verify_copy", "fetch_archive", "open_readable", "readable", "delete_copy", "expire_copies",
           "apply_lifecycle", "maintenance", "probe_remote", "enqueue_copies"]
