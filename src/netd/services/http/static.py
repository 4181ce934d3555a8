"""
The static file server of an http service: a root folder served with listings,
conditional requests, byte ranges (multipart too) and sendfile for big files.
"""

from __future__ import annotations

import base64
import email.utils
import errno
import functools
import hashlib
import html
import io
import mimetypes
import os
import stat
import urllib.parse
from collections import deque
from collections.abc import Iterator
from typing import IO, Any

import attrs
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from netd.records import Record
from netd.services.http.app import (
    Exchange,
    Headers,
    StaticOptions,
    query_of,
    quote_path,
    respond_error,
)

__all__ = ["StaticFiles", "http_date", "parse_http_date"]

# One read of a file no bigger than this is cheaper than a producer.
_SMALL_FILE = 64 * 1024
# Small files kept in memory, checked against each request's stat: at most this much.
_SMALL_FILES_BYTES = 32 * 1024 * 1024
# More ranges than this in one request is a resource attack (CVE-2011-3192), not a client.
_MAX_RANGES = 16
_ALLOW = b"GET, HEAD"
_REAL_PATHS = 4096
# The request headers that may make a file's answer other than the whole file
# (RFC 9110 13.1, 14.2); most requests have none, and skip those checks.
_VALIDATING = frozenset(
    (b"if-match", b"if-unmodified-since", b"if-none-match", b"if-modified-since", b"range")
)
# A file changed less than this ago is read again on each request, its bytes not
# kept: a rewrite within the file system's timestamp tick leaves its stat as it
# was (git's "racily clean" entries).  Far above any tick (ext4: a few ms).
_RACY_NS = 1_000_000_000


@attrs.define(repr=False, eq=False)
class _Known(Record):
    """One file as its stat left it: its validators, its type and, if small, its content."""

    identity: tuple[int, int, int, int]
    etag: bytes
    modified: int
    last_modified: bytes
    kind: bytes
    content: bytes | None = None


