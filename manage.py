#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""
import os
import sys


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bankvault.settings")
    from django.core.management import execute_from_command_line

    from audit import context

    # Whatever a command changes is recorded as done by the person at this terminal ("cli:root"),
    # also the changes that models' signals record without naming an actor.
    with context.bind(actor=context.cli_actor()):
        execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
