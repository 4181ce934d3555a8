"""
The C{dns} service kind: authoritative local records, a forwarding resolver with
its own cache, over UDP, TCP and DNS over TLS (C{ssl:} listeners, RFC 7858).

    dns:
      type: dns
      listen: ["udp:5353", "tcp:5353", {endpoint: "ssl:8853", tls: lab}]
      records:
        www.netd.test: {A: [127.0.0.1], AAAA: ["::1"]}
        "*.apps.netd.test": {A: [127.0.0.2]}
      forward: ["127.0.0.1:5300", "https://127.0.0.1:8443/dns-query"]
      cache: {size: 10000, max_ttl: 86400, negative_ttl: 300}
      udp_payload: 1232
      query_log: true
      persist: live-records.json
      doh: [{endpoint: "ssl:8443", tls: lab}]   # DNS over HTTPS, /dns-query

Local records change at run time through the admin API's C{records} view
(L{netd.services.dns.live}) and TSIG-signed RFC 2136 UPDATE messages
(L{netd.services.dns.update}); a reload keeps those changes.

Queries are read and answered at the byte level (L{netd.services.dns.wire}):
local answers are prepared once per name and type, cached upstream answers are
kept as the upstream sent them.  twisted.names encodes the configured records.
"""

from __future__ import annotations

from twisted.application.service import MultiService
from twisted.internet.interfaces import IProtocolFactory

from netd.config import ListenerConfig, ServiceConfig
from netd.kinds import AdminView, BuildContext, Handlers, ServiceKind
from netd.namespaces import suffix_source
from netd.services.dns.forward import ForwardingService
from netd.services.dns.live import RecordsService, records_view
from netd.services.dns.options import CacheOptions, Options, parse
from netd.services.dns.rules import RULES
from netd.services.dns.server import Datagrams, Server, StreamFactory

__all__ = ["DNS", "CacheOptions", "Options"]


def build(service: ServiceConfig, context: BuildContext) -> Handlers:
    options: Options = service.options
    server = Server(options, context)
    factory = StreamFactory(server, service.idle_timeout)
    doh: IProtocolFactory | None = None
    if any(listener.protocol == "doh" for listener in service.listen):
        # h2 only for a service that serves DNS over HTTPS.
        from netd.services.dns.doh import DoHFactory

        doh = DoHFactory(server, service.idle_timeout)

    services = MultiService()
    RecordsService(server.records).setServiceParent(services)
    if server.recorder is not None:
        server.recorder.setServiceParent(services)
    if server.forwarder is not None:
        ForwardingService(server.forwarder).setServiceParent(services)

    def stream(listener: ListenerConfig) -> IProtocolFactory:
        if listener.protocol == "doh":
            assert doh is not None
            return doh
        return factory

    def datagram(listener: ListenerConfig) -> Datagrams:
        return Datagrams(server)

    return Handlers(
        stream=stream,
        datagram=datagram,
        service=services,
        views={
            "queries": AdminView(
                list=server.list_queries,
                clear=server.clear_queries,
                forget=server.forget_queries,
            ),
            "records": records_view(server.records, options.ttl),
        },
        # With workers, the main process holds the live records: a worker that
        # replaces a dead one, or a rebuilt service's, starts with them.
        keep=server.records.publish,
        kept_views=frozenset({"records"}),
    )


def _workers_refusal(options: Options) -> str | None:
    # Each of these changes records or a file that every worker would need to
    # share: an UPDATE reaches one worker, and each would write its own file.
    if options.update.keys:
        return "'update' changes the records of the one worker it reaches (run one process)"
    if options.persist is not None or options.record_to is not None:
        return "'persist' and 'record_to' write one file from one process (run one process)"
    return None


DNS: ServiceKind[Options] = ServiceKind(
    "dns",
    parse,
    build,
    datagram=True,
    workers=True,
    workers_refusal=_workers_refusal,
    rules=RULES,
    listener_keys=("doh",),
    # namespace_from: the query name's label under a suffix (www.t42.lab.test -> t42).
    namespaces={"suffix": suffix_source("name")},
)
