"""
Toxiproxy's HTTP API on netd's admin listener, with its paths, JSON shapes and
status codes (Toxiproxy's api.go), so that its clients work unchanged.

Every proxy service is a Toxiproxy proxy: the map's, and those made through
C{POST /proxies}, which are services made at run time (L{ServiceHost.add_service}):
journaled, counted and listed like the map's, kept across reloads until deleted.
A map's proxy can be changed (toxics, C{enabled}, C{upstream}) but not deleted
or moved to another listener: that is the map's to say.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import inlineCallbacks

from netd import __version__
from netd.config import ListenerConfig, ServiceConfig
from netd.kinds import AdminRoot, HostedService, ServiceHost
from netd.schema import Position
from netd.services.proxy import ProxyOptions
from netd.services.proxy.state import Proxy
from netd.services.proxy.toxics import ToxicError, read_toxic

__all__ = ["TOXIPROXY_API"]

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*\Z")
_MADE_HERE = Position("admin API", 1, 1)
Answer = tuple[int, Any]


class _Refused(Exception):
    """Toxiproxy's ApiError: a message and the status that answers it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _proxies(host: ServiceHost) -> dict[str, tuple[HostedService, Proxy]]:
    found: dict[str, tuple[HostedService, Proxy]] = {}
    for name, service in host.services_by_name.items():
        proxy = service.handlers.service
        if service.config.type == "proxy" and isinstance(proxy, Proxy):
            found[name] = (service, proxy)
    return found


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _listen_of(service: HostedService) -> str:
    for listener in service.describe()["listeners"]:
        if listener["transport"] == "tcp":
            return _host_port(listener["host"], listener["port"])
    return service.config.listen[0].endpoint if service.config.listen else ""


def _shape(service: HostedService, proxy: Proxy) -> dict[str, Any]:
    return {
        "name": service.config.name,
        "listen": _listen_of(service),
        "upstream": _host_port(*proxy.upstream),
        "enabled": proxy.enabled,
        "toxics": [state.as_json() for state in proxy.toxics],
    }


def _address(text: Any, field: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """Toxiproxy's C{HOST:PORT} (Go's net.SplitHostPort; an empty host is C{default_host})."""
    if not isinstance(text, str):
        raise _Refused(400, f"bad request body: {field} must be a string")
    host, _, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]") or default_host
    if not port.isdigit() or int(port) > 65535 or not host:
        raise _Refused(400, f"bad request body: {field} {text!r} is not HOST:PORT")
    return host, int(port)


def _body(raw: bytes) -> Any:
    try:
        return json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise _Refused(400, f"bad request body: {e}") from None
    except RecursionError:
        raise _Refused(400, "bad request body: nested too deeply") from None


def _enabled(raw: dict[str, Any], default: bool) -> bool:
    """C{enabled}: a JSON boolean (null, as Go reads it, leaves C{default})."""
    enabled = raw.get("enabled")
    if enabled is None:
        return default
    if not isinstance(enabled, bool):
        raise _Refused(400, f"bad request body: enabled must be true or false, not {enabled!r}")
    return enabled


def _service_config(name: str, listen: tuple[str, int], upstream: tuple[str, int]) -> ServiceConfig:
    host, port = listen
    try:
        interface = str(ipaddress.ip_address(host))
    except ValueError:
        if host != "localhost":
            raise _Refused(400, f"bad request body: listen on an address, not {host!r}") from None
        interface = "127.0.0.1"
    endpoint = f"tcp:{port}:interface={interface.replace(':', chr(92) + ':')}"
    listener = ListenerConfig(endpoint, _MADE_HERE, f"proxies.{name}.listen")
    return ServiceConfig(
        name=name,
        type="proxy",
        position=_MADE_HERE,
        listen=(listener,),
        options=ProxyOptions(upstream=upstream),
    )


