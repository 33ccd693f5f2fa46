"""The archive file writer: what it hashes is what it stores, and it starts writeback early."""

import hashlib
import os

from backups.engine import repository
from backups.engine.repository import HashingWriter, sha256_file


def test_what_is_hashed_is_what_is_stored(tmp_path):
    data = os.urandom(3 * repository.WRITEBACK_EVERY + 12345)
    path = tmp_path / "f.bin"
    writer = HashingWriter(path)
    for start in range(0, len(data), 1 << 20):
        writer.write(data[start:start + (1 << 20)])
    digest = writer.close()
    assert digest == hashlib.sha256(data).hexdigest()
    assert writer.bytes == len(data)
    assert sha256_file(path) == (digest, len(data))
    assert path.read_bytes() == data


def test_writeback_is_started_every_few_mib_and_the_kernel_accepts_it(tmp_path, monkeypatch):
    # bankvault runs on Linux (Debian), where libc has sync_file_range: no skipping elsewhere.
    real = repository._SYNC_FILE_RANGE
    assert real is not None, "sync_file_range not found in libc"
    calls = []

    def recording(fd, offset, nbytes, flags):
        rc = real(fd, offset, nbytes, flags)
        calls.append((offset, nbytes, rc, os.fstat(fd).st_size))
        return rc

    monkeypatch.setattr(repository, "_SYNC_FILE_RANGE", recording)
    every = repository.WRITEBACK_EVERY
    writer = HashingWriter(tmp_path / "f.bin")
    chunk = os.urandom(1 << 20)
    for _ in range(3 * every // len(chunk) + 2):
        writer.write(chunk)
    writer.close()
    # Three hints, each for the range written since the last, all of it already in the file
    # (the writer's buffer flushed first), and none refused by the kernel.
    assert [(off, n) for off, n, _, _ in calls] == [(0, every), (every, every), (2 * every, every)]
    assert all(rc == 0 for _, _, rc, _ in calls)
    assert all(size >= off + n for off, n, _, size in calls)


def test_a_byte_changed_on_disk_after_it_was_written_is_found_reading_back(tmp_path):
    path = tmp_path / "f.bin"
    writer = HashingWriter(path, read_back=True)
    writer.write(b"a" * 4096)
    writer.flush()
    # Someone else changes a byte already written; the reader, a MiB behind, has not read it.
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, b"b", 100)
    os.close(fd)
    writer.write(os.urandom(2 * repository.CHUNK))
    digest = writer.close()
    sha, size = writer.read_back
    assert size == writer.bytes
    assert sha != digest


def test_bytes_beyond_what_was_written_show_as_a_size_mismatch(tmp_path):
    path = tmp_path / "f.bin"
    writer = HashingWriter(path, read_back=True)
    writer.write(os.urandom(3 * repository.CHUNK))
    writer.flush()
    with open(path, "ab") as other:
        other.write(b"x")
    digest = writer.close()
    assert writer.read_back == (digest, writer.bytes + 1)


def test_an_unharmed_file_reads_back_as_written_and_abort_stops_the_reader(tmp_path):
    import threading

    writer = HashingWriter(tmp_path / "ok.bin", read_back=True)
    for _ in range(5):
        writer.write(os.urandom(700_000))
    assert writer.read_back is None  # known only after close
    digest = writer.close()
    assert writer.read_back == (digest, writer.bytes)

    aborted = HashingWriter(tmp_path / "aborted.bin", read_back=True)
    aborted.write(os.urandom(3 * repository.CHUNK))
    aborted.abort()
    assert not [t for t in threading.enumerate() if t.name.startswith("read-back-")]
