"""Operators may download archive files (backups.download_archive): apply the roles again."""

import importlib

from django.db import migrations

roles = importlib.import_module("recovery.migrations.0002_roles")


class Migration(migrations.Migration):
    dependencies = [
        ("recovery", "0003_expiry_schedule"),
        ("backups", "0005_archive_download_permission"),
    ]
    operations = [migrations.RunPython(roles.create_roles, migrations.RunPython.noop)]
