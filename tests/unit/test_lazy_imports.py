"""
What a small map loads: the heavy imports (twisted.web and h2, twisted.mail,
twisted.names, prometheus-client, TLS profiles, kinds not in the map) only
when the map uses them.

Each case starts netd in a fresh interpreter (what is imported depends on
everything imported before), serves one echo round trip, and reports the
modules it loaded.  A module kept out here is memory and start-up time an echo
daemon does not pay; README "Performance" has the figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# Starts the map's daemon as twistd would (netd.tap imported first, as by twistd),
# waits until it is ready, echoes one message through the service "echo", then
# prints the loaded modules' names.
_SERVE_ONE_ECHO = """
import json, sys
from netd.tap import Options, makeService
from twisted.internet import protocol, reactor

options = Options()
options.parseOptions(["-c", sys.argv[1]])
root = makeService(options)
daemon = root.daemon

class Once(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(b"ping")

    def dataReceived(self, data):
        assert data == b"ping", data
        self.transport.loseConnection()
        reactor.stop()

class Ready:
    def ready(self, daemon):
        port = daemon.ports()["services"]["echo"]["listeners"][0]["port"]
        protocol.ClientCreator(reactor, Once).connectTCP("127.0.0.1", port)

    def reloading(self, daemon): pass
    def reloaded(self, daemon): pass
    def stopping(self, daemon): pass

daemon.observers.append(Ready())
reactor.callLater(20, reactor.stop)  # a bound on a daemon that never answers
root.privilegedStartService()
root.startService()
reactor.run()
print(json.dumps(sorted(name for name, module in sys.modules.items() if module is not None)))
"""

_ECHO_ONLY = """\
state_dir: state
services:
  echo:
    type: echo
    listen: ["tcp:0:interface=127.0.0.1"]
"""

_ADMIN = """\
admin:
  listen: ["tcp:0:interface=127.0.0.1"]
"""

_TLS = """\
tls:
  lab: {self_signed: [localhost]}
"""

# Modules (and their submodules) that cost an echo-only daemon memory and
# start-up time for features it does not use.
_HEAVY = (
    "h2",
    "prometheus_client",
    "twisted.mail",
    "twisted.names",
    "twisted.web",
    "twisted.words",
    "netd.admin",
    "netd.compat.mail",
    "netd.compat.tls",
    "netd.compat.web",
    "netd.tls",
    "netd.services.http",
    "netd.services.smtp",
)


def _modules_serving(tmp_path: Path, service_map: str) -> set[str]:
    (tmp_path / "netd.yaml").write_text(service_map)
    done = subprocess.run(
        [sys.executable, "-c", _SERVE_ONE_ECHO, str(tmp_path / "netd.yaml")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    modules = set(json.loads(done.stdout.splitlines()[-1]))
    assert "netd.services.simple" in modules  # it did serve the echo
    return modules


def _loaded(modules: set[str], *names: str) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


def test_an_echo_only_map_loads_no_heavy_module(tmp_path: Path) -> None:
    modules = _modules_serving(tmp_path, _ECHO_ONLY)
    assert _loaded(modules, *_HEAVY) == []
    # Nor what only a rule's acts or a file's sending use.
    assert _loaded(modules, "netd.acts", "netd.sendfile") == []
    # Nor PyYAML's libyaml binding, under twistd as under `netd run`.
    assert _loaded(modules, "yaml._yaml") == []


def test_an_admin_api_loads_the_web_stack_but_not_prometheus_until_scraped(
    tmp_path: Path,
) -> None:
    modules = _modules_serving(tmp_path, _ADMIN + _ECHO_ONLY)
    assert _loaded(modules, "netd.admin", "twisted.web.server") != []
    assert _loaded(modules, "prometheus_client", "twisted.mail", "netd.tls") == []
    # The dashboard parses mail only once a message is viewed.
    assert _loaded(modules, "netd.dashboard.mail", "email.policy") == []


def test_a_tls_profile_loads_netd_tls(tmp_path: Path) -> None:
    modules = _modules_serving(tmp_path, _TLS + _ECHO_ONLY)
    assert _loaded(modules, "netd.tls", "netd.compat.tls") == ["netd.compat.tls", "netd.tls"]
    assert _loaded(modules, "twisted.web", "h2", "prometheus_client") == []


def test_an_http_map_loads_stub_libraries_only_for_routes_that_use_them(tmp_path: Path) -> None:
    web = "  web:\n    type: http\n    listen: ['tcp:0:interface=127.0.0.1']\n    routes:\n"
    stub = "    - {path: /a, method: POST, match: {body: {json: {a: 1}}}, json: {b: 2}}\n"
    modules = _modules_serving(tmp_path, _ECHO_ONLY + web + stub)
    assert _loaded(modules, "netd.services.http.match") != []
    assert _loaded(modules, "jsonpath", "wsproto", "openapi_core", "werkzeug") == []
    assert _loaded(modules, "twisted.web.client", "netd.services.http.proxy") == []
    richer = (
        "    - {path: /b, match: {body: {jsonpath: '$.a'}}, body: x}\n"
        "    - {path: /ws, websocket: {echo: true}}\n"
    )
    modules = _modules_serving(tmp_path, _ECHO_ONLY + web + stub + richer)
    assert _loaded(modules, "jsonpath", "wsproto") != []
    assert _loaded(modules, "openapi_core", "twisted.web.client") == []
    proxied = "    - {path: /up/, proxy: 'http://127.0.0.1:9/'}\n"
    modules = _modules_serving(tmp_path, _ECHO_ONLY + web + stub + proxied)
    assert _loaded(modules, "twisted.web.client", "netd.services.http.proxy") != []


def test_a_chat_map_loads_wsproto_only_with_a_websocket_listener(tmp_path: Path) -> None:
    chat = "  chat:\n    type: chat\n    listen: ['tcp:0:interface=127.0.0.1']\n"
    modules = _modules_serving(tmp_path, _ECHO_ONLY + chat)
    assert _loaded(modules, "netd.services.chat") != []
    assert _loaded(modules, "wsproto", "netd.websockets") == []
    websocket = "    websocket: ['tcp:0:interface=127.0.0.1']\n"
    modules = _modules_serving(tmp_path, _ECHO_ONLY + chat + websocket)
    assert _loaded(modules, "wsproto", "netd.websockets") != []


# Runs `netd run MAP` in this interpreter and writes the loaded modules' names to
# a file (twistd takes stdout for its log) once the reactor runs: the map is
# loaded and its services built by then.
_NETD_RUN = """
import json, sys
from pathlib import Path
from twisted.internet import reactor

report_to = Path(sys.argv[2])  # before netd run replaces sys.argv for twistd

def report():
    loaded = [name for name, module in sys.modules.items() if module is not None]
    report_to.write_text(json.dumps(sorted(loaded)))
    reactor.stop()

reactor.callWhenRunning(report)
from netd.cli import main
main(["run", sys.argv[1]])
"""


def test_netd_run_skips_the_scan_of_every_twistd_plugin(tmp_path: Path) -> None:
    (tmp_path / "netd.yaml").write_text(_ECHO_ONLY)
    done = subprocess.run(
        [sys.executable, "-c", _NETD_RUN, str(tmp_path / "netd.yaml"), "modules.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    modules = set(json.loads((tmp_path / "modules.json").read_text()))
    assert "netd.services.simple" in modules
    # twistd's scan imports what every plugin provides: twisted.trial's reporters bring unittest;
    # PyYAML's libyaml binding is kept out (netd composes maps in Python, to keep positions).
    assert _loaded(modules, "twisted.trial", "unittest", "yaml._yaml", *_HEAVY) == []
