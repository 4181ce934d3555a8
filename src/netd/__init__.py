"""netd: one Twisted daemon hosting many small network services from one YAML map."""

__version__ = "0.1.0"
