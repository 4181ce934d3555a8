"""Tests for netd.config: the service map, its defaults and every kind of error in it."""

from __future__ import annotations

import gc
import ipaddress
import textwrap
import weakref
from pathlib import Path

import attrs
import pytest
import yaml
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress
from yaml.constructor import SafeConstructor

from netd import config as config_module
from netd import endpoints
from netd.config import ConfigErrors, NetdConfig, load_config, parse_config
from netd.schema import Problems, client_address, compose
from netd.services import kind_names
from netd.services.simple import QuoteOptions

ECHO = 'services: {echo: {type: echo, listen: ["tcp:0"]}}\n'
KINDS = ", ".join(kind_names())


@pytest.fixture
def map_file(tmp_path: Path) -> Path:
    """Where the map under test claims to live; relative paths are resolved against it."""
    return tmp_path / "conf" / "netd.yaml"


def parse(map_file: Path, text: str) -> NetdConfig:
    return parse_config(textwrap.dedent(text), map_file)


def errors(map_file: Path, text: str) -> list[str]:
    """Every error reported for C{text}, without the file name in front."""
    with pytest.raises(ConfigErrors) as excinfo:
        parse(map_file, text)
    messages = [str(e) for e in excinfo.value.errors]
    prefix = f"{map_file}:"
    assert all(m.startswith(prefix) for m in messages), messages
    assert str(excinfo.value) == "\n".join(messages)
    return [m[len(prefix) :] for m in messages]


# --- a valid map -----------------------------------------------------------------


def test_defaults(map_file: Path) -> None:
    config = parse(map_file, ECHO)
    assert config.file == map_file
    assert config.state_dir == map_file.parent / "state"
    assert config.shutdown_grace == 10
    assert (config.log.format, config.log.level) == ("text", "info")
    assert config.tls == {}
    assert config.admin is None
    echo = config.services["echo"]
    assert (echo.name, echo.type, echo.enabled) == ("echo", "echo", True)
    assert echo.max_connections == 1000
    assert echo.idle_timeout == 300
    assert [listener.endpoint for listener in echo.listen] == ["tcp:0"]
    assert echo.position.line == 1


def test_explicit_values(map_file: Path) -> None:
    config = parse(
        map_file,
        """
        state_dir: /var/lib/netd
        shutdown_grace: 2.5
        log: {format: json, level: debug}
        services:
          echo:
            type: echo
            enabled: false
            listen: "udp:7007:interface=127.0.0.1"
            max_connections: 3
            idle_timeout: 0.5
        """,
    )
    assert config.state_dir == Path("/var/lib/netd")
    assert config.shutdown_grace == 2.5
    assert (config.log.format, config.log.level) == ("json", "debug")
    echo = config.services["echo"]
    assert echo.enabled is False
    assert (echo.max_connections, echo.idle_timeout) == (3, 0.5)
    (listener,) = echo.listen
    assert (listener.endpoint, listener.datagram, listener.tls) == (
        "udp:7007:interface=127.0.0.1",
        True,
        False,
    )
    assert listener.path == "services.echo.listen"


def test_max_connections_per_client(map_file: Path, tmp_path: Path) -> None:
    config = parse(
        map_file,
        f"""
        services:
          echo: {{type: echo, listen: ["tcp:0"]}}
          limited: {{type: echo, listen: ["tcp:1"], max_connections_per_client: 3}}
          mail: {{type: smtp, listen: ["tcp:2"]}}
          files: {{type: ftp, listen: ["tcp:3"], root: {tmp_path}, anonymous: read}}
          open: {{type: ftp, listen: ["tcp:4"], root: {tmp_path}, anonymous: read,
                  max_connections_per_client: 0}}
        """,
    )
    limits = {name: s.max_connections_per_client for name, s in config.services.items()}
    # 0 is no limit; smtp and ftp declare their own defaults.
    assert limits == {"echo": 0, "limited": 3, "mail": 20, "files": 10, "open": 0}
    # A reload restarts a service whose limit changed: its config compares unequal.
    other = parse(map_file, ECHO.replace("}}", ", max_connections_per_client: 3}}"))
    assert other.services["echo"] != config.services["echo"]
    assert other.services["echo"] == attrs.evolve(
        config.services["echo"], max_connections_per_client=3
    )


def test_max_connections_per_client_errors(map_file: Path) -> None:
    text = """\
        services:
          echo:
            type: echo
            listen: ["tcp:0"]
            max_connections_per_client: -1
          chat:
            type: chat
            listen: ["tcp:1"]
            max_connections_per_client: many
        """
    assert errors(map_file, text) == [
        "5:33: services.echo.max_connections_per_client: must be at least 0, got -1",
        "9:33: services.chat.max_connections_per_client: expected an integer, got a string",
    ]


def test_ftp_max_per_client_is_renamed(map_file: Path, tmp_path: Path) -> None:
    text = f"""\
        services:
          files:
            type: ftp
            listen: ["tcp:0"]
            root: {tmp_path}
            anonymous: read
            max_per_client: 4
        """
    assert errors(map_file, text) == [
        "7:21: services.files.max_per_client: "
        "renamed: use max_connections_per_client (a key of every service)"
    ]


