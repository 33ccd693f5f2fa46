"""The audit trail. Every app records what happened through :func:`audit.record`."""


def record(*args, **kwargs):
    # Imported lazily so `import audit` works before the app registry is ready.
    from .recorder import record as _record

    return _record(*args, **kwargs)


def diff(before, after):
    from .recorder import diff as _diff

    return _diff(before, after)


def cli_actor():
    from .recorder import cli_actor as _cli_actor

    return _cli_actor()
