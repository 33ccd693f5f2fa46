"""The auditor's pages, included by bankvault/urls.py under /audit/."""

from django.urls import path

from . import views

app_name = "audit"
urlpatterns = [
    path("", views.audit_log, name="log"),
    path("export.csv", views.audit_export_csv, name="export_csv"),
    path("export.jsonl", views.audit_export_jsonl, name="export_jsonl"),
    path("report/", views.audit_report, name="report"),
]
