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

An NS set in an answer says its owner is a zone's apex.  Written alone under
a recorded name above it, the replay would read it as a delegation (NS below
an apex) and refer every name under it elsewhere; so unless an SOA was
recorded there, the file gives that owner a made-up SOA of its own, and the
replay answers its NS and the names under it authoritatively, as recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.rdataclass
import dns.rdatatype
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from netd.kinds import RunInThread
from netd.services.dns.data import TYPES
from netd.services.dns.live import Saver, rdata_text
from netd.services.dns.local import made_up_soa
from netd.services.dns.wire import SOA, name_to_wire

__all__ = ["Recorded", "Recorder", "read_recorded"]

_SERVED = frozenset(TYPES.values())
_CARRIED = "recorded"
# Ends the made-up SOA lines: read back, they are left out (they are written anew).
_MADE_UP = " ; made up: NS were answered here"

# (owner, type, data) -> TTL: the TTL of the latest answer that carried it.
Recorded = dict[tuple[str, str, str], int]


def read_recorded(text: str) -> Recorded:
    """
    What a recorder wrote to its file (L{Recorder.text}), so a restarted
    daemon adds to it rather than starting it again; ValueError naming the
    line of one it cannot read.
    """
    recorded: Recorded = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith(";") or line.endswith(_MADE_UP):
            continue
        fields = line.split(None, 4)
        if len(fields) < 5 or not fields[1].isdigit() or fields[2] != "IN":
            raise ValueError(f"line {number}: not OWNER TTL IN TYPE DATA, as netd records")
        owner, ttl, _, kind, data = fields
        recorded[owner, kind, data] = int(ttl)
    return recorded


class Recorder(Service):
    """
    Keeps what upstreams answered, each record once, and writes it to C{path}.

    @param carried: the service's L{netd.kinds.BuildContext.carried}: what the
        service this one replaces recorded to the same C{path}, if any.
    @param in_file: what C{path} held when the map was read, started from
        when nothing is carried (at start: a reload carries the records in
        memory, as they may be newer than the file).
    """

    def __init__(
        self,
        path: Path,
        in_thread: RunInThread,
        log: Logger,
        name: str,
        carried: dict[str, Any],
        in_file: Recorded,
        negative_ttl: int,
    ) -> None:
        self.saver = Saver(path, in_thread, log)
        self.negative_ttl = negative_ttl
        self.label = f"netd service {name}"
        self.carried = carried
        previous = carried.get(_CARRIED)
        if isinstance(previous, tuple) and previous[0] == path:
            self.records: Recorded = previous[1]
        else:
            self.records = dict(in_file)

    def startService(self) -> None:
        super().startService()
        # This service now records: a reload hands its records to the next one.
        self.carried[_CARRIED] = (self.saver.path, self.records)

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
        records = sorted(self.records.items())
        with_soa = {owner for (owner, kind, _), _ in records if kind == "SOA"}
        for (owner, kind, _), _ in records:
            if kind == "NS" and owner not in with_soa:
                with_soa.add(owner)
                soa = made_up_soa(name_to_wire(owner), self.negative_ttl)
                lines.append(
                    f"{owner} {self.negative_ttl} IN SOA {rdata_text(SOA, soa)}{_MADE_UP}\n"
                )
        lines += [f"{owner} {ttl} IN {kind} {data}\n" for (owner, kind, data), ttl in records]
        return "".join(lines)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.saver.flushed()
