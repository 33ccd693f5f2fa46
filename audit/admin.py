from django.contrib import admin

from .models import AuditEvent


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    """Read-only: the trail is written by the application, never edited."""

    list_display = ("created_at", "actor_label", "action", "outcome", "target_type", "target_label")
    list_filter = ("outcome", "action")
    search_fields = ("actor_label", "action", "target_label")
    date_hierarchy = "created_at"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
