"""
The dashboard in a real browser: Debian's headless Chromium driven by Selenium
against the real daemon, with smtplib, urllib, dnspython, ftplib and a raw IRC
client feeding it.  One daemon and one browser for the module.

Skipped when chromium, chromedriver or selenium is missing; .ci/run installs
them.  Screenshots (1280x800) go to C{$NETD_SCREENSHOTS} when set (the README
shows the ones in docs/: C{NETD_SCREENSHOTS=docs pytest ...this module}), to a
temporary folder otherwise.
"""

from __future__ import annotations

import ftplib
import os
import shutil
import smtplib
import socket
import struct
import threading
import urllib.request
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import pytest

from netd.testing import NetdProcess

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import (  # noqa: E402
    NoAlertPresentException,
    StaleElementReferenceException,
)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)

TOKEN = "dashboard-token"
WIDTH, HEIGHT = 1280, 800
BULK = 1000
ROOT = Path(__file__).resolve().parents[2]


def service_map(workdir: Path) -> str:
    (workdir / "ftp").mkdir(exist_ok=True)
    (workdir / "ftp" / "readme.txt").write_text("hello\n")
    return f"""
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
  bulk:
    type: smtp
    listen: ["tcp:0:interface=127.0.0.1"]
    hostname: bulk.netd.test
    relay: {{allow_from: [127.0.0.0/8], domains: [netd.test]}}
    max_connections_per_client: 0
  web:
    type: http
    listen: ["tcp:0:interface=127.0.0.1"]
    routes: [{{path: /signup, status: 201, body: "created\\n"}}]
    record: 100
    namespace_from: [header]
  dns:
    type: dns
    listen: ["udp:0:interface=127.0.0.1"]
    records: {{www.netd.test: {{A: [127.0.0.1]}}}}
    query_log: true
  files:
    type: ftp
    listen: ["tcp:0:interface=127.0.0.1"]
    root: ftp
    anonymous: read
  chat:
    type: chat
    listen: ["tcp:0:interface=127.0.0.1"]
    rooms: [lobby]
"""


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetdProcess]:
    base = tmp_path_factory.mktemp("dashboard")
    with NetdProcess.start(service_map(base), base) as process:
        yield process


@pytest.fixture(scope="module")
def bulk(netd: NetdProcess) -> int:
    """
    C{BULK} messages stored in the C{bulk} service before the browser starts:
    the first-render test measures the page, not a daemon busy taking mail.
    """

    def send(share: range) -> None:
        with smtplib.SMTP(*netd.address("bulk"), timeout=30) as client:
            for n in share:
                client.sendmail(
                    "bulk@client.test",
                    ["many@netd.test"],
                    f"Subject: bulk {n:04d}\r\n\r\nmessage {n}\r\n".encode(),
                )

    senders = [threading.Thread(target=send, args=(range(k, BULK, 4),)) for k in range(4)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(60)
    total: int = netd.admin("GET", "/api/services/bulk/messages?limit=0")["total"]
    assert total == BULK
    return total


@pytest.fixture(scope="module")
def browser(bulk: int) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument(f"--window-size={WIDTH},{HEIGHT}")
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    # The viewport itself, whatever the headless window's frame takes.
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
    )
    yield driver
    driver.quit()


def admin_base(netd: NetdProcess) -> str:
    entry = netd.ports["admin"]["listeners"][0]
    return f"http://{entry['host']}:{entry['port']}/"


def wait(browser: WebDriver, timeout: float = 10) -> WebDriverWait[WebDriver]:
    # Live lists are drawn again as events come: an element found a moment ago
    # may be gone, and is looked up afresh on the next try.
    return WebDriverWait(
        browser,
        timeout,
        poll_frequency=0.05,
        ignored_exceptions=(StaleElementReferenceException,),
    )


def click(browser: WebDriver, css: str, text: str = "") -> None:
    """Click the first element matching C{css} whose text holds C{text}, looked up afresh."""

    def clicked(b: WebDriver) -> bool:
        for element in b.find_elements(By.CSS_SELECTOR, css):
            if text in element.text:
                element.click()
                return True
        return False

    wait(browser).until(clicked)


def visible(browser: WebDriver, css: str) -> WebElement:
    found: WebElement = wait(browser).until(
        lambda b: next((e for e in b.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()), None)
    )
    return found


