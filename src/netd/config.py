"""
The service map: YAML parsed once into immutable objects that remember where they came from.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from netd import endpoints
from netd.namespaces import NO_NAMESPACES, Namespacing, read_namespace_from
from netd.records import Record
from netd.rules import RuleSpec, read_rules, read_scenarios
from netd.schema import ConfigError, ConfigErrors, Position, Problems, Section, Value, compose

if TYPE_CHECKING:
    from netd.kinds import ServiceKind

__all__ = [
    "AdminConfig",
    "ConfigErrors",
    "ListenerConfig",
    "LogConfig",
    "NetdConfig",
    "ServiceConfig",
    "TLSProfileConfig",
    "TLSProfiles",
    "load_config",
    "parse_config",
]

_IDLE_TIMEOUT = 300.0
_SERVICE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*\Z")
_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"(\*\.)?({_LABEL}\.)*{_LABEL}\.?\Z")


@attrs.frozen(repr=False)
class KeyPairConfig(Record):
    cert: Path
    key: Path


@attrs.frozen(repr=False)
class TLSProfileConfig(Record):
    name: str
    position: Position = attrs.field(eq=False)
    self_signed: tuple[str, ...] = ()
    keypair: KeyPairConfig | None = None
    min_version: str = "1.2"
    client_ca: Path | None = None
    sni: Mapping[str, KeyPairConfig] = attrs.field(factory=dict)
    # Leaves minted for any other server name, from the self-signed CA.
    mint: bool = False


class TLSProfiles(Mapping[str, TLSProfileConfig]):
    """
    The map's TLS profiles as one service's keys refer to them.

    Every reference (a listener's C{tls:}, a kind's own, e.g. STARTTLS) goes
    through L{reference}, which checks it and remembers it: a reload restarts
    the service when a profile it uses changes, whichever key used it.
    """

    def __init__(self, profiles: Mapping[str, TLSProfileConfig]) -> None:
        self._profiles = profiles
        self.used: set[str] = set()

    def __getitem__(self, name: str) -> TLSProfileConfig:
        return self._profiles[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._profiles)

    def __len__(self) -> int:
        return len(self._profiles)

    def reference(self, value: Value) -> str | None:
        """The profile C{value} names, or L{None} (reported) if there is none of that name."""
        name = value.as_str()
        if not value.is_scalar:
            return None
        if name not in self._profiles:
            known = ", ".join(sorted(self._profiles)) or "none defined"
            value.error(f"unknown TLS profile {name!r} (known: {known})")
            return None
        self.used.add(name)
        return name


@attrs.frozen(repr=False)
class ListenerConfig(Record):
    """One listener: an endpoint string plus what netd layers on top of it."""

    endpoint: str
    position: Position = attrs.field(eq=False)
    path: str = attrs.field(eq=False)
    datagram: bool = False
    tls_profile: str | None = None
    protocol: str | None = None

    @property
    def tls(self) -> bool:
        return self.tls_profile is not None or endpoints.has_own_tls(self.endpoint)


@attrs.frozen(repr=False)
class ServiceConfig(Record):
    """
    One service of the map.  Equality ignores file positions, so a reload can
    tell a changed service from one that only moved in the file.
    """

    name: str
    type: str
    position: Position = attrs.field(eq=False)
    listen: tuple[ListenerConfig, ...]
    enabled: bool = True
    max_connections: int = 1000
    # Per client: an IPv4 address, or an IPv6 /64; 0 is no limit.
    max_connections_per_client: int = 0
    idle_timeout: float = 300.0
    options: Any = None
    # Worker processes serving the listeners the main process binds; 0 serves in the main process.
    workers: int = 0
    # Every TLS profile the service uses, by its listeners or its own keys.
    tls_profiles: frozenset[str] = frozenset()
    # Not compared: a reload that changes only the rules replaces them in the
    # running service, whose connections go on.
    rules: tuple[RuleSpec, ...] = attrs.field(default=(), eq=False)
    namespace_from: Namespacing = NO_NAMESPACES


@attrs.frozen(repr=False)
class AdminConfig(Record):
    """
    The admin API's listeners and limits.  It may face the network (with a
    token), so it bounds how many connections it holds and how slowly a client
    may send a request (seconds, bytes).
    """

    listen: tuple[ListenerConfig, ...]
    token: str | None
    position: Position = attrs.field(eq=False)
    max_connections: int = 64
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 60.0
    max_body: int = 64 * 1024
    # Listeners that serve Toxiproxy's API alone, without the token (its
    # clients send none): loopback only.
    toxiproxy: tuple[ListenerConfig, ...] = ()


@attrs.frozen(repr=False)
class LogConfig(Record):
    format: str = "text"
    level: str = "info"
    events: bool = False  # mirror the event journal into the log


@attrs.frozen(repr=False)
class NetdConfig(Record):
    file: Path
    state_dir: Path
    shutdown_grace: float = 10.0
    log: LogConfig = LogConfig()
    tls: Mapping[str, TLSProfileConfig] = attrs.field(factory=dict)
    admin: AdminConfig | None = None
    services: Mapping[str, ServiceConfig] = attrs.field(factory=dict)
    # Named states shared by every service's rules, with their initial state.
    scenarios: Mapping[str, str] = attrs.field(factory=dict)


def load_config(path: Path | str) -> NetdConfig:
    """Read and validate the service map at C{path}; raise L{ConfigErrors} listing every error."""
    path = Path(path).absolute()
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigErrors(
            [_error_at(str(path), f"cannot read the service map: {e.strerror}")]
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        # The bytes before the first bad one decode: count lines and columns in them.
        before = data[: e.start].decode("utf-8")
        position = Position.in_text(str(path), before, len(before))
        message = f"cannot read the service map: not UTF-8 (byte 0x{data[e.start]:02x}: {e.reason})"
        raise ConfigErrors([ConfigError(position, "", message)]) from None
    return parse_config(text, path)


def _error_at(file: str, message: str) -> ConfigError:
    return ConfigError(Position(file, 1, 1), "", message)


def parse_config(text: str, path: Path) -> NetdConfig:
    problems = Problems()
    node = compose(text, str(path), problems)
    problems.raise_if_any()
    if node is None:
        raise ConfigErrors([_error_at(str(path), "the service map is empty")])
    root = Value(node, "", str(path), path.parent, problems)
    if not root.is_mapping:
        root.error("the service map must be a mapping")
        problems.raise_if_any()
    config = _read_root(root.section(), path)
    problems.raise_if_any()
    return config


def _read_root(top: Section, path: Path) -> NetdConfig:
    state_dir = top.file_path("state_dir") or path.parent / "state"
    shutdown_grace = top.number("shutdown_grace", 10.0, minimum=0)
    log = top.read("log", _read_log, LogConfig())
    profiles: dict[str, TLSProfileConfig] = top.read("tls", _read_profiles, {})
    admin = top.read("admin", lambda v: _read_admin(v, profiles), None)
    services: dict[str, ServiceConfig] = top.read(
        "services", lambda v: _read_services(v, profiles), {}
    )
    scenarios: dict[str, str] = top.read("scenarios", read_scenarios, {})
    top.pass_over_extensions()
    top.finish()
    if not services and not top.has("services"):
        top.value.error("no services: add a 'services' mapping")
    return NetdConfig(
        file=path,
        state_dir=state_dir,
        shutdown_grace=shutdown_grace,
        log=log,
        tls=profiles,
        admin=admin,
        services=services,
        scenarios=scenarios,
    )


def _read_log(value: Value) -> LogConfig:
    section = value.section()
    config = LogConfig(
        format=section.choice("format", ("text", "json"), "text"),
        level=section.choice("level", ("debug", "info", "warn", "error", "critical"), "info"),
        events=section.flag("events", False),
    )
    section.finish()
    return config


def _read_keypair(section: Section) -> KeyPairConfig | None:
    cert, key = section.file_path("cert"), section.file_path("key")
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        section.value.error("'cert' and 'key' go together")
        return None
    return KeyPairConfig(cert, key)


def _host_name(value: Value) -> str | None:
    """A name a certificate can carry: an IP address, or an ASCII host name (C{*.} allowed)."""
    text = value.as_str()
    if not value.is_scalar:
        return None
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    if not _HOST_NAME.match(text):
        value.error(
            f"not a host name or IP address: {text!r} (international names go in their xn-- form)"
        )
        return None
    return text


def _read_profiles(value: Value) -> dict[str, TLSProfileConfig]:
    profiles = {}
    for name, entry in value.items():
        reported = len(entry.problems.errors)
        if not _PROFILE_NAME.match(name):
            # The name becomes the generated files' names in state_dir/tls.
            entry.error("TLS profile names are letters, digits, '.', '-' and '_'")
            continue
        section = entry.section()
        names_value = section.get("self_signed")
        self_signed = tuple(
            name
            for name in (names_value.list_of(_host_name, single=True) if names_value else ())
            if name is not None
        )
        keypair = _read_keypair(section)
        # A profile already reported (not a mapping, half a key pair) needs no second message.
        if bool(self_signed) == (keypair is not None) and len(entry.problems.errors) == reported:
            entry.error("a TLS profile needs either 'self_signed' names or 'cert' and 'key'")
        sni: dict[str, KeyPairConfig] = {}
        sni_entries: list[tuple[str, Value]] = section.read("sni", lambda v: list(v.items()), [])
        for server_name, sni_entry in sni_entries:
            reported = len(sni_entry.problems.errors)
            if not _HOST_NAME.match(server_name):
                sni_entry.error(f"not a server name or *.domain: {server_name!r}")
                continue
            sni_section = sni_entry.section()
            sni_keypair = _read_keypair(sni_section)
            sni_section.finish()
            if sni_keypair is None:
                if len(sni_entry.problems.errors) == reported:
                    sni_entry.error("needs 'cert' and 'key'")
            else:
                sni[server_name] = sni_keypair
        profiles[name] = TLSProfileConfig(
            name=name,
            position=entry.position,
            self_signed=self_signed,
            keypair=keypair,
            min_version=section.choice("min_version", ("1.2", "1.3"), "1.2"),
            client_ca=section.file_path("client_ca"),
            sni=sni,
            mint=_read_mint(section, self_signed),
        )
        section.finish()
    return profiles


def _read_mint(section: Section, self_signed: tuple[str, ...]) -> bool:
    mint = section.flag("mint", False)
    if mint and not self_signed:
        section.value.error("'mint' needs 'self_signed': its CA signs the minted leaves")
    return mint


def _read_listener(
    value: Value,
    profiles: TLSProfiles,
    protocols: tuple[str, ...] = (),
) -> ListenerConfig | None:
    if value.is_mapping:
        section = value.section()
        endpoint_value = section.require("endpoint")
        profile_value = section.get("tls")
        protocol_value = section.get("protocol")
        section.finish()
        if endpoint_value is None:
            return None
    else:
        endpoint_value, profile_value, protocol_value = value, None, None
    reported = len(value.problems.errors)
    description = endpoint_value.as_str()
    if len(value.problems.errors) != reported:
        return None
    problem = endpoints.check(description, value.base_dir)
    if problem:
        endpoint_value.error(problem)
        return None
    profile = None
    if profile_value is not None:
        profile = profiles.reference(profile_value)
        if profile is None:
            return None
    elif endpoints.wants_profile(description):
        if "default" not in profiles:
            endpoint_value.error(
                "an ssl: endpoint without key material needs 'tls: PROFILE' "
                "(or a TLS profile named 'default')"
            )
            return None
        profiles.used.add("default")
        profile = "default"
    datagram = endpoints.is_datagram(description)
    if datagram and profile is not None:
        value.error("TLS is not available on a udp: listener")
        return None
    protocol = None
    if protocol_value is not None:
        protocol = protocol_value.as_str()
        if not protocols:
            protocol_value.error("this service takes no 'protocol'")
        elif protocol not in protocols:
            protocol_value.error(f"must be one of {', '.join(protocols)}, got {protocol!r}")
    return ListenerConfig(
        endpoint=description,
        position=value.position,
        path=value.path,
        datagram=datagram,
        tls_profile=profile,
        protocol=protocol,
    )


def _read_listeners(
    value: Value,
    profiles: TLSProfiles,
    protocols: tuple[str, ...] = (),
    datagram_allowed: bool = True,
) -> tuple[ListenerConfig, ...]:
    listeners: list[ListenerConfig] = []
    reported = len(value.problems.errors)
    for element in value.elements(single=True):
        listener = _read_listener(element, profiles, protocols)
        if listener is None:
            continue
        if listener.datagram and not datagram_allowed:
            element.error("this service kind has no datagram (udp:) listener")
            continue
        listeners.append(listener)
    if not listeners and len(value.problems.errors) == reported:
        value.error("at least one listener is needed")
    return tuple(listeners)


def _read_listener_key(
    value: Value | None, key: str, profiles: TLSProfiles
) -> tuple[ListenerConfig, ...]:
    """
    One of a kind's L{listener_keys<netd.kinds.ServiceKind.listener_keys>}:
    a listener list, or a mapping's C{listen:} list, each listener tagged
    with the key as its protocol.
    """
    if value is None:
        return ()
    if value.is_mapping:
        listen_value = value.section().require("listen")
        if listen_value is None:
            return ()
        value = listen_value
    listen = _read_listeners(value, profiles, datagram_allowed=False)
    return tuple(attrs.evolve(listener, protocol=key) for listener in listen)


def _read_admin(value: Value, profiles: Mapping[str, TLSProfileConfig]) -> AdminConfig:
    section = value.section()
    listen_value = section.require("listen")
    listen = (
        _read_listeners(listen_value, TLSProfiles(profiles), datagram_allowed=False)
        if listen_value
        else ()
    )
    token = section.optional_str("token")
    toxiproxy = _read_listener_key(section.get("toxiproxy"), "toxiproxy", TLSProfiles(profiles))
    defaults = AdminConfig(listen=(), token=None, position=value.position)
    config = AdminConfig(
        listen=listen,
        token=token or None,
        position=value.position,
        max_connections=section.integer("max_connections", defaults.max_connections, minimum=1),
        header_timeout=section.number("header_timeout", defaults.header_timeout, minimum=0.1),
        body_timeout=section.number("body_timeout", defaults.body_timeout, minimum=0.1),
        idle_timeout=section.number("idle_timeout", defaults.idle_timeout, minimum=0.1),
        max_body=section.integer("max_body", defaults.max_body, minimum=0),
        toxiproxy=toxiproxy,
    )
    section.finish()
    for listener in toxiproxy:
        if not endpoints.is_loopback(listener.endpoint):
            section.value.error(
                f"admin toxiproxy listener {listener.endpoint!r} is not loopback-only:"
                " Toxiproxy's clients send no token"
            )
    if not token:
        for listener in listen:
            if not endpoints.is_loopback(listener.endpoint):
                section.value.error(
                    f"admin listener {listener.endpoint!r} is not loopback-only: set a 'token'"
                )
    return config


def _read_services(
    value: Value, profiles: Mapping[str, TLSProfileConfig]
) -> dict[str, ServiceConfig]:
    from netd.services import kind_names, load_kind

    services = {}
    seen_endpoints: dict[str, str] = {}
    for name, entry in value.items():
        if not _SERVICE_NAME.match(name):
            entry.error("service names are lower-case letters, digits, '-' and '_'")
            continue
        section = entry.section()
        type_value = section.require("type")
        if type_value is None:
            continue
        type_name = type_value.as_str()
        if type_name not in kind_names():
            type_value.error(
                f"unknown service type {type_name!r} (one of {', '.join(kind_names())})"
            )
            continue
        kind = load_kind(type_name)
        used = TLSProfiles(profiles)
        listen_value = section.require("listen")
        listen = (
            _read_listeners(listen_value, used, kind.protocols, kind.datagram)
            if listen_value
            else ()
        )
        for listener_key in kind.listener_keys:
            listen += _read_listener_key(section.get(listener_key), listener_key, used)
        enabled = section.flag("enabled", True)
        for listener in listen if enabled else ():
            key = endpoints.identity(listener.endpoint)
            if key in seen_endpoints:
                value.problems.add(
                    listener.position,
                    listener.path,
                    f"{listener.endpoint!r} is already used by {seen_endpoints[key]}",
                )
            elif key is not None:
                seen_endpoints[key] = f"{name} ({listener.path})"
        max_connections = section.integer("max_connections", 1000, minimum=1)
        max_connections_per_client = section.integer(
            "max_connections_per_client", kind.per_client_default, minimum=0
        )
        idle_value = section.get("idle_timeout")
        idle_timeout = section.number("idle_timeout", _IDLE_TIMEOUT, minimum=0.1)
        options = kind.parse(section, used)
        workers = _read_workers(section, kind, options, listen)
        rules_value = section.get("rules")
        rules = read_rules(rules_value, kind.rules) if rules_value is not None else ()
        namespace_value = section.get("namespace_from")
        namespace_from = (
            read_namespace_from(namespace_value, kind.namespaces)
            if namespace_value is not None
            else NO_NAMESPACES
        )
        if kind.longest_silence is not None and options is not None:
            silence = kind.longest_silence(options)
            if idle_value is None:
                idle_timeout = max(idle_timeout, silence)
            elif idle_timeout < silence:
                idle_value.error(
                    f"shorter than the {silence:g} s this {type_name} service's own "
                    "timeouts allow a client to stay silent"
                )
        services[name] = ServiceConfig(
            name=name,
            type=type_name,
            position=entry.position,
            listen=listen,
            enabled=enabled,
            max_connections=max_connections,
            max_connections_per_client=max_connections_per_client,
            idle_timeout=idle_timeout,
            options=options,
            workers=workers,
            tls_profiles=frozenset(used.used),
            rules=rules,
            namespace_from=namespace_from,
        )
        section.finish()
    return services


_MOST_WORKERS = 256


def _read_workers(
    section: Section, kind: ServiceKind[Any], options: Any, listen: tuple[ListenerConfig, ...]
) -> int:
    """C{workers: N | auto}: refused where the kind's state or a listener cannot be shared."""
    value = section.get("workers")
    if value is None:
        return 0
    if value.is_scalar and value.as_str() == "auto":
        count = os.cpu_count() or 1
    else:
        count = value.as_int(0, minimum=0, maximum=_MOST_WORKERS)
    if not count:
        return 0
    if not kind.workers:
        value.error(
            f"a {kind.name} service keeps its state in one process: it cannot run in workers"
        )
        return 0
    reason = kind.workers_refusal(options) if kind.workers_refusal is not None else None
    if reason:
        value.error(f"cannot run in workers: {reason}")
        return 0
    for listener in listen:
        if not endpoints.can_share(listener.endpoint):
            value.problems.add(
                listener.position,
                listener.path,
                f"{listener.endpoint!r} cannot be shared with workers "
                "(a UNIX path, or TLS keys in the string: use a 'tls:' profile)",
            )
    return count
