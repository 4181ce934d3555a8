"""
The ftp kind without sockets: its map section, accounts and confined shells, and
sessions driven through StringTransport and a MemoryReactorClock.
"""

from __future__ import annotations

import errno
import os
import re
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bcrypt
import crypt_r
import pytest
from twisted.cred import credentials
from twisted.cred.checkers import ANONYMOUS
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import main
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableDescriptor
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols import ftp
from twisted.python.failure import Failure
from zope.interface import implementer

from netd.events import Journal, ServiceStats
from netd.rules import RuleSet
from netd.services.ftp import RULES, Options, files
from netd.services.ftp.data import KernelPorts, LineEnds, PassivePort
from netd.services.ftp.files import (
    FACTS,
    UPLOAD_PREFIX,
    Accounts,
    NameNotAllowed,
    Place,
    Realm,
    Shell,
    Upload,
    User,
    _error,
    _Rights,
    _write_all,
)
from netd.services.ftp.session import (
    FailedLogins,
    FTPServer,
    Session,
    SessionLimits,
    _response,
    _timestamp,
)
from tests.fakes.transports import HalfClosingStringTransport, TLSStringTransport
from tests.maps import ServiceMap

# -- the map section ----------------------------------------------------------------------


FILES = ServiceMap("ftp", "files", Options, top="tls: {lab: {self_signed: [localhost]}}\n")
parse = FILES.parse


def errors(tmp_path: Path, section: str) -> list[str]:
    return [e.split(": ", 1)[1] for e in FILES.errors(tmp_path, section)]


def test_parse_values_and_defaults(tmp_path: Path) -> None:
    (tmp_path / "pub").mkdir()
    (tmp_path / "alice").mkdir()
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    options = parse(
        tmp_path,
        "    root: pub\n"
        "    anonymous: write\n"
        "    users:\n"
        "      alice: {password: pw, home: alice, write: true}\n"
        f"      bob: {{password_hash: '{hashed}', home: pub}}\n"
        "    passive_ports: '30000-30009'\n"
        "    passive_host: 192.0.2.1\n"
        "    tls: lab\n"
        "    require_tls: true\n"
        "    login_delay: 0\n"
        "    data_timeout: 5\n",
    )
    assert options.root == tmp_path / "pub" and options.anonymous == "write"
    alice, bob = options.users
    assert alice == User("alice", tmp_path / "alice", True, "pw", None)
    assert bob.password_hash == hashed and not bob.write
    assert options.passive_ports == (30000, 30009) and options.passive_host == "192.0.2.1"
    assert options.tls == "lab" and options.require_tls
    assert options.limits == SessionLimits(login_delay=0, data_timeout=5)
    anonymous_only = parse(tmp_path, "    root: pub\n    anonymous: read\n")
    assert anonymous_only.users == () and anonymous_only.tls is None
    assert anonymous_only.umask == 0o022
    # Written as octal, quoted or not (YAML alone would read 027 as the number 23).
    for written in ("027", "'027'", "'0o027'"):
        assert (
            parse(tmp_path, f"    root: pub\n    anonymous: read\n    umask: {written}\n").umask
            == 0o27
        )
    assert errors(tmp_path, "    root: pub\n    anonymous: read\n    umask: '1777'\n") == [
        "services.files.umask: expected an octal umask like '022', got '1777'"
    ]


def test_parse_reports_every_error(tmp_path: Path) -> None:
    found = errors(
        tmp_path,
        "    anonymous: maybe\n"
        "    root: nowhere\n"
        "    users:\n"
        "      'bad name': {password: x, home: .}\n"
        "      anonymous: {password: x, home: .}\n"
        "      carol: {home: .}\n"
        "      dave: {password: x, password_hash: y, home: .}\n"
        "      erin: {password_hash: 'plain', home: .}\n"
        "      frank: {password: x, home: ., shell: /bin/sh}\n"
        "      gina: {password: '$6$looks$hashed', home: .}\n"
        "    passive_ports: '900-100'\n"
        "    passive_host: ::1\n"
        "    tls: nope\n"
        "    colour: blue\n",
    )
    assert found == [
        "services.files.anonymous: must be one of none, read, write, got 'maybe'",
        f"services.files.root: not a directory: {tmp_path / 'nowhere'}",
        "services.files.users.bad name: user names are 1-64 characters, no spaces or ':',"
        " not 'anonymous'",
        "services.files.users.anonymous: user names are 1-64 characters, no spaces or ':',"
        " not 'anonymous'",
        "services.files.users.carol: give 'password' or 'password_hash' (one of them)",
        "services.files.users.dave: give 'password' or 'password_hash' (one of them)",
        "services.files.users.dave.password_hash: not a bcrypt ($2b$...) or crypt(3)"
        " ($6$..., $5$..., $1$...) hash",
        "services.files.users.erin.password_hash: not a bcrypt ($2b$...) or crypt(3)"
        " ($6$..., $5$..., $1$...) hash",
        "services.files.users.frank.shell: unknown key",
        "services.files.users.gina.password: starts with '$' as a hash does: give a hash as"
        " 'password_hash'",
        "services.files.passive_ports: passive ports are between 1024 and 65535, low-high",
        "services.files.passive_host: PASV announces an IPv4 address, got '::1'",
        "services.files.tls: unknown TLS profile 'nope' (known: lab)",
        "services.files.colour: unknown key",
    ]
    assert errors(tmp_path, "    anonymous: read\n") == [
        "services.files: anonymous: read needs a 'root' directory"
    ]
    assert errors(tmp_path, "    anonymous: none\n") == [
        "services.files: nobody can log in: set 'anonymous' to read or write, or add 'users'"
    ]
    assert errors(tmp_path, "    root: .\n    anonymous: read\n    require_tls: true\n") == [
        "services.files: require_tls needs a 'tls' profile for AUTH TLS"
    ]


# -- accounts and shells ------------------------------------------------------------------


def result_of(deferred: Deferred[Any]) -> Any:
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def test_accounts_check_passwords_hashes_and_anonymous(tmp_path: Path) -> None:
    hashed = bcrypt.hashpw(b"builder", bcrypt.gensalt(4)).decode()
    crypt_hash = crypt_r.crypt("sea", "$6$saltsalt$")
    users = {
        "alice": User("alice", tmp_path, password="wonderland"),
        "bob": User("bob", tmp_path, password_hash=hashed),
    }
    accounts = Accounts(users, anonymous=True, run_in_thread=maybeDeferred)

    def login(name: str, password: str) -> Any:
        return result_of(accounts.requestAvatarId(credentials.UsernamePassword(name, password)))

    assert login("alice", "wonderland") == "alice"
    users["carol"] = User("carol", tmp_path, password_hash=crypt_hash)
    assert login("carol", "sea") == "carol"
    assert isinstance(login("carol", "see"), Failure)
    assert login("bob", "builder") == "bob"
    for name, password in (("alice", "wonder"), ("bob", "wonderland"), ("eve", "x")):
        outcome = login(name, password)
        assert isinstance(outcome, Failure) and outcome.check(UnauthorizedLogin)
    assert result_of(accounts.requestAvatarId(credentials.Anonymous())) is ANONYMOUS
    closed = Accounts(users, anonymous=False, run_in_thread=maybeDeferred)
    assert isinstance(result_of(closed.requestAvatarId(credentials.Anonymous())), Failure)