@inlineCallbacks
def _create(host: ServiceHost, raw: Any, where: str = "") -> Any:
    if not isinstance(raw, dict):
        raise _Refused(400, "bad request body: a proxy is a JSON object")
    for field in ("name", "upstream"):
        if not raw.get(field):
            raise _Refused(400, f"missing required field: {field}{where}")
    name = raw["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise _Refused(400, "bad request body: name: lower-case letters, digits, '-' and '_'")
    if name in host.services_by_name or host.added_at_run_time(name):
        raise _Refused(409, "proxy already exists")
    upstream = _address(raw["upstream"], "upstream")
    listen = _address(raw.get("listen") or "127.0.0.1:0", "listen")
    enabled = _enabled(raw, True)
    config = _service_config(name, listen, upstream)
    try:
        service = yield host.add_service(config)
    except Exception as e:
        raise _Refused(500, str(e)) from None
    proxy = service.handlers.service
    assert isinstance(proxy, Proxy)
    proxy.context.emit("proxy.created", listen=_listen_of(service), upstream=raw["upstream"])
    proxy.set_enabled(enabled)
    return service, proxy


def _remove(host: ServiceHost, name: str) -> Any:
    _, proxy = _found(host, name)
    proxy.context.emit("proxy.deleted")
    proxy.carry_no_toxics()
    return host.remove_service(name)


def _found(host: ServiceHost, name: str) -> tuple[HostedService, Proxy]:
    found = _proxies(host).get(name)
    if found is None:
        raise _Refused(404, "proxy not found")
    return found


@inlineCallbacks
def _update(host: ServiceHost, name: str, raw: Any) -> Any:
    service, proxy = _found(host, name)
    if not isinstance(raw, dict):
        raise _Refused(400, "bad request body: a proxy is a JSON object")
    upstream = _address(raw["upstream"], "upstream") if "upstream" in raw else proxy.upstream
    enabled = _enabled(raw, proxy.enabled)
    listen = raw.get("listen")
    if listen is not None and listen != _listen_of(service):
        if not host.added_at_run_time(name):
            raise _Refused(409, f"{name} is in the service map: its listeners change there")
        _address(listen, "listen")  # refused before the proxy stops
        service, proxy = yield _move(host, service, proxy, listen, upstream)
    proxy.upstream = upstream
    proxy.set_enabled(enabled)
    return 200, _shape(service, proxy)


@inlineCallbacks
def _move(
    host: ServiceHost,
    service: HostedService,
    proxy: Proxy,
    listen: Any,
    upstream: tuple[str, int],
) -> Any:
    """
    Toxiproxy restarts a proxy that moves, its toxics with it: netd makes it
    again on C{listen}, its toxics carried over as a reload's.  Where C{listen}
    cannot be had (a busy port), it is made again as it was, as Toxiproxy
    keeps it, and the error is the answer.
    """
    name = service.config.name
    was = {
        "name": name,
        "listen": _listen_of(service),
        "upstream": _host_port(*proxy.upstream),
        "enabled": proxy.enabled,
    }
    proxy.context.emit("proxy.deleted")
    yield host.remove_service(name)
    try:
        return (yield _create(host, {**was, "listen": listen, "upstream": _host_port(*upstream)}))
    except _Refused:
        yield _create(host, was)
        raise


@inlineCallbacks
def _populate(host: ServiceHost, raw: Any) -> Any:
    if not isinstance(raw, list):
        raise _Refused(400, "bad request body: a JSON list of proxies")
    for index, entry in enumerate(raw, 1):
        for field in ("name", "upstream"):
            if not isinstance(entry, dict) or not entry.get(field):
                raise _Refused(400, f"missing required field: {field} at proxy {index}")
        if not isinstance(entry["name"], str):
            raise _Refused(400, f"bad request body: name must be a string at proxy {index}")
        _enabled(entry, True)  # refused before any proxy is replaced
    made = []
    for entry in raw:
        existing = _proxies(host).get(entry["name"])
        if existing is not None:
            service, proxy = existing
            same = entry.get("listen") in (None, _listen_of(service)) and _address(
                entry["upstream"], "upstream"
            ) == tuple(proxy.upstream)
            if same:
                made.append(_shape(service, proxy))
                continue
            if not host.added_at_run_time(entry["name"]):
                raise _Refused(409, f"{entry['name']} is in the service map: change it there")
            yield _remove(host, entry["name"])
        service, proxy = yield _create(host, entry)
        made.append(_shape(service, proxy))
    return 201, {"proxies": made}


def _toxics(proxy: Proxy, method: str, rest: Sequence[str], raw: bytes) -> Answer:
    if not rest:
        if method == "GET":
            return 200, [state.as_json() for state in proxy.toxics]
        if method != "POST":
            raise _Refused(405, "method not allowed")
        try:
            toxic = read_toxic(_body(raw))
        except ToxicError as e:
            status = 400
            message = e.message if e.path == "stream" else f"bad request body: {e}"
            if e.path == "type":
                message = "invalid toxic type"
            raise _Refused(status, message) from None
        if proxy.toxics.get(toxic.name) is not None:
            raise _Refused(409, "toxic already exists")
        if proxy.context.rules.item(toxic.name) is not None:
            raise _Refused(409, f"a rule {toxic.name!r} is in force already")
        return 200, proxy.toxics.add(toxic).as_json()
    state = proxy.toxics.get(rest[0])
    if len(rest) > 1 or state is None:
        raise _Refused(404, "toxic not found")
    if method == "GET":
        return 200, state.as_json()
    if method == "DELETE":
        proxy.toxics.remove(rest[0])
        return 204, None
    if method not in ("POST", "PATCH"):
        raise _Refused(405, "method not allowed")
    try:
        return 200, proxy.toxics.update(read_toxic(_body(raw), base=state.toxic)).as_json()
    except ToxicError as e:
        raise _Refused(400, f"bad request body: {e}") from None


@inlineCallbacks
def _route(host: ServiceHost, method: str, root: str, rest: Sequence[str], raw: bytes) -> Any:
    if root == "version" and not rest and method == "GET":
        return 200, {"version": f"netd-{__version__}"}
    if root == "reset" and not rest and method == "POST":
        for _, proxy in _proxies(host).values():
            proxy.reset()
        return 204, None
    if root == "populate" and not rest and method == "POST":
        return (yield _populate(host, _body(raw)))
    if root != "proxies":
        raise _Refused(404, "not found") if rest else _Refused(405, "method not allowed")
    if not rest:
        if method == "GET":
            return 200, {name: _shape(*found) for name, found in _proxies(host).items()}
        if method == "POST":
            service, proxy = yield _create(host, _body(raw))
            return 201, _shape(service, proxy)
        raise _Refused(405, "method not allowed")
    name = rest[0]
    if len(rest) == 1:
        if method == "GET":
            return 200, _shape(*_found(host, name))
        if method in ("POST", "PATCH"):
            return (yield _update(host, name, _body(raw)))
        if method == "DELETE":
            _found(host, name)
            if not host.added_at_run_time(name):
                raise _Refused(409, f"{name} is in the service map: remove it there")
            yield _remove(host, name)
            return 204, None
        raise _Refused(405, "method not allowed")
    if rest[1] != "toxics":
        raise _Refused(404, "not found")
    _, proxy = _found(host, name)
    return _toxics(proxy, method, rest[2:], raw)


def _handle(host: ServiceHost, method: str, parts: Sequence[str], raw: bytes) -> Any:
    return _route(host, method, parts[0], parts[1:], raw).addErrback(_as_answer)


def _as_answer(failure: Any) -> Answer:
    refused = failure.trap(_Refused) and failure.value
    return refused.status, {"error": refused.message, "status": refused.status}


TOXIPROXY_API = AdminRoot(handle=_handle)
