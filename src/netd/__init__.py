"""netd: one Twisted daemon hosting many small network services from one YAML map."""

import sys

__version__ = "0.1.0"


def keep_libyaml_out() -> None:
    """
    Keep PyYAML's libyaml binding out of a process about to become the daemon,
    if PyYAML is not imported yet: `import yaml` loads it when installed, and
    netd never uses it (it composes maps in Python, to keep every node's
    position); about 0.2 MiB of idle RSS.
    """
    if "yaml" not in sys.modules:
        sys.modules["yaml._yaml"] = None  # type: ignore[assignment]  # an ImportError to PyYAML
