"""The dns kind's keys, read from the service map."""

from __future__ import annotations

import base64
import binascii
import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import attrs
import yaml
from twisted.names import dns

from netd.config import TLSProfiles
from netd.records import Record
from netd.schema import LOOPBACK, Network, Section, Value
from netd.services.dns.data import (
    TYPES,
    DataError,
    parse_hosts,
    parse_master_file,
    parse_rdata,
    reverse_name,
)
from netd.services.dns.forward import STRATEGIES, Upstream, certificates
from netd.services.dns.local import LocalData, made_up_soa
from netd.services.dns.wire import (
    EDNS_PAYLOAD,
    name_to_wire,
)

if TYPE_CHECKING:
    from netd.services.dns.record import Recorded

__all__ = ["ALGORITHMS", "CacheOptions", "Options", "TSIGKey", "UpdateOptions", "parse"]

ALGORITHMS = ("hmac-sha1", "hmac-sha224", "hmac-sha256", "hmac-sha384", "hmac-sha512")

T = TypeVar("T")


@attrs.frozen(repr=False)
class CacheOptions(Record):
    size: int = 10000
    max_ttl: int = 86400
    negative_ttl: int = 300


@attrs.frozen(repr=False)
class TSIGKey(Record):
    name: str
    algorithm: str
    secret: bytes = attrs.field(repr=False)


@attrs.frozen(repr=False)
class UpdateOptions(Record):
    keys: tuple[TSIGKey, ...] = ()
    allow: tuple[bytes, ...] = ()


def parse_update(value: Value) -> UpdateOptions:
    section = value.section()
    keys = []
    keys_value = section.get("keys")
    for name, entry in keys_value.items() if keys_value is not None else ():
        try:
            name_to_wire(name)
        except (ValueError, UnicodeEncodeError):
            entry.error(f"not a key name: {name!r}")
            continue
        key_section = entry.section()
        algorithm = key_section.choice("algorithm", ALGORITHMS, "hmac-sha256")
        secret_value = key_section.require("secret")
        key_section.finish()
        if secret_value is None:
            continue
        try:
            secret = base64.b64decode(secret_value.as_str(), validate=True)
        except (binascii.Error, ValueError):
            secret_value.error("not base64 (tsig-keygen and ddns-confgen print one)")
            continue
        if not secret:
            secret_value.error("an empty secret")
            continue
        keys.append(TSIGKey(name.lower().rstrip("."), algorithm, secret))
    allow = []
    allow_value = section.get("allow")
    for zone in allow_value.elements(single=True) if allow_value is not None else ():
        try:
            allow.append(name_to_wire(zone.as_str()))
        except (ValueError, UnicodeEncodeError):
            zone.error(f"not a zone name: {zone.as_str()!r}")
    section.finish()
    if value.is_mapping and (keys_value is None or not list(keys_value.items())):
        value.error("update needs at least one key under keys: (unsigned updates are refused)")
    return UpdateOptions(tuple(keys), tuple(allow))


@attrs.frozen(repr=False)
class Options(Record):
    """
    @ivar records: every local record as (owner, type, ttl, rdata) in wire
        form: the C{records} map, the zone files and the hosts file together.
    @ivar local: C{records} ready to answer from, built with the map read
        (so a reload builds it off the reactor thread, with the zone files
        read); not compared: C{records} says the same.
    @ivar recorded: what C{record_to} held when the map was read; not
        compared: it changes as the service records.
    """

    records: tuple[tuple[bytes, int, int, bytes], ...] = ()
    forward: tuple[Upstream, ...] = ()
    forward_timeout: float = 2.0
    forward_attempts: int = 1
    forward_strategy: str = "in_order"
    forward_zones: tuple[tuple[bytes, tuple[Upstream, ...]], ...] = ()
    cache: CacheOptions = CacheOptions()
    recursion_from: tuple[Network, ...] = LOOPBACK
    catch_all: bytes | None = None
    query_log: bool = False
    ttl: int = 60
    udp_payload: int = EDNS_PAYLOAD
    persist: Path | None = None
    record_to: Path | None = None
    recorded: Recorded = attrs.field(factory=dict, eq=False, repr=False)
    update: UpdateOptions = attrs.field(factory=UpdateOptions)
    local: LocalData | None = attrs.field(default=None, eq=False, repr=False)


