"""Remote repositories (S3-compatible object storage) for off-site copies.

    manage.py remotes add NAME --endpoint URL --bucket B [--prefix P] [--region R]
                          --access-key-id ID --secret-key-env VAR [--storage-class SC]
                          [--archive-after-days N --archive-storage-class SC] [--no-verify-tls] [--disabled]
    manage.py remotes list [--json]
    manage.py remotes test NAME          head the bucket, then put, read back and delete a small object
    manage.py remotes maintenance        lifecycle (archive storage class) and leftover deletions, now

The secret key is read from the named environment variable, never from argv (which any user on
the host can read in /proc). `add` on an existing name updates it (keeping the secret key unless
--secret-key-env is given). The trail names the actor cli:<OS user>."""

import json
import os

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

import audit
from backups import offsite
from backups.models import RemoteRepository


class Command(BaseCommand):
    help = "Register, list and test remote repositories for off-site copies."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        add = sub.add_parser("add", help="register a remote repository (or update one with the same name)")
        add.add_argument("name")
        add.add_argument("--endpoint", default="", metavar="URL", help="S3 endpoint URL; empty = AWS")
        add.add_argument("--bucket", required=True)
        add.add_argument("--prefix", default="", help="key prefix inside the bucket, e.g. bankvault/")
        add.add_argument("--region", default="")
        add.add_argument("--access-key-id", required=True, metavar="ID")
        add.add_argument("--secret-key-env", metavar="VAR",
                         help="name of the environment variable holding the secret key (required for a new remote)")
        add.add_argument("--storage-class", default="", metavar="SC", help="e.g. STANDARD_IA; empty = the bucket's")
        add.add_argument("--archive-after-days", type=int, metavar="N",
                         help="move copies older than N days to --archive-storage-class")
        add.add_argument("--archive-storage-class", default="", metavar="SC")
        add.add_argument("--no-verify-tls", action="store_true", help="do not verify the endpoint's certificate")
        add.add_argument("--disabled", action="store_true", help="register it, but copy nothing there yet")
        lst = sub.add_parser("list", help="list remote repositories")
        lst.add_argument("--json", action="store_true")
        test = sub.add_parser("test", help="check the bucket with a small put/get/delete")
        test.add_argument("name")
        sub.add_parser("maintenance", help="apply the lifecycle and retry deletions of expired copies now")

    def handle(self, *args, action, **opts):
        return getattr(self, f"do_{action}")(**opts)

    def do_add(self, name, endpoint, bucket, prefix, region, access_key_id, secret_key_env, storage_class,
               archive_after_days, archive_storage_class, no_verify_tls, disabled, **_):
        secret = ""
        if secret_key_env:
            if secret_key_env not in os.environ:
                raise CommandError(f"environment variable {secret_key_env} is not set")
            secret = os.environ[secret_key_env]
            if not secret:
                raise CommandError(f"environment variable {secret_key_env} is empty")
        remote = RemoteRepository.objects.filter(name=name).first()
        created = remote is None
        if created and not secret:
            raise CommandError("a new remote needs its secret key: --secret-key-env VAR")
        if archive_after_days is not None and not archive_storage_class:
            raise CommandError("--archive-after-days needs --archive-storage-class")
        before = None if created else remote.audit_fields()
        remote = remote or RemoteRepository(name=name)
        remote.endpoint_url, remote.bucket, remote.prefix, remote.region = endpoint, bucket, prefix, region
        remote.access_key_id, remote.storage_class = access_key_id, storage_class
        remote.archive_after_days, remote.archive_storage_class = archive_after_days, archive_storage_class
        remote.verify_tls, remote.enabled = not no_verify_tls, not disabled
        if secret:
            remote.set_secret_key(secret)
        try:
            remote.full_clean()
        except ValidationError as exc:
            raise CommandError("; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())) from None
        with transaction.atomic():
            remote.save()
            audit.record(audit.cli_actor(), f"config.remote.{'created' if created else 'changed'}", remote,
                         details={"changes": audit.diff(before, remote.audit_fields())})
        self.stdout.write(f"remote {name} {'registered' if created else 'updated'} "
                          f"(bucket {bucket} at {endpoint or 'AWS S3'}); test it with: manage.py remotes test {name}")

    def do_list(self, json=False, **_):
        rows = [{"name": r.name, "kind": r.kind, "endpoint_url": r.endpoint_url, "region": r.region,
                 "bucket": r.bucket, "prefix": r.prefix, "storage_class": r.storage_class,
                 "archive_after_days": r.archive_after_days, "archive_storage_class": r.archive_storage_class,
                 "verify_tls": r.verify_tls, "enabled": r.enabled,
                 "complete_copies": r.copies.filter(state="complete").count()}
                for r in RemoteRepository.objects.all()]
        if json:
            self.stdout.write(_dumps(rows))
            return
        if not rows:
            self.stdout.write("no remote repositories")
        for r in rows:
            self.stdout.write(f"{r['name']:<14} {'enabled ' if r['enabled'] else 'DISABLED'} "
                              f"{r['endpoint_url'] or 'AWS S3'}  {r['bucket']}/{r['prefix']}  "
                              f"{r['complete_copies']} complete copies")

    def do_test(self, name, **_):
        remote = RemoteRepository.objects.filter(name=name).first()
        if remote is None:
            raise CommandError(f"no remote repository named {name}")
        try:
            info = offsite.probe_remote(remote, audit.cli_actor())
        except offsite.OffsiteError as exc:
            raise CommandError(f"remote {name}: {exc.message}") from None
        self.stdout.write(f"remote {name}: OK — bucket {remote.bucket} answers; a test object was written, read "
                          f"back and deleted in {info['seconds']:.2f} s")

    def do_maintenance(self, **_):
        result = offsite.maintenance(audit.cli_actor())
        self.stdout.write(f"{result['transitioned']} copies moved to their archive storage class, "
                          f"{result['expired_copies_deleted']} copies of expired archives deleted")
        for where, error in result["failed"].items():
            self.stderr.write(f"{where}: {error}")
        if result["failed"]:
            raise CommandError("some copies could not be moved (see above)")


def _dumps(value) -> str:
    return json.dumps(value, indent=2)
