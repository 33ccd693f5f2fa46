from django.urls import path

from . import dashboard, retention_views

app_name = "dashboard"
urlpatterns = [
    path("", dashboard.overview, name="overview"),
    path("databases/<str:name>/", dashboard.database_detail, name="database"),
    path("databases/<str:name>/backup/", dashboard.backup_now, name="backup"),
    path("runs/", dashboard.runs, name="runs"),
    path("runs/<int:pk>/", dashboard.run_detail, name="run"),
    path("runs/<int:pk>/progress/", dashboard.run_progress, name="run-progress"),
    path("archives/", dashboard.archives, name="archives"),
    path("archives/<int:pk>/", dashboard.archive_detail, name="archive"),
    path("archives/<int:pk>/verify/", dashboard.archive_verify, name="archive-verify"),
    path("archives/<int:pk>/files/<path:name>", dashboard.archive_download, name="archive-download"),
    path("archives/<int:pk>/hold/", retention_views.archive_hold, name="archive-hold"),
    path("archives/<int:pk>/release/", retention_views.archive_release, name="archive-release"),
    path("retention/", retention_views.retention_plan, name="retention"),
    path("drills/<int:pk>/", dashboard.drill_detail, name="drill"),
    path("drills/<int:pk>/progress/", dashboard.drill_progress, name="drill-progress"),
    path("health/", dashboard.health_history, name="health"),
]
