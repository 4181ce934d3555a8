"""The address readers every kind uses: networks, HOST[:PORT], host names, client checks."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv6Address, UNIXAddress

from netd.schema import LOOPBACK, Problems, Value, compose, in_networks


def read(text: str, reader: Any) -> tuple[Any, list[str]]:
    problems = Problems()
    node = compose(f"x: {text}\n", "map.yaml", problems)
    assert node is not None
    root = Value(node, "", "map.yaml", Path("."), problems)
    value = dict(root.items())["x"]
    return reader(value), [f"{e.path}: {e.message}" for e in problems.errors]


@pytest.mark.parametrize(
    ("text", "numeric", "expected"),
    [
        ("relay.test", False, ("relay.test", 25)),
        ("relay.test.:2526", False, ("relay.test", 2526)),
        ("127.0.0.1:2526", True, ("127.0.0.1", 2526)),
        ("'::1'", True, ("::1", 25)),
        ("'[::1]:2526'", True, ("::1", 2526)),
        ("'[0:0::1]'", True, ("::1", 25)),
    ],
)
def test_host_port(text: str, numeric: bool, expected: tuple[str, int]) -> None:
    assert read(text, lambda v: v.as_host_port(25, numeric=numeric)) == (expected, [])


@pytest.mark.parametrize(
    ("text", "numeric"),
    [
        ("relay.test", True),
        ("'h:99999'", False),
        ("'h:0'", False),
        ("'h:'", False),
        ("'[::1]2526'", False),
        ("'bad host:25'", False),
        ("'a..b'", False),
        ("'1::2::3'", False),
        ("[a, b]", False),
    ],
)
def test_host_port_refused(text: str, numeric: bool) -> None:
    value, errors = read(text, lambda v: v.as_host_port(25, numeric=numeric))
    assert value is None and len(errors) == 1


def test_hostnames_and_networks() -> None:
    assert read("mx.netd.test.", Value.as_hostname) == ("mx.netd.test", [])
    assert read("'not a host'", Value.as_hostname) == (
        None,
        ["x: not a host name: 'not a host'"],
    )
    assert read("10.1.2.3/8", Value.as_network) == (ipaddress.ip_network("10.0.0.0/8"), [])
    assert read("10.0.0.0/33", Value.as_network)[1] == [
        "x: not an address or network: '10.0.0.0/33'"
    ]


def test_client_checks_unmap_ipv4_and_refuse_what_has_no_address() -> None:
    assert in_networks("::ffff:127.0.0.1", LOOPBACK)
    assert in_networks(IPv6Address("TCP", "::1", 5), LOOPBACK)
    assert not in_networks("::ffff:10.0.0.1", LOOPBACK)
    assert not in_networks(UNIXAddress(b"/run/x.sock"), LOOPBACK)
    assert not in_networks("not an address", LOOPBACK)
