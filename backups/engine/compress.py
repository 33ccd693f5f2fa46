"""Streaming compression for archive files, in-process.

zstd uses libzstd's own worker threads. gzip is compressed as a series of independent gzip
members, one per block, on a thread pool (zlib releases the GIL): the result is an ordinary
.gz file that gzip/zcat/pg tools read, produced about `threads` times faster than one zlib
stream (the same idea as pigz).
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import zstandard

SUFFIX = {"zstd": ".zst", "gzip": ".gz", "none": ""}
DEFAULT_LEVEL = {"zstd": 3, "gzip": 6, "none": 0}
GZIP_BLOCK = 4 << 20


class _ZstdWriter:
    def __init__(self, sink, level: int, threads: int):
        cctx = zstandard.ZstdCompressor(level=level, threads=max(threads, 0))
        self._w = cctx.stream_writer(sink, closefd=False, write_return_read=True)

    def write(self, data) -> int:
        return self._w.write(data)

    def close(self) -> None:
        self._w.flush(zstandard.FLUSH_FRAME)
        self._w.close()


class _ParallelGzipWriter:
    def __init__(self, sink, level: int, threads: int):
        self._sink = sink
        self._level = level
        self._pool = ThreadPoolExecutor(max_workers=max(threads, 1), thread_name_prefix="gzip")
        self._pending: deque[Future] = deque()
        self._max_pending = max(threads, 1) * 2
        self._buf = bytearray()

    def _compress(self, block: bytes) -> bytes:
        return zlib.compress(block, self._level, wbits=31)  # 31 = gzip container

    def _submit(self, block: bytes) -> None:
        self._pending.append(self._pool.submit(self._compress, block))
        while len(self._pending) >= self._max_pending:
            self._sink.write(self._pending.popleft().result())

    def write(self, data) -> int:
        self._buf += data
        while len(self._buf) >= GZIP_BLOCK:
            self._submit(bytes(self._buf[:GZIP_BLOCK]))
            del self._buf[:GZIP_BLOCK]
        return len(data)

    def close(self) -> None:
        try:
            if self._buf or not self._pending:
                self._submit(bytes(self._buf))
                self._buf.clear()
            while self._pending:
                self._sink.write(self._pending.popleft().result())
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


class _Plain:
    def __init__(self, sink):
        self._sink = sink

    def write(self, data) -> int:
        return self._sink.write(data)

    def close(self) -> None:
        pass


def compressor(algo: str, sink, level: int | None = None, threads: int = 2):
    """A writer that compresses into ``sink`` (anything with .write). Call close() at the end."""
    level = level or DEFAULT_LEVEL[algo]
    if algo == "zstd":
        return _ZstdWriter(sink, level, threads)
    if algo == "gzip":
        return _ParallelGzipWriter(sink, level, threads)
    if algo == "none":
        return _Plain(sink)
    raise ValueError(f"unknown compression {algo!r}")


def open_decompressed(path: Path | str, algo: str) -> io.RawIOBase:
    """A readable binary stream of the uncompressed content."""
    if algo == "zstd":
        f = open(path, "rb")  # noqa: SIM115 - owned by the reader (closefd)
        return zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True, closefd=True)
    if algo == "gzip":
        return gzip.open(path, "rb")
    if algo == "none":
        return open(path, "rb")
    raise ValueError(f"unknown compression {algo!r}")
