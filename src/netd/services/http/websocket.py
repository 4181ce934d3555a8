"""
WebSocket stubs: a route with C{websocket:} accepts the upgrade itself and runs a
small script instead of splicing to an upstream.

    - path: /ws/prices
      websocket:
        on_open: ["welcome", {json: {type: hello}}]   # sent once the upgrade is done
        replies:                                      # the first that matches answers
          - {text: ping, send: pong}
          - {json: {type: subscribe}, send: [{json: {type: subscribed}}, "tick"]}
          - {regex: "^bye", send: "see you", close: {code: 4000, reason: bye}}
        echo: true                                    # what nothing matched comes back

The handshake (RFC 6455 4.2) is answered here; the frames are
L{netd.services.http.wspeer}'s (over L{netd.websockets.Frames}), loaded with the
first map that has such a route.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import attrs

from netd.records import Record
from netd.schema import Value
from netd.services.http.match import Text, json_subset, plain, read_regex

__all__ = ["Script", "read_script", "serve"]


@attrs.frozen(repr=False)
class Send(Record):
    """One message to send: text, or bytes for a binary message."""

    data: str | bytes


@attrs.frozen(repr=False)
class Reply(Record):
    """Messages it matches (all given conditions), what it sends back, whether it closes."""

    text: Text | None = None
    json: Any = None
    has_json: bool = False
    send: tuple[Send, ...] = ()
    close: tuple[int, str] | None = None

    def matches(self, message: str | bytes) -> bool:
        text = message if isinstance(message, str) else message.decode("utf-8", "replace")
        if self.text is not None and not self.text.check(text):
            return False
        if self.has_json:
            try:
                document = json.loads(text)
            except (ValueError, RecursionError):
                return False
            return json_subset(self.json, document)
        return True


@attrs.frozen(repr=False)
class Script(Record):
    on_open: tuple[Send, ...] = ()
    replies: tuple[Reply, ...] = ()
    echo: bool = False
    # Offered subprotocols this endpoint takes, in its order of preference.
    subprotocols: tuple[str, ...] = ()


# -- reading the map ---------------------------------------------------------------


def read_script(value: Value) -> Script:
    # The peer and wsproto load with the first map that has a WebSocket route,
    # not with every http service (a tenth of a second of start-up).
    from netd.services.http import wspeer  # noqa: F401

    section = value.section()
    script = Script(
        on_open=section.read("on_open", _messages, ()),
        replies=section.read("replies", lambda v: v.list_of(_reply), ()),
        echo=section.flag("echo", False),
        subprotocols=section.strings("subprotocols"),
    )
    section.finish()
    return script


def _messages(value: Value) -> tuple[Send, ...]:
    return tuple(m for m in value.list_of(_message, single=True) if m is not None)


def _message(value: Value) -> Send | None:
    """C{"text"}, C{{json: ...}} (sent as text) or C{{base64: ...}} (a binary message)."""
    if not value.is_mapping:
        return Send(value.as_str())
    section = value.section()
    document = section.get("json")
    binary = section.optional_str("base64")
    section.finish()
    if (document is None) == (binary is None):
        value.error("a message is text, {json: ...} or {base64: ...}")
        return None
    if document is not None:
        return Send(json.dumps(plain(document)))
    try:
        return Send(base64.b64decode(binary or "", validate=True))
    except ValueError:
        value.error("not base64")
        return None


def _reply(value: Value) -> Reply:
    """C{text} (equals), C{contains}, C{regex}, C{json} (a subset): all given must hold."""
    section = value.section()
    text = Text(
        equals=section.optional_str("text"),
        contains=section.optional_str("contains"),
        regex=section.read("regex", read_regex, None),
    )
    document = section.get("json")
    reply = Reply(
        text=text if (text.equals, text.contains, text.regex) != (None, None, None) else None,
        json=plain(document) if document is not None else None,
        has_json=document is not None,
        send=section.read("send", _messages, ()),
        close=section.read("close", _close, None),
    )
    section.finish()
    return reply


def _close(value: Value) -> tuple[int, str]:
    if not value.is_mapping:
        return _code(value), ""
    section = value.section()
    code_value = section.require("code")
    code = _code(code_value) if code_value is not None else 1000
    reason = section.text("reason", "")
    section.finish()
    if len(reason.encode()) > 123:
        value.error("a close reason is at most 123 bytes")
    return code, reason


def _code(value: Value) -> int:
    code = value.as_int(1000, minimum=1000, maximum=4999)
    # RFC 6455 7.4: these are never sent in a Close frame.
    if code in (1004, 1005, 1006, 1015) or 1016 <= code <= 2999:
        value.error(f"{code} is not a close code an endpoint sends")
        return 1000
    return code


def _subprotocol(exchange: Any, script: Script) -> str | None:
    """The first of the script's subprotocols that the client offered (RFC 6455 4.2.2)."""
    from netd.websockets import offered_subprotocols

    names = set(offered_subprotocols(exchange.header(b"sec-websocket-protocol")))
    return next((name for name in script.subprotocols if name in names), None)


def serve(exchange: Any, script: Script, clock: Any) -> None:
    """Answer a request on a WebSocket route: switch and run C{script}, or say why not."""
    from netd.websockets import accept, handshake_problem, refusal_status

    stream = exchange.websocket_stream()
    if stream is not None:
        _serve_over_h2(exchange, stream, script)
        return
    upgrade = exchange.upgrade()
    problem = handshake_problem(exchange.header) if upgrade is not None else None
    if upgrade is None or problem is not None:
        # A plain request (or, over HTTP/2, not an extended CONNECT): a WebSocket lives here.
        status = 426 if problem is None else refusal_status(problem)
        body = (problem or "a WebSocket endpoint: connect with ws:// or wss://") + "\n"
        headers = [(b"Content-Type", b"text/plain; charset=utf-8")]
        if status == 426:
            headers += [
                (b"Upgrade", b"websocket"),
                (b"Connection", b"Upgrade"),
                (b"Sec-WebSocket-Version", b"13"),
            ]
        exchange.respond(status, headers, body.encode())
        return
    key = exchange.header(b"sec-websocket-key") or b""
    head = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: %s\r\n" % accept(key)
    )
    chosen = _subprotocol(exchange, script)
    if chosen is not None:
        head += b"Sec-WebSocket-Protocol: %s\r\n" % chosen.encode("ascii")
    head += b"\r\n"
    from netd.services.http.wspeer import StubSocket

    peer = StubSocket(script, upgrade)

    def switch() -> None:
        upgrade.splice(head, peer)
        if not peer.ended:
            peer.open()

    # Not at once: the wire is still inside its parser, which has yet to hand
    # over what the client sent after the head (frames sent with the handshake).
    clock.callLater(0, switch)


def _serve_over_h2(exchange: Any, stream: Any, script: Script) -> None:
    """RFC 8441: an extended CONNECT opened the WebSocket; no key, no 101, a 200."""
    if exchange.header(b"sec-websocket-version") != b"13":
        exchange.respond(
            400,
            [(b"Content-Type", b"text/plain; charset=utf-8"), (b"Sec-WebSocket-Version", b"13")],
            b"Sec-WebSocket-Version: 13 only\n",
        )
        return
    headers = []
    chosen = _subprotocol(exchange, script)
    if chosen is not None:
        headers.append((b"Sec-WebSocket-Protocol", chosen.encode("ascii")))
    from netd.services.http.wspeer import StubSocket

    peer = StubSocket(script, stream)
    stream.accept(headers, peer)
    if not peer.ended:
        peer.open()
