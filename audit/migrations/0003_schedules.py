"""Beat entries: an hourly checkpoint of the chain head, a daily verification of the chain."""

from django.db import migrations


def create(apps, schema_editor):
    CrontabSchedule = apps.get_model("django_celery_beat", "CrontabSchedule")
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    hourly, _ = CrontabSchedule.objects.get_or_create(minute="7", hour="*", day_of_week="*", day_of_month="*",
                                                      month_of_year="*")
    daily, _ = CrontabSchedule.objects.get_or_create(minute="30", hour="4", day_of_week="*", day_of_month="*",
                                                     month_of_year="*")
    PeriodicTask.objects.get_or_create(name="bankvault: audit checkpoint",
                                       defaults={"task": "audit.tasks.write_checkpoint", "crontab": hourly,
                                                 "expire_seconds": 1800})
    PeriodicTask.objects.get_or_create(name="bankvault: audit chain verification",
                                       defaults={"task": "audit.tasks.verify_chain", "crontab": daily,
                                                 "expire_seconds": 6 * 3600})


def remove(apps, schema_editor):
    apps.get_model("django_celery_beat", "PeriodicTask").objects.filter(
        name__in=["bankvault: audit checkpoint", "bankvault: audit chain verification"]).delete()


class Migration(migrations.Migration):
    dependencies = [("audit", "0002_append_only"), ("django_celery_beat", "0019_alter_periodictasks_options")]
    operations = [migrations.RunPython(create, remove)]