def sign_in(browser: WebDriver, token: str) -> None:
    field = visible(browser, "#token")
    field.clear()
    field.send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "#login-form button").click()


@pytest.fixture
def page(netd: NetdProcess, browser: WebDriver) -> WebDriver:
    """The dashboard open and signed in (a sign-in survives across this module's tests)."""
    browser.get(admin_base(netd))
    wait(browser).until(
        lambda b: (
            b.find_element(By.ID, "login").is_displayed() or b.find_elements(By.ID, "services")
        )
    )
    if browser.find_element(By.ID, "login").is_displayed():
        sign_in(browser, TOKEN)
        visible(browser, "#services")
    return browser


def go(browser: WebDriver, hash: str) -> None:
    browser.execute_script("location.hash = arguments[0]", hash)


def rows(browser: WebDriver, css: str) -> list[WebElement]:
    found: list[WebElement] = browser.find_elements(By.CSS_SELECTOR, css)
    return found


def send_mail(netd: NetdProcess, service: str, message: EmailMessage) -> None:
    with smtplib.SMTP(*netd.address(service), timeout=10) as client:
        client.send_message(message)


def mail(subject: str, to: str = "reader@netd.test") -> EmailMessage:
    message = EmailMessage()
    message["From"] = "alice@client.test"
    message["To"] = to
    message["Subject"] = subject
    message.set_content(f"{subject}: the text part.\n")
    message.add_alternative(
        f"<html><body><h1 id='inside'>{subject}</h1><p style='color:#c00'>the HTML part</p>"
        "</body></html>",
        subtype="html",
    )
    return message


def no_alert(browser: WebDriver) -> bool:
    try:
        browser.switch_to.alert  # noqa: B018
    except NoAlertPresentException:
        return True
    return False


def screenshot(browser: WebDriver, folder: Path, name: str) -> Path:
    path = folder / f"dashboard-{name}.png"
    browser.save_screenshot(str(path))
    return path


def png_size(path: Path) -> tuple[int, int]:
    width, height = struct.unpack(">II", path.read_bytes()[16:24])
    return width, height


def test_a_wrong_token_is_refused_and_the_right_one_signs_in(
    netd: NetdProcess, browser: WebDriver
) -> None:
    browser.delete_all_cookies()
    browser.get(admin_base(netd))
    sign_in(browser, "not-the-token")
    error = visible(browser, "#login-error")
    wait(browser).until(lambda b: error.text == "Wrong token.")
    assert browser.get_cookies() == [] and not rows(browser, "#services")
    sign_in(browser, TOKEN)
    visible(browser, "#services")
    [cookie] = browser.get_cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert "netd_session" not in browser.execute_script("return document.cookie")


def test_a_mail_appears_live_opens_in_the_sandbox_is_found_and_deleted(
    netd: NetdProcess, page: WebDriver
) -> None:
    go(page, "#/mail/mail")
    visible(page, "#mail-search")
    page.execute_script("window.notReloaded = true")
    send_mail(netd, "mail", mail("Live arrival 7731"))
    click(page, "table.mail-list tbody tr", "Live arrival 7731")
    assert page.execute_script("return window.notReloaded") is True
    frame = visible(page, "iframe.mail")
    assert frame.get_attribute("sandbox") == ""
    page.switch_to.frame(frame)
    assert visible(page, "#inside").text == "Live arrival 7731"
    page.switch_to.default_content()
    page.find_element(By.CSS_SELECTOR, '[data-tab="Text"]').click()
    assert "the text part" in visible(page, "pre.mail-text").text

    send_mail(netd, "mail", mail("Another one 1204"))
    go(page, "#/mail/mail")
    subject = visible(page, '#mail-search input[name="subject"]')
    subject.send_keys("live arrival")
    subject.submit()
    wait(page).until(
        lambda b: (
            [r.text for r in rows(b, "table.mail-list tbody tr")] != []
            and all("Live arrival 7731" in r.text for r in rows(b, "table.mail-list tbody tr"))
        )
    )
    assert len(rows(page, "table.mail-list tbody tr")) == 1
    click(page, "table.mail-list tbody tr")
    visible(page, "#delete-message").click()
    wait(page).until(lambda b: b.execute_script("return location.hash") == "#/mail/mail")
    wait(page).until(lambda b: rows(b, "table.mail-list tbody tr") == [])
    assert netd.messages("mail", subject="Live arrival") == []
    page.find_element(By.CSS_SELECTOR, "#mail-search button[type=button]").click()  # Clear


