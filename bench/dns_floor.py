"""
The least a CPython DNS server can cost a query: no reactor, no parsing, no
counters, one blocking loop of recvfrom, a dict lookup and sendto.

    python bench/dns_floor.py PORT UPSTREAM_PORT

Not a DNS server: an answer is learned once by asking the upstream (the warm-up
pass does that) and then sent again, ID aside, byte for byte, its TTLs never
counting down.  dns_bench.py runs it as the ``python-floor`` peer, so a run says
how far netd is from what the interpreter itself costs, and how far that is from
dnsmasq.
"""

from __future__ import annotations

import socket
import sys


def serve(port: int, upstream: int) -> None:
    learned: dict[bytes, bytes] = {}
    asker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    asker.settimeout(2)
    asker.connect(("127.0.0.1", upstream))
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", port))
    recvfrom, sendto, known = server.recvfrom, server.sendto, learned.get
    while True:
        query, client = recvfrom(4096)
        answer = known(query[2:])
        if answer is None:
            try:
                asker.send(query)
                answer = asker.recv(4096)[2:]
            except OSError:
                continue
            learned[query[2:]] = answer
        sendto(query[:2] + answer, client)


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
