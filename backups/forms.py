from django import forms

from .models import Database


class DatabaseForm(forms.ModelForm):
    """The password is write-only: it is never rendered back, and an empty field keeps the
    stored one."""

    password = forms.CharField(
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        required=False, strip=False,
        help_text="Stored encrypted, never shown again. Leave empty to keep the stored password.",
    )

    restore_password = forms.CharField(
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        required=False, strip=False, help_text="For the restore user. Stored encrypted; empty keeps it.")

    class Meta:
        model = Database
        fields = ["name", "host", "port", "dbname", "user", "password", "sslmode", "default_compression", "wal_mode",
                  "restore_user", "restore_password"]

    def save(self, commit=True):
        obj = super().save(commit=False)
        if self.cleaned_data.get("password"):
            obj.set_password(self.cleaned_data["password"])
            obj.needs_credentials = False  # registered again by a rescan: the password is now given
        if self.cleaned_data.get("restore_password"):
            obj.set_restore_password(self.cleaned_data["restore_password"])
        if commit:
            obj.save()
        return obj
