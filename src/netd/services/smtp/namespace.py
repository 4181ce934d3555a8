"""What an SMTP exchange carries for its namespace (L{netd.namespaces})."""

from __future__ import annotations

from collections.abc import Iterable

from netd.namespaces import Namespacing

__all__ = ["derive_namespace"]


def derive_namespace(
    namespaces: Namespacing, recipients: Iterable[str], user: str | None, client: str
) -> str | None:
    """The namespace of a session's mail: from its recipients, its AUTH user, its client."""
    if not namespaces.enabled:
        return None
    addresses = [str(r) for r in recipients]
    return namespaces.derive(
        recipients=addresses,
        domains=[a.rpartition("@")[2] for a in addresses],
        user=user,
        client=client,
    )