def test_relative_paths_resolve_against_the_map_folder(map_file: Path) -> None:
    folder = map_file.parent
    config = parse(
        map_file,
        """
        state_dir: var/state
        tls:
          prod:
            cert: certs/chain.pem
            key: /etc/netd/key.pem
            client_ca: clients.pem
            sni: {other.example: {cert: other.pem, key: keys/other.key}}
        services:
          echo:
            type: echo
            listen: ["unix:run/echo.sock", "unix:address=run/two.sock", "unix:/abs/echo.sock"]
        """,
    )
    assert config.state_dir == folder / "var/state"
    prod = config.tls["prod"]
    assert prod.keypair is not None
    assert prod.keypair.cert == folder / "certs/chain.pem"
    assert prod.keypair.key == Path("/etc/netd/key.pem")
    assert prod.client_ca == folder / "clients.pem"
    assert prod.sni["other.example"].cert == folder / "other.pem"
    assert prod.sni["other.example"].key == folder / "keys/other.key"
    # Listeners keep the text as written; the runtime resolves it against the same folder.
    listeners = [listener.endpoint for listener in config.services["echo"].listen]
    assert listeners == ["unix:run/echo.sock", "unix:address=run/two.sock", "unix:/abs/echo.sock"]
    assert [endpoints.normalize(e, config.file.parent) for e in listeners] == [
        f"unix:{folder}/run/echo.sock",
        f"unix:address={folder}/run/two.sock",
        "unix:/abs/echo.sock",
    ]


def test_tls_profiles_and_listeners(map_file: Path) -> None:
    config = parse(
        map_file,
        """
        tls:
          lab: {self_signed: [localhost, 127.0.0.1], min_version: "1.3"}
          default: {self_signed: [localhost]}
        services:
          echo:
            type: echo
            listen:
              - {endpoint: "ssl:0", tls: lab}
              - "ssl:0:interface=127.0.0.1"
              - {endpoint: "systemd:domain=INET:index=0", tls: lab}
              - "tcp:0"
        """,
    )
    assert config.tls["lab"].self_signed == ("localhost", "127.0.0.1")
    assert config.tls["lab"].min_version == "1.3"
    assert config.tls["default"].min_version == "1.2"
    listeners = config.services["echo"].listen
    assert [(x.tls_profile, x.tls) for x in listeners] == [
        ("lab", True),
        ("default", True),
        ("lab", True),
        (None, False),
    ]
    assert config.services["echo"].tls_profiles == {"lab", "default"}


def test_a_service_knows_every_profile_it_uses(map_file: Path) -> None:
    config = parse(
        map_file,
        """
        tls:
          starttls: {self_signed: [localhost]}
          other: {self_signed: [localhost]}
        services:
          mail:
            type: smtp
            listen: ["tcp:0"]
            tls: starttls
          plain: {type: echo, listen: ["tcp:0"]}
        """,
    )
    assert config.services["mail"].tls_profiles == {"starttls"}
    assert config.services["plain"].tls_profiles == set()


def test_admin_on_loopback_needs_no_token(map_file: Path) -> None:
    config = parse(
        map_file,
        """
        admin:
          listen: ["tcp:0:interface=127.0.0.1", "tcp6:0:interface=\\\\:\\\\:1", "unix:admin.sock"]
        """
        + ECHO,
    )
    assert config.admin is not None
    assert config.admin.token is None
    assert len(config.admin.listen) == 3


def test_admin_anywhere_with_a_token(map_file: Path) -> None:
    config = parse(map_file, 'admin: {listen: "tcp:8025", token: s3cret}\n' + ECHO)
    assert config.admin is not None
    assert config.admin.token == "s3cret"


def test_qotd_quotes(map_file: Path) -> None:
    config = parse(
        map_file,
        f"""
        services:
          q: {{type: qotd, listen: ["tcp:0"], quotes: ["one", "{"x" * 510}"]}}
          d: {{type: qotd, listen: ["tcp:0"]}}
        """,
    )
    assert config.services["q"].options == QuoteOptions(("one", "x" * 510))
    assert config.services["d"].options.quotes  # the built-in ones


def test_same_port_for_tcp_and_udp_or_port_zero_is_no_duplicate(map_file: Path) -> None:
    config = parse(
        map_file,
        """
        services:
          echo: {type: echo, listen: ["tcp:7007", "udp:7007", "tcp:0", "udp:0"]}
          discard: {type: discard, listen: ["tcp:0", "udp:0", "tcp:7009"]}
          off: {type: discard, enabled: false, listen: ["tcp:7009"]}
        """,
    )
    assert set(config.services) == {"echo", "discard", "off"}


def test_load_config_reads_the_file(map_file: Path) -> None:
    map_file.parent.mkdir()
    map_file.write_text(ECHO, encoding="utf-8")
    assert set(load_config(map_file).services) == {"echo"}


