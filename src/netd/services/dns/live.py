"""
Local records changed while netd runs, by the admin API's C{records} view or
by RFC 2136 UPDATE messages, over the ones the map gives.

A change remembers the map's record set it replaced (its base).  A reload
whose map still has that base keeps the change, however much else changed; a
map that now says something else about the name and type wins, and the change
is dropped.  Every change bumps the serial of its zone's SOA, so secondaries
and clients that watch the serial see it.

With C{persist: FILE} the changes are written back to FILE (JSON, off the
reactor thread, one write at a time) and read again when the daemon starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.names import dns as names
from twisted.python.failure import Failure

from netd.kinds import AdminView, RunInThread, ViewRefused
from netd.records import Record
from netd.schema import ConfigError, ConfigErrors, Position
from netd.services.dns.data import TYPES, DataError, parse_rdata, type_name
from netd.services.dns.local import LocalData, made_up_soa
from netd.services.dns.wire import name_to_text, name_to_wire

__all__ = [
    "Edit",
    "LiveChanges",
    "RecordSet",
    "Records",
    "RecordsService",
    "Saver",
    "records_view",
]

Key = tuple[bytes, int]
RecordSet = tuple[int, tuple[bytes, ...]]
"""A name's records of one type: their TTL and each one's data in wire form."""
Edit = tuple[Key, RecordSet | None]
"""One set to put in place of what a name has of a type (None: remove it)."""

_CARRIED = "dns.live"
_SERIAL = slice(-20, -16)
_BODY = Position("request body", 1, 1)


@attrs.frozen(repr=False)
class Change(Record):
    base: RecordSet | None
    live: RecordSet | None


@attrs.define(repr=False)
class LiveChanges(Record):
    changes: dict[Key, Change] = attrs.field(factory=dict)


class Records:
    """
    The local records as they stand now: the map's, with the live changes over them.

    @ivar local: what the server answers from, rebuilt on every change.
    @param changed: called with the new L{LocalData} after each change.
    @param carried: the service's L{netd.kinds.BuildContext.carried}: the
        changes of the service this one replaces, if any.
    @param persist: C{persist: FILE}, read when nothing is carried (at start:
        a reload carries the changes in memory), written after each change.
    @param emit: journals one changed set.
    @param zones: zones to serve even with no record in the map (those open to
        updates), with a made-up SOA unless a zone above holds them.
    @param prepared: C{configured} as L{LocalData} already, built where the
        map was read (off the reactor thread on a reload).
    """

    def __init__(
        self,
        configured: Sequence[tuple[bytes, int, int, bytes]],
        negative_ttl: int,
        carried: dict[str, Any],
        changed: Callable[[LocalData], None],
        emit: Callable[..., None],
        saver: Saver | None = None,
        zones: Sequence[bytes] = (),
        prepared: LocalData | None = None,
    ) -> None:
        self.configured = configured
        self.negative_ttl = negative_ttl
        self.carried = carried
        self.changed = changed
        self.emit = emit
        self.saver = saver
        mapped = prepared if prepared is not None else LocalData(configured, negative_ttl)
        # A zone open to updates exists even if the map has no name in it yet.
        missing = [z for z in zones if mapped.zone_of(z) is None]
        if missing:
            self.configured = configured = [
                *configured,
                *((z, names.SOA, negative_ttl, made_up_soa(z, negative_ttl)) for z in missing),
            ]
            mapped = LocalData(configured, negative_ttl)
        self.map_sets = dict(_sets(mapped))
        # Zones whose SOA someone wrote (the map, a zone file, update.allow):
        # the others' SOAs are made up, and go with the zone's last record.
        self.written_soas = {owner for owner, rtype, _, _ in configured if rtype == names.SOA}
        previous = carried.get(_CARRIED)
        if isinstance(previous, LiveChanges):
            known = previous.changes
        elif saver is not None and (persisted := read_persisted(saver.path)) is not None:
            known = _read_changes(persisted, saver.path)
        else:
            known = {}
        # The map's own edit of a name and type outranks an older live change,
        # but a zone's serial never goes back: secondaries would stop following.
        self.live = LiveChanges()
        for key, change in known.items():
            base = self.map_sets.get(key)
            if change.base == base:
                self.live.changes[key] = change
            elif key[1] == names.SOA and base is not None and change.live is not None:
                ttl, (soa, *_) = base
                live_serial = _serial(change.live[1][0])
                if _serial(soa) < live_serial:
                    kept = (ttl, (_with_serial(soa, live_serial),))
                    self.live.changes[key] = Change(base, kept)
        self.local = self._build() if self.live.changes else mapped

    def publish(self) -> None:
        """This service now serves: its changes are the ones a reload carries over."""
        self.carried[_CARRIED] = self.live

    def _build(self) -> LocalData:
        changes = self.live.changes
        records = [r for r in self.configured if (r[0], r[1]) not in changes]
        for (owner, rtype), change in changes.items():
            if change.live is not None:
                ttl, rdatas = change.live
                records.extend((owner, rtype, ttl, rdata) for rdata in rdatas)
        return LocalData(records, self.negative_ttl)

    def get(self, owner: bytes, rtype: int) -> RecordSet | None:
        found = self.local.sets.get(owner, {}).get(rtype)
        return None if found is None else (found[0], tuple(found[1]))

    def of_name(self, owner: bytes) -> dict[int, RecordSet]:
        return {t: (ttl, tuple(r)) for t, (ttl, r) in self.local.sets.get(owner, {}).items()}

    def apply(self, edits: Iterable[Edit]) -> list[Edit]:
        """
        Put C{edits} in place together; returns those that changed anything,
        with the SOA serials they bumped.  A zone's SOA cannot be removed
        (RFC 2136 section 3.4.2.4 ignores such a request): callers refuse it.
        """
        done = [(key, value) for key, value in edits if self.get(*key) != value]
        if not done:
            return []
        zones = {self.local.zone_of(owner) for (owner, _), _ in done}
        for key, value in done:
            self._set(key, value)
        local = self._build()
        # A made-up zone left with nothing but its SOA is gone, as if its
        # names had never been given: forwarded again, not NXDOMAIN for good.
        emptied = [
            ((zone, names.SOA), None)
            for zone in sorted(z for z in zones if z is not None and self._emptied(local, z))
        ]
        if emptied:
            for key, value in emptied:
                self._set(key, value)
            done += emptied
            local = self._build()
        zones |= {local.zone_of(owner) for (owner, _), _ in done}
        soas_set = {owner for (owner, rtype), _ in done if rtype == names.SOA}
        bumped = []
        for zone in sorted(z for z in zones if z in local.zones and z not in soas_set):
            ttl, (soa, *_) = local.sets[zone][names.SOA]
            bumped.append(((zone, names.SOA), (ttl, (_with_serial(soa, _next_serial(soa)),))))
        for key, value in bumped:
            self._set(key, value)
        self.local = self._build() if bumped else local
        self.changed(self.local)
        return done + bumped

    def _emptied(self, local: LocalData, zone: bytes) -> bool:
        """Whether C{zone} holds only an SOA that nobody wrote (L{made_up_soa}'s)."""
        node = local.sets.get(zone, {})
        if zone in self.written_soas or set(node) != {names.SOA}:
            return False
        if not _made_up(zone, node[names.SOA][1][0]):
            return False  # PUT by someone: the zone they asked for stays
        return not any(owner != zone and local.zone_of(owner) == zone for owner in local.sets)

    def commit(self, edits: Iterable[Edit], source: str) -> list[Edit]:
        """L{apply}, then journal each set changed and write the persist file."""
        done = self.apply(edits)
        for (owner, rtype), value in done:
            # The event's own "type" is "record": the record's type is "rtype".
            fields: dict[str, Any] = {"name": owner_text(owner), "rtype": type_name(rtype)}
            if value is not None:
                fields.update(ttl=value[0], values=[rdata_text(rtype, r) for r in value[1]])
            self.emit(
                "record", action="remove" if value is None else "set", source=source, **fields
            )
        if done:
            self.save()
        return done

    def save(self) -> None:
        if self.saver is not None:
            self.saver.save(json.dumps(self.as_json(), indent=1) + "\n")

    def _set(self, key: Key, value: RecordSet | None) -> None:
        base = self.map_sets.get(key)
        if value == base:
            self.live.changes.pop(key, None)
        else:
            self.live.changes[key] = Change(base, value)

    def revert(self) -> int:
        """Forget every live change: the map's records again.  How many there were."""
        count = len(self.live.changes)
        if count:
            self.live.changes.clear()
            self.local = self._build()
            self.changed(self.local)
            self.emit("record", action="revert", source="admin", count=count)
            self.save()
        return count

    def as_json(self) -> dict[str, Any]:
        """The live changes, as C{persist: FILE} holds them."""
        return {
            "changes": [
                {
                    "name": owner_text(owner),
                    "type": type_name(rtype),
                    **(
                        {"ttl": None, "values": None}
                        if c.live is None
                        else _set_json(rtype, c.live)
                    ),
                    "map": None if c.base is None else _set_json(rtype, c.base),
                }
                for (owner, rtype), c in sorted(
                    self.live.changes.items(), key=lambda item: (owner_text(item[0][0]), item[0][1])
                )
            ]
        }


def _serial(soa: bytes) -> int:
    return int.from_bytes(soa[_SERIAL], "big")


def _next_serial(soa: bytes) -> int:
    """
    The serial after C{soa}'s, in RFC 1982 arithmetic: 2^32-1 wraps to 1,
    skipping 0, as BIND's increment does.
    """
    return _serial(soa) % (2**32 - 1) + 1


def _with_serial(soa: bytes, serial: int) -> bytes:
    return soa[:-20] + serial.to_bytes(4, "big") + soa[-16:]


def _made_up(zone: bytes, soa: bytes) -> bool:
    """
    Whether C{soa} is L{made_up_soa}'s for C{zone}, whatever its serial and
    its MINIMUM: a persist file keeps the negative_ttl netd had when it made
    the SOA up, and a restart may give another.
    """
    made = made_up_soa(zone, 0)
    return soa[:-20] == made[:-20] and soa[-16:-4] == made[-16:-4]


def _sets(local: LocalData) -> Iterator[tuple[Key, RecordSet]]:
    for owner, node in local.sets.items():
        for rtype, (ttl, rdatas) in node.items():
            yield (owner, rtype), (ttl, tuple(rdatas))


def owner_text(owner: bytes) -> str:
    """A name as the service map writes it: no trailing dot."""
    return name_to_text(owner).rstrip(".") or "."


def rdata_text(rtype: int, rdata: bytes) -> str:
    """One record's data in master-file form, which the map and the view read back."""
    # dnspython writes every type; loaded on the first record shown, not with the kind.
    import dns.exception
    import dns.rdata
    import dns.rdatatype

    try:
        return str(
            dns.rdata.from_wire(
                "IN", dns.rdatatype.RdataType.make(rtype), rdata, 0, len(rdata)
            ).to_text()
        )
    except dns.exception.DNSException:
        return "\\# " + str(len(rdata)) + " " + rdata.hex()


def _set_json(rtype: int, value: RecordSet) -> dict[str, Any]:
    ttl, rdatas = value
    return {"ttl": ttl, "values": [rdata_text(rtype, r) for r in rdatas]}


def set_json(owner: bytes, rtype: int, value: RecordSet) -> dict[str, Any]:
    return {"name": owner_text(owner), "type": type_name(rtype), **_set_json(rtype, value)}


def _read_changes(data: Any, path: Path) -> dict[Key, Change]:
    """The changes in a persist file; ValueError says what is wrong with it."""

    def record_set(rtype: int, entry: Any) -> RecordSet | None:
        if entry is None or entry.get("values") is None:
            return None
        ttl = entry["ttl"]
        if not isinstance(ttl, int) or not 0 <= ttl < 2**31:
            raise ValueError(f"not a TTL: {ttl!r}")
        return ttl, tuple(parse_rdata(rtype, text, None) for text in entry["values"])

    changes = {}
    try:
        for entry in data["changes"]:
            rtype = TYPES[entry["type"].upper()]
            key = (name_to_wire(entry["name"]), rtype)
            changes[key] = Change(record_set(rtype, entry.get("map")), record_set(rtype, entry))
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"{path}: not live record changes: {type(e).__name__}: {e}") from None
    return changes


