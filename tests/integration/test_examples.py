"""Every shipped example map starts, as a user would start it, on free ports."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from netd.testing import NetdProcess

CONFIG = Path(__file__).parents[2] / "config"
# Maps whose listeners only a service manager can hand over; tests/integration/test_systemd.py.
NEEDS_SYSTEMD = {"systemd.yaml"}


def on_free_ports(text: str) -> str:
    return re.sub(r"\b(tcp|udp|ssl):\d+", r"\1:0", text)


def copy_with_free_ports(into: Path) -> Path:
    """The config tree, copied so relative paths (root: ., state) still hold."""
    copy = into / "config"
    shutil.copytree(CONFIG, copy, ignore=shutil.ignore_patterns("state"))
    for example in copy.glob("**/*.yaml"):
        example.write_text(on_free_ports(example.read_text()))
    return copy


@pytest.mark.parametrize(
    "name",
    sorted(
        str(p.relative_to(CONFIG)) for p in CONFIG.glob("**/*.yaml") if p.name not in NEEDS_SYSTEMD
    ),
)
def test_example_starts_and_every_service_runs(tmp_path: Path, name: str) -> None:
    example = copy_with_free_ports(tmp_path) / name
    with NetdProcess.start(example, tmp_path / "run") as netd:
        services = netd.ports["services"]
        assert services
        for service in services.values():
            assert service["listeners"], service
            assert all(
                listener["port"] != 0 for listener in service["listeners"] if "port" in listener
            )
