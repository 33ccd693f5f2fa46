"""Backup speed and size: bankvault's engine against raw pg_dump pipelines and the old
"four dumps + tar.gz" shell scripts, on one pgbench database, in one run; and what GnuPG
encryption adds, to the raw pipeline and to bankvault's engine.

    .venv/bin/python bench/backup_bench.py [--scale 20] [--repeat 3] [--strict]

Everything it needs it starts itself (a source cluster, the portal's catalog cluster, a
temporary repository) and removes at the end. See bench/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # as a script, sys.path[0] is bench/, not the project root

from backups.engine.cluster import LocalCluster  # noqa: E402  (needs the path above)

DBNAME = "bench"
MB = 1_000_000
VARIANTS = {
    "a": "raw pg_dump -Fc (gzip)",
    "b": "raw pg_dump -Fc -Z0 | zstd -T2 -3",
    "c": "bankvault engine, zstd",
    "d": "bankvault engine, gzip",
    "e": "old scripts: 4 dumps + tar.gz",
    "f": "raw pg_dump | zstd | gpg -e (1 key)",
    "g": "bankvault zstd + gpg, 1 key",
    "h": "bankvault zstd + gpg, 2 keys",
    "i": "bankvault zstd + gpg, escrow key only",
}
ENCRYPTED = ("g", "h", "i")
# The engine's steps timed in the encrypted runs (see Phases): name -> (module, attribute).
PHASES = {
    "preflight": "recipient keys checked (gpg.Recipients)",
    "dump": "dump, globals, row counts, files read back (+ the dump decrypted as written)",
    "verify": "verification: pg_restore --list (the re-hash read back as written)",
    "rest": "claim, locks, rename into place, catalog rows, audit events",
}


def gpg_run(home: Path, *args: str) -> str:
    """gpg in a benchmark keyring (keys without a passphrase: the empty one goes in argv)."""
    proc = subprocess.run(["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback",
                           "--passphrase", "", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"gpg {args[0]} failed (exit {proc.returncode}): {proc.stderr.strip()[-1000:]}")
    return proc.stdout


def new_key(home: Path, uid: str, algo: str) -> tuple[str, str]:
    """(fingerprint, ASCII-armored public key) of a throwaway key made in ``home``."""
    home.mkdir(mode=0o700)
    gpg_run(home, "--quick-gen-key", uid, algo, "default", "1d")
    listing = gpg_run(home, "--with-colons", "--list-keys", uid)
    fpr = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
    return fpr, gpg_run(home, "--armor", "--export", fpr)


def sh(argv: list[str], env: dict) -> None:
    """Run a tool; on failure stop the benchmark with the tool's own words."""
    proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        raise SystemExit(f"{Path(argv[0]).name} failed (exit {proc.returncode}): "
                         f"{proc.stderr.decode(errors='replace').strip()[-1000:]}")


