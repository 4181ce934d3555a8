"""The admin resource with twisted.web's DummyRequest: what happens when a client hangs up."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from netd.admin import AdminResource
from netd.events import Journal
from netd.runtime import ReloadResult


class FakeDaemon:
    def __init__(self) -> None:
        self.ready = True
        self.journal = Journal(Clock())
        self.services_by_name: dict[str, Any] = {}
        self.reloads: list[Deferred[ReloadResult]] = []

    def reload(self) -> Deferred[ReloadResult]:
        self.reloads.append(Deferred())
        return self.reloads[-1]

    def describe(self) -> dict[str, Any]:
        return {}


def request(path: bytes, method: bytes = b"GET") -> DummyRequest:
    dummy = DummyRequest(path.lstrip(b"/").split(b"/"))
    dummy.method = method
    return dummy


def test_a_reload_goes_on_when_its_client_hangs_up() -> None:
    daemon = FakeDaemon()
    resource = AdminResource(daemon, None, dict)  # type: ignore[arg-type]
    hung_up = request(b"/api/reload", b"POST")
    resource.render(hung_up)
    hung_up.processingFailed(Failure(ConnectionDone()))
    [reload] = daemon.reloads
    cancelled: list[bool] = []
    reload.addErrback(lambda failure: cancelled.append(True))
    reload.callback(ReloadResult(restarted=("web",)))
    assert not cancelled and hung_up.written == []  # finished the reload, told nobody

    answered = request(b"/api/reload", b"POST")
    resource.render(answered)
    daemon.reloads[-1].callback(ReloadResult(errors=("bad",)))
    assert answered.responseCode == 400
    assert json.loads(b"".join(answered.written)) == {"errors": ["bad"]}


def test_a_long_poll_is_dropped_when_its_client_hangs_up() -> None:
    daemon = FakeDaemon()
    resource = AdminResource(daemon, None, dict)  # type: ignore[arg-type]
    waiting = request(b"/api/events")
    waiting.addArg(b"wait", b"30")
    resource.render(waiting)
    waiting.processingFailed(Failure(ConnectionDone()))
    daemon.journal.emit("echo", "connection.opened")
    assert waiting.written == []
    # The waiter is gone, so the next matching event wakes only new clients.
    assert daemon.journal._waiters == []