def test_a_password_that_is_not_utf8_is_a_wrong_one_for_every_checker(tmp_path: Path) -> None:
    hashed = bcrypt.hashpw(b"builder", bcrypt.gensalt(4)).decode()
    users = {
        "alice": User("alice", tmp_path, password="wonderland"),
        "bob": User("bob", tmp_path, password_hash=hashed),
    }
    users["carol"] = User("carol", tmp_path, password_hash=crypt_r.crypt("sea", "$6$saltsalt$"))
    accounts = Accounts(users, anonymous=False, run_in_thread=maybeDeferred)
    # As the session decodes a line: bytes that are not UTF-8 become lone surrogates.
    password = b"\xff\xfe".decode("utf-8", "surrogateescape")
    for name in [*users, "eve"]:
        outcome = result_of(accounts.requestAvatarId(credentials.UsernamePassword(name, password)))
        assert isinstance(outcome, Failure) and outcome.check(UnauthorizedLogin), name


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "file.txt").write_text("inside\n")
    (tmp_path / "secret.txt").write_text("outside\n")
    (root / "out_link").symlink_to(tmp_path / "secret.txt")
    (root / "out_dir").symlink_to(tmp_path)
    (root / "in_link").symlink_to(root / "file.txt")
    (root / (UPLOAD_PREFIX + "0123")).write_text("half an upload")
    return root


@pytest.mark.parametrize(
    "segments",
    [["out_link"], ["out_dir"], ["out_dir", "secret.txt"], [UPLOAD_PREFIX + "0123"], ["a\0b"]],
)
def test_shell_refuses_paths_out_of_its_root(tree: Path, segments: list[str]) -> None:
    shell = Shell(Place.of(tree), writable=True)
    with pytest.raises(ftp.FTPCmdError):
        shell.open_for_reading(segments)
    with pytest.raises(ftp.FTPCmdError):
        shell.upload_target(segments)


def test_shell_lists_only_what_it_serves_and_writes_only_with_the_flag(tree: Path) -> None:
    shell = Shell(Place.of(tree), writable=False)
    assert shell.listing([], long=False) == [b"file.txt", b"in_link", b"sub"]
    file_line, link_line, dir_line = shell.listing([], long=True)
    assert re.fullmatch(
        rb"-rw.{7} +1 \S+ +\S+ +7 \w{3} \d\d [ \d]\d:?\d\d \d* ?file.txt", file_line
    )
    assert link_line.endswith(b" in_link") and dir_line.startswith(b"d")
    assert shell.listing(["file.txt"], long=False) == [b"file.txt"]
    with pytest.raises(ftp.FileNotFoundError):
        shell.listing(["missing"], long=True)
    with shell.open_for_reading(["in_link"]) as source:
        assert source.read() == b"inside\n"
    with pytest.raises(ftp.PermissionDeniedError):
        shell.upload_target(["new.txt"])
    with pytest.raises(ftp.PermissionDeniedError):
        shell.makeDirectory(["new"])
    writable = Shell(Place.of(tree), writable=True)
    assert writable.upload_target(["sub", "new.txt"]) == tree.resolve() / "sub" / "new.txt"
    with pytest.raises(ftp.IsADirectoryError):
        writable.upload_target(["sub"])
    assert isinstance(result_of(writable.removeDirectory([])), Failure)  # never the root


def reply_to(outcome: Any) -> str:
    """The reply line a session sends for a failed shell operation."""
    assert isinstance(outcome, Failure), outcome
    assert outcome.check(ftp.FTPCmdError), outcome
    return _response(outcome.value)


def test_shell_errors_carry_their_reply_and_reason(tree: Path) -> None:
    shell = Shell(Place.of(tree), writable=True)
    (tree / "sub" / "inner.txt").write_text("x")
    assert reply_to(result_of(shell.removeDirectory(["sub"]))) == (
        "550 Requested action not taken: sub: Directory not empty"
    )
    assert reply_to(result_of(shell.rename(["sub"], ["sub", "deeper"]))) == (
        "550 Requested action not taken: sub: cannot be moved into itself"
    )
    assert reply_to(result_of(shell.removeDirectory(["file.txt"]))) == (
        "550 Requested action not taken: file.txt: Not a directory"
    )
    long_name = "n" * 300
    assert result_of(shell.makeDirectory([long_name])).check(NameNotAllowed)
    with pytest.raises(NameNotAllowed):
        shell.upload_target([long_name])
    assert _response(NameNotAllowed()).startswith("553 ")
    # What Twisted's shell leaves as a bare OSError is translated by errno.
    assert reply_to(result_of(shell.makeDirectory(["file.txt", "below"]))) == (
        "550 Requested action not taken: file.txt/below: Not a directory"
    )
    assert reply_to(result_of(shell.access(["file.txt"]))) == (
        "550 Requested action not taken: file.txt: Not a directory"
    )
    shell.require_directory(["sub"])
    shell.require_directory(["not", "there"])  # may be created (MKD new/)
    with pytest.raises(ftp.FTPCmdError, match="Not a directory"):
        shell.require_directory(["file.txt"])
    assert (tree / "sub" / "inner.txt").exists()


@pytest.mark.parametrize(
    ("code", "reply"),
    [
        (errno.ENOENT, "550 d/x: No such file or directory."),
        (errno.EACCES, "550 d/x: Permission denied."),
        (errno.EEXIST, "550 d/x: File exists"),
        (errno.ENOTEMPTY, "550 Requested action not taken: d/x: Directory not empty"),
        (errno.EINVAL, "550 Requested action not taken: d/x: Invalid argument"),
        (errno.EILSEQ, f"550 Requested action not taken: d/x: {os.strerror(errno.EILSEQ)}"),
        (errno.ENAMETOOLONG, "553 Requested action not taken, file name not allowed"),
        (errno.ENOSPC, "452 Requested action aborted. Insufficient storage."),
        (errno.EIO, "550 Requested action not taken: d/x: Input/output error"),
    ],
)
def test_every_errno_has_a_reply(code: int, reply: str) -> None:
    assert _response(_error(OSError(code, os.strerror(code)), ["d", "x"])) == reply


