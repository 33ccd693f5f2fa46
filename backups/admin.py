from django import forms
from django.contrib import admin, messages
from django.db.models import OuterRef, Subquery
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe
from django.utils.timesince import timesince

import audit

from . import offsite, services
from .engine import gpg, runner, wal
from .engine.pgtools import BackupError
from .forms import DatabaseForm
from .models import (
    Archive,
    ArchiveCopy,
    ArchiveFile,
    BackupKind,
    BackupPolicy,
    BackupRun,
    Database,
    EncryptionKey,
    RemoteRepository,
    WalMode,
    WalTimeline,
)
from .probe import describe_tls, probe


class AuditedAdmin(admin.ModelAdmin):
    """Records every add, change and delete with the fields before and after."""

    audit_name = ""

    def save_model(self, request, obj, form, change):
        before = None
        if change:
            before = type(obj).objects.get(pk=obj.pk).audit_fields()
        super().save_model(request, obj, form, change)
        after = obj.audit_fields()
        audit.record(request.user, f"config.{self.audit_name}.{'changed' if change else 'created'}", obj,
                     details={"changes": audit.diff(before, after)}, request=request)

    def delete_model(self, request, obj):
        before = obj.audit_fields()
        label = (obj._meta.label_lower, obj.pk, str(obj))
        super().delete_model(request, obj)
        audit.record(request.user, f"config.{self.audit_name}.deleted", label,
                     details={"changes": audit.diff(before, None)}, request=request)

    def delete_queryset(self, request, queryset):
        for obj in queryset:
            self.delete_model(request, obj)


