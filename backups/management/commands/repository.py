"""The repository as the source of truth for the catalog.

    manage.py repository rescan [--dry-run] [--verify] [--json]
    manage.py repository check [--verify] [--json]

`rescan` catalogs every archive in the repository that the catalog lacks, registers the
databases they came from again (from their manifests, without a password: each is flagged as
needing credentials until `databases set-password` or the admin gives one), marks damaged
archives corrupt with the reason, and rebuilds the WAL catalog. Re-running it changes nothing.
It is how the catalog comes back after the portal's own database was lost (README, disaster
recovery). `check` only compares and exits 1 when the catalog and the repository differ.

Without --verify an archive is checked for its manifest and for every listed file being
present with the listed size; --verify re-hashes every file against its sha256 (and reads
each dump's table of contents), which reads the whole repository. Restores re-verify the
checksums of what they restore either way.

Exit status: 0 all well; 1 damaged archives or archives that could not be cataloged (rescan
still catalogs everything else), or, for check, any difference."""

import json

from django.core.management.base import BaseCommand, CommandError

import audit
from backups import rescan
from backups.engine.repository import default_repository


class Command(BaseCommand):
    help = "Rebuild the catalog from the repository (rescan), or compare the two (check)."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        scan = sub.add_parser("rescan", help="catalog what the repository holds and the catalog lacks")
        scan.add_argument("--dry-run", action="store_true", help="show what would change; change nothing")
        chk = sub.add_parser("check", help="compare the catalog with the repository; change nothing")
        for p in (scan, chk):
            p.add_argument("--verify", action="store_true",
                           help="re-hash every file against its manifest (reads the whole repository)")
            p.add_argument("--json", action="store_true")

    def handle(self, *args, action, verify=False, json=False, dry_run=False, **opts):
        repo = default_repository()
        try:
            plan = rescan.scan(repo, verify=verify)
        except rescan.RescanError as exc:
            raise CommandError(str(exc)) from None
        writing = action == "rescan" and not dry_run
        if writing:
            rescan.apply(plan, audit.cli_actor())
        self._report(plan, writing=writing, as_json=json, verbose=opts.get("verbosity", 1) > 1)
        counts = plan.counts()
        if action == "check":
            differ = counts["new"] + counts["incomplete"] + counts["damaged"] + counts["uncataloged"] + \
                counts["missing"]
            if differ:
                raise CommandError(f"the catalog and the repository differ ({_summary(counts)}); "
                                   "`manage.py repository rescan` catalogs what is missing")
            return
        bad = counts["damaged"] + counts["uncataloged"]
        if bad:
            raise CommandError(f"{'dry run' if dry_run else 'rescan'} finished: {counts['damaged']} damaged "
                               f"archive(s), {counts['uncataloged']} not cataloged (listed above)")

    def _report(self, plan: rescan.Plan, *, writing: bool, as_json: bool, verbose: bool) -> None:
        counts = plan.counts()
        registered = plan.registered if writing else sorted(plan.register)
        if as_json:
            self.stdout.write(json.dumps({
                "repository": str(plan.root), "applied": writing, **counts,
                "databases_registered": registered, "not_registered": plan.unregistrable,
                "archives": [{"path": f.relpath, "database": f.db_name, "status": f.status, "state": f.state,
                              "id": f.archive_id, "error": f.problem or f.incomplete or f.note}
                             for f in plan.found],
                "missing": [{"id": pk, "path": path} for pk, path in plan.missing],
                "ignored": [{"path": p, "why": why} for p, why in plan.ignored],
            }, indent=2))
            return
        would = "" if writing else "would be "
        out = self.stdout.write
        out(f"repository {plan.root}: {len(plan.found)} archive directories")
        for name in registered:
            f = plan.register[name]
            out(f"  database {name} {would}registered again from {f.relpath}/manifest.json "
                f"({f.manifest['source'].get('host')}:{f.manifest['source'].get('port')}/"
                f"{f.manifest['source'].get('dbname')}); it NEEDS ITS PASSWORD before the next backup: "
                f"manage.py databases set-password {name} --password-env VAR")
        for name, why in sorted(plan.unregistrable.items()):
            out(f"  database {name} NOT registered: {why}")
        for f in plan.found:
            if f.status == "new":
                label = {"complete": "new", "incomplete": "INCOMPLETE", "corrupt": "DAMAGED"}[f.state]
                ident = f" (archive {f.archive_id})" if f.archive_id else ""
                reason = f": {f.problem or f.incomplete}" if f.problem or f.incomplete else ""
                out(f"  {label:<13} {f.relpath}{ident}{' ' + would.strip() + ' cataloged' if would else ''}{reason}")
            elif f.status == "damaged":
                out(f"  {'DAMAGED':<13} {f.relpath} (archive {f.archive_id}): {f.problem}")
            elif f.status == "skipped":
                out(f"  {'skipped':<13} {f.relpath}: {f.note}")
            elif f.status == "uncataloged":
                out(f"  {'NOT CATALOGED':<13} {f.relpath}: {f.note}")
            elif verbose:
                out(f"  {'known':<13} {f.relpath} (archive {f.archive_id})")
        for pk, path in plan.missing:
            out(f"  {'missing':<13} archive {pk} ({path}) is cataloged but not in the repository")
        for path, why in plan.ignored:
            out(f"  {'ignored':<13} {path}: {why}")
        out(f"{'' if writing else 'dry run: '}{_summary(counts)}")


def _summary(counts: dict) -> str:
    return (f"{counts['new']} new, {counts['incomplete']} incomplete, {counts['damaged']} damaged, "
            f"{counts['known']} known, {counts['skipped']} skipped, {counts['uncataloged']} not cataloged, "
            f"{counts['missing']} missing; {counts['databases_registered']} database(s) registered again")