def test_hostile_mail_and_request_bodies_run_nothing(netd: NetdProcess, page: WebDriver) -> None:
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
    send_mail(netd, "mail", hostile)
    go(page, "#/mail/mail")
    click(page, "table.mail-list tbody tr", "<script>")
    frame = visible(page, "iframe.mail")
    assert page.find_element(By.CSS_SELECTOR, "h1.subject").text == hostile["Subject"]
    page.switch_to.frame(frame)
    visible(page, "#js").click()
    # Nothing ran inside the sandbox either: the script, the handler and the link
    # would each have marked the frame's own document.
    assert no_alert(page)
    assert page.find_element(By.TAG_NAME, "body").get_attribute("class") in ("", None)
    assert page.find_element(By.ID, "img").get_attribute("class") in ("", None)
    page.switch_to.default_content()
    for tab in ("Text", "Headers", "Raw"):
        page.find_element(By.CSS_SELECTOR, f'[data-tab="{tab}"]').click()
    wait(page).until(lambda b: "X-Evil" in b.find_element(By.CSS_SELECTOR, "pre.raw").text)

    markup = "<script>window.pwned=8</script><img src=x onerror=window.pwned=9>"
    with socket.create_connection(netd.address("web"), timeout=10) as client:
        client.sendall(
            b"GET /signup HTTP/1.1\r\nHost: web\r\nX-Evil: %s\r\nConnection: close\r\n\r\n"
            % markup.encode()
        )
        assert client.makefile("rb").readline().startswith(b"HTTP/1.1 201")
    go(page, "#/http")
    click(page, "table.requests tbody tr.clickable")
    wait(page).until(
        lambda b: any(
            cell.text == markup for cell in b.find_elements(By.CSS_SELECTOR, "table.headers td")
        )
    )

    assert page.execute_script("return typeof window.pwned") == "undefined"
    assert page.execute_script("return document.scripts.length") == 1  # app.js alone
    assert no_alert(page)


