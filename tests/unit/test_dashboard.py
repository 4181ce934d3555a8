"""
The dashboard's server side on the admin channel (StringTransport, Clock): the
page under its policy, signing in with the token, the cookie's CSRF rule, and
a captured message's parts; and netd.dashboard.mail on hostile messages.
"""

from __future__ import annotations

import json
from email.message import EmailMessage
from typing import Any

import attrs
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from netd.dashboard import MAX_SESSIONS, SESSION_LIFETIME, Sessions, mail
from netd.kinds import AdminView, Handlers
from netd.runtime import ReloadResult
from tests.unit.test_admin import Client, headers_and_body, status_line

TOKEN = "sesame"


def ask(
    client: Client, method: str, target: str, body: bytes = b"", **headers: str
) -> tuple[int, dict[bytes, bytes], bytes]:
    headers["Content_Length"] = str(len(body))
    head = "".join(f"{name.replace('_', '-')}: {value}\r\n" for name, value in headers.items())
    client.send(f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n{head}\r\n".encode() + body)
    client.clock.advance(0)
    answer = client.answer()
    found, content = headers_and_body(answer)
    return int(status_line(answer).split()[1]), found, content


def sign_in(client: Client, token: str = TOKEN) -> tuple[int, dict[bytes, bytes], Any]:
    status, headers, body = ask(
        client,
        "POST",
        "/ui/login",
        json.dumps({"token": token}).encode(),
        Content_Type="application/json",
    )
    return status, headers, json.loads(body)


def cookie_of(headers: dict[bytes, bytes]) -> str:
    return headers[b"set-cookie"].split(b";")[0].decode()


def test_the_page_is_served_under_a_strict_policy() -> None:
    client = Client()
    status, headers, body = ask(client, "GET", "/")
    assert status == 200 and body.startswith(b"<!doctype html>")
    assert headers[b"content-type"] == b"text/html; charset=utf-8"
    policy = headers[b"content-security-policy"].decode()
    assert "script-src 'self'" in policy and "style-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy and "unsafe-inline" not in policy
    assert headers[b"x-content-type-options"] == b"nosniff"
    assert headers[b"x-frame-options"] == b"DENY"
    assert b"<script>" not in body and b" style=" not in body  # nothing inline

    status, headers, script = ask(client, "GET", "/ui/assets/app.js")
    assert status == 200 and headers[b"content-type"].startswith(b"text/javascript")
    assert b"innerHTML" not in script and b"insertAdjacentHTML" not in script
    status, _, _ = ask(client, "GET", "/ui/assets/app.js", If_None_Match=headers[b"etag"].decode())
    assert status == 304
    assert ask(client, "GET", "/ui/assets/..%2Fmail.py")[0] == 404
    assert ask(client, "GET", "/ui/assets/nothing.js")[0] == 404
    assert ask(client, "POST", "/")[0] == 405


def test_signing_in_sets_an_http_only_strict_cookie_the_api_then_takes() -> None:
    client = Client(token=TOKEN)
    assert ask(client, "GET", "/")[0] == 200  # the page itself is public
    assert ask(client, "GET", "/api/services")[0] == 401
    status, _, session = ask(client, "GET", "/ui/session")
    assert json.loads(session) == {
        "token_required": True,
        "signed_in": False,
        "csrf": "",
        "last_event_id": 0,
    }

    status, headers, body = sign_in(client, "wrong")
    assert status == 401 and b"set-cookie" not in headers
    [failed] = client.daemon.journal.select(types=["login.failed"])
    assert failed.service == "admin" and failed.fields["client"] == "127.0.0.1:40000"

    status, headers, body = sign_in(client)
    assert status == 200 and body["signed_in"] and body["csrf"]
    fields = [f.strip().lower() for f in headers[b"set-cookie"].decode().split(";")]
    assert "httponly" in fields and "samesite=strict" in fields and "path=/" in fields
    cookie = cookie_of(headers)
    assert TOKEN not in cookie
    assert ask(client, "GET", "/api/services", Cookie=cookie)[0] == 200
    status, _, session = ask(client, "GET", "/ui/session", Cookie=cookie)
    assert json.loads(session)["csrf"] == body["csrf"]
    # The bearer token keeps working, with or without a cookie.
    assert ask(client, "GET", "/api/services", Authorization=f"Bearer {TOKEN}")[0] == 200

    status, headers, body = ask(client, "POST", "/ui/logout", Cookie=cookie)
    assert (status, json.loads(body)) == (200, {"signed_in": False})
    assert b"Max-Age=0" in headers[b"set-cookie"]  # the browser forgets it
    assert ask(client, "GET", "/api/services", Cookie=cookie)[0] == 401


def test_two_dashboards_on_one_host_keep_their_own_sign_in() -> None:
    """A browser sends a host's cookies to every port: each netd's cookie has its own name."""
    first, second = (
        Client(token=TOKEN, transport=StringTransport(IPv4Address("TCP", "127.0.0.1", port)))
        for port in (8001, 8002)
    )
    cookies = "; ".join(cookie_of(sign_in(client)[1]) for client in (first, second))
    assert cookies.startswith("netd_session_8001=") and "; netd_session_8002=" in cookies
    assert ask(first, "GET", "/api/services", Cookie=cookies)[0] == 200
    assert ask(second, "GET", "/api/services", Cookie=cookies)[0] == 200


def test_a_cookie_changes_nothing_without_its_csrf_header() -> None:
    client = Client(token=TOKEN)
    _, headers, body = sign_in(client)
    cookie = cookie_of(headers)
    status, _, answer = ask(client, "POST", "/api/reload", Cookie=cookie)
    assert status == 403 and b"X-CSRF-Token" in answer
    assert client.daemon.reloads == []
    assert ask(client, "POST", "/api/reload", Cookie=cookie, X_CSRF_Token="guess")[0] == 403
    client.send(
        b"POST /api/reload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nCookie: %s\r\n"
        b"X-CSRF-Token: %s\r\n\r\n" % (cookie.encode(), body["csrf"].encode())
    )
    [reload] = client.daemon.reloads
    reload.callback(ReloadResult())
    assert status_line(client.answer()) == b"HTTP/1.1 200 OK"
    # Another session's token is no good either.
    _, other_headers, _ = sign_in(client)
    status, _, _ = ask(
        client, "POST", "/api/reload", Cookie=cookie_of(other_headers), X_CSRF_Token=body["csrf"]
    )
    assert status == 403


def test_signing_in_takes_json_only() -> None:
    client = Client(token=TOKEN)
    form = f"token={TOKEN}".encode()
    status, headers, _ = ask(
        client, "POST", "/ui/login", form, Content_Type="application/x-www-form-urlencoded"
    )
    assert status == 415 and b"set-cookie" not in headers
    assert ask(client, "POST", "/ui/login", b"[1]", Content_Type="application/json")[0] == 400


def test_a_session_expires_and_the_oldest_give_way_to_new_ones() -> None:
    clock = Clock()
    sessions = Sessions(clock)
    key, session = sessions.open()
    clock.advance(SESSION_LIFETIME - 1)
    assert sessions.find(key) is session
    clock.advance(1)
    assert sessions.find(key) is None
    keys = [sessions.open()[0] for _ in range(MAX_SESSIONS + 1)]
    assert sessions.find(keys[0]) is None and sessions.find(keys[-1]) is not None


def hostile_message() -> bytes:
    message = EmailMessage()
    message["From"] = '"<img src=x onerror=alert(1)>" <evil@attacker.test>'
    message["To"] = "victim@netd.test"
    message["Subject"] = "<script>window.pwned=1</script> code 482913"
    message["X-Evil"] = "<svg onload=alert(2)>"
    message.set_content("Visit https://example.test/verify?t=1 and 12.05.2026, 1234.50\n")
    message.add_alternative(
        "<p>hi<script>parent.pwned=1</script><img src=x onerror=alert(3)>"
        '<a href="javascript:alert(4)">x</a><a href="https://example.test/a">a</a></p>',
        subtype="html",
    )
    message.add_attachment(
        b"<html><script>alert(5)</script></html>",
        maintype="text",
        subtype="html",
        filename='evil"\\name.html',
    )
    return bytes(message)


@attrs.frozen
class FakeService:
    handlers: Handlers


def with_message(client: Client, raw: bytes) -> None:
    view = AdminView(list=lambda query: [], item=lambda id: raw if id == "m1" else None)
    client.daemon.services_by_name["mail"] = FakeService(Handlers(views={"messages": view}))


def test_a_message_is_described_as_data_with_its_links_codes_and_attachments() -> None:
    described = mail.describe(hostile_message())
    assert described["subject"] == "<script>window.pwned=1</script> code 482913"
    assert ["X-Evil", "<svg onload=alert(2)>"] in described["headers"]
    assert described["codes"] == ["482913"]  # not the date, not the price
    assert described["links"] == ["https://example.test/verify?t=1", "https://example.test/a"]
    [attachment] = described["attachments"]
    assert attachment["content_type"] == "text/html" and attachment["index"] == 2
    assert described["has_html"] and described["text"].startswith("Visit")


def test_the_html_part_is_served_sandboxed_and_an_attachment_only_as_a_download() -> None:
    client = Client()
    with_message(client, hostile_message())
    status, headers, body = ask(client, "GET", "/ui/messages/mail/m1")
    assert status == 200 and json.loads(body)["attachments"][0]["filename"].startswith("evil")
    status, headers, body = ask(client, "GET", "/ui/messages/mail/m1/html")
    assert status == 200 and b"<script>parent.pwned=1</script>" in body  # inert: see policy
    policy = headers[b"content-security-policy"].decode()
    assert policy.startswith("sandbox;") and "script-src" not in policy
    assert "default-src 'none'" in policy and "img-src data:" in policy
    _, headers, _ = ask(client, "GET", "/ui/messages/mail/m1/html?remote=1")
    assert "img-src * data:" in headers[b"content-security-policy"].decode()
    status, headers, body = ask(client, "GET", "/ui/messages/mail/m1/parts/2")
    assert status == 200 and body == b"<html><script>alert(5)</script></html>"
    assert headers[b"content-type"] == b"application/octet-stream"
    disposition = headers[b"content-disposition"].decode()
    assert (
        disposition.startswith('attachment; filename="evil_')
        and "\\" not in disposition.split(";")[1]
    )
    assert ask(client, "GET", "/ui/messages/mail/m1/parts/9")[0] == 404
    assert ask(client, "GET", "/ui/messages/mail/nope")[0] == 404
    assert ask(client, "GET", "/ui/messages/nosuch/m1")[0] == 404


@pytest.mark.parametrize("charset", ["x-unknown", "utf-8"])
def test_a_text_part_in_a_broken_charset_still_reads(charset: str) -> None:
    raw = (
        b"Subject: =?x-nothing?q?odd?=\r\nContent-Type: text/plain; charset=" + charset.encode()
    ) + b"\r\n\r\nplain \xff text\r\n"
    described = mail.describe(raw)
    assert "plain" in described["text"] and not described["has_html"]
