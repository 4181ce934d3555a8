"""
netd's stress probes (C{make stress}): kill -9 around SMTP accepts, seeded
fuzzing per protocol, security batteries, slow and non-reading clients,
half-close per kind and reloads under load, against real daemons on loopback.
"""