class WalTimelineInline(admin.TabularInline):
    model = WalTimeline
    fields = ("timeline", "first_segment", "last_segment", "segment_count", "gap_list", "last_archived_at",
              "parent_timeline", "branch_lsn", "scanned_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    verbose_name_plural = "WAL in the repository (per timeline)"

    @admin.display(description="gaps")
    def gap_list(self, obj):
        return ", ".join(f"{a}..{b}" for a, b in obj.gaps) or "none"

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Database)
class DatabaseAdmin(AuditedAdmin):
    audit_name = "database"
    form = DatabaseForm
    list_display = ("name", "host", "port", "dbname", "user", "sslmode", "wal_mode", "needs_credentials",
                    "last_backup")
    list_filter = ("wal_mode", "needs_credentials")
    search_fields = ("name", "host", "dbname")
    actions = ["back_up_now", "back_up_base_now", "check_connection"]
    inlines = [WalTimelineInline]
    readonly_fields = ("needs_credentials", "restore_points", "system_identifier", "wal_segment_size")

    def get_inlines(self, request, obj):
        return self.inlines if obj is not None else []  # a new database has no WAL yet

    def get_fields(self, request, obj=None):
        fields = list(super().get_fields(request, obj))
        return fields if obj else [f for f in fields if f not in self.readonly_fields]

    def change_view(self, request, object_id, form_url="", extra_context=None):
        # The WAL catalog is rebuilt from the repository before the page reads it.
        db = self.get_object(request, object_id)
        if db is not None:
            try:
                wal.refresh_catalog(db)
            except OSError as exc:
                self.message_user(request, f"cannot read the WAL area of {db}: {exc}", messages.WARNING)
        return super().change_view(request, object_id, form_url, extra_context)

    @admin.display(description="restore points available")
    def restore_points(self, obj):
        if obj.pk is None:
            return ""
        try:
            windows = wal.restore_windows(obj)
        except OSError as exc:
            return f"cannot read the WAL area: {exc}"
        if not windows:
            return "no point in time (no complete base backup with its WAL)"
        lines = []
        for w in windows:
            start = timezone.localtime(w["from"]).strftime("%Y-%m-%d %H:%M:%S")
            until = timezone.localtime(max(w["until"], w["from"])).strftime("%Y-%m-%d %H:%M:%S")
            gap = f" — gap after {w['gap_after']}" if w["gap_after"] else ""
            lines.append(f"{start} to {until}, and latest (timeline {w['timeline']}){gap}")
        return format_html_join(mark_safe("<br>"), "{}", ((line,) for line in lines))

    @admin.action(description="Base backup now (for point-in-time recovery)", permissions=["run_backup"])
    def back_up_base_now(self, request, queryset):
        for db in queryset:
            if db.wal_mode == WalMode.NONE:
                self.message_user(request, f"{db}: no WAL archiving set up; a base backup could not be restored.",
                                  messages.ERROR)
                continue
            run = services.start_backup(db, user=request.user, kind=BackupKind.BASE)
            self.message_user(request, f"Base backup of {db} queued (run {run.pk}).", messages.SUCCESS)

    def get_queryset(self, request):
        last = BackupRun.objects.filter(database=OuterRef("pk")).order_by("-queued_at")
        return super().get_queryset(request).annotate(
            last_state=Subquery(last.values("state")[:1]),
            last_finished=Subquery(last.values("finished_at")[:1]),
        )

    @admin.display(description="last backup")
    def last_backup(self, obj):
        if not obj.last_state:
            return "never"
        age = f", {timesince(obj.last_finished)} ago" if obj.last_finished else ""
        return format_html("<span class='bv-state bv-{}'>{}</span>{}", obj.last_state, obj.last_state, age)

    @admin.action(description="Back up now", permissions=["run_backup"])
    def back_up_now(self, request, queryset):
        for db in queryset:
            run = services.start_backup(db, user=request.user)
            self.message_user(request, f"Backup of {db} queued (run {run.pk}).", messages.SUCCESS)

    @admin.action(description="Check connection", permissions=["check_database"])
    def check_connection(self, request, queryset):
        for db in queryset:
            try:
                info = probe(db)
            except BackupError as exc:
                audit.record(request.user, "database.checked", db, outcome="failure",
                             details={"error": exc.message}, request=request)
                self.message_user(request, f"{db}: {exc.message}", messages.ERROR)
            else:
                audit.record(request.user, "database.checked", db, details=info, request=request)
                self.message_user(request, f"{db}: PostgreSQL {info['server_version']}, "
                                  f"{info['size_pretty']}; {describe_tls(info['tls'])}",
                                  messages.SUCCESS if info["tls"]["in_use"] else messages.WARNING)

    def has_run_backup_permission(self, request):
        return request.user.has_perm("backups.run_backup")

    def has_check_database_permission(self, request):
        return request.user.has_perm("backups.check_database")


@admin.register(BackupPolicy)
class BackupPolicyAdmin(AuditedAdmin):
    audit_name = "policy"
    list_display = ("__str__", "kind", "schedule", "compression", "artifact_list", "enabled")
    list_filter = ("enabled", "kind", "compression", "database")
    actions = ["run_now"]
    filter_horizontal = ("copy_to", "encrypt_to")

    @admin.display(description="artifacts")
    def artifact_list(self, obj):
        return ", ".join(obj.artifacts)

    def save_related(self, request, form, formsets, change):
        # Many-to-many fields are saved after save_model (and its audit event): audit them here.
        policy = form.instance
        before = sorted(policy.encrypt_to.values_list("fingerprint", flat=True)) if change else []
        super().save_related(request, form, formsets, change)
        after = sorted(policy.encrypt_to.values_list("fingerprint", flat=True))
        if before != after:
            audit.record(request.user, "config.policy.changed", policy,
                         details={"changes": {"encrypt_to": [before, after]}}, request=request)

    @admin.action(description="Run now", permissions=["run_backup"])
    def run_now(self, request, queryset):
        for policy in queryset.select_related("database"):
            run = services.start_backup(policy.database, user=request.user, policy=policy)
            self.message_user(request, f"Backup of {policy} queued (run {run.pk}).", messages.SUCCESS)

    def has_run_backup_permission(self, request):
        return request.user.has_perm("backups.run_backup")


