"""/api/v1/ (included from bankvault/urls.py). See recovery/api.py and the README's "HTTP API"."""

from django.urls import path, re_path
from drf_spectacular.views import SpectacularAPIView
from rest_framework.permissions import IsAuthenticated

from . import api

app_name = "api"
urlpatterns = [
    path("restore-requests/", api.restore_requests, name="restore-requests"),
    path("restore-requests/<int:pk>/", api.restore_request_detail, name="restore-request"),
    path("restore-requests/<int:pk>/approve/", api.approve, name="approve"),
    path("restore-requests/<int:pk>/reject/", api.reject, name="reject"),
    path("restore-requests/<int:pk>/cancel/", api.cancel, name="cancel"),
    path("databases/", api.databases, name="databases"),
    path("archives/", api.archives, name="archives"),
    # The schema holds no secrets, but it maps the API for whoever asks: signed-in users only.
    path("schema/", SpectacularAPIView.as_view(permission_classes=[IsAuthenticated]), name="schema"),
    re_path(r"^(?P<rest>.*)$", api.not_found),
]
