"""
C{record_to: FILE}: every forwarded answer's records written to FILE as an
RFC 1035 master file (names, types and TTLs as the upstream gave them), so
that a later map can list FILE under C{zone_files} and answer the same names
with no upstream at all: a hermetic replay of what a program looked up.

Only the types local data serves (L{netd.services.dns.data.TYPES}) are
written; negative answers are not (a zone file cannot say "this name does not
exist" outside its own zone).  FILE is rewritten whole, in a thread, after
each new record; every name in it is absolute, so its file name (the origin
of a zone file netd reads) only names a zone of its own that holds nothing.
"""

from __future__ import annotations

from pathlib import Path

import dns.exception
import dns.message
import dns.rdataclass
import dns.rdatatype
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from netd.kinds import RunInThread
from netd.services.dns.data import TYPES
from netd.services.dns.live import Saver

__all__ = ["Recorder"]

_SERVED = frozenset(TYPES.values())


class Recorder(Service):
    """Keeps what upstreams answered, each record once, and writes it to C{path}."""

    def __init__(self, path: Path, in_thread: RunInThread, log: Logger, name: str) -> None:
        self.saver = Saver(path, in_thread, log)
        self.label = f"netd service {name}"
        # (owner, type, data) -> TTL: the TTL of the latest answer that carried it.
        self.records: dict[tuple[str, str, str], int] = {}

    def add(self, reply: bytes) -> None:
        try:
            message = dns.message.from_wire(reply)
        except dns.exception.DNSException:
            return
        changed = False
        for rrset in message.answer:
            if rrset.rdtype not in _SERVED or rrset.rdclass != dns.rdataclass.IN:
                continue
            owner = rrset.name.to_text().lower()
            kind = dns.rdatatype.to_text(rrset.rdtype)
            for rdata in rrset:
                key = (owner, kind, rdata.to_text())
                if self.records.get(key) != rrset.ttl:
                    self.records[key] = rrset.ttl
                    changed = True
        if changed:
            self.saver.save(self.text())

    def text(self) -> str:
        lines = [
            f"; recorded by {self.label}: list this file under zone_files to replay it\n",
        ]
        lines += [
            f"{owner} {ttl} IN {kind} {data}\n"
            for (owner, kind, data), ttl in sorted(self.records.items())
        ]
        return "".join(lines)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.saver.flushed()
