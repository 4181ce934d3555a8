"""
The C{netd} command: C{netd check FILE} and C{netd run FILE [--ports-file PATH]}.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from netd.config import NetdConfig

__all__ = ["main"]


def _plan(config: NetdConfig) -> str:
    from netd import endpoints

    lines = [f"{config.file}: {len(config.services)} services, state in {config.state_dir}"]
    for name, service in config.services.items():
        state = "" if service.enabled else " (disabled)"
        workers = f", {service.workers} workers" if service.workers else ""
        lines.append(f"  {name} ({service.type}){workers}{state}")
        for listener in service.listen:
            extras = []
            if listener.tls_profile:
                extras.append(f"tls={listener.tls_profile}")
            elif listener.tls:
                extras.append("tls")
            if listener.protocol:
                extras.append(f"protocol={listener.protocol}")
            kind = "udp" if listener.datagram else "stream"
            suffix = f" [{', '.join(extras)}]" if extras else ""
            lines.append(f"    {kind} {listener.endpoint}{suffix}")
    if config.admin is not None:
        token = "token" if config.admin.token else "no token"
        for listener in config.admin.listen:
            loopback = "loopback" if endpoints.is_loopback(listener.endpoint) else "public"
            lines.append(f"  admin: {listener.endpoint} ({loopback}, {token})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate FILE and print the plan")
    check.add_argument("file")
    run = commands.add_parser("run", help="run FILE in the foreground, logging to stdout")
    run.add_argument("file")
    run.add_argument("--ports-file")
    arguments = parser.parse_args(argv)

    if arguments.command == "check":
        # Imported here: under `netd run` the daemon's makeService must be the
        # first to import PyYAML (netd.keep_libyaml_out).
        from netd.config import ConfigErrors, load_config

        try:
            config = load_config(arguments.file)
        except ConfigErrors as e:
            print(e, file=sys.stderr)
            return 1
        print(_plan(config))
        return 0

    from netd.compat import run_twistd_with
    from twisted.plugins.netd_plugin import netd

    sys.argv = ["netd", "--nodaemon", "--pidfile=", "netd", "-c", arguments.file]
    if arguments.ports_file:
        sys.argv += ["--ports-file", arguments.ports_file]
    run_twistd_with(netd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
