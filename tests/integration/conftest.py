"""Every test under this folder starts the real daemon: the slow tier."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Marked here rather than module by module, so no new module can forget it
    # and `pytest -m "not integration"` is the fast tier alone.  First, so the
    # mark is on before `-m` deselects.
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.integration)
