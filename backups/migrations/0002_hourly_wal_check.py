"""The hourly WAL archiving check as a beat entry (editable in the admin)."""

from django.db import migrations


def create(apps, schema_editor):
    IntervalSchedule = apps.get_model("django_celery_beat", "IntervalSchedule")
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    every_hour, _ = IntervalSchedule.objects.get_or_create(every=1, period="hours")
    PeriodicTask.objects.get_or_create(
        name="bankvault: hourly WAL archiving check",
        defaults={"task": "backups.tasks.check_wal_archiving", "interval": every_hour, "expire_seconds": 1800,
                  "description": "Forces a WAL switch on every archiving database and confirms the segment "
                                 "reaches the repository."},
    )


def remove(apps, schema_editor):
    apps.get_model("django_celery_beat", "PeriodicTask").objects.filter(
        name="bankvault: hourly WAL archiving check").delete()


class Migration(migrations.Migration):
    dependencies = [
        ("backups", "0001_initial"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]
    operations = [migrations.RunPython(create, remove)]
