"""Point-in-time recovery speed and exposure: bankvault's base backup, WAL push and recovery
against the raw PostgreSQL tools doing the same work, and how much written WAL is not yet safe
in the repository (RPO) in archive and streaming mode, on one pgbench database under load.

    .venv/bin/python bench/pitr_bench.py [--scale 20] [--load-seconds 60] [--repeat 3] [--strict]

Everything it needs it starts itself (two source clusters, the portal's catalog cluster, a
temporary repository, a pg_receivewal) and removes at the end. See bench/README.md for how to
read the output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # as a script, sys.path[0] is bench/, not the project root

# The data, the portal and the tool helpers are the backup benchmark's, so the two agree.
from backup_bench import DBNAME, MB, load_pgbench, sh, start_portal, tool_version  # noqa: E402

from backups.engine import pgbin, wal  # noqa: E402  (needs the path above; neither needs Django set up)
from backups.engine.cluster import LocalCluster, as_user_argv, free_port, make_owned_dir, wait_until  # noqa: E402
from backups.engine.receiver import Receiver  # noqa: E402

OS_USER = "postgres" if os.geteuid() == 0 else None  # who PostgreSQL (and so archive_command) runs as
SERVER_PYTHON = "/usr/bin/python3"
QUIET_ARCHIVE_TIMEOUT = 10
VARIANTS = {
    "1a": "base backup: raw pg_basebackup, server zstd",
    "1b": "base backup: bankvault runner.execute",
    "2a": "WAL push: cp",
    "2b": "WAL push: cp + sync file and dir",
    "2c": "WAL push: bankvault-walpush (zstd -1)",
    "3a": "PITR: raw tar -I zstd, restore_command cp",
    "3b": "PITR: bankvault pitr.recover",
}
RAW_OF = {"1b": "1a", "2c": "2b", "3b": "3a"}  # what each bankvault row is compared with


def pg_env(cluster: LocalCluster) -> dict:
    """The raw tools reach a source the way the engine does: TCP to 127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGHOST="127.0.0.1", PGPORT=str(cluster.port), PGUSER="postgres", PGDATABASE=DBNAME,
               LC_MESSAGES="C")
    return env


class Loader:
    """What backup_bench.load_pgbench needs of its Bench: the environment for pgbench."""

    def __init__(self, cluster: LocalCluster):
        self.env = pg_env(cluster)


def lsn(conn) -> int:
    """The server's WAL write position."""
    return wal.lsn_to_int(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])


def make_source(name: str, mode: str, repo, clusters: list) -> tuple[LocalCluster, object]:
    """A source cluster like a real server (fsync on, data checksums), registered as a Database
    with WAL mode ``mode``; in archive mode its archive_command is bankvault's push script."""
    from backups.models import Database

    port = free_port()
    db = Database(name=name, host="127.0.0.1", port=port, dbname=DBNAME, user="postgres", wal_mode=mode)
    db.set_password("trust-auth-ignores-it")  # the source trusts TCP clients on loopback
    db.save()
    wal.install_push_script(repo)
    wal.prepare_area(db, repo=repo)
    conf = {}
    if mode == "archive":
        conf = {"archive_mode": "on", "archive_command": wal.archive_command(db, repo), "archive_timeout": 60}
    cluster = LocalCluster.create(port=port, settings=conf)
    clusters.append(cluster)
    cluster.start()
    return cluster, db


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- 1. base backups ------------------------------------------------------------------------------
def base_backups(source: LocalCluster, db, pg_basebackup: str, scratch: Path, repeat: int, samples: dict):
    """Raw pg_basebackup and bankvault's BASE run, round-robin. Returns the last bankvault
    archive: the base backup that point-in-time recovery starts from."""
    from backups.engine import runner
    from backups.models import BackupKind, BackupRun

    env = pg_env(source)
    archive = None
    for rep in range(1, repeat + 1):
        out = scratch / "out"
        shutil.rmtree(out, ignore_errors=True)
        os.sync()  # dirty pages from earlier work must not be written back on a timed run's clock
        t0 = time.perf_counter()
        sh([pg_basebackup, "-D", str(out), "-Ft", "-X", "none", "--checkpoint=fast",
            "--compress=server-zstd:workers=2"], env)
        seconds = time.perf_counter() - t0
        record(samples, "1a", rep, repeat, seconds, dir_bytes(out))
        shutil.rmtree(out)

        run = BackupRun.enqueue(db, trigger=BackupRun.Trigger.MANUAL, actor_label="bench", kind=BackupKind.BASE)
        os.sync()
        # Queueing is the web request's part; a worker's backup is execute(), claim to catalog.
        t0 = time.perf_counter()
        archive = runner.execute(run.pk)
        seconds = time.perf_counter() - t0
        # Kept: the catalog points at them, and recovery uses the newest.
        record(samples, "1b", rep, repeat, seconds, archive.bytes)
    return archive


