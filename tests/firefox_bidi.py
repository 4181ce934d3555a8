"""
Headless Firefox driven over WebDriver BiDi, which Firefox 115+ speaks itself:
no geckodriver (Debian packages none).  Firefox is started with a fresh profile
and C{--remote-debugging-port=0}; the port it chose is read from the
C{WebDriverBiDiServer.json} it writes into the profile once it listens, and a
websocket session at C{ws://127.0.0.1:PORT/session} drives one tab
(C{browsingContext.navigate}, C{script.evaluate}, C{input.performActions},
C{browsingContext.captureScreenshot} ...).  A test helper, not part of netd.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from websockets.sync.client import ClientConnection, connect

__all__ = ["BiDiError", "Firefox"]

T = TypeVar("T")

# Preferences of a profile that only a test uses: no first-run pages, no
# telemetry, no update checks, nothing fetched from the network by itself.
_PREFS = {
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "browser.aboutwelcome.enabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "app.update.disabledForTesting": True,
    "network.captive-portal-service.enabled": False,
    "browser.safebrowsing.update.enabled": False,
    "extensions.update.enabled": False,
}
START_TIMEOUT = 60.0
CALL_TIMEOUT = 30.0


class BiDiError(Exception):
    """A BiDi command failed, or a script threw: the protocol's error and message."""


class Firefox:
    """One headless Firefox and the BiDi session on its first tab."""

    def __init__(self, process: subprocess.Popen[bytes], socket: ClientConnection) -> None:
        self.process = process
        self.socket = socket
        self.context = ""
        # Events the session subscribed to, in arrival order (alerts, say).
        self.events: list[dict[str, Any]] = []
        self._next_id = 0

    @classmethod
    @contextmanager
    def start(cls, binary: str, workdir: Path) -> Iterator[Firefox]:
        profile = workdir / "profile"
        profile.mkdir(parents=True)
        (profile / "user.js").write_text(
            "".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in _PREFS.items())
        )
        with open(workdir / "firefox.log", "wb") as log:
            process = subprocess.Popen(
                [
                    *(binary, "--headless", "--no-remote", "--remote-debugging-port=0"),
                    *("--profile", str(profile), "about:blank"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            port = _listening_port(process, profile / "WebDriverBiDiServer.json", workdir)
            with connect(
                f"ws://127.0.0.1:{port}/session", max_size=None, open_timeout=CALL_TIMEOUT
            ) as socket:
                browser = cls(process, socket)
                browser.call("session.new", capabilities={})
                browser.call("session.subscribe", events=["browsingContext.userPromptOpened"])
                [tab] = browser.call("browsingContext.getTree", maxDepth=0)["contexts"]
                browser.context = tab["context"]
                try:
                    yield browser
                finally:
                    browser.call("session.end")
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    # The protocol

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and return its result; events met on the way are kept."""
        self._next_id += 1
        sent = self._next_id
        self.socket.send(json.dumps({"id": sent, "method": method, "params": params}))
        deadline = time.monotonic() + CALL_TIMEOUT
        while True:
            message = json.loads(self.socket.recv(timeout=max(0.0, deadline - time.monotonic())))
            if message.get("type") == "event":
                self.events.append(message)
            elif message.get("id") == sent:
                if message.get("type") == "error":
                    raise BiDiError(f"{method}: {message['error']}: {message.get('message')}")
                result: dict[str, Any] = message["result"]
                return result

    # What the tests do

    def navigate(self, url: str) -> None:
        self.call("browsingContext.navigate", context=self.context, url=url, wait="complete")

    def evaluate(self, expression: str, context: str | None = None) -> Any:
        """C{expression}'s value (a promise awaited) in the tab, or in frame C{context}."""
        answer = self.call(
            "script.evaluate",
            expression=expression,
            target={"context": context or self.context},
            awaitPromise=True,
        )
        if answer["type"] == "exception":
            raise BiDiError(f"{expression!r} threw: {answer['exceptionDetails']['text']}")
        return _value(answer["result"])

    def wait_until(self, expression: str, timeout: float = 10.0) -> Any:
        """C{expression}'s value once it is truthy (the page updates itself as events come)."""
        return self.poll(lambda: self.evaluate(expression), expression, timeout)

    def poll(self, check: Callable[[], T], what: str, timeout: float = 10.0) -> T:
        """
        C{check()} once it is truthy, tried every 50 ms for C{timeout}
        seconds; a try that fails in the browser (a frame between two
        documents) counts as false.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = check()
            except BiDiError:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"still not so after {timeout} s: {what}")
            time.sleep(0.05)

    def frames(self) -> list[str]:
        """The browsing contexts of the tab's frames (iframes), in document order."""
        [tab] = self.call("browsingContext.getTree", root=self.context)["contexts"]
        return [child["context"] for child in tab["children"] or []]

    def click(self, css: str, context: str | None = None) -> None:
        """
        A real pointer click (not a script's) in the middle of C{css}'s element,
        once there is one: a frame's document may still be coming (its first,
        empty one says it is complete too).
        """
        target = context or self.context

        def located() -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = self.call(
                "browsingContext.locateNodes",
                context=target,
                locator={"type": "css", "value": css},
                maxNodeCount=1,
            )["nodes"]
            return found

        nodes = self.poll(located, f"an element matching {css!r}")
        origin = {"type": "element", "element": {"sharedId": nodes[0]["sharedId"]}}
        self.call(
            "input.performActions",
            context=target,
            actions=[
                {
                    "type": "pointer",
                    "id": "mouse",
                    "actions": [
                        {"type": "pointerMove", "x": 0, "y": 0, "origin": origin},
                        {"type": "pointerDown", "button": 0},
                        {"type": "pointerUp", "button": 0},
                    ],
                }
            ],
        )

    def set_viewport(self, width: int, height: int) -> None:
        self.call(
            "browsingContext.setViewport",
            context=self.context,
            viewport={"width": width, "height": height},
            devicePixelRatio=1,
        )

    def screenshot(self, path: Path) -> Path:
        answer = self.call("browsingContext.captureScreenshot", context=self.context)
        path.write_bytes(base64.b64decode(answer["data"]))
        return path

    def prompts(self) -> list[dict[str, Any]]:
        """Every alert, confirm or prompt the page opened."""
        return [e for e in self.events if e["method"] == "browsingContext.userPromptOpened"]


def _listening_port(process: subprocess.Popen[bytes], announced: Path, workdir: Path) -> int:
    """The port Firefox chose, from the file it writes once its BiDi server listens."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = (workdir / "firefox.log").read_text(errors="replace")
            raise BiDiError(f"firefox exited with {process.returncode}: {log[-2000:]}")
        try:
            port: int = json.loads(announced.read_text())["ws_port"]
            return port
        except (FileNotFoundError, ValueError, KeyError):
            time.sleep(0.05)
    raise BiDiError(f"firefox did not listen within {START_TIMEOUT} s")


def _value(remote: dict[str, Any]) -> Any:
    """A BiDi remote value as Python: primitives, arrays and plain objects."""
    kind = remote["type"]
    if kind in ("undefined", "null"):
        return None
    if kind == "array":
        return [_value(item) for item in remote.get("value", [])]
    if kind == "object":
        return {key: _value(item) for key, item in remote.get("value", [])}
    if kind == "number" and isinstance(remote["value"], str):
        return float(remote["value"].replace("Infinity", "inf"))  # NaN, -0, Infinity
    return remote.get("value", remote)
