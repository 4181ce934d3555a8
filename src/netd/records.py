"""
The base of netd's attrs classes: one C{__repr__} for all of them.

attrs writes the source of every method it adds and compiles it when the class is
defined, so each class costs start-up time in C{compile}.  Of the methods it
adds, C{__repr__} is the dearest to compile (its f-strings), and the one no
request needs: for netd's ~120 classes it was 10-29 ms of the showcase map's start
to ready (median 17 ms, 7 alternating pairs of 9 starts).  So every netd attrs
class is declared C{repr=False} and inherits this one, which reads the fields
attrs recorded: the same text as attrs' own repr.  tests/unit/test_records.py
checks that no netd class carries a generated repr.
"""

from __future__ import annotations

import reprlib
from typing import Any

import attrs

__all__ = ["Record"]


class Record:
    """
    Mixed into every netd attrs class (declared with C{repr=False}); holds no
    state of its own, so slotted classes stay slotted.
    """

    __slots__ = ()

    @reprlib.recursive_repr()
    def __repr__(self) -> str:
        shown = []
        described: Any = type(self)  # an attrs class: every subclass is decorated
        for field in attrs.fields(described):
            if field.repr is False:
                continue
            value = getattr(self, field.name, attrs.NOTHING)
            text = repr(value) if field.repr is True else field.repr(value)
            shown.append(f"{field.name}={text}")
        # attrs' own form: a class defined in a function has "<locals>." in its qualname.
        name = type(self).__qualname__.rsplit(">.", 1)[-1]
        return f"{name}({', '.join(shown)})"