class Bench:
    def __init__(self, scratch: Path, source: LocalCluster, pg_dump: str):
        self.scratch = scratch
        self.out = scratch / "out"
        self.pg_dump = pg_dump
        # The raw tools reach the source the way the engine does: TCP to 127.0.0.1.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self.env.update(PGHOST="127.0.0.1", PGPORT=str(source.port), PGUSER="postgres",
                        PGDATABASE=DBNAME, LC_MESSAGES="C")
        self.db = None  # the registered backups.models.Database, set in main()
        self.policies: dict = {}  # encrypted variant -> its BackupPolicy, set in setup_encryption()
        self.gpg_home: Path | None = None  # the workers' keyring (BANKVAULT_GPG_HOME)
        self.worker_fpr = ""
        self.phases = Phases()

    def fresh_out(self) -> Path:
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir()
        return self.out

    # Each variant returns (wall seconds, bytes of its output, extra figures for the JSON).
    def a_raw_gzip(self):
        path = self.out / "a.pgdump"
        t0 = time.perf_counter()
        sh([self.pg_dump, "-Fc", "-f", str(path)], self.env)
        return time.perf_counter() - t0, path.stat().st_size, {}

    def b_raw_zstd(self):
        path = self.out / "b.pgdump.zst"
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            dump = subprocess.Popen([self.pg_dump, "-Fc", "-Z0"], env=self.env, stdout=subprocess.PIPE)
            zstd = subprocess.Popen(["zstd", "-T2", "-3", "-q", "-c"], stdin=dump.stdout, stdout=f)
            # Only zstd holds the read end now, so pg_dump gets SIGPIPE if zstd dies.
            dump.stdout.close()
            rc_zstd, rc_dump = zstd.wait(), dump.wait()
        seconds = time.perf_counter() - t0
        if rc_dump or rc_zstd:
            raise SystemExit(f"pipeline failed: pg_dump exit {rc_dump}, zstd exit {rc_zstd}")
        return seconds, path.stat().st_size, {}

    def f_raw_gpg(self):
        """b with gpg as a third process, as an admin would add it: no compression of its own."""
        path = self.out / "f.pgdump.zst.gpg"
        gpg_argv = ["gpg", "--homedir", str(self.gpg_home), "--batch", "--no-tty", "--trust-model", "always",
                    "--compress-algo", "none", "--encrypt", "--recipient", self.worker_fpr, "--output", "-"]
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            dump = subprocess.Popen([self.pg_dump, "-Fc", "-Z0"], env=self.env, stdout=subprocess.PIPE)
            zstd = subprocess.Popen(["zstd", "-T2", "-3", "-q", "-c"], stdin=dump.stdout, stdout=subprocess.PIPE)
            gpg = subprocess.Popen(gpg_argv, stdin=zstd.stdout, stdout=f, stderr=subprocess.DEVNULL)
            dump.stdout.close()
            zstd.stdout.close()
            rc_gpg, rc_zstd, rc_dump = gpg.wait(), zstd.wait(), dump.wait()
        seconds = time.perf_counter() - t0
        if rc_dump or rc_zstd or rc_gpg:
            raise SystemExit(f"pipeline failed: pg_dump exit {rc_dump}, zstd exit {rc_zstd}, gpg exit {rc_gpg}")
        return seconds, path.stat().st_size, {}

    def _bankvault(self, algo: str, policy=None):
        from backups.engine import runner
        from backups.models import BackupRun

        self.db.default_compression = algo
        self.db.save(update_fields=["default_compression"])
        run = BackupRun.enqueue(self.db, trigger=BackupRun.Trigger.MANUAL, actor_label="bench", policy=policy)
        # Queueing is the web request's part; a worker's backup is execute(), claim to catalog.
        self.phases.events.clear()
        t0 = time.perf_counter()
        archive = runner.execute(run.pk)
        seconds = time.perf_counter() - t0
        extra = {"dump_bytes": archive.main_file.bytes, "phases": self.phases.breakdown(seconds)}
        if policy is not None:
            extra["encrypted_for"] = archive.encrypted_for
            if len(archive.encrypted_for) != policy.encrypt_to.count():
                raise SystemExit(f"archive {archive.path} is encrypted to {archive.encrypted_for}, "
                                 f"not to the {policy.encrypt_to.count()} key(s) of {policy}")
        return seconds, archive.bytes, extra

    def c_bankvault_zstd(self):
        return self._bankvault("zstd")

    def d_bankvault_gzip(self):
        return self._bankvault("gzip")

    # Encrypted: the same engine through a policy naming the keys (its other options equal the
    # manual run's: zstd level 3, 2 threads, the dump alone).
    def g_bankvault_gpg1(self):
        return self._bankvault("zstd", self.policies["g"])

    def h_bankvault_gpg2(self):
        return self._bankvault("zstd", self.policies["h"])

    def i_bankvault_escrow(self):
        return self._bankvault("zstd", self.policies["i"])

    def e_old_scripts(self):
        parts = self.out / "parts"
        parts.mkdir()
        t_start = time.perf_counter()
        steps = {"x.backup": ["--format=custom", "--compress=9"], "x.sql": ["--format=plain"],
                 "schema.sql": ["--schema-only"], "data.sql": ["--data-only"]}
        seconds = {}
        for name, args in steps.items():  # one after another, as the scripts did
            t0 = time.perf_counter()
            sh([self.pg_dump, *args, "-f", str(parts / name)], self.env)
            seconds[name] = round(time.perf_counter() - t0, 3)
        tarball = self.out / "backup.tar.gz"
        t0 = time.perf_counter()
        sh(["tar", "-czf", str(tarball), "-C", str(parts), *steps], self.env)
        seconds["tar -czf"] = round(time.perf_counter() - t0, 3)
        return time.perf_counter() - t_start, tarball.stat().st_size, {"step_seconds": seconds}


