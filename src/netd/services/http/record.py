"""
Record and replay: a proxy route with C{record_to: FILE} writes each exchange it
relays as a netd route; the service's C{routes_from: [FILE]} serves them back with
no upstream.

    routes:
      - {path: /api/, proxy: "http://127.0.0.1:9000/", record_to: recorded.yaml}
    # later, offline:
    routes_from: [recorded.yaml]

A recorded route matches the method, exactly the path and exactly the query (every
parameter with all its values, no others; and the body, when the service's record
kept all of it); it answers the upstream's status, headers (a repeated one as a
list) and body.  A body that is not UTF-8 text, or over L{INLINE} bytes, goes to a
file beside the recording (C{FILE.bodies/N}), so replay sends the very bytes.
C{Set-Cookie} is written masked unless the route says C{record_secrets: true};
request headers (C{Authorization}, C{Cookie} ...) are never written.  A request
already recorded (same method, path, query and body) is not written again: the
first answer is the one replayed, also across restarts.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from netd import schema
from netd.kinds import BuildContext, Holders
from netd.services.http.match import query_values

if TYPE_CHECKING:
    from netd.services.http.app import Exchange, Headers

# What runs blocking work off the reactor thread (BuildContext.in_thread).
InThread = Callable[..., "Deferred[Any]"]

__all__ = ["INLINE", "InThread", "Recorder", "Recorders", "Recording", "recorders"]

# Bodies up to this size that are UTF-8 text are written in the YAML itself.
INLINE = 64 * 1024
# An answer longer than this is relayed but not recorded (it is held until whole).
MAX_RECORDED = 64 << 20
MASK = "(masked by netd)"
_SECRET_ANSWER_HEADERS = frozenset({b"set-cookie"})
# Framing and what netd sets on every answer itself: a route may not set them.
_NOT_RECORDED = frozenset(
    {b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"date", b"server"}
)
_GLOB = "*?["
_log = Logger(namespace="netd.http")

# The recorder that appends to each record_to file now, by its resolved path.
# During a reload the old service still relays on its open connections while
# the new one's recorder has read the file back: what the old one records goes
# through the new one, which knows every request written, so none is written
# twice (two services, or two routes of one, recording to one file share it too).
Recorders = Holders[Path, "Recorder"]


def recorders(context: BuildContext) -> Recorders:
    """The daemon's recorder of each file, shared by its http services across reloads."""
    serving: Recorders = context.shared("http.record.serving", Recorders)
    return serving


