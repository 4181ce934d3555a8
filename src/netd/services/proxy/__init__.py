"""
The proxy kind: a fault proxy in front of any TCP (or UDP) server, with
Toxiproxy's toxics and API.

    fault:
      type: proxy
      listen: ["tcp:6380:interface=127.0.0.1"]
      upstream: 127.0.0.1:6379
      toxics:
        - {type: latency, attributes: {latency: 100, jitter: 10}}

Toxics can also be added, changed and removed at run time under
C{/api/services/NAME/toxics}, or through the Toxiproxy API (L{netd.services.proxy.api}).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

import attrs
import yaml
from twisted.internet.protocol import Factory

from netd.config import ServiceConfig, TLSProfiles
from netd.kinds import AdminView, BuildContext, Handlers, ServiceKind, ViewRefused
from netd.records import Record
from netd.rules import RuleSet
from netd.schema import Section, Value
from netd.services.proxy.datagram import DatagramRelay
from netd.services.proxy.relay import ClientSide
from netd.services.proxy.state import Proxy, UpstreamTLS
from netd.services.proxy.toxics import Toxic, ToxicError, read_toxic

__all__ = ["PROXY", "ProxyOptions"]


@attrs.frozen(repr=False)
class ProxyOptions(Record):
    """
    @ivar udp_clients: client addresses a udp: listener maps to upstream sockets at once.
    @ivar udp_idle: seconds a quiet mapping lives.
    """

    upstream: tuple[str, int]
    upstream_tls: UpstreamTLS | None = None
    toxics: tuple[Toxic, ...] = ()
    udp_clients: int = 256
    udp_idle: float = 60.0


def _plain(value: Value) -> Any:
    """A YAML node as the plain data its JSON twin would be (a toxic reads both alike)."""
    return yaml.safe_load(yaml.serialize(value.node))


def _read_toxics(value: Value) -> tuple[Toxic, ...]:
    toxics: list[Toxic] = []
    for element in value.elements():
        try:
            toxic = read_toxic(_plain(element))
        except ToxicError as e:
            path = f"{element.path}.{e.path}" if e.path else element.path
            element.problems.add(element.position, path, e.message)
            continue
        if any(t.name == toxic.name for t in toxics):
            element.error(f"a second toxic named {toxic.name!r} (name each one)")
            continue
        toxics.append(toxic)
    return tuple(toxics)


def _read_upstream_tls(value: Value) -> UpstreamTLS | None:
    section = value.section()
    name = section.require("server_name")
    ca = section.file_path("ca")
    section.finish()
    server_name = name.as_hostname() if name is not None else None
    if server_name is None:
        return None
    ca_pem = None
    if ca is not None:
        try:
            # Read once, at start: the file's changes take a reload, as every certificate's.
            ca_pem = ca.read_bytes()
        except OSError as e:
            value.error(f"cannot read ca {str(ca)!r}: {e.strerror}")
            return None
    return UpstreamTLS(server_name, ca_pem)


def _parse(section: Section, profiles: TLSProfiles) -> ProxyOptions | None:
    upstream_value = section.require("upstream")
    upstream = upstream_value.as_host_port(1) if upstream_value is not None else None
    upstream_tls = section.read("upstream_tls", _read_upstream_tls, None)
    no_toxics: tuple[Toxic, ...] = ()
    toxics = section.read("toxics", _read_toxics, no_toxics)
    defaults = ProxyOptions(("", 0))
    udp_clients = section.integer("udp_clients", defaults.udp_clients, minimum=1)
    udp_idle = section.number("udp_idle", defaults.udp_idle, minimum=0.1)
    if upstream is None or upstream_value is None:
        return None
    if not upstream_value.as_str().endswith(f":{upstream[1]}"):
        # A proxy has no default port: "db.lab.test" alone is a mistake, not port 1.
        upstream_value.error("the upstream needs its port: HOST:PORT")
        return None
    return ProxyOptions(upstream, upstream_tls, toxics, udp_clients, udp_idle)


def toxics_view(proxy: Proxy) -> AdminView:
    """C{/api/services/NAME/toxics}: the proxy's toxics, each with how often it fired."""

    def listing(query: Mapping[str, str]) -> Any:
        return {"toxics": [state.as_json() for state in proxy.toxics]}

    def item(name: str) -> Any:
        state = proxy.toxics.get(name)
        return state.as_json() if state is not None else None

    def clear() -> Any:
        proxy.clear_toxics()
        return {"toxics": []}

    def post(body: Any) -> Any:
        toxic = _toxic_or_refusal(body)
        if proxy.toxics.get(toxic.name) is not None:
            raise ViewRefused(409, "toxic already exists")
        if proxy.context.rules.item(toxic.name) is not None:
            raise ViewRefused(409, f"a rule {toxic.name!r} is in force already")
        return proxy.toxics.add(toxic).as_json()

    def put(name: str, body: Any) -> Any:
        state = proxy.toxics.get(name)
        if state is None:
            raise ViewRefused(404, "toxic not found")
        return proxy.toxics.update(_toxic_or_refusal(body, state.toxic)).as_json()

    def remove(name: str) -> Any:
        return {"removed": name} if proxy.toxics.remove(name) else None

    return AdminView(list=listing, item=item, clear=clear, post=post, put=put, remove=remove)