class Phases:
    """Times the backup engine's steps by wrapping its functions where they are looked up at
    call time (module attributes, a class's method), so the engine runs unchanged and unedited."""

    def __init__(self):
        self.events: list[tuple[str, float, float]] = []
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)
        events = self.events

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                events.append((name, t0, time.perf_counter()))

        self._undo.append((owner, attr, fn))
        setattr(owner, attr, timed)

    def install(self) -> None:
        from backups.engine import gpg, logical

        self.wrap(gpg.Recipients, "__enter__", "preflight")
        self.wrap(logical, "produce", "produce")
        self.wrap(logical, "verify_written", "verify")

    def uninstall(self) -> None:
        for owner, attr, fn in reversed(self._undo):
            setattr(owner, attr, fn)
        self._undo.clear()

    def breakdown(self, total: float) -> dict[str, float]:
        """Seconds per PHASES key of the run just timed (total = its wall time)."""
        spent: dict[str, float] = {}
        for name, t0, t1 in self.events:
            spent[name] = spent.get(name, 0.0) + t1 - t0
        verify = spent.get("verify", 0.0)
        produce, preflight = spent.get("produce", 0.0), spent.get("preflight", 0.0)
        return {"preflight": round(preflight, 4), "dump": round(produce - verify, 4),
                "verify": round(verify, 4), "rest": round(total - produce - preflight, 4)}


def setup_encryption(bench: Bench, scratch: Path, key_algo: str) -> dict:
    """Two throwaway keys: the workers' (its private half in BANKVAULT_GPG_HOME, no passphrase,
    so verification decrypts the dump) and an escrow key whose private half no worker holds.
    Stored as the admin stores them, and named by three policies, one per encrypted variant.
    The policies are disabled: a manual run without a policy (c, d) encrypts to the keys of the
    database's enabled policies, and c and d must stay unencrypted."""
    from django.conf import settings
    from django_celery_beat.models import CrontabSchedule

    from backups.engine import gpg
    from backups.models import BackupPolicy, EncryptionKey

    keyrings = scratch / "gpg"  # short: gpg-agent's socket path has a length limit
    keyrings.mkdir(mode=0o700)
    t0 = time.perf_counter()
    made = {"worker": new_key(keyrings / "worker", "Bench Worker <worker@bench.invalid>", key_algo),
            "escrow": new_key(keyrings / "escrow", "Bench Escrow <escrow@bench.invalid>", key_algo)}
    key_seconds = time.perf_counter() - t0
    # i's archives are verified by checksums only, and the engine warns about it on every run.
    logging.getLogger("backups.engine.logical").setLevel(logging.ERROR)
    bench.gpg_home = keyrings / "worker"
    bench.worker_fpr = made["worker"][0]
    settings.BANKVAULT_GPG_HOME = bench.gpg_home
    settings.BANKVAULT_GPG_PASSPHRASE = ""
    rows = {}
    for name, (fpr, armored) in made.items():
        info = gpg.validate_public_key(armored)
        rows[name] = EncryptionKey.objects.create(fingerprint=fpr, owner=info.owner, public_key=armored,
                                                  expires_at=info.expires_at)
    schedule, _ = CrontabSchedule.objects.get_or_create(minute="0", hour="2")
    for variant, names in {"g": ["worker"], "h": ["worker", "escrow"], "i": ["escrow"]}.items():
        policy = BackupPolicy.objects.create(database=bench.db, schedule=schedule, name=f"bench-{variant}",
                                             compression="zstd", parallel_jobs=2, enabled=False)
        policy.encrypt_to.set([rows[n] for n in names])
        bench.policies[variant] = policy
    return {"key_algo": key_algo, "keygen_seconds": round(key_seconds, 3),
            "keys": {name: fpr for name, (fpr, _) in made.items()}}


