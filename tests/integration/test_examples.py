"""Every shipped example map starts, as a user would start it, on free ports."""

from __future__ import annotations

import ftplib
import io
import re
import shutil
import smtplib
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import dns.message
import dns.query
import pytest

from netd.testing import NetdProcess

CONFIG = Path(__file__).parents[2] / "config"
# Maps whose listeners only a service manager can hand over; tests/integration/test_systemd.py.
NEEDS_SYSTEMD = {"systemd.yaml"}


def on_free_ports(text: str) -> str:
    return re.sub(r"\b(tcp|udp|ssl):\d+", r"\1:0", text)


def copy_with_free_ports(into: Path) -> Path:
    """The config tree, copied so relative paths (root: ., state) still hold."""
    copy = into / "config"
    shutil.copytree(CONFIG, copy, ignore=shutil.ignore_patterns("state"))
    for example in copy.glob("**/*.yaml"):
        example.write_text(on_free_ports(example.read_text()))
    return copy


@pytest.mark.parametrize(
    "name",
    sorted(
        str(p.relative_to(CONFIG)) for p in CONFIG.glob("**/*.yaml") if p.name not in NEEDS_SYSTEMD
    ),
)
def test_example_starts_and_every_service_runs(tmp_path: Path, name: str) -> None:
    example = copy_with_free_ports(tmp_path) / name
    with NetdProcess.start(example, tmp_path / "run") as netd:
        services = netd.ports["services"]
        assert services
        for service in services.values():
            assert service["listeners"], service
            assert all(
                listener["port"] != 0 for listener in service["listeners"] if "port" in listener
            )


def start_example(tmp_path: Path, name: str) -> NetdProcess:
    return NetdProcess.start(copy_with_free_ports(tmp_path) / "examples" / name, tmp_path / "run")


def test_mail_lab_captures_mail_to_anyone(tmp_path: Path) -> None:
    with start_example(tmp_path, "mail-lab.yaml") as netd:
        with smtplib.SMTP(*netd.address("mail"), timeout=10) as smtp:
            smtp.starttls(context=ssl.create_default_context(cafile=str(netd.ca_file("lab"))))
            smtp.sendmail("app@lab.test", ["someone@example.com"], b"Subject: hi\r\n\r\nhello\r\n")
        [mail] = netd.messages("mail")
        assert mail["to"] == ["someone@example.com"] and mail["subject"] == "hi"


def test_fake_internet_answers_every_name_and_path(tmp_path: Path) -> None:
    with start_example(tmp_path, "fake-internet.yaml") as netd:
        host, port = netd.address("dns", "udp")
        query = dns.message.make_query("anything.example.com", "A")
        answer = dns.query.udp(query, host, port=port, timeout=5)
        assert [item.address for item in answer.answer[0]] == ["127.0.0.1"]
        with urllib.request.urlopen(netd.url("web", tls=False, path="/any/path"), timeout=10) as r:
            assert r.read() == b"netd fake internet\n"
        assert [q["name"] for q in netd.queries("dns")] == ["anything.example.com."]
        assert [r["path"] for r in netd.requests("web")] == ["/any/path"]


def test_fake_internet_has_a_flaky_upstream(tmp_path: Path) -> None:
    with start_example(tmp_path, "fake-internet.yaml") as netd:
        statuses = []
        for _ in range(3):
            try:
                with urllib.request.urlopen(netd.url("web", tls=False, path="/flaky/x")) as r:
                    statuses.append(r.status)
            except urllib.error.HTTPError as e:
                statuses.append(e.code)
        assert statuses == [503, 503, 200]
        assert [r["fired"] for r in netd.view("web", "rules")] == [2, 0]


def test_ftp_dropbox_takes_uploads_over_tls_only(tmp_path: Path) -> None:
    with start_example(tmp_path, "ftp-dropbox.yaml") as netd:
        host, port = netd.address("dropbox")
        plain = ftplib.FTP()
        plain.connect(host, port, timeout=10)
        with pytest.raises(ftplib.error_perm):
            plain.login("acme", "upload-only")
        plain.close()
        context = ssl.create_default_context(cafile=str(netd.ca_file("lab")))
        secure = ftplib.FTP_TLS(context=context)
        secure.connect(host, port, timeout=10)
        secure.login("acme", "upload-only")
        secure.prot_p()
        secure.storbinary("STOR report.csv", io.BytesIO(b"a,b\n1,2\n"))
        assert "report.csv" in secure.nlst()
        assert [s["user"] for s in netd.sessions("dropbox")] == ["acme"]
        secure.quit()
        uploaded = tmp_path / "config" / "examples" / "dropbox" / "acme" / "report.csv"
        assert uploaded.read_bytes() == b"a,b\n1,2\n"
