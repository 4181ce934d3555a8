"""netd's attrs classes share netd.records.Record's repr instead of compiling their own."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import attrs
import pytest

import netd
from netd.records import Record


def _netd_attrs_classes() -> list[type[Any]]:
    found = []
    for module_info in pkgutil.walk_packages(netd.__path__, "netd."):
        module = importlib.import_module(module_info.name)
        for value in vars(module).values():
            if isinstance(value, type) and value.__module__ == module.__name__ and attrs.has(value):
                found.append(value)
    return found


CLASSES = _netd_attrs_classes()


def test_every_kind_module_was_seen() -> None:
    # The walk must reach the kinds' packages, where most classes are.
    modules = {cls.__module__ for cls in CLASSES}
    assert {"netd.config", "netd.services.smtp.server", "netd.services.dns.options"} <= modules
    assert len(CLASSES) > 100


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: f"{cls.__module__}.{cls.__qualname__}")
def test_attrs_class_has_no_generated_repr(cls: type[Any]) -> None:
    assert issubclass(cls, Record)
    assert cls.__repr__ is Record.__repr__ or not cls.__repr__.__code__.co_filename.startswith(
        "<attrs generated"
    )


@attrs.frozen(repr=False)
class _Shown(Record):
    name: str
    port: int
    secret: bytes = attrs.field(default=b"key", repr=False)
    hint: str = attrs.field(default="x", repr=lambda value: f"<{len(value)} chars>")


@attrs.frozen
class _Generated:
    name: str
    port: int
    secret: bytes = attrs.field(default=b"key", repr=False)
    hint: str = attrs.field(default="x", repr=lambda value: f"<{len(value)} chars>")


def test_repr_reads_as_attrs_own() -> None:
    shown = repr(_Shown("mail", 25, hint="abc"))
    assert shown == "_Shown(name='mail', port=25, hint=<3 chars>)"
    assert shown.replace("_Shown", "_Generated") == repr(_Generated("mail", 25, hint="abc"))


@attrs.define(repr=False)
class _Node(Record):
    name: str
    child: Any = None


def test_repr_of_a_cycle_stops() -> None:
    node = _Node("a")
    node.child = node
    assert repr(node) == "_Node(name='a', child=...)"
