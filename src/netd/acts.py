"""
The generic acts of rules (L{netd.rules}), carried out on a connection.

    delay: 3          # seconds before the answer (or before the greeting, at connect)
    throttle: 2048    # bytes/s for the rest of the reply
    reset: true       # RST: SO_LINGER 0, what abortConnection does
    close: true       # FIN instead of the answer; close: N lets N bytes of it out first
    stall: true       # never answer (the service's idle_timeout still ends it)
    drop: true        # a datagram, unanswered

Throttling and the partial answer shape what the connection's wrapper
(L{netd.connections.TrackedConnection}) writes: its C{shape} installs a
L{Shaper} for the connection's writes, and removes it when it is no longer
needed, so an unshaped connection pays nothing for it.  Each act is the same
on every kind; a kind's own acts (a reply) come through the C{answer} it hands
to L{perform}.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred

__all__ = ["Shaper", "perform"]

# What a throttled connection holds before it stops its producer and its reading.
_HIGH_WATER = 64 * 1024
_LOW_WATER = 16 * 1024
# A throttle sends in steps of this many seconds' worth (at least a byte).
_STEP = 0.05


def perform(
    acts: Mapping[str, Any],
    clock: Any,
    transport: Any,
    proceed: Callable[[], None],
    answer: Callable[[], None] | None = None,
) -> Deferred[None]:
    """
    Carry out a fired rule's acts on the connection C{transport}.

    After C{delay} seconds: C{reset} aborts the connection; C{stall} and
    C{drop} do nothing, ever; otherwise C{throttle} and C{close: N} shape what
    follows, then C{answer} (the rule's own reply) or C{proceed} (the kind's
    usual answer) runs, unless C{close: true} closes instead of the kind's
    usual answer (after the rule's own, if it has one).

    Fires once C{answer} or C{proceed} has run; never for C{reset}, C{stall}
    and C{drop}: a kind that holds its input until then holds it for good.
    """
    done: Deferred[None] = Deferred()

    def go() -> None:
        if getattr(transport, "closed", False):
            return
        if acts.get("reset"):
            transport.abortConnection()
            return
        if acts.get("stall") or acts.get("drop"):
            return
        close = acts.get("close")
        rate = acts.get("throttle")
        budget = close if close is not None and close is not True else None
        if rate is not None or budget is not None:
            shape = getattr(transport, "shape", None)
            if shape is not None:
                shape(clock, rate, budget)
        if close is True and answer is None:
            transport.loseConnection()
            return
        (answer or proceed)()
        if close is True:
            transport.loseConnection()
        done.callback(None)

    delay = acts.get("delay")
    if delay:
        clock.callLater(delay, go)
        return done
    go()
    return done


class Shaper:
    """
    Paces and cuts what one connection writes.

    It is also the streaming producer of the transport under it, while that
    slot is free: a client that stops reading fills the transport's buffer,
    which pauses the pacing and the connection's own streaming producer, so
    what the connection writes next waits in the queue, and past its high
    water its reading pauses too (back-pressure: netd does not keep reading
    the source at the rate, nor a budget's worth of it without one, for a
    client that takes nothing).

    @ivar rate: bytes a second, or L{None} for no pacing.
    @ivar budget: bytes still let out before the connection is closed (FIN),
        or L{None}.
    """

    def __init__(
        self,
        clock: Any,
        consumer: Any,
        send: Callable[[bytes], None],
        lose: Callable[[], None],
        pause: Callable[[], None],
        resume: Callable[[], None],
        done: Callable[[], None],
    ) -> None:
        self.clock = clock
        self._send = send
        self._lose = lose
        self._pause_reading = pause
        self._resume_reading = resume
        self._done = done
        self.rate: int | None = None
        self.budget: int | None = None
        self.queue = bytearray()
        self.ending = False
        self.lose_when_sent = False
        self.released = False
        # Bytes at the queue's head still paced since the release, or None
        # while all of it is: what the next reply writes behind them is not.
        self._paced: int | None = None
        self.stopped = False
        self.producer: Any = None
        self.streaming = False
        self._paused = False
        # Whether the streaming producer is paused by this shaper.
        self._producer_held = False
        self._tokens = 0.0
        self._last = 0.0
        self._timer: Any = None
        self._consumer = consumer
        self._attached = False
        # When the transport under it paused the pacing, or None.
        self.blocked_since: float | None = None
        self._attach()

    def set(self, rate: int | None, budget: int | None) -> None:
        if rate is not None:
            self.rate = rate
            self._tokens = self._step()
            self._last = self.clock.seconds()
            self.released = False
            self._paced = None
        if budget is not None:
            self.budget = budget
            if budget == 0:
                self._end()

    def _step(self) -> float:
        return max(1.0, (self.rate or 1) * _STEP)

    # -- the connection's writes --------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.ending or self.stopped or not data:
            return
        budget = self.budget
        if budget is not None:
            if len(data) >= budget:
                data = data[:budget]
                self.budget = 0
                self.ending = True
            else:
                self.budget = budget - len(data)
        if self.rate is None:
            self._send(data)
            if self.producer is not None and not self.streaming and self._timer is None:
                # A pull producer (a file) is asked for the rest of the budget
                # on the next turn, as the transport would ask it (a budget
                # alone bounds what is written ahead of the socket).
                self._timer = self.clock.callLater(0, self._pump)
        else:
            if not self.queue:
                self._credit_idle()
            self.queue += data
            if self._timer is None:
                # On the next turn: a pull producer writing from its
                # resumeProducing must not be asked again from inside it.
                self._timer = self.clock.callLater(0, self._pump)
            self._pressure(ask=False)
        if self.ending and not self.queue:
            self._end()

    def write_sequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def flush(self) -> None:
        """
        Send what waits now, whatever the rate: the reply before TLS starts
        (STARTTLS's 220, AUTH TLS's 234) must leave in plaintext, and queued
        behind the rate it would follow the handshake, encrypted, and the
        client waiting for it would never start one (RFC 3207 4, RFC 4217 4).
        """
        if self.queue and not self.stopped:
            waiting = bytes(self.queue)
            self.queue.clear()
            if self._paced is not None:
                self._paced = 0
            self._send(waiting)
            self._pressure()

    def lose_connection(self) -> None:
        if self.queue:
            self.lose_when_sent = True
        else:
            self._detach()
            self._lose()

    def register_producer(self, producer: Any, streaming: bool) -> None:
        self.producer, self.streaming = producer, streaming
        self._producer_held = False
        if not streaming:
            producer.resumeProducing()
        self._hold_producer()

    def unregister_producer(self) -> None:
        self.producer = None

    def adopt_producer(self, producer: Any, streaming: bool) -> None:
        """
        Take over the producer the connection registered on the transport
        before this shaper came.  The transport may have paused it and will
        not resume it: the next turn resumes it (or asks it for more) unless
        this shaper holds it back; not this turn, inside the rule's firing.
        """
        self.producer, self.streaming = producer, streaming
        self._producer_held = streaming
        if self._timer is None:
            self._timer = self.clock.callLater(0, self._pump)

    def release(self, written: bool = False) -> None:
        """
        Pace no more once what is queued is sent, and cut nothing more (the end
        of a shaped reply: a budget it did not spend is not the next reply's).

        @param written: the reply's bytes were all written (HTTP/1.x): what
            is written after them, the next reply's, leaves unpaced once they
            are out, where it would wait behind them at the rate.  Otherwise
            (HTTP/2, whose frames leave on later turns) the rate holds while
            bytes are queued.
        """
        self.released = True
        if written and self._paced is None:
            self._paced = len(self.queue)
        if not self.ending:
            self.budget = None
        if not self.queue:
            self._uninstall_if_idle()

    # -- the transport's back-pressure (IPushProducer) -----------------------------

    def pauseProducing(self) -> None:
        self.blocked_since = self.clock.seconds()
        self._hold_producer()

    def resumeProducing(self) -> None:
        if self.blocked_since is None:
            return
        self.blocked_since = None
        if self.queue and self.rate is not None:
            self._credit_idle()
        if self._timer is None and not self.stopped:
            self._timer = self.clock.callLater(0, self._pump)
        self._hold_producer()

    def stopProducing(self) -> None:
        self._attached = False  # the transport is gone, and with it its producer
        self.lost()

    def lost(self) -> None:
        """The connection is gone: its producer is told, as the transport tells its own."""
        self.stop()
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()

    def _attach(self) -> None:
        """Follow the transport's back-pressure, unless a producer of its own has it."""
        consumer = self._consumer
        if getattr(consumer, "producer", None) is None:
            self._attached = True
            consumer.registerProducer(self, True)

    def _detach(self) -> None:
        """
        Before the close (a transport with a paused producer resumes it when
        its buffer drains instead of closing) and once uninstalled.
        """
        if self._attached:
            self._attached = False
            self.blocked_since = None
            self._consumer.unregisterProducer()

    def stop(self) -> None:
        """The connection is gone."""
        self.stopped = True
        self.queue.clear()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # -- pacing ----------------------------------------------------------------------

    def _pump(self) -> None:
        self._timer = None
        if self.stopped or self.blocked_since is not None:
            return  # resumeProducing pumps again
        rate = self.rate or 1
        now = self.clock.seconds()
        step = self._step()
        # A late timer's time is not lost: what it owes is sent now.
        self._tokens += (now - self._last) * rate
        self._last = now
        paced = len(self.queue) if self._paced is None else self._paced
        count = min(int(self._tokens), paced)
        self._tokens -= count
        paced -= count
        if self._paced is not None:
            self._paced = paced
            if not paced:
                count = len(self.queue)
        if count:
            chunk = bytes(self.queue[:count])
            del self.queue[:count]
            self._send(chunk)
        if self.queue:
            wanted = min(paced, step) - self._tokens
            self._timer = self.clock.callLater(max(wanted / rate, 0.001), self._pump)
        self._pressure()
        if not self.queue:
            if self.ending:
                self._end()
            elif self.lose_when_sent:
                self._detach()
                self._lose()
            elif self.released:
                self._uninstall_if_idle()

    def _pressure(self, ask: bool = True) -> None:
        queued = len(self.queue)
        if queued > _HIGH_WATER and not self._paused:
            self._paused = True
            self._pause_reading()
        elif queued < _LOW_WATER:
            if self._paused:
                self._paused = False
                self._resume_reading()
            if ask and self.producer is not None and not self.streaming:
                self.producer.resumeProducing()
        self._hold_producer()

    def _hold_producer(self) -> None:
        """
        A streaming producer pauses while the queue is past its high water or
        the transport is full (what a budget alone lets out goes straight to
        it), and resumes when neither is.
        """
        held = self._paused or self.blocked_since is not None
        producer = self.producer
        if producer is not None and self.streaming and held != self._producer_held:
            self._producer_held = held
            if held:
                producer.pauseProducing()
            else:
                producer.resumeProducing()

    def _end(self) -> None:
        self.ending = True
        self.stop()
        self._detach()
        self._lose()

    def _uninstall_if_idle(self) -> None:
        # A producer goes back to the transport: not while this shaper holds it back.
        if (
            self.stopped
            or self.budget is not None
            or self._paused
            or self.blocked_since is not None
        ):
            return
        self.rate = None
        self._detach()
        self._hold_producer()  # one it took over paused goes back running
        # Then it acts no more: the rest of a turn of its own (the pump that asked
        # the producer whose end ended the reply) must not uninstall the shaper
        # that the next reply's rule installed meanwhile (HTTP/1.1 pipelining).
        self.stop()
        self._done()

    def _credit_idle(self) -> None:
        """Credit earned while idle or held back is at most one step: no burst after a pause."""
        now = self.clock.seconds()
        self._tokens = min(self._step(), self._tokens + (now - self._last) * (self.rate or 1))
        self._last = now
