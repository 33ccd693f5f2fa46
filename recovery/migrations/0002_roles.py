"""The roles: operator, approver and auditor groups with their permissions.

- operator: registers databases and policies, starts backups, verifies and downloads archives,
  places and lifts legal holds, requests restores
- approver: approves or rejects restore requests, reads what it needs to judge them
- auditor:  reads everything, changes nothing (exports arrive with the audit reports)
Superusers configure; their status gives no way around the two-person rule (recovery.rules).

ROLES is the one definition of the roles. A change to it comes with a migration that runs
create_roles again (0004_roles_download, 0005_roles_retention are), so existing installations get it too.
"""

from django.db import migrations

READ_MODELS = {
    "backups": ["database", "backuppolicy", "backuprun", "archive", "archivefile", "waltimeline", "encryptionkey",
                "remoterepository", "archivecopy"],
    "recovery": ["restorerequest", "approval"],
    "audit": ["auditevent"],
    "django_celery_beat": ["periodictask", "crontabschedule", "intervalschedule"],
}
ROLES = {
    "operator": {
        "backups": ["add_database", "change_database", "add_backuppolicy", "change_backuppolicy",
                    "run_backup", "check_database", "verify_archive", "download_archive", "set_legal_hold"],
        "recovery": ["request_restore"],
    },
    "approver": {"recovery": ["approve_restore"]},
    "auditor": {},
}
VIEW_FOR = {
    "operator": ["backups", "recovery", "django_celery_beat"],
    "approver": ["backups", "recovery"],
    "auditor": ["backups", "recovery", "audit", "django_celery_beat"],
}


def assign(Group, Permission):
    """Create the groups and give them their permissions (used with historical or real models)."""
    for role, grants in ROLES.items():
        group, _ = Group.objects.get_or_create(name=role)
        wanted = []
        for app_label in VIEW_FOR[role]:
            wanted += [(app_label, f"view_{m}") for m in READ_MODELS[app_label]]
        for app_label, codenames in grants.items():
            wanted += [(app_label, c) for c in codenames]
        perms = []
        for app_label, codename in wanted:
            perm = Permission.objects.filter(content_type__app_label=app_label, codename=codename).first()
            if perm is None:
                raise RuntimeError(f"permission {app_label}.{codename} does not exist")
            perms.append(perm)
        group.permissions.set(perms)


def create_roles(apps, schema_editor):
    from django.contrib.auth.management import create_permissions

    # Permissions are normally created after all migrations; the roles need them now.
    for config in apps.get_app_configs():
        config.models_module = True
        create_permissions(config, apps=apps, verbosity=0)
        config.models_module = None
    assign(apps.get_model("auth", "Group"), apps.get_model("auth", "Permission"))


def remove_roles(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name__in=list(ROLES)).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("recovery", "0001_initial"),
        ("backups", "0002_hourly_wal_check"),
        ("audit", "0001_initial"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
        ("auth", "0012_alter_user_first_name_max_length"),
    ]
    operations = [migrations.RunPython(create_roles, remove_roles)]