def record(samples: dict, key: str, rep: int, repeat: int, seconds: float, size: int | None, **extra) -> None:
    samples[key].append({"seconds": round(seconds, 4), "bytes": size, **extra})
    size_text = f"{size / MB:9.1f} MB" if size is not None else ""
    print(f"  run {rep}/{repeat}  {key}  {VARIANTS[key]:<44} {seconds:7.2f} s {size_text}", flush=True)


# -- load with RPO samples ---------------------------------------------------------------------
def under_load(cluster: LocalCluster, pgbench: str, seconds: int, n_samples: int, lag, *,
               target_before_end: float | None = None) -> dict:
    """Run `pgbench -c 2 -T seconds` and call ``lag(conn)`` (bytes of WAL written but not yet
    safe) at ``n_samples`` random moments; optionally capture the server's now() a little
    before the end as a recovery target."""
    rng = random.Random()
    events = [(rng.uniform(1.0, seconds - 1.0), "sample") for _ in range(n_samples)]
    if target_before_end is not None:
        events.append((seconds - target_before_end, "target"))
    events.sort()
    result: dict = {"samples": [], "target": None}
    with cluster.connect(DBNAME) as conn:
        start_lsn, t0 = lsn(conn), time.perf_counter()
        proc = subprocess.Popen([pgbench, "-c", "2", "-T", str(seconds)], env=pg_env(cluster),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for offset, kind in events:
                time.sleep(max(0.0, t0 + offset - time.perf_counter()))
                if kind == "target":
                    result["target"] = conn.execute("SELECT now()").fetchone()[0]
                else:
                    result["samples"].append({"at_s": round(time.perf_counter() - t0, 3), "bytes": lag(conn)})
            out, err = proc.communicate(timeout=seconds + 120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        elapsed = time.perf_counter() - t0
        end_lsn = lsn(conn)
    if proc.returncode != 0:
        raise SystemExit(f"pgbench failed (exit {proc.returncode}): {err.strip()[-1000:]}")
    tps = next((float(line.split()[2]) for line in out.splitlines() if line.startswith("tps =")), None)
    rate = (end_lsn - start_lsn) / elapsed
    for s in result["samples"]:
        s["seconds_of_wal"] = None if s["bytes"] is None else round(s["bytes"] / rate, 4)
    result.update(seconds=round(elapsed, 2), wal_bytes=end_lsn - start_lsn, wal_rate=rate, tps=tps)
    return result


def archive_lag(area: Path, segsize: int):
    """Bytes between the server's WAL write position and the end of the newest segment in the
    area. The area is read first, so a segment landing in between can only overstate it."""
    def lag(conn) -> int:
        safe = newest_safe_lsn(area, segsize)
        return max(0, lsn(conn) - safe)

    return lag


def stream_lag(slot: str):
    """Bytes between the server's WAL write position and what pg_receivewal reported flushed."""

    def lag(conn) -> int | None:
        row = conn.execute(
            "SELECT (pg_current_wal_lsn() - r.flush_lsn)::bigint FROM pg_stat_replication r "
            "JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = %s", (slot,)).fetchone()
        return None if row is None else max(0, int(row[0]))

    return lag


def switch_and_wait(cluster: LocalCluster, timeout: float = 300) -> str:
    """Close the current WAL segment and wait until the archiver reports it archived.
    pg_walfile_name(pg_switch_wal()) names the segment the switch closed (or, when there was
    nothing to close, the last one closed before), whatever was flushed when."""
    with cluster.connect(DBNAME) as conn:
        closed = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]

        def archived() -> bool:
            last = conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0]
            return last is not None and last[:24] >= closed

        wait_until(archived, timeout, interval=0.1, what=f"segment {closed} to be archived")
    return closed