def test_load_config_points_at_a_byte_that_is_not_utf_8(map_file: Path) -> None:
    map_file.parent.mkdir()
    map_file.write_bytes(ECHO.encode() + 'qotd: ["café", "'.encode() + b'\xff"]\n')
    with pytest.raises(ConfigErrors) as excinfo:
        load_config(map_file)
    assert [str(e) for e in excinfo.value.errors] == [
        f"{map_file}:2:17: cannot read the service map: not UTF-8 (byte 0xff: invalid start byte)"
    ]


def test_a_character_yaml_refuses_is_pointed_at(map_file: Path) -> None:
    assert errors(map_file, f"{ECHO}qotd: ['a\x07']\n") == [
        "2:10: not valid YAML: unacceptable character #x0007: special characters are not allowed"
    ]


def test_load_config_unreadable_file(map_file: Path) -> None:
    with pytest.raises(ConfigErrors) as excinfo:
        load_config(map_file)
    assert [str(e) for e in excinfo.value.errors] == [
        f"{map_file}:1:1: cannot read the service map: No such file or directory"
    ]


# --- unknown keys ----------------------------------------------------------------


def test_unknown_key_at_top_level(map_file: Path) -> None:
    assert errors(map_file, "colour: red\n" + ECHO) == ["1:1: colour: unknown key"]


def test_unknown_key_in_tls_profile(map_file: Path) -> None:
    text = """\
        tls:
          lab:
            self_signed: [localhost]
            colour: red
        """
    assert errors(map_file, text + ECHO) == ["4:5: tls.lab.colour: unknown key"]


def test_unknown_key_in_service(map_file: Path) -> None:
    text = """\
        services:
          echo:
            type: echo
            listen: ["tcp:0"]
            colour: red
            protocol: irc
        """
    assert errors(map_file, text) == [
        "5:5: services.echo.colour: unknown key",
        "6:5: services.echo.protocol: unknown key",
    ]


def test_unknown_key_in_listener_mapping(map_file: Path) -> None:
    text = """\
        services:
          echo:
            type: echo
            listen:
              - {endpoint: "tcp:0", colour: red}
        """
    assert errors(map_file, text) == ["5:29: services.echo.listen[0].colour: unknown key"]


def test_unknown_keys_in_log(map_file: Path) -> None:
    assert errors(map_file, "log: {format: xml, level: loud, colour: red}\n" + ECHO) == [
        "1:15: log.format: must be one of text, json, got 'xml'",
        "1:27: log.level: must be one of debug, info, warn, error, critical, got 'loud'",
        "1:33: log.colour: unknown key",
    ]


# --- wrong types -----------------------------------------------------------------


def test_wrong_types_in_a_service(map_file: Path) -> None:
    text = """\
        services:
          echo:
            type: echo
            listen: ["tcp:0"]
            max_connections: "many"
            idle_timeout: [1]
            enabled: "yes"
        """
    assert errors(map_file, text) == [
        "5:22: services.echo.max_connections: expected an integer, got a string",
        "6:19: services.echo.idle_timeout: expected a number, got a list",
        "7:14: services.echo.enabled: expected true or false, got a string",
    ]


def test_booleans_and_floats_are_not_integers(map_file: Path) -> None:
    text = """\
        services:
          a: {type: echo, listen: ["tcp:0"], max_connections: true}
          b: {type: echo, listen: ["tcp:0"], max_connections: 1.5, idle_timeout: false}
        """
    assert errors(map_file, text) == [
        "2:55: services.a.max_connections: expected an integer, got a boolean",
        "3:55: services.b.max_connections: expected an integer, got a number",
        "3:74: services.b.idle_timeout: expected a number, got a boolean",
    ]


def test_negative_and_zero_numbers(map_file: Path) -> None:
    text = """\
        shutdown_grace: -1
        services:
          echo:
            type: echo
            listen: ["tcp:0"]
            max_connections: -5
            idle_timeout: 0
        """
    assert errors(map_file, text) == [
        "1:17: shutdown_grace: must be at least 0, got -1",
        "6:22: services.echo.max_connections: must be at least 1, got -5",
        "7:19: services.echo.idle_timeout: must be at least 0.1, got 0",
    ]


def test_list_where_a_mapping_belongs(map_file: Path) -> None:
    text = """\
        log: [text]
        tls: [lab]
        services:
          echo: [type, echo]
        """
    assert errors(map_file, text) == [
        "1:6: log: expected a mapping, got a list",
        "2:6: tls: expected a mapping, got a list",
        # One message for the service, not a second one about its missing keys.
        "4:9: services.echo: expected a mapping, got a list",
    ]


def test_services_not_a_mapping(map_file: Path) -> None:
    assert errors(map_file, "services: [echo]\n") == [
        "1:11: services: expected a mapping, got a list"
    ]


def test_map_not_a_mapping(map_file: Path) -> None:
    assert errors(map_file, "- echo\n- discard\n") == ["1:1: the service map must be a mapping"]


def test_no_services(map_file: Path) -> None:
    assert errors(map_file, "shutdown_grace: 1\n") == ["1:1: no services: add a 'services' mapping"]


