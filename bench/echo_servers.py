#!/usr/bin/env python3
"""
The reference echo servers netd is compared with: the frameworks' own ceilings.

    echo_servers.py twisted|twisted-without-tls|asyncio

Each binds 127.0.0.1 on a free port (backlog 1024), prints the port on one line
and serves until SIGTERM/SIGINT.  They are as small as the peer baseline's
(peer-bench servers/echo_twisted.py, echo_asyncio.py): a Protocol whose
dataReceived writes the data back.  Each framework is imported only inside its own
function, so neither server's idle RSS includes the other framework.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from typing import Any


def serve_twisted() -> None:
    """Plain Twisted (the default reactor, epoll on Linux)."""
    from twisted.internet import protocol
    from twisted.internet import reactor as installed

    reactor: Any = installed  # the module object stands for the installed reactor

    class Echo(protocol.Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(data)  # type: ignore[union-attr]

    factory: Any = protocol.Factory.forProtocol(Echo)
    factory.noisy = False
    port = reactor.listenTCP(0, factory, backlog=1024, interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    reactor.run()


def serve_twisted_without_tls() -> None:
    """
    Plain Twisted as in a venv without pyOpenSSL (the peer baseline's): Twisted's
    TCP transport imports its TLS support, and with it pyOpenSSL and cryptography,
    whenever they are installed, which netd's venv always has.
    """
    sys.modules["OpenSSL"] = None  # type: ignore[assignment]  # import fails: no TLS support
    serve_twisted()


def serve_asyncio() -> None:
    """Plain asyncio (the default event loop, no uvloop)."""
    import asyncio

    class Echo(asyncio.Protocol):
        transport: Any

        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        # A clean stop on SIGTERM, like twistd: the driver stops servers with SIGTERM.
        loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
        server = await loop.create_server(Echo, "127.0.0.1", 0, backlog=1024)
        print(server.sockets[0].getsockname()[1], flush=True)
        async with server:
            await stop

    asyncio.run(main())


def main(argv: list[str]) -> int:
    servers = {
        "twisted": serve_twisted,
        "twisted-without-tls": serve_twisted_without_tls,
        "asyncio": serve_asyncio,
    }
    if len(argv) != 1 or argv[0] not in servers:
        sys.stderr.write(f"usage: echo_servers.py {'|'.join(servers)}\n")
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        servers[argv[0]]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