def quiet_lag(source: LocalCluster, area: Path, segsize: int) -> dict:
    """With no load, a commit stays unarchived until archive_timeout closes its segment. It
    comes right after a real switch, which restarts the server's timer: the longest wait."""
    insert = "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 0, now())"
    source.sql(f"ALTER SYSTEM SET archive_timeout = '{QUIET_ARCHIVE_TIMEOUT}s'")
    source.sql("SELECT pg_reload_conf()")
    source.sql(insert, DBNAME)  # so that the switch below switches (it does nothing on an empty segment)
    switch_and_wait(source)
    series = []
    reset = None
    with source.connect(DBNAME) as conn:
        conn.execute(insert)
        written, t0 = lsn(conn), time.perf_counter()
        while time.perf_counter() < t0 + 3 * QUIET_ARCHIVE_TIMEOUT:
            safe = newest_safe_lsn(area, segsize)
            series.append((round(time.perf_counter() - t0, 3), max(0, lsn(conn) - safe)))
            if safe >= written:
                reset = series[-1][0]
                break
            time.sleep(0.1)
    return {"archive_timeout_s": QUIET_ARCHIVE_TIMEOUT, "written_bytes": series[0][1],
            "reset_after_s": reset, "series": series}


def newest_safe_lsn(area: Path, segsize: int) -> int:
    """The end of the newest segment in the area: WAL up to there is in the repository."""
    segments, _ = wal.scan(area)
    return (max((wal.parse_segment(n, segsize)[1] for n in segments), default=-1) + 1) * segsize


# -- 3. point-in-time recovery ---------------------------------------------------------------------
class PlainWal:
    """The archived WAL decompressed (and verified) into a plain directory: what the raw
    restore_command copies from, and the segments for the push benchmark. Not timed."""

    PAGE = 8192
    HEADER = 24  # a WAL page's short header

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(mode=0o755)
        self.full: dict[str, bool] = {}

    def stage(self, area: Path, segsize: int, first_segno: int, want: int) -> None:
        """Every segment from ``first_segno`` on, and older ones until ``want`` are full."""
        stored, _ = wal.scan(area)
        for name in sorted(stored, reverse=True):
            if wal.parse_segment(name, segsize)[1] < first_segno and self.count() >= want:
                break
            if name in self.full:
                continue
            data = wal.read_stored(stored[name])
            path = self.dir / name
            path.write_bytes(data)
            path.chmod(0o644)
            # A segment closed early by a switch (archive_timeout, a base backup) ends in empty
            # pages that compress 100x and would flatter the push figures: only segments with
            # WAL in their last page go to the push benchmark.
            self.full[name] = any(data[-self.PAGE + self.HEADER:])

    def count(self) -> int:
        return sum(self.full.values())

    def segments(self, want: int) -> list[Path]:
        """The newest ``want`` full segments, oldest first."""
        return [self.dir / n for n in sorted(n for n, full in self.full.items() if full)[-want:]]


def count_history(cluster: LocalCluster) -> int:
    return cluster.sql("SELECT count(*) FROM pgbench_history", DBNAME)[0][0]


def raw_recover(tarball: Path, plain: Path, target: str, scratch: Path) -> tuple[float, float, int]:
    """What an operator does by hand: untar, restore_command = cp, target time, promote."""
    base = make_owned_dir("raw-pitr-", OS_USER, parent=str(scratch))
    cluster = LocalCluster(base=base, port=free_port(), os_user=OS_USER)
    try:
        cluster.datadir.mkdir(mode=0o700)
        if OS_USER:
            shutil.chown(cluster.datadir, OS_USER, OS_USER)
        t0 = time.perf_counter()
        sh(as_user_argv(["tar", "-I", "zstd", "-xf", str(tarball), "-C", str(cluster.datadir)], OS_USER),
           dict(os.environ))
        unpacked = time.perf_counter() - t0
        cluster.write_conf({
            "listen_addresses": "127.0.0.1", "port": cluster.port, "unix_socket_directories": str(base),
            "archive_mode": "off",  # else the copy would archive its new timeline into the source's area
            "restore_command": f"cp {plain}/%f %p",
            "recovery_target_time": target, "recovery_target_action": "promote",
        })
        cluster._write_owned(cluster.datadir / "recovery.signal", "")
        cluster.start(timeout=600)
        wait_until(lambda: not cluster.sql("SELECT pg_is_in_recovery()")[0][0], 600, what="promotion")
        seconds = time.perf_counter() - t0
        return seconds, unpacked, count_history(cluster)
    finally:
        cluster.destroy()


