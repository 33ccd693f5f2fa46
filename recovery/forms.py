from django import forms
from django.utils import timezone

from backups.models import Archive, BackupKind, Database

from .models import RestoreRequest


class RestoreRequestForm(forms.Form):
    kind = forms.ChoiceField(choices=RestoreRequest.Kind.choices[:4], initial=RestoreRequest.Kind.ARCHIVE)
    database = forms.ModelChoiceField(Database.objects.all(), required=False, to_field_name="name",
                                      help_text="Empty for a system restore, or a point in time of every database.")
    archive = forms.ModelChoiceField(Archive.objects.none(), required=False,
                                     help_text="For 'one database from one archive' and for tables.")
    target_time = forms.CharField(required=False, help_text="ISO 8601 (2026-11-20 14:30:00, optional offset), an "
                                  "archive stamp like 20261120_020000, or 'latest'; without offset: TIME_ZONE.")
    mode = forms.ChoiceField(choices=RestoreRequest.Mode.choices, initial=RestoreRequest.Mode.COPY)
    new_name = forms.CharField(required=False, max_length=63,
                               help_text="Copy: the new database's name. Tables: the new schema (default "
                                         "restored_<date>).")
    target_server = forms.ModelChoiceField(Database.objects.all(), required=False, to_field_name="name",
                                           help_text="Copy only: a registered restore-test server.")
    tables = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 3}),
                             help_text="Tables: one schema.table (or schema) per line.")
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}), help_text="Why is this restore needed?")
    change_ticket = forms.CharField(required=False, max_length=64)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        restorable = Archive.objects.filter(kind=BackupKind.LOGICAL, state=Archive.State.COMPLETE)
        self.fields["archive"].queryset = restorable  # validation: any restorable archive (the API may name old ones)
        # the menu: the newest 500, not every archive of a year
        self.fields["archive"].widget.choices = [("", "---------")] + [
            (a.pk, f"{a.database.name} · {timezone.localtime(a.started_at):%Y-%m-%d %H:%M} · #{a.pk}")
            for a in restorable.select_related("database").order_by("-started_at")[:500]]

    def clean_target_time(self):
        from .engine.pitr import PitrError
        from .services import parse_stamp

        text = self.cleaned_data["target_time"].strip()
        if not text or text.lower() == "latest":
            return None  # "latest" is read from the raw text in the view
        try:
            return parse_stamp(text)
        except PitrError as exc:
            raise forms.ValidationError(exc.message) from None


class DecisionForm(forms.Form):
    """Approving or rejecting needs a fresh proof of identity."""

    password = forms.CharField(widget=forms.PasswordInput(attrs={"autocomplete": "current-password"}),
                               help_text="Your password, again: a signed-in session alone is not enough.")
    otp = forms.CharField(required=False, max_length=8, label="One-time password",
                          widget=forms.TextInput(attrs={"autocomplete": "one-time-code", "inputmode": "numeric"}))
    comment = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}))