def test_the_namespace_filter_scopes_every_list_and_the_live_stream(
    netd: NetdProcess, page: WebDriver, shots: Path
) -> None:
    def request(namespace: str, path: str) -> None:
        asked = urllib.request.Request(
            netd.url("web", path=path), headers={"X-Netd-Namespace": namespace}
        )
        with urllib.request.urlopen(asked, timeout=10) as answer:
            assert answer.status == 201

    for namespace in ("ns-a", "ns-b"):
        send_mail(netd, "mail", mail(f"For {namespace} 3101", to=f"reader+{namespace}@netd.test"))
        request(namespace, f"/signup?for={namespace}")

    # A link to a namespace's page shows that namespace's mail alone.
    go(page, "#/mail/mail?namespace=ns-a")
    wait(page).until(
        lambda b: (
            [r.text for r in rows(b, "table.mail-list tbody tr")] != []
            and all("For ns-a" in r.text for r in rows(b, "table.mail-list tbody tr"))
        )
    )
    assert len(rows(page, "table.mail-list tbody tr")) == 1
    assert page.find_element(By.ID, "namespace").get_attribute("value") == "ns-a"
    # Live, in scope: another ns-a mail appears, the ns-b one sent just before it does not.
    send_mail(netd, "mail", mail("Later for ns-b 3102", to="reader+ns-b@netd.test"))
    send_mail(netd, "mail", mail("Later for ns-a 3102", to="reader+ns-a@netd.test"))
    wait(page).until(lambda b: len(rows(b, "table.mail-list tbody tr")) == 2)
    assert all("for ns-a" in r.text.lower() for r in rows(page, "table.mail-list tbody tr"))
    assert png_size(screenshot(page, shots, "namespace")) == (WIDTH, HEIGHT)

    # The page links keep the namespace.
    click(page, "#nav a", "HTTP")
    wait(page).until(lambda b: b.execute_script("return location.hash") == "#/http?namespace=ns-a")
    wait(page).until(lambda b: "/signup?for=ns-a" in b.find_element(By.TAG_NAME, "main").text)
    assert "for=ns-b" not in page.find_element(By.TAG_NAME, "main").text
    # Each request with its time to the response finished, in ms.
    [seen] = rows(page, "table.requests tbody tr.clickable")
    headings = [h.text for h in page.find_elements(By.CSS_SELECTOR, "table.requests thead th")]
    cell = seen.find_elements(By.TAG_NAME, "td")[headings.index("ms")]
    [recorded] = netd.admin("GET", "/api/services/web/requests?namespace=ns-a")
    assert float(cell.text) == pytest.approx(recorded["duration_ms"], abs=0.05)

    # The header's field chooses another, for the page shown and the stream.
    field = page.find_element(By.ID, "namespace")
    field.clear()
    field.send_keys("ns-b\n")
    wait(page).until(lambda b: b.execute_script("return location.hash") == "#/http?namespace=ns-b")
    wait(page).until(lambda b: "/signup?for=ns-b" in b.find_element(By.TAG_NAME, "main").text)
    assert "for=ns-a" not in page.find_element(By.TAG_NAME, "main").text
    click(page, "#nav a", "Journal")
    visible(page, "table.journal")
    request("ns-a", "/signup?live=ns-a")
    request("ns-b", "/signup?live=ns-b")
    wait(page).until(lambda b: "live=ns-b" in b.find_element(By.CSS_SELECTOR, "table.journal").text)
    journal = page.find_element(By.CSS_SELECTOR, "table.journal").text
    assert "live=ns-a" not in journal and "For ns-a" not in journal

    # A rule added from the form while scoped is that namespace's alone.
    if _rules_api(netd):
        click(page, "#nav a", "Rules")
        Select(visible(page, "#rule-service")).select_by_value("mail")
        form = visible(page, "#rule-text")
        form.send_keys('{"match": {"stage": "rcpt"}, "reply": "451 4.3.0 try later"}')
        form.submit()
        visible(page, 'table.rules tr[data-service="mail"]')
        [rule] = netd.admin("GET", "/api/services/mail/rules")["rules"]
        assert rule["namespace"] == "ns-b"
        try:
            with smtplib.SMTP(*netd.address("mail"), timeout=10) as client:
                client.ehlo()
                client.mail("alice@client.test")
                assert client.rcpt("reader+ns-b@netd.test")[0] == 451
                assert client.rcpt("reader+ns-a@netd.test")[0] == 250
        finally:
            netd.admin("DELETE", f"/api/services/mail/rules/{rule['id']}")

    # Cleared: every namespace again.
    field = page.find_element(By.ID, "namespace")
    field.clear()
    field.send_keys("\n")
    wait(page).until(lambda b: "namespace" not in b.execute_script("return location.hash"))
    go(page, "#/mail/mail")
    wait(page).until(
        lambda b: (
            {"For ns-a 3101", "For ns-b 3101"}
            <= {
                r.find_element(By.CSS_SELECTOR, "td.subject").text
                for r in rows(b, "table.mail-list tbody tr")
            }
        )
    )


def first_render(browser: WebDriver, url: str) -> float:
    """
    Milliseconds from navigating to C{url} (a real navigation, not a hash
    change: Navigation Timing starts again) to the mail list first drawn.
    """
    browser.get(url)
    wait(browser).until(
        lambda b: b.execute_script("return performance.getEntriesByName('netd:mail-list').length")
    )
    rendered: float = browser.execute_script(
        "return performance.getEntriesByName('netd:mail-list')[0].startTime"
    )
    return rendered


