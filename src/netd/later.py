"""
Answering a twisted.web request later: once a Deferred fires, and not at all
once its client has gone (the work is then cancelled).  The admin API and the
dashboard answer so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request

__all__ = ["answer_later", "finish"]

log = Logger(namespace="netd.admin")

_INTERNAL_ERROR = b'{"error": "internal error"}\n'


def answer_later(
    request: Request,
    pending: Deferred[Any],
    respond: Callable[[Any], None],
    expected: tuple[type[BaseException], ...] = (),
    what: str = "admin request failed",
) -> int:
    """
    Call C{respond} with C{pending}'s result, or with its L{Failure} when that
    is one of the C{expected} kinds (a refusal to answer as such); any other
    failure is logged as C{what} and answered 500.  C{respond} writes and
    finishes the answer (L{finish}).  Returns L{NOT_DONE_YET} for C{render}.
    """
    gone: list[bool] = []

    def answered(result: Any) -> None:
        if not gone:
            respond(result)

    def failed(failure: Failure) -> None:
        if failure.check(CancelledError):
            return
        if expected and failure.check(*expected) is not None:
            answered(failure)
            return
        log.failure(what, failure)
        if gone:
            return
        request.setResponseCode(500)
        request.setHeader(b"Content-Type", b"application/json")
        finish(request, _INTERNAL_ERROR)

    def client_left(reason: Failure) -> None:
        gone.append(True)
        pending.cancel()

    request.notifyFinish().addErrback(client_left)
    pending.addCallback(answered).addErrback(failed)
    return NOT_DONE_YET


def finish(request: Request, body: bytes) -> None:
    """Finish an answer given later, with its length; a HEAD request gets no body."""
    request.setHeader(b"Content-Length", b"%d" % len(body))
    if request.method != b"HEAD":
        request.write(body)
    request.finish()
