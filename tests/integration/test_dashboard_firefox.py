"""
The dashboard in headless Firefox, driven over WebDriver BiDi
(L{tests.firefox_bidi}; Debian has no geckodriver), against the
real daemon with smtplib and raw HTTP feeding it.  One daemon and one browser
for the module.  Skipped when Firefox is missing; .ci/run installs
C{firefox-esr}.
"""

from __future__ import annotations

import json
import shutil
import smtplib
import socket
import struct
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from netd.testing import NetdProcess

pytest.importorskip("websockets.sync.client")
from tests.firefox_bidi import Firefox

FIREFOX = shutil.which("firefox-esr") or shutil.which("firefox")
pytestmark = pytest.mark.skipif(
    FIREFOX is None, reason="needs Firefox 115+ (Debian's firefox-esr; .ci/run installs it)"
)

TOKEN = "dashboard-token"
WIDTH, HEIGHT = 1280, 800

SERVICE_MAP = f"""
state_dir: state
shutdown_grace: 1
admin:
  listen: ["tcp:0:interface=127.0.0.1"]
  token: {TOKEN}
services:
  mail:
    type: smtp
    listen: ["tcp:0:interface=127.0.0.1"]
    hostname: mx.netd.test
    relay: {{allow_from: [127.0.0.0/8], domains: [netd.test]}}
    namespace_from: [plus_tag]
  web:
    type: http
    listen: ["tcp:0:interface=127.0.0.1"]
    routes: [{{path: /signup, status: 201, body: "created\\n"}}]
    record: 100
"""


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetdProcess]:
    base = tmp_path_factory.mktemp("dashboard-firefox")
    with NetdProcess.start(SERVICE_MAP, base) as process:
        yield process


@pytest.fixture(scope="module")
def firefox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Firefox]:
    assert FIREFOX is not None
    with Firefox.start(FIREFOX, tmp_path_factory.mktemp("firefox")) as browser:
        browser.set_viewport(WIDTH, HEIGHT)
        yield browser


def admin_base(netd: NetdProcess) -> str:
    entry = netd.ports["admin"]["listeners"][0]
    return f"http://{entry['host']}:{entry['port']}/"


@pytest.fixture
def page(netd: NetdProcess, firefox: Firefox) -> Firefox:
    """The dashboard open and signed in (the session cookie lasts the module)."""
    firefox.navigate(admin_base(netd))
    shown = firefox.wait_until(
        "!document.getElementById('login').hidden ? 'login'"
        " : document.getElementById('services') ? 'services' : ''"
    )
    if shown == "login":
        firefox.evaluate(
            f"document.getElementById('token').value = {json.dumps(TOKEN)};"
            "document.getElementById('login-form').requestSubmit()"
        )
        firefox.wait_until("document.getElementById('services') !== null")
    return firefox


def go(page: Firefox, hash: str) -> None:
    page.evaluate(f"location.hash = {json.dumps(hash)}")


def send_mail(netd: NetdProcess, message: EmailMessage) -> None:
    with smtplib.SMTP(*netd.address("mail"), timeout=10) as client:
        client.send_message(message)


def row_with(text: str) -> str:
    """A script: whether the mail list has a row holding C{text}."""
    return (
        "[...document.querySelectorAll('table.mail-list tbody tr')]"
        f".some((row) => row.textContent.includes({json.dumps(text)}))"
    )


def open_row(page: Firefox, text: str) -> None:
    page.wait_until(row_with(text))
    index = page.evaluate(
        "[...document.querySelectorAll('table.mail-list tbody tr')]"
        f".findIndex((row) => row.textContent.includes({json.dumps(text)}))"
    )
    page.click(f"table.mail-list tbody tr:nth-child({index + 1})")
    page.wait_until("document.querySelector('iframe.mail') !== null")


def mail_frame(page: Firefox) -> str:
    """
    The browsing context of the message's HTML frame, once its document is in:
    the frame's first document, an empty about:blank, says it is complete too.
    """

    def loaded() -> str | None:
        frames = page.frames()
        if frames and page.evaluate(
            "location.href !== 'about:blank' && document.readyState === 'complete'", frames[0]
        ):
            return frames[0]
        return None

    return page.poll(loaded, "the mail's frame loaded")


def test_the_dashboard_loads_live_in_firefox(netd: NetdProcess, page: Firefox) -> None:
    names = page.wait_until(
        "[...document.querySelectorAll('#services tbody tr')].map((r) => r.dataset.service)"
    )
    assert names == ["mail", "web"]
    assert page.wait_until("document.getElementById('live').textContent === 'live'")
    assert "Firefox/" in page.evaluate("navigator.userAgent")