class EncryptionKeyForm(forms.ModelForm):
    """An operator pastes the public key; its fingerprint, owner and expiry are read from the key
    itself, never typed."""

    class Meta:
        model = EncryptionKey
        fields = ["public_key", "comment"]
        widgets = {"public_key": forms.Textarea(attrs={"rows": 14, "cols": 80, "spellcheck": "false"})}

    def clean_public_key(self):
        text = self.cleaned_data["public_key"].strip() + "\n"
        try:
            info = gpg.validate_public_key(text)
        except gpg.GpgError as exc:
            raise forms.ValidationError(exc.message) from None
        if self.instance.pk and info.fingerprint != self.instance.fingerprint:
            raise forms.ValidationError(
                f"this is a different key ({info.fingerprint}); archives name their keys by fingerprint, so add it "
                "as a new key instead of replacing this one")
        if not self.instance.pk and EncryptionKey.objects.filter(fingerprint=info.fingerprint).exists():
            raise forms.ValidationError(f"key {info.fingerprint} is already imported; open it to update it")
        self.key_info = info
        return text

    def save(self, commit=True):
        key = super().save(commit=False)
        info = self.key_info
        key.fingerprint, key.owner, key.expires_at = info.fingerprint, info.owner[:255], info.expires_at
        if commit:
            key.save()
        return key


@admin.register(EncryptionKey)
class EncryptionKeyAdmin(AuditedAdmin):
    audit_name = "encryption_key"
    form = EncryptionKeyForm
    list_display = ("owner", "fingerprint", "expires_at", "used_by")
    search_fields = ("owner", "fingerprint", "comment")
    readonly_fields = ("fingerprint", "owner", "expires_at", "used_by", "created_at")

    def get_fields(self, request, obj=None):
        return ["public_key", "comment"] + (list(self.readonly_fields) if obj else [])

    @admin.display(description="policies")
    def used_by(self, obj):
        return ", ".join(str(p) for p in obj.policies.select_related("database")) or "none"

    def has_delete_permission(self, request, obj=None):
        # A key still named by a policy is not deleted from under it: that would silently stop
        # the policy's encryption. (Archives keep their fingerprints; decryption needs only the
        # workers' private key.)
        if obj is not None and obj.policies.exists():
            return False
        return super().has_delete_permission(request, obj)

    def get_actions(self, request):
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # one at a time, through the check above
        return actions


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows written by the engine: viewable, never edited by hand."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(BackupRun)
class BackupRunAdmin(ReadOnlyAdmin):
    list_display = ("id", "database", "kind", "trigger", "state", "queued_at", "duration_text", "size", "error")
    list_filter = ("state", "trigger", "kind", "database")
    list_select_related = ("database",)
    date_hierarchy = "queued_at"

    @admin.display(description="duration")
    def duration_text(self, obj):
        d = obj.duration
        return f"{d.total_seconds():.1f} s" if d else ""

    @admin.display(description="size", ordering="bytes")
    def size(self, obj):
        from django.template.defaultfilters import filesizeformat

        return filesizeformat(obj.bytes) if obj.bytes else ""


class ArchiveFileInline(admin.TabularInline):
    model = ArchiveFile
    fields = ("path", "role", "bytes", "sha256")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


class ArchiveCopyInline(admin.TabularInline):
    model = ArchiveCopy
    fields = ("remote", "state", "started_at", "finished_at", "verified_at", "bytes", "storage_class", "error")
    readonly_fields = fields
    extra = 0
    can_delete = False
    verbose_name_plural = "off-site copies"

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Archive)
class ArchiveAdmin(ReadOnlyAdmin):
    list_display = ("path", "database", "kind", "state", "started_at", "bytes", "timeline", "start_lsn",
                    "stop_lsn", "verified_at")
    list_filter = ("state", "kind", "database")
    list_select_related = ("database",)
    inlines = [ArchiveFileInline, ArchiveCopyInline]
    actions = ["verify"]

    @admin.action(description="Verify (re-hash every file, read the dump)", permissions=["verify_archive"])
    def verify(self, request, queryset):
        for archive in queryset:
            ok, error = runner.verify(archive, request.user)
            if ok:
                self.message_user(request, f"{archive}: verified at {timezone.now():%H:%M:%S}.", messages.SUCCESS)
            else:
                self.message_user(request, f"{archive}: {error}", messages.ERROR)

    def has_verify_archive_permission(self, request):
        return request.user.has_perm("backups.verify_archive")