def stop_agents(scratch: Path) -> None:
    for home in sorted((scratch / "gpg").glob("*")):
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], capture_output=True)


def start_portal(portal: LocalCluster, scratch: Path) -> None:
    """The portal's own catalog database, and Django set up against it."""
    portal.start()
    portal.sql("CREATE DATABASE bankvault")
    os.environ.update({
        "DATABASE_URL": portal.url("bankvault"),
        "BANKVAULT_REPOSITORY": str(scratch / "repository"),
        "BANKVAULT_ENV": "test",
        "BANKVAULT_VAR_DIR": str(scratch / "var"),
        "SECRET_KEY": "bench-only-secret-key-" + "x" * 40,
        "DJANGO_SETTINGS_MODULE": "bankvault.settings",
    })
    os.environ.setdefault("LOG_LEVEL", "WARNING")  # the engine logs every tool it runs at INFO
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)


def load_pgbench(source: LocalCluster, bench: Bench, pgbench: str, scale: int) -> None:
    """pgbench's schema with its rows inserted by us: pgbench's own filler is blanks, which
    compress 50x+ and would make every size in the table meaningless."""
    source.sql(f"CREATE DATABASE {DBNAME}")
    sh([pgbench, "-i", "-I", "dt", "-s", str(scale)], bench.env)
    source.sql("INSERT INTO pgbench_branches (bid, bbalance) SELECT g, 0 FROM generate_series(1, %s) g",
               DBNAME, (scale,))
    source.sql("INSERT INTO pgbench_tellers (tid, bid, tbalance) "
               "SELECT g, (g - 1) / 10 + 1, 0 FROM generate_series(1, %s) g", DBNAME, (10 * scale,))
    # 40 random hex characters in the char(84) filler: ~3.5x with zstd, like real rows.
    source.sql("INSERT INTO pgbench_accounts (aid, bid, abalance, filler) "
               "SELECT g, (g - 1) / 100000 + 1, 0, "
               "substr(md5(random()::text) || md5(random()::text), 1, 40) "
               "FROM generate_series(1, %s) g", DBNAME, (100_000 * scale,))
    sh([pgbench, "-i", "-I", "pv", "-s", str(scale)], bench.env)
    # Write the load out now, so no checkpoint lands in the middle of a timed run.
    source.sql("CHECKPOINT")


def measure_ratio(bench: Bench) -> tuple[int, int]:
    """Uncompressed custom-format dump size and its zstd -3 size. Doubles as the warm-up that
    puts the whole database in the page cache before the first timed run."""
    out = bench.fresh_out()
    sh([bench.pg_dump, "-Fc", "-Z0", "--no-sync", "-f", str(out / "raw.pgdump")], bench.env)
    sh(["zstd", "-T2", "-3", "-q", str(out / "raw.pgdump"), "-o", str(out / "raw.zst")], bench.env)
    sizes = (out / "raw.pgdump").stat().st_size, (out / "raw.zst").stat().st_size
    shutil.rmtree(out)
    return sizes


