from datetime import timedelta

from django import template

register = template.Library()


@register.filter
def duration_short(value) -> str:
    """A timedelta (or seconds) as "45 s", "12 min", "3.5 h", "2.0 days"."""
    if value is None or value == "":
        return ""
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


@register.filter
def timesince_short(value) -> str:
    return duration_short(value)


@register.filter
def percent(done, total) -> int:
    try:
        return max(0, min(100, int(100 * float(done) / float(total)))) if total else 0
    except (TypeError, ValueError):
        return 0