def test_a_thousand_messages_render_fast_page_through_and_the_page_is_light(
    netd: NetdProcess, browser: WebDriver, page: WebDriver, bulk: int
) -> None:
    # The messages were stored before the browser started (the bulk fixture).
    # One load first, as a reader's second visit: the page's files are in the
    # browser's cache (revalidated, 304) and its script compiled.  Then up to
    # three timed loads, the best counted: on a machine shared with other test
    # workers a load can only be slowed by them, never sped up, so the fastest
    # is the page's own cost.  The bar stays the 300 ms.
    first_render(browser, admin_base(netd) + "?warm=1#/mail/bulk")
    timings: list[float] = []
    for take in range(3):
        timings.append(first_render(browser, admin_base(netd) + f"?take={take}#/mail/bulk"))
        if timings[-1] < 300:
            break
    # Where the last load's time went, should it fail: when each step ended.
    steps = browser.execute_script(
        "const [nav] = performance.getEntriesByType('navigation');"
        "const ends = {page: nav.responseEnd, ready: nav.domContentLoadedEventEnd};"
        "for (const r of performance.getEntriesByType('resource'))"
        "  ends[new URL(r.name).pathname] = r.responseEnd;"
        "return Object.entries(ends).map(([k, v]) => `${k} ${Math.round(v)}`).join(', ')"
    )
    assert min(timings) < 300, f"first render of the list took {timings} ms ({steps})"
    # The list was asked for once, with the session (not after it).
    asked = browser.execute_script(
        "return performance.getEntriesByType('resource')"
        "  .filter((r) => r.name.includes('/messages?')).map((r) => r.startTime)"
    )
    session = browser.execute_script(
        "return performance.getEntriesByType('resource')"
        "  .find((r) => r.name.endsWith('/ui/session')).startTime"
    )
    assert len(asked) == 1 and asked[0] <= session, (asked, session)
    assert len(rows(browser, "table.mail-list tbody tr")) == 50
    assert visible(browser, ".pager .muted").text == f"1-50 of {bulk}"
    visible(browser, ".pager button:nth-child(2)").click()  # Older
    wait(browser).until(
        lambda b: b.find_element(By.CSS_SELECTOR, ".pager .muted").text == f"51-100 of {BULK}"
    )

    weight = browser.execute_script(
        "const [nav] = performance.getEntriesByType('navigation');"
        "return performance.getEntriesByType('resource')"
        "  .filter((r) => r.name.includes('/ui/assets/'))"
        "  .reduce((sum, r) => sum + r.decodedBodySize, nav.decodedBodySize)"
    )
    assert 0 < weight < 150 * 1024, f"the page weighs {weight} bytes"


def test_a_refused_reload_shows_each_error_at_its_line(netd: NetdProcess, page: WebDriver) -> None:
    config = netd.log_path.parent / "netd.yaml"
    good = config.read_text()
    config.write_text(good.replace("    rooms: [lobby]\n", "    rooms: [lobby]\n    colour: red\n"))
    try:
        visible(page, "#reload").click()
        shown = visible(page, "#notice")
        wait(page).until(lambda b: "services.chat.colour: unknown key" in shown.text)
        line = next(
            n for n, text in enumerate(config.read_text().splitlines(), 1) if "colour" in text
        )
        assert f"netd.yaml:{line}:" in shown.text and "the running map stays" in shown.text
    finally:
        config.write_text(good)
    shown.click()  # dismissed
    visible(page, "#reload").click()
    wait(page).until(lambda b: b.find_element(By.ID, "notice").text.startswith("Reloaded."))