# --- duplicates ------------------------------------------------------------------


def test_duplicate_yaml_keys(map_file: Path) -> None:
    text = """\
        services:
          echo:
            type: echo
            type: discard
            listen: ["tcp:0"]
        services: {}
        """
    assert errors(map_file, text) == [
        "4:5: services.echo.type: duplicate key",
        "6:1: services: duplicate key",
    ]


def test_duplicate_listeners_across_services(map_file: Path) -> None:
    text = """\
        services:
          web: {type: echo, listen: ["tcp:8080", "udp:8080"]}
          other:
            type: discard
            listen: ["tcp:8080", "udp:8081", "ssl:8080:privateKey=/no/such.pem"]
          more: {type: chargen, listen: ["udp:8080", "tcp:8081"]}
        """
    assert errors(map_file, text) == [
        "5:14: services.other.listen[0]: 'tcp:8080' is already used by web "
        "(services.web.listen[0])",
        "5:38: services.other.listen[2]: bad endpoint 'ssl:8080:privateKey=/no/such.pem': "
        "[Errno 2] No such file or directory: '/no/such.pem'",
        "6:34: services.more.listen[0]: 'udp:8080' is already used by web (services.web.listen[1])",
    ]


def test_duplicate_listener_forms(map_file: Path) -> None:
    """The same port or socket written differently is still the same listener."""
    text = """\
        services:
          a: {type: echo, listen: ["tcp:port=9000", "unix:a.sock", "systemd:domain=INET:name=x"]}
          b: {type: echo, listen: ["tcp6:9000", "unix:address=a.sock"]}
          c: {type: echo, listen: [{endpoint: "ssl:9000", tls: lab}, "systemd:domain=INET:name=x"]}
        tls: {lab: {self_signed: [localhost]}}
        """
    assert errors(map_file, text) == [
        "3:28: services.b.listen[0]: 'tcp6:9000' is already used by a (services.a.listen[0])",
        "3:41: services.b.listen[1]: 'unix:address=a.sock' is already used by a "
        "(services.a.listen[1])",
        "4:28: services.c.listen[0]: 'ssl:9000' is already used by a (services.a.listen[0])",
        "4:62: services.c.listen[1]: 'systemd:domain=INET:name=x' is already used by a "
        "(services.a.listen[2])",
    ]


# --- TLS -------------------------------------------------------------------------


def test_unknown_tls_profile(map_file: Path) -> None:
    text = """\
        tls: {lab: {self_signed: [localhost]}, prod: {self_signed: [localhost]}}
        services:
          echo: {type: echo, listen: [{endpoint: "ssl:0", tls: nope}]}
          bare: {type: echo, listen: [{endpoint: "tcp:0", tls: nope}]}
        """
    assert errors(map_file, text) == [
        "3:56: services.echo.listen[0].tls: unknown TLS profile 'nope' (known: lab, prod)",
        "4:56: services.bare.listen[0].tls: unknown TLS profile 'nope' (known: lab, prod)",
    ]


def test_unknown_tls_profile_none_defined(map_file: Path) -> None:
    text = 'services: {echo: {type: echo, listen: [{endpoint: "ssl:0", tls: lab}]}}\n'
    assert errors(map_file, text) == [
        "1:65: services.echo.listen[0].tls: unknown TLS profile 'lab' (known: none defined)"
    ]


def test_ssl_without_key_material_or_profile(map_file: Path) -> None:
    text = """\
        tls: {lab: {self_signed: [localhost]}}
        services:
          echo: {type: echo, listen: ["ssl:0"]}
        """
    assert errors(map_file, text) == [
        "3:31: services.echo.listen[0]: an ssl: endpoint without key material needs "
        "'tls: PROFILE' (or a TLS profile named 'default')"
    ]


def test_ssl_without_key_material_takes_the_default_profile(map_file: Path) -> None:
    text = """\
        tls: {default: {self_signed: [localhost]}}
        services:
          echo: {type: echo, listen: ["ssl:0"]}
        """
    (listener,) = parse(map_file, text).services["echo"].listen
    assert listener.tls_profile == "default"


def test_tls_on_udp_is_refused(map_file: Path) -> None:
    text = """\
        tls: {default: {self_signed: [localhost]}}
        services:
          echo: {type: echo, listen: [{endpoint: "udp:0", tls: default}]}
        """
    assert errors(map_file, text) == [
        "3:31: services.echo.listen[0]: TLS is not available on a udp: listener"
    ]


def test_bad_tls_profiles(map_file: Path) -> None:
    text = """\
        tls:
          half: {cert: a.pem}
          none: {}
          both: {self_signed: [x], cert: a.pem, key: a.key}
          old: {self_signed: [x], min_version: "1.1"}
          sni: {self_signed: [x], sni: {y.example: {key: y.key}, z.example: 5}}
          listed: [x]
        """
    assert errors(map_file, text + ECHO) == [
        # One message for half a key pair, not a second one about the profile.
        "2:9: tls.half: 'cert' and 'key' go together",
        "3:9: tls.none: a TLS profile needs either 'self_signed' names or 'cert' and 'key'",
        "4:9: tls.both: a TLS profile needs either 'self_signed' names or 'cert' and 'key'",
        "5:40: tls.old.min_version: must be one of 1.2, 1.3, got '1.1'",
        "6:44: tls.sni.sni.y.example: 'cert' and 'key' go together",
        "6:69: tls.sni.sni.z.example: expected a mapping, got a number",
        "7:11: tls.listed: expected a mapping, got a list",
    ]


