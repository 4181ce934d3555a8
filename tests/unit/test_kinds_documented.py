"""Every service kind has its module, an example map that checks, and a README section."""

from __future__ import annotations

from pathlib import Path

import pytest

from netd.config import load_config
from netd.kinds import ServiceKind
from netd.services import KINDS, load_kind

ROOT = Path(__file__).parents[2]
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("name", list(KINDS))
def test_kind_is_loaded_from_its_table_entry(name: str) -> None:
    kind = load_kind(name)
    assert isinstance(kind, ServiceKind) and kind.name == name


@pytest.mark.parametrize("name", list(KINDS))
def test_kind_has_an_example_and_a_readme_section(name: str) -> None:
    module = KINDS[name].partition(":")[0].rsplit(".", 1)[1]
    example = ROOT / "config" / "examples" / f"{module}.yaml"
    config = load_config(example)
    assert name in {service.type for service in config.services.values()}
    headings = [line for line in README.splitlines() if line.startswith("### ")]
    assert any(name in heading.removeprefix("### ").split(", ") for heading in headings)


@pytest.mark.parametrize("example", sorted((ROOT / "config").glob("**/*.yaml")), ids=str)
def test_every_shipped_map_checks(example: Path) -> None:
    load_config(example)