def test_the_pages_fit_a_phone(netd: NetdProcess, page: WebDriver) -> None:
    send_mail(netd, "mail", mail("Read on a phone"))
    metrics = {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True}
    page.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    try:
        for target, shown in [
            ("#/services", "#services"),
            ("#/mail/mail", "table.mail-list tbody tr"),
            ("#/journal", "table.journal"),
        ]:
            go(page, target)
            visible(page, shown)
            # Wide tables scroll in their own box; the page itself never does sideways.
            width = page.execute_script("return document.documentElement.scrollWidth")
            assert width <= 390, (target, width)
    finally:
        page.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
        )


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where screenshots go: C{$NETD_SCREENSHOTS} (relative to the checkout), or tmp_path."""
    folder = Path(os.environ.get("NETD_SCREENSHOTS") or tmp_path)
    if not folder.is_absolute():
        folder = ROOT / folder
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_every_page_live_in_screenshots(netd: NetdProcess, page: WebDriver, shots: Path) -> None:
    folder = shots
    taken: list[Path] = []

    send_mail(netd, "mail", mail("Your verification code is 482913"))
    go(page, "#/services")
    # The next sample of the counters (every 2 s) shows the mail just sent.
    wait(page).until(
        lambda b: (
            b.find_element(
                By.CSS_SELECTOR, '#services tr[data-service="mail"] td:nth-child(6)'
            ).text
            not in ("", "0")
        )
    )
    # And the rate graph has a line: two rates, three samples.
    wait(page).until(
        lambda b: (
            " "
            in (
                b.find_element(
                    By.CSS_SELECTOR, '#services tr[data-service="mail"] polyline'
                ).get_attribute("points")
                or ""
            )
        ),
    )
    taken.append(screenshot(page, folder, "services"))
    go(page, "#/mail/mail")
    click(page, "table.mail-list tbody tr")
    visible(page, "iframe.mail")
    taken.append(screenshot(page, folder, "message"))
    go(page, "#/mail/mail")
    visible(page, "table.mail-list tbody tr")
    taken.append(screenshot(page, folder, "mail"))

    go(page, "#/http")
    visible(page, "section[data-service=web]")
    with urllib.request.urlopen(netd.url("web", path="/signup?live=1"), timeout=10) as answer:
        assert answer.status == 201
    wait(page).until(lambda b: "/signup?live=1" in b.find_element(By.TAG_NAME, "main").text)
    taken.append(screenshot(page, folder, "http"))

    go(page, "#/dns")
    visible(page, "section[data-service=dns]")
    host, port = netd.address("dns", "udp")
    dns.query.udp(dns.message.make_query("www.netd.test", "A"), host, port=port, timeout=5)
    wait(page).until(lambda b: "www.netd.test" in b.find_element(By.TAG_NAME, "main").text)
    taken.append(screenshot(page, folder, "dns"))

    with ftplib.FTP() as ftp, socket.create_connection(netd.address("chat"), timeout=5) as irc:
        ftp.connect(*netd.address("files"), timeout=10)
        ftp.login()
        irc.sendall(b"NICK alice\r\nUSER alice 0 * :Alice\r\nJOIN #lobby\r\n")
        netd.wait_for("chat", "chat.join")
        go(page, "#/sessions")
        wait(page).until(lambda b: len(rows(b, "table.sessions tbody tr")) == 2)
        taken.append(screenshot(page, folder, "sessions"))

    go(page, "#/journal")
    visible(page, "table.journal tbody tr")
    touch = socket.create_connection(netd.address("files"), timeout=5)
    touch.close()
    wait(page).until(lambda b: "connection.closed" in rows(b, "table.journal tbody tr")[0].text)
    taken.append(screenshot(page, folder, "journal"))

    assert not page.find_element(By.CSS_SELECTOR, '[data-page="rules"]').is_displayed() or (
        _rules_api(netd)
    )
    for path in taken:
        assert png_size(path) == (WIDTH, HEIGHT), path


def test_a_rule_added_in_the_form_answers_smtplib_and_is_deleted(
    netd: NetdProcess, page: WebDriver, shots: Path
) -> None:
    if not _rules_api(netd):
        pytest.skip("this netd has no rules API (issue #16)")
    visible(page, '[data-page="rules"]').click()
    Select(visible(page, "#rule-service")).select_by_value("mail")
    form = visible(page, "#rule-text")
    form.send_keys('{"match": {"stage": "nowhere"}, "reply": "451 4.3.0 try later"}')
    form.submit()
    wait(page).until(lambda b: "match.stage" in b.find_element(By.ID, "rule-errors").text)
    form.clear()
    form.send_keys(
        '{"match": {"stage": "rcpt", "rcpt": "*@flaky.test"}, "reply": "451 4.3.0 try later",'
        ' "times": 1}'
    )
    form.submit()
    rule = 'table.rules tr[data-service="mail"] '
    visible(page, rule + ".rule-fired")
    with smtplib.SMTP(*netd.address("mail"), timeout=10) as client:
        client.ehlo()
        client.mail("alice@client.test")
        assert client.rcpt("someone@flaky.test") == (451, b"4.3.0 try later")
        assert client.rcpt("someone@flaky.test")[0] == 250  # spent after one
    # Drawn again on its rule.fired event: looked up afresh.
    wait(page).until(
        lambda b: b.find_element(By.CSS_SELECTOR, rule + ".rule-fired").text == "1 (spent)"
    )
    assert png_size(screenshot(page, shots, "rules")) == (WIDTH, HEIGHT)
    click(page, rule + "button.danger")
    wait(page).until(lambda b: rows(b, "table.rules tr[data-rule]") == [])
    assert netd.admin("GET", "/api/services/mail/rules")["rules"] == []


def _rules_api(netd: NetdProcess) -> Any:
    """Whether this netd answers the rules API (another branch adds it)."""
    try:
        return netd.admin("GET", "/api/services/mail/rules") is not None
    except Exception:
        return False
