"""Restore requests in the admin: visible, never editable. State changes only happen through
the request's transition methods, which ask recovery.rules; no admin form, list edit or
action can set the state."""

from django.contrib import admin

from .models import Approval, RestoreRequest


class ReadOnly:
    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class ApprovalInline(ReadOnly, admin.TabularInline):
    model = Approval
    fields = ("user", "decision", "digest", "comment", "source_ip", "created_at")
    readonly_fields = fields
    extra = 0


@admin.register(RestoreRequest)
class RestoreRequestAdmin(ReadOnly, admin.ModelAdmin):
    list_display = ("id", "kind", "mode", "database", "requester", "state", "created_at", "finished_at")
    list_filter = ("state", "kind", "mode")
    search_fields = ("reason", "change_ticket", "requester__username")
    inlines = [ApprovalInline]
    actions = None  # no bulk actions at all, not even delete

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in self.model._meta.fields]


@admin.register(Approval)
class ApprovalAdmin(ReadOnly, admin.ModelAdmin):
    list_display = ("request", "user", "decision", "created_at")
    list_filter = ("decision",)
    actions = None