def read_persisted(path: Path) -> Any:
    """The JSON in C{path}, or None if there is no such file yet."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except ValueError as e:
        raise ValueError(f"{path}: not JSON: {e}") from None


def write_durably(path: Path, text: str) -> None:
    """Replace C{path} with C{text}: a crash leaves the old file or the new, never half."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


class Saver:
    """
    Writes the live changes to C{persist: FILE} in a thread, one write at a
    time; changes made while one is under way are written once it is done,
    newest only.
    """

    def __init__(
        self,
        path: Path,
        in_thread: RunInThread,
        log: Logger,
    ) -> None:
        self.path = path
        self.in_thread = in_thread
        self.log = log
        self.pending: str | None = None
        self.writing: Deferred[None] | None = None
        self.idle: list[Deferred[None]] = []

    def save(self, text: str) -> None:
        self.pending = text
        if self.writing is None:
            self._next()

    def _next(self) -> None:
        text, self.pending = self.pending, None
        if text is None:
            self.writing = None
            idle, self.idle = self.idle, []
            for waiting in idle:
                waiting.callback(None)
            return
        path = self.path
        self.writing = self.in_thread(lambda: write_durably(path, text))
        self.writing.addErrback(self._failed)
        self.writing.addBoth(lambda _: self._next())

    def _failed(self, failure: Failure) -> None:
        self.log.failure("writing live record changes to {path}", failure, path=str(self.path))

    def flushed(self) -> Deferred[None]:
        """Fires once the newest changes are on disk."""
        if self.writing is None:
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        self.idle.append(waiting)
        return waiting