def parse(section: Section, profiles: TLSProfiles) -> Options:
    ttl = section.integer("ttl", 60, minimum=0, maximum=2**31 - 1)
    cache = section.read("cache", _cache, CacheOptions())
    records: list[tuple[bytes, int, int, bytes]] = []
    records_value = section.get("records")
    if records_value is not None:
        for name, entry in records_value.items():
            records.extend(_name_records(name, entry, ttl))
    zone_files = section.get("zone_files")
    for element in zone_files.elements(single=True) if zone_files is not None else ():
        records.extend(_zone_file(element, ttl, cache.negative_ttl))
    hosts_value = section.get("hosts_file")
    if hosts_value is not None:
        records.extend(_hosts_file(hosts_value, ttl))
    catch_all = None
    catch_value = section.get("catch_all")
    if catch_value is not None:
        text = catch_value.as_str()
        try:
            catch_all = ipaddress.IPv4Address(text).packed
        except ValueError:
            if catch_value.is_scalar:
                catch_value.error(f"not an IPv4 address: {text!r}")
    forward = section.read("forward", _forward, _Forward())
    nothing_recorded: tuple[Path | None, Recorded] = (None, {})
    record_to, recorded = section.read("record_to", _record_to, nothing_recorded)
    # One tuple for both, so a worker's copy of the options pickles it once.
    configured = tuple(records)
    options = Options(
        records=configured,
        forward=forward.upstreams,
        forward_timeout=forward.timeout,
        forward_attempts=forward.attempts,
        forward_strategy=forward.strategy,
        forward_zones=section.read("forward_zones", _forward_zones, ()),
        cache=cache,
        recursion_from=section.networks("recursion_from", LOOPBACK),
        catch_all=catch_all,
        query_log=section.flag("query_log", False),
        ttl=ttl,
        udp_payload=section.integer("udp_payload", EDNS_PAYLOAD, minimum=512, maximum=4096),
        persist=section.file_path("persist"),
        record_to=record_to,
        recorded=recorded,
        update=section.read("update", parse_update, UpdateOptions()),
        local=LocalData(configured, cache.negative_ttl),
    )
    return options


def _present(values: tuple[T | None, ...]) -> tuple[T, ...]:
    """What was read, without the entries already reported as wrong."""
    return tuple(v for v in values if v is not None)


def _name_records(name: str, entry: Value, default_ttl: int) -> list[tuple[bytes, int, int, bytes]]:
    try:
        owner = name_to_wire(name)
    except (ValueError, UnicodeEncodeError):
        entry.error(f"not a domain name: {name!r} (international names go in their xn-- form)")
        return []
    pairs = list(entry.items())
    ttl = default_ttl
    for key, value in pairs:
        if key == "ttl":
            ttl = value.as_int(default_ttl, minimum=0, maximum=2**31 - 1)
    found = []
    for key, values in pairs:
        rtype = TYPES.get(key.upper())
        if key == "ttl":
            continue
        if rtype is None:
            values.error(f"unsupported record type {key!r} (one of {', '.join(TYPES)})")
            continue
        for value in values.elements(single=True):
            text = value.as_str()
            if not value.is_scalar:
                continue
            try:
                found.append((owner, rtype, ttl, parse_rdata(rtype, text, None)))
            except DataError as e:
                value.error(str(e))
    types = {rtype for _, rtype, _, _ in found}
    if dns.CNAME in types and len(types) > 1:
        # RFC 1034 3.6.2, RFC 2181 10.1: answers for the name would disagree.
        entry.error("a name with a CNAME has no other records (RFC 1034 3.6.2)")
    return found


def _read_file(value: Value) -> str | None:
    path = value.as_path()
    if not value.is_scalar:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        value.error(f"cannot read {path}: {e.strerror if isinstance(e, OSError) else e}")
        return None


def _zone_file(value: Value, ttl: int, negative_ttl: int) -> list[tuple[bytes, int, int, bytes]]:
    text = _read_file(value)
    if text is None:
        return []
    path = Path(value.as_str())
    stem = path.name.removesuffix(".zone").removesuffix(".db")
    try:
        records, apex = parse_master_file(text, name_to_wire(stem), ttl, value.as_path())
    except (DataError, ValueError) as e:
        line = getattr(e, "line", None)
        value.error(f"{path}{f' line {line}' if line else ''}: {e}")
        return []
    if not any(rtype == dns.SOA for _, rtype, _, _ in records):
        # The file's origin is its zone even without an SOA: names under it
        # that the file does not have are NXDOMAIN, not forwarded.
        records.append((apex, dns.SOA, negative_ttl, made_up_soa(apex, negative_ttl)))
    return records


