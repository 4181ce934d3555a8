"""
The smtp kind's durable spool: one file per accepted message, fsync'd before
the server answers C{250}.

A spool file is one line of JSON (the envelope, with the message's size) and
then the message itself.  A file whose length does not match its envelope is
damaged: its message was never acknowledged (the 250 waits for the sync), so
it is never listed or delivered, and recovery removes it once it is old.
Each file is written and synced in its own thread, so the syncs of concurrent
sessions overlap and the file system commits them together; the threads are
the spool's own (L{Writers}), not the reactor's pool.  (Grouping the
folder syncs on top, one for all files created meanwhile, measured 15-25%
slower here: after a create, a folder sync finds its commit already done.  A
whole group commit, the messages that end while one group is being synced
written and synced together by one thread call, measured 2.5-6x slower in
three interleaved rounds on 2026-12-03 with 8 smtplib connections: the file
system already commits concurrent syncs together, and a group waits for the
one before it.)
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from queue import SimpleQueue
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from netd.kinds import RunInThread
from netd.records import Record
from netd.services.smtp import extract

__all__ = [
    "HEAD_BYTES",
    "Envelope",
    "Notify",
    "RetryState",
    "Spool",
    "Writers",
    "new_id",
    "writers_for",
]

_SUFFIX = ".msg"
_TEMPORARY = ".tmp"
# Where a queued message's retries have got to, beside it: attempts and when the next is due.
_RETRY = ".retry"
# A damaged or temporary file older than this was left by a crash.
_ABANDONED = 3600.0
# How much of a message recovery reads back for its headers.
HEAD_BYTES = 64 * 1024
_MAGIC = b"NETD-SPOOL-1 "
# Files written and synced at once, at most: each sync blocks its thread, and
# concurrent syncs are what the file system commits together.
_MOST_WRITERS = 10


_PROCESS = secrets.token_hex(3)
_COUNTER = itertools.count()


def new_id(now: float) -> str:
    """
    Sortable by arrival (milliseconds first) and unique: a counter and a random
    tag per process (a restart within the same millisecond starts a new tag).
    """
    return f"{int(now * 1000):012x}{_PROCESS}{next(_COUNTER) & 0xFFFFFF:06x}"


@attrs.frozen(repr=False)
class Notify(Record):
    """
    One recipient's DSN request (RFC 3461 4).

    @ivar notify: when to report (C{SUCCESS}, C{FAILURE}, C{DELAY}), or
        C{("NEVER",)}; None when RCPT did not say (failures are reported).
    @ivar orcpt: the original recipient as given, C{addr-type;address} with
        the xtext decoded.
    """

    notify: tuple[str, ...] | None = None
    orcpt: str | None = None

    def wants(self, what: str) -> bool:
        return what == "FAILURE" if self.notify is None else what in self.notify

    def as_json(self) -> dict[str, Any]:
        return {"notify": None if self.notify is None else list(self.notify), "orcpt": self.orcpt}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Notify:
        notify = data.get("notify")
        orcpt = data.get("orcpt")
        return cls(
            notify=None if notify is None else tuple(str(n) for n in notify),
            orcpt=None if orcpt is None else str(orcpt),
        )


_NO_REQUEST = Notify()


@attrs.frozen(repr=False)
class RetryState(Record):
    """
    Where a queued message's retries have got to.

    @ivar attempts: how many have been made.
    @ivar due: when the next is (epoch seconds).
    @ivar warned: the sender has had its delay report (RFC 3461 NOTIFY=DELAY):
        one a message, however long it waits.
    """

    attempts: int
    due: float
    warned: bool = False


@attrs.frozen(repr=False)
class Envelope(Record):
    """
    What SMTP said about a message, besides the message.

    @ivar sender: the reverse path, C{""} for the null sender (bounces).
    @ivar recipients: the forward paths still to deliver, in RCPT order.
    @ivar received: when it was accepted (epoch seconds).
    @ivar size: the message's length in bytes, which recovery checks.
    @ivar bounce: whether this message is a delivery status notification netd wrote.
    @ivar utf8: it came with SMTPUTF8 (RFC 6531), and goes on with it.
    @ivar binary: it came with BODY=BINARYMIME (RFC 3030 3): a release makes it
        7-bit first (L{netd.services.smtp.mime.seven_bit}).
    @ivar eight_bit: it came with BODY=8BITMIME (RFC 6152), and goes on with
        it; 8-bit octets in it go only to a next hop that offers 8BITMIME.
    @ivar ret: DSN's C{FULL} or C{HDRS} (RFC 3461 4.3): what a report quotes.
    @ivar envid: DSN's envelope id, xtext decoded (RFC 3461 4.4).
    @ivar dsn: the recipients' DSN requests, by address, for those that made one.
    """

    id: str
    sender: str
    recipients: tuple[str, ...]
    received: float
    size: int
    client: str = ""
    helo: str = ""
    user: str | None = None
    bounce: bool = False
    utf8: bool = False
    ret: str | None = None
    envid: str | None = None
    dsn: Mapping[str, Notify] = attrs.field(factory=dict, hash=False)
    binary: bool = False
    eight_bit: bool = False

    def notify(self, recipient: str) -> Notify:
        return self.dsn.get(recipient, _NO_REQUEST)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "from": self.sender,
            "to": list(self.recipients),
            "received": self.received,
            "size": self.size,
            "client": self.client,
            "helo": self.helo,
            "user": self.user,
            "bounce": self.bounce,
            "smtputf8": self.utf8,
            "binarymime": self.binary,
            "8bitmime": self.eight_bit,
            "ret": self.ret,
            "envid": self.envid,
            "dsn": {recipient: notify.as_json() for recipient, notify in self.dsn.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Envelope:
        return cls(
            id=str(data["id"]),
            sender=str(data["from"]),
            recipients=tuple(str(r) for r in data["to"]),
            received=float(data["received"]),
            size=int(data["size"]),
            client=str(data.get("client", "")),
            helo=str(data.get("helo", "")),
            user=data.get("user"),
            bounce=bool(data.get("bounce", False)),
            utf8=bool(data.get("smtputf8", False)),
            ret=data.get("ret"),
            envid=data.get("envid"),
            dsn={str(r): Notify.from_json(n) for r, n in (data.get("dsn") or {}).items()},
            binary=bool(data.get("binarymime", False)),
            eight_bit=bool(data.get("8bitmime", False)),
        )


def _encode(envelope: Envelope) -> bytes:
    return _MAGIC + json.dumps(envelope.as_json(), separators=(",", ":")).encode() + b"\n"


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(directory: Path, envelope: Envelope, data: bytes) -> None:
    """
    Runs in a thread: the file created, written and synced, then its folder.
    Creating the file under its final name puts
    its folder entry in the same journal commit as its data on ext4, so the
    folder sync that POSIX asks for costs little (a rename after the sync would
    need a commit of its own: 15-50% fewer messages a second, measured here).
    """
    path = directory / (envelope.id + _SUFFIX)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        try:
            view = memoryview(_encode(envelope) + data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_directory(directory)
    except OSError:
        # Not acknowledged (the client hears 451): a whole file left behind would
        # be listed and delivered after a restart, a copy of what the client resends.
        path.unlink(missing_ok=True)
        raise


def _read_header(path: Path) -> tuple[Envelope, bytes] | None:
    """
    The envelope and the start of the message of a complete spool file, or
    None for a torn or foreign one.
    """
    try:
        with path.open("rb") as f:
            # netd's own file: the envelope line is read whole, however many
            # recipients it lists (a cut one would look torn and be removed).
            line = f.readline()
            length = os.fstat(f.fileno()).st_size
            start = f.read(HEAD_BYTES)
        if not line.startswith(_MAGIC) or not line.endswith(b"\n"):
            return None
        envelope = Envelope.from_json(json.loads(line[len(_MAGIC) :]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if envelope.id + _SUFFIX != path.name or length != len(line) + envelope.size:
        return None
    return envelope, start


def _check(directory: Path) -> None:
    # Nothing is made here: a reload undone after its checks would leave the
    # folder behind.  The nearest folder that is there must take what start-up
    # makes in it (_recover), or be the spool itself, readable and writable.
    nearest = directory
    while not os.path.lexists(nearest):
        nearest = nearest.parent
    if nearest == directory:
        os.listdir(directory)
    elif not nearest.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(nearest))
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(nearest))


def _recover(directory: Path, now: float) -> list[tuple[Envelope, bytes]]:
    directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    found = []
    removed = False
    for path in sorted(directory.iterdir()):
        if not path.name.endswith((_SUFFIX, _TEMPORARY)):
            continue
        entry = _read_header(path) if path.name.endswith(_SUFFIX) else None
        if entry is not None:
            found.append(entry)
        elif path.stat().st_mtime < now - _ABANDONED:
            # Never acknowledged (the 250 waits for the complete file), and
            # left by a crash: a young one may be a message another service
            # is writing just now (a reload's old one, still taking mail).
            path.unlink(missing_ok=True)
            removed = True
    if removed:
        _fsync_directory(directory)
    return found


def _read_message(path: str | Path, size: int = -1) -> bytes | None:
    """A message's octets (its first C{size}, if given), None once it is gone."""
    try:
        with open(path, "rb") as f:
            f.readline()
            return f.read(size)
    except FileNotFoundError:
        return None