def recoveries(db, target, tarball: Path, plain: Path, scratch: Path, repeat: int, samples: dict) -> None:
    from recovery.engine import pitr

    target_text = target.isoformat(sep=" ")
    for rep in range(1, repeat + 1):
        os.sync()  # as in base_backups()
        seconds, unpacked, rows = raw_recover(tarball, plain, target_text, scratch)
        record(samples, "3a", rep, repeat, seconds, None, history_rows=rows, until_replay_s=round(unpacked, 3))

        phases: dict[str, float] = {}
        os.sync()
        t0 = time.perf_counter()

        def progress(what: str, phases=phases, t0=t0) -> None:
            phases.setdefault(what, time.perf_counter() - t0)

        rc = pitr.recover(db, target, progress=progress)
        seconds = time.perf_counter() - t0
        try:
            rows = count_history(rc.cluster)
        finally:
            rc.destroy()
        # "replaying WAL" is reported once the backup is verified and unpacked and the server configured.
        record(samples, "3b", rep, repeat, seconds, None, history_rows=rows,
               until_replay_s=round(phases.get("replaying WAL", 0.0), 3))


# -- 2. WAL push throughput ---------------------------------------------------------------------
def wait_for_compaction(dest: Path, timeout: float = 120) -> None:
    """bankvault-walpush compresses in a detached process after the archiver has its answer:
    wait until it is done (off the clock), so the size is the stored size and nothing is
    still being written when the directory is removed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = [p.name for p in dest.rglob("*") if p.is_file()]
        if not any(n.startswith(".tmp-") or (n.startswith("0") and not n.endswith(".zst")) for n in names):
            return
        time.sleep(0.2)


def push_rounds(segments: list[Path], script: Path, scratch: Path, repeat: int, samples: dict) -> None:
    """Each segment archived by its own process, one after another, as the postgres user and
    through `sh -c`, which is how the archiver runs archive_command."""
    commands = {
        "2a": "cp {p} {d}/{f}",
        "2b": "cp {p} {d}/{f} && sync {d}/{f} {d}",
        "2c": f"{SERVER_PYTHON} -S {shlex.quote(str(script))} push --area {{d}} {{p}} {{f}}",
    }
    original = sum(p.stat().st_size for p in segments)
    for rep in range(1, repeat + 1):
        for key, template in commands.items():
            dest = make_owned_dir(f"push-{key}-", OS_USER, parent=str(scratch))
            loop = scratch / f"push-{key}.sh"
            loop.write_text("".join(
                "sh -c {} || exit 1\n".format(shlex.quote(template.format(
                    p=shlex.quote(str(p)), d=shlex.quote(str(dest)), f=shlex.quote(p.name))))
                for p in segments))
            loop.chmod(0o644)
            os.sync()  # as in base_backups()
            t0 = time.perf_counter()
            sh(as_user_argv(["sh", str(loop)], OS_USER), dict(os.environ))
            seconds = time.perf_counter() - t0
            os.sync()  # cp leaves its copies dirty: write them now, off the clock of the next round
            if key == "2c":
                wait_for_compaction(dest)
            # Distinct segments: while the detached compactor works, a segment is briefly there
            # both plain and as .zst (same name and sha256), which is by design.
            # The size counts the smaller copy of each.
            stored: dict[str, int] = {}
            for p in dest.rglob("0*"):
                if p.is_file():
                    segment, size = p.name.split("-")[0], p.stat().st_size
                    stored[segment] = min(size, stored.get(segment, size))
            if len(stored) != len(segments):
                raise SystemExit(f"{VARIANTS[key]}: {len(stored)} of {len(segments)} segments stored in {dest}")
            size = sum(stored.values())
            record(samples, key, rep, repeat, seconds, size, segments_per_s=round(len(segments) / seconds, 2),
                   original_bytes=original)
            shutil.rmtree(dest, ignore_errors=True)


# -- 4. streaming -----------------------------------------------------------------------------------
class ReceiverThread(threading.Thread):
    """What `manage.py wal_receiver --interval 0.2` does, in a thread of this process."""

    def __init__(self, db, repo):
        super().__init__(name="wal-receiver", daemon=True)
        self.receiver = Receiver(db, repo)
        self.halt = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.receiver.poll()
            except Exception as exc:  # keep polling, as the service does; reported at the end
                self.errors.append(f"{exc.__class__.__name__}: {exc}")
            self.halt.wait(0.2)

    def stop(self) -> None:
        self.halt.set()
        if self.ident is not None:  # started
            self.join(timeout=30)
        self.receiver.stop()


# -- output ------------------------------------------------------------------------------------------
def summarize(samples: dict) -> dict:
    rows = {}
    for key, runs in samples.items():
        secs = [r["seconds"] for r in runs]
        sizes = [r["bytes"] for r in runs if r["bytes"] is not None]
        rows[key] = {"label": VARIANTS[key], "median_s": statistics.median(secs), "min_s": min(secs),
                     "max_s": max(secs), "size_bytes": int(statistics.median(sizes)) if sizes else None,
                     "runs": runs}
    for key, row in rows.items():
        raw = rows[RAW_OF.get(key, key)]
        row["time_vs_raw"] = row["median_s"] / raw["median_s"] if key in RAW_OF else None
    return rows


def rpo_row(load: dict) -> dict:
    got = [s for s in load["samples"] if s["bytes"] is not None]
    byts = [s["bytes"] for s in got]
    return {"samples": len(load["samples"]), "answered": len(got),
            "max_bytes": max(byts) if byts else None, "median_bytes": statistics.median(byts) if byts else None,
            "max_s": max(byts) / load["wal_rate"] if byts else None,
            "median_s": statistics.median(byts) / load["wal_rate"] if byts else None,
            "wal_rate": load["wal_rate"], "tps": load["tps"], "load_seconds": load["seconds"]}


def print_table(rows: dict, n_segments: int, rpo: dict, quiet: dict, checks: dict) -> None:
    def shown(key, median, low, high):
        if key.startswith("2"):  # the push rows read better as a rate
            return f"{n_segments / median:.1f} seg/s", f"{n_segments / high:.1f}-{n_segments / low:.1f} seg/s"
        return f"{median:.2f} s", f"{low:.2f}-{high:.2f} s"

    head = ["measurement", "median", "range", "size MB", "time/raw"]
    body = []
    for key, r in rows.items():
        body.append([f"{key}  {r['label']}", *shown(key, r["median_s"], r["min_s"], r["max_s"]),
                     f"{r['size_bytes'] / MB:.1f}" if r["size_bytes"] is not None else "",
                     f"{r['time_vs_raw']:.2f}x" if r["time_vs_raw"] is not None else ""])
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    for line in [head, *body]:
        print("  ".join([line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])]))
    original = rows["2c"]["runs"][0]["original_bytes"]
    print(f"  2: {n_segments} full 16 MB segments ({original / MB:.0f} MB); walpush stores them "
          f"{original / rows['2c']['size_bytes']:.2f}x smaller (zstd -1, sha256 in the name)")
    raw_up, bv_up = (statistics.median(r["until_replay_s"] for r in rows[k]["runs"]) for k in ("3a", "3b"))
    print(f"  3: replay started after {raw_up:.2f} s raw (untar) and {bv_up:.2f} s bankvault (verify, untar; WAL "
          f"staging runs alongside); replay to promotion took {rows['3a']['median_s'] - raw_up:.2f} s and "
          f"{rows['3b']['median_s'] - bv_up:.2f} s")
    print(f"  3: target {checks['target']}; pgbench_history rows at the target: bankvault "
          f"{checks['rows_bankvault']}, raw {checks['rows_raw']} (source after the load: {checks['rows_source']:,})")

    print("\nRPO: WAL written but not yet safe in the repository, at random moments")
    head = ["mode", "samples", "max", "median", "WAL rate"]
    body = []
    for label, r in rpo.items():
        if r["max_bytes"] is None:
            body.append([label, f"{r['answered']}/{r['samples']}", "", "", ""])
            continue
        body.append([label, f"{r['answered']}/{r['samples']}",
                     f"{r['max_bytes'] / MB:.2f} MB = {r['max_s']:.3f} s",
                     f"{r['median_bytes'] / MB:.2f} MB = {r['median_s']:.3f} s",
                     f"{r['wal_rate'] / MB:.2f} MB/s"])
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    for line in [head, *body]:
        print("  ".join([line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])]))
    reset = (f"for {quiet['reset_after_s']:.1f} s" if quiet["reset_after_s"] is not None
             else f"for more than {3 * quiet['archive_timeout_s']} s")
    print(f"  archive, quiet (archive_timeout {quiet['archive_timeout_s']} s): a commit right after a segment switch "
          f"({quiet['written_bytes']:,} bytes of WAL) stayed unarchived {reset}")


def check_targets(rows: dict, rpo: dict, quiet: dict, checks: dict, segsize: int) -> list[dict]:
    b, p, r = rows["1b"], rows["2c"], rows["3b"]
    push_rate = checks["segments"] / p["median_s"]
    arch, strm = rpo["archive, pgbench -c 2"], rpo["stream, pgbench -c 2"]
    arch_limit = 1.25 * segsize
    reset = quiet["reset_after_s"]
    targets = [
        ("bankvault base backup <= 1.15 x raw pg_basebackup", b["time_vs_raw"] <= 1.15,
         f"{b['median_s']:.2f} s vs {rows['1a']['median_s']:.2f} s = {b['time_vs_raw']:.2f}x"),
        ("walpush archive_command >= 20 segments/s", push_rate >= 20,
         f"{push_rate:.1f} segments/s (cp + sync: {checks['segments'] / rows['2b']['median_s']:.0f}/s)"),
        ("bankvault PITR <= 1.2 x raw recovery", r["time_vs_raw"] <= 1.2,
         f"{r['median_s']:.2f} s vs {rows['3a']['median_s']:.2f} s = {r['time_vs_raw']:.2f}x"),
        ("both recoveries hold the same pgbench_history rows", checks["rows_equal"],
         f"bankvault {checks['rows_bankvault']}, raw {checks['rows_raw']}"),
        ("archive mode RPO under load <= 1.25 segments", arch["max_bytes"] is not None
         and arch["max_bytes"] <= arch_limit,
         f"max {arch['max_bytes'] / MB:.2f} MB (limit {arch_limit / MB:.1f} MB)" if arch["max_bytes"] is not None
         else "no samples"),
        ("archive mode, quiet: lag gone within archive_timeout + 2 s", reset is not None
         and reset <= QUIET_ARCHIVE_TIMEOUT + 2,
         f"after {reset:.1f} s" if reset is not None else "not within 3 x archive_timeout"),
        ("stream mode RPO under load <= 0.2 s of WAL", strm["max_s"] is not None and strm["answered"] == strm["samples"]
         and strm["max_s"] <= 0.2,
         f"max {strm['max_s']:.3f} s ({strm['max_bytes'] / MB:.2f} MB), {strm['answered']}/{strm['samples']} samples"
         if strm["max_s"] is not None else "no samples"),
    ]
    return [{"target": name, "passed": bool(ok), "measured": got} for name, ok, got in targets]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=20, help="pgbench scale (20 = 2M accounts, ~300 MB)")
    parser.add_argument("--load-seconds", type=int, default=60,
                        help="pgbench -c 2 load between the base backup and the recovery target")
    parser.add_argument("--stream-seconds", type=int, default=20, help="pgbench load for the streaming RPO")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per variant; medians are reported")
    parser.add_argument("--segments", type=int, default=64, help="WAL segments for the push benchmark")
    parser.add_argument("--samples", type=int, default=20, help="RPO samples per load")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    args = parser.parse_args()
    if args.scale < 1 or args.repeat < 1 or args.segments < 1 or args.samples < 1:
        parser.error("--scale, --repeat, --segments and --samples must be at least 1")
    if args.load_seconds < 10 or args.stream_seconds < 10:
        parser.error("--load-seconds and --stream-seconds must be at least 10")

    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="bv-pitr-bench-"))
    scratch.chmod(0o755)  # archive_command and restore_command run as postgres and must get in
    os.environ["BANKVAULT_SCRATCH_DIR"] = str(scratch / "pitr-scratch")
    clusters: list[LocalCluster] = []
    receiver: ReceiverThread | None = None
    try:
        # The catalog's data is worth nothing after the run: fsync off.
        clusters.append(LocalCluster.create(throwaway=True))
        start_portal(clusters[0], scratch)

        from backups.engine.repository import default_repository

        repo = default_repository()
        inst = pgbin.for_server()
        pgbench = inst.tool("pgbench")
        samples: dict[str, list] = {k: [] for k in VARIANTS}

        source, db = make_source("bench", "archive", repo, clusters)
        print(f"loading pgbench scale {args.scale} with random filler (archive mode on) ...", flush=True)
        t0 = time.perf_counter()
        load_pgbench(source, Loader(source), pgbench, args.scale)
        (db_bytes, pg_version, segsize), = source.sql(
            "SELECT pg_database_size(%s), current_setting('server_version'), "
            "(SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size')", params=(DBNAME,))
        switch_and_wait(source)  # the load's WAL is all archived before timing starts
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)

        load_before = "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + \
            " before the first timed run (other work on the machine shows up directly)"
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), platform.processor() or "?")
        header = {
            "cores": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "scale": args.scale,
            "repeat": args.repeat, "load_seconds": args.load_seconds, "stream_seconds": args.stream_seconds,
            "loadavg_before": os.getloadavg(), "db_size_bytes": db_bytes, "postgresql": pg_version,
            "wal_segment_size": segsize,
            "pg_basebackup": tool_version([inst.tool("pg_basebackup"), "--version"]),
            "zstd": tool_version(["zstd", "-V"]), "server_python": tool_version([SERVER_PYTHON, "-V"]),
            "reference_not_measured_here": {
                "scale": 100, "raw_pg_basebackup_s": 5, "pgbackrest_2_45_zstd_2_processes_s": 15,
                "gzip_variants_s": 44, "raw_pitr_s": 9, "pgbackrest_pitr_s": 7.5},
        }
        print(f"""
