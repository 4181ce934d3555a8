"""smtp edges found in review: huge numbers, big envelopes, graceful stops, floods, bounces."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from netd.testing import AdminError, NetdProcess
from tests.clients import smtp
from tests.conftest import StartNetd, unused_port
from tests.fakes.upstreams import RawUpstream
from tests.maps import mail_map, relaying
from tests.signals import status_kib, wait_until


def _reply(stream) -> bytes:  # type: ignore[no-untyped-def]
    lines = [stream.readline()]
    while lines[-1][3:4] == b"-":
        lines.append(stream.readline())
    return lines[-1]


def _session(netd: NetdProcess) -> tuple[socket.socket, object]:
    host, port = netd.address("mail")
    sock = socket.create_connection((host, port), timeout=10)
    stream = sock.makefile("rb")
    assert _reply(stream).startswith(b"220")
    sock.sendall(b"EHLO client.test\r\n")
    assert _reply(stream).startswith(b"250")
    return sock, stream


def test_mail_size_with_huge_number_gets_a_reply_and_session_goes_on(
    start_netd: StartNetd, tmp_path: Path
) -> None:
    """SIZE= with thousands of digits gets a reply (int() of that many digits raises)."""
    netd = start_netd(mail_map(tmp_path / "state"))
    sock, stream = _session(netd)
    with sock:
        sock.sendall(b"MAIL FROM:<a@client.test> SIZE=" + b"9" * 5000 + b"\r\n")
        answer = _reply(stream)
        assert answer[:3] in (b"501", b"552"), answer
        sock.sendall(b"NOOP\r\n")
        assert _reply(stream).startswith(b"250")


def test_big_envelope_survives_restart(start_netd: StartNetd, tmp_path: Path) -> None:
    """An envelope line over 1 MiB (many recipients) is read whole at recovery."""
    text = mail_map(tmp_path / "state").replace("max_recipients: 5", "max_recipients: 20000")
    first = start_netd(text)
    count = 16000
    local = "r" * 58
    sock, stream = _session(first)
    with sock:
        burst = b"MAIL FROM:<a@client.test>\r\n" + b"".join(
            b"RCPT TO:<%s%05d@netd.test>\r\n" % (local.encode(), i) for i in range(count)
        )
        sock.sendall(burst)
        assert _reply(stream).startswith(b"250")
        for _ in range(count):
            assert _reply(stream).startswith(b"250")
        sock.sendall(b"DATA\r\n")
        assert _reply(stream).startswith(b"354")
        sock.sendall(b"Subject: many\r\n\r\nbody\r\n.\r\n")
        assert _reply(stream).startswith(b"250 2.0.0 Ok: queued")
    first_id = first.messages("mail", to=f"{local}00000@netd.test")[0]["id"]
    first.process.kill()
    first.process.wait()
    second = start_netd(text)
    listed = second.messages("mail", to=f"{local}00000@netd.test")
    assert [m["id"] for m in listed] == [first_id]


def test_sigterm_lets_a_message_in_data_finish(start_netd: StartNetd, tmp_path: Path) -> None:
    """SIGTERM lets a message in DATA finish and be answered within shutdown_grace."""
    netd = start_netd(mail_map(tmp_path / "state"))
    sock, stream = _session(netd)
    with sock:
        sock.sendall(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<term@netd.test>\r\nDATA\r\n")
        assert [_reply(stream)[:3] for _ in range(3)] == [b"250", b"250", b"354"]
        sock.sendall(b"Subject: in flight\r\n\r\nfirst half\r\n")
        netd.signal(signal.SIGTERM)
        # Stopping has begun once netd says so (its lifecycle lines are written at once).
        wait_until(lambda: "netd stopping" in netd.output, "sign of stopping", timeout=10)
        try:
            sock.sendall(b"second half\r\n.\r\n")
            answer = _reply(stream)
        except OSError as e:
            answer = repr(e).encode()
        assert answer.startswith(b"250"), answer


def test_pipelined_commands_without_reading_do_not_grow_memory(
    start_netd: StartNetd, tmp_path: Path
) -> None:
    """A client that pipelines commands and never reads the replies is cut."""
    netd = start_netd(mail_map(tmp_path / "state"))
    host, port = netd.address("mail")
    before = status_kib(netd)
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        chunk = b"EHLO x\r\n" * 8192
        # A send blocked for 3 s: the server has stopped reading (the test then
        # spent 20 s here, a tenth of make test's budget on one worker).
        sock.settimeout(3)
        sent = 0
        try:
            for _ in range(96):  # 6 MiB of commands, never reading a reply
                sock.sendall(chunk)
                sent += len(chunk)
        except (TimeoutError, OSError):
            pass  # the server stopped reading: good
    netd.wait_for_count(
        "mail", "connection.closed", 1, timeout=20
    )  # whatever the server took in, it has let go of the client
    grown = status_kib(netd) - before
    assert grown < 50_000, f"daemon grew by {grown} kB after {sent} bytes of unread EHLOs"


def test_bare_postmaster_is_accepted_from_anyone(start_netd: StartNetd, tmp_path: Path) -> None:
    """RFC 5321 4.5.1: <postmaster> is accepted from anyone."""
    netd = start_netd(mail_map(tmp_path / "state"))
    with smtp(netd) as client:
        client.ehlo()
        assert client.mail("a@client.test")[0] == 250
        code, text = client.rcpt("<postmaster>")
        assert code == 250, (code, text)


def test_bare_lf_command_gets_an_answer(start_netd: StartNetd, tmp_path: Path) -> None:
    """A command ended by a bare LF (netcat, broken scripts) gets an answer at once."""
    netd = start_netd(mail_map(tmp_path / "state"))
    sock, stream = _session(netd)
    with sock:
        sock.settimeout(3)
        sock.sendall(b"NOOP\n")
        try:
            answer = _reply(stream)
        except TimeoutError:
            answer = b"(no answer in 3 s)"
        assert answer[:1] in (b"2", b"5"), answer


def test_a_message_of_short_lines_costs_little_memory(
    start_netd: StartNetd, tmp_path: Path
) -> None:
    """The line-length check does not split a big message into millions of lines."""
    text = mail_map(tmp_path / "state").replace(
        "max_message_size: 65536", "max_message_size: 10485760"
    )
    netd = start_netd(text)
    sock, stream = _session(netd)
    with sock:
        sock.sendall(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<lines@netd.test>\r\nDATA\r\n")
        assert [_reply(stream)[:3] for _ in range(3)] == [b"250", b"250", b"354"]
        before = status_kib(netd, "VmHWM")
        sock.sendall(b"Subject: lines\r\n\r\n" + b"ab\r\n" * (10_000_000 // 4) + b".\r\n")
        assert _reply(stream).startswith(b"250")
        peak = status_kib(netd, "VmHWM") - before
    assert peak < 60_000, f"peak grew by {peak} kB for a 10 MB message"


def test_reload_lets_a_message_in_data_finish_on_the_old_service(
    start_netd: StartNetd, tmp_path: Path
) -> None:
    """A reload lets a message in DATA on the old service finish and be listed."""

    text = mail_map(tmp_path / "state")
    netd = start_netd(text)
    sock, stream = _session(netd)
    with sock:
        sock.sendall(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<reload@netd.test>\r\nDATA\r\n")
        assert [_reply(stream)[:3] for _ in range(3)] == [b"250", b"250", b"354"]
        sock.sendall(b"Subject: across reload\r\n\r\nfirst half\r\n")
        # Answered once committed: the old service drains from here on.
        changes = netd.reload(text.replace("max_recipients: 5", "max_recipients: 6"))
        assert changes["restarted"] == ["mail"]
        try:
            sock.sendall(b"second half\r\n.\r\n")
            answer = _reply(stream)
        except OSError as e:
            answer = repr(e).encode()
        assert answer.startswith(b"250"), answer
    assert len(netd.messages("mail", to="reload@netd.test")) == 1


def test_failed_tls_handshakes_do_not_leak_per_client_slots(
    start_netd: StartNetd, tmp_path: Path
) -> None:
    """Per-client counting survives failed implicit-TLS handshakes and resets."""
    import struct

    netd = start_netd(mail_map(tmp_path / "state"))
    tls_entry = next(e for e in netd.listeners("mail") if e["tls"])
    for _ in range(20):
        with socket.create_connection((tls_entry["host"], tls_entry["port"]), timeout=5) as s:
            s.sendall(b"\x16\x03\x01\x00\x05hello-garbage")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # Each ends closed, or refused if it came while 8 earlier ones were still open.
    netd.wait_for_count("mail", "connection.closed,connection.refused", 20, timeout=20)
    host, port = netd.address("mail")
    socks = [socket.create_connection((host, port), timeout=5) for _ in range(8)]
    try:
        assert [s.recv(100)[:3] for s in socks] == [b"220"] * 8
    finally:
        for s in socks:
            s.close()


class _RawSmarthost:
    """Refuses rcpt 'multi*' with a multi-line 550; records every DATA it accepts."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.upstream = RawUpstream(self._serve)
        self.port = self.upstream.port

    def _serve(self, conn: socket.socket) -> None:
        stream = conn.makefile("rb")
        conn.sendall(b"220 upstream ESMTP\r\n")
        while True:
            line = stream.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                conn.sendall(b"250 upstream\r\n")
            elif verb == b"RCPT" and b"multi" in line:
                conn.sendall(b"550-5.1.1 first line\r\n550 .\r\n")
            elif verb == b"DATA":
                conn.sendall(b"354 go\r\n")
                data = b""
                while not data.endswith(b"\r\n.\r\n"):
                    chunk = stream.readline()
                    if not chunk:
                        return
                    data += chunk
                self.received.append(data)
                conn.sendall(b"250 ok\r\n")
            elif verb == b"QUIT":
                conn.sendall(b"221 bye\r\n")
                return
            else:
                conn.sendall(b"250 ok\r\n")

    def stop(self) -> None:
        self.upstream.stop()


