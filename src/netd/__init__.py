"""netd: one Twisted daemon hosting many small network services from one YAML map."""

import os
import sys

__version__ = "0.1.0"

# systemd's socket-passing variables as this process found them (sd_listen_fds(3)),
# read when netd is first imported, before twisted.internet.endpoints: Twisted's
# systemd: parser removes LISTEN_FDS and LISTEN_PID from the environment, and
# keeps no descriptor at all when LISTEN_FDNAMES is missing (a launcher that
# names none, as systemd-socket-activate without --fdname), which
# sd_listen_fds_with_names(3) reads as the name "unknown" for each.
LISTEN_ENVIRONMENT = {
    name: os.environ[name]
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
    if name in os.environ
}


def keep_libyaml_out() -> None:
    """
    Keep PyYAML's libyaml binding out of a process about to become the daemon,
    if PyYAML is not imported yet: `import yaml` loads it when installed, and
    netd never uses it (it composes maps in Python, to keep every node's
    position); about 0.2 MiB of idle RSS.
    """
    if "yaml" not in sys.modules:
        sys.modules["yaml._yaml"] = None  # type: ignore[assignment]  # an ImportError to PyYAML