class _NotFound(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


class StaticFiles:
    """One service's static root: answers GET and HEAD for the files under it."""

    def __init__(self, options: StaticOptions, clock: Any) -> None:
        assert options.root is not None
        self.static = options
        self.root = os.path.realpath(options.root)
        self.clock = clock
        self.error = respond_error
        # realpath() walks every component with lstat(); its answer is kept a second.
        self._real_paths: dict[str, tuple[str, float]] = {}
        self._known: dict[str, _Known] = {}
        self._small_bytes = 0
        self.types = mimetypes.MimeTypes()

    def serve(self, exchange: Exchange, path: str) -> None:
        if exchange.method not in ("GET", "HEAD"):
            self.error(exchange, 405, [(b"Allow", _ALLOW)])
            return
        try:
            self._static(exchange, path)
        except _NotFound as e:
            self.error(exchange, e.status)

    def _static(self, exchange: Exchange, path: str) -> None:
        full = self._resolve(path)
        try:
            info = os.stat(full)
        except (FileNotFoundError, NotADirectoryError):
            raise _NotFound(404) from None
        except OSError as e:
            # A name too long for the file system, a symbolic link loop: no such file
            # to serve (nginx says 404 to the first, and a loop leads nowhere).
            if e.errno in (errno.ENAMETOOLONG, errno.ELOOP):
                raise _NotFound(404) from None
            raise
        if stat.S_ISDIR(info.st_mode):
            if not path.endswith("/"):
                # The path is normalised (one leading slash): never protocol-relative.
                location = quote_path(path + "/")
                query = query_of(exchange.target)
                if query:
                    location += "?" + query
                self.error(exchange, 301, [(b"Location", location.encode("latin-1", "replace"))])
                return
            index = os.path.join(full, "index.html")
            if os.path.isfile(index):
                full, info = index, os.stat(index)
            elif self.static.listing:
                self._listing(exchange, path, full)
                return
            else:
                raise _NotFound(403)
        elif path.endswith("/"):
            # "/index.html/" names a directory, and there is none (nginx says 404 too).
            raise _NotFound(404)
        if not stat.S_ISREG(info.st_mode):
            raise _NotFound(404)
        self._file(exchange, full, info)

    def _resolve(self, path: str) -> str:
        """The file behind C{path} (normalised: decoded already), never outside the root."""
        # Kept by the path as asked: only a path that passed the checks below is.
        cached = self._real_paths.get(path)
        now = self.clock.seconds()
        if cached is None or cached[1] < now:
            segments = path.split("/")
            for segment in segments:
                # _path_of refuses these already; checked again because this is
                # the line that keeps requests inside the root.
                if segment in (".", "..") or "\\" in segment or "\x00" in segment:
                    raise _NotFound(404)
            relative = "/".join(s for s in segments if s)
            if len(self._real_paths) >= _REAL_PATHS:
                self._real_paths.clear()
            cached = os.path.realpath(os.path.join(self.root, relative)), now + 1.0
            self._real_paths[path] = cached
        real = cached[0]
        if real != self.root and not real.startswith(self.root + os.sep):
            raise _NotFound(403)
        return real

    def _listing(self, exchange: Exchange, path: str, directory: str) -> None:
        title = html.escape(path)
        rows = []
        for name in sorted(os.listdir(directory)):
            suffix = "/" if os.path.isdir(os.path.join(directory, name)) else ""
            href = urllib.parse.quote(os.fsencode(name)) + suffix
            rows.append(f'<li><a href="{href}">{html.escape(name)}{suffix}</a></li>')
        page = (
            f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>Index of {title}</title>"
            f"</head>\n<body><h1>Index of {title}</h1>\n<ul>\n" + "\n".join(rows) + "\n</ul>\n"
            "</body></html>\n"
        )
        # Names that are not UTF-8 (surrogate escapes) show as U+FFFD's stand-in.
        body = page.encode("utf-8", "replace")
        exchange.respond(200, [(b"Content-Type", b"text/html; charset=utf-8")], body)

    def content_type(self, full: str) -> bytes:
        kind, encoding = self.types.guess_type(full, strict=False)
        if kind is None or encoding is not None:
            return b"application/octet-stream"
        if kind.startswith("text/") or kind in ("application/javascript", "application/json"):
            return f"{kind}; charset=utf-8".encode()
        return kind.encode()

    def _known_file(self, full: str, info: os.stat_result) -> _Known:
        """
        What a file's responses take from it, kept while its identity stays the same.

        The request's own stat (inode, size, mtime and ctime in ns) validates
        what is kept, so an edited file is read again at once; guessing its type
        and formatting its validators every time was a tenth of a small
        response's cost.  The ctime, which no user can set back, tells an
        in-place rewrite of the same size whose mtime was restored (C{cp -p},
        C{rsync -t --inplace}).
        """
        identity = (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        known = self._known.get(full)
        if known is not None and known.identity == identity:
            return known
        if known is not None:
            self._small_bytes -= len(known.content or b"")
        elif len(self._known) >= _REAL_PATHS:
            self._forget_files()
        modified = int(info.st_mtime)
        known = _Known(
            identity,
            b'"%x-%x-%x-%x"' % identity,
            modified,
            http_date(modified),
            self.content_type(full),
        )
        self._known[full] = known
        return known

    def _forget_files(self) -> None:
        self._known.clear()
        self._small_bytes = 0

    def _small_file(self, full: str, known: _Known, racy: bool) -> bytes:
        """
        The content of a small file, kept with what else is known of it unless
        C{racy}: opening and reading every time was a quarter of a small
        response's cost.
        """
        if known.content is not None:
            return known.content
        size = known.identity[1]
        try:
            descriptor = os.open(full, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            raise _NotFound(403) from None
        try:
            content = os.pread(descriptor, size, 0)
        finally:
            os.close(descriptor)
        if len(content) == size and self._known.get(full) is known and not racy:
            if self._small_bytes + size > _SMALL_FILES_BYTES:
                self._forget_files()
                self._known[full] = known
            known.content = content
            self._small_bytes += size
        return content

    def _file(self, exchange: Exchange, full: str, info: os.stat_result) -> None:
        size = info.st_size
        known = self._known_file(full, info)
        etag: bytes | None = known.etag
        modified, kind = known.modified, known.kind
        content = None
        now: float = self.clock.seconds()
        # Whether it may be rewritten yet within the tick of its stat's ctime.
        racy = now * 1_000_000_000 - known.identity[3] <= _RACY_NS
        if racy:
            # Its stat may stay as it is through another rewrite, and a tag
            # from it would then match bytes it was not given for (a 304 for
            # changed content).  A small file's tag comes from the bytes
            # served, read anyway as they are not kept yet; a big one has none
            # for that second, rather than reading it all twice.
            if size <= _SMALL_FILE:
                content = self._small_file(full, known, racy)
                etag = b'"%s"' % hashlib.blake2b(content, digest_size=8).hexdigest().encode()
            else:
                etag = None
        headers: Headers = [] if etag is None else [(b"ETag", etag)]
        if not racy and modified < int(now):
            # A date is handed out only once the stat tells every change within
            # its second: a client holding one holds a strong date (RFC 9110
            # 8.8.2.2) whenever it comes back, when the file is racy again too.
            # A date not yet over (a future mtime) is never sent (8.8.2.1), nor
            # the response's Date for it: the file may be replaced within it.
            headers.append((b"Last-Modified", known.last_modified))
        headers.append((b"Accept-Ranges", b"bytes"))
        ranges: list[tuple[int, int]] | None = None
        if not _VALIDATING.isdisjoint(exchange.by_name()):
            if _precondition_failed(exchange, etag, modified):
                self.error(exchange, 412, headers)
                return
            if _not_modified(exchange, etag, modified):
                exchange.respond(304, headers, b"")
                return
            ranges = _ranges(exchange, etag, modified, size)
        if ranges == []:
            headers.append((b"Content-Range", b"bytes */%d" % size))
            self.error(exchange, 416, headers)
            return
        if ranges is None:
            parts = [(b"", 0, size)]
            status, length, tail = 200, size, b""
            headers.append((b"Content-Type", kind))
        elif len(ranges) == 1:
            start, end = ranges[0]
            parts = [(b"", start, end - start + 1)]
            status, length, tail = 206, end - start + 1, b""
            headers.append((b"Content-Type", kind))
            headers.append((b"Content-Range", b"bytes %d-%d/%d" % (start, end, size)))
        else:
            boundary = base64.b32encode(os.urandom(10)).decode().encode()
            parts = []
            for number, (start, end) in enumerate(ranges):
                preamble = (
                    b"%s--%s\r\nContent-Type: %s\r\nContent-Range: bytes %d-%d/%d\r\n\r\n"
                    % (
                        b"\r\n" if number else b"",
                        boundary,
                        kind,
                        start,
                        end,
                        size,
                    )
                )
                parts.append((preamble, start, end - start + 1))
            tail = b"\r\n--%s--\r\n" % boundary
            status = 206
            length = sum(len(p) + n for p, _, n in parts) + len(tail)
            headers.append((b"Content-Type", b"multipart/byteranges; boundary=" + boundary))
        if exchange.method == "HEAD":
            headers.append((b"Content-Length", b"%d" % length))
            exchange.respond(status, headers, b"")
            return
        if size <= _SMALL_FILE:
            if content is None:
                content = self._small_file(full, known, racy)
            if ranges is None:
                exchange.respond(status, headers, content)
                return
            body = b"".join(
                preamble + content[offset : offset + count] for preamble, offset, count in parts
            )
            exchange.respond(status, headers, body + tail)
            return
        try:
            # Unbuffered: sendfile reads by descriptor and the producer in large
            # blocks; a buffered open() adds an ioctl and an lseek per response.
            file = io.FileIO(full, "r")  # the producer closes it
        except OSError:
            raise _NotFound(403) from None
        exchange.start(status, headers, length)
        _send_parts(exchange, file, parts, tail)


def _send_parts(
    exchange: Exchange, file: IO[bytes], parts: list[tuple[bytes, int, int]], tail: bytes
) -> None:
    """Send each byte range of C{file} after its preamble, then C{tail}; close C{file} after."""
    left = deque(parts)

    def next_part(_: object = None) -> None:
        if not left:
            file.close()
            exchange.write(tail)
            exchange.finish()
            return
        preamble, offset, count = left.popleft()
        exchange.write(preamble)
        exchange.send_file(file, offset, count).addCallbacks(next_part, failed)

    def failed(reason: Failure) -> None:
        file.close()
        if not reason.check(ConnectionLost):
            # The file shrank or the socket failed: the length we promised is a
            # lie now, and only cutting the connection tells the client.
            exchange.abort()

    next_part()


@functools.lru_cache(maxsize=1024)
def http_date(seconds: int) -> bytes:
    """Last-Modified of a file: the same few values over and over."""
    return email.utils.formatdate(seconds, usegmt=True).encode()


def parse_http_date(value: bytes) -> float | None:
    try:
        parsed = email.utils.parsedate_to_datetime(value.decode("latin-1"))
    except (TypeError, ValueError, IndexError):
        return None
    return parsed.timestamp()


def _etags(value: bytes) -> Iterator[bytes]:
    for tag in value.split(b","):
        tag = tag.strip()
        yield tag[2:] if tag.startswith(b"W/") else tag


def _precondition_failed(exchange: Exchange, etag: bytes | None, modified: int) -> bool:
    """
    RFC 9110 13.2.2, steps 1 and 2: If-Match (a strong match; a weak tag never
    matches) decides when present, else If-Unmodified-Since.
    """
    match = exchange.header(b"if-match")
    if match is not None:
        tags = [tag.strip() for tag in match.split(b",")]
        return not (tags == [b"*"] or (etag is not None and etag in tags))
    since = exchange.header(b"if-unmodified-since")
    if since is not None:
        when = parse_http_date(since)
        return when is not None and modified > when
    return False


def _not_modified(exchange: Exchange, etag: bytes | None, modified: int) -> bool:
    """RFC 9110 13.2.2: If-None-Match decides when present; else If-Modified-Since."""
    if exchange.method not in ("GET", "HEAD"):
        return False
    none_match = exchange.header(b"if-none-match")
    if none_match is not None:
        return none_match.strip() == b"*" or (etag is not None and etag in _etags(none_match))
    since = exchange.header(b"if-modified-since")
    if since is not None:
        when = parse_http_date(since)
        return when is not None and modified <= when
    return False


def _ranges(
    exchange: Exchange, etag: bytes | None, modified: int, size: int
) -> list[tuple[int, int]] | None:
    """
    The satisfiable byte ranges asked for: None for the whole file, [] for 416.

    A Range header that does not parse is ignored (RFC 9110 14.2), as is one whose
    If-Range no longer matches the file.
    """
    value = exchange.header(b"range")
    if value is None or exchange.method != "GET":
        return None
    condition = exchange.header(b"if-range")
    if condition is not None:
        if condition.startswith(b'"'):
            if etag is None or condition.strip() != etag:
                return None
        elif parse_http_date(condition) != modified:
            return None
    unit, _, specs = value.partition(b"=")
    if unit.strip().lower() != b"bytes" or not specs:
        return None
    ranges: list[tuple[int, int]] = []
    items = specs.split(b",")
    if len(items) > _MAX_RANGES:
        return None
    for item in items:
        first, dash, last = item.strip().partition(b"-")
        if not dash or not (first.isdigit() or first == b"") or not (last.isdigit() or last == b""):
            return None
        if first == b"":
            if last == b"":
                return None
            length = int(last)
            if length == 0 or size == 0:
                continue  # nothing to give: unsatisfiable (RFC 9110 14.1.1)
            ranges.append((max(size - length, 0), size - 1))
        else:
            start = int(first)
            if last and int(last) < start:
                return None
            if start >= size:
                continue
            ranges.append((start, min(int(last), size - 1) if last else size - 1))
    return ranges