# --- endpoints -------------------------------------------------------------------


def test_bad_endpoint_strings(map_file: Path) -> None:
    text = """\
        services:
          echo:
            type: echo
            listen:
              - "tcp:notaport"
              - "nosuch:1"
              - "udp:99999"
              - "udp:1:interface=notanip"
              - "udp:1:colour=red"
              - "systemd:domain=INET:index=0:name=echo"
              - "systemd:domain=INET"
              - "systemd:domain=CARRIER:index=0"
              - "ssl:0:colour=red"
        tls: {default: {self_signed: [localhost]}}
        """
    assert errors(map_file, text) == [
        "5:9: services.echo.listen[0]: bad endpoint 'tcp:notaport': "
        "invalid literal for int() with base 10: 'notaport'",
        "6:9: services.echo.listen[1]: bad endpoint 'nosuch:1': Unknown endpoint type: 'nosuch'",
        "7:9: services.echo.listen[2]: bad endpoint 'udp:99999': port 99999 is out of range",
        "8:9: services.echo.listen[3]: bad endpoint 'udp:1:interface=notanip': "
        "'notanip' does not appear to be an IPv4 or IPv6 address",
        "9:9: services.echo.listen[4]: bad endpoint 'udp:1:colour=red': unknown udp: option colour",
        "10:9: services.echo.listen[5]: bad endpoint 'systemd:domain=INET:index=0:name=echo': "
        "give exactly one of index= or name=",
        "11:9: services.echo.listen[6]: bad endpoint 'systemd:domain=INET': "
        "give exactly one of index= or name=",
        "12:9: services.echo.listen[7]: bad endpoint 'systemd:domain=CARRIER:index=0': "
        "domain= must be INET or INET6 or UNIX",
        "13:9: services.echo.listen[8]: bad endpoint 'ssl:0:colour=red': "
        "option colour cannot be combined with a profile",
    ]


def test_listeners_that_are_not_strings(map_file: Path) -> None:
    text = """\
        services:
          echo: {type: echo, listen: [true, null, [1], {tls: x}, {endpoint: 5}]}
        """
    # One message each; a boolean is not also a "bad endpoint ''".
    assert errors(map_file, text) == [
        "2:31: services.echo.listen[0]: expected a string, got a boolean",
        "2:37: services.echo.listen[1]: expected a string, got empty",
        "2:43: services.echo.listen[2]: expected a string, got a list",
        "2:48: services.echo.listen[3]: missing required key 'endpoint'",
        "2:69: services.echo.listen[4].endpoint: bad endpoint '5': Unknown endpoint type: '5'",
    ]


def test_listener_protocol_on_a_kind_without_protocols(map_file: Path) -> None:
    text = 'services: {echo: {type: echo, listen: [{endpoint: "tcp:0", protocol: irc}]}}\n'
    assert errors(map_file, text) == [
        "1:70: services.echo.listen[0].protocol: this service takes no 'protocol'"
    ]


def test_missing_or_empty_listen(map_file: Path) -> None:
    text = """\
        services:
          broken: {type: echo, listen: ["nosuch:1"]}
          none: {type: echo}
          empty: {type: echo, listen: []}
        """
    # The empty list is reported even though other services have errors.
    assert errors(map_file, text) == [
        "2:33: services.broken.listen[0]: bad endpoint 'nosuch:1': Unknown endpoint type: 'nosuch'",
        "3:9: services.none: missing required key 'listen'",
        "4:31: services.empty.listen: at least one listener is needed",
    ]


# --- admin -----------------------------------------------------------------------


def test_admin_off_loopback_without_token(map_file: Path) -> None:
    text = """\
        admin:
          listen: ["tcp:8025:interface=127.0.0.1", "tcp:8026", "tcp:8027:interface=0.0.0.0"]
          token: ""
        """
    assert errors(map_file, text + ECHO) == [
        "2:3: admin: admin listener 'tcp:8026' is not loopback-only: set a 'token'",
        "2:3: admin: admin listener 'tcp:8027:interface=0.0.0.0' is not loopback-only: "
        "set a 'token'",
    ]


def test_admin_toxiproxy_listeners_are_loopback_only_even_with_a_token(map_file: Path) -> None:
    text = """\
        admin:
          listen: ["tcp:8025:interface=0.0.0.0"]
          token: s3cret
          toxiproxy: ["tcp:8474:interface=127.0.0.1", "tcp:8475:interface=0.0.0.0"]
        """
    assert errors(map_file, text + ECHO) == [
        "2:3: admin: admin toxiproxy listener 'tcp:8475:interface=0.0.0.0' is not "
        "loopback-only: Toxiproxy's clients send no token",
    ]