def tool_version(argv: list[str]) -> str:
    """The first version-looking word of a tool's --version, e.g. "15.20" or "v1.5.4"."""
    out = subprocess.run(argv, capture_output=True, text=True).stdout
    return next((w.strip(",") for w in out.split() if w.lstrip("v")[:1].isdigit()), "?")


def cpu_seconds() -> tuple[float, float]:
    """CPU time (user + system) of this process, all its threads (Django, the engine's compression,
    hashing and pipe copies), and of its finished child processes (pg_dump, zstd, gpg, pg_restore).
    The source server's backends and gpg-agent are not in either."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def core_contention() -> dict:
    """Whether this VM has two free cores right now: one CPU-bound, single-threaded job
    (sha256sum of 256 MiB of zeros) alone, then two side by side. On two free cores the pair
    takes as long as one; on one free core, twice as long. The pipelines need both cores,
    pg_dump -Fc (gzip) one."""
    with tempfile.NamedTemporaryFile(prefix="bv-cores-") as zeros:
        zeros.truncate(1 << 28)  # sparse: reading it costs next to nothing

        def timed(n: int) -> float:
            t0 = time.perf_counter()
            procs = [subprocess.Popen(["sha256sum", zeros.name], stdout=subprocess.DEVNULL)
                     for _ in range(n)]
            for proc in procs:
                proc.wait()
            return time.perf_counter() - t0

        timed(1)  # the first read of the file fills the page cache
        one, two = timed(1), timed(2)
    return {"one_s": round(one, 3), "two_s": round(two, 3), "pair_vs_one": round(two / one, 2)}


def describe_contention(c: dict) -> str:
    return (f"two CPU-bound jobs side by side took {c['pair_vs_one']:.2f}x one alone "
            f"({c['two_s']:.2f} s vs {c['one_s']:.2f} s; 1.0x = two free cores)")


def summarize(samples: dict) -> dict:
    rows = {}
    for key, runs in samples.items():
        secs = [r["seconds"] for r in runs]
        rows[key] = {"label": VARIANTS[key], "median_s": statistics.median(secs), "min_s": min(secs),
                     "max_s": max(secs), "size_bytes": int(statistics.median(r["bytes"] for r in runs)),
                     "cpu_self_s": statistics.median(r["cpu_self_s"] for r in runs),
                     "cpu_tools_s": statistics.median(r["cpu_tools_s"] for r in runs),
                     "runs": runs}
    a, b, c = rows["a"], rows["b"], rows["c"]
    for key, row in rows.items():
        row["time_vs_b"] = row["median_s"] / b["median_s"]
        row["time_vs_a"] = row["median_s"] / a["median_s"]
        row["size_vs_a"] = row["size_bytes"] / a["size_bytes"]
        # What encryption adds: the encrypted engine against the unencrypted one (c), and the
        # raw gpg pipeline (f) against the raw zstd one (b).
        base = c if key in ENCRYPTED else b if key == "f" else None
        if base is not None:
            row["time_vs_plain"] = row["median_s"] / base["median_s"]
        if key in ENCRYPTED or key == "c":
            per_run = [r["extra"]["phases"] for r in row["runs"]]
            row["phases_median_s"] = {p: statistics.median(run[p] for run in per_run) for p in PHASES}
    return rows


def print_columns(head: list[str], body: list[list[str]]) -> None:
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    for line in [head, *body]:
        print("  ".join([line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])]))


def print_table(rows: dict) -> None:
    head = ["variant", "median s", "min-max s", "size MB", "time/b", "time/a", "size/a", "enc/plain", "CPU s"]
    body = [[f"{k}  {r['label']}", f"{r['median_s']:.2f}", f"{r['min_s']:.2f}-{r['max_s']:.2f}",
             f"{r['size_bytes'] / MB:.1f}", f"{r['time_vs_b']:.2f}x", f"{r['time_vs_a']:.2f}x",
             f"{r['size_vs_a']:.2f}x", f"{r['time_vs_plain']:.2f}x" if "time_vs_plain" in r else "",
             f"{r['cpu_self_s']:.2f}+{r['cpu_tools_s']:.2f}"] for k, r in rows.items()]
    print_columns(head, body)
    print("  enc/plain: f against b (what gpg adds to the raw pipeline), g, h, i against c (to bankvault)")
    print("  CPU s: median CPU seconds of the benchmark process (the engine runs in it) + of the tools it ran;")
    print("         the source server's own CPU is in neither. 2 cores: the wall time cannot go below CPU / 2")
    for k in ("c", "d", *ENCRYPTED):
        if k in rows:
            run = rows[k]["runs"][-1]
            dump = run["extra"]["dump_bytes"]
            print(f"  {k}: dump file alone {dump / MB:.2f} MB; globals.sql{'.zst.gpg' if k in ENCRYPTED else ''} "
                  f"{run['bytes'] - dump:,} bytes")


def print_phases(rows: dict) -> None:
    keys = [k for k in ("c", *ENCRYPTED) if k in rows]
    print(f"\nwhere bankvault's time goes (median s per step over {len(rows['c']['runs'])} runs; "
          "the engine's functions wrapped in this process)")
    head = ["step", *keys, *(f"{k}-c" for k in keys[1:])]
    body = [[f"{p:<9} {PHASES[p]}", *(f"{rows[k]['phases_median_s'][p]:.2f}" for k in keys),
             *(f"{rows[k]['phases_median_s'][p] - rows['c']['phases_median_s'][p]:+.2f}" for k in keys[1:])]
            for p in PHASES]
    print_columns(head, body)


def paired(rows: dict, x: str, y: str) -> float:
    """The median over rounds of x's time / y's time in the same round. Every round runs each
    variant once, back to back, so a slow spell of the (shared, virtual) machine weighs on both
    sides of a ratio; a ratio of two medians can pair a slow x with a fast y."""
    return statistics.median(rx["seconds"] / ry["seconds"] for rx, ry in zip(rows[x]["runs"], rows[y]["runs"]))


def check_targets(rows: dict) -> list[dict]:
    """Each time target is judged on the paired ratio (see paired()); the ratio of the medians
    is printed beside it."""
    a, c = rows["a"], rows["c"]

    def ratio(x: str, y: str, limit: float, faster: bool = False) -> tuple[bool, str]:
        p = paired(rows, x, y)
        of_medians = rows[x]["median_s"] / rows[y]["median_s"]
        ok = p >= limit if faster else p <= limit
        return ok, (f"paired {p:.2f}x (ratio of medians {of_medians:.2f}x: "
                    f"{rows[x]['median_s']:.2f} s vs {rows[y]['median_s']:.2f} s)")

    encrypted = [(k, "worker key, decrypted as written") for k in ("g",) if k in rows] + \
                [(k, "worker + escrow keys") for k in ("h",) if k in rows]
    targets = [
        ("bankvault zstd time <= 1.10 x raw zstd pipeline (b)", *ratio("c", "b", 1.10)),
        ("bankvault zstd >= 3x faster than raw pg_dump -Fc (a)", *ratio("a", "c", 3.0, faster=True)),
        ("bankvault zstd total size <= raw pg_dump -Fc size (a)", c["size_bytes"] <= a["size_bytes"],
         f"{c['size_bytes'] / MB:.1f} MB vs {a['size_bytes'] / MB:.1f} MB"),
    ] + [
        (f"encrypted / unencrypted bankvault ({k}/c, {what}) <= 1.15", *ratio(k, "c", 1.15))
        for k, what in encrypted
    ]
    out = [{"target": name, "passed": ok, "measured": got} for name, ok, got in targets]
    # For information, not a target: how much faster the raw zstd pipeline itself is than pg_dump
    # -Fc on this machine, the ceiling of the second target for an engine that adds nothing.
    out.append({"target": "for information: raw zstd pipeline (b) faster than raw pg_dump -Fc (a)", "passed": None,
                "measured": ratio("a", "b", 0.0, faster=True)[1].replace("x (", "x faster (", 1)})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=20, help="pgbench scale (20 = 2M accounts, ~300 MB)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per variant; medians are reported")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    parser.add_argument("--variants", default="".join(VARIANTS),
                        help="which variants to run (letters, e.g. abcfgh; a, b and c are always run)")
    parser.add_argument("--key-algo", default="future-default",
                        help="gpg --quick-gen-key algorithm of the throwaway keys (future-default = "
                             "ed25519/cv25519; e.g. rsa2048)")
    args = parser.parse_args()
    if args.scale < 1 or args.repeat < 1:
        parser.error("--scale and --repeat must be at least 1")
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {''.join(sorted(unknown))}; known: {''.join(VARIANTS)}")
    wanted = set(args.variants) | set("abc")

    scratch = Path(tempfile.mkdtemp(prefix="bv-bench-"))
    clusters: list[LocalCluster] = []
    try:
        # The catalog's data is worth nothing after the run: fsync off.
        clusters.append(LocalCluster.create(throwaway=True))
        start_portal(clusters[0], scratch)
        # fsync on (throwaway=False): the source behaves like a real server, not a test toy.
        source = LocalCluster.create()
        clusters.append(source)
        source.start()

        from backups.engine import pgbin
        from backups.models import Database

        inst = pgbin.for_server()
        bench = Bench(scratch, source, inst.tool("pg_dump"))
        print(f"loading pgbench scale {args.scale} with random filler ...", flush=True)
        t0 = time.perf_counter()
        load_pgbench(source, bench, inst.tool("pgbench"), args.scale)
        (db_bytes, pg_version), = source.sql(
            "SELECT pg_database_size(%s), current_setting('server_version')", params=(DBNAME,))
        raw_bytes, zst_bytes = measure_ratio(bench)
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)

        db = Database(name="bench", host="127.0.0.1", port=source.port, dbname=DBNAME, user="postgres")
        db.set_password("trust-auth-ignores-it")  # the source trusts TCP clients on loopback
        db.save()
        bench.db = db
        enc_info = setup_encryption(bench, scratch, args.key_algo) if wanted & set("fghi") else None

        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), platform.processor() or "?")
        header = {
            "cores": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "scale": args.scale,
            "repeat": args.repeat, "db_size_bytes": db_bytes, "postgresql": pg_version,
            "pg_dump": tool_version([bench.pg_dump, "--version"]), "zstd": tool_version(["zstd", "-V"]),
            "dump_uncompressed_bytes": raw_bytes, "dump_zstd3_bytes": zst_bytes,
            "compression_ratio_zstd3": raw_bytes / zst_bytes,
            "gpg": tool_version(["gpg", "--version"]), "encryption": enc_info,
        }
        print(f"""