def test_upload_replaces_the_target_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(b"0123456789")
    paused: list[bool] = []
    upload = Upload(target, 4, maybeDeferred, paused.append, os.path.realpath(tmp_path))
    upload.batch = 4
    upload.high_water = 8
    result_of(upload.open())
    for piece in (b"ab", b"cd", b"ef"):
        upload.write(piece)
    assert target.read_bytes() == b"0123456789"  # untouched so far
    result_of(upload.finish())
    assert target.read_bytes() == b"0123abcdef"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]

    aborted = Upload(target, 0, maybeDeferred, paused.append, os.path.realpath(tmp_path))
    result_of(aborted.open())
    aborted.write(b"never")
    result_of(aborted.abort())
    assert target.read_bytes() == b"0123abcdef"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_upload_batches_fill_one_kept_buffer_across_uneven_reads(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    upload = Upload(target, 0, maybeDeferred, [].append, os.path.realpath(tmp_path))
    upload.batch, upload.high_water = 4, 16
    result_of(upload.open())
    data = bytes(range(30))
    filled: list[bytearray] = []  # kept alive, so a new buffer cannot take an old one's place
    for start in range(0, len(data), 3):
        upload.write(data[start : start + 3])  # reads that straddle the batches
        buffer = upload._filling
        if buffer is not None and not any(buffer is seen for seen in filled):
            filled.append(buffer)
    result_of(upload.finish())
    assert target.read_bytes() == data
    # Two buffers in turn, the rest of a read going into one while the other is written.
    assert len(filled) == 2


def test_upload_read_into_its_own_buffer_keeps_the_bytes_in_order(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    upload = Upload(target, 0, maybeDeferred, [].append, os.path.realpath(tmp_path))
    upload.batch, upload.high_water = 4, 16
    result_of(upload.open())
    upload.write(b"ab")  # early bytes, copied in before the socket is read into the buffer
    offered: list[int] = []
    for arrived in (b"c", b"defgh", b"ijk"):  # what each turn finds on the socket
        while arrived:
            space = upload.space()
            offered.append(len(space))
            count = min(len(space), len(arrived))  # a read takes no more than it is offered
            space[:count] = arrived[:count]
            del space  # as the reader does: no view outlives the read
            upload.filled(count)
            arrived = arrived[count:]
    result_of(upload.finish())
    assert target.read_bytes() == b"abcdefghijk"
    # Each offer is the rest of the batch being filled: never empty, never past it.
    assert offered == [2, 1, 4, 4]
    assert upload.received == 11


def test_upload_read_into_starts_small_and_doubles_to_a_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(files, "_FIRST_READ", 4)
    target = tmp_path / "file.bin"
    upload = Upload(target, 0, maybeDeferred, [].append, os.path.realpath(tmp_path))
    upload.batch, upload.high_water = 16, 64
    result_of(upload.open())
    data = bytes(range(40))
    offered: list[int] = []
    while len(offered) < 40 and upload.received < len(data):
        space = upload.space()
        offered.append(len(space))
        count = len(space)
        space[:] = data[upload.received : upload.received + count].ljust(count, b"?")
        del space
        upload.filled(min(count, len(data) - upload.received))
    result_of(upload.finish())
    assert target.read_bytes() == data
    # 4, then doubled to 8 and 16 bytes (the batch); a written batch's buffer is reused whole.
    assert offered[:5] == [4, 4, 8, 16, 16]


class _Into:
    """A read-into sink (what an upload offers): one buffer of C{size}, what was filled kept."""

    def __init__(self, size: int) -> None:
        self.buffer = bytearray(size)
        self.got = bytearray()

    def space(self) -> memoryview:
        return memoryview(self.buffer)

    def filled(self, count: int) -> None:
        self.got += self.buffer[:count]


def test_data_connection_reader_reads_as_twisted_would(tmp_path: Path) -> None:
    from netd.services.ftp.data import _reader

    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        into = _Into(8)
        connection: Any = SimpleNamespace(socket=ours)  # what the reader uses of a tcp.Connection
        read = _reader(connection, into)
        assert read() is None and into.got == b""  # nothing there yet: no data, not an end
        theirs.sendall(b"0123456789")
        assert read() is None and read() is None
        assert into.got == b"0123456789"  # read in the pieces the buffer offers
        theirs.shutdown(socket.SHUT_WR)
        assert read() is main.CONNECTION_DONE
        theirs.close()
    broken = socket.socket()
    broken.close()
    assert _reader(SimpleNamespace(socket=broken), _Into(8))() is main.CONNECTION_LOST  # type: ignore[arg-type]


def test_a_binary_upload_on_a_plain_socket_reads_into_the_uploads_buffer() -> None:
    from twisted.internet import tcp
    from twisted.internet.testing import MemoryReactor

    from netd.services.ftp.data import DataConnection

    for into in (_Into(64), None):  # binary, then ASCII (line ends rewritten: Twisted's read)
        ours, theirs = socket.socketpair()
        with ours, theirs:
            connection = DataConnection(None)  # type: ignore[arg-type]  # take() needs no channel
            transport = tcp.Connection(ours, connection, MemoryReactor())
            transport.connected = True
            connection.transport = transport
            received: list[bytes] = []
            connection.take(received.append, into)
            theirs.sendall(b"upload bytes")
            assert transport.doRead() is None
            if into is not None:
                assert (into.got, received) == (b"upload bytes", [])
            else:
                assert received == [b"upload bytes"]


def test_upload_pauses_the_data_connection_while_a_write_is_pending(tmp_path: Path) -> None:
    pending: list[Deferred[Any]] = []

    def slow(function: Any, *args: Any) -> Deferred[Any]:
        done: Deferred[Any] = Deferred()
        pending.append(done)
        done.addCallback(lambda _: function(*args))
        return done

    paused: list[bool] = []
    upload = Upload(tmp_path / "f", 0, slow, paused.append, os.path.realpath(tmp_path))
    upload.batch, upload.high_water = 2, 4
    upload.open()
    pending.pop().callback(None)
    upload.write(b"ab")  # starts a write that does not finish yet
    upload.write(b"cdef")
    assert paused == [True]
    pending.pop().callback(None)
    assert paused == [True, False]


def test_ascii_uploads_turn_crlf_into_lf_across_reads() -> None:
    line_ends = LineEnds()
    pieces = [line_ends.to_local(piece) for piece in (b"a\r", b"\nb\r\n\r", b"c", b"\r")]
    assert b"".join(pieces) + line_ends.rest() == b"a\nb\n\rc\r"


# -- sessions -------------------------------------------------------------------------------


class Harness:
    def __init__(self, root: Path, **server_options: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.stats = ServiceStats()
        self.events: list[tuple[str, dict[str, Any]]] = []
        users = {"alice": User("alice", root, write=True, password="wonderland")}
        portal = Portal(
            Realm(root, False, users), [Accounts(users, True, run_in_thread=maybeDeferred)]
        )
        options: dict[str, Any] = {
            "limits": SessionLimits(login_delay=1.0, max_login_failures=2, data_timeout=5),
            "anonymous": True,
            "listen_passive": lambda port, factory, interface: self.reactor.listenTCP(
                port, factory, interface=interface
            ),
            "run_in_thread": maybeDeferred,
            **server_options,
        }
        self.server = FTPServer(
            reactor=self.reactor,
            portal=portal,
            stats=self.stats,
            emit=lambda type, **fields: self.events.append((type, fields)),
            **options,
        )

    def connect(self, host: str = "127.0.0.1") -> tuple[Session, TLSStringTransport]:
        session = self.server.factory(None, False).buildProtocol(None)
        transport = TLSStringTransport(
            peerAddress=IPv4Address("TCP", host, 40000),
            hostAddress=IPv4Address("TCP", "127.0.0.1", 2121),
        )
        session.makeConnection(transport)
        transport.clear()
        return session, transport


def send(session: Session, transport: StringTransport, *lines: bytes) -> list[bytes]:
    transport.clear()
    session.dataReceived(b"".join(line + b"\r\n" for line in lines))
    return transport.value().splitlines()


def test_failed_logins_wait_on_the_clock_and_then_close(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    session, transport = harness.connect()
    assert send(session, transport, b"USER alice", b"PASS wrong") == [
        b"331 Password required for alice."
    ]
    harness.reactor.advance(0.9)
    assert transport.value().splitlines()[-1].startswith(b"331")
    harness.reactor.advance(0.1)
    assert transport.value().splitlines()[-1] == b"530 Sorry, Authentication failed."
    send(session, transport, b"USER alice", b"PASS wrong again")
    harness.reactor.advance(1.9)  # the second failure from this address waits twice as long
    assert transport.value().splitlines()[-1].startswith(b"331")
    harness.reactor.advance(0.1)
    assert transport.value().splitlines()[-1].startswith(b"421")
    assert transport.disconnecting
    assert harness.stats.counters["login_failures"] == 2
    assert [t for t, _ in harness.events] == ["ftp.login_failed", "ftp.login_failed"]


def test_pipelined_wrong_passwords_each_wait_their_delay(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    session, transport = harness.connect()
    # A clear-text password is checked at once: the next lines must still wait.
    tries = [b"USER alice", b"PASS wrong", b"USER alice", b"PASS \xff", b"USER alice", b"PASS x"]
    assert send(session, transport, *tries) == [b"331 Password required for alice."]
    harness.reactor.advance(1.0)
    assert transport.value().splitlines()[-2:] == [
        b"530 Sorry, Authentication failed.",
        b"331 Password required for alice.",
    ]
    harness.reactor.advance(1.9)
    assert transport.value().splitlines()[-1].startswith(b"331")
    harness.reactor.advance(0.1)
    assert transport.value().splitlines()[-1].startswith(b"421")
    assert transport.disconnecting
    harness.reactor.advance(10)
    assert harness.stats.counters["login_failures"] == 2  # the third try never ran
    assert transport.value().splitlines()[-1].startswith(b"421")


def test_mistakes_after_login_get_their_reply(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    (tmp_path / "f.txt").write_text("12345")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    session, transport = harness.connect()
    replies = send(
        session,
        transport,
        b"USER alice",
        b"PASS wonderland",
        b"PASS wonderland",
        b"SIZE f.txt/",
        b"CWD f.txt/..",
        b"RETR f.txt/",
        b"STOR new/",
        b"RMD full",
        b"MKD " + b"n" * 300,
        b"RNFR full",
        b"RNTO full/x/y",
        b"TYPE ",
        b"PWD",
    )
    assert replies == [
        b"331 Password required for alice.",
        b"230 User logged in, proceed",
        b"503 Incorrect sequence of commands: already logged in",
        b"550 Requested action not taken: f.txt: Not a directory",
        b"550 Requested action not taken: f.txt: Not a directory",
        b"550 Requested action not taken: f.txt: Not a directory",
        b"550 new/: is a directory",
        b"550 Requested action not taken: full: Directory not empty",
        b"553 Requested action not taken, file name not allowed",
        b"350 Requested file action pending further information.",
        b"550 Requested action not taken: full: cannot be moved into itself",
        b"501 syntax error in argument(s) TYPE needs a type code.",
        b'257 "/"',
    ]
    assert not (tmp_path / "new").exists()


def test_login_then_commands(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    (tmp_path / "f.txt").write_text("12345")
    session, transport = harness.connect()
    replies = send(
        session,
        transport,
        b"USER alice",
        b"PASS wonderland",
        b"PWD",
        b"SIZE f.txt",
        b"XYZ",
        b"SIZE sub/missing",
    )
    assert replies == [
        b"331 Password required for alice.",
        b"230 User logged in, proceed",
        b'257 "/"',
        b"213 5",
        b"502 Command 'XYZ' not implemented",
        b"550 sub/missing: No such file or directory.",
    ]
    assert harness.stats.counters["bad_commands"] == 1
    assert session.describe()["user"] == "alice"
    assert harness.server.list_sessions({})[0]["client"] == "127.0.0.1:40000"


def test_port_and_eprt_only_to_the_client(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    session, transport = harness.connect()
    send(session, transport, b"USER anonymous", b"PASS x")
    for line in (b"PORT 10,0,0,1,4,0", b"EPRT |1|127.0.0.2|2000|", b"PORT 127,0,0,1,0,21"):
        assert send(session, transport, line)[0].startswith(b"504")
    assert harness.reactor.tcpClients == []
    assert send(session, transport, b"PORT 127,0,0,1,4,0") == [b"200 PORT OK"]
    assert harness.reactor.tcpClients[0][:2] == ("127.0.0.1", 1024)
    assert harness.stats.counters["bounce_refused"] == 3


def test_ipv4_clients_of_a_dual_stack_listener_are_compared_as_ipv4(tmp_path: Path) -> None:
    harness = Harness(tmp_path, passive_ports=(30000, 30001))
    session = harness.server.factory(None, False).buildProtocol(None)
    # A listener on :: sees the IPv4 client 127.0.0.1 as ::ffff:127.0.0.1.
    transport = TLSStringTransport(
        peerAddress=IPv6Address("TCP", "::ffff:127.0.0.1", 40000),
        hostAddress=IPv6Address("TCP", "::ffff:127.0.0.1", 2121),
    )
    session.makeConnection(transport)
    send(session, transport, b"USER anonymous", b"PASS x")
    assert send(session, transport, b"PORT 127,0,0,1,4,0") == [b"200 PORT OK"]
    assert send(session, transport, b"PORT 127,0,0,2,4,0")[0].startswith(b"504")
    assert send(session, transport, b"PASV")[0].startswith(b"227 Entering Passive Mode (127,0,0,1,")
    factory = harness.reactor.tcpServers[-1][1]
    assert factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555)) is not None
    assert harness.stats.counters["bounce_refused"] == 1


def test_passive_ports_host_and_peer_check(tmp_path: Path) -> None:
    harness = Harness(tmp_path, passive_ports=(30000, 30001), passive_host="192.0.2.7")
    session, transport = harness.connect()
    send(session, transport, b"USER anonymous", b"PASS x")
    assert send(session, transport, b"PASV") == [b"227 Entering Passive Mode (192,0,2,7,117,48)."]
    port, factory, _, interface = harness.reactor.tcpServers[-1]
    assert (port, interface) == (30000, "127.0.0.1")
    assert factory.buildProtocol(IPv4Address("TCP", "127.0.0.9", 5555)) is None
    assert harness.stats.counters["data_refused"] == 1
    assert factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555)) is not None
    assert send(session, transport, b"EPSV") == [b"229 Entering Extended Passive Mode (|||30001|)."]


def test_data_connection_that_never_comes_times_out(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    (tmp_path / "f.txt").write_text("x")
    session, transport = harness.connect()
    send(session, transport, b"USER anonymous", b"PASS x", b"PASV")
    assert send(session, transport, b"RETR f.txt", b"NOOP") == []
    harness.reactor.advance(5)
    harness.reactor.advance(0)
    assert transport.value().splitlines() == [b"425 Can't open data connection.", b"200 Command OK"]
    assert harness.stats.counters["data_timeouts"] == 1


def test_abor_ends_a_transfer_command_waiting_for_its_data_connection(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    (tmp_path / "f.txt").write_text("x")
    session, transport = harness.connect()
    send(session, transport, b"USER anonymous", b"PASS x", b"PASV")
    assert send(session, transport, b"RETR f.txt") == []
    # RFC 959 4.1.3: the command in progress is answered 426, then ABOR 226.
    assert send(session, transport, b"ABOR") == [
        b"426 Transfer aborted.  Data connection closed.",
        b"226 Abort successful",
    ]
    assert harness.stats.counters["aborts"] == 1
    assert "data_timeouts" not in harness.stats.counters


def test_an_abor_read_while_the_file_opens_ends_the_command_it_follows(tmp_path: Path) -> None:
    opening: Deferred[Any] = Deferred()
    harness = Harness(tmp_path, run_in_thread=lambda f, *a: opening.addCallback(lambda _: f(*a)))
    (tmp_path / "f.txt").write_text("x")
    session, transport = harness.connect()
    send(session, transport, b"USER anonymous", b"PASS x", b"PASV")
    assert send(session, transport, b"RETR f.txt", b"ABOR") == []
    opening.callback(None)
    harness.reactor.advance(0)
    assert transport.value().splitlines() == [
        b"426 Transfer aborted.  Data connection closed.",
        b"226 Abort successful",
    ]


def test_auth_tls_drops_what_was_pipelined_in_plaintext(tmp_path: Path) -> None:
    creator = object()
    harness = Harness(tmp_path, tls=creator)
    session, transport = harness.connect()
    replies = send(session, transport, b"FEAT", b"AUTH TLS", b"USER anonymous")
    assert b" AUTH TLS" in replies and replies[-1] == b"234 AUTH TLS successful, negotiating."
    assert transport.started_tls == [creator]
    assert send(session, transport, b"PBSZ abc")[0].startswith(b"501 ")  # RFC 2228 3
    assert send(session, transport, b"PBSZ 0", b"PROT P") == [
        b"200 PBSZ=0",
        b"200 Data connections will be protected.",
    ]
    assert session.describe()["tls"] is True


def test_cdup_at_the_root_stays_there(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    harness = Harness(tmp_path)
    session, transport = harness.connect()
    send(session, transport, b"USER anonymous", b"PASS x")
    assert send(session, transport, b"CDUP", b"PWD") == [
        b"250 Requested File Action Completed OK",
        b'257 "/"',
    ]
    assert send(session, transport, b"CWD sub", b"CDUP", b"PWD")[1:] == [
        b"250 Requested File Action Completed OK",
        b'257 "/"',
    ]


def test_require_tls_refuses_login_in_plaintext(tmp_path: Path) -> None:
    harness = Harness(tmp_path, tls=object(), require_tls=True)
    session, transport = harness.connect()
    assert send(session, transport, b"USER alice") == [
        b"530 TLS is required here: use AUTH TLS first."
    ]
    assert send(session, transport, b"PROT P")[0].startswith(b"503")


def test_overlong_command_line_closes_the_session(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    session, transport = harness.connect()
    assert send(session, transport, b"NOOP " + b"x" * 3000) == [b"500 Command line too long."]
    assert transport.disconnecting


@implementer(IHalfCloseableDescriptor)
class DataSocket(HalfClosingStringTransport):
    """A plain data connection's TCP transport: it can send netd's FIN alone."""


def open_passive(
    harness: Harness, session: Session, transport: StringTransport, data: Any = None
) -> Any:
    """
    PASV, then the client's data connection, as a protocol on C{data}: a
    StringTransport unless given (one that cannot half-close, as TLS).
    """
    send(session, transport, b"PASV")
    factory = harness.reactor.tcpServers[-1][1]
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 6000))
    data = StringTransport() if data is None else data
    protocol.makeConnection(data)
    return protocol, data


def test_upload_through_fakes_then_a_stalled_one(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    session, transport = harness.connect()
    send(session, transport, b"USER alice", b"PASS wonderland")
    protocol, data = open_passive(harness, session, transport)
    assert send(session, transport, b"STOR up.txt") == [
        b"125 Data connection already open, starting transfer"
    ]
    protocol.dataReceived(b"uploaded")
    protocol.connectionLost(Failure(ConnectionDone()))
    harness.reactor.advance(0)
    assert transport.value().splitlines()[-1] == b"226 Transfer Complete."
    assert (tmp_path / "up.txt").read_bytes() == b"uploaded"

    protocol, data = open_passive(harness, session, transport)
    send(session, transport, b"STOR stalled.txt")
    protocol.dataReceived(b"half")
    shown = harness.server.list_sessions({})[0]["transfer"]
    assert (shown["direction"], shown["path"], shown["bytes"]) == ("upload", "/stalled.txt", 4)
    harness.reactor.advance(5)  # bytes moved in this period
    assert not data.disconnecting
    harness.reactor.advance(5)  # none in this one
    assert harness.stats.counters["data_stalls"] == 1
    protocol.connectionLost(Failure(ConnectionLost()))
    harness.reactor.advance(0)
    assert transport.value().splitlines()[-1].startswith(b"426")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["up.txt"]
    assert [f["ok"] for t, f in harness.events if t == "ftp.transfer"] == [True, False]


def test_a_session_closed_by_a_stop_or_the_idle_sweep_says_which(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    stopped, stopped_transport = harness.connect()
    stopped.close_gracefully()
    assert (
        stopped_transport.value() == b"421 Service not available, closing control connection.\r\n"
    )
    assert stopped_transport.disconnecting
    idle, idle_transport = harness.connect()
    idle.close_idle()
    assert idle_transport.value() == b"421 Idle timeout, closing control connection.\r\n"
    assert idle_transport.disconnecting


def test_a_session_asked_to_close_during_a_transfer_starts_no_other(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    session, transport = harness.connect()
    send(session, transport, b"USER alice", b"PASS wonderland")
    protocol, _ = open_passive(harness, session, transport)
    send(session, transport, b"STOR first.txt")
    session.close_gracefully()  # netd stops: the running upload is not cut
    protocol.dataReceived(b"first")
    protocol.connectionLost(Failure(ConnectionDone()))
    harness.reactor.advance(0)
    assert transport.value().splitlines()[-1] == b"226 Transfer Complete."
    assert not transport.disconnecting
    # Within the moment left after that reply, the client starts another.
    open_passive(harness, session, transport)
    assert send(session, transport, b"STOR second.txt") == [
        b"421 Service not available, closing control connection."
    ]
    assert transport.disconnecting
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.txt"]
    harness.reactor.advance(1)  # the goodbye due after the first reply is not said twice
    assert transport.value().count(b"421") == 1


def downloaded_at_a_stop(
    tmp_path: Path, command: bytes = b"RETR down.txt"
) -> tuple[Harness, Session, StringTransport, Any, DataSocket]:
    """
    A session asked to close during its download (or listing) on plain TCP,
    whose last byte then reaches the kernel: netd's FIN, and 226.
    """
    harness = Harness(tmp_path)
    (tmp_path / "down.txt").write_bytes(b"d" * 5000)
    session, transport = harness.connect()
    send(session, transport, b"USER alice", b"PASS wonderland")
    protocol, data = open_passive(harness, session, transport, DataSocket())
    send(session, transport, command)
    session.close_gracefully()  # netd stops: the running download is not cut
    while data.producer is not None:  # the client reads: the file goes to the kernel
        data.producer.resumeProducing()
    harness.reactor.advance(0)
    assert data.write_closed and not data.disconnecting
    protocol.writeConnectionLost()
    harness.reactor.advance(0)
    assert transport.value().splitlines()[-1] == b"226 Transfer Complete."
    return harness, session, transport, protocol, data


def test_a_session_asked_to_close_during_a_download_waits_for_the_clients_next_transfer(
    tmp_path: Path,
) -> None:
    harness, session, transport, _, data = downloaded_at_a_stop(tmp_path)
    # The client may still have the file's end to read from its socket buffers.
    harness.reactor.advance(60)
    assert transport.value().splitlines()[-1] == b"226 Transfer Complete."
    assert not transport.disconnecting
    assert send(session, transport, b"NOOP") == [b"200 Command OK"]
    open_passive(harness, session, transport)
    assert data.disconnecting  # the new PASV's channel replaced the download's
    assert send(session, transport, b"RETR down.txt") == [
        b"421 Service not available, closing control connection."
    ]
    assert transport.disconnecting


def test_a_session_asked_to_close_during_a_download_says_221_to_quit(tmp_path: Path) -> None:
    harness, session, transport, _, _ = downloaded_at_a_stop(tmp_path)
    harness.reactor.advance(5)  # the client reads the file's end, then is done
    assert send(session, transport, b"QUIT") == [b"221 Goodbye."]
    assert transport.disconnecting


@pytest.mark.parametrize("command", [b"RETR down.txt", b"LIST", b"MLSD"])
def test_a_session_asked_to_close_says_421_once_the_client_closes_its_download(
    tmp_path: Path, command: bytes
) -> None:
    """
    A client that stays connected and silent after its download (lftp's
    shell, a GUI) closes the data connection once it has read netd's FIN:
    the 421 comes then, not at the idle sweep or the stop's grace.
    """
    harness, _, transport, protocol, data = downloaded_at_a_stop(tmp_path, command)
    harness.reactor.advance(5)  # reading the socket buffers
    assert transport.value().splitlines()[-1] == b"226 Transfer Complete."
    protocol.readConnectionLost()  # the client's FIN
    assert data.disconnecting
    protocol.connectionLost(Failure(ConnectionDone()))
    assert transport.value().splitlines()[-1] == (
        b"421 Service not available, closing control connection."
    )
    assert transport.disconnecting
    assert [f["ok"] for t, f in harness.events if t == "ftp.transfer"] == [True]


def test_a_download_over_tls_at_a_stop_is_followed_by_421_once_the_client_closed_it(
    tmp_path: Path,
) -> None:
    """
    TLS has no half-close of Twisted's: netd's close_notify, and the 226 once
    the client closes its end, having read it all; the 421 follows at once.
    """
    harness = Harness(tmp_path)
    (tmp_path / "down.txt").write_bytes(b"d" * 5000)
    session, transport = harness.connect()
    send(session, transport, b"USER alice", b"PASS wonderland")
    protocol, data = open_passive(harness, session, transport)  # cannot half-close
    send(session, transport, b"RETR down.txt")
    session.close_gracefully()
    while data.producer is not None:
        data.producer.resumeProducing()
    harness.reactor.advance(0)
    assert data.disconnecting  # (TLS: netd's close_notify)
    protocol.connectionLost(Failure(ConnectionDone()))  # the client's close
    assert transport.value().splitlines()[-1] == b"226 Transfer Complete."
    harness.reactor.advance(0)
    assert transport.value().splitlines()[-2:] == [
        b"226 Transfer Complete.",
        b"421 Service not available, closing control connection.",
    ]
    assert transport.disconnecting


def test_a_download_not_at_a_stop_closes_at_netds_fin(tmp_path: Path) -> None:
    """Outside a stop nothing waits for the client: closed once the FIN is in the kernel."""
    harness = Harness(tmp_path)
    (tmp_path / "down.txt").write_bytes(b"d" * 5000)
    session, transport = harness.connect()
    send(session, transport, b"USER alice", b"PASS wonderland")
    protocol, data = open_passive(harness, session, transport, DataSocket())
    send(session, transport, b"RETR down.txt")
    while data.producer is not None:
        data.producer.resumeProducing()
    harness.reactor.advance(0)
    assert data.write_closed
    protocol.writeConnectionLost()
    assert data.disconnecting
    protocol.connectionLost(Failure(ConnectionDone()))
    assert transport.value().splitlines()[-1] == b"226 Transfer Complete."
    harness.reactor.advance(60)
    assert not transport.disconnecting


def test_a_client_that_never_closes_its_download_at_a_stop_is_ended_by_the_idle_sweep(
    tmp_path: Path,
) -> None:
    _, session, transport, protocol, data = downloaded_at_a_stop(tmp_path)
    session.close_idle()
    assert transport.value().splitlines()[-1] == b"421 Idle timeout, closing control connection."
    assert transport.disconnecting
    session.connectionLost(Failure(ConnectionDone()))
    assert data.disconnecting  # aborted with its session
    protocol.connectionLost(Failure(ConnectionDone()))
    assert transport.value().count(b"421") == 1


def alice_under_rules(tmp_path: Path) -> tuple[Harness, RuleSet, Session, TLSStringTransport]:
    """A session logged in as alice, with rules that the test posts."""
    harness = Harness(tmp_path)
    rules = RuleSet("files", RULES, harness.reactor, Journal(harness.reactor))
    harness.server.rules = rules
    session, transport = harness.connect()
    send(session, transport, b"USER alice", b"PASS wonderland")
    return harness, rules, session, transport


def test_a_rules_throttle_and_close_n_act_on_an_uploads_data(tmp_path: Path) -> None:
    harness, rules, session, transport = alice_under_rules(tmp_path)

    rules.post({"match": {"command": "STOR"}, "throttle": 1000})
    protocol, data = open_passive(harness, session, transport)
    send(session, transport, b"STOR slow.bin")
    protocol.dataReceived(b"x" * 500)
    assert data.producerState == "paused"  # half a second's worth: reading waits
    harness.reactor.advance(0.49)
    assert data.producerState == "paused"
    harness.reactor.advance(0.02)
    assert data.producerState == "producing"
    protocol.dataReceived(b"y" * 100)
    protocol.connectionLost(Failure(ConnectionDone()))
    harness.reactor.advance(0.09)  # the last 100 bytes are due at 0.6 s
    assert transport.value().splitlines()[-1].startswith(b"125")
    harness.reactor.advance(0.02)
    assert transport.value().splitlines()[-1] == b"226 Transfer Complete."
    assert (tmp_path / "slow.bin").read_bytes() == b"x" * 500 + b"y" * 100

    rules.clear()
    rules.post({"match": {"command": "APPE"}, "close": 4})
    protocol, data = open_passive(harness, session, transport)
    send(session, transport, b"APPE slow.bin")
    protocol.dataReceived(b"abcdef")
    assert data.disconnected  # aborted: cut after 4 bytes received
    protocol.connectionLost(Failure(ConnectionDone()))
    harness.reactor.advance(0)
    assert transport.value().splitlines()[-1].startswith(b"426")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slow.bin"]  # no partial file
    assert (tmp_path / "slow.bin").read_bytes() == b"x" * 500 + b"y" * 100
    transfers = [f for t, f in harness.events if t == "ftp.transfer"]
    assert [(f["ok"], f["bytes"]) for f in transfers] == [(True, 600), (False, 4)]


def test_what_an_upload_sends_before_its_command_is_paced_and_counted(tmp_path: Path) -> None:
    harness, rules, session, transport = alice_under_rules(tmp_path)

    rules.post({"match": {"command": "STOR", "path": "cut*"}, "close": 4})
    protocol, data = open_passive(harness, session, transport)
    protocol.dataReceived(b"abcdef")  # before STOR: held, not yet anyone's
    send(session, transport, b"STOR cut.bin")
    assert data.disconnected  # cut: 6 bytes came, 4 were allowed
    protocol.connectionLost(Failure(ConnectionDone()))
    harness.reactor.advance(0)
    assert transport.value().splitlines()[-1].startswith(b"426")
    assert list(tmp_path.iterdir()) == []

    rules.clear()
    rules.post({"match": {"command": "STOR"}, "throttle": 1000})
    protocol, data = open_passive(harness, session, transport)
    protocol.dataReceived(b"x" * 500)
    send(session, transport, b"STOR early.bin")
    assert data.producerState == "paused"  # half a second's worth came already
    protocol.connectionLost(Failure(ConnectionDone()))  # and the end of the file
    harness.reactor.advance(0.49)
    assert transport.value().splitlines()[-1].startswith(b"125")
    harness.reactor.advance(0.02)
    assert transport.value().splitlines()[-1] == b"226 Transfer Complete."
    assert (tmp_path / "early.bin").read_bytes() == b"x" * 500
    transfers = [f for t, f in harness.events if t == "ftp.transfer"]
    assert [(f["ok"], f["bytes"]) for f in transfers] == [(False, 4), (True, 500)]


def test_abor_ends_an_upload_waiting_for_its_rate_at_once(tmp_path: Path) -> None:
    harness, rules, session, transport = alice_under_rules(tmp_path)
    rules.post({"match": {"command": "STOR"}, "throttle": 1000})
    protocol, _ = open_passive(harness, session, transport)
    send(session, transport, b"STOR held.bin")
    protocol.dataReceived(b"x" * 5000)  # one read (a TLS record) with 5 s of bytes
    protocol.connectionLost(Failure(ConnectionDone()))
    harness.reactor.advance(1)
    send(session, transport, b"ABOR")
    harness.reactor.advance(0)
    assert transport.value().splitlines()[0].startswith(b"426")
    assert list(tmp_path.iterdir()) == []


def test_a_throttles_pause_is_not_a_stall_but_a_client_silent_after_it_is(
    tmp_path: Path,
) -> None:
    harness, rules, session, transport = alice_under_rules(tmp_path)  # data_timeout: 5
    rules.post({"match": {"command": "STOR"}, "throttle": 1000})
    protocol, data = open_passive(harness, session, transport)
    send(session, transport, b"STOR paced.bin")
    protocol.dataReceived(b"x" * 12000)  # one read (a TLS record) with 12 s of bytes
    harness.reactor.pump([1] * 12)
    assert data.producerState == "producing" and not data.disconnecting
    protocol.dataReceived(b"y" * 100)
    protocol.connectionLost(Failure(ConnectionDone()))
    harness.reactor.pump([0.05] * 3)
    assert transport.value().splitlines()[-1] == b"226 Transfer Complete."
    assert (tmp_path / "paced.bin").read_bytes() == b"x" * 12000 + b"y" * 100

    protocol, data = open_passive(harness, session, transport)
    send(session, transport, b"STOR silent.bin")
    protocol.dataReceived(b"x" * 12000)
    harness.reactor.pump([1] * 16 + [0.9])  # read again from 12 s on: 4.9 s of silence
    assert not data.disconnecting
    harness.reactor.advance(0.2)
    assert data.disconnecting
    assert harness.stats.counters["data_stalls"] == 1


def test_a_throttled_download_waiting_on_its_rate_is_not_a_stall(tmp_path: Path) -> None:
    harness, rules, session, transport = alice_under_rules(tmp_path)  # data_timeout: 5
    (tmp_path / "slow.bin").write_bytes(b"z" * 20000)
    rules.post({"match": {"command": "RETR"}, "throttle": 1000})
    protocol, data = open_passive(harness, session, transport)
    send(session, transport, b"RETR slow.bin")  # one write of the file: 20 s at the rate
    harness.reactor.pump([0.05] * 390)
    assert not data.disconnecting
    harness.reactor.pump([0.05] * 10)
    assert data.disconnecting and not data.disconnected and data.value() == b"z" * 20000
    protocol.connectionLost(Failure(ConnectionDone()))
    harness.reactor.advance(0)
    assert transport.value().splitlines()[-1] == b"226 Transfer Complete."
    assert "data_stalls" not in harness.stats.counters


def test_write_all_survives_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_writev = os.writev

    def short(fd: int, buffers: Any) -> int:
        return real_writev(fd, [bytes(buffers[0][:3])])  # at most 3 bytes a call

    monkeypatch.setattr(os, "writev", short)
    with (tmp_path / "f").open("wb", buffering=0) as target:
        _write_all(target.fileno(), [b"abcde", b"", b"fg", b"hijklmn"])
    assert (tmp_path / "f").read_bytes() == b"abcdefghijklmn"


def test_failed_logins_slow_an_address_down_across_connections() -> None:
    clock = MemoryReactorClock()
    failed = FailedLogins(clock)
    assert [failed.delay("192.0.2.1", 1.0) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert failed.delay("192.0.2.2", 1.0) == 1  # another address
    failed.forget("192.0.2.1")  # a successful login
    assert failed.delay("192.0.2.1", 1.0) == 1
    clock.advance(failed.memory + 1)
    assert failed.delay("192.0.2.1", 1.0) == 1  # forgotten after a quiet while
    failed.size = 2
    failed.delay("192.0.2.3", 1.0)
    assert len(failed._recent) == 2 and "192.0.2.2" not in failed._recent


# -- MLSD, MLST, MFMT, SITE CHMOD, HELP ------------------------------------------------------


def facts_of(lines: list[bytes]) -> dict[str, dict[str, str]]:
    found = {}
    for line in lines:
        facts, _, name = line.decode().partition(" ")
        found[name] = dict(fact.split("=") for fact in facts.rstrip(";").split(";"))
    return found


def test_perm_follows_the_write_flag_and_the_daemons_rights(tree: Path) -> None:
    (tree / "locked.txt").write_text("x")
    (tree / "locked.txt").chmod(0o000)
    # What "others" may: the daemon here owns nothing (and is not root).
    for folder in (tree, tree / "sub"):
        folder.chmod(0o757)
    (tree / "file.txt").chmod(0o646)
    stranger = _Rights(uid=12345, groups=frozenset({54321}))
    reader = Shell(Place.of(tree), writable=False)
    writer = Shell(Place.of(tree), writable=True)
    reader.rights = writer.rights = stranger
    seen = facts_of(reader.facts([], FACTS, entries=True))
    assert set(seen) == {".", "file.txt", "in_link", "sub", "locked.txt"}  # no link out
    assert seen["."]["type"] == "cdir"
    assert seen["file.txt"]["perm"] == "r" and seen["sub"]["perm"] == "el"
    assert seen["locked.txt"]["perm"] == ""
    assert seen["in_link"]["type"] == "file"  # links are described by what they reach
    mine = facts_of(writer.facts([], FACTS, entries=True))
    assert mine["file.txt"]["perm"] == "adfrw"
    assert mine["sub"]["perm"] == "cdeflmp"
    assert mine["locked.txt"]["perm"] == "df"  # may go, may not be read or written
    assert mine["."]["perm"] == "celmp"  # the root is never removed
    root = _Rights(uid=0, groups=frozenset())
    assert root.may(os.stat(tree / "locked.txt"), 0o6) and not root.may(
        os.stat(tree / "locked.txt"), 0o1
    )
    (single,) = writer.facts(["sub"], ("type", "size"), entries=False)
    assert single == b"type=dir; /sub"
    with pytest.raises(ftp.FTPCmdError, match="Not a directory"):
        writer.facts(["file.txt"], FACTS, entries=True)
    with pytest.raises(ftp.FileNotFoundError):
        writer.facts(["gone"], FACTS, entries=False)
    with pytest.raises(ftp.PermissionDeniedError):
        writer.facts(["out_dir"], FACTS, entries=True)


def test_mfmt_stamps_and_site_chmod_modes(tree: Path) -> None:
    assert _timestamp("20200102030405") == 1577934245
    assert _timestamp("20200102030405.5") == 1577934245.5
    for bad in ("2020", "20201301000000", "2020010203040x", "20200102030405.", ""):
        assert _timestamp(bad) is None
    shell = Shell(Place.of(tree), writable=True, umask=0o077)
    assert shell.change_mode(["file.txt"], 0o755) == 0o700
    assert os.stat(tree / "file.txt").st_mode & 0o777 == 0o700
    shell.set_modified(["file.txt"], 1577934245)
    assert os.stat(tree / "file.txt").st_mtime == 1577934245
    with pytest.raises(ftp.PermissionDeniedError):
        Shell(Place.of(tree), writable=True, anonymous=True).change_mode(["file.txt"], 0o644)
    with pytest.raises(ftp.PermissionDeniedError):
        Shell(Place.of(tree), writable=False).set_modified(["file.txt"], 0)
    with pytest.raises(ftp.PermissionDeniedError):
        shell.change_mode([], 0o755)  # the root itself
    with pytest.raises(ftp.PermissionDeniedError):
        shell.change_mode(["out_link"], 0o777)


def test_facts_commands_through_a_session(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    (tmp_path / "f.txt").write_text("12345")
    session, transport = harness.connect()
    help_lines = send(session, transport, b"HELP")
    assert help_lines[0] == b"214-The following commands are recognized:"
    assert help_lines[-1] == b"214 Help OK." and b"MLSD" in b" ".join(help_lines)
    feat = send(session, transport, b"FEAT")
    assert b" MLST type*;size*;modify*;perm*;unique*;" in feat and b" MFMT" in feat
    replies = send(
        session,
        transport,
        b"USER alice",
        b"PASS wonderland",
        b"OPTS MLST size;perm;bogus;",
        b"MLST f.txt",
        b"OPTS MLST",
        b"MLST f.txt",
        b"MFMT 20200102030405 f.txt",
        b"MFMT yesterday f.txt",
        b"SITE CHMOD 640 f.txt",
        b"SITE CHMOD 2640 f.txt",
        b"SITE CHMOD x f.txt",
        b"SITE ZAP",
        b"HELP SITE",
    )
    assert replies == [
        b"331 Password required for alice.",
        b"230 User logged in, proceed",
        b"200 MLST OPTS size;perm;",
        b"250-Listing /f.txt",
        b" size=5;perm=adfrw; /f.txt",
        b"250 End",
        b"200 MLST OPTS ",
        b"250-Listing /f.txt",
        b"  /f.txt",
        b"250 End",
        b"213 Modify=20200102030405; f.txt",
        b"501 syntax error in argument(s) yesterday f.txt.",
        b"200 Mode of f.txt set to 0640.",
        b"550 SITE CHMOD sets permission bits only (no setuid, setgid or sticky).",
        b"501 syntax error in argument(s) CHMOD x f.txt.",
        b"504 Not implemented for parameter 'ZAP'.",
        b"214 SITE CHMOD <octal mode> <path>; SITE HELP.",
    ]
    feat = send(session, transport, b"FEAT")
    assert b" MLST type;size;modify;perm;unique;" in feat  # none chosen now


def test_a_listing_is_a_transfer_cut_when_it_stalls(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    for number in range(3):
        (tmp_path / f"f{number}").write_text("x")
    session, transport = harness.connect()
    send(session, transport, b"USER alice", b"PASS wonderland")
    protocol, data = open_passive(harness, session, transport)
    assert send(session, transport, b"MLSD")[0].startswith(b"125")
    while data.producer is not None:  # the transport pulls, as a socket does
        data.producer.resumeProducing()
    names = [line.partition(b" ")[2] for line in data.value().splitlines()]
    assert names == [b".", b"f0", b"f1", b"f2"]
    protocol.connectionLost(Failure(ConnectionDone()))
    harness.reactor.advance(0)
    assert transport.value().splitlines()[-1] == b"226 Transfer Complete."
    # A client that never reads: the transport never pulls, the listing stalls.
    protocol, data = open_passive(harness, session, transport)
    send(session, transport, b"LIST")
    assert session.describe()["transfer"]["direction"] == "listing"
    harness.reactor.advance(5)
    assert harness.stats.counters["data_stalls"] == 1
    protocol.connectionLost(Failure(ConnectionLost()))
    harness.reactor.advance(0)
    assert transport.value().splitlines()[-1].startswith(b"426")
    assert [(f["direction"], f["ok"]) for t, f in harness.events if t == "ftp.transfer"] == [
        ("listing", True),
        ("listing", False),
    ]


def test_a_passive_port_ignores_a_stale_write_event() -> None:
    # The epoll reactor dispatches the events of one poll in turn: a writer that
    # closed earlier in the batch frees its descriptor, a PASV in the same batch
    # takes the number, and the writer's event then reaches the passive port.
    from twisted.internet.epollreactor import EPollReactor

    reactor = EPollReactor()
    port = PassivePort(reactor, 0, None, "127.0.0.1")
    try:
        reactor._doReadOrWrite(port, port.fileno(), reactor._POLL_OUT)
        assert port.socket is not None and port in reactor.getReaders()
    finally:
        port.stopListening()
        reactor._poller.close()


def test_kernel_ports_are_the_kernels_range_less_its_reserved_ports(tmp_path: Path) -> None:
    (tmp_path / "ip_local_port_range").write_text("40000\t40009\n")
    (tmp_path / "ip_local_reserved_ports").write_text("40000-40004,40006\n")
    ports = KernelPorts.of_this_system(tmp_path)
    picked = [list(ports.candidates()) for _ in range(50)]
    assert all(tries[-1] == 0 for tries in picked)  # the kernel's choice comes last
    chosen = {port for tries in picked for port in tries[:-1]}
    assert chosen == {40005, 40007, 40008, 40009}  # random, in the range, never reserved
    assert KernelPorts.of_this_system(tmp_path / "missing").low == 32768  # Linux's default


def test_a_passive_port_takes_a_port_left_in_time_wait() -> None:
    # The server's side of a data connection it closed first: its port in TIME_WAIT.
    from twisted.internet.epollreactor import EPollReactor

    with socket.create_server(("127.0.0.1", 0)) as listening:
        number = listening.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", number))
        served, _ = listening.accept()
        served.close()
        assert client.recv(1) == b""
        client.close()
    with socket.socket() as plain, pytest.raises(OSError) as taken:
        plain.bind(("127.0.0.1", number))
    assert taken.value.errno == errno.EADDRINUSE  # what port 0's search steps over
    reactor = EPollReactor()
    try:
        port = PassivePort(reactor, number, None, "127.0.0.1")
        assert port.host.port == number
        port.stopListening()
    finally:
        reactor._poller.close()


class UnreadTransport(TLSStringTransport):
    """Holds every reply as Twisted's socket buffers would for a client that never reads."""

    dataBuffer = b""
    offset = 0
    _tempDataLen = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        self._tempDataLen += len(data)


def test_commands_whose_replies_go_unread_are_cut_once_they_ran(tmp_path: Path) -> None:
    """The last read of a client that then sends nothing and reads nothing: cut, not held."""
    harness = Harness(tmp_path)
    session = harness.server.factory(None, False).buildProtocol(None)
    transport = UnreadTransport(
        peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
        hostAddress=IPv4Address("TCP", "127.0.0.1", 2121),
    )
    session.makeConnection(transport)
    session.dataReceived(b"NOOP\r\n" * 100)
    assert not transport.disconnected
    session.dataReceived(b"FEAT\r\n" * 10_000)
    assert len(transport.value()) > 1 << 20
    assert transport.disconnected  # aborted now: no further read would come to ask


def test_a_realm_finds_each_roots_place_once_not_at_every_login(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "alice"
    home.mkdir()
    users = {"alice": User("alice", home, write=True, password="wonderland")}
    realm = Realm(tmp_path, False, users)
    resolved: list[str] = []
    realpath = os.path.realpath

    def counted(path: Any) -> str:
        resolved.append(str(path))
        return realpath(path)

    monkeypatch.setattr(os.path, "realpath", counted)
    shells = [
        realm.requestAvatar(avatar, None, ftp.IFTPShell)[1]
        for avatar in (ANONYMOUS, "alice", ANONYMOUS, "alice")
    ]
    assert resolved == [str(tmp_path), str(home)]  # the logins after the first ask nothing
    assert [shell.real_root for shell in shells] == [str(tmp_path), str(home)] * 2
    assert not shells[0].writable and shells[1].writable