def test_admin_without_listen_or_with_udp(map_file: Path) -> None:
    assert errors(map_file, "admin: {token: x}\n" + ECHO) == [
        "1:8: admin: missing required key 'listen'"
    ]
    assert errors(map_file, 'admin: {listen: "udp:0:interface=127.0.0.1"}\n' + ECHO) == [
        "1:17: admin.listen: this service kind has no datagram (udp:) listener"
    ]


# --- services --------------------------------------------------------------------


def test_invalid_service_names(map_file: Path) -> None:
    text = """\
        services:
          Echo: {type: echo, listen: ["tcp:0"]}
          "-x": {type: echo, listen: ["tcp:0"]}
          "a b": {type: echo, listen: ["tcp:0"]}
          ok_1-2: {type: echo, listen: ["tcp:0"]}
        """
    message = "service names are lower-case letters, digits, '-' and '_'"
    assert errors(map_file, text) == [
        f"2:9: services.Echo: {message}",
        f"3:9: services.-x: {message}",
        f"4:10: services.a b: {message}",
    ]


def test_unknown_or_missing_service_type(map_file: Path) -> None:
    text = """\
        services:
          gopher: {type: gopher, listen: ["tcp:0"]}
          number: {type: 5, listen: ["tcp:0"]}
          untyped: {listen: ["tcp:0"]}
          empty:
        """
    kinds = f"one of {KINDS}"
    assert errors(map_file, text) == [
        f"2:18: services.gopher.type: unknown service type 'gopher' ({kinds})",
        f"3:18: services.number.type: unknown service type '5' ({kinds})",
        "4:12: services.untyped: missing required key 'type'",
        "5:9: services.empty: missing required key 'type'",
    ]


def test_qotd_quotes_errors(map_file: Path) -> None:
    long = "x" * 511
    text = f"""\
        services:
          q:
            type: qotd
            listen: ["tcp:0"]
            quotes: ["", "  ", "ok", [1], true, "{long}"]
          none: {{type: qotd, listen: ["tcp:0"], quotes: []}}
          one: {{type: qotd, listen: ["tcp:0"], quotes: "just one"}}
        """
    assert errors(map_file, text) == [
        "5:14: services.q.quotes[0]: a quote cannot be empty",
        "5:18: services.q.quotes[1]: a quote cannot be empty",
        "5:30: services.q.quotes[3]: expected a string, got a list",
        "5:35: services.q.quotes[4]: expected a string, got a boolean",
        "5:41: services.q.quotes[5]: a quote must fit in 512 bytes (RFC 865)",
        "6:49: services.none.quotes: give at least one quote",
        "7:48: services.one.quotes: expected a list, got a string",
    ]


def test_quote_limit_counts_bytes(map_file: Path) -> None:
    text = f'services: {{q: {{type: qotd, listen: ["tcp:0"], quotes: ["{"é" * 256}"]}}}}\n'
    assert errors(map_file, text) == [
        "1:56: services.q.quotes[0]: a quote must fit in 512 bytes (RFC 865)"
    ]


# --- the file as a whole ---------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(map_file: Path, text: str) -> None:
    assert errors(map_file, text) == ["1:1: the service map is empty"]


def test_null_document(map_file: Path) -> None:
    assert errors(map_file, "~\n") == ["1:1: the service map must be a mapping"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'services:\n  echo: {type: echo, listen: ["tcp:0"]\n',
            "3:1: not valid YAML: expected ',' or '}', but got '<stream end>'",
        ),
        (
            "services:\n  echo:\n    type: echo\n     listen: x\n",
            "4:12: not valid YAML: mapping values are not allowed here",
        ),
        (
            "services:\n\techo: {}\n",
            "2:1: not valid YAML: found character '\\t' that cannot start any token",
        ),
        ("a: *nowhere\n", "1:4: not valid YAML: found undefined alias 'nowhere'"),
    ],
)
def test_invalid_yaml(map_file: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigErrors) as excinfo:
        parse_config(text, map_file)
    assert [str(e) for e in excinfo.value.errors] == [f"{map_file}:{expected}"]


# Nine anchors, each a list of nine aliases of the one before: 9**9 nodes once expanded.
LAUGHS = (
    "[&a [x, x, x, x, x, x, x, x, x], "
    + ", ".join(
        f"&{name} [{', '.join([f'*{before}'] * 9)}]"
        for before, name in zip("abcdefgh", "bcdefghi", strict=True)
    )
    + "]"
)


@pytest.mark.timeout(10)
def test_aliases_that_expand_past_a_million_nodes_are_refused(map_file: Path) -> None:
    text = f"""\
        services:
          h:
            type: http
            listen: ["tcp:0"]
            routes:
              - {{path: /a, json: {LAUGHS}}}
        """
    # The aliases in &b to &f repeat 672,588 nodes; the first *f in &g 597,871 more.
    column = len("      - {path: /a, json: ") + 1 + LAUGHS.index("*f")
    assert errors(map_file, text) == [f"6:{column}: aliases repeat more than 1,000,000 nodes"]


