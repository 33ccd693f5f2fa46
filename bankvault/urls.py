from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from bankvault import accounts
from monitoring import probes

admin.site.site_header = "bankvault administration"
admin.site.site_title = "bankvault"
# The admin signs in with the same OTP-aware form as the portal: no way around the token.
admin.site.login_form = accounts.AdminSignInForm
admin.site.login_template = "registration/admin_login.html"

urlpatterns = [
    path("", include("monitoring.dashboard_urls")),
    path("healthz", probes.healthz, name="healthz"),
    path("metrics", probes.metrics, name="metrics"),
    path("restores/", include("recovery.urls")),
    path("audit/", include("monitoring.urls")),
    path("api/v1/", include("recovery.api_urls")),
    # Before django.contrib.auth.urls, whose plain "login" these replace.
    path("accounts/login/", accounts.login_view, name="login"),
    path("accounts/otp/", accounts.otp_devices, name="otp"),
    # Sign-out and changing one's password; no e-mailed password reset (a bank's operators are
    # reset by an administrator: manage.py changepassword).
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("accounts/password_change/", auth_views.PasswordChangeView.as_view(), name="password_change"),
    path("accounts/password_change/done/", auth_views.PasswordChangeDoneView.as_view(),
         name="password_change_done"),
    path("admin/", admin.site.urls),
]
