"""
Run the real netd daemon from a test suite.

This module is public API: test suites of software that talks to netd use it
as much as netd's own tests do.

    >>> with NetdProcess.start(config_text, workdir) as netd:
    ...     host, port = netd.address("mail")

The daemon runs as C{twistd -n netd -c FILE --ports-file PATH} in a
subprocess.  Readiness is the ports file appearing (netd writes it atomically
once every listener is bound), never a sleep.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

import yaml
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from netd.config import load_config
from netd.namespaces import key as namespace_key

__all__ = [
    "AdminError",
    "Namespace",
    "NetdProcess",
    "OffloadedNetd",
    "RuleHandle",
    "StartFailed",
    "ToxicHandle",
    "start_asyncio",
    "start_deferred",
    "twistd_command",
]

# URL schemes by service type, where they differ from the type's name.
_SCHEMES = {"chat": "irc"}


class AdminError(Exception):
    """The admin API answered with an error status."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"{status}: {body}")
        self.status = status
        self.body = body


class RuleHandle:
    """
    A rule added through the admin API (L{NetdProcess.rule}); leaving its
    C{with} block removes it.
    """

    # The admin view it lives in, and the event that journals its firing.
    view = "rules"
    event = "rule.fired"

    def __init__(self, netd: NetdProcess, service: str, described: Mapping[str, Any]) -> None:
        self.netd = netd
        self.service = service
        self.id: str = described["id"]
        self._path = f"/api/services/{_quote(service)}/{self.view}/{_quote(self.id)}"

    @property
    def fired(self) -> int:
        """How often it fired so far."""
        described: dict[str, Any] = self.netd.admin("GET", self._path)
        return int(described["fired"])

    def wait_fired(self, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The first C{count} C{rule.fired} (C{toxic.fired}) events of this rule, past or coming."""
        deadline = time.monotonic() + timeout
        found: list[dict[str, Any]] = []
        since = 0
        while len(found) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"rule {self.id} fired {len(found)} of {count} times")
            events = self.netd.events(self.service, self.event, since, wait=min(left, 30.0))
            found += [e for e in events if e.get("rule") == self.id]
            if events:
                since = events[-1]["id"]
        return found[:count]

    def remove(self) -> None:
        """Take it out of force (it may be gone already: spent rules stay until removed)."""
        try:
            self.netd.admin("DELETE", self._path)
        except AdminError as e:
            if e.status != 404:
                raise

    def __enter__(self) -> RuleHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


class ToxicHandle(RuleHandle):
    """
    A toxic added to a proxy service (L{NetdProcess.toxic}): a rule applied to
    bytes, with a rule's C{fired}, C{wait_fired} and C{remove}; C{id} is its name.
    """

    view = "toxics"
    event = "toxic.fired"

    def __init__(self, netd: NetdProcess, service: str, described: Mapping[str, Any]) -> None:
        super().__init__(netd, service, {**described, "id": described["name"]})


class Namespace:
    """
    One namespace of a shared daemon (L{NetdProcess.namespace}): the daemon
    handle's methods, each seeing and changing only this namespace's traffic,
    rules and events.

        ns = netd.namespace("t42")
        smtp.sendmail("app@example.test", [ns.email("bob@example.test")], ...)
        assert len(ns.messages("mail")) == 1
    """

    def __init__(self, netd: NetdProcess, name: str) -> None:
        key = namespace_key(name)
        if key is None:
            raise ValueError(f"not a namespace: {name!r} (letters, digits, '_', '-'; 63 at most)")
        self.netd = netd
        # As the daemon derives it: lower case.
        self.name = key

    # What the traffic carries ------------------------------------------------

    def email(self, address: str) -> str:
        """C{address} with this namespace as its plus tag (smtp's C{plus_tag})."""
        local, _, domain = address.rpartition("@")
        return f"{local}+{self.name}@{domain}"

    def hostname(self, suffix: str, first: str = "") -> str:
        """
        A name under this namespace's label below C{suffix} (the C{suffix}
        source): C{hostname("lab.test", "www")} is C{www.NAME.lab.test}.
        """
        return ".".join(filter(None, (first, self.name, suffix)))

    @property
    def headers(self) -> dict[str, str]:
        """The header http's C{header} source reads by default."""
        return {"X-Netd-Namespace": self.name}

    # The daemon's methods, scoped ----------------------------------------------

    def address(
        self,
        service: str,
        transport: str = "tcp",
        tls: bool | None = False,
        protocol: str | None = None,
    ) -> tuple[str, int]:
        return self.netd.address(service, transport, tls, protocol)

    def url(self, service: str, tls: bool | None = None, path: str = "/") -> str:
        return self.netd.url(service, tls, path)

    def view(self, service: str, view: str, **query: str) -> Any:
        return self.netd.view(service, view, namespace=self.name, **query)

    def messages(self, service: str, **query: str) -> Any:
        return self.netd.messages(service, namespace=self.name, **query)

    def message(self, service: str, message_id: str) -> bytes:
        return self.netd.message(service, message_id)

    def links(self, service: str, message_id: str) -> list[str]:
        return self.netd.links(service, message_id)

    def codes(self, service: str, message_id: str) -> list[str]:
        return self.netd.codes(service, message_id)

    def wait_for_message(self, service: str, to: str, timeout: float = 10.0) -> dict[str, Any]:
        return self.netd.wait_for_message(service, to, timeout, namespace=self.name)

    def requests(self, service: str, unmatched: bool = False, **query: str) -> Any:
        return self.netd.requests(service, unmatched, namespace=self.name, **query)

    def queries(self, service: str, **query: str) -> Any:
        return self.netd.queries(service, namespace=self.name, **query)

    def sessions(self, service: str, **query: str) -> Any:
        return self.netd.sessions(service, namespace=self.name, **query)

    def events(
        self, service: str | None = None, type: str | None = None, since: int = 0, wait: float = 0.0
    ) -> list[dict[str, Any]]:
        return self.netd.events(service, type, since, wait, namespace=self.name)

    def wait_for(
        self,
        service: str | None = None,
        type: str | None = None,
        timeout: float = 10.0,
        **match: Any,
    ) -> dict[str, Any]:
        return self.netd.wait_for(service, type, timeout, namespace=self.name, **match)

    def wait_for_count(
        self, service: str | None, type: str, count: int, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        return self.netd.wait_for_count(service, type, count, timeout, namespace=self.name)

    def rule(self, service: str, match: Mapping[str, Any] | None = None, **rule: Any) -> RuleHandle:
        """A rule that fires only on this namespace's events (C{namespace:} in the map)."""
        return self.netd.rule(service, match, namespace=self.name, **rule)

    def scenario(self, name: str, state: str | None = None) -> str:
        """
        This namespace's state of a scenario, which only its rules (those with
        C{namespace:}) read and move; with C{state}, set it first.
        """
        return self.netd.scenario(f"{name}@{self.name}", state)

    def scenarios(self) -> dict[str, str]:
        """This namespace's states of scenarios, by the scenarios' names."""
        scoped = self.netd.scenarios(namespace=self.name)
        return {name.removesuffix(f"@{self.name}"): state for name, state in scoped.items()}

    def reset(self) -> dict[str, Any]:
        """Forget this namespace's messages, requests, queries, rules, scenarios and events."""
        return self.netd.forget_namespace(self.name)


class StartFailed(Exception):
    """netd exited or did not get ready in time; carries its output."""

    def __init__(self, message: str, output: str, returncode: int | None) -> None:
        super().__init__(f"{message}\n--- netd output ---\n{output}")
        self.output = output
        self.returncode = returncode


def _exits_within(process: subprocess.Popen[bytes], timeout: float) -> bool:
    """
    Whether C{process} exits within C{timeout}, told the moment it does: a
    pidfd becomes readable then, where C{Popen.wait(timeout)} polls with sleeps
    growing to 50 ms, which every test's stop would wait out.
    """
    try:
        exited = os.pidfd_open(process.pid)
    except OSError:  # before Linux 5.3, or gone and reaped already
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    try:
        return bool(select.select([exited], [], [], timeout)[0])
    finally:
        os.close(exited)


def twistd_command() -> list[str]:
    """The twistd of the running interpreter's environment."""
    twistd = Path(sys.executable).parent / "twistd"
    if twistd.exists():
        return [str(twistd)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class NetdProcess:
    """One running netd; stop it with L{stop} or by leaving the C{with} block."""

    def __init__(
        self,
        process: subprocess.Popen[bytes] | None,
        ports: dict[str, Any],
        log: Path,
        config_path: Path | None = None,
        scratch: tempfile.TemporaryDirectory[str] | None = None,
        map_written: bool = False,
        add_admin: bool = False,
    ) -> None:
        self._process = process
        self.ports = ports
        self.log_path = log
        self.config_path = config_path
        self._scratch = scratch
        self._map_written = map_written
        self._add_admin = add_admin
        self._config = load_config(config_path) if config_path is not None else None

    @classmethod
    def start(
        cls,
        config: str | Path | Mapping[str, Any],
        workdir: Path | None = None,
        timeout: float = 15.0,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        admin: bool = True,
    ) -> NetdProcess:
        """
        Start netd and wait until it is ready.

        @param config: the service map as YAML text or a mapping (written to
            C{workdir/netd.yaml}), or the L{Path} of a map used as it is.
        @param workdir: where the map, log, ports file and (by default) the
            state directory go; a temporary directory removed by L{stop} if
            not given.
        @param admin: give a map without an C{admin} section a loopback admin
            listener on port 0, which L{messages}, L{events} and the other
            inspection methods need.
        """
        scratch = None
        if workdir is None:
            scratch = tempfile.TemporaryDirectory(prefix="netd-")
            workdir = Path(scratch.name)
        workdir.mkdir(parents=True, exist_ok=True)
        if isinstance(config, Path):
            config_path = config
        else:
            config_path = workdir / "netd.yaml"
            config_path.write_text(_map_text(config, admin), encoding="utf-8")
        ports_file = workdir / "ports.json"
        ports_file.unlink(missing_ok=True)
        log = workdir / "netd.log"
        command = [
            *twistd_command(),
            "--nodaemon",
            "--pidfile=",
            "netd",
            "-c",
            str(config_path),
            "--ports-file",
            str(ports_file),
            *extra_args,
        ]
        with log.open("wb") as output:
            process = subprocess.Popen(
                command,
                cwd=workdir,
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        try:
            deadline = time.monotonic() + timeout
            while not ports_file.exists():
                if process.poll() is not None:
                    raise StartFailed("netd exited during start-up", _read(log), process.returncode)
                if time.monotonic() > deadline:
                    raise StartFailed(f"netd not ready after {timeout}s", _read(log), None)
                time.sleep(0.01)
            ports = json.loads(ports_file.read_text(encoding="utf-8"))
            written = not isinstance(config, Path)
            return cls(process, ports, log, config_path, scratch, written, admin and written)
        except BaseException:
            # Whatever stops the start once the daemon runs (not ready in time, a
            # map this process cannot read back, a test's timeout): the daemon
            # does not outlive it.
            if process.poll() is None:
                process.kill()
                process.wait()
            if scratch is not None:
                scratch.cleanup()
            raise

    @classmethod
    def attach(cls, workdir: Path) -> NetdProcess:
        """
        A handle on a daemon another process started with C{workdir} (and
        stops): one daemon for every xdist worker, say.  L{stop} leaves it.
        """
        ports = json.loads((workdir / "ports.json").read_text(encoding="utf-8"))
        return cls(None, ports, workdir / "netd.log", workdir / "netd.yaml")

    @property
    def process(self) -> subprocess.Popen[bytes]:
        """The daemon's process; an attached daemon's is not this handle's (LookupError)."""
        if self._process is None:
            raise LookupError("an attached netd's process is not this handle's")
        return self._process

    @property
    def output(self) -> str:
        return _read(self.log_path)

    def listeners(self, service: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.ports["services"][service]["listeners"]
        return found

    def listener(
        self,
        service: str,
        transport: str = "tcp",
        tls: bool | None = False,
        protocol: str | None = None,
    ) -> dict[str, Any]:
        """
        The service's first listener of that transport and TLS; C{protocol}
        picks one of a section's (smtp's C{imap}, C{pop3}) or a tagged one
        (chat's C{line}); without it, untagged listeners come first.
        """
        found = [
            entry
            for entry in self.listeners(service)
            if entry["transport"] == transport
            and (tls is None or entry["tls"] == tls)
            and (protocol is None or entry.get("protocol") == protocol)
        ]
        found.sort(key=lambda entry: protocol is None and "protocol" in entry)
        if not found:
            raise LookupError(
                f"{service} has no {transport} listener with tls={tls}, protocol={protocol}"
            )
        return found[0]

    def address(
        self,
        service: str,
        transport: str = "tcp",
        tls: bool | None = False,
        protocol: str | None = None,
    ) -> tuple[str, int]:
        entry = self.listener(service, transport, tls, protocol)
        return entry["host"], entry["port"]

    def url(self, service: str, tls: bool | None = None, path: str = "/") -> str:
        """
        C{scheme://host:port/path} of the service's first listener (TLS or not,
        if C{tls} says which): http(s), ftp(s), smtp(s), irc(s), dns.
        """
        entry = self.listener(service, "tcp", tls)
        kind = self.ports["services"][service]["type"]
        scheme = _SCHEMES.get(kind, kind) + ("s" if entry["tls"] and kind != "dns" else "")
        host = entry["host"]
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{entry['port']}{path}"

    @property
    def workdir(self) -> Path:
        """Where the map, the log and the ports file are."""
        return self.log_path.parent

    def ca_file(self, profile: str) -> Path:
        """The CA certificate that a C{self_signed} TLS profile's leaf is issued by."""
        return self.state_dir / "tls" / f"{profile}-ca.pem"

    @property
    def state_dir(self) -> Path:
        if self._config is None:
            raise LookupError("this netd was not started from a map")
        return self._config.state_dir

    # The admin API: what the tested software did, seen from the servers.

    def admin(
        self, method: str, path: str, body: bytes | None = None, timeout: float = 30.0
    ) -> Any:
        """One admin API request; the decoded JSON answer, or raw bytes if not JSON."""
        if "admin" not in self.ports:
            raise LookupError("this netd has no admin listener")
        entry = self.ports["admin"]["listeners"][0]
        host = f"[{entry['host']}]" if ":" in entry["host"] else entry["host"]
        tls = self._admin_tls() if entry.get("tls") else None
        scheme = "http" if tls is None else "https"
        request = urllib.request.Request(
            f"{scheme}://{host}:{entry['port']}{path}", data=body, method=method
        )
        token = self._admin_token()
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=tls) as answer:
                raw: bytes = answer.read()
                kind = answer.headers.get_content_type()
        except urllib.error.HTTPError as e:
            raise AdminError(e.code, e.read().decode("utf-8", "replace")) from None
        return json.loads(raw) if kind == "application/json" else raw

    def _admin_tls(self) -> ssl.SSLContext:
        """
        What a TLS admin listener is checked against: the CA of its profile when
        netd made the certificate (C{self_signed}), the system's CAs otherwise.
        """
        admin = self._config.admin if self._config is not None else None
        name = admin.listen[0].tls_profile if admin is not None and admin.listen else None
        profile = self._config.tls.get(name) if self._config is not None and name else None
        if profile is not None and profile.self_signed:
            return ssl.create_default_context(cafile=str(self.ca_file(profile.name)))
        return ssl.create_default_context()

    def _admin_token(self) -> str | None:
        admin = self._config.admin if self._config is not None else None
        return admin.token if admin is not None else None

    def services(self) -> dict[str, Any]:
        found: dict[str, Any] = self.admin("GET", "/api/services")["services"]
        return found

    def view(self, service: str, view: str, **query: str) -> Any:
        """
        C{GET /api/services/SERVICE/VIEW?query}: a kind's own inspection view;
        an answer that wraps its list (C{{"messages": [...]}}) gives the list.
        """
        suffix = f"?{urllib.parse.urlencode(query)}" if query else ""
        answer = self.admin("GET", f"/api/services/{_quote(service)}/{_quote(view)}{suffix}")
        if isinstance(answer, dict) and isinstance(answer.get(view), list):
            return answer[view]
        return answer

    def messages(self, service: str, **query: str) -> Any:
        """Mail an smtp service captured or spooled (C{to=} filters by recipient)."""
        return self.view(service, "messages", **query)

    def message(self, service: str, message_id: str) -> bytes:
        """One message as it was received, headers and all."""
        raw: bytes = self.admin(
            "GET", f"/api/services/{_quote(service)}/messages/{_quote(message_id)}"
        )
        return raw

    def links(self, service: str, message_id: str) -> list[str]:
        """The http(s) links in a message's text and HTML parts, in order, each once."""
        found: list[str] = self.admin(
            "GET", f"/api/services/{_quote(service)}/messages/{_quote(message_id)}/links"
        )["links"]
        return found

    def codes(self, service: str, message_id: str) -> list[str]:
        """
        The one-time codes in a message's text and HTML parts (4 to 8 digits
        standing alone, or the service's C{codes} pattern), in order, each once.
        """
        found: list[str] = self.admin(
            "GET", f"/api/services/{_quote(service)}/messages/{_quote(message_id)}/codes"
        )["codes"]
        return found

    def wait_for_message(
        self, service: str, to: str, timeout: float = 10.0, namespace: str | None = None
    ) -> dict[str, Any]:
        """
        The oldest message to C{to} that C{service} holds (in C{namespace}, if
        given), waiting up to C{timeout} seconds for one to arrive (then
        L{TimeoutError}).  Delete a message you are done with (or L{reset}) to
        wait for the next one.
        """
        deadline = time.monotonic() + timeout
        since = self.admin("GET", "/api/events?service=" + _quote(service))["last_id"]
        scope = {} if namespace is None else {"namespace": namespace}
        while True:
            held = self.messages(service, to=to, **scope)
            if held:
                found: dict[str, Any] = held[0]
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no message to {to} in {service} after {timeout}s")
            arrived = self.events(
                service, "message.accepted", since, wait=min(left, 30.0), namespace=namespace
            )
            if arrived:
                since = arrived[-1]["id"]

    def requests(self, service: str, unmatched: bool = False, **query: str) -> Any:
        """Requests an http service recorded; with C{unmatched}, those no route answered."""
        if unmatched:
            query["unmatched"] = "true"
        return self.view(service, "requests", **query)

    @contextmanager
    def route(self, service: str, **route: Any) -> Iterator[dict[str, Any]]:
        """
        An http route (the map's keys: C{path=}, C{method=}, C{match=}, C{json=}
        ...) for the length of a C{with} block, tried before the map's own
        routes of its priority; yields the route as the admin API lists it.
        """
        base = f"/api/services/{_quote(service)}/routes"
        added: dict[str, Any] = self.admin("POST", base, json.dumps(route).encode())
        try:
            yield added
        finally:
            self.admin("DELETE", f"{base}/{_quote(added['id'])}")

    def queries(self, service: str, **query: str) -> Any:
        """Queries a dns service answered."""
        return self.view(service, "queries", **query)

    def sessions(self, service: str, **query: str) -> Any:
        """Who is connected to a chat or ftp service."""
        return self.view(service, "sessions", **query)

    def reset(self, service: str) -> None:
        """
        Forget what every view of C{service} holds (messages, requests ...);
        its rules stay in force.
        """
        for view in self.admin("GET", f"/api/services/{_quote(service)}")["views"]:
            if view == "rules":
                continue
            try:
                self.admin("DELETE", f"/api/services/{_quote(service)}/{_quote(view)}")
            except AdminError as e:
                if e.status != 405:  # a view with nothing to forget
                    raise

    def rule(self, service: str, match: Mapping[str, Any] | None = None, **rule: Any) -> RuleHandle:
        """
        Add a rule to C{service} at run time, after those in force: C{match}
        and the rule's other keys as in the map (C{reply=}, C{times=},
        C{delay=}, C{scenario=} ...).  Use it as a context manager to remove
        it at the end of the block.

            with netd.rule("mail", match={"stage": "rcpt"}, reply="451 4.3.0 later", times=2) as r:
                ...
            assert r.fired == 2

        @raise AdminError: the rule is refused (400: each error with its path).
        """
        body = {**({"match": dict(match)} if match is not None else {}), **rule}
        described = self.admin(
            "POST", f"/api/services/{_quote(service)}/rules", json.dumps(body).encode()
        )
        if "type" in described:  # a proxy's toxic, in the toxic vocabulary
            return ToxicHandle(self, service, described)
        return RuleHandle(self, service, described)

    def toxic(
        self,
        service: str,
        type: str,
        *,
        stream: str = "downstream",
        name: str | None = None,
        toxicity: float | None = None,
        client: str | list[str] | None = None,
        nth: int | None = None,
        times: int | None = None,
        seed: int | None = None,
        scenario: str | None = None,
        state: str | None = None,
        next_state: str | None = None,
        **attributes: float,
    ) -> ToxicHandle:
        """
        Add a toxic to the proxy C{service} at run time (open connections
        too): its C{type}, its conditions as keywords and its attributes as
        the other keywords.  Use it as a context manager to remove it at the
        end of the block.

            with netd.toxic("db", "latency", latency=100, stream="downstream") as t:
                ...
            assert t.fired == 1

        @raise AdminError: the toxic is refused (400 naming its key, 409 for a
            name in use).
        """
        conditions = {
            "name": name,
            "toxicity": toxicity,
            "client": client,
            "nth": nth,
            "times": times,
            "seed": seed,
            "scenario": scenario,
            "state": state,
            "next_state": next_state,
        }
        body = {
            "type": type,
            "stream": stream,
            "attributes": attributes,
            **{key: value for key, value in conditions.items() if value is not None},
        }
        described = self.admin(
            "POST", f"/api/services/{_quote(service)}/toxics", json.dumps(body).encode()
        )
        return ToxicHandle(self, service, described)

    def scenario(self, name: str, state: str | None = None) -> str:
        """A scenario's state; with C{state}, set it first."""
        path = f"/api/scenarios/{_quote(name)}"
        if state is not None:
            answer = self.admin("PUT", path, json.dumps({"state": state}).encode())
        else:
            answer = self.admin("GET", path)
        return str(answer["state"])

    def scenarios(self, **query: str) -> dict[str, str]:
        """Every scenario's state (C{namespace=NS}: the namespace's copies, C{NAME@NS})."""
        suffix = f"?{urllib.parse.urlencode(query)}" if query else ""
        found: dict[str, str] = self.admin("GET", f"/api/scenarios{suffix}")["scenarios"]
        return found

    def reset_scenarios(self) -> None:
        """Every scenario back to its state in the map."""
        self.admin("POST", "/api/scenarios/reset")

    def events(
        self,
        service: str | None = None,
        type: str | None = None,
        since: int = 0,
        wait: float = 0.0,
        namespace: str | None = None,
    ) -> list[dict[str, Any]]:
        """
        The event journal, newest last; C{wait} long-polls for a first match;
        C{namespace}: only the events of that namespace.
        """
        query = {"since": str(since), "wait": f"{wait:.3f}"}
        if service is not None:
            query["service"] = service
        if namespace is not None:
            query["namespace"] = namespace
        if type is not None:
            query["type"] = type
        # The socket waits longer than the long poll, or a quiet journal would
        # look like a dead daemon.
        answer = self.admin(
            "GET", f"/api/events?{urllib.parse.urlencode(query)}", timeout=wait + 30.0
        )
        found: list[dict[str, Any]] = answer["events"]
        return found

    def wait_for(
        self,
        service: str | None = None,
        type: str | None = None,
        timeout: float = 10.0,
        namespace: str | None = None,
        **match: Any,
    ) -> dict[str, Any]:
        """
        The first event, past or coming, of C{service} and C{type} (and
        C{namespace}) whose fields equal C{match}; raises L{TimeoutError} after
        C{timeout} seconds.
        """
        deadline = time.monotonic() + timeout
        since = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {type or 'event'} of {service or 'any service'} {match}")
            events = self.events(service, type, since, wait=min(left, 30.0), namespace=namespace)
            for event in events:
                if all(event.get(key) == value for key, value in match.items()):
                    return event
            if events:
                since = events[-1]["id"]

    def wait_for_count(
        self,
        service: str | None,
        type: str,
        count: int,
        timeout: float = 10.0,
        namespace: str | None = None,
    ) -> list[dict[str, Any]]:
        """
        The first C{count} events of C{service} and C{type} (and C{namespace}),
        past or coming: e.g. every connection of a test seen closed before its
        next step.
        """
        deadline = time.monotonic() + timeout
        found: list[dict[str, Any]] = []
        while len(found) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(found)} of {count} {type} of {service or 'any service'}")
            since = int(found[-1]["id"]) if found else 0
            found += self.events(service, type, since, wait=min(left, 30.0), namespace=namespace)
        return found[:count]

    def namespace(self, name: str) -> Namespace:
        """
        This daemon as one namespace sees it (L{netd.namespaces}): the same
        methods, each scoped to C{name}.  Its traffic carries C{name} as the
        services' C{namespace_from} reads it (L{Namespace.email},
        L{Namespace.headers}, L{Namespace.hostname}).
        """
        return Namespace(self, name)

    def forget_namespace(self, name: str) -> dict[str, Any]:
        """C{DELETE /api/namespaces/NAME}: its entries in every view, its rules and events."""
        answer: dict[str, Any] = self.admin("DELETE", f"/api/namespaces/{_quote(name)}")
        return answer

    def reload(self, config: str | Mapping[str, Any] | None = None) -> dict[str, Any]:
        """
        Apply a new map (or re-read the current one) without a restart.

        @raise AdminError: the map has errors; netd keeps the one it runs.
        """
        if config is not None:
            if self.config_path is None or not self._map_written:
                # Never overwrite a map file the caller owns.
                raise LookupError("reload(new map) needs a netd started from text or a mapping")
            # The same admin section as at start, so the admin port stays as it is.
            text = _map_text(config, admin=self._add_admin)
            _write_atomically(self.config_path, text)
        answer: dict[str, Any] = self.admin("POST", "/api/reload")
        if self.config_path is not None:
            self._config = load_config(self.config_path)
        # netd rewrites the ports file before it answers; the admin port itself
        # may have moved (a changed TLS profile rebuilds the admin server).
        self.ports = json.loads((self.workdir / "ports.json").read_text(encoding="utf-8"))
        return answer

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int:
        """
        SIGTERM, then wait; returns the exit status (kills after C{timeout}).
        An attached daemon is left running: 0.
        """
        if self._process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            if not _exits_within(self.process, timeout):
                self.process.kill()
            self.process.wait()
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None
        return self.process.returncode

    def __enter__(self) -> NetdProcess:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()


Pending = TypeVar("Pending")


class OffloadedNetd(Generic[Pending]):
    """
    L{NetdProcess} for asynchronous tests.

    Lookups (L{address}, L{url}, L{ca_file}) answer at once; every call that
    waits on netd runs in a thread and hands back what C{offload} makes of
    it: a L{Deferred} from L{start_deferred}, an awaitable from
    L{start_asyncio}.  C{async with} stops netd at the end of the block.
    """

    def __init__(self, netd: NetdProcess, offload: Callable[..., Pending]) -> None:
        self.netd = netd
        self._offload = offload

    def address(
        self,
        service: str,
        transport: str = "tcp",
        tls: bool | None = False,
        protocol: str | None = None,
    ) -> tuple[str, int]:
        return self.netd.address(service, transport, tls, protocol)

    def url(self, service: str, tls: bool | None = None, path: str = "/") -> str:
        return self.netd.url(service, tls, path)

    def ca_file(self, profile: str) -> Path:
        return self.netd.ca_file(profile)

    def messages(self, service: str, **query: str) -> Pending:
        return self._offload(self.netd.messages, service, **query)

    def message(self, service: str, message_id: str) -> Pending:
        return self._offload(self.netd.message, service, message_id)

    def links(self, service: str, message_id: str) -> Pending:
        return self._offload(self.netd.links, service, message_id)

    def codes(self, service: str, message_id: str) -> Pending:
        return self._offload(self.netd.codes, service, message_id)

    def wait_for_message(self, service: str, to: str, timeout: float = 10.0) -> Pending:
        return self._offload(self.netd.wait_for_message, service, to, timeout)

    def requests(self, service: str, unmatched: bool = False, **query: str) -> Pending:
        return self._offload(self.netd.requests, service, unmatched, **query)

    def queries(self, service: str, **query: str) -> Pending:
        return self._offload(self.netd.queries, service, **query)

    def sessions(self, service: str) -> Pending:
        return self._offload(self.netd.sessions, service)

    def reset(self, service: str) -> Pending:
        return self._offload(self.netd.reset, service)

    def scenario(self, name: str, state: str | None = None) -> Pending:
        return self._offload(self.netd.scenario, name, state)

    def events(self, service: str | None = None, type: str | None = None, **kwargs: Any) -> Pending:
        return self._offload(self.netd.events, service, type, **kwargs)

    def wait_for(
        self, service: str | None = None, type: str | None = None, **kwargs: Any
    ) -> Pending:
        return self._offload(self.netd.wait_for, service, type, **kwargs)

    def reload(self, config: str | Mapping[str, Any] | None = None) -> Pending:
        return self._offload(self.netd.reload, config)

    def stop(self) -> Pending:
        return self._offload(self.netd.stop)

    async def __aenter__(self) -> OffloadedNetd[Pending]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()  # type: ignore[misc]


class _Handoff:
    """
    A start in a thread that the waiting side may give up on (a timeout, a
    cancel): the daemon it starts is then stopped, never left running.
    """

    def __init__(self, config: str | Path | Mapping[str, Any], options: dict[str, Any]) -> None:
        self.config = config
        self.options = options
        self.lock = threading.Lock()
        self.given_up = False
        self.started: NetdProcess | None = None

    def start(self) -> NetdProcess:
        netd = NetdProcess.start(self.config, **self.options)
        with self.lock:
            if not self.given_up:
                self.started = netd
                return netd
        netd.stop()
        return netd

    def give_up(self) -> None:
        with self.lock:
            self.given_up = True
            netd, self.started = self.started, None
        if netd is not None:
            threading.Thread(target=netd.stop, name="netd-stop").start()


def start_deferred(
    config: str | Path | Mapping[str, Any], **kwargs: Any
) -> Deferred[OffloadedNetd[Deferred[Any]]]:
    """
    L{NetdProcess.start} for Twisted tests (trial, pytest-twisted): a L{Deferred},
    which may be cancelled.
    """
    from twisted.internet.threads import deferToThread

    handoff = _Handoff(config, kwargs)
    started: Deferred[OffloadedNetd[Deferred[Any]]] = Deferred(lambda _: handoff.give_up())

    def ready(netd: NetdProcess) -> None:
        if not started.called:
            started.callback(OffloadedNetd(netd, deferToThread))

    def failed(failure: Failure) -> None:
        if not started.called:
            started.errback(failure)

    deferToThread(handoff.start).addCallbacks(ready, failed)
    return started


async def start_asyncio(
    config: str | Path | Mapping[str, Any], **kwargs: Any
) -> OffloadedNetd[Coroutine[Any, Any, Any]]:
    """
    L{NetdProcess.start} for asyncio tests: C{async with await start_asyncio(...)};
    a timeout or cancel while it starts stops the daemon it was starting.
    """
    handoff = _Handoff(config, kwargs)
    try:
        netd = await asyncio.shield(asyncio.to_thread(handoff.start))
    except asyncio.CancelledError:
        handoff.give_up()
        raise
    return OffloadedNetd(netd, asyncio.to_thread)


def _load_yaml(text: str) -> dict[str, Any] | None:
    """The map's top level, or None if it is not YAML (netd will say why)."""
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    return loaded if isinstance(loaded, dict) else {}


_ADMIN_LISTENER = "tcp:0:interface=127.0.0.1"
_ADMIN_SECTION = f'\nadmin: {{listen: ["{_ADMIN_LISTENER}"]}}\n'


def _map_text(config: str | Mapping[str, Any], admin: bool) -> str:
    """The map as YAML, with a loopback admin listener added if asked and absent."""
    text = config if isinstance(config, str) else yaml.safe_dump(dict(config), sort_keys=False)
    top = _load_yaml(text)
    if not admin or top is None or "admin" in top:
        return text
    # Appended, not merged, so the positions in netd's errors match the text given;
    # a map in flow style (JSON, say) or indented as a whole cannot take a block
    # key after it, and is written out again instead.
    appended = text + _ADMIN_SECTION
    if "admin" in (_load_yaml(appended) or {}):
        return appended
    return yaml.safe_dump({**top, "admin": {"listen": [_ADMIN_LISTENER]}}, sort_keys=False)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)


def _quote(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
