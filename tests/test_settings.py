"""Configuration: every variable the settings read is documented in .env.example, and
production refuses insecure defaults."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_env_example_documents_every_variable_the_settings_read():
    source = (ROOT / "bankvault" / "settings.py").read_text()
    used = set(re.findall(r'env(?:\.\w+)?\(\s*"([A-Z0-9_]+)"', source))
    used |= set(re.findall(r'secret\(\s*"([A-Z0-9_]+)"', source))
    used |= set(re.findall(r'os\.environ\.get\(\s*"([A-Z0-9_]+)"', source))
    documented = set(re.findall(r"^([A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert used, "the settings read no variables?"
    assert used - documented == set()


def _settings_in(env: dict) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "BANKVAULT_FIELD_KEYS")}
    base.update(env)
    return subprocess.run([sys.executable, "-c", "import django; django.setup()"], cwd=ROOT,
                          env=dict(base, DJANGO_SETTINGS_MODULE="bankvault.settings"),
                          capture_output=True, text=True, timeout=60)


def test_production_refuses_to_start_without_its_secrets():
    out = _settings_in({"BANKVAULT_ENV": "production"})
    assert out.returncode != 0 and "SECRET_KEY" in out.stderr
    out = _settings_in({"BANKVAULT_ENV": "production", "SECRET_KEY": "x" * 50})
    assert out.returncode != 0 and "BANKVAULT_FIELD_KEYS" in out.stderr


def test_a_malformed_value_names_the_variable():
    out = _settings_in({"BANKVAULT_TOOL_TIMEOUT": "six hours"})
    assert out.returncode != 0
    assert "six hours" in out.stderr