# -- off-site copies (backups.offsite) ---------------------------------------------------------------
class RemoteRepositoryForm(forms.ModelForm):
    """The secret key is write-only, like a database password: never rendered back; an empty
    field keeps the stored one."""

    secret_key = forms.CharField(
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        required=False, strip=False,
        help_text="Stored encrypted, never shown again. Leave empty to keep the stored secret key.")
    endpoint_url = forms.URLField(required=False, assume_scheme="https",
                                  help_text=RemoteRepository._meta.get_field("endpoint_url").help_text)

    class Meta:
        model = RemoteRepository
        fields = ["name", "kind", "endpoint_url", "region", "bucket", "prefix", "access_key_id", "secret_key",
                  "storage_class", "archive_after_days", "archive_storage_class", "verify_tls", "enabled"]

    def clean(self):
        data = super().clean()
        if not self.instance.secret_key_encrypted and not data.get("secret_key"):
            self.add_error("secret_key", "A new remote needs its secret key.")
        if data.get("archive_after_days") and not data.get("archive_storage_class"):
            self.add_error("archive_storage_class", "Name the storage class that older copies move to.")
        return data

    def save(self, commit=True):
        obj = super().save(commit=False)
        if self.cleaned_data.get("secret_key"):
            obj.set_secret_key(self.cleaned_data["secret_key"])
        if commit:
            obj.save()
        return obj


@admin.register(RemoteRepository)
class RemoteRepositoryAdmin(AuditedAdmin):
    audit_name = "remote"
    form = RemoteRepositoryForm
    list_display = ("name", "kind", "endpoint_url", "bucket", "prefix", "storage_class", "enabled")
    list_filter = ("enabled", "kind")
    actions = ["test_connection"]

    @admin.action(description="Test connection (bucket, then a small put, get and delete)",
                  permissions=["test_remote"])
    def test_connection(self, request, queryset):
        for remote in queryset:
            try:
                info = offsite.probe_remote(remote, request.user, request=request)
            except offsite.OffsiteError as exc:
                self.message_user(request, f"{remote}: {exc.message}", messages.ERROR)
            else:
                self.message_user(request, f"{remote}: bucket {remote.bucket} answers; a test object was written, "
                                  f"read back and deleted in {info['seconds']:.2f} s.", messages.SUCCESS)

    def has_test_remote_permission(self, request):
        # Whoever may configure remotes may probe them (the probe writes to the bucket).
        return request.user.has_perm("backups.change_remoterepository")


@admin.register(ArchiveCopy)
class ArchiveCopyAdmin(ReadOnlyAdmin):
    list_display = ("archive", "remote", "state", "started_at", "finished_at", "verified_at", "bytes",
                    "storage_class", "error")
    list_filter = ("state", "remote")
    list_select_related = ("archive", "remote")
    actions = ["verify_copy"]

    @admin.action(description="Verify (read every file back from the remote)", permissions=["verify_archive"])
    def verify_copy(self, request, queryset):
        for copy in queryset.select_related("archive", "remote"):
            try:
                offsite.verify_copy(copy, request.user)
            except offsite.OffsiteError as exc:
                self.message_user(request, f"{copy.archive} at {copy.remote}: {exc.message}", messages.ERROR)
            else:
                self.message_user(request, f"{copy.archive} at {copy.remote}: every file matches its sha256.",
                                  messages.SUCCESS)

    def has_verify_archive_permission(self, request):
        return request.user.has_perm("backups.verify_archive")
