"""Expire restore requests past their TTL / execution window every five minutes."""

from django.db import migrations


def create(apps, schema_editor):
    IntervalSchedule = apps.get_model("django_celery_beat", "IntervalSchedule")
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    every, _ = IntervalSchedule.objects.get_or_create(every=5, period="minutes")
    PeriodicTask.objects.get_or_create(
        name="bankvault: expire restore requests",
        defaults={"task": "recovery.tasks.expire_requests", "interval": every, "expire_seconds": 240})


def remove(apps, schema_editor):
    apps.get_model("django_celery_beat", "PeriodicTask").objects.filter(
        name="bankvault: expire restore requests").delete()


class Migration(migrations.Migration):
    dependencies = [("recovery", "0002_roles")]
    operations = [migrations.RunPython(create, remove)]