def test_anchors_and_aliases_share_blocks(map_file: Path) -> None:
    config = parse(
        map_file,
        """\
        services:
          a: &echo {type: echo, listen: &any ["tcp:0"], max_connections: 5}
          b: *echo
          c: {type: discard, listen: *any}
        """,
    )
    assert [s.max_connections for s in config.services.values()] == [5, 5, 1000]
    assert [s.listen[0].endpoint for s in config.services.values()] == ["tcp:0"] * 3


DEEP = "[" * 20_000 + "]" * 20_000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"services: {DEEP}\n", "1:110: nested too deeply (more than 100 levels)"),
        (
            "services:\n  h:\n    type: http\n    listen: ['tcp:0']\n"
            f"    routes: [{{path: /a, json: {DEEP}}}]\n",
            "5:126: nested too deeply (more than 100 levels)",
        ),
        (
            # Fifty levels, aliased fifty levels down: past a hundred once expanded.
            f"x: [&a {'[' * 50}{']' * 50}, {'[' * 50}*a{']' * 50}]\n",
            "1:160: nested too deeply (more than 100 levels)",
        ),
        ("x: &a [*a]\n", "1:8: alias 'a' is inside the node it names"),
    ],
)
def test_maps_too_deep_or_recursive_are_refused(map_file: Path, text: str, expected: str) -> None:
    assert errors(map_file, text) == [expected]


def test_a_hundred_levels_are_read(map_file: Path) -> None:
    """The map is the first level."""
    assert errors(map_file, f"{ECHO}x: {'[' * 99}{']' * 99}\n") == ["2:1: x: unknown key"]


def test_merge_keys_fill_in_what_a_mapping_does_not_set(map_file: Path) -> None:
    config = parse(
        map_file,
        """\
        services:
          a: &base {type: echo, listen: ["tcp:0"], max_connections: 5}
          b:
            <<: *base
            max_connections: 7
          c:
            <<: [{idle_timeout: 9, max_connections: 8}, *base]
        """,
    )
    assert [(s.type, s.max_connections) for s in config.services.values()] == [
        ("echo", 5),
        ("echo", 7),
        ("echo", 8),
    ]
    assert config.services["c"].idle_timeout == 9


# PyYAML's own keys for a mapping with a merge key: the merged ones first, in
# the order merged, then the mapping's own, which win.
MERGES_AS_PYYAML = [
    # A key is what it stands for: 404 is not '404', 0x1f is 31.
    "x-base: &base {'404': merged, 31: merged, a: merged}\nm: {404: own, <<: *base, 0x1f: own}\n",
    "x-base: &base {x: 1, y: 2}\nm:\n  a: 0\n  <<: *base\n  y: 3\n",
    "x-base: &base {~: merged, true: merged}\nm: {null: own, <<: *base, yes: own}\n",
    "x-base: &base {b: merged}\nm: {b: own, <<: *base, b: again}\n",
]


@pytest.mark.parametrize("text", MERGES_AS_PYYAML)
def test_merge_keys_compose_as_pyyaml_reads_them(map_file: Path, text: str) -> None:
    """The map's readers take values from the nodes composed (a body's plain data, say)."""
    node = compose(text, str(map_file), Problems())
    assert repr(SafeConstructor().construct_document(node)) == repr(yaml.safe_load(text))


def test_top_level_x_keys_are_the_writers_place_for_shared_blocks(map_file: Path) -> None:
    config = parse(
        map_file,
        """\
        x-limits: &limits {max_connections: 5, idle_timeout: 9}
        services:
          a: {<<: *limits, type: echo, listen: ["tcp:0"]}
        """,
    )
    assert (config.services["a"].max_connections, config.services["a"].idle_timeout) == (5, 9)
    assert errors(map_file, "y-limits: {}\nservices: {a: {type: echo, listen: [tcp:0]}}\n") == [
        "1:1: y-limits: unknown key"
    ]


def test_errors_in_a_merged_mapping_point_into_it(map_file: Path) -> None:
    text = """\
        services:
          a: &base {type: echo, listen: ["tcp:0"], colour: red}
          b: {<<: *base, max_connections: 7}
        """
    assert errors(map_file, text) == [
        "2:44: services.a.colour: unknown key",
        "2:44: services.b.colour: unknown key",
    ]


def test_merge_keys_merge_mappings_only(map_file: Path) -> None:
    text = "services:\n  a: &base {type: echo}\n  b: {<<: [*base, 5]}\n"
    assert errors(map_file, text) == ["3:19: '<<' merges a mapping or a list of mappings"]


def test_a_merge_key_given_twice_is_an_error(map_file: Path) -> None:
    """Either could win: refused, with the way to merge both."""
    text = "x-a: &a {type: echo}\nx-b: &b {max_connections: 3}\nservices:\n  e: {<<: *a, <<: *b}\n"
    assert errors(map_file, text) == ["4:15: duplicate key '<<': merge several as '<<: [*a, *b]'"]