def rules_view(rules: RuleSet, proxy: Proxy) -> AdminView:
    """
    C{/api/services/NAME/rules} of a proxy: the core's connection rules, then
    the toxics, each as the scenario rule it is (its name as its C{id}, with
    C{fired} and C{spent}).  A rule POSTed in the toxic vocabulary (with a
    C{type}; C{id} for its C{name}) is added as a toxic.  A name in force as
    one is refused for the other here.
    """

    def listing(query: Mapping[str, str]) -> Any:
        return {
            "rules": [
                *rules.list(query)["rules"],
                *(state.rule.describe() for state in proxy.toxics),
            ]
        }

    def item(key: str) -> Any:
        state = proxy.toxics.get(key)
        return state.rule.describe() if state is not None else rules.item(key)

    def post(body: Any) -> Any:
        if not (isinstance(body, dict) and "type" in body):
            rule_id = body.get("id") if isinstance(body, dict) else None
            if isinstance(rule_id, str) and proxy.toxics.get(rule_id) is not None:
                raise ViewRefused(409, f"a toxic {rule_id!r} is in force already")
            return rules.post(body)
        fields = {key: value for key, value in body.items() if key != "id"}
        if "id" in body:
            fields.setdefault("name", body["id"])
        toxic = _toxic_or_refusal(fields)
        if proxy.toxics.get(toxic.name) is not None or rules.item(toxic.name) is not None:
            raise ViewRefused(409, f"a rule {toxic.name!r} is in force already")
        return proxy.toxics.add(toxic).rule.describe()

    def remove(key: str) -> Any:
        state = proxy.toxics.get(key)
        if state is None:
            return rules.remove(key)
        proxy.toxics.remove(key)
        return {"removed": state.rule.describe()}

    def clear() -> Any:
        cleared = rules.clear()["cleared"] + len(proxy.toxics)
        proxy.clear_toxics()
        return {"cleared": cleared}

    return AdminView(
        list=listing, item=item, clear=clear, post=post, remove=remove, forget=rules.forget
    )


def _toxic_or_refusal(body: Any, base: Toxic | None = None) -> Toxic:
    try:
        return read_toxic(body, base=base)
    except ToxicError as e:
        raise ViewRefused(400, str(e)) from None


def build_proxy(service: ServiceConfig, context: BuildContext) -> Handlers:
    options: ProxyOptions = service.options
    proxy = Proxy(context, options.upstream, options.upstream_tls, options.toxics)
    factory = Factory.forProtocol(lambda: ClientSide(proxy))
    factory.noisy = False
    if any(listener.datagram for listener in service.listen):
        try:
            ipaddress.ip_address(options.upstream[0])
        except ValueError:
            raise ValueError("a udp: listener needs the upstream as an IP address") from None
    return Handlers(
        stream=lambda listener: factory,
        datagram=lambda listener: DatagramRelay(proxy, options.udp_clients, options.udp_idle),
        service=proxy,
        views={"toxics": toxics_view(proxy), "rules": rules_view(context.rules, proxy)},
    )


PROXY: ServiceKind[ProxyOptions | None] = ServiceKind("proxy", _parse, build_proxy, datagram=True)