bankvault point-in-time recovery benchmark
  machine     {header['cores']} cores ({cpu}), Linux {header['kernel']}
  sources     PostgreSQL {pg_version}, fsync on, data checksums; pg_basebackup {header['pg_basebackup']};
              zstd {header['zstd']}; archive_command runs {SERVER_PYTHON} {header['server_python']}
  data        pgbench scale {args.scale}, {100_000 * args.scale:,} accounts with random filler;
              database {db_bytes / MB:.0f} MB; WAL segments {segsize // 1024 // 1024} MiB
  machine load {load_before}
  runs        {args.repeat} per variant, interleaved raw, bankvault, raw, ...; median wall time; MB = 10^6 bytes;
              dirty pages written back (sync) before every timed run
  reference   reported, not measured here (scale 100, this kind of machine): base backup raw
              pg_basebackup ~5 s, pgBackRest 2.45 zstd 2 processes ~15 s, gzip variants ~44 s;
              PITR raw ~9 s, pgBackRest ~7.5 s
""", flush=True)

        print("1. base backups (archive mode; both wait until the backup's WAL is archived)", flush=True)
        base = base_backups(source, db, inst.tool("pg_basebackup"), scratch, args.repeat, samples)

        print(f"\n3. pgbench -c 2 -T {args.load_seconds} after the base backup (archive_timeout 60 s), "
              f"{args.samples} RPO samples ...", flush=True)
        area = wal.area_path(db, repo)
        archive_load = under_load(source, pgbench, args.load_seconds, args.samples, archive_lag(area, segsize),
                                  target_before_end=3.0)
        target = archive_load["target"]
        switch_and_wait(source)  # the WAL after the target is in the repository
        gaps = wal.timelines(area, segsize)[1].gaps
        if gaps:
            raise SystemExit(f"the archive has gaps: {gaps}")
        rows_source = count_history(source)
        print(f"  {archive_load['tps']:.0f} tps, WAL {archive_load['wal_rate'] / MB:.2f} MB/s; target {target}",
              flush=True)

        # Untimed preparation of the raw path: the same base.tar.zst where postgres can read it,
        # and the archived WAL decompressed into a plain directory for `cp %f %p`.
        man = json.loads((repo.archive_dir(base.path) / "manifest.json").read_text())
        tar_entry = next(f for f in man["files"] if f["role"] == "base")
        raw_in = scratch / "raw-in"
        raw_in.mkdir(mode=0o755)
        tarball = raw_in / Path(tar_entry["path"]).name
        shutil.copyfile(repo.archive_dir(base.path) / tar_entry["path"], tarball)
        tarball.chmod(0o644)
        plain = PlainWal(scratch / "plain-wal")
        first_segno = wal.segment_of_lsn(man["wal"]["start_lsn"], segsize)
        plain.stage(area, segsize, first_segno, args.segments)
        recoveries(db, target, tarball, plain.dir, scratch, args.repeat, samples)

        topped_up = 0
        while plain.count() < args.segments and topped_up < 300:
            # More WAL for the push benchmark, written after the recoveries. Right after a
            # checkpoint pgbench writes mostly full-page images, the most WAL per second.
            print(f"  {plain.count()} full segments archived; CHECKPOINT + pgbench -c 2 -T 10 for more "
                  "(not timed) ...", flush=True)
            source.sql("CHECKPOINT")
            topped_up += under_load(source, pgbench, 10, 0, archive_lag(area, segsize))["seconds"]
            switch_and_wait(source)
            plain.stage(area, segsize, first_segno, args.segments)
        push_segments = plain.segments(args.segments)

        print(f"\n2. WAL push, {len(push_segments)} archived segments one process each, as {OS_USER or 'ourselves'}",
              flush=True)
        push_rounds(push_segments, repo.root / "bin" / "bankvault-walpush", scratch, args.repeat, samples)

        print(f"\n4. RPO: archive mode with no load (archive_timeout {QUIET_ARCHIVE_TIMEOUT} s) ...", flush=True)
        quiet = quiet_lag(source, area, segsize)
        source.destroy()  # done with it; its disk and memory go back before the next load

        print(f"4. RPO: streaming mode, second source (pgbench scale {args.scale}, pg_receivewal --synchronous) ...",
              flush=True)
        streamed, sdb = make_source("streamed", "stream", repo, clusters)
        load_pgbench(streamed, Loader(streamed), pgbench, args.scale)
        receiver = ReceiverThread(sdb, repo)
        receiver.start()
        slot_lag = stream_lag(receiver.receiver.slot)
        with streamed.connect(DBNAME) as conn:
            wait_until(lambda: slot_lag(conn) is not None, 60, interval=0.1, what="pg_receivewal to stream")
        stream_load = under_load(streamed, pgbench, args.stream_seconds, args.samples, slot_lag)
        receiver.stop()
        print(f"  {stream_load['tps']:.0f} tps, WAL {stream_load['wal_rate'] / MB:.2f} MB/s", flush=True)

        rows = summarize(samples)
        rows_bv = sorted({r["history_rows"] for r in samples["3b"]})
        rows_raw = sorted({r["history_rows"] for r in samples["3a"]})
        checks = {"target": target.isoformat(sep=" "), "segments": len(push_segments), "rows_source": rows_source,
                  "rows_bankvault": ", ".join(map(str, rows_bv)), "rows_raw": ", ".join(map(str, rows_raw)),
                  "rows_equal": rows_bv == rows_raw and len(rows_bv) == 1}
        rpo = {"archive, pgbench -c 2": rpo_row(archive_load), "stream, pgbench -c 2": rpo_row(stream_load)}
        print()
        print_table(rows, len(push_segments), rpo, quiet, checks)
        if receiver.errors:
            print(f"  receiver errors while streaming: {receiver.errors[:3]}")
        targets = check_targets(rows, rpo, quiet, checks, segsize)
        print("\ntargets")
        for t in targets:
            print(f"  {'PASS' if t['passed'] else 'FAIL'}  {t['target']:<52} {t['measured']}")

        total = time.perf_counter() - started
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        results = Path(__file__).resolve().parent / "results"
        results.mkdir(exist_ok=True)
        path = results / f"pitr_bench-{stamp}.json"
        path.write_text(json.dumps({
            "timestamp": stamp, "header": header, "variants": rows, "checks": checks, "rpo": rpo, "quiet": quiet,
            "loads": {"archive": archive_load, "stream": stream_load}, "receiver_errors": receiver.errors,
            "targets": targets, "total_seconds": round(total, 1),
            "loadavg_after": os.getloadavg()}, indent=2, default=str) + "\n")
        print(f"\nresults: {path.relative_to(ROOT)}  (whole run {total:.0f} s; load average now "
              f"{os.getloadavg()[0]:.2f})")
        return 1 if args.strict and not all(t["passed"] for t in targets) else 0
    finally:
        if receiver is not None:
            receiver.stop()  # before its source goes away; a second stop is harmless
        if "django" in sys.modules:
            from django.db import connections

            connections.close_all()  # before the portal cluster goes away under them
        for cluster in reversed(clusters):
            cluster.destroy()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