bankvault backup benchmark
  machine     {header['cores']} cores ({cpu}), Linux {header['kernel']}
  source      PostgreSQL {pg_version}, fsync on; pg_dump {header['pg_dump']}; zstd {header['zstd']}
  data        pgbench scale {args.scale}, {100_000 * args.scale:,} accounts with random filler;
              database {db_bytes / MB:.0f} MB; uncompressed dump {raw_bytes / MB:.0f} MB,
              {header['compression_ratio_zstd3']:.2f}x smaller with zstd -3
  runs        {args.repeat} per variant, interleaved a,b,c,...; median wall time; MB = 10^6 bytes
  note        bankvault (c, d) includes sha256 while writing, fsync, the globals dump, exact row
              counts, the manifest, verification (re-hash read back + pg_restore --list), catalog rows and
              audit events; the raw pipelines do none of that, except that pg_dump -Fc -f fsyncs
              its file by default (a, and the custom-format dump in e).""", flush=True)
        if enc_info:
            print(f"""  encryption  gpg {header['gpg']}, --compress-algo none, binary (not armored); throwaway keys
              ({args.key_algo}, made in {enc_info['keygen_seconds']:.2f} s): the workers' key (private half
              in BANKVAULT_GPG_HOME, no passphrase) and an escrow key (no private half here).
              g, h, i also check the keys (pre-flight), encrypt every file, and, where the workers
              hold a private key (g, h), decrypt the whole dump as it is written (gpg's integrity
              check); i (escrow only) verifies checksums only, as the engine does for escrow-only keys.""",
                  flush=True)
        print(flush=True)

        variants = {"a": bench.a_raw_gzip, "b": bench.b_raw_zstd, "c": bench.c_bankvault_zstd,
                    "d": bench.d_bankvault_gzip, "e": bench.e_old_scripts, "f": bench.f_raw_gpg,
                    "g": bench.g_bankvault_gpg1, "h": bench.h_bankvault_gpg2, "i": bench.i_bankvault_escrow}
        variants = {k: fn for k, fn in variants.items() if k in wanted}
        bench.phases.install()
        header["loadavg_before"] = os.getloadavg()
        header["contention_before"] = core_contention()
        print("  load average before the first timed run: {:.2f} {:.2f} {:.2f}".format(*header["loadavg_before"]),
              flush=True)
        print(f"  cores now   {describe_contention(header['contention_before'])}", flush=True)
        samples: dict[str, list] = {k: [] for k in variants}
        label_width = max(len(VARIANTS[k]) for k in variants)
        repo_archives = scratch / "repository" / "archives"
        for rep in range(1, args.repeat + 1):
            for key, fn in variants.items():  # round-robin spreads machine noise over all variants
                bench.fresh_out()
                cpu0 = cpu_seconds()
                seconds, size, extra = fn()
                cpu = [round(t1 - t0, 3) for t0, t1 in zip(cpu0, cpu_seconds())]
                samples[key].append({"seconds": round(seconds, 4), "bytes": size, "cpu_self_s": cpu[0],
                                     "cpu_tools_s": cpu[1], "extra": extra})
                print(f"  run {rep}/{args.repeat}  {key}  {VARIANTS[key]:<{label_width}} {seconds:6.2f} s "
                      f"{size / MB:7.1f} MB", flush=True)
                shutil.rmtree(bench.out, ignore_errors=True)
                shutil.rmtree(repo_archives, ignore_errors=True)  # catalog rows stay; harmless here

        bench.phases.uninstall()
        header["loadavg_after"] = os.getloadavg()
        header["contention_after"] = core_contention()
        print(f"  cores after {describe_contention(header['contention_after'])}", flush=True)
        rows = summarize(samples)
        print()
        print_table(rows)
        print_phases(rows)
        targets = check_targets(rows)
        print("\ntargets")
        width = max(len(t["target"]) for t in targets)
        for t in targets:
            mark = {True: "PASS", False: "FAIL", None: "info"}[t["passed"]]
            print(f"  {mark}  {t['target']:<{width}}  {t['measured']}")

        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        results = Path(__file__).resolve().parent / "results"
        results.mkdir(exist_ok=True)
        path = results / f"backup_bench-{stamp}.json"
        path.write_text(json.dumps({"timestamp": stamp, "header": header, "variants": rows,
                                    "targets": targets}, indent=2) + "\n")
        print(f"\nresults: {path.relative_to(ROOT)}")
        return 1 if args.strict and any(t["passed"] is False for t in targets) else 0
    finally:
        if "django" in sys.modules:
            from django.db import connections

            connections.close_all()  # before the portal cluster goes away under them
        for cluster in reversed(clusters):
            cluster.destroy()
        stop_agents(scratch)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