class Recorder:
    """
    Appends the routes of one C{record_to} file (a YAML list, one item per exchange).
    Built with its service (at start or reload), it goes on from what the file
    holds: a request recorded before is not written again, and body files are
    numbered after the last one there.  Once started it writes for every
    recorder of the same file, the one it replaces included, until it stops.
    """

    def __init__(
        self, path: str, secrets: bool, serving: Recorders, in_thread: InThread | None = None
    ) -> None:
        self.path = Path(path)
        self.file = self.path.resolve()
        self.bodies = self.path.with_name(self.path.name + ".bodies")
        self.secrets = secrets
        self.seen: set[str] = set()
        self.count = 0
        self.serving = serving
        # Routes that ended while the recording was read back: written after it.
        self._waiting: list[tuple[dict[str, Any], bytes]] | None = []
        self.read: Deferred[None]
        """Fires once the file is read back and the exchanges that waited for it are written."""
        if in_thread is None:
            self._read_back(_read_back(self.path, self.bodies))
            self.read = succeed(None)
        else:
            # A recording grows without end (20,000 exchanges are 9 s of YAML):
            # read back in a thread, not on the reactor a reload runs on.
            self.read = in_thread(_read_back, self.path, self.bodies).addBoth(self._read_back)

    def _read_back(self, outcome: Any) -> None:
        if isinstance(outcome, tuple):  # else a failure: go on from nothing known
            seen, count, unreadable = outcome
            self._learn(seen, count)
            if unreadable is not None:
                # Recording goes on from nothing known: requests the file holds
                # may be written to it again, and a replay then has both.
                _log.warn(
                    "record_to {file}: not read back ({reason}); exchanges it holds may be"
                    " written again",
                    file=str(self.path),
                    reason=unreadable,
                )
        waiting, self._waiting = self._waiting or [], None
        serving = self._serving()
        for route, body in waiting:
            serving._append(route, body)

    def _learn(self, seen: set[str], count: int) -> None:
        self.seen |= seen
        self.count = max(self.count, count)

    def _serving(self) -> Recorder:
        serving = self.serving.holder(self.file)
        return self if serving is None else serving

    def start(self) -> None:
        """Its service serves: this recorder writes the file from now on."""
        replaced = self.serving.take(self.file, self)
        if replaced is not None:
            # What it wrote after this one's read-back had read the file.
            self._learn(replaced.seen, replaced.count)

    def stop(self) -> None:
        # A stop while a service it replaced still drains (a reload's
        # replacement starts only once the reload commits): that one writes
        # the file again, knowing what was written meanwhile, and takes what
        # waits here.
        handed_back = self.serving.leave(self.file, self)
        if handed_back is None:
            return
        handed_back._learn(self.seen, self.count)
        if self._waiting:
            waiting, self._waiting = self._waiting, []
            for route, body in waiting:
                handed_back._append(route, body)

    def wrap(self, exchange: Exchange) -> Exchange:
        """The exchange as the proxy should see it: its answer is recorded on the way out."""
        recording: Any = Recording(exchange, self)
        wrapped: Exchange = recording
        return wrapped

    def write(self, exchange: Exchange, status: int, headers: Headers, body: bytes) -> None:
        """
        Record an exchange this recorder's route relayed, masked as that route
        says (the route that relayed it decides, as the map a connection was
        answered under does), through the recorder serving the file now.
        """
        # Exactly the path, as WireMock's recorder writes urlEqualTo: a plain
        # path ending in / would be a prefix, one with * ? [ a glob.
        path: Any = exchange.path
        if path.endswith("/") or any(c in path for c in _GLOB):
            path = {"regex": re.escape(path)}
        route: dict[str, Any] = {"path": path, "method": exchange.method}
        # The whole query, every value: absent parameters are absent on replay too.
        query = query_values(exchange.target)
        match: dict[str, Any] = {
            "query_equals": {k: v[0] if len(v) == 1 else v for k, v in query.items()}
        }
        request_body = _whole_body(exchange)
        if request_body:
            text = _inline_text(request_body)
            if text is not None:
                match["body"] = {"equals": text}
        route["match"] = match
        route["status"] = status
        # A repeated header as a list of its values: Set-Cookie cannot be joined (RFC 6265 3).
        answer_headers: dict[str, list[str]] = {}
        for name, value in headers:
            if name.lower() in _NOT_RECORDED:
                continue
            text_value = value.decode("latin-1")
            if name.lower() in _SECRET_ANSWER_HEADERS and not self.secrets:
                text_value = MASK
            answer_headers.setdefault(name.decode("latin-1"), []).append(text_value)
        if answer_headers:
            route["headers"] = {k: v[0] if len(v) == 1 else v for k, v in answer_headers.items()}
        self._serving()._append(route, body)

    def _append(self, route: dict[str, Any], body: bytes) -> None:
        if self._waiting is not None:
            self._waiting.append((route, body))
            return
        key = _request_key(route)
        if key in self.seen:
            return
        self.seen.add(key)
        self.count += 1
        text = _inline_text(body)
        if text is not None:
            route["body"] = text
        else:
            route["body_file"] = f"{self.bodies.name}/{self._new_body_file(body)}"
        # One small append per exchange to a local file, as the access log writes.
        with self.path.open("a", encoding="utf-8") as file:
            file.write(yaml.safe_dump([route], allow_unicode=True, sort_keys=False))

    def _new_body_file(self, body: bytes) -> str:
        """
        C{body} in the next numbered file; never over another's (one written
        since the read-back: by another netd recording to the same file, say).
        """
        self.bodies.mkdir(exist_ok=True)
        while True:
            name = f"{self.count}.bin"
            try:
                descriptor = os.open(self.bodies / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                self.count += 1
                continue
            with os.fdopen(descriptor, "wb") as file:
                file.write(body)
            return name


def _read_back(path: Path, bodies: Path) -> tuple[set[str], int, str | None]:
    """
    The requests a recording holds already, the last body file's number, and
    why the recording could not be read (None when it was, or is not there yet).
    """
    routes, unreadable = _recorded(path)
    seen = {_request_key(route) for route in routes}
    numbers = [int(p.stem) for p in bodies.glob("*.bin") if p.stem.isdigit()]
    return seen, max(numbers, default=0), unreadable


def _request_key(route: Any) -> str:
    """What makes two recorded routes the same request: method, path and match, as written."""
    if not isinstance(route, dict):
        return ""
    return json.dumps([route.get("method"), route.get("path"), route.get("match")], sort_keys=True)


def _recorded(path: Path) -> tuple[list[Any], str | None]:
    """The routes a recording holds already, and why none could be read from it."""
    try:
        # Bounded as the map: an alias bomb held the thread that reads it back.
        routes = schema.load_large(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [], None  # a first recording
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        return [], str(e).splitlines()[0] if str(e) else type(e).__name__
    if routes is None:
        return [], None  # empty
    if not isinstance(routes, list):
        return [], "not a YAML list of routes"
    return routes, None


def _whole_body(exchange: Exchange) -> bytes | None:
    body = exchange.body
    if body.size == 0:
        return None
    return bytes(body.kept) if len(body.kept) == body.size else None


def _inline_text(data: bytes) -> str | None:
    """C{data} as text that YAML gives back byte for byte, or None."""
    if len(data) > INLINE:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if yaml.safe_load(yaml.safe_dump(text)) != text:
        return None
    return text


class Recording:
    """
    An exchange handed to the proxy: what the upstream answers goes to the
    client as ever, and to the recorder once whole.  Everything else (the
    request, the connection's hooks) is the exchange's own.
    """

    def __init__(self, exchange: Exchange, recorder: Recorder) -> None:
        object.__setattr__(self, "_exchange", exchange)
        object.__setattr__(self, "_recorder", recorder)
        object.__setattr__(self, "_answer", None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._exchange, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._exchange, name, value)

    def start(self, status: int, headers: Headers, length: int | None) -> None:
        object.__setattr__(self, "_answer", (status, list(headers), bytearray()))
        self._exchange.start(status, headers, length)

    def write(self, data: bytes) -> None:
        answer = self._answer
        if answer is not None:
            if len(answer[2]) + len(data) > MAX_RECORDED:
                object.__setattr__(self, "_answer", None)
            else:
                answer[2].extend(data)
        self._exchange.write(data)

    def finish(self) -> None:
        answer = self._answer
        object.__setattr__(self, "_answer", None)
        self._exchange.finish()
        if answer is not None:
            status, headers, body = answer
            self._recorder.write(self._exchange, status, headers, bytes(body))
