"""
The dashboard: a web page on the admin listener that shows what netd saw, live.

The page itself is static HTML, CSS and JavaScript shipped in C{static/}; it
reads the JSON API and C{/api/events/stream}.  This module serves those files
under a strict Content-Security-Policy, signs people in with the admin token
(an HttpOnly, SameSite=Strict session cookie, with a CSRF token for every
request that changes something), and renders a captured message's parts for
the page (L{netd.dashboard.mail}).  It knows no service kind: a message comes
from any service's C{messages} view.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections import OrderedDict
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from netd.kinds import ViewRefused
from netd.later import answer_later, finish
from netd.records import Record

if TYPE_CHECKING:
    from netd.runtime import Daemon

__all__ = ["CSRF_HEADER", "Dashboard"]


_SESSION_COOKIE = b"netd_session"
CSRF_HEADER = b"x-csrf-token"
SESSION_LIFETIME = 12 * 3600.0
# Sessions kept at once; signing in past this forgets the oldest.
MAX_SESSIONS = 256
_SAFE_METHODS = frozenset({b"GET", b"HEAD"})
_PAGE_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; frame-src 'self'; form-action 'self'; base-uri 'none'; "
    b"frame-ancestors 'none'"
)
# A mail's HTML part: no script (sandbox and policy both), nothing fetched,
# framed only by the dashboard.  Inline styles are the mail's own look.
_MAIL_POLICY = (
    b"sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:; font-src data:; "
    b"frame-ancestors 'self'"
)
# The same once the reader asked for remote content: images, styles and fonts
# from anywhere, still no script, no form, no frame.
_MAIL_REMOTE_POLICY = (
    b"sandbox; default-src 'none'; style-src * 'unsafe-inline'; img-src * data:; "
    b"font-src * data:; frame-ancestors 'self'"
)
_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".txt": b"text/plain; charset=utf-8",
}


@attrs.frozen(repr=False)
class _Asset(Record):
    body: bytes
    content_type: bytes
    etag: bytes


def _load_assets() -> dict[str, _Asset]:
    assets = {}
    for entry in (resources.files(__package__) / "static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _TYPES:
            body = entry.read_bytes()
            etag = b'"%s"' % hashlib.sha256(body).hexdigest()[:20].encode()
            assets[entry.name] = _Asset(body, _TYPES[suffix], etag)
    return assets


@attrs.define(repr=False)
class Session(Record):
    csrf: str
    expires: float


class Sessions:
    """Signed-in browsers by cookie value, each with its CSRF token, for a while."""

    def __init__(self, clock: IReactorTime, lifetime: float = SESSION_LIFETIME) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def open(self) -> tuple[str, Session]:
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.popitem(last=False)
        key = secrets.token_urlsafe(32)
        session = self._sessions[key] = Session(
            secrets.token_urlsafe(32), self.clock.seconds() + self.lifetime
        )
        return key, session

    def find(self, key: str) -> Session | None:
        session = self._sessions.get(key)
        if session is not None and session.expires <= self.clock.seconds():
            del self._sessions[key]
            return None
        return session

    def close(self, key: str) -> None:
        self._sessions.pop(key, None)


class Dashboard:
    """
    The dashboard's part of the admin listener: C{/} and C{/ui/...}.

    Public: the page (C{/}, C{/ui/assets/NAME}), C{GET /ui/session},
    C{POST /ui/login}, C{POST /ui/logout}.  Behind the admin's authorization:
    C{/ui/messages/SERVICE/ID} (a message's parts as JSON), C{.../html} (its
    HTML part, for a sandboxed frame) and C{.../parts/N} (a part to download).
    """

    def __init__(
        self, daemon: Daemon, token: bytes | None, on_login_failed: Callable[[str], None]
    ) -> None:
        self.daemon = daemon
        self.token = token
        self.on_login_failed = on_login_failed
        self.sessions = Sessions(daemon.reactor)
        self._assets: dict[str, _Asset] | None = None

    # Who is signed in

    def signed_in(self, request: Request) -> bool:
        """
        Whether C{request} carries a live session cookie.  A cookie alone does
        not change anything: a request other than GET or HEAD must also carry
        the session's CSRF token in C{X-CSRF-Token} (403 otherwise).
        """
        found = self._session(request)
        if found is None:
            return False
        if request.method not in _SAFE_METHODS:
            offered = request.getHeader(CSRF_HEADER) or b""
            if not hmac.compare_digest(offered, found[1].csrf.encode()):
                raise ViewRefused(403, "a signed-in change needs the X-CSRF-Token header")
        return True

    def _session(self, request: Request) -> tuple[str, Session] | None:
        key = (request.getCookie(_session_cookie(request)) or b"").decode("ascii", "replace")
        session = self.sessions.find(key) if key else None
        return (key, session) if session is not None else None

    # Dispatch

    def is_public(self, parts: list[str]) -> bool:
        """Whether C{parts} is the page or its sign-in: answered before authorization."""
        return parts in ([], [""], ["ui", "session"], ["ui", "login"], ["ui", "logout"]) or (
            parts[:2] == ["ui", "assets"]
        )

    def render_public(self, request: Request, method: str, parts: list[str]) -> bytes | int:
        if parts in ([], [""]):
            return self._asset(request, method, "index.html")
        if parts[:2] == ["ui", "assets"] and len(parts) == 3:
            return self._asset(request, method, parts[2])
        if parts == ["ui", "session"]:
            _allow(method, "GET", "HEAD")
            return self._describe_session(request)
        if parts == ["ui", "login"]:
            _allow(method, "POST")
            return self._login(request)
        if parts == ["ui", "logout"]:
            _allow(method, "POST")
            return self._logout(request)
        raise ViewRefused(404, "not found")

    def render_private(self, request: Request, method: str, parts: list[str]) -> bytes | int:
        """C{/ui/messages/SERVICE/ID[/html | /parts/N]}, once authorized."""
        if parts[:2] != ["ui", "messages"] or len(parts) not in (4, 5, 6):
            raise ViewRefused(404, "not found")
        _allow(method, "GET", "HEAD")
        service_name, id, rest = parts[2], parts[3], parts[4:]
        service = self.daemon.services_by_name.get(service_name)
        view = service.handlers.views.get("messages") if service is not None else None
        if view is None or view.item is None:
            raise ViewRefused(404, f"no service {service_name!r} with messages")
        # Python's email package costs ~0.1 s to import: paid when a message is first viewed.
        from netd.dashboard import mail

        raw = maybeDeferred(view.item, id)
        if rest == []:
            return _later(request, raw, lambda r: _as_json(request, mail.describe(r)))
        if rest == ["html"]:
            remote = request.args.get(b"remote") == [b"1"] if request.args else False
            return _later(request, raw, lambda r: _html_part(request, r, remote))
        if len(rest) == 2 and rest[0] == "parts" and rest[1].isdigit():
            index = int(rest[1])
            return _later(request, raw, lambda r: _download(request, r, index))
        raise ViewRefused(404, "not found")

    # The page

    def _asset(self, request: Request, method: str, name: str) -> bytes:
        _allow(method, "GET", "HEAD")
        if self._assets is None:
            self._assets = _load_assets()
        asset = self._assets.get(name)
        if asset is None:
            raise ViewRefused(404, "not found")
        page_headers(request)
        request.setHeader(b"Content-Type", asset.content_type)
        request.setHeader(b"ETag", asset.etag)
        request.setHeader(b"Cache-Control", b"no-cache")
        if request.getHeader(b"if-none-match") == asset.etag:
            request.setResponseCode(304)
            return b""
        return asset.body

    # Signing in

    def _describe_session(self, request: Request) -> bytes:
        found = self._session(request)
        return _as_json(
            request,
            {
                "token_required": self.token is not None,
                "signed_in": self.token is None or found is not None,
                "csrf": found[1].csrf if found is not None else "",
                "last_event_id": self.daemon.journal.last_id,
            },
        )

    def _login(self, request: Request) -> bytes:
        # JSON only: a cross-site form cannot send it without the browser asking first.
        if (request.getHeader(b"content-type") or b"").split(b";")[0] != b"application/json":
            raise ViewRefused(415, "sign in with a JSON body")
        try:
            offered = json.loads(request.content.read() if request.content else b"")["token"]
        except (ValueError, KeyError, TypeError):
            raise ViewRefused(400, 'the body must be {"token": "..."}') from None
        if self.token is None:
            raise ViewRefused(404, "this admin API has no token: nothing to sign in to")
        if not isinstance(offered, str) or not hmac.compare_digest(offered.encode(), self.token):
            self.on_login_failed(_client(request))
            raise ViewRefused(401, "wrong token")
        key, session = self.sessions.open()
        request.addCookie(
            _session_cookie(request),
            key.encode(),
            path=b"/",
            httpOnly=True,
            sameSite="strict",
            secure=request.isSecure(),
        )
        return _as_json(request, {"signed_in": True, "csrf": session.csrf})

    def _logout(self, request: Request) -> bytes:
        found = self._session(request)
        if found is not None:
            self.sessions.close(found[0])
        request.addCookie(  # max_age as text: Twisted formats none but str and bytes
            _session_cookie(request), b"", path=b"/", max_age=b"0", httpOnly=True, sameSite="strict"
        )
        return _as_json(request, {"signed_in": False})


def _session_cookie(request: Request) -> bytes:
    """
    The session cookie's name on the listener C{request} came in on.  A
    browser sends a host's cookies to all its ports (RFC 6265 8.5): one name
    for all, and signing in to a second netd on the same host would sign the
    browser out of the first (Jupyter names its cookies by port too).
    """
    port = getattr(request.getHost(), "port", None)
    return _SESSION_COOKIE if port is None else b"%s_%d" % (_SESSION_COOKIE, port)


def page_headers(request: Request) -> None:
    """What every dashboard answer carries: its policy, no sniffing, no framing, no referrer."""
    request.setHeader(b"Content-Security-Policy", _PAGE_POLICY)
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"X-Frame-Options", b"DENY")
    request.setHeader(b"Referrer-Policy", b"no-referrer")


def _client(request: Request) -> str:
    address = request.getClientAddress()
    host = getattr(address, "host", "")
    port = getattr(address, "port", "")
    return f"{host}:{port}" if host else str(address)


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise ViewRefused(405, f"method {method} not allowed")


def _as_json(request: Request, body: Any) -> bytes:
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    return json.dumps(body, indent=1).encode() + b"\n"


def _html_part(request: Request, raw: bytes, remote: bool) -> bytes:
    from netd.dashboard import mail

    html = mail.html_part(raw)
    if html is None:
        raise ViewRefused(404, "this message has no HTML part")
    request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
    request.setHeader(b"Content-Security-Policy", _MAIL_REMOTE_POLICY if remote else _MAIL_POLICY)
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"Referrer-Policy", b"no-referrer")
    return html.encode("utf-8")


def _download(request: Request, raw: bytes, index: int) -> bytes:
    from netd.dashboard import mail

    part = mail.part(raw, index)
    if part is None:
        raise ViewRefused(404, "no such part")
    filename, payload = part
    # Always a download, never rendered here: whatever the part claims to be.
    request.setHeader(b"Content-Type", b"application/octet-stream")
    request.setHeader(b"Content-Disposition", mail.attachment_disposition(filename).encode())
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"Content-Security-Policy", b"sandbox; default-src 'none'")
    return payload


def _later(request: Request, raw: Deferred[bytes | None], answer: Callable[[bytes], bytes]) -> int:
    """Answer with C{answer(message)} once the message is read; 404 if there is none."""

    def respond(message: bytes | None) -> None:
        try:
            if message is None:
                raise ViewRefused(404, "no such message")
            body = answer(message)
        except ViewRefused as e:
            request.setResponseCode(e.status)
            body = _as_json(request, {"error": e.reason})
        finish(request, body)

    return answer_later(request, raw, respond, what="reading a message for the dashboard failed")