def _containing(directory: Path, ids: list[str], needle: str) -> list[str]:
    found = []
    for id in ids:
        data = _read_message(directory / (id + _SUFFIX), extract.SEARCHED)
        if data is not None and needle in extract.text(data).lower():
            found.append(id)
    return found


def _remove(directory: Path, ids: list[str]) -> None:
    # No folder sync: a removal lost in a crash only means a second delivery,
    # which SMTP's at-least-once promise allows.
    for id in ids:
        (directory / (id + _SUFFIX)).unlink(missing_ok=True)
        (directory / (id + _RETRY)).unlink(missing_ok=True)


def _save_retry(directory: Path, id: str, state: RetryState) -> None:
    """
    Replace a message's retry state atomically.  Not synced: a state lost in
    a crash only means an earlier attempt (or a second delay report), and a
    deferral costs no fsync.
    """
    if not (directory / (id + _SUFFIX)).exists():
        return  # delivered or deleted meanwhile
    temporary = directory / (id + _RETRY + _TEMPORARY)
    temporary.write_text(
        json.dumps({"attempts": state.attempts, "due": state.due, "warned": state.warned})
    )
    os.replace(temporary, directory / (id + _RETRY))


def _retries(directory: Path) -> dict[str, RetryState]:
    found = {}
    for path in directory.glob("*" + _RETRY):
        id = path.name[: -len(_RETRY)]
        try:
            saved = json.loads(path.read_text())
            found[id] = RetryState(
                int(saved["attempts"]), float(saved["due"]), bool(saved.get("warned", False))
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            found.pop(id, None)
        if not (directory / (id + _SUFFIX)).exists():
            path.unlink(missing_ok=True)  # its message left while the state was written
            found.pop(id, None)
    return found


def _replace(directory: Path, envelope: Envelope) -> None:
    """Rewrite a message's envelope (fewer recipients left) atomically."""
    path = directory / (envelope.id + _SUFFIX)
    data = _read_message(path)
    if data is None:
        return
    temporary = directory / (envelope.id + _TEMPORARY)
    with temporary.open("wb") as f:
        f.write(_encode(envelope) + data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    _fsync_directory(directory)


class Writers:
    """
    Threads of the spool's own that write and sync message files, one file a
    thread at a time, so the syncs of concurrent sessions overlap as in the
    reactor's pool.  Twisted's pool hands each call over through its team
    coordinator, a Python Queue and a context call, and each result back with
    a callFromThread of its own; these take a job from a C SimpleQueue and
    hand back every file finished before the reactor looks in one call: 15%
    less of netd's CPU a message at 4 smtplib connections (0.49 against 0.57
    ms, medians of three alternating rounds, bench/smtp_bench.py's load).

    A thread is started when more files are on their way than there are
    threads, up to L{_MOST_WRITERS}; they finish what they hold and end at the
    reactor's shutdown, as the reactor's pool does.
    """

    def __init__(self, reactor: Any, most: int = _MOST_WRITERS) -> None:
        self._reactor = reactor
        self._most = most
        self._jobs: SimpleQueue[tuple[Callable[[], None], Deferred[None]] | None] = SimpleQueue()
        self._finished: list[tuple[Deferred[None], Failure | None]] = []
        self._finished_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        # Files handed over and not yet answered: counted on the reactor thread only.
        self._owed = 0
        reactor.addSystemEventTrigger("during", "shutdown", self._stop)

    def __call__(self, work: Callable[[], None]) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        self._jobs.put((work, done))
        self._owed += 1
        if self._owed > len(self._threads) and len(self._threads) < self._most:
            thread = threading.Thread(target=self._serve, name="netd-spool", daemon=True)
            self._threads.append(thread)
            thread.start()
        return done

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            work, done = job
            failure = None
            try:
                work()
            except Exception:
                failure = Failure()
            with self._finished_lock:
                self._finished.append((done, failure))
                first = len(self._finished) == 1
            if first:
                self._reactor.callFromThread(self._answer)

    def _answer(self) -> None:
        with self._finished_lock:
            finished, self._finished = self._finished, []
        self._owed -= len(finished)
        for done, failure in finished:
            if failure is None:
                done.callback(None)
            else:
                done.errback(failure)

    def _stop(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()
        self._threads.clear()


# One set of writers a reactor: services come and go with reloads, the threads stay.
_WRITERS: dict[Any, Writers] = {}


def writers_for(reactor: Any) -> Writers:
    found = _WRITERS.get(reactor)
    if found is None:
        found = _WRITERS[reactor] = Writers(reactor)
    return found


class Spool:
    """
    The message files of one service, all file work in threads.

    @ivar run: runs a callable in a thread and returns a Deferred of its result
        (the reactor's thread pool in netd; a synchronous stand-in in unit tests).
    @ivar write: what L{store} writes and syncs a message in: L{Writers} in
        netd, C{run} unless given.
    """

    def __init__(self, directory: Path, run: RunInThread, write: RunInThread | None = None) -> None:
        self.directory = directory
        self.run = run
        self.write = run if write is None else write

    def check(self) -> Deferred[None]:
        """Fails if the folder could not be made, or cannot be listed or written to."""
        return self.run(lambda: _check(self.directory))

    def recover(self) -> Deferred[list[tuple[Envelope, bytes]]]:
        """
        Every complete message on disk with its first L{HEAD_BYTES}; torn ones
        are removed.
        """
        now = time.time()
        return self.run(lambda: _recover(self.directory, now))

    def store(self, envelope: Envelope, data: bytes) -> Deferred[None]:
        """
        Fires once the message and its envelope are on disk and synced.  Each
        message syncs in its own thread, so the syncs of concurrent sessions
        overlap and the file system commits them together.
        """
        stored: Deferred[None] = self.write(lambda: _write_file(self.directory, envelope, data))
        return stored

    def read(self, id: str) -> Deferred[bytes | None]:
        return self.run(lambda: _read_message(self.directory / (id + _SUFFIX)))

    def read_many(self, ids: Iterable[str]) -> Deferred[list[bytes | None]]:
        """
        Several messages in one thread call: a FETCH of many pays one hop, not
        one each.  Their paths are plain strings: a C{Path} made and opened a
        message was a twentieth of the CPU a bulk IMAP FETCH costs.
        """
        folder = os.path.join(self.directory, "")
        paths = [folder + id + _SUFFIX for id in ids]
        return self.run(lambda: [_read_message(path) for path in paths])

    def containing(self, ids: Iterable[str], needle: str) -> Deferred[list[str]]:
        """
        The ids, in order, of the messages whose text (L{extract.text}) holds
        C{needle} (lower case), as read in their first L{extract.SEARCHED} octets.
        """
        listed = list(ids)
        return self.run(lambda: _containing(self.directory, listed, needle))

    def remove(self, ids: Iterable[str]) -> Deferred[None]:
        listed = list(ids)
        return self.run(lambda: _remove(self.directory, listed))

    def replace(self, envelope: Envelope) -> Deferred[None]:
        return self.run(lambda: _replace(self.directory, envelope))

    def save_retry(self, id: str, state: RetryState) -> Deferred[None]:
        """Keep where a queued message's retries have got to."""
        return self.run(lambda: _save_retry(self.directory, id, state))

    def retries(self) -> Deferred[dict[str, RetryState]]:
        """Every queued message's retry state, by id."""
        return self.run(lambda: _retries(self.directory))
