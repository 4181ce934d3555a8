"""
The smtp kind's C{mx} delivery: MX records through twisted.names, then A and
AAAA, then one SMTP transaction per recipient domain.

twisted.mail's C{MXCalculator} lives in the broken C{relaymanager}; this is the
small part of it a null client needs: RFC 5321 5.1 (MX by preference, the
domain itself when it has none) and RFC 7505 (a null MX refuses mail).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.names import client, dns
from twisted.names.error import DNSNameError
from twisted.python.failure import Failure

from netd.records import Record
from netd.services.smtp.relay import (
    Outcome,
    Replies,
    Send,
    SmarthostOptions,
    client_tls,
    error_reply,
    send_message,
)
from netd.services.smtp.spool import Envelope

__all__ = ["MxOptions", "mx_sender", "resolver_for"]


@attrs.frozen(repr=False)
class MxOptions(Record):
    """
    @ivar port: the port every exchanger is reached on (25; tests use others).
    @ivar resolver: a DNS server as (host, port); None reads /etc/resolv.conf.
    """

    port: int = 25
    tls: str = "opportunistic"
    timeout: float = 60.0
    resolver: tuple[str, int] | None = None


class _Refused(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


def resolver_for(reactor: Any, options: MxOptions) -> Any:
    if options.resolver is not None:
        return client.Resolver(servers=[options.resolver], reactor=reactor)
    return client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)


async def exchangers(resolver: Any, domain: str) -> list[str]:
    """The hosts to try for C{domain}, best first."""
    try:
        answers, _, _ = await resolver.lookupMailExchange(domain)
    except DNSNameError:
        raise _Refused(550, "5.1.2 No such domain") from None
    except Exception as e:
        raise _Refused(451, f"4.4.3 MX lookup failed: {e}") from None
    records = sorted(
        (answer.payload.preference, str(answer.payload.name).rstrip("."))
        for answer in answers
        if answer.type == dns.MX
    )
    if not records:
        return [domain]  # RFC 5321 5.1: the domain is its own exchanger
    hosts = [name for _, name in records if name]
    if not hosts:
        raise _Refused(556, "5.1.10 The domain accepts no mail (null MX)")
    return hosts


async def addresses(resolver: Any, host: str) -> list[tuple[int, str]]:
    """(family, address) of C{host}: IPv4 first, then IPv6; none if it has neither."""
    found: list[tuple[int, str]] = []
    for lookup, family in (
        (resolver.lookupAddress, socket.AF_INET),
        (resolver.lookupIPV6Address, socket.AF_INET6),
    ):
        try:
            answers, _, _ = await lookup(host)
        except Exception:
            continue
        for answer in answers:
            if answer.type == dns.A:
                found.append((family, answer.payload.dottedQuad()))
            elif answer.type == dns.AAAA:
                found.append((family, socket.inet_ntop(socket.AF_INET6, answer.payload.address)))
    return found


def mx_sender(reactor: Any, hostname: str, options: MxOptions, resolver: Any) -> Send:
    """Sends each message to the exchangers of its recipients' domains."""

    async def to_domain(
        envelope: Envelope, domain: str, recipients: Sequence[str], data: bytes
    ) -> Outcome:
        try:
            hosts = await exchangers(resolver, domain)
        except _Refused as refused:
            return dict.fromkeys(recipients, (refused.code, refused.text))
        last = (451, f"4.4.4 No exchanger of {domain} has an address")
        for host in hosts:
            hop = SmarthostOptions(
                host=host, port=options.port, tls=options.tls, timeout=options.timeout
            )
            for family, address in await addresses(resolver, host):
                kind = TCP4ClientEndpoint if family == socket.AF_INET else TCP6ClientEndpoint
                endpoint = kind(reactor, address, options.port, timeout=options.timeout)
                try:
                    outcome: Outcome = await send_message(
                        hostname,
                        hop,
                        client_tls(hop),
                        endpoint,
                        envelope,
                        recipients,
                        data,
                    )
                except Exception:
                    last = (451, f"4.4.1 {host} [{address}]: {error_reply(Failure())}")
                    continue
                return outcome
        return dict.fromkeys(recipients, last)

    def send(envelope: Envelope, data: bytes) -> Deferred[Outcome]:
        by_domain: dict[str, list[str]] = {}
        for recipient in envelope.recipients:
            by_domain.setdefault(recipient.rpartition("@")[2].lower(), []).append(recipient)
        attempts = [
            Deferred.fromCoroutine(to_domain(envelope, domain, recipients, data))
            for domain, recipients in by_domain.items()
        ]

        def merge(outcomes: list[Outcome]) -> Outcome:
            merged = Replies()
            for outcome in outcomes:
                merged.update(outcome)
                if isinstance(outcome, Replies):
                    merged.passed_on |= outcome.passed_on
                    merged.plaintext_after = merged.plaintext_after or outcome.plaintext_after
            return merged

        return gatherResults(attempts, consumeErrors=True).addCallback(merge)

    return send
