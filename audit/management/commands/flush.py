"""Django's flush, which the audit table's append-only triggers refuse — as they must.

Only the test suite (BANKVAULT_ENV=test) may empty it between transactional tests, and only as
a database superuser: with session_replication_role = replica ordinary triggers do not fire, the
same power any superuser has over any trigger (and which `audit verify` would detect on a real
trail). Everywhere else this command is Django's own, and fails on the audit table."""

from django.conf import settings
from django.core.management.commands.flush import Command as FlushCommand
from django.db import connections


class Command(FlushCommand):
    def handle(self, **options):
        if settings.BANKVAULT_ENV != "test":
            return super().handle(**options)
        conn = connections[options.get("database") or "default"]
        with conn.cursor() as cur:
            cur.execute("SET session_replication_role = replica")
        try:
            return super().handle(**options)
        finally:
            with conn.cursor() as cur:
                cur.execute("SET session_replication_role = origin")
