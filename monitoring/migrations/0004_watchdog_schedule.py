"""The watchdog as a beat entry: every 30 seconds it looks for jobs whose worker is gone."""

from django.db import migrations

NAME = "bankvault: watchdog"


def create(apps, schema_editor):
    IntervalSchedule = apps.get_model("django_celery_beat", "IntervalSchedule")
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    every, _ = IntervalSchedule.objects.get_or_create(every=30, period="seconds")
    PeriodicTask.objects.get_or_create(
        name=NAME,
        defaults={"task": "monitoring.tasks.watchdog", "interval": every, "expire_seconds": 25,
                  "description": "Fails jobs whose worker died (no heartbeat), queues again runs whose message "
                                 "was lost, and alerts on failed runs."},
    )


def remove(apps, schema_editor):
    apps.get_model("django_celery_beat", "PeriodicTask").objects.filter(name=NAME).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("monitoring", "0003_heartbeats"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]
    operations = [migrations.RunPython(create, remove)]
