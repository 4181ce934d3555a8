"""
twistd's entry point: C{twistd [-n] netd -c FILE [--ports-file PATH]}.

Option parsing only records what was asked; L{makeService} loads and checks the
service map, then hands back the service tree for twistd to start
(L{netd.twistd_service}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.python import usage

import netd

if TYPE_CHECKING:
    from twisted.application.service import IService

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    synopsis = "-c FILE [--ports-file PATH]"
    longdesc = "Run every enabled service of the YAML service map FILE in one reactor."
    optParameters = [
        ["config", "c", None, "the service map (YAML)"],
        ["ports-file", None, None, "write the bound listeners here as JSON once ready"],
    ]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("give the service map with -c FILE")


def makeService(options: Options) -> IService:
    # The daemon's modules are imported only now, after PyYAML's libyaml
    # binding is kept out (as under `netd run`): they import PyYAML.
    netd.keep_libyaml_out()
    from netd.twistd_service import make_service

    return make_service(options)
