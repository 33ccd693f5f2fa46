"""System checks for what backups depend on (`manage.py check`)."""

import os

from django.conf import settings
from django.core.checks import Error, Warning, register

from .engine import pgbin


@register()
def pg_tools(app_configs, **kwargs):
    try:
        found = pgbin.installed(configured=settings.BANKVAULT_PG_BINDIR or None)
    except pgbin.BinaryNotFound as exc:
        return [Error(str(exc), id="backups.E001")]
    if not found:
        return [Error("no PostgreSQL client tools (pg_dump) found",
                      hint="apt-get install postgresql-client-15, or set BANKVAULT_PG_BINDIR",
                      id="backups.E001")]
    missing = [t for t in ("pg_dump", "pg_dumpall", "pg_restore") if not (found[0].bindir / t).exists()]
    if missing:
        return [Error(f"{found[0].bindir} lacks {', '.join(missing)}", id="backups.E002")]
    return []


@register()
def repository_writable(app_configs, **kwargs):
    root = settings.BANKVAULT_REPOSITORY
    probe = root if root.exists() else root.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        return [Warning(f"the backup repository {root} is not writable by this process",
                        hint="fix its owner/permissions or set BANKVAULT_REPOSITORY",
                        id="backups.W001")]
    return []
