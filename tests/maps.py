"""
Maps the tests share: one service parsed for its section's unit tests, and
maps for the real daemon with the preamble several modules had in common.
"""

from __future__ import annotations

from pathlib import Path
from typing import Generic, TypeVar

import attrs
import bcrypt
import pytest

from netd.config import ConfigErrors, parse_config

Options = TypeVar("Options")


@attrs.frozen
class ServiceMap(Generic[Options]):
    """
    A map with one service, C{name} of C{kind}, whose section the test
    writes: the preamble every kind's option tests share.
    """

    kind: str
    name: str
    options_type: type[Options]
    listen: str = "['tcp:0']"
    top: str = ""  # top-level keys the section refers to (a TLS profile, say)

    def parse(self, tmp_path: Path, section: str, top: str = "") -> Options:
        """The service's options after C{section} (indented under it) is parsed."""
        text = (
            f"{self.top}{top}services:\n  {self.name}:\n    type: {self.kind}\n"
            f"    listen: {self.listen}\n{section}"
        )
        options = parse_config(text, tmp_path / "netd.yaml").services[self.name].options
        assert isinstance(options, self.options_type)
        return options

    def errors(self, tmp_path: Path, section: str) -> list[str]:
        """Every error C{section} is refused with, each with its file position."""
        with pytest.raises(ConfigErrors) as raised:
            self.parse(tmp_path, section)
        return [str(e) for e in raised.value.errors]


def proxying(port: int, path: str, timeout: float, record: int | None = None) -> str:
    """
    A map whose http service C{web} proxies what is under C{path} to the root
    of an upstream on loopback C{port}, recording the last C{record} requests
    if given.
    """
    recording = "" if record is None else f"    record: {record}\n"
    return (
        "services:\n  web:\n    type: http\n"
        '    listen: ["tcp:0:interface=127.0.0.1"]\n'
        f"{recording}    routes:\n"
        f'      - {{path: {path}, proxy: "http://127.0.0.1:{port}/", timeout: {timeout}}}\n'
    )


def lab_map(services: str, state_dir: str | Path = "state", shutdown_grace: float = 1) -> str:
    """
    A map for the real daemon: C{services} (the YAML under C{services:}, each
    service indented two spaces) with the self-signed TLS profile C{lab} for
    localhost and 127.0.0.1, and a short C{shutdown_grace} so stopping is quick.
    C{netd.testing} adds the admin listener.
    """
    return (
        f"state_dir: {state_dir}\n"
        f"shutdown_grace: {shutdown_grace}\n"
        "tls:\n"
        "  lab: {self_signed: [localhost, 127.0.0.1]}\n"
        f"services:\n{services.lstrip(chr(10))}"
    )


def files_service(site: Path, listen: str = "", users: str = "", **extra: str) -> str:
    """
    The ftp service C{files} the ftp tests share, for L{lab_map}: plain and
    implicit FTPS listeners on 127.0.0.1 (and the list items C{listen}),
    anonymous reading C{site}/pub, alice writing in C{site}/alice (and the
    entries C{users}), AUTH TLS; C{extra} keys added to it.
    """
    return (
        f"""
  files:
    type: ftp
    listen:
      - "tcp:0:interface=127.0.0.1"
      - {{endpoint: "ssl:0:interface=127.0.0.1", tls: lab}}{listen}
    root: {site / "pub"}
    anonymous: read
    users:
      alice: {{password: wonderland, home: {site / "alice"}, write: true}}{users}
    tls: lab
"""
    ) + "".join(f"    {key}: {value}\n" for key, value in extra.items())


# Cost 4 keeps the test fast; the map takes any bcrypt cost.
BOB_HASH = bcrypt.hashpw(b"secret", bcrypt.gensalt(4)).decode()


def mail_map(state_dir: Path, **extra: str) -> str:
    """
    The smtp service C{mail} the smtp tests share: capture mode, STARTTLS and
    TLS on connect, AUTH for bob and carol; C{extra} keys added to it.
    """
    text = lab_map(
        f"""
  mail:
    type: smtp
    listen:
      - "tcp:0:interface=127.0.0.1"
      - {{endpoint: "ssl:0:interface=127.0.0.1", tls: lab}}
    hostname: mx.netd.test
    tls: lab
    max_message_size: 65536
    max_recipients: 5
    max_connections_per_client: 8
    auth: {{users: {{bob: {{password: "{BOB_HASH}"}}, carol: {{password: plain}}}}}}
    relay: {{allow_from: [], domains: [netd.test]}}
""",
        state_dir,
        shutdown_grace=2,
    )
    return text + "".join(f"    {key}: {value}\n" for key, value in extra.items())


def relaying(state_dir: Path, delivery: str) -> str:
    """L{mail_map}, relaying for 127.0.0.1 with C{delivery} (the inside of its flow mapping)."""
    return mail_map(state_dir).replace("allow_from: []", "allow_from: [127.0.0.1]") + (
        f"    delivery: {{{delivery}}}\n"
    )
