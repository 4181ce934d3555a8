"""The README's examples of netd in other projects' tests are tests themselves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = (Path(__file__).parents[2] / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.DOTALL)


def test_using_netd_in_your_tests_examples_pass(pytester: pytest.Pytester) -> None:
    examples = python_blocks(section("Using netd in your tests"))
    assert examples
    for number, example in enumerate(examples):
        pytester.makepyfile(**{f"test_readme_{number}": example})
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist")
    result.assert_outcomes(passed=sum(len(re.findall(r"^def test_", e, re.M)) for e in examples))


def test_namespaces_recipe_passes_under_two_workers(pytester: pytest.Pytester) -> None:
    examples = python_blocks(section("Namespaces: one daemon for a parallel test run"))
    assert len(examples) == 2
    for number, example in enumerate(examples):
        pytester.makepyfile(**{f"test_readme_ns_{number}": example})
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    # Four mail tests (one per user), the retry, the HTTP and the DNS test.
    result.assert_outcomes(passed=7)