def test_every_error_at_once_in_file_order(map_file: Path) -> None:
    """Read order (tls before services, top-level keys last) is not report order."""
    text = """\
        services:
          Bad: {type: echo, listen: ["tcp:0"]}
          web: {type: nosuch, listen: ["tcp:0"]}
          echo: {type: echo, listen: [{endpoint: "ssl:0", tls: nope}], max_connections: 0}
        colour: red
        tls:
          lab: {self_signed: [x], colour: blue}
        shutdown_grace: soon
        """
    assert errors(map_file, text) == [
        "2:8: services.Bad: service names are lower-case letters, digits, '-' and '_'",
        f"3:15: services.web.type: unknown service type 'nosuch' (one of {KINDS})",
        "4:56: services.echo.listen[0].tls: unknown TLS profile 'nope' (known: lab)",
        "4:81: services.echo.max_connections: must be at least 1, got 0",
        "5:1: colour: unknown key",
        "7:27: tls.lab.colour: unknown key",
        "8:17: shutdown_grace: expected a number, got a string",
    ]


def test_values_that_yaml_tags_cannot_carry_are_errors_not_crashes(tmp_path: Path) -> None:
    text = """\
shutdown_grace: .nan
services:
  e:
    type: echo
    listen: ["tcp:0"]
    max_connections: !!int abc
    enabled: !!bool maybe
    idle_timeout: .inf
"""
    with pytest.raises(ConfigErrors) as raised:
        parse_config(text, tmp_path / "netd.yaml")
    assert [str(e).split(": ", 1)[1] for e in raised.value.errors] == [
        "shutdown_grace: must be a finite number, got .nan",
        "services.e.max_connections: not an integer: 'abc'",
        "services.e.enabled: not true or false: 'maybe'",
        "services.e.idle_timeout: must be a finite number, got .inf",
    ]


def test_tls_names_that_would_break_generation_are_errors(tmp_path: Path) -> None:
    text = """\
tls:
  "my lab": {self_signed: [localhost]}
  ok:
    self_signed: [localhost, 127.0.0.1, "::1", "*.netd.test", bücher.example, "a b"]
    sni: {"a*b.example": {cert: c.pem, key: k.pem}, "*.other.test": {cert: c.pem, key: k.pem}}
services:
  e: {type: echo, listen: ["tcp:0"]}
"""
    with pytest.raises(ConfigErrors) as raised:
        parse_config(text, tmp_path / "netd.yaml")
    messages = [str(e).split(": ", 1)[1] for e in raised.value.errors]
    assert messages == [
        "tls.my lab: TLS profile names are letters, digits, '.', '-' and '_'",
        "tls.ok.self_signed[4]: not a host name or IP address: 'bücher.example' "
        "(international names go in their xn-- form)",
        "tls.ok.self_signed[5]: not a host name or IP address: 'a b' "
        "(international names go in their xn-- form)",
        "tls.ok.sni.a*b.example: not a server name or *.domain: 'a*b.example'",
    ]


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("::ffff:127.0.0.1", "127.0.0.1"),  # an IPv4 client of a listener on ::
        ("::1", "::1"),
        ("fe80::1%eth0", "fe80::1"),
        (IPv6Address("TCP", "::ffff:192.0.2.9", 4000), "192.0.2.9"),
        (IPv4Address("UDP", "192.0.2.9", 4000), "192.0.2.9"),
        (UNIXAddress("/run/netd/dns.sock"), None),
        ("unix", None),
        ("", None),
        (None, None),
    ],
)
def test_client_address_reads_ipv4_mapped_addresses_as_ipv4(
    client: str | IAddress | None, expected: str | None
) -> None:
    address = client_address(client)
    assert (None if address is None else str(address)) == expected


def test_a_mapped_client_is_inside_its_ipv4_network() -> None:
    mapped = client_address("::ffff:127.0.0.1")
    assert mapped is not None and mapped in ipaddress.ip_network("127.0.0.0/8")
    assert ipaddress.ip_address("::ffff:127.0.0.1") not in ipaddress.ip_network("127.0.0.0/8")


def test_a_map_read_leaves_none_of_its_text_behind(map_file: Path) -> None:
    """
    Its values are read from nodes whose marks hold the map's text: a constructor
    shared by every read kept them all, and the daemon grew by each map a reload read.
    """
    text = textwrap.dedent(
        """
        services:
          echo: {type: echo, listen: ["tcp:0"], max_connections: 7}
        """
    )
    seen = weakref.WeakSet[yaml.Node]()

    def composed(text: str, *args: object, **kwargs: object) -> yaml.Node:
        node = original(text, *args, **kwargs)
        seen.update(_nodes(node))
        return node

    original = config_module.compose
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(config_module, "compose", composed)
        parse_config(text, map_file)
    gc.collect()
    assert not list(seen)


def _nodes(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [node, *(n for pair in node.value for item in pair for n in _nodes(item))]
    if isinstance(node, yaml.SequenceNode):
        return [node, *(n for item in node.value for n in _nodes(item))]
    return [node]