def _record_to(value: Value) -> tuple[Path | None, Recorded]:
    """
    C{record_to}'s path and what it holds already: read with the map (off the
    reactor thread on a reload), so a restart adds to the recording.
    """
    path = value.as_path()
    if not value.is_scalar:
        return None, {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return path, {}
    except (OSError, UnicodeDecodeError) as e:
        value.error(f"cannot read {path}: {e.strerror if isinstance(e, OSError) else e}")
        return path, {}
    # dnspython, which the recorder writes with, only for a service that records.
    from netd.services.dns.record import read_recorded

    try:
        return path, read_recorded(text)
    except ValueError as e:
        value.error(f"{path} {e}")
        return path, {}


def _hosts_file(value: Value, ttl: int) -> list[tuple[bytes, int, int, bytes]]:
    text = _read_file(value)
    if text is None:
        return []
    try:
        entries = parse_hosts(text)
    except DataError as e:
        value.error(f"{value.as_str()} line {e.line}: {e}")
        return []
    records = []
    for name, rtype, packed in entries:
        records.append((name, rtype, ttl, packed))
        records.append((reverse_name(packed), dns.PTR, ttl, name))
    return records


@attrs.frozen(repr=False)
class _Forward(Record):
    upstreams: tuple[Upstream, ...] = ()
    timeout: float = 2.0
    attempts: int = 1
    strategy: str = "in_order"


def _forward(value: Value) -> _Forward:
    """C{forward}: a list of upstreams, or {upstreams, timeout, attempts, strategy}."""
    if not value.is_mapping:
        return _Forward(_upstreams(value))
    section = value.section()
    upstreams_value = section.require("upstreams")
    upstreams = _upstreams(upstreams_value) if upstreams_value is not None else ()
    forward = _Forward(
        upstreams,
        timeout=section.number("timeout", 2.0, minimum=0.1),
        attempts=section.integer("attempts", 1, minimum=1, maximum=10),
        strategy=section.choice("strategy", STRATEGIES, "in_order"),
    )
    section.finish()
    return forward


def _upstreams(value: Value) -> tuple[Upstream, ...]:
    return _present(value.list_of(_upstream, single=True))


def _forward_zones(value: Value) -> tuple[tuple[bytes, tuple[Upstream, ...]], ...]:
    zones = []
    for name, entry in value.items():
        try:
            zone = name_to_wire(name)
        except (ValueError, UnicodeEncodeError):
            entry.error(f"not a zone name: {name!r}")
            continue
        zones.append((zone, _upstreams(entry)))
    return tuple(zones)


def _upstream(value: Value) -> Upstream | None:
    """
    C{IP[:PORT]}, C{tls://IP[:PORT]}, C{https://HOST[:PORT]/PATH}, or
    {address, server_name, ca} for a tls:// or https:// one.
    """
    if not value.is_mapping:
        return _address(value)
    section = value.section()
    address_value = section.require("address")
    server_name = section.optional_str("server_name")
    ca_value = section.get("ca")
    section.finish()
    upstream = _address(address_value) if address_value is not None else None
    if upstream is None:
        return None
    ca = None
    if ca_value is not None:
        path = ca_value.as_path()
        try:
            ca = path.read_bytes()
            certificates(ca)
        except (OSError, ValueError) as e:
            ca_value.error(f"cannot read CA certificates from {path}: {e}")
            return None
    if (server_name or ca) and not (upstream.tls or upstream.https):
        value.error("server_name and ca are for tls:// and https:// upstreams")
        return None
    return attrs.evolve(upstream, server_name=server_name, ca=ca)


def _address(value: Value) -> Upstream | None:
    text = value.as_str()
    if text.startswith("https://"):
        authority, slash, path = text[8:].partition("/")
        address = _rest(value, authority).as_host_port(443)
        if address is None:
            return None
        if not slash or not path or any(c.isspace() or c in "?#" for c in path):
            value.error(f"not https://HOST[:PORT]/PATH: {text!r} (as in https://9.9.9.9/dns-query)")
            return None
        return Upstream(*address, path="/" + path)
    tls = text.startswith("tls://")
    if tls:
        value = _rest(value, text[6:])
    host_port = value.as_host_port(853 if tls else 53, numeric=True)
    return Upstream(*host_port, tls=tls) if host_port is not None else None


def _rest(value: Value, text: str) -> Value:
    """C{value} with only C{text} of it, for errors still at its place in the file."""
    node = value.node
    return attrs.evolve(value, node=yaml.ScalarNode(node.tag, text, node.start_mark, node.end_mark))


def _cache(value: Value) -> CacheOptions:
    section = value.section()
    defaults = CacheOptions()
    options = CacheOptions(
        size=section.integer("size", defaults.size, minimum=0, maximum=10_000_000),
        max_ttl=section.integer("max_ttl", defaults.max_ttl, minimum=0, maximum=2**31 - 1),
        negative_ttl=section.integer(
            "negative_ttl", defaults.negative_ttl, minimum=0, maximum=2**31 - 1
        ),
    )
    section.finish()
    return options