class RecordsService(Service):
    """
    Started with the service: from then on its changes are the ones a reload
    carries over.  Stopping waits for the persist file's last write.
    """

    def __init__(self, records: Records) -> None:
        self.records = records

    def startService(self) -> None:
        super().startService()
        self.records.publish()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        saver = self.records.saver
        return saver.flushed() if saver is not None else succeed(None)


def records_view(records: Records, ttl: int) -> AdminView:
    """
    The C{records} admin view: C{GET .../records[/NAME[/TYPE]]}, C{PUT} a
    set ({type, values, ttl}), C{POST} values to add to a set, C{DELETE} a
    set or a name, C{DELETE .../records} back to the map's.

    @param ttl: the TTL of a new set when the request names none.
    """

    def listing(query: Mapping[str, str]) -> list[dict[str, Any]]:
        wanted = query.get("name")
        owner = _owner(wanted) if wanted is not None else None
        return [
            {**set_json(o, t, value), "live": (o, t) in records.live.changes}
            for (o, t), value in sorted(_sets(records.local))
            if owner is None or o == owner
        ]

    def item(key: str) -> Any:
        owner, rtype = _key(key)
        if rtype is None:
            sets = records.of_name(owner)
            return [set_json(owner, t, v) for t, v in sorted(sets.items())] or None
        value = records.get(owner, rtype)
        return None if value is None else set_json(owner, rtype, value)

    def alone(owner: bytes, rtype: int) -> None:
        # RFC 1034 3.6.2, RFC 2181 10.1: a name with a CNAME has no other data (as
        # UPDATE ignores such an addition, RFC 2136 3.4.2.2); answers would disagree.
        others = set(records.of_name(owner)) - {rtype}
        if names.CNAME in others or (rtype == names.CNAME and others):
            raise ViewRefused(409, "a name with a CNAME has no other records (RFC 1034 3.6.2)")

    def put(key: str, body: Any) -> dict[str, Any]:
        owner, rtype = _key(key)
        rtype, value = _body_set(body, rtype, lambda t: records.get(owner, t), ttl)
        alone(owner, rtype)
        records.commit([((owner, rtype), value)], "admin")
        return set_json(owner, rtype, value)

    def post(body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            raise _invalid("name", "a name to add records to, as in {name, type, values, ttl}")
        owner = _owner(body["name"])
        rtype = _type(body.get("type"))
        alone(owner, rtype)
        old = records.get(owner, rtype)
        _, (new_ttl, rdatas) = _body_set(body, rtype, lambda t: old, ttl)
        merged = (*(old[1] if old else ()), *(r for r in rdatas if not old or r not in old[1]))
        value = (new_ttl, merged)
        records.commit([((owner, rtype), value)], "admin")
        return set_json(owner, rtype, value)

    def remove(key: str) -> Any:
        owner, rtype = _key(key)
        types = [rtype] if rtype is not None else sorted(records.of_name(owner))
        if rtype == names.SOA and records.get(owner, rtype) is not None:
            raise ViewRefused(409, "a zone keeps its SOA: PUT another one instead")
        if rtype is None and names.SOA in types:
            types.remove(names.SOA)  # the apex stays a zone; its other records go
        removed = [set_json(owner, t, v) for t in types if (v := records.get(owner, t))]
        if not removed:
            return None
        records.commit([((owner, t), None) for t in types], "admin")
        return {"removed": removed}

    def clear() -> dict[str, int]:
        return {"reverted": records.revert()}

    return AdminView(list=listing, item=item, clear=clear, post=post, put=put, remove=remove)


def _invalid(path: str, message: str) -> ConfigErrors:
    return ConfigErrors([ConfigError(_BODY, path, message)])


def _owner(text: str) -> bytes:
    try:
        return name_to_wire(text)
    except (ValueError, UnicodeEncodeError):
        raise ViewRefused(400, f"not a domain name: {text!r}") from None


def _type(text: Any) -> int:
    rtype = TYPES.get(text.upper()) if isinstance(text, str) else None
    if rtype is None:
        raise _invalid("type", f"unsupported record type {text!r} (one of {', '.join(TYPES)})")
    return rtype


def _key(key: str) -> tuple[bytes, int | None]:
    name, _, type_text = key.partition("/")
    if "/" in type_text:
        raise ViewRefused(404, "records are .../records/NAME or .../records/NAME/TYPE")
    rtype = None
    if type_text:
        rtype = TYPES.get(type_text.upper())
        if rtype is None:
            raise ViewRefused(404, f"unsupported record type {type_text!r}")
    return _owner(name), rtype


def _body_set(
    body: Any,
    rtype: int | None,
    current: Callable[[int], RecordSet | None],
    default_ttl: int,
) -> tuple[int, RecordSet]:
    """The type and set a PUT or POST body gives ({type, values, ttl}; the path's type if any)."""
    if not isinstance(body, dict):
        raise _invalid("", "a JSON object: {type, values, ttl}")
    errors = []
    if "type" in body or rtype is None:
        body_type = _type(body.get("type"))
        if rtype is not None and body_type != rtype:
            raise _invalid("type", f"{body['type']!r} is not the type in the path")
        rtype = body_type
    old = current(rtype)
    ttl = body.get("ttl", old[0] if old else default_ttl)
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 0 <= ttl < 2**31:
        errors.append(ConfigError(_BODY, "ttl", f"not a TTL in seconds: {ttl!r}"))
    values = body.get("values")
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list) or not values:
        errors.append(
            ConfigError(_BODY, "values", "a list of one or more values (DELETE removes a set)")
        )
        values = []
    rdatas: list[bytes] = []
    for index, text in enumerate(values):
        try:
            if not isinstance(text, str):
                raise DataError(f"not a string: {text!r}")
            rdata = parse_rdata(rtype, text, None)
        except DataError as e:
            errors.append(ConfigError(_BODY, f"values[{index}]", str(e)))
            continue
        if rdata not in rdatas:
            rdatas.append(rdata)
    if errors:
        raise ConfigErrors(errors)
    return rtype, (ttl, tuple(rdatas))
