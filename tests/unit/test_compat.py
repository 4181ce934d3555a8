"""
Tests for netd.compat: each private Twisted name netd uses, exercised for real.

A Twisted release that renames, moves or changes one of them fails here, by
name.  setup.cfg bounds Twisted to the releases these tests passed on: raising
that bound means running this file against the new release first.
"""

from __future__ import annotations

import ast
import inspect
import os
import socket
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from twisted.internet import tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.mail import imap4, pop3, smtp
from twisted.protocols import ftp
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web._http2 import H2Stream
from twisted.web.client import HTTPConnectionPool, Request
from twisted.web.http_headers import Headers
from zope.interface import implementer

from netd import compat
from netd.compat import mail as compat_mail
from netd.compat import tls as compat_tls
from netd.compat import web as compat_web
from netd.compat import web_client as compat_web_client

_SRC = Path(__file__).resolve().parents[2] / "src"


# --- no private import outside netd.compat -----------------------------------------------


def _private_twisted_imports(source: str) -> Iterator[tuple[int, str]]:
    """(line, import) for each import of a private Twisted module or name in C{source}."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            names = [alias.name for alias in node.names]
            if parts[0] == "twisted" and (
                any(p.startswith("_") for p in parts) or any(n.startswith("_") for n in names)
            ):
                yield node.lineno, f"from {node.module} import {', '.join(names)}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "twisted" and any(p.startswith("_") for p in parts):
                    yield node.lineno, f"import {alias.name}"


def test_the_scan_finds_each_form_of_private_import() -> None:
    source = (
        "from twisted.web._http2 import H2Connection\n"
        "from twisted.internet.endpoints import (\n    serverFromString,\n    _parse,\n)\n"
        "import twisted.web._newclient\n"
        "from twisted.web import server\n"
        "from netd._private import thing\n"
    )
    assert [line for line, _ in _private_twisted_imports(source)] == [1, 2, 6]


def test_only_compat_imports_private_twisted_names() -> None:
    modules = sorted([*(_SRC / "netd").rglob("*.py"), *(_SRC / "twisted").rglob("*.py")])
    compat_package = _SRC / "netd" / "compat"
    assert compat_package / "__init__.py" in modules
    offenders = [
        f"{path.relative_to(_SRC)}:{line}: {text}"
        for path in modules
        if compat_package not in path.parents
        for line, text in _private_twisted_imports(path.read_text())
    ]
    assert offenders == [], "import these through netd.compat:\n" + "\n".join(offenders)


# --- endpoints ------------------------------------------------------------------------


def test_parse_endpoint_splits_and_unquotes_as_server_from_string_does() -> None:
    assert compat.parse_endpoint(r"ssl:443:privateKey=a\:b.pem:interface=\:\:1") == (
        ["ssl", "443"],
        {"privateKey": "a:b.pem", "interface": "::1"},
    )
    assert compat.parse_endpoint("systemd:domain=INET:index=0") == (
        ["systemd"],
        {"domain": "INET", "index": "0"},
    )


def test_inherited_descriptors_are_the_systemd_parsers_list() -> None:
    # LISTEN_PID is not this process here: none handed over (tests/integration/
    # test_systemd.py hands some over for real).
    descriptors = compat.inherited_descriptors()
    assert descriptors == []
    assert isinstance(descriptors, list)


@pytest.mark.parametrize("shared", [True, False])
def test_shared_listening_socket_keeps_accepting_on_a_dup(shared: bool) -> None:
    port = tcp.Port(
        0, Factory.forProtocol(Protocol), interface="127.0.0.1", reactor=MemoryReactor()
    )
    assert port._shouldShutdown is True
    port.startListening()
    copy = socket.socket(fileno=os.dup(port.fileno()))
    address = copy.getsockname()
    try:
        if shared:
            compat.share_listening_socket(port)
            assert port._shouldShutdown is False
        port.connectionLost(Failure(ConnectionDone()))
        # Still listening on the dup only if the port closed without shutdown():
        # the kernel completes the handshake into the backlog.
        if shared:
            socket.create_connection(address, timeout=5).close()
        else:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(address, timeout=5)
    finally:
        copy.close()


# --- TLS ------------------------------------------------------------------------------


@implementer(IProtocolNegotiationFactory)
class _NegotiatingFactory(Factory):
    protocol = Protocol

    def acceptableProtocols(self) -> list[bytes]:
        return [b"h2"]


def test_protos_from_protocol_puts_the_wrapped_factorys_protocols_first() -> None:
    tls = TLSMemoryBIOFactory(optionsForClientTLS("localhost"), True, _NegotiatingFactory())
    protocol = tls.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    assert tuple(compat_tls.protosFromProtocol(protocol, [b"http/1.1"])) == (b"h2", b"http/1.1")


def test_certificate_options_members_the_alpn_override_uses() -> None:
    # netd.tls._ServerOptions overrides _makeContext and reads _acceptableProtocols.
    options = CertificateOptions(acceptableProtocols=[b"h2"])
    assert options._acceptableProtocols == [b"h2"]
    _assert_method(CertificateOptions, "_makeContext", ["self", "skipCiphers"])


# --- buffered bytes -------------------------------------------------------------------


class _Descriptor(FileDescriptor):
    """A descriptor whose socket takes two bytes per send."""

    def writeSomeData(self, data: bytes) -> int:
        return min(len(data), 2)


def test_buffered_bytes_counts_the_buffer_past_what_was_sent_and_the_queued_writes() -> None:
    descriptor = _Descriptor(reactor=MemoryReactor())
    descriptor.connected = True
    descriptor.write(b"abcdef")
    assert compat.buffered_bytes(descriptor) == 6  # queued
    descriptor.doWrite()
    assert compat.buffered_bytes(descriptor) == 4  # two sent from the buffer
    descriptor.write(b"gh")
    assert compat.buffered_bytes(descriptor) == 6


def test_may_send_now_only_with_nothing_queued_and_nothing_closing() -> None:
    descriptor = _Descriptor(reactor=MemoryReactor())
    descriptor.connected = True
    descriptor.TLS = False
    assert compat.may_send_now(descriptor)
    descriptor.write(b"queued")
    assert not compat.may_send_now(descriptor)  # written behind what waits
    descriptor.doWrite()
    assert not compat.may_send_now(descriptor)  # the rest still in the buffer
    while descriptor.dataBuffer[descriptor.offset :] or descriptor._tempDataLen:
        descriptor.doWrite()
    assert compat.may_send_now(descriptor)
    descriptor.loseWriteConnection()
    assert not compat.may_send_now(descriptor)  # half-closed


def test_buffered_bytes_counts_cleartext_tls_holds_before_its_handshake() -> None:
    # Not the factory's default BufferingTLSTransport, whose small-write
    # aggregation (at most 64 KB, for one reactor turn) would wait on the global reactor.
    tls = TLSMemoryBIOFactory(optionsForClientTLS("localhost"), True, Factory.forProtocol(Protocol))
    protocol = TLSMemoryBIOProtocol(tls, Protocol())
    protocol.makeConnection(StringTransport())
    protocol.write(b"hello")
    assert compat.buffered_bytes(protocol) == 5


# --- HTTP/2 ---------------------------------------------------------------------------


def _assert_method(cls: type, name: str, parameters: list[str]) -> None:
    method = getattr(cls, name, None)
    assert callable(method), f"{cls.__qualname__}.{name} is gone"
    assert list(inspect.signature(method).parameters) == parameters, f"{cls.__qualname__}.{name}"


# netd.services.http.h2.LimitedH2Connection overrides or calls these.
@pytest.mark.parametrize(
    ("name", "parameters"),
    [
        ("_sendPrioritisedData", ["self", "args"]),
        ("_requestReceived", ["self", "event"]),
        ("_requestDataReceived", ["self", "event"]),
        ("_requestEnded", ["self", "event"]),
        ("_requestAborted", ["self", "event"]),
        ("_tryToWriteControlData", ["self"]),
        ("_requestDone", ["self", "streamID"]),
        ("remainingOutboundWindow", ["self", "streamID"]),
        ("openStreamWindow", ["self", "streamID", "increment"]),
    ],
)
def test_h2_connection_has_the_methods_netd_overrides(name: str, parameters: list[str]) -> None:
    _assert_method(compat_web.H2Connection, name, parameters)


def test_h2_connection_keeps_its_outbound_queues_by_stream() -> None:
    connection = compat_web.H2Connection(Clock())
    assert connection._outboundStreamQueues == {}


def _stream() -> H2Stream:
    headers = [(b":method", b"GET"), (b":path", b"/"), (b":authority", b"example")]
    connection = compat_web.H2Connection(Clock())
    connection.makeConnection(StringTransport())
    return H2Stream(1, connection, headers, http.Request, None, None)


def test_h2_stream_request_is_the_request_the_stream_feeds() -> None:
    stream = _stream()
    request = compat_web.h2_stream_request(stream)
    assert isinstance(request, http.Request)
    assert request.channel is stream
    assert request.requestHeaders.getRawHeaders(b"host") == [b"example"]


class _Producer:
    def __init__(self) -> None:
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


def test_h2_producer_paused_follows_flow_control() -> None:
    stream = _stream()
    assert not compat_web.h2_producer_paused(stream)  # no producer
    producer = _Producer()
    stream.registerProducer(producer, True)
    assert not compat_web.h2_producer_paused(stream)
    stream.flowControlBlocked()
    assert producer.paused
    assert compat_web.h2_producer_paused(stream)


# --- HTTP client (the proxy) ----------------------------------------------------------


def test_http11_client_factory_builds_the_protocol_with_the_pools_callback() -> None:
    def quiescent(protocol: object) -> None:
        pass

    factory = compat_web_client.HTTP11ClientFactory(quiescent, "upstream")
    protocol = factory.buildProtocol(None)
    assert isinstance(protocol, compat_web_client.HTTP11ClientProtocol)
    # netd.services.http.proxy._QuietClientFactory builds its protocol with it.
    assert factory._quiescentCallback is quiescent
    assert protocol._quiescentCallback is quiescent


class _RecordingEndpoint:
    def __init__(self) -> None:
        self.factories: list[object] = []

    def connect(self, factory: object) -> Deferred[object]:
        self.factories.append(factory)
        return Deferred()


def test_set_pool_protocol_factory_is_what_the_pool_connects_with() -> None:
    class Chosen(compat_web_client.HTTP11ClientFactory):
        pass

    pool = HTTPConnectionPool(MemoryReactor(), persistent=True)
    compat_web_client.set_pool_protocol_factory(pool, Chosen)
    endpoint = _RecordingEndpoint()
    pool.getConnection(("http", b"example", 80), endpoint)
    [factory] = endpoint.factories
    assert isinstance(factory, Chosen)
    assert isinstance(factory.buildProtocol(None), compat_web_client.HTTP11ClientProtocol)


def test_a_whole_response_reaches_finish_response_waiting_with_the_parser_still_set() -> None:
    # netd.services.http.proxy._UpstreamProtocol overrides _finishResponse_WAITING
    # and reads the version and Connection values from the private _parser there.
    seen: list[tuple[object, object, object]] = []

    class Upstream(compat_web_client.HTTP11ClientProtocol):
        def _finishResponse_WAITING(self, rest: bytes) -> None:
            parser = self._parser
            seen.append(
                (
                    parser.response.version,
                    parser.connHeaders.getRawHeaders(b"connection"),
                    parser.request.persistent,
                )
            )
            super()._finishResponse_WAITING(rest)

    _assert_method(
        compat_web_client.HTTP11ClientProtocol, "_finishResponse_WAITING", ["self", "rest"]
    )
    protocol = Upstream()
    protocol.makeConnection(StringTransport())
    protocol.request(Request(b"GET", b"/", Headers({b"host": [b"example"]}), None, True))
    protocol.dataReceived(b"HTTP/1.0 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    assert seen == [((b"HTTP", 1, 0), [b"close"], True)]


# --- SMTP -----------------------------------------------------------------------------


def test_login_credentials_ask_for_user_then_password() -> None:
    credentials = compat_mail.LOGINCredentials()
    challenges = []
    for answer in (b"alice", b"secret"):
        assert credentials.moreChallenges()
        challenges.append(credentials.getChallenge())
        credentials.setResponse(answer)
    assert not credentials.moreChallenges()
    assert challenges == [b"User Name\0", b"Password\0"]
    assert credentials.username == b"alice"
    assert credentials.checkPassword(b"secret")


def test_plain_credentials_take_one_answer_and_refuse_a_malformed_one() -> None:
    credentials = compat_mail.PLAINCredentials()
    assert credentials.getChallenge() == b""
    credentials.setResponse(b"\0alice\0secret")
    assert not credentials.moreChallenges()
    assert credentials.username == b"alice"
    assert credentials.checkPassword(b"secret")
    with pytest.raises(compat_mail.IllegalClientResponse):
        compat_mail.PLAINCredentials().setResponse(b"no separators")


def test_esmtp_members_netds_session_uses() -> None:
    # netd.services.smtp.server.Session sets _helo, reads _onLogout and overrides
    # the two authentication callbacks.
    session = smtp.ESMTP()
    assert session._helo is None
    assert session._onLogout is None
    _assert_method(smtp.ESMTP, "_cbAuthenticated", ["self", "loginInfo"])
    _assert_method(smtp.ESMTP, "_ebAuthenticated", ["self", "reason"])


def test_fetch_parser_parses_items_and_raises_on_malformed_ones() -> None:
    # netd.services.smtp.imap.IMAPSession parses FETCH items with it to answer BAD.
    parser = compat_mail.FetchParser()
    parser.parseString(b"(UID BODY.PEEK[HEADER.FIELDS (Subject)])")
    assert [item.type for item in parser.result] == ["uid", "body"]
    assert parser.result[1].peek and parser.result[1].header
    with pytest.raises(Exception, match="Whitespace expected"):
        compat_mail.FetchParser().parseString(b"(FLAGS")


def test_imap_and_pop3_members_netds_sessions_use() -> None:
    # IMAPSession clears LineReceiver's _buffer after STARTTLS, overrides these
    # and puts its own functions in the command tables Twisted dispatches on.
    server = imap4.IMAP4Server()
    server.makeConnection(StringTransport())
    server.dataReceived(b"a NOOP")
    assert server._buffer == b"a NOOP"
    _assert_method(imap4.IMAP4Server, "dispatchCommand", ["self", "tag", "cmd", "rest", "uid"])
    _assert_method(imap4.IMAP4Server, "spewMessage", ["self", "id", "msg", "query", "uid"])
    _assert_method(imap4.IMAP4Server, "arg_searchkeys", ["self", "line"])
    _assert_method(imap4.IMAP4Server, "_cbSelectWork", ["self", "mbox", "cmdName", "tag"])
    assert imap4.IMAP4Server.auth_SELECT[0] is imap4.IMAP4Server._selectWork
    for table in ("select_FETCH", "select_SEARCH", "select_STORE", "unauth_STARTTLS"):
        assert callable(getattr(imap4.IMAP4Server, table)[0]), table
    # POP3Session sets magic (the greeting) and callLater, extends AUTH_CMDS
    # and overrides state_COMMAND and transformChunk.  Both sessions override
    # _unblock, which runs the commands queued (in blocked) behind a long answer.
    assert pop3.POP3.magic is None and b"USER" in pop3.POP3.AUTH_CMDS
    _assert_method(pop3.POP3, "state_COMMAND", ["self", "line"])
    _assert_method(pop3.POP3, "transformChunk", ["self", "chunk"])
    _assert_method(pop3.POP3, "_unblock", ["self", "_"])
    _assert_method(imap4.IMAP4Server, "_unblock", ["self"])
    assert pop3.POP3.blocked is None and imap4.IMAP4Server.blocked is None
    for table in ("select_EXPUNGE",):
        assert callable(getattr(imap4.IMAP4Server, table)[0]), table


def test_pop3_message_sender_sends_a_wrapped_message() -> None:
    # POP3Session's TOP goes through compat_mail.send_pop3_message with its own wrapper.
    class Maildrop:
        def listMessages(self, i: int) -> int:
            return 12

        def getMessage(self, i: int) -> BytesIO:
            return BytesIO(b"H: v\n\nbody\n")

    server = pop3.POP3()
    transport = StringTransport()
    server.makeConnection(transport)
    server.mbox = Maildrop()
    transport.clear()
    compat_mail.send_pop3_message(server, b"1", lambda f: BytesIO(f.read()[:6]), lambda n: "top")
    for _ in range(10):  # Twisted's FileSender is a pull producer: pull it to the end
        if transport.producer is None:
            break
        transport.producer.resumeProducing()
    assert transport.value() == b"+OK top\r\nH: v\r\n\r\n.\r\n"


# --- members other kinds' subclasses rely on ------------------------------------------


def test_ftp_members_netds_session_and_shell_use() -> None:
    # netd.services.ftp.session.Session reads _user, _fromName, _epsvAll, the
    # line buffer _buffer and calls _validateNetworkProtocol; files.Shell
    # overrides _path, through which every FTPShell operation resolves a path.
    session = ftp.FTP()
    session.factory = ftp.FTPFactory()
    session.callLater = Clock().callLater  # its idle timeout
    assert session._epsvAll is False
    session.ftp_USER("alice")
    assert session._user == "alice"
    session.ftp_RNFR("old")
    assert session._fromName == "old"
    session.makeConnection(StringTransport())
    session.dataReceived(b"NOO")
    assert session._buffer == b"NOO"
    _assert_method(ftp.FTP, "_validateNetworkProtocol", ["self", "protocol"])
    _assert_method(ftp.FTPAnonymousShell, "_path", ["self", "path"])
    assert "self._path(" in inspect.getsource(ftp.FTPAnonymousShell)


def test_http_channel_members_netds_admin_channel_uses() -> None:
    # netd.admin's channel arms _abortingCall itself and reads the request's
    # method from _command.
    channel = http.HTTPChannel()
    channel.callLater = Clock().callLater  # its idle timeout
    assert channel._abortingCall is None
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"HEAD / HTTP/1.1\r\n")
    assert channel._command == b"HEAD"
    channel.connectionLost(Failure(ConnectionDone()))


def _epoll_events(poller: object, descriptor: int) -> int:
    """The event mask the kernel holds for C{descriptor} in the epoll object C{poller}."""
    fdinfo = Path(f"/proc/self/fdinfo/{poller.fileno()}").read_text()  # type: ignore[attr-defined]
    for line in fdinfo.splitlines():
        fields = line.split()
        if fields[:2] == ["tfd:", str(descriptor)]:
            return int(fields[3], 16)
    raise AssertionError(f"{descriptor} is not registered")


def test_wake_one_waiter_registers_a_reading_port_exclusively_and_twisted_can_drop_it() -> None:
    import select

    from twisted.internet.epollreactor import EPollReactor
    from twisted.internet.protocol import DatagramProtocol

    reactor = EPollReactor()
    try:
        port = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        descriptor = port.fileno()
        assert not _epoll_events(reactor._poller, descriptor) & select.EPOLLEXCLUSIVE
        assert compat.wake_one_waiter(reactor, port)
        assert _epoll_events(reactor._poller, descriptor) & select.EPOLLEXCLUSIVE
        port.stopReading()  # Twisted unregisters it as it would any reader
        assert not compat.wake_one_waiter(reactor, port)  # not reading: left alone
        port.startReading()
        assert not _epoll_events(reactor._poller, descriptor) & select.EPOLLEXCLUSIVE
        port.stopListening()
    finally:
        reactor._poller.close()


def test_read_with_is_what_the_reactor_calls_when_a_port_can_be_read() -> None:
    from twisted.internet.epollreactor import EPollReactor
    from twisted.internet.protocol import DatagramProtocol

    class Refuses(DatagramProtocol):
        def datagramReceived(self, datagram: bytes, addr: object) -> None:
            raise AssertionError("the reader reads, not Twisted's loop")

    reactor = EPollReactor()
    try:
        port = reactor.listenUDP(0, Refuses(), interface="127.0.0.1")
        read: list[bytes] = []
        compat.read_with(port, lambda: read.append(port.socket.recv(100)))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"ping", port.socket.getsockname())
            for _ in range(50):  # bounded: one datagram on loopback is there at once
                reactor.doIteration(0.1)
                if read:
                    break
        assert read == [b"ping"]
        port.stopListening()
    finally:
        reactor._poller.close()
