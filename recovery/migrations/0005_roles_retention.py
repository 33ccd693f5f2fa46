"""Operators place legal holds; everyone who reads the catalog sees keys, remotes and copies."""

import importlib

from django.db import migrations

roles = importlib.import_module("recovery.migrations.0002_roles")


class Migration(migrations.Migration):
    dependencies = [
        ("recovery", "0004_roles_download"),
        ("backups", "0006_encryption_retention_offsite"),
    ]
    operations = [migrations.RunPython(roles.create_roles, migrations.RunPython.noop)]