def test_bounce_sent_on_has_no_bare_lf(start_netd: StartNetd, tmp_path: Path) -> None:
    """A bounce quoting a multi-line remote reply sends no bare LF to the next hop."""
    upstream = _RawSmarthost()
    try:
        text = relaying(
            tmp_path / "state",
            f"mode: smarthost, smarthost: '127.0.0.1:{upstream.port}', tls: none, retry: [0.2]",
        )
        netd = start_netd(text)
        with smtp(netd) as client:
            client.sendmail("alice@client.test", ["multi@far.test"], b"Subject: m\r\n\r\nx\r\n")
        # The bounce to the sender is the one delivery: its event says the
        # smarthost has answered its DATA.
        netd.wait_for("mail", "message.delivered", timeout=15, recipients=["alice@client.test"])
        [bounce] = upstream.received
        body = bounce.replace(b"\r\n", b"")
        assert b"\n" not in body and b"\r" not in body, bounce
    finally:
        upstream.stop()


def test_queued_relay_mail_cannot_be_dropped_through_the_admin_api(
    start_netd: StartNetd, tmp_path: Path
) -> None:
    """It leaves the spool delivered or bounced; DELETE is for capture mode (405 here)."""
    text = relaying(
        tmp_path / "state",
        f"mode: smarthost, smarthost: '127.0.0.1:{unused_port()}', tls: none, retry: [3600]",
    )
    netd = start_netd(text)
    with smtp(netd) as client:
        client.sendmail("a@client.test", ["queued@far.test"], b"Subject: q\r\n\r\nx\r\n")
    assert len(netd.messages("mail", to="queued@far.test")) == 1
    with pytest.raises(AdminError) as refused:
        netd.admin("DELETE", "/api/services/mail/messages")
    assert refused.value.status == 405
    assert len(netd.messages("mail", to="queued@far.test")) == 1