def test_a_mail_sent_by_smtplib_appears_without_a_reload(netd: NetdProcess, page: Firefox) -> None:
    go(page, "#/mail/mail")
    page.wait_until("document.getElementById('mail-search') !== null")
    page.evaluate("window.notReloaded = true")
    message = EmailMessage()
    message["From"] = "alice@client.test"
    message["To"] = "reader@netd.test"
    message["Subject"] = "Firefox arrival 5120"
    message.set_content("the text part\n")
    message.add_alternative("<h1 id='inside'>Firefox arrival 5120</h1>", subtype="html")
    send_mail(netd, message)
    open_row(page, "Firefox arrival 5120")
    assert page.evaluate("window.notReloaded") is True
    assert page.evaluate("document.querySelector('iframe.mail').getAttribute('sandbox')") == ""
    assert page.evaluate("document.getElementById('inside').textContent", mail_frame(page)) == (
        "Firefox arrival 5120"
    )


def test_a_hostile_mail_and_request_run_nothing_in_firefox(
    netd: NetdProcess, page: Firefox
) -> None:
    hostile = EmailMessage()
    hostile["From"] = '"<img src=x onerror=alert(1)>" <evil@attacker.test>'
    hostile["To"] = "reader@netd.test"
    hostile["Subject"] = "<script>window.pwned=1</script><img src=x onerror=window.pwned=2>"
    hostile["X-Evil"] = "<svg onload=alert(3)>"
    hostile.set_content("text <script>window.pwned=4</script>\n")
    hostile.add_alternative(
        "<p id='p'><script>document.body.className='ran';parent.pwned=5;alert(5)</script>"
        "<img id='img' src=x onerror='this.className=\"ran\";parent.pwned=6'>"
        '<a id="js" href="javascript:document.body.className=\'ran\';alert(7)">click me</a></p>',
        subtype="html",
    )
    send_mail(netd, hostile)
    go(page, "#/mail/mail")
    open_row(page, "<script>")
    assert page.evaluate("document.querySelector('h1.subject').textContent") == hostile["Subject"]
    frame = mail_frame(page)
    page.click("#js", frame)
    # The script, the handler and the link would each have marked the frame's own document.
    assert page.evaluate("document.body.className", frame) == ""
    assert page.evaluate("document.getElementById('img').className", frame) == ""
    for tab in ("Text", "Headers", "Raw"):
        page.click(f'[data-tab="{tab}"]')
    page.wait_until("(document.querySelector('pre.raw') || {}).textContent?.includes('X-Evil')")

    markup = "<script>window.pwned=8</script><img src=x onerror=window.pwned=9>"
    with socket.create_connection(netd.address("web"), timeout=10) as client:
        client.sendall(
            b"GET /signup HTTP/1.1\r\nHost: web\r\nX-Evil: %s\r\nConnection: close\r\n\r\n"
            % markup.encode()
        )
        assert client.makefile("rb").readline().startswith(b"HTTP/1.1 201")
    go(page, "#/http")
    page.wait_until("document.querySelector('table.requests tbody tr.clickable') !== null")
    page.click("table.requests tbody tr.clickable")
    assert page.wait_until(
        "[...document.querySelectorAll('table.headers td')].map((td) => td.textContent)"
        f".includes({json.dumps(markup)})"
    )

    assert page.evaluate("typeof window.pwned") == "undefined"
    assert page.evaluate("document.scripts.length") == 1  # app.js alone
    assert page.prompts() == []


def test_a_link_to_a_namespace_shows_its_mail_alone_in_firefox(
    netd: NetdProcess, page: Firefox
) -> None:
    for namespace in ("fx-a", "fx-b"):
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = (
            "alice@client.test",
            f"reader+{namespace}@netd.test",
            f"Scoped to {namespace}",
        )
        message.set_content("scoped\n")
        send_mail(netd, message)
    go(page, "#/mail/mail?namespace=fx-b")
    subjects = page.wait_until(
        "[...document.querySelectorAll('table.mail-list td.subject')].map((td) => td.textContent)"
    )
    assert subjects == ["Scoped to fx-b"]
    assert page.evaluate("document.getElementById('namespace').value") == "fx-b"


def test_the_pages_fit_a_phone_in_firefox(netd: NetdProcess, page: Firefox, tmp_path: Path) -> None:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = (
        "alice@client.test",
        "reader@netd.test",
        "Read on a phone in Firefox",
    )
    message.set_content("small screen\n")
    send_mail(netd, message)
    page.set_viewport(390, 844)
    try:
        for target, shown in [
            ("#/services", "#services"),
            ("#/mail/mail", "table.mail-list tbody tr"),
            ("#/http", "section[data-service=web]"),
            ("#/journal", "table.journal"),
        ]:
            go(page, target)
            page.wait_until(f"document.querySelector({json.dumps(shown)}) !== null")
            # Wide tables scroll in their own box; the page itself never does sideways.
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, (target, width)
        shot = page.screenshot(tmp_path / "phone.png")
        assert struct.unpack(">II", shot.read_bytes()[16:24]) == (390, 844)
    finally:
        page.set_viewport(WIDTH, HEIGHT)
