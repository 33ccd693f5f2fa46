"""The archive_command/restore_command script, run as the server's OS user exactly as
PostgreSQL runs it: atomic, idempotent, never overwriting, and honest about damage."""

import hashlib
import os
import pwd
import signal
import subprocess
import time
from pathlib import Path

import pytest

from backups import walpush
from backups.engine import wal
from backups.engine.cluster import as_user_argv, wait_until
from tests.backups.test_failures import tmpfs

pytestmark = [pytest.mark.pg]
SEGMENT = "000000010000000000000003"
OS_USER = "postgres" if os.geteuid() == 0 else None


@pytest.fixture
def area(repo):
    path = repo.root / "wal" / "db"
    path.mkdir(parents=True)
    _own(path)
    script = wal.install_push_script(repo)
    return path, script


def _own(path: Path):
    if OS_USER:
        pw = pwd.getpwnam(OS_USER)
        for p in [path, *path.rglob("*")]:
            os.chown(p, pw.pw_uid, pw.pw_gid)


def segment_file(directory: Path, seed: bytes, size: int = 16 * 1024 * 1024) -> Path:
    """16 MB of WAL-like content: half noise (as real WAL), half zeros (as a switched segment)."""
    noise = hashlib.shake_256(seed).digest(size // 2)
    path = directory / f"src-{seed.decode()}"
    path.write_bytes(noise + bytes(size - len(noise)))
    path.chmod(0o644)
    return path


def push(script, area_path, source, name=SEGMENT, compress="inline", **kw):
    """As archive_command runs it. Inline compression unless a test is about the background
    compressor, so that what is stored is settled when the push returns."""
    return subprocess.run(as_user_argv(["/usr/bin/python3", "-S", str(script), "push", "--area", str(area_path),
                                        "--compress", compress, str(source), name], OS_USER),
                          capture_output=True, text=True, **kw)


def fetch(script, area_path, name, dest):
    return subprocess.run(as_user_argv(["/usr/bin/python3", "-S", str(script), "fetch", "--area", str(area_path),
                                        name, str(dest)], OS_USER), capture_output=True, text=True)


def stored_files(area_path):
    return sorted(p for p in area_path.rglob("*") if p.is_file() and not p.name.startswith("."))


def test_push_stores_with_checksum_in_the_name_and_compresses_afterwards(area, tmp_path, repo):
    area_path, script = area
    src = segment_file(repo.root, b"a")
    result = push(script, area_path, src, compress="zstd")  # what archive_command does by default
    assert result.returncode == 0, result.stderr
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    # Durable as it is when the push returns; the detached compactor swaps in the .zst later.
    # (for a moment both forms may exist: the .zst is linked before the plain copy goes)
    stored = stored_files(area_path)
    assert stored and all(p.parent.name == SEGMENT[:16] and p.name.startswith(f"{SEGMENT}-{sha}") for p in stored)
    wait_until(lambda: [p.name for p in stored_files(area_path)] == [f"{SEGMENT}-{sha}.zst"], 20,
               what="the background compression")
    [stored] = stored_files(area_path)
    assert stored.stat().st_size < src.stat().st_size
    assert not list(area_path.rglob(".tmp-*"))


def test_identical_repush_succeeds_and_stores_nothing_new(area, repo):
    area_path, script = area
    src = segment_file(repo.root, b"a")
    assert push(script, area_path, src).returncode == 0
    before = stored_files(area_path)
    again = push(script, area_path, src)
    assert again.returncode == 0, again.stderr
    assert stored_files(area_path) == before


def test_different_content_is_refused_and_the_stored_copy_is_untouched(area, repo):
    area_path, script = area
    assert push(script, area_path, segment_file(repo.root, b"a")).returncode == 0
    [stored] = stored_files(area_path)
    digest, mtime = hashlib.sha256(stored.read_bytes()).hexdigest(), stored.stat().st_mtime_ns

    other = push(script, area_path, segment_file(repo.root, b"b"))
    assert other.returncode == 1
    assert "already archived with different content" in other.stderr and "refusing to overwrite" in other.stderr
    assert stored_files(area_path) == [stored]
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest and stored.stat().st_mtime_ns == mtime


def test_a_push_killed_midway_leaves_no_segment_visible(area, repo):
    area_path, script = area
    fifo = repo.root / "fifo"
    os.mkfifo(fifo)
    os.chmod(fifo, 0o666)
    proc = subprocess.Popen(as_user_argv(["/usr/bin/python3", "-S", str(script), "push", "--area", str(area_path),
                                          str(fifo), SEGMENT], OS_USER), stderr=subprocess.PIPE)  # default mode
    writer = open(fifo, "wb")  # noqa: SIM115
    writer.write(os.urandom(4 * 1024 * 1024))  # half a segment, then the push blocks reading
    writer.flush()
    wait_until(lambda: any(p.name.startswith(".tmp-") for p in area_path.rglob("*")), 10, what="the temp file")
    if OS_USER:
        _kill_tree(proc.pid)
    else:
        proc.kill()
    proc.wait()
    writer.close()
    assert stored_files(area_path) == []
    # PostgreSQL retries; the retry succeeds.
    src = segment_file(repo.root, b"a")
    assert push(script, area_path, src).returncode == 0
    assert len(stored_files(area_path)) == 1


def _kill_tree(pid: int):
    """SIGKILL runuser's child (the python process) — the push itself, not just the wrapper."""
    for child in Path("/proc").iterdir():
        if child.name.isdigit():
            try:
                stat = (child / "stat").read_text()
                if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                    os.kill(int(child.name), signal.SIGKILL)
            except (OSError, ValueError):
                pass
    os.kill(pid, signal.SIGKILL)


def test_a_full_disk_fails_the_push_without_a_partial_and_it_succeeds_once_space_returns(area, repo):
    area_path, script = area
    full = repo.root / "small"
    with tmpfs(full, "12m"):
        _own(full)
        big = repo.root / "noise"
        big.write_bytes(os.urandom(16 * 1024 * 1024))  # incompressible: needs 16 MB
        big.chmod(0o644)
        result = push(script, full, big)
        assert result.returncode == 1
        assert "No space left on device" in result.stderr
        assert list(full.rglob("*-*")) == []  # nothing visible, temp removed
        subprocess.run(["mount", "-o", "remount,size=64m", str(full)], check=True)
        assert push(script, full, big).returncode == 0
        assert len(stored_files(full)) == 1


def test_fetch_restores_verified_content_and_reports_missing_and_damaged(area, repo):
    area_path, script = area
    src = segment_file(repo.root, b"a")
    assert push(script, area_path, src).returncode == 0
    out = repo.root / "out"
    out.mkdir()
    _own(out)

    ok = fetch(script, area_path, SEGMENT, out / "RECOVERYXLOG")
    assert ok.returncode == 0, ok.stderr
    assert (out / "RECOVERYXLOG").read_bytes() == src.read_bytes()

    assert fetch(script, area_path, "000000010000000000000009", out / "x").returncode == 1  # end of WAL

    [stored] = stored_files(area_path)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x10
    stored.write_bytes(bytes(data))
    bad = fetch(script, area_path, SEGMENT, out / "y")
    assert bad.returncode == 127  # > 125: PostgreSQL aborts recovery instead of ending it here
    assert "damaged" in bad.stderr
    assert not (out / "y").exists()


def test_names_and_subdirectories(tmp_path):
    assert walpush.subdir("/a", "000000010000000200000003") == "/a/0000000100000002"
    assert walpush.subdir("/a", "00000002.history") == "/a"
    assert wal.segment_name(1, 0x203, 16 * 1024 * 1024) == "000000010000000200000003"
    assert wal.parse_segment("000000010000000200000003", 16 * 1024 * 1024) == (1, 0x203)
    assert wal.segments_between(1, "0/2000028", "0/3000100", 16 * 1024 * 1024) == [
        "000000010000000000000002", "000000010000000000000003"]
    assert wal.parse_history("1\t0/3000098\tno recovery target specified\n") == [(1, "0/3000098")]


def test_archive_command_keeps_up_with_a_busy_server(area, repo, make_archiving_cluster, db):
    """A real cluster archives through the script; under a burst of writes the archiver keeps
    up (no 'failed' count, nothing left waiting in archive_status)."""
    cluster, db = make_archiving_cluster(name="busy")
    with cluster.connect() as conn:
        conn.execute("CREATE TABLE t AS SELECT g, md5(g::text) AS v FROM generate_series(1, 400000) g")
        for _ in range(3):
            conn.execute("SELECT pg_switch_wal() FROM (SELECT txid_current()) x")
            conn.execute("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 50000) g")
        conn.execute("SELECT pg_switch_wal() FROM (SELECT txid_current()) x")
        last = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0]

    def caught_up():
        with cluster.connect() as c:
            archived, failed = c.execute("SELECT last_archived_wal, failed_count FROM pg_stat_archiver").fetchone()
        return archived and archived >= last[:24], failed

    start = time.monotonic()
    wait_until(lambda: caught_up()[0] or None, 60, what="the archiver to catch up")
    assert caught_up()[1] == 0
    states = wal.timelines(wal.area_path(db, repo), 16 * 1024 * 1024)
    assert states[1].gaps == []
    assert time.monotonic() - start < 60
